//! Clone benchmark (issue 4): end-to-end CreateVolume with a volume source
//! (gRPC included) against GNU `cp -a` of the same directory, on an XFS
//! reflink pool and on an ext4 pool, both on fresh loop-mounted filesystems.
//!
//! The source is a Filesystem (directory) volume holding a 10 GiB-virtual
//! `disk.img` with 1 GiB of data: 16 chunks of 64 MiB spread over the file.
//! Before every timed run: sync, drop caches, then pre-touch memory (on a
//! VM, first-touch faults of guest memory would otherwise land on whichever
//! copy runs first). The driver is a running daemon with its connection
//! open; `cp` starts cold, as a driver that execs it per clone would. The
//! order alternates. `cp -a` makes nothing durable, while CreateVolume
//! returns only after a flush, so `cp -a` followed by syncfs of the pool is
//! reported too.
//!
//! Run as root: `hack/bench/clone.sh` or `cargo bench --bench clone`.
//! Knobs: HPC_BENCH_ROUNDS (default 5), HPC_BENCH_PRETOUCH_GIB (default 3/4
//! of available memory, at most 16),
//! HPC_BENCH_FS (default `xfs,ext4`), HPC_BENCH_VERBOSE (driver log lines).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{create_req, rwo, Driver, LoopFs, GIB};
use hostpath_csi::proto::volume_content_source::{Type as Src, VolumeSource};
use hostpath_csi::proto::{DeleteVolumeRequest, GetPluginInfoRequest, VolumeContentSource};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 10 << 30;
const CHUNKS: u64 = 16;
const CHUNK: u64 = 64 * MIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 16 chunks of 64 MiB of pseudo-random data, one every 640 MiB.
fn write_disk(path: &Path) {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.set_len(DISK_SIZE).unwrap();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; CHUNK as usize];
    for i in 0..CHUNKS {
        for word in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all_at(&buf, i * (DISK_SIZE / CHUNKS)).unwrap();
    }
    f.sync_all().unwrap();
}

/// Three quarters of the memory available now, at most 16 GiB: the page
/// cache of both copies and of the loop devices' backing files must fit.
fn default_pretouch_gib() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    ((kib * 3 / 4) >> 20).min(16)
}

fn drop_caches() {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Writes every page of `gib` GiB and frees it, so the page cache the copy
/// is about to fill is backed by the hypervisor already.
fn pretouch(gib: u64) {
    let len = (gib << 30) as usize;
    let mut v: Vec<u8> = Vec::with_capacity(len);
    let base = v.as_mut_ptr();
    for offset in (0..len).step_by(4096) {
        // SAFETY: within the reserved capacity; written, never read.
        unsafe { base.add(offset).write_volatile(1) };
    }
    std::hint::black_box(&v);
}

/// Allocated bytes and size of a copy's disk.img.
fn shape(path: &Path) -> (u64, u64) {
    let st = fs::metadata(path).unwrap();
    (st.blocks() * 512, st.len())
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    (0..CHUNKS).all(|i| {
        let off = i * (DISK_SIZE / CHUNKS);
        fa.read_exact_at(&mut ba, off).unwrap();
        fb.read_exact_at(&mut bb, off).unwrap();
        ba == bb
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    fs: String,
    driver: Vec<Duration>,
    cp: Vec<Duration>,
    /// `cp -a` plus the syncfs that makes its copy durable.
    cp_sync: Vec<Duration>,
}

fn syncfs(path: &Path) -> Duration {
    let dir = File::open(path).unwrap();
    let started = Instant::now();
    nix::unistd::syncfs(&dir).unwrap();
    started.elapsed()
}

async fn bench_pool(fs_type: &str, rounds: u64, pretouch_gib: u64) -> Figures {
    let lfs = LoopFs::new(fs_type, 24 * 1024);
    let mut d = Driver::start_with(&[("bench", Some(lfs.mount_point.join("pool")))]).await;
    let golden = create_req("golden", 11 * GIB, rwo());
    d.c.controller.create_volume(golden).await.unwrap();
    let src = d.pool().join("golden");
    write_disk(&src.join("disk.img"));
    let src_shape = shape(&src.join("disk.img"));
    let mut result = Figures {
        fs: fs_type.to_owned(),
        driver: Vec::new(),
        cp: Vec::new(),
        cp_sync: Vec::new(),
    };
    nix::unistd::sync();
    for round in 0..rounds {
        let driver_first = round % 2 == 0;
        for step in 0..2 {
            let use_driver = (step == 0) == driver_first;
            drop_caches();
            pretouch(pretouch_gib);
            // The gRPC connection is up, as kubelet's and the provisioner's are.
            d.c.identity
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .unwrap();
            let (elapsed, copy) = if use_driver {
                let name = format!("clone-{round}");
                let mut req = create_req(&name, 11 * GIB, rwo());
                req.volume_content_source = Some(VolumeContentSource {
                    r#type: Some(Src::Volume(VolumeSource {
                        volume_id: "golden".into(),
                    })),
                });
                let started = Instant::now();
                d.c.controller.create_volume(req).await.unwrap();
                (started.elapsed(), d.pool().join(&name))
            } else {
                let target = d.pool().join(format!("cp-{round}"));
                let started = Instant::now();
                let ok = Command::new("cp")
                    .arg("-a")
                    .arg(&src)
                    .arg(&target)
                    .status()
                    .unwrap()
                    .success();
                let elapsed = started.elapsed();
                assert!(ok, "cp -a failed");
                result.cp_sync.push(elapsed + syncfs(d.pool()));
                (elapsed, target)
            };
            let (alloc, len) = shape(&copy.join("disk.img"));
            assert_eq!(len, src_shape.1);
            assert!(
                alloc <= src_shape.0 + 16 * MIB,
                "{} filled holes: {alloc} bytes allocated",
                copy.display()
            );
            if round == 0 {
                assert!(same_content(&src.join("disk.img"), &copy.join("disk.img")));
            }
            if use_driver {
                if std::env::var_os("HPC_BENCH_VERBOSE").is_some() {
                    let log = d.log();
                    for line in log
                        .lines()
                        .rev()
                        .take(40)
                        .filter(|l| l.contains("copy finished") || l.contains("CreateVolume"))
                        .take(2)
                    {
                        eprintln!("  {line}");
                    }
                }
                result.driver.push(elapsed);
                let id = copy.file_name().unwrap().to_string_lossy().into_owned();
                d.c.controller
                    .delete_volume(DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            } else {
                result.cp.push(elapsed);
                fs::remove_dir_all(&copy).unwrap();
            }
            eprintln!(
                "{fs_type} round {round}: {} {:.1} ms",
                if use_driver { "driver" } else { "cp -a " },
                ms(elapsed)
            );
        }
    }
    result
}

fn main() {
    // `cargo test --all-targets` runs this without --bench: the clone paths
    // are covered by tests/clone.rs, so skip the long measurement there.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "clone benchmark skipped (run `cargo bench --bench clone` or hack/bench/clone.sh)"
        );
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the clone benchmark needs root (loop devices, mounts, drop_caches)");
        std::process::exit(1);
    }
    let rounds = env_u64("HPC_BENCH_ROUNDS", 5).max(1);
    let pretouch_gib = env_u64("HPC_BENCH_PRETOUCH_GIB", default_pretouch_gib());
    let pools = std::env::var("HPC_BENCH_FS").unwrap_or_else(|_| "xfs,ext4".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let mut out = Vec::new();
        for fs_type in pools.split(',').filter(|f| !f.is_empty()) {
            out.push(bench_pool(fs_type, rounds, pretouch_gib).await);
        }
        out
    });
    println!();
    println!(
        "clone of a 10 GiB-virtual / 1 GiB-data disk.img, caches dropped, {rounds} rounds: median (min)"
    );
    println!(
        "{:<5} {:>21} {:>21} {:>21} {:>9} {:>12}",
        "pool", "CreateVolume (gRPC)", "cp -a", "cp -a + syncfs", "vs cp -a", "vs cp+syncfs"
    );
    for mut r in results {
        let min = |v: &[Duration]| ms(*v.iter().min().unwrap());
        let (dmin, cmin, smin) = (min(&r.driver), min(&r.cp), min(&r.cp_sync));
        let (dmed, cmed, smed) = (
            median(&mut r.driver),
            median(&mut r.cp),
            median(&mut r.cp_sync),
        );
        println!(
            "{:<5} {:>10.1} ms ({:>6.1}) {:>10.1} ms ({:>6.1}) {:>10.1} ms ({:>6.1}) {:>8.2}x {:>11.2}x",
            r.fs,
            ms(dmed),
            dmin,
            ms(cmed),
            cmin,
            ms(smed),
            smin,
            dmed.as_secs_f64() / cmed.as_secs_f64(),
            dmed.as_secs_f64() / smed.as_secs_f64()
        );
    }
}
