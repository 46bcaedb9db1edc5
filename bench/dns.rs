//! Cluster DNS, measured against dnsmasq (what kube-dns ran) and unbound,
//! and fairlead's memory at 1,000, 10,000 and 30,000 Services against
//! CoreDNS's published sizing formula.
//!
//! ```sh
//! cargo bench --bench dns
//! ```
//!
//! Installs Debian's `dnsperf`, `dnsmasq-base` (the `dnsmasq` binary
//! without the package that starts a system-wide daemon on port 53) and
//! `unbound` with `apt-get install -y` if they are missing, printing apt's
//! output (`FAIRLEAD_BENCH_DNS_UNBOUND=0` leaves unbound out). When dnsperf
//! cannot be had (or `FAIRLEAD_BENCH_DNS_LOADGEN=builtin`), a small
//! built-in UDP load generator with the same knobs is used instead, and the
//! output says so. Everything runs on 127.0.0.0/8.
//!
//! **The zone.** 1,000 ClusterIP Services (`svc-NNNNN.ns-K`, a named port,
//! 3 endpoints each) and 100 headless Services (`hl-NNNNN.ns-K`, 5 ready
//! endpoints each) in 10 namespaces, built from JSON like the API server's
//! objects and served by:
//!
//! * **fairlead**: [`DnsServer`] *in this process*, started from its own
//!   multi-thread tokio runtime with 2 workers (what the `fairlead` binary
//!   gets on a 2-core machine; TCP is served there), 2 UDP receive loops
//!   each on a thread of its own (`fl-dns-N`), the process-wide Prometheus
//!   recorder installed (so the per-request CoreDNS metrics cost what they
//!   cost in `fairlead node`), on 127.0.0.53:PORT, TTL 5 s, forwarding
//!   other names to the upstream below.
//! * **dnsmasq**: `--no-daemon --conf-file=/dev/null --no-resolv --no-hosts
//!   --addn-hosts=<file> --local=/cluster.local/ --listen-address=127.0.0.54
//!   --bind-interfaces --port=PORT --cache-size=10000 --local-ttl=5
//!   --server=<upstream>`: the same names from a hosts file (every
//!   ClusterIP; every ready endpoint of a headless Service under the
//!   Service's name), NXDOMAIN for any other name under `cluster.local`
//!   (like an authoritative server), single threaded as always.
//! * **unbound**: authoritative for the zone from `local-data` (a `static`
//!   local zone: NXDOMAIN for other names in it), 2 threads with a
//!   `SO_REUSEPORT` socket each, on 127.0.0.55:PORT, no recursion or
//!   validation.
//!
//! dnsmasq cannot serve SRV (or anything but A/AAAA/PTR) from a hosts file,
//! so the comparable query mix is A queries only, in the spirit of
//! Kubernetes perf-tests' DNS tests: 35% ClusterIP Service names (1
//! answer), 15% headless Service names (5 answers), 50% search-path
//! expansions that end NXDOMAIN (what a pod with `ndots:5` sends first, e.g.
//! `svc-00001.ns-1.svc.cluster.local.ns-3.svc.cluster.local` or
//! `www.example.com.ns-3.svc.cluster.local`). The query file is shuffled
//! deterministically. Before any load, every distinct query is asked of
//! every server once and the rcodes and A record sets must be identical.
//! (fairlead's negative answers carry the zone's SOA, the others' do not,
//! so its NXDOMAIN replies are ~60 bytes larger.)
//!
//! **Runs** (the servers alternate, so a neighbour's load hurts all alike):
//!
//! 1. Throughput: `dnsperf -c 20 -T 2 -q 200 -t 1 -l 10` with no rate limit,
//!    `ROUNDS` times each → best queries/s, its average latency, and the CPU
//!    the server used per query (fairlead: the threads of its runtime;
//!    the others: their process). dnsperf and the server share the 2 cores,
//!    so the max rate is as much about CPU per query as about the server.
//! 2. Latency: the same at each fixed rate (`-Q 5000`, `-Q 20000`) with
//!    `-v` (one line per query with its latency) → p50/p99 and average
//!    (dnsperf 2.10 prints no percentiles itself), and CPU per query;
//!    `FIXED_ROUNDS` times each, alternating, and the table shows each
//!    server's round with the median p99 (one round's tail on a shared
//!    machine moves by tens of percent).
//! 3. Forwarded names from the cache: 1,000 `ext-NNNN.example.org` names
//!    that a third server (dnsmasq on 127.0.0.56, TTL 3600, every query it
//!    gets logged) answers; fairlead and dnsmasq both forward to it. Each
//!    name is asked once first (a miss), then `ROUNDS` max-rate runs of a
//!    uniform mix of them → cache-hit queries/s and CPU per query. The
//!    queries that still reached the upstream during each run are counted
//!    from its log (fairlead caps a forwarded answer's TTL at 30 s as
//!    CoreDNS's `cache 30` does, and refreshes popular names before they
//!    expire; dnsmasq keeps the upstream's TTL).
//! 4. Memory: a child process (this binary again) per size starts a fresh
//!    [`DnsServer`], builds N Services (one in ten headless) and an
//!    EndpointSlice of 3 ready endpoints each, and takes the node daemon's
//!    path: every object into the node's lean cache
//!    ([`fairlead::model::Cache`], shared with the proxy) and dropped, the
//!    DNS index built from the cache's dirty keys ([`DnsServer::apply`]),
//!    then 4 rounds of 1,000 changed slices applied the same way. It
//!    reports VmRSS at each step, VmHWM (the peak), and VmRSS after
//!    `malloc_trim(0)`. The objects arrive one at a time, as watch events
//!    do: each is decoded, viewed into the cache and dropped. Compared with CoreDNS's
//!    published sizing, (Pods + Services) / 1000 + 54 MB (read as 10^6
//!    bytes), which like fairlead's figure includes the process's own
//!    cache of the API objects.
//!
//! The load average and how much CPU other processes took during each run
//! are printed; a note says when the machine was busy. This process's
//! VmRSS after each run and before/after all the load is printed too (with
//! dnsperf, the growth is the in-process server's).
//!
//! Sizes come from the environment: `FAIRLEAD_BENCH_DURATION` (seconds per
//! run, 10), `FAIRLEAD_BENCH_ROUNDS` (max-rate rounds per server, 2),
//! `FAIRLEAD_BENCH_FIXED_ROUNDS` (rounds per fixed rate and server, 3),
//! `FAIRLEAD_BENCH_DNS_RATES` (queries/s of the latency runs,
//! `5000,20000`), `FAIRLEAD_BENCH_DNS_CLIENTS` (20),
//! `FAIRLEAD_BENCH_DNS_THREADS` (2), `FAIRLEAD_BENCH_DNS_OUTSTANDING` (200),
//! `FAIRLEAD_BENCH_DNS_SERVICES` (memory phase, `1000,10000,30000`),
//! `FAIRLEAD_BENCH_DNS_REUSEPORT` (1: a socket per receive loop; 0: one
//! shared socket; default 0 for blocking receivers, 1 for event loops), `FAIRLEAD_BENCH_DNS_BATCH` (datagrams per `recvmmsg`,
//! 32; 1 is a plain receive loop), `FAIRLEAD_BENCH_DNS_LOOPS` (UDP receive
//! loops, 2), `FAIRLEAD_BENCH_DNS_BLOCKING` (1: receive threads blocked in
//! `recvmmsg`; 0: tasks on per-core event loops). A run takes (3 servers × (ROUNDS + FIXED_ROUNDS × rates) +
//! 2 × ROUNDS) × duration plus ~30 s (~5.5 min with the defaults). The servers, dnsperf
//! and the memory children are killed when this process ends, panics
//! included (drop guards, plus `PR_SET_PDEATHSIG` for the case it is
//! killed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{
    apt_install, clock_ticks, die_with_parent, env_u64, loadavg, machine_ticks, mib, print_rows,
    stat_cpu, tail, threads_cpu, vm_kib, which, KillOnDrop, Proc,
};
use fairlead::dns::{DnsConfig, DnsServer};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// fairlead's listen address (any port).
const FAIRLEAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// dnsmasq's listen address.
const DNSMASQ_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 54);
/// unbound's listen address.
const UNBOUND_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 55);
/// The forwarded names' upstream (a dnsmasq).
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 56);
/// The forwarded names' zone, and how many there are.
const EXTERNAL_ZONE: &str = "example.org";
const EXTERNAL_NAMES: usize = 1_000;
const ZONE: &str = "cluster.local";
/// Record TTL of both servers (CoreDNS's default).
const TTL_SECS: u64 = 5;
/// Thread name of the in-process server's runtime (≤ 15 bytes).
const DNS_THREAD: &str = "fl-dns";
/// How long a server may take to answer its first query.
const START_LIMIT: Duration = Duration::from_secs(15);
/// The memory child is killed after this long.
const CHILD_LIMIT: Duration = Duration::from_secs(60);
/// Environment variable that turns this binary into the memory child.
const CHILD_ENV: &str = "FAIRLEAD_BENCH_DNS_CHILD";
/// Lines of the query file (dnsperf loops over it).
const QUERY_LINES: usize = 20_000;
/// The load-phase zone.
const LOAD_ZONE: Spec = Spec {
    cluster_ip: 1_000,
    headless: 100,
    cluster_ip_endpoints: 3,
    headless_endpoints: 5,
    namespaces: 10,
};
/// Endpoints per Service in the memory phase.
const MEMORY_ENDPOINTS: usize = 3;
/// One Service in this many is headless in the memory phase.
const MEMORY_HEADLESS_EVERY: usize = 10;
/// Rounds of changed slices in the memory phase, and Services per round.
const MEMORY_CHURN: usize = 4;
const MEMORY_CHURN_SERVICES: usize = 1_000;

fn main() -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return memory_child();
    }
    let s = Settings::from_env()?;
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_at_start = loadavg();
    println!(
        "fairlead cluster DNS benchmark: {cores} cores, load average at start {load_at_start}, \
         {}s per run, {} throughput rounds per server, latency runs at {:?} q/s",
        s.duration, s.rounds, s.rates
    );
    let tools = Tools::ensure(s.force_builtin, s.skip_unbound)?;
    let dir = tempfile::Builder::new()
        .prefix("fairlead-bench-dns")
        .tempdir()?;

    // The zone, the hosts file and the query mix.
    let zone = Zone::generate(&LOAD_ZONE)?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, zone.hosts_file())?;
    let mix = query_mix(&zone, QUERY_LINES);
    let queries_path = dir.path().join("queries.txt");
    {
        let mut f = std::io::BufWriter::new(File::create(&queries_path)?);
        for q in &mix {
            writeln!(f, "{} A", q.name)?;
        }
    }
    let distinct: BTreeSet<&str> = mix.iter().map(|q| q.name.as_str()).collect();
    let count = |k: Kind| mix.iter().filter(|q| q.kind == k).count();
    println!(
        "zone: {} ClusterIP Services ({} endpoints each), {} headless ({} ready endpoints each) \
         in {} namespaces; query file {} lines ({} distinct names): {} ClusterIP names, \
         {} headless names, {} search-path expansions (NXDOMAIN)",
        LOAD_ZONE.cluster_ip,
        LOAD_ZONE.cluster_ip_endpoints,
        LOAD_ZONE.headless,
        LOAD_ZONE.headless_endpoints,
        LOAD_ZONE.namespaces,
        mix.len(),
        distinct.len(),
        count(Kind::ClusterIp),
        count(Kind::Headless),
        count(Kind::SearchPath),
    );

    // The upstream of the forwarded names: one more dnsmasq, answering
    // `ext-NNNN.example.org` from a hosts file with a long TTL.
    let external = external_names();
    let ext_hosts = dir.path().join("external-hosts");
    std::fs::write(
        &ext_hosts,
        external
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect::<String>(),
    )?;
    let ext_queries = dir.path().join("external-queries.txt");
    let ext_mix = external_mix(&external, QUERY_LINES);
    {
        let mut f = std::io::BufWriter::new(File::create(&ext_queries)?);
        for q in &ext_mix {
            writeln!(f, "{} A", q.name)?;
        }
    }
    let up_port = same_port_or_free(UPSTREAM_IP, 0)?;
    let up_addr = SocketAddr::new(IpAddr::V4(UPSTREAM_IP), up_port);
    let mut cmd = dnsmasq_cmd(&tools.dnsmasq, up_addr, &ext_hosts, EXTERNAL_ZONE, 3600);
    println!("$ {}", describe(&cmd));
    // Every query it gets is logged: the forwarded runs count them.
    cmd.args(["--log-queries", "--log-facility=-"]);
    let mut upstream = Proc::spawn("upstream".into(), cmd, dir.path().join("upstream.log"))?;
    wait_ready(up_addr, &external[0].0, Some(&mut upstream))?;
    println!(
        "upstream (dnsmasq): serving {} external names on {up_addr}",
        external.len()
    );

    // fairlead, in process, forwarding to the upstream.
    fairlead::metrics::init();
    let fl = InProcessDns::start(SocketAddr::new(IpAddr::V4(FAIRLEAD_IP), 0), vec![up_addr])?;
    let took = fl.update(&zone.objects);
    let stats = fl.server().index().stats();
    println!(
        "fairlead: serving on {} (udp+tcp), index of {} Services: {} names, {} records, \
         built in {took:.1?}",
        fl.addr, stats.services, stats.names, stats.records
    );

    // dnsmasq, on the same port when it is free on its address, forwarding
    // the rest to the same upstream.
    let port = same_port_or_free(DNSMASQ_IP, fl.addr.port())?;
    let dm_addr = SocketAddr::new(IpAddr::V4(DNSMASQ_IP), port);
    let mut cmd = dnsmasq_cmd(&tools.dnsmasq, dm_addr, &hosts, ZONE, TTL_SECS);
    cmd.arg(format!("--server={}#{}", up_addr.ip(), up_addr.port()));
    println!("$ {}", describe(&cmd));
    let mut dnsmasq = Proc::spawn("dnsmasq".into(), cmd, dir.path().join("dnsmasq.log"))?;
    wait_ready(dm_addr, &zone.probe_name(), Some(&mut dnsmasq))?;
    wait_ready(fl.addr, &zone.probe_name(), None)?;
    println!("dnsmasq: serving on {dm_addr}");

    // unbound, authoritative for the zone from local-data, 2 threads.
    let mut unbound = match &tools.unbound {
        None => None,
        Some(bin) => {
            let port = same_port_or_free(UNBOUND_IP, fl.addr.port())?;
            let addr = SocketAddr::new(IpAddr::V4(UNBOUND_IP), port);
            let conf = dir.path().join("unbound.conf");
            std::fs::write(&conf, unbound_conf(&zone, addr, dir.path()))?;
            let mut cmd = Command::new(bin);
            cmd.arg("-d").arg("-c").arg(&conf);
            println!(
                "$ {}  ({} local-data lines)",
                describe(&cmd),
                zone.hosts_file().lines().count()
            );
            let mut p = Proc::spawn("unbound".into(), cmd, dir.path().join("unbound.log"))?;
            wait_ready(addr, &zone.probe_name(), Some(&mut p))?;
            println!("unbound: serving on {addr}");
            Some((p, addr))
        }
    };

    let mut targets = vec![
        Target {
            label: "fairlead",
            addr: fl.addr,
            cpu: Cpu::Threads(DNS_THREAD),
        },
        Target {
            label: "dnsmasq",
            addr: dm_addr,
            cpu: Cpu::Pid(dnsmasq.pid()),
        },
    ];
    if let Some((p, addr)) = &unbound {
        targets.push(Target {
            label: "unbound",
            addr: *addr,
            cpu: Cpu::Pid(p.pid()),
        });
    }
    let peers: Vec<&'static str> = targets[1..].iter().map(|t| t.label).collect();
    let check_running =
        |dnsmasq: &mut Proc, unbound: &mut Option<(Proc, SocketAddr)>| -> Result<()> {
            dnsmasq.check_running()?;
            if let Some((p, _)) = unbound {
                p.check_running()?;
            }
            Ok(())
        };

    // All must give the same answers.
    cross_check(&distinct, &|name| zone.expected(name), &targets)?;

    let load = LoadSpec {
        queries: &queries_path,
        names: &mix,
        duration: s.duration,
        clients: s.clients,
        threads: s.threads,
        outstanding: s.outstanding,
    };
    println!("load generator: {}", tools.loadgen.describe(&load));

    // 1. Throughput, alternating.
    let rss_before = vm_kib("VmRSS");
    let mut runs: BTreeMap<(String, &'static str), Vec<Run>> = BTreeMap::new();
    for round in 1..=s.rounds {
        for t in &targets {
            let run = measure(&tools.loadgen, t, &load, None, false)?;
            check_running(&mut dnsmasq, &mut unbound)?;
            println!("max-rate round {round} {:<8} {}", t.label, run.describe());
            runs.entry(("max".into(), t.label)).or_default().push(run);
        }
    }
    // 2. Latency at fixed rates, FIXED_ROUNDS times each (the median run
    // is reported: a tail latency on a shared machine moves a lot).
    for round in 1..=s.fixed_rounds {
        for rate in &s.rates {
            for t in &targets {
                let run = measure(&tools.loadgen, t, &load, Some(*rate), true)?;
                check_running(&mut dnsmasq, &mut unbound)?;
                println!(
                    "fixed {rate:>6} q/s round {round} {:<8} {}",
                    t.label,
                    run.describe()
                );
                runs.entry((format!("fixed {rate}"), t.label))
                    .or_default()
                    .push(run);
            }
        }
    }
    // 3. Forwarded names from the caches: fairlead against dnsmasq, both
    // forwarding to the upstream; each name asked once first (a miss), then
    // only hits (the upstream's CPU during a run says how many were not).
    let ext_distinct: BTreeSet<&str> = ext_mix.iter().map(|q| q.name.as_str()).collect();
    let ext_expected = |name: &str| -> (ResponseCode, BTreeSet<Ipv4Addr>) {
        match external.iter().find(|(n, _)| n == name) {
            Some((_, ip)) => (ResponseCode::NoError, [*ip].into()),
            None => (ResponseCode::NXDomain, BTreeSet::new()),
        }
    };
    cross_check(&ext_distinct, &ext_expected, &targets[..2])?;
    let ext_load = LoadSpec {
        queries: &ext_queries,
        names: &ext_mix,
        ..load
    };
    let upstream_log = dir.path().join("upstream.log");
    let upstream_queries = || {
        std::fs::read_to_string(&upstream_log)
            .map(|t| t.lines().filter(|l| l.contains(" query[")).count())
            .unwrap_or(0)
    };
    for round in 1..=s.rounds {
        for t in &targets[..2] {
            let before = upstream_queries();
            let run = measure(&tools.loadgen, t, &ext_load, None, false)?;
            check_running(&mut dnsmasq, &mut unbound)?;
            println!(
                "forwarded round {round} {:<8} {}; {} queries reached the upstream",
                t.label,
                run.describe(),
                upstream_queries().saturating_sub(before)
            );
            runs.entry(("forwarded".into(), t.label))
                .or_default()
                .push(run);
        }
    }
    upstream.check_running()?;
    let rss_after = vm_kib("VmRSS");
    let served = fl.requests_served();

    // 4. Memory, in a fresh process per size.
    let memory = s
        .memory_services
        .iter()
        .map(|n| run_memory_child(*n))
        .collect::<Result<Vec<_>>>()?;

    // Report.
    println!();
    print_table(&runs, &peers, &s.rates);
    println!();
    for m in &memory {
        m.print_steps();
    }
    println!();
    print_memory(&memory);
    println!();
    println!(
        "reference (other hardware, not this run): CoreDNS about 33,700 q/s for cluster names on \
         2 vCPUs with the load generator on another machine; here dnsperf shares the 2 cores"
    );
    let grown = rss_after.saturating_sub(rss_before);
    println!(
        "in-process fairlead: VmRSS {:.1} MiB before the load, {:.1} MiB after {} requests \
         (+{:.1} MiB, {}; bench process, Prometheus recorder installed, /metrics never scraped \
         until then{})",
        mib(rss_before),
        mib(rss_after),
        served.map_or("?".to_string(), |n| n.to_string()),
        mib(grown),
        served
            .filter(|n| *n > 0)
            .map_or("?".to_string(), |n| format!(
                "{:.1} bytes per request",
                grown as f64 * 1024.0 / n as f64
            )),
        match tools.loadgen {
            LoadGen::Builtin => "; includes the built-in load generator's buffers",
            LoadGen::Dnsperf(_) => "",
        },
    );
    let load_at_end = loadavg();
    let busy = runs
        .values()
        .flatten()
        .map(|r| r.usage.others)
        .fold(0.0, f64::max);
    println!(
        "load average at start {load_at_start}, at end {load_at_end}; other processes took up to \
         {:.0}% of the machine during a run",
        busy * 100.0
    );
    let first_load: f64 = load_at_start
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if busy > 0.10 || first_load > 0.5 {
        println!(
            "NOTE: the machine was busy with other work (load average {load_at_start} at start, \
             up to {:.0}% of its CPU used by other processes during a run): absolute numbers are \
             low, the ratios are fairer (runs alternate)",
            busy * 100.0
        );
    }
    println!("total {:.1?}", started.elapsed());

    drop(unbound);
    drop(dnsmasq);
    drop(fl);
    drop(upstream);
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings and tools

struct Settings {
    duration: u64,
    rounds: usize,
    rates: Vec<u64>,
    fixed_rounds: usize,
    clients: usize,
    threads: usize,
    outstanding: usize,
    memory_services: Vec<usize>,
    force_builtin: bool,
    skip_unbound: bool,
}

/// A comma-separated list of counts from the environment, or `default`.
fn list(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|n| Ok(n.trim().parse::<usize>()?))
            .collect::<Result<_>>()
            .with_context(|| format!("{name}: a comma-separated list of counts")),
        Err(_) => Ok(default.to_vec()),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = env_u64;
        Ok(Settings {
            duration: var("FAIRLEAD_BENCH_DURATION", 10)?.max(1),
            rounds: var("FAIRLEAD_BENCH_ROUNDS", 2)?.max(1) as usize,
            fixed_rounds: var("FAIRLEAD_BENCH_FIXED_ROUNDS", 3)?.max(1) as usize,
            rates: list("FAIRLEAD_BENCH_DNS_RATES", &[5_000, 20_000])?
                .into_iter()
                .map(|r| (r as u64).max(1))
                .collect(),
            clients: var("FAIRLEAD_BENCH_DNS_CLIENTS", 20)?.max(1) as usize,
            threads: var("FAIRLEAD_BENCH_DNS_THREADS", 2)?.max(1) as usize,
            outstanding: var("FAIRLEAD_BENCH_DNS_OUTSTANDING", 200)?.max(1) as usize,
            memory_services: list("FAIRLEAD_BENCH_DNS_SERVICES", &[1_000, 10_000, 30_000])?
                .into_iter()
                .map(|n| n.clamp(10, 60_000))
                .collect(),
            force_builtin: std::env::var("FAIRLEAD_BENCH_DNS_LOADGEN")
                .is_ok_and(|v| v == "builtin"),
            skip_unbound: std::env::var("FAIRLEAD_BENCH_DNS_UNBOUND").as_deref() == Ok("0"),
        })
    }
}

struct Tools {
    dnsmasq: PathBuf,
    unbound: Option<PathBuf>,
    loadgen: LoadGen,
}

impl Tools {
    /// Find dnsmasq and dnsperf; `apt-get install` what is missing.
    fn ensure(force_builtin: bool, skip_unbound: bool) -> Result<Tools> {
        let mut missing = Vec::new();
        if which("dnsmasq").is_none() {
            missing.push("dnsmasq-base");
        }
        if !force_builtin && which("dnsperf").is_none() {
            missing.push("dnsperf");
        }
        if !skip_unbound && which("unbound").is_none() {
            // (On a machine without an init system the package's service
            // is not started; with one, it starts on port 53, which the
            // bench does not use.)
            missing.push("unbound");
        }
        if !missing.is_empty() {
            println!("missing: {} (installing with apt-get)", missing.join(", "));
            if let Err(e) = apt_install(&missing) {
                println!("{e:#}");
                // dnsperf alone may fail (not packaged); dnsmasq is a must.
                if which("dnsmasq").is_none() && missing.contains(&"dnsperf") {
                    let _ = apt_install(&["dnsmasq-base"]);
                }
            }
        }
        let dnsmasq = which("dnsmasq").context("dnsmasq missing after apt-get install")?;
        let unbound = if skip_unbound {
            None
        } else {
            let found = which("unbound");
            if found.is_none() {
                println!("NOTE: unbound is not available; it is left out");
            }
            found
        };
        let loadgen = match which("dnsperf") {
            Some(p) if !force_builtin => LoadGen::Dnsperf(p),
            _ => {
                println!(
                    "NOTE: {}; using the built-in UDP load generator",
                    if force_builtin {
                        "FAIRLEAD_BENCH_DNS_LOADGEN=builtin"
                    } else {
                        "dnsperf is not available"
                    }
                );
                LoadGen::Builtin
            }
        };
        // The first line that names the version (dnsperf prints it after
        // its usage, dnsmasq first).
        let version = |bin: &Path, arg: &str| -> String {
            Command::new(bin)
                .arg(arg)
                .output()
                .ok()
                .and_then(|o| {
                    let text = String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr);
                    text.lines()
                        .find(|l| l.to_ascii_lowercase().contains("version "))
                        .map(|l| l.trim().to_string())
                })
                .unwrap_or_else(|| "?".into())
        };
        let dnsperf = match &loadgen {
            LoadGen::Dnsperf(p) => format!("{} ({})", p.display(), version(p, "-h")),
            LoadGen::Builtin => "built-in".into(),
        };
        println!(
            "dnsperf: {dnsperf}, dnsmasq: {} ({})",
            dnsmasq.display(),
            version(&dnsmasq, "--version")
        );
        if let Some(u) = &unbound {
            println!("unbound: {} ({})", u.display(), version(u, "-V"));
        }
        Ok(Tools {
            dnsmasq,
            unbound,
            loadgen,
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// dnsmasq serving `hosts` as the authority for `zone` (NXDOMAIN for any
/// other name in it) on `addr`, single threaded as always.
fn dnsmasq_cmd(bin: &Path, addr: SocketAddr, hosts: &Path, zone: &str, ttl: u64) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
    ])
    .arg(format!("--addn-hosts={}", hosts.display()))
    .arg(format!("--local=/{zone}/"))
    .arg(format!("--listen-address={}", addr.ip()))
    .arg("--bind-interfaces")
    .arg(format!("--port={}", addr.port()))
    .arg("--cache-size=10000")
    .arg(format!("--local-ttl={ttl}"));
    cmd
}

/// unbound as an authoritative server of the zone: a static local zone
/// (NXDOMAIN for names it does not hold) with a `local-data` line per
/// address, 2 threads with a socket each, no recursion, no validation.
fn unbound_conf(zone: &Zone, addr: SocketAddr, dir: &Path) -> String {
    let mut c = format!(
        "server:\n  interface: {ip}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  \
         username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
         logfile: \"\"\n  verbosity: 0\n  num-threads: 2\n  so-reuseport: yes\n  do-ip6: no\n  \
         access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  \
         local-zone: \"{ZONE}.\" static\n",
        ip = addr.ip(),
        port = addr.port(),
        dir = dir.display(),
    );
    for e in &zone.entries {
        for ip in &e.addresses {
            c.push_str(&format!(
                "  local-data: \"{}. {TTL_SECS} IN A {ip}\"\n",
                e.fqdn
            ));
        }
    }
    c.push_str("remote-control:\n  control-enable: no\n");
    c
}

/// `ext-NNNN.example.org` names and their addresses (from 198.18.0.0/15,
/// the benchmarking range).
fn external_names() -> Vec<(String, Ipv4Addr)> {
    (0..EXTERNAL_NAMES)
        .map(|i| {
            let ip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8);
            (format!("ext-{i:04}.{EXTERNAL_ZONE}"), ip)
        })
        .collect()
}

/// `lines` A queries for the external names, uniformly mixed.
fn external_mix(names: &[(String, Ipv4Addr)], lines: usize) -> Vec<QueryLine> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..lines)
        .map(|_| QueryLine {
            name: names[rng.below(names.len())].0.clone(),
            kind: Kind::External,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The zone

/// Shape of a generated cluster.
struct Spec {
    cluster_ip: usize,
    headless: usize,
    cluster_ip_endpoints: usize,
    headless_endpoints: usize,
    namespaces: usize,
}

/// The API objects, as the node's watch cache holds them.
struct Objects {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    namespaces: Vec<String>,
}

/// One generated Service: its DNS name and what an A query returns.
struct Entry {
    /// `<svc>.<ns>.svc.cluster.local` (no final dot).
    fqdn: String,
    headless: bool,
    /// The ClusterIP, or the ready endpoints of a headless Service.
    addresses: Vec<Ipv4Addr>,
}

struct Zone {
    objects: Objects,
    entries: Vec<Entry>,
    namespaces: Vec<String>,
}

impl Zone {
    /// Services (ClusterIPs from 10.96.0.16 up) and one EndpointSlice each
    /// (endpoint addresses from 10.128.0.1 up), parsed from JSON text like
    /// the watch cache's.
    fn generate(spec: &Spec) -> Result<Zone> {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut entries = Vec::new();
        let namespaces = Zone::each(spec, |entry, svc, slice| {
            services.push(Arc::new(
                serde_json::from_str(svc).with_context(|| format!("Service {svc}"))?,
            ));
            slices.push(Arc::new(
                serde_json::from_str(slice).with_context(|| format!("EndpointSlice {slice}"))?,
            ));
            entries.push(entry);
            Ok(())
        })?;
        Ok(Zone {
            objects: Objects {
                services,
                slices,
                namespaces: namespaces.clone(),
            },
            entries,
            namespaces,
        })
    }

    /// Every Service of `spec` in turn, as (entry, Service JSON,
    /// EndpointSlice JSON); returns the namespaces.
    fn each(
        spec: &Spec,
        mut f: impl FnMut(Entry, &str, &str) -> Result<()>,
    ) -> Result<Vec<String>> {
        let namespaces: Vec<String> = (0..spec.namespaces).map(|k| format!("ns-{k}")).collect();
        let mut next_endpoint = u32::from(Ipv4Addr::new(10, 128, 0, 1));
        let total = spec.cluster_ip + spec.headless;
        for i in 0..total {
            let headless = i >= spec.cluster_ip;
            let (name, endpoints) = if headless {
                (
                    format!("hl-{:05}", i - spec.cluster_ip),
                    spec.headless_endpoints,
                )
            } else {
                (format!("svc-{i:05}"), spec.cluster_ip_endpoints)
            };
            let ns = &namespaces[i % namespaces.len()];
            let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i as u32);
            let ips: Vec<Ipv4Addr> = (0..endpoints)
                .map(|_| {
                    let ip = Ipv4Addr::from(next_endpoint);
                    next_endpoint += 1;
                    ip
                })
                .collect();
            let (entry, svc, slice) = service_objects(&name, ns, headless, cluster_ip, &ips);
            f(entry, &svc, &slice)?;
        }
        Ok(namespaces)
    }

    /// `/etc/hosts` lines for dnsmasq: every A record the zone has at a
    /// Service name.
    fn hosts_file(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            for ip in &e.addresses {
                out.push_str(&format!("{ip} {}\n", e.fqdn));
            }
        }
        out
    }

    fn probe_name(&self) -> String {
        self.entries[0].fqdn.clone()
    }

    /// What an A query for `name` must return: (NOERROR, addresses) or
    /// (NXDOMAIN, nothing).
    fn expected(&self, name: &str) -> (ResponseCode, BTreeSet<Ipv4Addr>) {
        match self.entries.iter().find(|e| e.fqdn == name) {
            Some(e) => (ResponseCode::NoError, e.addresses.iter().copied().collect()),
            None => (ResponseCode::NXDomain, BTreeSet::new()),
        }
    }
}

/// (entry, Service JSON, EndpointSlice JSON) of one Service.
fn service_objects(
    name: &str,
    ns: &str,
    headless: bool,
    cluster_ip: Ipv4Addr,
    endpoints: &[Ipv4Addr],
) -> (Entry, String, String) {
    let ip = if headless {
        "None".to_string()
    } else {
        cluster_ip.to_string()
    };
    let svc = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}",
        "uid":"00000000-0000-0000-0000-{:012}","resourceVersion":"1","labels":{{"app":"{name}"}}}},
        "spec":{{"type":"ClusterIP","clusterIP":"{ip}","clusterIPs":["{ip}"],
        "selector":{{"app":"{name}"}},"ipFamilies":["IPv4"],"ipFamilyPolicy":"SingleStack",
        "sessionAffinity":"None","internalTrafficPolicy":"Cluster",
        "ports":[{{"name":"http","port":80,"protocol":"TCP","targetPort":8080}}]}}}}"#,
        u32::from(cluster_ip)
    );
    let eps: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            format!(
                r#"{{"addresses":["{ip}"],"conditions":{{"ready":true,"serving":true,
                "terminating":false}},"nodeName":"node-{}","targetRef":{{"kind":"Pod",
                "namespace":"{ns}","name":"{name}-{k}"}}}}"#,
                k % 3
            )
        })
        .collect();
    let slice = format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{
        "name":"{name}-x7k2p","namespace":"{ns}","resourceVersion":"1",
        "labels":{{"kubernetes.io/service-name":"{name}",
        "endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io"}}}},
        "addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],
        "endpoints":[{}]}}"#,
        eps.join(",")
    );
    let entry = Entry {
        fqdn: format!("{name}.{ns}.svc.{ZONE}"),
        headless,
        addresses: if headless {
            endpoints.to_vec()
        } else {
            vec![cluster_ip]
        },
    };
    (entry, svc, slice)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    Headless,
    SearchPath,
    /// A name outside the cluster, forwarded upstream (and cached).
    External,
}

struct QueryLine {
    name: String,
    kind: Kind,
}

/// A deterministic pseudo-random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `lines` A queries: 35% ClusterIP names, 15% headless names, 50% search
/// path expansions (NXDOMAIN) as a pod in a random namespace with
/// `ndots:5` and the search list `<ns>.svc.<zone> svc.<zone> <zone>` sends
/// them before (or instead of) the real name.
fn query_mix(zone: &Zone, lines: usize) -> Vec<QueryLine> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let cluster_ip: Vec<&Entry> = zone.entries.iter().filter(|e| !e.headless).collect();
    let headless: Vec<&Entry> = zone.entries.iter().filter(|e| e.headless).collect();
    const EXTERNAL: [&str; 4] = [
        "www.example.com",
        "api.github.com",
        "storage.googleapis.com",
        "registry-1.docker.io",
    ];
    (0..lines)
        .map(|_| {
            let roll = rng.below(100);
            if roll < 35 {
                let e = cluster_ip[rng.below(cluster_ip.len())];
                QueryLine {
                    name: e.fqdn.clone(),
                    kind: Kind::ClusterIp,
                }
            } else if roll < 50 {
                let e = headless[rng.below(headless.len())];
                QueryLine {
                    name: e.fqdn.clone(),
                    kind: Kind::Headless,
                }
            } else {
                let client_ns = &zone.namespaces[rng.below(zone.namespaces.len())];
                let e = cluster_ip[rng.below(cluster_ip.len())];
                let short = e
                    .fqdn
                    .strip_suffix(&format!(".svc.{ZONE}"))
                    .unwrap_or(&e.fqdn);
                let name = match rng.below(5) {
                    // "svc.ns" looked up from client_ns: first expansion.
                    0 => format!("{short}.{client_ns}.svc.{ZONE}"),
                    // The full name without the final dot: all three
                    // expansions come first.
                    1 => format!("{}.{client_ns}.svc.{ZONE}", e.fqdn),
                    2 => format!("{}.svc.{ZONE}", e.fqdn),
                    3 => format!("{}.{ZONE}", e.fqdn),
                    // An external name.
                    _ => format!(
                        "{}.{client_ns}.svc.{ZONE}",
                        EXTERNAL[rng.below(EXTERNAL.len())]
                    ),
                };
                QueryLine {
                    name,
                    kind: Kind::SearchPath,
                }
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The servers

/// [`DnsServer`] on its own 2-worker runtime; stopped on drop.
struct InProcessDns {
    rt: tokio::runtime::Runtime,
    server: Option<DnsServer>,
    addr: SocketAddr,
}

impl InProcessDns {
    fn start(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<InProcessDns> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(DNS_THREAD)
            .enable_all()
            .build()?;
        let cfg = DnsConfig {
            listen: vec![listen],
            upstreams,
            ttl: Duration::from_secs(TTL_SECS),
            // `FAIRLEAD_BENCH_DNS_LOOPS`: UDP receive loops (2, one per
            // core, as the binary on this machine).
            udp_workers: std::env::var("FAIRLEAD_BENCH_DNS_LOOPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
            // `FAIRLEAD_BENCH_DNS_REUSEPORT=1`: a socket per receive loop
            // (SO_REUSEPORT), `=0`: one shared socket. Default: shared for
            // blocking receivers (as `fairlead`), a socket each for event
            // loops.
            udp_reuseport: match std::env::var("FAIRLEAD_BENCH_DNS_REUSEPORT").as_deref() {
                Ok("1") => true,
                Ok("0") => false,
                _ => std::env::var("FAIRLEAD_BENCH_DNS_BLOCKING").as_deref() == Ok("0"),
            },
            // `FAIRLEAD_BENCH_DNS_BATCH=1`: one datagram per receive call
            // (to measure recvmmsg batches against a plain loop).
            // `FAIRLEAD_BENCH_DNS_STEER=0`: datagrams spread by the
            // kernel's hash instead of by CPU.
            udp_steer_by_cpu: std::env::var("FAIRLEAD_BENCH_DNS_STEER").as_deref() != Ok("0"),
            // `FAIRLEAD_BENCH_DNS_BLOCKING=0`: receive loops as tasks on
            // per-core event loops (epoll) instead of blocking threads.
            udp_blocking: std::env::var("FAIRLEAD_BENCH_DNS_BLOCKING").as_deref() != Ok("0"),
            udp_batch: std::env::var("FAIRLEAD_BENCH_DNS_BATCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(fairlead::dns::udp::MAX_BATCH),
            ..DnsConfig::default()
        };
        let server = rt
            .block_on(DnsServer::start(cfg))
            .context("starting fairlead's DNS server")?;
        let addr = server.local_addrs()[0];
        Ok(InProcessDns {
            rt,
            server: Some(server),
            addr,
        })
    }

    fn server(&self) -> &DnsServer {
        self.server.as_ref().expect("running")
    }

    fn update(&self, o: &Objects) -> Duration {
        let _guard = self.rt.enter();
        let t = Instant::now();
        self.server().update(&o.services, &o.slices, &o.namespaces);
        t.elapsed()
    }

    /// The node daemon's path: the cache's dirty keys into the index.
    fn apply(&self, cache: &mut fairlead::model::Cache) -> Duration {
        let _guard = self.rt.enter();
        let dirty = cache.take_dirty();
        let t = Instant::now();
        self.server().apply(cache, &dirty);
        t.elapsed()
    }

    /// `coredns_dns_requests_total` summed over its labels.
    fn requests_served(&self) -> Option<u64> {
        let text = fairlead::metrics::render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("coredns_dns_requests_total"))
            .collect();
        if lines.is_empty() {
            return None;
        }
        lines
            .iter()
            .map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<Option<f64>>()
            .map(|v| v as u64)
    }
}

impl Drop for InProcessDns {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        self.server.take();
    }
}

/// `port` on `ip` if neither UDP nor TCP has it there, else a free one.
fn same_port_or_free(ip: Ipv4Addr, port: u16) -> Result<u16> {
    let free = |p: u16| -> Result<u16> {
        let u = UdpSocket::bind((ip, p))?;
        let got = u.local_addr()?.port();
        let _t = std::net::TcpListener::bind((ip, got))?;
        Ok(got)
    };
    if let Ok(p) = free(port) {
        return Ok(p);
    }
    for _ in 0..20 {
        if let Ok(p) = free(0) {
            return Ok(p);
        }
    }
    bail!("no free UDP+TCP port on {ip}")
}

/// Until `name` is answered NOERROR by `addr` (or `proc` dies, or
/// START_LIMIT).
fn wait_ready(addr: SocketAddr, name: &str, mut proc: Option<&mut Proc>) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(p) = proc.as_deref_mut() {
            p.check_running()?;
        }
        match ask(addr, name, Duration::from_millis(200)) {
            Ok((ResponseCode::NoError, ips)) if !ips.is_empty() => return Ok(()),
            other if start.elapsed() > START_LIMIT => {
                bail!("{addr} does not answer {name} after {START_LIMIT:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One A query over UDP: rcode and the A records of the answer.
fn ask(
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<(ResponseCode, BTreeSet<Ipv4Addr>)> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(timeout))?;
    let packet = encode_query(name, 0x4242)?;
    sock.send(&packet)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf)?;
        let m = Message::from_vec(&buf[..n]).context("undecodable reply")?;
        if m.metadata.id != 0x4242 {
            continue;
        }
        let ips = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        return Ok((m.metadata.response_code, ips));
    }
}

fn encode_query(name: &str, id: u16) -> Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut n = Name::from_ascii(name)?;
    n.set_fqdn(true);
    m.add_query(Query::query(n, RecordType::A));
    Ok(m.to_vec()?)
}

/// Every distinct query of the mix, asked of every server: same rcode,
/// same A records, and what `expected` says they should be.
fn cross_check(
    names: &BTreeSet<&str>,
    expected: &dyn Fn(&str) -> (ResponseCode, BTreeSet<Ipv4Addr>),
    targets: &[Target],
) -> Result<()> {
    let t = Instant::now();
    let mut rcodes: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        let want = expected(name);
        for target in targets {
            let got = ask(target.addr, name, Duration::from_secs(2))
                .with_context(|| format!("{}, {name}", target.label))?;
            if got != want {
                bail!("{name}: expected {want:?}; {} said {got:?}", target.label);
            }
        }
        *rcodes.entry(want.0.to_string()).or_default() += 1;
    }
    println!(
        "cross-check: {} distinct queries answered identically by {} ({}) in {:.1?}",
        names.len(),
        targets
            .iter()
            .map(|t| t.label)
            .collect::<Vec<_>>()
            .join(", "),
        rcodes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        t.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Load

struct LoadSpec<'a> {
    queries: &'a Path,
    names: &'a [QueryLine],
    duration: u64,
    clients: usize,
    threads: usize,
    outstanding: usize,
}

enum LoadGen {
    Dnsperf(PathBuf),
    Builtin,
}

/// What one load run measured.
#[derive(Debug, Default)]
struct LoadResult {
    sent: u64,
    completed: u64,
    lost: u64,
    qps: f64,
    avg_ms: f64,
    /// Per-query latencies in ms (verbose dnsperf runs and the built-in
    /// generator), sorted.
    latencies_ms: Vec<f64>,
    rcodes: String,
    /// dnsperf's "Average packet size" line.
    sizes: Option<String>,
    /// CPU seconds the load generator used.
    client_cpu: f64,
}

impl LoadGen {
    fn describe(&self, l: &LoadSpec) -> String {
        match self {
            LoadGen::Dnsperf(p) => describe(&self.dnsperf_cmd(
                p,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                l,
                None,
                false,
            ))
            .replace("0.0.0.0", "<ip>")
            .replace("-p 0", "-p <port>"),
            LoadGen::Builtin => format!(
                "built-in: {} threads, {} queries outstanding in all, {}s, 1 s timeout",
                l.threads, l.outstanding, l.duration
            ),
        }
    }

    fn dnsperf_cmd(
        &self,
        bin: &Path,
        addr: SocketAddr,
        l: &LoadSpec,
        rate: Option<u64>,
        verbose: bool,
    ) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args(["-s", &addr.ip().to_string()])
            .args(["-p", &addr.port().to_string()])
            .arg("-d")
            .arg(l.queries)
            .args(["-l", &l.duration.to_string()])
            .args(["-c", &l.clients.to_string()])
            .args(["-T", &l.threads.to_string()])
            .args(["-q", &l.outstanding.to_string()])
            .args(["-t", "1"]);
        if let Some(r) = rate {
            cmd.args(["-Q", &r.to_string()]);
        }
        if verbose {
            cmd.arg("-v");
        }
        cmd
    }

    fn run(
        &self,
        addr: SocketAddr,
        l: &LoadSpec,
        rate: Option<u64>,
        verbose: bool,
    ) -> Result<LoadResult> {
        match self {
            LoadGen::Dnsperf(bin) => {
                let mut cmd = self.dnsperf_cmd(bin, addr, l, rate, verbose);
                die_with_parent(&mut cmd);
                let before = children_cpu();
                let out = cmd.output().context("running dnsperf")?;
                let client_cpu = children_cpu() - before;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!(
                        "dnsperf against {addr} failed ({}): {}{}",
                        out.status,
                        tail(&text, 30),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let mut r = parse_dnsperf(&text)
                    .with_context(|| format!("parsing dnsperf output:\n{}", tail(&text, 30)))?;
                r.client_cpu = client_cpu;
                Ok(r)
            }
            LoadGen::Builtin => builtin_load(addr, l, rate),
        }
    }
}

/// dnsperf 2.x's statistics (and `-v` per-query lines).
fn parse_dnsperf(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let (mut qps, mut avg, mut sent) = (None, None, None);
    let first = |v: &str| -> Result<f64> {
        Ok(v.split_whitespace()
            .next()
            .context("empty value")?
            .parse::<f64>()?)
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("> ") {
            // > NOERROR name A 0.000123
            if let Some(Ok(secs)) = rest.rsplit(' ').next().map(str::parse::<f64>) {
                r.latencies_ms.push(secs * 1e3);
            }
            continue;
        }
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Queries sent" => sent = Some(first(value)? as u64),
            "Queries completed" => r.completed = first(value)? as u64,
            "Queries lost" => r.lost = first(value)? as u64,
            "Response codes" => r.rcodes = value.to_string(),
            "Average packet size" => r.sizes = Some(value.to_string()),
            "Queries per second" => qps = Some(first(value)?),
            "Average Latency (s)" => avg = Some(first(value)? * 1e3),
            _ => {}
        }
    }
    r.sent = sent.context("no 'Queries sent'")?;
    r.qps = qps.context("no 'Queries per second'")?;
    r.avg_ms = avg.context("no 'Average Latency'")?;
    r.latencies_ms.sort_by(f64::total_cmp);
    Ok(r)
}

/// The fallback load generator: `threads` threads, each with one connected
/// UDP socket and its share of `outstanding` queries in flight, for
/// `duration` seconds, optionally paced to `rate` queries/s in all.
/// Replies are matched by ID; a query unanswered after 1 s is lost.
fn builtin_load(addr: SocketAddr, l: &LoadSpec, rate: Option<u64>) -> Result<LoadResult> {
    let packets: Arc<Vec<Vec<u8>>> = Arc::new(
        l.names
            .iter()
            .map(|q| encode_query(&q.name, 0))
            .collect::<Result<_>>()?,
    );
    let duration = Duration::from_secs(l.duration);
    let threads = l.threads.max(1);
    let window = (l.outstanding / threads).max(1);
    let per_thread_rate = rate.map(|r| (r as f64 / threads as f64).max(1.0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let packets = packets.clone();
            std::thread::spawn(move || -> Result<ThreadLoad> {
                load_thread(addr, &packets, t, duration, window, per_thread_rate)
            })
        })
        .collect();
    let mut r = LoadResult::default();
    let mut rcodes: BTreeMap<String, u64> = BTreeMap::new();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        r.sent += t.sent;
        r.completed += t.latencies_ms.len() as u64;
        r.lost += t.lost;
        r.latencies_ms.extend(t.latencies_ms);
        r.client_cpu += t.cpu;
        for (k, v) in t.rcodes {
            *rcodes.entry(k).or_default() += v;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    r.qps = r.completed as f64 / secs;
    r.latencies_ms.sort_by(f64::total_cmp);
    r.avg_ms = r.latencies_ms.iter().sum::<f64>() / r.latencies_ms.len().max(1) as f64;
    let total: u64 = rcodes.values().sum();
    r.rcodes = rcodes
        .iter()
        .map(|(k, v)| format!("{k} {v} ({:.2}%)", *v as f64 * 100.0 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(r)
}

struct ThreadLoad {
    sent: u64,
    lost: u64,
    latencies_ms: Vec<f64>,
    rcodes: BTreeMap<String, u64>,
    cpu: f64,
}

fn load_thread(
    addr: SocketAddr,
    packets: &[Vec<u8>],
    offset: usize,
    duration: Duration,
    window: usize,
    rate: Option<f64>,
) -> Result<ThreadLoad> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut slots: Vec<Option<Instant>> = vec![None; 1 << 16];
    let mut next_id: u16 = 0;
    let mut outstanding = 0usize;
    let mut out = ThreadLoad {
        sent: 0,
        lost: 0,
        latencies_ms: Vec::new(),
        rcodes: BTreeMap::new(),
        cpu: 0.0,
    };
    let mut qi = offset;
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let mut last_expiry = start;
    let timeout = Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let running = now < start + duration;
        if !running && (outstanding == 0 || now > start + duration + Duration::from_millis(200)) {
            break;
        }
        while running && outstanding < window {
            if let Some(r) = rate {
                if out.sent as f64 >= start.elapsed().as_secs_f64() * r {
                    break;
                }
            }
            let id = next_id;
            next_id = next_id.wrapping_add(1);
            if slots[id as usize].take().is_some() {
                out.lost += 1;
                outstanding -= 1;
            }
            let mut p = packets[qi % packets.len()].clone();
            qi += 1;
            p[0..2].copy_from_slice(&id.to_be_bytes());
            sock.send(&p)?;
            slots[id as usize] = Some(Instant::now());
            outstanding += 1;
            out.sent += 1;
        }
        match sock.recv(&mut buf) {
            Ok(n) if n >= 12 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(sent) = slots[id as usize].take() {
                    outstanding -= 1;
                    out.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                    let rcode = ResponseCode::from(0, buf[3] & 0x0f);
                    *out.rcodes.entry(rcode.to_string()).or_default() += 1;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
        if last_expiry.elapsed() > Duration::from_millis(100) {
            last_expiry = Instant::now();
            for s in slots.iter_mut() {
                if s.is_some_and(|t| t.elapsed() > timeout) {
                    *s = None;
                    outstanding -= 1;
                    out.lost += 1;
                }
            }
        }
    }
    out.lost += outstanding as u64;
    out.cpu = thread_cpu();
    Ok(out)
}

// ---------------------------------------------------------------------------
// Runs and CPU accounting

struct Target {
    label: &'static str,
    addr: SocketAddr,
    cpu: Cpu,
}

/// Whose CPU time a run charges to the server.
#[derive(Clone, Copy)]
enum Cpu {
    /// Threads of this process whose name starts with this.
    Threads(&'static str),
    Pid(u32),
}

struct Run {
    load: LoadResult,
    usage: Usage,
    /// VmRSS of this process after the run, KiB.
    rss_after: u64,
}

struct Usage {
    /// CPU seconds of the server under test.
    server_secs: f64,
    /// Fraction of all cores used by processes other than the server and
    /// the load generator.
    others: f64,
    /// Fraction of all cores busy.
    busy: f64,
}

fn measure(
    gen: &LoadGen,
    t: &Target,
    l: &LoadSpec,
    rate: Option<u64>,
    verbose: bool,
) -> Result<Run> {
    let server_cpu = || match t.cpu {
        Cpu::Threads(prefix) => threads_cpu(prefix),
        Cpu::Pid(pid) => stat_cpu(&format!("/proc/{pid}/stat")).unwrap_or(0.0),
    };
    let (cpu0, ticks0, t0) = (server_cpu(), machine_ticks(), Instant::now());
    let load = gen.run(t.addr, l, rate, verbose)?;
    let (cpu1, ticks1, elapsed) = (server_cpu(), machine_ticks(), t0.elapsed());
    let server_secs = cpu1 - cpu0;
    let capacity =
        elapsed.as_secs_f64() * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy_secs = ticks1.0.saturating_sub(ticks0.0) as f64 / clock_ticks();
    let total_secs = ticks1.1.saturating_sub(ticks0.1) as f64 / clock_ticks();
    let busy = if total_secs > 0.0 {
        busy_secs / total_secs
    } else {
        0.0
    };
    let others = ((busy_secs - server_secs - load.client_cpu) / capacity).max(0.0);
    Ok(Run {
        load,
        usage: Usage {
            server_secs,
            others,
            busy,
        },
        rss_after: vm_kib("VmRSS"),
    })
}

impl Run {
    fn us_per_query(&self) -> f64 {
        self.usage.server_secs * 1e6 / self.load.completed.max(1) as f64
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        let v = &self.load.latencies_ms;
        if v.is_empty() {
            return None;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }

    fn describe(&self) -> String {
        let l = &self.load;
        let mut s = format!("{:>8.0} q/s  avg {:.3} ms", l.qps, l.avg_ms);
        if let (Some(p50), Some(p99)) = (self.percentile(0.5), self.percentile(0.99)) {
            s.push_str(&format!("  p50 {p50:.3} ms  p99 {p99:.3} ms"));
        }
        s.push_str(&format!(
            "  {} sent, {} lost; server CPU {:.2}s ({:.1} us/query), client CPU {:.2}s, \
             machine {:.0}% busy, others {:.0}%; {}",
            l.sent,
            l.lost,
            self.usage.server_secs,
            self.us_per_query(),
            l.client_cpu,
            self.usage.busy * 100.0,
            self.usage.others * 100.0,
            l.rcodes
        ));
        if let Some(sz) = &l.sizes {
            s.push_str(&format!("; packet size {sz}"));
        }
        s.push_str(&format!("; bench VmRSS {:.1} MiB", mib(self.rss_after)));
        s
    }
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of waited-for children (dnsperf runs).
fn children_cpu() -> f64 {
    rusage_secs(libc::RUSAGE_CHILDREN)
}

fn thread_cpu() -> f64 {
    rusage_secs(libc::RUSAGE_THREAD)
}

// ---------------------------------------------------------------------------
// Memory

/// What the memory child measured (KiB unless said otherwise).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Memory {
    services: usize,
    endpoints: usize,
    /// Fresh process with the runtime and an empty server.
    rss_server: u64,
    /// Plus the node's lean cache of the Services, EndpointSlices and
    /// Namespaces (the API objects decoded, viewed and dropped, then freed
    /// heap given back, as the node does when quiet).
    rss_cache: u64,
    /// Plus the DNS index, built from that cache by `DnsServer::apply`
    /// (the node's path).
    rss_index: u64,
    index_ms: f64,
    /// After [`MEMORY_CHURN`] rounds of changed slices applied
    /// incrementally.
    rss_churned: u64,
    churn_ms: Vec<f64>,
    /// After `malloc_trim(0)` (freed heap given back): what is really in
    /// use, as opposed to kept by the allocator. The node daemon trims
    /// when it is quiet.
    rss_trimmed: u64,
    /// Peak (VmHWM), before the trim.
    hwm: u64,
    names: usize,
    records: usize,
}

impl Memory {
    /// CoreDNS's formula, MB read as 10^6 bytes (the stricter reading).
    fn coredns_mb(&self) -> f64 {
        (self.endpoints + self.services) as f64 / 1000.0 + 54.0
    }

    fn print_steps(&self) {
        let step = |what: &str, kib: u64, before: u64| {
            println!(
                "  {what:<44} {:>6.1} MiB  (+{:.1})",
                mib(kib),
                mib(kib.saturating_sub(before))
            )
        };
        println!(
            "memory: {} Services ({} headless) with {} ready endpoints in all, fresh process \
             (VmRSS):",
            self.services,
            self.services / MEMORY_HEADLESS_EVERY,
            self.endpoints
        );
        println!(
            "  {:<44} {:>6.1} MiB",
            "runtime + empty DNS server",
            mib(self.rss_server)
        );
        step(
            "+ the node's lean cache of the objects",
            self.rss_cache,
            self.rss_server,
        );
        step(
            &format!(
                "+ DNS index ({} names, {} records)",
                self.names, self.records
            ),
            self.rss_index,
            self.rss_cache,
        );
        step(
            &format!("after {MEMORY_CHURN} rounds of changed slices"),
            self.rss_churned,
            self.rss_index,
        );
        println!(
            "  {:<44} {:>6.1} MiB  (peak VmHWM {:.1} MiB)",
            "after malloc_trim(0)",
            mib(self.rss_trimmed),
            mib(self.hwm)
        );
        println!(
            "  index built in {:.0} ms; each churn round ({MEMORY_CHURN_SERVICES} Services) \
             applied in {} ms",
            self.index_ms,
            self.churn_ms
                .iter()
                .map(|t| format!("{t:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
}

/// One row per size: RSS against CoreDNS's formula.
fn print_memory(sizes: &[Memory]) {
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    let mut rows = vec![[
        "Services + pods",
        "fairlead RSS",
        "peak (VmHWM)",
        "CoreDNS formula",
        "fairlead/CoreDNS",
    ]
    .map(String::from)];
    for m in sizes {
        let coredns = m.coredns_mb();
        rows.push([
            format!("{} + {}", m.services, m.endpoints),
            format!("{:.1} MB", mb(m.rss_churned)),
            format!("{:.1} MB", mb(m.hwm)),
            format!("{coredns:.1} MB"),
            format!("{:.2}x", mb(m.rss_churned) / coredns),
        ]);
    }
    print_rows(&rows);
    println!(
        "  (fairlead: the DNS server, its index and the node's lean cache of the API objects, \
         which the node shares with the proxy, after the churn rounds and before any trim; \
         CoreDNS: (Pods + Services) / 1000 + 54 MB, from CoreDNS's deployment sizing guide, \
         which includes CoreDNS's own cache of the API objects; MB = 10^6 bytes here)"
    );
}

fn run_memory_child(services: usize) -> Result<Memory> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.env(CHILD_ENV, services.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = KillOnDrop(cmd.spawn().context("starting the memory child")?);
    let start = Instant::now();
    loop {
        if child.0.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > CHILD_LIMIT {
            bail!("memory child still running after {CHILD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut s) = child.0.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.0.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    let status = child.0.wait()?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("MEMORY "))
        .with_context(|| format!("memory child ({status}) printed no result:\n{out}{err}"))?;
    Ok(serde_json::from_str(line)?)
}

fn malloc_trim() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The memory phase, in its own process: nothing else has touched the
/// heap. It takes the node daemon's path: every object decoded (here:
/// parsed from JSON like the watch cache's) into the lean
/// [`fairlead::model::Cache`] and dropped, the DNS index built from the
/// cache's dirty keys, then changes applied incrementally.
fn memory_child() -> Result<()> {
    let services: usize = std::env::var(CHILD_ENV)?.parse()?;
    fairlead::metrics::init();
    let fl = InProcessDns::start(SocketAddr::new(IpAddr::V4(FAIRLEAD_IP), 0), Vec::new())?;
    let rss_server = vm_kib("VmRSS");
    let headless = services / MEMORY_HEADLESS_EVERY;
    let spec = Spec {
        cluster_ip: services - headless,
        headless,
        cluster_ip_endpoints: MEMORY_ENDPOINTS,
        headless_endpoints: MEMORY_ENDPOINTS,
        namespaces: 10,
    };
    // Objects arrive one at a time, as watch events do: each is decoded,
    // viewed into the cache and dropped.
    let mut cache = fairlead::model::Cache::new();
    let mut probe = None;
    // The slices the churn rounds rewrite, as JSON.
    let mut churn: Vec<String> = Vec::new();
    let namespaces = Zone::each(&spec, |entry, svc, slice| {
        cache.apply_service(&serde_json::from_str::<Service>(svc)?);
        cache.apply_slice(&serde_json::from_str::<EndpointSlice>(slice)?);
        if churn.len() < MEMORY_CHURN_SERVICES {
            churn.push(slice.to_string());
        }
        probe = Some(entry.fqdn);
        Ok(())
    })?;
    for ns in &namespaces {
        cache.apply_namespace(ns);
    }
    malloc_trim();
    let rss_cache = vm_kib("VmRSS");
    let index_ms = fl.apply(&mut cache).as_secs_f64() * 1e3;
    let rss_index = vm_kib("VmRSS");
    let mut churn_ms = Vec::new();
    for round in 0..MEMORY_CHURN {
        for text in &churn {
            let mut slice: EndpointSlice = serde_json::from_str(text)?;
            // A new pod in place of the first: another address.
            if let Some(ep) = slice.endpoints.first_mut() {
                ep.addresses = vec![format!("10.200.{}.{}", round, 1 + ep.addresses.len())];
            }
            cache.apply_slice(&slice);
        }
        churn_ms.push(fl.apply(&mut cache).as_secs_f64() * 1e3);
    }
    let rss_churned = vm_kib("VmRSS");
    if let Some(name) = probe {
        let (rcode, ips) = ask(fl.addr, &name, Duration::from_secs(2))?;
        if rcode != ResponseCode::NoError || ips.len() != MEMORY_ENDPOINTS {
            bail!("{name}: {rcode} {ips:?}");
        }
    }
    let hwm = vm_kib("VmHWM");
    malloc_trim();
    let stats = fl.server().index().stats();
    let m = Memory {
        services,
        endpoints: services * MEMORY_ENDPOINTS,
        rss_server,
        rss_cache,
        rss_index,
        index_ms,
        rss_churned,
        churn_ms,
        rss_trimmed: vm_kib("VmRSS"),
        hwm,
        names: stats.names,
        records: stats.records,
    };
    println!("MEMORY {}", serde_json::to_string(&m)?);
    drop(fl);
    Ok(())
}

// ---------------------------------------------------------------------------
// Report

fn print_table(
    runs: &BTreeMap<(String, &'static str), Vec<Run>>,
    peers: &[&'static str],
    rates: &[u64],
) {
    // The best round of a max-rate run (and that round's latency and CPU),
    // and the round with the median p99 at each fixed rate.
    let get = |kind: &str, label: &'static str| -> Option<&Run> {
        let all = runs.get(&(kind.to_string(), label))?;
        if kind.starts_with("fixed") {
            let mut by_p99: Vec<&Run> = all.iter().collect();
            by_p99.sort_by(|a, b| {
                let p = |r: &Run| r.percentile(0.99).unwrap_or(f64::MAX);
                p(a).total_cmp(&p(b))
            });
            return by_p99.get(by_p99.len() / 2).copied();
        }
        all.iter().max_by(|a, b| a.load.qps.total_cmp(&b.load.qps))
    };
    type Pick = fn(&Run) -> Option<f64>;
    let qps: Pick = |r| Some(r.load.qps);
    let avg: Pick = |r| Some(r.load.avg_ms);
    let cpu: Pick = |r| Some(r.us_per_query());
    let p50: Pick = |r| r.percentile(0.5);
    let p99: Pick = |r| r.percentile(0.99);
    let mut spec: Vec<(String, String, Pick, usize)> = vec![
        ("max q/s (best round)".into(), "max".into(), qps, 0),
        ("  avg latency at max q/s, ms".into(), "max".into(), avg, 3),
        ("  server CPU per query, us".into(), "max".into(), cpu, 2),
    ];
    for rate in rates {
        let kind = format!("fixed {rate}");
        spec.push((format!("q/s at -Q {rate}"), kind.clone(), qps, 0));
        spec.push((
            format!("  p50 latency at {rate} q/s, ms"),
            kind.clone(),
            p50,
            3,
        ));
        spec.push((
            format!("  p99 latency at {rate} q/s, ms"),
            kind.clone(),
            p99,
            3,
        ));
        spec.push((
            format!("  avg latency at {rate} q/s, ms"),
            kind.clone(),
            avg,
            3,
        ));
        spec.push((
            format!("  server CPU per query at {rate} q/s, us"),
            kind,
            cpu,
            2,
        ));
    }
    spec.push((
        "forwarded names, cached: max q/s".into(),
        "forwarded".into(),
        qps,
        0,
    ));
    spec.push((
        "  server CPU per query, us".into(),
        "forwarded".into(),
        cpu,
        2,
    ));
    let mut header = vec!["metric".to_string(), "fairlead".to_string()];
    for p in peers {
        header.push(p.to_string());
        header.push(format!("fairlead/{p}"));
    }
    let mut rows = vec![header];
    for (name, kind, pick, prec) in spec {
        let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.prec$}"));
        let f = get(&kind, "fairlead").and_then(pick);
        let mut row = vec![name, cell(f)];
        for p in peers {
            let d = get(&kind, p).and_then(pick);
            row.push(cell(d));
            row.push(match (f, d) {
                (Some(f), Some(d)) if d > 0.0 => format!("{:.2}x", f / d),
                _ => "-".into(),
            });
        }
        rows.push(row);
    }
    let lost: u64 = runs.values().flatten().map(|r| r.load.lost).sum();
    print_rows(&rows);
    println!(
        "  (ratios: > 1 is better for q/s, < 1 is better for latency and CPU; {lost} queries \
         lost over all runs; forwarded names: dnsmasq only)"
    );
}
