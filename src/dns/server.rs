//! The wire side: UDP and TCP listeners, request validation, answers from
//! the current [`Index`], forwarding, truncation, EDNS0 and metrics.
//!
//! A request is handled in two phases so the UDP receive loop never waits
//! on the network: [`prepare`] (synchronous) answers everything the index
//! can answer, drops what must be dropped and returns errors; only queries
//! that need an upstream become a [`Pending`] that a spawned task
//! [`complete`]s (bounded by `max_concurrent_forwards`, beyond which the
//! client gets SERVFAIL at once, counted like CoreDNS's `max_concurrent`
//! in `coredns_forward_max_concurrent_rejects_total`: a flood of queries
//! for names no upstream answers costs a bounded number of tasks, not
//! memory that grows with it).
//!
//! Validation (nothing a client sends can panic or stall a worker):
//! shorter than a header or a response (QR set): dropped; opcode other than
//! QUERY: NOTIMP; QDCOUNT ≠ 1 or anything hickory-proto cannot decode (bad
//! label lengths, compression pointers that do not point backwards — which
//! rules out loops —, truncated records, two OPTs): FORMERR with the
//! request's ID; EDNS version > 0: BADVERS; zone transfers: REFUSED;
//! classes other than IN/ANY: REFUSED.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::answers::{self, AnswerTable, Question};
use super::forward::{Forwarder, QueryFlags};
use super::index::{Index, Resolution, ZoneAnswer};

/// How long a TCP request may take to arrive once its length was read.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing a TCP reply may take.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// State shared by every listener of one server.
pub struct Shared {
    /// The zone, changed in place ([`super::DnsServer::apply`]) under short
    /// write locks; a query holds the read lock only while it resolves.
    pub index: RwLock<Index>,
    /// The zone's name (to label requests without locking the index).
    pub zone: Name,
    pub forwarder: Forwarder,
    /// Largest UDP reply we send (and the EDNS payload we advertise).
    pub max_udp_payload: u16,
    pub tcp_idle_timeout: Duration,
    /// Bounds concurrent forwarded queries.
    pub forwards: Arc<Semaphore>,
    /// Bounds open TCP connections.
    pub tcp_connections: Arc<Semaphore>,
    /// Open TCP connections per client address (entries at 0 removed).
    pub tcp_clients: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    pub max_tcp_per_client: usize,
    /// `zone` metric label of in-zone requests (`cluster.local.`).
    pub zone_label: Arc<str>,
    /// Finished replies to cluster names ([`super::answers`]).
    pub answers: Arc<AnswerTable>,
    /// Per-client rate limit of UDP answers (`--dns-rrl`).
    pub rrl: Option<super::rrl::RateLimiter>,
}

impl Shared {
    /// The index, read-locked: keep the guard only as long as a lookup.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the request asked, for building its reply and labelling metrics.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    query: Query,
    /// The client's EDNS payload size when it sent an OPT record.
    edns_payload: Option<u16>,
    dnssec_ok: bool,
    proto: Proto,
    family: &'static str,
    started: Instant,
    server: Arc<str>,
}

/// A query that needs an upstream.
pub struct Pending {
    req: RequestInfo,
    /// For an ExternalName alias: the CNAME chain so far.
    alias: Option<ZoneAnswer>,
    /// The name to ask upstream.
    target: Query,
}

/// The synchronous outcome of a request.
pub enum Prepared {
    Reply(Vec<u8>),
    Drop,
    Forward(Box<Pending>),
}

/// CoreDNS's rcode label.
pub fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

/// CoreDNS's `type` label: the monitored types, else `other`.
fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::MX => "MX",
        RecordType::SOA => "SOA",
        RecordType::CNAME => "CNAME",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::NS => "NS",
        RecordType::SRV => "SRV",
        RecordType::DS => "DS",
        RecordType::DNSKEY => "DNSKEY",
        RecordType::RRSIG => "RRSIG",
        RecordType::NSEC => "NSEC",
        RecordType::NSEC3 => "NSEC3",
        RecordType::HTTPS => "HTTPS",
        RecordType::IXFR => "IXFR",
        RecordType::AXFR => "AXFR",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

fn family(peer: &SocketAddr) -> &'static str {
    match peer {
        SocketAddr::V4(_) => "1",
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => "1",
        SocketAddr::V6(_) => "2",
    }
}

/// Record the CoreDNS request metrics for one reply.
/// The `zone` label of answers from outside the cluster zone.
static ROOT_LABEL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("."));

fn observe(
    server: &Arc<str>,
    zone: &Arc<str>,
    proto: Proto,
    fam: &'static str,
    qtype: &'static str,
    rcode: ResponseCode,
    started: Instant,
) {
    let key = HandleKey {
        server: server.clone(),
        zone: zone.clone(),
        proto: proto.label(),
        fam,
        qtype,
        rcode: rcode_label(rcode),
    };
    let h = HANDLES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(h) = cache.get(&key) {
            return h.clone();
        }
        let h = key.register();
        cache.insert(key, h.clone());
        h
    });
    h.requests.increment(1);
    h.responses.increment(1);
    h.duration.record(started.elapsed().as_secs_f64());
}

/// The label set of one reply's request metrics.
#[derive(Clone, PartialEq, Eq, Hash)]
struct HandleKey {
    server: Arc<str>,
    zone: Arc<str>,
    proto: &'static str,
    fam: &'static str,
    qtype: &'static str,
    rcode: &'static str,
}

/// The handles of one label set's request metrics.
#[derive(Clone)]
struct Handles {
    requests: metrics::Counter,
    responses: metrics::Counter,
    duration: metrics::Histogram,
}

impl HandleKey {
    fn register(&self) -> Handles {
        // Labels share the Arc'd strings.
        let server = metrics::SharedString::from(self.server.clone());
        let zone = metrics::SharedString::from(self.zone.clone());
        Handles {
            requests: metrics::counter!("coredns_dns_requests_total",
                "server" => server.clone(), "zone" => zone.clone(), "proto" => self.proto,
                "family" => self.fam, "type" => self.qtype),
            responses: metrics::counter!("coredns_dns_responses_total",
                "server" => server.clone(), "zone" => zone.clone(), "rcode" => self.rcode),
            duration: metrics::histogram!("coredns_dns_request_duration_seconds",
                "server" => server, "zone" => zone, "type" => self.qtype),
        }
    }
}

// Each worker thread looks a label set up in the recorder once: the
// macros build and hash the whole label set (allocating it) on every
// call, three times per query. A label set is a handful of strings and
// there are few of them (types x rcodes x servers), so the cache stays
// small. (A handle is bound to the recorder installed when it was made:
// the node installs its recorder before it starts serving.)
thread_local! {
    static HANDLES: std::cell::RefCell<std::collections::HashMap<HandleKey, Handles>> =
        Default::default();
}

/// A header-only error reply built from raw request bytes (used when the
/// request cannot be decoded, so nothing but its first 4 bytes is trusted).
fn raw_error(packet: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[0] = packet[0];
    out[1] = packet[1];
    // QR=1, opcode copied, RD copied; RCODE in the low nibble of byte 3.
    out[2] = 0x80 | (packet[2] & 0x78) | (packet[2] & 0x01);
    out[3] = 0x80 | (rcode.low() & 0x0f); // RA
    out
}

/// Handle one request synchronously as far as possible.
pub fn prepare(
    shared: &Shared,
    packet: &[u8],
    proto: Proto,
    peer: SocketAddr,
    server: &Arc<str>,
) -> Prepared {
    let started = Instant::now();
    let fam = family(&peer);
    if packet.len() < 12 {
        metrics::counter!("fairlead_dns_dropped_total", "reason" => "short").increment(1);
        return Prepared::Drop;
    }
    if packet[2] & 0x80 != 0 {
        metrics::counter!("fairlead_dns_dropped_total", "reason" => "response").increment(1);
        return Prepared::Drop;
    }
    let opcode = (packet[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    let early = |rcode| {
        observe(server, &ROOT_LABEL, proto, fam, "other", rcode, started);
        Prepared::Reply(raw_error(packet, rcode))
    };
    if opcode != 0 {
        return early(ResponseCode::NotImp);
    }
    if qdcount != 1 {
        return early(ResponseCode::FormErr);
    }
    // A reply, counted under its zone label.
    let counted = |zone: &Arc<str>, bytes: Vec<u8>, qtype: RecordType, rcode: ResponseCode| {
        observe(server, zone, proto, fam, type_label(qtype), rcode, started);
        Prepared::Reply(bytes)
    };
    let zone_reply = |bytes, qtype, rcode| counted(&shared.zone_label, bytes, qtype, rcode);
    // A plain query for a name answered before: the finished reply.
    let fast = Question::parse(packet, proto, shared.max_udp_payload);
    if let Some(q) = &fast {
        if let Some((reply, qtype, rcode)) = answers::lookup(&shared.answers, q, packet) {
            return zone_reply(reply, qtype, rcode);
        }
    }
    let msg = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "malformed DNS request");
            return early(ResponseCode::FormErr);
        }
    };
    let Some(query) = msg.queries.first().cloned() else {
        return early(ResponseCode::FormErr);
    };
    let req = RequestInfo {
        id: msg.metadata.id,
        recursion_desired: msg.metadata.recursion_desired,
        checking_disabled: msg.metadata.checking_disabled,
        edns_payload: msg.edns.as_ref().map(|e| e.max_payload()),
        dnssec_ok: msg.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        query,
        proto,
        family: fam,
        started,
        server: server.clone(),
    };
    let qtype = req.query.query_type();
    let in_zone = shared.zone.zone_of(req.query.name());
    let zone_label = if in_zone {
        &shared.zone_label
    } else {
        &*ROOT_LABEL
    };
    let simple = |rcode| {
        let bytes = encode(shared, &req, rcode, &ZoneAnswer::default(), false, false);
        counted(zone_label, bytes, qtype, rcode)
    };
    if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return simple(ResponseCode::BADVERS);
    }
    match qtype {
        RecordType::OPT => return simple(ResponseCode::FormErr),
        RecordType::AXFR | RecordType::IXFR => return simple(ResponseCode::Refused),
        _ => {}
    }
    match req.query.query_class() {
        DNSClass::IN | DNSClass::ANY => {}
        _ => return simple(ResponseCode::Refused),
    }
    // The read lock is held for this one call only.
    let resolution = shared.index().resolve(req.query.name(), qtype);
    match resolution {
        Resolution::Zone(answer) => {
            let bytes = encode(shared, &req, answer.rcode, &answer, true, false);
            if let Some(q) = &fast {
                answers::store(&shared.answers, q, &bytes, qtype, answer.rcode);
            }
            zone_reply(bytes, qtype, answer.rcode)
        }
        Resolution::Alias { answer, target } => {
            let mut q = req.query.clone();
            q.set_name(target);
            Prepared::Forward(Box::new(Pending {
                req,
                alias: Some(answer),
                target: q,
            }))
        }
        Resolution::Forward => {
            if shared.forwarder.upstreams().is_empty() {
                return simple(ResponseCode::ServFail);
            }
            let target = req.query.clone();
            Prepared::Forward(Box::new(Pending {
                req,
                alias: None,
                target,
            }))
        }
    }
}

/// Finish a request that needs an upstream.
pub async fn complete(shared: &Shared, p: Pending) -> Vec<u8> {
    let Pending { req, alias, target } = p;
    let flags = QueryFlags {
        dnssec_ok: req.dnssec_ok,
        checking_disabled: req.checking_disabled,
    };
    let qtype = req.query.query_type();
    let result = match shared.forwards.clone().try_acquire_owned() {
        Ok(_permit) => Some(shared.forwarder.resolve(&target, flags).await),
        Err(_) => {
            metrics::counter!("coredns_forward_max_concurrent_rejects_total").increment(1);
            None
        }
    };
    let (zone_label, rcode, bytes) = match alias {
        // ExternalName: the CNAME chain is ours (authoritative); append the
        // target's records when an upstream has them, else send the chain.
        Some(mut chain) => {
            if let Some(Ok(up)) = result {
                if matches!(up.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
                    chain.rcode = up.rcode;
                    chain.answers.extend(up.answers);
                    chain.authorities = up.authorities;
                }
            }
            let bytes = encode(shared, &req, chain.rcode, &chain, true, false);
            (&shared.zone_label, chain.rcode, bytes)
        }
        None => match result {
            Some(Ok(up)) => {
                let answer = ZoneAnswer {
                    rcode: up.rcode,
                    answers: up.answers,
                    authorities: up.authorities,
                    additionals: up.additionals,
                };
                let bytes = encode(shared, &req, up.rcode, &answer, false, up.authentic_data);
                (&*ROOT_LABEL, up.rcode, bytes)
            }
            Some(Err(e)) => {
                tracing::debug!(name = %req.query.name(), error = %e, "forwarding failed");
                let rcode = ResponseCode::ServFail;
                (
                    &*ROOT_LABEL,
                    rcode,
                    encode(shared, &req, rcode, &ZoneAnswer::default(), false, false),
                )
            }
            None => {
                let rcode = ResponseCode::ServFail;
                (
                    &*ROOT_LABEL,
                    rcode,
                    encode(shared, &req, rcode, &ZoneAnswer::default(), false, false),
                )
            }
        },
    };
    observe(
        &req.server,
        zone_label,
        req.proto,
        req.family,
        type_label(qtype),
        rcode,
        req.started,
    );
    bytes
}

/// Encode a reply, truncating (TC, empty sections) when it does not fit
/// the transport: the client's EDNS payload (at least 512, at most ours)
/// over UDP, 65535 over TCP.
fn encode(
    shared: &Shared,
    req: &RequestInfo,
    rcode: ResponseCode,
    answer: &ZoneAnswer,
    authoritative: bool,
    authentic_data: bool,
) -> Vec<u8> {
    let mut m = Message::response(req.id, OpCode::Query);
    m.metadata.recursion_desired = req.recursion_desired;
    m.metadata.checking_disabled = req.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = authoritative;
    m.metadata.authentic_data = authentic_data;
    m.metadata.response_code = rcode;
    m.add_query(req.query.clone());
    if req.edns_payload.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(shared.max_udp_payload);
        edns.set_dnssec_ok(req.dnssec_ok);
        m.set_edns(edns);
    }
    let limit = match req.proto {
        Proto::Udp => req
            .edns_payload
            .unwrap_or(512)
            .clamp(512, shared.max_udp_payload.max(512)) as usize,
        Proto::Tcp => u16::MAX as usize,
    };
    m.answers = answer.answers.clone();
    m.authorities = answer.authorities.clone();
    m.additionals = answer.additionals.clone();
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => return bytes,
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode DNS reply");
            m.metadata.response_code = ResponseCode::ServFail;
        }
    }
    // Too large (or unencodable): drop the additionals first; if the
    // answer still does not fit, send none and set TC (RFC 2181 §9).
    m.additionals.clear();
    if m.metadata.response_code != ResponseCode::ServFail {
        if let Ok(bytes) = m.to_vec() {
            if bytes.len() <= limit {
                return bytes;
            }
        }
        m.metadata.truncation = true;
    }
    m.answers.clear();
    m.authorities.clear();
    m.to_vec().unwrap_or_else(|_| {
        // Cannot happen for a header + question, but never panic.
        let mut out = vec![0u8; 12];
        out[..2].copy_from_slice(&req.id.to_be_bytes());
        out[2] = 0x80;
        out[3] = 0x82;
        out
    })
}

/// One of a client address's TCP connections, counted while it lives.
struct ClientSlot(Arc<Shared>, std::net::IpAddr);

impl ClientSlot {
    /// A slot for `ip`, unless it already holds `max_tcp_per_client`.
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<ClientSlot> {
        let mut clients = shared.tcp_clients.lock().unwrap_or_else(|e| e.into_inner());
        let n = clients.entry(ip).or_insert(0);
        if *n >= shared.max_tcp_per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot(shared.clone(), ip))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.0.tcp_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = clients.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.1);
            }
        }
    }
}

/// Accept TCP connections (bounded in all and per client address); each is
/// served by its own task.
pub async fn tcp_acceptor(listener: TcpListener, shared: Arc<Shared>, server: Arc<str>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::debug!(error = %e, "DNS TCP accept error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = shared.tcp_connections.clone().try_acquire_owned() else {
            metrics::counter!("fairlead_dns_dropped_total", "reason" => "tcp_limit").increment(1);
            continue;
        };
        let Some(client) = ClientSlot::take(&shared, peer.ip()) else {
            metrics::counter!("fairlead_dns_dropped_total", "reason" => "tcp_client_limit")
                .increment(1);
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tcp_connection(stream, peer, &client.0, &server).await;
        });
    }
}

/// Serve length-prefixed requests on one connection until the client
/// closes it, idles past the timeout or sends something undecodable as a
/// frame.
async fn tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    server: &Arc<str>,
) {
    let _ = stream.set_nodelay(true);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(shared.tcp_idle_timeout, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_READ_TIMEOUT, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let reply = match prepare(shared, &buf, Proto::Tcp, peer, server) {
            Prepared::Reply(b) => b,
            Prepared::Drop => return,
            Prepared::Forward(p) => complete(shared, *p).await,
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        match tokio::time::timeout(TCP_WRITE_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
