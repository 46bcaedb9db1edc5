//! Workloads end to end, as a user drives them: the scheduler placing a
//! thousand pending pods, and a Deployment scaled from 1 to 100 Ready
//! replicas on one node. Each part runs its own `fairlead up` (the
//! `fairlead` binary Cargo builds with the bench, or `FAIRLEAD_BIN`) in a
//! network namespace of the bench's own, driven through the REST API with
//! kube-rs clients.
//!
//! ```sh
//! cargo bench --bench workloads
//! ```
//!
//! Needs root (network namespaces, veths, cgroups).
//!
//! 1. **Scheduler throughput** (`FAIRLEAD_BENCH_SCHED_PODS`, 1000 pods, on
//!    `FAIRLEAD_BENCH_SCHED_NODES`, 10 nodes). The nodes are honest
//!    stand-ins with no kubelet behind them, registered through the API:
//!    each Node `bench-node-i` is created, its `/status` patched Ready with
//!    32 CPUs, 128Gi and 110 pods allocatable, and its Lease in
//!    `kube-node-lease` created and renewed every 5 s by the bench, so the
//!    node lifecycle controller keeps them Ready. `fairlead up` runs with
//!    `--register-node false --run-pods false`: there is no local Node, so
//!    every pod goes to a stand-in and no process is started. Then:
//!    - **created while scheduling**: the pods (`fairlead echo`, requests
//!      10m CPU and 16Mi, no nodeName) are created, 16 requests in flight →
//!      the time from the first create until a watch shows every one bound
//!      (`spec.nodeName`), pods bound/s, create → bound p50/p99, and the
//!      spread (fewest and most pods per node);
//!    - **a backlog**: as many pods created while every stand-in is
//!      cordoned (the scheduler reports each Unschedulable), then the nodes
//!      uncordoned (one patch each, all at once) → the time until all are
//!      bound: the scheduler without the create path in the way. Its
//!      spread shows how many nodes the scheduler's first pass saw
//!      uncordoned.
//!
//!    Both are compared with kube-scheduler's published figures (below).
//!    The pods are deleted with `gracePeriodSeconds=0` (no kubelet will
//!    ever confirm their end).
//! 2. **Scale to 100** (`FAIRLEAD_BENCH_SCALE`, 100), in a fresh `fairlead
//!    up` whose node runs the pods: Deployment `web` (1 replica of
//!    `fairlead echo --http-port 8080`, readinessProbe `httpGet /` on 8080
//!    every second) available, then `spec.replicas` set to 100 through the
//!    `scale` subresource (as `kubectl scale`) → the time until its status
//!    shows 100 ready replicas (polled every 20 ms), with when a watch
//!    last saw a new pod created, bound, running and Ready. **The peer**:
//!    the same 100 processes started by hand at once (`fairlead echo
//!    --http-port <port> --bind 127.0.0.1` in the bench's namespace) until
//!    every port accepts, and the ratio. Then the Deployment is deleted and
//!    its pods awaited gone.
//!
//! **Published figures** for kube-scheduler (no run of it here):
//! - scheduler_perf, the Kubernetes repository's scheduler benchmark (fake
//!   nodes registered through an API server, no kubelet, as here):
//!   `SchedulingBasic/5000Nodes_10000Pods` must average at least 680
//!   pods/s in CI, a floor set from the lowest average of its last 250 CI
//!   runs ([`KUBE_SCHEDULER_PERF`]);
//! - a 5,000-node GCE cluster in 2019: 100 pods/s on average, the rate the
//!   scalability test itself was limited to ([`KUBE_SCHEDULER_CLUSTER`]).
//!
//! **Network safety.** Everything runs in the bench's namespaces
//! (`nsenter --net`, which keeps the host's cgroups visible to the agent);
//! the bench's own sockets and processes are opened by a thread that
//! entered them. At the end `fairlead node --cleanup` removes every pod,
//! and the namespace is deleted. `FAIRLEAD_BENCH_LOG_DIR`, if set, keeps a
//! copy of each `fairlead up` log there.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{Netns, Proc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;

const POLL: Duration = Duration::from_millis(5);
/// The bound of every wait.
const LIMIT: Duration = Duration::from_secs(120);
/// Requests in flight while creating or deleting pods.
const IN_FLIGHT: usize = 16;
/// How often the bench renews the stand-in nodes' Leases.
const RENEW: Duration = Duration::from_secs(5);
/// How long the stand-ins must stay Ready and untainted before pods come:
/// more than one node-monitor period (5 s) of the lifecycle controller.
const SETTLE: Duration = Duration::from_secs(6);
/// Pods a stand-in node takes (its `pods` allocatable).
const MAX_PODS: usize = 110;
/// The by-hand peer's first port.
const PEER_PORT: u16 = 21000;

/// kube-scheduler in scheduler_perf: (pods/s, what, where).
const KUBE_SCHEDULER_PERF: (f64, &str, &str) = (
    680.0,
    "scheduler_perf SchedulingBasic/5000Nodes_10000Pods, CI floor (lowest average of 250 runs)",
    "https://github.com/kubernetes/kubernetes/blob/008b3652959ca58af8be3fb5b6ecfe9ae7638282/test/integration/scheduler_perf/misc/performance-config.yaml \
     (method: https://github.com/kubernetes/kubernetes/pull/136276)",
);
/// kube-scheduler in a real cluster: (pods/s, what, where).
const KUBE_SCHEDULER_CLUSTER: (f64, &str, &str) = (
    100.0,
    "5,000-node GCE cluster, 2019, average (the test was rate-limited at 100 pods/s)",
    "https://github.com/kubernetes/kubernetes/pull/74041",
);

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let pods = common::env_u64("FAIRLEAD_BENCH_SCHED_PODS", 1000)? as usize;
    let nodes = common::env_u64("FAIRLEAD_BENCH_SCHED_NODES", 10)? as usize;
    let scale = common::env_u64("FAIRLEAD_BENCH_SCALE", 100)? as usize;
    if nodes == 0 || pods > nodes * MAX_PODS {
        bail!("{pods} pods do not fit on {nodes} nodes of {MAX_PODS} pods each");
    }
    let bin = common::fairlead_bin()?;
    let sched = with_up(
        &bin,
        "scheduler",
        &[
            "--hostname-override",
            "bench-local",
            "--register-node",
            "false",
            "--run-pods",
            "false",
        ],
        |up, data| runtime()?.block_on(scheduler(up, data, pods, nodes)),
    );
    let scaled = with_up(
        &bin,
        "scale",
        &["--hostname-override", "bench-local"],
        |up, data| runtime()?.block_on(scale_up(up, data, &bin, scale)),
    );
    sched.and(scaled)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `fairlead up` with `extra` flags in a namespace of its own and a fresh
/// data directory; `f` runs on a thread inside that namespace. Then the
/// node's leftovers are cleaned up and the namespace deleted.
fn with_up<T: Send>(
    bin: &Path,
    label: &str,
    extra: &[&str],
    f: impl FnOnce(&mut Proc, &Path) -> Result<T> + Send,
) -> Result<T> {
    let ns = Netns::new()?;
    let data = tempfile::tempdir()?;
    let port = common::free_port()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(bin)
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--secure-port", &port.to_string()])
        .args(extra);
    common::die_with_parent(&mut cmd);
    let log = data.path().join("up.log");
    let mut up = Proc::spawn(format!("fairlead up ({label})"), cmd, log.clone())?;
    let result = ns.run(|| f(&mut up, data.path()));
    let cleanup = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(bin)
        .args(["node", "--cleanup", "--data-dir"])
        .arg(data.path())
        .output();
    if let Err(e) = &result {
        eprintln!("{}", up.log_tail(40));
        eprintln!("workloads bench ({label}) failed: {e:#}");
    }
    drop(up);
    if let Ok(o) = cleanup {
        if !o.status.success() {
            eprintln!("cleanup: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    log_summary(&log, label);
    result
}

/// One line on the warnings and errors in a `fairlead up` log (and a copy
/// of it in `FAIRLEAD_BENCH_LOG_DIR`).
fn log_summary(log: &Path, label: &str) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        for level in ["WARN", "ERROR"] {
            if let Some(at) = line.find(&format!(" {level} ")) {
                // The level, the target and the message, without fields.
                let rest = &line[at + 1..];
                let msg = rest.split("  ").next().unwrap_or(rest);
                let key: String = msg.chars().take(110).collect();
                *kinds.entry(key).or_default() += 1;
            }
        }
    }
    let total: usize = kinds.values().sum();
    println!("fairlead up ({label}) log: {total} WARN/ERROR lines");
    for (k, n) in kinds.iter().take(8) {
        println!("  {n:5} × {k}");
    }
    if let Some(dir) = std::env::var_os("FAIRLEAD_BENCH_LOG_DIR") {
        let to = Path::new(&dir).join(format!("workloads-{label}-up.log"));
        if let Err(e) = std::fs::copy(log, &to) {
            eprintln!("copying {} to {}: {e}", log.display(), to.display());
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------
// Pods as a watch sees them

/// When the watch first showed a pod, bound, Unschedulable, with its
/// containers running, Ready, gone.
#[derive(Clone, Debug, Default)]
struct Seen {
    first: Option<Instant>,
    bound: Option<Instant>,
    node: Option<String>,
    unschedulable: Option<Instant>,
    running: Option<Instant>,
    ready: Option<Instant>,
    gone: Option<Instant>,
}

/// A watch on the pods with a label, recording [`Seen`] per name.
struct Tracker {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    _task: AbortOnDrop<()>,
}

fn is_unschedulable(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

fn is_running(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            !c.is_empty()
                && c.iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

impl Tracker {
    /// Starts watching; returns once the watch has listed what exists.
    async fn start(api: Api<Pod>, labels: &str) -> Result<Tracker> {
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stream =
            watcher::watcher(api, watcher::Config::default().labels(labels)).default_backoff();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                match ev {
                    Ok(Event::Apply(p) | Event::InitApply(p)) => {
                        let mut m = s.lock().expect("tracker lock");
                        let e = m.entry(p.name_any()).or_default();
                        e.first.get_or_insert(now);
                        if e.bound.is_none() {
                            if let Some(n) = node_of(&p) {
                                e.bound = Some(now);
                                e.node = Some(n);
                            }
                        }
                        if is_unschedulable(&p) {
                            e.unschedulable.get_or_insert(now);
                        }
                        if is_running(&p) {
                            e.running.get_or_insert(now);
                        }
                        if common::pod_ready(&p) {
                            e.ready.get_or_insert(now);
                        }
                    }
                    Ok(Event::Delete(p)) => {
                        let mut m = s.lock().expect("tracker lock");
                        m.entry(p.name_any()).or_default().gone.get_or_insert(now);
                    }
                    Ok(Event::InitDone) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Init) => {}
                    Err(e) => eprintln!("pod watch: {e}"),
                }
            }
        });
        tokio::time::timeout(LIMIT, rx)
            .await
            .context("the pod watch did not start")?
            .context("the pod watch stopped")?;
        Ok(Tracker {
            seen,
            _task: AbortOnDrop(task),
        })
    }

    /// The records of the pods named `prefix…`.
    fn of(&self, prefix: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("tracker lock")
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn count(&self, prefix: &str, f: impl Fn(&Seen) -> bool) -> usize {
        self.of(prefix).iter().filter(|s| f(s)).count()
    }

    /// Until `f` holds for `n` pods named `prefix…` (within [`LIMIT`]);
    /// the time it took from `t0`.
    async fn wait(
        &self,
        what: &str,
        prefix: &str,
        n: usize,
        t0: Instant,
        f: impl Fn(&Seen) -> bool,
    ) -> Result<Duration> {
        let end = Instant::now() + LIMIT;
        loop {
            let have = self.count(prefix, &f);
            if have >= n {
                return Ok(t0.elapsed());
            }
            if Instant::now() > end {
                bail!("only {have} of {n} pods {what} within {LIMIT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// 1. The scheduler

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A stand-in node's status: Ready, 32 CPUs, 128Gi, 110 pods.
fn stand_in_status(name: &str, i: usize) -> serde_json::Value {
    let now = now_rfc3339();
    let resources = json!({"cpu": "32", "memory": "128Gi", "pods": MAX_PODS.to_string()});
    let cond = |ty: &str, status: &str, reason: &str| {
        json!({"type": ty, "status": status, "reason": reason,
            "message": "bench stand-in node (no kubelet)",
            "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        // 198.18.0.0/15: the benchmarking range (RFC 2544); never routed.
        "addresses": [
            {"type": "InternalIP", "address": format!("198.18.{}.{}", i / 250, i % 250 + 1)},
            {"type": "Hostname", "address": name},
        ],
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            cond("Ready", "True", "KubeletReady"),
        ],
    })
}

/// Register the stand-ins: Node, Ready status, Lease.
async fn register_stand_ins(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    names: &[String],
) -> Result<()> {
    let pp = PostParams::default();
    for (i, name) in names.iter().enumerate() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            }},
        }))?;
        let node = nodes.create(&pp, &node).await.context("creating a Node")?;
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": stand_in_status(name, i)})),
            )
            .await
            .context("patching a Node's status")?;
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name,
                "uid": node.metadata.uid.unwrap_or_default(),
            }]},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                "renewTime": MicroTime(jiff::Timestamp::now())},
        }))?;
        leases
            .create(&pp, &lease)
            .await
            .context("creating a Lease")?;
    }
    Ok(())
}

/// Renew the stand-ins' Leases every [`RENEW`], as their kubelets would.
async fn renew_leases(leases: Api<Lease>, names: Vec<String>) {
    let mut tick = tokio::time::interval(RENEW);
    tick.tick().await;
    loop {
        tick.tick().await;
        for name in &names {
            let patch = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
            if let Err(e) = leases
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                eprintln!("renewing the Lease of {name}: {e}");
            }
        }
    }
}

fn node_usable(n: &Node) -> bool {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let spec = n.spec.as_ref();
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| !t.is_empty());
    let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
    ready && !tainted && !cordoned
}

/// Until every node in `names` is Ready, untainted and schedulable, and
/// stays so for [`SETTLE`].
async fn wait_nodes_usable(nodes: &Api<Node>, names: &[String]) -> Result<()> {
    let end = Instant::now() + LIMIT;
    let mut since: Option<Instant> = None;
    loop {
        let list = nodes.list(&ListParams::default()).await?;
        let usable = names.iter().all(|n| {
            list.items
                .iter()
                .any(|x| x.metadata.name.as_ref() == Some(n) && node_usable(x))
        });
        if usable {
            if since.get_or_insert_with(Instant::now).elapsed() >= SETTLE {
                return Ok(());
            }
        } else {
            since = None;
        }
        if Instant::now() > end {
            bail!("the stand-in nodes were not Ready and untainted within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `spec.unschedulable` of every node in `names` (cordon / uncordon).
async fn cordon(nodes: &Api<Node>, names: &[String], on: bool) -> Result<()> {
    let patch = Patch::Merge(json!({"spec": {"unschedulable": on}}));
    let pp = PatchParams::default();
    futures::future::try_join_all(names.iter().map(|n| nodes.patch(n, &pp, &patch))).await?;
    Ok(())
}

fn sched_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench": "sched"}},
        "spec": {"containers": [{
            "name": "echo", "image": "fairlead", "command": ["fairlead", "echo"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        }]},
    }))
    .expect("a valid pod")
}

/// Create `prefix-0..n`, [`IN_FLIGHT`] at a time; when each create
/// returned.
async fn create_pods(pods: &Api<Pod>, prefix: &str, n: usize) -> Result<HashMap<String, Instant>> {
    futures::stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            let name = format!("{prefix}{i}");
            async move {
                pods.create(&PostParams::default(), &sched_pod(&name))
                    .await
                    .with_context(|| format!("creating pod {name}"))?;
                Ok::<_, anyhow::Error>((name, Instant::now()))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await
}

/// Delete `prefix-0..n` with gracePeriodSeconds=0, [`IN_FLIGHT`] at a time.
async fn delete_pods(pods: &Api<Pod>, prefix: &str, n: usize) -> Result<()> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    futures::stream::iter(0..n)
        .map(|i| {
            let (pods, dp) = (pods.clone(), dp.clone());
            async move {
                match pods.delete(&format!("{prefix}{i}"), &dp).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => Err(anyhow::Error::from(e).context("deleting a pod")),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Why a pod named `prefix…` that is not bound is waiting (for errors).
async fn why_waiting(pods: &Api<Pod>, tracker: &Tracker, prefix: &str) -> String {
    let name = {
        let m = tracker.seen.lock().expect("tracker lock");
        m.iter()
            .find(|(k, v)| k.starts_with(prefix) && v.bound.is_none())
            .map(|(k, _)| k.clone())
    };
    let Some(name) = name else {
        return String::new();
    };
    match pods.get(&name).await {
        Ok(p) => {
            let conds = p
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .map(|c| format!("{}={} {}", c.type_, c.status, c.message.unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; ");
            format!(" (e.g. {name}: {conds})")
        }
        Err(e) => format!(" (e.g. {name}: {e})"),
    }
}

/// Pods per node of the pods named `prefix…`: (fewest, most, on nodes
/// other than `names`).
fn spread(tracker: &Tracker, prefix: &str, names: &[String]) -> (usize, usize, usize) {
    let mut per: BTreeMap<&str, usize> = names.iter().map(|n| (n.as_str(), 0)).collect();
    let mut elsewhere = 0;
    for s in tracker.of(prefix) {
        match s.node.as_deref().and_then(|n| per.get_mut(n)) {
            Some(c) => *c += 1,
            None if s.node.is_some() => elsewhere += 1,
            None => {}
        }
    }
    let min = per.values().copied().min().unwrap_or(0);
    let max = per.values().copied().max().unwrap_or(0);
    (min, max, elsewhere)
}

async fn scheduler(up: &mut Proc, data: &Path, n: usize, k: usize) -> Result<()> {
    let c = common::api_client(&data.join("kubeconfig"), up, LIMIT).await?;
    let nodes: Api<Node> = Api::all(c.clone());
    let leases: Api<Lease> = Api::namespaced(c.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::default_namespaced(c.clone());
    let names: Vec<String> = (0..k).map(|i| format!("bench-node-{i}")).collect();
    register_stand_ins(&nodes, &leases, &names).await?;
    let _renew = AbortOnDrop(tokio::spawn(renew_leases(leases.clone(), names.clone())));
    wait_nodes_usable(&nodes, &names).await?;
    let others: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|x| x.name_any())
        .filter(|x| !names.contains(x))
        .collect();
    if !others.is_empty() {
        bail!("nodes other than the stand-ins exist: {others:?}");
    }
    let tracker = Tracker::start(pods.clone(), "bench=sched").await?;

    // Created while the scheduler works.
    let t0 = Instant::now();
    let created = create_pods(&pods, "s-", n).await?;
    let all_created = t0.elapsed();
    let bound = tracker
        .wait("bound", "s-", n, t0, |s| s.bound.is_some())
        .await;
    let all_bound = match bound {
        Ok(d) => d,
        Err(e) => bail!("{e}{}", why_waiting(&pods, &tracker, "s-").await),
    };
    let mut lat: Vec<f64> = {
        let m = tracker.seen.lock().expect("tracker lock");
        created
            .iter()
            .filter_map(|(name, at)| {
                let b = m.get(name)?.bound?;
                Some(ms(b.saturating_duration_since(*at)))
            })
            .collect()
    };
    let (min1, max1, elsewhere1) = spread(&tracker, "s-", &names);
    let td = Instant::now();
    delete_pods(&pods, "s-", n).await?;
    tracker
        .wait("gone", "s-", n, td, |s| s.gone.is_some())
        .await?;
    let deleted = td.elapsed();

    // A backlog: pending while every node is cordoned, then uncordoned.
    cordon(&nodes, &names, true).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tq = Instant::now();
    create_pods(&pods, "q-", n).await?;
    let reported = tracker
        .wait("reported Unschedulable", "q-", n, tq, |s| {
            s.unschedulable.is_some()
        })
        .await?;
    let early = tracker.count("q-", |s| s.bound.is_some());
    if early > 0 {
        bail!("{early} pods were bound to cordoned nodes");
    }
    let t1 = Instant::now();
    cordon(&nodes, &names, false).await?;
    let drained = match tracker
        .wait("bound", "q-", n, t1, |s| s.bound.is_some())
        .await
    {
        Ok(d) => d,
        Err(e) => bail!("{e}{}", why_waiting(&pods, &tracker, "q-").await),
    };
    let (min2, max2, elsewhere2) = spread(&tracker, "q-", &names);
    delete_pods(&pods, "q-", n).await?;
    tracker
        .wait("gone", "q-", n, Instant::now(), |s| s.gone.is_some())
        .await?;

    let rate1 = n as f64 / all_bound.as_secs_f64();
    let rate2 = n as f64 / drained.as_secs_f64();
    let (l50, l99) = (common::pct(&mut lat, 0.5), common::pct(&mut lat, 0.99));
    println!(
        "scheduler: {n} pods on {k} stand-in nodes (registered through the API, Ready, \
         Leases renewed by the bench every {}s; no kubelet, no process started):",
        RENEW.as_secs()
    );
    println!(
        "  created {IN_FLIGHT} in flight: all created after {:.2} s ({:.0} creates/s), \
         all bound after {:.2} s → {rate1:.0} pods/s",
        all_created.as_secs_f64(),
        n as f64 / all_created.as_secs_f64(),
        all_bound.as_secs_f64(),
    );
    println!("    create → bound (seen by a watch): p50 {l50:7.1} ms   p99 {l99:7.1} ms");
    println!(
        "    spread: {min1}..{max1} pods per node (fewest..most), {elsewhere1} elsewhere; \
         deleted (grace 0) in {:.2} s",
        deleted.as_secs_f64()
    );
    println!(
        "  backlog: {n} pods created with every node cordoned, all reported Unschedulable \
         after {:.2} s; nodes uncordoned → all bound after {:.2} s → {rate2:.0} pods/s",
        reported.as_secs_f64(),
        drained.as_secs_f64(),
    );
    println!("    spread: {min2}..{max2} pods per node (fewest..most), {elsewhere2} elsewhere");
    for (pps, what, url) in [KUBE_SCHEDULER_PERF, KUBE_SCHEDULER_CLUSTER] {
        println!("  kube-scheduler, published: {pps:.0} pods/s, {what}");
        println!("    {url}");
        println!(
            "    ratio fairlead / kube-scheduler: created while scheduling {:.2}×, backlog {:.2}×",
            rate1 / pps,
            rate2 / pps
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Scale to 100 on one node

fn web_deployment() -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [{
                    "name": "web", "image": "fairlead",
                    "command": ["fairlead", "echo", "--http-port", "8080"],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                }]},
            },
        },
    }))
    .expect("a valid deployment")
}

async fn wait_node_ready(nodes: &Api<Node>, name: &str) -> Result<()> {
    let end = Instant::now() + LIMIT;
    loop {
        if let Ok(Some(n)) = nodes.get_opt(name).await {
            if node_usable(&n) {
                return Ok(());
            }
        }
        if Instant::now() > end {
            bail!("node {name} was not Ready within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until the Deployment's status shows `ready` ready and available replicas.
async fn wait_deployment(deps: &Api<Deployment>, name: &str, ready: i32) -> Result<()> {
    let end = Instant::now() + LIMIT;
    loop {
        let d = deps.get(name).await?;
        let st = d.status.unwrap_or_default();
        if st.ready_replicas.unwrap_or(0) >= ready && st.available_replicas.unwrap_or(0) >= ready {
            return Ok(());
        }
        if Instant::now() > end {
            bail!(
                "deployment {name}: {} of {ready} replicas ready within {LIMIT:?}",
                st.ready_replicas.unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start `n` `fairlead echo` processes by hand at once on distinct
/// loopback ports of this thread's namespace; the time until every port
/// accepts.
async fn by_hand(bin: &Path, n: usize) -> Result<Duration> {
    let ports: Vec<u16> = (0..n).map(|i| PEER_PORT + i as u16).collect();
    let t0 = Instant::now();
    let mut kids = Vec::with_capacity(n);
    for p in &ports {
        let mut cmd = Command::new(bin);
        cmd.args(["echo", "--http-port", &p.to_string(), "--bind", "127.0.0.1"])
            .args(["--name", &format!("hand-{p}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        common::die_with_parent(&mut cmd);
        kids.push(common::KillOnDrop(
            cmd.spawn().context("starting fairlead echo")?,
        ));
    }
    let end = t0 + LIMIT;
    let mut pending = ports;
    loop {
        let mut still = Vec::new();
        for p in pending {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, p))
                .await
                .is_err()
            {
                still.push(p);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > end {
            bail!(
                "{} of {n} echo processes not accepting within {LIMIT:?}",
                pending.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let took = t0.elapsed();
    drop(kids);
    Ok(took)
}

async fn scale_up(up: &mut Proc, data: &Path, bin: &Path, n: usize) -> Result<()> {
    let c = common::api_client(&data.join("kubeconfig"), up, LIMIT).await?;
    let nodes: Api<Node> = Api::all(c.clone());
    let deps: Api<Deployment> = Api::default_namespaced(c.clone());
    let pods: Api<Pod> = Api::default_namespaced(c.clone());
    wait_node_ready(&nodes, "bench-local").await?;
    let tracker = Tracker::start(pods.clone(), "app=web").await?;
    let ta = Instant::now();
    deps.create(&PostParams::default(), &web_deployment())
        .await?;
    wait_deployment(&deps, "web", 1).await?;
    let first = ta.elapsed();

    let t0 = Instant::now();
    deps.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": n}})),
    )
    .await?;
    let end = t0 + LIMIT;
    loop {
        let st = deps.get("web").await?.status.unwrap_or_default();
        if st.ready_replicas.unwrap_or(0) as usize >= n {
            break;
        }
        if Instant::now() > end {
            let seen = tracker.of("web-");
            bail!(
                "deployment web: {} of {n} replicas ready within {LIMIT:?} \
                 ({} pods seen, {} bound, {} Ready)",
                st.ready_replicas.unwrap_or(0),
                seen.len(),
                seen.iter().filter(|s| s.bound.is_some()).count(),
                seen.iter().filter(|s| s.ready.is_some()).count(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    // When the last of the new pods was seen created, bound and Ready.
    let new: Vec<Seen> = tracker
        .of("web-")
        .into_iter()
        .filter(|s| s.first.is_some_and(|f| f >= t0))
        .collect();
    let last = |f: fn(&Seen) -> Option<Instant>| {
        new.iter()
            .filter_map(f)
            .max()
            .map_or(f64::NAN, |t| t.saturating_duration_since(t0).as_secs_f64())
    };
    let (created, bound) = (last(|s| s.first), last(|s| s.bound));
    let (running, ready) = (last(|s| s.running), last(|s| s.ready));

    let td = Instant::now();
    deps.delete("web", &DeleteParams::background()).await?;
    let end = td + LIMIT;
    loop {
        let left = pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .len();
        if left == 0 {
            break;
        }
        if Instant::now() > end {
            bail!("{left} pods of deployment web still there {LIMIT:?} after its deletion");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = td.elapsed();

    let peer = by_hand(bin, n).await?;
    println!(
        "scale: Deployment web (fairlead echo, readinessProbe httpGet every 1 s) on one node, \
         1 replica available after {:.2} s, then scaled to {n} (scale subresource):",
        first.as_secs_f64()
    );
    println!(
        "  {n} ready replicas after {:.2} s (the last pod seen created after {created:.2} s, \
         bound {bound:.2} s, running {running:.2} s, Ready {ready:.2} s)",
        took.as_secs_f64()
    );
    println!(
        "  peer, by hand: {n} fairlead echo processes started at once until every port accepts: \
         {:.2} s",
        peer.as_secs_f64()
    );
    println!(
        "  ratio fairlead / by hand: {:.1}×",
        took.as_secs_f64() / peer.as_secs_f64()
    );
    println!(
        "  deleted (propagation Background): all {n} pods gone after {:.2} s",
        gone.as_secs_f64()
    );
    Ok(())
}
