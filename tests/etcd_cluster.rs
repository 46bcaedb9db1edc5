//! `EtcdStore` on a real 3-member etcd cluster: losing one member (which
//! etcd tolerates, 2 of 3 keep quorum) must not cost more than the write
//! that was in flight on it, and the store must find the live members by
//! itself, as kube-apiserver's etcd client does.
//!
//! Each test starts its own cluster on loopback ports; the tests take turns
//! (three clusters fsyncing at once on a small machine would make leader
//! elections, and so the timings measured here, noisy). Nothing sleeps to
//! synchronise: waits are polls with deadlines.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::EtcdCluster;
use fairlead::store::etcd::EtcdStore;
use fairlead::store::{
    Compare, KeyValue, Revision, Store, StoreError, Txn, TxnOutcome, WatchItem, WatchStream,
};
use futures::StreamExt;

/// The tests take turns (see module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the tests write.
const PREFIX: &str = "/registry/configmaps/failover/";

/// Upper bound for anything that should happen "soon" (a member catching
/// up, a watch delivering), so a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(30);

/// A write the test made, and what happened to it.
#[derive(Debug)]
struct Write {
    key: String,
    value: Vec<u8>,
    started: Instant,
    took: Duration,
    /// The commit revision, or why the store gave up on it.
    result: Result<Revision, String>,
}

/// Write `count` new keys one after another, each as a create-if-absent
/// transaction, publishing the number acknowledged so far on `acked`.
///
/// A create-if-absent can only come back `Failed` if its key already exists,
/// i.e. if the store ran one transaction twice: that fails the test at once.
async fn write_keys(
    store: Arc<EtcdStore>,
    tag: &'static str,
    count: usize,
    acked: tokio::sync::watch::Sender<usize>,
) -> Vec<Write> {
    let mut writes = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("{PREFIX}{tag}-{i:03}");
        let value = format!("value of {tag} {i}").into_bytes();
        let txn = Txn::new()
            .when(Compare::Absent(key.clone()))
            .put(key.clone(), value.clone());
        let started = Instant::now();
        let outcome = tokio::time::timeout(WAIT, store.txn(txn))
            .await
            .unwrap_or_else(|_| panic!("write of {key} hung for {WAIT:?}"));
        let took = started.elapsed();
        let result = match outcome {
            Ok(TxnOutcome::Committed { revision, .. }) => Ok(revision),
            Ok(TxnOutcome::Failed { failed }) => {
                panic!("{key} already existed, so a transaction ran twice: {failed:?}")
            }
            Err(StoreError::Unavailable(why)) => Err(why),
            Err(e) => panic!("write of {key}: unexpected error {e}"),
        };
        if result.is_ok() {
            acked.send_modify(|n| *n += 1);
        }
        writes.push(Write {
            key,
            value,
            started,
            took,
            result,
        });
    }
    writes
}

/// What a run of writes around a kill looked like (printed, and asserted on
/// by the callers).
struct Report {
    failed: Vec<String>,
    /// Writes that started after the kill.
    after: usize,
    /// From the kill to the first acknowledged write that started after it.
    failover: Duration,
    slowest: Duration,
}

fn report(what: &str, writes: &[Write], killed_at: Instant) -> Report {
    let failed: Vec<String> = writes
        .iter()
        .filter_map(|w| w.result.as_ref().err().map(|e| format!("{}: {e}", w.key)))
        .collect();
    let first_ok_after = writes
        .iter()
        .find(|w| w.started >= killed_at && w.result.is_ok())
        .map(|w| w.started + w.took - killed_at)
        .expect("no write succeeded after the kill");
    let slowest = writes.iter().map(|w| w.took).max().unwrap_or_default();
    let after = writes.iter().filter(|w| w.started >= killed_at).count();
    eprintln!(
        "{what}: {} writes, {after} started after the kill, {} not acknowledged {failed:?}; \
         first write acknowledged {first_ok_after:?} after the kill; slowest write {slowest:?}",
        writes.len(),
        failed.len(),
    );
    Report {
        failed,
        after,
        failover: first_ok_after,
        slowest,
    }
}

/// Every acknowledged write reads back with its value at its revision; an
/// unacknowledged one (outcome unknown) may or may not have committed, but
/// nothing else is under the prefix. Returns the prefix's contents.
async fn check_readback(store: &Arc<EtcdStore>, writes: &[Write]) -> Vec<KeyValue> {
    for w in writes {
        if let Ok(rev) = w.result {
            let kv = store
                .get(&w.key)
                .await
                .expect("read back")
                .unwrap_or_else(|| panic!("acknowledged write of {} was lost", w.key));
            assert_eq!(kv.value, w.value, "{}", w.key);
            assert_eq!(kv.mod_revision, rev, "{}", w.key);
        }
    }
    let store: Arc<dyn Store> = store.clone();
    let all = store.list_all(PREFIX).await.expect("list").kvs;
    let written: BTreeMap<&str, &Write> = writes.iter().map(|w| (w.key.as_str(), w)).collect();
    for kv in &all {
        let w = written
            .get(kv.key.as_str())
            .unwrap_or_else(|| panic!("{} was never written", kv.key));
        assert_eq!(kv.value, w.value, "{}", kv.key);
    }
    all
}

/// The leader's index, as the live members see it.
async fn leader(cluster: &EtcdCluster, live: &[usize]) -> usize {
    let mut ids = BTreeMap::new();
    let mut leader = None;
    for &i in live {
        let mut client = etcd_client::Client::connect([cluster.endpoint(i)], None)
            .await
            .expect("status client");
        let status = client.status().await.expect("member status");
        ids.insert(status.header().expect("header").member_id(), i);
        leader = Some(status.leader());
    }
    let leader = leader.expect("no live member");
    *ids.get(&leader)
        .expect("the leader is not among the live members")
}

/// Follow `watch` (a watch of `PREFIX` from `after`) until revision `until`
/// is covered, the way an API server's watch cache does: when the stream
/// ends with `Unavailable`, watch again from the last revision seen. Returns
/// the events and how many times the watch had to be re-opened.
async fn follow(
    store: Arc<EtcdStore>,
    mut watch: WatchStream,
    after: Revision,
    mut until: tokio::sync::watch::Receiver<Revision>,
) -> (Vec<KeyValue>, usize) {
    let mut seen = after;
    let mut events = Vec::new();
    let mut reopened = 0;
    loop {
        if seen >= *until.borrow() {
            return (events, reopened);
        }
        let item = tokio::select! {
            item = watch.next() => item,
            // The target moved: check it again.
            _ = until.changed() => continue,
        };
        match item {
            Some(Ok(WatchItem::Event(ev))) => {
                assert!(ev.kv.mod_revision > seen, "watch went back in time: {ev:?}");
                seen = ev.kv.mod_revision;
                events.push(ev.kv);
            }
            Some(Ok(WatchItem::Progress(rev))) => seen = seen.max(rev),
            Some(Err(StoreError::Unavailable(why))) => {
                eprintln!("watch ended at revision {seen}: {why}; watching again");
                reopened += 1;
                let start = Instant::now();
                watch = loop {
                    match store.watch(PREFIX, seen).await {
                        Ok(w) => break w,
                        Err(StoreError::Unavailable(why)) if start.elapsed() < WAIT => {
                            eprintln!("re-watch failed, retrying: {why}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("re-watch from {seen}: {e}"),
                    }
                };
                eprintln!("re-watched in {:?}", start.elapsed());
            }
            Some(Err(e)) => panic!("watch failed: {e}"),
            None => panic!("watch ended without an error"),
        }
    }
}

/// The member the store uses dies mid-stream (a follower, so only the store
/// has to react, not raft): at most the write in flight on it is lost, the
/// others go to a live member within a bounded time, a watch resumes from
/// its last revision without gaps, and the member catches up after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_losing_the_member_in_use() {
    let _turn = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start(3);
    // Put a follower first, so the store uses it.
    let lead = leader(&cluster, &[0, 1, 2]).await;
    let victim = (lead + 1) % 3;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(victim);
    let store = Arc::new(EtcdStore::connect(&endpoints).await.expect("connect"));
    assert_eq!(store.current_endpoint(), cluster.endpoint(victim));
    assert_eq!(store.describe(), format!("etcd at {}", endpoints.join(",")));

    // A watch opened before the writes, on the member that will die, and
    // followed while they run.
    let start_rev = store.current_revision().await.expect("revision");
    let watch = store.watch(PREFIX, start_rev).await.expect("watch");
    let (until_tx, until_rx) = tokio::sync::watch::channel(Revision::MAX);
    let follower = tokio::spawn(follow(store.clone(), watch, start_rev, until_rx));

    // 90 writes one after another; the member in use dies after the 30th
    // is acknowledged, while the writer keeps going.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0);
    let writer = tokio::spawn(write_keys(store.clone(), "a", 90, acked_tx));
    acked_rx.wait_for(|n| *n >= 30).await.expect("writer died");
    assert_eq!(
        store.current_endpoint(),
        cluster.endpoint(victim),
        "the store moved before the kill"
    );
    cluster.kill(victim);
    let killed_at = Instant::now();
    let writes = writer.await.expect("writer");

    let r = report("follower in use killed", &writes, killed_at);
    assert!(r.after >= 50, "only {} writes after the kill", r.after);
    // The only write that may be lost is the one in flight on the member
    // when it died: its outcome is unknown, so it must not be retried.
    assert!(
        r.failed.len() <= 1,
        "more than the in-flight write failed: {:?}",
        r.failed
    );
    assert!(
        r.failover < Duration::from_secs(5),
        "failover took {:?}",
        r.failover
    );
    assert!(
        r.slowest < Duration::from_secs(5),
        "slowest write {:?}",
        r.slowest
    );
    assert_ne!(store.current_endpoint(), cluster.endpoint(victim));
    let all = check_readback(&store, &writes).await;
    assert!(all.len() >= 89, "{} keys", all.len());

    // The watch saw every change exactly once, in order, across the kill.
    let last = all.iter().map(|kv| kv.mod_revision).max().expect("keys");
    until_tx.send(last).expect("follower gone");
    let (events, reopened) = tokio::time::timeout(WAIT, follower)
        .await
        .expect("watch did not catch up")
        .expect("follower task");
    eprintln!(
        "watch: {} events, re-opened {reopened} time(s)",
        events.len()
    );
    let mut expected = all.clone();
    expected.sort_by_key(|kv| kv.mod_revision);
    assert_eq!(events, expected, "watch missed or repeated changes");

    // The killed member comes back on its data and catches up: a store that
    // can only talk to it reads the latest keys.
    cluster.restart(victim);
    let alone = poll(WAIT, || async {
        EtcdStore::connect(&[cluster.endpoint(victim).to_owned()])
            .await
            .ok()
    })
    .await
    .expect("restarted member does not answer");
    let alone: Arc<dyn Store> = Arc::new(alone);
    let caught_up = poll(WAIT, || async {
        let page = alone.list_all(PREFIX).await.ok()?;
        (page.kvs == all).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "restarted member did not catch up");

    // And the original store still works, wherever it is now.
    let writes = write_keys(store.clone(), "b", 5, tokio::sync::watch::channel(0).0).await;
    assert!(writes.iter().all(|w| w.result.is_ok()), "{writes:?}");
}

/// The member in use is the leader: the store must fail over and also ride
/// through the election. etcd itself makes one more write ambiguous here: a
/// follower that has not yet noticed the leader is gone forwards the write
/// to it, and after ~7 s answers "request timed out, possibly due to
/// previous leader failure", which it cannot tell apart from a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_losing_the_leader_in_use() {
    let _turn = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start(3);
    let victim = leader(&cluster, &[0, 1, 2]).await;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(victim);
    let store = Arc::new(EtcdStore::connect(&endpoints).await.expect("connect"));
    assert_eq!(store.current_endpoint(), cluster.endpoint(victim));

    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0);
    let writer = tokio::spawn(write_keys(store.clone(), "l", 60, acked_tx));
    acked_rx.wait_for(|n| *n >= 20).await.expect("writer died");
    cluster.kill(victim);
    let killed_at = Instant::now();
    let writes = writer.await.expect("writer");

    let r = report("leader in use killed", &writes, killed_at);
    assert!(r.after >= 30, "only {} writes after the kill", r.after);
    assert!(
        r.failed.len() <= 2,
        "more than the in-flight write and one forwarded to the dead leader failed: {:?}",
        r.failed
    );
    // etcd's request timeout (~7 s) plus an election, with slack.
    assert!(
        r.slowest < Duration::from_secs(12),
        "slowest write {:?}",
        r.slowest
    );
    assert!(
        r.failover < Duration::from_secs(15),
        "failover took {:?}",
        r.failover
    );
    check_readback(&store, &writes).await;
    let lead = leader(&cluster, &[(victim + 1) % 3, (victim + 2) % 3]).await;
    assert_ne!(lead, victim);
}

/// `connect` needs one live member with quorum, and fails clearly and in
/// bounded time when there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_needs_one_live_member() {
    let _turn = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start(3);
    // A follower first, so losing it does not also start an election.
    let first = (leader(&cluster, &[0, 1, 2]).await + 1) % 3;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(first);
    let store = EtcdStore::connect(&endpoints).await.expect("connect");

    // The first member is down: connect still succeeds, on another one.
    cluster.kill(first);
    let started = Instant::now();
    let second = EtcdStore::connect(&endpoints)
        .await
        .expect("connect with one member down");
    eprintln!(
        "connect with the first member down: {:?}",
        started.elapsed()
    );
    assert_ne!(second.current_endpoint(), cluster.endpoint(first));
    assert!(started.elapsed() < Duration::from_secs(5));

    // The whole cluster is down.
    for i in 0..3 {
        cluster.kill(i);
    }
    let started = Instant::now();
    match EtcdStore::connect(&endpoints).await {
        Ok(_) => panic!("connected to a dead cluster"),
        Err(StoreError::Unavailable(msg)) => {
            eprintln!(
                "connect to a dead cluster failed after {:?}: {msg}",
                started.elapsed()
            );
            for e in &endpoints {
                assert!(msg.contains(e.as_str()), "{msg} does not name {e}");
            }
            assert!(msg.contains("refused"), "{msg}");
        }
        Err(e) => panic!("expected Unavailable, got {e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));

    // An existing store reports it too, in bounded time, for reads and writes.
    let started = Instant::now();
    match store.get("/registry/anything").await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let store: Arc<dyn Store> = Arc::new(store);
    match store.create("/registry/anything", b"x".to_vec()).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Call `f` until it returns `Some`, or give up after `limit`.
async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
