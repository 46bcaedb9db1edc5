//! nftables mode keeps per-request balancing (`appProtocol`, see
//! `userspace::l7`): the kernel cannot look inside a connection, so such a
//! service port is handed to a userspace L7 proxy on the node, and the
//! ruleset sends the port's traffic there.
//!
//! ```text
//!  changes ──split──► nftables: the port with one endpoint, <node IP>:<p>
//!                     (ClusterIP, NodePort, external IPs all DNAT there)
//!                 └─► L7 proxy: the port listening on <node IP>:<p>, with
//!                     the real endpoints (balanced per request)
//! ```
//!
//! `p` is a free port of the node IP, picked when the port turns L7 and
//! kept until it stops being one. Everything arrives on the listener as
//! internal traffic, so an L7 port's `externalTrafficPolicy` is not applied
//! (its `internalTrafficPolicy` is).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{Endpoint, PortChange, ServicePortInfo, ServicePortName};

/// The split state: which service ports are L7 and their listener ports.
#[derive(Debug)]
pub struct L7Redirect {
    ip: IpAddr,
    node: Arc<str>,
    ports: HashMap<ServicePortName, u16>,
}

impl L7Redirect {
    /// Redirect to listeners on `ip`, this node's (`node`) address.
    pub fn new(ip: IpAddr, node: &str) -> L7Redirect {
        L7Redirect {
            ip,
            node: Arc::from(node),
            ports: HashMap::new(),
        }
    }

    /// Split `changes`: (for the ruleset, for the L7 proxy). Errors (no
    /// free port) leave the port to the ruleset as plain L4.
    pub fn split(&mut self, changes: &[PortChange]) -> (Vec<PortChange>, Vec<PortChange>) {
        let mut nft = Vec::with_capacity(changes.len());
        let mut l7 = Vec::new();
        for (name, info) in changes {
            let wants_l7 = info.as_ref().is_some_and(|i| i.app_protocol.is_some());
            if !wants_l7 {
                if self.ports.remove(name).is_some() {
                    l7.push((name.clone(), None));
                }
                nft.push((name.clone(), info.clone()));
                continue;
            }
            let info = info.as_ref().expect("checked above");
            let port = match self.ports.get(name) {
                Some(p) => *p,
                None => match free_port(self.ip) {
                    Ok(p) => {
                        self.ports.insert(name.clone(), p);
                        p
                    }
                    Err(e) => {
                        tracing::warn!(service = %name, ip = %self.ip, error = %e,
                            "no port for the L7 listener; balancing this port per connection");
                        nft.push((name.clone(), Some(info.clone())));
                        continue;
                    }
                },
            };
            let listener = SocketAddr::new(self.ip, port);
            let (to_nft, to_l7) = split_one(info, listener, &self.node);
            nft.push((name.clone(), Some(Arc::new(to_nft))));
            l7.push((name.clone(), Some(Arc::new(to_l7))));
        }
        (nft, l7)
    }
}

/// The two halves of one L7 service port (pure).
fn split_one(
    info: &ServicePortInfo,
    listener: SocketAddr,
    node: &Arc<str>,
) -> (ServicePortInfo, ServicePortInfo) {
    let any = !info.usable_endpoints(None).is_empty();
    let to_nft = ServicePortInfo {
        app_protocol: None,
        endpoints: if any {
            vec![Endpoint {
                addr: listener,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(node.clone()),
            }]
        } else {
            Vec::new()
        },
        ..info.clone()
    };
    let to_l7 = ServicePortInfo {
        cluster_ips: vec![listener.ip()],
        port: listener.port(),
        node_port: None,
        external_ips: Vec::new(),
        external_local: false,
        ..info.clone()
    };
    (to_nft, to_l7)
}

/// A port of `ip` nobody listens on now (the kernel's pick).
fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{AppProtocol, Protocol};

    fn name(n: &str) -> ServicePortName {
        ServicePortName {
            namespace: Arc::from("default"),
            name: Arc::from(n),
            port: Arc::from("http"),
            protocol: Protocol::Tcp,
        }
    }

    fn info(app: Option<AppProtocol>, eps: usize) -> Arc<ServicePortInfo> {
        let mut i = crate::proxy::nftables::sample::info(
            "10.96.0.20",
            80,
            (0..eps)
                .map(|k| Endpoint {
                    addr: format!("10.244.0.{}:8080", 10 + k).parse().unwrap(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                })
                .collect(),
        );
        i.app_protocol = app;
        i.node_port = Some(30080);
        Arc::new(i)
    }

    #[test]
    fn l7_ports_go_to_the_local_listener_and_back() {
        let mut r = L7Redirect::new("127.0.0.1".parse().unwrap(), "n1");
        let (nft, l7) = r.split(&[
            (name("web"), Some(info(Some(AppProtocol::H2c), 3))),
            (name("plain"), Some(info(None, 3))),
        ]);
        assert!(nft
            .iter()
            .any(|(n, i)| n.name.as_ref() == "plain" && i.as_ref().unwrap().endpoints.len() == 3));
        let web_nft = nft.iter().find(|(n, _)| n.name.as_ref() == "web").unwrap();
        let web_nft = web_nft.1.as_ref().unwrap();
        assert_eq!(web_nft.endpoints.len(), 1, "one endpoint: the listener");
        assert_eq!(web_nft.node_port, Some(30080), "frontends kept");
        assert_eq!(web_nft.app_protocol, None);
        assert_eq!(l7.len(), 1);
        let web_l7 = l7[0].1.as_ref().unwrap();
        assert_eq!(web_l7.endpoints.len(), 3, "the real endpoints");
        assert_eq!(
            SocketAddr::new(web_l7.cluster_ips[0], web_l7.port),
            web_nft.endpoints[0].addr,
            "the listener is where the ruleset sends traffic"
        );
        assert_eq!(web_l7.node_port, None);

        // The same port keeps its listener; without endpoints the ruleset
        // refuses (no endpoint); without appProtocol it is L4 again.
        let (nft2, _) = r.split(&[(name("web"), Some(info(Some(AppProtocol::H2c), 0)))]);
        assert!(nft2[0].1.as_ref().unwrap().endpoints.is_empty());
        let (nft3, l73) = r.split(&[(name("web"), Some(info(None, 2)))]);
        assert_eq!(nft3[0].1.as_ref().unwrap().endpoints.len(), 2);
        assert_eq!(l73, vec![(name("web"), None)], "the listener goes");
    }
}
