//! Requests the workloads send: CreateVolume from the command line's
//! parameters, and kubelet's node flow for one volume by its returned ID.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hostpath_csi::client::default_staging_path;
use hostpath_csi::proto::node_client::NodeClient;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use hostpath_csi::proto::*;
use tonic::transport::Channel;
use tonic::Status;

pub fn capability(block: bool) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume::default())
        }),
    }
}

/// What every CreateVolume of a run asks for besides name, size and mode.
#[derive(Clone)]
pub struct Spec {
    pub parameters: HashMap<String, String>,
    pub requirement: Option<TopologyRequirement>,
}

impl Spec {
    pub fn new(params: &[String], node: Option<&str>, topology_key: &str) -> Spec {
        let parameters = params
            .iter()
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let requirement = node.map(|n| {
            let t = Topology {
                segments: [(topology_key.to_owned(), n.to_owned())].into(),
            };
            TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            }
        });
        Spec {
            parameters,
            requirement,
        }
    }

    pub fn create(&self, name: &str, size: i64, block: bool) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(block)],
            parameters: self.parameters.clone(),
            accessibility_requirements: self.requirement.clone(),
            ..Default::default()
        }
    }

    /// A clone of the volume with ID `source`.
    pub fn clone_of(
        &self,
        name: &str,
        source: &str,
        size: i64,
        block: bool,
    ) -> CreateVolumeRequest {
        CreateVolumeRequest {
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource {
                        volume_id: source.to_owned(),
                    },
                )),
            }),
            ..self.create(name, size, block)
        }
    }
}

/// A created volume: the ID the driver returned and its context.
#[derive(Clone, Debug)]
pub struct Created {
    pub id: String,
    pub context: HashMap<String, String>,
}

impl Created {
    pub fn from_response(r: CreateVolumeResponse) -> Result<Created, Status> {
        let v = r
            .volume
            .ok_or_else(|| Status::internal("CreateVolume answered OK without a volume"))?;
        if v.volume_id.is_empty() {
            return Err(Status::internal("CreateVolume answered an empty volume_id"));
        }
        Ok(Created {
            id: v.volume_id,
            context: v.volume_context,
        })
    }
}

/// One volume on kubelet's node path: staged (when the driver stages) and
/// published at a target named after the request name, addressed by its ID.
#[derive(Clone, Debug)]
pub struct NodeVolume {
    pub id: String,
    pub context: HashMap<String, String>,
    pub target: String,
    pub staging: Option<String>,
    pub block: bool,
}

impl NodeVolume {
    pub fn new(created: &Created, dir: &Path, name: &str, block: bool, stages: bool) -> Self {
        let target = dir.join(name).to_string_lossy().into_owned();
        NodeVolume {
            id: created.id.clone(),
            context: created.context.clone(),
            staging: stages.then(|| default_staging_path(&target)),
            target,
            block,
        }
    }

    pub fn target_path(&self) -> PathBuf {
        PathBuf::from(&self.target)
    }

    /// NodeStageVolume, when the driver stages; a no-op otherwise.
    pub async fn stage(&self, mut node: NodeClient<Channel>) -> Result<(), Status> {
        let Some(staging) = &self.staging else {
            return Ok(());
        };
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability(self.block)),
            volume_context: self.context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    pub async fn publish(&self, mut node: NodeClient<Channel>) -> Result<(), Status> {
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.staging.clone().unwrap_or_default(),
            target_path: self.target.clone(),
            volume_capability: Some(capability(self.block)),
            volume_context: self.context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    pub async fn unpublish(&self, mut node: NodeClient<Channel>) -> Result<(), Status> {
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: self.id.clone(),
            target_path: self.target.clone(),
        })
        .await
        .map(|_| ())
    }

    /// NodeUnstageVolume, when the driver stages; a no-op otherwise.
    pub async fn unstage(&self, mut node: NodeClient<Channel>) -> Result<(), Status> {
        let Some(staging) = &self.staging else {
            return Ok(());
        };
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .map(|_| ())
    }

    /// Stage then publish.
    pub async fn attach(&self, node: &NodeClient<Channel>) -> Result<(), Status> {
        self.stage(node.clone()).await?;
        self.publish(node.clone()).await
    }

    /// Unpublish then unstage.
    pub async fn detach(&self, node: &NodeClient<Channel>) -> Result<(), Status> {
        self.unpublish(node.clone()).await?;
        self.unstage(node.clone()).await
    }
}
