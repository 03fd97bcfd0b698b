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
    let rwx = |name: &str| create_req(name, GIB, mount_cap(Mode::MultiNodeMultiWriter));
    let mut r = with_params(rwx("pvc-rwx"), &[("storagePool", "nfs")]);
    // Requirements naming other nodes do not matter for shared storage.
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: params(&[("topology.hostpath.csi/node", "another-node")]),
        }],
        preferred: vec![],
    });
    let v = create_ok(&mut d.c, r).await;
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
    let r = d.c.controller.create_volume(rwx("pvc-local-rwx")).await;
    assert_code(
        &r,
        Code::InvalidArgument,
        "a multi-node mode in a node-local pool",
    );
    drop(d);
}
