//! From one model of fairlead's tables to another: the operations that
//! change only what differs, applied by the kernel as one atomic
//! transaction (encoded as netlink messages by [`super::netlink`];
//! [`Script::text`] renders the same operations as an `nft -f` script, for
//! golden files and tests). Every operation names the table it acts on
//! ([`TableId`]: the main table or a shard).
//!
//! A sync is a list of [`Change`]s (service ports whose rules were added,
//! replaced or removed, with their rules before and after). Chain and set
//! names are unique to a service port and live in its shard table, so
//! chains are diffed per service port by name; dispatch keys may in theory
//! be claimed by several service ports, so elements are resolved through
//! the model's claims (the first claimant in name order wins, as in a full
//! build, and its element lives in its shard's map). Operation order keeps
//! every reference valid inside the transaction:
//!
//! ```text
//!  1. add set, add map + entries     (new affinity sets, endpoint maps)
//!     delete/add map entry           (endpoint maps that stay: a data map,
//!                                     so no re-validation)
//!  2. add chain / flush chain        (new chains / chains whose rules changed)
//!  3. add rule                       (their rules; may jump to 1.–2.)
//!  4. delete element                 (removed, or changing verdict; and the
//!                                     old fingerprint)
//!  5. add element                    (new, or changed verdict; and the new
//!                                     fingerprint)
//!  6. flush chain + delete chain     (chains gone; nothing points at them now)
//!  7. delete set / map               (gone; their users were flushed)
//! ```
//!
//! A full sync ([`full_ops`]) recreates every table in one transaction and
//! is streamed: each service port's rules are computed, emitted and
//! dropped, so rebuilding 30,000 Services never holds all their rules at
//! once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use super::ruleset::{
    bucket_chain, bucket_map, service_rules, shard_base_chains, shard_of, table_name, AffinitySet,
    BaseChain, BucketRule, Chain, ElementKey, EndpointMap, EntryKey, Key, MapName, Rule, Ruleset,
    ServiceRules, TableId, Verdict, BASE_CHAINS, BUCKET_MAP_TYPE, HELPER_CHAINS,
    SHARD_HELPER_CHAINS, SHARD_MAPS,
};

/// The comment of every bucket chain.
pub const BUCKET_COMMENT: &str = "plain service ports: one rule each";
use crate::proxy::{ServicePortInfo, ServicePortName};

/// One service port's input, rules and table before and after a sync
/// (`None`: absent).
#[derive(Clone, Debug)]
pub struct Change {
    pub spn: ServicePortName,
    /// The new input (`None`: removed).
    pub info: Option<Arc<ServicePortInfo>>,
    pub old: Option<ServiceRules>,
    pub new: Option<ServiceRules>,
    pub old_table: TableId,
    pub new_table: TableId,
}

impl Change {
    /// The change of `spn` to `info` against `model` (rules recomputed).
    pub fn new(
        model: &Ruleset,
        spn: &ServicePortName,
        info: Option<Arc<ServicePortInfo>>,
    ) -> Change {
        Change {
            spn: spn.clone(),
            old: model.rules_of(spn),
            new: info.as_ref().map(|i| service_rules(&model.cfg, spn, i)),
            old_table: model.table_of(spn),
            new_table: info
                .as_deref()
                .map_or(0, |i| shard_of(spn, i, model.shards())),
            info,
        }
    }
}

/// What a script does, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScriptStats {
    pub chains_added: usize,
    pub chains_flushed: usize,
    pub chains_deleted: usize,
    pub rules_added: usize,
    pub sets_added: usize,
    pub sets_deleted: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub maps_added: usize,
    pub maps_deleted: usize,
    /// Endpoint map entries added or deleted (in maps that stay).
    pub map_entries_changed: usize,
    /// Rules deleted one by one (from bucket chains that stay).
    pub rules_deleted: usize,
    /// Tables the transaction touched (each one the kernel re-validates
    /// when a rule or a jump was added to it).
    pub tables: usize,
}

/// One operation on one of fairlead's tables. Borrowed from the rules it
/// was computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// Create the table if missing (with a comment: a new table).
    AddTable {
        comment: Option<&'static str>,
    },
    DeleteTable,
    /// Create one of the fixed maps or sets.
    AddMap(MapName),
    AddBaseChain(&'static BaseChain),
    AddChain {
        name: &'a str,
        comment: Option<&'a str>,
    },
    /// Delete every rule of a chain.
    FlushChain(&'a str),
    DeleteChain(&'a str),
    AddRule {
        chain: &'a str,
        rule: &'a Rule,
        /// Only bucket rules carry one (see [`Op::DeleteRule`]).
        comment: Option<&'a str>,
    },
    /// Delete one rule of a bucket chain: the one whose comment is
    /// `comment`. Its kernel `handle` is looked up right before the
    /// transaction ([`Script::resolve_handles`]; 0 until then).
    DeleteRule {
        chain: &'a str,
        comment: &'a str,
        handle: u64,
    },
    AddSet(&'a AffinitySet),
    /// Delete a set or a map.
    DeleteSet(&'a str),
    /// Create an endpoint map (empty).
    AddEndpointMap(&'a EndpointMap),
    /// Create bucket `b`'s shared endpoint map (empty).
    AddBucketMap(u32),
    /// One entry of an endpoint map.
    AddMapEntry {
        map: &'a str,
        key: EntryKey,
        to: SocketAddrV4,
    },
    DeleteMapEntry {
        map: &'a str,
        key: EntryKey,
    },
    AddElement {
        map: MapName,
        key: Key,
        verdict: Option<Verdict>,
    },
    DeleteElement {
        map: MapName,
        key: Key,
    },
}

impl Op<'_> {
    /// The operation as an `nft -f` statement (one line, no newline).
    pub fn render(&self, t: &str, out: &mut String) {
        let _ = match self {
            Op::AddTable { comment: None } => write!(out, "add table ip {t}"),
            Op::AddTable { comment: Some(c) } => {
                write!(out, "add table ip {t} {{ comment \"{c}\" ; }}")
            }
            Op::DeleteTable => write!(out, "delete table ip {t}"),
            Op::AddMap(m) if m.is_set() => write!(
                out,
                "add set ip {t} {} {{ type {} ; }}",
                m.as_str(),
                m.key_type()
            ),
            Op::AddMap(m) => write!(
                out,
                "add map ip {t} {} {{ type {} : verdict ; }}",
                m.as_str(),
                m.key_type()
            ),
            Op::AddBaseChain(b) => write!(
                out,
                "add chain ip {t} {} {{ type {} hook {} priority {} ; policy accept ; }}",
                b.name,
                b.kind,
                b.hook.as_str(),
                b.priority
            ),
            Op::AddChain {
                name,
                comment: None,
            } => write!(out, "add chain ip {t} {name}"),
            Op::AddChain {
                name,
                comment: Some(c),
            } => write!(out, "add chain ip {t} {name} {{ comment \"{c}\" ; }}"),
            Op::FlushChain(c) => write!(out, "flush chain ip {t} {c}"),
            Op::DeleteChain(c) => write!(out, "delete chain ip {t} {c}"),
            Op::AddRule {
                chain,
                rule,
                comment: None,
            } => write!(out, "add rule ip {t} {chain} {rule}"),
            Op::AddRule {
                chain,
                rule,
                comment: Some(c),
            } => write!(out, "add rule ip {t} {chain} {rule} comment \"{c}\""),
            Op::DeleteRule { chain, handle, .. } => {
                write!(out, "delete rule ip {t} {chain} handle {handle}")
            }
            Op::AddSet(s) => write!(
                out,
                "add set ip {t} {} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {}s ; }}",
                s.name, s.timeout_secs
            ),
            Op::DeleteSet(s) => write!(out, "delete set ip {t} {s}"),
            Op::AddEndpointMap(m) => {
                write!(out, "add map ip {t} {} {{ {} ; }}", m.name, m.type_text())
            }
            Op::AddBucketMap(b) => write!(
                out,
                "add map ip {t} {} {{ {BUCKET_MAP_TYPE} ; }}",
                bucket_map(*b)
            ),
            Op::AddMapEntry { map, key, to } => write!(
                out,
                "add element ip {t} {map} {{ {key} : {} . {} }}",
                to.ip(),
                to.port()
            ),
            Op::DeleteMapEntry { map, key } => {
                write!(out, "delete element ip {t} {map} {{ {key} }}")
            }
            Op::AddElement {
                map,
                key,
                verdict: Some(v),
            } => write!(out, "add element ip {t} {} {{ {key} : {v} }}", map.as_str()),
            Op::AddElement {
                map,
                key,
                verdict: None,
            } => write!(out, "add element ip {t} {} {{ {key} }}", map.as_str()),
            Op::DeleteElement { map, key } => {
                write!(out, "delete element ip {t} {} {{ {key} }}", map.as_str())
            }
        };
    }
}

/// The operations of a sync, each on its table, and what they do: up to
/// three transactions, sent in turn ([`Script::staged`], [`Script::ops`],
/// [`Script::trailing`]), because a packet does not see one transaction
/// whole. It picks the generation of the rules it runs as it enters the
/// hook, but each map lookup reads the generation current at that moment:
/// a packet running as a transaction commits can take a new dispatch
/// verdict into a chain whose rules it still sees as they were, or run an
/// old rule against the new map entries.
#[derive(Clone, Debug, Default)]
pub struct Script<'a> {
    /// What nothing leads to yet: new sets, maps and entries, chains, and
    /// rules added to chains that are not flushed here (a bucket rule goes
    /// after the frontend's old one, which matches first until it is
    /// deleted). Committed first, so that when [`Script::ops`] points a
    /// frontend's dispatch element at a chain (a new Service, or one that
    /// moved between a bucket and a chain of its own), a packet that looks
    /// the element up as it commits runs a chain that already holds the
    /// frontend's rule, with its entries.
    pub staged: Vec<(TableId, Op<'a>)>,
    /// The switch: dispatch elements, flushed chains and their rules,
    /// entries rewritten in place, rule and chain deletions.
    pub ops: Vec<(TableId, Op<'a>)>,
    /// Deletions of bucket map entries that no rule of the new ruleset
    /// reads, for a third transaction right after `ops`'. Why not in the
    /// same one as the rule change: a packet picks the generation of the
    /// rules it runs when it enters the hook, but each map lookup reads the
    /// generation current at that moment. A packet that ran a frontend's old rule (`numgen inc
    /// mod 6`) as the transaction that shrinks it to `mod 2` committed
    /// then looked up index 4 among the new generation's entries, found
    /// none, and left without a DNAT: its connection's conntrack entry
    /// kept it un-translated, so the client's retransmits went nowhere
    /// too (a connect timeout; 7 in 112,400 connections while the
    /// endpoints changed 10,000 times, none with the endpoint count held).
    /// Left for a transaction of their own, those entries outlive every
    /// packet that could still read them through an old rule. Endpoint
    /// maps deleted whole (a Service that changed between a bucket chain
    /// and one of its own, or its own chain's count) go here too, with
    /// their entries: deleting a map deactivates its entries in the new
    /// generation. A Service toggled between a plain and a NodePort one
    /// every millisecond timed out 2-4 of 12,000-15,000 connections in
    /// 15 s (`nft monitor trace`: the dispatch verdict, then no rule of
    /// the chain matched) with either the staging or the late map
    /// deletions alone; 0 of 34,500 with both.
    pub trailing: Vec<(TableId, Op<'a>)>,
    pub stats: ScriptStats,
}

impl Script<'_> {
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty() && self.ops.is_empty() && self.trailing.is_empty()
    }

    /// Fill in the kernel handles of the rules to delete: `rules(table,
    /// chain)` lists a chain's rules as (handle, comment). One listing per
    /// bucket chain, and only when a sync deletes from it (a Service
    /// removed, or its number of endpoints changed).
    pub fn resolve_handles<E, F>(&mut self, mut rules: F) -> Result<(), ResolveError<E>>
    where
        F: FnMut(TableId, &str) -> Result<Vec<HandleComment>, E>,
    {
        let mut listed: HashMap<(TableId, String), Vec<HandleComment>> = HashMap::new();
        for (t, op) in self.ops.iter_mut() {
            let Op::DeleteRule {
                chain,
                comment,
                handle,
            } = op
            else {
                continue;
            };
            let key = (*t, chain.to_string());
            if !listed.contains_key(&key) {
                let l = rules(*t, chain).map_err(ResolveError::List)?;
                listed.insert(key.clone(), l);
            }
            let mut found = listed[&key].iter().filter(|(_, c)| c == comment);
            match (found.next(), found.next()) {
                (Some((h, _)), None) => *handle = *h,
                _ => {
                    return Err(ResolveError::NotFound(format!(
                        "no single rule with comment {comment:?} in chain {chain}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Whether [`Script::resolve_handles`] has anything to do.
    pub fn deletes_rules(&self) -> bool {
        self.ops
            .iter()
            .any(|(_, op)| matches!(op, Op::DeleteRule { .. }))
    }

    /// The script as `nft -f` text (both transactions, one after the
    /// other), `base` naming the main table.
    pub fn text(&self, base: &str) -> String {
        let mut out = String::with_capacity(96 * self.ops.len());
        for (t, op) in self.staged.iter().chain(&self.ops).chain(&self.trailing) {
            op.render(&table_name(base, *t), &mut out);
            out.push('\n');
        }
        out
    }
}

/// A rule as a chain's listing gives it: its kernel handle and comment.
pub type HandleComment = (u64, String);

/// Why the handles of rules to delete could not be found.
#[derive(Debug)]
pub enum ResolveError<E> {
    /// Listing a chain failed.
    List(E),
    /// The chain does not hold exactly one rule with the comment.
    NotFound(String),
}

impl<E: std::fmt::Display> std::fmt::Display for ResolveError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::List(e) => write!(f, "listing a bucket chain: {e}"),
            ResolveError::NotFound(s) => f.write_str(s),
        }
    }
}

/// The changes that turn `old` into `new` (two models over the same
/// configuration and number of shards; for tests and tools).
pub fn changes(old: &Ruleset, new: &Ruleset) -> Vec<Change> {
    crate::proxy::diff_states(old.infos(), new.infos())
        .into_iter()
        .map(|(spn, info)| Change::new(old, &spn, info))
        .collect()
}

// ---- full -------------------------------------------------------------------

/// The operations (re)creating every table of `model` atomically (`add
/// table` first, so the `delete` cannot fail on a missing table), and
/// deleting the shard tables in `stale` (left over from a larger number of
/// shards). Each operation is handed to `emit` as it is produced (see the
/// module doc); returns what the script does.
pub fn full_ops(
    model: &Ruleset,
    stale: &[TableId],
    emit: &mut dyn FnMut(TableId, &Op),
) -> ScriptStats {
    let mut stats = ScriptStats {
        elements_added: model.element_count(),
        tables: model.shards() as usize + stale.len(),
        ..ScriptStats::default()
    };
    let shards = model.shards();
    for t in 0..shards {
        emit(t, &Op::AddTable { comment: None });
        emit(t, &Op::DeleteTable);
        emit(
            t,
            &Op::AddTable {
                comment: Some("fairlead"),
            },
        );
    }
    for t in stale.iter().copied().filter(|t| *t >= shards) {
        emit(t, &Op::AddTable { comment: None });
        emit(t, &Op::DeleteTable);
    }
    for t in 0..shards {
        if t == 0 {
            for m in MapName::ALL {
                emit(t, &Op::AddMap(m));
            }
            for b in &BASE_CHAINS {
                emit(t, &Op::AddBaseChain(b));
            }
            for name in HELPER_CHAINS {
                emit(
                    t,
                    &Op::AddChain {
                        name,
                        comment: None,
                    },
                );
            }
        } else {
            for m in SHARD_MAPS {
                emit(t, &Op::AddMap(m));
            }
            for b in shard_base_chains() {
                emit(t, &Op::AddBaseChain(b));
            }
            for name in SHARD_HELPER_CHAINS {
                emit(
                    t,
                    &Op::AddChain {
                        name,
                        comment: None,
                    },
                );
            }
        }
        for (chain, rule) in model.fixed_rules(t) {
            emit(
                t,
                &Op::AddRule {
                    chain,
                    rule,
                    comment: None,
                },
            );
        }
    }
    for (t, b) in model.buckets() {
        emit(t, &Op::AddBucketMap(b));
        emit(
            t,
            &Op::AddChain {
                name: &bucket_chain(b),
                comment: Some(BUCKET_COMMENT),
            },
        );
        stats.chains_added += 1;
        stats.maps_added += 1;
    }
    for (spn, info) in model.infos() {
        let r = service_rules(&model.cfg, spn, info);
        let t = shard_of(spn, info, shards);
        for s in &r.sets {
            emit(t, &Op::AddSet(s));
        }
        for m in &r.maps {
            emit(t, &Op::AddEndpointMap(m));
            for (i, to) in m.endpoints.iter().enumerate() {
                emit(
                    t,
                    &Op::AddMapEntry {
                        map: &m.name,
                        key: EntryKey {
                            frontend: None,
                            index: i as u32,
                        },
                        to: *to,
                    },
                );
            }
        }
        stats.maps_added += r.maps.len();
        for c in &r.chains {
            emit(
                t,
                &Op::AddChain {
                    name: &c.name,
                    comment: Some(&c.comment),
                },
            );
        }
        for c in &r.chains {
            for rule in &c.rules {
                emit(
                    t,
                    &Op::AddRule {
                        chain: &c.name,
                        rule,
                        comment: None,
                    },
                );
            }
        }
        if let Some(b) = &r.bucket {
            emit(
                t,
                &Op::AddRule {
                    chain: &b.chain,
                    rule: &b.rule,
                    comment: Some(&b.comment),
                },
            );
            // Its entries in the shared map, when its frontend is its own
            // (the programmed claimant of the frontend's dispatch key).
            let frontend = b.frontend();
            let mine = model
                .claimants(&(MapName::ServiceIps, frontend))
                .is_some_and(|c| c.first() == spn);
            if mine {
                for (i, to) in b.endpoints.iter().enumerate() {
                    emit(
                        t,
                        &Op::AddMapEntry {
                            map: bucket_map(b.bucket),
                            key: EntryKey {
                                frontend: Some(frontend),
                                index: i as u32,
                            },
                            to: *to,
                        },
                    );
                }
            }
        }
        stats.chains_added += r.chains.len();
        stats.rules_added += r.rule_count();
        stats.sets_added += r.sets.len();
        // The elements this service port is the programmed claimant of.
        for e in r
            .elements
            .iter()
            .filter(|e| e.map != MapName::HairpinEndpoints)
        {
            let mine = model
                .claimants(&(e.map, e.key))
                .is_some_and(|c| c.first() == spn);
            if mine {
                emit(
                    if e.map.per_shard() { t } else { 0 },
                    &Op::AddElement {
                        map: e.map,
                        key: e.key,
                        verdict: e.verdict.clone(),
                    },
                );
            }
        }
    }
    let mut hairpin: Vec<Ipv4Addr> = model.hairpin_ips().collect();
    hairpin.sort_unstable();
    for ip in hairpin {
        emit(
            0,
            &Op::AddElement {
                map: MapName::HairpinEndpoints,
                key: Key::Pair(ip, ip),
                verdict: None,
            },
        );
    }
    emit(
        0,
        &Op::AddElement {
            map: MapName::Fingerprint,
            key: Key::Fingerprint(model.fingerprint()),
            verdict: None,
        },
    );
    stats
}

/// [`full_ops`] as `nft -f` text.
pub fn full_text(model: &Ruleset, stale: &[TableId]) -> String {
    let mut out = String::new();
    let base = model.cfg.table.clone();
    full_ops(model, stale, &mut |t, op| {
        op.render(&table_name(&base, t), &mut out);
        out.push('\n');
    });
    out
}

/// The `index`-th operation of [`full_ops`], rendered (for errors).
pub fn full_op_text(model: &Ruleset, stale: &[TableId], index: usize) -> Option<String> {
    let mut i = 0;
    let mut found = None;
    let base = model.cfg.table.clone();
    full_ops(model, stale, &mut |t, op| {
        if i == index {
            let mut s = String::new();
            op.render(&table_name(&base, t), &mut s);
            found = Some(s);
        }
        i += 1;
    });
    found
}

// ---- partial ----------------------------------------------------------------

/// A frontend's entries in a bucket's shared endpoint map, before and
/// after: (table, bucket, endpoints).
type BucketEntries = Option<(TableId, u32, Vec<SocketAddrV4>)>;

/// The entry operations from `before` to `after` for one frontend: in the
/// same map, only the indices whose endpoint differs.
fn bucket_entries(
    frontend: Key,
    before: BucketEntries,
    after: BucketEntries,
    del: &mut Vec<(TableId, &str, EntryKey)>,
    add: &mut Vec<(TableId, &str, EntryKey, SocketAddrV4)>,
) {
    let key = |index: usize| EntryKey {
        frontend: Some(frontend),
        index: index as u32,
    };
    let (old, new) = match (before, after) {
        (Some((t0, b0, old)), Some((t1, b1, new))) if (t0, b0) == (t1, b1) => {
            let map = bucket_map(b0);
            for i in 0..old.len().max(new.len()) {
                match (old.get(i), new.get(i)) {
                    (Some(a), Some(b)) if a == b => {}
                    (a, b) => {
                        if a.is_some() {
                            del.push((t0, map, key(i)));
                        }
                        if let Some(b) = b {
                            add.push((t0, map, key(i), *b));
                        }
                    }
                }
            }
            return;
        }
        (old, new) => (old, new),
    };
    if let Some((t, b, eps)) = old {
        del.extend((0..eps.len()).map(|i| (t, bucket_map(b), key(i))));
    }
    if let Some((t, b, eps)) = new {
        add.extend(
            eps.into_iter()
                .enumerate()
                .map(|(i, ep)| (t, bucket_map(b), key(i), ep)),
        );
    }
}

/// The operations applying `changes` to the tables `applied` describes.
pub fn partial<'a>(applied: &Ruleset, changes: &'a [Change]) -> Script<'a> {
    let mut stats = ScriptStats::default();
    let mut add_sets: Vec<(TableId, &AffinitySet)> = Vec::new();
    let mut del_sets: Vec<(TableId, &AffinitySet)> = Vec::new();
    let mut new_chains: Vec<(TableId, &Chain)> = Vec::new();
    let mut flushed: Vec<(TableId, &Chain)> = Vec::new();
    let mut gone: Vec<(TableId, &Chain)> = Vec::new();
    let mut add_maps: Vec<(TableId, &EndpointMap)> = Vec::new();
    let mut del_maps: Vec<(TableId, &EndpointMap)> = Vec::new();
    // Entries of maps that stay: (table, map, key, new endpoint).
    let mut del_entries: Vec<(TableId, &str, EntryKey)> = Vec::new();
    let mut add_entries: Vec<(TableId, &str, EntryKey, SocketAddrV4)> = Vec::new();
    let mut touched: BTreeSet<ElementKey> = BTreeSet::new();
    // Per touched key, the changed service ports claiming it after the
    // change (so that resolving a key costs its claimants, not every
    // change: a sync of thousands of changes stays linear).
    let mut claimed_after: HashMap<ElementKey, Vec<&ServicePortName>> = HashMap::new();
    let mut hairpin: BTreeMap<Ipv4Addr, i64> = BTreeMap::new();
    let by_spn: HashMap<&ServicePortName, &Change> = changes.iter().map(|c| (&c.spn, c)).collect();
    let mut tables: BTreeSet<TableId> = BTreeSet::new();
    // Bucket rules added and deleted, and how each bucket's count moves.
    let mut add_bucket: Vec<(TableId, &BucketRule)> = Vec::new();
    let mut del_bucket: Vec<(TableId, &BucketRule)> = Vec::new();
    let mut bucket_delta: BTreeMap<(TableId, u32), (i64, &str)> = BTreeMap::new();

    static EMPTY: std::sync::LazyLock<ServiceRules> =
        std::sync::LazyLock::new(ServiceRules::default);
    for ch in changes {
        let old = ch.old.as_ref().unwrap_or(&EMPTY);
        let new = ch.new.as_ref().unwrap_or(&EMPTY);
        let rule_of = |r: &'a ServiceRules| r.bucket.as_ref().map(|b| (&b.chain, &b.rule));
        if ch.old_table != ch.new_table || rule_of(old) != rule_of(new) {
            if let Some(b) = &old.bucket {
                del_bucket.push((ch.old_table, b));
                bucket_delta
                    .entry((ch.old_table, b.bucket))
                    .or_insert((0, &b.chain))
                    .0 -= 1;
            }
            if let Some(b) = &new.bucket {
                add_bucket.push((ch.new_table, b));
                bucket_delta
                    .entry((ch.new_table, b.bucket))
                    .or_insert((0, &b.chain))
                    .0 += 1;
            }
        }
        if ch.old_table == ch.new_table {
            let t = ch.new_table;
            let old_chains: HashMap<&str, &Chain> =
                old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
            let new_names: BTreeSet<&str> = new.chains.iter().map(|c| c.name.as_str()).collect();
            for c in &new.chains {
                match old_chains.get(c.name.as_str()) {
                    None => new_chains.push((t, c)),
                    Some(o) if o.rules != c.rules => flushed.push((t, c)),
                    Some(_) => {}
                }
            }
            gone.extend(
                old.chains
                    .iter()
                    .filter(|c| !new_names.contains(c.name.as_str()))
                    .map(|c| (t, c)),
            );
            add_sets.extend(
                new.sets
                    .iter()
                    .filter(|s| !old.sets.contains(s))
                    .map(|s| (t, s)),
            );
            del_sets.extend(
                old.sets
                    .iter()
                    .filter(|s| !new.sets.contains(s))
                    .map(|s| (t, s)),
            );
            for m in &new.maps {
                match old.maps.iter().find(|o| o.name == m.name) {
                    None => add_maps.push((t, m)),
                    // Same name, same number of entries: change the
                    // entries that differ.
                    Some(o) => {
                        for (i, (a, b)) in o.endpoints.iter().zip(&m.endpoints).enumerate() {
                            if a != b {
                                let key = EntryKey {
                                    frontend: None,
                                    index: i as u32,
                                };
                                del_entries.push((t, &m.name, key));
                                add_entries.push((t, &m.name, key, *b));
                            }
                        }
                    }
                }
            }
            del_maps.extend(
                old.maps
                    .iter()
                    .filter(|o| !new.maps.iter().any(|m| m.name == o.name))
                    .map(|m| (t, m)),
            );
        } else {
            // Moving to another table (it gained or lost a NodePort):
            // everything is new there and gone here.
            new_chains.extend(new.chains.iter().map(|c| (ch.new_table, c)));
            add_sets.extend(new.sets.iter().map(|s| (ch.new_table, s)));
            add_maps.extend(new.maps.iter().map(|m| (ch.new_table, m)));
            gone.extend(old.chains.iter().map(|c| (ch.old_table, c)));
            del_sets.extend(old.sets.iter().map(|s| (ch.old_table, s)));
            del_maps.extend(old.maps.iter().map(|m| (ch.old_table, m)));
        }
        for (rules, sign) in [(old, -1i64), (new, 1)] {
            for e in &rules.elements {
                match e.key {
                    Key::Pair(ip, _) if e.map == MapName::HairpinEndpoints => {
                        *hairpin.entry(ip).or_default() += sign;
                    }
                    _ => {
                        touched.insert((e.map, e.key));
                        if sign > 0 {
                            claimed_after
                                .entry((e.map, e.key))
                                .or_default()
                                .push(&ch.spn);
                        }
                    }
                }
            }
        }
    }

    // Dispatch elements: the programmed claimant's (table, verdict) before
    // and after.
    let verdict_in = |rules: Option<&ServiceRules>, key: &ElementKey| -> Option<Option<Verdict>> {
        rules?
            .elements
            .iter()
            .find(|e| (e.map, e.key) == *key)
            .map(|e| e.verdict.clone())
    };
    // The table of a claimant's element, before or after.
    let table_of = |spn: &ServicePortName, key: &ElementKey, after: bool| {
        if !key.0.per_shard() {
            return 0;
        }
        match by_spn.get(spn) {
            Some(ch) if after => ch.new_table,
            Some(ch) => ch.old_table,
            None => applied.table_of(spn),
        }
    };
    let mut del_elements: Vec<(TableId, ElementKey)> = Vec::new();
    let mut add_elements: Vec<(TableId, ElementKey, Option<Verdict>)> = Vec::new();
    for key in &touched {
        let before: Vec<&ServicePortName> = applied
            .claimants(key)
            .map(|c| c.iter().collect())
            .unwrap_or_default();
        let old_prog = before.first().and_then(|spn| {
            let v = match by_spn.get(*spn) {
                Some(ch) => verdict_in(ch.old.as_ref(), key),
                None => verdict_in(applied.rules_of(spn).as_ref(), key),
            };
            v.map(|v| (table_of(spn, key, false), v))
        });
        let mut after: BTreeSet<&ServicePortName> = before
            .iter()
            .copied()
            .filter(|s| !by_spn.contains_key(*s))
            .collect();
        after.extend(claimed_after.get(key).into_iter().flatten().copied());
        let new_prog = after.first().and_then(|spn| {
            let v = match by_spn.get(*spn) {
                Some(ch) => verdict_in(ch.new.as_ref(), key),
                None => verdict_in(applied.rules_of(spn).as_ref(), key),
            };
            v.map(|v| (table_of(spn, key, true), v))
        });
        if old_prog != new_prog {
            if let Some((t, _)) = &old_prog {
                del_elements.push((*t, *key));
            }
            if let Some((t, v)) = new_prog {
                add_elements.push((t, *key, v));
            }
        }
        // A frontend's entries in its bucket's shared map: the programmed
        // claimant's, like its dispatch element.
        if key.0 == MapName::ServiceIps {
            let entries = |spn: Option<&&ServicePortName>, after: bool| -> BucketEntries {
                let spn = *spn?;
                let pick = |r: &ServiceRules| {
                    r.bucket
                        .as_ref()
                        .filter(|b| b.frontend() == key.1)
                        .map(|b| (b.bucket, b.endpoints.clone()))
                };
                let (bucket, eps) = match by_spn.get(spn) {
                    Some(ch) => pick(if after { &ch.new } else { &ch.old }.as_ref()?)?,
                    None => pick(&applied.rules_of(spn)?)?,
                };
                Some((table_of(spn, key, after), bucket, eps))
            };
            let before_eps = entries(before.first(), false);
            let after_eps = entries(after.first(), true);
            if before_eps != after_eps {
                bucket_entries(
                    key.1,
                    before_eps,
                    after_eps,
                    &mut del_entries,
                    &mut add_entries,
                );
            }
        }
    }
    // Hairpin elements: one per address in use by any service port.
    for (ip, delta) in hairpin {
        let before = applied.hairpin_count(ip) as i64;
        let after = before + delta;
        let key = (MapName::HairpinEndpoints, Key::Pair(ip, ip));
        if before > 0 && after <= 0 {
            del_elements.push((0, key));
        } else if before <= 0 && after > 0 {
            add_elements.push((0, key, None));
        }
    }

    // Bucket chains appear with their first rule and go with their last.
    // So do their shared endpoint maps.
    let mut new_buckets: Vec<(TableId, u32, &str)> = Vec::new();
    let mut gone_buckets: BTreeSet<(TableId, &str)> = BTreeSet::new();
    let mut gone_maps: Vec<(TableId, u32)> = Vec::new();
    for (&(t, b), &(delta, chain)) in &bucket_delta {
        let before = applied.bucket_count(t, b) as i64;
        let after = before + delta;
        if before == 0 && after > 0 {
            new_buckets.push((t, b, chain));
        } else if before > 0 && after <= 0 {
            gone_buckets.insert((t, chain));
            gone_maps.push((t, b));
        }
    }

    let mut ops: Vec<(TableId, Op<'a>)> = Vec::new();
    ops.extend(add_sets.iter().map(|(t, s)| (*t, Op::AddSet(s))));
    ops.extend(
        new_buckets
            .iter()
            .map(|(t, b, _)| (*t, Op::AddBucketMap(*b))),
    );
    for (t, m) in &add_maps {
        ops.push((*t, Op::AddEndpointMap(m)));
        for (i, to) in m.endpoints.iter().enumerate() {
            ops.push((
                *t,
                Op::AddMapEntry {
                    map: &m.name,
                    key: EntryKey {
                        frontend: None,
                        index: i as u32,
                    },
                    to: *to,
                },
            ));
        }
    }
    // Entries of maps that stay: a data map, so these need no
    // re-validation (nor do the deletes of whole maps, last). An entry no
    // rule reads any more (not written again here, its map staying) goes
    // in the trailing transaction (see [`Script::trailing`]).
    let rewritten: HashSet<(TableId, &str, EntryKey)> = add_entries
        .iter()
        .map(|(t, m, k, _)| (*t, *m, *k))
        .collect();
    let mut trailing = Vec::new();
    for (t, map, key) in &del_entries {
        let op = (*t, Op::DeleteMapEntry { map, key: *key });
        let map_goes = gone_maps
            .iter()
            .any(|(gt, b)| gt == t && bucket_map(*b) == *map);
        if rewritten.contains(&(*t, *map, *key)) {
            ops.push(op);
        } else if !map_goes {
            trailing.push(op);
        }
        // (A map that goes takes its entries with it, in the trailing
        // transaction too.)
    }
    ops.extend(add_entries.iter().map(|(t, map, key, to)| {
        (
            *t,
            Op::AddMapEntry {
                map,
                key: *key,
                to: *to,
            },
        )
    }));
    ops.extend(new_chains.iter().map(|(t, c)| {
        (
            *t,
            Op::AddChain {
                name: &c.name,
                comment: Some(&c.comment),
            },
        )
    }));
    ops.extend(new_buckets.iter().map(|(t, _, name)| {
        (
            *t,
            Op::AddChain {
                name,
                comment: Some(BUCKET_COMMENT),
            },
        )
    }));
    ops.extend(flushed.iter().map(|(t, c)| (*t, Op::FlushChain(&c.name))));
    ops.extend(add_bucket.iter().map(|(t, b)| {
        (
            *t,
            Op::AddRule {
                chain: &b.chain,
                rule: &b.rule,
                comment: Some(&b.comment),
            },
        )
    }));
    stats.rules_added += add_bucket.len();
    for (t, c) in new_chains.iter().chain(flushed.iter()) {
        ops.extend(c.rules.iter().map(|rule| {
            (
                *t,
                Op::AddRule {
                    chain: &c.name,
                    rule,
                    comment: None,
                },
            )
        }));
        stats.rules_added += c.rules.len();
    }
    ops.extend(del_elements.iter().map(|(t, (map, key))| {
        (
            *t,
            Op::DeleteElement {
                map: *map,
                key: *key,
            },
        )
    }));
    ops.extend(add_elements.iter().map(|(t, (map, key), verdict)| {
        (
            *t,
            Op::AddElement {
                map: *map,
                key: *key,
                verdict: verdict.clone(),
            },
        )
    }));
    // The fingerprint moves with every change of the model.
    let fingerprint = changes.iter().fold(applied.fingerprint(), |f, ch| {
        f ^ ch.old.as_ref().map_or(0, |r| r.fingerprint)
            ^ ch.new.as_ref().map_or(0, |r| r.fingerprint)
    });
    if fingerprint != applied.fingerprint() {
        ops.push((
            0,
            Op::DeleteElement {
                map: MapName::Fingerprint,
                key: Key::Fingerprint(applied.fingerprint()),
            },
        ));
        ops.push((
            0,
            Op::AddElement {
                map: MapName::Fingerprint,
                key: Key::Fingerprint(fingerprint),
                verdict: None,
            },
        ));
    }
    // Rules leaving bucket chains that stay, one by one (their handles
    // are filled in later); buckets left empty are flushed and deleted.
    for (t, b) in &del_bucket {
        if !gone_buckets.contains(&(*t, b.chain.as_str())) {
            ops.push((
                *t,
                Op::DeleteRule {
                    chain: &b.chain,
                    comment: &b.comment,
                    handle: 0,
                },
            ));
            stats.rules_deleted += 1;
        }
    }
    ops.extend(gone.iter().map(|(t, c)| (*t, Op::FlushChain(&c.name))));
    ops.extend(gone_buckets.iter().map(|(t, c)| (*t, Op::FlushChain(c))));
    ops.extend(gone.iter().map(|(t, c)| (*t, Op::DeleteChain(&c.name))));
    ops.extend(gone_buckets.iter().map(|(t, c)| (*t, Op::DeleteChain(c))));
    ops.extend(del_sets.iter().map(|(t, s)| (*t, Op::DeleteSet(&s.name))));
    // Endpoint maps go last, in the trailing transaction: deleting a map
    // deactivates its entries in the new generation, so a packet still
    // running the rule that read it would miss.
    trailing.extend(del_maps.iter().map(|(t, m)| (*t, Op::DeleteSet(&m.name))));
    trailing.extend(
        gone_maps
            .iter()
            .map(|(t, b)| (*t, Op::DeleteSet(bucket_map(*b)))),
    );
    stats.maps_added = add_maps.len() + new_buckets.len();
    stats.maps_deleted = del_maps.len() + gone_maps.len();
    stats.map_entries_changed = del_entries.len() + add_entries.len();
    stats.chains_added = new_chains.len() + new_buckets.len();
    stats.chains_flushed = flushed.len();
    stats.chains_deleted = gone.len() + gone_buckets.len();
    stats.sets_added = add_sets.len();
    stats.sets_deleted = del_sets.len();
    stats.elements_added = add_elements.len();
    stats.elements_deleted = del_elements.len();
    tables.extend(ops.iter().chain(&trailing).map(|(t, _)| *t));
    stats.tables = tables.len();
    let (staged, ops) = stage(ops);
    Script {
        staged,
        ops,
        trailing,
        stats,
    }
}

/// Split a script's operations into [`Script::staged`] and
/// [`Script::ops`], each in its order.
#[allow(clippy::type_complexity)]
fn stage(ops: Vec<(TableId, Op<'_>)>) -> (Vec<(TableId, Op<'_>)>, Vec<(TableId, Op<'_>)>) {
    let flushed: HashSet<(TableId, &str)> = ops
        .iter()
        .filter_map(|(t, op)| match op {
            Op::FlushChain(c) => Some((*t, *c)),
            _ => None,
        })
        .collect();
    let deleted: HashSet<(TableId, &str, EntryKey)> = ops
        .iter()
        .filter_map(|(t, op)| match op {
            Op::DeleteMapEntry { map, key } => Some((*t, *map, *key)),
            _ => None,
        })
        .collect();
    ops.into_iter().partition(|(t, op)| match op {
        Op::AddSet(_) | Op::AddBucketMap(_) | Op::AddEndpointMap(_) | Op::AddChain { .. } => true,
        Op::AddMapEntry { map, key, .. } => !deleted.contains(&(*t, *map, *key)),
        Op::AddRule { chain, .. } => !flushed.contains(&(*t, *chain)),
        _ => false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::ruleset::tests::{cfg, ep, golden, golden_state, info, spn};
    use super::super::ruleset::Ruleset;
    use super::*;
    use crate::proxy::{Protocol, ProxyState, ServicePortInfo};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    /// One table of the simulator. Rules carry handles (numbered per
    /// table, as the kernel does).
    #[derive(Default, Debug, Clone)]
    struct SimTable {
        chains: BTreeMap<String, Vec<(u64, String)>>,
        next_handle: u64,
        sets: BTreeMap<String, String>,
        maps: BTreeSet<String>,
        elements: BTreeMap<(String, String), String>,
    }

    impl SimTable {
        /// The chains' rules without handles; a bucket chain's in any
        /// order (its rules match disjoint frontends, so order means
        /// nothing, and incremental syncs append where a full one sorts).
        fn rules(&self) -> BTreeMap<&String, Vec<&str>> {
            self.chains
                .iter()
                .map(|(name, rules)| {
                    let mut r: Vec<&str> = rules.iter().map(|(_, r)| r.as_str()).collect();
                    if name.starts_with("svc-bucket-") {
                        r.sort_unstable();
                    }
                    (name, r)
                })
                .collect()
        }
    }

    impl PartialEq for SimTable {
        fn eq(&self, o: &Self) -> bool {
            self.rules() == o.rules()
                && self.sets == o.sets
                && self.maps == o.maps
                && self.elements == o.elements
        }
    }
    impl Eq for SimTable {}

    /// A tiny interpreter of the statements fairlead writes, strict where
    /// the kernel is strict (unknown or referenced objects, duplicate
    /// elements, references across tables), so scripts can be checked
    /// without a kernel.
    #[derive(Default, Debug, PartialEq, Eq, Clone)]
    pub struct Sim {
        tables: BTreeMap<String, SimTable>,
    }

    fn referenced(rule: &str) -> Vec<String> {
        let mut v = Vec::new();
        let words: Vec<&str> = rule
            .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
            .filter(|w| !w.is_empty())
            .collect();
        for w in words.windows(2) {
            if w[0] == "goto" || w[0] == "jump" {
                v.push(w[1].to_string());
            }
        }
        for w in &words {
            if let Some(s) = w.strip_prefix('@') {
                v.push(s.to_string());
            }
        }
        v
    }

    impl SimTable {
        fn in_use(&self, name: &str) -> bool {
            self.chains
                .values()
                .flatten()
                .any(|(_, r)| referenced(r).iter().any(|x| x == name))
                || self
                    .elements
                    .values()
                    .any(|v| referenced(v).iter().any(|x| x == name))
        }
    }

    impl Sim {
        /// Apply a script atomically: on error, nothing changes.
        pub fn apply(&mut self, script: &str) -> Result<(), String> {
            let mut s = self.clone();
            for (i, line) in script.lines().enumerate() {
                s.statement(line)
                    .map_err(|e| format!("line {}: {line}: {e}", i + 1))?;
            }
            *self = s;
            Ok(())
        }

        /// Table names.
        pub fn tables(&self) -> Vec<String> {
            self.tables.keys().cloned().collect()
        }

        /// A chain's rules as (handle, comment), as the kernel lists them.
        pub fn rule_comments(
            &self,
            table: &str,
            chain: &str,
        ) -> Result<Vec<(u64, String)>, String> {
            let c = self
                .tables
                .get(table)
                .and_then(|t| t.chains.get(chain))
                .ok_or_else(|| format!("no chain {table} {chain}"))?;
            Ok(c.iter()
                .map(|(h, r)| {
                    let comment = r
                        .rsplit_once(" comment \"")
                        .map(|(_, c)| c.trim_end_matches('"').to_string())
                        .unwrap_or_default();
                    (*h, comment)
                })
                .collect())
        }

        fn statement(&mut self, line: &str) -> Result<(), String> {
            let w: Vec<&str> = line.splitn(5, ' ').collect();
            let (verb, kind, table) = (w[0], w[1], w[3]);
            assert_eq!(w[2], "ip");
            if kind == "table" {
                match verb {
                    "add" => {
                        self.tables.entry(table.to_string()).or_default();
                    }
                    "delete" => {
                        if self.tables.remove(table).is_none() {
                            return Err("no such table".into());
                        }
                    }
                    _ => return Err("bad verb".into()),
                }
                return Ok(());
            }
            let t = self.tables.get_mut(table).ok_or("no such table")?;
            let rest = w[4];
            let name = rest.split(' ').next().unwrap().to_string();
            let body = rest[name.len()..].trim();
            match (verb, kind) {
                ("add", "chain") => {
                    t.chains.entry(name).or_default();
                }
                ("flush", "chain") => {
                    t.chains.get_mut(&name).ok_or("no such chain")?.clear();
                }
                ("delete", "chain") => {
                    if t.in_use(&name) {
                        return Err("chain in use".into());
                    }
                    let c = t.chains.remove(&name).ok_or("no such chain")?;
                    if !c.is_empty() {
                        return Err("chain not empty".into());
                    }
                }
                ("add", "rule") => {
                    for r in referenced(body) {
                        if !t.chains.contains_key(&r)
                            && !t.sets.contains_key(&r)
                            && !t.maps.contains(&r)
                        {
                            return Err(format!("unknown {r}"));
                        }
                    }
                    t.next_handle += 1;
                    let h = t.next_handle;
                    t.chains
                        .get_mut(&name)
                        .ok_or("no such chain")?
                        .push((h, body.to_string()));
                }
                ("delete", "rule") => {
                    let h: u64 = body
                        .strip_prefix("handle ")
                        .and_then(|h| h.parse().ok())
                        .ok_or("bad handle")?;
                    let c = t.chains.get_mut(&name).ok_or("no such chain")?;
                    let i = c.iter().position(|(x, _)| *x == h).ok_or("no such rule")?;
                    c.remove(i);
                }
                ("add", "set") => {
                    if let Some(old) = t.sets.get(&name) {
                        if old != body {
                            return Err("set exists with another definition".into());
                        }
                    }
                    t.sets.insert(name, body.to_string());
                }
                ("delete", "set") => {
                    if t.in_use(&name) {
                        return Err("set in use".into());
                    }
                    if t.sets.remove(&name).is_none() {
                        if !t.maps.remove(&name) {
                            return Err("no such set".into());
                        }
                        t.elements.retain(|(m, _), _| *m != name);
                    }
                }
                ("add", "map") => {
                    t.maps.insert(name);
                }
                ("add", "element") | ("delete", "element") => {
                    if !t.maps.contains(&name) && !t.sets.contains_key(&name) {
                        return Err("no such map".into());
                    }
                    let inner = body
                        .strip_prefix("{ ")
                        .and_then(|b| b.strip_suffix(" }"))
                        .ok_or("bad element")?;
                    if verb == "add" {
                        let (k, v) = inner.split_once(" : ").unwrap_or((inner, ""));
                        for r in referenced(v) {
                            if !t.chains.contains_key(&r) {
                                return Err(format!("unknown chain {r}"));
                            }
                        }
                        let key = (name, k.to_string());
                        if t.elements.get(&key).is_some_and(|o| o != v) {
                            return Err("element exists".into());
                        }
                        t.elements.insert(key, v.to_string());
                    } else if t.elements.remove(&(name, inner.to_string())).is_none() {
                        return Err("no such element".into());
                    }
                }
                _ => return Err("unknown statement".into()),
            }
            Ok(())
        }
    }

    /// The same frontend (ip . proto . port or proto . port) must not be
    /// dispatched by two tables: the first NAT chain to match would win.
    fn assert_one_table_per_frontend(sim: &Sim) {
        let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
        for (table, t) in &sim.tables {
            for (map, key) in t.elements.keys() {
                if map == "service-ips" || map == "service-nodeports" {
                    if let Some(other) = seen.insert((map.clone(), key.clone()), table.clone()) {
                        panic!("{map} {key} in {other} and {table}");
                    }
                }
            }
        }
    }

    /// The script from `old` (which `sim` holds) to `new`, as text, and
    /// its stats.
    fn diff_text(sim: &Sim, old: &Ruleset, new: &Ruleset) -> (String, ScriptStats) {
        let ch = changes(old, new);
        let mut s = partial(old, &ch);
        s.resolve_handles(|t, chain: &str| sim.rule_comments(&table_name("fairlead", t), chain))
            .unwrap_or_else(|e| panic!("{e}"));
        (s.text("fairlead"), s.stats.clone())
    }

    fn sim_of(r: &Ruleset) -> Sim {
        let mut s = Sim::default();
        s.apply(&full_text(r, &[])).expect("full script applies");
        assert_one_table_per_frontend(&s);
        s
    }

    #[test]
    fn no_change_no_script() {
        let st = golden_state();
        let a = Ruleset::build(cfg(), &st);
        let b = Ruleset::build(cfg(), &st);
        assert!(partial(&a, &changes(&a, &b)).is_empty());
    }

    #[test]
    fn endpoint_change_touches_only_that_service() {
        let st = golden_state();
        let old = Ruleset::build(cfg(), &st);
        let mut st2 = st.clone();
        let web = spn("default", "web", "http", Protocol::Tcp);
        let mut w = (*st2[&web]).clone();
        w.endpoints.push(ep("10.244.2.13:8080", "node-c"));
        w.endpoints
            .retain(|e| e.addr.port() != 8080 || !e.addr.ip().to_string().ends_with(".11"));
        st2.insert(web.clone(), Arc::new(w));
        let new = Ruleset::build(cfg(), &st2);
        let (text, stats) = diff_text(&sim_of(&old), &old, &new);
        golden("web-endpoints.diff.nft", &text);
        // Every statement names web's entries in its bucket's endpoint map
        // or the hairpin elements of its old or new endpoints, nothing
        // else; no chain or rule changes (so the kernel re-validates
        // nothing).
        let ours = [
            "eps-bucket-08 { 10.96.1.1 . tcp . 80 . ",
            "{ 10.244.0.11 . 10.244.0.11 }",
            "{ 10.244.2.13 . 10.244.2.13 }",
            "fairlead fingerprint {",
        ];
        for line in text.lines() {
            assert!(
                ours.iter().any(|n| line.contains(n)),
                "unrelated statement: {line}"
            );
            assert!(line.contains("element"), "not an element change: {line}");
        }
        assert_eq!(
            stats,
            ScriptStats {
                elements_added: 1,
                elements_deleted: 1,
                map_entries_changed: 4,
                tables: 1,
                ..ScriptStats::default()
            }
        );
        let mut s = sim_of(&old);
        s.apply(&text).unwrap();
        assert_eq!(s, sim_of(&new));

        // One endpoint fewer: a plain DNAT rule replaces the one reading
        // the map, whose entries for web go; the bucket's map stays.
        let mut st3 = st2.clone();
        let mut w = (*st3[&web]).clone();
        w.endpoints.truncate(1);
        st3.insert(web.clone(), Arc::new(w));
        let third = Ruleset::build(cfg(), &st3);
        let (text, stats) = diff_text(&sim_of(&new), &new, &third);
        // web is a plain service port: its rule in its bucket chain is
        // replaced, by handle; no chain is flushed.
        assert_eq!(
            (
                stats.chains_flushed,
                stats.rules_deleted,
                stats.rules_added,
                stats.maps_deleted,
                stats.maps_added,
                stats.map_entries_changed,
            ),
            (0, 1, 1, 0, 0, 2),
            "{text}"
        );
        assert!(
            text.contains("delete rule ip fairlead svc-bucket-"),
            "{text}"
        );
        assert!(
            text.contains("delete element ip fairlead eps-bucket-08 { 10.96.1.1 . tcp . 80 . 1 }"),
            "{text}"
        );
        let mut s = sim_of(&new);
        s.apply(&text).unwrap();
        assert_eq!(s, sim_of(&third));
    }

    #[test]
    fn entries_a_shrunk_rule_no_longer_reads_go_in_a_second_transaction() {
        let st = golden_state();
        let web = spn("default", "web", "http", Protocol::Tcp);
        let with = |n: usize, first: u8| {
            let mut st = st.clone();
            let mut w = (*st[&web]).clone();
            w.endpoints = (0..n)
                .map(|i| ep(&format!("10.244.0.{}:8080", first as usize + i), "node-a"))
                .collect();
            st.insert(web.clone(), Arc::new(w));
            Ruleset::build(cfg(), &st)
        };
        let render = |ops: &[(TableId, Op)]| -> Vec<String> {
            ops.iter()
                .map(|(t, op)| {
                    let mut line = String::new();
                    op.render(&table_name("fairlead", *t), &mut line);
                    line
                })
                .collect()
        };
        let script = |old: &Ruleset, new: &Ruleset| {
            let ch = changes(old, new);
            let mut s = partial(old, &ch);
            let sim = sim_of(old);
            s.resolve_handles(|t, c: &str| sim.rule_comments(&table_name("fairlead", t), c))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut after = sim_of(old);
            after.apply(&s.text("fairlead")).unwrap();
            assert_eq!(after, sim_of(new), "both transactions give the new tables");
            // (The first two transactions together: the rule replaced,
            // the entries it no longer reads left for the third.)
            let mut ops = render(&s.staged);
            ops.extend(render(&s.ops));
            (ops, render(&s.trailing))
        };

        // 4 endpoints to 2: the rule (mod 4 to mod 2) is replaced in the
        // first transaction, with entries 2 and 3 still there for a packet
        // that ran the old rule; they go in the second.
        let (ops, trailing) = script(&with(4, 11), &with(2, 11));
        assert!(ops.iter().any(|l| l.starts_with("delete rule")), "{ops:?}");
        assert!(ops.iter().any(|l| l.contains("mod 2 map")), "{ops:?}");
        assert!(
            !ops.iter()
                .any(|l| l.contains("delete element ip fairlead eps-bucket")),
            "{ops:?}"
        );
        assert_eq!(
            trailing,
            [
                "delete element ip fairlead eps-bucket-08 { 10.96.1.1 . tcp . 80 . 2 }",
                "delete element ip fairlead eps-bucket-08 { 10.96.1.1 . tcp . 80 . 3 }",
            ]
        );

        // The same count, other endpoints: entries rewritten in place, in
        // the one transaction (old and new rules read them alike).
        let (ops, trailing) = script(&with(4, 11), &with(4, 21));
        assert!(trailing.is_empty(), "{trailing:?}");
        assert!(ops
            .iter()
            .any(|l| l.contains("delete element ip fairlead eps-bucket-08")));

        // Growing: nothing to leave for later.
        let (_, trailing) = script(&with(2, 11), &with(4, 11));
        assert!(trailing.is_empty(), "{trailing:?}");
    }

    #[test]
    fn losing_all_endpoints_moves_elements_to_no_endpoint_maps() {
        let st = golden_state();
        let old = Ruleset::build(cfg(), &st);
        let mut st2 = st.clone();
        let sticky = spn("default", "sticky", "", Protocol::Tcp);
        let mut s = (*st2[&sticky]).clone();
        s.endpoints.clear();
        st2.insert(sticky, Arc::new(s));
        let new = Ruleset::build(cfg(), &st2);
        let (text, _) = diff_text(&sim_of(&old), &old, &new);
        golden("sticky-no-endpoints.diff.nft", &text);
        let mut sim = sim_of(&old);
        sim.apply(&text).unwrap();
        assert_eq!(sim, sim_of(&new));
    }

    fn random_info(rng: &mut impl Rng, i: usize) -> ServicePortInfo {
        let n = rng.random_range(0..4);
        let endpoints = (0..n)
            .map(|_| {
                let mut e = ep(
                    &format!(
                        "10.244.{}.{}:80",
                        rng.random_range(0..2),
                        rng.random_range(1..6)
                    ),
                    if rng.random_bool(0.5) {
                        "node-a"
                    } else {
                        "node-b"
                    },
                );
                e.ready = rng.random_bool(0.7);
                e.serving = e.ready || rng.random_bool(0.5);
                e.terminating = !e.ready && rng.random_bool(0.5);
                e
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Few distinct frontends, so claims collide now and then.
        let mut info = info(
            &format!("10.96.0.{}", rng.random_range(1..4) + i % 3),
            80,
            endpoints,
        );
        if rng.random_bool(0.3) {
            info.node_port = Some(30000 + rng.random_range(0..3));
        }
        if rng.random_bool(0.2) {
            info.external_ips = vec!["192.0.2.1".parse().unwrap()];
        }
        if rng.random_bool(0.3) {
            info.affinity_timeout = Some(Duration::from_secs(rng.random_range(1..3) * 60));
        }
        info.internal_local = rng.random_bool(0.2);
        info.external_local = rng.random_bool(0.2);
        info
    }

    /// Apply a random step to `state`.
    pub fn random_step(rng: &mut impl Rng, state: &mut ProxyState) {
        let i = rng.random_range(0..8usize);
        let key = spn(
            "ns",
            &format!("s{i}"),
            "",
            if i % 4 == 3 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
        );
        if rng.random_bool(0.25) {
            state.remove(&key);
        } else {
            state.insert(key, Arc::new(random_info(rng, i)));
        }
    }

    /// Partial scripts applied one after another leave exactly what a
    /// full script of the same state builds, in one table and over
    /// several shards (where a service port's chains, sets and dispatch
    /// elements must all land in its own shard).
    #[test]
    fn random_partial_syncs_match_a_full_build() {
        for shards in [1, 4] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7 + shards as u64);
            let mut state = ProxyState::new();
            let mut applied = Ruleset::with_shards(cfg(), shards);
            let mut sim = sim_of(&applied);
            assert_eq!(sim.tables().len(), shards as usize);
            for step in 0..3000 {
                let n = rng.random_range(1..4);
                for _ in 0..n {
                    random_step(&mut rng, &mut state);
                }
                let new = Ruleset::build_sharded(cfg(), shards, &state);
                let (text, _) = diff_text(&sim, &applied, &new);
                sim.apply(&text)
                    .unwrap_or_else(|e| panic!("{shards} shards, step {step}: {e}\n{text}"));
                assert_eq!(sim, sim_of(&new), "{shards} shards, step {step}");
                assert_eq!(applied.fingerprint() == new.fingerprint(), text.is_empty());
                applied = new;
            }
        }
    }

    #[test]
    fn shards_split_services_and_a_full_sync_removes_stale_tables() {
        let st = golden_state();
        let one = Ruleset::build(cfg(), &st);
        let four = Ruleset::build_sharded(cfg(), 4, &st);
        assert_ne!(one.fingerprint(), four.fingerprint());
        assert_eq!(one.fingerprint_with(4), four.fingerprint());
        let sim = sim_of(&four);
        assert_eq!(
            sim.tables(),
            vec!["fairlead", "fairlead-1", "fairlead-2", "fairlead-3"]
        );
        // Every chain of a service port is in its shard.
        for (spn, rules) in four.services() {
            let t = table_name("fairlead", four.table_of(&spn)).into_owned();
            for c in &rules.chains {
                assert!(
                    sim.tables[&t].chains.contains_key(&c.name),
                    "{spn}: {}",
                    c.name
                );
            }
        }
        // Going back to one table deletes the shards.
        let mut s = sim.clone();
        s.apply(&full_text(&one, &[1, 2, 3])).unwrap();
        assert_eq!(s, sim_of(&one));
    }
}
