//! Beyond one machine: hosts join with a token (discovery checked by the
//! CA hash, a node certificate through a CertificateSigningRequest, the
//! node's own least-privilege identity), and pods on different nodes reach
//! each other through Services in both proxy modes over host-gw routes.
//! Every host is a network namespace the test creates.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use common::cluster::{counts, Cluster, Node, FAIRLEAD, SETTLE};
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

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: echo
        image: fairlead
        args: [echo, --http-port, \"8080\"]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";

/// Two nodes, pods on both: each node reaches every pod through the
/// ClusterIP and through either node's NodePort, in exact round robin,
/// and a pod on the other node directly (host-gw routes).
fn pods_across_nodes(mode: &str) {
    let mut c = Cluster::up_linked(
        &format!("xnode-{mode}"),
        &["--hostname-override", "node-a", "--proxy-mode", mode],
    );
    let b = c.join_node("node-b", 2, &["--proxy-mode", mode]);
    c.apply(WEB);
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
