//! Beyond one machine: hosts join with a token (discovery checked by the
//! CA hash, a node certificate through a CertificateSigningRequest, the
//! node's own least-privilege identity), and pods on different nodes reach
//! each other through Services in both proxy modes over host-gw routes.
//! Every host is a network namespace the test creates.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use common::cluster::{counts, echo_deployment_yaml, Cluster, Node, FAIRLEAD, SETTLE};
use common::netns::Agent;
use common::server::poll;

#[test]
fn agent() {
    common::netns::agent_main();
}

/// The server's join token (`<data-dir>/token`).
fn server_token(c: &Cluster) -> String {
    std::fs::read_to_string(c.data_dir().join("token"))
        .expect("the server wrote its join token")
        .trim()
        .to_string()
}

/// `fairlead join` from node `b`'s namespace with `token`, as a new host
/// `node-x` with a data directory of its own: its exit and output.
fn try_join(b: &Node, token: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = b.ns.command(FAIRLEAD);
    cmd.args([
        "join",
        "--server",
        b.server(),
        "--token",
        token,
        "--data-dir",
    ])
    .arg(dir.path())
    .args(["--hostname-override", "node-x", "--run-pods", "true"]);
    let out = cmd.output().expect("run fairlead join");
    assert!(
        !dir.path().join("kubeconfig").exists() || out.status.success(),
        "a refused join wrote no kubeconfig"
    );
    out
}

fn refused(b: &Node, token: &str, why: &str) {
    let out = try_join(b, token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "join with {token:?} was refused");
    assert!(err.contains(why), "join with {token:?}: {why:?} in {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one line of reason, got {err}"
    );
}

#[test]
fn hosts_join_with_tokens_as_least_privileged_nodes() {
    let c = Cluster::up_linked("join", &["--hostname-override", "node-a"]);
    let b = c.join_node("node-b", 2, &[]);

    // The node's certificate came through an approved, issued CSR.
    let csrs = c.get_json(&["get", "csr"]);
    let items = csrs["items"].as_array().expect("CSR list");
    assert_eq!(items.len(), 1, "{csrs}");
    let csr = &items[0];
    assert!(csr["spec"]["username"]
        .as_str()
        .unwrap()
        .starts_with("system:bootstrap:"));
    assert!(csr["status"]["certificate"].is_string());
    let table = c.kubectl_ok(&["get", "csr"]);
    assert!(
        table.contains("Approved,Issued")
            && table.contains("kubernetes.io/kube-apiserver-client-kubelet"),
        "{table}"
    );

    // The node reaches the API through its local balancer, which learned
    // the servers from the `kubernetes` EndpointSlice (and keeps the list).
    let known = poll("the balancer's server list", SETTLE, || {
        std::fs::read_to_string(b.data_dir().join("apiservers.json")).ok()
    });
    assert_eq!(known.trim(), "[\"10.250.0.1:6443\"]");
    let endpoints = c.kubectl_ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ]);
    assert_eq!(endpoints.trim(), "10.250.0.1");
    let leases = c.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "leases",
        "-l",
        "apiserver.kubernetes.io/identity=kube-apiserver",
        "-o",
        "jsonpath={.items[*].spec.holderIdentity}",
    ]);
    assert_eq!(leases.trim(), "10.250.0.1:6443");

    // The node's identity: reads, may not delete Services or read Secrets.
    let as_node = |args: &[&str]| {
        b.ns.command("kubectl")
            .arg("--kubeconfig")
            .arg(b.kubeconfig())
            .arg("--request-timeout=10s")
            .args(args)
            .output()
            .expect("run kubectl")
    };
    let get = as_node(&["get", "svc", "kubernetes", "-o", "name"]);
    assert!(get.status.success(), "{get:?}");
    let del = as_node(&["delete", "svc", "kubernetes"]);
    let err = String::from_utf8_lossy(&del.stderr);
    assert!(
        !del.status.success()
            && err.contains("User \"system:node:node-b\" cannot delete resource \"services\""),
        "{err}"
    );
    let secrets = as_node(&["-n", "kube-system", "get", "secrets"]);
    assert!(
        !secrets.status.success() && String::from_utf8_lossy(&secrets.stderr).contains("forbidden"),
        "{secrets:?}"
    );

    // Tokens: listed, never their secrets; bad ones refused with the reason.
    let token = server_token(&c);
    let (hash, creds) = token.split_once("::").unwrap();
    let (id, secret) = creds.split_once('.').unwrap();
    let kc = c.kubeconfig.display().to_string();
    let list = c.run(&["token", "list", "--kubeconfig", &kc]);
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains(id) && !list.contains(secret), "{list}");

    refused(
        &b,
        &format!("{hash}::zzzzzz.{secret}"),
        "is unknown or was revoked",
    );
    refused(
        &b,
        &format!("{hash}::{id}.ffffffffffffffff"),
        "has a wrong secret",
    );
    refused(
        &b,
        &format!("K10{}::{creds}", "0".repeat(64)),
        "refusing to trust it",
    );
    refused(&b, "nonsense", "invalid join token");

    let create = |ttl: &str| {
        let out = c.run(&["token", "create", "--kubeconfig", &kc, "--ttl", ttl]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let revoked = create("1h");
    let rid = &revoked.split_once("::").unwrap().1[..6];
    let del = c.run(&["token", "delete", "--kubeconfig", &kc, rid]);
    assert!(del.status.success(), "{del:?}");
    refused(&b, &revoked, "is unknown or was revoked");

    let expiring = create("2s");
    // Past its expiry (one clock: the server runs on this machine).
    let expiry = std::time::SystemTime::now() + Duration::from_secs(3);
    poll("the token's expiry passed", Duration::from_secs(10), || {
        (std::time::SystemTime::now() > expiry).then_some(())
    });
    refused(&b, &expiring, "expired at");
    assert_eq!(
        c.get_json(&["get", "nodes"])["items"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "no refused host became a node"
    );
}

/// Two nodes, pods on both: each node reaches every pod through the
/// ClusterIP and through either node's NodePort, in exact round robin,
/// and a pod on the other node directly (host-gw routes).
fn pods_across_nodes(mode: &str) {
    let mut c = Cluster::up_linked(
        &format!("xnode-{mode}"),
        &["--hostname-override", "node-a", "--proxy-mode", mode],
    );
    let b = c.join_node("node-b", 2, &["--proxy-mode", mode]);
    c.apply(&echo_deployment_yaml(4, None));
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let pods = c.get_json(&["get", "pods", "-l", "app=web"]);
    let pods: Vec<(String, String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["spec"]["nodeName"].as_str().unwrap().to_string(),
                p["status"]["podIP"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let on_b = pods.iter().filter(|p| p.1 == "node-b").count();
    assert_eq!(on_b, 2, "2 of 4 replicas on node-b: {pods:?}");
    let names: Vec<&str> = pods.iter().map(|p| p.0.as_str()).collect();
    poll("4 ready endpoints", SETTLE, || {
        (c.slice_endpoints("web").values().filter(|r| **r).count() == 4).then_some(())
    });

    let cluster_ip = SocketAddr::new(c.cluster_ip("web"), 80);
    let node_port = c.get_json(&["get", "service", "web"])["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("a nodePort") as u16;
    let mut b_agent = Agent::start(&b.ns, "agent");
    let exact = |got: Vec<String>, from: &str, to: SocketAddr| {
        let got = counts(&got);
        let want: std::collections::BTreeMap<String, usize> =
            names.iter().map(|n| (n.to_string(), 10)).collect();
        assert_eq!(got, want, "from {from} to {to} ({mode})");
    };
    // The node's own address is on loopback in node-a's namespace: wait
    // until node-b's rules are in before counting.
    poll("node-b serves the ClusterIP", SETTLE, || {
        b_agent.names(cluster_ip, 1, None)[0]
            .as_ref()
            .ok()
            .map(|_| ())
    });
    for to in [
        cluster_ip,
        SocketAddr::new("10.250.0.1".parse().unwrap(), node_port),
        SocketAddr::new("10.250.0.2".parse().unwrap(), node_port),
    ] {
        let from_a = c.names_ok(to, 40, None);
        exact(from_a, "node-a", to);
        let from_b = b_agent.names_ok(to, 40, None);
        exact(from_b, "node-b", to);
    }
    // Pod to pod across nodes, no Service: the host-gw routes.
    for (name, node, ip) in &pods {
        let to = SocketAddr::new(ip.parse().unwrap(), 8080);
        let got = if node == "node-b" {
            c.names_ok(to, 1, None)
        } else {
            b_agent.names_ok(to, 1, None)
        };
        assert_eq!(&got[0], name, "{name} on {node} reached directly");
    }
}

#[test]
fn pods_across_nodes_nftables() {
    pods_across_nodes("nftables");
}

#[test]
fn pods_across_nodes_userspace() {
    pods_across_nodes("userspace");
}

/// `kubectl` with kubeconfig `kc` inside namespace `ns`.
fn kubectl_in(ns: &str, kc: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "kubectl",
            "--request-timeout=10s",
            "--kubeconfig",
        ])
        .arg(kc)
        .args(args)
        .output()
        .expect("run kubectl")
}

/// The addresses of the `kubernetes` Endpoints, as one string.
fn api_endpoints(ns: &str, kc: &std::path::Path) -> Option<String> {
    let out = kubectl_in(
        ns,
        kc,
        &[
            "get",
            "endpoints",
            "kubernetes",
            "-o",
            "jsonpath={.subsets[*].addresses[*].ip}",
        ],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Two API servers on one etcd: the `kubernetes` endpoints list both (each
/// server's lease), an agent's local balancer learns both, and when the
/// server the agent joined through dies (kill -9), the agent carries on
/// through the other: a Service created there reaches its data plane, and
/// the dead server leaves the endpoints when its lease expires.
#[test]
fn agents_follow_every_api_server() {
    let mut c = Cluster::linked("xsrv");
    const SECOND: &str = "10.250.0.3";
    c.ns.run_ok("ip", &["addr", "add", &format!("{SECOND}/32"), "dev", "lo"]);
    let etcd_dir = c.data_dir().join("etcd");
    let mut etcd = c.ns.command("etcd");
    etcd.arg(format!("--data-dir={}", etcd_dir.display()))
        .args([
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--log-level=warn",
        ]);
    let _etcd = c.ns.spawn(etcd, &c.data_dir().join("etcd.log"));
    let etcd = "http://127.0.0.1:2379";
    let health: SocketAddr = "127.0.0.1:2379".parse().unwrap();
    poll("etcd healthy", SETTLE, || {
        matches!(&c.agent.http(health, "/health", 1, None)[0], Ok((200, _))).then_some(())
    });
    c.start_up_linked(&[
        "--hostname-override",
        "node-a",
        "--proxy-mode",
        "userspace",
        "--etcd-servers",
        etcd,
    ]);
    let ns = c.ns.name.clone();
    let second_dir = c.data_dir().join("second");
    let second_kc = second_dir.join("kubeconfig");
    let sd = second_dir.display().to_string();
    c.start(
        "second",
        &[
            "apiserver",
            "--data-dir",
            &sd,
            "--secure-port",
            common::cluster::API_PORT,
            "--bind-address",
            SECOND,
            "--etcd-servers",
            etcd,
        ],
    );
    poll("both servers in the kubernetes endpoints", SETTLE, || {
        (api_endpoints(&ns, &second_kc).as_deref() == Some("10.250.0.1 10.250.0.3")).then_some(())
    });

    let b = c.join_node("node-b", 2, &["--proxy-mode", "userspace"]);
    poll("the agent's balancer knows both servers", SETTLE, || {
        let known = std::fs::read_to_string(b.data_dir().join("apiservers.json")).ok()?;
        (known.trim() == "[\"10.250.0.1:6443\",\"10.250.0.3:6443\"]").then_some(())
    });

    // The server the agent joined through dies with its node and controllers.
    c.proc("up").kill9();
    let killed = std::time::Instant::now();
    let mut echo = b.ns.command(FAIRLEAD);
    echo.args([
        "echo",
        "--name",
        "late",
        "--http-port",
        "9090",
        "--bind",
        "10.250.0.2",
    ]);
    let _echo = b.ns.spawn(echo, &b.data_dir().join("echo.log"));
    let mut apply = std::process::Command::new("ip");
    apply
        .args([
            "netns",
            "exec",
            &ns,
            "kubectl",
            "apply",
            "-f",
            "-",
            "--kubeconfig",
        ])
        .arg(&second_kc);
    let apply = common::server::run_with_stdin(
        apply,
        "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec:\n  ports: [{name: http, port: 80, targetPort: 9090}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: late-1\n  labels: {kubernetes.io/service-name: late}\n\
         addressType: IPv4\nendpoints: [{addresses: [10.250.0.2], conditions: {ready: true}}]\nports: [{name: http, port: 9090, protocol: TCP}]\n",
    );
    assert!(apply.status.success(), "{apply:?}");
    let ip = kubectl_in(
        &ns,
        &second_kc,
        &["get", "svc", "late", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let ip: std::net::IpAddr = String::from_utf8_lossy(&ip.stdout)
        .trim()
        .parse()
        .expect("a ClusterIP");
    let mut b_agent = Agent::start(&b.ns, "agent");
    let got = poll(
        "the agent serves a Service created through the other server",
        SETTLE,
        || {
            b_agent.names(SocketAddr::new(ip, 80), 1, None)[0]
                .clone()
                .ok()
        },
    );
    assert_eq!(got, "late");
    eprintln!("served {:?} after the kill", killed.elapsed());
    // The dead server's lease expires (15 s) and the live one drops it.
    poll(
        "the dead server leaves the endpoints",
        Duration::from_secs(40),
        || (api_endpoints(&ns, &second_kc).as_deref() == Some(SECOND)).then_some(()),
    );
    eprintln!("endpoints updated {:?} after the kill", killed.elapsed());
}

const LOCAL: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: local}
spec:
  replicas: 1
  selector: {matchLabels: {app: local}}
  template:
    metadata: {labels: {app: local}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-b}
      terminationGracePeriodSeconds: 2
      containers:
      - name: echo
        image: fairlead
        args: [echo, --http-port, \"8080\"]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: local}
  ports: [{port: 80, targetPort: 8080}]
";

/// `externalTrafficPolicy: Local` across nodes: the health-check nodePort
/// answers 200 on the node with the endpoint and 503 on the other, with
/// kube-proxy's body; the node with the endpoint serves its NodePort with
/// the client's own address kept (nftables; a userspace proxy cannot keep
/// it), and the other node does not serve it at all.
fn external_local(mode: &str) {
    let mut c = Cluster::up_linked(
        &format!("xlocal-{mode}"),
        &["--hostname-override", "node-a", "--proxy-mode", mode],
    );
    let b = c.join_node("node-b", 2, &["--proxy-mode", mode]);
    c.apply(LOCAL);
    c.kubectl_ok(&["rollout", "status", "deployment/local", "--timeout=60s"]);
    let svc = c.get_json(&["get", "service", "local"]);
    let health = svc["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("a healthCheckNodePort") as u16;
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("a nodePort") as u16;
    assert_ne!(health, node_port);
    let on_a = SocketAddr::new("10.250.0.1".parse().unwrap(), health);
    let on_b = SocketAddr::new("10.250.0.2".parse().unwrap(), health);
    let answer = |c: &mut Cluster, to: SocketAddr, status: u16, local: u64| {
        poll(&format!("{to} answers {status}"), SETTLE, || {
            let Ok((got, body)) = c.agent.http(to, "/", 1, None).remove(0) else {
                return None;
            };
            let body: serde_json::Value = serde_json::from_str(&body).ok()?;
            (got == status && body["localEndpoints"] == local).then_some(body)
        })
    };
    let body = answer(&mut c, on_b, 200, 1);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "default", "name": "local"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    answer(&mut c, on_a, 503, 0);

    let mut b_agent = Agent::start(&b.ns, "agent");
    let via_b = SocketAddr::new("10.250.0.2".parse().unwrap(), node_port);
    let seen = poll("node-b serves its NodePort", SETTLE, || {
        match c.agent.http(via_b, "/clientip", 1, None).remove(0) {
            Ok((200, ip)) => Some(ip),
            _ => None,
        }
    });
    if mode == "nftables" {
        assert_eq!(seen, "10.250.0.1", "the client's address is kept");
    }
    let via_a = SocketAddr::new("10.250.0.1".parse().unwrap(), node_port);
    let got = b_agent.http(via_a, "/clientip", 1, None).remove(0);
    assert!(
        !matches!(got, Ok((200, _))),
        "node-a has no local endpoint and must not serve its NodePort: {got:?}"
    );
    // The ClusterIP (internal policy Cluster) still reaches node-b's pod.
    let cluster_ip = SocketAddr::new(c.cluster_ip("local"), 80);
    assert_eq!(c.names_ok(cluster_ip, 2, None).len(), 2);

    // The endpoint goes away: node-b's health check turns 503.
    c.kubectl_ok(&["scale", "deployment/local", "--replicas=0"]);
    answer(&mut c, on_b, 503, 0);
    // A Service that no longer needs one gives its port back.
    c.kubectl_ok(&[
        "patch",
        "service",
        "local",
        "-p",
        "{\"spec\":{\"externalTrafficPolicy\":\"Cluster\"}}",
    ]);
    let svc = c.get_json(&["get", "service", "local"]);
    assert!(svc["spec"]["healthCheckNodePort"].is_null(), "{svc}");
    poll("the health check port closes", SETTLE, || {
        c.agent
            .http(on_b, "/", 1, None)
            .remove(0)
            .is_err()
            .then_some(())
    });
}

#[test]
fn external_traffic_policy_local_nftables() {
    external_local("nftables");
}

#[test]
fn external_traffic_policy_local_userspace() {
    external_local("userspace");
}
