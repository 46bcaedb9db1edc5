//! The node daemon (`fairlead node`): watches of Services, EndpointSlices
//! and Namespaces feeding the proxy and cluster DNS with per-key changes,
//! plus the health and metrics endpoints kube-proxy users script against.
//!
//! ```text
//!  watch(Service) ────┐  events (bounded channel)
//!  watch(Slice) ──────┼──────────────► node loop (one task owns the state):
//!  watch(Namespace) ──┘                  model::Cache::apply_*  (lean views,
//!                                          dirty Service keys)
//!                     when due (see pacing):
//!                       Cache::take_dirty ─► ProxyTracker::update ─► changed
//!                                            service ports only ─► backend.apply
//!                                       └──► DnsServer::apply (dirty Services)
//! ```
//!
//! Every step costs the size of the change: an event updates one view; a
//! sync recomputes only the Services whose view or slices changed, and the
//! backends and DNS touch only the service ports and names that differ.
//! The whole state is rebuilt only at start (the first sync after every
//! watch has listed everything).
//!
//! **Pacing** (`Pacer`). A change is applied at once when the node is
//! idle. While changes keep arriving, syncs may spend 500 ms at once, then
//! at most a fifth of the time (a budget of sync time), and, after a burst
//! of two, no closer than
//! `--min-sync-period` (default 0: no such limit; kube-proxy's rule):
//! bursts coalesce into fewer, larger syncs, and a flood of changes cannot
//! turn the node into a busy loop that starves whatever shares its CPUs.
//!
//! Beside the loop, [`register`] keeps this node's `Node` and its
//! heartbeat Lease, as the kubelet does, and [`routes`] routes the other
//! nodes' podCIDRs via their InternalIPs (host-gw) where this node runs
//! pods. [`svchealth`] serves kube-proxy's per-Service health checks
//! (`healthCheckNodePort`), updated with the dirty Services like the proxy;
//! [`apilb`] is the joined agent's load balancer to every API server.
//!
//! The cache keeps its last state while the API server is unreachable (the
//! watches retry with backoff and resume from their resourceVersion, or
//! list again and drop what was deleted meanwhile), so traffic keeps
//! flowing with the last known endpoints.

pub mod apilb;
pub mod config;
pub mod http;
pub mod register;
pub mod routes;
pub mod svchealth;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::resources::Kind as ResourceKind;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::mpsc;

use crate::model::{Cache, Dirty, Kind};
use crate::proxy::l7redirect::L7Redirect;
use crate::proxy::nftables::{NftablesConfig, NftablesProxy};
use crate::proxy::tracker::ProxyTracker;
use crate::proxy::userspace::{UserspaceConfig, UserspaceProxy};
use crate::proxy::PortChange;

pub use config::{NodeConfig, ProxyMode};

/// One watch event, as the node loop consumes it.
enum Update {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Namespace(Box<watcher::Event<Namespace>>),
    /// From [`Source::Store`], not decoded yet.
    Stored(ResourceKind, Stored),
}

/// How many watch events may wait for the node loop (the watches pause
/// while it is full; each holds a whole decoded API object, so a long
/// queue is memory that stays with the process).
const EVENT_BUFFER: usize = 512;

/// A sync of at least this many service ports hands freed memory back to
/// the kernel afterwards (the first sync builds everything at once; glibc
/// keeps freed heap pages otherwise, and RSS would stay at that peak)...
const TRIM_AFTER_PORTS: usize = 1000;

/// ...at once after the first sync, else once syncs have been quiet this
/// long: during a bulk load most syncs are that large, and `malloc_trim`
/// after each one cost the whole process (it locks each allocator arena
/// while it walks it, stalling API requests for up to ~300 ms, and the
/// pages it returns fault back in). Quiet is also when nftables tables
/// that outgrew their size are recreated with more shards
/// ([`NftablesProxy::grow_if_due`]), for the same reason.
const TRIM_WHEN_QUIET: Duration = Duration::from_secs(1);

/// Forward a watch of `api` into `tx`, wrapped by `wrap`, counting events
/// under `metric`. Errors are retried with backoff.
fn watch<K>(
    api: Api<K>,
    tx: mpsc::Sender<Update>,
    wrap: fn(watcher::Event<K>) -> Update,
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
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default())
            .backoff(crate::controllers::WatchBackoff::default()));
        while let Some(ev) = events.next().await {
            match ev {
                Err(e) => tracing::debug!(error = %e, kind = metric, "watch error (retrying)"),
                Ok(ev) => {
                    metrics::counter!(metric).increment(1);
                    if tx.send(wrap(ev)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Where the node's Service, EndpointSlice and Namespace watches come
/// from.
#[derive(Clone)]
pub enum Source {
    /// The API server, through the node's client (every standalone node).
    Api,
    /// The store of the API server running in the same process (`fairlead
    /// up`), read directly. The node then costs the control plane no watch
    /// serving (no TLS, HTTP framing or socket writes per event for its
    /// busiest watches, nor the matching reads here): a bulk load through
    /// `up` pays for the node's own work and little else. The events are
    /// the same as through the API (the stored objects, the same list then
    /// watch from the list's revision, a relist when history is compacted).
    Store(Arc<dyn crate::store::Store>),
}

/// [`watch`]'s counterpart for [`Source::Store`]: list `kind`'s keys, then
/// watch them from the list's revision, into `tx` as stored bytes (the
/// node loop decodes them: in `fairlead up` that loop runs at a low CPU
/// priority, and decoding is most of a watch's work); errors (a compacted
/// revision, a store that is down) list again after a backoff, as kube's
/// watcher does.
fn watch_store(
    store: Arc<dyn crate::store::Store>,
    kind: ResourceKind,
    tx: mpsc::Sender<Update>,
    metric: &'static str,
) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let send = |e: Stored| {
                metrics::counter!(metric).increment(1);
                tx.send(Update::Stored(kind, e))
            };
            match store_round(&*store, kind, send, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(error = %e, kind = metric, "store watch error (relisting)")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });
}

/// One list-then-watch of [`watch_store`]: `Ok` when the receiver is
/// gone, `Err` when the watch must start over.
async fn store_round<F, Fut>(
    store: &dyn crate::store::Store,
    kind: ResourceKind,
    send: F,
    backoff: &mut Duration,
) -> Result<(), String>
where
    F: Fn(Stored) -> Fut,
    Fut: std::future::Future<Output = Result<(), mpsc::error::SendError<Update>>>,
{
    use crate::store::{EventKind, WatchItem};
    let prefix = crate::api::resources::by_kind(kind).prefix(None);
    let page = store.list_all(&prefix).await.map_err(|e| e.to_string())?;
    *backoff = Duration::from_millis(100);
    let mut w = store
        .watch(&prefix, page.revision)
        .await
        .map_err(|e| e.to_string())?;
    let initial = std::iter::once(Stored::Init)
        .chain(page.kvs.into_iter().map(Stored::InitApply))
        .chain(std::iter::once(Stored::InitDone));
    for e in initial {
        if send(e).await.is_err() {
            return Ok(());
        }
    }
    while let Some(item) = w.next().await {
        let e = match item.map_err(|e| e.to_string())? {
            WatchItem::Progress(_) => continue,
            WatchItem::Event(ev) if ev.kind == EventKind::Put => Stored::Apply(ev.kv),
            WatchItem::Event(ev) => Stored::Delete(ev.kv),
        };
        if send(e).await.is_err() {
            return Ok(());
        }
    }
    Err("the store's watch ended".into())
}

/// A [`Source::Store`] event, as stored (decoded by the node loop).
enum Stored {
    Init,
    InitApply(crate::store::KeyValue),
    Apply(crate::store::KeyValue),
    /// The last value (embedded store) or none (etcd): only the key counts.
    Delete(crate::store::KeyValue),
    InitDone,
}

impl Stored {
    /// The watch event this is, as kube's watcher gives it; `None` for an
    /// object that does not decode (skipped with a warning).
    fn decode<K>(self, kind: ResourceKind) -> Option<watcher::Event<K>>
    where
        K: kube::Resource<DynamicType = ()> + Default + serde::de::DeserializeOwned,
    {
        use watcher::Event as E;
        Some(match self {
            Stored::Init => E::Init,
            Stored::InitDone => E::InitDone,
            Stored::InitApply(kv) => E::InitApply(stored_object(&kv)?),
            Stored::Apply(kv) => E::Apply(stored_object(&kv)?),
            Stored::Delete(kv) => E::Delete(
                serde_json::from_slice(&kv.value).unwrap_or_else(|_| named_from_key(kind, &kv.key)),
            ),
        })
    }
}

/// The object stored at `kv`; one that does not decode is skipped with a
/// warning.
fn stored_object<K: serde::de::DeserializeOwned>(kv: &crate::store::KeyValue) -> Option<K> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| tracing::warn!(key = %kv.key, error = %e, "a stored object does not decode; skipped"))
        .ok()
}

/// A deleted object whose last value is gone (etcd's delete events carry
/// none): a deletion needs only the namespace and name, from its key.
fn named_from_key<K>(kind: ResourceKind, key: &str) -> K
where
    K: kube::Resource<DynamicType = ()> + Default,
{
    let prefix = crate::api::resources::by_kind(kind).prefix(None);
    let rest = key.strip_prefix(&prefix).unwrap_or(key);
    let mut o = K::default();
    let m = o.meta_mut();
    match rest.split_once('/') {
        Some((ns, name)) => {
            m.namespace = Some(ns.to_string());
            m.name = Some(name.to_string());
        }
        None => m.name = Some(rest.to_string()),
    }
    o
}

/// Apply one watch event to the cache; returns the kind whose initial list
/// just completed, if any.
fn apply_update(cache: &mut Cache, u: Update) -> Option<Kind> {
    use watcher::Event as E;
    fn ns_name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
        (
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or(""),
        )
    }
    let (kind, init) = match u {
        Update::Stored(kind, e) => {
            let u = match kind {
                ResourceKind::Service => Update::Service(Box::new(e.decode(kind)?)),
                ResourceKind::EndpointSlice => Update::Slice(Box::new(e.decode(kind)?)),
                ResourceKind::Namespace => Update::Namespace(Box::new(e.decode(kind)?)),
                _ => return None,
            };
            return apply_update(cache, u);
        }
        Update::Service(e) => match *e {
            E::Apply(o) | E::InitApply(o) => {
                cache.apply_service(&o);
                return None;
            }
            E::Delete(o) => {
                let (ns, n) = ns_name(&o.metadata);
                cache.delete_service(ns, n);
                return None;
            }
            E::Init => (Kind::Service, true),
            E::InitDone => (Kind::Service, false),
        },
        Update::Slice(e) => match *e {
            E::Apply(o) | E::InitApply(o) => {
                cache.apply_slice(&o);
                return None;
            }
            E::Delete(o) => {
                let (ns, n) = ns_name(&o.metadata);
                cache.delete_slice(ns, n);
                return None;
            }
            E::Init => (Kind::Slice, true),
            E::InitDone => (Kind::Slice, false),
        },
        Update::Namespace(e) => match *e {
            E::Apply(o) | E::InitApply(o) => {
                cache.apply_namespace(o.metadata.name.as_deref().unwrap_or(""));
                return None;
            }
            E::Delete(o) => {
                cache.delete_namespace(o.metadata.name.as_deref().unwrap_or(""));
                return None;
            }
            E::Init => (Kind::Namespace, true),
            E::InitDone => (Kind::Namespace, false),
        },
    };
    if init {
        cache.begin_relist(kind);
        None
    } else {
        cache.end_relist(kind);
        Some(kind)
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

/// The share of wall time syncs may take while changes keep coming (see
/// the module doc).
const SYNC_DUTY: f64 = 0.2;

/// Sync time that may be spent at once before [`SYNC_DUTY`] applies: a
/// single expensive sync (or a short burst) never delays the next change.
const SYNC_TIME_BURST: Duration = Duration::from_millis(500);

/// Immediate syncs allowed in a burst before `--min-sync-period` spaces
/// them (kube-proxy's runner allows 2).
const SYNC_BURST: f64 = 2.0;

/// When syncs may run. Two token buckets: kube-proxy's bounded-frequency
/// rule (a burst of [`SYNC_BURST`] syncs, then one per
/// `--min-sync-period`), and a budget of sync *time* that refills at
/// [`SYNC_DUTY`] of wall time up to [`SYNC_TIME_BURST`], so a flood of
/// changes coalesces into fewer, larger syncs that take at most a fifth of
/// the time, instead of a busy loop. The first sync (everything, at start)
/// is not charged. Pure (times are passed in), so it is unit-tested.
#[derive(Debug)]
struct Pacer {
    min_sync_period: Duration,
    /// Sync-count budget at `at`.
    tokens: f64,
    /// Sync-time budget at `at`, in seconds (negative: overdrawn).
    time: f64,
    at: Instant,
    first: bool,
}

impl Pacer {
    fn new(min_sync_period: Duration, now: Instant) -> Pacer {
        Pacer {
            min_sync_period,
            tokens: SYNC_BURST,
            time: SYNC_TIME_BURST.as_secs_f64(),
            at: now,
            first: true,
        }
    }

    /// Both budgets at `now`.
    fn budgets_at(&self, now: Instant) -> (f64, f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        let tokens = if self.min_sync_period.is_zero() {
            SYNC_BURST
        } else {
            (self.tokens + dt / self.min_sync_period.as_secs_f64()).min(SYNC_BURST)
        };
        let time = (self.time + dt * SYNC_DUTY).min(SYNC_TIME_BURST.as_secs_f64());
        (tokens, time)
    }

    /// The earliest time the next sync may start.
    fn next(&self, now: Instant) -> Instant {
        let (tokens, time) = self.budgets_at(now);
        let mut wait = 0.0f64;
        if tokens < 1.0 {
            wait = wait.max((1.0 - tokens) * self.min_sync_period.as_secs_f64());
        }
        if time < 0.0 {
            wait = wait.max(-time / SYNC_DUTY);
        }
        now + Duration::from_secs_f64(wait)
    }

    /// A sync started at `started` and ended at `ended`.
    fn synced(&mut self, started: Instant, ended: Instant) {
        let (tokens, time) = self.budgets_at(started);
        self.tokens = (tokens - 1.0).max(0.0);
        let took = ended.saturating_duration_since(started).as_secs_f64();
        // The sync's own duration refills nothing: charged from its start.
        self.time = if self.first { time } else { time - took };
        self.first = false;
        self.at = started;
    }
}

/// kube-proxy's network programming latency: for every EndpointSlice that
/// changed since the last sync and carries the controller's
/// `endpoints.kubernetes.io/last-change-trigger-time`, the time from that
/// change to now (the change is programmed). Changes from before the daemon
/// started are not counted (they would measure the daemon's downtime).
fn observe_programming_latency(trigger_times: &[jiff::Timestamp], since: jiff::Timestamp) {
    let now = jiff::Timestamp::now();
    for t in trigger_times.iter().filter(|t| **t >= since) {
        let secs = now.duration_since(*t).as_secs_f64().max(0.0);
        metrics::histogram!("kubeproxy_network_programming_duration_seconds").record(secs);
    }
}

/// Run the node daemon until the process ends.
pub async fn run(client: kube::Client, cfg: NodeConfig) -> anyhow::Result<()> {
    run_from(client, cfg, Source::Api).await
}

/// [`run`], with the Service, EndpointSlice and Namespace watches from
/// `source`.
pub async fn run_from(client: kube::Client, cfg: NodeConfig, source: Source) -> anyhow::Result<()> {
    crate::metrics::init();
    let health = Arc::new(Mutex::new(Health::default()));
    let node_name = cfg.node_name();
    http::spawn_metrics(cfg.metrics_bind_address).await?;
    http::spawn_healthz(cfg.healthz_bind_address, health.clone()).await?;
    let facts = register::Facts::gather(&node_name, cfg.node_ip);
    let proxy = match cfg.proxy_mode {
        ProxyMode::Userspace => Backend::Userspace(UserspaceProxy::new(UserspaceConfig {
            node_name: node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            ..UserspaceConfig::default()
        })),
        ProxyMode::Nftables => Backend::Nftables(
            NftablesProxy::new(NftablesConfig {
                node_name: node_name.clone(),
                nodeport_addresses: cfg.nodeport_addresses.clone(),
                service_ranges: cfg
                    .service_cidr
                    .iter()
                    .map(|c| (std::net::Ipv4Addr::from(c.base), c.prefix))
                    .collect(),
                ..NftablesConfig::default()
            }),
            // appProtocol ports: the node's own L7 proxy, on its address.
            Box::new(L7Side {
                redirect: std::sync::Mutex::new(L7Redirect::new(facts.internal_ip, &node_name)),
                proxy: UserspaceProxy::new(UserspaceConfig {
                    node_name: node_name.clone(),
                    manage_addresses: false,
                    ..UserspaceConfig::default()
                }),
            }),
        ),
    };
    let dns = match &cfg.dns {
        Some(d) => Some(start_dns(d).await?),
        None => None,
    };
    let started_at = jiff::Timestamp::now();
    // The pods bound to this node (stops with this future).
    let _pods = cfg.run_pods.then(|| {
        let kcfg = crate::kubelet::KubeletConfig {
            node_name: node_name.clone(),
            data_dir: cfg.data_dir.clone(),
            cluster_cidr: cfg.cluster_cidr,
            pod_cidr: cfg.pod_cidr,
            dns: cfg.dns.as_ref().and_then(|d| {
                Some(crate::kubelet::env::ClusterDns {
                    server: d.cluster_dns?.to_string(),
                    domain: d.cluster_domain.clone(),
                })
            }),
            host_ip: facts.internal_ip,
            backoff: cfg.backoff,
            client_ca: cfg.client_ca.clone(),
            log_max_bytes: cfg.log_max_bytes,
        };
        let client = client.clone();
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::kubelet::run(client, kcfg).await {
                tracing::error!(error = %e, "the pod agent stopped");
            }
        }))
    });
    // Routes to the other nodes' pods, where this node runs the pod
    // network (on a cluster with another CNI, that CNI routes).
    let _routes = cfg
        .run_pods
        .then(|| AbortOnDrop(tokio::spawn(routes::run(client.clone(), node_name.clone()))));
    // The Node and its Lease (stops with this future).
    let _register = cfg.register_node.then(|| {
        AbortOnDrop(tokio::spawn(register::run(
            client.clone(),
            facts.clone(),
            cfg.node_status_update_frequency,
        )))
    });
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    const SERVICES: &str = "kubeproxy_sync_proxy_rules_service_changes_total";
    const SLICES: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
    const NAMESPACES: &str = "fairlead_node_namespace_changes_total";
    match source {
        Source::Api => {
            watch(
                Api::<Service>::all(client.clone()),
                tx.clone(),
                |e| Update::Service(Box::new(e)),
                SERVICES,
            );
            watch(
                Api::<EndpointSlice>::all(client.clone()),
                tx.clone(),
                |e| Update::Slice(Box::new(e)),
                SLICES,
            );
            watch(
                Api::<Namespace>::all(client),
                tx,
                |e| Update::Namespace(Box::new(e)),
                NAMESPACES,
            );
        }
        Source::Store(store) => {
            watch_store(store.clone(), ResourceKind::Service, tx.clone(), SERVICES);
            watch_store(
                store.clone(),
                ResourceKind::EndpointSlice,
                tx.clone(),
                SLICES,
            );
            watch_store(store, ResourceKind::Namespace, tx, NAMESPACES);
        }
    }
    // Present from the start, as 0.
    metrics::counter!("fairlead_node_synced_service_ports_total").increment(0);
    tracing::info!(node = %node_name, mode = ?cfg.proxy_mode, "node daemon running");

    let mut cache = Cache::new();
    let mut tracker = ProxyTracker::new();
    let mut service_health = svchealth::ServiceHealth::new(&node_name);
    let mut listed: Vec<Kind> = Vec::new();
    let mut pacer = Pacer::new(cfg.min_sync_period, Instant::now());
    // A sync is owed even without changes (a retry after a failure).
    let mut retry_at: Option<Instant> = None;
    // nftables mode: checked once, after the first sync (see
    // `warn_if_no_service_route`).
    let mut route_checked = cfg.proxy_mode != ProxyMode::Nftables;
    let mut next_verify = Instant::now() + cfg.sync_period;
    // When to hand freed memory back, and to grow the nftables tables
    // (see `TRIM_WHEN_QUIET`).
    let mut trim_at: Option<Instant> = None;
    let mut grow_at: Option<Instant> = None;
    let mut first_sync = true;
    // systemd's READY=1 goes out once, after the first sync that applied.
    let mut announced = false;
    loop {
        let ready = listed.len() == 3;
        let dirty = cache.has_dirty();
        let due = if !ready {
            None
        } else if dirty {
            Some(pacer.next(Instant::now()))
        } else {
            retry_at
        };
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { anyhow::bail!("the watches ended") };
                if let Some(kind) = apply_update(&mut cache, u) {
                    if !listed.contains(&kind) {
                        listed.push(kind);
                    }
                }
                // Drain what is already there: one wake-up per burst.
                while let Ok(u) = rx.try_recv() {
                    if let Some(kind) = apply_update(&mut cache, u) {
                        if !listed.contains(&kind) {
                            listed.push(kind);
                        }
                    }
                }
                if cache.has_dirty() {
                    health
                        .lock()
                        .unwrap()
                        .pending_since
                        .get_or_insert_with(Instant::now);
                }
                continue;
            }
            _ = sleep_until(due), if due.is_some() => {}
            _ = sleep_until(grow_at), if grow_at.is_some() && !dirty => {
                grow_at = None;
                let grown = proxy.grow().await;
                metrics::gauge!("fairlead_nftables_growth_pending").set(0.0);
                match grown {
                    // Recreating every table allocated (and freed) a lot.
                    Ok(true) => trim_at = Some(Instant::now()),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "growing the nftables tables");
                        retry_at = Some(Instant::now() + SYNC_RETRY);
                    }
                }
                continue;
            }
            _ = sleep_until(trim_at), if trim_at.is_some() && !dirty => {
                trim_at = None;
                release_free_memory();
                continue;
            }
            _ = tokio::time::sleep_until(next_verify.into()), if ready && !dirty && retry_at.is_none() => {
                next_verify = Instant::now() + cfg.sync_period;
                if let Err(e) = proxy.verify().await {
                    tracing::warn!(error = %e, "checking the proxy's kernel state");
                    retry_at = Some(Instant::now());
                }
                continue;
            }
        }

        // Sync: the changed Services only.
        let started = Instant::now();
        let dirty = cache.take_dirty();
        let changes = tracker.update(&cache, &dirty.services);
        service_health.update(&cache, &dirty.services);
        if let Some(dns) = &dns {
            apply_dns(dns, &cache, &dirty);
        }
        let incomplete = match proxy.apply(&changes).await {
            Ok(incomplete) => {
                let mut h = health.lock().unwrap();
                h.last_synced = Some((Instant::now(), jiff::Timestamp::now()));
                h.pending_since = None;
                metrics::gauge!("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                    .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                observe_programming_latency(&dirty.trigger_times, started_at);
                if !announced {
                    announced = true;
                    crate::systemd::ready(&format!(
                        "node {node_name}: {} service ports programmed",
                        changes.len()
                    ));
                }
                incomplete
            }
            Err(e) => {
                tracing::warn!(error = %e, retry = ?SYNC_RETRY, "proxy sync failed");
                // The backend keeps what it could not apply and starts
                // over from its model on the next call.
                true
            }
        };
        let took = started.elapsed();
        if changes.len() >= TRIM_AFTER_PORTS {
            if first_sync {
                // Everything at once, with nothing else going on yet.
                release_free_memory();
            } else {
                trim_at = Some(Instant::now() + TRIM_WHEN_QUIET);
            }
        }
        first_sync = false;
        if proxy.growth_due().await {
            grow_at = Some(Instant::now() + TRIM_WHEN_QUIET);
            metrics::gauge!("fairlead_nftables_growth_pending").set(1.0);
        }
        metrics::histogram!("kubeproxy_sync_proxy_rules_duration_seconds")
            .record(took.as_secs_f64());
        metrics::gauge!("fairlead_proxy_service_ports").set(tracker.state().len() as f64);
        metrics::counter!("fairlead_node_synced_service_ports_total")
            .increment(changes.len() as u64);
        metrics::gauge!("fairlead_node_last_sync_service_ports").set(changes.len() as f64);
        metrics::gauge!("fairlead_node_last_sync_services").set(dirty.services.len() as f64);
        tracing::debug!(
            services = dirty.services.len(),
            service_ports = changes.len(),
            events = dirty.events,
            took = ?took,
            "synced"
        );
        if !route_checked {
            route_checked = true;
            warn_if_no_service_route(&cache);
        }
        pacer.synced(started, Instant::now());
        retry_at = incomplete.then(|| Instant::now() + SYNC_RETRY);
        next_verify = Instant::now() + cfg.sync_period;
    }
}

/// In nftables mode a connection from the node itself to a ClusterIP is
/// routed before the output hook rewrites its destination, so the node
/// needs a route that covers the Service range (a default route does), as
/// with kube-proxy. Without one such connections fail with "network
/// unreachable": say so once, at start, instead of leaving users to guess.
fn warn_if_no_service_route(cache: &Cache) {
    let Some(ip) = cache
        .services()
        .filter(|(_, v)| v.is_proxied())
        .find_map(|(_, v)| v.cluster_ips.first().copied())
    else {
        return;
    };
    tokio::spawn(async move {
        let routed = match crate::netlink::Rtnl::open() {
            Ok(rtnl) => rtnl.route_to(ip).await,
            Err(e) => Err(e),
        };
        if let Err(e) = routed {
            tracing::warn!(
                cluster_ip = %ip,
                error = %e,
                "no route covers the Service range: connections from this node to ClusterIPs \
                 will fail in nftables mode; add a default route or a route for the Service \
                 range (e.g. `ip route add 10.96.0.0/12 dev eth0`)"
            );
        }
    });
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Return the allocator's free pages to the kernel (glibc's
/// `malloc_trim`).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sleep until `at` (forever when `None`; the select guards that case).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Hand the dirty Services and namespaces to cluster DNS.
fn apply_dns(dns: &crate::dns::DnsServer, cache: &Cache, dirty: &Dirty) {
    dns.apply(cache, dirty);
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
            let rtnl = crate::netlink::Rtnl::open()
                .map_err(|e| anyhow::anyhow!("opening routing netlink: {e}"))?;
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            rtnl.add_addr("lo", ip, prefix, Some(DNS_LO_LABEL))
                .await
                .map_err(|e| anyhow::anyhow!("adding the cluster DNS address {ip}: {e}"))?;
        }
        listen.push(std::net::SocketAddr::new(ip, 53));
    }
    let mut cfg = crate::dns::DnsConfig {
        zone: d.cluster_domain.clone(),
        ttl: d.ttl,
        listen,
        pod_records: d.pod_records,
        rrl: d.rrl,
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
    /// The ruleset, and the L7 proxy its `appProtocol` ports are sent to
    /// (`proxy::l7redirect`).
    Nftables(NftablesProxy, Box<L7Side>),
}

/// nftables mode's userspace half: per-request balancing.
struct L7Side {
    redirect: std::sync::Mutex<L7Redirect>,
    proxy: UserspaceProxy,
}

impl Backend {
    /// The periodic check that the kernel still has what the backend
    /// programmed (nftables; the userspace proxy owns its sockets).
    async fn verify(&self) -> Result<(), String> {
        match self {
            Backend::Userspace(_) => Ok(()),
            Backend::Nftables(p, _) => p.verify().await.map(|_| ()).map_err(|e| e.to_string()),
        }
    }

    /// Whether the nftables tables wait to grow (see
    /// [`NftablesProxy::grow_if_due`]).
    async fn growth_due(&self) -> bool {
        match self {
            Backend::Userspace(_) => false,
            Backend::Nftables(p, _) => p.growth_due().await,
        }
    }

    /// Grow the nftables tables if due; Ok(true) when it did.
    async fn grow(&self) -> Result<bool, String> {
        match self {
            Backend::Userspace(_) => Ok(false),
            Backend::Nftables(p, _) => p.grow_if_due().await.map_err(|e| e.to_string()),
        }
    }

    /// Apply `changes`. Ok(true) when part of them could not be applied
    /// yet (retried after a while even without new changes).
    async fn apply(&self, changes: &[PortChange]) -> Result<bool, String> {
        match self {
            Backend::Userspace(p) => p
                .apply(changes)
                .await
                .map(|s| s.bind_errors > 0 || s.address_errors > 0)
                .map_err(|e| e.to_string()),
            Backend::Nftables(p, side) => {
                let (nft, l7) = side
                    .redirect
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .split(changes);
                // Listeners first, so the ruleset never sends traffic to
                // one that is not there yet.
                let l7_incomplete = if l7.is_empty() {
                    false
                } else {
                    let s = side.proxy.apply(&l7).await.map_err(|e| e.to_string())?;
                    s.bind_errors > 0
                };
                p.apply(&nft)
                    .await
                    .map(|_| l7_incomplete)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// `fairlead node --cleanup`: remove what the node daemon leaves in the
/// kernel (every nftables table it owns, the addresses it put on `lo` for
/// Service IPs and cluster DNS) and exit.
pub async fn cleanup() -> anyhow::Result<()> {
    let cfg = NftablesConfig::default();
    crate::proxy::nftables::cleanup(None, &cfg.table)
        .await
        .map_err(|e| anyhow::anyhow!("removing the nftables tables {}*: {e}", cfg.table))?;
    routes::cleanup()
        .await
        .map_err(|e| anyhow::anyhow!("removing the pod routes: {e}"))?;
    let rtnl = crate::netlink::Rtnl::open()
        .map_err(|e| anyhow::anyhow!("opening routing netlink: {e}"))?;
    let labels = [DNS_LO_LABEL, crate::proxy::userspace::LO_LABEL];
    let ours: Vec<std::net::IpAddr> = rtnl
        .addrs("lo")
        .await
        .map_err(|e| anyhow::anyhow!("listing the addresses on lo: {e}"))?
        .into_iter()
        .filter(|a| a.ip.is_ipv4() && labels.contains(&a.label.as_deref().unwrap_or("")))
        .map(|a| a.ip)
        .collect();
    let failed = rtnl
        .del_host_addrs("lo", &ours)
        .await
        .map_err(|e| anyhow::anyhow!("removing fairlead's addresses on lo: {e}"))?;
    if let Some((ip, e)) = failed.first() {
        anyhow::bail!("removing {ip} from lo: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fairlead up`'s node reads the store directly: the list, then the
    /// changes after it, reach the cache as they would through the API,
    /// other resources' keys stay out, and a deletion is named from its key
    /// when its value is gone (etcd's delete events carry none).
    #[tokio::test]
    async fn store_source_lists_then_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("db"))
                .await
                .unwrap(),
        );
        let svc = |ns: &str, name: &str, ip: &str| {
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": ns, "name": name},
                "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
            }))
            .unwrap()
        };
        let key = |ns: &str, name: &str| crate::model::ObjectKey::new(ns, name);
        store
            .create("/registry/services/a/web", svc("a", "web", "10.96.0.5"))
            .await
            .unwrap()
            .unwrap();
        store
            .create("/registry/configmaps/a/web", b"{}".to_vec())
            .await
            .unwrap()
            .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        watch_store(
            store.clone(),
            ResourceKind::Service,
            tx,
            "test_store_source_events",
        );
        let mut cache = Cache::new();
        // Init, the one Service, InitDone: the initial list is complete.
        let mut done = None;
        for _ in 0..3 {
            let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap();
            done = apply_update(&mut cache, u.unwrap());
        }
        assert_eq!(done, Some(Kind::Service));
        assert_eq!(cache.service_count(), 1);
        assert!(cache.service(&key("a", "web")).is_some());

        async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
            let f = tokio::time::timeout(Duration::from_secs(10), rx.recv());
            f.await
                .expect("an event within 10 s")
                .expect("the watch runs")
        }
        store
            .create("/registry/services/b/db", svc("b", "db", "10.96.0.6"))
            .await
            .unwrap()
            .unwrap();
        apply_update(&mut cache, next(&mut rx).await);
        assert!(cache.service(&key("b", "db")).is_some());
        store
            .delete("/registry/services/a/web", None)
            .await
            .unwrap()
            .unwrap();
        apply_update(&mut cache, next(&mut rx).await);
        assert!(cache.service(&key("a", "web")).is_none());
        assert_eq!(cache.service_count(), 1);

        // A delete event without the last value still names the object.
        let gone = crate::store::KeyValue {
            key: "/registry/services/b/db".into(),
            value: Vec::new(),
            create_revision: 1,
            mod_revision: 2,
        };
        apply_update(
            &mut cache,
            Update::Stored(ResourceKind::Service, Stored::Delete(gone)),
        );
        assert_eq!(cache.service_count(), 0);
        // A value that does not decode is skipped, not applied.
        let bad = crate::store::KeyValue {
            key: "/registry/services/c/x".into(),
            value: b"{not json".to_vec(),
            create_revision: 3,
            mod_revision: 3,
        };
        apply_update(
            &mut cache,
            Update::Stored(ResourceKind::Service, Stored::Apply(bad)),
        );
        assert_eq!(cache.service_count(), 0);
    }

    #[test]
    fn pacer_bursts_then_spaces_syncs() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // No period: only the time budget spaces syncs. The first sync
        // (the whole state at start) is free, however long.
        let mut p = Pacer::new(Duration::ZERO, t0);
        assert_eq!(p.next(t0), t0);
        p.synced(t0, t0 + ms(3000));
        assert_eq!(p.next(t0 + ms(3000)), t0 + ms(3000));
        // One expensive sync within the burst budget: no wait after it.
        let t1 = t0 + ms(3000);
        p.synced(t1, t1 + ms(400));
        assert_eq!(p.next(t1 + ms(400)), t1 + ms(400));
        // A flood: the budget runs dry, then syncs take a fifth of the time.
        let t2 = t1 + ms(400);
        p.synced(t2, t2 + ms(300));
        let next = p.next(t2 + ms(300));
        assert!(next > t2 + ms(300), "overdrawn: must wait");
        p.synced(next, next + ms(100));
        let after = p.next(next + ms(100));
        let cycle = after - next;
        assert!(
            cycle.abs_diff(ms(500)) < ms(1),
            "100 ms of sync in a 500 ms cycle, not {cycle:?}"
        );

        // A period of 100ms: two quick syncs at once, then one per 100ms.
        let mut p = Pacer::new(ms(100), t0);
        p.synced(t0, t0);
        assert_eq!(p.next(t0), t0);
        p.synced(t0, t0);
        assert_eq!(p.next(t0), t0 + ms(100));
        assert_eq!(p.next(t0 + ms(60)), t0 + ms(100));
        p.synced(t0 + ms(100), t0 + ms(100));
        assert_eq!(p.next(t0 + ms(100)), t0 + ms(200));
        // After a quiet second, a burst again.
        assert_eq!(p.next(t0 + ms(1100)), t0 + ms(1100));
    }
}
