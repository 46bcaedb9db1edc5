//! One conformance suite for every [`Store`] backend.
//!
//! The API server is written once against the trait, so the backends must be
//! indistinguishable through it. Each `async fn` below takes an
//! `Arc<dyn Store>` and knows nothing about the backend; `conformance_tests!`
//! generates one `#[tokio::test]` per function in `mod embedded` (SQLite in a
//! temp dir) and in `mod etcd` (a private etcd process per test, so exact
//! revisions and compaction are not disturbed by other tests).
//!
//! Nothing here sleeps to synchronise: watch reads are bounded by
//! [`WAIT`] and polls have deadlines.

mod common;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use fairlead::store::{
    Compare, Event, EventKind, KeyValue, ListOptions, ListPage, Revision, Store, StoreError, Txn,
    TxnOutcome, WatchItem, WatchStream,
};
use futures::StreamExt;

/// Upper bound for one expected watch item or one store call to arrive.
const WAIT: Duration = Duration::from_secs(10);

/// A store under test and whatever must outlive it (etcd process, temp dir).
type Backend = (Arc<dyn Store>, Box<dyn Any + Send>);

async fn open_etcd() -> Backend {
    let etcd = common::Etcd::start();
    let store = fairlead::store::etcd::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to test etcd");
    (Arc::new(store), Box::new(etcd))
}

async fn open_embedded() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = fairlead::store::embedded::EmbeddedStore::open(&dir.path().join("store.db"))
        .await
        .expect("open embedded store");
    (Arc::new(store), Box::new(dir))
}

/// One `#[tokio::test]` per suite function, for the backend `$open` makes.
macro_rules! conformance_tests {
    ($open:path) => {
        conformance_tests!(@each $open;
            revision_bumps_by_one_per_committed_txn,
            create_if_absent_returns_existing,
            update_with_stale_revision_fails_and_returns_current,
            delete_with_and_without_expected_revision,
            multi_op_txn_is_atomic,
            failed_lists_only_failed_compares_with_current_values,
            get_missing_is_none,
            list_pages_stay_consistent_at_a_fixed_revision,
            list_at_old_revision_sees_old_values,
            list_at_future_revision_fails,
            list_excludes_sibling_prefix,
            watch_replays_history_then_live_events,
            watch_delete_carries_last_value_and_delete_revision,
            watch_reports_prev_values,
            watch_only_sees_its_prefix,
            compaction_makes_old_revisions_unavailable,
            concurrent_cas_loses_no_update,
            idle_watch_reports_progress,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let (store, _guard) = $open().await;
                super::$name(store).await;
            }
        )*
    };
}

mod embedded {
    conformance_tests!(super::open_embedded);
}

mod etcd {
    conformance_tests!(super::open_etcd);

    use super::*;

    /// etcd only: an acknowledged write survives SIGKILL, a watch ends with
    /// an error when etcd dies, and the store reconnects by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn survives_etcd_crash() {
        let mut etcd = common::Etcd::start();
        let store: Arc<dyn Store> = Arc::new(
            fairlead::store::etcd::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
                .await
                .expect("connect"),
        );
        let key = "/registry/pods/ns/durable";
        let rev = store.create(key, b"v1".to_vec()).await.unwrap().unwrap();
        let mut watch = store.watch("/registry/pods/", rev).await.unwrap();

        etcd.kill9();
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match watch.next().await {
                    Some(Err(_)) => break,
                    Some(Ok(WatchItem::Progress(_))) => continue,
                    other => panic!("expected the watch to fail, got {other:?}"),
                }
            }
            assert!(
                watch.next().await.is_none(),
                "stream must end after its error"
            );
        })
        .await;
        assert!(ended.is_ok(), "watch did not notice etcd dying");
        match tokio::time::timeout(Duration::from_secs(30), store.get(key)).await {
            Ok(Err(StoreError::Unavailable(_))) | Err(_) => {}
            Ok(other) => panic!("expected etcd to be unavailable, got {other:?}"),
        }

        etcd.restart();
        let kv = poll(Duration::from_secs(30), || async {
            match store.get(key).await {
                Ok(kv) => Some(kv),
                Err(StoreError::Unavailable(_)) => None,
                Err(e) => panic!("get after restart: {e}"),
            }
        })
        .await
        .expect("etcd did not come back")
        .expect("acknowledged write lost after kill -9");
        assert_eq!(kv.value, b"v1");
        assert_eq!(kv.mod_revision, rev);

        let mut watch = store.watch("/registry/pods/", rev - 1).await.unwrap();
        let ev = next_event(&mut watch).await;
        assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Put, key));
    }

    /// Connecting to nothing fails fast with a clear `Unavailable`.
    #[tokio::test]
    async fn connect_to_nothing_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let res =
            fairlead::store::etcd::EtcdStore::connect(&[format!("http://127.0.0.1:{port}")]).await;
        match res {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains("etcd"), "{msg}"),
            Err(e) => panic!("expected Unavailable, got {e}"),
            Ok(_) => panic!("connected to nothing"),
        }
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}

// ---------------------------------------------------------------- helpers

fn val(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn kv(key: &str, value: &str, create_revision: Revision, mod_revision: Revision) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: val(value),
        create_revision,
        mod_revision,
    }
}

async fn create(store: &Arc<dyn Store>, key: &str, value: &str) -> Revision {
    store
        .create(key, val(value))
        .await
        .expect("create")
        .unwrap_or_else(|existing| panic!("{key} already exists: {existing:?}"))
}

async fn update(store: &Arc<dyn Store>, key: &str, value: &str, expected: Revision) -> Revision {
    store
        .update(key, val(value), expected)
        .await
        .expect("update")
        .unwrap_or_else(|current| panic!("{key} changed under us: {current:?}"))
}

async fn committed(store: &Arc<dyn Store>, txn: Txn) -> (Revision, Vec<Option<KeyValue>>) {
    match store.txn(txn).await.expect("txn") {
        TxnOutcome::Committed { revision, prev } => (revision, prev),
        TxnOutcome::Failed { failed } => panic!("txn failed: {failed:?}"),
    }
}

async fn failed(store: &Arc<dyn Store>, txn: Txn) -> Vec<(Compare, Option<KeyValue>)> {
    match store.txn(txn).await.expect("txn") {
        TxnOutcome::Failed { failed } => failed,
        other => panic!("txn should have failed: {other:?}"),
    }
}

async fn list(store: &Arc<dyn Store>, prefix: &str, opts: ListOptions) -> ListPage {
    store.list(prefix, opts).await.expect("list")
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// The next event of a watch, skipping progress notices; fails the test if
/// none arrives within [`WAIT`] or the stream errors.
async fn next_event(watch: &mut WatchStream) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            match watch.next().await {
                Some(Ok(WatchItem::Event(ev))) => return ev,
                Some(Ok(WatchItem::Progress(_))) => continue,
                Some(Err(e)) => panic!("watch failed: {e}"),
                None => panic!("watch ended"),
            }
        }
    })
    .await
    .expect("no watch event in time")
}

fn summary(ev: &Event) -> (EventKind, &str, &[u8], Revision) {
    (
        ev.kind,
        ev.kv.key.as_str(),
        ev.kv.value.as_slice(),
        ev.kv.mod_revision,
    )
}

/// Call `f` until it returns `Some`, or give up after `limit`.
async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- the suite

async fn revision_bumps_by_one_per_committed_txn(store: Arc<dyn Store>) {
    let (a, b, c) = (
        "/registry/pods/ns/a",
        "/registry/pods/ns/b",
        "/registry/pods/ns/c",
    );
    let r0 = store.current_revision().await.unwrap();
    let r1 = create(&store, a, "a").await;
    assert_eq!(r1, r0 + 1);
    assert_eq!(store.current_revision().await.unwrap(), r1);

    // Several ops, one revision.
    let (r2, _) = committed(
        &store,
        Txn::new().put(b, val("b")).put(c, val("c")).delete(a),
    )
    .await;
    assert_eq!(r2, r1 + 1);
    assert_eq!(store.get(b).await.unwrap(), Some(kv(b, "b", r2, r2)));
    assert_eq!(store.get(c).await.unwrap(), Some(kv(c, "c", r2, r2)));
    assert_eq!(store.get(a).await.unwrap(), None);

    // A failed txn does not bump.
    failed(
        &store,
        Txn::new().when(Compare::Absent(b.into())).put(b, val("x")),
    )
    .await;
    assert_eq!(store.current_revision().await.unwrap(), r2);

    // A successful txn without ops does not bump either.
    let (rev, prev) = committed(&store, Txn::new().when(Compare::Present(b.into()))).await;
    assert_eq!(rev, r2);
    assert!(prev.is_empty());
    assert_eq!(store.current_revision().await.unwrap(), r2);

    // An unconditional write does.
    let (r3, prev) = committed(&store, Txn::new().put(b, val("b2"))).await;
    assert_eq!(r3, r2 + 1);
    assert_eq!(prev, vec![Some(kv(b, "b", r2, r2))]);
    assert_eq!(store.current_revision().await.unwrap(), r3);
}

async fn create_if_absent_returns_existing(store: Arc<dyn Store>) {
    let key = "/registry/configmaps/ns/cm";
    let rev = create(&store, key, "first").await;
    let existing = store
        .create(key, val("second"))
        .await
        .unwrap()
        .expect_err("second create must not overwrite");
    assert_eq!(existing, kv(key, "first", rev, rev));
    assert_eq!(
        store.get(key).await.unwrap(),
        Some(kv(key, "first", rev, rev))
    );
    assert_eq!(store.current_revision().await.unwrap(), rev);
}

async fn update_with_stale_revision_fails_and_returns_current(store: Arc<dyn Store>) {
    let key = "/registry/configmaps/ns/cm";
    let r1 = create(&store, key, "v1").await;
    let r2 = update(&store, key, "v2", r1).await;
    assert_eq!(r2, r1 + 1);

    let current = store
        .update(key, val("v3"), r1)
        .await
        .unwrap()
        .expect_err("stale update must fail");
    assert_eq!(current, Some(kv(key, "v2", r1, r2)));
    assert_eq!(store.get(key).await.unwrap(), Some(kv(key, "v2", r1, r2)));

    let missing = store
        .update("/registry/configmaps/ns/nope", val("x"), r1)
        .await
        .unwrap()
        .expect_err("update of a missing key must fail");
    assert_eq!(missing, None);
    assert_eq!(store.current_revision().await.unwrap(), r2);
}

async fn delete_with_and_without_expected_revision(store: Arc<dyn Store>) {
    let key = "/registry/secrets/ns/s";
    let missing = "/registry/secrets/ns/missing";
    assert_eq!(store.delete(missing, None).await.unwrap(), Err(None));
    assert_eq!(store.delete(missing, Some(1)).await.unwrap(), Err(None));

    let r1 = create(&store, key, "v1").await;
    let r2 = update(&store, key, "v2", r1).await;
    assert_eq!(
        store.delete(key, Some(r1)).await.unwrap(),
        Err(Some(kv(key, "v2", r1, r2))),
        "delete with a stale revision must fail with the current value"
    );
    let (rd, last) = store.delete(key, Some(r2)).await.unwrap().unwrap();
    assert_eq!(rd, r2 + 1);
    assert_eq!(last, kv(key, "v2", r1, r2));
    assert_eq!(store.get(key).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), rd);

    let r3 = create(&store, key, "again").await;
    assert_eq!(r3, rd + 1, "re-creating a deleted key is a fresh key");
    let (rd2, last) = store.delete(key, None).await.unwrap().unwrap();
    assert_eq!(rd2, r3 + 1);
    assert_eq!(last, kv(key, "again", r3, r3));
    assert_eq!(store.get(key).await.unwrap(), None);
}

async fn multi_op_txn_is_atomic(store: Arc<dyn Store>) {
    let (x, y, z) = (
        "/registry/services/ns/x",
        "/registry/services/ns/y",
        "/registry/services/ns/z",
    );
    let ry = create(&store, y, "y1").await;
    let rz = create(&store, z, "z1").await;
    let ry2 = update(&store, y, "y2", ry).await;
    let before = store.current_revision().await.unwrap();

    // One stale compare among holding ones: nothing is written.
    let txn = |expected_y| {
        Txn::new()
            .when(Compare::Absent(x.into()))
            .when(Compare::ModRevision(y.into(), expected_y))
            .when(Compare::Present(z.into()))
            .put(x, val("x1"))
            .put(y, val("y3"))
            .delete(z)
    };
    let fails = failed(&store, txn(ry)).await;
    assert_eq!(
        fails,
        vec![(
            Compare::ModRevision(y.into(), ry),
            Some(kv(y, "y2", ry, ry2))
        )]
    );
    assert_eq!(store.get(x).await.unwrap(), None);
    assert_eq!(store.get(y).await.unwrap(), Some(kv(y, "y2", ry, ry2)));
    assert_eq!(store.get(z).await.unwrap(), Some(kv(z, "z1", rz, rz)));
    assert_eq!(store.current_revision().await.unwrap(), before);

    // All hold: everything is written at one revision, prev per op.
    let (rev, prev) = committed(&store, txn(ry2)).await;
    assert_eq!(rev, before + 1);
    assert_eq!(
        prev,
        vec![None, Some(kv(y, "y2", ry, ry2)), Some(kv(z, "z1", rz, rz))]
    );
    assert_eq!(store.get(x).await.unwrap(), Some(kv(x, "x1", rev, rev)));
    assert_eq!(store.get(y).await.unwrap(), Some(kv(y, "y3", ry, rev)));
    assert_eq!(store.get(z).await.unwrap(), None);
}

async fn failed_lists_only_failed_compares_with_current_values(store: Arc<dyn Store>) {
    let k = |n: &str| format!("/registry/ipallocations/{n}");
    let ra = create(&store, &k("a"), "a").await;
    let rb = create(&store, &k("b"), "b").await;
    let rc = create(&store, &k("c"), "c").await;
    let before = store.current_revision().await.unwrap();

    let fails = failed(
        &store,
        Txn::new()
            .when(Compare::Present(k("a"))) // holds
            .when(Compare::Absent(k("b"))) // fails: b exists
            .when(Compare::ModRevision(k("c"), rc + 100)) // fails: stale
            .when(Compare::Absent(k("d"))) // holds
            .when(Compare::Present(k("e"))) // fails: e is missing
            .when(Compare::ModRevision(k("a"), ra)) // holds
            .when(Compare::ModRevision(k("f"), rb)) // fails: f is missing
            .put(k("d"), val("d")),
    )
    .await;
    assert_eq!(
        fails,
        vec![
            (Compare::Absent(k("b")), Some(kv(&k("b"), "b", rb, rb))),
            (
                Compare::ModRevision(k("c"), rc + 100),
                Some(kv(&k("c"), "c", rc, rc))
            ),
            (Compare::Present(k("e")), None),
            (Compare::ModRevision(k("f"), rb), None),
        ]
    );
    assert_eq!(store.get(&k("d")).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), before);
}

async fn get_missing_is_none(store: Arc<dyn Store>) {
    assert_eq!(store.get("/registry/pods/ns/a").await.unwrap(), None);
    create(&store, "/registry/pods/ns/ab", "x").await;
    // Neither a prefix nor an extension of an existing key matches.
    assert_eq!(store.get("/registry/pods/ns/a").await.unwrap(), None);
    assert_eq!(store.get("/registry/pods/ns/abc").await.unwrap(), None);
    assert!(store.get("/registry/pods/ns/ab").await.unwrap().is_some());
}

async fn list_pages_stay_consistent_at_a_fixed_revision(store: Arc<dyn Store>) {
    let prefix = "/registry/pods/ns/";
    let key = |i: usize| format!("{prefix}p{i:02}");
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(create(&store, &key(i), &format!("v{i}")).await);
    }

    let first = list(
        &store,
        prefix,
        ListOptions {
            limit: 3,
            ..Default::default()
        },
    )
    .await;
    let at = first.revision;
    assert_eq!(at, store.current_revision().await.unwrap());
    assert_eq!(keys(&first.kvs), [key(0), key(1), key(2)]);
    assert!(first.more);

    // Writes between pages must not show up in the rest of the listing.
    update(&store, &key(5), "changed", revs[5]).await;
    store.delete(&key(7), None).await.unwrap().unwrap();
    create(&store, &key(10), "new").await;
    create(&store, &format!("{prefix}p035"), "new").await;

    let mut all = first.kvs.clone();
    let mut pages = 1;
    let mut after = first.kvs.last().map(|kv| kv.key.clone());
    loop {
        let page = list(
            &store,
            prefix,
            ListOptions {
                limit: 3,
                after: after.clone(),
                revision: Some(at),
            },
        )
        .await;
        assert_eq!(page.revision, at);
        assert!(page.kvs.len() <= 3);
        pages += 1;
        after = page.kvs.last().map(|kv| kv.key.clone());
        all.extend(page.kvs);
        if !page.more {
            break;
        }
        assert!(pages < 10, "paging does not terminate");
    }
    assert_eq!(pages, 4);
    let expected: Vec<KeyValue> = (0..10)
        .map(|i| kv(&key(i), &format!("v{i}"), revs[i], revs[i]))
        .collect();
    assert_eq!(all, expected);

    // `more` is exact: a page that ends at the last key says so.
    let exact = list(
        &store,
        prefix,
        ListOptions {
            limit: 10,
            revision: Some(at),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(exact.kvs, expected);
    assert!(!exact.more);

    // The latest state, unpaged and paged by the helper.
    let latest = list(&store, prefix, ListOptions::default()).await;
    let want = [
        "p00", "p01", "p02", "p03", "p035", "p04", "p05", "p06", "p08", "p09", "p10",
    ]
    .map(|n| format!("{prefix}{n}"));
    assert_eq!(keys(&latest.kvs), want);
    assert!(!latest.more);
    assert_eq!(latest.revision, store.current_revision().await.unwrap());
    assert_eq!(latest.kvs[6].value, b"changed");
    let all_latest = store.list_all(prefix).await.unwrap();
    assert_eq!(all_latest.kvs, latest.kvs);
}

async fn list_at_old_revision_sees_old_values(store: Arc<dyn Store>) {
    let prefix = "/registry/deployments/";
    let a = "/registry/deployments/ns/a";
    let b = "/registry/deployments/ns/b";
    let r1 = create(&store, a, "v1").await;
    let r2 = update(&store, a, "v2", r1).await;
    create(&store, b, "b").await;

    let old = list(
        &store,
        prefix,
        ListOptions {
            revision: Some(r1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(old.kvs, vec![kv(a, "v1", r1, r1)]);
    assert_eq!(old.revision, r1);
    assert!(!old.more);

    store.delete(a, None).await.unwrap().unwrap();
    let mid = list(
        &store,
        prefix,
        ListOptions {
            revision: Some(r2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(mid.kvs, vec![kv(a, "v2", r1, r2)]);

    let now = list(&store, prefix, ListOptions::default()).await;
    assert_eq!(keys(&now.kvs), [b]);
}

async fn list_at_future_revision_fails(store: Arc<dyn Store>) {
    create(&store, "/registry/pods/ns/a", "a").await;
    let current = store.current_revision().await.unwrap();
    let res = store
        .list(
            "/registry/pods/",
            ListOptions {
                revision: Some(current + 10),
                ..Default::default()
            },
        )
        .await;
    match res {
        Err(StoreError::FutureRevision {
            requested,
            current: c,
        }) => {
            assert_eq!(requested, current + 10);
            assert_eq!(c, current);
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
}

async fn list_excludes_sibling_prefix(store: Arc<dyn Store>) {
    let inside = "/registry/services/ns/a";
    create(&store, inside, "in").await;
    for sibling in [
        "/registry/servicesx/ns/b",
        "/registry/services0",
        "/registry/services",
        "/registry/service/ns/c",
    ] {
        create(&store, sibling, "out").await;
    }

    let page = list(&store, "/registry/services/", ListOptions::default()).await;
    assert_eq!(keys(&page.kvs), [inside]);
    assert!(!page.more);
    let all = store.list_all("/registry/services/").await.unwrap();
    assert_eq!(keys(&all.kvs), [inside]);

    let rest = list(
        &store,
        "/registry/services/",
        ListOptions {
            after: Some(inside.into()),
            ..Default::default()
        },
    )
    .await;
    assert!(rest.kvs.is_empty());
    assert!(!rest.more);

    let x = list(&store, "/registry/servicesx/", ListOptions::default()).await;
    assert_eq!(keys(&x.kvs), ["/registry/servicesx/ns/b"]);
}

async fn watch_replays_history_then_live_events(store: Arc<dyn Store>) {
    let prefix = "/registry/pods/";
    let (a, b, c, d) = (
        "/registry/pods/ns/a",
        "/registry/pods/ns/b",
        "/registry/pods/ns/c",
        "/registry/pods/ns/d",
    );
    let r0 = store.current_revision().await.unwrap();
    let ra1 = create(&store, a, "a1").await;
    let ra2 = update(&store, a, "a2", ra1).await;
    let (rbc, _) = committed(&store, Txn::new().put(b, val("b1")).put(c, val("c1"))).await;

    let mut watch = store.watch(prefix, r0).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watch).await);
    }
    let got: Vec<_> = seen.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (EventKind::Put, a, &b"a1"[..], ra1),
            (EventKind::Put, a, &b"a2"[..], ra2),
            (EventKind::Put, b, &b"b1"[..], rbc),
            (EventKind::Put, c, &b"c1"[..], rbc),
        ]
    );

    // Live events follow, in commit order.
    let (rd, _) = store.delete(a, Some(ra2)).await.unwrap().unwrap();
    let rd2 = create(&store, d, "d1").await;
    let ev = next_event(&mut watch).await;
    assert_eq!(summary(&ev), (EventKind::Delete, a, &b"a2"[..], rd));
    let ev = next_event(&mut watch).await;
    assert_eq!(summary(&ev), (EventKind::Put, d, &b"d1"[..], rd2));

    // A watch from the middle of history starts right after `after`.
    let mut mid = store.watch(prefix, ra1).await.unwrap();
    let ev = next_event(&mut mid).await;
    assert_eq!(summary(&ev), (EventKind::Put, a, &b"a2"[..], ra2));

    // A watch from the current revision sees only what comes next.
    let now = store.current_revision().await.unwrap();
    let mut live = store.watch(prefix, now).await.unwrap();
    let re = create(&store, "/registry/pods/ns/e", "e1").await;
    let ev = next_event(&mut live).await;
    assert_eq!(
        summary(&ev),
        (EventKind::Put, "/registry/pods/ns/e", &b"e1"[..], re)
    );
}

async fn watch_delete_carries_last_value_and_delete_revision(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/gone";
    let rc = create(&store, key, "v1").await;
    let ru = update(&store, key, "v2", rc).await;
    let mut live = store.watch("/registry/pods/", ru).await.unwrap();
    let (rd, _) = store.delete(key, None).await.unwrap().unwrap();

    let expected = Event {
        kind: EventKind::Delete,
        kv: kv(key, "v2", rc, rd),
        prev: Some(kv(key, "v2", rc, ru)),
    };
    assert_eq!(next_event(&mut live).await, expected);
    // The same from history.
    let mut replay = store.watch("/registry/pods/", ru).await.unwrap();
    assert_eq!(next_event(&mut replay).await, expected);
}

async fn watch_reports_prev_values(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/p";
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/registry/pods/", start).await.unwrap();
    let r1 = create(&store, key, "v1").await;
    let r2 = update(&store, key, "v2", r1).await;

    let created = next_event(&mut watch).await;
    assert_eq!(created.kv, kv(key, "v1", r1, r1));
    assert_eq!(created.prev, None);
    let updated = next_event(&mut watch).await;
    assert_eq!(updated.kind, EventKind::Put);
    assert_eq!(updated.kv, kv(key, "v2", r1, r2));
    assert_eq!(updated.prev, Some(kv(key, "v1", r1, r1)));
}

async fn watch_only_sees_its_prefix(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/registry/services/", start).await.unwrap();
    for other in [
        "/registry/servicesx/ns/x",
        "/registry/services0",
        "/registry/services",
        "/registry/pods/ns/p",
    ] {
        create(&store, other, "out").await;
    }
    let r = create(&store, "/registry/services/ns/s", "in").await;
    create(&store, "/registry/servicesx/ns/y", "out").await;
    let r2 = create(&store, "/registry/services/ns/t", "in").await;

    let ev = next_event(&mut watch).await;
    assert_eq!(
        summary(&ev),
        (EventKind::Put, "/registry/services/ns/s", &b"in"[..], r)
    );
    let ev = next_event(&mut watch).await;
    assert_eq!(
        summary(&ev),
        (EventKind::Put, "/registry/services/ns/t", &b"in"[..], r2)
    );
}

async fn compaction_makes_old_revisions_unavailable(store: Arc<dyn Store>) {
    let prefix = "/registry/pods/";
    let a = "/registry/pods/ns/a";
    let b = "/registry/pods/ns/b";
    assert_eq!(store.compacted_revision().await.unwrap(), 0);
    let r1 = create(&store, a, "v1").await;
    let r2 = update(&store, a, "v2", r1).await;
    let r3 = create(&store, b, "b").await;

    store.compact(r2).await.unwrap();
    assert_eq!(store.compacted_revision().await.unwrap(), r2);

    let at = |revision| ListOptions {
        revision: Some(revision),
        ..Default::default()
    };
    match store.list(prefix, at(r1)).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, r1);
            assert_eq!(compacted, r2);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The compacted revision itself is still readable.
    let page = list(&store, prefix, at(r2)).await;
    assert_eq!(page.kvs, vec![kv(a, "v2", r1, r2)]);

    // Watching from before the compacted revision fails up front.
    for after in [r1 - 1, r1] {
        match store.watch(prefix, after).await {
            Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, r2),
            Err(e) => panic!("expected Compacted for a watch after {after}, got {e}"),
            Ok(_) => panic!("watch after {after} (compacted at {r2}) must fail"),
        }
    }
    // From the compacted revision on, history is intact.
    let mut watch = store.watch(prefix, r2).await.unwrap();
    let ev = next_event(&mut watch).await;
    assert_eq!(summary(&ev), (EventKind::Put, b, &b"b"[..], r3));

    // Compaction never goes backwards (whether compacting to an older
    // revision is a no-op or an error is left to the backend).
    match store.compact(r1).await {
        Ok(()) | Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("compact to an older revision: {e}"),
    }
    assert_eq!(store.compacted_revision().await.unwrap(), r2);
}

async fn concurrent_cas_loses_no_update(store: Arc<dyn Store>) {
    const TASKS: usize = 20;
    const INCREMENTS: usize = 5;
    let key = "/registry/counters/c";
    let start = create(&store, key, "0").await;

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut conflicts = 0usize;
                for _ in 0..INCREMENTS {
                    let mut current = store.get(key).await.unwrap().expect("counter exists");
                    loop {
                        let n: usize = String::from_utf8(current.value.clone())
                            .unwrap()
                            .parse()
                            .unwrap();
                        match store
                            .update(key, (n + 1).to_string().into_bytes(), current.mod_revision)
                            .await
                            .unwrap()
                        {
                            Ok(_) => break,
                            Err(now) => {
                                conflicts += 1;
                                current = now.expect("counter was deleted");
                            }
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("concurrent increments did not finish");
    for res in all {
        res.expect("task panicked");
    }

    let total = TASKS * INCREMENTS;
    let end = store.get(key).await.unwrap().unwrap();
    assert_eq!(end.value, total.to_string().into_bytes());
    assert_eq!(end.mod_revision, start + total as Revision);
    assert_eq!(store.current_revision().await.unwrap(), end.mod_revision);
}

async fn idle_watch_reports_progress(store: Arc<dyn Store>) {
    let r = create(&store, "/registry/pods/ns/a", "a").await;
    let mut watch = store.watch("/registry/pods/", r).await.unwrap();
    // Nothing else happens under the prefix, so the first item must be a
    // progress notice.
    let progress = match tokio::time::timeout(Duration::from_secs(15), watch.next()).await {
        Ok(Some(Ok(WatchItem::Progress(rev)))) => rev,
        Ok(Some(Ok(WatchItem::Event(ev)))) => panic!("unexpected event {ev:?}"),
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no progress notice on an idle watch within 15s"),
    };
    assert!(progress >= r, "progress {progress} is behind revision {r}");

    // Progress never runs ahead of events: a write after it still arrives.
    let r2 = create(&store, "/registry/pods/ns/b", "b").await;
    let ev = next_event(&mut watch).await;
    assert_eq!(ev.kv.mod_revision, r2);
}
