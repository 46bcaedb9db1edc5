//! The kubelet's rules as pure functions: when a container restarts and
//! after what back-off, the pod's phase, and the status the API shows.
//! The pod worker (`kubelet::pod`) feeds them what happened.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::{json, Value};

/// A container's state, as `containerStatuses[].state` shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
        container_id: Option<String>,
    },
}

impl State {
    fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            State::Running { started_at } => json!({"running": {"startedAt": ts(started_at)}}),
            State::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
                container_id,
            } => {
                let mut t = json!({
                    "exitCode": exit_code,
                    "reason": reason,
                    "finishedAt": ts(finished_at),
                });
                if let Some(s) = started_at {
                    t["startedAt"] = json!(ts(s));
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                if let Some(id) = container_id {
                    t["containerID"] = json!(id);
                }
                json!({"terminated": t})
            }
        }
    }
}

/// RFC 3339 to the second, as the API shows times.
pub fn ts(t: &Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The reason of a container that ended with `exit_code`.
pub fn exit_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// What the status of one container needs.
#[derive(Clone, Debug)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last: Option<State>,
    pub restarts: u32,
    pub ready: bool,
    pub started: bool,
    pub id: Option<String>,
}

/// Whether a container that exited with `exit_code` runs again.
pub fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// CrashLoopBackOff's delays: the first restart is immediate, then
/// `initial`, doubling up to `max`. A container that ran `2 × max`
/// without failing starts over (the kubelet's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay before the restart that follows the `failures`-th
    /// consecutive exit (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        let shift = (failures - 2).min(20);
        self.initial.saturating_mul(1 << shift).min(self.max)
    }

    /// Whether a run of `ran` forgives the earlier failures.
    pub fn resets_after(&self, ran: Duration) -> bool {
        ran >= self.max.saturating_mul(2)
    }
}

/// The pod's phase from its containers (the kubelet's `getPhase`).
pub fn phase(policy: &str, containers: &[ContainerView]) -> &'static str {
    let (mut pending, mut running, mut failed) = (0, 0, 0);
    for c in containers {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Waiting { .. } if c.last.is_some() => running += 1,
            State::Waiting { .. } => pending += 1,
            State::Terminated { exit_code, .. } if *exit_code != 0 => failed += 1,
            State::Terminated { .. } => {}
        }
    }
    if pending > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else {
        match policy {
            "Always" => "Running",
            "OnFailure" if failed > 0 => "Running",
            _ if failed > 0 => "Failed",
            _ => "Succeeded",
        }
    }
}

/// The pod's QoS class from its containers' requests and limits.
pub fn qos_class(pod: &k8s_openapi::api::core::v1::Pod) -> &'static str {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let r = c.resources.as_ref();
        let limits = r.and_then(|r| r.limits.as_ref());
        let requests = r.and_then(|r| r.requests.as_ref());
        any |= limits.is_some_and(|l| !l.is_empty()) || requests.is_some_and(|q| !q.is_empty());
        for res in ["cpu", "memory"] {
            let l = limits.and_then(|l| l.get(res));
            let q = requests.and_then(|q| q.get(res)).or(l);
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    if guaranteed {
        "Guaranteed"
    } else if any {
        "Burstable"
    } else {
        "BestEffort"
    }
}

/// A pod condition with the time its status last changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: bool,
    pub since: Timestamp,
    pub reason: Option<&'static str>,
}

/// Update `conds` (PodScheduled, Initialized, ContainersReady, Ready) to
/// `containers`, keeping each transition time until its status flips.
pub fn update_conditions(conds: &mut Vec<Condition>, containers: &[ContainerView], now: Timestamp) {
    let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
    let want: [(&'static str, bool, Option<&'static str>); 4] = [
        ("PodScheduled", true, None),
        ("Initialized", true, None),
        (
            "ContainersReady",
            all_ready,
            (!all_ready).then_some("ContainersNotReady"),
        ),
        (
            "Ready",
            all_ready,
            (!all_ready).then_some("ContainersNotReady"),
        ),
    ];
    for (type_, status, reason) in want {
        match conds.iter_mut().find(|c| c.type_ == type_) {
            Some(c) if c.status == status => c.reason = reason,
            Some(c) => {
                c.status = status;
                c.since = now;
                c.reason = reason;
            }
            None => conds.push(Condition {
                type_,
                status,
                since: now,
                reason,
            }),
        }
    }
}

/// Everything `status` is made of.
#[derive(Clone, Debug)]
pub struct PodView<'a> {
    pub policy: &'a str,
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub start_time: Timestamp,
    pub qos: &'static str,
    pub conditions: &'a [Condition],
    pub containers: &'a [ContainerView],
    pub scheme: &'a str,
    /// A phase that overrides the containers' (`Failed` for a pod whose
    /// sandbox cannot be made, `Pending` before it is).
    pub phase: Option<&'static str>,
}

/// The pod's `status`, as the kubelet reports it.
pub fn status(v: &PodView) -> Value {
    let phase = v.phase.unwrap_or_else(|| phase(v.policy, v.containers));
    let mut s = json!({
        "phase": phase,
        "hostIP": v.host_ip,
        "hostIPs": [{"ip": v.host_ip}],
        "startTime": ts(&v.start_time),
        "qosClass": v.qos,
        "conditions": v.conditions.iter().map(|c| {
            let mut j = json!({
                "type": c.type_,
                "status": if c.status { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": ts(&c.since),
            });
            if let Some(r) = c.reason {
                j["reason"] = json!(r);
            }
            j
        }).collect::<Vec<_>>(),
        "containerStatuses": v.containers.iter().map(|c| {
            let mut j = json!({
                "name": c.name,
                "image": c.image,
                "imageID": "",
                "state": c.state.to_json(),
                "lastState": c.last.as_ref().map(State::to_json).unwrap_or_else(|| json!({})),
                "ready": c.ready,
                "started": c.started,
                "restartCount": c.restarts,
            });
            if let Some(id) = &c.id {
                j["containerID"] = json!(format!("{}://{id}", v.scheme));
            }
            j
        }).collect::<Vec<_>>(),
    });
    if let Some(ip) = &v.pod_ip {
        s["podIP"] = json!(ip);
        s["podIPs"] = json!([{"ip": ip}]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: State, last: bool) -> ContainerView {
        ContainerView {
            name: "c".into(),
            image: "fairlead".into(),
            last: last.then(|| State::Terminated {
                exit_code: 1,
                reason: "Error".into(),
                message: None,
                started_at: None,
                finished_at: Timestamp::UNIX_EPOCH,
                container_id: None,
            }),
            state,
            restarts: 0,
            ready: false,
            started: false,
            id: None,
        }
    }

    fn done(code: i32) -> State {
        State::Terminated {
            exit_code: code,
            reason: exit_reason(code, false).into(),
            message: None,
            started_at: None,
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: None,
        }
    }

    fn waiting() -> State {
        State::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        }
    }

    #[test]
    fn restart_policy() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("OnFailure", 2));
        assert!(!should_restart("OnFailure", 0));
        assert!(!should_restart("Never", 137));
    }

    #[test]
    fn backoff_doubles_from_the_second_restart() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let d: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(d, [0, 1, 2, 4, 5, 5]);
        assert!(b.resets_after(Duration::from_secs(10)));
        assert!(!b.resets_after(Duration::from_secs(9)));
    }

    #[test]
    fn phase_from_containers() {
        let running = State::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        assert_eq!(phase("Always", &[c(waiting(), false)]), "Pending");
        assert_eq!(
            phase("Always", &[c(running.clone(), false), c(waiting(), false)]),
            "Pending"
        );
        assert_eq!(phase("Always", &[c(running, false)]), "Running");
        assert_eq!(
            phase("Always", &[c(waiting(), true)]),
            "Running",
            "crash-looping"
        );
        assert_eq!(phase("Never", &[c(done(0), false)]), "Succeeded");
        assert_eq!(
            phase("Never", &[c(done(0), false), c(done(1), false)]),
            "Failed"
        );
        assert_eq!(phase("OnFailure", &[c(done(1), false)]), "Running");
        assert_eq!(phase("OnFailure", &[c(done(0), false)]), "Succeeded");
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut conds = Vec::new();
        let mut cs = [c(waiting(), false)];
        update_conditions(&mut conds, &cs, t0);
        let ready =
            |conds: &[Condition]| conds.iter().find(|c| c.type_ == "Ready").cloned().unwrap();
        assert_eq!((ready(&conds).status, ready(&conds).since), (false, t0));
        update_conditions(&mut conds, &cs, t1);
        assert_eq!(ready(&conds).since, t0, "unchanged status keeps its time");
        cs[0].ready = true;
        update_conditions(&mut conds, &cs, t1);
        assert_eq!((ready(&conds).status, ready(&conds).since), (true, t1));
        let s = status(&PodView {
            policy: "Always",
            pod_ip: Some("10.244.0.2".into()),
            host_ip: "192.0.2.1".into(),
            start_time: t0,
            qos: "BestEffort",
            conditions: &conds,
            containers: &cs,
            scheme: "process",
            phase: None,
        });
        let pod: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(s).expect("a valid PodStatus");
        assert_eq!(pod.phase.as_deref(), Some("Pending"));
        assert_eq!(pod.pod_ip.as_deref(), Some("10.244.0.2"));
        assert_eq!(pod.conditions.unwrap().len(), 4);
    }
}
