//! The userspace proxy backend alone, on real sockets: in-process echo
//! backends on 127.0.0.1, a hand-built `ProxyState` whose "ClusterIPs" are
//! other loopback addresses (already local, so `manage_addresses: false`),
//! and plain TCP/UDP clients. One test runs with `manage_addresses: true`
//! inside a private network namespace (root only).
//!
//! Every test uses its own loopback ClusterIP so tests can run in parallel.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairlead::echo::{EchoArgs, EchoServer};
use fairlead::proxy::userspace::{SyncStats, UserspaceConfig, UserspaceProxy};
use fairlead::proxy::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Upper bound for any single network operation in these tests.
const IO: Duration = Duration::from_secs(5);
const NODE: &str = "node-a";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, last))
}

/// A port free for TCP and UDP on `ip` right now.
fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..50 {
        let t = std::net::TcpListener::bind((ip, 0)).unwrap();
        let p = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind((ip, p)).is_ok() {
            return p;
        }
    }
    panic!("no free port on {ip}");
}

async fn echo(name: &str) -> EchoServer {
    EchoServer::start(&EchoArgs {
        name: Some(name.to_string()),
        http_port: Some(0),
        tcp_port: Some(0),
        udp_port: Some(0),
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        log_requests: false,
        drain_timeout: std::time::Duration::from_secs(1),
    })
    .await
    .expect("echo server")
}

fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: port.into(),
        protocol,
    }
}

fn endpoint(addr: SocketAddr, node: &str) -> Endpoint {
    Endpoint {
        addr,
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
    }
}

fn info(cluster_ip: IpAddr, port: u16, mut eps: Vec<Endpoint>) -> ServicePortInfo {
    eps.sort();
    ServicePortInfo {
        cluster_ips: vec![cluster_ip],
        port,
        node_port: None,
        external_ips: vec![],
        app_protocol: None,
        affinity_timeout: None,
        internal_local: false,
        external_local: false,
        endpoints: eps,
    }
}

fn state(entries: Vec<(ServicePortName, ServicePortInfo)>) -> ProxyState {
    entries
        .into_iter()
        .map(|(n, i)| (n, Arc::new(i)))
        .collect::<BTreeMap<_, _>>()
}

fn config() -> UserspaceConfig {
    UserspaceConfig {
        node_name: NODE.to_string(),
        manage_addresses: false,
        ..UserspaceConfig::default()
    }
}

/// The HTTP endpoints of some echo servers, all on this node.
fn http_eps(servers: &[&EchoServer]) -> Vec<Endpoint> {
    servers
        .iter()
        .map(|s| endpoint(s.http_addr.unwrap(), NODE))
        .collect()
}

async fn connect_from(addr: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if let Some(l) = local {
        s.bind(SocketAddr::new(l, 0))?;
    }
    tokio::time::timeout(IO, s.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// One `GET path` on a fresh connection (`Connection: close`); the body.
async fn get_from(addr: SocketAddr, path: &str, local: Option<IpAddr>) -> io::Result<String> {
    let mut s = connect_from(addr, local).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(IO, s.read_to_end(&mut buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {text:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("status: {head}")));
    }
    Ok(body.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> io::Result<String> {
    get_from(addr, path, None).await
}

/// A persistent HTTP/1.1 connection.
struct KeepAlive {
    s: TcpStream,
}

impl KeepAlive {
    async fn open(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            s: connect_from(addr, None).await.expect("connect"),
        }
    }

    async fn get(&mut self, path: &str) -> io::Result<String> {
        tokio::time::timeout(IO, self.get_inner(path))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))?
    }

    async fn get_inner(&mut self, path: &str) -> io::Result<String> {
        self.s
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if self.s.read(&mut byte).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))?;
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The value of a metric line `name{service="svc"...}` in the exposition.
fn metric(name: &str, svc: &str) -> Option<f64> {
    let prefix = format!("{name}{{service=\"{svc}\"");
    fairlead::metrics::render()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sync `proxy` to exactly one service port.
async fn sync_one(proxy: &UserspaceProxy, entry: (ServicePortName, ServicePortInfo)) {
    proxy.sync(&state(vec![entry])).await.unwrap();
}

/// A new connection to `svc` is refused, within 100 ms.
async fn refused_within_100ms(svc: SocketAddr) {
    let t = Instant::now();
    expect_refused(connect_from(svc, None).await);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

fn expect_refused(r: io::Result<TcpStream>) {
    match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("connection was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact() {
    let (a, b, c) = (echo("rr-a").await, echo("rr-b").await, echo("rr-c").await);
    let vip = ip(1);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(config());
    let st = state(vec![(
        spn("rr", "http", Protocol::Tcp),
        info(vip, port, http_eps(&[&a, &b, &c])),
    )]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(stats.listeners_opened, 1);
    assert_eq!(stats.bind_errors, 0);

    let svc = SocketAddr::new(vip, port);
    let mut seq = Vec::new();
    for _ in 0..300 {
        seq.push(
            get(svc, "/hostname")
                .await
                .expect("request through the proxy"),
        );
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in &seq {
        *counts.entry(n.as_str()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");
    // Strict rotation, not just equal totals.
    for (i, n) in seq.iter().enumerate() {
        assert_eq!(n, &seq[i % 3]);
    }
    proxy.shutdown().await;
    expect_refused(connect_from(svc, None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_skips_a_dead_endpoint() {
    fairlead::metrics::init();
    let (a, b, c) = (echo("fo-a").await, echo("fo-b").await, echo("fo-c").await);
    let vip = ip(2);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(config());
    let st = state(vec![(
        spn("failover", "http", Protocol::Tcp),
        info(vip, port, http_eps(&[&a, &b, &c])),
    )]);
    proxy.sync(&st).await.unwrap();
    b.stop().await;

    let svc = SocketAddr::new(vip, port);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let name = get(svc, "/hostname")
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(counts.get("fo-b"), None);
    assert_eq!(counts.get("fo-a"), Some(&15), "{counts:?}");
    assert_eq!(counts.get("fo-c"), Some(&15), "{counts:?}");
    // Tried once, then skipped for the backoff.
    assert_eq!(
        metric(
            "fairlead_proxy_backend_connect_errors_total",
            "default/failover:http"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric("fairlead_proxy_connections_total", "default/failover:http"),
        Some(30.0)
    );
    proxy.shutdown().await;
}

/// An endpoint that never answers a handshake: a listener whose accept
/// queue (backlog 0) is filled by one connection nobody accepts, so the
/// kernel drops every later SYN. Keep the returned sockets alive.
fn silent_endpoint(ip: IpAddr) -> (SocketAddr, socket2::Socket, std::net::TcpStream) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (addr, l, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_times_out_and_the_next_one_serves() {
    fairlead::metrics::init();
    let a = echo("to-a").await;
    let (silent, _listener, _filler) = silent_endpoint(ip(24));
    let vip = ip(25);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(UserspaceConfig {
        connect_timeout: Duration::from_millis(300),
        ..config()
    });
    let mut eps = http_eps(&[&a]);
    eps.push(endpoint(silent, NODE));
    sync_one(
        &proxy,
        (spn("timeout", "http", Protocol::Tcp), info(vip, port, eps)),
    )
    .await;

    // Of the first two connections, one is sent to the silent endpoint:
    // its connect times out (on the loop's deadline queue) and the
    // connection goes to the other endpoint.
    let svc = SocketAddr::new(vip, port);
    let mut slowest = Duration::ZERO;
    for i in 0..4 {
        let t = Instant::now();
        let name = get(svc, "/hostname")
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(name, "to-a");
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest >= Duration::from_millis(300) && slowest < Duration::from_secs(2),
        "{slowest:?}"
    );
    assert_eq!(
        metric(
            "fairlead_proxy_backend_connect_errors_total",
            "default/timeout:http"
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_is_refused_at_once() {
    let vip = ip(3);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let name = spn("empty", "", Protocol::Tcp);
    let proxy = UserspaceProxy::new(config());

    // Never had endpoints.
    sync_one(&proxy, (name.clone(), info(vip, port, vec![]))).await;
    refused_within_100ms(svc).await;

    // Had one, lost it.
    let a = echo("empty-a").await;
    sync_one(&proxy, (name.clone(), info(vip, port, http_eps(&[&a])))).await;
    assert_eq!(get(svc, "/").await.unwrap(), "empty-a");
    sync_one(&proxy, (name.clone(), info(vip, port, vec![]))).await;
    refused_within_100ms(svc).await;

    // Endpoints listed but all dead: accepted, then reset at once.
    sync_one(&proxy, (name.clone(), info(vip, port, http_eps(&[&a])))).await;
    a.stop().await;
    let t = Instant::now();
    // On loopback the RST often lands before connect(2) reports success.
    let r = match connect_from(svc, None).await {
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            tokio::time::timeout(IO, s.read(&mut buf)).await.unwrap()
        }
        Err(e) => Err(e),
    };
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_until_idle_timeout() {
    let (a, b, c) = (echo("af-a").await, echo("af-b").await, echo("af-c").await);
    let vip = ip(4);
    let port = free_port(vip);
    let timeout = Duration::from_millis(300);
    let mut i = info(vip, port, http_eps(&[&a, &b, &c]));
    i.affinity_timeout = Some(timeout);
    let proxy = UserspaceProxy::new(config());
    sync_one(&proxy, (spn("affinity", "", Protocol::Tcp), i)).await;
    let svc = SocketAddr::new(vip, port);
    let c1 = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    let c2 = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));

    let first = get_from(svc, "/", c1).await.unwrap();
    for _ in 0..10 {
        assert_eq!(get_from(svc, "/", c1).await.unwrap(), first);
    }
    let other = get_from(svc, "/", c2).await.unwrap();
    assert_ne!(other, first, "another client IP gets the next endpoint");
    for _ in 0..5 {
        assert_eq!(get_from(svc, "/", c2).await.unwrap(), other);
    }
    // Idle longer than the timeout: the affinity is gone and round robin
    // moves on. (Waiting is the behaviour under test, not synchronisation.)
    tokio::time::sleep(timeout * 2).await;
    let after = get_from(svc, "/", c1).await.unwrap();
    assert_ne!(after, first);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_drains_and_gets_no_new_connections() {
    let (a, b) = (echo("dr-a").await, echo("dr-b").await);
    let vip = ip(5);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let name = spn("drain", "", Protocol::Tcp);
    let proxy = UserspaceProxy::new(config());
    sync_one(&proxy, (name.clone(), info(vip, port, http_eps(&[&a, &b])))).await;

    let mut conn = KeepAlive::open(svc).await;
    let pinned = conn.get("/hostname").await.unwrap();
    let (gone, stays) = if pinned == "dr-a" { (&a, &b) } else { (&b, &a) };
    let stats = proxy
        .sync(&state(vec![(
            name.clone(),
            info(vip, port, http_eps(&[stays])),
        )]))
        .await
        .unwrap();
    assert_eq!(
        stats.listeners_opened + stats.listeners_closed,
        0,
        "{stats:?}"
    );

    for _ in 0..5 {
        assert_eq!(conn.get("/hostname").await.unwrap(), gone.name);
    }
    for _ in 0..20 {
        assert_eq!(get(svc, "/hostname").await.unwrap(), stays.name);
    }
    assert_eq!(
        conn.get("/echo?msg=still%20here").await.unwrap(),
        "still here"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_grace_ends_connections_to_removed_endpoints() {
    let (a, b) = (echo("dg-a").await, echo("dg-b").await);
    let vip = ip(6);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let name = spn("grace", "", Protocol::Tcp);
    let proxy = UserspaceProxy::new(UserspaceConfig {
        drain_grace: Some(Duration::from_millis(200)),
        ..config()
    });
    sync_one(&proxy, (name.clone(), info(vip, port, http_eps(&[&a, &b])))).await;
    let mut to_gone = KeepAlive::open(svc).await;
    let mut to_stays = KeepAlive::open(svc).await;
    let (gone, stays) = match to_gone.get("/").await.unwrap().as_str() {
        "dg-a" => (&a, &b),
        _ => (&b, &a),
    };
    assert_eq!(to_stays.get("/").await.unwrap(), stays.name);
    let removed_at = Instant::now();
    sync_one(&proxy, (name.clone(), info(vip, port, http_eps(&[stays])))).await;
    // Served during the grace, cut after it (polled, bounded).
    let deadline = removed_at + IO;
    loop {
        match to_gone.get("/").await {
            Ok(n) => assert_eq!(n, gone.name),
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "connection outlived the grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(removed_at.elapsed() >= Duration::from_millis(200));
    // The endpoint that stayed is untouched.
    assert_eq!(to_stays.get("/").await.unwrap(), stays.name);
    proxy.shutdown().await;
}

/// A bulk stream is spliced (kernel to kernel, `fairlead_proxy_spliced_bytes_total`
/// grows) and still arrives whole and in order, both ways, with the
/// client's half-close passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_streams_are_spliced_and_arrive_whole() {
    fairlead::metrics::init();
    let a = echo("splice-a").await;
    let vip = ip(8);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(config());
    sync_one(
        &proxy,
        (
            spn("splice", "", Protocol::Tcp),
            info(vip, port, vec![endpoint(a.tcp_addr.unwrap(), NODE)]),
        ),
    )
    .await;
    let before = metric("fairlead_proxy_spliced_bytes_total", "default/splice").unwrap_or(0.0);
    let s = connect_from(SocketAddr::new(vip, port), None)
        .await
        .unwrap();
    let (mut r, mut w) = s.into_split();
    const N: usize = 64 << 20;
    let pattern = |i: usize| (i % 253) as u8 ^ (i >> 16) as u8;
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..N).map(pattern).collect();
        w.write_all(&chunk).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(N);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("reply finished")
        .expect("read");
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), N);
    if let Some(i) = (0..N).find(|&i| got[i] != pattern(i)) {
        panic!("byte {i} differs");
    }
    let spliced = metric("fairlead_proxy_spliced_bytes_total", "default/splice").unwrap() - before;
    assert!(
        spliced >= N as f64,
        "only {spliced} of {} bytes were spliced",
        2 * N
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_delivers_the_whole_reply() {
    let a = echo("hc-a").await;
    let vip = ip(7);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(config());
    sync_one(
        &proxy,
        (
            spn("tcpecho", "", Protocol::Tcp),
            info(vip, port, vec![endpoint(a.tcp_addr.unwrap(), NODE)]),
        ),
    )
    .await;
    let s = connect_from(SocketAddr::new(vip, port), None)
        .await
        .unwrap();
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    tokio::time::timeout(IO, r.read_to_end(&mut got))
        .await
        .expect("reply finished")
        .expect("read");
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    proxy.shutdown().await;
}

async fn udp_roundtrip(
    sock: &UdpSocket,
    to: SocketAddr,
    msg: &str,
) -> io::Result<(String, SocketAddr)> {
    sock.send_to(msg.as_bytes(), to).await?;
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(IO, sock.recv_from(&mut buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no UDP reply"))??;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_are_balanced_and_answered_from_the_service_address() {
    fairlead::metrics::init();
    let (a, b, c) = (echo("ud-a").await, echo("ud-b").await, echo("ud-c").await);
    let vip = ip(15);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let eps = [&a, &b, &c]
        .iter()
        .map(|s| endpoint(s.udp_addr.unwrap(), NODE))
        .collect();
    let proxy = UserspaceProxy::new(config());
    sync_one(
        &proxy,
        (spn("udp", "dns", Protocol::Udp), info(vip, port, eps)),
    )
    .await;

    let mut names = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (reply, from) = udp_roundtrip(&s, svc, &format!("ping {i}")).await.unwrap();
        assert_eq!(from, svc, "reply comes from the service address");
        let (name, payload) = reply.split_once(": ").unwrap();
        assert_eq!(payload, format!("ping {i}"));
        names.push(name.to_string());
        clients.push(s);
    }
    names.sort();
    assert_eq!(names, ["ud-a", "ud-b", "ud-c"], "one flow per endpoint");
    // A flow sticks to its endpoint.
    let (first, _) = udp_roundtrip(&clients[0], svc, "hostname").await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            udp_roundtrip(&clients[0], svc, "hostname").await.unwrap().0,
            first
        );
    }
    assert_eq!(
        metric("fairlead_proxy_udp_flows", "default/udp:dns"),
        Some(3.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flow_moves_when_its_endpoint_is_removed_and_expires_when_idle() {
    let (a, b) = (echo("um-a").await, echo("um-b").await);
    let vip = ip(9);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let name = spn("udpmove", "", Protocol::Udp);
    let udp_eps = |s: &[&EchoServer]| {
        s.iter()
            .map(|s| endpoint(s.udp_addr.unwrap(), NODE))
            .collect::<Vec<_>>()
    };
    let proxy = UserspaceProxy::new(UserspaceConfig {
        udp_idle_timeout: Duration::from_millis(200),
        ..config()
    });
    sync_one(&proxy, (name.clone(), info(vip, port, udp_eps(&[&a, &b])))).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (first, _) = udp_roundtrip(&client, svc, "hostname").await.unwrap();
    let (gone, stays) = if first == "um-a" { (&a, &b) } else { (&b, &a) };
    sync_one(&proxy, (name.clone(), info(vip, port, udp_eps(&[stays])))).await;
    assert_eq!(
        udp_roundtrip(&client, svc, "hostname").await.unwrap().0,
        stays.name
    );
    assert_ne!(gone.name, stays.name);

    // Idle expiry: with both endpoints back, a new flow for the same client
    // starts after the idle timeout and round robin hands it the next one.
    sync_one(&proxy, (name.clone(), info(vip, port, udp_eps(&[&a, &b])))).await;
    let sticky = udp_roundtrip(&client, svc, "hostname").await.unwrap().0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut seen = vec![sticky.clone()];
    for _ in 0..4 {
        seen.push(udp_roundtrip(&client, svc, "hostname").await.unwrap().0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen.iter().any(|n| *n != sticky),
        "flows never expired: {seen:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_nodeport_replies_from_the_address_the_client_used() {
    let a = echo("np-udp").await;
    let vip = ip(10);
    let port = free_port(vip);
    let np = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut i = info(vip, port, vec![endpoint(a.udp_addr.unwrap(), NODE)]);
    i.node_port = Some(np);
    let proxy = UserspaceProxy::new(config());
    let stats = proxy
        .sync(&state(vec![(spn("npudp", "", Protocol::Udp), i)]))
        .await
        .unwrap();
    assert_eq!(stats.listeners_opened, 2, "{stats:?}");
    // Sent to a loopback address other than 127.0.0.1 on the wildcard
    // socket: the reply must come from exactly that address.
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 2, 77)), np);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (reply, from) = udp_roundtrip(&client, dst, "hello").await.unwrap();
    assert_eq!(reply, "np-udp: hello");
    assert_eq!(from, dst);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_policy_local_applies_per_frontend() {
    let (local, remote) = (echo("tp-local").await, echo("tp-remote").await);
    let vip = ip(11);
    let port = free_port(vip);
    let np = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let name = spn("policy", "", Protocol::Tcp);
    let proxy = UserspaceProxy::new(UserspaceConfig {
        nodeport_addresses: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 2, 11))],
        ..config()
    });
    let nodeport = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 2, 11)), np);
    let svc = SocketAddr::new(vip, port);

    // externalTrafficPolicy: Local, no endpoint on this node: the NodePort
    // refuses, the ClusterIP still serves.
    let mut i = info(
        vip,
        port,
        vec![endpoint(remote.http_addr.unwrap(), "node-b")],
    );
    i.node_port = Some(np);
    i.external_local = true;
    sync_one(&proxy, (name.clone(), i.clone())).await;
    expect_refused(connect_from(nodeport, None).await);
    assert_eq!(get(svc, "/").await.unwrap(), "tp-remote");

    // A local endpoint appears: the NodePort opens and only uses it.
    i.endpoints.push(endpoint(local.http_addr.unwrap(), NODE));
    i.endpoints.sort();
    let stats = proxy
        .sync(&state(vec![(name.clone(), i.clone())]))
        .await
        .unwrap();
    assert_eq!((stats.listeners_opened, stats.listeners_closed), (1, 0));
    for _ in 0..6 {
        assert_eq!(get(nodeport, "/").await.unwrap(), "tp-local");
    }
    let mut cluster: Vec<String> = Vec::new();
    for _ in 0..4 {
        cluster.push(get(svc, "/").await.unwrap());
    }
    assert!(cluster.iter().any(|n| n == "tp-remote"), "{cluster:?}");

    // internalTrafficPolicy: Local too: the ClusterIP only uses the local one.
    i.internal_local = true;
    sync_one(&proxy, (name.clone(), i)).await;
    for _ in 0..6 {
        assert_eq!(get(svc, "/").await.unwrap(), "tp-local");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_is_incremental_and_idempotent() {
    let (a, b) = (echo("inc-a").await, echo("inc-b").await);
    let vip = ip(12);
    let (p1, p2) = (free_port(vip), free_port(vip));
    let proxy = UserspaceProxy::new(config());
    let one = spn("inc", "one", Protocol::Tcp);
    let two = spn("inc", "two", Protocol::Tcp);
    let st = state(vec![
        (one.clone(), info(vip, p1, http_eps(&[&a]))),
        (two.clone(), info(vip, p2, http_eps(&[&a]))),
    ]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!((stats.services_changed, stats.listeners_opened), (2, 2));
    assert_eq!(proxy.sync(&st).await.unwrap(), SyncStats::default());

    // An equal but freshly built state is also a no-op.
    let again = state(vec![
        (one.clone(), info(vip, p1, http_eps(&[&a]))),
        (two.clone(), info(vip, p2, http_eps(&[&a]))),
    ]);
    assert_eq!(proxy.sync(&again).await.unwrap(), SyncStats::default());

    // Endpoint change on one port: no listener touched, open connection kept.
    let mut conn = KeepAlive::open(SocketAddr::new(vip, p1)).await;
    assert_eq!(conn.get("/").await.unwrap(), "inc-a");
    let st = state(vec![
        (one.clone(), info(vip, p1, http_eps(&[&b]))),
        (two.clone(), info(vip, p2, http_eps(&[&a]))),
    ]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(
        stats,
        SyncStats {
            services_changed: 1,
            ..SyncStats::default()
        }
    );
    assert_eq!(conn.get("/").await.unwrap(), "inc-a");
    assert_eq!(get(SocketAddr::new(vip, p1), "/").await.unwrap(), "inc-b");

    // Removing a service port closes only its listener.
    let st = state(vec![(one.clone(), info(vip, p1, http_eps(&[&b])))]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!((stats.services_removed, stats.listeners_closed), (1, 1));
    assert_eq!(
        proxy.listening().await,
        vec![(Protocol::Tcp, SocketAddr::new(vip, p1))]
    );
    expect_refused(connect_from(SocketAddr::new(vip, p2), None).await);
    assert_eq!(conn.get("/").await.unwrap(), "inc-a");
    proxy.shutdown().await;
    assert!(proxy.listening().await.is_empty());
    assert!(proxy.sync(&st).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_failure_does_not_break_other_services_and_is_retried() {
    let a = echo("bind-a").await;
    let vip = ip(13);
    // (Two distinct ports: two probes may be handed the same one.)
    let p1 = free_port(vip);
    let p2 = std::iter::repeat_with(|| free_port(vip))
        .find(|p| *p != p1)
        .unwrap();
    // Someone else holds p1 (without SO_REUSEPORT).
    let squatter = std::net::TcpListener::bind((vip, p1)).unwrap();
    let proxy = UserspaceProxy::new(config());
    let st = state(vec![
        (
            spn("bind", "taken", Protocol::Tcp),
            info(vip, p1, http_eps(&[&a])),
        ),
        (
            spn("bind", "free", Protocol::Tcp),
            info(vip, p2, http_eps(&[&a])),
        ),
    ]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(
        (stats.bind_errors, stats.listeners_opened),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(get(SocketAddr::new(vip, p2), "/").await.unwrap(), "bind-a");

    drop(squatter);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(
        (stats.bind_errors, stats.listeners_opened),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(get(SocketAddr::new(vip, p1), "/").await.unwrap(), "bind-a");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_http_endpoints() {
    let a = echo("eh").await;
    let http = a.http_addr.unwrap();
    assert_eq!(get(http, "/").await.unwrap(), "eh");
    assert_eq!(get(http, "/echo?msg=a%20b").await.unwrap(), "a b");
    assert_eq!(get(http, "/bytes?n=200000").await.unwrap().len(), 200000);
    let mut ka = KeepAlive::open(http).await;
    for _ in 0..3 {
        assert_eq!(ka.get("/hostname").await.unwrap(), "eh");
    }
    assert!(get(http, "/nope").await.is_err());
}

/// `manage_addresses: true` for real: a private network namespace (the test
/// thread's own), a real ClusterIP outside loopback, added and removed with
/// `ip`. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); skipped otherwise.
#[test]
fn manages_service_ips_in_a_network_namespace() {
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread, which we own.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", io::Error::last_os_error()));
        }
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .map_err(|e| format!("ip: {e}"))?;
        if !up.success() {
            return Err("ip link set lo up failed".into());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(netns_body());
        Ok(())
    })
    .join()
    .expect("netns test thread panicked");
    if let Err(e) = outcome {
        eprintln!("skipped: cannot create a network namespace ({e})");
    }
}

fn ip_addrs() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn netns_body() {
    let a = echo("ns-a").await;
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let vip2: IpAddr = "10.96.0.11".parse().unwrap();
    let proxy = UserspaceProxy::new(UserspaceConfig {
        node_name: NODE.to_string(),
        ..UserspaceConfig::default()
    });
    let web = spn("web", "", Protocol::Tcp);
    let dns = spn("dns", "", Protocol::Udp);
    let mut dns_info = info(vip2, 53, vec![endpoint(a.udp_addr.unwrap(), NODE)]);
    dns_info.cluster_ips = vec![vip2];
    let st = state(vec![
        (web.clone(), info(vip, 80, http_eps(&[&a]))),
        (dns.clone(), dns_info.clone()),
    ]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(stats.addresses_added, 2, "{stats:?}");
    assert_eq!(stats.bind_errors, 0, "{stats:?}");
    let addrs = ip_addrs();
    assert!(addrs.contains("10.96.0.10/32"), "{addrs}");
    assert_eq!(get(SocketAddr::new(vip, 80), "/").await.unwrap(), "ns-a");
    let client = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let (reply, from) = udp_roundtrip(&client, SocketAddr::new(vip2, 53), "hostname")
        .await
        .unwrap();
    assert_eq!((reply.as_str(), from), ("ns-a", SocketAddr::new(vip2, 53)));

    // The web service goes away: its address with it.
    let st = state(vec![(dns.clone(), dns_info)]);
    let stats = proxy.sync(&st).await.unwrap();
    assert_eq!(stats.addresses_removed, 1, "{stats:?}");
    assert!(!ip_addrs().contains("10.96.0.10/"));

    // A new proxy (restart) adopts the address still there, then cleans up.
    let again = UserspaceProxy::new(UserspaceConfig {
        node_name: NODE.to_string(),
        ..UserspaceConfig::default()
    });
    drop(proxy);
    let stats = again.sync(&st).await.unwrap();
    assert_eq!(stats.addresses_added, 0, "{stats:?}");
    again.shutdown().await;
    assert!(!ip_addrs().contains("10.96.0.11/"), "{}", ip_addrs());
}

/// Read one `/bytes?n=N` response to the end without keeping it; bytes read.
async fn drain_bytes(addr: SocketAddr, n: u64) -> u64 {
    let mut s = connect_from(addr, None).await.unwrap();
    s.write_all(
        format!("GET /bytes?n={n} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let k = s.read(&mut buf).await.unwrap();
        if k == 0 {
            return total;
        }
        total += k as u64;
    }
}

/// Throughput of one proxied TCP stream against the same stream direct,
/// printed as a ratio. Run in release:
/// `cargo test --release --test userspace_proxy throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_vs_direct() {
    const N: u64 = 2 << 30;
    let a = echo("bench").await;
    let vip = ip(14);
    let port = free_port(vip);
    let proxy = UserspaceProxy::new(config());
    sync_one(
        &proxy,
        (
            spn("bench", "", Protocol::Tcp),
            info(vip, port, http_eps(&[&a])),
        ),
    )
    .await;
    let mut rates = Vec::new();
    for addr in [a.http_addr.unwrap(), SocketAddr::new(vip, port)] {
        drain_bytes(addr, 64 << 20).await; // warm up
        let t = Instant::now();
        assert!(drain_bytes(addr, N).await >= N);
        rates.push(N as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64);
    }
    println!(
        "direct {:.0} MiB/s, proxied {:.0} MiB/s, proxied/direct = {:.2}",
        rates[0],
        rates[1],
        rates[1] / rates[0]
    );
    proxy.shutdown().await;
}

/// `fairlead_proxy_dropped_total{reason="<reason>"}`, 0 if not yet counted.
fn dropped(reason: &str) -> f64 {
    let prefix = format!("fairlead_proxy_dropped_total{{reason=\"{reason}\"}}");
    fairlead::metrics::render()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// One client address may hold only so many connections: the next is
/// reset (and counted) while another client still gets through, and a
/// closed connection frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_are_capped() {
    fairlead::metrics::init();
    let a = echo("cap-a").await;
    let vip = ip(20);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let proxy = UserspaceProxy::new(UserspaceConfig {
        max_connections_per_client: 3,
        ..config()
    });
    let tcp = endpoint(a.tcp_addr.unwrap(), NODE);
    sync_one(
        &proxy,
        (spn("cap", "tcp", Protocol::Tcp), info(vip, port, vec![tcp])),
    )
    .await;

    // An echo round trip on a connection: its bytes back, or why not.
    async fn echo_on(s: &mut TcpStream, msg: &str) -> io::Result<String> {
        s.write_all(msg.as_bytes()).await?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(IO, s.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo"))??;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    let client = ip(21);
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = connect_from(svc, Some(client)).await.unwrap();
        assert_eq!(
            echo_on(&mut s, &format!("c{i}")).await.unwrap(),
            format!("c{i}")
        );
        open.push(s);
    }
    let before = dropped("tcp_client_limit");
    // The kernel completes the handshake before the proxy accepts; the
    // reset comes then, so the connection fails at connect or on use.
    if let Ok(mut over) = connect_from(svc, Some(client)).await {
        assert!(
            echo_on(&mut over, "over").await.is_err(),
            "a 4th connection from one client was served"
        );
    }
    assert_eq!(dropped("tcp_client_limit"), before + 1.0);
    // Another client is not affected.
    let mut other = connect_from(svc, Some(ip(22))).await.unwrap();
    assert_eq!(echo_on(&mut other, "other").await.unwrap(), "other");
    // Closing one frees a slot (the proxy sees the close asynchronously).
    drop(open.pop());
    let deadline = Instant::now() + IO;
    loop {
        if let Ok(mut s) = connect_from(svc, Some(client)).await {
            if echo_on(&mut s, "again").await.is_ok() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection's slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}

/// A service port tracks only so many UDP flows: a datagram that would
/// start one more is dropped (and counted), the flows it has go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_are_capped() {
    fairlead::metrics::init();
    let a = echo("ucap-a").await;
    let vip = ip(23);
    let port = free_port(vip);
    let svc = SocketAddr::new(vip, port);
    let proxy = UserspaceProxy::new(UserspaceConfig {
        max_udp_flows: 2,
        ..config()
    });
    let ep = endpoint(a.udp_addr.unwrap(), NODE);
    sync_one(
        &proxy,
        (spn("ucap", "dns", Protocol::Udp), info(vip, port, vec![ep])),
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..2 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp_roundtrip(&s, svc, &format!("f{i}")).await.unwrap();
        clients.push(s);
    }
    let before = dropped("udp_flow_limit");
    let third = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(
        udp_roundtrip(&third, svc, "f2").await.is_err(),
        "a third flow was served"
    );
    assert_eq!(dropped("udp_flow_limit"), before + 1.0);
    for (i, s) in clients.iter().enumerate() {
        let (reply, _) = udp_roundtrip(s, svc, &format!("again{i}")).await.unwrap();
        assert!(reply.ends_with(&format!("again{i}")), "{reply}");
    }
    proxy.shutdown().await;
}
