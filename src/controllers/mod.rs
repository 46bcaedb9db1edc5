//! Controllers: turn Services + Pods into EndpointSlices and legacy
//! Endpoints, through the API server, with kube-rs's runtime; also node
//! IPAM ([`nodeipam`]), Deployments ([`deployment`]), ReplicaSets
//! ([`replicaset`]), the garbage collector ([`gc`]), node lifecycle and
//! taint-based eviction ([`nodelifecycle`]), PodDisruptionBudgets'
//! status ([`disruption`]), the approval and signing of nodes'
//! certificate requests ([`csr`]), and a `default` ServiceAccount in every
//! namespace ([`serviceaccount`]).
//!
//! ```text
//!  watcher(Service) ─┐
//!  watcher(Pod) ──► map pod → services that select it ─► Controller ─► reconcile(service)
//!                                                                        │ list its pods + slices
//!                                                                        │ endpointslice::plan (pure)
//!                                                                        ▼
//!                                        create / replace / delete EndpointSlices, Endpoints
//! ```
//!
//! A reconcile reads the Service's pods and slices from the API server, not
//! from a cache: a cache fed by another watch than the one that triggered
//! the reconcile may not show the change yet, and that change would then be
//! lost until the next event. Except for Services without a selector (their
//! users write their slices; most Services of a large cluster of external
//! endpoints are such): a reconcile of one costs no request unless the cache
//! of our own slices shows slices of it to delete (a slice the cache does
//! not show yet triggers a reconcile of its owner when it arrives, through
//! `owns`). Listing per such Service would make a bulk load quadratic: each
//! LIST walks every slice.
//!
//! Only the leader (a Lease in kube-system, see [`leader`]) runs them, so
//! several `fairlead controllers` can run for availability. Everything they
//! start stops when leadership is lost (see [`run_controllers`]).

pub mod csr;
pub mod deployment;
pub mod disruption;
pub mod endpointslice;
pub mod gc;
pub mod leader;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod replicaset;
pub mod serviceaccount;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use tokio::sync::Notify;

use endpointslice::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};

/// Controller settings (flags of `fairlead controllers`).
#[derive(Clone, Debug)]
pub struct Config {
    pub max_endpoints_per_slice: usize,
    /// Pod CIDRs for Nodes (`None`: `--allocate-node-cidrs=false`).
    pub ipam: Option<nodeipam::IpamConfig>,
    pub leader: leader::LeaderConfig,
    pub lifecycle: nodelifecycle::Config,
    /// Signs node client certificates (`None`: no CA key here).
    pub signer: Option<csr::Signer>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
}

struct Ctx {
    client: kube::Client,
    max: usize,
    /// The slices this controller manages (label managed-by=fairlead).
    managed: Store<EndpointSlice>,
}

fn managed_selector(service: &str) -> String {
    format!("{SERVICE_NAME_LABEL}={service},{MANAGED_BY_LABEL}={MANAGED_BY}")
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    if !endpointslice::has_selector(&svc) {
        // Selector-less Services are managed by their users: nothing to do
        // unless slices of ours are left from when it had a selector.
        if !has_managed(&ctx.managed, &ns, &name) {
            return Ok(Action::requeue(RESYNC));
        }
        let existing = slices
            .list(&ListParams::default().labels(&managed_selector(&name)))
            .await?
            .items;
        for s in existing {
            delete_ignoring_missing(&slices, s.metadata.name.as_deref().unwrap_or("")).await?;
        }
        return Ok(Action::requeue(RESYNC));
    }
    // Read our slices from the API (not a cache): a cache may not show
    // slices we created a moment ago, and we must never create twice.
    let existing = slices
        .list(&ListParams::default().labels(&managed_selector(&name)))
        .await?
        .items;
    // The pods as the API server has them now (see the module docs).
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&endpointslice::selector_string(&svc)))
        .await?
        .items;
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let plan = endpointslice::plan(&svc, &pod_refs, &existing, ctx.max);
    if !plan.is_empty() {
        tracing::debug!(service = %format!("{ns}/{name}"), create = plan.create.len(),
            update = plan.update.len(), delete = plan.delete.len(), "syncing endpoint slices");
    }
    // When the change was seen, for the nodes' network programming latency
    // (kube-proxy's kubeproxy_network_programming_duration_seconds).
    let trigger = jiff::Timestamp::now().to_string();
    let stamp = |s: &EndpointSlice| {
        let mut s = s.clone();
        s.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                endpointslice::TRIGGER_TIME_ANNOTATION.into(),
                trigger.clone(),
            );
        s
    };
    for s in plan.create.iter().map(stamp) {
        slices.create(&PostParams::default(), &s).await?;
        metrics::counter!("endpoint_slice_controller_changes_total", "operation" => "create")
            .increment(1);
    }
    for s in plan.update.iter().map(stamp) {
        slices
            .replace(
                s.metadata.name.as_deref().unwrap_or(""),
                &PostParams::default(),
                &s,
            )
            .await?;
        metrics::counter!("endpoint_slice_controller_changes_total", "operation" => "update")
            .increment(1);
    }
    for n in &plan.delete {
        delete_ignoring_missing(&slices, n).await?;
        metrics::counter!("endpoint_slice_controller_changes_total", "operation" => "delete")
            .increment(1);
    }
    // The legacy Endpoints mirror.
    let eps: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let want = endpointslice::endpoints(&svc, &pod_refs);
    match eps.get_opt(&name).await? {
        None => {
            eps.create(&PostParams::default(), &want).await?;
        }
        Some(cur) if cur.subsets != want.subsets || cur.metadata.labels != want.metadata.labels => {
            let mut next = want;
            next.metadata.resource_version = cur.metadata.resource_version;
            eps.replace(&name, &PostParams::default(), &next).await?;
        }
        Some(_) => {}
    }
    Ok(Action::requeue(RESYNC))
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn error_policy(_svc: Arc<Service>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "endpoint slice sync failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

/// What the Service watch tells [`cleanup_deleted`].
enum Cleanup {
    /// This Service was deleted.
    Deleted { ns: String, name: String },
    /// The watch (re)listed: Services may have gone while we were not
    /// watching.
    Relisted,
}

/// Removes what deleted Services leave behind (there is no garbage
/// collector): slices and mirrored Endpoints, on delete events and, after
/// each (re)list, for Services deleted while we were not watching. Fed by
/// the controller's own Service watch (one watch of every Service, not
/// two: each costs the API server a line and this process a decode per
/// Service written), one event at a time.
async fn cleanup_deleted(
    client: kube::Client,
    managed: Store<EndpointSlice>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Cleanup>,
) {
    let services: Api<Service> = Api::all(client.clone());
    while let Some(ev) = events.recv().await {
        match ev {
            Cleanup::Deleted { ns, name } => {
                if let Err(e) = delete_leftovers(&client, &managed, &ns, &name).await {
                    tracing::warn!(error = %e, service = %format!("{ns}/{name}"), "cleanup failed");
                }
            }
            Cleanup::Relisted => {
                if let Err(e) = sweep(&client, &managed, &services).await {
                    tracing::warn!(error = %e, "orphan sweep failed");
                }
            }
        }
    }
}

/// Whether the cache of our slices has one of Service `ns/name`.
fn has_managed(managed: &Store<EndpointSlice>, ns: &str, name: &str) -> bool {
    managed.state().iter().any(|s| {
        s.metadata.namespace.as_deref() == Some(ns)
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| n == name)
    })
}

async fn delete_leftovers(
    client: &kube::Client,
    managed: &Store<EndpointSlice>,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    // A LIST walks every slice: only when the cache shows some of ours.
    if has_managed(managed, ns, name) {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        for s in slices
            .list(&ListParams::default().labels(&managed_selector(name)))
            .await?
        {
            delete_ignoring_missing(&slices, s.metadata.name.as_deref().unwrap_or("")).await?;
        }
    }
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), ns);
    if let Some(e) = eps.get_opt(name).await? {
        let ours = e
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get("endpointslice.kubernetes.io/skip-mirror").is_some());
        if ours {
            delete_ignoring_missing(&eps, name).await?;
        }
    }
    Ok(())
}

async fn sweep(
    client: &kube::Client,
    managed: &Store<EndpointSlice>,
    services: &Api<Service>,
) -> Result<(), kube::Error> {
    let live: std::collections::HashSet<(String, String)> = services
        .list(&ListParams::default())
        .await?
        .into_iter()
        .map(|s| {
            (
                s.metadata.namespace.unwrap_or_default(),
                s.metadata.name.unwrap_or_default(),
            )
        })
        .collect();
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    for s in slices
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await?
    {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let svc = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default();
        if !live.contains(&(ns.clone(), svc.clone())) {
            delete_leftovers(client, managed, &ns, &svc).await?;
        }
    }
    Ok(())
}

/// Pods remembered with the Services that selected them (see
/// [`run_controllers`]).
const SELECTED_BY_BOUND: usize = 100_000;

/// Every Service is reconciled at least this often, even without events
/// (a safety net, like the resync of Kubernetes' controllers).
const RESYNC: Duration = Duration::from_secs(300);

/// Aborts a spawned task when dropped, so helpers die with the controller
/// future that started them (leadership lost → nothing keeps acting).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run the controllers (without leader election) until the future is
/// dropped; every task it spawns stops with it.
pub async fn run_controllers(client: kube::Client, max_endpoints_per_slice: usize) {
    let pods: Api<Pod> = Api::all(client.clone());
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    // One watch of every Service feeds the cache (`svc_store`, which the
    // pod mapping reads), the cleanup of deleted Services, and the
    // controller.
    let (svc_store, svc_writer) = reflector::store();
    let (cleanup_tx, cleanup_rx) = tokio::sync::mpsc::unbounded_channel();
    let service_events = watcher(services, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .reflect(svc_writer)
        .inspect_ok(move |ev| {
            let msg = match ev {
                watcher::Event::Delete(svc) => Cleanup::Deleted {
                    ns: svc.metadata.namespace.clone().unwrap_or_default(),
                    name: svc.metadata.name.clone().unwrap_or_default(),
                },
                watcher::Event::InitDone => Cleanup::Relisted,
                _ => return,
            };
            let _ = cleanup_tx.send(msg);
        });
    // Pod uid → the Services that selected it at its last event.
    let selected_by: std::sync::Mutex<HashMap<String, Vec<ObjectRef<Service>>>> =
        Default::default();
    let managed_config =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (managed, writer) = reflector::store();
    let _managed = AbortOnDrop(tokio::spawn(
        reflector::reflector(writer, watcher(slices.clone(), managed_config.clone()))
            .backoff(WatchBackoff::default())
            .for_each(|_| futures::future::ready(())),
    ));
    // Decisions that skip the API rely on the cache: have it first.
    let _ = managed.wait_until_ready().await;
    let _cleanup = AbortOnDrop(tokio::spawn(cleanup_deleted(
        client.clone(),
        managed.clone(),
        cleanup_rx,
    )));
    // A Service without a selector is its users' to give slices: the
    // controller has nothing to do for it unless slices of ours are left
    // from when it had one (the cache shows them; one arriving later
    // reconciles its owner through `owns`). Filtered here, such Services
    // (most of a large cluster's, often) cost no reconcile and no resync
    // timer.
    let has_ours = managed.clone();
    let triggers = service_events.applied_objects().try_filter(move |svc| {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        futures::future::ready(endpointslice::has_selector(svc) || has_managed(&has_ours, ns, name))
    });
    let controller = Controller::for_stream(triggers, svc_store.clone())
        .trigger_backoff(WatchBackoff::default());
    let ctx = Arc::new(Ctx {
        client,
        max: max_endpoints_per_slice,
        managed,
    });
    controller
        .owns(slices, managed_config)
        .watches(pods, watcher::Config::default(), move |pod: Pod| {
            let now: Vec<ObjectRef<Service>> = svc_store
                .state()
                .into_iter()
                .filter(|s| endpointslice::selects(s, &pod))
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect();
            // Services that selected the pod before (its labels changed, or
            // a Service's selector did) must drop it: reconcile them too.
            // Deleted pods cannot be told apart here, so their entries stay
            // until the map is reset at a size bound; the periodic resync
            // covers what a reset forgets.
            let key = pod.metadata.uid.clone().unwrap_or_default();
            let mut last = selected_by.lock().unwrap_or_else(|e| e.into_inner());
            if last.len() >= SELECTED_BY_BOUND {
                last.clear();
            }
            let mut out = if now.is_empty() {
                last.remove(&key).unwrap_or_default()
            } else {
                last.insert(key, now.clone()).unwrap_or_default()
            };
            for r in now {
                if !out.contains(&r) {
                    out.push(r);
                }
            }
            out
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// How every watch here backs off after an error: exponential from 100 ms
/// to at most 5 s, with jitter, reset by the next event. kube-rs's default
/// grows to 30 s, so after an API server outage of a minute a node or a
/// controller could wait another 30 s before it noticed the server was
/// back (tests/apiserver_down.rs caught the node doing so); the jitter
/// keeps many nodes from reconnecting in step.
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        use rand::Rng;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // 50-100 % of the step.
        Some(base.mul_f64(rand::rng().random_range(0.5..=1.0)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A reflector of every `K` (a cache to read with `state()`), whose every
/// event wakes `wake`: the shape of the periodic controllers (scheduler,
/// node lifecycle, disruption budgets) that look at whole sets at once.
pub fn reflect<K>(api: Api<K>, wake: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .backoff(WatchBackoff::default())
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::debug!(error = %e, "watch");
            }
            wake.notify_one();
        }
    });
    reader
}

/// Run the controllers under leader election. Never returns.
pub async fn run(client: kube::Client, cfg: Config) {
    let max = cfg.max_endpoints_per_slice;
    let ipam = cfg.ipam;
    let lifecycle = cfg.lifecycle;
    let signer = cfg.signer;
    let c = client.clone();
    leader::run(client, cfg.leader, move || {
        let c = c.clone();
        let signer = signer.clone();
        async move {
            let _csr = signer.map(|s| AbortOnDrop(tokio::spawn(csr::run(c.clone(), s))));
            let _ipam = ipam.map(|i| AbortOnDrop(tokio::spawn(nodeipam::run(c.clone(), i))));
            let _rs = AbortOnDrop(tokio::spawn(replicaset::run(c.clone())));
            let _deploy = AbortOnDrop(tokio::spawn(deployment::run(c.clone())));
            let _gc = AbortOnDrop(tokio::spawn(gc::run(c.clone())));
            let _nodes = AbortOnDrop(tokio::spawn(nodelifecycle::run(c.clone(), lifecycle)));
            let _pdb = AbortOnDrop(tokio::spawn(disruption::run(c.clone())));
            let _sa = AbortOnDrop(tokio::spawn(serviceaccount::run(c.clone())));
            run_controllers(c, max).await
        }
    })
    .await
}
