//! Userspace proxy data path, measured against HAProxy.
//!
//! ```sh
//! cargo bench --bench userspace
//! ```
//!
//! Installs Debian's `wrk` and `haproxy` with `apt-get install -y` if they
//! are missing (printing apt's output). Everything runs on 127.0.0.0/8:
//!
//! * **Backends**: three `fairlead echo --http-port P --bind 127.0.0.1`
//!   *processes* (the binary Cargo builds with the bench profile;
//!   `FAIRLEAD_BIN` overrides it), each with its own 2-worker tokio runtime,
//!   so the backends do not share a runtime with the proxy under test.
//! * **fairlead**: the userspace proxy runs *in this process* on its own
//!   multi-thread runtime with 2 workers (what the `fairlead` binary gets on
//!   a 2-core machine) and the process-wide Prometheus recorder installed
//!   (so the per-connection counters cost what they cost in `fairlead
//!   node`). One service port, ClusterIP 127.0.0.55:80 → the 3 backends,
//!   strict round robin, `manage_addresses: false` (127.0.0.55 is already
//!   local on `lo`). The bench driver itself is blocking std code on the main
//!   thread, idle while `wrk` runs; the bulk client is one blocking thread.
//! * **HAProxy**: `mode tcp`, `balance roundrobin`, `nbthread 2`, same
//!   backends, listening on 127.0.0.56:80; config in a temp dir, run in the
//!   foreground (`-db`). Default 16 KiB buffers and no splicing, like
//!   fairlead's 16 KiB relay buffers.
//!
//! Scenarios (each against one backend directly, through fairlead, through
//! HAProxy, run back to back):
//!
//! 1. `wrk -t2 -c50 -d10s --latency` keep-alive `GET /` → requests/s, p99.
//! 2. The same with `-H 'Connection: close'`: one TCP connection per request
//!    (for the proxies: accept + upstream connect + teardown per request).
//!    wrk's latency starts after its connect, so p99 excludes the client's
//!    connect but includes the proxy's upstream connect.
//! 3. Bulk: one connection downloads `/bytes?n=N` (1 GiB), best of 2 → MB/s
//!    (10^6 bytes/s), counted from the request until the last body byte.
//!    Also through a **splice relay** (127.0.0.57): a blocking thread per
//!    connection that `splice(2)`s the backend's bytes to the client through
//!    a 1 MiB pipe, with no event loop, balancing or accounting: about the
//!    least a userspace relay can do. `fairlead/relay` separates what the
//!    proxy costs from what the second TCP connection costs the kernel.
//!
//! Besides the table, the CPU time the proxy under test used in each run
//! (fairlead: the threads of its runtime; HAProxy: its process) and how busy
//! the whole machine was are printed: wrk, the backends and the proxy share
//! the cores, so when the machine is ~100% busy the proxy with less CPU per
//! request gets more requests/s.
//!
//! Sizes come from the environment: `FAIRLEAD_BENCH_DURATION` (seconds per
//! wrk run, 10), `FAIRLEAD_BENCH_CONNS` (50), `FAIRLEAD_BENCH_BULK_MB`
//! (MiB per download, 1024), `FAIRLEAD_BENCH_BULK_REPS` (2),
//! `FAIRLEAD_BENCH_SCENARIOS` (`keep-alive,close,bulk`),
//! `FAIRLEAD_BENCH_ROUNDS` (1: with more, the two wrk scenarios are run
//! again, HAProxy first every other round, and the median of each ratio is
//! printed; the machine's speed drifts between runs). A run takes
//! 6 × duration plus a few seconds. Child processes (backends, HAProxy,
//! wrk) are killed when this process ends, panics included (drop guards,
//! plus `PR_SET_PDEATHSIG` for the case it is killed).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{
    apt_install, env_u64, fairlead_bin, free_port, http_get, machine_ticks, print_rows, stat_cpu,
    threads_cpu, wait_http_ready, which, InProcessProxy, Proc, WrkResult, WrkSpec,
};

/// fairlead's "ClusterIP" (local on `lo` like all of 127.0.0.0/8).
const FAIRLEAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 55);
/// HAProxy's frontend address.
const HAPROXY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 56);
/// The splice relay's address (bulk only).
const RELAY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 57);
const SERVICE_PORT: u16 = 80;
const BACKENDS: usize = 3;
/// How long a backend or HAProxy may take to answer its first request.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Thread name of the proxy's runtime (≤ 15 bytes: the kernel's `comm`).
const PROXY_THREAD: &str = "fl-proxy";
/// Read buffer of the bulk client.
const CLIENT_BUF: usize = 256 * 1024;

fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let tools = Tools::ensure()?;
    let fairlead = fairlead_bin()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fairlead userspace proxy benchmark: {cores} cores, wrk -t{} -c{} -d{}s, \
         bulk {} MiB x {} per target",
        s.wrk.threads, s.wrk.conns, s.wrk.secs, s.bulk_mib, s.bulk_reps
    );
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-userspace")
        .tempdir()?;

    // Backends.
    let mut backends = Vec::new();
    for i in 1..=BACKENDS {
        let port = free_port()?;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let mut cmd = Command::new(&fairlead);
        cmd.arg("echo")
            .args(["--name", &format!("b{i}")])
            .args(["--http-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .env("RUST_LOG", "warn");
        let proc = Proc::spawn(
            format!("backend b{i}"),
            cmd,
            dir.path().join(format!("b{i}.log")),
        )?;
        backends.push((addr, proc));
    }
    for (addr, proc) in &mut backends {
        wait_ready(*addr, proc)?;
    }
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|(a, _)| *a).collect();
    println!(
        "backends: {}",
        backend_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // fairlead, in process.
    let fairlead_addr = SocketAddr::new(IpAddr::V4(FAIRLEAD_IP), SERVICE_PORT);
    let proxy = InProcessProxy::start(fairlead_addr, &backend_addrs, PROXY_THREAD, None)?;

    // HAProxy.
    let haproxy_addr = SocketAddr::new(IpAddr::V4(HAPROXY_IP), SERVICE_PORT);
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        haproxy_config(haproxy_addr, &backend_addrs, s.haproxy_splice),
    )?;
    let mut cmd = Command::new(&tools.haproxy);
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut haproxy = Proc::spawn("haproxy".to_string(), cmd, dir.path().join("haproxy.log"))?;
    wait_ready(haproxy_addr, &mut haproxy)?;

    // Both proxies must really round-robin over the 3 backends.
    for (label, addr) in [("fairlead", fairlead_addr), ("haproxy", haproxy_addr)] {
        let names = (0..2 * BACKENDS)
            .map(|_| http_get(addr, "/"))
            .collect::<Result<Vec<_>>>()?;
        println!("round robin via {label:<8}: {}", names.join(" "));
        for i in 1..=BACKENDS {
            let hits = names.iter().filter(|n| **n == format!("b{i}")).count();
            if hits != 2 {
                bail!("{label} sent {hits} of {} requests to b{i}", names.len());
            }
        }
    }

    let targets = [
        Target {
            label: "direct",
            addr: backend_addrs[0],
            cpu: Cpu::None,
        },
        Target {
            label: "fairlead",
            addr: fairlead_addr,
            cpu: Cpu::ProxyThreads,
        },
        Target {
            label: "haproxy",
            addr: haproxy_addr,
            cpu: Cpu::Pid(haproxy.pid()),
        },
    ];

    let mut runs: BTreeMap<(&str, &str), Run> = BTreeMap::new();
    // Per scenario, fairlead's ratios to HAProxy in each round: (req/s,
    // p99, CPU per request).
    let mut ratios: BTreeMap<&str, Vec<[f64; 3]>> = BTreeMap::new();
    for round in 1..=s.rounds {
        for (scenario, close) in [("keep-alive", false), ("close", true)] {
            if !s.runs(scenario) {
                continue;
            }
            // The direct run once; the proxies in turn, in the other order
            // every other round (the machine's speed drifts).
            let mut order: Vec<&Target> = targets
                .iter()
                .filter(|t| round == 1 || t.label != "direct")
                .collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for t in order {
                let before = Sample::take(t.cpu);
                let w = tools.wrk(&s, t.addr, close)?;
                let after = Sample::take(t.cpu);
                check_running(&mut backends, &mut haproxy)?;
                let run = Run {
                    wrk: Some(w),
                    mbps: None,
                    usage: after.since(&before),
                };
                let tag = if s.rounds > 1 {
                    format!(" #{round}")
                } else {
                    String::new()
                };
                println!("{scenario:<10} {:<8}{tag} {}", t.label, run.describe());
                runs.insert((scenario, t.label), run);
            }
            let (Some(f), Some(h)) = (
                runs.get(&(scenario, "fairlead")),
                runs.get(&(scenario, "haproxy")),
            ) else {
                continue;
            };
            let (Some(fw), Some(hw)) = (&f.wrk, &h.wrk) else {
                continue;
            };
            let per_req = |r: &Run, w: &WrkResult| r.usage.proxy_secs / w.requests.max(1) as f64;
            ratios.entry(scenario).or_default().push([
                fw.rps / hw.rps,
                fw.p99_ms / hw.p99_ms,
                per_req(f, fw) / per_req(h, hw),
            ]);
        }
    }
    let bulk_bytes = s.bulk_mib << 20;
    let relay = if s.runs("bulk") {
        Some(Target {
            label: "relay",
            addr: start_splice_relay(SocketAddr::new(IpAddr::V4(RELAY_IP), 0), backend_addrs[0])?,
            cpu: Cpu::None,
        })
    } else {
        None
    };
    for t in targets
        .iter()
        .chain(relay.as_ref())
        .filter(|_| s.runs("bulk"))
    {
        let before = Sample::take(t.cpu);
        let mut best: f64 = 0.0;
        let mut all = Vec::new();
        for _ in 0..s.bulk_reps {
            let mbps = bulk(t.addr, bulk_bytes)?;
            all.push(format!("{mbps:.0}"));
            best = best.max(mbps);
        }
        let after = Sample::take(t.cpu);
        check_running(&mut backends, &mut haproxy)?;
        let run = Run {
            wrk: None,
            mbps: Some(best),
            usage: after.since(&before),
        };
        println!(
            "{:<10} {:<8} {} MB/s (runs: {}), {}",
            "bulk",
            t.label,
            format_args!("{best:.0}"),
            all.join(", "),
            run.usage.describe(bulk_bytes * s.bulk_reps, "GB", 1e9)
        );
        runs.insert(("bulk", t.label), run);
    }

    print_table(&runs);
    print_cpu_table(&runs, bulk_bytes * s.bulk_reps);
    if s.rounds > 1 {
        common::print_medians(
            s.rounds,
            "haproxy",
            &ratios.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        );
    }
    print_metrics();

    drop(proxy);
    drop(haproxy);
    drop(backends);
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings and tools

struct Settings {
    wrk: WrkSpec,
    bulk_mib: u64,
    bulk_reps: u64,
    /// `FAIRLEAD_BENCH_SCENARIOS`: the scenarios to run (comma-separated;
    /// all when unset).
    scenarios: Option<Vec<String>>,
    /// `FAIRLEAD_BENCH_ROUNDS`: the wrk scenarios repeated (the tables
    /// show the last round; the medians of the ratios follow).
    rounds: u64,
    /// `FAIRLEAD_BENCH_HAPROXY_SPLICE=1`: HAProxy with `option
    /// splice-auto` (off by default, like its default build's behaviour).
    haproxy_splice: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            wrk: WrkSpec {
                threads: 2,
                conns: env_u64("FAIRLEAD_BENCH_CONNS", 50)?.max(2) as u32,
                secs: env_u64("FAIRLEAD_BENCH_DURATION", 10)?.max(1),
            },
            bulk_mib: env_u64("FAIRLEAD_BENCH_BULK_MB", 1024)?.max(1),
            bulk_reps: env_u64("FAIRLEAD_BENCH_BULK_REPS", 2)?.max(1),
            scenarios: std::env::var("FAIRLEAD_BENCH_SCENARIOS")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
            haproxy_splice: env_u64("FAIRLEAD_BENCH_HAPROXY_SPLICE", 0)? != 0,
            rounds: env_u64("FAIRLEAD_BENCH_ROUNDS", 1)?.max(1),
        })
    }

    fn runs(&self, scenario: &str) -> bool {
        self.scenarios
            .as_ref()
            .is_none_or(|list| list.iter().any(|s| s == scenario))
    }
}

struct Tools {
    wrk: PathBuf,
    haproxy: PathBuf,
}

impl Tools {
    /// Find `wrk` and `haproxy`; `apt-get install` them if missing.
    fn ensure() -> Result<Tools> {
        let find = || (which("wrk"), which("haproxy"));
        let (wrk, haproxy) = match find() {
            (Some(w), Some(h)) => (w, h),
            _ => {
                apt_install(&["wrk", "haproxy"])?;
                match find() {
                    (Some(w), Some(h)) => (w, h),
                    _ => bail!("wrk and haproxy still missing after apt-get install"),
                }
            }
        };
        let version = Command::new(&haproxy).arg("-v").output()?;
        let version = String::from_utf8_lossy(&version.stdout);
        println!(
            "wrk: {}, haproxy: {} ({})",
            wrk.display(),
            haproxy.display(),
            version.lines().next().unwrap_or("?")
        );
        Ok(Tools { wrk, haproxy })
    }

    fn wrk(&self, s: &Settings, addr: SocketAddr, close: bool) -> Result<WrkResult> {
        s.wrk.run(Command::new(&self.wrk), addr, close)
    }
}

fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr], splice: bool) -> String {
    let splice = if splice {
        "    option splice-auto\n"
    } else {
        ""
    };
    let mut c = format!(
        "global\n\
         \x20   nbthread 2\n\
         \x20   maxconn 4096\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 1s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         {splice}\
         frontend fe\n\
         \x20   bind {listen}\n\
         \x20   default_backend be\n\
         backend be\n\
         \x20   balance roundrobin\n"
    );
    for (i, b) in backends.iter().enumerate() {
        c.push_str(&format!("    server b{} {b}\n", i + 1));
    }
    c
}

// ---------------------------------------------------------------------------
// The proxy under test

/// `fairlead_proxy_*` counters of this process, as a sanity check.
fn print_metrics() {
    let text = fairlead::metrics::render();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("fairlead_proxy_connections_total")
                || l.starts_with("fairlead_proxy_bytes_total")
                || l.starts_with("fairlead_proxy_backend_connect_errors_total")
        })
        .collect();
    println!("\nfairlead proxy metrics:");
    for l in lines {
        println!("  {l}");
    }
}

// ---------------------------------------------------------------------------
// Processes

fn check_running(backends: &mut [(SocketAddr, Proc)], haproxy: &mut Proc) -> Result<()> {
    for (_, p) in backends {
        p.check_running()?;
    }
    haproxy.check_running()
}

/// Until `GET /` on `addr` answers (or `proc` dies, or START_LIMIT).
fn wait_ready(addr: SocketAddr, proc: &mut Proc) -> Result<()> {
    wait_http_ready(addr, proc, START_LIMIT)
}

// ---------------------------------------------------------------------------
// Clients

/// Download `n` bytes from `/bytes?n=` on one connection; MB/s (10^6).
fn bulk(addr: SocketAddr, n: u64) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    write!(s, "GET /bytes?n={n} HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut buf = vec![0u8; CLIENT_BUF];
    let mut head = Vec::new();
    let body_start = loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            bail!("{addr}: EOF before the response head");
        }
        head.extend_from_slice(&buf[..k]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 64 * 1024 {
            bail!("{addr}: response head too long");
        }
    };
    let head_text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    if !head_text.starts_with("http/1.1 200")
        || !head_text.contains(&format!("content-length: {n}\r\n"))
    {
        bail!("{addr}: unexpected response head {head_text:?}");
    }
    let mut got = (head.len() - body_start) as u64;
    while got < n {
        let k = s.read(&mut buf)?;
        if k == 0 {
            bail!("{addr}: EOF after {got} of {n} body bytes");
        }
        got += k as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if got != n {
        bail!("{addr}: {got} body bytes, expected {n}");
    }
    Ok(n as f64 / secs / 1e6)
}

/// A splice relay on `listen` (port 0: any) to `backend`, for bulk
/// downloads: per connection, one thread copies the client's bytes to the
/// backend and another `splice(2)`s the backend's bytes to the client
/// through a pipe, both blocking, each half-closing its writer at EOF. The
/// threads are detached; they end with their connections or the process.
fn start_splice_relay(listen: SocketAddr, backend: SocketAddr) -> Result<SocketAddr> {
    use std::net::{Shutdown, TcpListener};
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || -> std::io::Result<()> {
                let upstream = TcpStream::connect(backend)?;
                client.set_nodelay(true)?;
                upstream.set_nodelay(true)?;
                let (mut c_in, mut u_out) = (client.try_clone()?, upstream.try_clone()?);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut u_out);
                    let _ = u_out.shutdown(Shutdown::Write);
                });
                splice_all(&upstream, &client)?;
                client.shutdown(Shutdown::Write)
            });
        }
    });
    Ok(addr)
}

/// `splice(2)` from `r` to `w` through a 1 MiB pipe until `r`'s EOF,
/// blocking.
fn splice_all(r: &TcpStream, w: &TcpStream) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let chunk = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(1 << 20)).map_or(64 << 10, |n| n as usize);
    loop {
        let n = splice(r, None, &pipe_w, None, chunk, SpliceFFlags::SPLICE_F_MOVE)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= splice(&pipe_r, None, w, None, left, SpliceFFlags::SPLICE_F_MOVE)?;
        }
    }
}

// ---------------------------------------------------------------------------
// CPU accounting

struct Target {
    label: &'static str,
    addr: SocketAddr,
    cpu: Cpu,
}

/// Whose CPU time a run charges to the proxy.
#[derive(Clone, Copy)]
enum Cpu {
    None,
    /// The threads of the in-process proxy runtime.
    ProxyThreads,
    Pid(u32),
}

struct Sample {
    proxy_secs: f64,
    busy_ticks: u64,
    total_ticks: u64,
}

/// What happened between two samples.
struct Usage {
    /// CPU seconds used by the proxy under test.
    proxy_secs: f64,
    /// Fraction of all cores busy.
    machine_busy: f64,
}

impl Sample {
    fn take(cpu: Cpu) -> Sample {
        let proxy_secs = match cpu {
            Cpu::None => 0.0,
            Cpu::ProxyThreads => threads_cpu(PROXY_THREAD),
            Cpu::Pid(pid) => stat_cpu(&format!("/proc/{pid}/stat")).unwrap_or(0.0),
        };
        let (busy_ticks, total_ticks) = machine_ticks();
        Sample {
            proxy_secs,
            busy_ticks,
            total_ticks,
        }
    }

    fn since(&self, before: &Sample) -> Usage {
        let total = self.total_ticks.saturating_sub(before.total_ticks).max(1);
        Usage {
            proxy_secs: self.proxy_secs - before.proxy_secs,
            machine_busy: self.busy_ticks.saturating_sub(before.busy_ticks) as f64 / total as f64,
        }
    }
}

impl Usage {
    fn describe(&self, units: u64, unit: &str, per: f64) -> String {
        if self.proxy_secs > 0.0 {
            format!(
                "proxy CPU {:.2}s ({:.2} s/{unit}), machine {:.0}% busy",
                self.proxy_secs,
                self.proxy_secs / (units as f64 / per),
                self.machine_busy * 100.0
            )
        } else {
            format!("machine {:.0}% busy", self.machine_busy * 100.0)
        }
    }
}

// ---------------------------------------------------------------------------
// Report

struct Run {
    wrk: Option<WrkResult>,
    mbps: Option<f64>,
    usage: Usage,
}

impl Run {
    fn describe(&self) -> String {
        let Some(w) = &self.wrk else {
            return String::new();
        };
        format!(
            "{:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {} requests, {} errors; {}",
            w.rps,
            w.p50_ms,
            w.p99_ms,
            w.requests,
            w.errors,
            self.usage.describe(w.requests, "Mreq", 1e6)
        )
    }
}

fn print_table(runs: &BTreeMap<(&str, &str), Run>) {
    type Pick = fn(&Run) -> Option<f64>;
    let rps: Pick = |r| r.wrk.as_ref().map(|w| w.rps);
    let p99: Pick = |r| r.wrk.as_ref().map(|w| w.p99_ms);
    let mbps: Pick = |r| r.mbps;
    let metrics: [(&str, &str, Pick, usize); 5] = [
        ("keep-alive", "req/s", rps, 0),
        ("keep-alive", "p99 ms", p99, 2),
        ("close", "req/s", rps, 0),
        ("close", "p99 ms", p99, 2),
        ("bulk", "MB/s", mbps, 0),
    ];
    let mut rows = vec![[
        "scenario",
        "direct",
        "fairlead",
        "haproxy",
        "relay",
        "fairlead/haproxy",
        "fairlead/direct",
        "fairlead/relay",
    ]
    .map(String::from)];
    for (scenario, unit, pick, prec) in metrics {
        let get = |t: &str| runs.get(&(scenario, t)).and_then(pick);
        let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.prec$}"));
        let ratio = |to: &str| match (get("fairlead"), get(to)) {
            (Some(f), Some(h)) if h > 0.0 => format!("{:.2}", f / h),
            _ => "-".into(),
        };
        rows.push([
            format!("{scenario} {unit}"),
            cell(get("direct")),
            cell(get("fairlead")),
            cell(get("haproxy")),
            cell(get("relay")),
            ratio("haproxy"),
            ratio("direct"),
            ratio("relay"),
        ]);
    }
    println!();
    print_rows(&rows);
}

fn print_cpu_table(runs: &BTreeMap<(&str, &str), Run>, bulk_bytes: u64) {
    let mut rows = vec![[
        "proxy CPU",
        "fairlead",
        "haproxy",
        "fairlead/haproxy",
        "machine busy f/h",
    ]
    .map(String::from)];
    for scenario in ["keep-alive", "close", "bulk"] {
        let per = |t: &str| -> Option<(f64, f64)> {
            let r = runs.get(&(scenario, t))?;
            let v = match &r.wrk {
                // µs of proxy CPU per request
                Some(w) => r.usage.proxy_secs * 1e6 / w.requests.max(1) as f64,
                // ms of proxy CPU per GB
                None => r.usage.proxy_secs * 1e3 / (bulk_bytes as f64 / 1e9),
            };
            Some((v, r.usage.machine_busy))
        };
        let unit = if scenario == "bulk" {
            "ms/GB"
        } else {
            "us/req"
        };
        let (Some((f, fb)), Some((h, hb))) = (per("fairlead"), per("haproxy")) else {
            continue;
        };
        rows.push([
            format!("{scenario} {unit}"),
            format!("{f:.1}"),
            format!("{h:.1}"),
            if h > 0.0 {
                format!("{:.2}", f / h)
            } else {
                "-".into()
            },
            format!("{:.0}% / {:.0}%", fb * 100.0, hb * 100.0),
        ]);
    }
    println!();
    print_rows(&rows);
}
