//! TCP: accept on a service frontend, hand the connection to a worker
//! ([`crate::workers`]), pick an endpoint (with failover), and relay bytes both
//! ways with correct half-close.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::routes::{drain_deadline, EndpointLife, Role, Routes, ServiceRuntime};
use crate::workers::Workers;

/// Relay buffer per direction: it starts at [`FIRST_BUF`] and grows to
/// [`BUF`] while reads keep filling it (a bulk transfer). On the heap and
/// never zeroed: a buffer inside the task's future made every connection
/// zero 128 KiB and copy it into the spawned task (a fifth of the proxy's
/// CPU per short connection, `perf`), and made the task too large for
/// malloc's pools.
const BUF: usize = 64 * 1024;
const FIRST_BUF: usize = 16 * 1024;
/// The pipe of a spliced (bulk) direction.
const PIPE: usize = 1024 * 1024;

/// Most connections taken per wake-up before the loop looks at `stop`
/// again (and lets the runtime run something else).
const ACCEPT_BATCH: usize = 64;

/// Accept until told to stop (or the stop sender is dropped); every
/// connection is served on the least-loaded worker, where it outlives the
/// listener. Runs on a worker loop, whose epoll the listener joins: an
/// accept needs no thread but the loops', and a connection kept on the
/// accepting loop starts without a hand-over. `_done` is dropped when the
/// loop ends and the listener is closed.
pub(crate) async fn accept_loop(
    listener: AsyncFd<mio::net::TcpListener>,
    rt: Arc<ServiceRuntime>,
    role: Role,
    workers: Arc<Workers>,
    mut stop: oneshot::Receiver<()>,
    _done: oneshot::Sender<()>,
) {
    // A local, so it is closed before the parameters are dropped: `_done`
    // must tell `Running::close` only once the port is free.
    let listener = listener;
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = &mut stop => return,
            r = listener.readable() => match r {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(service = %rt.name, error = %e, "listener failed");
                    return;
                }
            },
        };
        for _ in 0..ACCEPT_BATCH {
            match ready.try_io(|l| l.get_ref().accept()) {
                Ok(Ok((stream, peer))) => {
                    let Some(slot) = rt.settings.clients.claim(peer.ip()) else {
                        // Over the client's cap: reset, not a silent close.
                        let _ = socket2::SockRef::from(&stream)
                            .set_linger(Some(std::time::Duration::ZERO));
                        drop(stream);
                        continue;
                    };
                    let rt = rt.clone();
                    workers.dispatch(move || async move {
                        let _slot = slot;
                        let std = std::net::TcpStream::from(std::os::fd::OwnedFd::from(stream));
                        match TcpStream::from_std(std) {
                            Ok(client) => serve(client, peer, rt, role).await,
                            Err(e) => {
                                tracing::warn!(service = %rt.name, error = %e, "connection not registered")
                            }
                        }
                    });
                }
                // Nothing more waiting.
                Err(_would_block) => break,
                Ok(Err(e)) => {
                    // EMFILE and friends: back off briefly instead of
                    // spinning.
                    tracing::warn!(service = %rt.name, error = %e, "accept failed");
                    drop(ready);
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    }
                    break;
                }
            }
        }
    }
}

/// Decrements the active-connections gauge however the connection ends.
pub(crate) struct Active<'a>(pub(crate) &'a Gauge);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Abort a connection with RST rather than FIN, so the peer sees a refusal
/// or reset at once.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// A non-blocking connect whose success costs no `getsockopt(SO_ERROR)`
/// (tokio's `TcpSocket::connect` asks for it every time): a refused or
/// reset handshake shows as EPOLLHUP/EPOLLERR in the same readiness that
/// says writable, and only then is the error fetched. The socket is made
/// non-blocking in `socket(2)` itself, and TCP_NODELAY set before the
/// handshake (kept for the connection).
pub(super) async fn connect(addr: SocketAddr, rt: &ServiceRuntime) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    // (On the loop's deadline queue, not a tokio timer per connect: see
    // `deadlines`.)
    let ready = super::deadlines::timeout(
        rt.settings.connect_timeout,
        stream.ready(tokio::io::Interest::WRITABLE),
    )
    .await
    .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    if ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// Connect to an endpoint: the chosen one, then the next ones on failure
/// (at most one try per endpoint). Failed endpoints back off.
async fn connect_upstream(
    rt: &ServiceRuntime,
    routes: &Routes,
    role: Role,
    peer: SocketAddr,
) -> Option<(TcpStream, Arc<EndpointLife>)> {
    let tries = routes.set(role).len();
    for _ in 0..tries {
        let ep = rt.choose(routes, role, peer.ip(), Instant::now())?;
        match connect(ep.addr, rt).await {
            Ok(s) => {
                ep.mark_ok();
                return Some((s, ep));
            }
            Err(e) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "endpoint connect failed");
                rt.metrics.connect_errors.increment(1);
                ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
            }
        }
    }
    None
}

async fn serve(client: TcpStream, peer: SocketAddr, rt: Arc<ServiceRuntime>, role: Role) {
    // One look at the table per connection: per-request (L7) or not, and
    // the endpoint.
    let routes = rt.routes();
    if let Some(app) = routes.app_protocol() {
        drop(routes);
        return super::l7::serve(client, peer, rt, role, app).await;
    }
    // (TCP_NODELAY: inherited from the listener, `sys::tcp_listener`.)
    let connected = connect_upstream(&rt, &routes, role, peer).await;
    // (Not kept for the connection's life: a later table replaces it.)
    drop(routes);
    let Some((upstream, ep)) = connected else {
        // No endpoint, or none reachable: refuse.
        reset(&client);
        return;
    };
    rt.metrics.connections.increment(1);
    rt.metrics.active.increment(1.0);
    let _active = Active(&rt.metrics.active);
    let mut client = client;
    let mut upstream = upstream;
    let result = match rt.settings.drain_grace {
        None => relay(&mut client, &mut upstream, &rt).await,
        Some(_) => {
            let mut removal = ep.watch();
            tokio::select! {
                r = relay(&mut client, &mut upstream, &rt) => r,
                _ = drain_deadline(&mut removal) => {
                    tracing::debug!(service = %rt.name, endpoint = %ep.addr, "drain grace over; closing");
                    Err(io::Error::new(io::ErrorKind::TimedOut, "drain grace over"))
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::trace!(service = %rt.name, endpoint = %ep.addr, error = %e, "connection aborted");
        reset(&client);
        reset(&upstream);
    }
}

/// Both directions until both have seen EOF; an error in either ends both.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    rt: &ServiceRuntime,
) -> io::Result<()> {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let (up_ended, down_ended) = (AtomicBool::new(false), AtomicBool::new(false));
    tokio::try_join!(
        one_way(
            &mut cr,
            &mut uw,
            &rt.metrics.bytes_up,
            rt,
            [&up_ended, &down_ended]
        ),
        one_way(
            &mut ur,
            &mut cw,
            &rt.metrics.bytes_down,
            rt,
            [&down_ended, &up_ended]
        ),
    )?;
    Ok(())
}

/// Copy until EOF, then half-close the writer (FIN) so the other side sees
/// the end of this direction while the other one keeps flowing. When the
/// other direction has ended too (`ended`: this one's flag, the other's),
/// that `shutdown(2)` is skipped: both sockets are read to EOF, so closing
/// them sends the same FIN, one system call fewer. The direction that
/// ends first yields before deciding, until the loop has polled its epoll
/// once more (`yield_now` defers the task past the next driver poll): the
/// other side's FIN is often in by then. A request/response client that
/// closes as soon as it has the response (wrk with `Connection: close`)
/// then costs no `shutdown` at all: `strace -c` of the loops under
/// `cargo bench --bench userspace`, 8,550 `shutdown`s for 8,605
/// connections before, 70 for 7,596 after. The FIN to the first side is
/// late by one loop turn at most.
///
/// Bytes go through a buffer until one read fills [`BUF`] (a bulk
/// transfer, not requests and responses); from then on they are
/// `splice(2)`d through a pipe, socket to socket, without copies through
/// this process ([`splice_until_eof`]). Short exchanges never pay for the
/// pipe.
async fn one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    bytes: &Counter,
    rt: &ServiceRuntime,
    ended: [&AtomicBool; 2],
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_BUF);
    loop {
        buf.clear();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf).await?;
        bytes.increment(n as u64);
        if n >= BUF {
            drop(buf);
            splice_until_eof(r.as_ref(), w.as_ref(), &[bytes, &rt.metrics.spliced]).await?;
            break;
        }
        if n == buf.capacity() {
            buf.reserve((n * 4).min(BUF) - n);
        }
    }
    ended[0].store(true, Ordering::Release);
    if ended[1].load(Ordering::Acquire) {
        return Ok(());
    }
    tokio::task::yield_now().await;
    if ended[1].load(Ordering::Acquire) {
        return Ok(());
    }
    match w.shutdown().await {
        // The peer may already be fully gone; nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

/// Move bytes from `r` to `w` through a pipe until `r`'s EOF. Each round
/// fills the pipe from `r`, then empties it into `w`, so a `WouldBlock`
/// always means the socket is not ready (never that the pipe is full or
/// empty), which is what tokio's readiness tracking needs to hear.
async fn splice_until_eof(r: &TcpStream, w: &TcpStream, counters: &[&Counter]) -> io::Result<()> {
    use nix::fcntl::{splice, SpliceFFlags};
    use nix::unistd::pipe2;
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    let (pipe_r, pipe_w) = pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    // A larger pipe moves more per round (fewer system calls and wake-ups
    // per byte); the kernel caps it at fs.pipe-max-size, and a refusal
    // leaves the default 64 KiB.
    let chunk = nix::fcntl::fcntl(&pipe_w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE as _))
        .map(|n| n as usize)
        .unwrap_or(BUF);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = loop {
            r.readable().await?;
            let step = r.try_io(Interest::READABLE, || {
                Ok(splice(r.as_fd(), None, pipe_w.as_fd(), None, chunk, flags)?)
            });
            match step {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            w.writable().await?;
            let step = w.try_io(Interest::WRITABLE, || {
                Ok(splice(pipe_r.as_fd(), None, w.as_fd(), None, left, flags)?)
            });
            match step {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        for c in counters {
            c.increment(n as u64);
        }
    }
}
