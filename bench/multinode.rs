//! Several hosts (issue 13): how fast an API write reaches the data plane
//! of *other* hosts, and how API write throughput scales with the number
//! of API servers, on a `scripts/lab` cluster of 3 servers (an etcd member
//! and `fairlead up` each) and 2 agents (`fairlead join`), every host a
//! network namespace on a shared bridge.
//!
//! ```sh
//! cargo bench --bench multinode
//! ```
//!
//! Needs root (network namespaces, nf_tables), `etcd`, `kubectl`, `curl`,
//! `nsenter` (what `scripts/lab up` checks). The `fairlead` binary is the
//! release one Cargo builds with the bench (`FAIRLEAD_BIN` overrides it),
//! handed to `scripts/lab up --bin`.
//!
//! **Network safety.** Everything that addresses 10.251.0.x (the lab's
//! bridge) or a ClusterIP is sent from inside the lab's namespaces, or
//! from the peer's own namespace (`common::Netns`): every client runs on a
//! tokio runtime whose threads all entered one namespace before doing any
//! work ([`HostRt`]; setns(2) applies to the calling thread only, and a
//! thread that fails to enter aborts the process), and work reaches those
//! runtimes only as spawned tasks (the main thread, in the machine's own
//! namespace, only waits for their results). Child processes are started
//! with `nsenter --net` / `ip netns exec`. From the machine's namespace
//! nothing is sent anywhere. `scripts/lab down` runs when the lab guard
//! is dropped (also when the bench panics); a peer namespace is deleted
//! with everything in it when its guard is dropped.
//!
//! **1. Network programming across hosts** (part `latency`, per mode in
//! `FAIRLEAD_BENCH_MODES`, default `nftables`; `nftables,userspace` runs
//! both, each on a fresh lab). One live backend for the whole run:
//! `fairlead echo --name mn-backend --bind 10.251.0.101 --http-port 9000`
//! started inside agent a1's namespace. `FAIRLEAD_BENCH_ROUNDS` (30)
//! rounds, each with a new selectorless Service `mn/r-<i>` (port 80 →
//! 9000, ClusterIP allocated), written through s1's API server by a client
//! in s1's namespace:
//!
//! * *Service → programmed* (informative): from sending the Service POST
//!   until a connection to ClusterIP:80 is refused (a Service without
//!   endpoints is rejected; before a node knows it the SYN goes nowhere),
//!   from inside each of a1, a2 and s1. Then a pause of 100 ms.
//! * *EndpointSlice write → traffic*: from just before sending the POST of
//!   slice `r-<i>-1` (one ready endpoint 10.251.0.101:9000) until a new
//!   connection to ClusterIP:80 from inside each host gets the backend's
//!   HTTP answer. Probes are new connections (`Connection: close`), one
//!   started every 1 ms per host, overlapping (each gives up after 200 ms);
//!   a host's time is when its first answer arrived. Then a pause of
//!   100 ms.
//!
//! Agents a1 and a2 are the measured hosts (their node daemons follow the
//! API through their client-side load balancer, i.e. via any of the three
//! API servers, each watching etcd); per round the *max over agents* is
//! the moment traffic flows on every agent. s1 (whose API server took the
//! write, and whose node runs in the same process) is shown as well.
//!
//! **Peer, single node** (part `solo`, per mode): the same rounds against
//! one `fairlead up` (embedded store, `--run-pods false`) in a fresh
//! namespace of the bench's own: node address 10.0.0.1 on `lo`, the backend
//! on 10.0.0.1:9000, `10.96.0.0/12` routed via `lo` from 10.0.0.1, probes
//! from that namespace. The ratio lab / peer is printed.
//!
//! **2. Write throughput, 3 API servers vs 1** (part `writes`, on the first
//! mode's lab): `FAIRLEAD_BENCH_WRITERS` (24) concurrent writers create
//! `FAIRLEAD_BENCH_OBJECTS` (3,000) Secrets (256 bytes of data each, ~0.5 KB
//! stored) in namespace `mnw`. Writer w runs in server s(w mod 3 + 1)'s
//! namespace with that server's admin kubeconfig (`D/s<j>/kubeconfig`; one
//! kube-rs client per server namespace, its connections opened before the
//! clock starts). *Through 3*: each client targets its own server (8
//! writers per API server). *Through 1*: the same clients, namespaces and
//! writers, all targeting s1. The two alternate `FAIRLEAD_BENCH_REPEATS`
//! (2) times (1, 3, 1, 3); the rate of each is objects acknowledged / time
//! from the first write to the last answer, and the rows give their sum of
//! objects over their sum of time. Same lab, same 3-member etcd. Each
//! phase also prints the CPU (user + system, `/proc/<pid>/stat`) the
//! servers' fairlead processes, their etcd members, the agents and the
//! bench itself (the clients) used over it, per object written.
//!
//! *Peer*: etcd's own put rate, the same number of writers spread the same
//! way (one etcd-client per server namespace talking to its local member,
//! w → member w mod 3 + 1), the same number of puts of 512-byte values
//! under `/fairlead-bench/` (outside `/registry/`: no API server sees
//! them).
//!
//! Percentiles are nearest-rank over the rounds: with 30 rounds the p99 is
//! the maximum. The machine's load average and how busy it was are printed:
//! the five hosts, etcd, the clients and the backend share its cores.
//!
//! Environment: `FAIRLEAD_BENCH_MODES` (nftables), `FAIRLEAD_BENCH_PARTS`
//! (latency,solo,writes), `FAIRLEAD_BENCH_ROUNDS` (30),
//! `FAIRLEAD_BENCH_WRITERS` (24), `FAIRLEAD_BENCH_OBJECTS` (3000),
//! `FAIRLEAD_BENCH_REPEATS` (2), `FAIRLEAD_BENCH_LOG` (`RUST_LOG` of the
//! fairlead and echo processes, `warn`), `FAIRLEAD_BENCH_VERBOSE=1` (every
//! round), `FAIRLEAD_BIN`. Every wait has a deadline.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinSet;

use common::{
    env_u64, fairlead_bin, loadavg, machine_ticks, print_rows, probe, stat_cpu, Netns, Outcome,
    Proc,
};

/// `scripts/lab` of this repository.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab");
const SERVERS: usize = 3;
const AGENTS: usize = 2;
const API_PORT: u16 = 6443;
const ETCD_PORT: u16 = 2379;

/// The live backend: its name, and where it listens (agent a1's address
/// in the lab; the node address in the peer's namespace).
const BACKEND_NAME: &str = "mn-backend";
const BACKEND_PORT: u16 = 9000;
const SERVICE_PORT: u16 = 80;
/// The peer's node address (and backend), and the Service range it routes.
const SOLO_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Namespaces of the rounds' objects and of the write phases' Secrets.
const ROUND_NS: &str = "mn";
const WRITE_NS: &str = "mnw";
/// Bytes of data per Secret, and per etcd put of the peer.
const SECRET_BYTES: usize = 256;
const ETCD_VALUE_BYTES: usize = 512;

/// One probe (connection) started this often per host.
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// Most probes in flight at once per host.
const MAX_INFLIGHT: usize = 256;
/// Longest one measured change may take before the round fails.
const ROUND_LIMIT: Duration = Duration::from_secs(10);
/// Pause after each measured change (fairlead's default
/// `--min-sync-period` is 0; this keeps rounds apart).
const GAP: Duration = Duration::from_millis(100);
/// Longest wait for one API response.
const API_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a write phase may take before it is cut off.
const WRITE_LIMIT: Duration = Duration::from_secs(60);
/// How long the peer's processes may take to come up.
const START_LIMIT: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Settings::from_env()?;
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fairlead multi-node benchmark: {cores} cores, load average at start {}; lab of \
         {SERVERS} servers + {AGENTS} agents; modes {}; parts {}; {} rounds; writes: {} \
         writers x {} objects, {} repeats; binary {}",
        loadavg(),
        s.modes.join(","),
        s.parts.join(","),
        s.rounds,
        s.writers,
        s.objects,
        s.repeats,
        s.bin.display()
    );
    let mut latency: Vec<(String, Result<Latency, String>)> = Vec::new();
    let mut solo: Vec<(String, Result<Latency, String>)> = Vec::new();
    let mut writes: Option<Result<Writes, String>> = None;
    for (k, mode) in s.modes.iter().enumerate() {
        let want_writes = k == 0 && s.part("writes");
        if s.part("latency") || want_writes {
            let t = Instant::now();
            println!("\n== lab, proxy mode {mode} ==");
            let run = lab_run(&s, mode, want_writes);
            match run {
                Ok((l, w)) => {
                    if let Some(l) = l {
                        latency.push((mode.clone(), l));
                    }
                    if let Some(w) = w {
                        writes = Some(w);
                    }
                }
                Err(e) => {
                    println!("lab run FAILED: {e:#}");
                    if s.part("latency") {
                        latency.push((mode.clone(), Err(format!("{e:#}"))));
                    }
                    if want_writes {
                        writes = Some(Err(format!("{e:#}")));
                    }
                }
            }
            println!("(lab run took {:.0?})", t.elapsed());
        }
        if s.part("solo") {
            println!("\n== peer: single-node fairlead up, proxy mode {mode} ==");
            let r = solo_run(&s, mode).map_err(|e| format!("{e:#}"));
            if let Err(e) = &r {
                println!("peer run FAILED: {e}");
            }
            solo.push((mode.clone(), r));
        }
    }
    print_summary(&s, &latency, &solo, writes.as_ref());
    let left = leftover_namespaces(&s);
    if !left.is_empty() {
        println!("WARNING: namespaces left behind: {}", left.join(" "));
    }
    println!(
        "\nrun time {:.0?}; load average at the end {}",
        started.elapsed(),
        loadavg()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings

struct Settings {
    bin: PathBuf,
    modes: Vec<String>,
    parts: Vec<String>,
    rounds: usize,
    writers: usize,
    objects: usize,
    repeats: usize,
    log: String,
    verbose: bool,
    /// Lab names are `mn<pid>` + a digit per run.
    name_prefix: String,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let list = |name: &str, default: &str, allowed: &[&str]| -> Result<Vec<String>> {
            let v: Vec<String> = std::env::var(name)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect();
            for x in &v {
                ensure!(
                    allowed.contains(&x.as_str()),
                    "{name}: unknown {x:?} (one of {allowed:?})"
                );
            }
            Ok(v)
        };
        let s = Settings {
            bin: fairlead_bin()?,
            modes: list(
                "FAIRLEAD_BENCH_MODES",
                "nftables",
                &["nftables", "userspace"],
            )?,
            parts: list(
                "FAIRLEAD_BENCH_PARTS",
                "latency,solo,writes",
                &["latency", "solo", "writes"],
            )?,
            rounds: env_u64("FAIRLEAD_BENCH_ROUNDS", 30)?.max(1) as usize,
            writers: env_u64("FAIRLEAD_BENCH_WRITERS", 24)?.max(1) as usize,
            objects: env_u64("FAIRLEAD_BENCH_OBJECTS", 3000)?.max(1) as usize,
            repeats: env_u64("FAIRLEAD_BENCH_REPEATS", 2)?.max(1) as usize,
            log: std::env::var("FAIRLEAD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            verbose: std::env::var("FAIRLEAD_BENCH_VERBOSE").is_ok_and(|v| v == "1"),
            name_prefix: format!("mn{}", std::process::id() % 100_000),
        };
        ensure!(!s.modes.is_empty(), "FAIRLEAD_BENCH_MODES is empty");
        Ok(s)
    }

    fn part(&self, p: &str) -> bool {
        self.parts.iter().any(|x| x == p)
    }
}

// ---------------------------------------------------------------------------
// The lab and the namespaces' runtimes

/// A lab from `scripts/lab up`; `scripts/lab down` on drop.
struct Lab {
    name: String,
    dir: PathBuf,
    /// Holds `dir`'s parent (the script creates `dir` and removes it).
    _parent: tempfile::TempDir,
}

impl Lab {
    fn up(s: &Settings, mode: &str, seq: usize) -> Result<Lab> {
        let parent = tempfile::Builder::new()
            .prefix("fairlead-bench-multinode-")
            .tempdir()?;
        // The guard exists before `up` runs: whatever it leaves is removed.
        let lab = Lab {
            name: format!("{}{seq}", s.name_prefix),
            dir: parent.path().join("lab"),
            _parent: parent,
        };
        let t = Instant::now();
        let out = Command::new(SCRIPT)
            .args(["up", "--name", &lab.name, "--dir"])
            .arg(&lab.dir)
            .arg("--bin")
            .arg(&s.bin)
            .args(["--proxy-mode", mode])
            .args(["--servers", &SERVERS.to_string()])
            .args(["--agents", &AGENTS.to_string()])
            .env("RUST_LOG", &s.log)
            .stdin(Stdio::null())
            .output()
            .context("running scripts/lab")?;
        if !out.status.success() {
            bail!(
                "scripts/lab up failed ({}):\n{}",
                out.status,
                common::tail(&String::from_utf8_lossy(&out.stderr), 60)
            );
        }
        println!(
            "lab {} up in {:.1?} ({})",
            lab.name,
            t.elapsed(),
            lab.dir.display()
        );
        Ok(lab)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    fn ns_path(&self, host: &str) -> PathBuf {
        Path::new("/run/netns").join(self.ns(host))
    }

    fn kubeconfig(&self, server: &str) -> PathBuf {
        self.dir.join(server).join("kubeconfig")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(SCRIPT)
            .args(["down", "--name", &self.name, "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => println!("lab {} down", self.name),
            Ok(o) => eprintln!(
                "scripts/lab down --name {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("scripts/lab down --name {}: {e}", self.name),
        }
    }
}

/// The address of lab host `s<i>` (10.251.0.i) or `a<i>` (10.251.0.(100+i)).
fn host_ip(host: &str) -> Ipv4Addr {
    let (kind, i) = host.split_at(1);
    let i: u8 = i.parse().expect("host number");
    match kind {
        "s" => Ipv4Addr::new(10, 251, 0, i),
        _ => Ipv4Addr::new(10, 251, 0, 100 + i),
    }
}

/// A tokio runtime whose threads all live in one network namespace: every
/// socket its tasks open belongs there. Work is only spawned on it.
struct HostRt {
    host: String,
    rt: Option<Runtime>,
}

impl HostRt {
    fn new(host: &str, ns: &Path, workers: usize) -> Result<HostRt> {
        let file = Arc::new(File::open(ns).with_context(|| ns.display().to_string())?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(format!("mn-{host}"))
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
        Ok(HostRt {
            host: host.to_string(),
            rt: Some(rt),
        })
    }

    fn handle(&self) -> Handle {
        self.rt.as_ref().expect("runtime").handle().clone()
    }

    /// Run `f` as a task on this runtime and wait for it (this thread only
    /// waits).
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let rt = self.rt.as_ref().expect("runtime");
        match rt.block_on(rt.spawn(f)) {
            Ok(v) => v,
            Err(e) => panic!("task on {} failed: {e}", self.host),
        }
    }
}

impl Drop for HostRt {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A kube-rs client from `kubeconfig` (optionally against another server),
/// every request bounded. Call it on the runtime that will use it.
async fn client(kubeconfig: PathBuf, server: Option<String>) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    if let Some(url) = server {
        cfg.cluster_url = url.parse()?;
    }
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = Some(API_TIMEOUT);
    cfg.write_timeout = Some(API_TIMEOUT);
    Ok(kube::Client::try_from(cfg)?)
}

async fn create_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}

// ---------------------------------------------------------------------------
// A lab run

/// The lab's runtimes: one per host, servers first.
struct Hosts {
    list: Vec<HostRt>,
}

impl Hosts {
    fn get(&self, host: &str) -> &HostRt {
        self.list
            .iter()
            .find(|h| h.host == host)
            .expect("a lab host")
    }
}

type LabResults = (
    Option<Result<Latency, String>>,
    Option<Result<Writes, String>>,
);

fn lab_run(s: &Settings, mode: &str, want_writes: bool) -> Result<LabResults> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let lab = Lab::up(s, mode, SEQ.fetch_add(1, Ordering::Relaxed))?;
    // Dropped before the lab (declared after it).
    let mut hosts = Hosts { list: Vec::new() };
    for i in 1..=SERVERS {
        let h = format!("s{i}");
        hosts.list.push(HostRt::new(&h, &lab.ns_path(&h), 2)?);
    }
    for i in 1..=AGENTS {
        let h = format!("a{i}");
        hosts.list.push(HostRt::new(&h, &lab.ns_path(&h), 1)?);
    }
    let (ticks0, load0) = (machine_ticks(), loadavg());
    let latency = if s.part("latency") {
        Some(lab_latency(s, &lab, &hosts).map_err(|e| {
            println!("latency FAILED: {e:#}");
            format!("{e:#}")
        }))
    } else {
        None
    };
    let writes = if want_writes {
        Some(lab_writes(s, &lab, &hosts).map_err(|e| {
            println!("writes FAILED: {e:#}");
            format!("{e:#}")
        }))
    } else {
        None
    };
    let ticks1 = machine_ticks();
    println!(
        "machine {:.0}% busy over the measurements (all cores; load average {load0} at the \
         start, {} at the end)",
        ticks1.0.saturating_sub(ticks0.0) as f64 * 100.0
            / ticks1.1.saturating_sub(ticks0.1).max(1) as f64,
        loadavg()
    );
    drop(hosts);
    drop(lab);
    Ok((latency, writes))
}

// ---------------------------------------------------------------------------
// Part 1: network programming latency

/// Per probed host, the times of each round (ms).
#[derive(Default)]
struct Latency {
    /// Probed hosts, in column order; `agents` of them are agents.
    hosts: Vec<String>,
    agents: Vec<String>,
    /// host → Service POST → refused, per round.
    programmed: BTreeMap<String, Vec<f64>>,
    /// host → slice POST → answer, per round.
    traffic: BTreeMap<String, Vec<f64>>,
    /// Per round, the max over the agents of `traffic`.
    max_agents: Vec<f64>,
    /// Rounds that failed (with why).
    failed: Vec<String>,
}

fn lab_latency(s: &Settings, lab: &Lab, hosts: &Hosts) -> Result<Latency> {
    let backend_ip = host_ip("a1");
    // The backend, inside a1's namespace (killed on drop; `down` would too).
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", lab.ns_path("a1").display()))
        .arg("--")
        .arg(&s.bin)
        .args(["echo", "--name", BACKEND_NAME, "--bind"])
        .arg(backend_ip.to_string())
        .args(["--http-port", &BACKEND_PORT.to_string()])
        .env("RUST_LOG", &s.log);
    let mut backend = Proc::spawn(
        "echo on a1".into(),
        cmd,
        lab.dir.join("a1").join("mn-backend.log"),
    )?;
    let backend_addr = SocketAddr::new(backend_ip.into(), BACKEND_PORT);
    // Reachable directly from every probing host first.
    for h in ["a1", "a2", "s1"] {
        let ok = hosts.get(h).run(async move {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                if let Outcome::Answer(b) = probe(backend_addr).await {
                    return Ok(b);
                }
                if Instant::now() > end {
                    bail!("the backend {backend_addr} does not answer");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        backend.check_running()?;
        ensure!(ok? == BACKEND_NAME, "unexpected backend name");
    }
    let probers: Vec<(String, Handle)> = ["a1", "a2", "s1"]
        .iter()
        .map(|h| (h.to_string(), hosts.get(h).handle()))
        .collect();
    let kubeconfig = lab.kubeconfig("s1");
    let r = rounds(
        s,
        hosts.get("s1"),
        kubeconfig,
        probers,
        vec!["a1".into(), "a2".into()],
        backend_ip,
    );
    backend.check_running()?;
    r
}

/// The rounds (see the module docs): writes through a client on `writer`,
/// probes from every `probers` host.
fn rounds(
    s: &Settings,
    writer: &HostRt,
    kubeconfig: PathBuf,
    probers: Vec<(String, Handle)>,
    agents: Vec<String>,
    backend_ip: Ipv4Addr,
) -> Result<Latency> {
    let (n, verbose) = (s.rounds, s.verbose);
    let hosts: Vec<String> = probers.iter().map(|(h, _)| h.clone()).collect();
    writer.run(async move {
        let client = client(kubeconfig, None).await?;
        create_namespace(&client, ROUND_NS).await?;
        let mut lat = Latency {
            hosts: hosts.clone(),
            agents: agents.clone(),
            ..Default::default()
        };
        for i in 0..n {
            match round(&client, &probers, backend_ip, i).await {
                Ok((programmed, traffic)) => {
                    let mut max = 0f64;
                    for (h, (p, t)) in hosts.iter().zip(programmed.iter().zip(&traffic)) {
                        lat.programmed.entry(h.clone()).or_default().push(*p);
                        lat.traffic.entry(h.clone()).or_default().push(*t);
                        if agents.contains(h) {
                            max = max.max(*t);
                        }
                    }
                    lat.max_agents.push(max);
                    if verbose {
                        let cells: Vec<String> = hosts
                            .iter()
                            .zip(programmed.iter().zip(&traffic))
                            .map(|(h, (p, t))| format!("{h} {p:.2}/{t:.2}"))
                            .collect();
                        println!(
                            "  round {i}: Service→refused / slice→answer ms: {}",
                            cells.join("  ")
                        );
                    }
                }
                Err(e) => {
                    println!("  round {i} FAILED: {e:#}");
                    lat.failed.push(format!("round {i}: {e:#}"));
                    if lat.failed.len() >= 3 {
                        println!("  three rounds failed: stopping");
                        break;
                    }
                }
            }
        }
        ensure!(!lat.max_agents.is_empty(), "no round succeeded");
        Ok(lat)
    })
}

/// One round: per prober host, (Service → refused, slice → answer) in ms.
async fn round(
    client: &kube::Client,
    probers: &[(String, Handle)],
    backend_ip: Ipv4Addr,
    i: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let services: Api<Service> = Api::namespaced(client.clone(), ROUND_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ROUND_NS);
    let pp = PostParams::default();
    let name = format!("r-{i}");

    let t0 = Instant::now();
    let created = services
        .create(&pp, &service(&name))
        .await
        .context("creating the Service")?;
    let vip = SocketAddr::new(cluster_ip(&created)?.into(), SERVICE_PORT);
    let programmed = probe_everywhere(probers, vip, t0, Want::Refused)
        .await
        .context("waiting for the ClusterIP to refuse (programmed, no endpoints)")?;
    tokio::time::sleep(GAP).await;

    let t0 = Instant::now();
    let waits = spawn_probes(probers, vip, t0, Want::Answer);
    slices
        .create(&pp, &slice(&name, backend_ip))
        .await
        .context("creating the EndpointSlice")?;
    let traffic = collect(probers, waits, t0)
        .await
        .context("waiting for the backend's answer through the ClusterIP")?;
    tokio::time::sleep(GAP).await;
    Ok((programmed, traffic))
}

type ProbeWait = tokio::task::JoinHandle<Result<Probe>>;

fn spawn_probes(
    probers: &[(String, Handle)],
    vip: SocketAddr,
    t0: Instant,
    want: Want,
) -> Vec<ProbeWait> {
    probers
        .iter()
        .map(|(_, rt)| rt.spawn(probe_until(vip, t0 + ROUND_LIMIT, want)))
        .collect()
}

async fn collect(
    probers: &[(String, Handle)],
    waits: Vec<ProbeWait>,
    t0: Instant,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for ((h, _), w) in probers.iter().zip(waits) {
        let p = w.await?.with_context(|| format!("from {h}"))?;
        out.push(p.end.saturating_duration_since(t0).as_secs_f64() * 1e3);
    }
    Ok(out)
}

async fn probe_everywhere(
    probers: &[(String, Handle)],
    vip: SocketAddr,
    t0: Instant,
    want: Want,
) -> Result<Vec<f64>> {
    let waits = spawn_probes(probers, vip, t0, want);
    collect(probers, waits, t0).await
}

/// A selectorless Service, port 80 → 9000, ClusterIP allocated by the server.
fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "ClusterIP",
                 "ports": [{"port": SERVICE_PORT, "targetPort": BACKEND_PORT, "protocol": "TCP"}]},
    }))
    .expect("a valid Service")
}

/// Slice `<service>-1`: one ready endpoint `ip`, port 9000.
fn slice(service: &str, ip: Ipv4Addr) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
    }))
    .expect("a valid EndpointSlice")
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
// Probes

/// What a probe loop waits for.
#[derive(Debug, Clone, Copy)]
enum Want {
    Refused,
    /// The backend's answer.
    Answer,
}

impl Want {
    fn met(self, o: &Outcome) -> bool {
        match self {
            Want::Refused => *o == Outcome::Refused,
            Want::Answer => matches!(o, Outcome::Answer(b) if b == BACKEND_NAME),
        }
    }
}

struct Probe {
    end: Instant,
}

/// Start a probe of `addr` every [`PROBE_EVERY`] (overlapping, at most
/// [`MAX_INFLIGHT`] at once) until one's outcome is `want`; that probe is
/// returned. Fails at `deadline` with the outcomes seen. Probes still in
/// flight are dropped. Spawn it on the runtime of the host to probe from.
async fn probe_until(addr: SocketAddr, deadline: Instant, want: Want) -> Result<Probe> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Outcome)>();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut outcomes = BTreeMap::<String, usize>::new();
    loop {
        tokio::select! {
            biased;
            Some((end, outcome)) = rx.recv() => {
                if want.met(&outcome) {
                    return Ok(Probe { end });
                }
                *outcomes.entry(outcome.kind()).or_default() += 1;
            }
            _ = tick.tick() => {
                if Instant::now() > deadline {
                    bail!("{addr}: no {want:?} by the deadline; outcomes {outcomes:?}");
                }
                while inflight.try_join_next().is_some() {}
                if inflight.len() < MAX_INFLIGHT {
                    let tx = tx.clone();
                    inflight.spawn(async move {
                        let outcome = probe(addr).await;
                        let _ = tx.send((Instant::now(), outcome));
                    });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Peer: one `fairlead up`

fn solo_run(s: &Settings, mode: &str) -> Result<Latency> {
    let ns = Netns::new()?;
    ns.ip(&["addr", "add", &format!("{SOLO_NODE_IP}/32"), "dev", "lo"])?;
    ns.ip(&[
        "route",
        "add",
        SERVICE_CIDR,
        "dev",
        "lo",
        "src",
        &SOLO_NODE_IP.to_string(),
    ])?;
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-multinode-solo-")
        .tempdir()?;
    let data = dir.path().join("data");
    println!("netns {}, data {}", ns.name, data.display());
    let spawn = |name: &str, args: &[String]| -> Result<Proc> {
        let mut cmd = ns.command(&s.bin);
        cmd.args(args).env("RUST_LOG", &s.log);
        Proc::spawn(name.into(), cmd, dir.path().join(format!("{name}.log")))
    };
    let args: Vec<String> = [
        "up",
        "--data-dir",
        &data.display().to_string(),
        "--secure-port",
        &API_PORT.to_string(),
        "--proxy-mode",
        mode,
        "--hostname-override",
        "solo",
        "--node-ip",
        &SOLO_NODE_IP.to_string(),
        "--run-pods",
        "false",
        "--dns-bind-address",
        "127.0.0.1:10053",
        "--dns-upstream",
        "127.0.0.1:10054",
    ]
    .map(String::from)
    .to_vec();
    let mut up = spawn("up", &args)?;
    let mut backend = spawn(
        "echo",
        &[
            "echo",
            "--name",
            BACKEND_NAME,
            "--bind",
            &SOLO_NODE_IP.to_string(),
            "--http-port",
            &BACKEND_PORT.to_string(),
        ]
        .map(String::from),
    )?;
    let rt = HostRt::new("solo", &ns.path(), 2)?;
    // The API answers, and the node has synced once (/healthz 200).
    let kubeconfig = data.join("kubeconfig");
    let end = Instant::now() + START_LIMIT;
    loop {
        up.check_running()?;
        backend.check_running()?;
        let kc = kubeconfig.clone();
        let ready = rt.run(async move {
            if !kc.is_file() {
                return false;
            }
            let Ok(c) = client(kc, None).await else {
                return false;
            };
            let api: Api<Namespace> = Api::all(c);
            if tokio::time::timeout(Duration::from_secs(2), api.get("default"))
                .await
                .map_or(true, |r| r.is_err())
            {
                return false;
            }
            let healthz = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 10256);
            let backend = SocketAddr::new(SOLO_NODE_IP.into(), BACKEND_PORT);
            http_status(healthz, "/healthz").await == Some(200)
                && probe(backend).await == Outcome::Answer(BACKEND_NAME.into())
        });
        if ready {
            break;
        }
        if Instant::now() > end {
            bail!(
                "single-node fairlead up not ready after {START_LIMIT:?}\n{}",
                up.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ticks0, load0) = (machine_ticks(), loadavg());
    let r = rounds(
        s,
        &rt,
        kubeconfig,
        vec![("solo".into(), rt.handle())],
        vec!["solo".into()],
        SOLO_NODE_IP,
    );
    let ticks1 = machine_ticks();
    println!(
        "machine {:.0}% busy over the rounds (load average {load0} at the start, {} at the end)",
        ticks1.0.saturating_sub(ticks0.0) as f64 * 100.0
            / ticks1.1.saturating_sub(ticks0.1).max(1) as f64,
        loadavg()
    );
    up.check_running()?;
    drop(rt);
    drop(backend);
    drop(up);
    drop(ns);
    r
}

/// The status code of `GET path` on `addr` (None if no answer in 2 s).
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
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
    let buf = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Part 2: write throughput

/// One write phase's outcome.
#[derive(Clone, Default)]
struct Phase {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    /// Per-write latency, ms.
    write_ms: Vec<f64>,
    /// CPU (user + system) over the phase: the servers' fairlead
    /// processes, their etcd members, the agents' fairlead processes, and
    /// this bench (the clients), in seconds.
    cpu: Option<Cpu>,
}

/// CPU seconds of the lab's processes and of the bench.
#[derive(Clone, Copy, Default)]
struct Cpu {
    api: f64,
    etcd: f64,
    agents: f64,
    bench: f64,
}

impl Cpu {
    /// Now, from `/proc/<pid>/stat` of the pids `scripts/lab` recorded.
    fn now(lab: &Lab) -> Cpu {
        let of = |host: &str, comp: &str| -> f64 {
            std::fs::read_to_string(lab.dir.join(host).join(format!("{comp}.pid")))
                .ok()
                .and_then(|p| stat_cpu(&format!("/proc/{}/stat", p.trim())))
                .unwrap_or(0.0)
        };
        let mut c = Cpu {
            bench: stat_cpu("/proc/self/stat").unwrap_or(0.0),
            ..Cpu::default()
        };
        for i in 1..=SERVERS {
            c.api += of(&format!("s{i}"), "fairlead");
            c.etcd += of(&format!("s{i}"), "etcd");
        }
        for i in 1..=AGENTS {
            c.agents += of(&format!("a{i}"), "fairlead");
        }
        c
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            api: self.api - before.api,
            etcd: self.etcd - before.etcd,
            agents: self.agents - before.agents,
            bench: self.bench - before.bench,
        }
    }

    /// "API servers a, etcd e, agents g, bench clients b" in ms per object.
    fn per_object(&self, n: usize) -> String {
        let ms = |v: f64| v * 1e3 / n.max(1) as f64;
        format!(
            "CPU ms/object: API servers {:.3}, etcd {:.3}, agents {:.3}, bench clients {:.3}",
            ms(self.api),
            ms(self.etcd),
            ms(self.agents),
            ms(self.bench)
        )
    }
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn line(&self) -> String {
        let mut ms = self.write_ms.clone();
        let mut out = format!(
            "{} objects in {:.2?} = {:.0}/s; per write p50 {:.1} ms, p99 {:.1} ms",
            self.ok,
            self.elapsed,
            self.rate(),
            common::pct(&mut ms, 0.50),
            common::pct(&mut ms, 0.99),
        );
        if let Some(c) = &self.cpu {
            let _ = write!(out, "; {}", c.per_object(self.ok));
        }
        if self.errors > 0 {
            let _ = write!(
                out,
                "; {} FAILED, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        out
    }
}

/// Phases summed: objects over time.
fn total_rate(phases: &[Phase]) -> f64 {
    let ok: usize = phases.iter().map(|p| p.ok).sum();
    let secs: f64 = phases.iter().map(|p| p.elapsed.as_secs_f64()).sum();
    ok as f64 / secs.max(1e-9)
}

struct Writes {
    one: Vec<Phase>,
    three: Vec<Phase>,
    etcd: Result<Phase, String>,
}

#[derive(Default)]
struct Shared {
    next: AtomicUsize,
    ok: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    write_ms: Mutex<Vec<f64>>,
}

impl Shared {
    fn record(&self, started: Instant, r: Result<()>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.write_ms
                    .lock()
                    .unwrap()
                    .push(started.elapsed().as_secs_f64() * 1e3);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn phase(&self, elapsed: Duration) -> Phase {
        Phase {
            ok: self.ok.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            first_error: self.first_error.lock().unwrap().clone(),
            elapsed,
            write_ms: std::mem::take(&mut *self.write_ms.lock().unwrap()),
            cpu: None,
        }
    }
}

fn lab_writes(s: &Settings, lab: &Lab, hosts: &Hosts) -> Result<Writes> {
    let servers: Vec<String> = (1..=SERVERS).map(|i| format!("s{i}")).collect();
    // The namespace, through s1.
    let kc = lab.kubeconfig("s1");
    hosts.get("s1").run(async move {
        let c = client(kc, None).await?;
        create_namespace(&c, WRITE_NS).await
    })?;
    let mut one = Vec::new();
    let mut three = Vec::new();
    let mut seq = 0;
    for r in 0..s.repeats {
        for spread in [false, true] {
            let p = api_phase(s, lab, hosts, &servers, spread, seq)?;
            seq += 1;
            println!(
                "  writes through {} (repeat {}): {}",
                if spread {
                    "3 API servers"
                } else {
                    "1 API server "
                },
                r + 1,
                p.line()
            );
            if spread {
                three.push(p);
            } else {
                one.push(p);
            }
        }
    }
    let etcd = etcd_phase(s, lab, hosts, &servers).map_err(|e| format!("{e:#}"));
    match &etcd {
        Ok(p) => println!("  etcd puts through 3 members: {}", p.line()),
        Err(e) => println!("  etcd puts FAILED: {e}"),
    }
    Ok(Writes { one, three, etcd })
}

/// One API write phase: `s.writers` writers, writer w on server
/// s(w mod 3 + 1)'s runtime with its kubeconfig, targeting its own server
/// (`spread`) or s1.
fn api_phase(
    s: &Settings,
    lab: &Lab,
    hosts: &Hosts,
    servers: &[String],
    spread: bool,
    seq: usize,
) -> Result<Phase> {
    // Fresh clients, their connections opened before the clock starts.
    let per_client = s.writers.div_ceil(servers.len());
    let mut clients = Vec::new();
    for h in servers {
        let target = if spread { h.as_str() } else { "s1" };
        let url = format!("https://{}:{API_PORT}", host_ip(target));
        let kc = lab.kubeconfig(h);
        let c = hosts.get(h).run(async move {
            let c = client(kc, Some(url)).await?;
            let api: Api<Namespace> = Api::all(c.clone());
            let mut warm = JoinSet::new();
            for _ in 0..per_client {
                let api = api.clone();
                warm.spawn(async move { api.get(WRITE_NS).await });
            }
            while let Some(r) = warm.join_next().await {
                r?.context("warming up the client")?;
            }
            Ok::<_, anyhow::Error>(c)
        })?;
        clients.push(c);
    }
    let shared = Arc::new(Shared::default());
    let count = s.objects;
    let cpu0 = Cpu::now(lab);
    let start = Instant::now();
    let deadline = start + WRITE_LIMIT;
    let mut waits = Vec::new();
    for w in 0..s.writers {
        let j = w % servers.len();
        let api: Api<Secret> = Api::namespaced(clients[j].clone(), WRITE_NS);
        let shared = shared.clone();
        waits.push(hosts.get(&servers[j]).handle().spawn(async move {
            let pp = PostParams::default();
            let data = "x".repeat(SECRET_BYTES);
            while Instant::now() < deadline {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {"name": format!("w{seq}-{i:06}")},
                    "stringData": {"v": data},
                }))
                .expect("a valid Secret");
                let t = Instant::now();
                let r = api
                    .create(&pp, &secret)
                    .await
                    .map(|_| ())
                    .map_err(Into::into);
                shared.record(t, r);
            }
        }));
    }
    wait_all(hosts.get("s1"), waits);
    let mut phase = shared.phase(start.elapsed());
    phase.cpu = Some(Cpu::now(lab).since(cpu0));
    Ok(phase)
}

/// Wait for tasks on any runtime (from this thread, which only waits).
fn wait_all(on: &HostRt, waits: Vec<tokio::task::JoinHandle<()>>) {
    on.run(async move {
        for w in waits {
            let _ = w.await;
        }
    });
}

/// etcd's put rate: one client per server namespace on its own member.
fn etcd_phase(s: &Settings, lab: &Lab, hosts: &Hosts, servers: &[String]) -> Result<Phase> {
    let mut clients = Vec::new();
    for h in servers {
        let endpoint = format!("http://{}:{ETCD_PORT}", host_ip(h));
        let c = hosts.get(h).run(async move {
            let mut c = etcd_client::Client::connect([endpoint.clone()], None)
                .await
                .with_context(|| format!("connecting to etcd at {endpoint}"))?;
            c.put("/fairlead-bench/warm", "x", None).await?;
            Ok::<_, anyhow::Error>(c)
        })?;
        clients.push(c);
    }
    let shared = Arc::new(Shared::default());
    let count = s.objects;
    let cpu0 = Cpu::now(lab);
    let start = Instant::now();
    let deadline = start + WRITE_LIMIT;
    let mut waits = Vec::new();
    for w in 0..s.writers {
        let j = w % servers.len();
        let mut kv = clients[j].kv_client();
        let shared = shared.clone();
        waits.push(hosts.get(&servers[j]).handle().spawn(async move {
            let value = vec![b'x'; ETCD_VALUE_BYTES];
            while Instant::now() < deadline {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let r = tokio::time::timeout(
                    API_TIMEOUT,
                    kv.put(format!("/fairlead-bench/{i:06}"), value.clone(), None),
                )
                .await
                .map_err(|_| anyhow::anyhow!("put timed out"))
                .and_then(|r| r.map(|_| ()).map_err(Into::into));
                shared.record(t, r);
            }
        }));
    }
    wait_all(hosts.get("s1"), waits);
    let mut phase = shared.phase(start.elapsed());
    phase.cpu = Some(Cpu::now(lab).since(cpu0));
    Ok(phase)
}

// ---------------------------------------------------------------------------
// Summary

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// "p50 / p99 / max" of `v`.
fn triple(v: &[f64]) -> String {
    let mut v = v.to_vec();
    let (p50, p99, max) = (
        common::pct(&mut v, 0.50),
        common::pct(&mut v, 0.99),
        common::pct(&mut v, 1.0),
    );
    format!("{} / {} / {}", fmt_ms(p50), fmt_ms(p99), fmt_ms(max))
}

fn print_summary(
    s: &Settings,
    latency: &[(String, Result<Latency, String>)],
    solo: &[(String, Result<Latency, String>)],
    writes: Option<&Result<Writes, String>>,
) {
    println!("\n==== summary ====");
    if !latency.is_empty() || !solo.is_empty() {
        println!(
            "\nEndpointSlice POST → a new connection through the ClusterIP answered \
             (ms, p50 / p99 / max over {} rounds; nearest rank):",
            s.rounds
        );
        let mut rows = vec![[
            "mode".to_string(),
            "where".to_string(),
            "slice → traffic".to_string(),
            "Service → programmed".to_string(),
            "rounds".to_string(),
        ]];
        for (mode, r) in latency {
            match r {
                Ok(l) => {
                    for h in &l.hosts {
                        let what = if l.agents.contains(h) {
                            format!("agent {h}")
                        } else {
                            format!("server {h} (took the write)")
                        };
                        rows.push([
                            mode.clone(),
                            what,
                            triple(&l.traffic[h]),
                            triple(&l.programmed[h]),
                            l.max_agents.len().to_string(),
                        ]);
                    }
                    let max_prog: Vec<f64> = (0..l.max_agents.len())
                        .map(|i| {
                            l.agents
                                .iter()
                                .map(|a| l.programmed[a][i])
                                .fold(0.0, f64::max)
                        })
                        .collect();
                    rows.push([
                        mode.clone(),
                        "every agent (max per round)".into(),
                        triple(&l.max_agents),
                        triple(&max_prog),
                        format!(
                            "{}{}",
                            l.max_agents.len(),
                            if l.failed.is_empty() {
                                String::new()
                            } else {
                                format!(" ({} failed)", l.failed.len())
                            }
                        ),
                    ]);
                }
                Err(e) => rows.push([
                    mode.clone(),
                    "lab".into(),
                    format!("FAILED: {}", first_line(e)),
                    String::new(),
                    String::new(),
                ]),
            }
        }
        for (mode, r) in solo {
            match r {
                Ok(l) => rows.push([
                    mode.clone(),
                    "peer: single-node fairlead up".into(),
                    triple(&l.max_agents),
                    triple(&l.programmed["solo"]),
                    l.max_agents.len().to_string(),
                ]),
                Err(e) => rows.push([
                    mode.clone(),
                    "peer: single-node fairlead up".into(),
                    format!("FAILED: {}", first_line(e)),
                    String::new(),
                    String::new(),
                ]),
            }
        }
        print_rows(&rows);
        // Ratios lab (every agent) / peer.
        for (mode, r) in latency {
            let Ok(l) = r else { continue };
            let Some((_, Ok(p))) = solo.iter().find(|(m, _)| m == mode) else {
                continue;
            };
            let (mut a, mut b) = (l.max_agents.clone(), p.max_agents.clone());
            let (a50, a99) = (common::pct(&mut a, 0.5), common::pct(&mut a, 0.99));
            let (b50, b99) = (common::pct(&mut b, 0.5), common::pct(&mut b, 0.99));
            println!(
                "{mode}: every agent / single node: p50 {:.2}x, p99 {:.2}x",
                a50 / b50,
                a99 / b99
            );
        }
    }
    if let Some(w) = writes {
        println!(
            "\nAPI write throughput (Secrets, {} writers, {} objects per phase; rows: all \
             repeats summed):",
            s.writers, s.objects
        );
        match w {
            Ok(w) => {
                let one = total_rate(&w.one);
                let three = total_rate(&w.three);
                let each = |v: &[Phase]| {
                    v.iter()
                        .map(|p| format!("{:.0}", p.rate()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let errors = |v: &[Phase]| v.iter().map(|p| p.errors).sum::<usize>().to_string();
                // fairlead / etcd CPU ms per object over all the phases.
                let cpu = |v: &[Phase]| {
                    let n: usize = v.iter().map(|p| p.ok).sum();
                    let (api, etcd) = v
                        .iter()
                        .filter_map(|p| p.cpu)
                        .fold((0.0, 0.0), |(a, e), c| (a + c.api, e + c.etcd));
                    let ms = |x: f64| x * 1e3 / n.max(1) as f64;
                    format!("{:.3} / {:.3}", ms(api), ms(etcd))
                };
                let mut rows = vec![[
                    "writes".to_string(),
                    "objects/s".to_string(),
                    "each run".to_string(),
                    "errors".to_string(),
                    "vs 1 server".to_string(),
                    "vs etcd put".to_string(),
                    "CPU ms/object fairlead / etcd".to_string(),
                ]];
                let etcd = w.etcd.as_ref().ok().map(Phase::rate);
                let vs_etcd = |r: f64| etcd.map_or("-".into(), |e| format!("{:.2}x", r / e));
                rows.push([
                    "through 1 API server (s1)".into(),
                    format!("{one:.0}"),
                    each(&w.one),
                    errors(&w.one),
                    "1.00x".into(),
                    vs_etcd(one),
                    cpu(&w.one),
                ]);
                rows.push([
                    "through 3 API servers".into(),
                    format!("{three:.0}"),
                    each(&w.three),
                    errors(&w.three),
                    format!("{:.2}x", three / one),
                    vs_etcd(three),
                    cpu(&w.three),
                ]);
                match &w.etcd {
                    Ok(p) => rows.push([
                        "peer: etcd put, 3 members".into(),
                        format!("{:.0}", p.rate()),
                        format!("{:.0}", p.rate()),
                        p.errors.to_string(),
                        "-".into(),
                        "1.00x".into(),
                        cpu(std::slice::from_ref(p)),
                    ]),
                    Err(e) => rows.push([
                        "peer: etcd put, 3 members".into(),
                        format!("FAILED: {}", first_line(e)),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                    ]),
                }
                print_rows(&rows);
            }
            Err(e) => println!("FAILED: {}", first_line(e)),
        }
    }
}

fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or_default();
    match line.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// The bench's namespaces still listed by `ip netns list`.
fn leftover_namespaces(s: &Settings) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let peer = format!("flb-{:x}-", std::process::id());
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&s.name_prefix) || n.starts_with(&peer))
        .map(String::from)
        .collect()
}
