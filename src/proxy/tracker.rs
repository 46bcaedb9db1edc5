//! The change tracker: from Services and their EndpointSlices (as lean
//! views, [`crate::model`]) to the node's [`ProxyState`], one Service at a
//! time.
//!
//! [`service_ports`] is the pure rule for one Service; [`ProxyTracker`]
//! keeps the whole state and, given the Services the [`Cache`] marked
//! dirty, recomputes only those and returns the service ports that
//! actually changed ([`PortChange`]s) — what the backends apply. A sync
//! therefore costs the size of the change, never the size of the cluster
//! (kube-proxy's ServiceChangeTracker and EndpointsChangeTracker do the
//! same). [`build`] is the from-scratch equivalent, for tests and as the
//! reference the incremental path is checked against.
//!
//! Which Services are proxied follows kube-proxy: not headless ones (DNS
//! serves them), not ExternalName, not those labelled
//! `service.kubernetes.io/service-proxy-name` (another proxy owns them).
//! Endpoint conditions follow the EndpointSlice API (resolved in
//! [`crate::model::EndpointView`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Endpoint, Protocol, ProxyState, ServicePortInfo, ServicePortName};
use crate::model::{Cache, ObjectKey, ServiceView, SliceView};

pub use crate::model::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

pub use super::PortChange;

/// Whether the node proxy should program this Service.
pub fn is_proxied(svc: &Service) -> bool {
    ServiceView::from_api(svc, &mut Default::default()).is_some_and(|v| v.is_proxied())
}

/// The service ports of one Service and its slices (none when the Service
/// is not proxied). Ports with an unknown protocol are skipped; of two
/// ports with one name and protocol (invalid), the last wins.
pub fn service_ports(
    key: &ObjectKey,
    svc: &ServiceView,
    slices: &[&Arc<SliceView>],
) -> BTreeMap<ServicePortName, ServicePortInfo> {
    let mut out = BTreeMap::new();
    if !svc.is_proxied() {
        return out;
    }
    for port in &svc.ports {
        let Some(protocol) = port.protocol else {
            continue;
        };
        let mut endpoints = BTreeSet::new();
        for slice in slices {
            let Some(sp) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == Some(protocol))
            else {
                continue;
            };
            let Some(target) = sp.port.filter(|p| (1..=65535).contains(p)) else {
                continue;
            };
            for ep in &slice.endpoints {
                for ip in ep.addresses() {
                    endpoints.insert(Endpoint {
                        addr: SocketAddr::new(*ip, target as u16),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        node_name: ep.node_name.clone(),
                    });
                }
            }
        }
        out.insert(
            ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port.name.clone(),
                protocol,
            },
            ServicePortInfo {
                cluster_ips: svc.cluster_ips.clone(),
                port: port.port as u16,
                node_port: port.node_port,
                external_ips: svc.external_ips.clone(),
                app_protocol: port.app_protocol.filter(|_| protocol == Protocol::Tcp),
                affinity_timeout: svc.affinity_timeout,
                internal_local: svc.internal_local,
                external_local: svc.external_local,
                endpoints: endpoints.into_iter().collect(),
            },
        );
    }
    out
}

/// The desired proxy state, kept up to date one Service at a time.
#[derive(Debug, Default, Clone)]
pub struct ProxyTracker {
    state: ProxyState,
}

/// The first possible service port name of a Service (ports sort after it).
fn first_port(key: &ObjectKey) -> ServicePortName {
    ServicePortName {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        port: Arc::from(""),
        protocol: Protocol::Tcp,
    }
}

impl ProxyTracker {
    pub fn new() -> ProxyTracker {
        ProxyTracker::default()
    }

    /// The whole desired state.
    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    /// The current service ports of one Service.
    pub fn ports_of<'s>(
        &'s self,
        key: &'s ObjectKey,
    ) -> impl Iterator<Item = (&'s ServicePortName, &'s Arc<ServicePortInfo>)> + 's {
        self.state
            .range(first_port(key)..)
            .take_while(move |(k, _)| k.namespace == key.namespace && k.name == key.name)
    }

    /// Recompute the Services `dirty` (from `cache`'s current contents)
    /// and return the service ports that changed, in name order. Unchanged
    /// ports keep their `Arc`, so backends skip them with a pointer
    /// comparison.
    pub fn update(&mut self, cache: &Cache, dirty: &[ObjectKey]) -> Vec<PortChange> {
        let mut changes = Vec::new();
        for key in dirty {
            let new = match cache.service(key) {
                Some(svc) => service_ports(key, svc, &cache.slices_of(key)),
                None => BTreeMap::new(),
            };
            let old: Vec<ServicePortName> = self
                .ports_of(key)
                .filter(|(k, _)| !new.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for spn in old {
                self.state.remove(&spn);
                changes.push((spn, None));
            }
            for (spn, info) in new {
                if self.state.get(&spn).is_some_and(|o| **o == info) {
                    continue;
                }
                let info = Arc::new(info);
                self.state.insert(spn.clone(), info.clone());
                changes.push((spn, Some(info)));
            }
        }
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        changes
    }
}

/// Build the desired state from API objects, from scratch.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> ProxyState {
    let mut cache = Cache::new();
    for s in services {
        cache.apply_service(s);
    }
    for s in slices {
        cache.apply_slice(s);
    }
    let dirty = cache.take_dirty();
    let mut t = ProxyTracker::new();
    t.update(&cache, &dirty.services);
    t.state
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

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
            .find(|(k, _)| &*k.port == "http")
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
        let dns = st.iter().find(|(k, _)| &*k.port == "dns").unwrap().1;
        assert!(dns.endpoints.is_empty(), "no slice port named dns");
    }

    #[test]
    fn terminating_fallback_and_local_policy() {
        let info = ServicePortInfo {
            cluster_ips: vec![],
            port: 80,
            node_port: None,
            external_ips: vec![],
            app_protocol: None,
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

    /// Acceptance 1 (proxy part): after any sequence of watch events —
    /// Services of every kind, slices, namespaces, deletes, re-creates,
    /// re-lists after missed deletes — the incrementally kept state equals
    /// a fresh build from the same objects, and each sync's changes are
    /// exactly the difference between the states before and after.
    #[test]
    fn incremental_state_equals_a_fresh_build() {
        use crate::model::random::{self, World};
        use crate::model::Cache;
        use rand::{Rng, SeedableRng};

        let seed = random::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut world = World::default();
        let mut cache = Cache::new();
        let mut tracker = ProxyTracker::new();
        let (mut syncs, mut changed) = (0, 0);
        for step in 0..3000 {
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
            let before = tracker.state().clone();
            let dirty = cache.take_dirty();
            let changes = tracker.update(&cache, &dirty.services);
            let fresh = build(world.services.values(), world.slices.values());
            assert_eq!(tracker.state(), &fresh, "step {step} (seed {seed})");
            let mut replayed = before.clone();
            for (spn, info) in &changes {
                let old = match info {
                    Some(i) => replayed.insert(spn.clone(), i.clone()),
                    None => replayed.remove(spn),
                };
                assert_ne!(
                    old.as_ref(),
                    info.as_ref(),
                    "step {step}: no-op change {spn}"
                );
            }
            assert_eq!(replayed, fresh, "step {step} (seed {seed}): changes");
            syncs += 1;
            changed += changes.len();
        }
        assert!(
            syncs > 300 && changed > 300,
            "{syncs} syncs, {changed} changes"
        );
    }
}
