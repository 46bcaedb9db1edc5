//! Self-managed cluster PKI and TLS configuration for the API server.
//!
//! Real `kubectl` only talks HTTPS and authenticates with client certificates, so
//! the API server needs a CA, a serving certificate and an admin credential before
//! anything can connect. Like k3s, fairlead creates all of it on first start under
//! `<data-dir>/pki/` and writes a kubeconfig, so the cluster is usable with no setup:
//!
//! * `ca.crt` / `ca.key`: a self-signed ECDSA P-256 CA, valid for ten years. It is
//!   never replaced once it exists, so kubeconfigs handed out earlier keep working.
//! * `apiserver.crt` / `apiserver.key`: the serving certificate. It is re-issued
//!   (with the same CA) when it is missing, no longer matches its key or the CA,
//!   is close to expiry, or does not cover every requested subject alternative name.
//! * `admin.crt` / `admin.key`: a client certificate for `CN=fairlead-admin,
//!   O=system:masters`, the Kubernetes convention for a cluster administrator.
//!
//! Client identities follow the Kubernetes x509 authenticator: the subject CN is
//! the user name and every subject O is a group (see [`peer_identity`]).
//!
//! Private keys are written with mode 0600 and every file is replaced atomically
//! (temporary file + rename), so a crash never leaves a half-written key behind.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SigningKey as _,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

/// User name (certificate CN) of the admin credential written on first start.
pub const ADMIN_USER: &str = "fairlead-admin";
/// Group (certificate O) of the admin credential; Kubernetes grants it full access.
pub const ADMIN_GROUP: &str = "system:masters";

/// Names the serving certificate always covers, so in-cluster clients and local
/// `kubectl` can verify it whatever the caller asks for.
const DEFAULT_SANS: [&str; 6] = [
    "localhost",
    "127.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

const DAY: u64 = 24 * 60 * 60;
/// Lifetime of the CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY);
/// Lifetime of serving and client certificates.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * DAY);
/// Leaf certificates with less remaining lifetime than this are re-issued on start.
const RENEW_BEFORE: Duration = Duration::from_secs(90 * DAY);
/// Backdating of `notBefore`, to tolerate clock skew between server and clients.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Everything that can go wrong while loading, creating or using the cluster PKI.
///
/// Variants name the file involved so an operator can fix or delete it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file does not contain a usable PEM certificate.
    #[error("invalid certificate in {}: {reason}", path.display())]
    InvalidCertificate { path: PathBuf, reason: String },
    /// A file does not contain a usable PEM private key.
    #[error("invalid private key in {}: {reason}", path.display())]
    InvalidKey { path: PathBuf, reason: String },
    /// A private key does not belong to the certificate next to it.
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The CA certificate is missing (e.g. `ensure_pki` has not run yet).
    #[error("CA certificate {} does not exist; start the API server once to create the PKI", path.display())]
    MissingCa { path: PathBuf },
    /// A certificate must be issued but the CA private key is not available.
    #[error("CA private key {} does not exist; cannot issue certificates without it", path.display())]
    MissingCaKey { path: PathBuf },
    /// A requested subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {san:?}: {reason}")]
    InvalidSan { san: String, reason: String },
    /// A requested client identity (user or group) is unusable.
    #[error("invalid client identity: {0}")]
    InvalidIdentity(String),
    /// Key or certificate generation failed.
    #[error("cannot generate {what}: {reason}")]
    Generate { what: String, reason: String },
    /// In-memory PEM material handed to [`server_config`] is unusable.
    #[error("invalid {what} in PKI: {reason}")]
    InvalidPem { what: &'static str, reason: String },
    /// rustls rejected the configuration (e.g. key and certificate do not match).
    #[error("cannot build TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("cannot build client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The kubeconfig could not be serialized.
    #[error("cannot encode kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
}

/// PEM material of the cluster PKI, loaded from or created in `<data-dir>/pki/`.
///
/// Kept as PEM because every consumer wants PEM: rustls parses it, the kubeconfig
/// embeds it, and it is exactly what is on disk.
#[derive(Clone)]
pub struct Pki {
    /// The cluster CA certificate: the trust anchor for both server and clients.
    pub ca_cert_pem: String,
    /// The API server's serving certificate, signed by the CA.
    pub server_cert_pem: String,
    /// Private key of the serving certificate.
    pub server_key_pem: String,
    /// The admin client certificate (`fairlead-admin` in `system:masters`).
    pub admin_cert_pem: String,
    /// Private key of the admin client certificate.
    pub admin_key_pem: String,
}

/// Private keys are redacted so a `Pki` can be logged or embedded in `Debug` output.
impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("server_cert_pem", &self.server_cert_pem)
            .field("server_key_pem", &"<redacted>")
            .field("admin_cert_pem", &self.admin_cert_pem)
            .field("admin_key_pem", &"<redacted>")
            .finish()
    }
}

/// Load `<data_dir>/pki/{ca,apiserver,admin}.{crt,key}`, generating whatever is missing.
///
/// This is what makes a fresh data directory usable by real `kubectl`: it creates
/// the CA (kept forever once it exists), a serving certificate covering `sans` plus
/// the standard in-cluster and loopback names, and the admin client certificate.
/// Existing serving/admin certificates are re-issued (with the same CA) when they
/// no longer verify against the CA, do not match their key, are within 90 days of
/// expiry, or, for the serving certificate, do not cover every requested name.
/// Each entry of `sans` is an IP SAN if it parses as an IP address, else a DNS SAN.
pub fn ensure_pki(data_dir: &Path, sans: &[String]) -> Result<Pki, TlsError> {
    let paths = PkiPaths::new(data_dir);
    create_private_dir(&paths.dir)?;
    let sans = normalize_sans(sans)?;
    let ca = Ca::load_or_create(&paths)?;
    let roots = ca.root_store()?;
    let provider = provider();

    // Names the current certificate covers are kept when it is re-issued:
    // several API servers may share a data directory (or be given more
    // addresses over time), and each must keep being verifiable.
    let mut issue_sans: BTreeSet<San> = sans.iter().cloned().collect();
    if let Some(pem) = read_optional(&paths.server_crt)? {
        if let Ok(der) = CertificateDer::from_pem_slice(pem.as_bytes()) {
            if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der.as_ref()) {
                issue_sans.extend(cert_sans(&parsed));
            }
        }
    }
    let (server_cert_pem, server_key_pem) = ensure_leaf(
        &paths.server_crt,
        &paths.server_key,
        "serving certificate",
        |cert, key| check_serving_cert(&roots, &provider, cert, key, &sans),
        || {
            let mut params = CertificateParams::default();
            params.distinguished_name = common_name("kube-apiserver");
            params.subject_alt_names = issue_sans
                .iter()
                .map(San::to_rcgen)
                .collect::<Result<_, _>>()?;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            ca.issue(params, None, "serving certificate")
        },
    )?;

    let (admin_cert_pem, admin_key_pem) = ensure_leaf(
        &paths.admin_crt,
        &paths.admin_key,
        "admin client certificate",
        |cert, key| check_client_cert(&roots, &provider, cert, key),
        || ca.issue_client(ADMIN_USER, &[ADMIN_GROUP]),
    )?;

    Ok(Pki {
        ca_cert_pem: ca.cert_pem.clone(),
        server_cert_pem,
        server_key_pem,
        admin_cert_pem,
        admin_key_pem,
    })
}

/// Issue an extra client certificate signed by the cluster CA: returns `(cert_pem, key_pem)`.
///
/// For tests and additional users: the certificate authenticates as `user` (CN)
/// with `groups` (one O each). Nothing is written to disk; the CA must already
/// exist (see [`ensure_pki`]).
pub fn issue_client_cert(
    data_dir: &Path,
    user: &str,
    groups: &[&str],
) -> Result<(String, String), TlsError> {
    let paths = PkiPaths::new(data_dir);
    let ca = Ca::load(&paths)?;
    ca.issue_client(user, groups)
}

/// `<data_dir>/pki/ca.crt` and `ca.key`: what the CSR signer signs with.
pub fn ca_files(data_dir: &Path) -> (PathBuf, PathBuf) {
    let paths = PkiPaths::new(data_dir);
    (paths.ca_crt, paths.ca_key)
}

/// The cluster CA of `data_dir` as `(cert_pem, key_pem)`, creating it if
/// neither file exists. Servers sharing one store publish this pair there,
/// so they all sign with, and are trusted through, the same CA.
pub fn ensure_ca(data_dir: &Path) -> Result<(String, String), TlsError> {
    let paths = PkiPaths::new(data_dir);
    create_private_dir(&paths.dir)?;
    let ca = Ca::load_or_create(&paths)?;
    let key = ca.key.as_ref().ok_or_else(|| TlsError::MissingCaKey {
        path: paths.ca_key.clone(),
    })?;
    Ok((ca.cert_pem.clone(), key.serialize_pem()))
}

/// Make `data_dir` use the CA `(cert_pem, key_pem)` (the cluster's, from
/// the store). Files already holding that CA are left alone. Leaf
/// certificates of another CA are re-issued by [`ensure_pki`] because they
/// no longer verify.
pub fn install_ca(data_dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
    let paths = PkiPaths::new(data_dir);
    create_private_dir(&paths.dir)?;
    parse_cert_pem(&paths.ca_crt, cert_pem)?;
    parse_signing_key(&paths.ca_key, key_pem)?;
    if read_optional(&paths.ca_crt)?.as_deref() == Some(cert_pem)
        && read_optional(&paths.ca_key)?.as_deref() == Some(key_pem)
    {
        return Ok(());
    }
    tracing::info!(dir = %paths.dir.display(), "installing the cluster CA from the store");
    write_atomic(&paths.ca_key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&paths.ca_crt, cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Write a private file (mode 0600, atomically), its directory created
/// private if missing: the service-account key.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    write_atomic(path, contents, 0o600)
}

/// kubeadm's CA hash: lower-case hex SHA-256 of the certificate's
/// SubjectPublicKeyInfo (what `--discovery-token-ca-cert-hash` holds).
pub fn ca_hash(cert_pem: &str) -> Result<String, TlsError> {
    let invalid = |reason: String| TlsError::InvalidPem {
        what: "CA certificate",
        reason,
    };
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| invalid(e.to_string()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// The subject of a PEM certificate signing request: `(CN, [O...])`.
pub fn csr_subject(csr_pem: &str) -> Result<(String, Vec<String>), String> {
    use x509_parser::prelude::FromDer;
    let der = pem_der(csr_pem, "CERTIFICATE REQUEST")?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("unparsable certificate request: {e}"))?;
    let subject = &csr.certification_request_info.subject;
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or("")
        .to_string();
    let orgs = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .map(String::from)
        .collect();
    Ok((cn, orgs))
}

fn pem_der(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = pem
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(b, _)| b)
        .ok_or_else(|| format!("no {label} PEM block"))?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad PEM: {e}"))
}

/// Sign a client certificate for the key in `csr_pem` with the CA in
/// `ca_cert`/`ca_key` (PEM files), authenticating as `user` in `groups`
/// (as the CSR signer approved them), valid for `validity`. Only the key
/// is taken from the request; every other field is the signer's.
pub fn sign_client_csr(
    (ca_cert, ca_key): (&Path, &Path),
    csr_pem: &str,
    user: &str,
    groups: &[&str],
    validity: Duration,
) -> Result<String, TlsError> {
    let generate = |reason: String| TlsError::Generate {
        what: "client certificate".into(),
        reason,
    };
    let paths = PkiPaths {
        ca_crt: ca_cert.to_path_buf(),
        ca_key: ca_key.to_path_buf(),
        ..PkiPaths::new(Path::new("."))
    };
    let ca = Ca::load(&paths)?;
    let ca_key = ca.key.as_ref().ok_or_else(|| TlsError::MissingCaKey {
        path: paths.ca_key.clone(),
    })?;
    let der = pem_der(csr_pem, "CERTIFICATE REQUEST").map_err(generate)?;
    let mut request = rcgen::CertificateSigningRequestParams::from_der(&der.into())
        .map_err(|e| generate(format!("certificate request: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(user);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, validity)?;
    params.is_ca = IsCa::ExplicitNoCa;
    let mut issuer_params = CertificateParams::default();
    if let Some(id) = &ca.key_id {
        issuer_params.key_identifier_method = KeyIdMethod::PreSpecified(id.clone());
        params.use_authority_key_identifier_extension = true;
    }
    request.params = params;
    let issuer = rcgen::Issuer::new(issuer_params, ca_key);
    let cert = request
        .signed_by(&issuer)
        .map_err(|e| generate(e.to_string()))?;
    let subject = encode_name(user, groups);
    let der = replace_names_and_resign(cert.der(), &ca.subject_der, Some(&subject), ca_key)
        .map_err(generate)?;
    Ok(pem_encode("CERTIFICATE", &der))
}

/// Build the API server's rustls configuration from the cluster PKI.
///
/// Offers ALPN `h2` and `http/1.1`. Client certificates are optional, but when
/// presented they must chain to the cluster CA: anonymous clients still complete
/// the handshake so that the HTTP layer can answer them with a proper 401 (or
/// accept a bearer token), while forged certificates never get that far. Uses the
/// ring provider explicitly so no process-wide default provider is needed.
pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let ca = CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).map_err(|e| {
        TlsError::InvalidPem {
            what: "CA certificate",
            reason: e.to_string(),
        }
    })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;

    let chain = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            what: "serving certificate",
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::InvalidPem {
            what: "serving certificate",
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).map_err(|e| {
        TlsError::InvalidPem {
            what: "serving key",
            reason: e.to_string(),
        }
    })?;

    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Write a kubeconfig for `server_url` that trusts the cluster CA and authenticates
/// with `cert_pem`/`key_pem`, so `kubectl --kubeconfig <path>` works immediately.
///
/// Everything is embedded (`*-data` fields), making the file self-contained and
/// copyable. It holds a private key, so it is written with mode 0600, atomically
/// (temporary file + rename) so readers never see a partial file. Missing parent
/// directories are created.
pub fn write_kubeconfig(
    path: &Path,
    server_url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), TlsError> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "fairlead",
            "cluster": {
                "server": server_url,
                "certificate-authority-data": b64(ca_pem),
            },
        }],
        "users": [{
            "name": "admin",
            "user": {
                "client-certificate-data": b64(cert_pem),
                "client-key-data": b64(key_pem),
            },
        }],
        "contexts": [{
            "name": "fairlead",
            "context": { "cluster": "fairlead", "user": "admin" },
        }],
        "current-context": "fairlead",
        "preferences": {},
    });
    let yaml = serde_yaml::to_string(&config).map_err(|source| TlsError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| TlsError::Io {
            action: "create directory",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_atomic(path, yaml.as_bytes(), 0o600)
}

/// The authenticated identity in a verified client certificate chain:
/// `(user, groups)` = (subject CN, subject O values), as Kubernetes defines it.
///
/// Only meaningful for chains that rustls has verified against the CA (i.e. the
/// connection's `peer_certificates()` under [`server_config`]). Returns `None` when
/// there is no certificate, it does not parse, or it has no non-empty CN.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<(String, Vec<String>)> {
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let user = subject.iter_common_name().next()?.as_str().ok()?;
    if user.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|attr| attr.as_str().ok())
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    Some((user.to_owned(), groups))
}

// ---------------------------------------------------------------------------
// PKI internals
// ---------------------------------------------------------------------------

/// The file layout under `<data-dir>/pki/`.
struct PkiPaths {
    dir: PathBuf,
    ca_crt: PathBuf,
    ca_key: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    admin_crt: PathBuf,
    admin_key: PathBuf,
}

impl PkiPaths {
    fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("pki");
        Self {
            ca_crt: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_crt: dir.join("apiserver.crt"),
            server_key: dir.join("apiserver.key"),
            admin_crt: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            dir,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The loaded cluster CA.
struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// DER of the CA subject, copied verbatim into issued certificates' issuer field.
    subject_der: Vec<u8>,
    /// Subject key identifier of the CA, used as authority key identifier.
    key_id: Option<Vec<u8>>,
    /// The CA private key; `None` if only `ca.crt` exists (nothing can be issued then).
    key: Option<KeyPair>,
    key_path: PathBuf,
}

impl Ca {
    /// Load the CA, creating it if neither file exists. If only the key exists
    /// (an interrupted first start), a certificate is self-signed for that key.
    fn load_or_create(paths: &PkiPaths) -> Result<Self, TlsError> {
        let cert = read_optional(&paths.ca_crt)?;
        let key = read_optional(&paths.ca_key)?;
        match (cert, key) {
            (Some(_), _) => Self::load(paths),
            (None, key_pem) => {
                let key = match key_pem {
                    Some(pem) => {
                        tracing::warn!(path = %paths.ca_crt.display(), "CA certificate missing; re-creating it for the existing CA key");
                        parse_signing_key(&paths.ca_key, &pem)?
                    }
                    None => {
                        tracing::info!(dir = %paths.dir.display(), "generating cluster CA");
                        let key = generate_key("CA key")?;
                        write_atomic(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
                        key
                    }
                };
                let mut params = CertificateParams::default();
                params.distinguished_name = common_name(&format!("fairlead-ca@{}", unix_now()));
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                set_validity(&mut params, CA_VALIDITY)?;
                let cert = params
                    .self_signed(&key)
                    .map_err(|e| generate_error("CA certificate", e))?;
                write_atomic(&paths.ca_crt, cert.pem().as_bytes(), 0o644)?;
                Self::load(paths)
            }
        }
    }

    /// Load an existing CA; the key is optional, the certificate is not.
    fn load(paths: &PkiPaths) -> Result<Self, TlsError> {
        let cert_pem = read_optional(&paths.ca_crt)?.ok_or_else(|| TlsError::MissingCa {
            path: paths.ca_crt.clone(),
        })?;
        let cert_der = parse_cert_pem(&paths.ca_crt, &cert_pem)?;
        let (subject_der, key_id, not_after) = {
            let cert = parse_x509(&paths.ca_crt, &cert_der)?;
            let key_id = cert
                .iter_extensions()
                .find_map(|ext| match ext.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                        Some(id.0.to_vec())
                    }
                    _ => None,
                });
            (
                cert.subject().as_raw().to_vec(),
                key_id,
                cert.validity().not_after.timestamp(),
            )
        };
        if not_after <= unix_now() as i64 {
            tracing::warn!(path = %paths.ca_crt.display(), "cluster CA certificate has expired; delete the pki directory to start over");
        }
        let key = match read_optional(&paths.ca_key)? {
            Some(pem) => {
                let key = parse_signing_key(&paths.ca_key, &pem)?;
                let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| {
                    TlsError::InvalidKey {
                        path: paths.ca_key.clone(),
                        reason: e.to_string(),
                    }
                })?;
                if let Err(e) = CertifiedKey::from_der(vec![cert_der.clone()], der, &provider()) {
                    tracing::debug!(error = %e, "CA key check failed");
                    return Err(TlsError::KeyMismatch {
                        cert: paths.ca_crt.clone(),
                        key: paths.ca_key.clone(),
                    });
                }
                Some(key)
            }
            None => None,
        };
        Ok(Self {
            cert_pem,
            cert_der,
            subject_der,
            key_id,
            key,
            key_path: paths.ca_key.clone(),
        })
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        Ok(Arc::new(roots))
    }

    /// Issue a client certificate authenticating as `user` in `groups`.
    fn issue_client(&self, user: &str, groups: &[&str]) -> Result<(String, String), TlsError> {
        if user.is_empty() {
            return Err(TlsError::InvalidIdentity("user name is empty".into()));
        }
        if groups.iter().any(|g| g.is_empty()) {
            return Err(TlsError::InvalidIdentity(format!(
                "empty group name for user {user:?}"
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(user);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // rcgen holds one value per attribute type, but Kubernetes needs one O per
        // group, so the subject is encoded here and spliced in.
        let subject = encode_name(user, groups);
        self.issue(params, Some(&subject), "client certificate")
    }

    /// Sign `params` with a fresh key: returns `(cert_pem, key_pem)`.
    ///
    /// rcgen (without its x509-parser feature) cannot reproduce an existing CA's
    /// subject byte-for-byte, so the issuer field (and optionally the subject) is
    /// replaced in the DER and the certificate re-signed with the CA key. Chain
    /// building compares issuer and subject bytes exactly, so this is what makes
    /// certificates chain to any CA loaded from disk.
    fn issue(
        &self,
        mut params: CertificateParams,
        subject: Option<&[u8]>,
        what: &str,
    ) -> Result<(String, String), TlsError> {
        let ca_key = self.key.as_ref().ok_or_else(|| TlsError::MissingCaKey {
            path: self.key_path.clone(),
        })?;
        set_validity(&mut params, LEAF_VALIDITY)?;
        params.is_ca = IsCa::ExplicitNoCa;

        let mut issuer_params = CertificateParams::default();
        if let Some(id) = &self.key_id {
            issuer_params.key_identifier_method = KeyIdMethod::PreSpecified(id.clone());
            params.use_authority_key_identifier_extension = true;
        }
        let issuer = rcgen::Issuer::new(issuer_params, ca_key);

        let key = generate_key(what)?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| generate_error(what, e))?;
        let der = replace_names_and_resign(cert.der(), &self.subject_der, subject, ca_key)
            .map_err(|reason| TlsError::Generate {
                what: what.to_owned(),
                reason,
            })?;
        Ok((pem_encode("CERTIFICATE", &der), key.serialize_pem()))
    }
}

/// Return the existing `(cert, key)` pair if `check` accepts it, else issue and
/// write a new one. Keys are written before certificates so an interrupted write
/// is detected as a mismatch (and repaired) on the next start.
fn ensure_leaf(
    cert_path: &Path,
    key_path: &Path,
    what: &str,
    check: impl FnOnce(&str, &str) -> Result<(), String>,
    issue: impl FnOnce() -> Result<(String, String), TlsError>,
) -> Result<(String, String), TlsError> {
    let cert = read_optional(cert_path)?;
    let key = read_optional(key_path)?;
    let reason = match (cert, key) {
        (Some(cert), Some(key)) => match check(&cert, &key) {
            Ok(()) => return Ok((cert, key)),
            Err(reason) => reason,
        },
        _ => "missing".to_owned(),
    };
    tracing::info!(path = %cert_path.display(), %reason, "issuing {what}");
    let (cert, key) = issue()?;
    write_atomic(key_path, key.as_bytes(), 0o600)?;
    write_atomic(cert_path, cert.as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// Checks shared by all leaf certificates: parses, matches its key, is not close
/// to expiry. Returns the parsed certificate for further checks.
fn check_leaf(
    provider: &Arc<CryptoProvider>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<CertificateDer<'static>, String> {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("unreadable key: {e}"))?;
    CertifiedKey::from_der(vec![cert.clone()], key, provider)
        .map_err(|e| format!("key does not match certificate: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    if not_after < (unix_now() + RENEW_BEFORE.as_secs()) as i64 {
        return Err("expires within 90 days".into());
    }
    Ok(cert)
}

fn check_serving_cert(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    cert_pem: &str,
    key_pem: &str,
    sans: &[San],
) -> Result<(), String> {
    let cert = check_leaf(provider, cert_pem, key_pem)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
        .map_err(|e| format!("does not verify against the CA: {e}"))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let present = cert_sans(&parsed);
    let missing: Vec<String> = sans
        .iter()
        .filter(|san| !present.contains(san))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(format!("does not cover {}", missing.join(", ")));
    }
    Ok(())
}

fn check_client_cert(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), String> {
    let cert = check_leaf(provider, cert_pem, key_pem)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(&cert, &[], UnixTime::now())
        .map_err(|e| format!("does not verify against the CA: {e}"))?;
    Ok(())
}

/// A subject alternative name, normalized for comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum San {
    Ip(IpAddr),
    /// Lower-cased DNS name.
    Dns(String),
}

impl San {
    fn parse(s: &str) -> Result<Self, TlsError> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(San::Ip(ip));
        }
        let invalid = |reason: &str| TlsError::InvalidSan {
            san: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(invalid("empty name"));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) || s.contains(['/', ':', '@']) {
            return Err(invalid("not an IP address or DNS name"));
        }
        Ok(San::Dns(s.trim_end_matches('.').to_ascii_lowercase()))
    }

    fn to_rcgen(&self) -> Result<rcgen::SanType, TlsError> {
        Ok(match self {
            San::Ip(ip) => rcgen::SanType::IpAddress(*ip),
            San::Dns(name) => {
                rcgen::SanType::DnsName(name.clone().try_into().map_err(|e: rcgen::Error| {
                    TlsError::InvalidSan {
                        san: name.clone(),
                        reason: e.to_string(),
                    }
                })?)
            }
        })
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Ip(ip) => ip.fmt(f),
            San::Dns(name) => f.write_str(name),
        }
    }
}

/// The default names plus the requested ones, deduplicated and sorted.
fn normalize_sans(sans: &[String]) -> Result<Vec<San>, TlsError> {
    let mut set = BTreeSet::new();
    for s in DEFAULT_SANS
        .iter()
        .copied()
        .chain(sans.iter().map(String::as_str))
    {
        set.insert(San::parse(s)?);
    }
    Ok(set.into_iter().collect())
}

/// The DNS and IP SANs present in a certificate.
fn cert_sans(cert: &X509Certificate<'_>) -> BTreeSet<San> {
    let mut out = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    out.insert(San::Dns(dns.trim_end_matches('.').to_ascii_lowercase()));
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn generate_key(what: &str) -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| generate_error(&format!("{what} key"), e))
}

fn generate_error(what: &str, e: rcgen::Error) -> TlsError {
    TlsError::Generate {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn parse_signing_key(path: &Path, pem: &str) -> Result<KeyPair, TlsError> {
    KeyPair::from_pem(pem).map_err(|e| TlsError::InvalidKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn parse_cert_pem(path: &Path, pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::InvalidCertificate {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn parse_x509<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, TlsError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| TlsError::InvalidCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Set the validity window of `params` to `[now - BACKDATE, now + lifetime]`.
///
/// Goes through x509-parser's `ASN1Time`, which converts into the same `time`
/// type rcgen uses, so the `time` crate need not be a direct dependency.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<(), TlsError> {
    let now = unix_now();
    let at = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|s| ASN1Time::from_timestamp(s).ok())
            .map(|t| t.to_datetime())
            .ok_or_else(|| TlsError::Generate {
                what: "certificate validity".into(),
                reason: format!("timestamp {secs} out of range"),
            })
    };
    params.not_before = at(now.saturating_sub(BACKDATE.as_secs()))?;
    params.not_after = at(now.saturating_add(lifetime.as_secs()))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Read a file, treating "not found" as `None`.
fn read_optional(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Create `dir` (and parents); the directory itself is private (0700) because it
/// holds private keys.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Replace `path` atomically with `contents`, created with permission `mode`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io {
            action,
            path,
            source,
        }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    // A leftover from a crash may have other permissions; start from scratch.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &tmp)(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut file = options.open(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Make the rename durable; failure here only weakens crash safety.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------
// Minimal DER surgery on certificates rcgen produced
// ---------------------------------------------------------------------------

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_VERSION: u8 = 0xa0;
/// DER contents of the OIDs 2.5.4.3 (commonName) and 2.5.4.10 (organizationName).
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
const OID_ORGANIZATION: [u8; 3] = [0x55, 0x04, 0x0a];

/// Split one DER element (single-byte tag) off `input`: `(element, contents, rest)`.
fn der_split(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&tag, after_tag) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur at the levels we touch
    }
    let (&first, mut rest) = after_tag.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((&input[..header + len], &rest[..len], &rest[len..]))
}

fn der_encode(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// DER of the Name `O=<group>, ..., CN=<user>` (one RDN per attribute, UTF8String).
fn encode_name(user: &str, groups: &[&str]) -> Vec<u8> {
    let rdn = |oid: &[u8], value: &str| {
        let atv = [
            der_encode(TAG_OID, oid),
            der_encode(TAG_UTF8_STRING, value.as_bytes()),
        ]
        .concat();
        der_encode(TAG_SET, &der_encode(TAG_SEQUENCE, &atv))
    };
    let mut rdns: Vec<u8> = groups
        .iter()
        .flat_map(|g| rdn(&OID_ORGANIZATION, g))
        .collect();
    rdns.extend(rdn(&OID_COMMON_NAME, user));
    der_encode(TAG_SEQUENCE, &rdns)
}

/// Replace the issuer (and optionally the subject) Name of `cert` and re-sign
/// the TBSCertificate with `ca_key`, keeping every other field as rcgen wrote it.
fn replace_names_and_resign(
    cert: &[u8],
    issuer: &[u8],
    subject: Option<&[u8]>,
    ca_key: &KeyPair,
) -> Result<Vec<u8>, String> {
    let malformed = || "unexpected certificate encoding".to_owned();
    let (_, cert_body, _) = der_split(cert).ok_or_else(malformed)?;
    let (_, tbs, rest) = der_split(cert_body).ok_or_else(malformed)?;
    let (signature_algorithm, _, _) = der_split(rest).ok_or_else(malformed)?;

    // TBSCertificate: [0] version?, serial, signature, issuer, validity, subject, ...
    let issuer_index = if tbs.first() == Some(&TAG_VERSION) {
        3
    } else {
        2
    };
    let mut fields = Vec::with_capacity(tbs.len() + issuer.len());
    let mut remaining = tbs;
    let mut index = 0;
    while !remaining.is_empty() {
        let (element, _, rest) = der_split(remaining).ok_or_else(malformed)?;
        let replacement = if index == issuer_index {
            Some(issuer)
        } else if index == issuer_index + 2 {
            subject
        } else {
            None
        };
        fields.extend_from_slice(replacement.unwrap_or(element));
        remaining = rest;
        index += 1;
    }
    if index <= issuer_index + 2 {
        return Err(malformed());
    }
    let tbs = der_encode(TAG_SEQUENCE, &fields);
    let signature = ca_key.sign(&tbs).map_err(|e| e.to_string())?;
    let mut bits = Vec::with_capacity(signature.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(&signature);
    let body = [
        tbs.as_slice(),
        signature_algorithm,
        &der_encode(TAG_BIT_STRING, &bits),
    ]
    .concat();
    Ok(der_encode(TAG_SEQUENCE, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    fn sans_of(cert_pem: &str) -> BTreeSet<San> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        cert_sans(&cert)
    }

    fn client_config(pki: &Pki, identity: Option<(&str, &str)>) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }

    /// Handshake over an in-memory pipe; returns the server's view of the client
    /// certificates (or its handshake error) after exchanging one byte.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: ClientConfig,
    ) -> io::Result<Option<Vec<CertificateDer<'static>>>> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let server_side = async move {
            let mut stream = acceptor.accept(server_io).await?;
            let (_, conn) = stream.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            let certs = conn.peer_certificates().map(<[_]>::to_vec);
            stream.write_all(b"x").await?;
            stream.flush().await?;
            Ok::<_, io::Error>(certs)
        };
        let client_side = async move {
            let name = ServerName::try_from("localhost").unwrap();
            let mut stream = connector.connect(name, client_io).await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok::<_, io::Error>(())
        };
        let (server_result, client_result) = tokio::join!(server_side, client_side);
        if server_result.is_ok() {
            client_result?;
        }
        server_result
    }

    #[test]
    fn generates_pki_and_reloads_it_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let pki_dir = dir.path().join("pki");
        for name in ["ca", "apiserver", "admin"] {
            assert!(!read(&pki_dir.join(format!("{name}.crt"))).is_empty());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(pki_dir.join(format!("{name}.key")))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}.key");
            }
        }
        assert_eq!(read(&pki_dir.join("ca.crt")), pki.ca_cert_pem);
        assert_eq!(read(&pki_dir.join("admin.key")), pki.admin_key_pem);
        let sans = sans_of(&pki.server_cert_pem);
        for san in DEFAULT_SANS {
            assert!(sans.contains(&San::parse(san).unwrap()), "{san}");
        }

        let again = ensure_pki(dir.path(), &[]).unwrap();
        assert_eq!(again.ca_cert_pem, pki.ca_cert_pem);
        assert_eq!(again.server_cert_pem, pki.server_cert_pem);
        assert_eq!(again.server_key_pem, pki.server_key_pem);
        assert_eq!(again.admin_cert_pem, pki.admin_cert_pem);
        assert_eq!(again.admin_key_pem, pki.admin_key_pem);
        let debug = format!("{again:?}");
        assert!(!debug.contains("PRIVATE KEY"));
    }

    #[test]
    fn reissues_serving_cert_when_a_san_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_pki(dir.path(), &["node1.example".into()]).unwrap();
        let extra = vec![
            "Node1.example".to_owned(),
            "10.1.2.3".into(),
            "fd00::1".into(),
        ];
        let second = ensure_pki(dir.path(), &extra).unwrap();
        assert_eq!(second.ca_cert_pem, first.ca_cert_pem);
        assert_eq!(second.admin_cert_pem, first.admin_cert_pem);
        assert_ne!(second.server_cert_pem, first.server_cert_pem);
        let sans = sans_of(&second.server_cert_pem);
        assert!(sans.contains(&San::Dns("node1.example".into())));
        assert!(sans.contains(&San::Ip("10.1.2.3".parse().unwrap())));
        assert!(sans.contains(&San::Ip("fd00::1".parse().unwrap())));
        // A subset of what is covered does not cause another re-issue.
        let third = ensure_pki(dir.path(), &["10.1.2.3".into()]).unwrap();
        assert_eq!(third.server_cert_pem, second.server_cert_pem);
    }

    #[test]
    fn a_second_server_on_the_data_dir_keeps_the_first_ones_names() {
        let dir = tempfile::tempdir().unwrap();
        ensure_pki(dir.path(), &["10.0.0.1".into()]).unwrap();
        let second = ensure_pki(dir.path(), &["10.0.0.2".into()]).unwrap();
        let sans = sans_of(&second.server_cert_pem);
        assert!(sans.contains(&San::Ip("10.0.0.1".parse().unwrap())));
        assert!(sans.contains(&San::Ip("10.0.0.2".parse().unwrap())));
        // Both now covered: the first server restarting changes nothing.
        let again = ensure_pki(dir.path(), &["10.0.0.1".into()]).unwrap();
        assert_eq!(again.server_cert_pem, second.server_cert_pem);
    }

    #[test]
    fn signs_a_node_csr_as_the_approved_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("system:node:a");
        params.subject_alt_names =
            vec![rcgen::SanType::DnsName("evil.example".try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(csr_subject(&csr).unwrap().0, "system:node:a");
        let (ca_crt, ca_key) = ca_files(dir.path());
        let cert = sign_client_csr(
            (&ca_crt, &ca_key),
            &csr,
            "system:node:a",
            &["system:nodes"],
            Duration::from_secs(3600),
        )
        .unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(
            peer_identity(std::slice::from_ref(&der)),
            Some(("system:node:a".into(), vec!["system:nodes".into()]))
        );
        // The requested SAN is not carried over; the CA verifies it.
        assert!(sans_of(&cert).is_empty());
        let roots = Ca::load(&PkiPaths::new(dir.path()))
            .unwrap()
            .root_store()
            .unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .unwrap();
        assert_eq!(ca_hash(&pki.ca_cert_pem).unwrap().len(), 64);
    }

    #[test]
    fn repairs_missing_or_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_pki(dir.path(), &[]).unwrap();
        let pki_dir = dir.path().join("pki");
        std::fs::remove_file(pki_dir.join("apiserver.key")).unwrap();
        std::fs::write(pki_dir.join("admin.key"), &first.server_key_pem).unwrap();
        let second = ensure_pki(dir.path(), &[]).unwrap();
        assert_eq!(second.ca_cert_pem, first.ca_cert_pem);
        assert_ne!(second.server_cert_pem, first.server_cert_pem);
        assert_ne!(second.admin_cert_pem, first.admin_cert_pem);
        server_config(&second).unwrap();

        // Without the CA key nothing can be issued, and the error names the file.
        std::fs::remove_file(pki_dir.join("ca.key")).unwrap();
        ensure_pki(dir.path(), &[]).unwrap();
        let err = ensure_pki(dir.path(), &["new.example".into()]).unwrap_err();
        assert!(matches!(err, TlsError::MissingCaKey { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn rejects_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_pki(dir.path(), &["not a name".into()]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidSan { .. }), "{err}");
        let err = issue_client_cert(dir.path(), "alice", &[]).unwrap_err();
        assert!(matches!(err, TlsError::MissingCa { .. }), "{err}");
        ensure_pki(dir.path(), &[]).unwrap();
        let err = issue_client_cert(dir.path(), "", &[]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidIdentity(_)), "{err}");
    }

    #[tokio::test]
    async fn admin_client_cert_authenticates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let client = client_config(&pki, Some((&pki.admin_cert_pem, &pki.admin_key_pem)));
        let certs = handshake(server_config(&pki).unwrap(), client)
            .await
            .unwrap()
            .expect("server sees the client certificate");
        assert_eq!(
            peer_identity(&certs),
            Some((ADMIN_USER.to_owned(), vec![ADMIN_GROUP.to_owned()]))
        );
    }

    #[tokio::test]
    async fn extra_client_cert_carries_all_groups() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let (cert, key) = issue_client_cert(dir.path(), "alice", &["dev", "ops"]).unwrap();
        let client = client_config(&pki, Some((&cert, &key)));
        let certs = handshake(server_config(&pki).unwrap(), client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            peer_identity(&certs),
            Some(("alice".to_owned(), vec!["dev".to_owned(), "ops".to_owned()]))
        );
        let (cert, _) = issue_client_cert(dir.path(), "bob", &[]).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(peer_identity(&[der]), Some(("bob".to_owned(), vec![])));
    }

    #[tokio::test]
    async fn anonymous_client_handshakes_without_peer_certs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let certs = handshake(server_config(&pki).unwrap(), client_config(&pki, None))
            .await
            .unwrap();
        assert!(certs.is_none());
        assert_eq!(peer_identity(&[]), None);
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = ensure_pki(other_dir.path(), &[]).unwrap();
        assert_ne!(other.ca_cert_pem, pki.ca_cert_pem);
        let client = client_config(&pki, Some((&other.admin_cert_pem, &other.admin_key_pem)));
        let result = handshake(server_config(&pki).unwrap(), client).await;
        assert!(result.is_err(), "handshake must fail: {result:?}");
    }

    #[test]
    fn kubeconfig_has_cluster_user_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_pki(dir.path(), &[]).unwrap();
        let path = dir.path().join("kube").join("config");
        write_kubeconfig(
            &path,
            "https://127.0.0.1:6443",
            &pki.ca_cert_pem,
            &pki.admin_cert_pem,
            &pki.admin_key_pem,
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let config: serde_yaml::Value = serde_yaml::from_str(&read(&path)).unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(config["apiVersion"], "v1");
        assert_eq!(config["kind"], "Config");
        assert_eq!(config["current-context"], "fairlead");
        let cluster = &config["clusters"][0];
        assert_eq!(cluster["name"], "fairlead");
        assert_eq!(cluster["cluster"]["server"], "https://127.0.0.1:6443");
        assert_eq!(
            cluster["cluster"]["certificate-authority-data"],
            b64(&pki.ca_cert_pem).as_str()
        );
        let user = &config["users"][0];
        assert_eq!(user["name"], "admin");
        assert_eq!(
            user["user"]["client-certificate-data"],
            b64(&pki.admin_cert_pem).as_str()
        );
        assert_eq!(
            user["user"]["client-key-data"],
            b64(&pki.admin_key_pem).as_str()
        );
        let context = &config["contexts"][0];
        assert_eq!(context["name"], "fairlead");
        assert_eq!(context["context"]["cluster"], "fairlead");
        assert_eq!(context["context"]["user"], "admin");

        // Rewriting replaces the file in place and leaves no temporary files.
        write_kubeconfig(
            &path,
            "https://[::1]:6443",
            &pki.ca_cert_pem,
            &pki.admin_cert_pem,
            &pki.admin_key_pem,
        )
        .unwrap();
        assert!(read(&path).contains("https://[::1]:6443"));
        let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(entries, 1);
    }

    #[test]
    fn der_helpers_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let contents = vec![0xab; len];
            let encoded = der_encode(TAG_SEQUENCE, &contents);
            let (element, inner, rest) = der_split(&encoded).unwrap();
            assert_eq!(element, &encoded[..]);
            assert_eq!(inner, &contents[..]);
            assert!(rest.is_empty());
        }
        assert!(der_split(&[TAG_SEQUENCE, 0x05, 0x00]).is_none());
    }
}
