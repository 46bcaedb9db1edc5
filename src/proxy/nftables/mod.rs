//! The nftables proxy backend: Service traffic is balanced by the kernel,
//! never by userspace. fairlead owns one `ip` table; every sync is one
//! atomic `nft -f -` transaction.
//!
//! ```text
//!  sync(ProxyState) ── per service port: same Arc / equal info? skip
//!        │              otherwise ruleset::service_rules (pure)
//!        ▼
//!  diff::partial(applied model, changes) ──► nft -f -  (one transaction)
//!        │  ok: commit the changes into the applied model
//!        └─ error: diff::full (add + delete + recreate the table, atomic)
//! ```
//!
//! The applied model lives in memory: a sync costs one comparison per
//! unchanged service port plus the size of the change; the kernel ruleset
//! is never listed. The first sync (and any sync after a failure) recreates
//! the whole table. The ruleset's shape is documented in [`ruleset`].

pub mod diff;
pub mod ruleset;

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use self::diff::{Change, Script, ScriptStats};
use self::ruleset::{Ruleset, RulesetConfig};
use super::ProxyState;

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
    /// The `nft` program and leading arguments (tests run it in their
    /// network namespace: `ip netns exec <ns> nft`).
    pub nft_command: Vec<String>,
}

impl Default for NftablesConfig {
    fn default() -> Self {
        let r = RulesetConfig::default();
        NftablesConfig {
            table: r.table,
            node_name: String::new(),
            nodeport_addresses: Vec::new(),
            masquerade_bit: r.masquerade_bit,
            nft_command: vec!["nft".to_string()],
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
    /// `nft` could not be run at all.
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `nft` rejected the transaction (nothing was applied).
    #[error("nft failed ({status}): {stderr}")]
    Nft { status: String, stderr: String },
}

/// What one sync did (for logs, metrics and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// The table was recreated.
    pub full: bool,
    /// Service ports added or changed.
    pub services_changed: usize,
    pub services_removed: usize,
    /// Partial transactions that failed and were replaced by a full one.
    pub fallbacks: usize,
    pub script: ScriptStats,
    /// Size of the transaction sent to `nft`.
    pub script_bytes: usize,
}

struct Inner {
    /// The state the kernel table was last made to match.
    state: ProxyState,
    /// Its model.
    applied: Ruleset,
    /// The kernel table is not known to match `applied`.
    needs_full: bool,
}

/// The nftables proxy of one node. `sync` with the full desired state
/// after every batch of changes; only the difference is applied.
pub struct NftablesProxy {
    cfg: NftablesConfig,
    inner: Mutex<Inner>,
}

impl NftablesProxy {
    pub fn new(cfg: NftablesConfig) -> Self {
        let applied = Ruleset::new(cfg.ruleset());
        NftablesProxy {
            cfg,
            inner: Mutex::new(Inner {
                state: ProxyState::new(),
                applied,
                needs_full: true,
            }),
        }
    }

    /// Make the kernel table match `state`: the whole table on the first
    /// call and after a failure, otherwise one transaction with only what
    /// changed. A failed partial transaction is retried at once as a full
    /// one; an error means the kernel still has the previous table (each
    /// transaction is atomic) and the next call recreates it.
    pub async fn sync(&self, state: &ProxyState) -> Result<SyncStats, NftError> {
        let mut g = self.inner.lock().await;
        let mut stats = SyncStats::default();
        if !g.needs_full {
            let changes = self.changes(&g, state, &mut stats);
            if changes.is_empty() {
                return Ok(stats);
            }
            let script = diff::partial(&g.applied, &changes);
            let started = Instant::now();
            match self.apply(&script).await {
                Ok(()) => {
                    metrics::histogram!("kubeproxy_sync_partial_proxy_rules_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("fairlead_nftables_partial_syncs_total").increment(1);
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
                    stats.script = script.stats;
                    stats.script_bytes = script.text.len();
                    self.gauges(&g.applied);
                    tracing::debug!(?stats, "nftables partial sync");
                    return Ok(stats);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nftables partial sync failed; recreating the table");
                    stats.fallbacks += 1;
                    g.needs_full = true;
                }
            }
        } else {
            stats.services_changed = state.len();
        }
        // Full sync.
        let started = Instant::now();
        let applied = Ruleset::build(self.cfg.ruleset(), state);
        let script = diff::full(&applied);
        self.apply(&script).await?;
        metrics::histogram!("kubeproxy_sync_full_proxy_rules_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("fairlead_nftables_full_syncs_total").increment(1);
        g.applied = applied;
        g.state = state.clone();
        g.needs_full = false;
        stats.full = true;
        stats.script = script.stats;
        stats.script_bytes = script.text.len();
        self.gauges(&g.applied);
        tracing::info!(
            services = state.len(),
            chains = g.applied.chain_count(),
            elements = g.applied.element_count(),
            bytes = stats.script_bytes,
            "nftables table recreated"
        );
        Ok(stats)
    }

    /// The service ports whose rules must be rebuilt, with their new rules.
    fn changes(&self, g: &Inner, state: &ProxyState, stats: &mut SyncStats) -> Vec<Change> {
        let mut out = Vec::new();
        for (spn, info) in state {
            match g.state.get(spn) {
                Some(old) if Arc::ptr_eq(old, info) || **old == **info => {}
                _ => {
                    stats.services_changed += 1;
                    out.push(Change {
                        spn: spn.clone(),
                        old: g.applied.services().get(spn).cloned(),
                        new: Some(Arc::new(ruleset::service_rules(&g.applied.cfg, spn, info))),
                    });
                }
            }
        }
        for spn in g.state.keys().filter(|k| !state.contains_key(*k)) {
            stats.services_removed += 1;
            out.push(Change {
                spn: spn.clone(),
                old: g.applied.services().get(spn).cloned(),
                new: None,
            });
        }
        out
    }

    /// Delete the table (the daemon's `--cleanup`). The next sync recreates it.
    pub async fn cleanup(&self) -> Result<(), NftError> {
        let mut g = self.inner.lock().await;
        g.needs_full = true;
        cleanup(&self.cfg.nft_command, &self.cfg.table).await
    }

    /// The model of what the kernel table was last made to match.
    pub async fn applied(&self) -> Ruleset {
        self.inner.lock().await.applied.clone()
    }

    async fn apply(&self, script: &Script) -> Result<(), NftError> {
        if script.is_empty() {
            return Ok(());
        }
        run_nft(&self.cfg.nft_command, &script.text)
            .await
            .inspect_err(|_| {
                metrics::counter!("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
                    .increment(1);
            })
    }

    fn gauges(&self, r: &Ruleset) {
        metrics::gauge!("fairlead_nftables_chains").set(r.chain_count() as f64);
        metrics::gauge!("fairlead_nftables_rules").set(r.rule_count() as f64);
        metrics::gauge!("fairlead_nftables_map_elements").set(r.element_count() as f64);
        metrics::gauge!("fairlead_nftables_affinity_sets").set(r.set_count() as f64);
    }
}

/// Delete fairlead's table if it exists (atomically: `add` then `delete`).
pub async fn cleanup(nft_command: &[String], table: &str) -> Result<(), NftError> {
    run_nft(
        nft_command,
        &format!("add table ip {table}\ndelete table ip {table}\n"),
    )
    .await
}

/// How much of nft's complaint goes into an error.
const STDERR_LIMIT: usize = 4096;

/// Run `nft -f -` with `script` on its stdin.
pub async fn run_nft(nft_command: &[String], script: &str) -> Result<(), NftError> {
    let (program, args) = nft_command.split_first().ok_or_else(|| NftError::Spawn {
        command: String::new(),
        source: std::io::Error::other("empty nft command"),
    })?;
    let spawn_err = |source| NftError::Spawn {
        command: nft_command.join(" "),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let text = script.to_string();
    let writer = tokio::spawn(async move {
        let r = stdin.write_all(text.as_bytes()).await;
        drop(stdin);
        r
    });
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    let written = writer
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if out.status.success() {
        if let Err(e) = written {
            return Err(spawn_err(e));
        }
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.len() > STDERR_LIMIT {
        let mut cut = STDERR_LIMIT;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str(" ...");
    }
    Err(NftError::Nft {
        status: out.status.to_string(),
        stderr,
    })
}
