//! `hostpath-csi ctl`: one subcommand per CSI RPC, JSON on stdout.

use std::collections::HashMap;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use hostpath_csi::client::Clients;
use hostpath_csi::config::cr::parse_quantity;
use hostpath_csi::proto::volume_capability::access_mode::Mode as AccessMode;
use hostpath_csi::proto::volume_capability::{
    AccessMode as AccessModeMsg, AccessType, BlockVolume, MountVolume,
};
use hostpath_csi::proto::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use hostpath_csi::proto::*;

#[derive(Args)]
pub struct CtlArgs {
    /// CSI endpoint, unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Args, Clone)]
struct CapabilityArgs {
    /// Block access type instead of a mount.
    #[arg(long)]
    block: bool,
    /// Filesystem type for mount access (image volumes).
    #[arg(long, default_value = "")]
    fs_type: String,
    /// Access mode: rwo (SINGLE_NODE_WRITER), rox, rwop, rwx-node, rwx.
    #[arg(long, default_value = "rwo")]
    access_mode: String,
    /// Mount flags (repeatable).
    #[arg(long = "mount-flag")]
    mount_flags: Vec<String>,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// GetPluginInfo
    Info,
    /// GetPluginCapabilities, ControllerGetCapabilities and NodeGetCapabilities
    Capabilities,
    /// Probe
    Probe,
    /// CreateVolume
    CreateVolume {
        name: String,
        /// Requested size, e.g. 1Gi (0 = unspecified).
        #[arg(long, default_value = "0")]
        size: String,
        /// Upper limit, e.g. 2Gi.
        #[arg(long)]
        limit: Option<String>,
        /// StorageClass parameter key=value (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Mutable parameter key=value (repeatable).
        #[arg(long = "mutable-param")]
        mutable_params: Vec<String>,
        /// Clone this volume.
        #[arg(long)]
        source_volume: Option<String>,
        /// Restore this snapshot.
        #[arg(long)]
        source_snapshot: Option<String>,
        /// Require this node (topology).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// DeleteVolume
    DeleteVolume { volume_id: String },
    /// ListVolumes
    ListVolumes {
        #[arg(long, default_value_t = 0)]
        max_entries: i32,
        #[arg(long, default_value = "")]
        starting_token: String,
    },
    /// ControllerGetVolume
    GetVolume { volume_id: String },
    /// ValidateVolumeCapabilities
    Validate {
        volume_id: String,
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// GetCapacity
    Capacity {
        #[arg(long = "param")]
        params: Vec<String>,
        #[arg(long)]
        node: Option<String>,
    },
    /// ControllerExpandVolume
    Expand { volume_id: String, size: String },
    /// ControllerModifyVolume
    Modify {
        volume_id: String,
        #[arg(long = "mutable-param")]
        mutable_params: Vec<String>,
    },
    /// NodeStageVolume
    Stage {
        volume_id: String,
        staging_path: String,
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// NodeUnstageVolume
    Unstage {
        volume_id: String,
        staging_path: String,
    },
    /// NodePublishVolume, after NodeStageVolume as kubelet does (at
    /// `--staging-path`, by default `<target_path>.staging`)
    Publish {
        volume_id: String,
        target_path: String,
        #[arg(long, default_value = "")]
        staging_path: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapabilityArgs,
    },
    /// NodeUnpublishVolume, then NodeUnstageVolume of the staging path
    /// `publish` used
    Unpublish {
        volume_id: String,
        target_path: String,
        #[arg(long, default_value = "")]
        staging_path: String,
    },
    /// NodeGetVolumeStats
    Stats {
        volume_id: String,
        volume_path: String,
    },
    /// NodeExpandVolume
    NodeExpand {
        volume_id: String,
        volume_path: String,
    },
    /// NodeGetInfo
    NodeInfo,
    /// CreateSnapshot
    CreateSnapshot {
        name: String,
        source_volume_id: String,
    },
    /// DeleteSnapshot
    DeleteSnapshot { snapshot_id: String },
    /// ListSnapshots
    ListSnapshots {
        #[arg(long, default_value = "")]
        snapshot_id: String,
        #[arg(long, default_value = "")]
        source_volume_id: String,
        #[arg(long, default_value_t = 0)]
        max_entries: i32,
        #[arg(long, default_value = "")]
        starting_token: String,
    },
    /// GetSnapshot
    GetSnapshot { snapshot_id: String },
    /// CreateVolumeGroupSnapshot
    CreateGroupSnapshot {
        name: String,
        source_volume_ids: Vec<String>,
    },
    /// DeleteVolumeGroupSnapshot
    DeleteGroupSnapshot { group_snapshot_id: String },
}

fn size(text: &str) -> Result<i64, String> {
    parse_quantity(text)
        .and_then(|b| i64::try_from(b).ok())
        .ok_or_else(|| format!("{text:?} is not a size (e.g. 1Gi, 500Mi)"))
}

fn key_values(pairs: &[String]) -> Result<HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{p:?} is not key=value"))
        })
        .collect()
}

fn capability(c: &CapabilityArgs) -> Result<VolumeCapability, String> {
    let mode = match c.access_mode.as_str() {
        "rwo" => AccessMode::SingleNodeWriter,
        "rox" => AccessMode::SingleNodeReaderOnly,
        "rwop" => AccessMode::SingleNodeSingleWriter,
        "rwx-node" => AccessMode::SingleNodeMultiWriter,
        "rwx" => AccessMode::MultiNodeMultiWriter,
        "rox-multi" => AccessMode::MultiNodeReaderOnly,
        other => return Err(format!("unknown access mode {other:?}")),
    };
    Ok(VolumeCapability {
        access_mode: Some(AccessModeMsg { mode: mode as i32 }),
        access_type: Some(if c.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: c.fs_type.clone(),
                mount_flags: c.mount_flags.clone(),
                volume_mount_group: String::new(),
            })
        }),
    })
}

fn topology(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(hostpath_csi::TOPOLOGY_KEY.to_owned(), node.to_owned())]),
    }
}

fn volume_json(v: &Volume) -> Value {
    let source = v
        .content_source
        .as_ref()
        .and_then(|s| s.r#type.as_ref())
        .map(|t| match t {
            SourceType::Volume(v) => json!({"volume": v.volume_id}),
            SourceType::Snapshot(s) => json!({"snapshot": s.snapshot_id}),
        });
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": source,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    })
}

fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    })
}

fn status_json(s: tonic::Status) -> String {
    json!({"code": format!("{:?}", s.code()), "message": s.message()}).to_string()
}

async fn stage(
    c: &Clients,
    volume_id: &str,
    staging_path: &str,
    cap: &CapabilityArgs,
) -> Result<(), String> {
    c.node
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging_path.into(),
            volume_capability: Some(capability(cap)?),
            ..Default::default()
        })
        .await
        .map_err(status_json)?;
    Ok(())
}

pub async fn run(args: CtlArgs) -> Result<(), String> {
    let mut c = Clients::connect(&args.endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let out: Value = match args.command {
        CtlCommand::Info => {
            let r = c
                .identity
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"name": r.name, "vendor_version": r.vendor_version})
        }
        CtlCommand::Capabilities => {
            let p = c
                .identity
                .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            let ctrl = c
                .controller
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            let node = c
                .node
                .node_get_capabilities(NodeGetCapabilitiesRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            json!({
                "plugin": p.capabilities.iter().map(|c| format!("{:?}", c.r#type)).collect::<Vec<_>>(),
                "controller": ctrl.capabilities.iter().filter_map(|c| match &c.r#type {
                    Some(controller_service_capability::Type::Rpc(r)) => controller_service_capability::rpc::Type::try_from(r.r#type).ok().map(|t| t.as_str_name()),
                    None => None,
                }).collect::<Vec<_>>(),
                "node": node.capabilities.iter().filter_map(|c| match &c.r#type {
                    Some(node_service_capability::Type::Rpc(r)) => node_service_capability::rpc::Type::try_from(r.r#type).ok().map(|t| t.as_str_name()),
                    None => None,
                }).collect::<Vec<_>>(),
            })
        }
        CtlCommand::Probe => {
            let r = c
                .identity
                .probe(ProbeRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"ready": r.ready})
        }
        CtlCommand::CreateVolume {
            name,
            size: sz,
            limit,
            params,
            mutable_params,
            source_volume,
            source_snapshot,
            node,
            cap,
        } => {
            let source = match (source_volume, source_snapshot) {
                (Some(v), None) => Some(VolumeContentSource {
                    r#type: Some(SourceType::Volume(VolumeSource { volume_id: v })),
                }),
                (None, Some(s)) => Some(VolumeContentSource {
                    r#type: Some(SourceType::Snapshot(SnapshotSource { snapshot_id: s })),
                }),
                (None, None) => None,
                _ => return Err("give at most one of --source-volume and --source-snapshot".into()),
            };
            let r = c
                .controller
                .create_volume(CreateVolumeRequest {
                    name,
                    capacity_range: Some(CapacityRange {
                        required_bytes: size(&sz)?,
                        limit_bytes: limit.as_deref().map(size).transpose()?.unwrap_or(0),
                    }),
                    volume_capabilities: vec![capability(&cap)?],
                    parameters: key_values(&params)?,
                    mutable_parameters: key_values(&mutable_params)?,
                    volume_content_source: source,
                    accessibility_requirements: node.map(|n| TopologyRequirement {
                        requisite: vec![topology(&n)],
                        preferred: vec![topology(&n)],
                    }),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            r.volume.as_ref().map(volume_json).unwrap_or(Value::Null)
        }
        CtlCommand::DeleteVolume { volume_id } => {
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: volume_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?;
            json!({"deleted": volume_id})
        }
        CtlCommand::ListVolumes {
            max_entries,
            starting_token,
        } => {
            let r = c
                .controller
                .list_volumes(ListVolumesRequest {
                    max_entries,
                    starting_token,
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({
                "entries": r.entries.iter().filter_map(|e| e.volume.as_ref().map(volume_json)).collect::<Vec<_>>(),
                "next_token": r.next_token,
            })
        }
        CtlCommand::GetVolume { volume_id } => {
            let r = c
                .controller
                .controller_get_volume(ControllerGetVolumeRequest { volume_id })
                .await
                .map_err(status_json)?
                .into_inner();
            r.volume.as_ref().map(volume_json).unwrap_or(Value::Null)
        }
        CtlCommand::Validate { volume_id, cap } => {
            let r = c
                .controller
                .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                    volume_id,
                    volume_capabilities: vec![capability(&cap)?],
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"confirmed": r.confirmed.is_some(), "message": r.message})
        }
        CtlCommand::Capacity { params, node } => {
            let r = c
                .controller
                .get_capacity(GetCapacityRequest {
                    parameters: key_values(&params)?,
                    accessible_topology: node.map(|n| topology(&n)),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"available_capacity": r.available_capacity, "maximum_volume_size": r.maximum_volume_size})
        }
        CtlCommand::Expand {
            volume_id,
            size: sz,
        } => {
            let r = c
                .controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: Some(CapacityRange {
                        required_bytes: size(&sz)?,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required})
        }
        CtlCommand::Modify {
            volume_id,
            mutable_params,
        } => {
            c.controller
                .controller_modify_volume(ControllerModifyVolumeRequest {
                    volume_id: volume_id.clone(),
                    mutable_parameters: key_values(&mutable_params)?,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?;
            json!({"modified": volume_id})
        }
        CtlCommand::Stage {
            volume_id,
            staging_path,
            cap,
        } => {
            stage(&c, &volume_id, &staging_path, &cap).await?;
            json!({"staged": volume_id, "staging_path": staging_path})
        }
        CtlCommand::Unstage {
            volume_id,
            staging_path,
        } => {
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging_path,
                })
                .await
                .map_err(status_json)?;
            json!({"unstaged": volume_id})
        }
        CtlCommand::Publish {
            volume_id,
            target_path,
            staging_path,
            readonly,
            cap,
        } => {
            let mut staging_path = staging_path;
            if c.node_stages().await.map_err(status_json)? {
                if staging_path.is_empty() {
                    staging_path = hostpath_csi::client::default_staging_path(&target_path);
                }
                stage(&c, &volume_id, &staging_path, &cap).await?;
            }
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target_path.clone(),
                    staging_target_path: staging_path,
                    volume_capability: Some(capability(&cap)?),
                    readonly,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?;
            json!({"published": volume_id, "target_path": target_path})
        }
        CtlCommand::Unpublish {
            volume_id,
            target_path,
            staging_path,
        } => {
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target_path.clone(),
                })
                .await
                .map_err(status_json)?;
            if c.node_stages().await.map_err(status_json)? {
                let derived = staging_path.is_empty();
                let staging_path = if derived {
                    hostpath_csi::client::default_staging_path(&target_path)
                } else {
                    staging_path
                };
                c.node
                    .node_unstage_volume(NodeUnstageVolumeRequest {
                        volume_id: volume_id.clone(),
                        staging_target_path: staging_path.clone(),
                    })
                    .await
                    .map_err(status_json)?;
                if derived {
                    // ctl made it; a CO would remove its own.
                    let _ = std::fs::remove_dir(&staging_path);
                }
            }
            json!({"unpublished": volume_id})
        }
        CtlCommand::Stats {
            volume_id,
            volume_path,
        } => {
            let r = c
                .node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path,
                    staging_target_path: String::new(),
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({
                "usage": r.usage.iter().map(|u| json!({
                    "unit": volume_usage::Unit::try_from(u.unit).map(|x| x.as_str_name()).unwrap_or("UNKNOWN"),
                    "total": u.total, "used": u.used, "available": u.available,
                })).collect::<Vec<_>>(),
                "condition": r.volume_condition.map(|c| json!({"abnormal": c.abnormal, "message": c.message})),
            })
        }
        CtlCommand::NodeExpand {
            volume_id,
            volume_path,
        } => {
            let r = c
                .node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id,
                    volume_path,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"capacity_bytes": r.capacity_bytes})
        }
        CtlCommand::NodeInfo => {
            let r = c
                .node
                .node_get_info(NodeGetInfoRequest {})
                .await
                .map_err(status_json)?
                .into_inner();
            json!({"node_id": r.node_id, "accessible_topology": r.accessible_topology.map(|t| t.segments)})
        }
        CtlCommand::CreateSnapshot {
            name,
            source_volume_id,
        } => {
            let r = c
                .controller
                .create_snapshot(CreateSnapshotRequest {
                    name,
                    source_volume_id,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            r.snapshot
                .as_ref()
                .map(snapshot_json)
                .unwrap_or(Value::Null)
        }
        CtlCommand::DeleteSnapshot { snapshot_id } => {
            c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?;
            json!({"deleted": snapshot_id})
        }
        CtlCommand::ListSnapshots {
            snapshot_id,
            source_volume_id,
            max_entries,
            starting_token,
        } => {
            let r = c
                .controller
                .list_snapshots(ListSnapshotsRequest {
                    snapshot_id,
                    source_volume_id,
                    max_entries,
                    starting_token,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            json!({
                "entries": r.entries.iter().filter_map(|e| e.snapshot.as_ref().map(snapshot_json)).collect::<Vec<_>>(),
                "next_token": r.next_token,
            })
        }
        CtlCommand::GetSnapshot { snapshot_id } => {
            let r = c
                .controller
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            r.snapshot
                .as_ref()
                .map(snapshot_json)
                .unwrap_or(Value::Null)
        }
        CtlCommand::CreateGroupSnapshot {
            name,
            source_volume_ids,
        } => {
            let r = c
                .group
                .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                    name,
                    source_volume_ids,
                    ..Default::default()
                })
                .await
                .map_err(status_json)?
                .into_inner();
            let g = r.group_snapshot.unwrap_or_default();
            json!({"group_snapshot_id": g.group_snapshot_id, "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>()})
        }
        CtlCommand::DeleteGroupSnapshot { group_snapshot_id } => {
            c.group
                .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: group_snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_json)?;
            json!({"deleted": group_snapshot_id})
        }
    };
    println!("{out}");
    Ok(())
}
