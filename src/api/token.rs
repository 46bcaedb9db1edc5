//! Bootstrap tokens: how a new host proves it may join the cluster.
//!
//! The shapes are kubeadm's, so `kubectl -n kube-system get secrets` shows
//! them as it would on a kubeadm cluster:
//!
//! * A token is `<id>.<secret>`: 6 and 16 characters of `[a-z0-9]`. The
//!   id is public (it names the Secret); the secret is the password.
//! * It lives in the Secret `kube-system/bootstrap-token-<id>` of type
//!   `bootstrap.kubernetes.io/token`, with `token-id`, `token-secret`,
//!   optionally `expiration` (RFC 3339), `description`,
//!   `usage-bootstrap-authentication: "true"` and `auth-extra-groups`.
//!   Deleting the Secret revokes the token.
//! * A request bearing a valid token authenticates as
//!   `system:bootstrap:<id>` in `system:bootstrappers` (plus the extra
//!   groups), which may do nothing but ask for a node certificate.
//!
//! A *join token* adds what the new host needs to trust the server before
//! it sends the secret: `K10<sha256 of the CA's SubjectPublicKeyInfo, hex>::<id>.<secret>`.
//! The prefix and layout are k3s's (one string to copy), the hash is
//! kubeadm's `--discovery-token-ca-cert-hash` (so
//! `openssl x509 -pubkey -in ca.crt | openssl pkey -pubin -outform der |
//! sha256sum` computes it by hand).

use serde_json::{json, Value};

/// Namespace holding bootstrap-token Secrets.
pub const NAMESPACE: &str = "kube-system";
/// The Secret type of a bootstrap token.
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// Name prefix of bootstrap-token Secrets.
pub const SECRET_PREFIX: &str = "bootstrap-token-";
/// Group every bootstrap token authenticates into.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
/// User name prefix of bootstrap-token identities.
pub const USER_PREFIX: &str = "system:bootstrap:";

/// A parsed `<id>.<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl Token {
    /// Parse `<id>.<secret>`; `None` if it does not have the bootstrap
    /// token shape (other bearer tokens then get their own chance).
    pub fn parse(s: &str) -> Option<Token> {
        let (id, secret) = s.split_once('.')?;
        let ok = |p: &str, n: usize| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        (ok(id, 6) && ok(secret, 16)).then(|| Token {
            id: id.into(),
            secret: secret.into(),
        })
    }

    /// A fresh random token.
    pub fn generate() -> Token {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let mut pick = |n: usize| {
            (0..n)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect::<String>()
        };
        Token {
            id: pick(6),
            secret: pick(16),
        }
    }

    pub fn secret_name(&self) -> String {
        format!("{SECRET_PREFIX}{}", self.id)
    }

    /// The Secret that makes this token valid until `expiration` (RFC
    /// 3339; `None` = for ever).
    pub fn to_secret(&self, expiration: Option<&str>, description: &str) -> Value {
        let mut data = json!({
            "token-id": b64(&self.id),
            "token-secret": b64(&self.secret),
            "usage-bootstrap-authentication": b64("true"),
            "usage-bootstrap-signing": b64("true"),
            "auth-extra-groups": b64("system:bootstrappers:fairlead:default-node-token"),
            "description": b64(description),
        });
        if let Some(e) = expiration {
            data["expiration"] = json!(b64(e));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.secret_name(), "namespace": NAMESPACE},
            "type": SECRET_TYPE,
            "data": data,
        })
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// One field of a token Secret's `data`, decoded.
pub fn secret_field(secret: &Value, field: &str) -> Option<String> {
    use base64::Engine;
    let raw = secret.get("data")?.get(field)?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    String::from_utf8(bytes).ok()
}

/// Why a token was refused: the one-line reason a joining host prints.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("bootstrap token {0:?} is unknown or was revoked")]
    Unknown(String),
    #[error("bootstrap token {0:?} has a wrong secret")]
    WrongSecret(String),
    #[error("bootstrap token {0:?} expired at {1}")]
    Expired(String, String),
    #[error("bootstrap token {0:?} may not be used for authentication")]
    NotForAuthentication(String),
}

/// Check `token` against its Secret (`None`: no such Secret) at `now`
/// (Unix seconds). Returns the user and groups it authenticates as.
pub fn authenticate(
    token: &Token,
    secret: Option<&Value>,
    now: i64,
) -> Result<(String, Vec<String>), Refused> {
    let id = || token.id.clone();
    let secret = secret
        .filter(|s| s.get("type").and_then(Value::as_str) == Some(SECRET_TYPE))
        .filter(|s| {
            s.pointer("/metadata/deletionTimestamp")
                .is_none_or(Value::is_null)
        })
        .ok_or_else(|| Refused::Unknown(id()))?;
    if secret_field(secret, "token-id").as_deref() != Some(token.id.as_str()) {
        return Err(Refused::Unknown(id()));
    }
    // Compare the secret in constant time: it is the password.
    let stored = secret_field(secret, "token-secret").unwrap_or_default();
    if !constant_time_eq(stored.as_bytes(), token.secret.as_bytes()) {
        return Err(Refused::WrongSecret(id()));
    }
    if let Some(exp) = secret_field(secret, "expiration") {
        let expired = exp
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_second() <= now)
            // An expiration nobody can read is treated as passed.
            .unwrap_or(true);
        if expired {
            return Err(Refused::Expired(id(), exp));
        }
    }
    if secret_field(secret, "usage-bootstrap-authentication").as_deref() != Some("true") {
        return Err(Refused::NotForAuthentication(id()));
    }
    let mut groups = vec![BOOTSTRAPPERS.to_string()];
    if let Some(extra) = secret_field(secret, "auth-extra-groups") {
        groups.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|g| g.starts_with("system:bootstrappers:"))
                .map(String::from),
        );
    }
    Ok((format!("{USER_PREFIX}{}", token.id), groups))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A join token: the CA's hash and the bootstrap token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// Lower-case hex SHA-256 of the CA's SubjectPublicKeyInfo.
    pub ca_hash: String,
    pub token: Token,
}

impl JoinToken {
    /// Parse `K10<hex>::<id>.<secret>`.
    pub fn parse(s: &str) -> Result<JoinToken, String> {
        let s = s.trim();
        let bad = || {
            "a join token looks like K10<64 hex digits>::<6 chars>.<16 chars> \
             (see <data-dir>/token on a server, or `fairlead token create`)"
                .to_string()
        };
        let rest = s.strip_prefix("K10").ok_or_else(bad)?;
        let (hash, token) = rest.split_once("::").ok_or_else(bad)?;
        let hash = hash
            .strip_prefix("sha256:")
            .unwrap_or(hash)
            .to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let token = Token::parse(token).ok_or_else(bad)?;
        Ok(JoinToken {
            ca_hash: hash,
            token,
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "K10{}::{}", self.ca_hash, self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::parse("abcdef.0123456789abcdef").unwrap()
    }

    #[test]
    fn parses_only_the_bootstrap_shape() {
        assert_eq!(token().id, "abcdef");
        for bad in [
            "abcdef",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef.x",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad}");
        }
        let t = Token::generate();
        assert_eq!(Token::parse(&t.to_string()), Some(t));
    }

    #[test]
    fn authenticates_from_its_secret() {
        let t = token();
        let secret = t.to_secret(Some("2030-01-01T00:00:00Z"), "test");
        let (user, groups) = authenticate(&t, Some(&secret), 0).unwrap();
        assert_eq!(user, "system:bootstrap:abcdef");
        assert_eq!(groups[0], BOOTSTRAPPERS);
        assert!(groups.len() == 2 && groups[1].starts_with("system:bootstrappers:"));
    }

    #[test]
    fn refuses_unknown_wrong_expired_and_misused_tokens() {
        let t = token();
        assert_eq!(
            authenticate(&t, None, 0),
            Err(Refused::Unknown("abcdef".into()))
        );
        let other = Token::parse("abcdef.ffffffffffffffff").unwrap();
        let secret = t.to_secret(None, "");
        assert_eq!(
            authenticate(&other, Some(&secret), 0),
            Err(Refused::WrongSecret("abcdef".into()))
        );
        let expiring = t.to_secret(Some("2026-01-01T00:00:00Z"), "");
        let at = "2026-01-01T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        assert!(authenticate(&t, Some(&expiring), at - 1).is_ok());
        assert!(matches!(
            authenticate(&t, Some(&expiring), at),
            Err(Refused::Expired(..))
        ));
        let mut no_auth = secret.clone();
        no_auth["data"]["usage-bootstrap-authentication"] = json!(b64("false"));
        assert!(matches!(
            authenticate(&t, Some(&no_auth), 0),
            Err(Refused::NotForAuthentication(_))
        ));
        let mut wrong_type = secret;
        wrong_type["type"] = json!("Opaque");
        assert!(matches!(
            authenticate(&t, Some(&wrong_type), 0),
            Err(Refused::Unknown(_))
        ));
    }

    #[test]
    fn join_token_round_trips_and_explains_bad_input() {
        let s = format!("K10{}::abcdef.0123456789abcdef", "ab".repeat(32));
        let j = JoinToken::parse(&s).unwrap();
        assert_eq!(j.token, token());
        assert_eq!(j.to_string(), s);
        for bad in [
            "",
            "abcdef.0123456789abcdef",
            "K10zz::abcdef.0123456789abcdef",
        ] {
            assert!(JoinToken::parse(bad).unwrap_err().contains("K10"), "{bad}");
        }
    }
}
