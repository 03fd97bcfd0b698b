//! Prometheus metrics: pool figures, volume counts and RPC latency.

pub mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::volume::{Core, VolumeMode};

pub use tls::{CertSource, MinTlsVersion, TlsError, TlsSettings};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    pool: String,
    mode: String,
}

pub struct Metrics {
    registry: Registry,
    rpc_seconds: Family<RpcLabels, Histogram>,
    shared_with_os: Family<PoolLabels, Gauge>,
    capacity: Family<PoolLabels, Gauge<u64, AtomicU64>>,
    available: Family<PoolLabels, Gauge<u64, AtomicU64>>,
    volumes: Family<VolumeLabels, Gauge>,
    unremovable: Family<PoolLabels, Gauge>,
    abnormal: Family<PoolLabels, Gauge>,
    /// A directory on the node's OS filesystem.
    os_reference: PathBuf,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.5, 14))
        });
        registry.register(
            "hostpath_csi_rpc_duration_seconds",
            "CSI RPC latency by method and gRPC code",
            rpc_seconds.clone(),
        );
        let shared_with_os = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "kubevirt_hpp_pool_path_shared_with_os",
            "1 when the storage pool shares its filesystem with the OS root",
            shared_with_os.clone(),
        );
        let capacity = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "hostpath_csi_pool_capacity_bytes",
            "Size of the filesystem holding the pool",
            capacity.clone(),
        );
        let available = Family::<PoolLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "hostpath_csi_pool_available_bytes",
            "Bytes available to new data in the pool",
            available.clone(),
        );
        let volumes = Family::<VolumeLabels, Gauge>::default();
        registry.register(
            "hostpath_csi_volumes",
            "Volumes per pool and mode",
            volumes.clone(),
        );
        let unremovable = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "hostpath_csi_unremovable_leftovers",
            "Leftovers of deleted volumes or interrupted work the driver could not remove (a mount inside, or entries that keep changing); an admin should look",
            unremovable.clone(),
        );
        let abnormal = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "hostpath_csi_abnormal_volumes",
            "Volumes whose backing store or metadata is missing or damaged (kept, never deleted for it)",
            abnormal.clone(),
        );
        Metrics {
            registry,
            unremovable,
            abnormal,
            rpc_seconds,
            shared_with_os,
            capacity,
            available,
            volumes,
            os_reference: PathBuf::from("/"),
        }
    }

    pub fn observe_rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_seconds
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Compares pools with the filesystem holding `dir` instead of `/`.
    pub fn with_os_reference(mut self, dir: PathBuf) -> Self {
        self.os_reference = dir;
        self
    }

    /// Refreshes pool figures from the core and renders the text format.
    pub fn render(&self, core: &Core) -> String {
        for pool in core.pools() {
            let labels = PoolLabels {
                pool: pool.name.clone(),
            };
            self.shared_with_os
                .get_or_create(&labels)
                .set(pool.shares_os_filesystem(&self.os_reference) as i64);
            if let Ok(u) = pool.usage() {
                self.capacity.get_or_create(&labels).set(u.total_bytes);
                self.available.get_or_create(&labels).set(u.available_bytes);
            }
            self.unremovable
                .get_or_create(&labels)
                .set(pool.unremovable_leftovers() as i64);
            self.abnormal.get_or_create(&labels).set(0);
            for mode in ["filesystem", "block"] {
                self.volumes
                    .get_or_create(&VolumeLabels {
                        pool: pool.name.clone(),
                        mode: mode.into(),
                    })
                    .set(0);
            }
        }
        if let Ok(all) = core.all_volumes() {
            for v in all {
                if core.volume_problem(&v).is_some() {
                    self.abnormal
                        .get_or_create(&PoolLabels {
                            pool: v.meta.pool.clone(),
                        })
                        .inc();
                }
                let mode = match v.meta.mode {
                    VolumeMode::Filesystem => "filesystem",
                    VolumeMode::Block => "block",
                };
                self.volumes
                    .get_or_create(&VolumeLabels {
                        pool: v.meta.pool.clone(),
                        mode: mode.into(),
                    })
                    .inc();
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Where and how the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// HTTPS with these settings; plain HTTP when `None`.
    pub tls: Option<TlsSettings>,
}

/// Why the endpoint stopped.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot accept a connection: {0}")]
    Accept(std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Binds `addr`; an unspecified IPv6 address (Go's `:8443`, every address)
/// falls back to IPv4 on nodes without IPv6.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::info!(%addr, error = %e, "no IPv6 here; listening on IPv4 only");
            tokio::net::TcpListener::bind(v4)
                .await
                .map_err(|source| MetricsError::Bind { addr: v4, source })
        }
        Err(source) => Err(MetricsError::Bind { addr, source }),
    }
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    metrics: Arc<Metrics>,
    core: Arc<Core>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let response = if req.uri().path() == "/metrics" {
        let text = tokio::task::spawn_blocking(move || metrics.render(&core))
            .await
            .unwrap_or_default();
        hyper::Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(text)))
    } else {
        hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found\n")))
    };
    Ok(response.expect("static response parts"))
}

/// Serves one connection (plain or already TLS-wrapped) with HTTP/1.1.
async fn serve_connection<S>(stream: S, metrics: Arc<Metrics>, core: Arc<Core>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |req| respond(req, metrics.clone(), core.clone()));
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "metrics connection ended");
    }
}

/// A client that never finishes its handshake does not hold a task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` over HTTP or HTTPS until the process ends.
pub async fn serve(
    endpoint: Endpoint,
    metrics: Arc<Metrics>,
    core: Arc<Core>,
) -> Result<(), MetricsError> {
    let acceptor = match &endpoint.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls.server_config()?)),
        None => None,
    };
    let listener = bind(endpoint.addr).await?;
    let local = listener.local_addr().unwrap_or(endpoint.addr);
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!(addr = %local, scheme, "serving metrics");
    loop {
        let (stream, peer) = listener.accept().await.map_err(MetricsError::Accept)?;
        let (metrics, core, acceptor) = (metrics.clone(), core.clone(), acceptor.clone());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(stream, metrics, core).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, metrics, core).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "metrics TLS handshake timed out"),
            }
        });
    }
}
