//! Pod networking: a minimal built-in CNI.
//!
//! ```text
//!   node namespace                          pod namespace /run/netns/<name>
//!   flbr0 (bridge, <gateway>/<podCIDR>) ── veth ── eth0 <pod ip>/32
//!                                                      route <gateway> dev eth0
//!                                                      default via <gateway>
//!   nft table ip fairlead-pods (written over nf_tables netlink):
//!     postrouting: ip saddr <podCIDR> ip daddr != <cluster CIDR> masquerade
//! ```
//!
//! Every pod (unless `hostNetwork`) gets a network namespace named under
//! `/run/netns`, so `ip netns exec <name> ...` works for debugging, and a
//! veth pair whose host end is a port of the node bridge. The pod's
//! address is a /32 with the gateway (the bridge's address, the first of
//! the node's podCIDR) as its only neighbour, so *all* pod traffic, even
//! to a pod on the same bridge, is routed by the node: Service DNAT and
//! its reverse always happen in the node's conntrack, with no need for
//! `br_netfilter`. ICMP redirects are off on the bridge for the same
//! reason.
//!
//! Addresses come from the node's podCIDR. Each allocation is a file
//! `<data dir>/network/ips/<ip>` holding the pod's uid, created
//! exclusively (as the host-local CNI plugin does), so a restarted agent
//! knows which addresses are taken and by whom.
//!
//! The namespace and link plumbing speaks routing netlink
//! ([`crate::netlink`]); no `ip` binary is needed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::api::service::ServiceCidr;
use crate::netlink::{self, is_errno, NewLink, Rtnl};
use crate::proxy::nftables::diff::Op;
use crate::proxy::nftables::ruleset::{BaseChain, Hook, Rule};
use crate::proxy::nftables::socket::{Socket, TxError};

/// The node bridge every pod's veth is a port of.
pub const BRIDGE: &str = "flbr0";

/// The nftables table that masquerades pod traffic leaving the cluster.
pub const MASQ_TABLE: &str = "fairlead-pods";

/// The node's pod network.
pub struct PodNetwork {
    pod_cidr: ServiceCidr,
    cluster_cidr: ServiceCidr,
    ips_dir: PathBuf,
    /// Where the next allocation starts looking (round robin, so an
    /// address is not handed out again right after it was released).
    next: Mutex<u32>,
}

impl PodNetwork {
    pub fn new(pod_cidr: ServiceCidr, cluster_cidr: ServiceCidr, data_dir: &Path) -> PodNetwork {
        PodNetwork {
            pod_cidr,
            cluster_cidr,
            ips_dir: data_dir.join("network").join("ips"),
            next: Mutex::new(2),
        }
    }

    pub fn pod_cidr(&self) -> ServiceCidr {
        self.pod_cidr
    }

    /// The bridge's address, the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.pod_cidr.base + 1)
    }

    /// The bridge's MAC address, set once and for all: a bridge without
    /// one takes the lowest MAC of its ports, so it changes whenever a pod's
    /// veth joins or leaves, and every pod whose ARP entry for the gateway
    /// still holds the old one sends its packets (replies to Service
    /// clients among them) into the void until that entry is probed again,
    /// seconds later. Locally administered `0a:58` + the gateway's IPv4
    /// address, as the CNI bridge plugin derives pod MACs.
    pub fn bridge_mac(&self) -> [u8; 6] {
        let [a, b, c, d] = self.gateway().octets();
        [0x0a, 0x58, a, b, c, d]
    }

    /// Set up the node side once: the bridge with the gateway address,
    /// forwarding, and the masquerade rule.
    pub async fn ensure_node(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.ips_dir)
            .map_err(|e| format!("creating {}: {e}", self.ips_dir.display()))?;
        let rtnl = Rtnl::open().map_err(|e| format!("opening routing netlink: {e}"))?;
        match rtnl.add_link(BRIDGE, NewLink::Bridge).await {
            Err(e) if !is_errno(&e, libc::EEXIST) => {
                return Err(format!("creating the bridge {BRIDGE}: {e}"))
            }
            _ => {}
        }
        rtnl.set_link(BRIDGE, Some(self.bridge_mac()), None)
            .await
            .map_err(|e| format!("setting up the bridge {BRIDGE}: {e}"))?;
        rtnl.add_addr(
            BRIDGE,
            IpAddr::V4(self.gateway()),
            self.pod_cidr.prefix,
            None,
        )
        .await
        .map_err(|e| {
            format!(
                "adding {}/{} to {BRIDGE}: {e}",
                self.gateway(),
                self.pod_cidr.prefix
            )
        })?;
        for (path, v) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv4/conf/all/send_redirects", "0"),
            (
                &format!("/proc/sys/net/ipv4/conf/{BRIDGE}/send_redirects") as &str,
                "0",
            ),
        ] {
            if let Err(e) = std::fs::write(path, v) {
                tracing::warn!(path, error = %e, "setting a sysctl for pod networking");
            }
        }
        if let Err(e) = self.masquerade().await {
            tracing::warn!(error = %e, "pod traffic leaving the cluster is not masqueraded");
        }
        Ok(())
    }

    /// (Re)write the masquerade table, in one nf_tables transaction over
    /// netlink (no `nft` binary: the static image has none).
    async fn masquerade(&self) -> Result<(), String> {
        let rule = Rule::MasqueradeLeaving {
            from: cidr(self.pod_cidr),
            inside: cidr(self.cluster_cidr),
        };
        transact(move |s| {
            s.transact(
                MASQ_TABLE,
                &[
                    (0, Op::AddTable { comment: None }),
                    (0, Op::AddBaseChain(&POSTROUTING)),
                    (0, Op::FlushChain(POSTROUTING.name)),
                    (
                        0,
                        Op::AddRule {
                            chain: POSTROUTING.name,
                            rule: &rule,
                            comment: None,
                        },
                    ),
                ],
            )
        })
        .await
    }

    /// The address held for pod `uid`, if any.
    pub fn address_of(&self, uid: &str) -> Option<Ipv4Addr> {
        std::fs::read_dir(&self.ips_dir)
            .ok()?
            .flatten()
            .find(|e| std::fs::read_to_string(e.path()).is_ok_and(|s| s.trim() == uid))
            .and_then(|e| e.file_name().to_str()?.parse().ok())
    }

    /// Allocate an address for pod `uid` (or return the one it holds).
    pub fn allocate(&self, uid: &str) -> Result<Ipv4Addr, String> {
        if let Some(ip) = self.address_of(uid) {
            return Ok(ip);
        }
        let size = self.pod_cidr.size();
        let mut next = self.next.lock().unwrap();
        // Offsets 2..size-1: not the network, the gateway or broadcast.
        let usable = size.saturating_sub(3);
        for i in 0..usable {
            let off = 2 + (*next - 2 + i) % usable;
            let ip = Ipv4Addr::from(self.pod_cidr.base + off);
            let path = self.ips_dir.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(uid.as_bytes())
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                    *next = 2 + (off - 2 + 1) % usable;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("allocating a pod address: {e}")),
            }
        }
        Err(format!(
            "no free address left in the pod CIDR {}",
            self.pod_cidr
        ))
    }

    /// Release pod `uid`'s address.
    pub fn release(&self, uid: &str) {
        if let Some(ip) = self.address_of(uid) {
            let _ = std::fs::remove_file(self.ips_dir.join(ip.to_string()));
        }
    }

    /// Every (address, uid) allocation.
    pub fn allocations(&self) -> Vec<(Ipv4Addr, String)> {
        let Ok(rd) = std::fs::read_dir(&self.ips_dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let ip = e.file_name().to_str()?.parse().ok()?;
                let uid = std::fs::read_to_string(e.path()).ok()?;
                Some((ip, uid.trim().to_string()))
            })
            .collect()
    }

    /// Create namespace `netns` with `ip` on its eth0, wired to the
    /// bridge through veth `host_if`.
    pub async fn add(&self, netns: &str, host_if: &str, ip: Ipv4Addr) -> Result<(), String> {
        // A leftover of an earlier attempt would make `netns add` fail.
        remove_netns(netns).await;
        let node = Rtnl::open().map_err(|e| format!("opening routing netlink: {e}"))?;
        let _ = node.del_link(host_if).await;
        let ns = netns.to_string();
        tokio::task::spawn_blocking(move || netlink::add_netns(&ns))
            .await
            .map_err(|e| format!("creating namespace {netns}: {e}"))?
            .map_err(|e| format!("creating namespace {netns}: {e}"))?;
        node.add_link(
            host_if,
            NewLink::Veth {
                peer: "eth0",
                peer_netns: netns,
            },
        )
        .await
        .map_err(|e| format!("creating the veth pair {host_if}: {e}"))?;
        node.set_link(host_if, None, Some(BRIDGE))
            .await
            .map_err(|e| format!("attaching {host_if} to {BRIDGE}: {e}"))?;
        let gw = self.gateway();
        let pod = Rtnl::open_in(netns).map_err(|e| format!("entering {netns}: {e}"))?;
        let step = |what: &'static str| move |e: std::io::Error| format!("{netns}: {what}: {e}");
        pod.set_link("lo", None, None)
            .await
            .map_err(step("lo up"))?;
        pod.add_addr("eth0", IpAddr::V4(ip), 32, None)
            .await
            .map_err(step("address on eth0"))?;
        pod.set_link("eth0", None, None)
            .await
            .map_err(step("eth0 up"))?;
        pod.add_dev_route("eth0", gw, 32, None)
            .await
            .map_err(step("route to the gateway"))?;
        pod.add_dev_route("eth0", Ipv4Addr::UNSPECIFIED, 0, Some(gw))
            .await
            .map_err(step("default route"))
    }
}

/// Remove a pod's namespace (its veth pair goes with it).
pub async fn remove_netns(netns: &str) {
    let ns = netns.to_string();
    match tokio::task::spawn_blocking(move || netlink::del_netns(&ns)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(netns, error = %e, "removing a pod's network namespace"),
        Err(e) => tracing::warn!(netns, error = %e, "removing a pod's network namespace"),
    }
}

/// Remove the node side: the bridge and the masquerade table.
pub async fn remove_node() {
    if let Ok(rtnl) = Rtnl::open() {
        let _ = rtnl.del_link(BRIDGE).await;
    }
    // (Added first, so that deleting it never fails for being absent.)
    let _ = transact(|s| {
        s.transact(
            MASQ_TABLE,
            &[(0, Op::AddTable { comment: None }), (0, Op::DeleteTable)],
        )
    })
    .await;
}

/// The masquerade table's one chain.
static POSTROUTING: BaseChain = BaseChain {
    name: "postrouting",
    kind: "nat",
    hook: Hook::Postrouting,
    priority: 100,
};

fn cidr(c: ServiceCidr) -> (Ipv4Addr, u8) {
    (Ipv4Addr::from(c.base), c.prefix)
}

/// One nf_tables transaction in this network namespace, off the runtime
/// (the netlink socket blocks).
async fn transact<T>(
    f: impl FnOnce(&mut Socket) -> Result<T, TxError> + Send + 'static,
) -> Result<(), String> {
    let done = tokio::task::spawn_blocking(move || {
        let mut s = Socket::open(None).map_err(|e| format!("opening nf_tables netlink: {e}"))?;
        f(&mut s).map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    done.map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_round_robin_and_never_twice() {
        let d = tempfile::tempdir().unwrap();
        let cidr: ServiceCidr = "10.244.3.0/29".parse().unwrap();
        let net = PodNetwork::new(cidr, "10.244.0.0/16".parse().unwrap(), d.path());
        std::fs::create_dir_all(&net.ips_dir).unwrap();
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 244, 3, 1));
        let a = net.allocate("a").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(
            net.allocate("a").unwrap(),
            a,
            "the same pod keeps its address"
        );
        let b = net.allocate("b").unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 244, 3, 3));
        net.release("a");
        // Round robin: .4 next, not the just-released .2.
        assert_eq!(net.allocate("c").unwrap(), Ipv4Addr::new(10, 244, 3, 4));
        for uid in ["d", "e", "f"] {
            net.allocate(uid).unwrap();
        }
        // .2 .. .6 taken (5 usable in a /29 without network, gateway,
        // broadcast): full.
        assert!(net.allocate("g").unwrap_err().contains("no free address"));
        let mut held: Vec<String> = net.allocations().into_iter().map(|(_, u)| u).collect();
        held.sort();
        assert_eq!(held, ["b", "c", "d", "e", "f"]);
    }
}
