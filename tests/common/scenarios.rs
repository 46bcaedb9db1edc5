//! Acceptance scenarios both proxy modes must pass (issue 3's list, which
//! issue 4 asks again of the nftables mode), as steps on a [`Cluster`]:
//! `tests/node_userspace.rs` and `tests/node_nftables.rs` run them, each
//! with its own addresses and around them what only its mode has to show.
//!
//! The backends are the echo servers of [`Cluster::echo`], the pods those
//! of [`super::cluster::web_yaml`] (label `app: web`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::cluster::{counts, http_service_yaml, ms, pod_yaml, web_yaml, Cluster, SETTLE};
use super::server::poll;

/// The bound "within a bounded time" is held to (for convergence after a
/// change).
pub const CONVERGE: Duration = Duration::from_secs(5);

/// "Refuses within 100 ms."
pub const REFUSE_WITHIN: Duration = Duration::from_millis(100);

/// The `backends` (name, pod IP) as ready pods of Service `web`
/// ([`Cluster::ready_backends`]), once its ClusterIP and its NodePort on
/// `node_ip` are served by all of them (time printed): the `http` port's
/// two addresses.
pub fn web_served_by(
    c: &mut Cluster,
    backends: &[(&str, &str)],
    node_ip: IpAddr,
) -> (SocketAddr, SocketAddr) {
    c.ready_backends(backends);
    let names: Vec<&str> = backends.iter().map(|(n, _)| *n).collect();
    let http = SocketAddr::new(c.cluster_ip("web"), 80);
    let np = SocketAddr::new(node_ip, c.node_port("web", "http"));
    let took = c.wait_serving(http, &names);
    println!("all backends serving the ClusterIP after {}", ms(took));
    c.wait_serving(np, &names);
    (http, np)
}

/// `seq` (the backends that answered `addr`, in order) splits evenly over
/// exactly `names`, in strict rotation (each new connection goes to the
/// next endpoint). Prints the split and `took`.
pub fn assert_rotation(
    what: &str,
    addr: SocketAddr,
    seq: &[String],
    names: &[&str],
    took: Duration,
) {
    let n = seq.len();
    let got = counts(seq);
    let want: BTreeMap<String, usize> = names
        .iter()
        .map(|b| (b.to_string(), n / names.len()))
        .collect();
    assert_eq!(got, want, "{what} {addr}: {seq:?}");
    for (i, name) in seq.iter().enumerate() {
        assert_eq!(
            name,
            &seq[i % names.len()],
            "{what}: not a strict rotation at {i}: {seq:?}"
        );
    }
    println!(
        "{n} new connections via {what} {addr}: {got:?} in {}",
        ms(took)
    );
}

/// `n` requests from the cluster's agent to `addr`: see [`assert_rotation`].
pub fn assert_round_robin(c: &mut Cluster, what: &str, addr: SocketAddr, n: usize, names: &[&str]) {
    let started = Instant::now();
    let seq = c.names_ok(addr, n, None);
    assert_rotation(what, addr, &seq, names, started.elapsed());
}

/// UDP through the Service `dns` (53 → the backends' 9053): once all of
/// `names` answer, each fresh socket (a new flow) gets the next backend,
/// every reply comes from the service address, and the backend's echo
/// answers.
pub fn udp_flows_round_robin(c: &mut Cluster, names: &[&str]) {
    let dns = SocketAddr::new(c.cluster_ip("dns"), 53);
    let all: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let agent = &mut c.agent;
    poll(&format!("UDP service answered by {all:?}"), SETTLE, || {
        let seen: BTreeSet<String> = agent
            .udp(dns, "hostname", names.len())
            .into_iter()
            .map(|r| r.map(|(name, _)| name).unwrap_or_else(|e| e))
            .collect();
        (seen == all).then_some(())
    });
    let flows = names.len() * 2;
    let replies: Vec<String> = c
        .agent
        .udp(dns, "hostname", flows)
        .into_iter()
        .map(|r| {
            let (reply, from) = r.expect("UDP reply");
            assert_eq!(from, dns.to_string(), "reply source");
            reply
        })
        .collect();
    let want: BTreeMap<String, usize> = names.iter().map(|n| (n.to_string(), 2)).collect();
    assert_eq!(counts(&replies), want, "UDP flows {replies:?}");
    let r = c.agent.udp(dns, "ping", 1).remove(0).expect("UDP echo");
    assert!(r.0.ends_with(": ping"), "{r:?}");
    println!("UDP via {dns}: {flows} flows {replies:?}");
}

/// `sessionAffinity: ClientIP` (Service `sticky` over the `app: web` pods,
/// which must be ready): each client IP sticks to one backend; a new client
/// gets the next backend in the rotation; after `timeoutSeconds` idle the
/// client is balanced anew. `a` and `b` are client addresses of the
/// cluster's namespace.
pub fn affinity_sticks_until_timeout(c: &mut Cluster, a: IpAddr, b: IpAddr, timeout_secs: u64) {
    c.apply(&http_service_yaml(
        "sticky",
        "web",
        &format!(
            "  sessionAffinity: ClientIP\n  \
             sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_secs}}}}}\n"
        ),
    ));
    let http = SocketAddr::new(c.cluster_ip("sticky"), 80);
    // The pods are ready already, so the Service's slice is created with
    // all of them: the first answer means all are programmed.
    let agent = &mut c.agent;
    poll("sticky service answering", SETTLE, || {
        agent.names(http, 1, None)[0].is_ok().then_some(())
    });
    let one = |c: &mut Cluster, src: IpAddr, n: usize| {
        let got = counts(&c.names_ok(http, n, Some(src)));
        assert_eq!(got.len(), 1, "client {src} spread over {got:?}");
        got.into_keys().next().unwrap()
    };
    let x = one(c, a, 20);
    let y = one(c, b, 20);
    assert_ne!(x, y, "a new client gets the next backend in the rotation");
    assert_eq!(one(c, a, 5), x, "client A still affine");
    println!("affinity: client {a} → {x}, client {b} → {y}");

    // Idle past timeoutSeconds (the timeout itself is what is tested; a
    // request before it would renew the affinity).
    std::thread::sleep(Duration::from_secs(timeout_secs) + Duration::from_secs(1));
    let z = one(c, a, 5);
    println!("after the {timeout_secs} s timeout: client {a} → {z}");
    assert_ne!(z, x, "affinity expired: client A is balanced anew");
}

/// Service `empty` (TCP 80, UDP 53) selecting no pod: its ClusterIP.
pub fn empty_service(c: &Cluster) -> IpAddr {
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports:
  - {name: tcp, port: 80, targetPort: 8080}
  - {name: udp, port: 53, targetPort: 9053, protocol: UDP}
"#,
    );
    c.cluster_ip("empty")
}

/// Service `solo` served by one pod `b1` (an echo backend on `ip`) that
/// then stops being ready: its `http` address, once it no longer answers
/// (time printed).
pub fn solo_service_that_lost_its_endpoint(c: &mut Cluster, ip: &str) -> SocketAddr {
    c.apply(&(http_service_yaml("solo", "solo", "") + &pod_yaml("b1", "solo")));
    c.echo("b1", ip);
    c.set_pod("b1", ip, true);
    let solo = SocketAddr::new(c.cluster_ip("solo"), 80);
    c.wait_serving(solo, &["b1"]);
    let t = Instant::now();
    c.set_pod("b1", ip, false);
    let agent = &mut c.agent;
    poll("solo service refusing", SETTLE, || {
        (agent.probe(solo, false).0 != "answered").then_some(())
    });
    println!(
        "last endpoint gone: not answering after {}",
        ms(t.elapsed())
    );
    solo
}

/// Five `probe`s of `addr`, each with an outcome in `want` within
/// [`REFUSE_WITHIN`] (outcomes as [`super::netns::Agent::probe`] says).
pub fn assert_refused(
    what: &str,
    addr: SocketAddr,
    want: &[&str],
    mut probe: impl FnMut() -> (String, Duration),
) {
    let mut worst = Duration::ZERO;
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let (outcome, took) = probe();
        assert!(
            want.contains(&outcome.as_str()),
            "{what} {addr}: {outcome} after {took:?} (want one of {want:?})"
        );
        assert!(
            took < REFUSE_WITHIN,
            "{what} {addr}: {outcome} took {took:?}"
        );
        worst = worst.max(took);
        seen.insert(outcome);
    }
    println!("{what} {addr}: {seen:?}, slowest of 5 in {}", ms(worst));
}

/// Drain: Service `web` with pods `b1` (ready) and `b2` (not ready), echo
/// backends on the two addresses of `backends`; the agent's TCP connection
/// `long` through the ClusterIP's port 9000 (so to b1) echoes. Then b1
/// leaves the Service and b2 joins: new traffic moves to b2 (time printed)
/// while `long` keeps working. Returns the Service's `http` and `tcp`
/// addresses.
pub fn connection_survives_its_endpoint_leaving(
    c: &mut Cluster,
    backends: [(&str, &str); 2],
) -> (SocketAddr, SocketAddr) {
    let [(b1, ip1), (b2, ip2)] = backends;
    c.apply(&web_yaml(&[b1, b2]));
    for (name, ip) in backends {
        c.echo(name, ip);
    }
    c.set_pod(b1, ip1, true);
    c.set_pod(b2, ip2, false);
    let vip = c.cluster_ip("web");
    let http = SocketAddr::new(vip, 80);
    let tcp = SocketAddr::new(vip, 9000);
    c.wait_serving(http, &[b1]);
    // b1 is the only endpoint, so this connection is b1's.
    let agent = &mut c.agent;
    poll("TCP service port open", SETTLE, || {
        agent.open("long", tcp).ok()
    });
    c.agent.echo_ok("long", "hello-1", "a fresh connection");

    let t = Instant::now();
    c.set_pod(b1, ip1, false);
    c.set_pod(b2, ip2, true);
    let moved = c.wait_serving(http, &[b2]);
    println!(
        "traffic moved to {b2} after {} ({} since kubectl started)",
        ms(moved),
        ms(t.elapsed())
    );
    assert_eq!(c.slice_endpoints("web").get(ip1), Some(&false));
    c.agent.echo_ok(
        "long",
        "hello-2",
        "the connection to the removed endpoint was cut",
    );
    (http, tcp)
}
