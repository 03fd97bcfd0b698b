use std::collections::HashMap;

use tonic::{Request, Response, Status};

use super::{check_capabilities, mount_fs_type, CsiService};
use crate::error::{CoreError, CoreResult};
use crate::names::is_valid_name;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::rpc::Type as RpcType;
use crate::proto::controller_service_capability::{Rpc, Type as CapType};
use crate::proto::volume_capability::access_mode::Mode as AccessModeKind;
use crate::proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use crate::proto::*;
use crate::volume::{
    params, snapshot::Snapshot, ContentSource, Core, CreateParams, CreateRequest, Volume,
};

const ADVERTISED: &[RpcType] = &[
    RpcType::CreateDeleteVolume,
    RpcType::ListVolumes,
    RpcType::GetCapacity,
    RpcType::CreateDeleteSnapshot,
    RpcType::ListSnapshots,
    RpcType::GetSnapshot,
    RpcType::CloneVolume,
    RpcType::ExpandVolume,
    RpcType::GetVolume,
    RpcType::SingleNodeMultiWriter,
    RpcType::ModifyVolume,
];

fn required(what: &str, value: &str) -> CoreResult<()> {
    if value.is_empty() {
        return Err(CoreError::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

/// The CSI view of a volume.
pub(super) fn volume_message(core: &Core, v: &Volume) -> crate::proto::Volume {
    let shared = core.pool_of(v).map(|p| p.shared).unwrap_or(false);
    crate::proto::Volume {
        capacity_bytes: v.meta.capacity_bytes as i64,
        volume_id: v.meta.id.clone(),
        volume_context: HashMap::from([(params::STORAGE_POOL.to_owned(), v.meta.pool.clone())]),
        content_source: v.meta.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match s {
                ContentSource::Volume(id) => SourceType::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
                ContentSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
            }),
        }),
        accessible_topology: if shared {
            Vec::new()
        } else {
            vec![Topology {
                segments: HashMap::from([(crate::TOPOLOGY_KEY.to_owned(), core.node_id.clone())]),
            }]
        },
    }
}

pub(super) fn snapshot_message(s: &Snapshot) -> crate::proto::Snapshot {
    crate::proto::Snapshot {
        size_bytes: s.meta.size_bytes as i64,
        snapshot_id: s.meta.id.clone(),
        source_volume_id: s.meta.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.meta.created_unix,
            nanos: s.meta.created_nanos,
        }),
        ready_to_use: true,
        group_snapshot_id: s.meta.group_id.clone().unwrap_or_default(),
    }
}

/// True when a topology names this node.
fn names_node(core: &Core, t: &Topology) -> bool {
    t.segments.get(crate::TOPOLOGY_KEY) == Some(&core.node_id)
}

fn source_of(src: &Option<VolumeContentSource>) -> CoreResult<Option<ContentSource>> {
    let Some(src) = src else { return Ok(None) };
    match &src.r#type {
        Some(SourceType::Volume(v)) => {
            required("volume_content_source.volume.volume_id", &v.volume_id)?;
            if !is_valid_name(&v.volume_id) {
                return Err(CoreError::NotFound(format!(
                    "source volume {:?} does not exist",
                    v.volume_id
                )));
            }
            Ok(Some(ContentSource::Volume(v.volume_id.clone())))
        }
        Some(SourceType::Snapshot(s)) => {
            required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
            if !is_valid_name(&s.snapshot_id) {
                return Err(CoreError::NotFound(format!(
                    "source snapshot {:?} does not exist",
                    s.snapshot_id
                )));
            }
            Ok(Some(ContentSource::Snapshot(s.snapshot_id.clone())))
        }
        None => Err(CoreError::InvalidArgument(
            "volume_content_source names no source".into(),
        )),
    }
}

fn create(core: &Core, req: CreateVolumeRequest) -> CoreResult<CreateVolumeResponse> {
    required("name", &req.name)?;
    crate::names::validate_name("name", &req.name)?;
    let mut create_params = CreateParams::parse(&req.parameters)?;
    // The spec: mutable_parameters take precedence over parameters.
    if let Some(prealloc) = params::parse_mutable(&req.mutable_parameters)? {
        create_params.preallocate = prealloc;
    }
    let pool = core.pool(create_params.storage_pool.as_deref())?;
    let mode = check_capabilities(&req.volume_capabilities, pool.shared)?;
    if let Some(reqs) = &req.accessibility_requirements {
        if !pool.shared
            && !reqs.requisite.is_empty()
            && !reqs.requisite.iter().any(|t| names_node(core, t))
        {
            return Err(CoreError::ResourceExhausted(format!(
                "node {} is not among the requisite topologies; pool {} is local to it",
                core.node_id, pool.name
            )));
        }
    }
    let range = req.capacity_range.unwrap_or_default();
    let request = CreateRequest {
        name: req.name.clone(),
        required_bytes: range.required_bytes,
        limit_bytes: range.limit_bytes,
        mode,
        fs_type: mount_fs_type(&req.volume_capabilities),
        params: create_params,
        source: source_of(&req.volume_content_source)?,
        ephemeral: false,
    };
    let volume = core.create_volume(&request)?;
    Ok(CreateVolumeResponse {
        volume: Some(volume_message(core, &volume)),
    })
}

#[tonic::async_trait]
impl Controller for CsiService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        self.run("CreateVolume", &name, move |core| create(core, req))
            .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run("DeleteVolume", &id.clone(), move |core| {
            required("volume_id", &id)?;
            core.delete_volume(&id)?;
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volumes are node-local; there is nothing to attach",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volumes are node-local; there is nothing to detach",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("ValidateVolumeCapabilities", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            if req.volume_capabilities.is_empty() {
                return Err(CoreError::InvalidArgument(
                    "volume_capabilities are required".into(),
                ));
            }
            // A capability without an access mode or type is malformed
            // (INVALID_ARGUMENT); one this volume cannot serve is answered
            // below as unconfirmed.
            for cap in &req.volume_capabilities {
                let has_mode = cap
                    .access_mode
                    .as_ref()
                    .is_some_and(|m| m.mode != AccessModeKind::Unknown as i32);
                if !has_mode || cap.access_type.is_none() {
                    return Err(CoreError::InvalidArgument(
                        "each volume capability needs an access_mode and an access_type".into(),
                    ));
                }
            }
            let volume = core.get_volume(&req.volume_id)?;
            let pool = core.pool_of(&volume)?;
            let unsupported = |message: String| ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            };
            // Creation parameters are confirmed only when this volume could
            // have been made with them.
            if let Err(why) = volume.could_be_made_with(&req.parameters) {
                return Ok(unsupported(why));
            }
            if let Some(p) = req.volume_context.get(params::STORAGE_POOL) {
                if p != &volume.meta.pool {
                    return Ok(unsupported(format!(
                        "volume {} is in pool {}, not {p}",
                        volume.meta.id, volume.meta.pool
                    )));
                }
            }
            // An image volume holds one filesystem; it cannot be mounted as another.
            let asked_fs = mount_fs_type(&req.volume_capabilities);
            if let (Some(have), Some(asked)) = (&volume.meta.fs_type, &asked_fs) {
                if have != asked {
                    return Ok(unsupported(format!(
                        "volume {} holds {have}, not {asked}",
                        volume.meta.id
                    )));
                }
            }
            match check_capabilities(&req.volume_capabilities, pool.shared) {
                Ok(mode) if mode == volume.meta.mode => Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: req.mutable_parameters,
                    }),
                    message: String::new(),
                }),
                Ok(mode) => Ok(unsupported(format!(
                    "volume {} is {:?} mode, not {mode:?}",
                    volume.meta.id, volume.meta.mode
                ))),
                Err(e) => Ok(unsupported(e.to_string())),
            }
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        self.run("ListVolumes", "", move |core| {
            let (page, next_token) = core.list_volumes(&req.starting_token, req.max_entries)?;
            Ok(ListVolumesResponse {
                entries: page
                    .iter()
                    .map(|v| list_volumes_response::Entry {
                        volume: Some(volume_message(core, v)),
                        status: None,
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        self.run("GetCapacity", "", move |core| {
            let create_params = CreateParams::parse(&req.parameters)?;
            let pool = core.pool(create_params.storage_pool.as_deref())?;
            if !req.volume_capabilities.is_empty() {
                check_capabilities(&req.volume_capabilities, pool.shared)?;
            }
            if let Some(t) = &req.accessible_topology {
                if !pool.shared && !names_node(core, t) {
                    return Ok(GetCapacityResponse {
                        available_capacity: 0,
                        maximum_volume_size: Some(0),
                        minimum_volume_size: None,
                    });
                }
            }
            let usage = pool.usage()?;
            Ok(GetCapacityResponse {
                available_capacity: usage.available_bytes as i64,
                maximum_volume_size: Some(usage.available_bytes as i64),
                minimum_volume_size: None,
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: ADVERTISED
                .iter()
                .filter(|t| !(self.node_only_expansion && **t == RpcType::ExpandVolume))
                .map(|t| ControllerServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        self.run("CreateSnapshot", &name, move |core| {
            required("name", &req.name)?;
            required("source_volume_id", &req.source_volume_id)?;
            let s = core.create_snapshot(&req.name, &req.source_volume_id, None)?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(snapshot_message(&s)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        self.run("DeleteSnapshot", &id.clone(), move |core| {
            core.delete_standalone_snapshot(&id)?;
            Ok(DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        self.run("ListSnapshots", "", move |core| {
            let (page, next_token) = core.list_snapshots(
                &req.snapshot_id,
                &req.source_volume_id,
                &req.starting_token,
                req.max_entries,
            )?;
            Ok(ListSnapshotsResponse {
                entries: page
                    .iter()
                    .map(|s| list_snapshots_response::Entry {
                        snapshot: Some(snapshot_message(s)),
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        self.run("GetSnapshot", &id.clone(), move |core| {
            required("snapshot_id", &id)?;
            let s = core.get_snapshot(&id)?;
            Ok(GetSnapshotResponse {
                snapshot: Some(snapshot_message(&s)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("ControllerExpandVolume", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            let range = req
                .capacity_range
                .ok_or_else(|| CoreError::InvalidArgument("capacity_range is required".into()))?;
            if let Some(cap) = &req.volume_capability {
                let volume = core.get_volume(&req.volume_id)?;
                let shared = core.pool_of(&volume)?.shared;
                let mode = super::check_capability(cap, shared)?;
                if mode != volume.meta.mode {
                    return Err(CoreError::InvalidArgument(format!(
                        "volume {} is {:?} mode, the capability says {mode:?}",
                        volume.meta.id, volume.meta.mode
                    )));
                }
            }
            let e = core.expand_volume(&req.volume_id, range.required_bytes, range.limit_bytes)?;
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: e.capacity_bytes as i64,
                node_expansion_required: e.node_expansion_required,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run("ControllerGetVolume", &id.clone(), move |core| {
            required("volume_id", &id)?;
            let v = core.get_volume(&id)?;
            Ok(ControllerGetVolumeResponse {
                volume: Some(volume_message(core, &v)),
                status: Some(controller_get_volume_response::VolumeStatus::default()),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("ControllerModifyVolume", &id, move |core| {
            required("volume_id", &req.volume_id)?;
            core.modify_volume(&req.volume_id, &req.mutable_parameters)?;
            Ok(ControllerModifyVolumeResponse {})
        })
        .await
    }
}
