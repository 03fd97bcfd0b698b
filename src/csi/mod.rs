//! The CSI service layer: thin translation between gRPC and the core.

mod controller;
mod group;
mod identity;
mod node;
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};

use crate::error::{CoreError, CoreResult};
use crate::metrics::Metrics;
use crate::proto::volume_capability::access_mode::Mode as AccessMode;
use crate::proto::volume_capability::AccessType;
use crate::proto::{Topology, VolumeCapability};
use crate::volume::{Core, VolumeMode};

/// Everything the services share.
#[derive(Clone)]
pub struct CsiService {
    pub core: Arc<Core>,
    pub driver_name: String,
    pub version: String,
    pub metrics: Arc<Metrics>,
    /// Leave controller expansion unadvertised, so a cluster-wide resizer
    /// hands every expansion to NodeExpandVolume on the volume's own node.
    pub node_only_expansion: bool,
}

impl CsiService {
    pub fn new(
        core: Arc<Core>,
        driver_name: String,
        version: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        CsiService {
            core,
            driver_name,
            version,
            metrics,
            node_only_expansion: false,
        }
    }

    /// Runs blocking core work off the reactor, and logs and measures the RPC.
    async fn run<T, F>(
        &self,
        method: &'static str,
        subject: &str,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> CoreResult<T> + Send + 'static,
    {
        let core = self.core.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || work(&core))
            .await
            .unwrap_or_else(|e| Err(CoreError::Internal(format!("{method} panicked: {e}"))));
        let elapsed = started.elapsed();
        let result = result.map_err(Status::from);
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe_rpc(method, code, elapsed);
        let ms = elapsed.as_secs_f64() * 1000.0;
        match &result {
            Ok(_) => tracing::info!(method, subject, ms, code = ?code, "rpc"),
            Err(s) if matches!(code, tonic::Code::Internal | tonic::Code::Unavailable) => {
                tracing::error!(method, subject, ms, code = ?code, error = s.message(), "rpc")
            }
            Err(s) => tracing::warn!(method, subject, ms, code = ?code, error = s.message(), "rpc"),
        }
        result.map(Response::new)
    }

    /// Topology segment of this node.
    fn node_topology(&self) -> Topology {
        Topology {
            segments: HashMap::from([(crate::TOPOLOGY_KEY.to_owned(), self.core.node_id.clone())]),
        }
    }
}

/// Access modes a node-local volume can serve.
fn single_node(mode: AccessMode) -> bool {
    matches!(
        mode,
        AccessMode::SingleNodeWriter
            | AccessMode::SingleNodeReaderOnly
            | AccessMode::SingleNodeSingleWriter
            | AccessMode::SingleNodeMultiWriter
    )
}

/// Checks one capability and returns the volume mode it asks for.
fn check_capability(cap: &VolumeCapability, shared_pool: bool) -> CoreResult<VolumeMode> {
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| AccessMode::try_from(m.mode).ok())
        .unwrap_or(AccessMode::Unknown);
    if mode == AccessMode::Unknown {
        return Err(CoreError::InvalidArgument(
            "volume capability needs an access_mode".into(),
        ));
    }
    if !single_node(mode) && !shared_pool {
        return Err(CoreError::InvalidArgument(format!(
            "access mode {} is not supported: volumes of this pool live on one node (use a pool marked shared for multi-node access)",
            mode.as_str_name()
        )));
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(VolumeMode::Block),
        Some(AccessType::Mount(_)) => Ok(VolumeMode::Filesystem),
        None => Err(CoreError::InvalidArgument(
            "volume capability needs an access_type (block or mount)".into(),
        )),
    }
}

/// Checks a list of capabilities; they must agree on one volume mode.
fn check_capabilities(caps: &[VolumeCapability], shared_pool: bool) -> CoreResult<VolumeMode> {
    if caps.is_empty() {
        return Err(CoreError::InvalidArgument(
            "volume_capabilities are required".into(),
        ));
    }
    let mut mode = None;
    for cap in caps {
        let m = check_capability(cap, shared_pool)?;
        if mode.is_some_and(|x| x != m) {
            return Err(CoreError::InvalidArgument(
                "volume_capabilities mix block and mount access types".into(),
            ));
        }
        mode = Some(m);
    }
    Ok(mode.expect("caps is not empty"))
}

fn mount_fs_type(caps: &[VolumeCapability]) -> Option<String> {
    caps.iter().find_map(|c| match &c.access_type {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => Some(m.fs_type.clone()),
        _ => None,
    })
}

fn mount_flags(cap: &VolumeCapability) -> Vec<String> {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    }
}
