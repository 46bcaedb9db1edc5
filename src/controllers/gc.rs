//! The garbage collector, background propagation: an object whose every
//! owner (ownerReferences) is gone is deleted, so deleting a ReplicaSet
//! deletes its Pods, and deleting a Deployment its ReplicaSets (and so
//! their Pods).
//!
//! A pass every [`PERIOD`] lists the dependent kinds and checks each owner
//! once by GET (a missing owner, or one of another uid — deleted and
//! re-created — is gone). Pure decision: [`orphaned`].

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams};
use kube::Resource;

/// How often the collector looks.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Whether an object with `refs` has lost all its owners, given which
/// owners exist (`exists(ref)`). Objects without owners are never
/// collected.
pub fn orphaned(refs: &[OwnerReference], exists: impl Fn(&OwnerReference) -> bool) -> bool {
    !refs.is_empty() && !refs.iter().any(exists)
}

/// The uid of owner `r` in namespace `ns` now (`None`: it does not
/// exist), for the owner kinds this collector knows; unknown kinds count
/// as existing.
async fn owner_uid(client: &kube::Client, ns: &str, r: &OwnerReference) -> Option<String> {
    let res = match r.kind.as_str() {
        "ReplicaSet" => Api::<ReplicaSet>::namespaced(client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map(|o| o.map(|o| o.meta().uid.clone())),
        "Deployment" => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map(|o| o.map(|o| o.meta().uid.clone())),
        _ => return Some(r.uid.clone()),
    };
    match res {
        Ok(Some(uid)) => uid,
        Ok(None) => None,
        // Unknown (the API failed): assume it exists.
        Err(_) => Some(r.uid.clone()),
    }
}

async fn collect<K>(
    client: &kube::Client,
    cache: &mut HashMap<(String, String, String), Option<String>>,
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + 'static,
{
    let all: Api<K> = Api::all(client.clone());
    let Ok(list) = all.list(&ListParams::default()).await else {
        return;
    };
    for obj in list.items {
        let m = obj.meta();
        let Some(refs) = m.owner_references.as_ref().filter(|r| !r.is_empty()) else {
            continue;
        };
        if m.deletion_timestamp.is_some() {
            continue;
        }
        let ns = m.namespace.clone().unwrap_or_default();
        let mut live = Vec::new();
        for r in refs {
            let key = (ns.clone(), r.kind.clone(), r.name.clone());
            if !cache.contains_key(&key) {
                let uid = owner_uid(client, &ns, r).await;
                cache.insert(key.clone(), uid);
            }
            live.push(cache[&key].as_deref() == Some(r.uid.as_str()));
        }
        let exists = |r: &OwnerReference| {
            refs.iter()
                .position(|x| x.uid == r.uid)
                .is_some_and(|i| live[i])
        };
        if orphaned(refs, exists) {
            let name = m.name.clone().unwrap_or_default();
            let api: Api<K> = Api::namespaced(client.clone(), &ns);
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    tracing::info!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), "collected: its owners are gone")
                }
                Err(e) => tracing::debug!(error = %e, "garbage collection"),
            }
        }
    }
}

/// Collect until the future is dropped.
pub async fn run(client: kube::Client) {
    loop {
        let mut cache = HashMap::new();
        collect::<ReplicaSet>(&client, &mut cache).await;
        collect::<Pod>(&client, &mut cache).await;
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "x".into(),
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn collected_only_when_every_owner_is_gone() {
        assert!(!orphaned(&[], |_| false), "no owners: kept");
        assert!(orphaned(&[r("a")], |_| false));
        assert!(
            !orphaned(&[r("a"), r("b")], |o| o.uid == "b"),
            "one owner left"
        );
    }
}
