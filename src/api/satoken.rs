//! ServiceAccount tokens: the bound JWTs of the TokenRequest API
//! (`POST .../serviceaccounts/<name>/token`, `kubectl create token`), signed
//! ES256 with the cluster's service-account key and verified by every API
//! server that shares it.
//!
//! The claims are kube-apiserver's, so tools that read tokens (and pods
//! that decode their own) see what they expect: `iss`, `sub`
//! (`system:serviceaccount:<ns>:<name>`), `aud`, `exp`/`iat`/`nbf`, and a
//! `kubernetes.io` claim naming the namespace, the ServiceAccount (with its
//! uid) and the object the token is bound to (a Pod, a Node, a Secret).
//! The server checks those objects still exist with those uids on every
//! request (`apiserver::serviceaccount`): deleting the ServiceAccount or
//! the Pod revokes its tokens at once, as in Kubernetes.
//!
//! Pure: signing, verification and the TokenRequest spec's rules; no store.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The issuer (kube-apiserver's usual `--service-account-issuer`), also
/// the audience a token gets when the request names none (the API
/// server's own, `--api-audiences`' default).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A token's lifetime when the request gives none (kube's default).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest lifetime a request may ask for (kube's).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The longest lifetime handed out (kube's `--service-account-max-token-expiration`
/// is unset by default; a day bounds what a leaked token is worth).
pub const MAX_EXPIRATION_SECONDS: i64 = 48 * 3600;

/// Where a pod's service-account token, CA and namespace are mounted
/// (the volume Kubernetes gives every pod; in-cluster clients read it).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Group of every ServiceAccount.
pub const GROUP: &str = "system:serviceaccounts";

/// A reference to an object by name and uid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeClaims {
    pub namespace: String,
    pub serviceaccount: ObjRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjRef>,
}

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubeClaims,
}

impl Claims {
    /// The user a token authenticates as, and its groups (without
    /// `system:authenticated`, which the server adds for everyone).
    pub fn identity(&self) -> (String, Vec<String>) {
        let ns = &self.kubernetes.namespace;
        (
            username(ns, &self.kubernetes.serviceaccount.name),
            vec![GROUP.to_string(), format!("{GROUP}:{ns}")],
        )
    }
}

/// `system:serviceaccount:<ns>:<name>`.
pub fn username(ns: &str, name: &str) -> String {
    format!("system:serviceaccount:{ns}:{name}")
}

/// The cluster's service-account signing key (P-256), for signing and
/// verifying.
pub struct Keys {
    enc: EncodingKey,
    dec: DecodingKey,
    kid: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(kid {})", self.kid)
    }
}

impl Keys {
    /// From the private key (PKCS#8 PEM, as `<data-dir>/pki/sa.key`).
    pub fn from_pem(private_pem: &str) -> Result<Keys, String> {
        let pair = rcgen::KeyPair::from_pem(private_pem)
            .map_err(|e| format!("service-account key: {e}"))?;
        let enc = EncodingKey::from_ec_pem(private_pem.as_bytes())
            .map_err(|e| format!("service-account key: {e}"))?;
        let dec = DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes())
            .map_err(|e| format!("service-account public key: {e}"))?;
        // kube's key id: the SHA-256 of the public key (SPKI DER), base64url.
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&pair),
        );
        use base64::Engine;
        let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
        Ok(Keys { enc, dec, kid })
    }

    /// Sign `claims` into a compact JWT.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.enc).expect("ES256 signing of plain claims")
    }

    /// The claims of `token` if this key signed it, it is within its
    /// lifetime at `now` (unix seconds) and it is for one of `audiences`;
    /// else why not.
    pub fn verify(&self, token: &str, audiences: &[&str], now: i64) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::ES256);
        // Time is checked below against `now` (testable, no leeway games).
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_audience(audiences);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .map_err(|e| format!("invalid service account token: {e}"))?;
        let c = data.claims;
        // kube-apiserver allows 60 s of clock skew.
        if now > c.exp + 60 {
            return Err("service account token has expired".into());
        }
        if now + 60 < c.nbf {
            return Err("service account token is not valid yet".into());
        }
        if c.sub != username(&c.kubernetes.namespace, &c.kubernetes.serviceaccount.name) {
            return Err("service account token's subject does not match its claims".into());
        }
        Ok(c)
    }
}

/// Whether a bearer token is shaped like a JWT (three base64url parts, the
/// first a JSON header), so it goes to [`Keys::verify`] rather than the
/// other authenticators.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && jsonwebtoken::decode_header(token).is_ok()
}

/// The object a TokenRequest binds its token to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundObject {
    /// `Pod`, `Secret` or `Node`.
    pub kind: String,
    pub name: String,
    /// Empty: the server fills in the object's current uid.
    pub uid: String,
}

/// A TokenRequest's spec, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub bound: Option<BoundObject>,
}

/// Read and check a TokenRequest's `spec` (kube's validation messages).
pub fn parse_request(spec: &Value) -> Result<Request, String> {
    let audiences: Vec<String> = match spec.get("audiences") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| "spec.audiences: must be strings".to_string())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("spec.audiences: must be a list of strings".into()),
    };
    let audiences = if audiences.is_empty() {
        vec![ISSUER.to_string()]
    } else {
        audiences
    };
    let expiration_seconds = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| "spec.expirationSeconds: must be an integer".to_string())?,
    };
    if expiration_seconds < MIN_EXPIRATION_SECONDS {
        return Err("spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes".into());
    }
    if expiration_seconds > 1 << 32 {
        return Err(
            "spec.expirationSeconds: Invalid value: may not specify a duration larger than 2^32 seconds".into(),
        );
    }
    let bound = match spec.get("boundObjectRef") {
        None | Some(Value::Null) => None,
        Some(r) => {
            let kind = r["kind"].as_str().unwrap_or("").to_string();
            if !matches!(kind.as_str(), "Pod" | "Secret" | "Node") {
                return Err(format!(
                    "spec.boundObjectRef.kind: Unsupported value: {kind:?}: supported values: \"Pod\", \"Secret\", \"Node\""
                ));
            }
            let name = r["name"].as_str().unwrap_or("").to_string();
            if name.is_empty() {
                return Err("spec.boundObjectRef.name: Required value".into());
            }
            Some(BoundObject {
                kind,
                name,
                uid: r["uid"].as_str().unwrap_or("").to_string(),
            })
        }
    };
    Ok(Request {
        audiences,
        expiration_seconds: expiration_seconds.min(MAX_EXPIRATION_SECONDS),
        bound,
    })
}

/// The claims of a token issued now for ServiceAccount `sa` in `ns`.
/// `bound` carries the bound object's current uid.
pub fn claims_for(ns: &str, sa: ObjRef, req: &Request, now: i64) -> Claims {
    let mut kubernetes = KubeClaims {
        namespace: ns.to_string(),
        serviceaccount: sa,
        pod: None,
        node: None,
        secret: None,
    };
    if let Some(b) = &req.bound {
        let r = Some(ObjRef {
            name: b.name.clone(),
            uid: b.uid.clone(),
        });
        match b.kind.as_str() {
            "Pod" => kubernetes.pod = r,
            "Node" => kubernetes.node = r,
            _ => kubernetes.secret = r,
        }
    }
    Claims {
        iss: ISSUER.to_string(),
        sub: username(ns, &kubernetes.serviceaccount.name),
        aud: req.audiences.clone(),
        exp: now + req.expiration_seconds,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> Keys {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Keys::from_pem(&pair.serialize_pem()).unwrap()
    }

    fn sa() -> ObjRef {
        ObjRef {
            name: "fairlead".into(),
            uid: "u-1".into(),
        }
    }

    #[test]
    fn signs_and_verifies_with_kube_claims() {
        let k = keys();
        let req = parse_request(&json!({})).unwrap();
        let c = claims_for("kube-system", sa(), &req, 1_000);
        let t = k.sign(&c);
        assert!(looks_like_jwt(&t));
        let back = k.verify(&t, &[ISSUER], 1_000).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.exp - back.iat, DEFAULT_EXPIRATION_SECONDS);
        assert_eq!(
            back.identity(),
            (
                "system:serviceaccount:kube-system:fairlead".to_string(),
                vec![
                    "system:serviceaccounts".to_string(),
                    "system:serviceaccounts:kube-system".to_string()
                ]
            )
        );
        // The payload carries the kubernetes.io claim as kube spells it.
        use base64::Engine;
        let payload = t.split('.').nth(1).unwrap();
        let v: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["kubernetes.io"]["serviceaccount"]["name"], "fairlead");
        assert_eq!(v["sub"], "system:serviceaccount:kube-system:fairlead");
    }

    #[test]
    fn rejects_expired_foreign_tampered_and_wrong_audience() {
        let k = keys();
        let req =
            parse_request(&json!({"expirationSeconds": 600, "audiences": ["vault"]})).unwrap();
        let t = k.sign(&claims_for("default", sa(), &req, 1_000));
        assert!(k.verify(&t, &["vault"], 1_500).is_ok());
        let e = k.verify(&t, &["vault"], 1_000 + 600 + 61).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert!(k.verify(&t, &[ISSUER], 1_000).is_err(), "audience");
        assert!(keys().verify(&t, &["vault"], 1_000).is_err(), "another key");
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let c = claims_for("kube-system", sa(), &req, 1_000);
        let other = k.sign(&c);
        parts[1] = other.split('.').nth(1).unwrap().to_string();
        assert!(
            k.verify(&parts.join("."), &["vault"], 1_000).is_err(),
            "payload swapped under another signature"
        );
        assert!(!looks_like_jwt("abcdef.0123456789abcdef"));
        assert!(!looks_like_jwt("a.b.c"));
    }

    #[test]
    fn request_rules() {
        let e = parse_request(&json!({"expirationSeconds": 60})).unwrap_err();
        assert!(e.contains("less than 10 minutes"), "{e}");
        let e = parse_request(&json!({"boundObjectRef": {"kind": "Service", "name": "x"}}))
            .unwrap_err();
        assert!(e.contains("Unsupported value"), "{e}");
        let r = parse_request(&json!({"boundObjectRef": {"kind": "Pod", "name": "web-1"},
            "expirationSeconds": 7200}))
        .unwrap();
        assert_eq!(r.expiration_seconds, 7200);
        assert_eq!(r.audiences, vec![ISSUER.to_string()]);
        assert_eq!(r.bound.as_ref().unwrap().name, "web-1");
        let c = claims_for("default", sa(), &r, 0);
        assert_eq!(c.kubernetes.pod.as_ref().unwrap().name, "web-1");
        let long = parse_request(&json!({"expirationSeconds": 10 * 86400})).unwrap();
        assert_eq!(long.expiration_seconds, MAX_EXPIRATION_SECONDS);
    }
}
