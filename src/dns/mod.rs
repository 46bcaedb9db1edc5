//! Cluster DNS: the node daemon answers `<svc>.<ns>.svc.<zone>` and the rest
//! of the Kubernetes DNS-Based Service Discovery specification (schema
//! 1.1.0) from the same Services + EndpointSlices cache the proxy uses, and
//! forwards every other name to the node's upstream resolvers.
//!
//! * [`index`] — pure: the zone, kept up to date one Service at a time from
//!   the node's lean cache ([`crate::model`]), and the answer to one
//!   question. Unit- and property-tested.
//! * [`server`] — UDP + TCP listeners over hickory-proto messages: request
//!   validation (FORMERR, NOTIMP, BADVERS, ...), EDNS0, truncation, metrics
//!   with CoreDNS's names.
//! * [`answers`] — finished replies to cluster names per worker thread,
//!   keyed by the question, dropped per changed Service: a repeated query
//!   is a hash lookup and a patched copy.
//! * [`forward`] — upstream resolvers with an answer cache.
//! * [`rrl`] — optional per-client rate limit of UDP answers (`--dns-rrl`).
//!
//! The daemon owns one [`DnsServer`]; after every (coalesced) cache change
//! it calls [`DnsServer::apply`] with the Services and namespaces that
//! changed ([`crate::model::Cache::take_dirty`]). The served
//! [`index::Index`] is one value behind a `RwLock`, changed in place:
//! `apply` computes the changed Services' contributions first, without
//! the lock ([`index::Delta`]), then takes the write lock only to swap
//! them in (hash-map operations per changed Service, nothing rendered) and
//! frees the replaced ones after releasing it. A query holds the read lock
//! for one [`index::Index::resolve`] (microseconds), so it sees the zone
//! before or after a whole delta, never a Service half applied, and a
//! delta waits at most for the queries already resolving. (Swapping in a
//! fresh copy per change, as [`DnsServer::update`] still does for a full
//! rebuild, would cost the size of the zone per change and twice its
//! memory while both exist.)
//!
//! hickory-server's `Server`/`RequestHandler` were not used: its UDP path
//! logs every request at `info` and spawns a task per packet, and its
//! decoding errors are answered by its own rules; a ~400-line loop over
//! hickory-proto gives us control of FORMERR/truncation behaviour and
//! per-request cost.

pub mod answers;
pub mod forward;
pub mod index;
pub mod rrl;
pub mod server;
pub mod udp;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use hickory_proto::rr::Name;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use forward::Forwarder;
pub use index::{Delta, Index, IndexConfig, Resolution};

use crate::model::{Cache, Dirty};
use crate::workers::Workers;

/// The cluster DNS Service IP kubeadm (and fairlead) use by default.
pub const DEFAULT_SERVICE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10));

/// Configuration of the cluster DNS server.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain (`--cluster-domain`), without or with the final dot.
    pub zone: String,
    /// TTL of cluster records and the SOA minimum (negative answers).
    pub ttl: Duration,
    /// Addresses to serve on, UDP and TCP each. Port 0 picks a free port
    /// (the same for UDP and TCP); see [`DnsServer::local_addrs`].
    pub listen: Vec<SocketAddr>,
    /// Resolvers for names outside the zone (`--dns-upstream`); default:
    /// the `nameserver`s of /etc/resolv.conf. Upstreams that are one of our
    /// own listen addresses are dropped (forwarding loop).
    pub upstreams: Vec<SocketAddr>,
    /// Serve `a-b-c-d.<ns>.pod.<zone>` (CoreDNS `pods insecure`).
    pub pod_records: bool,
    /// How long forwarding may take before the client gets SERVFAIL.
    pub forward_timeout: Duration,
    /// Upper bound of the forwarding cache's TTL (CoreDNS `cache 30`).
    pub cache_max_ttl: Duration,
    /// Entries in the forwarding cache.
    pub cache_capacity: usize,
    /// Largest UDP reply, and the EDNS payload size we advertise (the DNS
    /// flag day 2020 value).
    pub max_udp_payload: u16,
    /// How long an idle TCP connection is kept.
    pub tcp_idle_timeout: Duration,
    /// Open TCP connections; more are closed at once.
    pub max_tcp_connections: usize,
    /// Open TCP connections from one client address; more from it are
    /// closed at once, so one client cannot take every connection.
    pub max_tcp_per_client: usize,
    /// Forwarded queries in flight; more get SERVFAIL at once (CoreDNS
    /// `max_concurrent`, which answers REFUSED).
    pub max_concurrent_forwards: usize,
    /// UDP receive loops per listen address (default: one per core, ≤ 4),
    /// each on a thread of its own ([`crate::workers`]).
    pub udp_workers: usize,
    /// Those threads' names: `<thread_name>-<i>` (the kernel keeps 15
    /// bytes).
    pub thread_name: String,
    /// With `udp_reuseport`: hand a datagram to the loop whose index is the
    /// CPU it arrived on (modulo the loops) rather than by a hash of its
    /// addresses.
    pub udp_steer_by_cpu: bool,
    /// Datagrams a receive loop takes per `recvmmsg` (1 to
    /// [`udp::MAX_BATCH`]; 1 is a plain receive loop, for comparison).
    pub udp_batch: usize,
    /// Run each UDP receive loop as a thread blocked in `recvmmsg`
    /// ([`udp::Receiver`]) rather than as a task on an event loop
    /// ([`udp::serve`]).
    pub udp_blocking: bool,
    /// Give each UDP receive loop its own socket (`SO_REUSEPORT`: the
    /// kernel spreads clients over them) instead of one shared socket. Off
    /// by default: blocking receivers do best on one shared queue (see
    /// [`udp`]); turn it on with `udp_blocking` off.
    pub udp_reuseport: bool,
    /// Answers per second per client over UDP (`--dns-rrl`; `None`: no
    /// limit). See [`rrl`].
    pub rrl: Option<u32>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            zone: "cluster.local".into(),
            ttl: Duration::from_secs(5),
            listen: Vec::new(),
            upstreams: system_upstreams(Path::new("/etc/resolv.conf")),
            pod_records: true,
            forward_timeout: Duration::from_secs(2),
            cache_max_ttl: Duration::from_secs(30),
            cache_capacity: 10_000,
            max_udp_payload: 1232,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 1024,
            max_tcp_per_client: 64,
            max_concurrent_forwards: 1000,
            udp_workers: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 4),
            udp_reuseport: false,
            udp_blocking: true,
            thread_name: "fl-dns".to_string(),
            udp_batch: udp::MAX_BATCH,
            udp_steer_by_cpu: true,
            rrl: None,
        }
    }
}

/// Errors starting the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid cluster domain {0:?}")]
    Zone(String),
    #[error("no DNS listen address configured")]
    NoListen,
    #[error("cannot bind DNS {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The `nameserver` addresses of a resolv.conf (port 53), in order.
/// Unreadable files and unparsable lines give nothing.
pub fn system_upstreams(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    parse_resolv_conf(&text)
}

/// See [`system_upstreams`].
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let l = l.split(['#', ';']).next()?.trim();
            let mut parts = l.split_whitespace();
            (parts.next()? == "nameserver").then_some(())?;
            // Link-local zones (`fe80::1%eth0`) are not supported.
            let ip: IpAddr = parts.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// A name in lowercase wire form (length-prefixed labels, then 0).
fn wire_lowercase(name: &Name) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.to_ascii_lowercase());
    }
    out.push(0);
    out
}

/// Whether forwarding to `upstream` would reach one of our own sockets.
fn is_own(upstream: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == upstream.port()
            && (l.ip() == upstream.ip() || (l.ip().is_unspecified() && upstream.ip().is_loopback()))
    })
}

/// The running cluster DNS server. Dropping it stops its listeners.
pub struct DnsServer {
    shared: Arc<server::Shared>,
    cfg: IndexConfig,
    local_addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// The UDP receive loops' threads (see `shutdown`): event loops, or
    /// blocking receivers.
    workers: Option<Workers>,
    receivers: Vec<udp::Receiver>,
}

impl DnsServer {
    /// Bind UDP and TCP on every listen address and start serving (an
    /// empty zone until the first [`DnsServer::apply`] or
    /// [`DnsServer::update`]). Must be called inside a tokio runtime.
    pub async fn start(cfg: DnsConfig) -> Result<DnsServer, DnsError> {
        if cfg.listen.is_empty() {
            return Err(DnsError::NoListen);
        }
        let zone_str = cfg.zone.trim_end_matches('.');
        let mut zone = Name::from_ascii(zone_str)
            .ok()
            .filter(|z| !zone_str.is_empty() && z.num_labels() > 0)
            .ok_or_else(|| DnsError::Zone(cfg.zone.clone()))?;
        zone.set_fqdn(true);
        let zone = zone.to_lowercase();
        let index_cfg = IndexConfig {
            zone: zone.clone(),
            ttl: cfg.ttl.as_secs().min(u32::MAX as u64) as u32,
            pod_records: cfg.pod_records,
        };

        let mut sockets = Vec::new();
        for addr in &cfg.listen {
            sockets.push(bind_pair(*addr, cfg.udp_reuseport)?);
        }
        let local_addrs: Vec<SocketAddr> = sockets.iter().map(|(a, _, _)| *a).collect();
        let upstreams: Vec<SocketAddr> = cfg
            .upstreams
            .iter()
            .filter(|u| {
                let own = is_own(u, &local_addrs);
                if own {
                    tracing::warn!(upstream = %u, "ignoring DNS upstream that is this server");
                }
                !own
            })
            .copied()
            .collect();
        let server_label = format!("dns://{}", local_addrs[0]);
        let empty = Index::new(&index_cfg, unix_serial());
        let shared = Arc::new(server::Shared {
            index: RwLock::new(empty),
            zone: zone.clone(),
            forwarder: Forwarder::new(
                upstreams,
                cfg.forward_timeout,
                cfg.cache_max_ttl,
                cfg.cache_capacity,
                server_label,
            ),
            max_udp_payload: cfg.max_udp_payload.max(512),
            tcp_idle_timeout: cfg.tcp_idle_timeout,
            forwards: Arc::new(Semaphore::new(cfg.max_concurrent_forwards.max(1))),
            tcp_connections: Arc::new(Semaphore::new(cfg.max_tcp_connections.max(1))),
            tcp_clients: Default::default(),
            max_tcp_per_client: cfg.max_tcp_per_client.max(1),
            zone_label: Arc::from(zone.to_ascii()),
            answers: answers::AnswerTable::new(wire_lowercase(&zone)),
            rrl: cfg.rrl.map(rrl::RateLimiter::new),
        });
        let loops = cfg.udp_workers.max(1);
        let workers = if cfg.udp_blocking {
            None
        } else {
            let w = Workers::start(loops, &cfg.thread_name).map_err(|source| DnsError::Bind {
                proto: "udp",
                addr: local_addrs[0],
                source,
            })?;
            Some(w)
        };
        let mut receivers = Vec::new();
        let mut tasks = Vec::new();
        for (addr, udp, tcp) in sockets {
            let label: Arc<str> = Arc::from(format!("dns://{addr}"));
            let bind_err = |source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            };
            // With SO_REUSEPORT, every loop but the first has a socket of
            // its own in the first one's group; without, they share one (a
            // descriptor each, all woken by a datagram). Each loop
            // registers its socket on its own thread.
            let mut socks = Vec::with_capacity(loops);
            socks.push(udp);
            for _ in 1..loops {
                let sock = if cfg.udp_reuseport {
                    reuseport_udp(addr)
                } else {
                    socks[0].try_clone()
                };
                socks.push(sock.map_err(bind_err)?);
            }
            if cfg.udp_reuseport && cfg.udp_steer_by_cpu && loops > 1 {
                if let Err(e) = steer_by_cpu(&socks[0], loops) {
                    tracing::warn!(error = %e, "DNS: datagrams not steered by CPU");
                }
            }
            for (i, sock) in socks.into_iter().enumerate() {
                let (shared, label, batch) = (shared.clone(), label.clone(), cfg.udp_batch);
                let Some(workers) = &workers else {
                    // Forwarded queries run on the calling runtime, as TCP.
                    let name = format!("{}-r{i}", cfg.thread_name);
                    let forwards = tokio::runtime::Handle::current();
                    let r = udp::Receiver::spawn(name, sock, shared, label, batch, forwards);
                    receivers.push(r.map_err(bind_err)?);
                    continue;
                };
                workers.spawn_on(i, move || async move {
                    match udp::Udp::new(sock) {
                        Ok(sock) => udp::serve(Rc::new(sock), shared, label, batch).await,
                        Err(e) => tracing::error!(error = %e, "DNS UDP socket not registered"),
                    }
                });
            }
            tasks.push(tokio::spawn(server::tcp_acceptor(
                tcp,
                shared.clone(),
                label,
            )));
        }
        tracing::info!(
            zone = %zone,
            listen = ?local_addrs,
            upstreams = ?shared.forwarder.upstreams(),
            "cluster DNS serving"
        );
        Ok(DnsServer {
            shared,
            cfg: index_cfg,
            local_addrs,
            tasks,
            workers,
            receivers,
        })
    }

    /// The bound addresses (UDP and TCP share each), in `listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The upstreams in use (after dropping our own addresses).
    pub fn upstreams(&self) -> &[SocketAddr] {
        self.shared.forwarder.upstreams()
    }

    /// The index currently served, read-locked: changes wait while the
    /// guard lives, so do not keep it.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.shared.index()
    }

    /// The reply a listener would send for `packet`, computed on the
    /// calling thread; `None` when the request is dropped or needs an
    /// upstream. The whole synchronous path (parse, answer table, index,
    /// encode), for fuzzing ([`crate::fuzzing`]) and tests.
    pub fn answer(&self, packet: &[u8], proto: server::Proto) -> Option<Vec<u8>> {
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
        let label: Arc<str> = Arc::from("dns://fuzz");
        match server::prepare(&self.shared, packet, proto, peer, &label) {
            server::Prepared::Reply(bytes) => Some(bytes),
            server::Prepared::Drop | server::Prepared::Forward(_) => None,
        }
    }

    /// Apply the changes `dirty` names (taken from `cache` by
    /// [`Cache::take_dirty`]) to the served zone. Costs the size of the
    /// change: the changed Services' contributions are computed before the
    /// write lock is taken, and queries see the zone before or after the
    /// whole delta. Call it from the sync loop, with the same `cache` the
    /// dirty keys came from.
    pub fn apply(&self, cache: &Cache, dirty: &Dirty) {
        let started = std::time::Instant::now();
        let delta = Delta::new(&self.cfg, cache, dirty);
        if delta.is_empty() {
            return;
        }
        let services = dirty.services.len();
        let (applied, stats, serial) = {
            let mut index = self.shared.index.write().unwrap_or_else(|e| e.into_inner());
            let applied = index.commit(delta);
            (applied, index.stats(), index.serial())
        };
        // After the index has the change (see `answers`).
        self.shared
            .answers
            .invalidate(answers::Invalidation::for_services(
                dirty.services.iter().map(|k| (&*k.namespace, &*k.name)),
                !dirty.namespaces.is_empty(),
            ));
        let changed = applied.changed;
        // The replaced contributions are freed here, outside the lock.
        drop(applied);
        self.observe(stats, started);
        tracing::debug!(
            services,
            namespaces = dirty.namespaces.len(),
            changed,
            records = stats.records,
            serial,
            took = ?started.elapsed(),
            "DNS index changes applied"
        );
    }

    /// Rebuild the zone from whole API objects and swap it in (the
    /// from-scratch path; [`DnsServer::apply`] is the incremental one).
    /// `namespaces`: namespaces known to exist besides those of Services
    /// (may be empty). Takes time proportional to the cluster; call it from
    /// the sync loop, not per query.
    pub fn update(
        &self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        namespaces: &[String],
    ) {
        let started = std::time::Instant::now();
        let mut index = Index::build(
            &self.cfg,
            services.iter().map(|s| s.as_ref()),
            slices.iter().map(|s| s.as_ref()),
            namespaces.iter().map(String::as_str),
            0,
        );
        let stats = index.stats();
        let (old, serial) = {
            let mut current = self.shared.index.write().unwrap_or_else(|e| e.into_inner());
            // SOA serial: seconds since the epoch, strictly increasing.
            let serial = unix_serial().max(current.serial().wrapping_add(1));
            index.set_serial(serial);
            (std::mem::replace(&mut *current, index), serial)
        };
        self.shared.answers.invalidate(answers::Invalidation::All);
        // The old zone is freed outside the lock.
        drop(old);
        self.observe(stats, started);
        tracing::debug!(
            services = stats.services,
            names = stats.names,
            records = stats.records,
            serial,
            took = ?started.elapsed(),
            "DNS index rebuilt"
        );
    }

    fn observe(&self, stats: index::IndexStats, started: std::time::Instant) {
        metrics::gauge!("fairlead_dns_records").set(stats.records as f64);
        metrics::histogram!("fairlead_dns_index_build_duration_seconds")
            .record(started.elapsed().as_secs_f64());
    }

    /// Stop serving (also done on drop).
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        // Stops the receive loops' threads and waits for them, so their
        // sockets are closed when this returns.
        self.workers.take();
        self.receivers.clear();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unix_serial() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32)
}

/// Bind UDP and TCP on the same address; with port 0, on the same free
/// port (retrying when TCP's is taken). The UDP socket is left unregistered
/// (non-blocking): its receive loop registers it on its own thread.
fn bind_pair(
    addr: SocketAddr,
    reuseport: bool,
) -> Result<(SocketAddr, std::net::UdpSocket, tokio::net::TcpListener), DnsError> {
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = if reuseport {
            reuseport_udp(addr)
        } else {
            std::net::UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|()| s))
        }
        .map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let tcp = (|| {
            let s = if local.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            s.set_reuseaddr(true)?;
            s.bind(local)?;
            s.listen(1024)
        })();
        match tcp {
            Ok(l) => return Ok((local, udp, l)),
            Err(source) => {
                last = Some(DnsError::Bind {
                    proto: "tcp",
                    addr: local,
                    source,
                })
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Send a datagram to the socket (in bind order, so to the loop) whose
/// index is the CPU that received it, modulo the loops: the loop's wake-up
/// then starts where the datagram is (a classic BPF program on the
/// `SO_REUSEPORT` group: load the CPU number, mod N, return it).
fn steer_by_cpu(sock: &std::net::UdpSocket, loops: usize) -> std::io::Result<()> {
    use libc::{
        sock_filter, sock_fprog, BPF_A, BPF_ABS, BPF_ALU, BPF_K, BPF_LD, BPF_MOD, BPF_RET, BPF_W,
    };
    let op = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = [
        op(
            BPF_LD | BPF_W | BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        ),
        op(BPF_ALU | BPF_MOD | BPF_K, loops as u32),
        op(BPF_RET | BPF_A, 0),
    ];
    let fprog = sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)?;
    Ok(())
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`.
fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_takes_the_cpu_steering_program() {
        // Two sockets in one SO_REUSEPORT group; the kernel checks the
        // classic BPF program when it is attached (EINVAL if malformed).
        let first = reuseport_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let _second = reuseport_udp(addr).unwrap();
        steer_by_cpu(&first, 2).unwrap();
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch x.y\nnameserver 10.255.255.53\nnameserver ::1 # v6\n\
                    nameserver fe80::1%eth0\noptions ndots:5\n ; nameserver 1.1.1.1\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn own_addresses_are_not_upstreams() {
        let listen = [
            "0.0.0.0:53".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        ];
        assert!(is_own(&"127.0.0.1:53".parse().unwrap(), &listen));
        assert!(is_own(&"10.96.0.10:53".parse().unwrap(), &listen));
        assert!(!is_own(&"10.255.255.53:53".parse().unwrap(), &listen));
        assert!(!is_own(&"127.0.0.1:5353".parse().unwrap(), &listen));
    }

    /// A server on a loopback port, without upstreams.
    async fn loopback_server() -> DnsServer {
        DnsServer::start(DnsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            upstreams: Vec::new(),
            ..DnsConfig::default()
        })
        .await
        .unwrap()
    }

    /// A reply from the table of finished answers is the reply the full
    /// path gives (same records, flags and EDNS; the client's ID, RD, CD
    /// and letter case), for every shape of request, and a change of one
    /// Service replaces its answers but keeps the others.
    #[tokio::test]
    async fn answers_from_the_table_equal_the_full_path() {
        use hickory_proto::op::{Edns, Message, Query};
        use hickory_proto::rr::RecordType;
        use server::{prepare, Prepared, Proto};

        let dns = loopback_server().await;
        let svc = |name: &str, ip: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "d"},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap()
        };
        let mut cache = Cache::new();
        cache.apply_service(&svc("web", "10.96.0.20"));
        cache.apply_service(&svc("db", "10.96.0.21"));
        let dirty = cache.take_dirty();
        dns.apply(&cache, &dirty);

        let peer: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let label: Arc<str> = Arc::from("dns://test");
        let ask = |bytes: &[u8], proto| match prepare(&dns.shared, bytes, proto, peer, &label) {
            Prepared::Reply(r) => r,
            _ => panic!("no reply"),
        };
        #[allow(clippy::too_many_arguments)]
        let request =
            |id: u16, name: &str, t: RecordType, rd: bool, cd: bool, edns: Option<(u16, bool)>| {
                let mut m = Message::query();
                m.metadata.id = id;
                m.metadata.recursion_desired = rd;
                m.metadata.checking_disabled = cd;
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
                if let Some((size, dnssec_ok)) = edns {
                    let mut e = Edns::new();
                    e.set_max_payload(size);
                    e.set_dnssec_ok(dnssec_ok);
                    m.set_edns(e);
                }
                m.to_vec().unwrap()
            };
        let names = [
            ("web.d.svc.cluster.local.", RecordType::A),
            ("web.d.svc.cluster.local.", RecordType::AAAA),
            ("_http._tcp.web.d.svc.cluster.local.", RecordType::SRV),
            (
                "web.d.svc.cluster.local.d.svc.cluster.local.",
                RecordType::A,
            ),
            ("d.svc.cluster.local.", RecordType::A),
            ("cluster.local.", RecordType::SOA),
            ("20.0.96.10.in-addr.arpa.", RecordType::PTR),
        ];
        let shapes = [
            (Proto::Udp, None),
            (Proto::Udp, Some((4096, false))),
            (Proto::Udp, Some((512, true))),
            (Proto::Tcp, None),
        ];
        for (name, t) in names {
            for (proto, edns) in shapes {
                // Warm the table with one spelling, then ask another way.
                ask(&request(1, name, t, true, false, edns), proto);
                let other = name.to_ascii_uppercase();
                let q = request(0xbeef, &other, t, false, true, edns);
                let parsed = answers::Question::parse(&q, proto, dns.shared.max_udp_payload)
                    .expect("a plain query");
                assert!(
                    answers::lookup(&dns.shared.answers, &parsed, &q).is_some(),
                    "in the table: {name} {t} {proto:?} {edns:?}"
                );
                let hit = ask(&q, proto);
                dns.shared.answers.invalidate(answers::Invalidation::All);
                let full = ask(&q, proto);
                let what = format!("{name} {t} {proto:?} {edns:?}");
                assert_eq!(
                    Message::from_vec(&hit).unwrap(),
                    Message::from_vec(&full).unwrap(),
                    "{what}"
                );
                let qlen = other.len() + 1;
                assert_eq!(&hit[..4], &full[..4], "ID and flags: {what}");
                assert_eq!(
                    &hit[12..12 + qlen],
                    &q[12..12 + qlen],
                    "the client's spelling: {what}"
                );
            }
        }

        // A change of web: its answer follows at once, db's stays cached.
        let web_a = request(
            7,
            "web.d.svc.cluster.local.",
            RecordType::A,
            true,
            false,
            None,
        );
        let db_a = request(
            8,
            "db.d.svc.cluster.local.",
            RecordType::A,
            true,
            false,
            None,
        );
        ask(&web_a, Proto::Udp);
        ask(&db_a, Proto::Udp);
        cache.apply_service(&svc("web", "10.96.0.30"));
        let dirty = cache.take_dirty();
        dns.apply(&cache, &dirty);
        let fresh = Message::from_vec(&ask(&web_a, Proto::Udp)).unwrap();
        assert_eq!(
            fresh.answers[0].data.to_string(),
            "10.96.0.30",
            "web's new address, not the cached one"
        );
        let db_q = answers::Question::parse(&db_a, Proto::Udp, dns.shared.max_udp_payload).unwrap();
        assert!(
            answers::lookup(&dns.shared.answers, &db_q, &db_a).is_some(),
            "db's answer survives a change of web"
        );
    }

    /// The server serves what `apply` hands it, a delta at a time, and
    /// `update` (a full rebuild) and `apply` can follow each other.
    #[tokio::test]
    async fn apply_changes_the_served_zone() {
        use hickory_proto::op::ResponseCode;
        use hickory_proto::rr::RecordType;

        let dns = loopback_server().await;
        let name = Name::from_ascii("web.d.svc.cluster.local.").unwrap();
        let answer = |dns: &DnsServer| match dns.index().resolve(&name, RecordType::A) {
            Resolution::Zone(z) => (z.rcode, z.answers.len()),
            other => panic!("{other:?}"),
        };
        assert_eq!(answer(&dns), (ResponseCode::NXDomain, 0));
        let web: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "d"},
            "spec": {"clusterIP": "10.96.0.20"}
        }))
        .unwrap();
        let mut cache = Cache::new();
        let sync = |cache: &mut Cache| {
            let dirty = cache.take_dirty();
            dns.apply(cache, &dirty);
        };
        cache.apply_service(&web);
        let serial = dns.index().serial();
        sync(&mut cache);
        assert_eq!(answer(&dns), (ResponseCode::NoError, 1));
        assert!(dns.index().serial() > serial);

        cache.delete_service("d", "web");
        sync(&mut cache);
        assert_eq!(answer(&dns), (ResponseCode::NXDomain, 0));

        let serial = dns.index().serial();
        dns.update(&[Arc::new(web)], &[], &[]);
        assert_eq!(answer(&dns), (ResponseCode::NoError, 1));
        assert!(dns.index().serial() > serial);
        cache.apply_namespace("d");
        sync(&mut cache);
        assert_eq!(
            answer(&dns),
            (ResponseCode::NoError, 1),
            "apply keeps the rebuild's web"
        );
        assert_eq!(dns.index().stats().services, 1);
    }
}
