//! The userspace proxy backend: tokio listeners on every Service frontend
//! (ClusterIPs, externalIPs, NodePorts) relaying to endpoints, with
//! kube-proxy's semantics — strict round robin, traffic policies, ClientIP
//! affinity, failover with backoff, draining of removed endpoints.
//!
//! ```text
//!  sync(ProxyState) ── diff against last applied ──► per changed service port:
//!      routes::EndpointTable::apply   (new routing table, swapped atomically)
//!      listeners: bind/close only what changed   (tcp.rs, udp.rs)
//!      accepted TCP connections: served on per-core event loops (crate::workers)
//!      addresses: service IPs on the dummy interface (addrs.rs, netlink)
//! ```
//!
//! A frontend listens only while its role (internal for ClusterIPs,
//! external for NodePorts and external IPs) has usable endpoints: without
//! any, the kernel refuses connections (TCP RST / ICMP port unreachable)
//! instead of a listener accepting and hanging up.

mod addrs;
mod deadlines;
pub use addrs::LO_LABEL;
mod l7;
mod routes;
mod sys;
mod tcp;
mod udp;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;

use self::addrs::AddrManager;
use self::routes::{EndpointTable, Role, ServiceRuntime, Settings};
use super::{PortChange, Protocol, ProxyState, ServicePortInfo, ServicePortName};
use crate::workers::Workers;

/// Settings of the userspace proxy (flags of `fairlead node`).
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// This node's name, for `trafficPolicy: Local`.
    pub node_name: String,
    /// Addresses NodePorts listen on; empty = all (`0.0.0.0`).
    pub nodeport_addresses: Vec<IpAddr>,
    /// The dummy interface that holds ClusterIPs and external IPs.
    pub interface: String,
    /// Give up on an endpoint's TCP connect after this long.
    pub connect_timeout: Duration,
    /// How long an endpoint that failed a connect is skipped.
    pub endpoint_backoff: Duration,
    /// How long established connections to a removed endpoint may live
    /// (`None` = until they end by themselves).
    pub drain_grace: Option<Duration>,
    /// A UDP flow without traffic for this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Add/remove service IPs on `interface` (needs CAP_NET_ADMIN). Off in
    /// tests that use already-local loopback addresses.
    pub manage_addresses: bool,
    /// Event loops (threads) that serve TCP connections; 0 = one per core.
    pub workers: usize,
    /// Their thread names: `<worker_name>-<i>` (the kernel keeps 15 bytes).
    pub worker_name: String,
    /// TCP connections one client address may have open through the
    /// proxy, over all Services; past it, new ones are reset and counted
    /// in `fairlead_proxy_dropped_total{reason="tcp_client_limit"}`.
    pub max_connections_per_client: usize,
    /// UDP flows one service port tracks (each holds a socket); past it,
    /// datagrams that would start a flow are dropped and counted
    /// (`reason="udp_flow_limit"`).
    pub max_udp_flows: usize,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            interface: "fairlead0".to_string(),
            connect_timeout: Duration::from_secs(1),
            endpoint_backoff: Duration::from_secs(5),
            drain_grace: None,
            udp_idle_timeout: Duration::from_secs(30),
            manage_addresses: true,
            workers: 0,
            worker_name: "fl-proxy".to_string(),
            max_connections_per_client: 4096,
            max_udp_flows: 32_768,
        }
    }
}

/// Why a sync (or part of one) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The interface for service IPs could not be set up: nothing can work.
    #[error("interface {interface}: {message}")]
    Interface { interface: String, message: String },
    /// One frontend could not bind; logged and counted, never fatal.
    #[error("{service}: binding {protocol} {addr}: {source}")]
    Bind {
        service: String,
        protocol: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A service IP could not be added or removed; logged, retried.
    #[error("service IP {ip}: {message}")]
    Address { ip: IpAddr, message: String },
    /// `sync` after `shutdown`.
    #[error("the userspace proxy has been shut down")]
    ShutDown,
}

impl ProxyError {
    /// A bind refused because the process has no file descriptor left
    /// (EMFILE) or the system none (ENFILE).
    fn is_out_of_files(&self) -> bool {
        matches!(self, ProxyError::Bind { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
    }
}

/// What one sync did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Service ports added or changed.
    pub services_changed: usize,
    pub services_removed: usize,
    pub listeners_opened: usize,
    pub listeners_closed: usize,
    /// Frontends that could not bind (or whose address another service
    /// port holds); retried on the next sync.
    pub bind_errors: usize,
    /// Of those, frontends refused for want of file descriptors (the
    /// open-files limit: one per frontend), reported once per sync.
    pub out_of_files: usize,
    pub addresses_added: usize,
    pub addresses_removed: usize,
    /// Service IPs that could not be added/removed; retried on the next sync.
    pub address_errors: usize,
}

/// The userspace proxy of one node. `sync` with the full desired state after
/// every batch of changes; only the difference is applied.
pub struct UserspaceProxy {
    cfg: UserspaceConfig,
    settings: Arc<Settings>,
    inner: Mutex<Inner>,
    /// Started with the first TCP frontend (see [`crate::workers`]).
    workers: std::sync::OnceLock<Arc<Workers>>,
}

/// One frontend socket: protocol and bind address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ListenKey {
    protocol: Protocol,
    addr: SocketAddr,
}

/// A running listener task and its stop signal.
struct Running {
    stop: oneshot::Sender<()>,
    task: Task,
}

/// Where a listener's task runs: TCP accept loops on a worker loop (ended
/// when `done`'s sender is dropped), UDP frontends on the node's runtime.
enum Task {
    Loop(oneshot::Receiver<()>),
    Runtime(JoinHandle<()>),
}

impl Running {
    /// Stop accepting and wait until the socket is closed.
    async fn close(self) {
        drop(self.stop);
        match self.task {
            Task::Loop(done) => {
                let _ = done.await;
            }
            Task::Runtime(t) => {
                let _ = t.await;
            }
        }
    }
}

/// A frontend claimed by a service port; bound only while its role has
/// endpoints.
struct Listener {
    owner: ServicePortName,
    role: Role,
    running: Option<Running>,
}

/// The applied state of one service port.
struct Svc {
    rt: Arc<ServiceRuntime>,
    table: EndpointTable,
    wants: Vec<(ListenKey, Role)>,
    ips: Vec<IpAddr>,
}

#[derive(Default)]
struct Inner {
    applied: ProxyState,
    services: HashMap<ServicePortName, Svc>,
    listeners: HashMap<ListenKey, Listener>,
    /// Service IP → number of service ports using it.
    addr_refs: HashMap<IpAddr, usize>,
    /// Referenced service IPs whose add failed.
    addr_retry: BTreeSet<IpAddr>,
    /// Service ports with a frontend that failed to bind.
    retry: BTreeSet<ServicePortName>,
    addrs: Option<AddrManager>,
    /// Service IPs found on the interface at start-up, not yet claimed.
    stale: HashSet<IpAddr>,
    shut: bool,
}

impl UserspaceProxy {
    pub fn new(cfg: UserspaceConfig) -> Self {
        let settings = Arc::new(Settings {
            connect_timeout: cfg.connect_timeout,
            endpoint_backoff: cfg.endpoint_backoff,
            drain_grace: cfg.drain_grace,
            udp_idle_timeout: cfg.udp_idle_timeout,
            max_udp_flows: cfg.max_udp_flows.max(1),
            clients: Arc::new(routes::ClientSlots::new(cfg.max_connections_per_client)),
        });
        UserspaceProxy {
            cfg,
            settings,
            inner: Mutex::new(Inner::default()),
            workers: std::sync::OnceLock::new(),
        }
    }

    /// The TCP workers, started on first use.
    fn workers(&self) -> std::io::Result<Arc<Workers>> {
        if let Some(w) = self.workers.get() {
            return Ok(w.clone());
        }
        let n = match self.cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let started = Arc::new(Workers::start(n, &self.cfg.worker_name)?);
        Ok(self.workers.get_or_init(|| started).clone())
    }

    /// Make the data path match `state` (the whole desired state).
    /// Idempotent; unchanged service ports (same `Arc` or equal value) cost
    /// one comparison. Bind and address failures are logged, counted and
    /// retried on the next call; only an unusable interface (or a
    /// shut-down proxy) is an error.
    pub async fn sync(&self, state: &ProxyState) -> Result<SyncStats, ProxyError> {
        let mut guard = self.inner.lock().await;
        let changes = super::diff_states(&guard.applied, state);
        self.apply_locked(&mut guard, &changes).await
    }

    /// Apply only `changes` (what the node's change tracker produced);
    /// the cost follows their number, not the number of Services. Also
    /// retries frontends and addresses that failed before.
    pub async fn apply(&self, changes: &[PortChange]) -> Result<SyncStats, ProxyError> {
        let mut guard = self.inner.lock().await;
        self.apply_locked(&mut guard, changes).await
    }

    async fn apply_locked(
        &self,
        g: &mut Inner,
        changes: &[PortChange],
    ) -> Result<SyncStats, ProxyError> {
        if g.shut {
            return Err(ProxyError::ShutDown);
        }
        if self.cfg.manage_addresses && g.addrs.is_none() {
            let (mgr, existing) = AddrManager::setup(&self.cfg.interface).await?;
            g.addrs = Some(mgr);
            g.stale = existing;
        }
        let mut stats = SyncStats::default();
        let now = Instant::now();

        let mut changed: Vec<(&ServicePortName, &Arc<ServicePortInfo>)> = Vec::new();
        let mut removed: Vec<ServicePortName> = Vec::new();
        for (name, info) in changes {
            match info {
                Some(info) => {
                    let same = g
                        .applied
                        .get(name)
                        .is_some_and(|old| Arc::ptr_eq(old, info) || **old == **info);
                    if !same {
                        changed.push((name, info));
                    }
                }
                None => {
                    if g.applied.contains_key(name) {
                        removed.push(name.clone());
                    }
                }
            }
        }

        let mut addr_gone: Vec<IpAddr> = Vec::new();
        let mut addr_new: Vec<IpAddr> = Vec::new();

        for name in &removed {
            let Some(mut svc) = g.services.remove(name) else {
                continue;
            };
            svc.table.remove_all(&svc.rt, now);
            for (key, _) in &svc.wants {
                stats.listeners_closed += g.release(*key, name).await;
            }
            for ip in &svc.ips {
                g.unref_ip(*ip, &mut addr_gone);
            }
            g.applied.remove(name);
            g.retry.remove(name);
            stats.services_removed += 1;
        }

        for &(name, info) in &changed {
            let wants = self.wants(name, info);
            let ips = service_ips(info);
            let svc = g.services.entry(name.clone()).or_insert_with(|| Svc {
                rt: Arc::new(ServiceRuntime::new(name.clone(), self.settings.clone())),
                table: EndpointTable::default(),
                wants: Vec::new(),
                ips: Vec::new(),
            });
            svc.table.apply(&svc.rt, info, &self.cfg.node_name, now);
            let old_wants = std::mem::replace(&mut svc.wants, wants);
            let old_ips = std::mem::replace(&mut svc.ips, ips.clone());
            let new_wants = svc.wants.clone();
            for (key, role) in old_wants {
                if !new_wants.contains(&(key, role)) {
                    stats.listeners_closed += g.release(key, name).await;
                }
            }
            for ip in &ips {
                if !old_ips.contains(ip) {
                    g.ref_ip(*ip, &mut addr_new);
                }
            }
            for ip in &old_ips {
                if !ips.contains(ip) {
                    g.unref_ip(*ip, &mut addr_gone);
                }
            }
            g.applied.insert(name.clone(), info.clone());
            g.retry.insert(name.clone());
            stats.services_changed += 1;
        }

        // Service IPs first, so the listeners below can bind them.
        if let Some(mgr) = &g.addrs {
            let mut add: Vec<IpAddr> = addr_new
                .iter()
                .copied()
                .filter(|ip| !g.stale.contains(ip))
                .collect();
            add.extend(g.addr_retry.iter().copied());
            add.sort();
            add.dedup();
            let failed = mgr.add(&add).await;
            stats.addresses_added += add.len() - failed.len();
            stats.address_errors += failed.len();
            let mut retry = BTreeSet::new();
            for (ip, message) in failed {
                tracing::warn!(error = %ProxyError::Address { ip, message }, "adding service IP");
                retry.insert(ip);
            }
            g.addr_retry = retry;
        }
        for ip in &addr_new {
            g.stale.remove(ip);
        }

        // (Re)bind what changed or failed before.
        for name in std::mem::take(&mut g.retry) {
            self.reconcile(g, &name, &mut stats).await;
        }

        // Addresses nobody uses any more: after their listeners closed.
        if let Some(mgr) = &g.addrs {
            let mut del = addr_gone;
            del.extend(g.stale.drain());
            if !del.is_empty() {
                let failed = mgr.del(&del).await;
                stats.addresses_removed += del.len() - failed.len();
                stats.address_errors += failed.len();
                for (ip, message) in failed {
                    tracing::warn!(error = %ProxyError::Address { ip, message }, "removing service IP");
                }
            }
        }
        if stats.out_of_files > 0 {
            tracing::warn!(
                frontends = stats.out_of_files,
                open_files_limit = open_files_limit(),
                "frontends not bound: the open-files limit is reached (each \
                 frontend holds one socket); raise it (LimitNOFILE=, ulimit -n); \
                 retrying next sync"
            );
        }
        if stats != SyncStats::default() {
            tracing::debug!(?stats, "userspace proxy synced");
        }
        Ok(stats)
    }

    /// Close every listener and remove the service IPs (and the dummy
    /// interface). Established connections are left to finish (or to the
    /// drain grace). Later `sync` calls fail with [`ProxyError::ShutDown`].
    pub async fn shutdown(&self) {
        let mut g = self.inner.lock().await;
        if g.shut {
            return;
        }
        g.shut = true;
        for (_, l) in g.listeners.drain() {
            if let Some(r) = l.running {
                r.close().await;
            }
        }
        let now = Instant::now();
        for (_, mut svc) in g.services.drain() {
            svc.table.remove_all(&svc.rt, now);
        }
        if let Some(mgr) = g.addrs.take() {
            let ips: Vec<IpAddr> = g.addr_refs.keys().copied().collect();
            for (ip, message) in mgr.teardown(&ips).await {
                tracing::warn!(error = %ProxyError::Address { ip, message }, "removing service IP");
            }
        }
        g.addr_refs.clear();
        g.applied.clear();
    }

    /// The frontends currently accepting traffic, sorted.
    pub async fn listening(&self) -> Vec<(Protocol, SocketAddr)> {
        let g = self.inner.lock().await;
        let mut v: Vec<(Protocol, SocketAddr)> = g
            .listeners
            .iter()
            .filter(|(_, l)| l.running.is_some())
            .map(|(k, _)| (k.protocol, k.addr))
            .collect();
        v.sort();
        v
    }

    /// The frontends a service port needs, with their roles.
    fn wants(&self, name: &ServicePortName, info: &ServicePortInfo) -> Vec<(ListenKey, Role)> {
        if name.protocol == Protocol::Sctp {
            tracing::warn!(service = %name, "SCTP is not supported by the userspace proxy");
            return Vec::new();
        }
        let key = |ip: IpAddr, port: u16| ListenKey {
            protocol: name.protocol,
            addr: SocketAddr::new(ip, port),
        };
        let mut v: Vec<(ListenKey, Role)> = Vec::new();
        let mut push = |k: ListenKey, r: Role| {
            if k.addr.port() != 0 && !v.iter().any(|(x, _)| *x == k) {
                v.push((k, r));
            }
        };
        for ip in info.cluster_ips.iter().filter(|ip| !ip.is_unspecified()) {
            push(key(*ip, info.port), Role::Internal);
        }
        for ip in info.external_ips.iter().filter(|ip| !ip.is_unspecified()) {
            push(key(*ip, info.port), Role::External);
        }
        if let Some(np) = info.node_port {
            if self.cfg.nodeport_addresses.is_empty() {
                push(key(IpAddr::V4(Ipv4Addr::UNSPECIFIED), np), Role::External);
            }
            for ip in &self.cfg.nodeport_addresses {
                push(key(*ip, np), Role::External);
            }
        }
        v
    }

    /// Bind/close the frontends of one service port so each listens exactly
    /// while its role has endpoints. Listeners already in the right state
    /// are not touched.
    async fn reconcile(&self, g: &mut Inner, name: &ServicePortName, stats: &mut SyncStats) {
        let Some(svc) = g.services.get(name) else {
            return;
        };
        let rt = svc.rt.clone();
        let routes = rt.routes();
        for (key, role) in svc.wants.clone() {
            let listener = g.listeners.entry(key).or_insert_with(|| Listener {
                owner: name.clone(),
                role,
                running: None,
            });
            if listener.owner != *name {
                tracing::warn!(
                    service = %name,
                    owner = %listener.owner,
                    protocol = key.protocol.as_str(),
                    addr = %key.addr,
                    "frontend already used by another service port"
                );
                rt.metrics.bind_errors.increment(1);
                stats.bind_errors += 1;
                g.retry.insert(name.clone());
                continue;
            }
            if listener.role != role {
                if let Some(r) = listener.running.take() {
                    r.close().await;
                    stats.listeners_closed += 1;
                }
                listener.role = role;
            }
            let want = !routes.set(role).is_empty();
            match (want, listener.running.is_some()) {
                (true, false) => match self.start(key, rt.clone(), role) {
                    Ok(r) => {
                        listener.running = Some(r);
                        stats.listeners_opened += 1;
                    }
                    Err(source) => {
                        let e = ProxyError::Bind {
                            service: name.to_string(),
                            protocol: key.protocol.as_str(),
                            addr: key.addr,
                            source,
                        };
                        if e.is_out_of_files() {
                            stats.out_of_files += 1;
                            tracing::debug!(error = %e, "frontend not bound; retrying next sync");
                        } else {
                            tracing::warn!(error = %e, "frontend not bound; retrying next sync");
                        }
                        rt.metrics.bind_errors.increment(1);
                        stats.bind_errors += 1;
                        g.retry.insert(name.clone());
                    }
                },
                (false, true) => {
                    if let Some(r) = listener.running.take() {
                        r.close().await;
                        stats.listeners_closed += 1;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid, owned struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

impl Inner {
    /// Drop `owner`'s claim on a frontend (closing it); returns the number
    /// of listeners closed.
    async fn release(&mut self, key: ListenKey, owner: &ServicePortName) -> usize {
        if self.listeners.get(&key).is_some_and(|l| l.owner == *owner) {
            if let Some(Listener {
                running: Some(r), ..
            }) = self.listeners.remove(&key)
            {
                r.close().await;
                return 1;
            }
        }
        0
    }

    fn ref_ip(&mut self, ip: IpAddr, added: &mut Vec<IpAddr>) {
        let n = self.addr_refs.entry(ip).or_default();
        *n += 1;
        if *n == 1 {
            added.push(ip);
        }
    }

    fn unref_ip(&mut self, ip: IpAddr, gone: &mut Vec<IpAddr>) {
        if let Some(n) = self.addr_refs.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.addr_refs.remove(&ip);
                self.addr_retry.remove(&ip);
                gone.push(ip);
            }
        }
    }
}

/// The service IPs a service port needs local.
fn service_ips(info: &ServicePortInfo) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = Vec::new();
    for ip in info.cluster_ips.iter().chain(&info.external_ips) {
        if !ip.is_unspecified() && !v.contains(ip) {
            v.push(*ip);
        }
    }
    v
}

impl UserspaceProxy {
    /// Bind a frontend and start its task.
    fn start(
        &self,
        key: ListenKey,
        rt: Arc<ServiceRuntime>,
        role: Role,
    ) -> std::io::Result<Running> {
        let (stop, stop_rx) = oneshot::channel();
        let task = match key.protocol {
            Protocol::Tcp => {
                let workers = self.workers()?;
                let l = sys::tcp_listener(key.addr)?;
                let (done, task) = oneshot::channel();
                let w = workers.clone();
                // Registered on the chosen loop's epoll here, so a failure
                // is a bind error (retried next sync) like the others.
                workers.spawn_next(
                    || sys::register(l),
                    move |l| tcp::accept_loop(l, rt, role, w, stop_rx, done),
                )?;
                Task::Loop(task)
            }
            Protocol::Udp => {
                let f = udp::UdpFrontend::bind(key.addr)?;
                Task::Runtime(tokio::spawn(udp::serve(f, rt, role, stop_rx)))
            }
            Protocol::Sctp => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "SCTP is not supported",
                ))
            }
        };
        Ok(Running { stop, task })
    }
}
