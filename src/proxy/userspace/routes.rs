//! The routing table of one service port: which endpoints new connections
//! may go to (per traffic role), round-robin position, failed-endpoint
//! backoff, and ClientIP session affinity.
//!
//! Built by the sync path, read by every accepted connection. The table
//! ([`Routes`]) is immutable apart from atomics and is swapped whole behind
//! an `Arc`, so a connection pays one short read lock and one refcount
//! increment to route. Per-endpoint state that must survive table rebuilds
//! (backoff, the drain signal) lives in [`EndpointLife`], shared by every
//! generation of the table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::watch;

use crate::proxy::{AppProtocol, ServicePortInfo, ServicePortName};

/// Which frontend a connection came in on; selects the traffic policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// ClusterIP: `internalTrafficPolicy`.
    Internal,
    /// NodePort, externalIPs, LoadBalancer IPs: `externalTrafficPolicy`.
    External,
}

impl Role {
    fn bit(self) -> u8 {
        match self {
            Role::Internal => 1,
            Role::External => 2,
        }
    }
}

/// Whether an endpoint is still part of its service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    Live,
    /// Removed: connections to it may continue until `deadline` (`None` =
    /// forever).
    Removed {
        deadline: Option<Instant>,
    },
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// An instant as a nonzero u64 (0 = "never"), for atomics.
fn stamp(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64 + 1
}

fn unstamp(s: u64) -> Instant {
    epoch() + Duration::from_nanos(s.saturating_sub(1))
}

/// One endpoint of one service port, across table generations.
#[derive(Debug)]
pub(crate) struct EndpointLife {
    pub(crate) addr: SocketAddr,
    /// Skip for new connections until this stamp (0 = not backing off).
    backoff_until: AtomicU64,
    /// Role bits of the current table it is in (0 = removed).
    member: AtomicU8,
    state: watch::Sender<Removal>,
    /// Its HTTP connections, for a port balanced per request.
    pub(crate) upstream: super::l7::Upstream,
}

impl EndpointLife {
    fn new(addr: SocketAddr) -> EndpointLife {
        EndpointLife {
            addr,
            backoff_until: AtomicU64::new(0),
            member: AtomicU8::new(0),
            state: watch::Sender::new(Removal::Live),
            upstream: Default::default(),
        }
    }

    pub(crate) fn backing_off(&self, now: Instant) -> bool {
        self.backoff_until.load(Ordering::Relaxed) > stamp(now)
    }

    /// A connect to it failed: skip it for `backoff`.
    pub(crate) fn mark_failed(&self, now: Instant, backoff: Duration) {
        self.backoff_until
            .store(stamp(now + backoff), Ordering::Relaxed);
    }

    /// A connect succeeded: it is healthy again.
    pub(crate) fn mark_ok(&self) {
        if self.backoff_until.load(Ordering::Relaxed) != 0 {
            self.backoff_until.store(0, Ordering::Relaxed);
        }
    }

    /// Whether new traffic of this role may still go to it.
    pub(crate) fn serves(&self, role: Role) -> bool {
        self.member.load(Ordering::Relaxed) & role.bit() != 0
    }

    /// Removal notifications (for draining established connections).
    pub(crate) fn watch(&self) -> watch::Receiver<Removal> {
        self.state.subscribe()
    }
}

/// The endpoints of one role, in a fixed order, with the round-robin cursor.
#[derive(Debug, Default)]
pub(crate) struct EndpointSet {
    eps: Vec<Arc<EndpointLife>>,
    next: AtomicUsize,
}

impl EndpointSet {
    pub(crate) fn len(&self) -> usize {
        self.eps.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.eps.is_empty()
    }

    /// Strict round robin, skipping backing-off endpoints unless all are.
    pub(crate) fn pick(&self, now: Instant) -> Option<&Arc<EndpointLife>> {
        let n = self.eps.len();
        if n == 0 {
            return None;
        }
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = cur % n;
            let chosen = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| !self.eps[i].backing_off(now))
                .unwrap_or(start);
            match self.next.compare_exchange_weak(
                cur,
                chosen + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(&self.eps[chosen]),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// One generation of a service port's routing table.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    internal: EndpointSet,
    external: EndpointSet,
    affinity: Option<Duration>,
    /// Balance each request instead of each connection.
    app: Option<AppProtocol>,
}

impl Routes {
    pub(crate) fn app_protocol(&self) -> Option<AppProtocol> {
        self.app
    }

    pub(crate) fn set(&self, role: Role) -> &EndpointSet {
        match role {
            Role::Internal => &self.internal,
            Role::External => &self.external,
        }
    }
}

/// Per-service-port metric handles, registered once (labels: `service`).
#[derive(Debug)]
pub(crate) struct SvcMetrics {
    pub(crate) connections: Counter,
    pub(crate) active: Gauge,
    /// Client → endpoint bytes.
    pub(crate) bytes_up: Counter,
    /// Endpoint → client bytes.
    pub(crate) bytes_down: Counter,
    pub(crate) connect_errors: Counter,
    /// Bytes of either direction moved by `splice(2)` (bulk transfers).
    pub(crate) spliced: Counter,
    pub(crate) udp_flows: Gauge,
    pub(crate) bind_errors: Counter,
    /// L7 ports: request latency (until the response head), and request
    /// counters by response code, registered on first use of a code.
    http_duration: Histogram,
    /// Code 200, the common case, without the map's lock.
    http_ok: Counter,
    http_requests: Mutex<HashMap<u16, Counter>>,
    svc: String,
}

impl SvcMetrics {
    fn new(name: &ServicePortName) -> SvcMetrics {
        let svc = name.to_string();
        SvcMetrics {
            connections: metrics::counter!("fairlead_proxy_connections_total", "service" => svc.clone()),
            active: metrics::gauge!("fairlead_proxy_active_connections", "service" => svc.clone()),
            bytes_up: metrics::counter!("fairlead_proxy_bytes_total", "service" => svc.clone(), "direction" => "upstream"),
            bytes_down: metrics::counter!("fairlead_proxy_bytes_total", "service" => svc.clone(), "direction" => "downstream"),
            connect_errors: metrics::counter!("fairlead_proxy_backend_connect_errors_total", "service" => svc.clone()),
            spliced: metrics::counter!("fairlead_proxy_spliced_bytes_total", "service" => svc.clone()),
            udp_flows: metrics::gauge!("fairlead_proxy_udp_flows", "service" => svc.clone()),
            bind_errors: metrics::counter!("fairlead_proxy_bind_errors_total", "service" => svc.clone()),
            http_duration: metrics::histogram!("fairlead_proxy_http_request_duration_seconds", "service" => svc.clone()),
            http_ok: metrics::counter!("fairlead_proxy_http_requests_total",
                "service" => svc.clone(), "code" => "200"),
            http_requests: Mutex::new(HashMap::new()),
            svc,
        }
    }

    /// One L7 request answered with `code`, started at `started`.
    pub(crate) fn http_response(&self, code: u16, started: Instant) {
        self.http_duration.record(started.elapsed().as_secs_f64());
        if code == 200 {
            self.http_ok.increment(1);
            return;
        }
        let mut m = self.http_requests.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(code)
            .or_insert_with(|| {
                metrics::counter!("fairlead_proxy_http_requests_total",
                    "service" => self.svc.clone(), "code" => code.to_string())
            })
            .increment(1);
    }
}

/// Fixed per-proxy settings every service port needs on its data path.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) connect_timeout: Duration,
    pub(crate) endpoint_backoff: Duration,
    pub(crate) drain_grace: Option<Duration>,
    pub(crate) udp_idle_timeout: Duration,
    pub(crate) max_udp_flows: usize,
    /// Open TCP connections per client address (all service ports).
    pub(crate) clients: Arc<ClientSlots>,
}

/// Counts open TCP connections per client address, to cap them: one
/// client (a pod in a loop, a scanner) must not take every descriptor
/// the proxy has. A lock per accept and per close: nothing next to the
/// connect the accept leads to.
#[derive(Debug)]
pub(crate) struct ClientSlots {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
    dropped: Counter,
}

impl ClientSlots {
    pub(crate) fn new(max: usize) -> ClientSlots {
        ClientSlots {
            max: max.clamp(1, u32::MAX as usize) as u32,
            open: Mutex::new(HashMap::new()),
            dropped: metrics::counter!("fairlead_proxy_dropped_total", "reason" => "tcp_client_limit"),
        }
    }

    /// A slot for a new connection from `ip`, or `None` (counted) when it
    /// has `max` open.
    pub(crate) fn claim(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().expect("client slots");
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            drop(open);
            self.dropped.increment(1);
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            ip,
        })
    }
}

/// One open connection's slot; released on drop.
pub(crate) struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("client slots");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Affinity entries: client IP → endpoint, last used.
#[derive(Debug, Default)]
struct AffinityMap {
    map: HashMap<IpAddr, (Arc<EndpointLife>, Instant)>,
    /// Sweep expired entries when the map grows past this.
    sweep_at: usize,
}

/// What the data path of one service port shares: its name, metrics,
/// settings, current routing table and affinity state.
#[derive(Debug)]
pub(crate) struct ServiceRuntime {
    pub(crate) name: ServicePortName,
    pub(crate) metrics: SvcMetrics,
    pub(crate) settings: Arc<Settings>,
    routes: RwLock<Arc<Routes>>,
    affinity: Mutex<AffinityMap>,
}

impl ServiceRuntime {
    pub(crate) fn new(name: ServicePortName, settings: Arc<Settings>) -> ServiceRuntime {
        ServiceRuntime {
            metrics: SvcMetrics::new(&name),
            name,
            settings,
            routes: RwLock::new(Arc::new(Routes::default())),
            affinity: Mutex::new(AffinityMap::default()),
        }
    }

    /// The current table (one read lock + refcount increment).
    pub(crate) fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn swap_routes(&self, r: Routes) {
        let affinity = r.affinity;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
        if affinity.is_none() {
            let mut a = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
            if !a.map.is_empty() {
                *a = AffinityMap::default();
            }
        }
    }

    /// The endpoint for a new connection/flow of `role` from `client`:
    /// the affine one if still valid, else the next in round robin.
    pub(crate) fn choose(
        &self,
        routes: &Routes,
        role: Role,
        client: IpAddr,
        now: Instant,
    ) -> Option<Arc<EndpointLife>> {
        let set = routes.set(role);
        let Some(timeout) = routes.affinity else {
            return set.pick(now).cloned();
        };
        let mut a = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ep, last)) = a.map.get_mut(&client) {
            if now.saturating_duration_since(*last) < timeout
                && ep.serves(role)
                && !ep.backing_off(now)
            {
                *last = now;
                return Some(ep.clone());
            }
        }
        let ep = set.pick(now)?.clone();
        a.map.insert(client, (ep.clone(), now));
        if a.map.len() > a.sweep_at {
            a.map
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < timeout);
            a.sweep_at = (a.map.len() * 2).max(1024);
        }
        Some(ep)
    }
}

/// The sync side of one service port: every endpoint it knows (live, and
/// removed ones some connection still watches), and the table builder.
#[derive(Debug, Default)]
pub(crate) struct EndpointTable {
    lives: HashMap<SocketAddr, Arc<EndpointLife>>,
}

impl EndpointTable {
    /// Build and install the table for `info`; endpoints that left every
    /// role are told they were removed (drain starts).
    pub(crate) fn apply(
        &mut self,
        rt: &ServiceRuntime,
        info: &ServicePortInfo,
        node: &str,
        now: Instant,
    ) {
        let internal = info.usable_endpoints(info.internal_local.then_some(node));
        let external = info.usable_endpoints(info.external_local.then_some(node));
        let mut members: HashMap<SocketAddr, u8> = HashMap::new();
        for a in &internal {
            *members.entry(*a).or_default() |= Role::Internal.bit();
        }
        for a in &external {
            *members.entry(*a).or_default() |= Role::External.bit();
        }
        for (&addr, &bits) in &members {
            let life = self
                .lives
                .entry(addr)
                .or_insert_with(|| Arc::new(EndpointLife::new(addr)));
            life.member.store(bits, Ordering::Relaxed);
            life.state.send_if_modified(|s| {
                let changed = *s != Removal::Live;
                *s = Removal::Live;
                changed
            });
        }
        self.retire(&members, rt.settings.drain_grace, now);
        let old = rt.routes();
        let set = |addrs: &[SocketAddr], old: &EndpointSet| EndpointSet {
            eps: addrs.iter().map(|a| self.lives[a].clone()).collect(),
            next: AtomicUsize::new(match addrs.len() {
                0 => 0,
                n => old.next.load(Ordering::Relaxed) % n,
            }),
        };
        let routes = Routes {
            internal: set(&internal, &old.internal),
            external: set(&external, &old.external),
            affinity: info.affinity_timeout,
            app: info.app_protocol,
        };
        rt.swap_routes(routes);
    }

    /// The service port is gone: every endpoint is removed.
    pub(crate) fn remove_all(&mut self, rt: &ServiceRuntime, now: Instant) {
        self.retire(&HashMap::new(), rt.settings.drain_grace, now);
        rt.swap_routes(Routes::default());
    }

    fn retire(&mut self, keep: &HashMap<SocketAddr, u8>, grace: Option<Duration>, now: Instant) {
        self.lives.retain(|addr, life| {
            if keep.contains_key(addr) {
                return true;
            }
            life.member.store(0, Ordering::Relaxed);
            life.state.send_if_modified(|s| {
                if *s == Removal::Live {
                    *s = Removal::Removed {
                        deadline: grace.map(|g| now + g),
                    };
                    true
                } else {
                    false
                }
            });
            // Keep it while connections watch it, so a quick re-add cancels
            // their drain deadline.
            life.state.receiver_count() > 0
        });
    }
}

/// The instant a removed endpoint's connections must end, once known.
pub(crate) async fn drain_deadline(rx: &mut watch::Receiver<Removal>) {
    loop {
        let state = *rx.borrow_and_update();
        match state {
            Removal::Removed {
                deadline: Some(d), ..
            } => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d.into()) => return,
                    r = rx.changed() => if r.is_err() { std::future::pending::<()>().await },
                }
            }
            _ => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Now as a stamp (for UDP flow activity).
pub(crate) fn now_stamp() -> u64 {
    stamp(Instant::now())
}

/// The inverse of [`now_stamp`].
pub(crate) fn stamp_instant(s: u64) -> Instant {
    unstamp(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Endpoint, Protocol};

    fn ep(port: u16, ready: bool, node: &str) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            ready,
            serving: ready,
            terminating: false,
            node_name: Some(node.into()),
        }
    }

    fn info(eps: Vec<Endpoint>) -> ServicePortInfo {
        ServicePortInfo {
            cluster_ips: vec![],
            port: 80,
            node_port: None,
            external_ips: vec![],
            app_protocol: None,
            affinity_timeout: None,
            internal_local: false,
            external_local: false,
            endpoints: eps,
        }
    }

    fn runtime(grace: Option<Duration>) -> ServiceRuntime {
        ServiceRuntime::new(
            ServicePortName {
                namespace: "default".into(),
                name: "unit".into(),
                port: "".into(),
                protocol: Protocol::Tcp,
            },
            Arc::new(Settings {
                connect_timeout: Duration::from_secs(1),
                endpoint_backoff: Duration::from_secs(5),
                drain_grace: grace,
                udp_idle_timeout: Duration::from_secs(30),
                max_udp_flows: 16,
                clients: Arc::new(ClientSlots::new(16)),
            }),
        )
    }

    fn port_of(rt: &ServiceRuntime, role: Role, client: IpAddr, now: Instant) -> u16 {
        rt.choose(&rt.routes(), role, client, now)
            .unwrap()
            .addr
            .port()
    }

    const C1: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 0, 1));
    const C2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 0, 2));

    #[test]
    fn round_robin_is_strict_and_skips_backoff() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let now = Instant::now();
        t.apply(
            &rt,
            &info(vec![ep(1, true, "a"), ep(2, true, "a"), ep(3, true, "a")]),
            "a",
            now,
        );
        let seq: Vec<u16> = (0..6)
            .map(|_| port_of(&rt, Role::Internal, C1, now))
            .collect();
        assert_eq!(seq, [1, 2, 3, 1, 2, 3]);
        // 2 fails: skipped until the backoff ends.
        rt.routes().internal.eps[1].mark_failed(now, Duration::from_secs(5));
        let seq: Vec<u16> = (0..4)
            .map(|_| port_of(&rt, Role::Internal, C1, now))
            .collect();
        assert_eq!(seq, [1, 3, 1, 3]);
        let later = now + Duration::from_secs(6);
        let seq: Vec<u16> = (0..3)
            .map(|_| port_of(&rt, Role::Internal, C1, later))
            .collect();
        assert_eq!(seq, [1, 2, 3]);
    }

    #[test]
    fn all_backing_off_still_routes() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let now = Instant::now();
        t.apply(
            &rt,
            &info(vec![ep(1, true, "a"), ep(2, true, "a")]),
            "a",
            now,
        );
        for e in &rt.routes().internal.eps {
            e.mark_failed(now, Duration::from_secs(5));
        }
        let seq: Vec<u16> = (0..4)
            .map(|_| port_of(&rt, Role::Internal, C1, now))
            .collect();
        assert_eq!(seq, [1, 2, 1, 2]);
    }

    #[test]
    fn traffic_policy_splits_roles() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let mut i = info(vec![ep(1, true, "a"), ep(2, true, "b")]);
        i.external_local = true;
        t.apply(&rt, &i, "a", Instant::now());
        let r = rt.routes();
        assert_eq!(r.set(Role::Internal).len(), 2);
        assert_eq!(r.set(Role::External).len(), 1);
        assert!(r.set(Role::External).eps[0].serves(Role::External));
        assert!(!r.set(Role::Internal).eps[1].serves(Role::External));
    }

    #[test]
    fn not_ready_falls_back_to_serving_terminating() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let mut term = ep(2, false, "a");
        term.serving = true;
        term.terminating = true;
        t.apply(
            &rt,
            &info(vec![ep(1, false, "a"), term]),
            "a",
            Instant::now(),
        );
        let now = Instant::now();
        assert_eq!(port_of(&rt, Role::Internal, C1, now), 2);
    }

    #[test]
    fn affinity_sticks_until_idle_timeout() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let mut i = info(vec![ep(1, true, "a"), ep(2, true, "a"), ep(3, true, "a")]);
        i.affinity_timeout = Some(Duration::from_secs(10));
        let now = Instant::now();
        t.apply(&rt, &i, "a", now);
        let first = port_of(&rt, Role::Internal, C1, now);
        for k in 1..5 {
            // Each use refreshes the idle timer.
            let at = now + Duration::from_secs(9 * k);
            assert_eq!(port_of(&rt, Role::Internal, C1, at), first);
        }
        let other = port_of(&rt, Role::Internal, C2, now);
        assert_ne!(other, first);
        let expired = now + Duration::from_secs(36 + 11);
        assert_ne!(port_of(&rt, Role::Internal, C1, expired), first);
    }

    #[test]
    fn affinity_moves_off_removed_or_failed_endpoint() {
        let rt = runtime(None);
        let mut t = EndpointTable::default();
        let mut i = info(vec![ep(1, true, "a"), ep(2, true, "a")]);
        i.affinity_timeout = Some(Duration::from_secs(10));
        let now = Instant::now();
        t.apply(&rt, &i, "a", now);
        assert_eq!(port_of(&rt, Role::Internal, C1, now), 1);
        rt.routes().internal.eps[0].mark_failed(now, Duration::from_secs(5));
        assert_eq!(port_of(&rt, Role::Internal, C1, now), 2);
        // 2 removed: back to 1 (its backoff is over).
        i.endpoints.remove(1);
        let later = now + Duration::from_secs(6);
        t.apply(&rt, &i, "a", later);
        assert_eq!(port_of(&rt, Role::Internal, C1, later), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn removal_starts_drain_and_readd_cancels_it() {
        let rt = runtime(Some(Duration::from_secs(30)));
        let mut t = EndpointTable::default();
        let i = info(vec![ep(1, true, "a"), ep(2, true, "a")]);
        t.apply(&rt, &i, "a", Instant::now());
        let life = rt.routes().internal.eps[0].clone();
        let mut rx = life.watch();
        let mut gone = info(vec![ep(2, true, "a")]);
        t.apply(&rt, &gone, "a", Instant::now());
        assert!(!life.serves(Role::Internal));
        assert!(matches!(
            *rx.borrow(),
            Removal::Removed { deadline: Some(_) }
        ));
        // Re-added before the deadline: the drain is cancelled, same life.
        gone.endpoints.insert(0, ep(1, true, "a"));
        t.apply(&rt, &gone, "a", Instant::now());
        assert!(Arc::ptr_eq(&life, &rt.routes().internal.eps[0]));
        assert_eq!(*rx.borrow_and_update(), Removal::Live);
        // Removed for good: the deadline fires after the grace.
        t.apply(&rt, &info(vec![ep(2, true, "a")]), "a", Instant::now());
        let start = tokio::time::Instant::now();
        drain_deadline(&mut rx).await;
        assert!(start.elapsed() >= Duration::from_secs(30));
        // Nobody watches any more: forgotten on the next sync.
        drop(rx);
        t.apply(&rt, &info(vec![ep(2, true, "a")]), "a", Instant::now());
        assert_eq!(t.lives.len(), 1);
    }
}
