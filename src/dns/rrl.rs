//! Response-rate limiting per client (`--dns-rrl N`, off by default), so
//! the node's DNS cannot be made to amplify a flood at a spoofed address
//! and one client cannot take every worker's time.
//!
//! Each client address has a token bucket of `N` answers per second
//! (burst `N`). UDP queries past it are not answered, except every
//! [`SLIP`]th, which gets an empty truncated reply (TC): a real client
//! then retries over TCP, which a spoofed source cannot do (BIND's RRL
//! "slip"). TCP is not limited here (it has its own bounds). Counted in
//! `fairlead_dns_dropped_total{reason="rate-limit"|"rate-limit-tc"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Every SLIP-th limited query gets a truncated reply instead of none.
pub const SLIP: u32 = 2;

/// Clients tracked at most; past it, those with a full bucket (idle) are
/// forgotten first.
const MAX_CLIENTS: usize = 65_536;

/// What to do with one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Send an empty reply with TC set.
    Truncate,
    Drop,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    limited: u32,
}

/// The per-client buckets.
pub struct RateLimiter {
    per_second: f64,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// `per_second` answers per client per second (at least 1).
    pub fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second: per_second.max(1) as f64,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to answer a query from `client` arriving at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            let rate = self.per_second;
            clients
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < rate);
            if clients.len() >= MAX_CLIENTS {
                clients.clear();
            }
        }
        let b = clients.entry(client).or_insert(Bucket {
            tokens: self.per_second,
            last: now,
            limited: 0,
        });
        let refill = now.duration_since(b.last).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.per_second);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Answer;
        }
        b.limited = b.limited.wrapping_add(1);
        if b.limited.is_multiple_of(SLIP) {
            Verdict::Truncate
        } else {
            Verdict::Drop
        }
    }
}

/// An empty truncated reply to `packet` (at least a header): its ID,
/// opcode and RD, QR and TC set, no records.
pub fn truncated(packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&packet[..2]);
    out[2] = 0x80 | (packet[2] & 0x79) | 0x02;
    out[3] = 0x80;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_client_past_its_rate_is_slipped_then_refilled_others_unaffected() {
        let rl = RateLimiter::new(10);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..20).map(|_| rl.check(a, t0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Answer));
        assert_eq!(
            verdicts[10..]
                .iter()
                .filter(|v| **v == Verdict::Truncate)
                .count(),
            5,
            "every second limited query slips"
        );
        assert_eq!(
            rl.check(b, t0),
            Verdict::Answer,
            "another client is not limited"
        );
        // 100 ms later one more answer is due.
        assert_eq!(
            rl.check(a, t0 + Duration::from_millis(100)),
            Verdict::Answer
        );
        assert_ne!(
            rl.check(a, t0 + Duration::from_millis(100)),
            Verdict::Answer
        );
    }

    #[test]
    fn truncated_reply_keeps_the_id_and_sets_tc() {
        let q = [0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
        let r = truncated(&q);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2], 0x80 | 0x02 | 0x01, "QR, TC, RD");
        assert_eq!(&r[4..], &[0; 8], "no records");
    }
}
