//! The stand-in scheduler of `fairlead up`: one node, so every Pod that
//! waits for the default scheduler is bound to it, through `pods/binding`
//! as a scheduler would. (The scheduler issue replaces this with filters
//! and scores over several nodes.)

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};

/// The scheduler name Pods get by default.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Whether `pod` waits for the default scheduler.
pub fn wants_binding(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let unbound = spec
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty);
    let ours = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n.is_empty() || n == DEFAULT_SCHEDULER);
    unbound && ours && pod.metadata.deletion_timestamp.is_none()
}

/// Bind every unbound Pod to `node` until the future is dropped.
pub async fn run(client: kube::Client, node: String) {
    let pods: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields("spec.nodeName=");
    let mut events = watcher(pods, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = events.next().await {
        let pod = match ev {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch error");
                continue;
            }
        };
        if !wants_binding(&pod) {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        match api
            .create_subresource::<Value, Value>("binding", &name, &PostParams::default(), &binding)
            .await
        {
            Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), node = %node, "pod bound"),
            // Bound meanwhile, or gone: nothing to do.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => tracing::warn!(error = %e, pod = %format!("{ns}/{name}"), "binding the pod"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_unbound_pods_of_the_default_scheduler() {
        assert!(wants_binding(&pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": []}})
        )));
        assert!(wants_binding(&pod(json!({"metadata": {"name": "a"},
            "spec": {"containers": [], "schedulerName": "default-scheduler"}}))));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a"},
            "spec": {"containers": [], "nodeName": "n"}}))));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a"},
            "spec": {"containers": [], "schedulerName": "other"}}))));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a",
            "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"containers": []}}))));
    }
}
