//! Acceptance tests of issue 5 (cluster DNS), asked with the real `dig`
//! (Debian's bind9-dnsutils).
//!
//! Most tests are in-process: each starts its own [`DnsServer`] on a free
//! loopback port, feeds it Services and EndpointSlices built from JSON, and
//! runs `dig @127.0.0.1 -p <port>`; names outside the zone go to a tiny
//! upstream resolver the test runs on another loopback port
//! ([`Upstream`]). Malformed packets are sent from raw sockets.
//!
//! One end-to-end test (`node_serves_cluster_dns_and_follows_changes`) runs
//! `fairlead up` in a network namespace of its own
//! (`tests/common/cluster.rs`), changes Services and Pods with kubectl and
//! measures how long until `dig @10.96.0.10` sees each change; it needs root, `ip` and `kubectl`. The measured times are printed
//! (`cargo test --test dns_dig -- --nocapture`).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fairlead::dns::{DnsConfig, DnsServer};
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use common::cluster::{ms, Cluster, SETTLE};

/// TTL the in-process servers are configured with (not the default 5 s, so
/// the test sees that the setting is applied).
const TTL: u32 = 7;

/// "SERVFAIL promptly".
const PROMPTLY: Duration = Duration::from_secs(3);

/// How long `dig` waits for one reply (longer than [`PROMPTLY`], so a
/// SERVFAIL that arrives late is seen as late rather than as a timeout).
const DIG_TIME: &str = "+time=6";

// ---- dig ------------------------------------------------------------------

/// One resource record as `dig` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rr {
    name: String,
    ttl: u32,
    class: String,
    rtype: String,
    data: String,
}

/// What `dig` printed for one query.
#[derive(Debug, Default)]
struct Reply {
    /// `status:` of the header (None: no reply at all).
    status: Option<String>,
    flags: BTreeSet<String>,
    answer: Vec<Rr>,
    authority: Vec<Rr>,
    additional: Vec<Rr>,
    /// The `; EDNS:` line of the OPT pseudo-section, if any.
    edns: Option<String>,
    /// dig's `;; Query time:`.
    query_time: Option<Duration>,
    /// Whether dig said it retried over TCP after a truncated UDP reply.
    retried_tcp: bool,
    /// Wall time of the whole dig run.
    elapsed: Duration,
    raw: String,
}

impl Reply {
    fn status(&self) -> &str {
        self.status.as_deref().unwrap_or("(no reply)")
    }

    /// Data of the answer records of `rtype`, sorted.
    fn answers(&self, rtype: &str) -> Vec<String> {
        data_of(&self.answer, rtype)
    }

    fn additionals(&self, rtype: &str) -> Vec<String> {
        data_of(&self.additional, rtype)
    }

    /// Panics unless the reply is `status` and its authority section is
    /// exactly the zone's SOA (negative answers, RFC 2308).
    fn assert_negative(&self, status: &str, zone: &str) {
        assert_eq!(self.status(), status, "{}", self.raw);
        assert!(self.answer.is_empty(), "no answers expected:\n{}", self.raw);
        assert_eq!(self.authority.len(), 1, "one SOA expected:\n{}", self.raw);
        let soa = &self.authority[0];
        assert_eq!(
            (soa.name.to_ascii_lowercase().as_str(), soa.rtype.as_str()),
            (zone, "SOA"),
            "{}",
            self.raw
        );
        assert!(self.flags.contains("aa"), "authoritative:\n{}", self.raw);
    }
}

fn data_of(rrs: &[Rr], rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = rrs
        .iter()
        .filter(|r| r.rtype == rtype)
        .map(|r| r.data.to_ascii_lowercase())
        .collect();
    v.sort();
    v
}

/// Parse the output of `dig +noall +comments +answer +authority
/// +additional +stats`.
fn parse_dig(text: &str) -> Reply {
    #[derive(PartialEq)]
    enum Section {
        None,
        Answer,
        Authority,
        Additional,
    }
    let mut r = Reply {
        raw: text.to_string(),
        ..Reply::default()
    };
    let mut section = Section::None;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(i) = line.find("status: ") {
            if line.contains("->>HEADER<<-") {
                let rest = &line[i + "status: ".len()..];
                r.status = Some(rest.split(',').next().unwrap_or("").trim().to_string());
                // A new reply (after a TCP retry) replaces the previous one.
                r.flags.clear();
                r.answer.clear();
                r.authority.clear();
                r.additional.clear();
                r.edns = None;
                section = Section::None;
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix(";; flags:") {
            let flags = rest.split(';').next().unwrap_or("");
            r.flags = flags.split_whitespace().map(str::to_string).collect();
            continue;
        }
        if line.starts_with("; EDNS:") {
            r.edns = Some(line.to_string());
            continue;
        }
        if line.contains("Truncated, retrying in TCP mode") {
            r.retried_tcp = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix(";; Query time:") {
            let ms: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            r.query_time = Some(Duration::from_millis(ms));
            continue;
        }
        match line {
            ";; ANSWER SECTION:" => section = Section::Answer,
            ";; AUTHORITY SECTION:" => section = Section::Authority,
            ";; ADDITIONAL SECTION:" => section = Section::Additional,
            _ if line.starts_with(';') => {}
            _ => {
                let mut parts = line.split_whitespace();
                let (Some(name), Some(ttl), Some(class), Some(rtype)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let rr = Rr {
                    name: name.to_string(),
                    ttl: ttl.parse().unwrap_or(u32::MAX),
                    class: class.to_string(),
                    rtype: rtype.to_string(),
                    data: parts.collect::<Vec<_>>().join(" "),
                };
                match section {
                    Section::Answer => r.answer.push(rr),
                    Section::Authority => r.authority.push(rr),
                    Section::Additional => r.additional.push(rr),
                    Section::None => {}
                }
            }
        }
    }
    r
}

/// The arguments every query gets: every section, one try.
const DIG_COMMON: [&str; 8] = [
    "+noall",
    "+comments",
    "+answer",
    "+authority",
    "+additional",
    "+stats",
    "+tries=1",
    DIG_TIME,
];

fn run_dig(mut cmd: Command) -> Reply {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run dig (install bind9-dnsutils)");
    let mut r = parse_dig(&String::from_utf8_lossy(&out.stdout));
    r.elapsed = started.elapsed();
    r.raw.push_str(&String::from_utf8_lossy(&out.stderr));
    r
}

/// `dig @addr -p port <args>`.
fn dig(server: SocketAddr, args: &[&str]) -> Reply {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(DIG_COMMON)
        .args(args);
    run_dig(cmd)
}

// ---- the server under test --------------------------------------------------

/// A [`DnsServer`] on 127.0.0.1:<free port> with its own runtime. Dropping
/// it stops the server, then the runtime.
struct Dns {
    server: Option<DnsServer>,
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
}

impl Dns {
    /// Start with `upstreams` and the test [`TTL`]; `tweak` may change more.
    fn start(upstreams: Vec<SocketAddr>, tweak: impl FnOnce(&mut DnsConfig)) -> Dns {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut cfg = DnsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            upstreams,
            ttl: Duration::from_secs(TTL.into()),
            udp_workers: 2,
            ..DnsConfig::default()
        };
        tweak(&mut cfg);
        let server = rt
            .block_on(DnsServer::start(cfg))
            .expect("start the DNS server");
        let addr = server.local_addrs()[0];
        Dns {
            server: Some(server),
            rt,
            addr,
        }
    }

    fn server(&self) -> &DnsServer {
        self.server.as_ref().expect("running")
    }

    /// Serve these objects (and namespaces) from now on.
    fn update(&self, services: &[Value], slices: &[Value], namespaces: &[&str]) {
        let services: Vec<Arc<Service>> = services
            .iter()
            .map(|v| Arc::new(serde_json::from_value(v.clone()).expect("a Service")))
            .collect();
        let slices: Vec<Arc<EndpointSlice>> = slices
            .iter()
            .map(|v| Arc::new(serde_json::from_value(v.clone()).expect("an EndpointSlice")))
            .collect();
        let namespaces: Vec<String> = namespaces.iter().map(|s| s.to_string()).collect();
        let _guard = self.rt.enter();
        self.server().update(&services, &slices, &namespaces);
    }

    fn dig(&self, args: &[&str]) -> Reply {
        dig(self.addr, args)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        self.server.take();
    }
}

// ---- a tiny upstream resolver -------------------------------------------------

/// Names the test upstream knows (A records); everything else is NXDOMAIN
/// with the SOA of `example.`.
const UPSTREAM_NAMES: [(&str, Ipv4Addr); 3] = [
    ("outside.example.", Ipv4Addr::new(192, 0, 2, 1)),
    ("target.example.", Ipv4Addr::new(192, 0, 2, 2)),
    ("second.example.", Ipv4Addr::new(192, 0, 2, 3)),
];

/// A UDP socket on 127.0.0.1 at a port below the kernel's ephemeral range.
///
/// Why: tests stop upstreams while a DNS server still forwards to them. A
/// port from the ephemeral range, once closed, can become the source port of
/// a `dig` in a parallel test, which then receives the forwarded query and
/// fails with "query response not set". Ports below the range are never
/// handed out for port 0, so a closed one stays closed.
fn bind_upstream_port() -> UdpSocket {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = low.saturating_sub(12000).max(1024);
    let span = u32::from(low - base);
    let mut seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    for _ in 0..1000 {
        // xorshift: a different candidate each try, different per process.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let port = base + (seed % span) as u16;
        if let Ok(sock) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
            return sock;
        }
    }
    panic!("no free UDP port in {base}..{low}");
}

/// A UDP DNS responder on 127.0.0.1 (see [`bind_upstream_port`]) in a
/// thread, recording every question it gets. Dropping it (or
/// [`Upstream::stop`]) closes its socket, so queries to it are refused by
/// the kernel.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, RecordType)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> Upstream {
        let sock = bind_upstream_port();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(q) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let Some(query) = q.queries.first().cloned() else {
                        continue;
                    };
                    seen.lock()
                        .unwrap()
                        .push((query.name().to_ascii(), query.query_type()));
                    let mut m = Message::response(q.metadata.id, OpCode::Query);
                    m.metadata.recursion_desired = q.metadata.recursion_desired;
                    m.metadata.recursion_available = true;
                    m.add_query(query.clone());
                    let known = UPSTREAM_NAMES
                        .iter()
                        .find(|(n, _)| query.name().to_ascii().eq_ignore_ascii_case(n));
                    match known {
                        Some((_, ip)) if query.query_type() == RecordType::A => {
                            m.answers.push(Record::from_rdata(
                                query.name().clone(),
                                60,
                                RData::A(A(*ip)),
                            ));
                        }
                        _ => {
                            if known.is_none() {
                                m.metadata.response_code = ResponseCode::NXDomain;
                            }
                            let zone = Name::from_ascii("example.").unwrap();
                            m.authorities.push(Record::from_rdata(
                                zone.clone(),
                                60,
                                RData::SOA(SOA::new(
                                    Name::from_ascii("ns.example.").unwrap(),
                                    Name::from_ascii("root.example.").unwrap(),
                                    1,
                                    3600,
                                    600,
                                    86400,
                                    30,
                                )),
                            ));
                        }
                    }
                    if let Ok(bytes) = m.to_vec() {
                        let _ = sock.send_to(&bytes, peer);
                    }
                }
            })
        };
        Upstream {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The questions received so far.
    fn seen(&self) -> Vec<(String, RecordType)> {
        self.seen.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- the cluster's objects ------------------------------------------------------

fn slice(svc: &str, name: &str, ports: Value, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

/// ClusterIP (dual-stack, named and unnamed ports), a multi-port UDP+TCP
/// Service (kube-dns), headless with and without hostnames, headless with no
/// ready endpoint, and ExternalName.
fn fixture_services() -> Vec<Value> {
    vec![
        json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                          {"name": "https", "port": 443, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "solo", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 8080}]}}),
        json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.10",
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                          {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                          {"name": "metrics", "port": 9153, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        json!({"metadata": {"name": "empty", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "x", "port": 1}]}}),
        json!({"metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "target.example"}}),
    ]
}

fn fixture_slices() -> Vec<Value> {
    vec![
        slice(
            "db",
            "db-abc",
            json!([{"name": "pg", "port": 5433, "protocol": "TCP"}]),
            json!([
                {"addresses": ["10.0.0.1"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "hostname": "db-2", "conditions": {"ready": false}},
            ]),
        ),
        slice(
            "empty",
            "empty-abc",
            json!([{"name": "x", "port": 1, "protocol": "TCP"}]),
            json!([{"addresses": ["10.0.0.9"], "conditions": {"ready": false}}]),
        ),
    ]
}

/// A server with the fixture and a running upstream.
fn fixture() -> (Dns, Upstream) {
    let upstream = Upstream::start();
    let dns = Dns::start(vec![upstream.addr], |_| {});
    dns.update(
        &fixture_services(),
        &fixture_slices(),
        &["default", "kube-system", "quiet"],
    );
    (dns, upstream)
}

fn assert_ttls(r: &Reply) {
    for rr in r.answer.iter().chain(&r.additional) {
        assert_eq!(rr.ttl, TTL, "configured TTL on {rr:?}:\n{}", r.raw);
        assert_eq!(rr.class, "IN", "{}", r.raw);
    }
}

// ---- acceptance 1: record shapes ---------------------------------------------

#[test]
fn cluster_ip_service_a_aaaa_srv_ptr() {
    let (dns, _up) = fixture();
    let a = dns.dig(&["web.default.svc.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR", "{}", a.raw);
    assert!(
        a.flags.contains("aa") && a.flags.contains("qr"),
        "{}",
        a.raw
    );
    assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
    assert_eq!(
        a.answer[0].name.to_ascii_lowercase(),
        "web.default.svc.cluster.local."
    );
    assert!(a.authority.is_empty(), "{}", a.raw);
    assert!(
        a.edns.as_deref().is_some_and(|e| e.contains("version: 0")),
        "EDNS0 in the reply:\n{}",
        a.raw
    );
    assert_ttls(&a);

    let aaaa = dns.dig(&["web.default.svc.cluster.local", "AAAA"]);
    assert_eq!(aaaa.status(), "NOERROR", "{}", aaaa.raw);
    assert_eq!(aaaa.answers("AAAA"), vec!["fd00::20"], "{}", aaaa.raw);

    // An IPv4-only Service has no AAAA: NODATA.
    dns.dig(&["solo.default.svc.cluster.local", "AAAA"])
        .assert_negative("NOERROR", "cluster.local.");
    let solo = dns.dig(&["solo.default.svc.cluster.local", "A"]);
    assert_eq!(solo.answers("A"), vec!["10.96.0.21"], "{}", solo.raw);

    // SRV per named port, with the target's addresses as additionals.
    for (port, number) in [("http", 80), ("https", 443)] {
        let q = format!("_{port}._tcp.web.default.svc.cluster.local");
        let srv = dns.dig(&[&q, "SRV"]);
        assert_eq!(srv.status(), "NOERROR", "{}", srv.raw);
        assert_eq!(
            srv.answers("SRV"),
            vec![format!("0 100 {number} web.default.svc.cluster.local.")],
            "{}",
            srv.raw
        );
        assert_eq!(srv.additionals("A"), vec!["10.96.0.20"], "{}", srv.raw);
        assert_eq!(srv.additionals("AAAA"), vec!["fd00::20"], "{}", srv.raw);
        assert_ttls(&srv);
    }
    // The multi-port UDP + TCP Service: one SRV per (name, protocol).
    let udp = dns.dig(&["_dns._udp.kube-dns.kube-system.svc.cluster.local", "SRV"]);
    assert_eq!(
        udp.answers("SRV"),
        vec!["0 100 53 kube-dns.kube-system.svc.cluster.local."],
        "{}",
        udp.raw
    );
    assert_eq!(udp.additionals("A"), vec!["10.96.0.10"], "{}", udp.raw);
    let tcp = dns.dig(&[
        "_dns-tcp._tcp.kube-dns.kube-system.svc.cluster.local",
        "SRV",
    ]);
    assert_eq!(
        tcp.answers("SRV"),
        vec!["0 100 53 kube-dns.kube-system.svc.cluster.local."],
        "{}",
        tcp.raw
    );
    let metrics = dns.dig(&[
        "_metrics._tcp.kube-dns.kube-system.svc.cluster.local",
        "SRV",
    ]);
    assert_eq!(
        metrics.answers("SRV"),
        vec!["0 100 9153 kube-dns.kube-system.svc.cluster.local."],
        "{}",
        metrics.raw
    );
    // A port name under the wrong protocol does not exist.
    dns.dig(&["_dns._tcp.kube-dns.kube-system.svc.cluster.local", "SRV"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    // An unnamed port has no SRV; the Service has no SRV at its own name.
    dns.dig(&["solo.default.svc.cluster.local", "SRV"])
        .assert_negative("NOERROR", "cluster.local.");

    // PTR for each ClusterIP.
    for (ip, target) in [
        ("10.96.0.20", "web.default.svc.cluster.local."),
        ("fd00::20", "web.default.svc.cluster.local."),
        ("10.96.0.10", "kube-dns.kube-system.svc.cluster.local."),
    ] {
        let ptr = dns.dig(&["-x", ip]);
        assert_eq!(ptr.status(), "NOERROR", "{ip}: {}", ptr.raw);
        assert_eq!(ptr.answers("PTR"), vec![target], "{ip}: {}", ptr.raw);
        assert!(ptr.flags.contains("aa"), "{}", ptr.raw);
        assert_ttls(&ptr);
    }
    // Another spelling of the address is another name: not ours, so it
    // goes upstream (which says NXDOMAIN).
    let odd = dns.dig(&["020.0.96.10.in-addr.arpa", "PTR"]);
    assert_eq!(odd.status(), "NXDOMAIN", "{}", odd.raw);
    assert!(!odd.flags.contains("aa"), "{}", odd.raw);
    let ptr = dns.dig(&["20.0.96.10.in-addr.arpa", "PTR"]);
    assert_eq!(
        ptr.answer[0].name, "20.0.96.10.in-addr.arpa.",
        "reverse owner name: {}",
        ptr.raw
    );
}

/// RFC 8482: ANY at a cluster name gets one synthesized HINFO, not every
/// record there (a headless Service's addresses); a missing name is still
/// NXDOMAIN.
#[test]
fn any_gets_a_minimal_answer() {
    let (dns, _up) = fixture();
    for name in [
        "db.default.svc.cluster.local",
        "web.default.svc.cluster.local",
    ] {
        let r = dns.dig(&[name, "ANY"]);
        assert_eq!(r.status(), "NOERROR", "{}", r.raw);
        assert_eq!(r.answer.len(), 1, "one record:\n{}", r.raw);
        assert_eq!(r.answers("HINFO"), vec!["\"rfc8482\" \"\""], "{}", r.raw);
        assert!(r.additional.iter().all(|a| a.rtype == "OPT"), "{}", r.raw);
        assert!(r.flags.contains("aa"), "{}", r.raw);
    }
    dns.dig(&["nope.default.svc.cluster.local", "ANY"])
        .assert_negative("NXDOMAIN", "cluster.local.");
}

#[test]
fn headless_service_records() {
    let (dns, up) = fixture();
    // A of every ready endpoint (10.0.0.3 is not ready).
    let a = dns.dig(&["db.default.svc.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR", "{}", a.raw);
    assert_eq!(a.answers("A"), vec!["10.0.0.1", "10.0.0.2"], "{}", a.raw);
    assert!(a.flags.contains("aa"), "{}", a.raw);
    assert_ttls(&a);

    // <hostname>.<svc>: endpoints with a hostname; the others by their
    // dashed address (as CoreDNS does); not-ready ones not at all.
    let h = dns.dig(&["db-0.db.default.svc.cluster.local", "A"]);
    assert_eq!(h.answers("A"), vec!["10.0.0.1"], "{}", h.raw);
    let d = dns.dig(&["10-0-0-2.db.default.svc.cluster.local", "A"]);
    assert_eq!(d.answers("A"), vec!["10.0.0.2"], "{}", d.raw);
    dns.dig(&["db-2.db.default.svc.cluster.local", "A"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    dns.dig(&["db-0.db.default.svc.cluster.local", "AAAA"])
        .assert_negative("NOERROR", "cluster.local.");

    // SRV per named port and ready endpoint, with the endpoint port and the
    // endpoints' addresses as additionals.
    let srv = dns.dig(&["_pg._tcp.db.default.svc.cluster.local", "SRV"]);
    assert_eq!(srv.status(), "NOERROR", "{}", srv.raw);
    assert_eq!(
        srv.answers("SRV"),
        vec![
            "0 100 5433 10-0-0-2.db.default.svc.cluster.local.",
            "0 100 5433 db-0.db.default.svc.cluster.local.",
        ],
        "{}",
        srv.raw
    );
    assert_eq!(
        srv.additionals("A"),
        vec!["10.0.0.1", "10.0.0.2"],
        "{}",
        srv.raw
    );
    let names: BTreeSet<String> = srv
        .additional
        .iter()
        .filter(|r| r.rtype == "A")
        .map(|r| r.name.to_ascii_lowercase())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "10-0-0-2.db.default.svc.cluster.local.".to_string(),
            "db-0.db.default.svc.cluster.local.".to_string()
        ]),
        "{}",
        srv.raw
    );
    assert_ttls(&srv);

    // PTR for the ready endpoints' addresses, to their endpoint names.
    let p1 = dns.dig(&["-x", "10.0.0.1"]);
    assert_eq!(
        p1.answers("PTR"),
        vec!["db-0.db.default.svc.cluster.local."],
        "{}",
        p1.raw
    );
    let p2 = dns.dig(&["-x", "10.0.0.2"]);
    assert_eq!(
        p2.answers("PTR"),
        vec!["10-0-0-2.db.default.svc.cluster.local."],
        "{}",
        p2.raw
    );
    // Not-ready endpoint: the address is not ours, so the question goes
    // upstream (CoreDNS's `fallthrough in-addr.arpa`), whose NXDOMAIN the
    // client gets.
    let p3 = dns.dig(&["-x", "10.0.0.3"]);
    assert_eq!(p3.status(), "NXDOMAIN", "{}", p3.raw);
    assert!(
        up.seen()
            .contains(&("3.0.0.10.in-addr.arpa.".to_string(), RecordType::PTR)),
        "forwarded: {:?}",
        up.seen()
    );

    // No ready endpoint: NXDOMAIN (and so no SRV either).
    dns.dig(&["empty.default.svc.cluster.local", "A"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    dns.dig(&["_x._tcp.empty.default.svc.cluster.local", "SRV"])
        .assert_negative("NXDOMAIN", "cluster.local.");
}

#[test]
fn external_name_is_a_cname() {
    let (dns, up) = fixture();
    // The CNAME and, resolved upstream, the target's address.
    let a = dns.dig(&["ext.default.svc.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR", "{}", a.raw);
    assert_eq!(a.answer.len(), 2, "{}", a.raw);
    assert_eq!(
        (
            a.answer[0].name.to_ascii_lowercase().as_str(),
            a.answer[0].rtype.as_str(),
            a.answer[0].data.to_ascii_lowercase().as_str()
        ),
        ("ext.default.svc.cluster.local.", "CNAME", "target.example."),
        "{}",
        a.raw
    );
    assert_eq!(a.answer[0].ttl, TTL, "{}", a.raw);
    assert_eq!(
        (a.answer[1].name.as_str(), a.answer[1].rtype.as_str()),
        ("target.example.", "A"),
        "{}",
        a.raw
    );
    assert_eq!(a.answers("A"), vec!["192.0.2.2"], "{}", a.raw);
    assert!(
        up.seen()
            .contains(&("target.example.".to_string(), RecordType::A)),
        "{:?}",
        up.seen()
    );
    // Asking for the CNAME itself: only the CNAME.
    let c = dns.dig(&["ext.default.svc.cluster.local", "CNAME"]);
    assert_eq!(c.status(), "NOERROR", "{}", c.raw);
    assert_eq!(c.answers("CNAME"), vec!["target.example."], "{}", c.raw);
    assert_eq!(c.answer.len(), 1, "{}", c.raw);
    assert!(c.flags.contains("aa"), "{}", c.raw);
}

#[test]
fn pod_records_on_by_default_and_switchable() {
    let (dns, _up) = fixture();
    let a = dns.dig(&["10-244-1-7.default.pod.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR", "{}", a.raw);
    assert_eq!(a.answers("A"), vec!["10.244.1.7"], "{}", a.raw);
    assert_eq!(
        a.answer[0].name.to_ascii_lowercase(),
        "10-244-1-7.default.pod.cluster.local."
    );
    assert_ttls(&a);
    // Any namespace (`pods insecure` does not check the pod exists).
    let other = dns.dig(&["10-244-1-7.elsewhere.pod.cluster.local", "A"]);
    assert_eq!(other.answers("A"), vec!["10.244.1.7"], "{}", other.raw);
    // A pod name of the other family: NODATA; not an address: NXDOMAIN.
    dns.dig(&["10-244-1-7.default.pod.cluster.local", "AAAA"])
        .assert_negative("NOERROR", "cluster.local.");
    dns.dig(&["not-an-ip.default.pod.cluster.local", "A"])
        .assert_negative("NXDOMAIN", "cluster.local.");

    let upstream = Upstream::start();
    let off = Dns::start(vec![upstream.addr], |c| c.pod_records = false);
    off.update(&fixture_services(), &fixture_slices(), &["default"]);
    off.dig(&["10-244-1-7.default.pod.cluster.local", "A"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    // Switching pod records off does not touch Service names.
    let web = off.dig(&["web.default.svc.cluster.local", "A"]);
    assert_eq!(web.answers("A"), vec!["10.96.0.20"], "{}", web.raw);
}

#[test]
fn nxdomain_nodata_and_search_path_expansions() {
    let (dns, up) = fixture();
    let cases = [
        // (name, type, status)
        ("nope.default.svc.cluster.local", "A", "NXDOMAIN"),
        ("web.nope.svc.cluster.local", "A", "NXDOMAIN"),
        ("absent.svc.cluster.local", "A", "NXDOMAIN"),
        ("nope.cluster.local", "A", "NXDOMAIN"),
        // Existing names without the asked type.
        ("web.default.svc.cluster.local", "TXT", "NOERROR"),
        ("web.default.svc.cluster.local", "MX", "NOERROR"),
        ("dns-version.cluster.local", "A", "NOERROR"),
        // Namespaces and the other empty non-terminals.
        ("default.svc.cluster.local", "A", "NOERROR"),
        ("kube-system.svc.cluster.local", "SRV", "NOERROR"),
        ("quiet.svc.cluster.local", "A", "NOERROR"),
        ("svc.cluster.local", "A", "NOERROR"),
        ("_tcp.web.default.svc.cluster.local", "SRV", "NOERROR"),
        ("cluster.local", "A", "NOERROR"),
    ];
    for (name, qtype, status) in cases {
        let r = dns.dig(&[name, qtype]);
        r.assert_negative(status, "cluster.local.");
        // The SOA's TTL and minimum bound negative caching.
        let soa = &r.authority[0];
        let minimum: u32 = soa
            .data
            .split_whitespace()
            .last()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert_eq!((soa.ttl, minimum), (TTL, TTL), "{name}: {}", r.raw);
    }

    // What resolv.conf's search list (ndots:5) makes of an outside name in
    // a pod of `default`: NXDOMAIN for each expansion, answered from the
    // index, never forwarded, fast.
    let mut slowest = Duration::ZERO;
    for name in [
        "example.com.default.svc.cluster.local",
        "example.com.svc.cluster.local",
        "example.com.cluster.local",
        "www.Example.COM.default.svc.cluster.local",
    ] {
        for qtype in ["A", "AAAA"] {
            let r = dns.dig(&[name, qtype]);
            r.assert_negative("NXDOMAIN", "cluster.local.");
            let t = r.query_time.expect("dig prints the query time");
            slowest = slowest.max(t);
        }
    }
    println!("search-path expansions: slowest dig query time {slowest:?}");
    assert!(
        slowest < Duration::from_millis(250),
        "from memory, fast: {slowest:?}"
    );
    let forwarded: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|(n, _)| n.to_ascii_lowercase().contains("cluster.local"))
        .collect();
    assert!(
        forwarded.is_empty(),
        "cluster names forwarded: {forwarded:?}"
    );
}

#[test]
fn zone_apex_version_and_case_insensitivity() {
    let (dns, _up) = fixture();
    let soa = dns.dig(&["cluster.local", "SOA"]);
    assert_eq!(soa.status(), "NOERROR", "{}", soa.raw);
    assert_eq!(soa.answer.len(), 1, "{}", soa.raw);
    assert_eq!(soa.answer[0].rtype, "SOA");
    let fields: Vec<&str> = soa.answer[0].data.split_whitespace().collect();
    assert_eq!(fields.len(), 7, "{}", soa.raw);
    assert_eq!(
        (fields[0], fields[1]),
        ("ns.dns.cluster.local.", "hostmaster.cluster.local."),
        "{}",
        soa.raw
    );
    assert!(fields[2].parse::<u32>().is_ok_and(|s| s > 0), "serial");
    assert_eq!(fields[6], TTL.to_string(), "minimum = TTL: {}", soa.raw);
    assert!(soa.flags.contains("aa"), "{}", soa.raw);

    let ns = dns.dig(&["cluster.local", "NS"]);
    assert_eq!(ns.status(), "NOERROR", "{}", ns.raw);
    assert_eq!(
        ns.answers("NS"),
        vec!["ns.dns.cluster.local."],
        "{}",
        ns.raw
    );
    // The name server's address is kube-dns's ClusterIP (glue).
    assert_eq!(ns.additionals("A"), vec!["10.96.0.10"], "{}", ns.raw);
    let glue = dns.dig(&["ns.dns.cluster.local", "A"]);
    assert_eq!(glue.answers("A"), vec!["10.96.0.10"], "{}", glue.raw);

    let txt = dns.dig(&["dns-version.cluster.local", "TXT"]);
    assert_eq!(txt.status(), "NOERROR", "{}", txt.raw);
    assert_eq!(txt.answers("TXT"), vec!["\"1.1.0\""], "{}", txt.raw);
    assert_ttls(&txt);

    // Names compare case-insensitively, every kind of them.
    for (name, qtype, want) in [
        ("WEB.Default.SVC.Cluster.Local", "A", "10.96.0.20"),
        ("Db-0.DB.default.svc.CLUSTER.local", "A", "10.0.0.1"),
        (
            "_HTTP._Tcp.web.default.svc.cluster.local",
            "SRV",
            "0 100 80 web.default.svc.cluster.local.",
        ),
        ("DNS-Version.Cluster.Local", "TXT", "\"1.1.0\""),
        ("10-1-2-3.DEFAULT.Pod.cluster.local", "A", "10.1.2.3"),
        (
            "20.0.96.10.IN-ADDR.ARPA",
            "PTR",
            "web.default.svc.cluster.local.",
        ),
        ("CLUSTER.LOCAL", "NS", "ns.dns.cluster.local."),
    ] {
        let r = dns.dig(&[name, qtype]);
        assert_eq!(r.status(), "NOERROR", "{name}: {}", r.raw);
        assert_eq!(r.answers(qtype), vec![want], "{name}: {}", r.raw);
    }
    dns.dig(&["NOPE.Default.Svc.Cluster.Local", "A"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    dns.dig(&["Quiet.SVC.cluster.local", "A"])
        .assert_negative("NOERROR", "cluster.local.");
}

#[test]
fn protocol_errors_edns_and_refusals() {
    let (dns, _up) = fixture();
    // EDNS version 1: BADVERS.
    let badvers = dns.dig(&[
        "+edns=1",
        "+noednsnegotiation",
        "web.default.svc.cluster.local",
    ]);
    assert_eq!(badvers.status(), "BADVERS", "{}", badvers.raw);
    // No EDNS in the query: none in the reply.
    let plain = dns.dig(&["+noedns", "web.default.svc.cluster.local"]);
    assert_eq!(plain.status(), "NOERROR", "{}", plain.raw);
    assert!(plain.edns.is_none(), "{}", plain.raw);
    assert_eq!(plain.answers("A"), vec!["10.96.0.20"], "{}", plain.raw);
    // Zone transfers are refused (dig asks AXFR over TCP).
    let axfr = run_dig({
        let mut c = Command::new("dig");
        c.arg(format!("@{}", dns.addr.ip()))
            .arg("-p")
            .arg(dns.addr.port().to_string())
            .args(["+time=5", "+tries=1", "cluster.local", "AXFR"]);
        c
    });
    assert!(
        axfr.raw.contains("Transfer failed") || axfr.raw.contains("REFUSED"),
        "AXFR refused: {}",
        axfr.raw
    );
    // Chaos class: REFUSED.
    let ch = dns.dig(&["-c", "CH", "version.bind", "TXT"]);
    assert_eq!(ch.status(), "REFUSED", "{}", ch.raw);
    // Still serving.
    let a = dns.dig(&["web.default.svc.cluster.local"]);
    assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
}

#[test]
fn updates_are_served_at_once() {
    let (dns, _up) = fixture();
    dns.dig(&["late.default.svc.cluster.local"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    let mut services = fixture_services();
    services.push(json!({"metadata": {"name": "late", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.99", "ports": [{"name": "p", "port": 1}]}}));
    dns.update(&services, &fixture_slices(), &["default"]);
    let a = dns.dig(&["late.default.svc.cluster.local"]);
    assert_eq!(a.answers("A"), vec!["10.96.0.99"], "{}", a.raw);
    // The SOA serial moves with every update.
    let serial = |r: &Reply| -> u64 {
        r.answer[0]
            .data
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap()
    };
    let before = serial(&dns.dig(&["cluster.local", "SOA"]));
    dns.update(&fixture_services(), &fixture_slices(), &["default"]);
    let after = serial(&dns.dig(&["cluster.local", "SOA"]));
    assert!(after > before, "serial {before} -> {after}");
    dns.dig(&["late.default.svc.cluster.local"])
        .assert_negative("NXDOMAIN", "cluster.local.");
}

// ---- acceptance 3: forwarding ---------------------------------------------------

/// `--dns-rrl`: a client past its rate gets no answers, except every
/// second query an empty truncated reply (so a real client retries over
/// TCP); another client is answered all the while.
#[test]
fn rate_limited_clients_are_slipped_and_others_answered() {
    let upstream = Upstream::start();
    let dns = Dns::start(vec![upstream.addr], |c| c.rrl = Some(5));
    dns.update(&fixture_services(), &fixture_slices(), &["default"]);
    // The flooding client: another loopback address than dig's.
    let flood = UdpSocket::bind("127.0.0.2:0").unwrap();
    flood
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for id in 0..40u16 {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        flood.send_to(&m.to_vec().unwrap(), dns.addr).unwrap();
    }
    let (mut answered, mut truncated) = (0, 0);
    let mut buf = [0u8; 4096];
    while let Ok((n, _)) = flood.recv_from(&mut buf) {
        let m = Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.truncation {
            assert!(m.answers.is_empty());
            truncated += 1;
        } else {
            assert_eq!(m.answers.len(), 1);
            answered += 1;
        }
    }
    println!("40 queries at once: {answered} answered, {truncated} truncated");
    assert!(
        (5..=7).contains(&answered),
        "a burst of 5 (plus what refilled meanwhile): {answered}"
    );
    assert!(
        (15..=18).contains(&truncated),
        "every second limited query slips: {truncated}"
    );
    // Another client meanwhile: answered.
    let r = dns.dig(&["web.default.svc.cluster.local", "A"]);
    assert_eq!(r.answers("A"), vec!["10.96.0.20"], "{}", r.raw);
}

/// Prefetch: a name asked for again near the end of its cached TTL is
/// refreshed from the upstream in the background, so a query after the
/// first answer would have expired is still a cache hit: the upstream sees
/// the refresh, not the client's query.
#[test]
fn popular_names_are_prefetched_before_they_expire() {
    let up = Upstream::start();
    // Cache answers for at most 2 s: prefetch is due in their last second.
    let dns = Dns::start(vec![up.addr], |c| c.cache_max_ttl = Duration::from_secs(2));
    let asked = || {
        up.seen()
            .iter()
            .filter(|(n, t)| n == "outside.example." && *t == RecordType::A)
            .count()
    };
    let first = Instant::now();
    let ask = || {
        let r = dns.dig(&["outside.example", "A"]);
        assert_eq!(r.answers("A"), vec!["192.0.2.1"], "{}", r.raw);
    };
    ask();
    ask();
    assert_eq!(asked(), 1, "the second query is a cache hit");
    // Into the answer's last second (a wait for time itself).
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(first.elapsed()));
    ask();
    let deadline = Instant::now() + Duration::from_secs(2);
    while asked() < 2 {
        assert!(
            Instant::now() < deadline,
            "no prefetch reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the first answer's expiry: answered from the refreshed entry.
    std::thread::sleep(Duration::from_millis(2300).saturating_sub(first.elapsed()));
    ask();
    assert_eq!(
        asked(),
        2,
        "answered from the prefetched entry: {:?}",
        up.seen()
    );
}

/// RFC 8767 serve-stale: once a cached answer's TTL has passed and no
/// upstream answers, the expired answer is served with a 30 s TTL; a name
/// never seen gets SERVFAIL within the forward timeout.
#[test]
fn stale_answers_are_served_when_the_upstream_is_down() {
    let mut up = Upstream::start();
    // Cache answers for at most 1 s, so they expire during the test.
    let dns = Dns::start(vec![up.addr], |c| c.cache_max_ttl = Duration::from_secs(1));
    let r = dns.dig(&["outside.example", "A"]);
    assert_eq!(r.answers("A"), vec!["192.0.2.1"], "{}", r.raw);
    up.stop();
    // Past the TTL (a wait for time itself, not for an event).
    std::thread::sleep(Duration::from_millis(1500));
    let stale = dns.dig(&["outside.example", "A"]);
    assert_eq!(stale.status(), "NOERROR", "{}", stale.raw);
    assert_eq!(stale.answers("A"), vec!["192.0.2.1"], "{}", stale.raw);
    assert_eq!(stale.answer[0].ttl, 30, "the stale TTL: {}", stale.raw);
    let never = dns.dig(&["never.example", "A"]);
    assert_eq!(never.status(), "SERVFAIL", "{}", never.raw);
    assert!(never.elapsed < PROMPTLY, "took {:?}", never.elapsed);
}

/// Forwarded queries in flight are bounded: past `max_concurrent_forwards`
/// a query gets SERVFAIL at once, without reaching an upstream, while the
/// earlier ones still wait for theirs.
#[test]
fn forwards_past_the_limit_get_servfail_at_once() {
    let silent = bind_upstream_port();
    let dns = Dns::start(vec![silent.local_addr().unwrap()], |c| {
        c.max_concurrent_forwards = 1;
        // Longer than PROMPTLY, shorter than dig's own wait.
        c.forward_timeout = Duration::from_secs(5);
    });
    let addr = dns.addr;
    // The name of the next query the upstream gets within `wait`.
    let upstream_got = |wait: Duration| -> Option<String> {
        silent.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = silent.recv_from(&mut buf).ok()?;
        let q = Message::from_vec(&buf[..n]).expect("a DNS query");
        Some(q.queries[0].name().to_ascii().to_lowercase())
    };
    let first = std::thread::spawn(move || dig(addr, &["first.example", "A"]));
    // The first query is in flight once the upstream has it.
    let got = upstream_got(Duration::from_secs(5));
    assert_eq!(got.as_deref(), Some("first.example."));
    let second = dns.dig(&["second.example", "A"]);
    assert_eq!(second.status(), "SERVFAIL", "{}", second.raw);
    assert!(second.elapsed < PROMPTLY, "took {:?}", second.elapsed);
    // Only the first reached the upstream (retries of it may follow).
    while let Some(name) = upstream_got(Duration::from_millis(200)) {
        assert_eq!(name, "first.example.");
    }
    let first = first.join().unwrap();
    assert_eq!(first.status(), "SERVFAIL", "{}", first.raw);
    // The slot is free again: the next query is forwarded (and times out).
    let third = std::thread::spawn(move || dig(addr, &["third.example", "A"]));
    let got = upstream_got(Duration::from_secs(5));
    assert_eq!(got.as_deref(), Some("third.example."));
    assert_eq!(third.join().unwrap().status(), "SERVFAIL");
}

#[test]
fn forwarding_to_the_upstream_and_servfail_when_it_is_down() {
    let (dns, mut up) = fixture();
    let r = dns.dig(&["outside.example", "A"]);
    assert_eq!(r.status(), "NOERROR", "{}", r.raw);
    assert_eq!(r.answers("A"), vec!["192.0.2.1"], "{}", r.raw);
    assert!(
        !r.flags.contains("aa"),
        "forwarded answers are not ours: {}",
        r.raw
    );
    assert!(r.flags.contains("ra"), "{}", r.raw);
    assert!(
        up.seen()
            .contains(&("outside.example.".to_string(), RecordType::A)),
        "the upstream answered it: {:?}",
        up.seen()
    );
    // The upstream's NXDOMAIN (with its SOA) is passed on.
    let nx = dns.dig(&["missing.example", "A"]);
    assert_eq!(nx.status(), "NXDOMAIN", "{}", nx.raw);
    assert_eq!(
        data_of(&nx.authority, "SOA").len(),
        1,
        "upstream SOA: {}",
        nx.raw
    );
    // RFC 2308: negative answers are cached (for the SOA's minimum, here
    // 30 s): asking again, NXDOMAIN or NODATA, does not reach the upstream.
    let nodata = dns.dig(&["outside.example", "AAAA"]);
    assert_eq!(nodata.status(), "NOERROR", "{}", nodata.raw);
    assert!(nodata.answer.is_empty(), "{}", nodata.raw);
    let again = dns.dig(&["missing.example", "A"]);
    assert_eq!(again.status(), "NXDOMAIN", "{}", again.raw);
    assert_eq!(data_of(&again.authority, "SOA").len(), 1, "{}", again.raw);
    let again = dns.dig(&["outside.example", "AAAA"]);
    assert_eq!(again.status(), "NOERROR", "{}", again.raw);
    let asked_for = |name: &str, t: RecordType| {
        up.seen()
            .iter()
            .filter(|(n, q)| n == name && *q == t)
            .count()
    };
    assert_eq!(
        asked_for("missing.example.", RecordType::A),
        1,
        "{:?}",
        up.seen()
    );
    assert_eq!(
        asked_for("outside.example.", RecordType::AAAA),
        1,
        "{:?}",
        up.seen()
    );
    let asked = up.seen().len();

    // Upstream gone (its port closed).
    up.stop();
    // An answer already cached is still served (within its TTL).
    let cached = dns.dig(&["outside.example", "A"]);
    assert_eq!(cached.answers("A"), vec!["192.0.2.1"], "{}", cached.raw);
    assert!(
        cached.answer[0].ttl <= 60,
        "cached TTL counts down: {}",
        cached.raw
    );
    // A new name: SERVFAIL, promptly.
    let sf = dns.dig(&["second.example", "A"]);
    assert_eq!(sf.status(), "SERVFAIL", "{}", sf.raw);
    println!("upstream port closed: SERVFAIL after {:?}", sf.elapsed);
    assert!(sf.elapsed < PROMPTLY, "took {:?}", sf.elapsed);
    assert_eq!(up.seen().len(), asked, "nothing reached a stopped upstream");
    // Cluster names do not depend on the upstream.
    let web = dns.dig(&["web.default.svc.cluster.local"]);
    assert_eq!(web.answers("A"), vec!["10.96.0.20"], "{}", web.raw);

    // An upstream that swallows queries: SERVFAIL once the forward timeout
    // passes, before the client gives up.
    let silent = bind_upstream_port();
    let dns2 = Dns::start(vec![silent.local_addr().unwrap()], |_| {});
    let sf = dns2.dig(&["outside.example", "A"]);
    assert_eq!(sf.status(), "SERVFAIL", "{}", sf.raw);
    println!("upstream silent: SERVFAIL after {:?}", sf.elapsed);
    assert!(sf.elapsed < PROMPTLY, "took {:?}", sf.elapsed);

    // A silent upstream and a working one: answered by the working one.
    let good = Upstream::start();
    let dns3 = Dns::start(vec![silent.local_addr().unwrap(), good.addr], |_| {});
    for name in ["outside.example", "second.example"] {
        let r = dns3.dig(&[name, "A"]);
        assert_eq!(r.status(), "NOERROR", "{name}: {}", r.raw);
        assert_eq!(r.answer.len(), 1, "{}", r.raw);
        println!(
            "one of two upstreams silent: {name} answered after {:?}",
            r.elapsed
        );
        assert!(r.elapsed < PROMPTLY, "took {:?}", r.elapsed);
    }
}

// ---- acceptance 4: malformed packets ----------------------------------------------

/// Send `packet` from a fresh UDP socket; the reply within `wait`, if any.
fn raw_udp(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(packet, server).unwrap();
    let mut buf = [0u8; 4096];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// A 12-byte header: ID, flags (RD), and the four counts.
fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

/// A one-question query whose question is `name_bytes` + type A + class IN.
fn query_with_name(id: u16, name_bytes: &[u8]) -> Vec<u8> {
    let mut p = header(id, 0x0100, [1, 0, 0, 0]);
    p.extend_from_slice(name_bytes);
    p.extend_from_slice(&[0, 1, 0, 1]);
    p
}

fn rcode(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

#[test]
fn malformed_packets_get_formerr_or_nothing_and_the_server_keeps_answering() {
    let (dns, _up) = fixture();
    let wait = Duration::from_millis(500);
    const FORMERR: u8 = 1;
    const NOTIMP: u8 = 4;
    // An EDNS0 OPT record: root name, type 41, payload 1232, no options.
    const OPT: [u8; 11] = [0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0];
    let good_name: &[u8] = b"\x03web\x07default\x03svc\x07cluster\x05local\x00";

    // Dropped: not even a header, or not a query.
    for (what, packet) in [
        ("empty datagram", Vec::new()),
        (
            "truncated header (5 bytes)",
            vec![0x12, 0x34, 0x01, 0x00, 0x00],
        ),
        (
            "truncated header (11 bytes)",
            header(0x1234, 0x0100, [1, 0, 0, 0])[..11].to_vec(),
        ),
        ("a response", {
            let mut p = query_with_name(0x1235, good_name);
            p[2] |= 0x80;
            p
        }),
    ] {
        assert_eq!(raw_udp(dns.addr, &packet, wait), None, "{what}: no reply");
    }

    // FORMERR with the request's ID.
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "question count 1, no question",
            header(0x2001, 0x0100, [1, 0, 0, 0]),
        ),
        ("question count 0", header(0x2002, 0x0100, [0, 0, 0, 0])),
        ("question count 2", {
            let mut p = query_with_name(0x2003, good_name);
            p[5] = 2;
            p
        }),
        // Label length 63 with 3 bytes after it.
        ("label longer than the packet", {
            let mut p = header(0x2004, 0x0100, [1, 0, 0, 0]);
            p.extend_from_slice(&[63, b'a', b'b', b'c']);
            p
        }),
        (
            "label length past the question",
            query_with_name(0x2005, b"\x20web\x00"),
        ),
        // 0x40 and 0x80 are the reserved label types.
        (
            "reserved label type 01",
            query_with_name(0x2006, b"\x41web\x00"),
        ),
        (
            "reserved label type 10",
            query_with_name(0x2007, b"\x83web\x00"),
        ),
        ("name without its terminating zero", {
            let mut p = header(0x2008, 0x0100, [1, 0, 0, 0]);
            p.extend_from_slice(b"\x03web");
            p
        }),
        // Compression pointer to itself (offset 12 is the question name).
        (
            "compression loop onto itself",
            query_with_name(0x2009, &[0xc0, 12]),
        ),
        // Label then a pointer back to that label: a.a.a.a...
        (
            "compression loop through a label",
            query_with_name(0x200a, &[1, b'a', 0xc0, 12]),
        ),
        // Pointer forward, past the end of the packet.
        (
            "compression pointer past the end",
            query_with_name(0x200b, &[0xc0, 0xff]),
        ),
        // Two names pointing at each other: the question's pointer goes to
        // the answer's name, which points back.
        ("compression loop across records", {
            let mut p = header(0x200c, 0x0100, [1, 1, 0, 0]);
            p.extend_from_slice(&[0xc0, 18]); // offset 12 -> 18
            p.extend_from_slice(&[0, 1, 0, 1]); // offset 14..18
            p.extend_from_slice(&[0xc0, 12]); // offset 18 -> 12
            p.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
            p
        }),
        // Over 255 bytes of name through repeated labels.
        ("name longer than 255 bytes", {
            let mut name = Vec::new();
            for _ in 0..5 {
                name.push(63);
                name.extend_from_slice(&[b'x'; 63]);
            }
            name.push(0);
            query_with_name(0x200d, &name)
        }),
        ("answer count claims a record that is not there", {
            let mut p = query_with_name(0x200e, good_name);
            p[7] = 1;
            p
        }),
        ("two OPT records", {
            let mut p = query_with_name(0x2011, good_name);
            p[11] = 2;
            p.extend_from_slice(&OPT);
            p.extend_from_slice(&OPT);
            p
        }),
        ("OPT record in the answer section", {
            let mut p = query_with_name(0x2012, good_name);
            p[7] = 1;
            p.extend_from_slice(&OPT);
            p
        }),
        ("OPT record whose data runs past the end", {
            let mut p = query_with_name(0x2013, good_name);
            p[11] = 1;
            p.extend_from_slice(&OPT[..9]);
            p.extend_from_slice(&[0, 16]);
            p
        }),
        ("question of type OPT", {
            let mut p = header(0x2014, 0x0100, [1, 0, 0, 0]);
            p.extend_from_slice(good_name);
            p.extend_from_slice(&[0, 41, 0, 1]);
            p
        }),
        ("question without type and class", {
            let mut p = header(0x200f, 0x0100, [1, 0, 0, 0]);
            p.extend_from_slice(good_name);
            p
        }),
    ];
    // Random garbage behind a valid-looking header.
    let mut garbage = header(0x2010, 0x0100, [1, 0, 0, 0]);
    garbage.extend((0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0xc0));
    cases.push(("garbage", garbage));

    for (what, packet) in &cases {
        let id = u16::from_be_bytes([packet[0], packet[1]]);
        match raw_udp(dns.addr, packet, wait) {
            Some(reply) => {
                assert!(reply.len() >= 12, "{what}: short reply {reply:?}");
                assert_eq!(
                    u16::from_be_bytes([reply[0], reply[1]]),
                    id,
                    "{what}: the request's ID"
                );
                assert!(reply[2] & 0x80 != 0, "{what}: QR set");
                assert_eq!(rcode(&reply), FORMERR, "{what}: FORMERR, got {reply:?}");
            }
            None => panic!("{what}: no reply (FORMERR expected)"),
        }
    }

    // Opcodes other than QUERY (NOTIFY, UPDATE): NOTIMP.
    for opcode in [4u8, 5] {
        let mut p = query_with_name(0x3000 + u16::from(opcode), good_name);
        p[2] = opcode << 3;
        let reply = raw_udp(dns.addr, &p, wait).expect("a reply");
        assert_eq!(rcode(&reply), NOTIMP, "opcode {opcode}: {reply:?}");
    }

    // The same over TCP: FORMERR, and the connection keeps serving.
    let mut tcp = TcpStream::connect(dns.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (what, packet) in &cases {
        let reply = tcp_exchange(&mut tcp, packet).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(rcode(&reply), FORMERR, "{what} over TCP: {reply:?}");
    }
    let ok = tcp_exchange(&mut tcp, &query_with_name(0x3002, good_name)).unwrap();
    assert_eq!(rcode(&ok), 0, "{ok:?}");
    // A frame that announces more than it sends, then the client goes away.
    let mut half = TcpStream::connect(dns.addr).unwrap();
    half.write_all(&[0x01, 0x00, 0x12, 0x34, 0x01]).unwrap();
    drop(half);

    // And it still answers, over UDP and TCP.
    let a = dns.dig(&["web.default.svc.cluster.local"]);
    assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
    let t = dns.dig(&["+tcp", "web.default.svc.cluster.local"]);
    assert_eq!(t.answers("A"), vec!["10.96.0.20"], "{}", t.raw);
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A random but well-formed query near the names the server knows.
fn random_query(rng: &mut Rng) -> Message {
    const LABELS: [&str; 34] = [
        "web",
        "db",
        "db-0",
        "db-2",
        "10-0-0-2",
        "empty",
        "ext",
        "default",
        "kube-system",
        "quiet",
        "svc",
        "pod",
        "cluster",
        "local",
        "in-addr",
        "arpa",
        "ip6",
        "10",
        "0",
        "96",
        "20",
        "1",
        "f",
        "d",
        "-",
        "--",
        "_http",
        "_tcp",
        "_udp",
        "dns-version",
        "ns",
        "dns",
        "*",
        "10-244-1-7",
    ];
    const SUFFIXES: [&[&str]; 6] = [
        &["svc", "cluster", "local"],
        &["cluster", "local"],
        &["pod", "cluster", "local"],
        &["in-addr", "arpa"],
        &["ip6", "arpa"],
        &[],
    ];
    const TYPES: [RecordType; 14] = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::PTR,
        RecordType::TXT,
        RecordType::NS,
        RecordType::SOA,
        RecordType::CNAME,
        RecordType::ANY,
        RecordType::MX,
        RecordType::CAA,
        RecordType::HTTPS,
        RecordType::NULL,
        RecordType::Unknown(65280),
    ];
    let mut labels: Vec<String> = (0..rng.below(6))
        .map(|_| rng.pick(&LABELS).to_string())
        .collect();
    labels.extend(rng.pick(&SUFFIXES).iter().map(|l| l.to_string()));
    if rng.below(4) == 0 {
        labels = labels
            .into_iter()
            .map(|l| {
                if rng.below(2) == 0 {
                    l.to_ascii_uppercase()
                } else {
                    l
                }
            })
            .collect();
    }
    let name = Name::from_labels(labels.iter().map(|l| l.as_bytes())).expect("a name");
    let mut m = Message::query();
    m.metadata.recursion_desired = rng.below(2) == 0;
    m.add_query(hickory_proto::op::Query::query(name, *rng.pick(&TYPES)));
    if rng.below(2) == 0 {
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(rng.below(5000) as u16);
        edns.set_dnssec_ok(rng.below(2) == 0);
        m.set_edns(edns);
    }
    m
}

#[test]
fn random_queries_and_mutated_packets_never_stop_the_server() {
    let upstream = Upstream::start();
    // One UDP worker: a panic in it would silence UDP for good.
    let dns = Dns::start(vec![upstream.addr], |c| c.udp_workers = 1);
    dns.update(
        &fixture_services(),
        &fixture_slices(),
        &["default", "kube-system", "quiet"],
    );
    // DNS_FUZZ_SEED=<n> explores other inputs; the default is fixed.
    let seed = std::env::var("DNS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed | 1);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 65535];

    // Well-formed queries: each gets a well-formed reply to it, never
    // FORMERR.
    let mut valid = Vec::new();
    for i in 0..500 {
        let q = random_query(&mut rng);
        let bytes = q.to_vec().expect("encode");
        sock.send_to(&bytes, dns.addr).unwrap();
        let reply = loop {
            let (n, _) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("query {i} {:?}: no reply: {e}", q.queries));
            let m = Message::from_vec(&buf[..n]).expect("a well-formed reply");
            if m.metadata.id == q.metadata.id {
                break m;
            }
        };
        assert_ne!(
            reply.metadata.response_code,
            ResponseCode::FormErr,
            "{:?}",
            q.queries
        );
        assert_eq!(reply.queries, q.queries, "the question is echoed");
        valid.push(bytes);
    }

    // Mutations of them (bytes flipped, cut short, grown): whatever comes
    // back is a response, and the server answers a good query after each
    // batch.
    let good = query_with_name(0x7777, b"\x03web\x07default\x03svc\x07cluster\x05local\x00");
    let mut replies = 0;
    for batch in 0..40 {
        for _ in 0..50 {
            let mut p = rng.pick(&valid).clone();
            match rng.below(3) {
                0 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(p.len());
                        p[i] ^= 1 << rng.below(8);
                    }
                }
                1 => p.truncate(rng.below(p.len())),
                _ => p.extend((0..1 + rng.below(40)).map(|_| rng.next() as u8)),
            }
            if let Some(flags) = p.get_mut(2) {
                *flags &= 0x7f; // keep QR clear (responses are dropped unread)
            }
            sock.send_to(&p, dns.addr).unwrap();
        }
        sock.send_to(&good, dns.addr).unwrap();
        loop {
            let (n, _) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("batch {batch}: server stopped answering: {e}"));
            assert!(n >= 12 && buf[2] & 0x80 != 0, "a response: {:?}", &buf[..n]);
            replies += 1;
            if buf[..2] == [0x77, 0x77] && n > 12 {
                assert_eq!(rcode(&buf[..n]), 0);
                break;
            }
        }
    }
    assert!(replies > 40, "replies to mutated packets too: {replies}");
    let a = dns.dig(&["web.default.svc.cluster.local"]);
    assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
}

/// One length-prefixed exchange on a TCP connection.
fn tcp_exchange(s: &mut TcpStream, packet: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

// ---- acceptance 5: TCP and truncation ------------------------------------------------

/// A flood of idle TCP connections from one client: past its share
/// (`max_tcp_per_client`) the server closes them at once; UDP keeps
/// answering, another client's TCP query gets through, and the client gets
/// TCP back once its connections close.
#[test]
fn tcp_flood_from_one_client_leaves_udp_and_other_clients_served() {
    let up = Upstream::start();
    let dns = Dns::start(vec![up.addr], |c| c.max_tcp_per_client = 8);
    dns.update(&fixture_services(), &fixture_slices(), &["default"]);
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(dns.addr).unwrap())
        .collect();
    for s in &flood {
        s.set_nonblocking(true).unwrap();
    }
    // Closed by the server: EOF. Still open: nothing to read.
    let closed = |flood: &[TcpStream]| {
        flood
            .iter()
            .filter(|s| {
                let mut r: &TcpStream = s;
                matches!(r.read(&mut [0u8; 1]), Ok(0))
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed(&flood) < 32 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(closed(&flood), 32, "all but the client's 8 closed");

    let udp = dns.dig(&["web.default.svc.cluster.local", "A"]);
    assert_eq!(udp.answers("A"), vec!["10.96.0.20"], "{}", udp.raw);
    let other = dns.dig(&[
        "-b",
        "127.0.0.2",
        "+tcp",
        "web.default.svc.cluster.local",
        "A",
    ]);
    assert_eq!(other.answers("A"), vec!["10.96.0.20"], "{}", other.raw);
    let mine = dns.dig(&["+tcp", "+tries=1", "web.default.svc.cluster.local", "A"]);
    assert!(
        mine.answers("A").is_empty(),
        "over its share:\n{}",
        mine.raw
    );

    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = dns.dig(&["+tcp", "+tries=1", "web.default.svc.cluster.local", "A"]);
        if again.answers("A") == vec!["10.96.0.20"] {
            break;
        }
        assert!(Instant::now() < deadline, "no TCP back:\n{}", again.raw);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each UDP receive loop has its own socket on the port (SO_REUSEPORT),
/// and queries from many source ports, spread over them by the kernel,
/// are all answered.
#[test]
fn udp_receive_loops_have_a_socket_each() {
    let dns = Dns::start(Vec::new(), |c| {
        c.udp_workers = 3;
        c.udp_reuseport = true;
    });
    dns.update(&fixture_services(), &fixture_slices(), &["default"]);
    let port = dns.addr.port().to_string();
    let out = Command::new("ss")
        .args(["-Huan", "sport", "=", &format!(":{port}")])
        .output()
        .expect("ss");
    let sockets = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(sockets, 3, "UDP sockets on :{port}");
    for i in 0..60u16 {
        let mut q = Message::query();
        q.metadata.id = i;
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(PROMPTLY)).unwrap();
        c.send_to(&q.to_vec().unwrap(), dns.addr).unwrap();
        let mut buf = [0u8; 512];
        let n = c
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("query {i}: {e}"));
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.metadata.id, i);
        assert_eq!(r.answers.len(), 1, "{r:?}");
    }
}

/// Stopping the server wakes its receive threads (blocked in `recvmmsg`
/// with nothing arriving) and closes their sockets before it returns: the
/// port is free at once, for a restarted node to bind.
#[test]
fn stopping_frees_the_udp_port_while_receivers_wait() {
    for blocking in [true, false] {
        // Blocking receivers on one shared socket (the default), and event
        // loops with a socket each.
        let mut dns = Dns::start(Vec::new(), |c| {
            c.udp_workers = 2;
            c.udp_blocking = blocking;
            c.udp_reuseport = !blocking;
        });
        dns.update(&fixture_services(), &fixture_slices(), &["default"]);
        let a = dns.dig(&["web.default.svc.cluster.local", "A"]);
        assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
        let addr = dns.addr;
        let (done, stopped) = std::sync::mpsc::channel();
        let server = dns.server.take().expect("running");
        let rt = dns.rt.handle().clone();
        std::thread::spawn(move || {
            let _runtime = rt.enter();
            drop(server);
            let _ = done.send(());
        });
        stopped
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("blocking={blocking}: stopping hung"));
        UdpSocket::bind(addr)
            .unwrap_or_else(|e| panic!("blocking={blocking}: {addr} still bound after stop: {e}"));
    }
}

#[test]
fn tcp_queries() {
    let (dns, _up) = fixture();
    let a = dns.dig(&["+tcp", "web.default.svc.cluster.local", "A"]);
    assert_eq!(a.status(), "NOERROR", "{}", a.raw);
    assert_eq!(a.answers("A"), vec!["10.96.0.20"], "{}", a.raw);
    assert!(a.flags.contains("aa"), "{}", a.raw);
    let srv = dns.dig(&["+tcp", "_pg._tcp.db.default.svc.cluster.local", "SRV"]);
    assert_eq!(srv.answers("SRV").len(), 2, "{}", srv.raw);
    assert_eq!(srv.additionals("A").len(), 2, "{}", srv.raw);
    dns.dig(&["+tcp", "nope.default.svc.cluster.local"])
        .assert_negative("NXDOMAIN", "cluster.local.");
    let ptr = dns.dig(&["+tcp", "-x", "10.96.0.20"]);
    assert_eq!(
        ptr.answers("PTR"),
        vec!["web.default.svc.cluster.local."],
        "{}",
        ptr.raw
    );
    let fwd = dns.dig(&["+tcp", "outside.example"]);
    assert_eq!(fwd.answers("A"), vec!["192.0.2.1"], "{}", fwd.raw);

    // Several queries pipelined on one connection, answered in turn.
    let mut s = TcpStream::connect(dns.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let names = [
        b"\x03web\x07default\x03svc\x07cluster\x05local\x00".as_slice(),
        b"\x02db\x07default\x03svc\x07cluster\x05local\x00".as_slice(),
        b"\x04nope\x07default\x03svc\x07cluster\x05local\x00".as_slice(),
    ];
    let mut burst = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let q = query_with_name(0x4000 + i as u16, n);
        burst.extend_from_slice(&(q.len() as u16).to_be_bytes());
        burst.extend_from_slice(&q);
    }
    s.write_all(&burst).unwrap();
    for (i, want) in [(0, (0u8, 1usize)), (1, (0, 2)), (2, (3, 0))] {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        let m = Message::from_vec(&buf).expect("a valid reply");
        assert_eq!(m.metadata.id, 0x4000 + i as u16);
        assert_eq!(
            (m.metadata.response_code.low(), m.answers.len()),
            want,
            "reply {i}: {m:?}"
        );
    }
}

#[test]
fn large_headless_answer_is_truncated_then_retried_over_tcp() {
    let (dns, _up) = fixture();
    let ips: Vec<String> = (1..=100).map(|i| format!("10.1.0.{i}")).collect();
    let eps = |range: std::ops::Range<usize>| -> Value {
        Value::Array(
            ips[range]
                .iter()
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
                .collect(),
        )
    };
    let mut services = fixture_services();
    services.push(json!({"metadata": {"name": "big", "namespace": "default"},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}));
    let mut slices = fixture_slices();
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    slices.push(slice("big", "big-1", ports.clone(), eps(0..60)));
    slices.push(slice("big", "big-2", ports, eps(60..100)));
    dns.update(&services, &slices, &["default"]);
    let want: Vec<String> = {
        let mut v = ips.clone();
        v.sort();
        v
    };

    // Over UDP alone the answer does not fit: TC, no partial RRset.
    for edns in ["+edns=0", "+noedns"] {
        let udp = dns.dig(&["+ignore", edns, "big.default.svc.cluster.local"]);
        assert_eq!(udp.status(), "NOERROR", "{}", udp.raw);
        assert!(udp.flags.contains("tc"), "{edns}: TC set:\n{}", udp.raw);
        assert!(udp.answer.len() < 100, "{edns}: {}", udp.raw);
        assert!(!udp.retried_tcp, "{}", udp.raw);
    }
    // dig's default: truncated over UDP, retried over TCP, all 100 records.
    let full = dns.dig(&["big.default.svc.cluster.local"]);
    assert!(full.retried_tcp, "dig retried over TCP:\n{}", full.raw);
    assert_eq!(full.status(), "NOERROR", "{}", full.raw);
    assert!(!full.flags.contains("tc"), "{}", full.raw);
    assert_eq!(full.answers("A"), want, "{}", full.raw);
    assert_ttls(&full);
    // Straight over TCP too; and the SRV set (100 targets + additionals).
    let tcp = dns.dig(&["+tcp", "big.default.svc.cluster.local"]);
    assert_eq!(tcp.answers("A"), want, "{}", tcp.raw);
    let srv = dns.dig(&["_http._tcp.big.default.svc.cluster.local", "SRV"]);
    assert!(srv.retried_tcp, "{}", srv.raw);
    assert_eq!(srv.answers("SRV").len(), 100, "{}", srv.raw);
    // A small answer is not truncated.
    let small = dns.dig(&["+ignore", "+noedns", "db.default.svc.cluster.local"]);
    assert!(!small.flags.contains("tc"), "{}", small.raw);
    assert_eq!(small.answers("A").len(), 2, "{}", small.raw);
}

// ---- acceptance 2: end to end, through the API server ------------------------------------

/// The bound on "visible in DNS within a bounded time".
const CONVERGE: Duration = Duration::from_secs(5);

/// Not a test: the network client the end-to-end test's cluster starts
/// inside its namespace (`common::netns::Agent`). Returns at once in a
/// normal run.
#[test]
fn agent() {
    common::netns::agent_main();
}

/// `fairlead up` in a namespace of its own (outside names go to a resolver
/// that is down), with kubectl and dig run there.
fn start_node() -> Cluster {
    Cluster::up(
        "dns",
        &["--proxy-mode", "userspace", "--dns-upstream", "127.0.0.1:9"],
    )
}

/// `dig @10.96.0.10` (port 53) inside the namespace.
fn dig_in(node: &Cluster, args: &[&str]) -> Reply {
    let mut cmd = node.ns.command("dig");
    cmd.arg("@10.96.0.10").args(DIG_COMMON).args(args);
    run_dig(cmd)
}

/// Poll dig until `done` holds; how long that took.
fn until(node: &Cluster, what: &str, args: &[&str], done: impl Fn(&Reply) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let r = dig_in(node, args);
        if done(&r) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SETTLE,
            "{what}: still {} after {SETTLE:?}:\n{}\n---- log ----\n{}",
            r.status(),
            r.raw,
            node.log_tail("up")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_serves_cluster_dns_and_follows_changes() {
    let node = start_node();
    // The kube-dns Service fairlead creates, served on its own ClusterIP.
    until(
        &node,
        "kube-dns answered",
        &["kube-dns.kube-system.svc.cluster.local"],
        |r| r.answers("A") == ["10.96.0.10"],
    );
    let srv = dig_in(
        &node,
        &["_dns._udp.kube-dns.kube-system.svc.cluster.local", "SRV"],
    );
    assert_eq!(
        srv.answers("SRV"),
        vec!["0 100 53 kube-dns.kube-system.svc.cluster.local."],
        "{}",
        srv.raw
    );
    let tcp = dig_in(&node, &["+tcp", "kubernetes.default.svc.cluster.local"]);
    assert_eq!(tcp.status(), "NOERROR", "{}", tcp.raw);
    assert_eq!(tcp.answers("A").len(), 1, "{}", tcp.raw);
    dig_in(&node, &["web.default.svc.cluster.local"]).assert_negative("NXDOMAIN", "cluster.local.");
    // Outside names go to --dns-upstream, which is down here: SERVFAIL.
    let sf = dig_in(&node, &["outside.example"]);
    assert_eq!(sf.status(), "SERVFAIL", "{}", sf.raw);
    assert!(sf.elapsed < PROMPTLY, "took {:?}", sf.elapsed);

    // A Service created.
    node.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  \
         ports:\n  - {name: http, port: 80}\n",
    );
    let created = until(
        &node,
        "Service created",
        &["web.default.svc.cluster.local"],
        |r| r.answers("A").len() == 1,
    );
    let ip = node
        .kubectl_ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .trim()
        .to_string();
    let a = dig_in(&node, &["web.default.svc.cluster.local"]);
    assert_eq!(a.answers("A"), vec![ip.clone()], "{}", a.raw);
    let ptr = dig_in(&node, &["-x", &ip]);
    assert_eq!(
        ptr.answers("PTR"),
        vec!["web.default.svc.cluster.local."],
        "{}",
        ptr.raw
    );

    // A headless Service whose endpoint is added: NXDOMAIN until a ready
    // pod backs it, then its address (and the pod's hostname record).
    node.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec:\n  clusterIP: None\n  \
         selector: {app: db}\n  ports:\n  - {name: pg, port: 5432}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, labels: {app: db}}\nspec:\n  \
         hostname: db-0\n  subdomain: db\n  nodeName: fake-node\n  containers:\n  - {name: pg, image: fairlead}\n",
    );
    dig_in(&node, &["db.default.svc.cluster.local"]).assert_negative("NXDOMAIN", "cluster.local.");
    node.set_pod("db-0", "10.244.0.5", true);
    let endpoint = until(
        &node,
        "endpoint added",
        &["db.default.svc.cluster.local"],
        |r| r.answers("A") == ["10.244.0.5"],
    );
    let h = dig_in(&node, &["db-0.db.default.svc.cluster.local"]);
    assert_eq!(h.answers("A"), vec!["10.244.0.5"], "{}", h.raw);

    // A namespace without Services: NODATA, not NXDOMAIN.
    dig_in(&node, &["quiet.svc.cluster.local"]).assert_negative("NXDOMAIN", "cluster.local.");
    node.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: quiet}\n");
    let namespace = until(
        &node,
        "namespace created",
        &["quiet.svc.cluster.local"],
        |r| r.status() == "NOERROR",
    );
    dig_in(&node, &["quiet.svc.cluster.local"]).assert_negative("NOERROR", "cluster.local.");

    // The Service deleted.
    node.kubectl_ok(&["delete", "service", "web", "--wait=false"]);
    let deleted = until(
        &node,
        "Service deleted",
        &["web.default.svc.cluster.local"],
        |r| r.status() == "NXDOMAIN",
    );

    println!(
        "DNS convergence after kubectl returned: Service created {}, endpoint added {}, \
         namespace created {}, Service deleted {}",
        ms(created),
        ms(endpoint),
        ms(namespace),
        ms(deleted)
    );
    for (what, t) in [
        ("Service created", created),
        ("endpoint added", endpoint),
        ("namespace created", namespace),
        ("Service deleted", deleted),
    ] {
        assert!(t < CONVERGE, "{what} took {} (bound {CONVERGE:?})", ms(t));
    }
}
