//! The UDP receive loops: datagrams taken in batches with `recvmmsg(2)`,
//! answered, and the replies sent in one `sendmmsg(2)`. Two ways to wait,
//! the same answering ([`answer`]):
//!
//! ```text
//!  Receiver (default): a thread per socket, blocked in
//!      recvmmsg(MSG_WAITFORONE) ─► wakes with the first datagram and
//!      takes whatever else is queued (up to BATCH) in the same call
//!  serve (udp_blocking = false): a task on a per-core event loop
//!      epoll says readable ─► recvmmsg (up to BATCH, MSG_DONTWAIT)
//!      fewer than BATCH: the queue is empty ─► clear readiness ourselves
//!
//!  each datagram: rate limit, prepare (answer table / index / forward)
//!  replies of the batch ─► sendmmsg (one reply: sendto)
//! ```
//!
//! **Why a blocking thread.** At a low rate every query comes alone. The
//! blocking receiver makes two system calls for it (recvmmsg, sendto) and
//! the kernel wakes the thread straight from the socket's wait queue; the
//! event loop makes three (epoll_wait, recvmmsg, sendto) and turns its
//! runtime's driver and scheduler. In `cargo bench --bench dns`, same runs:
//! CPU per query at 5,000 q/s 0.96× dnsmasq's against 1.12×, p99 0.95×
//! against 1.06×. Under load both take a batch per call.
//!
//! **Why the receivers share one socket** (`udp_reuseport` off): it is one
//! queue served by every receiver, and the kernel wakes one waiting
//! receiver per datagram (an exclusive wait, no thundering herd as with
//! epoll). With a socket each, a datagram waits in its socket's queue while
//! that receiver is busy even if another is idle. p99 at 5,000 q/s, three
//! alternating runs each: 0.86–0.91× dnsmasq's shared, 0.96–1.07× with a
//! socket each, at the same peak rate. (The event loops want a socket each:
//! every loop's epoll would wake for a shared socket's datagram.)
//!
//! Queries for an upstream are handed to the node's runtime. A name in the
//! forwarder's cache needs no upstream: its future is polled once on the
//! receive thread and is ready at once, so the reply joins the batch.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::server::{complete, prepare, Pending, Prepared, Proto, Shared};

/// Most datagrams per receive call (and replies per send call); the
/// server's `udp_batch` picks up to this many.
pub const MAX_BATCH: usize = 32;
/// Largest request taken whole; a longer one (the kernel sets MSG_TRUNC)
/// is dropped. A query is a question and an OPT record, a few hundred
/// bytes even with EDNS padding.
const MAX_REQUEST: usize = 4096;

/// A UDP socket in this thread's reactor, with readiness we can clear.
///
/// Registered for reads only. A UDP socket with write interest in epoll is
/// signalled every time a sent datagram's memory is freed (the socket's
/// `sk_write_space` runs per datagram, unlike TCP's, which runs only after
/// a write found the buffer full): in `strace` of the loop at 5,000 q/s,
/// one wake-up in seven was such a write event with nothing to do. A send
/// that finds the buffer full (rare: a UDP buffer drains as the kernel
/// delivers) waits through a short-lived write registration of a duplicate
/// descriptor instead ([`wait_writable`]).
pub struct Udp(AsyncFd<std::net::UdpSocket>);

impl Udp {
    /// Register `sock` (non-blocking) with the current runtime.
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Udp> {
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays
        // open and the same until the AsyncFd is dropped (what tokio
        // cannot check).
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?;
        Ok(Udp(fd))
    }

    /// Send one datagram, waiting while the socket's buffer is full.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        loop {
            match self.0.get_ref().send_to(buf, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_writable(self.0.get_ref()).await?
                }
                r => return r,
            }
        }
    }
}

/// One receive batch's buffers and what the kernel said about each.
struct Batch {
    /// Datagrams asked for per call (1..=MAX_BATCH).
    size: usize,
    bufs: Box<[[u8; MAX_REQUEST]; MAX_BATCH]>,
    headers: MultiHeaders<SockaddrStorage>,
    got: Vec<(usize, Option<SocketAddr>, bool)>,
}

impl Batch {
    fn new(size: usize) -> Batch {
        let size = size.clamp(1, MAX_BATCH);
        Batch {
            size,
            bufs: vec![[0u8; MAX_REQUEST]; MAX_BATCH]
                .into_boxed_slice()
                .try_into()
                .expect("MAX_BATCH buffers"),
            headers: MultiHeaders::preallocate(size, None),
            got: Vec::with_capacity(size),
        }
    }

    /// Take what is queued, up to `size`: (length, peer, truncated) in
    /// `got`. `flags`: `MSG_DONTWAIT` on a ready socket, `MSG_WAITFORONE`
    /// to block for the first datagram and take the rest that are queued.
    fn recv(&mut self, sock: &std::net::UdpSocket, flags: MsgFlags) -> io::Result<usize> {
        self.got.clear();
        let mut bufs = self.bufs.iter_mut();
        let mut iovs: [[IoSliceMut<'_>; 1]; MAX_BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(
                bufs.next().expect("MAX_BATCH buffers").as_mut_slice(),
            )]
        });
        let results = recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut().take(self.size),
            flags,
            None,
        )?;
        for r in results {
            let peer = r.address.as_ref().and_then(to_std);
            self.got
                .push((r.bytes, peer, r.flags.contains(MsgFlags::MSG_TRUNC)));
        }
        Ok(self.got.len())
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Replies of one batch, sent together.
struct Replies {
    out: Vec<(Vec<u8>, SocketAddr)>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Replies {
    fn new(size: usize) -> Replies {
        let size = size.clamp(1, MAX_BATCH);
        Replies {
            out: Vec::with_capacity(size),
            headers: MultiHeaders::preallocate(size, None),
        }
    }

    /// One `sendmmsg` of the replies from `from` on: how many the socket
    /// took.
    fn send_from(
        &mut self,
        sock: &std::net::UdpSocket,
        from: usize,
        flags: MsgFlags,
    ) -> nix::Result<usize> {
        let rest = &self.out[from..];
        let slices: Vec<[IoSlice<'_>; 1]> = rest.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = rest
            .iter()
            .map(|(_, to)| Some(SockaddrStorage::from(*to)))
            .collect();
        sendmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            &slices,
            addrs,
            [],
            flags,
        )
        .map(|r| r.count())
    }

    /// Send every reply: `sendmmsg` while the socket takes them, waiting
    /// for room when it does not.
    async fn flush(&mut self, sock: &Udp) {
        if let [(reply, to)] = &self.out[..] {
            // One reply (a quiet moment): a plain send, nothing to batch.
            if let Err(e) = sock.send_to(reply, *to).await {
                tracing::debug!(peer = %to, error = %e, "DNS UDP send error");
            }
            self.out.clear();
            return;
        }
        let mut sent = 0;
        while sent < self.out.len() {
            match self.send_from(sock.0.get_ref(), sent, MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n > 0 => sent += n,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {
                    // The send buffer is full: wait for room.
                    if wait_writable(sock.0.get_ref()).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // One bad destination (say, unreachable): drop that
                    // reply, keep the rest.
                    tracing::debug!(peer = %self.out[sent].1, error = %e, "DNS UDP send error");
                    sent += 1;
                }
            }
        }
        self.out.clear();
    }

    /// Send every reply on a blocking socket (a full send buffer blocks
    /// the call until it has room).
    fn flush_blocking(&mut self, sock: &std::net::UdpSocket) {
        if let [(reply, to)] = &self.out[..] {
            if let Err(e) = sock.send_to(reply, *to) {
                tracing::debug!(peer = %to, error = %e, "DNS UDP send error");
            }
            self.out.clear();
            return;
        }
        let mut sent = 0;
        while sent < self.out.len() {
            match self.send_from(sock, sent, MsgFlags::empty()) {
                Ok(n) if n > 0 => sent += n,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::debug!(peer = %self.out[sent].1, error = %e, "DNS UDP send error");
                    sent += 1;
                }
            }
        }
        self.out.clear();
    }
}

/// Answer the datagrams of `batch`: replies into `replies`, queries for an
/// upstream handed to `forward`. The same for both kinds of receive loop.
fn answer(
    batch: &Batch,
    n: usize,
    shared: &Shared,
    server: &Arc<str>,
    replies: &mut Replies,
    mut forward: impl FnMut(Box<Pending>, SocketAddr),
) {
    for i in 0..n {
        let (len, peer, truncated) = batch.got[i];
        let Some(peer) = peer else { continue };
        if truncated {
            continue;
        }
        let req = &batch.bufs[i][..len];
        if let Some(limiter) = &shared.rrl {
            use super::rrl::Verdict;
            match limiter.check(peer.ip(), Instant::now()) {
                Verdict::Answer => {}
                Verdict::Truncate if len >= 12 => {
                    metrics::counter!("fairlead_dns_dropped_total", "reason" => "rate-limit-tc")
                        .increment(1);
                    replies.out.push((super::rrl::truncated(req), peer));
                    continue;
                }
                Verdict::Truncate | Verdict::Drop => {
                    metrics::counter!("fairlead_dns_dropped_total", "reason" => "rate-limit")
                        .increment(1);
                    continue;
                }
            }
        }
        match prepare(shared, req, Proto::Udp, peer, server) {
            Prepared::Reply(bytes) => replies.out.push((bytes, peer)),
            Prepared::Drop => {}
            Prepared::Forward(p) => forward(p, peer),
        }
    }
}

/// Serve one UDP socket from an event loop until the loop stops, taking
/// up to `batch` datagrams per call.
pub async fn serve(sock: Rc<Udp>, shared: Arc<Shared>, server: Arc<str>, batch: usize) {
    let mut batch = Batch::new(batch);
    let mut replies = Replies::new(batch.size);
    loop {
        let mut ready = match sock.0.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "DNS UDP socket failed");
                return;
            }
        };
        let n = match batch.recv(ready.get_inner(), MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                continue;
            }
            Err(e) => {
                // (Let the loop's other tasks run before trying again.)
                tracing::debug!(error = %e, "DNS UDP receive error");
                drop(ready);
                tokio::task::yield_now().await;
                continue;
            }
        };
        if n < batch.size {
            // The queue is empty: the next datagram's edge wakes us.
            ready.clear_ready();
        }
        drop(ready);
        answer(&batch, n, &shared, &server, &mut replies, |p, peer| {
            let sock = sock.clone();
            let shared = shared.clone();
            // On this loop's thread, beside the receive loop.
            tokio::task::spawn_local(async move {
                let bytes = complete(&shared, *p).await;
                if let Err(e) = sock.send_to(&bytes, peer).await {
                    tracing::debug!(%peer, error = %e, "DNS UDP send error");
                }
            });
        });
        if !replies.out.is_empty() {
            replies.flush(&sock).await;
        }
    }
}

/// A receive loop on a thread of its own that blocks in `recvmmsg`, with
/// no event loop: a lone query costs two system calls (`recvmmsg`,
/// `sendto`) and one wake-up, where an epoll loop makes three calls and
/// turns its runtime's driver. Queries for an upstream go to `forwards` (a
/// runtime), whose tasks send their replies on the same socket.
///
/// Stopped by [`Receiver::stop`] (also on drop): `shutdown(SHUT_RD)` wakes
/// a receiver blocked on a UDP socket, and the thread sees the flag. (Both
/// are needed: a shut-down UDP socket still hands out the datagrams
/// queued on it, and under a flood new ones keep coming, so the empty
/// message that ends an idle receiver may never reach a busy one.)
pub struct Receiver {
    sock: Arc<std::net::UdpSocket>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Start a thread named `name` serving `sock`, `batch` datagrams at
    /// most per call.
    pub fn spawn(
        name: String,
        sock: std::net::UdpSocket,
        shared: Arc<Shared>,
        server: Arc<str>,
        batch: usize,
        forwards: tokio::runtime::Handle,
    ) -> io::Result<Receiver> {
        sock.set_nonblocking(false)?;
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || receive(&sock, &stop, &shared, &server, batch, &forwards))?
        };
        Ok(Receiver {
            sock,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        // ENOTCONN on an unconnected socket, but the receivers wake.
        let _ = socket2::SockRef::from(&*self.sock).shutdown(std::net::Shutdown::Read);
        let _ = thread.join();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn receive(
    sock: &Arc<std::net::UdpSocket>,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    server: &Arc<str>,
    batch: usize,
    forwards: &tokio::runtime::Handle,
) {
    // The forwarder's timers and sockets belong to that runtime's driver.
    let _runtime = forwards.enter();
    let mut batch = Batch::new(batch);
    let mut replies = Replies::new(batch.size);
    while !stop.load(Ordering::Acquire) {
        let n = match batch.recv(sock, MsgFlags::MSG_WAITFORONE) {
            // Shut down (by a receiver sharing the socket, maybe): the
            // call returns at once with an empty, addressless message.
            Ok(0) => return,
            Ok(_) if matches!(batch.got[0], (0, None, _)) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "DNS UDP receive error");
                continue;
            }
        };
        let mut cached = Vec::new();
        answer(&batch, n, shared, server, &mut replies, |p, peer| {
            // Polled once here: a name in the forwarder's cache is answered
            // at once (and sent with the batch), without waking a runtime
            // thread. Otherwise the runtime finishes it (it polls the task
            // again, with its own waker).
            let shared = shared.clone();
            let mut reply = Box::pin(async move { complete(&shared, *p).await });
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(bytes) = reply.as_mut().poll(&mut cx) {
                cached.push((bytes, peer));
                return;
            }
            let sock = sock.clone();
            forwards.spawn(async move {
                let bytes = reply.await;
                if let Err(e) = send_async(&sock, &bytes, peer).await {
                    tracing::debug!(%peer, error = %e, "DNS UDP send error");
                }
            });
        });
        replies.out.append(&mut cached);
        if !replies.out.is_empty() {
            replies.flush_blocking(sock);
        }
    }
}

/// Send one datagram on a blocking socket from a task, without blocking
/// its thread: `MSG_DONTWAIT`, and a wait for room when the buffer is full.
async fn send_async(sock: &std::net::UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    loop {
        match socket2::SockRef::from(sock).send_to_with_flags(buf, &to.into(), libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(sock).await?,
            r => return r,
        }
    }
}

/// Wait until `sock`'s send buffer has room, through a short-lived write
/// registration of a duplicate descriptor (see [`Udp`]).
async fn wait_writable(sock: &std::net::UdpSocket) -> io::Result<()> {
    let dup = sock.try_clone()?;
    // SAFETY: the AsyncFd owns the duplicate, so its descriptor stays open
    // and the same until the AsyncFd is dropped (what tokio cannot check).
    let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?;
    w.writable().await?.retain_ready();
    Ok(())
}
