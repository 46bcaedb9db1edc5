//! Forwarding of names outside the cluster zone to upstream resolvers, with
//! a TTL-bounded answer cache (CoreDNS's `forward` + `cache` plugins).
//!
//! Each exchange uses a fresh UDP socket connected to the upstream (random
//! source port and ID; only a reply from that address with the same ID and
//! question is accepted) and falls back to TCP when the reply is truncated.
//! Upstreams are tried in turn within one overall deadline, those that
//! recently failed last, so a dead upstream costs one attempt per
//! [`DOWN_FOR`] rather than one per query; when none answers the caller gets
//! an expired answer still cached (serve-stale, RFC 8767, for [`STALE_FOR`]
//! with a [`STALE_TTL`] TTL) or an error (SERVFAIL to the client), never a
//! hang.
//!
//! Prefetch (CoreDNS `cache`'s `prefetch`): a cached answer asked for at
//! least [`PREFETCH_HITS`] times is refreshed in the background once its
//! remaining TTL falls to a tenth of its TTL (at least the last second),
//! so popular names do not make a client wait for an upstream when they
//! expire.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long an upstream that failed is tried only after the others.
pub const DOWN_FOR: Duration = Duration::from_secs(5);

/// The shortest time one upstream attempt gets (when several share the
/// deadline).
const MIN_ATTEMPT: Duration = Duration::from_millis(400);

/// How long an expired answer is kept to serve when no upstream answers
/// (RFC 8767 serve-stale; CoreDNS `serve_stale`'s default).
const STALE_FOR: Duration = Duration::from_secs(3600);

/// The TTL of a stale answer (RFC 8767's recommendation).
const STALE_TTL: u32 = 30;

/// Hits after which a cached answer near its expiry is refreshed ahead.
const PREFETCH_HITS: u32 = 2;

/// A cache lookup's result.
enum Cached {
    /// Within its TTL; `refresh`: popular and near expiry, to prefetch.
    Fresh {
        answer: UpstreamAnswer,
        refresh: bool,
    },
    /// Expired: to serve only when no upstream answers.
    Stale(UpstreamAnswer),
}

/// EDNS payload size we advertise upstream.
const UPSTREAM_PAYLOAD: u16 = 1232;

/// Why no upstream answer is available.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        source: std::io::Error,
    },
}

/// An upstream's answer (sections without the OPT record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub authentic_data: bool,
}

impl UpstreamAnswer {
    fn from_message(m: Message) -> Self {
        UpstreamAnswer {
            rcode: m.metadata.response_code,
            authentic_data: m.metadata.authentic_data,
            answers: m.answers,
            authorities: m.authorities,
            additionals: m.additionals,
        }
    }

    /// Whether this is a negative answer (NXDOMAIN or NODATA).
    pub fn is_denial(&self) -> bool {
        self.rcode == ResponseCode::NXDomain || self.answers.is_empty()
    }

    /// How long this answer may be cached (None: not cacheable). Positive
    /// answers: their smallest TTL; negative ones: the SOA's TTL bounded by
    /// its minimum (RFC 2308), not at all without an SOA.
    fn cache_ttl(&self) -> Option<u32> {
        match self.rcode {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            _ => return None,
        }
        let ttl = if self.is_denial() {
            self.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?
        } else {
            self.answers
                .iter()
                .chain(&self.authorities)
                .map(|r| r.ttl)
                .min()?
        };
        (ttl > 0).then_some(ttl)
    }

    fn aged(&self, secs: u32) -> UpstreamAnswer {
        self.map_ttl(|t| t.saturating_sub(secs))
    }

    /// Every record with TTL `ttl` (a stale answer's).
    fn with_ttl(&self, ttl: u32) -> UpstreamAnswer {
        self.map_ttl(|_| ttl)
    }

    fn map_ttl(&self, f: impl Fn(u32) -> u32) -> UpstreamAnswer {
        let age = |v: &Vec<Record>| -> Vec<Record> {
            v.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = f(r.ttl);
                    r
                })
                .collect()
        };
        UpstreamAnswer {
            rcode: self.rcode,
            answers: age(&self.answers),
            authorities: age(&self.authorities),
            additionals: age(&self.additionals),
            authentic_data: self.authentic_data,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    /// Compared case-insensitively (`Name`'s `Eq`/`Hash`).
    name: Name,
    qtype: RecordType,
    qclass: DNSClass,
    dnssec_ok: bool,
    checking_disabled: bool,
}

struct CacheEntry {
    answer: UpstreamAnswer,
    stored: Instant,
    expires: Instant,
    /// Fresh hits so far.
    hits: u32,
    /// A prefetch of this entry is under way.
    prefetching: bool,
}

/// Per-query options copied from the client's request.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueryFlags {
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

/// The upstream resolvers and the cache in front of them; cheap to clone
/// (a prefetch runs on a clone).
#[derive(Clone)]
pub struct Forwarder {
    state: std::sync::Arc<State>,
}

impl std::ops::Deref for Forwarder {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

/// The forwarder's state, shared with its prefetches.
pub struct State {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    max_ttl: u32,
    capacity: usize,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
    /// When each upstream last failed (index-aligned with `upstreams`).
    down_since: Mutex<Vec<Option<Instant>>>,
    rotate: AtomicUsize,
    /// `server` label of the cache metrics.
    server: String,
}

impl Forwarder {
    /// A forwarder to `upstreams` answering within `timeout`, caching up to
    /// `capacity` answers for at most `max_ttl`.
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_ttl: Duration,
        capacity: usize,
        server: String,
    ) -> Forwarder {
        Forwarder {
            state: std::sync::Arc::new(State {
                down_since: Mutex::new(vec![None; upstreams.len()]),
                upstreams,
                timeout,
                max_ttl: max_ttl.as_secs().min(u32::MAX as u64) as u32,
                capacity,
                cache: Mutex::new(HashMap::new()),
                rotate: AtomicUsize::new(0),
                server,
            }),
        }
    }

    /// Answer `query` from the cache or an upstream.
    pub async fn resolve(
        &self,
        query: &Query,
        flags: QueryFlags,
    ) -> Result<UpstreamAnswer, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let key = CacheKey {
            name: query.name().clone(),
            qtype: query.query_type(),
            qclass: query.query_class(),
            dnssec_ok: flags.dnssec_ok,
            checking_disabled: flags.checking_disabled,
        };
        let stale = match self.cached(&key) {
            Some(Cached::Fresh { answer, refresh }) => {
                let kind = if answer.is_denial() {
                    "denial"
                } else {
                    "success"
                };
                metrics::counter!("coredns_cache_hits_total", "server" => self.server.clone(), "type" => kind)
                    .increment(1);
                if refresh {
                    let (state, query) = (self.state.clone(), query.clone());
                    tokio::spawn(async move { state.prefetch(key, &query, flags).await });
                }
                return Ok(answer);
            }
            Some(Cached::Stale(old)) => Some(old),
            None => None,
        };
        metrics::counter!("coredns_cache_misses_total", "server" => self.server.clone())
            .increment(1);
        let answer = match (self.exchange_any(query, flags).await, stale) {
            (Ok(a), _) => a,
            // RFC 8767: no upstream answered, but an expired answer is
            // still known: serve it, with a short TTL.
            (Err(e), Some(old)) => {
                tracing::debug!(error = %e, name = %query.name(), "serving a stale answer");
                metrics::counter!("coredns_cache_served_stale_total", "server" => self.server.clone())
                    .increment(1);
                return Ok(old);
            }
            (Err(e), None) => return Err(e),
        };
        self.keep(key, &answer);
        Ok(answer)
    }
}

impl State {
    /// The configured upstreams.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Cache `answer` for its TTL (bounded by ours), if it may be cached.
    fn keep(&self, key: CacheKey, answer: &UpstreamAnswer) {
        if let Some(ttl) = answer.cache_ttl() {
            let ttl = ttl.min(self.max_ttl);
            if ttl > 0 {
                self.store(key, answer.clone(), Duration::from_secs(ttl as u64));
            }
        }
    }

    /// Refresh a popular entry ahead of its expiry; on failure it stays
    /// as it is (and may be prefetched again by a later hit).
    async fn prefetch(&self, key: CacheKey, query: &Query, flags: QueryFlags) {
        metrics::counter!("coredns_cache_prefetch_total", "server" => self.server.clone())
            .increment(1);
        match self.exchange_any(query, flags).await {
            Ok(answer) => self.keep(key, &answer),
            Err(e) => {
                tracing::debug!(error = %e, name = %query.name(), "prefetch failed");
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = cache.get_mut(&key) {
                    entry.prefetching = false;
                }
            }
        }
    }

    fn cached(&self, key: &CacheKey) -> Option<Cached> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get_mut(key)?;
        let now = Instant::now();
        if now >= entry.expires + STALE_FOR {
            cache.remove(key);
            return None;
        }
        if now >= entry.expires {
            return Some(Cached::Stale(entry.answer.with_ttl(STALE_TTL)));
        }
        entry.hits += 1;
        let ttl = entry.expires.duration_since(entry.stored);
        let left = entry.expires.duration_since(now);
        let refresh = !entry.prefetching
            && entry.hits >= PREFETCH_HITS
            && left <= (ttl / 10).max(Duration::from_secs(1));
        entry.prefetching |= refresh;
        let age = now.duration_since(entry.stored).as_secs() as u32;
        Some(Cached::Fresh {
            answer: entry.answer.aged(age),
            refresh,
        })
    }

    fn store(&self, key: CacheKey, answer: UpstreamAnswer, ttl: Duration) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.capacity {
            cache.retain(|_, e| e.expires + STALE_FOR > now);
            if cache.len() >= self.capacity {
                // Evict an arbitrary tenth (hash order).
                let evict: Vec<CacheKey> =
                    cache.keys().take(self.capacity / 10 + 1).cloned().collect();
                for k in evict {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            CacheEntry {
                answer,
                stored: now,
                expires: now + ttl,
                hits: 0,
                prefetching: false,
            },
        );
        metrics::gauge!("coredns_cache_entries", "server" => self.server.clone(), "type" => "all")
            .set(cache.len() as f64);
    }

    /// Upstream indexes in the order to try: rotating start, recently
    /// failed ones last.
    fn order(&self) -> Vec<usize> {
        let n = self.upstreams.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n;
        let down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let is_down = |i: usize| down[i].is_some_and(|t| now.duration_since(t) < DOWN_FOR);
        let rotated = (0..n).map(|k| (start + k) % n);
        let mut order: Vec<usize> = rotated.clone().filter(|&i| !is_down(i)).collect();
        order.extend(rotated.filter(|&i| is_down(i)));
        order
    }

    fn mark(&self, i: usize, ok: bool) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        down[i] = if ok { None } else { Some(Instant::now()) };
    }

    async fn exchange_any(
        &self,
        query: &Query,
        flags: QueryFlags,
    ) -> Result<UpstreamAnswer, ForwardError> {
        let deadline = Instant::now() + self.timeout;
        let order = self.order();
        let per_attempt = (self.timeout / order.len() as u32).max(MIN_ATTEMPT);
        let mut last_err = ForwardError::Timeout(self.timeout);
        let mut last_answer: Option<UpstreamAnswer> = None;
        for i in order {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let attempt_deadline = (now + per_attempt).min(deadline);
            let upstream = self.upstreams[i];
            let to = upstream.to_string();
            metrics::counter!("coredns_forward_requests_total", "to" => to.clone()).increment(1);
            let started = Instant::now();
            match tokio::time::timeout_at(
                attempt_deadline.into(),
                exchange(upstream, query, flags, attempt_deadline),
            )
            .await
            {
                Ok(Ok(msg)) => {
                    let rcode = msg.metadata.response_code;
                    let rcode_label = super::server::rcode_label(rcode);
                    metrics::counter!("coredns_forward_responses_total", "to" => to.clone(), "rcode" => rcode_label)
                        .increment(1);
                    metrics::histogram!("coredns_forward_request_duration_seconds", "to" => to, "rcode" => rcode_label)
                        .record(started.elapsed().as_secs_f64());
                    let answer = UpstreamAnswer::from_message(msg);
                    match rcode {
                        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp => {
                            // Try the next one; keep this as the fallback.
                            self.mark(i, false);
                            last_answer = Some(answer);
                        }
                        _ => {
                            self.mark(i, true);
                            return Ok(answer);
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream exchange failed");
                    self.mark(i, false);
                    last_err = ForwardError::Io {
                        upstream,
                        source: e,
                    };
                }
                Err(_) => {
                    tracing::debug!(%upstream, "upstream timed out");
                    self.mark(i, false);
                    last_err = ForwardError::Timeout(self.timeout);
                }
            }
        }
        match last_answer {
            Some(a) => Ok(a),
            None => Err(last_err),
        }
    }
}

/// The wire query sent upstream for `query`.
fn upstream_query(query: &Query, flags: QueryFlags) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = flags.checking_disabled;
    m.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_PAYLOAD);
    edns.set_dnssec_ok(flags.dnssec_ok);
    m.set_edns(edns);
    m
}

fn matches(reply: &Message, sent: &Message) -> bool {
    reply.metadata.id == sent.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.metadata.op_code == OpCode::Query
        && reply.queries.len() == 1
        && reply.queries[0].name() == sent.queries[0].name()
        && reply.queries[0].query_type() == sent.queries[0].query_type()
        && reply.queries[0].query_class() == sent.queries[0].query_class()
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// One query to one upstream: UDP, then TCP if the reply was truncated.
async fn exchange(
    upstream: SocketAddr,
    query: &Query,
    flags: QueryFlags,
    deadline: Instant,
) -> std::io::Result<Message> {
    let sent = upstream_query(query, flags);
    let bytes = sent
        .to_vec()
        .map_err(|_| invalid("cannot encode upstream query"))?;
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 65535];
    let reply = loop {
        let n = tokio::time::timeout_at(deadline.into(), sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        // Anything unparsable or not ours is ignored (spoofing, stale).
        let Ok(m) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if matches(&m, &sent) {
            break m;
        }
    };
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    tcp_exchange(upstream, &sent, &bytes, deadline).await
}

async fn tcp_exchange(
    upstream: SocketAddr,
    sent: &Message,
    bytes: &[u8],
    deadline: Instant,
) -> std::io::Result<Message> {
    let run = async {
        let mut s = TcpStream::connect(upstream).await?;
        s.set_nodelay(true)?;
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(bytes);
        s.write_all(&framed).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await?;
        let m = Message::from_vec(&buf).map_err(|_| invalid("malformed upstream reply"))?;
        if !matches(&m, sent) {
            return Err(invalid("upstream reply does not match the query"));
        }
        Ok(m)
    };
    tokio::time::timeout_at(deadline.into(), run)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn answer(
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
    ) -> UpstreamAnswer {
        UpstreamAnswer {
            rcode,
            answers,
            authorities,
            additionals: vec![],
            authentic_data: false,
        }
    }

    #[test]
    fn cache_ttl_rules() {
        let a = |ttl| Record::from_rdata(n("x."), ttl, RData::A(A::new(1, 2, 3, 4)));
        let soa = |ttl, min| {
            Record::from_rdata(
                n("x."),
                ttl,
                RData::SOA(SOA::new(n("a."), n("b."), 1, 1, 1, 1, min)),
            )
        };
        assert_eq!(
            answer(ResponseCode::NoError, vec![a(60), a(20)], vec![]).cache_ttl(),
            Some(20)
        );
        assert_eq!(
            answer(ResponseCode::NXDomain, vec![], vec![soa(300, 7)]).cache_ttl(),
            Some(7)
        );
        assert_eq!(
            answer(ResponseCode::NoError, vec![], vec![soa(3, 60)]).cache_ttl(),
            Some(3)
        );
        assert_eq!(
            answer(ResponseCode::NXDomain, vec![], vec![]).cache_ttl(),
            None
        );
        assert_eq!(
            answer(ResponseCode::ServFail, vec![], vec![]).cache_ttl(),
            None
        );
        assert_eq!(
            answer(ResponseCode::NoError, vec![a(0)], vec![]).cache_ttl(),
            None
        );
        let aged = answer(ResponseCode::NoError, vec![a(10)], vec![]).aged(4);
        assert_eq!(aged.answers[0].ttl, 6);
    }

    #[test]
    fn cache_is_case_insensitive_and_bounded() {
        let f = Forwarder::new(
            vec!["127.0.0.1:9".parse().unwrap()],
            Duration::from_secs(1),
            Duration::from_secs(30),
            10,
            "test".into(),
        );
        let key = |name: &str| CacheKey {
            name: n(name),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            dnssec_ok: false,
            checking_disabled: false,
        };
        let ans = answer(ResponseCode::NoError, vec![], vec![]);
        f.store(key("Example.COM."), ans.clone(), Duration::from_secs(5));
        assert!(
            matches!(f.cached(&key("example.com.")), Some(Cached::Fresh { answer, .. }) if answer == ans)
        );
        for i in 0..50 {
            f.store(key(&format!("n{i}.")), ans.clone(), Duration::from_secs(5));
        }
        assert!(f.cache.lock().unwrap().len() <= 10);
    }

    #[test]
    fn failed_upstreams_are_tried_last() {
        let f = Forwarder::new(
            vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            Duration::from_secs(1),
            Duration::from_secs(30),
            10,
            "test".into(),
        );
        f.mark(0, false);
        for _ in 0..4 {
            assert_eq!(f.order(), vec![1, 0]);
        }
        f.mark(0, true);
        let firsts: std::collections::HashSet<usize> = (0..4).map(|_| f.order()[0]).collect();
        assert_eq!(firsts.len(), 2, "healthy upstreams rotate");
    }
}
