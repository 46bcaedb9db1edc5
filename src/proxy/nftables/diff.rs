//! From one table model to another: the `nft -f` script that changes only
//! what differs, applied by the kernel as one atomic transaction.
//!
//! A sync is a list of [`Change`]s (service ports whose rules were added,
//! replaced or removed). Chain and set names are unique to a service port,
//! so chains are diffed per service port by name; map keys may in theory be
//! claimed by several service ports, so elements are resolved through the
//! applied model's claims (the first claimant in name order wins, as in a
//! full build). Statement order keeps every reference valid inside the
//! transaction:
//!
//! ```text
//!  1. add set                        (new affinity sets)
//!  2. add chain / flush chain        (new chains / chains whose rules changed)
//!  3. add rule                       (their rules; may jump to 1.–2.)
//!  4. delete element                 (removed, or changing verdict)
//!  5. add element                    (new, or changed verdict)
//!  6. flush chain + delete chain     (chains gone; nothing points at them now)
//!  7. delete set                     (sets gone; their users were flushed)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::ruleset::{
    add_chain, add_element, add_rules, add_set, delete_element, Chain, ElementKey, Ruleset,
    ServiceRules,
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

/// An `nft -f` script and what it does.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub text: String,
    /// Recreates the whole table.
    pub full: bool,
    pub stats: ScriptStats,
}

impl Script {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
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

/// The script taking the kernel from `old` to `new`: a full recreate when
/// the fixed part differs, otherwise only the changes.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Script {
    if old.cfg != new.cfg {
        return full(new);
    }
    partial(old, &changes(old, new))
}

/// The script that (re)creates the whole table as `new`, atomically.
pub fn full(new: &Ruleset) -> Script {
    let mut stats = ScriptStats {
        elements_added: new.element_count(),
        ..ScriptStats::default()
    };
    for r in new.services().values() {
        stats.chains_added += r.chains.len();
        stats.rules_added += r.rule_count();
        stats.sets_added += r.sets.len();
    }
    Script {
        text: new.render_full(),
        full: true,
        stats,
    }
}

/// The script applying `changes` to the table `applied` describes.
pub fn partial(applied: &Ruleset, changes: &[Change]) -> Script {
    let t = applied.cfg.table.as_str();
    let mut stats = ScriptStats::default();
    let mut add_sets = Vec::new();
    let mut del_sets = Vec::new();
    let mut new_chains: Vec<&Chain> = Vec::new();
    let mut flushed: Vec<&Chain> = Vec::new();
    let mut gone: Vec<&Chain> = Vec::new();
    // Per touched map key: (service port, wanted verdict or None).
    let mut claims: BTreeMap<ElementKey, Vec<(&ServicePortName, Option<&str>)>> = BTreeMap::new();

    let empty = ServiceRules::default();
    for ch in changes {
        let old = ch.old.as_deref().unwrap_or(&empty);
        let new = ch.new.as_deref().unwrap_or(&empty);
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
                .entry((e.map, e.key.clone()))
                .or_default()
                .push((&ch.spn, None));
        }
        for e in &new.elements {
            claims
                .entry((e.map, e.key.clone()))
                .or_default()
                .push((&ch.spn, Some(e.verdict.as_str())));
        }
    }

    // Elements: compare the first claimant's verdict before and after.
    let mut del_elements: Vec<&ElementKey> = Vec::new();
    let mut add_elements: Vec<(&ElementKey, String)> = Vec::new();
    for (key, touched) in &claims {
        let before = applied.claimants(key);
        let old_verdict = before.and_then(|c| c.values().next()).map(String::as_str);
        let mut after: BTreeMap<&ServicePortName, &str> = before
            .map(|c| c.iter().map(|(s, v)| (s, v.as_str())).collect())
            .unwrap_or_default();
        for (spn, _) in touched {
            after.remove(*spn);
        }
        for (spn, v) in touched {
            if let Some(v) = v {
                after.insert(*spn, v);
            }
        }
        let new_verdict = after.values().next().copied();
        if old_verdict != new_verdict {
            if old_verdict.is_some() {
                del_elements.push(key);
            }
            if let Some(v) = new_verdict {
                add_elements.push((key, v.to_string()));
            }
        }
    }

    let mut out = String::new();
    for s in &add_sets {
        add_set(&mut out, t, s);
    }
    for c in &new_chains {
        add_chain(&mut out, t, c);
    }
    for c in &flushed {
        out.push_str(&format!("flush chain ip {t} {}\n", c.name));
    }
    for c in new_chains.iter().chain(flushed.iter()) {
        add_rules(&mut out, t, c);
        stats.rules_added += c.rules.len();
    }
    for (map, key) in &del_elements {
        delete_element(&mut out, t, *map, key);
    }
    for ((map, key), v) in &add_elements {
        add_element(&mut out, t, *map, key, v);
    }
    for c in &gone {
        out.push_str(&format!("flush chain ip {t} {}\n", c.name));
    }
    for c in &gone {
        out.push_str(&format!("delete chain ip {t} {}\n", c.name));
    }
    for s in &del_sets {
        out.push_str(&format!("delete set ip {t} {}\n", s.name));
    }
    stats.chains_added = new_chains.len();
    stats.chains_flushed = flushed.len();
    stats.chains_deleted = gone.len();
    stats.sets_added = add_sets.len();
    stats.sets_deleted = del_sets.len();
    stats.elements_added = add_elements.len();
    stats.elements_deleted = del_elements.len();
    Script {
        text: out,
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

    fn sim_of(r: &Ruleset) -> Sim {
        let mut s = Sim::default();
        s.apply(&full(r).text).expect("full script applies");
        s
    }

    #[test]
    fn no_change_no_script() {
        let st = golden_state();
        let a = Ruleset::build(cfg(), &st);
        let b = Ruleset::build(cfg(), &st);
        assert!(diff(&a, &b).is_empty());
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
        let script = diff(&old, &new);
        golden("web-endpoints.diff.nft", &script.text);
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
        for line in script.text.lines() {
            assert!(
                ours.iter().any(|n| line.contains(n.as_str())),
                "unrelated statement: {line}"
            );
        }
        assert_eq!(
            script.stats,
            ScriptStats {
                chains_flushed: 1,
                rules_added: 2,
                elements_added: 1,
                elements_deleted: 1,
                ..ScriptStats::default()
            }
        );
        let mut s = sim_of(&old);
        s.apply(&script.text).unwrap();
        assert_eq!(s, sim_of(&new));
        assert!(script.text.contains(&format!(
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
        let script = diff(&old, &new);
        golden("sticky-no-endpoints.diff.nft", &script.text);
        let mut sim = sim_of(&old);
        sim.apply(&script.text).unwrap();
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
            let script = diff(&applied, &new);
            sim.apply(&script.text)
                .unwrap_or_else(|e| panic!("step {step}: {e}\n{}", script.text));
            assert_eq!(sim, sim_of(&new), "step {step}");
            applied = new;
        }
    }
}
