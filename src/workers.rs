//! Per-core event loops, as HAProxy's threads and Pingora's runtimes do
//! it: the userspace proxy's TCP connections (handed to the least-loaded
//! loop) run here, not on the node's multi-thread runtime. (Cluster DNS's
//! UDP receive loops ran here too; they now block in `recvmmsg` on threads
//! of their own, and use these loops only with `udp_blocking` off: see
//! [`crate::dns::udp`].)
//!
//! The proxy's path:
//!
//! ```text
//!  fl-proxy-0 … fl-proxy-N-1: one current-thread tokio runtime each, its
//!                 own epoll. Each TCP frontend's listener joins one loop
//!                 (in turn); that loop accepts (mio's accept4(NONBLOCK))
//!                        │ least-loaded loop, itself on a tie
//!                        ▼
//!                 the connection is registered there once and both its
//!                 legs live there until they close
//! ```
//!
//! **Why not the node's multi-thread runtime.** It has one I/O driver for
//! all its threads, and work stealing moves a connection's tasks between
//! threads; on short connections a fifth of the proxy's samples were
//! scheduler wake-ups (tokio-rs/tokio issue 5771 reports the same for other
//! proxies), and a DNS query at a low rate woke one thread to poll and
//! another to answer. A worker here owns its sockets and timers: a
//! datagram or a connection's bytes are read, answered and written on the
//! thread whose epoll saw them.
//!
//! A pinned job ([`Workers::spawn_on`]) runs as a local task on its loop,
//! so it may hold what is not `Send` (the DNS loop's `recvmmsg` headers
//! hold raw pointers).
//!
//! **Why hand accepted sockets over** rather than a `SO_REUSEPORT`
//! listener per worker: a Service frontend stays one socket (thousands of
//! Services would otherwise cost a listener per core each), and the
//! least-loaded choice evens out long connections that a hash would not.
//! The accept loops used to run on the node's runtime: every accepted
//! batch then woke one of its threads and then a loop's.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::mpsc;

thread_local! {
    /// The index of the loop this thread runs (`None` off the pools).
    static LOOP: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the event loop the calling thread runs, if it runs one:
/// for state kept per loop (the L7 proxy's upstream connections), so a
/// loop uses what lives on its own thread.
pub fn current_loop() -> Option<usize> {
    LOOP.with(|l| l.get())
}

/// Work handed to a loop: called on its thread, where it spawns a local
/// task (so that task need not be `Send`: it never moves).
type Job = Box<dyn FnOnce() + Send>;

/// One worker: its runtime, where its local jobs go, and how many
/// connections it serves.
struct Worker {
    handle: Handle,
    jobs: mpsc::UnboundedSender<Job>,
    load: Arc<AtomicUsize>,
}

/// The pool of per-core event loops. Dropping it stops them and waits for
/// their threads: the tasks still on them are dropped (their sockets
/// closed) by the time `drop` returns.
pub struct Workers {
    workers: Vec<Worker>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The loop [`Workers::spawn_next`] uses next.
    next: AtomicUsize,
}

/// Counts a connection against its worker while it lives.
struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// `n` workers (at least one), threads named `<name>-<i>`.
    pub fn start(n: usize, name: &str) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    LOOP.with(|l| l.set(Some(i)));
                    // Runs the jobs' tasks until the pool is dropped (the
                    // queue closes); the tasks left go with the LocalSet.
                    let local = tokio::task::LocalSet::new();
                    rt.block_on(local.run_until(async move {
                        while let Some(job) = queue.recv().await {
                            job();
                        }
                    }));
                })?;
            workers.push(Worker {
                handle,
                jobs,
                load: Arc::new(AtomicUsize::new(0)),
            });
            threads.push(thread);
        }
        Ok(Workers {
            workers,
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Run `serve` on the worker with the fewest connections, the calling
    /// loop itself when it is one of those (an accept loop runs on a
    /// worker: its own connections then start without waking a thread).
    /// `serve` is called on that worker's thread, inside its runtime, so
    /// the sockets it registers (`TcpStream::from_std`) belong to that
    /// worker's epoll. (Spawned straight onto the runtime: one task per
    /// connection, no queue hop.)
    pub fn dispatch<F, Fut>(&self, serve: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let load = |w: &Worker| w.load.load(Ordering::Relaxed);
        let least = self
            .workers
            .iter()
            .min_by_key(|w| load(w))
            .expect("at least one worker");
        let w = match current_loop().and_then(|i| self.workers.get(i)) {
            Some(me) if load(me) <= load(least) => me,
            _ => least,
        };
        w.load.fetch_add(1, Ordering::Relaxed);
        let load = Load(w.load.clone());
        w.handle.spawn(async move {
            let _load = load;
            serve().await
        });
    }

    /// Run `task` on the loops in turn (a long-lived task per call, such
    /// as a listener's accept loop, spread over them), with what `make`
    /// returns. `make` runs here, inside that loop's runtime: the sockets it
    /// registers (`AsyncFd`) join that loop's epoll, and a registration
    /// error reaches the caller rather than ending the task unseen.
    ///
    /// The task is spawned on the loop's runtime itself, not as a local
    /// task: a local task's wake-up (its socket is ready) wakes the
    /// `LocalSet`, whose waker is the loop's `block_on` waker, and that one
    /// always writes the loop's eventfd (a system call), even from its own
    /// thread.
    pub fn spawn_next<T, F, Fut>(
        &self,
        make: impl FnOnce() -> io::Result<T>,
        task: F,
    ) -> io::Result<()>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let w = &self.workers[i];
        let made = {
            let _runtime = w.handle.enter();
            make()?
        };
        w.handle.spawn(task(made));
        Ok(())
    }

    /// Run `task` on worker `i` (modulo the pool's size), for work pinned
    /// to a loop, such as a socket of its own. It runs until it ends or the
    /// pool is dropped.
    pub fn spawn_on<F, Fut>(&self, i: usize, task: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let w = &self.workers[i % self.workers.len()];
        let _ = w.jobs.send(Box::new(move || {
            tokio::task::spawn_local(task());
        }));
    }

    /// Connections being served, per worker.
    #[cfg(test)]
    pub(crate) fn loads(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the queues ends each loop.
        self.workers.clear();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // (Never wait for the thread we are on.)
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    #[test]
    fn connections_go_to_the_least_loaded_worker_and_run_on_its_thread() {
        let pool = Workers::start(2, "fl-test").unwrap();
        let (names_tx, names_rx) = std::sync::mpsc::channel::<String>();
        // Two long connections land on different workers; a third, after
        // the second ended, goes where the second was.
        let mut releases = Vec::new();
        for _ in 0..2 {
            let (release, released) = oneshot::channel::<()>();
            let names = names_tx.clone();
            pool.dispatch(move || async move {
                let me = std::thread::current().name().unwrap_or("").to_string();
                names.send(me).unwrap();
                let _ = released.await;
            });
            releases.push(release);
        }
        let mut first: Vec<String> = (0..2)
            .map(|_| names_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        first.sort();
        assert_eq!(first, ["fl-test-0", "fl-test-1"], "one per worker");
        assert_eq!(pool.loads(), [1, 1]);
        // The connection on fl-test-1 ends; the next goes there.
        let done = releases.pop().unwrap();
        done.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.loads() != [1, 0] {
            assert!(std::time::Instant::now() < deadline, "{:?}", pool.loads());
            std::thread::yield_now();
        }
        let names = names_tx.clone();
        pool.dispatch(move || async move {
            names
                .send(std::thread::current().name().unwrap_or("").to_string())
                .unwrap();
        });
        assert_eq!(
            names_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            "fl-test-1"
        );
    }

    #[test]
    fn a_loop_keeps_what_it_accepts_when_it_is_among_the_least_loaded() {
        let pool = Arc::new(Workers::start(2, "fl-keep").unwrap());
        let (names_tx, names_rx) = std::sync::mpsc::channel::<(String, String)>();
        // From each loop in turn (as an accept loop runs there), with the
        // loads equal (the previous connection has ended): the connection
        // stays on the dispatching loop. (The least-loaded choice alone
        // would send both to fl-keep-0.)
        for expect in ["fl-keep-0", "fl-keep-1"] {
            let (p, names) = (pool.clone(), names_tx.clone());
            let spawned = pool.spawn_next(
                || Ok(()),
                move |()| async move {
                    let from = std::thread::current().name().unwrap_or("").to_string();
                    p.dispatch(move || async move {
                        let on = std::thread::current().name().unwrap_or("").to_string();
                        names.send((from, on)).unwrap();
                    });
                },
            );
            spawned.unwrap();
            let (from, on) = names_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!((from.as_str(), on.as_str()), (expect, expect));
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while pool.loads() != [0, 0] {
                assert!(std::time::Instant::now() < deadline, "{:?}", pool.loads());
                std::thread::yield_now();
            }
        }
    }
}
