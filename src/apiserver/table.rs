//! Server-side printing: the meta.k8s.io/v1 `Table` form of objects.
//!
//! `kubectl get` does not lay out objects itself. It asks the server for
//! `as=Table` and prints the columns and cells it gets back, so the familiar
//! `NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE` output only appears if the
//! server produces it. The columns and cell texts here follow kube-apiserver's
//! printers (`pkg/printers/internalversion`) for the kinds we serve.
//!
//! Like kube-apiserver, rows always carry the wide cells: priority-1 columns
//! are included and kubectl hides them unless `-o wide` is asked for. That is
//! also why nothing is clipped for width (kube clips only non-wide output).
//!
//! Everything works on the stored JSON ([`Value`]) rather than typed structs:
//! a missing field prints as kube would print a zero value, and printing an
//! object never fails.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::api::meta::{age, meta_str};
use crate::api::resources::Kind;

/// One TableColumnDefinition.
struct Column {
    name: &'static str,
    ty: &'static str,
    format: &'static str,
    /// 0 for default output, 1 for columns kubectl shows only with `-o wide`.
    priority: u8,
    description: &'static str,
}

/// A string column in the default output.
const fn col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty: "string",
        format: "",
        priority: 0,
        description,
    }
}

/// A string column shown only with `-o wide`.
const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        priority: 1,
        ..col(name, description)
    }
}

/// An integer column.
const fn int(name: &'static str, priority: u8, description: &'static str) -> Column {
    Column {
        ty: "integer",
        priority,
        ..col(name, description)
    }
}

/// The object name; format "name" tells clients this cell names the row.
const fn name_col(priority: u8) -> Column {
    Column {
        format: "name",
        priority,
        ..col("Name", "Name must be unique within a namespace.")
    }
}

const NAME: Column = name_col(0);
const AGE: Column = col("Age", "CreationTimestamp: when the object was created.");

const NAMESPACE_COLUMNS: &[Column] = &[NAME, col("Status", "The status of the namespace"), AGE];

const SERVICE_COLUMNS: &[Column] = &[
    NAME,
    col("Type", "How the Service is exposed."),
    col(
        "Cluster-IP",
        "The IP address of the service; None for headless services.",
    ),
    col(
        "External-IP",
        "Where the service is reachable from outside the cluster.",
    ),
    col("Port(s)", "The ports exposed by this service."),
    AGE,
    wide(
        "Selector",
        "Route service traffic to pods with labels matching this selector.",
    ),
];

const ENDPOINTS_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Endpoints",
        "The set of all endpoints is the union of all subsets.",
    ),
    AGE,
];

const POD_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Ready",
        "The aggregate readiness state of this pod for accepting traffic.",
    ),
    col(
        "Status",
        "The aggregate status of the containers in this pod.",
    ),
    int(
        "Restarts",
        0,
        "The number of times the containers in this pod have been restarted.",
    ),
    AGE,
    wide("IP", "The IP address allocated to the pod."),
    wide("Node", "The node the pod is scheduled onto."),
    wide(
        "Nominated Node",
        "The node the scheduler nominated for this pod.",
    ),
    wide(
        "Readiness Gates",
        "Pod readiness gates that are true, of all gates.",
    ),
];

const NODE_COLUMNS: &[Column] = &[
    NAME,
    col("Status", "The status of the node"),
    col("Roles", "The roles of the node"),
    AGE,
    col("Version", "Kubelet Version reported by the node."),
    wide("Internal-IP", "The first InternalIP address of the node."),
    wide("External-IP", "The first ExternalIP address of the node."),
    wide(
        "OS-Image",
        "OS Image reported by the node from /etc/os-release.",
    ),
    wide(
        "Kernel-Version",
        "Kernel Version reported by the node from 'uname -r'.",
    ),
    wide(
        "Container-Runtime",
        "Container runtime version reported by the node.",
    ),
];

const EVENT_COLUMNS: &[Column] = &[
    col(
        "Last Seen",
        "The time at which the most recent occurrence was recorded.",
    ),
    col("Type", "Type of this event (Normal, Warning)."),
    col(
        "Reason",
        "A short, machine understandable reason for this event.",
    ),
    col("Object", "The object that this event is about."),
    wide(
        "Subobject",
        "The field of the involved object, e.g. a container.",
    ),
    wide("Source", "The component reporting this event."),
    col(
        "Message",
        "A human-readable description of the status of this operation.",
    ),
    wide(
        "First Seen",
        "The time at which the event was first recorded.",
    ),
    int("Count", 1, "The number of times this event has occurred."),
    name_col(1),
];

const ENDPOINT_SLICE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "AddressType",
        "The type of address carried by this EndpointSlice.",
    ),
    col(
        "Ports",
        "The network ports exposed by each endpoint in this slice.",
    ),
    col("Endpoints", "The addresses of the endpoints in this slice."),
    AGE,
];

const LEASE_COLUMNS: &[Column] = &[
    NAME,
    col("Holder", "The identity of the holder of a current lease."),
    AGE,
];

const REPLICA_SET_COLUMNS: &[Column] = &[
    NAME,
    int("Desired", 0, "Number of desired pods."),
    int("Current", 0, "Number of actual replicas."),
    int("Ready", 0, "Number of ready replicas."),
    AGE,
    wide("Containers", "Names of each container in the template."),
    wide(
        "Images",
        "Images referenced by each container in the template.",
    ),
    wide("Selector", "Label selector for pods."),
];

const DEPLOYMENT_COLUMNS: &[Column] = &[
    NAME,
    col("Ready", "Number of the pod with ready state."),
    int("Up-to-date", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
    int("Available", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
    AGE,
    wide("Containers", "Names of each container in the template."),
    wide("Images", "Images referenced by each container in the template."),
    wide("Selector", "Label selector for pods."),
];

/// The wide columns of a workload: container names, images, selector.
fn template_cells(obj: &Value) -> [Value; 3] {
    let cs = list(&obj["spec"]["template"]["spec"]["containers"]);
    let join = |k: &str| {
        cs.iter()
            .map(|c| str_of(&c[k]).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let selector = crate::api::workload::selector_string(&obj["spec"]["selector"]);
    [text(join("name")), text(join("image")), text(selector)]
}

fn count(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn replica_set_cells(obj: &Value) -> Vec<Value> {
    let (spec, st) = (&obj["spec"], &obj["status"]);
    let mut row = vec![
        name(obj),
        json!(spec["replicas"].as_i64().unwrap_or(1)),
        json!(count(&st["replicas"])),
        json!(count(&st["readyReplicas"])),
        creation_age(obj),
    ];
    row.extend(template_cells(obj));
    row
}

fn deployment_cells(obj: &Value) -> Vec<Value> {
    let (spec, st) = (&obj["spec"], &obj["status"]);
    let mut row = vec![
        name(obj),
        text(format!(
            "{}/{}",
            count(&st["readyReplicas"]),
            spec["replicas"].as_i64().unwrap_or(1)
        )),
        json!(count(&st["updatedReplicas"])),
        json!(count(&st["availableReplicas"])),
        creation_age(obj),
    ];
    row.extend(template_cells(obj));
    row
}

const PDB_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Min Available",
        "The minimum number of pods that must be available.",
    ),
    col(
        "Max Unavailable",
        "The maximum number of pods that may be unavailable.",
    ),
    int(
        "Allowed Disruptions",
        0,
        "Calculated number of pods that may be disrupted at this time.",
    ),
    AGE,
];

fn pdb_cells(obj: &Value) -> Vec<Value> {
    let (spec, st) = (&obj["spec"], &obj["status"]);
    let or_na = |v: &Value| match v {
        Value::Null => text("N/A"),
        Value::String(s) => text(s.clone()),
        other => text(other.to_string()),
    };
    vec![
        name(obj),
        or_na(&spec["minAvailable"]),
        or_na(&spec["maxUnavailable"]),
        json!(count(&st["disruptionsAllowed"])),
        creation_age(obj),
    ]
}

const SECRET_COLUMNS: &[Column] = &[
    NAME,
    col("Type", "The type of the secret."),
    int("Data", 0, "The number of entries in the secret's data."),
    AGE,
];

fn secret_cells(obj: &Value) -> Vec<Value> {
    let data = obj["data"].as_object().map_or(0, |m| m.len());
    vec![
        name(obj),
        text(str_of(&obj["type"])),
        json!(data),
        creation_age(obj),
    ]
}

const CONFIG_MAP_COLUMNS: &[Column] = &[
    NAME,
    int(
        "Data",
        0,
        "The number of entries in the config map's data and binaryData.",
    ),
    AGE,
];

fn config_map_cells(obj: &Value) -> Vec<Value> {
    let data = obj["data"].as_object().map_or(0, |m| m.len())
        + obj["binaryData"].as_object().map_or(0, |m| m.len());
    vec![name(obj), json!(data), creation_age(obj)]
}

const SERVICE_ACCOUNT_COLUMNS: &[Column] = &[
    NAME,
    int(
        "Secrets",
        0,
        "The number of secrets the ServiceAccount lists (tokens are bound, not secrets).",
    ),
    AGE,
];

const ROLE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Created At",
        "When the role was created (kubectl shows a time, not an age).",
    ),
];

const BINDING_COLUMNS: &[Column] = &[
    NAME,
    col("Role", "The role granted: Role/name or ClusterRole/name."),
    AGE,
    wide("Users", "The users bound."),
    wide("Groups", "The groups bound."),
    wide(
        "ServiceAccounts",
        "The ServiceAccounts bound, as namespace/name.",
    ),
];

fn binding_cells(obj: &Value) -> Vec<Value> {
    let role = format!(
        "{}/{}",
        str_of(&obj["roleRef"]["kind"]),
        str_of(&obj["roleRef"]["name"])
    );
    let of = |kind: &str| {
        let names: Vec<String> = list(&obj["subjects"])
            .iter()
            .filter(|s| s["kind"] == kind)
            .map(|s| match s["namespace"].as_str() {
                Some(ns) if kind == "ServiceAccount" => format!("{ns}/{}", str_of(&s["name"])),
                _ => str_of(&s["name"]).to_string(),
            })
            .collect();
        text(names.join(", "))
    };
    vec![
        name(obj),
        text(role),
        creation_age(obj),
        of("User"),
        of("Group"),
        of("ServiceAccount"),
    ]
}

const CSR_COLUMNS: &[Column] = &[
    NAME,
    AGE,
    col(
        "SignerName",
        "The name of the signer that the request is for.",
    ),
    col("Requestor", "The user who created the request."),
    col(
        "RequestedDuration",
        "The requested lifetime of the certificate.",
    ),
    col("Condition", "Approval and issuance state of the request."),
];

/// kubectl's CSR condition text: `Approved,Issued`, `Denied`, `Pending`.
fn csr_cells(obj: &Value) -> Vec<Value> {
    let mut states: Vec<&str> = list(&obj["status"]["conditions"])
        .iter()
        .filter(|c| str_of(&c["status"]) != "False")
        .map(|c| str_of(&c["type"]))
        .collect();
    if !obj["status"]["certificate"].is_null() {
        states.push("Issued");
    }
    let condition = if states.is_empty() {
        "Pending".to_string()
    } else {
        states.join(",")
    };
    let duration = match obj["spec"]["expirationSeconds"].as_i64() {
        Some(s) => format!("{}s", s),
        None => "<none>".into(),
    };
    vec![
        name(obj),
        creation_age(obj),
        text(str_of(&obj["spec"]["signerName"])),
        text(str_of(&obj["spec"]["username"])),
        text(duration),
        text(condition),
    ]
}

fn columns(kind: Kind) -> &'static [Column] {
    match kind {
        Kind::Namespace => NAMESPACE_COLUMNS,
        Kind::Service => SERVICE_COLUMNS,
        Kind::Endpoints => ENDPOINTS_COLUMNS,
        Kind::Pod => POD_COLUMNS,
        Kind::Node => NODE_COLUMNS,
        Kind::Event => EVENT_COLUMNS,
        Kind::EndpointSlice => ENDPOINT_SLICE_COLUMNS,
        Kind::Lease => LEASE_COLUMNS,
        Kind::ReplicaSet => REPLICA_SET_COLUMNS,
        Kind::Deployment => DEPLOYMENT_COLUMNS,
        Kind::PodDisruptionBudget => PDB_COLUMNS,
        Kind::Secret => SECRET_COLUMNS,
        Kind::ConfigMap => CONFIG_MAP_COLUMNS,
        Kind::CertificateSigningRequest => CSR_COLUMNS,
        Kind::ServiceAccount => SERVICE_ACCOUNT_COLUMNS,
        Kind::Role | Kind::ClusterRole => ROLE_COLUMNS,
        Kind::RoleBinding | Kind::ClusterRoleBinding => BINDING_COLUMNS,
    }
}

/// The column definitions of a kind (meta.k8s.io/v1 TableColumnDefinition
/// JSON objects: name, type, format, description, priority).
pub fn column_definitions(kind: Kind) -> Vec<Value> {
    columns(kind)
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.ty,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect()
}

/// The cells of one object's row (same length as [`column_definitions`]).
pub fn cells(kind: Kind, obj: &Value) -> Vec<Value> {
    match kind {
        Kind::Namespace => vec![
            name(obj),
            text(str_of(&obj["status"]["phase"])),
            creation_age(obj),
        ],
        Kind::Service => service_cells(obj),
        Kind::Endpoints => vec![name(obj), text(format_endpoints(obj)), creation_age(obj)],
        Kind::Pod => pod_cells(obj),
        Kind::Node => node_cells(obj),
        Kind::Event => event_cells(obj),
        Kind::EndpointSlice => endpoint_slice_cells(obj),
        Kind::Lease => vec![
            name(obj),
            text(str_of(&obj["spec"]["holderIdentity"])),
            creation_age(obj),
        ],
        Kind::ReplicaSet => replica_set_cells(obj),
        Kind::Deployment => deployment_cells(obj),
        Kind::PodDisruptionBudget => pdb_cells(obj),
        Kind::Secret => secret_cells(obj),
        Kind::ConfigMap => config_map_cells(obj),
        Kind::CertificateSigningRequest => csr_cells(obj),
        Kind::ServiceAccount => vec![
            name(obj),
            json!(obj["secrets"].as_array().map_or(0, Vec::len)),
            creation_age(obj),
        ],
        Kind::Role | Kind::ClusterRole => vec![
            name(obj),
            text(meta_str(obj, "creationTimestamp").unwrap_or("")),
        ],
        Kind::RoleBinding | Kind::ClusterRoleBinding => binding_cells(obj),
    }
}

/// A full Table for a list response.
///
/// `include_object` is the `includeObject` table option: `"None"` leaves
/// `row.object` out, `"Object"` embeds the full object, and anything else
/// (`"Metadata"`, the default) embeds a PartialObjectMetadata, which is what
/// kubectl needs to name rows without the weight of whole objects.
/// `with_columns = false` leaves `columnDefinitions` empty: kube-apiserver
/// sends the definitions only in the first watch event. `metadata` is the list
/// metadata to embed (resourceVersion, continue, remainingItemCount).
pub fn table(
    kind: Kind,
    objs: &[Value],
    include_object: &str,
    with_columns: bool,
    metadata: Value,
) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|obj| {
            let mut row = serde_json::Map::new();
            row.insert("cells".into(), Value::Array(cells(kind, obj)));
            if kind == Kind::Pod {
                if let Some(conditions) = pod_row_conditions(obj) {
                    row.insert("conditions".into(), conditions);
                }
            }
            match include_object {
                "None" => {}
                "Object" => {
                    row.insert("object".into(), obj.clone());
                }
                _ => {
                    row.insert(
                        "object".into(),
                        json!({
                            "kind": "PartialObjectMetadata",
                            "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
                        }),
                    );
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": if metadata.is_object() { metadata } else { json!({}) },
        "columnDefinitions": if with_columns { column_definitions(kind) } else { Vec::new() },
        "rows": rows,
    })
}

// ---- JSON helpers: absent or mistyped fields read as Go zero values. ----

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A string field that is present and non-empty.
fn non_empty(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn int_of(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn text(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn name(obj: &Value) -> Value {
    text(meta_str(obj, "name").unwrap_or(""))
}

fn creation_age(obj: &Value) -> Value {
    text(age(meta_str(obj, "creationTimestamp")))
}

/// Whether `status.conditions` has `type` with status "True".
fn condition_true(status: &Value, ty: &str) -> bool {
    list(&status["conditions"])
        .iter()
        .any(|c| c["type"] == ty && c["status"] == "True")
}

/// Joins at most three items and says how many more there are, as kube's
/// printers do for address lists that can be long.
fn first_three(items: &[String], total: usize) -> String {
    let shown = items[..items.len().min(3)].join(",");
    if total > 3 {
        format!("{shown} + {} more...", total - 3)
    } else {
        shown
    }
}

/// `host:port`, bracketing IPv6 addresses (Go's net.JoinHostPort).
fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A label map as `k=v,k2=v2` in key order (Go's labels.FormatLabels).
fn format_labels(labels: &Value) -> String {
    let Some(map) = labels.as_object().filter(|m| !m.is_empty()) else {
        return "<none>".into();
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys.iter()
        .map(|k| format!("{k}={}", str_of(&map[k.as_str()])))
        .collect::<Vec<_>>()
        .join(",")
}

// ---- Service ----

fn service_cells(obj: &Value) -> Vec<Value> {
    let spec = &obj["spec"];
    // Our server defaults the type; read a missing one the same way.
    let ty = non_empty(&spec["type"]).unwrap_or("ClusterIP");
    let cluster_ip = non_empty(&spec["clusterIPs"][0])
        .or_else(|| non_empty(&spec["clusterIP"]))
        .unwrap_or("<none>");
    let ports: Vec<String> = list(&spec["ports"])
        .iter()
        .map(|p| {
            let port = int_of(&p["port"]);
            let protocol = non_empty(&p["protocol"]).unwrap_or("TCP");
            match int_of(&p["nodePort"]) {
                n if n > 0 => format!("{port}:{n}/{protocol}"),
                _ => format!("{port}/{protocol}"),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        name(obj),
        text(ty),
        text(cluster_ip),
        text(service_external_ip(obj, ty)),
        text(ports),
        creation_age(obj),
        text(format_labels(&spec["selector"])),
    ]
}

/// The EXTERNAL-IP cell: what a client outside the cluster would connect to.
fn service_external_ip(obj: &Value, ty: &str) -> String {
    let spec = &obj["spec"];
    let external: Vec<&str> = list(&spec["externalIPs"])
        .iter()
        .filter_map(non_empty)
        .collect();
    match ty {
        "ClusterIP" | "NodePort" if external.is_empty() => "<none>".into(),
        "ClusterIP" | "NodePort" => external.join(","),
        "LoadBalancer" => {
            // Ingress points are a sorted set, then the user's externalIPs.
            let ingress: BTreeSet<&str> = list(&obj["status"]["loadBalancer"]["ingress"])
                .iter()
                .filter_map(|i| non_empty(&i["ip"]).or_else(|| non_empty(&i["hostname"])))
                .collect();
            let all: Vec<&str> = ingress.into_iter().chain(external).collect();
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        "ExternalName" => str_of(&spec["externalName"]).into(),
        _ => "<unknown>".into(),
    }
}

// ---- Endpoints and EndpointSlice ----

/// `ip:port` for every ready address and port, at most three shown.
/// No subsets at all prints `<none>`; subsets without ready addresses print
/// empty, as in kube.
fn format_endpoints(obj: &Value) -> String {
    let subsets = list(&obj["subsets"]);
    if subsets.is_empty() {
        return "<none>".into();
    }
    let mut shown = Vec::new();
    let mut total = 0;
    for subset in subsets {
        let addresses = list(&subset["addresses"]);
        let ports = list(&subset["ports"]);
        if ports.is_empty() {
            // Headless services may have no ports: print bare IPs.
            for a in addresses {
                total += 1;
                if shown.len() < 3 {
                    shown.push(str_of(&a["ip"]).to_string());
                }
            }
        } else {
            for p in ports {
                for a in addresses {
                    total += 1;
                    if shown.len() < 3 {
                        shown.push(join_host_port(str_of(&a["ip"]), int_of(&p["port"])));
                    }
                }
            }
        }
    }
    first_three(&shown, total)
}

fn endpoint_slice_cells(obj: &Value) -> Vec<Value> {
    let ports: Vec<String> = list(&obj["ports"])
        .iter()
        .map(|p| match p["port"].as_i64() {
            Some(port) => port.to_string(),
            None => non_empty(&p["name"]).unwrap_or("*").to_string(),
        })
        .collect();
    let addresses: Vec<String> = list(&obj["endpoints"])
        .iter()
        .flat_map(|e| list(&e["addresses"]))
        .map(|a| str_of(a).to_string())
        .collect();
    let or_unset = |items: &[String]| {
        if items.is_empty() {
            "<unset>".to_string()
        } else {
            first_three(items, items.len())
        }
    };
    vec![
        name(obj),
        text(str_of(&obj["addressType"])),
        text(or_unset(&ports)),
        text(or_unset(&addresses)),
        creation_age(obj),
    ]
}

// ---- Pod ----

/// Why a terminated container stopped: its reason, else the signal or exit code.
fn terminated_reason(terminated: &Value) -> String {
    if let Some(reason) = non_empty(&terminated["reason"]) {
        return reason.into();
    }
    match int_of(&terminated["signal"]) {
        0 => format!("ExitCode:{}", int_of(&terminated["exitCode"])),
        signal => format!("Signal:{signal}"),
    }
}

/// The READY, STATUS and RESTARTS values. STATUS is not just the phase: as
/// in kube, a waiting or terminated container's reason (CrashLoopBackOff,
/// ContainerCreating, Completed, ...) and init progress (`Init:0/1`) say
/// more about what the user should look at.
fn pod_state(obj: &Value) -> (usize, usize, String, i64) {
    let spec = &obj["spec"];
    let status = &obj["status"];
    let phase = str_of(&status["phase"]);
    let mut reason = non_empty(&status["reason"]).unwrap_or(phase).to_string();
    if list(&status["conditions"])
        .iter()
        .any(|c| c["type"] == "PodScheduled" && c["reason"] == "SchedulingGated")
    {
        reason = "SchedulingGated".into();
    }

    // Sidecars (restartable init containers) count as containers.
    let init_specs = list(&spec["initContainers"]);
    let is_sidecar = |name: &Value| {
        init_specs
            .iter()
            .any(|c| &c["name"] == name && c["restartPolicy"] == "Always")
    };
    let total = list(&spec["containers"]).len()
        + init_specs
            .iter()
            .filter(|c| c["restartPolicy"] == "Always")
            .count();
    let mut ready = 0;
    let mut restarts = 0;
    let mut sidecar_restarts = 0;

    let mut initializing = false;
    for (i, c) in list(&status["initContainerStatuses"]).iter().enumerate() {
        let count = int_of(&c["restartCount"]);
        restarts += count;
        let sidecar = is_sidecar(&c["name"]);
        if sidecar {
            sidecar_restarts += count;
        }
        let terminated = &c["state"]["terminated"];
        if terminated.is_object() && int_of(&terminated["exitCode"]) == 0 {
            continue;
        }
        if sidecar && c["started"] == true {
            if c["ready"] == true {
                ready += 1;
            }
            continue;
        }
        initializing = true;
        reason = match non_empty(&c["state"]["waiting"]["reason"]) {
            _ if terminated.is_object() => format!("Init:{}", terminated_reason(terminated)),
            Some(waiting) if waiting != "PodInitializing" => format!("Init:{waiting}"),
            _ => format!("Init:{i}/{}", init_specs.len()),
        };
        break;
    }

    if !initializing || condition_true(status, "Initialized") {
        restarts = sidecar_restarts;
        let mut has_running = false;
        // The last container's state wins, as in kube.
        for c in list(&status["containerStatuses"]).iter().rev() {
            restarts += int_of(&c["restartCount"]);
            let state = &c["state"];
            if let Some(waiting) = non_empty(&state["waiting"]["reason"]) {
                reason = waiting.into();
            } else if state["terminated"].is_object() {
                reason = terminated_reason(&state["terminated"]);
            } else if c["ready"] == true {
                // kube also requires state.running; a status that reports
                // readiness without any state is taken at its word.
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            reason = if condition_true(status, "Ready") {
                "Running"
            } else {
                "NotReady"
            }
            .into();
        }
    }

    if obj["metadata"]["deletionTimestamp"].is_string() {
        if status["reason"] == "NodeLost" {
            reason = "Unknown".into();
        } else if phase != "Succeeded" && phase != "Failed" {
            // A finished pod keeps its verdict while being cleaned up.
            reason = "Terminating".into();
        }
    }
    (ready, total, reason, restarts)
}

fn pod_cells(obj: &Value) -> Vec<Value> {
    let spec = &obj["spec"];
    let status = &obj["status"];
    let (ready, total, reason, restarts) = pod_state(obj);
    let ip = non_empty(&status["podIPs"][0]["ip"])
        .or_else(|| non_empty(&status["podIP"]))
        .unwrap_or("<none>");
    let gates = list(&spec["readinessGates"]);
    let readiness_gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let met = gates
            .iter()
            .filter(|g| condition_true(status, str_of(&g["conditionType"])))
            .count();
        format!("{met}/{}", gates.len())
    };
    vec![
        name(obj),
        text(format!("{ready}/{total}")),
        text(reason),
        json!(restarts),
        creation_age(obj),
        text(ip),
        text(non_empty(&spec["nodeName"]).unwrap_or("<none>")),
        text(non_empty(&status["nominatedNodeName"]).unwrap_or("<none>")),
        text(readiness_gates),
    ]
}

/// Row conditions kube attaches to finished pods, so clients can tell
/// completed rows apart without parsing the STATUS text.
fn pod_row_conditions(obj: &Value) -> Option<Value> {
    let (reason, message) = match str_of(&obj["status"]["phase"]) {
        "Succeeded" => ("Succeeded", "The pod has completed successfully."),
        "Failed" => ("Failed", "The pod failed."),
        _ => return None,
    };
    Some(json!([{
        "type": "Completed",
        "status": "True",
        "reason": reason,
        "message": message,
    }]))
}

// ---- Node ----

fn node_cells(obj: &Value) -> Vec<Value> {
    let status = &obj["status"];
    let info = &status["nodeInfo"];
    let mut state = match list(&status["conditions"])
        .iter()
        .find(|c| c["type"] == "Ready")
    {
        Some(c) if c["status"] == "True" => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if obj["spec"]["unschedulable"] == true {
        state.push_str(",SchedulingDisabled");
    }

    // Roles come from node-role.kubernetes.io/<role> keys and the older
    // kubernetes.io/role=<role> label.
    let mut roles = BTreeSet::new();
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            if let Some(role) = key.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.insert(role.to_string());
                }
            } else if key == "kubernetes.io/role" {
                if let Some(role) = non_empty(value) {
                    roles.insert(role.to_string());
                }
            }
        }
    }
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.into_iter().collect::<Vec<_>>().join(",")
    };

    let address = |ty: &str| {
        list(&status["addresses"])
            .iter()
            .find(|a| a["type"] == ty)
            .map(|a| str_of(&a["address"]).to_string())
            .unwrap_or_else(|| "<none>".into())
    };
    let info_field = |field: &str| text(non_empty(&info[field]).unwrap_or("<unknown>"));
    vec![
        name(obj),
        text(state),
        text(roles),
        creation_age(obj),
        text(str_of(&info["kubeletVersion"])),
        text(address("InternalIP")),
        text(address("ExternalIP")),
        info_field("osImage"),
        info_field("kernelVersion"),
        info_field("containerRuntimeVersion"),
    ]
}

// ---- Event ----

fn event_cells(obj: &Value) -> Vec<Value> {
    // Old-style events carry first/lastTimestamp, new-style ones eventTime
    // and series. Events posted without any time fall back to creation.
    let first_seen = age(non_empty(&obj["firstTimestamp"])
        .or_else(|| non_empty(&obj["eventTime"]))
        .or_else(|| meta_str(obj, "creationTimestamp")));
    let mut last_seen = match non_empty(&obj["lastTimestamp"]) {
        Some(last) => age(Some(last)),
        None => first_seen.clone(),
    };
    let mut count = int_of(&obj["count"]);
    let series = &obj["series"];
    if series.is_object() {
        last_seen = age(non_empty(&series["lastObservedTime"]));
        count = int_of(&series["count"]);
    } else if count == 0 {
        // Singleton events of the new API have no count.
        count = 1;
    }

    let involved = &obj["involvedObject"];
    let kind = str_of(&involved["kind"]).to_lowercase();
    let target = match non_empty(&involved["name"]) {
        Some(name) => format!("{kind}/{name}"),
        None => kind,
    };
    let component = non_empty(&obj["source"]["component"])
        .or_else(|| non_empty(&obj["reportingComponent"]))
        .unwrap_or("");
    let source =
        match non_empty(&obj["source"]["host"]).or_else(|| non_empty(&obj["reportingInstance"])) {
            Some(host) => format!("{component}, {host}"),
            None => component.to_string(),
        };
    vec![
        text(last_seen),
        text(str_of(&obj["type"])),
        text(str_of(&obj["reason"])),
        text(target),
        text(str_of(&involved["fieldPath"])),
        text(source),
        text(str_of(&obj["message"]).trim()),
        text(first_seen),
        json!(count),
        name(obj),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Service,
        Kind::Endpoints,
        Kind::Pod,
        Kind::Node,
        Kind::Event,
        Kind::EndpointSlice,
        Kind::Lease,
    ];

    fn strings(cells: &[Value]) -> Vec<String> {
        cells
            .iter()
            .map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect()
    }

    fn service(spec: Value) -> Value {
        json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"}, "spec": spec})
    }

    #[test]
    fn every_kind_has_matching_cells_and_definitions() {
        for kind in ALL {
            let defs = column_definitions(kind);
            assert_eq!(cells(kind, &json!({})).len(), defs.len(), "{kind:?}");
            for d in &defs {
                for field in ["name", "type", "format", "description", "priority"] {
                    assert!(d.get(field).is_some(), "{kind:?} {d}");
                }
            }
        }
        let names: Vec<_> = column_definitions(Kind::Service)
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector"
            ]
        );
        let defs = column_definitions(Kind::Pod);
        assert_eq!(defs[0]["format"], "name");
        assert_eq!(defs[3]["type"], "integer");
        assert_eq!(defs[5]["priority"], 1);
    }

    #[test]
    fn service_cluster_ip() {
        let svc = service(json!({
            "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
            "selector": {"k8s-app": "kube-dns", "app": "dns", "app.kubernetes.io/name": "x"},
        }));
        let c = strings(&cells(Kind::Service, &svc));
        assert_eq!(
            c[..5],
            ["web", "ClusterIP", "10.96.0.10", "<none>", "53/UDP,53/TCP"]
        );
        assert!(c[5].ends_with('d') || c[5].contains('y'), "age {}", c[5]);
        assert_eq!(c[6], "app=dns,app.kubernetes.io/name=x,k8s-app=kube-dns");
    }

    #[test]
    fn service_node_port_and_external_ips() {
        let svc = service(json!({
            "type": "NodePort", "clusterIP": "10.96.1.1",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 443, "nodePort": 30443}],
        }));
        let c = strings(&cells(Kind::Service, &svc));
        assert_eq!(
            c[..5],
            [
                "web",
                "NodePort",
                "10.96.1.1",
                "<none>",
                "80:30080/TCP,443:30443/TCP"
            ]
        );
        assert_eq!(c[6], "<none>");

        let svc = service(
            json!({"type": "ClusterIP", "clusterIP": "10.96.1.2", "externalIPs": ["1.2.3.4", "5.6.7.8"]}),
        );
        let c = strings(&cells(Kind::Service, &svc));
        assert_eq!(c[3], "1.2.3.4,5.6.7.8");
        assert_eq!(c[4], "<none>");
    }

    #[test]
    fn service_headless_and_external_name() {
        let svc = service(
            json!({"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80, "protocol": "TCP"}]}),
        );
        let c = strings(&cells(Kind::Service, &svc));
        assert_eq!(c[..5], ["web", "ClusterIP", "None", "<none>", "80/TCP"]);

        let svc = service(json!({"type": "ExternalName", "externalName": "db.example.com"}));
        let c = strings(&cells(Kind::Service, &svc));
        assert_eq!(
            c[..5],
            ["web", "ExternalName", "<none>", "db.example.com", "<none>"]
        );
    }

    #[test]
    fn service_load_balancer() {
        let mut svc = service(
            json!({"type": "LoadBalancer", "clusterIP": "10.96.2.2", "ports": [{"port": 80, "nodePort": 31000, "protocol": "TCP"}]}),
        );
        assert_eq!(strings(&cells(Kind::Service, &svc))[3], "<pending>");
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "lb.example.com"}, {"ip": "203.0.113.1"}]}});
        assert_eq!(
            strings(&cells(Kind::Service, &svc))[3],
            "203.0.113.1,203.0.113.9,lb.example.com"
        );
    }

    #[test]
    fn endpoints_truncation() {
        let ep = |subsets: Value| json!({"metadata": {"name": "web"}, "subsets": subsets});
        assert_eq!(
            strings(&cells(Kind::Endpoints, &ep(json!([]))))[1],
            "<none>"
        );
        assert_eq!(
            strings(&cells(
                Kind::Endpoints,
                &json!({"metadata": {"name": "web"}})
            ))[1],
            "<none>"
        );
        let two = ep(
            json!([{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}]}]),
        );
        assert_eq!(
            strings(&cells(Kind::Endpoints, &two))[1],
            "10.0.0.1:80,10.0.0.2:80"
        );
        let five = ep(json!([
            {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 443}]},
            {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 8080}]},
        ]));
        assert_eq!(
            strings(&cells(Kind::Endpoints, &five))[1],
            "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 2 more..."
        );
        let v6 = ep(json!([{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}]));
        assert_eq!(strings(&cells(Kind::Endpoints, &v6))[1], "[fd00::1]:80");
        let headless = ep(json!([{"addresses": [{"ip": "10.0.0.1"}]}]));
        assert_eq!(strings(&cells(Kind::Endpoints, &headless))[1], "10.0.0.1");
    }

    #[test]
    fn endpoint_slice_cells_and_truncation() {
        let slice = json!({
            "metadata": {"name": "web-abc12"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "https", "port": 443}],
            "endpoints": [
                {"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]},
                {"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.4", "10.0.0.5"]},
            ],
        });
        let c = strings(&cells(Kind::EndpointSlice, &slice));
        assert_eq!(
            c[..4],
            [
                "web-abc12",
                "IPv4",
                "80,443",
                "10.0.0.1,10.0.0.2,10.0.0.3 + 2 more..."
            ]
        );
        let empty = json!({"metadata": {"name": "e"}, "addressType": "IPv6", "endpoints": []});
        let c = strings(&cells(Kind::EndpointSlice, &empty));
        assert_eq!(c[1..4], ["IPv6", "<unset>", "<unset>"]);
        let named = json!({"ports": [{"name": "dns"}, {}, {"port": 1}, {"port": 2}]});
        assert_eq!(
            strings(&cells(Kind::EndpointSlice, &named))[2],
            "dns,*,1 + 1 more..."
        );
    }

    #[test]
    fn pod_ready_status_restarts() {
        let pod = json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {
                "phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}],
                "containerStatuses": [
                    {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                    {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
                ],
            },
        });
        let c = cells(Kind::Pod, &pod);
        assert_eq!(c[1], "1/2");
        assert_eq!(c[2], "CrashLoopBackOff");
        assert_eq!(c[3], json!(3));
        assert_eq!(strings(&c[5..]), ["10.244.0.5", "n1", "<none>", "<none>"]);

        let fresh = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Pending"}});
        let c = cells(Kind::Pod, &fresh);
        assert_eq!(strings(&c[1..4]), ["0/1", "Pending", "0"]);
        assert_eq!(c[5], "<none>");

        let mut healthy = json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a"}], "readinessGates": [{"conditionType": "example.com/lb"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "a", "ready": true, "restartCount": 0}],
                "conditions": [{"type": "example.com/lb", "status": "True"}]},
        });
        let c = cells(Kind::Pod, &healthy);
        assert_eq!(strings(&c[1..4]), ["1/1", "Running", "0"]);
        assert_eq!(c[8], "1/1");
        healthy["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert_eq!(cells(Kind::Pod, &healthy)[2], "Terminating");
    }

    #[test]
    fn pod_init_and_completion() {
        let init = json!({
            "spec": {"initContainers": [{"name": "setup"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": [{"name": "setup", "restartCount": 0, "state": {"running": {}}}],
                "containerStatuses": [{"name": "a", "state": {"waiting": {"reason": "PodInitializing"}}}]},
        });
        assert_eq!(cells(Kind::Pod, &init)[2], "Init:0/1");

        let done = json!({
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [{"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]},
            "metadata": {"name": "job-1", "deletionTimestamp": "2024-01-01T00:00:00Z"},
        });
        assert_eq!(
            strings(&cells(Kind::Pod, &done)[1..3]),
            ["0/1", "Completed"]
        );
        let table = table(Kind::Pod, &[done], "None", true, json!({}));
        assert_eq!(table["rows"][0]["conditions"][0]["reason"], "Succeeded");
    }

    #[test]
    fn node_event_lease_namespace() {
        let node = json!({
            "metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": "", "node-role.kubernetes.io/worker": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "192.168.1.10"}],
                "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Debian"}},
        });
        let c = strings(&cells(Kind::Node, &node));
        assert_eq!(
            c[..3],
            ["n1", "Ready,SchedulingDisabled", "control-plane,worker"]
        );
        assert_eq!(
            c[4..],
            [
                "v1.33.0",
                "192.168.1.10",
                "<none>",
                "Debian",
                "<unknown>",
                "<unknown>"
            ]
        );
        let c = strings(&cells(Kind::Node, &json!({"metadata": {"name": "n2"}})));
        assert_eq!(c[1..3], ["Unknown", "<none>"]);

        let event = json!({
            "metadata": {"name": "web-1.17a", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "involvedObject": {"kind": "Pod", "name": "web-1", "fieldPath": "spec.containers{a}"},
            "type": "Warning", "reason": "BackOff", "message": " Back-off restarting \n",
            "source": {"component": "kubelet", "host": "n1"},
        });
        let c = cells(Kind::Event, &event);
        assert_eq!(
            strings(&c[1..7]),
            [
                "Warning",
                "BackOff",
                "pod/web-1",
                "spec.containers{a}",
                "kubelet, n1",
                "Back-off restarting"
            ]
        );
        assert_ne!(c[0], "<unknown>");
        assert_eq!(c[8], json!(1));
        assert_eq!(c[9], "web-1.17a");

        let lease = json!({"metadata": {"name": "kube-scheduler"}, "spec": {"holderIdentity": "node-a_1234"}});
        assert_eq!(cells(Kind::Lease, &lease)[1], "node-a_1234");
        let ns = json!({"metadata": {"name": "default"}, "status": {"phase": "Active"}});
        assert_eq!(
            strings(&cells(Kind::Namespace, &ns)[..2]),
            ["default", "Active"]
        );
    }

    #[test]
    fn table_shape() {
        let ns = json!({
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": "default", "resourceVersion": "7", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "status": {"phase": "Active"},
        });
        let objs = [ns.clone()];
        let t = table(
            Kind::Namespace,
            &objs,
            "Metadata",
            true,
            json!({"resourceVersion": "9"}),
        );
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(t["metadata"]["resourceVersion"], "9");
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 3);
        let row = &t["rows"][0];
        assert_eq!(row["cells"][0], "default");
        assert_eq!(row["cells"][1], "Active");
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(row["object"]["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(row["object"]["metadata"], ns["metadata"]);
        assert!(row["object"].get("status").is_none());

        let t = table(Kind::Namespace, &objs, "Object", false, Value::Null);
        assert_eq!(t["rows"][0]["object"], ns);
        assert_eq!(t["columnDefinitions"], json!([]));
        assert_eq!(t["metadata"], json!({}));

        let t = table(Kind::Namespace, &objs, "None", true, json!({}));
        assert!(t["rows"][0].get("object").is_none());
        assert!(t["rows"][0].get("conditions").is_none());

        let t = table(Kind::Service, &[], "Metadata", true, json!({}));
        assert_eq!(t["rows"], json!([]));
    }
}
