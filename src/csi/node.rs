use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::{check_capability, mount_flags, mount_fs_type, CsiService};
use crate::error::{CoreError, CoreResult};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::rpc::Type as RpcType;
use crate::proto::node_service_capability::{Rpc, Type as CapType};
use crate::proto::volume_capability::access_mode::Mode as AccessMode;
use crate::proto::volume_usage::Unit;
use crate::proto::*;
use crate::volume::publish::PublishRequest;

/// Set by kubelet in volume_context for CSI ephemeral inline volumes.
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

const ADVERTISED: &[RpcType] = &[
    RpcType::StageUnstageVolume,
    RpcType::GetVolumeStats,
    RpcType::ExpandVolume,
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
];

fn required(what: &str, value: &str) -> CoreResult<()> {
    if value.is_empty() {
        return Err(CoreError::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

fn capability(cap: &Option<VolumeCapability>) -> CoreResult<&VolumeCapability> {
    cap.as_ref()
        .ok_or_else(|| CoreError::InvalidArgument("volume_capability is required".into()))
}

/// Node-side checks accept multi-node modes: the controller already decided.
fn node_mode(cap: &VolumeCapability) -> CoreResult<crate::volume::VolumeMode> {
    check_capability(cap, true)
}

#[tonic::async_trait]
impl Node for CsiService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeStageVolume", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            required("staging_target_path", &req.staging_target_path)?;
            let cap = capability(&req.volume_capability)?;
            let mode = node_mode(cap)?;
            core.stage(
                &req.volume_id,
                &PathBuf::from(&req.staging_target_path),
                mode,
                mount_fs_type(std::slice::from_ref(cap)).as_deref(),
                &mount_flags(cap),
            )?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnstageVolume", &id, move |core| {
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
        self.run("NodePublishVolume", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            required("target_path", &req.target_path)?;
            let cap = capability(&req.volume_capability)?;
            let mode = node_mode(cap)?;
            let access = cap
                .access_mode
                .as_ref()
                .and_then(|m| AccessMode::try_from(m.mode).ok())
                .unwrap_or(AccessMode::Unknown);
            if req.volume_context.get(EPHEMERAL_KEY).map(String::as_str) == Some("true") {
                core.ensure_ephemeral(&req.volume_id, mode, &req.volume_context)?;
            }
            core.publish(&PublishRequest {
                volume_id: req.volume_id.clone(),
                target: PathBuf::from(&req.target_path),
                staging: Some(req.staging_target_path.clone())
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
                mode,
                read_only: req.readonly || access == AccessMode::SingleNodeReaderOnly,
                mount_flags: mount_flags(cap),
                single_writer: access == AccessMode::SingleNodeSingleWriter,
            })?;
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnpublishVolume", &id, move |core| {
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
        self.run("NodeGetVolumeStats", &id, move |core| {
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
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeExpandVolume", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            required("volume_path", &req.volume_path)?;
            if let Some(range) = &req.capacity_range {
                if range.required_bytes < 0 || range.limit_bytes < 0 {
                    return Err(CoreError::InvalidArgument(
                        "capacity_range must not be negative".into(),
                    ));
                }
            }
            let (required, limit) = req.capacity_range.as_ref().map_or((0, 0), |r| {
                (r.required_bytes.max(0) as u64, r.limit_bytes.max(0) as u64)
            });
            let mode = req.volume_capability.as_ref().map(node_mode).transpose()?;
            let size = core.node_expand(
                &req.volume_id,
                &PathBuf::from(&req.volume_path),
                mode,
                required,
                limit,
            )?;
            Ok(NodeExpandVolumeResponse {
                capacity_bytes: size as i64,
            })
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
