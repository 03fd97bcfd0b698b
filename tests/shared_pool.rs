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

/// An image volume holds one filesystem, which only one node may mount: on
/// a shared pool, multi-node modes (a live migration mounts an RWX claim
/// on two nodes) are refused at create, unconfirmed in validation and
/// refused at stage; a MULTI_NODE_READER_ONLY publish is read-only.
#[tokio::test]
async fn image_volumes_refuse_multi_node_modes_and_rox_publishes_read_only() {
    let pools = tempfile::Builder::new()
        .prefix("hpc-shared-")
        .tempdir()
        .unwrap();
    let json = serde_json::json!([
        {"name": "nfs", "path": pools.path().join("nfs"), "shared": true},
    ])
    .to_string();
    let mut d = Driver::start_with_datadir(&json).await;
    let image = |name: &str, mode: Mode| {
        let mut cap = mount_cap(mode);
        if let Some(volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.fs_type = "xfs".into();
        }
        with_params(create_req(name, 400 * MIB, cap), &[("layout", "image")])
    };
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
    ] {
        let r =
            d.c.controller
                .create_volume(image("pvc-img-rwx", mode))
                .await;
        assert_code(&r, Code::InvalidArgument, "a multi-node image volume");
    }
    create_ok(&mut d.c, image("pvc-img", Mode::SingleNodeWriter)).await;
    let v =
        d.c.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-img".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(v.confirmed.is_none(), "{v:?}");
    let staging = d.path("staging/img");
    let r =
        d.c.node
            .node_stage_volume(stage_req(
                "pvc-img",
                &staging,
                mount_cap(Mode::MultiNodeMultiWriter),
            ))
            .await;
    assert_code(
        &r,
        Code::FailedPrecondition,
        "staging an image for many nodes",
    );
    assert!(!is_mount_point(&staging));

    // ROX publishes read-only even when the request's readonly is false.
    create_ok(
        &mut d.c,
        with_params(
            create_req("pvc-rox", GIB, mount_cap(Mode::MultiNodeReaderOnly)),
            &[("storagePool", "nfs")],
        ),
    )
    .await;
    let t = d.path("pods/rox");
    let cap = mount_cap(Mode::MultiNodeReaderOnly);
    d.c.node
        .node_stage_volume(stage_req("pvc-rox", &staging_for(&t), cap.clone()))
        .await
        .unwrap();
    d.c.node
        .node_publish_volume(publish_req("pvc-rox", &t, cap))
        .await
        .unwrap();
    let w = std::fs::write(t.join("x"), b"no");
    assert!(w.is_err(), "a ROX publish is writable");
    unpublish_unstage(&mut d.c, "pvc-rox", &t).await;
    drop(d);
}
