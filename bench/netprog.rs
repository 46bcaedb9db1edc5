//! Network programming at scale, end to end: how fast an API write reaches
//! the data plane, measured as a user would, through the `fairlead` binary
//! (the one Cargo builds with the bench; `FAIRLEAD_BIN` overrides it) and
//! the REST API (kube-rs clients from the kubeconfig the API server
//! writes). Nothing of the library is called.
//!
//! ```sh
//! cargo bench --bench netprog
//! ```
//!
//! Needs root (network namespaces, nf_tables, addresses on `lo`).
//!
//! **Network safety.** Every run gets a fresh network namespace
//! (`common::Netns`, deleted with everything in it when the run ends); every
//! `fairlead` process is started in it (`ip netns exec`) and every socket of
//! the bench's clients is opened by a tokio runtime whose threads entered it
//! (`common::enter`). From the root namespace nothing is sent anywhere. In
//! each namespace: `lo` up, the node address 10.0.0.1 and the pod IPs
//! 10.244.0.11-13 of the three live backends on `lo` (this kernel may lack
//! the dummy driver), and `ip route add 10.96.0.0/12 dev lo src 10.0.0.1`:
//! a connection to a ClusterIP leaves through `lo` from the node address,
//! the nftables output hook DNATs it to a pod IP (local, so the backend
//! answers; DNAT to 127.x would need route_localnet); without a rule the
//! SYN is dropped (a timeout, not a refusal). In userspace mode the node
//! puts the ClusterIPs on `lo` (or its dummy `fairlead0`) itself, and the
//! more specific local /32 wins over the route.
//!
//! **Objects.** N selectorless Services `bench/s-NNNNN` (one port, 80/TCP →
//! targetPort 8080, ClusterIP allocated by the server) and N EndpointSlices
//! `bench/s-NNNNN-1` (label `kubernetes.io/service-name`, `addressType:
//! IPv4`, port 8080, 10 ready endpoints on fake addresses from 10.64.0.0/12).
//! The three live backends are `fairlead echo --name bN --bind 10.244.0.1N
//! --http-port 8080`, answering `GET /` with their name.
//!
//! **Per size** (`FAIRLEAD_BENCH_SIZES`, default 1000,10000,30000), each run
//! in its own namespace and data directory:
//!
//! 1. *Bulk load, API server alone* (part `load`, once per size): `fairlead
//!    apiserver`; `FAIRLEAD_BENCH_WRITERS` (16) concurrent writers create
//!    Service i then slice i until all N pairs are written → objects/s and
//!    per-request latency p50/p99; meanwhile one reader GETs the `default`
//!    Namespace every 100 ms (the API as another client sees it).
//! 2. *Bulk load, `fairlead up --proxy-mode M`* (part `load`, per mode):
//!    the same load with the node daemon (and controllers) in the same
//!    process → objects/s, its ratio to (1) in the same run (target ≥ 0.8),
//!    write and read p99 during the load (target < 100 ms), and whether the
//!    node then catches up (its `fairlead_proxy_service_ports` gauge, polled
//!    once a second for up to a minute). For both (1) and (2) the run also
//!    prints the rate over each tenth of the objects written (how it falls
//!    as the cluster grows) and what the API server served meanwhile by
//!    verb and resource, with its total server time (from its own
//!    `apiserver_request_total` and `apiserver_request_duration_seconds`,
//!    so a controller's or node's requests show up next to the load's).
//!    A load that has not finished after
//!    `FAIRLEAD_BENCH_LOAD_SECS` (default 30 s + 4 ms per Service) is cut
//!    off and reported as TIMED OUT with what it wrote.
//! 3. *`fairlead apiserver` + `fairlead node --proxy-mode M`* as two
//!    processes (part `node`, per mode), so the node's CPU and RSS are its
//!    own (`/proc/<pid>`). The bulk load is setup here, then a `sentinel`
//!    Service with the three live backends; the node is started after the
//!    load and is synced when a connection to the sentinel's ClusterIP is
//!    answered (the node watches slices in order and applies the whole
//!    state each sync, so every bulk object is in). Then
//!    `FAIRLEAD_BENCH_TRIALS` (50) trials, each with a new Service `trial/t-i`:
//!    * *DNS*: from sending the Service POST until a UDP query for
//!      `t-i.trial.svc.cluster.local` A to the node's `--dns-bind-address`
//!      answers NOERROR (one query at a time, 1 ms apart); the address
//!      must be the ClusterIP the POST returned.
//!    * *Service programmed* (informative): from the same POST until a
//!      connection to ClusterIP:80 is refused (the node rejects a Service
//!      without endpoints; before it knows the Service the SYN is dropped).
//!      Then a pause of `--min-sync-period` + 50 ms, so the next write is
//!      not held back by the node's rate limit on our own previous write.
//!    * *EndpointSlice write → traffic*: from sending the POST of a slice
//!      with the three live backends until a connection to ClusterIP:80 gets
//!      an HTTP answer from one of them. Probes are new connections
//!      (`Connection: close`), one started every 1 ms, overlapping (each
//!      gives up after 200 ms, so a dropped SYN does not stall the polling);
//!      the time is when the first answer arrived. Then probes until all
//!      three backends have answered (not timed), and the pause again.
//!    * *Endpoint removal → no new connection reaches it*: the slice is
//!      replaced (PUT) without backend `b(i mod 3 + 1)`; probes every 1 ms
//!      from just before the PUT. The result is the start time of the last
//!      probe that reached the removed backend (0 if none did), once the PUT
//!      was acknowledged and, for 300 ms after that probe, at least 100
//!      probes were answered and none by the removed backend. The load
//!      balancers pick among 3 endpoints, so the true moment is a little
//!      after the last hit (on average about two probe intervals); probes
//!      that fail (refused, reset, timeout) while two backends remain are
//!      counted and printed as data-plane errors.
//!
//!    The node's Prometheus histograms `kubeproxy_sync_partial_proxy_rules_
//!    duration_seconds` (one nftables transaction, kernel acknowledged) and
//!    `kubeproxy_sync_proxy_rules_duration_seconds` (a whole sync: DNS index,
//!    state, proxy) and `fairlead_dns_index_build_duration_seconds` are read
//!    before and after the trials; p50/p99 come from the bucket deltas and
//!    print as "≤ bound" of whatever buckets the node exposes (so the
//!    transaction target can only be judged as finely as the buckets
//!    allow). The deltas of the node's full/partial sync, sync failure,
//!    repair and bind error counters are printed too. Target for the
//!    transaction: p99 < 20 ms at 30,000.
//!
//!    *Node CPU per 1,000 endpoint changes*: the sentinel's slice is emptied
//!    (and the node has applied it: refused); an idle window as long as the
//!    change window measures the node's idle CPU; then
//!    `FAIRLEAD_BENCH_CHANGES` (1,000) PUTs of bulk slices, each replacing
//!    one endpoint of a different Service, paced at
//!    `FAIRLEAD_BENCH_CHANGE_RATE` (200/s, so the node is not measured only
//!    at saturation); then the sentinel's slice gets b1 back and the window
//!    ends when a connection to it is answered (all earlier changes are
//!    applied then; probing a refused ClusterIP costs the node nothing).
//!    CPU = utime+stime of the node from `/proc/<pid>/stat` over the window
//!    minus the idle rate × its length, per 1,000 changes. Target: at
//!    30,000 ≤ 2× the figure at 1,000 (ratio printed when both ran).
//!
//!    *Node RSS*: VmRSS/VmHWM from `/proc/<pid>/status` once synced and after
//!    the trials (DNS on). Target: ≤ 150 MiB at 30,000 in nftables mode.
//!
//! Percentiles are nearest-rank over the trials: with 50 trials the p99 is
//! the maximum. Each run prints how busy the whole machine was meanwhile
//! (`/proc/stat`) and the load average: on a shared machine other work
//! inflates every latency here.
//!
//! Every wait has a deadline; a run that fails or times out is reported as
//! such with the end of its processes' logs, and the bench goes on with the
//! next run. All runs of a size stop at `FAIRLEAD_BENCH_SIZE_SECS`
//! (default 900 s + 60 ms per Service).
//!
//! The node flags: `--hostname-override node-a`, free loopback ports for
//! `--metrics-bind-address`, `--healthz-bind-address`,
//! `--dns-bind-address`, and `--dns-upstream` pointing at an unused
//! loopback port (nothing is forwarded anywhere). `--min-sync-period` is
//! the daemon's default (0: no fixed spacing; the node paces itself by the
//! time its syncs take) unless `FAIRLEAD_BENCH_MIN_SYNC_MS` sets it.
//!
//! Environment: `FAIRLEAD_BENCH_SIZES` (1000,10000,30000),
//! `FAIRLEAD_BENCH_MODES` (nftables,userspace), `FAIRLEAD_BENCH_PARTS`
//! (load,node), `FAIRLEAD_BENCH_TRIALS` (50), `FAIRLEAD_BENCH_WRITERS`
//! (16), `FAIRLEAD_BENCH_LOAD_ROUNDS` (1: how many times the bulk loads,
//! alone then up, run in turn; with more, the ratio's verdict is the
//! median of the rounds' ratios, each from one alone run and the up run
//! right after it, since the machine's speed drifts between runs),
//! `FAIRLEAD_BENCH_CHANGES` (1000), `FAIRLEAD_BENCH_CHANGE_RATE`
//! (200 per second), `FAIRLEAD_BENCH_MIN_SYNC_MS`, `FAIRLEAD_BENCH_LOAD_SECS`,
//! `FAIRLEAD_BENCH_SIZE_SECS`, `FAIRLEAD_BENCH_LOG` (`RUST_LOG` of the
//! fairlead processes, `warn`), `FAIRLEAD_BENCH_VERBOSE=1` (print every
//! trial), `FAIRLEAD_BIN`. Child processes die with
//! the bench (drop guards, `PR_SET_PDEATHSIG`, and the namespace's
//! deletion). Client, API server, node and backends share the machine's
//! cores: read the numbers with the load average printed at the end.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;

use common::{
    env_u64, fairlead_bin, free_port, loadavg, machine_ticks, mib, pid_vm_kib, probe, stat_cpu,
    Netns, Outcome, Proc,
};

/// The first line of a failure, at most 100 characters (for a table cell;
/// the whole message and logs print where the run failed).
fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or_default();
    match line.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// Endpoints per bulk EndpointSlice.
const ENDPOINTS: usize = 10;
/// Namespace of the bulk objects, and of the trials' and the sentinel's.
const BULK_NS: &str = "bench";
const TRIAL_NS: &str = "trial";
const SENTINEL: &str = "sentinel";
/// The live backends: name and pod IP (on the namespace's `lo`).
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("b1", Ipv4Addr::new(10, 244, 0, 11)),
    ("b2", Ipv4Addr::new(10, 244, 0, 12)),
    ("b3", Ipv4Addr::new(10, 244, 0, 13)),
];
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// The node's own address; Service traffic leaves from it.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The API server's default Service range, routed via `lo`.
const SERVICE_CIDR: &str = "10.96.0.0/12";
const NODE_NAME: &str = "node-a";
/// fairlead's default `--min-sync-period`.
const DEFAULT_MIN_SYNC: Duration = Duration::ZERO;

/// One probe (connection) started this often.
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// Most probes in flight at once.
const MAX_INFLIGHT: usize = 256;
/// How long one measured change may take before the trial fails.
const TRIAL_LIMIT: Duration = Duration::from_secs(10);
/// Removal: quiet time after the last hit, and answers required in it.
const REMOVAL_WINDOW: Duration = Duration::from_millis(300);
const REMOVAL_MIN_ANSWERS: usize = 100;
/// Longest wait for one API response.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to come up.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long `up`'s node may take to catch up after the bulk load.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// How long the node may take to apply the last CPU-window change.
const CPU_SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Most endpoint-change requests in flight at once.
const CHANGE_INFLIGHT: usize = 32;

/// The issue's targets.
const TARGET_SERVICES: usize = 30_000;
const TARGET_PROPAGATION_MS: f64 = 25.0;
const TARGET_TRANSACTION_MS: f64 = 20.0;
const TARGET_LOAD_RATIO: f64 = 0.8;
const TARGET_API_P99_MS: f64 = 100.0;
const TARGET_CPU_RATIO: f64 = 2.0;
const TARGET_RSS_MIB: f64 = 150.0;
/// kube-proxy's reference (kubernetes/kubernetes PR 126013).
const KUBE_PROXY_SERVICES: usize = 10_000;
const KUBE_PROXY_MS: f64 = 141.0;

fn main() -> Result<()> {
    let s = Arc::new(Settings::from_env()?);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fairlead network programming benchmark: {cores} cores, load average at start {}; \
         sizes {} Services x {ENDPOINTS} endpoints; modes {}; parts {}{}; {} trials; \
         {} changes at {}/s; {} writers; node --min-sync-period {:?}",
        loadavg(),
        s.sizes
            .iter()
            .map(|n| thousands(*n))
            .collect::<Vec<_>>()
            .join(" / "),
        s.modes
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(","),
        if s.load { "load" } else { "" },
        if s.node { " node" } else { "" },
        s.trials,
        s.changes,
        s.change_rate,
        s.writers,
        s.min_sync,
    );
    let started = Instant::now();
    let mut all = Vec::new();
    for &n in &s.sizes {
        all.push(run_size(&s, n));
    }
    println!();
    print_summary(&s, &all);
    println!(
        "\ntotal {:.0?}, load average at end {}",
        started.elapsed(),
        loadavg()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Nftables,
    Userspace,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nftables => "nftables",
            Mode::Userspace => "userspace",
        })
    }
}

struct Settings {
    bin: PathBuf,
    sizes: Vec<usize>,
    modes: Vec<Mode>,
    load: bool,
    node: bool,
    trials: usize,
    writers: usize,
    /// Bulk-load rounds (alone, then up per mode).
    load_rounds: usize,
    changes: usize,
    change_rate: f64,
    /// The node's `--min-sync-period` (only passed when set).
    min_sync_flag: Option<String>,
    min_sync: Duration,
    load_secs: Option<u64>,
    size_secs: Option<u64>,
    log: String,
    /// Print every trial.
    verbose: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let list = |name: &str, default: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        };
        let sizes = list("FAIRLEAD_BENCH_SIZES", "1000,10000,30000")
            .iter()
            .map(|n| n.replace('_', "").parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .context("FAIRLEAD_BENCH_SIZES")?;
        ensure!(
            sizes.iter().all(|n| (1..=100_000).contains(n)),
            "FAIRLEAD_BENCH_SIZES: 1 to 100,000 Services each"
        );
        let modes = list("FAIRLEAD_BENCH_MODES", "nftables,userspace")
            .iter()
            .map(|m| match m.as_str() {
                "nftables" => Ok(Mode::Nftables),
                "userspace" => Ok(Mode::Userspace),
                other => bail!("FAIRLEAD_BENCH_MODES: unknown mode {other:?}"),
            })
            .collect::<Result<Vec<_>>>()?;
        let parts = list("FAIRLEAD_BENCH_PARTS", "load,node");
        for p in &parts {
            ensure!(
                p == "load" || p == "node",
                "FAIRLEAD_BENCH_PARTS: unknown part {p:?} (load, node)"
            );
        }
        let min_sync_ms = std::env::var("FAIRLEAD_BENCH_MIN_SYNC_MS")
            .ok()
            .map(|v| v.parse::<u64>().context("FAIRLEAD_BENCH_MIN_SYNC_MS"))
            .transpose()?;
        let opt = |name: &str| -> Result<Option<u64>> {
            std::env::var(name)
                .ok()
                .map(|v| v.parse::<u64>().with_context(|| name.to_string()))
                .transpose()
        };
        Ok(Settings {
            bin: fairlead_bin()?,
            sizes,
            modes,
            load: parts.iter().any(|p| p == "load"),
            node: parts.iter().any(|p| p == "node"),
            trials: env_u64("FAIRLEAD_BENCH_TRIALS", 50)?.max(1) as usize,
            writers: env_u64("FAIRLEAD_BENCH_WRITERS", 16)?.max(1) as usize,
            load_rounds: env_u64("FAIRLEAD_BENCH_LOAD_ROUNDS", 1)?.max(1) as usize,
            changes: env_u64("FAIRLEAD_BENCH_CHANGES", 1000)?.max(1) as usize,
            change_rate: env_u64("FAIRLEAD_BENCH_CHANGE_RATE", 200)?.max(1) as f64,
            min_sync_flag: min_sync_ms.map(|ms| format!("{ms}ms")),
            min_sync: min_sync_ms.map_or(DEFAULT_MIN_SYNC, Duration::from_millis),
            load_secs: opt("FAIRLEAD_BENCH_LOAD_SECS")?,
            size_secs: opt("FAIRLEAD_BENCH_SIZE_SECS")?,
            log: std::env::var("FAIRLEAD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            verbose: env_u64("FAIRLEAD_BENCH_VERBOSE", 0)? != 0,
        })
    }

    /// How long a bulk load of `n` Services + `n` slices may take.
    fn load_limit(&self, n: usize) -> Duration {
        match self.load_secs {
            Some(s) => Duration::from_secs(s),
            None => Duration::from_secs(30) + Duration::from_millis(4 * n as u64),
        }
    }

    /// How long all runs of size `n` may take together.
    fn size_limit(&self, n: usize) -> Duration {
        match self.size_secs {
            Some(s) => Duration::from_secs(s),
            None => Duration::from_secs(900) + Duration::from_millis(60 * n as u64),
        }
    }

    /// The pause between two measured writes (see the module docs).
    fn gap(&self) -> Duration {
        self.min_sync + Duration::from_millis(50)
    }
}

// ---------------------------------------------------------------------------
// Runs

/// What one size produced; `Err` holds why a run failed.
struct SizeResults {
    services: usize,
    alone: Option<Result<Load, String>>,
    up: BTreeMap<Mode, Result<Load, String>>,
    /// Up / alone per round (the first round's runs are `alone` and `up`).
    ratios: BTreeMap<Mode, Vec<f64>>,
    node: BTreeMap<Mode, Result<NodeRun, String>>,
}

fn run_size(s: &Arc<Settings>, n: usize) -> SizeResults {
    let deadline = Instant::now() + s.size_limit(n);
    let mut r = SizeResults {
        services: n,
        alone: None,
        up: BTreeMap::new(),
        ratios: BTreeMap::new(),
        node: BTreeMap::new(),
    };
    let over = |what: &str| -> Option<String> {
        (Instant::now() > deadline).then(|| {
            let msg = format!(
                "skipped: the time limit for {} Services ({:?}) has passed",
                thousands(n),
                s.size_limit(n)
            );
            println!("{what}: {msg}");
            msg
        })
    };
    for round in 0..if s.load { s.load_rounds } else { 0 } {
        let tag = if s.load_rounds > 1 {
            format!(" (round {} of {})", round + 1, s.load_rounds)
        } else {
            String::new()
        };
        let what = format!("{} Services, API server alone{tag}", thousands(n));
        let alone = match over(&what) {
            Some(e) => Err(e),
            None => report(&what, fresh_run(s, &what, move |env| alone_run(env, n))),
        };
        for &mode in &s.modes {
            let what = format!(
                "{} Services, fairlead up --proxy-mode {mode}{tag}",
                thousands(n)
            );
            let res = match over(&what) {
                Some(e) => Err(e),
                None => report(&what, fresh_run(s, &what, move |env| up_run(env, n, mode))),
            };
            if let (Ok(a), Ok(u)) = (&alone, &res) {
                r.ratios
                    .entry(mode)
                    .or_default()
                    .push(u.rate() / a.rate().max(1e-9));
            }
            if round == 0 {
                r.up.insert(mode, res);
            }
        }
        if round == 0 {
            r.alone = Some(alone);
        }
    }
    for (mode, ratios) in r.ratios.iter().filter(|(_, v)| v.len() > 1) {
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{} Services, up --proxy-mode {mode} / alone over {} rounds: {} (median {:.2})",
            thousands(n),
            ratios.len(),
            ratios
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&sorted)
        );
    }
    if s.node {
        for &mode in &s.modes {
            let what = format!(
                "{} Services, fairlead apiserver + fairlead node --proxy-mode {mode}",
                thousands(n)
            );
            let res = match over(&what) {
                Some(e) => Err(e),
                None => report(
                    &what,
                    fresh_run(s, &what, move |env| node_run(env, n, mode, deadline)),
                ),
            };
            r.node.insert(mode, res);
        }
    }
    r
}

/// Print a failed run's error; keep it as a string.
fn report<T>(what: &str, r: Result<T>) -> Result<T, String> {
    r.map_err(|e| {
        let msg = format!("{e:#}");
        println!("{what}: FAILED: {msg}");
        msg
    })
}

/// What a run's future gets: the settings, its namespace and directory.
struct Env {
    s: Arc<Settings>,
    netns: String,
    dir: PathBuf,
}

impl Env {
    /// `fairlead <args>` in the namespace, logging to `<dir>/<name>.log`.
    fn spawn(&self, name: &str, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.s.bin)
            .args(args)
            .env("RUST_LOG", &self.s.log);
        Proc::spawn(name.into(), cmd, self.dir.join(format!("{name}.log")))
    }
}

/// A fresh namespace (with the addresses and the Service route) and data
/// directory, and `f` on a 2-worker tokio runtime whose threads are all in
/// the namespace. `f`'s own future runs on a thread in the namespace too
/// (`block_on`), which starts the child processes: they die when it ends.
fn fresh_run<T, F, Fut>(s: &Arc<Settings>, what: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Env) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    let ns = Netns::new()?;
    for (_, ip) in BACKENDS {
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    }
    ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    ns.ip(&[
        "route",
        "add",
        SERVICE_CIDR,
        "dev",
        "lo",
        "src",
        &NODE_IP.to_string(),
    ])?;
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-netprog-")
        .tempdir()?;
    println!("\n{what} (netns {}):", ns.name);
    let env = Env {
        s: s.clone(),
        netns: ns.name.clone(),
        dir: dir.path().to_path_buf(),
    };
    let file = Arc::new(File::open(ns.path())?);
    let (ticks0, load0) = (machine_ticks(), loadavg());
    let r = ns.run(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(move || {
                if let Err(e) = common::enter(&file) {
                    // A client thread outside the namespace would address
                    // the machine's network: stop here.
                    eprintln!("bench runtime thread: {e:#}");
                    std::process::abort();
                }
            })
            .enable_all()
            .build()?;
        let r = rt.block_on(f(env));
        rt.shutdown_timeout(Duration::from_secs(5));
        r
    });
    drop(ns);
    let ticks1 = machine_ticks();
    println!(
        "  machine {:.0}% busy over the run (all cores; load average {load0} at its start, {} \
         at its end)",
        ticks1.0.saturating_sub(ticks0.0) as f64 * 100.0
            / ticks1.1.saturating_sub(ticks0.1).max(1) as f64,
        loadavg()
    );
    r
}

/// Loopback ports of a node daemon (distinct, free a moment ago).
struct NodePorts {
    metrics: SocketAddr,
    healthz: SocketAddr,
    dns: SocketAddr,
    /// Nobody listens here: `--dns-upstream`.
    upstream: SocketAddr,
}

impl NodePorts {
    fn pick() -> Result<NodePorts> {
        let mut seen = BTreeSet::new();
        let mut next = || -> Result<SocketAddr> {
            for _ in 0..100 {
                let p = free_port()?;
                if seen.insert(p) {
                    return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p));
                }
            }
            bail!("no free port")
        };
        Ok(NodePorts {
            metrics: next()?,
            healthz: next()?,
            dns: next()?,
            upstream: next()?,
        })
    }

    fn flags(&self, s: &Settings, mode: Mode) -> Vec<String> {
        let mut v: Vec<String> = [
            "--proxy-mode",
            &mode.to_string(),
            "--hostname-override",
            NODE_NAME,
            "--metrics-bind-address",
            &self.metrics.to_string(),
            "--healthz-bind-address",
            &self.healthz.to_string(),
            "--dns-bind-address",
            &self.dns.to_string(),
            "--dns-upstream",
            &self.upstream.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(m) = &s.min_sync_flag {
            v.extend(["--min-sync-period".to_string(), m.clone()]);
        }
        v
    }
}

/// `fairlead apiserver` (or `up` with `node` flags) with a fresh data
/// directory, and a client once it answers `/readyz`.
async fn start_api(
    env: &Env,
    name: &str,
    node: Option<Vec<String>>,
) -> Result<(Proc, kube::Client)> {
    let data = env.dir.join(format!("{name}-data"));
    let port = free_port()?;
    let mut args: Vec<String> = vec![
        if node.is_some() { "up" } else { "apiserver" }.into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--secure-port".into(),
        port.to_string(),
    ];
    args.extend(node.unwrap_or_default());
    let mut proc = env.spawn(name, &args)?;
    let kubeconfig = data.join("kubeconfig");
    let deadline = Instant::now() + START_LIMIT;
    loop {
        proc.check_running()?;
        if let Some(client) = ready_client(&kubeconfig).await {
            return Ok((proc, client));
        }
        if Instant::now() > deadline {
            bail!(
                "{name}: API not ready after {START_LIMIT:?}\n{}",
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client from the kubeconfig, once the file exists and `/readyz` answers.
async fn ready_client(kubeconfig: &Path) -> Option<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).ok()?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .ok()?;
    // Every request of the bench is bounded (kube's default read timeout
    // is 295 s); a stalled server fails the request instead.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(API_TIMEOUT);
    config.write_timeout = Some(API_TIMEOUT);
    let client = kube::Client::try_from(config).ok()?;
    let probe = hyper::Request::get("/readyz").body(Vec::new()).ok()?;
    tokio::time::timeout(Duration::from_secs(2), client.request_text(probe))
        .await
        .ok()?
        .ok()?;
    Some(client)
}

/// Until `GET /healthz` on `addr` is 200 (the node has synced once).
async fn wait_healthz(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        proc.check_running()?;
        let last = match http_get(addr, "/healthz").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code} {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{}: /healthz on {addr} not 200 after {START_LIMIT:?} ({last})\n{}",
                proc.name,
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_namespaces(client: &kube::Client) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    for name in [BULK_NS, TRIAL_NS] {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Objects

fn bulk_name(i: usize) -> String {
    format!("s-{i:05}")
}

/// A selectorless Service, port 80 → 8080, ClusterIP allocated by the server.
fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "ClusterIP",
                 "ports": [{"port": SERVICE_PORT, "targetPort": BACKEND_PORT, "protocol": "TCP"}]},
    }))
    .expect("a valid Service")
}

/// Slice `<service>-1` with ready endpoints on `addrs`, port 8080.
fn slice(service: &str, addrs: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<_> = addrs
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

/// The `n`-th address after `10.<second>.0.0` (+1: never the .0.0).
fn fake_ip(second: u8, n: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24 | u32::from(second) << 16) + n as u32 + 1)
}

/// Bulk Service `i`'s endpoints (10.64.0.0/12).
fn bulk_endpoints(i: usize) -> Vec<Ipv4Addr> {
    (0..ENDPOINTS)
        .map(|j| fake_ip(64, i * ENDPOINTS + j))
        .collect()
}

fn live(except: Option<&str>) -> Vec<Ipv4Addr> {
    BACKENDS
        .iter()
        .filter(|(n, _)| Some(*n) != except)
        .map(|(_, ip)| *ip)
        .collect()
}

fn cluster_ip(svc: &Service) -> Result<Ipv4Addr> {
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .context("created Service without a clusterIP")?;
    ip.parse()
        .with_context(|| format!("clusterIP {ip:?} is not IPv4"))
}

// ---------------------------------------------------------------------------
// Bulk load

/// A bulk load's outcome.
struct Load {
    /// Objects to write (2 per Service).
    wanted: usize,
    ok: usize,
    /// Bulk Services created.
    services_ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    timed_out: bool,
    limit: Duration,
    /// Every write's latency, ms (incomplete ones cut off are not in it).
    write_ms: Vec<f64>,
    /// The reader's GETs, ms.
    read_ms: Vec<f64>,
    /// Objects/s over each tenth of the objects written, in order (how
    /// the rate changes as the cluster grows).
    tenths: Vec<f64>,
    /// `up` only: whether its node caught up afterwards.
    node: Option<String>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn summary(&self) -> String {
        let mut out = format!(
            "{} of {} objects in {:.2?} = {:.0}/s; write p50 {} p99 {} max {} ms; \
             read p99 {} ms ({} reads)",
            self.ok,
            self.wanted,
            self.elapsed,
            self.rate(),
            fmt_ms(pct(&self.write_ms, 0.5)),
            fmt_ms(pct(&self.write_ms, 0.99)),
            fmt_ms(pct(&self.write_ms, 1.0)),
            fmt_ms(pct(&self.read_ms, 0.99)),
            self.read_ms.len(),
        );
        if !self.tenths.is_empty() {
            out += &format!(
                "; objects/s by tenth written: {}",
                self.tenths
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if self.timed_out {
            out += &format!(
                "; TIMED OUT: not finished after {:?} (FAIRLEAD_BENCH_LOAD_SECS)",
                self.limit
            );
        }
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

#[derive(Default)]
struct LoadShared {
    next: AtomicUsize,
    ok: AtomicUsize,
    services_ok: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    write_ms: Mutex<Vec<f64>>,
    /// When each successful write completed.
    done_at: Mutex<Vec<Instant>>,
    read_ms: Mutex<Vec<f64>>,
    stop: AtomicBool,
}

impl LoadShared {
    fn record<T>(&self, started: Instant, r: kube::Result<T>, what: &str) -> bool {
        match r {
            Ok(_) => {
                self.write_ms.lock().unwrap().push(ms(started));
                self.done_at.lock().unwrap().push(Instant::now());
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| format!("{what}: {e}"));
                false
            }
        }
    }
}

/// Services `s-00000..` and their slices in [`BULK_NS`], `writers` at once
/// (each: Service i, then slice i), cut off after `limit`.
async fn bulk_load(client: &kube::Client, n: usize, writers: usize, limit: Duration) -> Load {
    let shared = Arc::new(LoadShared::default());
    let start = Instant::now();
    let deadline = start + limit;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let shared = shared.clone();
        let services: Api<Service> = Api::namespaced(client.clone(), BULK_NS);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), BULK_NS);
        tasks.spawn(async move {
            let pp = PostParams::default();
            while Instant::now() < deadline {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let name = bulk_name(i);
                let t = Instant::now();
                let r = services.create(&pp, &service(&name)).await;
                if shared.record(t, r, &format!("Service {name}")) {
                    shared.services_ok.fetch_add(1, Ordering::Relaxed);
                }
                let t = Instant::now();
                let r = slices.create(&pp, &slice(&name, &bulk_endpoints(i))).await;
                shared.record(t, r, &format!("EndpointSlice {name}-1"));
            }
        });
    }
    // Another client meanwhile: a GET every 100 ms.
    let reader = {
        let shared = shared.clone();
        let api: Api<Namespace> = Api::all(client.clone());
        tokio::spawn(async move {
            while !shared.stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(5), api.get("default")).await;
                // A GET that timed out counts as its 5 s.
                if !matches!(r, Ok(Err(_))) {
                    shared.read_ms.lock().unwrap().push(ms(t));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Writes still running past the limit get a grace period, then are
    // abandoned (and not counted).
    let grace = tokio::time::Instant::from_std(deadline + Duration::from_secs(5));
    while let Ok(Some(_)) = tokio::time::timeout_at(grace, tasks.join_next()).await {}
    tasks.abort_all();
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(6), reader).await;
    let ok = shared.ok.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().unwrap().take();
    let write_ms = std::mem::take(&mut *shared.write_ms.lock().unwrap());
    let read_ms = std::mem::take(&mut *shared.read_ms.lock().unwrap());
    let mut done_at = std::mem::take(&mut *shared.done_at.lock().unwrap());
    done_at.sort();
    let mut tenths = Vec::new();
    if done_at.len() >= 10 {
        let mut prev = start;
        for k in 1..=10 {
            let (from, to) = ((k - 1) * done_at.len() / 10, k * done_at.len() / 10);
            let t = done_at[to - 1];
            tenths.push((to - from) as f64 / (t - prev).as_secs_f64().max(1e-6));
            prev = t;
        }
    }
    Load {
        wanted: 2 * n,
        ok,
        services_ok: shared.services_ok.load(Ordering::Relaxed),
        errors,
        first_error,
        elapsed,
        timed_out: ok + errors < 2 * n,
        limit,
        write_ms,
        read_ms,
        tenths,
        node: None,
    }
}

/// The API server's own `/metrics` (through the client: TLS, credentials).
async fn api_metrics(client: &kube::Client) -> String {
    let Ok(req) = hyper::Request::get("/metrics").body(Vec::new()) else {
        return String::new();
    };
    tokio::time::timeout(Duration::from_secs(20), client.request_text(req))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Print what the API server served between two scrapes of its metrics,
/// by verb and resource, most total time first (where the load went).
fn print_requests(before: &str, after: &str) {
    fn by_kind(text: &str, metric: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let prefix = format!("{metric}{{");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let label = |name: &str| {
                rest.split(&format!("{name}=\"")[..])
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let sub = label("subresource");
            let key = format!(
                "{} {}{}",
                label("verb"),
                label("resource"),
                if sub.is_empty() {
                    String::new()
                } else {
                    format!("/{sub}")
                }
            );
            *out.entry(key).or_insert(0.0) += v;
        }
        out
    }
    let delta = |metric: &str| {
        let b = by_kind(before, metric);
        let mut a = by_kind(after, metric);
        for (k, v) in a.iter_mut() {
            *v -= b.get(k).copied().unwrap_or(0.0);
        }
        a
    };
    let count = delta("apiserver_request_total");
    let secs = delta("apiserver_request_duration_seconds_sum");
    let mut kinds: Vec<(&String, f64)> = secs.iter().map(|(k, v)| (k, *v)).collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = kinds
        .iter()
        .filter(|(_, v)| *v > 0.0)
        .take(6)
        .map(|(k, v)| {
            let c = count.get(*k).copied().unwrap_or(0.0);
            format!("{k} {c:.0} in {v:.1} s")
        })
        .collect();
    if !top.is_empty() {
        println!(
            "  API requests served (server time, by kind): {}",
            top.join(", ")
        );
    }
    // The embedded store's group commits (absent with etcd).
    let sample = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let d = |name: &str| sample(after, name) - sample(before, name);
    let commits = d("fairlead_store_commits_total");
    if commits > 0.0 {
        println!(
            "  store: {commits:.0} commits, {:.1} transactions per commit, {:.2} ms per commit",
            d("fairlead_store_committed_transactions_total") / commits,
            d("fairlead_store_commit_duration_seconds_sum") * 1000.0 / commits
        );
    }
}

/// Where the CPU went over a bulk load: the server process, this bench
/// (the 16 writers), and the whole machine.
struct LoadCpu {
    server: f64,
    client: f64,
    machine: (u64, u64),
}

impl LoadCpu {
    fn start(server_pid: u32) -> LoadCpu {
        LoadCpu {
            server: stat_cpu(&format!("/proc/{server_pid}/stat")).unwrap_or(0.0),
            client: stat_cpu("/proc/self/stat").unwrap_or(0.0),
            machine: machine_ticks(),
        }
    }

    /// One line: CPU ms per object written, and how busy the machine was.
    fn line(&self, server_pid: u32, objects: usize) -> String {
        let end = LoadCpu::start(server_pid);
        let per = |a: f64, b: f64| (b - a) * 1000.0 / objects.max(1) as f64;
        let busy = end.machine.0.saturating_sub(self.machine.0) as f64
            / end.machine.1.saturating_sub(self.machine.1).max(1) as f64;
        format!(
            "CPU per object: server {:.3} ms, bench writers {:.3} ms; machine {:.0}% busy",
            per(self.server, end.server),
            per(self.client, end.client),
            busy * 100.0
        )
    }
}

/// (1): the API server alone.
async fn alone_run(env: Env, n: usize) -> Result<Load> {
    let (mut api, client) = start_api(&env, "apiserver", None).await?;
    create_namespaces(&client).await?;
    let before = api_metrics(&client).await;
    let cpu = LoadCpu::start(api.pid());
    let load = bulk_load(&client, n, env.s.writers, env.s.load_limit(n)).await;
    let cpu = cpu.line(api.pid(), load.ok);
    api.check_running()?;
    println!("  bulk load: {}", load.summary());
    println!("  {cpu}");
    print_requests(&before, &api_metrics(&client).await);
    Ok(load)
}

/// (2): `fairlead up`, its node daemon syncing while the load runs.
async fn up_run(env: Env, n: usize, mode: Mode) -> Result<Load> {
    let ports = NodePorts::pick()?;
    let (mut up, client) = start_api(&env, "up", Some(ports.flags(&env.s, mode))).await?;
    wait_healthz(&mut up, ports.healthz).await?;
    create_namespaces(&client).await?;
    let before = gauge(
        &http_get_ok(ports.metrics, "/metrics").await?,
        "fairlead_proxy_service_ports",
    )
    .unwrap_or(0.0);
    let api_before = api_metrics(&client).await;
    let cpu = LoadCpu::start(up.pid());
    let mut load = bulk_load(&client, n, env.s.writers, env.s.load_limit(n)).await;
    let cpu_line = cpu.line(up.pid(), load.ok);
    up.check_running()?;
    println!("  bulk load: {}", load.summary());
    println!("  {cpu_line} (the server process includes the node and controllers)");
    print_requests(&api_before, &api_metrics(&client).await);
    // Whether the node catches up (not a target; evidence when it does not).
    let want = before + load.services_ok as f64;
    let t = Instant::now();
    let node = loop {
        up.check_running()?;
        let last = match http_get_ok(ports.metrics, "/metrics").await {
            Ok(text) => {
                let g = gauge(&text, "fairlead_proxy_service_ports").unwrap_or(0.0);
                if g >= want {
                    break format!("caught up {:.1?} after the load", t.elapsed());
                }
                format!("fairlead_proxy_service_ports {g} of {want}")
            }
            Err(e) => format!("{e:#}"),
        };
        if t.elapsed() > CATCH_UP_LIMIT {
            break format!("NOT caught up {CATCH_UP_LIMIT:?} after the load: {last}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!("  node: {node}");
    println!(
        "  until the node caught up: {}",
        cpu.line(up.pid(), load.ok)
    );
    load.node = Some(node);
    Ok(load)
}

// ---------------------------------------------------------------------------
// (3): API server + node daemon, trials, CPU, RSS

/// What one node run measured.
struct NodeRun {
    setup: Load,
    /// Node start until the sentinel answered.
    initial_sync: Duration,
    service_ports: f64,
    /// Per trial, ms.
    programmed_ms: Vec<f64>,
    dns_ms: Vec<f64>,
    add_ms: Vec<f64>,
    remove_ms: Vec<f64>,
    /// Probes that failed while the Service had live endpoints, by phase
    /// and outcome.
    bad_probes: BTreeMap<String, usize>,
    /// Node counters over the trials (full syncs, failures, ...).
    counters: Vec<(&'static str, f64)>,
    /// DNS index builds during the trials.
    dns_index: Option<HistDelta>,
    trial_errors: Vec<String>,
    cut_short: Option<String>,
    partial: Option<HistDelta>,
    sync: Option<HistDelta>,
    cpu: Result<Cpu, String>,
    rss_loaded: (u64, u64),
    rss_after: (u64, u64),
}

/// Node CPU over the endpoint changes.
struct Cpu {
    changes: usize,
    window: Duration,
    /// CPU seconds over the window, and the idle rate's share of it.
    raw: f64,
    idle: f64,
    /// Last change acknowledged → the sentinel answered.
    lag: Duration,
    api_ms: Vec<f64>,
    errors: usize,
}

impl Cpu {
    fn ms_per_1000(&self) -> f64 {
        (self.raw - self.idle) * 1e3 * 1000.0 / self.changes as f64
    }
}

/// One trial's times, ms.
struct Trial {
    programmed: f64,
    dns: f64,
    add: f64,
    remove: f64,
    /// Failed probes while the Service had live endpoints: "phase outcome".
    bad_probes: BTreeMap<String, usize>,
    /// Removal: when the failed probes started, ms after the write.
    failed_at: Vec<f64>,
}

async fn node_run(env: Env, n: usize, mode: Mode, deadline: Instant) -> Result<NodeRun> {
    let s = env.s.clone();
    if mode == Mode::Userspace {
        // One listening socket per frontend: the node raises its soft
        // limit to the hard one (or further, with CAP_SYS_RESOURCE); say
        // so at once rather than after the sync deadline.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a valid, owned struct.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let may_raise = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            // Bit 24 of the capability set: CAP_SYS_RESOURCE.
            .is_some_and(|caps| caps & (1 << 24) != 0);
        let need = n as u64 + 1000;
        ensure!(
            !ok || may_raise || lim.rlim_max >= need,
            "userspace mode needs ~{need} open files (a socket per frontend); \
             the hard limit here is {} and CAP_SYS_RESOURCE is missing to raise it",
            lim.rlim_max
        );
    }
    // The live backends.
    let mut backends = Vec::new();
    for (name, ip) in BACKENDS {
        let args = [
            "echo",
            "--name",
            name,
            "--bind",
            &ip.to_string(),
            "--http-port",
            &BACKEND_PORT.to_string(),
        ]
        .map(String::from);
        let mut p = env.spawn(&format!("backend-{name}"), &args)?;
        let addr = SocketAddr::new(ip.into(), BACKEND_PORT);
        let t = Instant::now();
        loop {
            p.check_running()?;
            match http_get(addr, "/").await {
                Ok((200, body)) if body.trim() == name => break,
                other if t.elapsed() > START_LIMIT => {
                    bail!("backend {name} not answering on {addr}: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        backends.push(p);
    }

    let (mut api, client) = start_api(&env, "apiserver", None).await?;
    create_namespaces(&client).await?;
    let setup = bulk_load(&client, n, s.writers, s.load_limit(n)).await;
    api.check_running()?;
    println!("  setup bulk load: {}", setup.summary());
    ensure!(
        !setup.timed_out && setup.errors == 0,
        "the setup bulk load did not complete: {}",
        setup.summary()
    );
    let services: Api<Service> = Api::namespaced(client.clone(), TRIAL_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), TRIAL_NS);
    let pp = PostParams::default();
    let sentinel = cluster_ip(&services.create(&pp, &service(SENTINEL)).await?)?;
    let sentinel = SocketAddr::new(sentinel.into(), SERVICE_PORT);
    slices.create(&pp, &slice(SENTINEL, &live(None))).await?;

    // The node, once everything is written.
    let ports = NodePorts::pick()?;
    let kubeconfig = env.dir.join("apiserver-data").join("kubeconfig");
    let mut args = vec![
        "node".to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    args.extend(ports.flags(&s, mode));
    let t = Instant::now();
    let mut node = env.spawn("node", &args)?;
    let sync_deadline =
        (t + Duration::from_secs(60) + Duration::from_millis(5 * n as u64)).min(deadline);
    loop {
        node.check_running()?;
        let step = (Instant::now() + Duration::from_secs(1)).min(sync_deadline);
        match probe_until(sentinel, Duration::from_millis(20), step, |p| {
            p.outcome.answer().is_some()
        })
        .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() >= sync_deadline => bail!(
                "the node did not serve the sentinel Service {sentinel} within {:.0?} of its \
                 start: {e:#}\n{}",
                sync_deadline - t,
                node.log_tail(20)
            ),
            Err(_) => {}
        }
    }
    let initial_sync = t.elapsed();
    // The gauge is set once the sync returns, a moment after the kernel
    // (or the listener) already serves the sentinel.
    let (m0, service_ports) = {
        let t = Instant::now();
        loop {
            let m = http_get_ok(ports.metrics, "/metrics").await?;
            let g = gauge(&m, "fairlead_proxy_service_ports").unwrap_or(0.0);
            if g > n as f64 {
                break (m, g);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "the node serves the sentinel but fairlead_proxy_service_ports is {g} \
                 (expected > {n}) 10 s later"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let pid = node.pid();
    let rss_loaded = (pid_vm_kib(pid, "VmRSS"), pid_vm_kib(pid, "VmHWM"));
    println!(
        "  node synced {:.2?} after its start ({service_ports} service ports); \
         VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        initial_sync,
        mib(rss_loaded.0),
        mib(rss_loaded.1)
    );

    // Trials.
    let mut trials = Vec::new();
    let mut trial_errors = Vec::new();
    let mut cut_short = None;
    // Not right after the node's last sync (its rate limit would hold the
    // first write back).
    tokio::time::sleep(s.gap()).await;
    let t = Instant::now();
    for i in 0..s.trials {
        if Instant::now() > deadline {
            cut_short = Some(format!(
                "trials cut short after {i} by the size's time limit"
            ));
            break;
        }
        node.check_running()?;
        match trial(&client, &s, ports.dns, i).await {
            Ok(t) => {
                if s.verbose {
                    println!(
                        "  trial {i}: DNS {:.2} ms, refused {:.2} ms, slice → answer {:.2} ms, \
                         removal {:.2} ms, failed probes: {}{}",
                        t.dns,
                        t.programmed,
                        t.add,
                        t.remove,
                        kinds(&t.bad_probes),
                        match (t.failed_at.first(), t.failed_at.last()) {
                            (Some(a), Some(b)) => format!(
                                " (removal probes started {a:.1} to {b:.1} ms after the write)"
                            ),
                            _ => String::new(),
                        }
                    );
                }
                trials.push(t)
            }
            Err(e) => {
                let msg = format!("trial {i}: {e:#}");
                println!("  {msg}");
                trial_errors.push(msg);
                if trial_errors.len() > s.trials / 2 {
                    cut_short = Some("trials stopped: more than half failed".into());
                    break;
                }
            }
        }
    }
    node.check_running()?;
    let pick = |f: fn(&Trial) -> f64| trials.iter().map(f).collect::<Vec<f64>>();
    let (programmed_ms, dns_ms) = (pick(|t| t.programmed), pick(|t| t.dns));
    let (add_ms, remove_ms) = (pick(|t| t.add), pick(|t| t.remove));
    let mut bad_probes = BTreeMap::<String, usize>::new();
    for t in &trials {
        for (k, v) in &t.bad_probes {
            *bad_probes.entry(k.clone()).or_default() += v;
        }
    }
    println!(
        "  {} trials in {:.1?} ({} failed): slice → answer p50/p99/max {}; removal {}; \
         DNS {}; Service programmed {}; failed probes with live endpoints: {}",
        trials.len(),
        t.elapsed(),
        trial_errors.len(),
        triple(&add_ms),
        triple(&remove_ms),
        triple(&dns_ms),
        triple(&programmed_ms),
        kinds(&bad_probes),
    );
    let m1 = http_get_ok(ports.metrics, "/metrics").await?;
    let hist = |name: &str| {
        let d = HistDelta::between(&m0, &m1, name);
        d.filter(|d| d.count > 0.0)
    };
    let partial = hist("kubeproxy_sync_partial_proxy_rules_duration_seconds");
    let sync = hist("kubeproxy_sync_proxy_rules_duration_seconds");
    let dns_index = hist("fairlead_dns_index_build_duration_seconds");
    let counters: Vec<(&'static str, f64)> = [
        "fairlead_nftables_partial_syncs_total",
        "fairlead_nftables_full_syncs_total",
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "fairlead_nftables_repairs_total",
        "fairlead_proxy_bind_errors_total",
    ]
    .into_iter()
    .filter_map(|c| Some((c, metric_sum(&m1, c)? - metric_sum(&m0, c).unwrap_or(0.0))))
    .collect();
    println!(
        "  node counters over the trials: {}",
        counters
            .iter()
            .map(|(k, v)| format!("{k} +{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, h) in [
        ("nftables transaction", &partial),
        ("whole sync", &sync),
        ("DNS index build", &dns_index),
    ] {
        if let Some(h) = h {
            println!(
                "  {name} during the trials: {} observations, p50 {}, p99 {}",
                h.count,
                h.quantile_text(0.5),
                h.quantile_text(0.99)
            );
        }
    }
    let rss_after = (pid_vm_kib(pid, "VmRSS"), pid_vm_kib(pid, "VmHWM"));

    // CPU per endpoint changes.
    let cpu = if Instant::now() > deadline {
        Err("skipped: the size's time limit has passed".to_string())
    } else {
        let r = cpu_run(&client, &s, n, pid, sentinel).await;
        node.check_running()?;
        match r {
            Ok(c) => {
                println!(
                    "  {} endpoint changes at {}/s: node CPU {:.0} ms per 1,000 (raw {:.2} s \
                     over {:.1?}, idle share {:.2} s); applied {:.0?} after the last write; \
                     API p99 {} ms, {} errors",
                    c.changes,
                    s.change_rate,
                    c.ms_per_1000(),
                    c.raw,
                    c.window,
                    c.idle,
                    c.lag,
                    fmt_ms(pct(&c.api_ms, 0.99)),
                    c.errors
                );
                Ok(c)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                println!("  CPU per endpoint changes: FAILED: {msg}");
                Err(msg)
            }
        }
    };
    println!(
        "  node VmRSS {:.1} MiB after the trials, VmHWM {:.1} MiB at the end",
        mib(rss_after.0),
        mib(pid_vm_kib(pid, "VmHWM"))
    );
    drop(node);
    drop(api);
    drop(backends);
    Ok(NodeRun {
        setup,
        initial_sync,
        service_ports,
        programmed_ms,
        dns_ms,
        add_ms,
        remove_ms,
        bad_probes,
        counters,
        dns_index,
        trial_errors,
        cut_short,
        partial,
        sync,
        cpu,
        rss_loaded,
        rss_after,
    })
}

/// One trial (see the module docs).
async fn trial(client: &kube::Client, s: &Settings, dns: SocketAddr, i: usize) -> Result<Trial> {
    let services: Api<Service> = Api::namespaced(client.clone(), TRIAL_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), TRIAL_NS);
    let pp = PostParams::default();
    let name = format!("t-{i}");
    let fqdn = format!("{name}.{TRIAL_NS}.svc.cluster.local.");

    // A new Service: DNS, and the ClusterIP refusing (programmed).
    let t0 = Instant::now();
    let asked = tokio::spawn(dns_until_answer(dns, fqdn.clone(), t0 + TRIAL_LIMIT));
    let created = services
        .create(&pp, &service(&name))
        .await
        .context("creating the Service")?;
    let ip = cluster_ip(&created)?;
    let vip = SocketAddr::new(ip.into(), SERVICE_PORT);
    let refused = probe_until(vip, PROBE_EVERY, t0 + TRIAL_LIMIT, |p| {
        p.outcome == Outcome::Refused
    })
    .await
    .context("waiting for the new Service's ClusterIP to refuse (programmed, no endpoints)")?;
    let (answered, ips) = asked
        .await?
        .with_context(|| format!("asking DNS for {fqdn}"))?;
    ensure!(
        ips == [ip],
        "DNS answered {fqdn} with {ips:?}, the Service's ClusterIP is {ip}"
    );
    let programmed = since(t0, refused.end);
    let dns = since(t0, answered);
    tokio::time::sleep(s.gap()).await;

    // Its slice with the three live backends → the first answer.
    let t0 = Instant::now();
    let post = {
        let (slices, body) = (slices.clone(), slice(&name, &live(None)));
        tokio::spawn(async move { slices.create(&PostParams::default(), &body).await })
    };
    let first = probe_until(vip, PROBE_EVERY, t0 + TRIAL_LIMIT, |p| {
        p.outcome.answer().is_some()
    })
    .await
    .context("waiting for the first answer through the ClusterIP")?;
    let add = since(t0, first.end);
    post.await?.context("creating the EndpointSlice")?;
    // All three must be reachable before one is removed (not timed).
    let mut seen = BTreeMap::<String, usize>::new();
    let mut bad_probes = BTreeMap::<String, usize>::new();
    for _ in 0..300 {
        match probe(vip).await {
            Outcome::Answer(b) => *seen.entry(b).or_default() += 1,
            o => *bad_probes.entry(format!("check {}", o.kind())).or_default() += 1,
        }
        if seen.len() == BACKENDS.len() {
            break;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    ensure!(
        seen.len() == BACKENDS.len(),
        "not every backend answered through {vip}: {seen:?}, failed probes: {}",
        kinds(&bad_probes)
    );
    tokio::time::sleep(s.gap()).await;

    // One endpoint removed → no new connection reaches it.
    let removed = BACKENDS[i % BACKENDS.len()].0;
    let t0 = Instant::now();
    let put = {
        let (slices, body) = (slices.clone(), slice(&name, &live(Some(removed))));
        let name = format!("{name}-1");
        tokio::spawn(async move { slices.replace(&name, &PostParams::default(), &body).await })
    };
    let mut last_hit: Option<Instant> = None;
    let mut others: Vec<Instant> = Vec::new();
    // When failed probes started (ms after the write).
    let mut failed_at: Vec<f64> = Vec::new();
    probe_until(vip, PROBE_EVERY, t0 + TRIAL_LIMIT, |p| {
        match &p.outcome {
            Outcome::Answer(b) if b == removed => {
                last_hit = Some(last_hit.map_or(p.start, |h| h.max(p.start)));
            }
            Outcome::Answer(_) => others.push(p.start),
            o => {
                *bad_probes
                    .entry(format!("removal {}", o.kind()))
                    .or_default() += 1;
                failed_at.push(since(t0, p.start));
            }
        }
        let quiet_since = last_hit.unwrap_or(t0);
        put.is_finished()
            && quiet_since.elapsed() >= REMOVAL_WINDOW
            && others.iter().filter(|s| **s > quiet_since).count() >= REMOVAL_MIN_ANSWERS
    })
    .await
    .with_context(|| format!("waiting until no new connection reaches {removed}"))?;
    put.await?.context("replacing the EndpointSlice")?;
    let remove = last_hit.map_or(0.0, |h| since(t0, h));
    tokio::time::sleep(s.gap()).await;
    Ok(Trial {
        programmed,
        dns,
        add,
        remove,
        bad_probes,
        failed_at,
    })
}

/// Node CPU per endpoint changes (see the module docs).
async fn cpu_run(
    client: &kube::Client,
    s: &Settings,
    n: usize,
    pid: u32,
    sentinel: SocketAddr,
) -> Result<Cpu> {
    let cpu = || stat_cpu(&format!("/proc/{pid}/stat")).context("reading the node's CPU");
    let trial_slices: Api<EndpointSlice> = Api::namespaced(client.clone(), TRIAL_NS);
    let pp = PostParams::default();
    // The sentinel without endpoints: refused once applied.
    trial_slices
        .replace(&format!("{SENTINEL}-1"), &pp, &slice(SENTINEL, &[]))
        .await?;
    probe_until(
        sentinel,
        Duration::from_millis(20),
        Instant::now() + CPU_SETTLE_LIMIT,
        |p| p.outcome == Outcome::Refused,
    )
    .await
    .context("waiting for the emptied sentinel to refuse")?;
    tokio::time::sleep(s.gap()).await;

    let window = Duration::from_secs_f64(s.changes as f64 / s.change_rate);
    let c0 = cpu()?;
    tokio::time::sleep(window).await;
    let idle_rate = (cpu()? - c0) / window.as_secs_f64();

    // A stride coprime with n: distinct Services for the first n changes.
    let mut stride = 7919;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), BULK_NS);
    let api_ms = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let c1 = cpu()?;
    let mut inflight = JoinSet::new();
    for c in 0..s.changes {
        let at = start + Duration::from_secs_f64(c as f64 / s.change_rate);
        tokio::time::sleep_until(at.into()).await;
        while inflight.len() >= CHANGE_INFLIGHT {
            inflight.join_next().await;
        }
        let i = (c * stride) % n;
        let mut addrs = bulk_endpoints(i);
        addrs[c % ENDPOINTS] = fake_ip(80, c);
        let body = slice(&bulk_name(i), &addrs);
        let (slices, api_ms, errors) = (slices.clone(), api_ms.clone(), errors.clone());
        inflight.spawn(async move {
            let t = Instant::now();
            let r = slices
                .replace(
                    &format!("{}-1", bulk_name(i)),
                    &PostParams::default(),
                    &body,
                )
                .await;
            match r {
                Ok(_) => api_ms.lock().unwrap().push(ms(t)),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let drain = tokio::time::timeout(Duration::from_secs(60), async {
        while inflight.join_next().await.is_some() {}
    });
    ensure!(
        drain.await.is_ok(),
        "endpoint changes still unanswered 60 s after the last was sent"
    );
    let sent = Instant::now();
    // The sentinel gets b1 back: answered once every change before it is in.
    trial_slices
        .replace(
            &format!("{SENTINEL}-1"),
            &pp,
            &slice(SENTINEL, &[BACKENDS[0].1]),
        )
        .await?;
    probe_until(
        sentinel,
        Duration::from_millis(20),
        sent + CPU_SETTLE_LIMIT,
        |p| p.outcome.answer().is_some(),
    )
    .await
    .context("waiting for the node to apply the changes (sentinel)")?;
    let end = Instant::now();
    let raw = cpu()? - c1;
    let window = end - start;
    let api_ms = std::mem::take(&mut *api_ms.lock().unwrap());
    Ok(Cpu {
        changes: s.changes,
        window,
        raw,
        idle: idle_rate * window.as_secs_f64(),
        lag: end - sent,
        api_ms,
        errors: errors.load(Ordering::Relaxed),
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

// ---------------------------------------------------------------------------
// Probes

struct Probe {
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

/// Start a probe of `addr` every `every` (overlapping, at most
/// [`MAX_INFLIGHT`] at once) and hand each finished one to `done` until it
/// says so; that probe is returned. Fails at `deadline` with the last
/// outcome seen. Probes still in flight are dropped.
async fn probe_until(
    addr: SocketAddr,
    every: Duration,
    deadline: Instant,
    mut done: impl FnMut(&Probe) -> bool,
) -> Result<Probe> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Probe>();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut last = None;
    let mut outcomes = BTreeMap::<String, usize>::new();
    let start = Instant::now();
    loop {
        tokio::select! {
            biased;
            Some(p) = rx.recv() => {
                if done(&p) {
                    return Ok(p);
                }
                *outcomes.entry(p.outcome.kind()).or_default() += 1;
                last = Some(p.outcome);
            }
            _ = tick.tick() => {
                if Instant::now() > deadline {
                    bail!("{addr}: not there after {:.1?}; outcomes {outcomes:?}, last {last:?}",
                        start.elapsed());
                }
                while inflight.try_join_next().is_some() {}
                if inflight.len() < MAX_INFLIGHT {
                    let tx = tx.clone();
                    inflight.spawn(async move {
                        let start = Instant::now();
                        let outcome = probe(addr).await;
                        let _ = tx.send(Probe { start, end: Instant::now(), outcome });
                    });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DNS

/// Ask `server` for `name` A every 1 ms (one query at a time) until it
/// answers NOERROR with addresses; when, and which.
async fn dns_until_answer(
    server: SocketAddr,
    name: String,
    deadline: Instant,
) -> Result<(Instant, Vec<Ipv4Addr>)> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    sock.connect(server).await?;
    let mut id: u16 = (std::process::id() as u16).wrapping_mul(7);
    let mut last = String::from("nothing");
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        id = id.wrapping_add(1);
        sock.send(&encode_query(&name, id)?).await?;
        let reply = tokio::time::timeout(Duration::from_millis(100), async {
            loop {
                let n = sock.recv(&mut buf).await?;
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if m.metadata.id == id {
                    return Ok::<_, std::io::Error>(m);
                }
            }
        })
        .await;
        match reply {
            Ok(Ok(m)) => {
                let ips: Vec<Ipv4Addr> = m
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                if m.metadata.response_code == ResponseCode::NoError && !ips.is_empty() {
                    return Ok((Instant::now(), ips));
                }
                last = format!("{:?} {ips:?}", m.metadata.response_code);
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no reply in 100 ms".into(),
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    bail!("{server}: no NOERROR answer for {name} in time; last: {last}")
}

fn encode_query(name: &str, id: u16) -> Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut n = Name::from_ascii(name)?;
    n.set_fqdn(true);
    m.add_query(Query::query(n, RecordType::A));
    Ok(m.to_vec()?)
}

// ---------------------------------------------------------------------------
// HTTP and metrics

/// `GET path` with `Connection: close`: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {addr}{path}: no answer in 10 s"))?
        .with_context(|| format!("GET {addr}{path}"))?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!(
            "GET {addr}{path}: bad reply {:?}",
            &text[..text.len().min(80)]
        );
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {addr}{path}: bad status line in {head:?}"))?;
    Ok((code, body.to_string()))
}

async fn http_get_ok(addr: SocketAddr, path: &str) -> Result<String> {
    match http_get(addr, path).await? {
        (200, body) => Ok(body),
        (code, body) => bail!("GET {addr}{path}: {code} {}", tail_chars(&body, 200)),
    }
}

fn tail_chars(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(0);
    &s[start..]
}

/// `name`'s samples summed over its label sets; `None` if absent.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// `{"removal timeout": 3}` as `removal timeout 3`; `none` when empty.
fn kinds(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// `name`'s cumulative bucket counts by upper bound (summed over label
/// sets), sorted by bound.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut by_le = BTreeMap::<u64, (f64, f64)>::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some(le) = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
    }
    let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// A histogram's observations between two scrapes.
struct HistDelta {
    /// (upper bound, cumulative count) per bucket.
    buckets: Vec<(f64, f64)>,
    count: f64,
}

impl HistDelta {
    fn between(before: &str, after: &str, name: &str) -> Option<HistDelta> {
        let b = buckets(before, name);
        let a = buckets(after, name);
        if a.is_empty() {
            return None;
        }
        let buckets: Vec<(f64, f64)> = a
            .iter()
            .map(|(le, v)| {
                let old = b.iter().find(|(l, _)| l == le).map_or(0.0, |(_, v)| *v);
                (*le, v - old)
            })
            .collect();
        let count = buckets.last().map_or(0.0, |(_, v)| *v);
        Some(HistDelta { buckets, count })
    }

    /// The smallest bucket bound (seconds) holding quantile `q`.
    fn quantile(&self, q: f64) -> f64 {
        let rank = (q * self.count).ceil().max(1.0);
        self.buckets
            .iter()
            .find(|(_, v)| *v >= rank)
            .map_or(f64::INFINITY, |(le, _)| *le)
    }

    fn quantile_text(&self, q: f64) -> String {
        let le = self.quantile(q);
        if le.is_finite() {
            format!("≤ {} ms", le * 1e3)
        } else {
            let top = self
                .buckets
                .iter()
                .rev()
                .find(|(l, _)| l.is_finite())
                .map_or(0.0, |(l, _)| *l);
            format!("> {} ms", top * 1e3)
        }
    }
}

// ---------------------------------------------------------------------------
// Numbers

fn ms(since_: Instant) -> f64 {
    since_.elapsed().as_secs_f64() * 1e3
}

fn since(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64() * 1e3
}

/// Nearest-rank percentile (`p` in 0..=1); `None` when empty.
fn pct(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// `p50 / p99 / max` in ms.
fn triple(v: &[f64]) -> String {
    format!(
        "{} / {} / {}",
        fmt_ms(pct(v, 0.5)),
        fmt_ms(pct(v, 0.99)),
        fmt_ms(pct(v, 1.0))
    )
}

/// `12345` as `12,345`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// Summary

/// Aligned columns: the first left-aligned, the others right-aligned.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut w = vec![0usize; cols];
    for r in rows {
        for (c, cell) in r.iter().enumerate() {
            w[c] = w[c].max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = w[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        println!("{}", line.trim_end());
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn print_summary(s: &Settings, all: &[SizeResults]) {
    let nodes = || {
        all.iter().flat_map(|r| {
            r.node
                .iter()
                .map(move |(m, res)| (r.services, *m, res.as_ref()))
        })
    };

    if s.node {
        println!("API write → traffic and → DNS (ms, p50 / p99 / max over the trials):");
        let mut rows = vec![row(&[
            "mode",
            "Services",
            "trials",
            "slice write → answer",
            "removal → not reached",
            "Service → DNS answer",
            "Service → refused (programmed)",
            "failed",
        ])];
        for (n, m, r) in nodes() {
            match r {
                Ok(r) => rows.push(vec![
                    m.to_string(),
                    thousands(n),
                    r.add_ms.len().to_string(),
                    triple(&r.add_ms),
                    triple(&r.remove_ms),
                    triple(&r.dns_ms),
                    triple(&r.programmed_ms),
                    format!(
                        "{} trials; probes: {}{}",
                        r.trial_errors.len(),
                        kinds(&r.bad_probes),
                        r.cut_short
                            .as_ref()
                            .map_or(String::new(), |c| format!("; {c}"))
                    ),
                ]),
                Err(e) => rows.push(vec![
                    m.to_string(),
                    thousands(n),
                    format!("FAILED: {}", first_line(&e.to_string())),
                ]),
            }
        }
        print_table(&rows);
        println!(
            "reference: kube-proxy {KUBE_PROXY_MS} ms at {} Services \
             (kubernetes/kubernetes PR 126013)",
            thousands(KUBE_PROXY_SERVICES)
        );

        println!("\nnode syncs during the trials (node histogram deltas; bounds of its buckets):");
        let mut rows = vec![row(&[
            "mode",
            "Services",
            "nftables transactions",
            "p50",
            "p99",
            "whole syncs",
            "p50",
            "p99",
            "DNS index builds",
            "p50",
            "p99",
            "full syncs",
            "initial sync",
        ])];
        for (n, m, r) in nodes() {
            let Ok(r) = r else { continue };
            let h = |h: &Option<HistDelta>| match h {
                Some(h) => [
                    format!("{}", h.count),
                    h.quantile_text(0.5),
                    h.quantile_text(0.99),
                ],
                None => ["-".into(), "-".into(), "-".into()],
            };
            let mut cells = vec![m.to_string(), thousands(n)];
            cells.extend(h(&r.partial));
            cells.extend(h(&r.sync));
            cells.extend(h(&r.dns_index));
            cells.push(
                r.counters
                    .iter()
                    .find(|(k, _)| *k == "fairlead_nftables_full_syncs_total")
                    .map_or("-".into(), |(_, v)| v.to_string()),
            );
            cells.push(format!("{:.2?}", r.initial_sync));
            rows.push(cells);
        }
        print_table(&rows);

        println!(
            "\nnode CPU per 1,000 endpoint changes ({} PUTs at {}/s, idle CPU subtracted):",
            s.changes, s.change_rate
        );
        let mut rows = vec![row(&[
            "mode",
            "Services",
            "CPU ms / 1,000",
            "raw CPU s",
            "idle share s",
            "window",
            "applied after last write",
            "PUT p99 ms",
            "errors",
        ])];
        for (n, m, r) in nodes() {
            let Ok(r) = r else { continue };
            match &r.cpu {
                Ok(c) => rows.push(vec![
                    m.to_string(),
                    thousands(n),
                    format!("{:.0}", c.ms_per_1000()),
                    format!("{:.2}", c.raw),
                    format!("{:.2}", c.idle),
                    format!("{:.1?}", c.window),
                    format!("{:.0?}", c.lag),
                    fmt_ms(pct(&c.api_ms, 0.99)),
                    c.errors.to_string(),
                ]),
                Err(e) => rows.push(vec![
                    m.to_string(),
                    thousands(n),
                    format!("FAILED: {}", first_line(&e.to_string())),
                ]),
            }
        }
        print_table(&rows);

        println!("\nnode memory (fairlead node, DNS on), MiB:");
        let mut rows = vec![row(&[
            "mode",
            "Services",
            "service ports",
            "VmRSS synced",
            "VmHWM synced",
            "VmRSS after trials",
            "VmHWM after trials",
            "setup load objects/s",
        ])];
        for (n, m, r) in nodes() {
            let Ok(r) = r else { continue };
            rows.push(vec![
                m.to_string(),
                thousands(n),
                format!("{}", r.service_ports),
                format!("{:.1}", mib(r.rss_loaded.0)),
                format!("{:.1}", mib(r.rss_loaded.1)),
                format!("{:.1}", mib(r.rss_after.0)),
                format!("{:.1}", mib(r.rss_after.1)),
                format!("{:.0}", r.setup.rate()),
            ]);
        }
        print_table(&rows);
    }

    if s.load {
        println!(
            "\nbulk load ({} writers; Services + EndpointSlices through the API), objects/s and \
             API latency in ms:",
            s.writers
        );
        let mut rows = vec![row(&[
            "Services",
            "server",
            "objects/s",
            "vs alone",
            "write p50",
            "write p99",
            "read p99",
            "outcome",
        ])];
        for r in all {
            let alone = r
                .alone
                .as_ref()
                .and_then(|a| a.as_ref().ok())
                .map(Load::rate);
            let mut line = |label: String, l: Option<&Result<Load, String>>| match l {
                None => {}
                Some(Err(e)) => rows.push(vec![
                    thousands(r.services),
                    label,
                    format!("FAILED: {}", first_line(&e.to_string())),
                ]),
                Some(Ok(l)) => rows.push(vec![
                    thousands(r.services),
                    label,
                    format!("{:.0}", l.rate()),
                    match alone {
                        Some(a) if a > 0.0 => format!("{:.2}", l.rate() / a),
                        _ => "-".into(),
                    },
                    fmt_ms(pct(&l.write_ms, 0.5)),
                    fmt_ms(pct(&l.write_ms, 0.99)),
                    fmt_ms(pct(&l.read_ms, 0.99)),
                    {
                        let mut o = if l.timed_out {
                            format!(
                                "TIMED OUT after {:?}: {} of {} written",
                                l.limit, l.ok, l.wanted
                            )
                        } else {
                            format!("{} written", l.ok)
                        };
                        if l.errors > 0 {
                            o += &format!(", {} errors", l.errors);
                        }
                        if let Some(node) = &l.node {
                            o += &format!("; node {node}");
                        }
                        o
                    },
                ]),
            };
            line("apiserver alone".into(), r.alone.as_ref());
            for (m, l) in &r.up {
                line(format!("up --proxy-mode {m}"), Some(l));
            }
        }
        print_table(&rows);
    }

    print_targets(s, all);
}

fn print_targets(s: &Settings, all: &[SizeResults]) {
    println!(
        "\nissue targets (verdicts at {} Services; other sizes for the trend):",
        thousands(TARGET_SERVICES)
    );
    let mut rows = vec![row(&[
        "target",
        "measured",
        "target",
        "measured/target",
        "",
    ])];
    let mut push = |what: String,
                    n: usize,
                    measured: Option<f64>,
                    target: f64,
                    unit: &str,
                    higher_is_better: bool| {
        let (m, ratio, verdict) = match measured {
            Some(m) => {
                let met = if higher_is_better {
                    m >= target
                } else {
                    m <= target
                };
                (
                    format!("{} {unit}", fmt_ms(Some(m))),
                    format!("{:.2}", m / target),
                    if n != TARGET_SERVICES {
                        "(trend)".to_string()
                    } else if met {
                        "met".into()
                    } else {
                        "MISSED".into()
                    },
                )
            }
            None => ("-".into(), "-".into(), "not measured".into()),
        };
        rows.push(vec![what, m, format!("{target} {unit}"), ratio, verdict]);
    };
    for r in all {
        let n = r.services;
        let at = format!("{} Services", thousands(n));
        for (m, res) in &r.node {
            let node = res.as_ref().ok();
            let p99 = |f: fn(&NodeRun) -> &Vec<f64>| node.and_then(|r| pct(f(r), 0.99));
            push(
                format!("slice write → traffic p99, {m}, {at}"),
                n,
                p99(|r| &r.add_ms),
                TARGET_PROPAGATION_MS,
                "ms",
                false,
            );
            push(
                format!("removal → not reached p99, {m}, {at}"),
                n,
                p99(|r| &r.remove_ms),
                TARGET_PROPAGATION_MS,
                "ms",
                false,
            );
            push(
                format!("Service write → DNS p99, {m}, {at}"),
                n,
                p99(|r| &r.dns_ms),
                TARGET_PROPAGATION_MS,
                "ms",
                false,
            );
            if *m == Mode::Nftables {
                let tx = node
                    .and_then(|r| r.partial.as_ref())
                    .map(|h| h.quantile(0.99) * 1e3);
                push(
                    format!("nftables transaction p99 (≤ bucket), {at}"),
                    n,
                    tx,
                    TARGET_TRANSACTION_MS,
                    "ms",
                    false,
                );
                let rss = node.map(|r| mib(r.rss_loaded.0.max(r.rss_after.0)));
                push(
                    format!("node VmRSS, nftables, DNS on, {at}"),
                    n,
                    rss,
                    TARGET_RSS_MIB,
                    "MiB",
                    false,
                );
            }
        }
        if let Some(Ok(alone)) = &r.alone {
            for (m, res) in &r.up {
                let l = res.as_ref().ok();
                // Over several rounds, the median of their ratios.
                let ratio = match r.ratios.get(m) {
                    Some(v) if v.len() > 1 => {
                        let mut sorted = v.clone();
                        sorted.sort_by(f64::total_cmp);
                        Some(median(&sorted))
                    }
                    _ => l.map(|l| l.rate() / alone.rate().max(1e-9)),
                };
                push(
                    format!("bulk load rate, up {m} / apiserver alone, {at}"),
                    n,
                    ratio,
                    TARGET_LOAD_RATIO,
                    "x",
                    true,
                );
                push(
                    format!("API write p99 during the load, up {m}, {at}"),
                    n,
                    l.and_then(|l| pct(&l.write_ms, 0.99)),
                    TARGET_API_P99_MS,
                    "ms",
                    false,
                );
                push(
                    format!("API read p99 during the load, up {m}, {at}"),
                    n,
                    l.and_then(|l| pct(&l.read_ms, 0.99)),
                    TARGET_API_P99_MS,
                    "ms",
                    false,
                );
            }
        }
    }
    // CPU: the largest size against 1,000 (the issue: 30,000 vs 1,000).
    if s.node {
        let cpu = |n: usize, m: Mode| {
            all.iter()
                .find(|r| r.services == n)
                .and_then(|r| r.node.get(&m))
                .and_then(|r| r.as_ref().ok())
                .and_then(|r| r.cpu.as_ref().ok())
                .map(Cpu::ms_per_1000)
        };
        for &m in &s.modes {
            let Some(base) = cpu(1000, m) else { continue };
            for r in all.iter().filter(|r| r.services > 1000) {
                let ratio = cpu(r.services, m).map(|c| c / base.max(1e-9));
                push(
                    format!(
                        "node CPU per 1,000 changes, {m}, {} / 1,000 Services",
                        thousands(r.services)
                    ),
                    r.services,
                    ratio,
                    TARGET_CPU_RATIO,
                    "x",
                    false,
                );
            }
        }
    }
    print_table(&rows);
    let kp = all
        .iter()
        .find(|r| r.services == KUBE_PROXY_SERVICES)
        .and_then(|r| r.node.get(&Mode::Nftables))
        .and_then(|r| r.as_ref().ok())
        .and_then(|r| pct(&r.add_ms, 0.99));
    println!(
        "reference: kube-proxy (nftables) {KUBE_PROXY_MS} ms at {} Services \
         (kubernetes/kubernetes PR 126013){}",
        thousands(KUBE_PROXY_SERVICES),
        match kp {
            Some(v) => format!(
                "; fairlead nftables slice write → traffic p99 at {}: {} ms = {:.2}x kube-proxy",
                thousands(KUBE_PROXY_SERVICES),
                fmt_ms(Some(v)),
                v / KUBE_PROXY_MS
            ),
            None => String::new(),
        }
    );
}

/// The median of sorted values (the mean of the middle two for an even
/// count).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
