//! EndpointSlices (and legacy Endpoints) from Services and Pods: the pure
//! part of the controller.
//!
//! [`plan`] takes one Service, the Pods in its namespace and the slices that
//! already exist for it, and says what to create, update and delete. It is
//! stable on purpose: existing endpoints stay in the slice they are in, a
//! changed pod rewrites only the slice that holds it, new pods fill free room
//! before a new slice is made, and an unchanged slice is never rewritten.
//!
//! Conditions follow Kubernetes: `serving` = the pod is Ready (or the
//! Service publishes not-ready addresses), `terminating` = the pod has a
//! deletionTimestamp, `ready` = serving and not terminating.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, ObjectReference,
    Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `endpointslice.kubernetes.io/managed-by` value of our slices (the same
/// as Kubernetes' controller, so tools that look for it find ours).
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// When the change a slice write carries was observed (RFC 3339), as
/// Kubernetes' controller annotates it; nodes measure network programming
/// latency from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What the controller must write for one Service.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<EndpointSlice>,
    pub update: Vec<EndpointSlice>,
    /// Names of slices to delete.
    pub delete: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// Whether the Service's selector picks this pod.
pub fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    if sel.is_empty() || svc.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let labels = pod.metadata.labels.as_ref();
    sel.iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The Service's selector as a label selector string (`k=v,k2=v2`), for
/// listing its pods. Empty when it has none (which would list every pod;
/// callers check [`has_selector`] first).
pub fn selector_string(svc: &Service) -> String {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .map(|sel| {
            sel.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Whether the Service gets managed endpoints (it has a non-empty selector).
pub fn has_selector(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The ports of one pod for the Service (named target ports resolved
/// against the pod's container ports); None if a named port is missing.
fn resolve_ports(svc: &Service, pod: &Pod) -> Vec<EndpointPort> {
    let mut out = Vec::new();
    for sp in svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
        let port = match &sp.target_port {
            None => Some(sp.port),
            Some(IntOrString::Int(p)) => Some(*p),
            Some(IntOrString::String(name)) => pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port),
        };
        if let Some(port) = port {
            out.push(EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(port),
                protocol: Some(protocol),
                app_protocol: sp.app_protocol.clone(),
            });
        }
    }
    out.sort_by(|a, b| (&a.name, &a.protocol).cmp(&(&b.name, &b.protocol)));
    out
}

/// The key of a port set (slices hold endpoints with identical ports).
type PortKey = Vec<(String, i32, String)>;

fn port_key(ports: &[EndpointPort]) -> PortKey {
    let mut k: PortKey = ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or(0),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect();
    k.sort();
    k
}

/// The endpoint of a pod, or None if it should not be listed (no IP yet,
/// finished).
fn pod_endpoint(svc: &Service, pod: &Pod) -> Option<Endpoint> {
    let status = pod.status.as_ref()?;
    let ip = status.pod_ip.clone().filter(|i| !i.is_empty())?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let serving = publish || pod_ready(pod);
    let ready = publish || (serving && !terminating);
    let svc_name = svc.metadata.name.as_deref().unwrap_or("");
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .filter(|_| spec.and_then(|s| s.subdomain.as_deref()) == Some(svc_name));
    Some(Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        hostname,
        node_name: spec.and_then(|s| s.node_name.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn owner_ref(svc: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        uid: svc.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn slice_labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = svc
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != SERVICE_NAME_LABEL && k != MANAGED_BY_LABEL)
        .collect();
    labels.insert(
        SERVICE_NAME_LABEL.into(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels
}

fn new_slice(svc: &Service, ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", svc.metadata.name.as_deref().unwrap_or(""))),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(slice_labels(svc)),
            owner_references: Some(vec![owner_ref(svc)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    }
}

fn address(ep: &Endpoint) -> &str {
    ep.addresses.first().map(String::as_str).unwrap_or("")
}

/// Compute the writes for one Service. `existing` are the slices managed by
/// us for it; `pods` may contain pods the Service does not select.
pub fn plan(
    svc: &Service,
    pods: &[&Pod],
    existing: &[EndpointSlice],
    max_per_slice: usize,
) -> Plan {
    let max = max_per_slice.max(1);
    // Desired endpoints, grouped by port set.
    let mut desired: BTreeMap<PortKey, (Vec<EndpointPort>, BTreeMap<String, Endpoint>)> =
        BTreeMap::new();
    for pod in pods.iter().filter(|p| selects(svc, p)) {
        let Some(ep) = pod_endpoint(svc, pod) else {
            continue;
        };
        let ports = resolve_ports(svc, pod);
        let entry = desired
            .entry(port_key(&ports))
            .or_insert_with(|| (ports, BTreeMap::new()));
        entry.1.insert(address(&ep).to_string(), ep);
    }
    // A Service with no endpoints still gets one (empty) slice, as in
    // Kubernetes, so clients can tell "no endpoints" from "not synced".
    if desired.is_empty() {
        desired.insert(Vec::new(), (Vec::new(), BTreeMap::new()));
    }
    let want_labels = slice_labels(svc);
    let want_owner = vec![owner_ref(svc)];
    let mut plan = Plan::default();
    for (key, (ports, mut todo)) in desired.clone() {
        let mut touched: Vec<EndpointSlice> = Vec::new();
        let mut untouched: Vec<EndpointSlice> = Vec::new();
        for slice in existing
            .iter()
            .filter(|s| port_key(s.ports.as_deref().unwrap_or(&[])) == key)
        {
            let mut s = slice.clone();
            let before = s.endpoints.clone();
            s.endpoints = before
                .iter()
                .filter_map(|ep| todo.remove(address(ep)))
                .collect();
            let meta_changed = s.metadata.labels.as_ref() != Some(&want_labels)
                || s.metadata.owner_references.as_ref() != Some(&want_owner);
            s.metadata.labels = Some(want_labels.clone());
            s.metadata.owner_references = Some(want_owner.clone());
            if s.endpoints != before || meta_changed {
                touched.push(s);
            } else {
                untouched.push(s);
            }
        }
        // Place remaining endpoints: first into slices we rewrite anyway,
        // then into untouched ones with room, then into new slices.
        let mut rest: Vec<Endpoint> = todo.into_values().collect();
        for s in touched.iter_mut() {
            while s.endpoints.len() < max && !rest.is_empty() {
                s.endpoints.push(rest.remove(0));
            }
        }
        let mut i = 0;
        while !rest.is_empty() && i < untouched.len() {
            if untouched[i].endpoints.len() < max {
                let mut s = untouched.remove(i);
                while s.endpoints.len() < max && !rest.is_empty() {
                    s.endpoints.push(rest.remove(0));
                }
                touched.push(s);
            } else {
                i += 1;
            }
        }
        let had_any = !touched.is_empty() || !untouched.is_empty();
        while !rest.is_empty() {
            let n = rest.len().min(max);
            let eps: Vec<Endpoint> = rest.drain(..n).collect();
            plan.create.push(new_slice(svc, ports.clone(), eps));
        }
        // Empty slices go away, unless it is the placeholder we need.
        let placeholder = key.is_empty() && desired.len() == 1;
        let mut kept_one =
            !plan.create.is_empty() || untouched.iter().any(|s| !s.endpoints.is_empty());
        for s in touched {
            if s.endpoints.is_empty() && (!placeholder || kept_one) {
                plan.delete
                    .push(s.metadata.name.clone().unwrap_or_default());
            } else {
                kept_one = true;
                plan.update.push(s);
            }
        }
        for s in untouched {
            if s.endpoints.is_empty() && (!placeholder || kept_one) {
                plan.delete
                    .push(s.metadata.name.clone().unwrap_or_default());
            } else {
                kept_one = true;
            }
        }
        if placeholder && !had_any && plan.create.is_empty() {
            plan.create.push(new_slice(svc, Vec::new(), Vec::new()));
        }
    }
    // Slices of port sets no longer wanted.
    let keys: BTreeSet<PortKey> = desired.keys().cloned().collect();
    for s in existing {
        if !keys.contains(&port_key(s.ports.as_deref().unwrap_or(&[]))) {
            plan.delete
                .push(s.metadata.name.clone().unwrap_or_default());
        }
    }
    plan
}

/// The legacy Endpoints object for a Service (ready addresses and
/// not-ready ones per port set), for clients that predate EndpointSlices.
pub fn endpoints(svc: &Service, pods: &[&Pod]) -> Endpoints {
    let mut subsets: BTreeMap<PortKey, EndpointSubset> = BTreeMap::new();
    for pod in pods.iter().filter(|p| selects(svc, p)) {
        let Some(ep) = pod_endpoint(svc, pod) else {
            continue;
        };
        if ep.conditions.as_ref().and_then(|c| c.terminating) == Some(true) {
            continue;
        }
        let ports = resolve_ports(svc, pod);
        let subset = subsets
            .entry(port_key(&ports))
            .or_insert_with(|| EndpointSubset {
                ports: Some(
                    ports
                        .iter()
                        .map(|p| CoreEndpointPort {
                            name: p.name.clone().filter(|n| !n.is_empty()),
                            port: p.port.unwrap_or(0),
                            protocol: p.protocol.clone(),
                            app_protocol: p.app_protocol.clone(),
                        })
                        .collect(),
                ),
                ..Default::default()
            });
        let addr = EndpointAddress {
            ip: address(&ep).to_string(),
            hostname: ep.hostname.clone(),
            node_name: ep.node_name.clone(),
            target_ref: ep.target_ref.clone(),
        };
        let ready = ep
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(false);
        let list = if ready {
            subset.addresses.get_or_insert_with(Vec::new)
        } else {
            subset.not_ready_addresses.get_or_insert_with(Vec::new)
        };
        list.push(addr);
    }
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    Endpoints {
        metadata: ObjectMeta {
            name: svc.metadata.name.clone(),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            ..Default::default()
        },
        subsets: {
            let s: Vec<EndpointSubset> = subsets
                .into_values()
                .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
                .collect();
            (!s.is_empty()).then_some(s)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Service {
        serde_json::from_value(json!({"metadata":{"name":"web","namespace":"d","uid":"u1"},
            "spec":{"selector":{"app":"web"},"clusterIP":"10.96.0.5",
              "ports":[{"name":"http","port":80,"targetPort":"http","protocol":"TCP"}]}}))
        .unwrap()
    }
    fn pod(name: &str, ip: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({"metadata":{"name":name,"namespace":"d","uid":format!("uid-{name}"),"labels":{"app":"web"}},
            "spec":{"nodeName":"n1","containers":[{"name":"c","ports":[{"name":"http","containerPort":8080}]}]},
            "status":{"phase":"Running","podIP":ip,"conditions":[{"type":"Ready","status": if ready {"True"} else {"False"}}]}}))
        .unwrap()
    }
    fn named(mut s: EndpointSlice, n: &str) -> EndpointSlice {
        s.metadata.name = Some(n.into());
        s.metadata.generate_name = None;
        s
    }

    #[test]
    fn creates_slices_with_resolved_ports_and_conditions() {
        let pods = [pod("a", "10.0.0.1", true), pod("b", "10.0.0.2", false)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let p = plan(&svc(), &refs, &[], 100);
        assert_eq!(p.create.len(), 1);
        let s = &p.create[0];
        assert_eq!(s.ports.as_ref().unwrap()[0].port, Some(8080));
        assert_eq!(s.endpoints.len(), 2);
        let b = s
            .endpoints
            .iter()
            .find(|e| e.addresses[0] == "10.0.0.2")
            .unwrap();
        assert_eq!(b.conditions.as_ref().unwrap().ready, Some(false));
        assert_eq!(b.node_name.as_deref(), Some("n1"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        assert_eq!(s.metadata.owner_references.as_ref().unwrap()[0].uid, "u1");
    }

    #[test]
    fn unchanged_is_not_rewritten_and_one_pod_change_touches_one_slice() {
        let pods: Vec<Pod> = (0..5)
            .map(|i| pod(&format!("p{i}"), &format!("10.0.0.{i}"), true))
            .collect();
        let refs: Vec<&Pod> = pods.iter().collect();
        let first = plan(&svc(), &refs, &[], 2);
        assert_eq!(first.create.len(), 3);
        let existing: Vec<EndpointSlice> = first
            .create
            .into_iter()
            .enumerate()
            .map(|(i, s)| named(s, &format!("web-{i}")))
            .collect();
        assert!(plan(&svc(), &refs, &existing, 2).is_empty());
        let mut changed = pods.clone();
        changed[3] = pod("p3", "10.0.0.3", false);
        let refs: Vec<&Pod> = changed.iter().collect();
        let p = plan(&svc(), &refs, &existing, 2);
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert_eq!(p.update.len(), 1);
    }

    #[test]
    fn no_pods_gives_one_empty_slice_and_removed_pods_shrink() {
        let p = plan(&svc(), &[], &[], 100);
        assert_eq!(p.create.len(), 1);
        assert!(p.create[0].endpoints.is_empty());
        let placeholder = named(p.create.into_iter().next().unwrap(), "web-0");
        assert!(plan(&svc(), &[], std::slice::from_ref(&placeholder), 100).is_empty());
        // Pods appear: the placeholder (other port set) is replaced.
        let pods = [pod("a", "10.0.0.1", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let p = plan(&svc(), &refs, &[placeholder], 100);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.delete, vec!["web-0".to_string()]);
    }

    #[test]
    fn terminating_and_legacy_endpoints() {
        let mut t = pod("t", "10.0.0.9", true);
        t.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        ));
        let pods = [pod("a", "10.0.0.1", true), pod("b", "10.0.0.2", false), t];
        let refs: Vec<&Pod> = pods.iter().collect();
        let p = plan(&svc(), &refs, &[], 100);
        let te = p.create[0]
            .endpoints
            .iter()
            .find(|e| e.addresses[0] == "10.0.0.9")
            .unwrap();
        let c = te.conditions.as_ref().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );
        let ep = endpoints(&svc(), &refs);
        let subset = &ep.subsets.unwrap()[0];
        assert_eq!(subset.addresses.as_ref().unwrap().len(), 1);
        assert_eq!(subset.not_ready_addresses.as_ref().unwrap().len(), 1);
        assert_eq!(subset.ports.as_ref().unwrap()[0].port, 8080);
    }

    #[test]
    fn selector_matching() {
        let s = svc();
        assert_eq!(selector_string(&s), "app=web");
        assert!(selects(&s, &pod("a", "1.1.1.1", true)));
        let mut other = pod("x", "1.1.1.2", true);
        other.metadata.namespace = Some("e".into());
        assert!(!selects(&s, &other));
    }
}
