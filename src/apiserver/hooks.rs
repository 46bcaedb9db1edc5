//! Kind-specific rules, applied by the object layer on create and update.
//! Everything else about a kind is data in the resource table.

use serde_json::{json, Value};

use crate::api::meta::{dns1123_label_error, dns1123_subdomain_error, meta_str};
use crate::api::resources::{Kind, ResourceDef};
use crate::api::service;
use crate::api::status::{ApiError, FieldError};

use super::Server;

fn name_errors(def: &ResourceDef, obj: &Value) -> Vec<FieldError> {
    let name = meta_str(obj, "name").unwrap_or("");
    let err = match def.kind {
        // Service names are checked (as DNS-1035 labels) by its validation.
        Kind::Service => None,
        Kind::Namespace => dns1123_label_error(name),
        // RBAC names are path segments (`system:node`), as in kube.
        Kind::Role | Kind::ClusterRole | Kind::RoleBinding | Kind::ClusterRoleBinding => {
            if matches!(name, "." | "..") || name.contains(['/', '%']) {
                Some(format!(
                    "may not be '.' or '..' and may not contain '/' or '%': {name}"
                ))
            } else if name.is_empty() {
                Some("name or generateName is required".into())
            } else {
                None
            }
        }
        _ => dns1123_subdomain_error(name),
    };
    err.map(|e| {
        vec![FieldError::invalid(
            "metadata.name",
            format!("{name:?}"),
            &e,
        )]
    })
    .unwrap_or_default()
}

fn kind_errors(srv: &Server, def: &ResourceDef, obj: &Value) -> Vec<FieldError> {
    match def.kind {
        Kind::Service => service::validate_service(obj, &srv.config.service_cidr),
        Kind::Pod => crate::api::pod::validate_pod(obj),
        Kind::ReplicaSet => crate::api::workload::validate_workload(obj, false),
        Kind::Deployment => crate::api::workload::validate_workload(obj, true),
        Kind::PodDisruptionBudget => crate::api::disruption::validate_pdb(obj),
        Kind::RoleBinding | Kind::ClusterRoleBinding => binding_errors(def.kind, obj),
        Kind::CertificateSigningRequest => {
            let mut errs = Vec::new();
            let spec = &obj["spec"];
            if spec["request"].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required("spec.request", ""));
            }
            if spec["signerName"].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required("spec.signerName", ""));
            }
            errs
        }
        Kind::EndpointSlice => {
            let mut errs = Vec::new();
            match obj.get("addressType").and_then(Value::as_str) {
                None => errs.push(FieldError::required("addressType", "")),
                Some(t) if !["IPv4", "IPv6", "FQDN"].contains(&t) => errs.push(
                    FieldError::not_supported("addressType", t, &["FQDN", "IPv4", "IPv6"]),
                ),
                Some(_) => {}
            }
            if let Some(eps) = obj.get("endpoints").and_then(Value::as_array) {
                for (i, ep) in eps.iter().enumerate() {
                    let n = ep
                        .get("addresses")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    if n == 0 {
                        errs.push(FieldError::required(
                            format!("endpoints[{i}].addresses"),
                            "must contain at least 1 address",
                        ));
                    }
                }
            }
            errs
        }
        _ => Vec::new(),
    }
}

fn check(srv: &Server, def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let mut errs = name_errors(def, obj);
    errs.extend(kind_errors(srv, def, obj));
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            def.kind_name,
            meta_str(obj, "name").unwrap_or(""),
            errs,
        ))
    }
}

/// Defaulting and validation of a new object.
pub fn before_create(srv: &Server, def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    match def.kind {
        Kind::Service => {
            obj["status"] = json!({"loadBalancer": {}});
            service::default_service(obj);
        }
        Kind::Namespace => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
            // Kubernetes labels every namespace with its own name.
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            let m = crate::api::meta::meta_mut(obj);
            if !m.get("labels").is_some_and(Value::is_object) {
                m.insert("labels".into(), json!({}));
            }
            m["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        Kind::Pod => {
            obj["status"] = json!({"phase": "Pending"});
            crate::api::pod::default_pod(obj);
            crate::api::pod::default_tolerations(obj, srv.config.default_toleration_seconds);
        }
        Kind::ReplicaSet | Kind::Deployment => {
            obj["status"] = json!({});
            crate::api::workload::default_workload(obj, def.kind == Kind::Deployment);
        }
        Kind::Secret => fold_string_data(obj),
        Kind::CertificateSigningRequest => {
            // Only the signer sets the status.
            obj["status"] = json!({});
        }
        _ => {}
    }
    check(srv, def, obj)
}

/// A Secret's `type` defaults to `Opaque`; its `stringData` is write-only
/// convenience: merged into `data` (base64), over keys of the same name,
/// and never stored.
fn fold_string_data(obj: &mut Value) {
    use base64::Engine;
    // kube-apiserver's default type.
    if obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        obj["type"] = json!("Opaque");
    }
    let Some(Value::Object(strings)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !obj.get("data").is_some_and(Value::is_object) {
        obj["data"] = json!({});
    }
    for (k, v) in strings {
        let text = v.as_str().unwrap_or_default();
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// Defaulting and validation of a changed object (`old` is the stored one).
pub fn before_update(
    srv: &Server,
    def: &ResourceDef,
    old: &Value,
    new: &mut Value,
) -> Result<(), ApiError> {
    match def.kind {
        Kind::Service => {
            service::carry_over_allocations(old, new);
            service::default_service(new);
            let mut errs = service::validate_service_update(old, new);
            errs.extend(name_errors(def, new));
            errs.extend(kind_errors(srv, def, new));
            if !errs.is_empty() {
                return Err(ApiError::invalid(
                    def.kind_name,
                    meta_str(new, "name").unwrap_or(""),
                    errs,
                ));
            }
            return Ok(());
        }
        Kind::Namespace => {
            // spec.finalizers changes only through finalization.
            new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
            let name = meta_str(new, "name").unwrap_or("").to_string();
            let m = crate::api::meta::meta_mut(new);
            if !m.get("labels").is_some_and(Value::is_object) {
                m.insert("labels".into(), json!({}));
            }
            m["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        Kind::ReplicaSet | Kind::Deployment => {
            crate::api::workload::default_workload(new, def.kind == Kind::Deployment);
        }
        Kind::Secret => fold_string_data(new),
        Kind::CertificateSigningRequest => {
            // The request and who made it never change.
            new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
        }
        Kind::RoleBinding | Kind::ClusterRoleBinding if old["roleRef"] != new["roleRef"] => {
            return Err(ApiError::invalid(
                def.kind_name,
                meta_str(new, "name").unwrap_or(""),
                vec![FieldError::invalid(
                    "roleRef",
                    new["roleRef"].to_string(),
                    "cannot change roleRef",
                )],
            ));
        }
        Kind::Node => {
            let errs = node_update_errors(old, new);
            if !errs.is_empty() {
                return Err(ApiError::invalid(
                    def.kind_name,
                    meta_str(new, "name").unwrap_or(""),
                    errs,
                ));
            }
        }
        _ => {}
    }
    check(srv, def, new)
}

/// A binding names a role of a kind it may bind (a ClusterRoleBinding
/// only ClusterRoles) and subjects of known kinds, as kube validates them.
fn binding_errors(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let r = &obj["roleRef"];
    let allowed: &[&str] = if kind == Kind::ClusterRoleBinding {
        &["ClusterRole"]
    } else {
        &["Role", "ClusterRole"]
    };
    match r["kind"].as_str() {
        None | Some("") => errs.push(FieldError::required("roleRef.kind", "")),
        Some(k) if !allowed.contains(&k) => {
            errs.push(FieldError::not_supported("roleRef.kind", k, allowed))
        }
        Some(_) => {}
    }
    if r["name"].as_str().is_none_or(str::is_empty) {
        errs.push(FieldError::required("roleRef.name", ""));
    }
    if r["apiGroup"].as_str() != Some("rbac.authorization.k8s.io") {
        errs.push(FieldError::not_supported(
            "roleRef.apiGroup",
            r["apiGroup"].as_str().unwrap_or(""),
            &["rbac.authorization.k8s.io"],
        ));
    }
    for (i, s) in obj["subjects"].as_array().into_iter().flatten().enumerate() {
        let kinds = ["User", "Group", "ServiceAccount"];
        match s["kind"].as_str() {
            Some(k) if kinds.contains(&k) => {}
            k => errs.push(FieldError::not_supported(
                format!("subjects[{i}].kind"),
                k.unwrap_or(""),
                &kinds,
            )),
        }
        if s["name"].as_str().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("subjects[{i}].name"), ""));
        }
        if s["kind"] == "ServiceAccount" && s["namespace"].as_str().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("subjects[{i}].namespace"), ""));
        }
    }
    errs
}

/// A Node's pod range is set once (by node IPAM or the agent's
/// `--pod-cidr`) and then fixed, as kube-apiserver rules: pods hold
/// addresses from it, so a writer acting on a stale view must be refused,
/// not allowed to move the range under them.
fn node_update_errors(old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for field in ["podCIDR", "podCIDRs"] {
        let was = &old["spec"][field];
        let set = match was {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        if set && new["spec"][field] != *was {
            errs.push(FieldError::forbidden(
                format!("spec.{field}"),
                "node updates may not change podCIDR except from \"\" to valid",
            ));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_range_is_set_once() {
        let none = json!({"spec": {}});
        let a = json!({"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}});
        let b = json!({"spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}});
        assert!(
            node_update_errors(&none, &a).is_empty(),
            "from unset to set"
        );
        assert!(node_update_errors(&a, &a).is_empty(), "unchanged");
        let errs = node_update_errors(&a, &b);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(node_update_errors(&a, &none).len(), 2, "cleared");
        let empty = json!({"spec": {"podCIDR": ""}});
        assert!(
            node_update_errors(&empty, &b).is_empty(),
            "from \"\" to set"
        );
    }
}
