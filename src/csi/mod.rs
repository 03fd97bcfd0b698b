//! The CSI service layer: thin translation between gRPC and the core.
//!
//! Each RPC checks its fields, runs core work off the async reactor in a
//! lane that fits the work, and maps the core's error to a status in one
//! place (`status`). Control RPCs (Probe, capabilities, plugin and node
//! info) answer inline and never wait behind volume work; heavy work
//! (copies, mkfs, stats walks) runs in bounded lanes of its own, so a storm
//! of it cannot take every thread the quick work needs.

mod controller;
mod group;
mod identity;
mod node;
pub mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tonic::{Response, Status};

use crate::error::{CoreError, CoreResult};
use crate::metrics::Metrics;
use crate::proto::volume_capability::access_mode::Mode as ProtoMode;
use crate::proto::volume_capability::AccessType;
use crate::proto::{Topology, VolumeCapability};
use crate::volume::capability::{AccessMode, Capability};
use crate::volume::{Core, VolumeMode};

/// Where an RPC's core work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Metadata work that takes milliseconds.
    Quick,
    /// Copies, filesystem tools, big allocations.
    Heavy,
    /// NodeGetVolumeStats walks.
    Stats,
}

/// Bounds on concurrent work per lane; together they stay below the
/// runtime's blocking thread limit, so no lane can starve another.
pub struct Lanes {
    quick: Semaphore,
    heavy: Semaphore,
    stats: Semaphore,
}

impl Default for Lanes {
    fn default() -> Self {
        Lanes {
            quick: Semaphore::new(16),
            heavy: Semaphore::new(6),
            stats: Semaphore::new(4),
        }
    }
}

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
    lanes: Arc<Lanes>,
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
            lanes: Arc::new(Lanes::default()),
        }
    }

    /// Runs core work in its lane, off the reactor; logs and measures the RPC.
    async fn run<T, F>(
        &self,
        method: &'static str,
        subject: &str,
        lane: Lane,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> CoreResult<T> + Send + 'static,
    {
        let started = Instant::now();
        let semaphore = match lane {
            Lane::Quick => &self.lanes.quick,
            Lane::Heavy => &self.lanes.heavy,
            Lane::Stats => &self.lanes.stats,
        };
        let permit = semaphore.acquire().await.expect("lanes are never closed");
        let core = self.core.clone();
        let result = tokio::task::spawn_blocking(move || work(&core))
            .await
            .unwrap_or_else(|e| Err(CoreError::Internal(format!("{method} panicked: {e}"))));
        drop(permit);
        self.finish(method, subject, started, result.map_err(Status::from))
    }

    /// Records an RPC's outcome: the latency metric and one log line.
    fn finish<T>(
        &self,
        method: &'static str,
        subject: &str,
        started: Instant,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let elapsed = started.elapsed();
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
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

/// A capability as the core sees it.
fn capability(cap: &VolumeCapability) -> Capability {
    let proto = cap
        .access_mode
        .as_ref()
        .and_then(|m| ProtoMode::try_from(m.mode).ok())
        .unwrap_or(ProtoMode::Unknown);
    let access = match proto {
        ProtoMode::Unknown => AccessMode::Unknown,
        ProtoMode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        ProtoMode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        ProtoMode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        ProtoMode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        ProtoMode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        ProtoMode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        ProtoMode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
    };
    let (mode, fs_type, mount_flags) = match &cap.access_type {
        Some(AccessType::Block(_)) => (Some(VolumeMode::Block), String::new(), Vec::new()),
        Some(AccessType::Mount(m)) => (
            Some(VolumeMode::Filesystem),
            m.fs_type.clone(),
            m.mount_flags.clone(),
        ),
        None => (None, String::new(), Vec::new()),
    };
    Capability {
        access,
        mode,
        fs_type,
        mount_flags,
        access_name: proto.as_str_name(),
    }
}

fn capabilities(caps: &[VolumeCapability]) -> Vec<Capability> {
    caps.iter().map(capability).collect()
}
