//! Acceptance test of the Prometheus configuration (`config/prometheus/`,
//! issue 16): a real Prometheus (Debian's `prometheus`), started here
//! inside the test's network namespace with the shipped scrape config and
//! rules, scrapes `fairlead up` (the node's :10249 and the API server's
//! /metrics over TLS with a client certificate). Its HTTP API must return
//! the proxy's sync histogram, CoreDNS's request counter and the API
//! server's request counter, every rule must evaluate without error, and
//! `promtool check metrics` / `check rules` / `check config` must pass
//! without a warning.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::cluster::Cluster;
use common::netns::have_program;
use common::server::{poll, run_with_stdin};
use serde_json::Value;

#[test]
fn agent() {
    common::netns::agent_main();
}

/// Where the test's Prometheus listens (inside the namespace).
const PROM: &str = "127.0.0.1:9090";

fn config_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus"))
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    run_with_stdin(cmd, stdin.unwrap_or(""))
}

/// promtool exits 0 and says nothing but its SUCCESS lines.
fn assert_clean(what: &str, out: &Output) {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let noise: Vec<&str> = said
        .lines()
        .filter(|l| {
            let l = l.trim();
            !(l.is_empty()
                || l.starts_with("Checking ")
                || l.starts_with("SUCCESS")
                || l.starts_with(" SUCCESS"))
        })
        .collect();
    assert!(
        out.status.success() && noise.is_empty(),
        "{what}: {:?}\n{said}",
        out.status
    );
}

#[test]
fn rules_pass_promtool() {
    if !have_program("rules_pass_promtool", "promtool", "prometheus") {
        return;
    }
    let rules = config_dir().join("rules.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert_clean("promtool check rules", &out);
    // And the check can fail: a rule with a bad expression.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "groups:\n- name: x\n  rules:\n  - record: x:y\n    expr: rate(foo[5m]\n",
    )
    .unwrap();
    let out = promtool(&["check", "rules", bad.to_str().unwrap()], None);
    assert!(!out.status.success(), "{out:?}");
}

/// One instant query against the test's Prometheus (curl inside the
/// namespace): the result vector.
fn query(c: &Cluster, q: &str) -> Vec<Value> {
    let out =
        c.ns.command("curl")
            .args(["-sS", "--max-time", "5", "-G"])
            .arg(format!("http://{PROM}/api/v1/query"))
            .arg("--data-urlencode")
            .arg(format!("query={q}"))
            .output()
            .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn get(c: &Cluster, path: &str) -> Value {
    let out =
        c.ns.command("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{PROM}{path}"))
            .output()
            .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn prometheus_scrapes_up_with_the_shipped_config() {
    let test = "prometheus_scrapes_up_with_the_shipped_config";
    if !have_program(test, "prometheus", "prometheus")
        || !have_program(test, "promtool", "prometheus")
        || !have_program(test, "curl", "curl")
    {
        return;
    }
    let mut c = Cluster::up(
        "prometheus",
        &["--proxy-mode", "userspace", "--dns-upstream", "127.0.0.1:9"],
    );
    // A cluster DNS query, so CoreDNS's counters have a sample.
    let dig =
        c.ns.command("dig")
            .args([
                "@10.96.0.10",
                "+time=2",
                "+tries=3",
                "kubernetes.default.svc.cluster.local",
            ])
            .output()
            .unwrap();
    assert!(dig.status.success(), "{dig:?}");

    // A Service with a ready pod, so the controllers write a slice (and
    // count it) and the proxy syncs a port.
    let mut yaml = common::cluster::http_service_yaml("web", "web", "");
    yaml.push_str(&common::cluster::pod_yaml("p1", "web"));
    c.apply(&yaml);
    c.set_pod("p1", "127.0.0.11", true);
    poll(
        "the controller's slice counted",
        Duration::from_secs(30),
        || {
            c.metrics_text()
                .contains("endpoint_slice_controller_changes_total")
                .then_some(())
        },
    );

    // The metrics as exposed pass promtool's linter, node and API server.
    let node_text = c.metrics_text();
    assert_clean(
        "promtool check metrics (node :10249)",
        &promtool(&["check", "metrics"], Some(&node_text)),
    );
    let api = c.kubectl(&["get", "--raw", "/metrics"]);
    assert!(api.status.success(), "{api:?}");
    assert_clean(
        "promtool check metrics (API server)",
        &promtool(
            &["check", "metrics"],
            Some(&String::from_utf8_lossy(&api.stdout)),
        ),
    );

    // The shipped config, with this cluster's data dir and a 1 s interval.
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(config_dir().join("prometheus.yml")).unwrap();
    let data = c.data_dir().display().to_string();
    let cfg = shipped
        .replace("/var/lib/fairlead", &data)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert_ne!(cfg, shipped, "the shipped config has the default paths");
    let cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    std::fs::copy(config_dir().join("rules.yml"), dir.path().join("rules.yml")).unwrap();
    assert_clean(
        "promtool check config",
        &promtool(&["check", "config", cfg_path.to_str().unwrap()], None),
    );

    let tsdb = dir.path().join("tsdb").display().to_string();
    let mut cmd = c.ns.command("prometheus");
    cmd.arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!("--storage.tsdb.path={tsdb}"))
        .arg(format!("--web.listen-address={PROM}"));
    let log = dir.path().join("prometheus.log");
    let mut prom = c.ns.spawn(cmd, &log);
    let prom_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Both jobs up.
    poll("both fairlead targets up", Duration::from_secs(60), || {
        assert!(prom.alive(), "prometheus exited:\n{}", prom_log());
        let up = query(&c, "up{job=~\"fairlead.*\"} == 1");
        (up.len() == 2).then_some(())
    });
    let want = [
        "kubeproxy_sync_proxy_rules_duration_seconds_count{job=\"fairlead-node\"} > 0",
        "coredns_dns_requests_total{job=\"fairlead-node\"} > 0",
        "apiserver_request_total{job=\"fairlead-apiserver\"} > 0",
        // A recording rule over two scrapes of real data.
        "fairlead:apiserver_requests:rate5m",
    ];
    for q in want {
        poll(
            &format!("Prometheus returns {q}"),
            Duration::from_secs(60),
            || (!query(&c, q).is_empty()).then_some(()),
        );
    }
    // Every rule evaluated, none in error.
    poll("every rule evaluated ok", Duration::from_secs(60), || {
        let rules = get(&c, "/api/v1/rules");
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let bad: Vec<String> = all
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        assert!(
            !bad.iter().any(|b| b.contains("\"err\"")),
            "rules in error: {bad:?}"
        );
        (all.len() >= 10 && bad.is_empty()).then_some(())
    });
}
