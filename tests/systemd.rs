//! Acceptance tests of the systemd units (`config/systemd/`, issue 16):
//!
//! - every unit passes `systemd-analyze verify` with no warning (the
//!   binary path pointed at the one cargo built, since `/usr/local/bin`
//!   has none here); without systemd-analyze, a unit-syntax check;
//! - `fairlead up` speaks the `Type=notify` protocol: `READY=1` once its
//!   API answers and its node daemon has synced, `WATCHDOG=1` at half of
//!   `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM. The test is the service
//!   manager: it binds the `$NOTIFY_SOCKET` datagram socket itself.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, FAIRLEAD, HEALTHZ, SETTLE};

#[test]
fn agent() {
    common::netns::agent_main();
}

fn units() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/systemd")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    units
}

/// The directives systemd knows in each section (of those a unit-syntax
/// check accepts when systemd-analyze is missing).
fn syntax_check(name: &str, text: &str) {
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            assert!(line.ends_with(']'), "{name}:{}: bad section {line}", n + 1);
            section = line.to_string();
            assert!(
                ["[Unit]", "[Service]", "[Install]"].contains(&section.as_str()),
                "{name}:{}: unknown section {section}",
                n + 1
            );
            continue;
        }
        let (key, _) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{name}:{}: not key=value: {line}", n + 1));
        assert!(
            !section.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}:{}: bad key {key:?}",
            n + 1
        );
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let units = units();
    assert!(units.len() >= 3, "units: {units:?}");
    let dir = tempfile::tempdir().unwrap();
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("systemd-analyze is not installed: checking unit syntax only");
    }
    for unit in units {
        let name = unit.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(text.contains("Type=notify"), "{name} is not Type=notify");
        assert!(text.contains("WatchdogSec="), "{name} has no watchdog");
        assert!(
            text.contains("ExecStart=/usr/local/bin/fairlead "),
            "{name}: ExecStart"
        );
        if !have {
            syntax_check(&name, &text);
            continue;
        }
        // verify checks that ExecStart's binary exists: point it at ours.
        let copy = dir.path().join(&name);
        std::fs::write(&copy, text.replace("/usr/local/bin/fairlead", FAIRLEAD)).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {name}: {:?}\n{said}",
            out.status
        );
    }
}

/// The unit check fails a unit with a bad directive (so the test above
/// can fail).
#[test]
fn systemd_analyze_verify_catches_a_bad_unit() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.service");
    std::fs::write(
        &bad,
        format!("[Service]\nType=notify\nExecStart={FAIRLEAD} up\nProtectSystem=sideways\n"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "{out:?}"
    );
}

/// Reads notifications until one holds `want`; every message read.
fn until_message(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(end - Instant::now() + Duration::from_millis(1)))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = msg.lines().any(|l| l == want);
                seen.push(msg);
                if hit {
                    return seen;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

#[test]
fn up_notifies_ready_pings_watchdog_and_says_stopping() {
    let mut c = Cluster::empty("sdnotify");
    let sock_path = c.data_dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let data = c.data_dir().display().to_string();
    let notify = sock_path.display().to_string();
    // As systemd starts it: $NOTIFY_SOCKET, and WatchdogSec=1s as
    // $WATCHDOG_USEC with $WATCHDOG_PID naming the process itself.
    let mut cmd = c.ns.command("sh");
    cmd.arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {FAIRLEAD} up --data-dir {data} --secure-port {} --proxy-mode userspace",
            common::cluster::API_PORT
        ))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000");
    c.start_command("up", cmd);
    let seen = until_message(&sock, "READY=1", SETTLE);
    // READY=1 means serving: the API answers and the node is healthy now,
    // without waiting.
    let ready = c.kubectl(&["get", "--raw", "/readyz"]);
    assert!(
        ready.status.success(),
        "API not ready at READY=1: {ready:?}"
    );
    let healthz = c.agent.http(HEALTHZ.parse().unwrap(), "/healthz", 1, None);
    assert!(
        matches!(healthz[0], Ok((200, _))),
        "node not healthy at READY=1: {healthz:?}"
    );
    assert!(
        seen.iter().any(|m| m.contains("STATUS=node ")),
        "READY carries a status: {seen:?}"
    );
    // Watchdog pings keep coming: two within 2.5 s of each other.
    for _ in 0..2 {
        until_message(&sock, "WATCHDOG=1", Duration::from_millis(2500));
    }
    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = c.proc("up").pid().unwrap() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    until_message(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(
        c.proc("up").stop(libc::SIGTERM, Duration::from_secs(20)),
        "fairlead up did not exit after SIGTERM:\n{}",
        c.log_tail("up")
    );
}
