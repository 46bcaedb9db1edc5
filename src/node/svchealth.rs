//! kube-proxy's service health checks: for every LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` (all addresses) that tells an external load
//! balancer whether to send this Service's traffic to this node: 200 when
//! the node has ready endpoints of it, 503 when it has none (such traffic
//! would be dropped: a Local policy never leaves the node). The body and
//! headers are kube-proxy's:
//!
//! ```text
//! HTTP/1.1 200 OK
//! Content-Type: application/json
//! X-Content-Type-Options: nosniff
//! X-Load-Balancing-Endpoint-Weight: 2
//!
//! {"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}
//! ```
//!
//! Like the proxy and DNS, it is updated per changed Service from the node
//! loop ([`ServiceHealth::update`] with the dirty keys).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::model::{Cache, ObjectKey};

/// The health check servers of this node, one per Service that has one.
pub struct ServiceHealth {
    node: Arc<str>,
    servers: HashMap<ObjectKey, Server>,
}

struct Server {
    port: u16,
    local: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The number of ready endpoints of `key` on `node` (distinct addresses
/// over all its slices). Pure.
pub fn local_endpoints(cache: &Cache, key: &ObjectKey, node: &str) -> usize {
    cache
        .slices_of(key)
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.ready && e.node_name.as_deref() == Some(node))
        .map(|e| e.address)
        .collect::<BTreeSet<IpAddr>>()
        .len()
}

impl ServiceHealth {
    pub fn new(node: &str) -> ServiceHealth {
        ServiceHealth {
            node: Arc::from(node),
            servers: HashMap::new(),
        }
    }

    /// Bring the servers of the `changed` Services in line with the cache:
    /// start, move, stop, or update the endpoint count.
    pub fn update(&mut self, cache: &Cache, changed: &[ObjectKey]) {
        for key in changed {
            let port = cache
                .service(key)
                .filter(|v| v.is_proxied())
                .and_then(|v| v.health_check_node_port);
            let Some(port) = port else {
                self.servers.remove(key);
                continue;
            };
            let local = local_endpoints(cache, key, &self.node);
            if let Some(s) = self.servers.get(key).filter(|s| s.port == port) {
                s.local.store(local, Ordering::Relaxed);
                continue;
            }
            // New, or moved to another port: the old listener goes first.
            self.servers.remove(key);
            let count = Arc::new(AtomicUsize::new(local));
            match serve(port, key.clone(), count.clone()) {
                Ok(task) => {
                    self.servers.insert(
                        key.clone(),
                        Server {
                            port,
                            local: count,
                            task,
                        },
                    );
                }
                Err(e) => tracing::warn!(service = %format!("{}/{}", key.namespace, key.name),
                    port, error = %e, "cannot serve the service health check"),
            }
        }
    }
}

/// Listen on `0.0.0.0:port` and answer every request with the Service's
/// health.
fn serve(
    port: u16,
    key: ObjectKey,
    local: Arc<AtomicUsize>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    // std sets SO_REUSEADDR, so a port just given up can be taken again.
    let socket = std::net::TcpListener::bind(addr)?;
    socket.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(socket)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (key, local) = (key.clone(), local.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let n = local.load(Ordering::Relaxed);
                    let body = json!({
                        "service": {"namespace": &*key.namespace, "name": &*key.name},
                        "localEndpoints": n,
                        "serviceProxyHealthy": true,
                    })
                    .to_string();
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = if n > 0 {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let h = resp.headers_mut();
                    h.insert(
                        hyper::header::CONTENT_TYPE,
                        "application/json".parse().unwrap(),
                    );
                    h.insert("X-Content-Type-Options", "nosniff".parse().unwrap());
                    h.insert("X-Load-Balancing-Endpoint-Weight", n.into());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }))
}
