//! Pod routes across nodes ("host-gw", as flannel's host-gw backend and
//! kube-router do): each node routes every other node's podCIDR via that
//! node's InternalIP, so a pod address is reachable from any node (and any
//! pod) without an overlay. It needs the nodes on one L2 segment, or any
//! network that delivers to their InternalIPs directly.
//!
//! The routes carry `proto` [`ROUTE_PROTO`], so the node finds its own
//! among the table's (`ip route show proto 250`), removes those of Nodes
//! that went away, and `fairlead node --cleanup` flushes them all.
//!
//! [`desired`] is pure. The loop recomputes it on every Node event but
//! touches the kernel only when the result changes (heartbeats do not),
//! plus a full comparison with the kernel every [`RESYNC`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt};

use crate::api::service::ServiceCidr;
use crate::netlink::Rtnl;

/// The routing protocol number that marks fairlead's routes.
pub const ROUTE_PROTO: u8 = 250;
/// How often the kernel's routes are compared with the Nodes anyway.
const RESYNC: Duration = Duration::from_secs(60);

/// podCIDR → gateway for every other node with both.
pub fn desired<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    me: &str,
) -> BTreeMap<String, IpAddr> {
    nodes
        .into_iter()
        .filter(|n| n.metadata.name.as_deref() != Some(me))
        .filter_map(|n| {
            let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
            let ip = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")?
                .address
                .parse::<IpAddr>()
                .ok()?;
            // Only IPv4 pod ranges for now (the pod network is IPv4).
            (cidr.parse::<ServiceCidr>().is_ok() && ip.is_ipv4()).then_some((cidr, ip))
        })
        .collect()
}

/// The routes with our protocol now in the main table: destination → gateway.
async fn installed(rtnl: &Rtnl) -> std::io::Result<BTreeMap<String, IpAddr>> {
    Ok(rtnl
        .routes_by_proto(ROUTE_PROTO)
        .await?
        .into_iter()
        .map(|(dst, prefix, gw)| (format!("{dst}/{prefix}"), IpAddr::V4(gw)))
        .collect())
}

/// `a.b.c.d/n` as (network, prefix length).
fn cidr(dst: &str) -> Option<(Ipv4Addr, u8)> {
    let c: ServiceCidr = dst.parse().ok()?;
    Some((Ipv4Addr::from(c.base), c.prefix))
}

/// Make the kernel's routes of our protocol exactly `want`.
async fn apply(want: &BTreeMap<String, IpAddr>) {
    let rtnl = match Rtnl::open() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "opening routing netlink for pod routes");
            return;
        }
    };
    let have = match installed(&rtnl).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "listing pod routes");
            return;
        }
    };
    for (dst, gw) in want {
        if have.get(dst) == Some(gw) {
            continue;
        }
        let (Some((net, prefix)), IpAddr::V4(via)) = (cidr(dst), *gw) else {
            continue;
        };
        match rtnl.replace_route(net, prefix, via, ROUTE_PROTO).await {
            Ok(()) => tracing::info!(%dst, %via, "pod route to another node"),
            Err(e) => {
                tracing::warn!(%dst, %via, error = %e, "cannot route another node's pods (is its InternalIP on this node's network?)")
            }
        }
    }
    for dst in have.keys().filter(|d| !want.contains_key(*d)) {
        let Some((net, prefix)) = cidr(dst) else {
            continue;
        };
        match rtnl.del_route(net, prefix, ROUTE_PROTO).await {
            Ok(()) => tracing::info!(%dst, "removed the pod route of a node that is gone"),
            Err(e) => tracing::warn!(%dst, error = %e, "removing a pod route"),
        }
    }
}

/// Keep the pod routes in step with the Nodes until dropped.
pub async fn run(client: kube::Client, me: String) {
    let (reader, writer) = reflector::store();
    let events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .backoff(crate::controllers::WatchBackoff::default())
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    let mut current: Option<BTreeMap<String, IpAddr>> = None;
    // Nothing is removed before the first full list is in.
    let mut listed = false;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        let force = tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some(Ok(watcher::Event::InitDone)) => {
                    listed = true;
                    false
                }
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watching Nodes for pod routes");
                    continue;
                }
            },
            _ = resync.tick() => true,
        };
        if !listed {
            continue;
        }
        let want = desired(reader.state().iter().map(|n| n.as_ref()), &me);
        if force || current.as_ref() != Some(&want) {
            apply(&want).await;
            current = Some(want);
        }
    }
}

/// Remove every route fairlead added (for `--cleanup`).
pub async fn cleanup() -> std::io::Result<()> {
    let rtnl = Rtnl::open()?;
    for (dst, prefix, _) in rtnl.routes_by_proto(ROUTE_PROTO).await? {
        rtnl.del_route(dst, prefix, ROUTE_PROTO).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> Node {
        let mut v = json!({"metadata": {"name": name}, "spec": {}, "status": {"addresses": []}});
        if let Some(c) = cidr {
            v["spec"]["podCIDR"] = json!(c);
        }
        if let Some(i) = ip {
            v["status"]["addresses"] = json!([{"type": "Hostname", "address": name},
                                               {"type": "InternalIP", "address": i}]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn routes_every_other_node_with_a_cidr_and_an_address() {
        let nodes = [
            node("a", Some("10.244.0.0/24"), Some("10.0.0.1")),
            node("b", Some("10.244.1.0/24"), Some("10.0.0.2")),
            node("c", None, Some("10.0.0.3")),
            node("d", Some("10.244.3.0/24"), None),
        ];
        let want = desired(&nodes, "a");
        assert_eq!(want.len(), 1);
        assert_eq!(want["10.244.1.0/24"], "10.0.0.2".parse::<IpAddr>().unwrap());
    }
}
