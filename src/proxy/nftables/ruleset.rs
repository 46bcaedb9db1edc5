//! The desired nftables ruleset, computed by pure functions from the
//! [`ProxyState`] and the node's settings. Nothing here talks to the
//! kernel: rules are typed values ([`Rule`]) that render as `nft` syntax
//! (their `Display`, used by golden files and error messages) and encode as
//! netlink expressions ([`super::netlink`]); [`super::diff`] turns two models
//! into the operations of their difference.
//!
//! The model is split the way changes arrive: a fixed part that depends only
//! on the configuration ([`base_rules`]), and one [`ServiceRules`] per
//! service port, built by [`service_rules`] from that port alone. A change
//! to one Service therefore rebuilds (and diffs) only that Service's rules.
//!
//! # The ruleset
//!
//! fairlead owns `ip` tables named after the configured table (default
//! `fairlead`); nothing outside them is touched. With up to
//! [`super::NftablesConfig::shard_size`] service ports there is one, the
//! main table; with more, K tables (K a power of two): the main one and
//! shard tables `fairlead-1` ... `fairlead-<K-1>` (see [`shard_of`] for
//! which service port goes where, and the module doc of [`super`] for why).
//!
//! ```text
//! table ip fairlead {                       # the main table
//!   # Dispatch: one lookup per packet, whatever the number of Services.
//!   map service-ips           { ipv4_addr . inet_proto . inet_service : verdict }
//!       # ClusterIP . proto . port  : goto svc-bucket-<b>  (a plain service port)
//!       #                             goto svc-<h>  (or svl-<h>, internalTrafficPolicy Local)
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
//!   set fingerprint           { ipv6_addr }
//!       # one element: a 128-bit hash of the model the tables were built
//!       # from (and of K), updated in every transaction. A restarted daemon
//!       # whose desired model has the same hash adopts the tables as they are.
//!
//!   # Filter (priority -110, before DNAT): reject/drop new connections to
//!   # frontends without endpoints.
//!   chain filter-input   { hook input;   ct state new jump service-endpoints-check }
//!   chain filter-forward { hook forward; ct state new jump service-endpoints-check
//!                          <drop untranslated, below> }
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
//!   # or, when --nodeport-addresses are given, one rule per address
//!   # (`ip daddr <address>`).
//!   # After them (priority -99), for a new connection no table's DNAT
//!   # translated (nf_nat runs later nat chains only then):
//!   chain untranslated-output { hook output; <drop untranslated> }
//!   # <drop untranslated>: with the Service ranges configured, per range
//!   # `ip daddr <range> fib daddr type != local drop`. Traffic that
//!   # arrives (from pods) is judged in filter-forward, after prerouting's
//!   # DNAT and after the reject of frontends without endpoints (a
//!   # prerouting chain would come before that reject, and drop what it
//!   # should refuse); the node's own, in untranslated-output (filter-output
//!   # comes before DNAT).
//!   # Why drop: such a connection's first packet reached a Service address
//!   # before the Service's rules were in (a few ms after it was created),
//!   # or crossed the commit of a rebuild of every table, whose old maps a
//!   # lookup then finds empty. Let through, it leaves untranslated and
//!   # conntrack records that: every retransmitted SYN follows the entry,
//!   # not the nat chains, until the connect times out. Dropped, no entry
//!   # is kept, and the client's next SYN, a second later, is balanced.
//!   # Local addresses pass: the cluster DNS address, which every node
//!   # serves itself, has no DNAT.
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
//!   <per service port: its map, chains and sets, below>  (with one table,
//!   every service port; with shards, those with a NodePort)
//! }
//!
//! table ip fairlead-<i> {                   # a shard, 1 <= i < K
//!   map service-ips { ... }                 # its service ports' frontends
//!   # Dispatch right in the entry points: every new connection passes
//!   # every table's NAT chains (until one DNATs it), so each hop counts.
//!   chain nat-prerouting { hook prerouting; ip daddr . meta l4proto . th dport vmap @service-ips }
//!   chain nat-output     { hook output;     ip daddr . meta l4proto . th dport vmap @service-ips }
//!   chain mark-for-masquerade { meta mark set meta mark | M }
//!   <per service port: its map, chains and sets>
//! }
//!
//! # Per service port (h = hash of namespace/name:port/protocol):
//! map eps-<h>-<N> { typeof numgen inc mod N : ip daddr . <proto> dport }
//!     # 0 : <ip . port of endpoint 0>, ..., N-1 : <endpoint N-1>
//!
//! # A plain service port (one IPv4 ClusterIP; no NodePort, external IP,
//! # affinity or local traffic policy: most of them) has no chain and no
//! # map of its own. Its one rule sits in one of the table's 64 bucket
//! # chains (b = other bits of the same hash, see `bucket_of`), and its
//! # endpoints are entries of the bucket's shared map, keyed by its own
//! # frontend; both exist while the bucket holds rules:
//! map eps-bucket-<b> { typeof ip daddr . meta l4proto . th dport . numgen inc mod 1 : ip daddr . th dport }
//!     # <ClusterIP> . <proto> . <port> . i : <ip . port of endpoint i>
//! chain svc-bucket-<b> {
//!   ip daddr <ClusterIP> <proto> dport <port> dnat ip to ip daddr . meta l4proto . <proto> dport . numgen inc mod N map @eps-bucket-<b> comment "<ns>/<name>:<port> <proto>"
//!   ...                          # ~16 service ports per bucket at most sizes
//! }
//! # Why a shared map: the kernel finds a set by name in a list of the
//! # table's sets, for every new set (`nf_tables_newset`), rule lookup
//! # and element message (`nft_set_lookup_global`); with a map per
//! # service port those walks were most of the kernel's work in a bulk
//! # load. Each rule that binds a map makes the kernel walk the map's
//! # elements (`nf_tables_bind_set`: its shortcut for a second binding
//! # from the same chain compares with the new binding's chain before it
//! # is set, so it never applies), so a bucket's map costs a new rule its
//! # bucket's entries (tens to hundreds), where one map for all Services
//! # cost every entry (quadratic; see the module doc of [`super`]). The key holds the frontend, not an
//! # allocated id: nothing to allocate, and a restarted daemon computes
//! # the same keys. A frontend's entries are its dispatch element's
//! # programmed claimant's (see [`Ruleset`]), so two service ports with
//! # one frontend never write the same keys.
//! # Why: every nf_tables commit walks every chain of every table
//! # (nf_tables_commit, "step 2"), whatever it changed; with a chain per
//! # service port that walk was 69% of the node's CPU per change at
//! # 30,000 Services. A new connection's first packet now also compares
//! # its address with the rules before its own (two expressions each).
//! # A rule is deleted by its kernel handle, found by listing its bucket
//! # chain and matching the comment (a rule's `numgen` counter is its
//! # own, so the other rules of the bucket keep their round robin).
//!
//! # Every other service port has its chain and its own map:
//! chain svc-<h> {                # all usable endpoints, round robin
//!   meta l4proto <proto> dnat ip to numgen inc mod N map @eps-<h>-<N>
//! }
//! # `numgen inc` counts the rule's connections: each endpoint gets exactly
//! # one of every N new connections. The endpoints are data, not rules:
//! # replacing one (N unchanged) changes map entries only, which the kernel
//! # commits without re-validating the table; a new N is a new map and a
//! # new rule. One endpoint: `meta l4proto <proto> dnat to <ip>:<port>`.
//! # (Not `numgen inc mod N vmap { ... }`: each such rule creates an
//! # anonymous set, and the kernel names those in time linear in the table.)
//! # With sessionAffinity ClientIP, one rule per endpoint instead:
//! chain svc-<h> {
//!   ip saddr @aff-<a1> goto sep-<e1>        # a client seen recently
//!   ...
//!   numgen inc mod N == 0 goto sep-<e1>     # one new connection in N
//!   numgen inc mod N-1 == 0 goto sep-<e2>   # one in N-1 of the rest
//!   ...
//!   goto sep-<eN>                           # the one left
//! }
//! chain sep-<e> {                           # e = hash of the port and ip:port
//!   update @aff-<a> { ip saddr }
//!   meta l4proto <proto> dnat to <ip>:<port>
//! }
//! set aff-<a> { type ipv4_addr; flags dynamic,timeout; timeout <affinity timeout> }
//! chain svl-<h> { ... }          # the same over this node's endpoints (map
//!                                # epl-<h>-<N>; only with a traffic policy Local)
//! chain ext-<h> {                # NodePort / external IP traffic
//!   jump mark-for-masquerade; goto svc-<h>     # externalTrafficPolicy Cluster
//!   # externalTrafficPolicy Local: keep the client address, except for
//!   # traffic from this node itself, which may use any endpoint:
//!   fib saddr type local jump mark-for-masquerade
//!   fib saddr type local goto svc-<h>
//!   goto svl-<h>
//! }
//! ```
//!
//! Usable endpoints are [`ServicePortInfo::usable_endpoints`]: ready ones,
//! else serving-and-terminating ones. Chain, map and set names are stable (a
//! hash of what they stand for, in base32). The affinity timeout is part of
//! an `aff-` set's hash, so a set never changes its definition under one
//! name. The tables are IPv4 only: IPv6 frontends and endpoints are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
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
    /// The Service ClusterIP ranges (network, prefix length): a new
    /// connection to them that no Service rule translated is dropped.
    pub service_ranges: Vec<(Ipv4Addr, u8)>,
}

impl Default for RulesetConfig {
    fn default() -> Self {
        RulesetConfig {
            table: "fairlead".to_string(),
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            masquerade_bit: 14,
            service_ranges: Vec::new(),
        }
    }
}

impl RulesetConfig {
    fn mark(&self) -> u32 {
        1u32 << (self.masquerade_bit.min(31))
    }

    /// The matches selecting NodePort traffic (one dispatch rule each);
    /// none when no configured NodePort address is IPv4.
    fn nodeport_matches(&self) -> Vec<NodeportMatch> {
        if self.nodeport_addresses.is_empty() {
            return vec![NodeportMatch::LocalNonLoopback];
        }
        let v4: BTreeSet<Ipv4Addr> = self
            .nodeport_addresses
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        v4.into_iter().map(NodeportMatch::Address).collect()
    }
}

/// The fixed sets and maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapName {
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    /// A set (no verdicts): `endpoint ip . endpoint ip`, for hairpin
    /// masquerading.
    HairpinEndpoints,
    /// A set holding the model's fingerprint (one `ipv6_addr`-typed
    /// element: 128 bits).
    Fingerprint,
}

impl MapName {
    pub const ALL: [MapName; 6] = [
        MapName::ServiceIps,
        MapName::ServiceNodeports,
        MapName::NoEndpointServices,
        MapName::NoEndpointNodeports,
        MapName::HairpinEndpoints,
        MapName::Fingerprint,
    ];

    /// A set rather than a verdict map.
    pub fn is_set(&self) -> bool {
        matches!(self, MapName::HairpinEndpoints | MapName::Fingerprint)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            MapName::ServiceIps => "service-ips",
            MapName::ServiceNodeports => "service-nodeports",
            MapName::NoEndpointServices => "no-endpoint-services",
            MapName::NoEndpointNodeports => "no-endpoint-nodeports",
            MapName::HairpinEndpoints => "hairpin-endpoints",
            MapName::Fingerprint => "fingerprint",
        }
    }

    pub fn key_type(&self) -> &'static str {
        match self {
            MapName::ServiceIps | MapName::NoEndpointServices => {
                "ipv4_addr . inet_proto . inet_service"
            }
            MapName::ServiceNodeports | MapName::NoEndpointNodeports => "inet_proto . inet_service",
            MapName::HairpinEndpoints => "ipv4_addr . ipv4_addr",
            MapName::Fingerprint => "ipv6_addr",
        }
    }
}

/// Where a rule (or map element) sends a packet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Return,
    Drop,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Return => f.write_str("return"),
            Verdict::Drop => f.write_str("drop"),
        }
    }
}

/// Which destinations count as NodePort addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeportMatch {
    /// Every local address except 127.0.0.0/8.
    LocalNonLoopback,
    /// One `--nodeport-addresses` address.
    Address(Ipv4Addr),
}

impl fmt::Display for NodeportMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeportMatch::LocalNonLoopback => {
                f.write_str("fib daddr type local ip daddr != 127.0.0.0/8")
            }
            NodeportMatch::Address(a) => write!(f, "ip daddr {a}"),
        }
    }
}

/// What a balancing rule does with the connection it picked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `meta l4proto <proto> dnat to <ip>:<port>`
    Dnat { proto: Protocol, to: SocketAddrV4 },
    /// `goto <endpoint chain>` (with ClientIP affinity)
    Goto(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dnat { proto, to } => {
                write!(f, "meta l4proto {} dnat to {to}", proto_name(*proto))
            }
            Target::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// One rule. The shapes are few and fixed; each renders as the `nft`
/// statement it stands for and encodes as its netlink expressions
/// ([`super::netlink::encode_rule`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `ct state new <verdict>`
    CtStateNew(Verdict),
    /// `ip daddr . meta l4proto . th dport vmap @<map>`
    DispatchFrontends(MapName),
    /// `<nodeport match> meta l4proto . th dport vmap @<map>`
    DispatchNodeports(NodeportMatch, MapName),
    /// `ct status dnat ip saddr . ip daddr @hairpin-endpoints <verdict>`
    Hairpin(Verdict),
    /// `meta mark & <m> == 0 return`
    ReturnUnlessMarked(u32),
    /// `meta mark set meta mark ^ <m>`
    MarkXor(u32),
    /// `meta mark set meta mark | <m>`
    MarkOr(u32),
    /// `masquerade fully-random`
    Masquerade,
    /// `ip saddr <from> ip daddr != <inside> masquerade`: traffic from
    /// `from` leaving `inside` (the pod network's egress rule,
    /// [`crate::kubelet::network`]).
    MasqueradeLeaving {
        from: (Ipv4Addr, u8),
        inside: (Ipv4Addr, u8),
    },
    /// `ip daddr <net> fib daddr type != local drop`: a new connection to
    /// a Service range that no DNAT translated (the node's own addresses
    /// in it, such as the cluster DNS address every node serves itself,
    /// are left alone).
    DropUntranslated((Ipv4Addr, u8)),
    /// `meta l4proto tcp reject with tcp reset`
    RejectTcpReset,
    /// `reject` (ICMP port unreachable)
    Reject,
    /// `<verdict>`
    Verdict(Verdict),
    /// `fib saddr type local <verdict>`
    FromLocal(Verdict),
    /// `ip saddr @<set> <verdict>`
    AffinityHit { set: String, then: Verdict },
    /// `update @<set> { ip saddr }`
    AffinityUpdate(String),
    /// `[numgen inc mod <n> == 0] <target>`
    Pick {
        modulus: Option<u32>,
        target: Target,
    },
    /// `meta l4proto <proto> dnat ip to numgen inc mod <n> map @<map>`:
    /// round robin over an endpoint map ([`EndpointMap`]) of `n` entries.
    DnatMap {
        proto: Protocol,
        modulus: u32,
        map: String,
    },
    /// `meta l4proto <proto> dnat ip to ip daddr . meta l4proto . <proto>
    /// dport . numgen inc mod <n> map @<map>`: round robin over the
    /// entries of a bucket's shared endpoint map ([`bucket_map`]) keyed by
    /// the service port's own frontend (only in a [`Rule::Frontend`]).
    DnatBucketMap {
        proto: Protocol,
        modulus: u32,
        bucket: u32,
    },
    /// `ip daddr <ip> <proto> dport <port> <then>`: one service port's
    /// balancing rule in a shared bucket chain ([`BucketRule`]). `then` is
    /// a [`Rule::DnatMap`] or a DNAT [`Rule::Pick`]; the protocol match
    /// that `nft` wants in front of a DNAT is the one here.
    Frontend {
        ip: Ipv4Addr,
        proto: Protocol,
        port: u16,
        then: Box<Rule>,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::CtStateNew(v) => write!(f, "ct state new {v}"),
            Rule::DispatchFrontends(m) => {
                write!(f, "ip daddr . meta l4proto . th dport vmap @{}", m.as_str())
            }
            Rule::DispatchNodeports(np, m) => {
                write!(f, "{np} meta l4proto . th dport vmap @{}", m.as_str())
            }
            Rule::Hairpin(v) => write!(
                f,
                "ct status dnat ip saddr . ip daddr @{} {v}",
                MapName::HairpinEndpoints.as_str()
            ),
            Rule::ReturnUnlessMarked(m) => write!(f, "meta mark & {m:#x} == 0 return"),
            Rule::MarkXor(m) => write!(f, "meta mark set meta mark ^ {m:#x}"),
            Rule::MarkOr(m) => write!(f, "meta mark set meta mark | {m:#x}"),
            Rule::Masquerade => f.write_str("masquerade fully-random"),
            Rule::MasqueradeLeaving { from, inside } => write!(
                f,
                "ip saddr {}/{} ip daddr != {}/{} masquerade",
                from.0, from.1, inside.0, inside.1
            ),
            Rule::DropUntranslated((net, len)) => {
                write!(f, "ip daddr {net}/{len} fib daddr type != local drop")
            }
            Rule::RejectTcpReset => f.write_str("meta l4proto tcp reject with tcp reset"),
            Rule::Reject => f.write_str("reject"),
            Rule::Verdict(v) => write!(f, "{v}"),
            Rule::FromLocal(v) => write!(f, "fib saddr type local {v}"),
            Rule::AffinityHit { set, then } => write!(f, "ip saddr @{set} {then}"),
            Rule::AffinityUpdate(set) => write!(f, "update @{set} {{ ip saddr }}"),
            Rule::Pick {
                modulus: Some(n),
                target,
            } => write!(f, "numgen inc mod {n} == 0 {target}"),
            Rule::Pick {
                modulus: None,
                target,
            } => write!(f, "{target}"),
            Rule::DnatMap {
                proto,
                modulus,
                map,
            } => write!(
                f,
                "meta l4proto {} dnat ip to numgen inc mod {modulus} map @{map}",
                proto_name(*proto)
            ),
            Rule::DnatBucketMap {
                proto,
                modulus,
                bucket,
            } => {
                let p = proto_name(*proto);
                write!(
                    f,
                    "meta l4proto {p} dnat ip to ip daddr . meta l4proto . {p} dport . numgen inc mod {modulus} map @{}",
                    bucket_map(*bucket)
                )
            }
            Rule::Frontend {
                ip,
                proto,
                port,
                then,
            } => {
                write!(f, "ip daddr {ip} {} dport {port} ", proto_name(*proto))?;
                // The inner DNAT without its own protocol match: the
                // `<proto> dport` above is that match.
                match then.as_ref() {
                    Rule::DnatMap { modulus, map, .. } => {
                        write!(f, "dnat ip to numgen inc mod {modulus} map @{map}")
                    }
                    Rule::DnatBucketMap {
                        proto,
                        modulus,
                        bucket,
                    } => write!(
                        f,
                        "dnat ip to ip daddr . meta l4proto . {} dport . numgen inc mod {modulus} map @{}",
                        proto_name(*proto),
                        bucket_map(*bucket)
                    ),
                    Rule::Pick {
                        modulus: None,
                        target: Target::Dnat { to, .. },
                    } => write!(f, "dnat to {to}"),
                    other => write!(f, "{other}"),
                }
            }
        }
    }
}

/// A regular (non-base) chain: its name, a comment saying what it is for,
/// and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub comment: String,
    pub rules: Vec<Rule>,
}

/// A ClientIP affinity set of one endpoint (`dynamic,timeout`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AffinitySet {
    pub name: String,
    pub timeout_secs: u64,
}

/// The key of a map or set element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `ip . proto . port` (service-ips, no-endpoint-services)
    Frontend(Ipv4Addr, Protocol, u16),
    /// `proto . port` (the NodePort maps)
    NodePort(Protocol, u16),
    /// `ip . ip` (hairpin-endpoints)
    Pair(Ipv4Addr, Ipv4Addr),
    /// The model's fingerprint (shown as an IPv6 address).
    Fingerprint(u128),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Frontend(ip, p, port) => write!(f, "{ip} . {} . {port}", proto_name(*p)),
            Key::NodePort(p, port) => write!(f, "{} . {port}", proto_name(*p)),
            Key::Pair(a, b) => write!(f, "{a} . {b}"),
            Key::Fingerprint(h) => write!(f, "{}", Ipv6Addr::from(*h)),
        }
    }
}

/// One element of a dispatch map (`verdict` None: a set element).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub map: MapName,
    pub key: Key,
    pub verdict: Option<Verdict>,
}

/// The endpoints a service port balances over, as a data map from
/// `numgen inc mod N` to `ip . port` (entry i is the i-th endpoint). The
/// balancing rule reads it ([`Rule::DnatMap`]), so replacing an endpoint
/// while the number of endpoints stays is an element change in a data map:
/// the kernel then re-validates nothing. The name carries N: when the
/// number changes, a new map replaces the old one with the rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointMap {
    pub name: String,
    pub proto: Protocol,
    pub endpoints: Vec<SocketAddrV4>,
}

impl EndpointMap {
    /// Its declaration's body (`typeof ...`), as `nft` takes it.
    pub fn type_text(&self) -> String {
        format!(
            "typeof numgen inc mod {} : ip daddr . {} dport",
            self.endpoints.len(),
            proto_name(self.proto)
        )
    }
}

/// The key of an endpoint map entry: the index `numgen` picks, after the
/// service port's frontend in a bucket's shared map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    /// `ip . proto . port` ([`Key::Frontend`]) in a shared map.
    pub frontend: Option<Key>,
    pub index: u32,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.frontend {
            Some(k) => write!(f, "{k} . {}", self.index),
            None => write!(f, "{}", self.index),
        }
    }
}

/// The declaration of every bucket's shared endpoint map: the frontend
/// and `numgen`'s pick to the endpoint (the modulus is each rule's own).
pub const BUCKET_MAP_TYPE: &str =
    "typeof ip daddr . meta l4proto . th dport . numgen inc mod 1 : ip daddr . th dport";

/// A plain service port's balancing rule, in one of its table's shared
/// bucket chains (see the module doc). The comment names the service port
/// and is how a sync finds the rule's kernel handle to delete it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketRule {
    /// Which bucket ([`bucket_of`]); the chain is [`bucket_chain`]`(bucket)`.
    pub bucket: u32,
    pub chain: String,
    pub comment: String,
    pub rule: Rule,
    /// The entries the rule reads from [`bucket_map`]`(bucket)`, keyed by
    /// [`BucketRule::frontend`] and the index (empty when the rule DNATs
    /// to its one endpoint directly).
    pub endpoints: Vec<SocketAddrV4>,
}

impl BucketRule {
    /// The frontend its rule matches: the key prefix of its entries, and
    /// its dispatch element's key in `service-ips`.
    pub fn frontend(&self) -> Key {
        match &self.rule {
            Rule::Frontend {
                ip, proto, port, ..
            } => Key::Frontend(*ip, *proto, *port),
            other => unreachable!("a bucket rule is a frontend rule: {other}"),
        }
    }
}

/// Everything one service port contributes to the table. Chain, set and
/// map names are unique to the service port (bucket chains are shared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    pub chains: Vec<Chain>,
    /// The balancing rule of a plain service port (instead of a chain).
    pub bucket: Option<BucketRule>,
    pub sets: Vec<AffinitySet>,
    /// Endpoint maps (created before the chains that read them).
    pub maps: Vec<EndpointMap>,
    /// Deduplicated by (map, key).
    pub elements: Vec<Element>,
    /// Hash of all of the above and the service port's name (see
    /// [`Ruleset::fingerprint`]).
    pub fingerprint: u128,
}

impl ServiceRules {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum::<usize>() + self.bucket.iter().count()
    }
}

/// Bucket chains per table: a table holds up to ~1,000 service ports
/// ([`super::DEFAULT_SHARD_SIZE`] on average), so ~16 rules per bucket.
pub const BUCKETS: u32 = 64;

/// The name of bucket chain `b`.
pub fn bucket_chain(b: u32) -> String {
    format!("svc-bucket-{b:02}")
}

/// The name of bucket `b`'s shared endpoint map.
pub fn bucket_map(b: u32) -> &'static str {
    static NAMES: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..BUCKETS).map(|b| format!("eps-bucket-{b:02}")).collect());
    &NAMES[b as usize]
}

/// Which bucket a service port's rule goes to (other bits of its name's
/// hash than [`shard_of`] uses, so every shard's buckets fill evenly).
pub fn bucket_of(spn: &ServicePortName) -> u32 {
    ((fnv128(&[&spn_key(spn)]) >> 96) as u32) % BUCKETS
}

// ---- names ------------------------------------------------------------------

/// FNV-1a, 128 bits, fed as a `fmt::Write`: stable across Rust versions
/// and processes (chain names and the fingerprint outlive the daemon in
/// the kernel).
pub(crate) struct Fnv128(u128);

impl Fnv128 {
    pub(crate) fn new() -> Self {
        Fnv128(0x6c62272e07bb014262b821756295c58d)
    }

    fn byte(&mut self, b: u8) {
        const PRIME: u128 = 0x0000000001000000000000000000013B;
        self.0 ^= b as u128;
        self.0 = self.0.wrapping_mul(PRIME);
    }

    /// A part separator (0xff never occurs in UTF-8).
    pub(crate) fn separator(&mut self) {
        self.byte(0xff);
    }

    /// Raw bytes (fixed-length fields, so no separator is needed).
    fn bytes(&mut self, b: &[u8]) {
        for x in b {
            self.byte(*x);
        }
    }

    pub(crate) fn finish(&self) -> u128 {
        // FNV's top bits barely depend on the last bytes: finish with an
        // xorshift-multiply avalanche so every input bit reaches the bits
        // used.
        let mut h = self.0;
        h ^= h >> 64;
        h = h.wrapping_mul(0x9e3779b97f4a7c15f39cc0605cedc835);
        h ^= h >> 67;
        h = h.wrapping_mul(0xc2b2ae3d27d4eb4f165667b19e3779f9);
        h ^= h >> 64;
        h
    }
}

impl fmt::Write for Fnv128 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.byte(b);
        }
        Ok(())
    }
}

fn fnv128(parts: &[&str]) -> u128 {
    let mut h = Fnv128::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.separator();
        }
        let _ = h.write_str(p);
    }
    h.finish()
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
    let mut elements: BTreeMap<(MapName, Key), Option<Verdict>> = BTreeMap::new();
    for &ep in &all {
        let ip = *ep.ip();
        elements.insert((MapName::HairpinEndpoints, Key::Pair(ip, ip)), None);
        if let Some(t) = affinity {
            let set = affinity_set_name(spn, ep, t);
            out.chains.push(Chain {
                name: sep(ep),
                comment: comment(&format!("{spn} {proto} -> {ep}")),
                rules: vec![
                    Rule::AffinityUpdate(set.clone()),
                    Rule::Pick {
                        modulus: None,
                        target: Target::Dnat {
                            proto: spn.protocol,
                            to: ep,
                        },
                    },
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
        Some(_) => Target::Goto(sep(ep)),
        None => Target::Dnat {
            proto: spn.protocol,
            to: ep,
        },
    };

    // A plain service port (one IPv4 ClusterIP, nothing but cluster-wide
    // round robin: no affinity, no local policy, no NodePort or external
    // address) needs no chain of its own: its one balancing rule, matching
    // its frontend, goes to a shared bucket chain, which its dispatch
    // element jumps to, and its endpoints are entries of the bucket's
    // shared endpoint map.
    let cluster_ips: Vec<Ipv4Addr> = v4_ips(&info.cluster_ips).collect();
    let plain = !use_svl
        && affinity.is_none()
        && !has_external
        && !info.internal_local
        && cluster_ips.len() == 1;
    let bucket = bucket_of(spn);
    let mut bucket_eps: Vec<SocketAddrV4> = Vec::new();

    // Round robin over a list of endpoints: with affinity, one rule per
    // endpoint (after the affinity rules); otherwise one rule reading an
    // endpoint map (named `<kind>-<hash>-<n>`, or the bucket's shared one
    // for a plain service port), or a plain DNAT for one endpoint.
    let mut maps: Vec<EndpointMap> = Vec::new();
    let mut balance = |eps: &[SocketAddrV4], kind: &str| -> Vec<Rule> {
        let mut rules = Vec::new();
        let n = eps.len();
        if let Some(t) = affinity {
            for &ep in eps {
                rules.push(Rule::AffinityHit {
                    set: affinity_set_name(spn, ep, t),
                    then: Verdict::Goto(sep(ep)),
                });
            }
            // Rule i sees the connections rules 0..i left, N - i of every
            // N, and takes one of them: exact round robin, without a set.
            for (i, &ep) in eps.iter().enumerate() {
                rules.push(Rule::Pick {
                    modulus: (i + 1 < n).then(|| (n - i) as u32),
                    target: target(ep),
                });
            }
        } else if n == 1 {
            rules.push(Rule::Pick {
                modulus: None,
                target: target(eps[0]),
            });
        } else if plain {
            rules.push(Rule::DnatBucketMap {
                proto: spn.protocol,
                modulus: n as u32,
                bucket,
            });
            bucket_eps = eps.to_vec();
        } else {
            let map = format!("{kind}-{h}-{n}");
            rules.push(Rule::DnatMap {
                proto: spn.protocol,
                modulus: n as u32,
                map: map.clone(),
            });
            maps.push(EndpointMap {
                name: map,
                proto: spn.protocol,
                endpoints: eps.to_vec(),
            });
        }
        rules
    };
    let svc_rules = use_svc.then(|| balance(&cluster, "eps"));
    let svl_rules = use_svl.then(|| balance(&local, "epl"));
    out.maps = maps;
    let mut bucket_target = None;
    match svc_rules {
        Some(mut rules) if plain && rules.len() == 1 => {
            let chain = bucket_chain(bucket);
            bucket_target = Some(chain.clone());
            out.bucket = Some(BucketRule {
                bucket,
                chain,
                comment: comment(&format!("{spn} {proto}")),
                rule: Rule::Frontend {
                    ip: cluster_ips[0],
                    proto: spn.protocol,
                    port: info.port,
                    then: Box::new(rules.pop().expect("one rule")),
                },
                endpoints: std::mem::take(&mut bucket_eps),
            });
        }
        Some(rules) => out.chains.push(Chain {
            name: svc.clone(),
            comment: comment(&format!("{spn} {proto}")),
            rules,
        }),
        None => {}
    }
    if let Some(rules) = svl_rules {
        out.chains.push(Chain {
            name: svl.clone(),
            comment: comment(&format!("{spn} {proto} local endpoints")),
            rules,
        });
    }

    let internal_target = if info.internal_local {
        (!local.is_empty()).then_some(&svl)
    } else if let Some(b) = &bucket_target {
        Some(b)
    } else {
        (!cluster.is_empty()).then_some(&svc)
    };
    if has_external && external_reachable {
        let mark = || Verdict::Jump(MARK_FOR_MASQUERADE.to_string());
        let rules = if info.external_local {
            vec![
                Rule::FromLocal(mark()),
                Rule::FromLocal(Verdict::Goto(svc.clone())),
                Rule::Verdict(Verdict::Goto(svl.clone())),
            ]
        } else {
            vec![
                Rule::Verdict(mark()),
                Rule::Verdict(Verdict::Goto(svc.clone())),
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
        Verdict::Goto(REJECT_CHAIN.to_string())
    } else {
        Verdict::Drop
    };
    let mut put = |map: MapName, key: Key, verdict: Verdict| {
        elements.entry((map, key)).or_insert(Some(verdict));
    };
    let p = spn.protocol;
    for ip in v4_ips(&info.cluster_ips) {
        let key = Key::Frontend(ip, p, info.port);
        match internal_target {
            Some(t) => put(MapName::ServiceIps, key, Verdict::Goto(t.clone())),
            None => put(MapName::NoEndpointServices, key, unreachable.clone()),
        }
    }
    for ip in external_ips {
        let key = Key::Frontend(ip, p, info.port);
        if external_reachable {
            put(MapName::ServiceIps, key, Verdict::Goto(ext.clone()));
        } else {
            put(MapName::NoEndpointServices, key, unreachable.clone());
        }
    }
    if let Some(np) = info.node_port {
        let key = Key::NodePort(p, np);
        if external_reachable {
            put(MapName::ServiceNodeports, key, Verdict::Goto(ext.clone()));
        } else {
            put(MapName::NoEndpointNodeports, key, unreachable.clone());
        }
    }
    out.elements = elements
        .into_iter()
        .map(|((map, key), verdict)| Element { map, key, verdict })
        .collect();
    out.fingerprint = service_fingerprint(spn, &out);
    out
}

/// The hash of one service port's rules, from their `nft` rendering (so it
/// does not depend on how Rust hashes types).
fn service_fingerprint(spn: &ServicePortName, r: &ServiceRules) -> u128 {
    let mut h = Fnv128::new();
    let _ = write!(h, "{}", spn_key(spn));
    for c in &r.chains {
        h.separator();
        let _ = write!(h, "chain {} {}", c.name, c.comment);
        for rule in &c.rules {
            h.separator();
            let _ = write!(h, "{rule}");
        }
    }
    if let Some(b) = &r.bucket {
        h.separator();
        let _ = write!(h, "bucket {} {} comment {}", b.chain, b.rule, b.comment);
        for ep in &b.endpoints {
            h.bytes(&ep.ip().octets());
            h.bytes(&ep.port().to_be_bytes());
        }
    }
    for s in &r.sets {
        h.separator();
        let _ = write!(h, "set {} {}", s.name, s.timeout_secs);
    }
    // Endpoints and element keys as bytes, not text: they are most of a
    // service port's parts, and formatting addresses was most of the
    // hashing's cost in a bulk load.
    for m in &r.maps {
        h.separator();
        let _ = write!(h, "map {} {}", m.name, m.type_text());
        for ep in &m.endpoints {
            h.bytes(&ep.ip().octets());
            h.bytes(&ep.port().to_be_bytes());
        }
    }
    for e in &r.elements {
        h.separator();
        let _ = write!(h, "element {} ", e.map.as_str());
        match e.key {
            Key::Frontend(ip, p, port) => {
                h.bytes(&[0]);
                h.bytes(&ip.octets());
                h.bytes(proto_name(p).as_bytes());
                h.bytes(&port.to_be_bytes());
            }
            Key::NodePort(p, port) => {
                h.bytes(&[1]);
                h.bytes(proto_name(p).as_bytes());
                h.bytes(&port.to_be_bytes());
            }
            Key::Pair(a, b) => {
                h.bytes(&[2]);
                h.bytes(&a.octets());
                h.bytes(&b.octets());
            }
            Key::Fingerprint(f) => {
                h.bytes(&[3]);
                h.bytes(&f.to_be_bytes());
            }
        }
        if let Some(v) = &e.verdict {
            let _ = write!(h, " : {v}");
        }
    }
    h.finish()
}

// ---- the fixed part ---------------------------------------------------------

/// The helper chain that marks a connection for masquerading.
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// The helper chain rejecting connections to frontends without endpoints.
pub const REJECT_CHAIN: &str = "reject-chain";

/// A netfilter hook a base chain is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn as_str(&self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }

    /// The kernel's number (`NF_INET_*`).
    pub fn number(&self) -> u32 {
        match self {
            Hook::Prerouting => 0,
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        }
    }
}

/// A base chain: where packets enter the table.
#[derive(Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub name: &'static str,
    /// `filter` or `nat`.
    pub kind: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

pub const BASE_CHAINS: [BaseChain; 7] = [
    BaseChain {
        name: "filter-input",
        kind: "filter",
        hook: Hook::Input,
        priority: -110,
    },
    BaseChain {
        name: "filter-forward",
        kind: "filter",
        hook: Hook::Forward,
        priority: -110,
    },
    BaseChain {
        name: "filter-output",
        kind: "filter",
        hook: Hook::Output,
        priority: -110,
    },
    BaseChain {
        name: "nat-prerouting",
        kind: "nat",
        hook: Hook::Prerouting,
        priority: -100,
    },
    BaseChain {
        name: "nat-output",
        kind: "nat",
        hook: Hook::Output,
        priority: -100,
    },
    BaseChain {
        name: "nat-postrouting",
        kind: "nat",
        hook: Hook::Postrouting,
        priority: 100,
    },
    // After every table's DNAT chains (-100): nf_nat runs a later nat
    // chain only for a connection none of them translated.
    BaseChain {
        name: "untranslated-output",
        kind: "nat",
        hook: Hook::Output,
        priority: -99,
    },
];

/// The regular chains of the fixed part.
pub const HELPER_CHAINS: [&str; 5] = [
    "service-endpoints-check",
    "services",
    "masquerading",
    MARK_FOR_MASQUERADE,
    REJECT_CHAIN,
];

/// The fixed part's rules, in order, with the chain each goes to.
pub fn base_rules(cfg: &RulesetConfig) -> Vec<(&'static str, Rule)> {
    let mark = cfg.mark();
    let jump = |c: &str| Verdict::Jump(c.to_string());
    let mut v = Vec::new();
    for c in ["filter-input", "filter-forward", "filter-output"] {
        v.push((c, Rule::CtStateNew(jump("service-endpoints-check"))));
    }
    let nodeports = cfg.nodeport_matches();
    v.push((
        "service-endpoints-check",
        Rule::DispatchFrontends(MapName::NoEndpointServices),
    ));
    for np in &nodeports {
        v.push((
            "service-endpoints-check",
            Rule::DispatchNodeports(*np, MapName::NoEndpointNodeports),
        ));
    }
    v.push(("nat-prerouting", Rule::Verdict(jump("services"))));
    v.push(("nat-output", Rule::Verdict(jump("services"))));
    v.push(("nat-postrouting", Rule::Verdict(jump("masquerading"))));
    for range in &cfg.service_ranges {
        v.push(("filter-forward", Rule::DropUntranslated(*range)));
        v.push(("untranslated-output", Rule::DropUntranslated(*range)));
    }
    v.push(("services", Rule::DispatchFrontends(MapName::ServiceIps)));
    for np in &nodeports {
        v.push((
            "services",
            Rule::DispatchNodeports(*np, MapName::ServiceNodeports),
        ));
    }
    v.push(("masquerading", Rule::Hairpin(jump(MARK_FOR_MASQUERADE))));
    v.push(("masquerading", Rule::ReturnUnlessMarked(mark)));
    v.push(("masquerading", Rule::MarkXor(mark)));
    v.push(("masquerading", Rule::Masquerade));
    v.push((MARK_FOR_MASQUERADE, Rule::MarkOr(mark)));
    // ICMP port unreachable does not fail a local TCP connect (the SYN
    // is just retried): TCP gets a reset.
    v.push((REJECT_CHAIN, Rule::RejectTcpReset));
    v.push((REJECT_CHAIN, Rule::Reject));
    v
}

/// Bumped when the table's shape changes in a way the per-service
/// fingerprints would not show, so an upgraded daemon rebuilds the table.
const FORMAT: &str = "fairlead-nftables-v4";

/// The hash of the fixed part (not of the table's name: tables with the
/// same contents have the same fingerprint) and of the number of shards.
fn base_fingerprint(cfg: &RulesetConfig, shards: u32) -> u128 {
    let mut h = Fnv128::new();
    let _ = write!(h, "{FORMAT}");
    for (chain, rule) in base_rules(cfg) {
        h.separator();
        let _ = write!(h, "{chain} {rule}");
    }
    // One table hashes as before sharding existed: its contents are the
    // same.
    if shards > 1 {
        h.separator();
        let _ = write!(h, "shards {shards}");
    }
    h.finish()
}

// ---- tables and shards ------------------------------------------------------

/// Which of fairlead's tables: 0 is the main table (named like the
/// configured table), `i > 0` is the shard table `<table>-<i>`.
pub type TableId = u32;

/// The name of table `id`.
pub fn table_name(base: &str, id: TableId) -> std::borrow::Cow<'_, str> {
    if id == 0 {
        std::borrow::Cow::Borrowed(base)
    } else {
        std::borrow::Cow::Owned(format!("{base}-{id}"))
    }
}

/// The shard number in a table name of ours (`<base>` is 0, `<base>-<i>`
/// is i), or `None` for someone else's table.
pub fn table_id(base: &str, name: &str) -> Option<TableId> {
    if name == base {
        return Some(0);
    }
    let n = name.strip_prefix(base)?.strip_prefix('-')?;
    if n.starts_with('0') || n.is_empty() {
        return None;
    }
    n.parse().ok().filter(|i| *i > 0)
}

/// The table holding a service port's chains, sets and dispatch elements,
/// among `shards` (a power of two). With one table, the main one. With
/// more: service ports with a NodePort stay in the main table, so that
/// NodePort dispatch (a `fib` route lookup per new connection) happens in
/// one table only (and there are at most ~2,768 NodePorts); the others go
/// to shard tables 1..K by a hash of their name, so a service port never
/// moves while the number of shards stays (unless it gains or loses a
/// NodePort).
pub fn shard_of(spn: &ServicePortName, info: &ServicePortInfo, shards: u32) -> TableId {
    if shards <= 1 || info.node_port.is_some() {
        return 0;
    }
    1 + (fnv128(&[&spn_key(spn)]) as u32) % (shards - 1)
}

/// The maps and sets every shard table has (the ClusterIP and external
/// IP dispatch map); the main table has all of [`MapName::ALL`].
pub const SHARD_MAPS: [MapName; 1] = [MapName::ServiceIps];

impl MapName {
    /// Whether the map's elements live in the table of the service port
    /// they belong to (else in the main table).
    pub fn per_shard(&self) -> bool {
        matches!(self, MapName::ServiceIps | MapName::ServiceNodeports)
    }
}

/// The regular chains of a shard table's fixed part.
pub const SHARD_HELPER_CHAINS: [&str; 1] = [MARK_FOR_MASQUERADE];

/// The base chains of a shard table (only NAT: the filter and
/// postrouting work is done once, by the main table).
pub fn shard_base_chains() -> impl Iterator<Item = &'static BaseChain> {
    BASE_CHAINS
        .iter()
        .filter(|b| b.name == "nat-prerouting" || b.name == "nat-output")
}

/// The fixed rules of a shard table: the dispatch right in the NAT entry
/// points (no `services` chain to jump to: every new connection passes
/// every table's NAT chains, so each hop counts), and the masquerade mark.
pub fn shard_rules(cfg: &RulesetConfig) -> Vec<(&'static str, Rule)> {
    let mut v: Vec<(&'static str, Rule)> = shard_base_chains()
        .map(|b| (b.name, Rule::DispatchFrontends(MapName::ServiceIps)))
        .collect();
    v.push((MARK_FOR_MASQUERADE, Rule::MarkOr(cfg.mark())));
    v
}

// ---- the whole model --------------------------------------------------------

/// The key of a map element: which map, and the key.
pub type ElementKey = (MapName, Key);

/// The service ports claiming one map key, in name order (the first one's
/// element is programmed). Nearly always exactly one, kept inline.
#[derive(Clone, Debug)]
pub enum Claim {
    One(ServicePortName),
    Many(Vec<ServicePortName>),
}

impl Claim {
    /// The programmed claimant.
    pub fn first(&self) -> &ServicePortName {
        match self {
            Claim::One(s) => s,
            Claim::Many(v) => &v[0],
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &ServicePortName> {
        match self {
            Claim::One(s) => std::slice::from_ref(s).iter(),
            Claim::Many(v) => v.iter(),
        }
    }

    fn insert(&mut self, spn: &ServicePortName) {
        match self {
            Claim::One(s) if s == spn => {}
            Claim::One(s) => {
                let mut v = vec![s.clone(), spn.clone()];
                v.sort();
                *self = Claim::Many(v);
            }
            Claim::Many(v) => {
                if let Err(i) = v.binary_search(spn) {
                    v.insert(i, spn.clone());
                }
            }
        }
    }

    /// Remove `spn`; false when nobody is left.
    fn remove(&mut self, spn: &ServicePortName) -> bool {
        match self {
            Claim::One(s) => s != spn,
            Claim::Many(v) => {
                if let Ok(i) = v.binary_search(spn) {
                    v.remove(i);
                }
                if v.len() == 1 {
                    *self = Claim::One(v.pop().expect("one left"));
                }
                true
            }
        }
    }
}

/// The model of fairlead's tables: the configuration (which fixes the
/// base part), the number of shards, and every service port's input.
///
/// The model is lean on purpose: it keeps each service port's
/// [`ServicePortInfo`] (the same `Arc` the change tracker holds, so no
/// copy) and recomputes a port's [`ServiceRules`] when it changes
/// ([`service_rules`] is pure and cheap), instead of keeping every rule of
/// 30,000 Services in memory. What it keeps besides: who claims each
/// dispatch key (map keys claimed by several service ports, invalid input
/// such as two Services with one external IP and port, go to the first of
/// them in [`ServicePortName`] order, whatever the order of changes, so
/// incremental and full syncs agree; the one exception: two plain service
/// ports with one ClusterIP and port, which the API server never
/// allocates, whose rules share a bucket chain, where the first rule in
/// the chain's order answers), how many endpoints use each hairpin
/// address, how many rules each bucket chain holds, the counts for the
/// gauges, and the fingerprint.
#[derive(Clone, Debug)]
pub struct Ruleset {
    pub cfg: RulesetConfig,
    shards: u32,
    /// The fixed part's rules (from `cfg`): the main table's, a shard's.
    base: Arc<Vec<(&'static str, Rule)>>,
    shard_base: Arc<Vec<(&'static str, Rule)>>,
    services: BTreeMap<ServicePortName, Arc<ServicePortInfo>>,
    /// Claimants of every dispatch key (not the hairpin set's).
    claims: HashMap<ElementKey, Claim>,
    /// Endpoint address → how many service ports use it (one element of
    /// `hairpin-endpoints` each).
    hairpin: HashMap<Ipv4Addr, u32>,
    /// (table, bucket) → how many rules its bucket chain holds (a bucket
    /// chain exists while it holds any).
    buckets: HashMap<(TableId, u32), u32>,
    chains: usize,
    rules: usize,
    sets: usize,
    maps: usize,
    /// The service ports' fingerprints XORed.
    services_fingerprint: u128,
}

/// The hairpin addresses of one service port's rules.
fn hairpin_ips(r: &ServiceRules) -> impl Iterator<Item = Ipv4Addr> + '_ {
    r.elements.iter().filter_map(|e| match e.key {
        Key::Pair(a, _) if e.map == MapName::HairpinEndpoints => Some(a),
        _ => None,
    })
}

/// The dispatch elements (not hairpin) of one service port's rules.
fn claimed(r: &ServiceRules) -> impl Iterator<Item = &Element> + '_ {
    r.elements
        .iter()
        .filter(|e| e.map != MapName::HairpinEndpoints)
}

impl Ruleset {
    /// A table with only the fixed part.
    pub fn new(cfg: RulesetConfig) -> Ruleset {
        Ruleset::with_shards(cfg, 1)
    }

    /// Empty tables, `shards` of them (a power of two).
    pub fn with_shards(cfg: RulesetConfig, shards: u32) -> Ruleset {
        assert!(shards.is_power_of_two(), "shards must be a power of two");
        Ruleset {
            base: Arc::new(base_rules(&cfg)),
            shard_base: Arc::new(shard_rules(&cfg)),
            cfg,
            shards,
            services: BTreeMap::new(),
            claims: HashMap::new(),
            hairpin: HashMap::new(),
            buckets: HashMap::new(),
            chains: 0,
            rules: 0,
            sets: 0,
            maps: 0,
            services_fingerprint: 0,
        }
    }

    /// The desired table for `state`, in one table.
    pub fn build(cfg: RulesetConfig, state: &ProxyState) -> Ruleset {
        Ruleset::build_sharded(cfg, 1, state)
    }

    /// The desired tables for `state`, over `shards` tables.
    pub fn build_sharded(cfg: RulesetConfig, shards: u32, state: &ProxyState) -> Ruleset {
        let mut r = Ruleset::with_shards(cfg, shards);
        for (spn, info) in state {
            r.set(spn, Some(info.clone()));
        }
        r
    }

    /// Spread the same services over another number of shards (the
    /// tables must then be recreated).
    pub fn set_shards(&mut self, shards: u32) {
        assert!(shards.is_power_of_two(), "shards must be a power of two");
        if shards == self.shards {
            return;
        }
        self.shards = shards;
        // Buckets are per table: recount them.
        self.buckets.clear();
        for (spn, info) in &self.services {
            if let Some(b) = service_rules(&self.cfg, spn, info).bucket {
                *self
                    .buckets
                    .entry((shard_of(spn, info, shards), b.bucket))
                    .or_default() += 1;
            }
        }
    }

    /// How many rules bucket chain `bucket` of table `t` holds.
    pub fn bucket_count(&self, t: TableId, bucket: u32) -> u32 {
        self.buckets.get(&(t, bucket)).copied().unwrap_or(0)
    }

    /// The bucket chains in use, sorted.
    pub fn buckets(&self) -> Vec<(TableId, u32)> {
        let mut v: Vec<(TableId, u32)> = self.buckets.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// How many tables.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The fixed part's rules of the main table.
    pub fn base(&self) -> &[(&'static str, Rule)] {
        &self.base
    }

    /// The fixed rules of table `id` (the main table's or a shard's).
    pub fn fixed_rules(&self, id: TableId) -> &[(&'static str, Rule)] {
        if id == 0 {
            &self.base
        } else {
            &self.shard_base
        }
    }

    /// Every service port's input.
    pub fn infos(&self) -> &BTreeMap<ServicePortName, Arc<ServicePortInfo>> {
        &self.services
    }

    /// The table of one service port ([`shard_of`]; 0 when unknown).
    pub fn table_of(&self, spn: &ServicePortName) -> TableId {
        self.services
            .get(spn)
            .map_or(0, |info| shard_of(spn, info, self.shards))
    }

    /// The rules of one service port (recomputed).
    pub fn rules_of(&self, spn: &ServicePortName) -> Option<ServiceRules> {
        self.services
            .get(spn)
            .map(|info| service_rules(&self.cfg, spn, info))
    }

    /// Every service port's rules (recomputed: for tests and tools).
    pub fn services(&self) -> BTreeMap<ServicePortName, Arc<ServiceRules>> {
        self.services
            .iter()
            .map(|(spn, info)| (spn.clone(), Arc::new(service_rules(&self.cfg, spn, info))))
            .collect()
    }

    /// Claimants of a dispatch key (first = programmed).
    pub fn claimants(&self, key: &ElementKey) -> Option<&Claim> {
        self.claims.get(key)
    }

    /// Whether `ip . ip` is in the hairpin set.
    pub fn hairpin_count(&self, ip: Ipv4Addr) -> u32 {
        self.hairpin.get(&ip).copied().unwrap_or(0)
    }

    /// Every hairpin address.
    pub fn hairpin_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.hairpin.keys().copied()
    }

    /// A hash of the whole model (XOR of its parts, so a change costs only
    /// the changed parts). The main table stores it in its `fingerprint`
    /// set; a daemon that finds its own desired fingerprint there adopts
    /// the tables instead of rebuilding them.
    pub fn fingerprint(&self) -> u128 {
        base_fingerprint(&self.cfg, self.shards) ^ self.services_fingerprint
    }

    /// The fingerprint the same services would have over `shards` tables.
    pub fn fingerprint_with(&self, shards: u32) -> u128 {
        base_fingerprint(&self.cfg, shards) ^ self.services_fingerprint
    }

    /// Replace (or with `None` remove) one service port; returns its rules
    /// before and after (recomputed).
    pub fn set(
        &mut self,
        spn: &ServicePortName,
        info: Option<Arc<ServicePortInfo>>,
    ) -> (Option<ServiceRules>, Option<ServiceRules>) {
        let old = self.rules_of(spn);
        let new = info.as_ref().map(|i| service_rules(&self.cfg, spn, i));
        self.commit(spn, info, old.as_ref(), new.as_ref());
        (old, new)
    }

    /// Record a change whose rules the caller already computed (`old`
    /// must be this model's current rules of `spn`).
    pub fn commit(
        &mut self,
        spn: &ServicePortName,
        info: Option<Arc<ServicePortInfo>>,
        old: Option<&ServiceRules>,
        new: Option<&ServiceRules>,
    ) {
        let old_table = self.table_of(spn);
        let new_table = info.as_ref().map_or(0, |i| shard_of(spn, i, self.shards));
        if let Some(b) = old.and_then(|o| o.bucket.as_ref()) {
            if let std::collections::hash_map::Entry::Occupied(mut e) =
                self.buckets.entry((old_table, b.bucket))
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        if let Some(b) = new.and_then(|n| n.bucket.as_ref()) {
            *self.buckets.entry((new_table, b.bucket)).or_default() += 1;
        }
        match info {
            Some(i) => self.services.insert(spn.clone(), i),
            None => self.services.remove(spn),
        };
        if let Some(o) = old {
            self.chains -= o.chains.len();
            self.rules -= o.rule_count();
            self.sets -= o.sets.len();
            self.maps -= o.maps.len();
            self.services_fingerprint ^= o.fingerprint;
            for e in claimed(o) {
                let k = (e.map, e.key);
                if let Some(c) = self.claims.get_mut(&k) {
                    if !c.remove(spn) {
                        self.claims.remove(&k);
                    }
                }
            }
            for ip in hairpin_ips(o) {
                if let Some(n) = self.hairpin.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.hairpin.remove(&ip);
                    }
                }
            }
        }
        if let Some(n) = new {
            self.chains += n.chains.len();
            self.rules += n.rule_count();
            self.sets += n.sets.len();
            self.maps += n.maps.len();
            self.services_fingerprint ^= n.fingerprint;
            for e in claimed(n) {
                match self.claims.entry((e.map, e.key)) {
                    std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().insert(spn),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(Claim::One(spn.clone()));
                    }
                }
            }
            for ip in hairpin_ips(n) {
                *self.hairpin.entry(ip).or_default() += 1;
            }
        }
    }

    /// The verdict the programmed claimant of a dispatch key wants, and
    /// the table its element lives in (recomputing that claimant's rules).
    pub fn programmed(&self, key: &ElementKey) -> Option<(TableId, Option<Verdict>)> {
        let spn = self.claims.get(key)?.first();
        let rules = self.rules_of(spn)?;
        let e = rules.elements.iter().find(|e| (e.map, e.key) == *key)?;
        let table = if key.0.per_shard() {
            self.table_of(spn)
        } else {
            0
        };
        Some((table, e.verdict.clone()))
    }

    /// The programmed map elements with their tables, sorted (the
    /// fingerprint excluded).
    pub fn elements(&self) -> Vec<(TableId, Element)> {
        let mut v: Vec<(TableId, Element)> = self
            .claims
            .keys()
            .filter_map(|k| {
                self.programmed(k).map(|(t, verdict)| {
                    (
                        t,
                        Element {
                            map: k.0,
                            key: k.1,
                            verdict,
                        },
                    )
                })
            })
            .collect();
        v.extend(self.hairpin.keys().map(|ip| {
            (
                0,
                Element {
                    map: MapName::HairpinEndpoints,
                    key: Key::Pair(*ip, *ip),
                    verdict: None,
                },
            )
        }));
        v.sort();
        v
    }

    /// Regular chains of service ports, and bucket chains (base and
    /// helper chains excluded).
    pub fn chain_count(&self) -> usize {
        self.chains + self.buckets.len()
    }
    /// Rules in service port chains.
    pub fn rule_count(&self) -> usize {
        self.rules
    }
    /// Affinity sets.
    pub fn set_count(&self) -> usize {
        self.sets
    }
    /// Endpoint maps (own ones and the buckets' shared ones).
    pub fn map_count(&self) -> usize {
        self.maps + self.buckets.len()
    }
    /// Programmed map elements (dispatch maps and sets; not endpoint maps).
    pub fn element_count(&self) -> usize {
        self.claims.len() + self.hairpin.len()
    }
    /// Service ports.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The `nft -f` script that replaces whatever tables of these names
    /// exist with these (what a full sync sends, as text).
    pub fn render_full(&self) -> String {
        super::diff::full_text(self, &[])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub use crate::proxy::nftables::sample::{ep, every_shape as golden_state, info, spn};

    pub fn cfg() -> RulesetConfig {
        RulesetConfig {
            node_name: "node-a".into(),
            ..RulesetConfig::default()
        }
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
            service_ranges: vec![("10.96.0.0".parse().unwrap(), 12)],
            ..cfg()
        };
        golden(
            "base-nodeport-addresses.nft",
            &Ruleset::new(c).render_full(),
        );
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
        let reject = Some(Verdict::Goto(REJECT_CHAIN.into()));
        assert_eq!(
            r.elements
                .iter()
                .map(|e| (e.map, e.verdict.clone()))
                .collect::<Vec<_>>(),
            vec![
                (MapName::NoEndpointServices, reject.clone()),
                (MapName::NoEndpointNodeports, reject)
            ]
        );
        // externalTrafficPolicy Local without local endpoints: the
        // ClusterIP works, the NodePort drops.
        i.endpoints = vec![ep("10.0.0.1:80", "other")];
        i.external_local = true;
        let r = service_rules(&c, &spn("a", "b", "", Protocol::Tcp), &i);
        let got: Vec<(MapName, Option<Verdict>)> = r
            .elements
            .iter()
            .map(|e| (e.map, e.verdict.clone()))
            .collect();
        assert_eq!(got[1], (MapName::NoEndpointNodeports, Some(Verdict::Drop)));
        assert_eq!(got[0].0, MapName::ServiceIps);
        // IPv6 is skipped.
        let mut v6 = info("fd00::1", 80, vec![ep("[fd00::2]:80", "x")]);
        v6.external_ips = vec!["fd00::3".parse().unwrap()];
        let r = service_rules(&c, &spn("a", "v6", "", Protocol::Tcp), &v6);
        assert!(r.chains.is_empty() && r.sets.is_empty() && r.elements.is_empty());
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
            .map(|(_, e)| e)
            .filter(|e| e.map == MapName::ServiceIps)
            .collect();
        assert_eq!(els.len(), 1);
        // Both are plain: the element jumps to a's bucket chain.
        assert_eq!(
            els[0].verdict,
            Some(Verdict::Goto(bucket_chain(bucket_of(&a))))
        );
    }
}
