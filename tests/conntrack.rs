//! `fairlead::proxy::conntrack` against the kernel: each test in a network
//! namespace of its own with a static nft DNAT rule standing in for a UDP
//! Service (10.96.0.10:53, NodePort 10.0.0.1:30053) and two UDP echo
//! backends (10.244.0.11:5353, 10.244.0.12:5353) that answer with their own
//! address. A client socket with a fixed source port is one long-lived UDP
//! flow, like a resolver's.
//!
//! Needs root, `nft` and `conntrack` (tests skip, saying so, when either
//! program is missing; scripts/test installs both).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fairlead::proxy::conntrack::{
    delete_udp_to_endpoint, delete_udp_to_node_port, delete_udp_to_service,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 53;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NODE_PORT: u16 = 30053;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const TARGET_PORT: u16 = 5353;

// ---- helpers ----------------------------------------------------------------

/// Whether `nft` and `conntrack` can run; prints why a test is skipped
/// otherwise.
fn have_tools(test: &str) -> bool {
    for (program, package) in [("nft", "nftables"), ("conntrack", "conntrack")] {
        let ok = Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!(
                "SKIPPED {test}: `{program}` is not installed (Debian: apt-get install {package})"
            );
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of its own, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flct-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// `nft -f -` in the namespace.
    fn nft(&self, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ip netns exec nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .expect("write to nft");
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `f` on a thread that entered the namespace (setns(2) applies to
    /// the calling thread only); sockets it creates stay in the namespace
    /// whichever thread uses them afterwards.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The "Service": ClusterIP and NodePort DNATed to `backend`, replacing any
/// previous rules in one transaction (existing flows keep their entries).
fn point_service_at(ns: &Netns, backend: Ipv4Addr) {
    ns.nft(&format!(
        "table ip t\n\
         flush table ip t\n\
         table ip t {{\n\
           chain out {{\n\
             type nat hook output priority -100;\n\
             ip daddr {CLUSTER_IP} udp dport {PORT} dnat to {backend}:{TARGET_PORT}\n\
             ip daddr {NODE_IP} udp dport {NODE_PORT} dnat to {backend}:{TARGET_PORT}\n\
           }}\n\
         }}\n"
    ));
}

/// A UDP server answering each datagram with its own address, until
/// dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, addr: SocketAddrV4) -> Echo {
        let sock = ns.enter(move || UdpSocket::bind(addr).expect("bind echo server"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(addr.ip().to_string().as_bytes(), from);
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test's namespace with addresses, routes, the Service pointing at
/// POD_A, and both backends running.
struct Setup {
    /// Dropped before the namespace (field order).
    _echoes: Vec<Echo>,
    ns: Netns,
}

fn setup() -> Setup {
    let ns = Netns::new();
    for ip in [POD_A, POD_B, NODE_IP] {
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    // Service IPs are local, like kube-proxy's ClusterIPs seen from a node.
    ns.ip(&["route", "add", "local", "10.96.0.0/16", "dev", "lo"]);
    point_service_at(&ns, POD_A);
    let echoes = [POD_A, POD_B]
        .into_iter()
        .map(|ip| Echo::start(&ns, SocketAddrV4::new(ip, TARGET_PORT)))
        .collect();
    Setup {
        _echoes: echoes,
        ns,
    }
}

/// A long-lived client flow: one socket on a fixed source port.
fn client(ns: &Netns, port: u16) -> UdpSocket {
    let sock = ns.enter(move || UdpSocket::bind(("0.0.0.0", port)).expect("bind client"));
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock
}

/// Send one datagram to `to`; the backend that answered.
fn ask(sock: &UdpSocket, to: SocketAddrV4) -> String {
    sock.send_to(b"who", to).expect("send");
    let mut buf = [0u8; 512];
    let (n, from) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer through {to}: {e}"));
    assert_eq!(from, SocketAddr::V4(to), "the reply is un-NATed");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---- tests ------------------------------------------------------------------

#[test]
fn deleting_entries_to_a_removed_endpoint_moves_the_flow() {
    if !have_tools("deleting_entries_to_a_removed_endpoint_moves_the_flow") {
        return;
    }
    let s = setup();
    let rt = rt();
    let svc = SocketAddrV4::new(CLUSTER_IP, PORT);
    let c = client(&s.ns, 40000);
    assert_eq!(ask(&c, svc), POD_A.to_string());

    // The endpoint is replaced: new flows go to POD_B...
    point_service_at(&s.ns, POD_B);
    assert_eq!(ask(&client(&s.ns, 40001), svc), POD_B.to_string());
    // ...but the existing flow still goes to POD_A (its conntrack entry).
    assert_eq!(ask(&c, svc), POD_A.to_string(), "the entry is stale");

    let ns = Some(s.ns.name.as_str());
    let deleted = rt
        .block_on(delete_udp_to_endpoint(
            ns,
            SocketAddrV4::new(POD_A, TARGET_PORT),
        ))
        .expect("delete");
    assert_eq!(deleted, 1, "exactly the flow to POD_A");
    assert_eq!(
        ask(&c, svc),
        POD_B.to_string(),
        "the flow follows the rules"
    );

    // Nothing left to POD_A.
    let again = rt.block_on(delete_udp_to_endpoint(
        ns,
        SocketAddrV4::new(POD_A, TARGET_PORT),
    ));
    assert_eq!(again.expect("delete"), 0);
}

#[test]
fn deleting_entries_to_a_service_and_a_node_port() {
    if !have_tools("deleting_entries_to_a_service_and_a_node_port") {
        return;
    }
    let s = setup();
    let rt = rt();
    let ns = Some(s.ns.name.as_str());
    let svc = SocketAddrV4::new(CLUSTER_IP, PORT);
    let node_port = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let c = client(&s.ns, 40000);
    assert_eq!(ask(&c, svc), POD_A.to_string());
    assert_eq!(ask(&c, node_port), POD_A.to_string());

    point_service_at(&s.ns, POD_B);
    assert_eq!(ask(&c, svc), POD_A.to_string(), "the entry is stale");
    assert_eq!(ask(&c, node_port), POD_A.to_string(), "the entry is stale");

    // By frontend: only the ClusterIP flow.
    let deleted = rt
        .block_on(delete_udp_to_service(ns, CLUSTER_IP, PORT))
        .expect("delete");
    assert_eq!(deleted, 1);
    assert_eq!(ask(&c, svc), POD_B.to_string());
    assert_eq!(ask(&c, node_port), POD_A.to_string(), "NodePort flow kept");

    // By NodePort: the NodePort flow.
    let deleted = rt
        .block_on(delete_udp_to_node_port(ns, NODE_PORT))
        .expect("delete");
    assert_eq!(deleted, 1);
    assert_eq!(ask(&c, node_port), POD_B.to_string());
}

#[test]
fn nothing_to_delete_is_zero() {
    if !have_tools("nothing_to_delete_is_zero") {
        return;
    }
    let s = setup();
    let rt = rt();
    let ns = Some(s.ns.name.as_str());
    // A live flow that none of the deletions below match.
    let c = client(&s.ns, 40000);
    assert_eq!(
        ask(&c, SocketAddrV4::new(CLUSTER_IP, PORT)),
        POD_A.to_string()
    );

    let to_endpoint = rt.block_on(delete_udp_to_endpoint(
        ns,
        SocketAddrV4::new(POD_B, TARGET_PORT),
    ));
    assert_eq!(to_endpoint.expect("delete"), 0);
    let to_service = rt.block_on(delete_udp_to_service(ns, CLUSTER_IP, 54));
    assert_eq!(to_service.expect("delete"), 0);
    let to_node_port = rt.block_on(delete_udp_to_node_port(ns, NODE_PORT));
    assert_eq!(to_node_port.expect("delete"), 0);

    // The flow was left alone.
    assert_eq!(
        ask(&c, SocketAddrV4::new(CLUSTER_IP, PORT)),
        POD_A.to_string()
    );
}

#[test]
fn a_missing_namespace_is_a_one_line_error() {
    if !have_tools("a_missing_namespace_is_a_one_line_error") {
        return;
    }
    let err = rt()
        .block_on(delete_udp_to_service(
            Some("fl-no-such-namespace"),
            CLUSTER_IP,
            PORT,
        ))
        .expect_err("no such namespace");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("fl-no-such-namespace"), "{msg}");
}
