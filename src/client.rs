//! A CSI client over a Unix socket (used by `ctl`, tests and benches).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::controller_client::ControllerClient;
use crate::proto::group_controller_client::GroupControllerClient;
use crate::proto::identity_client::IdentityClient;
use crate::proto::node_client::NodeClient;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Endpoint(#[from] crate::server::ServeError),
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to `unix:///path` (authority `localhost`, as kubelet sends).
pub async fn connect(endpoint: &str) -> Result<Channel, ClientError> {
    let path: PathBuf = crate::server::socket_path(endpoint)?;
    let display = path.display().to_string();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: display,
            source,
        })
}

/// All four clients on one connection.
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub group: GroupControllerClient<Channel>,
}

impl Clients {
    pub async fn connect(endpoint: &str) -> Result<Clients, ClientError> {
        let ch = connect(endpoint).await?;
        Ok(Clients {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch.clone()),
            group: GroupControllerClient::new(ch),
        })
    }

    /// Whether the node service wants NodeStageVolume before a publish (as
    /// kubelet asks it, through NodeGetCapabilities).
    pub async fn node_stages(&self) -> Result<bool, tonic::Status> {
        use crate::proto::node_service_capability::{rpc::Type, Type as Cap};
        let caps = self
            .node
            .clone()
            .node_get_capabilities(crate::proto::NodeGetCapabilitiesRequest {})
            .await?
            .into_inner();
        Ok(caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(Cap::Rpc(r)) if r.r#type == Type::StageUnstageVolume as i32)
        }))
    }
}

/// Where `ctl` and `csi-bench` stage a volume published at `target`, when
/// no staging path is given: beside the target, as kubelet keeps one per PV.
pub fn default_staging_path(target: &str) -> String {
    format!("{target}.staging")
}

/// A volume capability: `block` access or a mount (with `fs_type` and
/// flags), in access `mode`. The one builder the CLI, the benchmark and the
/// tests share.
pub fn capability(
    mode: crate::proto::volume_capability::access_mode::Mode,
    block: bool,
    fs_type: &str,
    mount_flags: &[String],
) -> crate::proto::VolumeCapability {
    use crate::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    crate::proto::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs_type.to_owned(),
                mount_flags: mount_flags.to_vec(),
                volume_mount_group: String::new(),
            })
        }),
    }
}
