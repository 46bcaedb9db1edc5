//! Kubernetes API glue that does not depend on HTTP: the resource table,
//! `Status` errors, metadata rules, Service semantics, selectors and patches.
//! All pure, so the rules are unit-tested without a server.

pub mod disruption;
pub mod meta;
pub mod patch;
pub mod pod;
pub mod protobuf;
pub mod rbac;
pub mod resources;
pub mod satoken;
pub mod selector;
pub mod service;
pub mod status;
pub mod token;
pub mod workload;
