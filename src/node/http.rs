//! The node daemon's plain-HTTP endpoints: Prometheus metrics on
//! `--metrics-bind-address` (127.0.0.1:10249) and kube-proxy's health
//! check on `--healthz-bind-address` (0.0.0.0:10256, `/healthz`, `/livez`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::Health;

type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// Serve `handler` (path → status, content type, body) on `addr`.
pub async fn serve(addr: SocketAddr, handler: Handler) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (code, ct, body) = handler(req.uri().path());
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = code;
                    resp.headers_mut()
                        .insert(hyper::header::CONTENT_TYPE, ct.parse().unwrap());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

/// `/metrics` (and `/healthz` = ok) on the metrics address.
pub async fn spawn_metrics(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    serve(
        addr,
        Arc::new(|path| match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(),
            ),
            "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok".into()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "404 page not found\n".into(),
            ),
        }),
    )
    .await
}

/// kube-proxy's `/healthz` and `/livez`: 200 with a JSON body when the
/// proxy has synced and no change has waited too long, else 503.
pub async fn spawn_healthz(
    addr: SocketAddr,
    health: Arc<Mutex<Health>>,
) -> anyhow::Result<SocketAddr> {
    serve(
        addr,
        Arc::new(move |path| match path {
            "/healthz" | "/livez" => {
                let h = health.lock().unwrap();
                let last = h
                    .last_synced
                    .map(|(_, t)| t.to_string())
                    .unwrap_or_default();
                let body = json!({
                    "lastUpdated": last,
                    "currentTime": jiff::Timestamp::now().to_string(),
                    "nodeEligible": true,
                })
                .to_string();
                let code = if h.healthy() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, "application/json", body)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "404 page not found\n".into(),
            ),
        }),
    )
    .await
}
