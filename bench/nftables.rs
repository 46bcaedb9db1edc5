//! The nftables proxy (issue 4): its control path at 1,000 to 30,000
//! Services, and its data path against a direct connection and the
//! userspace proxy, in the same run.
//!
//! ```sh
//! cargo bench --bench nftables
//! ```
//!
//! Needs root (network namespaces, nf_tables). Everything that addresses a
//! ClusterIP or a pod IP happens inside network namespaces this bench
//! creates and deletes (`common::Netns`); nothing is programmed or sent
//! outside them.
//!
//! **Control path.** For each size (1,000, 10,000 and 30,000 Services × 10
//! endpoints; `FAIRLEAD_BENCH_SIZES=1000,10000` picks others) a fresh
//! namespace and a fresh child process (this binary again, so each size
//! starts from an empty heap and its RSS is its own) with a 2-worker tokio
//! runtime (what `fairlead node` gets on 2 cores) runs
//! [`NftablesProxy::sync`] from a spawned task:
//!
//! 1. the first sync from scratch (no table yet: the adoption check, the
//!    whole model, one netlink transaction), timed, with the size of the
//!    batch it sent and VmRSS/VmHWM from `/proc/self/status` before the
//!    state was built, after it was built, after the sync, and after
//!    `malloc_trim(0)` (what is in use rather than kept by the allocator);
//! 2. one sync with nothing changed;
//! 3. `FAIRLEAD_BENCH_CHANGES` (100) endpoint changes, each one
//!    [`NftablesProxy::apply`] of that one service port (what the node
//!    daemon's change tracker hands it): a random Service (seeded) loses a
//!    random endpoint, or, if it already lost one, gains a new one;
//! 4. as many new Services (10 endpoints each), each one `apply`;
//! 5. `cleanup()` (deleting the tables).
//!
//! Each change is timed from the call to `apply` until it returns (the
//! kernel has acknowledged the transaction), and must be a partial sync of
//! exactly one service port. Reported: p50/p99/max (nearest rank), the
//! median batch size, and the process's CPU per change split into user
//! space (fairlead: diffing, encoding) and kernel (mostly nf_tables
//! checking and committing the transaction, which runs in the syscall).
//! Services are `scale/svc-N`, ClusterIP 10.96.x.y:80/TCP, endpoints on
//! 10.64.0.0/12 port 8080, all on this node; one in 11 has a NodePort
//! (unique: the NodePort range has 2,768 ports).
//! The issue's targets are printed with the ratio measured/target: one
//! change applied in under 20 ms at 30,000 Services, a full sync of 10,000
//! Services × 10 endpoints in under 2 s.
//!
//! The RSS is this bench's child, not `fairlead node`: it holds the
//! [`ProxyState`] (what the node's change tracker produces) and the
//! proxy's model of the table, but no watch cache of API objects.
//!
//! **Data path.** One namespace with three `fairlead echo` HTTP backends
//! (processes of the `fairlead` binary Cargo builds, as in
//! `bench/userspace.rs`) on 10.244.0.11-13:8080 and the ClusterIP
//! 10.96.0.50, all addresses on the namespace's `lo` (the userspace proxy
//! needs its ClusterIP local; this kernel has no dummy interfaces). The
//! same Service, ClusterIP 10.96.0.50:80 → the 3 backends, is served by
//!
//! * **nftables**: [`NftablesProxy`] programming the namespace (the output
//!   hook DNATs a connection before its socket lookup), and
//! * **userspace**: [`UserspaceProxy`] in this process, on a 2-worker
//!   runtime whose threads entered the namespace (so its listener is there),
//!   listening on 10.96.0.50:80; it gets the traffic whenever the nftables
//!   table is deleted.
//!
//! Both must round-robin over the three backends (checked first, and the
//! userspace proxy's connection counter must not move while nftables
//! serves). Then, for keep-alive and `Connection: close`, back to back:
//! `ip netns exec NS wrk -t2 -c50 -d10s --latency` against one backend
//! directly, the ClusterIP with the nftables table programmed (a full sync
//! before the run), the same among 30,000 other Services (every shard
//! table's NAT chains, and the Service's rule last in its bucket chain:
//! what a connection's first packet costs at that size), and the
//! ClusterIP after `cleanup()` (the userspace proxy). Printed: requests/s, p99, the ratios nftables/direct and
//! nftables/userspace, the userspace proxy's CPU per request and how busy
//! the machine was (wrk, the backends and the proxy share the 2 cores). If
//! `wrk` is missing, the data path is skipped with how to install it.
//!
//! Environment: `FAIRLEAD_BENCH_SIZES` (1000,10000,30000),
//! `FAIRLEAD_BENCH_CHANGES` (100 per kind), `FAIRLEAD_BENCH_PARTS`
//! (control,data), `FAIRLEAD_BENCH_DURATION` (seconds per wrk run, 10),
//! `FAIRLEAD_BENCH_CONNS` (50), `FAIRLEAD_BIN` (the `fairlead` binary).
//! Child processes die with the bench (drop guards, `PR_SET_PDEATHSIG`),
//! and the namespaces are deleted with everything in them.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{
    die_with_parent, env_u64, fairlead_bin, http_get, loadavg, machine_ticks, mib, print_rows,
    threads_cpu, vm_kib, wait_http_ready, which, KillOnDrop, Netns, Proc, WrkResult, WrkSpec,
};
use fairlead::proxy::nftables::{NftablesConfig, NftablesProxy};
use fairlead::proxy::userspace::{UserspaceConfig, UserspaceProxy};
use fairlead::proxy::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Set in the environment of a control-path child: its number of Services.
const CHILD_ENV: &str = "FAIRLEAD_BENCH_NFT_CHILD";
/// The namespace a control-path child programs.
const NETNS_ENV: &str = "FAIRLEAD_BENCH_NFT_NETNS";
/// A control-path child is killed after this long.
const CHILD_LIMIT: Duration = Duration::from_secs(900);
const ENDPOINTS: usize = 10;
const NODE: &str = "node-a";
/// The issue's targets.
const TARGET_FULL_SERVICES: usize = 10_000;
const TARGET_FULL_SECS: f64 = 2.0;
const TARGET_CHANGE_SERVICES: usize = 30_000;
const TARGET_CHANGE_MS: f64 = 20.0;

/// Data path: the backends (name, pod IP).
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("b1", Ipv4Addr::new(10, 244, 0, 11)),
    ("b2", Ipv4Addr::new(10, 244, 0, 12)),
    ("b3", Ipv4Addr::new(10, 244, 0, 13)),
];
const BACKEND_PORT: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const SERVICE_PORT: u16 = 80;
/// The node's own address in the data-path namespace.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// How long a backend may take to answer its first request.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Thread name of the userspace proxy's runtime (≤ 15 bytes).
const PROXY_THREAD: &str = "fl-uproxy";

fn main() -> Result<()> {
    if let Ok(n) = std::env::var(CHILD_ENV) {
        return control_child(
            n.parse().context(CHILD_ENV)?,
            std::env::var(NETNS_ENV).context(NETNS_ENV)?,
            env_u64("FAIRLEAD_BENCH_CHANGES", 100)? as usize,
        );
    }
    let s = Settings::from_env()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fairlead nftables proxy benchmark: {cores} cores, load average at start {}; \
         control path at {} Services x {ENDPOINTS} endpoints ({} changes of each kind); \
         data path wrk -t{} -c{} -d{}s",
        loadavg(),
        s.sizes
            .iter()
            .map(|n| thousands(*n))
            .collect::<Vec<_>>()
            .join(" / "),
        s.changes,
        s.wrk.threads,
        s.wrk.conns,
        s.wrk.secs,
    );
    let started = Instant::now();

    if s.control {
        let mut results = Vec::new();
        for &n in &s.sizes {
            results.push(run_control_child(n, s.changes)?);
        }
        println!();
        print_control(&results);
        println!();
        print_targets(&results);
    }

    if s.data {
        println!();
        match which("wrk") {
            None => println!(
                "SKIPPED the data path: wrk is not installed (Debian: apt-get install wrk)"
            ),
            Some(wrk) => {
                let runs = data_path(&s, &wrk)?;
                println!();
                print_data(&runs);
            }
        }
    }
    println!(
        "\ntotal {:.0?}, load average at end {}",
        started.elapsed(),
        loadavg()
    );
    Ok(())
}

struct Settings {
    sizes: Vec<usize>,
    changes: usize,
    control: bool,
    data: bool,
    wrk: WrkSpec,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let sizes = match std::env::var("FAIRLEAD_BENCH_SIZES") {
            Ok(v) => v
                .split(',')
                .map(|n| n.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("FAIRLEAD_BENCH_SIZES={v:?}"))?,
            Err(_) => vec![1_000, 10_000, 30_000],
        };
        ensure!(
            sizes.iter().all(|n| (1..=60_000).contains(n)),
            "FAIRLEAD_BENCH_SIZES: 1 to 60,000 Services each"
        );
        let parts = std::env::var("FAIRLEAD_BENCH_PARTS").unwrap_or("control,data".into());
        let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
        Ok(Settings {
            sizes,
            changes: env_u64("FAIRLEAD_BENCH_CHANGES", 100)?.clamp(1, 10_000) as usize,
            control: parts.contains(&"control"),
            data: parts.contains(&"data"),
            wrk: WrkSpec {
                threads: 2,
                conns: env_u64("FAIRLEAD_BENCH_CONNS", 50)?.max(2) as u32,
                secs: env_u64("FAIRLEAD_BENCH_DURATION", 10)?.max(1),
            },
        })
    }
}

// ---------------------------------------------------------------------------
// The state

fn spn(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "scale".into(),
        name: name.into(),
        port: "".into(),
        protocol: Protocol::Tcp,
    }
}

fn ep(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(NODE.into()),
    }
}

/// `10.<first>.x.y:8080`, the `n`-th address after 10.<first>.0.0.
fn addr(first: u8, n: usize, port: u16) -> SocketAddr {
    let n = n as u32 + (u32::from(first) << 16);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from((10 << 24) | n)), port)
}

fn info(cluster_ip: SocketAddr, endpoints: Vec<Endpoint>) -> ServicePortInfo {
    ServicePortInfo {
        cluster_ips: vec![cluster_ip.ip()],
        port: cluster_ip.port(),
        node_port: None,
        external_ips: vec![],
        app_protocol: None,
        affinity_timeout: None,
        internal_local: false,
        external_local: false,
        endpoints,
    }
}

/// `services` × `endpoints`: `scale/svc-N`, ClusterIP 10.96.x.y:80,
/// endpoints from 10.64.0.0 on port 8080; one in 11 with a NodePort.
fn scale_state(services: usize, endpoints: usize) -> ProxyState {
    let mut st = ProxyState::new();
    for i in 0..services {
        let mut eps: Vec<Endpoint> = (0..endpoints)
            .map(|j| ep(addr(64, i * endpoints + j, 8080)))
            .collect();
        eps.sort();
        let mut info = info(addr(96, i, 80), eps);
        if i.is_multiple_of(11) && i / 11 < 2768 {
            info.node_port = Some(30000 + (i / 11) as u16);
        }
        st.insert(spn(&format!("svc-{i}")), Arc::new(info));
    }
    st
}

// ---------------------------------------------------------------------------
// Control path

/// What one control-path child measured.
#[derive(Debug, Serialize, Deserialize)]
struct Control {
    services: usize,
    full_secs: f64,
    full_batch_bytes: usize,
    full_chains: usize,
    full_rules: usize,
    full_elements: usize,
    /// VmRSS (KiB) before the state was built, after, and after the sync.
    rss_start: u64,
    rss_state: u64,
    rss_full: u64,
    /// VmHWM (KiB) after the full sync.
    hwm_full: u64,
    /// VmRSS (KiB) after the full sync and `malloc_trim(0)`: what is in
    /// use rather than kept by the allocator.
    rss_trimmed: u64,
    noop_ms: f64,
    endpoint_ms: Vec<f64>,
    endpoint_bytes: Vec<usize>,
    /// CPU of the whole process over all endpoint changes, in user space
    /// and in the kernel (the transaction's commit runs in the syscall).
    endpoint_cpu: Cpu,
    service_ms: Vec<f64>,
    service_bytes: Vec<usize>,
    service_cpu: Cpu,
    cleanup_ms: f64,
}

/// User and system CPU seconds (getrusage of this process).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn now() -> Cpu {
        // SAFETY: getrusage writes into the struct we pass and nothing else.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return Cpu::default();
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Cpu {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user - before.user,
            sys: self.sys - before.sys,
        }
    }
}

/// The parent side: a namespace and a child for `services`.
fn run_control_child(services: usize, changes: usize) -> Result<Control> {
    let ns = Netns::new()?;
    println!(
        "control path, {} Services x {ENDPOINTS} endpoints (netns {}):",
        thousands(services),
        ns.name
    );
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(CHILD_ENV, services.to_string())
        .env(NETNS_ENV, &ns.name)
        .env("FAIRLEAD_BENCH_CHANGES", changes.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = KillOnDrop(cmd.spawn().context("starting the control-path child")?);
    let stdout = child.0.stdout.take().context("child stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + CHILD_LIMIT;
    let mut result = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => match line.strip_prefix("RESULT ") {
                Some(json) => result = Some(serde_json::from_str::<Control>(json)?),
                None => println!("  {line}"),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the {services}-Service child did not finish in {CHILD_LIMIT:?}")
            }
        }
    }
    let status = child.0.wait()?;
    ensure!(status.success(), "the {services}-Service child: {status}");
    drop(ns);
    result.context("the child printed no RESULT line")
}

/// The child side: a 2-worker runtime, all the work on a spawned task.
fn control_child(services: usize, netns: String, changes: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(rt.spawn(control(services, netns, changes)))??;
    println!("RESULT {}", serde_json::to_string(&r)?);
    Ok(())
}

async fn control(services: usize, netns: String, changes: usize) -> Result<Control> {
    let rss_start = vm_kib("VmRSS");
    let mut st = scale_state(services, ENDPOINTS);
    let rss_state = vm_kib("VmRSS");
    let proxy = NftablesProxy::new(NftablesConfig {
        netns: Some(netns),
        node_name: NODE.into(),
        ..Default::default()
    });

    let t = Instant::now();
    let full = proxy.sync(&st).await?;
    let full_secs = t.elapsed().as_secs_f64();
    ensure!(full.full && !full.adopted, "first sync: {full:?}");
    let (rss_full, hwm_full) = (vm_kib("VmRSS"), vm_kib("VmHWM"));
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let rss_trimmed = vm_kib("VmRSS");
    println!(
        "full sync {full_secs:.3} s: {} chains, {} rules, {} map/set elements, batch {:.1} MB; \
         VmRSS {:.1} MiB (state {:.1}, proxy {:.1}), VmHWM {:.1} MiB",
        full.script.chains_added,
        full.script.rules_added,
        full.script.elements_added,
        full.batch_bytes as f64 / 1e6,
        mib(rss_full),
        mib(rss_state.saturating_sub(rss_start)),
        mib(rss_full.saturating_sub(rss_state)),
        mib(hwm_full),
    );

    let t = Instant::now();
    let noop = proxy.sync(&st).await?;
    let noop_ms = ms(t);
    ensure!(
        noop.services_changed == 0 && noop.batch_bytes == 0,
        "a sync with nothing changed did something: {noop:?}"
    );

    // Endpoint changes.
    let mut rng = StdRng::seed_from_u64(services as u64);
    let mut added = 0;
    let (mut endpoint_ms, mut endpoint_bytes) = (Vec::new(), Vec::new());
    let cpu = Cpu::now();
    for _ in 0..changes {
        let key = spn(&format!("svc-{}", rng.random_range(0..services)));
        let mut info = (*st[&key]).clone();
        if info.endpoints.len() == ENDPOINTS {
            info.endpoints.remove(rng.random_range(0..ENDPOINTS));
        } else {
            info.endpoints.push(ep(addr(80, added, 8080)));
            info.endpoints.sort();
            added += 1;
        }
        let info = Arc::new(info);
        st.insert(key.clone(), info.clone());
        // What the node daemon does: only the changed service port.
        let t = Instant::now();
        let s = proxy.apply(&[(key, Some(info))]).await?;
        endpoint_ms.push(ms(t));
        ensure!(
            !s.full && s.fallbacks == 0 && s.services_changed == 1,
            "endpoint change: {s:?}"
        );
        endpoint_bytes.push(s.batch_bytes);
    }
    let endpoint_cpu = Cpu::now().since(cpu);

    // New Services.
    let (mut service_ms, mut service_bytes) = (Vec::new(), Vec::new());
    let mut shards = full.shards;
    let cpu = Cpu::now();
    for k in 0..changes {
        let eps = (0..ENDPOINTS)
            .map(|j| ep(addr(90, k * ENDPOINTS + j, 8080)))
            .collect();
        let key = spn(&format!("new-{k}"));
        let new = Arc::new(info(addr(100, k, 80), eps));
        st.insert(key.clone(), new.clone());
        let t = Instant::now();
        let s = proxy.apply(&[(key, Some(new))]).await?;
        if s.full && s.shards > shards {
            // The Services outgrew the tables (a size just under a power
            // of two times the shard size): every table was rebuilt. Not a
            // one-Service cost; reported on its own.
            println!(
                "  new Service {k}: the tables grew from {shards} to {}: a full sync of {:.3} s",
                s.shards,
                ms(t) / 1000.0
            );
            shards = s.shards;
            continue;
        }
        service_ms.push(ms(t));
        ensure!(
            !s.full && s.fallbacks == 0 && s.services_changed == 1,
            "new Service: {s:?}"
        );
        service_bytes.push(s.batch_bytes);
    }
    let service_cpu = Cpu::now().since(cpu);
    println!(
        "{changes} endpoint changes: p50 {:.2} ms, max {:.2} ms; {changes} new Services: \
         p50 {:.2} ms, max {:.2} ms",
        percentile(&endpoint_ms, 0.5),
        percentile(&endpoint_ms, 1.0),
        percentile(&service_ms, 0.5),
        percentile(&service_ms, 1.0),
    );

    let t = Instant::now();
    proxy.cleanup().await?;
    let cleanup_ms = ms(t);

    Ok(Control {
        services,
        full_secs,
        full_batch_bytes: full.batch_bytes,
        full_chains: full.script.chains_added,
        full_rules: full.script.rules_added,
        full_elements: full.script.elements_added,
        rss_start,
        rss_state,
        rss_full,
        hwm_full,
        rss_trimmed,
        noop_ms,
        endpoint_ms,
        endpoint_bytes,
        endpoint_cpu,
        service_ms,
        service_bytes,
        service_cpu,
        cleanup_ms,
    })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Nearest-rank percentile (`p` in 0..=1) of `v`.
fn percentile<T: Copy + PartialOrd>(v: &[T], p: f64) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn print_control(results: &[Control]) {
    type Cell = fn(&Control) -> String;
    let rows_spec: [(&str, Cell); 19] = [
        ("full sync from scratch, s", |c| {
            format!("{:.3}", c.full_secs)
        }),
        ("  batch, MB", |c| {
            format!("{:.1}", c.full_batch_bytes as f64 / 1e6)
        }),
        ("  chains / rules", |c| {
            format!("{} / {}", thousands(c.full_chains), thousands(c.full_rules))
        }),
        ("  map and set elements", |c| thousands(c.full_elements)),
        ("VmRSS after the full sync, MiB", |c| {
            format!("{:.1}", mib(c.rss_full))
        }),
        ("  ProxyState (input), MiB", |c| {
            format!("{:.1}", mib(c.rss_state.saturating_sub(c.rss_start)))
        }),
        ("  growth in the full sync, MiB", |c| {
            format!("{:.1}", mib(c.rss_full.saturating_sub(c.rss_state)))
        }),
        ("  VmHWM, MiB", |c| format!("{:.1}", mib(c.hwm_full))),
        ("  after malloc_trim(0), MiB", |c| {
            format!("{:.1}", mib(c.rss_trimmed))
        }),
        ("sync with nothing changed, ms", |c| {
            format!("{:.2}", c.noop_ms)
        }),
        ("one endpoint change p50, ms", |c| {
            format!("{:.2}", percentile(&c.endpoint_ms, 0.5))
        }),
        ("  p99 / max, ms", |c| {
            format!(
                "{:.2} / {:.2}",
                percentile(&c.endpoint_ms, 0.99),
                percentile(&c.endpoint_ms, 1.0)
            )
        }),
        ("  batch (median), bytes", |c| {
            thousands(percentile(&c.endpoint_bytes, 0.5))
        }),
        ("  CPU user / kernel, ms per change", |c| {
            per_change(c.endpoint_cpu, c.endpoint_ms.len())
        }),
        ("one new Service p50, ms", |c| {
            format!("{:.2}", percentile(&c.service_ms, 0.5))
        }),
        ("  p99 / max, ms", |c| {
            format!(
                "{:.2} / {:.2}",
                percentile(&c.service_ms, 0.99),
                percentile(&c.service_ms, 1.0)
            )
        }),
        ("  batch (median), bytes", |c| {
            thousands(percentile(&c.service_bytes, 0.5))
        }),
        ("  CPU user / kernel, ms per change", |c| {
            per_change(c.service_cpu, c.service_ms.len())
        }),
        ("cleanup (delete the table), ms", |c| {
            format!("{:.1}", c.cleanup_ms)
        }),
    ];
    let changes = results.first().map_or(0, |c| c.endpoint_ms.len());
    println!(
        "control path (Services x {ENDPOINTS} endpoints, {changes} changes of each kind, \
         one sync each):"
    );
    // One column per size.
    let mut rows: Vec<Vec<String>> = vec![std::iter::once("Services".to_string())
        .chain(results.iter().map(|c| thousands(c.services)))
        .collect()];
    for (label, cell) in rows_spec {
        rows.push(
            std::iter::once(label.to_string())
                .chain(results.iter().map(cell))
                .collect(),
        );
    }
    print_table(&rows);
}

fn per_change(cpu: Cpu, n: usize) -> String {
    let n = n.max(1) as f64;
    format!("{:.2} / {:.2}", cpu.user * 1e3 / n, cpu.sys * 1e3 / n)
}

/// [`print_rows`] for rows of any (equal) length.
fn print_table(rows: &[Vec<String>]) {
    match rows.first().map(Vec::len) {
        Some(2) => print_rows(&fixed::<2>(rows)),
        Some(3) => print_rows(&fixed::<3>(rows)),
        Some(4) => print_rows(&fixed::<4>(rows)),
        Some(5) => print_rows(&fixed::<5>(rows)),
        _ => {
            for r in rows {
                println!("{}", r.join("  "));
            }
        }
    }
}

fn fixed<const N: usize>(rows: &[Vec<String>]) -> Vec<[String; N]> {
    rows.iter()
        .map(|r| std::array::from_fn(|i| r.get(i).cloned().unwrap_or_default()))
        .collect()
}

fn print_targets(results: &[Control]) {
    let at = |n: usize| results.iter().find(|c| c.services == n);
    let mut rows = vec![[
        "issue 4 target",
        "measured",
        "target",
        "measured/target",
        "",
    ]
    .map(String::from)];
    let mut row = |what: String, measured: Option<f64>, target: f64, unit: &str| {
        let (m, ratio, verdict) = match measured {
            Some(m) => (
                format!("{m:.3} {unit}"),
                format!("{:.3}", m / target),
                if m < target { "met" } else { "MISSED" }.to_string(),
            ),
            None => ("-".into(), "-".into(), "not measured".into()),
        };
        rows.push([what, m, format!("{target} {unit}"), ratio, verdict]);
    };
    let full = format!(
        "full sync, {} Services x {ENDPOINTS} endpoints",
        thousands(TARGET_FULL_SERVICES)
    );
    row(
        full,
        at(TARGET_FULL_SERVICES).map(|c| c.full_secs),
        TARGET_FULL_SECS,
        "s",
    );
    let big = thousands(TARGET_CHANGE_SERVICES);
    type Pick = fn(&Control) -> &[f64];
    let kinds: [(&str, Pick); 2] = [
        ("one endpoint change", |c| &c.endpoint_ms),
        ("one new Service", |c| &c.service_ms),
    ];
    for (what, pick) in kinds {
        for (p, label) in [(0.99, "p99"), (1.0, "max")] {
            row(
                format!("{what} at {big} Services, {label}"),
                at(TARGET_CHANGE_SERVICES).map(|c| percentile(pick(c), p)),
                TARGET_CHANGE_MS,
                "ms",
            );
        }
    }
    print_rows(&rows);
}

// ---------------------------------------------------------------------------
// Data path

/// One wrk run and what the machine did meanwhile.
struct Run {
    wrk: WrkResult,
    /// CPU seconds of the userspace proxy's threads.
    userspace_cpu: f64,
    /// Fraction of all cores busy.
    busy: f64,
}

/// (scenario, target) → run.
type Runs = BTreeMap<(&'static str, &'static str), Run>;

fn data_path(s: &Settings, wrk: &Path) -> Result<Runs> {
    let fairlead = fairlead_bin()?;
    let ns = Netns::new()?;
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-nftables")
        .tempdir()?;
    println!(
        "data path (netns {}): backends {}, ClusterIP {CLUSTER_IP}:{SERVICE_PORT}; wrk {}",
        ns.name,
        BACKENDS
            .iter()
            .map(|(n, ip)| format!("{n}={ip}:{BACKEND_PORT}"))
            .collect::<Vec<_>>()
            .join(" "),
        wrk.display()
    );
    for (_, ip) in BACKENDS {
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    }
    ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    ns.ip(&["addr", "add", &format!("{CLUSTER_IP}/32"), "dev", "lo"])?;

    let mut backends = Vec::new();
    for (name, ip) in BACKENDS {
        let mut cmd = ns.command(&fairlead);
        cmd.arg("echo")
            .args(["--name", name])
            .args(["--bind", &ip.to_string()])
            .args(["--http-port", &BACKEND_PORT.to_string()])
            .env("RUST_LOG", "warn");
        let mut proc = Proc::spawn(
            format!("backend {name}"),
            cmd,
            dir.path().join(format!("{name}.log")),
        )?;
        let a = SocketAddr::new(IpAddr::V4(ip), BACKEND_PORT);
        ns.run(|| wait_http_ready(a, &mut proc, START_LIMIT))?;
        backends.push(proc);
    }
    let endpoints: Vec<Endpoint> = BACKENDS
        .iter()
        .map(|(_, ip)| ep(SocketAddr::new(IpAddr::V4(*ip), BACKEND_PORT)))
        .collect();
    let cluster = SocketAddr::new(IpAddr::V4(CLUSTER_IP), SERVICE_PORT);
    let state: ProxyState = [(
        ServicePortName {
            namespace: "default".into(),
            name: "echo".into(),
            port: "".into(),
            protocol: Protocol::Tcp,
        },
        Arc::new(info(cluster, endpoints)),
    )]
    .into_iter()
    .collect();

    fairlead::metrics::init();
    let userspace = UserspaceInNetns::start(&ns, state.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let nft = NftablesProxy::new(NftablesConfig {
        netns: Some(ns.name.clone()),
        node_name: NODE.into(),
        ..Default::default()
    });

    // Both must round-robin, and nftables must bypass the userspace proxy.
    let round = |label: &str| -> Result<()> {
        let names: Vec<String> = ns.run(|| (0..6).map(|_| http_get(cluster, "/")).collect())?;
        println!("round robin via {label:<9}: {}", names.join(" "));
        for (b, _) in BACKENDS {
            let hits = names.iter().filter(|n| *n == b).count();
            ensure!(hits == 2, "{label} sent {hits} of 6 requests to {b}");
        }
        Ok(())
    };
    let before = proxied_connections();
    rt.block_on(nft.sync(&state))?;
    round("nftables")?;
    ensure!(
        proxied_connections() == before,
        "the userspace proxy saw connections while the nftables table was programmed"
    );
    rt.block_on(nft.cleanup())?;
    round("userspace")?;
    ensure!(
        proxied_connections() >= before + 6.0,
        "the userspace proxy did not count the connections it served"
    );

    let direct = SocketAddr::new(IpAddr::V4(BACKENDS[0].1), BACKEND_PORT);
    let mut runs = Runs::new();
    // The same direct connections with as many tables of idle Services
    // as 30,000 Services get by default (`shards`): every new connection
    // then passes that many NAT chains that do not match it (what sharding
    // costs connections that are not to a Service; a Service's own
    // connection stops at its table's).
    let shards = NftablesConfig::default().shards_for(30_000);
    let idle_proxy = |shard_size: usize| {
        NftablesProxy::new(NftablesConfig {
            netns: Some(ns.name.clone()),
            node_name: NODE.into(),
            table: "fairlead-idle".into(),
            shard_size,
            ..Default::default()
        })
    };
    let (one_table, sharded) = (idle_proxy(1000), idle_proxy(2));
    // `n` plain Services `<prefix>-<i>` of ENDPOINTS endpoints each.
    let plain = |prefix: &'static str, n: usize| {
        (0..n).map(move |i| {
            let eps = (0..ENDPOINTS)
                .map(|j| ep(addr(70, i * ENDPOINTS + j, 8080)))
                .collect();
            (
                spn(&format!("{prefix}-{i}")),
                Arc::new(info(addr(110, i, 80), eps)),
            )
        })
    };
    let idle: ProxyState = plain("idle", 2 * shards as usize).collect();
    // The same Service among 30,000 others (10 endpoints each): every new
    // connection then passes the NAT chains of all the shard tables, and
    // the rules of its bucket chain before its own (named to sort last,
    // so it is last in its bucket after a full sync).
    let big: ProxyState = plain("big", 30_000)
        .chain(state.values().map(|info| {
            (
                ServicePortName {
                    namespace: "zz-last".into(),
                    name: "echo".into(),
                    port: "".into(),
                    protocol: Protocol::Tcp,
                },
                info.clone(),
            )
        }))
        .collect();
    for (scenario, close) in [("keep-alive", false), ("close", true)] {
        for target in [
            "direct",
            "direct+1",
            "direct+K",
            "nftables",
            "nftables@30k",
            "userspace",
        ] {
            // Each direct run to its own backend: a close run leaves its
            // connections' ports in TIME_WAIT toward its destination, and
            // the next run to the same one would pay for the port search.
            let addr = match target {
                "direct" => direct,
                "direct+1" => SocketAddr::new(IpAddr::V4(BACKENDS[1].1), BACKEND_PORT),
                "direct+K" => SocketAddr::new(IpAddr::V4(BACKENDS[2].1), BACKEND_PORT),
                _ => cluster,
            };
            if target == "nftables" {
                let st = rt.block_on(nft.sync(&state))?;
                ensure!(st.full, "nftables: expected the table to be recreated");
            }
            if target == "nftables@30k" {
                let st = rt.block_on(nft.sync(&big))?;
                ensure!(st.full, "nftables: expected the tables to be recreated");
            }
            if target == "direct+1" {
                let st = rt.block_on(one_table.sync(&idle))?;
                ensure!(st.shards == 1, "expected 1 table: {st:?}");
            }
            if target == "direct+K" {
                let st = rt.block_on(sharded.sync(&idle))?;
                ensure!(st.shards == shards, "expected {shards} tables: {st:?}");
            }
            // Each run starts with an empty conntrack table: a close run
            // leaves ~200,000 TIME_WAIT entries for 120 s, and the next
            // run's new connections would be dropped once the table is
            // full (nf_conntrack_max), whatever it measures.
            let flush = ns.command("conntrack").arg("-F").output()?;
            ensure!(
                flush.status.success() || String::from_utf8_lossy(&flush.stderr).contains("0 flow"),
                "conntrack -F: {}",
                String::from_utf8_lossy(&flush.stderr).trim()
            );
            let (cpu0, ticks0) = (threads_cpu(PROXY_THREAD), machine_ticks());
            let w = s.wrk.run(ns.command(wrk), addr, close)?;
            let (cpu1, ticks1) = (threads_cpu(PROXY_THREAD), machine_ticks());
            if target == "nftables" || target == "nftables@30k" {
                rt.block_on(nft.cleanup())?;
            }
            if target == "direct+1" {
                rt.block_on(one_table.cleanup())?;
            }
            if target == "direct+K" {
                rt.block_on(sharded.cleanup())?;
            }
            for b in &mut backends {
                b.check_running()?;
            }
            let run = Run {
                userspace_cpu: cpu1 - cpu0,
                busy: ticks1.0.saturating_sub(ticks0.0) as f64
                    / ticks1.1.saturating_sub(ticks0.1).max(1) as f64,
                wrk: w,
            };
            println!(
                "{scenario:<10} {target:<9} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  \
                 {} requests, {} errors; userspace proxy CPU {:.2} s, machine {:.0}% busy",
                run.wrk.rps,
                run.wrk.p50_ms,
                run.wrk.p99_ms,
                run.wrk.requests,
                run.wrk.errors,
                run.userspace_cpu,
                run.busy * 100.0
            );
            runs.insert((scenario, target), run);
        }
    }
    drop(userspace);
    drop(backends);
    drop(ns);
    Ok(runs)
}

/// `fairlead_proxy_connections_total` of this process (all labels).
fn proxied_connections() -> f64 {
    fairlead::metrics::render()
        .lines()
        .filter(|l| l.starts_with("fairlead_proxy_connections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The userspace proxy on a 2-worker runtime whose threads all entered the
/// namespace; every call into it runs on those threads (a `block_on`
/// future would run on the caller's thread, outside). Shut down on drop.
struct UserspaceInNetns {
    rt: tokio::runtime::Runtime,
    proxy: Arc<UserspaceProxy>,
}

impl UserspaceInNetns {
    fn start(ns: &Netns, state: ProxyState) -> Result<UserspaceInNetns> {
        let file = Arc::new(File::open(ns.path())?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(PROXY_THREAD)
            .on_thread_start(move || {
                if let Err(e) = common::enter(&file) {
                    // A proxy thread outside the namespace would serve the
                    // wrong network: stop here.
                    eprintln!("userspace proxy thread: {e:#}");
                    std::process::abort();
                }
            })
            .enable_all()
            .build()?;
        let proxy = Arc::new(UserspaceProxy::new(UserspaceConfig {
            node_name: NODE.into(),
            manage_addresses: false,
            ..UserspaceConfig::default()
        }));
        let p = proxy.clone();
        let stats = rt.block_on(rt.spawn(async move { p.sync(&state).await }))??;
        ensure!(
            stats.listeners_opened == 1 && stats.bind_errors == 0,
            "the userspace proxy did not bind {CLUSTER_IP}:{SERVICE_PORT}: {stats:?}"
        );
        Ok(UserspaceInNetns { rt, proxy })
    }
}

impl Drop for UserspaceInNetns {
    fn drop(&mut self) {
        let p = self.proxy.clone();
        let _ = self
            .rt
            .block_on(self.rt.spawn(async move { p.shutdown().await }));
    }
}

fn print_data(runs: &Runs) {
    let shards = NftablesConfig::default().shards_for(30_000);
    type Pick = fn(&Run) -> f64;
    let rps: Pick = |r| r.wrk.rps;
    let p99: Pick = |r| r.wrk.p99_ms;
    let metrics: [(&str, &str, Pick, usize); 4] = [
        ("keep-alive", "req/s", rps, 0),
        ("keep-alive", "p99 ms", p99, 2),
        ("close", "req/s", rps, 0),
        ("close", "p99 ms", p99, 2),
    ];
    let mut rows = vec![[
        "scenario",
        "direct",
        "+1 idle table",
        &format!("+{shards} idle tables"),
        "nftables",
        "nftables, 30,000 Services",
        "userspace",
        &format!("{shards} tables/1 table"),
        "nftables/direct",
        "at 30,000/alone",
        "nftables/userspace",
    ]
    .map(String::from)];
    for (scenario, unit, pick, prec) in metrics {
        let get = |t: &str| runs.get(&(scenario, t)).map(pick);
        let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.prec$}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let (d, d1, d64, n, n30, u) = (
            get("direct"),
            get("direct+1"),
            get("direct+K"),
            get("nftables"),
            get("nftables@30k"),
            get("userspace"),
        );
        rows.push([
            format!("{scenario} {unit}"),
            cell(d),
            cell(d1),
            cell(d64),
            cell(n),
            cell(n30),
            cell(u),
            ratio(d64, d1),
            ratio(n, d),
            ratio(n30, n),
            ratio(n, u),
        ]);
    }
    print_rows(&rows);
    let mut cpu = Vec::new();
    for scenario in ["keep-alive", "close"] {
        if let Some(r) = runs.get(&(scenario, "userspace")) {
            cpu.push(format!(
                "{scenario} {:.1} us/req",
                r.userspace_cpu * 1e6 / r.wrk.requests.max(1) as f64
            ));
        }
    }
    let busy: Vec<String> = runs
        .iter()
        .map(|((s, t), r)| format!("{s}/{t} {:.0}%", r.busy * 100.0))
        .collect();
    let errors: u64 = runs.values().map(|r| r.wrk.errors).sum();
    println!(
        "userspace proxy CPU: {}; machine busy: {}; wrk errors over all runs: {errors}",
        cpu.join(", "),
        busy.join(", ")
    );
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
