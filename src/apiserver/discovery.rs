//! Discovery documents (`/version`, `/api`, `/apis`, `/api/v1`,
//! `/apis/<group>/<version>`), built from the resource table. kubectl reads
//! them to map `svc` to `services` in `v1`, to know what is namespaced, and
//! to expand `kubectl get all`.
//!
//! Aggregated discovery (apidiscovery.k8s.io/v2) is not served: clients ask
//! for it first in `Accept` and fall back to these documents when the server
//! answers with plain JSON.

use serde_json::{json, Value};

use crate::api::resources::{self, Kind, RESOURCES};

use super::Config;

/// The Kubernetes version we speak (the k8s-openapi feature we build with).
pub const KUBE_MINOR: &str = "33";

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0-fairlead.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "n/a (rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a }),
    })
}

/// What a review answers (see `rest.rs`'s `review`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewKind {
    /// May the requester do this (`kubectl auth can-i VERB RESOURCE`)?
    SelfAccess,
    /// What may the requester do in a namespace (`kubectl auth can-i --list`)?
    SelfRules,
    /// Who is the requester (`kubectl auth whoami`)?
    WhoAmI,
    /// May a given user do this (admins, webhooks; a local review within
    /// its namespace)?
    Access,
}

/// A create-only resource that is answered, never stored.
#[derive(Debug)]
pub struct ReviewDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub review: ReviewKind,
}

const fn review_def(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    review: ReviewKind,
) -> ReviewDef {
    ReviewDef {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        review,
    }
}

/// The reviews served next to the resource table, in discovery too (so
/// `kubectl api-resources` lists them).
pub static REVIEWS: &[ReviewDef] = &[
    review_def(
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        false,
        ReviewKind::SelfAccess,
    ),
    review_def(
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "SelfSubjectRulesReview",
        false,
        ReviewKind::SelfRules,
    ),
    review_def(
        "authorization.k8s.io",
        "subjectaccessreviews",
        "SubjectAccessReview",
        false,
        ReviewKind::Access,
    ),
    review_def(
        "authorization.k8s.io",
        "localsubjectaccessreviews",
        "LocalSubjectAccessReview",
        true,
        ReviewKind::Access,
    ),
    review_def(
        "authentication.k8s.io",
        "selfsubjectreviews",
        "SelfSubjectReview",
        false,
        ReviewKind::WhoAmI,
    ),
];

/// The review served at `group`/`version`/`plural`.
pub fn review(group: &str, version: &str, plural: &str) -> Option<&'static ReviewDef> {
    REVIEWS
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Every (group, version) served: the resource table's, then the reviews'.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out = resources::group_versions();
    for r in REVIEWS {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// `/api`.
pub fn api_versions(config: &Config) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{
            "clientCIDR": "0.0.0.0/0",
            "serverAddress": format!("{}:{}", config.advertise_address(), config.secure_port),
        }],
    })
}

fn group_entry(group: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(json!({})),
    })
}

/// `/apis`: every named group.
pub fn group_list() -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in group_versions() {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups.into_iter().map(group_entry).collect::<Vec<_>>(),
    })
}

/// `/apis/<group>`.
pub fn group(group: &str) -> Option<Value> {
    if group.is_empty() || !group_versions().iter().any(|(g, _)| *g == group) {
        return None;
    }
    let mut v = group_entry(group);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

/// `/api/v1` or `/apis/<group>/<version>`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let defs: Vec<_> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    let mut list: Vec<Value> = REVIEWS
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({"name": r.plural, "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["create"]})
        })
        .collect();
    if defs.is_empty() && list.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    for r in &defs {
        let mut verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        if r.plural == "namespaces" {
            verbs.retain(|v| *v != "deletecollection");
        }
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind_name,
            "verbs": verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        if r.has_status {
            list.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind_name,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if matches!(r.kind, Kind::ReplicaSet | Kind::Deployment) {
            list.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.kind == Kind::ServiceAccount {
            // `kubectl create token`.
            list.push(json!({
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": true,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
        if r.kind == Kind::Pod {
            for (sub, kind, verbs) in [
                ("binding", "Binding", &["create"][..]),
                ("log", "Pod", &["get"][..]),
            ] {
                list.push(json!({
                    "name": format!("pods/{sub}"),
                    "singularName": "",
                    "namespaced": true,
                    "kind": kind,
                    "verbs": verbs,
                }));
            }
            // kubectl drain looks for this entry (group and version set)
            // before it evicts instead of deleting.
            list.push(json!({
                "name": "pods/eviction",
                "singularName": "",
                "namespaced": true,
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "verbs": ["create"],
            }));
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": list,
    }))
}
