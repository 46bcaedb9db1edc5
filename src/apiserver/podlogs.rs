//! `GET pods/<name>/log`: the API server proxies to the agent of the
//! pod's node (HTTPS port 10250, `/containerLogs/...`), as kube-apiserver
//! does, authenticating with a client certificate of the cluster CA
//! (`kube-apiserver-kubelet-client`). Like kube-apiserver without
//! `--kubelet-certificate-authority`, it does not verify the node's
//! self-signed serving certificate.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Response;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use super::rest::{Body, Query};
use super::Server;
use crate::api::resources::{self, Kind};
use crate::api::status::ApiError;

/// The user the API server is to nodes.
const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS client configuration for talking to nodes.
pub fn kubelet_client_config(data_dir: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let (cert, key) =
        super::tls::issue_client_cert(data_dir, KUBELET_CLIENT_USER, &["system:masters"])?;
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNodeCert(provider)))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts any serving certificate (node certificates are self-signed;
/// a joining host checks the CA it fetched by its hash instead), still
/// checking the handshake's signatures.
#[derive(Debug)]
pub struct AnyNodeCert(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyNodeCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The container a log request is for: `container`, or the only one.
fn pick_container(pod: &Value, name: &str, asked: Option<&String>) -> Result<String, ApiError> {
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match asked {
        Some(c) if names.contains(&c.as_str()) => Ok(c.clone()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if names.len() == 1 => Ok(names[0].to_string()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            names.join(" ")
        ))),
    }
}

impl Server {
    /// `GET /api/v1/namespaces/<ns>/pods/<name>/log`.
    pub(super) async fn pod_log(
        &self,
        ns: &str,
        name: &str,
        q: &Query,
    ) -> Result<Response<Body>, ApiError> {
        let (pod, _) = self
            .get_object(resources::by_kind(Kind::Pod), Some(ns), name)
            .await?;
        let container = pick_container(&pod, name, q.get("container"))?;
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request(format!("pod {name} does not have a host assigned"))
            })?;
        let (node_obj, _) = self
            .get_object(resources::by_kind(Kind::Node), None, node)
            .await
            .map_err(|_| ApiError::bad_request(format!("node {node} of pod {name} is unknown")))?;
        let ip: IpAddr = node_obj
            .pointer("/status/addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str()?.parse().ok())
            .ok_or_else(|| ApiError::bad_request(format!("node {node} has no InternalIP")))?;
        let port = node_obj
            .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
            .and_then(Value::as_u64)
            .unwrap_or(10250) as u16;
        let mut path = format!("/containerLogs/{ns}/{name}/{container}");
        let params: Vec<String> = [
            "follow",
            "previous",
            "tailLines",
            "limitBytes",
            "timestamps",
        ]
        .iter()
        .filter_map(|k| {
            q.get(*k).map(|v| {
                format!(
                    "{k}={}",
                    url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                )
            })
        })
        .collect();
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        let unreachable = |e: String| {
            ApiError::new(
                503,
                "ServiceUnavailable",
                format!("Get \"https://{ip}:{port}{path}\": {e}"),
            )
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((ip, port)))
            .await
            .map_err(|_| unreachable("dial timeout".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(self.kubelet_tls.clone())
            .connect(ServerName::IpAddress(ip.into()), tcp)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(&path)
            .header(hyper::header::HOST, format!("{ip}:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(ApiError::internal)?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let code = resp.status().as_u16();
        if code != 200 {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let msg = String::from_utf8_lossy(&body).into_owned();
            return Err(match code {
                404 => ApiError::new(404, "NotFound", msg),
                400 => ApiError::bad_request(msg),
                _ => ApiError::internal(msg),
            });
        }
        let body = resp
            .into_body()
            .map_err(std::io::Error::other)
            .boxed_unsync();
        let mut out = Response::new(body);
        out.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_only_container_or_the_named_one() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(pick_container(&one, "p", None).unwrap(), "a");
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(
            pick_container(&two, "p", None).unwrap_err().message,
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        assert_eq!(
            pick_container(&two, "p", Some(&"b".to_string())).unwrap(),
            "b"
        );
        assert_eq!(
            pick_container(&two, "p", Some(&"c".to_string()))
                .unwrap_err()
                .code,
            400
        );
    }
}
