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
//!
//! **Failover.** etcd-client's own multi-endpoint channel (tonic's balancer)
//! is not enough for HA: it keeps a dead member in rotation and only finds
//! out on the requests it sends there, so after one of three members dies a
//! large share of all calls (a quarter to a half, measured) fail although
//! the cluster still has quorum. So this store keeps one etcd-client
//! [`Client`] per member (each with its own channel, connected on first use;
//! `describe()` still lists them all) and sends every call to the *current*
//! member; when that member cannot serve it, the call moves on to the next
//! member, and so do later calls. The rules follow etcd's own Go client
//! (clientv3), which kube-apiserver uses:
//!
//! * *Which errors mean "try another member"*: connection failures and
//!   gRPC `Unavailable` (and the other codes reported as
//!   [`StoreError::Unavailable`]), e.g. a member that was killed, or one
//!   cut off from its leader. Every request carries etcd's "require leader"
//!   flag, so a member without a leader refuses at once ("etcdserver: no
//!   leader") instead of blocking, and ends watches it can no longer feed.
//! * *When a call may run again*: reads (range, current revision, the
//!   compaction probes), opening a watch and `compact` (compacting to the
//!   same revision twice is a no-op) are idempotent and are retried on any
//!   such error. A transaction is retried only when etcd certainly did not
//!   run it: the TCP connection to the member could not be established (the
//!   request was never sent), or the member refused it before it reached
//!   raft ("etcdserver: no leader", "raft proposal dropped"). Any other
//!   failure of a sent transaction (the connection dropped mid-call, "request
//!   timed out") is ambiguous: it may still commit, and running it again
//!   could apply it twice, so it is returned as `Unavailable` (the next call
//!   starts on another member). This is clientv3's rule for mutations too.
//!   So killing the member in use costs at most the transaction in flight
//!   on it; killing the leader can cost one more, which a follower forwarded
//!   to the dead leader before noticing it was gone and which etcd itself
//!   reports as timed out (after its request timeout, ~7 s by default).
//! * *How long*: each round tries every member at most once, starting from
//!   the current one; rounds repeat after a short pause until
//!   `FAILOVER_DEADLINE` (5 s) has passed since the call began, long enough
//!   to ride through a leader election (1-2 s with etcd's defaults) but
//!   bounded, so a dead cluster is reported in seconds, naming every
//!   member's error. An attempt in progress is not cut short (a write cut
//!   short would be ambiguous): etcd's request timeout bounds a member that
//!   answers, HTTP/2 keep-alives one that went silent.
//! * *Watches*: opening one uses the same failover. A running watch stays on
//!   the member it was opened on; if that member dies the stream ends with
//!   `Unavailable` as before, and the caller's re-watch from its last
//!   revision lands on a live member. Every member serves the same history,
//!   so nothing is skipped or repeated.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
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

/// How long [`EtcdStore::connect`] waits for a TCP connection to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one call keeps moving between members before it gives up with
/// `Unavailable` (see "Failover" in the module docs).
const FAILOVER_DEADLINE: Duration = Duration::from_secs(5);

/// Pause before another round over members that all failed (a leader
/// election or a restart takes a moment; don't spin).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

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
    /// One client per member, in the order given to [`EtcdStore::connect`].
    members: Vec<Member>,
    /// Index into `members` of the member calls go to first.
    current: AtomicUsize,
    /// Highest compacted revision this process has observed (a lower bound of
    /// etcd's; see module docs). Shared with watch streams, which learn it
    /// from cancellations.
    compacted: Arc<AtomicI64>,
}

/// One etcd member: its own channel, connected on first use and reconnected
/// by tonic after a failure.
struct Member {
    endpoint: String,
    kv: KvClient,
    watch: WatchClient,
}

/// May a call run again on another member after a failure?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Yes: reads, opening watches, compaction (idempotent).
    Always,
    /// Only if etcd certainly did not run it: transactions.
    IfNotSent,
}

/// Why a call with failover failed.
#[derive(Debug)]
enum Failure {
    /// etcd's answer (or an ambiguous failure of a write): final.
    Etcd(etcd_client::Error),
    /// No member could serve the call before [`FAILOVER_DEADLINE`].
    NoMember(String),
}

impl Failure {
    fn into_store_error(self) -> StoreError {
        match self {
            Failure::Etcd(e) => map_err(e),
            Failure::NoMember(m) => StoreError::Unavailable(m),
        }
    }

    fn class(&self) -> Class {
        match self {
            Failure::Etcd(e) => classify(e),
            Failure::NoMember(_) => Class::Other,
        }
    }
}

impl EtcdStore {
    /// Connect to an etcd cluster and check it answers, so a wrong address or
    /// a dead cluster fails at startup with a clear message instead of at the
    /// first request. Endpoints are `http://host:port` (or `host:port`), one
    /// per member; any one member with quorum is enough.
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
        // No per-request timeout: tonic would send it as the gRPC deadline
        // and etcd would cut long-lived watches. Keep-alives instead detect
        // a dead connection, which ends watches with an error. "Require
        // leader" makes a member without a leader refuse at once, so the
        // call moves to another member (see module docs).
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            // Only builds the channel; it connects on first use.
            let client = Client::connect(std::slice::from_ref(endpoint), Some(options.clone()))
                .await
                .map_err(|e| unreachable(format!("{endpoint}: {e}")))?;
            members.push(Member {
                endpoint: endpoint.clone(),
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            });
        }
        let store = EtcdStore {
            members,
            current: AtomicUsize::new(0),
            compacted: Arc::new(AtomicI64::new(0)),
        };
        // One linearizable read proves some member is up and has a leader.
        // The failover deadline bounds it; the timeout only guards against a
        // member that accepts the connection and then never answers.
        let limit = FAILOVER_DEADLINE + CONNECT_TIMEOUT;
        tokio::time::timeout(limit, store.current_revision())
            .await
            .map_err(|_| unreachable(format!("no answer within {limit:?}")))?
            .map_err(|e| {
                unreachable(match e {
                    StoreError::Unavailable(m) | StoreError::Internal(m) => m,
                    other => other.to_string(),
                })
            })?;
        Ok(store)
    }

    /// The member calls currently go to first (for diagnostics and tests).
    pub fn current_endpoint(&self) -> &str {
        &self.members[self.current.load(Ordering::Relaxed)].endpoint
    }

    /// Run `call` against the current member, moving on to the others when
    /// the member cannot serve it and `retry` allows running it again (see
    /// "Failover" in the module docs). `call` gets the member and returns
    /// a future that owns what it needs, so it can be made again.
    async fn with_failover<T, F, Fut>(
        &self,
        retry: Retry,
        mut call: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut(&Member) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let deadline = tokio::time::Instant::now() + FAILOVER_DEADLINE;
        // The last error of each member, for the final message.
        let mut errors: Vec<Option<String>> = vec![None; n];
        loop {
            let start = self.current.load(Ordering::Relaxed);
            for offset in 0..n {
                let i = (start + offset) % n;
                let err = match call(&self.members[i]).await {
                    Ok(v) => {
                        if self.current.load(Ordering::Relaxed) != i {
                            self.current.store(i, Ordering::Relaxed);
                        }
                        return Ok(v);
                    }
                    Err(e) => e,
                };
                if !member_failed(&err) {
                    return Err(Failure::Etcd(err));
                }
                self.leave(i, &err);
                if retry == Retry::IfNotSent && !not_run(&err) {
                    return Err(Failure::Etcd(err));
                }
                errors[i] = Some(describe_err(&err));
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                let detail: Vec<String> = self
                    .members
                    .iter()
                    .zip(&errors)
                    .filter_map(|(m, e)| Some(format!("{}: {}", m.endpoint, e.as_ref()?)))
                    .collect();
                return Err(Failure::NoMember(format!(
                    "no etcd member could serve the request within {FAILOVER_DEADLINE:?} ({})",
                    detail.join("; ")
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Member `i` failed a call: later calls start at the next member. Only
    /// the first caller to notice moves `current`, so concurrent failures
    /// of one member do not skip a healthy one.
    fn leave(&self, i: usize, err: &etcd_client::Error) {
        let next = (i + 1) % self.members.len();
        if next != i
            && self
                .current
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                member = %self.members[i].endpoint,
                next = %self.members[next].endpoint,
                error = %describe_err(err),
                "etcd member failed; switching to the next one"
            );
        }
    }

    /// A range read with failover.
    async fn range(
        &self,
        key: Vec<u8>,
        options: Option<GetOptions>,
    ) -> std::result::Result<etcd_client::GetResponse, Failure> {
        self.with_failover(Retry::Always, |m| {
            let mut kv = m.kv.clone();
            let (key, options) = (key.clone(), options.clone());
            async move { kv.get(key, options).await }
        })
        .await
    }

    /// Remember a compacted revision learned from etcd.
    fn saw_compacted(&self, revision: Revision) {
        self.compacted.fetch_max(revision, Ordering::Relaxed);
    }

    /// The exact compacted revision, known to be > 1 because a read below it
    /// failed: a watch from revision 1 is cancelled by etcd with the compacted
    /// revision (within its ~100 ms watcher sync loop).
    async fn discover_compacted(&self) -> Result<Revision> {
        let probe = self.with_failover(Retry::Always, |m| {
            let mut client = m.watch.clone();
            async move {
                let options = WatchOptions::new().with_start_revision(1);
                let mut watch = client.watch(PROBE_KEY, Some(options)).await?;
                while let Some(resp) = watch.message().await? {
                    if resp.compact_revision() > 0 {
                        return Ok(Ok(resp.compact_revision()));
                    }
                    if resp.canceled() {
                        return Ok(Err(StoreError::Internal(format!(
                            "etcd cancelled the compaction probe: {}",
                            resp.cancel_reason()
                        ))));
                    }
                }
                Err(etcd_client::Error::WatchError(
                    "etcd closed the compaction probe watch".into(),
                ))
            }
        });
        let rev = tokio::time::timeout(WATCH_SETUP_TIMEOUT, probe)
            .await
            .map_err(|_| {
                StoreError::Unavailable("etcd did not reveal its compacted revision".into())
            })?
            .map_err(Failure::into_store_error)??;
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
    async fn read_error(&self, requested: Revision, err: Failure) -> StoreError {
        match err.class() {
            Class::Compacted => self.compacted_error(requested).await,
            Class::Future => self.future_error(requested).await,
            Class::Other => err.into_store_error(),
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
        let request = EtcdTxn::new().when(compares).and_then(ops).or_else(reads);
        // Not idempotent: run again only if etcd certainly did not run it.
        let resp = self
            .with_failover(Retry::IfNotSent, |m| {
                let mut kv = m.kv.clone();
                let request = request.clone();
                async move { kv.txn(request).await }
            })
            .await
            .map_err(Failure::into_store_error)?;
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
        let resp = self
            .range(key.as_bytes().to_vec(), None)
            .await
            .map_err(Failure::into_store_error)?;
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
        let resp = match self.range(start, Some(get)).await {
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
            if let Err(e) = self.range(HEADER_KEY.to_vec(), Some(probe)).await {
                match e.class() {
                    Class::Compacted => return Err(self.compacted_error(after).await),
                    // A watch from the future simply waits for it.
                    Class::Future => {}
                    Class::Other => return Err(e.into_store_error()),
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
        // Opening a watch changes nothing, so any member that cannot create
        // it is skipped; every member serves the same history.
        let created = self.with_failover(Retry::Always, |m| {
            let mut client = m.watch.clone();
            let (key, options) = (key.clone(), options.clone());
            async move {
                let mut watch = client.watch(key, Some(options)).await?;
                match watch.message().await? {
                    Some(resp) if resp.created() && !resp.canceled() => Ok(Ok(watch)),
                    Some(resp) => Ok(Err(StoreError::Internal(format!(
                        "etcd refused the watch on {prefix}: {}",
                        resp.cancel_reason()
                    )))),
                    None => Err(etcd_client::Error::WatchError(
                        "etcd closed the watch before creating it".into(),
                    )),
                }
            }
        });
        let watch = tokio::time::timeout(WATCH_SETUP_TIMEOUT, created)
            .await
            .map_err(|_| StoreError::Unavailable("etcd did not create the watch in time".into()))?
            .map_err(Failure::into_store_error)??;
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
            .range(
                HEADER_KEY.to_vec(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(Failure::into_store_error)?;
        header_revision(resp.header())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        // Physical: return only once the old revisions are really gone, so a
        // read right after sees the compaction. Safe to run again on another
        // member: a second compaction to the same revision is a no-op
        // ("already compacted", accepted below).
        let options = CompactionOptions::new().with_physical();
        let result = self
            .with_failover(Retry::Always, |m| {
                let mut kv = m.kv.clone();
                let options = options.clone();
                async move { kv.compact(revision, Some(options)).await }
            })
            .await;
        match result {
            Ok(_) => {}
            Err(e) => match e.class() {
                // Already compacted at or beyond `revision`: nothing to do.
                Class::Compacted => {}
                Class::Future => return Err(self.future_error(revision).await),
                Class::Other => return Err(e.into_store_error()),
            },
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
        match self.range(HEADER_KEY.to_vec(), Some(probe)).await {
            Ok(_) => Ok(known),
            Err(e) if e.class() == Class::Compacted => self.discover_compacted().await,
            Err(e) => Err(e.into_store_error()),
        }
    }

    fn describe(&self) -> String {
        let endpoints: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        format!("etcd at {}", endpoints.join(","))
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
    let text = match &err {
        etcd_client::Error::GRpcStatus(_) => format!("etcd: {}", describe_err(&err)),
        _ => err.to_string(),
    };
    if member_failed(&err) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Internal(text)
    }
}

/// Did the member fail (connection trouble, no leader, overloaded), so
/// another member may do better, rather than etcd answer? These are the
/// errors [`map_err`] reports as `Unavailable`.
fn member_failed(err: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic_code::*;
    match err {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
        E::GRpcStatus(s) => [
            UNAVAILABLE,
            DEADLINE_EXCEEDED,
            CANCELLED,
            UNKNOWN,
            RESOURCE_EXHAUSTED,
        ]
        .contains(&(s.code() as i32)),
        _ => false,
    }
}

/// Did etcd certainly not run the request, so even a write may be sent
/// again? True when the connection to the member could not be established
/// (the request was never sent) or the member refused the request before it
/// reached raft. Anything else (a connection that broke after the request
/// went out, "request timed out") may still commit.
fn not_run(err: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return false;
    };
    // etcd's own refusals: the require-leader check runs before the request
    // is processed, and a dropped proposal never entered the raft log.
    if matches!(
        status.message(),
        "etcdserver: no leader" | "raft proposal dropped"
    ) {
        return true;
    }
    if status.code() as i32 != tonic_code::UNAVAILABLE {
        return false;
    }
    // tonic reports a failed connection attempt as UNAVAILABLE with the
    // connector's error as the source: hyper-util's "tcp connect error"
    // (refused, timed out, unreachable), which wraps the OS error.
    // ECONNREFUSED can only come from connect(), never from an established
    // connection. (tonic's `ConnectError` type itself is not reachable: tonic
    // is not a direct dependency.) A unit test pins this down.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        if e.to_string() == "tcp connect error" {
            return true;
        }
        source = e.source();
    }
    false
}

/// A one-line description of an etcd client error, with its root cause
/// (tonic's messages alone say "tcp connect error" but not why).
fn describe_err(err: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return err.to_string();
    };
    let mut text = status.message().to_owned();
    let mut root = std::error::Error::source(status);
    while let Some(next) = root.and_then(|e| e.source()) {
        root = Some(next);
    }
    if let Some(root) = root {
        let root = root.to_string();
        if !text.contains(&root) {
            text = format!("{text}: {root}");
        }
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request to a port nobody listens on was certainly never sent, so
    /// even a write may go to another member. `not_run` recognises that from
    /// how tonic reports a failed connection; pin it down, so a dependency
    /// upgrade that changes it fails here rather than silently disabling
    /// write failover.
    #[tokio::test]
    async fn refused_connection_means_not_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = Client::connect([endpoint], None)
            .await
            .expect("lazy client");
        let err = client
            .kv_client()
            .get("k", None)
            .await
            .expect_err("nothing listens there");
        assert!(member_failed(&err), "{err:?}");
        assert!(not_run(&err), "{err:?}");
        let text = describe_err(&err);
        assert!(text.contains("refused"), "{text}");
    }
}
