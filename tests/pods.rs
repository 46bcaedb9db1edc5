//! Pods that run: `fairlead up` runs the Pods bound to its node as
//! processes in their own network namespaces (issue "Pods that run").
//! Each test runs a whole cluster in a network namespace it creates; the
//! pods' namespaces are created and removed by the node, and every test's
//! cluster is cleaned up (`fairlead node --cleanup`) when it ends.
//!
//! Commands "inside a pod" enter the pod's network, mount and UTS
//! namespaces through its container process (`nsenter -t <pid>`), so they
//! see the pod's own `/etc/resolv.conf` and hostname.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{counts, Cluster, SETTLE};
use common::server::poll;
use serde_json::Value;

#[test]
fn agent() {
    common::netns::agent_main();
}

fn pod(c: &Cluster, ns: &str, name: &str) -> Option<Value> {
    let out = c.kubectl(&["get", "pod", name, "-n", ns, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Poll pod `name` until `pred` holds for it; the pod then.
fn wait_pod(c: &Cluster, ns: &str, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll(&format!("pod {ns}/{name}: {what}"), SETTLE, || {
        pod(c, ns, name).filter(|p| pred(p))
    })
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn restarts(p: &Value) -> u64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

/// The pid of the pod's (first) container, from its containerID.
fn pid(p: &Value) -> i32 {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("process://"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no running container: {p:#}"))
}

/// Run `args` inside the pod whose container is `pid`.
fn in_pod(pid: i32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .args(["-n", "-m", "-u", "--"])
        .args(args)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "{args:?} in the pod failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn echo_pod(name: &str, app: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  \
         containers:\n  - name: echo\n    image: fairlead\n    \
         args: [echo, --http-port, \"8080\", --tcp-port, \"9000\", --log-requests]\n{extra}"
    )
}

fn service(name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  \
         ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: tcp, port: 9000, targetPort: 9000}}\n"
    )
}

/// Acceptance 1: the demo's three pods (its Deployment `web`) run, the
/// Service rotates over them exactly, and a pod resolves `web` through its
/// search path with the real glibc resolver and with dig.
#[test]
fn demo_pods_serve_round_robin_and_resolve_names() {
    let mut c = Cluster::up("pods-demo", &[]);
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
    c.kubectl_ok(&["apply", "-f", demo.to_str().unwrap()]);
    c.kubectl_ok(&[
        "rollout",
        "status",
        "-n",
        "demo",
        "deployment/web",
        "--timeout=60s",
    ]);
    let list = c.get_json(&["get", "pods", "-n", "demo", "-l", "app=web"]);
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    let mut ips = Vec::new();
    for name in &names {
        let p = wait_pod(&c, "demo", name, "Running and Ready", |p| {
            p["status"]["phase"] == "Running" && ready(p)
        });
        let ip: IpAddr = p["status"]["podIP"].as_str().unwrap().parse().unwrap();
        assert!(
            ip.to_string().starts_with("10.244."),
            "{ip} is not from the pod CIDR"
        );
        assert!(p["status"]["hostIP"].as_str().is_some(), "{p:#}");
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "every pod has its own address");
    let wide = c.kubectl_ok(&["get", "pods", "-n", "demo", "-o", "wide"]);
    assert_eq!(wide.matches("Running").count(), 3, "{wide}");

    let svc = c.get_json(&["get", "svc", "web", "-n", "demo"]);
    let cluster_ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let addr = SocketAddr::new(cluster_ip, 80);
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    c.wait_serving(addr, &want);
    let served = c.names_ok(addr, 300, None);
    let n = counts(&served);
    assert_eq!(
        n,
        names
            .iter()
            .map(|n| (n.clone(), 100))
            .collect::<BTreeMap<_, _>>(),
        "exact round robin over the three pods"
    );

    // Inside the first pod: its hostname, its resolv.conf, the Service
    // variables, and `web` through the search path.
    let p = pod(&c, "demo", &names[0]).unwrap();
    let pid = pid(&p);
    assert_eq!(in_pod(pid, &["hostname"]).trim(), names[0]);
    let resolv = in_pod(pid, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("search demo.svc.cluster.local svc.cluster.local cluster.local")
            && resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let getent = in_pod(pid, &["getent", "hosts", "web"]);
    assert_eq!(
        getent.split_whitespace().next(),
        Some(cluster_ip.to_string().as_str()),
        "getent hosts web: {getent}"
    );
    let other = in_pod(pid, &["getent", "hosts", "kubernetes.default"]);
    assert!(
        other.starts_with("10.96.0.1 "),
        "getent hosts kubernetes.default: {other}"
    );
    let dig = in_pod(pid, &["dig", "+short", "+search", "web"]);
    assert_eq!(dig.trim(), cluster_ip.to_string(), "dig +search web");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("WEB_SERVICE_HOST={cluster_ip}")),
        "Service variables: {environ}"
    );
    assert!(
        environ.contains("KUBERNETES_SERVICE_HOST=10.96.0.1"),
        "{environ}"
    );
}

/// Acceptance 2: a killed process is restarted; a failing liveness probe
/// restarts the container; a failing readiness probe takes the pod out of
/// its Service within two periods, and a passing one brings it back.
#[test]
fn pods_heal_and_follow_their_probes() {
    let mut c = Cluster::up("pods-heal", &["--crash-loop-backoff", "1s"]);
    let flags = tempfile::tempdir().unwrap();
    let ready_flag = flags.path().join("ready");
    let alive_flag = flags.path().join("alive");
    std::fs::write(&ready_flag, "").unwrap();
    std::fs::write(&alive_flag, "").unwrap();
    let probes = format!(
        "    readinessProbe: {{exec: {{command: [test, -e, {}]}}, periodSeconds: 1, failureThreshold: 1}}\n    \
         livenessProbe: {{exec: {{command: [test, -e, {}]}}, periodSeconds: 1, failureThreshold: 2}}\n",
        ready_flag.display(),
        alive_flag.display()
    );
    c.apply(&(service("heal") + &echo_pod("h1", "heal", &probes) + &echo_pod("h2", "heal", "")));
    let h1 = wait_pod(&c, "default", "h1", "Ready", ready);
    wait_pod(&c, "default", "h2", "Ready", ready);
    let addr = SocketAddr::new(c.cluster_ip("heal"), 80);
    c.wait_serving(addr, &["h1", "h2"]);

    // kill -9: restarted once, back in the Service.
    let old = pid(&h1);
    // SAFETY: kill(2) of the pod's own container process.
    unsafe {
        libc::kill(old, libc::SIGKILL);
    }
    let h1 = wait_pod(&c, "default", "h1", "restarted once and Ready", |p| {
        restarts(p) == 1 && ready(p)
    });
    assert_ne!(pid(&h1), old, "a new process");
    assert!(!alive(old));
    c.wait_serving(addr, &["h1", "h2"]);

    // Liveness fails twice: the container is restarted.
    std::fs::remove_file(&alive_flag).unwrap();
    wait_pod(
        &c,
        "default",
        "h1",
        "restarted by its liveness probe",
        |p| restarts(p) == 2,
    );
    std::fs::write(&alive_flag, "").unwrap();
    wait_pod(&c, "default", "h1", "Ready again", ready);

    // Readiness fails: out of the Service within two periods.
    let h1_ip = pod(&c, "default", "h1").unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(&ready_flag).unwrap();
    let removed = Instant::now();
    poll("h1 not ready in the slice", SETTLE, || {
        (c.slice_endpoints("heal").get(&h1_ip) == Some(&false)).then_some(())
    });
    let took = removed.elapsed();
    println!(
        "readiness failure in the slice after {}",
        common::cluster::ms(took)
    );
    c.wait_serving(addr, &["h2"]);
    assert!(
        took < Duration::from_millis(2_000 + 500),
        "readiness failure reached the slice after {took:?} (2 periods of 1 s, plus 0.5 s for kubectl to see it)"
    );
    std::fs::write(&ready_flag, "").unwrap();
    c.wait_serving(addr, &["h1", "h2"]);
    assert_eq!(
        restarts(&pod(&c, "default", "h1").unwrap()),
        2,
        "readiness never restarts"
    );
}

/// Acceptance 3: a command that exits 1 crash-loops with growing delays,
/// shown by kubectl; a command that does not exist waits with a clear
/// message.
#[test]
fn crash_loops_back_off_and_missing_commands_say_why() {
    let c = Cluster::up(
        "pods-crash",
        &[
            "--crash-loop-backoff",
            "1s",
            "--crash-loop-max-backoff",
            "8s",
        ],
    );
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: crash}\nspec:\n  containers:\n  \
         - {name: c, image: busybox, command: [sh, -c, \"exit 1\"]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  containers:\n  \
         - {name: c, image: busybox, command: [/no/such/program]}\n",
    );
    // When each restart count was first seen.
    let mut seen: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut shown_crash_loop = false;
    let end = Instant::now() + SETTLE;
    while seen.keys().max().copied().unwrap_or(0) < 4 {
        assert!(Instant::now() < end, "restart counts seen: {seen:?}");
        if let Some(p) = pod(&c, "default", "crash") {
            seen.entry(restarts(&p)).or_insert_with(Instant::now);
        }
        if !shown_crash_loop {
            let table = c.kubectl_ok(&["get", "pod", "crash"]);
            shown_crash_loop = table.contains("CrashLoopBackOff");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let at = |n: u64| seen[&n];
    let (d2, d3, d4) = (at(2) - at(1), at(3) - at(2), at(4) - at(3));
    assert!(
        d2 >= Duration::from_millis(700) && d3 > d2 && d4 > d3,
        "delays must grow from the 1 s start: {d2:?} {d3:?} {d4:?}"
    );
    if !shown_crash_loop {
        poll("kubectl shows CrashLoopBackOff", SETTLE, || {
            c.kubectl_ok(&["get", "pod", "crash"])
                .contains("CrashLoopBackOff")
                .then_some(())
        });
    }
    let ghost = wait_pod(&c, "default", "ghost", "waiting with a reason", |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "RunContainerError"
    });
    let msg = ghost["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        msg.contains("/no/such/program") && msg.contains("not found"),
        "{msg}"
    );
    assert_eq!(ghost["status"]["phase"], "Pending");
}

/// Acceptance 4: exceeding the memory limit is reported as OOMKilled.
#[test]
fn memory_limit_is_enforced_and_reported() {
    let c = Cluster::up("pods-oom", &[]);
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hog}\nspec:\n  restartPolicy: Never\n  containers:\n  \
         - name: c\n    image: python\n    \
         command: [python3, -c, \"x = b'x' * (256 * 1024 * 1024); print(len(x))\"]\n    \
         resources: {limits: {memory: 64Mi}}\n",
    );
    let p = wait_pod(&c, "default", "hog", "terminated", |p| {
        !p["status"]["containerStatuses"][0]["state"]["terminated"].is_null()
    });
    let t = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["reason"], "OOMKilled", "{p:#}");
    assert_eq!(t["exitCode"], 137);
    assert_eq!(p["status"]["phase"], "Failed");
    // Done for good: its sandbox (namespace, address) is given back.
    let uid = p["metadata"]["uid"].as_str().unwrap();
    let ip = p["status"]["podIP"].as_str().unwrap();
    let held = c.data_dir().join("network/ips").join(ip);
    poll("the finished pod's address released", SETTLE, || {
        (!held.exists()).then_some(())
    });
    let netns = std::fs::read_to_string(c.data_dir().join("pods").join(uid).join("netns")).unwrap();
    assert!(
        !Path::new("/run/netns").join(netns.trim()).exists(),
        "{netns} left"
    );
}

/// Acceptance 5: deleting a pod sends SIGTERM first; its open connection
/// completes, new connections go elsewhere, and the object goes away once
/// the process has ended.
#[test]
fn deleting_a_pod_drains_it_then_removes_it() {
    let mut c = Cluster::up("pods-delete", &[]);
    c.apply(&(service("drain") + &echo_pod("d1", "drain", "")));
    let d1 = wait_pod(&c, "default", "d1", "Ready", ready);
    let d1_uid = d1["metadata"]["uid"].as_str().unwrap().to_string();
    let ip = c.cluster_ip("drain");
    c.wait_serving(SocketAddr::new(ip, 80), &["d1"]);
    // The only endpoint: this connection is d1's.
    c.agent.open("inflight", SocketAddr::new(ip, 9000)).unwrap();
    c.agent.echo_ok("inflight", "before", "connection to d1");
    c.apply(&echo_pod("d2", "drain", ""));
    wait_pod(&c, "default", "d2", "Ready", ready);
    c.wait_serving(SocketAddr::new(ip, 80), &["d1", "d2"]);

    c.kubectl_ok(&["delete", "pod", "d1", "--wait=false"]);
    let log = c
        .data_dir()
        .join("pods")
        .join(&d1_uid)
        .join("logs/echo/0.log");
    poll("d1 got SIGTERM (its echo drains)", SETTLE, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("draining"))
            .map(|_| ())
    });
    let d1 = pod(&c, "default", "d1").expect("d1 stays while it drains");
    assert!(!d1["metadata"]["deletionTimestamp"].is_null());
    c.wait_serving(SocketAddr::new(ip, 80), &["d2"]);
    let names = c.names_ok(SocketAddr::new(ip, 80), 20, None);
    assert!(
        names.iter().all(|n| n == "d2"),
        "new connections reach d2 only: {names:?}"
    );
    c.agent
        .echo_ok("inflight", "during", "the in-flight connection completes");
    c.agent.close("inflight");
    poll("d1 deleted once it ended", SETTLE, || {
        let out = c.kubectl(&["get", "pod", "d1"]);
        String::from_utf8_lossy(&out.stderr)
            .contains("NotFound")
            .then_some(())
    });
    assert!(pod(&c, "default", "d2").is_some());
}

/// Acceptance 8: `fairlead node --cleanup` leaves no pod process,
/// namespace, veth, bridge, cgroup or masquerade table behind.
#[test]
fn cleanup_leaves_nothing_behind() {
    let mut c = Cluster::up("pods-cleanup", &[]);
    c.apply(
        &(echo_pod("e1", "e", "")
            + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: s1}\nspec:\n  containers:\n  \
               - {name: c, image: busybox, command: [sleep, \"600\"]}\n"),
    );
    let mut pids = Vec::new();
    let mut uids = Vec::new();
    for name in ["e1", "s1"] {
        let p = wait_pod(&c, "default", name, "Running", |p| {
            p["status"]["phase"] == "Running"
        });
        pids.push(pid(&p));
        uids.push(p["metadata"]["uid"].as_str().unwrap().to_string());
    }
    let netns: Vec<String> = uids
        .iter()
        .map(|u| {
            std::fs::read_to_string(c.data_dir().join("pods").join(u).join("netns"))
                .expect("the pod's namespace is recorded")
        })
        .collect();
    for n in &netns {
        assert!(
            Path::new("/run/netns").join(n).exists(),
            "{n} exists while the pod runs"
        );
    }
    let links = c.ns.run_ok("ip", &["-o", "link"]);
    assert!(links.contains("flbr0") && links.contains("flv"), "{links}");
    // Pod egress is masqueraded (the table is written over netlink).
    let out = c.kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].spec.podCIDR}"]);
    let pod_cidr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!pod_cidr.is_empty(), "the node has a podCIDR");
    let masq =
        c.ns.run_ok("nft", &["list", "table", "ip", "fairlead-pods"]);
    assert!(
        masq.contains(&format!(
            "ip saddr {pod_cidr} ip daddr != 10.244.0.0/16 masquerade"
        )),
        "{masq}"
    );

    // The node goes away; its pods keep running until cleaned up.
    c.proc("up").kill9();
    assert!(pids.iter().all(|p| alive(*p)), "pods outlive the agent");
    let data = c.data_dir().display().to_string();
    let out = c.run(&["node", "--cleanup", "--data-dir", &data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    poll("pod processes gone", SETTLE, || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    for n in &netns {
        assert!(!Path::new("/run/netns").join(n).exists(), "{n} left behind");
    }
    let links = c.ns.run_ok("ip", &["-o", "link"]);
    assert!(
        !links.contains("flbr0") && !links.contains("flv"),
        "{links}"
    );
    let tables = c.ns.run_ok("nft", &["list", "tables"]);
    assert!(!tables.contains("fairlead-pods"), "{tables}");
    for u in &uids {
        for h in ["memory", "cpu", "cpu,cpuacct", "."] {
            let d = Path::new("/sys/fs/cgroup")
                .join(h)
                .join("fairlead")
                .join(format!("pod{u}"));
            assert!(!d.exists(), "{} left behind", d.display());
        }
        assert!(!c.data_dir().join("pods").join(u).exists());
    }
}

/// Acceptance 6: `kubectl logs` (with `--tail`), `-f` while the pod serves
/// requests, and `--previous` after a restart, through the API server's
/// `pods/log` and the node's port 10250.
#[test]
fn kubectl_logs_follow_and_previous() {
    let mut c = Cluster::up("pods-logs", &["--crash-loop-backoff", "1s"]);
    c.apply(&(service("logs") + &echo_pod("l1", "logs", "")));
    let p = wait_pod(&c, "default", "l1", "Ready", ready);
    let http = SocketAddr::new(c.cluster_ip("logs"), 80);
    c.wait_serving(http, &["l1"]);
    let get = |c: &mut Cluster, msg: &str| {
        let r = c.agent.http(http, &format!("/echo?msg={msg}"), 1, None);
        assert!(matches!(&r[0], Ok((200, _))), "{r:?}");
    };
    get(&mut c, "first-request");
    let logs = c.kubectl_ok(&["logs", "l1"]);
    assert!(logs.contains("GET /echo?msg=first-request"), "{logs}");
    let last = c.kubectl_ok(&["logs", "l1", "--tail", "1"]);
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.contains("first-request"), "{last}");

    // -f: a request made while following shows up in the stream.
    let mut follow = c
        .kubectl_cmd(&["logs", "-f", "l1", "-c", "echo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Until the stream is open (it replays the file first), then the
    // request.
    let wait_line = |what: &str| {
        let end = Instant::now() + SETTLE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("kubectl logs -f never printed {what}"));
            if line.contains(what) {
                return;
            }
        }
    };
    wait_line("first-request");
    get(&mut c, "while-following");
    wait_line("while-following");
    let _ = follow.kill();
    let _ = follow.wait();

    // --previous after a restart.
    // SAFETY: kill(2) of the pod's own container process.
    unsafe {
        libc::kill(pid(&p), libc::SIGKILL);
    }
    wait_pod(&c, "default", "l1", "restarted", |p| {
        restarts(p) == 1 && ready(p)
    });
    let previous = c.kubectl_ok(&["logs", "l1", "--previous"]);
    assert!(previous.contains("while-following"), "{previous}");
    let current = c.kubectl_ok(&["logs", "l1"]);
    assert!(!current.contains("while-following"), "{current}");
    // A pod without a node has no logs to give: a clear 400.
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: nowhere}\nspec:\n  schedulerName: none\n  containers:\n  - {name: c, image: fairlead}\n");
    let out = c.kubectl(&["logs", "nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not have a host assigned"), "{err}");
}

/// Acceptance 7: the node restarts (kill -9 of `fairlead up`, then `up`
/// again on the same data directory) while requests keep coming: the new
/// agent adopts the running pods (same processes, same addresses, no
/// restart) and no request fails.
#[test]
fn node_restart_under_load_adopts_running_pods() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let args = ["--proxy-mode", "nftables"];
    let mut c = Cluster::up("pods-restart", &args);
    // nftables mode needs a route that covers the Service range, as a
    // node's default route does: through the pod bridge here.
    // (Retried until the agent has created the bridge and set it up.)
    poll("a Service route through the pod bridge", SETTLE, || {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", c.ns.name))
            .args(["ip", "route", "add", "10.96.0.0/12", "dev", "flbr0"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    });
    let probe = "    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}\n";
    c.apply(&(service("keep") + &echo_pod("k1", "keep", probe) + &echo_pod("k2", "keep", probe)));
    let before: Vec<Value> = ["k1", "k2"]
        .iter()
        .map(|n| wait_pod(&c, "default", n, "Ready", ready))
        .collect();
    let http = SocketAddr::new(c.cluster_ip("keep"), 80);
    c.wait_serving(http, &["k1", "k2"]);

    // Load from a second client in the namespace until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loader = common::netns::Agent::start(&c.ns, "agent");
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for r in loader.names(http, 10, None) {
                    match r {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
            }
            (ok, failed)
        })
    };
    c.proc("up").kill9();
    c.start_up(&args);
    poll("both pods adopted", SETTLE, || {
        let log = std::fs::read_to_string(c.log_path("up")).unwrap_or_default();
        (log.matches("adopted the pod's running containers").count() >= 2).then_some(())
    });
    // A few more rounds through the restarted node, then stop the load.
    c.names_ok(http, 40, None);
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    println!(
        "requests during the node's restart: {ok} answered, {} failed",
        failed.len()
    );
    assert!(ok > 0, "the load ran");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    for (name, old) in ["k1", "k2"].iter().zip(&before) {
        let now = wait_pod(&c, "default", name, "Ready", ready);
        assert_eq!(restarts(&now), 0, "{name} was not restarted");
        assert_eq!(pid(&now), pid(old), "{name} keeps its process");
        assert_eq!(
            now["status"]["podIP"], old["status"]["podIP"],
            "{name} keeps its address"
        );
    }
    c.wait_serving(http, &["k1", "k2"]);
}

/// Every pod gets its service-account volume (a token bound to the pod,
/// the cluster CA, the namespace) at the standard path and the
/// `KUBERNETES_SERVICE_*` variables, so in-cluster clients work: the real
/// kubectl, run inside the pod with no kubeconfig, reaches the API
/// through the `kubernetes` ClusterIP as `system:serviceaccount:default:default`.
/// A pod that opts out gets no token.
#[test]
fn pods_get_their_service_account_token() {
    let c = Cluster::up("pods-sa", &[]);
    c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: sa-pod}\nspec:\n  containers:\n  \
         - {name: c, image: busybox, command: [sleep, \"600\"]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: no-sa}\nspec:\n  automountServiceAccountToken: false\n  \
         containers:\n  - {name: c, image: busybox, command: [sleep, \"600\"]}\n",
    );
    let p = wait_pod(&c, "default", "sa-pod", "Running", |p| {
        p["status"]["phase"] == "Running"
    });
    let sa_pid = pid(&p);
    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(
        in_pod(sa_pid, &["cat", &format!("{dir}/namespace")]),
        "default"
    );
    let ca = in_pod(sa_pid, &["cat", &format!("{dir}/ca.crt")]);
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    let token = in_pod(sa_pid, &["cat", &format!("{dir}/token")]);
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).expect("a JWT"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "sa-pod");
    assert_eq!(
        claims["kubernetes.io"]["pod"]["uid"], p["metadata"]["uid"],
        "bound to this pod"
    );
    // The host's mount point stays empty: the volume is the pod's own.
    assert!(
        !Path::new(dir).join("token").exists(),
        "the token is on the host"
    );
    let environ = std::fs::read(format!("/proc/{sa_pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("KUBERNETES_SERVICE_HOST=10.96.0.1"),
        "{environ}"
    );

    // In-cluster kubectl inside the pod (its namespaces, the pod's env).
    let kubectl_in_pod = |args: &[&str]| {
        Command::new("nsenter")
            .arg("-t")
            .arg(sa_pid.to_string())
            .args(["-n", "-m", "-u", "--", "env", "-i"])
            .args([
                "KUBERNETES_SERVICE_HOST=10.96.0.1",
                "KUBERNETES_SERVICE_PORT=443",
                "HOME=/nonexistent",
                "kubectl",
            ])
            .args(args)
            .output()
            .expect("kubectl in the pod")
    };
    // RBAC gives a ServiceAccount nothing by itself; a RoleBinding to
    // `view` lets it read its namespace (and still not delete).
    c.kubectl_ok(&[
        "create",
        "rolebinding",
        "default-view",
        "--clusterrole=view",
        "--serviceaccount=default:default",
    ]);
    let out = kubectl_in_pod(&["get", "pod", "sa-pod", "-o", "name"]);
    assert!(
        out.status.success(),
        "in-cluster kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod/sa-pod");
    let denied = kubectl_in_pod(&["delete", "pod", "no-sa"]);
    assert!(
        String::from_utf8_lossy(&denied.stderr)
            .contains("User \"system:serviceaccount:default:default\" cannot delete"),
        "{denied:?}"
    );

    let p = wait_pod(&c, "default", "no-sa", "Running", |p| {
        p["status"]["phase"] == "Running"
    });
    let none = Command::new("nsenter")
        .arg("-t")
        .arg(pid(&p).to_string())
        .args(["-m", "--", "test", "-e", &format!("{dir}/token")])
        .status()
        .unwrap();
    assert!(
        !none.success(),
        "automountServiceAccountToken: false still got a token"
    );
}
