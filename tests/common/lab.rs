//! A cluster of several hosts on one machine, through `scripts/lab`: every
//! host is a network namespace with its own address on a shared bridge
//! (servers `s1..`: an etcd member and `fairlead up`; agents `a1..`:
//! `fairlead join`), as the script's header describes. [`Lab`] starts one
//! and removes it on drop (`scripts/lab down`, which also removes the pods).
//!
//! The test process never sends traffic from the machine's own namespace:
//! [`in_host`] runs code on a thread that entered a host's namespace
//! (setns(2) applies to that thread only, and sockets it opens stay
//! there), and commands run under `nsenter --net`. The client loops a fault
//! test needs ([`ServiceLoad`], [`DnsLoop`], [`Writer`]) record every
//! attempt with its time, so a test can count failures per fault window.

use std::collections::BTreeMap;
use std::io::{Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::cluster::FAIRLEAD;

/// The script (`scripts/lab` of this repository).
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab");

/// The API servers' port.
pub const API_PORT: u16 = 6443;

/// Lines of each log shown when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// A lab: its namespaces, processes and directory exist until it is
/// dropped.
pub struct Lab {
    pub name: String,
    /// The lab's directory (`--dir`): per host its logs, pid files, command
    /// lines and fairlead data directory.
    pub dir: PathBuf,
    pub servers: Vec<String>,
    pub agents: Vec<String>,
    /// Holds `dir` (which the script creates inside it and removes).
    _parent: tempfile::TempDir,
}

impl Lab {
    /// `scripts/lab up` with this test binary's fairlead: `servers` servers
    /// and `agents` agents in proxy mode `mode`, `server_args` more flags of
    /// `fairlead up`, `agent_args` of `fairlead join`. Returns once every
    /// node is Ready (the script waits for that).
    pub fn up(
        mode: &str,
        servers: usize,
        agents: usize,
        server_args: &[&str],
        agent_args: &[&str],
    ) -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Short: the namespaces are `<name>-s1` and so on.
        let name = format!(
            "l{}{}",
            std::process::id() % 1000,
            SEQ.fetch_add(1, Ordering::Relaxed) % 10
        );
        let parent = tempfile::Builder::new()
            .prefix(&format!("fairlead-lab-{name}-"))
            .tempdir()
            .expect("temp dir");
        let lab = Lab {
            dir: parent.path().join("lab"),
            name,
            servers: (1..=servers).map(|i| format!("s{i}")).collect(),
            agents: (1..=agents).map(|i| format!("a{i}")).collect(),
            _parent: parent,
        };
        let dir = lab.dir.display().to_string();
        let (s, a) = (servers.to_string(), agents.to_string());
        let (sargs, aargs) = (server_args.join(" "), agent_args.join(" "));
        let out = Command::new(SCRIPT)
            .args(["up", "--name", &lab.name, "--dir", &dir, "--bin", FAIRLEAD])
            .args(["--proxy-mode", mode, "--servers", &s, "--agents", &a])
            .args(["--server-args", &sargs, "--agent-args", &aargs])
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/lab");
        assert!(
            out.status.success(),
            "scripts/lab up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    /// Every host, servers first.
    pub fn hosts(&self) -> Vec<String> {
        self.servers.iter().chain(&self.agents).cloned().collect()
    }

    /// The network namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    /// A host's data directory (`--data-dir` of its fairlead).
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    /// The admin kubeconfig (s1's).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("s1/kubeconfig")
    }

    /// `https://<server's address>:6443`.
    pub fn api_url(&self, server: &str) -> String {
        format!("https://{}:{API_PORT}", ip(server))
    }

    /// `scripts/lab <command> --name .. --dir .. <args>`.
    pub fn script(&self, command: &str, args: &[&str]) -> Output {
        Command::new(SCRIPT)
            .args([command, "--name", &self.name, "--dir"])
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/lab")
    }

    /// [`Lab::script`], which must succeed.
    pub fn script_ok(&self, command: &str, args: &[&str]) -> String {
        let out = self.script(command, args);
        assert!(
            out.status.success(),
            "scripts/lab {command} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL `component` (`etcd` or `fairlead`) on `host`; returns once it
    /// is gone.
    pub fn kill(&self, host: &str, component: &str) {
        self.script_ok("kill", &[host, component, "KILL"]);
    }

    /// Start `component` on `host` again with its command line; returns
    /// once it is ready (etcd healthy, API server ready, agent healthy).
    pub fn start(&self, host: &str, component: &str) {
        self.script_ok("start", &[host, component]);
    }

    /// Take `host`'s bridge port down: it loses the network.
    pub fn cut(&self, host: &str) {
        self.script_ok("cut", &[host]);
    }

    /// Bring `host`'s bridge port back up.
    pub fn mend(&self, host: &str) {
        self.script_ok("mend", &[host]);
    }

    /// The pid of `component` on `host` if it is running.
    pub fn pid(&self, host: &str, component: &str) -> Option<u32> {
        let pid: u32 =
            std::fs::read_to_string(self.host_dir(host).join(format!("{component}.pid")))
                .ok()?
                .trim()
                .parse()
                .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// `program args...` inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg("--")
            .arg(program);
        cmd
    }

    /// kubectl with the admin kubeconfig, run in s1's namespace, against
    /// the API server of `server`.
    pub fn kubectl_via(&self, server: &str, args: &[&str]) -> Output {
        self.command("s1", "kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--server")
            .arg(self.api_url(server))
            .arg("--request-timeout=10s")
            .args(args)
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"))
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl (is it on PATH?)")
    }

    /// kubectl against s1.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_via("s1", args)
    }

    /// [`Lab::kubectl_via`]'s stdout; panics with its stderr on failure.
    pub fn kubectl_via_ok(&self, server: &str, args: &[&str]) -> String {
        let out = self.kubectl_via(server, args);
        assert!(
            out.status.success(),
            "kubectl {args:?} via {server} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// kubectl against s1, which must succeed.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_via_ok("s1", args)
    }

    /// `kubectl <args> -o json` via `server`, parsed; None when kubectl
    /// fails (the server is down, say).
    pub fn get_json_via(&self, server: &str, args: &[&str]) -> Option<Value> {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl_via(server, &a);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `kubectl <args> -o json` via s1, parsed; panics when kubectl fails.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&a)).expect("kubectl JSON")
    }

    /// `kubectl create -f -` (or another verb) of `doc` via `server`.
    pub fn kubectl_stdin(&self, server: &str, args: &[&str], doc: &str) -> Output {
        let mut cmd = self.command("s1", "kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--server")
            .arg(self.api_url(server))
            .arg("--request-timeout=10s")
            .args(args)
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        super::server::run_with_stdin(cmd, doc)
    }

    /// The names of the Ready nodes, as s1 sees them (None if it cannot).
    pub fn ready_nodes(&self) -> Option<Vec<String>> {
        Some(ready_names(&self.get_json_via("s1", &["get", "nodes"])?))
    }

    /// The end of every log in the lab (etcd's are verbose: fewer lines).
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for host in self.hosts() {
            for comp in ["etcd", "fairlead"] {
                let path = self.host_dir(&host).join(format!("{comp}.log"));
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let n = if comp == "etcd" {
                    LOG_TAIL_LINES / 4
                } else {
                    LOG_TAIL_LINES
                };
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("---- {host}/{comp}.log (tail) ----\n"));
                out.push_str(&lines[lines.len().saturating_sub(n)..].join("\n"));
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
            // Whole logs outlive the lab, for a closer look.
            let keep =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lab-{}-logs", self.name));
            for host in self.hosts() {
                let to = keep.join(&host);
                if std::fs::create_dir_all(&to).is_ok() {
                    for comp in ["etcd", "fairlead"] {
                        let f = format!("{comp}.log");
                        let _ = std::fs::copy(self.host_dir(&host).join(&f), to.join(&f));
                    }
                }
            }
            eprintln!("lab logs kept in {}", keep.display());
        }
        let out = self.script("down", &[]);
        if !out.status.success() {
            eprintln!(
                "scripts/lab down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The address of host `s<i>` (10.251.0.i) or `a<i>` (10.251.0.(100+i)).
pub fn ip(host: &str) -> Ipv4Addr {
    let (kind, i) = host.split_at(1);
    let i: u8 = i.parse().unwrap_or_else(|_| panic!("bad host {host}"));
    match kind {
        "s" => Ipv4Addr::new(10, 251, 0, i),
        "a" => Ipv4Addr::new(10, 251, 0, 100 + i),
        _ => panic!("bad host {host}"),
    }
}

/// The Ready nodes of a `kubectl get nodes -o json` list.
pub fn ready_names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect()
}

// ---- inside a host ---------------------------------------------------------------

/// Run `f` on a new thread inside namespace `ns` (see the module docs).
pub fn in_host<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a namespace fd we hold open; it applies to
        // this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Connect timeout of the clients here: a request to an unreachable pod
/// fails after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Read and write timeout of the clients here.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One `GET /` with `Connection: close` (call it inside a host): the body
/// of a 200 (the echo backend's name), or why not.
pub fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad reply {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status {head:?}"));
    }
    Ok(body.trim().to_string())
}

/// `n` sequential [`http_get`]s from inside `ns`.
pub fn names_from(ns: &str, addr: SocketAddr, n: usize) -> Vec<Result<String, String>> {
    in_host(ns, move || (0..n).map(|_| http_get(addr)).collect())
        .join()
        .expect("client thread")
}

/// `POST path` with a JSON body over plain HTTP/1.0 (call it inside a
/// host): the parsed JSON reply of a 200.
pub fn http_post_json(addr: SocketAddr, path: &str, body: &Value) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad reply {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{head}: {body}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
}

/// The keys under `prefix` as etcd member `server` has them locally: a
/// serializable range (answered by that member alone, without asking the
/// leader) through etcd's JSON gateway, from inside the server's host. So
/// it shows whether that member has caught up.
pub fn etcd_local_keys(lab: &Lab, server: &str, prefix: &str) -> Result<Vec<String>, String> {
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    let req = serde_json::json!({
        "key": b64(prefix.as_bytes()),
        "range_end": b64(&end),
        "serializable": true,
        "keys_only": true,
    });
    let addr = SocketAddr::new(ip(server).into(), 2379);
    let reply = in_host(&lab.ns(server), move || {
        http_post_json(addr, "/v3/kv/range", &req)
    })
    .join()
    .expect("client thread")?;
    Ok(reply["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| kv["key"].as_str())
        .filter_map(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect())
}

/// etcd's `/health` on `server`'s member says it has a leader and serves.
pub fn etcd_healthy(lab: &Lab, server: &str) -> bool {
    let addr = SocketAddr::new(ip(server).into(), 2379);
    in_host(&lab.ns(server), move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        (text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"))
            && text.contains(r#""health":"true""#)
    })
    .join()
    .unwrap_or(false)
}

// ---- client loops -------------------------------------------------------------

/// One attempt of a client loop: when it started and how it ended.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub took: Duration,
    pub result: Result<String, String>,
}

/// The attempts of a loop so far, shared with its thread.
#[derive(Clone, Default)]
pub struct Attempts(Arc<Mutex<Vec<Attempt>>>);

impl Attempts {
    fn push(&self, a: Attempt) {
        self.0.lock().unwrap().push(a);
    }

    /// A copy of every attempt so far.
    pub fn all(&self) -> Vec<Attempt> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// How many succeeded so far.
    pub fn ok(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.result.is_ok())
            .count()
    }

    /// Attempts started in `[from, to)`: (succeeded, failed, the first few
    /// failures).
    pub fn window(&self, from: Instant, to: Instant) -> (usize, usize, Vec<String>) {
        let all = self.0.lock().unwrap();
        let (mut ok, mut failed, mut why) = (0, 0, Vec::new());
        for a in all.iter().filter(|a| a.at >= from && a.at < to) {
            match &a.result {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    if why.len() < 5 {
                        why.push(format!("+{:.2}s: {e}", (a.at - from).as_secs_f64()));
                    }
                }
            }
        }
        (ok, failed, why)
    }

    /// The start of the last failed attempt in `[from, to)`.
    pub fn last_failure(&self, from: Instant, to: Instant) -> Option<Instant> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|a| a.at >= from && a.at < to && a.result.is_err())
            .map(|a| a.at)
            .max()
    }
}

/// A paced loop on its own thread, stopped (and joined) by [`Looper::stop`]
/// or on drop.
pub struct Looper {
    pub attempts: Attempts,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Looper {
    /// Stop the loop and wait for its thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Wait until `more` further attempts have been made (at most
    /// `deadline`): a measurement window tied to the loop's progress.
    pub fn observe(&self, more: usize, deadline: Duration) {
        let want = self.attempts.len() + more;
        let end = Instant::now() + deadline;
        while self.attempts.len() < want {
            assert!(
                Instant::now() < end,
                "the client loop made fewer than {more} attempts in {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until `more` further attempts have succeeded (at most
    /// `deadline`); whether they did.
    pub fn observe_ok(&self, more: usize, deadline: Duration) -> bool {
        let want = self.attempts.ok() + more;
        let end = Instant::now() + deadline;
        while self.attempts.ok() < want {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run `f` every `period` (or back to back when it takes longer) on a
/// thread inside `ns` (None: in the machine's namespace, for loops that
/// enter namespaces themselves), recording each outcome.
fn looper(
    ns: Option<String>,
    period: Duration,
    mut f: impl FnMut() -> Result<String, String> + Send + 'static,
) -> Looper {
    let attempts = Attempts::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (rec, stopped) = (attempts.clone(), stop.clone());
    let body = move || {
        while !stopped.load(Ordering::Relaxed) {
            let at = Instant::now();
            let result = f();
            rec.push(Attempt {
                at,
                took: at.elapsed(),
                result,
            });
            if let Some(rest) = period.checked_sub(at.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    };
    let thread = match ns {
        Some(ns) => in_host(&ns, body),
        None => std::thread::spawn(body),
    };
    Looper {
        attempts,
        stop,
        thread: Some(thread),
    }
}

/// HTTP GETs of `addr` from inside `ns`, one every `period`, each on a
/// fresh connection (so each is balanced anew).
pub struct ServiceLoad;

impl ServiceLoad {
    pub fn start(ns: &str, addr: SocketAddr, period: Duration) -> Looper {
        looper(Some(ns.to_string()), period, move || http_get(addr))
    }
}

/// `dig @<server> <name> +short +time=1 +tries=1` inside `ns`, one every
/// `period`; an attempt succeeds when the answer is exactly `want`.
pub struct DnsLoop;

impl DnsLoop {
    pub fn start(ns: &str, server: &str, name: &str, want: &str, period: Duration) -> Looper {
        let (ns, at, name, want) = (
            ns.to_string(),
            format!("@{server}"),
            name.to_string(),
            want.to_string(),
        );
        looper(None, period, move || {
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "dig", &at, &name, "+short", "+time=1", "+tries=1"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run dig: {e}"))?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && answer == want {
                Ok(answer)
            } else {
                Err(format!("dig exit {}: {answer}", out.status))
            }
        })
    }
}

/// Creates Secrets `<prefix>-<n>` (n = 1, 2, ...) in namespace `default`,
/// one every `period`, through the API (kube-rs, JSON) from inside `ns`,
/// against the API servers `servers` in turn: a write that fails moves
/// the next one to the next server, as a client with several endpoints
/// does. A write is acknowledged when the API server answered 201; every
/// attempt is recorded (`Ok(name)` when acknowledged).
pub struct Writer {
    pub looper: Looper,
}

impl Writer {
    pub fn start(
        ns: &str,
        kubeconfig: PathBuf,
        servers: Vec<String>,
        prefix: &str,
        period: Duration,
    ) -> Writer {
        use k8s_openapi::api::core::v1::Secret;
        use k8s_openapi::ByteString;
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The server the next write goes to (an index into `servers`).
        let mut cursor = 0usize;
        let prefix = prefix.to_string();
        let mut runtime: Option<tokio::runtime::Runtime> = None;
        let mut apis: Vec<kube::Api<Secret>> = Vec::new();
        let mut n = 0u64;
        let looper = looper(Some(ns.to_string()), period, move || {
            // Built on the loop's thread, inside the namespace: every
            // connection the clients open is made there.
            let rt = runtime.get_or_insert_with(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
            });
            if apis.is_empty() {
                apis = rt.block_on(async {
                    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                    let base = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                        .await
                        .expect("kubeconfig");
                    servers
                        .iter()
                        .map(|url| {
                            let mut cfg = base.clone();
                            cfg.cluster_url = url.parse().expect("server URL");
                            cfg.connect_timeout = Some(CONNECT_TIMEOUT);
                            cfg.read_timeout = Some(Duration::from_secs(5));
                            cfg.write_timeout = Some(Duration::from_secs(5));
                            let client = kube::Client::try_from(cfg).expect("client");
                            kube::Api::namespaced(client, "default")
                        })
                        .collect()
                });
            }
            n += 1;
            let name = format!("{prefix}-{n:05}");
            let i = cursor % apis.len();
            let mut secret = Secret::default();
            secret.metadata.name = Some(name.clone());
            secret.data = Some(BTreeMap::from([(
                "n".to_string(),
                ByteString(n.to_string().into_bytes()),
            )]));
            let api = &apis[i];
            let result = rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(8),
                    api.create(&kube::api::PostParams::default(), &secret),
                )
                .await
            });
            match result {
                Ok(Ok(_)) => Ok(name),
                other => {
                    cursor += 1;
                    Err(format!("{name} via server #{}: {other:?}", i + 1))
                }
            }
        });
        Writer { looper }
    }

    /// The names of the acknowledged writes so far.
    pub fn acked(&self) -> Vec<(Instant, String)> {
        self.looper
            .attempts
            .all()
            .into_iter()
            .filter_map(|a| a.result.ok().map(|n| (a.at, n)))
            .collect()
    }
}
