//! Network namespaces for tests that address ClusterIPs and pod IPs: a
//! [`Netns`] guard (created with `ip netns add`, deleted on drop together
//! with every process still in it), [`Proc`] guards for the processes
//! started in it, and an [`Agent`]: this test binary re-executed inside the
//! namespace, doing the network client work (HTTP, TCP, UDP) there on
//! request, so no ClusterIP traffic ever leaves the test's namespace.
//! In-process alternatives for UDP: [`UdpEcho`] servers and [`UdpClient`]
//! sockets opened inside the namespace ([`Netns::enter`]).
//!
//! The agent is driven over its stdin/stdout with one JSON object per line.
//! A test binary that uses it has a `#[test] fn agent()` that calls
//! [`agent_main`] (a no-op unless the binary was started as an agent).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Set (to anything) in the environment of a re-executed test binary that
/// should serve as an agent.
pub const AGENT_ENV: &str = "FAIRLEAD_TEST_AGENT";

/// How long one agent call may take before the test gives up on it.
const AGENT_CALL_DEADLINE: Duration = Duration::from_secs(60);

/// How long a namespace's processes may take to die on cleanup.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);

/// A network namespace of its own (`fl-<random>`) with `lo` up. Dropping
/// it SIGKILLs every process still inside and deletes it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Create the namespace. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN);
    /// panics with the reason otherwise.
    pub fn new() -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "fl-{:x}{:x}{}",
            std::process::id(),
            nanos & 0xffff,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip (install iproute2)");
        assert!(
            out.status.success(),
            "ip netns add {name} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.run_ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// `program` to be run inside the namespace (`nsenter --net`, which
    /// execs it in place: the child's pid is the program's). Unlike `ip
    /// netns exec` it keeps the host's mount namespace, as a node daemon
    /// has it: the cgroup hierarchies under /sys/fs/cgroup, and pod
    /// namespaces under /run/netns that the test can enter too.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Start `cmd` (from [`Netns::command`]) with stdout and stderr
    /// appended to `log`.
    pub fn spawn(&self, mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child: Some(child) }
    }

    /// The addresses configured in the namespace (`ip -o addr show`).
    pub fn addresses(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "addr", "show"])
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A pod of this namespace (the node): a namespace of its own with
    /// address `pod` on `eth0`, linked to the node by a veth pair whose
    /// node end (`veth-pod`) has `gateway`, its default route; the node
    /// routes for it. Its traffic enters the node through prerouting and
    /// the forward path, as a pod's does. Drop it before the node.
    pub fn pod(&self, pod: &str, gateway: &str) -> Netns {
        let ns = Netns::new();
        for cmd in [
            format!(
                "link add veth-pod type veth peer name eth0 netns {}",
                ns.name
            ),
            format!("addr add {gateway}/32 dev veth-pod"),
            "link set veth-pod up".into(),
            format!("route add {pod}/32 dev veth-pod"),
        ] {
            self.run_ok("ip", &cmd.split_whitespace().collect::<Vec<_>>());
        }
        self.run_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        for cmd in [
            format!("addr add {pod}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add default via {gateway} dev eth0 onlink"),
        ] {
            ns.run_ok("ip", &cmd.split_whitespace().collect::<Vec<_>>());
        }
        ns
    }

    /// Run `program args...` inside the namespace to completion: its
    /// stdout; panics with its stderr when it fails.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        super::server::stdout_ok(format_args!("{program} {args:?} in {}", self.name), out)
    }

    /// Load `script` with `nft -f -` inside the namespace; panics with
    /// nft's complaint when it fails.
    pub fn nft_f(&self, script: &str) {
        let mut cmd = self.command("nft");
        cmd.args(["-f", "-"]);
        let out = super::server::run_with_stdin(cmd, script);
        assert!(
            out.status.success(),
            "nft -f in {}: {}\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `f` on a thread that entered the namespace (setns(2) applies to
    /// the calling thread only, so the test's own threads stay where they
    /// are); sockets it creates stay in the namespace whichever thread uses
    /// them afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a namespace fd we hold open.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace")
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

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes inside this namespace, which this test started.
        let end = Instant::now() + CLEANUP_DEADLINE;
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > end {
                break;
            }
            for pid in pids {
                // SAFETY: plain kill(2) on a pid listed in our namespace.
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

/// Whether `program --version` runs; prints why `test` is skipped
/// otherwise (`package`: the Debian package that has it).
pub fn have_program(test: &str, program: &str, package: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED {test}: `{program}` is not installed (Debian: apt-get install {package})"
        );
    }
    ok
}

/// Whether `nft` can run; prints why `test` is skipped otherwise.
pub fn have_nft(test: &str) -> bool {
    have_program(test, "nft", "nftables")
}

// ---- UDP in a namespace ----------------------------------------------------

/// A UDP server in a namespace answering every datagram with `reply`
/// (a backend's name or address), until dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr, reply: &str) -> UdpEcho {
        let sock = ns.enter(move || {
            UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind UDP echo on {addr}: {e}"))
        });
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set read timeout");
        let reply = reply.as_bytes().to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        UdpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket in a namespace on a fixed local port: one long-lived flow
/// per destination (the kernel's conntrack entry of its 5-tuple), like a
/// resolver's.
pub struct UdpClient {
    sock: UdpSocket,
}

impl UdpClient {
    pub fn bind(ns: &Netns, port: u16) -> UdpClient {
        let sock = ns.enter(move || {
            UdpSocket::bind(("0.0.0.0", port))
                .unwrap_or_else(|e| panic!("bind UDP client on port {port}: {e}"))
        });
        UdpClient { sock }
    }

    /// Send one datagram to `to` and wait at most `within` for a reply:
    /// the reply, or why there was none (a send netfilter rejected fails
    /// with EPERM). Late replies to earlier datagrams are discarded first.
    pub fn ask(&self, to: SocketAddr, within: Duration) -> Result<(String, SocketAddr), String> {
        let mut buf = [0u8; 512];
        self.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        while self.sock.recv_from(&mut buf).is_ok() {}
        self.sock
            .set_nonblocking(false)
            .map_err(|e| e.to_string())?;
        self.sock
            .set_read_timeout(Some(within))
            .map_err(|e| e.to_string())?;
        self.sock
            .send_to(b"who", to)
            .map_err(|e| format!("send: {e}"))?;
        let (n, from) = self
            .sock
            .recv_from(&mut buf)
            .map_err(|e| format!("receive: {e}"))?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    /// [`UdpClient::ask`] that must be answered within 3 s, from `to` (the
    /// reply un-NATed): the reply.
    pub fn ask_ok(&self, to: SocketAddr) -> String {
        let (reply, from) = self
            .ask(to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("no answer through {to}: {e}"));
        assert_eq!(from, to, "the reply is un-NATed");
        reply
    }
}

/// A process started in a namespace; SIGKILLed and reaped on drop.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap (no clean shutdown).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send `signal` and wait until the process has exited, at most
    /// `within` (then SIGKILL). Whether it exited by itself in time.
    pub fn stop(&mut self, signal: i32, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(c.id() as i32, signal);
        }
        let end = Instant::now() + within;
        while Instant::now() < end {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Whether it is still running (false once it exited or was killed).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// This test binary, re-executed inside a namespace as a network client.
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    /// Start the agent in `ns`; `test_name` is the `#[test]` that calls
    /// [`agent_main`].
    pub fn start(ns: &Netns, test_name: &str) -> Agent {
        let exe = std::env::current_exe().expect("current test binary");
        let mut child = ns
            .command(exe)
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env(AGENT_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test agent ... " before the first reply.
                if let Some(i) = line.find("@@") {
                    if tx.send(line[i + 2..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Agent {
            child,
            stdin,
            lines,
        }
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").expect("agent stdin");
        self.stdin.flush().expect("agent stdin");
        let line = self
            .lines
            .recv_timeout(AGENT_CALL_DEADLINE)
            .unwrap_or_else(|e| panic!("agent gave no reply to {req}: {e}"));
        serde_json::from_str(&line).expect("agent reply is JSON")
    }

    /// `n` HTTP GETs of `path` on fresh connections (optionally from source
    /// address `src`): per request `Ok((status, body))` or `Err(error)`.
    pub fn http(
        &mut self,
        addr: SocketAddr,
        path: &str,
        n: usize,
        src: Option<IpAddr>,
    ) -> Vec<Result<(u16, String), String>> {
        let reply = self.call(json!({
            "op": "http", "addr": addr.to_string(), "path": path, "n": n,
            "src": src.map(|s| s.to_string()),
        }));
        reply["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| match r["error"].as_str() {
                Some(e) => Err(e.to_string()),
                None => Ok((
                    r["status"].as_u64().unwrap_or(0) as u16,
                    r["body"].as_str().unwrap_or("").to_string(),
                )),
            })
            .collect()
    }

    /// `n` requests to an echo server's `/hostname` (through a Service):
    /// the names, or the error of each failed request.
    pub fn names(
        &mut self,
        addr: SocketAddr,
        n: usize,
        src: Option<IpAddr>,
    ) -> Vec<Result<String, String>> {
        self.http(addr, "/hostname", n, src)
            .into_iter()
            .map(|r| match r {
                Ok((200, body)) => Ok(body),
                Ok((code, body)) => Err(format!("HTTP {code}: {body}")),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// [`Agent::names`], panicking on any failed request.
    pub fn names_ok(&mut self, addr: SocketAddr, n: usize, src: Option<IpAddr>) -> Vec<String> {
        self.names(addr, n, src)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i} to {addr} failed: {e}")))
            .collect()
    }

    /// One datagram per fresh socket (a new flow each): replies and the
    /// address each came from.
    pub fn udp(
        &mut self,
        addr: SocketAddr,
        msg: &str,
        n: usize,
    ) -> Vec<Result<(String, String), String>> {
        let reply = self.call(json!({"op": "udp", "addr": addr.to_string(), "msg": msg, "n": n}));
        reply["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| match r["error"].as_str() {
                Some(e) => Err(e.to_string()),
                None => Ok((
                    r["reply"].as_str().unwrap_or("").to_string(),
                    r["from"].as_str().unwrap_or("").to_string(),
                )),
            })
            .collect()
    }

    /// Try a service port once (TCP: connect, send a request, read; UDP:
    /// send, receive): the outcome (`refused`, `reset`, `eof`, `answered`,
    /// `timeout`, `denied` (EPERM: netfilter dropped or rejected it in this
    /// namespace's output path) or `error: ...`) and how long it took to
    /// know, measured inside the namespace.
    pub fn probe(&mut self, addr: SocketAddr, udp: bool) -> (String, Duration) {
        let r = self.call(json!({"op": "probe", "addr": addr.to_string(), "udp": udp}));
        (
            r["outcome"].as_str().unwrap_or("?").to_string(),
            Duration::from_secs_f64(r["secs"].as_f64().unwrap_or(f64::MAX / 4.0)),
        )
    }

    /// Open a TCP connection kept by the agent under `id`.
    pub fn open(&mut self, id: &str, addr: SocketAddr) -> Result<(), String> {
        let r = self.call(json!({"op": "open", "id": id, "addr": addr.to_string()}));
        match r["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        }
    }

    /// Write `msg` on connection `id` and read as many bytes back.
    pub fn echo(&mut self, id: &str, msg: &str) -> Result<String, String> {
        let r = self.call(json!({"op": "echo", "id": id, "msg": msg}));
        match r["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(r["reply"].as_str().unwrap_or("").to_string()),
        }
    }

    /// [`Agent::echo`] of `msg`, which must come back; `why` the failure
    /// would mean.
    pub fn echo_ok(&mut self, id: &str, msg: &str, why: &str) {
        let r = self.echo(id, msg);
        assert_eq!(r.as_deref(), Ok(msg), "{why} (connection {id})");
    }

    /// Close connection `id`.
    pub fn close(&mut self, id: &str) {
        self.call(json!({"op": "close", "id": id}));
    }

    /// Start load `id`: HTTP GETs of `path` on fresh connections, one
    /// after another, until [`Agent::load_stop`] or `max` has passed
    /// (bounded in time; also at most [`LOAD_MAX_REQUESTS`]).
    pub fn load_start(&mut self, id: &str, addr: SocketAddr, path: &str, max: Duration) {
        let r = self.call(
            json!({"op": "load_start", "id": id, "addr": addr.to_string(),
            "path": path, "max_secs": max.as_secs_f64()}),
        );
        assert!(r["error"].is_null(), "load_start: {r}");
    }

    /// Stop load `id`: (requests answered 200, failures with their first
    /// errors).
    pub fn load_stop(&mut self, id: &str) -> (u64, u64, Vec<String>) {
        let r = self.call(json!({"op": "load_stop", "id": id}));
        assert!(r["error"].is_null(), "load_stop: {r}");
        let errors = r["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
        (
            r["ok"].as_u64().unwrap_or(0),
            r["failed"].as_u64().unwrap_or(0),
            errors,
        )
    }
}

/// The most requests one load sends.
pub const LOAD_MAX_REQUESTS: u64 = 200_000;

/// Running loads of the agent: id → (stop flag, the thread).
type Loads = HashMap<String, (Arc<AtomicBool>, JoinHandle<Value>)>;

fn load_start(req: &Value, addr: SocketAddr, loads: &mut Loads) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let path = req["path"].as_str().unwrap_or("/").to_string();
    let max = Duration::from_secs_f64(req["max_secs"].as_f64().unwrap_or(60.0));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let end = Instant::now() + max;
        let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
        while !flag.load(Ordering::Relaxed)
            && Instant::now() < end
            && ok + failed < LOAD_MAX_REQUESTS
        {
            match http_get(addr, &path, None) {
                Ok((200, _)) => ok += 1,
                other => {
                    failed += 1;
                    if errors.len() < 10 {
                        errors.push(format!("{other:?}"));
                    }
                }
            }
        }
        json!({"ok": ok, "failed": failed, "errors": errors})
    });
    loads.insert(req["id"].as_str().unwrap_or("").to_string(), (stop, t));
    json!({})
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the agent side -------------------------------------------------------

/// Timeout of every socket operation in the agent.
const IO: Duration = Duration::from_secs(3);

/// Serve agent requests on stdin until it closes, if this process was
/// started as an agent ([`AGENT_ENV`]); otherwise return at once.
pub fn agent_main() {
    if std::env::var_os(AGENT_ENV).is_none() {
        return;
    }
    let mut conns: HashMap<String, TcpStream> = HashMap::new();
    let mut loads: Loads = HashMap::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, &mut conns, &mut loads),
            Err(e) => json!({"error": format!("bad request: {e}")}),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "@@{reply}");
        let _ = out.flush();
    }
    std::process::exit(0);
}

fn addr_of(req: &Value) -> Result<SocketAddr, String> {
    req["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("bad addr in {req}"))
}

fn handle(req: &Value, conns: &mut HashMap<String, TcpStream>, loads: &mut Loads) -> Value {
    let addr = addr_of(req).ok();
    let need = |a: Option<SocketAddr>| a.ok_or_else(|| format!("bad addr in {req}"));
    let n = req["n"].as_u64().unwrap_or(1) as usize;
    let r: Result<Value, String> = match req["op"].as_str().unwrap_or("") {
        "http" => need(addr).map(|a| {
            let src: Option<IpAddr> = req["src"].as_str().and_then(|s| s.parse().ok());
            let path = req["path"].as_str().unwrap_or("/");
            let results: Vec<Value> = (0..n)
                .map(|_| match http_get(a, path, src) {
                    Ok((status, body)) => json!({"status": status, "body": body}),
                    Err(e) => json!({"error": e}),
                })
                .collect();
            json!({ "results": results })
        }),
        "udp" => need(addr).map(|a| {
            let msg = req["msg"].as_str().unwrap_or("");
            let results: Vec<Value> = (0..n)
                .map(|_| match udp_ask(a, msg) {
                    Ok((reply, from)) => json!({"reply": reply, "from": from.to_string()}),
                    Err(e) => json!({"error": e}),
                })
                .collect();
            json!({ "results": results })
        }),
        "probe" => need(addr).map(|a| {
            let started = Instant::now();
            let outcome = if req["udp"].as_bool().unwrap_or(false) {
                probe_udp(a)
            } else {
                probe_tcp(a)
            };
            json!({"outcome": outcome, "secs": started.elapsed().as_secs_f64()})
        }),
        "open" => need(addr).and_then(|a| {
            let s = TcpStream::connect_timeout(&a, IO).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(IO)).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(IO)).map_err(|e| e.to_string())?;
            conns.insert(req["id"].as_str().unwrap_or("").to_string(), s);
            Ok(json!({}))
        }),
        "echo" => {
            let msg = req["msg"].as_str().unwrap_or("");
            match conns.get_mut(req["id"].as_str().unwrap_or("")) {
                None => Err("no such connection".to_string()),
                Some(s) => echo_once(s, msg).map(|reply| json!({ "reply": reply })),
            }
        }
        "close" => {
            conns.remove(req["id"].as_str().unwrap_or(""));
            Ok(json!({}))
        }
        "load_start" => need(addr).map(|a| load_start(req, a, loads)),
        "load_stop" => match loads.remove(req["id"].as_str().unwrap_or("")) {
            None => Err("no such load".to_string()),
            Some((stop, t)) => {
                stop.store(true, Ordering::Relaxed);
                t.join().map_err(|_| "the load thread panicked".to_string())
            }
        },
        op => Err(format!("unknown op {op:?}")),
    };
    r.unwrap_or_else(|e| json!({ "error": e }))
}

fn connect(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = match src {
        None => TcpStream::connect_timeout(&addr, IO)?,
        Some(src) => {
            // std has no bind-before-connect: use a raw socket.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh socket we own from here on.
            let s: TcpStream = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, addr.ip()) else {
                return Err(std::io::Error::other("IPv4 only"));
            };
            let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let local = sin(src, 0);
            let remote = sin(dst, addr.port());
            // SAFETY: valid sockaddr_in pointers and lengths.
            if unsafe {
                libc::bind(
                    s.as_raw_fd(),
                    (&local as *const libc::sockaddr_in).cast(),
                    len,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Blocking connect to a local address: immediate answer.
            if unsafe {
                libc::connect(
                    s.as_raw_fd(),
                    (&remote as *const libc::sockaddr_in).cast(),
                    len,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            s
        }
    };
    s.set_read_timeout(Some(IO))?;
    s.set_write_timeout(Some(IO))?;
    Ok(s)
}

/// One `GET` with `Connection: close`: status and body.
fn http_get(addr: SocketAddr, path: &str, src: Option<IpAddr>) -> Result<(u16, String), String> {
    let mut s = connect(addr, src).map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad reply {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {head:?}"))?;
    Ok((status, body.to_string()))
}

fn udp_ask(addr: SocketAddr, msg: &str) -> Result<(String, SocketAddr), String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO)).map_err(|e| e.to_string())?;
    s.send_to(msg.as_bytes(), addr)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("receive: {e}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn classify(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset".into(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".into(),
        // EPERM on a send: netfilter dropped (or rejected) it on its way out.
        ErrorKind::PermissionDenied => "denied".into(),
        _ => format!("error: {e}"),
    }
}

fn probe_tcp(addr: SocketAddr) -> String {
    let mut s = match connect(addr, None) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") {
        return classify(&e);
    }
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => "eof".into(),
        Ok(_) => "answered".into(),
        Err(e) => classify(&e),
    }
}

fn probe_udp(addr: SocketAddr) -> String {
    let s = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => return format!("error: {e}"),
    };
    let _ = s.set_read_timeout(Some(IO));
    // Connected, so an ICMP port unreachable comes back as ECONNREFUSED.
    if let Err(e) = s.connect(addr).and_then(|_| s.send(b"hostname")) {
        return classify(&e);
    }
    let mut buf = [0u8; 512];
    match s.recv(&mut buf) {
        Ok(_) => "answered".into(),
        Err(e) => classify(&e),
    }
}

fn echo_once(s: &mut TcpStream, msg: &str) -> Result<String, String> {
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
