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
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::Notify;

use crate::controllers::endpointslice::TRIGGER_TIME_ANNOTATION;
use crate::proxy::userspace::{UserspaceConfig, UserspaceProxy};
use crate::proxy::{tracker, ProxyState};

pub use config::{NodeConfig, ProxyMode};

/// The shared cache of Services and EndpointSlices.
#[derive(Clone)]
pub struct Cache {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// Woken on every change.
    pub changed: Arc<Notify>,
}

impl Cache {
    /// Start the watches. Returns once both caches have their first list.
    pub async fn start(client: kube::Client) -> Cache {
        let changed = Arc::new(Notify::new());
        let (services, sw) = reflector::store();
        let (slices, lw) = reflector::store();
        let n = changed.clone();
        tokio::spawn(
            reflector::reflector(
                sw,
                watcher(
                    Api::<Service>::all(client.clone()),
                    watcher::Config::default(),
                ),
            )
            .default_backoff()
            .for_each(move |ev| {
                if let Err(e) = &ev {
                    tracing::debug!(error = %e, "service watch error (retrying)");
                } else {
                    metrics::counter!("kubeproxy_sync_proxy_rules_service_changes_total")
                        .increment(1);
                }
                n.notify_one();
                futures::future::ready(())
            }),
        );
        let n = changed.clone();
        tokio::spawn(
            reflector::reflector(
                lw,
                watcher(
                    Api::<EndpointSlice>::all(client),
                    watcher::Config::default(),
                ),
            )
            .default_backoff()
            .for_each(move |ev| {
                if let Err(e) = &ev {
                    tracing::debug!(error = %e, "endpointslice watch error (retrying)");
                } else {
                    metrics::counter!("kubeproxy_sync_proxy_rules_endpoint_changes_total")
                        .increment(1);
                }
                n.notify_one();
                futures::future::ready(())
            }),
        );
        let _ = services.wait_until_ready().await;
        let _ = slices.wait_until_ready().await;
        Cache {
            services,
            slices,
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
        ProxyMode::Userspace => UserspaceProxy::new(UserspaceConfig {
            node_name: node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            ..UserspaceConfig::default()
        }),
        ProxyMode::Nftables => anyhow::bail!("--proxy-mode=nftables is not implemented yet"),
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
        let slices = cache.slices.state();
        let state = cache.proxy_state();
        // Whether part of the state could not be applied (retried below).
        let incomplete = match proxy.sync(&state).await {
            Ok(stats) => {
                let mut h = health.lock().unwrap();
                h.last_synced = Some((Instant::now(), jiff::Timestamp::now()));
                h.pending_since = None;
                metrics::gauge!("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                    .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                latency.observe(&slices, started_at);
                stats.bind_errors > 0 || stats.address_errors > 0
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
            cache.changed.notified().await;
            true
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
