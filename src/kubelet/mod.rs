//! The node agent's pod half (what the kubelet does): run the Pods bound
//! to this node (`spec.nodeName`) and report their status.
//!
//! * [`run`] — wait for the node's pod CIDR, set up the pod network, then
//!   watch this node's Pods and hand each to its own worker task;
//!   leftovers of pods that no longer exist (namespaces, addresses,
//!   cgroups, files) are removed once the first list is in.
//! * [`pod`] — one pod's worker: sandbox, containers, restarts, probes,
//!   graceful deletion, status.
//! * [`lifecycle`] — the kubelet's rules as pure functions (restart
//!   policy, CrashLoopBackOff, phase, conditions, the status object).
//! * [`runtime`] — the container runtime trait and the process runtime.
//! * [`network`] — the built-in CNI: bridge, veth, netns, IPAM, masquerade.
//! * [`cgroup`] — a cgroup (v1 or v2) per pod with its limits.
//! * [`probe`] — startup, readiness and liveness probes.
//! * [`env`] — environment variables, `resolv.conf` and `hosts`.
//! * [`server`] — the HTTPS port 10250: container logs for `pods/log`,
//!   and [`rotate_logs`] keeps each log file under a size.

pub mod cgroup;
pub mod env;
pub mod lifecycle;
pub mod network;
pub mod pod;
pub mod probe;
pub mod runtime;
pub mod server;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{mpsc, watch};

use crate::api::service::ServiceCidr;
use cgroup::Cgroups;
use lifecycle::Backoff;
use network::PodNetwork;
use runtime::{ProcessRuntime, Runtime};

/// Settings of the pod agent.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub node_name: String,
    /// Pod state (logs, resolv.conf, address allocations).
    pub data_dir: PathBuf,
    /// The whole pod range (`--cluster-cidr`): traffic leaving it is
    /// masqueraded.
    pub cluster_cidr: ServiceCidr,
    /// `--pod-cidr`; `None`: the Node's `spec.podCIDR`, once node IPAM
    /// has set it.
    pub pod_cidr: Option<ServiceCidr>,
    pub dns: Option<env::ClusterDns>,
    /// The node's address (status.hostIP, hostNetwork pods' IP).
    pub host_ip: IpAddr,
    pub backoff: Backoff,
    /// The cluster CA (PEM): clients of port 10250 must hold a
    /// certificate of it. `None`: the port is not served.
    pub client_ca: Option<Vec<u8>>,
    /// Rotate a container's log file past this size
    /// (`--container-log-max-size`).
    pub log_max_bytes: u64,
}

/// What every pod worker shares.
pub struct Ctx {
    client: kube::Client,
    cfg: KubeletConfig,
    net: Option<PodNetwork>,
    cgroups: Cgroups,
    runtime: Arc<dyn Runtime>,
    /// The node's own resolv.conf (search domains and servers that pods
    /// inherit).
    host_resolv: String,
}

/// How often container logs are checked for rotation.
const LOG_ROTATE_EVERY: Duration = Duration::from_secs(10);

/// Rotate every container log under `pods_dir` larger than `max` bytes:
/// copy it to `<file>.1` (replacing the older one) and truncate it. The
/// container writes with O_APPEND, so it goes on at the new end.
pub fn rotate_logs(pods_dir: &std::path::Path, max: u64) {
    let Ok(pods) = std::fs::read_dir(pods_dir) else {
        return;
    };
    for pod in pods.flatten() {
        let Ok(containers) = std::fs::read_dir(pod.path().join("logs")) else {
            continue;
        };
        for c in containers.flatten() {
            let Ok(files) = std::fs::read_dir(c.path()) else {
                continue;
            };
            for f in files.flatten() {
                let p = f.path();
                let big = p.extension().is_some_and(|e| e == "log")
                    && f.metadata().is_ok_and(|m| m.len() > max);
                if big && std::fs::copy(&p, p.with_extension("log.1")).is_ok() {
                    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&p) {
                        let _ = file.set_len(0);
                    }
                }
            }
        }
    }
}

/// How often the agent looks for its Node's pod CIDR while it has none.
const POD_CIDR_POLL: Duration = Duration::from_millis(500);

async fn wait_for_pod_cidr(client: &kube::Client, node: &str) -> ServiceCidr {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut warned = false;
    loop {
        if let Ok(Some(n)) = nodes.get_opt(node).await {
            if let Some(c) = n.spec.and_then(|s| s.pod_cidr).and_then(|c| c.parse().ok()) {
                return c;
            }
        }
        if !warned {
            tracing::info!(
                node,
                "waiting for the node's pod CIDR (node IPAM in the controllers)"
            );
            warned = true;
        }
        tokio::time::sleep(POD_CIDR_POLL).await;
    }
}

/// Run this node's pods until the future is dropped.
pub async fn run(client: kube::Client, cfg: KubeletConfig) -> anyhow::Result<()> {
    let pod_cidr = match cfg.pod_cidr {
        Some(c) => c,
        None => wait_for_pod_cidr(&client, &cfg.node_name).await,
    };
    let net = PodNetwork::new(pod_cidr, cfg.cluster_cidr, &cfg.data_dir);
    let net = match net.ensure_node().await {
        Ok(()) => Some(net),
        Err(e) => {
            tracing::warn!(error = %e, "no pod network: only hostNetwork pods can run");
            None
        }
    };
    tracing::info!(node = %cfg.node_name, pod_cidr = %pod_cidr, "running pods");
    match &cfg.client_ca {
        Some(ca) => {
            let names = vec![cfg.node_name.clone(), cfg.host_ip.to_string()];
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], server::PORT));
            if let Err(e) = server::spawn(addr, cfg.data_dir.clone(), ca, names).await {
                tracing::warn!(error = %e, "no container logs: the kubelet port is not served");
            }
        }
        None => tracing::warn!("no cluster CA in the kubeconfig: container logs are not served"),
    }
    {
        let (dir, max) = (cfg.data_dir.join("pods"), cfg.log_max_bytes);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOG_ROTATE_EVERY).await;
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || rotate_logs(&dir, max)).await;
            }
        });
    }
    let node = cfg.node_name.clone();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        net,
        cgroups: Cgroups::detect(),
        runtime: Arc::new(ProcessRuntime),
        host_resolv: std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        cfg,
    });
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events =
        std::pin::pin!(watcher(api, wc).backoff(crate::controllers::WatchBackoff::default()));
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { anyhow::bail!("the pod watch ended") };
                match ev {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(p)) => {
                        listed.insert(p.metadata.uid.clone().unwrap_or_default());
                        dispatch(&ctx, &mut workers, &done_tx, p);
                    }
                    Ok(watcher::Event::Apply(p)) => dispatch(&ctx, &mut workers, &done_tx, p),
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(w) = workers.get(p.metadata.uid.as_deref().unwrap_or_default()) {
                            w.send_replace(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        for (uid, w) in &workers {
                            if !listed.contains(uid) {
                                w.send_replace(None);
                            }
                        }
                        let ctx = ctx.clone();
                        let keep = listed.clone();
                        tokio::spawn(async move { remove_leftovers(&ctx, &keep).await });
                    }
                    Err(e) => tracing::warn!(error = %e, "watching this node's pods"),
                }
            }
            Some(uid) = done.recv() => {
                // A worker that ended while its pod was re-created under the
                // same uid cannot happen (uids are unique); just forget it.
                workers.remove(&uid);
            }
        }
    }
}

/// Hand `pod` to its worker, starting one for a pod seen first.
fn dispatch(
    ctx: &Arc<Ctx>,
    workers: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    done: &mpsc::UnboundedSender<String>,
    pod: Pod,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if let Some(w) = workers.get(&uid) {
        w.send_replace(Some(pod));
        return;
    }
    let (tx, rx) = watch::channel(Some(pod));
    workers.insert(uid.clone(), tx);
    let (ctx, done) = (ctx.clone(), done.clone());
    tokio::spawn(async move {
        pod::run(ctx, rx).await;
        let _ = done.send(uid);
    });
}

/// Remove what pods that are not in `keep` left behind: their network
/// namespaces, addresses, cgroups (and processes) and files.
async fn remove_leftovers(ctx: &Ctx, keep: &HashSet<String>) {
    let pods_dir = ctx.cfg.data_dir.join("pods");
    let mut uids: HashSet<String> = std::fs::read_dir(&pods_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    if let Some(net) = &ctx.net {
        uids.extend(net.allocations().into_iter().map(|(_, u)| u));
    }
    for uid in uids.difference(keep) {
        tracing::info!(uid, "removing what a deleted pod left behind");
        remove_pod_state(
            ctx.cfg.data_dir.as_path(),
            &ctx.cgroups,
            ctx.net.as_ref(),
            uid,
        )
        .await;
    }
}

async fn remove_pod_state(
    data_dir: &std::path::Path,
    cgroups: &Cgroups,
    net: Option<&PodNetwork>,
    uid: &str,
) {
    let dir = data_dir.join("pods").join(uid);
    // Without cgroups, the recorded container processes are all we know.
    for e in std::fs::read_dir(dir.join("pids"))
        .into_iter()
        .flatten()
        .flatten()
    {
        runtime::kill_recorded(&e.path());
    }
    let cg = cgroups.pod(uid);
    let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
    if let Ok(n) = std::fs::read_to_string(dir.join("netns")) {
        network::remove_netns(n.trim()).await;
    }
    if let Some(net) = net {
        net.release(uid);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `fairlead node --cleanup`: every pod's processes, cgroup, namespace and
/// files under `data_dir`, the address allocations, the bridge and the
/// masquerade table.
pub async fn cleanup(data_dir: &std::path::Path) {
    let cgroups = Cgroups::detect();
    let mut uids: HashSet<String> = std::fs::read_dir(data_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    // Allocations name their pods too (a pod whose directory is gone).
    for e in std::fs::read_dir(data_dir.join("network").join("ips"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(u) = std::fs::read_to_string(e.path()) {
            uids.insert(u.trim().to_string());
        }
    }
    for uid in &uids {
        remove_pod_state(data_dir, &cgroups, None, uid).await;
    }
    let _ = std::fs::remove_dir_all(data_dir.join("network"));
    cgroups.remove_parents_if_empty();
    network::remove_node().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_one_older_file_and_empties_the_current() {
        let d = tempfile::tempdir().unwrap();
        let logs = d.path().join("uid-1/logs/c");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("0.log"), "x".repeat(100)).unwrap();
        std::fs::write(logs.join("1.log"), "small\n").unwrap();
        std::fs::write(logs.join("0.exited"), "y".repeat(100)).unwrap();
        rotate_logs(d.path(), 50);
        assert_eq!(
            std::fs::read_to_string(logs.join("0.log.1")).unwrap().len(),
            100
        );
        assert_eq!(std::fs::metadata(logs.join("0.log")).unwrap().len(), 0);
        assert_eq!(
            std::fs::read_to_string(logs.join("1.log")).unwrap(),
            "small\n"
        );
        assert!(!logs.join("1.log.1").exists());
        assert_eq!(
            std::fs::metadata(logs.join("0.exited")).unwrap().len(),
            100,
            "only logs rotate"
        );
    }
}
