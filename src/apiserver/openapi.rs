//! The OpenAPI v3 documents served at `/openapi/v3` and
//! `/openapi/v3/<group-version path>`.
//!
//! `kubectl` reads them for more than documentation:
//!
//! * `kubectl apply` checks that the PATCH operation of the object's kind
//!   accepts the `fieldValidation` query parameter (it looks for the path whose
//!   `patch` operation carries the kind in `x-kubernetes-group-version-kind`)
//!   and otherwise falls back to client-side behaviour. Every PATCH operation
//!   here (including `/status`) therefore lists `fieldValidation`.
//! * `kubectl apply` computes strategic merge patches from the schema's
//!   `x-kubernetes-patch-merge-key` / `x-kubernetes-patch-strategy`
//!   extensions. They must describe how *this* server merges lists, which is
//!   [`ResourceDef::list_strategy`]: a list the server merges by key must say
//!   so (or kubectl sends whole lists and deletions are lost), and a list the
//!   server replaces must not (or kubectl sends partial lists and elements are
//!   lost). The extensions are derived from that table, never copied from
//!   upstream.
//! * `kubectl explain` renders the schemas.
//!
//! Schemas are generated from the k8s-openapi Rust types (which implement
//! `schemars::JsonSchema`) with schemars' OpenAPI 3.0 settings, so references
//! point at `#/components/schemas/<name>` and component names are the ones
//! Kubernetes uses (`io.k8s.api.core.v1.Service`,
//! `io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta`). Kind and List schemas
//! carry `x-kubernetes-group-version-kind`; paths and operations follow the
//! Kubernetes layout and operation ids (`patchCoreV1NamespacedService`).
//!
//! Component schemas are shared: every kind reaches `ObjectMeta` (and Pod
//! reaches it again inside ephemeral volume claim templates), and Pod reaches
//! `Container` through both `spec.containers` and `spec.initContainers`. The
//! table is keyed by field path, so paths sharing a schema can disagree. A
//! shared list property then gets the strategy of the shallowest paths
//! reaching it (`metadata.finalizers` decides for `ObjectMeta`), and no
//! extension at all when paths of that depth disagree (kubectl then sends the
//! whole list, which may leave stale elements but never drops any).
//!
//! Everything is built once, on first use, and served as cached bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{json, Map, Value};

use crate::api::patch::ListStrategy;
use crate::api::resources::{group_versions, ResourceDef, RESOURCES};

/// Prefix of every schema reference.
const REF_PREFIX: &str = "#/components/schemas/";
/// Extension naming the group/version/kind of a schema or operation.
const GVK_EXT: &str = "x-kubernetes-group-version-kind";
/// Extension naming the merge key of a list merged by key.
const MERGE_KEY_EXT: &str = "x-kubernetes-patch-merge-key";
/// Extension naming the patch strategy of a list (`merge`).
const STRATEGY_EXT: &str = "x-kubernetes-patch-strategy";
/// The Kubernetes version the documents claim to describe.
const KUBE_VERSION: &str = "v1.33.0";

/// The four PATCH body media types Kubernetes accepts.
const PATCH_MEDIA_TYPES: &[&str] = &[
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];

/// The `/openapi/v3` index: `{"paths": {"api/v1": {"serverRelativeURL":
/// "/openapi/v3/api/v1?hash=<HASH>"}, "apis/discovery.k8s.io/v1": {..}}}`,
/// one entry per served group-version, where `HASH` is the uppercase hex
/// FNV-1a 64 digest of that document's bytes (so clients re-fetch a document
/// only when it changes).
pub fn index() -> &'static [u8] {
    &SPEC.index
}

/// The OpenAPI 3.0 document of one group-version, by its index path
/// (`api/v1`, `apis/discovery.k8s.io/v1`; surrounding slashes are ignored,
/// a `?hash=` query must already be stripped). `None` for an unknown path.
/// Built and serialized once, then served from the cache.
pub fn document(path: &str) -> Option<&'static [u8]> {
    let path = path.trim_matches('/');
    SPEC.docs
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, bytes)| bytes.as_slice())
}

/// The serialized index and documents.
struct Spec {
    index: Vec<u8>,
    /// (index path, document bytes), in [`group_versions`] order.
    docs: Vec<(String, Vec<u8>)>,
}

static SPEC: LazyLock<Spec> = LazyLock::new(|| {
    let schemas = Schemas::generate();
    let mut index_paths = Map::new();
    let mut docs = Vec::new();
    for (group, version) in group_versions() {
        let path = doc_path(group, version);
        let doc = build_document(&schemas, group, version);
        let bytes = serde_json::to_vec(&doc).expect("OpenAPI document serializes");
        index_paths.insert(
            path.clone(),
            json!({ "serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash(&bytes)) }),
        );
        docs.push((path, bytes));
    }
    let index = serde_json::to_vec(&json!({ "paths": index_paths })).expect("index serializes");
    Spec { index, docs }
});

/// FNV-1a 64 of `bytes`, as 16 uppercase hex digits.
fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// `api/v1` for the core group, `apis/<group>/<version>` otherwise.
fn doc_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Every component schema, annotated, plus the component names of the
/// kinds, their lists and the meta types operations refer to.
struct Schemas {
    defs: Map<String, Value>,
    /// Per row of [`RESOURCES`]: (kind component, list component).
    kinds: Vec<(String, String)>,
    delete_options: String,
    status: String,
    patch: String,
    watch_event: String,
}

impl Schemas {
    fn generate() -> Schemas {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let kind_names: Vec<String> = RESOURCES
            .iter()
            .map(|r| ref_name(&(r.schema)(&mut generator)))
            .collect();
        let delete_options = sub::<meta::DeleteOptions>(&mut generator);
        let status = sub::<meta::Status>(&mut generator);
        let patch = sub::<meta::Patch>(&mut generator);
        let watch_event = sub::<meta::WatchEvent<meta::Status>>(&mut generator);
        let list_meta = sub::<meta::ListMeta>(&mut generator);

        let mut defs = generator.take_definitions(true);
        for schema in defs.values_mut() {
            to_openapi3(schema);
        }

        let mut kinds = Vec::new();
        for (r, kind_name) in RESOURCES.iter().zip(kind_names) {
            if let Some(Value::Object(schema)) = defs.get_mut(&kind_name) {
                schema.insert(GVK_EXT.into(), gvk_list(r, r.kind_name));
            }
            let list_name = match kind_name.rsplit_once('.') {
                Some((package, _)) => format!("{package}.{}", r.list_kind),
                None => r.list_kind.to_string(),
            };
            defs.insert(list_name.clone(), list_schema(r, &kind_name, &list_meta));
            kinds.push((kind_name, list_name));
        }

        for ((component, pointer), strategy) in list_strategies(&defs, &kinds) {
            if let Some(site) = defs.get_mut(&component).and_then(|s| at_mut(s, &pointer)) {
                annotate(site, strategy);
            }
        }

        Schemas {
            defs,
            kinds,
            delete_options,
            status,
            patch,
            watch_event,
        }
    }
}

/// Registers `T` and returns its component name.
fn sub<T: schemars::JsonSchema>(generator: &mut SchemaGenerator) -> String {
    ref_name(&generator.subschema_for::<T>())
}

/// The component name a `{"$ref": "#/components/schemas/<name>"}` points at.
fn ref_name(schema: &schemars::Schema) -> String {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix(REF_PREFIX))
        .expect("kinds are named component schemas")
        .to_string()
}

/// A `$ref` to a component.
fn reference(name: &str) -> Value {
    json!({ "$ref": format!("{REF_PREFIX}{name}") })
}

/// The schema-style GVK extension value (a list of one).
fn gvk_list(r: &ResourceDef, kind: &str) -> Value {
    json!([{ "group": r.group, "kind": kind, "version": r.version }])
}

/// The schema of `<Kind>List` (k8s-openapi's generic `List<T>` has no
/// schema of its own).
fn list_schema(r: &ResourceDef, kind_name: &str, list_meta: &str) -> Value {
    json!({
        "description": format!("{} is a list of {} objects.", r.list_kind, r.kind_name),
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "APIVersion defines the versioned schema of this representation of an object.",
                "type": "string"
            },
            "items": {
                "description": format!("List of {}.", r.plural),
                "type": "array",
                "items": reference(kind_name)
            },
            "kind": {
                "description": "Kind is a string value representing the REST resource this object represents.",
                "type": "string"
            },
            "metadata": {
                "description": "Standard list metadata.",
                "allOf": [reference(list_meta)]
            }
        },
        "required": ["items"],
        GVK_EXT: gvk_list(r, r.list_kind),
    })
}

/// Rewrites JSON Schema 2020-12 leftovers into OpenAPI 3.0 form, in case a
/// schemars transform misses one: drops `$schema`/`$defs`/`$id`, turns
/// `const` into a one-value `enum`, and `type` arrays into a single `type`
/// (with `nullable`) or a `oneOf` of types.
fn to_openapi3(schema: &mut Value) {
    let Value::Object(map) = schema else {
        if let Value::Array(items) = schema {
            items.iter_mut().for_each(to_openapi3);
        }
        return;
    };
    for key in ["$schema", "$defs", "$id", "$comment", "definitions"] {
        map.shift_remove(key);
    }
    if let Some(value) = map.shift_remove("const") {
        map.insert("enum".into(), Value::Array(vec![value]));
    }
    if let Some(Value::Array(types)) = map.get("type").cloned() {
        let nullable = types.iter().any(|t| t == "null");
        let rest: Vec<Value> = types.into_iter().filter(|t| t != "null").collect();
        map.shift_remove("type");
        match rest.as_slice() {
            [] => {}
            [single] => {
                map.insert("type".into(), single.clone());
            }
            many => {
                let one_of = many.iter().map(|t| json!({ "type": t })).collect();
                map.insert("oneOf".into(), Value::Array(one_of));
            }
        }
        if nullable {
            map.insert("nullable".into(), Value::Bool(true));
        }
    }
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            // Maps from names to schemas: recurse into each schema.
            "properties" | "patternProperties" => {
                if let Value::Object(props) = value {
                    props.values_mut().for_each(to_openapi3);
                }
            }
            "items" | "additionalProperties" | "not" | "allOf" | "anyOf" | "oneOf" => {
                to_openapi3(value)
            }
            _ => {}
        }
    }
}

/// A list-typed property: its component and the JSON pointer tokens from the
/// component's root to the property schema.
type Site = (String, Vec<String>);

/// What each kind and field path reaching a list property says about it:
/// (kind, dotted field path, the server's strategy there).
type Observations = Vec<(&'static str, String, ListStrategy)>;

/// Every list property reachable from the kinds' schemas, with the server's
/// strategy at each field path reaching it.
fn observe(defs: &Map<String, Value>, kinds: &[(String, String)]) -> BTreeMap<Site, Observations> {
    let mut seen = BTreeMap::new();
    for (r, (kind_name, _)) in RESOURCES.iter().zip(kinds) {
        let mut walker = Walker {
            defs,
            r,
            stack: vec![kind_name.clone()],
            seen: &mut seen,
        };
        if let Some(root) = defs.get(kind_name) {
            walker.object(kind_name, &[], root, "");
        }
    }
    seen
}

/// The strategy to declare on a shared list property: the one of the
/// shallowest field paths reaching it (`metadata.finalizers` decides for
/// `ObjectMeta`, not the copy of `ObjectMeta` deep inside a Pod's ephemeral
/// volume claim template), or `None` when paths of that depth disagree
/// (Pod's `spec.containers.ports` against `spec.initContainers.ports`).
fn decide(observations: &Observations) -> Option<ListStrategy> {
    let depth = |path: &str| path.matches('.').count();
    let shallowest = observations.iter().map(|(_, p, _)| depth(p)).min()?;
    let mut at_depth = observations
        .iter()
        .filter(|(_, p, _)| depth(p) == shallowest)
        .map(|(_, _, s)| *s);
    let first = at_depth.next()?;
    at_depth.all(|s| s == first).then_some(first)
}

/// The merging strategy to declare at each list property of the kinds'
/// schemas (see [`decide`]); properties the server replaces, or where the
/// shallowest paths disagree, are left out.
fn list_strategies(
    defs: &Map<String, Value>,
    kinds: &[(String, String)],
) -> BTreeMap<Site, ListStrategy> {
    observe(defs, kinds)
        .into_iter()
        .filter_map(|(site, observations)| {
            decide(&observations)
                .filter(|s| *s != ListStrategy::Replace)
                .map(|s| (site, s))
        })
        .collect()
}

/// Walks one kind's schema along field paths, recording the list strategy of
/// every list property it reaches.
struct Walker<'a> {
    defs: &'a Map<String, Value>,
    r: &'a ResourceDef,
    /// Components being walked (guards against recursive types).
    stack: Vec<String>,
    seen: &'a mut BTreeMap<Site, Observations>,
}

impl Walker<'_> {
    /// Visits the properties of the object schema at `pointer` in `component`
    /// whose field path is `path`.
    fn object(&mut self, component: &str, pointer: &[String], schema: &Value, path: &str) {
        let Some(Value::Object(props)) = schema.get("properties") else {
            return;
        };
        for (key, prop) in props {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let mut prop_pointer = pointer.to_vec();
            prop_pointer.extend(["properties".to_string(), key.clone()]);
            let resolved = resolve(self.defs, prop);
            if resolved.get("type").and_then(Value::as_str) == Some("array") {
                let strategy = self.r.list_strategy(&field);
                self.seen
                    .entry((component.to_string(), prop_pointer.clone()))
                    .or_default()
                    .push((self.r.kind_name, field.clone(), strategy));
                if let Some(items) = resolved.get("items") {
                    if std::ptr::eq(resolved, prop) {
                        prop_pointer.push("items".into());
                        self.descend(component, &prop_pointer, items, &field);
                    } else {
                        // The array is a component of its own.
                        let name = ref_target(prop).unwrap_or_default().to_string();
                        self.enter(&name, &["items".to_string()], items, &field);
                    }
                }
            } else {
                self.descend(component, &prop_pointer, prop, &field);
            }
        }
    }

    /// Follows a property (or list item) schema: into the referenced
    /// component, or into an inline object.
    fn descend(&mut self, component: &str, pointer: &[String], schema: &Value, path: &str) {
        match ref_target(schema) {
            Some(name) => {
                if let Some(target) = self.defs.get(name) {
                    self.enter(name, &[], target, path);
                }
            }
            None => self.object(component, pointer, schema, path),
        }
    }

    /// Walks `schema` at `pointer` inside component `name`, unless `name` is
    /// already being walked.
    fn enter(&mut self, name: &str, pointer: &[String], schema: &Value, path: &str) {
        if self.stack.iter().any(|s| s == name) {
            return;
        }
        self.stack.push(name.to_string());
        self.descend(name, pointer, schema, path);
        self.stack.pop();
    }
}

/// The component a schema refers to: `{"$ref": ..}` or
/// `{"allOf": [{"$ref": ..}], ..}` (how schemars wraps a described reference).
fn ref_target(schema: &Value) -> Option<&str> {
    let reference = match schema.get("$ref") {
        Some(r) => r,
        None => match schema.get("allOf") {
            Some(Value::Array(all)) if all.len() == 1 => all[0].get("$ref")?,
            _ => return None,
        },
    };
    reference.as_str()?.strip_prefix(REF_PREFIX)
}

/// The schema itself, or the component it refers to.
fn resolve<'a>(defs: &'a Map<String, Value>, schema: &'a Value) -> &'a Value {
    ref_target(schema)
        .and_then(|name| defs.get(name))
        .unwrap_or(schema)
}

/// The value at `pointer` (object keys) inside `value`.
fn at_mut<'a>(value: &'a mut Value, pointer: &[String]) -> Option<&'a mut Value> {
    pointer
        .iter()
        .try_fold(value, |v, token| v.as_object_mut()?.get_mut(token))
}

/// Declares `strategy` on a list property schema, wrapping a bare `$ref` in
/// `allOf` first (extensions beside `$ref` are ignored in OpenAPI 3.0).
fn annotate(site: &mut Value, strategy: ListStrategy) {
    let Value::Object(map) = site else {
        return;
    };
    if let Some(reference) = map.shift_remove("$ref") {
        map.insert("allOf".into(), json!([{ "$ref": reference }]));
    }
    match strategy {
        ListStrategy::MergeByKey(key) => {
            map.insert(MERGE_KEY_EXT.into(), Value::String(key.into()));
            map.insert(STRATEGY_EXT.into(), Value::String("merge".into()));
        }
        ListStrategy::MergePrimitives => {
            map.insert(STRATEGY_EXT.into(), Value::String("merge".into()));
        }
        ListStrategy::Replace => {}
    }
}

/// Every component name `value` refers to, directly or transitively.
fn closure(defs: &Map<String, Value>, roots: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(name) = todo.pop() {
        if !out.insert(name.clone()) {
            continue;
        }
        if let Some(schema) = defs.get(&name) {
            collect_refs(schema, &mut todo);
        }
    }
    out
}

/// Pushes the target of every `$ref` inside `value`.
fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix(REF_PREFIX) {
                            out.push(name.to_string());
                        }
                    }
                    _ => collect_refs(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// The OpenAPI document of one group-version.
fn build_document(schemas: &Schemas, group: &str, version: &str) -> Value {
    let mut paths = BTreeMap::new();
    let mut roots = vec![
        schemas.delete_options.clone(),
        schemas.status.clone(),
        schemas.patch.clone(),
        schemas.watch_event.clone(),
    ];
    for (r, (kind, list)) in RESOURCES.iter().zip(&schemas.kinds) {
        if r.group != group || r.version != version {
            continue;
        }
        roots.push(kind.clone());
        roots.push(list.clone());
        resource_paths(&mut paths, schemas, r, kind, list);
    }
    let components: Map<String, Value> = closure(&schemas.defs, roots)
        .into_iter()
        .filter_map(|name| {
            let schema = schemas.defs.get(&name)?.clone();
            Some((name, schema))
        })
        .collect();
    json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": KUBE_VERSION },
        "paths": paths.into_iter().collect::<Map<String, Value>>(),
        "components": { "schemas": components },
    })
}

/// `Core` for the core group, else the group without `.k8s.io`, in
/// CamelCase (`discovery.k8s.io` → `Discovery`), as in operation ids.
fn group_id(group: &str) -> String {
    if group.is_empty() {
        return "Core".into();
    }
    group
        .trim_end_matches(".k8s.io")
        .split(['.', '-'])
        .map(capitalize)
        .collect()
}

/// `s` with its first letter upper-cased.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The operation tag (`core_v1`, `discovery_v1`).
fn tag(group: &str, version: &str) -> String {
    let group = if group.is_empty() {
        "core".to_string()
    } else {
        group.trim_end_matches(".k8s.io").replace(['.', '-'], "_")
    };
    format!("{group}_{version}")
}

/// A parameter.
fn param(name: &str, location: &str, ty: &str, description: &str) -> Value {
    let mut p = json!({
        "name": name,
        "in": location,
        "description": description,
        "schema": { "type": ty, "uniqueItems": true },
    });
    if location == "path" {
        p["required"] = Value::Bool(true);
    }
    p
}

fn name_param() -> Value {
    param("name", "path", "string", "name of the object")
}

fn namespace_param() -> Value {
    param(
        "namespace",
        "path",
        "string",
        "object name and auth scope, such as for teams and projects",
    )
}

/// Query parameters of create, update and patch.
fn write_params() -> Vec<Value> {
    vec![
        param("dryRun", "query", "string", "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed"),
        param("fieldManager", "query", "string", "fieldManager is a name associated with the actor or entity that is making these changes."),
        param("fieldValidation", "query", "string", "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict"),
    ]
}

/// Query parameters of list, watch and deletecollection.
fn list_params() -> Vec<Value> {
    vec![
        param("allowWatchBookmarks", "query", "boolean", "allowWatchBookmarks requests watch events with type \"BOOKMARK\"."),
        param("continue", "query", "string", "The continue option should be set when retrieving more results from the server."),
        param("fieldSelector", "query", "string", "A selector to restrict the list of returned objects by their fields. Defaults to everything."),
        param("labelSelector", "query", "string", "A selector to restrict the list of returned objects by their labels. Defaults to everything."),
        param("limit", "query", "integer", "limit is a maximum number of responses to return for a list call."),
        param("resourceVersion", "query", "string", "resourceVersion sets a constraint on what resource versions a request may be served from."),
        param("resourceVersionMatch", "query", "string", "resourceVersionMatch determines how resourceVersion is applied to list calls."),
        param("timeoutSeconds", "query", "integer", "Timeout for the list/watch call."),
        param("watch", "query", "boolean", "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications."),
    ]
}

/// Query parameters of delete and deletecollection.
fn delete_params() -> Vec<Value> {
    vec![
        param("dryRun", "query", "string", "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed"),
        param("gracePeriodSeconds", "query", "integer", "The duration in seconds before the object should be deleted."),
        param("propagationPolicy", "query", "string", "Whether and how garbage collection will be performed: 'Orphan', 'Background' or 'Foreground'."),
    ]
}

/// A JSON response of schema `schema_name`.
fn response(description: &str, schema_name: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": reference(schema_name) } },
    })
}

/// A required JSON request body of schema `schema_name`.
fn json_body(schema_name: &str) -> Value {
    json!({
        "content": { "*/*": { "schema": reference(schema_name) } },
        "required": true,
    })
}

/// Names shared by the operations of one resource.
struct Ops<'a> {
    r: &'a ResourceDef,
    /// `CoreV1`, `DiscoveryV1`.
    gv_id: String,
    tag: String,
}

impl Ops<'_> {
    /// One operation.
    fn op(
        &self,
        action: &str,
        id: String,
        description: String,
        parameters: Vec<Value>,
        request_body: Option<Value>,
        responses: Value,
    ) -> Value {
        let mut op = json!({
            "tags": [self.tag],
            "description": description,
            "operationId": id,
            "parameters": parameters,
        });
        if let Some(body) = request_body {
            op["requestBody"] = body;
        }
        op["responses"] = responses;
        op["x-kubernetes-action"] = Value::String(action.into());
        op[GVK_EXT] =
            json!({ "group": self.r.group, "kind": self.r.kind_name, "version": self.r.version });
        op
    }

    /// `<verb><Group><Version>[Namespaced]<Kind><suffix>`.
    fn id(&self, verb: &str, suffix: &str) -> String {
        let scope = if self.r.namespaced { "Namespaced" } else { "" };
        format!("{verb}{}{scope}{}{suffix}", self.gv_id, self.r.kind_name)
    }
}

/// Adds the paths of one resource.
fn resource_paths(
    paths: &mut BTreeMap<String, Value>,
    schemas: &Schemas,
    r: &ResourceDef,
    kind: &str,
    list: &str,
) {
    let ops = Ops {
        r,
        gv_id: format!("{}{}", group_id(r.group), capitalize(r.version)),
        tag: tag(r.group, r.version),
    };
    let prefix = format!("/{}", doc_path(r.group, r.version));
    let scope: Vec<Value> = if r.namespaced {
        vec![namespace_param()]
    } else {
        Vec::new()
    };
    let collection = if r.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{prefix}/{}", r.plural)
    };
    let with = |base: &[Value], extra: Vec<Value>| -> Vec<Value> {
        base.iter().cloned().chain(extra).collect()
    };
    let list_response = json!({
        "description": "OK",
        "content": {
            "application/json": { "schema": reference(list) },
            "application/json;stream=watch": { "schema": reference(&schemas.watch_event) },
        },
    });
    let kind_name = r.kind_name;

    // The collection: list, create, deletecollection.
    let list_op = |id: String, description: String, params: Vec<Value>| {
        ops.op(
            "list",
            id,
            description,
            with(&params, list_params()),
            None,
            json!({ "200": list_response, "401": { "description": "Unauthorized" } }),
        )
    };
    let mut collection_item = Map::new();
    collection_item.insert(
        "get".into(),
        list_op(
            ops.id("list", ""),
            format!("list or watch objects of kind {kind_name}"),
            scope.clone(),
        ),
    );
    collection_item.insert(
        "post".into(),
        ops.op(
            "create",
            ops.id("create", ""),
            format!("create a {kind_name}"),
            with(&scope, write_params()),
            Some(json_body(kind)),
            json!({
                "200": response("OK", kind),
                "201": response("Created", kind),
                "202": response("Accepted", kind),
                "401": { "description": "Unauthorized" },
            }),
        ),
    );
    let mut deletecollection_params = delete_params();
    deletecollection_params.extend(
        list_params()
            .into_iter()
            .filter(|p| !matches!(p["name"].as_str(), Some("watch" | "allowWatchBookmarks"))),
    );
    collection_item.insert(
        "delete".into(),
        ops.op(
            "deletecollection",
            format!(
                "delete{}Collection{}{kind_name}",
                ops.gv_id,
                if r.namespaced { "Namespaced" } else { "" }
            ),
            format!("delete collection of {kind_name}"),
            with(&scope, deletecollection_params),
            Some(json!({ "content": { "*/*": { "schema": reference(&schemas.delete_options) } } })),
            json!({ "200": response("OK", &schemas.status), "401": { "description": "Unauthorized" } }),
        ),
    );
    paths.insert(collection.clone(), Value::Object(collection_item));

    // Across namespaces.
    if r.namespaced {
        let mut item = Map::new();
        item.insert(
            "get".into(),
            list_op(
                format!("list{}{kind_name}ForAllNamespaces", ops.gv_id),
                format!("list or watch objects of kind {kind_name}"),
                Vec::new(),
            ),
        );
        paths.insert(format!("{prefix}/{}", r.plural), Value::Object(item));
    }

    // One object, and its status.
    let object_params = with(&[name_param()], scope.clone());
    let object = format!("{collection}/{{name}}");
    let mut object_item = object_ops(&ops, &object_params, kind, &schemas.patch, "");
    object_item.insert(
        "delete".into(),
        ops.op(
            "delete",
            ops.id("delete", ""),
            format!("delete a {kind_name}"),
            with(&object_params, delete_params()),
            Some(json!({ "content": { "*/*": { "schema": reference(&schemas.delete_options) } } })),
            json!({
                "200": response("OK", kind),
                "202": response("Accepted", kind),
                "401": { "description": "Unauthorized" },
            }),
        ),
    );
    paths.insert(object.clone(), Value::Object(object_item));
    if r.has_status {
        let status_item = object_ops(&ops, &object_params, kind, &schemas.patch, "Status");
        paths.insert(format!("{object}/status"), Value::Object(status_item));
    }
}

/// get, put and patch of an object (`suffix` "") or its status ("Status").
fn object_ops(
    ops: &Ops<'_>,
    params: &[Value],
    kind: &str,
    patch_schema: &str,
    suffix: &str,
) -> Map<String, Value> {
    let kind_name = ops.r.kind_name;
    let what = if suffix.is_empty() {
        format!("the specified {kind_name}")
    } else {
        format!("status of the specified {kind_name}")
    };
    let with = |extra: Vec<Value>| -> Vec<Value> { params.iter().cloned().chain(extra).collect() };
    let unauthorized = json!({ "description": "Unauthorized" });
    let mut item = Map::new();
    item.insert(
        "get".into(),
        ops.op(
            "get",
            ops.id("read", suffix),
            format!("read {what}"),
            params.to_vec(),
            None,
            json!({ "200": response("OK", kind), "401": unauthorized }),
        ),
    );
    item.insert(
        "put".into(),
        ops.op(
            "put",
            ops.id("replace", suffix),
            format!("replace {what}"),
            with(write_params()),
            Some(json_body(kind)),
            json!({
                "200": response("OK", kind),
                "201": response("Created", kind),
                "401": unauthorized,
            }),
        ),
    );
    let mut patch_params = write_params();
    patch_params.push(param(
        "force",
        "query",
        "boolean",
        "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people. Force flag must be unset for non-apply patch requests.",
    ));
    let patch_content: Map<String, Value> = PATCH_MEDIA_TYPES
        .iter()
        .map(|m| (m.to_string(), json!({ "schema": reference(patch_schema) })))
        .collect();
    item.insert(
        "patch".into(),
        ops.op(
            "patch",
            ops.id("patch", suffix),
            format!("partially update {what}"),
            with(patch_params),
            Some(json!({ "content": patch_content, "required": true })),
            json!({
                "200": response("OK", kind),
                "201": response("Created", kind),
                "401": unauthorized,
            }),
        ),
    );
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("valid JSON")
    }

    fn doc(path: &str) -> Value {
        parse(document(path).unwrap_or_else(|| panic!("no document {path}")))
    }

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        doc["components"]["schemas"]
            .get(name)
            .unwrap_or_else(|| panic!("no schema {name}"))
    }

    /// The component a property points at.
    fn component<'a>(doc: &'a Value, prop: &Value) -> &'a Value {
        schema(doc, ref_target(prop).expect("a reference"))
    }

    /// The PATCH operation of `path`.
    fn patch_op<'a>(doc: &'a Value, path: &str) -> &'a Value {
        &doc["paths"][path]["patch"]
    }

    fn has_param(op: &Value, name: &str) -> bool {
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name && p["in"] == "query")
    }

    #[test]
    fn index_lists_every_group_version() {
        let index = parse(index());
        let paths = index["paths"].as_object().unwrap();
        let expected: Vec<String> = group_versions()
            .into_iter()
            .map(|(g, v)| doc_path(g, v))
            .collect();
        assert_eq!(paths.keys().cloned().collect::<Vec<_>>(), expected);
        for (path, entry) in paths {
            let url = entry["serverRelativeURL"].as_str().unwrap();
            let (base, hash_value) = url.split_once("?hash=").unwrap();
            assert_eq!(base, format!("/openapi/v3/{path}"));
            assert_eq!(hash_value, hash(document(path).unwrap()));
            assert_eq!(hash_value.len(), 16);
            assert!(hash_value
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        }
        assert!(paths.contains_key("api/v1"));
        assert!(paths.contains_key("apis/discovery.k8s.io/v1"));
        assert!(document("/api/v1/").is_some());
        assert!(document("apis/apps/v1").is_some());
        assert!(document("apis/batch/v1").is_none());
    }

    #[test]
    fn documents_carry_kind_schemas_with_gvk() {
        for r in RESOURCES.iter() {
            let d = doc(&doc_path(r.group, r.version));
            assert_eq!(d["openapi"], "3.0.0");
            assert_eq!(d["info"]["title"], "Kubernetes");
            let (name, kind) = d["components"]["schemas"]
                .as_object()
                .unwrap()
                .iter()
                .find(|(_, s)| {
                    s[GVK_EXT]
                        == json!([{ "group": r.group, "kind": r.kind_name, "version": r.version }])
                })
                .unwrap_or_else(|| panic!("no schema for {}", r.kind_name));
            assert!(name.ends_with(&format!(".{}", r.kind_name)), "{name}");
            assert!(kind["properties"]["metadata"].is_object());
            let list = d["components"]["schemas"]
                .as_object()
                .unwrap()
                .values()
                .find(|s| {
                    s[GVK_EXT]
                        == json!([{ "group": r.group, "kind": r.list_kind, "version": r.version }])
                })
                .unwrap_or_else(|| panic!("no list schema for {}", r.kind_name));
            assert_eq!(
                list["properties"]["items"]["items"]["$ref"],
                format!("{REF_PREFIX}{name}")
            );
        }
        let core = doc("api/v1");
        let service = schema(&core, "io.k8s.api.core.v1.Service");
        assert_eq!(
            service[GVK_EXT],
            json!([{ "group": "", "kind": "Service", "version": "v1" }])
        );
        for meta in [
            "DeleteOptions",
            "Status",
            "Patch",
            "WatchEvent",
            "ObjectMeta",
            "ListMeta",
        ] {
            schema(
                &core,
                &format!("io.k8s.apimachinery.pkg.apis.meta.v1.{meta}"),
            );
        }
        let discovery = doc("apis/discovery.k8s.io/v1");
        schema(&discovery, "io.k8s.api.discovery.v1.EndpointSlice");
        assert!(discovery["components"]["schemas"]
            .get("io.k8s.api.core.v1.Service")
            .is_none());
    }

    #[test]
    fn service_ports_merge_by_port() {
        let d = doc("api/v1");
        let service = schema(&d, "io.k8s.api.core.v1.Service");
        let spec = component(&d, &service["properties"]["spec"]);
        let ports = &spec["properties"]["ports"];
        assert_eq!(ports["type"], "array");
        assert_eq!(ports[MERGE_KEY_EXT], "port");
        assert_eq!(ports[STRATEGY_EXT], "merge");
        // Replaced lists carry no strategy.
        let external_ips = &spec["properties"]["externalIPs"];
        assert_eq!(external_ips["type"], "array");
        assert!(external_ips.get(STRATEGY_EXT).is_none());
        assert!(external_ips.get(MERGE_KEY_EXT).is_none());

        // The lists every kind shares.
        let meta = component(&d, &service["properties"]["metadata"]);
        assert_eq!(meta["properties"]["finalizers"][STRATEGY_EXT], "merge");
        assert!(meta["properties"]["finalizers"]
            .get(MERGE_KEY_EXT)
            .is_none());
        assert_eq!(meta["properties"]["ownerReferences"][MERGE_KEY_EXT], "uid");
        assert!(meta["properties"]["managedFields"]
            .get(STRATEGY_EXT)
            .is_none());
        let status = component(&d, &service["properties"]["status"]);
        assert_eq!(status["properties"]["conditions"][MERGE_KEY_EXT], "type");

        // Pod: through PodSpec into Container.
        let pod = schema(&d, "io.k8s.api.core.v1.Pod");
        let pod_spec = component(&d, &pod["properties"]["spec"]);
        assert_eq!(pod_spec["properties"]["containers"][MERGE_KEY_EXT], "name");
        assert!(pod_spec["properties"]["tolerations"]
            .get(STRATEGY_EXT)
            .is_none());
        let container = component(&d, &pod_spec["properties"]["containers"]["items"]);
        assert_eq!(container["properties"]["env"][MERGE_KEY_EXT], "name");
    }

    /// Every list property reachable from a kind declares exactly the
    /// server's strategy for that field path, unless kinds or paths sharing
    /// the schema disagree (then it declares none).
    #[test]
    fn extensions_match_the_resource_table() {
        let schemas = Schemas::generate();
        let expected = |strategy: Option<ListStrategy>| match strategy {
            None | Some(ListStrategy::Replace) => (None, None),
            Some(ListStrategy::MergePrimitives) => (None, Some("merge")),
            Some(ListStrategy::MergeByKey(key)) => (Some(key), Some("merge")),
        };
        let observed = observe(&schemas.defs, &schemas.kinds);
        assert!(
            observed.len() > 20,
            "walked {} list properties",
            observed.len()
        );
        let mut agreeing = 0;
        for ((component, pointer), observations) in &observed {
            let mut site = schemas.defs[component].clone();
            let site = at_mut(&mut site, pointer).unwrap();
            let declared = (
                site.get(MERGE_KEY_EXT).and_then(Value::as_str),
                site.get(STRATEGY_EXT).and_then(Value::as_str),
            );
            assert_eq!(
                declared,
                expected(decide(observations)),
                "{component} {pointer:?}"
            );
            // Where every path agrees, the declaration is exactly the
            // server's behaviour for each of them.
            if observations.iter().all(|(_, _, s)| *s == observations[0].2) {
                agreeing += 1;
                for (kind, path, strategy) in observations {
                    assert_eq!(declared, expected(Some(*strategy)), "{kind} {path}");
                }
            }
        }
        assert!(agreeing > 20);
        // Shallow paths win over embedded copies.
        let finalizers = &observed[&(
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".to_string(),
            vec!["properties".to_string(), "finalizers".to_string()],
        )];
        assert!(finalizers
            .iter()
            .any(|(_, p, _)| p == "metadata.finalizers"));
        assert_eq!(decide(finalizers), Some(ListStrategy::MergePrimitives));
    }

    #[test]
    fn decide_prefers_the_shallowest_paths() {
        let obs = |list: &[(&str, ListStrategy)]| -> Observations {
            list.iter()
                .map(|(p, s)| ("Pod", p.to_string(), *s))
                .collect()
        };
        use ListStrategy::*;
        assert_eq!(
            decide(&obs(&[
                ("metadata.finalizers", MergePrimitives),
                ("spec.a.b.metadata.finalizers", Replace)
            ])),
            Some(MergePrimitives)
        );
        assert_eq!(
            decide(&obs(&[
                ("spec.containers.ports", MergeByKey("containerPort")),
                ("spec.initContainers.ports", Replace)
            ])),
            None
        );
        assert_eq!(
            decide(&obs(&[("spec.ports", MergeByKey("port"))])),
            Some(MergeByKey("port"))
        );
        assert_eq!(decide(&obs(&[])), None);
    }

    #[test]
    fn patch_operations_accept_field_validation() {
        let d = doc("api/v1");
        let op = patch_op(&d, "/api/v1/namespaces/{namespace}/services/{name}");
        assert_eq!(op["operationId"], "patchCoreV1NamespacedService");
        assert_eq!(op["x-kubernetes-action"], "patch");
        assert_eq!(
            op[GVK_EXT],
            json!({ "group": "", "kind": "Service", "version": "v1" })
        );
        for name in ["dryRun", "fieldManager", "fieldValidation", "force"] {
            assert!(has_param(op, name), "{name}");
        }
        let content = op["requestBody"]["content"].as_object().unwrap();
        for media in PATCH_MEDIA_TYPES {
            assert_eq!(
                content[*media]["schema"]["$ref"],
                format!("{REF_PREFIX}io.k8s.apimachinery.pkg.apis.meta.v1.Patch")
            );
        }

        // kubectl stops at the first PATCH it finds for the kind, so every
        // one (including /status) must list the parameter.
        for r in RESOURCES.iter() {
            let d = doc(&doc_path(r.group, r.version));
            let gvk = json!({ "group": r.group, "kind": r.kind_name, "version": r.version });
            let patches: Vec<&Value> = d["paths"]
                .as_object()
                .unwrap()
                .values()
                .filter_map(|item| item.get("patch"))
                .filter(|op| op[GVK_EXT] == gvk)
                .collect();
            assert_eq!(
                patches.len(),
                if r.has_status { 2 } else { 1 },
                "{}",
                r.kind_name
            );
            for op in patches {
                assert!(has_param(op, "fieldValidation"), "{}", op["operationId"]);
            }
        }
    }

    #[test]
    fn paths_follow_kubernetes_layout() {
        let d = doc("api/v1");
        let paths = d["paths"].as_object().unwrap();
        let ids = |path: &str| -> Vec<(String, String)> {
            paths[path]
                .as_object()
                .unwrap_or_else(|| panic!("no path {path}"))
                .iter()
                .map(|(m, op)| (m.clone(), op["operationId"].as_str().unwrap().to_string()))
                .collect()
        };
        let has = |path: &str, method: &str, id: &str| {
            assert!(
                ids(path).contains(&(method.to_string(), id.to_string())),
                "{path} {method} {id}: {:?}",
                ids(path)
            )
        };
        has(
            "/api/v1/namespaces/{namespace}/services",
            "get",
            "listCoreV1NamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services",
            "post",
            "createCoreV1NamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services",
            "delete",
            "deleteCoreV1CollectionNamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services/{name}",
            "get",
            "readCoreV1NamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services/{name}",
            "put",
            "replaceCoreV1NamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services/{name}",
            "delete",
            "deleteCoreV1NamespacedService",
        );
        has(
            "/api/v1/namespaces/{namespace}/services/{name}/status",
            "patch",
            "patchCoreV1NamespacedServiceStatus",
        );
        has(
            "/api/v1/services",
            "get",
            "listCoreV1ServiceForAllNamespaces",
        );
        has("/api/v1/namespaces", "get", "listCoreV1Namespace");
        has("/api/v1/namespaces/{name}", "patch", "patchCoreV1Namespace");
        has(
            "/api/v1/namespaces/{name}/status",
            "put",
            "replaceCoreV1NamespaceStatus",
        );
        assert!(!paths.contains_key("/api/v1/namespaces/{namespace}/endpoints/{name}/status"));
        let d = doc("apis/discovery.k8s.io/v1");
        assert_eq!(
            d["paths"]["/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}"]
                ["patch"]["operationId"],
            "patchDiscoveryV1NamespacedEndpointSlice"
        );
        let list = &d["paths"]["/apis/discovery.k8s.io/v1/endpointslices"]["get"];
        assert_eq!(list["x-kubernetes-action"], "list");
        for name in [
            "labelSelector",
            "fieldSelector",
            "limit",
            "continue",
            "resourceVersion",
            "watch",
        ] {
            assert!(has_param(list, name), "{name}");
        }
    }

    /// Walks a document, checking every `$ref` resolves and that only
    /// OpenAPI 3.0 keywords appear in schemas.
    fn check(value: &Value, schemas: &Map<String, Value>, in_schema: bool, at: &str) {
        const SCHEMA_KEYWORDS: &[&str] = &[
            "$ref",
            "additionalProperties",
            "allOf",
            "anyOf",
            "oneOf",
            "not",
            "description",
            "enum",
            "format",
            "items",
            "properties",
            "required",
            "type",
            "nullable",
            "default",
            "example",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "pattern",
            "minItems",
            "maxItems",
            "uniqueItems",
            "title",
            "readOnly",
            "writeOnly",
        ];
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    assert_ne!(key, "$defs", "at {at}");
                    assert_ne!(key, "$schema", "at {at}");
                    let here = format!("{at}/{key}");
                    if key == "$ref" {
                        let target = child.as_str().unwrap().strip_prefix(REF_PREFIX);
                        let target = target.unwrap_or_else(|| panic!("foreign $ref at {here}"));
                        assert!(
                            schemas.contains_key(target),
                            "dangling $ref {target} at {here}"
                        );
                        continue;
                    }
                    if in_schema {
                        assert!(
                            SCHEMA_KEYWORDS.contains(&key.as_str()) || key.starts_with("x-"),
                            "keyword {key} at {at}"
                        );
                        if key == "type" {
                            assert!(child.is_string(), "type array at {here}");
                        }
                    }
                    match key.as_str() {
                        "properties" if in_schema => {
                            for (name, prop) in child.as_object().unwrap() {
                                check(prop, schemas, true, &format!("{here}/{name}"));
                            }
                        }
                        "schemas" if at == "/components" => {
                            for (name, s) in child.as_object().unwrap() {
                                check(s, schemas, true, &format!("{here}/{name}"));
                            }
                        }
                        "schema" | "items" | "additionalProperties" | "not" => {
                            check(child, schemas, child.is_object(), &here)
                        }
                        "allOf" | "anyOf" | "oneOf" => {
                            for s in child.as_array().unwrap() {
                                check(s, schemas, true, &here);
                            }
                        }
                        _ if key.starts_with("x-") || in_schema => {}
                        _ => check(child, schemas, false, &here),
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    check(item, schemas, false, at);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn documents_are_self_contained_openapi3() {
        for (group, version) in group_versions() {
            let d = doc(&doc_path(group, version));
            let schemas = d["components"]["schemas"].as_object().unwrap().clone();
            check(&d, &schemas, false, "");
            // Count every reference too, with a plain walk.
            let mut refs = Vec::new();
            collect_refs(&d, &mut refs);
            assert!(!refs.is_empty());
            for r in refs {
                assert!(schemas.contains_key(&r), "dangling {r}");
            }
            assert!(
                !String::from_utf8_lossy(document(&doc_path(group, version)).unwrap())
                    .contains("\"$defs\"")
            );
        }
    }

    #[test]
    fn documents_are_stable() {
        let a = Schemas::generate();
        let b = Schemas::generate();
        for (group, version) in group_versions() {
            assert_eq!(
                build_document(&a, group, version),
                build_document(&b, group, version)
            );
        }
    }

    #[test]
    fn names() {
        assert_eq!(group_id(""), "Core");
        assert_eq!(group_id("discovery.k8s.io"), "Discovery");
        assert_eq!(group_id("rbac.authorization.k8s.io"), "RbacAuthorization");
        assert_eq!(tag("coordination.k8s.io", "v1"), "coordination_v1");
        assert_eq!(hash(b""), "CBF29CE484222325");
    }
}
