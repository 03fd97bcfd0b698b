//! `hostpath-csi ctl`: one subcommand per CSI RPC, JSON on stdout. `run`
//! dispatches; each subcommand is one small function.

use std::collections::HashMap;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use hostpath_csi::client::{self, ClientError, Clients};
use hostpath_csi::config::cr::parse_quantity;
use hostpath_csi::proto::volume_capability::access_mode::Mode as AccessMode;
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
pub struct CapabilityArgs {
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
    CreateVolume(CreateVolumeArgs),
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
    Publish(PublishArgs),
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
    ListSnapshots(ListSnapshotsArgs),
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

#[derive(Args)]
pub struct CreateVolumeArgs {
    pub name: String,
    /// Requested size, e.g. 1Gi (0 = unspecified).
    #[arg(long, default_value = "0")]
    pub size: String,
    /// Upper limit, e.g. 2Gi.
    #[arg(long)]
    pub limit: Option<String>,
    /// StorageClass parameter key=value (repeatable).
    #[arg(long = "param")]
    pub params: Vec<String>,
    /// Mutable parameter key=value (repeatable).
    #[arg(long = "mutable-param")]
    pub mutable_params: Vec<String>,
    /// Clone this volume.
    #[arg(long)]
    pub source_volume: Option<String>,
    /// Restore this snapshot.
    #[arg(long)]
    pub source_snapshot: Option<String>,
    /// Require this node (topology).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub cap: CapabilityArgs,
}

#[derive(Args)]
pub struct PublishArgs {
    pub volume_id: String,
    pub target_path: String,
    #[arg(long, default_value = "")]
    pub staging_path: String,
    #[arg(long)]
    pub readonly: bool,
    #[command(flatten)]
    pub cap: CapabilityArgs,
}

#[derive(Args)]
pub struct ListSnapshotsArgs {
    #[arg(long, default_value = "")]
    pub snapshot_id: String,
    #[arg(long, default_value = "")]
    pub source_volume_id: String,
    #[arg(long, default_value_t = 0)]
    pub max_entries: i32,
    #[arg(long, default_value = "")]
    pub starting_token: String,
}

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    /// The driver's answer, as JSON (code and message).
    #[error("{}", status_json(.0))]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    BadArgument(String),
}

type CtlResult<T> = Result<T, CtlError>;

fn status_json(s: &tonic::Status) -> String {
    json!({"code": format!("{:?}", s.code()), "message": s.message()}).to_string()
}

fn size(text: &str) -> CtlResult<i64> {
    parse_quantity(text)
        .and_then(|b| i64::try_from(b).ok())
        .ok_or_else(|| CtlError::BadArgument(format!("{text:?} is not a size (e.g. 1Gi, 500Mi)")))
}

fn key_values(pairs: &[String]) -> CtlResult<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| CtlError::BadArgument(format!("{p:?} is not key=value")))
        })
        .collect()
}

fn capability(c: &CapabilityArgs) -> CtlResult<VolumeCapability> {
    let mode = match c.access_mode.as_str() {
        "rwo" => AccessMode::SingleNodeWriter,
        "rox" => AccessMode::SingleNodeReaderOnly,
        "rwop" => AccessMode::SingleNodeSingleWriter,
        "rwx-node" => AccessMode::SingleNodeMultiWriter,
        "rwx" => AccessMode::MultiNodeMultiWriter,
        "rox-multi" => AccessMode::MultiNodeReaderOnly,
        other => {
            return Err(CtlError::BadArgument(format!(
                "unknown access mode {other:?}"
            )))
        }
    };
    Ok(client::capability(
        mode,
        c.block,
        &c.fs_type,
        &c.mount_flags,
    ))
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

/// Runs one subcommand and prints its JSON answer.
pub async fn run(args: CtlArgs) -> CtlResult<()> {
    let c = Clients::connect(&args.endpoint).await?;
    let out = match args.command {
        CtlCommand::Info => info(c).await?,
        CtlCommand::Capabilities => capabilities(c).await?,
        CtlCommand::Probe => probe(c).await?,
        CtlCommand::CreateVolume(a) => create_volume(c, a).await?,
        CtlCommand::DeleteVolume { volume_id } => delete_volume(c, volume_id).await?,
        CtlCommand::ListVolumes {
            max_entries,
            starting_token,
        } => list_volumes(c, max_entries, starting_token).await?,
        CtlCommand::GetVolume { volume_id } => get_volume(c, volume_id).await?,
        CtlCommand::Validate { volume_id, cap } => validate(c, volume_id, cap).await?,
        CtlCommand::Capacity { params, node } => get_capacity(c, params, node).await?,
        CtlCommand::Expand { volume_id, size } => expand(c, volume_id, size).await?,
        CtlCommand::Modify {
            volume_id,
            mutable_params,
        } => modify(c, volume_id, mutable_params).await?,
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
        } => unstage(c, volume_id, staging_path).await?,
        CtlCommand::Publish(a) => publish(c, a).await?,
        CtlCommand::Unpublish {
            volume_id,
            target_path,
            staging_path,
        } => unpublish(c, volume_id, target_path, staging_path).await?,
        CtlCommand::Stats {
            volume_id,
            volume_path,
        } => stats(c, volume_id, volume_path).await?,
        CtlCommand::NodeExpand {
            volume_id,
            volume_path,
        } => node_expand(c, volume_id, volume_path).await?,
        CtlCommand::NodeInfo => node_info(c).await?,
        CtlCommand::CreateSnapshot {
            name,
            source_volume_id,
        } => create_snapshot(c, name, source_volume_id).await?,
        CtlCommand::DeleteSnapshot { snapshot_id } => delete_snapshot(c, snapshot_id).await?,
        CtlCommand::ListSnapshots(a) => list_snapshots(c, a).await?,
        CtlCommand::GetSnapshot { snapshot_id } => get_snapshot(c, snapshot_id).await?,
        CtlCommand::CreateGroupSnapshot {
            name,
            source_volume_ids,
        } => create_group(c, name, source_volume_ids).await?,
        CtlCommand::DeleteGroupSnapshot { group_snapshot_id } => {
            delete_group(c, group_snapshot_id).await?
        }
    };
    println!("{out}");
    Ok(())
}

async fn info(mut c: Clients) -> CtlResult<Value> {
    let r = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    Ok(json!({"name": r.name, "vendor_version": r.vendor_version}))
}

async fn capabilities(mut c: Clients) -> CtlResult<Value> {
    use controller_service_capability::rpc::Type as CtrlType;
    use node_service_capability::rpc::Type as NodeType;
    let p = c
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    let ctrl = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let node = c
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let ctrl_names: Vec<&str> = ctrl
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => {
                CtrlType::try_from(r.r#type).ok().map(|t| t.as_str_name())
            }
            None => None,
        })
        .collect();
    let node_names: Vec<&str> = node
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(node_service_capability::Type::Rpc(r)) => {
                NodeType::try_from(r.r#type).ok().map(|t| t.as_str_name())
            }
            None => None,
        })
        .collect();
    Ok(json!({
        "plugin": p.capabilities.iter().map(|c| format!("{:?}", c.r#type)).collect::<Vec<_>>(),
        "controller": ctrl_names,
        "node": node_names,
    }))
}

async fn probe(mut c: Clients) -> CtlResult<Value> {
    let r = c.identity.probe(ProbeRequest {}).await?.into_inner();
    Ok(json!({"ready": r.ready}))
}

async fn create_volume(mut c: Clients, a: CreateVolumeArgs) -> CtlResult<Value> {
    let source = match (a.source_volume, a.source_snapshot) {
        (Some(v), None) => Some(VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource { volume_id: v })),
        }),
        (None, Some(s)) => Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource { snapshot_id: s })),
        }),
        (None, None) => None,
        _ => {
            return Err(CtlError::BadArgument(
                "give at most one of --source-volume and --source-snapshot".into(),
            ))
        }
    };
    let r = c
        .controller
        .create_volume(CreateVolumeRequest {
            name: a.name,
            capacity_range: Some(CapacityRange {
                required_bytes: size(&a.size)?,
                limit_bytes: a.limit.as_deref().map(size).transpose()?.unwrap_or(0),
            }),
            volume_capabilities: vec![capability(&a.cap)?],
            parameters: key_values(&a.params)?,
            mutable_parameters: key_values(&a.mutable_params)?,
            volume_content_source: source,
            accessibility_requirements: a.node.map(|n| TopologyRequirement {
                requisite: vec![topology(&n)],
                preferred: vec![topology(&n)],
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.volume.as_ref().map(volume_json).unwrap_or(Value::Null))
}

async fn delete_volume(mut c: Clients, volume_id: String) -> CtlResult<Value> {
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.clone(),
            ..Default::default()
        })
        .await?;
    Ok(json!({"deleted": volume_id}))
}

async fn list_volumes(
    mut c: Clients,
    max_entries: i32,
    starting_token: String,
) -> CtlResult<Value> {
    let r = c
        .controller
        .list_volumes(ListVolumesRequest {
            max_entries,
            starting_token,
        })
        .await?
        .into_inner();
    Ok(json!({
        "entries": r.entries.iter().filter_map(|e| e.volume.as_ref().map(volume_json)).collect::<Vec<_>>(),
        "next_token": r.next_token,
    }))
}

async fn get_volume(mut c: Clients, volume_id: String) -> CtlResult<Value> {
    let r = c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest { volume_id })
        .await?
        .into_inner();
    let condition = r
        .status
        .and_then(|s| s.volume_condition)
        .map(|c| json!({"abnormal": c.abnormal, "message": c.message}));
    let mut v = r.volume.as_ref().map(volume_json).unwrap_or(Value::Null);
    v["condition"] = condition.unwrap_or(Value::Null);
    Ok(v)
}

async fn validate(mut c: Clients, volume_id: String, cap: CapabilityArgs) -> CtlResult<Value> {
    let r = c
        .controller
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id,
            volume_capabilities: vec![capability(&cap)?],
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(json!({"confirmed": r.confirmed.is_some(), "message": r.message}))
}

async fn get_capacity(
    mut c: Clients,
    params: Vec<String>,
    node: Option<String>,
) -> CtlResult<Value> {
    let r = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: key_values(&params)?,
            accessible_topology: node.map(|n| topology(&n)),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(
        json!({"available_capacity": r.available_capacity, "maximum_volume_size": r.maximum_volume_size}),
    )
}

async fn expand(mut c: Clients, volume_id: String, sz: String) -> CtlResult<Value> {
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
        .await?
        .into_inner();
    Ok(
        json!({"capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required}),
    )
}

async fn modify(
    mut c: Clients,
    volume_id: String,
    mutable_params: Vec<String>,
) -> CtlResult<Value> {
    c.controller
        .controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: volume_id.clone(),
            mutable_parameters: key_values(&mutable_params)?,
            ..Default::default()
        })
        .await?;
    Ok(json!({"modified": volume_id}))
}

async fn stage(
    c: &Clients,
    volume_id: &str,
    staging_path: &str,
    cap: &CapabilityArgs,
) -> CtlResult<()> {
    c.node
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging_path.into(),
            volume_capability: Some(capability(cap)?),
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn unstage(mut c: Clients, volume_id: String, staging_path: String) -> CtlResult<Value> {
    c.node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path,
        })
        .await?;
    Ok(json!({"unstaged": volume_id}))
}

/// Stages first (as kubelet does) when the driver asks for it.
async fn publish(mut c: Clients, a: PublishArgs) -> CtlResult<Value> {
    let mut staging_path = a.staging_path;
    if c.node_stages().await? {
        if staging_path.is_empty() {
            staging_path = client::default_staging_path(&a.target_path);
        }
        stage(&c, &a.volume_id, &staging_path, &a.cap).await?;
    }
    c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: a.volume_id.clone(),
            target_path: a.target_path.clone(),
            staging_target_path: staging_path,
            volume_capability: Some(capability(&a.cap)?),
            readonly: a.readonly,
            ..Default::default()
        })
        .await?;
    Ok(json!({"published": a.volume_id, "target_path": a.target_path}))
}

/// Unpublishes, then unstages the staging path `publish` used.
async fn unpublish(
    mut c: Clients,
    volume_id: String,
    target_path: String,
    staging_path: String,
) -> CtlResult<Value> {
    c.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path: target_path.clone(),
        })
        .await?;
    if c.node_stages().await? {
        let derived = staging_path.is_empty();
        let staging_path = if derived {
            client::default_staging_path(&target_path)
        } else {
            staging_path
        };
        c.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.clone(),
            })
            .await?;
        if derived {
            // ctl made it; a CO would remove its own.
            let _ = std::fs::remove_dir(&staging_path);
        }
    }
    Ok(json!({"unpublished": volume_id}))
}

async fn stats(mut c: Clients, volume_id: String, volume_path: String) -> CtlResult<Value> {
    let r = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id,
            volume_path,
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    let unit = |u: i32| {
        volume_usage::Unit::try_from(u)
            .map(|x| x.as_str_name())
            .unwrap_or("UNKNOWN")
    };
    Ok(json!({
        "usage": r.usage.iter().map(|u| json!({
            "unit": unit(u.unit), "total": u.total, "used": u.used, "available": u.available,
        })).collect::<Vec<_>>(),
        "condition": r.volume_condition.map(|c| json!({"abnormal": c.abnormal, "message": c.message})),
    }))
}

async fn node_expand(mut c: Clients, volume_id: String, volume_path: String) -> CtlResult<Value> {
    let r = c
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id,
            volume_path,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(json!({"capacity_bytes": r.capacity_bytes}))
}

async fn node_info(mut c: Clients) -> CtlResult<Value> {
    let r = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await?
        .into_inner();
    Ok(
        json!({"node_id": r.node_id, "accessible_topology": r.accessible_topology.map(|t| t.segments)}),
    )
}

async fn create_snapshot(
    mut c: Clients,
    name: String,
    source_volume_id: String,
) -> CtlResult<Value> {
    let r = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            name,
            source_volume_id,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.snapshot
        .as_ref()
        .map(snapshot_json)
        .unwrap_or(Value::Null))
}

async fn delete_snapshot(mut c: Clients, snapshot_id: String) -> CtlResult<Value> {
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot_id.clone(),
            ..Default::default()
        })
        .await?;
    Ok(json!({"deleted": snapshot_id}))
}

async fn list_snapshots(mut c: Clients, a: ListSnapshotsArgs) -> CtlResult<Value> {
    let r = c
        .controller
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: a.snapshot_id,
            source_volume_id: a.source_volume_id,
            max_entries: a.max_entries,
            starting_token: a.starting_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(json!({
        "entries": r.entries.iter().filter_map(|e| e.snapshot.as_ref().map(snapshot_json)).collect::<Vec<_>>(),
        "next_token": r.next_token,
    }))
}

async fn get_snapshot(mut c: Clients, snapshot_id: String) -> CtlResult<Value> {
    let r = c
        .controller
        .get_snapshot(GetSnapshotRequest {
            snapshot_id,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.snapshot
        .as_ref()
        .map(snapshot_json)
        .unwrap_or(Value::Null))
}

async fn create_group(
    mut c: Clients,
    name: String,
    source_volume_ids: Vec<String>,
) -> CtlResult<Value> {
    let r = c
        .group
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name,
            source_volume_ids,
            ..Default::default()
        })
        .await?
        .into_inner();
    let g = r.group_snapshot.unwrap_or_default();
    Ok(
        json!({"group_snapshot_id": g.group_snapshot_id, "snapshots": g.snapshots.iter().map(snapshot_json).collect::<Vec<_>>()}),
    )
}

async fn delete_group(mut c: Clients, group_snapshot_id: String) -> CtlResult<Value> {
    c.group
        .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group_snapshot_id.clone(),
            ..Default::default()
        })
        .await?;
    Ok(json!({"deleted": group_snapshot_id}))
}
