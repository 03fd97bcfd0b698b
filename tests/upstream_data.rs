//! Data the Go driver left in a pool is adopted, never damaged: its
//! snapshots (`<snapshotPath>/<id>/data` beside an empty directory named
//! after the source volume) are listed and restorable, and a snapshot
//! directory inside the pool is never a volume.

mod common;

use std::fs;

use common::*;
use hostpath_csi::proto::*;
use tonic::Code;

#[tokio::test]
async fn go_driver_snapshots_are_listed_and_restorable_and_never_volumes() {
    let base = tempfile::Builder::new()
        .prefix("hpc-upstream-")
        .tempdir()
        .unwrap();
    let pool = base.path().join("csi");
    let snapshots = pool.join("snapshots");
    // What the Go driver's reflink provider leaves.
    std::fs::create_dir_all(snapshots.join("snap-go/data/sub")).unwrap();
    std::fs::create_dir_all(snapshots.join("snap-go/pvc-src")).unwrap();
    std::fs::write(snapshots.join("snap-go/data/sub/disk.img"), b"vm disk").unwrap();
    let json = serde_json::json!([
        {"name": "local", "path": pool, "snapshotPath": snapshots, "snapshotProvider": "reflink"}
    ])
    .to_string();
    let mut d = Driver::start_with_datadir(&json).await;
    let listed = listed_ids(&mut d.c).await;
    assert!(
        listed.is_empty(),
        "the snapshot directory was listed as a volume: {listed:?}"
    );
    let snaps =
        d.c.controller
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
    assert_eq!(snaps.len(), 1);
    let s = snaps[0].snapshot.clone().unwrap();
    assert_eq!(
        (s.snapshot_id.as_str(), s.source_volume_id.as_str()),
        ("snap-go", "pvc-src")
    );
    assert!(s.ready_to_use);
    create_ok(
        &mut d.c,
        restore_of(dir_volume("pvc-restored", GIB), "snap-go"),
    )
    .await;
    assert_eq!(
        std::fs::read(pool.join("pvc-restored/sub/disk.img")).unwrap(),
        b"vm disk"
    );
    // Deleting "snapshots" as if it were a volume touches nothing.
    let r = d.c.controller.delete_volume(delete_req("snapshots")).await;
    assert_code(&r, Code::Ok, "a delete of the snapshot directory");
    assert!(snapshots.join("snap-go/data/sub/disk.img").exists());
    let get = ControllerGetVolumeRequest {
        volume_id: "snapshots".into(),
    };
    let r = d.c.controller.controller_get_volume(get).await;
    assert_code(&r, Code::NotFound, "the snapshot directory as a volume");
    // The Go driver's snapshot is deleted like ours.
    let r =
        d.c.controller
            .delete_snapshot(delete_snapshot_req("snap-go"));
    r.await.unwrap();
    assert!(!snapshots.join("snap-go").exists());
}

/// The Go driver's inline ephemeral volume (`csi-<sha256>`, a directory
/// without metadata), published again by kubelet after the image swap: it
/// is served as it is, never taken over as a persistent volume, and goes
/// at its last unpublish, as the Go driver would remove it.
#[tokio::test]
async fn go_driver_inline_volumes_are_served_and_removed_never_adopted() {
    let mut d = Driver::start().await;
    let id = format!("csi-{}", "0a".repeat(32));
    let dir = d.pool().join(&id);
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("scratch"), b"pod data").unwrap();
    let target = d.path("pods/uid/volumes/kubernetes.io~csi/scratch/mount");
    d.c.node
        .node_publish_volume(ephemeral_publish_req(&id, &target, &[]))
        .await
        .unwrap();
    assert_eq!(fs::read(target.join("scratch")).unwrap(), b"pod data");
    assert!(
        !d.pool()
            .join(format!(".hostpath-csi/volumes/{id}.json"))
            .exists(),
        "the Go driver's inline volume was adopted"
    );
    d.c.node
        .node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(!is_mount_point(&target));
    eventually_removed(&d, &id).await;
}
