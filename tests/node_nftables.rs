//! Node-level acceptance of issue 4 (`--proxy-mode nftables`): the
//! userspace mode's scenarios again (exact round robin through a ClusterIP
//! and a NodePort, UDP, scale down/up, ClientIP affinity, refusal without
//! endpoints, drain of an established connection), a restart of the node
//! daemon that keeps connections and the table, the kube-proxy metrics, and
//! `fairlead node --cleanup`.
//!
//! Every test gets its own cluster in its own network namespace
//! (`tests/common/cluster.rs`): `fairlead up` (or the API server,
//! controllers and node daemon as separate processes), the echo backends,
//! kubectl and the network client (this binary re-executed as an agent)
//! all run inside it, and so does `nft`: the daemon programs the
//! namespace's own kernel table. The kernel DNATs locally generated
//! traffic, so the backends listen on pod IPs (10.244.0.11/12/13 on `lo`;
//! DNAT to 127.x would need route_localnet) and the Service range is routed
//! via `lo` from the node address 10.0.0.1, on which NodePorts are served.
//!
//! Timings are printed (`cargo test --test node_nftables -- --nocapture`).
//! Needs root, `ip`, `kubectl`, `nft` (the tests skip, saying so, when `nft`
//! is missing) and Python's `prometheus_client` (installed into
//! `target/pyvenv` when missing).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::cluster::{
    counts, family, histogram_count, ms, parse_prometheus, pod_yaml, Cluster, Families, SETTLE,
};
use common::netns::{have_nft, Agent, Netns};
use common::scenarios::{
    affinity_sticks_until_timeout, assert_refused, assert_rotation, assert_round_robin,
    connection_survives_its_endpoint_leaving, empty_service, solo_service_that_lost_its_endpoint,
    udp_flows_round_robin, web_served_by, CONVERGE,
};
use common::server::poll;

/// The node daemon's flags in every test here.
const NFTABLES: [&str; 4] = ["--proxy-mode", "nftables", "--min-sync-period", "50ms"];

/// The table the daemon owns (its default name).
const TABLE: &str = "fairlead";

/// The backends: name and pod IP (on `lo` inside the namespace).
const BACKENDS: [(&str, &str); 3] = [
    ("b1", "10.244.0.11"),
    ("b2", "10.244.0.12"),
    ("b3", "10.244.0.13"),
];

/// A fourth backend, for scaling up.
const B4: (&str, &str) = ("b4", "10.244.0.14");

/// The node's own address (NodePorts are served on it; Service traffic
/// from this node leaves from it).
const NODE_IP: &str = "10.0.0.1";

/// Two more client addresses, for ClientIP affinity.
const CLIENT_A: &str = "10.0.0.21";
const CLIENT_B: &str = "10.0.0.22";

/// A client pod's address (in a namespace of its own, see [`PodClient`]),
/// and the node's address on its link (Calico style: the same on every
/// pod link).
const POD_CLIENT: &str = "10.244.1.2";
const POD_GATEWAY: &str = "169.254.1.1";

/// The Service range `fairlead up` allocates from (its default).
const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Not a test: the network client the other tests start inside their
/// namespace (`common::netns::Agent`). Returns at once in a normal run.
#[test]
fn agent() {
    common::netns::agent_main();
}

// ---- helpers ------------------------------------------------------------------

/// A namespace with the addresses and the Service route, and the agent in
/// it; nothing of fairlead running yet. `None` (the test is skipped, as
/// printed) when `nft` is missing.
fn network(test: &str) -> Option<Cluster> {
    if !have_nft(test) {
        return None;
    }
    let c = Cluster::empty(test);
    let pods = BACKENDS.iter().chain([&B4]).map(|(_, ip)| *ip);
    let mut cmds: Vec<String> = pods
        .chain([NODE_IP, CLIENT_A, CLIENT_B])
        .map(|a| format!("addr add {a}/32 dev lo"))
        .collect();
    cmds.push(format!("route add {SERVICE_CIDR} dev lo src {NODE_IP}"));
    ip_all(&c.ns, &cmds);
    Some(c)
}

/// [`network`] with `fairlead up` in nftables mode running, healthy.
fn nft_up(test: &str) -> Option<Cluster> {
    let mut c = network(test)?;
    c.start_up(&NFTABLES);
    Some(c)
}

/// A client pod: a namespace of its own linked to the node's by a veth
/// pair, with an agent in it. Its Service traffic enters the node through
/// prerouting and (without endpoints) the forward path, as a pod's does;
/// the node's own traffic takes the output path. Field order is drop
/// order: the agent, then the namespace (which takes the veth pair).
struct PodClient {
    agent: Agent,
    _ns: Netns,
}

impl PodClient {
    fn start(c: &Cluster) -> PodClient {
        let ns = c.ns.pod(POD_CLIENT, POD_GATEWAY);
        let agent = Agent::start(&ns, "agent");
        PodClient { agent, _ns: ns }
    }
}

/// `ip <cmd>` in `ns` for each of `cmds`, in order.
fn ip_all(ns: &Netns, cmds: &[String]) {
    for cmd in cmds {
        ns.run_ok("ip", &cmd.split_whitespace().collect::<Vec<_>>());
    }
}

/// `nft -a list table ip fairlead`: the table with every object's handle.
fn table(c: &Cluster) -> String {
    c.ns.run_ok("nft", &["-a", "list", "table", "ip", TABLE])
}

/// Wait until the table has an element for the frontend `addr`/`proto`
/// (in the service map or the no-endpoints map).
fn wait_programmed(c: &Cluster, addr: SocketAddr, proto: &str) {
    let want = format!("{} . {proto} . {}", addr.ip(), addr.port());
    poll(&format!("{want} in the table"), SETTLE, || {
        table(c).contains(&want).then_some(())
    });
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The lines of `a` and `b` that the other lacks (for a failure message).
fn line_diff(a: &str, b: &str) -> String {
    let la: BTreeSet<&str> = a.lines().collect();
    let lb: BTreeSet<&str> = b.lines().collect();
    let mut out = String::new();
    for l in la.difference(&lb).take(10) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in lb.difference(&la).take(10) {
        out.push_str(&format!("+ {l}\n"));
    }
    out
}

// ---- acceptance 1 (round robin, NodePort, UDP), 5 (metrics), 4 (cleanup) ---------

/// 300 new connections to the ClusterIP split exactly 100/100/100 in
/// strict rotation, and the same through the NodePort on the node address;
/// a UDP Service answers from the backends (one flow per socket, round
/// robin, replies from the service address). Then the node's metrics: sync
/// durations (all, full, partial), network programming latency, sync
/// failures (0) and the table's size; an endpoint change is one partial
/// sync. Finally the daemon stops (the table stays) and `fairlead node
/// --cleanup` removes fairlead's table and nothing else.
#[test]
fn round_robin_node_port_udp_metrics_then_cleanup() {
    let Some(mut c) = nft_up("nft-rr") else {
        return;
    };
    let (http, np) = web_served_by(&mut c, &BACKENDS, ip(NODE_IP));
    let vip = http.ip();
    // The kernel does it: the ClusterIP is not even a local address (the
    // userspace mode would have put it on `lo` and listened on it).
    assert!(
        !c.ns.addresses().contains(&format!("inet {vip}/")),
        "the ClusterIP is a local address:\n{}",
        c.ns.addresses()
    );

    for (what, addr) in [("ClusterIP", http), ("NodePort", np)] {
        assert_round_robin(&mut c, what, addr, 300, &["b1", "b2", "b3"]);
    }
    // The same from a pod (prerouting instead of output).
    let mut pod = PodClient::start(&c);
    for (what, addr) in [("ClusterIP from a pod", http), ("NodePort from a pod", np)] {
        let started = Instant::now();
        let seq = pod.agent.names_ok(addr, 30, None);
        assert_rotation(what, addr, &seq, &["b1", "b2", "b3"], started.elapsed());
    }

    // Hairpin: a backend reaching its own Service from its pod IP (the
    // connection back to itself is masqueraded, so it works).
    let hairpin = counts(&c.names_ok(http, 6, Some(ip(BACKENDS[0].1))));
    assert_eq!(hairpin.len(), 3, "hairpin: {hairpin:?}");

    // UDP: each fresh socket is a new flow; flows are balanced round robin,
    // answered by the backends, and every reply comes from the service
    // address (conntrack undoes the DNAT).
    udp_flows_round_robin(&mut c, &["b1", "b2", "b3"]);

    // Acceptance 5: the metrics, parsed by the reference parser.
    const SYNC: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
    const PARTIAL: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds";
    const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
    // Each histogram's count of observations.
    let histograms = |fams: &Families| -> BTreeMap<&'static str, f64> {
        [SYNC, FULL, PARTIAL, PROGRAMMING]
            .into_iter()
            .map(|h| (h, histogram_count(&family(fams, h, "histogram"), h)))
            .collect()
    };
    let fams = parse_prometheus(&c.metrics_text());
    let before = histograms(&fams);
    for (h, n) in &before {
        assert!(*n >= 1.0, "{h}: count {n}, want > 0");
    }
    let failures = family(
        &fams,
        "kubeproxy_sync_proxy_rules_nftables_sync_failures",
        "counter",
    );
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].2, 0.0, "sync failures: {failures:?}");
    let mut sizes = Vec::new();
    for gauge in [
        "fairlead_nftables_chains",
        "fairlead_nftables_rules",
        "fairlead_nftables_map_elements",
    ] {
        let s = family(&fams, gauge, "gauge");
        assert!(s[0].2 > 0.0, "{gauge}: {s:?}");
        sizes.push(format!("{gauge} {}", s[0].2));
    }
    println!("metrics: {before:?}; {}", sizes.join(", "));

    // One endpoint change: programmed by one partial sync, no full one,
    // and its programming latency is observed.
    let t = Instant::now();
    c.set_pod("b3", BACKENDS[2].1, false);
    c.wait_serving(http, &["b1", "b2"]);
    println!("endpoint change programmed after {}", ms(t.elapsed()));
    let after = poll("the change's metrics", SETTLE, || {
        let h = histograms(&parse_prometheus(&c.metrics_text()));
        (h[PROGRAMMING] > before[PROGRAMMING]).then_some(h)
    });
    assert!(after[PARTIAL] > before[PARTIAL], "{before:?} → {after:?}");
    assert!(after[SYNC] > before[SYNC], "{before:?} → {after:?}");
    assert_eq!(
        after[FULL], before[FULL],
        "an endpoint change recreated the table: {before:?} → {after:?}"
    );

    // Acceptance 4: the daemon stops; its table stays (connections keep
    // flowing until an operator cleans up) ...
    assert!(
        c.proc("up").stop(libc::SIGTERM, Duration::from_secs(10)),
        "fairlead up did not exit on SIGTERM"
    );
    assert!(table(&c).contains(&format!("table ip {TABLE}")));
    // ... and `--cleanup` removes it, and only it.
    c.ns.run_ok("nft", &["add", "table", "ip", "bystander"]);
    c.ns.run_ok(
        "nft",
        &["add chain ip bystander out { type filter hook output priority 0 ; }"],
    );
    for round in ["first", "second (nothing left to remove)"] {
        let out = c.run(&["node", "--cleanup"]);
        assert!(
            out.status.success(),
            "{round} fairlead node --cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tables = c.ns.run_ok("nft", &["list", "tables"]);
        assert!(
            !tables
                .lines()
                .any(|l| l.trim() == format!("table ip {TABLE}")),
            "after the {round} cleanup: {tables}"
        );
        assert!(tables.contains("table ip bystander"), "{tables}");
    }
    let rest = c.ns.run_ok("nft", &["list", "ruleset"]);
    assert!(!rest.contains(TABLE), "fairlead left a trace:\n{rest}");
    assert!(rest.contains("chain out"), "{rest}");
    println!("cleanup: no fairlead table left; other tables untouched");
}

// ---- acceptance 1: scale down and up -----------------------------------------------

/// An endpoint that stops being ready, or whose pod is deleted, stops
/// getting new connections; a new pod, or one ready again, gets its share.
/// Each change converges within [`CONVERGE`] (measured from before kubectl
/// is run), with no failed request.
#[test]
fn scale_down_and_up_converges() {
    let Some(mut c) = nft_up("nft-scale") else {
        return;
    };
    c.ready_backends(&BACKENDS);
    let http = SocketAddr::new(c.cluster_ip("web"), 80);
    c.wait_serving(http, &["b1", "b2", "b3"]);
    let mut report = Vec::new();

    // Down: b3 not ready.
    let t = Instant::now();
    c.set_pod("b3", BACKENDS[2].1, false);
    c.wait_serving(http, &["b1", "b2"]);
    report.push(("b3 not ready, stops getting connections", t.elapsed()));
    assert_round_robin(&mut c, "ClusterIP (b3 out)", http, 30, &["b1", "b2"]);

    // Up: a new pod b4.
    let t = Instant::now();
    c.apply(&pod_yaml(B4.0, "web"));
    c.echo(B4.0, B4.1);
    c.set_pod(B4.0, B4.1, true);
    c.wait_serving(http, &["b1", "b2", "b4"]);
    report.push((
        "new pod b4 (incl. starting it) gets connections",
        t.elapsed(),
    ));
    assert_round_robin(&mut c, "ClusterIP (b4 in)", http, 30, &["b1", "b2", "b4"]);

    // b3 ready again: four endpoints.
    let t = Instant::now();
    c.set_pod("b3", BACKENDS[2].1, true);
    c.wait_serving(http, &["b1", "b2", "b3", "b4"]);
    report.push(("b3 ready again gets connections", t.elapsed()));
    assert_round_robin(&mut c, "ClusterIP (4)", http, 40, &["b1", "b2", "b3", "b4"]);

    // Down by deletion: pod b4 deleted.
    let t = Instant::now();
    // (No kubelet runs these hand-made pods to finish a graceful
    // deletion: delete at once.)
    c.kubectl_ok(&["delete", "pod", B4.0, "--grace-period=0", "--force"]);
    c.wait_serving(http, &["b1", "b2", "b3"]);
    report.push(("pod b4 deleted, stops getting connections", t.elapsed()));
    assert_round_robin(&mut c, "ClusterIP (b4 out)", http, 30, &["b1", "b2", "b3"]);

    for (what, took) in &report {
        println!("scale: {what} after {}", ms(*took));
    }
    for (what, took) in report {
        // Starting b4's process is part of its step, not the proxy's time,
        // but even so it fits.
        assert!(took < CONVERGE, "{what}: {took:?}");
    }
}

// ---- acceptance 1: ClientIP affinity ---------------------------------------------------

/// `sessionAffinity: ClientIP`: each client IP sticks to one backend; a new
/// client gets the next backend in the rotation; after `timeoutSeconds`
/// idle the client is balanced anew.
#[test]
fn client_ip_affinity_sticks_until_timeout() {
    let Some(mut c) = nft_up("nft-affinity") else {
        return;
    };
    c.ready_backends(&BACKENDS);
    affinity_sticks_until_timeout(&mut c, ip(CLIENT_A), ip(CLIENT_B), 2);
}

// ---- acceptance 1: no endpoints --------------------------------------------------------

/// A Service without endpoints refuses within 100 ms (TCP reset or
/// refusal, ICMP port unreachable for UDP), no hang: one that never had
/// endpoints and one whose only endpoint went away.
#[test]
fn service_without_endpoints_refuses_fast() {
    let Some(mut c) = nft_up("nft-refuse") else {
        return;
    };
    let vip = empty_service(&c);
    // Before the Service is programmed its traffic is routed nowhere (a
    // timeout): a refusal proves the reject rules.
    wait_programmed(&c, SocketAddr::new(vip, 80), "tcp");
    wait_programmed(&c, SocketAddr::new(vip, 53), "udp");
    let mut pod = PodClient::start(&c);
    let (tcp, udp) = (SocketAddr::new(vip, 80), SocketAddr::new(vip, 53));
    // From the node, TCP is reset. A UDP datagram the output hook rejects
    // fails its send() with EPERM (as a dropped one would: the ICMP error
    // only reaches clients whose packets come in from outside) ...
    assert_refused("no endpoints, TCP from the node", tcp, TCP_REFUSED, || {
        c.agent.probe(tcp, false)
    });
    assert_refused(
        "no endpoints, UDP from the node",
        udp,
        &["refused", "denied"],
        || c.agent.probe(udp, true),
    );
    // ... so a pod shows that it is rejected, not black-holed: ICMP port
    // unreachable (ECONNREFUSED on its connected socket), not a timeout.
    assert_refused("no endpoints, TCP from a pod", tcp, TCP_REFUSED, || {
        pod.agent.probe(tcp, false)
    });
    assert_refused("no endpoints, UDP from a pod", udp, &["refused"], || {
        pod.agent.probe(udp, true)
    });

    // A Service that had one endpoint and lost it.
    let solo = solo_service_that_lost_its_endpoint(&mut c, BACKENDS[0].1);
    assert_refused(
        "endpoint gone, TCP from the node",
        solo,
        TCP_REFUSED,
        || c.agent.probe(solo, false),
    );
    assert_refused("endpoint gone, TCP from a pod", solo, TCP_REFUSED, || {
        pod.agent.probe(solo, false)
    });
}

/// How a TCP client learns that nobody serves a port.
const TCP_REFUSED: &[&str] = &["refused", "reset"];

// ---- acceptance 1: drain ----------------------------------------------------------------

/// A TCP connection through the ClusterIP survives the removal of its
/// endpoint from the Service, even the deletion of its pod (conntrack keeps
/// it: only new connections move).
#[test]
fn established_connection_survives_endpoint_removal() {
    let Some(mut c) = nft_up("nft-drain") else {
        return;
    };
    let (http, tcp) = connection_survives_its_endpoint_leaving(&mut c, [BACKENDS[0], BACKENDS[1]]);
    c.agent.open("fresh", tcp).expect("a new connection");
    c.agent.echo_ok("fresh", "x", "a new connection");
    c.agent.close("fresh");

    // Its pod deleted altogether.
    c.kubectl_ok(&["delete", "pod", "b1", "--grace-period=0", "--force"]);
    let cluster = &c;
    poll("b1 gone from the slices", SETTLE, || {
        (!cluster.slice_endpoints("web").contains_key(BACKENDS[0].1)).then_some(())
    });
    c.agent.echo_ok(
        "long",
        "hello-3",
        "the connection to the deleted pod was cut",
    );
    assert_eq!(c.names_ok(http, 4, None), ["b2", "b2", "b2", "b2"]);
}

// ---- acceptance 2: restart ----------------------------------------------------------------

/// The node daemon (a process of its own here) is stopped with SIGTERM and
/// started again, then killed with SIGKILL and started again: while it is
/// down, established and new connections keep working (the kernel has the
/// rules); after each restart the table is the very same one — every
/// handle in `nft -a list table` unchanged, so nothing was flushed and
/// rebuilt — and the restarted daemon still programs changes.
#[test]
fn restart_keeps_connections_and_does_not_rebuild_the_table() {
    let Some(mut c) = network("nft-restart") else {
        return;
    };
    c.start_apiserver();
    c.start_controllers("controllers", &[]);
    c.start_node(&NFTABLES);
    c.ready_backends(&BACKENDS);
    let vip = c.cluster_ip("web");
    let http = SocketAddr::new(vip, 80);
    let tcp = SocketAddr::new(vip, 9000);
    c.wait_serving(http, &["b1", "b2", "b3"]);
    let agent = &mut c.agent;
    poll("TCP service port open", SETTLE, || {
        agent.open("long", tcp).ok()
    });
    c.agent.echo_ok("long", "before", "a fresh connection");

    // (how the daemon was stopped, what differed in the table)
    let mut rebuilt: Vec<(&str, String)> = Vec::new();
    for (how, signal) in [("SIGTERM", libc::SIGTERM), ("SIGKILL", libc::SIGKILL)] {
        let before = table(&c);
        let exited = c.proc("node").stop(signal, Duration::from_secs(10));
        assert!(exited, "the node daemon did not exit on {how}");
        // Down: the kernel keeps serving.
        c.agent.echo_ok(
            "long",
            &format!("down-{how}"),
            &format!("the established connection broke with the daemon down ({how})"),
        );
        assert_round_robin(
            &mut c,
            &format!("ClusterIP, daemon down ({how})"),
            http,
            30,
            &["b1", "b2", "b3"],
        );

        let t = Instant::now();
        c.start_node(&NFTABLES);
        println!(
            "node daemon restarted after {how}: healthy (synced) after {}",
            ms(t.elapsed())
        );
        c.agent.echo_ok(
            "long",
            &format!("after-{how}"),
            &format!("the established connection broke over the restart ({how})"),
        );
        assert_round_robin(
            &mut c,
            &format!("ClusterIP, after the restart ({how})"),
            http,
            30,
            &["b1", "b2", "b3"],
        );
        let after = table(&c);
        if after != before {
            rebuilt.push((how, line_diff(&before, &after)));
        }
    }

    // The restarted daemon programs changes.
    let t = Instant::now();
    c.set_pod("b3", BACKENDS[2].1, false);
    c.wait_serving(http, &["b1", "b2"]);
    println!(
        "after the restarts, an endpoint change was programmed in {}",
        ms(t.elapsed())
    );
    c.agent
        .echo_ok("long", "still", "the established connection broke");
    for key in ["apiserver", "controllers", "node"] {
        assert!(c.proc(key).alive(), "{key} died:\n{}", c.log_tail(key));
    }

    assert!(
        rebuilt.is_empty(),
        "restarting the daemon with nothing changed rebuilt the table \
         (handles in `nft -a list table ip {TABLE}` changed):\n{}",
        rebuilt
            .iter()
            .map(|(how, diff)| format!("after {how}:\n{diff}"))
            .collect::<String>()
    );
}

// ---- endpoint churn under load -----------------------------------------------------------

/// New connections keep being answered while the Service's endpoints come
/// and go (N grows and shrinks, a new map and rule each time): every
/// endpoint ever in the rules is alive, so not one request may fail.
#[test]
fn endpoint_churn_under_load_fails_no_request() {
    let Some(mut c) = nft_up("nft-churn") else {
        return;
    };
    c.ready_backends(&BACKENDS);
    c.apply(&pod_yaml(B4.0, "web"));
    c.echo(B4.0, B4.1);
    let http = SocketAddr::new(c.cluster_ip("web"), 80);
    c.wait_serving(http, &["b1", "b2", "b3"]);
    c.agent
        .load_start("churn", http, "/", Duration::from_secs(120));
    for _ in 0..8 {
        c.set_pod(B4.0, B4.1, true);
        c.wait_serving(http, &["b1", "b2", "b3", "b4"]);
        c.set_pod("b3", BACKENDS[2].1, false);
        c.wait_serving(http, &["b1", "b2", "b4"]);
        c.set_pod("b3", BACKENDS[2].1, true);
        c.set_pod(B4.0, B4.1, false);
        c.wait_serving(http, &["b1", "b2", "b3"]);
    }
    let (ok, failed, errors) = c.agent.load_stop("churn");
    println!("churn: {ok} requests answered, {failed} failed");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(
        failed, 0,
        "requests failed during endpoint churn: {errors:?}"
    );
}
