//! The cluster zone as a pure record table: [`Index::build`] turns Services +
//! EndpointSlices + namespace names into every name the Kubernetes DNS
//! specification (schema 1.1.0) defines, and [`Index::resolve`] answers one
//! question from it. No I/O here: the server ([`super::server`]) turns a
//! [`Resolution`] into a wire message, and forwards what is not ours.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::proxy::tracker::SERVICE_NAME_LABEL;

/// The schema version `dns-version.<zone>` answers.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// How many CNAMEs are followed inside the zone before giving up (SERVFAIL).
const MAX_CNAME_HOPS: usize = 8;

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

/// The cluster zone's record table. Immutable once built; the server swaps
/// in a new one on every change.
#[derive(Debug)]
pub struct Index {
    zone: Name,
    ttl: u32,
    pod_records: bool,
    soa: Record,
    /// Every name that exists in the zone, with its records (empty for
    /// names that exist only because something below them does).
    names: HashMap<Name, Vec<Record>>,
    /// Reverse map for PTR: address → the names pointing to it.
    ptr: HashMap<IpAddr, Vec<Name>>,
    /// The `pod` label after the namespace, for pod-record lookups.
    pod_label_depth: usize,
    stats: IndexStats,
}

/// Sizes of an index (for logs and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub services: usize,
    pub names: usize,
    pub records: usize,
    pub ptr_addresses: usize,
}

/// One name's lookup result inside [`Index::resolve`].
enum Step {
    Records(Vec<Record>),
    NoData(Record),
    NxDomain(Record),
    Cname(Record, Name),
    NotOurs,
}

/// Builds a name from raw labels under `zone` (None when a label is empty or
/// too long, or the name exceeds 255 bytes: such objects get no records).
fn name_under(labels: &[&str], zone: &Name) -> Option<Name> {
    Name::from_labels(labels.iter().map(|l| l.as_bytes()))
        .ok()?
        .append_domain(zone)
        .ok()
}

/// CoreDNS's endpoint name for an endpoint without `hostname`.
fn dashed(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

fn ip_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, data)
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
struct Builder<'z> {
    zone: &'z Name,
    names: HashMap<Name, Vec<Record>>,
    ptr: HashMap<IpAddr, Vec<Name>>,
}

impl Builder<'_> {
    /// Make `name` and all its ancestors up to the zone exist.
    fn touch(&mut self, name: &Name) {
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

    fn add(&mut self, record: Record) {
        self.touch(&record.name);
        let recs = self.names.get_mut(&record.name).expect("touched");
        if !recs.contains(&record) {
            recs.push(record);
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &Name) {
        let targets = self.ptr.entry(ip).or_default();
        if !targets.contains(target) {
            targets.push(target.clone());
        }
    }
}

impl Index {
    /// Build the zone from snapshots of the caches. `namespaces` are names of
    /// namespaces known to exist (each Service's namespace is added too);
    /// `serial` becomes the SOA serial.
    pub fn build<'a>(
        cfg: &IndexConfig,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        namespaces: impl IntoIterator<Item = &'a str>,
        serial: u32,
    ) -> Index {
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
        let stats = IndexStats {
            services: services_count,
            names: names.len(),
            records: names.values().map(Vec::len).sum(),
            ptr_addresses: ptr.len(),
        };
        Index {
            pod_label_depth: zone.num_labels() as usize + 1,
            zone,
            ttl,
            pod_records: cfg.pod_records,
            soa,
            names,
            ptr,
            stats,
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

    /// Answer `qtype` at `qname` (case-insensitively).
    pub fn resolve(&self, qname: &Name, qtype: RecordType) -> Resolution {
        let mut out = ZoneAnswer::default();
        let mut name = qname.clone();
        name.set_fqdn(true);
        for _ in 0..MAX_CNAME_HOPS {
            match self.step(&name, qtype) {
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
        if let Some(recs) = self.names.get(name) {
            if qtype != RecordType::CNAME {
                if let Some(c) = recs.iter().find(|r| r.record_type() == RecordType::CNAME) {
                    let RData::CNAME(CNAME(target)) = &c.data else {
                        unreachable!("record type checked")
                    };
                    return Step::Cname(c.clone(), target.clone());
                }
            }
            let matching: Vec<Record> = recs
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .cloned()
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
        let Some(targets) = self.ptr.get(&ip) else {
            return Step::NotOurs;
        };
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
                targets
                    .iter()
                    .map(|t| {
                        Record::from_rdata(owner.clone(), self.ttl, RData::PTR(PTR(t.clone())))
                    })
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
            if !seen.insert(target) {
                continue;
            }
            if let Some(recs) = self.names.get(target) {
                out.extend(
                    recs.iter()
                        .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                        .cloned(),
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
