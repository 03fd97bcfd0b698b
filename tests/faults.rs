//! Fault injection: kill -9 the driver at seeded random moments during
//! create / clone / snapshot / publish / expand / delete, restart it, and
//! check that nothing half-done is visible and that the retry succeeds.
//!
//! `HPC_FAULT_SEED` picks the seed (default 1) and `HPC_FAULT_ROUNDS` the
//! number of kills (default 50).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use hostpath_csi::client::Clients;
use hostpath_csi::proto::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SOURCE: &str = "src-big";
const SOURCE_SIZE: i64 = 2 * GIB;
const CHUNK: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Block,
    Image,
}

#[derive(Debug, Clone)]
enum Op {
    Create(String, Kind),
    Clone(String),
    Snapshot(String),
    Publish(String),
    Unpublish(String),
    Expand(String),
    Delete(String),
}

/// What the test believes exists.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, (Kind, i64)>,
    published: BTreeMap<String, PathBuf>,
    snapshots: Vec<String>,
}

fn cap(kind: Kind) -> VolumeCapability {
    match kind {
        Kind::Block => block_rwo(),
        _ => rwo(),
    }
}

fn create_request(name: &str, kind: Kind, size: i64) -> CreateVolumeRequest {
    match kind {
        Kind::Dir => dir_volume(name, size),
        Kind::Block => block_volume(name, size),
        Kind::Image => image_volume(name, size, ""),
    }
}

/// Issues one operation to completion (used for set-up and for retries).
async fn perform(
    c: &mut Clients,
    base: &Path,
    model: &Model,
    op: &Op,
) -> Result<(), tonic::Status> {
    match op {
        Op::Create(name, kind) => {
            let size = if *kind == Kind::Image {
                320 * MIB
            } else {
                64 * MIB
            };
            let r = create_request(name, *kind, size);
            c.controller.create_volume(r).await.map(drop)
        }
        Op::Clone(name) => {
            let r = clone_of(create_request(name, Kind::Block, SOURCE_SIZE), SOURCE);
            c.controller.create_volume(r).await.map(drop)
        }
        Op::Snapshot(name) => {
            let r = snapshot_req(name, SOURCE);
            c.controller.create_snapshot(r).await.map(drop)
        }
        Op::Publish(name) => {
            let (kind, _) = model.volumes[name];
            let target = base.join(format!("pub-{name}"));
            let staging = staging_for(&target);
            std::fs::create_dir_all(&staging).unwrap();
            let stage = stage_req(name, &staging, cap(kind));
            c.node.node_stage_volume(stage).await?;
            let publish = publish_req(name, &target, cap(kind));
            c.node.node_publish_volume(publish).await.map(drop)
        }
        Op::Unpublish(name) => {
            let target = base.join(format!("pub-{name}"));
            c.node
                .node_unpublish_volume(unpublish_req(name, &target))
                .await?;
            let unstage = unstage_req(name, &staging_for(&target));
            c.node.node_unstage_volume(unstage).await.map(drop)
        }
        Op::Expand(name) => {
            let (_, size) = model.volumes[name];
            let r = grow_req(name, size + 64 * MIB, None);
            let r = c.controller.controller_expand_volume(r).await?;
            if r.into_inner().node_expansion_required {
                if let Some(target) = model.published.get(name) {
                    let r = NodeExpandVolumeRequest {
                        volume_id: name.clone(),
                        volume_path: s(target),
                        ..Default::default()
                    };
                    c.node.node_expand_volume(r).await?;
                }
            }
            Ok(())
        }
        Op::Delete(name) => c.controller.delete_volume(delete_req(name)).await.map(drop),
    }
}

/// Applies a completed operation to the model.
fn apply(model: &mut Model, base: &Path, op: &Op) {
    match op {
        Op::Create(name, kind) => {
            let size = if *kind == Kind::Image {
                320 * MIB
            } else {
                64 * MIB
            };
            model.volumes.insert(name.clone(), (*kind, size));
        }
        Op::Clone(name) => {
            model
                .volumes
                .insert(name.clone(), (Kind::Block, SOURCE_SIZE));
        }
        Op::Snapshot(name) => model.snapshots.push(name.clone()),
        Op::Publish(name) => {
            model
                .published
                .insert(name.clone(), base.join(format!("pub-{name}")));
        }
        Op::Unpublish(name) => {
            model.published.remove(name);
        }
        Op::Expand(name) => {
            model.volumes.get_mut(name).unwrap().1 += 64 * MIB;
        }
        Op::Delete(name) => {
            model.volumes.remove(name);
        }
    }
}

fn pick(rng: &mut StdRng, model: &Model, round: usize) -> Op {
    let unpublished: Vec<&String> = model
        .volumes
        .keys()
        .filter(|v| !model.published.contains_key(*v) && v.as_str() != SOURCE)
        .collect();
    let published: Vec<&String> = model.published.keys().collect();
    loop {
        let op = match rng.random_range(0..10) {
            0 | 1 => Op::Create(
                format!("v{round}"),
                [Kind::Dir, Kind::Block, Kind::Image][rng.random_range(0..3)],
            ),
            2 => Op::Clone(format!("c{round}")),
            3 => Op::Snapshot(format!("s{round}")),
            4 | 5 if !unpublished.is_empty() => {
                Op::Publish(unpublished[rng.random_range(0..unpublished.len())].clone())
            }
            6 if !published.is_empty() => {
                Op::Unpublish(published[rng.random_range(0..published.len())].clone())
            }
            7 if !model.volumes.is_empty() => {
                let keys: Vec<&String> = model
                    .volumes
                    .keys()
                    .filter(|k| k.as_str() != SOURCE)
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                Op::Expand(keys[rng.random_range(0..keys.len())].clone())
            }
            8 | 9 if !unpublished.is_empty() => {
                Op::Delete(unpublished[rng.random_range(0..unpublished.len())].clone())
            }
            _ => continue,
        };
        return op;
    }
}

fn fill_pattern(path: &Path) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    // 1 GiB of data in 16 chunks spread over the 2 GiB file.
    for k in 0..16u64 {
        f.seek(SeekFrom::Start(k * (SOURCE_SIZE as u64 / 16)))
            .unwrap();
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    chunk
}

/// Every invariant that must hold after a crash and restart.
async fn check_invariants(d: &mut Driver, model: &Model, chunk: &[u8], context: &str) {
    let pool = d.pool().to_path_buf();
    let (volumes, snapshots) = check_nothing_half_done(d, model, context).await;
    for v in &volumes {
        let meta = std::fs::metadata(pool.join(&v.volume_id)).unwrap();
        if meta.is_file() {
            assert_eq!(
                meta.len() as i64,
                v.capacity_bytes,
                "{context}: {} file size vs capacity",
                v.volume_id
            );
        }
    }
    for name in &model.snapshots {
        assert!(
            snapshots.iter().any(|s| &s.snapshot_id == name),
            "{context}: snapshot {name} lost"
        );
    }
    // Kernel state matches the model: one loop device per published file volume, none leaked.
    let loops = loops_under(&pool);
    let expected_loops: Vec<&String> = model
        .published
        .keys()
        .filter(|n| model.volumes[*n].0 != Kind::Dir)
        .collect();
    assert_eq!(
        loops.len(),
        expected_loops.len(),
        "{context}: loop devices {loops:?} vs published {expected_loops:?}"
    );
    for (name, target) in &model.published {
        match model.volumes[name].0 {
            Kind::Dir | Kind::Image => {
                std::fs::write(target.join("probe"), name.as_bytes())
                    .unwrap_or_else(|e| panic!("{context}: {name} not writable: {e}"));
            }
            Kind::Block => {
                let mut f = std::fs::File::open(target).unwrap();
                let mut b = [0u8; 4096];
                f.read_exact(&mut b)
                    .unwrap_or_else(|e| panic!("{context}: {name} not readable: {e}"));
            }
        }
    }
    // Clones hold the source's data.
    for name in model.volumes.keys().filter(|n| n.starts_with('c')) {
        let f = std::fs::File::open(pool.join(name)).unwrap();
        let mut got = vec![0u8; 4096];
        f.read_exact_at(&mut got, (SOURCE_SIZE as u64 / 16) * 5 + 12345)
            .unwrap();
        assert_eq!(
            got[..],
            chunk[12345..12345 + 4096],
            "{context}: clone {name} content differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_matrix() {
    let seed: u64 = std::env::var("HPC_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rounds: usize = std::env::var("HPC_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    eprintln!("fault matrix: seed {seed}, {rounds} kills (HPC_FAULT_SEED / HPC_FAULT_ROUNDS)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = Driver::start().await;
    let mut model = Model::default();
    let setup = Op::Create(SOURCE.into(), Kind::Block);
    create_ok(&mut d.c, create_request(SOURCE, Kind::Block, SOURCE_SIZE)).await;
    apply(&mut model, d.dir.path(), &setup);
    model
        .volumes
        .insert(SOURCE.into(), (Kind::Block, SOURCE_SIZE));
    let chunk = fill_pattern(&d.pool().join(SOURCE));
    for round in 0..rounds {
        let op = pick(&mut rng, &model, round);
        let delay = Duration::from_micros(rng.random_range(0..40_000));
        let context = format!("seed {seed} round {round} {op:?} killed after {delay:?}");
        // Start the operation on its own connection, then crash the driver.
        let mut racing = Clients::connect(&d.endpoint()).await.unwrap();
        let base = d.dir.path().to_path_buf();
        let racing_base = base.clone();
        let op2 = op.clone();
        let handle = {
            let published = model.published.clone();
            let volumes = model.volumes.clone();
            let snapshots = model.snapshots.clone();
            tokio::spawn(async move {
                let m = Model {
                    volumes,
                    published,
                    snapshots,
                };
                perform(&mut racing, &racing_base, &m, &op2).await
            })
        };
        tokio::time::sleep(delay).await;
        d.kill9();
        // The interrupted call must end before a new driver could receive it.
        let _ = handle.await;
        d.restart().await;
        // Before the retry: nothing half-done (the op may or may not have happened).
        let mut before = Model {
            volumes: model.volumes.clone(),
            published: model.published.clone(),
            snapshots: model.snapshots.clone(),
        };
        if let Op::Delete(name) = &op {
            before.volumes.remove(name);
        }
        check_invariants_relaxed(&mut d, &before, &op, &context).await;
        // The retry succeeds with the result the uninterrupted call would have had.
        perform(&mut d.c, &base, &model, &op)
            .await
            .unwrap_or_else(|e| panic!("{context}: retry failed: {e}"));
        apply(&mut model, &base, &op);
        check_invariants(&mut d, &model, &chunk, &context).await;
    }
    let base = d.dir.path().to_path_buf();
    // Tear down: unpublish everything, delete everything, nothing leaks.
    for name in model.published.keys().cloned().collect::<Vec<_>>() {
        perform(&mut d.c, &base, &model, &Op::Unpublish(name))
            .await
            .unwrap();
    }
    model.published.clear();
    for name in model.volumes.keys().cloned().collect::<Vec<_>>() {
        perform(&mut d.c, &base, &model, &Op::Delete(name))
            .await
            .unwrap();
    }
    assert!(loops_under(d.dir.path()).is_empty());
    assert!(mounts_under(d.dir.path()).is_empty());
    // The kills must have landed mid-operation, or the matrix proves nothing.
    let log = d.log();
    let interrupted = log
        .matches("removed leftover of interrupted operation")
        .count()
        + log.matches("removing half-built snapshot").count()
        + log.matches("rolling back a create").count();
    eprintln!("fault matrix: {interrupted} interrupted operations cleaned up at start-up");
    assert!(interrupted > 0, "no kill interrupted an operation");
}

/// After a crash and before the retry, the interrupted operation may or may
/// not have taken effect, so only the "nothing half-done" part is checked.
async fn check_invariants_relaxed(d: &mut Driver, model: &Model, op: &Op, context: &str) {
    check_nothing_half_done(d, model, context).await;
    // Published volumes stay usable through the crash.
    for (name, target) in &model.published {
        if matches!(op, Op::Unpublish(n) if n == name) {
            continue;
        }
        assert!(target.exists(), "{context}: {name} target vanished");
    }
}

/// Holds at every moment after a restart: the temp area is swept, every
/// listed volume has its backing store and metadata, every volume the model
/// knows is listed, and every listed snapshot is complete.
async fn check_nothing_half_done(
    d: &mut Driver,
    model: &Model,
    context: &str,
) -> (Vec<Volume>, Vec<Snapshot>) {
    let pool = d.pool().to_path_buf();
    let tmp: Vec<_> = std::fs::read_dir(pool.join(".hostpath-csi/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        tmp.is_empty(),
        "{context}: leftovers in tmp after start-up: {tmp:?}"
    );
    let volumes: Vec<Volume> =
        d.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.volume.unwrap())
            .collect();
    for v in &volumes {
        assert!(
            std::fs::symlink_metadata(pool.join(&v.volume_id)).is_ok(),
            "{context}: listed {} has no backing store",
            v.volume_id
        );
        assert!(
            pool.join(format!(".hostpath-csi/volumes/{}.json", v.volume_id))
                .exists(),
            "{context}: listed volume {} has no metadata (half-done)",
            v.volume_id
        );
    }
    for name in model.volumes.keys() {
        assert!(
            volumes.iter().any(|v| &v.volume_id == name),
            "{context}: acknowledged volume {name} is missing"
        );
    }
    let snapshots: Vec<Snapshot> =
        d.c.controller
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.snapshot.unwrap())
            .collect();
    for s in &snapshots {
        let data = pool
            .join(".hostpath-csi/snapshots")
            .join(&s.snapshot_id)
            .join("data");
        assert_eq!(
            std::fs::metadata(&data).unwrap().len() as i64,
            s.size_bytes,
            "{context}: snapshot {} is partial",
            s.snapshot_id
        );
    }
    (volumes, snapshots)
}

#[tokio::test]
async fn pool_removed_under_a_running_driver() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-before", GIB)).await;
    let moved = d.path("pool-moved");
    std::fs::rename(d.pool(), &moved).unwrap();
    // Liveness holds (Probe stays ready); the pool refuses work.
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    let r =
        d.c.controller
            .create_volume(dir_volume("pvc-after", GIB))
            .await;
    assert_code(
        &r,
        tonic::Code::Unavailable,
        "a create in a pool that is gone",
    );
    let r =
        d.c.controller
            .get_capacity(GetCapacityRequest::default())
            .await;
    assert!(matches!(
        code(&r),
        tonic::Code::Ok | tonic::Code::Unavailable | tonic::Code::Internal
    ));
    let r =
        d.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await;
    assert_eq!(code(&r), tonic::Code::Ok);
    // The driver is still alive and recovers when the pool comes back.
    std::fs::rename(&moved, d.pool()).unwrap();
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    create_ok(&mut d.c, dir_volume("pvc-after", GIB)).await;
    assert!(!d.log().contains("panicked"));
}

#[tokio::test]
async fn enospc_in_a_tiny_pool_leaves_nothing_behind() {
    let fs = LoopFs::new("ext4", 64);
    let pool = fs.mount_point.join("pool");
    let mut d = Driver::start_with(&[("tiny", Some(pool.clone()))]).await;
    // Leave about 27 MiB free.
    std::fs::write(fs.mount_point.join("filler"), vec![1u8; 30 << 20]).unwrap();
    let free_before = nix::sys::statvfs::statvfs(&pool)
        .unwrap()
        .blocks_available();
    let r = with_params(
        block_volume("pvc-thick", 40 * MIB),
        &[("preallocation", "true")],
    );
    let e = d.c.controller.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // A snapshot that cannot fit fails the same way.
    create_ok(&mut d.c, block_volume("pvc-data", 20 * MIB)).await;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(pool.join("pvc-data"))
        .unwrap();
    f.write_all(&vec![7u8; 18 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let e =
        d.c.controller
            .create_snapshot(snapshot_req("snap-big", "pvc-data"));
    let e = e.await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    delete_ok(&mut d.c, "pvc-data").await;
    // A deleted volume's tree is removed in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(pool.join(".hostpath-csi/tmp"))
        .unwrap()
        .next()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "leftovers stay in tmp"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let snaps: Vec<_> = std::fs::read_dir(pool.join(".hostpath-csi/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(snaps.is_empty(), "{snaps:?}");
    // Freed blocks count as free once the journal commits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        nix::unistd::sync();
        let free_after = nix::sys::statvfs::statvfs(&pool)
            .unwrap()
            .blocks_available();
        if free_after + 16 >= free_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "space not given back: {free_before} -> {free_after}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(d);
}

/// What a power cut can leave of an unacknowledged create: its metadata
/// file with no content, or metadata without a volume. Start-up rolls both
/// back and keeps complete volumes and the Go driver's bare directories.
#[tokio::test]
async fn start_up_rolls_back_creates_cut_off_before_their_flush() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-whole", GIB)).await;
    d.kill9();
    let pool = d.pool().to_path_buf();
    std::fs::create_dir(pool.join("pvc-torn")).unwrap();
    std::fs::write(pool.join(".hostpath-csi/volumes/pvc-torn.json"), b"").unwrap();
    std::fs::write(
        pool.join(".hostpath-csi/volumes/pvc-ghost.json"),
        br#"{"id":"pvc-ghost"}"#,
    )
    .unwrap();
    std::fs::create_dir(pool.join("pvc-go-driver")).unwrap();
    d.restart().await;
    assert!(!pool.join("pvc-torn").exists());
    assert!(!pool.join(".hostpath-csi/volumes/pvc-torn.json").exists());
    assert!(!pool.join(".hostpath-csi/volumes/pvc-ghost.json").exists());
    assert_eq!(listed_ids(&mut d.c).await, ["pvc-go-driver", "pvc-whole"]);
}
