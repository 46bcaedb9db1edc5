//! From one table model to another: the operations that change only what
//! differs, applied by the kernel as one atomic transaction (encoded as
//! netlink messages by [`super::netlink`]; [`Script::text`] renders the
//! same operations as an `nft -f` script, for golden files and tests).
//!
//! A sync is a list of [`Change`]s (service ports whose rules were added,
//! replaced or removed). Chain and set names are unique to a service port,
//! so chains are diffed per service port by name; map keys may in theory be
//! claimed by several service ports, so elements are resolved through the
//! applied model's claims (the first claimant in name order wins, as in a
//! full build). Operation order keeps every reference valid inside the
//! transaction:
//!
//! ```text
//!  1. add set                        (new affinity sets)
//!  2. add chain / flush chain        (new chains / chains whose rules changed)
//!  3. add rule                       (their rules; may jump to 1.–2.)
//!  4. delete element                 (removed, or changing verdict; and the
//!                                     old fingerprint)
//!  5. add element                    (new, or changed verdict; and the new
//!                                     fingerprint)
//!  6. flush chain + delete chain     (chains gone; nothing points at them now)
//!  7. delete set                     (sets gone; their users were flushed)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use super::ruleset::{
    AffinitySet, BaseChain, Chain, ElementKey, Key, MapName, Rule, Ruleset, ServiceRules, Verdict,
    BASE_CHAINS, HELPER_CHAINS,
};
use crate::proxy::ServicePortName;

/// One service port's rules before and after a sync (`None`: absent).
#[derive(Clone, Debug)]
pub struct Change {
    pub spn: ServicePortName,
    pub old: Option<Arc<ServiceRules>>,
    pub new: Option<Arc<ServiceRules>>,
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
}

/// One operation on fairlead's table. Borrowed from the models it was
/// computed from, so a full sync of 30,000 services copies no rules.
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
    },
    AddSet(&'a AffinitySet),
    DeleteSet(&'a str),
    AddElement {
        map: MapName,
        key: Key,
        verdict: Option<&'a Verdict>,
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
            Op::AddRule { chain, rule } => write!(out, "add rule ip {t} {chain} {rule}"),
            Op::AddSet(s) => write!(
                out,
                "add set ip {t} {} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {}s ; }}",
                s.name, s.timeout_secs
            ),
            Op::DeleteSet(s) => write!(out, "delete set ip {t} {s}"),
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

/// The operations of one transaction and what they do.
#[derive(Clone, Debug, Default)]
pub struct Script<'a> {
    pub ops: Vec<Op<'a>>,
    /// Recreates the whole table.
    pub full: bool,
    pub stats: ScriptStats,
}

impl Script<'_> {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The script as `nft -f` text.
    pub fn text(&self, table: &str) -> String {
        let mut out = String::with_capacity(96 * self.ops.len());
        for op in &self.ops {
            op.render(table, &mut out);
            out.push('\n');
        }
        out
    }
}

/// The service ports whose rules differ between two models (same `Arc` or
/// equal rules: unchanged).
pub fn changes(old: &Ruleset, new: &Ruleset) -> Vec<Change> {
    let mut out = Vec::new();
    for (spn, n) in new.services() {
        match old.services().get(spn) {
            Some(o) if Arc::ptr_eq(o, n) || o == n => {}
            o => out.push(Change {
                spn: spn.clone(),
                old: o.cloned(),
                new: Some(n.clone()),
            }),
        }
    }
    for (spn, o) in old.services() {
        if !new.services().contains_key(spn) {
            out.push(Change {
                spn: spn.clone(),
                old: Some(o.clone()),
                new: None,
            });
        }
    }
    out
}

/// The operations taking the kernel from `old` to `new`: a full recreate
/// when the fixed part differs, otherwise only `changes` (which must be
/// [`changes`]`(old, new)`; the caller keeps them, as the script borrows
/// from them).
pub fn diff<'a>(old: &'a Ruleset, new: &'a Ruleset, changes: &'a [Change]) -> Script<'a> {
    if old.cfg != new.cfg {
        return full(new);
    }
    partial(old, changes)
}

/// The operations (re)creating the whole table as `new`, atomically
/// (`add table` first, so the `delete` cannot fail on a missing table).
pub fn full(new: &Ruleset) -> Script<'_> {
    let mut stats = ScriptStats {
        elements_added: new.element_count(),
        ..ScriptStats::default()
    };
    let mut ops = Vec::with_capacity(new.rule_count() + new.element_count() + 64);
    ops.push(Op::AddTable { comment: None });
    ops.push(Op::DeleteTable);
    ops.push(Op::AddTable {
        comment: Some("fairlead"),
    });
    ops.extend(MapName::ALL.into_iter().map(Op::AddMap));
    ops.extend(BASE_CHAINS.iter().map(Op::AddBaseChain));
    ops.extend(HELPER_CHAINS.iter().map(|name| Op::AddChain {
        name,
        comment: None,
    }));
    ops.extend(
        new.base()
            .iter()
            .map(|(chain, rule)| Op::AddRule { chain, rule }),
    );
    for r in new.services().values() {
        ops.extend(r.sets.iter().map(Op::AddSet));
        ops.extend(r.chains.iter().map(|c| Op::AddChain {
            name: &c.name,
            comment: Some(&c.comment),
        }));
        stats.chains_added += r.chains.len();
        stats.rules_added += r.rule_count();
        stats.sets_added += r.sets.len();
    }
    for r in new.services().values() {
        for c in &r.chains {
            add_rules(&mut ops, c);
        }
    }
    // Elements in key order within each map (the order `nft` lists them
    // does not depend on it, but golden files do).
    let mut elements: Vec<(&ElementKey, Option<&Verdict>)> = new
        .claims()
        .filter_map(|(k, c)| c.first().map(|v| (k, v.as_ref())))
        .collect();
    elements.sort_unstable_by(|a, b| a.0.cmp(b.0));
    ops.extend(
        elements
            .into_iter()
            .map(|((map, key), verdict)| Op::AddElement {
                map: *map,
                key: *key,
                verdict,
            }),
    );
    ops.push(Op::AddElement {
        map: MapName::Fingerprint,
        key: Key::Fingerprint(new.fingerprint()),
        verdict: None,
    });
    Script {
        ops,
        full: true,
        stats,
    }
}

fn add_rules<'a>(ops: &mut Vec<Op<'a>>, c: &'a Chain) {
    ops.extend(c.rules.iter().map(|rule| Op::AddRule {
        chain: &c.name,
        rule,
    }));
}

/// The operations applying `changes` to the table `applied` describes.
pub fn partial<'a>(applied: &'a Ruleset, changes: &'a [Change]) -> Script<'a> {
    let mut stats = ScriptStats::default();
    let mut add_sets = Vec::new();
    let mut del_sets = Vec::new();
    let mut new_chains: Vec<&Chain> = Vec::new();
    let mut flushed: Vec<&Chain> = Vec::new();
    let mut gone: Vec<&Chain> = Vec::new();
    // Per touched map key: (service port, wanted verdict or None).
    type Claim<'c> = (&'c ServicePortName, Option<Option<&'c Verdict>>);
    let mut claims: BTreeMap<ElementKey, Vec<Claim<'a>>> = BTreeMap::new();

    static EMPTY: std::sync::LazyLock<ServiceRules> =
        std::sync::LazyLock::new(ServiceRules::default);
    for ch in changes {
        let old = ch.old.as_deref().unwrap_or(&EMPTY);
        let new = ch.new.as_deref().unwrap_or(&EMPTY);
        let old_chains: HashMap<&str, &Chain> =
            old.chains.iter().map(|c| (c.name.as_str(), c)).collect();
        let new_names: BTreeSet<&str> = new.chains.iter().map(|c| c.name.as_str()).collect();
        for c in &new.chains {
            match old_chains.get(c.name.as_str()) {
                None => new_chains.push(c),
                Some(o) if o.rules != c.rules => flushed.push(c),
                Some(_) => {}
            }
        }
        gone.extend(
            old.chains
                .iter()
                .filter(|c| !new_names.contains(c.name.as_str())),
        );
        add_sets.extend(new.sets.iter().filter(|s| !old.sets.contains(s)));
        del_sets.extend(old.sets.iter().filter(|s| !new.sets.contains(s)));
        for e in &old.elements {
            claims
                .entry((e.map, e.key))
                .or_default()
                .push((&ch.spn, None));
        }
        for e in &new.elements {
            claims
                .entry((e.map, e.key))
                .or_default()
                .push((&ch.spn, Some(e.verdict.as_ref())));
        }
    }

    // Elements: compare the first claimant's verdict before and after.
    let mut del_elements: Vec<ElementKey> = Vec::new();
    let mut add_elements: Vec<(ElementKey, Option<&Verdict>)> = Vec::new();
    for (key, touched) in &claims {
        let before = applied.claimants(key);
        let old_verdict: Option<Option<&Verdict>> =
            before.and_then(|c| c.first()).map(Option::as_ref);
        let mut after: BTreeMap<&ServicePortName, Option<&Verdict>> = before
            .map(|c| c.iter().map(|(s, v)| (s, v.as_ref())).collect())
            .unwrap_or_default();
        for (spn, _) in touched {
            after.remove(*spn);
        }
        for (spn, v) in touched {
            if let Some(v) = v {
                after.insert(*spn, *v);
            }
        }
        let new_verdict = after.values().next().copied();
        if old_verdict != new_verdict {
            if old_verdict.is_some() {
                del_elements.push(*key);
            }
            if let Some(v) = new_verdict {
                add_elements.push((*key, v));
            }
        }
    }

    let mut ops = Vec::new();
    ops.extend(add_sets.iter().map(|s| Op::AddSet(s)));
    ops.extend(new_chains.iter().map(|c| Op::AddChain {
        name: &c.name,
        comment: Some(&c.comment),
    }));
    ops.extend(flushed.iter().map(|c| Op::FlushChain(&c.name)));
    for c in new_chains.iter().chain(flushed.iter()) {
        add_rules(&mut ops, c);
        stats.rules_added += c.rules.len();
    }
    ops.extend(del_elements.iter().map(|(map, key)| Op::DeleteElement {
        map: *map,
        key: *key,
    }));
    ops.extend(
        add_elements
            .iter()
            .map(|((map, key), verdict)| Op::AddElement {
                map: *map,
                key: *key,
                verdict: *verdict,
            }),
    );
    // The fingerprint moves with every change of the model.
    let fingerprint = changes.iter().fold(applied.fingerprint(), |f, ch| {
        f ^ ch.old.as_ref().map_or(0, |r| r.fingerprint)
            ^ ch.new.as_ref().map_or(0, |r| r.fingerprint)
    });
    if fingerprint != applied.fingerprint() {
        ops.push(Op::DeleteElement {
            map: MapName::Fingerprint,
            key: Key::Fingerprint(applied.fingerprint()),
        });
        ops.push(Op::AddElement {
            map: MapName::Fingerprint,
            key: Key::Fingerprint(fingerprint),
            verdict: None,
        });
    }
    ops.extend(gone.iter().map(|c| Op::FlushChain(&c.name)));
    ops.extend(gone.iter().map(|c| Op::DeleteChain(&c.name)));
    ops.extend(del_sets.iter().map(|s| Op::DeleteSet(&s.name)));
    stats.chains_added = new_chains.len();
    stats.chains_flushed = flushed.len();
    stats.chains_deleted = gone.len();
    stats.sets_added = add_sets.len();
    stats.sets_deleted = del_sets.len();
    stats.elements_added = add_elements.len();
    stats.elements_deleted = del_elements.len();
    Script {
        ops,
        full: false,
        stats,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::ruleset::tests::{cfg, ep, golden, golden_state, info, spn};
    use super::super::ruleset::{service_hash, Ruleset};
    use super::*;
    use crate::proxy::{Protocol, ProxyState, ServicePortInfo};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    /// A tiny interpreter of the statements fairlead writes, strict where
    /// the kernel is strict (unknown or referenced objects, duplicate
    /// elements), so scripts can be checked without a kernel.
    #[derive(Default, Debug, PartialEq, Eq, Clone)]
    pub struct Sim {
        tables: BTreeSet<String>,
        chains: BTreeMap<String, Vec<String>>,
        sets: BTreeMap<String, String>,
        maps: BTreeSet<String>,
        elements: BTreeMap<(String, String), String>,
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

    impl Sim {
        fn in_use(&self, name: &str) -> bool {
            self.chains
                .values()
                .flatten()
                .any(|r| referenced(r).iter().any(|x| x == name))
                || self
                    .elements
                    .values()
                    .any(|v| referenced(v).iter().any(|x| x == name))
        }

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

        fn statement(&mut self, line: &str) -> Result<(), String> {
            let w: Vec<&str> = line.splitn(5, ' ').collect();
            let (verb, kind, table) = (w[0], w[1], w[3]);
            assert_eq!(w[2], "ip");
            if kind == "table" {
                match verb {
                    "add" => {
                        self.tables.insert(table.to_string());
                    }
                    "delete" => {
                        if !self.tables.remove(table) {
                            return Err("no such table".into());
                        }
                        *self = Sim {
                            tables: std::mem::take(&mut self.tables),
                            ..Sim::default()
                        };
                    }
                    _ => return Err("bad verb".into()),
                }
                return Ok(());
            }
            if !self.tables.contains(table) {
                return Err("no such table".into());
            }
            let rest = w[4];
            let name = rest.split(' ').next().unwrap().to_string();
            let body = rest[name.len()..].trim();
            match (verb, kind) {
                ("add", "chain") => {
                    self.chains.entry(name).or_default();
                }
                ("flush", "chain") => {
                    self.chains.get_mut(&name).ok_or("no such chain")?.clear();
                }
                ("delete", "chain") => {
                    if self.in_use(&name) {
                        return Err("chain in use".into());
                    }
                    let c = self.chains.remove(&name).ok_or("no such chain")?;
                    if !c.is_empty() {
                        return Err("chain not empty".into());
                    }
                }
                ("add", "rule") => {
                    for r in referenced(body) {
                        if !self.chains.contains_key(&r)
                            && !self.sets.contains_key(&r)
                            && !self.maps.contains(&r)
                        {
                            return Err(format!("unknown {r}"));
                        }
                    }
                    self.chains
                        .get_mut(&name)
                        .ok_or("no such chain")?
                        .push(body.to_string());
                }
                ("add", "set") => {
                    if let Some(old) = self.sets.get(&name) {
                        if old != body {
                            return Err("set exists with another definition".into());
                        }
                    }
                    self.sets.insert(name, body.to_string());
                }
                ("delete", "set") => {
                    if self.in_use(&name) {
                        return Err("set in use".into());
                    }
                    self.sets.remove(&name).ok_or("no such set")?;
                }
                ("add", "map") => {
                    self.maps.insert(name);
                }
                ("add", "element") | ("delete", "element") => {
                    if !self.maps.contains(&name) && !self.sets.contains_key(&name) {
                        return Err("no such map".into());
                    }
                    let inner = body
                        .strip_prefix("{ ")
                        .and_then(|b| b.strip_suffix(" }"))
                        .ok_or("bad element")?;
                    if verb == "add" {
                        let (k, v) = inner.split_once(" : ").unwrap_or((inner, ""));
                        for r in referenced(v) {
                            if !self.chains.contains_key(&r) {
                                return Err(format!("unknown chain {r}"));
                            }
                        }
                        let key = (name, k.to_string());
                        if self.elements.get(&key).is_some_and(|o| o != v) {
                            return Err("element exists".into());
                        }
                        self.elements.insert(key, v.to_string());
                    } else if self.elements.remove(&(name, inner.to_string())).is_none() {
                        return Err("no such element".into());
                    }
                }
                _ => return Err("unknown statement".into()),
            }
            Ok(())
        }
    }

    /// The script from `old` to `new`, as text, and its stats.
    fn diff_text(old: &Ruleset, new: &Ruleset) -> (String, ScriptStats) {
        let ch = changes(old, new);
        let s = diff(old, new, &ch);
        (s.text("fairlead"), s.stats.clone())
    }

    fn sim_of(r: &Ruleset) -> Sim {
        let mut s = Sim::default();
        s.apply(&full(r).text("fairlead"))
            .expect("full script applies");
        s
    }

    #[test]
    fn no_change_no_script() {
        let st = golden_state();
        let a = Ruleset::build(cfg(), &st);
        let b = Ruleset::build(cfg(), &st);
        assert!(diff(&a, &b, &changes(&a, &b)).is_empty());
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
        let (text, stats) = diff_text(&old, &new);
        golden("web-endpoints.diff.nft", &text);
        // Every statement names web's chains or the hairpin elements of
        // its old or new endpoints, nothing else.
        let mut ours: BTreeSet<String> = old.services()[&web]
            .chains
            .iter()
            .chain(new.services()[&web].chains.iter())
            .map(|c| c.name.clone())
            .collect();
        ours.insert("{ 10.244.0.11 . 10.244.0.11 }".into());
        ours.insert("{ 10.244.2.13 . 10.244.2.13 }".into());
        ours.insert("fairlead fingerprint {".into());
        for line in text.lines() {
            assert!(
                ours.iter().any(|n| line.contains(n.as_str())),
                "unrelated statement: {line}"
            );
        }
        assert_eq!(
            stats,
            ScriptStats {
                chains_flushed: 1,
                rules_added: 2,
                elements_added: 1,
                elements_deleted: 1,
                ..ScriptStats::default()
            }
        );
        let mut s = sim_of(&old);
        s.apply(&text).unwrap();
        assert_eq!(s, sim_of(&new));
        assert!(text.contains(&format!(
            "flush chain ip fairlead svc-{}",
            service_hash(&web)
        )));
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
        let (text, _) = diff_text(&old, &new);
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

    #[test]
    fn random_partial_syncs_match_a_full_build() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut state = ProxyState::new();
        let mut applied = Ruleset::new(cfg());
        let mut sim = sim_of(&applied);
        for step in 0..3000 {
            let n = rng.random_range(1..4);
            for _ in 0..n {
                random_step(&mut rng, &mut state);
            }
            let new = Ruleset::build(cfg(), &state);
            let (text, _) = diff_text(&applied, &new);
            sim.apply(&text)
                .unwrap_or_else(|e| panic!("step {step}: {e}\n{text}"));
            assert_eq!(sim, sim_of(&new), "step {step}");
            applied = new;
        }
    }
}
