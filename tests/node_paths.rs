//! Issue 9 item 5: node RPCs undo only what this driver did at that path
//! for that volume. Foreign mounts and files at a target, the wrong
//! volume_id at unstage, targets behind a symlinked parent, Block publish
//! onto a file with content, and NUL bytes in paths.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use hostpath_csi::proto::*;
use tonic::Code;

/// Image volumes are at least this big (mkfs.xfs refuses less than 300 MB).
const IMAGE_SIZE: i64 = 320 * MIB;

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: &Result<T, tonic::Status>, what: &str) {
    match r {
        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::AlreadyExists) => {}
        other => panic!("{what}: want FAILED_PRECONDITION or ALREADY_EXISTS, got {other:?}"),
    }
}

/// A directory with a marker file, to bind-mount somewhere as a foreign mount.
fn foreign_dir(d: &Driver, name: &str) -> std::path::PathBuf {
    let dir = d.path(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("marker"), name.as_bytes()).unwrap();
    dir
}

/// Unpublish at a target that holds a foreign bind mount, or another
/// volume's publication, succeeds and leaves the mount in place.
#[tokio::test]
async fn unpublish_leaves_a_foreign_or_other_volumes_mount_alone() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("a", GIB)).await;
    create_ok(&mut d.c, dir_volume("b", GIB)).await;
    let foreign = foreign_dir(&d, "foreign");
    let target = d.path("pods/a");
    fs::create_dir_all(&target).unwrap();
    let _mount = MountGuard::bind(&foreign, &target);
    unpublish_ok(&mut d.c, "a", &target).await;
    assert!(
        is_mount_point(&target),
        "a foreign bind mount was unmounted"
    );
    assert_eq!(fs::read(target.join("marker")).unwrap(), b"foreign");

    let b_target = d.path("pods/b");
    stage_publish(&mut d.c, "b", &b_target, rwo()).await;
    fs::write(b_target.join("mine"), b"b's data").unwrap();
    unpublish_ok(&mut d.c, "a", &b_target).await;
    assert!(
        is_mount_point(&b_target),
        "b's publication was undone by a's unpublish"
    );
    assert_eq!(fs::read(b_target.join("mine")).unwrap(), b"b's data");
    unpublish_unstage(&mut d.c, "b", &b_target).await;
    assert!(!is_mount_point(&b_target));
}

/// Unpublish at a target that is a pre-existing regular file with content,
/// or a non-empty directory, succeeds and leaves it untouched.
#[tokio::test]
async fn unpublish_leaves_a_foreign_file_or_directory_alone() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("a", GIB)).await;
    let file = d.path("pods/file-target");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, b"someone's file").unwrap();
    let req = unpublish_req("a", &file);
    let r = d.c.node.node_unpublish_volume(req).await;
    assert_eq!(
        fs::read(&file).ok().as_deref(),
        Some(&b"someone's file"[..]),
        "the file at the target was changed or deleted"
    );
    r.unwrap();

    let dir = foreign_dir(&d, "pods/dir-target");
    let req = unpublish_req("a", &dir);
    let r = d.c.node.node_unpublish_volume(req).await;
    assert_eq!(fs::read(dir.join("marker")).unwrap(), b"pods/dir-target");
    r.unwrap();
}

/// NodeUnstageVolume naming volume B at the staging path where image
/// volume A is staged: OK, and A stays mounted with its loop device.
#[tokio::test]
async fn unstage_with_the_wrong_volume_id_leaves_the_staged_volume_alone() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("a", IMAGE_SIZE, "")).await;
    create_ok(&mut d.c, image_volume("b", IMAGE_SIZE, "")).await;
    let target = d.path("pods/a");
    stage_publish(&mut d.c, "a", &target, rwo()).await;
    fs::write(target.join("vm-disk"), b"running").unwrap();
    let staging = staging_for(&target);
    let r =
        d.c.node
            .node_unstage_volume(unstage_req("b", &staging))
            .await;
    assert!(is_mount_point(&staging), "a's staging mount was undone");
    let a_file = d.pool().join("a");
    assert!(
        loops_under(d.pool()).contains(&a_file),
        "a's loop device was detached under its user"
    );
    assert_eq!(fs::read(target.join("vm-disk")).unwrap(), b"running");
    assert_eq!(code(&r), Code::Ok, "{r:?}");
    unpublish_unstage(&mut d.c, "a", &target).await;
    assert!(!is_mount_point(&staging));
}

/// Publish onto a target that already holds another volume's mount or a
/// foreign mount is refused, and the mount there stays as it was.
#[tokio::test]
async fn publish_onto_an_occupied_target_is_refused() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("a", GIB)).await;
    create_ok(&mut d.c, dir_volume("b", GIB)).await;
    let target = d.path("pods/shared");
    stage_publish(&mut d.c, "b", &target, rwo()).await;
    fs::write(target.join("mine"), b"b's data").unwrap();
    let staging = staging_for(&target);
    d.c.node
        .node_stage_volume(stage_req("a", &staging, rwo()))
        .await
        .unwrap();
    let r =
        d.c.node
            .node_publish_volume(publish_req("a", &target, rwo()))
            .await;
    assert_refused(&r, "publish of a onto b's target");
    assert_eq!(mount_count(&target), 1, "a mount was stacked on b's");
    assert_eq!(fs::read(target.join("mine")).unwrap(), b"b's data");

    let foreign = foreign_dir(&d, "foreign");
    let other = d.path("pods/foreign");
    fs::create_dir_all(&other).unwrap();
    let _mount = MountGuard::bind(&foreign, &other);
    let r =
        d.c.node
            .node_publish_volume(publish_req("a", &other, rwo()))
            .await;
    assert_refused(&r, "publish of a onto a foreign mount");
    assert_eq!(
        mount_count(&other),
        1,
        "a mount was stacked on a foreign one"
    );
    assert_eq!(fs::read(other.join("marker")).unwrap(), b"foreign");
}

/// A target whose parent is a symlink: the same publish twice is
/// idempotent, with exactly one mount at the resolved path.
#[tokio::test]
async fn publish_through_a_symlinked_parent_is_idempotent() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("a", GIB)).await;
    let real = d.path("real-pods");
    fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, d.path("pods")).unwrap();
    let target = d.path("pods/a");
    let resolved = real.join("a");
    stage_publish(&mut d.c, "a", &target, rwo()).await;
    assert_eq!(mount_count(&resolved), 1);
    publish_ok(&mut d.c, "a", &target, rwo()).await;
    assert_eq!(
        mount_count(&resolved),
        1,
        "the second publish stacked another mount"
    );
    unpublish_unstage(&mut d.c, "a", &target).await;
    assert_eq!(mount_count(&resolved), 0, "unpublish left a mount behind");
}

/// A Block publish onto an existing file with content is refused; the
/// file is neither mounted over nor deleted.
#[tokio::test]
async fn block_publish_onto_a_file_with_content_is_refused() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("blk", 64 * MIB)).await;
    let target = d.path("pods/blk");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::write(&target, b"someone's data").unwrap();
    let cap = block_rwo();
    let staging = staging_for(&target);
    fs::create_dir_all(&staging).unwrap();
    d.c.node
        .node_stage_volume(stage_req("blk", &staging, cap.clone()))
        .await
        .unwrap();
    let req = publish_req("blk", &target, cap);
    let r = d.c.node.node_publish_volume(req).await;
    let mounted = is_mount_point(&target);
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(!mounted, "the device was mounted over the file");
    let req = unpublish_req("blk", &target);
    let r = d.c.node.node_unpublish_volume(req).await;
    assert_eq!(
        fs::read(&target).ok().as_deref(),
        Some(&b"someone's data"[..]),
        "the file at the target was changed or deleted"
    );
    r.unwrap();
}

/// A NUL byte in target_path, staging_target_path or volume_path is
/// INVALID_ARGUMENT, in every node RPC that takes one.
#[tokio::test]
async fn nul_bytes_in_paths_are_invalid_argument() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("a", GIB)).await;
    let (bad, good) = (d.path("pods/a\0b"), d.path("pods/ok"));
    let n = &mut d.c.node;
    let publish = |target: &Path, staging: &Path| NodePublishVolumeRequest {
        staging_target_path: s(staging),
        ..publish_req("a", target, rwo())
    };
    let mut codes = Vec::new();
    let req = stage_req("a", &bad, rwo());
    codes.push(("stage", code(&n.node_stage_volume(req).await)));
    let req = publish(&bad, &good);
    codes.push(("publish target", code(&n.node_publish_volume(req).await)));
    let req = publish(&good, &bad);
    codes.push(("publish staging", code(&n.node_publish_volume(req).await)));
    let req = unpublish_req("a", &bad);
    codes.push(("unpublish", code(&n.node_unpublish_volume(req).await)));
    let req = unstage_req("a", &bad);
    codes.push(("unstage", code(&n.node_unstage_volume(req).await)));
    let req = stats_req("a", &bad);
    codes.push(("stats", code(&n.node_get_volume_stats(req).await)));
    let req = NodeExpandVolumeRequest {
        volume_id: "a".into(),
        volume_path: s(&bad),
        ..Default::default()
    };
    codes.push(("expand", code(&n.node_expand_volume(req).await)));
    let wrong: Vec<_> = codes
        .iter()
        .filter(|(_, c)| *c != Code::InvalidArgument)
        .collect();
    assert!(wrong.is_empty(), "not INVALID_ARGUMENT: {wrong:?}");
}

/// A target or staging path inside a storage pool names (or could name) a
/// volume: publish and stage there are INVALID_ARGUMENT, and an unpublish
/// naming an empty volume directory leaves it (it used to remove it).
#[tokio::test]
async fn paths_inside_a_pool_are_refused_and_never_removed() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("x", 64 * MIB)).await;
    create_ok(&mut d.c, dir_volume("y", 64 * MIB)).await;
    let y = d.pool().join("y");
    let r = d.c.node.node_unpublish_volume(unpublish_req("x", &y)).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(y.is_dir(), "an unpublish removed an empty volume directory");
    let inside = d.pool().join("y/t");
    let r =
        d.c.node
            .node_publish_volume(publish_req("x", &inside, rwo()))
            .await;
    assert_code(&r, Code::InvalidArgument, "publish into a pool");
    let r =
        d.c.node
            .node_stage_volume(stage_req("x", &inside, rwo()))
            .await;
    assert_code(&r, Code::InvalidArgument, "stage into a pool");
    assert!(listed_ids(&mut d.c).await.contains(&"y".to_owned()));
}

/// A path longer than the kernel takes (or with a name longer than a name
/// can be) is INVALID_ARGUMENT, not INTERNAL, in publish and stage.
#[tokio::test]
async fn over_long_paths_are_invalid_argument() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("v", 64 * MIB)).await;
    let long_name = d.path(&"n".repeat(300));
    let long_path = d.path(&"d/".repeat(2100));
    for p in [&long_name, &long_path] {
        let r =
            d.c.node
                .node_publish_volume(publish_req("v", p, rwo()))
                .await;
        assert_code(&r, Code::InvalidArgument, "an over-long target_path");
        let r = d.c.node.node_stage_volume(stage_req("v", p, rwo())).await;
        assert_code(
            &r,
            Code::InvalidArgument,
            "an over-long staging_target_path",
        );
    }
}
