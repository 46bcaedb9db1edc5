//! Deleting stale conntrack entries: UDP flows on old targets, as kube-proxy
//! does, and flows to Services that were never translated.
//!
//! # Why
//!
//! A Service's DNAT happens only for the first packet of a flow: the kernel's
//! connection tracker records the translation, and every later packet of the
//! flow (same 5-tuple) follows that entry without passing the nat chains
//! again. TCP flows end (FIN/RST, and a dead backend resets them), but UDP
//! has no connection end: a client that keeps its socket (a resolver talking
//! to the cluster DNS Service from a fixed port is the typical case) keeps
//! sending every datagram to the *old* DNAT target — an endpoint that was
//! removed, whose pod may be gone — until the entry times out (30 s for an
//! unreplied flow, 120 s once it has seen replies, refreshed by each packet,
//! so a chatty client never gets there). Deleting the entries makes the next
//! datagram a new flow that the current ruleset balances afresh.
//!
//! # When to call (the proxier's side)
//!
//! Always *after* the ruleset change has been committed, or a datagram in
//! between can recreate the entry towards the old target:
//!
//! * [`delete_udp`], once per sync with every [`StaleUdp`] of it:
//!   - an endpoint of a UDP service port was removed (or stopped being
//!     used): [`StaleUdp::ToEndpoint`];
//!   - a UDP service port went from no endpoints to some (flows created
//!     while it had none were not DNATed and would keep missing the new
//!     endpoints): [`StaleUdp::ToFrontend`] for each ClusterIP / external
//!     IP, and [`StaleUdp::ToNodePort`] for its NodePort;
//! * [`delete_untranslated`], for flows of any protocol to Service
//!   frontends that were never DNATed and never answered: such a flow's
//!   first packet passed the nat chains without a translation, conntrack
//!   recorded that, and every retransmitted SYN then follows the entry,
//!   never the nat chains, until the connect times out. Deleted, the entry
//!   costs the client one retransmission. After a full sync (the tables
//!   recreated), for every frontend: a first packet that was in the old
//!   tables' chains as the transaction committed found their maps empty
//!   (deleting a map deactivates its elements in the new generation, which
//!   is the one its lookups read). A partial sync avoids that race
//!   instead, by deleting maps in a later transaction; a full one cannot,
//!   as the tables it deletes and recreates have the same names. (A client
//!   that reached a Service in the few ms before its rules were in is not
//!   cleaned up here: a dump walks the kernel's whole conntrack hash, all
//!   namespaces' entries, ~10 ms here, and one after each sync that gave a
//!   frontend its first endpoints doubled the node's slice-to-traffic
//!   latency at 30,000 Services; gathered in the background over 250 ms,
//!   it still pushed a removal's p99 from ~5 ms to 16-55 ms. With the
//!   Service range known, the ruleset drops such a first packet instead,
//!   which costs nothing: see `untranslated-output` in
//!   [`crate::proxy::nftables::ruleset`].)
//!
//! The work is done over ctnetlink, the connection tracker's netlink
//! interface (no `conntrack` program, so the static image does it too), as
//! `conntrack -D` with a filter does it: one dump of the IPv4 entries, those
//! that match picked out here, then one delete per entry by its
//! original tuple (and zone). An entry that ended in between is not
//! counted. With `netns: Some(name)` the socket is opened in that network
//! namespace (conntrack tables are per namespace; tests use their own, the
//! daemon passes `None`). IPv4 only, like the rest of the nftables mode
//! for now.
//!
//! ```text
//! IPCTNL_MSG_CT_GET, NLM_F_DUMP, family AF_INET
//!   ← IPCTNL_MSG_CT_NEW per entry:
//!       CTA_TUPLE_ORIG  { CTA_TUPLE_IP { V4_SRC, V4_DST },
//!                         CTA_TUPLE_PROTO { NUM, SRC_PORT, DST_PORT } }
//!       CTA_TUPLE_REPLY { the same, as the reply travels }
//!       CTA_ZONE (if not 0)
//! IPCTNL_MSG_CT_DELETE, NLM_F_ACK: CTA_TUPLE_ORIG { ... }, CTA_ZONE
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::proxy::nftables::netlink::{attr, attrs, nest, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use crate::proxy::nftables::socket::Socket;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ZONE: u16 = 18;
const CTA_STATUS_MASK: u16 = 26;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const IPPROTO_UDP: u8 = 17;

/// `CTA_STATUS` bits: the flow saw a packet in the reply direction; its
/// destination was translated.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_DST_NAT: u32 = 1 << 5;

/// Why deleting conntrack entries failed (each message is one line).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening a netfilter netlink socket{}: {source}", in_netns(.netns))]
    Open {
        netns: Option<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} conntrack entries: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn in_netns(netns: &Option<String>) -> String {
    netns
        .as_ref()
        .map(|n| format!(" in network namespace {n}"))
        .unwrap_or_default()
}

/// One direction of a flow, as the connection tracker records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

/// One entry of the dump: what the filters look at, and what a delete
/// names it by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    orig: Tuple,
    reply: Tuple,
    zone: u16,
    /// `IPS_*` bits.
    status: u32,
}

impl Default for Tuple {
    fn default() -> Tuple {
        Tuple {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto: 0,
            sport: 0,
            dport: 0,
        }
    }
}

/// A kind of stale UDP flow (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaleUdp {
    /// Every flow whose reply comes from this endpoint, i.e. every flow
    /// DNATed to it. (Flows sent to the pod address directly match too;
    /// deleting them is harmless, as their next datagram recreates an
    /// identical entry.)
    ToEndpoint(SocketAddrV4),
    /// Every flow sent to this frontend `ip:port` (a ClusterIP, external IP
    /// or LoadBalancer IP of a service port), whatever it was translated to.
    ToFrontend(Ipv4Addr, u16),
    /// Every flow sent to this destination port on any address (a
    /// NodePort).
    ToNodePort(u16),
}

impl StaleUdp {
    fn matches(&self, e: &Entry) -> bool {
        e.orig.proto == IPPROTO_UDP
            && match *self {
                StaleUdp::ToEndpoint(ep) => e.reply.src == *ep.ip() && e.reply.sport == ep.port(),
                StaleUdp::ToFrontend(ip, port) => e.orig.dst == ip && e.orig.dport == port,
                StaleUdp::ToNodePort(port) => e.orig.dport == port,
            }
    }
}

/// Delete every UDP flow one of `stale` names, with one dump of the table
/// whatever their number (each dump walks the kernel's whole conntrack
/// hash, all namespaces' entries: ~10 ms at its 262,144 buckets here).
/// Returns how many entries were deleted.
pub async fn delete_udp(netns: Option<&str>, stale: Vec<StaleUdp>) -> Result<u64, ConntrackError> {
    if stale.is_empty() {
        return Ok(0);
    }
    delete(netns, None, move |e| stale.iter().any(|s| s.matches(e))).await
}

/// [`StaleUdp::ToEndpoint`] alone.
pub async fn delete_udp_to_endpoint(
    netns: Option<&str>,
    endpoint: SocketAddrV4,
) -> Result<u64, ConntrackError> {
    delete_udp(netns, vec![StaleUdp::ToEndpoint(endpoint)]).await
}

/// [`StaleUdp::ToFrontend`] alone.
pub async fn delete_udp_to_service(
    netns: Option<&str>,
    ip: Ipv4Addr,
    port: u16,
) -> Result<u64, ConntrackError> {
    delete_udp(netns, vec![StaleUdp::ToFrontend(ip, port)]).await
}

/// [`StaleUdp::ToNodePort`] alone.
pub async fn delete_udp_to_node_port(
    netns: Option<&str>,
    node_port: u16,
) -> Result<u64, ConntrackError> {
    delete_udp(netns, vec![StaleUdp::ToNodePort(node_port)]).await
}

/// Service frontends, for [`delete_untranslated`].
#[derive(Debug, Default, Clone)]
pub struct Frontends {
    /// ClusterIPs, external and LoadBalancer IPs: (address, IP protocol
    /// number, port).
    pub addrs: std::collections::HashSet<(Ipv4Addr, u8, u16)>,
    /// NodePorts, on any address: (IP protocol number, port).
    pub node_ports: std::collections::HashSet<(u8, u16)>,
}

/// Delete every flow sent to one of `frontends` that was not translated
/// and has seen no reply (see the module doc). The kernel filters the dump
/// by those status bits (Linux 5.15+), so it walks its table but sends
/// only such flows, which are few. Returns how many entries were deleted.
pub async fn delete_untranslated(
    netns: Option<&str>,
    frontends: Frontends,
) -> Result<u64, ConntrackError> {
    let unanswered = Some((0, IPS_DST_NAT | IPS_SEEN_REPLY));
    delete(netns, unanswered, move |e| {
        e.status & (IPS_DST_NAT | IPS_SEEN_REPLY) == 0
            && (frontends
                .addrs
                .contains(&(e.orig.dst, e.orig.proto, e.orig.dport))
                || frontends.node_ports.contains(&(e.orig.proto, e.orig.dport)))
    })
    .await
}

/// Dump (only entries whose status, masked, equals the value, with
/// `status: Some((value, mask))`), pick the entries `matches` accepts,
/// delete them (on a blocking thread: the netlink socket blocks).
async fn delete(
    netns: Option<&str>,
    status: Option<(u32, u32)>,
    matches: impl Fn(&Entry) -> bool + Send + 'static,
) -> Result<u64, ConntrackError> {
    let netns = netns.map(str::to_string);
    let work = tokio::task::spawn_blocking(move || {
        let mut socket = Socket::open(netns.as_deref())
            .map_err(|source| ConntrackError::Open { netns, source })?;
        let seq = socket.batch_seq();
        let mut doomed = Vec::new();
        socket
            .request(&dump_request(seq, status), seq, &mut |ty, payload| {
                if ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
                    if let Some(e) = parse_entry(payload) {
                        if matches(&e) {
                            doomed.push(e);
                        }
                    }
                }
            })
            .map_err(|source| ConntrackError::Netlink {
                what: "listing",
                source,
            })?;
        let mut deleted = 0;
        for e in doomed {
            let seq = socket.batch_seq();
            match socket.request(&delete_request(&e, seq), seq, &mut |_, _| {}) {
                Ok(()) => deleted += 1,
                // It ended (or was deleted) since the dump.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(ConntrackError::Netlink {
                        what: "deleting",
                        source,
                    })
                }
            }
        }
        Ok(deleted)
    });
    work.await.unwrap_or_else(|e| {
        Err(ConntrackError::Netlink {
            what: "deleting",
            source: std::io::Error::other(e.to_string()),
        })
    })
}

// ---- encoding ----------------------------------------------------------------

/// A ctnetlink message: netlink header, nfgenmsg (AF_INET, version 0), and
/// the attributes `body` appends.
fn message(ty: u16, flags: u16, seq: u32, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::with_capacity(96);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    body(&mut buf);
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn dump_request(seq: u32, status: Option<(u32, u32)>) -> Vec<u8> {
    message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, seq, |b| {
        if let Some((value, mask)) = status {
            attr(b, CTA_STATUS, &value.to_be_bytes());
            attr(b, CTA_STATUS_MASK, &mask.to_be_bytes());
        }
    })
}

/// A tuple attribute (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`), as a dump
/// carries it and a delete names an entry.
fn tuple(b: &mut Vec<u8>, ty: u16, t: &Tuple) {
    nest(b, ty, |b| {
        nest(b, CTA_TUPLE_IP, |b| {
            attr(b, CTA_IP_V4_SRC, &t.src.octets());
            attr(b, CTA_IP_V4_DST, &t.dst.octets());
        });
        nest(b, CTA_TUPLE_PROTO, |b| {
            attr(b, CTA_PROTO_NUM, &[t.proto]);
            attr(b, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
            attr(b, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        });
    })
}

fn delete_request(e: &Entry, seq: u32) -> Vec<u8> {
    message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, seq, |b| {
        tuple(b, CTA_TUPLE_ORIG, &e.orig);
        if e.zone != 0 {
            attr(b, CTA_ZONE, &e.zone.to_be_bytes());
        }
    })
}

// ---- parsing -------------------------------------------------------------------

/// An entry from a `IPCTNL_MSG_CT_NEW` payload (nfgenmsg first); `None`
/// for one without both tuples (not IPv4, say).
fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let mut e = Entry::default();
    let (mut orig, mut reply) = (false, false);
    for (ty, v) in attrs(payload.get(4..)?) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(v, &mut e.orig),
            CTA_TUPLE_REPLY => reply = parse_tuple(v, &mut e.reply),
            CTA_ZONE => e.zone = u16::from_be_bytes(v.get(..2)?.try_into().ok()?),
            CTA_STATUS => e.status = u32::from_be_bytes(v.get(..4)?.try_into().ok()?),
            _ => {}
        }
    }
    (orig && reply).then_some(e)
}

/// Fill `t` from a tuple attribute; false if it lacks an IPv4 address.
fn parse_tuple(v: &[u8], t: &mut Tuple) -> bool {
    let mut ip = false;
    for (ty, v) in attrs(v) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v) in attrs(v) {
                    let Ok(a) = <[u8; 4]>::try_from(v) else {
                        continue;
                    };
                    match ty {
                        CTA_IP_V4_SRC => t.src = Ipv4Addr::from(a),
                        CTA_IP_V4_DST => {
                            t.dst = Ipv4Addr::from(a);
                            ip = true;
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v) in attrs(v) {
                    match (ty, v) {
                        (CTA_PROTO_NUM, [p, ..]) => t.proto = *p,
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => t.sport = u16::from_be_bytes([*a, *b]),
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => t.dport = u16::from_be_bytes([*a, *b]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    ip
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::nftables::netlink::messages;

    fn entry() -> Entry {
        Entry {
            orig: Tuple {
                src: Ipv4Addr::new(10, 0, 0, 5),
                dst: Ipv4Addr::new(10, 96, 0, 10),
                proto: IPPROTO_UDP,
                sport: 40000,
                dport: 53,
            },
            reply: Tuple {
                src: Ipv4Addr::new(10, 244, 0, 11),
                dst: Ipv4Addr::new(10, 0, 0, 5),
                proto: IPPROTO_UDP,
                sport: 5353,
                dport: 40000,
            },
            zone: 7,
            status: 0x18a,
        }
    }

    /// A dump's entry as the kernel sends it: both tuples, the status and
    /// the zone, with an attribute parse_entry must skip (the timeout).
    fn as_dumped(e: &Entry) -> Vec<u8> {
        message(IPCTNL_MSG_CT_NEW, 0, 1, |b| {
            tuple(b, CTA_TUPLE_ORIG, &e.orig);
            tuple(b, CTA_TUPLE_REPLY, &e.reply);
            attr(b, CTA_STATUS, &e.status.to_be_bytes());
            attr(b, 7, &30u32.to_be_bytes());
            attr(b, CTA_ZONE, &e.zone.to_be_bytes());
        })
    }

    #[test]
    fn a_dumped_entry_parses_back() {
        let e = entry();
        let bytes = as_dumped(&e);
        let m = messages(&bytes).next().expect("one message");
        assert_eq!(m.ty, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW);
        assert_eq!(parse_entry(m.payload), Some(e));
    }

    #[test]
    fn each_kind_of_stale_udp_flow_matches_its_own() {
        let e = entry();
        let yes = [
            StaleUdp::ToEndpoint("10.244.0.11:5353".parse().unwrap()),
            StaleUdp::ToFrontend(Ipv4Addr::new(10, 96, 0, 10), 53),
            StaleUdp::ToNodePort(53),
        ];
        let no = [
            StaleUdp::ToEndpoint("10.244.0.12:5353".parse().unwrap()),
            StaleUdp::ToEndpoint("10.244.0.11:53".parse().unwrap()),
            StaleUdp::ToFrontend(Ipv4Addr::new(10, 96, 0, 10), 54),
            StaleUdp::ToFrontend(Ipv4Addr::new(10, 96, 0, 11), 53),
            StaleUdp::ToNodePort(30053),
        ];
        for s in yes {
            assert!(s.matches(&e), "{s:?}");
        }
        for s in no {
            assert!(!s.matches(&e), "{s:?}");
        }
        // A TCP flow is never a stale UDP one.
        let mut tcp = e;
        tcp.orig.proto = 6;
        assert!(yes.iter().all(|s| !s.matches(&tcp)));
    }

    #[test]
    fn a_filtered_dump_carries_the_status_and_its_mask() {
        let bytes = dump_request(9, Some((0, IPS_DST_NAT | IPS_SEEN_REPLY)));
        let m = messages(&bytes).next().expect("one message");
        let got: Vec<(u16, Vec<u8>)> = attrs(&m.payload[4..])
            .map(|(ty, v)| (ty, v.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                (CTA_STATUS, vec![0, 0, 0, 0]),
                (CTA_STATUS_MASK, vec![0, 0, 0, 0x22])
            ]
        );
        assert_eq!(attrs(&dump_request(9, None)[20..]).count(), 0);
    }

    #[test]
    fn an_entry_without_an_ipv4_tuple_is_skipped() {
        let bytes = message(IPCTNL_MSG_CT_NEW, 0, 1, |b| {
            nest(b, CTA_TUPLE_ORIG, |b| {
                nest(b, CTA_TUPLE_PROTO, |b| attr(b, CTA_PROTO_NUM, &[17]));
            });
        });
        let m = messages(&bytes).next().unwrap();
        assert_eq!(parse_entry(m.payload), None);
    }

    #[test]
    fn a_delete_names_the_original_tuple_and_zone() {
        let e = entry();
        let bytes = delete_request(&e, 42);
        let m = messages(&bytes).next().expect("one message");
        assert_eq!(m.ty, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE);
        assert_eq!(m.seq, 42);
        // The same attributes a dump carries, read back by the dump's
        // parser: the original tuple and the zone, no reply tuple.
        let mut orig = Tuple::default();
        let mut zone = 0;
        let mut kinds = Vec::new();
        for (ty, v) in attrs(&m.payload[4..]) {
            kinds.push(ty);
            match ty {
                CTA_TUPLE_ORIG => assert!(parse_tuple(v, &mut orig)),
                CTA_ZONE => zone = u16::from_be_bytes([v[0], v[1]]),
                _ => {}
            }
        }
        assert_eq!(kinds, [CTA_TUPLE_ORIG, CTA_ZONE]);
        assert_eq!((orig, zone), (e.orig, 7));
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
    }
}
