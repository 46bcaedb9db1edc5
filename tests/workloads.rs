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

    // Relabelled out of the selector, it is released and replaced.
    c.kubectl_ok(&["label", "pod", "stray", "app=debug", "--overwrite"]);
    poll("stray released and replaced", SETTLE, || {
        let stray = c.get_json(&["get", "pod", "stray"]);
        let released = stray["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        (released && web_pods(&c).len() == 2).then_some(())
    });

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
    let mut c = Cluster::up("workloads-deploy", &[]);
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
    let pods: Vec<String> = web_pods(&c).into_iter().map(|(n, _)| n).collect();
    assert_eq!(pods.len(), 3);
    // `kubectl expose`: the Service round-robins over the three pods.
    c.kubectl_ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let addr = SocketAddr::new(c.cluster_ip("web"), 80);
    let want: Vec<&str> = pods.iter().map(String::as_str).collect();
    c.wait_serving(addr, &want);
    let served = common::cluster::counts(&c.names_ok(addr, 30, None));
    assert_eq!(
        served,
        pods.iter().map(|p| (p.clone(), 10)).collect(),
        "round robin over the deployment's pods"
    );

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

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: echo
        image: fairlead
        args: [echo, --http-port, \"8080\", --drain-timeout, 3s]
        env: [{name: VERSION, value: \"1\"}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
        lifecycle: {preStop: {sleep: {seconds: 2}}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";

/// Ready endpoints of Service web.
fn ready_endpoints(c: &Cluster) -> usize {
    c.slice_endpoints("web").values().filter(|r| **r).count()
}

/// Pods of app=web not being deleted, by the value of env VERSION.
fn versions(c: &Cluster) -> Vec<String> {
    let list = c.get_json(&["get", "pods", "-l", "app=web"]);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["env"][0]["value"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Acceptance 2 and 3: a deleted pod is replaced within 3 s while the
/// Service keeps ≥ 2 ready endpoints; scale 3 → 10 → 1; a rolling update
/// under continuous load loses no request (readiness probes, a preStop
/// sleep and graceful termination); `rollout undo` goes back, reusing the
/// old ReplicaSet.
#[test]
fn deployment_heals_scales_and_rolls_without_losing_requests() {
    let mut c = Cluster::up("workloads-load", &[]);
    c.apply(DEPLOYMENT);
    let rollout =
        |c: &Cluster| c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    let addr = SocketAddr::new(c.cluster_ip("web"), 80);
    let names: Vec<String> = web_pods(&c).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 3);
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    c.wait_serving(addr, &want);

    // Self-healing: the replacement is Ready (in the Service) within 3 s,
    // and the Service never drops below 2 ready endpoints meanwhile.
    let before: BTreeSet<String> = c.slice_endpoints("web").into_keys().collect();
    let deleted_at = std::time::Instant::now();
    c.kubectl_ok(&["delete", "pod", &names[0], "--wait=false"]);
    let mut fewest = usize::MAX;
    let healed = loop {
        let eps = c.slice_endpoints("web");
        let ready = eps.values().filter(|r| **r).count();
        fewest = fewest.min(ready);
        if eps.iter().any(|(ip, r)| *r && !before.contains(ip)) {
            break deleted_at.elapsed();
        }
        assert!(
            deleted_at.elapsed() < SETTLE,
            "no replacement became ready: {eps:?}"
        );
    };
    eprintln!("replacement ready in the Service after {healed:?}; fewest ready endpoints meanwhile: {fewest}");
    assert!(fewest >= 2, "the Service fell to {fewest} ready endpoints");
    assert!(
        healed <= std::time::Duration::from_secs(3),
        "replacement ready after {healed:?}"
    );

    // Scale 3 → 10 → 1.
    c.kubectl_ok(&["scale", "deployment", "web", "--replicas=10"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    poll("10 ready endpoints", SETTLE, || {
        (ready_endpoints(&c) == 10).then_some(())
    });
    c.kubectl_ok(&["scale", "deployment", "web", "--replicas=1"]);
    poll("1 pod left", SETTLE, || {
        (web_pods(&c).len() == 1 && ready_endpoints(&c) == 1).then_some(())
    });
    c.kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    poll("3 ready endpoints", SETTLE, || {
        (ready_endpoints(&c) == 3).then_some(())
    });

    // A rolling update under continuous load: not one request fails.
    let first_sets = rs_names(&c);
    c.agent
        .load_start("roll", addr, "/", std::time::Duration::from_secs(120));
    c.kubectl_ok(&["set", "env", "deployment/web", "VERSION=2"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    poll("only version 2 pods, the old ones gone", SETTLE, || {
        let v = versions(&c);
        let all = c.get_json(&["get", "pods", "-l", "app=web"])["items"]
            .as_array()
            .map_or(0, Vec::len);
        (v.len() == 3 && all == 3 && v.iter().all(|v| v == "2")).then_some(())
    });
    let (ok, failed, errors) = c.agent.load_stop("roll");
    eprintln!("rolling update under load: {ok} requests answered, {failed} failed {errors:?}");
    assert_eq!(failed, 0, "requests failed during the rollout: {errors:?}");
    assert!(ok > 100, "the load ran: {ok} requests");

    // Undo goes back to version 1 through the first ReplicaSet.
    c.kubectl_ok(&["rollout", "undo", "deployment/web"]);
    assert!(rollout(&c).contains("successfully rolled out"));
    poll("version 1 again", SETTLE, || {
        let v = versions(&c);
        (v.len() == 3 && v.iter().all(|v| v == "1")).then_some(())
    });
    let sets = rs_names(&c);
    assert_eq!(sets.len(), 2, "undo reuses the old set: {sets:?}");
    assert!(
        sets.contains(&(first_sets[0].0.clone(), 3)),
        "{first_sets:?} → {sets:?}"
    );
}

/// Acceptance 4, second half: `--cascade=orphan` leaves the ReplicaSet
/// and its pods (without owner references); `--cascade=foreground`
/// deletes the pods before the ReplicaSet.
#[test]
fn orphan_and_foreground_deletion() {
    let c = Cluster::up("workloads-orphan", &[]);
    c.apply(&DEPLOYMENT.replace("replicas: 3", "replicas: 2"));
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let pods_before: BTreeSet<String> = web_pods(&c).into_iter().map(|(n, _)| n).collect();
    c.kubectl_ok(&["delete", "deployment", "web", "--cascade=orphan"]);
    poll("the deployment gone", SETTLE, || {
        (!c.kubectl(&["get", "deployment", "web"]).status.success()).then_some(())
    });
    let sets = c.get_json(&["get", "rs", "-l", "app=web"]);
    let sets = sets["items"].as_array().unwrap();
    assert_eq!(sets.len(), 1, "the ReplicaSet stays");
    assert!(
        sets[0]["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "orphaned: {}",
        sets[0]["metadata"]
    );
    let rs = sets[0]["metadata"]["name"].as_str().unwrap().to_string();
    // The pods stay, still owned by the ReplicaSet, for a while after.
    std::thread::sleep(3 * common::cluster::GC_PERIOD);
    let pods_after: BTreeSet<String> = web_pods(&c).into_iter().map(|(n, _)| n).collect();
    assert_eq!(pods_before, pods_after);

    c.kubectl_ok(&["delete", "rs", &rs, "--cascade=foreground", "--wait=false"]);
    // The ReplicaSet waits, marked, while its pods go.
    let marked = c.get_json(&["get", "rs", &rs]);
    assert!(!marked["metadata"]["deletionTimestamp"].is_null());
    assert!(
        marked["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "foregroundDeletion")),
        "{}",
        marked["metadata"]
    );
    poll("pods and the ReplicaSet gone", SETTLE, || {
        // The ReplicaSet first: if it is gone, the pods were already.
        let rs_gone = !c.kubectl(&["get", "rs", &rs]).status.success();
        let pods = c.get_json(&["get", "pods", "-l", "app=web"]);
        let none = pods["items"].as_array().is_some_and(|a| a.is_empty());
        // Never the ReplicaSet before its pods.
        assert!(!rs_gone || none, "the ReplicaSet went before its pods");
        (rs_gone && none).then_some(())
    });

    // A collection DELETE takes DeleteOptions too: grace 0 removes a pod
    // bound to a node no agent runs at once, instead of leaving it
    // terminating.
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost, labels: {app: ghost}}\nspec:\n  \
         nodeName: nowhere\n  containers:\n  - {name: c, image: fairlead, args: [echo]}\n",
    );
    c.kubectl_ok(&[
        "delete",
        "--raw",
        "/api/v1/namespaces/default/pods?labelSelector=app%3Dghost&gracePeriodSeconds=0",
    ]);
    assert!(
        !c.kubectl(&["get", "pod", "ghost"]).status.success(),
        "deleted at once"
    );
}

/// A rollout that cannot progress fails `kubectl rollout status` once
/// progressDeadlineSeconds pass; a paused Deployment does not roll out a
/// new template until resumed.
#[test]
fn progress_deadline_and_pause() {
    let c = Cluster::up("workloads-deadline", &[]);
    c.apply(
        &DEPLOYMENT
            .replace("replicas: 3", "replicas: 1\n  progressDeadlineSeconds: 2")
            .replace("name: web}", "name: stuck}")
            .replace("app: web", "app: stuck")
            .replace("port: 8080}, periodSeconds", "port: 9999}, periodSeconds"),
    );
    let out = c.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("deployment \"stuck\" exceeded its progress deadline"),
        "{err}"
    );
    let cond = c.get_json(&["get", "deployment", "stuck"])["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .cloned()
        .unwrap();
    assert_eq!(cond["reason"], "ProgressDeadlineExceeded", "{cond}");

    c.apply(&DEPLOYMENT.replace("replicas: 3", "replicas: 1"));
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    c.kubectl_ok(&["rollout", "pause", "deployment/web"]);
    c.kubectl_ok(&["set", "env", "deployment/web", "VERSION=2"]);
    // Paused: the new template waits (and says so).
    poll("Progressing DeploymentPaused", SETTLE, || {
        let d = c.get_json(&["get", "deployment", "web"]);
        d["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["reason"] == "DeploymentPaused")
            .then_some(())
    });
    assert_eq!(rs_names(&c).len(), 1, "no new ReplicaSet while paused");
    assert_eq!(versions(&c), ["1"]);
    c.kubectl_ok(&["rollout", "resume", "deployment/web"]);
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    poll("version 2 after resume", SETTLE, || {
        (versions(&c) == ["2"]).then_some(())
    });
}

/// Pods of app=web (not being deleted) per node name.
fn pods_per_node(c: &Cluster) -> std::collections::BTreeMap<String, usize> {
    let list = c.get_json(&["get", "pods", "-l", "app=web"]);
    let mut out = std::collections::BTreeMap::new();
    for p in list["items"].as_array().into_iter().flatten() {
        if p["metadata"]["deletionTimestamp"].is_null() {
            let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            *out.entry(node).or_default() += 1;
        }
    }
    out
}

fn ready_replicas(c: &Cluster) -> i64 {
    c.get_json(&["get", "deployment", "web"])["status"]["readyReplicas"]
        .as_i64()
        .unwrap_or(0)
}

fn node_ready(c: &Cluster, node: &str) -> String {
    c.get_json(&["get", "node", node])["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn events_of(c: &Cluster, pod: &str) -> Vec<(String, String)> {
    let list = c.get_json(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={pod}"),
    ]);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Acceptance 5 and 6 with two node agents, each in a namespace of its
/// own: replicas spread; nodeSelector, taints and resource requests are
/// honoured and an unschedulable pod's FailedScheduling event says why;
/// `kubectl drain` evicts through the PodDisruptionBudget (blocked while
/// it would break it); a stopped agent's node goes NotReady within the
/// grace period, its endpoints turn not ready at once, and its pods come
/// back on the other node after their toleration.
#[test]
fn two_nodes_schedule_drain_and_survive_a_lost_node() {
    let c = Cluster::up_linked(
        "workloads-nodes",
        &[
            "--hostname-override",
            "node-a",
            "--node-monitor-grace-period",
            "4s",
            "--node-monitor-period",
            "500ms",
            "--node-status-update-frequency",
            "1s",
        ],
    );
    let mut b = c.join_node("node-b", 2, &["--node-status-update-frequency", "1s"]);

    // Spread: 4 replicas, 2 per node.
    let tolerant = DEPLOYMENT.replace(
        "      terminationGracePeriodSeconds: 10\n",
        "      terminationGracePeriodSeconds: 10\n      tolerations:\n      \
         - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}\n",
    );
    c.apply(&tolerant.replace("replicas: 3", "replicas: 4"));
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let spread = pods_per_node(&c);
    assert_eq!(
        spread,
        [("node-a".to_string(), 2), ("node-b".to_string(), 2)].into(),
        "replicas spread across the nodes"
    );

    // nodeSelector, requests, taints: each honoured, each explained.
    let pod = |name: &str, spec: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n{spec}  containers:\n  \
             - {{name: c, image: fairlead, args: [echo, --http-port, \"8080\"]}}\n"
        )
    };
    c.apply(&pod(
        "pinned",
        "  nodeSelector: {kubernetes.io/hostname: node-b}\n",
    ));
    poll("pinned on node-b", SETTLE, || {
        (c.get_json(&["get", "pod", "pinned"])["spec"]["nodeName"] == "node-b").then_some(())
    });
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: greedy}\nspec:\n  containers:\n  \
         - {name: c, image: fairlead, args: [echo], resources: {requests: {cpu: \"1000\"}}}\n",
    );
    let why = poll("greedy explained", SETTLE, || {
        events_of(&c, "greedy")
            .into_iter()
            .find(|(r, _)| r == "FailedScheduling")
            .map(|(_, m)| m)
    });
    assert_eq!(why, "0/2 nodes are available: 2 Insufficient cpu.");
    c.kubectl_ok(&["taint", "nodes", "node-b", "dedicated=db:NoSchedule"]);
    c.apply(&pod(
        "intolerant",
        "  nodeSelector: {kubernetes.io/hostname: node-b}\n",
    ));
    let why = poll("intolerant explained", SETTLE, || {
        events_of(&c, "intolerant")
            .into_iter()
            .find(|(r, _)| r == "FailedScheduling")
            .map(|(_, m)| m)
    });
    assert!(
        why.starts_with("0/2 nodes are available: ")
            && why.contains("1 node(s) had untolerated taint {dedicated: db}")
            && why.contains("1 node(s) didn't match Pod's node affinity/selector"),
        "{why}"
    );
    c.apply(&pod(
        "tolerant",
        "  nodeSelector: {kubernetes.io/hostname: node-b}\n  tolerations: [{key: dedicated, operator: Equal, value: db, effect: NoSchedule}]\n",
    ));
    poll("tolerant on node-b", SETTLE, || {
        (c.get_json(&["get", "pod", "tolerant"])["spec"]["nodeName"] == "node-b").then_some(())
    });
    assert!(events_of(&c, "tolerant")
        .iter()
        .any(|(r, m)| r == "Scheduled" && m.ends_with("to node-b")));
    c.kubectl_ok(&["taint", "nodes", "node-b", "dedicated-"]);
    for p in ["pinned", "greedy", "intolerant", "tolerant"] {
        c.kubectl_ok(&["delete", "pod", p, "--wait=false"]);
    }

    // Drain through a PodDisruptionBudget: refused while it would leave
    // fewer than minAvailable, then one pod at a time.
    c.apply(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: web}\nspec:\n  \
         minAvailable: 4\n  selector: {matchLabels: {app: web}}\n",
    );
    poll("budget computed", SETTLE, || {
        let p = c.get_json(&["get", "pdb", "web"]);
        (p["status"]["currentHealthy"] == 4 && p["status"]["disruptionsAllowed"] == 0).then_some(())
    });
    let out = c.kubectl(&["drain", "node-b", "--ignore-daemonsets", "--timeout=4s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "drain broke the budget");
    assert!(
        err.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "{err}"
    );
    assert_eq!(pods_per_node(&c)["node-b"], 2, "nothing evicted");
    c.kubectl_ok(&[
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":3}}"#,
    ]);
    let out = c.kubectl(&["drain", "node-b", "--ignore-daemonsets", "--timeout=90s"]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("node/node-b drained"), "{so}");
    assert_eq!(
        pods_per_node(&c),
        [("node-a".to_string(), 4)].into(),
        "every replica moved to node-a"
    );
    assert_eq!(
        c.get_json(&["get", "node", "node-b"])["spec"]["unschedulable"],
        true
    );
    // The budget held: the second eviction had to wait for a replacement.
    assert!(
        se.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "the second eviction waited for the budget: {se}"
    );
    c.kubectl_ok(&["uncordon", "node-b"]);
    c.kubectl_ok(&["delete", "pdb", "web"]);

    // Scale up: the new replicas go to the emptier node-b.
    c.kubectl_ok(&["scale", "deployment", "web", "--replicas=6"]);
    c.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert_eq!(pods_per_node(&c)["node-b"], 2, "{:?}", pods_per_node(&c));
    let on_b: Vec<String> = c.get_json(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "--field-selector",
        "spec.nodeName=node-b",
    ])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect();
    assert_eq!(on_b.len(), 2);

    // A pod that tolerates the outage for ever stays on node-b.
    c.apply(&pod(
        "survivor",
        "  nodeSelector: {kubernetes.io/hostname: node-b}\n  \
         tolerations: [{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute}]\n",
    ));
    let pod_ready = |c: &Cluster, name: &str| {
        c.get_json(&["get", "pod", name])["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    poll("survivor Ready", SETTLE, || {
        pod_ready(&c, "survivor").then_some(())
    });

    // node-b's agent stops: NotReady within the grace period, its
    // endpoints not ready at once, its pods back on node-a after 2 s.
    let stopped = std::time::Instant::now();
    b.stop();
    poll("node-b Unknown", SETTLE, || {
        (node_ready(&c, "node-b") == "Unknown").then_some(())
    });
    let not_ready_after = stopped.elapsed();
    let taints = c.get_json(&["get", "node", "node-b"])["spec"]["taints"].clone();
    assert!(
        taints.as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")),
        "{taints}"
    );
    poll("node-b's endpoints not ready", SETTLE, || {
        let eps = c.slice_endpoints("web");
        on_b.iter()
            .all(|ip| eps.get(ip) != Some(&true))
            .then_some(())
    });
    let endpoints_after = stopped.elapsed();
    poll("6 ready replicas on node-a", SETTLE, || {
        (ready_replicas(&c) == 6 && pods_per_node(&c).get("node-a") == Some(&6)).then_some(())
    });
    let healed_after = stopped.elapsed();
    eprintln!(
        "node-b stopped: NotReady after {not_ready_after:?}, endpoints not ready after {endpoints_after:?}, replicas back after {healed_after:?}"
    );
    assert!(
        not_ready_after < std::time::Duration::from_secs(4 + 3),
        "NotReady within the 4 s grace period (+ a monitor period): {not_ready_after:?}"
    );
    assert!(
        endpoints_after - not_ready_after < std::time::Duration::from_secs(2),
        "endpoints left at once: {not_ready_after:?} → {endpoints_after:?}"
    );
    assert!(!pod_ready(&c, "survivor"), "marked not ready with its node");
    assert_eq!(
        c.get_json(&["get", "pod", "survivor"])["metadata"]["deletionTimestamp"],
        Value::Null,
        "tolerated for ever: not evicted"
    );

    // node-b comes back: Ready, untainted, and its agent posts the
    // survivor's own status over the controller's.
    b.start();
    poll("node-b Ready and untainted", SETTLE, || {
        let n = c.get_json(&["get", "node", "node-b"]);
        let tainted = n["spec"]["taints"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable")
        });
        (node_ready(&c, "node-b") == "True" && !tainted).then_some(())
    });
    poll("survivor Ready again", SETTLE, || {
        pod_ready(&c, "survivor").then_some(())
    });
}
