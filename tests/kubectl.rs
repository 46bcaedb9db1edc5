//! The real `kubectl` (on PATH) against a real `fairlead apiserver`: the
//! demo manifest (`config/demo.yaml`) applied, listed, described, watched,
//! patched, re-applied and deleted; validation errors (422, strict field
//! validation); ClusterIP / NodePort allocation conflicts and release;
//! namespace deletion; static-token authentication and authorization;
//! discovery, version and metrics.
//!
//! Each test starts its own server. Nothing sleeps to synchronise: the watch
//! is read through a channel with a deadline.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::server::{kubectl_cmd, Fairlead};

/// Upper bound for a watch line to show up.
const WATCH_DEADLINE: Duration = Duration::from_secs(20);

/// `config/demo.yaml`.
fn demo_yaml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert `o` failed; its stderr.
#[track_caller]
fn failed(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what}: expected kubectl to fail, it succeeded:\n{}",
        stdout(o)
    );
    stderr(o)
}

/// Run kubectl expecting failure; its stderr.
#[track_caller]
fn kubectl_err(f: &Fairlead, args: &[&str]) -> String {
    failed(&f.kubectl(args), &format!("kubectl {args:?}"))
}

/// `kubectl get <what> -o jsonpath=<path>`.
fn jsonpath(f: &Fairlead, what: &[&str], path: &str) -> String {
    let arg = format!("jsonpath={path}");
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", &arg]);
    f.kubectl_ok(&args)
}

/// `kubectl apply -f <file>` output lines, sorted.
fn apply_lines(f: &Fairlead, file: &Path) -> Vec<String> {
    let out = f.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    let mut lines: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
    lines.sort();
    lines
}

/// The expected apply output: each demo object with `verb`, except the
/// overrides.
fn demo_apply_expected(verb: &str, overrides: &[(&str, &str)]) -> Vec<String> {
    let objects = [
        "namespace/demo",
        "service/web",
        "service/web-nodeport",
        "service/web-headless",
        "service/docs",
        "service/external-db",
        "endpointslice.discovery.k8s.io/external-db-1",
        "deployment.apps/web",
    ];
    let mut lines: Vec<String> = objects
        .iter()
        .map(|o| {
            let v = overrides
                .iter()
                .find(|(name, _)| name == o)
                .map_or(verb, |(_, v)| v);
            format!("{o} {v}")
        })
        .collect();
    lines.sort();
    lines
}

/// A kubectl table (`kubectl get` default output): header columns and rows
/// keyed by the first column. Cells are whitespace-separated, which holds for
/// Service tables (no cell contains a space).
struct Table {
    header: Vec<String>,
    rows: BTreeMap<String, Vec<String>>,
}

fn parse_table(text: &str) -> Table {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .unwrap_or_else(|| panic!("no table header in {text:?}"))
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut rows = BTreeMap::new();
    for l in lines {
        let cells: Vec<String> = l.split_whitespace().map(String::from).collect();
        assert_eq!(cells.len(), header.len(), "row {l:?} vs header {header:?}");
        rows.insert(cells[0].clone(), cells);
    }
    Table { header, rows }
}

impl Table {
    /// The cell of `row` under column `col`.
    #[track_caller]
    fn cell(&self, row: &str, col: &str) -> &str {
        let i = self
            .header
            .iter()
            .position(|h| h == col)
            .unwrap_or_else(|| panic!("no column {col} in {:?}", self.header));
        let r = self
            .rows
            .get(row)
            .unwrap_or_else(|| panic!("no row {row} in {:?}", self.rows.keys()));
        &r[i]
    }
}

/// Whether `ip` is inside the default Service range 10.96.0.0/12.
fn in_service_range(ip: &str) -> bool {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return false;
    };
    u32::from(ip) & 0xfff0_0000 == u32::from(Ipv4Addr::new(10, 96, 0, 0))
}

/// `key: value` lines of `kubectl describe`, first occurrence of each key.
fn describe_fields(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if !k.starts_with(' ') {
                out.entry(k.trim().to_string())
                    .or_insert_with(|| v.trim().to_string());
            }
        }
    }
    out
}

/// A Service manifest with one TCP port.
fn service_yaml(name: &str, ns: &str, spec_extra: &str, port_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n{spec_extra}  ports:\n  - port: 80\n{port_extra}"
    )
}

/// The demo manifest: apply, the Service table, YAML output, EndpointSlices,
/// `get -A`, `get all`, describe, api-resources, version, metrics.
#[test]
fn demo_apply_get_describe() {
    let f = Fairlead::start(&[]);
    assert_eq!(
        apply_lines(&f, &demo_yaml()),
        demo_apply_expected("created", &[])
    );

    // The default table.
    let table = parse_table(&f.kubectl_ok(&["get", "svc", "-n", "demo"]));
    assert_eq!(
        table.header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        table.rows.keys().collect::<Vec<_>>(),
        ["docs", "external-db", "web", "web-headless", "web-nodeport"]
    );
    let expect = [
        // name, TYPE, EXTERNAL-IP, PORT(S)
        ("web", "ClusterIP", "<none>", "80/TCP"),
        ("web-nodeport", "NodePort", "<none>", "80:30080/TCP"),
        ("web-headless", "ClusterIP", "<none>", "80/TCP"),
        ("docs", "ExternalName", "docs.example.com", "<none>"),
        ("external-db", "ClusterIP", "<none>", "5432/TCP"),
    ];
    for (name, ty, ext, ports) in expect {
        assert_eq!(table.cell(name, "TYPE"), ty, "{name} TYPE");
        assert_eq!(table.cell(name, "EXTERNAL-IP"), ext, "{name} EXTERNAL-IP");
        assert_eq!(table.cell(name, "PORT(S)"), ports, "{name} PORT(S)");
    }
    assert_eq!(table.cell("web-headless", "CLUSTER-IP"), "None");
    assert_eq!(table.cell("docs", "CLUSTER-IP"), "<none>");
    let mut ips = Vec::new();
    for name in ["web", "web-nodeport", "external-db"] {
        let ip = table.cell(name, "CLUSTER-IP");
        assert!(in_service_range(ip), "{name} CLUSTER-IP {ip:?}");
        assert_ne!(ip, "10.96.0.1", "{name} got the kubernetes Service IP");
        ips.push(ip.to_string());
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "ClusterIPs not distinct: {ips:?}");

    // YAML output.
    let yaml = f.kubectl_ok(&["get", "svc", "web", "-n", "demo", "-o", "yaml"]);
    let web: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("kubectl -o yaml parses");
    assert_eq!(web["apiVersion"].as_str(), Some("v1"));
    assert_eq!(web["kind"].as_str(), Some("Service"));
    assert_eq!(web["metadata"]["name"].as_str(), Some("web"));
    assert_eq!(web["metadata"]["namespace"].as_str(), Some("demo"));
    assert_eq!(web["metadata"]["labels"]["app"].as_str(), Some("web"));
    let rv = web["metadata"]["resourceVersion"].as_str().unwrap_or("");
    assert!(
        rv.parse::<u64>().is_ok_and(|n| n > 0),
        "resourceVersion {rv:?}"
    );
    let uid = web["metadata"]["uid"].as_str().unwrap_or("");
    assert_eq!(uid.len(), 36, "uid {uid:?}");
    assert!(web["metadata"]["creationTimestamp"].as_str().is_some());
    assert!(
        web["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .is_some()
    );
    assert_eq!(
        web["spec"]["clusterIP"].as_str(),
        Some(table.cell("web", "CLUSTER-IP"))
    );
    assert_eq!(web["spec"]["type"].as_str(), Some("ClusterIP"));
    assert_eq!(web["spec"]["selector"]["app"].as_str(), Some("web"));
    assert_eq!(web["spec"]["ports"][0]["port"].as_u64(), Some(80));
    assert_eq!(web["spec"]["ports"][0]["targetPort"].as_u64(), Some(8080));
    assert_eq!(web["spec"]["ports"][0]["protocol"].as_str(), Some("TCP"));

    // The manual EndpointSlice.
    let slices = parse_table(&f.kubectl_ok(&["get", "endpointslices", "-n", "demo"]));
    assert_eq!(
        slices.rows.keys().collect::<Vec<_>>(),
        ["external-db-1"],
        "endpointslices"
    );
    assert_eq!(slices.cell("external-db-1", "ADDRESSTYPE"), "IPv4");
    assert_eq!(slices.cell("external-db-1", "ENDPOINTS"), "192.0.2.10");

    // All namespaces: the bootstrap `kubernetes` Service plus the demo ones.
    let all = f.kubectl_ok(&["get", "svc", "-A"]);
    let mut lines = all.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let mut pairs: Vec<(String, String)> = lines
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c[0].to_string(), c[1].to_string())
        })
        .collect();
    pairs.sort();
    let want: Vec<(String, String)> = [
        ("default", "kubernetes"),
        ("demo", "docs"),
        ("demo", "external-db"),
        ("demo", "web"),
        ("demo", "web-headless"),
        ("demo", "web-nodeport"),
        ("kube-system", "kube-dns"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(pairs, want, "get svc -A:\n{all}");
    let kube_row = all
        .lines()
        .find(|l| l.starts_with("default "))
        .expect("default/kubernetes row");
    assert!(
        kube_row.contains(" 10.96.0.1 ") && kube_row.contains("443/TCP"),
        "{kube_row}"
    );

    // `get all` includes the Services (as service/<name>).
    let out = f.kubectl(&["get", "all", "-n", "demo"]);
    assert!(out.status.success(), "get all: {}", stderr(&out));
    let text = stdout(&out);
    for name in ["web", "web-nodeport", "web-headless", "docs", "external-db"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("service/{name} "))),
            "get all lacks service/{name}:\n{text}"
        );
    }

    // describe.
    let d = f.kubectl_ok(&["describe", "svc", "web", "-n", "demo"]);
    let fields = describe_fields(&d);
    let field = |k: &str| fields.get(k).map(String::as_str);
    assert_eq!(field("Name"), Some("web"), "{d}");
    assert_eq!(field("Namespace"), Some("demo"), "{d}");
    assert_eq!(field("Selector"), Some("app=web"), "{d}");
    assert_eq!(field("Type"), Some("ClusterIP"), "{d}");
    assert_eq!(field("IP"), Some(table.cell("web", "CLUSTER-IP")), "{d}");
    let port = field("Port").unwrap_or_else(|| panic!("no Port line:\n{d}"));
    assert_eq!(
        port.split_whitespace().collect::<Vec<_>>(),
        ["http", "80/TCP"],
        "{d}"
    );
    assert_eq!(field("TargetPort"), Some("8080/TCP"), "{d}");

    // Discovery.
    let res_text = f.kubectl_ok(&["api-resources", "-o", "name"]);
    let names: Vec<&str> = res_text.lines().collect();
    for want in [
        "services",
        "namespaces",
        "endpoints",
        "endpointslices.discovery.k8s.io",
    ] {
        assert!(
            names.contains(&want),
            "api-resources lacks {want}: {names:?}"
        );
    }
    let wide = f.kubectl_ok(&["api-resources"]);
    let svc_line = wide
        .lines()
        .find(|l| l.starts_with("services "))
        .unwrap_or_else(|| panic!("no services row:\n{wide}"));
    assert_eq!(
        svc_line.split_whitespace().collect::<Vec<_>>(),
        ["services", "svc", "v1", "true", "Service"]
    );

    // Version: the server's is printed.
    let v = f.kubectl_ok(&["version"]);
    let server = v
        .lines()
        .find_map(|l| l.strip_prefix("Server Version: "))
        .unwrap_or_else(|| panic!("no server version in:\n{v}"));
    assert!(server.starts_with("v1."), "server version {server:?}");

    // Metrics: the API server's request metrics, including the creates above.
    let m = f.kubectl_ok(&["get", "--raw", "/metrics"]);
    assert!(m.contains("apiserver_request_total"), "metrics:\n{m}");
    assert!(
        m.contains("apiserver_request_duration_seconds"),
        "metrics:\n{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("apiserver_request_total{")
            && l.contains("verb=\"POST\"")
            && l.contains("resource=\"services\"")
            && l.contains("code=\"201\"")),
        "no POST services 201 counter in:\n{m}"
    );
}

/// Re-apply (unchanged, then changed), merge and strategic patches, delete.
#[test]
fn reapply_patch_delete() {
    let f = Fairlead::start(&[]);
    let demo = demo_yaml();
    apply_lines(&f, &demo);
    let rvs = |f: &Fairlead| {
        jsonpath(
            f,
            &["svc,endpointslices", "-n", "demo"],
            "{range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion} {end}",
        )
    };
    let before = rvs(&f);
    assert_eq!(before.split_whitespace().count(), 6, "{before}");

    // Unchanged: every object unchanged, no resourceVersion moves.
    assert_eq!(
        apply_lines(&f, &demo),
        demo_apply_expected("unchanged", &[])
    );
    assert_eq!(rvs(&f), before, "an unchanged re-apply wrote something");

    let web_meta = |f: &Fairlead| {
        jsonpath(
            f,
            &["svc", "web", "-n", "demo"],
            "{.metadata.uid} {.spec.clusterIP} {.metadata.resourceVersion} {.spec.ports[0].targetPort}",
        )
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let old = web_meta(&f);
    assert_eq!(old.len(), 4, "{old:?}");
    assert_eq!(old[3], "8080");

    // Changed: only web's targetPort (its first occurrence in the file).
    let text = std::fs::read_to_string(&demo).unwrap();
    let web_doc = "  name: web\n  namespace: demo\n";
    let at = text.find(web_doc).expect("web in demo.yaml");
    let (head, tail) = text.split_at(at);
    assert!(tail.contains("targetPort: 8080"));
    let changed = format!(
        "{head}{}",
        tail.replacen("targetPort: 8080", "targetPort: 8081", 1)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo-changed.yaml");
    std::fs::write(&file, changed).unwrap();
    assert_eq!(
        apply_lines(&f, &file),
        demo_apply_expected("unchanged", &[("service/web", "configured")])
    );
    let new = web_meta(&f);
    assert_eq!(new[0], old[0], "uid changed");
    assert_eq!(new[1], old[1], "clusterIP changed");
    assert_ne!(new[2], old[2], "resourceVersion did not change");
    assert_eq!(new[3], "8081", "targetPort");
    let np_target = jsonpath(
        &f,
        &["svc", "web-nodeport", "-n", "demo"],
        "{.spec.ports[0].targetPort}",
    );
    assert_eq!(np_target, "8080", "web-nodeport was touched");

    // Merge patch on labels keeps the existing label.
    f.kubectl_ok(&[
        "patch",
        "svc",
        "web",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"tier":"front"}}}"#,
    ]);
    assert_eq!(
        jsonpath(
            &f,
            &["svc", "web", "-n", "demo"],
            "{.metadata.labels.app},{.metadata.labels.tier}"
        ),
        "web,front"
    );

    // Strategic merge patch (kubectl's default) adds a port, keeping the old.
    f.kubectl_ok(&[
        "patch",
        "svc",
        "web",
        "-n",
        "demo",
        "-p",
        r#"{"spec":{"ports":[{"name":"metrics","port":9090,"targetPort":9090}]}}"#,
    ]);
    assert_eq!(
        jsonpath(
            &f,
            &["svc", "web", "-n", "demo"],
            "{range .spec.ports[*]}{.name}:{.port}:{.targetPort}:{.protocol} {end}"
        )
        .trim(),
        "http:80:8081:TCP metrics:9090:9090:TCP"
    );
    let after_patch = web_meta(&f);
    assert_eq!(after_patch[0], old[0], "uid changed by patch");
    assert_eq!(after_patch[1], old[1], "clusterIP changed by patch");

    // Delete → NotFound.
    let out = f.kubectl_ok(&["delete", "svc", "docs", "-n", "demo"]);
    assert!(out.contains("service \"docs\" deleted"), "{out}");
    let err = kubectl_err(&f, &["get", "svc", "docs", "-n", "demo"]);
    assert!(err.contains("NotFound"), "{err}");
    assert!(err.contains("services \"docs\" not found"), "{err}");
    let names = f.kubectl_ok(&["get", "svc", "-n", "demo", "-o", "name"]);
    assert!(!names.lines().any(|l| l == "service/docs"), "{names}");
    assert!(names.lines().any(|l| l == "service/web"), "{names}");
}

/// Kills and reaps a child process (ours) on drop, also when a test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kubectl get svc -w` prints a new row for a Service changed after the list.
#[test]
fn watch_sees_label_change() {
    let f = Fairlead::start(&[]);
    f.kubectl_ok(&["apply", "-f", demo_yaml().to_str().unwrap()]);

    let mut child = KillOnDrop(
        kubectl_cmd(&f.kubeconfig, &["get", "svc", "-n", "demo", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kubectl -w"),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WATCH_DEADLINE;
    let mut seen = Vec::new();
    // Read lines until `pred` matches one and return it; panic at the deadline.
    let mut wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(e) => panic!("watch: no {what} ({e:?}); lines so far: {seen:#?}"),
            }
        }
    };
    // The initial list: a header and one row per demo Service.
    let initial = ["docs", "external-db", "web", "web-headless", "web-nodeport"];
    let mut listed = std::collections::BTreeSet::new();
    while listed.len() < initial.len() {
        let row = wait_for("initial rows", &|l: &str| {
            initial.contains(&l.split_whitespace().next().unwrap_or(""))
        });
        let name = row.split_whitespace().next().unwrap().to_string();
        assert!(listed.insert(name), "listed twice: {row}");
    }
    let is_web = |l: &str| l.split_whitespace().next() == Some("web");

    let out = f.kubectl_ok(&["label", "svc", "web", "-n", "demo", "x=y"]);
    assert!(out.contains("service/web labeled"), "{out}");
    let last = wait_for("web row after the label change", &is_web);
    let cells: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(cells[1], "ClusterIP", "{last}");
    assert_eq!(cells[4], "80/TCP", "{last}");

    // Stop the watch (our own child) and the reader.
    drop(child);
    drop(rx);
    reader.join().unwrap();
    assert_eq!(
        jsonpath(&f, &["svc", "web", "-n", "demo"], "{.metadata.labels.x}"),
        "y"
    );
}

/// 422 on an invalid port, strict field validation, ClusterIP / NodePort
/// already allocated, and release of both on delete.
#[test]
fn invalid_services_rejected() {
    let f = Fairlead::start(&[]);
    f.kubectl_ok(&["apply", "-f", demo_yaml().to_str().unwrap()]);

    // Port out of range.
    let bad = service_yaml("bad", "demo", "", "").replace("port: 80", "port: 70000");
    let err = failed(
        &f.kubectl_stdin(&["apply", "-f", "-"], &bad),
        "apply port 70000",
    );
    assert!(err.contains("The Service \"bad\" is invalid"), "{err}");
    assert!(
        err.contains(
            "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
        ),
        "{err}"
    );
    let err = kubectl_err(&f, &["get", "svc", "bad", "-n", "demo"]);
    assert!(err.contains("NotFound"), "{err}");

    // Unknown field: strict (kubectl's default) rejects, --validate=false drops it.
    let bogus = service_yaml("bogus", "demo", "  bogus: 1\n", "");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bogus.yaml");
    std::fs::write(&file, &bogus).unwrap();
    let file = file.to_str().unwrap();
    let err = kubectl_err(&f, &["apply", "-f", file]);
    assert!(err.contains("unknown field \"spec.bogus\""), "{err}");
    let err = kubectl_err(&f, &["get", "svc", "bogus", "-n", "demo"]);
    assert!(err.contains("NotFound"), "{err}");
    let out = f.kubectl_ok(&["apply", "--validate=false", "-f", file]);
    assert!(out.contains("service/bogus created"), "{out}");
    let spec = jsonpath(&f, &["svc", "bogus", "-n", "demo"], "{.spec}");
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("spec is JSON");
    assert!(spec.get("bogus").is_none(), "unknown field stored: {spec}");
    assert_eq!(spec["ports"][0]["port"], 80);

    // A ClusterIP that is taken.
    let web_ip = jsonpath(&f, &["svc", "web", "-n", "demo"], "{.spec.clusterIP}");
    assert!(in_service_range(&web_ip), "{web_ip}");
    let taken = service_yaml("taken", "demo", &format!("  clusterIP: {web_ip}\n"), "");
    let err = failed(
        &f.kubectl_stdin(&["create", "-f", "-"], &taken),
        "create with a taken clusterIP",
    );
    assert!(err.contains("The Service \"taken\" is invalid"), "{err}");
    assert!(err.contains("provided IP is already allocated"), "{err}");
    assert!(err.contains(&web_ip), "{err}");

    // A NodePort that is taken (web-nodeport holds 30080).
    let np = service_yaml("np", "demo", "  type: NodePort\n", "    nodePort: 30080\n");
    let err = failed(
        &f.kubectl_stdin(&["create", "-f", "-"], &np),
        "create with a taken nodePort",
    );
    assert!(err.contains("The Service \"np\" is invalid"), "{err}");
    assert!(
        err.contains(
            "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
        ),
        "{err}"
    );
    let names = f.kubectl_ok(&["get", "svc", "-n", "demo", "-o", "name"]);
    assert!(
        !names
            .lines()
            .any(|l| l == "service/taken" || l == "service/np"),
        "{names}"
    );

    // A user-chosen IP is held until delete, then free again.
    let mine = service_yaml("mine", "demo", "  clusterIP: 10.96.100.100\n", "");
    let out = f.kubectl_stdin(&["create", "-f", "-"], &mine);
    assert!(out.status.success(), "create mine: {}", stderr(&out));
    let mine2 = service_yaml("mine2", "demo", "  clusterIP: 10.96.100.100\n", "");
    let err = failed(
        &f.kubectl_stdin(&["create", "-f", "-"], &mine2),
        "second Service on 10.96.100.100",
    );
    assert!(err.contains("provided IP is already allocated"), "{err}");
    f.kubectl_ok(&["delete", "svc", "mine", "web", "web-nodeport", "-n", "demo"]);
    for (yaml, what) in [
        (&mine2, "re-create on a released user-chosen IP"),
        (&taken, "re-create on web's released IP"),
        (&np, "re-create on the released nodePort"),
    ] {
        let out = f.kubectl_stdin(&["create", "-f", "-"], yaml);
        assert!(out.status.success(), "{what}: {}", stderr(&out));
    }
    assert_eq!(
        jsonpath(&f, &["svc", "mine2", "-n", "demo"], "{.spec.clusterIP}"),
        "10.96.100.100"
    );
    assert_eq!(
        jsonpath(&f, &["svc", "taken", "-n", "demo"], "{.spec.clusterIP}"),
        web_ip
    );
    assert_eq!(
        jsonpath(
            &f,
            &["svc", "np", "-n", "demo"],
            "{.spec.ports[0].nodePort}"
        ),
        "30080"
    );
}

/// `kubectl delete ns demo` waits until the namespace and its objects are
/// gone; their ClusterIP and NodePort are released.
#[test]
fn namespace_delete() {
    let f = Fairlead::start(&[]);
    f.kubectl_ok(&["apply", "-f", demo_yaml().to_str().unwrap()]);
    let web_ip = jsonpath(&f, &["svc", "web", "-n", "demo"], "{.spec.clusterIP}");
    assert!(in_service_range(&web_ip), "{web_ip}");

    let out = f.kubectl_ok(&["delete", "ns", "demo"]);
    assert!(out.contains("namespace \"demo\" deleted"), "{out}");
    // kubectl waited: everything is gone right away.
    let out = f.kubectl(&["get", "svc", "-n", "demo"]);
    assert!(out.status.success(), "get svc: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "", "Services left in demo");
    assert!(
        stderr(&out).contains("No resources found"),
        "{}",
        stderr(&out)
    );
    let out = f.kubectl_ok(&["get", "endpointslices", "-n", "demo", "-o", "name"]);
    assert_eq!(out.trim(), "", "EndpointSlices left in demo");
    let err = kubectl_err(&f, &["get", "ns", "demo"]);
    assert!(err.contains("NotFound"), "{err}");
    assert!(err.contains("namespaces \"demo\" not found"), "{err}");
    let all = f.kubectl_ok(&["get", "svc", "-A", "-o", "name"]);
    assert_eq!(
        all.split_whitespace().collect::<Vec<_>>(),
        ["service/kubernetes", "service/kube-dns"],
        "{all}"
    );

    // The namespace can be created again, with web's old IP and nodePort 30080.
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n";
    let svc = service_yaml(
        "again",
        "demo",
        &format!("  type: NodePort\n  clusterIP: {web_ip}\n"),
        "    nodePort: 30080\n",
    );
    let out = f.kubectl_stdin(&["create", "-f", "-"], &format!("{ns}---\n{svc}"));
    assert!(out.status.success(), "re-create: {}", stderr(&out));
    assert_eq!(
        jsonpath(
            &f,
            &["svc", "again", "-n", "demo"],
            "{.spec.clusterIP} {.spec.ports[0].nodePort}"
        ),
        format!("{web_ip} 30080")
    );
}

/// kubectl with a bearer token and no kubeconfig, `input` on stdin.
fn kubectl_token(f: &Fairlead, token: &str, args: &[&str], input: &str) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.args(["--kubeconfig", "/dev/null", "--server", &f.url])
        .arg("--insecure-skip-tls-verify")
        .arg(format!("--token={token}"))
        .args(args)
        .env(
            "KUBECACHEDIR",
            f.data_dir.join(format!("kubectl-cache-{token}")),
        );
    common::server::run_with_stdin(cmd, input)
}

/// Static tokens: members of system:masters write, a user bound to `view`
/// only reads, unknown tokens are 401.
#[test]
fn token_auth() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(
        &tokens,
        "admintok,admin,1,\"system:masters\"\nreadtok,bob,2,\"\"\n",
    )
    .unwrap();
    let f = Fairlead::start(&["--token-auth-file", tokens.to_str().unwrap()]);
    // RBAC: bob may do nothing until a binding gives him `view`.
    let out = kubectl_token(&f, "readtok", &["get", "svc"], "");
    assert!(failed(&out, "unbound reader").contains("Forbidden"));
    f.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-view",
        "--clusterrole=view",
        "--user=bob",
    ]);

    // The reader can list.
    let out = kubectl_token(&f, "readtok", &["get", "svc"], "");
    assert!(out.status.success(), "reader get svc: {}", stderr(&out));
    let table = parse_table(&stdout(&out));
    assert_eq!(table.cell("kubernetes", "CLUSTER-IP"), "10.96.0.1");

    // ... but not create or delete.
    let svc = service_yaml("x", "default", "", "");
    let out = kubectl_token(&f, "readtok", &["create", "-f", "-"], &svc);
    let err = failed(&out, "reader create");
    assert!(err.contains("Forbidden"), "{err}");
    assert!(err.contains("User \"bob\" cannot create"), "{err}");
    let err = failed(
        &kubectl_token(&f, "readtok", &["delete", "svc", "kubernetes"], ""),
        "reader delete",
    );
    assert!(err.contains("Forbidden"), "{err}");
    assert!(err.contains("User \"bob\" cannot delete"), "{err}");
    let out = kubectl_token(
        &f,
        "readtok",
        &["get", "svc", "kubernetes", "-o", "name"],
        "",
    );
    assert_eq!(
        stdout(&out).trim(),
        "service/kubernetes",
        "{}",
        stderr(&out)
    );

    // The admin token can write.
    let demo = demo_yaml();
    let out = kubectl_token(&f, "admintok", &["apply", "-f", demo.to_str().unwrap()], "");
    assert!(out.status.success(), "admin apply: {}", stderr(&out));
    let out = kubectl_token(&f, "admintok", &["delete", "svc", "docs", "-n", "demo"], "");
    assert!(out.status.success(), "admin delete: {}", stderr(&out));

    // Unknown token: 401.
    let err = failed(
        &kubectl_token(&f, "bogus", &["get", "--raw", "/api/v1/namespaces"], ""),
        "bogus token",
    );
    assert!(err.contains("Unauthorized"), "{err}");
    let err = failed(
        &kubectl_token(&f, "bogus", &["get", "svc"], ""),
        "bogus token",
    );
    // Discovery fails first; kubectl words the 401 as a login request.
    assert!(err.contains("You must be logged in to the server"), "{err}");

    // The generated admin kubeconfig (client certificate) still works.
    let out = f.kubectl_ok(&["get", "svc", "-n", "demo", "-o", "name"]);
    assert!(out.lines().any(|l| l == "service/web"), "{out}");
}

/// kubectl's imperative `create` commands send built-in kinds as protobuf.
#[test]
fn imperative_create_commands() {
    let f = Fairlead::start(&[]);
    let out = f.kubectl(&["create", "namespace", "imp"]);
    assert!(
        out.status.success(),
        "kubectl create namespace: {}",
        stderr(&out)
    );
    let out = f.kubectl(&[
        "create",
        "service",
        "clusterip",
        "imp-svc",
        "-n",
        "imp",
        "--tcp=80:8080",
    ]);
    assert!(
        out.status.success(),
        "kubectl create service clusterip: {}",
        stderr(&out)
    );
    assert_eq!(
        jsonpath(
            &f,
            &["svc", "imp-svc", "-n", "imp"],
            "{.spec.type} {.spec.ports[0].port} {.spec.ports[0].targetPort}"
        ),
        "ClusterIP 80 8080"
    );
    let ip = jsonpath(&f, &["svc", "imp-svc", "-n", "imp"], "{.spec.clusterIP}");
    assert!(in_service_range(&ip), "{ip}");
}

/// ConfigMaps and Secrets the way users make them: `kubectl create
/// configmap|secret` (sent as protobuf), read back as kubectl shows them.
#[test]
fn configmaps_and_secrets_from_kubectl_create() {
    let f = Fairlead::start(&[]);
    let out = f.kubectl(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
        "--from-literal=level=3",
    ]);
    assert!(out.status.success(), "create configmap: {}", stderr(&out));
    assert_eq!(
        jsonpath(&f, &["cm", "settings"], "{.data.mode} {.data.level}"),
        "fast 3"
    );
    let table = parse_table(&stdout(&f.kubectl(&["get", "configmaps"])));
    assert_eq!(table.cell("settings", "DATA"), "2");

    let out = f.kubectl(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=user=admin",
    ]);
    assert!(out.status.success(), "create secret: {}", stderr(&out));
    // "admin", base64-encoded, as the API stores secret data.
    assert_eq!(
        jsonpath(&f, &["secret", "creds"], "{.type} {.data.user}"),
        "Opaque YWRtaW4="
    );
    let table = parse_table(&stdout(&f.kubectl(&["get", "secrets"])));
    assert_eq!(table.cell("creds", "TYPE"), "Opaque");
    assert_eq!(table.cell("creds", "DATA"), "1");
}
