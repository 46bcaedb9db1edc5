//! Node registration and heartbeat, as the kubelet does them: on start the
//! node agent creates (or updates) its `Node` with addresses, capacity,
//! system info and a `Ready` condition; then it renews a Lease in
//! `kube-node-lease` every `--node-status-update-frequency` (10 s), and
//! reposts its status every [`STATUS_REPORT_EVERY`] heartbeats or when it
//! changed. The Lease is owned by the Node, so deleting the Node removes it.
//!
//! What is reported is computed by pure functions ([`node_labels`],
//! [`node_status`]) from facts gathered once ([`Facts`]); the loop at the
//! edge does the requests and retries every heartbeat after a failure.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

/// The Lease namespace of node heartbeats.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// The Lease's validity, as the kubelet's (`nodeLeaseDurationSeconds`).
pub const LEASE_DURATION_SECS: i32 = 40;

/// The Node's status is reposted at least every this many heartbeats
/// (the kubelet's nodeStatusReportFrequency is 5 minutes: 30 × 10 s).
pub const STATUS_REPORT_EVERY: u32 = 30;

/// The most pods a node runs (the kubelet's default `maxPods`).
pub const MAX_PODS: u32 = 110;

/// What a node reports about itself, gathered once at start.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    pub name: String,
    pub internal_ip: IpAddr,
    pub cpus: usize,
    pub memory_kib: u64,
    pub machine_id: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
    pub arch: &'static str,
}

impl Facts {
    /// The facts of this host, for node `name` at `node_ip` (`None`: the
    /// first non-loopback IPv4 address, else 127.0.0.1).
    pub fn gather(name: &str, node_ip: Option<IpAddr>) -> Facts {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let memory_kib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let os_image = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".into());
        Facts {
            name: name.to_string(),
            internal_ip: node_ip.unwrap_or_else(crate::netlink::host_ipv4),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_kib,
            machine_id: read("/etc/machine-id"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            kernel_version: read("/proc/sys/kernel/osrelease"),
            os_image,
            arch: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            },
        }
    }
}

/// The version the node reports (`kubectl get nodes` VERSION): the API
/// version fairlead serves, with fairlead's own.
pub fn kubelet_version() -> String {
    format!("v1.33.0+fairlead-{}", env!("CARGO_PKG_VERSION"))
}

/// The well-known labels a kubelet puts on its Node.
pub fn node_labels(f: &Facts) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".into(), f.name.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), f.arch.into()),
        ("beta.kubernetes.io/os".into(), "linux".into()),
        ("beta.kubernetes.io/arch".into(), f.arch.into()),
    ])
}

/// The Node's `status` (as a JSON merge patch body's `status`), at `now`
/// (RFC 3339) for the conditions' heartbeat, with `ready_since` as the
/// Ready condition's transition time.
pub fn node_status(f: &Facts, now: &str, ready_since: &str) -> Value {
    let resources = json!({
        "cpu": f.cpus.to_string(),
        "memory": format!("{}Ki", f.memory_kib),
        "pods": MAX_PODS.to_string(),
    });
    let condition = |ty: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": ty,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        })
    };
    json!({
        "addresses": [
            {"type": "InternalIP", "address": f.internal_ip.to_string()},
            {"type": "Hostname", "address": f.name},
        ],
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                "fairlead node has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure",
                "fairlead node has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID",
                "fairlead node has sufficient PID available"),
            condition("Ready", "True", "KubeletReady",
                "fairlead node agent is posting ready status"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": f.machine_id,
            "systemUUID": "",
            "bootID": f.boot_id,
            "kernelVersion": f.kernel_version,
            "osImage": f.os_image,
            "containerRuntimeVersion": format!("fairlead://{}", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": kubelet_version(),
            "kubeProxyVersion": kubelet_version(),
            "operatingSystem": "linux",
            "architecture": f.arch,
        },
    })
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// Create the Node if missing, and post its labels and status. Returns
/// the Node's uid (the Lease's owner).
async fn post_node(nodes: &Api<Node>, f: &Facts, ready_since: &str) -> Result<String, kube::Error> {
    let labels = node_labels(f);
    let node = match nodes.get_opt(&f.name).await? {
        Some(n) => n,
        None => {
            let n = Node {
                metadata: ObjectMeta {
                    name: Some(f.name.clone()),
                    labels: Some(labels.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match nodes.create(&PostParams::default(), &n).await {
                Ok(n) => n,
                // Created meanwhile (another agent of the same name).
                Err(kube::Error::Api(e)) if e.code == 409 => nodes.get(&f.name).await?,
                Err(e) => return Err(e),
            }
        }
    };
    let have = node.metadata.labels.clone().unwrap_or_default();
    if labels.iter().any(|(k, v)| have.get(k) != Some(v)) {
        nodes
            .patch(
                &f.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await?;
    }
    let status = node_status(f, &now_rfc3339(), ready_since);
    nodes
        .patch_status(
            &f.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    Ok(node.metadata.uid.unwrap_or_default())
}

/// Renew (or create) the node's Lease.
async fn renew_lease(leases: &Api<Lease>, f: &Facts, node_uid: &str) -> Result<(), kube::Error> {
    let now = MicroTime(jiff::Timestamp::now());
    match leases.get_opt(&f.name).await? {
        Some(mut l) => {
            let spec = l.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some(f.name.clone());
            spec.lease_duration_seconds = Some(LEASE_DURATION_SECS);
            spec.renew_time = Some(now);
            leases.replace(&f.name, &PostParams::default(), &l).await?;
        }
        None => {
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(f.name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: (!node_uid.is_empty()).then(|| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: f.name.clone(),
                            uid: node_uid.to_string(),
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(f.name.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION_SECS),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            leases.create(&PostParams::default(), &l).await?;
        }
    }
    Ok(())
}

/// Register the node, then heartbeat until the future is dropped. Errors
/// are logged and retried at the next heartbeat.
pub async fn run(client: kube::Client, facts: Facts, every: Duration) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let ready_since = now_rfc3339();
    let mut uid: Option<String> = None;
    let mut beats: u32 = 0;
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if uid.is_none() || beats >= STATUS_REPORT_EVERY {
            match post_node(&nodes, &facts, &ready_since).await {
                Ok(u) => {
                    if uid.is_none() {
                        tracing::info!(node = %facts.name, ip = %facts.internal_ip, "node registered");
                    }
                    uid = Some(u);
                    beats = 0;
                }
                Err(e) => {
                    tracing::warn!(error = %e, node = %facts.name, "posting the node's status");
                    continue;
                }
            }
        }
        beats += 1;
        if let Err(e) = renew_lease(&leases, &facts, uid.as_deref().unwrap_or("")).await {
            tracing::warn!(error = %e, node = %facts.name, "renewing the node's lease");
            // The Node may be gone (deleted): register it again.
            uid = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            name: "node-a".into(),
            internal_ip: "192.0.2.7".parse().unwrap(),
            cpus: 2,
            memory_kib: 24_000_000,
            machine_id: "m".into(),
            boot_id: "b".into(),
            kernel_version: "6.18.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            arch: "amd64",
        }
    }

    #[test]
    fn status_has_what_kubectl_shows() {
        let s = node_status(&facts(), "2026-12-04T00:00:10Z", "2026-12-04T00:00:00Z");
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "node-a"}, "status": s}))
                .expect("a valid Node status");
        let st = node.status.unwrap();
        let ready = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("True", Some("KubeletReady"))
        );
        let addrs: Vec<(String, String)> = st
            .addresses
            .unwrap()
            .into_iter()
            .map(|a| (a.type_, a.address))
            .collect();
        assert_eq!(
            addrs,
            [
                ("InternalIP".to_string(), "192.0.2.7".to_string()),
                ("Hostname".to_string(), "node-a".to_string())
            ]
        );
        let cap = st.capacity.unwrap();
        assert_eq!(cap["cpu"].0, "2");
        assert_eq!(cap["memory"].0, "24000000Ki");
        assert_eq!(cap["pods"].0, "110");
        assert_eq!(st.allocatable.unwrap(), cap);
        let info = st.node_info.unwrap();
        assert_eq!(info.kubelet_version, kubelet_version());
        assert_eq!(
            (info.operating_system.as_str(), info.architecture.as_str()),
            ("linux", "amd64")
        );
    }

    #[test]
    fn labels_name_the_host() {
        let l = node_labels(&facts());
        assert_eq!(l["kubernetes.io/hostname"], "node-a");
        assert_eq!(l["kubernetes.io/arch"], "amd64");
        assert_eq!(l["kubernetes.io/os"], "linux");
    }
}
