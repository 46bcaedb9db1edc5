//! Kubernetes `Status` errors.
//!
//! Clients branch on the HTTP code *and* on `reason` (kubectl prints
//! `message`; client-go's `IsConflict`, `IsAlreadyExists`, `IsNotFound`
//! read `reason`; the Python client raises `ApiException(status=...)`), so
//! every failure the API server reports is an [`ApiError`] rendered as a
//! `Status` object with the same code, reason and message shape as
//! kube-apiserver.

use serde_json::{json, Value};

/// One field-level validation failure (an entry of `details.causes`).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub field: String,
    /// The full message, e.g. `spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive`.
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, detail: &str) -> Self {
        let field = field.into();
        FieldError {
            reason: "FieldValueInvalid",
            message: format!("{field}: Invalid value: {value}: {detail}"),
            field,
        }
    }
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let field = field.into();
        let message = if detail.is_empty() {
            format!("{field}: Required value")
        } else {
            format!("{field}: Required value: {detail}")
        };
        FieldError {
            reason: "FieldValueRequired",
            message,
            field,
        }
    }
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let field = field.into();
        let list = supported
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        FieldError {
            reason: "FieldValueNotSupported",
            message: format!("{field}: Unsupported value: \"{value}\": supported values: {list}"),
            field,
        }
    }
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        let field = field.into();
        FieldError {
            reason: "FieldValueForbidden",
            message: format!("{field}: Forbidden: {detail}"),
            field,
        }
    }
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        let field = field.into();
        FieldError {
            reason: "FieldValueDuplicate",
            message: format!("{field}: Duplicate value: {value}"),
            field,
        }
    }
}

/// An API failure: HTTP code + Kubernetes reason + message (+ details).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }
    pub fn not_found(resource: &str, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"));
        e.details = Some(json!({"name": name, "kind": resource}));
        e
    }
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn already_exists(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        );
        e.details = Some(json!({"name": name, "kind": resource}));
        e
    }
    pub fn conflict(resource: &str, name: &str, detail: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {detail}"),
        );
        e.details = Some(json!({"name": name, "kind": resource}));
        e
    }
    pub fn stale(resource: &str, name: &str) -> Self {
        Self::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn too_large() -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        )
    }
    pub fn unsupported_media_type(ct: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, {} (for {} only); got {ct:?}",
                super::protobuf::CONTENT_TYPE,
                super::protobuf::supported_kinds()
            ),
        )
    }
    /// 422 with one cause per field error, as kube-apiserver's
    /// `NewInvalid` builds it.
    pub fn invalid(kind: &str, name: &str, errors: Vec<FieldError>) -> Self {
        let joined = if errors.len() == 1 {
            errors[0].message.clone()
        } else {
            format!(
                "[{}]",
                errors
                    .iter()
                    .map(|e| e.message.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                // kubectl prints "* <field>: <message>", so the cause's
                // message leaves the field out.
                let prefix = format!("{}: ", e.field);
                let msg = e.message.strip_prefix(&prefix).unwrap_or(&e.message);
                json!({"reason": e.reason, "message": msg, "field": e.field})
            })
            .collect();
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {joined}"),
        );
        e.details = Some(json!({"name": name, "kind": kind, "causes": causes}));
        e
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        Self::new(503, "ServiceUnavailable", message.to_string())
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    /// The `Status` object clients parse.
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError::*;
        match e {
            Compacted {
                requested,
                compacted,
            } => ApiError::gone(format!(
                "The resourceVersion for the provided list is too old. (requested {requested}, oldest available {compacted})"
            )),
            FutureRevision { requested, current } => {
                let mut e = ApiError::timeout(format!(
                    "Too large resource version: {requested}, current: {current}"
                ));
                e.details = Some(json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}));
                e
            }
            Unavailable(m) => ApiError::unavailable(m),
            Internal(m) => ApiError::internal(m),
            NoSpace(m) => ApiError::new(
                507,
                "InsufficientStorage",
                format!("the store is out of disk space; writes fail until space is freed, reads go on ({m})"),
            ),
        }
    }
}
