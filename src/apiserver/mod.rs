//! The Kubernetes-compatible API server.
//!
//! ```text
//!  TLS (rustls, client certs)  ─►  rest::handle: route → authn → authz
//!        │                                   │
//!        │          discovery / openapi ◄────┤ (static documents from the resource table)
//!        │                                   ▼
//!        │                  list / watch (watch.rs)   create / update / patch / delete
//!        │                                   │              │ objects.rs: metadata rules,
//!        │                                   │              │ hooks.rs (kind rules), alloc.rs
//!        ▼                                   ▼              ▼
//!   metrics (/metrics)                     Store (embedded SQLite | etcd)
//! ```
//!
//! Nothing here is per resource: the resource table
//! ([`crate::api::resources`]) drives routing, storage keys, discovery and
//! OpenAPI. Startup ([`start`]) opens the store, creates the PKI and the
//! kubeconfig on first run, bootstraps the default namespaces and the
//! `kubernetes` Service, and starts the compactor.

pub mod alloc;
pub mod authz;
pub mod discovery;
pub mod endpoints;
pub mod eviction;
pub mod fairness;
pub mod hooks;
pub mod objects;
pub mod openapi;
pub mod podlogs;
pub mod rest;
pub mod serviceaccount;
pub mod table;
pub mod tls;
pub mod watch;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::resources::{self, Kind};
use crate::api::service::ServiceCidr;
use crate::store::{embedded::EmbeddedStore, etcd::EtcdStore, Store};

use objects::WriteOpts;

/// API server settings (flags of `fairlead apiserver`).
#[derive(Clone, Debug)]
pub struct Config {
    /// PKI, kubeconfig and the embedded database live here.
    pub data_dir: PathBuf,
    pub bind_address: IpAddr,
    /// `--advertise-address`: what the cluster is told (see
    /// [`Config::advertise_address`]).
    pub advertise_address: Option<IpAddr>,
    pub secure_port: u16,
    pub service_cidr: ServiceCidr,
    /// Empty: the embedded store. Otherwise etcd endpoints.
    pub etcd_servers: Vec<String>,
    /// Optional static tokens: CSV lines `token,user,uid,"group1,group2"`.
    pub token_auth_file: Option<PathBuf>,
    /// How often old revisions are compacted away (Kubernetes: 5 minutes).
    pub compaction_interval: Duration,
    /// `--request-timeout`: how long any request but a watch or a log
    /// may take before it is answered 504 (kube-apiserver: 1m0s).
    pub request_timeout: Duration,
    /// Seconds of the `node.kubernetes.io/not-ready` and
    /// `node.kubernetes.io/unreachable` NoExecute tolerations every new
    /// Pod gets unless it has its own (kube-apiserver's
    /// DefaultTolerationSeconds admission; 300 by default).
    pub default_toleration_seconds: (i64, i64),
    /// More names and addresses the serving certificate covers (k3s's
    /// `--tls-san`), e.g. the DNS name other containers reach it by.
    pub tls_sans: Vec<String>,
}

impl Config {
    /// The address clients (and the `kubernetes` Endpoints) use:
    /// `--advertise-address`, else the bind address, else (bound to
    /// 0.0.0.0) the host's own address, as kube-apiserver picks one, so
    /// that servers sharing a store each have their own lease and
    /// endpoint instead of all claiming 127.0.0.1.
    pub fn advertise_address(&self) -> IpAddr {
        if let Some(ip) = self.advertise_address {
            ip
        } else if self.bind_address.is_unspecified() {
            static HOST: std::sync::OnceLock<IpAddr> = std::sync::OnceLock::new();
            *HOST.get_or_init(crate::netlink::host_ipv4)
        } else {
            self.bind_address
        }
    }
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.data_dir.join("kubeconfig")
    }
}

/// Who sent a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

/// Shared state of a running API server; cheap to clone.
#[derive(Clone)]
pub struct Server {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    tokens: Arc<HashMap<String, Identity>>,
    /// Watch events decoded (and encoded) once for every watch that
    /// receives them.
    decoded: Arc<watch::DecodedEvents>,
    /// TLS for `pods/log` requests to nodes (port 10250).
    kubelet_tls: Arc<rustls::ClientConfig>,
    /// The cluster CA certificate (PEM), served at `/cacerts`.
    pub ca_pem: Arc<str>,
    /// Signs and verifies ServiceAccount tokens (`serviceaccount`).
    sa_keys: Arc<crate::api::satoken::Keys>,
    /// Seats for requests, shared fairly between users (`fairness`).
    fairness: Arc<fairness::Fairness>,
    /// RBAC over the stored policy (`authz`).
    pub authz: Arc<authz::Authorizer>,
}

/// A started API server.
pub struct Running {
    pub addr: SocketAddr,
    /// The admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// The URL the local kubeconfigs use.
    url: String,
    pub server: Server,
    accept: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Write `<data-dir>/<file>`: a kubeconfig for this server with a
    /// fresh client certificate for `user` in `groups`, so each component
    /// `fairlead up` runs has its own identity and only its role's rights
    /// (see `crate::api::rbac`).
    pub fn component_kubeconfig(
        &self,
        file: &str,
        user: &str,
        groups: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let dir = &self.server.config.data_dir;
        let (cert, key) = tls::issue_client_cert(dir, user, groups)?;
        let path = dir.join(file);
        tls::write_kubeconfig(&path, &self.url, &self.server.ca_pem, &cert, &key)?;
        Ok(path)
    }

    /// Stop announcing this server in the `kubernetes` endpoints, so
    /// clients move to the other servers now rather than when its lease
    /// expires (a clean stop; a crash is noticed by the lease).
    pub async fn leave(&self) {
        let leave = endpoints::leave(&self.server);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), leave).await;
    }
    /// Stop accepting connections.
    pub fn shutdown(&self) {
        self.accept.abort();
    }
    /// Wait until the accept loop ends (it runs until shutdown).
    pub async fn wait(self) {
        let _ = self.accept.await;
    }
}

fn load_tokens(path: &std::path::Path) -> anyhow::Result<HashMap<String, Identity>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading token file {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(4, ',');
        let (Some(token), Some(user)) = (parts.next(), parts.next()) else {
            anyhow::bail!(
                "{}:{}: expected token,user[,uid[,\"groups\"]]",
                path.display(),
                i + 1
            );
        };
        let _uid = parts.next();
        let groups = parts
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            token.to_string(),
            Identity {
                user: user.to_string(),
                groups,
            },
        );
    }
    Ok(out)
}

/// Open the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    // First: the store registers its metric handles when it opens.
    crate::metrics::init();
    Ok(if config.etcd_servers.is_empty() {
        Arc::new(EmbeddedStore::open(&config.data_dir.join("store.db")).await?)
    } else {
        Arc::new(EtcdStore::connect(&config.etcd_servers).await?)
    })
}

/// Where the cluster CA lives in the store (outside `/registry/`, so no
/// API reaches it): JSON `{"cert": PEM, "key": PEM}`.
const CA_STORE_KEY: &str = "/fairlead/pki/ca";

/// Make every API server on one store use one CA, so a certificate any of
/// them issued (kubeconfigs, nodes' client certificates) is trusted by
/// all: the first server publishes its CA in the store, later ones install
/// the published one in their data directory. With etcd this is how a new
/// server joins: it needs the etcd endpoints, nothing copied by hand
/// (whoever can read etcd owns the cluster anyway, as with kube-apiserver).
async fn share_ca(store: &dyn Store, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let published = publish_once(store, CA_STORE_KEY, || {
        let (cert, key) = tls::ensure_ca(data_dir)?;
        Ok(serde_json::to_vec(&json!({"cert": cert, "key": key}))?)
    })
    .await?;
    let v: serde_json::Value = serde_json::from_slice(&published)?;
    match (v["cert"].as_str(), v["key"].as_str()) {
        (Some(cert), Some(key)) => Ok(tls::install_ca(data_dir, cert, key)?),
        _ => anyhow::bail!("{CA_STORE_KEY} in the store is not a CA"),
    }
}

/// The value at `key` of the store, published from `ours` first if there
/// is none: the cluster-wide secrets (CA, service-account key) that the
/// first server creates and every later one adopts. Two servers starting
/// at once both offer theirs; the store's compare-and-swap picks one.
async fn publish_once(
    store: &dyn Store,
    key: &str,
    ours: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    use crate::store::{Compare, Op, Txn, TxnOutcome};
    if let Some(kv) = store.get(key).await? {
        return Ok(kv.value.to_vec());
    }
    let value = ours()?;
    let txn = Txn {
        compares: vec![Compare::Absent(key.into())],
        ops: vec![Op::Put {
            key: key.into(),
            value: value.clone(),
        }],
    };
    if let TxnOutcome::Failed { .. } = store.txn(txn).await? {
        // Another server published first: theirs.
        let kv = store
            .get(key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{key} vanished from the store"))?;
        return Ok(kv.value.to_vec());
    }
    Ok(value)
}

/// Start the API server: store, PKI, kubeconfig, bootstrap objects,
/// compactor, and the HTTPS listener.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", config.data_dir.display()))?;
    let store = open_store(&config).await?;
    start_with_store(config, store).await
}

/// Like [`start`], with an already opened store.
pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Running> {
    crate::metrics::init();
    let mut sans = vec![
        config.advertise_address().to_string(),
        config.service_cidr.first().to_string(),
    ];
    if config.bind_address.is_unspecified() {
        sans.push("127.0.0.1".to_string());
    } else {
        sans.push(config.bind_address.to_string());
    }
    sans.extend(config.tls_sans.iter().cloned());
    share_ca(store.as_ref(), &config.data_dir).await?;
    let sa_keys = serviceaccount::share_key(store.as_ref(), &config.data_dir).await?;
    let pki = tls::ensure_pki(&config.data_dir, &sans)?;
    let tls_config = tls::server_config(&pki)?;
    let kubelet_tls = podlogs::kubelet_client_config(&config.data_dir)?;
    let tokens = match &config.token_auth_file {
        Some(p) => load_tokens(p)?,
        None => HashMap::new(),
    };
    let listener = TcpListener::bind((config.bind_address, config.secure_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "binding {}:{}: {e}",
                config.bind_address,
                config.secure_port
            )
        })?;
    let addr = listener.local_addr()?;
    // The local kubeconfig uses the address the server listens on, which
    // is reachable from here even when the advertised one is not.
    let local = if config.bind_address.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        config.bind_address
    };
    let host = match local {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let kubeconfig = config.kubeconfig_path();
    tls::write_kubeconfig(
        &kubeconfig,
        &format!("https://{host}:{}", addr.port()),
        &pki.ca_cert_pem,
        &pki.admin_cert_pem,
        &pki.admin_key_pem,
    )?;
    let server = Server {
        store,
        config: Arc::new(Config {
            secure_port: addr.port(),
            ..config
        }),
        tokens: Arc::new(tokens),
        decoded: Arc::new(watch::DecodedEvents::default()),
        kubelet_tls,
        ca_pem: pki.ca_cert_pem.clone().into(),
        sa_keys: Arc::new(sa_keys),
        fairness: Default::default(),
        authz: Default::default(),
    };
    server.authz.spawn(server.store.clone());
    server.bootstrap().await?;
    server.reconcile_endpoints().await;
    server.spawn_endpoint_reconciler();
    server.spawn_compactor();
    let acceptor = TlsAcceptor::from(tls_config);
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, _peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let srv = srv.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(tls::peer_identity)
                    .map(|(user, groups)| Identity { user, groups });
                let svc = hyper::service::service_fn(move |req| {
                    let srv = srv.clone();
                    let identity = identity.clone();
                    async move { Ok::<_, std::convert::Infallible>(srv.handle(req, identity).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    });
    tracing::info!(%addr, store = %server.store.describe(), "API server listening");
    Ok(Running {
        addr,
        kubeconfig,
        url: format!("https://{host}:{}", addr.port()),
        server,
        accept,
    })
}

impl Server {
    /// The identity behind a bearer token, if any.
    pub fn token_identity(&self, token: &str) -> Option<Identity> {
        self.tokens.get(token).cloned()
    }

    /// Create what every cluster has: the default namespaces and the
    /// `kubernetes` Service pointing at this API server. Idempotent and
    /// safe to run on several API servers at once.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        self.bootstrap_rbac().await?;
        let opts = WriteOpts::default();
        let ns = resources::by_kind(Kind::Namespace);
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"metadata": {"name": name}});
            match self.create_object(ns, None, obj, &opts).await {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => anyhow::bail!("bootstrapping namespace {name}: {}", e.message),
            }
        }
        // The `kubernetes` Service; its endpoints (every live API server)
        // are kept by the endpoint reconciler (`endpoints.rs`).
        let port = self.config.secure_port;
        let svc = json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
               "spec": {"clusterIP": self.config.service_cidr.first().to_string(),
                        "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}});
        match self
            .create_object(
                resources::by_kind(Kind::Service),
                Some("default"),
                svc,
                &opts,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => anyhow::bail!("bootstrapping the kubernetes Service: {}", e.message),
        }
        // The cluster DNS Service: every node daemon serves its IP itself,
        // so proxies must leave it alone (service-proxy-name label).
        let dns_ip = std::net::Ipv4Addr::from(self.config.service_cidr.base + 10).to_string();
        let kube_dns = json!({"metadata": {"name": "kube-dns", "labels": {
                "k8s-app": "kube-dns", "kubernetes.io/name": "fairlead-dns",
                "service.kubernetes.io/service-proxy-name": "fairlead-dns"}},
            "spec": {"clusterIP": dns_ip, "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}});
        let svc = resources::by_kind(Kind::Service);
        match self
            .create_object(svc, Some("kube-system"), kube_dns, &opts)
            .await
        {
            Ok(_) => {}
            Err(e) if e.code == 409 || e.code == 422 => {}
            Err(e) => anyhow::bail!("bootstrapping kube-dns: {}", e.message),
        }
        // Resume finalization of namespaces that were terminating at exit.
        for kv in self.store.list_all(&ns.prefix(None)).await?.kvs {
            if let Ok(obj) = objects::decode(&kv) {
                if obj
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    let name = kv.key.rsplit('/').next().unwrap_or("").to_string();
                    self.spawn_namespace_finalizer(name);
                }
            }
        }
        Ok(())
    }

    /// Compact the store periodically to the revision seen one interval
    /// earlier, as kube-apiserver does, so history does not grow forever
    /// but watches that reconnect within an interval can resume.
    fn spawn_compactor(&self) {
        let store = self.store.clone();
        let interval = self.config.compaction_interval;
        tokio::spawn(async move {
            let mut previous = None;
            loop {
                tokio::time::sleep(interval).await;
                if let Some(rev) = previous {
                    match store.compact(rev).await {
                        Ok(()) => tracing::debug!(revision = rev, "compacted"),
                        Err(e) => tracing::debug!(error = %e, "compaction skipped"),
                    }
                }
                previous = store.current_revision().await.ok();
            }
        });
    }
}
