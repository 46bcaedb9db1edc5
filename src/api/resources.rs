//! The resource table: everything the generic REST machinery needs to know
//! about each kind it serves, in one row per resource.
//!
//! The API server has no per-resource handlers. Routing, storage keys,
//! discovery documents, OpenAPI, field selectors, Table output and strategic
//! merge patch all read this table, and the few kind-specific behaviours
//! (Service defaulting and IP allocation, namespace termination) hang off
//! [`Kind`]. Adding a resource means adding a row.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::{ListableResource, Resource as K8sResource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::patch::ListStrategy;

/// Which kind-specific hooks apply (see `apiserver::hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Service,
    Endpoints,
    Pod,
    Node,
    Event,
    EndpointSlice,
    Lease,
    ReplicaSet,
    Deployment,
    PodDisruptionBudget,
    Secret,
    ConfigMap,
    CertificateSigningRequest,
    ServiceAccount,
    Role,
    ClusterRole,
    RoleBinding,
    ClusterRoleBinding,
}

/// One served resource. See the module docs.
pub struct ResourceDef {
    pub kind: Kind,
    pub group: &'static str,
    pub version: &'static str,
    /// `apiVersion` as written in objects (`v1`, `discovery.k8s.io/v1`).
    pub api_version: &'static str,
    pub kind_name: &'static str,
    pub list_kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// The object has a status that only the `/status` subresource changes.
    pub has_status: bool,
    /// PUT of a missing object creates it (as in Kubernetes' strategies).
    pub create_on_update: bool,
    /// Field selectors beyond `metadata.name` / `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    /// How strategic merge patch merges each list field (dotted path without
    /// indices); lists not named here are replaced, as Kubernetes does for
    /// fields without a patch strategy.
    pub merge_keys: &'static [(&'static str, ListStrategy)],
    /// Decode into the typed struct and encode back: validates the JSON
    /// shape, drops unknown fields, and yields the canonical form.
    pub normalize: fn(Value) -> Result<Value, serde_json::Error>,
    /// The JSON schema of the kind, for OpenAPI.
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// The Rust type name of the kind inside k8s-openapi (for OpenAPI ids).
    pub schema_id: &'static str,
}

impl std::fmt::Debug for ResourceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResourceDef({}/{})", self.api_version, self.plural)
    }
}

impl ResourceDef {
    /// The storage key prefix of this resource in `namespace` (all
    /// namespaces when `None`, and always for cluster-scoped resources).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{}/", self.plural, ns),
            _ => format!("/registry/{}/", self.plural),
        }
    }

    /// The storage key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.prefix(namespace), name)
    }

    /// Whether `field` may be used in a field selector on this resource.
    pub fn allows_field(&self, field: &str) -> bool {
        field == "metadata.name"
            || (field == "metadata.namespace" && self.namespaced)
            || self.field_selectors.contains(&field)
    }

    /// The list strategy of a list field, for strategic merge patch.
    pub fn list_strategy(&self, path: &str) -> ListStrategy {
        // Lists every kind shares through ObjectMeta.
        const COMMON: &[(&str, ListStrategy)] = &[
            ("metadata.finalizers", ListStrategy::MergePrimitives),
            ("metadata.ownerReferences", ListStrategy::MergeByKey("uid")),
            ("status.conditions", ListStrategy::MergeByKey("type")),
        ];
        COMMON
            .iter()
            .chain(self.merge_keys)
            .find(|(p, _)| *p == path)
            .map(|(_, s)| *s)
            .unwrap_or(ListStrategy::Replace)
    }
}

fn normalize<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, serde_json::Error> {
    let typed: T = serde_json::from_value(v)?;
    serde_json::to_value(typed)
}

fn schema<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// Builds a row from the k8s-openapi type, so group/version/kind names come
/// from the same source as the schema.
macro_rules! def {
    ($ty:ty, $kind:expr, singular: $singular:expr, $($field:ident: $value:expr),* $(,)?) => {
        ResourceDef {
            kind: $kind,
            group: <$ty as K8sResource>::GROUP,
            version: <$ty as K8sResource>::VERSION,
            api_version: <$ty as K8sResource>::API_VERSION,
            kind_name: <$ty as K8sResource>::KIND,
            list_kind: <$ty as ListableResource>::LIST_KIND,
            plural: <$ty as K8sResource>::URL_PATH_SEGMENT,
            singular: $singular,
            normalize: normalize::<$ty>,
            schema: schema::<$ty>,
            schema_id: std::any::type_name::<$ty>(),
            $($field: $value,)*
        }
    };
}

const CONTAINER_LISTS: &[(&str, ListStrategy)] = &[
    ("spec.containers", ListStrategy::MergeByKey("name")),
    ("spec.initContainers", ListStrategy::MergeByKey("name")),
    (
        "spec.containers.ports",
        ListStrategy::MergeByKey("containerPort"),
    ),
    ("spec.containers.env", ListStrategy::MergeByKey("name")),
    (
        "spec.containers.volumeMounts",
        ListStrategy::MergeByKey("mountPath"),
    ),
    ("spec.initContainers.env", ListStrategy::MergeByKey("name")),
    (
        "spec.initContainers.ports",
        ListStrategy::MergeByKey("containerPort"),
    ),
    (
        "spec.initContainers.volumeMounts",
        ListStrategy::MergeByKey("mountPath"),
    ),
    ("spec.volumes", ListStrategy::MergeByKey("name")),
    ("spec.imagePullSecrets", ListStrategy::MergeByKey("name")),
    ("spec.tolerations", ListStrategy::Replace),
    ("status.podIPs", ListStrategy::MergeByKey("ip")),
    ("status.containerStatuses", ListStrategy::Replace),
];

/// [`CONTAINER_LISTS`] under a workload's `spec.template`.
const TEMPLATE_LISTS: &[(&str, ListStrategy)] = &[
    (
        "spec.template.spec.containers",
        ListStrategy::MergeByKey("name"),
    ),
    (
        "spec.template.spec.initContainers",
        ListStrategy::MergeByKey("name"),
    ),
    (
        "spec.template.spec.containers.ports",
        ListStrategy::MergeByKey("containerPort"),
    ),
    (
        "spec.template.spec.containers.env",
        ListStrategy::MergeByKey("name"),
    ),
    (
        "spec.template.spec.volumes",
        ListStrategy::MergeByKey("name"),
    ),
    ("spec.template.spec.tolerations", ListStrategy::Replace),
];

/// Every resource the API server serves.
pub static RESOURCES: std::sync::LazyLock<Vec<ResourceDef>> = std::sync::LazyLock::new(|| {
    vec![
        def!(Namespace, Kind::Namespace, singular: "namespace",
            namespaced: false, short_names: &["ns"], categories: &[],
            has_status: true, create_on_update: false,
            field_selectors: &["status.phase"], merge_keys: &[]),
        def!(Service, Kind::Service, singular: "service",
        namespaced: true, short_names: &["svc"], categories: &["all"],
        has_status: true, create_on_update: true,
        field_selectors: &["spec.clusterIP", "spec.type"],
        merge_keys: &[
            ("spec.ports", ListStrategy::MergeByKey("port")),
            ("spec.externalIPs", ListStrategy::Replace),
            ("status.loadBalancer.ingress", ListStrategy::Replace),
        ]),
        def!(Endpoints, Kind::Endpoints, singular: "endpoints",
            namespaced: true, short_names: &["ep"], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
        def!(Pod, Kind::Pod, singular: "pod",
            namespaced: true, short_names: &["po"], categories: &["all"],
            has_status: true, create_on_update: false,
            field_selectors: &["spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                "spec.serviceAccountName", "spec.hostNetwork", "status.phase", "status.podIP",
                "status.nominatedNodeName"],
            merge_keys: CONTAINER_LISTS),
        def!(Node, Kind::Node, singular: "node",
        namespaced: false, short_names: &["no"], categories: &[],
        has_status: true, create_on_update: false,
        field_selectors: &["spec.unschedulable"],
        merge_keys: &[
            ("status.addresses", ListStrategy::MergeByKey("type")),
            ("spec.taints", ListStrategy::Replace),
        ]),
        def!(Event, Kind::Event, singular: "event",
            namespaced: true, short_names: &["ev"], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &["involvedObject.kind", "involvedObject.namespace",
                "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion",
                "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                "reportingComponent", "source", "type"],
            merge_keys: &[]),
        def!(EndpointSlice, Kind::EndpointSlice, singular: "endpointslice",
            namespaced: true, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &["addressType"], merge_keys: &[]),
        def!(Lease, Kind::Lease, singular: "lease",
            namespaced: true, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
        def!(ReplicaSet, Kind::ReplicaSet, singular: "replicaset",
            namespaced: true, short_names: &["rs"], categories: &["all"],
            has_status: true, create_on_update: false,
            field_selectors: &["status.replicas"], merge_keys: TEMPLATE_LISTS),
        def!(Deployment, Kind::Deployment, singular: "deployment",
            namespaced: true, short_names: &["deploy"], categories: &["all"],
            has_status: true, create_on_update: false,
            field_selectors: &[], merge_keys: TEMPLATE_LISTS),
        def!(PodDisruptionBudget, Kind::PodDisruptionBudget, singular: "poddisruptionbudget",
            namespaced: true, short_names: &["pdb"], categories: &[],
            has_status: true, create_on_update: false,
            field_selectors: &[], merge_keys: &[]),
        def!(Secret, Kind::Secret, singular: "secret",
            namespaced: true, short_names: &[], categories: &[],
            has_status: false, create_on_update: false,
            field_selectors: &["type"], merge_keys: &[]),
        def!(ConfigMap, Kind::ConfigMap, singular: "configmap",
            namespaced: true, short_names: &["cm"], categories: &[],
            has_status: false, create_on_update: false,
            field_selectors: &[], merge_keys: &[]),
        def!(ServiceAccount, Kind::ServiceAccount, singular: "serviceaccount",
        namespaced: true, short_names: &["sa"], categories: &[],
        has_status: false, create_on_update: false,
        field_selectors: &[], merge_keys: &[
            ("secrets", ListStrategy::MergeByKey("name")),
            ("imagePullSecrets", ListStrategy::MergeByKey("name")),
        ]),
        def!(CertificateSigningRequest, Kind::CertificateSigningRequest,
            singular: "certificatesigningrequest",
            namespaced: false, short_names: &["csr"], categories: &[],
            has_status: true, create_on_update: false,
            field_selectors: &["spec.signerName"], merge_keys: &[]),
        def!(Role, Kind::Role, singular: "role",
            namespaced: true, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
        def!(ClusterRole, Kind::ClusterRole, singular: "clusterrole",
            namespaced: false, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
        def!(RoleBinding, Kind::RoleBinding, singular: "rolebinding",
            namespaced: true, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
        def!(ClusterRoleBinding, Kind::ClusterRoleBinding, singular: "clusterrolebinding",
            namespaced: false, short_names: &[], categories: &[],
            has_status: false, create_on_update: true,
            field_selectors: &[], merge_keys: &[]),
    ]
});

/// The resource served at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of a kind.
pub fn by_kind(kind: Kind) -> &'static ResourceDef {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .expect("every Kind has a row")
}

/// The distinct (group, version) pairs served, core first.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter() {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// The value of a field-selector field in an object: a dotted path into the
/// JSON, with booleans and numbers in their string form (as Kubernetes'
/// field label conversion does).
pub fn field_value(obj: &Value, field: &str) -> Option<String> {
    let mut cur = obj;
    for part in field.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(o) if field == "source" => o
            .get("component")
            .and_then(|c| c.as_str())
            .map(String::from),
        _ => None,
    }
}
