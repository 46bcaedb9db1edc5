//! The object layer between HTTP and the store: create, update, delete and
//! read one object of any kind, with Kubernetes' rules for server-owned
//! metadata, kind-specific hooks (see [`hooks`](super::hooks)), and Service
//! address allocation in the same transaction as the object.
//!
//! HTTP handlers (`rest`) and internal callers (bootstrap, namespace
//! finalizer) both go through here, so the rules hold for every writer.

use serde_json::{json, Value};

use crate::api::meta::{self, meta_mut, meta_str};
use crate::api::resources::{self, Kind, ResourceDef};
use crate::api::status::ApiError;
use crate::store::{Compare, KeyValue, Revision, Txn, TxnOutcome};

use super::alloc;
use super::hooks;
use super::Server;

/// Decode a stored value, stamping `metadata.resourceVersion` (which is not
/// stored: it is the key's modification revision, as in Kubernetes).
pub fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("corrupt object at {}: {e}", kv.key)))?;
    meta_mut(&mut v).insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    Ok(v)
}

/// Encode an object for storage (without its resourceVersion).
pub fn encode(obj: &Value) -> Vec<u8> {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&o).expect("JSON values always serialize")
}

/// Options shared by writes.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    /// Who asks, for RBAC's escalation check on roles and bindings
    /// (`None`: the server's own writes).
    pub requester: Option<super::Identity>,
    pub dry_run: bool,
    /// `fieldValidation`: Strict, Warn (default) or Ignore.
    pub field_validation: String,
}

/// The result of a write: the object as stored and warnings for the client.
pub struct Written {
    pub obj: Value,
    pub warnings: Vec<String>,
}

/// Which keys of `new` were dropped by the typed round trip: the unknown
/// fields, as dotted paths.
fn unknown_fields(input: &Value, normalized: &Value, path: &str, out: &mut Vec<String>) {
    match (input, normalized) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    None if !v.is_null() => out.push(p),
                    Some(nv) => unknown_fields(v, nv, &p, out),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Decode `obj` through the kind's typed struct: shape errors become 400,
/// unknown fields 400 (Strict) or warnings (Warn).
pub fn normalize(def: &ResourceDef, obj: Value, opts: &WriteOpts) -> Result<Written, ApiError> {
    let normalized = (def.normalize)(obj.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            def.kind_name, def.version, def.kind_name
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&obj, &normalized, "", &mut unknown);
    let mut warnings = Vec::new();
    if !unknown.is_empty() {
        let msgs: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        match opts.field_validation.as_str() {
            "Strict" => {
                return Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    msgs.join(", ")
                )))
            }
            "Ignore" => {}
            _ => warnings = msgs,
        }
    }
    Ok(Written {
        obj: normalized,
        warnings,
    })
}

fn check_type_meta(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the object must be a JSON object",
            def.kind_name, def.version, def.kind_name
        )));
    }
    match obj.get("apiVersion").and_then(Value::as_str) {
        Some(v) if !v.is_empty() && v != def.api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                def.api_version
            )))
        }
        _ => obj["apiVersion"] = json!(def.api_version),
    }
    match obj.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k != def.kind_name => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind_name
            )))
        }
        _ => obj["kind"] = json!(def.kind_name),
    }
    Ok(())
}

/// Fills or checks the namespace of a namespaced object against the URL.
fn check_namespace(def: &ResourceDef, obj: &mut Value, ns: Option<&str>) -> Result<(), ApiError> {
    if !def.namespaced {
        meta_mut(obj).remove("namespace");
        return Ok(());
    }
    let ns =
        ns.ok_or_else(|| ApiError::bad_request("a namespace is required for this resource"))?;
    match meta_str(obj, "namespace") {
        Some(n) if !n.is_empty() && n != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta_mut(obj).insert("namespace".into(), json!(ns));
            Ok(())
        }
    }
}

impl Server {
    /// Read one object (404 if missing).
    pub async fn get_object(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
    ) -> Result<(Value, Revision), ApiError> {
        let kv = self
            .store
            .get(&def.key(ns, name))
            .await?
            .ok_or_else(|| ApiError::not_found(&resource_ref(def), name))?;
        Ok((decode(&kv)?, kv.mod_revision))
    }

    /// Ensure the namespace exists and accepts new objects.
    async fn check_namespace_open(&self, ns: &str) -> Result<(), ApiError> {
        let nsdef = resources::by_kind(Kind::Namespace);
        let (obj, _) = self.get_object(nsdef, None, ns).await?;
        if obj
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            let mut e = ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ));
            e.details = Some(json!({"name": ns, "kind": "namespaces",
                "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}));
            return Err(e);
        }
        Ok(())
    }

    /// Create an object. `ns` is the namespace from the URL.
    pub async fn create_object(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        check_type_meta(def, &mut obj)?;
        check_namespace(def, &mut obj, ns)?;
        let Written { mut obj, warnings } = normalize(def, obj, opts)?;
        // Server-owned metadata.
        let m = meta_mut(&mut obj);
        if m.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            match m.get("generateName").and_then(Value::as_str) {
                Some(g) if !g.is_empty() => {
                    let name = format!("{g}{}", meta::random_suffix());
                    m.insert("name".into(), json!(name));
                }
                _ => {
                    return Err(ApiError::invalid(
                        def.kind_name,
                        "",
                        vec![crate::api::status::FieldError::required(
                            "metadata.name",
                            "name or generateName is required",
                        )],
                    ))
                }
            }
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(meta::now()));
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("managedFields");
        m.remove("selfLink");
        if obj.get("spec").is_some() {
            meta_mut(&mut obj).insert("generation".into(), json!(1));
        }
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if def.kind != Kind::Namespace {
            if let Some(ns) = ns.filter(|_| def.namespaced) {
                self.check_namespace_open(ns).await?;
            }
        }
        self.check_escalation(def, ns, &obj, opts)?;
        super::authz::node_restriction(def, ns, &obj, opts)?;
        hooks::before_create(self, def, &mut obj)?;
        let key = def.key(ns, &name);
        // Allocation retries: a randomly picked address may be taken by a
        // concurrent create (possibly on another API server); pick again.
        for _ in 0..16 {
            let plan = alloc::plan_create(self, def, &mut obj).await?;
            if opts.dry_run {
                if self.store.get(&key).await?.is_some() {
                    return Err(ApiError::already_exists(&resource_ref(def), &name));
                }
                return Ok(Written { obj, warnings });
            }
            let txn = plan.apply(
                Txn::new()
                    .when(Compare::Absent(key.clone()))
                    .put(&key, encode(&obj)),
            );
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision, .. } => {
                    meta_mut(&mut obj)
                        .insert("resourceVersion".into(), json!(revision.to_string()));
                    return Ok(Written { obj, warnings });
                }
                TxnOutcome::Failed { failed } => {
                    if failed.iter().any(|(c, _)| c.key() == key) {
                        return Err(ApiError::already_exists(&resource_ref(def), &name));
                    }
                    plan.conflict(def, &name, &failed)?;
                    alloc::clear_dynamic(&plan, &mut obj);
                }
            }
        }
        Err(ApiError::internal("could not allocate after 16 attempts"))
    }

    /// Replace an object. `expected`: the revision the caller based its
    /// change on (None = unconditional). `sub`: "status" to change only the
    /// status. On a stale revision returns 409.
    pub async fn update_object(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        name: &str,
        new: Value,
        sub: Option<&str>,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut new = new;
        check_type_meta(def, &mut new)?;
        check_namespace(def, &mut new, ns)?;
        match meta_str(&new, "name") {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )))
            }
            _ => {
                meta_mut(&mut new).insert("name".into(), json!(name));
            }
        }
        let expected: Option<Revision> =
            match meta_str(&new, "resourceVersion") {
                None | Some("") => None,
                Some(rv) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
            };
        let key = def.key(ns, name);
        let Written {
            obj: normalized,
            warnings,
        } = normalize(def, new, opts)?;
        loop {
            let Some(kv) = self.store.get(&key).await? else {
                if def.create_on_update && sub.is_none() && expected.is_none() {
                    return self.create_object(def, ns, normalized, opts).await;
                }
                return Err(ApiError::not_found(&resource_ref(def), name));
            };
            if expected.is_some_and(|e| e != kv.mod_revision) {
                return Err(ApiError::stale(&resource_ref(def), name));
            }
            let old = decode(&kv)?;
            match self
                .write_update(def, ns, name, &kv, old, normalized.clone(), sub, opts)
                .await?
            {
                Some(mut w) => {
                    w.warnings.extend(warnings);
                    return Ok(w);
                }
                // Raced with another writer; with no precondition from the
                // client, retry against the new version.
                None if expected.is_none() => continue,
                None => return Err(ApiError::stale(&resource_ref(def), name)),
            }
        }
    }

    /// Apply `new` over the stored `kv` (already decoded as `old`). Returns
    /// None when the object changed underneath (CAS failed).
    #[allow(clippy::too_many_arguments)]
    pub async fn write_update(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        name: &str,
        kv: &KeyValue,
        old: Value,
        new: Value,
        sub: Option<&str>,
        opts: &WriteOpts,
    ) -> Result<Option<Written>, ApiError> {
        let mut new = new;
        // The main resource cannot change status, and /status only changes
        // status (kinds with a status subresource).
        if def.has_status {
            if sub == Some("status") {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        new.as_object_mut().unwrap().remove("status");
                    }
                }
            } else {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut().unwrap().remove("status");
                    }
                }
            }
        }
        // Server-owned metadata is kept from the stored object.
        {
            let om = old.get("metadata").cloned().unwrap_or(json!({}));
            let m = meta_mut(&mut new);
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match om.get(f) {
                    Some(v) => {
                        m.insert(f.into(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
            m.remove("managedFields");
            m.remove("selfLink");
            m.remove("resourceVersion");
        }
        super::authz::node_restriction(def, ns, &new, opts)?;
        if sub != Some("status") {
            self.check_escalation(def, ns, &new, opts)?;
            hooks::before_update(self, def, &old, &mut new)?;
        }
        if new.get("spec") != old.get("spec") && new.get("spec").is_some() {
            let gen = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(gen + 1));
        }
        let mut old_cmp = old.clone();
        meta_mut(&mut old_cmp).remove("resourceVersion");
        if old_cmp == new {
            // Nothing changed: no write, the resourceVersion stays (kubectl
            // apply of an unchanged file must not churn watches).
            return Ok(Some(Written {
                obj: old,
                warnings: Vec::new(),
            }));
        }
        let key = def.key(ns, name);
        // A terminating object whose last finalizer is gone is deleted.
        let finalizers_empty = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty());
        // (A Pod in its grace period stays until its node deletes it.)
        let terminating = new
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
            && new
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0;
        if terminating && finalizers_empty && !opts.dry_run {
            let plan = alloc::plan_release(def, &old);
            let txn = plan.apply(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .delete(&key),
            );
            return match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision, .. } => {
                    meta_mut(&mut new)
                        .insert("resourceVersion".into(), json!(revision.to_string()));
                    Ok(Some(Written {
                        obj: new,
                        warnings: Vec::new(),
                    }))
                }
                TxnOutcome::Failed { .. } => Ok(None),
            };
        }
        for _ in 0..16 {
            let plan = alloc::plan_update(self, def, &old, &mut new).await?;
            if opts.dry_run {
                return Ok(Some(Written {
                    obj: new,
                    warnings: Vec::new(),
                }));
            }
            let txn = plan.apply(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .put(&key, encode(&new)),
            );
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision, .. } => {
                    meta_mut(&mut new)
                        .insert("resourceVersion".into(), json!(revision.to_string()));
                    return Ok(Some(Written {
                        obj: new,
                        warnings: Vec::new(),
                    }));
                }
                TxnOutcome::Failed { failed } => {
                    if failed.iter().any(|(c, _)| c.key() == key) {
                        return Ok(None);
                    }
                    plan.conflict(def, name, &failed)?;
                    alloc::clear_dynamic(&plan, &mut new);
                }
            }
        }
        Err(ApiError::internal("could not allocate after 16 attempts"))
    }

    /// Delete an object: with finalizers (or a namespace) it is only marked
    /// for deletion; otherwise it is removed with its allocations. Returns
    /// the object as last seen.
    pub async fn delete_object(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        name: &str,
        preconditions: (Option<String>, Option<String>),
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let opts = DeleteOpts {
            preconditions,
            dry_run,
            ..Default::default()
        };
        self.delete_object_with_grace(def, ns, name, opts).await
    }

    /// [`Self::delete_object`] with DeleteOptions' `gracePeriodSeconds`.
    /// A Pod that runs on a node (bound, not finished) is deleted
    /// gracefully, as kube-apiserver does: it gets a `deletionTimestamp`
    /// `grace` seconds ahead (default: its terminationGracePeriodSeconds)
    /// and stays until its node has stopped it and deletes it with grace
    /// 0. A second deletion may only shorten the grace period.
    pub async fn delete_object_with_grace(
        &self,
        def: &'static ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: DeleteOpts,
    ) -> Result<Value, ApiError> {
        let DeleteOpts {
            preconditions,
            dry_run,
            grace,
            propagation,
        } = opts;
        if grace.is_some_and(|g| g < 0) {
            return Err(ApiError::bad_request(
                "gracePeriodSeconds must be 0 or more",
            ));
        }
        let key = def.key(ns, name);
        loop {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(ApiError::not_found(&resource_ref(def), name));
            };
            let mut obj = decode(&kv)?;
            if let Some(uid) = &preconditions.0 {
                let have = meta_str(&obj, "uid").unwrap_or("");
                if have != uid {
                    return Err(ApiError::conflict(
                        &resource_ref(def),
                        name,
                        &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                    ));
                }
            }
            if let Some(rv) = &preconditions.1 {
                if *rv != kv.mod_revision.to_string() {
                    return Err(ApiError::conflict(
                        &resource_ref(def),
                        name,
                        &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                            kv.mod_revision
                        ),
                    ));
                }
            }
            let has_finalizers = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            // Orphan and Foreground hand the object to the garbage
            // collector through a finalizer: it orphans or deletes the
            // dependents, then removes the finalizer, which deletes it.
            let gc_finalizer = propagation.finalizer();
            let graceful = def.kind == Kind::Namespace || has_finalizers || gc_finalizer.is_some();
            if dry_run {
                return Ok(obj);
            }
            if let Some(secs) = pod_grace(def, &obj, grace) {
                let deadline = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
                let marked = obj
                    .pointer("/metadata/deletionTimestamp")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok());
                // Already terminating, no sooner than asked: as it is.
                if marked.is_some_and(|m| m <= deadline) {
                    return Ok(obj);
                }
                let m = meta_mut(&mut obj);
                m.insert(
                    "deletionTimestamp".into(),
                    json!(deadline.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                );
                m.insert("deletionGracePeriodSeconds".into(), json!(secs));
                let txn = Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .put(&key, encode(&obj));
                match self.store.txn(txn).await? {
                    TxnOutcome::Committed { revision, .. } => {
                        meta_mut(&mut obj)
                            .insert("resourceVersion".into(), json!(revision.to_string()));
                        return Ok(obj);
                    }
                    TxnOutcome::Failed { .. } => continue,
                }
            }
            if graceful {
                if obj
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    return Ok(obj);
                }
                meta_mut(&mut obj).insert("deletionTimestamp".into(), json!(meta::now()));
                meta_mut(&mut obj).insert("deletionGracePeriodSeconds".into(), json!(0));
                if let Some(f) = gc_finalizer {
                    let list = meta_mut(&mut obj)
                        .entry("finalizers")
                        .or_insert_with(|| json!([]));
                    if !list.is_array() {
                        *list = json!([]);
                    }
                    let list = list.as_array_mut().expect("an array");
                    if !list.iter().any(|x| x == f) {
                        list.push(json!(f));
                    }
                }
                if def.kind == Kind::Namespace {
                    obj["status"]["phase"] = json!("Terminating");
                }
                let txn = Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .put(&key, encode(&obj));
                match self.store.txn(txn).await? {
                    TxnOutcome::Committed { revision, .. } => {
                        meta_mut(&mut obj)
                            .insert("resourceVersion".into(), json!(revision.to_string()));
                        if def.kind == Kind::Namespace {
                            self.spawn_namespace_finalizer(name.to_string());
                        }
                        return Ok(obj);
                    }
                    TxnOutcome::Failed { .. } => continue,
                }
            }
            let plan = alloc::plan_release(def, &obj);
            let txn = plan.apply(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .delete(&key),
            );
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision, .. } => {
                    meta_mut(&mut obj)
                        .insert("resourceVersion".into(), json!(revision.to_string()));
                    return Ok(obj);
                }
                TxnOutcome::Failed { .. } if preconditions.1.is_none() => continue,
                TxnOutcome::Failed { .. } => return Err(ApiError::stale(&resource_ref(def), name)),
            }
        }
    }

    /// Deletes everything in a terminating namespace, then the namespace.
    pub fn spawn_namespace_finalizer(&self, ns: String) {
        let srv = self.clone();
        tokio::spawn(async move {
            if let Err(e) = srv.finalize_namespace(&ns).await {
                tracing::warn!(namespace = %ns, error = %e, "namespace finalization failed");
            }
        });
    }

    async fn finalize_namespace(&self, ns: &str) -> Result<(), ApiError> {
        for def in resources::RESOURCES.iter().filter(|d| d.namespaced) {
            let page = self.store.list_all(&def.prefix(Some(ns))).await?;
            for kv in page.kvs {
                let name = kv.key.rsplit('/').next().unwrap_or("").to_string();
                // Objects with finalizers are only marked; their owners
                // finish them.
                match self
                    .delete_object(def, Some(ns), &name, (None, None), false)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let nsdef = resources::by_kind(Kind::Namespace);
        let key = nsdef.key(None, ns);
        loop {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(());
            };
            let obj = decode(&kv)?;
            let finalizers = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            let txn = if finalizers {
                // Only the spec finalizer is ours; metadata finalizers belong
                // to other controllers.
                let mut o = obj.clone();
                o["spec"]["finalizers"] = json!([]);
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .put(&key, encode(&o))
            } else {
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .delete(&key)
            };
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                return Ok(());
            }
        }
    }
}

/// How Kubernetes names a resource in messages: `services`, or
/// `endpointslices.discovery.k8s.io` for grouped resources.
pub fn resource_ref(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        def.plural.to_string()
    } else {
        format!("{}.{}", def.plural, def.group)
    }
}

impl Server {
    /// `POST pods/<name>/binding`: assign a Pod to a Node (what a scheduler
    /// does). Sets `spec.nodeName` if the Pod has none (409 if it is bound
    /// already), then marks it `PodScheduled`. Returns the Status to send.
    pub async fn bind_pod(
        &self,
        ns: &str,
        name: &str,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        use crate::api::status::FieldError;
        let def = resources::find("", "v1", "pods").expect("pods are served");
        let target = body
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut errs = Vec::new();
        if target.is_empty() {
            errs.push(FieldError::required("target.name", ""));
        }
        match body.pointer("/target/kind").and_then(Value::as_str) {
            None | Some("") | Some("Node") => {}
            Some(k) => errs.push(FieldError::not_supported("target.kind", k, &["Node"])),
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid("Binding", name, errs));
        }
        let key = def.key(Some(ns), name);
        loop {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(ApiError::not_found("pods", name));
            };
            let old = decode(&kv)?;
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::conflict(
                    "pods/binding",
                    name,
                    &format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            match old.pointer("/spec/nodeName").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => {
                    return Err(ApiError::conflict(
                        "pods/binding",
                        name,
                        &format!("pod {name} is already assigned to node {n:?}"),
                    ))
                }
                _ => {}
            }
            let mut new = old.clone();
            new["spec"]["nodeName"] = json!(target);
            if self
                .write_update(def, Some(ns), name, &kv, old, new, None, opts)
                .await?
                .is_some()
            {
                break;
            }
            // Raced with another writer: look again.
        }
        // PodScheduled, as the scheduler's binding reports it.
        loop {
            let Some(kv) = self.store.get(&key).await? else {
                break;
            };
            let old = decode(&kv)?;
            let mut new = old.clone();
            let now = jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let cond = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                "lastTransitionTime": now});
            let status = new["status"].as_object_mut();
            let Some(status) = status else { break };
            let conds = status.entry("conditions").or_insert_with(|| json!([]));
            let Some(list) = conds.as_array_mut() else {
                break;
            };
            list.retain(|c| c["type"] != "PodScheduled");
            list.push(cond);
            if self
                .write_update(def, Some(ns), name, &kv, old, new, Some("status"), opts)
                .await?
                .is_some()
            {
                break;
            }
        }
        Ok(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "code": 201}))
    }
}

/// The grace period a Pod's deletion gets, or `None` when it is deleted at
/// once: not a Pod, not bound to a node, finished, or grace 0.
fn pod_grace(def: &ResourceDef, obj: &Value, asked: Option<i64>) -> Option<i64> {
    if def.kind != Kind::Pod {
        return None;
    }
    let bound = obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        obj.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !bound || finished {
        return None;
    }
    let secs = asked
        .or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    (secs > 0).then_some(secs)
}

/// DeleteOptions as [`Server::delete_object_with_grace`] takes them.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    /// uid and resourceVersion the object must still have.
    pub preconditions: (Option<String>, Option<String>),
    pub dry_run: bool,
    /// `gracePeriodSeconds` (pods).
    pub grace: Option<i64>,
    pub propagation: Propagation,
}

/// DeleteOptions' `propagationPolicy`: what happens to an object's
/// dependents (objects whose ownerReferences name it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    /// Delete the object now; the garbage collector deletes the
    /// dependents afterwards.
    #[default]
    Background,
    /// The dependents are deleted first (finalizer `foregroundDeletion`).
    Foreground,
    /// The dependents lose their owner reference and stay (finalizer
    /// `orphan`).
    Orphan,
}

/// The finalizer of foreground deletion.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
/// The finalizer of orphaning deletion.
pub const ORPHAN_FINALIZER: &str = "orphan";

impl Propagation {
    /// From DeleteOptions (`propagationPolicy`, or the older
    /// `orphanDependents`).
    pub fn from_options(opts: &Value) -> Result<Propagation, ApiError> {
        match opts.get("propagationPolicy").and_then(Value::as_str) {
            Some("Background") => Ok(Propagation::Background),
            Some("Foreground") => Ok(Propagation::Foreground),
            Some("Orphan") => Ok(Propagation::Orphan),
            Some(other) => Err(ApiError::invalid(
                "DeleteOptions",
                "",
                vec![crate::api::status::FieldError::not_supported(
                    "propagationPolicy",
                    other,
                    &["Foreground", "Background", "Orphan", "nil"],
                )],
            )),
            None if opts.get("orphanDependents") == Some(&json!(true)) => Ok(Propagation::Orphan),
            None => Ok(Propagation::Background),
        }
    }

    fn finalizer(self) -> Option<&'static str> {
        match self {
            Propagation::Background => None,
            Propagation::Foreground => Some(FOREGROUND_FINALIZER),
            Propagation::Orphan => Some(ORPHAN_FINALIZER),
        }
    }
}
