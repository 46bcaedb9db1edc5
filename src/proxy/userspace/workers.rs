//! Per-core event loops for proxied TCP connections, as HAProxy's threads
//! and Pingora's runtimes do it.
//!
//! ```text
//!  node runtime:  accept loop per frontend ── accept4(NONBLOCK) via mio,
//!                 (few wake-ups)               not registered anywhere
//!                        │ least-loaded worker
//!                        ▼
//!  fl-proxy-0 … fl-proxy-N-1: one current-thread tokio runtime each, its
//!                 own epoll; the connection is registered there once and
//!                 both its legs live there until they close
//! ```
//!
//! **Why not the node's multi-thread runtime.** It has one I/O driver for
//! all its threads, and work stealing moves a connection's tasks between
//! threads; on short connections a fifth of the proxy's samples were
//! scheduler wake-ups (tokio-rs/tokio issue 5771 reports the same for other
//! proxies). A worker here owns its connections' sockets and timers, and
//! nothing else runs on it.
//!
//! **Why hand accepted sockets over** rather than a `SO_REUSEPORT`
//! listener per worker: a Service frontend stays one socket (thousands of
//! Services would otherwise cost a listener per core each), and the
//! least-loaded choice evens out long connections that a hash would not.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// One worker: its runtime's handle and how many connections it serves.
struct Worker {
    handle: Handle,
    load: Arc<AtomicUsize>,
    /// Dropped with the pool: the worker's runtime then stops, and with it
    /// the connections still on it.
    _stop: oneshot::Sender<()>,
}

/// The pool of per-core event loops.
pub(crate) struct Workers {
    workers: Vec<Worker>,
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
    pub(crate) fn start(n: usize, name: &str) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    // Runs the spawned connections until the pool is
                    // dropped (the sender goes, the receiver wakes).
                    let _ = rt.block_on(stopped);
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
                _stop: stop,
            });
        }
        Ok(Workers { workers })
    }

    /// Run `serve` on the worker with the fewest connections. `serve` is
    /// called on that worker's thread, inside its runtime, so the sockets it
    /// registers (`TcpStream::from_std`) belong to that worker's epoll.
    pub(crate) fn dispatch<F, Fut>(&self, serve: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.load.fetch_add(1, Ordering::Relaxed);
        let load = Load(w.load.clone());
        w.handle.spawn(async move {
            let _load = load;
            serve().await
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
