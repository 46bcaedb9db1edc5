//! Who may do what: RBAC over the stored Roles, ClusterRoles and bindings.
//!
//! The [`Authorizer`] keeps a compiled [`Policy`] current by listing and
//! watching the four RBAC prefixes of the store (as kube-apiserver's RBAC
//! authorizer reads them through informers): each change recompiles the
//! policy, which is small (tens of roles) and swapped in whole, so a
//! request's check takes a read lock and walks the bindings, never the
//! store. A write of an RBAC object through this server waits until the
//! policy includes it ([`Authorizer::caught_up`]), so `kubectl create
//! rolebinding` followed by the request it allows works at once.
//!
//! Group `system:masters` is allowed everything without consulting the
//! policy, as kube-apiserver's privileged-group authorizer does: the
//! administrator can always repair a broken policy.
//!
//! On first start the server creates the bootstrap policy
//! ([`crate::api::rbac::bootstrap`]); an existing bootstrap object whose
//! `rbac.authorization.kubernetes.io/autoupdate` annotation is `"true"`
//! gets missing rules and subjects added back (kube's reconciliation),
//! and one set to `"false"` is left as the administrator made it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;

use super::Identity;
use crate::api::rbac::{self, Attributes, Decision, Policy, Target};
use crate::api::resources::{by_kind, Kind};
use futures::StreamExt;

use crate::store::{EventKind, Store, WatchItem};

/// The RBAC kinds, in the order the policy is compiled from.
const KINDS: [Kind; 4] = [
    Kind::ClusterRole,
    Kind::Role,
    Kind::ClusterRoleBinding,
    Kind::RoleBinding,
];

/// The live authorizer. See the module docs.
pub struct Authorizer {
    policy: RwLock<Arc<Policy>>,
    /// The highest store revision of each kind the policy includes.
    seen: tokio::sync::watch::Sender<[i64; 4]>,
    /// The store and the compiler's inbox, once [`Authorizer::spawn`]ed.
    feed: std::sync::OnceLock<(Arc<dyn Store>, tokio::sync::mpsc::Sender<Change>)>,
}

impl Default for Authorizer {
    fn default() -> Self {
        Authorizer {
            policy: RwLock::new(Arc::new(Policy::default())),
            seen: tokio::sync::watch::channel([0; 4]).0,
            feed: std::sync::OnceLock::new(),
        }
    }
}

fn in_group(ident: &Identity, group: &str) -> bool {
    ident.groups.iter().any(|g| g == group)
}

impl Authorizer {
    /// The decision for `ident` doing `verb` on `target`.
    pub fn decide(&self, ident: &Identity, verb: &str, target: Target<'_>) -> Decision {
        if in_group(ident, super::tls::ADMIN_GROUP) {
            return Decision::Allowed("RBAC: the system:masters group is privileged".into());
        }
        let policy = self.policy.read().expect("policy lock").clone();
        policy.decide(&Attributes {
            user: &ident.user,
            groups: &ident.groups,
            verb,
            target,
        })
    }

    /// The current policy (for rules reviews and escalation checks).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// Bring `kind`'s part of the policy up to the store's present (a
    /// fresh list, compiled before this returns; at most 5 s), after this
    /// server wrote an RBAC object, so the writer's next request sees it.
    pub async fn caught_up(&self, kind: Kind) {
        let (Some(i), Some((store, tx))) = (KINDS.iter().position(|k| *k == kind), self.feed.get())
        else {
            return;
        };
        let refresh = async {
            let (all, rev) = list(&**store, kind).await.ok()?;
            tx.send(Change::Reset(i, all, rev)).await.ok()?;
            let mut rx = self.seen.subscribe();
            rx.wait_for(|s| s[i] >= rev).await.ok().map(|_| ())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), refresh).await;
    }

    /// Keep the policy current from `store` (a task per RBAC kind feeding
    /// one compiler).
    pub fn spawn(self: &Arc<Self>, store: Arc<dyn Store>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Change>(256);
        let _ = self.feed.set((store.clone(), tx.clone()));
        for (i, kind) in KINDS.into_iter().enumerate() {
            tokio::spawn(follow(store.clone(), i, kind, tx.clone()));
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut objects: [HashMap<String, Value>; 4] = Default::default();
            let mut seen = [0i64; 4];
            // A watch event at or below the last full list's revision is
            // already in that list (a refresh can overtake the watch).
            let mut listed = [0i64; 4];
            let mut loaded = [false; 4];
            while let Some(first) = rx.recv().await {
                // Take every change that is already waiting, then compile once.
                let mut batch = vec![first];
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                }
                for c in batch {
                    match c {
                        Change::Reset(i, all, rev) => {
                            if rev >= listed[i] {
                                objects[i] = all;
                                listed[i] = rev;
                                seen[i] = seen[i].max(rev);
                                loaded[i] = true;
                            }
                        }
                        Change::Put(i, key, obj, rev) if rev > listed[i] => {
                            objects[i].insert(key, obj);
                            seen[i] = seen[i].max(rev);
                        }
                        Change::Delete(i, key, rev) if rev > listed[i] => {
                            objects[i].remove(&key);
                            seen[i] = seen[i].max(rev);
                        }
                        Change::Put(..) | Change::Delete(..) => {}
                    }
                }
                if loaded.iter().all(|l| *l) {
                    let policy = compile(&objects);
                    *me.policy.write().expect("policy lock") = Arc::new(policy);
                    me.seen.send_replace(seen);
                }
            }
        });
    }
}

enum Change {
    /// A fresh list of one kind (`KINDS` index), at a revision.
    Reset(usize, HashMap<String, Value>, i64),
    Put(usize, String, Value, i64),
    Delete(usize, String, i64),
}

fn compile(objects: &[HashMap<String, Value>; 4]) -> Policy {
    fn typed<T: serde::de::DeserializeOwned>(m: &HashMap<String, Value>) -> Vec<T> {
        m.values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }
    Policy::new(
        &typed(&objects[0]),
        &typed(&objects[1]),
        &typed(&objects[2]),
        &typed(&objects[3]),
    )
}

/// Every object of `kind`, by key, and the revision of the list.
async fn list(store: &dyn Store, kind: Kind) -> Result<(HashMap<String, Value>, i64), String> {
    let page = store
        .list_all(&by_kind(kind).prefix(None))
        .await
        .map_err(|e| e.to_string())?;
    let all = page
        .kvs
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), super::objects::decode(kv).ok()?)))
        .collect();
    Ok((all, page.revision))
}

/// List then watch one kind into the compiler, listing again after any
/// error (a compacted revision, a store that is down).
async fn follow(
    store: Arc<dyn Store>,
    i: usize,
    kind: Kind,
    tx: tokio::sync::mpsc::Sender<Change>,
) {
    let prefix = by_kind(kind).prefix(None);
    let mut backoff = Duration::from_millis(100);
    loop {
        let round = async {
            let (all, rev) = list(&*store, kind).await?;
            tx.send(Change::Reset(i, all, rev))
                .await
                .map_err(|_| String::new())?;
            backoff = Duration::from_millis(100);
            let mut w = store.watch(&prefix, rev).await.map_err(|e| e.to_string())?;
            while let Some(item) = w.next().await {
                let change = match item.map_err(|e| e.to_string())? {
                    WatchItem::Progress(_) => continue,
                    WatchItem::Event(ev) if ev.kind == EventKind::Put => {
                        let Ok(obj) = super::objects::decode(&ev.kv) else {
                            continue;
                        };
                        Change::Put(i, ev.kv.key.clone(), obj, ev.kv.mod_revision)
                    }
                    WatchItem::Event(ev) => {
                        Change::Delete(i, ev.kv.key.clone(), ev.kv.mod_revision)
                    }
                };
                tx.send(change).await.map_err(|_| String::new())?;
            }
            Err::<(), String>("the store's watch ended".into())
        };
        match round.await {
            Err(e) if e.is_empty() => return,
            Err(e) => tracing::debug!(error = %e, "RBAC watch error (relisting)"),
            Ok(()) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// kube's NodeRestriction for what a node writes by name: a node
/// (`system:node:<name>` in `system:nodes`) may create and change only
/// its own Node (and its status) and its own Lease in `kube-node-lease`,
/// so one compromised host cannot taint, relabel or fake the heartbeat of
/// another.
pub fn node_restriction(
    def: &crate::api::resources::ResourceDef,
    ns: Option<&str>,
    obj: &Value,
    opts: &super::objects::WriteOpts,
) -> Result<(), crate::api::status::ApiError> {
    let Some(ident) = &opts.requester else {
        return Ok(());
    };
    if !in_group(ident, "system:nodes") {
        return Ok(());
    }
    let Some(me) = ident.user.strip_prefix("system:node:") else {
        return Ok(());
    };
    let what = match def.kind {
        Kind::Node => "node",
        Kind::Lease if ns == Some(crate::node::register::LEASE_NAMESPACE) => "lease",
        _ => return Ok(()),
    };
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if name == me {
        return Ok(());
    }
    Err(crate::api::status::ApiError::forbidden(format!(
        "{} \"{name}\" is forbidden: node \"{me}\" is not allowed to modify {what} \"{name}\"",
        super::objects::resource_ref(def),
    )))
}

impl super::Server {
    /// RBAC's escalation check (kube's): a requester may create or change
    /// a role only with rules it holds itself (or the `escalate` verb on
    /// it), and a binding only to a role whose rules it holds (or the
    /// `bind` verb on that role), where it binds. Otherwise anyone who may
    /// write RoleBindings in a namespace could bind `cluster-admin` there.
    pub fn check_escalation(
        &self,
        def: &crate::api::resources::ResourceDef,
        ns: Option<&str>,
        obj: &Value,
        opts: &super::objects::WriteOpts,
    ) -> Result<(), crate::api::status::ApiError> {
        use k8s_openapi::api::rbac::v1::PolicyRule;
        let Some(ident) = &opts.requester else {
            return Ok(());
        };
        let policy = self.authz.policy();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let (verb, resource, target_name, rules): (_, _, &str, Vec<PolicyRule>) = match def.kind {
            Kind::Role | Kind::ClusterRole => {
                let rules = serde_json::from_value(obj["rules"].clone()).unwrap_or_default();
                ("escalate", def.plural, name, rules)
            }
            Kind::RoleBinding | Kind::ClusterRoleBinding => {
                let role = obj["roleRef"]["name"].as_str().unwrap_or_default();
                let rules = match obj["roleRef"]["kind"].as_str() {
                    Some("Role") => policy.role_rules(ns.unwrap_or_default(), role),
                    _ => policy.cluster_role_rules(role),
                };
                let resource = if obj["roleRef"]["kind"] == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                };
                ("bind", resource, role, rules)
            }
            _ => return Ok(()),
        };
        let t = Target::Resource {
            group: "rbac.authorization.k8s.io",
            resource,
            subresource: None,
            name: Some(target_name),
            namespace: ns,
        };
        if self.authz.decide(ident, verb, t).allowed() {
            return Ok(());
        }
        let held = policy.rules_for(&ident.user, &ident.groups, ns.unwrap_or_default());
        match rbac::uncovered(&held, &rules) {
            None => Ok(()),
            Some(missing) => Err(crate::api::status::ApiError::forbidden(format!(
                "{} \"{name}\" is forbidden: user \"{}\" (groups={:?}) is attempting to grant RBAC permissions not currently held: {missing}",
                super::objects::resource_ref(def),
                ident.user,
                ident.groups,
            ))),
        }
    }

    /// Create the bootstrap ClusterRoles and ClusterRoleBindings, and put
    /// back what is missing from those still marked for auto-update.
    pub(super) async fn bootstrap_rbac(&self) -> anyhow::Result<()> {
        let (roles, bindings) = rbac::bootstrap();
        let roles = roles
            .into_iter()
            .map(|r| (Kind::ClusterRole, serde_json::to_value(r)));
        let bindings = bindings
            .into_iter()
            .map(|b| (Kind::ClusterRoleBinding, serde_json::to_value(b)));
        for (kind, obj) in roles.chain(bindings) {
            let obj = obj?;
            let def = by_kind(kind);
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let opts = super::objects::WriteOpts::default();
            // Several servers may start at once: a conflict means another
            // one wrote first, so look again.
            for _ in 0..5 {
                let existing = match self.get_object(def, None, &name).await {
                    Ok((v, _)) => v,
                    Err(e) if e.code == 404 => match self
                        .create_object(def, None, obj.clone(), &opts)
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.code == 409 => continue,
                        Err(e) => {
                            anyhow::bail!("bootstrapping {} {name}: {}", def.kind_name, e.message)
                        }
                    },
                    Err(e) => {
                        anyhow::bail!("bootstrapping {} {name}: {}", def.kind_name, e.message)
                    }
                };
                let Some(merged) = reconcile(&existing, &obj) else {
                    break;
                };
                match self
                    .update_object(def, None, &name, merged, None, &opts)
                    .await
                {
                    Ok(_) => break,
                    Err(e) if e.code == 409 => continue,
                    Err(e) => anyhow::bail!("reconciling {} {name}: {}", def.kind_name, e.message),
                }
            }
        }
        Ok(())
    }
}

/// The bootstrap object `want` merged into `existing` (its missing rules
/// and subjects added), or `None` when nothing is missing or the
/// administrator turned auto-update off.
fn reconcile(existing: &Value, want: &Value) -> Option<Value> {
    if existing["metadata"]["annotations"][rbac::AUTOUPDATE] == "false" {
        return None;
    }
    let mut merged = existing.clone();
    let mut changed = false;
    for field in ["rules", "subjects"] {
        let Some(wanted) = want[field].as_array() else {
            continue;
        };
        if !merged[field].is_array() {
            merged[field] = Value::Array(Vec::new());
        }
        let list = merged[field].as_array_mut().expect("an array");
        for w in wanted {
            if !list.contains(w) {
                list.push(w.clone());
                changed = true;
            }
        }
    }
    if want.get("aggregationRule").is_some()
        && existing.get("aggregationRule") != want.get("aggregationRule")
    {
        merged["aggregationRule"] = want["aggregationRule"].clone();
        changed = true;
    }
    changed.then_some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reconcile_adds_what_is_missing_and_respects_autoupdate_false() {
        let want = json!({"metadata": {"name": "view"}, "rules": [{"verbs": ["get"]}, {"verbs": ["list"]}]});
        let existing = json!({"metadata": {"name": "view"}, "rules": [{"verbs": ["get"]}, {"verbs": ["mine"]}]});
        let merged = reconcile(&existing, &want).unwrap();
        assert_eq!(merged["rules"].as_array().unwrap().len(), 3);
        assert_eq!(reconcile(&merged, &want), None);
        let mut off = existing.clone();
        off["metadata"]["annotations"] = json!({rbac::AUTOUPDATE: "false"});
        assert_eq!(reconcile(&off, &want), None);
    }
}
