//! The nftables proxy backend: Service traffic is balanced by the kernel,
//! never by userspace. fairlead owns `ip` tables named after
//! `--table` (default `fairlead`): the main table and, once there are
//! enough Services, shard tables `fairlead-1` ... `fairlead-<K-1>`. Every
//! sync is up to three nf_tables transactions (each over all of them,
//! atomic), sent over netlink in turn: what nothing leads to yet, the
//! switch, and the deletion of map entries and maps that old rules read
//! (see [`diff::Script`] for the races that make them wait).
//!
//! ```text
//!  apply(changes) ── per changed service port: its rules before (recomputed
//!        │           from the applied input) and after (ruleset::service_rules)
//!        ▼
//!  diff::partial(applied model, changes) ──► netlink batches: staged adds,
//!        │                                   the switch, trailing deletes
//!        │  ok: commit the changes into the applied model
//!        └─ error, or more shards needed: diff::full_ops (recreate every
//!           table, streamed into one batch, atomic)
//! ```
//!
//! The applied model lives in memory and is lean (see
//! [`ruleset::Ruleset`]): a sync costs the size of the change; the kernel
//! ruleset is never listed, except for the names of the tables when all of
//! them are recreated. The main table carries the model's fingerprint
//! ([`ruleset::Ruleset::fingerprint`]): on start, tables whose fingerprint
//! equals the desired model's are adopted as they are (a restart neither
//! flushes nor rebuilds them); otherwise, and after any failure, every
//! table is recreated in one transaction. [`NftablesProxy::verify`] (the
//! daemon calls it periodically) compares the kernel's ruleset generation
//! with the one our last commit produced; if anyone else committed since,
//! the tables are recreated from the model, which repairs whatever they
//! did to them. The ruleset's shape is documented in [`ruleset`]; the wire
//! format in [`netlink`].
//!
//! # Why shards: what a change costs in the kernel
//!
//! A transaction that adds a rule, or a map element that jumps to a chain,
//! makes nf_tables re-validate every chain reachable from the base chains
//! of *that table* (`nft_table_validate`) before it commits: ~2.4 µs per
//! service port, so ~70 ms for one change in a table of 30,000 Services,
//! whatever the size of the change. Validation is per table, so Services
//! are spread over K tables by a hash of their name ([`ruleset::shard_of`];
//! K a power of two, grown by recreating the tables when the average
//! table holds more than [`NftablesConfig::shard_size`] service ports, to
//! the K that fits twice as many, once syncs are quiet, or at once past
//! [`NftablesConfig::growth_defer`] times that): one change re-validates
//! one table of at most a few thousand.
//! Each shard table has its own NAT base chains at the same hooks; NAT
//! chains only see a connection's first packet, and the first table whose
//! dispatch map knows the destination DNATs it (the other tables' chains
//! are then skipped: nf_nat stops at the first binding). Filtering
//! (frontends without endpoints), masquerading and the hairpin set stay
//! in the main table, once.
//!
//! # Why bucket chains: what every commit costs
//!
//! Whatever a transaction changes, `nf_tables_commit` walks every chain
//! of every table in the namespace to swap in the next generation of
//! their rules. With a chain per service port that walk was 69% of the
//! node's CPU per endpoint change at 30,000 Services (`perf`, bench
//! netprog), so plain service ports share 64 bucket chains per table
//! instead (see [`ruleset`]): ~2,000 chains at 30,000 Services.
//!
//! What was tried before: endpoints in one shared data map (`dnat to
//! numgen inc mod N offset B map @endpoints`, so that replacing an
//! endpoint is only element updates) makes every new rule binding walk all
//! bindings and elements of that map (`nf_tables_bind_set`), which is
//! quadratic in a full sync (159 s at 30,000); per-service maps are found
//! by name in a list (linear per lookup), which is why plain service
//! ports share one map per bucket chain instead (a new rule then walks
//! only its bucket's entries; see [`ruleset`]). Fewer expressions per rule help
//! a little (the DNAT rules leave out `nft`'s protocol match,
//! [`netlink`]).

pub mod diff;
pub mod netlink;
pub mod ruleset;
pub mod sample;
pub mod socket;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;

use self::diff::{Change, ScriptStats};
use self::ruleset::{table_id, table_name, MapName, Ruleset, RulesetConfig, TableId};
use self::socket::{Socket, TxError};
use super::{PortChange, ProxyState};

/// Settings of the nftables proxy (flags of `fairlead node`).
#[derive(Debug, Clone)]
pub struct NftablesConfig {
    /// The main `ip` table fairlead owns; shard tables are `<table>-<n>`.
    pub table: String,
    /// This node's name, for `trafficPolicy: Local`.
    pub node_name: String,
    /// Addresses NodePorts are served on; empty = every local address
    /// except 127.0.0.0/8.
    pub nodeport_addresses: Vec<IpAddr>,
    /// The packet-mark bit asking for masquerading (kube-proxy's default:
    /// 14, mark 0x4000).
    pub masquerade_bit: u8,
    /// The Service ClusterIP ranges (network, prefix length), if known: a
    /// new connection to them that no Service rule translated is dropped
    /// rather than left to time out (see [`ruleset`]).
    pub service_ranges: Vec<(std::net::Ipv4Addr, u8)>,
    /// Program the ruleset of this network namespace (a name under
    /// /run/netns, or a path) instead of the process's own; tests use it.
    pub netns: Option<String>,
    /// Most service ports per table, on average, before the number of
    /// tables grows (see the module doc).
    pub shard_size: usize,
    /// Growth waits for a quiet moment ([`NftablesProxy::grow_if_due`])
    /// until the tables hold this many times `shard_size` on average;
    /// past that, the sync that crosses it grows them at once. 1: always
    /// at once.
    pub growth_defer: usize,
}

/// The default [`NftablesConfig::shard_size`]: one change then
/// re-validates at most a few thousand service ports' chains (a few ms).
pub const DEFAULT_SHARD_SIZE: usize = 1024;

/// When the tables grow, they are sized for this many times the service
/// ports they will hold (see [`NftablesProxy::apply`]).
const GROWTH_HEADROOM: usize = 2;

/// The default [`NftablesConfig::growth_defer`]. Growing recreates every
/// table in one transaction: ~1.5 s of kernel time at 16,000 service
/// ports, which the kernel does not preempt, so API requests of a
/// `fairlead up` loading Services stalled behind it. Deferred, a bulk
/// load grows the tables once (at 4,096 service ports) instead of three
/// times, and the rest waits until the load is over; meanwhile one change
/// re-validates a table of up to ~4 x 1,024 service ports (a few ms).
pub const DEFAULT_GROWTH_DEFER: usize = 4;

/// Most tables (the number of hooks a new connection may pass).
pub const MAX_SHARDS: u32 = 64;

impl Default for NftablesConfig {
    fn default() -> Self {
        let r = RulesetConfig::default();
        NftablesConfig {
            table: r.table,
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            masquerade_bit: r.masquerade_bit,
            service_ranges: r.service_ranges,
            netns: None,
            shard_size: DEFAULT_SHARD_SIZE,
            growth_defer: DEFAULT_GROWTH_DEFER,
        }
    }
}

impl NftablesConfig {
    fn ruleset(&self) -> RulesetConfig {
        RulesetConfig {
            table: self.table.clone(),
            node_name: self.node_name.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_bit: self.masquerade_bit,
            service_ranges: self.service_ranges.clone(),
        }
    }

    /// The number of tables `services` service ports need.
    pub fn shards_for(&self, services: usize) -> u32 {
        let per = self.shard_size.max(1);
        let k = services.div_ceil(per).max(1) as u32;
        k.next_power_of_two().min(MAX_SHARDS)
    }
}

/// Why a sync (or cleanup) failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The netlink socket could not be opened.
    #[error("opening the nf_tables netlink socket: {0}")]
    Open(#[source] std::io::Error),
    /// The transaction failed (nothing was applied).
    #[error(transparent)]
    Tx(#[from] TxError),
}

/// What one sync did (for logs, metrics and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Every table was recreated.
    pub full: bool,
    /// The tables found at start already matched; nothing was sent.
    pub adopted: bool,
    /// Service ports added or changed.
    pub services_changed: usize,
    pub services_removed: usize,
    /// Partial transactions that failed and were replaced by a full one.
    pub fallbacks: usize,
    pub script: ScriptStats,
    /// Size of the netlink batch sent.
    pub batch_bytes: usize,
    /// Tables after the sync (0 when nothing was sent).
    pub shards: u32,
}

/// What [`NftablesProxy::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Nobody committed to nf_tables since our last transaction.
    Unchanged,
    /// Someone did; the tables were recreated from the model.
    Repaired,
    /// No table programmed yet (the next sync creates it).
    NotSynced,
}

struct Inner {
    /// The model the kernel tables were last made to match (when
    /// `needs_full` is false), or the desired one (when it is true).
    model: Ruleset,
    /// The kernel tables are not known to match `model`.
    needs_full: bool,
    /// The start-up look for tables to adopt was done.
    adopt_checked: bool,
    sock: Option<Socket>,
    /// The ruleset generation our last transaction produced.
    generation: Option<u32>,
    /// The tables were recreated since the last conntrack clean-up of
    /// untranslated flows ([`NftablesProxy::clear_untranslated`]).
    recreated: bool,
}

impl Inner {
    /// Once after each recreation of the tables: the frontends whose
    /// untranslated flows are to go.
    fn take_recreated(&mut self) -> Option<crate::proxy::conntrack::Frontends> {
        if !std::mem::take(&mut self.recreated) {
            return None;
        }
        let mut f = crate::proxy::conntrack::Frontends::default();
        for (spn, info) in self.model.infos() {
            let proto = spn.protocol.number();
            for ip in info.cluster_ips.iter().chain(&info.external_ips) {
                if let IpAddr::V4(ip) = ip {
                    f.addrs.insert((*ip, proto, info.port));
                }
            }
            if let Some(np) = info.node_port {
                f.node_ports.insert((proto, np));
            }
        }
        Some(f)
    }
}

/// The socket in `slot`, opened on first use (and after an I/O error).
fn sock<'s>(slot: &'s mut Option<Socket>, netns: Option<&str>) -> Result<&'s mut Socket, NftError> {
    if slot.is_none() {
        *slot = Some(Socket::open(netns).map_err(NftError::Open)?);
    }
    Ok(slot.as_mut().expect("just opened"))
}

/// The nftables proxy of one node. [`NftablesProxy::apply`] the changes
/// the node's tracker produces (or [`NftablesProxy::sync`] a whole desired
/// state); only the difference reaches the kernel.
pub struct NftablesProxy {
    cfg: NftablesConfig,
    inner: Mutex<Inner>,
}

/// Run CPU- or syscall-heavy work (building and sending a 30,000-service
/// batch) without stalling the runtime's other tasks.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Our table ids among the kernel's table names.
fn our_tables(base: &str, names: &[String]) -> Vec<TableId> {
    let mut ids: Vec<TableId> = names.iter().filter_map(|n| table_id(base, n)).collect();
    ids.sort_unstable();
    ids
}

impl NftablesProxy {
    pub fn new(cfg: NftablesConfig) -> Self {
        let model = Ruleset::new(cfg.ruleset());
        // Present from the start (as 0), like kube-proxy's.
        metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total").increment(0);
        NftablesProxy {
            cfg,
            inner: Mutex::new(Inner {
                model,
                needs_full: true,
                adopt_checked: false,
                sock: None,
                generation: None,
                recreated: false,
            }),
        }
    }

    /// Make the kernel tables match `state` (the whole desired state): the
    /// difference to the applied model, then as [`NftablesProxy::apply`].
    pub async fn sync(&self, state: &ProxyState) -> Result<SyncStats, NftError> {
        let g = self.inner.lock().await;
        let changes = super::diff_states(g.model.infos(), state);
        self.apply_locked(g, &changes).await
    }

    /// Apply `changes` (what the node's change tracker produced): on the
    /// first call, adopt the tables found if their fingerprint matches,
    /// else recreate them; after a failure, or when the Services outgrow
    /// the tables, recreate them; otherwise one transaction with only what
    /// changed. A failed partial transaction is retried at once as a full
    /// one; an error means the kernel still has the previous tables (each
    /// transaction is atomic) and the next call recreates them.
    pub async fn apply(&self, changes: &[PortChange]) -> Result<SyncStats, NftError> {
        let g = self.inner.lock().await;
        self.apply_locked(g, changes).await
    }

    async fn apply_locked(
        &self,
        mut g: tokio::sync::MutexGuard<'_, Inner>,
        changes: &[PortChange],
    ) -> Result<SyncStats, NftError> {
        // Only UDP service ports can leave stale conntrack entries.
        let mut before = ProxyState::new();
        let mut after = ProxyState::new();
        for (spn, info) in changes {
            if spn.protocol != super::Protocol::Udp {
                continue;
            }
            if let Some(o) = g.model.infos().get(spn) {
                before.insert(spn.clone(), o.clone());
            }
            if let Some(n) = info {
                after.insert(spn.clone(), n.clone());
            }
        }
        let stats = blocking(|| self.sync_locked(&mut g, changes))?;
        let recreated = g.take_recreated();
        drop(g);
        // Only once the new rules are in: a datagram in between would
        // recreate an entry towards the old target.
        self.clear_stale_udp(&before, &after).await;
        self.clear_untranslated(recreated).await;
        Ok(stats)
    }

    /// After the tables were recreated: delete the conntrack entries of
    /// flows to Service frontends that passed the old tables untranslated
    /// as the transaction committed (see [`crate::proxy::conntrack`]).
    async fn clear_untranslated(&self, frontends: Option<crate::proxy::conntrack::Frontends>) {
        let Some(frontends) = frontends else {
            return;
        };
        let netns = self.cfg.netns.as_deref();
        match crate::proxy::conntrack::delete_untranslated(netns, frontends).await {
            Ok(n) => {
                metrics::counter!("fairlead_conntrack_entries_deleted_total").increment(n);
                if n > 0 {
                    tracing::info!(
                        entries = n,
                        "deleted conntrack entries of Service flows left untranslated as the tables were recreated"
                    );
                }
            }
            Err(e) => {
                metrics::counter!("fairlead_conntrack_cleanup_failures_total").increment(1);
                tracing::warn!(error = %e, "deleting untranslated conntrack entries");
            }
        }
    }

    /// Delete conntrack entries that would keep UDP clients on endpoints
    /// that are no longer used, and entries of UDP frontends that had no
    /// endpoints until now (see [`crate::proxy::conntrack`]).
    async fn clear_stale_udp(&self, before: &ProxyState, after: &ProxyState) {
        use crate::proxy::conntrack;
        let stale: Vec<conntrack::StaleUdp> = stale_udp(before, after).into_iter().collect();
        let n = stale.len();
        match conntrack::delete_udp(self.cfg.netns.as_deref(), stale).await {
            Ok(n) => metrics::counter!("fairlead_conntrack_entries_deleted_total").increment(n),
            Err(e) => {
                metrics::counter!("fairlead_conntrack_cleanup_failures_total").increment(1);
                tracing::warn!(error = %e, kinds = n, "deleting stale UDP conntrack entries");
            }
        }
    }

    fn sync_locked(&self, g: &mut Inner, changes: &[PortChange]) -> Result<SyncStats, NftError> {
        let table = self.cfg.table.as_str();
        let netns = self.cfg.netns.as_deref();
        let mut stats = SyncStats::default();
        // Changes that change something.
        let changes: Vec<&PortChange> = changes
            .iter()
            .filter(|(spn, info)| match (g.model.infos().get(spn), info) {
                (Some(o), Some(n)) => !(Arc::ptr_eq(o, n) || o == n),
                (None, None) => false,
                _ => true,
            })
            .collect();
        for (_, info) in &changes {
            match info {
                Some(_) => stats.services_changed += 1,
                None => stats.services_removed += 1,
            }
        }
        let added = changes
            .iter()
            .filter(|(spn, info)| info.is_some() && !g.model.infos().contains_key(spn))
            .count();
        let after = g.model.service_count() + added - stats.services_removed;
        // Too big even for deferring: grow now (else `grow_if_due` later).
        let grow = self
            .cfg
            .shards_for(after.div_ceil(self.cfg.growth_defer.max(1)))
            > g.model.shards();
        // Growing recreates every table: size them for twice as many
        // service ports (K x4 rather than x2), so that a cluster loading
        // Services from zero rebuilds ~1/3 of what it adds, not all of it.
        let grown = self.cfg.shards_for(after.saturating_mul(GROWTH_HEADROOM));
        if !g.needs_full && !grow {
            if changes.is_empty() {
                return Ok(stats);
            }
            let chs: Vec<Change> = changes
                .iter()
                .map(|(spn, info)| Change::new(&g.model, spn, info.clone()))
                .collect();
            let mut script = diff::partial(&g.model, &chs);
            let started = Instant::now();
            let s = sock(&mut g.sock, netns)?;
            let sent = if script.deletes_rules() {
                script
                    .resolve_handles(|t, chain: &str| s.rule_comments(&table_name(table, t), chain))
                    .map_err(|e| match e {
                        diff::ResolveError::List(e) => TxError::Io(e),
                        diff::ResolveError::NotFound(what) => TxError::Rejected {
                            what,
                            op: None,
                            source: std::io::Error::from_raw_os_error(libc::ENOENT),
                        },
                    })
            } else {
                Ok(())
            }
            .and_then(|()| {
                if !script.staged.is_empty() {
                    s.transact(table, &script.staged)?;
                }
                s.transact(table, &script.ops)
            })
            .and_then(|(batch, generation)| {
                // What no rule reads any more, once no packet can still be
                // reading it through an old rule (`Script::trailing`).
                if script.trailing.is_empty() {
                    return Ok((batch, generation));
                }
                s.transact(table, &script.trailing)
                    .map(|(_, generation)| (batch, generation))
            });
            match sent {
                Ok((batch, generation)) => {
                    let secs = started.elapsed().as_secs_f64();
                    metrics::histogram!("kubeproxy_sync_partial_proxy_rules_duration_seconds")
                        .record(secs);
                    metrics::counter!("fairlead_nftables_partial_syncs_total").increment(1);
                    stats.script = script.stats;
                    stats.batch_bytes = batch.bytes.len();
                    stats.shards = g.model.shards();
                    g.generation = Some(generation);
                    for ch in &chs {
                        g.model
                            .commit(&ch.spn, ch.info.clone(), ch.old.as_ref(), ch.new.as_ref());
                    }
                    self.gauges(&g.model);
                    tracing::debug!(?stats, "nftables partial sync");
                    return Ok(stats);
                }
                Err(e) => {
                    metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
                        .increment(1);
                    tracing::warn!(error = %e, "nftables partial sync failed; recreating the tables");
                    if matches!(e, TxError::Io(_)) {
                        g.sock = None;
                    }
                    stats.fallbacks += 1;
                    g.needs_full = true;
                    for ch in &chs {
                        g.model
                            .commit(&ch.spn, ch.info.clone(), ch.old.as_ref(), ch.new.as_ref());
                    }
                }
            }
        } else {
            for (spn, info) in &changes {
                g.model.set(spn, info.clone());
            }
            if grow && !g.needs_full {
                tracing::info!(
                    services = after,
                    from = g.model.shards(),
                    to = grown,
                    "more Services than the tables are sized for; recreating them with more shards"
                );
            }
            if grow {
                g.model.set_shards(grown);
            }
            g.needs_full = true;
        }
        self.full_locked(g, &mut stats)?;
        Ok(stats)
    }

    /// Recreate every table from `g.model` (or, on the first call, adopt
    /// the kernel's tables if they match it).
    fn full_locked(&self, g: &mut Inner, stats: &mut SyncStats) -> Result<(), NftError> {
        let table = self.cfg.table.as_str();
        let netns = self.cfg.netns.as_deref();
        let started = Instant::now();
        let needed = self.cfg.shards_for(g.model.service_count());
        let kernel = our_tables(
            table,
            &sock(&mut g.sock, netns)?.tables().map_err(TxError::from)?,
        );
        if !g.adopt_checked {
            g.adopt_checked = true;
            // Tables 0..k, k a power of two, as a full sync leaves them.
            let k = kernel.len() as u32;
            let contiguous = kernel.iter().enumerate().all(|(i, t)| *t == i as u32);
            if k.is_power_of_two()
                && contiguous
                && k >= needed
                && self.kernel_fingerprint(g)? == Some(g.model.fingerprint_with(k))
            {
                let generation = sock(&mut g.sock, netns)?
                    .generation()
                    .map_err(TxError::from)?;
                g.generation = Some(generation);
                g.model.set_shards(k);
                g.needs_full = false;
                stats.adopted = true;
                stats.services_changed = 0;
                stats.services_removed = 0;
                stats.shards = k;
                self.gauges(&g.model);
                metrics::counter!("fairlead_nftables_adopted_tables_total").increment(1);
                tracing::info!(
                    services = g.model.service_count(),
                    tables = k,
                    "nftables tables found matching the desired state; adopted as they are"
                );
                return Ok(());
            }
        }
        let k = needed.max(g.model.shards());
        g.model.set_shards(k);
        let stale: Vec<TableId> = kernel.into_iter().filter(|t| *t >= k).collect();
        let Inner {
            model, sock: slot, ..
        } = g;
        let s = sock(slot, netns)?;
        let mut batch = netlink::Batch::new(s.batch_seq());
        let mut i = 0;
        let script_stats = diff::full_ops(model, &stale, &mut |t, op| {
            batch.push(&table_name(table, t), i, op);
            i += 1;
        });
        let sent = s.transact_batch(batch.finish(), &|i| diff::full_op_text(model, &stale, i));
        let (batch, generation) = sent.inspect_err(|e| {
            metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
                .increment(1);
            if matches!(e, TxError::Io(_)) {
                g.sock = None;
            }
        })?;
        metrics::histogram!("kubeproxy_sync_full_proxy_rules_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("fairlead_nftables_full_syncs_total").increment(1);
        stats.full = true;
        stats.script = script_stats;
        stats.batch_bytes = batch.bytes.len();
        stats.shards = k;
        g.generation = Some(generation);
        g.needs_full = false;
        g.recreated = true;
        self.gauges(&g.model);
        tracing::info!(
            services = g.model.service_count(),
            tables = k,
            chains = g.model.chain_count(),
            rules = g.model.rule_count(),
            elements = g.model.element_count(),
            bytes = stats.batch_bytes,
            secs = started.elapsed().as_secs_f64(),
            "nftables tables recreated"
        );
        Ok(())
    }

    /// The fingerprint stored in the kernel's main table, if there is one.
    fn kernel_fingerprint(&self, g: &mut Inner) -> Result<Option<u128>, NftError> {
        let keys = sock(&mut g.sock, self.cfg.netns.as_deref())?
            .set_keys(&self.cfg.table, MapName::Fingerprint.as_str())
            .map_err(TxError::from)?;
        Ok(match keys.as_deref() {
            Some([k]) => <[u8; 16]>::try_from(k.as_slice())
                .ok()
                .map(u128::from_be_bytes),
            _ => None,
        })
    }

    /// Whether the tables hold more service ports than they are sized for
    /// (growth deferred, see [`NftablesConfig::growth_defer`]).
    pub async fn growth_due(&self) -> bool {
        let g = self.inner.lock().await;
        !g.needs_full && self.cfg.shards_for(g.model.service_count()) > g.model.shards()
    }

    /// Recreate the tables with more shards if they hold more service
    /// ports than they are sized for (the node calls it once syncs have
    /// been quiet for a while). Ok(true) when it did.
    pub async fn grow_if_due(&self) -> Result<bool, NftError> {
        let mut g = self.inner.lock().await;
        let grew = blocking(|| -> Result<bool, NftError> {
            let count = g.model.service_count();
            if g.needs_full || self.cfg.shards_for(count) <= g.model.shards() {
                return Ok(false);
            }
            let grown = self.cfg.shards_for(count.saturating_mul(GROWTH_HEADROOM));
            tracing::info!(
                services = count,
                from = g.model.shards(),
                to = grown,
                "more Services than the tables are sized for; recreating them with more shards"
            );
            g.model.set_shards(grown);
            g.needs_full = true;
            let mut stats = SyncStats::default();
            self.full_locked(&mut g, &mut stats)?;
            Ok(true)
        })?;
        let recreated = g.take_recreated();
        drop(g);
        self.clear_untranslated(recreated).await;
        Ok(grew)
    }

    /// The periodic check: if anyone committed to nf_tables since our last
    /// transaction, recreate the tables from the model (which undoes
    /// whatever they did to them; other tables are not ours to judge).
    pub async fn verify(&self) -> Result<Verified, NftError> {
        let mut g = self.inner.lock().await;
        let verified = blocking(|| -> Result<Verified, NftError> {
            if g.needs_full || g.generation.is_none() {
                return Ok(Verified::NotSynced);
            }
            let now = sock(&mut g.sock, self.cfg.netns.as_deref())?
                .generation()
                .map_err(TxError::from)?;
            if Some(now) == g.generation {
                return Ok(Verified::Unchanged);
            }
            tracing::info!(
                ours = g.generation,
                now,
                "the nf_tables ruleset changed since our last transaction; recreating our tables"
            );
            metrics::counter!("fairlead_nftables_repairs_total").increment(1);
            g.needs_full = true;
            self.sync_locked(&mut g, &[])?;
            Ok(Verified::Repaired)
        })?;
        let recreated = g.take_recreated();
        drop(g);
        self.clear_untranslated(recreated).await;
        Ok(verified)
    }

    /// Delete every table (the daemon's `--cleanup`). The next sync
    /// recreates them.
    pub async fn cleanup(&self) -> Result<(), NftError> {
        let mut g = self.inner.lock().await;
        g.needs_full = true;
        g.adopt_checked = true;
        let table = self.cfg.table.clone();
        blocking(|| delete_tables(sock(&mut g.sock, self.cfg.netns.as_deref())?, &table))
    }

    /// The model of what the kernel tables were last made to match.
    pub async fn applied(&self) -> Ruleset {
        self.inner.lock().await.model.clone()
    }

    fn gauges(&self, r: &Ruleset) {
        metrics::gauge!("fairlead_nftables_chains").set(r.chain_count() as f64);
        metrics::gauge!("fairlead_nftables_rules").set(r.rule_count() as f64);
        metrics::gauge!("fairlead_nftables_map_elements").set(r.element_count() as f64);
        metrics::gauge!("fairlead_nftables_affinity_sets").set(r.set_count() as f64);
        metrics::gauge!("fairlead_nftables_tables").set(r.shards() as f64);
        metrics::gauge!("fairlead_nftables_endpoint_maps").set(r.map_count() as f64);
    }
}

/// What to clean up between two states: for UDP service ports, endpoints
/// no longer usable, and frontends that gain their first endpoint.
fn stale_udp(
    before: &ProxyState,
    after: &ProxyState,
) -> std::collections::BTreeSet<crate::proxy::conntrack::StaleUdp> {
    use crate::proxy::conntrack::StaleUdp;
    use std::collections::BTreeSet;
    let v4 = |addrs: Vec<std::net::SocketAddr>| -> BTreeSet<std::net::SocketAddrV4> {
        addrs
            .into_iter()
            .filter_map(|a| match a {
                std::net::SocketAddr::V4(v) => Some(v),
                std::net::SocketAddr::V6(_) => None,
            })
            .collect()
    };
    let mut out = BTreeSet::new();
    for (spn, old) in before {
        if spn.protocol != super::Protocol::Udp {
            continue;
        }
        let new = after.get(spn);
        if new.is_some_and(|n| Arc::ptr_eq(n, old) || n == old) {
            continue;
        }
        let kept = new
            .map(|n| v4(n.usable_endpoints(None)))
            .unwrap_or_default();
        for ep in v4(old.usable_endpoints(None)) {
            if !kept.contains(&ep) {
                out.insert(StaleUdp::ToEndpoint(ep));
            }
        }
    }
    for (spn, new) in after {
        if spn.protocol != super::Protocol::Udp || new.usable_endpoints(None).is_empty() {
            continue;
        }
        let had = before
            .get(spn)
            .is_some_and(|o| !o.usable_endpoints(None).is_empty());
        if had {
            continue;
        }
        for ip in new.cluster_ips.iter().chain(&new.external_ips) {
            if let IpAddr::V4(ip) = ip {
                out.insert(StaleUdp::ToFrontend(*ip, new.port));
            }
        }
        if let Some(np) = new.node_port {
            out.insert(StaleUdp::ToNodePort(np));
        }
    }
    out
}

/// Delete every table of ours (the main one and its shards) that exists,
/// in one transaction (`add` before `delete`, so none can be missing).
fn delete_tables(sock: &mut Socket, table: &str) -> Result<(), NftError> {
    let mut ids = our_tables(table, &sock.tables().map_err(TxError::from)?);
    if !ids.contains(&0) {
        ids.insert(0, 0);
    }
    let ops: Vec<(TableId, diff::Op)> = ids
        .iter()
        .flat_map(|t| {
            [
                (*t, diff::Op::AddTable { comment: None }),
                (*t, diff::Op::DeleteTable),
            ]
        })
        .collect();
    sock.transact(table, &ops)?;
    Ok(())
}

/// Delete fairlead's tables (`table` and its shards `table-<n>`) if they
/// exist, atomically, in this process's network namespace or in `netns`.
pub async fn cleanup(netns: Option<&str>, table: &str) -> Result<(), NftError> {
    blocking(|| {
        let mut sock = Socket::open(netns).map_err(NftError::Open)?;
        delete_tables(&mut sock, table)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::conntrack::StaleUdp;
    use crate::proxy::nftables::ruleset::tests::{ep, info, spn};
    use crate::proxy::Protocol;

    #[test]
    fn stale_udp_endpoints_and_first_endpoints() {
        let dns = spn("kube-system", "dns", "dns", Protocol::Udp);
        let web = spn("default", "web", "", Protocol::Tcp);
        let mut before = ProxyState::new();
        before.insert(
            dns.clone(),
            Arc::new(info(
                "10.96.0.10",
                53,
                vec![ep("10.244.0.1:53", "n"), ep("10.244.0.2:53", "n")],
            )),
        );
        before.insert(
            web.clone(),
            Arc::new(info("10.96.0.20", 80, vec![ep("10.244.0.3:80", "n")])),
        );
        // TCP changes need nothing; a removed UDP endpoint does.
        let mut after = ProxyState::new();
        after.insert(
            dns.clone(),
            Arc::new(info("10.96.0.10", 53, vec![ep("10.244.0.2:53", "n")])),
        );
        let got: Vec<StaleUdp> = stale_udp(&before, &after).into_iter().collect();
        assert_eq!(
            got,
            vec![StaleUdp::ToEndpoint("10.244.0.1:53".parse().unwrap())]
        );
        // A UDP service port going from none to some endpoints.
        let mut empty = info("10.96.0.11", 53, vec![]);
        empty.node_port = Some(30053);
        let q = spn("a", "q", "", Protocol::Udp);
        before.insert(q.clone(), Arc::new(empty.clone()));
        empty.endpoints = vec![ep("10.244.0.9:53", "n")];
        after.insert(q, Arc::new(empty));
        let got: Vec<StaleUdp> = stale_udp(&before, &after).into_iter().collect();
        assert_eq!(
            got,
            vec![
                StaleUdp::ToEndpoint("10.244.0.1:53".parse().unwrap()),
                StaleUdp::ToFrontend("10.96.0.11".parse().unwrap(), 53),
                StaleUdp::ToNodePort(30053),
            ]
        );
        // Nothing changed: nothing to do.
        assert!(stale_udp(&after, &after).is_empty());
    }
}
