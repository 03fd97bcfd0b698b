//! Block volumes on loop devices, size-limited image volumes, expansion,
//! preallocation and restart, against real loop devices and real XFS/ext4
//! (run as root). Pools live on the host /tmp (ext4) and on a loop-mounted
//! XFS filesystem.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tonic::Code;

// ---------------------------------------------------------------- helpers

/// A zeroed buffer aligned for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        Aligned { raw, off, len }
    }

    fn from(data: &[u8]) -> Aligned {
        let mut a = Aligned::new(data.len());
        a.as_mut().copy_from_slice(data);
        a
    }

    fn as_ref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Bytes that differ at every offset and between seeds.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn dio_write(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = open_direct(path, true)?;
    f.write_all_at(Aligned::from(data).as_ref(), offset)?;
    f.sync_all()
}

fn dio_read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = open_direct(path, false).unwrap();
    let mut buf = Aligned::new(len);
    f.read_exact_at(buf.as_mut(), offset).unwrap();
    buf.as_ref().to_vec()
}

/// Plain (page cache) read of the backing file.
fn file_read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn size_of(path: &Path) -> u64 {
    File::open(path).unwrap().seek(SeekFrom::End(0)).unwrap()
}

/// Loop device number behind a published block target.
fn loop_of(target: &Path) -> u32 {
    let st = std::fs::metadata(target).unwrap();
    assert!(
        st.file_type().is_block_device(),
        "{} is not a block device",
        target.display()
    );
    assert_eq!(nix::sys::stat::major(st.rdev()), 7, "not a loop device");
    nix::sys::stat::minor(st.rdev()) as u32
}

fn sysfs(n: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/loop{n}/{file}"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Loop devices below `root` once at most `keep` remain, waiting briefly: a
/// detach is deferred while anything still has the device open.
async fn settled_loops_but(root: &Path, keep: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = loops_under(root);
        if l.len() <= keep || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn settled_loops(root: &Path) -> Vec<PathBuf> {
    settled_loops_but(root, 0).await
}

fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(eff.trim(), 16).unwrap() >> 24 & 1 == 1
}

fn statvfs_total(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() * st.fragment_size()
}

/// Runs `body` against a pool on the host filesystem, one on XFS and one in
/// a btrfs subvolume (whose files carry the subvolume's device number).
macro_rules! on_both_pools {
    ($body:ident) => {{
        {
            let btrfs = LoopFs::new("btrfs", 1536);
            let sub = btrfs.subvolume("vms");
            let d = Driver::start_with(&[("btrfs", Some(sub.join("pool")))]).await;
            assert_eq!(
                hostpath_csi::mount::fs_type_of(d.pool()).as_deref(),
                Some("btrfs")
            );
            $body(d).await;
        }
        {
            let d = Driver::start().await;
            $body(d).await;
        }
        {
            let xfs = LoopFs::new("xfs", 1536);
            let d = Driver::start_with(&[("xfs", Some(xfs.mount_point.join("pool")))]).await;
            assert_eq!(
                hostpath_csi::mount::fs_type_of(d.pool()).as_deref(),
                Some("xfs")
            );
            $body(d).await;
        }
    }};
}

// ---------------------------------------------------------------- tests

async fn block_round_trip(mut d: Driver) {
    let v = create_ok(&mut d.c, block_volume("pvc-disk", 64 * MIB)).await;
    assert_eq!(v.capacity_bytes, 64 * MIB);
    let file = d.pool().join("pvc-disk");
    assert!(std::fs::metadata(&file).unwrap().is_file());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
    let target = d.path("pods/disk/dev");
    publish_ok(&mut d.c, "pvc-disk", &target, block_rwo()).await;
    publish_ok(&mut d.c, "pvc-disk", &target, block_rwo()).await;
    assert_eq!(
        mounts_under(&target).len(),
        1,
        "repeated publish must not stack mounts"
    );
    let n = loop_of(&target);
    assert_eq!(sysfs(n, "loop/backing_file"), s(&file));
    assert_eq!(sysfs(n, "loop/dio"), "1", "direct I/O must be on");
    assert_eq!(sysfs(n, "queue/logical_block_size"), "512");
    assert_eq!(sysfs(n, "ro"), "0");
    assert_eq!(size_of(&target), 64 << 20);
    let data = pattern(7, 1 << 20);
    dio_write(&target, 3 << 20, &data).unwrap();
    assert_eq!(file_read(&file, 3 << 20, data.len()), data);
    assert_eq!(dio_read(&target, 3 << 20, data.len()), data);
    // A write past the end fails; the device is exactly the volume.
    assert!(dio_write(&target, 64 << 20, &data[..4096]).is_err());
    for _ in 0..2 {
        unpublish_ok(&mut d.c, "pvc-disk", &target).await;
    }
    assert!(!target.exists(), "unpublish removes the target file");
    assert!(
        settled_loops(d.pool()).await.is_empty(),
        "loop device left attached"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists()
            || sysfs(n, "loop/backing_file") != s(&file)
    );
    assert_eq!(
        file_read(&file, 3 << 20, data.len()),
        data,
        "data survives unpublish"
    );
    // blockSize: 4096 gives 4 KiB logical sectors.
    create_ok(
        &mut d.c,
        with_params(block_volume("pvc-4k", 16 * MIB), &[("blockSize", "4096")]),
    )
    .await;
    // Kubelet's flow for Block: stage (a no-op here), publish with the
    // staging path, unpublish, unstage.
    let t4 = d.path("pods/4k/dev");
    let st4 = staging_for(&t4);
    stage_publish(&mut d.c, "pvc-4k", &t4, block_rwo()).await;
    assert!(mounts_under(&st4).is_empty());
    assert_eq!(sysfs(loop_of(&t4), "queue/logical_block_size"), "4096");
    unpublish_unstage(&mut d.c, "pvc-4k", &t4).await;
    for id in ["pvc-disk", "pvc-4k"] {
        delete_ok(&mut d.c, id).await;
    }
    assert!(!file.exists());
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[tokio::test]
async fn block_round_trip_through_the_device() {
    on_both_pools!(block_round_trip);
}

/// Fills an image volume to ENOSPC; returns the bytes written.
fn fill(dir: &Path) -> u64 {
    let chunk = pattern(3, 1 << 20);
    let mut f = File::create(dir.join("fill")).unwrap();
    let mut written = 0u64;
    loop {
        use std::io::Write;
        match f.write(&chunk) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        assert!(written < 4 << 30, "no size limit");
    }
    match f.sync_all() {
        Ok(()) => {}
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}"),
    }
    written
}

async fn image_round_trip(mut d: Driver, fs_type: &str, asked: i64, expected: i64) {
    let id = format!("pvc-img-{fs_type}");
    let cap = mount_cap_fs(fs_type);
    let v = create_ok(&mut d.c, image_volume(&id, asked, fs_type)).await;
    assert_eq!(
        v.capacity_bytes, expected,
        "capacity is what was really given"
    );
    let file = d.pool().join(&id);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), expected as u64);
    let target = d.path("pods/img");
    let staging = staging_for(&target);
    stage_publish(&mut d.c, &id, &target, cap.clone()).await;
    let mi = mounts_under(&target);
    assert_eq!(mi.len(), 1);
    assert_eq!(
        hostpath_csi::mount::fs_type_of(&target).as_deref(),
        Some(fs_type)
    );
    std::fs::write(target.join("hello"), b"in the image").unwrap();
    let written = fill(&target);
    assert!(written > expected as u64 / 2, "wrote only {written} bytes");
    assert!(
        written <= expected as u64,
        "wrote {written} bytes into a {expected}-byte volume"
    );
    // Nothing spilled into the pool: the image never grows past its size.
    assert_eq!(std::fs::metadata(&file).unwrap().len(), expected as u64);
    assert!(allocated(&file) <= expected as u64);
    let entries: Vec<_> = std::fs::read_dir(d.pool())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    // Stats: the filesystem's own usage and inodes.
    let st =
        d.c.node
            .node_get_volume_stats(stats_req(&id, &target))
            .await
            .unwrap()
            .into_inner();
    let bytes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert_eq!(bytes.total as u64, statvfs_total(&target));
    assert!(
        bytes.total <= expected && bytes.total > expected / 2,
        "{bytes:?}"
    );
    assert!(
        bytes.used as u64 >= written * 9 / 10,
        "{bytes:?} after writing {written}"
    );
    assert!(bytes.available < 16 * MIB, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used >= 2, "{inodes:?}");
    assert!(!st.volume_condition.unwrap().abnormal);
    // Staging stats work too.
    d.c.node
        .node_get_volume_stats(stats_req(&id, &staging))
        .await
        .unwrap();
    unpublish_unstage(&mut d.c, &id, &target).await;
    unpublish_unstage(&mut d.c, &id, &target).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    assert!(mounts_under(d.dir.path()).is_empty());
    // The data is in the image and comes back on the next stage.
    stage_publish(&mut d.c, &id, &target, cap).await;
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"in the image"
    );
    unpublish_unstage(&mut d.c, &id, &target).await;
    delete_ok(&mut d.c, &id).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

#[tokio::test]
async fn image_volume_xfs_on_ext4_pool_stops_at_its_size() {
    let d = Driver::start().await;
    // mkfs.xfs refuses under 300 MB: 100 MiB becomes 300 MiB.
    image_round_trip(d, "xfs", 100 * MIB, 300 * MIB).await;
}

#[tokio::test]
async fn image_volume_ext4_on_xfs_pool_stops_at_its_size() {
    let xfs = LoopFs::new("xfs", 1024);
    let d = Driver::start_with(&[("xfs", Some(xfs.mount_point.join("pool")))]).await;
    image_round_trip(d, "ext4", 64 * MIB, 64 * MIB).await;
}

#[tokio::test]
async fn image_capacity_rounding_respects_limit() {
    let mut d = Driver::start().await;
    let mut r = image_volume("pvc-small", 100 * MIB, "xfs");
    r.capacity_range.as_mut().unwrap().limit_bytes = 200 * MIB;
    let e = d.c.controller.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert!(!d.pool().join("pvc-small").exists());
    let mut r = image_volume("pvc-fits", 100 * MIB, "xfs");
    r.capacity_range.as_mut().unwrap().limit_bytes = 400 * MIB;
    assert_eq!(create_ok(&mut d.c, r).await.capacity_bytes, 300 * MIB);
    let r = image_volume("pvc-btrfs", 100 * MIB, "btrfs");
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
    // Default layout stays a directory.
    let v = create_ok(&mut d.c, create_req("pvc-dir", 100 * MIB, rwo())).await;
    assert_eq!(v.capacity_bytes, 100 * MIB);
    assert!(d.pool().join("pvc-dir").is_dir());
}

/// A preallocated Block volume request.
fn thick_block_volume(name: &str, size: i64) -> CreateVolumeRequest {
    with_params(block_volume(name, size), &[("preallocation", "true")])
}

async fn preallocation(mut d: Driver) {
    const SIZE: i64 = 256 * MIB;
    create_ok(&mut d.c, block_volume("pvc-thin", SIZE)).await;
    create_ok(&mut d.c, thick_block_volume("pvc-thick", SIZE)).await;
    let (thin, thick) = (d.pool().join("pvc-thin"), d.pool().join("pvc-thick"));
    assert!(
        allocated(&thin) < MIB as u64,
        "sparse volume allocated {}",
        allocated(&thin)
    );
    assert!(
        allocated(&thick) >= SIZE as u64,
        "preallocated volume has only {}",
        allocated(&thick)
    );
    // An image volume can be thick too.
    let mut r = image_volume("pvc-img-thick", 300 * MIB, "xfs");
    r.parameters.insert("preallocation".into(), "true".into());
    create_ok(&mut d.c, r).await;
    assert!(allocated(&d.pool().join("pvc-img-thick")) >= 300 << 20);
    // ModifyVolume turns the thin disk thick in place, while it is in use.
    let target = d.path("pods/thin");
    publish_ok(&mut d.c, "pvc-thin", &target, block_rwo()).await;
    let data = pattern(11, 2 << 20);
    dio_write(&target, 100 << 20, &data).unwrap();
    let modify = |v: &str| modify_req("pvc-thin", &[("preallocation", v)]);
    d.c.controller
        .controller_modify_volume(modify("false"))
        .await
        .unwrap();
    assert!(
        allocated(&thin) < 4 * MIB as u64,
        "preallocation=false allocates nothing"
    );
    for _ in 0..2 {
        d.c.controller
            .controller_modify_volume(modify("true"))
            .await
            .unwrap();
    }
    assert!(
        allocated(&thin) >= SIZE as u64,
        "modify allocated only {}",
        allocated(&thin)
    );
    assert_eq!(std::fs::metadata(&thin).unwrap().len(), SIZE as u64);
    assert_eq!(
        dio_read(&target, 100 << 20, data.len()),
        data,
        "data untouched"
    );
    assert_eq!(file_read(&thin, 100 << 20, data.len()), data);
    assert_eq!(dio_read(&target, 0, 4096), vec![0u8; 4096]);
    // A preallocated volume stays thick when it grows.
    d.c.controller
        .controller_expand_volume(grow_req("pvc-thin", SIZE + 64 * MIB, Some(block_rwo())))
        .await
        .unwrap();
    assert!(allocated(&thin) >= (SIZE + 64 * MIB) as u64);
    unpublish_ok(&mut d.c, "pvc-thin", &target).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    for (what, req, want) in [
        (
            "a parameter that is not mutable",
            modify_req("pvc-thin", &[("blockSize", "4096")]),
            Code::InvalidArgument,
        ),
        (
            "an unknown volume",
            modify_req("pvc-missing", &[("preallocation", "true")]),
            Code::NotFound,
        ),
    ] {
        let r = d.c.controller.controller_modify_volume(req).await;
        assert_code(&r, want, what);
    }
    // mutable_parameters at create time.
    let mut r = block_volume("pvc-vac", 32 * MIB);
    r.mutable_parameters = params(&[("preallocation", "true")]);
    create_ok(&mut d.c, r).await;
    assert!(allocated(&d.pool().join("pvc-vac")) >= 32 << 20);
}

#[tokio::test]
async fn preallocation_thick_thin_and_modify_in_place() {
    on_both_pools!(preallocation);
}

async fn expand_block_while_published(d: &mut Driver) {
    create_ok(&mut d.c, block_volume("pvc-grow", 64 * MIB)).await;
    let target = d.path("pods/grow");
    publish_ok(&mut d.c, "pvc-grow", &target, block_rwo()).await;
    let head = pattern(5, 1 << 20);
    dio_write(&target, 0, &head).unwrap();
    // Hold the device open across the expansion, like a running VM.
    let held = open_direct(&target, true).unwrap();
    let r =
        d.c.controller
            .controller_expand_volume(grow_req("pvc-grow", 128 * MIB, Some(block_rwo())))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, 128 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        std::fs::metadata(d.pool().join("pvc-grow")).unwrap().len(),
        128 << 20
    );
    for _ in 0..2 {
        let n =
            d.c.node
                .node_expand_volume(node_grow_req("pvc-grow", &target, 128 * MIB))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(n.capacity_bytes, 128 * MIB);
    }
    assert_eq!(size_of(&target), 128 << 20);
    let mut sz: u64 = 0;
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // SAFETY: BLKGETSIZE64 writes one u64.
    unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(&held), &mut sz) }.unwrap();
    assert_eq!(sz, 128 << 20);
    let tail = pattern(6, 1 << 20);
    held.write_all_at(Aligned::from(&tail).as_ref(), 127 << 20)
        .unwrap();
    held.sync_all().unwrap();
    drop(held);
    assert_eq!(
        file_read(&d.pool().join("pvc-grow"), 127 << 20, tail.len()),
        tail
    );
    assert_eq!(dio_read(&target, 0, head.len()), head);
    // The same size again is a no-op; smaller is OUT_OF_RANGE.
    let again =
        d.c.controller
            .controller_expand_volume(grow_req("pvc-grow", 128 * MIB, Some(block_rwo())))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(again.capacity_bytes, 128 * MIB);
    let mut shrink = grow_req("pvc-grow", 32 * MIB, Some(block_rwo()));
    shrink.capacity_range.as_mut().unwrap().limit_bytes = 32 * MIB;
    assert_eq!(
        code(&d.c.controller.controller_expand_volume(shrink).await),
        Code::OutOfRange
    );
    let st =
        d.c.node
            .node_get_volume_stats(stats_req("pvc-grow", &target))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(st.usage[0].total, 128 * MIB);
    unpublish_ok(&mut d.c, "pvc-grow", &target).await;
}

async fn expand_image_while_published(d: &mut Driver, fs_type: &str, from: i64, to: i64) {
    let id = format!("pvc-grow-{fs_type}");
    let cap = mount_cap_fs(fs_type);
    create_ok(&mut d.c, image_volume(&id, from, fs_type)).await;
    let target = d.path(&format!("pods/{id}"));
    let staging = staging_for(&target);
    stage_publish(&mut d.c, &id, &target, cap.clone()).await;
    std::fs::write(target.join("keep"), b"kept").unwrap();
    let before = statvfs_total(&target);
    assert!(before <= from as u64);
    let r =
        d.c.controller
            .controller_expand_volume(grow_req(&id, to, Some(cap.clone())))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, to);
    assert!(r.node_expansion_required);
    if fs_type == "ext4" && !has_cap_sys_resource() {
        // The kernel refuses online ext4 growth without CAP_SYS_RESOURCE (as
        // in this sandbox): a clear error, and the next stage grows it offline.
        let e =
            d.c.node
                .node_expand_volume(node_grow_req(&id, &target, to))
                .await
                .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
        unpublish_unstage(&mut d.c, &id, &target).await;
        stage_publish(&mut d.c, &id, &target, cap).await;
    }
    for _ in 0..2 {
        let n =
            d.c.node
                .node_expand_volume(node_grow_req(&id, &target, to))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(n.capacity_bytes, to);
    }
    let after = statvfs_total(&target);
    assert!(
        after > before + (to - from) as u64 * 8 / 10,
        "{fs_type} grew from {before} only to {after}"
    );
    assert_eq!(statvfs_total(&staging), after);
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
    let st =
        d.c.node
            .node_get_volume_stats(stats_req(&id, &target))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(st.usage[0].total as u64, after);
    unpublish_unstage(&mut d.c, &id, &target).await;
}

#[tokio::test]
async fn expansion_while_published() {
    let mut d = Driver::start().await;
    expand_block_while_published(&mut d).await;
    expand_image_while_published(&mut d, "xfs", 300 * MIB, 512 * MIB).await;
    expand_image_while_published(&mut d, "ext4", 64 * MIB, 160 * MIB).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[tokio::test]
async fn image_expanded_while_unstaged_grows_on_next_stage() {
    let mut d = Driver::start().await;
    for (fs_type, from, to) in [("xfs", 300 * MIB, 600 * MIB), ("ext4", 64 * MIB, 96 * MIB)] {
        let id = format!("pvc-off-{fs_type}");
        let cap = mount_cap_fs(fs_type);
        create_ok(&mut d.c, image_volume(&id, from, fs_type)).await;
        let target = d.path("pods/off");
        stage_publish(&mut d.c, &id, &target, cap.clone()).await;
        std::fs::write(target.join("keep"), b"kept").unwrap();
        let before = statvfs_total(&target);
        unpublish_unstage(&mut d.c, &id, &target).await;
        let r =
            d.c.controller
                .controller_expand_volume(grow_req(&id, to, Some(cap.clone())))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(r.capacity_bytes, to);
        stage_publish(&mut d.c, &id, &target, cap).await;
        let after = statvfs_total(&target);
        assert!(
            after > before + (to - from) as u64 * 7 / 10,
            "{fs_type}: {before} -> {after}"
        );
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
        unpublish_unstage(&mut d.c, &id, &target).await;
        delete_ok(&mut d.c, &id).await;
    }
    assert!(settled_loops(d.pool()).await.is_empty());
}

#[tokio::test]
async fn restart_after_kill9_then_clean_teardown() {
    let mut d = Driver::start().await;
    let before = loops_under(d.pool());
    assert!(before.is_empty());
    create_ok(&mut d.c, block_volume("pvc-vm", 64 * MIB)).await;
    create_ok(&mut d.c, image_volume("pvc-fs", 300 * MIB, "xfs")).await;
    let (bt, it) = (d.path("pods/vm"), d.path("pods/fs"));
    publish_ok(&mut d.c, "pvc-vm", &bt, block_rwo()).await;
    stage_publish(&mut d.c, "pvc-fs", &it, mount_cap_fs("xfs")).await;
    let data = pattern(9, 1 << 20);
    dio_write(&bt, 0, &data).unwrap();
    std::fs::write(it.join("f"), b"before crash").unwrap();
    let attached = loops_under(d.pool());
    assert_eq!(attached.len(), 2, "{attached:?}");

    d.kill9();
    d.restart().await;

    // Nothing was detached or unmounted under the "pods".
    assert_eq!(loops_under(d.pool()), attached);
    assert_eq!(dio_read(&bt, 0, data.len()), data);
    assert_eq!(std::fs::read(it.join("f")).unwrap(), b"before crash");
    dio_write(&bt, 1 << 20, &data).unwrap();
    // The new process sees the publications: stats, idempotent publish, expand.
    for (id, p) in [("pvc-vm", &bt), ("pvc-fs", &it)] {
        let r =
            d.c.node
                .node_get_volume_stats(stats_req(id, p))
                .await
                .unwrap()
                .into_inner();
        assert!(!r.volume_condition.unwrap().abnormal);
    }
    publish_ok(&mut d.c, "pvc-vm", &bt, block_rwo()).await;
    assert_eq!(mounts_under(&bt).len(), 1);
    let del =
        d.c.controller
            .delete_volume(delete_req("pvc-vm"))
            .await
            .unwrap_err();
    assert_eq!(del.code(), Code::FailedPrecondition);
    d.c.controller
        .controller_expand_volume(grow_req("pvc-vm", 96 * MIB, Some(block_rwo())))
        .await
        .unwrap();
    d.c.node
        .node_expand_volume(node_grow_req("pvc-vm", &bt, 96 * MIB))
        .await
        .unwrap();
    assert_eq!(size_of(&bt), 96 << 20);

    unpublish_ok(&mut d.c, "pvc-vm", &bt).await;
    unpublish_unstage(&mut d.c, "pvc-fs", &it).await;
    for id in ["pvc-vm", "pvc-fs"] {
        delete_ok(&mut d.c, id).await;
    }
    assert_eq!(settled_loops(d.pool()).await, before, "leaked loop devices");
    assert!(mounts_under(d.dir.path()).is_empty());
    assert!(!bt.exists() && !it.exists());
}

#[tokio::test]
async fn two_targets_share_one_loop_device() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-shared", 32 * MIB)).await;
    let (a, b) = (d.path("pods/a/dev"), d.path("pods/b/dev"));
    let mut c1 = d.c.node.clone();
    let mut c2 = d.c.node.clone();
    let (r1, r2) = tokio::join!(
        c1.node_publish_volume(publish_req("pvc-shared", &a, block_rwo())),
        c2.node_publish_volume(publish_req("pvc-shared", &b, block_rwo())),
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(loop_of(&a), loop_of(&b));
    assert_eq!(loops_under(d.pool()).len(), 1);
    let data = pattern(1, 64 << 10);
    dio_write(&a, 0, &data).unwrap();
    assert_eq!(dio_read(&b, 0, data.len()), data);
    unpublish_ok(&mut d.c, "pvc-shared", &a).await;
    assert!(!a.exists());
    assert_eq!(
        loops_under(d.pool()).len(),
        1,
        "the other target still uses the device"
    );
    let more = pattern(2, 64 << 10);
    dio_write(&b, 1 << 20, &more).unwrap();
    assert_eq!(dio_read(&b, 0, data.len()), data);
    assert_eq!(dio_read(&b, 1 << 20, more.len()), more);
    unpublish_ok(&mut d.c, "pvc-shared", &b).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

#[tokio::test]
async fn read_only_publish_attaches_read_only() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-ro", 32 * MIB)).await;
    let (ro, rw) = (d.path("pods/ro"), d.path("pods/rw"));
    // Read-only first, then a writer: each gets a device of its kind.
    for _ in 0..2 {
        let p = NodePublishVolumeRequest {
            readonly: true,
            ..publish_req("pvc-ro", &ro, block_rwo())
        };
        d.c.node.node_publish_volume(p).await.unwrap();
    }
    assert_eq!(sysfs(loop_of(&ro), "ro"), "1");
    let e = dio_write(&ro, 0, &[1u8; 4096]).unwrap_err();
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        "{e}"
    );
    publish_ok(&mut d.c, "pvc-ro", &rw, block_rwo()).await;
    assert_eq!(sysfs(loop_of(&rw), "ro"), "0");
    dio_write(&rw, 0, &[2u8; 4096]).unwrap();
    assert_eq!(dio_read(&ro, 0, 4096), vec![2u8; 4096]);
    assert!(
        dio_write(&ro, 0, &[1u8; 4096]).is_err(),
        "a writer must not make the reader writable"
    );
    // The same target asked again with the other mode is a conflict.
    let r =
        d.c.node
            .node_publish_volume(publish_req("pvc-ro", &ro, block_rwo()))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    // The volume is still in use while either remains.
    unpublish_ok(&mut d.c, "pvc-ro", &rw).await;
    assert_eq!(loops_under(d.pool()).len(), 1);
    assert_eq!(dio_read(&ro, 0, 4096), vec![2u8; 4096]);
    assert_eq!(
        code(&d.c.controller.delete_volume(delete_req("pvc-ro")).await),
        Code::FailedPrecondition
    );
    unpublish_ok(&mut d.c, "pvc-ro", &ro).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    // A reader-only access mode is read-only too.
    publish_ok(&mut d.c, "pvc-ro", &rw, block_rwo()).await;
    publish_ok(
        &mut d.c,
        "pvc-ro",
        &ro,
        block_cap(Mode::SingleNodeReaderOnly),
    )
    .await;
    assert_eq!(sysfs(loop_of(&ro), "ro"), "1");
    assert_ne!(loop_of(&ro), loop_of(&rw));
    unpublish_ok(&mut d.c, "pvc-ro", &ro).await;
    unpublish_ok(&mut d.c, "pvc-ro", &rw).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    // Image volume published read-only: the bind mount refuses writes.
    create_ok(&mut d.c, image_volume("pvc-img-ro", 64 * MIB, "ext4")).await;
    // The staging directory is left for the driver to make.
    let (t, cap) = (d.path("pods/img"), mount_cap_fs("ext4"));
    let stage = stage_req("pvc-img-ro", &staging_for(&t), cap.clone());
    d.c.node.node_stage_volume(stage).await.unwrap();
    let p = NodePublishVolumeRequest {
        readonly: true,
        ..publish_req("pvc-img-ro", &t, cap)
    };
    d.c.node.node_publish_volume(p).await.unwrap();
    let e = std::fs::write(t.join("x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    unpublish_unstage(&mut d.c, "pvc-img-ro", &t).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

#[tokio::test]
async fn delete_of_attached_volume_names_the_loop_device() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-busy", 16 * MIB)).await;
    let t = d.path("pods/busy");
    publish_ok(&mut d.c, "pvc-busy", &t, block_rwo()).await;
    let dev = format!("/dev/loop{}", loop_of(&t));
    let e =
        d.c.controller
            .delete_volume(delete_req("pvc-busy"))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains(&dev),
        "{} should name {dev}",
        e.message()
    );
    assert!(d.pool().join("pvc-busy").exists());
    unpublish_ok(&mut d.c, "pvc-busy", &t).await;
    delete_ok(&mut d.c, "pvc-busy").await;
    // A staged image volume is attached as well.
    create_ok(&mut d.c, image_volume("pvc-busy-img", 64 * MIB, "ext4")).await;
    let st = d.path("staging/busy");
    let stage = stage_req("pvc-busy-img", &st, mount_cap_fs("ext4"));
    d.c.node.node_stage_volume(stage).await.unwrap();
    let e =
        d.c.controller
            .delete_volume(delete_req("pvc-busy-img"))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("/dev/loop"), "{}", e.message());
    let unstage = unstage_req("pvc-busy-img", &st);
    d.c.node.node_unstage_volume(unstage).await.unwrap();
    delete_ok(&mut d.c, "pvc-busy-img").await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

#[tokio::test]
async fn block_validation_and_validate_volume_capabilities() {
    let mut d = Driver::start().await;
    let blk = create_ok(&mut d.c, block_volume("pvc-blk", 16 * MIB)).await;
    let img = create_ok(&mut d.c, image_volume("pvc-img", 64 * MIB, "ext4")).await;
    let t = d.path("pods/blk");
    for (what, req, want) in [
        // A mount capability (with mount_flags) exceeds what a Block volume offers.
        (
            "mount flags on a Block volume",
            publish_req("pvc-blk", &t, mount_cap_flags(&["noexec"])),
            Code::FailedPrecondition,
        ),
        (
            "an image volume not staged first",
            publish_req("pvc-img", &d.path("pods/img"), mount_cap_fs("ext4")),
            Code::FailedPrecondition,
        ),
        (
            "a block capability for an image volume",
            publish_req("pvc-img", &t, block_rwo()),
            Code::FailedPrecondition,
        ),
    ] {
        assert_code(&d.c.node.node_publish_volume(req).await, want, what);
        assert!(!t.exists(), "{what}");
    }
    assert!(loops_under(d.pool()).is_empty());
    // An ext4 image cannot be staged as xfs: the capability exceeds it.
    let st = d.path("staging/img");
    let r =
        d.c.node
            .node_stage_volume(stage_req("pvc-img", &st, mount_cap_fs("xfs")));
    assert_code(
        &r.await,
        Code::FailedPrecondition,
        "an ext4 image staged as xfs",
    );
    assert!(mounts_under(d.dir.path()).is_empty());
    assert!(loops_under(d.pool()).is_empty());

    let validate = |v: &Volume, cap: VolumeCapability| ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_context: v.volume_context.clone(),
        volume_capabilities: vec![cap],
        ..Default::default()
    };
    let confirmed = |r: ValidateVolumeCapabilitiesResponse| r.confirmed.is_some();
    let mut ctl = d.c.controller.clone();
    let mut check = async |v: &Volume, cap: VolumeCapability| {
        confirmed(
            ctl.validate_volume_capabilities(validate(v, cap))
                .await
                .unwrap()
                .into_inner(),
        )
    };
    assert!(check(&blk, block_rwo()).await);
    assert!(check(&blk, block_cap(Mode::SingleNodeReaderOnly)).await);
    assert!(!check(&blk, rwo()).await);
    assert!(!check(&blk, block_cap(Mode::MultiNodeMultiWriter)).await);
    assert!(check(&img, mount_cap_fs("ext4")).await);
    assert!(
        check(&img, rwo()).await,
        "no fs_type means the volume's own"
    );
    assert!(
        !check(&img, mount_cap_fs("xfs")).await,
        "an ext4 image cannot be mounted as xfs"
    );
    assert!(!check(&img, block_rwo()).await);
    // A capability without access mode or type is malformed, not unsupported.
    for cap in [
        VolumeCapability {
            access_mode: None,
            ..block_rwo()
        },
        VolumeCapability {
            access_type: None,
            ..block_rwo()
        },
    ] {
        let r = ctl.validate_volume_capabilities(validate(&blk, cap)).await;
        assert_eq!(code(&r), Code::InvalidArgument);
    }
    // Creation parameters are confirmed only when they fit the volume.
    let with_params = |p: &[(&str, &str)]| {
        let mut r = validate(&img, mount_cap_fs("ext4"));
        r.parameters = params(p);
        let mut ctl = ctl.clone();
        async move {
            ctl.validate_volume_capabilities(r)
                .await
                .unwrap()
                .into_inner()
                .confirmed
                .is_some()
        }
    };
    assert!(with_params(&[("layout", "image"), ("storagePool", "local")]).await);
    assert!(!with_params(&[("layout", "directory")]).await);
    assert!(!with_params(&[("storagePool", "elsewhere")]).await);
    assert!(!with_params(&[("layout", "bogus")]).await);
}

#[tokio::test]
async fn stats_and_condition_of_block_volumes() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-st", 48 * MIB)).await;
    let t = d.path("pods/st");
    publish_ok(&mut d.c, "pvc-st", &t, block_rwo()).await;
    let r =
        d.c.node
            .node_get_volume_stats(stats_req("pvc-st", &t))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        r.usage.len(),
        1,
        "a raw device has no inodes: {:?}",
        r.usage
    );
    assert_eq!(r.usage[0].unit, volume_usage::Unit::Bytes as i32);
    assert_eq!(r.usage[0].total, size_of(&t) as i64);
    assert_eq!(r.usage[0].total, 48 * MIB);
    assert!(!r.volume_condition.unwrap().abnormal);
    // Detach the device behind the driver's back; the bind mount of the node remains.
    let n = loop_of(&t);
    let ok = std::process::Command::new("losetup")
        .arg("-d")
        .arg(format!("/dev/loop{n}"))
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(settled_loops(d.pool()).await.is_empty());
    assert_eq!(mounts_under(&t).len(), 1);
    let r =
        d.c.node
            .node_get_volume_stats(stats_req("pvc-st", &t))
            .await
            .unwrap()
            .into_inner();
    let cond = r.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains(&format!("loop{n}")),
        "{}",
        cond.message
    );
    // The same device now backs another file: still abnormal.
    let other = d.path("other.img");
    File::create(&other).unwrap().set_len(MIB as u64).unwrap();
    let ok = std::process::Command::new("losetup")
        .arg(format!("/dev/loop{n}"))
        .arg(&other)
        .status()
        .unwrap();
    if ok.success() {
        let r =
            d.c.node
                .node_get_volume_stats(stats_req("pvc-st", &t))
                .await
                .unwrap()
                .into_inner();
        let cond = r.volume_condition.unwrap();
        assert!(cond.abnormal, "{cond:?}");
        // Unpublish must neither detach nor unmount a device that now
        // backs another file: it may be someone else's publication.
        unpublish_ok(&mut d.c, "pvc-st", &t).await;
        assert_eq!(loops_under(d.dir.path()), vec![other.clone()]);
        assert_eq!(mounts_under(&t), vec![t.clone()], "the bind was undone");
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(format!("/dev/loop{n}"))
            .status();
        // Detached, the bind holds nothing: the retried unpublish undoes it
        // (unless another process took loop{n} meanwhile: then the bind is
        // theirs to see, and is left alone).
        let _ = settled_loops(d.dir.path()).await;
        unpublish_ok(&mut d.c, "pvc-st", &t).await;
    } else {
        // Someone else took loop{n} first.
        unpublish_ok(&mut d.c, "pvc-st", &t).await;
    }
    if !mounts_under(&t).is_empty() {
        // Left alone only because another process attached loop{n} since.
        let taken = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file"));
        assert!(taken.is_ok(), "the bind of a detached device stayed");
        let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&t);
    }
    assert!(!t.exists());
    assert!(mounts_under(d.dir.path()).is_empty());
    // Republish works again after the loss.
    publish_ok(&mut d.c, "pvc-st", &t, block_rwo()).await;
    unpublish_ok(&mut d.c, "pvc-st", &t).await;
    delete_ok(&mut d.c, "pvc-st").await;
    // Unknown path for a known volume is NOT_FOUND.
    assert_eq!(
        code(
            &d.c.node
                .node_get_volume_stats(stats_req("pvc-st", &t))
                .await
        ),
        Code::NotFound
    );
}

/// Publishes (or unpublishes) `n` block volumes of one driver at once.
fn all_at_once(
    d: &Driver,
    n: usize,
    publish: bool,
) -> Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>> {
    (0..n)
        .map(|i| {
            let mut c = d.c.node.clone();
            let (id, target) = (format!("pvc-p{i}"), d.path(&format!("pods/p{i}/dev")));
            tokio::spawn(async move {
                if publish {
                    c.node_publish_volume(publish_req(&id, &target, block_rwo()))
                        .await
                        .map(drop)
                } else {
                    c.node_unpublish_volume(unpublish_req(&id, &target))
                        .await
                        .map(drop)
                }
            })
        })
        .collect()
}

/// Two driver processes (as two nodes' worth of parallel tests would) each
/// publish 12 volumes at once: loop allocation must survive the races
/// between LOOP_CTL_GET_FREE and LOOP_CONFIGURE, and go past loop7.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_parallel_block_publishes() {
    const N: usize = 12;
    let mut drivers = vec![Driver::start().await, Driver::start().await];
    for d in &mut drivers {
        for i in 0..N {
            create_ok(&mut d.c, block_volume(&format!("pvc-p{i}"), 8 * MIB)).await;
        }
    }
    let tasks: Vec<_> = drivers
        .iter()
        .flat_map(|d| all_at_once(d, N, true))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut devices = Vec::new();
    for d in &drivers {
        assert_eq!(loops_under(d.pool()).len(), N);
        for i in 0..N {
            let t = d.path(&format!("pods/p{i}/dev"));
            devices.push(loop_of(&t));
            let data = pattern(i as u8, 4096);
            dio_write(&t, 0, &data).unwrap();
            assert_eq!(
                file_read(&d.pool().join(format!("pvc-p{i}")), 0, 4096),
                data
            );
        }
    }
    devices.sort();
    devices.dedup();
    assert_eq!(devices.len(), 2 * N, "every volume has its own device");
    assert!(devices.iter().any(|n| *n >= 8));
    let tasks: Vec<_> = drivers
        .iter()
        .flat_map(|d| all_at_once(d, N, false))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for d in &drivers {
        assert!(settled_loops(d.pool()).await.is_empty());
        assert!(mounts_under(d.dir.path()).is_empty());
    }
}

/// While something still holds the device open, a detach is deferred
/// (autoclear); a new publish must not reuse that doomed device.
#[tokio::test]
async fn deferred_detach_is_not_reused() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-held", 16 * MIB)).await;
    let t = d.path("pods/held");
    publish_ok(&mut d.c, "pvc-held", &t, block_rwo()).await;
    let n = loop_of(&t);
    let held = File::open(format!("/dev/loop{n}")).unwrap();
    unpublish_ok(&mut d.c, "pvc-held", &t).await;
    assert_eq!(
        sysfs(n, "loop/autoclear"),
        "1",
        "detach deferred while open"
    );
    publish_ok(&mut d.c, "pvc-held", &t, block_rwo()).await;
    let m = loop_of(&t);
    assert_ne!(m, n, "reused a device that goes away at the next close");
    drop(held);
    assert_eq!(settled_loops_but(d.pool(), 1).await.len(), 1);
    let data = pattern(4, 4096);
    dio_write(&t, 0, &data).unwrap();
    assert_eq!(file_read(&d.pool().join("pvc-held"), 0, 4096), data);
    unpublish_ok(&mut d.c, "pvc-held", &t).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

/// Regression: a brief opener of the device (udev, blkid, another driver's
/// scan) defers the kernel's detach past the unpublish; DeleteVolume right
/// after must wait for it rather than fail with FAILED_PRECONDITION.
#[tokio::test]
async fn delete_right_after_unpublish_waits_for_a_deferred_detach() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-brief", 16 * MIB)).await;
    let t = d.path("pods/brief");
    publish_ok(&mut d.c, "pvc-brief", &t, block_rwo()).await;
    let n = loop_of(&t);
    let held = File::open(format!("/dev/loop{n}")).unwrap();
    unpublish_ok(&mut d.c, "pvc-brief", &t).await;
    assert_eq!(sysfs(n, "loop/autoclear"), "1", "detach must be pending");
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    delete_ok(&mut d.c, "pvc-brief").await;
    closer.join().unwrap();
    assert!(!d.pool().join("pvc-brief").exists());
    assert!(loops_under(d.pool()).is_empty());
}

/// A crash between attach and bind mount leaves a device with no mount;
/// the CO's retried publish reuses it, or its unpublish releases it.
#[tokio::test]
async fn device_left_by_a_crash_is_reused_or_released() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-left", 16 * MIB)).await;
    let file = d.pool().join("pvc-left");
    // Attached the way the driver attaches (its tag on the device), as a
    // crash right after the attach leaves it.
    let attach = || {
        hostpath_csi::block::attach(
            &file,
            hostpath_csi::block::AttachOptions {
                read_only: false,
                direct_io: true,
                block_size: 0,
            },
        )
        .unwrap();
    };
    attach();
    d.restart().await;
    let t = d.path("pods/left");
    publish_ok(&mut d.c, "pvc-left", &t, block_rwo()).await;
    assert_eq!(
        loops_under(d.pool()).len(),
        1,
        "the leftover device is reused"
    );
    unpublish_ok(&mut d.c, "pvc-left", &t).await;
    assert!(settled_loops(d.pool()).await.is_empty());
    attach();
    d.restart().await;
    unpublish_ok(&mut d.c, "pvc-left", &t).await;
    assert!(
        settled_loops(d.pool()).await.is_empty(),
        "unpublish releases it"
    );
    delete_ok(&mut d.c, "pvc-left").await;
}

#[tokio::test]
async fn capabilities_advertise_block_features() {
    use hostpath_csi::proto::controller_service_capability::rpc::Type as C;
    use hostpath_csi::proto::node_service_capability::rpc::Type as N;
    let mut d = Driver::start().await;
    let ctrl =
        d.c.controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    let has_c = |t: C| {
        ctrl.capabilities.iter().any(|c| matches!(&c.r#type, Some(controller_service_capability::Type::Rpc(r)) if r.r#type == t as i32))
    };
    assert!(has_c(C::ExpandVolume) && has_c(C::ModifyVolume));
    let node =
        d.c.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    let has_n = |t: N| {
        node.capabilities.iter().any(|c| matches!(&c.r#type, Some(node_service_capability::Type::Rpc(r)) if r.r#type == t as i32))
    };
    assert!(
        has_n(N::StageUnstageVolume)
            && has_n(N::ExpandVolume)
            && has_n(N::VolumeCondition)
            && has_n(N::GetVolumeStats)
    );
    let plugin =
        d.c.identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(plugin.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(v)) if v.r#type == plugin_capability::volume_expansion::Type::Online as i32
    )));
}

/// A cluster-wide resizer may run ControllerExpandVolume on another node (or
/// not at all): NodeExpandVolume with a larger capacity_range grows the
/// volume on its own.
#[tokio::test]
async fn node_expansion_alone_grows_the_volume() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-nodegrow", 64 * MIB)).await;
    let target = d.path("pods/nodegrow");
    publish_ok(&mut d.c, "pvc-nodegrow", &target, block_rwo()).await;
    let r =
        d.c.node
            .node_expand_volume(node_grow_req("pvc-nodegrow", &target, 128 * MIB));
    assert_eq!(r.await.unwrap().into_inner().capacity_bytes, 128 * MIB);
    assert_eq!(size_of(&target), 128 << 20);
    assert_eq!(reported_capacity(&mut d.c, "pvc-nodegrow").await, 128 * MIB);
    unpublish_ok(&mut d.c, "pvc-nodegrow", &target).await;
    delete_ok(&mut d.c, "pvc-nodegrow").await;
}

/// Detaches on drop, so a failed assertion leaves no device behind.
struct AttachedLoop(hostpath_csi::block::LoopDevice);

impl Drop for AttachedLoop {
    fn drop(&mut self) {
        let _ = hostpath_csi::block::detach_and_wait(&self.0, Duration::from_secs(5));
    }
}

/// Kernels before 5.8 (RHEL 8's 4.18) have no LOOP_CONFIGURE; the driver
/// then attaches with LOOP_SET_FD, LOOP_SET_STATUS64, LOOP_SET_BLOCK_SIZE
/// and LOOP_SET_DIRECT_IO. Both paths must give the same device.
#[test]
fn legacy_and_configure_attach_give_the_same_device() {
    use hostpath_csi::block::{self, AttachOptions};
    let dir = tempfile::Builder::new()
        .prefix("hpc-legacy-loop-")
        .tempdir()
        .unwrap();
    let file = dir.path().join("disk");
    File::create(&file).unwrap().set_len(16 << 20).unwrap();
    for legacy in [false, true] {
        let attach = |read_only: bool, block_size: u32| {
            let opts = AttachOptions {
                read_only,
                direct_io: true,
                block_size,
            };
            let dev = if legacy {
                block::attach_legacy(&file, opts)
            } else {
                block::attach(&file, opts)
            };
            AttachedLoop(dev.unwrap())
        };
        let rw = attach(false, 4096);
        let n = rw.0.number;
        let path = rw.0.path.clone();
        assert_eq!(sysfs(n, "loop/backing_file"), s(&file), "legacy={legacy}");
        assert_eq!(sysfs(n, "ro"), "0", "legacy={legacy}");
        assert_eq!(sysfs(n, "loop/dio"), "1", "legacy={legacy}");
        assert_eq!(
            sysfs(n, "queue/logical_block_size"),
            "4096",
            "legacy={legacy}"
        );
        assert_eq!(size_of(&path), 16 << 20, "legacy={legacy}");
        let data = pattern(if legacy { 9 } else { 8 }, 1 << 20);
        dio_write(&path, 2 << 20, &data).unwrap();
        assert_eq!(file_read(&file, 2 << 20, data.len()), data);
        assert_eq!(
            block::find_attached_devices(&file).unwrap(),
            vec![rw.0.clone()]
        );
        let ro = attach(true, 512);
        let m = ro.0.number;
        assert_ne!(m, n, "a read-only attach gets its own device");
        assert_eq!(sysfs(m, "ro"), "1", "legacy={legacy}");
        assert_eq!(sysfs(m, "queue/logical_block_size"), "512");
        assert!(
            dio_write(&ro.0.path, 0, &data[..4096]).is_err(),
            "a read-only device refused the write (legacy={legacy})"
        );
        assert_eq!(dio_read(&ro.0.path, 2 << 20, data.len()), data);
        let (rw_dev, ro_dev) = (rw.0.clone(), ro.0.clone());
        drop(ro);
        drop(rw);
        for d in [rw_dev, ro_dev] {
            assert!(block::wait_detached(&d, Duration::from_secs(5)));
        }
        assert!(block::find_attached_devices(&file).unwrap().is_empty());
    }
}

/// A process that still has the device open when kubelet unpublishes (a
/// VM's last reader closing) makes the unmount wait for it, not fail; one
/// that never lets go leaves the publication whole and gets
/// FAILED_PRECONDITION naming the path.
#[tokio::test]
async fn unpublish_waits_briefly_for_a_reader_and_never_detaches_a_busy_device() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-busy", 32 * MIB)).await;
    let t = d.path("pods/busy/dev");
    d.c.node
        .node_publish_volume(publish_req("pvc-busy", &t, block_rwo()))
        .await
        .unwrap();
    let data = pattern(3, 64 << 10);
    dio_write(&t, 0, &data).unwrap();

    // Held for 300 ms, then closed: the unpublish succeeds.
    let held = open_direct(&t, false).unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
    });
    unpublish_ok(&mut d.c, "pvc-busy", &t).await;
    closer.join().unwrap();
    assert!(!t.exists());
    assert!(settled_loops(d.pool()).await.is_empty());

    // Held throughout: refused, still published, data intact.
    d.c.node
        .node_publish_volume(publish_req("pvc-busy", &t, block_rwo()))
        .await
        .unwrap();
    let held = open_direct(&t, false).unwrap();
    let e =
        d.c.node
            .node_unpublish_volume(unpublish_req("pvc-busy", &t))
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("pods/busy/dev"), "{e:?}");
    assert_eq!(dio_read(&t, 0, data.len()), data);
    assert_eq!(loops_under(d.pool()).len(), 1);
    drop(held);
    unpublish_ok(&mut d.c, "pvc-busy", &t).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

/// On a filesystem without fallocate, preallocation writes zeroes into the
/// file's holes. Never under a running user: a write racing the zeroes
/// would be lost. ModifyVolume of a published volume is refused there (and
/// nothing is written); unpublished it fills the holes; a published
/// expansion fills only the new tail, which no user sees yet.
#[tokio::test]
async fn zero_fill_preallocation_never_writes_under_a_user() {
    let fs = LoopFs::new("ext4-noextent", 512);
    let mut d = Driver::start_with(&[("local", Some(fs.mount_point.join("pool")))]).await;
    const SIZE: i64 = 64 * MIB;
    create_ok(&mut d.c, block_volume("pvc-thin", SIZE)).await;
    let file = d.pool().join("pvc-thin");
    let target = d.path("pods/thin");
    publish_ok(&mut d.c, "pvc-thin", &target, block_rwo()).await;
    let data = pattern(12, 1 << 20);
    dio_write(&target, 32 << 20, &data).unwrap();
    let before = allocated(&file);
    let modify = modify_req("pvc-thin", &[("preallocation", "true")]);
    let r =
        d.c.controller
            .controller_modify_volume(modify.clone())
            .await;
    assert_code(
        &r,
        Code::FailedPrecondition,
        "zero-filling a published volume",
    );
    assert_eq!(allocated(&file), before, "nothing written under the user");
    assert_eq!(dio_read(&target, 32 << 20, data.len()), data);
    unpublish_ok(&mut d.c, "pvc-thin", &target).await;
    assert!(settled_loops(d.pool()).await.is_empty());

    d.c.controller
        .controller_modify_volume(modify)
        .await
        .unwrap();
    assert!(allocated(&file) >= SIZE as u64, "only {}", allocated(&file));
    assert_eq!(file_read(&file, 32 << 20, data.len()), data);

    publish_ok(&mut d.c, "pvc-thin", &target, block_rwo()).await;
    d.c.controller
        .controller_expand_volume(grow_req("pvc-thin", SIZE + 32 * MIB, Some(block_rwo())))
        .await
        .unwrap();
    assert!(allocated(&file) >= (SIZE + 32 * MIB) as u64);
    assert_eq!(dio_read(&target, 32 << 20, data.len()), data);
    unpublish_ok(&mut d.c, "pvc-thin", &target).await;

    // Thick at create: built aside, so zero-filled.
    create_ok(&mut d.c, thick_block_volume("pvc-thick", SIZE)).await;
    assert!(allocated(&d.pool().join("pvc-thick")) >= SIZE as u64);
    assert!(settled_loops(d.pool()).await.is_empty());
}

/// A kill -9 between growing an image volume's file and recording the new
/// size, while the volume is mounted, leaves a file larger than its
/// metadata. Here the filesystem was also grown onto it already (as a stage
/// after the restart would do). Recovery must never cut such a file back
/// under its loop device (the filesystem's upper half would read zeroes),
/// and requests wait for recovery, so none acts on a state it would change.
#[tokio::test]
async fn recovery_never_shrinks_a_file_a_loop_device_uses() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("pvc-grown", 320 * MIB, "xfs")).await;
    let t = d.path("pods/grown");
    stage_publish(&mut d.c, "pvc-grown", &t, mount_cap_fs("xfs")).await;
    std::fs::write(t.join("f"), b"kept").unwrap();
    let file = d.pool().join("pvc-grown");
    d.kill9();

    let grown = 640u64 << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(grown)
        .unwrap();
    let n = hostpath_csi::block::list_attached()
        .into_iter()
        .find(|l| l.backing_file == file)
        .expect("the image's loop device")
        .number;
    let run = |prog: &str, args: &[&str]| {
        let ok = std::process::Command::new(prog)
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{prog} {args:?}");
    };
    run("losetup", &["-c", &format!("/dev/loop{n}")]);
    run("xfs_growfs", &["-d", &s(&staging_for(&t))]);

    d.restart().await;
    // Unpublish takes the volume's guard: after recovery.
    unpublish_unstage(&mut d.c, "pvc-grown", &t).await;
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        grown,
        "recovery cut the file under its loop device"
    );
    run("xfs_repair", &["-n", "-f", &s(&file)]);
    delete_ok(&mut d.c, "pvc-grown").await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

/// A loop device another process attached to a volume file (an admin
/// inspecting a VM disk with `losetup`) is never reused, detached or
/// scheduled for detach by the driver: publishes get a device of their own,
/// unpublish and a retried unpublish leave it, and delete refuses, naming it.
#[tokio::test]
async fn a_loop_device_another_process_attached_is_never_taken_or_detached() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("pvc-inspected", 16 * MIB)).await;
    let file = d.pool().join("pvc-inspected");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let theirs = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let detach = Detach(theirs.clone());
    let still_theirs = || {
        let n: u32 = theirs.trim_start_matches("/dev/loop").parse().unwrap();
        let dev = hostpath_csi::block::attached(n).expect("their device is still attached");
        assert!(!dev.autoclear, "their device was scheduled for detach");
    };

    let t = d.path("pods/inspected");
    publish_ok(&mut d.c, "pvc-inspected", &t, block_rwo()).await;
    assert_ne!(
        format!("/dev/loop{}", loop_of(&t)),
        theirs,
        "their device was reused"
    );
    unpublish_ok(&mut d.c, "pvc-inspected", &t).await;
    still_theirs();
    let nowhere = d.path("no/such/target");
    unpublish_ok(&mut d.c, "pvc-inspected", &nowhere).await;
    still_theirs();
    let e =
        d.c.controller
            .delete_volume(delete_req("pvc-inspected"))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&theirs), "{}", e.message());
    still_theirs();
    drop(detach);
    hostpath_csi::block::rescan();
    delete_ok(&mut d.c, "pvc-inspected").await;
}

/// A process in another mount namespace keeps an image's filesystem
/// mounted after unstage (a privileged pod that copied the host's mounts):
/// the detach waits for it. A new stage must not mount the filesystem a
/// second time through another device (two instances of one XFS corrupt
/// it): FAILED_PRECONDITION naming the device, until that process is gone.
#[tokio::test]
async fn stage_never_mounts_an_image_through_a_second_device() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("pvc-held", 320 * MIB, "xfs")).await;
    let t = d.path("pods/held");
    stage_publish(&mut d.c, "pvc-held", &t, mount_cap_fs("xfs")).await;
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // A private copy of the mount table holds the filesystem.
    let holder = Holder(
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "600"])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    unpublish_unstage(&mut d.c, "pvc-held", &t).await;
    let staging = staging_for(&t);
    let r =
        d.c.node
            .node_stage_volume(stage_req("pvc-held", &staging, mount_cap_fs("xfs")))
            .await;
    assert_code(
        &r,
        Code::FailedPrecondition,
        "a second mount through a new device",
    );
    assert!(!is_mount_point(&staging));
    assert_eq!(
        loops_under(d.pool()).len(),
        1,
        "a second device was attached"
    );
    drop(holder);
    assert!(settled_loops(d.pool()).await.is_empty());
    stage_publish(&mut d.c, "pvc-held", &t, mount_cap_fs("xfs")).await;
    unpublish_unstage(&mut d.c, "pvc-held", &t).await;
    assert!(settled_loops(d.pool()).await.is_empty());
}

/// A crash between unstage's unmount and its detach leaves the image's
/// loop device attached with nothing mounted: the retried NodeUnstage
/// releases it.
#[tokio::test]
async fn retried_unstage_releases_an_image_device_left_by_a_crash() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("pvc-retry", 320 * MIB, "xfs")).await;
    let staging = d.path("staging/retry");
    d.c.node
        .node_stage_volume(stage_req("pvc-retry", &staging, mount_cap_fs("xfs")))
        .await
        .unwrap();
    d.kill9();
    nix::mount::umount(&staging).unwrap();
    d.restart().await;
    assert_eq!(loops_under(d.pool()).len(), 1);
    d.c.node
        .node_unstage_volume(unstage_req("pvc-retry", &staging))
        .await
        .unwrap();
    assert!(
        settled_loops(d.pool()).await.is_empty(),
        "the device was left"
    );
    delete_ok(&mut d.c, "pvc-retry").await;
}

/// NodeStageVolume again at a path where the image is staged: the same
/// capability is OK; another filesystem type or mount flags the staging
/// mount lacks are ALREADY_EXISTS, as the spec says.
#[tokio::test]
async fn restage_with_another_capability_is_already_exists() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("pvc-restage", 320 * MIB, "xfs")).await;
    let staging = d.path("staging/restage");
    let stage = |cap| stage_req("pvc-restage", &staging, cap);
    for _ in 0..2 {
        d.c.node
            .node_stage_volume(stage(mount_cap_fs("xfs")))
            .await
            .unwrap();
    }
    let ro =
        hostpath_csi::client::capability(Mode::SingleNodeWriter, false, "xfs", &["ro".to_string()]);
    for (what, cap) in [("ext4", mount_cap_fs("ext4")), ("ro", ro)] {
        let r = d.c.node.node_stage_volume(stage(cap)).await;
        assert_code(&r, Code::AlreadyExists, what);
    }
    d.c.node
        .node_unstage_volume(unstage_req("pvc-restage", &staging))
        .await
        .unwrap();
    assert!(settled_loops(d.pool()).await.is_empty());
}
