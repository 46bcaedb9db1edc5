//! Helpers shared by the benches (`mod common;` in each): child processes
//! that die with the bench, network namespaces deleted with it, finding
//! tools, CPU and memory figures from /proc, wrk's output, and tables.
//!
//! Each bench uses a part of this; the rest is dead code to it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

// ---------------------------------------------------------------------------
// Processes

/// Ask the kernel to SIGKILL the child when this process dies (a bench
/// killed by a signal leaves no load generator or server behind).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process with its output in a log file, killed and reaped on
/// drop, and killed by the kernel if this process dies first.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: String, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("{name}: running {:?}", cmd.get_program()))?;
        Ok(Proc { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    /// Fails if the process has exited, quoting the end of its log.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; end of its log:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare child killed and reaped on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Network namespaces

/// A network namespace of the bench's own (`flb-<pid>-<n>`, with `lo`
/// up), for anything that addresses ClusterIPs or pod IPs: such traffic
/// never leaves it. Dropping it SIGKILLs the processes still inside (all
/// started by this bench in it) and deletes it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Create it; needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN).
    pub fn new() -> Result<Netns> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flb-{:x}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running ip (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name} failed (this bench needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <name> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip -n {} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `program` to be run inside the namespace (`ip netns exec`, which
    /// execs it in place: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Run `f` on a thread of its own that entered the namespace (sockets
    /// it opens belong to the namespace); this thread stays where it is.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let ns = File::open(self.path()).with_context(|| self.path().display().to_string())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&ns)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Move the calling thread into the network namespace `ns` (an open
/// `/run/netns/<name>`).
pub fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns(2) on a valid fd; it changes this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes inside this namespace, which this bench started
        // there (never this process: its main thread stays outside).
        let me = std::process::id() as i32;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let pids: Vec<i32> = self.pids().into_iter().filter(|p| *p != me).collect();
            if pids.is_empty() || Instant::now() > end {
                break;
            }
            for pid in pids {
                // SAFETY: plain kill(2) of a pid listed in our namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---------------------------------------------------------------------------
// Tools

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `apt-get install -y` with its output shown; `apt-get update` and one
/// retry if the package lists are stale or missing.
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<bool> {
        println!("$ apt-get {}", args.join(" "));
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("running apt-get (install {} by hand)", pkgs.join(" ")))?;
        Ok(st.success())
    };
    let mut install = vec!["install", "-y"];
    install.extend_from_slice(pkgs);
    if run(&install)? {
        return Ok(());
    }
    if run(&["update"])? && run(&install)? {
        return Ok(());
    }
    bail!("apt-get install {} failed", pkgs.join(" "))
}

/// The `fairlead` binary Cargo built with the bench (or `FAIRLEAD_BIN`).
pub fn fairlead_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("FAIRLEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fairlead")));
    if !bin.is_file() {
        bail!(
            "fairlead binary not found at {}: run `cargo build --release` (or set FAIRLEAD_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// A number from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?}: not a number")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// One `GET path` with `Connection: close`; the body of a 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("bad reply from {addr}: {text:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}: {head}");
    }
    Ok(body.to_string())
}

/// Until `GET /` on `addr` answers (or `proc` dies, or `limit` passes).
pub fn wait_http_ready(addr: SocketAddr, proc: &mut Proc, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        proc.check_running()?;
        match http_get(addr, "/") {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > limit => {
                bail!(
                    "{} not answering on {addr} after {limit:?}: {e:#}\n{}",
                    proc.name,
                    proc.log_tail(20)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------
// CPU and memory from /proc

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
pub fn stat_cpu(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
pub fn threads_cpu(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|e| stat_cpu(&e.path().join("stat").to_string_lossy()))
        .sum()
}

/// (busy, total) jiffies of all cores from `/proc/stat`.
pub fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A field of /proc/self/status in KiB (VmRSS, VmHWM).
pub fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// wrk

/// One wrk run's figures.
#[derive(Debug)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx.
    pub errors: u64,
}

/// How wrk is run.
#[derive(Debug, Clone, Copy)]
pub struct WrkSpec {
    pub threads: u32,
    pub conns: u32,
    pub secs: u64,
}

impl WrkSpec {
    /// Run `cmd` (wrk itself, or a wrapper such as `ip netns exec NS wrk`)
    /// against `http://addr/` with `--latency`, `-H 'Connection: close'`
    /// when `close`.
    pub fn run(&self, mut cmd: Command, addr: SocketAddr, close: bool) -> Result<WrkResult> {
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.conns))
            .arg(format!("-d{}s", self.secs))
            .args(["--latency", "--timeout", "5s"]);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{addr}/")).stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let out = cmd.output().context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk {addr} failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        WrkResult::parse(&text).with_context(|| format!("parsing wrk output:\n{text}"))
    }
}

impl WrkResult {
    pub fn parse(text: &str) -> Result<WrkResult> {
        let mut rps = None;
        let mut p50 = None;
        let mut p99 = None;
        let mut requests = None;
        let mut errors = 0;
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["Requests/sec:", v] => rps = Some(v.parse::<f64>()?),
                ["50%", v] => p50 = Some(duration_ms(v)?),
                ["99%", v] => p99 = Some(duration_ms(v)?),
                [n, "requests", "in", ..] => requests = Some(n.parse::<u64>()?),
                ["Socket", "errors:", rest @ ..] => {
                    // connect 0, read 0, write 0, timeout 0
                    for pair in rest.chunks(2) {
                        if let [_, v] = pair {
                            errors += v.trim_end_matches(',').parse::<u64>()?;
                        }
                    }
                }
                ["Non-2xx", "or", "3xx", "responses:", v] => errors += v.parse::<u64>()?,
                _ => {}
            }
        }
        Ok(WrkResult {
            rps: rps.context("no Requests/sec")?,
            p50_ms: p50.context("no 50% latency")?,
            p99_ms: p99.context("no 99% latency")?,
            requests: requests.context("no request count")?,
            errors,
        })
    }
}

/// wrk's `123.45us` / `1.23ms` / `1.02s` / `1.5m` as milliseconds.
pub fn duration_ms(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {v:?}"))?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => bail!("unknown unit in {v:?}"),
    };
    Ok(num * scale)
}

// ---------------------------------------------------------------------------
// Tables

/// Aligned columns: the first left-aligned, the others right-aligned.
pub fn print_rows<R: AsRef<[String]>>(rows: &[R]) {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut w = vec![0usize; n];
    for r in rows {
        for (c, cell) in r.as_ref().iter().enumerate() {
            w[c] = w[c].max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.as_ref().iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{cell:<width$}", width = w[0]));
            } else {
                line.push_str(&format!("  {cell:>width$}", width = w[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM); 0 if unreadable.
pub fn pid_vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Kubernetes clients (benches that start `fairlead up`)

/// A client for `kubeconfig` once the API server answers a LIST, within
/// `limit` (failing early if `up` exits).
pub async fn api_client(kubeconfig: &Path, up: &mut Proc, limit: Duration) -> Result<kube::Client> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    let end = Instant::now() + limit;
    loop {
        up.check_running()?;
        if let Ok(kc) = kube::config::Kubeconfig::read_from(kubeconfig) {
            if let Ok(cfg) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await {
                let c = kube::Client::try_from(cfg)?;
                let ok = Api::<Pod>::default_namespaced(c.clone())
                    .list(&ListParams::default().limit(1))
                    .await
                    .is_ok();
                if ok {
                    return Ok(c);
                }
            }
        }
        if Instant::now() > end {
            bail!("the API server did not answer within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `p` quantile (0..1] of `v` (sorted in place); NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

// ---------------------------------------------------------------------------
// Probes through a Service (netprog, multinode)

/// A probe's connect, and then its exchange, give up after this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// What a new connection to a ClusterIP got.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An HTTP 200 from the backend of this name.
    Answer(String),
    /// Connection refused (RST to the SYN).
    Refused,
    /// Accepted, then reset or closed without an answer.
    Reset,
    /// No connection within [`PROBE_TIMEOUT`].
    ConnectTimeout,
    /// Connected, but no answer within [`PROBE_TIMEOUT`].
    AnswerTimeout,
    Error(String),
}

impl Outcome {
    /// The outcome without the details (for counting).
    pub fn kind(&self) -> String {
        match self {
            Outcome::Answer(b) => format!("answer {b}"),
            Outcome::Error(e) => format!("error ({e})"),
            o => format!("{o:?}").to_lowercase(),
        }
    }

    pub fn answer(&self) -> Option<&str> {
        match self {
            Outcome::Answer(b) => Some(b),
            _ => None,
        }
    }
}

/// One new connection to `addr`: `GET /` with `Connection: close`.
pub async fn probe(addr: SocketAddr) -> Outcome {
    use std::io::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(addr);
    let conn = match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Err(_) => return Outcome::ConnectTimeout,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Ok(Err(e)) => return Outcome::Error(e.to_string()),
        Ok(Ok(c)) => c,
    };
    let exchange = async move {
        let mut c = conn;
        c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Err(_) => Outcome::AnswerTimeout,
        Ok(Err(e))
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ) =>
        {
            Outcome::Reset
        }
        Ok(Err(e)) => Outcome::Error(e.to_string()),
        Ok(Ok(buf)) if buf.is_empty() => Outcome::Reset,
        Ok(Ok(buf)) => {
            let text = String::from_utf8_lossy(&buf);
            match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.starts_with("HTTP/1.1 200") => {
                    Outcome::Answer(body.trim().to_string())
                }
                _ => Outcome::Error(format!(
                    "unexpected reply {:?}",
                    &text[..text.len().min(80)]
                )),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The userspace proxy in process (userspace, l7)

/// The userspace proxy on its own 2-worker runtime (what `fairlead node`
/// gets on a 2-core machine) with the process-wide Prometheus recorder,
/// serving one service port `frontend` → `backends`; shut down on drop.
pub struct InProcessProxy {
    rt: tokio::runtime::Runtime,
    proxy: fairlead::proxy::userspace::UserspaceProxy,
}

impl InProcessProxy {
    /// Threads are named `thread` (≤ 15 bytes: the kernel's `comm`), for
    /// [`threads_cpu`]. `app`: per-request balancing, or L4.
    pub fn start(
        frontend: SocketAddr,
        backends: &[SocketAddr],
        thread: &str,
        app: Option<fairlead::proxy::AppProtocol>,
    ) -> Result<InProcessProxy> {
        use fairlead::proxy::userspace::{UserspaceConfig, UserspaceProxy};
        use fairlead::proxy::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};
        fairlead::metrics::init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(thread)
            .enable_all()
            .build()?;
        let proxy = UserspaceProxy::new(UserspaceConfig {
            node_name: "bench-node".into(),
            manage_addresses: false,
            // The connection workers' threads share the prefix, so
            // `threads_cpu(thread)` counts them with the accept loops.
            worker_name: thread.into(),
            ..UserspaceConfig::default()
        });
        let name = ServicePortName {
            namespace: "default".into(),
            name: "echo".into(),
            port: "".into(),
            protocol: Protocol::Tcp,
        };
        let mut endpoints: Vec<Endpoint> = backends
            .iter()
            .map(|a| Endpoint {
                addr: *a,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("bench-node".into()),
            })
            .collect();
        endpoints.sort();
        let info = ServicePortInfo {
            cluster_ips: vec![frontend.ip()],
            port: frontend.port(),
            node_port: None,
            external_ips: vec![],
            app_protocol: app,
            affinity_timeout: None,
            internal_local: false,
            external_local: false,
            endpoints,
        };
        let state: ProxyState = [(name, std::sync::Arc::new(info))].into_iter().collect();
        let stats = rt.block_on(proxy.sync(&state))?;
        if stats.listeners_opened != 1 || stats.bind_errors != 0 {
            anyhow::bail!("fairlead proxy did not bind {frontend}: {stats:?}");
        }
        Ok(InProcessProxy { rt, proxy })
    }
}

impl Drop for InProcessProxy {
    fn drop(&mut self) {
        self.rt.block_on(self.proxy.shutdown());
    }
}

/// The median (min-max) of each of fairlead's per-round ratios to a peer
/// (req/s, p99, CPU per request), one line per row label.
pub fn print_medians(rounds: u64, peer: &str, rows: &[(&str, &Vec<[f64; 3]>)]) {
    println!("\nfairlead / {peer}, median (min-max) of {rounds} rounds:");
    for (label, v) in rows {
        let col = |i: usize| {
            let mut x: Vec<f64> = v.iter().map(|r| r[i]).collect();
            x.sort_by(f64::total_cmp);
            format!("{:.2} ({:.2}-{:.2})", x[x.len() / 2], x[0], x[x.len() - 1])
        };
        println!(
            "  {label:<22} req/s {}  p99 {}  CPU/req {}",
            col(0),
            col(1),
            col(2)
        );
    }
}
