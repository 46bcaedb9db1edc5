//! The change tracker: a pure function from Services + EndpointSlices to the
//! node's [`ProxyState`]. The daemon calls it on each coalesced batch of
//! cache changes; backends diff its output against what they applied, so the
//! cost of a sync follows the size of the change.
//!
//! Which Services are proxied follows kube-proxy: not headless ones (DNS
//! serves them), not ExternalName, not those labelled
//! `service.kubernetes.io/service-proxy-name` (another proxy owns them).
//! Endpoint conditions follow the EndpointSlice API: an unset `ready` means
//! ready, an unset `serving` means "same as ready", an unset `terminating`
//! means not terminating.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};

/// Label marking a Service as handled by another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether the node proxy should program this Service.
pub fn is_proxied(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    !matches!(spec.cluster_ip.as_deref(), None | Some("") | Some("None"))
}

type SliceKey<'a> = (&'a str, &'a str);

/// Build the desired state from snapshots of the caches.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> ProxyState {
    // Index slices by (namespace, service name) once.
    let mut by_service: HashMap<SliceKey<'a>, Vec<&'a EndpointSlice>> = HashMap::new();
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
    let mut state = ProxyState::new();
    for svc in services {
        if !is_proxied(svc) {
            continue;
        }
        let ns = svc.metadata.namespace.as_deref().unwrap_or("");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let spec = svc.spec.as_ref().expect("checked by is_proxied");
        let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|i| i.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
        };
        let mut external_ips: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|i| i.parse().ok())
            .collect();
        if let Some(ingress) = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
        {
            external_ips.extend(
                ingress
                    .iter()
                    .filter_map(|i| i.ip.as_deref())
                    .filter_map(|i| i.parse::<IpAddr>().ok()),
            );
        }
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            Duration::from_secs(secs.max(1) as u64)
        });
        let svc_slices = by_service
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for port in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP")) else {
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let mut endpoints = BTreeSet::new();
            for slice in svc_slices {
                let Some(sp) = slice.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
                }) else {
                    continue;
                };
                let Some(target) = sp.port.filter(|p| (1..=65535).contains(p)) else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let c = ep.conditions.as_ref();
                    let ready = c.and_then(|c| c.ready).unwrap_or(true);
                    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                    for addr in &ep.addresses {
                        let Ok(ip) = addr.parse::<IpAddr>() else {
                            continue;
                        };
                        endpoints.insert(Endpoint {
                            addr: SocketAddr::new(ip, target as u16),
                            ready,
                            serving,
                            terminating,
                            node_name: ep.node_name.clone(),
                        });
                    }
                }
            }
            let key = ServicePortName {
                namespace: ns.to_string(),
                name: name.to_string(),
                port: port_name,
                protocol,
            };
            state.insert(
                key,
                Arc::new(ServicePortInfo {
                    cluster_ips: cluster_ips.clone(),
                    port: port.port as u16,
                    node_port: port.node_port.filter(|p| *p > 0).map(|p| p as u16),
                    external_ips: external_ips.clone(),
                    affinity_timeout,
                    internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                    external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                    endpoints: endpoints.into_iter().collect(),
                }),
            );
        }
    }
    state
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

    #[test]
    fn builds_ports_with_endpoints_and_conditions() {
        let s = svc(json!({"metadata":{"name":"web","namespace":"d"},
            "spec":{"clusterIP":"10.96.0.5","clusterIPs":["10.96.0.5"],"type":"NodePort",
              "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":30}},
              "ports":[{"name":"http","port":80,"protocol":"TCP","nodePort":30080},
                       {"name":"dns","port":53,"protocol":"UDP"}]}}));
        let sl = slice(
            json!({"metadata":{"name":"web-1","namespace":"d","labels":{"kubernetes.io/service-name":"web"}},
            "addressType":"IPv4",
            "ports":[{"name":"http","port":8080,"protocol":"TCP"}],
            "endpoints":[{"addresses":["10.0.0.1"],"conditions":{"ready":true}},
                         {"addresses":["10.0.0.2"],"conditions":{"ready":false,"serving":true,"terminating":true},"nodeName":"n1"},
                         {"addresses":["10.0.0.3"]}]}),
        );
        let other_ns = slice(
            json!({"metadata":{"name":"web-1","namespace":"x","labels":{"kubernetes.io/service-name":"web"}},
            "addressType":"IPv4","ports":[{"name":"http","port":1,"protocol":"TCP"}],
            "endpoints":[{"addresses":["10.9.9.9"]}]}),
        );
        let st = build([&s], [&sl, &other_ns]);
        assert_eq!(st.len(), 2);
        let http = st
            .iter()
            .find(|(k, _)| k.port == "http")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(http.node_port, Some(30080));
        assert_eq!(http.affinity_timeout, Some(Duration::from_secs(30)));
        assert_eq!(http.endpoints.len(), 3);
        let ready = http.usable_endpoints(None);
        assert_eq!(
            ready,
            vec![
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.3:8080".parse().unwrap()
            ]
        );
        let dns = st.iter().find(|(k, _)| k.port == "dns").unwrap().1;
        assert!(dns.endpoints.is_empty(), "no slice port named dns");
    }

    #[test]
    fn terminating_fallback_and_local_policy() {
        let info = ServicePortInfo {
            cluster_ips: vec![],
            port: 80,
            node_port: None,
            external_ips: vec![],
            affinity_timeout: None,
            internal_local: false,
            external_local: false,
            endpoints: vec![
                Endpoint {
                    addr: "10.0.0.1:80".parse().unwrap(),
                    ready: false,
                    serving: true,
                    terminating: true,
                    node_name: Some("a".into()),
                },
                Endpoint {
                    addr: "10.0.0.2:80".parse().unwrap(),
                    ready: false,
                    serving: false,
                    terminating: false,
                    node_name: Some("b".into()),
                },
            ],
        };
        assert_eq!(
            info.usable_endpoints(None),
            vec!["10.0.0.1:80".parse().unwrap()]
        );
        assert!(info.usable_endpoints(Some("b")).is_empty());
    }

    #[test]
    fn skips_headless_external_name_and_foreign_proxy() {
        let headless = svc(
            json!({"metadata":{"name":"h","namespace":"d"},"spec":{"clusterIP":"None","ports":[{"port":80}]}}),
        );
        let ext = svc(
            json!({"metadata":{"name":"e","namespace":"d"},"spec":{"type":"ExternalName","externalName":"x.y"}}),
        );
        let foreign = svc(
            json!({"metadata":{"name":"f","namespace":"d","labels":{"service.kubernetes.io/service-proxy-name":"other"}},
            "spec":{"clusterIP":"10.96.0.9","ports":[{"port":80}]}}),
        );
        assert!(build([&headless, &ext, &foreign], []).is_empty());
    }
}
