//! The cluster zone: every name the Kubernetes DNS specification (schema
//! 1.1.0) defines, kept up to date one Service at a time
//! ([`Index::apply`]), and the answer to one question ([`Index::resolve`]).
//! No I/O here: the server ([`super::server`]) turns a [`Resolution`] into
//! a wire message, and forwards what is not ours.
//!
//! Names and what they hold (`<zone>` is e.g. `cluster.local.`):
//!
//! * `<zone>`: SOA and NS `ns.dns.<zone>`; `ns.dns.<zone>` has the ClusterIPs
//!   of `kube-system/kube-dns` when that Service exists (CoreDNS does the
//!   same), else exists without data.
//! * `dns-version.<zone>`: TXT `"1.1.0"`.
//! * `<svc>.<ns>.svc.<zone>`: ClusterIP Services: A/AAAA of the ClusterIPs;
//!   headless: A/AAAA of the ready endpoints (all of them with
//!   `publishNotReadyAddresses`), and no name at all when none is ready;
//!   ExternalName: a CNAME.
//! * `<ep>.<svc>.<ns>.svc.<zone>` (headless): the endpoint's address, where
//!   `<ep>` is its `hostname`, or (as CoreDNS does) its address with `.`/`:`
//!   replaced by `-`.
//! * `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV per named port, to the
//!   Service name (ClusterIP) or to each ready endpoint's name (headless,
//!   with the endpoint's port).
//! * `<ns>.svc.<zone>`, `svc.<zone>` and every other ancestor of a name above
//!   exist with no data (NODATA, never NXDOMAIN: RFC 8020).
//! * `a-b-c-d.<ns>.pod.<zone>` (and IPv6 with `-` for `:`): computed from the
//!   name, like CoreDNS's `pods insecure`, when pod records are on.
//! * Reverse names (`in-addr.arpa.`, `ip6.arpa.`) of ClusterIPs and headless
//!   endpoint addresses: PTR to the names above. Other reverse names are not
//!   ours (forwarded), like kubeadm's CoreDNS `fallthrough in-addr.arpa
//!   ip6.arpa`.
//!
//! All records carry the configured TTL; negative answers carry the zone's
//! SOA, whose minimum (= the TTL) bounds negative caching (RFC 2308).
//! Names compare case-insensitively (ASCII), as hickory's [`Name`] does;
//! records carry the objects' own spelling. A name that would be invalid
//! (a label of more than 63 bytes, more than 255 bytes in all) is left out,
//! and so is everything below it.
//!
//! # Representation: what each Service contributes, not a record table
//!
//! Every name below `<ns>.svc.<zone>` belongs to exactly one Service (two
//! Services only share a name when their names differ in case alone, which
//! API validation rules out; that case is handled anyway, see below). So
//! the index keeps, per Service, a [`Contribution`]: the compact result of
//! the one rule, [`contribution`], applied to its view and slices (the
//! lean views of [`crate::model`]). [`Index::resolve`] walks a question's
//! labels (`<zone>` → `svc` → namespace → Service → below) and renders the
//! records of that one name from the Contribution on the spot. Nothing per
//! record is stored:
//!
//! * a ClusterIP Service's Contribution is its `Arc<ServiceView>` itself,
//!   shared with the node's [`Cache`] (A/AAAA and SRV are a few lines of
//!   arithmetic on it at query time);
//! * an ExternalName one is its parsed target;
//! * a headless one is a table of its published addresses (with their
//!   hostnames, shared with the views) and of its SRV targets, sorted, so a
//!   query does not re-merge slices.
//!
//! Only the reverse map (address → the Services whose names point at it)
//! is materialized, since an address is not found by walking labels.
//!
//! # Incremental updates, removal and ancestors
//!
//! [`Index::apply`] (or [`Delta::new`] + [`Index::commit`], which lets the
//! server compute the contributions before it locks) replaces the
//! Contributions of exactly the Services a [`Dirty`] names: the old one is
//! taken out of the map and *unlinked* — its reverse entries are removed
//! (recomputed from the old Contribution itself, so nothing else needs to
//! be remembered), its namespace's Service count goes down, its sizes leave
//! the statistics — and the new one is *linked* the same way. Everything
//! costs the size of the two Contributions, never the size of the zone.
//!
//! * Names below a Service's name (`_tcp.<svc>...`, `<ep>.<svc>...`) exist
//!   exactly while its Contribution says so; they go with it.
//! * `<ns>.svc.<zone>` exists while its Namespace object exists or at least
//!   one Service is in it: a reference count per namespace (Services) plus
//!   the set of Namespace objects spelled that way, both idempotent, so
//!   re-applying a change (or mixing [`Index::apply`] with a full rebuild)
//!   cannot skew them.
//! * `svc.<zone>`, `dns.<zone>`, `ns.dns.<zone>`, `pod.<zone>` and the apex
//!   always exist.
//! * Shared records: two Services with one ClusterIP each hold their own
//!   Contribution, and the address's reverse entry lists one target per
//!   Service (sorted by Service); removing one Service removes only its
//!   target. Services whose names differ only in case are found through a
//!   side map of case-folded keys (empty in any validated cluster), and
//!   their answers are merged with duplicates dropped, as one record table
//!   would.
//!
//! The SOA serial goes up by one on every apply that changed the zone.
//! Statistics ([`IndexStats`]) are kept incrementally by the same link /
//! unlink steps.
//!
//! [`Index::build`] (from whole API objects) fills a temporary [`Cache`]
//! and applies everything to an empty index: the same rule, the same code.
//! The tests check that an index kept up to date over random events equals
//! a fresh build, and that both equal the record table the previous
//! implementation (one table of every record, rebuilt on every change)
//! built from the same objects.
//!
//! Differences from that table, all outside what the API server lets
//! through: a Service without `spec` (which has no view) no longer makes
//! its namespace exist; of two endpoints with different hostnames for one
//! address, the one in the later slice *by slice name* wins (the table
//! went by the order it was handed the slices); and Services whose names
//! differ only in case are counted separately in [`IndexStats`].
//!
//! # Memory
//!
//! `measure::bytes_per_cluster_ip_service` (ignored test; 30,000 ClusterIP
//! Services with a named port and 10 endpoints each): 266 bytes per Service
//! on top of the views the node's cache holds anyway — one Service map
//! entry (key + Contribution, 48 bytes) and one reverse map entry (72
//! bytes), in hash tables that at this size are half empty (power-of-two
//! growth). The record table took 3,206 bytes per Service (three names,
//! two records, one reverse entry), twice that while a rebuild and the
//! served table coexisted. Built from API objects, where the index holds
//! the only reference to the views, it is 687 bytes.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HINFO, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Cache, ClusterIpField, Dirty, ObjectKey, ServiceType, ServiceView, SliceView};
use crate::proxy::Protocol;

/// The schema version `dns-version.<zone>` answers.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// How many CNAMEs are followed inside the zone before giving up (SERVFAIL).
const MAX_CNAME_HOPS: usize = 8;

/// The deepest name under the zone: `_<port>._<proto>.<svc>.<ns>.svc`.
const MAX_DEPTH: usize = 5;

/// What the index is built with (the parts of [`super::DnsConfig`] that shape
/// records).
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// The cluster domain, fully qualified (`cluster.local.`).
    pub zone: Name,
    /// TTL of every record, and the SOA minimum (negative-caching TTL).
    pub ttl: u32,
    /// Serve `a-b-c-d.<ns>.pod.<zone>`.
    pub pod_records: bool,
}

/// The answer to one question from the cluster's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Answered from the index (NOERROR with data, NODATA, NXDOMAIN or, for a
    /// CNAME loop inside the zone, SERVFAIL); authoritative.
    Zone(ZoneAnswer),
    /// The name is (or aliases through) an ExternalName Service whose target
    /// is outside the zone: `answer` holds the CNAME chain; the target's
    /// records of the asked type are to be looked up upstream and appended.
    Alias { answer: ZoneAnswer, target: Name },
    /// Not ours: forward upstream.
    Forward,
}

/// Records of an answer from the index.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ZoneAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// Sizes of an index (for logs and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Services with a valid name.
    pub services: usize,
    /// Names that exist (with or without records).
    pub names: usize,
    /// Records, PTR aside.
    pub records: usize,
    /// Addresses with a PTR.
    pub ptr_addresses: usize,
}

impl IndexStats {
    fn add(&mut self, s: Sizes) {
        self.names += s.names as usize;
        self.records += s.records as usize;
    }

    fn sub(&mut self, s: Sizes) {
        self.names -= s.names as usize;
        self.records -= s.records as usize;
    }
}

/// One name's lookup result inside [`Index::resolve`].
enum Step {
    Records(Vec<Record>),
    NoData(Record),
    NxDomain(Record),
    Cname(Record, Name),
    NotOurs,
}

// ---- names -----------------------------------------------------------------

/// Builds a name from raw labels under `zone` (None when a label is empty or
/// too long, or the name exceeds 255 bytes: such objects get no records).
fn name_under(labels: &[&str], zone: &Name) -> Option<Name> {
    Name::from_labels(labels.iter().map(|l| l.as_bytes()))
        .ok()?
        .append_domain(zone)
        .ok()
}

/// The wire length of `zone` (labels with their length bytes, and the root).
fn encoded_len(zone: &Name) -> usize {
    zone.iter().map(|l| l.len() + 1).sum::<usize>() + 1
}

/// Whether labels of these lengths under a zone of wire length `zone_len`
/// make a valid name: exactly when [`name_under`] succeeds, without
/// building it.
fn fits(label_lens: &[usize], zone_len: usize) -> bool {
    label_lens.iter().all(|l| (1..=63).contains(l))
        && label_lens.iter().map(|l| l + 1).sum::<usize>() + zone_len <= Name::MAX_LENGTH
}

/// CoreDNS's endpoint name for an endpoint without `hostname`.
fn dashed(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The address whose [`dashed`] label is `label` (case-insensitively).
fn undashed(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    let ip = if let Ok(v4) = s.replace('-', ".").parse::<Ipv4Addr>() {
        IpAddr::V4(v4)
    } else {
        IpAddr::V6(s.replace('-', ":").parse::<Ipv6Addr>().ok()?)
    };
    dashed(&ip).eq_ignore_ascii_case(s).then_some(ip)
}

fn ip_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, data)
}

/// `label` ASCII-lower-cased into `buf`, as text (names compare
/// case-insensitively; no allocation per query).
fn fold<'b>(label: &[u8], buf: &'b mut [u8; 63]) -> Option<&'b str> {
    let b = buf.get_mut(..label.len())?;
    b.copy_from_slice(label);
    b.make_ascii_lowercase();
    std::str::from_utf8(b).ok()
}

/// `s` without upper-case ASCII (the same `Arc` when it has none).
fn folded(s: &Arc<str>) -> Arc<str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Arc::from(s.to_ascii_lowercase())
    } else {
        s.clone()
    }
}

/// Whether a key is spelled with upper-case ASCII (then the case-folded
/// side map finds it).
fn has_upper(key: &ObjectKey) -> bool {
    key.namespace.bytes().any(|b| b.is_ascii_uppercase())
        || key.name.bytes().any(|b| b.is_ascii_uppercase())
}

/// Distinct elements of a short slice, in order.
fn distinct<T: PartialEq>(v: &[T]) -> impl Iterator<Item = &T> {
    v.iter()
        .enumerate()
        .filter(|(i, x)| !v[..*i].contains(x))
        .map(|(_, x)| x)
}

/// A Service key to look up without building an [`ObjectKey`] (so a query
/// allocates nothing to find its Service): `(namespace, name)`. Hashes and
/// compares like [`ObjectKey`]'s derived `Hash`/`Eq`.
trait KeyRef {
    fn parts(&self) -> (&str, &str);
}

impl KeyRef for ObjectKey {
    fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl KeyRef for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn KeyRef + 'a> for ObjectKey {
    fn borrow(&self) -> &(dyn KeyRef + 'a) {
        self
    }
}

impl Hash for dyn KeyRef + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (ns, name) = self.parts();
        ns.hash(state);
        name.hash(state);
    }
}

impl PartialEq for dyn KeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyRef + '_ {}

// ---- the rule: what one Service contributes ----------------------------------

/// `_tcp`, `_udp`, `_sctp` (ordered like their labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SrvProto {
    Sctp,
    Tcp,
    Udp,
}

impl SrvProto {
    /// Unknown protocols are TCP, as CoreDNS has it.
    fn of(p: Option<Protocol>) -> SrvProto {
        match p {
            Some(Protocol::Udp) => SrvProto::Udp,
            Some(Protocol::Sctp) => SrvProto::Sctp,
            Some(Protocol::Tcp) | None => SrvProto::Tcp,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SrvProto::Sctp => "_sctp",
            SrvProto::Tcp => "_tcp",
            SrvProto::Udp => "_udp",
        }
    }

    fn is(self, label: &[u8]) -> bool {
        self.label().as_bytes().eq_ignore_ascii_case(label)
    }
}

/// Whether `label` is `_<port>`.
fn is_port_label(label: &[u8], port: &str) -> bool {
    label.first() == Some(&b'_') && label[1..].eq_ignore_ascii_case(port.as_bytes())
}

/// How many names and records a Contribution adds (below its namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sizes {
    names: u32,
    records: u32,
}

/// One Service's part of the zone: what [`contribution`] derives from its
/// view and slices, in the form queries are answered from.
#[derive(Debug)]
pub enum Contribution {
    /// `<svc>.<ns>.svc.<zone>` would not be a valid name: the Service only
    /// makes its namespace exist.
    Unnamed,
    /// No records: no ClusterIP (yet), an ExternalName without a usable
    /// target, a headless Service without published endpoints.
    Empty,
    /// A/AAAA of the (distinct) ClusterIPs and SRV per named port, read
    /// from the view at query time (the view is the one the [`Cache`]
    /// holds, not a copy).
    ClusterIp(Arc<ServiceView>),
    /// A CNAME.
    ExternalName(Box<Name>),
    Headless(Box<Headless>),
}

/// The published endpoints and SRV targets of a headless Service.
#[derive(Debug, PartialEq, Eq)]
pub struct Headless {
    /// Published addresses in address order, with their label.
    endpoints: Box<[Endpoint]>,
    /// Valid SRV records (a named target, a valid owner name), in
    /// (port name, protocol, port, address) order.
    srvs: Box<[Srv]>,
    sizes: Sizes,
}

#[derive(Debug, PartialEq, Eq)]
struct Endpoint {
    ip: IpAddr,
    /// The endpoint's hostname (`None`: the dashed address).
    host: Option<Arc<str>>,
    /// `<label>.<svc>.<ns>.svc.<zone>` is a valid name.
    named: bool,
}

impl Endpoint {
    fn label(&self) -> std::borrow::Cow<'_, str> {
        match &self.host {
            Some(h) => std::borrow::Cow::Borrowed(h),
            None => std::borrow::Cow::Owned(dashed(&self.ip)),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Srv {
    port_name: Arc<str>,
    proto: SrvProto,
    port: u16,
    /// Index into [`Headless::endpoints`].
    endpoint: u32,
}

/// The rule: what the Service `key` (its view and its slices, sorted by
/// name) puts in the zone `zone` (lower-cased, fully qualified). `None`:
/// nothing at all (its namespace is not a valid label). Pure; the
/// incremental path and [`Index::build`] both use it.
pub fn contribution(
    zone: &Name,
    key: &ObjectKey,
    svc: &Arc<ServiceView>,
    slices: &[&Arc<SliceView>],
) -> Option<Contribution> {
    let zone_len = encoded_len(zone);
    let (ns, name) = (key.namespace.len(), key.name.len());
    if !fits(&[ns, 3], zone_len) {
        return None;
    }
    if !fits(&[name, ns, 3], zone_len) {
        return Some(Contribution::Unnamed);
    }
    Some(if svc.type_ == ServiceType::ExternalName {
        match svc
            .external_name
            .as_deref()
            .map(|n| n.trim_end_matches('.'))
            .filter(|n| !n.is_empty())
            .and_then(|n| Name::from_ascii(n).ok())
        {
            Some(mut n) => {
                n.set_fqdn(true);
                Contribution::ExternalName(Box::new(n))
            }
            None => Contribution::Empty,
        }
    } else if svc.cluster_ip == ClusterIpField::None {
        headless(zone_len, key, svc, slices)
    } else if svc.cluster_ips.is_empty() {
        Contribution::Empty
    } else {
        Contribution::ClusterIp(svc.clone())
    })
}

fn headless(
    zone_len: usize,
    key: &ObjectKey,
    svc: &ServiceView,
    slices: &[&Arc<SliceView>],
) -> Contribution {
    let (ns, name) = (key.namespace.len(), key.name.len());
    // address → hostname (the last endpoint with one wins; else dashed).
    let mut labels: BTreeMap<IpAddr, Option<Arc<str>>> = BTreeMap::new();
    let mut srvs: BTreeSet<(Arc<str>, SrvProto, u16, IpAddr)> = BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if !ep.ready && !svc.publish_not_ready_addresses {
                continue;
            }
            for ip in ep.addresses() {
                let label = labels.entry(*ip).or_insert_with(|| ep.hostname.clone());
                if ep.hostname.is_some() {
                    label.clone_from(&ep.hostname);
                }
                for sp in &slice.ports {
                    let Some(port) = sp.port.and_then(|p| u16::try_from(p).ok()) else {
                        continue;
                    };
                    if sp.name.is_empty() {
                        continue;
                    }
                    srvs.insert((sp.name.clone(), SrvProto::of(sp.protocol), port, *ip));
                }
            }
        }
    }
    if labels.is_empty() {
        return Contribution::Empty;
    }
    let endpoints: Box<[Endpoint]> = labels
        .into_iter()
        .map(|(ip, host)| {
            let len = host.as_ref().map_or_else(|| dashed(&ip).len(), |h| h.len());
            Endpoint {
                ip,
                host,
                named: fits(&[len, name, ns, 3], zone_len),
            }
        })
        .collect();
    let srvs: Box<[Srv]> = srvs
        .into_iter()
        .filter_map(|(port_name, proto, port, ip)| {
            let i = endpoints.binary_search_by(|e| e.ip.cmp(&ip)).ok()?;
            let valid = endpoints[i].named
                && fits(
                    &[port_name.len() + 1, proto.label().len(), name, ns, 3],
                    zone_len,
                );
            valid.then_some(Srv {
                port_name,
                proto,
                port,
                endpoint: i as u32,
            })
        })
        .collect();
    // Sizes: distinct names and records, names compared case-insensitively.
    let mut names: HashSet<Vec<u8>> = HashSet::new();
    let mut records = endpoints.len();
    for e in endpoints.iter().filter(|e| e.named) {
        names.insert(e.label().to_ascii_lowercase().into_bytes());
        records += 1;
    }
    let mut srv_records: HashSet<(Vec<u8>, u16, Vec<u8>)> = HashSet::new();
    for s in srvs.iter() {
        names.insert(s.proto.label().as_bytes().to_vec());
        let owner = format!("_{}.{}", s.port_name, s.proto.label()).to_ascii_lowercase();
        names.insert(owner.clone().into_bytes());
        let target = endpoints[s.endpoint as usize].label().to_ascii_lowercase();
        srv_records.insert((owner.into_bytes(), s.port, target.into_bytes()));
    }
    let sizes = Sizes {
        names: 1 + names.len() as u32,
        records: (records + srv_records.len()) as u32,
    };
    Contribution::Headless(Box::new(Headless {
        endpoints,
        srvs,
        sizes,
    }))
}

/// The ports of a ClusterIP Service that have an SRV name: (port name,
/// protocol, port).
fn cluster_srvs<'v>(
    zone_len: usize,
    key: &ObjectKey,
    view: &'v ServiceView,
) -> impl Iterator<Item = (&'v str, SrvProto, u16)> + Clone + 'v {
    let (ns, name) = (key.namespace.len(), key.name.len());
    view.ports.iter().filter_map(move |p| {
        let port = u16::try_from(p.port).ok()?;
        let proto = SrvProto::of(p.protocol);
        let valid = !p.name.is_empty()
            && fits(
                &[p.name.len() + 1, proto.label().len(), name, ns, 3],
                zone_len,
            );
        valid.then_some((&*p.name, proto, port))
    })
}

fn is_kube_dns(key: &ObjectKey) -> bool {
    &*key.namespace == "kube-system" && &*key.name == "kube-dns"
}

/// What [`Index::resolve`] needs of the zone to render records.
struct Zone<'z> {
    name: &'z Name,
    len: usize,
    ttl: u32,
}

impl Zone<'_> {
    /// `<labels...>.<svc>.<ns>.svc.<zone>` (valid by construction of the
    /// Contribution that asks).
    fn under(&self, key: &ObjectKey, labels: &[&str]) -> Option<Name> {
        let mut name = Name::new();
        for label in labels
            .iter()
            .copied()
            .chain([&*key.name, &*key.namespace, "svc"])
        {
            name = name.append_label(label.as_bytes()).ok()?;
        }
        name.append_domain(self.name).ok()
    }
}

impl Contribution {
    /// Whether `other` puts the same records in the zone (the serial goes
    /// up only when something changed).
    fn same_records(&self, other: &Contribution) -> bool {
        match (self, other) {
            (Contribution::Unnamed, Contribution::Unnamed)
            | (Contribution::Empty, Contribution::Empty) => true,
            (Contribution::ClusterIp(a), Contribution::ClusterIp(b)) => {
                // What DNS reads of the view: not node ports, policies, ...
                let same_ports = a.ports.len() == b.ports.len()
                    && a.ports.iter().zip(&b.ports).all(|(x, y)| {
                        x.name == y.name && x.protocol == y.protocol && x.port == y.port
                    });
                Arc::ptr_eq(a, b) || (a.cluster_ips == b.cluster_ips && same_ports)
            }
            (Contribution::ExternalName(a), Contribution::ExternalName(b)) => a.eq_case(b),
            (Contribution::Headless(a), Contribution::Headless(b)) => a == b,
            _ => false,
        }
    }

    /// Names and records it adds below its namespace (`ns.dns.<zone>`'s
    /// addresses included, for kube-dns). No allocation.
    fn sizes(&self, zone_len: usize, key: &ObjectKey) -> Sizes {
        match self {
            Contribution::Unnamed | Contribution::Empty => Sizes::default(),
            Contribution::ExternalName(_) => Sizes {
                names: 1,
                records: 1,
            },
            Contribution::Headless(h) => h.sizes,
            Contribution::ClusterIp(view) => {
                let ips = distinct(&view.cluster_ips).count() as u32;
                let mut s = Sizes {
                    names: 1,
                    records: if is_kube_dns(key) { 2 * ips } else { ips },
                };
                let srvs = cluster_srvs(zone_len, key, view);
                for (i, (pn, proto, port)) in srvs.clone().enumerate() {
                    let mut before = srvs.clone().take(i);
                    if before.clone().all(|(_, p, _)| p != proto) {
                        s.names += 1; // _<proto>.<svc>...
                    }
                    if before
                        .clone()
                        .all(|(n, p, _)| p != proto || !n.eq_ignore_ascii_case(pn))
                    {
                        s.names += 1; // _<port>._<proto>.<svc>...
                    }
                    if before
                        .all(|(n, p, o)| p != proto || o != port || !n.eq_ignore_ascii_case(pn))
                    {
                        s.records += 1;
                    }
                }
                s
            }
        }
    }

    /// The addresses with a PTR to this Service's names, and the hostname
    /// the PTR names (`None`: the Service name for a ClusterIP, the dashed
    /// address for a headless endpoint).
    fn ptrs(&self) -> Vec<(IpAddr, Option<Arc<str>>)> {
        match self {
            Contribution::ClusterIp(view) => {
                distinct(&view.cluster_ips).map(|ip| (*ip, None)).collect()
            }
            Contribution::Headless(h) => h
                .endpoints
                .iter()
                .filter(|e| e.named)
                .map(|e| (e.ip, e.host.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The records at `<below...>.<svc>.<ns>.svc.<zone>` (`below`: 0 to 2
    /// labels, leftmost first), or `None` when that name does not exist.
    fn lookup(&self, zone: &Zone, key: &ObjectKey, below: &[&[u8]]) -> Option<Vec<Record>> {
        match self {
            Contribution::Unnamed | Contribution::Empty => None,
            Contribution::ExternalName(target) => below.is_empty().then(|| {
                let owner = zone.under(key, &[]);
                owner
                    .map(|o| {
                        Record::from_rdata(o, zone.ttl, RData::CNAME(CNAME((**target).clone())))
                    })
                    .into_iter()
                    .collect()
            }),
            Contribution::ClusterIp(view) => {
                let srvs = cluster_srvs(zone.len, key, view);
                match below {
                    [] => {
                        let owner = zone.under(key, &[])?;
                        Some(
                            distinct(&view.cluster_ips)
                                .map(|ip| ip_record(owner.clone(), zone.ttl, *ip))
                                .collect(),
                        )
                    }
                    [proto] => {
                        let mut srvs = srvs;
                        srvs.any(|(_, p, _)| p.is(proto)).then(Vec::new)
                    }
                    [port_label, proto] => {
                        let target = zone.under(key, &[])?;
                        let mut out: Vec<Record> = Vec::new();
                        for (pn, p, port) in srvs {
                            if !p.is(proto) || !is_port_label(port_label, pn) {
                                continue;
                            }
                            let owner = zone.under(key, &[&format!("_{pn}"), p.label()])?;
                            let r = Record::from_rdata(
                                owner,
                                zone.ttl,
                                RData::SRV(SRV::new(0, 100, port, target.clone())),
                            );
                            if !out.contains(&r) {
                                out.push(r);
                            }
                        }
                        (!out.is_empty()).then_some(out)
                    }
                    _ => None,
                }
            }
            Contribution::Headless(h) => match below {
                [] => {
                    let owner = zone.under(key, &[])?;
                    Some(
                        h.endpoints
                            .iter()
                            .map(|e| ip_record(owner.clone(), zone.ttl, e.ip))
                            .collect(),
                    )
                }
                [label] => {
                    let mut dashed_ip = None;
                    let mut out = Vec::new();
                    for e in h.endpoints.iter().filter(|e| e.named) {
                        let hit = match &e.host {
                            Some(host) => host.as_bytes().eq_ignore_ascii_case(label),
                            None => *dashed_ip.get_or_insert_with(|| undashed(label)) == Some(e.ip),
                        };
                        if hit {
                            out.push(ip_record(zone.under(key, &[&e.label()])?, zone.ttl, e.ip));
                        }
                    }
                    if out.is_empty() && !h.srvs.iter().any(|s| s.proto.is(label)) {
                        return None;
                    }
                    Some(out)
                }
                [port_label, proto] => {
                    let mut seen: HashSet<(u16, String)> = HashSet::new();
                    let mut out = Vec::new();
                    for s in h.srvs.iter() {
                        if !s.proto.is(proto) || !is_port_label(port_label, &s.port_name) {
                            continue;
                        }
                        let e = &h.endpoints[s.endpoint as usize];
                        let label = e.label();
                        if !seen.insert((s.port, label.to_ascii_lowercase())) {
                            continue;
                        }
                        let owner =
                            zone.under(key, &[&format!("_{}", s.port_name), s.proto.label()])?;
                        let target = zone.under(key, &[&label])?;
                        out.push(Record::from_rdata(
                            owner,
                            zone.ttl,
                            RData::SRV(SRV::new(0, 100, s.port, target)),
                        ));
                    }
                    (!out.is_empty()).then_some(out)
                }
                _ => None,
            },
        }
    }

    /// Every record it adds (for tests: the index's contents as one
    /// table). Mirrors [`Contribution::lookup`].
    #[cfg(test)]
    fn records(&self, zone: &Zone, key: &ObjectKey) -> Vec<Record> {
        let mut out = Vec::new();
        let ttl = zone.ttl;
        match self {
            Contribution::Unnamed | Contribution::Empty => {}
            Contribution::ExternalName(_) => out.extend(self.lookup(zone, key, &[]).unwrap()),
            Contribution::ClusterIp(view) => {
                let svc = zone.under(key, &[]).unwrap();
                for ip in distinct(&view.cluster_ips) {
                    out.push(ip_record(svc.clone(), ttl, *ip));
                    if is_kube_dns(key) {
                        out.push(ip_record(ns_name_of(zone.name), ttl, *ip));
                    }
                }
                for (pn, proto, port) in cluster_srvs(zone.len, key, view) {
                    let owner = zone
                        .under(key, &[&format!("_{pn}"), proto.label()])
                        .unwrap();
                    out.push(Record::from_rdata(
                        owner,
                        ttl,
                        RData::SRV(SRV::new(0, 100, port, svc.clone())),
                    ));
                }
            }
            Contribution::Headless(h) => {
                let svc = zone.under(key, &[]).unwrap();
                for e in h.endpoints.iter() {
                    out.push(ip_record(svc.clone(), ttl, e.ip));
                    if e.named {
                        out.push(ip_record(
                            zone.under(key, &[&e.label()]).unwrap(),
                            ttl,
                            e.ip,
                        ));
                    }
                }
                for s in h.srvs.iter() {
                    let e = &h.endpoints[s.endpoint as usize];
                    let owner = zone
                        .under(key, &[&format!("_{}", s.port_name), s.proto.label()])
                        .unwrap();
                    let target = zone.under(key, &[&e.label()]).unwrap();
                    out.push(Record::from_rdata(
                        owner,
                        ttl,
                        RData::SRV(SRV::new(0, 100, s.port, target)),
                    ));
                }
            }
        }
        out
    }
}

// ---- the index ---------------------------------------------------------------

/// A PTR target: a Service, and the endpoint's hostname for a headless
/// one (`None`: see [`Contribution::ptrs`]).
#[derive(Clone, Debug)]
struct PtrTarget {
    key: ObjectKey,
    host: Option<Arc<str>>,
}

/// The PTR targets of one address, one per Service, sorted by Service.
#[derive(Debug)]
enum Ptrs {
    One(PtrTarget),
    Many(Vec<PtrTarget>),
}

impl Ptrs {
    fn as_slice(&self) -> &[PtrTarget] {
        match self {
            Ptrs::One(t) => std::slice::from_ref(t),
            Ptrs::Many(v) => v,
        }
    }
}

/// A namespace label under `svc.<zone>` (case-folded): it exists while a
/// Namespace object or a Service is in it.
#[derive(Debug, Default)]
struct Namespace {
    /// Namespace objects spelled this way (one, unless spellings differ
    /// in case).
    objects: Vec<Arc<str>>,
    /// Services in it (named or not).
    services: u32,
}

impl Namespace {
    fn exists(&self) -> bool {
        !self.objects.is_empty() || self.services > 0
    }
}

/// The new Contributions of the Services a [`Dirty`] names, and its
/// namespace changes: computed from a [`Cache`] without the index (so a
/// server can do it before it locks), applied by [`Index::commit`].
#[derive(Debug, Default)]
pub struct Delta {
    services: Vec<(ObjectKey, Option<Contribution>)>,
    namespaces: Vec<(Arc<str>, bool)>,
}

impl Delta {
    /// The Contributions of `dirty`'s Services as `cache` has them now.
    pub fn new(cfg: &IndexConfig, cache: &Cache, dirty: &Dirty) -> Delta {
        Delta::compute(&normalized(&cfg.zone), cache, dirty)
    }

    fn compute(zone: &Name, cache: &Cache, dirty: &Dirty) -> Delta {
        let services = dirty
            .services
            .iter()
            .map(|key| match cache.service_entry(key) {
                Some((key, view)) => {
                    let c = contribution(zone, key, view, &cache.slices_of(key));
                    (key.clone(), c)
                }
                None => (key.clone(), None),
            })
            .collect();
        Delta {
            services,
            namespaces: dirty.namespaces.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.namespaces.is_empty()
    }
}

/// What [`Index::commit`] did. Holds the replaced Contributions: drop it
/// after releasing the index's lock, so freeing them costs no query time.
#[derive(Debug, Default)]
pub struct Applied {
    /// The zone changed (and the SOA serial went up).
    pub changed: bool,
    _replaced: Vec<Contribution>,
}

/// The cluster zone (see the module documentation).
#[derive(Debug)]
pub struct Index {
    zone: Name,
    /// Wire length of `zone`.
    zone_len: usize,
    /// Labels of `zone`.
    zone_labels: usize,
    ttl: u32,
    pod_records: bool,
    serial: u32,
    soa: Record,
    /// Every Service with a part in the zone (its namespace a valid label),
    /// by its exact key.
    services: HashMap<ObjectKey, Contribution>,
    /// Keys of Services spelled with upper-case ASCII, by their case-folded
    /// key (names compare case-insensitively). Empty when names are
    /// validated, as the API server does.
    folded: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// `<ns>.svc.<zone>` by case-folded namespace.
    namespaces: HashMap<Arc<str>, Namespace>,
    /// Reverse map for PTR: address → the Services whose names point to it.
    ptr: HashMap<IpAddr, Ptrs>,
    /// The `pod` label after the namespace, for pod-record lookups.
    pod_label_depth: usize,
    stats: IndexStats,
}

fn normalized(zone: &Name) -> Name {
    let mut zone = zone.to_lowercase();
    zone.set_fqdn(true);
    zone
}

/// Names and records that always exist: apex (SOA, NS), `dns-version`
/// (TXT), `dns`, `ns.dns`, `svc`, and `pod` with pod records.
fn static_stats(pod_records: bool) -> IndexStats {
    IndexStats {
        services: 0,
        names: 5 + pod_records as usize,
        records: 3,
        ptr_addresses: 0,
    }
}

impl Index {
    /// The empty zone (apex, `dns-version`, `svc`, `ns.dns`, `pod`) with
    /// SOA serial `serial`.
    pub fn new(cfg: &IndexConfig, serial: u32) -> Index {
        let zone = normalized(&cfg.zone);
        Index {
            zone_len: encoded_len(&zone),
            zone_labels: zone.iter().count(),
            ttl: cfg.ttl,
            pod_records: cfg.pod_records,
            serial,
            soa: soa_record(&zone, cfg.ttl, serial),
            services: HashMap::new(),
            folded: HashMap::new(),
            namespaces: HashMap::new(),
            ptr: HashMap::new(),
            pod_label_depth: zone.num_labels() as usize + 1,
            stats: static_stats(cfg.pod_records),
            zone,
        }
    }

    /// Build the zone from snapshots of the caches. `namespaces` are names of
    /// namespaces known to exist (each Service's namespace is added too);
    /// `serial` becomes the SOA serial. The same rule as [`Index::apply`]:
    /// the objects go through a [`Cache`] of their views.
    pub fn build<'a>(
        cfg: &IndexConfig,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        namespaces: impl IntoIterator<Item = &'a str>,
        serial: u32,
    ) -> Index {
        let mut cache = Cache::new();
        for s in services {
            cache.apply_service(s);
        }
        for s in slices {
            cache.apply_slice(s);
        }
        for n in namespaces {
            cache.apply_namespace(n);
        }
        let dirty = cache.take_dirty();
        let mut index = Index::new(cfg, serial);
        index.apply(&cache, &dirty);
        index.set_serial(serial);
        index
    }

    /// Bring the zone up to date with the Services and namespaces `dirty`
    /// names, as `cache` has them now; everything else is left alone.
    /// Returns whether the zone changed (then the SOA serial went up).
    pub fn apply(&mut self, cache: &Cache, dirty: &Dirty) -> bool {
        let delta = Delta::compute(&self.zone, cache, dirty);
        self.commit(delta).changed
    }

    /// Apply a [`Delta`] (computed from the same [`IndexConfig`]). Costs
    /// hash-map operations per Contribution replaced: nothing is rendered.
    pub fn commit(&mut self, delta: Delta) -> Applied {
        let mut applied = Applied::default();
        for (key, new) in delta.services {
            match (self.services.remove_entry(&key), new) {
                (None, None) => {}
                (Some((key, old)), Some(new)) if old.same_records(&new) => {
                    // Hold the cache's current view, drop the old one.
                    self.services.insert(key, new);
                    applied._replaced.push(old);
                }
                (old, new) => {
                    applied.changed = true;
                    if let Some((key, old)) = old {
                        self.unlink(&key, &old);
                        applied._replaced.push(old);
                    }
                    if let Some(new) = new {
                        self.link(&key, &new);
                        self.services.insert(key, new);
                    }
                }
            }
        }
        for (ns, exists) in delta.namespaces {
            applied.changed |= self.set_namespace(&ns, exists);
        }
        if applied.changed {
            self.set_serial(self.serial.wrapping_add(1));
        }
        self.stats.ptr_addresses = self.ptr.len();
        applied
    }

    /// Set the SOA serial.
    pub fn set_serial(&mut self, serial: u32) {
        self.serial = serial;
        self.soa = soa_record(&self.zone, self.ttl, serial);
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Account for a Contribution entering the zone.
    fn link(&mut self, key: &ObjectKey, c: &Contribution) {
        let ns = self.namespaces.entry(folded(&key.namespace)).or_default();
        if !ns.exists() {
            self.stats.names += 1;
        }
        ns.services += 1;
        if has_upper(key) {
            let keys = self
                .folded
                .entry(ObjectKey::new(folded(&key.namespace), folded(&key.name)))
                .or_default();
            if let Err(i) = keys.binary_search(key) {
                keys.insert(i, key.clone());
            }
        }
        if !matches!(c, Contribution::Unnamed) {
            self.stats.services += 1;
        }
        self.stats.add(c.sizes(self.zone_len, key));
        for (ip, host) in c.ptrs() {
            let t = PtrTarget {
                key: key.clone(),
                host,
            };
            match self.ptr.entry(ip) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Ptrs::One(t));
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let mut v = match std::mem::replace(o.get_mut(), Ptrs::Many(Vec::new())) {
                        Ptrs::One(one) => vec![one],
                        Ptrs::Many(v) => v,
                    };
                    match v.binary_search_by(|x| x.key.cmp(key)) {
                        Ok(i) => v[i] = t,
                        Err(i) => v.insert(i, t),
                    }
                    *o.get_mut() = Ptrs::Many(v);
                }
            }
        }
    }

    /// Account for a Contribution leaving the zone (the reverse of
    /// [`Index::link`]).
    fn unlink(&mut self, key: &ObjectKey, c: &Contribution) {
        let fns = folded(&key.namespace);
        if let Some(ns) = self.namespaces.get_mut(&fns) {
            ns.services -= 1;
            if !ns.exists() {
                self.namespaces.remove(&fns);
                self.stats.names -= 1;
            }
        }
        if has_upper(key) {
            let fkey = ObjectKey::new(fns, folded(&key.name));
            if let Some(keys) = self.folded.get_mut(&fkey) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.folded.remove(&fkey);
                }
            }
        }
        if !matches!(c, Contribution::Unnamed) {
            self.stats.services -= 1;
        }
        self.stats.sub(c.sizes(self.zone_len, key));
        for (ip, _) in c.ptrs() {
            let std::collections::hash_map::Entry::Occupied(mut o) = self.ptr.entry(ip) else {
                continue;
            };
            match o.get_mut() {
                Ptrs::One(t) if t.key == *key => {
                    o.remove();
                }
                Ptrs::One(_) => {}
                Ptrs::Many(v) => {
                    v.retain(|t| t.key != *key);
                    if v.len() == 1 {
                        let one = v.pop().expect("one left");
                        *o.get_mut() = Ptrs::One(one);
                    } else if v.is_empty() {
                        o.remove();
                    }
                }
            }
        }
    }

    /// A Namespace object appeared or went away; whether
    /// `<ns>.svc.<zone>`'s existence changed.
    fn set_namespace(&mut self, name: &Arc<str>, exists: bool) -> bool {
        if !fits(&[name.len(), 3], self.zone_len) {
            return false;
        }
        let key = folded(name);
        if exists {
            let ns = self.namespaces.entry(key).or_default();
            let appeared = !ns.exists();
            if !ns.objects.contains(name) {
                ns.objects.push(name.clone());
            }
            if appeared {
                self.stats.names += 1;
            }
            appeared
        } else {
            let Some(ns) = self.namespaces.get_mut(&key) else {
                return false;
            };
            ns.objects.retain(|o| o != name);
            if ns.exists() {
                return false;
            }
            self.namespaces.remove(&key);
            self.stats.names -= 1;
            true
        }
    }

    /// The zone this index is authoritative for.
    pub fn zone(&self) -> &Name {
        &self.zone
    }

    /// The zone's SOA record.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Sizes, for logs and metrics.
    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// Whether `name` is in the cluster zone.
    pub fn in_zone(&self, name: &Name) -> bool {
        self.zone.zone_of(name)
    }

    fn zone_ctx(&self) -> Zone<'_> {
        Zone {
            name: &self.zone,
            len: self.zone_len,
            ttl: self.ttl,
        }
    }

    /// Answer `qtype` at `qname` (case-insensitively).
    pub fn resolve(&self, qname: &Name, qtype: RecordType) -> Resolution {
        let mut out = ZoneAnswer::default();
        let mut name = qname.clone();
        name.set_fqdn(true);
        for _ in 0..MAX_CNAME_HOPS {
            match self.step(&name, qtype) {
                Step::Records(recs) if qtype == RecordType::ANY && !recs.is_empty() => {
                    // RFC 8482: not every record at the name (a headless
                    // Service's hundreds of addresses, an amplifier), but
                    // one synthesized HINFO saying why.
                    let mut hinfo = recs[0].clone();
                    hinfo.data = RData::HINFO(HINFO::new("RFC8482".into(), String::new()));
                    out.answers.push(hinfo);
                    return Resolution::Zone(out);
                }
                Step::Records(recs) => {
                    out.additionals = self.additionals_for(&recs);
                    out.answers.extend(recs);
                    return Resolution::Zone(out);
                }
                Step::NoData(soa) => {
                    out.authorities.push(soa);
                    return Resolution::Zone(out);
                }
                Step::NxDomain(soa) => {
                    out.rcode = ResponseCode::NXDomain;
                    out.authorities.push(soa);
                    return Resolution::Zone(out);
                }
                Step::Cname(rec, target) => {
                    out.answers.push(rec);
                    name = target;
                }
                Step::NotOurs => {
                    return if out.answers.is_empty() {
                        Resolution::Forward
                    } else {
                        Resolution::Alias {
                            answer: out,
                            target: name,
                        }
                    };
                }
            }
        }
        out.rcode = ResponseCode::ServFail;
        Resolution::Zone(out)
    }

    fn step(&self, name: &Name, qtype: RecordType) -> Step {
        if !self.zone.zone_of(name) {
            return self.reverse_step(name, qtype);
        }
        if let Some(recs) = self.lookup(name) {
            if qtype != RecordType::CNAME {
                if let Some(c) = recs.iter().find(|r| r.record_type() == RecordType::CNAME) {
                    let RData::CNAME(CNAME(target)) = &c.data else {
                        unreachable!("record type checked")
                    };
                    return Step::Cname(c.clone(), target.clone());
                }
            }
            let matching: Vec<Record> = recs
                .into_iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .collect();
            return if matching.is_empty() {
                Step::NoData(self.soa.clone())
            } else {
                Step::Records(matching)
            };
        }
        if self.pod_records {
            if let Some(step) = self.pod_step(name, qtype) {
                return step;
            }
        }
        Step::NxDomain(self.soa.clone())
    }

    /// The records at `name` (in the zone), or `None` when no such name
    /// exists (NXDOMAIN, pod records aside).
    fn lookup(&self, name: &Name) -> Option<Vec<Record>> {
        let depth = name.iter().count().checked_sub(self.zone_labels)?;
        if depth > MAX_DEPTH {
            return None;
        }
        // r[0] is the label just below the zone.
        let mut r: [&[u8]; MAX_DEPTH] = [&[]; MAX_DEPTH];
        for (i, label) in name.iter().take(depth).enumerate() {
            r[depth - 1 - i] = label;
        }
        let is = |label: &[u8], want: &str| label.eq_ignore_ascii_case(want.as_bytes());
        match depth {
            0 => Some(vec![
                self.soa.clone(),
                Record::from_rdata(
                    self.zone.clone(),
                    self.ttl,
                    RData::NS(NS(ns_name_of(&self.zone))),
                ),
            ]),
            1 if is(r[0], "dns-version") => Some(vec![Record::from_rdata(
                name_under(&["dns-version"], &self.zone)?,
                self.ttl,
                RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
            )]),
            1 if is(r[0], "dns") || is(r[0], "svc") || (self.pod_records && is(r[0], "pod")) => {
                Some(Vec::new())
            }
            2 if is(r[0], "dns") && is(r[1], "ns") => Some(self.name_server_addresses()),
            2 if is(r[0], "svc") => {
                let mut buf = [0u8; 63];
                let ns = fold(r[1], &mut buf)?;
                self.namespaces.get(ns).map(|_| Vec::new())
            }
            3..=MAX_DEPTH if is(r[0], "svc") => {
                // The labels below the Service's name, leftmost first.
                let mut below: [&[u8]; MAX_DEPTH - 3] = [&[]; MAX_DEPTH - 3];
                for (i, b) in below.iter_mut().take(depth - 3).enumerate() {
                    *b = r[depth - 1 - i];
                }
                self.lookup_service(r[1], r[2], &below[..depth - 3])
            }
            _ => None,
        }
    }

    /// `ns.dns.<zone>`'s addresses: kube-system/kube-dns's ClusterIPs.
    fn name_server_addresses(&self) -> Vec<Record> {
        match self
            .services
            .get(&("kube-system", "kube-dns") as &dyn KeyRef)
        {
            Some(Contribution::ClusterIp(view)) => distinct(&view.cluster_ips)
                .map(|ip| ip_record(ns_name_of(&self.zone), self.ttl, *ip))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A name at or below `<svc>.<ns>.svc.<zone>`.
    fn lookup_service(&self, ns: &[u8], svc: &[u8], below: &[&[u8]]) -> Option<Vec<Record>> {
        let (mut b1, mut b2) = ([0u8; 63], [0u8; 63]);
        let key = (fold(ns, &mut b1)?, fold(svc, &mut b2)?);
        let zone = self.zone_ctx();
        let main = self.services.get_key_value(&key as &dyn KeyRef);
        let mut out = main.and_then(|(k, c)| c.lookup(&zone, k, below));
        if self.folded.is_empty() {
            return out;
        }
        // Services spelled with upper case: merge, as one table would.
        for k in self.folded.get(&key as &dyn KeyRef).into_iter().flatten() {
            let Some(recs) = self.services.get(k).and_then(|c| c.lookup(&zone, k, below)) else {
                continue;
            };
            let o = out.get_or_insert_with(Vec::new);
            for r in recs {
                if !o.contains(&r) {
                    o.push(r);
                }
            }
        }
        out
    }

    /// `<ip>.<ns>.pod.<zone>` and `<ns>.pod.<zone>`.
    fn pod_step(&self, name: &Name, qtype: RecordType) -> Option<Step> {
        let labels: Vec<&[u8]> = name.iter().collect();
        let depth = labels.len();
        // labels[depth - pod_label_depth] must be "pod".
        if depth < self.pod_label_depth + 1 || depth > self.pod_label_depth + 2 {
            return None;
        }
        if !labels[depth - self.pod_label_depth].eq_ignore_ascii_case(b"pod") {
            return None;
        }
        if depth == self.pod_label_depth + 1 {
            // <ns>.pod.<zone>: exists (pod names below it are computed).
            return Some(Step::NoData(self.soa.clone()));
        }
        let label = std::str::from_utf8(labels[0]).ok()?;
        let ip: IpAddr = if label.contains('.') || label.contains(':') {
            return None;
        } else if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
            IpAddr::V4(v4)
        } else if let Ok(v6) = label.replace('-', ":").parse::<Ipv6Addr>() {
            IpAddr::V6(v6)
        } else {
            return None;
        };
        let rec = ip_record(name.clone(), self.ttl, ip);
        Some(if qtype == RecordType::ANY || qtype == rec.record_type() {
            Step::Records(vec![rec])
        } else {
            Step::NoData(self.soa.clone())
        })
    }

    /// The names `ip`'s PTR points to (none: not ours), sorted by Service.
    fn ptr_names(&self, ip: &IpAddr) -> Vec<Name> {
        let zone = self.zone_ctx();
        let mut out: Vec<Name> = Vec::new();
        for t in self.ptr.get(ip).map(Ptrs::as_slice).unwrap_or(&[]) {
            let name = match (&t.host, self.services.get(&t.key)) {
                (Some(host), _) => zone.under(&t.key, &[host]),
                (None, Some(Contribution::Headless(_))) => zone.under(&t.key, &[&dashed(ip)]),
                (None, _) => zone.under(&t.key, &[]),
            };
            if let Some(n) = name {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// PTR for known addresses; other reverse names (and everything else
    /// outside the zone) are not ours.
    fn reverse_step(&self, name: &Name, qtype: RecordType) -> Step {
        let Ok(net) = name.parse_arpa_name() else {
            return Step::NotOurs;
        };
        if net.prefix_len() != net.max_prefix_len() {
            return Step::NotOurs;
        }
        let ip = net.addr();
        if !self.ptr.contains_key(&ip) {
            return Step::NotOurs;
        }
        // Only the canonical reverse name of the address is ours:
        // `parse_arpa_name` also accepts spellings such as
        // `020.0.96.10.in-addr.arpa.` or `+20.0.96.10.in-addr.arpa.`, which
        // are other names (CoreDNS does not answer them either).
        let mut canonical = Name::from(ip);
        canonical.set_fqdn(true);
        let mut asked = name.clone();
        asked.set_fqdn(true);
        if canonical != asked {
            return Step::NotOurs;
        }
        if qtype == RecordType::PTR || qtype == RecordType::ANY {
            let owner = asked;
            Step::Records(
                self.ptr_names(&ip)
                    .into_iter()
                    .map(|t| Record::from_rdata(owner.clone(), self.ttl, RData::PTR(PTR(t))))
                    .collect(),
            )
        } else {
            let apex = if ip.is_ipv4() { "in-addr" } else { "ip6" };
            let apex = Name::from_labels([apex.as_bytes(), b"arpa"]).expect("static name");
            let mut soa = self.soa.clone();
            soa.name = apex;
            Step::NoData(soa)
        }
    }

    /// Addresses of SRV targets and of the NS.
    fn additionals_for(&self, answers: &[Record]) -> Vec<Record> {
        let mut seen: HashSet<&Name> = HashSet::new();
        let mut out = Vec::new();
        for r in answers {
            let target = match &r.data {
                RData::SRV(srv) => &srv.target,
                RData::NS(NS(n)) => n,
                _ => continue,
            };
            if !seen.insert(target) || !self.zone.zone_of(target) {
                continue;
            }
            if let Some(recs) = self.lookup(target) {
                out.extend(
                    recs.into_iter()
                        .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA)),
                );
            }
        }
        out
    }
}

fn ns_name_of(zone: &Name) -> Name {
    name_under(&["ns", "dns"], zone).expect("static name")
}

/// The zone's SOA (CoreDNS's shape: `ns.dns.<zone>`, `hostmaster.<zone>`).
fn soa_record(zone: &Name, ttl: u32, serial: u32) -> Record {
    let mut r = Record::from_rdata(
        zone.clone(),
        ttl,
        RData::SOA(SOA::new(
            ns_name_of(zone),
            name_under(&["hostmaster"], zone).expect("static name"),
            serial,
            7200,
            1800,
            86400,
            ttl,
        )),
    );
    r.dns_class = DNSClass::IN;
    r
}

/// The previous implementation's zone (one table of every record, built
/// from whole API objects), kept as the reference the index is checked
/// against.
#[cfg(test)]
pub(crate) mod legacy {
    use super::*;
    use crate::proxy::tracker::SERVICE_NAME_LABEL;

    /// Every name with its records, and the PTR targets per address.
    pub struct Table {
        pub names: HashMap<Name, Vec<Record>>,
        pub ptr: HashMap<IpAddr, Vec<Name>>,
        pub services: usize,
    }

    fn proto_label(protocol: Option<&str>) -> &'static str {
        match protocol.unwrap_or("TCP") {
            "UDP" => "_udp",
            "SCTP" => "_sctp",
            _ => "_tcp",
        }
    }

    /// The Service's ClusterIPs (both families), or none.
    fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
        let Some(spec) = &svc.spec else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|i| i.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
        };
        ips.dedup();
        ips
    }

    enum Kind {
        ClusterIp(Vec<IpAddr>),
        Headless,
        ExternalName(Name),
        Skip,
    }

    fn kind(svc: &Service) -> Kind {
        let Some(spec) = &svc.spec else {
            return Kind::Skip;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return match spec
                .external_name
                .as_deref()
                .map(|n| n.trim_end_matches('.'))
                .filter(|n| !n.is_empty())
                .and_then(|n| Name::from_ascii(n).ok())
            {
                Some(mut n) => {
                    n.set_fqdn(true);
                    Kind::ExternalName(n)
                }
                None => Kind::Skip,
            };
        }
        match spec.cluster_ip.as_deref() {
            Some("None") => Kind::Headless,
            _ => {
                let ips = cluster_ips(svc);
                if ips.is_empty() {
                    Kind::Skip
                } else {
                    Kind::ClusterIp(ips)
                }
            }
        }
    }

    /// Accumulates names while building (keeps the "every ancestor exists"
    /// invariant).
    pub struct Builder<'z> {
        pub zone: &'z Name,
        pub names: HashMap<Name, Vec<Record>>,
        pub ptr: HashMap<IpAddr, Vec<Name>>,
    }

    impl Builder<'_> {
        /// Make `name` and all its ancestors up to the zone exist.
        pub fn touch(&mut self, name: &Name) {
            let mut n = name.clone();
            loop {
                if self.names.contains_key(&n) {
                    return;
                }
                self.names.insert(n.clone(), Vec::new());
                if n.num_labels() <= self.zone.num_labels() {
                    return;
                }
                n = n.base_name();
            }
        }

        pub fn add(&mut self, record: Record) {
            self.touch(&record.name);
            let recs = self.names.get_mut(&record.name).expect("touched");
            if !recs.contains(&record) {
                recs.push(record);
            }
        }

        pub fn add_ptr(&mut self, ip: IpAddr, target: &Name) {
            let targets = self.ptr.entry(ip).or_default();
            if !targets.contains(target) {
                targets.push(target.clone());
            }
        }
    }

    /// The old `Index::build`, returning its table.
    pub fn table<'a>(
        cfg: &IndexConfig,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        namespaces: impl IntoIterator<Item = &'a str>,
        serial: u32,
    ) -> Table {
        let mut zone = cfg.zone.to_lowercase();
        zone.set_fqdn(true);
        let ttl = cfg.ttl;
        let soa = soa_record(&zone, ttl, serial);
        let mut b = Builder {
            zone: &zone,
            names: HashMap::new(),
            ptr: HashMap::new(),
        };

        // Apex, version, name server.
        let ns_name = name_under(&["ns", "dns"], &zone).expect("static name");
        b.add(soa.clone());
        b.add(Record::from_rdata(
            zone.clone(),
            ttl,
            RData::NS(NS(ns_name.clone())),
        ));
        b.touch(&ns_name);
        let version = name_under(&["dns-version"], &zone).expect("static name");
        b.add(Record::from_rdata(
            version,
            ttl,
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
        ));
        let svc_root = name_under(&["svc"], &zone).expect("static name");
        b.touch(&svc_root);
        if cfg.pod_records {
            b.touch(&name_under(&["pod"], &zone).expect("static name"));
        }
        for ns in namespaces {
            if let Some(n) = name_under(&[ns, "svc"], &zone) {
                b.touch(&n);
            }
        }

        // Slices by (namespace, service).
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in slices {
            let ns = s.metadata.namespace.as_deref().unwrap_or("");
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                by_service.entry((ns, svc.as_str())).or_default().push(s);
            }
        }

        let mut services_count = 0;
        for svc in services {
            let (Some(ns), Some(name)) = (
                svc.metadata.namespace.as_deref(),
                svc.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let Some(ns_name) = name_under(&[ns, "svc"], &zone) else {
                continue;
            };
            b.touch(&ns_name);
            let Some(svc_name) = name_under(&[name, ns, "svc"], &zone) else {
                continue;
            };
            services_count += 1;
            let spec = svc.spec.as_ref();
            match kind(svc) {
                Kind::Skip => {}
                Kind::ExternalName(target) => {
                    b.add(Record::from_rdata(
                        svc_name,
                        ttl,
                        RData::CNAME(CNAME(target)),
                    ));
                }
                Kind::ClusterIp(ips) => {
                    for ip in &ips {
                        b.add(ip_record(svc_name.clone(), ttl, *ip));
                        b.add_ptr(*ip, &svc_name);
                    }
                    if ns == "kube-system" && name == "kube-dns" {
                        for ip in &ips {
                            b.add(ip_record(ns_name_of(&zone), ttl, *ip));
                        }
                    }
                    for port in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten() {
                        let Some(pname) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                            continue;
                        };
                        let Ok(p) = u16::try_from(port.port) else {
                            continue;
                        };
                        let Some(srv_name) = name_under(
                            &[
                                &format!("_{pname}"),
                                proto_label(port.protocol.as_deref()),
                                name,
                                ns,
                                "svc",
                            ],
                            &zone,
                        ) else {
                            continue;
                        };
                        b.add(Record::from_rdata(
                            srv_name,
                            ttl,
                            RData::SRV(SRV::new(0, 100, p, svc_name.clone())),
                        ));
                    }
                }
                Kind::Headless => {
                    let publish_all = spec
                        .and_then(|s| s.publish_not_ready_addresses)
                        .unwrap_or(false);
                    let slices = by_service
                        .get(&(ns, name))
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    // address → endpoint name label (hostname wins).
                    let mut endpoints: BTreeMap<IpAddr, String> = BTreeMap::new();
                    // (port name, proto, port, endpoint address)
                    let mut srvs: BTreeSet<(&str, &'static str, u16, IpAddr)> = BTreeSet::new();
                    for slice in slices {
                        for ep in &slice.endpoints {
                            let ready =
                                ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                            if !ready && !publish_all {
                                continue;
                            }
                            for addr in &ep.addresses {
                                let Ok(ip) = addr.parse::<IpAddr>() else {
                                    continue;
                                };
                                let label = ep
                                    .hostname
                                    .clone()
                                    .filter(|h| !h.is_empty())
                                    .unwrap_or_else(|| dashed(&ip));
                                let e = endpoints.entry(ip).or_insert_with(|| label.clone());
                                if ep.hostname.as_deref().is_some_and(|h| !h.is_empty()) {
                                    *e = label;
                                }
                                for sp in slice.ports.iter().flatten() {
                                    let (Some(pn), Some(port)) =
                                        (sp.name.as_deref().filter(|n| !n.is_empty()), sp.port)
                                    else {
                                        continue;
                                    };
                                    let Ok(port) = u16::try_from(port) else {
                                        continue;
                                    };
                                    srvs.insert((
                                        pn,
                                        proto_label(sp.protocol.as_deref()),
                                        port,
                                        ip,
                                    ));
                                }
                            }
                        }
                    }
                    let mut ep_names: HashMap<IpAddr, Name> = HashMap::new();
                    for (ip, label) in &endpoints {
                        b.add(ip_record(svc_name.clone(), ttl, *ip));
                        if let Some(ep_name) = name_under(&[label, name, ns, "svc"], &zone) {
                            b.add(ip_record(ep_name.clone(), ttl, *ip));
                            b.add_ptr(*ip, &ep_name);
                            ep_names.insert(*ip, ep_name);
                        }
                    }
                    for (pn, proto, port, ip) in srvs {
                        let Some(target) = ep_names.get(&ip) else {
                            continue;
                        };
                        let Some(srv_name) =
                            name_under(&[&format!("_{pn}"), proto, name, ns, "svc"], &zone)
                        else {
                            continue;
                        };
                        b.add(Record::from_rdata(
                            srv_name,
                            ttl,
                            RData::SRV(SRV::new(0, 100, port, target.clone())),
                        ));
                    }
                }
            }
        }
        let Builder { names, ptr, .. } = b;
        Table {
            names,
            ptr,
            services: services_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }
    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn fixture(pods: bool) -> Index {
        let services = vec![
            svc(json!({"metadata":{"name":"web","namespace":"default"},
                "spec":{"clusterIP":"10.96.0.20","clusterIPs":["10.96.0.20","fd00::20"],
                  "ports":[{"name":"http","port":80,"protocol":"TCP"},
                           {"name":"dns","port":53,"protocol":"UDP"},
                           {"port":9999}]}})),
            svc(json!({"metadata":{"name":"db","namespace":"default"},
                "spec":{"clusterIP":"None","ports":[{"name":"pg","port":5432}]}})),
            svc(json!({"metadata":{"name":"empty","namespace":"default"},
                "spec":{"clusterIP":"None"}})),
            svc(json!({"metadata":{"name":"ext","namespace":"default"},
                "spec":{"type":"ExternalName","externalName":"example.com"}})),
            svc(json!({"metadata":{"name":"inner","namespace":"default"},
                "spec":{"type":"ExternalName","externalName":"web.default.svc.cluster.local."}})),
            svc(
                json!({"metadata":{"name":"kube-dns","namespace":"kube-system"},
                "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"dns","port":53,"protocol":"UDP"}]}}),
            ),
        ];
        let slices = vec![
            slice(json!({"metadata":{"name":"db-1","namespace":"default",
                    "labels":{"kubernetes.io/service-name":"db"}},
                "addressType":"IPv4","ports":[{"name":"pg","port":5433,"protocol":"TCP"}],
                "endpoints":[
                    {"addresses":["10.0.0.1"],"hostname":"db-0","conditions":{"ready":true}},
                    {"addresses":["10.0.0.2"]},
                    {"addresses":["10.0.0.3"],"conditions":{"ready":false}}]})),
            slice(json!({"metadata":{"name":"empty-1","namespace":"default",
                    "labels":{"kubernetes.io/service-name":"empty"}},
                "addressType":"IPv4","ports":[],
                "endpoints":[{"addresses":["10.0.0.9"],"conditions":{"ready":false}}]})),
        ];
        Index::build(
            &IndexConfig {
                zone: n("cluster.local."),
                ttl: 5,
                pod_records: pods,
            },
            &services,
            &slices,
            ["default", "kube-system", "quiet"],
            42,
        )
    }

    fn zone(r: Resolution) -> ZoneAnswer {
        match r {
            Resolution::Zone(z) => z,
            other => panic!("not a zone answer: {other:?}"),
        }
    }

    fn data(z: &ZoneAnswer) -> Vec<String> {
        let mut v: Vec<String> = z.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn cluster_ip_a_aaaa_srv_ptr() {
        let ix = fixture(true);
        let a = zone(ix.resolve(&n("WEB.Default.svc.cluster.local."), RecordType::A));
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(data(&a), vec!["10.96.0.20"]);
        assert_eq!(a.answers[0].ttl, 5);
        let aaaa = zone(ix.resolve(&n("web.default.svc.cluster.local."), RecordType::AAAA));
        assert_eq!(data(&aaaa), vec!["fd00::20"]);
        let srv = zone(ix.resolve(
            &n("_http._tcp.web.default.svc.cluster.local."),
            RecordType::SRV,
        ));
        assert_eq!(data(&srv), vec!["0 100 80 web.default.svc.cluster.local."]);
        assert_eq!(srv.additionals.len(), 2, "A and AAAA of the target");
        let udp = zone(ix.resolve(
            &n("_dns._udp.web.default.svc.cluster.local."),
            RecordType::SRV,
        ));
        assert_eq!(data(&udp), vec!["0 100 53 web.default.svc.cluster.local."]);
        // Wrong protocol: no such name.
        let wrong = zone(ix.resolve(
            &n("_dns._tcp.web.default.svc.cluster.local."),
            RecordType::SRV,
        ));
        assert_eq!(wrong.rcode, ResponseCode::NXDomain);
        // _tcp.web... is an empty non-terminal.
        let ent = zone(ix.resolve(&n("_tcp.web.default.svc.cluster.local."), RecordType::SRV));
        assert_eq!(ent.rcode, ResponseCode::NoError);
        assert!(ent.answers.is_empty());
        assert_eq!(ent.authorities[0].record_type(), RecordType::SOA);
        let ptr = zone(ix.resolve(&n("20.0.96.10.in-addr.arpa."), RecordType::PTR));
        assert_eq!(data(&ptr), vec!["web.default.svc.cluster.local."]);
        let ptr6 = zone(ix.resolve(
            &Name::from(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 0x20u16])),
            RecordType::PTR,
        ));
        assert_eq!(data(&ptr6), vec!["web.default.svc.cluster.local."]);
        // A on a reverse name we know: NODATA with the reverse apex SOA.
        let nodata = zone(ix.resolve(&n("20.0.96.10.in-addr.arpa."), RecordType::A));
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities[0].name, n("in-addr.arpa."));
        // Unknown reverse names are forwarded, and so are non-canonical
        // spellings of known addresses.
        for other in [
            "020.0.96.10.in-addr.arpa.",
            "+20.0.96.10.in-addr.arpa.",
            "20.00.96.10.in-addr.arpa.",
        ] {
            let raw = Name::from_labels(other.trim_end_matches('.').split('.').map(str::as_bytes))
                .unwrap();
            assert_eq!(
                ix.resolve(&raw, RecordType::PTR),
                Resolution::Forward,
                "{other}"
            );
        }
        // Case does not matter.
        let upper = zone(ix.resolve(&n("20.0.96.10.IN-ADDR.ARPA."), RecordType::PTR));
        assert_eq!(data(&upper), vec!["web.default.svc.cluster.local."]);
        assert_eq!(
            ix.resolve(&n("1.1.168.192.in-addr.arpa."), RecordType::PTR),
            Resolution::Forward
        );
        assert_eq!(
            ix.resolve(&n("96.10.in-addr.arpa."), RecordType::PTR),
            Resolution::Forward
        );
    }

    #[test]
    fn headless_ready_endpoints_hostnames_srv() {
        let ix = fixture(true);
        let a = zone(ix.resolve(&n("db.default.svc.cluster.local."), RecordType::A));
        assert_eq!(data(&a), vec!["10.0.0.1", "10.0.0.2"], "not-ready excluded");
        let h = zone(ix.resolve(&n("db-0.db.default.svc.cluster.local."), RecordType::A));
        assert_eq!(data(&h), vec!["10.0.0.1"]);
        let d = zone(ix.resolve(&n("10-0-0-2.db.default.svc.cluster.local."), RecordType::A));
        assert_eq!(data(&d), vec!["10.0.0.2"]);
        let nr = zone(ix.resolve(&n("10-0-0-3.db.default.svc.cluster.local."), RecordType::A));
        assert_eq!(nr.rcode, ResponseCode::NXDomain);
        let srv = zone(ix.resolve(
            &n("_pg._tcp.db.default.svc.cluster.local."),
            RecordType::SRV,
        ));
        assert_eq!(
            data(&srv),
            vec![
                "0 100 5433 10-0-0-2.db.default.svc.cluster.local.",
                "0 100 5433 db-0.db.default.svc.cluster.local."
            ]
        );
        assert_eq!(srv.additionals.len(), 2);
        let ptr = zone(ix.resolve(&n("1.0.0.10.in-addr.arpa."), RecordType::PTR));
        assert_eq!(data(&ptr), vec!["db-0.db.default.svc.cluster.local."]);
        // No ready endpoint: NXDOMAIN.
        let e = zone(ix.resolve(&n("empty.default.svc.cluster.local."), RecordType::A));
        assert_eq!(e.rcode, ResponseCode::NXDomain);
        assert_eq!(e.authorities, vec![ix.soa().clone()]);
    }

    #[test]
    fn external_name_cname() {
        let ix = fixture(true);
        match ix.resolve(&n("ext.default.svc.cluster.local."), RecordType::A) {
            Resolution::Alias { answer, target } => {
                assert_eq!(target, n("example.com."));
                assert_eq!(data(&answer), vec!["example.com."]);
            }
            other => panic!("{other:?}"),
        }
        // Asking for the CNAME itself is answered here.
        let c = zone(ix.resolve(&n("ext.default.svc.cluster.local."), RecordType::CNAME));
        assert_eq!(data(&c), vec!["example.com."]);
        // An in-zone target is chased.
        let inner = zone(ix.resolve(&n("inner.default.svc.cluster.local."), RecordType::A));
        assert_eq!(
            data(&inner),
            vec!["10.96.0.20", "web.default.svc.cluster.local."]
        );
    }

    #[test]
    fn negative_answers_and_apex() {
        let ix = fixture(true);
        for (q, t, rcode) in [
            (
                "nope.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            (
                "example.com.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            (
                "example.com.svc.cluster.local.",
                RecordType::AAAA,
                ResponseCode::NXDomain,
            ),
            (
                "example.com.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            (
                "default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
            ),
            (
                "quiet.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
            ),
            (
                "absent.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            ("svc.cluster.local.", RecordType::A, ResponseCode::NoError),
            (
                "web.default.svc.cluster.local.",
                RecordType::TXT,
                ResponseCode::NoError,
            ),
            ("cluster.local.", RecordType::A, ResponseCode::NoError),
        ] {
            let z = zone(ix.resolve(&n(q), t));
            assert_eq!(z.rcode, rcode, "{q} {t}");
            assert!(z.answers.is_empty(), "{q}");
            assert_eq!(z.authorities, vec![ix.soa().clone()], "{q}");
        }
        let soa = zone(ix.resolve(&n("Cluster.Local."), RecordType::SOA));
        assert_eq!(soa.answers, vec![ix.soa().clone()]);
        let RData::SOA(s) = &ix.soa().data else {
            panic!()
        };
        assert_eq!((s.serial, s.minimum), (42, 5));
        let ns = zone(ix.resolve(&n("cluster.local."), RecordType::NS));
        assert_eq!(data(&ns), vec!["ns.dns.cluster.local."]);
        assert_eq!(ns.additionals.len(), 1, "kube-dns ClusterIP as glue");
        let txt = zone(ix.resolve(&n("dns-version.cluster.local."), RecordType::TXT));
        assert_eq!(data(&txt), vec!["1.1.0"]);
        assert_eq!(
            ix.resolve(&n("example.com."), RecordType::A),
            Resolution::Forward
        );
    }

    #[test]
    fn pod_records_switch() {
        let on = fixture(true);
        let a = zone(on.resolve(&n("10-1-2-3.anyns.pod.cluster.local."), RecordType::A));
        assert_eq!(data(&a), vec!["10.1.2.3"]);
        let v6 = zone(on.resolve(&n("fd00--5.default.pod.cluster.local."), RecordType::AAAA));
        assert_eq!(data(&v6), vec!["fd00::5"]);
        let nodata = zone(on.resolve(&n("10-1-2-3.x.pod.cluster.local."), RecordType::AAAA));
        assert_eq!(
            (nodata.rcode, nodata.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let bad = zone(on.resolve(&n("10-1-2.x.pod.cluster.local."), RecordType::A));
        assert_eq!(bad.rcode, ResponseCode::NXDomain);
        let off = fixture(false);
        let a = zone(off.resolve(&n("10-1-2-3.anyns.pod.cluster.local."), RecordType::A));
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let p = zone(off.resolve(&n("pod.cluster.local."), RecordType::A));
        assert_eq!(p.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn stats_count_services() {
        let ix = fixture(true);
        assert_eq!(ix.stats().services, 6);
        assert!(ix.stats().ptr_addresses >= 4);
    }
}

/// The incremental index against fresh builds and against the previous
/// implementation's record table.
#[cfg(test)]
mod incremental {
    use super::legacy::{self, Builder};
    use super::*;
    use crate::model::random::{self, World};
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn cfg(zone: &str, pod_records: bool) -> IndexConfig {
        IndexConfig {
            zone: n(zone),
            ttl: 5,
            pod_records,
        }
    }

    /// A zone so long (wire length 225) that some of the random objects'
    /// names exceed 255 bytes and others do not.
    fn long_zone() -> String {
        let zone = format!(
            "{}.{}.{}.{}.local.",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(25)
        );
        assert_eq!(encoded_len(&n(&zone)), 225);
        zone
    }

    /// A zone as text: every name (lower-cased) with its records, and every
    /// address with its PTR targets, sorted. The SOA is left out (its
    /// serial is checked on its own).
    #[derive(Debug, PartialEq, Eq)]
    struct Dump {
        names: BTreeMap<String, Vec<String>>,
        ptr: BTreeMap<IpAddr, Vec<String>>,
    }

    fn rec(r: &Record) -> String {
        format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data).to_ascii_lowercase()
    }

    fn recs(v: &[Record]) -> Vec<String> {
        let mut out: Vec<String> = v
            .iter()
            .filter(|r| r.record_type() != RecordType::SOA)
            .map(rec)
            .collect();
        out.sort();
        out
    }

    fn key(name: &Name) -> String {
        name.to_lowercase().to_ascii()
    }

    fn dump_of(names: &HashMap<Name, Vec<Record>>, ptr: BTreeMap<IpAddr, Vec<String>>) -> Dump {
        Dump {
            names: names.iter().map(|(k, v)| (key(k), recs(v))).collect(),
            ptr,
        }
    }

    fn legacy_dump(t: &legacy::Table) -> Dump {
        let ptr = t
            .ptr
            .iter()
            .map(|(ip, names)| {
                let mut v: Vec<String> = names
                    .iter()
                    .map(|n| n.to_ascii().to_ascii_lowercase())
                    .collect();
                v.sort();
                (*ip, v)
            })
            .collect();
        dump_of(&t.names, ptr)
    }

    /// The index's contents rendered as one table (every Contribution's
    /// records, the fixed names, the namespaces), and its names.
    fn table_of(ix: &Index) -> HashMap<Name, Vec<Record>> {
        let mut b = Builder {
            zone: &ix.zone,
            names: HashMap::new(),
            ptr: HashMap::new(),
        };
        b.add(ix.soa.clone());
        b.add(Record::from_rdata(
            ix.zone.clone(),
            ix.ttl,
            RData::NS(NS(ns_name_of(&ix.zone))),
        ));
        b.touch(&ns_name_of(&ix.zone));
        b.add(Record::from_rdata(
            name_under(&["dns-version"], &ix.zone).unwrap(),
            ix.ttl,
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
        ));
        b.touch(&name_under(&["svc"], &ix.zone).unwrap());
        if ix.pod_records {
            b.touch(&name_under(&["pod"], &ix.zone).unwrap());
        }
        for ns in ix.namespaces.keys() {
            b.touch(&name_under(&[ns, "svc"], &ix.zone).unwrap());
        }
        let zone = ix.zone_ctx();
        for (k, c) in &ix.services {
            for r in c.records(&zone, k) {
                b.add(r);
            }
        }
        b.names
    }

    fn dump(ix: &Index) -> Dump {
        let ptr = ix
            .ptr
            .keys()
            .map(|ip| {
                let mut v: Vec<String> = ix
                    .ptr_names(ip)
                    .iter()
                    .map(|n| n.to_ascii().to_ascii_lowercase())
                    .collect();
                v.sort();
                (*ip, v)
            })
            .collect();
        dump_of(&table_of(ix), ptr)
    }

    fn legacy_table(world: &World, cfg: &IndexConfig, serial: u32) -> legacy::Table {
        legacy::table(
            cfg,
            world.services.values(),
            world.slices.values(),
            world.namespaces.iter().map(String::as_str),
            serial,
        )
    }

    fn build(world: &World, cfg: &IndexConfig, serial: u32) -> Index {
        Index::build(
            cfg,
            world.services.values(),
            world.slices.values(),
            world.namespaces.iter().map(String::as_str),
            serial,
        )
    }

    /// Every name's records as [`Index::lookup`] answers them equal the
    /// rendered table, in any case; names just below existing ones that
    /// the table does not have do not exist. Returns the names asked.
    fn check_lookups(ix: &Index, table: &HashMap<Name, Vec<Record>>, what: &str) -> Vec<Name> {
        let mut asked = Vec::new();
        for (name, records) in table {
            let want = recs(records);
            let got = ix.lookup(name).map(|r| recs(&r));
            assert_eq!(got.as_ref(), Some(&want), "{what}: lookup {name}");
            let upper = n(&name.to_ascii().to_ascii_uppercase());
            assert_eq!(
                ix.lookup(&upper).map(|r| recs(&r)),
                Some(want),
                "{what}: {upper}"
            );
            asked.push(name.clone());
            for label in [
                "x",
                "_tcp",
                "_udp",
                "_sctp",
                "p0",
                "P0",
                "_http",
                "_dns",
                "10-244-0-1",
                "10-244-0-2",
                "svc",
                "kube-dns",
            ] {
                let Ok(child) = Name::from_labels([label.as_bytes()])
                    .unwrap()
                    .append_domain(name)
                else {
                    continue;
                };
                if !table.contains_key(&child) {
                    assert_eq!(ix.lookup(&child), None, "{what}: {child} must not exist");
                }
                asked.push(child);
            }
        }
        asked
    }

    const QTYPES: [RecordType; 9] = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::CNAME,
        RecordType::PTR,
        RecordType::TXT,
        RecordType::NS,
        RecordType::SOA,
        RecordType::ANY,
    ];

    /// Reverse names of every address the random objects use.
    fn reverse_names() -> Vec<Name> {
        let mut ips: Vec<IpAddr> = Vec::new();
        for i in 1..6 {
            ips.push(format!("10.96.0.{i}").parse().unwrap());
            ips.push(format!("10.244.0.{i}").parse().unwrap());
        }
        ips.push("fd00::1".parse().unwrap());
        ips.push("192.0.2.1".parse().unwrap());
        ips.into_iter().map(Name::from).collect()
    }

    /// Acceptance of the incremental DNS index: after any sequence of watch
    /// events (Services of every kind, slices, namespaces, deletes,
    /// re-creates, re-lists after missed deletes), at every sync point the
    /// index kept up to date with `apply` equals `Index::build` from the
    /// same objects — record for record, PTR for PTR, statistic for
    /// statistic and answer for answer — and both equal the previous
    /// implementation's table. The serial goes up whenever the zone
    /// changed. Run for `cluster.local.` (pod records on) and for a zone
    /// so long that some names do not fit (pod records off).
    #[test]
    fn incremental_index_equals_a_fresh_build() {
        let seed = random::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let long = long_zone();
        let cfgs = [cfg("cluster.local.", true), cfg(&long, false)];
        let mut indexes: Vec<Index> = cfgs.iter().map(|c| Index::new(c, 1)).collect();
        let mut dumps: Vec<Dump> = indexes.iter().map(dump).collect();
        let mut world = World::default();
        let mut cache = Cache::new();
        let (mut syncs, mut changes, mut max_names) = (0, 0, 0);
        let reverse = reverse_names();
        for step in 0..2000 {
            if rng.random_bool(0.01) {
                for _ in 0..rng.random_range(1..4) {
                    world.forget_one(&mut rng);
                }
                world.relist(&mut cache);
            } else {
                let e = random::event(&mut rng, &world);
                world.apply(&e, &mut cache);
            }
            if !rng.random_bool(0.2) {
                continue;
            }
            let dirty = cache.take_dirty();
            // Every name's lookup and its neighbours' (the slowest check in
            // a debug build) at every other sync.
            let all_lookups = syncs % 2 == 0;
            for ((cfg, ix), before) in cfgs.iter().zip(indexes.iter_mut()).zip(dumps.iter_mut()) {
                let what = format!("step {step}, zone {}, seed {seed}", cfg.zone);
                let serial = ix.serial();
                let changed = ix.apply(&cache, &dirty);
                let now = dump(ix);
                assert_eq!(ix.soa(), &soa_record(&ix.zone, 5, ix.serial()), "{what}");
                if now != *before {
                    assert!(changed && ix.serial() > serial, "{what}: serial");
                    changes += 1;
                } else if !changed {
                    assert_eq!(ix.serial(), serial, "{what}: serial");
                }

                let fresh = build(&world, cfg, ix.serial());
                assert_eq!(now, dump(&fresh), "{what}: incremental vs fresh build");
                *before = now;
                let now = &*before;
                assert_eq!(ix.stats(), fresh.stats(), "{what}: stats");
                let old = legacy_table(&world, cfg, ix.serial());
                assert_eq!(*now, legacy_dump(&old), "{what}: vs the previous table");
                assert_eq!(
                    ix.stats(),
                    IndexStats {
                        services: old.services,
                        names: old.names.len(),
                        records: old.names.values().map(Vec::len).sum(),
                        ptr_addresses: old.ptr.len(),
                    },
                    "{what}: stats vs the previous table"
                );

                // Lookups agree with the table; answers agree with a fresh
                // build's (a sample of the names, every question type).
                let table = table_of(ix);
                max_names = max_names.max(table.len());
                let mut names = if all_lookups {
                    check_lookups(ix, &table, &what)
                } else {
                    table.keys().cloned().collect()
                };
                names.extend(reverse.iter().cloned());
                names.push(n("10-1-2-3.a.pod.").append_domain(&ix.zone).unwrap());
                for _ in 0..20 {
                    let name = &names[rng.random_range(0..names.len())];
                    for t in QTYPES {
                        assert_eq!(
                            ix.resolve(name, t),
                            fresh.resolve(name, t),
                            "{what}: {name} {t}"
                        );
                    }
                }
            }
            syncs += 1;
        }
        eprintln!("{syncs} syncs, {changes} zone changes, up to {max_names} names");
        assert!(
            syncs > 250 && changes > 250,
            "{syncs} syncs, {changes} changes"
        );
        assert!(max_names > 30, "zones stayed tiny: {max_names} names");
    }

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    /// A cache with these objects, and the dirty keys of putting them in.
    fn cache_of(services: &[Service], slices: &[EndpointSlice], namespaces: &[&str]) -> Cache {
        let mut c = Cache::new();
        for s in services {
            c.apply_service(s);
        }
        for s in slices {
            c.apply_slice(s);
        }
        for n in namespaces {
            c.apply_namespace(n);
        }
        c
    }

    /// Apply what changed in `cache` since the last sync.
    fn sync(ix: &mut Index, cache: &mut Cache) -> bool {
        let dirty = cache.take_dirty();
        ix.apply(cache, &dirty)
    }

    fn a_of(ix: &Index, name: &str) -> Vec<String> {
        match ix.resolve(&n(name), RecordType::A) {
            Resolution::Zone(z) => {
                let mut v: Vec<String> = z.answers.iter().map(|r| r.data.to_string()).collect();
                v.sort();
                v
            }
            other => panic!("{other:?}"),
        }
    }

    fn rcode(ix: &Index, name: &str, t: RecordType) -> ResponseCode {
        match ix.resolve(&n(name), t) {
            Resolution::Zone(z) => z.rcode,
            other => panic!("{other:?}"),
        }
    }

    fn ptr_of(ix: &Index, ip: &str) -> Vec<String> {
        let ip: IpAddr = ip.parse().unwrap();
        match ix.resolve(&Name::from(ip), RecordType::PTR) {
            Resolution::Zone(z) => z.answers.iter().map(|r| r.data.to_string()).collect(),
            Resolution::Forward => Vec::new(),
            other => panic!("{other:?}"),
        }
    }

    /// Removing a Service removes exactly its part: a ClusterIP two
    /// Services share keeps the other's A and PTR; a namespace stays while
    /// its Namespace object or another Service keeps it.
    #[test]
    fn removal_keeps_what_others_contribute() {
        let cfg = cfg("cluster.local.", true);
        let one = svc(json!({"metadata":{"name":"one","namespace":"a"},
            "spec":{"clusterIP":"10.96.0.7","ports":[{"name":"http","port":80}]}}));
        let two = svc(json!({"metadata":{"name":"two","namespace":"b"},
            "spec":{"clusterIP":"10.96.0.7"}}));
        let mut cache = cache_of(&[one, two], &[], &["b"]);
        let mut ix = Index::new(&cfg, 10);
        assert!(sync(&mut ix, &mut cache));
        assert_eq!(ix.serial(), 11);
        assert_eq!(
            ptr_of(&ix, "10.96.0.7"),
            vec!["one.a.svc.cluster.local.", "two.b.svc.cluster.local."]
        );
        let stats = ix.stats();

        cache.delete_service("a", "one");
        assert!(sync(&mut ix, &mut cache));
        assert_eq!(ix.serial(), 12);
        assert_eq!(ptr_of(&ix, "10.96.0.7"), vec!["two.b.svc.cluster.local."]);
        assert_eq!(a_of(&ix, "two.b.svc.cluster.local."), vec!["10.96.0.7"]);
        for gone in [
            "one.a.svc.cluster.local.",
            "_tcp.one.a.svc.cluster.local.",
            "_http._tcp.one.a.svc.cluster.local.",
            "a.svc.cluster.local.",
        ] {
            assert_eq!(
                rcode(&ix, gone, RecordType::A),
                ResponseCode::NXDomain,
                "{gone}"
            );
        }
        assert_eq!(
            ix.stats(),
            IndexStats {
                services: 1,
                names: stats.names - 4,
                records: stats.records - 2,
                ptr_addresses: 1,
            }
        );

        // b stays: its Namespace object exists.
        cache.delete_service("b", "two");
        sync(&mut ix, &mut cache);
        assert_eq!(ptr_of(&ix, "10.96.0.7"), Vec::<String>::new());
        assert_eq!(
            rcode(&ix, "b.svc.cluster.local.", RecordType::A),
            ResponseCode::NoError
        );
        cache.delete_namespace("b");
        sync(&mut ix, &mut cache);
        assert_eq!(
            rcode(&ix, "b.svc.cluster.local.", RecordType::A),
            ResponseCode::NXDomain
        );
        assert_eq!(ix.stats(), Index::new(&cfg, 1).stats());
        assert!(ix.services.is_empty() && ix.namespaces.is_empty() && ix.ptr.is_empty());

        // Nothing changed: the serial stays.
        let serial = ix.serial();
        assert!(!sync(&mut ix, &mut cache));
        assert_eq!(ix.serial(), serial);
    }

    /// A change that does not touch DNS (a node port, a slice of a
    /// ClusterIP Service) leaves the serial alone but lets go of the old
    /// view.
    #[test]
    fn changes_outside_dns_keep_the_serial() {
        let cfg = cfg("cluster.local.", true);
        let web = |node_port: i32| {
            svc(json!({"metadata":{"name":"web","namespace":"a"},
                "spec":{"type":"NodePort","clusterIP":"10.96.0.7",
                  "ports":[{"name":"http","port":80,"nodePort":node_port}]}}))
        };
        let mut cache = cache_of(&[web(30001)], &[], &[]);
        let mut ix = Index::new(&cfg, 1);
        sync(&mut ix, &mut cache);
        let serial = ix.serial();
        cache.apply_service(&web(30002));
        cache.apply_slice(&slice(json!({"metadata":{"name":"web-1","namespace":"a",
                "labels":{"kubernetes.io/service-name":"web"}},
            "addressType":"IPv4","endpoints":[{"addresses":["10.0.0.1"]}]})));
        let dirty = cache.take_dirty();
        assert_eq!(dirty.services.len(), 1);
        assert!(!ix.apply(&cache, &dirty));
        assert_eq!(ix.serial(), serial);
        let key = ObjectKey::new("a", "web");
        let Some(Contribution::ClusterIp(held)) = ix.services.get(&key) else {
            panic!()
        };
        assert!(Arc::ptr_eq(held, cache.service(&key).unwrap()));
    }

    /// Names that differ only in case (which API validation forbids) still
    /// behave as the one record table did: merged, and removed one at a
    /// time.
    #[test]
    fn names_differing_in_case_merge_like_one_table() {
        let cfg = cfg("cluster.local.", true);
        let services = vec![
            svc(json!({"metadata":{"name":"Web","namespace":"d"},
                "spec":{"clusterIP":"10.96.0.1","ports":[{"name":"http","port":80}]}})),
            svc(json!({"metadata":{"name":"web","namespace":"d"},
                "spec":{"clusterIP":"10.96.0.2","ports":[{"name":"HTTP","port":80}]}})),
            svc(json!({"metadata":{"name":"web","namespace":"D"},
                "spec":{"clusterIP":"10.96.0.1"}})),
            svc(json!({"metadata":{"name":"h","namespace":"d"},
                "spec":{"clusterIP":"None","ports":[{"name":"p","port":1}]}})),
        ];
        let slices = vec![slice(json!({"metadata":{"name":"h-1","namespace":"d",
                "labels":{"kubernetes.io/service-name":"h"}},
            "addressType":"IPv4","ports":[{"name":"p","port":9}],
            "endpoints":[{"addresses":["10.0.0.1"],"hostname":"P0"},
                         {"addresses":["10.0.0.2"],"hostname":"p0"},
                         {"addresses":["10.0.0.3"],"hostname":"10-0-0-4"},
                         {"addresses":["10.0.0.4"]}]}))];
        let namespaces = ["Quiet", "quiet"];
        let ix = Index::build(&cfg, &services, &slices, namespaces, 7);
        let old = legacy::table(&cfg, &services, &slices, namespaces, 7);
        assert_eq!(dump(&ix), legacy_dump(&old));
        check_lookups(&ix, &table_of(&ix), "case");
        assert_eq!(
            a_of(&ix, "WEB.d.svc.cluster.local."),
            vec!["10.96.0.1", "10.96.0.2"]
        );
        assert_eq!(
            a_of(&ix, "p0.h.d.svc.cluster.local."),
            vec!["10.0.0.1", "10.0.0.2"]
        );
        assert_eq!(
            a_of(&ix, "10-0-0-4.h.d.svc.cluster.local."),
            vec!["10.0.0.3", "10.0.0.4"]
        );

        // Take them away one at a time.
        let mut cache = cache_of(&services, &slices, &namespaces);
        let mut ix = Index::new(&cfg, 1);
        sync(&mut ix, &mut cache);
        cache.delete_service("d", "Web");
        cache.delete_namespace("quiet");
        sync(&mut ix, &mut cache);
        // D/web still has 10.96.0.1 at the same name.
        assert_eq!(
            a_of(&ix, "WEB.d.svc.cluster.local."),
            vec!["10.96.0.1", "10.96.0.2"]
        );
        assert_eq!(ptr_of(&ix, "10.96.0.1"), vec!["web.D.svc.cluster.local."]);
        cache.delete_service("D", "web");
        sync(&mut ix, &mut cache);
        assert_eq!(a_of(&ix, "WEB.d.svc.cluster.local."), vec!["10.96.0.2"]);
        assert_eq!(ptr_of(&ix, "10.96.0.1"), Vec::<String>::new());
        assert_eq!(
            rcode(&ix, "quiet.svc.cluster.local.", RecordType::A),
            ResponseCode::NoError
        );
        cache.delete_service("d", "web");
        cache.delete_namespace("Quiet");
        sync(&mut ix, &mut cache);
        assert_eq!(
            rcode(&ix, "web.d.svc.cluster.local.", RecordType::A),
            ResponseCode::NXDomain
        );
        assert_eq!(
            rcode(&ix, "quiet.svc.cluster.local.", RecordType::A),
            ResponseCode::NXDomain
        );
        assert!(ix.folded.is_empty());
    }

    /// [`fits`] says exactly what [`name_under`] does.
    #[test]
    fn fits_agrees_with_building_the_name() {
        let zone = n(&long_zone());
        let zone_len = encoded_len(&zone);
        for a in [0, 1, 2, 10, 20, 25, 26, 27, 28, 29, 30, 63, 64] {
            for b in [1, 2, 3, 4, 63] {
                let (la, lb) = ("x".repeat(a), "y".repeat(b));
                assert_eq!(
                    fits(&[a, b], zone_len),
                    name_under(&[&la, &lb], &zone).is_some(),
                    "{a} {b}"
                );
            }
        }
    }
}

#[cfg(test)]
mod measure {
    use super::*;
    use serde_json::json;

    /// Bytes the allocator has handed out and not got back (every arena).
    fn heap_in_use() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        m.uordblks + m.hblkhd
    }

    /// `n` ClusterIP Services (one named port) in 10 namespaces, each with
    /// a slice of `endpoints` ready endpoints.
    fn objects(n: usize, endpoints: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for i in 0..n {
            let ns = format!("ns-{}", i % 10);
            let name = format!("svc-{i:05}");
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            services.push(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"clusterIP": ip, "clusterIPs": [ip],
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))
                .unwrap(),
            );
            let eps: Vec<serde_json::Value> = (0..endpoints)
                .map(|e| {
                    json!({"addresses": [format!("10.{}.{}.{}", 100 + e, i / 250, i % 250 + 1)],
                           "conditions": {"ready": true}, "nodeName": format!("node-{}", e % 3)})
                })
                .collect();
            slices.push(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                                 "labels": {crate::model::SERVICE_NAME_LABEL: name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": eps
                }))
                .unwrap(),
            );
        }
        (services, slices)
    }

    /// Heap bytes of the index per ClusterIP Service at 30,000 Services x
    /// 10 endpoints (run alone: other threads' allocations would count):
    /// kept up to date from the node's cache (the views are the cache's),
    /// and built from API objects (the index then holds the only copy of
    /// the views).
    #[test]
    #[ignore = "measurement; run alone with --ignored --nocapture"]
    fn bytes_per_cluster_ip_service() {
        let n = 30_000;
        let cfg = IndexConfig {
            zone: Name::from_ascii("cluster.local.").unwrap(),
            ttl: 5,
            pod_records: true,
        };
        let (services, slices) = objects(n, 10);
        let namespaces: Vec<String> = (0..10).map(|i| format!("ns-{i}")).collect();

        let mut cache = Cache::new();
        for s in &services {
            cache.apply_service(s);
        }
        for s in &slices {
            cache.apply_slice(s);
        }
        for ns in &namespaces {
            cache.apply_namespace(ns);
        }
        let dirty = cache.take_dirty();
        let before = heap_in_use();
        let mut ix = Index::new(&cfg, 1);
        let started = std::time::Instant::now();
        ix.apply(&cache, &dirty);
        let took = started.elapsed();
        let after = heap_in_use();
        eprintln!(
            "Index::apply from the cache: {} bytes per ClusterIP Service ({:?}; {took:?})",
            (after - before) / n,
            ix.stats()
        );
        // One change at a time: a Service's ClusterIP moves (its A and PTR
        // change), then the node's sync applies it.
        let changes = 1000;
        let mut took = std::time::Duration::ZERO;
        for i in 0..changes {
            let mut svc = services[i * 7].clone();
            let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
            let spec = svc.spec.as_mut().unwrap();
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
            cache.apply_service(&svc);
            let dirty = cache.take_dirty();
            let started = std::time::Instant::now();
            assert!(ix.apply(&cache, &dirty));
            took += started.elapsed();
        }
        eprintln!(
            "one change (a ClusterIP moves): {:?}",
            took / changes as u32
        );
        // Query cost: ClusterIP names, SRV, and search-path expansions
        // that end NXDOMAIN; against a lookup in one record table (what
        // the previous index did per question).
        let names: Vec<(Name, RecordType)> = (0..1000)
            .flat_map(|i| {
                let (svc, ns) = (format!("svc-{i:05}"), format!("ns-{}", i % 10));
                [
                    (format!("{svc}.{ns}.svc.cluster.local."), RecordType::A),
                    (
                        format!("_http._tcp.{svc}.{ns}.svc.cluster.local."),
                        RecordType::SRV,
                    ),
                    (
                        format!("{svc}.{ns}.svc.cluster.local.ns-3.svc.cluster.local."),
                        RecordType::A,
                    ),
                ]
            })
            .map(|(n, t)| (Name::from_ascii(n).unwrap(), t))
            .collect();
        let rounds = 100;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            for (name, t) in &names {
                std::hint::black_box(ix.resolve(name, *t));
            }
        }
        let per = started.elapsed() / (rounds * names.len() as u32);
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            for (name, _) in &names {
                std::hint::black_box(ix.lookup(name));
            }
        }
        let lookup_per = started.elapsed() / (rounds * names.len() as u32);
        let started = std::time::Instant::now();
        let table = super::legacy::table(
            &cfg,
            &services,
            &slices,
            namespaces.iter().map(String::as_str),
            1,
        );
        eprintln!(
            "the previous index's rebuild (what every change cost): {:?}",
            started.elapsed()
        );
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            for (name, _) in &names {
                std::hint::black_box(table.names.get(name).cloned());
            }
        }
        let table_per = started.elapsed() / (rounds * names.len() as u32);
        eprintln!(
            "resolve: {per:?} per question; of which finding the name's records: \
             {lookup_per:?} (in one record table, as before: {table_per:?})"
        );
        drop(table);
        drop(ix);
        drop(cache);

        let before = heap_in_use();
        let ix = Index::build(
            &cfg,
            &services,
            &slices,
            namespaces.iter().map(String::as_str),
            1,
        );
        let after = heap_in_use();
        eprintln!(
            "Index::build from API objects: {} bytes per ClusterIP Service (views included)",
            (after - before) / n,
        );
        drop(ix);
        eprintln!(
            "sizes: ObjectKey {} + Contribution {}; PtrTarget {}, Ptrs {}",
            std::mem::size_of::<ObjectKey>(),
            std::mem::size_of::<Contribution>(),
            std::mem::size_of::<PtrTarget>(),
            std::mem::size_of::<Ptrs>(),
        );
    }
}
