//! `POST /api/v1/namespaces/{ns}/pods/{name}/eviction`: a pod deletion
//! that a PodDisruptionBudget may refuse (what `kubectl drain` uses).
//!
//! As kube-apiserver: pods that are not running (Pending, Succeeded,
//! Failed) or already terminating are deleted without a budget; a pod
//! covered by one budget spends one of its `disruptionsAllowed` (the
//! budget's status is written under a compare on its revision, so two
//! evictions cannot both spend the last unit), else the answer is 429
//! and the client retries. More than one budget is a 500, as upstream.

use serde_json::{json, Value};

use crate::api::disruption;
use crate::api::meta::meta_str;
use crate::api::resources::{by_kind, Kind};
use crate::api::status::ApiError;
use crate::store::{Compare, Txn, TxnOutcome};

use super::objects::{decode, encode, DeleteOpts, Propagation};
use super::Server;

/// Attempts at spending a budget unit when its status changes meanwhile.
const ATTEMPTS: usize = 8;

impl Server {
    /// Evict pod `ns/name` as `eviction` (a policy/v1 Eviction) asks.
    /// Returns the `Status` of success.
    pub async fn evict(&self, ns: &str, name: &str, eviction: Value) -> Result<Value, ApiError> {
        if let Some(n) = meta_str(&eviction, "name").filter(|n| !n.is_empty() && *n != name) {
            return Err(ApiError::bad_request(format!(
                "name in URL does not match name in Eviction object: {name} != {n}"
            )));
        }
        let opts = eviction.get("deleteOptions").cloned().unwrap_or(json!({}));
        let dry_run = opts["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "All"));
        let grace = opts["gracePeriodSeconds"].as_i64();
        let uid = opts
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from);
        let pod_def = by_kind(Kind::Pod);
        let (pod, _) = self.get_object(pod_def, Some(ns), name).await?;
        let phase = pod["status"]["phase"].as_str().unwrap_or("");
        let terminating = pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null());
        if !(terminating || matches!(phase, "Pending" | "Succeeded" | "Failed")) {
            self.spend_budget(ns, name, &pod, dry_run).await?;
        }
        let opts = DeleteOpts {
            preconditions: (uid, None),
            dry_run,
            grace,
            propagation: Propagation::Background,
        };
        self.delete_object_with_grace(pod_def, Some(ns), name, opts)
            .await?;
        Ok(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "code": 201}))
    }

    /// Check the budget covering `pod` and spend one disruption of it.
    async fn spend_budget(
        &self,
        ns: &str,
        name: &str,
        pod: &Value,
        dry_run: bool,
    ) -> Result<(), ApiError> {
        let pdb_def = by_kind(Kind::PodDisruptionBudget);
        let labels = pod["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for _ in 0..ATTEMPTS {
            let list = self.list(pdb_def, Some(ns), &Default::default()).await?;
            let mut covering: Vec<Value> = list
                .items
                .into_iter()
                .filter(|p| {
                    let sel = &p["spec"]["selector"];
                    !sel.is_null() && crate::api::workload::selector_matches(sel, &labels)
                })
                .collect();
            let mut pdb = match covering.len() {
                0 => return Ok(()),
                1 => covering.remove(0),
                _ => {
                    return Err(ApiError::internal(
                        "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                    ))
                }
            };
            let st = &pdb["status"];
            // An unhealthy pod may go while the budget is met without it
            // (unhealthyPodEvictionPolicy IfHealthyBudget, the default).
            if !disruption::healthy(pod)
                && st["currentHealthy"].as_i64().unwrap_or(0)
                    >= st["desiredHealthy"].as_i64().unwrap_or(0)
            {
                return Ok(());
            }
            if let Some(why) = disruption::refusal(&pdb) {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                e.details =
                    Some(json!({"causes": [{"reason": "DisruptionBudget", "message": why}]}));
                return Err(e);
            }
            if dry_run {
                return Ok(());
            }
            let pdb_name = meta_str(&pdb, "name").unwrap_or("").to_string();
            let key = pdb_def.key(Some(ns), &pdb_name);
            let Some(kv) = self.store.get(&key).await? else {
                continue;
            };
            pdb = decode(&kv)?;
            if disruption::refusal(&pdb).is_some() {
                continue;
            }
            let allowed = pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
            pdb["status"]["disruptionsAllowed"] = json!(allowed - 1);
            if !pdb["status"]["disruptedPods"].is_object() {
                pdb["status"]["disruptedPods"] = json!({});
            }
            pdb["status"]["disruptedPods"][name] = json!(crate::api::meta::now());
            let txn = Txn::new()
                .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                .put(&key, encode(&pdb));
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                return Ok(());
            }
        }
        Err(ApiError::new(
            429,
            "TooManyRequests",
            "Cannot evict pod as the disruption budget changes too often; try again.",
        ))
    }
}
