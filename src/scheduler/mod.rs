//! The scheduler (`fairlead scheduler`, also inside `fairlead up`): binds
//! every Pod that waits for the default scheduler to a node, through
//! `pods/binding`, as kube-scheduler does.
//!
//! Two reflectors (Nodes, Pods) feed one loop. Each pass takes the unbound
//! Pods oldest first; a Pod goes to the best-scoring node that passes every
//! filter ([`filter`]: Ready, not cordoned, nodeSelector and required
//! node affinity, taints, resources against allocatable minus what is bound,
//! pod count, host ports). Pods bound in this pass count at once (the
//! reflector may not show them yet). A Pod that fits nowhere gets
//! `PodScheduled=False`, reason `Unschedulable`, with kube-scheduler's
//! message (also a `FailedScheduling` event), and is retried when Nodes or Pods change, or after
//! [`RETRY`]. Scores prefer room (LeastAllocated) and, twice as much,
//! nodes with fewer pods of the same controller (spreading replicas).
//! Leader-elected ([`run_elected`]), as the controllers are.

pub mod filter;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tokio::sync::Notify;

use filter::Usage;

/// The scheduler name Pods get by default.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// How often unschedulable Pods are tried again without any change.
pub const RETRY: Duration = Duration::from_secs(5);

/// Whether `pod` waits for this scheduler.
pub fn wants_binding(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let unbound = spec
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty);
    let ours = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n.is_empty() || n == DEFAULT_SCHEDULER);
    unbound && ours && pod.metadata.deletion_timestamp.is_none()
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A Pod and a node name (a binding) or a message (why it fits nowhere).
pub type Decision = (Arc<Pod>, String);

/// One scheduling pass: the bindings made and the Pods left unschedulable
/// (with their message).
pub fn plan(nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> (Vec<Decision>, Vec<Decision>) {
    let mut usage: HashMap<String, Usage> = HashMap::new();
    for p in pods {
        if let Some(n) = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty())
        {
            if !finished(p) {
                usage.entry(n.to_string()).or_default().add(p);
            }
        }
    }
    let mut waiting: Vec<&Arc<Pod>> = pods.iter().filter(|p| wants_binding(p)).collect();
    waiting.sort_by(|a, b| {
        (
            &a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &a.metadata.name,
        )
            .cmp(&(
                &b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &b.metadata.name,
            ))
    });
    let (mut bound, mut stuck) = (Vec::new(), Vec::new());
    for pod in waiting {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<(f64, &str)> = None;
        for n in nodes {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            let u = usage.get(name).cloned().unwrap_or_default();
            match filter::fits(pod, n, &u) {
                Ok(()) => {
                    let s = filter::score(pod, n, &u);
                    if best.is_none_or(|(b, bn)| s > b || (s == b && name < bn)) {
                        best = Some((s, name));
                    }
                }
                Err(r) => *reasons.entry(r).or_default() += 1,
            }
        }
        match best {
            Some((_, node)) => {
                usage.entry(node.to_string()).or_default().add(pod);
                bound.push((pod.clone(), node.to_string()));
            }
            None => stuck.push((
                pod.clone(),
                filter::unschedulable_message(nodes.len(), &reasons),
            )),
        }
    }
    (bound, stuck)
}

/// An event on `pod` from the scheduler (`Scheduled`, `FailedScheduling`:
/// what `kubectl describe pod` and `kubectl get events` show).
async fn pod_event(client: &kube::Client, pod: &Pod, ty: &str, reason: &str, msg: &str) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name,
            "uid": pod.metadata.uid},
        "reason": reason, "message": msg, "type": ty,
        "source": {"component": "default-scheduler"},
        "reportingComponent": "default-scheduler",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    });
    let Ok(event) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(event) else {
        return;
    };
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::debug!(error = %e, reason, "recording a scheduler event");
    }
}

/// [`run`] under leader election (the Lease `kube-system/fairlead-scheduler`),
/// so several schedulers may run for availability and only one binds.
/// Never returns.
pub async fn run_elected(client: kube::Client) {
    let identity = format!(
        "{}_{}",
        crate::node::NodeConfig::default().node_name(),
        std::process::id()
    );
    let cfg = crate::controllers::leader::LeaderConfig {
        namespace: "kube-system".into(),
        name: "fairlead-scheduler".into(),
        identity,
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };
    let c = client.clone();
    crate::controllers::leader::run(client, cfg, move || run(c.clone())).await
}

/// Schedule until the future is dropped.
pub async fn run(client: kube::Client) {
    let wake = Arc::new(Notify::new());
    let nodes = crate::controllers::reflect(Api::<Node>::all(client.clone()), wake.clone());
    let pods = crate::controllers::reflect(Api::<Pod>::all(client.clone()), wake.clone());
    // Bound in an earlier pass, not yet seen bound by the reflector.
    let mut assumed: HashMap<String, String> = HashMap::new();
    // The unschedulable message last written per pod uid.
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RETRY) => {}
        }
        // Let a burst of events land first.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let node_list = nodes.state();
        let mut pod_list: Vec<Arc<Pod>> = pods.state();
        assumed.retain(|uid, _| {
            pod_list
                .iter()
                .any(|p| p.metadata.uid.as_deref() == Some(uid) && wants_binding(p))
        });
        for p in pod_list.iter_mut() {
            if let Some(node) = p.metadata.uid.as_ref().and_then(|u| assumed.get(u)) {
                let mut q = (**p).clone();
                q.spec.get_or_insert_with(Default::default).node_name = Some(node.clone());
                *p = Arc::new(q);
            }
        }
        let (bound, stuck) = plan(&node_list, &pod_list);
        // Bindings and reports go out concurrently (kube-scheduler binds
        // asynchronously too): one at a time, a pass of 1,000 pods would
        // wait on 1,000 round trips.
        let bindings = futures::stream::iter(bound.into_iter().map(|(pod, node)| {
            let client = client.clone();
            async move {
                let ok = bind(&client, &pod, &node).await;
                (pod, node, ok)
            }
        }))
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        for (pod, node, ok) in bindings {
            if let (true, Some(uid)) = (ok, &pod.metadata.uid) {
                assumed.insert(uid.clone(), node);
                reported.remove(uid);
            }
        }
        let fresh: Vec<Decision> = stuck
            .into_iter()
            .filter(|(p, msg)| reported.get(p.metadata.uid.as_deref().unwrap_or("")) != Some(msg))
            .collect();
        let reports = futures::stream::iter(fresh.into_iter().map(|(pod, msg)| {
            let client = client.clone();
            async move {
                let ok = report_unschedulable(&client, &pod, &msg).await;
                (pod, msg, ok)
            }
        }))
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        for (pod, msg, ok) in reports {
            if ok {
                reported.insert(pod.metadata.uid.clone().unwrap_or_default(), msg);
            }
        }
    }
}

/// Requests a pass keeps in flight.
const IN_FLIGHT: usize = 16;

/// Bind `pod` to `node` (`pods/binding`), with a `Scheduled` event.
/// Whether it is bound now.
async fn bind(client: &kube::Client, pod: &Pod, node: &str) -> bool {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    match api
        .create_subresource::<Value, Value>("binding", &name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => {
            tracing::info!(pod = %format!("{ns}/{name}"), node = %node, "pod bound");
            let msg = format!("Successfully assigned {ns}/{name} to {node}");
            pod_event(client, pod, "Normal", "Scheduled", &msg).await;
            true
        }
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => false,
        Err(e) => {
            tracing::warn!(error = %e, pod = %format!("{ns}/{name}"), "binding the pod");
            false
        }
    }
}

/// `PodScheduled=False` with the reason, and a `FailedScheduling` event.
/// Whether it was written.
async fn report_unschedulable(client: &kube::Client, pod: &Pod, msg: &str) -> bool {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let patch = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": msg, "lastProbeTime": null,
        "lastTransitionTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    }]}});
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        Ok(_) => {
            tracing::info!(pod = %format!("{ns}/{name}"), reason = %msg, "pod unschedulable");
            pod_event(client, pod, "Warning", "FailedScheduling", msg).await;
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "reporting an unschedulable pod");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn node(name: &str, cpu: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_unbound_pods_of_the_default_scheduler() {
        assert!(wants_binding(&pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": []}})
        )));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a"},
            "spec": {"containers": [], "nodeName": "n1"}}))));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a"},
            "spec": {"containers": [], "schedulerName": "mine"}}))));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a",
            "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"containers": []}}))));
    }

    #[test]
    fn a_pass_spreads_counts_its_own_bindings_and_explains_the_rest() {
        let nodes = [node("a", "1"), node("b", "1")];
        let p = |name: &str, cpu: &str, t: &str| {
            pod(
                json!({"metadata": {"name": name, "uid": name, "creationTimestamp": t},
                "spec": {"containers": [{"name": "c", "image": "x",
                    "resources": {"requests": {"cpu": cpu}}}]}}),
            )
        };
        let pods = [
            p("first", "600m", "2026-01-01T00:00:01Z"),
            p("second", "600m", "2026-01-01T00:00:02Z"),
            p("third", "600m", "2026-01-01T00:00:03Z"),
        ];
        let (bound, stuck) = plan(&nodes, &pods);
        let got: Vec<(String, String)> = bound
            .iter()
            .map(|(p, n)| (p.metadata.name.clone().unwrap(), n.clone()))
            .collect();
        assert_eq!(
            got,
            [("first".into(), "a".into()), ("second".into(), "b".into())]
        );
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].1, "0/2 nodes are available: 2 Insufficient cpu.");
    }
}
