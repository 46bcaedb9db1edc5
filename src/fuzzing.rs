//! Fuzz targets: every parser that takes untrusted bytes, each as one
//! function of the input that panics when a property fails. The cargo-fuzz
//! harness under `fuzz/` calls them (nightly, libFuzzer), and
//! `tests/fuzz_regressions.rs` replays the stored corpus and every input
//! that ever crashed through them on stable Rust, so a fixed crash stays
//! fixed. `scripts/fuzz` runs the targets for a while each.
//!
//! | target | input | property |
//! |---|---|---|
//! | [`dns_query`] | a DNS request | the answer path never panics; every reply parses back, echoes the ID and fits the client's UDP size |
//! | [`api_body`] | an API request body | JSON, YAML and protobuf decoding, then the kind's normalisation, defaulting and validation never panic; protobuf's JSON round-trips |
//! | [`selectors`] | a selector string | label and field selectors parse or fail cleanly; what parses prints back to itself |
//! | [`patches`] | `kind byte, object \0 patch` | merge, JSON and strategic merge patches never panic; a merge patch is idempotent |
//! | [`config`] | a `--config` file | KubeProxyConfiguration parsing and applying never panic |
//! | [`nft_netlink`] | a proxy state, as bytes | full and partial nf_tables batches are well-formed netlink; reply parsing takes any bytes |
//! | [`store_keys`] | a key or continue token | continue tokens round-trip, bad ones are refused; a prefix's range end bounds every key under it |

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::api::resources::{Kind, RESOURCES};
use crate::apiserver::objects::{normalize, WriteOpts};

/// The input as text, when it is UTF-8.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

// ---- DNS ---------------------------------------------------------------------

/// The zone the DNS target answers from: a ClusterIP Service, a headless
/// one with named ports and pods, an ExternalName alias, in two namespaces.
fn dns_server() -> &'static crate::dns::DnsServer {
    static SERVER: OnceLock<(tokio::runtime::Runtime, crate::dns::DnsServer)> = OnceLock::new();
    let (_, server) = SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let cfg = crate::dns::DnsConfig {
            listen: vec!["127.0.0.1:0".parse().expect("an address")],
            udp_workers: 1,
            ..Default::default()
        };
        let server = rt
            .block_on(crate::dns::DnsServer::start(cfg))
            .expect("a DNS server on loopback");
        let service = |v: Value| Arc::new(serde_json::from_value(v).expect("a Service"));
        let services = vec![
            service(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.20", "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP"}]},
            })),
            service(serde_json::json!({
                "metadata": {"name": "db", "namespace": "prod"},
                "spec": {"clusterIP": "None", "ports": [
                    {"name": "pg", "port": 5432, "protocol": "TCP"}]},
            })),
            service(serde_json::json!({
                "metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "example.org"},
            })),
        ];
        let slice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-1", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.5"], "hostname": "db-0",
                 "conditions": {"ready": true}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true}},
            ],
        }))
        .expect("an EndpointSlice");
        server.update(&services, &[Arc::new(slice)], &["kube-system".into()]);
        (rt, server)
    });
    server
}

/// The reply to `data` from the target's zone (UDP, or TCP), if any.
pub fn dns_reply(data: &[u8], tcp: bool) -> Option<Vec<u8>> {
    use crate::dns::server::Proto;
    dns_server().answer(data, if tcp { Proto::Tcp } else { Proto::Udp })
}

/// A DNS request into the answer path, over UDP and TCP.
pub fn dns_query(data: &[u8]) {
    use hickory_proto::op::Message;
    use hickory_proto::serialize::binary::BinDecodable;
    let request = Message::from_bytes(data).ok();
    for tcp in [false, true] {
        let Some(reply) = dns_reply(data, tcp) else {
            continue;
        };
        let parsed = Message::from_bytes(&reply)
            .unwrap_or_else(|e| panic!("reply (tcp: {tcp}) does not parse: {e}: {reply:02x?}"));
        assert_eq!(reply[..2], data[..2], "the reply echoes the ID");
        assert!(reply[2] & 0x80 != 0, "QR is set");
        if !tcp {
            // RFC 6891: at most what the client said it takes (512 without
            // EDNS), never above the server's own limit.
            let limit = request
                .as_ref()
                .and_then(|m| m.edns.as_ref().map(|e| e.max_payload()))
                .map_or(512, |p| p.clamp(512, 1232)) as usize;
            assert!(
                reply.len() <= limit,
                "UDP reply of {} bytes over {limit}: {parsed:?}",
                reply.len()
            );
        }
    }
}

// ---- API bodies --------------------------------------------------------------

/// Normalise, default and validate `obj` as `kind` (what a create does
/// before it reaches the store, minus allocation).
fn admit(kind: Kind, obj: Value) {
    let def = crate::api::resources::by_kind(kind);
    let Ok(written) = normalize(def, obj, &WriteOpts::default()) else {
        return;
    };
    let mut obj = written.obj;
    let cidr = "10.96.0.0/12".parse().expect("a CIDR");
    match kind {
        Kind::Service => {
            crate::api::service::default_service(&mut obj);
            crate::api::service::validate_service(&obj, &cidr);
        }
        Kind::Pod => {
            crate::api::pod::default_pod(&mut obj);
            crate::api::pod::validate_pod(&obj);
        }
        Kind::ReplicaSet | Kind::Deployment => {
            let deployment = kind == Kind::Deployment;
            crate::api::workload::default_workload(&mut obj, deployment);
            crate::api::workload::validate_workload(&obj, deployment);
        }
        Kind::PodDisruptionBudget => {
            crate::api::disruption::validate_pdb(&obj);
        }
        _ => {}
    }
}

/// The resource an object names by `kind`, or one picked by the input.
fn kind_of(obj: &Value, data: &[u8]) -> Kind {
    obj.get("kind")
        .and_then(Value::as_str)
        .and_then(|k| RESOURCES.iter().find(|d| d.kind_name == k))
        .map_or_else(
            || RESOURCES[data.first().copied().unwrap_or(0) as usize % RESOURCES.len()].kind,
            |d| d.kind,
        )
}

/// A request body as JSON, YAML and protobuf, then admitted as its kind.
pub fn api_body(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        admit(kind_of(&v, data), v);
    }
    if let Ok(v) = serde_yaml::from_slice::<Value>(data) {
        admit(kind_of(&v, data), v);
    }
    if let Ok(v) = crate::api::protobuf::decode(data) {
        let json = serde_json::to_vec(&v).expect("decoded protobuf serialises");
        let back: Value = serde_json::from_slice(&json).expect("and parses back");
        assert_eq!(back, v, "protobuf's JSON round-trips");
        admit(kind_of(&v, data), v);
    }
}

// ---- selectors ---------------------------------------------------------------

/// Label and field selector strings (and label selectors as JSON).
pub fn selectors(data: &[u8]) {
    use crate::api::selector::{FieldSelector, LabelSelector};
    if let Some(s) = text(data) {
        if let Ok(sel) = LabelSelector::parse(s) {
            let printed = sel.to_string();
            let again = LabelSelector::parse(&printed)
                .unwrap_or_else(|e| panic!("{s:?} printed as {printed:?}, which fails: {e:?}"));
            assert_eq!(again.to_string(), printed, "from {s:?}");
            let labels = serde_json::json!({"app": "web", "tier": "1", "x": ""});
            assert_eq!(sel.matches(Some(&labels)), again.matches(Some(&labels)));
        }
        if let Ok(sel) = FieldSelector::parse(s) {
            let printed = sel.to_string();
            let again = FieldSelector::parse(&printed)
                .unwrap_or_else(|e| panic!("{s:?} printed as {printed:?}, which fails: {e:?}"));
            assert_eq!(again.to_string(), printed, "from {s:?}");
        }
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        let _ = LabelSelector::from_json(&v);
    }
}

// ---- patches -----------------------------------------------------------------

/// `kind byte, object \0 patch`: the three patch types over the object.
pub fn patches(data: &[u8]) {
    use crate::api::patch::{json_patch, merge_patch, strategic_merge_patch};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Some(split) = rest.iter().position(|&b| b == 0) else {
        return;
    };
    let (Ok(orig), Ok(patch)) = (
        serde_json::from_slice::<Value>(&rest[..split]),
        serde_json::from_slice::<Value>(&rest[split + 1..]),
    ) else {
        return;
    };
    if let Ok(once) = merge_patch(&orig, &patch) {
        let twice = merge_patch(&once, &patch).expect("a patch that applied applies again");
        assert_eq!(once, twice, "a merge patch is idempotent (RFC 7386)");
    }
    let _ = json_patch(&orig, &patch);
    let def = &RESOURCES[first as usize % RESOURCES.len()];
    let _ = strategic_merge_patch(&orig, &patch, &|p| def.list_strategy(p));
}

// ---- configuration -----------------------------------------------------------

/// A `--config` file (KubeProxyConfiguration), parsed and applied.
pub fn config(data: &[u8]) {
    use crate::node::config::{FileConfig, NodeConfig};
    let Some(s) = text(data) else {
        return;
    };
    if let Ok((file, _ignored)) = FileConfig::parse(s) {
        let mut cfg = NodeConfig::default();
        let _ = file.apply(&mut cfg);
        let _ = file.kubeconfig();
    }
}

// ---- nf_tables netlink -------------------------------------------------------

/// A proxy state from bytes: 6 per service port (which one, protocol,
/// port, NodePort, endpoints, flags).
fn proxy_state(data: &[u8]) -> crate::proxy::ProxyState {
    use crate::proxy::nftables::sample::{ep, info, spn};
    use crate::proxy::Protocol;
    let mut state = crate::proxy::ProxyState::new();
    for c in data.chunks_exact(6) {
        let i = c[0] % 16;
        let protocol = if c[1] & 1 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let port = u16::from_be_bytes([c[2], c[3]]).max(1);
        let endpoints = (0..c[4] % 6)
            .map(|e| ep(&format!("10.244.{i}.{}:{port}", e + 2), "n1"))
            .collect();
        let mut p = info(&format!("10.96.0.{}", i + 1), port, endpoints);
        if c[5] & 1 != 0 {
            p.node_port = Some(30000 + u16::from(c[5]));
        }
        if c[5] & 2 != 0 {
            p.external_ips = vec!["192.0.2.1".parse().expect("an address")];
        }
        if c[5] & 4 != 0 {
            p.affinity_timeout = Some(std::time::Duration::from_secs(60));
        }
        p.internal_local = c[5] & 8 != 0;
        p.external_local = c[5] & 16 != 0;
        let name = format!("s{i}");
        state.insert(spn("ns", &name, "", protocol), Arc::new(p));
    }
    state
}

/// Full and partial batches for a state are well-formed netlink; any bytes
/// go through the reply parsers.
pub fn nft_netlink(data: &[u8]) {
    use crate::proxy::nftables::diff::{changes, full_ops, partial};
    use crate::proxy::nftables::netlink::{
        attrs, check_well_formed, encode, error_code, messages, rule_handle_comment, Batch,
    };
    use crate::proxy::nftables::ruleset::{table_name, Ruleset, RulesetConfig};
    // Replies from the kernel: parsed, never trusted.
    for m in messages(data) {
        let _ = error_code(m.payload);
        let _ = rule_handle_comment(m.payload.get(4..).unwrap_or_default());
        for (_, v) in attrs(m.payload) {
            let _ = attrs(v).count();
        }
    }
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let shards = 1u32 << (shape % 4);
    let half = rest.len() / 12 * 6;
    let (old, new) = (proxy_state(&rest[..half]), proxy_state(rest));
    let old = Ruleset::build_sharded(RulesetConfig::default(), shards, &old);
    let new = Ruleset::build_sharded(RulesetConfig::default(), shards, &new);
    let mut batch = Batch::new(1);
    let mut n = 0;
    full_ops(&new, &[], &mut |t, op| {
        batch.push(&table_name("fairlead", t), n, op);
        n += 1;
    });
    if let Err(e) = check_well_formed(&batch.finish().bytes) {
        panic!("full batch: {e}");
    }
    let changed = changes(&old, &new);
    let script = partial(&old, &changed);
    // (Rule deletions need handles from the kernel: left to tests/nftables.)
    if !script.deletes_rules() {
        let b = encode("fairlead", &script.ops, 1);
        if let Err(e) = check_well_formed(&b.bytes) {
            panic!("partial batch: {e}");
        }
    }
}

// ---- store keys --------------------------------------------------------------

/// Continue tokens and key ranges.
pub fn store_keys(data: &[u8]) {
    use crate::apiserver::rest::{decode_continue, encode_continue};
    use crate::store::prefix_end;
    let Some(s) = text(data) else {
        return;
    };
    // Any token: a result or a 400, never a panic.
    let _ = decode_continue(s);
    let rev = data.iter().fold(1i64, |r, &b| {
        r.wrapping_mul(31).wrapping_add(i64::from(b)).max(1)
    });
    let (r, k) = decode_continue(&encode_continue(rev, s)).expect("our own token decodes");
    assert_eq!((r, k.as_str()), (rev, s), "a continue token round-trips");
    // Every key under a prefix sorts below the prefix's range end.
    let split = s
        .char_indices()
        .nth(s.chars().count() / 2)
        .map_or(0, |(i, _)| i);
    let prefix = &s[..split];
    let end = prefix_end(prefix);
    if end != [0] {
        assert!(s.as_bytes() < end.as_slice(), "{s:?} under {prefix:?}");
        assert!(prefix.as_bytes() < end.as_slice());
    }
}
