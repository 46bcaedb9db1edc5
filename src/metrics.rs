//! Process-wide metrics: one Prometheus recorder shared by every component
//! in the process (`fairlead up` runs the API server and the node daemon
//! together), rendered by each component's `/metrics` endpoint.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric fairlead exports, with its `# HELP` text: Prometheus'
/// linters (`promtool check metrics`) want one for each, and a dashboard
/// author reads them. Names follow kube-proxy, CoreDNS and kube-apiserver
/// where those have the same metric, so their dashboards work.
pub const METRICS: &[(&str, Type, &str)] = &[
    // API server
    ("apiserver_request_total", Type::Counter, "API requests by verb, group, version, resource, subresource, scope, component and HTTP code."),
    ("apiserver_request_duration_seconds", Type::Histogram, "API request latency by verb, group, version, resource, subresource, scope and component (watches excluded)."),
    ("apiserver_registered_watchers", Type::Gauge, "Open watch streams by group, version and kind."),
    ("apiserver_terminated_watchers_total", Type::Counter, "Watches closed because their client stopped reading, by resource."),
    ("apiserver_flowcontrol_rejected_requests_total", Type::Counter, "Requests refused with 429 by fairness, by reason (queue full, waited too long)."),
    ("fairlead_store_commits_total", Type::Counter, "Store write batches committed (embedded store)."),
    ("fairlead_store_committed_transactions_total", Type::Counter, "Store transactions committed, over all batches (embedded store)."),
    ("fairlead_store_commit_duration_seconds", Type::Histogram, "Time to commit one store write batch (embedded store)."),
    // controllers
    ("endpoint_slice_controller_changes_total", Type::Counter, "EndpointSlice writes by the controller, by operation (create, update, delete)."),
    ("leader_election_master_status", Type::Gauge, "1 while this process leads the named leader-elected group, else 0."),
    ("fairlead_node_ipam_allocations_total", Type::Counter, "Pod CIDRs given to Nodes by node IPAM."),
    // node: proxy sync (kube-proxy's names)
    ("kubeproxy_sync_proxy_rules_duration_seconds", Type::Histogram, "Time of one proxy sync (changed Services applied to the backend)."),
    ("kubeproxy_sync_full_proxy_rules_duration_seconds", Type::Histogram, "Time of one full nftables sync (every table rebuilt)."),
    ("kubeproxy_sync_partial_proxy_rules_duration_seconds", Type::Histogram, "Time of one partial nftables sync (changed Services only)."),
    ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", Type::Gauge, "Unix time of the last successful proxy sync."),
    ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", Type::Counter, "nftables transactions that failed (the tables are then rebuilt)."),
    ("kubeproxy_network_programming_duration_seconds", Type::Histogram, "From an EndpointSlice change (its trigger time) to the node's proxy applying it."),
    ("kubeproxy_sync_proxy_rules_service_changes_total", Type::Counter, "Service watch events received by the node."),
    ("kubeproxy_sync_proxy_rules_endpoint_changes_total", Type::Counter, "EndpointSlice watch events received by the node."),
    ("fairlead_node_namespace_changes_total", Type::Counter, "Namespace watch events received by the node."),
    ("fairlead_node_last_sync_services", Type::Gauge, "Services changed in the last proxy sync."),
    ("fairlead_node_last_sync_service_ports", Type::Gauge, "Service ports changed in the last proxy sync."),
    ("fairlead_node_synced_service_ports_total", Type::Counter, "Service ports handed to the proxy backends, over all syncs."),
    // node: nftables backend
    ("fairlead_nftables_tables", Type::Gauge, "nftables tables the proxy owns (its shards)."),
    ("fairlead_nftables_chains", Type::Gauge, "Chains in the proxy's nftables tables."),
    ("fairlead_nftables_rules", Type::Gauge, "Rules in the proxy's nftables tables."),
    ("fairlead_nftables_endpoint_maps", Type::Gauge, "Endpoint maps in the proxy's nftables tables."),
    ("fairlead_nftables_map_elements", Type::Gauge, "Elements of the proxy's nftables maps and sets."),
    ("fairlead_nftables_affinity_sets", Type::Gauge, "Session-affinity sets in the proxy's nftables tables."),
    ("fairlead_nftables_full_syncs_total", Type::Counter, "Full nftables syncs."),
    ("fairlead_nftables_growth_pending", Type::Gauge, "1 while the tables are due to grow (rebuilt with more shards) once syncs are quiet for a second, else 0."),
    ("fairlead_nftables_partial_syncs_total", Type::Counter, "Partial nftables syncs."),
    ("fairlead_nftables_repairs_total", Type::Counter, "Times the proxy found its tables changed by someone else and rebuilt them."),
    ("fairlead_nftables_adopted_tables_total", Type::Counter, "Tables of a previous run adopted at start instead of rebuilt."),
    ("fairlead_conntrack_entries_deleted_total", Type::Counter, "Stale UDP conntrack entries deleted when endpoints went away."),
    ("fairlead_conntrack_cleanup_failures_total", Type::Counter, "Failed conntrack cleanups."),
    // node: userspace proxy
    ("fairlead_proxy_service_ports", Type::Gauge, "Service ports the userspace proxy listens for."),
    ("fairlead_proxy_connections_total", Type::Counter, "Connections accepted by the userspace proxy."),
    ("fairlead_proxy_active_connections", Type::Gauge, "Connections open through the userspace proxy."),
    ("fairlead_proxy_backend_connect_errors_total", Type::Counter, "Failed connections to endpoints (another endpoint is tried)."),
    ("fairlead_proxy_bind_errors_total", Type::Counter, "Service ports the userspace proxy could not listen on."),
    ("fairlead_proxy_bytes_total", Type::Counter, "Bytes proxied, by direction."),
    ("fairlead_proxy_spliced_bytes_total", Type::Counter, "Bytes proxied with splice(2), without copies through userspace."),
    ("fairlead_proxy_udp_flows", Type::Gauge, "UDP flows (client sessions) the userspace proxy tracks."),
    ("fairlead_proxy_dropped_total", Type::Counter, "Connections reset and datagrams dropped by the userspace proxy's caps, by reason (tcp_client_limit, udp_flow_limit)."),
    ("fairlead_proxy_http_requests_total", Type::Counter, "HTTP requests balanced per request (appProtocol h2c, grpc, http), by code."),
    ("fairlead_proxy_http_request_duration_seconds", Type::Histogram, "Latency of HTTP requests balanced per request."),
    ("fairlead_apiserver_lb_switches_total", Type::Counter, "Times a joined agent's API load balancer moved to another server."),
    ("fairlead_apiserver_lb_failed_connections_total", Type::Counter, "Connections the agent's API load balancer could not make to a server."),
    // node: cluster DNS (CoreDNS's names)
    ("coredns_dns_requests_total", Type::Counter, "DNS queries by server, zone, protocol, family and type."),
    ("coredns_dns_responses_total", Type::Counter, "DNS responses by server, zone and rcode."),
    ("coredns_dns_request_duration_seconds", Type::Histogram, "DNS query latency by server, zone and type."),
    ("coredns_cache_entries", Type::Gauge, "Entries in the forwarder's cache, by type (success, denial)."),
    ("coredns_cache_hits_total", Type::Counter, "Forwarded names answered from the cache."),
    ("coredns_cache_misses_total", Type::Counter, "Forwarded names not in the cache."),
    ("coredns_cache_prefetch_total", Type::Counter, "Popular cached answers refreshed from an upstream before they expired."),
    ("coredns_cache_served_stale_total", Type::Counter, "Answers served stale from the cache while upstreams failed (RFC 8767)."),
    ("coredns_forward_requests_total", Type::Counter, "Queries sent upstream, by upstream."),
    ("coredns_forward_responses_total", Type::Counter, "Upstream responses, by upstream and rcode."),
    ("coredns_forward_request_duration_seconds", Type::Histogram, "Upstream query latency."),
    ("coredns_forward_max_concurrent_rejects_total", Type::Counter, "Queries answered SERVFAIL because too many were outstanding upstream."),
    ("fairlead_dns_records", Type::Gauge, "Records in the cluster DNS index."),
    ("fairlead_dns_index_build_duration_seconds", Type::Histogram, "Time to apply Service and EndpointSlice changes to the DNS index."),
    ("fairlead_dns_answer_cache_total", Type::Counter, "Cluster-name queries answered from the table of finished replies (result=hit) or through the index (result=miss)."),
    ("fairlead_dns_dropped_total", Type::Counter, "DNS packets dropped (malformed beyond an answer, or over a limit), by reason."),
];

/// Install the recorder (idempotent).
pub fn init() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".into()),
                // Fine below 25 ms: the node's targets (a change applied
                // in a few ms) must be readable from its own histograms.
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.2,
                    0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0,
                    30.0, 45.0, 60.0,
                ],
            )
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by an embedding
        // program); then our handle just renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        for &(name, ty, help) in METRICS {
            match ty {
                Type::Counter => metrics::describe_counter!(name, help),
                Type::Gauge => metrics::describe_gauge!(name, help),
                Type::Histogram => metrics::describe_histogram!(name, help),
            }
        }
        // Histograms keep raw samples until upkeep folds them into buckets;
        // without it memory grows with every observation when /metrics is
        // not scraped (PrometheusBuilder::install would do this for us, but
        // it also starts its own HTTP listener).
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            });
        handle
    })
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    init().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code records is in [`METRICS`], with its type (a
    /// metric missing here has no `# HELP` and fails promtool's lint).
    #[test]
    fn every_recorded_metric_is_described() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut recorded = std::collections::BTreeMap::new();
        let mut stack = vec![std::path::PathBuf::from(src)];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (ty, mac) in [
                (Type::Counter, "counter!("),
                (Type::Gauge, "gauge!("),
                (Type::Histogram, "histogram!("),
            ] {
                for piece in text.split(mac).skip(1) {
                    let piece = piece.trim_start();
                    if let Some(rest) = piece.strip_prefix('"') {
                        let name = rest.split('"').next().unwrap();
                        if !name.is_empty() && !name.contains(' ') {
                            recorded.insert(name.to_string(), ty);
                        }
                    }
                }
            }
        }
        assert!(recorded.len() > 40, "{recorded:?}");
        for (name, ty) in &recorded {
            let described = METRICS.iter().find(|(n, _, _)| n == name);
            assert!(described.is_some(), "{name} is recorded but not in METRICS");
            assert_eq!(described.unwrap().1, *ty, "{name}'s type");
        }
    }
}
