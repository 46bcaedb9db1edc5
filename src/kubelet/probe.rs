//! Probes: startup, readiness and liveness, each an `httpGet`, `tcpSocket`
//! or `exec` check run every `periodSeconds` after `initialDelaySeconds`,
//! with `timeoutSeconds`, and reported to the pod worker only when the
//! result crosses `successThreshold` / `failureThreshold`.
//!
//! HTTP and TCP probes connect from the node to the pod's IP (the node
//! routes to every pod); exec probes run in the pod's namespaces through
//! the runtime.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::runtime::{Runtime, Sandbox};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Readiness,
    Liveness,
}

/// A probe's verdict, sent when it crosses a threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub ok: bool,
}

/// Where and how a container's probes run.
#[derive(Clone)]
pub struct Target {
    pub ip: IpAddr,
    pub sandbox: Sandbox,
    pub runtime: Arc<dyn Runtime>,
    pub env: Vec<(String, String)>,
}

fn port(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Run `p` once.
pub async fn check(p: &Probe, c: &Container, t: &Target) -> Result<(), String> {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(e) = &p.exec {
        let argv = e.command.clone().unwrap_or_default();
        return match t.runtime.exec(&t.sandbox, &argv, &t.env, timeout).await? {
            0 => Ok(()),
            code => Err(format!("command {argv:?} exited with {code}")),
        };
    }
    if let Some(tcp) = &p.tcp_socket {
        let ip = tcp
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(t.ip);
        let addr = SocketAddr::new(ip, port(&tcp.port, c)?);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: timed out")),
        };
    }
    if let Some(h) = &p.http_get {
        if h.scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            return Err("HTTPS probes are not supported".into());
        }
        let ip = h
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(t.ip);
        let addr = SocketAddr::new(ip, port(&h.port, c)?);
        let path = h.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for hd in h.http_headers.iter().flatten() {
            req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
        }
        req.push_str("\r\n");
        let get = async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("malformed HTTP response {line:?}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        };
        return match tokio::time::timeout(timeout, get).await {
            Ok(r) => r,
            Err(_) => Err(format!("Get \"http://{addr}{path}\": timed out")),
        };
    }
    Err("probe has no handler".into())
}

/// Probe until the task is dropped, sending a [`Verdict`] on `tx` each
/// time the result crosses its threshold, from `start_passing` (for a new
/// container: readiness failing, the others passing; an adopted one keeps
/// what it had). A startup probe stops
/// after its first success; a liveness or startup probe after its first
/// failure verdict (the container is about to be restarted).
pub async fn run<T: Send>(
    kind: Kind,
    start_passing: bool,
    p: Probe,
    c: Container,
    t: Target,
    tx: mpsc::Sender<T>,
    wrap: impl Fn(Verdict) -> T + Send,
) {
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    let success_threshold = p.success_threshold.unwrap_or(1).max(1) as u32;
    let failure_threshold = p.failure_threshold.unwrap_or(3).max(1) as u32;
    tokio::time::sleep(Duration::from_secs(
        p.initial_delay_seconds.unwrap_or(0).max(0) as u64,
    ))
    .await;
    let mut passing = start_passing;
    let (mut oks, mut fails) = (0u32, 0u32);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match check(&p, &c, &t).await {
            Ok(()) => {
                oks += 1;
                fails = 0;
                if (!passing || kind == Kind::Startup) && oks >= success_threshold {
                    passing = true;
                    if tx.send(wrap(Verdict { kind, ok: true })).await.is_err()
                        || kind == Kind::Startup
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                fails += 1;
                oks = 0;
                tracing::debug!(?kind, container = %c.name, error = %e, "probe failed");
                if (passing || kind == Kind::Startup) && fails >= failure_threshold {
                    passing = false;
                    if tx.send(wrap(Verdict { kind, ok: false })).await.is_err()
                        || kind != Kind::Readiness
                    {
                        return;
                    }
                }
            }
        }
    }
}
