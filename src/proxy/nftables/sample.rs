//! Small proxy states for golden files, tests and benchmarks (public so
//! integration tests and benches share them with the unit tests).

use std::sync::Arc;
use std::time::Duration;

use crate::proxy::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};

/// A service port name.
pub fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port: port.into(),
        protocol,
    }
}

/// A ready endpoint on `node` (panics on a bad address: test input).
pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
    }
}

/// A ClusterIP service port (panics on a bad address: test input).
pub fn info(cluster_ip: &str, port: u16, endpoints: Vec<Endpoint>) -> ServicePortInfo {
    ServicePortInfo {
        cluster_ips: vec![cluster_ip.parse().unwrap()],
        port,
        node_port: None,
        external_ips: vec![],
        app_protocol: None,
        affinity_timeout: None,
        internal_local: false,
        external_local: false,
        endpoints,
    }
}

/// Every rule shape (the golden files' state): a plain ClusterIP with two endpoints; a NodePort
/// with ClientIP affinity and an external IP; a UDP port without
/// endpoints; an externalTrafficPolicy Local service with one local and
/// one remote endpoint; an internalTrafficPolicy Local service with no
/// local endpoint.
pub fn every_shape() -> ProxyState {
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
