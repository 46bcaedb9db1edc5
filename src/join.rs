//! Joining a host to a cluster (`fairlead join`), and the tokens that let
//! it (`fairlead token`).
//!
//! The flow is kubeadm's discovery plus the kubelet's TLS bootstrap, in one
//! command as k3s has it:
//!
//! 1. A server keeps a join token in `<data-dir>/token` ([`ensure_server_token`]);
//!    `fairlead token create|list|delete` manage more. A join token is the
//!    CA's hash plus a bootstrap token (see [`crate::api::token`]).
//! 2. The new host fetches the CA from `https://<server>/cacerts` without
//!    trusting anything yet, and accepts it only if its public key hashes
//!    to the token's hash. From then on every connection verifies the
//!    server against that CA.
//! 3. With the bootstrap token as its credential, which may do nothing but
//!    this, it sends a CertificateSigningRequest for
//!    `CN=system:node:<name>, O=system:nodes`; `controllers::csr` approves
//!    and signs it.
//! 4. It writes `<data-dir>/kubeconfig` with that certificate and runs the
//!    node agent and the proxy under the node's own identity. Later starts
//!    reuse the kubeconfig.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::api::token::{self, JoinToken, Token};
use crate::apiserver::tls;
use crate::controllers::csr::KUBELET_CLIENT_SIGNER;

/// The server's join token, under its data directory.
pub const TOKEN_FILE: &str = "token";
/// How long a joining host waits for its certificate.
const CSR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long fetching the CA may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn secrets(client: &kube::Client) -> Api<Secret> {
    Api::namespaced(client.clone(), token::NAMESPACE)
}

/// Create a bootstrap token valid for `ttl` (`None`: for ever) and return
/// the join token for it.
pub async fn create_token(
    client: &kube::Client,
    ca_pem: &str,
    ttl: Option<Duration>,
    description: &str,
) -> anyhow::Result<JoinToken> {
    let t = Token::generate();
    let expiration = ttl.map(|d| {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::try_from(d).unwrap_or_default();
        at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    });
    let secret: Secret = serde_json::from_value(t.to_secret(expiration.as_deref(), description))?;
    secrets(client)
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| anyhow::anyhow!("creating the token's Secret: {}", api_message(&e)))?;
    Ok(JoinToken {
        ca_hash: tls::ca_hash(ca_pem)?,
        token: t,
    })
}

/// The server's own join token: `<data-dir>/token` if its Secret still
/// exists, else a new one (no expiry) written there. Returns the file.
pub async fn ensure_server_token(
    client: &kube::Client,
    data_dir: &Path,
    ca_pem: &str,
) -> anyhow::Result<PathBuf> {
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(j) = JoinToken::parse(&text) {
            let current = tls::ca_hash(ca_pem)?;
            if j.ca_hash == current
                && secrets(client)
                    .get_opt(&j.token.secret_name())
                    .await?
                    .is_some()
            {
                return Ok(path);
            }
        }
    }
    let j = create_token(client, ca_pem, None, "the join token of fairlead up").await?;
    write_private(&path, format!("{j}\n").as_bytes())?;
    Ok(path)
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// One listed token.
#[derive(Debug)]
pub struct TokenInfo {
    pub id: String,
    pub expires: Option<String>,
    pub description: String,
}

/// The bootstrap tokens in the cluster, oldest first.
pub async fn list_tokens(client: &kube::Client) -> anyhow::Result<Vec<TokenInfo>> {
    let list = secrets(client)
        .list(&ListParams::default().fields(&format!("type={}", token::SECRET_TYPE)))
        .await
        .map_err(|e| anyhow::anyhow!("listing tokens: {}", api_message(&e)))?;
    Ok(list
        .items
        .iter()
        .filter_map(|s| {
            let v = serde_json::to_value(s).ok()?;
            Some(TokenInfo {
                id: token::secret_field(&v, "token-id")?,
                expires: token::secret_field(&v, "expiration"),
                description: token::secret_field(&v, "description").unwrap_or_default(),
            })
        })
        .collect())
}

/// Revoke a token by id (or by whole token).
pub async fn delete_token(client: &kube::Client, id: &str) -> anyhow::Result<()> {
    let id = id.split('.').next().unwrap_or(id);
    let name = format!("{}{id}", token::SECRET_PREFIX);
    match secrets(client)
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!("no token with id {id:?}"),
        Err(e) => anyhow::bail!("deleting token {id}: {}", api_message(&e)),
    }
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Fetch the cluster CA from `server` (an `https://host:port` URL)
/// without trusting the connection, and accept it only if it matches
/// `ca_hash`.
pub async fn discover_ca(server: &str, ca_hash: &str) -> anyhow::Result<String> {
    let fetch = async {
        let url =
            url::Url::parse(server).map_err(|e| anyhow::anyhow!("--server {server:?}: {e}"))?;
        anyhow::ensure!(url.scheme() == "https", "--server must be an https:// URL");
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("--server {server:?} has no host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let port = url.port().unwrap_or(6443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::apiserver::podlogs::AnyNodeCert(
                provider,
            )))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/cacerts")
            .header(hyper::header::HOST, host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = send.send_request(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "GET /cacerts answered {}",
            resp.status()
        );
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(String::from_utf8(body.to_vec())?)
    };
    let pem = tokio::time::timeout(DISCOVERY_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {server} within {DISCOVERY_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("fetching the cluster CA from {server}: {e}"))?;
    let got = tls::ca_hash(&pem)?;
    anyhow::ensure!(
        got == ca_hash,
        "the CA of {server} has hash sha256:{got}, not the token's sha256:{ca_hash}: refusing to trust it"
    );
    Ok(pem)
}

/// Join `server` as node `node_name`: discover and check the CA, get a
/// node client certificate with the token, and write `kubeconfig`.
pub async fn bootstrap(
    server: &str,
    join: &JoinToken,
    node_name: &str,
    kubeconfig: &Path,
) -> anyhow::Result<()> {
    let ca_pem = discover_ca(server, &join.ca_hash).await?;
    // The bootstrap credential, kept next to the kubeconfig as the kubelet
    // keeps its bootstrap-kubeconfig; removed once the certificate is in.
    let boot_path = kubeconfig.with_file_name("bootstrap-kubeconfig");
    write_token_kubeconfig(&boot_path, server, &ca_pem, &join.token.to_string())?;
    let client = crate::cli::client_from(&boot_path).await?;
    let api: Api<CertificateSigningRequest> = Api::all(client);

    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{node_name}"),
    );
    let request = params.serialize_request(&key)?.pem()?;
    let name = format!("node-csr-{}", Token::generate().secret);
    let csr: CertificateSigningRequest = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "request": base64_encode(request.as_bytes()),
            "signerName": KUBELET_CLIENT_SIGNER,
            "usages": ["digital signature", "client auth"],
        }
    }))?;
    api.create(&PostParams::default(), &csr)
        .await
        .map_err(|e| anyhow::anyhow!("{server} refused the join token: {}", api_message(&e)))?;

    let deadline = tokio::time::Instant::now() + CSR_TIMEOUT;
    let cert_pem = loop {
        let csr = api.get(&name).await.map_err(|e| {
            anyhow::anyhow!("reading certificate request {name}: {}", api_message(&e))
        })?;
        let status = csr.status.unwrap_or_default();
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| matches!(c.type_.as_str(), "Denied" | "Failed"))
        {
            anyhow::bail!(
                "certificate request {name} was {}: {}",
                c.type_.to_lowercase(),
                c.message.clone().unwrap_or_default()
            );
        }
        if let Some(cert) = status.certificate {
            break String::from_utf8(cert.0)?;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "certificate request {name} was not signed within {CSR_TIMEOUT:?}: is a controller with the cluster CA running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tls::write_kubeconfig(kubeconfig, server, &ca_pem, &cert_pem, &key.serialize_pem())?;
    let _ = std::fs::remove_file(&boot_path);
    Ok(())
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn write_token_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
) -> anyhow::Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fairlead", "cluster": {
            "server": server, "certificate-authority-data": base64_encode(ca_pem.as_bytes())}}],
        "users": [{"name": "bootstrap", "user": {"token": token}}],
        "contexts": [{"name": "bootstrap", "context": {"cluster": "fairlead", "user": "bootstrap"}}],
        "current-context": "bootstrap",
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(path, serde_yaml::to_string(&config)?.as_bytes())
}
