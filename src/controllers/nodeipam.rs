//! Node IPAM: every Node gets a pod CIDR (`spec.podCIDR` and
//! `spec.podCIDRs`), a block of `--node-cidr-mask-size` (24) out of
//! `--cluster-cidr` (10.244.0.0/16), as kube-controller-manager's range
//! allocator does. The node agent gives its pods addresses from it.
//!
//! The allocation is the pure [`allocate`]: the lowest block that no Node
//! holds. The controller ([`run`]) reconciles Nodes one at a time (one
//! lock around choose-and-patch), and remembers what it handed out until
//! its cache shows it, so two Nodes arriving together never get the same
//! block. Each write is pinned to the resourceVersion it was decided on,
//! and the API server refuses any change to a range once set, so a stale
//! view can never move a Node's range. A deleted Node's block is free
//! again once the cache drops it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{watcher, Controller};
use serde_json::json;

use crate::api::service::ServiceCidr;

/// Node IPAM settings (`--cluster-cidr`, `--node-cidr-mask-size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpamConfig {
    pub cluster_cidr: ServiceCidr,
    pub node_mask: u8,
}

impl Default for IpamConfig {
    fn default() -> Self {
        IpamConfig {
            cluster_cidr: "10.244.0.0/16".parse().expect("a valid CIDR"),
            node_mask: 24,
        }
    }
}

impl IpamConfig {
    /// Checked settings: the node blocks must fit in the cluster range.
    pub fn new(cluster_cidr: ServiceCidr, node_mask: u8) -> Result<IpamConfig, String> {
        if node_mask < cluster_cidr.prefix || node_mask > 30 {
            return Err(format!(
                "--node-cidr-mask-size {node_mask} must be between the --cluster-cidr prefix \
                 ({}) and 30",
                cluster_cidr.prefix
            ));
        }
        Ok(IpamConfig {
            cluster_cidr,
            node_mask,
        })
    }

    /// How many node blocks the cluster range holds.
    pub fn blocks(&self) -> u64 {
        1u64 << (self.node_mask - self.cluster_cidr.prefix)
    }

    /// Block `i`, as `a.b.c.d/mask`.
    pub fn block(&self, i: u64) -> String {
        let base = self.cluster_cidr.base as u64 + (i << (32 - self.node_mask));
        format!("{}/{}", Ipv4Addr::from(base as u32), self.node_mask)
    }
}

/// The lowest block of `cfg` not in `used` (CIDR strings as Nodes hold
/// them; others, e.g. from another range, are ignored); `None` when every
/// block is taken.
pub fn allocate(cfg: &IpamConfig, used: &BTreeSet<String>) -> Option<String> {
    (0..cfg.blocks())
        .map(|i| cfg.block(i))
        .find(|b| !used.contains(b))
}

struct Ctx {
    nodes: Api<Node>,
    cfg: IpamConfig,
    store: Store<Node>,
    /// Blocks handed out that the cache may not show yet: node → block.
    given: tokio::sync::Mutex<BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("no free pod CIDR left in {0}")]
    Full(String),
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let has = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .is_some_and(|c| !c.is_empty());
    if has {
        return Ok(Action::await_change());
    }
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut given = ctx.given.lock().await;
    let nodes = ctx.store.state();
    let present: BTreeSet<&str> = nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    // Forget what the cache shows now (that very block on that Node), or
    // what went with its Node. A cache still showing an older block of the
    // Node must not free the one just given, or a second Node could get it.
    given.retain(|n, b| {
        present.contains(n.as_str())
            && !nodes.iter().any(|x| {
                x.metadata.name.as_deref() == Some(n.as_str())
                    && x.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()) == Some(&*b)
            })
    });
    let mut used: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidr.clone())
        .collect();
    used.extend(given.values().cloned());
    let block = match given.get(&name) {
        Some(b) => b.clone(),
        None => allocate(&ctx.cfg, &used)
            .ok_or_else(|| Error::Full(ctx.cfg.cluster_cidr.to_string()))?,
    };
    // Pinned to the version we decided on: a cache behind the store (a
    // fresh leader's list, a lagging member) may show no range on a Node
    // that has one; the write must then fail (409), not replace it.
    let rv = node.metadata.resource_version.clone();
    let patch = json!({
        "metadata": {"resourceVersion": rv},
        "spec": {"podCIDR": block, "podCIDRs": [block]},
    });
    match ctx
        .nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        // Stale: the watch brings the newer Node, which reconciles again.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(node = %name, "node changed meanwhile; waiting for the newer version");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(node = %name, pod_cidr = %block, "pod CIDR allocated");
    metrics::counter!("fairlead_node_ipam_allocations_total").increment(1);
    given.insert(name, block);
    Ok(Action::await_change())
}

fn error_policy(node: Arc<Node>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(node = ?node.metadata.name, error = %err, "pod CIDR allocation failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Give every Node a pod CIDR, until the future is dropped.
pub async fn run(client: kube::Client, cfg: IpamConfig) {
    let nodes: Api<Node> = Api::all(client);
    let controller = Controller::new(nodes.clone(), watcher::Config::default())
        .trigger_backoff(super::WatchBackoff::default());
    let ctx = Arc::new(Ctx {
        nodes,
        cfg,
        store: controller.store(),
        given: Default::default(),
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_block() {
        let cfg = IpamConfig::default();
        assert_eq!(cfg.blocks(), 256);
        let mut used = BTreeSet::new();
        assert_eq!(allocate(&cfg, &used).as_deref(), Some("10.244.0.0/24"));
        used.insert("10.244.0.0/24".to_string());
        used.insert("10.244.2.0/24".to_string());
        used.insert("192.168.0.0/24".to_string());
        assert_eq!(allocate(&cfg, &used).as_deref(), Some("10.244.1.0/24"));
        used.insert("10.244.1.0/24".to_string());
        assert_eq!(allocate(&cfg, &used).as_deref(), Some("10.244.3.0/24"));
    }

    #[test]
    fn a_full_range_has_no_block() {
        let cfg = IpamConfig::new("10.0.0.0/30".parse().unwrap(), 30).unwrap();
        let used = BTreeSet::from(["10.0.0.0/30".to_string()]);
        assert_eq!(allocate(&cfg, &used), None);
        let cfg = IpamConfig::new("10.1.0.0/16".parse().unwrap(), 26).unwrap();
        assert_eq!(cfg.block(5), "10.1.1.64/26");
    }

    #[test]
    fn masks_must_fit_the_range() {
        let c: ServiceCidr = "10.244.0.0/16".parse().unwrap();
        assert!(IpamConfig::new(c, 15).is_err());
        assert!(IpamConfig::new(c, 31).is_err());
        assert!(IpamConfig::new(c, 16).is_ok());
    }
}
