//! Node daemon settings: kube-proxy-style flags, optionally from a
//! KubeProxyConfiguration file (`--config`, read as kube-proxy's own:
//! `mode`, `hostnameOverride`, `nodePortAddresses`, `metricsBindAddress`,
//! `healthzBindAddress`, `minSyncPeriod`, `syncPeriod`, `nftables.*SyncPeriod`,
//! `clusterCIDR`, `clientConnection.kubeconfig`; other fields are named in
//! a warning). Flags given on the command line win over the file.

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
    /// The Service ClusterIP range, if known (nftables mode drops new
    /// connections to it that no Service rule translated).
    pub service_cidr: Option<crate::api::service::ServiceCidr>,
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
    /// `--dns-rrl`: UDP answers per second per client.
    pub rrl: Option<u32>,
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
            rrl: None,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            proxy_mode: ProxyMode::Userspace,
            hostname_override: None,
            nodeport_addresses: Vec::new(),
            service_cidr: None,
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

/// The part of a KubeProxyConfiguration (`kubeproxy.config.k8s.io/v1alpha1`)
/// fairlead reads from `--config`. A real kube-proxy file (kubeadm's
/// ConfigMap, as it is) parses: empty strings and zero durations mean
/// "default", as in kube-proxy, and every other field is named in a
/// warning at start ([`FileConfig::parse`]).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    pub mode: Option<String>,
    pub hostname_override: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub metrics_bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub nftables: Option<NftablesSection>,
    pub client_connection: Option<ClientConnection>,
}

/// `nftables:` (kube-proxy 1.29+).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftablesSection {
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
}

/// `clientConnection:`: only the kubeconfig path is read.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
}

/// Top-level KubeProxyConfiguration fields that [`FileConfig`] reads; the
/// value is the subfields read, for sections.
const READ_FIELDS: &[(&str, &[&str])] = &[
    ("apiVersion", &[]),
    ("kind", &[]),
    ("mode", &[]),
    ("hostnameOverride", &[]),
    ("nodePortAddresses", &[]),
    ("metricsBindAddress", &[]),
    ("healthzBindAddress", &[]),
    ("minSyncPeriod", &[]),
    ("syncPeriod", &[]),
    ("clusterCIDR", &[]),
    ("nftables", &["minSyncPeriod", "syncPeriod"]),
    ("clientConnection", &["kubeconfig"]),
];

/// The API version kube-proxy's config files carry.
pub const KUBE_PROXY_CONFIG_API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// A string field that is set: kube-proxy reads "" as unset.
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A duration field that is set: "" and zero mean kube-proxy's default.
fn set_duration(v: &Option<String>) -> Result<Option<Duration>, String> {
    match set(v) {
        None => Ok(None),
        Some(d) => parse_duration(d).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// Parse a Go-style duration ("1s", "500ms", "2m").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // A bare number is seconds; otherwise Go's form, as kube components
    // print durations: a sequence of number+unit (`1m0s`, `1h30m`, `500ms`).
    if let Ok(n) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(n)
            .map_err(|_| format!("invalid duration {s:?}: out of range"));
    }
    let mut rest = s;
    let mut secs = 0.0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("invalid duration {s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        secs += n * match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        rest = tail;
    }
    // (A number too large for a Duration is an error, not a panic: found
    // by fuzzing `--config`.)
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}: out of range"))
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
    /// Read and parse a config file, logging what it sets that fairlead
    /// ignores; errors name the file.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let (cfg, ignored) =
            FileConfig::parse(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        for field in ignored {
            tracing::warn!(file = %path.display(), %field, "KubeProxyConfiguration field not used by fairlead; ignored");
        }
        Ok(cfg)
    }

    /// Parse a KubeProxyConfiguration (or a file of just the fields
    /// fairlead reads): the settings, and the fields present that fairlead
    /// ignores (dotted paths, e.g. `conntrack.maxPerCore`).
    pub fn parse(text: &str) -> Result<(FileConfig, Vec<String>), String> {
        let raw: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut ignored = Vec::new();
        if let Some(map) = raw.as_mapping() {
            for (k, v) in map {
                let key = k.as_str().unwrap_or_default();
                match READ_FIELDS.iter().find(|(f, _)| *f == key) {
                    None => ignored.push(key.to_string()),
                    Some((_, subs)) if !subs.is_empty() => {
                        for sub in v.as_mapping().into_iter().flatten() {
                            let sub = sub.0.as_str().unwrap_or_default();
                            if !subs.contains(&sub) {
                                ignored.push(format!("{key}.{sub}"));
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
            if let Some(kind) = map.get("kind").and_then(|k| k.as_str()) {
                if kind != "KubeProxyConfiguration" {
                    return Err(format!("kind {kind:?}: expected KubeProxyConfiguration"));
                }
            }
            if let Some(v) = map.get("apiVersion").and_then(|k| k.as_str()) {
                if v != KUBE_PROXY_CONFIG_API_VERSION {
                    return Err(format!(
                        "apiVersion {v:?}: expected {KUBE_PROXY_CONFIG_API_VERSION}"
                    ));
                }
            }
        }
        let cfg: FileConfig = serde_yaml::from_value(raw).map_err(|e| e.to_string())?;
        Ok((cfg, ignored))
    }

    /// The kubeconfig the file names (`clientConnection.kubeconfig`).
    pub fn kubeconfig(&self) -> Option<std::path::PathBuf> {
        self.client_connection
            .as_ref()
            .and_then(|c| set(&c.kubeconfig))
            .map(Into::into)
    }

    /// Apply the file's settings onto `cfg`.
    pub fn apply(&self, cfg: &mut NodeConfig) -> Result<(), String> {
        match set(&self.mode) {
            None => {}
            Some("nftables") => cfg.proxy_mode = ProxyMode::Nftables,
            Some("userspace") => cfg.proxy_mode = ProxyMode::Userspace,
            // kube-proxy's kernel modes: fairlead's kernel mode is nftables.
            Some(m @ ("iptables" | "ipvs" | "kernelspace")) => {
                tracing::warn!(mode = m, "KubeProxyConfiguration mode is not fairlead's; using nftables");
                cfg.proxy_mode = ProxyMode::Nftables;
            }
            Some(m) => {
                return Err(format!(
                    "mode {m:?}: expected nftables or userspace (or kube-proxy's iptables/ipvs, read as nftables)"
                ))
            }
        }
        if let Some(h) = set(&self.hostname_override) {
            cfg.hostname_override = Some(h.to_string());
        }
        if let Some(a) = &self.node_port_addresses {
            let mut out = Vec::new();
            for s in a {
                if s == "primary" {
                    // kube-proxy's "the node's primary IPs": every address
                    // here (a warning, as the set is wider).
                    tracing::warn!("nodePortAddresses \"primary\" is read as all addresses");
                    continue;
                }
                out.extend(parse_nodeport_address(s)?);
            }
            cfg.nodeport_addresses = out;
        }
        if let Some(a) = set(&self.metrics_bind_address) {
            cfg.metrics_bind_address = parse_bind(a, 10249)?;
        }
        if let Some(a) = set(&self.healthz_bind_address) {
            cfg.healthz_bind_address = parse_bind(a, 10256)?;
        }
        // The top-level period (kube-proxy 1.31+), else the nftables one.
        let nft = self.nftables.as_ref();
        let period = |top: &Option<String>,
                      section: fn(&NftablesSection) -> &Option<String>|
         -> Result<Option<Duration>, String> {
            match set_duration(top)? {
                Some(d) => Ok(Some(d)),
                None => Ok(nft.map(|n| set_duration(section(n))).transpose()?.flatten()),
            }
        };
        if let Some(d) = period(&self.min_sync_period, |n| &n.min_sync_period)? {
            cfg.min_sync_period = d;
        }
        if let Some(d) = period(&self.sync_period, |n| &n.sync_period)? {
            cfg.sync_period = d;
        }
        if let Some(c) = set(&self.cluster_cidr) {
            // kube-proxy allows a comma-separated dual-stack pair; the
            // IPv4 one is used.
            let v4 = c.split(',').find(|c| !c.contains(':')).unwrap_or(c);
            cfg.cluster_cidr = v4
                .trim()
                .parse()
                .map_err(|e| format!("clusterCIDR {c:?}: {e}"))?;
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
        // Go's form, as kube components print durations.
        assert_eq!(parse_duration("1m0s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("1m0").is_err());
        assert!(parse_duration("3x").is_err());
        let huge = format!("{}h", "7".repeat(40));
        assert!(parse_duration(&huge).unwrap_err().contains("out of range"));
        assert_eq!(parse_bind("0.0.0.0", 10256).unwrap().port(), 10256);
        assert_eq!(parse_bind("127.0.0.1:9", 1).unwrap().port(), 9);
        assert_eq!(parse_nodeport_address("0.0.0.0/0").unwrap(), None);
    }

    /// A KubeProxyConfiguration as kubeadm writes it into the kube-proxy
    /// ConfigMap (v1.32), read as it is.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadm_kube_proxy_config_reads_as_it_is() {
        let (f, ignored) = FileConfig::parse(KUBEADM).unwrap();
        let mut c = NodeConfig::default();
        let before = c.clone();
        f.apply(&mut c).unwrap();
        // "" and 0s are defaults: nothing but clusterCIDR changes.
        assert_eq!(c.proxy_mode, before.proxy_mode);
        assert_eq!(c.metrics_bind_address, before.metrics_bind_address);
        assert_eq!(c.sync_period, before.sync_period);
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(
            f.kubeconfig().unwrap().display().to_string(),
            "/var/lib/kube-proxy/kubeconfig.conf"
        );
        for field in [
            "bindAddress",
            "conntrack",
            "iptables",
            "ipvs",
            "winkernel",
            "logging",
            "clientConnection.qps",
            "nftables.masqueradeAll",
            "oomScoreAdj",
        ] {
            assert!(
                ignored.iter().any(|i| i == field),
                "{field} not reported: {ignored:?}"
            );
        }
        for read in [
            "mode",
            "clusterCIDR",
            "nftables.syncPeriod",
            "clientConnection.kubeconfig",
        ] {
            assert!(
                !ignored.iter().any(|i| i == read),
                "{read} reported: {ignored:?}"
            );
        }
    }

    #[test]
    fn kube_proxy_modes_and_bad_files() {
        let mut c = NodeConfig::default();
        let (f, _) = FileConfig::parse("mode: iptables\nnftables: {syncPeriod: 45s}\n").unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.proxy_mode, ProxyMode::Nftables);
        assert_eq!(c.sync_period, Duration::from_secs(45));
        let (f, _) = FileConfig::parse("mode: bogus\n").unwrap();
        assert!(f.apply(&mut c).unwrap_err().contains("bogus"));
        let e = FileConfig::parse("kind: KubeletConfiguration\n").unwrap_err();
        assert!(e.contains("KubeProxyConfiguration"), "{e}");
        let e = FileConfig::parse("apiVersion: v1\nkind: KubeProxyConfiguration\n").unwrap_err();
        assert!(e.contains("v1alpha1"), "{e}");
    }

    #[test]
    fn file_config_applies() {
        let (f, ignored) = FileConfig::parse(
            "mode: userspace\nhostnameOverride: n1\nminSyncPeriod: 1s\nmetricsBindAddress: 127.0.0.1:9999\n",
        )
        .unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        let mut c = NodeConfig::default();
        f.apply(&mut c).unwrap();
        assert_eq!(c.node_name(), "n1");
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.metrics_bind_address.port(), 9999);
    }
}
