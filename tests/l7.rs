//! Per-request balancing (issue 14, part 2): a client that keeps one
//! connection still has its requests spread over every endpoint when the
//! service port says `appProtocol: kubernetes.io/h2c`, `grpc` or `http`;
//! without `appProtocol` the balancing stays per connection. Each test runs
//! in both proxy modes (nftables DNATs such ports to the node's own L7
//! listener), in a network namespace of its own with `fairlead up`:
//!
//! 1. one HTTP/2 connection (`curl --http2-prior-knowledge`), 300 requests:
//!    exactly 100/100/100 over three backends;
//! 2. gRPC with the real `grpcio` (PyPI): 300 unary calls on one channel
//!    100/100/100; a server-streaming and a bidirectional call complete with
//!    their trailers; a backend killed mid-run fails no call it had not
//!    received;
//! 3. HTTP/1.1 keep-alive with `appProtocol: http`: 300 requests on one
//!    connection, 100/100/100;
//! 5. without `appProtocol`: one connection reaches one backend.
//!
//! Needs root, `ip`, `kubectl`, `curl`, `nft` (nftables mode) and Python
//! (grpcio is installed into `target/pyvenv` when missing).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use common::cluster::{counts, pod_yaml, Cluster, SETTLE};
use common::netns::{have_nft, Proc};
use common::server::poll;

/// Not a test: the network client the other tests start inside their
/// namespace (`common::netns::Agent`). Returns at once in a normal run.
#[test]
fn agent() {
    common::netns::agent_main();
}

/// The node's address (its InternalIP: nftables mode DNATs L7 ports to
/// its listener there).
const NODE_IP: &str = "10.0.0.1";

/// Backends on pod addresses on `lo` (DNAT cannot reach 127.x).
const BACKENDS: [(&str, &str); 3] = [
    ("b1", "10.244.0.11"),
    ("b2", "10.244.0.12"),
    ("b3", "10.244.0.13"),
];

const GRPC_PORT: u16 = 50051;

/// The Services, all selecting the backends: `h2` (h2c), `h1` (http),
/// `grpc` (grpc, to the Python servers) and `plain` (no appProtocol).
fn services() -> String {
    let svc = |name: &str, app: &str, target: &str| {
        let app = if app.is_empty() {
            String::new()
        } else {
            format!(", appProtocol: {app}")
        };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: web}}\n  ports:\n  - {{name: p, port: 80, targetPort: {target}{app}}}\n"
        )
    };
    [
        svc("h2", "kubernetes.io/h2c", "8080"),
        svc("h1", "http", "8080"),
        svc("grpc", "grpc", &GRPC_PORT.to_string()),
        svc("plain", "", "8080"),
    ]
    .concat()
}

struct L7 {
    c: Cluster,
    grpc: BTreeMap<String, Proc>,
    logs: PathBuf,
}

/// `fairlead up` in `mode` with the backends (echo and a gRPC server on
/// each), the Services, and every Service answering.
fn l7_up(test: &str, mode: &str) -> Option<L7> {
    if mode == "nftables" && !have_nft(test) {
        return None;
    }
    let mut c = Cluster::empty(test);
    for cmd in BACKENDS
        .iter()
        .map(|(_, ip)| format!("addr add {ip}/32 dev lo"))
        .chain([
            format!("addr add {NODE_IP}/32 dev lo"),
            format!("route add 10.96.0.0/12 dev lo src {NODE_IP}"),
        ])
    {
        c.ns.run_ok("ip", &cmd.split_whitespace().collect::<Vec<_>>());
    }
    c.start_up(&[
        "--proxy-mode",
        mode,
        "--min-sync-period",
        "50ms",
        "--node-ip",
        NODE_IP,
    ]);
    let names: Vec<&str> = BACKENDS.iter().map(|b| b.0).collect();
    let mut yaml = services();
    for n in &names {
        yaml.push_str(&pod_yaml(n, "web"));
    }
    c.apply(&yaml);
    let py = common::python::python_with("grpc", "grpcio");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_echo.py");
    let logs = c.data_dir().to_path_buf();
    let mut grpc = BTreeMap::new();
    for (name, ip) in BACKENDS {
        c.echo(name, ip);
        let mut cmd = c.ns.command(&py);
        cmd.args([script, "server", name, &format!("{ip}:{GRPC_PORT}")]);
        grpc.insert(
            name.to_string(),
            c.ns.spawn(cmd, &logs.join(format!("grpc-{name}.log"))),
        );
        c.set_pod(name, ip, true);
    }
    let l7 = L7 { c, grpc, logs };
    for name in ["h2", "h1", "plain"] {
        let ip = l7.c.cluster_ip(name);
        poll(&format!("{name} answers"), SETTLE, || {
            let out = l7.curl(&["--max-time", "2", &format!("http://{ip}/")]);
            (out.len() == 1 && out[0].starts_with('b')).then_some(())
        });
    }
    Some(l7)
}

impl L7 {
    /// `curl -s <args>` in the namespace; its output lines.
    fn curl(&self, args: &[&str]) -> Vec<String> {
        let out = self
            .c
            .ns
            .command("curl")
            .arg("-s")
            .args(args)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// `n` requests to Service `svc` in one curl run (which keeps one
    /// connection): the names that answered, and the connections curl
    /// opened.
    fn one_connection(&self, svc: &str, n: usize, extra: &[&str]) -> (Vec<String>, usize) {
        // (Distinct URLs: curl skips a repeated one on a reused HTTP/2
        // connection.)
        let ip = self.c.cluster_ip(svc);
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--max-time", "60", "-w", " %{num_connects}\\n"]);
        let urls: Vec<String> = (0..n).map(|i| format!("http://{ip}/?i={i}")).collect();
        args.extend(urls.iter().map(|u| u.as_str()));
        let lines = self.curl(&args);
        let mut names = Vec::new();
        let mut connects = 0;
        for l in lines {
            let (name, c) = l.rsplit_once(' ').unwrap_or((&l, "0"));
            names.push(name.to_string());
            connects += c.parse::<usize>().unwrap_or(0);
        }
        (names, connects)
    }

    /// `n` requests to Service `svc` over one HTTP/2 connection (`nghttp`,
    /// prior knowledge, the streams concurrent): the names that answered.
    fn nghttp(&self, svc: &str, n: usize) -> Vec<String> {
        let ip = self.c.cluster_ip(svc);
        let urls: Vec<String> = (0..n).map(|i| format!("http://{ip}/?i={i}")).collect();
        let out = self
            .c
            .ns
            .command("nghttp")
            .args(["-t", "30"])
            .args(&urls)
            .output()
            .expect("run nghttp (Debian nghttp2-client)");
        // The bodies, back to back: "b1b3b2...".
        let text = String::from_utf8_lossy(&out.stdout);
        text.as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    /// Run the gRPC client script with `args` in the namespace.
    fn grpc_client(&self, args: &[&str]) -> Vec<String> {
        let py = common::python::python_with("grpc", "grpcio");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_echo.py");
        let out = self
            .c
            .ns
            .command(&py)
            .arg(script)
            .args(args)
            .output()
            .expect("run the gRPC client");
        assert!(
            out.status.success(),
            "grpc client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }

    fn target(&self, svc: &str) -> String {
        SocketAddr::new(self.c.cluster_ip(svc), 80).to_string()
    }
}

/// `GET /upgrade` with `Upgrade: echo` to `addr`, then "ping pong" through
/// the upgraded connection: what came back.
fn upgrade_and_echo(addr: SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: l7\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s
            .read(&mut b)
            .map_err(|e| format!("reading the head: {e}"))?;
        if n == 0 {
            return Err(format!("closed: {}", String::from_utf8_lossy(&head)));
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("not switched: {head}"));
    }
    s.write_all(b"ping pong").map_err(|e| e.to_string())?;
    let mut got = vec![0u8; 9];
    s.read_exact(&mut got)
        .map_err(|e| format!("reading the echo: {e}"))?;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn even(n: usize) -> BTreeMap<String, usize> {
    BACKENDS.iter().map(|b| (b.0.to_string(), n)).collect()
}

// ---- 1, 3, 5: HTTP/2, HTTP/1.1, and plain L4 ---------------------------------------

fn http_balanced_per_request(mode: &str) {
    let Some(mut l7) = l7_up(&format!("l7-http-{mode}"), mode) else {
        return;
    };
    // 1. h2c: one HTTP/2 connection (nghttp opens one), 300 requests on
    // it, all in flight together.
    let names = l7.nghttp("h2", 300);
    assert_eq!(counts(&names), even(100), "h2c per request ({mode})");

    // 3. HTTP/1.1 keep-alive, appProtocol http.
    let (names, connects) = l7.one_connection("h1", 300, &["--http1.1"]);
    assert_eq!(connects, 1, "one keep-alive connection ({mode})");
    assert_eq!(counts(&names), even(100), "HTTP/1.1 per request ({mode})");

    // Across protocols: an HTTP/2 client of the HTTP/1.1 port, and an
    // HTTP/1.1 client of the h2c port, each still balanced per request.
    let names = l7.nghttp("h1", 30);
    assert_eq!(
        counts(&names),
        even(10),
        "h2 client, HTTP/1.1 endpoints ({mode})"
    );
    let (names, connects) = l7.one_connection("h2", 30, &["--http1.1"]);
    assert_eq!(connects, 1, "one HTTP/1.1 connection to h2c ({mode})");
    assert_eq!(
        counts(&names),
        even(10),
        "HTTP/1.1 client, h2c endpoints ({mode})"
    );

    // An HTTP/1.1 upgrade through the L7 port: 101, then bytes both ways
    // on the same connection (as a WebSocket would).
    let h1 = SocketAddr::new(l7.c.cluster_ip("h1"), 80);
    let echoed = l7.c.ns.enter(move || upgrade_and_echo(h1));
    assert_eq!(echoed.as_deref(), Ok("ping pong"), "upgrade ({mode})");

    // 5. No appProtocol: per connection, so one connection sees one
    // backend.
    let (names, connects) = l7.one_connection("plain", 30, &["--http1.1"]);
    assert_eq!(connects, 1, "one connection ({mode})");
    assert_eq!(
        counts(&names).len(),
        1,
        "L4: one backend ({mode}): {names:?}"
    );

    // The L7 requests are counted per Service and code.
    for svc in ["default/h2:p", "default/h1:p"] {
        let n = l7.c.metric(
            "fairlead_proxy_http_requests_total",
            &[("service", svc), ("code", "200")],
        );
        assert!(n >= 300.0, "{svc}: {n} requests counted ({mode})");
    }
}

#[test]
fn http_balanced_per_request_userspace() {
    http_balanced_per_request("userspace");
}

#[test]
fn http_balanced_per_request_nftables() {
    http_balanced_per_request("nftables");
}

// ---- 2: gRPC ----------------------------------------------------------------------

fn grpc_balanced_per_call(mode: &str) {
    let Some(mut l7) = l7_up(&format!("l7-grpc-{mode}"), mode) else {
        return;
    };
    let target = l7.target("grpc");
    poll("the gRPC Service answers", SETTLE, || {
        let out = l7.grpc_client(&["unary", &target, "1"]);
        out.first()
            .is_some_and(|l| l.starts_with('b'))
            .then_some(())
    });

    // Unary calls over one channel, balanced per call.
    let out = l7.grpc_client(&["unary", &target, "300"]);
    assert_eq!(counts(&out), even(100), "unary calls per call ({mode})");

    // Streams complete with their trailers, each on one backend.
    let out = l7.grpc_client(&["streams", &target]);
    let stream: Vec<&String> = out.iter().filter(|l| l.starts_with("stream ")).collect();
    assert_eq!(stream.len(), 5, "server stream ({mode}): {out:?}");
    let backend = stream[0].split(' ').nth(1).unwrap().to_string();
    assert!(
        stream.iter().all(|l| l.contains(&backend)),
        "one backend: {out:?}"
    );
    let bidi: Vec<&String> = out.iter().filter(|l| l.starts_with("bidi ")).collect();
    assert_eq!(bidi.len(), 3, "bidirectional stream ({mode}): {out:?}");
    let trailers: Vec<&String> = out.iter().filter(|l| l.starts_with("trailer ")).collect();
    assert_eq!(trailers.len(), 2, "{out:?}");
    assert!(
        trailers.iter().all(|t| t.ends_with(" done")),
        "trailers came through ({mode}): {out:?}"
    );
    assert!(out.contains(&"code OK".to_string()), "{out:?}");

    // A backend dies mid-run: only calls it had received may fail.
    let client = {
        let py = common::python::python_with("grpc", "grpcio");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_echo.py");
        let mut cmd = l7.c.ns.command(&py);
        cmd.args([script, "unary", &target, "600", "10"]);
        l7.c.ns.spawn(cmd, &l7.logs.join("grpc-client.log"))
    };
    let client_log = l7.logs.join("grpc-client.log");
    poll("the client is halfway", SETTLE, || {
        let log = std::fs::read_to_string(&client_log).unwrap_or_default();
        (log.lines().count() >= 150).then_some(())
    });
    // The client makes one call at a time and prints a line per call, so
    // the call in flight at the kill is number `lines` of then.
    let lines = || {
        std::fs::read_to_string(&client_log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before_kill = lines();
    l7.grpc.get_mut("b2").unwrap().kill9();
    let killed_at = lines();
    let mut client = client;
    poll("the client is done", SETTLE, || {
        (!client.alive()).then_some(())
    });
    let log = std::fs::read_to_string(&client_log).unwrap();
    let answered = log.lines().filter(|l| l.starts_with('b')).count();
    let failed: Vec<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix("FAILED "))
        .map(|l| l.split(' ').next().unwrap_or("").to_string())
        .collect();
    let received: Vec<String> = std::fs::read_to_string(l7.logs.join("grpc-b2.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("call "))
        .map(String::from)
        .collect();
    println!(
        "{mode}: backend killed mid-run: {answered} calls answered, {} failed ({failed:?})",
        failed.len()
    );
    assert_eq!(answered + failed.len(), 600, "{log}");
    // A failed call is one that reached the killed backend: logged by it,
    // or in flight when it died (sent, not yet logged); every later call
    // that the round robin gave b2 went to another backend.
    for id in &failed {
        let n: usize = id.parse().unwrap();
        assert!(
            received.contains(id) || (before_kill..=killed_at).contains(&n),
            "call {id} failed without reaching the killed backend ({mode}; \
             calls {before_kill}..={killed_at} in flight at the kill)"
        );
    }
    assert!(!received.is_empty(), "b2 had calls before it was killed");
    // (A few calls may be in flight at the kill.)
    let after: Vec<&str> = log.lines().skip(killed_at + 5).collect();
    assert!(
        after.len() > 100,
        "the kill came mid-run: {killed_at} lines before it"
    );
    assert!(
        after.iter().all(|l| *l == "b1" || *l == "b3"),
        "the killed backend gets no more calls ({mode}): {after:?}"
    );
}

#[test]
fn grpc_balanced_per_call_userspace() {
    grpc_balanced_per_call("userspace");
}

#[test]
fn grpc_balanced_per_call_nftables() {
    grpc_balanced_per_call("nftables");
}
