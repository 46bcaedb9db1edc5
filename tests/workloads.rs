//! Workloads: ReplicaSets keep their pods, scale, adopt orphans, and go
//! with their pods (garbage collection), with `fairlead up` running the
//! pods for real in a network namespace the test creates.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::cluster::{Cluster, SETTLE};
use common::server::poll;
use serde_json::Value;

#[test]
fn agent() {
    common::netns::agent_main();
}

const RS: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 3
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
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";

/// The pods with label app=web that are not being deleted: name → owner
/// uid (empty for none).
fn web_pods(c: &Cluster) -> Vec<(String, String)> {
    let list = c.get_json(&["get", "pods", "-l", "app=web"]);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                p["metadata"]["ownerReferences"][0]["uid"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

fn rs_status(c: &Cluster) -> (i64, i64) {
    let rs = c.get_json(&["get", "rs", "web"]);
    (
        rs["status"]["replicas"].as_i64().unwrap_or(0),
        rs["status"]["readyReplicas"].as_i64().unwrap_or(0),
    )
}

#[test]
fn replicaset_keeps_scales_adopts_and_is_collected() {
    let mut c = Cluster::up("workloads-rs", &[]);
    c.apply(RS);
    poll("3 replicas ready", SETTLE, || {
        (rs_status(&c) == (3, 3)).then_some(())
    });
    let rs_uid = c.get_json(&["get", "rs", "web"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pods = web_pods(&c);
    assert_eq!(pods.len(), 3, "{pods:?}");
    assert!(
        pods.iter()
            .all(|(n, o)| n.starts_with("web-") && *o == rs_uid),
        "{pods:?}"
    );
    let table = c.kubectl_ok(&["get", "rs", "web"]);
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
    );
    assert_eq!(
        lines
            .next()
            .unwrap()
            .split_whitespace()
            .take(4)
            .collect::<Vec<_>>(),
        ["web", "3", "3", "3"]
    );

    // Traffic reaches all three (the echo names itself by pod name).
    let addr = SocketAddr::new(c.cluster_ip("web"), 80);
    let names: Vec<String> = pods.iter().map(|(n, _)| n.clone()).collect();
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    c.wait_serving(addr, &want);

    // A deleted pod is replaced.
    c.kubectl_ok(&["delete", "pod", &names[0], "--wait=false"]);
    let replaced = poll("a replacement pod", SETTLE, || {
        let now: BTreeSet<String> = web_pods(&c).into_iter().map(|(n, _)| n).collect();
        (now.len() == 3 && !now.contains(&names[0])).then_some(now)
    });
    assert_eq!(replaced.len(), 3);
    poll("3 ready again", SETTLE, || {
        (rs_status(&c) == (3, 3)).then_some(())
    });

    // Scale down through the scale subresource.
    c.kubectl_ok(&["scale", "rs", "web", "--replicas=1"]);
    poll("1 replica", SETTLE, || {
        (web_pods(&c).len() == 1 && rs_status(&c).0 == 1).then_some(())
    });
    let scale: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/default/replicasets/web/scale",
    ]))
    .unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 1);
    assert_eq!(scale["status"]["selector"], "app=web");

    // An orphan with matching labels is adopted instead of a new pod.
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: stray, labels: {app: web}}\nspec:\n  containers:\n  \
         - {name: echo, image: fairlead, args: [echo, --http-port, \"8080\"]}\n",
    );
    c.kubectl_ok(&["scale", "rs", "web", "--replicas=2"]);
    let adopted = poll("stray adopted", SETTLE, || {
        let pods = web_pods(&c);
        (pods.len() == 2 && pods.iter().all(|(_, o)| *o == rs_uid)).then_some(pods)
    });
    assert!(adopted.iter().any(|(n, _)| n == "stray"), "{adopted:?}");

    // Deleting the ReplicaSet deletes its pods.
    c.kubectl_ok(&["delete", "rs", "web", "--wait=false"]);
    poll("pods collected", SETTLE, || {
        let out = c.kubectl(&["get", "pods", "-l", "app=web", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(())
    });
}

#[test]
fn invalid_replicasets_are_refused() {
    let c = Cluster::up("workloads-422", &[]);
    let bad = RS.replace(
        "selector: {matchLabels: {app: web}}",
        "selector: {matchLabels: {app: db}}",
    );
    let out = common::server::run_with_stdin(c.kubectl_cmd(&["apply", "-f", "-"]), &bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`selector` does not match template `labels`"),
        "{err}"
    );
    let neg = RS.replace("replicas: 3", "replicas: -1");
    let out = common::server::run_with_stdin(c.kubectl_cmd(&["apply", "-f", "-"]), &neg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.replicas: Invalid value: -1"), "{err}");
    let stuck = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: stuck}\nspec:\n  \
                 selector: {matchLabels: {app: s}}\n  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0}}\n  \
                 template:\n    metadata: {labels: {app: s}}\n    spec:\n      containers:\n      \
                 - {name: c, image: fairlead, args: [echo, --http-port, \"8080\"]}\n";
    let out = common::server::run_with_stdin(c.kubectl_cmd(&["apply", "-f", "-"]), stuck);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.strategy.rollingUpdate.maxUnavailable: Invalid value: 0: may not be 0 when `maxSurge` is 0"),
        "{err}"
    );
}

fn rs_names(c: &Cluster) -> Vec<(String, i64)> {
    let list = c.get_json(&["get", "rs", "-l", "app=web"]);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["metadata"]["name"].as_str().unwrap_or("").to_string(),
                r["spec"]["replicas"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// `kubectl create deployment`, `rollout status`, `set image` (a rolling
/// update to a new ReplicaSet, the old one scaled to 0), `rollout
/// history`, `scale`, `rollout restart`, and deletion taking the
/// ReplicaSets and pods with it.
#[test]
fn deployment_rolls_out_updates_scales_and_is_collected() {
    let c = Cluster::up("workloads-deploy", &[]);
    c.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "--image=fairlead",
        "--replicas=3",
        "--port=8080",
        "--",
        "fairlead",
        "echo",
        "--http-port",
        "8080",
    ]);
    let rollout =
        |c: &Cluster| c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    let table = c.kubectl_ok(&["get", "deployment", "web"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["web", "3/3", "3", "3"], "{table}");
    let first = rs_names(&c);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(web_pods(&c).len(), 3);

    c.kubectl_ok(&["set", "image", "deployment/web", "fairlead=fairlead:v2"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    let sets = rs_names(&c);
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert!(
        sets.contains(&(first[0].0.clone(), 0)),
        "the old set scaled to 0: {sets:?}"
    );
    let pods = c.get_json(&["get", "pods", "-l", "app=web"]);
    let images: BTreeSet<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["spec"]["containers"][0]["image"].as_str().unwrap())
        .collect();
    assert_eq!(images, BTreeSet::from(["fairlead:v2"]));
    let history = c.kubectl_ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("1 ") && history.contains("2 "),
        "{history}"
    );

    c.kubectl_ok(&["scale", "deployment", "web", "--replicas=1"]);
    poll("scaled to 1", SETTLE, || {
        (web_pods(&c).len() == 1).then_some(())
    });
    c.kubectl_ok(&["rollout", "restart", "deployment/web"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    assert_eq!(rs_names(&c).len(), 3, "a restart is a new template");

    c.kubectl_ok(&["delete", "deployment", "web"]);
    poll("replicasets and pods collected", SETTLE, || {
        (rs_names(&c).is_empty()
            && c.get_json(&["get", "pods", "-l", "app=web"])["items"]
                .as_array()
                .is_some_and(|a| a.is_empty()))
        .then_some(())
    });
}
