//! The `kubernetes` Service's endpoints: every live API server of the
//! cluster, so in-cluster clients and the node agents' client-side load
//! balancers ([`crate::node::apilb`]) learn all of them.
//!
//! This is kube-apiserver's "lease" endpoint reconciler, with the leases
//! kept as ordinary objects: each API server holds a coordination Lease
//! `kube-system/apiserver-<address>` (label
//! `apiserver.kubernetes.io/identity=kube-apiserver`, `holderIdentity` its
//! `ip:port`), renews it every [`RENEW`], and after each renewal writes the
//! addresses of the leases that have not expired into the `kubernetes`
//! Endpoints and EndpointSlice — only when they differ, with the revision
//! read as precondition, so several servers agree without fighting. A
//! server that dies stops renewing; the next renewal of any live one drops
//! it after [`LEASE_SECONDS`]. A server that stops cleanly removes itself
//! at once ([`leave`]).
//!
//! All servers must listen on the same port: one port is published, as
//! kube-apiserver does.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::objects::{decode, WriteOpts};
use super::Server;
use crate::api::meta::meta_str;
use crate::api::resources::{self, Kind};

/// How often a server renews its lease and reconciles the endpoints.
pub const RENEW: Duration = Duration::from_secs(5);
/// How long a lease lives without renewal (kube-apiserver's master lease
/// TTL is 15 s too).
pub const LEASE_SECONDS: i64 = 15;

const NAMESPACE: &str = "kube-system";
const IDENTITY_LABEL: &str = "apiserver.kubernetes.io/identity";
const IDENTITY: &str = "kube-apiserver";

/// The lease name of the API server at `ip`.
fn lease_name(ip: IpAddr) -> String {
    let ip = ip.to_string().replace([':', '.'], "-");
    format!("apiserver-{ip}")
}

/// The addresses of the live leases, `me` always among them, sorted.
/// `leases` are (holder `ip:port`, renewTime, leaseDurationSeconds); `now`
/// is in seconds since the epoch. Pure, for the tests.
pub fn live_addresses(leases: &[(String, String, i64)], now: i64, me: IpAddr) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = leases
        .iter()
        .filter_map(|(holder, renewed, seconds)| {
            let renewed: jiff::Timestamp = renewed.parse().ok()?;
            if renewed.as_second() + seconds < now {
                return None;
            }
            let addr: std::net::SocketAddr = holder.parse().ok()?;
            Some(addr.ip())
        })
        .chain([me])
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The `kubernetes` Endpoints and EndpointSlice for `ips` on `port`.
fn endpoint_objects(ips: &[IpAddr], port: u16) -> [(Kind, Value); 2] {
    let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let family = match ips.first() {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    [
        (
            Kind::Endpoints,
            json!({"metadata": {"name": "kubernetes", "namespace": "default",
                                "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                   "subsets": [{"addresses": addresses,
                                "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]}),
        ),
        (
            Kind::EndpointSlice,
            json!({"metadata": {"name": "kubernetes", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "kubernetes",
                                           "endpointslice.kubernetes.io/managed-by": "fairlead-apiserver"}},
                   "addressType": family,
                   "endpoints": endpoints,
                   "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}),
        ),
    ]
}

/// The addresses an Endpoints or EndpointSlice object lists, sorted.
fn listed(kind: Kind, obj: &Value) -> Vec<String> {
    let mut out: Vec<String> = match kind {
        Kind::Endpoints => obj["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| a["ip"].as_str().map(str::to_string))
            .collect(),
        _ => obj["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
    };
    out.sort();
    out
}

impl Server {
    /// Renew this server's lease and bring the `kubernetes` endpoints in
    /// line with the live leases. Errors are logged; the next round retries.
    pub(super) async fn reconcile_endpoints(&self) {
        if let Err(e) = self.try_reconcile_endpoints(true).await {
            tracing::debug!(error = %e, "apiserver endpoints not reconciled this round");
        }
    }

    async fn try_reconcile_endpoints(&self, alive: bool) -> anyhow::Result<()> {
        let me = self.config.advertise_address();
        let port = self.config.secure_port;
        let opts = WriteOpts::default();
        let lease_def = resources::by_kind(Kind::Lease);
        let name = lease_name(me);
        if alive {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": NAMESPACE,
                             "labels": {IDENTITY_LABEL: IDENTITY}},
                "spec": {"holderIdentity": format!("{}", std::net::SocketAddr::new(me, port)),
                         "leaseDurationSeconds": LEASE_SECONDS,
                         "renewTime": jiff::Timestamp::now()
                            .strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()}});
            match self.get_object(lease_def, Some(NAMESPACE), &name).await {
                Ok(_) => {
                    self.update_object(lease_def, Some(NAMESPACE), &name, lease, None, &opts)
                        .await
                        .map_err(|e| anyhow::anyhow!("renewing {name}: {}", e.message))?;
                }
                Err(e) if e.code == 404 => {
                    self.create_object(lease_def, Some(NAMESPACE), lease, &opts)
                        .await
                        .map_err(|e| anyhow::anyhow!("creating {name}: {}", e.message))?;
                }
                Err(e) => anyhow::bail!("reading {name}: {}", e.message),
            }
        }
        let mut leases = Vec::new();
        for kv in self
            .store
            .list_all(&lease_def.prefix(Some(NAMESPACE)))
            .await?
            .kvs
        {
            let Ok(obj) = decode(&kv) else { continue };
            if obj.pointer(&format!(
                "/metadata/labels/{}",
                IDENTITY_LABEL.replace('/', "~1")
            )) != Some(&json!(IDENTITY))
            {
                continue;
            }
            if !alive && meta_str(&obj, "name") == Some(name.as_str()) {
                continue;
            }
            let spec = &obj["spec"];
            leases.push((
                spec["holderIdentity"].as_str().unwrap_or("").to_string(),
                spec["renewTime"].as_str().unwrap_or("").to_string(),
                spec["leaseDurationSeconds"]
                    .as_i64()
                    .unwrap_or(LEASE_SECONDS),
            ));
        }
        let now = jiff::Timestamp::now().as_second();
        let mut ips = live_addresses(&leases, now, me);
        if !alive {
            ips.retain(|ip| *ip != me);
            if ips.is_empty() {
                // The last server: leave the endpoints as they are (the
                // Service keeps pointing at where the cluster was).
                return Ok(());
            }
        }
        let want: Vec<String> = ips.iter().map(ToString::to_string).collect();
        for (kind, mut obj) in endpoint_objects(&ips, port) {
            let def = resources::by_kind(kind);
            match self.get_object(def, Some("default"), "kubernetes").await {
                Ok((current, rev)) => {
                    if listed(kind, &current) == want {
                        continue;
                    }
                    // Based on what was read: a concurrent update by another
                    // server wins, and the next round looks again.
                    obj["metadata"]["resourceVersion"] = json!(rev.to_string());
                    self.update_object(def, Some("default"), "kubernetes", obj, None, &opts)
                        .await
                        .map_err(|e| anyhow::anyhow!("updating {}: {}", def.plural, e.message))?;
                    tracing::info!(kind = def.kind_name, servers = ?want, "kubernetes endpoints updated");
                }
                Err(e) if e.code == 404 => {
                    self.create_object(def, Some("default"), obj, &opts)
                        .await
                        .map_err(|e| anyhow::anyhow!("creating {}: {}", def.plural, e.message))?;
                }
                Err(e) => anyhow::bail!("reading {}: {}", def.plural, e.message),
            }
        }
        Ok(())
    }

    /// Renew the lease and reconcile every [`RENEW`], for ever.
    pub(super) fn spawn_endpoint_reconciler(&self) {
        let srv = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW).await;
                srv.reconcile_endpoints().await;
            }
        });
    }
}

/// Stop announcing `server`: delete its lease and take its address out of
/// the `kubernetes` endpoints (unless it is the last one), so clients move
/// to the other servers at once instead of after the lease expires.
pub async fn leave(server: &Server) {
    let me = server.config.advertise_address();
    let def = resources::by_kind(Kind::Lease);
    let name = lease_name(me);
    if let Err(e) = server.try_reconcile_endpoints(false).await {
        tracing::debug!(error = %e, "could not take this server out of the kubernetes endpoints");
    }
    let _ = server
        .delete_object(def, Some(NAMESPACE), &name, (None, None), false)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_leases_and_always_me() {
        let me: IpAddr = "10.0.0.1".parse().unwrap();
        let now = 1_000_000;
        let at = |s: i64| {
            jiff::Timestamp::from_second(s)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
                .to_string()
        };
        let leases = vec![
            ("10.0.0.3:6443".to_string(), at(now - 5), 15),
            ("10.0.0.2:6443".to_string(), at(now - 15), 15),
            // Expired.
            ("10.0.0.4:6443".to_string(), at(now - 16), 15),
            // Garbage is ignored.
            ("nonsense".to_string(), at(now), 15),
            ("10.0.0.5:6443".to_string(), "yesterday".to_string(), 15),
            // Our own, also listed.
            ("10.0.0.1:6443".to_string(), at(now), 15),
        ];
        let got: Vec<String> = live_addresses(&leases, now, me)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(live_addresses(&[], now, me), vec![me]);
    }

    #[test]
    fn objects_list_what_they_publish() {
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        for (kind, obj) in endpoint_objects(&ips, 6443) {
            assert_eq!(listed(kind, &obj), ["10.0.0.1", "10.0.0.2"], "{kind:?}");
        }
        assert_eq!(
            lease_name("10.0.0.1".parse().unwrap()),
            "apiserver-10-0-0-1"
        );
        assert_eq!(lease_name("fd00::1".parse().unwrap()), "apiserver-fd00--1");
    }
}
