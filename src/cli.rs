//! The `fairlead` command line: one binary, one subcommand per role.
//! Errors print as one line and exit non-zero (`main.rs`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::satoken::SERVICE_ACCOUNT_DIR;
use crate::api::service::ServiceCidr;
use crate::apiserver;

/// `fairlead --version`: the crate version, the commit and the build date
/// (stamped by `build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FAIRLEAD_GIT_COMMIT"),
    ", built ",
    env!("FAIRLEAD_BUILD_DATE"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "fairlead",
    version = VERSION,
    about = "Kubernetes Service proxy + cluster DNS, with the minimal control plane that feeds them"
)]
pub struct Cli {
    /// Log lines as text, or as one JSON object each (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (to stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Everything on one node: embedded store + API server + controllers +
    /// scheduler + node daemon. Prints the kubeconfig path and where things listen.
    Up(UpArgs),
    /// The Kubernetes-compatible API server alone.
    Apiserver(ApiServerArgs),
    /// The controllers (EndpointSlices, Endpoints) with leader election.
    Controllers(ControllersArgs),
    /// The node daemon: Service proxy (+ health and metrics endpoints).
    Node(NodeArgs),
    /// Join this host to a cluster with a join token, then run the node
    /// daemon as `system:node:<name>` (like `k3s agent`).
    Join(JoinArgs),
    /// Create, list and revoke join tokens (like `kubeadm token`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The scheduler: binds Pods waiting for the default scheduler to nodes.
    Scheduler(ClientArgs),
    /// A demo backend answering with its name (HTTP, TCP and UDP echo).
    Echo(crate::echo::EchoArgs),
    /// Print a shell completion script (e.g. `source <(fairlead
    /// completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub apiserver: ApiServerArgs,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Most endpoints in one EndpointSlice.
    #[arg(long, default_value_t = 100)]
    pub max_endpoints_per_slice: usize,
    #[command(flatten)]
    pub ipam: IpamFlags,
    #[command(flatten)]
    pub lifecycle: LifecycleFlags,
}

/// Where to find the API server.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// kubeconfig of the API server (e.g. <data-dir>/kubeconfig). Without
    /// it: in a pod, its service-account credentials; else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, overriding the kubeconfig's (kube-proxy's
    /// and kube-controller-manager's --master), e.g. https://api1:6443.
    #[arg(long)]
    pub master: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ControllersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Most endpoints in one EndpointSlice.
    #[arg(long, default_value_t = 100)]
    pub max_endpoints_per_slice: usize,
    /// This instance's identity in the leader Lease (default: host_pid).
    #[arg(long)]
    pub identity: Option<String>,
    /// Seconds a leader Lease is valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub leader_elect_lease_duration: u64,
    /// Seconds a leader keeps acting without a successful renewal.
    #[arg(long, default_value_t = 10)]
    pub leader_elect_renew_deadline: u64,
    /// Seconds between lease attempts.
    #[arg(long, default_value_t = 2)]
    pub leader_elect_retry_period: u64,
    #[command(flatten)]
    pub ipam: IpamFlags,
    #[command(flatten)]
    pub lifecycle: LifecycleFlags,
    /// CA certificate (PEM) that signs node client certificates requested
    /// through CertificateSigningRequests. With the key, enables the signer.
    #[arg(long, requires = "cluster_signing_key_file")]
    pub cluster_signing_cert_file: Option<PathBuf>,
    /// CA private key (PEM) for `--cluster-signing-cert-file`.
    #[arg(long, requires = "cluster_signing_cert_file")]
    pub cluster_signing_key_file: Option<PathBuf>,
}

/// Node lifecycle flags, in kube-controller-manager's spelling.
#[derive(Args, Debug, Clone)]
pub struct LifecycleFlags {
    /// How long a node may go without a heartbeat before it is Unknown
    /// (and tainted unreachable), e.g. 40s.
    #[arg(long, default_value = "40s")]
    pub node_monitor_grace_period: String,
    /// How often node heartbeats are checked, e.g. 5s.
    #[arg(long, default_value = "5s")]
    pub node_monitor_period: String,
}

impl LifecycleFlags {
    fn config(&self) -> anyhow::Result<crate::controllers::nodelifecycle::Config> {
        Ok(crate::controllers::nodelifecycle::Config {
            grace: crate::node::config::parse_duration(&self.node_monitor_grace_period)
                .map_err(anyhow::Error::msg)?,
            period: crate::node::config::parse_duration(&self.node_monitor_period)
                .map_err(anyhow::Error::msg)?,
        })
    }
}

/// Node IPAM flags, in kube-controller-manager's spelling.
#[derive(Args, Debug, Clone)]
pub struct IpamFlags {
    /// The range pod CIDRs of Nodes are allocated from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: ServiceCidr,
    /// The prefix length of each Node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// Give Nodes pod CIDRs (true/false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub allocate_node_cidrs: bool,
}

impl IpamFlags {
    fn config(&self) -> anyhow::Result<Option<crate::controllers::nodeipam::IpamConfig>> {
        if !self.allocate_node_cidrs {
            return Ok(None);
        }
        crate::controllers::nodeipam::IpamConfig::new(self.cluster_cidr, self.node_cidr_mask_size)
            .map(Some)
            .map_err(anyhow::Error::msg)
    }
}

/// Node daemon flags, in kube-proxy's spelling.
#[derive(Args, Debug, Clone)]
pub struct NodeFlags {
    /// userspace (tokio listeners) or nftables.
    #[arg(long, value_enum)]
    pub proxy_mode: Option<crate::node::ProxyMode>,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Addresses (or CIDRs) NodePorts listen on; default all.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Prometheus metrics address (default 127.0.0.1:10249).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Health check address (default 0.0.0.0:10256).
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// After a burst of two syncs, the least time between proxy syncs, e.g.
    /// 100ms, 1s (default 0: changes apply at once; the node still spaces
    /// syncs, after 500 ms of them at once, so they take at most a fifth of
    /// its time).
    #[arg(long)]
    pub min_sync_period: Option<String>,
    /// How often, without changes, the kernel's rules are checked (and
    /// repaired if someone else changed them), e.g. 30s.
    #[arg(long)]
    pub sync_period: Option<String>,
    /// A KubeProxyConfiguration-style YAML file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Do not serve cluster DNS on this node.
    #[arg(long)]
    pub disable_dns: bool,
    /// The cluster DNS zone.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The kube-dns Service IP, served on port 53 on this node.
    #[arg(long, default_value = "10.96.0.10")]
    pub cluster_dns: std::net::IpAddr,
    /// More addresses (ip:port) to serve DNS on, e.g. 127.0.0.1:5353.
    #[arg(long, value_delimiter = ',')]
    pub dns_bind_address: Vec<std::net::SocketAddr>,
    /// Resolvers for names outside the cluster (ip or ip:port); default: /etc/resolv.conf.
    #[arg(long, value_delimiter = ',')]
    pub dns_upstream: Vec<String>,
    /// TTL of cluster records, e.g. 5s.
    #[arg(long, default_value = "5s")]
    pub dns_ttl: String,
    /// Serve a-b-c-d.<ns>.pod.<zone> records (true/false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_pod_records: bool,
    /// Answer at most N UDP queries per second per client; past it every
    /// second query gets an empty truncated reply (retry over TCP) and the
    /// rest none (response-rate limiting). Off by default.
    #[arg(long, value_name = "N")]
    pub dns_rrl: Option<u32>,
    /// Register this node's Node object and heartbeat its Lease in
    /// kube-node-lease (true/false), as the kubelet does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub register_node: bool,
    /// The node's InternalIP (default: the first non-loopback IPv4 address).
    #[arg(long)]
    pub node_ip: Option<std::net::IpAddr>,
    /// How often the node renews its Lease, e.g. 10s.
    #[arg(long, default_value = "10s")]
    pub node_status_update_frequency: String,
    /// Run the Pods bound to this node (true/false; false: a proxy-only
    /// node, as kube-proxy alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub run_pods: bool,
    /// This node's pod range (default: the Node's spec.podCIDR, set by the
    /// controllers' node IPAM).
    #[arg(long)]
    pub pod_cidr: Option<ServiceCidr>,
    /// First CrashLoopBackOff delay (doubling from the second restart).
    #[arg(long, default_value = "10s")]
    pub crash_loop_backoff: String,
    /// Longest CrashLoopBackOff delay.
    #[arg(long, default_value = "5m")]
    pub crash_loop_max_backoff: String,
    /// Rotate a container's log file past this size (e.g. 10Mi).
    #[arg(long, default_value = "10Mi")]
    pub container_log_max_size: String,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Remove what the node leaves behind and exit: the proxy's nftables
    /// tables and addresses, and every pod's processes, cgroup, network
    /// namespace and files, the pod bridge and its masquerade table.
    #[arg(long)]
    pub cleanup: bool,
    /// Directory for pod state (logs, address allocations).
    #[arg(long, env = "FAIRLEAD_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// The whole pod range; pod traffic leaving it is masqueraded
    /// (default: --config's clusterCIDR, else 10.244.0.0/16).
    #[arg(long)]
    pub cluster_cidr: Option<ServiceCidr>,
    /// The cluster's Service ClusterIP range (the API server's
    /// --service-cluster-ip-range). With it, nftables mode drops a new
    /// connection to the range that no Service translated (one that came
    /// before its Service's rules), so the client's next SYN is balanced
    /// instead of the connect timing out.
    #[arg(long)]
    pub service_cluster_ip_range: Option<ServiceCidr>,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    /// An API server of the cluster, e.g. https://10.0.0.1:6443.
    #[arg(long)]
    pub server: String,
    /// The join token (a server's <data-dir>/token, or `fairlead token create`).
    #[arg(long, env = "FAIRLEAD_TOKEN", required_unless_present = "token_file")]
    pub token: Option<String>,
    /// A file holding the join token.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Directory for this node's kubeconfig and pod state.
    #[arg(long, env = "FAIRLEAD_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// The whole pod range; pod traffic leaving it is masqueraded
    /// (default: --config's clusterCIDR, else 10.244.0.0/16).
    #[arg(long)]
    pub cluster_cidr: Option<ServiceCidr>,
    /// The cluster's Service ClusterIP range (as for `fairlead node`).
    #[arg(long)]
    pub service_cluster_ip_range: Option<ServiceCidr>,
    /// Port of the local load balancer to every API server (on 127.0.0.1,
    /// as k3s's agent); 0 connects to --server directly.
    #[arg(long, default_value_t = 6444)]
    pub lb_server_port: u16,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token and print it.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// How long the token is valid (e.g. 24h, 30m; 0 = for ever).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// What the token is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (ids, expiry, description; never secrets).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a join token by id.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        /// The token's id (its first 6 characters) or the whole token.
        id: String,
    },
}

impl NodeFlags {
    /// `clientConnection.kubeconfig` of `--config`, if any.
    pub fn file_kubeconfig(&self) -> anyhow::Result<Option<PathBuf>> {
        match &self.config {
            Some(path) => {
                // (Read again quietly: config() already warned.)
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                let (file, _) = crate::node::config::FileConfig::parse(&text)
                    .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
                Ok(file.kubeconfig())
            }
            None => Ok(None),
        }
    }

    pub fn config(&self) -> anyhow::Result<crate::node::NodeConfig> {
        use crate::node::config::*;
        let mut cfg = NodeConfig::default();
        if let Some(path) = &self.config {
            FileConfig::load(path)
                .and_then(|f| f.apply(&mut cfg))
                .map_err(anyhow::Error::msg)?;
        }
        if let Some(m) = self.proxy_mode {
            cfg.proxy_mode = m;
        }
        if let Some(h) = &self.hostname_override {
            cfg.hostname_override = Some(h.clone());
        }
        if !self.nodeport_addresses.is_empty() {
            cfg.nodeport_addresses = self
                .nodeport_addresses
                .iter()
                .map(|s| parse_nodeport_address(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .flatten()
                .collect();
        }
        if let Some(a) = &self.metrics_bind_address {
            cfg.metrics_bind_address = parse_bind(a, 10249).map_err(anyhow::Error::msg)?;
        }
        if let Some(a) = &self.healthz_bind_address {
            cfg.healthz_bind_address = parse_bind(a, 10256).map_err(anyhow::Error::msg)?;
        }
        if let Some(d) = &self.min_sync_period {
            cfg.min_sync_period = parse_duration(d).map_err(anyhow::Error::msg)?;
        }
        if let Some(d) = &self.sync_period {
            cfg.sync_period = parse_duration(d).map_err(anyhow::Error::msg)?;
        }
        cfg.register_node = self.register_node;
        cfg.run_pods = self.run_pods;
        cfg.pod_cidr = self.pod_cidr;
        cfg.log_max_bytes = crate::kubelet::pod::quantity(&self.container_log_max_size)
            .filter(|b| *b >= 1.0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid --container-log-max-size {:?}: expected a size such as 10Mi",
                    self.container_log_max_size
                )
            })? as u64;
        cfg.backoff = crate::kubelet::lifecycle::Backoff {
            initial: parse_duration(&self.crash_loop_backoff).map_err(anyhow::Error::msg)?,
            max: parse_duration(&self.crash_loop_max_backoff).map_err(anyhow::Error::msg)?,
        };
        cfg.node_ip = self.node_ip;
        cfg.node_status_update_frequency =
            parse_duration(&self.node_status_update_frequency).map_err(anyhow::Error::msg)?;
        if cfg.node_status_update_frequency.is_zero() {
            anyhow::bail!("--node-status-update-frequency must be more than 0");
        }
        cfg.dns = if self.disable_dns {
            None
        } else {
            let upstreams = self
                .dns_upstream
                .iter()
                .map(|u| {
                    u.parse::<std::net::SocketAddr>()
                        .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                        .map_err(|_| {
                            anyhow::anyhow!("invalid --dns-upstream {u:?}: expected ip or ip:port")
                        })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Some(crate::node::config::DnsSettings {
                cluster_domain: self.cluster_domain.clone(),
                cluster_dns: Some(self.cluster_dns),
                bind: self.dns_bind_address.clone(),
                upstreams,
                ttl: parse_duration(&self.dns_ttl).map_err(anyhow::Error::msg)?,
                pod_records: self.dns_pod_records,
                rrl: self.dns_rrl,
            })
        };
        Ok(cfg)
    }
}

impl ControllersArgs {
    fn config(&self) -> anyhow::Result<crate::controllers::Config> {
        let identity = self.identity.clone().unwrap_or_else(|| {
            format!(
                "{}_{}",
                crate::node::NodeConfig::default().node_name(),
                std::process::id()
            )
        });
        Ok(crate::controllers::Config {
            max_endpoints_per_slice: self.max_endpoints_per_slice,
            ipam: self.ipam.config()?,
            lifecycle: self.lifecycle.config()?,
            signer: self
                .cluster_signing_cert_file
                .clone()
                .zip(self.cluster_signing_key_file.clone())
                .map(|(ca_cert, ca_key)| crate::controllers::csr::Signer { ca_cert, ca_key }),
            leader: crate::controllers::leader::LeaderConfig {
                namespace: "kube-system".into(),
                name: "fairlead-controllers".into(),
                identity,
                lease_duration: Duration::from_secs(self.leader_elect_lease_duration),
                renew_deadline: Duration::from_secs(self.leader_elect_renew_deadline),
                retry_period: Duration::from_secs(self.leader_elect_retry_period.max(1)),
            },
        })
    }
}

/// Where a client's credentials come from (see [`ClientArgs::source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    /// A kubeconfig file.
    File(PathBuf),
    /// In a pod: the service-account token and CA under
    /// [`SERVICE_ACCOUNT_DIR`], the API server from
    /// `$KUBERNETES_SERVICE_HOST` / `$KUBERNETES_SERVICE_PORT`.
    InCluster,
}

impl ClientArgs {
    /// Every Kubernetes component's order: `--kubeconfig`, then
    /// `$KUBECONFIG` (both land in `kubeconfig`), then in-cluster (in a
    /// pod: `$KUBERNETES_SERVICE_HOST` set and a token mounted), then
    /// `~/.kube/config`.
    pub fn source(&self) -> anyhow::Result<ClientSource> {
        if let Some(p) = &self.kubeconfig {
            return Ok(ClientSource::File(p.clone()));
        }
        let token = std::path::Path::new(SERVICE_ACCOUNT_DIR).join("token");
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && token.exists() {
            return Ok(ClientSource::InCluster);
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = PathBuf::from(home).join(".kube").join("config");
            if p.exists() {
                return Ok(ClientSource::File(p));
            }
        }
        anyhow::bail!(
            "no credentials: give --kubeconfig (or $KUBECONFIG), run in a pod (service-account token at {SERVICE_ACCOUNT_DIR}), or have ~/.kube/config"
        )
    }

    /// A client from [`ClientArgs::source`]. In-cluster, the token file is
    /// re-read as the kubelet rotates it (kube-rs reloads it each minute).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let mut cfg = match self.source()? {
            ClientSource::File(p) => config_from(&p).await?,
            ClientSource::InCluster => kube::Config::incluster()
                .map_err(|e| anyhow::anyhow!("in-cluster configuration: {e}"))?,
        };
        if let Some(m) = &self.master {
            cfg.cluster_url = m
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid --master {m:?}: {e}"))?;
        }
        Ok(kube::Client::try_from(cfg)?)
    }

    /// The cluster CA (PEM) of [`ClientArgs::source`].
    fn ca(&self) -> Option<Vec<u8>> {
        match self.source().ok()? {
            ClientSource::File(p) => ca_from_kubeconfig(&p),
            ClientSource::InCluster => {
                std::fs::read(std::path::Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt")).ok()
            }
        }
    }

    /// The kubeconfig file, for commands that need one (token commands
    /// read the CA from it).
    fn path(&self) -> anyhow::Result<PathBuf> {
        match self.source()? {
            ClientSource::File(p) => Ok(p),
            ClientSource::InCluster => anyhow::bail!("this command needs --kubeconfig"),
        }
    }
}

/// The kube-rs configuration of a kubeconfig file.
async fn config_from(path: &std::path::Path) -> anyhow::Result<kube::Config> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))
}

/// A kube-rs client from a kubeconfig file.
pub async fn client_from(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    Ok(kube::Client::try_from(config_from(path).await?)?)
}

/// A client for `path`'s credentials that connects through the API server
/// load balancer at `lb` (every server's certificate covers 127.0.0.1).
async fn client_through(
    path: &std::path::Path,
    lb: std::net::SocketAddr,
) -> anyhow::Result<kube::Client> {
    let mut cfg = config_from(path).await?;
    cfg.cluster_url = format!("https://{lb}").parse()?;
    Ok(kube::Client::try_from(cfg)?)
}

/// The agent's load balancer to every API server, seeded with `--server`
/// and the server of the node's kubeconfig.
async fn start_api_lb(
    args: &JoinArgs,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<crate::node::apilb::ApiLb> {
    let mut urls = vec![args.server.clone()];
    if let Ok(kc) = kube::config::Kubeconfig::read_from(kubeconfig) {
        urls.extend(
            kc.clusters
                .iter()
                .filter_map(|c| c.cluster.as_ref()?.server.clone()),
        );
    }
    let mut seeds = Vec::new();
    for url in urls {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--server {url}: {e}"))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => seeds.extend(addrs),
            Err(e) => tracing::warn!(server = %url, error = %e, "cannot resolve an API server"),
        }
    }
    let bind = std::net::SocketAddr::from(([127, 0, 0, 1], args.lb_server_port));
    crate::node::apilb::ApiLb::start(bind, &seeds, args.data_dir.join("apiservers.json")).await
}

/// The cluster CA (PEM) a kubeconfig trusts for its current cluster.
fn ca_from_kubeconfig(path: &std::path::Path) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let kc = kube::config::Kubeconfig::read_from(path).ok()?;
    let ctx_name = kc.current_context.clone()?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)?
        .context
        .clone()?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)?
        .cluster
        .clone()?;
    match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(d), _) => base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .ok(),
        (None, Some(f)) => std::fs::read(f).ok(),
        _ => None,
    }
}

fn default_data_dir() -> PathBuf {
    // Root gets the system location (like k3s's /var/lib/rancher/k3s);
    // anyone else a directory in their home.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/fairlead")
    } else {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".fairlead")
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApiServerArgs {
    /// Directory for the PKI, the kubeconfig and the embedded store.
    #[arg(long, env = "FAIRLEAD_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// Address this server publishes to the cluster (the `kubernetes`
    /// endpoints, which agents balance over, and its certificate's names);
    /// default: --bind-address, or 127.0.0.1 when that is 0.0.0.0.
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// HTTPS port of the API server (0 = any free port).
    #[arg(long, default_value_t = 6443)]
    pub secure_port: u16,
    /// More DNS names or IPs for the serving certificate (as k3s's
    /// --tls-san; repeatable or comma-separated), e.g. the name other
    /// containers reach this server by.
    #[arg(long, value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// CIDR that Service ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: ServiceCidr,
    /// etcd endpoints (comma-separated); empty = the embedded store.
    #[arg(long, value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// Static bearer tokens, CSV: token,user,uid,"group1,group2".
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// Seconds between store compactions.
    #[arg(long, default_value_t = 300)]
    pub compaction_interval_seconds: u64,
    /// How long a request (other than a watch or a log stream) may take
    /// before it is answered 504 Timeout (a duration: 60s, 1m0s).
    #[arg(long, default_value = "1m0s", value_parser = crate::node::config::parse_duration)]
    pub request_timeout: Duration,
    /// tolerationSeconds of the not-ready:NoExecute toleration added to
    /// every Pod that has none.
    #[arg(long, default_value_t = 300)]
    pub default_not_ready_toleration_seconds: i64,
    /// tolerationSeconds of the unreachable:NoExecute toleration added to
    /// every Pod that has none.
    #[arg(long, default_value_t = 300)]
    pub default_unreachable_toleration_seconds: i64,
}

impl ApiServerArgs {
    pub fn config(&self) -> apiserver::Config {
        apiserver::Config {
            data_dir: self.data_dir.clone(),
            bind_address: self.bind_address,
            advertise_address: self.advertise_address,
            secure_port: self.secure_port,
            service_cidr: self.service_cluster_ip_range,
            etcd_servers: self.etcd_servers.clone(),
            token_auth_file: self.token_auth_file.clone(),
            compaction_interval: Duration::from_secs(self.compaction_interval_seconds.max(1)),
            request_timeout: self.request_timeout,
            default_toleration_seconds: (
                self.default_not_ready_toleration_seconds,
                self.default_unreachable_toleration_seconds,
            ),
            tls_sans: self.tls_san.clone(),
        }
    }
}

/// How much lower the node loop's thread runs than everything else in
/// `fairlead up` (a nice value, the lowest priority there is short of
/// `SCHED_IDLE`, which could starve it outright).
const UP_NODE_LOOP_NICE: i32 = 19;

/// Run the node daemon of `fairlead up` on its own runtime and threads, so
/// that its work (a first sync of 30,000 Services, a flood of changes)
/// never queues behind or ahead of API requests on the control plane's
/// workers. Its result arrives on the returned channel.
///
/// CPU priorities: the node loop (`node::run_from`'s own future: decoding
/// the watched objects, the model, programming the proxy and the DNS
/// index) runs on `fl-node-main` at [`UP_NODE_LOOP_NICE`], so that when
/// the API server and the loop both want the CPU (a bulk load through the
/// API) the API requests go first and the loop catches up after; it also
/// watches the API server's store directly (`node::Source::Store`), so its
/// watches cost the API server nothing to serve. The runtime's workers
/// carry the data path (the userspace proxy's connections, DNS answers)
/// and the pods' agent at the normal priority: a data plane is never
/// deprioritized against anything.
fn spawn_node(
    kubeconfig: PathBuf,
    cfg: crate::node::NodeConfig,
    store: std::sync::Arc<dyn crate::store::Store>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("fl-node")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("fl-node-main".into())
        .spawn(move || {
            lower_priority();
            let r = rt.block_on(async move {
                let client = client_from(&kubeconfig).await?;
                crate::node::run_from(client, cfg, crate::node::Source::Store(store)).await
            });
            let _ = tx.send(r);
        })?;
    Ok(rx)
}

/// Lower this thread's CPU priority to [`UP_NODE_LOOP_NICE`].
fn lower_priority() {
    // SAFETY: setpriority on this thread's own id; no memory is shared
    // with the call.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, UP_NODE_LOOP_NICE);
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    crate::systemd::stopping();
}

async fn run_token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            client,
            ttl,
            description,
        } => {
            let ttl = crate::node::config::parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            let ca = ca_from_kubeconfig(&client.path()?).ok_or_else(|| {
                anyhow::anyhow!("the kubeconfig has no certificate-authority-data")
            })?;
            let ca = String::from_utf8(ca)?;
            let c = client.client().await?;
            let ttl = (!ttl.is_zero()).then_some(ttl);
            println!(
                "{}",
                crate::join::create_token(&c, &ca, ttl, &description).await?
            );
        }
        TokenCommand::List { client } => {
            let c = client.client().await?;
            println!("{:<8} {:<22} DESCRIPTION", "ID", "EXPIRES");
            for t in crate::join::list_tokens(&c).await? {
                let expires = t.expires.unwrap_or_else(|| "<never>".into());
                println!("{:<8} {:<22} {}", t.id, expires, t.description);
            }
        }
        TokenCommand::Delete { client, id } => {
            let c = client.client().await?;
            crate::join::delete_token(&c, &id).await?;
            println!("token {} deleted", id.split('.').next().unwrap_or(&id));
        }
    }
    Ok(())
}

/// Run a parsed command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // One TLS provider for the whole process (API server and clients).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Type=notify units with WatchdogSec= (config/systemd/); a no-op
    // elsewhere. The node daemon sends READY=1 after its first sync.
    crate::systemd::spawn_watchdog();
    match cli.command {
        Command::Up(args) => {
            let mut node_cfg = args.node.config()?;
            node_cfg.data_dir = args.apiserver.data_dir.clone();
            node_cfg.service_cidr = Some(args.apiserver.service_cluster_ip_range);
            node_cfg.cluster_cidr = args.ipam.cluster_cidr;
            let running = apiserver::start(args.apiserver.config()).await?;
            let client = client_from(&running.kubeconfig).await?;
            // Each component under its own identity, with its role's
            // rights only (crate::api::rbac).
            let controllers_kc = running.component_kubeconfig(
                "controller-manager.kubeconfig",
                "system:kube-controller-manager",
                &[],
            )?;
            let scheduler_kc = running.component_kubeconfig(
                "scheduler.kubeconfig",
                "system:kube-scheduler",
                &[],
            )?;
            let node_kc = running.component_kubeconfig(
                "node.kubeconfig",
                &format!("system:node:{}", node_cfg.node_name()),
                &["system:nodes"],
            )?;
            let (ca_cert, ca_key) = apiserver::tls::ca_files(&args.apiserver.data_dir);
            let ctrl = ControllersArgs {
                client: ClientArgs {
                    kubeconfig: Some(controllers_kc.clone()),
                    master: None,
                },
                max_endpoints_per_slice: args.max_endpoints_per_slice,
                identity: None,
                leader_elect_lease_duration: 15,
                leader_elect_renew_deadline: 10,
                leader_elect_retry_period: 2,
                ipam: args.ipam.clone(),
                lifecycle: args.lifecycle.clone(),
                cluster_signing_cert_file: Some(ca_cert),
                cluster_signing_key_file: Some(ca_key),
            };
            tokio::spawn(crate::controllers::run(
                client_from(&controllers_kc).await?,
                ctrl.config()?,
            ));
            let metrics_addr = node_cfg.metrics_bind_address;
            let healthz_addr = node_cfg.healthz_bind_address;
            let mode = node_cfg.proxy_mode;
            let dns_line = match &node_cfg.dns {
                Some(d) => format!(
                    "{}:53 (zone {}), e.g. dig @{} kubernetes.default.svc.{}",
                    d.cluster_dns.map(|i| i.to_string()).unwrap_or_default(),
                    d.cluster_domain,
                    d.cluster_dns.map(|i| i.to_string()).unwrap_or_default(),
                    d.cluster_domain
                ),
                None => "disabled".into(),
            };
            tokio::spawn(crate::scheduler::run_elected(
                client_from(&scheduler_kc).await?,
            ));
            let token_path = crate::join::ensure_server_token(
                &client,
                &args.apiserver.data_dir,
                &running.server.ca_pem,
            )
            .await?;
            node_cfg.client_ca = ca_from_kubeconfig(&running.kubeconfig);
            let node = spawn_node(node_kc, node_cfg, running.server.store.clone())?;
            println!("fairlead is up");
            println!("  kubeconfig: {}", running.kubeconfig.display());
            println!("  API server: https://{}", running.addr);
            println!("  proxy:      {mode:?} mode");
            println!("  DNS:        {dns_line}");
            println!("  metrics:    http://{metrics_addr}/metrics (node), https://{}/metrics (API server)", running.addr);
            println!("  healthz:    http://{healthz_addr}/healthz");
            println!(
                "  join:       fairlead join --server https://{} --token \"$(cat {})\"",
                running.addr,
                token_path.display()
            );
            println!(
                "  try:        kubectl --kubeconfig {} get svc -A",
                running.kubeconfig.display()
            );
            tokio::select! {
                _ = shutdown_signal() => {}
                r = node => match r {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => {}
                    Err(_) => anyhow::bail!("node daemon crashed"),
                },
            }
            running.leave().await;
            running.shutdown();
            Ok(())
        }
        Command::Controllers(args) => {
            let client = args.client.client().await?;
            crate::systemd::ready("controllers started (leader election)");
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = crate::controllers::run(client, args.config()?) => {}
            }
            Ok(())
        }
        Command::Echo(args) => crate::echo::run(args).await,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "fairlead", &mut std::io::stdout());
            Ok(())
        }
        Command::Scheduler(args) => {
            let client = args.client().await?;
            crate::systemd::ready("scheduler started (leader election)");
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = crate::scheduler::run_elected(client) => {}
            }
            Ok(())
        }
        Command::Node(args) if args.cleanup => {
            crate::kubelet::cleanup(&args.data_dir).await;
            crate::node::cleanup().await
        }
        Command::Join(args) => {
            let text = match (&args.token, &args.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("reading --token-file {}: {e}", f.display()))?,
                (None, None) => anyhow::bail!("--token or --token-file is required"),
            };
            let join = crate::api::token::JoinToken::parse(&text)
                .map_err(|e| anyhow::anyhow!("invalid join token: {e}"))?;
            let mut cfg = args.node.config()?;
            cfg.data_dir = args.data_dir.clone();
            cfg.service_cidr = args.service_cluster_ip_range;
            if let Some(c) = args.cluster_cidr {
                cfg.cluster_cidr = c;
            }
            let kubeconfig = args.data_dir.join("kubeconfig");
            if kubeconfig.exists() {
                tracing::info!(path = %kubeconfig.display(), "already joined; using the node's kubeconfig");
            } else {
                crate::join::bootstrap(&args.server, &join, &cfg.node_name(), &kubeconfig).await?;
                println!("joined {} as system:node:{}", args.server, cfg.node_name());
                println!("  kubeconfig: {}", kubeconfig.display());
            }
            cfg.client_ca = ca_from_kubeconfig(&kubeconfig);
            let client = if args.lb_server_port == 0 {
                client_from(&kubeconfig).await?
            } else {
                let lb = start_api_lb(&args, &kubeconfig).await?;
                let client = client_through(&kubeconfig, lb.addr()).await?;
                tokio::spawn(lb.follow(client.clone()));
                client
            };
            tokio::select! {
                _ = shutdown_signal() => Ok(()),
                r = crate::node::run(client, cfg) => r,
            }
        }
        Command::Token(cmd) => run_token(cmd).await,
        Command::Node(args) => {
            let mut cfg = args.node.config()?;
            cfg.data_dir = args.data_dir.clone();
            cfg.service_cidr = args.service_cluster_ip_range;
            if let Some(c) = args.cluster_cidr {
                cfg.cluster_cidr = c;
            }
            // A kube-proxy config's clientConnection.kubeconfig, unless
            // --kubeconfig / $KUBECONFIG say otherwise.
            let mut client_args = args.client.clone();
            if client_args.kubeconfig.is_none() {
                client_args.kubeconfig = args.node.file_kubeconfig()?;
            }
            cfg.client_ca = client_args.ca();
            let client = client_args.client().await?;
            tokio::select! {
                _ = shutdown_signal() => Ok(()),
                r = crate::node::run(client, cfg) => r,
            }
        }
        Command::Apiserver(args) => {
            let running = apiserver::start(args.config()).await?;
            println!("kubeconfig: {}", running.kubeconfig.display());
            crate::systemd::ready(&format!("serving on https://{}", running.addr));
            shutdown_signal().await;
            running.leave().await;
            running.shutdown();
            Ok(())
        }
    }
}
