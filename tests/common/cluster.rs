//! A whole fairlead cluster inside one network namespace, for end-to-end
//! tests: the `fairlead` processes (`up`, or `apiserver`, `controllers` and
//! `node` separately), echo backends, kubectl and the network client (an
//! [`Agent`]) all run inside a [`Netns`] the test creates, so ClusterIPs,
//! NodePorts and pod IPs are only ever addressed there.
//!
//! Pods are registered the way the issues prescribe: `kubectl apply` of a
//! Pod, then its IP and readiness through `pods/status`
//! ([`Cluster::set_pod`]).
//!
//! Also here: reading the node's Prometheus text ([`sample`],
//! [`parse_prometheus`]) and the small helpers the tests report with
//! ([`counts`], [`ms`]).
//!
//! A test binary that starts a [`Cluster`] has a `#[test] fn agent()` that
//! calls [`super::netns::agent_main`] (the agent is that test, re-executed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::netns::{Agent, Netns, Proc};
use super::server::{poll, run_with_stdin, stdout_ok};

pub const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead");

/// How long the system may take to reach a state a test waits for
/// (generous: an upper bound, not an expectation).
pub const SETTLE: Duration = Duration::from_secs(30);

/// How often the garbage collector looks (`controllers::gc::PERIOD`).
pub const GC_PERIOD: Duration = Duration::from_secs(1);

/// The API server's port inside the namespace.
pub const API_PORT: &str = "6443";

/// The node daemon's default health and metrics addresses.
pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";

/// The name of the `#[test]` that serves as the agent.
const AGENT_TEST: &str = "agent";

/// Lines of a process log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// One namespace with fairlead processes, echo backends, kubectl and an
/// agent in it. Field order is drop order: agent, processes, namespace,
/// then the data directory.
pub struct Cluster {
    pub agent: Agent,
    procs: BTreeMap<String, Proc>,
    pub ns: Netns,
    dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// A namespace with the agent in it and nothing else running yet.
    pub fn empty(test: &str) -> Cluster {
        let ns = Netns::new();
        let dir = tempfile::Builder::new()
            .prefix(&format!("fairlead-{test}-"))
            .tempdir()
            .expect("temp dir");
        let agent = Agent::start(&ns, AGENT_TEST);
        Cluster {
            agent,
            procs: BTreeMap::new(),
            kubeconfig: dir.path().join("kubeconfig"),
            ns,
            dir,
        }
    }

    /// `fairlead up` (process `up`) with `args` after the data directory
    /// and port, once its API answers and its node daemon is healthy.
    pub fn up(test: &str, args: &[&str]) -> Cluster {
        let mut c = Cluster::empty(test);
        c.start_up(args);
        c
    }

    /// Start `fairlead up` in this namespace (see [`Cluster::up`]).
    pub fn start_up(&mut self, args: &[&str]) {
        let data = self.dir.path().display().to_string();
        let mut all = vec!["up", "--data-dir", &data, "--secure-port", API_PORT];
        all.extend_from_slice(args);
        self.start("up", &all);
        self.wait_api("up");
        self.wait_healthz();
    }

    /// `fairlead apiserver` alone (process `apiserver`), answering.
    pub fn start_apiserver(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        let data = self.dir.path().display().to_string();
        self.start(
            "apiserver",
            &["apiserver", "--data-dir", &data, "--secure-port", API_PORT],
        );
        self.wait_api("apiserver");
    }

    /// `fairlead node` (process `node`) with `args`, once healthy.
    pub fn start_node(&mut self, args: &[&str]) {
        let kc = self.kubeconfig.display().to_string();
        let mut all = vec!["node", "--kubeconfig", &kc];
        all.extend_from_slice(args);
        self.start("node", &all);
        self.wait_healthz();
    }

    /// `fairlead controllers` as process `key`.
    pub fn start_controllers(&mut self, key: &str, extra: &[&str]) {
        let kc = self.kubeconfig.display().to_string();
        let mut args = vec!["controllers", "--kubeconfig", &kc];
        args.extend_from_slice(extra);
        self.start(key, &args);
    }

    /// Start `fairlead <args>` in the namespace as process `key` (logging
    /// to `<key>.log`; a process of the same key is replaced).
    pub fn start(&mut self, key: &str, args: &[&str]) {
        self.start_env(key, args, &[]);
    }

    /// [`Cluster::start`] of a command line of the test's own (a wrapper
    /// script, say), logging as process `key`.
    pub fn start_command(&mut self, key: &str, mut cmd: Command) {
        cmd.env("RUST_LOG", "info,fairlead=debug");
        let p = self.ns.spawn(cmd, &self.log_path(key));
        self.procs.insert(key.to_string(), p);
    }

    /// [`Cluster::start`] with more environment variables.
    pub fn start_env(&mut self, key: &str, args: &[&str], env: &[(&str, &str)]) {
        let mut cmd = self.ns.command(FAIRLEAD);
        cmd.args(args).env("RUST_LOG", "info,fairlead=debug");
        cmd.envs(env.iter().copied());
        let p = self.ns.spawn(cmd, &self.log_path(key));
        self.procs.insert(key.to_string(), p);
    }

    /// Run `fairlead <args>` in the namespace to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.ns
            .command(FAIRLEAD)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run fairlead")
    }

    /// The data directory (`--data-dir` of `fairlead up`).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.dir.path().join(format!("{key}.log"))
    }

    pub fn proc(&mut self, key: &str) -> &mut Proc {
        self.procs
            .get_mut(key)
            .unwrap_or_else(|| panic!("no process {key}"))
    }

    /// Wait until the API server (in process `key`) answers kubectl.
    pub fn wait_api(&mut self, key: &str) {
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
    pub fn wait_healthz(&mut self) {
        let addr: SocketAddr = HEALTHZ.parse().unwrap();
        let agent = &mut self.agent;
        poll("node /healthz 200", SETTLE, || {
            matches!(agent.http(addr, "/healthz", 1, None)[0], Ok((200, _))).then_some(())
        });
    }

    /// The last lines of process `key`'s log.
    pub fn log_tail(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(key)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    // -- kubectl --

    /// kubectl against this cluster, run inside the namespace.
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .env("KUBECACHEDIR", self.dir.path().join("kubectl-cache"));
        cmd
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl (is it on PATH?)")
    }

    /// kubectl's stdout; panics with its stderr on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        stdout_ok(format_args!("kubectl {args:?}"), self.kubectl(args))
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        let out = run_with_stdin(self.kubectl_cmd(&["apply", "-f", "-"]), yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Report a pod's IP and readiness through `pods/status`, as whoever
    /// runs its process would.
    pub fn set_pod(&self, pod: &str, ip: &str, ready: bool) {
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

    /// `kubectl <args> -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&a)).expect("kubectl JSON")
    }

    pub fn cluster_ip(&self, svc: &str) -> IpAddr {
        let s = self.get_json(&["get", "service", svc]);
        s["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("service {svc} has no clusterIP: {s}"))
    }

    pub fn node_port(&self, svc: &str, port: &str) -> u16 {
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
    pub fn slice_endpoints(&self, svc: &str) -> BTreeMap<String, bool> {
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

    /// Start an echo backend `name` on `ip` (HTTP 8080, TCP echo 9000, UDP
    /// 9053) as process `name`, and wait until it answers there.
    pub fn echo(&mut self, name: &str, ip: &str) {
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

    /// [`web_yaml`] of the `backends` (name, pod IP), each running as an
    /// echo backend on its IP and registered as a Ready pod.
    pub fn ready_backends(&mut self, backends: &[(&str, &str)]) {
        let names: Vec<&str> = backends.iter().map(|(n, _)| *n).collect();
        self.apply(&web_yaml(&names));
        for (name, ip) in backends {
            self.echo(name, ip);
            self.set_pod(name, ip, true);
        }
    }

    /// `n` sequential requests; panics on any failure.
    pub fn names_ok(&mut self, addr: SocketAddr, n: usize, src: Option<IpAddr>) -> Vec<String> {
        self.agent.names_ok(addr, n, src)
    }

    /// Poll until requests to `addr` reach exactly the backends `want`
    /// (every one of them within a window, no other); returns how long.
    pub fn wait_serving(&mut self, addr: SocketAddr, want: &[&str]) -> Duration {
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
    pub fn metrics_text(&mut self) -> String {
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
    pub fn metric(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
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
        // Pod processes run in their own sessions and outlive the node:
        // stop the fairlead processes, then remove every pod (processes,
        // cgroups, namespaces) the cluster started.
        self.procs.clear();
        let data = self.dir.path().display().to_string();
        let _ = self
            .ns
            .command(FAIRLEAD)
            .args(["node", "--cleanup", "--data-dir", &data])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---- more nodes ---------------------------------------------------------------

/// The API server's address on the links to [`Node`]s (on the cluster
/// namespace's `lo`).
pub const LINK_SERVER: &str = "10.250.0.1";

impl Cluster {
    /// `fairlead up` (process `up`) with its API server on
    /// [`LINK_SERVER`], so node agents in other namespaces
    /// ([`Cluster::join_node`]) reach it; `args` as for [`Cluster::up`].
    pub fn up_linked(test: &str, args: &[&str]) -> Cluster {
        let mut c = Cluster::linked(test);
        c.start_up_linked(args);
        c
    }

    /// The namespace of [`Cluster::up_linked`] with nothing running yet:
    /// [`LINK_SERVER`] on `lo` and a route for the Service range.
    pub fn linked(test: &str) -> Cluster {
        let c = Cluster::empty(test);
        c.ns.run_ok(
            "ip",
            &["addr", "add", &format!("{LINK_SERVER}/32"), "dev", "lo"],
        );
        // nftables mode needs a route that covers the Service range, as a
        // node's default route does (the route lookup precedes the DNAT).
        c.ns.run_ok(
            "ip",
            &[
                "route",
                "add",
                "10.96.0.0/12",
                "dev",
                "lo",
                "src",
                LINK_SERVER,
            ],
        );
        c
    }

    /// `fairlead up` on [`LINK_SERVER`] in a [`Cluster::linked`] namespace.
    pub fn start_up_linked(&mut self, args: &[&str]) {
        let mut all = vec!["--bind-address", LINK_SERVER, "--node-ip", LINK_SERVER];
        all.extend_from_slice(args);
        self.start_up(&all);
    }

    /// A second node agent (`fairlead join ... --run-pods true`) named `name`
    /// in a namespace of its own, linked to this one by a veth pair
    /// (addresses `10.250.0.<index>` there, routes both ways, its default
    /// route via this one), once its
    /// Node is Ready. Needs [`Cluster::up_linked`].
    pub fn join_node(&self, name: &str, index: u8, args: &[&str]) -> Node {
        let ns = Netns::new();
        let dir = tempfile::Builder::new()
            .prefix(&format!("fairlead-{name}-"))
            .tempdir()
            .expect("temp dir");
        let ip = format!("10.250.0.{index}");
        let host_end = format!("fln{index}");
        self.ns.run_ok(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        );
        self.ns.run_ok("ip", &["link", "set", &host_end, "up"]);
        self.ns.run_ok(
            "ip",
            &["route", "add", &format!("{ip}/32"), "dev", &host_end],
        );
        ns.run_ok("ip", &["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.run_ok("ip", &["link", "set", "eth0", "up"]);
        ns.run_ok(
            "ip",
            &["route", "add", &format!("{LINK_SERVER}/32"), "dev", "eth0"],
        );
        // A real node has a default route; nftables mode needs one that
        // covers the Service range (the route lookup precedes the DNAT).
        ns.run_ok(
            "ip",
            &["route", "add", "default", "via", LINK_SERVER, "dev", "eth0"],
        );
        let kubeconfig = std::fs::read_to_string(&self.kubeconfig).expect("read kubeconfig");
        let server = kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server in kubeconfig")
            .trim()
            .to_string();
        let mut node = Node {
            proc: None,
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            server,
            token_file: self.dir.path().join("token"),
            ip,
            ns,
            dir,
        };
        node.start();
        poll(&format!("node {name} Ready"), SETTLE, || {
            // Not found until the join has its certificate and registers.
            let out = self.kubectl(&["get", "node", name, "-o", "json"]);
            let n: Value = serde_json::from_slice(&out.stdout).ok()?;
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(())
        });
        node
    }
}

/// A node agent of its own namespace (see [`Cluster::join_node`]).
/// Dropping it stops the agent, removes its pods (`fairlead node
/// --cleanup`) and deletes the namespace.
pub struct Node {
    proc: Option<Proc>,
    pub name: String,
    args: Vec<String>,
    /// The API server's URL and the server's join token file.
    server: String,
    token_file: PathBuf,
    pub ip: String,
    pub ns: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    /// (Re)start the agent: `fairlead join` with the server's token (the
    /// first start bootstraps the node's certificate, later ones reuse it).
    pub fn start(&mut self) {
        let (token, data) = (
            self.token_file.display().to_string(),
            self.dir.path().display().to_string(),
        );
        let mut cmd = self.ns.command(FAIRLEAD);
        cmd.args([
            "join",
            "--server",
            &self.server,
            "--token-file",
            &token,
            "--data-dir",
            &data,
            "--run-pods",
            "true",
            "--hostname-override",
            &self.name,
            "--node-ip",
            &self.ip,
        ])
        .args(&self.args)
        .env("RUST_LOG", "info,fairlead=debug");
        self.proc = Some(self.ns.spawn(cmd, &self.dir.path().join("node.log")));
    }

    /// Stop the agent (SIGTERM, as a service manager would); its pods'
    /// processes keep running, as containers outlive a stopped kubelet.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            assert!(
                p.stop(libc::SIGTERM, Duration::from_secs(10)),
                "node agent did not stop"
            );
        }
    }

    /// The kubeconfig `fairlead join` wrote (the node's own identity).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The API server URL the node joined.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- node {} log (tail) ----\n{}",
                self.name,
                self.log_tail()
            );
        }
        let data = self.dir.path().display().to_string();
        let _ = self
            .ns
            .command(FAIRLEAD)
            .args(["node", "--cleanup", "--data-dir", &data])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---- objects ----------------------------------------------------------------

/// Service `web` (NodePort; `http` 80 → the named container port,
/// `tcp` 9000 → 9000), UDP Service `dns` (53 → 9053), and one pod per name
/// of [`pod_yaml`] (label `app: web`), all selected by both.
pub fn web_yaml(pods: &[&str]) -> String {
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
    for name in pods {
        y.push_str(&pod_yaml(name, "web"));
    }
    y
}

/// Deployment `web`: `replicas` pods of `fairlead echo` on 8080 (ready
/// once they answer), behind NodePort Service `web` (80 → 8080, on
/// `node_port` when given).
pub fn echo_deployment_yaml(replicas: u32, node_port: Option<u16>) -> String {
    let node_port = node_port.map_or(String::new(), |p| format!(", nodePort: {p}"));
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: echo
        image: fairlead
        args: [echo, --http-port, "8080"]
        readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080{node_port}}}]
"#
    )
}

/// Service `name` (`http` 80 → the pods' `http` port) selecting
/// `app: <app>`; `spec` is more of its spec, in YAML lines indented by two.
pub fn http_service_yaml(name: &str, app: &str, spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {app}}}
{spec}  ports:
  - {{name: http, port: 80, targetPort: http}}
"#
    )
}

/// A pod `name` with label `app: <app>` and the echo backend's container
/// ports (`http` 8080, `tcp` 9000, `dns` 9053/UDP), as a YAML document
/// starting with `---`.
/// The node the hand-made pods of [`pod_yaml`] are bound to: no agent
/// runs it, so their status is the test's own ([`Cluster::set_pod`]).
pub const FAKE_NODE: &str = "fake-node";

/// A Pod (label `app`) bound to [`FAKE_NODE`], whose IP and readiness the
/// test sets by hand.
pub fn pod_yaml(name: &str, app: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  nodeName: {FAKE_NODE}
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

// ---- reporting ----------------------------------------------------------------

/// How many times each name occurs.
pub fn counts(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// A duration in milliseconds, for the timings the tests print.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

// ---- Prometheus text --------------------------------------------------------------

/// Find a sample in Prometheus text by name and labels.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

/// One sample: (name, labels, value).
pub type Sample = (String, BTreeMap<String, String>, f64);

/// Metric family name → (type, samples).
pub type Families = BTreeMap<String, (String, Vec<Sample>)>;

/// Parse Prometheus text with the reference Python parser
/// (`prometheus_client`; counters' families are named without `_total`).
/// Panics with the parser's error on malformed input.
pub fn parse_prometheus(text: &str) -> Families {
    const SCRIPT: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [
        [s.name, s.labels, s.value if math.isfinite(s.value) else None] for s in f.samples]}
print(json.dumps(out))
"#;
    let mut cmd = Command::new(super::python::python_with(
        "prometheus_client",
        "prometheus_client",
    ));
    cmd.args(["-c", SCRIPT]);
    let out = run_with_stdin(cmd, text);
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

/// The samples of family `name`, which must exist with type `ty`.
pub fn family(fams: &Families, name: &str, ty: &str) -> Vec<Sample> {
    let (t, samples) = fams
        .get(name)
        .unwrap_or_else(|| panic!("metric family {name} missing; have {:?}", fams.keys()));
    assert_eq!(t, ty, "type of {name}");
    samples.clone()
}

/// A histogram's `_count` sample (0 when it has none).
pub fn histogram_count(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.0 == format!("{name}_count"))
        .map(|s| s.2)
        .unwrap_or(0.0)
}
