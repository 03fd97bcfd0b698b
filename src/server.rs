//! The gRPC server on a Unix socket.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::PoolConfig;
use crate::csi::CsiService;
use crate::metrics::Metrics;
use crate::proto::controller_server::ControllerServer;
use crate::proto::group_controller_server::GroupControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;
use crate::volume::{Core, Settings, StartError};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--endpoint {0:?} must be unix:///absolute/path")]
    BadEndpoint(String),
    #[error("--nodeid must not be empty")]
    NoNodeId,
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "another driver is serving on {path} (it accepts connections); refusing to take its socket"
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot create the socket {path}: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("cannot open storage pools: {0}")]
    Pools(#[from] StartError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub endpoint: String,
    pub node_id: String,
    pub driver_name: String,
    pub version: String,
    pub pools: Vec<PoolConfig>,
    /// The Prometheus endpoint, off when `None`.
    pub metrics: Option<crate::metrics::Endpoint>,
    pub node_only_expansion: bool,
    pub settings: Settings,
}

/// `unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a bare path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(ServeError::BadEndpoint(endpoint.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// Refuses a socket another live driver accepts connections on; a stale
/// socket file (nobody listening) is removed.
fn claim_socket_path(path: &Path) -> Result<(), ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(st) if st.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|e| ServeError::Socket {
                path: path.to_path_buf(),
                why: format!("cannot remove the stale socket: {e}"),
            })
        }
        Ok(_) => Err(ServeError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// Binds the socket with mode 0660.
fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let failed = |why: String| ServeError::Socket {
        path: path.to_path_buf(),
        why,
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    if let Err(e) = nix::unistd::access(
        parent,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    ) {
        return Err(failed(format!(
            "directory {} is not writable ({e})",
            parent.display()
        )));
    }
    // The umask makes the socket 0660 from the start: no window where it is wider.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener.map_err(|e| failed(e.to_string()))
}

/// Runs the driver until `shutdown` resolves; in-flight RPCs finish first.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket_path(&opts.endpoint)?;
    let pools = opts.pools.clone();
    if opts.node_id.trim().is_empty() {
        return Err(ServeError::NoNodeId);
    }
    claim_socket_path(&path)?;
    if opts.node_id.len() > 63 {
        // It becomes the value of a node label, which Kubernetes caps at 63.
        tracing::warn!(node = %opts.node_id, "--nodeid is longer than 63 characters: Kubernetes cannot label the node with topology {}, so volumes cannot be scheduled to it", crate::TOPOLOGY_KEY);
    }
    let (node_id, settings) = (opts.node_id.clone(), opts.settings.clone());
    let core = tokio::task::spawn_blocking(move || Core::new(node_id, &pools, settings)).await??;
    for pool in core.pools() {
        tracing::info!(pool = %pool.name, path = %pool.root.display(), fs = %pool.fs_type(), shared = pool.shared, "pool configured");
    }
    // As upstream: a pool "shares the OS filesystem" when it lives on the
    // filesystem of the socket's directory, a kubelet dir on the node's disk.
    let os_reference = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let metrics = Arc::new(Metrics::new().with_os_reference(os_reference));
    if let Some(endpoint) = opts.metrics.clone() {
        let (m, c) = (metrics.clone(), core.clone());
        let addr = endpoint.addr;
        // As upstream: a metrics endpoint that cannot start is logged, and
        // the CSI service goes on.
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(endpoint, m, c).await {
                tracing::error!(%addr, error = %e, "metrics server stopped");
            }
        });
    }
    let mut service = CsiService::new(
        core,
        opts.driver_name.clone(),
        opts.version.clone(),
        metrics,
    );
    service.node_only_expansion = opts.node_only_expansion;
    let listener = bind_socket(&path)?;
    tracing::info!(endpoint = %path.display(), driver = %opts.driver_name, node = %opts.node_id, "CSI server listening");
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service.clone()))
        .add_service(ControllerServer::new(service.clone()))
        .add_service(NodeServer::new(service.clone()))
        .add_service(GroupControllerServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    tracing::info!("CSI server stopped");
    Ok(result?)
}
