//! A light priority and fairness: the server has [`seats`] for requests
//! executing at once; a request that finds none free waits in its user's
//! queue, and a freed seat goes to the waiting user with the fewest
//! requests executing (the oldest waiter of that user), as kube-apiserver's
//! API Priority and Fairness dispatches a priority level's seats across
//! flows. Past [`QUEUE_PER_USER`] waiting, or after [`MAX_WAIT`] in the
//! queue, a request gets a 429 with `Retry-After`, as APF answers when a
//! level's queues are full.
//!
//! So one client flooding the server fills the seats only while no one
//! else asks: the next seat that frees goes to another user's request, so
//! that user waits about one request's time, not behind hundreds of the
//! flood's.
//!
//! Exempt, as in kube-apiserver's bootstrap configuration: `system:masters`
//! (the `exempt` priority level: the admin and fairlead's own components
//! using the admin identity), and watches, which are long-running and
//! bounded separately (a slow watcher is closed, see `watch`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::api::status::ApiError;

/// Requests one user may have waiting; more are refused at once.
pub const QUEUE_PER_USER: usize = 1000;
/// Longest a request waits in its user's queue.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Seats of a server: a few per core (requests are CPU-bound once
/// admitted: more at once only lengthens everyone's wait).
pub fn seats() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 4
}

#[derive(Default)]
struct State {
    free: usize,
    /// Requests executing, per user (entries at 0 removed).
    executing: HashMap<String, usize>,
    /// Waiting requests per user, oldest first (queues emptied removed).
    waiting: HashMap<String, VecDeque<oneshot::Sender<Seat>>>,
}

/// The seats of one API server.
pub struct Fairness {
    state: Mutex<State>,
}

impl Default for Fairness {
    fn default() -> Self {
        Fairness::new(seats())
    }
}

/// A seat held while a request executes; dropping it hands it on.
pub struct Seat {
    grant: Option<(Arc<Fairness>, String)>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some((f, user)) = self.grant.take() {
            f.release(&user);
        }
    }
}

impl Fairness {
    pub fn new(seats: usize) -> Fairness {
        Fairness {
            state: Mutex::new(State {
                free: seats.max(1),
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A seat for a request of `user`: at once when one is free and no one
    /// waits, else when [`Fairness::release`] hands it one; a 429 when the
    /// user's queue is full or the wait too long.
    pub async fn admit(self: &Arc<Self>, user: &str) -> Result<Seat, ApiError> {
        let rx = {
            let mut st = self.lock();
            if st.free > 0 && st.waiting.is_empty() {
                st.free -= 1;
                *st.executing.entry(user.to_string()).or_default() += 1;
                return Ok(Seat {
                    grant: Some((self.clone(), user.to_string())),
                });
            }
            let queue = st.waiting.entry(user.to_string()).or_default();
            if queue.len() >= QUEUE_PER_USER {
                return Err(too_many(user, "queue full"));
            }
            let (tx, rx) = oneshot::channel();
            queue.push_back(tx);
            rx
        };
        // A seat sent to a request that has gone (timed out, or its client
        // left) is dropped with the channel, which hands it on.
        match tokio::time::timeout(MAX_WAIT, rx).await {
            Ok(Ok(seat)) => Ok(seat),
            _ => Err(too_many(user, "waited too long")),
        }
    }

    /// Hand `user`'s freed seat to the waiting user with the fewest
    /// requests executing, or keep it free.
    fn release(self: &Arc<Self>, user: &str) {
        let mut st = self.lock();
        if let Some(n) = st.executing.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                st.executing.remove(user);
            }
        }
        loop {
            let next = st
                .waiting
                .keys()
                .min_by_key(|u| st.executing.get(*u).copied().unwrap_or(0))
                .cloned();
            let Some(next) = next else {
                st.free += 1;
                return;
            };
            let queue = st.waiting.get_mut(&next).expect("a waiting user");
            let tx = queue.pop_front().expect("queues are never left empty");
            if queue.is_empty() {
                st.waiting.remove(&next);
            }
            // Counted before sending: a seat sent but never taken is
            // dropped with the channel and released (after this lock).
            *st.executing.entry(next.clone()).or_default() += 1;
            let seat = Seat {
                grant: Some((self.clone(), next.clone())),
            };
            match tx.send(seat) {
                Ok(()) => return,
                Err(mut seat) => {
                    // That request is gone: undo, and try the next.
                    seat.grant = None;
                    if let Some(n) = st.executing.get_mut(&next) {
                        *n -= 1;
                        if *n == 0 {
                            st.executing.remove(&next);
                        }
                    }
                }
            }
        }
    }

    /// A seat for a request that is not limited (exempt users, watches).
    pub fn exempt() -> Seat {
        Seat { grant: None }
    }
}

fn too_many(user: &str, why: &'static str) -> ApiError {
    metrics::counter!("apiserver_flowcontrol_rejected_requests_total", "reason" => why)
        .increment(1);
    tracing::debug!(user, why, "request refused by fairness");
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
    );
    e.details = Some(serde_json::json!({"retryAfterSeconds": 1}));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_freed_seat_goes_to_the_user_with_fewest_executing() {
        let f = Arc::new(Fairness::new(2));
        let a1 = f.admit("flood").await.unwrap();
        let a2 = f.admit("flood").await.unwrap();
        // No seat free: both wait, the flood's first.
        let flood = tokio::spawn({
            let f = f.clone();
            async move { f.admit("flood").await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        let other = tokio::spawn({
            let f = f.clone();
            async move {
                let s = f.admit("other").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.map(|_| ())
            }
        });
        tokio::task::yield_now().await;
        // The seat freed goes to "other" (0 executing), not to the flood's
        // older request (2 executing).
        drop(a1);
        tokio::time::timeout(Duration::from_secs(1), async {
            while !f.lock().executing.contains_key("other") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the other user got the seat");
        assert!(!flood.is_finished());
        drop(a2);
        assert!(flood.await.unwrap().is_ok());
        assert!(other.await.unwrap().is_ok());
        // Everything released: both seats free again.
        assert_eq!(f.lock().free, 2);
        assert!(f.lock().executing.is_empty());
    }

    #[tokio::test]
    async fn a_seat_for_a_request_that_left_is_handed_on() {
        let f = Arc::new(Fairness::new(1));
        let held = f.admit("a").await.unwrap();
        let gone = tokio::spawn({
            let f = f.clone();
            async move { f.admit("b").await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(1), f.admit("c")).await;
        assert!(again.is_ok_and(|s| s.is_ok()), "the seat was lost");
    }
}
