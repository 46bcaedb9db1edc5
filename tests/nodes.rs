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
}
