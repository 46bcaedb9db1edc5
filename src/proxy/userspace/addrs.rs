//! Service IPs as local addresses: a userspace listener can only bind a
//! ClusterIP/externalIP the kernel considers local, so each one is added as a
//! /32 (/128) on a dummy interface the proxy owns (like kube-proxy's IPVS
//! mode with `kube-ipvs0`). Changes go through the `ip` command (iproute2),
//! batched per sync.
//!
//! Where the kernel has no `dummy` driver (some containers), the addresses
//! go on `lo` instead, IPv4 ones with the label `lo:fairlead` so a restarted
//! proxy can find (and remove) its own leftovers without touching anything
//! else on `lo`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::ProxyError;

/// IPv4 label for addresses put on `lo` (at most 15 bytes, must start with
/// the device name).
pub const LO_LABEL: &str = "lo:fairlead";

/// Which device holds the service IPs.
#[derive(Debug)]
pub(crate) struct AddrManager {
    iface: String,
    /// `Some` when we fell back to `lo`: the label marking our addresses.
    label: Option<&'static str>,
}

impl AddrManager {
    /// Create (or adopt) the dummy interface and bring it up; return the
    /// manager and the service IPs already on it (left by a previous run).
    pub(crate) async fn setup(iface: &str) -> Result<(AddrManager, HashSet<IpAddr>), ProxyError> {
        let mgr = match ip(&["link", "add", iface, "type", "dummy"]).await {
            Ok(()) => Some(AddrManager {
                iface: iface.to_string(),
                label: None,
            }),
            Err(e) if e.contains("File exists") => Some(AddrManager {
                iface: iface.to_string(),
                label: None,
            }),
            Err(e) if e.contains("Unknown device type") || e.contains("not supported") => {
                tracing::warn!(
                    interface = iface,
                    error = %e,
                    "no dummy interface support; putting service IPs on lo"
                );
                None
            }
            Err(e) => {
                return Err(ProxyError::Interface {
                    interface: iface.to_string(),
                    message: e,
                })
            }
        };
        let mgr = mgr.unwrap_or(AddrManager {
            iface: "lo".to_string(),
            label: Some(LO_LABEL),
        });
        ip(&["link", "set", &mgr.iface, "up"])
            .await
            .map_err(|message| ProxyError::Interface {
                interface: mgr.iface.clone(),
                message,
            })?;
        let existing = mgr.list().await?;
        Ok((mgr, existing))
    }

    /// Service IPs currently on the device (ours only when on `lo`).
    async fn list(&self) -> Result<HashSet<IpAddr>, ProxyError> {
        let mut out = HashSet::new();
        let mut args = vec!["-o", "addr", "show", "dev", self.iface.as_str()];
        if let Some(l) = self.label {
            // IPv6 addresses have no label: on lo we only list IPv4 ones.
            args.splice(0..0, ["-4"]);
            args.extend(["label", l]);
        }
        let text = ip_output(&args)
            .await
            .map_err(|message| ProxyError::Interface {
                interface: self.iface.clone(),
                message,
            })?;
        for line in text.lines() {
            // "3: fairlead0    inet 10.96.0.10/32 scope global fairlead0 ..."
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "inet" || w == "inet6" {
                    let scope_link = line.contains("scope link");
                    if let Some(ip) = words
                        .next()
                        .and_then(|a| a.split('/').next())
                        .and_then(|a| a.parse::<IpAddr>().ok())
                    {
                        if !scope_link {
                            out.insert(ip);
                        }
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    fn add_line(&self, ip: IpAddr) -> String {
        match (ip, self.label) {
            (IpAddr::V4(_), Some(l)) => {
                format!("address replace {ip}/32 dev {} label {l}", self.iface)
            }
            (IpAddr::V4(_), None) => format!("address replace {ip}/32 dev {}", self.iface),
            // nodad: otherwise the address is "tentative" for a while and
            // bind(2) fails with EADDRNOTAVAIL.
            (IpAddr::V6(_), _) => format!("address replace {ip}/128 dev {} nodad", self.iface),
        }
    }

    fn del_line(&self, ip: IpAddr) -> String {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        format!("address del {ip}/{bits} dev {}", self.iface)
    }

    /// Add addresses; return the ones that failed, with the error.
    pub(crate) async fn add(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        let lines: Vec<String> = ips.iter().map(|&ip| self.add_line(ip)).collect();
        self.apply(ips, lines, |_| false).await
    }

    /// Remove addresses (already absent counts as removed); return failures.
    pub(crate) async fn del(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        let lines: Vec<String> = ips.iter().map(|&ip| self.del_line(ip)).collect();
        self.apply(ips, lines, |e| {
            e.contains("Cannot assign requested address") || e.contains("Address not found")
        })
        .await
    }

    /// One `ip -batch` for the whole change; only if that fails, one command
    /// per line to learn which ones failed.
    async fn apply(
        &self,
        ips: &[IpAddr],
        lines: Vec<String>,
        benign: impl Fn(&str) -> bool,
    ) -> Vec<(IpAddr, String)> {
        if lines.is_empty() {
            return Vec::new();
        }
        let mut script = lines.join("\n");
        script.push('\n');
        if ip_batch(&script).await.is_ok() {
            return Vec::new();
        }
        let mut failed = Vec::new();
        for (&addr, line) in ips.iter().zip(&lines) {
            let args: Vec<&str> = line.split(' ').collect();
            if let Err(e) = ip(&args).await {
                if !benign(&e) {
                    failed.push((addr, e));
                }
            }
        }
        failed
    }

    /// Remove every address we own: the whole dummy interface, or our
    /// addresses on `lo`.
    pub(crate) async fn teardown(&self, ips: &[IpAddr]) -> Vec<(IpAddr, String)> {
        if self.label.is_none() {
            match ip(&["link", "del", &self.iface]).await {
                Ok(()) => return Vec::new(),
                Err(e) => {
                    tracing::warn!(interface = %self.iface, error = %e, "deleting the interface")
                }
            }
        }
        self.del(ips).await
    }
}

async fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn ip(args: &[&str]) -> Result<(), String> {
    ip_output(args).await.map(|_| ())
}

async fn ip_batch(script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running ip: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("writing to ip: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
