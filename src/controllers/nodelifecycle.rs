//! The node lifecycle controller: what happens to a node that stops
//! reporting, and to its pods.
//!
//! Every `--node-monitor-period` it looks at each Node's heartbeat (its
//! Lease in `kube-node-lease`, or its Ready condition's heartbeat). A
//! heartbeat unchanged for `--node-monitor-grace-period`, measured on this
//! controller's clock (not the node's, which may be skewed), turns the
//! node's Ready condition to Unknown. Then, as kube-controller-manager:
//!
//! - the node is tainted from its Ready condition ([`taints_for`]):
//!   Unknown → `node.kubernetes.io/unreachable`, False →
//!   `node.kubernetes.io/not-ready`, each NoSchedule and NoExecute;
//!   Ready again → the taints go;
//! - its pods get `Ready=False` at once, so their endpoints leave their
//!   Services before anything else happens;
//! - pods that do not tolerate a NoExecute taint are deleted, those that
//!   tolerate it for `tolerationSeconds` (the API server gives every pod
//!   300 s) when that time has passed since the taint was added
//!   ([`eviction`]); their controllers then replace them elsewhere;
//! - pods bound to a node that was deleted, and terminating pods of a
//!   node that does not exist, are deleted at once (the pod garbage
//!   collector: no kubelet will ever confirm their end).
//!
//! The decisions are pure functions; [`run`] only reads the caches and
//! writes what they decide.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tokio::sync::Notify;

use crate::api::pod::{NOT_READY_TAINT, UNREACHABLE_TAINT};
use crate::node::register::LEASE_NAMESPACE;
use crate::scheduler::filter::tolerations_of;

/// Settings (kube-controller-manager's flag names).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `--node-monitor-grace-period`: how long a node may stay silent.
    pub grace: Duration,
    /// `--node-monitor-period`: how often nodes are looked at.
    pub period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace: Duration::from_secs(40),
            period: Duration::from_secs(5),
        }
    }
}

/// The status of a node's Ready condition ("True", "False", "Unknown").
pub fn ready_status(node: &Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or("Unknown", |c| c.status.as_str())
}

/// The taints a node should have for its Ready status `ready`: its other
/// taints, plus NoSchedule and NoExecute of `unreachable` (Unknown) or
/// `not-ready` (False). `None` when they are as they should be. Taints
/// that stay keep their `timeAdded` (evictions count from it).
pub fn taints_for(current: &[Taint], ready: &str, now: Timestamp) -> Option<Vec<Taint>> {
    let key = match ready {
        "True" => None,
        "False" => Some(NOT_READY_TAINT),
        _ => Some(UNREACHABLE_TAINT),
    };
    let ours = |t: &Taint| t.key == NOT_READY_TAINT || t.key == UNREACHABLE_TAINT;
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| !ours(t) || Some(t.key.as_str()) == key)
        .cloned()
        .collect();
    if let Some(key) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !out.iter().any(|t| t.key == key && t.effect == effect) {
                out.push(Taint {
                    key: key.into(),
                    effect: effect.into(),
                    time_added: (effect == "NoExecute").then_some(Time(now)),
                    value: None,
                });
            }
        }
    }
    let same = out.len() == current.len() && out.iter().all(|t| current.contains(t));
    (!same).then_some(out)
}

/// When a pod with `tolerations` must leave a node with `taints`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// It may stay (no NoExecute taint, or tolerated for ever).
    Stay,
    /// Now: a NoExecute taint it does not tolerate.
    Now,
    /// Once this time has passed (the shortest `tolerationSeconds` after
    /// the taint was added).
    At(Timestamp),
}

/// The taint manager's decision for one pod.
pub fn eviction(taints: &[Taint], tolerations: &[Toleration], now: Timestamp) -> Eviction {
    let mut at: Option<Timestamp> = None;
    for t in taints.iter().filter(|t| t.effect == "NoExecute") {
        let value = t.value.as_deref().unwrap_or("");
        let matching: Vec<&Toleration> =
            tolerations_of(tolerations, &t.key, value, &t.effect).collect();
        if matching.is_empty() {
            return Eviction::Now;
        }
        // Tolerated for ever by one of them: this taint never evicts.
        if matching.iter().any(|m| m.toleration_seconds.is_none()) {
            continue;
        }
        let secs = matching
            .iter()
            .filter_map(|m| m.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0);
        let added = t.time_added.as_ref().map_or(now, |t| t.0);
        let deadline = added + jiff::SignedDuration::from_secs(secs);
        at = Some(at.map_or(deadline, |a| a.min(deadline)));
    }
    at.map_or(Eviction::Stay, Eviction::At)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn now_string() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Ready → Unknown on a node that stopped reporting.
async fn mark_unknown(nodes: &Api<Node>, node: &Node) -> Result<(), kube::Error> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut conds = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let now = Time(Timestamp::now());
    let unknown = |c: &mut k8s_openapi::api::core::v1::NodeCondition| {
        c.status = "Unknown".into();
        c.reason = Some("NodeStatusUnknown".into());
        c.message = Some("Kubelet stopped posting node status.".into());
        c.last_transition_time = Some(now.clone());
    };
    match conds.iter_mut().find(|c| c.type_ == "Ready") {
        Some(c) => unknown(c),
        None => {
            let mut c = k8s_openapi::api::core::v1::NodeCondition {
                type_: "Ready".into(),
                ..Default::default()
            };
            unknown(&mut c);
            conds.push(c);
        }
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conds}})),
        )
        .await?;
    Ok(())
}

/// `Ready=False` on a pod of a node that is not Ready.
async fn mark_pod_not_ready(client: &kube::Client, pod: &Pod) -> Result<(), kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({"status": {"conditions": [{
        "type": "Ready", "status": "False", "reason": "NodeNotReady",
        "message": "the node is not ready", "lastTransitionTime": now_string(),
    }]}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    Ok(())
}

async fn delete_pod(client: &kube::Client, pod: &Pod, force: bool, why: &str) {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut dp = DeleteParams::default();
    if force {
        dp.grace_period_seconds = Some(0);
    }
    if let Some(uid) = &pod.metadata.uid {
        dp.preconditions = Some(kube::api::Preconditions {
            uid: Some(uid.clone()),
            resource_version: None,
        });
    }
    match Api::<Pod>::namespaced(client.clone(), ns)
        .delete(name, &dp)
        .await
    {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), reason = why, "pod deleted"),
        Err(e) => tracing::debug!(error = %e, pod = %format!("{ns}/{name}"), "deleting a pod"),
    }
}

/// Watch nodes and their pods until the future is dropped.
pub async fn run(client: kube::Client, cfg: Config) {
    let wake = Arc::new(Notify::new());
    let nodes = super::reflect(Api::<Node>::all(client.clone()), wake.clone());
    let leases = super::reflect(
        Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE),
        wake.clone(),
    );
    let pods = super::reflect(Api::<Pod>::all(client.clone()), wake);
    for ready in [
        nodes.wait_until_ready().await,
        leases.wait_until_ready().await,
        pods.wait_until_ready().await,
    ] {
        if ready.is_err() {
            return;
        }
    }
    let node_api: Api<Node> = Api::all(client.clone());
    // Per node: its last heartbeat as seen, and when we saw it change.
    let mut heard: HashMap<String, (String, Instant)> = HashMap::new();
    // Nodes seen at some point (their pods are collected once they go).
    let mut known: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(cfg.period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let mut taints: HashMap<String, Vec<Taint>> = HashMap::new();
        let mut not_ready: HashSet<String> = HashSet::new();
        for node in nodes.state() {
            let name = node.metadata.name.clone().unwrap_or_default();
            known.insert(name.clone());
            let lease = leases
                .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE))
                .and_then(|l| {
                    l.spec
                        .as_ref()?
                        .renew_time
                        .as_ref()
                        .map(|t| t.0.to_string())
                });
            let heartbeat = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0.to_string()));
            let beat = format!("{lease:?}/{heartbeat:?}");
            let entry = heard
                .entry(name.clone())
                .or_insert_with(|| (beat.clone(), Instant::now()));
            if entry.0 != beat {
                *entry = (beat, Instant::now());
            }
            let silent = entry.1.elapsed() > cfg.grace;
            let reported = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready"));
            // A node that has registered but not yet posted its first
            // status is neither ready nor lost: wait for its status (or
            // for the grace period to pass without one).
            if !reported && !silent {
                taints.insert(
                    name,
                    node.spec
                        .as_ref()
                        .and_then(|s| s.taints.clone())
                        .unwrap_or_default(),
                );
                continue;
            }
            let mut ready = ready_status(&node).to_string();
            if silent && ready != "Unknown" {
                match mark_unknown(&node_api, &node).await {
                    Ok(()) => {
                        tracing::warn!(node = %name, silent_for = ?entry.1.elapsed(), "node stopped reporting: Ready Unknown");
                        ready = "Unknown".into();
                    }
                    Err(e) => tracing::warn!(error = %e, node = %name, "marking a node Unknown"),
                }
            }
            let current = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let wanted = match taints_for(&current, &ready, now) {
                Some(new) => {
                    let patch = json!({"spec": {"taints": new}});
                    match node_api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(node = %name, ready = %ready, "node taints follow its Ready condition");
                            new
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, node = %name, "tainting a node");
                            current
                        }
                    }
                }
                None => current,
            };
            if ready != "True" {
                not_ready.insert(name.clone());
            }
            taints.insert(name, wanted);
        }
        heard.retain(|n, _| taints.contains_key(n));
        let pod_list = pods.state();
        for pod in &pod_list {
            let Some(node) = node_of(pod) else {
                continue;
            };
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let Some(node_taints) = taints.get(node) else {
                // Pod GC: the node is gone (it was deleted while we
                // watched, or this pod's deletion waits for a node that
                // does not exist). Confirm against the API first.
                if (terminating || known.contains(node))
                    && matches!(node_api.get_opt(node).await, Ok(None))
                {
                    delete_pod(&client, pod, true, "its node is gone").await;
                }
                continue;
            };
            if terminating {
                continue;
            }
            if not_ready.contains(node) && pod_ready(pod) {
                if let Err(e) = mark_pod_not_ready(&client, pod).await {
                    tracing::debug!(error = %e, "marking a pod not ready");
                }
            }
            let tols = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            match eviction(node_taints, &tols, now) {
                Eviction::Stay => {}
                Eviction::At(t) if t > now => {}
                Eviction::Now | Eviction::At(_) => {
                    delete_pod(&client, pod, false, "taint-based eviction (NoExecute)").await
                }
            }
        }
        let referenced: HashSet<&str> = pod_list.iter().filter_map(|p| node_of(p)).collect();
        known.retain(|n| taints.contains_key(n) || referenced.contains(n.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn taint(key: &str, effect: &str, added: Option<&str>) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            time_added: added.map(|a| Time(ts(a))),
            value: None,
        }
    }

    fn tol(key: &str, secs: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: secs,
            value: None,
        }
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let now = ts("2026-01-01T00:00:00Z");
        let other = taint("dedicated", "NoSchedule", None);
        let t = taints_for(std::slice::from_ref(&other), "Unknown", now).unwrap();
        let keys: Vec<(&str, &str)> = t
            .iter()
            .map(|t| (t.key.as_str(), t.effect.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("dedicated", "NoSchedule"),
                (UNREACHABLE_TAINT, "NoSchedule"),
                (UNREACHABLE_TAINT, "NoExecute")
            ]
        );
        assert_eq!(
            taints_for(&t, "Unknown", ts("2026-01-01T00:05:00Z")),
            None,
            "kept, timeAdded too"
        );
        let f = taints_for(&t, "False", now).unwrap();
        assert!(f.iter().all(|t| t.key != UNREACHABLE_TAINT));
        assert!(f
            .iter()
            .any(|t| t.key == NOT_READY_TAINT && t.effect == "NoExecute"));
        assert_eq!(taints_for(&f, "True", now).unwrap(), vec![other]);
        assert_eq!(taints_for(&[], "True", now), None);
    }

    #[test]
    fn evictions_wait_for_the_shortest_toleration() {
        let now = ts("2026-01-01T00:00:10Z");
        let taints = [taint(
            UNREACHABLE_TAINT,
            "NoExecute",
            Some("2026-01-01T00:00:00Z"),
        )];
        assert_eq!(eviction(&taints, &[], now), Eviction::Now);
        assert_eq!(
            eviction(
                &taints,
                &[
                    tol(UNREACHABLE_TAINT, Some(300)),
                    tol(UNREACHABLE_TAINT, Some(5))
                ],
                now
            ),
            Eviction::At(ts("2026-01-01T00:00:05Z"))
        );
        assert_eq!(
            eviction(&taints, &[tol(UNREACHABLE_TAINT, None)], now),
            Eviction::Stay
        );
        let no_schedule = [taint(UNREACHABLE_TAINT, "NoSchedule", None)];
        assert_eq!(eviction(&no_schedule, &[], now), Eviction::Stay);
    }
}
