//! The key-value store under the API server, with etcd's semantics.
//!
//! Everything the control plane persists goes through [`Store`]: a flat key
//! space (`/registry/<resource>/<namespace>/<name>`), a global revision that
//! every committed transaction bumps by one, compare-and-swap writes, reads at
//! a past revision, and watches that replay history from a revision. Those are
//! exactly the guarantees the Kubernetes API needs (resourceVersion =
//! revision, optimistic concurrency, list+watch without gaps), so the API
//! server is written once against this trait and runs unchanged on:
//!
//! * [`embedded::EmbeddedStore`] — SQLite in the data directory, no external
//!   process (the default, one node);
//! * [`etcd::EtcdStore`] — a real etcd cluster (many API servers, HA).
//!
//! The one write primitive is [`Store::txn`]: a list of conditions and a list
//! of operations, applied atomically at one new revision. Service IP and
//! NodePort allocation rely on it: the Service object and its allocation keys
//! are created in the same transaction, so two API servers can never hand out
//! the same address and a crash never leaves one without the other.

pub mod embedded;
pub mod etcd;

use std::pin::Pin;

use futures::Stream;

/// A store revision; Kubernetes' `resourceVersion` is its decimal form.
pub type Revision = i64;

/// One key with its value and the revisions that created and last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (0 = never existed).
    pub create_revision: Revision,
    /// Revision of the transaction that last wrote (or deleted) the key.
    pub mod_revision: Revision,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// After a put: the new value. After a delete: the last value the key had,
    /// with `mod_revision` set to the revision of the delete — watchers of
    /// Kubernetes objects need the deleted object, not just its name.
    pub kv: KeyValue,
    /// The value before this event, when the backend still knows it (needed to
    /// turn "object left the selector" into a DELETED watch event).
    pub prev: Option<KeyValue>,
}

/// What a watch stream yields: changes in revision order, and progress
/// notices saying "everything up to this revision has been delivered", which
/// the API server turns into watch bookmarks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    Event(Event),
    Progress(Revision),
}

/// A condition of a transaction; the transaction applies only if all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last modified at exactly this revision.
    ModRevision(String, Revision),
    /// The key exists (any revision).
    Present(String),
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(k) | Compare::ModRevision(k, _) | Compare::Present(k) => k,
        }
    }
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// An atomic compare-then-write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
        });
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

/// The outcome of a transaction whose conditions were evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied at this revision. `prev` holds, for each op, the value the key
    /// had before (None if it did not exist).
    Committed {
        revision: Revision,
        prev: Vec<Option<KeyValue>>,
    },
    /// Not applied. `failed` lists every condition that did not hold with the
    /// key's current value, so the caller can tell "already exists" from
    /// "stale resourceVersion" from "address taken".
    Failed {
        failed: Vec<(Compare, Option<KeyValue>)>,
    },
}

/// One page of a prefix listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub kvs: Vec<KeyValue>,
    /// The revision the page was read at (pass it back to read the next page
    /// consistently).
    pub revision: Revision,
    /// More keys follow the last one returned.
    pub more: bool,
}

/// Options of [`Store::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Return at most this many keys (0 = no limit).
    pub limit: usize,
    /// Return keys strictly after this one (continuation of a paged list).
    pub after: Option<String>,
    /// Read at this revision instead of the latest; older than the compacted
    /// revision gives [`StoreError::Compacted`].
    pub revision: Option<Revision>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision was compacted away (maps to HTTP 410 Gone).
    #[error("required revision {requested} has been compacted (oldest available is {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The requested revision is newer than the store's current one.
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store internal error: {0}")]
    Internal(String),
    /// The store's disk is full (SQLite's SQLITE_FULL, etcd's NOSPACE
    /// alarm): writes fail until space returns, reads go on.
    #[error("store out of space: {0}")]
    NoSpace(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stream of watch items; ends with an error if the store fails.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchItem>> + Send>>;

/// The storage contract shared by every backend. See the module docs.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Atomically check `txn.compares` and, if all hold, apply `txn.ops` at a
    /// new revision. A transaction with no ops that succeeds does not bump
    /// the revision.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// The latest value of one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys starting with `prefix`, in key order, paged.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage>;

    /// Changes to keys under `prefix` with revision strictly greater than
    /// `after`, in revision order, followed by live changes. If `after` is
    /// older than the compacted revision the call fails with
    /// [`StoreError::Compacted`].
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// The latest committed revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// Forget history before `revision`: reads and watches at older
    /// revisions fail with [`StoreError::Compacted`] afterwards.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// The oldest revision still readable (0 if never compacted).
    async fn compacted_revision(&self) -> Result<Revision>;

    /// A short human name for logs ("embedded sqlite at ...", "etcd at ...").
    fn describe(&self) -> String;
}

impl dyn Store {
    /// Create `key` only if it does not exist. Returns the new revision, or
    /// the existing value if the key was taken.
    pub async fn create(&self, key: &str, value: Vec<u8>) -> Result<Result<Revision, KeyValue>> {
        match self
            .txn(Txn::new().when(Compare::Absent(key.into())).put(key, value))
            .await?
        {
            TxnOutcome::Committed { revision, .. } => Ok(Ok(revision)),
            TxnOutcome::Failed { mut failed } => Ok(Err(failed
                .pop()
                .and_then(|(_, kv)| kv)
                .ok_or_else(|| StoreError::Internal("create failed without a value".into()))?)),
        }
    }

    /// Replace `key` only if it was last modified at `expected`. On a
    /// mismatch returns the current value (None if the key is gone).
    pub async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
    ) -> Result<Result<Revision, Option<KeyValue>>> {
        match self
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(key.into(), expected))
                    .put(key, value),
            )
            .await?
        {
            TxnOutcome::Committed { revision, .. } => Ok(Ok(revision)),
            TxnOutcome::Failed { mut failed } => Ok(Err(failed.pop().and_then(|(_, kv)| kv))),
        }
    }

    /// Delete `key`, only if it was last modified at `expected` when given.
    /// Returns the deleted value and the revision of the delete; on a
    /// mismatch (or a missing key) returns the current value.
    pub async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Result<(Revision, KeyValue), Option<KeyValue>>> {
        let cond = match expected {
            Some(rev) => Compare::ModRevision(key.into(), rev),
            None => Compare::Present(key.into()),
        };
        match self.txn(Txn::new().when(cond).delete(key)).await? {
            TxnOutcome::Committed { revision, mut prev } => match prev.pop().flatten() {
                Some(kv) => Ok(Ok((revision, kv))),
                None => Err(StoreError::Internal(
                    "delete of a missing key committed".into(),
                )),
            },
            TxnOutcome::Failed { mut failed } => Ok(Err(failed.pop().and_then(|(_, kv)| kv))),
        }
    }

    /// Every key under `prefix` at one revision, following pages.
    pub async fn list_all(&self, prefix: &str) -> Result<ListPage> {
        let mut out = ListPage::default();
        let mut opts = ListOptions {
            limit: 1000,
            ..Default::default()
        };
        loop {
            let page = self.list(prefix, opts.clone()).await?;
            out.revision = page.revision;
            opts.revision = Some(page.revision);
            opts.after = page.kvs.last().map(|kv| kv.key.clone());
            out.kvs.extend(page.kvs);
            if !page.more {
                return Ok(out);
            }
        }
    }
}

/// The end of the key range that starts with `prefix` (etcd's "range end"):
/// the prefix with its last byte incremented.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
