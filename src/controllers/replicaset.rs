//! The ReplicaSet controller: keeps `spec.replicas` pods of the template
//! running, owned by the ReplicaSet (an ownerReference with `controller:
//! true`), and reports how many there are, ready and available.
//!
//! A reconcile lists the ReplicaSet's pods (by its selector) from the API
//! server, not from a cache, so pods it created a moment ago are always
//! counted: that is what kube-controller-manager's "expectations" achieve
//! for its lagging informer, here without the bookkeeping. Orphans that
//! match the selector are adopted; pods of another controller are left
//! alone. Scale-down removes unscheduled, then pending, then not-ready
//! pods first, and the youngest among equals. The choice is the pure
//! [`plan`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use serde_json::{json, Value};

use super::Error;
use crate::api::workload::selector_string;

struct Ctx {
    client: kube::Client,
}

/// How often a ReplicaSet is looked at without events (adoption of
/// orphans created elsewhere, availability after minReadySeconds).
const RESYNC: Duration = Duration::from_secs(30);

fn ready_since(p: &Pod) -> Option<Timestamp> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH)
        })
}

fn active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Which pods to delete to go from `pods` to `want`: unscheduled first,
/// then pending, then not ready, then the youngest.
pub fn plan_deletions(pods: &[Pod], want: usize) -> Vec<String> {
    if pods.len() <= want {
        return Vec::new();
    }
    let mut ranked: Vec<&Pod> = pods.iter().collect();
    let rank = |p: &Pod| {
        let unscheduled = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_none_or(str::is_empty);
        let pending = p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running");
        let not_ready = ready_since(p).is_none();
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        (
            !unscheduled,
            !pending,
            !not_ready,
            std::cmp::Reverse(created),
        )
    };
    ranked.sort_by_key(|p| rank(p));
    ranked
        .into_iter()
        .take(pods.len() - want)
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

/// A pod of `rs`'s template, owned by it.
fn pod_for(rs: &ReplicaSet) -> Value {
    let name = rs.metadata.name.clone().unwrap_or_default();
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{name}-"),
            "labels": meta.labels,
            "annotations": meta.annotations,
            "ownerReferences": [owner_ref(rs)],
        },
        "spec": template.spec,
    })
}

fn owner_ref(rs: &ReplicaSet) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": rs.metadata.name, "uid": rs.metadata.uid,
        "controller": true, "blockOwnerDeletion": true,
    })
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rs.metadata.namespace.clone().unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let selector = selector_string(&serde_json::to_value(&spec.selector).unwrap_or_default());
    if selector.is_empty() {
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = pods.list(&ListParams::default().labels(&selector)).await?;
    let mut mine = Vec::new();
    for p in listed.items {
        let controller = p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true));
        match controller {
            Some(r) if r.uid == uid => mine.push(p),
            Some(_) => {}
            None if active(&p) => {
                // An orphan that matches: adopt it.
                let mut refs: Vec<Value> = p
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .map(|r| serde_json::to_value(r).unwrap_or_default())
                    .collect();
                refs.push(owner_ref(&rs));
                let patch = json!({"metadata": {"ownerReferences": refs}});
                let pname = p.metadata.name.clone().unwrap_or_default();
                match pods
                    .patch(&pname, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Ok(adopted) => mine.push(adopted),
                    Err(e) => tracing::debug!(error = %e, pod = %pname, "adopting a pod"),
                }
            }
            None => {}
        }
    }
    let mut live: Vec<Pod> = mine.into_iter().filter(active).collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    if live.len() < want {
        let template = pod_for(&rs);
        let creates = (live.len()..want).map(|_| {
            let (pods, t) = (pods.clone(), template.clone());
            async move {
                let p: Pod = serde_json::from_value(t).map_err(kube::Error::SerdeError)?;
                pods.create(&PostParams::default(), &p).await
            }
        });
        for r in futures::future::join_all(creates).await {
            match r {
                Ok(p) => live.push(p),
                Err(e) => {
                    tracing::warn!(error = %e, replicaset = %format!("{ns}/{name}"), "creating a pod")
                }
            }
        }
    } else if live.len() > want {
        let doomed = plan_deletions(&live, want);
        for d in &doomed {
            match pods.delete(d, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => tracing::warn!(error = %e, pod = %d, "deleting a pod"),
            }
        }
        live.retain(|p| !doomed.contains(p.metadata.name.as_ref().unwrap_or(&String::new())));
    }
    let now = Timestamp::now();
    let min_ready = Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let ready = live.iter().filter(|p| ready_since(p).is_some()).count();
    let available = live
        .iter()
        .filter(|p| {
            ready_since(p).is_some_and(|t| now.duration_since(t).unsigned_abs() >= min_ready)
        })
        .count();
    let status = json!({
        "replicas": live.len(),
        "fullyLabeledReplicas": live.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    let current = serde_json::to_value(&rs.status).unwrap_or_default();
    let changed = [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ]
    .iter()
    .any(|k| current[k].as_i64().unwrap_or(0) != status[k].as_i64().unwrap_or(0));
    if changed {
        let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    // Pods that are ready but not yet available become so by time alone.
    let soon = if ready > available {
        min_ready.max(Duration::from_secs(1))
    } else {
        RESYNC
    };
    Ok(Action::requeue(soon))
}

fn error_policy(_rs: Arc<ReplicaSet>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "replicaset reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

/// Run the controller until the future is dropped.
pub async fn run(client: kube::Client) {
    let sets: Api<ReplicaSet> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    Controller::new(sets, watcher::Config::default())
        .trigger_backoff(super::WatchBackoff::default())
        .owns(pods, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .unwrap()
    }

    #[test]
    fn scale_down_takes_the_least_useful_pods() {
        let pods = [
            pod(
                "old-ready",
                Some("n"),
                "Running",
                true,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "young-ready",
                Some("n"),
                "Running",
                true,
                "2026-01-02T00:00:00Z",
            ),
            pod(
                "not-ready",
                Some("n"),
                "Running",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "pending",
                Some("n"),
                "Pending",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "unscheduled",
                None,
                "Pending",
                false,
                "2026-01-01T00:00:00Z",
            ),
        ];
        assert_eq!(plan_deletions(&pods, 5), Vec::<String>::new());
        assert_eq!(plan_deletions(&pods, 3), ["unscheduled", "pending"]);
        assert_eq!(
            plan_deletions(&pods, 1),
            ["unscheduled", "pending", "not-ready", "young-ready"]
        );
    }

    #[test]
    fn new_pods_carry_the_template_and_the_owner() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "uid": "u1"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "fairlead"}]}}},
        }))
        .unwrap();
        let p = pod_for(&rs);
        assert_eq!(p["metadata"]["generateName"], "web-abc-");
        assert_eq!(p["metadata"]["labels"]["app"], "web");
        assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(p["spec"]["containers"][0]["image"], "fairlead");
    }
}
