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
//!   data directory, the default) and [`store::etcd`] (one client per member,
//!   failing over between them).
//! * [`api`] — Kubernetes rules that do not need HTTP: the resource table
//!   that drives the whole server, `Status` errors, metadata rules, Service
//!   defaulting/validation, label/field selectors, patches, bootstrap
//!   (join) tokens (`api::token`), ServiceAccount tokens (signed JWTs,
//!   `api::satoken`), protobuf request bodies.
//! * [`apiserver`] — the HTTPS server real kubectl talks to: TLS and
//!   credentials, routing, the generic REST verbs over the resource table,
//!   watch streams, discovery, OpenAPI, Service IP/NodePort allocation,
//!   `pods/eviction` against PodDisruptionBudgets (`apiserver::eviction`),
//!   the least-privilege authorizer (`apiserver::authz`), the TokenRequest
//!   API and ServiceAccount authentication (`apiserver::serviceaccount`),
//!   and the
//!   `kubernetes` Service's endpoints kept from one Lease per live server
//!   (`apiserver::endpoints`).
//! * [`controllers`] — EndpointSlices and legacy Endpoints from Services and
//!   Pods (kube-rs runtime; a pure planner in `controllers::endpointslice`),
//!   node IPAM (a pod CIDR per Node, `controllers::nodeipam`), ReplicaSets
//!   and Deployments, the garbage collector (`controllers::gc`: Background,
//!   Foreground, Orphan), node lifecycle and taint-based eviction
//!   (`controllers::nodelifecycle`), PodDisruptionBudget status
//!   (`controllers::disruption`), node certificates from
//!   CertificateSigningRequests (`controllers::csr`) and every namespace's
//!   `default` ServiceAccount (`controllers::serviceaccount`), under Lease
//!   leader election.
//! * [`model`] — the node's lean view of Services, EndpointSlices and
//!   Namespaces (only what the proxy and DNS need, strings interned) and
//!   the watch cache that records which Services changed since the last
//!   sync: the start of every per-change (never whole-cluster) path below.
//! * [`node`] — the node daemon: watches feeding the [`model::Cache`], a
//!   paced sync loop handing only the changed Services to the proxy and
//!   cluster DNS, plus `/healthz` and `/metrics`; `node::register` keeps
//!   its `Node` and heartbeat Lease, as the kubelet does; `node::routes`
//!   routes other nodes' podCIDRs (host-gw); `node::svchealth` serves
//!   healthCheckNodePorts; `node::apilb` is a joined agent's load balancer
//!   to every API server.
//! * [`join`] — joining hosts: join tokens (create, list, revoke), CA
//!   discovery checked by its hash, the CSR bootstrap to a node
//!   certificate (`fairlead join`, `fairlead token`).
//! * [`kubelet`] — the node's pod agent: runs the Pods bound to it as
//!   processes in their own network namespace and cgroup (a built-in
//!   CNI: bridge, veth, podCIDR addresses), with probes, restarts,
//!   graceful deletion, status and each pod's service-account token
//!   volume, behind a small runtime trait.
//! * [`scheduler`] — binds Pods to nodes through `pods/binding`: pure
//!   filters and a score (`scheduler::filter`: room left, replicas spread)
//!   over reflected Nodes and Pods, leader-elected.
//! * [`proxy`] — Service proxying: the pure change tracker
//!   (`proxy::tracker`: dirty Services → changed service ports) and two
//!   backends applying those changes, [`proxy::userspace`] (tokio
//!   listeners) and [`proxy::nftables`] (kernel tables, sharded, most
//!   Services one rule in a shared bucket chain, so a change's kernel cost
//!   stays bounded, one atomic transaction per sync),
//!   plus [`proxy::conntrack`] (deleting stale UDP conntrack entries when
//!   endpoints go away). Ports with `appProtocol` h2c/grpc/http are
//!   balanced per request by the userspace proxy's L7 path (`l7`); in
//!   nftables mode [`proxy::l7redirect`] sends them to that path on the
//!   node.
//! * [`netlink`] — routing netlink (links, addresses, routes, named
//!   network namespaces) for the proxy's Service IPs, cluster DNS's
//!   address, pod routes and the pod network, without the `ip` binary.
//! * [`dns`] — cluster DNS per the Kubernetes DNS spec: a record index
//!   updated per changed Service, a UDP/TCP server, a forwarding cache.
//! * [`workers`] — per-core event loops (a current-thread runtime per
//!   thread) that the userspace proxy's connections and cluster DNS's UDP
//!   receive loops run on, off the node's multi-thread runtime.
//! * [`echo`] — `fairlead echo`, a demo backend that answers with its name.
//! * [`metrics`] — the process-wide Prometheus recorder.
//! * [`systemd`] — `Type=notify` readiness and watchdog pings for the
//!   units in `config/systemd/`.
//! * [`cli`] — the `fairlead` command line (`up`, `apiserver`,
//!   `controllers`, `scheduler`, `node`, `join`, `token`, `echo`).
//! * [`fuzzing`] — the fuzz targets (DNS requests, API bodies, selectors,
//!   patches, `--config`, the nf_tables encoder, store keys), run by
//!   `fuzz/` under cargo-fuzz and replayed on stable by
//!   `tests/fuzz_regressions.rs`.

pub mod api;
pub mod apiserver;
pub mod cli;
pub mod controllers;
pub mod dns;
pub mod echo;
pub mod fuzzing;
pub mod join;
pub mod kubelet;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node;
pub mod proxy;
pub mod scheduler;
pub mod store;
pub mod systemd;
pub mod workers;
