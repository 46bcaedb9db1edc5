//! The data plane without its API server, in both proxy modes: with
//! `fairlead apiserver` killed for 60 s, a node daemon keeps serving what
//! it last knew.
//!
//! For the whole minute, every two seconds: the TCP connection opened
//! before the kill still echoes, new connections through the ClusterIP
//! reach the backends, and the cluster DNS still answers the Service's
//! name with its ClusterIP. Then the server comes back (same data
//! directory and port), the node resumes its watches, and a change made
//! then reaches the data plane.
//!
//! Everything runs in a network namespace the test creates
//! (tests/common/cluster.rs); ClusterIPs and pod IPs are addressed only
//! there.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{ms, Cluster};
use common::netns::have_nft;

/// Not a test: the network client the tests start in their namespace.
#[test]
fn agent() {
    common::netns::agent_main();
}

/// How long the API server stays down (the minute).
const DOWN: Duration = Duration::from_secs(60);

/// Backends (name, pod IP on `lo` in the namespace).
const BACKENDS: [(&str, &str); 2] = [("b1", "10.244.0.11"), ("b2", "10.244.0.12")];

/// `dig +short @10.96.0.10 <name>` in the namespace: the answer lines,
/// or why there are none.
fn dig(c: &Cluster, name: &str) -> Result<String, String> {
    let out =
        c.ns.command("dig")
            .args(["@10.96.0.10", name, "A", "+short", "+time=1", "+tries=2"])
            .output()
            .map_err(|e| format!("run dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.is_empty() {
        Ok(text)
    } else {
        Err(format!("dig: {out:?}"))
    }
}

fn survives_a_minute_without_the_api_server(mode: &str) {
    let mut c = Cluster::empty(&format!("down-{mode}"));
    // Pod addresses, the node's, and a route for the Service range (the
    // nftables mode DNATs what is routed to it; the userspace mode makes
    // its ClusterIPs local).
    for cmd in [
        "addr add 10.244.0.11/32 dev lo",
        "addr add 10.244.0.12/32 dev lo",
        "addr add 10.0.0.1/32 dev lo",
        "route add 10.96.0.0/12 dev lo src 10.0.0.1",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        c.ns.run_ok("ip", &args);
    }
    c.start_apiserver();
    c.start_controllers("controllers", &[]);
    c.start_node(&[
        "--proxy-mode",
        mode,
        "--min-sync-period",
        "50ms",
        "--dns-upstream",
        "127.0.0.1:9",
    ]);
    c.ready_backends(&BACKENDS);
    let vip = c.cluster_ip("web");
    let http = SocketAddr::new(vip, 80);
    let tcp = SocketAddr::new(vip, 9000);
    c.wait_serving(http, &["b1", "b2"]);
    let name = "web.default.svc.cluster.local";
    assert_eq!(dig(&c, name).as_deref(), Ok(vip.to_string().as_str()));
    c.agent
        .open("long", tcp)
        .expect("connection before the kill");
    c.agent.echo_ok("long", "before", "echo before the kill");

    c.proc("apiserver").kill9();
    assert!(
        !c.kubectl(&["get", "--raw", "/readyz"]).status.success(),
        "the API server still answers after kill -9"
    );
    let down = Instant::now();
    let mut rounds = 0;
    let mut seen = std::collections::BTreeSet::new();
    while down.elapsed() < DOWN {
        let t = down.elapsed().as_secs();
        c.agent.echo_ok(
            "long",
            &format!("at-{t}"),
            "established connection while down",
        );
        for n in c.names_ok(http, 2, None) {
            seen.insert(n);
        }
        let id = format!("fresh-{rounds}");
        c.agent
            .open(&id, tcp)
            .unwrap_or_else(|e| panic!("new connection {t} s into the outage: {e}"));
        c.agent.echo_ok(&id, "x", "new connection while down");
        c.agent.close(&id);
        assert_eq!(
            dig(&c, name).as_deref(),
            Ok(vip.to_string().as_str()),
            "DNS {t} s into the outage"
        );
        rounds += 1;
        // Pacing of the observation, not synchronisation: the outage
        // lasts a fixed minute whatever the checks cost.
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(rounds >= 10, "only {rounds} rounds of checks in {DOWN:?}");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["b1", "b2"],
        "new connections reached both backends"
    );
    for key in ["controllers", "node"] {
        assert!(c.proc(key).alive(), "{key} died:\n{}", c.log_tail(key));
    }

    // Back: the node resumes its watches and follows changes again.
    let back = Instant::now();
    c.start_apiserver();
    println!("{mode}: API server back after {}", ms(back.elapsed()));
    c.agent
        .echo_ok("long", "after", "established connection after");
    let t = Instant::now();
    c.set_pod("b1", "10.244.0.11", false);
    c.wait_serving(http, &["b2"]);
    println!(
        "{mode}: after the outage, a readiness change was programmed in {}",
        ms(t.elapsed())
    );
    c.agent.close("long");
}

#[test]
fn userspace_serves_a_minute_without_the_api_server() {
    survives_a_minute_without_the_api_server("userspace");
}

#[test]
fn nftables_serves_a_minute_without_the_api_server() {
    if !have_nft("nftables_serves_a_minute_without_the_api_server") {
        return;
    }
    survives_a_minute_without_the_api_server("nftables");
}
