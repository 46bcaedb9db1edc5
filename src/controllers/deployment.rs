//! The Deployment controller: one ReplicaSet per pod template (named
//! `<deployment>-<pod-template-hash>`, the hash also a label of its pods
//! and selector), rolled out by the strategy:
//! * **RollingUpdate**: the new ReplicaSet grows while the total stays
//!   within `replicas + maxSurge`; old ones shrink while the available
//!   pods stay at least `replicas - maxUnavailable`;
//! * **Recreate**: old ReplicaSets go to 0 first; the new one grows once
//!   their pods are gone.
//!
//! Revisions are the `deployment.kubernetes.io/revision` annotation (the
//! new ReplicaSet gets the highest + 1, so `kubectl rollout undo` to an old
//! template reuses and re-numbers its ReplicaSet); at most
//! `revisionHistoryLimit` scaled-down old ReplicaSets are kept. The status
//! (replicas, updated, ready, available, the Available and Progressing
//! conditions, observedGeneration) is what `kubectl rollout status` reads.
//! The arithmetic is the pure [`step`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use serde_json::{json, Value};

use super::Error;
use crate::api::workload::selector_string;

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH_LABEL: &str = "pod-template-hash";

struct Ctx {
    client: kube::Client,
}

/// kube's pod-template-hash alphabet (no vowels, no look-alikes).
const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The value without nulls, empty objects and empty lists, at any depth:
/// Go's encoding of a template cannot tell them from absent fields (a
/// `resources: {}` that `kubectl rollout undo` sends back is the same
/// template as none), so neither may the hash.
fn without_empties(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Object(m) => {
            let m: serde_json::Map<String, Value> = m
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), without_empties(v)?)))
                .collect();
            (!m.is_empty()).then_some(Value::Object(m))
        }
        Value::Array(a) => {
            let a: Vec<Value> = a
                .iter()
                .map(|v| without_empties(v).unwrap_or(json!({})))
                .collect();
            (!a.is_empty()).then_some(Value::Array(a))
        }
        other => Some(other.clone()),
    }
}

/// The pod-template-hash of a template: FNV-1a over its JSON (without
/// empty fields), spelled with [`SAFE`] characters.
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c9dc5;
    let canonical = without_empties(template).unwrap_or(Value::Null);
    for b in serde_json::to_vec(&canonical).unwrap_or_default() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h.to_string()
        .bytes()
        .map(|c| SAFE[c as usize % SAFE.len()] as char)
        .collect()
}

/// An int-or-percent of `total` (`25%`), rounded up or down.
pub fn int_or_percent(v: &Value, total: i64, round_up: bool) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) {
            Some(p) => {
                let x = p * total as f64 / 100.0;
                (if round_up { x.ceil() } else { x.floor() }) as i64
            }
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

/// One ReplicaSet as the rollout sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Set {
    pub name: String,
    pub replicas: i64,
    pub available: i64,
    /// Pods that exist (status.replicas).
    pub current: i64,
}

/// The next replica counts: `new` then each of `old`, for `want` pods with
/// the strategy (`None`: Recreate; `Some((surge, unavailable))`).
pub fn step(want: i64, new: &Set, old: &[Set], rolling: Option<(i64, i64)>) -> (i64, Vec<i64>) {
    let Some((surge, unavailable)) = rolling else {
        // Recreate: old to zero; the new one only when no old pod is left.
        let old_left: i64 = old.iter().map(|s| s.replicas.max(s.current)).sum();
        let new_target = if old_left == 0 {
            want
        } else {
            new.replicas.min(want)
        };
        return (new_target, vec![0; old.len()]);
    };
    let unavailable = if surge == 0 && unavailable == 0 {
        1
    } else {
        unavailable
    };
    let total: i64 = new.replicas + old.iter().map(|s| s.replicas).sum::<i64>();
    // Grow the new set within the surge.
    let mut new_target = new.replicas;
    if new.replicas < want {
        let room = want + surge - total;
        new_target = (new.replicas + room.max(0)).min(want);
    } else if new.replicas > want {
        new_target = want;
    }
    // Shrink old sets while enough pods stay available: first their
    // unavailable pods (they serve nobody), then available ones.
    let min_available = want - unavailable;
    let available: i64 = new.available + old.iter().map(|s| s.available).sum::<i64>();
    let mut can_remove = (available - min_available).max(0);
    let mut old_targets = Vec::with_capacity(old.len());
    for s in old {
        let unhealthy = (s.replicas - s.available).max(0);
        let mut t = s.replicas - unhealthy;
        let take = can_remove.min(t);
        t -= take;
        can_remove -= take;
        old_targets.push(t.max(0));
    }
    (new_target, old_targets)
}

fn set_of(rs: &ReplicaSet) -> Set {
    let st = rs.status.as_ref();
    Set {
        name: rs.metadata.name.clone().unwrap_or_default(),
        replicas: rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) as i64,
        available: st.and_then(|s| s.available_replicas).unwrap_or(0) as i64,
        current: st.map(|s| s.replicas).unwrap_or(0) as i64,
    }
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let dv = serde_json::to_value(d.as_ref()).unwrap_or_default();
    let spec = &dv["spec"];
    let want = spec["replicas"].as_i64().unwrap_or(1);
    let selector = selector_string(&spec["selector"]);
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let mut mine: Vec<ReplicaSet> = sets
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|rs| {
            rs.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.controller == Some(true) && r.uid == uid)
        })
        .collect();
    let hash = template_hash(&spec["template"]);
    let max_rev = mine.iter().map(revision).max().unwrap_or(0);
    let paused = spec["paused"].as_bool().unwrap_or(false);
    let pos = mine
        .iter()
        .position(|rs| rs.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash));
    let new = match pos {
        Some(i) => {
            let rs = mine.remove(i);
            // A template rolled back to: its set becomes the newest revision.
            if revision(&rs) < max_rev {
                let patch =
                    json!({"metadata": {"annotations": {REVISION: (max_rev + 1).to_string()}}});
                sets.patch(
                    rs.metadata.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await?
            } else {
                rs
            }
        }
        None if paused => {
            // The new template waits for `rollout resume`; say so.
            let paused_cond = dv["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "DeploymentPaused"));
            if !paused_cond {
                let now = jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                let mut conds: Vec<Value> = dv["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c["type"] != "Progressing")
                    .collect();
                conds.push(json!({"type": "Progressing", "status": "Unknown",
                    "reason": "DeploymentPaused", "message": "Deployment is paused",
                    "lastUpdateTime": now, "lastTransitionTime": now}));
                Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"conditions": conds,
                            "observedGeneration": d.metadata.generation}})),
                    )
                    .await?;
            }
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        None => {
            let mut template = spec["template"].clone();
            template["metadata"]["labels"][HASH_LABEL] = json!(hash);
            let mut selector = spec["selector"].clone();
            selector["matchLabels"][HASH_LABEL] = json!(hash);
            let rs = json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": format!("{name}-{hash}"),
                    "labels": template["metadata"]["labels"],
                    "annotations": {REVISION: (max_rev + 1).to_string()},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                        "uid": uid, "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {"replicas": 0, "minReadySeconds": spec["minReadySeconds"],
                    "selector": selector, "template": template},
            });
            let rs: ReplicaSet = serde_json::from_value(rs).map_err(kube::Error::SerdeError)?;
            sets.create(&PostParams::default(), &rs).await?
        }
    };
    // Oldest first, so they shrink first.
    mine.sort_by_key(revision);
    let old: Vec<Set> = mine.iter().map(set_of).collect();
    let new_set = set_of(&new);
    let rolling = match spec["strategy"]["type"].as_str() {
        Some("Recreate") => None,
        _ => {
            let ru = &spec["strategy"]["rollingUpdate"];
            Some((
                int_or_percent(&ru["maxSurge"], want, true),
                int_or_percent(&ru["maxUnavailable"], want, false),
            ))
        }
    };
    if !paused {
        let (new_target, old_targets) = step(want, &new_set, &old, rolling);
        let scale = |n: &str, r: i64| {
            let sets = sets.clone();
            let n = n.to_string();
            async move {
                sets.patch(
                    &n,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": r}})),
                )
                .await
            }
        };
        if new_target != new_set.replicas {
            scale(&new_set.name, new_target).await?;
        }
        for (s, t) in old.iter().zip(old_targets) {
            if t != s.replicas {
                scale(&s.name, t).await?;
            }
        }
    }
    // History: scaled-down old sets beyond revisionHistoryLimit go.
    let limit = spec["revisionHistoryLimit"].as_i64().unwrap_or(10).max(0) as usize;
    let idle: Vec<&ReplicaSet> = mine
        .iter()
        .filter(|rs| set_of(rs).replicas == 0 && set_of(rs).current == 0)
        .collect();
    if idle.len() > limit {
        for rs in &idle[..idle.len() - limit] {
            let _ = sets
                .delete(
                    rs.metadata.name.as_deref().unwrap_or(""),
                    &DeleteParams::background(),
                )
                .await;
        }
    }
    // Status.
    let all: Vec<&ReplicaSet> = std::iter::once(&new).chain(mine.iter()).collect();
    let sum = |f: fn(&ReplicaSet) -> i64| all.iter().map(|rs| f(rs)).sum::<i64>();
    let replicas = sum(|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) as i64);
    let ready = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0) as i64
    });
    let available = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0) as i64
    });
    let updated = new.status.as_ref().map(|s| s.replicas).unwrap_or(0) as i64;
    let max_unavailable = rolling.map(|(_, u)| u).unwrap_or(want);
    let complete = updated == want && replicas == want && available == want;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let old_conds = &dv["status"]["conditions"];
    let prev_cond = |type_: &str| {
        old_conds
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .cloned()
    };
    let cond = |type_: &str, status: &str, reason: &str, message: String, updated: &Value| {
        let since = prev_cond(type_)
            .filter(|c| c["status"] == status)
            .map(|c| c["lastTransitionTime"].clone())
            .unwrap_or_else(|| json!(now));
        json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": updated, "lastTransitionTime": since})
    };
    let mut status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (want - available).max(0),
    });
    let numbers = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ];
    // Progress: any count moved (or the spec changed) since the last
    // status; the Progressing condition's lastUpdateTime says when.
    let progressed = numbers
        .iter()
        .any(|k| dv["status"][k].as_i64().unwrap_or(0) != status[k].as_i64().unwrap_or(0));
    let last_progress = prev_cond("Progressing")
        .filter(|_| !progressed)
        .and_then(|c| c["lastUpdateTime"].as_str().map(String::from))
        .unwrap_or_else(|| now.clone());
    let deadline = spec["progressDeadlineSeconds"].as_i64().unwrap_or(600);
    let stalled = last_progress
        .parse::<jiff::Timestamp>()
        .is_ok_and(|t| (jiff::Timestamp::now() - t).get_seconds() > deadline);
    let new_name = new.metadata.name.clone().unwrap_or_default();
    let progress_time = json!(last_progress);
    let conditions = json!([
        if available >= want - max_unavailable {
            cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                &json!(now),
            )
        } else {
            cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                &json!(now),
            )
        },
        if complete {
            cond(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                &progress_time,
            )
        } else if paused {
            cond(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
                &progress_time,
            )
        } else if stalled {
            cond(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                &progress_time,
            )
        } else {
            cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
                &progress_time,
            )
        },
    ]);
    status["conditions"] = conditions;
    let differs = progressed
        || old_conds.as_array().map(|cs| {
            cs.iter()
                .map(|c| (c["type"].clone(), c["reason"].clone()))
                .collect::<Vec<_>>()
        }) != status["conditions"].as_array().map(|cs| {
            cs.iter()
                .map(|c| (c["type"].clone(), c["reason"].clone()))
                .collect::<Vec<_>>()
        });
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let rev = revision(&new);
    if dv["metadata"]["annotations"][REVISION].as_str() != Some(rev.to_string().as_str()) {
        let patch = json!({"metadata": {"annotations": {REVISION: rev.to_string()}}});
        deployments
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if differs {
        deployments
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    Ok(Action::requeue(if complete {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(1)
    }))
}

fn error_policy(_d: Arc<Deployment>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "deployment reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

/// Run the controller until the future is dropped.
pub async fn run(client: kube::Client) {
    let deployments: Api<Deployment> = Api::all(client.clone());
    let sets: Api<ReplicaSet> = Api::all(client.clone());
    Controller::new(deployments, watcher::Config::default())
        .trigger_backoff(super::WatchBackoff::default())
        .owns(sets, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(replicas: i64, available: i64) -> Set {
        Set {
            name: "s".into(),
            replicas,
            available,
            current: replicas,
        }
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        assert_eq!(int_or_percent(&json!("25%"), 3, true), 1);
        assert_eq!(int_or_percent(&json!("25%"), 3, false), 0);
        assert_eq!(int_or_percent(&json!(2), 3, false), 2);
    }

    #[test]
    fn rolling_update_stays_within_surge_and_availability() {
        // 3 wanted, surge 1, unavailable 0: one new pod first, old untouched
        // until it is available.
        let (n, o) = step(3, &set(0, 0), &[set(3, 3)], Some((1, 0)));
        assert_eq!((n, o), (1, vec![3]));
        let (n, o) = step(3, &set(1, 0), &[set(3, 3)], Some((1, 0)));
        assert_eq!((n, o), (1, vec![3]), "nothing new is available yet");
        let (n, o) = step(3, &set(1, 1), &[set(3, 3)], Some((1, 0)));
        assert_eq!((n, o), (1, vec![2]), "one new available: one old goes");
        let (n, o) = step(3, &set(1, 1), &[set(2, 2)], Some((1, 0)));
        assert_eq!((n, o), (2, vec![2]));
        // Done.
        let (n, o) = step(3, &set(3, 3), &[set(0, 0)], Some((1, 0)));
        assert_eq!((n, o), (3, vec![0]));
        // Unavailable old pods go first, whatever the budget.
        let (_, o) = step(3, &set(1, 0), &[set(3, 1)], Some((1, 0)));
        assert_eq!(o, vec![1]);
    }

    #[test]
    fn recreate_empties_the_old_sets_first() {
        let (n, o) = step(3, &set(0, 0), &[set(3, 3)], None);
        assert_eq!((n, o), (0, vec![0]));
        let (n, o) = step(3, &set(0, 0), &[set(0, 0)], None);
        assert_eq!((n, o), (3, vec![0]));
    }

    #[test]
    fn hashes_are_stable_and_safe() {
        let t = json!({"spec": {"containers": [{"name": "c", "image": "a"}]}});
        let h = template_hash(&t);
        assert_eq!(h, template_hash(&t));
        let mut with_empty = t.clone();
        with_empty["spec"]["containers"][0]["resources"] = json!({});
        assert_eq!(h, template_hash(&with_empty), "empty fields do not count");
        assert_ne!(
            h,
            template_hash(&json!({"spec": {"containers": [{"name": "c", "image": "b"}]}}))
        );
        assert!(h.bytes().all(|c| SAFE.contains(&c)), "{h}");
    }
}
