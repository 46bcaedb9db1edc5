//! The agent's HTTPS port (10250, as the kubelet's): container logs for
//! the API server's `pods/log`.
//!
//! `GET /containerLogs/<namespace>/<pod>/<container>` with `follow`,
//! `previous`, `tailLines` and `limitBytes`, answered from the files the
//! runtime writes (`<data-dir>/pods/<uid>/logs/<container>/<restart>.log`).
//! A follow streams what is appended until that run of the container has
//! ended (its `<restart>.exited` marker) or the pod is gone.
//!
//! Only clients with a certificate of the cluster CA (the API server's
//! kubelet client) are served; the serving certificate is self-signed, as
//! the kubelet's is by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How often a follow looks for appended output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The port the kubelet serves on (also in the Node's daemonEndpoints).
pub const PORT: u16 = 10250;

/// The log files of one container of a pod on this node.
#[derive(Debug)]
pub struct ContainerLogs {
    pub dir: PathBuf,
    /// Restart numbers with a log file, ascending.
    pub runs: Vec<u32>,
}

/// The pod directory of `ns/name` (the newest, should an old pod of the
/// same name still be terminating).
pub fn pod_dir(data_dir: &Path, ns: &str, name: &str) -> Option<PathBuf> {
    let want = format!("{ns}/{name}");
    std::fs::read_dir(data_dir.join("pods"))
        .ok()?
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("meta")).is_ok_and(|m| m.trim() == want))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The runs of `container` in pod directory `dir`.
pub fn container_logs(dir: &Path, container: &str) -> Option<ContainerLogs> {
    let dir = dir.join("logs").join(container);
    let mut runs: Vec<u32> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    runs.sort_unstable();
    Some(ContainerLogs { dir, runs })
}

/// The last `n` lines of `text`.
pub fn tail(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &text[text.len()..];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

fn text(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r
}

async fn container_log(data_dir: &Path, path: &str, query: &str) -> Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = parts.as_slice() else {
        return text(StatusCode::NOT_FOUND, format!("no such path {path}"));
    };
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    let on = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let Some(dir) = pod_dir(data_dir, ns, pod) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not running on this node"),
        );
    };
    let Some(logs) = container_logs(&dir, container).filter(|l| !l.runs.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("container \"{container}\" in pod \"{pod}\" is waiting to start"),
        );
    };
    let run = if on("previous") {
        match logs.runs.len().checked_sub(2).map(|i| logs.runs[i]) {
            Some(r) => r,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                    ),
                )
            }
        }
    } else {
        *logs.runs.last().unwrap()
    };
    let file = logs.dir.join(format!("{run}.log"));
    let content = tokio::fs::read(&file).await.unwrap_or_default();
    let offset = content.len() as u64;
    let mut first = match q.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => tail(&content, n).to_vec(),
        None => content,
    };
    if let Some(limit) = q.get("limitBytes").and_then(|n| n.parse::<usize>().ok()) {
        first.truncate(limit);
    }
    let follow = on("follow") && !on("previous");
    if !follow {
        return text(StatusCode::OK, String::from_utf8_lossy(&first).into_owned());
    }
    let exited = logs.dir.join(format!("{run}.exited"));
    let newer = logs.dir.join(format!("{}.log", run + 1));
    let stream = futures::stream::unfold(
        (Some(first), false, offset),
        move |(pending, done, mut offset)| {
            let (file, exited, newer, dir) =
                (file.clone(), exited.clone(), newer.clone(), dir.clone());
            async move {
                if let Some(b) = pending {
                    return Some((
                        Ok(hyper::body::Frame::data(Bytes::from(b))),
                        (None, false, offset),
                    ));
                }
                if done {
                    return None;
                }
                loop {
                    // Whether this run had ended before this look: then
                    // whatever the file holds now is all there is.
                    let ended = exited.exists() || newer.exists() || !dir.exists();
                    let len = match tokio::fs::metadata(&file).await {
                        Ok(m) => m.len(),
                        Err(_) => return None,
                    };
                    if len < offset {
                        offset = 0; // rotated (copied and truncated)
                    }
                    if len > offset {
                        let data = read_range(&file, offset, len).await;
                        return Some((
                            Ok(hyper::body::Frame::data(Bytes::from(data))),
                            (None, ended, len),
                        ));
                    }
                    if ended {
                        return None;
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        },
    );
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, "text/plain".parse().unwrap());
    r
}

async fn read_range(file: &Path, from: u64, to: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(file).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0; (to - from) as usize];
    let n = f.read(&mut buf).await.unwrap_or(0);
    let mut read = n;
    while read < buf.len() {
        match f.read(&mut buf[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    buf.truncate(read);
    buf
}

/// Serve the port on `addr` for clients with certificates of `client_ca`
/// (PEM).
pub async fn spawn(
    addr: SocketAddr,
    data_dir: PathBuf,
    client_ca: &[u8],
    names: Vec<String>,
) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::from_pem_slice(certified.signing_key.serialize_pem().as_bytes())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the kubelet port {addr}: {e}"))?;
    let data_dir = Arc::new(data_dir);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, data_dir) = (acceptor.clone(), data_dir.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let data_dir = data_dir.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or("").to_string();
                        let r = if req.method() != hyper::Method::GET {
                            text(StatusCode::METHOD_NOT_ALLOWED, "only GET".into())
                        } else {
                            container_log(&data_dir, &path, &query).await
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
    }

    #[tokio::test]
    async fn logs_of_the_current_and_previous_run() {
        let d = tempfile::tempdir().unwrap();
        let pod = d.path().join("pods/uid-1");
        std::fs::create_dir_all(pod.join("logs/c")).unwrap();
        std::fs::write(pod.join("meta"), "ns1/web\n").unwrap();
        std::fs::write(pod.join("logs/c/0.log"), "first run\n").unwrap();
        std::fs::write(pod.join("logs/c/1.log"), "one\ntwo\nthree\n").unwrap();
        let body = |r: Response<Body>| async move {
            let code = r.status();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (code, String::from_utf8_lossy(&b).into_owned())
        };
        let get = |q: &'static str| container_log(d.path(), "/containerLogs/ns1/web/c", q);
        assert_eq!(
            body(get("").await).await,
            (StatusCode::OK, "one\ntwo\nthree\n".into())
        );
        assert_eq!(body(get("tailLines=1").await).await.1, "three\n");
        assert_eq!(body(get("previous=true").await).await.1, "first run\n");
        // Follow of a run that has ended: what there is, then the end.
        std::fs::write(pod.join("logs/c/1.exited"), "").unwrap();
        assert_eq!(body(get("follow=true").await).await.1, "one\ntwo\nthree\n");
        let r = container_log(d.path(), "/containerLogs/ns1/other/c", "").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
