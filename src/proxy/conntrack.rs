//! Deleting stale UDP conntrack entries, as kube-proxy does.
//!
//! # Why
//!
//! A Service's DNAT happens only for the first packet of a flow: the kernel's
//! connection tracker records the translation, and every later packet of the
//! flow (same 5-tuple) follows that entry without passing the nat chains
//! again. TCP flows end (FIN/RST, and a dead backend resets them), but UDP
//! has no connection end: a client that keeps its socket (a resolver talking
//! to the cluster DNS Service from a fixed port is the typical case) keeps
//! sending every datagram to the *old* DNAT target — an endpoint that was
//! removed, whose pod may be gone — until the entry times out (30 s for an
//! unreplied flow, 120 s once it has seen replies, refreshed by each packet,
//! so a chatty client never gets there). Deleting the entries makes the next
//! datagram a new flow that the current ruleset balances afresh.
//!
//! # When to call (the proxier's side)
//!
//! Always *after* the ruleset change has been committed, or a datagram in
//! between can recreate the entry towards the old target:
//!
//! * an endpoint of a UDP service port was removed (or stopped being used):
//!   [`delete_udp_to_endpoint`];
//! * a UDP service port went from no endpoints to some (flows created while
//!   it had none were not DNATed and would keep missing the new endpoints):
//!   [`delete_udp_to_service`] for each ClusterIP / external IP, and
//!   [`delete_udp_to_node_port`] for its NodePort.
//!
//! The work is done by the `conntrack` program (conntrack-tools; Debian
//! package `conntrack`), run once per call; with `netns: Some(name)` it runs
//! as `ip netns exec <name> conntrack ...` (conntrack tables are per network
//! namespace; tests use their own namespace, the daemon passes `None`).
//! IPv4 only, like the rest of the nftables mode for now.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;
use std::time::Duration;

/// How long one `conntrack` run may take before it is killed.
const DEADLINE: Duration = Duration::from_secs(30);

/// How much of conntrack's stderr goes into an error.
const STDERR_LIMIT: usize = 512;

/// Why deleting conntrack entries failed (each message is one line).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("`conntrack` is not installed (Debian: apt-get install conntrack)")]
    NotInstalled,
    #[error("`ip` is not installed (Debian: apt-get install iproute2), needed to enter network namespace {0}")]
    NoIp(String),
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {}s", DEADLINE.as_secs())]
    TimedOut { command: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Delete every UDP flow whose reply comes from `endpoint`, i.e. every flow
/// DNATed to it. (Flows sent to the pod address directly match too; deleting
/// them is harmless, as their next datagram recreates an identical entry.)
/// Returns how many entries were deleted.
pub async fn delete_udp_to_endpoint(
    netns: Option<&str>,
    endpoint: SocketAddrV4,
) -> Result<u64, ConntrackError> {
    let ip = endpoint.ip().to_string();
    let port = endpoint.port().to_string();
    run(
        netns,
        &[
            "-D",
            "-p",
            "udp",
            "--reply-src",
            &ip,
            "--reply-port-src",
            &port,
        ],
    )
    .await
}

/// Delete every UDP flow sent to the frontend `ip:port` (a ClusterIP,
/// external IP or LoadBalancer IP of a service port), whatever it was
/// translated to. Returns how many entries were deleted.
pub async fn delete_udp_to_service(
    netns: Option<&str>,
    ip: Ipv4Addr,
    port: u16,
) -> Result<u64, ConntrackError> {
    let ip = ip.to_string();
    let port = port.to_string();
    run(
        netns,
        &[
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            &ip,
            "--orig-port-dst",
            &port,
        ],
    )
    .await
}

/// Delete every UDP flow sent to destination port `node_port` on any
/// address (a NodePort). Returns how many entries were deleted.
pub async fn delete_udp_to_node_port(
    netns: Option<&str>,
    node_port: u16,
) -> Result<u64, ConntrackError> {
    let port = node_port.to_string();
    run(netns, &["-D", "-p", "udp", "--orig-port-dst", &port]).await
}

/// The program and arguments that run `conntrack <args>` (in `netns`).
fn command_line(netns: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = match netns {
        Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
        None => Vec::new(),
    };
    argv.push("conntrack".into());
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// Run `conntrack <args>` and return the number of entries it deleted.
async fn run(netns: Option<&str>, args: &[&str]) -> Result<u64, ConntrackError> {
    let argv = command_line(netns, args);
    let command = argv.join(" ");
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        // The deleted entries, one line each: possibly many, not needed.
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(match netns {
                Some(ns) => ConntrackError::NoIp(ns.to_string()),
                None => ConntrackError::NotInstalled,
            })
        }
        Err(source) => return Err(ConntrackError::Spawn { command, source }),
    };
    let out = match tokio::time::timeout(DEADLINE, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(ConntrackError::Spawn { command, source }),
        // Dropping the wait future kills the child (kill_on_drop).
        Err(_) => return Err(ConntrackError::TimedOut { command }),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    interpret(
        command,
        out.status.success(),
        &out.status.to_string(),
        &stderr,
    )
}

/// The outcome of a conntrack run from its exit status and stderr.
/// conntrack reports "N flow entries have been deleted." on stderr, and
/// exits with status 1 when N is 0: that is "nothing matched", not an error.
fn interpret(
    command: String,
    success: bool,
    status: &str,
    stderr: &str,
) -> Result<u64, ConntrackError> {
    let deleted = deleted_count(stderr);
    match deleted {
        Some(n) if success => Ok(n),
        Some(0) => Ok(0),
        _ => {
            // `ip netns exec` reports a missing program itself.
            if stderr.contains("exec of \"conntrack\" failed: No such file") {
                return Err(ConntrackError::NotInstalled);
            }
            let mut stderr = stderr.trim().replace('\n', "; ");
            if stderr.len() > STDERR_LIMIT {
                let mut cut = STDERR_LIMIT;
                while !stderr.is_char_boundary(cut) {
                    cut -= 1;
                }
                stderr.truncate(cut);
                stderr.push_str(" ...");
            }
            if success {
                stderr = format!("no \"flow entries have been deleted\" count in {stderr:?}");
            }
            Err(ConntrackError::Failed {
                command,
                status: status.to_string(),
                stderr,
            })
        }
    }
}

/// N from conntrack's "... N flow entries have been deleted." line.
fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let (before, _) = line.split_once("flow entries have been deleted")?;
        before.split_whitespace().last()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        assert_eq!(
            command_line(None, &["-D", "-p", "udp"]).join(" "),
            "conntrack -D -p udp"
        );
        assert_eq!(
            command_line(Some("fl-1"), &["-D"]).join(" "),
            "ip netns exec fl-1 conntrack -D"
        );
    }

    #[test]
    fn counts_and_nothing_matched() {
        let ok = |success, stderr: &str| interpret("c".into(), success, "s", stderr);
        assert_eq!(
            ok(
                true,
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            )
            .unwrap(),
            3
        );
        // Exit status 1 with nothing deleted: not an error.
        assert_eq!(
            ok(
                false,
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            )
            .unwrap(),
            0
        );
    }

    #[test]
    fn failures_are_one_line() {
        let e = interpret(
            "ip netns exec x conntrack -D".into(),
            false,
            "exit status: 255",
            "Cannot open network namespace \"x\": No such file or directory\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("Cannot open network namespace"), "{msg}");

        let e = interpret(
            "c".into(),
            false,
            "exit status: 255",
            "exec of \"conntrack\" failed: No such file or directory\n",
        )
        .unwrap_err();
        assert!(matches!(e, ConntrackError::NotInstalled), "{e}");
        assert!(e.to_string().contains("apt-get install conntrack"));

        // Success without the count line is not silently taken as 0.
        let e = interpret("c".into(), true, "exit status: 0", "").unwrap_err();
        assert!(
            e.to_string().contains("flow entries have been deleted"),
            "{e}"
        );
    }
}
