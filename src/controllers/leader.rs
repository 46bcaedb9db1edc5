//! Leader election through a coordination.k8s.io Lease, as Kubernetes'
//! controller-manager does: candidates try to take or renew one Lease; the
//! holder renews it every `retry_period`; if the holder stops renewing, the
//! Lease expires after `lease_duration` and another candidate takes it. A
//! leader that cannot renew for `renew_deadline` stops its work before the
//! Lease can expire, so two leaders never act at once.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

/// Lease timing and identity.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

enum Attempt {
    Held,
    NotHeld,
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<Attempt, kube::Error> {
    let now = jiff::Timestamp::now();
    let secs = cfg.lease_duration.as_secs().max(1) as i32;
    let existing = api.get_opt(&cfg.name).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::NotHeld),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == cfg.identity;
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(t)), Some(d)) => {
            now.as_millisecond() > t.as_millisecond() + i64::from(d) * 1000
        }
        _ => true,
    };
    if !ours && !holder.is_empty() && !expired {
        return Ok(Attempt::NotHeld);
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(secs);
    let name = cfg.name.clone();
    match api.replace(&name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::NotHeld),
        Err(e) => Err(e),
    }
}

/// One attempt, bounded: a request that hangs (an API server that stopped
/// answering without closing the connection) must not keep a leader acting
/// past its renew deadline.
async fn attempt(api: &Api<Lease>, cfg: &LeaderConfig, limit: Duration) -> Result<Attempt, String> {
    match tokio::time::timeout(limit, try_acquire(api, cfg)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Run `work` whenever this process holds the Lease; stop it when the Lease
/// is lost. Never returns.
pub async fn run<F, Fut>(client: kube::Client, cfg: LeaderConfig, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        // Candidate.
        loop {
            match attempt(&api, &cfg, cfg.renew_deadline.max(cfg.retry_period)).await {
                Ok(Attempt::Held) => break,
                Ok(Attempt::NotHeld) => {}
                Err(e) => tracing::debug!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(cfg.retry_period).await;
        }
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
        metrics::gauge!("leader_election_master_status", "name" => cfg.name.clone()).set(1.0);
        let task = tokio::spawn(work());
        let mut last_renew = Instant::now();
        loop {
            tokio::time::sleep(cfg.retry_period).await;
            let left = cfg.renew_deadline.saturating_sub(last_renew.elapsed());
            match attempt(&api, &cfg, left.max(Duration::from_millis(100))).await {
                Ok(Attempt::Held) => last_renew = Instant::now(),
                Ok(Attempt::NotHeld) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease failed");
                    if last_renew.elapsed() >= cfg.renew_deadline {
                        break;
                    }
                }
            }
        }
        task.abort();
        metrics::gauge!("leader_election_master_status", "name" => cfg.name.clone()).set(0.0);
        tracing::warn!(identity = %cfg.identity, "lost leadership; stopped controllers");
    }
}
