//! Upstream connect deadlines, kept per event loop instead of as one tokio
//! timer per connect.
//!
//! Why: a tokio timer earlier than every other one in its runtime's wheel
//! makes tokio wake the runtime's driver through its eventfd, even from the
//! driver's own thread. On short connections a connect's timer was nearly
//! always the earliest (the one before it had already been cancelled), so
//! each connection paid an eventfd `write` and an extra `epoll_wait` turn
//! (`strace -c` of the loops under `cargo bench --bench userspace`'s
//! Connection: close run: 0.94-0.96 eventfd writes per connection with a
//! timer per connect, 0.41-0.58 with this queue; what is left is the
//! hand-over of accepted connections between loops).
//!
//! How: every connect on a loop has the same timeout, so deadlines arrive
//! in order and a FIFO of them is a timer wheel. A connect appends its
//! deadline to its loop's queue (thread-local: a loop's connections never
//! leave its thread) and removes it when it ends; one sweeper task per loop
//! sleeps until the oldest deadline still pending, wakes the connects whose
//! deadline has passed, and ends when the queue is empty. Its tokio timer is
//! re-armed only when it fires, later than before, so tokio has no reason
//! to wake its driver early.
//!
//! [`timeout`] is the entry point, shaped as `tokio::time::timeout`, which
//! it falls back to off an event loop (tests, the node's own runtime) or
//! when a deadline would be out of order (proxies with different timeouts
//! sharing a loop).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    static QUEUE: RefCell<Queue> = const {
        RefCell::new(Queue { base: 0, entries: VecDeque::new(), sweeping: false })
    };
}

/// The calling loop's pending deadlines, oldest first.
struct Queue {
    /// The sequence number of `entries[0]`: entries before it have ended
    /// (their connects are done) or expired (and their connects were woken).
    base: u64,
    entries: VecDeque<Entry>,
    /// Whether this loop's sweeper task runs.
    sweeping: bool,
}

struct Entry {
    at: Instant,
    state: State,
}

enum State {
    /// Its connect is on; the waker to call if the deadline passes first
    /// (none until the connect has been polled).
    Waiting(Option<Waker>),
    /// Its connect has ended; the entry leaves once it is at the front.
    Ended,
}

/// `fut`, or `None` if it has not finished within `limit`.
pub(super) async fn timeout<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let Some(deadline) = Deadline::start(limit) else {
        return tokio::time::timeout(limit, fut).await.ok();
    };
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        deadline.poll_expired(cx).map(|()| None)
    })
    .await
}

impl Queue {
    /// Drop the ended entries at the front.
    fn trim(&mut self) {
        while self
            .entries
            .front()
            .is_some_and(|e| matches!(e.state, State::Ended))
        {
            self.entries.pop_front();
            self.base += 1;
        }
    }

    /// Expire what is due at `now` (waking its connects); the next
    /// deadline to sleep until, or `None` (and no sweeper) when nothing is
    /// pending.
    fn sweep(&mut self, now: Instant) -> Option<Instant> {
        while let Some(front) = self.entries.front_mut() {
            match &mut front.state {
                State::Ended => {}
                State::Waiting(_) if front.at > now => return Some(front.at),
                State::Waiting(waker) => {
                    if let Some(w) = waker.take() {
                        w.wake();
                    }
                }
            }
            self.entries.pop_front();
            self.base += 1;
        }
        self.sweeping = false;
        None
    }
}

/// One connect's deadline on its loop's queue. Ends (leaves the queue)
/// when dropped.
struct Deadline {
    seq: u64,
}

impl Deadline {
    /// A deadline `timeout` from now on this loop's queue, or `None` off
    /// an event loop or when it would be earlier than one already queued.
    fn start(timeout: Duration) -> Option<Deadline> {
        crate::workers::current_loop()?;
        let at = Instant::now() + timeout;
        QUEUE.with(|q| {
            let mut q = q.borrow_mut();
            if q.entries.back().is_some_and(|e| e.at > at) {
                return None;
            }
            q.entries.push_back(Entry {
                at,
                state: State::Waiting(None),
            });
            let seq = q.base + q.entries.len() as u64 - 1;
            if !q.sweeping {
                q.sweeping = true;
                tokio::spawn(sweeper());
            }
            Some(Deadline { seq })
        })
    }

    /// Ready once the deadline has passed; until then `cx`'s waker is
    /// kept to be woken when it does.
    fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        QUEUE.with(|q| {
            let mut q = q.borrow_mut();
            // Expired entries are the only ones removed while their
            // connect still holds them.
            let Some(i) = self.seq.checked_sub(q.base) else {
                return Poll::Ready(());
            };
            if let State::Waiting(w) = &mut q.entries[i as usize].state {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            Poll::Pending
        })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // (`try_with`: a connect dropped while its thread exits.)
        let _ = QUEUE.try_with(|q| {
            let mut q = q.borrow_mut();
            if let Some(i) = self.seq.checked_sub(q.base) {
                q.entries[i as usize].state = State::Ended;
                q.trim();
            }
        });
    }
}

/// The loop's sweeper: sleeps until the oldest pending deadline, expires
/// what is due, and ends when nothing is pending.
async fn sweeper() {
    /// Clears `sweeping` if the task is dropped (its runtime shutting
    /// down) so that a later deadline starts a new one.
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = QUEUE.try_with(|q| q.borrow_mut().sweeping = false);
        }
    }
    let _stopped = Stopped;
    while let Some(at) = QUEUE.with(|q| q.borrow_mut().sweep(Instant::now())) {
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(ats: &[u64]) -> (Queue, Instant) {
        let t0 = Instant::now();
        let entries = ats
            .iter()
            .map(|s| Entry {
                at: t0 + Duration::from_secs(*s),
                state: State::Waiting(None),
            })
            .collect();
        let q = Queue {
            base: 10,
            entries,
            sweeping: true,
        };
        (q, t0)
    }

    #[test]
    fn sweep_expires_what_is_due_and_says_when_to_look_again() {
        let (mut q, t0) = queue(&[1, 2, 3]);
        assert_eq!(q.sweep(t0), Some(t0 + Duration::from_secs(1)));
        assert_eq!((q.base, q.entries.len()), (10, 3));
        assert_eq!(
            q.sweep(t0 + Duration::from_secs(2)),
            Some(t0 + Duration::from_secs(3))
        );
        assert_eq!((q.base, q.entries.len()), (12, 1));
        assert_eq!(q.sweep(t0 + Duration::from_secs(9)), None);
        assert!(q.entries.is_empty() && !q.sweeping);
    }

    #[test]
    fn ended_entries_leave_from_the_front_only() {
        let (mut q, t0) = queue(&[1, 2, 3]);
        q.entries[1].state = State::Ended;
        q.trim();
        assert_eq!((q.base, q.entries.len()), (10, 3));
        q.entries[0].state = State::Ended;
        q.trim();
        assert_eq!((q.base, q.entries.len()), (12, 1));
        // An ended entry is skipped by the sweep without waiting for it.
        q.entries[0].state = State::Ended;
        assert_eq!(q.sweep(t0), None);
    }

    #[test]
    fn a_connect_times_out_on_an_event_loop() {
        let workers = crate::workers::Workers::start(1, "fl-deadline").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn_on(0, move || async move {
            // On the loop's queue, not a tokio timer of its own.
            assert!(Deadline::start(Duration::from_secs(1)).is_some());
            let started = Instant::now();
            let out = timeout(Duration::from_millis(50), std::future::pending::<()>()).await;
            let quick = timeout(Duration::from_secs(5), async { 7 }).await;
            let _ = tx.send((out, quick, started.elapsed()));
        });
        let (out, quick, took) = rx.recv_timeout(Duration::from_secs(10)).expect("expired");
        assert_eq!((out, quick), (None, Some(7)));
        assert!(took >= Duration::from_millis(50), "{took:?}");
    }

    #[test]
    fn off_an_event_loop_there_is_no_queue() {
        assert!(Deadline::start(Duration::from_secs(1)).is_none());
    }
}
