//! PodDisruptionBudgets (`policy/v1`) without HTTP: validation, the budget
//! the disruption controller writes to a PDB's status, and the check the
//! `pods/eviction` subresource makes against it.
//!
//! The split follows Kubernetes: the controller computes
//! `status.disruptionsAllowed` from the pods it sees; an eviction spends
//! one unit of it (recording the pod in `status.disruptedPods`, so that
//! the controller does not count the pod as healthy again before its
//! deletion shows) in the same store transaction check as the PDB it read.

use serde_json::Value;

use super::status::FieldError;

/// How long an evicted pod stays in `status.disruptedPods` (counted as
/// not healthy) if its deletion never shows: kube-controller-manager's
/// `DeletionTimeout`.
pub const DISRUPTED_POD_TIMEOUT_SECS: i64 = 120;

/// An int-or-percent's value against `total` (`round_up` for ceilings).
/// `None` for a malformed value.
pub fn scaled(v: &Value, total: i64, round_up: bool) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let p: i64 = s.strip_suffix('%')?.parse().ok()?;
            let x = p * total;
            Some(if round_up { (x + 99) / 100 } else { x / 100 })
        }
        _ => None,
    }
}

/// Field errors of a PodDisruptionBudget.
pub fn validate_pdb(obj: &Value) -> Vec<FieldError> {
    let spec = &obj["spec"];
    let mut errs = Vec::new();
    let (min, max) = (&spec["minAvailable"], &spec["maxUnavailable"]);
    if !min.is_null() && !max.is_null() {
        errs.push(FieldError::invalid(
            "spec",
            "\"{...}\"",
            "minAvailable and maxUnavailable cannot be both set",
        ));
    }
    for (field, v) in [("minAvailable", min), ("maxUnavailable", max)] {
        let path = format!("spec.{field}");
        match v {
            Value::Null => {}
            Value::Number(n) if n.as_i64().is_some_and(|n| n < 0) => errs.push(
                FieldError::invalid(path, n, "must be greater than or equal to 0"),
            ),
            Value::Number(_) => {}
            Value::String(s) => match s.strip_suffix('%').map(str::parse::<i64>) {
                Some(Ok(p)) if p > 100 => errs.push(FieldError::invalid(
                    path,
                    format!("{s:?}"),
                    "must not be greater than 100%",
                )),
                Some(Ok(p)) if p >= 0 => {}
                _ => errs.push(FieldError::invalid(
                    path,
                    format!("{s:?}"),
                    "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')",
                )),
            },
            other => errs.push(FieldError::invalid(path, other, "must be an integer or a percentage")),
        }
    }
    errs
}

/// A pod that counts toward a budget's health: Ready and not being
/// deleted.
pub fn healthy(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp")
        .is_none_or(Value::is_null)
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// What a budget allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub expected_pods: i64,
    pub desired_healthy: i64,
    pub current_healthy: i64,
    pub disruptions_allowed: i64,
}

/// The budget of a PDB `spec`, with `healthy` pods counted and
/// `expected` pods wanted (the controllers' replicas; for an integer
/// `minAvailable`, Kubernetes uses the matching pods' count instead, and
/// so does the caller).
pub fn budget(spec: &Value, healthy: i64, expected: i64) -> Budget {
    let desired = if !spec["maxUnavailable"].is_null() {
        let max = scaled(&spec["maxUnavailable"], expected, true).unwrap_or(0);
        (expected - max).max(0)
    } else if !spec["minAvailable"].is_null() {
        scaled(&spec["minAvailable"], expected, true).unwrap_or(0)
    } else {
        0
    };
    Budget {
        expected_pods: expected,
        desired_healthy: desired,
        current_healthy: healthy,
        disruptions_allowed: (healthy - desired).max(0),
    }
}

/// Whether an integer `minAvailable` (no controllers' scale needed).
pub fn counts_pods_only(spec: &Value) -> bool {
    spec["maxUnavailable"].is_null() && spec["minAvailable"].is_i64()
}

/// Why an eviction is refused by `pdb`'s status, or `None` when it may
/// spend one disruption. The message is kube-apiserver's.
pub fn refusal(pdb: &Value) -> Option<String> {
    let gen = pdb["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = pdb["status"]["observedGeneration"].as_i64().unwrap_or(0);
    let name = pdb["metadata"]["name"].as_str().unwrap_or("");
    if observed < gen || pdb["status"]["disruptionsAllowed"].is_null() {
        return Some(format!(
            "The disruption budget {name} is still being processed by the server."
        ));
    }
    let allowed = pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
    if allowed <= 0 {
        return Some(format!(
            "The disruption budget {name} needs {} healthy pods and has {} currently",
            pdb["status"]["desiredHealthy"].as_i64().unwrap_or(0),
            pdb["status"]["currentHealthy"].as_i64().unwrap_or(0)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn budgets_count_as_kubernetes_does() {
        let min2 = json!({"minAvailable": 2});
        assert_eq!(budget(&min2, 3, 3).disruptions_allowed, 1);
        assert_eq!(budget(&min2, 2, 3).disruptions_allowed, 0);
        let max1 = json!({"maxUnavailable": 1});
        assert_eq!(budget(&max1, 3, 3).desired_healthy, 2);
        assert_eq!(budget(&max1, 2, 3).disruptions_allowed, 0);
        // 50% of 3 rounds up: 2 may be unavailable, 1 must stay.
        let half = json!({"maxUnavailable": "50%"});
        assert_eq!(budget(&half, 3, 3).desired_healthy, 1);
        let min_half = json!({"minAvailable": "50%"});
        assert_eq!(budget(&min_half, 3, 3).desired_healthy, 2);
        assert!(counts_pods_only(&min2) && !counts_pods_only(&half));
    }

    #[test]
    fn invalid_budgets_are_named() {
        let both = json!({"spec": {"minAvailable": 1, "maxUnavailable": 1}});
        assert_eq!(
            validate_pdb(&both)[0].message,
            "spec: Invalid value: \"{...}\": minAvailable and maxUnavailable cannot be both set"
        );
        let errs = validate_pdb(&json!({"spec": {"minAvailable": -1, "maxUnavailable": "150%"}}));
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec", "spec.minAvailable", "spec.maxUnavailable"]);
        assert!(validate_pdb(&json!({"spec": {"maxUnavailable": "25%"}})).is_empty());
    }

    #[test]
    fn evictions_wait_for_a_current_status_with_room() {
        let pdb = |gen: i64, observed: i64, allowed: i64| {
            json!({"metadata": {"name": "web", "generation": gen},
                "status": {"observedGeneration": observed, "disruptionsAllowed": allowed,
                    "desiredHealthy": 2, "currentHealthy": 2}})
        };
        assert_eq!(refusal(&pdb(1, 1, 1)), None);
        assert_eq!(
            refusal(&pdb(1, 1, 0)).unwrap(),
            "The disruption budget web needs 2 healthy pods and has 2 currently"
        );
        assert!(refusal(&pdb(2, 1, 1))
            .unwrap()
            .contains("still being processed"));
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(healthy(&ready));
        let mut going = ready.clone();
        going["metadata"] = json!({"deletionTimestamp": "2026-01-01T00:00:00Z"});
        assert!(!healthy(&going));
    }
}
