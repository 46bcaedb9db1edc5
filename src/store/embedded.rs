//! The embedded store: SQLite in the data directory, no external process.
//!
//! Why SQLite: it is the most battle-tested embedded database there is, its
//! WAL mode with `synchronous=FULL` fsyncs every commit (an acknowledged write
//! survives `kill -9` and power loss), and k3s's kine has shown that etcd's
//! model maps onto it well. redb would also work, but SQLite's ordered
//! indexes and SQL make the historical reads below one query each.
//!
//! Layout (three tables):
//!
//! * `kv(key, create_rev, mod_rev, value)` — the latest value of every live
//!   key; what `get` and a list at the latest revision read.
//! * `log(rev, seq, key, create_rev, deleted, value, prev_rev)` — one row per
//!   write, kept until compaction. A delete row carries the last value (a
//!   Kubernetes DELETED watch event needs the object). Lists at a past
//!   revision pick, per key, the newest row at or below that revision; a
//!   watch that resumes after a reconnect replays rows after its revision.
//! * `meta(id=0, revision, compacted)` — the global revision counter.
//!
//! Writes go through one writer thread that takes every transaction queued
//! while the previous commit was fsyncing and commits them together (group
//! commit): each keeps its own revision, but many share one fsync. After the
//! commit the writer publishes the events to the [`Hub`], which feeds live
//! watches from memory; a watch that is too far behind (or falls behind)
//! catches up from the log table instead, so a slow watcher never blocks
//! writers and never misses an event.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    prefix_end, Compare, Event, EventKind, KeyValue, ListOptions, ListPage, Op, Result, Revision,
    Store, StoreError, Txn, TxnOutcome, WatchItem, WatchStream,
};

/// How much of the recent history the hub keeps in memory (value bytes of
/// the events, current and previous), for watches that start in the past
/// or fall behind the broadcast; older starts are replayed from the log
/// table. Generous, because a replay is a read of the database that
/// competes with the writer: a node that lags a bulk load by seconds
/// should catch up from memory.
const RING_BYTES: usize = 32 << 20;
/// At most this many queued transactions share one commit.
const MAX_BATCH: usize = 512;
/// An idle watch reports progress this often (the API server turns progress
/// into bookmarks).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// A [`Store`] kept in one SQLite database file. See the module docs.
pub struct EmbeddedStore {
    path: PathBuf,
    writer: std_mpsc::Sender<WriteRequest>,
    /// Dropped with the store: stops the checkpoint thread.
    _checkpoints: std_mpsc::Sender<()>,
    readers: Arc<Mutex<Vec<Connection>>>,
    hub: Arc<Mutex<Hub>>,
    current: Arc<AtomicI64>,
}

enum WriteRequest {
    Txn(Txn, oneshot::Sender<Result<TxnOutcome>>),
    Compact(Revision, oneshot::Sender<Result<()>>),
}

/// The events of one committed transaction (one revision).
struct Batch {
    revision: Revision,
    events: Vec<Event>,
    /// What it holds in memory, roughly: keys and values (counted once,
    /// for the ring's bound).
    bytes: usize,
}

impl Batch {
    fn new(revision: Revision, events: Vec<Event>) -> Batch {
        let kv = |kv: &KeyValue| kv.key.len() + kv.value.len() + 64;
        let bytes = events
            .iter()
            .map(|e| kv(&e.kv) + e.prev.as_ref().map_or(0, kv))
            .sum();
        Batch {
            revision,
            events,
            bytes,
        }
    }
}

/// Recent history in memory plus the broadcast that wakes live watches.
struct Hub {
    ring: VecDeque<Arc<Batch>>,
    /// `Batch::bytes` of the ring, bounded by [`RING_BYTES`].
    ring_bytes: usize,
    current: Revision,
    compacted: Revision,
    tx: broadcast::Sender<Arc<Batch>>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsynced on every commit, so an acknowledged write is
    // on disk before the caller hears about it.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    value BLOB NOT NULL,
    prev_rev INTEGER NOT NULL,
    PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_key_rev ON log (key, rev);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    revision INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (0, 1, 0);
";

fn key_string(bytes: Vec<u8>) -> rusqlite::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn read_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached("SELECT create_rev, mod_rev, value FROM kv WHERE key = ?1")?
        .query_row([key.as_bytes()], |r| {
            Ok(KeyValue {
                key: key.to_string(),
                create_revision: r.get(0)?,
                mod_revision: r.get(1)?,
                value: r.get(2)?,
            })
        })
        .optional()
}

fn read_meta(conn: &Connection) -> rusqlite::Result<(Revision, Revision)> {
    conn.query_row(
        "SELECT revision, compacted FROM meta WHERE id = 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// How often the WAL is checkpointed into the database: often, so each
/// checkpoint (and its fsync of the database, which the writer's fsyncs of
/// the WAL queue behind on one disk) stays small.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Checkpoint the WAL of the database at `path` every
/// [`CHECKPOINT_INTERVAL`] (PASSIVE: never blocks the writer or readers)
/// until `stop`'s sender is dropped (the store closed).
fn checkpoints(path: &Path, stop: std_mpsc::Receiver<()>) {
    let conn = match open_connection(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "store checkpoints: opening the database");
            return;
        }
    };
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let started = std::time::Instant::now();
        // (busy, frames in the WAL, frames checkpointed)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) => {
                let took = started.elapsed();
                if took > Duration::from_millis(100) {
                    tracing::debug!(?took, log, done, "slow store checkpoint");
                }
            }
            Err(e) => tracing::debug!(error = %e, "store checkpoint"),
        }
    }
}

impl EmbeddedStore {
    /// Open (or create) the database at `path` and start its writer thread.
    pub async fn open(path: &Path) -> Result<EmbeddedStore> {
        let path = path.to_path_buf();
        let p = path.clone();
        let (conn, revision, compacted) = tokio::task::spawn_blocking(move || {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(internal)?;
            }
            let conn = open_connection(&p).map_err(internal)?;
            conn.execute_batch(SCHEMA).map_err(internal)?;
            let (rev, compacted) = read_meta(&conn).map_err(internal)?;
            Ok::<_, StoreError>((conn, rev, compacted))
        })
        .await
        .map_err(internal)??;

        let (btx, _) = broadcast::channel(1024);
        let hub = Arc::new(Mutex::new(Hub {
            ring: VecDeque::new(),
            ring_bytes: 0,
            current: revision,
            compacted,
            tx: btx,
        }));
        let current = Arc::new(AtomicI64::new(revision));
        // The writer commits; checkpoints (copying the WAL into the
        // database, with its own fsync) run on another thread, so a commit
        // never waits for one (SQLite's automatic checkpoint runs inside the
        // commit that crosses its threshold: a stall of a whole batch).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(internal)?;
        let (ctx, crx) = std_mpsc::channel::<()>();
        let cpath = path.clone();
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoints(&cpath, crx))
            .map_err(internal)?;
        let (wtx, wrx) = std_mpsc::channel();
        let writer = Writer {
            conn,
            revision,
            hub: hub.clone(),
            current: current.clone(),
            metrics: WriterMetrics {
                commits: metrics::counter!("fairlead_store_commits_total"),
                transactions: metrics::counter!("fairlead_store_committed_transactions_total"),
                duration: metrics::histogram!("fairlead_store_commit_duration_seconds"),
            },
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(wrx))
            .map_err(internal)?;
        Ok(EmbeddedStore {
            path,
            writer: wtx,
            _checkpoints: ctx,
            readers: Arc::new(Mutex::new(Vec::new())),
            hub,
            current,
        })
    }

    /// Run `f` on a pooled read connection on the blocking thread pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap().pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => open_connection(&path).map_err(internal)?,
            };
            let out = f(&mut conn);
            readers.lock().unwrap().push(conn);
            out
        })
        .await
        .map_err(internal)?
    }

    async fn send(&self, req: WriteRequest) -> Result<()> {
        self.writer
            .send(req)
            .map_err(|_| StoreError::Unavailable("embedded store writer has stopped".into()))
    }
}

/// Reads the log rows of keys under `prefix` with `after < rev <= upto`, in
/// revision order, as watch events.
fn replay(
    conn: &Connection,
    prefix: &str,
    after: Revision,
    upto: Revision,
) -> rusqlite::Result<Vec<(Revision, Event)>> {
    let end = prefix_end(prefix);
    let mut stmt = conn.prepare_cached(
        "SELECT l.rev, l.key, l.create_rev, l.deleted, l.value, p.rev, p.create_rev, p.value
         FROM log l LEFT JOIN log p ON p.key = l.key AND p.rev = l.prev_rev AND p.deleted = 0
         WHERE l.rev > ?1 AND l.rev <= ?2 AND l.key >= ?3 AND l.key < ?4
         ORDER BY l.rev, l.seq",
    )?;
    let rows = stmt.query_map(params![after, upto, prefix.as_bytes(), end], |r| {
        let rev: Revision = r.get(0)?;
        let key = key_string(r.get(1)?)?;
        let deleted: bool = r.get(3)?;
        let prev_rev: Option<Revision> = r.get(5)?;
        let prev = match prev_rev {
            Some(pr) => Some(KeyValue {
                key: key.clone(),
                create_revision: r.get(6)?,
                mod_revision: pr,
                value: r.get(7)?,
            }),
            None => None,
        };
        Ok((
            rev,
            Event {
                kind: if deleted {
                    EventKind::Delete
                } else {
                    EventKind::Put
                },
                kv: KeyValue {
                    key,
                    create_revision: r.get(2)?,
                    mod_revision: rev,
                    value: r.get(4)?,
                },
                prev,
            },
        ))
    })?;
    rows.collect()
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteRequest::Txn(txn, tx)).await?;
        rx.await
            .map_err(|_| StoreError::Unavailable("embedded store writer has stopped".into()))?
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.read(move |c| read_kv(c, &key).map_err(internal)).await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        let prefix = prefix.to_string();
        self.read(move |conn| {
            // One read transaction: the revision and the rows come from the
            // same snapshot.
            let tx = conn.transaction().map_err(internal)?;
            let (current, compacted) = read_meta(&tx).map_err(internal)?;
            let end = prefix_end(&prefix);
            let start = match &opts.after {
                Some(a) if a.as_str() >= prefix.as_str() => {
                    let mut s = a.as_bytes().to_vec();
                    s.push(0);
                    s
                }
                _ => prefix.as_bytes().to_vec(),
            };
            let limit: i64 = if opts.limit == 0 {
                -1
            } else {
                opts.limit as i64 + 1
            };
            let mut kvs = match opts.revision {
                Some(rev) if rev > 0 && rev < current => {
                    if rev < compacted {
                        return Err(StoreError::Compacted {
                            requested: rev,
                            compacted,
                        });
                    }
                    // Per key, the newest row at or below `rev` (SQLite
                    // returns the bare columns of the MAX row), minus keys
                    // whose newest row is a delete.
                    let mut stmt = tx
                        .prepare_cached(
                            "SELECT key, create_rev, rev, value FROM (
                               SELECT key, create_rev, MAX(rev) AS rev, deleted, value FROM log
                               WHERE key >= ?1 AND key < ?2 AND rev <= ?3 GROUP BY key
                             ) WHERE deleted = 0 ORDER BY key LIMIT ?4",
                        )
                        .map_err(internal)?;
                    let rows = stmt
                        .query_map(params![start, end, rev, limit], |r| {
                            Ok(KeyValue {
                                key: key_string(r.get(0)?)?,
                                create_revision: r.get(1)?,
                                mod_revision: r.get(2)?,
                                value: r.get(3)?,
                            })
                        })
                        .map_err(internal)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()
                        .map_err(internal)?
                }
                Some(rev) if rev > current => {
                    return Err(StoreError::FutureRevision {
                        requested: rev,
                        current,
                    })
                }
                _ => {
                    let mut stmt = tx
                        .prepare_cached(
                            "SELECT key, create_rev, mod_rev, value FROM kv
                             WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
                        )
                        .map_err(internal)?;
                    let rows = stmt
                        .query_map(params![start, end, limit], |r| {
                            Ok(KeyValue {
                                key: key_string(r.get(0)?)?,
                                create_revision: r.get(1)?,
                                mod_revision: r.get(2)?,
                                value: r.get(3)?,
                            })
                        })
                        .map_err(internal)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()
                        .map_err(internal)?
                }
            };
            let more = opts.limit > 0 && kvs.len() > opts.limit;
            if more {
                kvs.truncate(opts.limit);
            }
            let revision = match opts.revision {
                Some(rev) if rev > 0 => rev,
                _ => current,
            };
            Ok(ListPage {
                kvs,
                revision,
                more,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        {
            let hub = self.hub.lock().unwrap();
            if after < hub.compacted {
                return Err(StoreError::Compacted {
                    requested: after + 1,
                    compacted: hub.compacted,
                });
            }
        }
        let (tx, rx) = mpsc::channel(256);
        let task = WatchTask {
            prefix: prefix.to_string(),
            last: after,
            hub: self.hub.clone(),
            readers: self.readers.clone(),
            path: self.path.clone(),
            out: tx,
        };
        tokio::spawn(task.run());
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.current.load(Ordering::SeqCst))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteRequest::Compact(revision, tx)).await?;
        rx.await
            .map_err(|_| StoreError::Unavailable("embedded store writer has stopped".into()))?
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.hub.lock().unwrap().compacted)
    }

    fn describe(&self) -> String {
        format!("embedded sqlite at {}", self.path.display())
    }
}

/// The single writer: evaluates compares and applies ops in queue order.
struct Writer {
    conn: Connection,
    revision: Revision,
    hub: Arc<Mutex<Hub>>,
    current: Arc<AtomicI64>,
    metrics: WriterMetrics,
}

/// How the writer's group commits go: transactions per commit (the two
/// counters' ratio) and the time of one commit, fsync included.
struct WriterMetrics {
    commits: metrics::Counter,
    transactions: metrics::Counter,
    duration: metrics::Histogram,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<WriteRequest>) {
        while let Ok(first) = rx.recv() {
            let mut txns = Vec::new();
            let mut compacts = Vec::new();
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    WriteRequest::Txn(t, reply) => txns.push((t, reply)),
                    WriteRequest::Compact(r, reply) => compacts.push((r, reply)),
                }
                if txns.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !txns.is_empty() {
                let started = std::time::Instant::now();
                self.metrics.commits.increment(1);
                self.metrics.transactions.increment(txns.len() as u64);
                self.commit_batch(txns);
                self.metrics
                    .duration
                    .record(started.elapsed().as_secs_f64());
            }
            for (rev, reply) in compacts {
                let _ = reply.send(self.compact(rev));
            }
        }
    }

    fn commit_batch(&mut self, txns: Vec<(Txn, oneshot::Sender<Result<TxnOutcome>>)>) {
        let start_revision = self.revision;
        let mut results = Vec::with_capacity(txns.len());
        let mut batches = Vec::new();
        let outcome = (|| -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for (txn, _) in &txns {
                let r = apply_txn(&tx, txn, self.revision + 1)?;
                if let Ok(TxnOutcome::Committed { revision, .. }) = &r.0 {
                    if *revision > self.revision {
                        self.revision = *revision;
                        batches.push(Arc::new(Batch::new(*revision, r.1)));
                    }
                }
                results.push(r.0);
            }
            tx.execute(
                "UPDATE meta SET revision = ?1 WHERE id = 0",
                [self.revision],
            )?;
            tx.commit()
        })();
        match outcome {
            Ok(()) => {
                {
                    let mut hub = self.hub.lock().unwrap();
                    for b in batches {
                        hub.current = b.revision;
                        hub.ring_bytes += b.bytes;
                        hub.ring.push_back(b.clone());
                        while hub.ring_bytes > RING_BYTES && hub.ring.len() > 1 {
                            if let Some(old) = hub.ring.pop_front() {
                                hub.ring_bytes -= old.bytes;
                            }
                        }
                        let _ = hub.tx.send(b);
                    }
                    self.current.store(self.revision, Ordering::SeqCst);
                }
                for ((_, reply), r) in txns.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded store commit failed");
                self.revision = start_revision;
                // SQLite rolled the transaction back: nothing of it is
                // stored, and the callers hear why.
                let full = matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
                for (_, reply) in txns {
                    let err = if full {
                        StoreError::NoSpace(e.to_string())
                    } else {
                        internal(&e)
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }

    fn compact(&mut self, revision: Revision) -> Result<()> {
        let compacted = self.hub.lock().unwrap().compacted;
        if revision <= compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        if revision > self.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        let res = (|| -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Rows superseded at or before the compaction point are no longer
            // needed by any read at revision >= `revision`...
            tx.execute(
                "DELETE FROM log WHERE rev < ?1 AND EXISTS (
                   SELECT 1 FROM log n WHERE n.key = log.key AND n.rev > log.rev AND n.rev <= ?1)",
                [revision],
            )?;
            // ...nor are deletes strictly before it (the key is absent then).
            tx.execute("DELETE FROM log WHERE rev < ?1 AND deleted = 1", [revision])?;
            tx.execute("UPDATE meta SET compacted = ?1 WHERE id = 0", [revision])?;
            tx.commit()
        })();
        res.map_err(internal)?;
        self.hub.lock().unwrap().compacted = revision;
        Ok(())
    }
}

/// Evaluates one transaction inside the open SQLite transaction. Returns the
/// outcome and, when committed, its events. Only SQLite failures are `Err`.
#[allow(clippy::type_complexity)]
fn apply_txn(
    tx: &rusqlite::Transaction<'_>,
    txn: &Txn,
    revision: Revision,
) -> rusqlite::Result<(Result<TxnOutcome>, Vec<Event>)> {
    let mut failed = Vec::new();
    for c in &txn.compares {
        let cur = read_kv(tx, c.key())?;
        let holds = match (c, &cur) {
            (Compare::Absent(_), None) => true,
            (Compare::Present(_), Some(_)) => true,
            (Compare::ModRevision(_, r), Some(kv)) => kv.mod_revision == *r,
            _ => false,
        };
        if !holds {
            failed.push((c.clone(), cur));
        }
    }
    if !failed.is_empty() {
        return Ok((Ok(TxnOutcome::Failed { failed }), Vec::new()));
    }
    let mut seen = HashSet::new();
    for op in &txn.ops {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key,
        };
        if !seen.insert(key) {
            return Ok((
                Err(StoreError::Internal(format!(
                    "duplicate key {key} in one transaction"
                ))),
                Vec::new(),
            ));
        }
    }
    let mut prevs = Vec::with_capacity(txn.ops.len());
    let mut events = Vec::new();
    for (seq, op) in txn.ops.iter().enumerate() {
        match op {
            Op::Put { key, value } => {
                let prev = read_kv(tx, key)?;
                let create_rev = prev.as_ref().map_or(revision, |p| p.create_revision);
                tx.prepare_cached(
                    "INSERT INTO kv (key, create_rev, mod_rev, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key) DO UPDATE SET mod_rev = excluded.mod_rev, value = excluded.value",
                )?
                .execute(params![key.as_bytes(), create_rev, revision, value])?;
                tx.prepare_cached(
                    "INSERT INTO log (rev, seq, key, create_rev, deleted, value, prev_rev)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
                )?
                .execute(params![
                    revision,
                    seq as i64,
                    key.as_bytes(),
                    create_rev,
                    value,
                    prev.as_ref().map_or(0, |p| p.mod_revision)
                ])?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create_rev,
                        mod_revision: revision,
                    },
                    prev: prev.clone(),
                });
                prevs.push(prev);
            }
            Op::Delete { key } => {
                let prev = read_kv(tx, key)?;
                if let Some(p) = &prev {
                    tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?
                        .execute([key.as_bytes()])?;
                    tx.prepare_cached(
                        "INSERT INTO log (rev, seq, key, create_rev, deleted, value, prev_rev)
                         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)",
                    )?
                    .execute(params![
                        revision,
                        seq as i64,
                        key.as_bytes(),
                        p.create_revision,
                        p.value,
                        p.mod_revision
                    ])?;
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            mod_revision: revision,
                            ..p.clone()
                        },
                        prev: Some(p.clone()),
                    });
                }
                prevs.push(prev);
            }
        }
    }
    // A transaction that changed nothing does not consume a revision (as in
    // etcd), so revisions stay dense and the hub sees one batch per revision.
    let revision = if events.is_empty() {
        revision - 1
    } else {
        revision
    };
    Ok((
        Ok(TxnOutcome::Committed {
            revision,
            prev: prevs,
        }),
        events,
    ))
}

/// Feeds one watch: catch up (from the hub's ring or the log table), then
/// follow the broadcast; on lag, catch up again. Ends when the consumer drops
/// the stream.
struct WatchTask {
    prefix: String,
    last: Revision,
    hub: Arc<Mutex<Hub>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    out: mpsc::Sender<Result<WatchItem>>,
}

impl WatchTask {
    /// Sends the events under our prefix; `None` once the consumer is gone.
    async fn emit(&self, events: impl IntoIterator<Item = Event>) -> Option<usize> {
        let mut sent = 0;
        for ev in events {
            if ev.kv.key.starts_with(&self.prefix) {
                self.out.send(Ok(WatchItem::Event(ev))).await.ok()?;
                sent += 1;
            }
        }
        Some(sent)
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Catch-up: subscribe first (under the lock), so nothing
            // committed after the snapshot can be missed.
            let (mut sub, upto, from_ring, compacted) = {
                let hub = self.hub.lock().unwrap();
                let sub = hub.tx.subscribe();
                let covered = match hub.ring.front() {
                    Some(b) => b.revision <= self.last + 1,
                    None => false,
                } || self.last >= hub.current;
                let from_ring: Option<Vec<Arc<Batch>>> = covered.then(|| {
                    hub.ring
                        .iter()
                        .filter(|b| b.revision > self.last)
                        .cloned()
                        .collect()
                });
                (sub, hub.current, from_ring, hub.compacted)
            };
            if self.last < compacted {
                let _ = self
                    .out
                    .send(Err(StoreError::Compacted {
                        requested: self.last + 1,
                        compacted,
                    }))
                    .await;
                return;
            }
            match from_ring {
                Some(batches) => {
                    for b in batches {
                        if self.emit(b.events.iter().cloned()).await.is_none() {
                            return;
                        }
                    }
                }
                None => {
                    let (readers, path, prefix, last) = (
                        self.readers.clone(),
                        self.path.clone(),
                        self.prefix.clone(),
                        self.last,
                    );
                    let rows = tokio::task::spawn_blocking(move || {
                        let pooled = readers.lock().unwrap().pop();
                        let conn = match pooled {
                            Some(c) => c,
                            None => open_connection(&path)?,
                        };
                        let out = replay(&conn, &prefix, last, upto);
                        readers.lock().unwrap().push(conn);
                        out
                    })
                    .await;
                    let rows = match rows {
                        Ok(Ok(rows)) => rows,
                        Ok(Err(e)) => {
                            let _ = self.out.send(Err(internal(e))).await;
                            return;
                        }
                        Err(e) => {
                            let _ = self.out.send(Err(internal(e))).await;
                            return;
                        }
                    };
                    if self.emit(rows.into_iter().map(|(_, e)| e)).await.is_none() {
                        return;
                    }
                }
            }
            self.last = self.last.max(upto);
            let mut sent_since_tick = false;
            // Live: follow the broadcast until we lag behind it.
            loop {
                tokio::select! {
                    b = sub.recv() => match b {
                        Ok(b) => {
                            if b.revision <= self.last {
                                continue;
                            }
                            match self.emit(b.events.iter().cloned()).await {
                                None => return,
                                Some(n) => sent_since_tick |= n > 0,
                            }
                            self.last = b.revision;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => {
                        if !sent_since_tick
                            && self.out.send(Ok(WatchItem::Progress(self.last))).await.is_err()
                        {
                            return;
                        }
                        sent_since_tick = false;
                    }
                    _ = self.out.closed() => return,
                }
            }
        }
    }
}
