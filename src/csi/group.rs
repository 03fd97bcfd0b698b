//! The GroupController service: group snapshots of several volumes.

use tonic::{Request, Response, Status};

use super::controller::snapshot_message;
use super::{CsiService, Lane};
use crate::error::{required, CoreError};
use crate::proto::group_controller_server::GroupController;
use crate::proto::group_controller_service_capability::rpc::Type as RpcType;
use crate::proto::group_controller_service_capability::{Rpc, Type as CapType};
use crate::proto::*;
use crate::volume::group::GroupSnapshot;

fn group_message(g: &GroupSnapshot) -> VolumeGroupSnapshot {
    VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g.members.iter().map(snapshot_message).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: g.created_unix,
            nanos: g.created_nanos,
        }),
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl GroupController for CsiService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc {
                    r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        self.run(
            "CreateVolumeGroupSnapshot",
            &name,
            Lane::Heavy,
            move |core| {
                required("name", &req.name)?;
                if req.source_volume_ids.is_empty() {
                    return Err(CoreError::Required {
                        field: "source_volume_ids",
                    });
                }
                let g = core.create_group_snapshot(&req.name, &req.source_volume_ids)?;
                Ok(CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_message(&g)),
                })
            },
        )
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.group_snapshot_id.clone();
        self.run("DeleteVolumeGroupSnapshot", &id, Lane::Heavy, move |core| {
            required("group_snapshot_id", &req.group_snapshot_id)?;
            core.delete_group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)?;
            Ok(DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.group_snapshot_id.clone();
        self.run("GetVolumeGroupSnapshot", &id, Lane::Quick, move |core| {
            required("group_snapshot_id", &req.group_snapshot_id)?;
            let g = core.get_group_snapshot(&req.group_snapshot_id, &req.snapshot_ids)?;
            Ok(GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(group_message(&g)),
            })
        })
        .await
    }
}
