//! The UDP receive loop: datagrams taken in batches with `recvmmsg(2)`,
//! answered, and the replies sent in one `sendmmsg(2)`.
//!
//! ```text
//!  epoll says readable ─► recvmmsg (up to BATCH, MSG_DONTWAIT)
//!      fewer than BATCH: the queue is empty ─► clear readiness ourselves
//!      (no extra call that fails with EAGAIN, which a plain recv loop makes
//!      once per wake-up)
//!  each datagram: rate limit, prepare (answer table / index / forward)
//!  replies of the batch ─► sendmmsg
//! ```
//!
//! At a low rate a wake-up brings one datagram, and the loop makes three
//! system calls (epoll, recvmmsg, sendmmsg) where a recv loop makes four;
//! under load one call carries a batch each way. Each loop runs on a thread
//! of its own with its own socket ([`crate::workers`]).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::server::{complete, prepare, Prepared, Proto, Shared};

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
/// descriptor instead ([`Udp::wait_writable`]).
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

    /// Wait until the socket's send buffer has room.
    async fn wait_writable(&self) -> io::Result<()> {
        let dup = self.0.get_ref().try_clone()?;
        // SAFETY: as in `new`; the duplicate is owned by this AsyncFd.
        let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?;
        w.writable().await?.retain_ready();
        Ok(())
    }

    /// Send one datagram, waiting while the socket's buffer is full.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        loop {
            match self.0.get_ref().send_to(buf, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_writable().await?,
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
    /// `got`.
    fn recv(&mut self, sock: &std::net::UdpSocket) -> io::Result<usize> {
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
            MsgFlags::MSG_DONTWAIT,
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
            let step = {
                let rest = &self.out[sent..];
                let slices: Vec<[IoSlice<'_>; 1]> =
                    rest.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
                let addrs: Vec<Option<SockaddrStorage>> = rest
                    .iter()
                    .map(|(_, to)| Some(SockaddrStorage::from(*to)))
                    .collect();
                let fd = sock.0.get_ref().as_raw_fd();
                sendmmsg(
                    fd,
                    &mut self.headers,
                    &slices,
                    addrs,
                    [],
                    MsgFlags::MSG_DONTWAIT,
                )
                .map(|r| r.count())
            };
            match step {
                Ok(n) if n > 0 => sent += n,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {
                    // The send buffer is full: wait for room.
                    if sock.wait_writable().await.is_err() {
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
}

/// Serve one UDP socket until its loop stops, taking up to `batch`
/// datagrams per call.
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
        let n = match batch.recv(ready.get_inner()) {
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
            match prepare(&shared, req, Proto::Udp, peer, &server) {
                Prepared::Reply(bytes) => replies.out.push((bytes, peer)),
                Prepared::Drop => {}
                Prepared::Forward(p) => {
                    let sock = sock.clone();
                    let shared = shared.clone();
                    // On this loop's thread, beside the receive loop.
                    tokio::task::spawn_local(async move {
                        let bytes = complete(&shared, *p).await;
                        if let Err(e) = sock.send_to(&bytes, peer).await {
                            tracing::debug!(%peer, error = %e, "DNS UDP send error");
                        }
                    });
                }
            }
        }
        if !replies.out.is_empty() {
            replies.flush(&sock).await;
        }
    }
}
