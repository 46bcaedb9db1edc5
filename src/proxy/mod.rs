//! Service proxying: from Services + EndpointSlices to balanced traffic.
//!
//! ```text
//!  node cache (Services, EndpointSlices)
//!        │  snapshot
//!        ▼
//!  tracker::build  (pure)  ──►  ProxyState: per service port, its frontends
//!        │                      (ClusterIPs, NodePort, external IPs) and
//!        │                      endpoints with their conditions
//!        ▼
//!  backend: userspace (tokio listeners)  |  nftables (one table, atomic)
//! ```
//!
//! The types here are the contract between the pure tracker and the
//! backends, so each side is testable alone.

pub mod conntrack;
pub mod l7redirect;
pub mod nftables;
pub mod tracker;
pub mod userspace;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
    /// The IP protocol number (as nftables and conntrack name it).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// The HTTP protocol a TCP service port opts into with the standard
/// `appProtocol` field: its requests are then balanced one by one
/// (`userspace::l7`) instead of one connection at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AppProtocol {
    /// `kubernetes.io/h2c` or `grpc`: HTTP/2 over cleartext to the
    /// endpoints, one multiplexed connection each.
    H2c,
    /// `http` or `kubernetes.io/http`: HTTP/1.1 to the endpoints, a
    /// keep-alive pool each.
    Http1,
}

impl AppProtocol {
    /// The L7 mode an `appProtocol` value selects; None (plain L4) for
    /// every other value, as for none.
    pub fn parse(s: &str) -> Option<AppProtocol> {
        match s {
            "kubernetes.io/h2c" | "grpc" => Some(AppProtocol::H2c),
            "http" | "kubernetes.io/http" => Some(AppProtocol::Http1),
            _ => None,
        }
    }
}

/// Identity of one port of one Service (kube-proxy's ServicePortName).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The port's name ("" for a single unnamed port).
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One backend of a service port, with the conditions from its slice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on (for `trafficPolicy: Local`).
    pub node_name: Option<Arc<str>>,
}

/// Everything a backend needs to serve one service port.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePortInfo {
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `spec.externalIPs` and LoadBalancer ingress IPs.
    pub external_ips: Vec<IpAddr>,
    /// Per-request balancing (`appProtocol`, TCP ports only).
    pub app_protocol: Option<AppProtocol>,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub affinity_timeout: Option<Duration>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// Sorted, deduplicated.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePortInfo {
    /// The endpoints traffic may go to, as kube-proxy chooses them: ready
    /// ones; if none, serving-and-terminating ones (so a rolling restart
    /// does not black-hole traffic). With `local_node`, only endpoints on
    /// that node.
    pub fn usable_endpoints(&self, local_node: Option<&str>) -> Vec<SocketAddr> {
        let on_node = |e: &&Endpoint| match local_node {
            Some(n) => e.node_name.as_deref() == Some(n),
            None => true,
        };
        let ready: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(on_node)
            .filter(|e| e.ready)
            .map(|e| e.addr)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints
            .iter()
            .filter(on_node)
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.addr)
            .collect()
    }
}

/// The desired proxy state of the node: every service port.
pub type ProxyState = BTreeMap<ServicePortName, Arc<ServicePortInfo>>;

/// One service port added or changed (`Some`: its new info) or removed
/// (`None`): the unit of work backends apply.
pub type PortChange = (ServicePortName, Option<Arc<ServicePortInfo>>);

/// The changes that turn `old` into `new`: one merge walk over both sorted
/// maps, comparing pointers first (the tracker hands out the same `Arc`
/// for an unchanged port). For callers that hold whole states; the node
/// daemon gets its changes from [`tracker::ProxyTracker::update`] instead.
pub fn diff_states(old: &ProxyState, new: &ProxyState) -> Vec<PortChange> {
    use std::cmp::Ordering;
    let mut out = Vec::new();
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        let order = match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => {
                let (spn, _) = o.next().expect("peeked");
                out.push((spn.clone(), None));
            }
            Ordering::Greater => {
                let (spn, info) = n.next().expect("peeked");
                out.push((spn.clone(), Some(info.clone())));
            }
            Ordering::Equal => {
                let (_, a) = o.next().expect("peeked");
                let (spn, b) = n.next().expect("peeked");
                if !(Arc::ptr_eq(a, b) || a == b) {
                    out.push((spn.clone(), Some(b.clone())));
                }
            }
        }
    }
    out
}
