//! Answers encoded once: finished replies to cluster names, kept per
//! worker thread and keyed by the question, so a repeated query costs a
//! hash lookup and a copy with the ID, RD/CD flags and the question's
//! letter case patched in, instead of a decode, an index lookup and an
//! encode.
//!
//! ```text
//!  request bytes ─ Question::parse ─► key = lowercased qname · qtype ·
//!                  (cheap, by hand)       proto · EDNS? · DO · UDP limit
//!     hit:  cached reply, ID/RD/CD/qname case patched   (no lock, no decode)
//!     miss: the full path (hickory decode, index, encode); a zone answer
//!           is stored under its key and its owner
//! ```
//!
//! **What may be cached.** Only authoritative answers from the index
//! (`Resolution::Zone`), never forwarded ones, and only for requests the
//! parser here fully understands (one question of class IN, no answer or
//! authority records, at most an EDNS0 version-0 OPT with well-formed
//! options, nothing after it); everything else takes the full path, which
//! keeps every error reply (FORMERR, BADVERS, REFUSED, NOTIMP) where it is.
//! Everything a reply depends on is in the key or patched: the reply's
//! size limit (UDP without EDNS: 512; with EDNS: the client's size clamped
//! to ours; TCP: none) decides truncation, and EDNS presence and the DO bit
//! its OPT record.
//!
//! **Invalidation per changed name, not per change of the cluster.** Each
//! entry has an [`Owner`], read off its name: the Service
//! (`…<svc>.<ns>.svc.<zone>`, SRV and endpoint names included), the
//! namespace (`<ns>.svc.<zone>`, `….<ns>.pod.<zone>`), reverse names, or
//! the rest of the zone. A change of Service `ns/svc` drops that Service's
//! entries, its namespace's, reverse names and the rest (apex, SOA); other
//! Services' answers stay. A namespace appearing or going, or a rebuild,
//! drops everything.
//!
//! **No lock on the hot path.** Each worker thread has its own table. A
//! change is published as an entry in a short log and a bumped epoch; a
//! worker compares one atomic per query and only on a difference reads
//! the log (a mutex, taken once per change) and drops what it names. The
//! index is updated before the epoch is bumped, so an entry stored from a
//! stale index is dropped by the next query's check.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::server::Proto;

/// Entries per worker table; past it the table starts over (a bound on
/// memory when clients ask for ever new names).
const MAX_ENTRIES: usize = 16_384;
/// Changes kept in the log; a worker further behind drops everything.
const LOG: usize = 64;
/// Longest key: a 255-byte name, qtype, and the 5 variant bytes.
const KEY_MAX: usize = 255 + 2 + 5;

/// What an entry's answer depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// Service `name` in namespace `ns` (lowercase wire labels).
    Service { ns: Box<[u8]>, name: Box<[u8]> },
    /// A namespace's own names and its pod records.
    Namespace(Box<[u8]>),
    /// Reverse (PTR) names.
    Reverse,
    /// The rest of the zone (apex, `svc.<zone>`, ...).
    Other,
}

/// What a change invalidates.
#[derive(Clone, Debug)]
pub enum Invalidation {
    All,
    Owners(Vec<Owner>),
}

impl Invalidation {
    /// For changed Services (namespace, name); namespaces appearing or
    /// going away invalidate everything.
    pub fn for_services<'a>(
        services: impl IntoIterator<Item = (&'a str, &'a str)>,
        namespaces_changed: bool,
    ) -> Invalidation {
        if namespaces_changed {
            return Invalidation::All;
        }
        let mut owners = vec![Owner::Reverse, Owner::Other];
        for (ns, name) in services {
            let ns: Box<[u8]> = ns.to_ascii_lowercase().into_bytes().into();
            owners.push(Owner::Service {
                ns: ns.clone(),
                name: name.to_ascii_lowercase().into_bytes().into(),
            });
            owners.push(Owner::Namespace(ns));
        }
        owners.sort();
        owners.dedup();
        Invalidation::Owners(owners)
    }
}

/// The shared side of one server's tables: the change log.
pub struct AnswerTable {
    /// The zone's name in lowercase wire form (to find owners), and its
    /// number of labels.
    zone: Box<[u8]>,
    zone_labels: usize,
    epoch: AtomicU64,
    log: Mutex<VecDeque<(u64, Invalidation)>>,
    /// Hits and misses, for tests and metrics.
    pub hits: metrics::Counter,
    pub misses: metrics::Counter,
}

impl AnswerTable {
    /// `zone` in lowercase wire form.
    pub fn new(zone: Vec<u8>) -> Arc<AnswerTable> {
        Arc::new(AnswerTable {
            zone_labels: labels(&zone).len(),
            zone: zone.into(),
            epoch: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            hits: metrics::counter!("fairlead_dns_answer_cache_total", "result" => "hit"),
            misses: metrics::counter!("fairlead_dns_answer_cache_total", "result" => "miss"),
        })
    }

    /// Publish a change (after the index has it).
    pub fn invalidate(&self, what: Invalidation) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.epoch.load(Ordering::Relaxed) + 1;
        log.push_back((epoch, what));
        while log.len() > LOG {
            log.pop_front();
        }
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The owner of a name (lowercase wire form).
    fn owner(&self, qname: &[u8]) -> Owner {
        let labels = labels(qname);
        let n = labels.len();
        // In the zone: the name's last `zone_labels` labels are the zone's
        // bytes, starting on a label boundary.
        let in_zone = n >= self.zone_labels && {
            let rel_len: usize = labels[..n - self.zone_labels]
                .iter()
                .map(|l| l.len() + 1)
                .sum();
            qname.get(rel_len..) == Some(&self.zone[..])
        };
        if in_zone {
            let rel = &labels[..n - self.zone_labels];
            match rel {
                [.., name, ns, b"svc"] => {
                    return Owner::Service {
                        ns: (*ns).into(),
                        name: (*name).into(),
                    }
                }
                [ns, b"svc"] => return Owner::Namespace((*ns).into()),
                [.., ns, b"pod"] => return Owner::Namespace((*ns).into()),
                _ => return Owner::Other,
            }
        }
        match labels[..] {
            [.., b"in-addr", b"arpa"] | [.., b"ip6", b"arpa"] => Owner::Reverse,
            _ => Owner::Other,
        }
    }
}

fn labels(wire: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < wire.len() && wire[i] != 0 {
        let len = wire[i] as usize;
        out.push(&wire[i + 1..(i + 1 + len).min(wire.len())]);
        i += 1 + len;
    }
    out
}

/// A request the table may answer, parsed by hand.
pub struct Question {
    key: [u8; KEY_MAX],
    key_len: usize,
    /// Length of the question's name on the wire (from offset 12).
    qname_len: usize,
}

impl Question {
    /// Parse `packet` if it is a plain query (see the module doc); `None`
    /// sends it down the full path.
    pub fn parse(packet: &[u8], proto: Proto, max_udp: u16) -> Option<Question> {
        if packet.len() < 12 || packet[2] & 0xf8 != 0 {
            // Too short, a response, or an opcode other than QUERY.
            return None;
        }
        let count = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
        let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
        if qd != 1 || an != 0 || ns != 0 || ar > 1 {
            return None;
        }
        let mut key = [0u8; KEY_MAX];
        let mut i = 12;
        loop {
            let len = *packet.get(i)? as usize;
            if len & 0xc0 != 0 {
                return None;
            }
            if len == 0 {
                i += 1;
                break;
            }
            let end = i + 1 + len;
            if end - 12 > 255 - 1 || end > packet.len() {
                return None;
            }
            key[i - 12] = len as u8;
            for (k, b) in key[i - 11..end - 12].iter_mut().zip(&packet[i + 1..end]) {
                *k = b.to_ascii_lowercase();
            }
            i = end;
        }
        let qname_len = i - 12;
        // key[qname_len - 1] is the root label's 0 already.
        let rest = packet.get(i..i + 4)?;
        let (qtype, qclass) = (
            u16::from_be_bytes([rest[0], rest[1]]),
            u16::from_be_bytes([rest[2], rest[3]]),
        );
        if qclass != 1 || matches!(qtype, 41 | 251 | 252 | 255) {
            // Not IN; OPT, IXFR, AXFR, ANY: the full path.
            return None;
        }
        let mut at = i + 4;
        let mut edns = None;
        if ar == 1 {
            // The OPT record: root name, type 41, class = payload size,
            // TTL = extended rcode, version, flags; then its options.
            let opt = packet.get(at..at + 11)?;
            if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 {
                return None;
            }
            let payload = u16::from_be_bytes([opt[3], opt[4]]);
            let dnssec_ok = opt[7] & 0x80 != 0;
            let rdlen = u16::from_be_bytes([opt[9], opt[10]]) as usize;
            let mut o = at + 11;
            let end = o + rdlen;
            if end != packet.len() {
                return None;
            }
            while o < end {
                let h = packet.get(o..o + 4)?;
                o += 4 + u16::from_be_bytes([h[2], h[3]]) as usize;
            }
            if o != end {
                return None;
            }
            edns = Some((payload, dnssec_ok));
            at = end;
        }
        if at != packet.len() {
            return None;
        }
        let limit = match (proto, edns) {
            (Proto::Tcp, _) => 0,
            (Proto::Udp, None) => 512,
            (Proto::Udp, Some((p, _))) => p.clamp(512, max_udp.max(512)),
        };
        let variant = [
            (qtype >> 8) as u8,
            qtype as u8,
            matches!(proto, Proto::Tcp) as u8,
            edns.is_some() as u8,
            edns.is_some_and(|(_, d)| d) as u8,
            (limit >> 8) as u8,
            limit as u8,
        ];
        key[qname_len..qname_len + variant.len()].copy_from_slice(&variant);
        Some(Question {
            key,
            key_len: qname_len + variant.len(),
            qname_len,
        })
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    fn qname(&self) -> &[u8] {
        &self.key[..self.qname_len]
    }
}

/// A finished reply and what the metrics need.
struct Entry {
    reply: Box<[u8]>,
    qtype: RecordType,
    rcode: ResponseCode,
}

/// One worker thread's table for one server.
struct Worker {
    table: Weak<AnswerTable>,
    seen: u64,
    entries: HashMap<Box<[u8]>, Entry>,
    by_owner: HashMap<Owner, Vec<Box<[u8]>>>,
}

impl Worker {
    fn clear(&mut self) {
        self.entries.clear();
        self.by_owner.clear();
    }

    /// Catch up with the changes published since this worker last looked.
    fn sync(&mut self, table: &AnswerTable) {
        let epoch = table.epoch.load(Ordering::Acquire);
        if epoch == self.seen {
            return;
        }
        let log = table.log.lock().unwrap_or_else(|e| e.into_inner());
        match log.front() {
            Some((first, _)) if *first <= self.seen + 1 => {
                for (e, what) in log.iter() {
                    if *e <= self.seen {
                        continue;
                    }
                    match what {
                        Invalidation::All => self.clear(),
                        Invalidation::Owners(owners) => {
                            for o in owners {
                                for k in self.by_owner.remove(o).unwrap_or_default() {
                                    self.entries.remove(&k);
                                }
                            }
                        }
                    }
                }
            }
            _ => self.clear(),
        }
        self.seen = log.back().map_or(epoch, |(e, _)| *e);
    }
}

thread_local! {
    static WORKERS: RefCell<Vec<Worker>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on this thread's table for `table`.
fn with_worker<R>(table: &Arc<AnswerTable>, f: impl FnOnce(&mut Worker) -> R) -> R {
    WORKERS.with(|w| {
        let mut workers = w.borrow_mut();
        let i = match workers
            .iter()
            .position(|x| std::ptr::eq(x.table.as_ptr(), Arc::as_ptr(table)))
        {
            Some(i) => i,
            None => {
                // Forget the tables of servers that are gone.
                workers.retain(|x| x.table.strong_count() > 0);
                workers.push(Worker {
                    table: Arc::downgrade(table),
                    seen: 0,
                    entries: HashMap::new(),
                    by_owner: HashMap::new(),
                });
                workers.len() - 1
            }
        };
        let worker = &mut workers[i];
        worker.sync(table);
        f(worker)
    })
}

/// The reply to `packet` if this thread's table has it: (reply, qtype,
/// rcode).
pub fn lookup(
    table: &Arc<AnswerTable>,
    q: &Question,
    packet: &[u8],
) -> Option<(Vec<u8>, RecordType, ResponseCode)> {
    let found = with_worker(table, |w| {
        let e = w.entries.get(q.key())?;
        let mut reply = e.reply.to_vec();
        // ID; RD (byte 2, bit 0); CD (byte 3, bit 4); the question's name
        // as the client spelled it (0x20 case randomisation).
        reply[..2].copy_from_slice(&packet[..2]);
        reply[2] = (reply[2] & !0x01) | (packet[2] & 0x01);
        reply[3] = (reply[3] & !0x10) | (packet[3] & 0x10);
        reply[12..12 + q.qname_len].copy_from_slice(&packet[12..12 + q.qname_len]);
        Some((reply, e.qtype, e.rcode))
    });
    match found {
        Some(_) => table.hits.increment(1),
        None => table.misses.increment(1),
    }
    found
}

/// Keep `reply` (the full path's answer to `q`) in this thread's table.
pub fn store(
    table: &Arc<AnswerTable>,
    q: &Question,
    reply: &[u8],
    qtype: RecordType,
    rcode: ResponseCode,
) {
    // The reply's question must sit at offset 12 with the same name
    // (ignoring case), or patching it would be wrong.
    let qn = q.qname_len;
    if reply.len() < 12 + qn || !reply[12..12 + qn].eq_ignore_ascii_case(q.qname()) {
        return;
    }
    let owner = table.owner(q.qname());
    with_worker(table, |w| {
        if w.entries.len() >= MAX_ENTRIES {
            w.clear();
        }
        let key: Box<[u8]> = q.key().into();
        w.by_owner.entry(owner).or_default().push(key.clone());
        w.entries.insert(
            key,
            Entry {
                reply: reply.into(),
                qtype,
                rcode,
            },
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::Name;

    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for l in name.trim_end_matches('.').split('.') {
            out.push(l.len() as u8);
            out.extend(l.as_bytes());
        }
        out.push(0);
        out
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn keys_ignore_case_and_hold_what_the_reply_depends_on() {
        let key = |p: &[u8], proto| Question::parse(p, proto, 1232).unwrap().key().to_vec();
        let a = key(
            &query("Web.Default.svc.cluster.local.", RecordType::A, None),
            Proto::Udp,
        );
        let b = key(
            &query("web.default.svc.cluster.local.", RecordType::A, None),
            Proto::Udp,
        );
        assert_eq!(a, b);
        let aaaa = key(
            &query("web.default.svc.cluster.local.", RecordType::AAAA, None),
            Proto::Udp,
        );
        let tcp = key(
            &query("web.default.svc.cluster.local.", RecordType::A, None),
            Proto::Tcp,
        );
        let edns = key(
            &query("web.default.svc.cluster.local.", RecordType::A, Some(4096)),
            Proto::Udp,
        );
        let edns_small = key(
            &query("web.default.svc.cluster.local.", RecordType::A, Some(1232)),
            Proto::Udp,
        );
        for other in [&aaaa, &tcp, &edns] {
            assert_ne!(&a, other);
        }
        // 4096 clamps to our 1232: the same reply.
        assert_eq!(edns, edns_small);
    }

    #[test]
    fn anything_unusual_takes_the_full_path() {
        let ok = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
        assert!(Question::parse(&ok, Proto::Udp, 1232).is_some());
        let mut trailing = ok.clone();
        trailing.push(0);
        let mut response = ok.clone();
        response[2] |= 0x80;
        let mut two = ok.clone();
        two[5] = 2;
        let mut badvers = ok.clone();
        let n = badvers.len();
        badvers[n - 5] = 1; // OPT version
        let mut bad_option = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
        // An option header claiming more bytes than there are.
        let n = bad_option.len();
        bad_option[n - 1] = 4;
        bad_option.extend([0, 10, 0, 9]);
        for (what, p) in [
            ("trailing byte", trailing),
            ("a response", response),
            ("two questions", two),
            ("EDNS version 1", badvers),
            ("a bad option", bad_option),
            (
                "ANY",
                query("web.default.svc.cluster.local.", RecordType::ANY, None),
            ),
            ("AXFR", query("cluster.local.", RecordType::AXFR, None)),
            ("short", vec![0; 11]),
        ] {
            assert!(Question::parse(&p, Proto::Udp, 1232).is_none(), "{what}");
        }
    }

    #[test]
    fn owners_follow_the_name() {
        let t = AnswerTable::new(wire("cluster.local"));
        let svc = |ns: &str, name: &str| Owner::Service {
            ns: ns.as_bytes().into(),
            name: name.as_bytes().into(),
        };
        assert_eq!(
            t.owner(&wire("web.default.svc.cluster.local")),
            svc("default", "web")
        );
        assert_eq!(
            t.owner(&wire("_http._tcp.web.default.svc.cluster.local")),
            svc("default", "web")
        );
        // A search-path expansion is owned by the Service it would name.
        assert_eq!(
            t.owner(&wire(
                "web.default.svc.cluster.local.default.svc.cluster.local"
            )),
            svc("default", "local")
        );
        assert_eq!(
            t.owner(&wire("default.svc.cluster.local")),
            Owner::Namespace(b"default"[..].into())
        );
        assert_eq!(
            t.owner(&wire("10-0-0-1.default.pod.cluster.local")),
            Owner::Namespace(b"default"[..].into())
        );
        assert_eq!(t.owner(&wire("1.0.96.10.in-addr.arpa")), Owner::Reverse);
        assert_eq!(t.owner(&wire("cluster.local")), Owner::Other);
        assert_eq!(t.owner(&wire("svc.cluster.local")), Owner::Other);
        // Another zone that ends in the same letters is not the zone.
        assert_eq!(
            t.owner(&wire("web.default.svc.mycluster.local")),
            Owner::Other
        );
    }

    #[test]
    fn hits_are_patched_and_changes_drop_only_their_owners() {
        let t = AnswerTable::new(wire("cluster.local"));
        let web = query("web.default.svc.cluster.local.", RecordType::A, None);
        let db = query("db.default.svc.cluster.local.", RecordType::A, None);
        let q_web = Question::parse(&web, Proto::Udp, 1232).unwrap();
        let q_db = Question::parse(&db, Proto::Udp, 1232).unwrap();
        // Stand-in replies: the request with QR set.
        let reply = |p: &[u8]| {
            let mut r = p.to_vec();
            r[2] |= 0x80;
            r
        };
        store(
            &t,
            &q_web,
            &reply(&web),
            RecordType::A,
            ResponseCode::NoError,
        );
        store(&t, &q_db, &reply(&db), RecordType::A, ResponseCode::NoError);

        // Another ID, RD off, other letter case: patched in.
        let mut again = query("WEB.default.svc.cluster.local.", RecordType::A, None);
        again[0] = 0xab;
        again[1] = 0xcd;
        again[2] &= !0x01;
        let q = Question::parse(&again, Proto::Udp, 1232).unwrap();
        let (r, qtype, rcode) = lookup(&t, &q, &again).expect("a hit");
        assert_eq!((qtype, rcode), (RecordType::A, ResponseCode::NoError));
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2] & 0x01, 0, "RD as asked");
        assert_eq!(r[2] & 0x80, 0x80, "still a response");
        assert_eq!(&r[13..16], b"WEB");

        // A change of default/web drops web's answer, not db's.
        t.invalidate(Invalidation::for_services([("default", "web")], false));
        assert!(lookup(&t, &q_web, &web).is_none());
        assert!(lookup(&t, &q_db, &db).is_some());
        // A namespace change drops everything.
        t.invalidate(Invalidation::for_services([], true));
        assert!(lookup(&t, &q_db, &db).is_none());
    }
}
