//! `fairlead echo`: a tiny demo/benchmark backend in the spirit of agnhost
//! `netexec`, so a Service can be tried (and load-tested) without pulling an
//! image. Each server reports its `--name`, which shows which endpoint a
//! proxied request reached.
//!
//! * HTTP/1.1 (keep-alive) and HTTP/2 cleartext (prior knowledge): `GET /` and `GET /hostname` → the name;
//!   `GET /echo?msg=M` → `M`; `GET /clientip` → the client address it
//!   sees; `GET /upgrade` with an `Upgrade` header → `101`, then the
//!   connection echoes bytes; `GET /bytes?n=N` → `N` bytes (with a
//!   Content-Length, streamed in 64 KiB chunks, for throughput tests).
//! * TCP: echoes everything back on the same connection; when the client
//!   half-closes, the echo finishes and closes its side too.
//! * UDP: the datagram `hostname` is answered with the name alone (like
//!   agnhost); any other datagram `P` with `<name>: P`.
//!
//! Every port is optional; port 0 picks a free one (see [`EchoServer`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// Flags of `fairlead echo`.
#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    /// Name reported by every server (default: the host name).
    #[arg(long, env = "FAIRLEAD_ECHO_NAME")]
    pub name: Option<String>,
    /// HTTP port (0 = any free port).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// TCP echo port (0 = any free port).
    #[arg(long)]
    pub tcp_port: Option<u16>,
    /// UDP echo port (0 = any free port).
    #[arg(long)]
    pub udp_port: Option<u16>,
    /// Address every server binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Print one line per HTTP request and TCP connection to stdout (what
    /// `kubectl logs` shows of a pod).
    #[arg(long)]
    pub log_requests: bool,
    /// On SIGTERM, how long open connections may still finish (new ones
    /// are refused at once), as a pod being deleted should behave.
    #[arg(long, default_value = "30s", value_parser = humantime_secs)]
    pub drain_timeout: std::time::Duration,
}

fn humantime_secs(s: &str) -> Result<std::time::Duration, String> {
    crate::node::config::parse_duration(s)
}

/// Run the servers until Ctrl-C.
pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let server = EchoServer::start(&args).await?;
    tracing::info!(
        name = %server.name,
        http = ?server.http_addr,
        tcp = ?server.tcp_addr,
        udp = ?server.udp_addr,
        "echo servers running"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    if args.log_requests {
        println!("{}: draining (new connections refused)", server.name);
    }
    server.drain(args.drain_timeout).await;
    Ok(())
}

/// Running echo servers (for the CLI and for tests, which start them
/// in-process on port 0). Dropping it stops them too.
pub struct EchoServer {
    pub name: String,
    pub http_addr: Option<SocketAddr>,
    pub tcp_addr: Option<SocketAddr>,
    pub udp_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// Set to true to close the listeners and let connections finish.
    draining: tokio::sync::watch::Sender<bool>,
}

impl EchoServer {
    /// Bind every requested port and start serving.
    pub async fn start(args: &EchoArgs) -> anyhow::Result<EchoServer> {
        if args.http_port.is_none() && args.tcp_port.is_none() && args.udp_port.is_none() {
            anyhow::bail!("nothing to serve: give --http-port, --tcp-port and/or --udp-port");
        }
        let name = match &args.name {
            Some(n) => n.clone(),
            None => hostname(),
        };
        let (draining, drain) = tokio::sync::watch::channel(false);
        let mut s = EchoServer {
            name: name.clone(),
            http_addr: None,
            tcp_addr: None,
            udp_addr: None,
            tasks: Vec::new(),
            draining,
        };
        let name: Arc<str> = name.into();
        let log = args.log_requests;
        if let Some(p) = args.http_port {
            let l = TcpListener::bind((args.bind, p))
                .await
                .with_context(|| format!("binding HTTP {}:{p}", args.bind))?;
            s.http_addr = Some(l.local_addr()?);
            s.tasks.push(tokio::spawn(serve_http(
                l,
                name.clone(),
                log,
                drain.clone(),
            )));
        }
        if let Some(p) = args.tcp_port {
            let l = TcpListener::bind((args.bind, p))
                .await
                .with_context(|| format!("binding TCP {}:{p}", args.bind))?;
            s.tcp_addr = Some(l.local_addr()?);
            s.tasks.push(tokio::spawn(serve_tcp(l, log, drain.clone())));
        }
        if let Some(p) = args.udp_port {
            let u = UdpSocket::bind((args.bind, p))
                .await
                .with_context(|| format!("binding UDP {}:{p}", args.bind))?;
            s.udp_addr = Some(u.local_addr()?);
            s.tasks.push(tokio::spawn(serve_udp(u, name.clone())));
        }
        Ok(s)
    }

    /// Close the TCP listeners (new connections are refused) and wait up
    /// to `timeout` for open connections to finish (HTTP ones after their
    /// current request), then stop.
    pub async fn drain(mut self, timeout: std::time::Duration) {
        let _ = self.draining.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            for a in aborts {
                a.abort();
            }
        }
    }

    /// Stop serving: when this returns the ports are closed (new
    /// connections are refused) and open connections are being torn down.
    pub async fn stop(mut self) {
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates
    // when the name fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "echo".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Accept connections into a task set that dies with the server task.
/// Once `drain` turns true the listener closes and this returns when the
/// open connections have ended.
async fn accept_each<F, Fut>(
    l: TcpListener,
    mut drain: tokio::sync::watch::Receiver<bool>,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = async { drop(drain.wait_for(|d| *d).await) } => {
                drop(l);
                while conns.join_next().await.is_some() {}
                return;
            }
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(handle(s, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "echo: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_tcp(l: TcpListener, log: bool, drain: tokio::sync::watch::Receiver<bool>) {
    accept_each(l, drain, move |mut s, peer| async move {
        if log {
            println!("tcp connection from {peer}");
        }
        let (mut r, mut w) = s.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

async fn serve_udp(u: UdpSocket, name: Arc<str>) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(65536 + name.len() + 2);
    loop {
        let (n, peer) = match u.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "echo: udp receive");
                continue;
            }
        };
        let payload = &buf[..n];
        out.clear();
        out.extend_from_slice(name.as_bytes());
        if payload.trim_ascii() != b"hostname" {
            out.extend_from_slice(b": ");
            out.extend_from_slice(payload);
        }
        if let Err(e) = u.send_to(&out, peer).await {
            tracing::debug!(error = %e, "echo: udp send");
        }
    }
}

async fn serve_http(
    l: TcpListener,
    name: Arc<str>,
    log: bool,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let conn_drain = drain.clone();
    accept_each(l, drain, move |s, peer| {
        let name = name.clone();
        let mut drain = conn_drain.clone();
        async move {
            let svc = hyper::service::service_fn(move |mut req| {
                let name = name.clone();
                if log {
                    println!("{} {} from {peer}", req.method(), req.uri());
                }
                if req.uri().path() == "/upgrade"
                    && req.headers().contains_key(hyper::header::UPGRADE)
                {
                    return std::future::ready(Ok::<_, Infallible>(upgrade_to_echo(&mut req)));
                }
                std::future::ready(Ok::<_, Infallible>(respond(&req, &name, peer)))
            });
            // HTTP/1.1 (keep-alive) or HTTP/2 with prior knowledge (h2c),
            // whichever the client speaks.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(s), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = async { drop(drain.wait_for(|d| *d).await) } => {}
            }
            // Draining: finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    })
    .await
}

/// `GET /upgrade` with an `Upgrade` header: `101 Switching Protocols` to
/// that protocol, after which the connection echoes bytes (as a WebSocket
/// server would carry frames: no HTTP any more).
fn upgrade_to_echo(req: &mut Request<hyper::body::Incoming>) -> Response<EchoBody> {
    let proto = req.headers()[hyper::header::UPGRADE].clone();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(hyper::header::UPGRADE, proto);
    r
}

type EchoBody = Either<Full<Bytes>, Repeat>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<EchoBody> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn query_param(req: &Request<hyper::body::Incoming>, key: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    name: &str,
    peer: std::net::SocketAddr,
) -> Response<EchoBody> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/" | "/hostname" => text(StatusCode::OK, name.to_string()),
        "/echo" => text(StatusCode::OK, query_param(req, "msg").unwrap_or_default()),
        // Who the backend sees: whether a proxy kept the client's address.
        "/clientip" => text(StatusCode::OK, peer.ip().to_string()),
        "/bytes" => match query_param(req, "n").map(|n| n.parse::<u64>()) {
            Some(Ok(n)) => {
                let mut r = Response::new(Either::Right(Repeat { left: n }));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/octet-stream"),
                );
                r
            }
            _ => text(StatusCode::BAD_REQUEST, "want /bytes?n=<count>\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Chunk of the `/bytes` body.
const CHUNK: usize = 64 * 1024;
static FILL: [u8; CHUNK] = [b'x'; CHUNK];

/// `n` bytes of `x`, without allocating: every frame is a slice of a static
/// buffer. Exact size hint, so hyper sends a Content-Length.
pub struct Repeat {
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let k = self.left.min(CHUNK as u64) as usize;
        self.left -= k as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILL[..k])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}
