//! [`Store`] on a real etcd cluster, for HA control planes.
//!
//! The trait was modelled on etcd, so most calls map one-to-one onto an etcd
//! RPC and keys are used verbatim (`/registry/<resource>/<ns>/<name>`):
//!
//! * [`Store::txn`] is an etcd `Txn`. `Absent` is `create_revision == 0`,
//!   `Present` is `create_revision > 0`, `ModRevision(k, r)` is
//!   `mod_revision == r`. The success branch runs the ops with `prev_kv`; the
//!   failure branch reads every compared key, so the values reported in
//!   [`TxnOutcome::Failed`] are from the same revision the compares were
//!   evaluated at (no extra round trip, no race).
//! * [`Store::list`] is a range `[prefix, prefix_end)`; continuation starts at
//!   `after + "\0"`, the smallest key after `after`.
//! * [`Store::watch`] is an etcd watch from `after + 1` with `prev_kv` and
//!   `progress_notify`; empty progress responses become
//!   [`WatchItem::Progress`] (etcd sends them every
//!   `--experimental-watch-progress-notify-interval`, 10 min by default). A
//!   delete event carries etcd's `prev_kv` with the delete's revision. Before
//!   opening the watch, a read at `after` checks it is not compacted, so the
//!   call itself fails with [`StoreError::Compacted`] as the trait says
//!   (etcd alone would accept `after + 1 == compacted` and could silently
//!   miss a delete at that revision). A compaction that overtakes a running
//!   watch ends its stream with `Compacted`; any other cancellation or a
//!   broken connection ends it with `Unavailable`.
//!
//! etcd's own rules still apply: a transaction may not touch one key twice
//! (etcd rejects it, reported as `Internal`), and an unconditional
//! transaction whose only op deletes a missing key changes nothing, so it
//! does not bump the revision. Plain `http://` endpoints only: etcd-client is
//! built without a TLS feature.
//!
//! **Compacted revision.** etcd has no RPC that returns the compacted revision
//! and its "required revision has been compacted" error carries no number, yet
//! [`StoreError::Compacted`] and [`Store::compacted_revision`] need it, and
//! another API server (or an operator with `etcdctl`) may compact at any time.
//! So the value is not trusted from memory alone: this process remembers the
//! highest compacted revision it has seen (a lower bound, since compaction
//! only moves forward) and verifies it with one cheap range read at that
//! revision. If that read says "compacted", the exact value is learned from
//! etcd itself: a watch from revision 1 is cancelled by etcd with the
//! compacted revision in `compact_revision`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, KvClient, PutOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchClient,
    WatchOptions,
};
use futures::stream;

use super::{
    prefix_end, Compare, Event, EventKind, KeyValue, ListOptions, ListPage, Op, Result, Revision,
    Store, StoreError, Txn, TxnOutcome, WatchItem, WatchStream,
};

/// How long [`EtcdStore::connect`] waits for etcd to answer before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for etcd to acknowledge a watch or reveal its compacted
/// revision; both normally take well under a second.
const WATCH_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest gRPC message accepted from etcd. tonic's default (4 MiB) is too
/// small for a watch replaying a burst of history or a big list page; etcd
/// itself sends up to 2 GiB, and Kubernetes' client accepts the same.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// A key nobody writes, used to learn the compacted revision (see module
/// docs). It sorts before every printable key and is outside `/registry/`.
const PROBE_KEY: &[u8] = b"\0fairlead-compaction-probe";

/// The key used for cheap reads whose only purpose is the response header.
const HEADER_KEY: &[u8] = b"\0";

/// A [`Store`] backed by etcd v3 (gRPC), so several API servers can share
/// one consistent, replicated key space.
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    endpoints: Vec<String>,
    /// Highest compacted revision this process has observed (a lower bound of
    /// etcd's; see module docs). Shared with watch streams, which learn it
    /// from cancellations.
    compacted: Arc<AtomicI64>,
}

impl EtcdStore {
    /// Connect to an etcd cluster and check it answers, so a wrong address or
    /// a dead cluster fails at startup with a clear message instead of at the
    /// first request. Endpoints are `http://host:port` (or `host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let unreachable = |why: String| {
            StoreError::Unavailable(format!(
                "cannot reach etcd at {}: {why}",
                endpoints.join(",")
            ))
        };
        let inner = |e: StoreError| match e {
            StoreError::Unavailable(m) | StoreError::Internal(m) => m,
            other => other.to_string(),
        };
        // No per-request timeout: tonic would send it as the gRPC deadline
        // and etcd would cut long-lived watches. Keep-alives instead detect
        // a dead connection, which ends watches with an error.
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client =
            tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
                .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
                .map_err(|e| unreachable(e.to_string()))?;
        let store = EtcdStore {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            endpoints: endpoints.to_vec(),
            compacted: Arc::new(AtomicI64::new(0)),
        };
        // The channel connects lazily; one linearizable read proves etcd is
        // up and has a leader.
        tokio::time::timeout(CONNECT_TIMEOUT, store.current_revision())
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(inner(e)))?;
        Ok(store)
    }

    /// Remember a compacted revision learned from etcd.
    fn saw_compacted(&self, revision: Revision) {
        self.compacted.fetch_max(revision, Ordering::Relaxed);
    }

    /// The exact compacted revision, known to be > 1 because a read below it
    /// failed: a watch from revision 1 is cancelled by etcd with the compacted
    /// revision (within its ~100 ms watcher sync loop).
    async fn discover_compacted(&self) -> Result<Revision> {
        let mut client = self.watch.clone();
        let probe = async {
            let mut watch = client
                .watch(PROBE_KEY, Some(WatchOptions::new().with_start_revision(1)))
                .await
                .map_err(map_err)?;
            while let Some(resp) = watch.message().await.map_err(map_err)? {
                if resp.compact_revision() > 0 {
                    return Ok(resp.compact_revision());
                }
                if resp.canceled() {
                    return Err(StoreError::Internal(format!(
                        "etcd cancelled the compaction probe: {}",
                        resp.cancel_reason()
                    )));
                }
            }
            Err(StoreError::Unavailable(
                "etcd closed the compaction probe watch".into(),
            ))
        };
        let rev = tokio::time::timeout(WATCH_SETUP_TIMEOUT, probe)
            .await
            .map_err(|_| {
                StoreError::Unavailable("etcd did not reveal its compacted revision".into())
            })??;
        self.saw_compacted(rev);
        Ok(rev)
    }

    /// The error for a read at `requested` that etcd refused as compacted.
    async fn compacted_error(&self, requested: Revision) -> StoreError {
        match self.discover_compacted().await {
            Ok(compacted) => StoreError::Compacted {
                requested,
                compacted,
            },
            Err(e) => e,
        }
    }

    /// The error for a read at `requested` that etcd refused as a future
    /// revision.
    async fn future_error(&self, requested: Revision) -> StoreError {
        match self.current_revision().await {
            Ok(current) => StoreError::FutureRevision { requested, current },
            Err(e) => e,
        }
    }

    /// Map an error of a read at `requested`, filling in the revisions etcd's
    /// messages leave out.
    async fn read_error(&self, requested: Revision, err: etcd_client::Error) -> StoreError {
        match classify(&err) {
            Class::Compacted => self.compacted_error(requested).await,
            Class::Future => self.future_error(requested).await,
            Class::Other => map_err(err),
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, 0),
                Compare::Present(k) => {
                    EtcdCompare::create_revision(k.as_str(), CompareOp::Greater, 0)
                }
                // etcd compares a missing key as all-zero revisions, so
                // `mod_revision == 0` would hold for it; the trait says the
                // key must exist, so a non-positive revision never matches.
                Compare::ModRevision(k, r) if *r <= 0 => {
                    EtcdCompare::create_revision(k.as_str(), CompareOp::Less, 0)
                }
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *r)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_prev_key()),
                ),
                Op::Delete { key } => {
                    TxnOp::delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))
                }
            })
            .collect();
        let reads: Vec<TxnOp> = txn
            .compares
            .iter()
            .map(|c| TxnOp::get(c.key(), None))
            .collect();
        let resp = self
            .kv
            .clone()
            .txn(EtcdTxn::new().when(compares).and_then(ops).or_else(reads))
            .await
            .map_err(map_err)?;
        let responses = resp.op_responses();
        if resp.succeeded() {
            let revision = header_revision(resp.header())?;
            let prev = responses
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Put(p) => p.prev_key().map(convert_kv).transpose(),
                    TxnOpResponse::Delete(d) => d.prev_kvs().first().map(convert_kv).transpose(),
                    _ => Err(StoreError::Internal(
                        "unexpected response in etcd txn".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(TxnOutcome::Committed { revision, prev });
        }
        if responses.len() != txn.compares.len() {
            return Err(StoreError::Internal(format!(
                "etcd txn failure branch returned {} reads for {} compares",
                responses.len(),
                txn.compares.len()
            )));
        }
        let mut failed = Vec::new();
        for (compare, r) in txn.compares.into_iter().zip(responses) {
            let TxnOpResponse::Get(get) = r else {
                return Err(StoreError::Internal(
                    "unexpected response in etcd txn failure branch".into(),
                ));
            };
            let current = get.kvs().first().map(convert_kv).transpose()?;
            let holds = match &compare {
                Compare::Absent(_) => current.is_none(),
                Compare::Present(_) => current.is_some(),
                Compare::ModRevision(_, rev) => {
                    current.as_ref().is_some_and(|kv| kv.mod_revision == *rev)
                }
            };
            if !holds {
                failed.push((compare, current));
            }
        }
        if failed.is_empty() {
            return Err(StoreError::Internal(
                "etcd txn failed but every compare held".into(),
            ));
        }
        Ok(TxnOutcome::Failed { failed })
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.kv.clone().get(key, None).await.map_err(map_err)?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        // etcd rejects an empty key; "\0" is the smallest non-empty one.
        let mut start = if prefix.is_empty() {
            b"\0".to_vec()
        } else {
            prefix.as_bytes().to_vec()
        };
        if let Some(after) = &opts.after {
            let mut next = after.as_bytes().to_vec();
            next.push(0);
            start = start.max(next);
        }
        let limit = i64::try_from(opts.limit).unwrap_or(i64::MAX);
        let requested = opts.revision.filter(|r| *r > 0);
        let mut get = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit);
        if let Some(rev) = requested {
            get = get.with_revision(rev);
        }
        let resp = match self.kv.clone().get(start, Some(get)).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.read_error(requested.unwrap_or(0), e).await),
        };
        let kvs = resp
            .kvs()
            .iter()
            .map(convert_kv)
            .collect::<Result<Vec<_>>>()?;
        // The header carries the latest revision, not the one read at.
        let revision = match requested {
            Some(rev) => rev,
            None => header_revision(resp.header())?,
        };
        Ok(ListPage {
            kvs,
            revision,
            more: resp.more(),
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // etcd would accept a start revision equal to the compacted one, but
        // the trait promises every change after `after`, and the change at
        // `after + 1` may be a delete that compaction already dropped. A read
        // at `after` fails exactly when `after` is older than the compacted
        // revision, which is the trait's rule.
        if after > 0 {
            let probe = GetOptions::new().with_revision(after).with_count_only();
            if let Err(e) = self.kv.clone().get(HEADER_KEY, Some(probe)).await {
                match classify(&e) {
                    Class::Compacted => return Err(self.compacted_error(after).await),
                    // A watch from the future simply waits for it.
                    Class::Future => {}
                    Class::Other => return Err(map_err(e)),
                }
            }
        }
        let key = if prefix.is_empty() {
            b"\0".to_vec()
        } else {
            prefix.as_bytes().to_vec()
        };
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(after + 1)
            .with_prev_key()
            .with_progress_notify();
        let mut client = self.watch.clone();
        let created = async {
            let mut watch = client.watch(key, Some(options)).await.map_err(map_err)?;
            match watch.message().await.map_err(map_err)? {
                Some(resp) if resp.created() && !resp.canceled() => Ok(watch),
                Some(resp) => Err(StoreError::Internal(format!(
                    "etcd refused the watch on {prefix}: {}",
                    resp.cancel_reason()
                ))),
                None => Err(StoreError::Unavailable(
                    "etcd closed the watch before creating it".into(),
                )),
            }
        };
        let watch = tokio::time::timeout(WATCH_SETUP_TIMEOUT, created)
            .await
            .map_err(|_| {
                StoreError::Unavailable("etcd did not create the watch in time".into())
            })??;
        let state = WatchState {
            watch,
            queue: VecDeque::new(),
            done: false,
            next: after + 1,
            compacted: self.compacted.clone(),
        };
        Ok(Box::pin(stream::unfold(state, |mut st| async move {
            loop {
                if let Some(item) = st.queue.pop_front() {
                    return Some((item, st));
                }
                if st.done {
                    return None;
                }
                st.receive().await;
            }
        })))
    }

    async fn current_revision(&self) -> Result<Revision> {
        let resp = self
            .kv
            .clone()
            .get(HEADER_KEY, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(map_err)?;
        header_revision(resp.header())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        // Physical: return only once the old revisions are really gone, so a
        // read right after sees the compaction.
        match self
            .kv
            .clone()
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => {}
            // Already compacted at or beyond `revision`: nothing to do.
            Err(e) if classify(&e) == Class::Compacted => {}
            Err(e) if classify(&e) == Class::Future => {
                return Err(self.future_error(revision).await)
            }
            Err(e) => return Err(map_err(e)),
        }
        self.saw_compacted(revision);
        Ok(())
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        let known = self.compacted.load(Ordering::Relaxed);
        // A read at the known value succeeds iff nobody compacted further.
        let probe = GetOptions::new()
            .with_revision(known.max(1))
            .with_count_only();
        match self.kv.clone().get(HEADER_KEY, Some(probe)).await {
            Ok(_) => Ok(known),
            Err(e) if classify(&e) == Class::Compacted => self.discover_compacted().await,
            Err(e) => Err(map_err(e)),
        }
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }
}

/// What a watch stream carries between items.
struct WatchState {
    watch: etcd_client::WatchStream,
    /// Items decoded from the last response, not yet yielded.
    queue: VecDeque<Result<WatchItem>>,
    /// The stream failed or was cancelled; end after the queue drains.
    done: bool,
    /// The first revision not yet covered by a delivered event or progress
    /// notice (for compaction errors and to keep progress monotonic).
    next: Revision,
    compacted: Arc<AtomicI64>,
}

impl WatchState {
    /// Read one etcd response into the queue.
    async fn receive(&mut self) {
        let resp = match self.watch.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return self.fail(StoreError::Unavailable("etcd closed the watch".into())),
            Err(e) => return self.fail(map_err(e)),
        };
        if resp.canceled() {
            let err = if resp.compact_revision() > 0 {
                self.compacted
                    .fetch_max(resp.compact_revision(), Ordering::Relaxed);
                StoreError::Compacted {
                    requested: self.next,
                    compacted: resp.compact_revision(),
                }
            } else {
                StoreError::Unavailable(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ))
            };
            return self.fail(err);
        }
        if resp.events().is_empty() {
            // A progress notification: everything up to the header revision
            // has been delivered. etcd can report a revision below what this
            // watch already covers (e.g. one started at a future revision,
            // etcd issue #20221); such a notice says nothing new, drop it.
            if let Some(rev) = resp.header().map(|h| h.revision()) {
                if rev >= self.next - 1 {
                    self.next = rev + 1;
                    self.queue.push_back(Ok(WatchItem::Progress(rev)));
                }
            }
            return;
        }
        for ev in resp.events() {
            match convert_event(ev) {
                Ok(event) => {
                    self.next = self.next.max(event.kv.mod_revision + 1);
                    self.queue.push_back(Ok(WatchItem::Event(event)));
                }
                Err(e) => return self.fail(e),
            }
        }
    }

    fn fail(&mut self, err: StoreError) {
        self.queue.push_back(Err(err));
        self.done = true;
    }
}

/// An etcd watch event as a trait [`Event`]; a delete carries the last value
/// (etcd's prev_kv) with the delete's revision.
fn convert_event(ev: &etcd_client::Event) -> Result<Event> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Internal("etcd watch event without a key".into()))?;
    let prev = ev.prev_kv().map(convert_kv).transpose()?;
    match ev.event_type() {
        EventType::Put => Ok(Event {
            kind: EventKind::Put,
            kv: convert_kv(kv)?,
            prev,
        }),
        EventType::Delete => {
            // prev_kv is only missing if its revision was compacted away;
            // then the name is all that is left.
            let mut last = match &prev {
                Some(p) => p.clone(),
                None => convert_kv(kv)?,
            };
            last.mod_revision = kv.mod_revision();
            Ok(Event {
                kind: EventKind::Delete,
                kv: last,
                prev,
            })
        }
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| StoreError::Internal("etcd returned a key that is not UTF-8".into()))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Internal("etcd response without a header".into()))
}

/// The etcd errors that need a revision filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Compacted,
    Future,
    Other,
}

fn classify(err: &etcd_client::Error) -> Class {
    match err {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("has been compacted") => {
            Class::Compacted
        }
        etcd_client::Error::GRpcStatus(s) if s.message().contains("future revision") => {
            Class::Future
        }
        _ => Class::Other,
    }
}

/// Map an etcd client error: connection trouble is `Unavailable` (the API
/// server answers 503 and clients retry), anything else is `Internal`.
fn map_err(err: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match &err {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
            StoreError::Unavailable(err.to_string())
        }
        E::GRpcStatus(s) => {
            use tonic_code::*;
            let code = s.code() as i32;
            if [
                UNAVAILABLE,
                DEADLINE_EXCEEDED,
                CANCELLED,
                UNKNOWN,
                RESOURCE_EXHAUSTED,
            ]
            .contains(&code)
            {
                StoreError::Unavailable(format!("etcd: {}", s.message()))
            } else {
                StoreError::Internal(format!("etcd: {}", s.message()))
            }
        }
        _ => StoreError::Internal(err.to_string()),
    }
}

/// gRPC status codes (tonic is not a direct dependency; the numbers are fixed
/// by the gRPC spec).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNAVAILABLE: i32 = 14;
}
