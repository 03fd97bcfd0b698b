//! Hostile and malformed requests get the CSI spec's code, and nothing is
//! created outside the pool.

mod common;

use std::path::Path;

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
    let (target, invalid) = (d.path("target"), Code::InvalidArgument);
    for name in bad_names() {
        let r = d.c.controller.create_volume(dir_volume(&name, GIB)).await;
        assert_code(&r, invalid, &format!("CreateVolume {name:?}"));
        let r = d.c.controller.delete_volume(delete_req(&name)).await;
        assert_code(&r, invalid, &format!("DeleteVolume {name:?}"));
        let r =
            d.c.node
                .node_publish_volume(unstaged_publish_req(&name, &target, rwo()));
        assert_code(&r.await, invalid, &format!("NodePublishVolume {name:?}"));
        let r =
            d.c.controller
                .create_snapshot(snapshot_req(&name, "src"))
                .await;
        assert_code(&r, invalid, &format!("CreateSnapshot {name:?}"));
        let r =
            d.c.controller
                .controller_expand_volume(grow_req(&name, GIB, None));
        assert_code(
            &r.await,
            invalid,
            &format!("ControllerExpandVolume {name:?}"),
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
    let with = |req: i64, lim: i64| CreateVolumeRequest {
        capacity_range: Some(CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        }),
        ..dir_volume("pvc-cap", 0)
    };
    let block = CreateVolumeRequest {
        volume_capabilities: vec![block_rwo()],
        ..with(0, 1000)
    };
    for (what, req, want) in [
        ("a negative size", with(-5, 0), Code::InvalidArgument),
        ("a negative limit", with(0, -5), Code::InvalidArgument),
        (
            "a limit below the size",
            with(GIB, MIB),
            Code::InvalidArgument,
        ),
        ("the largest size", with(i64::MAX, 0), Code::OutOfRange),
        (
            "a block volume under 4 KiB cannot exist",
            block,
            Code::OutOfRange,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
    // Zero means "unspecified": allowed.
    assert_eq!(create_ok(&mut d.c, with(0, 0)).await.capacity_bytes, 0);
}

#[tokio::test]
async fn unknown_pool_and_parameters() {
    let mut d = Driver::start().await;
    let with = |name: &str, p: &[(&str, &str)]| with_params(dir_volume(name, GIB), p);
    for (k, v) in [
        ("layout", "weird"),
        ("preallocation", "maybe"),
        ("blockSize", "1000"),
    ] {
        let e = d.c.controller.create_volume(with("pvc-p", &[(k, v)])).await;
        let e = e.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(k), "{}", e.message());
    }
    let provisioners = [
        ("csi.storage.k8s.io/pvc/name", "x"),
        ("csi.storage.k8s.io/pvc/namespace", "y"),
    ];
    for (what, req, want) in [
        (
            "a pool name that is a path",
            with("pvc-p", &[("storagePool", "../../etc")]),
            Code::InvalidArgument,
        ),
        (
            "parameters the provisioner adds are accepted",
            with("pvc-p", &provisioners),
            Code::Ok,
        ),
        (
            "enforceSize on a directory volume cannot be honoured here",
            with("pvc-enforce", &[("enforceSize", "true")]),
            Code::FailedPrecondition,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
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
                .create_volume(create_req("pvc-m", GIB, mount_cap(mode)));
        let e = r.await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(mode.as_str_name()), "{}", e.message());
    }
}

#[tokio::test]
async fn target_paths_must_be_absolute() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-t", GIB)).await;
    for target in ["", "relative/target", "../../x", "/tmp/../etc/x"].map(Path::new) {
        let r =
            d.c.node
                .node_publish_volume(unstaged_publish_req("pvc-t", target, rwo()));
        assert_code(
            &r.await,
            Code::InvalidArgument,
            &format!("publish at {target:?}"),
        );
        let r =
            d.c.node
                .node_unpublish_volume(unpublish_req("pvc-t", target));
        assert_code(
            &r.await,
            Code::InvalidArgument,
            &format!("unpublish at {target:?}"),
        );
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
    let t = d.path("t");
    let r =
        d.c.node
            .node_publish_volume(unstaged_publish_req("pvc-link", &t, rwo()));
    assert_code(&r.await, Code::NotFound, "a publish of a planted link");
    delete_ok(&mut d.c, "pvc-link").await;
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"do not touch"
    );
    // Creating over the link does not write through it.
    let r =
        d.c.controller
            .create_volume(dir_volume("pvc-link", GIB))
            .await;
    assert_code(&r, Code::AlreadyExists, "a create over a planted link");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}
