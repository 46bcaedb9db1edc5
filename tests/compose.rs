//! Acceptance test of `docker/compose.yaml` (issue 16): with the images
//! `scripts/image` builds (fairlead from this suite's binary, etcd from
//! Debian's), `podman-compose up` brings up etcd, two API servers on it,
//! the controllers and a node daemon; kubectl works through either API
//! server's loopback port and both see one cluster; `down` removes every
//! container. Every container runs in podman's own network; from the host
//! the test only talks to 127.0.0.1.
//!
//! Skips, saying why, where podman-compose or podman is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead");

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One compose project of the test's own (images, ports, state).
struct Project {
    name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        Command::new("podman-compose")
            .arg("-f")
            .arg(&self.file)
            .arg("-p")
            .arg(&self.name)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("podman-compose")
    }

    fn containers(&self) -> Vec<String> {
        let out = Command::new("podman")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=io.podman.compose.project={}", self.name))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["down"]);
        for i in &self.images {
            let _ = Command::new("podman").args(["rmi", "-f", i]).output();
        }
    }
}

fn kubectl(kubeconfig: &Path, port: u16, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--server=https://127.0.0.1:{port}"))
        .args(args)
        .output()
        .expect("kubectl")
}

#[test]
fn compose_comes_up_serves_through_both_api_servers_and_goes_down() {
    for (program, package) in [
        ("podman", "podman"),
        ("podman-compose", "podman-compose"),
        ("runc", "runc"),
        ("etcd", "etcd-server"),
    ] {
        if !have(program) {
            eprintln!("SKIPPED compose test: {program} is not installed (Debian: apt-get install {package})");
            return;
        }
    }
    let id = std::process::id();
    let state = tempfile::tempdir().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let image = format!("localhost/fairlead-compose-test:{id}");
    let etcd_image = format!("localhost/fairlead-etcd-compose-test:{id}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let project = Project {
        name: format!("fairlead-test-{id}"),
        file: root.join("docker/compose.yaml"),
        env: vec![
            ("FAIRLEAD_IMAGE".into(), image.clone()),
            ("FAIRLEAD_ETCD_IMAGE".into(), etcd_image.clone()),
            ("FAIRLEAD_API1_PORT".into(), p1.to_string()),
            ("FAIRLEAD_API2_PORT".into(), p2.to_string()),
            ("FAIRLEAD_STATE".into(), state.path().display().to_string()),
            // No systemd here: runc, cgroupfs, file events.
            (
                "CONTAINERS_CONF".into(),
                root.join("docker/containers.conf").display().to_string(),
            ),
        ],
        images: vec![image.clone(), etcd_image.clone()],
    };
    for args in [vec![image.as_str()], vec!["--etcd", etcd_image.as_str()]] {
        let out = Command::new(root.join("scripts/image"))
            .args(&args)
            .env("FAIRLEAD_BIN", FAIRLEAD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/image {args:?}: {}",
            text(&out)
        );
    }

    let up = project.compose(&["up", "-d"]);
    assert!(up.status.success(), "podman-compose up: {}", text(&up));
    let logs = |service: &str| {
        let out = Command::new("podman")
            .envs(project.env.iter().map(|(k, v)| (k, v)))
            .arg("logs")
            .arg(format!("{}_{service}_1", project.name))
            .output()
            .unwrap();
        text(&out)
    };

    // Both API servers answer, each with its own kubeconfig; a
    // certificate of one is trusted by the other (one CA, through etcd).
    let kc1 = state.path().join("api1/kubeconfig");
    let kc2 = state.path().join("api2/kubeconfig");
    let end = Instant::now() + Duration::from_secs(90);
    for (kc, port) in [(&kc1, p1), (&kc2, p2), (&kc1, p2), (&kc2, p1)] {
        loop {
            let out = kubectl(kc, port, &["get", "ns", "kube-system", "-o", "name"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < end,
                "kubectl via 127.0.0.1:{port} ({}): {}\n---- api1 ----\n{}\n---- api2 ----\n{}\n---- etcd ----\n{}",
                kc.display(),
                text(&out),
                logs("api1"),
                logs("api2"),
                logs("etcd")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // One cluster: written through api1, read through api2.
    let apply = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kc1.display()))
        .arg(format!("--server=https://127.0.0.1:{p1}"))
        .args(["create", "service", "clusterip", "web", "--tcp=80:8080"])
        .output()
        .unwrap();
    assert!(apply.status.success(), "{}", text(&apply));
    let seen = kubectl(
        &kc2,
        p2,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    assert!(seen.status.success(), "{}", text(&seen));
    let ip: std::net::Ipv4Addr = String::from_utf8_lossy(&seen.stdout)
        .parse()
        .unwrap_or_else(|_| panic!("not a ClusterIP: {}", text(&seen)));
    let o = ip.octets();
    assert!(
        o[0] == 10 && (96..112).contains(&o[1]),
        "{ip} is not in 10.96.0.0/12"
    );
    // The controllers lead, and the node daemon registered its Node.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let lease = kubectl(
            &kc1,
            p1,
            &[
                "get",
                "lease",
                "-n",
                "kube-system",
                "fairlead-controllers",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
        );
        let node = kubectl(&kc1, p1, &["get", "node", "compose-node", "-o", "name"]);
        if lease.status.success() && !lease.stdout.is_empty() && node.status.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "controllers' lease: {}\nnode: {}\n---- controllers ----\n{}\n---- node ----\n{}",
            text(&lease),
            text(&node),
            logs("controllers"),
            logs("node")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Each API server, bound to 0.0.0.0, advertises its container's own
    // address: the `kubernetes` EndpointSlice lists two (one Lease each),
    // not one shared address.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl(
            &kc2,
            p2,
            &[
                "get",
                "endpointslice",
                "-n",
                "default",
                "kubernetes",
                "-o",
                "jsonpath={.endpoints[*].addresses[0]}",
            ],
        );
        let addrs: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if addrs.len() == 2
            && addrs
                .iter()
                .all(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "the kubernetes EndpointSlice lists both API servers: {addrs:?} ({})",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(project.containers().len(), 5, "{:?}", project.containers());

    let down = project.compose(&["down"]);
    assert!(
        down.status.success(),
        "podman-compose down: {}",
        text(&down)
    );
    assert!(
        project.containers().is_empty(),
        "left: {:?}",
        project.containers()
    );
}
