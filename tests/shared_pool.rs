//! A pool marked `shared: true` (storage every node mounts, e.g. an RWX
//! pvcTemplate): volumes carry no topology and accept multi-node modes.

mod common;

use common::*;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tonic::Code;

#[tokio::test]
async fn shared_pool_volumes_have_no_topology_and_accept_multi_node_modes() {
    let pools = tempfile::Builder::new()
        .prefix("hpc-shared-")
        .tempdir()
        .unwrap();
    let json = serde_json::json!([
        {"name": "local", "path": pools.path().join("local")},
        {"name": "nfs", "path": pools.path().join("nfs"), "shared": true},
    ])
    .to_string();
    let mut d = Driver::start_with_datadir(&json).await;
    let mut r = create_req("pvc-rwx", GIB, mount_cap(Mode::MultiNodeMultiWriter));
    r.parameters = params(&[("storagePool", "nfs")]);
    // Requirements naming other nodes do not matter for shared storage.
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: params(&[("topology.hostpath.csi/node", "another-node")]),
        }],
        preferred: vec![],
    });
    let v =
        d.c.controller
            .create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert!(v.accessible_topology.is_empty());
    assert!(pools.path().join("nfs/pvc-rwx").is_dir());
    let ok =
        d.c.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-rwx".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(ok.confirmed.is_some());
    // The default (node-local) pool still refuses them.
    let r = create_req("pvc-local-rwx", GIB, mount_cap(Mode::MultiNodeMultiWriter));
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
    drop(d);
}
