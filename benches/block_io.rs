//! Block volume benchmark (issue 3): sequential O_DIRECT write and read
//! through a published block volume versus a plain file on the same
//! filesystem, and publish+unpublish latency.
//!
//! `cargo bench --bench block_io` (as root; see hack/bench/block.sh).
//! Environment: BLOCK_BENCH_GIB (default 2), BLOCK_BENCH_CYCLES (default 200),
//! BLOCK_BENCH_ROUNDS (default 5), BLOCK_BENCH_FS=xfs to put both on a
//! loop-mounted XFS instead of the host's /tmp.
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a small
//! smoke run instead.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{block_cap, create_req, Driver, LoopFs};
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;

const MIB: usize = 1 << 20;
const BS: usize = MIB;

/// A buffer aligned for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// Allocates and touches every page, so the timed loop pays no faults.
    fn new(len: usize, seed: u8) -> Aligned {
        let mut raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        for (i, b) in raw[off..off + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed;
        }
        Aligned { raw, off, len }
    }

    fn buf(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn buf_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// MB/s of one sequential pass over `total` bytes, bs 1 MiB, then fsync.
fn pass(path: &Path, total: u64, write: bool, buf: &mut Aligned) -> f64 {
    let f = open_direct(path);
    let started = Instant::now();
    let mut at = 0u64;
    while at < total {
        if write {
            f.write_all_at(buf.buf(), at).unwrap();
        } else {
            f.read_exact_at(buf.buf_mut(), at).unwrap();
        }
        at += BS as u64;
    }
    if write {
        f.sync_all().unwrap();
    }
    total as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn publish_req(id: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
        // Block volumes need no staged mount, but the driver wants a path.
        staging_target_path: format!("{}.staging", target.display()),
        volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
    }
}

async fn throughput(d: &mut Driver, total: u64, rounds: usize) {
    let mut req = create_req(
        "bench-disk",
        total as i64,
        block_cap(Mode::SingleNodeWriter),
    );
    req.capacity_range.as_mut().unwrap().limit_bytes = total as i64;
    d.c.controller.create_volume(req).await.unwrap();
    let target = d.path("pods/bench-disk");
    d.c.node
        .node_publish_volume(publish_req("bench-disk", &target))
        .await
        .unwrap();
    // The plain file sits beside the volume file, on the same filesystem.
    let plain = d.pool().join(".hostpath-csi/tmp/bench-plain");
    File::create(&plain).unwrap().set_len(total).unwrap();
    let dio = std::fs::read_to_string(
        std::fs::metadata(&target)
            .ok()
            .map(|st| {
                use std::os::unix::fs::MetadataExt;
                format!(
                    "/sys/block/loop{}/loop/dio",
                    nix::sys::stat::minor(st.rdev())
                )
            })
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    println!(
        "pool {} ({}), {} MiB, bs 1 MiB, O_DIRECT, loop direct I/O: {}",
        d.pool().display(),
        hostpath_csi::mount::fs_type_of(d.pool()).unwrap_or_default(),
        total >> 20,
        if dio.trim() == "1" { "on" } else { "off" },
    );
    let mut buf = Aligned::new(BS, 0x5a);
    let mut results: [[Vec<f64>; 2]; 2] = Default::default();
    for round in 0..rounds {
        // First round writes into holes (allocation) on both; later ones
        // overwrite. The order alternates, so neither side always runs while
        // the host is still flushing the other's writes.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for (w, write) in [true, false].into_iter().enumerate() {
            for k in order {
                let path = if k == 0 { &plain } else { &target };
                let mbs = pass(path, total, write, &mut buf);
                results[w][k].push(mbs);
            }
        }
        println!(
            "  round {}: write plain {:7.1} block {:7.1} | read plain {:7.1} block {:7.1} MB/s",
            round + 1,
            results[0][0][round],
            results[0][1][round],
            results[1][0][round],
            results[1][1][round]
        );
    }
    for (w, what) in ["write", "read"].into_iter().enumerate() {
        let plain_mbs = median(results[w][0].clone());
        let block_mbs = median(results[w][1].clone());
        let ratio = block_mbs / plain_mbs;
        println!(
            "seq {what:5} (median of {rounds}): plain file {plain_mbs:8.1} MB/s  block volume {block_mbs:8.1} MB/s  ratio {ratio:.3} {}",
            if ratio >= 0.9 { "(>= 0.9 target)" } else { "(BELOW 0.9 target)" }
        );
    }
    d.c.node
        .node_unpublish_volume(unpublish_req("bench-disk", &target))
        .await
        .unwrap();
    std::fs::remove_file(&plain).unwrap();
    d.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "bench-disk".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn publish_latency(d: &mut Driver, cycles: usize) {
    let req = create_req("bench-lat", 64 << 20, block_cap(Mode::SingleNodeWriter));
    d.c.controller.create_volume(req).await.unwrap();
    let target = d.path("pods/bench-lat");
    let (mut publish, mut unpublish, mut both) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        let t0 = Instant::now();
        d.c.node
            .node_publish_volume(publish_req("bench-lat", &target))
            .await
            .unwrap();
        let t1 = Instant::now();
        d.c.node
            .node_unpublish_volume(unpublish_req("bench-lat", &target))
            .await
            .unwrap();
        let t2 = Instant::now();
        publish.push(t1 - t0);
        unpublish.push(t2 - t1);
        both.push(t2 - t0);
    }
    println!("publish+unpublish of a block volume, {cycles} cycles (client-side, over gRPC):");
    for (what, mut v) in [
        ("publish", publish),
        ("unpublish", unpublish),
        ("cycle", both),
    ] {
        v.sort();
        println!(
            "  {what:9} p50 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
            ms(percentile(&v, 0.50)),
            ms(percentile(&v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (total, cycles, rounds) = if bench {
        (
            env_or("BLOCK_BENCH_GIB", 2u64) << 30,
            env_or("BLOCK_BENCH_CYCLES", 200usize),
            env_or("BLOCK_BENCH_ROUNDS", 5usize).max(1),
        )
    } else {
        println!("smoke run (pass --bench, e.g. `cargo bench --bench block_io`, for the real one)");
        (64 << 20, 5, 1)
    };
    // LoopFs must outlive the driver, which is declared after it.
    let fs = (std::env::var("BLOCK_BENCH_FS").as_deref() == Ok("xfs"))
        .then(|| LoopFs::new("xfs", (total >> 20) * 2 + 2048));
    let pools: Vec<(&str, Option<PathBuf>)> = match &fs {
        Some(fs) => vec![("bench", Some(fs.mount_point.join("pool")))],
        None => vec![("bench", None)],
    };
    let mut d = Driver::start_with(&pools).await;
    throughput(&mut d, total, rounds).await;
    publish_latency(&mut d, cycles).await;
}
