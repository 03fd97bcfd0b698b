//! The Controller service: volumes, snapshots, capacity.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use super::{capabilities, CsiService, Lane};
use crate::error::{required, CoreError, CoreResult};
use crate::names::is_valid_name;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::rpc::Type as RpcType;
use crate::proto::controller_service_capability::{Rpc, Type as CapType};
use crate::proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use crate::proto::*;
use crate::volume::capability::{
    check_capabilities, check_capability, check_layout_access, fs_type_of, Validation,
};
use crate::volume::snapshot::{Snapshot, Take};
use crate::volume::{params, ContentSource, Core, CreateParams, CreateRequest, Volume};

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
    RpcType::VolumeCondition,
    RpcType::SingleNodeMultiWriter,
    RpcType::ModifyVolume,
];

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

fn condition(core: &Core, v: &Volume) -> VolumeCondition {
    let problem = core.volume_problem(v);
    VolumeCondition {
        abnormal: problem.is_some(),
        message: problem.unwrap_or_else(|| "volume is healthy".into()),
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

fn source_of(src: &Option<VolumeContentSource>) -> CoreResult<Option<ContentSource>> {
    let Some(src) = src else { return Ok(None) };
    let (kind, id) = match &src.r#type {
        Some(SourceType::Volume(v)) => ("volume_content_source.volume.volume_id", &v.volume_id),
        Some(SourceType::Snapshot(s)) => {
            ("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)
        }
        None => {
            return Err(CoreError::Unacceptable(
                "volume_content_source names no source".into(),
            ))
        }
    };
    required(kind, id)?;
    let valid = is_valid_name(id);
    Ok(Some(match &src.r#type {
        // A name no volume can have does not exist: NOT_FOUND.
        Some(SourceType::Volume(_)) if !valid => {
            return Err(missing_source(crate::error::Object::SourceVolume, id))
        }
        Some(SourceType::Snapshot(_)) if !valid => {
            return Err(missing_source(crate::error::Object::SourceSnapshot, id))
        }
        Some(SourceType::Volume(_)) => ContentSource::Volume(id.clone()),
        _ => ContentSource::Snapshot(id.clone()),
    }))
}

fn missing_source(kind: crate::error::Object, id: &str) -> CoreError {
    CoreError::Missing {
        kind,
        id: id.chars().take(64).collect(),
        node: "this node".into(),
    }
}

/// The node values of the topology key in a request's requisite topologies.
fn requisite_nodes(reqs: &Option<TopologyRequirement>) -> Vec<Option<String>> {
    reqs.iter()
        .flat_map(|r| r.requisite.iter())
        .map(|t| t.segments.get(crate::TOPOLOGY_KEY).cloned())
        .collect()
}

fn create(core: &Core, req: CreateVolumeRequest) -> CoreResult<CreateVolumeResponse> {
    required("name", &req.name)?;
    crate::names::validate_name("name", &req.name)?;
    let params = CreateParams::parse_with_mutable(&req.parameters, &req.mutable_parameters)?;
    let pool = core.pool(params.storage_pool.as_deref())?;
    let caps = capabilities(&req.volume_capabilities);
    let mode = check_capabilities(&caps, pool.shared)?;
    let access: Vec<_> = caps.iter().map(|c| c.access).collect();
    check_layout_access(&access, params.layout_for(mode)?)?;
    core.check_topology(
        pool.shared,
        &requisite_nodes(&req.accessibility_requirements),
    )?;
    let range = req.capacity_range.unwrap_or_default();
    let volume = core.create_volume(&CreateRequest {
        name: req.name.clone(),
        required_bytes: range.required_bytes,
        limit_bytes: range.limit_bytes,
        mode,
        fs_type: fs_type_of(&caps),
        params,
        source: source_of(&req.volume_content_source)?,
        ephemeral: false,
    })?;
    Ok(CreateVolumeResponse {
        volume: Some(volume_message(core, &volume)),
    })
}

/// Copies and filesystems are heavy; an empty directory or sparse file is not.
fn create_lane(req: &CreateVolumeRequest) -> Lane {
    let heavy_param = |k: &str, v: &str| {
        req.parameters
            .get(k)
            .or(req.mutable_parameters.get(k))
            .is_some_and(|x| x == v)
    };
    if req.volume_content_source.is_some()
        || heavy_param(params::LAYOUT, "image")
        || heavy_param(params::PREALLOCATION, "true")
    {
        Lane::Heavy
    } else {
        Lane::Quick
    }
}

fn validate(
    core: &Core,
    req: ValidateVolumeCapabilitiesRequest,
) -> CoreResult<ValidateVolumeCapabilitiesResponse> {
    required("volume_id", &req.volume_id)?;
    let caps = capabilities(&req.volume_capabilities);
    Ok(
        match core.validate_capabilities(
            &req.volume_id,
            &caps,
            &req.parameters,
            &req.volume_context,
        )? {
            Validation::Confirmed => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Validation::Unconfirmed(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        },
    )
}

fn capacity(core: &Core, req: GetCapacityRequest) -> CoreResult<GetCapacityResponse> {
    let params = CreateParams::parse(&req.parameters)?;
    let pool = core.pool(params.storage_pool.as_deref())?;
    if !req.volume_capabilities.is_empty() {
        check_capabilities(&capabilities(&req.volume_capabilities), pool.shared)?;
    }
    let elsewhere = req
        .accessible_topology
        .as_ref()
        .is_some_and(|t| t.segments.get(crate::TOPOLOGY_KEY) != Some(&core.node_id));
    let c = core.capacity(pool, elsewhere && !pool.shared)?;
    Ok(GetCapacityResponse {
        available_capacity: c.available as i64,
        maximum_volume_size: Some(c.maximum as i64),
        minimum_volume_size: None,
    })
}

fn expand(
    core: &Core,
    req: ControllerExpandVolumeRequest,
) -> CoreResult<ControllerExpandVolumeResponse> {
    required("volume_id", &req.volume_id)?;
    let range = req.capacity_range.ok_or(CoreError::Required {
        field: "capacity_range",
    })?;
    if let Some(cap) = &req.volume_capability {
        let volume = core.get_volume(&req.volume_id)?;
        let shared = core.pool_of(&volume)?.shared;
        let mode = check_capability(&super::capability(cap), shared)?;
        if mode != volume.meta.mode {
            return Err(CoreError::Unacceptable(format!(
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
}

#[tonic::async_trait]
impl Controller for CsiService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let (name, lane) = (req.name.clone(), create_lane(&req));
        self.run("CreateVolume", &name, lane, move |core| create(core, req))
            .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run("DeleteVolume", &id.clone(), Lane::Quick, move |core| {
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
        self.run(
            "ValidateVolumeCapabilities",
            &id,
            Lane::Quick,
            move |core| validate(core, req),
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        self.run("ListVolumes", "", Lane::Quick, move |core| {
            let (page, next_token) = core.list_volumes(&req.starting_token, req.max_entries)?;
            Ok(ListVolumesResponse {
                entries: page
                    .iter()
                    .map(|v| list_volumes_response::Entry {
                        volume: Some(volume_message(core, v)),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids: Vec::new(),
                            volume_condition: Some(condition(core, v)),
                        }),
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
        self.run("GetCapacity", "", Lane::Quick, move |core| {
            capacity(core, req)
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
        self.run("CreateSnapshot", &name, Lane::Heavy, move |core| {
            required("name", &req.name)?;
            required("source_volume_id", &req.source_volume_id)?;
            let s = core.create_snapshot(&req.name, &req.source_volume_id, None, Take::Copy)?;
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
        self.run("DeleteSnapshot", &id.clone(), Lane::Heavy, move |core| {
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
        self.run("ListSnapshots", "", Lane::Quick, move |core| {
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
        self.run("GetSnapshot", &id.clone(), Lane::Quick, move |core| {
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
        self.run("ControllerExpandVolume", &id, Lane::Heavy, move |core| {
            expand(core, req)
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run(
            "ControllerGetVolume",
            &id.clone(),
            Lane::Quick,
            move |core| {
                required("volume_id", &id)?;
                let v = core.get_volume(&id)?;
                Ok(ControllerGetVolumeResponse {
                    volume: Some(volume_message(core, &v)),
                    status: Some(controller_get_volume_response::VolumeStatus {
                        published_node_ids: Vec::new(),
                        volume_condition: Some(condition(core, &v)),
                    }),
                })
            },
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        self.run("ControllerModifyVolume", &id, Lane::Heavy, move |core| {
            required("volume_id", &req.volume_id)?;
            core.modify_volume(&req.volume_id, &req.mutable_parameters)?;
            Ok(ControllerModifyVolumeResponse {})
        })
        .await
    }
}
