//! The agent's client-side load balancer to the API servers, as k3s's
//! agent runs on 127.0.0.1:6444: the node's own clients (the watches that
//! feed the proxy and DNS, the kubelet, the Node heartbeat) connect to a
//! local port, and each connection is passed on, as plain TCP, to one of
//! the cluster's API servers. TLS stays end to end: every server's serving
//! certificate covers 127.0.0.1, and the client still checks it against the
//! cluster CA and presents its own node certificate.
//!
//! **Which servers.** The ones named on the command line (`--server`), the
//! last known list (`<data-dir>/apiservers.json`, so a restart while the
//! first server is down still finds the others), and, while running, the
//! `kubernetes` EndpointSlice, which every API server keeps listing all
//! live servers ([`crate::apiserver::endpoints`]). An empty or missing slice
//! leaves the list as it was: one dead server never cuts the node off.
//!
//! **Which one.** Connections stick to one *current* server, as k3s's
//! balancer does (so a node's watches see one server's view of the
//! revisions), and move to the next in the list when it refuses or does not
//! answer within [`DIAL_TIMEOUT`]; established connections to a server that
//! dies break, and the clients reconnect (through this balancer, to the next
//! server). When the list changes, the current server stays current if it
//! is still listed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use tokio::net::{TcpListener, TcpStream};

/// How long to wait for a server to accept a connection before trying the
/// next one.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The balancer: where it listens and the servers it spreads over.
#[derive(Clone)]
pub struct ApiLb {
    addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    servers: RwLock<Vec<SocketAddr>>,
    /// Index into `servers` of the server new connections go to first.
    current: AtomicUsize,
    /// Where the last known list is kept.
    file: PathBuf,
}

/// Merge lists: `first`'s servers in order, then the others not yet
/// listed. Pure.
pub fn merge(first: &[SocketAddr], then: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in first.iter().chain(then) {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// The servers an EndpointSlice of the `kubernetes` Service lists (ready
/// endpoints on its `https` port, or its only port). Pure.
pub fn slice_servers(slice: &EndpointSlice) -> Vec<SocketAddr> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .or(ports.first())
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    let Some(port) = port else { return Vec::new() };
    let mut out: Vec<SocketAddr> = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl ApiLb {
    /// Listen on `bind` and balance over `seeds` plus the last known list
    /// kept in `file`.
    pub async fn start(
        bind: SocketAddr,
        seeds: &[SocketAddr],
        file: PathBuf,
    ) -> anyhow::Result<ApiLb> {
        let known: Vec<SocketAddr> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let servers = merge(seeds, &known);
        anyhow::ensure!(!servers.is_empty(), "no API server to balance over");
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| anyhow::anyhow!("API server load balancer on {bind}: {e}"))?;
        let addr = listener.local_addr()?;
        let lb = ApiLb {
            addr,
            state: Arc::new(State {
                servers: RwLock::new(servers.clone()),
                current: AtomicUsize::new(0),
                file,
            }),
        };
        tracing::info!(%addr, servers = ?servers, "API server load balancer listening");
        let accept = lb.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let lb = accept.clone();
                        tokio::spawn(async move { lb.pass(conn).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "API server load balancer: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(lb)
    }

    /// Where the balancer listens (the node's clients connect here).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The servers, in the order they are tried from the current one.
    pub fn servers(&self) -> Vec<SocketAddr> {
        let servers = self.state.servers.read().expect("lock").clone();
        let start = self.state.current.load(Ordering::Relaxed) % servers.len().max(1);
        let mut out = servers[start..].to_vec();
        out.extend_from_slice(&servers[..start]);
        out
    }

    /// Replace the list (ignored when empty), keeping the current server
    /// current if it is still listed, and remember it on disk.
    pub fn set_servers(&self, new: Vec<SocketAddr>) {
        if new.is_empty() {
            return;
        }
        {
            let mut servers = self.state.servers.write().expect("lock");
            if *servers == new && self.state.file.exists() {
                return;
            }
            let current = servers
                .get(self.state.current.load(Ordering::Relaxed))
                .copied();
            let index = current
                .and_then(|c| new.iter().position(|s| *s == c))
                .unwrap_or(0);
            tracing::info!(servers = ?new, "API servers changed");
            *servers = new.clone();
            self.state.current.store(index, Ordering::Relaxed);
        }
        let text: Vec<String> = new.iter().map(ToString::to_string).collect();
        let tmp = self.state.file.with_extension("json.tmp");
        let saved = serde_json::to_vec(&text)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.state.file));
        if let Err(e) = saved {
            tracing::warn!(file = %self.state.file.display(), error = %e, "cannot save the API server list");
        }
    }

    /// Connect one client to the first server that answers, from the
    /// current one on, and relay until either side closes.
    async fn pass(&self, mut client: TcpStream) {
        let servers = self.servers();
        for server in &servers {
            let dial = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server)).await;
            let mut upstream = match dial {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.failed(*server, &e.to_string());
                    continue;
                }
                Err(_) => {
                    self.failed(*server, "no answer");
                    continue;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
        tracing::warn!(servers = ?servers, "no API server answers");
        metrics::counter!("fairlead_apiserver_lb_failed_connections_total").increment(1);
    }

    /// `server` did not take a connection: later connections start at the
    /// next one (only the first to notice moves it).
    fn failed(&self, server: SocketAddr, why: &str) {
        let servers = self.state.servers.read().expect("lock");
        let Some(i) = servers.iter().position(|s| *s == server) else {
            return;
        };
        let next = (i + 1) % servers.len();
        if next != i
            && self
                .state
                .current
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%server, next = %servers[next], error = why, "API server unreachable; switching");
            metrics::counter!("fairlead_apiserver_lb_switches_total").increment(1);
        }
    }

    /// Follow the `kubernetes` EndpointSlice and balance over the servers
    /// it lists. Runs for ever.
    pub async fn follow(self, client: kube::Client) {
        let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
        let config = watcher::Config::default().labels("kubernetes.io/service-name=kubernetes");
        let mut events = std::pin::pin!(watcher(slices, config)
            .backoff(crate::controllers::WatchBackoff::default())
            .applied_objects());
        while let Some(ev) = events.next().await {
            match ev {
                Ok(slice) => self.set_servers(slice_servers(&slice)),
                Err(e) => tracing::debug!(error = %e, "watching the kubernetes EndpointSlice"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn merge_keeps_order_without_duplicates() {
        let got = merge(
            &addrs(&["10.0.0.1:6443"]),
            &addrs(&["10.0.0.2:6443", "10.0.0.1:6443", "10.0.0.3:6443"]),
        );
        assert_eq!(
            got,
            addrs(&["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"])
        );
    }

    #[test]
    fn servers_from_the_kubernetes_slice() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.9"], "conditions": {"ready": false}},
            ],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(
            slice_servers(&slice),
            addrs(&["10.0.0.1:6443", "10.0.0.2:6443"])
        );
        let mut no_ports = slice.clone();
        no_ports.ports = None;
        assert!(slice_servers(&no_ports).is_empty());
    }

    /// Real sockets on loopback: connections go to the current server, move
    /// on when it refuses, and the list is kept on disk for the next start.
    #[tokio::test]
    async fn fails_over_and_remembers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apiservers.json");
        // A port nobody listens on, then a live "server" that says hello.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut c, _)) = live.accept().await {
                let _ = c.write_all(b"hello").await;
            }
        });
        let lb = ApiLb::start("127.0.0.1:0".parse().unwrap(), &[dead_addr], file.clone())
            .await
            .unwrap();
        lb.set_servers(vec![dead_addr, live_addr]);
        let read = || async {
            use tokio::io::AsyncReadExt;
            let mut c = TcpStream::connect(lb.addr()).await.unwrap();
            let mut buf = String::new();
            c.read_to_string(&mut buf).await.unwrap();
            buf
        };
        assert_eq!(read().await, "hello");
        // The dead one was skipped, and is no longer first.
        assert_eq!(lb.servers()[0], live_addr);
        assert_eq!(read().await, "hello");
        // An empty list changes nothing.
        lb.set_servers(Vec::new());
        assert_eq!(lb.servers().len(), 2);
        // A new balancer starts from the remembered list.
        let again = ApiLb::start("127.0.0.1:0".parse().unwrap(), &[], file)
            .await
            .unwrap();
        assert_eq!(again.servers().len(), 2);
    }
}
