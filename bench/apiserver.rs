//! API server throughput, measured against etcd itself.
//!
//! ```sh
//! cargo bench --bench apiserver
//! ```
//!
//! Cargo builds the `fairlead` binary with the bench (= release) profile
//! and passes its path here (`FAIRLEAD_BIN` overrides it); etcd is
//! `/usr/bin/etcd` (Debian's `etcd-server`; `FAIRLEAD_TEST_ETCD` overrides
//! it). Everything runs on loopback, every store has its data directory
//! under `$TMPDIR` and fsyncs every acknowledged write (etcd's default, the
//! embedded SQLite store with `synchronous=FULL`). Client, server and etcd
//! share the machine's cores, so read the numbers as relative.
//!
//! In one run:
//!
//! 1. **etcd baseline.** A fresh etcd; `WRITERS` concurrent etcd-client tasks
//!    (one gRPC connection) put `OPS` distinct keys with 1 KiB values →
//!    puts/s. Then `WATCHERS` etcd watches on a prefix while `WRITERS` tasks
//!    put `EVENTS` keys under it → events delivered per second, summed over
//!    all watchers, from the first put until every watcher has seen every
//!    event.
//! 2. **fairlead, embedded store.** `fairlead apiserver --data-dir <tmp>
//!    --secure-port 0`; a kube-rs client built from the kubeconfig it writes
//!    creates, merge-patches, then deletes `OPS` Services (~1 KiB each, one
//!    ClusterIP allocated per create) with `WRITERS` concurrent tasks → ops/s
//!    per verb, as a ratio of etcd's put rate. Then the watch fan-out of (1):
//!    `WATCHERS` streaming `GET ...services?watch=1&resourceVersion=N` in one
//!    namespace while `EVENTS` Services are created there.
//! 3. **fairlead on etcd.** The same against `--etcd-servers` pointing at
//!    another fresh etcd.
//!
//! Every phase stops after `PHASE_LIMIT` even if unfinished (rates then
//! cover what completed), so a run takes about two minutes at most. Sizes
//! come from the environment: `FAIRLEAD_BENCH_WRITERS` (16),
//! `FAIRLEAD_BENCH_OPS` (5000), `FAIRLEAD_BENCH_WATCHERS` (100),
//! `FAIRLEAD_BENCH_EVENTS` (1000). Child processes are killed when this
//! process ends, panics included (drop guards, plus `PR_SET_PDEATHSIG` for
//! the case it is killed).

mod common;

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client as EtcdClient, WatchOptions};
use futures::AsyncBufReadExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::task::JoinSet;

use common::{fairlead_bin, free_port};

/// A phase that has not finished after this long is cut short.
const PHASE_LIMIT: Duration = Duration::from_secs(20);
/// How long etcd or the API server may take to come up.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Bytes of an etcd value, and roughly of a stored Service.
const VALUE_SIZE: usize = 1024;
/// Namespace of the Services created, patched and deleted.
const CRUD_NAMESPACE: &str = "default";
/// Namespace the fan-out watchers watch.
const WATCH_NAMESPACE: &str = "bench-watch";

#[tokio::main]
async fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let fairlead = fairlead_bin()?;
    let etcd = etcd_bin()?;
    println!(
        "fairlead apiserver benchmark: {} writers, {} ops per verb, {} watchers x {} events, \
         {} cores, phases cut at {:?}",
        s.writers,
        s.ops,
        s.watchers,
        s.events,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        PHASE_LIMIT,
    );
    let started = Instant::now();
    let mut table = Table::default();

    // 1. etcd on its own.
    let (etcd_put, etcd_fan_out) = {
        let etcd = Etcd::start(&etcd).await?;
        let client = etcd.client().await?;
        let put = etcd_puts(&client, &s).await;
        put.report("etcd put");
        let fan_out = etcd_fan_out(&client, &s).await?;
        fan_out.report("etcd watch fan-out");
        (put, fan_out)
    };
    table.row(
        format!("etcd put, 1 KiB ({} writers)", s.writers),
        None,
        Some(etcd_put.rate()),
        "puts/s",
    );

    // 2. and 3. fairlead on each store.
    for backend in [Backend::Embedded, Backend::Etcd] {
        let _etcd;
        let mut args = Vec::new();
        if backend == Backend::Etcd {
            let e = Etcd::start(&etcd).await?;
            args = vec!["--etcd-servers".to_string(), e.endpoint.clone()];
            _etcd = e;
        }
        let server = Fairlead::start(&fairlead, &args).await?;
        let crud = fairlead_crud(&server.client, &s).await?;
        for (verb, outcome) in &crud {
            outcome.report(&format!("{backend} {verb}"));
            table.row(
                format!("{verb} Service, {backend}"),
                Some(outcome.rate()),
                Some(etcd_put.rate()),
                "ops/s vs etcd put",
            );
        }
        let fan_out = fairlead_fan_out(&server.client, &s).await?;
        fan_out.report(&format!("{backend} watch fan-out"));
        table.row(
            format!("watch fan-out {}x{}, {backend}", s.watchers, s.events),
            Some(fan_out.rate()),
            Some(etcd_fan_out.rate()),
            "events/s vs etcd watch",
        );
    }

    println!();
    table.print();
    println!("\ntotal {:.1?}", started.elapsed());
    Ok(())
}

/// Sizes of the run (see the module docs).
struct Settings {
    writers: usize,
    ops: usize,
    watchers: usize,
    events: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        fn var(name: &str, default: usize) -> Result<usize> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{name}={v:?}: expected a positive integer")),
                Err(_) => Ok(default),
            }
        }
        Ok(Settings {
            writers: var("FAIRLEAD_BENCH_WRITERS", 16)?,
            ops: var("FAIRLEAD_BENCH_OPS", 5000)?,
            watchers: var("FAIRLEAD_BENCH_WATCHERS", 100)?,
            events: var("FAIRLEAD_BENCH_EVENTS", 1000)?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Etcd,
}

impl Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Etcd => "etcd backend",
        })
    }
}

// ---------------------------------------------------------------------------
// Workloads

/// Put `OPS` distinct 1 KiB keys into etcd.
async fn etcd_puts(client: &EtcdClient, s: &Settings) -> Outcome {
    let kv = client.kv_client();
    let value = vec![b'x'; VALUE_SIZE];
    drive(s.ops, s.writers, move |i| {
        let (mut kv, value) = (kv.clone(), value.clone());
        async move {
            kv.put(format!("/bench/put/{i:06}"), value, None).await?;
            Ok(())
        }
    })
    .await
}

/// `WATCHERS` etcd watches on one prefix, `EVENTS` puts under it.
async fn etcd_fan_out(client: &EtcdClient, s: &Settings) -> Result<FanOut> {
    let prefix = "/bench/watch/";
    let mut watch_client = client.watch_client();
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut watchers = JoinSet::new();
    for _ in 0..s.watchers {
        let mut stream = watch_client
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await?;
        // Wait for etcd to confirm the watch, so no put can precede it.
        match stream.message().await? {
            Some(resp) if resp.created() => {}
            _ => bail!("etcd did not create the watch"),
        }
        let (delivered, events) = (delivered.clone(), s.events);
        watchers.spawn(async move {
            let mut seen = 0;
            while seen < events {
                let Some(resp) = stream.message().await? else {
                    bail!("etcd ended the watch after {seen} events");
                };
                let n = resp.events().len();
                seen += n;
                delivered.fetch_add(n, Ordering::Relaxed);
            }
            Ok(Instant::now())
        });
    }
    let kv = client.kv_client();
    let value = vec![b'x'; VALUE_SIZE];
    let writes = drive(s.events, s.writers, move |i| {
        let (mut kv, value) = (kv.clone(), value.clone());
        async move {
            kv.put(format!("{prefix}{i:06}"), value, None).await?;
            Ok(())
        }
    });
    Ok(fan_out(watchers, delivered, s, writes).await)
}

/// A Service of about [`VALUE_SIZE`] bytes once stored.
fn service(name: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": name, "bench": "fairlead"},
            "annotations": {"bench/padding": "p".repeat(VALUE_SIZE / 2)},
        },
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))?)
}

/// Create, merge-patch, then delete `OPS` Services.
async fn fairlead_crud(
    client: &kube::Client,
    s: &Settings,
) -> Result<Vec<(&'static str, Outcome)>> {
    let api: Api<Service> = Api::namespaced(client.clone(), CRUD_NAMESPACE);
    let stored = api
        .create(&PostParams::default(), &service("size-probe")?)
        .await?;
    println!(
        "stored Service: {} bytes of JSON",
        serde_json::to_vec(&stored)?.len()
    );
    api.delete("size-probe", &DeleteParams::default()).await?;

    let name = |i: usize| format!("svc-{i:06}");
    let a = api.clone();
    let create = drive(s.ops, s.writers, move |i| {
        let a = a.clone();
        async move {
            a.create(&PostParams::default(), &service(&name(i))?)
                .await?;
            Ok(())
        }
    })
    .await;
    // Only what was attempted exists (a phase may be cut short).
    let a = api.clone();
    let update = drive(create.attempted, s.writers, move |i| {
        let a = a.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"bench/updated": i.to_string()}}});
            a.patch(&name(i), &PatchParams::default(), &Patch::Merge(patch))
                .await?;
            Ok(())
        }
    })
    .await;
    let a = api.clone();
    let delete = drive(create.attempted, s.writers, move |i| {
        let a = a.clone();
        async move {
            a.delete(&name(i), &DeleteParams::default()).await?;
            Ok(())
        }
    })
    .await;
    Ok(vec![
        ("create", create),
        ("update", update),
        ("delete", delete),
    ])
}

/// `WATCHERS` raw watch streams on one namespace's Services, `EVENTS`
/// Services created in it. Lines are counted, not decoded, so the client
/// costs little next to the server.
async fn fairlead_fan_out(client: &kube::Client, s: &Settings) -> Result<FanOut> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": WATCH_NAMESPACE}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let api: Api<Service> = Api::namespaced(client.clone(), WATCH_NAMESPACE);
    let rv = api
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .context("list without a resourceVersion")?;

    let delivered = Arc::new(AtomicUsize::new(0));
    let mut watchers = JoinSet::new();
    for _ in 0..s.watchers {
        let request = hyper::Request::get(format!(
            "/api/v1/namespaces/{WATCH_NAMESPACE}/services?watch=1&resourceVersion={rv}"
        ))
        .body(Vec::new())?;
        // Returns once the response headers arrived: the watch is open, and
        // it starts at `rv` anyway.
        let mut stream = Box::pin(client.request_stream(request).await?);
        let (delivered, events) = (delivered.clone(), s.events);
        watchers.spawn(async move {
            let mut line = Vec::new();
            let mut seen = 0;
            while seen < events {
                line.clear();
                if stream.read_until(b'\n', &mut line).await? == 0 {
                    bail!("the API server ended the watch after {seen} events");
                }
                if !line.starts_with(br#"{"type":"ADDED""#) {
                    let text = String::from_utf8_lossy(&line[..line.len().min(300)]);
                    bail!("unexpected watch event: {text}");
                }
                seen += 1;
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Instant::now())
        });
    }
    let writes = drive(s.events, s.writers, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &service(&format!("w-{i:06}"))?)
                .await?;
            Ok(())
        }
    });
    Ok(fan_out(watchers, delivered, s, writes).await)
}

// ---------------------------------------------------------------------------
// Measuring

/// What a phase of `count` operations achieved.
struct Outcome {
    attempted: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {} ok in {:.2?} = {:.0}/s{}",
            self.ok,
            self.elapsed,
            self.rate(),
            self.problems()
        );
    }

    fn problems(&self) -> String {
        let mut out = String::new();
        if self.errors > 0 {
            out += &format!(
                "; {} FAILED, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        out
    }
}

/// Run `op(0..count)` on `writers` concurrent tasks, stopping early at
/// [`PHASE_LIMIT`].
async fn drive<F, Fut>(count: usize, writers: usize, op: F) -> Outcome
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    #[derive(Default)]
    struct Shared {
        next: AtomicUsize,
        ok: AtomicUsize,
        errors: AtomicUsize,
        first_error: Mutex<Option<String>>,
    }
    let shared = Arc::new(Shared::default());
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + PHASE_LIMIT;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let (shared, op) = (shared.clone(), op.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                match op(i).await {
                    Ok(()) => {
                        shared.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        shared
                            .first_error
                            .lock()
                            .unwrap()
                            .get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        });
    }
    // An operation that hangs past the limit is abandoned (and not counted).
    let grace = tokio::time::Instant::from_std(deadline + Duration::from_secs(5));
    while let Ok(Some(_)) = tokio::time::timeout_at(grace, tasks.join_next()).await {}
    tasks.abort_all();
    let elapsed = start.elapsed();
    let first_error = shared.first_error.lock().unwrap().take();
    Outcome {
        attempted: shared.next.load(Ordering::Relaxed).min(count),
        ok: shared.ok.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error,
        elapsed,
    }
}

/// A watch fan-out measurement.
struct FanOut {
    /// Events received, summed over watchers.
    delivered: usize,
    expected: usize,
    /// First write until the last watcher saw its last event.
    elapsed: Duration,
    /// Last acknowledged write until the last watcher saw its last event.
    lag: Duration,
    writes: Outcome,
    watcher_errors: Vec<String>,
}

impl FanOut {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {}/{} events in {:.2?} = {:.0}/s; writes {:.0}/s; \
             last event {:.0?} after the last write{}",
            self.delivered,
            self.expected,
            self.elapsed,
            self.rate(),
            self.writes.rate(),
            self.lag,
            self.writes.problems(),
        );
        for e in self.watcher_errors.iter().take(3) {
            println!("  watcher FAILED: {e}");
        }
    }
}

/// With `watchers` already open (each returns when it has seen all its
/// events), run `writes` and wait for every watcher, up to [`PHASE_LIMIT`].
async fn fan_out(
    mut watchers: JoinSet<Result<Instant>>,
    delivered: Arc<AtomicUsize>,
    s: &Settings,
    writes: impl Future<Output = Outcome>,
) -> FanOut {
    let start = Instant::now();
    let writes = writes.await;
    let writes_done = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + PHASE_LIMIT);
    let mut last = start;
    let mut watcher_errors = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, watchers.join_next()).await {
            Ok(Some(Ok(Ok(done)))) => last = last.max(done),
            Ok(Some(Ok(Err(e)))) => watcher_errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => watcher_errors.push(e.to_string()),
            Ok(None) => break,
            Err(_) => {
                watcher_errors.push(format!(
                    "{} watchers still incomplete after {PHASE_LIMIT:?}",
                    watchers.len()
                ));
                last = Instant::now();
                break;
            }
        }
    }
    watchers.abort_all();
    FanOut {
        delivered: delivered.load(Ordering::Relaxed),
        expected: s.watchers * s.events,
        elapsed: last - start,
        lag: last.saturating_duration_since(writes_done),
        writes,
        watcher_errors,
    }
}

/// The summary table.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn row(&mut self, metric: String, fairlead: Option<f64>, peer: Option<f64>, unit: &str) {
        let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ratio = match (fairlead, peer) {
            (Some(f), Some(p)) if p > 0.0 => format!("{:.2}x", f / p),
            _ => "-".to_string(),
        };
        self.rows
            .push([metric, num(fairlead), num(peer), ratio, unit.to_string()]);
    }

    fn print(&self) {
        let header = ["metric", "fairlead", "peer", "ratio", "unit"].map(String::from);
        let all: Vec<&[String; 5]> = std::iter::once(&header).chain(&self.rows).collect();
        let width = |c: usize| all.iter().map(|r| r[c].len()).max().unwrap_or(0);
        let w = [width(0), width(1), width(2), width(3)];
        for r in all {
            println!(
                "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A child process ([`common::Proc`]: killed and reaped on drop, killed by
/// the kernel if this process dies first) and its directory (data and log),
/// which goes with it.
struct Proc {
    proc: common::Proc,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Run `cmd` with output to `log` in `dir`.
    fn spawn(cmd: Command, dir: tempfile::TempDir) -> Result<Proc> {
        let log = dir.path().join("log");
        let name = cmd.get_program().to_string_lossy().into_owned();
        Ok(Proc {
            proc: common::Proc::spawn(name, cmd, log)?,
            _dir: dir,
        })
    }

    /// Fails if the process has exited, quoting the end of its log.
    fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }
}

/// A single-member etcd on free loopback ports with a fresh data directory.
struct Etcd {
    endpoint: String,
    proc: Proc,
}

impl Etcd {
    async fn start(bin: &Path) -> Result<Etcd> {
        let mut last_error = None;
        // Another process may grab a port between our probe and etcd's bind.
        for _ in 0..5 {
            let (client, peer) = (free_port()?, free_port()?);
            if client == peer {
                continue;
            }
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let dir = tempfile::Builder::new()
                .prefix("fairlead-bench-etcd-")
                .tempdir()?;
            let mut cmd = Command::new(bin);
            cmd.arg("--name=bench")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=bench={peer}"))
                .arg("--initial-cluster-state=new")
                .arg("--logger=zap")
                .arg("--log-level=warn")
                .arg("--log-outputs=stderr");
            let mut etcd = Etcd {
                endpoint,
                proc: Proc::spawn(cmd, dir)?,
            };
            match etcd.wait_ready().await {
                Ok(()) => return Ok(etcd),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no free ports"))).context("starting etcd")
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            self.proc.check_running().context("etcd")?;
            let attempt = async {
                let mut c = EtcdClient::connect([&self.endpoint], None).await?;
                c.get("/health-probe", None).await?;
                Ok::<_, etcd_client::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                _ if Instant::now() > deadline => bail!("etcd not ready after {START_LIMIT:?}"),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client(&self) -> Result<EtcdClient> {
        Ok(EtcdClient::connect([&self.endpoint], None).await?)
    }
}

/// `fairlead apiserver` with a fresh data directory, and a client for it.
struct Fairlead {
    client: kube::Client,
    _proc: Proc,
}

impl Fairlead {
    async fn start(bin: &Path, extra: &[String]) -> Result<Fairlead> {
        let dir = tempfile::Builder::new()
            .prefix("fairlead-bench-")
            .tempdir()?;
        let mut cmd = Command::new(bin);
        cmd.arg("apiserver")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--secure-port", "0"])
            .args(extra)
            .env("RUST_LOG", "warn");
        let kubeconfig = dir.path().join("kubeconfig");
        let mut proc = Proc::spawn(cmd, dir)?;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            proc.check_running().context("fairlead apiserver")?;
            if let Some(client) = ready_client(&kubeconfig).await {
                return Ok(Fairlead {
                    client,
                    _proc: proc,
                });
            }
            if Instant::now() > deadline {
                bail!("fairlead apiserver not ready after {START_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A client from the kubeconfig, once the file exists and `/readyz` answers.
async fn ready_client(kubeconfig: &Path) -> Option<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).ok()?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .ok()?;
    let client = kube::Client::try_from(config).ok()?;
    let probe = hyper::Request::get("/readyz").body(Vec::new()).ok()?;
    tokio::time::timeout(Duration::from_secs(2), client.request_text(probe))
        .await
        .ok()?
        .ok()?;
    Some(client)
}

fn etcd_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("FAIRLEAD_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    if !bin.is_file() {
        bail!(
            "etcd not found at {}: install etcd-server (or set FAIRLEAD_TEST_ETCD)",
            bin.display()
        );
    }
    Ok(bin)
}
