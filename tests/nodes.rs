//! Nodes as the kubelet and kube-controller-manager keep them: the node
//! agent registers its `Node` (addresses, capacity, system info, Ready),
//! renews its Lease in `kube-node-lease`, and the node-IPAM controller
//! gives every Node its own pod CIDR out of `--cluster-cidr`. Real
//! `fairlead up` and the real `kubectl`, in a network namespace the test
//! creates.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, SETTLE};
use common::server::poll;
use serde_json::Value;

#[test]
fn agent() {
    common::netns::agent_main();
}

fn node_json(c: &Cluster, name: &str) -> Option<Value> {
    let out = c.kubectl(&["get", "node", name, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"))
}

fn condition<'a>(node: &'a Value, ty: &str) -> Option<&'a Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

fn renew_time(c: &Cluster, name: &str) -> Option<String> {
    let out = c.kubectl(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        name,
        "-o",
        "jsonpath={.spec.renewTime}",
    ]);
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !t.is_empty()).then_some(t)
}

#[test]
fn node_registers_heartbeats_and_gets_a_pod_cidr() {
    let c = Cluster::up(
        "nodes",
        &[
            "--hostname-override",
            "node-a",
            "--node-ip",
            "192.0.2.10",
            "--node-status-update-frequency",
            "1s",
        ],
    );

    // Registered, Ready, with what `kubectl get nodes` and `describe` show.
    let node = poll("node-a Ready with a pod CIDR", SETTLE, || {
        let n = node_json(&c, "node-a")?;
        let ready = condition(&n, "Ready")?["status"] == "True";
        (ready && n["spec"]["podCIDR"].is_string()).then_some(n)
    });
    assert_eq!(node["spec"]["podCIDR"], "10.244.0.0/24", "{node:#}");
    assert_eq!(node["spec"]["podCIDRs"][0], "10.244.0.0/24");
    assert_eq!(
        node["status"]["addresses"],
        serde_json::json!([
            {"type": "InternalIP", "address": "192.0.2.10"},
            {"type": "Hostname", "address": "node-a"},
        ])
    );
    assert_eq!(node["status"]["capacity"]["pods"], "110");
    assert!(node["status"]["allocatable"]["memory"]
        .as_str()
        .is_some_and(|m| m.ends_with("Ki")));
    assert_eq!(
        node["metadata"]["labels"]["kubernetes.io/hostname"],
        "node-a"
    );
    assert_eq!(condition(&node, "Ready").unwrap()["reason"], "KubeletReady");
    let version = node["status"]["nodeInfo"]["kubeletVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(version.starts_with("v1."), "{version}");
    let table = c.kubectl_ok(&["get", "nodes"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("node-a"))
        .unwrap_or_else(|| panic!("no node-a row in\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "Ready", "{table}");
    assert_eq!(cols.last().copied(), Some(version.as_str()), "{table}");

    // The Lease is renewed every second (as asked), owned by the Node.
    let first = poll("node-a's lease", SETTLE, || renew_time(&c, "node-a"));
    poll("node-a's lease renewed", Duration::from_secs(10), || {
        renew_time(&c, "node-a").filter(|t| *t != first)
    });
    let lease: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        "node-a",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-a");
    assert_eq!(lease["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(
        lease["metadata"]["ownerReferences"][0]["uid"],
        node["metadata"]["uid"]
    );

    // More Nodes (created by hand: no second agent here) get the next
    // free blocks; a deleted Node's block goes to the next Node.
    let node_yaml = |name: &str| format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n");
    c.apply(&node_yaml("node-b"));
    c.apply(&node_yaml("node-c"));
    let cidr = |name: &str| {
        poll(&format!("{name}'s pod CIDR"), SETTLE, || {
            node_json(&c, name)?["spec"]["podCIDR"]
                .as_str()
                .map(String::from)
        })
    };
    let (b, cc) = (cidr("node-b"), cidr("node-c"));
    let mut got = [b.clone(), cc.clone()];
    got.sort();
    assert_eq!(got, ["10.244.1.0/24", "10.244.2.0/24"]);
    c.kubectl_ok(&["delete", "node", "node-b"]);
    c.apply(&node_yaml("node-d"));
    assert_eq!(cidr("node-d"), b, "node-b's block is free again");

    // A range, once set, is fixed: a write from a stale view (here, by
    // hand) is refused as kube-apiserver refuses it, and nothing moves.
    let out = c.kubectl(&[
        "patch",
        "node",
        "node-c",
        "-p",
        r#"{"spec":{"podCIDR":"10.244.9.0/24","podCIDRs":["10.244.9.0/24"]}}"#,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a podCIDR change was accepted");
    assert!(
        err.contains("spec.podCIDR: Forbidden: node updates may not change podCIDR"),
        "{err}"
    );
    assert_eq!(cidr("node-c"), cc);

    // Many Nodes joining at once get distinct blocks.
    let many: Vec<String> = (0..8).map(|i| node_yaml(&format!("join-{i}"))).collect();
    c.apply(&many.join("---\n"));
    let mut blocks: Vec<String> = (0..8).map(|i| cidr(&format!("join-{i}"))).collect();
    blocks.extend([cidr("node-a"), cc, cidr("node-d")]);
    let distinct: std::collections::BTreeSet<&String> = blocks.iter().collect();
    assert_eq!(
        distinct.len(),
        blocks.len(),
        "a block given twice: {blocks:?}"
    );
}

/// A Pod no node is named for (it runs `sleep` once bound).
fn unbound_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  \
         - {{name: c, image: fairlead, command: [sleep, \"600\"]}}\n"
    )
}

/// Without a scheduler, `fairlead up` binds Pods to its node through
/// `pods/binding`, which a scheduler would use; a bound Pod cannot be
/// bound again, and a Binding without a target is invalid.
#[test]
fn up_binds_pods_to_its_node() {
    let c = Cluster::up("binding", &["--hostname-override", "node-a"]);
    c.apply(&unbound_pod("p1"));
    let pod = poll("p1 bound to node-a", SETTLE, || {
        let out = c.kubectl(&["get", "pod", "p1", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["spec"]["nodeName"] == "node-a").then_some(v)
    });
    let scheduled = condition(&pod, "PodScheduled").expect("a PodScheduled condition");
    assert_eq!(scheduled["status"], "True", "{pod:#}");
    let wide = c.kubectl_ok(&["get", "pod", "p1", "-o", "wide"]);
    assert!(wide.contains("node-a"), "{wide}");

    // Another scheduler's Pod is left alone.
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: other}\nspec:\n  schedulerName: mine\n  \
         containers:\n  - {name: c, image: fairlead}\n",
    );
    // The scheduler takes Pods oldest first: once p2 (created after) is bound, it
    // has passed `other` by.
    c.apply(&unbound_pod("p2"));
    poll("p2 bound", SETTLE, || {
        let n = c.kubectl_ok(&["get", "pod", "p2", "-o", "jsonpath={.spec.nodeName}"]);
        (n.trim() == "node-a").then_some(())
    });
    let n = c.kubectl_ok(&["get", "pod", "other", "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(n.trim(), "", "another scheduler's Pod stays unbound");

    let binding = |pod: &str, node: &str| {
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Binding","metadata":{{"name":"{pod}"}},"target":{{"kind":"Node","name":"{node}"}}}}"#
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("binding.json");
        std::fs::write(&f, body).unwrap();
        c.kubectl(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/default/pods/{pod}/binding"),
            "-f",
            &f.display().to_string(),
        ])
    };
    let again = binding("p1", "node-b");
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already assigned to node"), "{err}");
    let invalid = binding("other", "");
    assert!(!invalid.status.success());
    let err = String::from_utf8_lossy(&invalid.stderr);
    assert!(err.contains("target.name"), "{err}");
    let ok = binding("other", "node-a");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let node = c.kubectl_ok(&["get", "pod", "other", "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(node.trim(), "node-a");

    // Nonsense in a Pod is a 422 naming the field; nothing is created.
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers:\n  \
               - name: c\n    image: fairlead\n    readinessProbe:\n      \
               tcpSocket: {port: 80}\n      periodSeconds: -1\n";
    let out = common::server::run_with_stdin(c.kubectl_cmd(&["apply", "-f", "-"]), bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is invalid")
            && err.contains("spec.containers[0].readinessProbe.periodSeconds"),
        "{err}"
    );
    assert!(!c.kubectl(&["get", "pod", "bad"]).status.success());
}

/// A Node object no agent runs, made Ready (with `allocatable`) through
/// its status, as its kubelet would.
fn fake_node(c: &Cluster, name: &str, spec: &str, labels: &str) {
    c.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{{spec}}}\n"
    ));
    let status = r#"{"status":{"allocatable":{"cpu":"4","memory":"8Gi","pods":"110"},"capacity":{"cpu":"4","memory":"8Gi","pods":"110"},"conditions":[{"type":"Ready","status":"True","reason":"KubeletReady"}]}}"#;
    c.kubectl_ok(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ]);
}

fn node_of(c: &Cluster, pod: &str) -> String {
    c.kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"])
        .trim()
        .to_string()
}

/// The scheduler of `fairlead up` filters nodes as kube-scheduler does
/// (taints and tolerations, nodeSelector, cordon, resources) and explains
/// a Pod that fits nowhere in its PodScheduled condition.
#[test]
fn scheduler_filters_nodes_and_explains_unschedulable_pods() {
    let c = Cluster::up("scheduler", &["--hostname-override", "node-a"]);
    fake_node(
        &c,
        "node-b",
        "taints: [{key: dedicated, value: db, effect: NoSchedule}]",
        "disk: ssd",
    );
    fake_node(&c, "node-c", "unschedulable: true", "disk: ssd");
    poll("node-a registered", SETTLE, || {
        node_json(&c, "node-a")
            .filter(|n| condition(n, "Ready").is_some_and(|r| r["status"] == "True"))
    });
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db}\nspec:\n  nodeSelector: {disk: ssd}\n  \
         tolerations: [{key: dedicated, operator: Equal, value: db, effect: NoSchedule}]\n  \
         containers:\n  - {name: c, image: fairlead, command: [sleep, \"600\"]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: plain}\nspec:\n  containers:\n  \
         - {name: c, image: fairlead, command: [sleep, \"600\"]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: huge}\nspec:\n  containers:\n  \
         - {name: c, image: fairlead, command: [sleep, \"600\"], resources: {requests: {cpu: \"1000\"}}}\n",
    );
    poll("db and plain bound", SETTLE, || {
        (!node_of(&c, "db").is_empty() && !node_of(&c, "plain").is_empty()).then_some(())
    });
    assert_eq!(
        node_of(&c, "db"),
        "node-b",
        "the only ssd node it tolerates"
    );
    assert_eq!(
        node_of(&c, "plain"),
        "node-a",
        "node-b is tainted, node-c cordoned"
    );
    let huge = poll("huge reported unschedulable", SETTLE, || {
        let out = c.kubectl(&["get", "pod", "huge", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        condition(&v, "PodScheduled")
            .filter(|s| s["reason"] == "Unschedulable")
            .cloned()
    });
    assert_eq!(huge["status"], "False");
    assert_eq!(
        huge["message"],
        "0/3 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint \
         {dedicated: db}, 1 node(s) were unschedulable.",
        "{huge:#}"
    );
    assert_eq!(node_of(&c, "huge"), "");
    let events = poll("a FailedScheduling event", SETTLE, || {
        let e = c.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "reason=FailedScheduling,involvedObject.name=huge",
        ]);
        e.contains("Insufficient cpu").then_some(e)
    });
    assert!(events.contains("Warning"), "{events}");
    let table = c.kubectl_ok(&["get", "pod", "huge"]);
    assert!(table.contains("Pending"), "{table}");
}

/// nftables mode on a node with no route that covers the Service range
/// (no default route): the daemon says so once at start, with the fix; on
/// a node with such a route it stays quiet.
#[test]
fn nftables_mode_warns_without_a_service_route() {
    const WARNING: &str = "no route covers the Service range";
    let c = Cluster::up(
        "noroute",
        &["--proxy-mode", "nftables", "--run-pods", "false"],
    );
    let log = c.log_path("up");
    poll("the missing-route warning", SETTLE, || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains(WARNING).then_some(())
    });
    drop(c);

    let c = Cluster::empty("route");
    c.ns.run_ok("ip", &["addr", "add", "10.0.0.1/32", "dev", "lo"]);
    c.ns.run_ok(
        "ip",
        &[
            "route",
            "add",
            "10.96.0.0/12",
            "dev",
            "lo",
            "src",
            "10.0.0.1",
        ],
    );
    let mut c = c;
    c.start_up(&["--proxy-mode", "nftables", "--run-pods", "false"]);
    // The check runs right after the first sync, which healthz waits for;
    // a served ClusterIP-less cluster still has the kubernetes Service.
    poll("the first sync", SETTLE, || {
        let text = std::fs::read_to_string(c.log_path("up")).ok()?;
        text.contains("synced").then_some(())
    });
    let text = std::fs::read_to_string(c.log_path("up")).unwrap();
    assert!(!text.contains(WARNING), "{text}");
}

/// `--advertise-address` is what the cluster is told: the `kubernetes`
/// endpoints and the API server's Lease carry it, while the local
/// kubeconfig keeps using the address the server listens on.
#[test]
fn advertise_address_is_published() {
    let c = Cluster::up("advertise", &["--advertise-address", "10.9.9.9"]);
    let ips = c.kubectl_ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ]);
    assert_eq!(ips.trim(), "10.9.9.9");
    let holder = c.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "lease",
        "apiserver-10-9-9-9",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder.trim(), "10.9.9.9:6443");
}
