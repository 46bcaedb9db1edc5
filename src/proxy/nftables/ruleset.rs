//! The desired nftables ruleset, computed by pure functions from the
//! [`ProxyState`] and the node's settings. Nothing here runs `nft`: the model
//! is rendered as `nft -f` script text ([`Ruleset::render_full`]), and
//! [`super::diff`] turns two models into the script of their difference.
//!
//! The model is split the way changes arrive: a fixed part that depends only
//! on the configuration ([`render_base`]), and one [`ServiceRules`] per
//! service port, built by [`service_rules`] from that port alone. A change
//! to one Service therefore rebuilds (and diffs) only that Service's rules.
//!
//! # The ruleset
//!
//! One table, `ip fairlead` (the name is configurable). Nothing outside it
//! is touched.
//!
//! ```text
//! table ip fairlead {
//!   # Dispatch: one lookup per packet, whatever the number of Services.
//!   map service-ips           { ipv4_addr . inet_proto . inet_service : verdict }
//!       # ClusterIP . proto . port  : goto svc-<h>  (or svl-<h>, internalTrafficPolicy Local)
//!       # externalIP . proto . port : goto ext-<h>  (externalIPs, LoadBalancer ingress IPs)
//!   map service-nodeports     { inet_proto . inet_service : verdict }
//!       # proto . nodePort : goto ext-<h>
//!   map no-endpoint-services  { ipv4_addr . inet_proto . inet_service : verdict }
//!   map no-endpoint-nodeports { inet_proto . inet_service : verdict }
//!       # frontends without usable endpoints: goto reject-chain (no endpoints
//!       # at all: TCP reset / ICMP port unreachable, so clients fail fast),
//!       # or drop (a traffic policy Local and no endpoint on this node)
//!   set hairpin-endpoints     { ipv4_addr . ipv4_addr }
//!       # <endpoint ip> . <endpoint ip>, for every endpoint in use
//!
//!   # Filter (priority -110, before DNAT): reject/drop new connections to
//!   # frontends without endpoints.
//!   chain filter-input   { hook input;   ct state new jump service-endpoints-check }
//!   chain filter-forward { hook forward; ct state new jump service-endpoints-check }
//!   chain filter-output  { hook output;  ct state new jump service-endpoints-check }
//!   chain service-endpoints-check {
//!     ip daddr . meta l4proto . th dport vmap @no-endpoint-services
//!     <nodeport addresses> meta l4proto . th dport vmap @no-endpoint-nodeports
//!   }
//!
//!   # NAT (priority -100 / 100): only the first packet of a connection
//!   # passes here; conntrack repeats the decision for the rest.
//!   chain nat-prerouting  { hook prerouting;  jump services }
//!   chain nat-output      { hook output;      jump services }
//!   chain nat-postrouting { hook postrouting; jump masquerading }
//!   chain services {
//!     ip daddr . meta l4proto . th dport vmap @service-ips
//!     <nodeport addresses> meta l4proto . th dport vmap @service-nodeports
//!   }
//!   # <nodeport addresses>: `fib daddr type local ip daddr != 127.0.0.0/8`,
//!   # or `ip daddr { <--nodeport-addresses> }` when they are given.
//!   chain masquerading {
//!     # hairpin: an endpoint reached itself through a Service
//!     ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade
//!     meta mark & M == 0 return
//!     meta mark set meta mark ^ M
//!     masquerade fully-random
//!   }
//!   chain mark-for-masquerade { meta mark set meta mark | M }   # M = 1 << mark bit
//!   chain reject-chain { meta l4proto tcp reject with tcp reset; reject }
//!
//!   # Per service port (h = hash of namespace/name:port/protocol):
//!   chain svc-<h> {            # all usable endpoints, round robin
//!     numgen inc mod N == 0 <to e1>        # one new connection in N
//!     numgen inc mod N-1 == 0 <to e2>      # one in N-1 of the rest
//!     ...
//!     <to eN>                              # the one left
//!   }
//!   # <to e>: `meta l4proto <proto> dnat to <ip>:<port>`, or with
//!   # sessionAffinity ClientIP `goto sep-<e>`, after one rule per endpoint
//!   # `ip saddr @aff-<a> goto sep-<e>` at the top of the chain.
//!   # (Each `numgen inc` has its own counter, so every endpoint gets
//!   # exactly one of every N new connections. Not `numgen inc mod N vmap
//!   # { ... }`: each such rule creates an anonymous set, and the kernel
//!   # names and looks up anonymous sets in time linear in the table, so a
//!   # full sync of 10,000 Services took minutes. Not a chain per endpoint
//!   # either, unless affinity needs one: 3x the statements per sync.)
//!   chain svl-<h> { ... }      # the same over this node's endpoints (only
//!                              # with a traffic policy Local)
//!   chain ext-<h> {            # NodePort / external IP traffic
//!     jump mark-for-masquerade; goto svc-<h>     # externalTrafficPolicy Cluster
//!     # externalTrafficPolicy Local: keep the client address, except for
//!     # traffic from this node itself, which may use any endpoint:
//!     fib saddr type local jump mark-for-masquerade
//!     fib saddr type local goto svc-<h>
//!     goto svl-<h>
//!   }
//!   # Per endpoint of a service port with ClientIP affinity (e = hash of
//!   # the service port and ip:port; a = the same and the timeout):
//!   chain sep-<e> {
//!     update @aff-<a> { ip saddr }
//!     meta l4proto <proto> dnat to <ip>:<port>
//!   }
//!   set aff-<a> { type ipv4_addr; flags dynamic,timeout; timeout <affinity timeout> }
//! }
//! ```
//!
//! Usable endpoints are [`ServicePortInfo::usable_endpoints`]: ready ones,
//! else serving-and-terminating ones. Chain and set names are stable (a hash
//! of what they stand for, in base32) and short (20 characters). The
//! affinity timeout is part of an `aff-` set's hash, so a set never changes
//! its definition under one name. The table is IPv4 only: IPv6 frontends
//! and endpoints are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use crate::proxy::{Protocol, ProxyState, ServicePortInfo, ServicePortName};

/// The settings the ruleset depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesetConfig {
    /// Name of the `ip` table fairlead owns.
    pub table: String,
    /// This node's name, for `trafficPolicy: Local`.
    pub node_name: String,
    /// Addresses NodePorts are served on; empty = every local address
    /// except 127.0.0.0/8.
    pub nodeport_addresses: Vec<IpAddr>,
    /// The packet-mark bit that asks for masquerading (kube-proxy: 14).
    pub masquerade_bit: u8,
}

impl Default for RulesetConfig {
    fn default() -> Self {
        RulesetConfig {
            table: "fairlead".to_string(),
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            masquerade_bit: 14,
        }
    }
}

impl RulesetConfig {
    fn mark(&self) -> u32 {
        1u32 << (self.masquerade_bit.min(31))
    }

    /// The match selecting NodePort traffic, or `None` when no configured
    /// NodePort address is IPv4.
    fn nodeport_match(&self) -> Option<String> {
        if self.nodeport_addresses.is_empty() {
            return Some("fib daddr type local ip daddr != 127.0.0.0/8".to_string());
        }
        let v4: BTreeSet<Ipv4Addr> = self
            .nodeport_addresses
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            return None;
        }
        let list: Vec<String> = v4.iter().map(|ip| ip.to_string()).collect();
        Some(format!("ip daddr {{ {} }}", list.join(", ")))
    }
}

/// The four dispatch maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapName {
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    /// A set (no verdicts): `endpoint ip . endpoint ip`, for hairpin
    /// masquerading.
    HairpinEndpoints,
}

impl MapName {
    pub const ALL: [MapName; 5] = [
        MapName::ServiceIps,
        MapName::ServiceNodeports,
        MapName::NoEndpointServices,
        MapName::NoEndpointNodeports,
        MapName::HairpinEndpoints,
    ];

    /// A set rather than a verdict map.
    pub fn is_set(&self) -> bool {
        *self == MapName::HairpinEndpoints
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            MapName::ServiceIps => "service-ips",
            MapName::ServiceNodeports => "service-nodeports",
            MapName::NoEndpointServices => "no-endpoint-services",
            MapName::NoEndpointNodeports => "no-endpoint-nodeports",
            MapName::HairpinEndpoints => "hairpin-endpoints",
        }
    }

    fn key_type(&self) -> &'static str {
        match self {
            MapName::ServiceIps | MapName::NoEndpointServices => {
                "ipv4_addr . inet_proto . inet_service"
            }
            MapName::ServiceNodeports | MapName::NoEndpointNodeports => "inet_proto . inet_service",
            MapName::HairpinEndpoints => "ipv4_addr . ipv4_addr",
        }
    }
}

/// A regular (non-base) chain: its name, a comment saying what it is for,
/// and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub comment: String,
    pub rules: Vec<String>,
}

/// A ClientIP affinity set of one endpoint (`dynamic,timeout`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AffinitySet {
    pub name: String,
    pub timeout_secs: u64,
}

/// One element of a dispatch map.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub map: MapName,
    /// The key in nft syntax (`10.96.0.1 . tcp . 80`).
    pub key: String,
    /// The verdict (`goto svc-...`, `drop`).
    pub verdict: String,
}

/// Everything one service port contributes to the table. Chain and set
/// names are unique to the service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    pub chains: Vec<Chain>,
    pub sets: Vec<AffinitySet>,
    /// Deduplicated by (map, key).
    pub elements: Vec<Element>,
}

impl ServiceRules {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

// ---- names ------------------------------------------------------------------

/// FNV-1a, 128 bits: stable across Rust versions and processes (chain
/// names outlive the daemon in the kernel).
fn fnv128(parts: &[&str]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(PRIME);
        }
        for b in p.bytes() {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    // FNV's top bits barely depend on the last bytes: finish with an
    // xorshift-multiply avalanche so every input bit reaches the bits used.
    h ^= h >> 64;
    h = h.wrapping_mul(0x9e3779b97f4a7c15f39cc0605cedc835);
    h ^= h >> 67;
    h = h.wrapping_mul(0xc2b2ae3d27d4eb4f165667b19e3779f9);
    h ^= h >> 64;
    h
}

/// 80 bits of a hash in lowercase base32 (16 characters).
fn base32_80(h: u128) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut v = h >> 48;
    let mut out = [0u8; 16];
    for c in out.iter_mut().rev() {
        *c = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    String::from_utf8(out.to_vec()).expect("ASCII")
}

fn spn_key(spn: &ServicePortName) -> String {
    format!(
        "{}/{}:{}/{}",
        spn.namespace,
        spn.name,
        spn.port,
        spn.protocol.as_str()
    )
}

/// The hash part of a service port's chain names.
pub fn service_hash(spn: &ServicePortName) -> String {
    base32_80(fnv128(&[&spn_key(spn)]))
}

/// The hash part of an endpoint's chain (and affinity set) name.
pub fn endpoint_hash(spn: &ServicePortName, ep: SocketAddrV4) -> String {
    base32_80(fnv128(&[&spn_key(spn), &ep.to_string()]))
}

fn affinity_set_name(spn: &ServicePortName, ep: SocketAddrV4, timeout: u64) -> String {
    let t = timeout.to_string();
    format!(
        "aff-{}",
        base32_80(fnv128(&[&spn_key(spn), &ep.to_string(), &t]))
    )
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A comment as nft accepts it: no quotes, at most 127 bytes.
fn comment(s: &str) -> String {
    let mut c: String = s.chars().filter(|c| *c != '"' && *c != '\\').collect();
    while c.len() > 127 {
        c.pop();
    }
    c
}

fn v4_endpoints(addrs: Vec<std::net::SocketAddr>) -> Vec<SocketAddrV4> {
    addrs
        .into_iter()
        .filter_map(|a| match a {
            std::net::SocketAddr::V4(v4) => Some(v4),
            std::net::SocketAddr::V6(_) => None,
        })
        .collect()
}

fn v4_ips(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(*v4),
        _ => None,
    })
}

// ---- per service port -------------------------------------------------------

/// The rules of one service port (see the module doc for their shape).
pub fn service_rules(
    cfg: &RulesetConfig,
    spn: &ServicePortName,
    info: &ServicePortInfo,
) -> ServiceRules {
    let proto = proto_name(spn.protocol);
    let h = service_hash(spn);
    let svc = format!("svc-{h}");
    let svl = format!("svl-{h}");
    let ext = format!("ext-{h}");
    let affinity = info.affinity_timeout.map(|t| t.as_secs().max(1));

    let external_ips: Vec<Ipv4Addr> = v4_ips(&info.external_ips).collect();
    let has_external = info.node_port.is_some() || !external_ips.is_empty();
    let cluster = v4_endpoints(info.usable_endpoints(None));
    let local = if info.internal_local || (info.external_local && has_external) {
        v4_endpoints(info.usable_endpoints(Some(&cfg.node_name)))
    } else {
        Vec::new()
    };
    let external_reachable = if info.external_local {
        !local.is_empty()
    } else {
        !cluster.is_empty()
    };
    // Which balancing chains something jumps to. (Local endpoints imply
    // cluster ones: both fall back to terminating endpoints only when no
    // endpoint anywhere is ready.)
    let use_svc =
        !cluster.is_empty() && (!info.internal_local || (has_external && external_reachable));
    let use_svl = !local.is_empty();
    let sep = |ep: SocketAddrV4| format!("sep-{}", endpoint_hash(spn, ep));

    let mut out = ServiceRules::default();

    // Endpoint chains (and their affinity sets).
    let all: BTreeSet<SocketAddrV4> = use_svc
        .then_some(&cluster)
        .into_iter()
        .chain(use_svl.then_some(&local))
        .flatten()
        .copied()
        .collect();
    let mut elements: BTreeMap<(MapName, String), String> = BTreeMap::new();
    for &ep in &all {
        let ip = ep.ip();
        elements.insert(
            (MapName::HairpinEndpoints, format!("{ip} . {ip}")),
            String::new(),
        );
        if let Some(t) = affinity {
            let set = affinity_set_name(spn, ep, t);
            out.chains.push(Chain {
                name: sep(ep),
                comment: comment(&format!("{spn} {proto} -> {ep}")),
                rules: vec![
                    format!("update @{set} {{ ip saddr }}"),
                    format!("meta l4proto {proto} dnat to {ep}"),
                ],
            });
            out.sets.push(AffinitySet {
                name: set,
                timeout_secs: t,
            });
        }
    }
    // Where a chosen endpoint's connections go: its chain with affinity,
    // else straight to the DNAT.
    let target = |ep: SocketAddrV4| match affinity {
        Some(_) => format!("goto {}", sep(ep)),
        None => format!("meta l4proto {proto} dnat to {ep}"),
    };

    // Round robin (after affinity) over a list of endpoints.
    let balance = |eps: &[SocketAddrV4]| -> Vec<String> {
        let mut rules = Vec::new();
        if let Some(t) = affinity {
            for &ep in eps {
                rules.push(format!(
                    "ip saddr @{} goto {}",
                    affinity_set_name(spn, ep, t),
                    sep(ep)
                ));
            }
        }
        // Rule i sees the connections rules 0..i left, N - i of every N,
        // and takes one of them: exact round robin, without a set.
        let n = eps.len();
        for (i, &ep) in eps.iter().enumerate() {
            if i + 1 == n {
                rules.push(target(ep));
            } else {
                rules.push(format!("numgen inc mod {} == 0 {}", n - i, target(ep)));
            }
        }
        rules
    };
    if use_svc {
        out.chains.push(Chain {
            name: svc.clone(),
            comment: comment(&format!("{spn} {proto}")),
            rules: balance(&cluster),
        });
    }
    if use_svl {
        out.chains.push(Chain {
            name: svl.clone(),
            comment: comment(&format!("{spn} {proto} local endpoints")),
            rules: balance(&local),
        });
    }

    let internal_target = if info.internal_local {
        (!local.is_empty()).then_some(&svl)
    } else {
        (!cluster.is_empty()).then_some(&svc)
    };
    if has_external && external_reachable {
        let rules = if info.external_local {
            vec![
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local goto {svc}"),
                format!("goto {svl}"),
            ]
        } else {
            vec![
                "jump mark-for-masquerade".to_string(),
                format!("goto {svc}"),
            ]
        };
        out.chains.push(Chain {
            name: ext.clone(),
            comment: comment(&format!("{spn} {proto} external")),
            rules,
        });
    }

    // Without endpoints at all: reject. With endpoints, but none for this
    // traffic's policy: drop (kube-proxy's choice).
    let unreachable = if cluster.is_empty() {
        "goto reject-chain"
    } else {
        "drop"
    };
    let mut put = |map: MapName, key: String, verdict: String| {
        elements.entry((map, key)).or_insert(verdict);
    };
    for ip in v4_ips(&info.cluster_ips) {
        let key = format!("{ip} . {proto} . {}", info.port);
        match internal_target {
            Some(t) => put(MapName::ServiceIps, key, format!("goto {t}")),
            None => put(MapName::NoEndpointServices, key, unreachable.to_string()),
        }
    }
    for ip in external_ips {
        let key = format!("{ip} . {proto} . {}", info.port);
        if external_reachable {
            put(MapName::ServiceIps, key, format!("goto {ext}"));
        } else {
            put(MapName::NoEndpointServices, key, unreachable.to_string());
        }
    }
    if let Some(np) = info.node_port {
        let key = format!("{proto} . {np}");
        if external_reachable {
            put(MapName::ServiceNodeports, key, format!("goto {ext}"));
        } else {
            put(MapName::NoEndpointNodeports, key, unreachable.to_string());
        }
    }
    out.elements = elements
        .into_iter()
        .map(|((map, key), verdict)| Element { map, key, verdict })
        .collect();
    out
}

// ---- the fixed part ---------------------------------------------------------

/// The statements creating the table's fixed part (maps, base chains,
/// helper chains), one per line, for a table that is being created.
pub fn render_base(cfg: &RulesetConfig, out: &mut String) {
    let t = &cfg.table;
    let mark = cfg.mark();
    for m in MapName::ALL {
        if m.is_set() {
            let _ = writeln!(
                out,
                "add set ip {t} {} {{ type {} ; }}",
                m.as_str(),
                m.key_type()
            );
        } else {
            let _ = writeln!(
                out,
                "add map ip {t} {} {{ type {} : verdict ; }}",
                m.as_str(),
                m.key_type()
            );
        }
    }
    for (name, kind, hook, prio) in [
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ] {
        let _ = writeln!(
            out,
            "add chain ip {t} {name} {{ type {kind} hook {hook} priority {prio} ; policy accept ; }}"
        );
    }
    for name in [
        "service-endpoints-check",
        "services",
        "masquerading",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        let _ = writeln!(out, "add chain ip {t} {name}");
    }
    let mut rule = |chain: &str, r: &str| {
        let _ = writeln!(out, "add rule ip {t} {chain} {r}");
    };
    for c in ["filter-input", "filter-forward", "filter-output"] {
        rule(c, "ct state new jump service-endpoints-check");
    }
    let np = cfg.nodeport_match();
    rule(
        "service-endpoints-check",
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    );
    if let Some(np) = &np {
        rule(
            "service-endpoints-check",
            &format!("{np} meta l4proto . th dport vmap @no-endpoint-nodeports"),
        );
    }
    rule("nat-prerouting", "jump services");
    rule("nat-output", "jump services");
    rule("nat-postrouting", "jump masquerading");
    rule(
        "services",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
    );
    if let Some(np) = &np {
        rule(
            "services",
            &format!("{np} meta l4proto . th dport vmap @service-nodeports"),
        );
    }
    rule(
        "masquerading",
        "ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade",
    );
    rule(
        "masquerading",
        &format!("meta mark & {mark:#x} == 0 return"),
    );
    rule(
        "masquerading",
        &format!("meta mark set meta mark ^ {mark:#x}"),
    );
    rule("masquerading", "masquerade fully-random");
    rule(
        "mark-for-masquerade",
        &format!("meta mark set meta mark | {mark:#x}"),
    );
    // ICMP port unreachable does not fail a local TCP connect (the SYN
    // is just retried): TCP gets a reset.
    rule("reject-chain", "meta l4proto tcp reject with tcp reset");
    rule("reject-chain", "reject");
}

// ---- statements -------------------------------------------------------------

pub(crate) fn add_chain(out: &mut String, table: &str, c: &Chain) {
    let _ = writeln!(
        out,
        "add chain ip {table} {} {{ comment \"{}\" ; }}",
        c.name, c.comment
    );
}

pub(crate) fn add_rules(out: &mut String, table: &str, c: &Chain) {
    for r in &c.rules {
        let _ = writeln!(out, "add rule ip {table} {} {r}", c.name);
    }
}

pub(crate) fn add_set(out: &mut String, table: &str, s: &AffinitySet) {
    let _ = writeln!(
        out,
        "add set ip {table} {} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {}s ; }}",
        s.name, s.timeout_secs
    );
}

pub(crate) fn add_element(out: &mut String, table: &str, map: MapName, key: &str, verdict: &str) {
    if map.is_set() {
        let _ = writeln!(out, "add element ip {table} {} {{ {key} }}", map.as_str());
    } else {
        let _ = writeln!(
            out,
            "add element ip {table} {} {{ {key} : {verdict} }}",
            map.as_str()
        );
    }
}

pub(crate) fn delete_element(out: &mut String, table: &str, map: MapName, key: &str) {
    let _ = writeln!(
        out,
        "delete element ip {table} {} {{ {key} }}",
        map.as_str()
    );
}

// ---- the whole table --------------------------------------------------------

/// The key of a map element: which map, and the key in nft syntax.
pub type ElementKey = (MapName, String);

/// The model of the whole table: the configuration (which fixes the base
/// part) and every service port's rules. Map keys claimed by several
/// service ports (invalid input: two Services with one external IP and
/// port) go to the first of them in [`ServicePortName`] order, whatever the
/// order of changes, so incremental and full syncs agree.
#[derive(Clone, Debug)]
pub struct Ruleset {
    pub cfg: RulesetConfig,
    services: BTreeMap<ServicePortName, Arc<ServiceRules>>,
    /// Claimants of every map key with the verdict each wants.
    claims: HashMap<ElementKey, BTreeMap<ServicePortName, String>>,
    chains: usize,
    rules: usize,
    sets: usize,
}

impl Ruleset {
    /// A table with only the fixed part.
    pub fn new(cfg: RulesetConfig) -> Ruleset {
        Ruleset {
            cfg,
            services: BTreeMap::new(),
            claims: HashMap::new(),
            chains: 0,
            rules: 0,
            sets: 0,
        }
    }

    /// The desired table for `state`.
    pub fn build(cfg: RulesetConfig, state: &ProxyState) -> Ruleset {
        let mut r = Ruleset::new(cfg);
        for (spn, info) in state {
            let rules = Arc::new(service_rules(&r.cfg, spn, info));
            r.set(spn, Some(rules));
        }
        r
    }

    pub fn services(&self) -> &BTreeMap<ServicePortName, Arc<ServiceRules>> {
        &self.services
    }

    /// Claimants of a map key (first = programmed).
    pub fn claimants(&self, key: &ElementKey) -> Option<&BTreeMap<ServicePortName, String>> {
        self.claims.get(key)
    }

    /// Replace (or with `None` remove) one service port's rules; returns
    /// the previous ones.
    pub fn set(
        &mut self,
        spn: &ServicePortName,
        rules: Option<Arc<ServiceRules>>,
    ) -> Option<Arc<ServiceRules>> {
        let old = match &rules {
            Some(r) => self.services.insert(spn.clone(), r.clone()),
            None => self.services.remove(spn),
        };
        if let Some(o) = &old {
            self.chains -= o.chains.len();
            self.rules -= o.rule_count();
            self.sets -= o.sets.len();
            for e in &o.elements {
                let k = (e.map, e.key.clone());
                if let Some(c) = self.claims.get_mut(&k) {
                    c.remove(spn);
                    if c.is_empty() {
                        self.claims.remove(&k);
                    }
                }
            }
        }
        if let Some(n) = &rules {
            self.chains += n.chains.len();
            self.rules += n.rule_count();
            self.sets += n.sets.len();
            for e in &n.elements {
                self.claims
                    .entry((e.map, e.key.clone()))
                    .or_default()
                    .insert(spn.clone(), e.verdict.clone());
            }
        }
        old
    }

    /// The programmed map elements, sorted.
    pub fn elements(&self) -> Vec<Element> {
        let mut v: Vec<Element> = self
            .claims
            .iter()
            .filter_map(|((map, key), c)| {
                c.values().next().map(|verdict| Element {
                    map: *map,
                    key: key.clone(),
                    verdict: verdict.clone(),
                })
            })
            .collect();
        v.sort();
        v
    }

    /// Regular chains of service ports (base and helper chains excluded).
    pub fn chain_count(&self) -> usize {
        self.chains
    }
    /// Rules in service port chains.
    pub fn rule_count(&self) -> usize {
        self.rules
    }
    /// Affinity sets.
    pub fn set_count(&self) -> usize {
        self.sets
    }
    /// Programmed map elements.
    pub fn element_count(&self) -> usize {
        self.claims.len()
    }

    /// The script that replaces whatever table of this name exists with
    /// this one, in one transaction (`add table` first, so the `delete`
    /// cannot fail on a missing table).
    pub fn render_full(&self) -> String {
        let t = &self.cfg.table;
        let mut out = String::with_capacity(256 * (self.rules + self.claims.len() + 64));
        let _ = writeln!(out, "add table ip {t}");
        let _ = writeln!(out, "delete table ip {t}");
        let _ = writeln!(out, "add table ip {t} {{ comment \"fairlead\" ; }}");
        render_base(&self.cfg, &mut out);
        for r in self.services.values() {
            for s in &r.sets {
                add_set(&mut out, t, s);
            }
            for c in &r.chains {
                add_chain(&mut out, t, c);
            }
        }
        for r in self.services.values() {
            for c in &r.chains {
                add_rules(&mut out, t, c);
            }
        }
        for e in self.elements() {
            add_element(&mut out, t, e.map, &e.key, &e.verdict);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proxy::Endpoint;
    use std::time::Duration;

    pub fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol,
        }
    }

    pub fn ep(addr: &str, node: &str) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: Some(node.into()),
        }
    }

    pub fn info(cluster_ip: &str, port: u16, endpoints: Vec<Endpoint>) -> ServicePortInfo {
        ServicePortInfo {
            cluster_ips: vec![cluster_ip.parse().unwrap()],
            port,
            node_port: None,
            external_ips: vec![],
            affinity_timeout: None,
            internal_local: false,
            external_local: false,
            endpoints,
        }
    }

    pub fn cfg() -> RulesetConfig {
        RulesetConfig {
            node_name: "node-a".into(),
            ..RulesetConfig::default()
        }
    }

    /// The golden state: a plain ClusterIP with two endpoints; a NodePort
    /// with ClientIP affinity and an external IP; a UDP port without
    /// endpoints; an externalTrafficPolicy Local service with one local and
    /// one remote endpoint; an internalTrafficPolicy Local service with no
    /// local endpoint.
    pub fn golden_state() -> ProxyState {
        let mut st = ProxyState::new();
        st.insert(
            spn("default", "web", "http", Protocol::Tcp),
            Arc::new(info(
                "10.96.1.1",
                80,
                vec![
                    ep("10.244.0.11:8080", "node-a"),
                    ep("10.244.1.12:8080", "node-b"),
                ],
            )),
        );
        let mut np = info("10.96.1.2", 443, vec![ep("10.244.0.21:8443", "node-a")]);
        np.node_port = Some(30443);
        np.external_ips = vec!["192.0.2.10".parse().unwrap()];
        np.affinity_timeout = Some(Duration::from_secs(60));
        st.insert(spn("default", "sticky", "", Protocol::Tcp), Arc::new(np));
        st.insert(
            spn("kube-system", "dns", "dns", Protocol::Udp),
            Arc::new(info("10.96.0.10", 53, vec![])),
        );
        let mut local = info(
            "10.96.1.3",
            80,
            vec![
                ep("10.244.0.31:80", "node-a"),
                ep("10.244.1.32:80", "node-b"),
            ],
        );
        local.node_port = Some(30080);
        local.external_local = true;
        st.insert(spn("default", "local", "", Protocol::Tcp), Arc::new(local));
        let mut itp = info("10.96.1.4", 80, vec![ep("10.244.1.41:80", "node-b")]);
        itp.internal_local = true;
        st.insert(spn("default", "itp", "", Protocol::Tcp), Arc::new(itp));
        st
    }

    /// Compare with (or, with FAIRLEAD_UPDATE_GOLDEN=1, write) a file
    /// under `src/proxy/nftables/testdata/`.
    pub fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/proxy/nftables/testdata")
            .join(name);
        if std::env::var_os("FAIRLEAD_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (FAIRLEAD_UPDATE_GOLDEN=1 writes it)",
                path.display()
            )
        });
        if expected != actual {
            let diff: Vec<String> = expected
                .lines()
                .zip(actual.lines())
                .enumerate()
                .filter(|(_, (e, a))| e != a)
                .take(5)
                .map(|(i, (e, a))| format!("line {}:\n  expected: {e}\n  actual:   {a}", i + 1))
                .collect();
            panic!(
                "{} differs ({} vs {} lines):\n{}\n--- actual ---\n{actual}",
                path.display(),
                expected.lines().count(),
                actual.lines().count(),
                diff.join("\n")
            );
        }
    }

    #[test]
    fn full_ruleset_golden() {
        let r = Ruleset::build(cfg(), &golden_state());
        golden("full.nft", &r.render_full());
    }

    #[test]
    fn nodeport_addresses_golden() {
        let c = RulesetConfig {
            nodeport_addresses: vec![
                "192.0.2.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
            ],
            masquerade_bit: 0,
            table: "fl".into(),
            ..cfg()
        };
        let mut out = String::new();
        render_base(&c, &mut out);
        golden("base-nodeport-addresses.nft", &out);
    }

    #[test]
    fn names_are_stable_short_and_distinct() {
        let a = spn("default", "web", "http", Protocol::Tcp);
        let b = spn("default", "web", "http", Protocol::Udp);
        assert_eq!(service_hash(&a), service_hash(&a.clone()));
        assert_ne!(service_hash(&a), service_hash(&b));
        assert_eq!(service_hash(&a).len(), 16);
        // Pinned: names live in the kernel across restarts and upgrades.
        assert_eq!(service_hash(&a), "tfme4cdfh6ghqmbp");
        let e1 = endpoint_hash(&a, "10.0.0.1:80".parse().unwrap());
        let e2 = endpoint_hash(&a, "10.0.0.1:81".parse().unwrap());
        assert_ne!(e1, e2);
        let long = spn(
            &"n".repeat(63),
            &"s".repeat(63),
            &"p".repeat(15),
            Protocol::Tcp,
        );
        let r = service_rules(
            &cfg(),
            &long,
            &info("10.96.0.1", 1, vec![ep("10.0.0.1:1", "x")]),
        );
        for c in &r.chains {
            assert!(c.name.len() <= 31, "{}", c.name);
            assert!(c.comment.len() <= 127);
        }
    }

    #[test]
    fn policies_and_unreachable_verdicts() {
        let c = cfg();
        // No endpoints: everything rejected, no chains.
        let mut i = info("10.96.0.1", 80, vec![]);
        i.node_port = Some(30000);
        let r = service_rules(&c, &spn("a", "b", "", Protocol::Tcp), &i);
        assert!(r.chains.is_empty());
        assert_eq!(
            r.elements
                .iter()
                .map(|e| (e.map, e.verdict.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (MapName::NoEndpointServices, "goto reject-chain"),
                (MapName::NoEndpointNodeports, "goto reject-chain")
            ]
        );
        // externalTrafficPolicy Local without local endpoints: the
        // ClusterIP works, the NodePort drops.
        i.endpoints = vec![ep("10.0.0.1:80", "other")];
        i.external_local = true;
        let r = service_rules(&c, &spn("a", "b", "", Protocol::Tcp), &i);
        let got: Vec<(MapName, &str)> = r
            .elements
            .iter()
            .map(|e| (e.map, e.verdict.as_str()))
            .collect();
        assert_eq!(got[1], (MapName::NoEndpointNodeports, "drop"));
        assert_eq!(got[0].0, MapName::ServiceIps);
        // IPv6 is skipped.
        let mut v6 = info("fd00::1", 80, vec![ep("[fd00::2]:80", "x")]);
        v6.external_ips = vec!["fd00::3".parse().unwrap()];
        let r = service_rules(&c, &spn("a", "v6", "", Protocol::Tcp), &v6);
        assert_eq!(r, ServiceRules::default());
    }

    #[test]
    fn conflicting_keys_go_to_the_first_service_port() {
        let c = cfg();
        let mut st = ProxyState::new();
        let a = spn("a", "x", "", Protocol::Tcp);
        let b = spn("b", "x", "", Protocol::Tcp);
        st.insert(
            b.clone(),
            Arc::new(info("10.96.0.1", 80, vec![ep("10.0.0.2:80", "n")])),
        );
        st.insert(
            a.clone(),
            Arc::new(info("10.96.0.1", 80, vec![ep("10.0.0.1:80", "n")])),
        );
        let r = Ruleset::build(c, &st);
        let els: Vec<Element> = r
            .elements()
            .into_iter()
            .filter(|e| e.map == MapName::ServiceIps)
            .collect();
        assert_eq!(els.len(), 1);
        assert_eq!(els[0].verdict, format!("goto svc-{}", service_hash(&a)));
    }
}
