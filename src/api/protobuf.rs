//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`) decoded to
//! the JSON the rest of the server works on.
//!
//! client-go's typed clients (so kubectl's imperative `create namespace`,
//! `create service`, `expose`, `run`) send built-in kinds as protobuf with no
//! JSON fallback. The body is the 4 magic bytes `k8s\0` followed by a
//! `runtime.Unknown` message:
//!
//! ```text
//! Unknown  { typeMeta = 1: TypeMeta, raw = 2: bytes, contentEncoding = 3, contentType = 4 }
//! TypeMeta { apiVersion = 1, kind = 2 }
//! ```
//!
//! `raw` is the object's own message (which carries no TypeMeta). It is
//! decoded by a small wire-format parser driven by static [`Schema`] tables
//! whose field numbers are those of the upstream `generated.proto` files
//! (cross-checked with the prost-generated `k8s-pb` crate). Only the kinds in
//! [`KINDS`] have tables; anything else must be sent as JSON.
//!
//! Proto semantics kept: unknown field numbers are skipped, a repeated
//! non-repeated scalar keeps the last value, a repeated message field merges.
//! Go semantics kept: the Go structs behind these messages encode value
//! (non-pointer) fields even when zero, and kube-apiserver cannot tell such a
//! zero from "unset", so zero values of [`Ty::String`], [`Ty::Int32`],
//! [`Ty::Int64`], [`Ty::Bool`] and zero `IntOrString`/`Time` values are left
//! out of the JSON (as `omitempty` would); the `Opt*` types are Go pointer
//! fields, kept whenever present. Fields the tables know but cannot express
//! ([`Ty::Unsupported`]) are an error when non-empty rather than silently
//! dropped.
//!
//! Malformed input is an error, never a panic; recursion is bounded by
//! [`MAX_DEPTH`].

use std::fmt;

use serde_json::{Map, Value};

/// The protobuf media type of Kubernetes request bodies.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Prefix of every Kubernetes protobuf body.
const MAGIC: &[u8; 4] = b"k8s\0";

/// Deepest message nesting accepted (the tables nest 4 deep at most).
pub const MAX_DEPTH: usize = 16;

/// A message: its proto name (for errors) and its known fields.
#[derive(Debug)]
pub struct Schema {
    pub name: &'static str,
    pub fields: &'static [Field],
}

/// One known field of a message.
#[derive(Debug)]
pub struct Field {
    pub number: u32,
    pub json_name: &'static str,
    pub ty: Ty,
}

/// How a field is encoded and rendered in JSON.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// Go value field: the zero value (`""`, `0`, `false`) means unset and is
    /// omitted from the JSON.
    String,
    Int32,
    Int64,
    Bool,
    /// Go pointer field: kept whenever present, zero included.
    OptString,
    OptInt32,
    OptInt64,
    OptBool,
    Message(&'static Schema),
    /// `map<string, string>`: repeated `{key = 1, value = 2}` entries.
    MapStringString,
    /// `map<string, bytes>`: the values base64-encoded, as in JSON.
    MapStringBytes,
    RepeatedString,
    RepeatedMessage(&'static Schema),
    /// `intstr.IntOrString {type = 1, intVal = 2, strVal = 3}` → number or
    /// string.
    IntOrString,
    /// `meta.v1.Time {seconds = 1, nanos = 2}` → `YYYY-MM-DDTHH:MM:SSZ`.
    Time,
    /// A field these tables cannot express: accepted only when empty (Go
    /// always encodes value structs, even empty), otherwise an
    /// [`DecodeError::Unsupported`] error.
    Unsupported,
}

const fn f(number: u32, json_name: &'static str, ty: Ty) -> Field {
    Field {
        number,
        json_name,
        ty,
    }
}

// ---- k8s.io.apimachinery.pkg.apis.meta.v1 ----

static OWNER_REFERENCE: Schema = Schema {
    name: "OwnerReference",
    fields: &[
        f(5, "apiVersion", Ty::String),
        f(1, "kind", Ty::String),
        f(3, "name", Ty::String),
        f(4, "uid", Ty::String),
        f(6, "controller", Ty::OptBool),
        f(7, "blockOwnerDeletion", Ty::OptBool),
    ],
};

static OBJECT_META: Schema = Schema {
    name: "ObjectMeta",
    fields: &[
        f(1, "name", Ty::String),
        f(2, "generateName", Ty::String),
        f(3, "namespace", Ty::String),
        // 4 selfLink: deprecated, ignored.
        f(5, "uid", Ty::String),
        f(6, "resourceVersion", Ty::String),
        f(7, "generation", Ty::Int64),
        f(8, "creationTimestamp", Ty::Time),
        f(9, "deletionTimestamp", Ty::Time),
        f(10, "deletionGracePeriodSeconds", Ty::OptInt64),
        f(11, "labels", Ty::MapStringString),
        f(12, "annotations", Ty::MapStringString),
        f(13, "ownerReferences", Ty::RepeatedMessage(&OWNER_REFERENCE)),
        f(14, "finalizers", Ty::RepeatedString),
        // 17 managedFields: server-side apply bookkeeping, ignored.
    ],
};

// ---- k8s.io.api.core.v1: Namespace ----

static NAMESPACE_SPEC: Schema = Schema {
    name: "NamespaceSpec",
    fields: &[f(1, "finalizers", Ty::RepeatedString)],
};

static NAMESPACE_STATUS: Schema = Schema {
    name: "NamespaceStatus",
    // 2 conditions: set by the server, ignored.
    fields: &[f(1, "phase", Ty::String)],
};

static NAMESPACE: Schema = Schema {
    name: "Namespace",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&NAMESPACE_SPEC)),
        f(3, "status", Ty::Message(&NAMESPACE_STATUS)),
    ],
};

// ---- k8s.io.api.core.v1: ConfigMap, Secret ----

static CONFIG_MAP: Schema = Schema {
    name: "ConfigMap",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "data", Ty::MapStringString),
        f(3, "binaryData", Ty::MapStringBytes),
        f(4, "immutable", Ty::OptBool),
    ],
};

static SECRET: Schema = Schema {
    name: "Secret",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "data", Ty::MapStringBytes),
        f(3, "type", Ty::String),
        f(4, "stringData", Ty::MapStringString),
        f(5, "immutable", Ty::OptBool),
    ],
};

// ---- k8s.io.api.core.v1: Service ----

static SERVICE_PORT: Schema = Schema {
    name: "ServicePort",
    fields: &[
        f(1, "name", Ty::String),
        f(2, "protocol", Ty::String),
        f(3, "port", Ty::Int32),
        f(4, "targetPort", Ty::IntOrString),
        f(5, "nodePort", Ty::Int32),
        f(6, "appProtocol", Ty::OptString),
    ],
};

static CLIENT_IP_CONFIG: Schema = Schema {
    name: "ClientIPConfig",
    fields: &[f(1, "timeoutSeconds", Ty::OptInt32)],
};

static SESSION_AFFINITY_CONFIG: Schema = Schema {
    name: "SessionAffinityConfig",
    fields: &[f(1, "clientIP", Ty::Message(&CLIENT_IP_CONFIG))],
};

static SERVICE_SPEC: Schema = Schema {
    name: "ServiceSpec",
    fields: &[
        f(1, "ports", Ty::RepeatedMessage(&SERVICE_PORT)),
        f(2, "selector", Ty::MapStringString),
        f(3, "clusterIP", Ty::String),
        f(4, "type", Ty::String),
        f(5, "externalIPs", Ty::RepeatedString),
        f(7, "sessionAffinity", Ty::String),
        f(8, "loadBalancerIP", Ty::String),
        f(9, "loadBalancerSourceRanges", Ty::RepeatedString),
        f(10, "externalName", Ty::String),
        f(11, "externalTrafficPolicy", Ty::String),
        f(12, "healthCheckNodePort", Ty::Int32),
        f(13, "publishNotReadyAddresses", Ty::Bool),
        f(
            14,
            "sessionAffinityConfig",
            Ty::Message(&SESSION_AFFINITY_CONFIG),
        ),
        f(17, "ipFamilyPolicy", Ty::OptString),
        f(18, "clusterIPs", Ty::RepeatedString),
        f(19, "ipFamilies", Ty::RepeatedString),
        f(20, "allocateLoadBalancerNodePorts", Ty::OptBool),
        f(21, "loadBalancerClass", Ty::OptString),
        f(22, "internalTrafficPolicy", Ty::OptString),
        f(23, "trafficDistribution", Ty::OptString),
    ],
};

static SERVICE: Schema = Schema {
    name: "Service",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&SERVICE_SPEC)),
        // 3 status: ignored on create/update, as kube-apiserver does.
    ],
};

// ---- k8s.io.api.core.v1: Pod ----

static CONTAINER_PORT: Schema = Schema {
    name: "ContainerPort",
    fields: &[
        f(1, "name", Ty::String),
        f(2, "hostPort", Ty::Int32),
        f(3, "containerPort", Ty::Int32),
        f(4, "protocol", Ty::String),
        f(5, "hostIP", Ty::String),
    ],
};

static ENV_VAR: Schema = Schema {
    name: "EnvVar",
    fields: &[
        f(1, "name", Ty::String),
        f(2, "value", Ty::String),
        f(3, "valueFrom", Ty::Unsupported),
    ],
};

static CONTAINER: Schema = Schema {
    name: "Container",
    fields: &[
        f(1, "name", Ty::String),
        f(2, "image", Ty::String),
        f(3, "command", Ty::RepeatedString),
        f(4, "args", Ty::RepeatedString),
        f(5, "workingDir", Ty::String),
        f(6, "ports", Ty::RepeatedMessage(&CONTAINER_PORT)),
        f(7, "env", Ty::RepeatedMessage(&ENV_VAR)),
        f(8, "resources", Ty::Unsupported),
        f(9, "volumeMounts", Ty::Unsupported),
        f(10, "livenessProbe", Ty::Unsupported),
        f(11, "readinessProbe", Ty::Unsupported),
        f(12, "lifecycle", Ty::Unsupported),
        f(13, "terminationMessagePath", Ty::String),
        f(14, "imagePullPolicy", Ty::String),
        f(15, "securityContext", Ty::Unsupported),
        f(16, "stdin", Ty::Bool),
        f(17, "stdinOnce", Ty::Bool),
        f(18, "tty", Ty::Bool),
        f(19, "envFrom", Ty::Unsupported),
        f(20, "terminationMessagePolicy", Ty::String),
        f(21, "volumeDevices", Ty::Unsupported),
        f(22, "startupProbe", Ty::Unsupported),
        f(23, "resizePolicy", Ty::Unsupported),
        f(24, "restartPolicy", Ty::OptString),
        f(25, "restartPolicyRules", Ty::Unsupported),
    ],
};

static LOCAL_OBJECT_REFERENCE: Schema = Schema {
    name: "LocalObjectReference",
    fields: &[f(1, "name", Ty::String)],
};

static TOLERATION: Schema = Schema {
    name: "Toleration",
    fields: &[
        f(1, "key", Ty::String),
        f(2, "operator", Ty::String),
        f(3, "value", Ty::String),
        f(4, "effect", Ty::String),
        f(5, "tolerationSeconds", Ty::OptInt64),
    ],
};

static POD_SPEC: Schema = Schema {
    name: "PodSpec",
    fields: &[
        f(1, "volumes", Ty::Unsupported),
        f(2, "containers", Ty::RepeatedMessage(&CONTAINER)),
        f(3, "restartPolicy", Ty::String),
        f(4, "terminationGracePeriodSeconds", Ty::OptInt64),
        f(5, "activeDeadlineSeconds", Ty::OptInt64),
        f(6, "dnsPolicy", Ty::String),
        f(7, "nodeSelector", Ty::MapStringString),
        f(8, "serviceAccountName", Ty::String),
        f(9, "serviceAccount", Ty::String),
        f(10, "nodeName", Ty::String),
        f(11, "hostNetwork", Ty::Bool),
        f(12, "hostPID", Ty::Bool),
        f(13, "hostIPC", Ty::Bool),
        f(14, "securityContext", Ty::Unsupported),
        f(
            15,
            "imagePullSecrets",
            Ty::RepeatedMessage(&LOCAL_OBJECT_REFERENCE),
        ),
        f(16, "hostname", Ty::String),
        f(17, "subdomain", Ty::String),
        f(18, "affinity", Ty::Unsupported),
        f(19, "schedulerName", Ty::String),
        f(20, "initContainers", Ty::RepeatedMessage(&CONTAINER)),
        f(21, "automountServiceAccountToken", Ty::OptBool),
        f(22, "tolerations", Ty::RepeatedMessage(&TOLERATION)),
        f(23, "hostAliases", Ty::Unsupported),
        f(24, "priorityClassName", Ty::String),
        f(25, "priority", Ty::OptInt32),
        f(26, "dnsConfig", Ty::Unsupported),
        f(27, "shareProcessNamespace", Ty::OptBool),
        f(28, "readinessGates", Ty::Unsupported),
        f(29, "runtimeClassName", Ty::OptString),
        f(30, "enableServiceLinks", Ty::OptBool),
        f(31, "preemptionPolicy", Ty::OptString),
        f(32, "overhead", Ty::Unsupported),
        f(33, "topologySpreadConstraints", Ty::Unsupported),
        f(34, "ephemeralContainers", Ty::Unsupported),
        f(35, "setHostnameAsFQDN", Ty::OptBool),
        f(36, "os", Ty::Unsupported),
        f(37, "hostUsers", Ty::OptBool),
        f(38, "schedulingGates", Ty::Unsupported),
        f(39, "resourceClaims", Ty::Unsupported),
        f(40, "resources", Ty::Unsupported),
        f(41, "hostnameOverride", Ty::OptString),
        f(42, "workloadRef", Ty::Unsupported),
    ],
};

static POD: Schema = Schema {
    name: "Pod",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&POD_SPEC)),
        // 3 status: ignored on create, as kube-apiserver does.
    ],
};

// ---- k8s.io.apimachinery.pkg.apis.meta.v1 (selectors) ----

static LABEL_SELECTOR_REQUIREMENT: Schema = Schema {
    name: "LabelSelectorRequirement",
    fields: &[
        f(1, "key", Ty::String),
        f(2, "operator", Ty::String),
        f(3, "values", Ty::RepeatedString),
    ],
};

static LABEL_SELECTOR: Schema = Schema {
    name: "LabelSelector",
    fields: &[
        f(1, "matchLabels", Ty::MapStringString),
        f(
            2,
            "matchExpressions",
            Ty::RepeatedMessage(&LABEL_SELECTOR_REQUIREMENT),
        ),
    ],
};

// ---- k8s.io.api.apps.v1 ----

static POD_TEMPLATE_SPEC: Schema = Schema {
    name: "PodTemplateSpec",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&POD_SPEC)),
    ],
};

static ROLLING_UPDATE_DEPLOYMENT: Schema = Schema {
    name: "RollingUpdateDeployment",
    fields: &[
        f(1, "maxUnavailable", Ty::IntOrString),
        f(2, "maxSurge", Ty::IntOrString),
    ],
};

static DEPLOYMENT_STRATEGY: Schema = Schema {
    name: "DeploymentStrategy",
    fields: &[
        f(1, "type", Ty::String),
        f(2, "rollingUpdate", Ty::Message(&ROLLING_UPDATE_DEPLOYMENT)),
    ],
};

static DEPLOYMENT_SPEC: Schema = Schema {
    name: "DeploymentSpec",
    fields: &[
        f(1, "replicas", Ty::OptInt32),
        f(2, "selector", Ty::Message(&LABEL_SELECTOR)),
        f(3, "template", Ty::Message(&POD_TEMPLATE_SPEC)),
        f(4, "strategy", Ty::Message(&DEPLOYMENT_STRATEGY)),
        f(5, "minReadySeconds", Ty::Int32),
        f(6, "revisionHistoryLimit", Ty::OptInt32),
        f(7, "paused", Ty::Bool),
        f(9, "progressDeadlineSeconds", Ty::OptInt32),
    ],
};

static DEPLOYMENT: Schema = Schema {
    name: "Deployment",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&DEPLOYMENT_SPEC)),
    ],
};

static REPLICA_SET_SPEC: Schema = Schema {
    name: "ReplicaSetSpec",
    fields: &[
        f(1, "replicas", Ty::OptInt32),
        f(2, "selector", Ty::Message(&LABEL_SELECTOR)),
        f(3, "template", Ty::Message(&POD_TEMPLATE_SPEC)),
        f(4, "minReadySeconds", Ty::Int32),
    ],
};

static REPLICA_SET: Schema = Schema {
    name: "ReplicaSet",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&REPLICA_SET_SPEC)),
    ],
};

// ---- k8s.io.api.policy.v1 ----

static PRECONDITIONS: Schema = Schema {
    name: "Preconditions",
    fields: &[
        f(1, "uid", Ty::OptString),
        f(2, "resourceVersion", Ty::OptString),
    ],
};

static DELETE_OPTIONS: Schema = Schema {
    name: "DeleteOptions",
    fields: &[
        f(1, "gracePeriodSeconds", Ty::OptInt64),
        f(2, "preconditions", Ty::Message(&PRECONDITIONS)),
        f(3, "orphanDependents", Ty::OptBool),
        f(4, "propagationPolicy", Ty::OptString),
        f(5, "dryRun", Ty::RepeatedString),
        f(
            6,
            "ignoreStoreReadErrorWithClusterBreakingPotential",
            Ty::OptBool,
        ),
    ],
};

static EVICTION: Schema = Schema {
    name: "Eviction",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "deleteOptions", Ty::Message(&DELETE_OPTIONS)),
    ],
};

// ---- k8s.io.api.authentication.v1 (`kubectl create token`) ----

static BOUND_OBJECT_REFERENCE: Schema = Schema {
    name: "BoundObjectReference",
    fields: &[
        f(1, "kind", Ty::String),
        f(2, "apiVersion", Ty::String),
        f(3, "name", Ty::String),
        f(4, "uid", Ty::String),
    ],
};

static TOKEN_REQUEST_SPEC: Schema = Schema {
    name: "TokenRequestSpec",
    fields: &[
        f(1, "audiences", Ty::RepeatedString),
        f(3, "boundObjectRef", Ty::Message(&BOUND_OBJECT_REFERENCE)),
        f(4, "expirationSeconds", Ty::OptInt64),
    ],
};

static TOKEN_REQUEST: Schema = Schema {
    name: "TokenRequest",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&TOKEN_REQUEST_SPEC)),
        // 3 status: the server's to fill.
    ],
};

// ---- k8s.io.api.rbac.v1 (`kubectl create role/rolebinding/...`) ----

static POLICY_RULE: Schema = Schema {
    name: "PolicyRule",
    fields: &[
        f(1, "verbs", Ty::RepeatedString),
        f(2, "apiGroups", Ty::RepeatedString),
        f(3, "resources", Ty::RepeatedString),
        f(4, "resourceNames", Ty::RepeatedString),
        f(5, "nonResourceURLs", Ty::RepeatedString),
    ],
};

static AGGREGATION_RULE: Schema = Schema {
    name: "AggregationRule",
    fields: &[f(
        1,
        "clusterRoleSelectors",
        Ty::RepeatedMessage(&LABEL_SELECTOR),
    )],
};

static ROLE: Schema = Schema {
    name: "Role",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "rules", Ty::RepeatedMessage(&POLICY_RULE)),
    ],
};

static CLUSTER_ROLE: Schema = Schema {
    name: "ClusterRole",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "rules", Ty::RepeatedMessage(&POLICY_RULE)),
        f(3, "aggregationRule", Ty::Message(&AGGREGATION_RULE)),
    ],
};

static SUBJECT: Schema = Schema {
    name: "Subject",
    fields: &[
        f(1, "kind", Ty::String),
        f(2, "apiGroup", Ty::String),
        f(3, "name", Ty::String),
        f(4, "namespace", Ty::String),
    ],
};

static ROLE_REF: Schema = Schema {
    name: "RoleRef",
    fields: &[
        f(1, "apiGroup", Ty::String),
        f(2, "kind", Ty::String),
        f(3, "name", Ty::String),
    ],
};

/// RoleBinding and ClusterRoleBinding share their fields.
static ROLE_BINDING: Schema = Schema {
    name: "RoleBinding",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "subjects", Ty::RepeatedMessage(&SUBJECT)),
        f(3, "roleRef", Ty::Message(&ROLE_REF)),
    ],
};

// ---- k8s.io.api.authorization.v1 (`kubectl auth can-i`) ----

static RESOURCE_ATTRIBUTES: Schema = Schema {
    name: "ResourceAttributes",
    fields: &[
        f(1, "namespace", Ty::String),
        f(2, "verb", Ty::String),
        f(3, "group", Ty::String),
        f(4, "version", Ty::String),
        f(5, "resource", Ty::String),
        f(6, "subresource", Ty::String),
        f(7, "name", Ty::String),
    ],
};

static NON_RESOURCE_ATTRIBUTES: Schema = Schema {
    name: "NonResourceAttributes",
    fields: &[f(1, "path", Ty::String), f(2, "verb", Ty::String)],
};

static SUBJECT_ACCESS_REVIEW_SPEC: Schema = Schema {
    name: "SubjectAccessReviewSpec",
    fields: &[
        f(1, "resourceAttributes", Ty::Message(&RESOURCE_ATTRIBUTES)),
        f(
            2,
            "nonResourceAttributes",
            Ty::Message(&NON_RESOURCE_ATTRIBUTES),
        ),
        f(3, "user", Ty::String),
        f(4, "groups", Ty::RepeatedString),
        f(5, "extra", Ty::Unsupported),
        f(6, "uid", Ty::String),
    ],
};

static SUBJECT_ACCESS_REVIEW: Schema = Schema {
    name: "SubjectAccessReview",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&SUBJECT_ACCESS_REVIEW_SPEC)),
    ],
};

static SELF_SUBJECT_ACCESS_REVIEW_SPEC: Schema = Schema {
    name: "SelfSubjectAccessReviewSpec",
    fields: &[
        f(1, "resourceAttributes", Ty::Message(&RESOURCE_ATTRIBUTES)),
        f(
            2,
            "nonResourceAttributes",
            Ty::Message(&NON_RESOURCE_ATTRIBUTES),
        ),
    ],
};

static SELF_SUBJECT_ACCESS_REVIEW: Schema = Schema {
    name: "SelfSubjectAccessReview",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&SELF_SUBJECT_ACCESS_REVIEW_SPEC)),
    ],
};

static SELF_SUBJECT_RULES_REVIEW_SPEC: Schema = Schema {
    name: "SelfSubjectRulesReviewSpec",
    fields: &[f(1, "namespace", Ty::String)],
};

static SELF_SUBJECT_RULES_REVIEW: Schema = Schema {
    name: "SelfSubjectRulesReview",
    fields: &[
        f(1, "metadata", Ty::Message(&OBJECT_META)),
        f(2, "spec", Ty::Message(&SELF_SUBJECT_RULES_REVIEW_SPEC)),
    ],
};

/// authentication.k8s.io/v1 (`kubectl auth whoami`): only metadata.
static SELF_SUBJECT_REVIEW: Schema = Schema {
    name: "SelfSubjectReview",
    fields: &[f(1, "metadata", Ty::Message(&OBJECT_META))],
};

/// The kinds accepted as protobuf: `(apiVersion, kind, schema)`.
pub static KINDS: &[(&str, &str, &Schema)] = &[
    ("v1", "Namespace", &NAMESPACE),
    ("v1", "Service", &SERVICE),
    ("v1", "ConfigMap", &CONFIG_MAP),
    ("v1", "Secret", &SECRET),
    ("v1", "Pod", &POD),
    ("apps/v1", "Deployment", &DEPLOYMENT),
    ("apps/v1", "ReplicaSet", &REPLICA_SET),
    ("policy/v1", "Eviction", &EVICTION),
    ("authentication.k8s.io/v1", "TokenRequest", &TOKEN_REQUEST),
    ("rbac.authorization.k8s.io/v1", "Role", &ROLE),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", &CLUSTER_ROLE),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", &ROLE_BINDING),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        &ROLE_BINDING,
    ),
    (
        "authentication.k8s.io/v1",
        "SelfSubjectReview",
        &SELF_SUBJECT_REVIEW,
    ),
    (
        "authorization.k8s.io/v1",
        "SelfSubjectAccessReview",
        &SELF_SUBJECT_ACCESS_REVIEW,
    ),
    (
        "authorization.k8s.io/v1",
        "SelfSubjectRulesReview",
        &SELF_SUBJECT_RULES_REVIEW,
    ),
    (
        "authorization.k8s.io/v1",
        "SubjectAccessReview",
        &SUBJECT_ACCESS_REVIEW,
    ),
    (
        "authorization.k8s.io/v1",
        "LocalSubjectAccessReview",
        &SUBJECT_ACCESS_REVIEW,
    ),
];

/// The kinds accepted as protobuf, for messages: `v1 Namespace, v1 Service, ...`.
pub fn supported_kinds() -> String {
    KINDS
        .iter()
        .map(|(v, k, _)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not valid Kubernetes protobuf (a 400).
    Malformed(String),
    /// Valid, but a kind or field this decoder has no table for (a 415: send
    /// JSON instead).
    Unsupported(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Malformed(m) | DecodeError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decode a protobuf request body to its JSON object; the error is a
/// one-line reason.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    decode_object(body).map_err(|e| e.to_string())
}

/// [`decode`], telling malformed bodies from unsupported kinds/fields.
pub fn decode_object(body: &[u8]) -> Result<Value, DecodeError> {
    let malformed = |m: String| DecodeError::Malformed(format!("protobuf body: {m}"));
    let rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| malformed("missing the \"k8s\\0\" magic prefix".into()))?;
    let env = read_unknown(rest).map_err(|e| malformed(format!("runtime.Unknown: {e}")))?;
    if !env.content_encoding.is_empty() {
        return Err(malformed(format!(
            "unsupported contentEncoding {:?}",
            env.content_encoding
        )));
    }
    if !env.content_type.is_empty() && env.content_type != CONTENT_TYPE {
        return Err(malformed(format!(
            "unsupported contentType {:?}",
            env.content_type
        )));
    }
    if env.kind.is_empty() {
        return Err(malformed("typeMeta has no kind".into()));
    }
    let Some(&(_, _, schema)) = KINDS
        .iter()
        .find(|(v, k, _)| *v == env.api_version && *k == env.kind)
    else {
        return Err(DecodeError::Unsupported(format!(
            "protobuf request bodies are accepted only for {}; got kind {:?} of apiVersion {:?} (send it as application/json)",
            supported_kinds(),
            env.kind,
            env.api_version,
        )));
    };
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String(env.api_version));
    obj.insert("kind".into(), Value::String(env.kind.clone()));
    decode_into(&mut obj, schema, env.raw, 0).map_err(|e| {
        let path = e.path.iter().rev().fold(String::new(), |mut acc, seg| {
            if !acc.is_empty() && !seg.starts_with('[') {
                acc.push('.');
            }
            acc.push_str(seg);
            acc
        });
        let at = if path.is_empty() {
            env.kind.clone()
        } else {
            format!("{} {path}", env.kind)
        };
        if e.unsupported {
            DecodeError::Unsupported(format!(
                "protobuf request bodies: {at}: {} (send it as application/json)",
                e.msg
            ))
        } else {
            malformed(format!("{at}: {}", e.msg))
        }
    })?;
    Ok(Value::Object(obj))
}

// ---- wire format ----

/// One field value as it appears on the wire.
#[derive(Debug)]
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32,
}

impl Wire<'_> {
    fn name(&self) -> &'static str {
        match self {
            Wire::Varint(_) => "varint",
            Wire::Fixed64 => "64-bit",
            Wire::Bytes(_) => "length-delimited",
            Wire::Fixed32 => "32-bit",
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err("truncated varint".into());
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err("varint overflows 64 bits".into());
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated: needs {n} bytes, {} left",
                    self.buf.len() - self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u32, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return Err(format!("invalid field number {number}"));
        }
        let number = number as u32;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len)
                    .map_err(|_| format!("field {number}: length {len} too large"))?;
                Wire::Bytes(self.take(len).map_err(|e| format!("field {number}: {e}"))?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            3 | 4 => return Err(format!("field {number}: groups are not supported")),
            w => return Err(format!("field {number}: invalid wire type {w}")),
        };
        Ok(Some((number, wire)))
    }
}

/// The `runtime.Unknown` envelope.
struct Envelope<'a> {
    api_version: String,
    kind: String,
    raw: &'a [u8],
    content_encoding: String,
    content_type: String,
}

fn read_unknown(buf: &[u8]) -> Result<Envelope<'_>, String> {
    let mut env = Envelope {
        api_version: String::new(),
        kind: String::new(),
        raw: &[],
        content_encoding: String::new(),
        content_type: String::new(),
    };
    let mut r = Reader::new(buf);
    while let Some((n, w)) = r.next_field()? {
        match (n, w) {
            (1, Wire::Bytes(b)) => {
                let mut tm = Reader::new(b);
                while let Some((n, w)) = tm.next_field().map_err(|e| format!("typeMeta: {e}"))? {
                    match (n, w) {
                        (1, Wire::Bytes(b)) => env.api_version = utf8(b)?.to_owned(),
                        (2, Wire::Bytes(b)) => env.kind = utf8(b)?.to_owned(),
                        (1 | 2, w) => {
                            return Err(format!("typeMeta field {n}: unexpected {}", w.name()))
                        }
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => env.raw = b,
            (3, Wire::Bytes(b)) => env.content_encoding = utf8(b)?.to_owned(),
            (4, Wire::Bytes(b)) => env.content_type = utf8(b)?.to_owned(),
            (1..=4, w) => return Err(format!("field {n}: unexpected {}", w.name())),
            _ => {}
        }
    }
    Ok(env)
}

fn utf8(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8".to_string())
}

// ---- schema-driven decoding ----

/// A decoding failure with the JSON path to it (innermost segment first).
struct Error {
    path: Vec<String>,
    msg: String,
    unsupported: bool,
}

impl Error {
    fn new(msg: impl Into<String>) -> Self {
        Error {
            path: Vec::new(),
            msg: msg.into(),
            unsupported: false,
        }
    }
    fn at(mut self, seg: impl Into<String>) -> Self {
        self.path.push(seg.into());
        self
    }
}

impl From<String> for Error {
    fn from(msg: String) -> Self {
        Error::new(msg)
    }
}

/// Decode `buf` as a `schema` message, merging into `obj` (proto merge
/// semantics: scalars overwrite, repeated fields append, messages merge).
fn decode_into(
    obj: &mut Map<String, Value>,
    schema: &'static Schema,
    buf: &[u8],
    depth: usize,
) -> Result<(), Error> {
    if depth >= MAX_DEPTH {
        return Err(Error::new(format!(
            "messages nested deeper than {MAX_DEPTH}"
        )));
    }
    let mut r = Reader::new(buf);
    while let Some((number, wire)) = r.next_field()? {
        let Some(field) = schema.fields.iter().find(|f| f.number == number) else {
            continue; // unknown field: skipped, as proto does
        };
        decode_field(obj, field, wire, depth).map_err(|e| e.at(field.json_name))?;
    }
    Ok(())
}

fn set_or_remove(obj: &mut Map<String, Value>, name: &str, v: Value, keep: bool) {
    if keep {
        obj.insert(name.to_owned(), v);
    } else {
        obj.remove(name);
    }
}

/// The array at `obj[name]`, created if absent.
fn array<'m>(obj: &'m mut Map<String, Value>, name: &str) -> &'m mut Vec<Value> {
    let v = obj.entry(name).or_insert_with(|| Value::Array(Vec::new()));
    if !v.is_array() {
        *v = Value::Array(Vec::new());
    }
    match v {
        Value::Array(a) => a,
        _ => unreachable!("just made an array"),
    }
}

/// The object at `obj[name]`, created if absent.
fn object<'m>(obj: &'m mut Map<String, Value>, name: &str) -> &'m mut Map<String, Value> {
    let v = obj.entry(name).or_insert_with(|| Value::Object(Map::new()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

fn decode_field(
    obj: &mut Map<String, Value>,
    field: &Field,
    wire: Wire<'_>,
    depth: usize,
) -> Result<(), Error> {
    let name = field.json_name;
    match (field.ty, wire) {
        (Ty::String, Wire::Bytes(b)) => {
            let s = utf8(b)?;
            set_or_remove(obj, name, Value::from(s), !s.is_empty());
        }
        (Ty::OptString, Wire::Bytes(b)) => {
            obj.insert(name.to_owned(), Value::from(utf8(b)?));
        }
        // int32 is sent as a sign-extended varint; proto truncates.
        (Ty::Int32, Wire::Varint(v)) => {
            set_or_remove(obj, name, Value::from(v as i32), v as i32 != 0)
        }
        (Ty::OptInt32, Wire::Varint(v)) => {
            obj.insert(name.to_owned(), Value::from(v as i32));
        }
        (Ty::Int64, Wire::Varint(v)) => set_or_remove(obj, name, Value::from(v as i64), v != 0),
        (Ty::OptInt64, Wire::Varint(v)) => {
            obj.insert(name.to_owned(), Value::from(v as i64));
        }
        (Ty::Bool, Wire::Varint(v)) => set_or_remove(obj, name, Value::Bool(true), v != 0),
        (Ty::OptBool, Wire::Varint(v)) => {
            obj.insert(name.to_owned(), Value::Bool(v != 0));
        }
        (Ty::Message(schema), Wire::Bytes(b)) => {
            decode_into(object(obj, name), schema, b, depth + 1)?;
        }
        (Ty::RepeatedString, Wire::Bytes(b)) => {
            let s = utf8(b)?;
            array(obj, name).push(Value::from(s));
        }
        (Ty::RepeatedMessage(schema), Wire::Bytes(b)) => {
            let items = array(obj, name);
            let index = items.len();
            let mut item = Map::new();
            decode_into(&mut item, schema, b, depth + 1).map_err(|e| e.at(format!("[{index}]")))?;
            items.push(Value::Object(item));
        }
        (Ty::MapStringString, Wire::Bytes(b)) => {
            let (k, v) = map_entry(b)?;
            object(obj, name).insert(k, Value::String(v));
        }
        (Ty::MapStringBytes, Wire::Bytes(b)) => {
            use base64::Engine as _;
            let (k, v) = map_entry_bytes(b)?;
            let v = base64::engine::general_purpose::STANDARD.encode(v);
            object(obj, name).insert(k, Value::String(v));
        }
        (Ty::IntOrString, Wire::Bytes(b)) => {
            let v = int_or_string(b)?;
            let keep = !v.is_null();
            set_or_remove(obj, name, v, keep);
        }
        (Ty::Time, Wire::Bytes(b)) => {
            let v = time(b)?;
            let keep = !v.is_null();
            set_or_remove(obj, name, v, keep);
        }
        (Ty::Unsupported, Wire::Bytes([])) => {}
        (Ty::Unsupported, _) => {
            return Err(Error {
                path: Vec::new(),
                msg: "this field is not supported".into(),
                unsupported: true,
            });
        }
        (ty, w) => {
            return Err(Error::new(format!(
                "unexpected {} value for a {} field",
                w.name(),
                ty_name(ty)
            )))
        }
    }
    Ok(())
}

fn ty_name(ty: Ty) -> &'static str {
    match ty {
        Ty::String | Ty::OptString => "string",
        Ty::Int32 | Ty::OptInt32 => "int32",
        Ty::Int64 | Ty::OptInt64 => "int64",
        Ty::Bool | Ty::OptBool => "bool",
        Ty::Message(s) | Ty::RepeatedMessage(s) => s.name,
        Ty::MapStringString => "map<string, string>",
        Ty::MapStringBytes => "map<string, bytes>",
        Ty::RepeatedString => "repeated string",
        Ty::IntOrString => "IntOrString",
        Ty::Time => "Time",
        Ty::Unsupported => "message",
    }
}

/// A `map<string, bytes>` entry `{key = 1, value = 2}`.
fn map_entry_bytes(b: &[u8]) -> Result<(String, Vec<u8>), String> {
    let (mut k, mut v) = (String::new(), Vec::new());
    let mut r = Reader::new(b);
    while let Some((n, w)) = r.next_field()? {
        match (n, w) {
            (1, Wire::Bytes(b)) => k = utf8(b)?.to_owned(),
            (2, Wire::Bytes(b)) => v = b.to_vec(),
            (1 | 2, w) => return Err(format!("map entry field {n}: unexpected {}", w.name())),
            _ => {}
        }
    }
    Ok((k, v))
}

/// A `map<string, string>` entry `{key = 1, value = 2}`.
fn map_entry(b: &[u8]) -> Result<(String, String), String> {
    let (mut k, mut v) = (String::new(), String::new());
    let mut r = Reader::new(b);
    while let Some((n, w)) = r.next_field()? {
        match (n, w) {
            (1, Wire::Bytes(b)) => k = utf8(b)?.to_owned(),
            (2, Wire::Bytes(b)) => v = utf8(b)?.to_owned(),
            (1 | 2, w) => return Err(format!("map entry field {n}: unexpected {}", w.name())),
            _ => {}
        }
    }
    Ok((k, v))
}

/// `intstr.IntOrString {type = 1 (0 int, 1 string), intVal = 2, strVal = 3}`;
/// `null` for the zero value of either form (which Kubernetes treats as
/// unset).
fn int_or_string(b: &[u8]) -> Result<Value, String> {
    let (mut ty, mut int_val, mut str_val) = (0u64, 0i32, String::new());
    let mut r = Reader::new(b);
    while let Some((n, w)) = r.next_field()? {
        match (n, w) {
            (1, Wire::Varint(v)) => ty = v,
            (2, Wire::Varint(v)) => int_val = v as i32,
            (3, Wire::Bytes(b)) => str_val = utf8(b)?.to_owned(),
            (1..=3, w) => return Err(format!("IntOrString field {n}: unexpected {}", w.name())),
            _ => {}
        }
    }
    Ok(match ty {
        0 if int_val == 0 => Value::Null,
        0 => Value::from(int_val),
        1 if str_val.is_empty() => Value::Null,
        1 => Value::String(str_val),
        t => return Err(format!("IntOrString has invalid type {t}")),
    })
}

/// Seconds of Go's zero `time.Time` (0001-01-01T00:00:00Z) since the epoch.
const GO_ZERO_TIME: i64 = -62_135_596_800;

/// `meta.v1.Time {seconds = 1, nanos = 2}` as RFC 3339 at second precision
/// (as Kubernetes serialises it); `null` for the zero time, which Go encodes
/// as an empty message.
fn time(b: &[u8]) -> Result<Value, String> {
    if b.is_empty() {
        return Ok(Value::Null);
    }
    let mut seconds = 0i64;
    let mut r = Reader::new(b);
    while let Some((n, w)) = r.next_field()? {
        match (n, w) {
            (1, Wire::Varint(v)) => seconds = v as i64,
            (2, Wire::Varint(_)) => {} // nanos: dropped by the JSON form
            (1 | 2, w) => return Err(format!("Time field {n}: unexpected {}", w.name())),
            _ => {}
        }
    }
    if seconds == GO_ZERO_TIME {
        return Ok(Value::Null);
    }
    rfc3339(seconds)
        .map(Value::String)
        .ok_or_else(|| format!("Time {seconds} is outside years 0000-9999"))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix `seconds`, `None` outside years 0..=9999.
fn rfc3339(seconds: i64) -> Option<String> {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny protobuf encoder for building test bodies.
    #[derive(Clone, Default)]
    struct Msg(Vec<u8>);

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    impl Msg {
        fn new() -> Self {
            Msg::default()
        }
        fn key(mut self, n: u32, wire: u8) -> Self {
            put_varint(&mut self.0, (u64::from(n) << 3) | u64::from(wire));
            self
        }
        fn varint(self, n: u32, v: u64) -> Self {
            let mut m = self.key(n, 0);
            put_varint(&mut m.0, v);
            m
        }
        fn int(self, n: u32, v: i64) -> Self {
            self.varint(n, v as u64)
        }
        fn bytes(self, n: u32, b: &[u8]) -> Self {
            let mut m = self.key(n, 2);
            put_varint(&mut m.0, b.len() as u64);
            m.0.extend_from_slice(b);
            m
        }
        fn str(self, n: u32, s: &str) -> Self {
            self.bytes(n, s.as_bytes())
        }
        fn msg(self, n: u32, m: Msg) -> Self {
            self.bytes(n, &m.0)
        }
        fn fixed32(self, n: u32, v: u32) -> Self {
            let mut m = self.key(n, 5);
            m.0.extend_from_slice(&v.to_le_bytes());
            m
        }
        fn fixed64(self, n: u32, v: u64) -> Self {
            let mut m = self.key(n, 1);
            m.0.extend_from_slice(&v.to_le_bytes());
            m
        }
        fn entry(self, n: u32, k: &str, v: &str) -> Self {
            self.msg(n, Msg::new().str(1, k).str(2, v))
        }
    }

    fn envelope(api_version: &str, kind: &str, raw: &Msg) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let type_meta = Msg::new().str(1, api_version).str(2, kind);
        out.extend(
            Msg::new()
                .msg(1, type_meta)
                .bytes(2, &raw.0)
                .str(3, "")
                .str(4, "")
                .0,
        );
        out
    }

    /// ObjectMeta as Go encodes it: value fields always present.
    fn meta(name: &str, namespace: &str) -> Msg {
        Msg::new()
            .str(1, name)
            .str(2, "")
            .str(3, namespace)
            .str(4, "")
            .str(5, "")
            .str(6, "")
            .int(7, 0)
            .msg(8, Msg::new()) // zero creationTimestamp
    }

    #[test]
    fn namespace() {
        // What `kubectl create namespace foo` sends.
        let raw = Msg::new()
            .msg(1, meta("foo", ""))
            .msg(2, Msg::new())
            .msg(3, Msg::new().str(1, ""));
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "foo"}, "spec": {}, "status": {}})
        );

        let raw = Msg::new()
            .msg(
                1,
                Msg::new()
                    .str(1, "bar")
                    .entry(11, "a", "1")
                    .entry(11, "b", "2")
                    .entry(12, "note", "x")
                    .int(7, 3)
                    .msg(8, Msg::new().int(1, 1_700_000_000).int(2, 5)),
            )
            .msg(2, Msg::new().str(1, "kubernetes").str(1, "other"))
            .msg(3, Msg::new().str(1, "Active"));
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "bar", "labels": {"a": "1", "b": "2"},
                    "annotations": {"note": "x"}, "generation": 3,
                    "creationTimestamp": "2023-11-14T22:13:20Z"},
                "spec": {"finalizers": ["kubernetes", "other"]},
                "status": {"phase": "Active"}})
        );
    }

    fn service_port(name: &str, port: i64, target: Msg, node_port: i64) -> Msg {
        Msg::new()
            .str(1, name)
            .str(2, "TCP")
            .int(3, port)
            .msg(4, target)
            .int(5, node_port)
    }

    #[test]
    fn service() {
        // `kubectl create service nodeport np --tcp=80:8080,443:https`.
        let spec = Msg::new()
            .msg(
                1,
                service_port(
                    "80-8080",
                    80,
                    Msg::new().int(1, 0).int(2, 8080).str(3, ""),
                    0,
                ),
            )
            .msg(
                1,
                service_port(
                    "443",
                    443,
                    Msg::new().int(1, 1).int(2, 0).str(3, "https"),
                    30443,
                )
                .str(6, "kubernetes.io/h2c"),
            )
            // zero targetPort: unset
            .msg(1, service_port("z", 9, Msg::new().int(1, 0).int(2, 0), 0))
            .entry(2, "app", "np")
            .str(3, "")
            .str(4, "NodePort")
            .str(7, "")
            .str(8, "")
            .str(10, "")
            .str(11, "")
            .int(12, 0)
            .varint(13, 0)
            .msg(14, Msg::new().msg(1, Msg::new().int(1, 10800)))
            .str(17, "SingleStack")
            .str(18, "10.0.0.5")
            .str(19, "IPv4")
            .varint(20, 0)
            .str(22, "Cluster");
        let raw = Msg::new()
            .msg(1, meta("np", "default").entry(11, "app", "np"))
            .msg(2, spec)
            .msg(3, Msg::new().msg(1, Msg::new())); // status: ignored
        let v = decode(&envelope("v1", "Service", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "np", "namespace": "default", "labels": {"app": "np"}},
            "spec": {
                "ports": [
                    {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
                    {"name": "443", "protocol": "TCP", "port": 443, "targetPort": "https",
                        "nodePort": 30443, "appProtocol": "kubernetes.io/h2c"},
                    {"name": "z", "protocol": "TCP", "port": 9},
                ],
                "selector": {"app": "np"},
                "type": "NodePort",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
                "ipFamilyPolicy": "SingleStack",
                "clusterIPs": ["10.0.0.5"],
                "ipFamilies": ["IPv4"],
                "allocateLoadBalancerNodePorts": false,
                "internalTrafficPolicy": "Cluster",
            }})
        );
    }

    #[test]
    fn owner_references_and_deletion() {
        let raw = Msg::new().msg(
            1,
            Msg::new()
                .str(1, "x")
                .msg(
                    13,
                    Msg::new()
                        .str(1, "Deployment")
                        .str(3, "d")
                        .str(4, "u-1")
                        .str(5, "apps/v1")
                        .varint(6, 1)
                        .varint(7, 0),
                )
                .msg(9, Msg::new().int(1, 0))
                .int(10, 30)
                .msg(17, Msg::new().str(1, "kubectl")), // managedFields: skipped
        );
        let v = decode(&envelope("v1", "Service", &raw)).unwrap();
        assert_eq!(
            v["metadata"],
            json!({"name": "x",
                "ownerReferences": [{"kind": "Deployment", "name": "d", "uid": "u-1",
                    "apiVersion": "apps/v1", "controller": true, "blockOwnerDeletion": false}],
                "deletionTimestamp": "1970-01-01T00:00:00Z",
                "deletionGracePeriodSeconds": 30})
        );
    }

    #[test]
    fn pod() {
        // `kubectl run web --image=nginx --port=80 --env=A=b -- sleep 1`.
        let container = Msg::new()
            .str(1, "web")
            .str(2, "nginx")
            .str(4, "sleep")
            .str(4, "1")
            .msg(6, Msg::new().str(1, "").int(2, 0).int(3, 80).str(4, "TCP"))
            .msg(7, Msg::new().str(1, "A").str(2, "b"))
            .msg(8, Msg::new()) // empty resources: fine
            .str(14, "IfNotPresent")
            .varint(16, 0)
            .varint(18, 1);
        let raw = Msg::new()
            .msg(1, meta("web", "").entry(11, "run", "web"))
            .msg(
                2,
                Msg::new()
                    .msg(2, container)
                    .str(3, "Always")
                    .str(6, "ClusterFirst")
                    .str(10, "")
                    .varint(11, 0)
                    .int(4, 30),
            );
        let v = decode(&envelope("v1", "Pod", &raw)).unwrap();
        assert_eq!(
            v["spec"],
            json!({"containers": [{"name": "web", "image": "nginx", "args": ["sleep", "1"],
                    "ports": [{"containerPort": 80, "protocol": "TCP"}],
                    "env": [{"name": "A", "value": "b"}],
                    "imagePullPolicy": "IfNotPresent", "tty": true}],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                "terminationGracePeriodSeconds": 30})
        );

        // Fields without a table are refused, not dropped.
        let raw = Msg::new().msg(
            2,
            Msg::new()
                .msg(2, Msg::new().str(1, "c"))
                .msg(1, Msg::new().str(1, "vol")),
        );
        let e = decode_object(&envelope("v1", "Pod", &raw)).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Unsupported(m) if m.contains("Pod spec.volumes")),
            "{e}"
        );
        let raw = Msg::new().msg(
            2,
            Msg::new().msg(
                2,
                Msg::new().msg(7, Msg::new().str(1, "A").msg(3, Msg::new().str(1, "x"))),
            ),
        );
        let e = decode_object(&envelope("v1", "Pod", &raw)).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Unsupported(m) if m.contains("spec.containers[0].env[0].valueFrom")),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let raw = Msg::new()
            .varint(99, 7)
            .fixed32(98, 1)
            .fixed64(97, 2)
            .str(96, "x")
            .msg(
                1,
                Msg::new()
                    .str(1, "n")
                    .int(1000, 5)
                    .fixed64(4, 0)
                    .str(536_870_911, "max field number"),
            );
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}})
        );
        // And in the envelope.
        let mut body = envelope("v1", "Namespace", &raw);
        body.extend(Msg::new().varint(9, 1).str(10, "later").0);
        assert_eq!(decode(&body).unwrap(), v);
    }

    #[test]
    fn merge_semantics() {
        // A message field seen twice merges; a scalar seen twice keeps the last.
        let raw = Msg::new()
            .msg(1, Msg::new().str(1, "a").entry(11, "x", "1"))
            .msg(1, Msg::new().str(1, "b").entry(11, "y", "2").str(3, ""));
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v["metadata"],
            json!({"name": "b", "labels": {"x": "1", "y": "2"}})
        );
    }

    #[test]
    fn negative_and_wide_ints() {
        let spec = Msg::new()
            .msg(1, Msg::new().int(3, -1).msg(4, Msg::new().int(2, -5)))
            .int(12, i64::from(i32::MAX) + 1); // truncated to int32, as proto does
        let raw = Msg::new().msg(2, spec).msg(1, Msg::new().int(7, i64::MIN));
        let v = decode(&envelope("v1", "Service", &raw)).unwrap();
        assert_eq!(v["spec"]["ports"][0], json!({"port": -1, "targetPort": -5}));
        assert_eq!(v["spec"]["healthCheckNodePort"], json!(i32::MIN));
        assert_eq!(v["metadata"]["generation"], json!(i64::MIN));
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1).unwrap(), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799).unwrap(), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(GO_ZERO_TIME).unwrap(), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339(-62_167_219_200).unwrap(), "0000-01-01T00:00:00Z");
        assert!(rfc3339(253_402_300_800).is_none());
        assert!(rfc3339(-62_167_219_201).is_none());
        assert!(rfc3339(i64::MAX).is_none());
        assert!(rfc3339(i64::MIN).is_none());
        assert_eq!(
            time(&Msg::new().int(1, GO_ZERO_TIME).0).unwrap(),
            Value::Null
        );
        assert!(time(&Msg::new().int(1, i64::MAX).0).is_err());
    }

    #[test]
    fn secret_data_is_base64_as_in_json() {
        let entry = |k: &str, v: &[u8]| Msg::new().str(1, k).bytes(2, v);
        let secret = Msg::new()
            .msg(2, entry("user", b"admin"))
            .msg(2, entry("raw", &[0, 255]))
            .str(3, "Opaque");
        let v = decode_object(&envelope("v1", "Secret", &secret)).unwrap();
        assert_eq!(v["data"], json!({"user": "YWRtaW4=", "raw": "AP8="}));
        assert_eq!(v["type"], "Opaque");
    }

    #[test]
    fn unsupported_kinds() {
        for (v, k) in [
            ("v1", "PersistentVolume"),
            ("apps/v1", "Service"),
            ("", "Namespace"),
        ] {
            let e = decode_object(&envelope(v, k, &Msg::new())).unwrap_err();
            assert!(
                matches!(&e, DecodeError::Unsupported(m) if m.contains("v1 Namespace, v1 Service, v1 ConfigMap, v1 Secret, v1 Pod")),
                "{e}"
            );
        }
    }

    #[test]
    fn malformed() {
        let ok = envelope("v1", "Namespace", &Msg::new().msg(1, meta("a", "")));
        assert!(decode(&ok).is_ok());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "magic"),
            (b"{\"kind\":\"Namespace\"}".to_vec(), "magic"),
            (b"k8s\0".to_vec(), "no kind"),
            ([MAGIC.as_slice(), &[0x0a]].concat(), "truncated varint"),
            ([MAGIC.as_slice(), &[0x0a, 0x05, 1]].concat(), "truncated"),
            ([MAGIC.as_slice(), &[0x0b]].concat(), "groups"),
            ([MAGIC.as_slice(), &[0x0e]].concat(), "invalid wire type 6"),
            (
                [MAGIC.as_slice(), &[0x00]].concat(),
                "invalid field number 0",
            ),
            ([MAGIC.as_slice(), &[0xff; 11]].concat(), "varint"),
            (
                [
                    MAGIC.as_slice(),
                    &[
                        0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                    ],
                ]
                .concat(),
                "truncated",
            ),
            (
                [MAGIC.as_slice(), &Msg::new().varint(1, 3).0].concat(),
                "unexpected varint",
            ),
            (
                [
                    MAGIC.as_slice(),
                    &Msg::new()
                        .msg(1, Msg::new().str(1, "v1").str(2, "Namespace"))
                        .str(3, "gzip")
                        .0,
                ]
                .concat(),
                "contentEncoding",
            ),
            (
                [
                    MAGIC.as_slice(),
                    &Msg::new().msg(1, Msg::new().bytes(2, &[0xff, 0xfe])).0,
                ]
                .concat(),
                "UTF-8",
            ),
            (
                envelope(
                    "v1",
                    "Namespace",
                    &Msg::new().msg(1, Msg::new().bytes(1, &[0xc3])),
                ),
                "Namespace metadata.name: string is not valid UTF-8",
            ),
            (
                envelope("v1", "Namespace", &Msg::new().varint(1, 1)),
                "Namespace metadata: unexpected varint value for a ObjectMeta field",
            ),
            (
                envelope(
                    "v1",
                    "Service",
                    &Msg::new().msg(
                        2,
                        Msg::new().msg(1, Msg::new().msg(4, Msg::new().int(1, 7))),
                    ),
                ),
                "Service spec.ports[0].targetPort: IntOrString has invalid type 7",
            ),
            (
                envelope(
                    "v1",
                    "Service",
                    &Msg::new().msg(2, Msg::new().bytes(1, &[0x08])),
                ),
                "Service spec.ports[0]: truncated varint",
            ),
            (
                envelope(
                    "v1",
                    "Namespace",
                    &Msg::new().msg(1, Msg::new().msg(11, Msg::new().varint(2, 1))),
                ),
                "map entry field 2: unexpected varint",
            ),
        ];
        for (body, want) in cases {
            let e = decode(&body).unwrap_err();
            assert!(e.contains(want), "{body:?}: {e:?} lacks {want:?}");
            assert!(!e.contains('\n'), "{e:?}");
        }
    }

    /// Deterministic xorshift, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let spec = Msg::new()
            .msg(
                1,
                service_port("p", 80, Msg::new().int(1, 1).str(3, "http"), 30080),
            )
            .entry(2, "app", "x")
            .str(4, "NodePort")
            .msg(14, Msg::new().msg(1, Msg::new().int(1, 5)));
        let seeds = [
            envelope(
                "v1",
                "Service",
                &Msg::new().msg(1, meta("s", "d")).msg(2, spec),
            ),
            envelope("v1", "Namespace", &Msg::new().msg(1, meta("n", ""))),
            envelope(
                "v1",
                "Pod",
                &Msg::new().msg(
                    2,
                    Msg::new().msg(2, Msg::new().str(1, "c").msg(6, Msg::new().int(3, 80))),
                ),
            ),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for seed in &seeds {
            assert!(decode(seed).is_ok());
            // Every truncation.
            for n in 0..seed.len() {
                let _ = decode(&seed[..n]);
            }
            // Random byte mutations, insertions and deletions.
            for _ in 0..3000 {
                let mut b = seed.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    match rng.below(3) {
                        0 => b[i] = rng.next() as u8,
                        1 => b.insert(i, rng.next() as u8),
                        _ => {
                            b.remove(i);
                        }
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                if let Err(e) = decode(&b) {
                    assert!(!e.is_empty() && !e.contains('\n'));
                }
            }
        }
        // Pure noise after the magic.
        for _ in 0..5000 {
            let len = rng.below(64);
            let mut b = MAGIC.to_vec();
            b.extend((0..len).map(|_| rng.next() as u8));
            let _ = decode(&b);
        }
        // Deep nesting of a known message field is bounded by the schema;
        // deep nesting of unknown fields is never parsed.
        let mut deep = Msg::new().str(1, "x");
        for _ in 0..10_000 {
            deep = Msg::new().msg(99, deep);
        }
        assert!(decode(&envelope("v1", "Namespace", &deep)).is_ok());
    }
}
