//! fairlead: a Kubernetes node data plane (Service proxy + cluster DNS) with
//! the minimal control plane that feeds it.
//!
//! # Crate map
//!
//! Data flows top to bottom:
//!
//! * [`store`] — the key-value store under the API server, with etcd's
//!   semantics (revisions, compare-and-swap transactions, watch from a
//!   revision, compaction). Two backends: [`store::embedded`] (SQLite in the
//!   data directory, the default) and [`store::etcd`].
//! * [`api`] — Kubernetes rules that do not need HTTP: the resource table
//!   that drives the whole server, `Status` errors, metadata rules, Service
//!   defaulting/validation, label/field selectors, patches.
//! * [`apiserver`] — the HTTPS server real kubectl talks to: TLS and
//!   credentials, routing, the generic REST verbs over the resource table,
//!   watch streams, discovery, OpenAPI, Service IP/NodePort allocation.
//! * [`metrics`] — the process-wide Prometheus recorder.
//! * [`cli`] — the `fairlead` command line (`up`, `apiserver`, ...).

pub mod api;
pub mod apiserver;
pub mod cli;
pub mod controllers;
pub mod dns;
pub mod echo;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod store;
