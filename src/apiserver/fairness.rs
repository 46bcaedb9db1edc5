//! A light priority and fairness: each user may have [`PER_USER`]
//! requests executing at once; more wait in that user's own queue, and
//! past [`QUEUE_PER_USER`] waiting (or [`MAX_WAIT`] in the queue) get a 429
//! with `Retry-After`, as kube-apiserver's API Priority and Fairness
//! answers when a priority level's queues are full.
//!
//! So one client flooding the server queues behind itself: it keeps at
//! most [`PER_USER`] requests' worth of the server busy, and every other
//! user's requests run beside them instead of behind hundreds of its own.
//!
//! Exempt, as in kube-apiserver's bootstrap configuration: `system:masters`
//! (the `exempt` priority level: the admin and fairlead's own components
//! using the admin identity), and watches, which are long-running and
//! bounded separately (a slow watcher is closed, see `watch`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::status::ApiError;

/// Requests one user may have executing at once.
pub const PER_USER: usize = 16;
/// Requests one user may have waiting; more are refused at once.
pub const QUEUE_PER_USER: usize = 1000;
/// Longest a request waits in its user's queue.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// One user's seats and how many of its requests are waiting.
struct Seats {
    executing: Arc<Semaphore>,
    waiting: usize,
}

/// The per-user seats of one API server.
#[derive(Default)]
pub struct Fairness {
    users: Mutex<HashMap<String, Seats>>,
}

/// A seat held while a request executes; dropping it frees the seat.
pub struct Seat {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Fairness {
    /// A seat for a request of `user`: at once when one is free, else after
    /// waiting in the user's queue; a 429 when the queue is full or the
    /// wait too long.
    pub async fn admit(&self, user: &str) -> Result<Seat, ApiError> {
        let executing = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            // Users with nothing executing or waiting are forgotten, so the
            // table holds only the clients active now.
            if users.len() > 1024 {
                users.retain(|_, s| s.waiting > 0 || s.executing.available_permits() < PER_USER);
            }
            let seats = users.entry(user.to_string()).or_insert_with(|| Seats {
                executing: Arc::new(Semaphore::new(PER_USER)),
                waiting: 0,
            });
            if let Ok(p) = seats.executing.clone().try_acquire_owned() {
                return Ok(Seat { _permit: Some(p) });
            }
            if seats.waiting >= QUEUE_PER_USER {
                return Err(too_many(user, "queue full"));
            }
            seats.waiting += 1;
            seats.executing.clone()
        };
        // (Counted down however the wait ends: a seat, a timeout, or the
        // client going away mid-wait.)
        let _waiting = Waiting { f: self, user };
        let got = tokio::time::timeout(MAX_WAIT, executing.acquire_owned()).await;
        match got {
            Ok(Ok(p)) => Ok(Seat { _permit: Some(p) }),
            _ => Err(too_many(user, "waited too long")),
        }
    }

    /// A seat for a request that is not limited (exempt users, watches).
    pub fn exempt() -> Seat {
        Seat { _permit: None }
    }
}

/// One request waiting in its user's queue.
struct Waiting<'a> {
    f: &'a Fairness,
    user: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut users = self.f.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = users.get_mut(self.user) {
            s.waiting = s.waiting.saturating_sub(1);
        }
    }
}

fn too_many(user: &str, why: &str) -> ApiError {
    metrics::counter!("apiserver_flowcontrol_rejected_requests_total", "reason" => why.to_string())
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
    async fn a_user_waits_behind_itself_only() {
        let f = Fairness::default();
        let mut held = Vec::new();
        for _ in 0..PER_USER {
            held.push(f.admit("flood").await.unwrap());
        }
        // Flood's next request waits; another user's runs at once.
        let other = tokio::time::timeout(Duration::from_millis(100), f.admit("other")).await;
        assert!(other.is_ok_and(|s| s.is_ok()));
        let next = tokio::time::timeout(Duration::from_millis(100), f.admit("flood")).await;
        assert!(next.is_err(), "a 17th request of one user must wait");
        // A seat freed lets the waiting one in.
        held.pop();
        let next = tokio::time::timeout(Duration::from_secs(1), f.admit("flood")).await;
        assert!(next.is_ok_and(|s| s.is_ok()));
    }
}
