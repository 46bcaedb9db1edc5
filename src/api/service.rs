//! Service semantics: defaulting, validation and the allocation plan.
//!
//! Pure functions over the Service JSON, so every rule is unit-tested
//! without a server. The API server applies the plan (claims ClusterIP and
//! NodePort keys in the same store transaction as the object, see
//! `apiserver::alloc`). Messages follow kube-apiserver's wording because
//! users and scripts grep for them.

use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use super::meta::{dns1035_label_error, dns1123_subdomain_error};
use super::selector::{validate_label_key, validate_label_value};
use super::status::FieldError;

/// An IPv4 service CIDR (`--service-cluster-ip-range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCidr {
    pub base: u32,
    pub prefix: u8,
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl std::str::FromStr for ServiceCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR {s:?}: expected a.b.c.d/len"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 8..=30"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(ServiceCidr {
            base: u32::from(ip) & mask,
            prefix,
        })
    }
}

impl ServiceCidr {
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }
    /// Whether `ip` may be a ClusterIP (inside, not network or broadcast).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size() - 1
    }
    /// The `kubernetes` Service's address (first usable IP).
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }
    /// Dynamic allocation prefers addresses above this offset, leaving the
    /// low band for users who pick fixed IPs (e.g. the DNS Service's .10),
    /// like Kubernetes' ServiceIPStaticSubrange.
    pub fn dynamic_start(&self) -> u32 {
        (self.size() / 16).clamp(16, 256)
    }
}

/// The NodePort range (`--service-node-port-range`).
pub const NODE_PORT_MIN: u16 = 30000;
pub const NODE_PORT_MAX: u16 = 32767;

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj.insert(key.to_string(), value);
    }
}

fn spec_str<'a>(svc: &'a Value, key: &str) -> Option<&'a str> {
    svc.pointer(&format!("/spec/{key}")).and_then(Value::as_str)
}

/// The Service type after defaulting.
pub fn service_type(svc: &Value) -> &str {
    spec_str(svc, "type").unwrap_or("ClusterIP")
}

/// Whether the Service is headless (`clusterIP: None`).
pub fn is_headless(svc: &Value) -> bool {
    spec_str(svc, "clusterIP") == Some("None")
}

/// Fill in what Kubernetes defaults on create and update.
pub fn default_service(svc: &mut Value) {
    if !svc.get("spec").is_some_and(Value::is_object) {
        svc["spec"] = json!({});
    }
    let spec = svc["spec"].as_object_mut().unwrap();
    set_default(spec, "type", json!("ClusterIP"));
    let ty = spec["type"].as_str().unwrap_or("").to_string();
    set_default(spec, "sessionAffinity", json!("None"));
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
            if p.get("targetPort").is_none_or(Value::is_null) {
                if let Some(port) = p.get("port").cloned() {
                    p.insert("targetPort".into(), port);
                }
            }
        }
    }
    if ty != "ExternalName" {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        // clusterIPs mirrors clusterIP (single-stack IPv4 here).
        if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str) {
            if !ip.is_empty() && spec.get("clusterIPs").is_none_or(Value::is_null) {
                spec.insert("clusterIPs".into(), json!([ip]));
            }
        }
        if spec.get("clusterIP").is_none_or(|v| v.as_str() == Some("")) {
            if let Some(first) = spec
                .get("clusterIPs")
                .and_then(|v| v.get(0))
                .and_then(Value::as_str)
                .map(String::from)
            {
                spec.insert("clusterIP".into(), json!(first));
            }
        }
        set_default(spec, "ipFamilies", json!(["IPv4"]));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if ty == "LoadBalancer" {
        set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if svc.get("status").is_none_or(Value::is_null) {
        svc["status"] = json!({"loadBalancer": {}});
    }
}

const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

fn iana_svc_name_error(name: &str) -> Option<&'static str> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty() || name.len() > 15 {
        Some("must be no more than 15 characters")
    } else if !ok_chars || !name.chars().any(|c| c.is_ascii_lowercase()) {
        Some("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-) and must contain at least one letter (a-z)")
    } else if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        Some("must not begin or end with a hyphen, nor contain adjacent hyphens")
    } else {
        None
    }
}

/// Validate a defaulted Service. `cidr` bounds user-chosen ClusterIPs.
pub fn validate_service(svc: &Value, cidr: &ServiceCidr) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let name = svc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(e) = dns1035_label_error(name) {
        errs.push(FieldError::invalid(
            "metadata.name",
            format!("{name:?}"),
            &e,
        ));
    }
    let ty = service_type(svc);
    if !TYPES.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, TYPES));
        return errs;
    }
    let headless = is_headless(svc);
    let cluster_ip = spec_str(svc, "clusterIP").unwrap_or("");
    if ty == "ExternalName" {
        match spec_str(svc, "externalName") {
            None | Some("") => errs.push(FieldError::required("spec.externalName", "")),
            Some(en) => {
                if let Some(e) = dns1123_subdomain_error(en.trim_end_matches('.')) {
                    errs.push(FieldError::invalid(
                        "spec.externalName",
                        format!("{en:?}"),
                        &e,
                    ));
                }
            }
        }
        if !cluster_ip.is_empty() {
            errs.push(FieldError::forbidden(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            ));
        }
    } else if !cluster_ip.is_empty() && !headless {
        match cluster_ip.parse::<Ipv4Addr>() {
            Err(_) => errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                format!("{cluster_ip:?}"),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
            Ok(ip) if !cidr.contains(ip) => errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                format!("{cluster_ip:?}"),
                &format!("provided IP is not in the valid range. The range of valid IPs is {cidr}"),
            )),
            Ok(_) => {}
        }
    }
    if headless && (ty == "NodePort" || ty == "LoadBalancer") {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            "\"None\"",
            "may not be set to 'None' for LoadBalancer or NodePort services",
        ));
    }
    if let Some(aff) = spec_str(svc, "sessionAffinity") {
        if aff != "None" && aff != "ClientIP" {
            errs.push(FieldError::not_supported(
                "spec.sessionAffinity",
                aff,
                &["ClientIP", "None"],
            ));
        }
    }
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && !headless {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = Vec::new();
    let mut seen = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = |s: &str| format!("spec.ports[{i}].{s}");
        let pname = p.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && pname.is_empty() {
            errs.push(FieldError::required(f("name"), ""));
        } else if !pname.is_empty() {
            if let Some(e) = super::meta::dns1123_label_error(pname) {
                errs.push(FieldError::invalid(f("name"), format!("{pname:?}"), &e));
            }
            if names.contains(&pname) {
                errs.push(FieldError::duplicate(f("name"), format!("{pname:?}")));
            }
            names.push(pname);
        }
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(FieldError::invalid(
                f("port"),
                port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if !PROTOCOLS.contains(&proto) {
            errs.push(FieldError::not_supported(f("protocol"), proto, PROTOCOLS));
        }
        if seen.contains(&(port, proto)) {
            errs.push(FieldError::duplicate(
                f(""),
                format!("core.ServicePort{{Name:{pname:?}, Protocol:{proto:?}, Port:{port}}}"),
            ));
        }
        seen.push((port, proto));
        match p.get("targetPort") {
            Some(Value::Number(n)) => {
                let t = n.as_i64().unwrap_or(0);
                if !(1..=65535).contains(&t) {
                    errs.push(FieldError::invalid(
                        f("targetPort"),
                        t,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
            Some(Value::String(s)) => {
                if let Some(e) = iana_svc_name_error(s) {
                    errs.push(FieldError::invalid(f("targetPort"), format!("{s:?}"), e));
                }
            }
            _ => {}
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            if np != 0 {
                if ty == "ClusterIP" || ty == "ExternalName" {
                    errs.push(FieldError::forbidden(
                        f("nodePort"),
                        &format!("may not be used when `type` is '{ty}'"),
                    ));
                } else if !(NODE_PORT_MIN as i64..=NODE_PORT_MAX as i64).contains(&np) {
                    errs.push(FieldError::invalid(
                        f("nodePort"),
                        np,
                        &format!(
                            "provided port is not in the valid range. The range of valid ports is {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                        ),
                    ));
                }
            }
        }
    }
    if let Some(sel) = svc.pointer("/spec/selector").and_then(Value::as_object) {
        for (k, v) in sel {
            if let Err(e) = validate_label_key(k) {
                errs.push(FieldError::invalid("spec.selector", format!("{k:?}"), &e));
            }
            let v = v.as_str().unwrap_or("");
            if let Err(e) = validate_label_value(v) {
                errs.push(FieldError::invalid("spec.selector", format!("{v:?}"), &e));
            }
        }
    }
    for (field, allowed) in [
        ("externalTrafficPolicy", &["Cluster", "Local"][..]),
        ("internalTrafficPolicy", &["Cluster", "Local"][..]),
    ] {
        if let Some(v) = spec_str(svc, field) {
            if !allowed.contains(&v) {
                errs.push(FieldError::not_supported(
                    format!("spec.{field}"),
                    v,
                    allowed,
                ));
            }
        }
    }
    errs
}

/// Rules that compare an update with the stored object.
pub fn validate_service_update(old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let old_ip = spec_str(old, "clusterIP").unwrap_or("");
    let new_ip = spec_str(new, "clusterIP").unwrap_or("");
    let old_ty = service_type(old);
    let new_ty = service_type(new);
    // Changing to/from ExternalName legitimately adds or drops the IP.
    if old_ty != "ExternalName"
        && new_ty != "ExternalName"
        && !old_ip.is_empty()
        && old_ip != new_ip
    {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            format!("{new_ip:?}"),
            "may not change once set",
        ));
    }
    errs
}

/// On update, keep the allocated values the user's object omitted (kubectl
/// apply and edits rarely carry clusterIP / nodePort), as Kubernetes does.
pub fn carry_over_allocations(old: &Value, new: &mut Value) {
    let old_ty = service_type(old);
    let new_ty = service_type(new).to_string();
    if new_ty != "ExternalName"
        && old_ty != "ExternalName"
        && spec_str(new, "clusterIP").unwrap_or("").is_empty()
    {
        if let Some(ip) = spec_str(old, "clusterIP").map(String::from) {
            new["spec"]["clusterIP"] = json!(ip);
            new["spec"]["clusterIPs"] = old["spec"]["clusterIPs"].clone();
        }
    }
    if new_ty == "NodePort" || new_ty == "LoadBalancer" {
        let old_ports = old
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(ports) = new.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
            for p in ports.iter_mut() {
                if p.get("nodePort").and_then(Value::as_i64).unwrap_or(0) != 0 {
                    continue;
                }
                let same = old_ports.iter().find(|o| {
                    o.get("port") == p.get("port")
                        && o.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                            == p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                });
                if let Some(np) = same
                    .and_then(|o| o.get("nodePort"))
                    .filter(|v| !v.is_null())
                {
                    p["nodePort"] = np.clone();
                }
            }
        }
    }
}

/// Whether the Service should hold a ClusterIP.
pub fn wants_cluster_ip(svc: &Value) -> bool {
    service_type(svc) != "ExternalName" && !is_headless(svc)
}

/// Whether the Service should hold NodePorts.
pub fn wants_node_ports(svc: &Value) -> bool {
    let ty = service_type(svc);
    ty == "NodePort"
        || (ty == "LoadBalancer"
            && svc
                .pointer("/spec/allocateLoadBalancerNodePorts")
                .and_then(Value::as_bool)
                .unwrap_or(true))
}

/// Whether a Service gets a `healthCheckNodePort`: a LoadBalancer with
/// `externalTrafficPolicy: Local` (kube-apiserver's rule).
pub fn wants_health_check_node_port(svc: &Value) -> bool {
    service_type(svc) == "LoadBalancer"
        && svc
            .pointer("/spec/externalTrafficPolicy")
            .and_then(Value::as_str)
            == Some("Local")
}

/// The `healthCheckNodePort` a Service holds.
pub fn held_health_check_node_port(svc: &Value) -> Option<u16> {
    if !wants_health_check_node_port(svc) {
        return None;
    }
    svc.pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .and_then(|p| u16::try_from(p).ok())
}

/// The ClusterIP a Service holds (None when headless, ExternalName or unset).
pub fn held_ip(svc: &Value) -> Option<Ipv4Addr> {
    if !wants_cluster_ip(svc) {
        return None;
    }
    spec_str(svc, "clusterIP")?.parse().ok()
}

/// The NodePorts a Service holds, its `healthCheckNodePort` included
/// (one range, one allocator, as in kube-apiserver).
pub fn held_node_ports(svc: &Value) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::new();
    if wants_node_ports(svc) {
        out.extend(
            svc.pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                .filter(|n| *n > 0)
                .map(|n| n as u16),
        );
    }
    out.extend(held_health_check_node_port(svc));
    // Two ports of different protocols may share one NodePort.
    out.sort_unstable();
    out.dedup();
    out
}

/// Drop NodePorts from a Service that must not have them (type changed).
pub fn clear_node_ports(svc: &mut Value) {
    if let Some(ports) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.remove("nodePort");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> ServiceCidr {
        "10.96.0.0/12".parse().unwrap()
    }

    #[test]
    fn health_check_node_port_only_for_local_load_balancers() {
        let lb = serde_json::json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30500, "ports": [{"port": 80, "nodePort": 30080}]}});
        assert_eq!(held_health_check_node_port(&lb), Some(30500));
        assert_eq!(held_node_ports(&lb), vec![30080, 30500]);
        let mut cluster = lb.clone();
        cluster["spec"]["externalTrafficPolicy"] = "Cluster".into();
        assert_eq!(held_health_check_node_port(&cluster), None);
        assert_eq!(held_node_ports(&cluster), vec![30080]);
        let mut node_port = lb.clone();
        node_port["spec"]["type"] = "NodePort".into();
        assert!(!wants_health_check_node_port(&node_port));
    }

    #[test]
    fn cidr_parsing_and_bounds() {
        let c = cidr();
        assert_eq!(c.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(c.contains("10.111.255.254".parse().unwrap()));
        assert!(!c.contains("10.112.0.1".parse().unwrap()));
        assert!(!c.contains("10.96.0.0".parse().unwrap()));
        assert_eq!(c.dynamic_start(), 256);
        assert!("10.96.0.0".parse::<ServiceCidr>().is_err());
        assert!("10.96.0.0/33".parse::<ServiceCidr>().is_err());
    }

    #[test]
    fn defaults_match_kubernetes() {
        let mut s = json!({"metadata":{"name":"web"},"spec":{"ports":[{"port":80}]}});
        default_service(&mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["sessionAffinity"], "None");
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["internalTrafficPolicy"], "Cluster");
        assert!(s["spec"].get("externalTrafficPolicy").is_none());
        let mut n =
            json!({"metadata":{"name":"np"},"spec":{"type":"NodePort","ports":[{"port":80}]}});
        default_service(&mut n);
        assert_eq!(n["spec"]["externalTrafficPolicy"], "Cluster");
    }

    fn messages(s: Value) -> Vec<String> {
        let mut s = s;
        default_service(&mut s);
        validate_service(&s, &cidr())
            .into_iter()
            .map(|e| e.message)
            .collect()
    }

    #[test]
    fn validation_messages() {
        assert_eq!(
            messages(
                json!({"metadata":{"name":"a"},"spec":{"ports":[{"port":70000,"targetPort":80}]}})
            ),
            vec![
                "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
            ]
        );
        assert_eq!(
            messages(json!({"metadata":{"name":"a"},"spec":{}})),
            vec!["spec.ports: Required value"]
        );
        assert_eq!(
            messages(json!({"metadata":{"name":"a"},"spec":{"type":"Foo","ports":[{"port":1}]}})),
            vec!["spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""]
        );
        assert_eq!(
            messages(json!({"metadata":{"name":"a"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":1}]}})),
            vec!["spec.clusterIPs[0]: Invalid value: \"10.0.0.1\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"]
        );
        assert_eq!(
            messages(
                json!({"metadata":{"name":"a"},"spec":{"ports":[{"port":1,"nodePort":30001}]}})
            ),
            vec!["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
        );
        assert_eq!(
            messages(
                json!({"metadata":{"name":"a"},"spec":{"ports":[{"port":1,"name":"x"},{"port":2}]}})
            ),
            vec!["spec.ports[1].name: Required value"]
        );
        assert_eq!(
            messages(json!({"metadata":{"name":"a"},"spec":{"type":"ExternalName"}})),
            vec!["spec.externalName: Required value"]
        );
        assert!(
            messages(json!({"metadata":{"name":"Bad_Name"},"spec":{"ports":[{"port":1}]}}))[0]
                .starts_with("metadata.name: Invalid value: \"Bad_Name\": a DNS-1035 label")
        );
        assert!(messages(json!({"metadata":{"name":"h"},"spec":{"clusterIP":"None"}})).is_empty());
    }

    #[test]
    fn update_keeps_allocations_and_rejects_ip_change() {
        let old = json!({"spec":{"type":"NodePort","clusterIP":"10.96.5.5","clusterIPs":["10.96.5.5"],
            "ports":[{"port":80,"protocol":"TCP","nodePort":30080}]}});
        let mut new = json!({"spec":{"type":"NodePort","ports":[{"port":80,"protocol":"TCP"},{"port":81,"protocol":"TCP"}]}});
        carry_over_allocations(&old, &mut new);
        assert_eq!(new["spec"]["clusterIP"], "10.96.5.5");
        assert_eq!(new["spec"]["ports"][0]["nodePort"], 30080);
        assert!(new["spec"]["ports"][1].get("nodePort").is_none());
        let changed = json!({"spec":{"clusterIP":"10.96.5.6"}});
        assert_eq!(validate_service_update(&old, &changed).len(), 1);
        assert_eq!(held_node_ports(&old), vec![30080]);
        assert_eq!(held_ip(&old), Some(Ipv4Addr::new(10, 96, 5, 5)));
    }
}
