//! One pod's worker: a task that owns the pod on this node from its first
//! sight to its deletion, as the kubelet's pod workers do.
//!
//! ```text
//!  sandbox (netns + IP, resolv.conf/hosts, cgroup)
//!    → start containers → run: exits, probe verdicts, back-off timers,
//!                              pod updates
//!    → deletionTimestamp: SIGTERM, wait the grace period, SIGKILL
//!    → tear the sandbox down → delete the Pod object (grace 0)
//! ```
//!
//! Everything that happens to a container arrives as an [`Event`] on one
//! channel, tagged with the run it belongs to, so a late event of an
//! earlier run is ignored. The rules (restart or not, after what back-off,
//! phase, status) are the pure functions of [`super::lifecycle`]; the
//! worker reports the status whenever it changes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::cgroup::{Limits, PodCgroup};
use super::env::{self, PodFacts};
use super::lifecycle::{self, Condition, ContainerView, State};
use super::probe::{self, Kind, Verdict};
use super::runtime::{ContainerRun, Killer, Running, Sandbox};
use super::Ctx;

/// How long a container killed for a failed liveness probe, or a pod
/// whose object vanished, gets between SIGTERM and SIGKILL at most.
const KILL_GRACE_CAP: Duration = Duration::from_secs(30);

/// How often a failed status report or sandbox setup is retried.
const RETRY: Duration = Duration::from_secs(1);

/// What happens to a container run.
#[derive(Debug)]
enum Event {
    Exited { idx: usize, run: u64, code: i32 },
    Probe { idx: usize, run: u64, v: Verdict },
}

/// One container of the pod.
struct Slot {
    spec: Container,
    view: ContainerView,
    /// The current run (events of other runs are stale).
    run: u64,
    killer: Option<Killer>,
    started: Option<Instant>,
    /// Consecutive failed runs, for the back-off.
    failures: u32,
    next_start: Option<Instant>,
    restart_pending: bool,
    probes: Vec<tokio::task::JoinHandle<()>>,
    /// The current run's log file.
    log: Option<PathBuf>,
}

impl Slot {
    fn stop_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
    }
}

struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    uid: String,
    dir: PathBuf,
    slots: Vec<Slot>,
    conds: Vec<Condition>,
    sandbox: Option<Sandbox>,
    netns: Option<String>,
    pod_ip: Option<IpAddr>,
    start_time: Timestamp,
    cgroup: PodCgroup,
    oom_seen: u64,
    tx: mpsc::Sender<Event>,
    terminating: bool,
    phase_override: Option<&'static str>,
    reported: Option<Value>,
    report_failed: bool,
    /// Where the current containers' probes connect (set at start).
    target: Option<probe::Target>,
    /// When the service-account token is due for renewal (`None`: the
    /// pod has none).
    token_refresh_at: Option<Instant>,
}

/// How long a projected service-account token lives (the kubelet's 3607
/// s); it is renewed at 80% of that, as the kubelet does.
const TOKEN_SECONDS: u64 = 3607;

fn policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The grace period of a pod marked for deletion.
fn grace(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

/// Parse a Kubernetes quantity (`64Mi`, `1G`, `500m`, `0.5`) to a number
/// of units (bytes or cores), as f64.
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(n * mult)
}

/// The pod's limits: the sum over containers, unlimited if any is.
fn limits(pod: &Pod) -> Limits {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let sum = |res: &str, scale: f64| -> Option<u64> {
        let mut total = 0.0;
        for c in containers {
            let q = c.resources.as_ref()?.limits.as_ref()?.get(res)?;
            total += quantity(&q.0)? * scale;
        }
        (!containers.is_empty()).then_some(total.ceil() as u64)
    };
    Limits {
        memory_bytes: sum("memory", 1.0),
        cpu_millis: sum("cpu", 1000.0),
    }
}

/// Run the worker of the pod in `rx` until the pod is gone from this node.
pub(super) async fn run(ctx: Arc<Ctx>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow_and_update().clone() else {
        return;
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let (tx, mut events) = mpsc::channel(64);
    let slots = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| Slot {
            view: ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                state: State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
                last: None,
                restarts: 0,
                ready: false,
                started: false,
                id: None,
            },
            spec: c,
            run: 0,
            killer: None,
            started: None,
            failures: 0,
            next_start: Some(Instant::now()),
            restart_pending: false,
            probes: Vec::new(),
            log: None,
        })
        .collect();
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now);
    let mut w = Worker {
        dir: ctx.cfg.data_dir.join("pods").join(&uid),
        cgroup: ctx.cgroups.pod(&uid),
        ctx,
        uid,
        pod,
        slots,
        conds: Vec::new(),
        sandbox: None,
        netns: None,
        pod_ip: None,
        start_time,
        oom_seen: 0,
        tx,
        terminating: false,
        phase_override: None,
        reported: None,
        report_failed: false,
        target: None,
        token_refresh_at: None,
    };
    w.main(&mut rx, &mut events).await;
}

impl Worker {
    async fn main(
        &mut self,
        rx: &mut watch::Receiver<Option<Pod>>,
        events: &mut mpsc::Receiver<Event>,
    ) {
        // A pod that already ended is never run again; it only waits for
        // its deletion.
        if terminal(&self.pod) && self.pod.metadata.deletion_timestamp.is_none() {
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let p = rx.borrow_and_update().clone();
                match p {
                    None => return self.teardown(true).await,
                    Some(p) if p.metadata.deletion_timestamp.is_some() => {
                        self.pod = p;
                        self.teardown(false).await;
                        return self.finalize().await;
                    }
                    Some(p) => self.pod = p,
                }
            }
        }
        // What an earlier life of this agent started keeps running: the
        // same processes, address and namespace. Anything less is cleared,
        // so the pod starts clean.
        let adopted = self.adopt().await;
        if !adopted {
            self.teardown(false).await;
        }
        if self.pod.metadata.deletion_timestamp.is_some() {
            if adopted {
                let left = self
                    .pod
                    .metadata
                    .deletion_timestamp
                    .as_ref()
                    .map(|t| t.0.duration_since(Timestamp::now()))
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default();
                self.terminate(left, events).await;
                self.report().await;
                self.teardown(false).await;
            }
            return self.finalize().await;
        }
        if !adopted && !self.create_sandbox_retrying(rx).await {
            return;
        }
        self.start_due().await;
        self.report().await;
        loop {
            let due = self.slots.iter().filter_map(|s| s.next_start).min();
            tokio::select! {
                Some(ev) = events.recv() => self.handle(ev),
                r = rx.changed() => {
                    let p = if r.is_err() { None } else { rx.borrow_and_update().clone() };
                    match p {
                        None => {
                            // The object is gone (force-deleted): stop now.
                            self.terminate(Duration::from_secs(2), events).await;
                            return self.teardown(true).await;
                        }
                        Some(p) => {
                            let deleting = p.metadata.deletion_timestamp.is_some();
                            // Someone else changed our status (the node
                            // lifecycle controller marks pods of a silent
                            // node not ready): post ours again.
                            if ready_condition(&p) != self.reported.as_ref().and_then(reported_ready) {
                                self.reported = None;
                            }
                            self.pod = p;
                            if deleting {
                                let g = grace(&self.pod);
                                self.terminate(g, events).await;
                                self.report().await;
                                self.teardown(false).await;
                                return self.finalize().await;
                            }
                        }
                    }
                }
                _ = sleep_until(due), if due.is_some() => self.start_due().await,
                _ = tokio::time::sleep(RETRY), if self.report_failed => {}
                _ = sleep_until(self.token_refresh_at), if self.token_refresh_at.is_some() && self.sandbox.is_some() => {
                    if let Err(e) = self.project_token().await {
                        tracing::warn!(pod = %name(&self.pod), error = %e, "renewing the service-account token");
                        self.token_refresh_at = Some(Instant::now() + RETRY);
                    }
                }
            }
            // A pod whose containers are all done for good (Succeeded or
            // Failed) gives its sandbox back; its status keeps the IP.
            let finished = self
                .slots
                .iter()
                .all(|s| s.killer.is_none() && s.next_start.is_none());
            if finished && self.sandbox.is_some() {
                self.teardown(false).await;
            }
            self.report().await;
        }
    }

    /// Create the sandbox, retrying (and reporting why) until it works:
    /// true; false if the pod went away meanwhile (then it is finished).
    async fn create_sandbox_retrying(&mut self, rx: &mut watch::Receiver<Option<Pod>>) -> bool {
        loop {
            match self.create_sandbox().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(pod = %name(&self.pod), error = %e, "creating the pod sandbox");
                    for s in &mut self.slots {
                        s.view.state = State::Waiting {
                            reason: "ContainerCreating".into(),
                            message: Some(format!("failed to create pod sandbox: {e}")),
                        };
                    }
                    self.report().await;
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY * 2) => {}
                        r = rx.changed() => {
                            let gone = r.is_err() || rx.borrow_and_update().is_none();
                            let deleting = rx.borrow().as_ref().is_some_and(|p| p.metadata.deletion_timestamp.is_some());
                            if gone || deleting {
                                self.teardown(false).await;
                                if deleting && !gone {
                                    self.finalize().await;
                                }
                                return false;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Take over the sandbox and containers an earlier agent left running
    /// for this pod, with the status it reported (restart counts,
    /// readiness, condition times). False when nothing of it runs.
    async fn adopt(&mut self) -> bool {
        let status = self.pod.status.clone().unwrap_or_default();
        let reported = status.container_statuses.clone().unwrap_or_default();
        let pids = self.dir.join("pids");
        let live: Vec<Option<i32>> = self
            .slots
            .iter()
            .map(|s| super::runtime::recorded_alive(&pids.join(&s.spec.name)))
            .collect();
        if reported.is_empty() || live.iter().all(Option::is_none) {
            return false;
        }
        let host_network = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let ctx = self.ctx.clone();
        let (netns, ip) = if host_network {
            (None, ctx.cfg.host_ip)
        } else {
            let Ok(n) = std::fs::read_to_string(self.dir.join("netns")) else {
                return false;
            };
            let n = n.trim().to_string();
            let ip = ctx.net.as_ref().and_then(|net| net.address_of(&self.uid));
            match ip {
                Some(ip) if Path::new("/run/netns").join(&n).exists() => (Some(n), IpAddr::V4(ip)),
                _ => return false,
            }
        };
        let existing = |f: &str| Some(self.dir.join(f)).filter(|p| p.exists());
        let service_account = existing("serviceaccount");
        if service_account.is_some() {
            // Renew now: the token on disk may be old.
            self.token_refresh_at = Some(Instant::now());
        }
        let sandbox = Sandbox {
            netns: netns.as_ref().map(|n| PathBuf::from("/run/netns").join(n)),
            resolv_conf: existing("resolv.conf"),
            hosts: existing("hosts"),
            hostname: (!host_network).then(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.hostname.clone())
                    .unwrap_or_else(|| name(&self.pod).to_string())
            }),
            cgroup_procs: self.cgroup.procs_files(),
            service_account,
        };
        self.netns = netns;
        self.pod_ip = Some(ip);
        self.oom_seen = self.cgroup.oom_kills();
        for c in status.conditions.iter().flatten() {
            let type_ = match c.type_.as_str() {
                "PodScheduled" => "PodScheduled",
                "Initialized" => "Initialized",
                "ContainersReady" => "ContainersReady",
                "Ready" => "Ready",
                _ => continue,
            };
            self.conds.push(Condition {
                type_,
                status: c.status == "True",
                since: c
                    .last_transition_time
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or_else(Timestamp::now),
                reason: (c.status != "True").then_some("ContainersNotReady"),
            });
        }
        let target = probe::Target {
            ip,
            sandbox: sandbox.clone(),
            runtime: ctx.runtime.clone(),
            env: Vec::new(),
        };
        let policy = policy(&self.pod).to_string();
        for (idx, slot) in self.slots.iter_mut().enumerate() {
            let Some(st) = reported.iter().find(|r| r.name == slot.spec.name) else {
                continue;
            };
            slot.view.restarts = st.restart_count.max(0) as u32;
            slot.view.last = st
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| State::Terminated {
                    exit_code: t.exit_code,
                    reason: t.reason.clone().unwrap_or_else(|| "Error".into()),
                    message: t.message.clone(),
                    started_at: t.started_at.as_ref().map(|x| x.0),
                    finished_at: t
                        .finished_at
                        .as_ref()
                        .map(|x| x.0)
                        .unwrap_or_else(Timestamp::now),
                    container_id: t.container_id.clone(),
                });
            let logs = super::server::container_logs(&self.dir, &slot.spec.name);
            let run_log = logs.and_then(|l| Some(l.dir.join(format!("{}.log", l.runs.last()?))));
            match live[idx].map(|pid| ctx.runtime.adopt(&pid.to_string())) {
                Some(Ok(running)) => {
                    slot.run += 1;
                    slot.killer = Some(running.killer());
                    slot.view.id = Some(running.id());
                    slot.started = Some(Instant::now());
                    slot.next_start = None;
                    slot.log = run_log;
                    let started_at = st
                        .state
                        .as_ref()
                        .and_then(|s| s.running.as_ref())
                        .and_then(|r| r.started_at.as_ref())
                        .map(|t| t.0)
                        .unwrap_or_else(Timestamp::now);
                    slot.view.state = State::Running { started_at };
                    slot.view.ready = st.ready;
                    slot.view.started = st.started.unwrap_or(true);
                    watch_exit(running, idx, slot.run, &self.tx);
                    if slot.view.started {
                        spawn_probe(slot, idx, Kind::Readiness, &target, &self.tx);
                        spawn_probe(slot, idx, Kind::Liveness, &target, &self.tx);
                    } else {
                        spawn_probe(slot, idx, Kind::Startup, &target, &self.tx);
                    }
                }
                _ => {
                    // It ended while no agent watched: how is not known.
                    let term = State::Terminated {
                        exit_code: super::runtime::UNKNOWN_EXIT,
                        reason: "Error".into(),
                        message: Some("ended while the node agent was not running".into()),
                        started_at: None,
                        finished_at: Timestamp::now(),
                        container_id: st.container_id.clone(),
                    };
                    if lifecycle::should_restart(&policy, super::runtime::UNKNOWN_EXIT) {
                        slot.view.last = Some(term.clone());
                        slot.restart_pending = true;
                        slot.next_start = Some(Instant::now());
                    } else {
                        slot.next_start = None;
                    }
                    slot.view.state = term;
                }
            }
        }
        self.target = Some(target);
        self.sandbox = Some(sandbox);
        tracing::info!(pod = %name(&self.pod), ip = %ip, "adopted the pod's running containers");
        true
    }

    /// The pod's network namespace, files and cgroup.
    async fn create_sandbox(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(self.dir.join("logs"))
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        // Which pod this is, for the log server.
        std::fs::write(
            self.dir.join("meta"),
            format!("{}/{}\n", namespace(&self.pod), name(&self.pod)),
        )
        .map_err(|e| format!("writing the pod's meta file: {e}"))?;
        let spec = self.pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let ctx = self.ctx.clone();
        let (netns, ip) = if host_network {
            (None, ctx.cfg.host_ip)
        } else {
            let net = ctx.net.as_ref().ok_or("the node has no pod CIDR yet")?;
            let ip = net.allocate(&self.uid)?;
            let ns_name = format!(
                "fl-pod-{}-{}-{}",
                namespace(&self.pod),
                name(&self.pod),
                &self.uid[..self.uid.len().min(8)]
            );
            let veth = format!("flv{}", &self.uid.replace('-', "")[..8.min(self.uid.len())]);
            std::fs::write(self.dir.join("netns"), &ns_name).map_err(|e| e.to_string())?;
            self.netns = Some(ns_name.clone());
            net.add(&ns_name, &veth, ip).await?;
            (Some(ns_name), IpAddr::V4(ip))
        };
        self.pod_ip = Some(ip);
        let resolv = env::resolv_conf(&self.pod, ctx.cfg.dns.as_ref(), &ctx.host_resolv)
            .map(|text| {
                let p = self.dir.join("resolv.conf");
                std::fs::write(&p, text).map(|_| p)
            })
            .transpose()
            .map_err(|e| format!("writing resolv.conf: {e}"))?;
        let hosts = if host_network {
            None
        } else {
            let p = self.dir.join("hosts");
            std::fs::write(&p, env::hosts(&self.pod, &ip.to_string()))
                .map_err(|e| format!("writing hosts: {e}"))?;
            Some(p)
        };
        self.cgroup.create(limits(&self.pod))?;
        self.oom_seen = self.cgroup.oom_kills();
        let hostname = (!host_network).then(|| {
            spec.hostname
                .clone()
                .unwrap_or_else(|| name(&self.pod).to_string())
        });
        let service_account = self.project_token().await?;
        self.sandbox = Some(Sandbox {
            netns: netns.map(|n| PathBuf::from("/run/netns").join(n)),
            resolv_conf: resolv,
            hosts,
            hostname,
            cgroup_procs: self.cgroup.procs_files(),
            service_account,
        });
        Ok(())
    }

    /// The pod's service-account volume (Kubernetes' projected
    /// `kube-api-access-*`): a token from the TokenRequest API bound to
    /// this pod, the cluster CA and the namespace, in
    /// `<pod dir>/serviceaccount`, which containers see at
    /// `api::satoken::SERVICE_ACCOUNT_DIR`. Files are replaced atomically, so
    /// a renewal is seen by running containers (the directory is bind
    /// mounted, not the files). `None` when the pod opts out
    /// (`automountServiceAccountToken: false`).
    async fn project_token(&mut self) -> Result<Option<PathBuf>, String> {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let spec = self.pod.spec.clone().unwrap_or_default();
        if spec.automount_service_account_token == Some(false) {
            return Ok(None);
        }
        let sa = spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let req: TokenRequest = serde_json::from_value(json!({"spec": {
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                "name": name(&self.pod), "uid": self.uid},
        }}))
        .map_err(|e| e.to_string())?;
        let issued =
            match Api::<ServiceAccount>::namespaced(self.ctx.client.clone(), namespace(&self.pod))
                .create_token_request(&sa, &Default::default(), &req)
                .await
            {
                Ok(t) => t,
                // No such ServiceAccount (a cluster without the controllers
                // that create `default`): the pod runs without the volume
                // rather than never.
                Err(kube::Error::Api(e)) if e.code == 404 && self.token_refresh_at.is_none() => {
                    tracing::warn!(pod = %name(&self.pod), service_account = %sa,
                    "no such ServiceAccount; starting the pod without its token volume");
                    return Ok(None);
                }
                Err(e) => return Err(format!("a token for ServiceAccount {sa}: {e}")),
            };
        let token = issued.status.map(|s| s.token).unwrap_or_default();
        let dir = self.dir.join("serviceaccount");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let ca = self.ctx.cfg.client_ca.clone().unwrap_or_default();
        for (file, data) in [
            ("token", token.as_bytes()),
            ("ca.crt", &ca[..]),
            ("namespace", namespace(&self.pod).as_bytes()),
        ] {
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, data)
                .and_then(|_| std::fs::rename(&tmp, dir.join(file)))
                .map_err(|e| format!("writing the service-account {file}: {e}"))?;
        }
        self.token_refresh_at = Some(Instant::now() + Duration::from_secs(TOKEN_SECONDS * 8 / 10));
        Ok(Some(dir))
    }

    /// Start every container whose time has come.
    async fn start_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].next_start.is_some_and(|t| t <= now))
            .collect();
        if due.is_empty() {
            return;
        }
        let services = self.services().await;
        for i in due {
            self.start(i, &services).await;
        }
    }

    /// The Services whose variables containers get (`enableServiceLinks`:
    /// the pod's namespace; always `kubernetes` in `default`).
    async fn services(&self) -> Vec<Service> {
        let ns = namespace(&self.pod).to_string();
        let links = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let mut out = Vec::new();
        if links {
            match Api::<Service>::namespaced(self.ctx.client.clone(), &ns)
                .list(&ListParams::default())
                .await
            {
                Ok(l) => out.extend(l.items),
                Err(e) => {
                    tracing::warn!(error = %e, "listing Services for pod environment variables")
                }
            }
        }
        if ns != "default" || !links {
            if let Ok(Some(k)) = Api::<Service>::namespaced(self.ctx.client.clone(), "default")
                .get_opt("kubernetes")
                .await
            {
                out.retain(|s| s.metadata.name.as_deref() != Some("kubernetes"));
                out.push(k);
            }
        }
        out
    }

    async fn start(&mut self, idx: usize, services: &[Service]) {
        let Some(sb) = self.sandbox.clone() else {
            return;
        };
        let facts = PodFacts {
            pod_ip: self.pod_ip.map(|i| i.to_string()).unwrap_or_default(),
            host_ip: self.ctx.cfg.host_ip.to_string(),
            node_name: self.ctx.cfg.node_name.clone(),
        };
        let pod = self.pod.clone();
        let backoff = self.ctx.cfg.backoff;
        let slot = &mut self.slots[idx];
        slot.next_start = None;
        let env = match env::container_env(&pod, &slot.spec, &facts, services) {
            Ok(e) => e,
            Err(e) => {
                slot.failures += 1;
                slot.view.state = State::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: Some(e),
                };
                slot.next_start = Some(Instant::now() + backoff.delay(slot.failures + 1));
                return;
            }
        };
        let vars: std::collections::BTreeMap<String, String> = env.iter().cloned().collect();
        let restarts = slot.view.restarts + u32::from(slot.restart_pending);
        let log_dir = self.dir.join("logs").join(&slot.spec.name);
        let _ = std::fs::create_dir_all(&log_dir);
        let run = ContainerRun {
            image: slot.view.image.clone(),
            command: slot
                .spec
                .command
                .iter()
                .flatten()
                .map(|s| env::expand(s, &vars))
                .collect(),
            args: slot
                .spec
                .args
                .iter()
                .flatten()
                .map(|s| env::expand(s, &vars))
                .collect(),
            env: env.clone(),
            working_dir: slot.spec.working_dir.clone(),
            log: log_dir.join(format!("{restarts}.log")),
        };
        match self.ctx.runtime.start(&sb, &run).await {
            Ok(running) => {
                slot.log = Some(run.log.clone());
                slot.run += 1;
                slot.view.restarts = restarts;
                slot.restart_pending = false;
                slot.killer = Some(running.killer());
                slot.view.id = Some(running.id());
                if let Ok(pid) = running.id().parse::<i32>() {
                    let pids = self.dir.join("pids");
                    let _ = std::fs::create_dir_all(&pids);
                    super::runtime::record_pid(&pids.join(&slot.spec.name), pid);
                }
                slot.started = Some(Instant::now());
                slot.view.state = State::Running {
                    started_at: Timestamp::now(),
                };
                let has_startup = slot.spec.startup_probe.is_some();
                slot.view.started = !has_startup;
                slot.view.ready = !has_startup && slot.spec.readiness_probe.is_none();
                watch_exit(running, idx, slot.run, &self.tx);
                tracing::info!(pod = %name(&pod), container = %slot.spec.name, restarts, "container started");
                let target = probe::Target {
                    ip: self.pod_ip.unwrap_or(self.ctx.cfg.host_ip),
                    sandbox: sb,
                    runtime: self.ctx.runtime.clone(),
                    env,
                };
                if has_startup {
                    spawn_probe(slot, idx, Kind::Startup, &target, &self.tx);
                } else {
                    spawn_probe(slot, idx, Kind::Readiness, &target, &self.tx);
                    spawn_probe(slot, idx, Kind::Liveness, &target, &self.tx);
                }
                self.target = Some(target);
            }
            Err(msg) => {
                tracing::warn!(pod = %name(&pod), container = %slot.spec.name, error = %msg, "container did not start");
                slot.failures += 1;
                slot.view.state = State::Waiting {
                    reason: "RunContainerError".into(),
                    message: Some(msg),
                };
                slot.next_start = Some(Instant::now() + backoff.delay(slot.failures + 1));
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Exited { idx, run, code } => self.exited(idx, run, code),
            Event::Probe { idx, run, v } => self.probed(idx, run, v),
        }
    }

    fn exited(&mut self, idx: usize, run: u64, code: i32) {
        let backoff = self.ctx.cfg.backoff;
        let ooms = self.cgroup.oom_kills();
        let oom = ooms > self.oom_seen;
        self.oom_seen = ooms;
        let policy = policy(&self.pod).to_string();
        let (pod_name, pod_ns, uid) = (
            name(&self.pod).to_string(),
            namespace(&self.pod).to_string(),
            self.uid.clone(),
        );
        let terminating = self.terminating;
        let slot = &mut self.slots[idx];
        if run != slot.run || slot.killer.is_none() {
            return;
        }
        slot.stop_probes();
        slot.killer = None;
        slot.view.ready = false;
        slot.view.started = false;
        // Tells a log follower that this run's output is complete.
        if let Some(log) = slot.log.take() {
            let _ = std::fs::write(log.with_extension("exited"), "");
        }
        let ran = slot.started.take().map(|s| s.elapsed()).unwrap_or_default();
        if backoff.resets_after(ran) {
            slot.failures = 0;
        }
        let started_at = match &slot.view.state {
            State::Running { started_at } => Some(*started_at),
            _ => None,
        };
        let term = State::Terminated {
            exit_code: code,
            reason: lifecycle::exit_reason(code, oom).into(),
            message: None,
            started_at,
            finished_at: Timestamp::now(),
            container_id: slot
                .view
                .id
                .clone()
                .map(|id| format!("{}://{id}", self.ctx.runtime.scheme())),
        };
        tracing::info!(pod = %pod_name, container = %slot.spec.name, code, oom, "container exited");
        if terminating || !lifecycle::should_restart(&policy, code) {
            slot.view.state = term;
            return;
        }
        slot.failures += 1;
        let delay = backoff.delay(slot.failures);
        slot.view.last = Some(term.clone());
        slot.restart_pending = true;
        slot.view.state = if delay.is_zero() {
            term
        } else {
            State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off {} restarting failed container={} pod={pod_name}_{pod_ns}({uid})",
                    humantime(delay),
                    slot.spec.name
                )),
            }
        };
        slot.next_start = Some(Instant::now() + delay);
    }

    fn probed(&mut self, idx: usize, run: u64, v: Verdict) {
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(KILL_GRACE_CAP)
            .min(KILL_GRACE_CAP);
        let pod_name = name(&self.pod).to_string();
        let target = self.target.clone();
        let tx = self.tx.clone();
        let slot = &mut self.slots[idx];
        if run != slot.run || slot.killer.is_none() || self.terminating {
            return;
        }
        match (v.kind, v.ok) {
            (Kind::Startup, true) => {
                slot.view.started = true;
                slot.view.ready = slot.spec.readiness_probe.is_none();
                if let Some(t) = &target {
                    spawn_probe(slot, idx, Kind::Readiness, t, &tx);
                    spawn_probe(slot, idx, Kind::Liveness, t, &tx);
                }
            }
            (Kind::Readiness, ok) => slot.view.ready = ok,
            (kind, _) => {
                tracing::info!(pod = %pod_name, container = %slot.spec.name, ?kind,
                    "container failed its {} probe, will be restarted",
                    if kind == Kind::Startup { "startup" } else { "liveness" });
                slot.view.ready = false;
                slot.stop_probes();
                if let Some(k) = slot.killer.clone() {
                    k.signal(libc::SIGTERM);
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        k.signal(libc::SIGKILL);
                    });
                }
            }
        }
    }

    /// SIGTERM every running container, wait up to `grace` for them to
    /// end, then SIGKILL what is left (and everything in the cgroup).
    async fn terminate(&mut self, grace: Duration, events: &mut mpsc::Receiver<Event>) {
        self.terminating = true;
        let deadline = Instant::now() + grace;
        for s in &mut self.slots {
            s.stop_probes();
            s.view.ready = false;
            s.next_start = None;
        }
        // preStop hooks of running containers first, within the grace
        // period (`sleep` gives proxies time to drop the pod's endpoints
        // before it stops accepting).
        let hooks: Vec<_> = self
            .slots
            .iter()
            .filter(|s| s.killer.is_some())
            .filter_map(|s| s.spec.lifecycle.as_ref()?.pre_stop.clone())
            .map(|h| {
                let runtime = self.ctx.runtime.clone();
                let sandbox = self.sandbox.clone();
                async move {
                    if let Some(sl) = &h.sleep {
                        tokio::time::sleep(Duration::from_secs(sl.seconds.max(0) as u64)).await;
                    } else if let (Some(e), Some(sb)) = (&h.exec, &sandbox) {
                        let argv = e.command.clone().unwrap_or_default();
                        let left = deadline.saturating_duration_since(Instant::now());
                        if let Err(err) = runtime.exec(sb, &argv, &[], left).await {
                            tracing::info!(error = %err, "preStop hook failed");
                        }
                    }
                }
            })
            .collect();
        if !hooks.is_empty() {
            let mut all = std::pin::pin!(futures::future::join_all(hooks));
            loop {
                tokio::select! {
                    _ = &mut all => break,
                    Some(ev) = events.recv() => self.handle(ev),
                    _ = tokio::time::sleep_until(deadline.into()) => break,
                }
            }
        }
        for s in &mut self.slots {
            if let Some(k) = &s.killer {
                k.signal(libc::SIGTERM);
            }
        }
        let running = |w: &Worker| w.slots.iter().any(|s| s.killer.is_some());
        while running(self) {
            tokio::select! {
                Some(ev) = events.recv() => self.handle(ev),
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        if running(self) {
            for s in &self.slots {
                if let Some(k) = &s.killer {
                    k.signal(libc::SIGKILL);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while running(self) {
                tokio::select! {
                    Some(ev) = events.recv() => self.handle(ev),
                    _ = tokio::time::sleep_until(deadline.into()) => break,
                }
            }
        }
        // A pod being deleted reports Succeeded or Failed as its
        // containers ended (the kubelet's rule for terminated pods).
        for s in &mut self.slots {
            if let State::Waiting { .. } = s.view.state {
                if let Some(last) = s.view.last.clone() {
                    s.view.state = last;
                }
            }
        }
    }

    /// Remove the sandbox: processes left in the cgroup, the network
    /// namespace and address, and with `files` the pod's directory.
    async fn teardown(&mut self, files: bool) {
        for e in std::fs::read_dir(self.dir.join("pids"))
            .into_iter()
            .flatten()
            .flatten()
        {
            super::runtime::kill_recorded(&e.path());
            let _ = std::fs::remove_file(e.path());
        }
        let cgroup = self.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || cgroup.destroy()).await;
        let netns = self
            .netns
            .take()
            .or_else(|| std::fs::read_to_string(self.dir.join("netns")).ok());
        if let Some(n) = netns {
            super::network::remove_netns(n.trim()).await;
        }
        if let Some(net) = &self.ctx.net {
            net.release(&self.uid);
        }
        self.sandbox = None;
        if files {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Delete the Pod object for good (grace 0, this pod's uid only), then
    /// its files.
    async fn finalize(&mut self) {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace(&self.pod));
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        for _ in 0..10 {
            match api.delete(name(&self.pod), &dp).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                Err(e) => {
                    tracing::warn!(pod = %name(&self.pod), error = %e, "deleting the pod object");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Send the status if it changed since the last report.
    async fn report(&mut self) {
        let now = Timestamp::now();
        let views: Vec<ContainerView> = self.slots.iter().map(|s| s.view.clone()).collect();
        lifecycle::update_conditions(&mut self.conds, &views, now);
        let status = lifecycle::status(&lifecycle::PodView {
            policy: policy(&self.pod),
            pod_ip: self.pod_ip.map(|i| i.to_string()),
            host_ip: self.ctx.cfg.host_ip.to_string(),
            start_time: self.start_time,
            qos: lifecycle::qos_class(&self.pod),
            conditions: &self.conds,
            containers: &views,
            scheme: self.ctx.runtime.scheme(),
            phase: self.phase_override,
        });
        if self.reported.as_ref() == Some(&status) {
            self.report_failed = false;
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace(&self.pod));
        match api
            .patch_status(
                name(&self.pod),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => {
                self.reported = Some(status);
                self.report_failed = false;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => self.report_failed = false,
            Err(e) => {
                tracing::warn!(pod = %name(&self.pod), error = %e, "reporting the pod's status");
                self.report_failed = true;
            }
        }
    }
}

/// The status of the Pod object's Ready condition.
fn ready_condition(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// The status of the Ready condition in a status this agent posted.
fn reported_ready(status: &serde_json::Value) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str().map(String::from))
}

/// Report on `tx` when run `run` of container `idx` ends.
fn watch_exit(mut running: Box<dyn Running>, idx: usize, run: u64, tx: &mpsc::Sender<Event>) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let code = running.wait().await;
        let _ = tx.send(Event::Exited { idx, run, code }).await;
    });
}

fn spawn_probe(
    slot: &mut Slot,
    idx: usize,
    kind: Kind,
    t: &probe::Target,
    tx: &mpsc::Sender<Event>,
) {
    // Readiness starts from what the container shows (failing for a new
    // one); the others from passing.
    let start_passing = kind != Kind::Readiness || slot.view.ready;
    let p = match kind {
        Kind::Startup => slot.spec.startup_probe.clone(),
        Kind::Readiness => slot.spec.readiness_probe.clone(),
        Kind::Liveness => slot.spec.liveness_probe.clone(),
    };
    let Some(p) = p else { return };
    let run = slot.run;
    slot.probes.push(tokio::spawn(probe::run(
        kind,
        start_passing,
        p,
        slot.spec.clone(),
        t.clone(),
        tx.clone(),
        move |v| Event::Probe { idx, run, v },
    )));
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// `10s`, `1m20s`, as the kubelet prints back-offs.
fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("500m"), Some(0.5));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("1.5Gi"), Some(1.5 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("x"), None);
        assert_eq!(quantity("5Q"), None);
    }

    #[test]
    fn limits_sum_or_stay_unlimited() {
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}},
            {"name": "b", "resources": {"limits": {"memory": "32Mi"}}},
        ]}}))
        .unwrap();
        assert_eq!(
            limits(&pod),
            Limits {
                memory_bytes: Some(96 * 1024 * 1024),
                cpu_millis: None
            }
        );
    }
}
