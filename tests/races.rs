//! Issue 13: one operation guard for every RPC, no node-wide lock around
//! slow work, control RPCs that never starve. Each race pair is looped
//! (a bounded number of rounds, within a wall-time bound) and the test
//! fails on a single forbidden outcome; the tally of outcomes is printed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use hostpath_csi::client::Clients;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tonic::Code;

/// Rounds of the controller races (each copies `RACE_FILES` files).
const COPY_RACE_ROUNDS: usize = 100;
/// Files in each source of the clone and restore races.
const RACE_FILES: usize = 500;
/// Rounds of the node races (cheap).
const NODE_RACE_ROUNDS: usize = 300;
/// Wall-time bound of one race loop; it stops early, never fails for it.
const RACE_WALL: Duration = Duration::from_secs(30);
/// Fewer rounds than this within the wall bound proves nothing: a failure.
const MIN_ROUNDS: usize = 10;
/// Files in the big volume of the stats storm.
const STORM_FILES: usize = 50_000;
/// Concurrent NodeGetVolumeStats calls in the storm.
const STORM_STATS: usize = 128;
/// Concurrent clones of a dense Block volume in the storm.
const STORM_CLONES: usize = 4;
const STORM_CLONE_BYTES: u64 = 256 << 20;
/// NodeExpandVolume calls piling up on one frozen volume.
const PILEUP_EXPANDS: usize = 40;
/// Deadline of a liveness check (Probe and friends).
const LIVENESS: Duration = Duration::from_secs(5);
/// Bound on anything that must merely finish.
const RPC_BOUND: Duration = Duration::from_secs(120);
const IMAGE_SIZE: i64 = 320 * MIB;

// ---------------------------------------------------------------- harness

/// Counts outcomes by description.
#[derive(Default, Debug)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }
}

/// Rounds of a race: at most `max`, within `RACE_WALL`.
struct Rounds {
    started: Instant,
    done: usize,
    max: usize,
}

impl Rounds {
    fn new(max: usize) -> Rounds {
        Rounds {
            started: Instant::now(),
            done: 0,
            max,
        }
    }

    fn next(&mut self) -> Option<usize> {
        if self.done >= self.max || self.started.elapsed() > RACE_WALL {
            return None;
        }
        self.done += 1;
        Some(self.done - 1)
    }

    /// Fails on forbidden outcomes, or when too few rounds ran to mean anything.
    #[track_caller]
    fn finish(&self, tally: &Tally, bad: &[String]) {
        eprintln!("{} rounds: {:?}", self.done, tally.0);
        assert!(
            bad.is_empty(),
            "forbidden outcomes: {bad:#?}\nall outcomes: {:?}",
            tally.0
        );
        assert!(
            self.done >= MIN_ROUNDS,
            "only {} rounds ran within {RACE_WALL:?}",
            self.done
        );
    }
}

/// Runs two RPCs at once; round `i` picks which starts first and by how
/// much, so both orders and the overlap between are covered.
async fn race<A: std::future::Future, B: std::future::Future>(
    i: usize,
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let lead = Duration::from_micros((i as u64 * 397) % 3000);
    let (da, db) = if i.is_multiple_of(2) {
        (Duration::ZERO, lead)
    } else {
        (lead, Duration::ZERO)
    };
    let a = async {
        tokio::time::sleep(da).await;
        a.await
    };
    let b = async {
        tokio::time::sleep(db).await;
        b.await
    };
    bounded("a raced RPC pair", RPC_BOUND, async { tokio::join!(a, b) }).await
}

/// Deletes a volume, retrying while a conflicting operation is in flight.
async fn delete_until_gone(c: &mut Clients, id: &str) {
    for _ in 0..100 {
        match c.controller.delete_volume(delete_req(id)).await {
            Ok(_) => return,
            Err(s) if matches!(s.code(), Code::Aborted | Code::FailedPrecondition) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("delete {id}: {s:?}"),
        }
    }
    panic!("{id} could not be deleted");
}

/// Checks a copy that was acknowledged: it must hold every file.
fn whole_or_missing(dir: &Path, what: &str, bad: &mut Vec<String>, tally: &mut Tally) {
    let files = count_entries(dir);
    if files == RACE_FILES {
        tally.add(format!("{what} OK, whole"));
    } else {
        bad.push(format!("{what} OK with {files} of {RACE_FILES} files"));
    }
}

// ------------------------------------------------ copies racing deletes

/// CreateVolume from a volume racing DeleteVolume of that source: the
/// clone is whole or fails, never OK with files missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_racing_delete_of_its_source_is_whole_or_fails() {
    let mut d = Driver::start().await;
    let (mut tally, mut bad) = (Tally::default(), Vec::new());
    let mut rounds = Rounds::new(COPY_RACE_ROUNDS);
    while let Some(i) = rounds.next() {
        let (src, cl) = (format!("src{i}"), format!("cl{i}"));
        create_ok(&mut d.c, dir_volume(&src, GIB)).await;
        make_files(&d.pool().join(&src), RACE_FILES);
        let (mut a, mut b) = (d.c.clone(), d.c.clone());
        let clone = a
            .controller
            .create_volume(clone_of(dir_volume(&cl, GIB), &src));
        let delete = b.controller.delete_volume(delete_req(&src));
        let (rc, rd) = race(i, clone, delete).await;
        tally.add(format!("delete {:?}", code(&rd)));
        judge_copy(&mut d, rc.map(drop), &cl, "clone", i, &mut bad, &mut tally).await;
        delete_until_gone(&mut d.c, &cl).await;
        delete_until_gone(&mut d.c, &src).await;
    }
    rounds.finish(&tally, &bad);
}

/// One round's copy (clone or restore) that raced a delete of its source:
/// acknowledged means whole; failed means not listed.
async fn judge_copy(
    d: &mut Driver,
    result: Result<(), tonic::Status>,
    id: &str,
    what: &str,
    round: usize,
    bad: &mut Vec<String>,
    tally: &mut Tally,
) {
    match result {
        Ok(()) => whole_or_missing(
            &d.pool().join(id),
            &format!("round {round}: {what}"),
            bad,
            tally,
        ),
        Err(s) => {
            tally.add(format!("{what} {:?}", s.code()));
            if listed_ids(&mut d.c).await.iter().any(|l| l == id) {
                bad.push(format!("round {round}: the failed {what} {id} is listed"));
            }
        }
    }
}

/// CreateVolume from a snapshot racing DeleteSnapshot: the restore is
/// whole or fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_racing_delete_of_its_snapshot_is_whole_or_fails() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("base", GIB)).await;
    make_files(&d.pool().join("base"), RACE_FILES);
    let (mut tally, mut bad) = (Tally::default(), Vec::new());
    let mut rounds = Rounds::new(COPY_RACE_ROUNDS);
    while let Some(i) = rounds.next() {
        let (snap, back) = (format!("s{i}"), format!("r{i}"));
        snapshot_ok(&mut d.c, &snap, "base").await;
        let (mut a, mut b) = (d.c.clone(), d.c.clone());
        let restore = a
            .controller
            .create_volume(restore_of(dir_volume(&back, GIB), &snap));
        let delete = b.controller.delete_snapshot(delete_snapshot_req(&snap));
        let (rr, rd) = race(i, restore, delete).await;
        tally.add(format!("delete snapshot {:?}", code(&rd)));
        judge_copy(
            &mut d,
            rr.map(drop),
            &back,
            "restore",
            i,
            &mut bad,
            &mut tally,
        )
        .await;
        delete_until_gone(&mut d.c, &back).await;
        for _ in 0..100 {
            if d.c
                .controller
                .delete_snapshot(delete_snapshot_req(&snap))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    rounds.finish(&tally, &bad);
}

// ---------------------------------------------------------- node races

/// NodePublishVolume racing DeleteVolume of a staged directory volume:
/// never both OK (the pod would get an emptied volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_racing_delete_never_both_succeed() {
    let mut d = Driver::start().await;
    let (mut tally, mut bad) = (Tally::default(), Vec::new());
    let mut rounds = Rounds::new(NODE_RACE_ROUNDS);
    while let Some(i) = rounds.next() {
        let id = format!("v{i}");
        create_ok(&mut d.c, dir_volume(&id, GIB)).await;
        fs::write(d.pool().join(&id).join("data"), b"tenant").unwrap();
        let target = d.path(&format!("pods/{i}"));
        let staging = staging_for(&target);
        fs::create_dir_all(&staging).unwrap();
        d.c.node
            .node_stage_volume(stage_req(&id, &staging, rwo()))
            .await
            .unwrap();
        let (mut a, mut b) = (d.c.clone(), d.c.clone());
        let publish = a.node.node_publish_volume(publish_req(&id, &target, rwo()));
        let delete = b.controller.delete_volume(delete_req(&id));
        let (rp, rd) = race(i, publish, delete).await;
        tally.add(format!("publish {:?} / delete {:?}", code(&rp), code(&rd)));
        if rp.is_ok() && rd.is_ok() {
            let seen = fs::read(target.join("data")).ok();
            bad.push(format!(
                "round {i}: publish and delete both OK (the pod sees data: {seen:?})"
            ));
        }
        let _ =
            d.c.node
                .node_unpublish_volume(unpublish_req(&id, &target))
                .await;
        let _ =
            d.c.node
                .node_unstage_volume(unstage_req(&id, &staging))
                .await;
        delete_until_gone(&mut d.c, &id).await;
    }
    rounds.finish(&tally, &bad);
}

/// Two concurrent SINGLE_NODE_SINGLE_WRITER publishes of one volume to two
/// targets: exactly one succeeds, the other is FAILED_PRECONDITION or ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_writer_publishes_racing_exactly_one_wins() {
    let mut d = Driver::start().await;
    let cap = mount_cap(Mode::SingleNodeSingleWriter);
    let (mut tally, mut bad) = (Tally::default(), Vec::new());
    let mut rounds = Rounds::new(NODE_RACE_ROUNDS);
    while let Some(i) = rounds.next() {
        let id = format!("v{i}");
        create_ok(&mut d.c, create_req(&id, GIB, cap.clone())).await;
        let staging = d.path(&format!("staging/{i}"));
        fs::create_dir_all(&staging).unwrap();
        d.c.node
            .node_stage_volume(stage_req(&id, &staging, cap.clone()))
            .await
            .unwrap();
        let targets = [
            d.path(&format!("pods/{i}-a")),
            d.path(&format!("pods/{i}-b")),
        ];
        // Both targets name the one staging path.
        let publish_at = |target: &Path| NodePublishVolumeRequest {
            staging_target_path: s(&staging),
            ..publish_req(&id, target, cap.clone())
        };
        let (mut a, mut b) = (d.c.clone(), d.c.clone());
        let first = a.node.node_publish_volume(publish_at(&targets[0]));
        let second = b.node.node_publish_volume(publish_at(&targets[1]));
        let (r1, r2) = race(i, first, second).await;
        let codes = [code(&r1), code(&r2)];
        tally.add(format!("{codes:?}"));
        let wins = codes.iter().filter(|c| **c == Code::Ok).count();
        let losers_ok = codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::FailedPrecondition | Code::Aborted));
        if wins != 1 || !losers_ok {
            bad.push(format!("round {i}: {codes:?}"));
        }
        for t in &targets {
            let _ = d.c.node.node_unpublish_volume(unpublish_req(&id, t)).await;
        }
        let _ =
            d.c.node
                .node_unstage_volume(unstage_req(&id, &staging))
                .await;
        delete_until_gone(&mut d.c, &id).await;
    }
    rounds.finish(&tally, &bad);
}

// ------------------------------------------------- no node-wide lock

/// One image volume's filesystem frozen, with a NodeExpandVolume stuck on
/// it: a Block publish of another volume still completes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_publish_completes_while_another_volume_is_frozen() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("frozen", IMAGE_SIZE, "")).await;
    create_ok(&mut d.c, block_volume("other", 64 * MIB)).await;
    let (staging, target) = mount_rwo(&mut d, "frozen").await;
    d.c.controller
        .controller_expand_volume(grow_req("frozen", IMAGE_SIZE + 64 * MIB, None))
        .await
        .unwrap();
    // Declared after the driver: thawed before the driver is torn down.
    let freeze = FreezeGuard::freeze(&staging);
    let mut c = d.c.clone();
    let expand = tokio::spawn(async move {
        let r = NodeExpandVolumeRequest {
            volume_id: "frozen".into(),
            volume_path: s(&target),
            ..Default::default()
        };
        c.node.node_expand_volume(r).await
    });
    // Time for the expansion to reach the frozen filesystem; not asserted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other = d.path("pods/other");
    let publish = stage_publish(&mut d.c, "other", &other, block_rwo());
    if tokio::time::timeout(Duration::from_secs(20), publish)
        .await
        .is_err()
    {
        panic!("a Block publish of another volume waited behind the frozen volume's expansion")
    }
    if expand.is_finished() {
        eprintln!("note: the expansion of the frozen volume returned before the thaw");
    }
    freeze.thaw();
    let r = bounded("NodeExpandVolume after the thaw", RPC_BOUND, expand)
        .await
        .unwrap();
    eprintln!("NodeExpandVolume of the frozen volume: {:?}", code(&r));
    drop(freeze);
    unpublish_unstage(&mut d.c, "other", &other).await;
}

/// Writes and fsyncs a file under `dir` on a thread; true when it finished
/// within the liveness bound (a frozen filesystem blocks it).
async fn can_write(dir: &Path) -> bool {
    let path = dir.join("probe-write");
    let t = std::thread::spawn(move || {
        let mut f = fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut f, b"alive").unwrap();
        f.sync_all().unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.is_finished() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A group snapshot on an ext4 pool (no reflink) with a mounted image
/// member and another member is refused; nothing is left frozen.
#[tokio::test]
async fn group_snapshot_on_ext4_with_a_mounted_image_member_is_refused() {
    let fs = LoopFs::new("ext4", 1536);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, image_volume("vm-root", IMAGE_SIZE, "")).await;
    create_ok(&mut d.c, block_volume("vm-data", 256 * MIB)).await;
    write_pattern(&d.pool().join("vm-data"), 64 << 20, 1);
    let (staging, target) = mount_rwo(&mut d, "vm-root").await;
    let _thaw = FreezeGuard::thaw_on_drop(&staging);
    let req = group_req("g", &["vm-root", "vm-data"]);
    let r = bounded(
        "CreateVolumeGroupSnapshot",
        RPC_BOUND,
        d.c.group.create_volume_group_snapshot(req),
    )
    .await;
    let writable = can_write(&target).await;
    assert!(writable, "the image member was left frozen");
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(
        listed_snapshot_ids(&mut d.c).await.is_empty(),
        "member snapshots were kept"
    );
    unpublish_unstage(&mut d.c, "vm-root", &target).await;
}

// ----------------------------------------------- control RPCs never starve

/// Probe, GetPluginInfo and NodeGetInfo, each within the liveness deadline.
async fn control_rpcs_answer(c: &mut Clients) -> Result<(), String> {
    probe_within(c, LIVENESS).await?;
    let mut r = tonic::Request::new(GetPluginInfoRequest {});
    r.set_timeout(LIVENESS);
    let info = tokio::time::timeout(LIVENESS, c.identity.get_plugin_info(r)).await;
    info.map_err(|_| "GetPluginInfo did not answer".to_owned())?
        .map_err(|s| format!("GetPluginInfo: {s:?}"))?;
    let mut r = tonic::Request::new(NodeGetInfoRequest {});
    r.set_timeout(LIVENESS);
    let info = tokio::time::timeout(LIVENESS, c.node.node_get_info(r)).await;
    info.map_err(|_| "NodeGetInfo did not answer".to_owned())?
        .map_err(|s| format!("NodeGetInfo: {s:?}"))?;
    Ok(())
}

/// Checks the control RPCs repeatedly until every task of the storm has
/// finished; at least one check must happen while the storm runs.
async fn control_rpcs_live_through(c: &mut Clients, storm: Vec<tokio::task::JoinHandle<()>>) {
    let mut during = 0;
    let deadline = Instant::now() + RPC_BOUND;
    while storm.iter().any(|t| !t.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "the storm did not end within {RPC_BOUND:?}"
        );
        if let Err(e) = control_rpcs_answer(c).await {
            panic!("while the storm runs: {e}");
        }
        if storm.iter().any(|t| !t.is_finished()) {
            during += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        during > 0,
        "the storm ended before any check: it is too small to test anything"
    );
    eprintln!("{during} checks while the storm ran");
    for t in storm {
        t.await.unwrap();
    }
}

/// 128 NodeGetVolumeStats on a big volume and concurrent clones: Probe,
/// GetPluginInfo and NodeGetInfo keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rpcs_answer_during_a_stats_and_clone_storm() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("big", GIB)).await;
    make_files(&d.pool().join("big"), STORM_FILES);
    let target = d.path("pods/big");
    stage_publish(&mut d.c, "big", &target, rwo()).await;
    create_ok(&mut d.c, block_volume("src", STORM_CLONE_BYTES as i64)).await;
    write_pattern(&d.pool().join("src"), STORM_CLONE_BYTES, 4);
    let mut storm = Vec::new();
    for _ in 0..STORM_STATS {
        let (mut c, req) = (d.c.clone(), stats_req("big", &target));
        storm.push(tokio::spawn(async move {
            c.node.node_get_volume_stats(req).await.unwrap();
        }));
    }
    for i in 0..STORM_CLONES {
        let mut c = d.c.clone();
        let req = clone_of(
            block_volume(&format!("clone{i}"), STORM_CLONE_BYTES as i64),
            "src",
        );
        storm.push(tokio::spawn(async move {
            c.controller.create_volume(req).await.unwrap();
        }));
    }
    let mut c = d.c.clone();
    control_rpcs_live_through(&mut c, storm).await;
}

/// NodeExpandVolume calls piling up on one frozen volume (a stuck
/// volume): the control RPCs keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rpcs_answer_while_calls_pile_up_on_a_frozen_volume() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("stuck", IMAGE_SIZE, "")).await;
    let (staging, target) = mount_rwo(&mut d, "stuck").await;
    d.c.controller
        .controller_expand_volume(grow_req("stuck", IMAGE_SIZE + 64 * MIB, None))
        .await
        .unwrap();
    let freeze = FreezeGuard::freeze(&staging);
    let mut calls = Vec::new();
    for _ in 0..PILEUP_EXPANDS {
        let mut c = d.c.clone();
        let req = NodeExpandVolumeRequest {
            volume_id: "stuck".into(),
            volume_path: s(&target),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move {
            let _ = c.node.node_expand_volume(req).await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let live = control_rpcs_answer(&mut d.c).await;
    freeze.thaw();
    for t in calls {
        bounded("a NodeExpandVolume after the thaw", RPC_BOUND, t)
            .await
            .unwrap();
    }
    drop(freeze);
    live.unwrap_or_else(|e| panic!("with {PILEUP_EXPANDS} calls stuck on a frozen volume: {e}"));
}
