//! UDP: one flow per client address (a connected socket to the endpoint
//! chosen for that client), ended after `udp_idle_timeout` without traffic
//! either way. Replies leave through the listening socket, so the client
//! sees them come from the service address and port it sent to; on a
//! wildcard (NodePort) socket the exact destination address is recovered
//! with pktinfo and used as the reply's source.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};

use super::routes::{now_stamp, stamp_instant, EndpointLife, Removal, Role, ServiceRuntime};
use super::sys;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65536;

/// Replies forwarded per readiness wake-up of a flow.
const REPLIES_PER_WAKE: usize = 64;

thread_local! {
    /// Receive buffer for flow replies: flows read only when readable and
    /// forward synchronously, so one buffer per worker thread serves them
    /// all (no 64 KiB per flow).
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// The listening side of a UDP frontend.
pub(crate) struct UdpFrontend {
    pub(crate) sock: UdpSocket,
    /// Bound to a wildcard address: use pktinfo.
    pub(crate) wildcard: bool,
}

impl UdpFrontend {
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpFrontend> {
        let wildcard = addr.ip().is_unspecified();
        Ok(UdpFrontend {
            sock: sys::udp_socket(addr, wildcard)?,
            wildcard,
        })
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if self.wildcard {
            let fd = self.sock.as_raw_fd();
            self.sock
                .async_io(Interest::READABLE, || sys::recv_pktinfo(fd, buf))
                .await
        } else {
            let (n, peer) = self.sock.recv_from(buf).await?;
            Ok((n, peer, None))
        }
    }

    /// Best effort, never waits: UDP may drop.
    fn reply(&self, buf: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<usize> {
        match from {
            Some(from) => {
                let fd = self.sock.as_raw_fd();
                self.sock
                    .try_io(Interest::WRITABLE, || sys::send_from(fd, buf, to, from))
            }
            None => self.sock.try_send_to(buf, to),
        }
    }
}

/// One client's flow.
struct Flow {
    upstream: UdpSocket,
    endpoint: Arc<EndpointLife>,
    /// Last traffic either way (stamp).
    last: AtomicU64,
}

impl Flow {
    fn touch(&self) {
        self.last.store(now_stamp(), Ordering::Relaxed);
    }
}

struct FlowEntry {
    flow: Arc<Flow>,
    /// The address the client sent to (wildcard frontends only).
    local: Option<IpAddr>,
    id: u64,
    abort: AbortHandle,
}

/// Receive from clients until told to stop; then end every flow.
pub(crate) async fn serve(
    front: UdpFrontend,
    rt: Arc<ServiceRuntime>,
    role: Role,
    mut stop: oneshot::Receiver<()>,
) {
    let front = Arc::new(front);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut flows: HashMap<SocketAddr, FlowEntry> = HashMap::new();
    let mut tasks: JoinSet<(SocketAddr, u64)> = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((client, id)) = done {
                    if flows.get(&client).is_some_and(|f| f.id == id) {
                        flows.remove(&client);
                        rt.metrics.udp_flows.decrement(1.0);
                    }
                }
            }
            r = front.recv(&mut buf) => match r {
                Ok((n, client, local)) => {
                    datagram(&front, &rt, role, &mut flows, &mut tasks, &mut next_id, &buf[..n], client, local).await;
                }
                Err(e) => tracing::debug!(service = %rt.name, error = %e, "udp receive"),
            }
        }
    }
    tasks.shutdown().await;
    rt.metrics.udp_flows.decrement(flows.len() as f64);
}

#[allow(clippy::too_many_arguments)]
async fn datagram(
    front: &Arc<UdpFrontend>,
    rt: &Arc<ServiceRuntime>,
    role: Role,
    flows: &mut HashMap<SocketAddr, FlowEntry>,
    tasks: &mut JoinSet<(SocketAddr, u64)>,
    next_id: &mut u64,
    data: &[u8],
    client: SocketAddr,
    local: Option<IpAddr>,
) {
    if let Some(f) = flows.get(&client) {
        if f.local == local && f.flow.endpoint.serves(role) {
            f.flow.touch();
            match f.flow.upstream.try_send(data) {
                Ok(n) => {
                    rt.metrics.bytes_up.increment(n as u64);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Typically ECONNREFUSED from an earlier ICMP error.
                    tracing::debug!(service = %rt.name, endpoint = %f.flow.endpoint.addr, error = %e, "udp send");
                    rt.metrics.connect_errors.increment(1);
                    f.flow
                        .endpoint
                        .mark_failed(Instant::now(), rt.settings.endpoint_backoff);
                }
            }
        }
        // Stale (endpoint gone or failed): a new flow takes over.
        if let Some(old) = flows.remove(&client) {
            old.abort.abort();
            rt.metrics.udp_flows.decrement(1.0);
        }
    }
    if flows.len() >= rt.settings.max_udp_flows {
        metrics::counter!("fairlead_proxy_dropped_total", "reason" => "udp_flow_limit")
            .increment(1);
        return;
    }
    let routes = rt.routes();
    for _ in 0..routes.set(role).len() {
        let Some(ep) = rt.choose(&routes, role, client.ip(), Instant::now()) else {
            return;
        };
        let upstream = match open_upstream(ep.addr).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "udp upstream");
                rt.metrics.connect_errors.increment(1);
                ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
                continue;
            }
        };
        // Not try_send: a fresh socket has no readiness recorded yet (tokio
        // would report WouldBlock); its empty buffer makes this immediate.
        match upstream.send(data).await {
            Ok(n) => rt.metrics.bytes_up.increment(n as u64),
            Err(e) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "udp send");
                rt.metrics.connect_errors.increment(1);
                ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
                continue;
            }
        }
        let flow = Arc::new(Flow {
            upstream,
            endpoint: ep,
            last: AtomicU64::new(now_stamp()),
        });
        *next_id += 1;
        let id = *next_id;
        let abort = tasks.spawn(run_flow(
            flow.clone(),
            front.clone(),
            rt.clone(),
            client,
            local,
            id,
        ));
        flows.insert(
            client,
            FlowEntry {
                flow,
                local,
                id,
                abort,
            },
        );
        rt.metrics.connections.increment(1);
        rt.metrics.udp_flows.increment(1.0);
        return;
    }
}

async fn open_upstream(ep: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if ep.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(ep).await?;
    Ok(s)
}

/// Forward replies to the client until idle, the endpoint is removed, or it
/// refuses (ICMP port unreachable → backoff).
async fn run_flow(
    flow: Arc<Flow>,
    front: Arc<UdpFrontend>,
    rt: Arc<ServiceRuntime>,
    client: SocketAddr,
    local: Option<IpAddr>,
    id: u64,
) -> (SocketAddr, u64) {
    let idle = rt.settings.udp_idle_timeout;
    let mut removal = flow.endpoint.watch();
    loop {
        let deadline = stamp_instant(flow.last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            r = flow.upstream.readable() => {
                if r.is_err() {
                    break;
                }
                match forward_replies(&flow, &front, &rt, client, local) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(service = %rt.name, endpoint = %flow.endpoint.addr, error = %e, "udp upstream receive");
                        if e.kind() == io::ErrorKind::ConnectionRefused {
                            rt.metrics.connect_errors.increment(1);
                            flow.endpoint.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
                        }
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let last = stamp_instant(flow.last.load(Ordering::Relaxed));
                if Instant::now().saturating_duration_since(last) >= idle {
                    break;
                }
            }
            r = removal.changed() => {
                // UDP has no connection to drain: like kube-proxy clearing
                // conntrack, a removed endpoint's flows end at once.
                if r.is_err() || *removal.borrow() != Removal::Live {
                    break;
                }
            }
        }
    }
    (client, id)
}

/// Everything readable now, straight to the client.
fn forward_replies(
    flow: &Flow,
    front: &UdpFrontend,
    rt: &ServiceRuntime,
    client: SocketAddr,
    local: Option<IpAddr>,
) -> io::Result<()> {
    REPLY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        // Bounded, so one busy flow cannot hog the worker thread; if more
        // is queued the socket stays readable and we come back at once.
        for _ in 0..REPLIES_PER_WAKE {
            match flow.upstream.try_recv(&mut buf) {
                Ok(n) => {
                    flow.touch();
                    match front.reply(&buf[..n], client, local) {
                        Ok(_) => rt.metrics.bytes_down.increment(n as u64),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            tracing::debug!(service = %rt.name, client = %client, error = %e, "udp reply")
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}
