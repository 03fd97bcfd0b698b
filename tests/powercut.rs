//! Issue 9 item 3: a power cut at any instant is a normal event. The pool
//! and a separate `snapshotPath` are loop-mounted XFS filesystems; a cut is
//! `xfs_io -x -c shutdown` (nothing more reaches the disk), then the driver
//! is killed, both filesystems are mounted again (log recovery) and the
//! driver restarts. Every acknowledged change must be there, and no volume
//! may be lost.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hostpath_csi::client::Clients;

/// Volumes expanded concurrently when the power is cut mid-storm.
const STORM_EXPANDS: usize = 24;
/// Volumes created concurrently in the same storm (their flushes force the
/// log, carrying other RPCs' half-written metadata with them).
const STORM_CREATES: usize = 24;
/// Snapshots taken in the same storm.
const STORM_SNAPSHOTS: usize = 4;
/// The cut comes once this many of the storm's RPCs have answered.
const CUT_AFTER: usize = 12;
/// Storms, each with its own cut.
const STORM_ROUNDS: usize = 2;
const RPC_BOUND: Duration = Duration::from_secs(120);

/// A driver on an XFS pool with its snapshots on another XFS filesystem.
struct Rig {
    pool_fs: LoopFs,
    snap_fs: LoopFs,
    d: Driver,
}

impl Rig {
    async fn new() -> Rig {
        let pool_fs = LoopFs::new("xfs", 1536);
        let snap_fs = LoopFs::new("xfs", 512);
        let json = serde_json::json!([{
            "name": "p",
            "path": pool_fs.mount_point.join("pool"),
            "snapshotPath": snap_fs.mount_point.join("snapshots"),
        }])
        .to_string();
        let d = Driver::start_with_datadir(&json).await;
        Rig {
            pool_fs,
            snap_fs,
            d,
        }
    }

    /// Cuts the power on both filesystems, then recovers and restarts.
    async fn power_cut(&mut self) {
        self.snap_fs.shutdown();
        self.pool_fs.shutdown();
        self.recover().await;
    }

    async fn recover(&mut self) {
        self.d.kill9();
        self.pool_fs.remount();
        self.snap_fs.remount();
        self.d.restart().await;
    }

    fn file(&self, id: &str) -> std::path::PathBuf {
        self.d.pool().join(id)
    }
}

/// Expand and modify acknowledged just before the cut are all there.
#[tokio::test]
async fn acknowledged_expand_and_modify_survive_a_power_cut() {
    let mut rig = Rig::new().await;
    let c = &mut rig.d.c.clone();
    create_ok(c, block_volume("blk", 64 * MIB)).await;
    create_ok(c, image_volume("img", 320 * MIB, "")).await;
    create_ok(c, block_volume("thin", 64 * MIB)).await;
    write_pattern(&rig.d.pool().join("blk"), HEAD, 7);
    let want = pattern_digest(7);
    let c = &mut rig.d.c.clone();
    c.controller
        .controller_expand_volume(grow_req("blk", 128 * MIB, None))
        .await
        .unwrap();
    c.controller
        .controller_expand_volume(grow_req("img", 400 * MIB, None))
        .await
        .unwrap();
    let thick = modify_req("thin", &[("preallocation", "true")]);
    c.controller.controller_modify_volume(thick).await.unwrap();
    rig.power_cut().await;

    let c = &mut rig.d.c.clone();
    let mut ids = listed_ids(c).await;
    ids.sort();
    assert_eq!(ids, ["blk", "img", "thin"], "volumes after the cut");
    assert_eq!(reported_capacity(c, "blk").await, 128 * MIB);
    assert_eq!(reported_capacity(c, "img").await, 400 * MIB);
    assert_eq!(fs::metadata(rig.file("blk")).unwrap().len(), 128 << 20);
    assert_eq!(fs::metadata(rig.file("img")).unwrap().len(), 400 << 20);
    assert!(
        allocated(&rig.file("thin")) >= 64 << 20,
        "the acknowledged preallocation was lost: {} bytes allocated",
        allocated(&rig.file("thin"))
    );
    assert_eq!(head_digest(&rig.file("blk")), want, "blk's data changed");
}

/// Snapshots and a group snapshot acknowledged just before the cut, kept on a separate
/// `snapshotPath` filesystem (which a `syncfs` of the pool does not cover),
/// are listed and restore to the right bytes.
#[tokio::test]
async fn acknowledged_snapshots_on_a_separate_filesystem_survive_a_power_cut() {
    let mut rig = Rig::new().await;
    create_ok(&mut rig.d.c, block_volume("blk", 64 * MIB)).await;
    write_pattern(&rig.file("blk"), 16 << 20, 3);
    let blk = file_digest(&rig.file("blk"));
    create_ok(&mut rig.d.c, dir_volume("tree", 256 * MIB)).await;
    for i in 0..8u64 {
        write_pattern(&rig.file("tree").join(format!("f{i}")), 256 << 10, i);
    }
    let tree_before = fingerprint_rel(&rig.file("tree"));
    snapshot_ok(&mut rig.d.c, "s-blk", "blk").await;
    snapshot_ok(&mut rig.d.c, "s-tree", "tree").await;
    let g = group_ok(&mut rig.d.c, "g", &["blk", "tree"]).await;
    let members: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    rig.power_cut().await;

    let c = &mut rig.d.c.clone();
    let mut snaps = listed_snapshot_ids(c).await;
    snaps.sort();
    let mut want = vec!["s-blk".to_owned(), "s-tree".to_owned()];
    want.extend(members.iter().cloned());
    want.sort();
    assert_eq!(snaps, want, "snapshots after the cut");
    let get = get_group_req(&g.group_snapshot_id, members);
    let r = c.group.get_volume_group_snapshot(get).await;
    assert!(r.is_ok(), "the acknowledged group snapshot is gone: {r:?}");
    create_ok(c, restore_of(block_volume("r-blk", 64 * MIB), "s-blk")).await;
    create_ok(c, restore_of(dir_volume("r-tree", 256 * MIB), "s-tree")).await;
    assert_eq!(file_digest(&rig.file("r-blk")), blk, "restored block data");
    assert_eq!(fingerprint_rel(&rig.file("r-tree")), tree_before);
}

/// Creates of every kind acknowledged just before the cut are all there.
#[tokio::test]
async fn acknowledged_creates_survive_a_power_cut() {
    let mut rig = Rig::new().await;
    create_ok(&mut rig.d.c, block_volume("src", 64 * MIB)).await;
    write_pattern(&rig.file("src"), 8 << 20, 5);
    let src = file_digest(&rig.file("src"));
    snapshot_ok(&mut rig.d.c, "snap", "src").await;
    let thick = [("preallocation", "true")];
    let c = &mut rig.d.c.clone();
    create_ok(c, dir_volume("dir", GIB)).await;
    create_ok(c, block_volume("sparse", 64 * MIB)).await;
    create_ok(c, with_params(block_volume("thick", 64 * MIB), &thick)).await;
    create_ok(c, image_volume("img", 320 * MIB, "")).await;
    create_ok(c, clone_of(block_volume("clone", 64 * MIB), "src")).await;
    create_ok(c, restore_of(block_volume("restored", 64 * MIB), "snap")).await;
    rig.power_cut().await;

    let c = &mut rig.d.c.clone();
    let mut ids = listed_ids(c).await;
    ids.sort();
    let want = ["clone", "dir", "img", "restored", "sparse", "src", "thick"];
    assert_eq!(ids, want, "volumes after the cut");
    for (id, size) in [
        ("sparse", 64 * MIB),
        ("thick", 64 * MIB),
        ("img", 320 * MIB),
    ] {
        assert_eq!(reported_capacity(c, id).await, size, "{id}");
        assert_eq!(
            fs::metadata(rig.file(id)).unwrap().len(),
            size as u64,
            "{id}"
        );
    }
    assert!(
        allocated(&rig.file("thick")) >= 64 << 20,
        "thick lost its blocks"
    );
    assert_eq!(file_digest(&rig.file("clone")), src, "clone data");
    assert_eq!(file_digest(&rig.file("restored")), src, "restored data");
    assert_eq!(file_digest(&rig.file("src")), src, "source data");
}

/// Relative paths and content of a tree, to compare a restore with its source.
fn fingerprint_rel(root: &Path) -> Vec<(std::path::PathBuf, String)> {
    fingerprint(root)
        .into_iter()
        .map(|(p, what)| (p.strip_prefix(root).unwrap().to_path_buf(), what))
        .collect()
}

// ------------------------------------------------------------ mid-storm cut

/// Bytes of pattern written at the start of each expanded volume.
const HEAD: u64 = 1 << 20;

/// Digest of the first `HEAD` bytes of a file.
fn head_digest(path: &Path) -> (u64, u64) {
    let mut data = vec![0u8; HEAD as usize];
    let mut f = fs::File::open(path).unwrap();
    std::io::Read::read_exact(&mut f, &mut data).unwrap();
    bytes_digest(&data)
}

/// Digest of the pattern `write_pattern` writes with `seed`.
fn pattern_digest(seed: usize) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    write_pattern(&dir.path().join("p"), HEAD, seed as u64);
    file_digest(&dir.path().join("p"))
}

fn bytes_digest(data: &[u8]) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("b"), data).unwrap();
    file_digest(&dir.path().join("b"))
}

/// What the storm did: which RPCs answered OK before the cut began.
#[derive(Default)]
struct Outcomes {
    acked: Mutex<BTreeMap<String, bool>>,
    answered: AtomicUsize,
}

/// Runs one RPC of the storm and records whether it was acknowledged
/// (answered OK before `cut` was set).
fn record(what: String, out: &Arc<Outcomes>, cut: &Arc<AtomicBool>, ok: bool) {
    let before_cut = !cut.load(Ordering::SeqCst);
    out.acked.lock().unwrap().insert(what, ok && before_cut);
    out.answered.fetch_add(1, Ordering::SeqCst);
}

/// Starts the storm: expands of `e<i>`, creates of `n<r>-<i>`, snapshots
/// of `tree` as `s<r>-<i>`.
fn start_storm(
    c: &Clients,
    round: usize,
    out: &Arc<Outcomes>,
    cut: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..STORM_EXPANDS {
        let (mut c, out, cut) = (c.clone(), out.clone(), cut.clone());
        let size = (64 + 64 * (round as i64 + 1)) * MIB;
        tasks.push(tokio::spawn(async move {
            let r = c
                .controller
                .controller_expand_volume(grow_req(&format!("e{i}"), size, None))
                .await;
            record(format!("expand e{i}"), &out, &cut, r.is_ok());
        }));
    }
    for i in 0..STORM_CREATES {
        let (mut c, out, cut) = (c.clone(), out.clone(), cut.clone());
        let name = format!("n{round}-{i}");
        tasks.push(tokio::spawn(async move {
            let r = c.controller.create_volume(dir_volume(&name, GIB)).await;
            record(format!("create {name}"), &out, &cut, r.is_ok());
        }));
    }
    for i in 0..STORM_SNAPSHOTS {
        let (mut c, out, cut) = (c.clone(), out.clone(), cut.clone());
        let name = format!("s{round}-{i}");
        tasks.push(tokio::spawn(async move {
            let r = c
                .controller
                .create_snapshot(snapshot_req(&name, "tree"))
                .await;
            record(format!("snapshot {name}"), &out, &cut, r.is_ok());
        }));
    }
    tasks
}

/// Checks the state after a mid-storm cut: every volume that existed is
/// there with its data and its old or new capacity; every acknowledged
/// change is there; every listed snapshot restores whole.
async fn check_after_storm(rig: &mut Rig, round: usize, acked: &BTreeMap<String, bool>) {
    let c = &mut rig.d.c.clone();
    let ids = listed_ids(c).await;
    let new_size = (64 + 64 * (round as i64 + 1)) * MIB;
    for i in 0..STORM_EXPANDS {
        let id = format!("e{i}");
        assert!(ids.contains(&id), "volume {id} was lost in the cut");
        let cap = reported_capacity(c, &id).await;
        assert!((64 * MIB..=new_size).contains(&cap), "{id}: capacity {cap}");
        if acked[&format!("expand {id}")] {
            assert_eq!(cap, new_size, "acknowledged expand of {id} lost");
        }
        let len = fs::metadata(rig.file(&id)).unwrap().len();
        assert!(
            len >= cap as u64,
            "{id} reports {cap} bytes but its file has {len}"
        );
        assert_eq!(
            head_digest(&rig.file(&id)),
            pattern_digest(i),
            "{id}'s data changed"
        );
    }
    for (what, ok) in acked {
        if let (Some(name), true) = (what.strip_prefix("create "), ok) {
            assert!(ids.contains(&name.to_owned()), "acknowledged {what} lost");
        }
    }
    let snaps = listed_snapshot_ids(c).await;
    for (what, ok) in acked {
        if let (Some(name), true) = (what.strip_prefix("snapshot "), ok) {
            assert!(snaps.contains(&name.to_owned()), "acknowledged {what} lost");
        }
    }
    for s in snaps {
        let back = format!("back-{s}");
        create_ok(c, restore_of(dir_volume(&back, GIB), &s)).await;
        let tree = rig.d.path("tree-fingerprint");
        let want = fs::read_to_string(tree).unwrap();
        assert_eq!(
            format!("{:?}", fingerprint_rel(&rig.file(&back))),
            want,
            "{s}"
        );
    }
}

/// A thread that cuts the power on both filesystems as soon as
/// `CUT_AFTER` storm RPCs have answered (no async latency).
fn cut_when_answered(
    rig: &Rig,
    out: &Arc<Outcomes>,
    cut: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (out, cut) = (out.clone(), cut.clone());
    let pool = rig.pool_fs.mount_point.clone();
    let snaps = rig.snap_fs.mount_point.clone();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + RPC_BOUND;
        while out.answered.load(Ordering::SeqCst) < CUT_AFTER {
            assert!(
                std::time::Instant::now() < deadline,
                "the storm never got going"
            );
            std::thread::yield_now();
        }
        cut.store(true, Ordering::SeqCst);
        LoopFs::cut(&pool);
        LoopFs::cut(&snaps);
    })
}

/// The power is cut while expands, creates and snapshots are in flight:
/// nothing acknowledged is lost, and no volume that existed is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_mid_storm_loses_nothing_acknowledged() {
    let mut rig = Rig::new().await;
    for i in 0..STORM_EXPANDS {
        let id = format!("e{i}");
        create_ok(&mut rig.d.c, block_volume(&id, 64 * MIB)).await;
        write_pattern(&rig.file(&id), HEAD, i as u64);
    }
    create_ok(&mut rig.d.c, dir_volume("tree", GIB)).await;
    for i in 0..4u64 {
        write_pattern(&rig.file("tree").join(format!("f{i}")), 64 << 10, i);
    }
    let tree = format!("{:?}", fingerprint_rel(&rig.file("tree")));
    fs::write(rig.d.path("tree-fingerprint"), tree).unwrap();
    for round in 0..STORM_ROUNDS {
        let (out, cut) = (
            Arc::new(Outcomes::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let cutter = cut_when_answered(&rig, &out, &cut);
        let tasks = start_storm(&rig.d.c, round, &out, &cut);
        for t in tasks {
            let _ = bounded("a storm RPC after the cut", RPC_BOUND, t).await;
        }
        cutter.join().unwrap();
        rig.recover().await;
        let acked = out.acked.lock().unwrap().clone();
        check_after_storm(&mut rig, round, &acked).await;
    }
}
