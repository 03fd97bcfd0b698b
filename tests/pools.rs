//! Pools: a pvcTemplate pool waits for its mount before anything is
//! written to it, and becomes ready by itself once the mount appears.

mod common;

use common::*;
use hostpath_csi::proto::*;
use tonic::Code;

#[tokio::test]
async fn pvc_template_pool_waits_for_its_mount() {
    let base = tempfile::Builder::new()
        .prefix("hpc-pools-")
        .tempdir()
        .unwrap();
    let mounted = base.path().join("pvc-pool/csi");
    let json = serde_json::json!([
        {"name": "local", "path": base.path().join("local")},
        {"name": "template", "path": mounted, "requireMount": true},
    ])
    .to_string();
    let mut d = Driver::start_with_datadir(&json).await;
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        probe.ready,
        Some(true),
        "a pool without its mount must not fail the liveness probe"
    );
    let r = with_params(
        dir_volume("pvc-early", 64 * MIB),
        &[("storagePool", "template")],
    );
    let early = d.c.controller.create_volume(r.clone()).await;
    assert_code(&early, Code::Unavailable, "a create before the mount");
    let cap = GetCapacityRequest {
        parameters: params(&[("storagePool", "template")]),
        ..Default::default()
    };
    let c = d.c.controller.get_capacity(cap).await.unwrap().into_inner();
    assert_eq!(
        c.available_capacity, 0,
        "a pool waiting for its mount offers nothing"
    );
    assert_eq!(
        std::fs::read_dir(&mounted).unwrap().count(),
        0,
        "nothing may be written under the mount point"
    );
    // The mounter mounts the pool's filesystem; the driver picks it up.
    let fs = LoopFs::new("xfs", 320);
    nix::mount::mount(
        Some(&fs.mount_point),
        &mounted,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(mounted.clone());
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    create_ok(&mut d.c, r).await;
    assert!(
        fs.mount_point.join("pvc-early").is_dir(),
        "the volume lands on the mounted filesystem"
    );
    delete_ok(&mut d.c, "pvc-early").await;
    drop(d);
}
