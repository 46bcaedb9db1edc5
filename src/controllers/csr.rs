//! Node client certificates: approves and signs the CertificateSigningRequests
//! joining hosts send (kube-controller-manager's csrapproving and
//! csrsigning controllers, for one signer).
//!
//! A host that joins with a bootstrap token can do nothing but create a
//! CSR (`apiserver::authz`). This controller approves it only if it asks
//! for exactly a node's client identity, `CN=system:node:<name>,
//! O=system:nodes`, for client auth, from a bootstrapper or from that same
//! node renewing; anything else under the signer is denied with the reason,
//! so the joining host can print it. Approved requests are signed with the
//! cluster CA and the certificate is written into `status.certificate`.
//!
//! [`decide`] is pure; the loop around it watches CSRs and writes status.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::{json, Value};

use crate::apiserver::tls;

/// The signer of node client certificates (as Kubernetes names it).
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// Usages a node client certificate may ask for.
const ALLOWED_USAGES: [&str; 3] = ["digital signature", "key encipherment", "client auth"];
/// Lifetime when the request names none (kube: `--cluster-signing-duration`, 1 year).
const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest lifetime granted (kube's floor for `expirationSeconds`).
const MIN_VALIDITY: Duration = Duration::from_secs(600);

/// The CA files the signer signs with.
#[derive(Clone, Debug)]
pub struct Signer {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not ours, or already decided.
    Ignore,
    /// Approve and sign as `user` in `groups`, for `validity`.
    Sign {
        user: String,
        groups: Vec<String>,
        validity: Duration,
    },
    Deny(String),
}

/// Decide on a CSR (as JSON), given the subject of its request (`None`:
/// the request does not parse, with why).
pub fn decide(csr: &Value, subject: Result<(String, Vec<String>), String>) -> Decision {
    let spec = &csr["spec"];
    if spec["signerName"].as_str() != Some(KUBELET_CLIENT_SIGNER) {
        return Decision::Ignore;
    }
    let conditions = csr["status"]["conditions"].as_array();
    let decided = conditions.is_some_and(|cs| {
        cs.iter().any(|c| {
            matches!(c["type"].as_str(), Some("Denied" | "Failed"))
                || (c["type"].as_str() == Some("Approved")
                    && !csr["status"]["certificate"].is_null())
        })
    });
    if decided || !csr["status"]["certificate"].is_null() {
        return Decision::Ignore;
    }
    let (cn, orgs) = match subject {
        Ok(s) => s,
        Err(why) => return Decision::Deny(why),
    };
    let Some(node) = cn.strip_prefix("system:node:").filter(|n| !n.is_empty()) else {
        return Decision::Deny(format!(
            "the subject's common name must be system:node:<name>, not {cn:?}"
        ));
    };
    if orgs != ["system:nodes"] {
        return Decision::Deny(format!(
            "the subject's organization must be exactly [system:nodes], not {orgs:?}"
        ));
    }
    let usages: Vec<&str> = spec["usages"]
        .as_array()
        .map(|u| u.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !usages.contains(&"client auth") || usages.iter().any(|u| !ALLOWED_USAGES.contains(u)) {
        return Decision::Deny(format!(
            "usages must include \"client auth\" and be among {ALLOWED_USAGES:?}, not {usages:?}"
        ));
    }
    let requester = spec["username"].as_str().unwrap_or("");
    let bootstrapping = spec["groups"].as_array().is_some_and(|g| {
        g.iter()
            .any(|g| g.as_str() == Some(crate::api::token::BOOTSTRAPPERS))
    });
    if !bootstrapping && requester != cn {
        return Decision::Deny(format!(
            "{requester:?} may not ask for a certificate of node {node:?}"
        ));
    }
    let validity = spec["expirationSeconds"]
        .as_u64()
        .map(|s| Duration::from_secs(s).max(MIN_VALIDITY))
        .unwrap_or(DEFAULT_VALIDITY)
        .min(DEFAULT_VALIDITY);
    Decision::Sign {
        user: cn,
        groups: orgs,
        validity,
    }
}

fn condition(ty: &str, reason: &str, message: &str) -> Value {
    let now = jiff::Timestamp::now().to_string();
    json!({"type": ty, "status": "True", "reason": reason, "message": message,
           "lastUpdateTime": now, "lastTransitionTime": now})
}

/// The request's PEM (the API carries it base64-encoded).
fn request_pem(csr: &Value) -> Result<String, String> {
    use base64::Engine;
    let b64 = csr["spec"]["request"].as_str().unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("spec.request is not base64: {e}"))?;
    String::from_utf8(raw).map_err(|_| "spec.request is not PEM".to_string())
}

async fn handle(
    api: &Api<CertificateSigningRequest>,
    signer: &Signer,
    csr: &CertificateSigningRequest,
) {
    let Ok(mut obj) = serde_json::to_value(csr) else {
        return;
    };
    let name = csr.metadata.name.clone().unwrap_or_default();
    let pem = request_pem(&obj);
    let subject = pem
        .as_deref()
        .map_err(Clone::clone)
        .and_then(tls::csr_subject);
    let status = match decide(&obj, subject) {
        Decision::Ignore => return,
        Decision::Deny(why) => {
            tracing::warn!(csr = %name, %why, "denied a node certificate request");
            json!({"conditions": [condition("Denied", "AutoDenied", &why)]})
        }
        Decision::Sign {
            user,
            groups,
            validity,
        } => {
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            let signed = pem.map_err(|e| e.to_string()).and_then(|pem| {
                tls::sign_client_csr(
                    (&signer.ca_cert, &signer.ca_key),
                    &pem,
                    &user,
                    &groups,
                    validity,
                )
                .map_err(|e| e.to_string())
            });
            match signed {
                Ok(cert) => {
                    use base64::Engine;
                    tracing::info!(csr = %name, %user, "approved and signed a node certificate");
                    json!({
                        "conditions": [condition("Approved", "AutoApproved",
                            "node client certificate for a bootstrapping or renewing node")],
                        "certificate": base64::engine::general_purpose::STANDARD.encode(cert),
                    })
                }
                Err(why) => json!({"conditions": [condition("Failed", "SigningError", &why)]}),
            }
        }
    };
    obj["status"] = status;
    let Ok(body) = serde_json::from_value::<CertificateSigningRequest>(obj) else {
        return;
    };
    // A replace at the watched resourceVersion: a conflict means someone
    // else decided meanwhile, and the next event shows what.
    if let Err(e) = api
        .replace_status(&name, &PostParams::default(), &body)
        .await
    {
        tracing::debug!(csr = %name, error = %e, "CSR status not written");
    }
}

/// Approve and sign node CSRs until the task is dropped.
pub async fn run(client: kube::Client, signer: Signer) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => {
                handle(&api, &signer, &csr).await
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "CSR watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(groups: &[&str], user: &str, usages: &[&str]) -> Value {
        json!({"spec": {"signerName": KUBELET_CLIENT_SIGNER, "username": user,
            "groups": groups, "usages": usages, "request": ""}, "status": {}})
    }

    fn node(n: &str) -> Result<(String, Vec<String>), String> {
        Ok((format!("system:node:{n}"), vec!["system:nodes".into()]))
    }

    #[test]
    fn signs_a_bootstrapping_node_and_its_own_renewal() {
        let boot = csr(
            &["system:bootstrappers"],
            "system:bootstrap:abcdef",
            &["digital signature", "client auth"],
        );
        assert!(
            matches!(decide(&boot, node("a")), Decision::Sign { ref user, .. } if user == "system:node:a")
        );
        let renew = csr(&["system:nodes"], "system:node:a", &["client auth"]);
        assert!(matches!(decide(&renew, node("a")), Decision::Sign { .. }));
    }

    #[test]
    fn denies_other_identities_usages_and_requesters() {
        let boot = csr(
            &["system:bootstrappers"],
            "system:bootstrap:x",
            &["client auth"],
        );
        let admin = Ok(("admin".into(), vec!["system:masters".into()]));
        assert!(matches!(decide(&boot, admin), Decision::Deny(_)));
        let masters = Ok((
            "system:node:a".into(),
            vec!["system:nodes".into(), "system:masters".into()],
        ));
        assert!(matches!(decide(&boot, masters), Decision::Deny(_)));
        let server = csr(
            &["system:bootstrappers"],
            "x",
            &["server auth", "client auth"],
        );
        assert!(matches!(decide(&server, node("a")), Decision::Deny(_)));
        let other_node = csr(&["system:nodes"], "system:node:b", &["client auth"]);
        assert!(matches!(decide(&other_node, node("a")), Decision::Deny(_)));
    }

    #[test]
    fn ignores_other_signers_and_decided_requests() {
        let mut c = csr(&["system:bootstrappers"], "x", &["client auth"]);
        c["spec"]["signerName"] = json!("example.com/other");
        assert_eq!(decide(&c, node("a")), Decision::Ignore);
        let mut done = csr(&["system:bootstrappers"], "x", &["client auth"]);
        done["status"]["certificate"] = json!("Zm9v");
        assert_eq!(decide(&done, node("a")), Decision::Ignore);
    }

    #[test]
    fn validity_is_clamped() {
        let mut c = csr(&["system:bootstrappers"], "x", &["client auth"]);
        c["spec"]["expirationSeconds"] = json!(60);
        assert!(
            matches!(decide(&c, node("a")), Decision::Sign { validity, .. } if validity == MIN_VALIDITY)
        );
    }
}
