//! The scheduler's rules as pure functions: which nodes a pod fits on (the
//! filters, each failing with kube-scheduler's reason text) and how good a
//! fit is (the score).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Toleration,
};

use crate::kubelet::pod::quantity;

/// CPU (millicores) and memory (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Resources {
    pub cpu_milli: f64,
    pub memory: f64,
}

/// A pod's requests: per container, its requests, or its limits where it
/// has none (Kubernetes defaults requests to limits).
pub fn requests(pod: &Pod) -> Resources {
    let mut r = Resources::default();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let res = c.resources.as_ref();
        let get = |k: &str| {
            res.and_then(|r| r.requests.as_ref().and_then(|q| q.get(k)))
                .or_else(|| res.and_then(|r| r.limits.as_ref().and_then(|l| l.get(k))))
                .and_then(|q| quantity(&q.0))
                .unwrap_or(0.0)
        };
        r.cpu_milli += get("cpu") * 1000.0;
        r.memory += get("memory");
    }
    r
}

/// The host ports a pod asks for: (protocol, port, host IP).
pub fn host_ports(pod: &Pod) -> BTreeSet<(String, i32, String)> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let hp = p.host_port.filter(|h| *h > 0)?;
            Some((
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                hp,
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
            ))
        })
        .collect()
}

/// What is on a node already.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub requested: Resources,
    pub pods: usize,
    pub host_ports: BTreeSet<(String, i32, String)>,
    /// Pods per controller (the uid of their `controller: true` owner).
    pub owners: std::collections::HashMap<String, usize>,
}

impl Usage {
    pub fn add(&mut self, pod: &Pod) {
        let r = requests(pod);
        self.requested.cpu_milli += r.cpu_milli;
        self.requested.memory += r.memory;
        self.pods += 1;
        self.host_ports.extend(host_ports(pod));
        if let Some(uid) = controller_uid(pod) {
            *self.owners.entry(uid.to_string()).or_default() += 1;
        }
    }
}

/// The uid of the pod's controller (a ReplicaSet, ...), if any.
pub fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

/// A node's allocatable resources and pod count.
fn allocatable(node: &Node) -> (Resources, f64) {
    let a = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |k: &str| a.and_then(|a| a.get(k)).and_then(|q| quantity(&q.0));
    (
        Resources {
            cpu_milli: get("cpu").unwrap_or(0.0) * 1000.0,
            memory: get("memory").unwrap_or(0.0),
        },
        get("pods").unwrap_or(110.0),
    )
}

fn tolerates(tols: &[Toleration], key: &str, value: &str, effect: &str) -> bool {
    tolerations_of(tols, key, value, effect).next().is_some()
}

/// The tolerations among `tols` that tolerate the taint `key=value:effect`
/// (the node lifecycle controller reads their `tolerationSeconds`).
pub fn tolerations_of<'a>(
    tols: &'a [Toleration],
    key: &'a str,
    value: &'a str,
    effect: &'a str,
) -> impl Iterator<Item = &'a Toleration> + 'a {
    tols.iter().filter(move |t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == value,
        };
        effect_ok && key_ok && value_ok
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(num), values.first().and_then(|x| num(x))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(num), values.first().and_then(|x| num(x))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

fn term_matches(t: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let exprs = t.match_expressions.iter().flatten();
    let fields = t.match_fields.iter().flatten();
    let has_any = t.match_expressions.as_ref().is_some_and(|e| !e.is_empty())
        || t.match_fields.as_ref().is_some_and(|f| !f.is_empty());
    has_any
        && exprs
            .into_iter()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.into_iter().all(|r| {
            let v = if r.key == "metadata.name" {
                node.metadata.name.as_deref()
            } else {
                None
            };
            requirement_matches(r, v)
        })
}

/// Whether `pod` may go to `node` by its nodeSelector and required node
/// affinity.
pub fn selects(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = &pod.spec else { return true };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affinity_ok =
        required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)));
    selector_ok && affinity_ok
}

/// Whether `pod` fits on `node` with `usage` already there; the reason
/// (kube-scheduler's words) when not.
pub fn fits(pod: &Pod, node: &Node, usage: &Usage) -> Result<(), String> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err("node(s) were not ready".into());
    }
    let tols: Vec<Toleration> = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable).unwrap_or(false)
        && !tolerates(&tols, "node.kubernetes.io/unschedulable", "", "NoSchedule")
    {
        return Err("node(s) were unschedulable".into());
    }
    if !selects(pod, node) {
        return Err("node(s) didn't match Pod's node affinity/selector".into());
    }
    for t in spec.and_then(|s| s.taints.as_ref()).into_iter().flatten() {
        if (t.effect == "NoSchedule" || t.effect == "NoExecute")
            && !tolerates(&tols, &t.key, t.value.as_deref().unwrap_or(""), &t.effect)
        {
            return Err(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or("")
            ));
        }
    }
    let (alloc, max_pods) = allocatable(node);
    let want = requests(pod);
    if usage.pods as f64 + 1.0 > max_pods {
        return Err("Too many pods".into());
    }
    if want.cpu_milli > 0.0 && usage.requested.cpu_milli + want.cpu_milli > alloc.cpu_milli {
        return Err("Insufficient cpu".into());
    }
    if want.memory > 0.0 && usage.requested.memory + want.memory > alloc.memory {
        return Err("Insufficient memory".into());
    }
    let ports = host_ports(pod);
    let clash = ports.iter().any(|(proto, port, ip)| {
        usage.host_ports.iter().any(|(p2, port2, ip2)| {
            p2 == proto && port2 == port && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0")
        })
    });
    if clash {
        return Err("node(s) didn't have free ports for the requested pod ports".into());
    }
    Ok(())
}

/// Weight of spreading a controller's pods against LeastAllocated
/// (kube-scheduler weighs PodTopologySpread 2, NodeResourcesFit 1).
const SPREAD_WEIGHT: f64 = 2.0;

/// How good a fit is (higher is better): the mean share of CPU and memory
/// left free once the pod is there (kube-scheduler's LeastAllocated, 0 to
/// 100), plus, for a pod with a controller, up to twice that for nodes
/// with fewer of the same controller's pods (spreading replicas, as the
/// default topology spread over hostnames does), with the pod count as a
/// tie-breaker so equal nodes fill evenly.
pub fn score(pod: &Pod, node: &Node, usage: &Usage) -> f64 {
    let spread = controller_uid(pod)
        .map(|uid| {
            let same = usage.owners.get(uid).copied().unwrap_or(0) as f64;
            SPREAD_WEIGHT * 100.0 / (1.0 + same)
        })
        .unwrap_or(0.0);
    spread + resource_score(pod, node, usage)
}

fn resource_score(pod: &Pod, node: &Node, usage: &Usage) -> f64 {
    let (alloc, max_pods) = allocatable(node);
    let want = requests(pod);
    let free = |used: f64, cap: f64| {
        if cap > 0.0 {
            (1.0 - used / cap).max(0.0)
        } else {
            0.0
        }
    };
    let cpu = free(usage.requested.cpu_milli + want.cpu_milli, alloc.cpu_milli);
    let mem = free(usage.requested.memory + want.memory, alloc.memory);
    (cpu + mem) / 2.0 * 100.0 + free(usage.pods as f64 + 1.0, max_pods)
}

/// `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were
/// unschedulable.`, as kube-scheduler words a pod that fits nowhere.
pub fn unschedulable_message(nodes: usize, reasons: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        format!("0/{nodes} nodes are available.")
    } else {
        format!("0/{nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(extra: serde_json::Value) -> Node {
        let mut n = json!({
            "metadata": {"name": "n1", "labels": {"zone": "a", "gen": "5"}},
            "spec": {},
            "status": {
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        json_patch::merge(&mut n, &extra);
        serde_json::from_value(n).unwrap()
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut s = json!({"containers": [{"name": "c", "image": "x"}]});
        json_patch::merge(&mut s, &spec);
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": s})).unwrap()
    }

    fn cpu_pod(cpu: &str) -> Pod {
        pod(
            json!({"containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": cpu}}}]}),
        )
    }

    #[test]
    fn readiness_and_cordon() {
        let p = pod(json!({}));
        assert!(fits(&p, &node(json!({})), &Usage::default()).is_ok());
        let not_ready =
            node(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}));
        assert_eq!(
            fits(&p, &not_ready, &Usage::default()).unwrap_err(),
            "node(s) were not ready"
        );
        let cordoned = node(json!({"spec": {"unschedulable": true}}));
        assert_eq!(
            fits(&p, &cordoned, &Usage::default()).unwrap_err(),
            "node(s) were unschedulable"
        );
        let tolerant = pod(
            json!({"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]}),
        );
        assert!(fits(&tolerant, &cordoned, &Usage::default()).is_ok());
    }

    #[test]
    fn selectors_and_affinity() {
        let n = node(json!({}));
        assert!(selects(&pod(json!({"nodeSelector": {"zone": "a"}})), &n));
        assert!(!selects(&pod(json!({"nodeSelector": {"zone": "b"}})), &n));
        let aff = |exprs: serde_json::Value| {
            pod(
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": exprs}]}}}}),
            )
        };
        assert!(selects(
            &aff(json!([{"key": "zone", "operator": "In", "values": ["a", "b"]}])),
            &n
        ));
        assert!(!selects(
            &aff(json!([{"key": "zone", "operator": "NotIn", "values": ["a"]}])),
            &n
        ));
        assert!(selects(
            &aff(json!([{"key": "gen", "operator": "Gt", "values": ["4"]}])),
            &n
        ));
        assert!(!selects(
            &aff(json!([{"key": "gen", "operator": "Lt", "values": ["4"]}])),
            &n
        ));
        assert!(selects(
            &aff(json!([{"key": "gpu", "operator": "DoesNotExist"}])),
            &n
        ));
        assert!(!selects(
            &aff(json!([{"key": "gpu", "operator": "Exists"}])),
            &n
        ));
    }

    #[test]
    fn taints_need_tolerations() {
        let n = node(
            json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(
            fits(&pod(json!({})), &n, &Usage::default()).unwrap_err(),
            "node(s) had untolerated taint {dedicated: db}"
        );
        let ok = pod(
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}),
        );
        assert!(fits(&ok, &n, &Usage::default()).is_ok());
        let wrong = pod(
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "web"}]}),
        );
        assert!(fits(&wrong, &n, &Usage::default()).is_err());
        let soft = node(json!({"spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]}}));
        assert!(fits(&pod(json!({})), &soft, &Usage::default()).is_ok());
    }

    #[test]
    fn resources_pods_and_ports() {
        let n = node(json!({}));
        let mut usage = Usage::default();
        usage.add(&cpu_pod("1500m"));
        assert!(fits(&cpu_pod("500m"), &n, &usage).is_ok());
        assert_eq!(
            fits(&cpu_pod("600m"), &n, &usage).unwrap_err(),
            "Insufficient cpu"
        );
        let big = pod(
            json!({"containers": [{"name": "c", "image": "x", "resources": {"limits": {"memory": "5Gi"}}}]}),
        );
        assert_eq!(
            fits(&big, &n, &Usage::default()).unwrap_err(),
            "Insufficient memory"
        );
        usage.add(&pod(json!({})));
        usage.add(&pod(json!({})));
        assert_eq!(
            fits(&pod(json!({})), &n, &usage).unwrap_err(),
            "Too many pods"
        );
        let hp = |port: i32| {
            pod(
                json!({"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80, "hostPort": port}]}]}),
            )
        };
        let mut usage = Usage::default();
        usage.add(&hp(8080));
        assert_eq!(
            fits(&hp(8080), &n, &usage).unwrap_err(),
            "node(s) didn't have free ports for the requested pod ports"
        );
        assert!(fits(&hp(8081), &n, &usage).is_ok());
    }

    #[test]
    fn emptier_nodes_score_higher() {
        let n = node(json!({}));
        let mut busy = Usage::default();
        busy.add(&cpu_pod("1"));
        assert!(
            score(&cpu_pod("100m"), &n, &Usage::default()) > score(&cpu_pod("100m"), &n, &busy)
        );
        // Replicas of one controller spread, even onto a busier node.
        let replica = |cpu: &str| {
            let mut p = cpu_pod(cpu);
            p.metadata.owner_references = Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    uid: "rs-1".into(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]);
            p
        };
        let mut has_one = Usage::default();
        has_one.add(&replica("100m"));
        assert!(score(&replica("100m"), &n, &busy) > score(&replica("100m"), &n, &has_one));
        let reasons = BTreeMap::from([
            ("Insufficient cpu".to_string(), 1),
            ("node(s) were unschedulable".to_string(), 2),
        ]);
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were unschedulable."
        );
    }
}
