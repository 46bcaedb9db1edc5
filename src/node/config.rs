//! Node daemon settings: kube-proxy-style flags, optionally from a YAML file
//! (`--config`, keys in KubeProxyConfiguration's spelling: `mode`,
//! `hostnameOverride`, `nodePortAddresses`, `metricsBindAddress`,
//! `healthzBindAddress`, `minSyncPeriod`, `syncPeriod`). Flags given on the command line
//! win over the file.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// How Services are proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Userspace,
    Nftables,
}

/// Everything the node daemon needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub proxy_mode: ProxyMode,
    pub hostname_override: Option<String>,
    /// Addresses NodePorts listen on (empty = all).
    pub nodeport_addresses: Vec<IpAddr>,
    pub metrics_bind_address: SocketAddr,
    pub healthz_bind_address: SocketAddr,
    /// After a burst of two syncs, the least time between syncs (0: none;
    /// the node paces itself, see [`crate::node`]).
    pub min_sync_period: Duration,
    /// How often, without changes, the proxy checks that the kernel still
    /// has its rules (nftables: the ruleset generation; repaired if anyone
    /// else committed).
    pub sync_period: Duration,
    /// Cluster DNS settings (`None`: no DNS server on this node).
    pub dns: Option<DnsSettings>,
    /// Register this node's `Node` and heartbeat its Lease (the kubelet's
    /// `--register-node`).
    pub register_node: bool,
    /// The address the Node reports as InternalIP (`--node-ip`; `None`:
    /// the first non-loopback IPv4 address).
    pub node_ip: Option<IpAddr>,
    /// How often the node renews its Lease (`--node-status-update-frequency`).
    pub node_status_update_frequency: Duration,
    /// Run the Pods bound to this node (`--run-pods`).
    pub run_pods: bool,
    /// Where pod state lives (`--data-dir`).
    pub data_dir: std::path::PathBuf,
    /// `--cluster-cidr`: the whole pod range.
    pub cluster_cidr: crate::api::service::ServiceCidr,
    /// `--pod-cidr` (`None`: the Node's spec.podCIDR).
    pub pod_cidr: Option<crate::api::service::ServiceCidr>,
    /// CrashLoopBackOff delays.
    pub backoff: crate::kubelet::lifecycle::Backoff,
    /// The cluster CA (PEM, from the kubeconfig): who may read container
    /// logs on port 10250.
    pub client_ca: Option<Vec<u8>>,
    /// `--container-log-max-size` in bytes.
    pub log_max_bytes: u64,
}

/// Cluster DNS settings of the node daemon.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// `--cluster-domain`.
    pub cluster_domain: String,
    /// `--cluster-dns`: the kube-dns Service IP, served on port 53 and made
    /// a local address (on `lo`) by the daemon.
    pub cluster_dns: Option<IpAddr>,
    /// `--dns-bind-address`: more addresses to serve on.
    pub bind: Vec<SocketAddr>,
    /// `--dns-upstream`; empty = the node's /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    pub ttl: Duration,
    /// `a-b-c-d.<ns>.pod.<zone>` records (CoreDNS `pods insecure`).
    pub pod_records: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            cluster_domain: "cluster.local".into(),
            cluster_dns: Some(crate::dns::DEFAULT_SERVICE_IP),
            bind: Vec::new(),
            upstreams: Vec::new(),
            ttl: Duration::from_secs(5),
            pod_records: true,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            proxy_mode: ProxyMode::Userspace,
            hostname_override: None,
            nodeport_addresses: Vec::new(),
            metrics_bind_address: "127.0.0.1:10249".parse().unwrap(),
            healthz_bind_address: "0.0.0.0:10256".parse().unwrap(),
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_secs(30),
            dns: Some(DnsSettings::default()),
            register_node: true,
            node_ip: None,
            node_status_update_frequency: Duration::from_secs(10),
            run_pods: true,
            data_dir: std::path::PathBuf::from("/var/lib/fairlead"),
            cluster_cidr: "10.244.0.0/16".parse().expect("a valid CIDR"),
            pod_cidr: None,
            backoff: crate::kubelet::lifecycle::Backoff::default(),
            client_ca: None,
            log_max_bytes: 10 * 1024 * 1024,
        }
    }
}

impl NodeConfig {
    /// This node's name: the override, else the host name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.hostname_override {
            return n.to_lowercase();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).to_lowercase()
        } else {
            "localhost".into()
        }
    }
}

/// The subset of KubeProxyConfiguration we read from `--config`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    pub mode: Option<ProxyMode>,
    pub hostname_override: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub metrics_bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
}

/// Parse a Go-style duration ("1s", "500ms", "2m").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parse an address with or without a port (kube-proxy accepts both).
pub fn parse_bind(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("invalid bind address {s:?}"))
}

/// Parse `nodePortAddresses` entries: IPs or CIDRs (the CIDR's address is
/// used; "0.0.0.0/0" means all).
pub fn parse_nodeport_address(s: &str) -> Result<Option<IpAddr>, String> {
    let ip = s.split('/').next().unwrap_or(s);
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("invalid node port address {s:?}"))?;
    Ok((!ip.is_unspecified()).then_some(ip))
}

impl FileConfig {
    /// Read and parse a config file; errors name the file.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
    }

    /// Apply the file's settings onto `cfg`.
    pub fn apply(&self, cfg: &mut NodeConfig) -> Result<(), String> {
        if let Some(m) = self.mode {
            cfg.proxy_mode = m;
        }
        if let Some(h) = &self.hostname_override {
            cfg.hostname_override = Some(h.clone());
        }
        if let Some(a) = &self.node_port_addresses {
            cfg.nodeport_addresses = a
                .iter()
                .map(|s| parse_nodeport_address(s))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect();
        }
        if let Some(a) = &self.metrics_bind_address {
            cfg.metrics_bind_address = parse_bind(a, 10249)?;
        }
        if let Some(a) = &self.healthz_bind_address {
            cfg.healthz_bind_address = parse_bind(a, 10256)?;
        }
        if let Some(d) = &self.min_sync_period {
            cfg.min_sync_period = parse_duration(d)?;
        }
        if let Some(d) = &self.sync_period {
            cfg.sync_period = parse_duration(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_addresses() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("3x").is_err());
        assert_eq!(parse_bind("0.0.0.0", 10256).unwrap().port(), 10256);
        assert_eq!(parse_bind("127.0.0.1:9", 1).unwrap().port(), 9);
        assert_eq!(parse_nodeport_address("0.0.0.0/0").unwrap(), None);
    }

    #[test]
    fn file_config_applies() {
        let f: FileConfig = serde_yaml::from_str(
            "mode: userspace\nhostnameOverride: n1\nminSyncPeriod: 1s\nmetricsBindAddress: 127.0.0.1:9999\n",
        )
        .unwrap();
        let mut c = NodeConfig::default();
        f.apply(&mut c).unwrap();
        assert_eq!(c.node_name(), "n1");
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.metrics_bind_address.port(), 9999);
    }
}
