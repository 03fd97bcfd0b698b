//! Hostile and malformed requests get the CSI spec's code, and nothing is
//! created outside the pool.

mod common;

use common::*;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tonic::Code;

fn bad_names() -> Vec<String> {
    vec![
        "..".into(),
        ".".into(),
        "a/b".into(),
        "/abs".into(),
        "../escape".into(),
        "".into(),
        "nul\0byte".into(),
        "x".repeat(4096),
        "ünïcödé".into(),
        ".hostpath-csi".into(),
        "space name".into(),
    ]
}

#[tokio::test]
async fn bad_names_are_invalid_everywhere_and_touch_nothing() {
    let mut d = Driver::start().await;
    let before_dir = tree(d.dir.path());
    let parent = d.dir.path().parent().unwrap().to_path_buf();
    let before_parent: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    for name in bad_names() {
        let r =
            d.c.controller
                .create_volume(create_req(&name, GIB, rwo()))
                .await;
        assert_eq!(code(&r), Code::InvalidArgument, "CreateVolume {name:?}");
        let r =
            d.c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: name.clone(),
                    ..Default::default()
                })
                .await;
        assert_eq!(code(&r), Code::InvalidArgument, "DeleteVolume {name:?}");
        let r =
            d.c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: name.clone(),
                    target_path: d.path("target").to_string_lossy().into(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await;
        assert_eq!(
            code(&r),
            Code::InvalidArgument,
            "NodePublishVolume {name:?}"
        );
        let r =
            d.c.controller
                .create_snapshot(CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: "src".into(),
                    ..Default::default()
                })
                .await;
        assert_eq!(code(&r), Code::InvalidArgument, "CreateSnapshot {name:?}");
        let r =
            d.c.controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: name.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: GIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await;
        assert_eq!(
            code(&r),
            Code::InvalidArgument,
            "ControllerExpandVolume {name:?}"
        );
    }
    assert_eq!(
        tree(d.dir.path()),
        before_dir,
        "nothing may be created by refused requests"
    );
    let after_parent: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(after_parent.iter().all(|n| before_parent.contains(n)
        || n.to_string_lossy().starts_with("hpc-")
        || n.to_string_lossy().starts_with(".tmp")));
    assert!(!parent.join("escape").exists());
}

#[tokio::test]
async fn capacities_out_of_range() {
    let mut d = Driver::start().await;
    let with = |req: i64, lim: i64| {
        let mut r = create_req("pvc-cap", 0, rwo());
        r.capacity_range = Some(CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        });
        r
    };
    assert_eq!(
        code(&d.c.controller.create_volume(with(-5, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.controller.create_volume(with(0, -5)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.controller.create_volume(with(GIB, MIB)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.controller.create_volume(with(i64::MAX, 0)).await),
        Code::OutOfRange
    );
    let mut block = with(0, 1000);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    assert_eq!(
        code(&d.c.controller.create_volume(block).await),
        Code::OutOfRange,
        "a block volume under 4 KiB cannot exist"
    );
    // Zero means "unspecified": allowed.
    let v =
        d.c.controller
            .create_volume(with(0, 0))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.capacity_bytes, 0);
}

#[tokio::test]
async fn unknown_pool_and_parameters() {
    let mut d = Driver::start().await;
    let mut r = create_req("pvc-p", GIB, rwo());
    r.parameters = params(&[("storagePool", "../../etc")]);
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
    for (k, v) in [
        ("layout", "weird"),
        ("preallocation", "maybe"),
        ("blockSize", "1000"),
    ] {
        let mut r = create_req("pvc-p", GIB, rwo());
        r.parameters = params(&[(k, v)]);
        let e = d.c.controller.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(k), "{}", e.message());
    }
    // Parameters the provisioner adds are accepted.
    let mut r = create_req("pvc-p", GIB, rwo());
    r.parameters = params(&[
        ("csi.storage.k8s.io/pvc/name", "x"),
        ("csi.storage.k8s.io/pvc/namespace", "y"),
    ]);
    assert_eq!(code(&d.c.controller.create_volume(r).await), Code::Ok);
    // enforceSize on a directory volume cannot be honoured here.
    let mut r = create_req("pvc-enforce", GIB, rwo());
    r.parameters = params(&[("enforceSize", "true")]);
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn multi_node_modes_are_refused() {
    let mut d = Driver::start().await;
    for mode in [
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter,
    ] {
        let r =
            d.c.controller
                .create_volume(create_req("pvc-m", GIB, mount_cap(mode)))
                .await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(mode.as_str_name()), "{}", e.message());
    }
}

#[tokio::test]
async fn target_paths_must_be_absolute() {
    let mut d = Driver::start().await;
    d.c.controller
        .create_volume(create_req("pvc-t", GIB, rwo()))
        .await
        .unwrap();
    for target in ["", "relative/target", "../../x", "/tmp/../etc/x"] {
        let r =
            d.c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: "pvc-t".into(),
                    target_path: target.into(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await;
        assert_eq!(code(&r), Code::InvalidArgument, "{target:?}");
        let r =
            d.c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: "pvc-t".into(),
                    target_path: target.into(),
                })
                .await;
        assert_eq!(code(&r), Code::InvalidArgument, "{target:?}");
    }
    assert!(!std::path::Path::new("relative").exists());
}

#[tokio::test]
async fn symlink_planted_in_pool_is_never_followed() {
    let mut d = Driver::start().await;
    let outside = d.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"do not touch").unwrap();
    std::os::unix::fs::symlink(&outside, d.pool().join("pvc-link")).unwrap();
    // Not a volume: not listed, not publishable, not deletable through the link.
    let list =
        d.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(list.entries.is_empty());
    let r =
        d.c.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: "pvc-link".into(),
                target_path: d.path("t").to_string_lossy().into(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::NotFound);
    d.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-link".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"do not touch"
    );
    // Creating over the link does not write through it.
    let r =
        d.c.controller
            .create_volume(create_req("pvc-link", GIB, rwo()))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}
