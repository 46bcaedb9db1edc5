//! Per-request balancing for service ports that opt in with `appProtocol`
//! (`kubernetes.io/h2c`/`grpc`, `http`/`kubernetes.io/http`): what an L4
//! balancer cannot do for a client that keeps one connection (an HTTP/2 or
//! gRPC channel, an HTTP/1.1 keep-alive client), whose every request would
//! otherwise go to the one endpoint its connection was balanced to
//! (kubernetes/kubernetes issue 38456).
//!
//! ```text
//!  client ─ HTTP/1.1 or h2c ─► frontend (hyper server, either protocol)
//!     each request: rt.choose (the port's round robin, backoff, affinity)
//!        └─► that endpoint's Upstream (kept in its EndpointLife):
//!              H2c:   one multiplexed HTTP/2 connection
//!              Http1: a pool of idle keep-alive connections
//!     response: headers, streamed body and trailers (grpc-status) as they come
//! ```
//!
//! A request that surely never reached an endpoint (the connect failed, or
//! the pooled connection was closed before the request was written) goes to
//! the next endpoint; any later failure is the client's: 502 Bad Gateway,
//! or for gRPC a trailers-only UNAVAILABLE (status 14). A gRPC stream is
//! one request, so each stream stays on one endpoint. An HTTP/1.1 upgrade
//! (WebSocket) gets a connection of its own and, after `101`, both sides
//! are spliced as bytes (L4).
//!
//! Removed endpoints get no new requests (they are not in the routing
//! table); their connections live in their [`EndpointLife`] and close once
//! the last in-flight request is done and the table forgets them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};

use super::routes::{EndpointLife, Role, ServiceRuntime};
use crate::proxy::AppProtocol;

/// What a frontend answers with: an endpoint's response as it streams, or
/// one of ours.
pub(crate) type RespBody = Either<Incoming, Full<Bytes>>;

/// Idle keep-alive connections kept per endpoint (HTTP/1.1).
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// The connections to one endpoint, shared by every request the port
/// sends it, kept per event loop ([`crate::workers::current_loop`]): a
/// connection's task lives on the loop that opened it, so a request sent
/// on another loop's connection would cross threads twice (it did: one
/// HTTP/2 connection per endpoint for all loops).
#[derive(Default)]
pub(crate) struct Upstream {
    /// HTTP/2: one connection per loop, every stream of that loop on it.
    h2: std::sync::Mutex<Vec<Option<http2::SendRequest<Incoming>>>>,
    /// Held while connecting, so concurrent requests share the new one.
    h2_connecting: tokio::sync::Mutex<()>,
    /// HTTP/1.1: idle connections per loop, each ready for its next request.
    h1: std::sync::Mutex<Vec<Vec<http1::SendRequest<Incoming>>>>,
}

/// This thread's loop: the index of its upstream slots.
fn loop_index() -> usize {
    crate::workers::current_loop().unwrap_or(0)
}

/// Slot `i` of a per-loop vector, grown to have it.
fn slot<T: Default>(v: &mut Vec<T>, i: usize) -> &mut T {
    if v.len() <= i {
        v.resize_with(i + 1, T::default);
    }
    &mut v[i]
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

/// Serve one client connection of an L7 port until it closes.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    rt: Arc<ServiceRuntime>,
    role: Role,
    app: AppProtocol,
) {
    // (TCP_NODELAY: inherited from the listener, `sys::tcp_listener`.)
    rt.metrics.connections.increment(1);
    rt.metrics.active.increment(1.0);
    let _active = super::tcp::Active(&rt.metrics.active);
    let svc_rt = rt.clone();
    let svc = hyper::service::service_fn(move |req| {
        let rt = svc_rt.clone();
        // Boxed: hyper spawns a task per HTTP/2 stream, and moving the
        // whole (large) forwarding future into each task was a tenth of
        // the proxy's CPU.
        let fwd = Box::pin(async move { forward(&rt, role, peer, app, req).await });
        async move { Ok::<_, Infallible>(fwd.await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(client), svc)
        .await
    {
        tracing::trace!(service = %rt.name, error = %e, "L7 client connection ended");
    }
}

/// Why a request was not answered by an endpoint. (Returned once per
/// failed try, so its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum SendError {
    /// It never reached the endpoint: try the next one with it.
    Unsent(Request<Incoming>, String),
    /// It may have: the client gets the error.
    Failed(String),
}

/// Balance one request: the chosen endpoint, then the next ones while it
/// surely was not sent (at most one try per endpoint).
async fn forward(
    rt: &ServiceRuntime,
    role: Role,
    peer: SocketAddr,
    app: AppProtocol,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let grpc = is_grpc(req.headers());
    if is_upgrade(&req) {
        return upgrade(rt, role, peer, req, started).await;
    }
    let mut req = prepare(req, app);
    let routes = rt.routes();
    // Filled in only when a try fails (no allocation per request).
    let mut why = std::borrow::Cow::Borrowed("no endpoints");
    for _ in 0..routes.set(role).len() {
        let Some(ep) = rt.choose(&routes, role, peer.ip(), Instant::now()) else {
            break;
        };
        let sent = match app {
            AppProtocol::H2c => send_h2(&ep, req, rt).await,
            AppProtocol::Http1 => send_h1(&ep, req, rt).await,
        };
        match sent {
            Ok(resp) => {
                ep.mark_ok();
                rt.metrics.http_response(resp.status().as_u16(), started);
                return resp.map(Either::Left);
            }
            Err(SendError::Unsent(r, e)) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "request not sent; next endpoint");
                req = r;
                why = e.into();
            }
            Err(SendError::Failed(e)) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "request failed");
                return bad_gateway(rt, grpc, &e, started);
            }
        }
    }
    bad_gateway(rt, grpc, &why, started)
}

/// Connect to an endpoint (the port's connect timeout); a failure puts the
/// endpoint in backoff.
async fn connect(ep: &EndpointLife, rt: &ServiceRuntime) -> Result<TcpStream, String> {
    let sock = if ep.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(rt.settings.connect_timeout, sock.connect(ep.addr)).await;
    match r {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            rt.metrics.connect_errors.increment(1);
            ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
            Err(format!("connect {}: {e}", ep.addr))
        }
        Err(_) => {
            rt.metrics.connect_errors.increment(1);
            ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
            Err(format!("connect {}: timed out", ep.addr))
        }
    }
}

async fn send_h2(
    ep: &EndpointLife,
    mut req: Request<Incoming>,
    rt: &ServiceRuntime,
) -> Result<Response<Incoming>, SendError> {
    // A cached connection may turn out closed (the endpoint restarted, or
    // sent GOAWAY): then one fresh one.
    for _ in 0..2 {
        let mut sender = match live_h2(ep) {
            Some(s) => s,
            None => {
                let _connecting = ep.upstream.h2_connecting.lock().await;
                match live_h2(ep) {
                    // Another request connected meanwhile.
                    Some(s) => s,
                    None => match connect_h2(ep, rt).await {
                        Ok(s) => s,
                        Err(e) => return Err(SendError::Unsent(req, e)),
                    },
                }
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(r) => {
                    req = r;
                    let mut conns = lock(&ep.upstream.h2);
                    let mine = slot(&mut conns, loop_index());
                    if mine.as_ref().is_some_and(|s| s.is_closed()) {
                        *mine = None;
                    }
                }
                None => return Err(SendError::Failed(e.into_error().to_string())),
            },
        }
    }
    Err(SendError::Unsent(req, "HTTP/2 connection closed".into()))
}

/// A new HTTP/2 connection to the endpoint, kept for the next requests.
async fn connect_h2(
    ep: &EndpointLife,
    rt: &ServiceRuntime,
) -> Result<http2::SendRequest<Incoming>, String> {
    let tcp = connect(ep, rt).await?;
    let (s, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    *slot(&mut lock(&ep.upstream.h2), loop_index()) = Some(s.clone());
    Ok(s)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The endpoint's HTTP/2 connection, if it has a live one.
fn live_h2(ep: &EndpointLife) -> Option<http2::SendRequest<Incoming>> {
    lock(&ep.upstream.h2)
        .get(loop_index())?
        .as_ref()
        .filter(|s| !s.is_closed())
        .cloned()
}

async fn send_h1(
    ep: &Arc<EndpointLife>,
    mut req: Request<Incoming>,
    rt: &ServiceRuntime,
) -> Result<Response<Incoming>, SendError> {
    let here = loop_index();
    loop {
        let idle = {
            let mut pools = lock(&ep.upstream.h1);
            let pool = slot(&mut pools, here);
            std::iter::from_fn(|| pool.pop()).find(|s| s.is_ready())
        };
        let (mut sender, fresh) = match idle {
            Some(s) => (s, false),
            None => {
                let tcp = match connect(ep, rt).await {
                    Ok(t) => t,
                    Err(e) => return Err(SendError::Unsent(req, e)),
                };
                match http1::handshake(TokioIo::new(tcp)).await {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        (s, true)
                    }
                    Err(e) => return Err(SendError::Unsent(req, format!("HTTP/1.1: {e}"))),
                }
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => {
                // Back to the pool once the response has been read to its end.
                let ep = ep.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        let mut pools = lock(&ep.upstream.h1);
                        let pool = slot(&mut pools, here);
                        if pool.len() < MAX_IDLE_PER_ENDPOINT {
                            pool.push(sender);
                        }
                    }
                });
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                // An idle connection closed under us: take another.
                Some(r) if !fresh => req = r,
                Some(r) => return Err(SendError::Unsent(r, e.into_error().to_string())),
                None => return Err(SendError::Failed(e.into_error().to_string())),
            },
        }
    }
}

/// An HTTP/1.1 upgrade (WebSocket and the like): a connection of its own
/// to the chosen endpoint; after `101 Switching Protocols` both sides are
/// spliced byte for byte.
async fn upgrade(
    rt: &ServiceRuntime,
    role: Role,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<RespBody> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let routes = rt.routes();
    let mut why = "no endpoints".to_string();
    for _ in 0..routes.set(role).len() {
        let Some(ep) = rt.choose(&routes, role, peer.ip(), Instant::now()) else {
            break;
        };
        let tcp = match connect(&ep, rt).await {
            Ok(t) => t,
            Err(e) => {
                why = e;
                continue;
            }
        };
        let (mut sender, conn) = match http1::handshake(TokioIo::new(tcp)).await {
            Ok(x) => x,
            Err(e) => return bad_gateway(rt, false, &e.to_string(), started),
        };
        tokio::spawn(conn.with_upgrades());
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return bad_gateway(rt, false, &e.to_string(), started),
        };
        ep.mark_ok();
        rt.metrics.http_response(resp.status().as_u16(), started);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let name = rt.name.to_string();
            tokio::spawn(async move {
                let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                    return;
                };
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::trace!(service = %name, error = %e, "upgraded connection ended");
                }
            });
        }
        return resp.map(Either::Left);
    }
    bad_gateway(rt, false, &why, started)
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= hyper::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// The request as the endpoint's protocol wants it: without hop-by-hop
/// headers; with the origin form and a Host for HTTP/1.1, the scheme and
/// authority for HTTP/2.
fn prepare(mut req: Request<Incoming>, app: AppProtocol) -> Request<Incoming> {
    strip_hop_by_hop(req.headers_mut());
    // From an HTTP/2 client to an HTTP/2 endpoint: already in shape.
    if app == AppProtocol::H2c
        && req.version() == hyper::Version::HTTP_2
        && req.uri().scheme().is_some()
        && req.uri().authority().is_some()
    {
        return req;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        });
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let uri = match app {
        AppProtocol::H2c => {
            *req.version_mut() = hyper::Version::HTTP_2;
            Uri::builder()
                .scheme("http")
                .authority(authority.as_deref().unwrap_or("localhost"))
                .path_and_query(path)
                .build()
        }
        AppProtocol::Http1 => {
            *req.version_mut() = hyper::Version::HTTP_11;
            if let Some(a) = &authority {
                if !req.headers().contains_key(header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(a) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
            }
            Uri::builder().path_and_query(path).build()
        }
    };
    if let Ok(uri) = uri {
        *req.uri_mut() = uri;
    }
    req
}

/// Remove the headers that describe one hop, not the message (RFC 9110
/// section 7.6.1), keeping `te: trailers` (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        for name in listed {
            h.remove(name.as_str());
        }
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if let Some(te) = h.get(header::TE) {
        let trailers = te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        h.remove(header::TE);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// No endpoint answered: 502, or for gRPC a trailers-only response with
/// status 14 (UNAVAILABLE), which gRPC clients treat as retryable.
fn bad_gateway(rt: &ServiceRuntime, grpc: bool, why: &str, started: Instant) -> Response<RespBody> {
    let resp = if grpc {
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(v) = HeaderValue::from_str(&format!("fairlead: {}", percent_ascii(why))) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "fairlead: no endpoint of {} answered: {why}\n",
            rt.name
        )))));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    rt.metrics
        .http_response(if grpc { 200 } else { 502 }, started);
    resp
}

/// A grpc-message value: printable ASCII, the rest percent-encoded.
fn percent_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_trailers_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-end", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-end").unwrap(), "2");
    }

    #[test]
    fn grpc_message_is_printable_ascii() {
        assert_eq!(percent_ascii("a b%c\n"), "a b%25c%0A");
    }
}
