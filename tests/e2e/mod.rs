//! Node e2e harness: the rendered DaemonSet's driver container in podman
//! (from `target/image/hostpath-csi.oci.tar`, built by `hack/image.sh`) on a
//! fake node, driven the way csi-provisioner, csi-snapshotter and kubelet
//! drive it.

#![allow(dead_code)]

pub mod kubelet;
pub mod node;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use hostpath_csi::client::Clients;
use hostpath_csi::mount::MountInfo;
use hostpath_csi::proto::controller_service_capability::rpc::Type as CtrlType;
use hostpath_csi::proto::controller_service_capability::Type as CtrlCap;
use hostpath_csi::proto::*;

use kubelet::{Kind, Kubelet, Pod, Pv};
use node::Node;
use spec::DriverSpec;

pub const MIB: i64 = 1 << 20;
pub const NODE_NAME: &str = "e2e-node";
/// The CR whose render is the specification.
const CR: &str = "deploy/examples/hpp-basic.yaml";
/// What kubevirt's operator creates for the same CR (facts from its source).
const OPERATOR_DAEMONSET: &str = "tests/e2e/operator-daemonset.yaml";
/// The StorageClass for `layout: image` volumes.
const IMAGE_CLASS: &str = "deploy/examples/storageclass-image.yaml";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn image() -> String {
    std::env::var("HPC_E2E_IMAGE")
        .unwrap_or_else(|_| format!("localhost/hostpath-csi:{}", env!("CARGO_PKG_VERSION")))
}

/// Loads the image once per test process (two loads at once race in podman).
fn load_image_once() {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if !*loaded {
        node::sweep_stale();
        let archive = std::env::var("HPC_E2E_ARCHIVE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo("target/image/hostpath-csi.oci.tar"));
        node::load_image(&archive, &image());
        *loaded = true;
    }
}

/// Prints a step of the e2e with the time since the test started.
pub struct Steps {
    test: &'static str,
    start: Instant,
}

impl Steps {
    pub fn new(test: &'static str) -> Steps {
        Steps {
            test,
            start: Instant::now(),
        }
    }

    pub fn step(&self, what: &str) {
        // Not eprintln!: a closed stderr (`| head`) must not panic mid-test.
        let _ = writeln!(
            std::io::stderr(),
            "e2e {} [{:6.2}s] {what}",
            self.test,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// A node running the rendered driver container, and its CSI clients.
pub struct Cluster {
    pub node: Node,
    pub spec: DriverSpec,
    pub kubelet: Kubelet,
    pub c: Clients,
    pub container: String,
    serial: u32,
}

impl Cluster {
    /// The driver container of `render` of the example CR.
    pub async fn start(tag: &str) -> Cluster {
        load_image_once();
        let docs = spec::render(&repo(CR), NODE_NAME, &image());
        Cluster::start_from(tag, &docs).await
    }

    /// The driver container as kubevirt's operator runs it (path A).
    pub async fn start_as_operator(tag: &str) -> Cluster {
        load_image_once();
        let docs = spec::manifests(&repo(OPERATOR_DAEMONSET), &image());
        Cluster::start_from(tag, &docs).await
    }

    async fn start_from(tag: &str, docs: &[serde_json::Value]) -> Cluster {
        let spec = spec::driver_spec(docs, NODE_NAME, &image());
        // A tag unique to this run keeps parallel and leftover runs apart.
        let tag = format!("{tag}{}", std::process::id());
        let mut node = Node::new(NODE_NAME, &tag);
        // What every node has before the DaemonSet comes: kubelet's dirs.
        for dir in ["plugins", "plugins_registry", "pods"] {
            std::fs::create_dir_all(node.host(&spec.kubelet_dir.join(dir))).unwrap();
        }
        let container = node.start_driver(&spec);
        let c = node.connect(&spec, &container).await;
        Cluster {
            kubelet: Kubelet::new(&spec),
            node,
            spec,
            c,
            container,
            serial: 0,
        }
    }

    /// A DaemonSet rolling update: SIGTERM to the running container, then a
    /// new one from the same spec. Returns once the new one is ready.
    pub async fn restart(&mut self, while_down: impl FnOnce(&Cluster)) {
        self.node.stop(&self.container);
        assert!(!self.node.running(&self.container));
        assert!(
            !self.node.host(&self.spec.socket).exists(),
            "the driver left its socket behind on SIGTERM"
        );
        while_down(self);
        self.container = self.node.start_driver(&self.spec);
        self.c = self.node.connect(&self.spec, &self.container).await;
    }

    /// The StorageClass parameters of the rendered class, or of the
    /// `layout: image` example class (same pool).
    pub fn class(&self, image_layout: bool) -> BTreeMap<String, String> {
        if !image_layout {
            return self.spec.class_parameters.clone();
        }
        let text = std::fs::read_to_string(repo(IMAGE_CLASS)).unwrap();
        let class: serde_json::Value = serde_norway::from_str(&text).unwrap();
        let params: BTreeMap<String, String> = class["parameters"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            params.get("storagePool"),
            self.spec.class_parameters.get("storagePool"),
            "{IMAGE_CLASS} names another pool than the render"
        );
        params
    }

    /// The first pool of `--datadir`, where this machine sees it.
    pub fn pool_dir(&self) -> PathBuf {
        let datadir = spec::flag(&self.spec.args, "--datadir").expect("--datadir in the args");
        let pools: serde_json::Value = serde_json::from_str(&datadir).unwrap();
        let path = pools[0]["path"].as_str().expect("a pool path");
        // The operator's PV_DIR paths are relative to `/`, as the Go
        // driver resolves them.
        let path = Path::new("/").join(path);
        self.node.host(&spec::node_path(&self.spec.mounts, &path))
    }

    /// Where a volume lives on the host: `<pool>/<volume id>`.
    pub fn volume_file(&self, pv: &Pv) -> PathBuf {
        self.pool_dir().join(&pv.handle)
    }

    pub fn pod(&mut self) -> Pod {
        self.serial += 1;
        Pod {
            uid: format!(
                "00000000-0000-4000-8000-{:06}{:06}",
                std::process::id() % 1_000_000,
                self.serial
            ),
            name: format!("pod-{}", self.serial),
            namespace: "e2e".into(),
        }
    }

    /// The topology csi-provisioner reads from the CSINode kubelet filled
    /// from NodeGetInfo.
    async fn topology(&self) -> Topology {
        let info = self
            .c
            .node
            .clone()
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, NODE_NAME, "node id from $(NODE_NAME)");
        info.accessible_topology.expect("topology")
    }

    /// CreateVolume as csi-provisioner sends it (`--extra-create-metadata`,
    /// `--strict-topology`), for a PVC of `bytes`.
    pub async fn create(
        &mut self,
        kind: Kind,
        class: &BTreeMap<String, String>,
        bytes: i64,
        source: Option<VolumeContentSource>,
    ) -> Pv {
        self.serial += 1;
        let name = format!("pvc-{}-{}", self.node.tag, self.serial);
        let mut parameters: HashMap<String, String> =
            class.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (k, v) in [
            (
                "csi.storage.k8s.io/pvc/name",
                format!("claim-{}", self.serial),
            ),
            ("csi.storage.k8s.io/pvc/namespace", "e2e".into()),
            ("csi.storage.k8s.io/pv/name", name.clone()),
        ] {
            parameters.insert(k.into(), v);
        }
        let topology = self.topology().await;
        let mut capability = self.kubelet.capability(&kind);
        // csi-provisioner takes the class's fstype out of the parameters and
        // into the capability (and the PV).
        if let Some(fs) = parameters.remove("csi.storage.k8s.io/fstype") {
            if let Some(volume_capability::AccessType::Mount(m)) = &mut capability.access_type {
                m.fs_type = fs;
            }
        }
        let req = CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability.clone()],
            parameters,
            volume_content_source: source,
            accessibility_requirements: Some(TopologyRequirement {
                requisite: vec![topology.clone()],
                preferred: vec![topology],
            }),
            ..Default::default()
        };
        let v = self
            .c
            .controller
            .create_volume(req)
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .unwrap();
        assert!(v.capacity_bytes >= bytes);
        let mut attributes = v.volume_context.clone();
        attributes.insert(
            "storage.kubernetes.io/csiProvisionerIdentity".into(),
            format!("1700000000000-1234-{}", self.spec.driver_name),
        );
        let pv = Pv {
            name,
            handle: v.volume_id,
            kind,
            capability,
            attributes,
            capacity: v.capacity_bytes,
        };
        let file = self.volume_file(&pv);
        self.node.track_backing(&file);
        pv
    }

    pub async fn stage(&self, pv: &Pv) {
        self.kubelet.prepare_stage(&self.node, pv);
        self.c
            .node
            .clone()
            .node_stage_volume(self.kubelet.stage_req(pv))
            .await
            .unwrap_or_else(|e| panic!("NodeStageVolume {}: {e}", pv.name));
    }

    /// Publishes for `pod`; returns the target as this machine sees it.
    pub async fn publish(&self, pv: &Pv, pod: &Pod) -> PathBuf {
        self.kubelet.prepare_publish(&self.node, pv, pod);
        self.c
            .node
            .clone()
            .node_publish_volume(self.kubelet.publish_req(pv, pod))
            .await
            .unwrap_or_else(|e| panic!("NodePublishVolume {}: {e}", pv.name));
        self.node.host(&self.kubelet.target(pv, pod))
    }

    pub async fn unpublish(&self, pv: &Pv, pod: &Pod) {
        self.c
            .node
            .clone()
            .node_unpublish_volume(self.kubelet.unpublish_req(pv, pod))
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume {}: {e}", pv.name));
        let target = self.node.host(&self.kubelet.target(pv, pod));
        assert!(
            mounted(&target).is_none(),
            "{} is still mounted",
            target.display()
        );
        assert!(
            !target.exists(),
            "the driver left {} behind",
            target.display()
        );
        self.kubelet.after_unpublish(&self.node, pv, pod);
    }

    pub async fn unstage(&self, pv: &Pv) {
        self.c
            .node
            .clone()
            .node_unstage_volume(self.kubelet.unstage_req(pv))
            .await
            .unwrap_or_else(|e| panic!("NodeUnstageVolume {}: {e}", pv.name));
        let staging = self.node.host(&self.kubelet.staging(pv));
        assert!(
            mounted(&staging).is_none(),
            "{} is still mounted",
            staging.display()
        );
        self.kubelet.after_unstage(&self.node, pv);
    }

    pub async fn stats(&self, pv: &Pv, pod: &Pod) -> NodeGetVolumeStatsResponse {
        let r = self
            .c
            .node
            .clone()
            .node_get_volume_stats(self.kubelet.stats_req(pv, pod))
            .await
            .unwrap_or_else(|e| panic!("NodeGetVolumeStats {}: {e}", pv.name))
            .into_inner();
        let condition = r.volume_condition.clone().expect("a volume condition");
        assert!(
            !condition.abnormal,
            "{} is abnormal: {}",
            pv.name, condition.message
        );
        r
    }

    /// An expansion as csi-resizer and kubelet do it: ControllerExpandVolume
    /// when the controller offers it, then NodeExpandVolume when the
    /// controller asks for it or has no expansion (`--node-only-expansion`).
    pub async fn expand(&self, pv: &mut Pv, pod: &Pod, bytes: i64) {
        let caps = self
            .c
            .controller
            .clone()
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        let controller_expands = caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(CtrlCap::Rpc(r)) if r.r#type == CtrlType::ExpandVolume as i32)
        });
        let mut node_expands = true;
        if controller_expands {
            let r = self
                .c
                .controller
                .clone()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: pv.handle.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(pv.capability.clone()),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("ControllerExpandVolume {}: {e}", pv.name))
                .into_inner();
            node_expands = r.node_expansion_required;
        }
        if node_expands {
            let r = self
                .c
                .node
                .clone()
                .node_expand_volume(self.kubelet.expand_req(pv, pod, bytes))
                .await
                .unwrap_or_else(|e| panic!("NodeExpandVolume {}: {e}", pv.name))
                .into_inner();
            assert!(
                r.capacity_bytes >= bytes,
                "expanded to {}",
                r.capacity_bytes
            );
        }
        pv.capacity = bytes;
    }

    /// CreateSnapshot as csi-snapshotter sends it (the example
    /// VolumeSnapshotClass has no parameters).
    pub async fn snapshot(&mut self, pv: &Pv) -> String {
        self.serial += 1;
        let s = self
            .c
            .controller
            .clone()
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: pv.handle.clone(),
                name: format!("snapshot-{}-{}", self.node.tag, self.serial),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateSnapshot of {}: {e}", pv.name))
            .into_inner()
            .snapshot
            .unwrap();
        assert!(s.ready_to_use);
        s.snapshot_id
    }

    pub async fn delete_snapshot(&self, id: &str) {
        self.c
            .controller
            .clone()
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteSnapshot {id}: {e}"));
    }

    pub async fn delete(&self, pv: &Pv) {
        self.c
            .controller
            .clone()
            .delete_volume(DeleteVolumeRequest {
                volume_id: pv.handle.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume {}: {e}", pv.name));
        assert!(
            !self.volume_file(pv).exists(),
            "{} is still in the pool",
            pv.handle
        );
    }

    /// Stops and removes the driver, then checks that nothing is left:
    /// no mounts under the node, no loop devices on its files, no containers,
    /// no volumes in the pool.
    pub async fn finish(mut self) {
        self.node.stop(&self.container);
        self.node.remove_containers();
        assert_eq!(self.node.leftover_containers(), Vec::<String>::new());
        assert_eq!(
            self.node.mounts(),
            Vec::<PathBuf>::new(),
            "mounts left on the node"
        );
        assert_eq!(
            self.node.settled_loops().await,
            Vec::<u32>::new(),
            "loop devices left"
        );
        let left: Vec<_> = std::fs::read_dir(self.pool_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".hostpath-csi")
            .collect();
        assert!(left.is_empty(), "left in the pool: {left:?}");
    }
}

pub fn volume_source(id: &str) -> VolumeContentSource {
    use volume_content_source::{Type, VolumeSource};
    VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    }
}

pub fn snapshot_source(id: &str) -> VolumeContentSource {
    use volume_content_source::{SnapshotSource, Type};
    VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    }
}

/// The mount at `path` as this machine (the host, not the container) sees it.
pub fn mounted(path: &Path) -> Option<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    hostpath_csi::mount::parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}
