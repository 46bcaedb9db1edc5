//! ServiceAccount tokens on the server (the rules are in
//! [`crate::api::satoken`]):
//!
//! - **The signing key** (`<data-dir>/pki/sa.key`, P-256) is shared by
//!   every API server on one store, as the CA is: the first publishes it at
//!   [`SA_KEY_STORE_KEY`], the others install that one, so a token any
//!   server issued is accepted by all.
//! - **TokenRequest** (`POST /api/v1/namespaces/<ns>/serviceaccounts/<name>/token`,
//!   `kubectl create token <name>`): a bound token for an existing
//!   ServiceAccount, optionally bound to a Pod, Secret or Node.
//! - **Authentication** of bearer JWTs: the signature, lifetime and
//!   audience, then the ServiceAccount (and the bound object) must still
//!   exist with the uids in the token. Deleting either revokes the token,
//!   as kube-apiserver's lookup does.

use std::path::Path;

use serde_json::{json, Value};

use super::{Identity, Server};
use crate::api::resources::{by_kind, Kind};
use crate::api::satoken::{self, Keys, ObjRef};
use crate::api::status::ApiError;
use crate::store::Store;

/// Where the service-account signing key lives in the store (outside
/// `/registry/`, so no API reaches it): JSON `{"key": PEM}`.
pub const SA_KEY_STORE_KEY: &str = "/fairlead/pki/sa";

/// The file holding this server's copy of the key.
fn key_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("pki").join("sa.key")
}

/// The cluster's service-account keys: this store's published key, or
/// this data directory's (created if missing) published as the cluster's
/// if none is yet.
pub async fn share_key(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Keys> {
    let path = key_path(data_dir);
    let published = super::publish_once(store, SA_KEY_STORE_KEY, || {
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_pem()
            }
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        Ok(serde_json::to_vec(&json!({ "key": pem }))?)
    })
    .await?;
    let v: Value = serde_json::from_slice(&published)?;
    let pem = v["key"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{SA_KEY_STORE_KEY} in the store is not a key"))?;
    let keys = Keys::from_pem(pem).map_err(anyhow::Error::msg)?;
    if std::fs::read_to_string(&path).ok().as_deref() != Some(pem) {
        super::tls::write_private(&path, pem.as_bytes())?;
    }
    Ok(keys)
}

fn uid_of(obj: &Value) -> String {
    obj["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

impl Server {
    /// TokenRequest: a signed token for ServiceAccount `name` in `ns`.
    pub(super) async fn create_token(
        &self,
        ns: &str,
        name: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let mut req = satoken::parse_request(&body["spec"]).map_err(|e| {
            let mut err = ApiError::new(
                422,
                "Invalid",
                format!("TokenRequest.authentication.k8s.io {name:?} is invalid: {e}"),
            );
            err.details = Some(
                json!({"name": name, "group": "authentication.k8s.io", "kind": "TokenRequest"}),
            );
            err
        })?;
        let (sa, _) = self
            .get_object(by_kind(Kind::ServiceAccount), Some(ns), name)
            .await?;
        if let Some(bound) = req.bound.as_mut() {
            let (kind, scope) = match bound.kind.as_str() {
                "Pod" => (Kind::Pod, Some(ns)),
                "Secret" => (Kind::Secret, Some(ns)),
                _ => (Kind::Node, None),
            };
            let (obj, _) = self.get_object(by_kind(kind), scope, &bound.name).await?;
            let uid = uid_of(&obj);
            if !bound.uid.is_empty() && bound.uid != uid {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "the UID in the bound object reference ({}) does not match the UID in record. The object might have been deleted and then recreated",
                        bound.uid
                    ),
                ));
            }
            bound.uid = uid;
        }
        let now = jiff::Timestamp::now().as_second();
        let sa_ref = ObjRef {
            name: name.to_string(),
            uid: uid_of(&sa),
        };
        let claims = satoken::claims_for(ns, sa_ref, &req, now);
        let token = self.sa_keys.sign(&claims);
        let expires = jiff::Timestamp::from_second(claims.exp)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut spec = json!({
            "audiences": req.audiences,
            "expirationSeconds": req.expiration_seconds,
            "boundObjectRef": null,
        });
        if let Some(b) = &req.bound {
            spec["boundObjectRef"] =
                json!({"kind": b.kind, "apiVersion": "v1", "name": b.name, "uid": b.uid});
        }
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": expires},
        }))
    }

    /// The ServiceAccount a bearer JWT authenticates as (401 with the
    /// reason otherwise).
    pub(super) async fn service_account_identity(&self, token: &str) -> Result<Identity, ApiError> {
        let denied =
            |why: String| ApiError::new(401, "Unauthorized", format!("Unauthorized: {why}"));
        let now = jiff::Timestamp::now().as_second();
        let claims = self
            .sa_keys
            .verify(token, &[satoken::ISSUER], now)
            .map_err(denied)?;
        let k = &claims.kubernetes;
        let still = |kind: Kind, ns: Option<&str>, r: &ObjRef| {
            let key = by_kind(kind).key(ns, &r.name);
            let what = format!("{kind:?} {}", r.name);
            let uid = r.uid.clone();
            async move {
                match self.store.get(&key).await? {
                    Some(kv) if uid_of(&super::objects::decode(&kv)?) == uid => Ok(()),
                    Some(_) => Err(denied(format!("{what} has been recreated (uid differs)"))),
                    None => Err(denied(format!("{what} has been deleted"))),
                }
            }
        };
        still(Kind::ServiceAccount, Some(&k.namespace), &k.serviceaccount).await?;
        if let Some(p) = &k.pod {
            still(Kind::Pod, Some(&k.namespace), p).await?;
        }
        if let Some(s) = &k.secret {
            still(Kind::Secret, Some(&k.namespace), s).await?;
        }
        if let Some(n) = &k.node {
            still(Kind::Node, None, n).await?;
        }
        let (user, mut groups) = claims.identity();
        groups.push("system:authenticated".into());
        Ok(Identity { user, groups })
    }
}
