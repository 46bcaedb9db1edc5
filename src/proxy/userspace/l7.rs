//! Per-request balancing for service ports that opt in with `appProtocol`
//! (`kubernetes.io/h2c`/`grpc`, `http`/`kubernetes.io/http`): what an L4
//! balancer cannot do for a client that keeps one connection (an HTTP/2 or
//! gRPC channel, an HTTP/1.1 keep-alive client), whose every request would
//! otherwise go to the one endpoint its connection was balanced to
//! (kubernetes/kubernetes issue 38456).
//!
//! ```text
//!  client ─ h2c (preface peeked) ─► serve_h2: h2::server, every stream a
//!                                    future in the connection's one task
//!         ─ HTTP/1.1 ─────────────► hyper's server
//!     each request: rt.choose (the port's round robin, backoff, affinity)
//!        └─► that endpoint's Upstream (kept in its EndpointLife), per loop:
//!              H2c:   one multiplexed HTTP/2 connection (h2::client)
//!              Http1: a pool of idle keep-alive connections (hyper)
//!     response: headers, streamed body and trailers (grpc-status) as they come
//! ```
//!
//! HTTP/2 is spoken with the `h2` crate rather than through hyper: hyper
//! spawns a task per stream on the server side and per request on the
//! client side, and hands each request through a channel to its
//! connection's task; for one busy client connection, on one loop, that
//! was a fifth of the proxy's CPU per request (README, "HTTP/2 per request
//! vs HAProxy").
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
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::routes::{EndpointLife, Role, ServiceRuntime};
use crate::proxy::AppProtocol;

/// A body the L7 proxy relays: from hyper (an HTTP/1.1 peer), from an
/// HTTP/2 stream, or one of ours (an error response). A request's body is
/// one of the first two, a response's any of the three.
pub(crate) enum L7Body {
    Http1(Incoming),
    H2(H2Body),
    Ours(Full<Bytes>),
}

/// What a frontend answers with: an endpoint's response as it streams, or
/// one of ours.
pub(crate) type RespBody = L7Body;
/// A request's body as it comes from the client.
pub(crate) type ReqBody = L7Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for L7Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            L7Body::Http1(b) => boxed(Pin::new(b).poll_frame(cx)),
            L7Body::H2(b) => boxed(Pin::new(b).poll_frame(cx)),
            L7Body::Ours(b) => boxed(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            L7Body::Http1(b) => b.is_end_stream(),
            L7Body::H2(b) => b.is_end_stream(),
            L7Body::Ours(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            L7Body::Http1(b) => b.size_hint(),
            L7Body::H2(b) => b.size_hint(),
            L7Body::Ours(b) => b.size_hint(),
        }
    }
}

fn boxed<E: Into<BoxError>>(
    p: Poll<Option<Result<Frame<Bytes>, E>>>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    p.map(|f| f.map(|f| f.map_err(Into::into)))
}

/// An HTTP/2 body (an endpoint's response, or an HTTP/2 client's request): its data frames (each one's flow
/// control window handed back to the endpoint as it is passed on), then
/// its trailers (gRPC's `grpc-status`).
pub(crate) struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    fn new(recv: h2::RecvStream) -> H2Body {
        H2Body {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

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
    h2: std::sync::Mutex<Vec<Option<H2Conn>>>,
    /// Held while connecting, so concurrent requests share the new one.
    h2_connecting: tokio::sync::Mutex<()>,
    /// HTTP/1.1: idle connections per loop, each ready for its next request.
    h1: std::sync::Mutex<Vec<Vec<http1::SendRequest<ReqBody>>>>,
}

/// One multiplexed HTTP/2 connection to an endpoint, spoken with the `h2`
/// crate itself rather than hyper's client on top of it: hyper spawns a
/// task per request and hands each request and response through a channel
/// to the connection's task (`perf`, one client connection × 100 streams:
/// a tenth of the loop's samples, most of them moves of those tasks and
/// messages). Here the request's own task opens the stream and reads the
/// response.
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ends (closed, GOAWAY'd, failed).
    closed: Arc<AtomicBool>,
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
    if speaks_h2(&client).await {
        return serve_h2(client, peer, &rt, role, app).await;
    }
    let svc_rt = rt.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let rt = svc_rt.clone();
        // Boxed: hyper spawns a task per request it serves concurrently,
        // and moving the whole (large) forwarding future into each was a
        // tenth of the proxy's CPU.
        let fwd =
            Box::pin(async move { forward(&rt, role, peer, app, req.map(L7Body::Http1)).await });
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

/// Whether the client opens with HTTP/2's connection preface (h2c with
/// prior knowledge, as gRPC does), looked at without reading it. No
/// HTTP/1.1 request starts with `PRI`.
async fn speaks_h2(client: &TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI";
    let mut buf = [0u8; 3];
    for _ in 0..100 {
        let n = match client.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if buf[..n] != PREFACE[..n] {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // A preface split after its first bytes: wait for the rest (peek
        // returns what is there at once).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    false
}

/// An HTTP/2 client connection, served with the `h2` crate: every stream
/// is a future in this one task (hyper's server spawns a task per stream
/// and wraps each request and response again), and the connection is
/// polled for I/O between them, so the responses that are ready go out
/// together.
async fn serve_h2(
    client: TcpStream,
    peer: SocketAddr,
    rt: &ServiceRuntime,
    role: Role,
    app: AppProtocol,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    // As hyper's server: 1 MiB windows, 200 concurrent streams.
    let handshake = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .max_concurrent_streams(200)
        .max_send_buffer_size(400 << 10)
        .handshake::<_, Bytes>(client)
        .await;
    let mut conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            tracing::trace!(service = %rt.name, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    // Boxed first: pushing a stream's ~4 KB future as it
                    // is moves it three times on its way into the set's
                    // task (a memmove each); boxed, once. Measured: CPU per
                    // request, one connection, 1.29-1.30x HAProxy's
                    // unboxed, 1.21-1.23x boxed.
                    streams.push(Box::pin(h2_stream(rt, role, peer, app, req, respond)));
                }
                Some(Err(e)) => {
                    tracing::trace!(service = %rt.name, error = %e, "L7 client connection ended");
                    break;
                }
                None => break,
            },
        }
    }
}

/// One stream of an HTTP/2 client: balance its request, then relay the
/// response. A reset from the client ends it (and so the endpoint's
/// stream) at any point.
async fn h2_stream(
    rt: &ServiceRuntime,
    role: Role,
    peer: SocketAddr,
    app: AppProtocol,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let req = req.map(|recv| L7Body::H2(H2Body::new(recv)));
    let resp = tokio::select! {
        biased;
        r = forward(rt, role, peer, app, req) => r,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (mut head, body) = resp.into_parts();
    if matches!(body, L7Body::Http1(_)) {
        // From an HTTP/1.1 endpoint: HTTP/2 has no hop-by-hop headers.
        strip_hop_by_hop(&mut head.headers);
    }
    head.version = hyper::Version::HTTP_2;
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(stream) if !end => pipe_body(body, stream).await,
        Ok(_) => {}
        Err(e) => tracing::trace!(service = %rt.name, error = %e, "response not sent"),
    }
}

/// Why a request was not answered by an endpoint. (Returned once per
/// failed try, so its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum SendError {
    /// It never reached the endpoint: try the next one with it.
    Unsent(Request<ReqBody>, String),
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
    req: Request<ReqBody>,
) -> Response<RespBody> {
    let started = Instant::now();
    let grpc = is_grpc(req.headers());
    if is_upgrade(&req) {
        // (Boxed, as the connects below: rare paths kept out of the
        // future every request's stream carries.)
        return Box::pin(upgrade(rt, role, peer, req, started)).await;
    }
    let mut req = prepare(req, app);
    let routes = rt.routes();
    // Filled in only when a try fails (no allocation per request).
    let mut why = std::borrow::Cow::Borrowed("no endpoints");
    let mut now = started;
    for _ in 0..routes.set(role).len() {
        let Some(ep) = rt.choose(&routes, role, peer.ip(), now) else {
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
                return resp;
            }
            Err(SendError::Unsent(r, e)) => {
                tracing::debug!(service = %rt.name, endpoint = %ep.addr, error = %e, "request not sent; next endpoint");
                now = Instant::now();
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
    super::tcp::connect(ep.addr, rt).await.map_err(|e| {
        rt.metrics.connect_errors.increment(1);
        ep.mark_failed(Instant::now(), rt.settings.endpoint_backoff);
        format!("connect {}: {e}", ep.addr)
    })
}

async fn send_h2(
    ep: &EndpointLife,
    req: Request<ReqBody>,
    rt: &ServiceRuntime,
) -> Result<Response<RespBody>, SendError> {
    let mut req = req;
    // No connection yet, or the cached one turned out closed (the endpoint
    // restarted, or sent GOAWAY): a fresh one, twice at most.
    for _ in 0..3 {
        let response = match open_h2(ep, req).await {
            Opened::Sent(response) => response,
            Opened::Failed(e) => return Err(SendError::Failed(e)),
            Opened::NoConnection(r) => {
                req = r;
                let _connecting = ep.upstream.h2_connecting.lock().await;
                if !has_live_h2(ep) {
                    if let Err(e) = Box::pin(connect_h2(ep, rt)).await {
                        return Err(SendError::Unsent(req, e));
                    }
                }
                continue;
            }
        };
        return match response.await {
            Ok(resp) => Ok(resp.map(|recv| L7Body::H2(H2Body::new(recv)))),
            Err(e) => Err(SendError::Failed(e.to_string())),
        };
    }
    Err(SendError::Unsent(req, "HTTP/2 connection closed".into()))
}

/// What [`open_h2`] did with a request. (Returned once per request,
/// straight to its caller, so the variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Opened {
    /// A stream is open (its body, if any, on its way); the response
    /// comes here.
    Sent(h2::client::ResponseFuture),
    /// This loop has no live connection to the endpoint: the request back.
    NoConnection(Request<ReqBody>),
    /// The stream was refused as it was opened.
    Failed(String),
}

/// Open a stream for `req` on this loop's connection to the endpoint,
/// once the endpoint's stream limit allows it. The connection's handle is
/// used in place (under the slot's lock, never across an await) rather
/// than cloned per request: each clone and drop of an `h2` handle takes
/// the connection's own lock.
async fn open_h2(ep: &EndpointLife, req: Request<ReqBody>) -> Opened {
    let mut req = Some(req);
    let here = loop_index();
    let (opened, body) = std::future::poll_fn(|cx| {
        let mut conns = lock(&ep.upstream.h2);
        let mine = slot(&mut conns, here);
        let gone = |mine: &mut Option<H2Conn>, req: &mut Option<Request<ReqBody>>| {
            *mine = None;
            let r = req.take().expect("polled after it was done");
            Poll::Ready((Opened::NoConnection(r), None))
        };
        let Some(conn) = mine.as_mut() else {
            return gone(mine, &mut req);
        };
        if conn.closed.load(Ordering::Relaxed) {
            return gone(mine, &mut req);
        }
        match conn.send.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                tracing::trace!(endpoint = %ep.addr, error = %e, "HTTP/2 connection gone");
                gone(mine, &mut req)
            }
            Poll::Ready(Ok(())) => {
                let (parts, body) = req.take().expect("polled after it was done").into_parts();
                let end = body.is_end_stream();
                Poll::Ready(
                    match conn.send.send_request(Request::from_parts(parts, ()), end) {
                        Ok((response, stream)) => {
                            (Opened::Sent(response), (!end).then_some((body, stream)))
                        }
                        Err(e) => (Opened::Failed(e.to_string()), None),
                    },
                )
            }
        }
    })
    .await;
    if let Some((body, stream)) = body {
        send_body(body, stream);
    }
    opened
}

/// Stream a request's body (and trailers) to the endpoint, within the
/// stream's flow control window. Tried once here, where a body that has
/// fully arrived (a unary gRPC call) is sent at once; the rest of a
/// streaming body gets a task of its own, as the response may come (and
/// be relayed) before the request has ended.
fn send_body(body: ReqBody, stream: h2::SendStream<Bytes>) {
    let mut pipe = Box::pin(pipe_body(body, stream));
    let waker = std::task::Waker::noop();
    if pipe
        .as_mut()
        .poll(&mut Context::from_waker(waker))
        .is_pending()
    {
        tokio::spawn(pipe);
    }
}

/// Relay a body's frames into an HTTP/2 stream, within the stream's flow
/// control window, until its end (the last data frame carries END_STREAM
/// when the body knows it is the last) or its trailers. Stops when the
/// other side resets the stream (dropping `body` then tells its own
/// sender), and resets the stream when `body` fails, so a truncated body
/// is never taken as whole.
async fn pipe_body<B>(mut body: B, mut stream: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match next {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Err(_reset) => return,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let last = body.is_end_stream();
                if data.is_empty() && !last {
                    continue;
                }
                loop {
                    if data.is_empty() {
                        // (Only an empty last frame: END_STREAM alone.)
                        let _ = stream.send_data(data, true);
                        return;
                    }
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    let n = match granted {
                        Some(Ok(n)) => n.min(data.len()),
                        // Reset, or the connection is gone.
                        _ => return,
                    };
                    if n == 0 {
                        continue;
                    }
                    let chunk = data.split_to(n);
                    let end = last && data.is_empty();
                    if stream.send_data(chunk, end).is_err() || end {
                        return;
                    }
                    if data.is_empty() {
                        break;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// A new HTTP/2 connection to the endpoint, kept for the next requests.
/// Windows as hyper's client sets them (2 MiB a stream, 5 MiB the
/// connection), so a streamed body is not held back by 64 KiB ones.
async fn connect_h2(ep: &EndpointLife, rt: &ServiceRuntime) -> Result<(), String> {
    let tcp = connect(ep, rt).await?;
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_send_buffer_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let addr = ep.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::trace!(endpoint = %addr, error = %e, "HTTP/2 connection ended");
        }
        done.store(true, Ordering::Relaxed);
    });
    *slot(&mut lock(&ep.upstream.h2), loop_index()) = Some(H2Conn { send, closed });
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this loop has a live HTTP/2 connection to the endpoint.
fn has_live_h2(ep: &EndpointLife) -> bool {
    lock(&ep.upstream.h2)
        .get(loop_index())
        .and_then(Option::as_ref)
        .is_some_and(|c| !c.closed.load(Ordering::Relaxed))
}

async fn send_h1(
    ep: &Arc<EndpointLife>,
    mut req: Request<ReqBody>,
    rt: &ServiceRuntime,
) -> Result<Response<RespBody>, SendError> {
    let here = loop_index();
    loop {
        let idle = {
            let mut pools = lock(&ep.upstream.h1);
            let pool = slot(&mut pools, here);
            std::iter::from_fn(|| pool.pop()).find(|s| s.is_ready())
        };
        let (mut sender, fresh) = match idle {
            Some(s) => (s, false),
            None => match Box::pin(connect_h1(ep, rt)).await {
                Ok(s) => (s, true),
                Err(e) => return Err(SendError::Unsent(req, e)),
            },
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
                return Ok(resp.map(L7Body::Http1));
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

/// A new HTTP/1.1 connection to the endpoint.
async fn connect_h1(
    ep: &EndpointLife,
    rt: &ServiceRuntime,
) -> Result<http1::SendRequest<ReqBody>, String> {
    let tcp = connect(ep, rt).await?;
    let (s, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/1.1: {e}"))?;
    tokio::spawn(conn);
    Ok(s)
}

/// An HTTP/1.1 upgrade (WebSocket and the like): a connection of its own
/// to the chosen endpoint; after `101 Switching Protocols` both sides are
/// spliced byte for byte.
async fn upgrade(
    rt: &ServiceRuntime,
    role: Role,
    peer: SocketAddr,
    mut req: Request<ReqBody>,
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
        return resp.map(L7Body::Http1);
    }
    bad_gateway(rt, false, &why, started)
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn is_upgrade(req: &Request<ReqBody>) -> bool {
    req.version() <= hyper::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// The request as the endpoint's protocol wants it: without hop-by-hop
/// headers; with the origin form and a Host for HTTP/1.1, the scheme and
/// authority for HTTP/2.
fn prepare(mut req: Request<ReqBody>, app: AppProtocol) -> Request<ReqBody> {
    // HTTP/2 has no hop-by-hop headers but `te: trailers` (the h2 crate
    // refuses a request with any other as malformed).
    if req.version() != hyper::Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut());
    }
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
        let mut r = Response::new(L7Body::Ours(Full::new(Bytes::new())));
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
        let mut r = Response::new(L7Body::Ours(Full::new(Bytes::from(format!(
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
