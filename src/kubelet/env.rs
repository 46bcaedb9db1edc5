//! What a container sees of its pod, as the kubelet builds it: the
//! environment (`env` with `fieldRef`, the Service variables, `$(VAR)`
//! expansion) and the pod's `/etc/resolv.conf` and `/etc/hosts`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Service};

/// Facts about a running pod that `fieldRef`s and files refer to.
#[derive(Clone, Debug, Default)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

/// The cluster DNS a ClusterFirst pod uses.
#[derive(Clone, Debug)]
pub struct ClusterDns {
    pub server: String,
    pub domain: String,
}

/// The value of `fieldRef.fieldPath` for `pod`.
fn field(pod: &Pod, f: &PodFacts, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let label_or_annotation = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("']"))
            .map(|k| {
                map.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    if let Some(v) = label_or_annotation("metadata.labels['", &m.labels) {
        return Ok(v);
    }
    if let Some(v) = label_or_annotation("metadata.annotations['", &m.annotations) {
        return Ok(v);
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => f.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => f.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => f.host_ip.clone(),
        other => return Err(format!("unsupported fieldRef fieldPath {other:?}")),
    })
}

/// Expand `$(VAR)` references from `vars` (`$$` is a literal `$`;
/// unknown references stay as written), as the kubelet does for `command`,
/// `args` and `env` values.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) if vars.contains_key(&inner[..end]) => {
                    out.push_str(&vars[&inner[..end]]);
                    rest = &inner[end + 1..];
                }
                Some(end) => {
                    out.push_str(&rest[i..i + 2 + end + 1]);
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The Service variables (`<NAME>_SERVICE_HOST`, `_SERVICE_PORT`,
/// `_SERVICE_PORT_<PORT>`, and the Docker-link `<NAME>_PORT...` family)
/// for `services` (headless and external-name ones excluded).
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = &s.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|i| !i.is_empty() && *i != "None")
        else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = s
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .to_uppercase()
            .replace('-', "_");
        out.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.as_deref().unwrap_or("TCP").to_string()
        };
        out.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in ports {
            let pr = proto(p);
            let prefix = format!("{name}_PORT_{}_{pr}", p.port);
            out.push((
                prefix.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            out.push((format!("{prefix}_PROTO"), pr.to_lowercase()));
            out.push((format!("{prefix}_PORT"), p.port.to_string()));
            out.push((format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// A container's environment: the Service variables first, then its own
/// `env` (which may refer to them, and to earlier entries, with `$(VAR)`).
/// Errors are for sources this node cannot resolve (a `configMapKeyRef`
/// while there are no ConfigMaps, an unknown fieldPath).
pub fn container_env(
    pod: &Pod,
    c: &Container,
    facts: &PodFacts,
    services: &[Service],
) -> Result<Vec<(String, String)>, String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for (k, v) in service_env(services) {
        set(&mut vars, k, v);
    }
    for e in c.env.as_deref().unwrap_or_default() {
        let v = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(src) = &e.value_from {
            if let Some(fr) = &src.field_ref {
                field(pod, facts, &fr.field_path)?
            } else if src.resource_field_ref.is_some() {
                return Err(format!("env {}: resourceFieldRef is not supported", e.name));
            } else {
                return Err(format!(
                    "env {}: ConfigMap and Secret references are not supported on this node",
                    e.name
                ));
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), v);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars[&k].clone();
            (k, v)
        })
        .collect())
}

/// The pod's `/etc/resolv.conf`, or `None` to keep the host's: the
/// `dnsPolicy` (ClusterFirst, ClusterFirstWithHostNet, Default, None) and
/// `dnsConfig` rules; `host` is the node's own resolv.conf.
pub fn resolv_conf(pod: &Pod, dns: Option<&ClusterDns>, host: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_search: Vec<String> = host
        .lines()
        .filter_map(|l| l.strip_prefix("search "))
        .flat_map(|s| s.split_whitespace().map(String::from))
        .collect();
    let host_servers: Vec<String> = host
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .collect();
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    let (mut servers, mut search, mut options) = match (policy, dns) {
        (_, Some(d)) if cluster_first => {
            let mut s = vec![
                format!("{ns}.svc.{}", d.domain),
                format!("svc.{}", d.domain),
                d.domain.clone(),
            ];
            s.extend(host_search);
            (vec![d.server.clone()], s, vec!["ndots:5".to_string()])
        }
        ("None", _) => (Vec::new(), Vec::new(), Vec::new()),
        _ if host_network && policy != "None" && dns.is_none() => return None,
        _ => (host_servers, host_search, Vec::new()),
    };
    if let Some(cfg) = &spec.dns_config {
        servers.extend(cfg.nameservers.iter().flatten().cloned());
        search.extend(cfg.searches.iter().flatten().cloned());
        for o in cfg.options.iter().flatten() {
            let Some(name) = &o.name else { continue };
            options.retain(|x| x.split(':').next() != Some(name.as_str()));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            });
        }
    }
    let mut out = String::new();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    Some(out)
}

/// The pod's `/etc/hosts` (the kubelet's layout, plus `hostAliases`).
pub fn hosts(pod: &Pod, pod_ip: &str) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| name.to_string());
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    out.push_str(&format!("{pod_ip}\t{hostname}\n"));
    for a in spec
        .and_then(|s| s.host_aliases.as_ref())
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "\n# Entries added by HostAliases.\n{}\t{}\n",
            a.ip,
            a.hostnames.as_deref().unwrap_or_default().join("\t")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn svc(name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"clusterIP": ip, "ports": ports},
        }))
        .unwrap()
    }

    #[test]
    fn env_has_field_refs_service_links_and_expansion() {
        let p = pod(json!({"containers": [{"name": "c", "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(WEB_API_SERVICE_HOST):$(WEB_API_SERVICE_PORT)/$(POD) $$(POD) $(NOPE)"},
        ]}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let facts = PodFacts {
            pod_ip: "10.244.0.7".into(),
            host_ip: "192.0.2.1".into(),
            node_name: "n1".into(),
        };
        let services = [
            svc(
                "web-api",
                "10.96.0.20",
                json!([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            ),
            svc("headless", "None", json!([{"port": 80}])),
        ];
        let env: BTreeMap<_, _> = container_env(&p, c, &facts, &services)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(env["POD"], "web-1");
        assert_eq!(env["NS"], "shop");
        assert_eq!(env["IP"], "10.244.0.7");
        assert_eq!(env["NODE"], "n1");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["URL"], "http://10.96.0.20:80/web-1 $(POD) $(NOPE)");
        assert_eq!(env["WEB_API_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["WEB_API_PORT"], "tcp://10.96.0.20:80");
        assert_eq!(env["WEB_API_PORT_53_UDP_ADDR"], "10.96.0.20");
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS")));
    }

    #[test]
    fn resolv_conf_follows_dns_policy() {
        let dns = ClusterDns {
            server: "10.96.0.10".into(),
            domain: "cluster.local".into(),
        };
        let host = "search corp.example\nnameserver 192.0.2.53\n";
        let first = resolv_conf(&pod(json!({"containers": []})), Some(&dns), host).unwrap();
        assert_eq!(
            first,
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        let default = resolv_conf(
            &pod(json!({"dnsPolicy": "Default", "containers": []})),
            Some(&dns),
            host,
        )
        .unwrap();
        assert_eq!(default, "search corp.example\nnameserver 192.0.2.53\n");
        let none = resolv_conf(
            &pod(json!({"dnsPolicy": "None", "containers": [], "dnsConfig": {
                "nameservers": ["1.1.1.1"], "searches": ["a.example"], "options": [{"name": "ndots", "value": "2"}]}})),
            Some(&dns),
            host,
        )
        .unwrap();
        assert_eq!(
            none,
            "search a.example\nnameserver 1.1.1.1\noptions ndots:2\n"
        );
        let host_net = resolv_conf(
            &pod(json!({"hostNetwork": true, "containers": []})),
            Some(&dns),
            host,
        )
        .unwrap();
        assert_eq!(host_net, "search corp.example\nnameserver 192.0.2.53\n");
    }

    #[test]
    fn hosts_names_the_pod() {
        let h = hosts(
            &pod(
                json!({"containers": [], "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.local", "bar"]}]}),
            ),
            "10.244.0.7",
        );
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("10.244.0.7\tweb-1\n"));
        assert!(h.contains("10.1.2.3\tfoo.local\tbar\n"));
    }
}
