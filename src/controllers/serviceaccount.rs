//! The ServiceAccounts controller: every active namespace has a `default`
//! ServiceAccount (kube-controller-manager's `serviceaccount-controller`),
//! created with the namespace and again if someone deletes it, so pods and
//! `kubectl create token default` always have one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use serde_json::json;

/// The ServiceAccount every namespace gets.
pub const DEFAULT: &str = "default";

#[derive(Debug, thiserror::Error)]
#[error("API request failed: {0}")]
struct Error(#[from] kube::Error);

async fn reconcile(ns: Arc<Namespace>, client: Arc<kube::Client>) -> Result<Action, Error> {
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = ns.metadata.name.clone().unwrap_or_default();
    let accounts: Api<ServiceAccount> = Api::namespaced((*client).clone(), &name);
    if accounts.get_opt(DEFAULT).await?.is_none() {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": DEFAULT}})).expect("static object");
        match accounts.create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::debug!(namespace = %name, "created the default ServiceAccount"),
            // Already there, or the namespace began terminating meanwhile.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

fn error_policy(_ns: Arc<Namespace>, err: &Error, _client: Arc<kube::Client>) -> Action {
    tracing::warn!(error = %err, "default ServiceAccount sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Keep a `default` ServiceAccount in every namespace (until stopped).
pub async fn run(client: kube::Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    Controller::new(namespaces, watcher::Config::default())
        .trigger_backoff(super::WatchBackoff::default())
        // A deleted default account: its namespace again.
        .watches(
            accounts,
            watcher::Config::default(),
            |sa: ServiceAccount| {
                (sa.metadata.name.as_deref() == Some(DEFAULT))
                    .then(|| ObjectRef::new(sa.metadata.namespace.as_deref().unwrap_or_default()))
            },
        )
        .run(reconcile, error_policy, Arc::new(client))
        .for_each(|_| futures::future::ready(()))
        .await;
}
