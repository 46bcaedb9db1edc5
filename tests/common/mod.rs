//! Helpers shared by integration tests (`mod common;`).
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

pub mod cluster;
pub mod lab;
pub mod netns;
pub mod python;
pub mod scenarios;
pub mod server;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` package installs etcd; `FAIRLEAD_TEST_ETCD`
/// overrides it.
const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a fresh (or restarted) etcd may take to become healthy.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Attempts at finding free ports before giving up (another process can grab
/// a port between our probe and etcd's bind).
const PORT_ATTEMPTS: usize = 5;

/// A private single-member etcd for one test, so tests can check exact
/// revisions, compact, and crash it without disturbing each other: a
/// one-member [`EtcdCluster`]. Killed and reaped on drop; its data directory
/// is removed with it.
pub struct Etcd {
    /// The client URL (`http://127.0.0.1:<port>`), for `EtcdStore::connect`.
    pub endpoint: String,
    cluster: EtcdCluster,
}

impl Etcd {
    /// Start etcd on free loopback ports with a fresh data directory and
    /// wait until it reports healthy.
    pub fn start() -> Etcd {
        let cluster = EtcdCluster::start(1);
        Etcd {
            endpoint: cluster.endpoint(0).to_string(),
            cluster,
        }
    }

    /// Crash etcd (SIGKILL, no chance to flush) and reap it. Committed writes
    /// must survive: etcd fsyncs before acknowledging.
    pub fn kill9(&mut self) {
        self.cluster.kill(0);
    }

    /// Start etcd again on the same data directory and ports (after
    /// [`Etcd::kill9`], or to bounce a running one).
    pub fn restart(&mut self) {
        self.cluster.restart(0);
    }

    /// etcd's process id (to stop it with SIGSTOP: a store that hangs).
    pub fn pid(&self) -> u32 {
        self.cluster.members[0]
            .child
            .as_ref()
            .expect("etcd running")
            .id()
    }

    /// The directory holding etcd's data and log.
    pub fn dir(&self) -> &Path {
        self.cluster.members[0].dir.path()
    }
}

/// A private etcd cluster of several members on loopback, for failover
/// tests: each member has its own ports and temp data directory, can be
/// crashed ([`EtcdCluster::kill`]) and restarted on the same data and ports.
/// Every member is killed and reaped on drop.
pub struct EtcdCluster {
    members: Vec<ClusterMember>,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique per cluster so two test clusters can
    /// never mistake each other's members for their own.
    token: String,
}

struct ClusterMember {
    name: String,
    endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterMember {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl EtcdCluster {
    /// Start `size` members on free loopback ports, each with a fresh data
    /// directory, and wait until every one reports healthy (has a leader).
    pub fn start(size: usize) -> EtcdCluster {
        assert!(size > 0, "a cluster needs members");
        let bin = etcd_bin();
        for attempt in 1..=PORT_ATTEMPTS {
            let mut ports = Vec::new();
            while ports.len() < 2 * size {
                let port = free_port();
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            let members: Vec<ClusterMember> = (0..size)
                .map(|i| ClusterMember {
                    name: format!("m{i}"),
                    endpoint: format!("http://127.0.0.1:{}", ports[2 * i]),
                    peer: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                    dir: tempfile::Builder::new()
                        .prefix(&format!("fairlead-etcd-m{i}-"))
                        .tempdir()
                        .expect("create etcd temp dir"),
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = EtcdCluster {
                members,
                initial_cluster,
                token: format!("fairlead-test-{}-{}", std::process::id(), ports[0]),
            };
            // Members need each other for quorum: start all, then wait.
            let started: Result<Vec<u64>, String> =
                (0..size).map(|i| cluster.spawn(&bin, i)).collect();
            let result = started.and_then(|offsets| {
                (0..size).try_for_each(|i| cluster.wait_healthy(i, offsets[i]))
            });
            match result {
                Ok(()) => return cluster,
                // Someone took a port: start over with new ports and fresh
                // data directories (the failed cluster is dropped).
                Err(why) if attempt < PORT_ATTEMPTS && why.contains("address already in use") => {}
                Err(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.members[i].endpoint
    }

    /// The index of the member with this client URL.
    pub fn index_of(&self, endpoint: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.endpoint == endpoint)
            .unwrap_or_else(|| panic!("{endpoint} is not a member of this cluster"))
    }

    /// Crash member `i` (SIGKILL) and reap it.
    pub fn kill(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Start member `i` again on its data directory and ports and wait until
    /// it is healthy (it has rejoined and knows the leader; it may still be
    /// catching up on the log).
    pub fn restart(&mut self, i: usize) {
        self.members[i].stop();
        let bin = etcd_bin();
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self
                .spawn(&bin, i)
                .and_then(|offset| self.wait_healthy(i, offset))
            {
                Ok(()) => return,
                Err(why) if why.contains("address already in use") => {
                    self.members[i].stop();
                    last = why;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(why) => panic!("etcd member {i} did not restart: {why}"),
            }
        }
        panic!("etcd member {i} did not restart: {last}");
    }

    /// Member `i`'s log (for failure messages).
    pub fn log(&self, i: usize) -> String {
        log_since(&self.members[i].log_path(), 0)
    }

    /// Start member `i`'s process; returns where its new log output begins.
    fn spawn(&mut self, bin: &Path, i: usize) -> Result<u64, String> {
        let (initial_cluster, token) = (self.initial_cluster.clone(), self.token.clone());
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())
            .expect("open etcd log");
        let log_offset = log.metadata().map(|l| l.len()).unwrap_or(0);
        // The --initial-cluster* flags only matter the first time; a restart
        // finds the membership in the data directory.
        let child = Command::new(bin)
            .arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                m.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", m.endpoint))
            .arg(format!("--advertise-client-urls={}", m.endpoint))
            .arg(format!("--listen-peer-urls={}", m.peer))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-token={token}"))
            .arg("--initial-cluster-state=new")
            .arg("--experimental-watch-progress-notify-interval=1s")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        m.child = Some(child);
        Ok(log_offset)
    }

    /// Wait until member `i` reports healthy, or fail with its log.
    fn wait_healthy(&mut self, i: usize, log_offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let m = &mut self.members[i];
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                return Err(format!(
                    "etcd member {i} exited with {status}; log:\n{}",
                    log_since(&m.log_path(), log_offset)
                ));
            }
            if etcd_healthy(&m.endpoint) {
                return Ok(());
            }
            if Instant::now() > deadline {
                m.stop();
                return Err(format!(
                    "etcd member {i} not healthy after {START_DEADLINE:?}; log:\n{}",
                    log_since(&m.log_path(), log_offset)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}

/// etcd's `/health` at a client URL says the member has a leader and serves
/// requests.
fn etcd_healthy(endpoint: &str) -> bool {
    let addr = endpoint.trim_start_matches("http://");
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// An etcd log from byte `offset` on.
fn log_since(path: &Path, offset: u64) -> String {
    let log = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(log.len());
    String::from_utf8_lossy(&log[start..]).into_owned()
}

fn etcd_bin() -> PathBuf {
    let bin = std::env::var_os("FAIRLEAD_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ETCD_BIN));
    if !bin.is_file() {
        panic!(
            "etcd not found at {}: run scripts/test, which installs etcd-server \
             (or set FAIRLEAD_TEST_ETCD to an etcd binary)",
            bin.display()
        );
    }
    bin
}

/// A loopback port that was free a moment ago (the OS picks it; we release
/// it for etcd, and retry if someone else takes it first).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
