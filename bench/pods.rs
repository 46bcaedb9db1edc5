//! Pod start latency and throughput on one node, as a user sees them:
//! `fairlead up` (the `fairlead` binary Cargo builds with the bench, or
//! `FAIRLEAD_BIN`) in a network namespace of the bench's own, driven
//! through the REST API with kube-rs clients.
//!
//! ```sh
//! cargo bench --bench pods
//! ```
//!
//! Needs root (network namespaces, veths, cgroups).
//!
//! 1. **Latency** (`FAIRLEAD_BENCH_PODS`, 50, one at a time): a Service
//!    `s-i` selecting only pod `p-i` exists first; then pod `p-i` (`fairlead
//!    echo`, no probe) is created → the time until the API shows it Ready,
//!    and until `GET /` through `s-i`'s ClusterIP answers `p-i` (from the
//!    node's namespace): p50/p99. Target: p99 ≤ 1 s to Ready.
//! 2. **The peer**: the same process started in a fresh `ip netns` by hand
//!    with a shell script (namespace, veth to the same bridge, address,
//!    routes, `ip netns exec ... fairlead echo &`, then wait until its port
//!    accepts), as many times: p50/p99, and the ratio.
//! 3. **Throughput** (`FAIRLEAD_BENCH_BURST`, 100): that many pods created
//!    at once → the time until all are Ready, pods/s. Target ≥ 20 pods/s.
//! 4. **With them running**: the `fairlead up` process's RSS, and the CPU
//!    of its node threads (`fl-node*`: proxy, DNS and the pod agent) over
//!    10 s without changes.
//!
//! **Network safety.** Everything runs in the bench's namespace
//! (`nsenter --net`, which keeps the host's cgroups visible to the agent);
//! the bench's own sockets are opened by a thread that entered it. The
//! pods' namespaces hang off the node's bridge there. At the end `fairlead
//! node --cleanup` removes every pod, and the namespace is deleted.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{Netns, Proc};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

const POLL: Duration = Duration::from_millis(5);
const LIMIT: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let n = common::env_u64("FAIRLEAD_BENCH_PODS", 50)? as usize;
    let burst = common::env_u64("FAIRLEAD_BENCH_BURST", 100)? as usize;
    let bin = common::fairlead_bin()?;
    let ns = Netns::new()?;
    let data = tempfile::tempdir()?;
    let port = common::free_port()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(&bin)
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--secure-port", &port.to_string()]);
    common::die_with_parent(&mut cmd);
    let mut up = Proc::spawn("up".into(), cmd, data.path().join("up.log"))?;
    let result = ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(run(&mut up, data.path(), &bin, &ns.name, n, burst))
    });
    let cleanup = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(&bin)
        .args(["node", "--cleanup", "--data-dir"])
        .arg(data.path())
        .output();
    if let Err(e) = &result {
        eprintln!("{}", up.log_tail(40));
        eprintln!("pods bench failed: {e:#}");
    }
    drop(up);
    if let Ok(o) = cleanup {
        if !o.status.success() {
            eprintln!("cleanup: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    result
}

fn echo_pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "echo", "image": "fairlead",
            "args": ["echo", "--http-port", "8080"],
        }]},
    }))
    .expect("a valid pod")
}

async fn wait_ready(pods: &Api<Pod>, name: &str) -> Result<()> {
    let end = Instant::now() + LIMIT;
    loop {
        if pods.get(name).await.is_ok_and(|p| common::pod_ready(&p)) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("pod {name} not Ready within {LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll `GET /` on `addr` until it answers with `name`.
async fn wait_answer(addr: SocketAddr, name: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = Instant::now() + LIMIT;
    loop {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut buf)).await;
            if String::from_utf8_lossy(&buf).ends_with(name) {
                return Ok(());
            }
        }
        if Instant::now() > end {
            bail!("{addr} did not answer {name} within {LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// CPU seconds of `pid`'s threads named `fl-node*`.
fn node_threads_cpu(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("fl-node"))
        })
        .filter_map(|e| common::stat_cpu(&e.path().join("stat").to_string_lossy()))
        .sum()
}

async fn run(
    up: &mut Proc,
    data: &Path,
    bin: &Path,
    netns: &str,
    n: usize,
    burst: usize,
) -> Result<()> {
    let c = common::api_client(&data.join("kubeconfig"), up, LIMIT).await?;
    let pods: Api<Pod> = Api::default_namespaced(c.clone());
    let svcs: Api<Service> = Api::default_namespaced(c.clone());
    let pp = PostParams::default();
    // Warm-up: the node has its pod CIDR and bridge.
    pods.create(&pp, &echo_pod("warmup", json!({"bench": "warmup"})))
        .await?;
    wait_ready(&pods, "warmup").await?;

    // 1. One at a time.
    let mut ips = Vec::new();
    for i in 0..n {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("s-{i}")},
            "spec": {"selector": {"id": format!("p-{i}")}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))?;
        let s = svcs.create(&pp, &svc).await?;
        let ip: IpAddr = s
            .spec
            .and_then(|s| s.cluster_ip)
            .context("no clusterIP")?
            .parse()?;
        ips.push(ip);
    }
    let (mut to_ready, mut to_reach) = (Vec::new(), Vec::new());
    for (i, ip) in ips.iter().enumerate() {
        let name = format!("p-{i}");
        let t0 = Instant::now();
        pods.create(&pp, &echo_pod(&name, json!({"id": name, "bench": "seq"})))
            .await?;
        wait_ready(&pods, &name).await?;
        to_ready.push(t0.elapsed().as_secs_f64() * 1e3);
        wait_answer(SocketAddr::new(*ip, 80), &name).await?;
        to_reach.push(t0.elapsed().as_secs_f64() * 1e3);
    }

    // 2. The peer: the same by hand, with a shell script.
    let mut peer = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::new(10, 244, 0, 200 + i as u8);
        let script = format!(
            "set -e\nip netns add pb-{i}\nip link add pbv{i} type veth peer name eth0 netns pb-{i}\n\
             ip link set pbv{i} master flbr0 up\nip -n pb-{i} link set lo up\n\
             ip -n pb-{i} addr add {ip}/32 dev eth0\nip -n pb-{i} link set eth0 up\n\
             ip -n pb-{i} route add 10.244.0.1 dev eth0 scope link\n\
             ip -n pb-{i} route add default via 10.244.0.1\n\
             ip netns exec pb-{i} {bin} echo --http-port 8080 --name pb-{i} >/dev/null 2>&1 &\n\
             until (exec 3<>/dev/tcp/{ip}/8080) 2>/dev/null; do sleep 0.005; done\n",
            bin = bin.display()
        );
        let t0 = Instant::now();
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "bash", "-c", &script])
            .output()?;
        if !out.status.success() {
            bail!("peer script: {}", String::from_utf8_lossy(&out.stderr));
        }
        peer.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    for i in 0..n {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "kill -9 $(ip netns pids pb-{i}) 2>/dev/null; ip netns del pb-{i}"
            ))
            .output();
    }

    // 3. A burst.
    let t0 = Instant::now();
    let creates = (0..burst).map(|i| {
        let pods = pods.clone();
        async move {
            pods.create(
                &PostParams::default(),
                &echo_pod(&format!("b-{i}"), json!({"bench": "burst"})),
            )
            .await
        }
    });
    for r in futures::future::join_all(creates).await {
        r?;
    }
    let created = t0.elapsed();
    let end = Instant::now() + LIMIT * 2;
    loop {
        let list = pods
            .list(&ListParams::default().labels("bench=burst"))
            .await?;
        if list.items.iter().filter(|p| common::pod_ready(p)).count() == burst {
            break;
        }
        if Instant::now() > end {
            bail!("the burst was not Ready within {:?}", LIMIT * 2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burst_took = t0.elapsed();

    // 4. Running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = up.pid();
    let cpu0 = node_threads_cpu(pid);
    let w = Duration::from_secs(10);
    tokio::time::sleep(w).await;
    let cpu = (node_threads_cpu(pid) - cpu0) / w.as_secs_f64();
    let running = pods.list(&ListParams::default()).await?.items.len();

    let (r50, r99) = (
        common::pct(&mut to_ready, 0.5),
        common::pct(&mut to_ready, 0.99),
    );
    let (a50, a99) = (
        common::pct(&mut to_reach, 0.5),
        common::pct(&mut to_reach, 0.99),
    );
    let (p50, p99) = (common::pct(&mut peer, 0.5), common::pct(&mut peer, 0.99));
    println!("pod start, {n} pods one at a time (fairlead up, userspace mode):");
    println!("  create → Ready:                     p50 {r50:7.1} ms   p99 {r99:7.1} ms   (target p99 ≤ 1000 ms)");
    println!("  create → answering via its Service: p50 {a50:7.1} ms   p99 {a99:7.1} ms");
    println!("  peer, by hand (ip netns + veth + exec, until its port accepts):");
    println!("                                      p50 {p50:7.1} ms   p99 {p99:7.1} ms");
    println!(
        "  ratio, create → Ready / by hand:    p50 {:.2}×   p99 {:.2}×",
        r50 / p50,
        r99 / p99
    );
    println!(
        "burst: {burst} pods created at once in {:.2} s, all Ready after {:.2} s → {:.1} pods/s (target ≥ 20)",
        created.as_secs_f64(),
        burst_took.as_secs_f64(),
        burst as f64 / burst_took.as_secs_f64()
    );
    println!(
        "with {running} pods running, idle: fairlead up RSS {:.0} MiB (API server, store, controllers and node), \
         node threads CPU {:.1}% of a core ({:.2} CPU-s since the start)",
        common::mib(common::pid_vm_kib(pid, "VmRSS")),
        cpu * 100.0,
        node_threads_cpu(pid)
    );
    Ok(())
}
