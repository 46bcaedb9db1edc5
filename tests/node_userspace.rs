//! Acceptance tests of issue 3: controllers + node daemon + userspace proxy,
//! as real processes in a network namespace each test creates.
//!
//! Every test gets its own namespace (`tests/common/netns.rs`): the
//! `fairlead` processes, the echo backends (each on its own loopback
//! address 127.0.0.11/12/13, which are local on `lo`), kubectl and the
//! network client (this binary re-executed as an agent) all run inside it,
//! so ClusterIPs, NodePorts and pod IPs are only ever addressed there.
//! Pods are registered the way the issue prescribes: `kubectl apply` of a
//! Pod, then its IP and readiness through `pods/status`.
//!
//! Timings the issue asks to report are printed (`cargo test --test
//! node_userspace -- --nocapture` shows them). Needs root, `ip`, `kubectl`,
//! and Python's `prometheus_client` (`scripts/test` installs it into
//! `target/pyvenv`; this test installs it there too if it is missing).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Agent, Netns, Proc};
use common::server::poll;
use serde_json::Value;

const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead");

/// How long the system may take to reach a state the test waits for
/// (generous: these are upper bounds, not expectations).
const SETTLE: Duration = Duration::from_secs(20);

/// The bound the issue's "within a bounded time" is held to.
const CONVERGE: Duration = Duration::from_secs(5);

/// "Refuses within 100 ms."
const REFUSE_WITHIN: Duration = Duration::from_millis(100);

const API_PORT: &str = "6443";
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// The backends: name and pod IP (a loopback address inside the namespace).
const BACKENDS: [(&str, &str); 3] = [
    ("b1", "127.0.0.11"),
    ("b2", "127.0.0.12"),
    ("b3", "127.0.0.13"),
];

/// Not a test: the network client the other tests start inside their
/// namespace (`common::netns::Agent`). Returns at once in a normal run.
#[test]
fn agent() {
    common::netns::agent_main();
}

// ---- the cluster under test ----------------------------------------------

/// One namespace with fairlead processes, echo backends, kubectl and an
/// agent in it. Field order is drop order: agent, processes, namespace,
/// then the data directory.
struct Cluster {
    agent: Agent,
    procs: BTreeMap<String, Proc>,
    ns: Netns,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn empty(test: &str) -> Cluster {
        let ns = Netns::new();
        let dir = tempfile::Builder::new()
            .prefix(&format!("fairlead-{test}-"))
            .tempdir()
            .expect("temp dir");
        let agent = Agent::start(&ns, "agent");
        Cluster {
            agent,
            procs: BTreeMap::new(),
            kubeconfig: dir.path().join("kubeconfig"),
            ns,
            dir,
        }
    }

    /// `fairlead up` in userspace mode, healthy.
    fn up(test: &str) -> Cluster {
        let mut c = Cluster::empty(test);
        let data = c.dir.path().display().to_string();
        c.start(
            "up",
            &[
                "up",
                "--data-dir",
                &data,
                "--secure-port",
                API_PORT,
                "--proxy-mode",
                "userspace",
                "--min-sync-period",
                "50ms",
            ],
        );
        c.wait_api("up");
        c.wait_healthz();
        c
    }

    /// `fairlead apiserver` alone (the pieces of `up` run separately).
    fn start_apiserver(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        let data = self.dir.path().display().to_string();
        self.start(
            "apiserver",
            &["apiserver", "--data-dir", &data, "--secure-port", API_PORT],
        );
        self.wait_api("apiserver");
    }

    fn start_node(&mut self) {
        let kc = self.kubeconfig.display().to_string();
        self.start(
            "node",
            &[
                "node",
                "--kubeconfig",
                &kc,
                "--proxy-mode",
                "userspace",
                "--min-sync-period",
                "50ms",
            ],
        );
        self.wait_healthz();
    }

    fn start_controllers(&mut self, key: &str, extra: &[&str]) {
        let kc = self.kubeconfig.display().to_string();
        let mut args = vec!["controllers", "--kubeconfig", &kc];
        args.extend_from_slice(extra);
        self.start(key, &args);
    }

    /// Start `fairlead <args>` in the namespace as process `key`.
    fn start(&mut self, key: &str, args: &[&str]) {
        let mut cmd = self.ns.command(FAIRLEAD);
        cmd.args(args).env("RUST_LOG", "info,fairlead=debug");
        let p = self.ns.spawn(cmd, &self.log_path(key));
        self.procs.insert(key.to_string(), p);
    }

    fn log_path(&self, key: &str) -> PathBuf {
        self.dir.path().join(format!("{key}.log"))
    }

    fn proc(&mut self, key: &str) -> &mut Proc {
        self.procs
            .get_mut(key)
            .unwrap_or_else(|| panic!("no process {key}"))
    }

    /// Wait until the API server (in process `key`) answers kubectl.
    fn wait_api(&mut self, key: &str) {
        let end = Instant::now() + SETTLE;
        loop {
            if self.kubeconfig.exists()
                && self.kubectl(&["get", "--raw", "/readyz"]).status.success()
            {
                return;
            }
            assert!(
                self.proc(key).alive(),
                "{key} exited:\n{}",
                self.log_tail(key)
            );
            assert!(
                Instant::now() < end,
                "API server not ready after {SETTLE:?}:\n{}",
                self.log_tail(key)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the node daemon's `/healthz` says 200 (it has synced).
    fn wait_healthz(&mut self) {
        let addr: SocketAddr = HEALTHZ.parse().unwrap();
        let agent = &mut self.agent;
        poll("node /healthz 200", SETTLE, || {
            matches!(agent.http(addr, "/healthz", 1, None)[0], Ok((200, _))).then_some(())
        });
    }

    fn log_tail(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(key)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    // -- kubectl --

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .env("KUBECACHEDIR", self.dir.path().join("kubectl-cache"));
        cmd
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl (is it on PATH?)")
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn apply(&self, yaml: &str) {
        let out = common::server::run_with_stdin(self.kubectl_cmd(&["apply", "-f", "-"]), yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Report a pod's IP and readiness through `pods/status`, as whoever
    /// runs its process would.
    fn set_pod(&self, pod: &str, ip: &str, ready: bool) {
        let status = if ready { "True" } else { "False" };
        let patch = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"{status}"}}]}}}}"#
        );
        self.kubectl_ok(&[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&a)).expect("kubectl JSON")
    }

    fn cluster_ip(&self, svc: &str) -> IpAddr {
        let s = self.get_json(&["get", "service", svc]);
        s["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("service {svc} has no clusterIP: {s}"))
    }

    fn node_port(&self, svc: &str, port: &str) -> u16 {
        let s = self.get_json(&["get", "service", svc]);
        s["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == port)
            .and_then(|p| p["nodePort"].as_u64())
            .unwrap_or_else(|| panic!("service {svc} port {port} has no nodePort: {s}"))
            as u16
    }

    /// The endpoints in the Service's slices: address → ready.
    fn slice_endpoints(&self, svc: &str) -> BTreeMap<String, bool> {
        let list = self.get_json(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={svc}"),
        ]);
        let mut out = BTreeMap::new();
        for s in list["items"].as_array().into_iter().flatten() {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                let ready = e["conditions"]["ready"].as_bool().unwrap_or(true);
                for a in e["addresses"].as_array().into_iter().flatten() {
                    out.insert(a.as_str().unwrap_or("").to_string(), ready);
                }
            }
        }
        out
    }

    // -- backends and traffic --

    /// Start an echo backend on `ip` and wait until it answers there.
    fn echo(&mut self, name: &str, ip: &str) {
        self.start(
            name,
            &[
                "echo",
                "--name",
                name,
                "--bind",
                ip,
                "--http-port",
                "8080",
                "--tcp-port",
                "9000",
                "--udp-port",
                "9053",
            ],
        );
        let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
        let agent = &mut self.agent;
        poll(&format!("backend {name} on {addr}"), SETTLE, || {
            (agent.names(addr, 1, None)[0].as_deref() == Ok(name)).then_some(())
        });
    }

    /// The three backends, registered as Ready pods of [`web_yaml`].
    fn three_ready_backends(&mut self) {
        self.apply(&web_yaml());
        for (name, ip) in BACKENDS {
            self.echo(name, ip);
            self.set_pod(name, ip, true);
        }
    }

    /// `n` sequential requests; panics on any failure.
    fn names_ok(&mut self, addr: SocketAddr, n: usize, src: Option<IpAddr>) -> Vec<String> {
        self.agent
            .names(addr, n, src)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i} to {addr} failed: {e}")))
            .collect()
    }

    /// Poll until requests to `addr` reach exactly the backends `want`
    /// (every one of them within a window, no other); returns how long.
    fn wait_serving(&mut self, addr: SocketAddr, want: &[&str]) -> Duration {
        let started = Instant::now();
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let agent = &mut self.agent;
        poll(
            &format!("{addr} served by exactly {want:?}"),
            SETTLE,
            || {
                let seen: BTreeSet<String> = agent
                    .names(addr, want.len() * 2, None)
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|e| format!("error: {e}")))
                    .collect();
                (seen == want).then_some(())
            },
        );
        started.elapsed()
    }

    /// The node's `/metrics` text.
    fn metrics_text(&mut self) -> String {
        match &self
            .agent
            .http(METRICS.parse().unwrap(), "/metrics", 1, None)[0]
        {
            Ok((200, body)) => body.clone(),
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    /// The value of one sample `name{labels...}` (labels in any order
    /// must all be present), 0 if absent.
    fn metric(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text();
        sample(&text, name, labels).unwrap_or(0.0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for key in self.procs.keys() {
                eprintln!("---- {key} log (tail) ----\n{}", self.log_tail(key));
            }
        }
    }
}

/// Find a sample in Prometheus text by name and labels.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Service `web` (NodePort; `http` 80 → the named container port,
/// `tcp` 9000 → 9000), UDP Service `dns` (53 → 9053), and the three pods
/// (labels `app: web`, container ports), all selected by both.
fn web_yaml() -> String {
    let mut y = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: tcp, port: 9000, targetPort: 9000}
---
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  selector: {app: web}
  ports:
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
"#,
    );
    for (name, _) in BACKENDS {
        y.push_str(&pod_yaml(name, "web"));
    }
    y
}

fn pod_yaml(name: &str, app: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  containers:
  - name: echo
    image: fairlead
    ports:
    - {{name: http, containerPort: 8080}}
    - {{name: tcp, containerPort: 9000}}
    - {{name: dns, containerPort: 9053, protocol: UDP}}
"#
    )
}

fn counts(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One sample: (name, labels, value).
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse Prometheus text with the reference Python parser: metric family
/// name → (type, samples as (name, labels, value)). Panics with the
/// parser's error on malformed input.
fn parse_prometheus(text: &str) -> BTreeMap<String, (String, Vec<Sample>)> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [
        [s.name, s.labels, s.value if math.isfinite(s.value) else None] for s in f.samples]}
print(json.dumps(out))
"#;
    let mut child = Command::new(common::python::python_with(
        "prometheus_client",
        "prometheus_client",
    ))
    .args(["-c", SCRIPT])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the metrics text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("parser output");
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, f)| {
            let samples = f["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels = s[1]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect();
                    (
                        s[0].as_str().unwrap().to_string(),
                        labels,
                        s[2].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect();
            (
                name.clone(),
                (f["type"].as_str().unwrap_or("").to_string(), samples),
            )
        })
        .collect()
}

// ---- acceptance 1 + 8 -------------------------------------------------------

/// 300 sequential requests to the ClusterIP split exactly 100/100/100 (in
/// strict rotation), the same through the NodePort, a UDP Service answers
/// (one flow per socket, round robin, replies from the service address);
/// then `/healthz`, `/livez` and `/metrics` answer and the metrics parse as
/// Prometheus text with kube-proxy's names and exact connection counts.
#[test]
fn round_robin_cluster_ip_node_port_udp_then_health_and_metrics() {
    let mut c = Cluster::up("rr");
    c.three_ready_backends();
    let vip = c.cluster_ip("web");
    let http = SocketAddr::new(vip, 80);
    let np = SocketAddr::new("127.0.0.1".parse().unwrap(), c.node_port("web", "http"));
    let took = c.wait_serving(http, &["b1", "b2", "b3"]);
    println!(
        "all three backends serving the ClusterIP after {}",
        ms(took)
    );
    c.wait_serving(np, &["b1", "b2", "b3"]);

    let svc_http = [("service", "default/web:http")];
    let before = c.metric("fairlead_proxy_connections_total", &svc_http);
    for (what, addr) in [("ClusterIP", http), ("NodePort", np)] {
        let started = Instant::now();
        let seq = c.names_ok(addr, 300, None);
        let elapsed = started.elapsed();
        let n = counts(&seq);
        assert_eq!(
            n.values().copied().collect::<Vec<_>>(),
            vec![100, 100, 100],
            "{what} {addr}: {n:?}"
        );
        assert_eq!(n.keys().cloned().collect::<Vec<_>>(), ["b1", "b2", "b3"]);
        for (i, name) in seq.iter().enumerate() {
            assert_eq!(name, &seq[i % 3], "{what}: not a strict rotation at {i}");
        }
        println!("300 requests via {what} {addr}: {n:?} in {}", ms(elapsed));
    }
    let after = c.metric("fairlead_proxy_connections_total", &svc_http);
    assert_eq!(after - before, 600.0, "connections counted for web:http");

    // UDP: each fresh socket is a new flow; flows are balanced round robin
    // and every reply comes from the service address.
    let dns = SocketAddr::new(c.cluster_ip("dns"), 53);
    let agent = &mut c.agent;
    poll("UDP service answering", SETTLE, || {
        agent.udp(dns, "hostname", 1)[0].is_ok().then_some(())
    });
    let replies: Vec<String> = c
        .agent
        .udp(dns, "hostname", 6)
        .into_iter()
        .map(|r| {
            let (reply, from) = r.expect("UDP reply");
            assert_eq!(from, dns.to_string(), "reply source");
            reply
        })
        .collect();
    let n = counts(&replies);
    assert_eq!(
        n,
        BTreeMap::from([("b1".into(), 2), ("b2".into(), 2), ("b3".into(), 2)]),
        "UDP flows {replies:?}"
    );
    let r = c.agent.udp(dns, "ping", 1).remove(0).expect("UDP echo");
    assert!(r.0.ends_with(": ping"), "{r:?}");

    // Acceptance 8: health and metrics inside the namespace.
    let healthz: SocketAddr = HEALTHZ.parse().unwrap();
    for path in ["/healthz", "/livez"] {
        let (code, body) = c.agent.http(healthz, path, 1, None).remove(0).expect(path);
        assert_eq!(code, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        assert!(
            v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()),
            "{body}"
        );
        assert_eq!(v["nodeEligible"], true, "{body}");
    }
    let (code, _) = c
        .agent
        .http(healthz, "/nope", 1, None)
        .remove(0)
        .expect("GET /nope");
    assert_eq!(code, 404);

    let text = c.metrics_text();
    let fams = parse_prometheus(&text);
    let family = |name: &str, ty: &str| {
        let (t, samples) = fams
            .get(name)
            .unwrap_or_else(|| panic!("metric family {name} missing; have {:?}", fams.keys()));
        assert_eq!(t, ty, "type of {name}");
        samples.clone()
    };
    let count_of = |samples: &[(String, BTreeMap<String, String>, f64)], name: &str| {
        samples
            .iter()
            .find(|s| s.0 == format!("{name}_count"))
            .map(|s| s.2)
            .unwrap_or(0.0)
    };
    let sync = family("kubeproxy_sync_proxy_rules_duration_seconds", "histogram");
    assert!(count_of(&sync, "kubeproxy_sync_proxy_rules_duration_seconds") >= 1.0);
    let prog = family(
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
    );
    assert!(
        count_of(&prog, "kubeproxy_network_programming_duration_seconds") >= 1.0,
        "pod readiness changes were programmed: {prog:?}"
    );
    let last = family("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last[0].2 > now - 600.0 && last[0].2 <= now + 1.0,
        "last sync timestamp {} vs now {now}",
        last[0].2
    );
    for counter in [
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "kubeproxy_sync_proxy_rules_service_changes",
    ] {
        let s = family(counter, "counter");
        assert!(s[0].2 >= 1.0, "{counter}: {s:?}");
    }
    let conns = family("fairlead_proxy_connections", "counter");
    let web = conns
        .iter()
        .find(|s| s.1.get("service").map(String::as_str) == Some("default/web:http"))
        .expect("connections of default/web:http");
    assert!(web.2 >= 600.0, "{web:?}");
    println!(
        "metrics: {} families parsed by prometheus_client; web:http connections {}",
        fams.len(),
        web.2
    );
}

// ---- acceptance 2 -----------------------------------------------------------

/// A pod marked not Ready stops receiving new requests within a bounded
/// time (reported); marked Ready again, it is used again. No request fails
/// during either change.
#[test]
fn not_ready_endpoint_is_dropped_then_readded() {
    let mut c = Cluster::up("ready");
    c.three_ready_backends();
    let http = SocketAddr::new(c.cluster_ip("web"), 80);
    c.wait_serving(http, &["b1", "b2", "b3"]);

    // Take b3 out: every request keeps succeeding; measure until the
    // last request that still reached b3.
    let t0 = Instant::now();
    c.set_pod("b3", "127.0.0.13", false);
    let mut clean_since: Option<Instant> = None;
    let mut clean = 0;
    while clean < 12 {
        assert!(
            t0.elapsed() < SETTLE,
            "b3 still receiving requests after {SETTLE:?}"
        );
        let name = c.names_ok(http, 1, None).remove(0);
        if name == "b3" {
            clean = 0;
            clean_since = None;
        } else {
            clean += 1;
            clean_since.get_or_insert_with(Instant::now);
        }
    }
    let dropped = clean_since.unwrap() - t0;
    println!("not-ready endpoint stopped receiving after {}", ms(dropped));
    assert!(dropped < CONVERGE, "took {dropped:?}");
    let n = counts(&c.names_ok(http, 30, None));
    assert_eq!(
        n,
        BTreeMap::from([("b1".into(), 15), ("b2".into(), 15)]),
        "two endpoints left"
    );
    assert_eq!(
        c.slice_endpoints("web").get("127.0.0.13"),
        Some(&false),
        "the slice keeps b3 as not ready"
    );

    // Back in.
    let t1 = Instant::now();
    c.set_pod("b3", "127.0.0.13", true);
    let mut seen = false;
    while !seen {
        assert!(t1.elapsed() < SETTLE, "b3 not used again after {SETTLE:?}");
        seen = c.names_ok(http, 1, None)[0] == "b3";
    }
    let readded = t1.elapsed();
    println!("ready again: endpoint used again after {}", ms(readded));
    assert!(readded < CONVERGE, "took {readded:?}");
    let n = counts(&c.names_ok(http, 30, None));
    assert_eq!(
        n,
        BTreeMap::from([("b1".into(), 10), ("b2".into(), 10), ("b3".into(), 10)])
    );
}

// ---- acceptance 3 -----------------------------------------------------------

/// A backend process dies without the API knowing: no client request
/// fails, and the dead endpoint is tried once and then skipped (its
/// connect errors stay at one while the others share the load).
#[test]
fn dead_backend_fails_over_and_is_skipped() {
    let mut c = Cluster::up("failover");
    c.three_ready_backends();
    let http = SocketAddr::new(c.cluster_ip("web"), 80);
    c.wait_serving(http, &["b1", "b2", "b3"]);
    let svc = [("service", "default/web:http")];
    let errors_before = c.metric("fairlead_proxy_backend_connect_errors_total", &svc);

    c.proc("b2").kill9();
    let started = Instant::now();
    let seq = c.names_ok(http, 60, None);
    let elapsed = started.elapsed();
    let n = counts(&seq);
    assert_eq!(n.get("b2"), None, "{n:?}");
    assert_eq!(n.values().sum::<usize>(), 60);
    for b in ["b1", "b3"] {
        let k = n.get(b).copied().unwrap_or(0);
        assert!((29..=31).contains(&k), "{b}: {k} of 60 ({n:?})");
    }
    let tries = c.metric("fairlead_proxy_backend_connect_errors_total", &svc) - errors_before;
    println!(
        "backend killed: 60/60 requests succeeded in {} ({n:?}); connect attempts to the dead one: {tries}",
        ms(elapsed)
    );
    assert!(
        tries >= 1.0,
        "the dead endpoint was never tried: the test proves nothing"
    );
    assert!(
        tries <= 2.0,
        "the dead endpoint kept being tried ({tries} failed connects in {elapsed:?})"
    );
    // Nobody told the API: the endpoint is still listed as ready.
    assert_eq!(c.slice_endpoints("web").get("127.0.0.12"), Some(&true));
}

// ---- acceptance 4 -----------------------------------------------------------

/// `sessionAffinity: ClientIP`: each client IP sticks to one backend;
/// a new client gets the next backend in the rotation; after
/// `timeoutSeconds` idle the client is balanced anew.
#[test]
fn client_ip_affinity_sticks_until_timeout() {
    let mut c = Cluster::up("affinity");
    c.three_ready_backends();
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3}}
  ports:
  - {name: http, port: 80, targetPort: http}
"#,
    );
    let http = SocketAddr::new(c.cluster_ip("sticky"), 80);
    let agent = &mut c.agent;
    poll("sticky service answering", SETTLE, || {
        agent.names(http, 1, None)[0].is_ok().then_some(())
    });
    let a: IpAddr = "127.0.0.21".parse().unwrap();
    let b: IpAddr = "127.0.0.22".parse().unwrap();
    let one = |c: &mut Cluster, src: IpAddr, n: usize| {
        let got = counts(&c.names_ok(http, n, Some(src)));
        assert_eq!(got.len(), 1, "client {src} spread over {got:?}");
        got.into_keys().next().unwrap()
    };
    let x = one(&mut c, a, 20);
    let y = one(&mut c, b, 20);
    assert_ne!(x, y, "a new client gets the next backend in the rotation");
    assert_eq!(one(&mut c, a, 5), x, "client A still affine");
    println!("affinity: client {a} → {x}, client {b} → {y}");

    // Idle past timeoutSeconds (the timeout itself is what is tested).
    std::thread::sleep(Duration::from_millis(3500));
    let z = one(&mut c, a, 5);
    println!("after the 3 s timeout: client {a} → {z}");
    assert_ne!(z, x, "affinity expired: client A is balanced anew");
}

// ---- acceptance 5 -----------------------------------------------------------

/// A Service without endpoints refuses within 100 ms (TCP and UDP), both
/// one that never had endpoints and one whose only endpoint went away.
#[test]
fn service_without_endpoints_refuses_fast() {
    let mut c = Cluster::up("refuse");
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports:
  - {name: tcp, port: 80, targetPort: 8080}
  - {name: udp, port: 53, targetPort: 9053, protocol: UDP}
"#,
    );
    let vip = c.cluster_ip("empty");
    // The proxy has programmed the Service once its ClusterIP is local;
    // before that a refusal would prove nothing.
    let ns = &c.ns;
    poll("ClusterIP of the empty service made local", SETTLE, || {
        ns.addresses()
            .contains(&format!("inet {vip}/"))
            .then_some(())
    });
    let check = |c: &mut Cluster, addr: SocketAddr, udp: bool, what: &str| {
        let mut worst = Duration::ZERO;
        for _ in 0..5 {
            let (outcome, took) = c.agent.probe(addr, udp);
            let ok = if udp {
                outcome == "refused"
            } else {
                ["refused", "reset", "eof"].contains(&outcome.as_str())
            };
            assert!(ok, "{what} {addr}: {outcome} after {took:?}");
            assert!(
                took < REFUSE_WITHIN,
                "{what} {addr}: {outcome} took {took:?}"
            );
            worst = worst.max(took);
        }
        println!("{what} {addr}: refused, slowest of 5 in {}", ms(worst));
    };
    check(&mut c, SocketAddr::new(vip, 80), false, "no endpoints, TCP");
    check(&mut c, SocketAddr::new(vip, 53), true, "no endpoints, UDP");

    // A Service that had one endpoint and lost it.
    c.apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: solo}}
spec:
  selector: {{app: solo}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
{}"#,
        pod_yaml("b1", "solo")
    ));
    c.echo("b1", "127.0.0.11");
    c.set_pod("b1", "127.0.0.11", true);
    let solo = SocketAddr::new(c.cluster_ip("solo"), 80);
    c.wait_serving(solo, &["b1"]);
    c.set_pod("b1", "127.0.0.11", false);
    let agent = &mut c.agent;
    poll("solo service refusing", SETTLE, || {
        (agent.probe(solo, false).0 != "answered").then_some(())
    });
    check(&mut c, solo, false, "endpoint gone, TCP");
}

// ---- acceptance 6 -----------------------------------------------------------

/// A TCP connection through the ClusterIP survives the removal of its
/// endpoint from the Service (it drains; new connections go elsewhere) and
/// a kill -9 + restart of the API server (the data plane keeps serving the
/// last known state, and resumes from its watch when the server is back).
#[test]
fn long_lived_connection_survives_drain_and_apiserver_restart() {
    let mut c = Cluster::empty("drain");
    c.start_apiserver();
    c.start_controllers("controllers", &[]);
    c.start_node();
    c.apply(&web_yaml());
    for (name, ip) in &BACKENDS[..2] {
        c.echo(name, ip);
    }
    c.set_pod("b1", "127.0.0.11", true);
    c.set_pod("b2", "127.0.0.12", false);
    let vip = c.cluster_ip("web");
    let http = SocketAddr::new(vip, 80);
    let tcp = SocketAddr::new(vip, 9000);
    c.wait_serving(http, &["b1"]);
    // b1 is the only endpoint, so this connection is b1's.
    let agent = &mut c.agent;
    poll("TCP service port open", SETTLE, || {
        agent.open("long", tcp).ok()
    });
    assert_eq!(c.agent.echo("long", "hello-1").as_deref(), Ok("hello-1"));

    // b1 leaves the Service, b2 joins: new traffic moves, the old
    // connection stays.
    c.set_pod("b1", "127.0.0.11", false);
    c.set_pod("b2", "127.0.0.12", true);
    let moved = c.wait_serving(http, &["b2"]);
    println!("traffic moved to b2 after {}", ms(moved));
    assert_eq!(c.slice_endpoints("web").get("127.0.0.11"), Some(&false));
    assert_eq!(
        c.agent.echo("long", "hello-2").as_deref(),
        Ok("hello-2"),
        "the connection to the removed endpoint was cut"
    );

    // The API server dies: the data plane keeps serving.
    c.proc("apiserver").kill9();
    assert!(
        !c.kubectl(&["get", "--raw", "/readyz"]).status.success(),
        "the API server is still answering after kill -9"
    );
    assert_eq!(
        c.agent.echo("long", "while-down").as_deref(),
        Ok("while-down")
    );
    assert_eq!(c.names_ok(http, 4, None), ["b2", "b2", "b2", "b2"]);
    c.agent
        .open("fresh", tcp)
        .expect("new connection while the API server is down");
    assert_eq!(c.agent.echo("fresh", "x").as_deref(), Ok("x"));
    c.agent.close("fresh");

    // Back (same data directory and port).
    let restarted = Instant::now();
    c.start_apiserver();
    println!("API server back after {}", ms(restarted.elapsed()));
    assert_eq!(c.agent.echo("long", "after").as_deref(), Ok("after"));
    assert_eq!(c.names_ok(http, 4, None), ["b2", "b2", "b2", "b2"]);
    // The node resumed its watches: a change made now reaches the proxy.
    let t = Instant::now();
    c.set_pod("b1", "127.0.0.11", true);
    c.wait_serving(http, &["b1", "b2"]);
    println!(
        "after the restart, a readiness change was programmed in {}",
        ms(t.elapsed())
    );
    c.agent
        .open("fresh", tcp)
        .expect("new connection after the restart");
    assert_eq!(c.agent.echo("fresh", "y").as_deref(), Ok("y"));
    assert_eq!(c.agent.echo("long", "still").as_deref(), Ok("still"));
    for key in ["controllers", "node"] {
        assert!(c.proc(key).alive(), "{key} died:\n{}", c.log_tail(key));
    }
}

// ---- acceptance 7 -----------------------------------------------------------

/// Two `fairlead controllers` with short leases: the Lease names one
/// leader; kill it, and the other takes over — slices keep following pod
/// changes (takeover time reported).
#[test]
fn controllers_leader_failover_keeps_slices_updated() {
    let mut c = Cluster::empty("leader");
    c.start_apiserver();
    let lease = [
        "--leader-elect-lease-duration",
        "4",
        "--leader-elect-renew-deadline",
        "3",
        "--leader-elect-retry-period",
        "1",
    ];
    for id in ["a", "b"] {
        let mut args = vec!["--identity", id];
        args.extend_from_slice(&lease);
        c.start_controllers(id, &args);
    }
    let holder = |c: &Cluster| {
        let out = c.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "lease",
            "fairlead-controllers",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !id.is_empty()).then_some(id)
    };
    let leader = poll("a Lease holder", SETTLE, || holder(&c));
    assert!(leader == "a" || leader == "b", "holder {leader:?}");
    let standby = if leader == "a" { "b" } else { "a" };

    c.apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
{}"#,
        pod_yaml("p1", "web")
    ));
    // Pod IPs here are only data: nothing is sent to them.
    c.set_pod("p1", "10.244.0.1", true);
    poll("p1 ready in the slice", SETTLE, || {
        (c.slice_endpoints("web").get("10.244.0.1") == Some(&true)).then_some(())
    });

    c.proc(&leader).kill9();
    let killed = Instant::now();
    c.apply(&pod_yaml("p2", "web"));
    c.set_pod("p2", "10.244.0.2", true);
    c.set_pod("p1", "10.244.0.1", false);
    let want = BTreeMap::from([
        ("10.244.0.1".to_string(), false),
        ("10.244.0.2".to_string(), true),
    ]);
    poll("slices updated by the new leader", SETTLE, || {
        (c.slice_endpoints("web") == want).then_some(())
    });
    let takeover = killed.elapsed();
    assert_eq!(
        holder(&c).as_deref(),
        Some(standby),
        "Lease holder after the kill"
    );
    println!(
        "leader {leader} killed; {standby} took over and updated the slices after {}",
        ms(takeover)
    );
    assert!(
        takeover < Duration::from_secs(4 + 1 + 5),
        "takeover took {takeover:?} with a 4 s lease"
    );

    // And it keeps acting on later changes, promptly.
    let t = Instant::now();
    c.set_pod("p1", "10.244.0.1", true);
    poll("p1 ready again in the slice", SETTLE, || {
        (c.slice_endpoints("web").get("10.244.0.1") == Some(&true)).then_some(())
    });
    println!("next change reflected in {}", ms(t.elapsed()));
    assert!(t.elapsed() < CONVERGE);
    assert!(c.proc(standby).alive(), "{}", c.log_tail(standby));
}
