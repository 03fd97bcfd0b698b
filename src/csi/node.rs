//! The Node service: stage, publish, stats and expansion on this node.

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::{capability, CsiService, Lane};
use crate::error::{required, CoreError, CoreResult};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::rpc::Type as RpcType;
use crate::proto::node_service_capability::{Rpc, Type as CapType};
use crate::proto::volume_usage::Unit;
use crate::proto::*;
use crate::volume::capability::{check_capability, AccessMode, Capability};
use crate::volume::{Core, PublishRequest, StageRequest, VolumeMode};

/// Set by kubelet in volume_context for CSI ephemeral inline volumes.
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

const ADVERTISED: &[RpcType] = &[
    RpcType::StageUnstageVolume,
    RpcType::GetVolumeStats,
    RpcType::ExpandVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
];

/// The request's capability; node-side checks accept multi-node modes (the
/// controller already decided).
fn node_capability(cap: &Option<VolumeCapability>) -> CoreResult<(Capability, VolumeMode)> {
    let cap = capability(cap.as_ref().ok_or(CoreError::Required {
        field: "volume_capability",
    })?);
    let mode = check_capability(&cap, true)?;
    Ok((cap, mode))
}

fn stage(core: &Core, req: NodeStageVolumeRequest) -> CoreResult<NodeStageVolumeResponse> {
    required("volume_id", &req.volume_id)?;
    required("staging_target_path", &req.staging_target_path)?;
    let (cap, mode) = node_capability(&req.volume_capability)?;
    core.stage(&StageRequest {
        volume_id: req.volume_id,
        staging: PathBuf::from(req.staging_target_path),
        mode,
        access: cap.access,
        fs_type: Some(cap.fs_type).filter(|t| !t.is_empty()),
        mount_flags: cap.mount_flags,
    })?;
    Ok(NodeStageVolumeResponse {})
}

fn publish(core: &Core, req: NodePublishVolumeRequest) -> CoreResult<NodePublishVolumeResponse> {
    required("volume_id", &req.volume_id)?;
    required("target_path", &req.target_path)?;
    let (cap, mode) = node_capability(&req.volume_capability)?;
    let ephemeral = req
        .volume_context
        .get(EPHEMERAL_KEY)
        .is_some_and(|v| v == "true");
    core.publish(&PublishRequest {
        volume_id: req.volume_id,
        target: PathBuf::from(req.target_path),
        staging: Some(req.staging_target_path)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        mode,
        read_only: req.readonly
            || matches!(
                cap.access,
                AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
            ),
        mount_flags: cap.mount_flags,
        single_writer: cap.access == AccessMode::SingleNodeSingleWriter,
        ephemeral: ephemeral.then_some(req.volume_context),
    })?;
    Ok(NodePublishVolumeResponse {})
}

fn stats(core: &Core, req: NodeGetVolumeStatsRequest) -> CoreResult<NodeGetVolumeStatsResponse> {
    required("volume_id", &req.volume_id)?;
    required("volume_path", &req.volume_path)?;
    let s = core.node_stats(&req.volume_id, &PathBuf::from(&req.volume_path))?;
    let mut usage = vec![VolumeUsage {
        available: s.available_bytes as i64,
        total: s.total_bytes as i64,
        used: s.used_bytes as i64,
        unit: Unit::Bytes as i32,
    }];
    if let Some((total, used, free)) = s.inodes {
        usage.push(VolumeUsage {
            available: free as i64,
            total: total as i64,
            used: used as i64,
            unit: Unit::Inodes as i32,
        });
    }
    Ok(NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(VolumeCondition {
            abnormal: s.problem.is_some(),
            message: s.problem.unwrap_or_else(|| "volume is healthy".into()),
        }),
    })
}

fn expand(core: &Core, req: NodeExpandVolumeRequest) -> CoreResult<NodeExpandVolumeResponse> {
    required("volume_id", &req.volume_id)?;
    required("volume_path", &req.volume_path)?;
    let (required_bytes, limit) = match &req.capacity_range {
        Some(r) if r.required_bytes < 0 || r.limit_bytes < 0 => {
            return Err(CoreError::invalid(
                "capacity_range",
                &format!("[{}, {}]", r.required_bytes, r.limit_bytes),
                "must not be negative",
            ))
        }
        Some(r) => (r.required_bytes as u64, r.limit_bytes as u64),
        None => (0, 0),
    };
    let mode = req
        .volume_capability
        .as_ref()
        .map(|c| check_capability(&capability(c), true))
        .transpose()?;
    let size = core.node_expand(
        &req.volume_id,
        &PathBuf::from(&req.volume_path),
        mode,
        required_bytes,
        limit,
    )?;
    Ok(NodeExpandVolumeResponse {
        capacity_bytes: size as i64,
    })
}

#[tonic::async_trait]
impl Node for CsiService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        // Staging an image volume may run e2fsck and resize2fs.
        self.run("NodeStageVolume", &id, Lane::Heavy, move |core| {
            stage(core, req)
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnstageVolume", &id, Lane::Quick, move |core| {
            required("volume_id", &req.volume_id)?;
            required("staging_target_path", &req.staging_target_path)?;
            core.unstage(&req.volume_id, &PathBuf::from(&req.staging_target_path))?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let ephemeral = req
            .volume_context
            .get(EPHEMERAL_KEY)
            .is_some_and(|v| v == "true");
        let lane = if ephemeral { Lane::Heavy } else { Lane::Quick };
        self.run("NodePublishVolume", &id, lane, move |core| {
            publish(core, req)
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnpublishVolume", &id, Lane::Quick, move |core| {
            required("volume_id", &req.volume_id)?;
            required("target_path", &req.target_path)?;
            core.unpublish(&req.volume_id, &PathBuf::from(&req.target_path))?;
            Ok(NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeGetVolumeStats", &id, Lane::Stats, move |core| {
            stats(core, req)
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeExpandVolume", &id, Lane::Heavy, move |core| {
            expand(core, req)
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: ADVERTISED
                .iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.core.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(self.node_topology()),
        }))
    }
}
