//! kubelet's and the sidecars' side of the CSI calls: kubelet's real path
//! layout under its directory, the directories it makes before a call and
//! removes after one, and the requests csi-provisioner, csi-snapshotter and
//! kubelet send (volume attributes, pod info, provisioner metadata).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use hostpath_csi::proto::*;
use sha2::{Digest, Sha256};

use super::node::Node;
use super::spec::DriverSpec;

/// A PV's volumeMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Filesystem,
    Block,
}

/// A PV as kubelet knows it: handle, attributes, capability.
#[derive(Debug, Clone)]
pub struct Pv {
    pub name: String,
    pub handle: String,
    pub kind: Kind,
    pub capability: VolumeCapability,
    /// spec.csi.volumeAttributes: the CreateVolume response's context plus
    /// the provisioner's identity.
    pub attributes: HashMap<String, String>,
    pub capacity: i64,
}

/// One pod using a PV.
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
}

pub struct Kubelet {
    /// kubelet's directory, as a node path.
    pub dir: PathBuf,
    pub driver: String,
    pub fs_type: String,
}

const PLUGIN: &str = "kubernetes.io/csi";

impl Kubelet {
    pub fn new(spec: &DriverSpec) -> Kubelet {
        Kubelet {
            dir: spec.kubelet_dir.clone(),
            driver: spec.driver_name.clone(),
            fs_type: spec.default_fs_type.clone(),
        }
    }

    /// `plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount`
    pub fn staging_fs(&self, pv: &Pv) -> PathBuf {
        let hash = Sha256::digest(pv.handle.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        self.dir
            .join("plugins")
            .join(PLUGIN)
            .join(&self.driver)
            .join(hex)
            .join("globalmount")
    }

    /// `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`
    pub fn publish_fs(&self, pv: &Pv, pod: &Pod) -> PathBuf {
        self.dir
            .join("pods")
            .join(&pod.uid)
            .join("volumes/kubernetes.io~csi")
            .join(&pv.name)
            .join("mount")
    }

    /// `plugins/kubernetes.io/csi/volumeDevices/staging/<pv>`
    pub fn staging_block(&self, pv: &Pv) -> PathBuf {
        self.dir
            .join("plugins")
            .join(PLUGIN)
            .join("volumeDevices/staging")
            .join(&pv.name)
    }

    /// `plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<pod uid>`
    pub fn publish_block(&self, pv: &Pv, pod: &Pod) -> PathBuf {
        self.dir
            .join("plugins")
            .join(PLUGIN)
            .join("volumeDevices/publish")
            .join(&pv.name)
            .join(&pod.uid)
    }

    pub fn staging(&self, pv: &Pv) -> PathBuf {
        match pv.kind {
            Kind::Filesystem => self.staging_fs(pv),
            Kind::Block => self.staging_block(pv),
        }
    }

    pub fn target(&self, pv: &Pv, pod: &Pod) -> PathBuf {
        match pv.kind {
            Kind::Filesystem => self.publish_fs(pv, pod),
            Kind::Block => self.publish_block(pv, pod),
        }
    }

    /// What kubelet makes before NodeStageVolume: the staging directory
    /// (and, for Filesystem, vol_data.json beside it).
    pub fn prepare_stage(&self, node: &Node, pv: &Pv) {
        let staging = node.host(&self.staging(pv));
        std::fs::create_dir_all(&staging).unwrap();
        if let Kind::Filesystem = pv.kind {
            write_vol_data(staging.parent().unwrap(), pv, &self.driver);
        }
    }

    /// What kubelet makes before NodePublishVolume: the target's parent (the
    /// driver makes the target itself).
    pub fn prepare_publish(&self, node: &Node, pv: &Pv, pod: &Pod) {
        let parent = node
            .host(&self.target(pv, pod))
            .parent()
            .unwrap()
            .to_owned();
        std::fs::create_dir_all(&parent).unwrap();
        if let Kind::Filesystem = pv.kind {
            write_vol_data(&parent, pv, &self.driver);
        }
    }

    /// What kubelet removes after a successful NodeUnpublishVolume.
    pub fn after_unpublish(&self, node: &Node, pv: &Pv, pod: &Pod) {
        let target = node.host(&self.target(pv, pod));
        match pv.kind {
            Kind::Filesystem => {
                let _ = std::fs::remove_dir(&target);
                let parent = target.parent().unwrap();
                let _ = std::fs::remove_file(parent.join("vol_data.json"));
                std::fs::remove_dir(parent).expect("the pod's volume dir is empty");
            }
            Kind::Block => {
                let _ = std::fs::remove_dir(target.parent().unwrap());
            }
        }
    }

    /// What kubelet removes after a successful NodeUnstageVolume.
    pub fn after_unstage(&self, node: &Node, pv: &Pv) {
        let staging = node.host(&self.staging(pv));
        match pv.kind {
            Kind::Filesystem => {
                std::fs::remove_dir(&staging).expect("globalmount is empty and unmounted");
                let parent = staging.parent().unwrap();
                std::fs::remove_file(parent.join("vol_data.json")).unwrap();
                std::fs::remove_dir(parent).unwrap();
            }
            Kind::Block => std::fs::remove_dir_all(&staging).unwrap(),
        }
    }

    pub fn stage_req(&self, pv: &Pv) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: s(&self.staging(pv)),
            volume_capability: Some(pv.capability.clone()),
            volume_context: pv.attributes.clone(),
            ..Default::default()
        }
    }

    /// With podInfoOnMount (the rendered CSIDriver sets it), kubelet adds
    /// the pod's identity to the volume context.
    pub fn publish_req(&self, pv: &Pv, pod: &Pod) -> NodePublishVolumeRequest {
        let mut context = pv.attributes.clone();
        for (k, v) in [
            ("csi.storage.k8s.io/pod.name", pod.name.as_str()),
            ("csi.storage.k8s.io/pod.namespace", pod.namespace.as_str()),
            ("csi.storage.k8s.io/pod.uid", pod.uid.as_str()),
            ("csi.storage.k8s.io/serviceAccount.name", "default"),
            ("csi.storage.k8s.io/ephemeral", "false"),
        ] {
            context.insert(k.into(), v.into());
        }
        NodePublishVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: s(&self.staging(pv)),
            target_path: s(&self.target(pv, pod)),
            volume_capability: Some(pv.capability.clone()),
            readonly: false,
            volume_context: context,
            ..Default::default()
        }
    }

    pub fn unpublish_req(&self, pv: &Pv, pod: &Pod) -> NodeUnpublishVolumeRequest {
        NodeUnpublishVolumeRequest {
            volume_id: pv.handle.clone(),
            target_path: s(&self.target(pv, pod)),
        }
    }

    pub fn unstage_req(&self, pv: &Pv) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: s(&self.staging(pv)),
        }
    }

    pub fn stats_req(&self, pv: &Pv, pod: &Pod) -> NodeGetVolumeStatsRequest {
        NodeGetVolumeStatsRequest {
            volume_id: pv.handle.clone(),
            volume_path: s(&self.target(pv, pod)),
            staging_target_path: s(&self.staging(pv)),
        }
    }

    pub fn expand_req(&self, pv: &Pv, pod: &Pod, bytes: i64) -> NodeExpandVolumeRequest {
        NodeExpandVolumeRequest {
            volume_id: pv.handle.clone(),
            volume_path: s(&self.target(pv, pod)),
            staging_target_path: s(&self.staging(pv)),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capability: Some(pv.capability.clone()),
            ..Default::default()
        }
    }

    /// The capability csi-provisioner asks for (RWO; Filesystem volumes get
    /// its `--default-fstype`).
    pub fn capability(&self, kind: &Kind) -> VolumeCapability {
        let access_type = match kind {
            Kind::Filesystem => AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone(),
                ..Default::default()
            }),
            Kind::Block => AccessType::Block(BlockVolume {}),
        };
        VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(access_type),
        }
    }
}

/// kubelet's record of a mounted CSI volume, beside globalmount and mount.
fn write_vol_data(dir: &Path, pv: &Pv, driver: &str) {
    let data = serde_json::json!({
        "driverName": driver,
        "specVolID": pv.name,
        "volumeHandle": pv.handle,
        "volumeLifecycleMode": "Persistent",
    });
    std::fs::write(dir.join("vol_data.json"), data.to_string()).unwrap();
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
