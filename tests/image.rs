//! Acceptance test of the container image (`docker/Containerfile`,
//! `scripts/image`, issue 16): the image builds with podman, holds no
//! shell and no package manager, and `podman run IMAGE up` serves
//! `kubectl get ns` from the host through a loopback port mapping.
//!
//! The image is built from the binary this suite already built
//! (`FAIRLEAD_BIN`; `scripts/image` then adds the shared libraries it
//! loads), so CI does not compile fairlead a second time; `scripts/image`
//! without it builds the static binary for users. The container runs in
//! its own network namespace (podman's), so whatever `up` programs stays
//! there; from the host the test only talks to 127.0.0.1.
//!
//! Where podman cannot run containers (no podman, no runtime, no
//! namespaces), the test says why and skips.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::cluster::echo_deployment_yaml;
use common::server::run_with_stdin;

const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead");

/// The node port the test's Service asks for (mapped to a host loopback
/// port).
const WEB_NODE_PORT: u16 = 30080;

/// podman with the settings that work without systemd as PID 1.
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--cgroup-manager=cgroupfs", "--events-backend=file"])
        .args(args)
        .output()
        .expect("podman")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Why containers cannot run here, if they cannot.
fn cannot_run_containers() -> Option<String> {
    let v = Command::new("podman").arg("--version").output();
    if !v.is_ok_and(|o| o.status.success()) {
        return Some("podman is not installed (Debian: apt-get install podman runc)".into());
    }
    if !Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("runc is not installed (Debian: apt-get install runc)".into());
    }
    None
}

struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in &self.0 {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = podman(&args);
        }
    }
}

#[test]
fn image_builds_has_no_shell_and_serves_up() {
    if let Some(why) = cannot_run_containers() {
        eprintln!("SKIPPED image_builds_has_no_shell_and_serves_up: {why}");
        return;
    }
    let id = std::process::id();
    let tag = format!("localhost/fairlead-test:{id}");
    let name = format!("fairlead-test-{id}");
    let mut cleanup = Cleanup(vec![vec!["rmi".into(), "-f".into(), tag.clone()]]);

    // The documented command, reusing this suite's binary.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image");
    let built = Command::new(&script)
        .arg(&tag)
        .env("FAIRLEAD_BIN", FAIRLEAD)
        .output()
        .expect("scripts/image");
    assert!(built.status.success(), "scripts/image: {}", text(&built));
    let said = text(&built);
    println!("{}", said.trim());
    assert!(said.contains(&format!("built {tag}: ")), "{said}");

    // What is in it: the binary (and its libraries), no shell, no
    // package manager.
    let created = podman(&["create", "--name", &format!("{name}-fs"), &tag]);
    assert!(created.status.success(), "{}", text(&created));
    cleanup
        .0
        .insert(0, vec!["rm".into(), "-f".into(), format!("{name}-fs")]);
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "podman --cgroup-manager=cgroupfs --events-backend=file export {name}-fs | tar -t"
        ))
        .output()
        .unwrap();
    assert!(tar.status.success(), "{}", text(&tar));
    let files = String::from_utf8_lossy(&tar.stdout).to_string();
    assert!(
        files.lines().any(|f| f == "usr/local/bin/fairlead"),
        "{files}"
    );
    for banned in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "usr/bin/apt",
        "usr/bin/dpkg",
        "sbin/apk",
    ] {
        assert!(
            !files.lines().any(|f| f.trim_end_matches('/') == banned),
            "the image has {banned}:\n{files}"
        );
    }
    // Explicit ulimits within this machine's hard limits: podman's
    // defaults are higher, and raising a hard limit needs
    // CAP_SYS_RESOURCE, which root here does not have.
    let nofile = format!("nofile={0}:{0}", hard_nofile().min(65536));
    let limits = [
        "--runtime",
        "runc",
        "--ulimit",
        &nofile,
        "--ulimit",
        "nproc=4096:4096",
    ];
    let run_args = |rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into()];
        v.extend(limits.iter().map(|s| s.to_string()));
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let shell = podman_owned(&run_args(&[
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "true",
    ]));
    assert!(!shell.status.success(), "a shell ran in the image");

    // The image runs any subcommand.
    let version = podman_owned(&run_args(&["--rm", &tag, "--version"]));
    assert!(version.status.success(), "{}", text(&version));
    assert!(text(&version).contains("commit"), "{}", text(&version));

    // `up` in a container, its API on a loopback port of the host.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let health_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    // `up` with its defaults (userspace proxy, cluster DNS, pods), as
    // k3s runs in a container: privileged, for the pods' namespaces,
    // mounts and cgroups. Everything it sets up is netlink from the one
    // binary; the image has no `ip`.
    let run = podman_owned(&run_args(&[
        "-d",
        "--name",
        &name,
        "--privileged",
        "-p",
        &format!("127.0.0.1:{port}:6443"),
        "-p",
        &format!("127.0.0.1:{health_port}:10256"),
        "-p",
        &format!("127.0.0.1:{web_port}:{WEB_NODE_PORT}"),
        "-v",
        &format!("{}:/var/lib/fairlead", data.path().display()),
        &tag,
        "up",
        "--bind-address",
        "0.0.0.0",
    ]));
    if !run.status.success() {
        let why = text(&run);
        // A machine whose podman cannot start containers at all.
        if why.contains("netavark") || why.contains("cni") || why.contains("iptables") {
            eprintln!("SKIPPED the container run: podman cannot network containers here: {why}");
            return;
        }
        panic!("podman run: {why}");
    }
    cleanup
        .0
        .insert(0, vec!["rm".into(), "-f".into(), name.clone()]);
    let kubeconfig = data.path().join("kubeconfig");
    let end = Instant::now() + Duration::from_secs(60);
    let ns = loop {
        let out = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--server=https://127.0.0.1:{port}"))
            .args(["get", "ns", "-o", "name"])
            .output()
            .expect("kubectl");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        let logs = podman(&["logs", &name]);
        assert!(
            Instant::now() < end,
            "kubectl get ns through 127.0.0.1:{port}: {}\n---- container log ----\n{}",
            text(&out),
            text(&logs)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    let kubectl = |args: &[&str], stdin: Option<&str>| -> Output {
        let mut c = Command::new("kubectl");
        c.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--server=https://127.0.0.1:{port}"))
            .args(args);
        run_with_stdin(c, stdin.unwrap_or(""))
    };
    // And its node daemon synced (nftables in the container's own
    // namespace): /healthz says 200 through the second mapping.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg(format!("http://127.0.0.1:{health_port}/healthz"))
            .output()
            .expect("curl");
        if String::from_utf8_lossy(&out.stdout) == "200" {
            break;
        }
        assert!(
            Instant::now() < end,
            "node /healthz not 200: {}\n---- container log ----\n{}",
            text(&out),
            text(&podman(&["logs", &name]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Pods in the container: a Deployment of two `fairlead echo`
    // replicas (each in its own network namespace on the container's pod
    // bridge) behind a NodePort Service, reached from the host through the
    // port mapping: the whole path, node port → userspace proxy → pod.
    let applied = kubectl(
        &["apply", "-f", "-"],
        Some(&echo_deployment_yaml(2, Some(WEB_NODE_PORT))),
    );
    assert!(applied.status.success(), "{}", text(&applied));
    let end = Instant::now() + Duration::from_secs(90);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{web_port}/"))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && body.starts_with("web-") {
            seen.insert(body);
        } else {
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(
            Instant::now() < end,
            "the Service's two pods did not both answer through the node port (seen {seen:?}; last: {})\n\
             ---- pods ----\n{}\n---- container log ----\n{}",
            text(&out),
            text(&kubectl(&["get", "pods", "-o", "wide"], None)),
            text(&podman(&["logs", "--tail", "60", &name]))
        );
    }
    println!("pods answered through the node port: {seen:?}");
    // The pods' egress masquerade is written over netlink: the image,
    // which has no `nft`, sets it up too.
    let log = text(&podman(&["logs", &name]));
    assert!(
        log.contains("running pods") && !log.contains("not masqueraded"),
        "{log}"
    );
}

fn podman_owned(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&args)
}

/// This process's hard limit of open files.
fn hard_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_max
}
