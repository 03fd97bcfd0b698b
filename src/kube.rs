//! The few Kubernetes API calls `snapshot-labeler` makes (list, watch and
//! merge-patch of one resource), over HTTP/1.1 with the pod's service
//! account token and CA, one connection per request. Not a general client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("not in a pod: KUBERNETES_SERVICE_HOST/PORT are not set; give --apiserver")]
    NotInCluster,
    #[error("bad API server URL {0:?} (http://host:port or https://host:port)")]
    BadUrl(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the CA bundle {path}: {source}")]
    Ca {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect to the API server: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("the API server sent something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl KubeError {
    /// The status of a refused request, if that is what this is.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            KubeError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where the API server is and how to authenticate.
#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    /// TLS with this configuration; plain HTTP when `None` (tests).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Read at each request: projected tokens are rotated on disk.
    token_file: Option<PathBuf>,
}

fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, KubeError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| KubeError::Ca {
            path: ca_file.to_owned(),
            source,
        })?;
    for cert in certs {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Client {
    /// The pod's own API access: the service's address from the
    /// environment, the service account's token and CA.
    pub fn in_cluster() -> Result<Client, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").map_err(|_| KubeError::NotInCluster)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let url = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        let sa = Path::new(SA_DIR);
        Client::new(&url, Some(sa.join("token")), Some(&sa.join("ca.crt")))
    }

    /// `url` is `https://host:port` (verified against `ca_file`) or
    /// `http://host:port`.
    pub fn new(
        url: &str,
        token_file: Option<PathBuf>,
        ca_file: Option<&Path>,
    ) -> Result<Client, KubeError> {
        let bad = || KubeError::BadUrl(url.to_owned());
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err(bad()),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match (tls, ca_file) {
            (true, Some(ca)) => Some(tls_config(ca)?),
            (true, None) => return Err(bad()),
            (false, _) => None,
        };
        Ok(Client {
            host,
            port,
            tls,
            token_file,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request on a fresh connection; returns the status and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Incoming), KubeError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(KubeError::Connect)?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.authority())
            .header("accept", "application/json");
        if let Some(file) = &self.token_file {
            let token = std::fs::read_to_string(file).map_err(|source| KubeError::Read {
                path: file.clone(),
                source,
            })?;
            req = req.header("authorization", format!("Bearer {}", token.trim()));
        }
        let (content_type, bytes) = body.unwrap_or(("application/json", Vec::new()));
        let req = req
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(bytes)))
            .expect("request parts are valid");
        let response = match &self.tls {
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| KubeError::BadUrl(self.host.clone()))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(KubeError::Connect)?;
                request_on(TokioIo::new(stream), req).await?
            }
            None => request_on(TokioIo::new(tcp), req).await?,
        };
        Ok((response.status(), response.into_body()))
    }

    async fn expect_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Incoming, KubeError> {
        let (status, incoming) = self.send(method.clone(), path, body).await?;
        if status.is_success() {
            return Ok(incoming);
        }
        let text = incoming
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(KubeError::Status {
            method,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&text).chars().take(500).collect(),
        })
    }

    /// GET a JSON object.
    pub async fn get(&self, path: &str) -> Result<Value, KubeError> {
        let body = self.expect_ok(Method::GET, path, None).await?;
        Ok(serde_json::from_slice(&body.collect().await?.to_bytes())?)
    }

    /// PATCH with a JSON merge patch.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, KubeError> {
        let body = Some(("application/merge-patch+json", serde_json::to_vec(patch)?));
        let out = self.expect_ok(Method::PATCH, path, body).await?;
        Ok(serde_json::from_slice(&out.collect().await?.to_bytes())?)
    }

    /// Starts a watch (`path` must ask for `watch=1`).
    pub async fn watch(&self, path: &str) -> Result<Watch, KubeError> {
        Ok(Watch {
            body: self.expect_ok(Method::GET, path, None).await?,
            buffer: Vec::new(),
        })
    }
}

async fn request_on<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, KubeError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "API server connection ended");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// A watch's event stream: one JSON object per line.
pub struct Watch {
    body: Incoming,
    buffer: Vec<u8>,
}

impl Watch {
    /// The next event (`{"type": …, "object": …}`), or `None` when the
    /// server ends the watch.
    pub async fn next(&mut self) -> Result<Option<Value>, KubeError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            match self.body.frame().await {
                None => {
                    // A last event without its newline.
                    if self.buffer.iter().all(u8::is_ascii_whitespace) {
                        return Ok(None);
                    }
                    let rest = std::mem::take(&mut self.buffer);
                    return Ok(Some(serde_json::from_slice(&rest)?));
                }
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The in-cluster path: HTTPS verified against the CA file, the token
    /// read from its file into the Authorization header.
    #[tokio::test]
    async fn https_with_a_ca_and_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("token"), "sekret\n").unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"kind":"List","items":[]}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(reply.as_bytes()).await.unwrap();
            tls.shutdown().await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let client = Client::new(
            &format!("https://127.0.0.1:{port}"),
            Some(dir.path().join("token")),
            Some(&dir.path().join("ca.crt")),
        )
        .unwrap();
        let list = client.get("/api/v1/things").await.unwrap();
        assert_eq!(list["kind"], "List");
        let request = served.await.unwrap().to_ascii_lowercase();
        assert!(
            request.starts_with("get /api/v1/things http/1.1"),
            "{request}"
        );
        assert!(
            request.contains("authorization: bearer sekret\r\n"),
            "{request}"
        );
    }

    #[test]
    fn urls() {
        assert!(Client::new("http://[fd00::1]:6443", None, None).is_ok());
        assert!(matches!(
            Client::new("https://h:6443", None, None),
            Err(KubeError::BadUrl(_))
        ));
        assert!(matches!(
            Client::new("ftp://h:1", None, None),
            Err(KubeError::BadUrl(_))
        ));
    }
}
