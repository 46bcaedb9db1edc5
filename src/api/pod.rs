//! Pod defaulting and validation, the parts the node agent relies on (as
//! kube-apiserver does them): restart policy, DNS policy, scheduler name,
//! grace period and probe timings get their defaults; containers need
//! unique DNS-1123 names and an image; ports, probes and the restart
//! policy must make sense. Errors are field errors, so a bad Pod is a 422
//! `Invalid` Status naming every offending field.

use serde_json::{json, Value};

use crate::api::meta::dns1123_label_error;
use crate::api::status::FieldError;

/// The container lists of a Pod spec.
const CONTAINER_LISTS: [&str; 2] = ["initContainers", "containers"];

/// The probes of a container.
const PROBES: [&str; 3] = ["livenessProbe", "readinessProbe", "startupProbe"];

/// Fill in what Kubernetes defaults in a Pod (only where absent).
pub fn default_pod(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("securityContext", json!({})),
    ] {
        spec.entry(k).or_insert(v);
    }
    for list in CONTAINER_LISTS {
        let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            let latest = c
                .get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
            c.entry("imagePullPolicy").or_insert(json!(if latest {
                "Always"
            } else {
                "IfNotPresent"
            }));
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert(json!("TCP"));
                }
            }
            for probe in PROBES {
                if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
                    for (k, v) in [
                        ("timeoutSeconds", 1),
                        ("periodSeconds", 10),
                        ("successThreshold", 1),
                        ("failureThreshold", 3),
                    ] {
                        p.entry(k).or_insert(json!(v));
                    }
                }
            }
        }
    }
}

/// The taint a node gets when its Ready condition is False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint a node gets when it stops reporting (Ready Unknown).
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// Give a new Pod NoExecute tolerations of the not-ready and unreachable
/// taints for `(not_ready, unreachable)` seconds, unless it tolerates them
/// already (kube-apiserver's DefaultTolerationSeconds admission): its
/// pods leave a dead node after that long.
pub fn default_tolerations(obj: &mut Value, (not_ready, unreachable): (i64, i64)) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let tols = spec.entry("tolerations").or_insert_with(|| json!([]));
    if !tols.is_array() {
        *tols = json!([]);
    }
    let tols = tols.as_array_mut().expect("an array");
    for (key, secs) in [
        (NOT_READY_TAINT, not_ready),
        (UNREACHABLE_TAINT, unreachable),
    ] {
        let has = tols.iter().any(|t| {
            (t["key"] == key
                || t["key"].as_str().is_none_or(str::is_empty) && t["operator"] == "Exists")
                && (t["effect"] == "NoExecute" || t["effect"].as_str().is_none_or(str::is_empty))
        });
        if !has {
            tols.push(
                json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                "tolerationSeconds": secs}),
            );
        }
    }
}

/// Every field error of a Pod (after [`default_pod`]).
pub fn validate_pod(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    match spec.get("containers").and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {}
        _ => errs.push(FieldError::required("spec.containers", "")),
    }
    let mut names = std::collections::BTreeSet::new();
    for list in CONTAINER_LISTS {
        let cs = spec.get(list).and_then(Value::as_array);
        for (i, c) in cs.into_iter().flatten().enumerate() {
            let at = format!("spec.{list}[{i}]");
            container_errors(c, &at, list, &mut names, &mut errs);
        }
    }
    if let Some(p) = spec.get("restartPolicy").and_then(Value::as_str) {
        if !["Always", "OnFailure", "Never"].contains(&p) {
            errs.push(FieldError::not_supported(
                "spec.restartPolicy",
                p,
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
    if let Some(g) = spec.get("terminationGracePeriodSeconds") {
        if g.as_i64().is_none_or(|g| g < 0) {
            errs.push(FieldError::invalid(
                "spec.terminationGracePeriodSeconds",
                g,
                "must be greater than or equal to 0",
            ));
        }
    }
    errs
}

fn container_errors(
    c: &Value,
    at: &str,
    list: &str,
    names: &mut std::collections::BTreeSet<String>,
    errs: &mut Vec<FieldError>,
) {
    match c.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(format!("{at}.name"), "")),
        Some(n) => {
            if let Some(e) = dns1123_label_error(n) {
                errs.push(FieldError::invalid(
                    format!("{at}.name"),
                    format!("{n:?}"),
                    &e,
                ));
            }
            if !names.insert(n.to_string()) {
                errs.push(FieldError::duplicate(
                    format!("{at}.name"),
                    format!("{n:?}"),
                ));
            }
        }
    }
    if c.get("image")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errs.push(FieldError::required(format!("{at}.image"), ""));
    }
    // Images are not fetched, so only the `fairlead` image has an
    // entrypoint; every other container must say what it runs.
    let has_command = c
        .get("command")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    if !has_command && !image.is_empty() && !crate::kubelet::runtime::is_self_image(image) {
        errs.push(FieldError::required(
            format!("{at}.command"),
            "images are not fetched on fairlead nodes, so a container needs a command \
             (only the image \"fairlead\" has an entrypoint)",
        ));
    }
    for (j, p) in c
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let pat = format!("{at}.ports[{j}]");
        let port = p.get("containerPort");
        if port
            .and_then(Value::as_i64)
            .is_none_or(|n| !(1..=65535).contains(&n))
        {
            errs.push(FieldError::invalid(
                format!("{pat}.containerPort"),
                port.unwrap_or(&Value::Null),
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
            if !["TCP", "UDP", "SCTP"].contains(&proto) {
                errs.push(FieldError::not_supported(
                    format!("{pat}.protocol"),
                    proto,
                    &["SCTP", "TCP", "UDP"],
                ));
            }
        }
    }
    for probe in PROBES {
        let Some(p) = c.get(probe) else { continue };
        let pat = format!("{at}.{probe}");
        if list == "initContainers" {
            errs.push(FieldError::forbidden(
                &pat,
                "may not be set for init containers",
            ));
            continue;
        }
        for field in [
            "initialDelaySeconds",
            "timeoutSeconds",
            "periodSeconds",
            "successThreshold",
            "failureThreshold",
        ] {
            if let Some(v) = p.get(field) {
                if v.as_i64().is_none_or(|n| n < 0) {
                    errs.push(FieldError::invalid(
                        format!("{pat}.{field}"),
                        v,
                        "must be greater than or equal to 0",
                    ));
                }
            }
        }
        if probe != "readinessProbe" {
            if let Some(s) = p.get("successThreshold").and_then(Value::as_i64) {
                if s != 1 {
                    errs.push(FieldError::invalid(
                        format!("{pat}.successThreshold"),
                        s,
                        "must be 1",
                    ));
                }
            }
        }
        let handlers = ["exec", "httpGet", "tcpSocket", "grpc"]
            .iter()
            .filter(|h| p.get(**h).is_some())
            .count();
        if handlers == 0 {
            errs.push(FieldError::required(&pat, "must specify a handler type"));
        } else if handlers > 1 {
            errs.push(FieldError::forbidden(
                &pat,
                "may not specify more than 1 handler type",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        let mut p =
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec});
        default_pod(&mut p);
        p
    }

    fn fields(errs: &[FieldError]) -> Vec<&str> {
        errs.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn defaults_fill_what_is_absent() {
        let p = pod(json!({"containers": [{"name": "c", "image": "fairlead",
            "ports": [{"containerPort": 80}],
            "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 2}}]}));
        assert!(validate_pod(&p).is_empty());
        let s = &p["spec"];
        assert_eq!(s["restartPolicy"], "Always");
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        assert_eq!(s["schedulerName"], "default-scheduler");
        assert_eq!(s["terminationGracePeriodSeconds"], 30);
        let c = &s["containers"][0];
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["readinessProbe"]["periodSeconds"], 2);
        assert_eq!(c["readinessProbe"]["failureThreshold"], 3);
    }

    #[test]
    fn nonsense_is_named_field_by_field() {
        let p = pod(json!({
            "restartPolicy": "Sometimes",
            "terminationGracePeriodSeconds": -1,
            "containers": [
                {"name": "Web", "image": "x", "ports": [{"containerPort": 0, "protocol": "ICMP"}],
                 "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": -5,
                     "successThreshold": 2},
                 "readinessProbe": {"periodSeconds": 1}},
                {"name": "Web", "image": ""},
            ],
        }));
        let errs = validate_pod(&p);
        assert_eq!(
            fields(&errs),
            [
                "spec.containers[0].name",
                "spec.containers[0].command",
                "spec.containers[0].ports[0].containerPort",
                "spec.containers[0].ports[0].protocol",
                "spec.containers[0].livenessProbe.periodSeconds",
                "spec.containers[0].livenessProbe.successThreshold",
                "spec.containers[0].readinessProbe",
                "spec.containers[1].name",
                "spec.containers[1].name",
                "spec.containers[1].image",
                "spec.restartPolicy",
                "spec.terminationGracePeriodSeconds",
            ],
            "{:#?}",
            errs.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        assert!(errs[4]
            .message
            .contains("must be greater than or equal to 0"));
        assert_eq!(
            fields(&validate_pod(&pod(json!({"containers": []})))),
            ["spec.containers"]
        );
    }
}
