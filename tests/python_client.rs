//! The official Python `kubernetes` client (from PyPI) against a real
//! `fairlead apiserver`: create, list with a label selector, watch from the
//! list's resourceVersion (MODIFIED after merge / strategic / JSON patches,
//! DELETED after delete), replace with a stale resourceVersion → 409
//! Conflict, read after delete → 404.
//!
//! The client work is in `tests/python/client_ops.py`, which prints one JSON
//! line; this test runs it and asserts on that JSON. The interpreter is
//! `$FAIRLEAD_PYTHON` (set by `scripts/test`), else `target/pyvenv`, created
//! with `pip install kubernetes` if it does not exist yet.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::Fairlead;
use serde_json::Value;

/// The script's own waits are bounded by ~45 s; this bounds the process.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

/// A Python interpreter that can `import kubernetes`.
fn python() -> PathBuf {
    common::python::python_with("kubernetes", "kubernetes")
}

/// Run `script kubeconfig` with a deadline; (exit code, stdout, stderr).
fn run_script(py: &Path, script: &Path, kubeconfig: &Path) -> (Option<i32>, String, String) {
    let mut child = Command::new(py)
        .arg(script)
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + SCRIPT_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait python") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "client_ops.py did not finish in {SCRIPT_DEADLINE:?}; stderr:\n{}",
                err_t.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), out_t.join().unwrap(), err_t.join().unwrap())
}

#[test]
fn python_kubernetes_client_crud_watch_conflict() {
    let py = python();
    let server = Fairlead::start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client_ops.py");
    let (code, stdout, stderr) = run_script(&py, &script, &server.kubeconfig);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let r: Value = line
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!("no JSON line from client_ops.py\nstdout:\n{stdout}\nstderr:\n{stderr}")
        });
    assert_eq!(
        code,
        Some(0),
        "client_ops.py failed: {r:#}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(r.get("error").is_none(), "{r:#}");

    // create
    let c = &r["created"];
    let name = c["name"].as_str().expect("created name");
    assert!(name.starts_with("py-"), "{c}");
    assert!(!c["uid"].as_str().unwrap_or("").is_empty(), "{c}");
    assert_eq!(c["type"], "ClusterIP", "defaulted type: {c}");
    let ip: std::net::Ipv4Addr = c["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("clusterIP allocated: {c}"));
    let o = ip.octets();
    // --service-cluster-ip-range defaults to 10.96.0.0/12.
    assert!(
        o[0] == 10 && (96..112).contains(&o[1]),
        "{ip} in 10.96.0.0/12"
    );
    assert_eq!(
        c["ports"],
        serde_json::json!([{"port": 80, "targetPort": 8080, "protocol": "TCP"}])
    );
    let created_rv: u64 = c["resourceVersion"].as_str().unwrap().parse().unwrap();

    // list
    assert_eq!(r["list"]["names"], serde_json::json!([name]), "{r:#}");
    let list_rv: u64 = r["list"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        list_rv >= created_rv,
        "list rv {list_rv} < create rv {created_rv}"
    );
    assert_eq!(r["list_other_names"], serde_json::json!([]));

    // patches: each bumps the resourceVersion and applies
    let p = &r["patches"];
    let rv = |v: &Value| -> u64 { v["resourceVersion"].as_str().unwrap().parse().unwrap() };
    let (m, s, j) = (rv(&p["merge"]), rv(&p["strategic"]), rv(&p["json"]));
    assert!(created_rv < m && m < s && s < j, "patch rvs increase: {p}");
    assert_eq!(p["merge"]["labels"]["merge"], "yes", "{p}");
    assert_eq!(p["strategic"]["labels"]["merge"], "yes", "{p}");
    assert_eq!(p["strategic"]["labels"]["strategic"], "yes", "{p}");
    assert_eq!(p["json"]["annotations"]["json"], "yes", "{p}");

    // stale replace: 409 Conflict, nothing written
    let st = &r["stale_replace"];
    assert_eq!(st["raised"], true, "stale replace must fail: {st}");
    assert_eq!(st["status"], 409, "{st}");
    assert_eq!(st["http_reason"], "Conflict", "{st}");
    assert_eq!(st["body_kind"], "Status", "{st}");
    assert_eq!(st["body_reason"], "Conflict", "{st}");
    assert_eq!(st["body_code"], 409, "{st}");
    assert_eq!(rv(&r["after_stale"]), j, "{r:#}");
    assert!(r["after_stale"]["labels"].get("stale").is_none(), "{r:#}");

    // delete returns the deleted Service
    assert_eq!(r["delete"]["kind"], "Service", "{r:#}");
    assert_eq!(r["delete"]["name"], name, "{r:#}");

    // watch: exactly the three patches as MODIFIED, then DELETED
    let w = &r["watch"];
    assert_eq!(w["finished"], true, "watch did not end with DELETED: {w:#}");
    assert_eq!(w["error"], Value::Null, "{w:#}");
    let events = w["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["MODIFIED", "MODIFIED", "MODIFIED", "DELETED"],
        "{w:#}"
    );
    let ev_rvs: Vec<u64> = events.iter().map(rv).collect();
    assert_eq!(&ev_rvs[..3], &[m, s, j], "{w:#}");
    assert!(ev_rvs[3] > j, "DELETED after the last patch: {w:#}");
    assert!(events.iter().all(|e| e["name"] == name), "{w:#}");
    assert_eq!(events[0]["labels"]["merge"], "yes", "{w:#}");
    assert!(events[0]["labels"].get("strategic").is_none(), "{w:#}");
    assert_eq!(events[1]["labels"]["strategic"], "yes", "{w:#}");

    // read after delete: 404 NotFound
    let rd = &r["read_deleted"];
    assert_eq!(rd["raised"], true, "{rd}");
    assert_eq!(rd["status"], 404, "{rd}");
    assert_eq!(rd["body_reason"], "NotFound", "{rd}");
    assert_eq!(rd["body_code"], 404, "{rd}");
}
