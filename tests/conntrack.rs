//! `fairlead::proxy::conntrack` against the kernel: each test in a network
//! namespace of its own with a static nft DNAT rule standing in for a UDP
//! Service (10.96.0.10:53, NodePort 10.0.0.1:30053) and two UDP echo
//! backends (10.244.0.11:5353, 10.244.0.12:5353) that answer with their own
//! address. A client socket with a fixed source port is one long-lived UDP
//! flow, like a resolver's.
//!
//! Needs root and `nft` for the stand-in rules (tests skip, saying so,
//! when it is missing); the deletions themselves speak ctnetlink.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use common::netns::{have_nft, Netns, UdpClient, UdpEcho};
use fairlead::proxy::conntrack::{
    delete_udp, delete_udp_to_endpoint, delete_udp_to_node_port, delete_udp_to_service, StaleUdp,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 53;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NODE_PORT: u16 = 30053;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const TARGET_PORT: u16 = 5353;

// ---- helpers ----------------------------------------------------------------

/// The "Service": ClusterIP and NodePort DNATed to `backend`, replacing any
/// previous rules in one transaction (existing flows keep their entries).
fn point_service_at(ns: &Netns, backend: Ipv4Addr) {
    ns.nft_f(&format!(
        "table ip t\n\
         flush table ip t\n\
         table ip t {{\n\
           chain out {{\n\
             type nat hook output priority -100;\n\
             ip daddr {CLUSTER_IP} udp dport {PORT} dnat to {backend}:{TARGET_PORT}\n\
             ip daddr {NODE_IP} udp dport {NODE_PORT} dnat to {backend}:{TARGET_PORT}\n\
           }}\n\
         }}\n"
    ));
}

/// The test's namespace with addresses, routes, the Service pointing at
/// POD_A, and both backends running (each answering with its address).
struct Setup {
    /// Dropped before the namespace (field order).
    _echoes: Vec<UdpEcho>,
    ns: Netns,
}

fn setup() -> Setup {
    let ns = Netns::new();
    for ip in [POD_A, POD_B, NODE_IP] {
        ns.run_ok("ip", &["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    // Service IPs are local, like kube-proxy's ClusterIPs seen from a node.
    ns.run_ok(
        "ip",
        &["route", "add", "local", "10.96.0.0/16", "dev", "lo"],
    );
    point_service_at(&ns, POD_A);
    let echoes = [POD_A, POD_B]
        .into_iter()
        .map(|ip| {
            let addr = SocketAddr::V4(SocketAddrV4::new(ip, TARGET_PORT));
            UdpEcho::start(&ns, addr, &ip.to_string())
        })
        .collect();
    Setup {
        _echoes: echoes,
        ns,
    }
}

/// Send one datagram to `to`; the backend that answered.
fn ask(c: &UdpClient, to: SocketAddrV4) -> String {
    c.ask_ok(SocketAddr::V4(to))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---- tests ------------------------------------------------------------------

#[test]
fn deleting_entries_to_a_removed_endpoint_moves_the_flow() {
    if !have_nft("deleting_entries_to_a_removed_endpoint_moves_the_flow") {
        return;
    }
    let s = setup();
    let rt = rt();
    let svc = SocketAddrV4::new(CLUSTER_IP, PORT);
    let c = UdpClient::bind(&s.ns, 40000);
    assert_eq!(ask(&c, svc), POD_A.to_string());

    // The endpoint is replaced: new flows go to POD_B...
    point_service_at(&s.ns, POD_B);
    assert_eq!(ask(&UdpClient::bind(&s.ns, 40001), svc), POD_B.to_string());
    // ...but the existing flow still goes to POD_A (its conntrack entry).
    assert_eq!(ask(&c, svc), POD_A.to_string(), "the entry is stale");

    let ns = Some(s.ns.name.as_str());
    let deleted = rt
        .block_on(delete_udp_to_endpoint(
            ns,
            SocketAddrV4::new(POD_A, TARGET_PORT),
        ))
        .expect("delete");
    assert_eq!(deleted, 1, "exactly the flow to POD_A");
    assert_eq!(
        ask(&c, svc),
        POD_B.to_string(),
        "the flow follows the rules"
    );

    // Nothing left to POD_A.
    let again = rt.block_on(delete_udp_to_endpoint(
        ns,
        SocketAddrV4::new(POD_A, TARGET_PORT),
    ));
    assert_eq!(again.expect("delete"), 0);
}

#[test]
fn deleting_entries_to_a_service_and_a_node_port() {
    if !have_nft("deleting_entries_to_a_service_and_a_node_port") {
        return;
    }
    let s = setup();
    let rt = rt();
    let ns = Some(s.ns.name.as_str());
    let svc = SocketAddrV4::new(CLUSTER_IP, PORT);
    let node_port = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let c = UdpClient::bind(&s.ns, 40000);
    assert_eq!(ask(&c, svc), POD_A.to_string());
    assert_eq!(ask(&c, node_port), POD_A.to_string());

    point_service_at(&s.ns, POD_B);
    assert_eq!(ask(&c, svc), POD_A.to_string(), "the entry is stale");
    assert_eq!(ask(&c, node_port), POD_A.to_string(), "the entry is stale");

    // By frontend: only the ClusterIP flow.
    let deleted = rt
        .block_on(delete_udp_to_service(ns, CLUSTER_IP, PORT))
        .expect("delete");
    assert_eq!(deleted, 1);
    assert_eq!(ask(&c, svc), POD_B.to_string());
    assert_eq!(ask(&c, node_port), POD_A.to_string(), "NodePort flow kept");

    // By NodePort: the NodePort flow.
    let deleted = rt
        .block_on(delete_udp_to_node_port(ns, NODE_PORT))
        .expect("delete");
    assert_eq!(deleted, 1);
    assert_eq!(ask(&c, node_port), POD_B.to_string());
}

/// A sync's clean-ups go in one call (one dump): here a frontend and a
/// NodePort together, and only their flows.
#[test]
fn one_call_deletes_every_kind_it_names() {
    if !have_nft("one_call_deletes_every_kind_it_names") {
        return;
    }
    let s = setup();
    let rt = rt();
    let ns = Some(s.ns.name.as_str());
    let svc = SocketAddrV4::new(CLUSTER_IP, PORT);
    let node_port = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let (c1, c2, other) = (
        UdpClient::bind(&s.ns, 40000),
        UdpClient::bind(&s.ns, 40001),
        UdpClient::bind(&s.ns, 40002),
    );
    assert_eq!(ask(&c1, svc), POD_A.to_string());
    assert_eq!(ask(&c2, node_port), POD_A.to_string());
    assert_eq!(
        ask(&other, SocketAddrV4::new(POD_A, TARGET_PORT)),
        POD_A.to_string()
    );
    point_service_at(&s.ns, POD_B);

    let stale = vec![
        StaleUdp::ToFrontend(CLUSTER_IP, PORT),
        StaleUdp::ToNodePort(NODE_PORT),
    ];
    assert_eq!(rt.block_on(delete_udp(ns, stale)).expect("delete"), 2);
    assert_eq!(ask(&c1, svc), POD_B.to_string());
    assert_eq!(ask(&c2, node_port), POD_B.to_string());
    assert_eq!(rt.block_on(delete_udp(ns, vec![])).expect("nothing"), 0);
}

#[test]
fn nothing_to_delete_is_zero() {
    if !have_nft("nothing_to_delete_is_zero") {
        return;
    }
    let s = setup();
    let rt = rt();
    let ns = Some(s.ns.name.as_str());
    // A live flow that none of the deletions below match.
    let c = UdpClient::bind(&s.ns, 40000);
    assert_eq!(
        ask(&c, SocketAddrV4::new(CLUSTER_IP, PORT)),
        POD_A.to_string()
    );

    let to_endpoint = rt.block_on(delete_udp_to_endpoint(
        ns,
        SocketAddrV4::new(POD_B, TARGET_PORT),
    ));
    assert_eq!(to_endpoint.expect("delete"), 0);
    let to_service = rt.block_on(delete_udp_to_service(ns, CLUSTER_IP, 54));
    assert_eq!(to_service.expect("delete"), 0);
    let to_node_port = rt.block_on(delete_udp_to_node_port(ns, NODE_PORT));
    assert_eq!(to_node_port.expect("delete"), 0);

    // The flow was left alone.
    assert_eq!(
        ask(&c, SocketAddrV4::new(CLUSTER_IP, PORT)),
        POD_A.to_string()
    );
}

#[test]
fn a_missing_namespace_is_a_one_line_error() {
    if !have_nft("a_missing_namespace_is_a_one_line_error") {
        return;
    }
    let err = rt()
        .block_on(delete_udp_to_service(
            Some("fl-no-such-namespace"),
            CLUSTER_IP,
            PORT,
        ))
        .expect_err("no such namespace");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("fl-no-such-namespace"), "{msg}");
}
