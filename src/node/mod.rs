//! The node daemon (`fairlead node`): one watch cache of Services and
//! EndpointSlices feeding the proxy (and cluster DNS), plus the health and
//! metrics endpoints kube-proxy users script against.
//!
//! ```text
//!  reflector(Service) ──┐                    ┌─► proxy backend.sync(state)
//!  reflector(Slice) ────┴─► notify ─► sync loop (coalesced by --min-sync-period)
//!                                       tracker::build (pure)
//! ```
//!
//! The caches keep their last state while the API server is unreachable
//! (kube-rs watchers retry with backoff and resume from their
//! resourceVersion), so traffic keeps flowing with the last known endpoints.

pub mod config;
pub mod http;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::Notify;

use crate::controllers::endpointslice::TRIGGER_TIME_ANNOTATION;
use crate::proxy::nftables::{NftablesConfig, NftablesProxy};
use crate::proxy::userspace::{UserspaceConfig, UserspaceProxy};
use crate::proxy::{tracker, ProxyState};

pub use config::{NodeConfig, ProxyMode};

/// The shared cache of Services and EndpointSlices.
#[derive(Clone)]
pub struct Cache {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// Namespace names (DNS answers NODATA, not NXDOMAIN, for
    /// `<ns>.svc.<zone>` of an existing namespace).
    pub namespaces: Store<Namespace>,
    /// Woken on every change.
    pub changed: Arc<Notify>,
}

/// Keep `writer` in sync with a watch of `api`; wake `changed` on every
/// event and count it under `metric`. Errors are retried with backoff while
/// the store keeps its last contents.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    metric: &'static str,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(
        reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .for_each(move |ev| {
                match &ev {
                    Err(e) => tracing::debug!(error = %e, kind = metric, "watch error (retrying)"),
                    Ok(_) => metrics::counter!(metric).increment(1),
                }
                changed.notify_one();
                futures::future::ready(())
            }),
    );
}

impl Cache {
    /// Start the watches. Returns once every cache has its first list.
    pub async fn start(client: kube::Client) -> Cache {
        let changed = Arc::new(Notify::new());
        let (services, sw) = reflector::store();
        let (slices, lw) = reflector::store();
        let (namespaces, nw) = reflector::store();
        reflect(
            Api::<Service>::all(client.clone()),
            sw,
            changed.clone(),
            "kubeproxy_sync_proxy_rules_service_changes_total",
        );
        reflect(
            Api::<EndpointSlice>::all(client.clone()),
            lw,
            changed.clone(),
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        );
        reflect(
            Api::<Namespace>::all(client),
            nw,
            changed.clone(),
            "fairlead_node_namespace_changes_total",
        );
        let _ = services.wait_until_ready().await;
        let _ = slices.wait_until_ready().await;
        let _ = namespaces.wait_until_ready().await;
        Cache {
            services,
            slices,
            namespaces,
            changed,
        }
    }

    /// The desired proxy state of the current cache contents.
    pub fn proxy_state(&self) -> ProxyState {
        let services = self.services.state();
        let slices = self.slices.state();
        tracker::build(
            services.iter().map(|s| s.as_ref()),
            slices.iter().map(|s| s.as_ref()),
        )
    }

    /// Feed the DNS server the current contents.
    pub fn update_dns(&self, dns: &crate::dns::DnsServer) {
        let namespaces: Vec<String> = self
            .namespaces
            .state()
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        dns.update(&self.services.state(), &self.slices.state(), &namespaces);
    }
}

/// Sync bookkeeping shared with `/healthz`.
#[derive(Default)]
pub struct Health {
    /// When the last successful sync finished.
    pub last_synced: Option<(Instant, jiff::Timestamp)>,
    /// Oldest change not yet applied.
    pub pending_since: Option<Instant>,
}

/// How long a change may stay unapplied before `/healthz` says unhealthy
/// (kube-proxy's healthz timeout).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

impl Health {
    /// kube-proxy's rule: healthy once synced, unless a change has waited
    /// longer than the timeout.
    pub fn healthy(&self) -> bool {
        self.last_synced.is_some()
            && self
                .pending_since
                .is_none_or(|p| p.elapsed() < HEALTH_TIMEOUT)
    }
}

/// How soon a sync that failed (or left frontends unbound / service IPs
/// unassigned) is retried when no new change arrives first.
pub const SYNC_RETRY: Duration = Duration::from_secs(1);

/// kube-proxy's network programming latency: for every EndpointSlice that
/// changed since the last successful sync and carries the controller's
/// `endpoints.kubernetes.io/last-change-trigger-time`, the time from that
/// change to now (the change is programmed). Changes from before the daemon
/// started are not counted (they would measure the daemon's downtime).
#[derive(Default)]
struct ProgrammingLatency {
    /// Slice (namespace, name) → resourceVersion at the last sync.
    seen: HashMap<(String, String), String>,
}

impl ProgrammingLatency {
    fn observe(&mut self, slices: &[Arc<EndpointSlice>], since: jiff::Timestamp) {
        let now = jiff::Timestamp::now();
        let mut seen = HashMap::with_capacity(slices.len());
        for s in slices {
            let key = (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            let rv = s.metadata.resource_version.clone().unwrap_or_default();
            if self.seen.get(&key) != Some(&rv) {
                let trigger = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok());
                if let Some(t) = trigger.filter(|t| *t >= since) {
                    let secs = now.duration_since(t).as_secs_f64().max(0.0);
                    metrics::histogram!("kubeproxy_network_programming_duration_seconds")
                        .record(secs);
                }
            }
            seen.insert(key, rv);
        }
        self.seen = seen;
    }
}

/// Run the node daemon until the process ends.
pub async fn run(client: kube::Client, cfg: NodeConfig) -> anyhow::Result<()> {
    crate::metrics::init();
    let health = Arc::new(Mutex::new(Health::default()));
    let node_name = cfg.node_name();
    http::spawn_metrics(cfg.metrics_bind_address).await?;
    http::spawn_healthz(cfg.healthz_bind_address, health.clone()).await?;
    let proxy = match cfg.proxy_mode {
        ProxyMode::Userspace => Backend::Userspace(UserspaceProxy::new(UserspaceConfig {
            node_name: node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            ..UserspaceConfig::default()
        })),
        ProxyMode::Nftables => Backend::Nftables(NftablesProxy::new(NftablesConfig {
            node_name: node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            ..NftablesConfig::default()
        })),
    };
    let dns = match &cfg.dns {
        Some(d) => Some(start_dns(d).await?),
        None => None,
    };
    let started_at = jiff::Timestamp::now();
    let cache = Cache::start(client).await;
    tracing::info!(node = %node_name, mode = ?cfg.proxy_mode, "node daemon running");
    let mut latency = ProgrammingLatency::default();
    let mut last_sync: Option<Instant> = None;
    loop {
        // Coalesce bursts: at most one sync per min_sync_period.
        if let Some(t) = last_sync {
            let since = t.elapsed();
            if since < cfg.min_sync_period {
                tokio::time::sleep(cfg.min_sync_period - since).await;
            }
        }
        let started = Instant::now();
        if let Some(dns) = &dns {
            // Building the index is CPU work proportional to the cluster;
            // keep the runtime's other tasks (DNS queries, proxying) going.
            if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                tokio::task::block_in_place(|| cache.update_dns(dns));
            } else {
                cache.update_dns(dns);
            }
        }
        let slices = cache.slices.state();
        let state = cache.proxy_state();
        // Whether part of the state could not be applied (retried below).
        let incomplete = match proxy.sync(&state).await {
            Ok(incomplete) => {
                let mut h = health.lock().unwrap();
                h.last_synced = Some((Instant::now(), jiff::Timestamp::now()));
                h.pending_since = None;
                metrics::gauge!("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                    .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                latency.observe(&slices, started_at);
                incomplete
            }
            Err(e) => {
                tracing::warn!(error = %e, retry = ?SYNC_RETRY, "proxy sync failed");
                true
            }
        };
        metrics::histogram!("kubeproxy_sync_proxy_rules_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("fairlead_proxy_service_ports").set(state.len() as f64);
        last_sync = Some(Instant::now());
        let changed = if incomplete {
            // Retry on the next change or after SYNC_RETRY, whichever first.
            tokio::time::timeout(SYNC_RETRY, cache.changed.notified())
                .await
                .is_ok()
        } else {
            // Without changes, check the kernel every sync_period.
            loop {
                match tokio::time::timeout(cfg.sync_period, cache.changed.notified()).await {
                    Ok(()) => break true,
                    Err(_) => {
                        if let Err(e) = proxy.verify().await {
                            tracing::warn!(error = %e, "checking the proxy's kernel state");
                            break false;
                        }
                    }
                }
            }
        };
        if changed {
            health
                .lock()
                .unwrap()
                .pending_since
                .get_or_insert_with(Instant::now);
        }
    }
}

/// `lo` label of the cluster DNS address (distinct from the proxy's own
/// `lo:fairlead`, which the proxy cleans up as its leftovers).
const DNS_LO_LABEL: &str = "lo:fairleaddns";

/// Start cluster DNS: make the kube-dns Service IP local (every node serves
/// it itself; the kube-dns Service carries the service-proxy-name label so
/// proxies leave it alone) and listen there and on `--dns-bind-address`.
async fn start_dns(d: &config::DnsSettings) -> anyhow::Result<crate::dns::DnsServer> {
    let mut listen = d.bind.clone();
    if let Some(ip) = d.cluster_dns {
        if !ip.is_loopback() {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["addr", "replace", &format!("{ip}/32"), "dev", "lo"]);
            if ip.is_ipv4() {
                cmd.args(["label", DNS_LO_LABEL]);
            }
            let out = cmd
                .output()
                .await
                .map_err(|e| anyhow::anyhow!("running ip (iproute2): {e}"))?;
            anyhow::ensure!(
                out.status.success(),
                "adding the cluster DNS address {ip}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        listen.push(std::net::SocketAddr::new(ip, 53));
    }
    let mut cfg = crate::dns::DnsConfig {
        zone: d.cluster_domain.clone(),
        ttl: d.ttl,
        listen,
        pod_records: d.pod_records,
        ..Default::default()
    };
    if !d.upstreams.is_empty() {
        cfg.upstreams = d.upstreams.clone();
    }
    Ok(crate::dns::DnsServer::start(cfg).await?)
}

/// The proxy backend chosen by `--proxy-mode`; both take the same desired
/// state.
enum Backend {
    Userspace(UserspaceProxy),
    Nftables(NftablesProxy),
}

impl Backend {
    /// The periodic check that the kernel still has what the backend
    /// programmed (nftables; the userspace proxy owns its sockets).
    async fn verify(&self) -> Result<(), String> {
        match self {
            Backend::Userspace(_) => Ok(()),
            Backend::Nftables(p) => p.verify().await.map(|_| ()).map_err(|e| e.to_string()),
        }
    }

    /// Apply `state`. Ok(true) when part of it could not be applied yet
    /// (retried after a while even without new changes).
    async fn sync(&self, state: &ProxyState) -> Result<bool, String> {
        match self {
            Backend::Userspace(p) => p
                .sync(state)
                .await
                .map(|s| s.bind_errors > 0 || s.address_errors > 0)
                .map_err(|e| e.to_string()),
            Backend::Nftables(p) => p
                .sync(state)
                .await
                .map(|_| false)
                .map_err(|e| e.to_string()),
        }
    }
}

/// `fairlead node --cleanup`: remove what the node daemon leaves in the
/// kernel (the nftables table, the addresses it put on `lo` for Service IPs
/// and cluster DNS) and exit.
pub async fn cleanup() -> anyhow::Result<()> {
    let cfg = NftablesConfig::default();
    crate::proxy::nftables::cleanup(None, &cfg.table)
        .await
        .map_err(|e| anyhow::anyhow!("removing the nftables table {}: {e}", cfg.table))?;
    for label in [DNS_LO_LABEL, crate::proxy::userspace::LO_LABEL] {
        let out = tokio::process::Command::new("ip")
            .args(["-4", "addr", "flush", "dev", "lo", "label", label])
            .output()
            .await
            .map_err(|e| anyhow::anyhow!("running ip (iproute2): {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "removing the {label} addresses: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
