//! Per-request balancing of HTTP/2 (`appProtocol: kubernetes.io/h2c`),
//! measured against HAProxy and a direct connection.
//!
//! ```sh
//! cargo bench --bench l7
//! ```
//!
//! Installs Debian's `nghttp2-client` (h2load) and `haproxy` with `apt-get
//! install -y` if they are missing. Everything runs on 127.0.0.0/8:
//!
//! * **Backends**: three `fairlead echo` processes (HTTP/1.1 and h2c),
//!   each logging its requests, which gives the per-backend spread.
//! * **fairlead**: the userspace proxy in this process on a 2-worker
//!   runtime (as `fairlead node` on 2 cores), one service port
//!   127.0.0.57:80 with `appProtocol: kubernetes.io/h2c` → the backends,
//!   each over one multiplexed HTTP/2 connection.
//! * **HAProxy**: `mode http`, `bind ... proto h2`, `balance roundrobin`,
//!   servers `proto h2`, `nbthread 2`, on 127.0.0.58:80.
//! * **direct**: h2load to one backend.
//!
//! Two client shapes, each against the three targets back to back: `h2load
//! -c1 -m100` (one connection, 100 concurrent streams) and `-c10 -m10`,
//! `FAIRLEAD_BENCH_REQUESTS` requests each (default 100,000), repeated
//! `FAIRLEAD_BENCH_ROUNDS` times (default 1; with more, the median ratios
//! to HAProxy are printed too: this machine's speed drifts between runs,
//! so only same-round ratios compare). Printed:
//! requests/s, the p99 of h2load's per-request times (its `--log-file`), the
//! requests each backend got, the ratios to HAProxy, and the proxy's CPU
//! per request (fairlead: its event loops' threads; HAProxy: its process).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::{
    apt_install, env_u64, fairlead_bin, free_port, pct, print_rows, stat_cpu, threads_cpu, which,
    InProcessProxy, Proc,
};
use fairlead::proxy::AppProtocol;

const FAIRLEAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 57);
const HAPROXY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 58);
const PORT: u16 = 80;
const BACKENDS: usize = 3;

fn main() -> Result<()> {
    // As in the `fairlead` binary: a subscriber, info and up (without one,
    // every span of the HTTP/2 library goes through `log`).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let requests = env_u64("FAIRLEAD_BENCH_REQUESTS", 100_000)?.max(1000);
    let rounds = env_u64("FAIRLEAD_BENCH_ROUNDS", 1)?.max(1);
    let (h2load, haproxy) = tools()?;
    let fairlead = fairlead_bin()?;
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-l7")
        .tempdir()?;
    let mut backends = Vec::new();
    for i in 1..=BACKENDS {
        let port = free_port()?;
        let mut cmd = Command::new(&fairlead);
        cmd.arg("echo")
            .args(["--name", &format!("b{i}"), "--log-requests"])
            .args(["--http-port", &port.to_string(), "--bind", "127.0.0.1"])
            .env("RUST_LOG", "warn");
        let log = dir.path().join(format!("b{i}.log"));
        let p = Proc::spawn(format!("backend b{i}"), cmd, log.clone())?;
        backends.push((SocketAddr::from((Ipv4Addr::LOCALHOST, port)), p, log));
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.0).collect();
    for a in &addrs {
        wait_listening(*a)?;
    }

    let proxy = InProcessProxy::start(
        SocketAddr::from((FAIRLEAD_IP, PORT)),
        &addrs,
        "fl-proxy",
        Some(AppProtocol::H2c),
    )?;
    let cfg = dir.path().join("haproxy.cfg");
    let ha_addr = SocketAddr::from((HAPROXY_IP, PORT));
    std::fs::write(&cfg, haproxy_config(ha_addr, &addrs))?;
    let mut cmd = Command::new(&haproxy);
    cmd.args(["-db", "-f"]).arg(&cfg);
    let ha = Proc::spawn("haproxy".into(), cmd, dir.path().join("haproxy.log"))?;
    let ha_stat = format!("/proc/{}/stat", ha.pid());
    wait_listening(ha_addr)?;

    println!(
        "fairlead L7 (h2c) benchmark: {} cores, h2load, {requests} requests per run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let targets = [
        ("fairlead", SocketAddr::from((FAIRLEAD_IP, PORT))),
        ("haproxy", ha_addr),
        ("direct", addrs[0]),
    ];
    let mut rows = vec![[
        "shape".to_string(),
        "target".into(),
        "req/s".into(),
        "p99 ms".into(),
        "per backend".into(),
        "req/s vs haproxy".into(),
        "p99 vs haproxy".into(),
        "proxy CPU us/req".into(),
    ]];
    // Per shape, the ratios to HAProxy of every round: (req/s, p99, CPU).
    let mut ratios: Vec<(&str, Vec<[f64; 3]>)> = Vec::new();
    for round in 1..=rounds {
        for (shape, c, m) in [
            ("1 conn x 100 streams", 1, 100),
            ("10 conns x 10 streams", 10, 10),
        ] {
            let shape_label = if rounds > 1 {
                format!("{shape} #{round}")
            } else {
                shape.to_string()
            };
            let mut results = Vec::new();
            // fairlead and HAProxy in turn, HAProxy first every other round.
            let mut order = targets;
            if round % 2 == 0 {
                order.swap(0, 1);
            }
            for (label, addr) in order {
                // The proxy's CPU: fairlead's loop threads, HAProxy's process.
                let cpu = || match label {
                    "fairlead" => Some(threads_cpu("fl-proxy")),
                    "haproxy" => stat_cpu(&ha_stat),
                    _ => None,
                };
                let before = counts(&backends)?;
                let cpu_before = cpu();
                let r = run_h2load(&h2load, dir.path(), addr, requests, c, m)?;
                let cpu_used = cpu().zip(cpu_before).map(|(a, b)| a - b);
                let after = counts(&backends)?;
                let spread: Vec<String> = before
                    .iter()
                    .zip(&after)
                    .map(|(b, a)| (a - b).to_string())
                    .collect();
                results.push((label, r, spread.join("/"), cpu_used));
            }
            if round % 2 == 0 {
                results.swap(0, 1);
            }
            let ha = results[1].1;
            let per_req = |cpu: Option<f64>| cpu.map(|s| s * 1e6 / requests as f64);
            if let (Some(f), Some(h)) = (per_req(results[0].3), per_req(results[1].3)) {
                let r = [results[0].1 .0 / ha.0, results[0].1 .1 / ha.1, f / h];
                match ratios.iter_mut().find(|(s, _)| *s == shape) {
                    Some((_, v)) => v.push(r),
                    None => ratios.push((shape, vec![r])),
                }
            }
            for (label, (rps, p99), spread, cpu) in results {
                rows.push([
                    shape_label.clone(),
                    label.to_string(),
                    format!("{rps:.0}"),
                    format!("{p99:.2}"),
                    spread,
                    format!("{:.2}", rps / ha.0),
                    format!("{:.2}", p99 / ha.1),
                    per_req(cpu).map_or("-".into(), |us| format!("{us:.1}")),
                ]);
            }
        }
    }
    print_rows(&rows);
    if rounds > 1 {
        common::print_medians(
            rounds,
            "haproxy",
            &ratios.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        );
    }
    println!("targets: req/s >= 1.0x haproxy, p99 <= 1.0x haproxy");
    drop(proxy);
    Ok(())
}

/// (requests/s, p99 ms) of one h2load run.
fn run_h2load(
    h2load: &Path,
    dir: &Path,
    addr: SocketAddr,
    n: u64,
    conns: u32,
    streams: u32,
) -> Result<(f64, f64)> {
    let log = dir.join("h2load.log");
    let out = Command::new(h2load)
        .args(["-n", &n.to_string(), "-c", &conns.to_string()])
        .args(["-m", &streams.to_string(), "-t", "1", "--log-file"])
        .arg(&log)
        .arg(format!("http://{addr}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(&format!("{n} succeeded")) {
        bail!("h2load against {addr} failed:\n{text}");
    }
    // "finished in 2.01s, 49750.12 req/s, 5.12MB/s"
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .context("h2load's req/s")?;
    // Lines: <start µs> <status> <duration µs>.
    let mut times: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    Ok((rps, pct(&mut times, 0.99)))
}

/// Requests each backend logged so far.
fn counts(backends: &[(SocketAddr, Proc, PathBuf)]) -> Result<Vec<usize>> {
    // Give the backends' stdout a moment to reach their log files.
    std::thread::sleep(Duration::from_millis(200));
    backends
        .iter()
        .map(|(_, _, log)| {
            Ok(std::fs::read_to_string(log)?
                .lines()
                .filter(|l| l.starts_with("GET "))
                .count())
        })
        .collect()
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    for _ in 0..150 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on {addr}")
}

fn tools() -> Result<(PathBuf, PathBuf)> {
    let find = || (which("h2load"), which("haproxy"));
    if let (Some(a), Some(b)) = find() {
        return Ok((a, b));
    }
    apt_install(&["nghttp2-client", "haproxy"])?;
    match find() {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!("h2load and haproxy still missing after apt-get install"),
    }
}

fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut c = format!(
        "global\n    nbthread 2\n    maxconn 4096\ndefaults\n    mode http\n    \
         timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
         frontend fe\n    bind {listen} proto h2\n    default_backend be\n\
         backend be\n    balance roundrobin\n"
    );
    for (i, b) in backends.iter().enumerate() {
        c.push_str(&format!("    server b{} {b} proto h2\n", i + 1));
    }
    c
}
