//! The nftables proxy backend: Service traffic is balanced by the kernel,
//! never by userspace. fairlead owns one `ip` table; every sync is one
//! atomic nf_tables transaction, sent over netlink.
//!
//! ```text
//!  sync(ProxyState) ── per service port: same Arc / equal info? skip
//!        │              otherwise ruleset::service_rules (pure)
//!        ▼
//!  diff::partial(applied model, changes) ──► netlink batch (one transaction)
//!        │  ok: commit the changes into the applied model
//!        └─ error: diff::full (add + delete + recreate the table, atomic)
//! ```
//!
//! The applied model lives in memory: a sync costs one comparison per
//! unchanged service port plus the size of the change; the kernel ruleset
//! is never listed. The table carries the model's fingerprint
//! ([`ruleset::Ruleset::fingerprint`]): on start, a table whose fingerprint
//! equals the desired model's is adopted as it is (a restart neither
//! flushes nor rebuilds it); otherwise, and after any failure, the whole
//! table is recreated in one transaction. [`NftablesProxy::verify`] (the
//! daemon calls it periodically) compares the kernel's ruleset generation
//! with the one our last commit produced; if anyone else committed since,
//! the table is recreated from the model, which repairs whatever they did
//! to it. The ruleset's shape is documented in [`ruleset`]; the wire
//! format in [`netlink`].
//!
//! # What a sync costs, and why
//!
//! Userspace work is proportional to the change (plus one pointer
//! comparison per unchanged service port). The kernel's is not: a
//! transaction that adds a rule, or a map element that jumps to a chain,
//! makes nf_tables re-validate every chain reachable from the table's base
//! chains (`nft_table_validate`) before it commits. That walk is ~80% of a
//! one-endpoint change at 30,000 Services (perf: `nft_chain_validate`),
//! ~6 µs per service port: ~200 ms at 30,000, ~60 ms at 10,000, ~4 ms at
//! 1,000. What was tried to avoid it: endpoints in one shared data map
//! (`dnat to numgen inc mod N offset B map @endpoints`, so that replacing
//! an endpoint is only element updates) makes every new rule binding walk
//! all bindings and elements of that map (`nf_tables_bind_set`), which is
//! quadratic in a full sync (159 s at 30,000); per-service maps are found
//! by name in a list (linear per lookup). The remaining lever is fewer
//! expressions per rule (the DNAT rules leave out `nft`'s protocol match,
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
use self::ruleset::{MapName, Ruleset, RulesetConfig};
use self::socket::{Socket, TxError};
use super::{ProxyState, ServicePortName};

/// Settings of the nftables proxy (flags of `fairlead node`).
#[derive(Debug, Clone)]
pub struct NftablesConfig {
    /// The `ip` table fairlead owns.
    pub table: String,
    /// This node's name, for `trafficPolicy: Local`.
    pub node_name: String,
    /// Addresses NodePorts are served on; empty = every local address
    /// except 127.0.0.0/8.
    pub nodeport_addresses: Vec<IpAddr>,
    /// The packet-mark bit asking for masquerading (kube-proxy's default:
    /// 14, mark 0x4000).
    pub masquerade_bit: u8,
    /// Program the ruleset of this network namespace (a name under
    /// /run/netns, or a path) instead of the process's own; tests use it.
    pub netns: Option<String>,
}

impl Default for NftablesConfig {
    fn default() -> Self {
        let r = RulesetConfig::default();
        NftablesConfig {
            table: r.table,
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            masquerade_bit: r.masquerade_bit,
            netns: None,
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
        }
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
    /// The table was recreated.
    pub full: bool,
    /// The table found at start already matched; nothing was sent.
    pub adopted: bool,
    /// Service ports added or changed.
    pub services_changed: usize,
    pub services_removed: usize,
    /// Partial transactions that failed and were replaced by a full one.
    pub fallbacks: usize,
    pub script: ScriptStats,
    /// Size of the netlink batch sent.
    pub batch_bytes: usize,
}

/// What [`NftablesProxy::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Nobody committed to nf_tables since our last transaction.
    Unchanged,
    /// Someone did; the table was recreated from the model.
    Repaired,
    /// No table programmed yet (the next sync creates it).
    NotSynced,
}

struct Inner {
    /// The state the kernel table was last made to match.
    state: ProxyState,
    /// Its model.
    applied: Ruleset,
    /// The kernel table is not known to match `applied`.
    needs_full: bool,
    /// The start-up look for a table to adopt was done.
    adopt_checked: bool,
    sock: Option<Socket>,
    /// The ruleset generation our last transaction produced.
    generation: Option<u32>,
}

/// The socket in `slot`, opened on first use (and after an I/O error).
fn sock<'s>(slot: &'s mut Option<Socket>, netns: Option<&str>) -> Result<&'s mut Socket, NftError> {
    if slot.is_none() {
        *slot = Some(Socket::open(netns).map_err(NftError::Open)?);
    }
    Ok(slot.as_mut().expect("just opened"))
}

/// The nftables proxy of one node. `sync` with the full desired state
/// after every batch of changes; only the difference is applied.
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

impl NftablesProxy {
    pub fn new(cfg: NftablesConfig) -> Self {
        let applied = Ruleset::new(cfg.ruleset());
        // Present from the start (as 0), like kube-proxy's.
        metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total").increment(0);
        NftablesProxy {
            cfg,
            inner: Mutex::new(Inner {
                state: ProxyState::new(),
                applied,
                needs_full: true,
                adopt_checked: false,
                sock: None,
                generation: None,
            }),
        }
    }

    /// Make the kernel table match `state`: on the first call, adopt the
    /// table found if its fingerprint matches, else recreate it; after a
    /// failure, recreate it; otherwise one transaction with only what
    /// changed. A failed partial transaction is retried at once as a full
    /// one; an error means the kernel still has the previous table (each
    /// transaction is atomic) and the next call recreates it.
    pub async fn sync(&self, state: &ProxyState) -> Result<SyncStats, NftError> {
        let mut g = self.inner.lock().await;
        // Only UDP service ports can leave stale conntrack entries.
        let udp = |(k, v): (&ServicePortName, &Arc<super::ServicePortInfo>)| {
            (k.protocol == super::Protocol::Udp).then(|| (k.clone(), v.clone()))
        };
        let before: ProxyState = g.state.iter().filter_map(udp).collect();
        let stats = blocking(|| self.sync_locked(&mut g, state))?;
        drop(g);
        // Only once the new rules are in: a datagram in between would
        // recreate an entry towards the old target.
        let after: ProxyState = state.iter().filter_map(udp).collect();
        self.clear_stale_udp(&before, &after).await;
        Ok(stats)
    }

    /// Delete conntrack entries that would keep UDP clients on endpoints
    /// that are no longer used, and entries of UDP frontends that had no
    /// endpoints until now (see [`crate::proxy::conntrack`]).
    async fn clear_stale_udp(&self, before: &ProxyState, after: &ProxyState) {
        use crate::proxy::conntrack;
        let netns = self.cfg.netns.as_deref();
        for job in stale_udp(before, after) {
            let r = match job {
                StaleUdp::Endpoint(ep) => conntrack::delete_udp_to_endpoint(netns, ep).await,
                StaleUdp::Frontend(ip, port) => {
                    conntrack::delete_udp_to_service(netns, ip, port).await
                }
                StaleUdp::NodePort(port) => conntrack::delete_udp_to_node_port(netns, port).await,
            };
            match r {
                Ok(n) => metrics::counter!("fairlead_conntrack_entries_deleted_total").increment(n),
                Err(e) => {
                    metrics::counter!("fairlead_conntrack_cleanup_failures_total").increment(1);
                    tracing::warn!(error = %e, ?job, "deleting stale UDP conntrack entries");
                }
            }
        }
    }

    fn sync_locked(&self, g: &mut Inner, state: &ProxyState) -> Result<SyncStats, NftError> {
        let table = self.cfg.table.as_str();
        let netns = self.cfg.netns.as_deref();
        let mut stats = SyncStats::default();
        if !g.needs_full {
            let changes = self.changes(g, state, &mut stats);
            if changes.is_empty() {
                return Ok(stats);
            }
            let script = diff::partial(&g.applied, &changes);
            let started = Instant::now();
            let sent = sock(&mut g.sock, netns)?.transact(table, &script.ops);
            match sent {
                Ok((batch, generation)) => {
                    let secs = started.elapsed().as_secs_f64();
                    metrics::histogram!("kubeproxy_sync_partial_proxy_rules_duration_seconds")
                        .record(secs);
                    metrics::counter!("fairlead_nftables_partial_syncs_total").increment(1);
                    stats.script = script.stats;
                    stats.batch_bytes = batch.bytes.len();
                    g.generation = Some(generation);
                    for ch in changes {
                        match &ch.new {
                            Some(_) => {
                                g.state.insert(ch.spn.clone(), state[&ch.spn].clone());
                            }
                            None => {
                                g.state.remove(&ch.spn);
                            }
                        }
                        g.applied.set(&ch.spn, ch.new);
                    }
                    self.gauges(&g.applied);
                    tracing::debug!(?stats, "nftables partial sync");
                    return Ok(stats);
                }
                Err(e) => {
                    metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
                        .increment(1);
                    tracing::warn!(error = %e, "nftables partial sync failed; recreating the table");
                    if matches!(e, TxError::Io(_)) {
                        g.sock = None;
                    }
                    stats.fallbacks += 1;
                    g.needs_full = true;
                }
            }
        } else {
            stats.services_changed = state.len();
        }
        let started = Instant::now();
        let desired = Ruleset::build(self.cfg.ruleset(), state);
        if !g.adopt_checked {
            g.adopt_checked = true;
            if self.kernel_fingerprint(g)? == Some(desired.fingerprint()) {
                let generation = sock(&mut g.sock, netns)?
                    .generation()
                    .map_err(TxError::from)?;
                g.generation = Some(generation);
                g.applied = desired;
                g.state = state.clone();
                g.needs_full = false;
                stats.adopted = true;
                stats.services_changed = 0;
                self.gauges(&g.applied);
                metrics::counter!("fairlead_nftables_adopted_tables_total").increment(1);
                tracing::info!(
                    services = state.len(),
                    "nftables table found matching the desired state; adopted as it is"
                );
                return Ok(stats);
            }
        }
        let script = diff::full(&desired);
        let sent = sock(&mut g.sock, netns)?.transact(table, &script.ops);
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
        stats.script = script.stats;
        stats.batch_bytes = batch.bytes.len();
        g.generation = Some(generation);
        g.applied = desired;
        g.state = state.clone();
        g.needs_full = false;
        self.gauges(&g.applied);
        tracing::info!(
            services = state.len(),
            chains = g.applied.chain_count(),
            rules = g.applied.rule_count(),
            elements = g.applied.element_count(),
            bytes = stats.batch_bytes,
            secs = started.elapsed().as_secs_f64(),
            "nftables table recreated"
        );
        Ok(stats)
    }

    /// The fingerprint stored in the kernel's table, if there is one.
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

    /// The periodic check: if anyone committed to nf_tables since our last
    /// transaction, recreate the table from the model (which undoes
    /// whatever they did to it; other tables are not ours to judge).
    pub async fn verify(&self) -> Result<Verified, NftError> {
        let mut g = self.inner.lock().await;
        blocking(|| {
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
                "the nf_tables ruleset changed since our last transaction; recreating our table"
            );
            metrics::counter!("fairlead_nftables_repairs_total").increment(1);
            g.needs_full = true;
            let state = g.state.clone();
            self.sync_locked(&mut g, &state)?;
            Ok(Verified::Repaired)
        })
    }

    /// The service ports whose rules must be rebuilt, with their new rules.
    /// Both states are sorted maps: one merge walk, comparing pointers
    /// first (the cache hands out the same `Arc` for an unchanged port).
    fn changes(&self, g: &Inner, state: &ProxyState, stats: &mut SyncStats) -> Vec<Change> {
        use std::cmp::Ordering;
        let mut out = Vec::new();
        let rebuilt = |spn: &ServicePortName, info| Change {
            spn: spn.clone(),
            old: g.applied.services().get(spn).cloned(),
            new: Some(Arc::new(ruleset::service_rules(&g.applied.cfg, spn, info))),
        };
        let mut old = g.state.iter().peekable();
        let mut new = state.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((o, _)), Some((n, _))) => o.cmp(n),
            };
            match order {
                Ordering::Less => {
                    let (spn, _) = old.next().expect("peeked");
                    stats.services_removed += 1;
                    out.push(Change {
                        spn: spn.clone(),
                        old: g.applied.services().get(spn).cloned(),
                        new: None,
                    });
                }
                Ordering::Greater => {
                    let (spn, info) = new.next().expect("peeked");
                    stats.services_changed += 1;
                    out.push(rebuilt(spn, info));
                }
                Ordering::Equal => {
                    let (_, o) = old.next().expect("peeked");
                    let (spn, n) = new.next().expect("peeked");
                    if !(Arc::ptr_eq(o, n) || **o == **n) {
                        stats.services_changed += 1;
                        out.push(rebuilt(spn, n));
                    }
                }
            }
        }
        out
    }

    /// Delete the table (the daemon's `--cleanup`). The next sync recreates it.
    pub async fn cleanup(&self) -> Result<(), NftError> {
        let mut g = self.inner.lock().await;
        g.needs_full = true;
        g.adopt_checked = true;
        let table = self.cfg.table.clone();
        blocking(|| delete_table(sock(&mut g.sock, self.cfg.netns.as_deref())?, &table))
    }

    /// The model of what the kernel table was last made to match.
    pub async fn applied(&self) -> Ruleset {
        self.inner.lock().await.applied.clone()
    }

    fn gauges(&self, r: &Ruleset) {
        metrics::gauge!("fairlead_nftables_chains").set(r.chain_count() as f64);
        metrics::gauge!("fairlead_nftables_rules").set(r.rule_count() as f64);
        metrics::gauge!("fairlead_nftables_map_elements").set(r.element_count() as f64);
        metrics::gauge!("fairlead_nftables_affinity_sets").set(r.set_count() as f64);
    }
}

/// One conntrack clean-up after a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StaleUdp {
    /// Flows DNATed to an endpoint no longer used.
    Endpoint(std::net::SocketAddrV4),
    /// Flows to a frontend that had no endpoints before.
    Frontend(std::net::Ipv4Addr, u16),
    NodePort(u16),
}

/// What to clean up between two states: for UDP service ports, endpoints
/// no longer usable, and frontends that gain their first endpoint.
fn stale_udp(before: &ProxyState, after: &ProxyState) -> std::collections::BTreeSet<StaleUdp> {
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
                out.insert(StaleUdp::Endpoint(ep));
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
                out.insert(StaleUdp::Frontend(*ip, new.port));
            }
        }
        if let Some(np) = new.node_port {
            out.insert(StaleUdp::NodePort(np));
        }
    }
    out
}

fn delete_table(sock: &mut Socket, table: &str) -> Result<(), NftError> {
    let ops = [diff::Op::AddTable { comment: None }, diff::Op::DeleteTable];
    sock.transact(table, &ops)?;
    Ok(())
}

/// Delete fairlead's table if it exists (atomically: `add` then `delete`),
/// in this process's network namespace or in `netns`.
pub async fn cleanup(netns: Option<&str>, table: &str) -> Result<(), NftError> {
    blocking(|| {
        let mut sock = Socket::open(netns).map_err(NftError::Open)?;
        delete_table(&mut sock, table)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
            vec![StaleUdp::Endpoint("10.244.0.1:53".parse().unwrap())]
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
                StaleUdp::Endpoint("10.244.0.1:53".parse().unwrap()),
                StaleUdp::Frontend("10.96.0.11".parse().unwrap(), 53),
                StaleUdp::NodePort(30053),
            ]
        );
        // Nothing changed: nothing to do.
        assert!(stale_udp(&after, &after).is_empty());
    }
}
