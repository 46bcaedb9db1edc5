//! ReplicaSet and Deployment rules that need no HTTP: defaults,
//! validation, and label selectors as JSON (`matchLabels`,
//! `matchExpressions`), which the API server and the controllers share.

use serde_json::{json, Map, Value};

use super::pod::{default_pod, validate_pod};
use super::selector::LabelSelector;
use super::status::FieldError;

/// Whether the JSON LabelSelector `sel` selects `labels`, judged by the
/// API server's own label selector (from [`selector_string`]). An empty
/// selector selects everything (callers that forbid it check first).
pub fn selector_matches(sel: &Value, labels: &Map<String, Value>) -> bool {
    LabelSelector::parse(&selector_string(sel))
        .is_ok_and(|s| s.matches(Some(&Value::Object(labels.clone()))))
}

/// The selector as a `labelSelector` query string (`a=b,c in (d,e)`).
pub fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

/// Defaults of a ReplicaSet or Deployment (`deployment` for the latter's
/// strategy, history and deadline) and of its pod template.
pub fn default_workload(obj: &mut Value, deployment: bool) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("replicas").or_insert(json!(1));
    if deployment {
        let strategy = spec.entry("strategy").or_insert(json!({}));
        if !strategy.is_object() {
            *strategy = json!({});
        }
        if strategy.get("type").is_none_or(Value::is_null) {
            strategy["type"] = json!("RollingUpdate");
        }
        if spec["strategy"]["type"] == "RollingUpdate" {
            let ru = &mut spec["strategy"]["rollingUpdate"];
            if !ru.is_object() {
                *ru = json!({});
            }
            let ru = ru.as_object_mut().expect("an object");
            ru.entry("maxSurge").or_insert(json!("25%"));
            ru.entry("maxUnavailable").or_insert(json!("25%"));
        }
        spec.entry("revisionHistoryLimit").or_insert(json!(10));
        spec.entry("progressDeadlineSeconds").or_insert(json!(600));
    }
    if let Some(t) = spec.get_mut("template") {
        let mut pod = json!({"spec": t.get("spec").cloned().unwrap_or(json!({}))});
        default_pod(&mut pod);
        t["spec"] = pod["spec"].take();
    }
}

/// Validation of a ReplicaSet or Deployment.
pub fn validate_workload(obj: &Value, deployment: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    if let Some(r) = spec.get("replicas") {
        if r.as_i64().is_none_or(|r| r < 0) {
            errs.push(FieldError::invalid(
                "spec.replicas",
                r,
                "must be greater than or equal to 0",
            ));
        }
    }
    let sel = &spec["selector"];
    let empty = sel["matchLabels"].as_object().is_none_or(|m| m.is_empty())
        && sel["matchExpressions"]
            .as_array()
            .is_none_or(|e| e.is_empty());
    if empty {
        errs.push(FieldError::required("spec.selector", ""));
    }
    let labels = spec["template"]["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if !empty && !selector_matches(sel, &labels) {
        errs.push(FieldError::invalid(
            "spec.template.metadata.labels",
            Value::Object(labels.clone()),
            "`selector` does not match template `labels`",
        ));
    }
    let template_spec = &spec["template"]["spec"];
    if let Some(p) = template_spec["restartPolicy"].as_str() {
        if p != "Always" {
            errs.push(FieldError::not_supported(
                "spec.template.spec.restartPolicy",
                p,
                &["Always"],
            ));
        }
    }
    let pod = json!({"spec": template_spec});
    for e in validate_pod(&pod) {
        if e.field == "spec.restartPolicy" {
            continue;
        }
        errs.push(FieldError {
            field: format!("spec.template.{}", e.field),
            message: format!("spec.template.{}", e.message),
            ..e
        });
    }
    if deployment {
        let ru = &spec["strategy"]["rollingUpdate"];
        let zero = |v: &Value| match v {
            Value::Number(n) => n.as_i64() == Some(0),
            Value::String(s) => s == "0" || s == "0%",
            _ => false,
        };
        if spec["strategy"]["type"] == "RollingUpdate"
            && zero(&ru["maxUnavailable"])
            && zero(&ru["maxSurge"])
        {
            errs.push(FieldError::invalid(
                "spec.strategy.rollingUpdate.maxUnavailable",
                &ru["maxUnavailable"],
                "may not be 0 when `maxSurge` is 0",
            ));
        }
        match spec["strategy"]["type"].as_str() {
            Some("RollingUpdate") | Some("Recreate") | None => {}
            Some(t) => errs.push(FieldError::not_supported(
                "spec.strategy.type",
                t,
                &["Recreate", "RollingUpdate"],
            )),
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn selectors_match_and_print() {
        let sel = json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]});
        assert!(selector_matches(
            &sel,
            &labels(json!({"app": "web", "tier": "a"}))
        ));
        assert!(!selector_matches(
            &sel,
            &labels(json!({"app": "web", "tier": "c"}))
        ));
        assert!(!selector_matches(
            &sel,
            &labels(json!({"app": "web", "tier": "a", "canary": "1"}))
        ));
        assert_eq!(selector_string(&sel), "app=web,tier in (a,b),!canary");
    }

    #[test]
    fn defaults_and_validation() {
        let mut d = json!({"spec": {"selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "fairlead"}]}}}});
        default_workload(&mut d, true);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        assert!(
            validate_workload(&d, true).is_empty(),
            "{:?}",
            validate_workload(&d, true)
        );

        let bad = json!({"spec": {"replicas": -1, "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}});
        let fields: Vec<String> = validate_workload(&bad, false)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.replicas",
                "spec.template.metadata.labels",
                "spec.template.spec.restartPolicy",
                "spec.template.spec.containers[0].command"
            ]
        );
        let mut stuck = d.clone();
        stuck["spec"]["strategy"]["rollingUpdate"] = json!({"maxSurge": 0, "maxUnavailable": "0%"});
        let errs = validate_workload(&stuck, true);
        assert_eq!(
            errs[0].message,
            "spec.strategy.rollingUpdate.maxUnavailable: Invalid value: \"0%\": may not be 0 when `maxSurge` is 0"
        );
        let none = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "fairlead"}]}}}});
        assert_eq!(validate_workload(&none, false)[0].field, "spec.selector");
    }
}
