//! `hostpath-csi snapshot-labeler`: lets a node-deployment `csi-snapshotter`
//! work with a snapshot-controller that has no distributed snapshotting
//! (OpenShift's). Such a sidecar only sees VolumeSnapshotContents labelled
//! `snapshot.storage.kubernetes.io/managed-by=<its node>`, which that
//! controller never sets. One labeler runs beside each node's driver: it
//! watches this driver's unlabelled contents and labels those whose source
//! volume (or, for pre-provisioned ones, whose snapshot) its own driver
//! holds, asking the driver over the CSI socket. Only the node holding the
//! data claims a content; for a shared pool, where every node does, the
//! first patch wins (it carries the resourceVersion it saw).

use std::time::Duration;

use serde_json::{json, Value};

use crate::client::Clients;
use crate::kube::{self, KubeError};
use crate::proto::{ControllerGetVolumeRequest, GetPluginInfoRequest, ListSnapshotsRequest};

/// The label the node-deployment csi-snapshotter selects on.
pub const MANAGED_BY: &str = "snapshot.storage.kubernetes.io/managed-by";
const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
/// `!snapshot.storage.kubernetes.io/managed-by`, URL-encoded.
const UNLABELLED: &str = "labelSelector=%21snapshot.storage.kubernetes.io%2Fmanaged-by";
const WATCH_SECONDS: u32 = 300;

#[derive(Debug, thiserror::Error)]
pub enum LabelerError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("CSI: {0}")]
    Csi(String),
}

/// `hostpath-csi snapshot-labeler`
#[derive(clap::Args, Debug, Clone)]
pub struct LabelerArgs {
    /// The node's CSI driver socket.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name (the label's value; the snapshotter's NODE_NAME).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// API server URL; in a pod, the service account's is used.
    #[arg(long)]
    pub apiserver: Option<String>,
    /// Bearer token file for --apiserver.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// CA bundle for an https --apiserver.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
}

struct Labeler {
    api: kube::Client,
    csi: Clients,
    driver: String,
    node: String,
}

/// What the driver on this node says about a content's data.
async fn holds(csi: &Clients, content: &Value) -> Result<bool, LabelerError> {
    let source = &content["spec"]["source"];
    if let Some(volume) = source["volumeHandle"].as_str() {
        let reply = csi
            .controller
            .clone()
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: volume.to_owned(),
            })
            .await;
        return match reply {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(LabelerError::Csi(format!(
                "ControllerGetVolume {volume}: {s}"
            ))),
        };
    }
    if let Some(snapshot) = source["snapshotHandle"].as_str() {
        let reply = csi
            .controller
            .clone()
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: snapshot.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| LabelerError::Csi(format!("ListSnapshots {snapshot}: {s}")))?;
        return Ok(!reply.into_inner().entries.is_empty());
    }
    Ok(false)
}

impl Labeler {
    /// Labels `content` if it is this driver's, unlabelled, and here.
    async fn consider(&self, content: &Value) -> Result<(), LabelerError> {
        let name = content["metadata"]["name"].as_str().unwrap_or_default();
        if content["spec"]["driver"].as_str() != Some(self.driver.as_str())
            || !content["metadata"]["labels"][MANAGED_BY].is_null()
            || name.is_empty()
            || !holds(&self.csi, content).await?
        {
            return Ok(());
        }
        let patch = json!({"metadata": {
            "labels": {MANAGED_BY: self.node},
            // Refused (409) if the content changed since: for a shared pool
            // another node may have claimed it.
            "resourceVersion": content["metadata"]["resourceVersion"],
        }});
        match self
            .api
            .merge_patch(&format!("{CONTENTS}/{name}"), &patch)
            .await
        {
            Ok(_) => {
                tracing::info!(content = name, node = %self.node, "labelled for this node's csi-snapshotter");
                Ok(())
            }
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 409)) => {
                tracing::debug!(content = name, error = %e, "content changed or gone; the watch will tell");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Lists the unlabelled contents, considers each; returns the list's
    /// resourceVersion to watch from.
    async fn list(&self) -> Result<String, LabelerError> {
        let list = self.api.get(&format!("{CONTENTS}?{UNLABELLED}")).await?;
        for item in list["items"].as_array().into_iter().flatten() {
            self.consider(item).await?;
        }
        Ok(list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// Watches from `version` until the server ends the watch or it expires.
    async fn watch(&self, mut version: String) -> Result<(), LabelerError> {
        loop {
            let path = format!(
                "{CONTENTS}?{UNLABELLED}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={version}"
            );
            let mut watch = self.api.watch(&path).await?;
            while let Some(event) = watch.next().await? {
                let object = &event["object"];
                match event["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => self.consider(object).await?,
                    // 410 Gone and other errors: list again.
                    Some("ERROR") => return Ok(()),
                    _ => {}
                }
                if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
                    version = v.to_owned();
                }
            }
        }
    }
}

async fn connect_csi(endpoint: &str) -> Clients {
    loop {
        match Clients::connect(endpoint).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the driver's socket");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Runs until the process is stopped; API or CSI errors are retried.
pub async fn run(args: LabelerArgs) -> Result<(), LabelerError> {
    let api = match &args.apiserver {
        Some(url) => kube::Client::new(url, args.token_file.clone(), args.ca_file.as_deref())?,
        None => kube::Client::in_cluster()?,
    };
    let csi = connect_csi(&args.endpoint).await;
    let driver = loop {
        match csi
            .identity
            .clone()
            .get_plugin_info(GetPluginInfoRequest {})
            .await
        {
            Ok(info) => break info.into_inner().name,
            Err(e) => {
                tracing::info!(error = %e, "waiting for the driver");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let labeler = Labeler {
        api,
        csi,
        driver,
        node: args.node,
    };
    tracing::info!(driver = %labeler.driver, node = %labeler.node, "labelling this node's snapshot contents");
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = match labeler.list().await {
            Ok(version) => labeler.watch(version).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "snapshot labelling interrupted");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
