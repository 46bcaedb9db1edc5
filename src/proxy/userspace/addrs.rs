//! Service IPs as local addresses: a userspace listener can only bind a
//! ClusterIP/externalIP the kernel considers local, so each one is added as a
//! /32 (/128) on a dummy interface the proxy owns (like kube-proxy's IPVS
//! mode with `kube-ipvs0`). Changes go to the kernel over routing netlink
//! ([`crate::netlink`]), pipelined per sync.
//!
//! Where the kernel has no `dummy` driver (some containers), the addresses
//! go on `lo` instead, IPv4 ones with the label `lo:fairlead` so a restarted
//! proxy can find (and remove) its own leftovers without touching anything
//! else on `lo`.

use std::collections::HashSet;
use std::net::IpAddr;

use super::ProxyError;
use crate::netlink::{is_errno, NewLink, Rtnl};

/// IPv4 label for addresses put on `lo` (at most 15 bytes, must start with
/// the device name).
pub const LO_LABEL: &str = "lo:fairlead";

/// Which device holds the service IPs.
pub(crate) struct AddrManager {
    rtnl: Rtnl,
    iface: String,
    /// `Some` when we fell back to `lo`: the label marking our addresses.
    label: Option<&'static str>,
}

impl std::fmt::Debug for AddrManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddrManager")
            .field("iface", &self.iface)
            .field("label", &self.label)
            .finish()
    }
}

impl AddrManager {
    /// Create (or adopt) the dummy interface and bring it up; return the
    /// manager and the service IPs already on it (left by a previous run).
    pub(crate) async fn setup(iface: &str) -> Result<(AddrManager, HashSet<IpAddr>), ProxyError> {
        let err = |interface: &str, e: std::io::Error| ProxyError::Interface {
            interface: interface.to_string(),
            message: e.to_string(),
        };
        let rtnl = Rtnl::open().map_err(|e| err(iface, e))?;
        let label = match rtnl.add_link(iface, NewLink::Dummy).await {
            Ok(()) => None,
            Err(e) if is_errno(&e, libc::EEXIST) => None,
            // No dummy driver: "operation not supported" / "no such file".
            Err(e) if is_errno(&e, libc::EOPNOTSUPP) || is_errno(&e, libc::ENOENT) => {
                tracing::warn!(
                    interface = iface,
                    error = %e,
                    "no dummy interface support; putting service IPs on lo"
                );
                Some(LO_LABEL)
            }
            Err(e) => return Err(err(iface, e)),
        };
        let mgr = AddrManager {
            rtnl,
            iface: if label.is_some() { "lo" } else { iface }.to_string(),
            label,
        };
        mgr.rtnl
            .set_link(&mgr.iface, None, None)
            .await
            .map_err(|e| err(&mgr.iface, e))?;
        let existing = mgr.list().await?;
        Ok((mgr, existing))
    }

    /// Service IPs currently on the device (ours only when on `lo`: IPv4
    /// ones with our label; IPv6 addresses have no label).
    async fn list(&self) -> Result<HashSet<IpAddr>, ProxyError> {
        let addrs = self
            .rtnl
            .addrs(&self.iface)
            .await
            .map_err(|e| ProxyError::Interface {
                interface: self.iface.clone(),
                message: e.to_string(),
            })?;
        Ok(addrs
            .into_iter()
            .filter(|a| !a.link_scope)
            .filter(|a| match self.label {
                Some(l) => a.ip.is_ipv4() && a.label.as_deref() == Some(l),
                None => true,
            })
            .map(|a| a.ip)
            .collect())
    }

    /// Add addresses; return the ones that failed, with the error.
    pub(crate) async fn add(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        if ips.is_empty() {
            return Vec::new();
        }
        let r = self.rtnl.add_host_addrs(&self.iface, ips, self.label).await;
        failures(ips, r)
    }

    /// Remove addresses (already absent counts as removed); return failures.
    pub(crate) async fn del(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        if ips.is_empty() {
            return Vec::new();
        }
        let r = self.rtnl.del_host_addrs(&self.iface, ips).await;
        failures(ips, r)
    }

    /// Remove every address we own: the whole dummy interface, or our
    /// addresses on `lo`.
    pub(crate) async fn teardown(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        if self.label.is_none() {
            match self.rtnl.del_link(&self.iface).await {
                Ok(_) => return Vec::new(),
                Err(e) => {
                    tracing::warn!(interface = %self.iface, error = %e, "deleting the interface")
                }
            }
        }
        self.del(ips).await
    }
}

/// Per-address failures; when the device itself failed, every address.
fn failures(
    ips: &[IpAddr],
    r: std::io::Result<Vec<(IpAddr, std::io::Error)>>,
) -> Vec<(IpAddr, String)> {
    match r {
        Ok(failed) => failed
            .into_iter()
            .map(|(ip, e)| (ip, e.to_string()))
            .collect(),
        Err(e) => ips.iter().map(|&ip| (ip, e.to_string())).collect(),
    }
}
