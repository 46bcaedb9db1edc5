//! The node's lean view of the API objects it watches: what the proxy and
//! cluster DNS need of a Service, an EndpointSlice and a Namespace, and
//! nothing else.
//!
//! Why not keep the API objects: at 30,000 Services × 10 endpoints, whole
//! `Service` and `EndpointSlice` values (metadata, managed fields, status,
//! every optional field) cost several hundred MiB, and comparing them says
//! nothing about whether the proxy must act. A view is built once per watch
//! event ([`ServiceView::from_api`], [`SliceView::from_api`]); two views
//! compare equal exactly when nothing the node derives from them can
//! differ, so an event that changes only, say, a status or an annotation,
//! costs one comparison and no work downstream.
//!
//! Strings that repeat across objects (namespaces, port names, node names,
//! hostnames of well-known pods) are interned ([`Interner`]) and shared as
//! `Arc<str>`; the views themselves are shared, never copied, between the
//! change tracker ([`crate::proxy::tracker`]) and the DNS index
//! ([`crate::dns::index`]).

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::proxy::Protocol;

/// Label marking a Service as handled by another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The EndpointSlice controller's annotation: when the change that
/// produced this slice happened (kube-proxy's network programming latency
/// starts there).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Shares equal strings. Only low-cardinality strings go here (namespaces,
/// port names, node names): the set is pruned of strings nobody else holds
/// whenever it has doubled since the last pruning, so churn of unique
/// names cannot grow it without bound.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<Arc<str>>,
    prune_at: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= self.prune_at {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.prune_at = (self.set.len() * 2).max(1024);
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }

    /// Strings held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// What `spec.clusterIP` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterIpField {
    /// Absent or empty (not allocated, or an ExternalName Service).
    Unset,
    /// `"None"`: headless.
    None,
    /// An address (or something the API server let through).
    Set,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortView {
    /// `""` for a single unnamed port.
    pub name: Arc<str>,
    /// `None`: a protocol this node does not know (no proxying; DNS treats
    /// it as TCP, as CoreDNS does).
    pub protocol: Option<Protocol>,
    pub port: i32,
    /// Set and non-zero.
    pub node_port: Option<u16>,
    /// `appProtocol`, when it selects per-request balancing.
    pub app_protocol: Option<crate::proxy::AppProtocol>,
}

/// What the node needs of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub type_: ServiceType,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy
    /// owns it.
    pub foreign_proxy: bool,
    pub cluster_ip: ClusterIpField,
    /// `spec.clusterIPs` if non-empty, else `spec.clusterIP`; parseable
    /// addresses only, in order (duplicates kept).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortView>,
    /// `spec.externalIPs`, then LoadBalancer ingress IPs.
    pub external_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub affinity_timeout: Option<Duration>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with
    /// `externalTrafficPolicy: Local` (served by [`crate::node::svchealth`]).
    pub health_check_node_port: Option<u16>,
    pub publish_not_ready_addresses: bool,
    /// `spec.externalName` as written (DNS parses it).
    pub external_name: Option<Arc<str>>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortView {
    pub name: Arc<str>,
    /// `None`: unknown protocol (matches no service port; DNS: TCP).
    pub protocol: Option<Protocol>,
    pub port: Option<i32>,
}

/// One endpoint of an EndpointSlice, with its conditions resolved the
/// API's way: an unset `ready` means ready, an unset `serving` means "same
/// as ready", an unset `terminating` means not terminating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    /// The first parseable address (endpoints without any are dropped).
    pub address: IpAddr,
    /// The others (nearly always none: no allocation then).
    pub more: Box<[IpAddr]>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    /// Non-empty `hostname`.
    pub hostname: Option<Arc<str>>,
}

/// What the node needs of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    /// The `kubernetes.io/service-name` label (`None`: belongs to no
    /// Service).
    pub service: Option<Arc<str>>,
    pub ports: Vec<SlicePortView>,
    pub endpoints: Vec<EndpointView>,
    /// [`TRIGGER_TIME_ANNOTATION`], parsed. Not compared: a slice whose
    /// endpoints did not change needs no programming.
    pub trigger_time: Option<jiff::Timestamp>,
}

impl EndpointView {
    /// Every address, the first first.
    pub fn addresses(&self) -> impl Iterator<Item = &IpAddr> + '_ {
        std::iter::once(&self.address).chain(self.more.iter())
    }
}

impl SliceView {
    /// Equal for every purpose of the proxy and DNS (the trigger time
    /// aside).
    pub fn same_content(&self, other: &SliceView) -> bool {
        self.service == other.service
            && self.ports == other.ports
            && self.endpoints == other.endpoints
    }
}

/// `v` without spare capacity. A view lives as long as its object, and a
/// vector collected from a filtering iterator grows by doubling: ten
/// endpoints would hold room for sixteen, a third of the node's memory
/// for slices at 30,000 Services.
fn exact<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    Protocol::parse(p.unwrap_or("TCP"))
}

fn parse_ips<'a>(ips: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    ips.into_iter().filter_map(|i| i.parse().ok()).collect()
}

impl ServiceView {
    /// The view of an API Service (`None` without a spec: nothing to
    /// serve).
    pub fn from_api(svc: &Service, strings: &mut Interner) -> Option<ServiceView> {
        let spec = svc.spec.as_ref()?;
        let type_ = match spec.type_.as_deref() {
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            _ => ServiceType::ClusterIp,
        };
        let cluster_ip = match spec.cluster_ip.as_deref() {
            None | Some("") => ClusterIpField::Unset,
            Some("None") => ClusterIpField::None,
            Some(_) => ClusterIpField::Set,
        };
        let cluster_ips = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => parse_ips(ips),
            _ => parse_ips(spec.cluster_ip.iter()),
        };
        let mut external_ips = parse_ips(spec.external_ips.iter().flatten());
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
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePortView {
                name: strings.get(p.name.as_deref().unwrap_or("")),
                protocol: parse_protocol(p.protocol.as_deref()),
                port: p.port,
                node_port: p
                    .node_port
                    .filter(|n| (1..=65535).contains(n))
                    .map(|n| n as u16),
                app_protocol: p
                    .app_protocol
                    .as_deref()
                    .and_then(crate::proxy::AppProtocol::parse),
            })
            .collect();
        Some(ServiceView {
            type_,
            foreign_proxy: svc
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)),
            cluster_ip,
            cluster_ips,
            ports,
            external_ips,
            affinity_timeout,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec
                .health_check_node_port
                .filter(|_| {
                    type_ == ServiceType::LoadBalancer
                        && spec.external_traffic_policy.as_deref() == Some("Local")
                })
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0),
            publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
            external_name: spec.external_name.as_deref().map(Arc::from),
        })
    }

    /// Whether the node proxy programs this Service (kube-proxy's rule):
    /// not headless ones (DNS serves them), not ExternalName, not those
    /// another proxy owns.
    pub fn is_proxied(&self) -> bool {
        !self.foreign_proxy
            && self.type_ != ServiceType::ExternalName
            && self.cluster_ip == ClusterIpField::Set
    }
}

impl SliceView {
    /// The view of an API EndpointSlice.
    pub fn from_api(slice: &EndpointSlice, strings: &mut Interner) -> SliceView {
        let meta = &slice.metadata;
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|s| Arc::from(s.as_str()));
        let trigger_time = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse().ok());
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePortView {
                name: strings.get(p.name.as_deref().unwrap_or("")),
                protocol: parse_protocol(p.protocol.as_deref()),
                port: p.port,
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|ep| {
                let mut addresses = parse_ips(&ep.addresses).into_iter();
                let address = addresses.next()?;
                let more: Box<[IpAddr]> = addresses.collect();
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                Some(EndpointView {
                    address,
                    more,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node_name: ep.node_name.as_deref().map(|n| strings.get(n)),
                    hostname: ep
                        .hostname
                        .as_deref()
                        .filter(|h| !h.is_empty())
                        .map(|h| strings.get(h)),
                })
            })
            .collect();
        SliceView {
            service,
            ports: exact(ports),
            endpoints: exact(endpoints),
            trigger_time,
        }
    }
}

/// Which kind of object a watch event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    Slice,
    Namespace,
}

/// What changed in the [`Cache`] since the last [`Cache::take_dirty`].
#[derive(Debug, Default)]
pub struct Dirty {
    /// Services whose view, or one of whose slices, changed (including
    /// ones that no longer exist), sorted.
    pub services: Vec<ObjectKey>,
    /// Namespaces that appeared (`true`) or went away (`false`).
    pub namespaces: Vec<(Arc<str>, bool)>,
    /// Trigger times of the slices that changed (network programming
    /// latency).
    pub trigger_times: Vec<jiff::Timestamp>,
    /// Events that changed a view.
    pub events: usize,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.namespaces.is_empty()
    }
}

/// The lean watch cache: every Service, EndpointSlice and Namespace as a
/// view, the slices indexed by their Service, and the keys touched since
/// the last [`Cache::take_dirty`] (kube-proxy's change trackers). Pure: the
/// node's watch tasks feed it events; the sync loop takes the dirty keys
/// and hands only those Services to the proxy and DNS.
#[derive(Debug, Default)]
pub struct Cache {
    strings: Interner,
    services: std::collections::HashMap<ObjectKey, Arc<ServiceView>>,
    slices: std::collections::HashMap<ObjectKey, Arc<SliceView>>,
    /// Service key → names of its slices.
    by_service: std::collections::HashMap<ObjectKey, Vec<Arc<str>>>,
    namespaces: HashSet<Arc<str>>,
    dirty_services: HashSet<ObjectKey>,
    /// Namespace → exists, for namespaces whose existence changed.
    dirty_namespaces: std::collections::HashMap<Arc<str>, bool>,
    trigger_times: Vec<jiff::Timestamp>,
    events: usize,
    /// Keys seen since a re-list began, per kind being re-listed.
    relisting: std::collections::HashMap<Kind, HashSet<ObjectKey>>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or(""),
    )
}

impl Cache {
    pub fn new() -> Cache {
        Cache::default()
    }

    /// Intern a namespace-like string.
    fn key(&mut self, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: self.strings.get(namespace),
            name: Arc::from(name),
        }
    }

    fn seen(&mut self, kind: Kind, key: &ObjectKey) {
        if let Some(s) = self.relisting.get_mut(&kind) {
            s.insert(key.clone());
        }
    }

    /// A Service was added or changed.
    pub fn apply_service(&mut self, svc: &Service) {
        let k = key_of(&svc.metadata);
        let key = self.key(&k.namespace, &k.name);
        self.seen(Kind::Service, &key);
        match ServiceView::from_api(svc, &mut self.strings) {
            Some(view) => self.set_service(key, Some(view)),
            None => self.set_service(key, None),
        }
    }

    /// A Service was deleted.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.set_service(key, None);
    }

    /// Replace (or remove) one Service's view directly.
    pub fn set_service(&mut self, key: ObjectKey, view: Option<ServiceView>) {
        let changed = match view {
            Some(v) => match self.services.get(&key) {
                Some(old) if **old == v => false,
                _ => {
                    self.services.insert(key.clone(), Arc::new(v));
                    true
                }
            },
            None => self.services.remove(&key).is_some(),
        };
        if changed {
            self.events += 1;
            self.dirty_services.insert(key);
        }
    }

    /// An EndpointSlice was added or changed.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) {
        let k = key_of(&slice.metadata);
        let key = self.key(&k.namespace, &k.name);
        self.seen(Kind::Slice, &key);
        let view = SliceView::from_api(slice, &mut self.strings);
        self.set_slice(key, Some(view));
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.set_slice(key, None);
    }

    /// Replace (or remove) one slice's view directly.
    pub fn set_slice(&mut self, key: ObjectKey, view: Option<SliceView>) {
        let old = self.slices.get(&key).cloned();
        if let (Some(o), Some(n)) = (&old, &view) {
            if o.same_content(n) {
                return;
            }
        }
        if old.is_none() && view.is_none() {
            return;
        }
        self.events += 1;
        // Unlink from the old Service, link to the new one; both are dirty.
        if let Some(svc) = old.as_ref().and_then(|o| o.service.clone()) {
            let skey = ObjectKey {
                namespace: key.namespace.clone(),
                name: svc,
            };
            if let Some(names) = self.by_service.get_mut(&skey) {
                names.retain(|n| *n != key.name);
                if names.is_empty() {
                    self.by_service.remove(&skey);
                }
            }
            self.dirty_services.insert(skey);
        }
        match view {
            Some(v) => {
                if let Some(t) = v.trigger_time {
                    self.trigger_times.push(t);
                }
                if let Some(svc) = v.service.clone() {
                    let skey = ObjectKey {
                        namespace: key.namespace.clone(),
                        name: svc,
                    };
                    // Sorted by name: every consumer sees a Service's
                    // slices in one order, however they arrived.
                    let names = self.by_service.entry(skey.clone()).or_default();
                    if let Err(i) = names.binary_search(&key.name) {
                        names.insert(i, key.name.clone());
                    }
                    self.dirty_services.insert(skey);
                }
                self.slices.insert(key, Arc::new(v));
            }
            None => {
                self.slices.remove(&key);
            }
        }
    }

    /// A Namespace was added (or changed: only its existence matters).
    pub fn apply_namespace(&mut self, name: &str) {
        let name = self.strings.get(name);
        self.seen(Kind::Namespace, &ObjectKey::new("", name.clone()));
        if self.namespaces.insert(name.clone()) {
            self.events += 1;
            self.dirty_namespaces.insert(name, true);
        }
    }

    /// A Namespace was deleted.
    pub fn delete_namespace(&mut self, name: &str) {
        if let Some(n) = self.namespaces.take(name) {
            self.events += 1;
            self.dirty_namespaces.insert(n, false);
        }
    }

    /// A watch of `kind` starts listing everything again (after a restart
    /// or an expired resourceVersion): objects applied until
    /// [`Cache::end_relist`] are the whole set.
    pub fn begin_relist(&mut self, kind: Kind) {
        self.relisting.insert(kind, HashSet::new());
    }

    /// The re-list of `kind` is complete: whatever it did not list was
    /// deleted meanwhile.
    pub fn end_relist(&mut self, kind: Kind) {
        let Some(seen) = self.relisting.remove(&kind) else {
            return;
        };
        match kind {
            Kind::Service => {
                let gone: Vec<ObjectKey> = self
                    .services
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.set_service(k, None);
                }
            }
            Kind::Slice => {
                let gone: Vec<ObjectKey> = self
                    .slices
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.set_slice(k, None);
                }
            }
            Kind::Namespace => {
                let gone: Vec<Arc<str>> = self
                    .namespaces
                    .iter()
                    .filter(|n| !seen.contains(&ObjectKey::new("", (*n).clone())))
                    .cloned()
                    .collect();
                for n in gone {
                    self.delete_namespace(&n);
                }
            }
        }
    }

    /// Whether something changed since the last [`Cache::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty_services.is_empty() || !self.dirty_namespaces.is_empty()
    }

    /// The keys touched since the last call (and forget them).
    pub fn take_dirty(&mut self) -> Dirty {
        let mut services: Vec<ObjectKey> = self.dirty_services.drain().collect();
        services.sort();
        let mut namespaces: Vec<(Arc<str>, bool)> = self.dirty_namespaces.drain().collect();
        namespaces.sort();
        Dirty {
            services,
            namespaces,
            trigger_times: std::mem::take(&mut self.trigger_times),
            events: std::mem::take(&mut self.events),
        }
    }

    /// Mark everything dirty (an explicit full resync).
    pub fn mark_all(&mut self) {
        self.dirty_services.extend(self.services.keys().cloned());
        self.dirty_services.extend(self.by_service.keys().cloned());
        for n in &self.namespaces {
            self.dirty_namespaces.insert(n.clone(), true);
        }
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<ServiceView>> {
        self.services.get(key)
    }

    /// The cache's own key (its `Arc`s, to share) and view of a Service.
    pub fn service_entry(&self, key: &ObjectKey) -> Option<(&ObjectKey, &Arc<ServiceView>)> {
        self.services.get_key_value(key)
    }

    /// The slices labelled with this Service's name, in its namespace,
    /// sorted by slice name.
    pub fn slices_of(&self, key: &ObjectKey) -> Vec<&Arc<SliceView>> {
        let Some(names) = self.by_service.get(key) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| {
                self.slices.get(&ObjectKey {
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect()
    }

    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<ServiceView>)> {
        self.services.iter()
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<str>> {
        self.namespaces.iter()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }
}

/// Random API objects and events for property tests (here, in
/// [`crate::proxy::tracker`] and in [`crate::dns::index`]): few namespaces,
/// names, addresses and ports, so that events collide (re-creates, slices
/// moving between Services, shared endpoints, conflicting frontends).
#[cfg(test)]
#[allow(dead_code)] // each property test uses a part
pub(crate) mod random {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use rand::Rng;
    use serde_json::json;

    use super::{Cache, ObjectKey};

    /// One watch event.
    #[derive(Clone, Debug)]
    #[allow(clippy::large_enum_variant)] // test input
    pub enum Event {
        Service(Service),
        DeleteService(String, String),
        Slice(EndpointSlice),
        DeleteSlice(String, String),
        Namespace(String),
        DeleteNamespace(String),
    }

    /// The objects that exist, as a watch cache of whole objects would
    /// hold them.
    #[derive(Clone, Debug, Default)]
    pub struct World {
        pub services: BTreeMap<(String, String), Service>,
        pub slices: BTreeMap<(String, String), EndpointSlice>,
        pub namespaces: std::collections::BTreeSet<String>,
    }

    impl World {
        /// Apply `e` to the world and to `cache`.
        pub fn apply(&mut self, e: &Event, cache: &mut Cache) {
            match e {
                Event::Service(s) => {
                    let k = key(&s.metadata);
                    self.services.insert(k, s.clone());
                    cache.apply_service(s);
                }
                Event::DeleteService(ns, n) => {
                    self.services.remove(&(ns.clone(), n.clone()));
                    cache.delete_service(ns, n);
                }
                Event::Slice(s) => {
                    let k = key(&s.metadata);
                    self.slices.insert(k, s.clone());
                    cache.apply_slice(s);
                }
                Event::DeleteSlice(ns, n) => {
                    self.slices.remove(&(ns.clone(), n.clone()));
                    cache.delete_slice(ns, n);
                }
                Event::Namespace(n) => {
                    self.namespaces.insert(n.clone());
                    cache.apply_namespace(n);
                }
                Event::DeleteNamespace(n) => {
                    self.namespaces.remove(n);
                    cache.delete_namespace(n);
                }
            }
        }

        /// What a watch does after it lost events: list everything again.
        /// Objects deleted while the watch was away (`forgotten`) are gone
        /// from the world but still in `cache` until the re-list ends.
        pub fn relist(&self, cache: &mut Cache) {
            use super::Kind;
            cache.begin_relist(Kind::Service);
            for s in self.services.values() {
                cache.apply_service(s);
            }
            cache.end_relist(Kind::Service);
            cache.begin_relist(Kind::Slice);
            for s in self.slices.values() {
                cache.apply_slice(s);
            }
            cache.end_relist(Kind::Slice);
            cache.begin_relist(Kind::Namespace);
            for n in &self.namespaces {
                cache.apply_namespace(n);
            }
            cache.end_relist(Kind::Namespace);
        }

        /// Delete a random object from the world without telling any
        /// cache (a watch that missed the delete).
        pub fn forget_one(&mut self, rng: &mut impl Rng) {
            match rng.random_range(0..3) {
                0 if !self.services.is_empty() => {
                    let k = self
                        .services
                        .keys()
                        .nth(rng.random_range(0..self.services.len()))
                        .cloned();
                    self.services.remove(&k.unwrap());
                }
                1 if !self.slices.is_empty() => {
                    let k = self
                        .slices
                        .keys()
                        .nth(rng.random_range(0..self.slices.len()))
                        .cloned();
                    self.slices.remove(&k.unwrap());
                }
                _ => {
                    let k = self.namespaces.iter().next().cloned();
                    if let Some(k) = k {
                        self.namespaces.remove(&k);
                    }
                }
            }
        }

        /// A cache filled from scratch with the world's objects.
        pub fn fresh_cache(&self) -> Cache {
            let mut c = Cache::new();
            for s in self.services.values() {
                c.apply_service(s);
            }
            for s in self.slices.values() {
                c.apply_slice(s);
            }
            for n in &self.namespaces {
                c.apply_namespace(n);
            }
            c
        }

        /// Every Service key a fresh build would consider.
        pub fn service_keys(&self) -> Vec<ObjectKey> {
            self.services
                .keys()
                .map(|(ns, n)| ObjectKey::new(ns.as_str(), n.as_str()))
                .collect()
        }
    }

    fn key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }

    const NAMESPACES: [&str; 3] = ["a", "b", "kube-system"];
    const NAMES: [&str; 5] = ["web", "db", "kube-dns", "h", "x"];
    const PORT_NAMES: [&str; 3] = ["", "http", "dns"];
    const PROTOCOLS: [&str; 4] = ["TCP", "UDP", "SCTP", "QUIC"];

    fn pick<'a, T>(rng: &mut impl Rng, v: &'a [T]) -> &'a T {
        &v[rng.random_range(0..v.len())]
    }

    /// A random Service: ClusterIP (sometimes dual-stack, NodePort,
    /// external IPs, affinity, traffic policies), headless, ExternalName,
    /// without a ClusterIP yet, or owned by another proxy.
    pub fn service(rng: &mut impl Rng) -> Service {
        let ns = *pick(rng, &NAMESPACES);
        let name = *pick(rng, &NAMES);
        let ports: Vec<serde_json::Value> = (0..rng.random_range(0..3))
            .map(|_| {
                let mut p = json!({
                    "name": pick(rng, &PORT_NAMES),
                    "port": 80 + rng.random_range(0..3),
                    "protocol": pick(rng, &PROTOCOLS),
                });
                if rng.random_bool(0.3) {
                    p["nodePort"] = json!(30000 + rng.random_range(0..3));
                }
                p
            })
            .collect();
        let ip = format!("10.96.0.{}", rng.random_range(1..6));
        let mut spec = json!({"ports": ports});
        match rng.random_range(0..10) {
            0 => {
                spec["clusterIP"] = json!("None");
                spec["publishNotReadyAddresses"] = json!(rng.random_bool(0.5));
            }
            1 => {
                spec["type"] = json!("ExternalName");
                spec["externalName"] = json!(*pick(
                    rng,
                    &["example.com", "web.a.svc.cluster.local", "", "bad..name"]
                ));
            }
            2 => {}
            _ => {
                spec["clusterIP"] = json!(ip);
                if rng.random_bool(0.2) {
                    spec["clusterIPs"] = json!([ip, "fd00::1"]);
                }
                if rng.random_bool(0.3) {
                    spec["type"] = json!("NodePort");
                }
                if rng.random_bool(0.2) {
                    spec["externalIPs"] = json!(["192.0.2.1"]);
                }
                if rng.random_bool(0.2) {
                    spec["sessionAffinity"] = json!("ClientIP");
                }
                if rng.random_bool(0.2) {
                    spec["internalTrafficPolicy"] = json!("Local");
                }
                if rng.random_bool(0.2) {
                    spec["externalTrafficPolicy"] = json!("Local");
                }
            }
        }
        let mut meta = json!({"name": name, "namespace": ns});
        if rng.random_bool(0.05) {
            meta["labels"] = json!({super::SERVICE_PROXY_NAME_LABEL: "other"});
        }
        serde_json::from_value(json!({"metadata": meta, "spec": spec})).expect("valid Service")
    }

    /// A random EndpointSlice of a random Service (sometimes of none).
    pub fn slice(rng: &mut impl Rng) -> EndpointSlice {
        let ns = *pick(rng, &NAMESPACES);
        let svc = *pick(rng, &NAMES);
        let name = format!("{svc}-{}", rng.random_range(0..3));
        let mut meta = json!({"name": name, "namespace": ns});
        if rng.random_bool(0.9) {
            meta["labels"] = json!({super::SERVICE_NAME_LABEL: pick(rng, &NAMES)});
        }
        let ports: Vec<serde_json::Value> = (0..rng.random_range(0..3))
            .map(|_| {
                json!({
                    "name": pick(rng, &PORT_NAMES),
                    "port": 8080 + rng.random_range(0..2),
                    "protocol": pick(rng, &PROTOCOLS),
                })
            })
            .collect();
        let endpoints: Vec<serde_json::Value> = (0..rng.random_range(0..4))
            .map(|_| {
                let mut e = json!({
                    "addresses": [format!("10.244.0.{}", rng.random_range(1..6))],
                });
                if rng.random_bool(0.3) {
                    e["conditions"] = json!({
                        "ready": rng.random_bool(0.5),
                        "serving": rng.random_bool(0.5),
                        "terminating": rng.random_bool(0.5),
                    });
                }
                if rng.random_bool(0.5) {
                    e["nodeName"] = json!(*pick(rng, &["node-a", "node-b"]));
                }
                if rng.random_bool(0.3) {
                    e["hostname"] =
                        json!(*pick(rng, &["p0", "p1", "", "P0", "10-244-0-2", "_udp"]));
                }
                e
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": meta,
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("valid EndpointSlice")
    }

    /// A random event against `world`: mostly upserts, some deletes of
    /// existing objects, namespaces coming and going.
    pub fn event(rng: &mut impl Rng, world: &World) -> Event {
        match rng.random_range(0..20) {
            0..=6 => Event::Service(service(rng)),
            7..=13 => Event::Slice(slice(rng)),
            14 | 15 => match world
                .services
                .keys()
                .nth(rng.random_range(0..world.services.len().max(1)))
            {
                Some((ns, n)) => Event::DeleteService(ns.clone(), n.clone()),
                None => Event::Service(service(rng)),
            },
            16 | 17 => match world
                .slices
                .keys()
                .nth(rng.random_range(0..world.slices.len().max(1)))
            {
                Some((ns, n)) => Event::DeleteSlice(ns.clone(), n.clone()),
                None => Event::Slice(slice(rng)),
            },
            18 => Event::Namespace(pick(rng, &NAMESPACES).to_string()),
            _ => Event::DeleteNamespace(pick(rng, &NAMESPACES).to_string()),
        }
    }

    /// The seed of a property test: `FAIRLEAD_TEST_SEED`, else random
    /// (printed, so a failure can be repeated).
    pub fn seed() -> u64 {
        let seed = std::env::var("FAIRLEAD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        eprintln!("seed {seed} (FAIRLEAD_TEST_SEED={seed} repeats this run)");
        seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn views_resolve_defaults_and_drop_what_nobody_needs() {
        let mut strings = Interner::default();
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "d", "annotations": {"x": "y"}},
            "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "bad"],
                     "ports": [{"port": 80, "nodePort": 0}, {"name": "q", "port": 53, "protocol": "QUIC"}],
                     "sessionAffinity": "ClientIP"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
        }))
        .unwrap();
        let v = ServiceView::from_api(&svc, &mut strings).unwrap();
        assert!(v.is_proxied());
        assert_eq!(v.cluster_ips, vec!["10.96.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.external_ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.affinity_timeout, Some(Duration::from_secs(10800)));
        assert_eq!(v.ports[0].node_port, None);
        assert_eq!(v.ports[1].protocol, None);
        // An annotation-only change gives an equal view.
        let mut svc2 = svc.clone();
        svc2.metadata.annotations = None;
        assert_eq!(ServiceView::from_api(&svc2, &mut strings).unwrap(), v);

        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "d",
                         "labels": {"kubernetes.io/service-name": "web"},
                         "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-02T03:04:05Z"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1", "hostname": ""},
                          {"addresses": ["nope"]},
                          {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]
        }))
        .unwrap();
        let s = SliceView::from_api(&slice, &mut strings);
        assert_eq!(s.service.as_deref(), Some("web"));
        assert_eq!(s.endpoints.len(), 2);
        assert!(
            s.endpoints[0].ready && s.endpoints[0].serving && s.endpoints[0].hostname.is_none()
        );
        assert!(!s.endpoints[1].ready && !s.endpoints[1].serving);
        assert!(s.trigger_time.is_some());
        // Node names are shared.
        let again = SliceView::from_api(&slice, &mut strings);
        assert!(Arc::ptr_eq(
            s.endpoints[0].node_name.as_ref().unwrap(),
            again.endpoints[0].node_name.as_ref().unwrap()
        ));
    }

    #[test]
    fn interner_prunes_unused_strings() {
        let mut strings = Interner::default();
        let kept = strings.get("kept");
        for i in 0..5000 {
            strings.get(&format!("gone-{i}"));
        }
        assert!(strings.len() < 2100, "{}", strings.len());
        assert!(Arc::ptr_eq(&kept, &strings.get("kept")));
    }
}
