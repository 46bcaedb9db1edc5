//! Acceptance tests of running fairlead as a DaemonSet on a cluster
//! (`config/deploy/`, issue 16), without a kubelet: `fairlead node` runs
//! in a network namespace and a mount namespace of its own, with what a
//! pod of the shipped DaemonSet gets:
//!
//! - a ServiceAccount token from the TokenRequest API (`kubectl create
//!   token`), the cluster CA and the namespace, mounted at
//!   `/var/run/secrets/kubernetes.io/serviceaccount` (a tmpfs on `/run` of
//!   its private mount namespace; the host's `/run` is untouched);
//! - `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`;
//! - the shipped ConfigMap's KubeProxyConfiguration as `--config`.
//!
//! It must authenticate as the ServiceAccount (no kubeconfig given),
//! program Services, and name the config fields it ignores. A write the
//! ServiceAccount may not make is refused with 403 naming it, and deleting
//! the ServiceAccount revokes the token (401).

mod common;

use std::net::SocketAddr;

use common::cluster::{Cluster, API_PORT, FAIRLEAD, SETTLE};
use common::server::poll;
use serde_json::Value;

#[test]
fn agent() {
    common::netns::agent_main();
}

/// The shipped manifests, one YAML document each.
fn shipped() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/deploy/fairlead.yaml"
    ))
    .unwrap();
    text.split("\n---\n")
        .map(|d| serde_yaml::from_str::<Value>(d).expect("a YAML document"))
        .collect()
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in config/deploy"))
}

/// The claims of a JWT (its middle part), unverified.
fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[test]
fn manifests_have_what_a_kube_proxy_replacement_needs() {
    let docs = shipped();
    let ds = doc(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let caps = &pod["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(
        caps["add"],
        serde_json::json!(["NET_ADMIN", "NET_BIND_SERVICE"])
    );
    assert_eq!(pod["serviceAccountName"], "fairlead");
    let role = doc(&docs, "ClusterRole");
    // system:node-proxier's rules are all there, and nothing writes but events.
    let rules = role["rules"].as_array().unwrap();
    for (group, resource, verb) in [
        ("", "services", "watch"),
        ("", "endpoints", "list"),
        ("", "nodes", "get"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(
            rules.iter().any(|r| {
                let has = |f: &str, v: &str| r[f].as_array().unwrap().iter().any(|x| x == v);
                has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
            }),
            "{group}/{resource} {verb} missing"
        );
    }
    for r in rules {
        for v in r["verbs"].as_array().unwrap() {
            let v = v.as_str().unwrap();
            if !["get", "list", "watch"].contains(&v) {
                assert!(
                    r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|x| x == "events"),
                    "writes beyond events: {r}"
                );
            }
        }
    }
    let binding = doc(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "fairlead");
}

#[test]
fn daemonset_style_node_uses_its_service_account() {
    let mut c = Cluster::empty("deploy");
    c.start_apiserver();
    c.start_controllers("controllers", &[]);
    let docs = shipped();

    // What the cluster side of the manifests creates: the ServiceAccount,
    // its ClusterRole and binding (RBAC: nothing else gives it rights),
    // and the KubeProxyConfiguration.
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        c.apply(&serde_yaml::to_string(doc(&docs, kind)).unwrap());
    }
    // The controllers give every namespace a default ServiceAccount.
    poll("default ServiceAccount in default", SETTLE, || {
        c.kubectl(&["get", "serviceaccount", "default"])
            .status
            .success()
            .then_some(())
    });

    // The pod's service-account volume.
    let token = c.kubectl_ok(&[
        "-n",
        "kube-system",
        "create",
        "token",
        "fairlead",
        "--duration",
        "2h",
    ]);
    let token = token.trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], "system:serviceaccount:kube-system:fairlead");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        7200,
        "--duration 2h: {claims}"
    );
    // A token bound to a pod names it, and the pod must exist.
    let missing = c.kubectl(&[
        "create",
        "token",
        "default",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "nope",
    ]);
    assert!(
        !missing.status.success(),
        "a token bound to a missing pod: {missing:?}"
    );
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not found"),
        "{missing:?}"
    );
    let secrets = c.data_dir().join("sa-volume");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("token"), &token).unwrap();
    std::fs::copy(c.data_dir().join("pki/ca.crt"), secrets.join("ca.crt")).unwrap();
    std::fs::write(secrets.join("namespace"), "kube-system").unwrap();
    let conf = c.data_dir().join("config.conf");
    let cm = doc(&docs, "ConfigMap");
    std::fs::write(&conf, cm["data"]["config.conf"].as_str().unwrap()).unwrap();

    // `fairlead node` in its own mount namespace, no kubeconfig anywhere.
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; \
         mkdir -p /run/secrets/kubernetes.io/serviceaccount; \
         cp {src}/token {src}/ca.crt {src}/namespace /run/secrets/kubernetes.io/serviceaccount/; \
         exec {FAIRLEAD} node --config {conf} --proxy-mode userspace --disable-dns \
           --run-pods=false --register-node=false --hostname-override ds-node \
           --data-dir {data}/ds",
        src = secrets.display(),
        conf = conf.display(),
        data = c.data_dir().display(),
    );
    let mut cmd = c.ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("KUBECONFIG")
        .env("HOME", c.data_dir())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", API_PORT)
        .env("RUST_LOG", "info,fairlead=debug");
    let log = c.log_path("ds");
    let mut node = c.ns.spawn(cmd, &log);
    let node_log = || std::fs::read_to_string(&log).unwrap_or_default();
    poll("the DaemonSet-style node healthy", SETTLE, || {
        assert!(node.alive(), "node exited:\n{}", node_log());
        matches!(
            c.agent
                .http("127.0.0.1:10256".parse().unwrap(), "/healthz", 1, None)[0],
            Ok((200, _))
        )
        .then_some(())
    });
    // The host's /run was not touched.
    let host_token = std::fs::read_to_string("/run/secrets/kubernetes.io/serviceaccount/token");
    assert!(
        host_token.map_or(true, |t| t != token),
        "the token leaked onto the host"
    );
    // It read the KubeProxyConfiguration as it is and named what it ignores.
    let text = node_log();
    assert!(
        text.contains("KubeProxyConfiguration field not used by fairlead")
            && text.contains("conntrack"),
        "no warning about ignored fields:\n{text}"
    );

    // It programs Services: a selectorless Service with a hand-made slice.
    c.echo("b1", "127.0.0.11");
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  labels: {kubernetes.io/service-name: ext}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["127.0.0.11"], conditions: {ready: true}}]
"#,
    );
    let ip = c.cluster_ip("ext");
    c.wait_serving(SocketAddr::new(ip, 80), &["b1"]);

    // As the ServiceAccount: what its role grants (list) is allowed, a
    // delete is 403 naming it.
    let as_sa = |args: &[&str]| -> std::process::Output {
        let ca = secrets.join("ca.crt");
        let mut cmd = c.ns.command("kubectl");
        cmd.arg(format!("--server=https://127.0.0.1:{API_PORT}"))
            .arg(format!("--certificate-authority={}", ca.display()))
            .arg(format!("--token={token}"))
            .arg("--kubeconfig=/dev/null")
            .args(args);
        cmd.output().expect("kubectl")
    };
    let get = as_sa(&["get", "svc", "-o", "name"]);
    assert!(
        get.status.success() && String::from_utf8_lossy(&get.stdout).contains("service/ext"),
        "{get:?}"
    );
    let del = as_sa(&["delete", "svc", "ext"]);
    let err = String::from_utf8_lossy(&del.stderr);
    assert!(
        !del.status.success(),
        "the ServiceAccount deleted a Service"
    );
    assert!(
        err.contains("Forbidden")
            && err.contains("User \"system:serviceaccount:kube-system:fairlead\" cannot delete resource \"services\""),
        "{err}"
    );
    c.kubectl_ok(&["get", "svc", "ext"]);

    // Deleting the ServiceAccount revokes its tokens.
    c.kubectl_ok(&["-n", "kube-system", "delete", "serviceaccount", "fairlead"]);
    let after = as_sa(&["get", "svc", "ext"]);
    let err = String::from_utf8_lossy(&after.stderr);
    assert!(
        !after.status.success() && (err.contains("Unauthorized") || err.contains("401")),
        "token still accepted after its ServiceAccount was deleted: {after:?}"
    );
    drop(node);
}
