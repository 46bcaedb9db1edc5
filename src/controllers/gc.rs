//! The garbage collector: deleting an owner (ownerReferences) deletes or
//! orphans its dependents, as the DeleteOptions' `propagationPolicy` said.
//!
//! - **Background** (the default): the owner goes at once; an object
//!   whose every owner is gone is then deleted here.
//! - **Foreground**: the API server only marks the owner, with the
//!   finalizer `foregroundDeletion`; here its dependents are deleted (in
//!   foreground too, so a Deployment waits for its ReplicaSets' pods),
//!   and once none is left the finalizer goes, and with it the owner.
//! - **Orphan**: the finalizer `orphan`; here each dependent loses its
//!   reference to the owner, then the finalizer goes. The dependents stay.
//!
//! Also here, as each pass sees every pod and ReplicaSet: a pod whose
//! labels no longer match its ReplicaSet's selector is released (its
//! controller reference dropped), so the set replaces it and it lives on
//! by itself (`kubectl label pod <p> app=debug --overwrite`, to take a pod
//! out for debugging).
//!
//! A pass every [`PERIOD`] lists the kinds that are dependents (Pods,
//! ReplicaSets) before the kinds that are owners (ReplicaSets,
//! Deployments): an owner of a listed dependent was created before it,
//! so it is in the owner lists unless it is really gone. Each write
//! carries the resourceVersion it was decided on. The decisions are pure:
//! [`plan`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::Resource;
use serde_json::json;

use crate::api::workload::selector_matches;
use crate::apiserver::objects::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER};

/// How often the collector looks.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The kinds the collector handles, as dependents or owners.
const KINDS: [&str; 3] = ["Pod", "ReplicaSet", "Deployment"];

/// One object of a pass: its kind and metadata (and a ReplicaSet's
/// selector, as JSON).
#[derive(Clone, Debug)]
pub struct Obj {
    pub kind: &'static str,
    pub meta: ObjectMeta,
    pub selector: Option<serde_json::Value>,
}

impl Obj {
    fn uid(&self) -> &str {
        self.meta.uid.as_deref().unwrap_or("")
    }
    fn refs(&self) -> &[OwnerReference] {
        self.meta.owner_references.as_deref().unwrap_or_default()
    }
    fn terminating(&self) -> bool {
        self.meta.deletion_timestamp.is_some()
    }
    fn has_finalizer(&self, f: &str) -> bool {
        self.meta.finalizers.iter().flatten().any(|x| x == f)
    }
}

/// A write the collector makes.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Delete the object (index into the pass's objects), with this
    /// propagation.
    Delete(usize, PropagationPolicy),
    /// Drop its references to the owner of this uid.
    Unown(usize, String),
    /// Remove this finalizer from it.
    Finish(usize, &'static str),
}

/// What one pass does with `objs`: finish foreground and orphaning
/// deletions, and collect objects whose owners are all gone. Owners of
/// kinds outside [`KINDS`] are assumed to exist.
pub fn plan(objs: &[Obj]) -> Vec<Action> {
    let uids: HashSet<&str> = objs.iter().map(Obj::uid).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in objs.iter().enumerate() {
        for r in o.refs() {
            dependents.entry(r.uid.as_str()).or_default().push(i);
        }
    }
    let selectors: HashMap<&str, &serde_json::Value> = objs
        .iter()
        .filter_map(|o| Some((o.uid(), o.selector.as_ref()?)))
        .collect();
    let mut out = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        // A pod whose labels left its ReplicaSet's selector is released
        // (its controller reference dropped), as the ReplicaSet
        // controller does in Kubernetes; the set then replaces it.
        let controller = o.refs().iter().find(|r| r.controller == Some(true));
        if let Some((r, sel)) = controller.and_then(|r| Some((r, selectors.get(r.uid.as_str())?))) {
            let labels: serde_json::Map<String, serde_json::Value> = o
                .meta
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            if o.kind == "Pod" && !o.terminating() && !selector_matches(sel, &labels) {
                out.push(Action::Unown(i, r.uid.clone()));
                continue;
            }
        }
        let deps = dependents
            .get(o.uid())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if o.terminating() && o.has_finalizer(ORPHAN_FINALIZER) {
            out.extend(deps.iter().map(|&d| Action::Unown(d, o.uid().to_string())));
            if deps.is_empty() {
                out.push(Action::Finish(i, ORPHAN_FINALIZER));
            }
        } else if o.terminating() && o.has_finalizer(FOREGROUND_FINALIZER) {
            out.extend(deps.iter().filter(|&&d| !objs[d].terminating()).map(|&d| {
                // Pods have no dependents: no need to wait on them.
                let policy = if objs[d].kind == "Pod" {
                    PropagationPolicy::Background
                } else {
                    PropagationPolicy::Foreground
                };
                Action::Delete(d, policy)
            }));
            if deps.is_empty() {
                out.push(Action::Finish(i, FOREGROUND_FINALIZER));
            }
        }
        let refs = o.refs();
        let owner_gone =
            |r: &OwnerReference| KINDS.contains(&r.kind.as_str()) && !uids.contains(r.uid.as_str());
        if !refs.is_empty() && !o.terminating() && refs.iter().all(owner_gone) {
            out.push(Action::Delete(i, PropagationPolicy::Background));
        }
    }
    out
}

async fn list<K>(
    client: &kube::Client,
    kind: &'static str,
    selector: fn(&K) -> Option<serde_json::Value>,
    out: &mut Vec<Obj>,
) -> bool
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(l) => {
            out.extend(l.items.into_iter().map(|o| Obj {
                kind,
                meta: o.meta().clone(),
                selector: selector(&o),
            }));
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, kind, "garbage collection: listing");
            false
        }
    }
}

/// Apply one action to `o` through the API of its kind.
async fn act<K>(client: &kube::Client, o: &Obj, action: &Action) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let ns = o.meta.namespace.as_deref().unwrap_or_default();
    let name = o.meta.name.as_deref().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let rv = o.meta.resource_version.clone();
    match action {
        Action::Delete(_, policy) => {
            let dp = DeleteParams {
                propagation_policy: Some(policy.clone()),
                preconditions: Some(kube::api::Preconditions {
                    uid: o.meta.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            api.delete(name, &dp).await.map(|_| ())
        }
        Action::Unown(_, owner) => {
            let keep: Vec<&OwnerReference> = o.refs().iter().filter(|r| &r.uid != owner).collect();
            let patch = json!({"metadata": {"resourceVersion": rv, "ownerReferences": keep}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
        }
        Action::Finish(_, finalizer) => {
            let keep: Vec<&String> = o
                .meta
                .finalizers
                .iter()
                .flatten()
                .filter(|f| f != finalizer)
                .collect();
            let patch = json!({"metadata": {"resourceVersion": rv, "finalizers": keep}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
        }
    }
}

/// One pass: list, plan, act.
async fn pass(client: &kube::Client) {
    let mut objs = Vec::new();
    // Dependents first (see the module docs).
    let rs_selector = |rs: &ReplicaSet| {
        serde_json::to_value(&rs.spec.as_ref()?.selector)
            .ok()
            .filter(|s| !s.is_null())
    };
    if !(list::<Pod>(client, "Pod", |_| None, &mut objs).await
        && list::<ReplicaSet>(client, "ReplicaSet", rs_selector, &mut objs).await
        && list::<Deployment>(client, "Deployment", |_| None, &mut objs).await)
    {
        return;
    }
    for action in plan(&objs) {
        let i = match &action {
            Action::Delete(i, _) | Action::Unown(i, _) | Action::Finish(i, _) => *i,
        };
        let o = &objs[i];
        let r = match o.kind {
            "Pod" => act::<Pod>(client, o, &action).await,
            "ReplicaSet" => act::<ReplicaSet>(client, o, &action).await,
            _ => act::<Deployment>(client, o, &action).await,
        };
        let object = format!(
            "{}/{}",
            o.meta.namespace.as_deref().unwrap_or_default(),
            o.meta.name.as_deref().unwrap_or_default()
        );
        match r {
            Ok(()) => {
                tracing::info!(kind = o.kind, object = %object, action = ?action, "garbage collection")
            }
            Err(e) => {
                tracing::debug!(error = %e, kind = o.kind, object = %object, "garbage collection")
            }
        }
    }
}

/// Collect until the future is dropped.
pub async fn run(client: kube::Client) {
    loop {
        pass(&client).await;
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &'static str, uid: &str, owners: &[&str], finalizer: Option<&str>) -> Obj {
        Obj {
            kind,
            meta: ObjectMeta {
                uid: Some(uid.into()),
                owner_references: Some(
                    owners
                        .iter()
                        .map(|o| OwnerReference {
                            kind: "ReplicaSet".into(),
                            uid: o.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                deletion_timestamp: finalizer.map(|_| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
                }),
                finalizers: finalizer.map(|f| vec![f.to_string()]),
                ..Default::default()
            },
            selector: None,
        }
    }

    #[test]
    fn pods_that_leave_the_selector_are_released() {
        let mut rs = obj("ReplicaSet", "rs", &[], None);
        rs.selector = Some(serde_json::json!({"matchLabels": {"app": "web"}}));
        let pod = |app: &str| {
            let mut p = obj("Pod", "p", &["rs"], None);
            p.meta.owner_references.as_mut().unwrap()[0].controller = Some(true);
            p.meta.labels = Some([("app".to_string(), app.to_string())].into());
            p
        };
        assert_eq!(plan(&[pod("web"), rs.clone()]), []);
        assert_eq!(plan(&[pod("debug"), rs]), [Action::Unown(0, "rs".into())]);
    }

    #[test]
    fn background_collects_only_when_every_owner_is_gone() {
        let objs = [
            obj("Pod", "p1", &["gone"], None),
            obj("Pod", "p2", &["gone", "rs"], None),
            obj("Pod", "p3", &[], None),
            obj("ReplicaSet", "rs", &[], None),
        ];
        assert_eq!(
            plan(&objs),
            [Action::Delete(0, PropagationPolicy::Background)]
        );
    }

    #[test]
    fn orphaning_unowns_then_finishes() {
        let objs = [
            obj("Pod", "p1", &["rs"], None),
            obj("ReplicaSet", "rs", &[], Some(ORPHAN_FINALIZER)),
        ];
        assert_eq!(plan(&objs), [Action::Unown(0, "rs".into())]);
        let objs = [obj("Pod", "p1", &[], None), objs[1].clone()];
        assert_eq!(plan(&objs), [Action::Finish(1, ORPHAN_FINALIZER)]);
    }

    #[test]
    fn foreground_deletes_dependents_first() {
        let going = {
            let mut p = obj("Pod", "p2", &["rs"], None);
            p.meta.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::now(),
            ));
            p
        };
        let objs = [
            obj("Pod", "p1", &["rs"], None),
            going,
            obj("ReplicaSet", "rs", &[], Some(FOREGROUND_FINALIZER)),
        ];
        assert_eq!(
            plan(&objs),
            [Action::Delete(0, PropagationPolicy::Background)]
        );
        let objs = [objs[2].clone()];
        assert_eq!(plan(&objs), [Action::Finish(0, FOREGROUND_FINALIZER)]);
    }
}
