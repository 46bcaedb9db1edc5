//! Application of the three Kubernetes PATCH content types to a JSON object.
//!
//! The API server accepts `PATCH` requests in three flavours, chosen by the
//! request's `Content-Type`:
//!
//! * `application/merge-patch+json` — RFC 7386 JSON merge patch ([`merge_patch`]);
//! * `application/json-patch+json` — RFC 6902 JSON patch ([`json_patch`]);
//! * `application/strategic-merge-patch+json` — the Kubernetes strategic merge
//!   patch ([`strategic_merge_patch`]), which is what `kubectl apply`,
//!   `kubectl edit` and most controllers send.
//!
//! All three take the stored object and the patch body as [`Value`]s and return
//! the patched object; they never mutate their inputs. Failures are reported as
//! [`PatchError`], whose variants map onto the HTTP status the API server
//! returns (400 for a malformed patch, 422 for a patch that cannot be applied).
//!
//! Strategic merge patch needs to know, for every list field, whether the list
//! is replaced wholesale, merged element-wise by a merge key, or treated as a
//! set of primitives. That knowledge lives in the type schemas, so the caller
//! supplies it as a callback ([`ListStrategy`]) keyed by the dotted field path
//! without list indices (e.g. `spec.containers.env`).
//!
//! Object key order is preserved (the crate is built with serde_json's
//! `preserve_order`), and merged lists keep original elements in place and
//! append new ones in patch order, so repeated `kubectl apply` runs produce
//! stable output.

use serde_json::{Map, Value};

/// Patch directive key: `$patch: replace | delete | merge`.
const PATCH_DIRECTIVE: &str = "$patch";
/// Patch directive key: `$retainKeys: [..]`.
const RETAIN_KEYS: &str = "$retainKeys";
/// Prefix of `$deleteFromPrimitiveList/<field>: [..]`.
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
/// Prefix of `$setElementOrder/<field>: [..]`.
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// How a list field is merged by strategic merge patch.
///
/// Kubernetes declares this per field (`patchStrategy` / `patchMergeKey` in
/// the Go types); the caller maps field paths to it because this module has no
/// schema knowledge of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    /// The patch list replaces the original list wholesale (the default for
    /// lists without a declared patch strategy).
    Replace,
    /// Elements are objects identified by the named key (e.g. `name` for
    /// containers, `port` for Service ports); patch elements are merged into
    /// the original element with the same key, new ones are appended.
    MergeByKey(&'static str),
    /// Elements are primitives (e.g. `metadata.finalizers`); the result is the
    /// order-preserving union of original and patch.
    MergePrimitives,
}

/// Why a patch could not be applied; each variant maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch document itself is malformed (wrong JSON shape, unknown
    /// directive, missing merge key, ...). Maps to HTTP 400 Bad Request.
    #[error("invalid patch: {0}")]
    Invalid(String),
    /// The patch is well formed but cannot be applied to this object: a
    /// json-patch `test` operation failed or an operation's path does not
    /// exist. Maps to HTTP 422 Unprocessable Entity.
    #[error("patch could not be applied: {0}")]
    TestFailed(String),
}

/// Applies an `application/merge-patch+json` (RFC 7386) patch.
///
/// Exists for clients that send plain merge patches (e.g. `kubectl patch
/// --type=merge`, custom resources, which do not support strategic merge).
/// Objects merge recursively, `null` deletes a key, and every other value
/// (including lists) replaces the original wholesale. The patch must be a JSON
/// object, as Kubernetes requires.
pub fn merge_patch(orig: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_object() {
        return Err(PatchError::Invalid(format!(
            "merge patch must be a JSON object, got {}",
            type_name(patch)
        )));
    }
    let mut doc = orig.clone();
    apply_merge_patch(&mut doc, patch);
    Ok(doc)
}

/// RFC 7386 `MergePatch(Target, Patch)`, in place.
fn apply_merge_patch(doc: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if let Value::Object(map) = doc {
        for (key, value) in patch {
            if value.is_null() {
                // shift_remove keeps the order of the remaining keys.
                map.shift_remove(key);
            } else {
                apply_merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Applies an `application/json-patch+json` (RFC 6902) patch.
///
/// Exists for clients that need precise operations (`kubectl patch
/// --type=json`, optimistic `test` guards). A body that is not a valid list of
/// operations is [`PatchError::Invalid`]; an operation that fails against the
/// object (failed `test`, missing path) is [`PatchError::TestFailed`]. The
/// patch is applied atomically: on failure nothing is returned.
pub fn json_patch(orig: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_array() {
        return Err(PatchError::Invalid(format!(
            "JSON patch must be a JSON array of operations, got {}",
            type_name(patch)
        )));
    }
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::Invalid(format!("malformed JSON patch: {e}")))?;
    let mut doc = orig.clone();
    json_patch::patch(&mut doc, &ops).map_err(|e| PatchError::TestFailed(e.to_string()))?;
    Ok(doc)
}

/// Applies an `application/strategic-merge-patch+json` patch.
///
/// Exists because `kubectl apply`/`edit` and many controllers send strategic
/// merge patches, whose list handling depends on per-field strategies.
/// `strategy(path)` is called with the dotted path of each list field without
/// list indices (e.g. `spec.ports`, `spec.containers.env`,
/// `metadata.finalizers`) and says how that list merges.
///
/// Semantics follow Kubernetes apimachinery: maps merge recursively, `null`
/// deletes a key, lists merge per [`ListStrategy`], and the directives
/// `$patch` (`replace`/`delete`/`merge`), `$retainKeys`,
/// `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` are
/// honoured and never appear in the output.
pub fn strategic_merge_patch(
    orig: &Value,
    patch: &Value,
    strategy: &dyn Fn(&str) -> ListStrategy,
) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::Invalid(format!(
            "strategic merge patch must be a JSON object, got {}",
            type_name(patch)
        )));
    };
    let orig = orig.as_object().cloned().unwrap_or_default();
    let merger = Strategic { strategy };
    Ok(Value::Object(merger.merge_map(orig, patch, "")?))
}

/// Strategic merge state: just the caller's list-strategy lookup.
struct Strategic<'a> {
    strategy: &'a dyn Fn(&str) -> ListStrategy,
}

impl Strategic<'_> {
    /// Merges `patch` into `orig` (or into nothing, which strips directives
    /// and `null`s from the patch value when the original lacks the field).
    fn merge_value(
        &self,
        orig: Option<Value>,
        patch: &Value,
        path: &str,
    ) -> Result<Value, PatchError> {
        match (orig, patch) {
            (Some(Value::Object(orig)), Value::Object(patch)) => {
                Ok(Value::Object(self.merge_map(orig, patch, path)?))
            }
            (Some(Value::Array(orig)), Value::Array(patch)) => {
                Ok(Value::Array(self.merge_list(orig, patch, path)?))
            }
            (_, Value::Object(patch)) => {
                Ok(Value::Object(self.merge_map(Map::new(), patch, path)?))
            }
            (_, Value::Array(patch)) => {
                Ok(Value::Array(self.merge_list(Vec::new(), patch, path)?))
            }
            (_, scalar) => Ok(scalar.clone()),
        }
    }

    /// Merges a patch map into an original map at `path`.
    fn merge_map(
        &self,
        mut orig: Map<String, Value>,
        patch: &Map<String, Value>,
        path: &str,
    ) -> Result<Map<String, Value>, PatchError> {
        match patch.get(PATCH_DIRECTIVE) {
            None => {}
            Some(Value::String(d)) if d == "merge" => {}
            Some(Value::String(d)) if d == "replace" => {
                // Replace the whole map with the patch (minus the directive);
                // merging into an empty map strips nested directives/nulls.
                let mut replacement = patch.clone();
                replacement.shift_remove(PATCH_DIRECTIVE);
                return self.merge_map(Map::new(), &replacement, path);
            }
            Some(Value::String(d)) if d == "delete" => return Ok(Map::new()),
            Some(other) => {
                return Err(PatchError::Invalid(format!(
                    "unknown $patch directive {other} at {}",
                    display_path(path)
                )));
            }
        }

        let retain_keys = match patch.get(RETAIN_KEYS) {
            None => None,
            Some(Value::Array(keys)) => Some(
                keys.iter()
                    .map(|k| {
                        k.as_str().map(str::to_owned).ok_or_else(|| {
                            PatchError::Invalid(format!(
                                "$retainKeys at {} must be a list of strings, found {k}",
                                display_path(path)
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(PatchError::Invalid(format!(
                    "$retainKeys at {} must be a list, got {}",
                    display_path(path),
                    type_name(other)
                )));
            }
        };

        // $deleteFromPrimitiveList applies to the original before the merge,
        // so a value both deleted and added by the same patch ends up present.
        for (key, value) in patch {
            let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) else {
                continue;
            };
            let field_path = join(path, field);
            let to_delete = directive_list(key, value, &field_path)?;
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                list.retain(|item| !to_delete.contains(item));
            }
        }

        for (key, value) in patch {
            if is_directive(key) {
                continue;
            }
            if value.is_null() {
                orig.shift_remove(key);
                continue;
            }
            let child_path = join(path, key);
            match orig.get_mut(key) {
                Some(slot) => {
                    let existing = std::mem::take(slot);
                    *slot = self.merge_value(Some(existing), value, &child_path)?;
                }
                None => {
                    let merged = self.merge_value(None, value, &child_path)?;
                    orig.insert(key.clone(), merged);
                }
            }
        }

        for (key, value) in patch {
            let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER) else {
                continue;
            };
            let field_path = join(path, field);
            let order = directive_list(key, value, &field_path)?;
            let strategy = (self.strategy)(&field_path);
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                let items = std::mem::take(list);
                *list = reorder(items, order, strategy, &field_path)?;
            }
        }

        if let Some(keys) = retain_keys {
            orig.retain(|k, _| keys.iter().any(|r| r == k));
        }
        Ok(orig)
    }

    /// Merges a patch list into an original list at `path`.
    fn merge_list(
        &self,
        orig: Vec<Value>,
        patch: &[Value],
        path: &str,
    ) -> Result<Vec<Value>, PatchError> {
        // A `{"$patch": "replace"}` element replaces the list with the other
        // (non-directive) elements.
        if patch
            .iter()
            .any(|e| element_directive(e) == Some("replace"))
        {
            let rest: Vec<Value> = patch
                .iter()
                .filter(|e| element_directive(e).is_none())
                .cloned()
                .collect();
            return self.merge_list(Vec::new(), &rest, path);
        }

        match (self.strategy)(path) {
            ListStrategy::Replace => patch
                .iter()
                .map(|e| self.merge_value(None, e, path))
                .collect(),
            ListStrategy::MergePrimitives => {
                let mut out = orig;
                for item in patch {
                    if element_directive(item).is_some() {
                        return Err(PatchError::Invalid(format!(
                            "$patch directive is not supported in primitive list {}; \
                             use $deleteFromPrimitiveList",
                            display_path(path)
                        )));
                    }
                    let item = self.merge_value(None, item, path)?;
                    if !out.contains(&item) {
                        out.push(item);
                    }
                }
                Ok(out)
            }
            ListStrategy::MergeByKey(key) => {
                let mut out = orig;
                for item in patch {
                    let key_value = merge_key_value(item, key, path)?;
                    let matches = |o: &Value| o.get(key) == Some(key_value);
                    if element_directive(item) == Some("delete") {
                        out.retain(|o| !matches(o));
                        continue;
                    }
                    match out.iter().position(matches) {
                        Some(pos) => {
                            let existing = std::mem::take(&mut out[pos]);
                            out[pos] = self.merge_value(Some(existing), item, path)?;
                        }
                        None => out.push(self.merge_value(None, item, path)?),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Reorders a merged list per `$setElementOrder`: elements named in `order`
/// come first in that order, the rest keep their relative order after them.
fn reorder(
    items: Vec<Value>,
    order: &[Value],
    strategy: ListStrategy,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    let key = match strategy {
        // Replaced lists already have the patch's order.
        ListStrategy::Replace => return Ok(items),
        ListStrategy::MergeByKey(key) => Some(key),
        ListStrategy::MergePrimitives => None,
    };
    let mut remaining: Vec<Option<Value>> = items.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(remaining.len());
    for wanted in order {
        let wanted = match key {
            Some(key) => merge_key_value(wanted, key, path)?,
            None => wanted,
        };
        for slot in remaining.iter_mut() {
            let hit = match (slot.as_ref(), key) {
                (Some(item), Some(key)) => item.get(key) == Some(wanted),
                (Some(item), None) => item == wanted,
                (None, _) => false,
            };
            if hit {
                out.extend(slot.take());
            }
        }
    }
    out.extend(remaining.into_iter().flatten());
    Ok(out)
}

/// The merge-key value of a patch element of a merge-by-key list, or a clear
/// error when the element is not an object or lacks the key.
fn merge_key_value<'v>(item: &'v Value, key: &str, path: &str) -> Result<&'v Value, PatchError> {
    let Value::Object(obj) = item else {
        return Err(PatchError::Invalid(format!(
            "list {} merges by key {key:?}, but an element is {}, not an object: {item}",
            display_path(path),
            type_name(item)
        )));
    };
    match obj.get(key) {
        Some(v) if !v.is_null() => Ok(v),
        _ => Err(PatchError::Invalid(format!(
            "element of list {} is missing its merge key {key:?}: {item}",
            display_path(path)
        ))),
    }
}

/// The value of a `$deleteFromPrimitiveList/..` or `$setElementOrder/..`
/// directive, which must be a list.
fn directive_list<'v>(
    key: &str,
    value: &'v Value,
    field_path: &str,
) -> Result<&'v [Value], PatchError> {
    if field_path.is_empty() || field_path.ends_with('.') {
        return Err(PatchError::Invalid(format!(
            "directive {key:?} names no field"
        )));
    }
    match value {
        Value::Array(list) => Ok(list),
        other => Err(PatchError::Invalid(format!(
            "directive {key:?} must be a list, got {}",
            type_name(other)
        ))),
    }
}

/// The `$patch` directive of a list element, if it is an object carrying one.
fn element_directive(item: &Value) -> Option<&str> {
    item.get(PATCH_DIRECTIVE).and_then(Value::as_str)
}

/// Whether a map key is a strategic-merge directive (never copied to output).
fn is_directive(key: &str) -> bool {
    key == PATCH_DIRECTIVE
        || key == RETAIN_KEYS
        || key.starts_with(DELETE_FROM_PRIMITIVE_LIST)
        || key.starts_with(SET_ELEMENT_ORDER)
}

/// Dotted child path, without list indices.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A path for error messages (the root has an empty path).
fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "<root>"
    } else {
        path
    }
}

/// JSON type name for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Strategies resembling the real Kubernetes schemas for the paths used below.
    fn k8s_strategy(path: &str) -> ListStrategy {
        match path {
            "spec.ports" => ListStrategy::MergeByKey("port"),
            "subsets.addresses" => ListStrategy::MergeByKey("ip"),
            "spec.containers" | "spec.containers.env" | "spec.volumes" => {
                ListStrategy::MergeByKey("name")
            }
            "metadata.finalizers" => ListStrategy::MergePrimitives,
            _ => ListStrategy::Replace,
        }
    }

    fn smp(orig: Value, patch: Value) -> Value {
        strategic_merge_patch(&orig, &patch, &k8s_strategy).expect("patch applies")
    }

    fn smp_err(orig: Value, patch: Value) -> String {
        match strategic_merge_patch(&orig, &patch, &k8s_strategy) {
            Err(PatchError::Invalid(msg)) => msg,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    /// Asserts no key anywhere in `v` is a strategic-merge directive.
    fn assert_no_directives(v: &Value) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    assert!(!is_directive(k), "directive {k} leaked into output");
                    assert_no_directives(v);
                }
            }
            Value::Array(a) => a.iter().for_each(assert_no_directives),
            _ => {}
        }
    }

    // ---------- merge patch ----------

    #[test]
    fn merge_patch_merges_and_deletes_with_null() {
        let orig =
            json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}, "spec": {"n": 1}});
        let patch = json!({"metadata": {"labels": {"x": null, "z": "3"}}, "spec": null});
        let out = merge_patch(&orig, &patch).unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"name": "a", "labels": {"y": "2", "z": "3"}}})
        );
    }

    #[test]
    fn merge_patch_replaces_lists_and_keeps_key_order() {
        let orig = json!({"a": 1, "b": [1, 2], "c": 3, "d": 4});
        let patch = json!({"b": [9], "a": null, "e": {"f": null, "g": 1}});
        let out = merge_patch(&orig, &patch).unwrap();
        assert_eq!(out, json!({"b": [9], "c": 3, "d": 4, "e": {"g": 1}}));
        assert_eq!(keys(&out), ["b", "c", "d", "e"]);
    }

    #[test]
    fn merge_patch_object_over_scalar_replaces() {
        let out = merge_patch(&json!({"a": "s"}), &json!({"a": {"b": 1}})).unwrap();
        assert_eq!(out, json!({"a": {"b": 1}}));
    }

    #[test]
    fn merge_patch_rejects_non_object() {
        for bad in [json!([1]), json!("x"), json!(null), json!(3)] {
            assert!(matches!(
                merge_patch(&json!({}), &bad),
                Err(PatchError::Invalid(_))
            ));
        }
    }

    // ---------- json patch ----------

    #[test]
    fn json_patch_add_remove_replace() {
        let orig = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"items": [1, 2, 3]}});
        let patch = json!([
            {"op": "add", "path": "/metadata/labels/b", "value": "2"},
            {"op": "remove", "path": "/spec/items/0"},
            {"op": "replace", "path": "/metadata/labels/a", "value": "x"},
            {"op": "add", "path": "/spec/items/-", "value": 4},
        ]);
        let out = json_patch(&orig, &patch).unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"a": "x", "b": "2"}}, "spec": {"items": [2, 3, 4]}})
        );
    }

    #[test]
    fn json_patch_test_op() {
        let orig = json!({"metadata": {"resourceVersion": "5"}});
        let ok = json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
            {"op": "add", "path": "/spec", "value": {}},
        ]);
        assert_eq!(
            json_patch(&orig, &ok).unwrap(),
            json!({"metadata": {"resourceVersion": "5"}, "spec": {}})
        );
        let bad = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "6"}]);
        assert!(matches!(
            json_patch(&orig, &bad),
            Err(PatchError::TestFailed(_))
        ));
    }

    #[test]
    fn json_patch_missing_path_is_test_failed() {
        let orig = json!({"a": 1});
        for patch in [
            json!([{"op": "remove", "path": "/nope"}]),
            json!([{"op": "replace", "path": "/nope", "value": 1}]),
            json!([{"op": "add", "path": "/x/y", "value": 1}]),
        ] {
            assert!(
                matches!(json_patch(&orig, &patch), Err(PatchError::TestFailed(_))),
                "{patch}"
            );
        }
    }

    #[test]
    fn json_patch_is_atomic() {
        let orig = json!({"a": 1});
        let patch = json!([
            {"op": "add", "path": "/b", "value": 2},
            {"op": "test", "path": "/a", "value": 2},
        ]);
        assert!(json_patch(&orig, &patch).is_err());
        assert_eq!(orig, json!({"a": 1}));
    }

    #[test]
    fn json_patch_malformed_is_invalid() {
        for patch in [
            json!({"op": "add", "path": "/a", "value": 1}),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "value": 1}]),
            json!([{"op": "add", "path": "no-leading-slash", "value": 1}]),
            json!("nope"),
        ] {
            assert!(
                matches!(json_patch(&json!({}), &patch), Err(PatchError::Invalid(_))),
                "{patch}"
            );
        }
    }

    // ---------- strategic merge patch: maps ----------

    #[test]
    fn smp_maps_merge_recursively_and_null_deletes() {
        let orig = json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}, "annotations": {"k": "v"}}});
        let patch = json!({"metadata": {"labels": {"x": null, "z": "3"}, "annotations": null}});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"metadata": {"name": "a", "labels": {"y": "2", "z": "3"}}})
        );
        assert_eq!(keys(&out["metadata"]["labels"]), ["y", "z"]);
    }

    #[test]
    fn smp_scalars_replace_and_type_changes() {
        let out = smp(
            json!({"a": 1, "b": {"c": 1}, "d": [1]}),
            json!({"a": "x", "b": 5, "d": {"e": 1}}),
        );
        assert_eq!(out, json!({"a": "x", "b": 5, "d": {"e": 1}}));
    }

    #[test]
    fn smp_patch_replace_on_map() {
        let orig = json!({"spec": {"selector": {"a": "1", "b": "2"}, "type": "ClusterIP"}});
        let patch = json!({"spec": {"selector": {"$patch": "replace", "c": "3"}}});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"spec": {"selector": {"c": "3"}, "type": "ClusterIP"}})
        );
    }

    #[test]
    fn smp_patch_delete_on_map_empties_it() {
        let out = smp(
            json!({"spec": {"a": 1}, "k": 2}),
            json!({"spec": {"$patch": "delete"}}),
        );
        assert_eq!(out, json!({"spec": {}, "k": 2}));
    }

    #[test]
    fn smp_patch_merge_directive_is_noop() {
        let out = smp(
            json!({"spec": {"a": 1}}),
            json!({"spec": {"$patch": "merge", "b": 2}}),
        );
        assert_eq!(out, json!({"spec": {"a": 1, "b": 2}}));
    }

    #[test]
    fn smp_unknown_patch_directive_is_invalid() {
        let msg = smp_err(json!({}), json!({"spec": {"$patch": "explode"}}));
        assert!(msg.contains("spec"), "{msg}");
    }

    #[test]
    fn smp_retain_keys() {
        let orig = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}});
        let out = smp(orig, patch);
        assert_eq!(out, json!({"spec": {"strategy": {"type": "Recreate"}}}));
    }

    #[test]
    fn smp_retain_keys_must_be_strings() {
        smp_err(json!({}), json!({"$retainKeys": [1]}));
        smp_err(json!({}), json!({"$retainKeys": "type"}));
    }

    // ---------- strategic merge patch: lists ----------

    #[test]
    fn smp_replace_list() {
        let out = smp(
            json!({"spec": {"args": ["a", "b"]}}),
            json!({"spec": {"args": ["c"]}}),
        );
        assert_eq!(out, json!({"spec": {"args": ["c"]}}));
    }

    #[test]
    fn smp_merge_primitives_union_preserves_order() {
        let orig = json!({"metadata": {"finalizers": ["a", "b"]}});
        let patch = json!({"metadata": {"finalizers": ["c", "a", "d", "c"]}});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"metadata": {"finalizers": ["a", "b", "c", "d"]}})
        );
    }

    #[test]
    fn smp_delete_from_primitive_list() {
        let orig = json!({"metadata": {"name": "x", "finalizers": ["a", "b", "c"]}});
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b", "zz"]}});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"metadata": {"name": "x", "finalizers": ["a", "c"]}})
        );
    }

    #[test]
    fn smp_delete_from_primitive_list_then_add() {
        let orig = json!({"metadata": {"finalizers": ["a", "b"]}});
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a", "b"], "finalizers": ["b"]}});
        assert_eq!(smp(orig, patch), json!({"metadata": {"finalizers": ["b"]}}));
    }

    #[test]
    fn smp_delete_from_primitive_list_must_be_list() {
        smp_err(
            json!({}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}}),
        );
        smp_err(json!({}), json!({"$deleteFromPrimitiveList/": []}));
    }

    #[test]
    fn smp_merge_by_key_merges_and_appends() {
        let orig = json!({"spec": {"containers": [
            {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "side", "image": "side:1"},
        ]}});
        let patch = json!({"spec": {"containers": [
            {"name": "app", "image": "app:2", "env": [{"name": "B", "value": "22"}, {"name": "C", "value": "3"}]},
            {"name": "new", "image": "new:1"},
        ]}});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"spec": {"containers": [
                {"name": "app", "image": "app:2", "env": [
                    {"name": "A", "value": "1"}, {"name": "B", "value": "22"}, {"name": "C", "value": "3"}]},
                {"name": "side", "image": "side:1"},
                {"name": "new", "image": "new:1"},
            ]}})
        );
    }

    #[test]
    fn smp_merge_by_key_element_null_deletes_field() {
        let orig =
            json!({"spec": {"containers": [{"name": "app", "image": "a", "command": ["x"]}]}});
        let patch = json!({"spec": {"containers": [{"name": "app", "command": null}]}});
        assert_eq!(
            smp(orig, patch),
            json!({"spec": {"containers": [{"name": "app", "image": "a"}]}})
        );
    }

    #[test]
    fn smp_service_ports_merge_by_port_stably() {
        let orig = json!({"spec": {"type": "ClusterIP", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
        ]}});
        let patch = json!({"spec": {"ports": [
            {"port": 443, "targetPort": 9443},
            {"name": "metrics", "port": 9090},
        ]}});
        let once = smp(orig, patch.clone());
        let expected = json!({"spec": {"type": "ClusterIP", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": 9443, "protocol": "TCP"},
            {"name": "metrics", "port": 9090},
        ]}});
        assert_eq!(once, expected);
        // Re-applying the same patch (as repeated `kubectl apply` does) is a no-op.
        let twice = smp(once.clone(), patch);
        assert_eq!(twice, once);
        assert_eq!(
            serde_json::to_string(&twice).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    #[test]
    fn smp_endpoints_subsets_addresses_path() {
        let seen = std::cell::RefCell::new(Vec::new());
        let strategy = |p: &str| {
            seen.borrow_mut().push(p.to_owned());
            k8s_strategy(p)
        };
        let orig = json!({"subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]});
        let patch = json!({"subsets": [{"addresses": [{"ip": "10.0.0.2"}]}]});
        let out = strategic_merge_patch(&orig, &patch, &strategy).unwrap();
        // "subsets" itself is Replace here, so the nested list is not merged.
        assert_eq!(
            out,
            json!({"subsets": [{"addresses": [{"ip": "10.0.0.2"}]}]})
        );
        assert!(seen.borrow().contains(&"subsets".to_owned()));
        assert!(seen.borrow().contains(&"subsets.addresses".to_owned()));
    }

    #[test]
    fn smp_patch_delete_list_element() {
        let orig = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}});
        let patch = json!({"spec": {"containers": [{"name": "b", "$patch": "delete"}]}});
        assert_eq!(
            smp(orig, patch),
            json!({"spec": {"containers": [{"name": "a"}, {"name": "c"}]}})
        );
    }

    #[test]
    fn smp_patch_delete_of_missing_element_is_noop() {
        let orig = json!({"spec": {"ports": [{"port": 80}]}});
        let patch = json!({"spec": {"ports": [{"port": 81, "$patch": "delete"}]}});
        assert_eq!(smp(orig.clone(), patch), orig);
        // Also when the original has no list at all: nothing is created from a delete.
        let out = smp(
            json!({"spec": {}}),
            json!({"spec": {"ports": [{"port": 81, "$patch": "delete"}]}}),
        );
        assert_eq!(out, json!({"spec": {"ports": []}}));
    }

    #[test]
    fn smp_patch_replace_element_in_list() {
        let orig = json!({"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}]}});
        let patch =
            json!({"spec": {"containers": [{"name": "a", "$patch": "replace", "image": "y"}]}});
        // A `$patch: replace` element replaces the whole list with the other elements.
        assert_eq!(smp(orig, patch), json!({"spec": {"containers": []}}));
    }

    #[test]
    fn smp_patch_replace_whole_list() {
        let orig = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b"}]}});
        let patch =
            json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c", "image": "z"}]}});
        assert_eq!(
            smp(orig, patch),
            json!({"spec": {"containers": [{"name": "c", "image": "z"}]}})
        );
        let orig = json!({"metadata": {"finalizers": ["a", "b"]}});
        let patch = json!({"metadata": {"finalizers": [{"$patch": "replace"}, "c"]}});
        assert_eq!(smp(orig, patch), json!({"metadata": {"finalizers": ["c"]}}));
    }

    #[test]
    fn smp_set_element_order_by_key() {
        let orig = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "c"}, {"name": "new"}, {"name": "a"}],
            "containers": [{"name": "new", "image": "n"}],
        }});
        let out = smp(orig, patch);
        assert_eq!(
            out,
            json!({"spec": {"containers": [
                {"name": "c"}, {"name": "new", "image": "n"}, {"name": "a"}, {"name": "b"}, {"name": "d"}
            ]}})
        );
    }

    #[test]
    fn smp_set_element_order_primitives() {
        let orig = json!({"metadata": {"finalizers": ["a", "b", "c"]}});
        let patch = json!({"metadata": {"$setElementOrder/finalizers": ["c", "x", "a"], "finalizers": ["x"]}});
        assert_eq!(
            smp(orig, patch),
            json!({"metadata": {"finalizers": ["c", "x", "a", "b"]}})
        );
    }

    #[test]
    fn smp_set_element_order_without_list_in_patch() {
        let orig = json!({"spec": {"ports": [{"port": 80}, {"port": 443}]}});
        let patch = json!({"spec": {"$setElementOrder/ports": [{"port": 443}, {"port": 80}]}});
        assert_eq!(
            smp(orig, patch),
            json!({"spec": {"ports": [{"port": 443}, {"port": 80}]}})
        );
    }

    #[test]
    fn smp_set_element_order_missing_key_is_invalid() {
        let orig = json!({"spec": {"ports": [{"port": 80}]}});
        let msg = smp_err(
            orig,
            json!({"spec": {"$setElementOrder/ports": [{"name": "x"}]}}),
        );
        assert!(msg.contains("port"), "{msg}");
    }

    #[test]
    fn smp_directives_never_in_output() {
        let orig = json!({"metadata": {"finalizers": ["a"]}, "spec": {"ports": [{"port": 80}]}});
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "$retainKeys": ["finalizers"]},
            "spec": {
                "$setElementOrder/ports": [{"port": 81}],
                "ports": [{"port": 81, "$patch": "merge"}],
                "selector": {"$patch": "replace", "app": "x"},
                "template": {"spec": {"containers": [
                    {"name": "c", "env": [{"name": "E", "$patch": "delete"}, {"name": "F", "value": "1"}]}
                ]}},
                "newMap": {"$retainKeys": ["a"], "a": {"$patch": "replace", "b": 1}},
            },
        });
        let out = smp(orig, patch);
        assert_no_directives(&out);
        assert_eq!(out["spec"]["ports"], json!([{"port": 81}, {"port": 80}]));
        assert_eq!(out["metadata"], json!({"finalizers": []}));
        assert_eq!(out["spec"]["newMap"], json!({"a": {"b": 1}}));
    }

    #[test]
    fn smp_new_nested_fields_are_cleaned() {
        let strategy = |p: &str| match p {
            "spec.template.spec.containers" | "spec.template.spec.containers.env" => {
                ListStrategy::MergeByKey("name")
            }
            _ => ListStrategy::Replace,
        };
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "c", "args": null, "env": [{"name": "X", "$patch": "delete"}, {"name": "Y"}]}
        ]}}}});
        let out = strategic_merge_patch(&json!({}), &patch, &strategy).unwrap();
        assert_eq!(
            out,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "env": [{"name": "Y"}]}]}}}})
        );
    }

    #[test]
    fn smp_missing_merge_key_is_invalid() {
        let orig = json!({"spec": {"ports": [{"port": 80}]}});
        let msg = smp_err(
            orig.clone(),
            json!({"spec": {"ports": [{"targetPort": 8080}]}}),
        );
        assert!(
            msg.contains("spec.ports") && msg.contains("\"port\""),
            "{msg}"
        );
        smp_err(orig.clone(), json!({"spec": {"ports": [{"port": null}]}}));
        smp_err(orig, json!({"spec": {"ports": [80]}}));
    }

    #[test]
    fn smp_directive_in_primitive_list_is_invalid() {
        smp_err(
            json!({}),
            json!({"metadata": {"finalizers": [{"$patch": "delete"}]}}),
        );
    }

    #[test]
    fn smp_non_object_patch_is_invalid() {
        for bad in [json!([]), json!("x"), json!(null), json!(1)] {
            assert!(matches!(
                strategic_merge_patch(&json!({}), &bad, &k8s_strategy),
                Err(PatchError::Invalid(_))
            ));
        }
    }

    #[test]
    fn smp_keeps_key_order_and_dollar_fields() {
        // `$ref`-style keys (e.g. in CRD schemas) are ordinary fields, not directives.
        let orig = json!({"b": 1, "a": {"$ref": "#/x"}, "c": 3});
        let out = smp(orig, json!({"b": null, "d": 4, "a": {"$schema": "s"}}));
        assert_eq!(
            out,
            json!({"a": {"$ref": "#/x", "$schema": "s"}, "c": 3, "d": 4})
        );
        assert_eq!(keys(&out), ["a", "c", "d"]);
    }

    #[test]
    fn smp_root_patch_delete() {
        assert_eq!(smp(json!({"a": 1}), json!({"$patch": "delete"})), json!({}));
    }
}
