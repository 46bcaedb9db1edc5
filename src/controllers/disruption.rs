//! The disruption controller: keeps each PodDisruptionBudget's status
//! (`currentHealthy`, `desiredHealthy`, `expectedPods`,
//! `disruptionsAllowed`) true to the pods it selects, which is what the
//! `pods/eviction` subresource checks (see `api::disruption`).
//!
//! Three reflectors (budgets, pods, ReplicaSets) wake one loop, which
//! recomputes every budget and writes those that changed. The write is a
//! full replace at the cached resourceVersion: if an eviction spent a
//! unit meanwhile, the write conflicts and the next pass starts from the
//! budget as the eviction left it. Pods an eviction recorded in
//! `disruptedPods` do not count as healthy until their deletion shows
//! (or [`DISRUPTED_POD_TIMEOUT_SECS`] pass).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PostParams};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::api::disruption::{self, DISRUPTED_POD_TIMEOUT_SECS};
use crate::api::workload::selector_matches;

/// A pass at least this often, for disruptedPods that time out.
const RESYNC: Duration = Duration::from_secs(5);

/// The status `pdb` should have, given the pods and ReplicaSets of its
/// namespace (as JSON) and the time now. Conditions keep their
/// transition time while their status holds.
pub fn status(pdb: &Value, pods: &[Value], replica_sets: &[Value], now: jiff::Timestamp) -> Value {
    let spec = &pdb["spec"];
    let sel = &spec["selector"];
    let matching: Vec<&Value> = if sel.is_null() {
        Vec::new()
    } else {
        pods.iter()
            .filter(|p| {
                let labels = p["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                selector_matches(sel, &labels)
            })
            .collect()
    };
    let live: HashSet<&str> = matching
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    // Evicted pods whose deletion has not shown yet, and not for too long.
    let disrupted: Map<String, Value> = pdb["status"]["disruptedPods"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, at)| {
            let fresh = at
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .is_some_and(|t| (now - t).get_seconds() < DISRUPTED_POD_TIMEOUT_SECS);
            fresh && live.contains(name.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let healthy = matching
        .iter()
        .filter(|p| disruption::healthy(p))
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_none_or(|n| !disrupted.contains_key(n))
        })
        .count() as i64;
    let expected = if disruption::counts_pods_only(spec) {
        matching.len() as i64
    } else {
        // The scale of the pods' controllers; a pod without one counts
        // as itself.
        let mut owners: HashSet<&str> = HashSet::new();
        let mut n = 0;
        for p in &matching {
            let controller = p["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["controller"] == true);
            match controller.and_then(|r| r["uid"].as_str()) {
                Some(uid) => {
                    if owners.insert(uid) {
                        n += replica_sets
                            .iter()
                            .find(|rs| rs["metadata"]["uid"] == uid)
                            .map_or(1, |rs| rs["spec"]["replicas"].as_i64().unwrap_or(1));
                    }
                }
                None => n += 1,
            }
        }
        n
    };
    let b = disruption::budget(spec, healthy, expected);
    let allowed = b.disruptions_allowed > 0;
    let (cond_status, reason, message) = if allowed {
        ("True", "SufficientPods", "")
    } else {
        ("False", "InsufficientPods", "")
    };
    let old_cond = pdb["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "DisruptionAllowed");
    let since = old_cond
        .filter(|c| c["status"] == cond_status)
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or_else(|| json!(now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
    json!({
        "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
        "disruptedPods": disrupted,
        "disruptionsAllowed": b.disruptions_allowed,
        "currentHealthy": b.current_healthy,
        "desiredHealthy": b.desired_healthy,
        "expectedPods": b.expected_pods,
        "conditions": [{
            "type": "DisruptionAllowed", "status": cond_status, "reason": reason,
            "message": message, "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
            "lastTransitionTime": since,
        }],
    })
}

/// Keep budgets' statuses until the future is dropped.
pub async fn run(client: kube::Client) {
    let wake = Arc::new(Notify::new());
    let pdbs = super::reflect(
        Api::<PodDisruptionBudget>::all(client.clone()),
        wake.clone(),
    );
    let pods = super::reflect(Api::<Pod>::all(client.clone()), wake.clone());
    let sets = super::reflect(Api::<ReplicaSet>::all(client.clone()), wake.clone());
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        // Let a burst of events land first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let budgets = pdbs.state();
        if budgets.is_empty() {
            continue;
        }
        let by_ns = |items: Vec<Value>| {
            let mut m: HashMap<String, Vec<Value>> = HashMap::new();
            for v in items {
                let ns = v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                m.entry(ns).or_default().push(v);
            }
            m
        };
        let pods = by_ns(
            pods.state()
                .iter()
                .filter_map(|p| serde_json::to_value(&**p).ok())
                .collect(),
        );
        let sets = by_ns(
            sets.state()
                .iter()
                .filter_map(|r| serde_json::to_value(&**r).ok())
                .collect(),
        );
        let now = jiff::Timestamp::now();
        for pdb in budgets {
            let Ok(v) = serde_json::to_value(&*pdb) else {
                continue;
            };
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let empty = Vec::new();
            let want = status(
                &v,
                pods.get(&ns).unwrap_or(&empty),
                sets.get(&ns).unwrap_or(&empty),
                now,
            );
            if v["status"] == want {
                continue;
            }
            let mut new = v.clone();
            new["status"] = want;
            let Ok(typed) = serde_json::from_value::<PodDisruptionBudget>(new) else {
                continue;
            };
            let name = v["metadata"]["name"].as_str().unwrap_or("");
            let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
            match api
                .replace_status(name, &PostParams::default(), &typed)
                .await
            {
                Ok(_) => tracing::debug!(pdb = %format!("{ns}/{name}"), "budget status written"),
                // Changed meanwhile (an eviction): its watch event wakes
                // the next pass, which starts from the new status.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => tracing::debug!(error = %e, "writing a budget's status"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, owner: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"},
                "ownerReferences": [{"uid": owner, "controller": true}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
    }

    #[test]
    fn status_counts_healthy_pods_and_spent_disruptions() {
        let now: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let pdb = json!({"metadata": {"name": "web", "generation": 2},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"disruptedPods": {"web-1": "2026-01-01T00:00:30Z", "gone": "2026-01-01T00:00:30Z"}}});
        let pods = [
            pod("web-1", true, "rs"),
            pod("web-2", true, "rs"),
            pod("web-3", false, "rs"),
        ];
        let sets = [json!({"metadata": {"uid": "rs"}, "spec": {"replicas": 3}})];
        let st = status(&pdb, &pods, &sets, now);
        // web-1 was evicted a moment ago: not healthy; web-3 is not ready.
        assert_eq!(st["currentHealthy"], 1);
        assert_eq!(st["desiredHealthy"], 2);
        assert_eq!(st["expectedPods"], 3);
        assert_eq!(st["disruptionsAllowed"], 0);
        assert_eq!(st["observedGeneration"], 2);
        assert_eq!(
            st["disruptedPods"],
            json!({"web-1": "2026-01-01T00:00:30Z"})
        );
        assert_eq!(st["conditions"][0]["reason"], "InsufficientPods");
        // Two minutes on, the record times out and web-1 counts again.
        let later: jiff::Timestamp = "2026-01-01T00:03:00Z".parse().unwrap();
        assert_eq!(status(&pdb, &pods, &sets, later)["disruptionsAllowed"], 0);
        let all_ready = [
            pod("web-1", true, "rs"),
            pod("web-2", true, "rs"),
            pod("web-3", true, "rs"),
        ];
        assert_eq!(
            status(&pdb, &all_ready, &sets, later)["disruptionsAllowed"],
            1
        );
    }
}
