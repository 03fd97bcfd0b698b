//! TLS for the metrics endpoint, as upstream's driver serves it: a minimum
//! version named the Go way (`VersionTLS13`), and either the operator-given
//! certificate files or a self-signed certificate made at start-up.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Why the metrics endpoint cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the metrics certificate {path}: {source}")]
    CertFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the metrics certificate file {0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("cannot read the metrics key {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot make a self-signed metrics certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("the metrics certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The lowest TLS version the endpoint accepts (Go's names, upstream's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinTlsVersion {
    /// `VersionTLS10`, `VersionTLS11`, `VersionTLS12`: rustls has no TLS
    /// below 1.2, so all three serve 1.2 and 1.3.
    Tls12,
    /// `VersionTLS13`, upstream's default.
    Tls13,
}

impl MinTlsVersion {
    /// Parses upstream's names; anything else is TLS 1.3 with a warning, as
    /// upstream's driver does.
    pub fn from_go_name(name: &str) -> Self {
        match name {
            "VersionTLS13" => MinTlsVersion::Tls13,
            "VersionTLS12" => MinTlsVersion::Tls12,
            "VersionTLS10" | "VersionTLS11" => {
                tracing::warn!(
                    version = name,
                    "TLS below 1.2 is not offered; the metrics endpoint accepts TLS 1.2 and 1.3"
                );
                MinTlsVersion::Tls12
            }
            other => {
                tracing::warn!(
                    version = other,
                    "unknown --metrics-tls-version (VersionTLS10..VersionTLS13); using TLS 1.3"
                );
                MinTlsVersion::Tls13
            }
        }
    }

    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            MinTlsVersion::Tls12 => &BOTH,
            MinTlsVersion::Tls13 => &ONLY_13,
        }
    }
}

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    SelfSigned,
    Files { cert: PathBuf, key: PathBuf },
}

impl CertSource {
    /// Both files, or a self-signed certificate; one file alone is a warning
    /// and a self-signed certificate, as upstream does.
    pub fn from_flags(cert: Option<PathBuf>, key: Option<PathBuf>) -> Self {
        match (cert, key) {
            (Some(cert), Some(key)) => CertSource::Files { cert, key },
            (None, None) => CertSource::SelfSigned,
            (cert, key) => {
                tracing::warn!(?cert, ?key, "give both --metrics-cert-file and --metrics-key-file; using a self-signed certificate");
                CertSource::SelfSigned
            }
        }
    }
}

/// TLS settings of the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub min_version: MinTlsVersion,
    pub cert: CertSource,
}

impl TlsSettings {
    /// The rustls configuration (HTTP/1.1 only, as upstream's servers).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (chain, key) = match &self.cert {
            CertSource::Files { cert, key } => load_pair(cert, key)?,
            CertSource::SelfSigned => self_signed(&SanSources::from_env())?,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(self.min_version.versions())?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::CertFile {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::KeyFile {
        path: key.to_owned(),
        source,
    })?;
    tracing::info!(cert = %cert.display(), "metrics endpoint uses the given certificate");
    Ok((chain, key))
}

/// What the self-signed certificate names, from the downward-API variables
/// upstream's operator sets: the pod IP, its namespace and the Service name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SanSources {
    pub pod_ip: Option<String>,
    pub namespace: Option<String>,
    pub service: Option<String>,
}

impl SanSources {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        SanSources {
            pod_ip: var("POD_IP"),
            namespace: var("POD_NAMESPACE"),
            service: var("SERVICE_NAME"),
        }
    }

    /// `localhost` and 127.0.0.1 always; the pod IP and its pod DNS name;
    /// the Service's short and qualified names.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let ip = self
            .pod_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        if let Some(ip) = ip {
            names.push(ip.to_string());
            if let Some(ns) = &self.namespace {
                let dashed = self
                    .pod_ip
                    .as_deref()
                    .unwrap_or_default()
                    .replace(['.', ':'], "-");
                names.push(format!("{dashed}.{ns}.pod.cluster.local"));
            }
        }
        if let (Some(svc), Some(ns)) = (&self.service, &self.namespace) {
            names.push(svc.clone());
            names.push(format!("{svc}.{ns}"));
            names.push(format!("{svc}.{ns}.svc"));
            names.push(format!("{svc}.{ns}.svc.cluster.local"));
        }
        names
    }
}

/// A fresh key and a self-signed certificate for `sans`.
pub fn self_signed(
    sans: &SanSources,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let names = sans.names();
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.self_signed(&key)?;
    tracing::info!(names = ?names, "metrics endpoint uses a self-signed certificate");
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_version_names() {
        assert_eq!(
            MinTlsVersion::from_go_name("VersionTLS13"),
            MinTlsVersion::Tls13
        );
        for v in ["VersionTLS12", "VersionTLS11", "VersionTLS10"] {
            assert_eq!(MinTlsVersion::from_go_name(v), MinTlsVersion::Tls12, "{v}");
        }
        assert_eq!(MinTlsVersion::from_go_name("tls1.2"), MinTlsVersion::Tls13);
    }

    #[test]
    fn sans_follow_the_downward_api() {
        let s = SanSources {
            pod_ip: Some("10.128.0.5".into()),
            namespace: Some("openshift-cnv".into()),
            service: Some("hpp-prometheus-metrics".into()),
        };
        assert_eq!(
            s.names(),
            [
                "localhost",
                "127.0.0.1",
                "10.128.0.5",
                "10-128-0-5.openshift-cnv.pod.cluster.local",
                "hpp-prometheus-metrics",
                "hpp-prometheus-metrics.openshift-cnv",
                "hpp-prometheus-metrics.openshift-cnv.svc",
                "hpp-prometheus-metrics.openshift-cnv.svc.cluster.local",
            ]
        );
        let v6 = SanSources {
            pod_ip: Some("fd01::5".into()),
            namespace: Some("ns".into()),
            service: None,
        };
        assert!(v6
            .names()
            .contains(&"fd01--5.ns.pod.cluster.local".to_owned()));
        assert_eq!(SanSources::default().names(), ["localhost", "127.0.0.1"]);
    }

    #[test]
    fn a_self_signed_config_builds() {
        for v in [MinTlsVersion::Tls12, MinTlsVersion::Tls13] {
            let s = TlsSettings {
                min_version: v,
                cert: CertSource::SelfSigned,
            };
            s.server_config().unwrap();
        }
    }
}
