//! Node-level acceptance of the scale issue (every change costs the size of
//! the change): with 2,000 Services × 10 endpoints loaded through the API,
//! one endpoint change reaches the data plane, and the daemon's own
//! counters show that the sync touched exactly that one service port — in
//! both proxy modes.
//!
//! Each test runs `fairlead up` in its own network namespace
//! (`tests/common/cluster.rs`); the bulk objects are created from a thread
//! inside that namespace, 16 requests at a time, through the REST API (the
//! kube-rs client of the crate). Their endpoints are addresses nobody
//! serves; one Service `web` has live `fairlead echo` backends.
//!
//! Needs root, `ip`, and for the nftables test `nft` (skipped, saying so,
//! when missing).

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::cluster::{ms, Cluster, SETTLE};
use common::netns::have_nft;
use common::server::poll;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Services (and slices) loaded before the change.
const SERVICES: usize = 2_000;
const ENDPOINTS: usize = 10;
/// Concurrent requests of the bulk load.
const WRITERS: usize = 16;

/// The node's own address and the Service range route (nftables mode:
/// the kernel DNATs locally generated traffic; see tests/node_nftables.rs).
const NODE_IP: &str = "10.0.0.1";
const SERVICE_CIDR: &str = "10.96.0.0/12";

#[test]
fn agent() {
    common::netns::agent_main();
}

/// Create `SERVICES` selectorless Services `bulk-<i>` in namespace `bulk`,
/// each with one EndpointSlice of `ENDPOINTS` endpoints on addresses
/// nobody serves, from a thread inside the cluster's namespace.
fn bulk_load(c: &Cluster) {
    let kubeconfig = c.kubeconfig.clone();
    let started = Instant::now();
    c.ns.enter(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = fairlead::cli::client_from(&kubeconfig)
                .await
                .expect("client");
            let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
            nss.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "bulk"}})).unwrap(),
            )
            .await
            .expect("namespace bulk");
            let svcs: Api<Service> = Api::namespaced(client.clone(), "bulk");
            let slices: Api<EndpointSlice> = Api::namespaced(client, "bulk");
            let next = std::sync::atomic::AtomicUsize::new(0);
            let work = |_| async {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= SERVICES {
                        return;
                    }
                    let name = format!("bulk-{i}");
                    let svc: Service = serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}
                    }))
                    .unwrap();
                    svcs.create(&PostParams::default(), &svc)
                        .await
                        .unwrap_or_else(|e| panic!("Service {name}: {e}"));
                    let endpoints: Vec<serde_json::Value> = (0..ENDPOINTS)
                        .map(|j| {
                            let n = i * ENDPOINTS + j;
                            json!({"addresses": [format!("10.64.{}.{}", n >> 8, n & 255)]})
                        })
                        .collect();
                    let slice: EndpointSlice = serde_json::from_value(json!({
                        "metadata": {"name": format!("{name}-1"),
                                     "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4",
                        "ports": [{"port": 8080, "protocol": "TCP"}],
                        "endpoints": endpoints,
                    }))
                    .unwrap();
                    slices
                        .create(&PostParams::default(), &slice)
                        .await
                        .unwrap_or_else(|e| panic!("EndpointSlice {name}-1: {e}"));
                }
            };
            futures::future::join_all((0..WRITERS).map(work)).await;
        })
    });
    eprintln!(
        "{SERVICES} Services + {SERVICES} slices created in {}",
        ms(started.elapsed())
    );
}

/// Service `web` (selectorless, 80 → 8080) and its slice `web-1` with the
/// three backends, which answer.
fn live_web(c: &mut Cluster, backends: &[(&str, &str)]) -> SocketAddr {
    for (name, ip) in backends {
        c.echo(name, ip);
    }
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {ports: [{port: 80, targetPort: 8080, protocol: TCP}]}\n",
    );
    let endpoints: String = backends
        .iter()
        .map(|(_, ip)| format!("  - addresses: [\"{ip}\"]\n"))
        .collect();
    c.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    ));
    SocketAddr::new(c.cluster_ip("web"), 80)
}

/// The scenario: load, serve `web`, wait for quiet, change one endpoint,
/// and check what the sync touched.
fn one_change_touches_one_service_port(c: &mut Cluster, backends: &[(&str, &str)]) {
    bulk_load(c);
    let web = live_web(c, backends);
    let all: Vec<&str> = backends.iter().map(|(n, _)| *n).collect();
    let took = c.wait_serving(web, &all);
    eprintln!("web served by {all:?} after {}", ms(took));
    // Everything programmed: the bulk service ports, web, and the
    // `kubernetes` Service's.
    let want = (SERVICES + 2) as f64;
    poll("every service port programmed", SETTLE, || {
        (c.metric("fairlead_proxy_service_ports", &[]) >= want).then_some(())
    });
    // Quiet: no sync for a while (nothing else changes in this cluster).
    let mut last = c.metric("fairlead_node_synced_service_ports_total", &[]);
    poll("the node to be quiet", SETTLE, || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = c.metric("fairlead_node_synced_service_ports_total", &[]);
        let quiet = now == last;
        last = now;
        quiet.then_some(())
    });
    // And no table growth pending: the bulk load may have left the tables
    // due to grow, which the node does after a second of quiet (a full
    // sync of its own, not the change's).
    poll("no table growth pending", SETTLE, || {
        (c.metric("fairlead_nftables_growth_pending", &[]) == 0.0).then_some(())
    });
    let before = c.metric("fairlead_node_synced_service_ports_total", &[]);
    let full_before = c.metric("fairlead_nftables_full_syncs_total", &[]);

    // One endpoint leaves web's slice.
    let started = Instant::now();
    let out = c.kubectl_ok(&[
        "patch",
        "endpointslice",
        "web-1",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/endpoints/2"}]"#,
    ]);
    assert!(out.contains("patched"), "{out}");
    c.wait_serving(web, &all[..2]);
    eprintln!(
        "the endpoint change was followed after {}",
        ms(started.elapsed())
    );

    // Traffic follows as soon as the kernel commits; the node counts the
    // sync just after, so wait for the count to move.
    let after = poll("the sync to be counted", SETTLE, || {
        let now = c.metric("fairlead_node_synced_service_ports_total", &[]);
        (now > before).then_some(now)
    });
    assert_eq!(
        after - before,
        1.0,
        "the syncs since the change touched {} service ports, not just web's",
        after - before
    );
    assert_eq!(c.metric("fairlead_node_last_sync_service_ports", &[]), 1.0);
    assert_eq!(c.metric("fairlead_node_last_sync_services", &[]), 1.0);
    assert_eq!(
        c.metric("fairlead_nftables_full_syncs_total", &[]),
        full_before,
        "no table was recreated"
    );
}

#[test]
fn nftables_one_endpoint_change_at_2000_services_touches_one_service_port() {
    let test = "scale-nft";
    if !have_nft(test) {
        return;
    }
    let mut c = Cluster::empty(test);
    let backends = [
        ("b1", "10.244.0.11"),
        ("b2", "10.244.0.12"),
        ("b3", "10.244.0.13"),
    ];
    for a in backends.iter().map(|(_, a)| *a).chain([NODE_IP]) {
        c.ns.run_ok("ip", &["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    c.ns.run_ok(
        "ip",
        &["route", "add", SERVICE_CIDR, "dev", "lo", "src", NODE_IP],
    );
    c.start_up(&["--proxy-mode", "nftables"]);
    one_change_touches_one_service_port(&mut c, &backends);
}

#[test]
fn userspace_one_endpoint_change_at_2000_services_touches_one_service_port() {
    let mut c = Cluster::up("scale-us", &["--proxy-mode", "userspace"]);
    let backends = [
        ("b1", "127.0.0.11"),
        ("b2", "127.0.0.12"),
        ("b3", "127.0.0.13"),
    ];
    one_change_touches_one_service_port(&mut c, &backends);
}
