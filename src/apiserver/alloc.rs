//! ClusterIP and NodePort allocation, race-free across API servers.
//!
//! Every allocated address is a key in the store
//! (`/registry/allocations/serviceips/<ip>`,
//! `/registry/allocations/servicenodeports/<port>`) created with an
//! "absent" condition *in the same transaction* as the Service that holds
//! it, and deleted in the same transaction as the Service's delete. So two
//! API servers on one etcd can never hand out one address twice, and a crash
//! can never leave a Service without its address or an address without its
//! Service. A randomly picked address that loses a race is simply picked
//! again; a user-chosen one that is taken is a 422.

use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{json, Value};

use crate::api::resources::{Kind, ResourceDef};
use crate::api::service::{self, NODE_PORT_MAX, NODE_PORT_MIN};
use crate::api::status::{ApiError, FieldError};
use crate::store::{Compare, KeyValue, Txn};

use super::Server;

const IP_PREFIX: &str = "/registry/allocations/serviceips/";
const PORT_PREFIX: &str = "/registry/allocations/servicenodeports/";

fn ip_key(ip: Ipv4Addr) -> String {
    format!("{IP_PREFIX}{ip}")
}
fn port_key(port: u16) -> String {
    format!("{PORT_PREFIX}{port}")
}

/// The allocation keys a write must create and delete.
#[derive(Debug, Default)]
pub struct Plan {
    /// (key, field for errors, user-chosen)
    claims: Vec<(String, String, bool)>,
    releases: Vec<String>,
    owner: String,
    /// The ClusterIP was picked by us (reset it to retry).
    pub dynamic_ip: bool,
    /// Port indices whose nodePort was picked by us.
    pub dynamic_ports: Vec<usize>,
    /// The healthCheckNodePort was picked by us.
    pub dynamic_health_port: bool,
}

impl Plan {
    /// Adds the plan's conditions and writes to a transaction.
    pub fn apply(&self, mut txn: Txn) -> Txn {
        for (key, _, _) in &self.claims {
            txn = txn.when(Compare::Absent(key.clone())).put(
                key.clone(),
                json!({"owner": self.owner}).to_string().into_bytes(),
            );
        }
        for key in &self.releases {
            txn = txn.delete(key.clone());
        }
        txn
    }

    /// Interprets failed conditions: a user-chosen address that is taken
    /// is a 422; a dynamic one means "pick again" (Ok).
    pub fn conflict(
        &self,
        def: &ResourceDef,
        name: &str,
        failed: &[(Compare, Option<KeyValue>)],
    ) -> Result<(), ApiError> {
        let mut errs = Vec::new();
        for (c, _) in failed {
            if let Some((key, field, true)) = self.claims.iter().find(|(k, _, _)| k == c.key()) {
                let value = key.rsplit('/').next().unwrap_or("");
                let (value, what) = if key.starts_with(IP_PREFIX) {
                    (format!("{value:?}"), "IP")
                } else {
                    (value.to_string(), "port")
                };
                errs.push(FieldError::invalid(
                    field.clone(),
                    value,
                    &format!("provided {what} is already allocated"),
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(def.kind_name, name, errs))
        }
    }
}

/// Reset what a plan picked dynamically, so the next attempt picks again.
pub fn clear_dynamic(plan: &Plan, obj: &mut Value) {
    if plan.dynamic_ip {
        obj["spec"]["clusterIP"] = json!("");
        if let Some(s) = obj["spec"].as_object_mut() {
            s.remove("clusterIPs");
        }
    }
    for i in &plan.dynamic_ports {
        if let Some(p) = obj.pointer_mut(&format!("/spec/ports/{i}")) {
            p["nodePort"] = Value::Null;
            p.as_object_mut().unwrap().remove("nodePort");
        }
    }
    if plan.dynamic_health_port {
        if let Some(s) = obj["spec"].as_object_mut() {
            s.remove("healthCheckNodePort");
        }
    }
}

fn owner(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )
}

async fn pick_ip(srv: &Server) -> Result<Ipv4Addr, ApiError> {
    let cidr = srv.config.service_cidr;
    let lo = cidr.base + cidr.dynamic_start();
    let hi = cidr.base + cidr.size() - 2;
    for _ in 0..8 {
        let ip = Ipv4Addr::from(rand::rng().random_range(lo..=hi));
        if srv.store.get(&ip_key(ip)).await?.is_none() {
            return Ok(ip);
        }
    }
    // Nearly full: scan for a free one (upper band first, then the rest).
    let taken: std::collections::HashSet<String> = srv
        .store
        .list_all(IP_PREFIX)
        .await?
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    (lo..=hi)
        .chain(cidr.base + 1..lo)
        .map(Ipv4Addr::from)
        .find(|ip| !taken.contains(&ip_key(*ip)))
        .ok_or_else(|| {
            ApiError::internal(format!(
                "failed to allocate a serviceIP: range is full ({cidr})"
            ))
        })
}

async fn pick_port(srv: &Server, avoid: &[u16]) -> Result<u16, ApiError> {
    for _ in 0..8 {
        let p = rand::rng().random_range(NODE_PORT_MIN..=NODE_PORT_MAX);
        if !avoid.contains(&p) && srv.store.get(&port_key(p)).await?.is_none() {
            return Ok(p);
        }
    }
    let taken: std::collections::HashSet<String> = srv
        .store
        .list_all(PORT_PREFIX)
        .await?
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    (NODE_PORT_MIN..=NODE_PORT_MAX)
        .find(|p| !avoid.contains(p) && !taken.contains(&port_key(*p)))
        .ok_or_else(|| ApiError::internal("failed to allocate a nodePort: range is full"))
}

/// Fill in the addresses a Service (`obj`, defaulted and validated) still
/// needs, and list the keys to claim. `old` holds what it already has.
async fn plan(srv: &Server, old: Option<&Value>, obj: &mut Value) -> Result<Plan, ApiError> {
    let mut plan = Plan {
        owner: owner(obj),
        ..Default::default()
    };
    // ClusterIP.
    let old_ip = old.and_then(service::held_ip);
    if service::wants_cluster_ip(obj) {
        let ip_str = obj
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ip_str.is_empty() {
            let ip = pick_ip(srv).await?;
            obj["spec"]["clusterIP"] = json!(ip.to_string());
            obj["spec"]["clusterIPs"] = json!([ip.to_string()]);
            plan.dynamic_ip = true;
        }
    }
    let new_ip = service::held_ip(obj);
    if new_ip != old_ip {
        if let Some(ip) = new_ip {
            plan.claims
                .push((ip_key(ip), "spec.clusterIPs[0]".into(), !plan.dynamic_ip));
        }
        if let Some(ip) = old_ip {
            plan.releases.push(ip_key(ip));
        }
    }
    // NodePorts.
    if !service::wants_node_ports(obj) {
        service::clear_node_ports(obj);
    } else {
        let n = obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let mut used = service::held_node_ports(obj);
        for i in 0..n {
            let p = &obj["spec"]["ports"][i];
            if p.get("nodePort").and_then(Value::as_u64).unwrap_or(0) == 0 {
                let port = pick_port(srv, &used).await?;
                used.push(port);
                obj["spec"]["ports"][i]["nodePort"] = json!(port);
                plan.dynamic_ports.push(i);
            }
        }
    }
    // The health check port of a LoadBalancer with local traffic policy.
    if !service::wants_health_check_node_port(obj) {
        if let Some(s) = obj["spec"].as_object_mut() {
            s.remove("healthCheckNodePort");
        }
    } else if service::held_health_check_node_port(obj).is_none() {
        let used = service::held_node_ports(obj);
        let port = pick_port(srv, &used).await?;
        obj["spec"]["healthCheckNodePort"] = json!(port);
        plan.dynamic_health_port = true;
    }
    let health = service::held_health_check_node_port(obj);
    let old_ports = old.map(service::held_node_ports).unwrap_or_default();
    let new_ports = service::held_node_ports(obj);
    for p in &new_ports {
        if Some(*p) == health && !old_ports.contains(p) {
            plan.claims.push((
                port_key(*p),
                "spec.healthCheckNodePort".into(),
                !plan.dynamic_health_port,
            ));
            continue;
        }
        if !old_ports.contains(p) {
            let idx = obj["spec"]["ports"]
                .as_array()
                .and_then(|ps| {
                    ps.iter()
                        .position(|x| x.get("nodePort").and_then(Value::as_u64) == Some(*p as u64))
                })
                .unwrap_or(0);
            let user = !plan.dynamic_ports.contains(&idx);
            plan.claims
                .push((port_key(*p), format!("spec.ports[{idx}].nodePort"), user));
        }
    }
    for p in &old_ports {
        if !new_ports.contains(p) {
            plan.releases.push(port_key(*p));
        }
    }
    Ok(plan)
}

/// The plan for creating `obj` (empty for kinds without allocations).
pub async fn plan_create(
    srv: &Server,
    def: &ResourceDef,
    obj: &mut Value,
) -> Result<Plan, ApiError> {
    if def.kind != Kind::Service {
        return Ok(Plan::default());
    }
    plan(srv, None, obj).await
}

/// The plan for replacing `old` with `new`.
pub async fn plan_update(
    srv: &Server,
    def: &ResourceDef,
    old: &Value,
    new: &mut Value,
) -> Result<Plan, ApiError> {
    if def.kind != Kind::Service {
        return Ok(Plan::default());
    }
    plan(srv, Some(old), new).await
}

/// The plan for deleting `obj`: release everything it holds.
pub fn plan_release(def: &ResourceDef, obj: &Value) -> Plan {
    let mut plan = Plan::default();
    if def.kind == Kind::Service {
        if let Some(ip) = service::held_ip(obj) {
            plan.releases.push(ip_key(ip));
        }
        for p in service::held_node_ports(obj) {
            plan.releases.push(port_key(p));
        }
    }
    plan
}
