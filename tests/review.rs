//! Regression tests for the findings of the adversarial review (one test
//! per finding), through the real driver binary over gRPC, as root.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tonic::Code;

/// Bound for one RPC (a hang is a failure, not a stuck test).
const RPC_BOUND: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- helpers

fn rwo_block() -> VolumeCapability {
    block_cap(Mode::SingleNodeWriter)
}

/// A create request placed in `pool` (StorageClass `storagePool`).
fn in_pool(r: CreateVolumeRequest, pool: &str) -> CreateVolumeRequest {
    with_params(r, &[("storagePool", pool)])
}

/// Runs a tool and panics unless it succeeds.
#[track_caller]
fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let ok = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
        .success();
    assert!(ok, "{program} {args:?} failed");
}

/// The minor number of the loop device published at a Block target.
fn loop_minor(target: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let st = fs::metadata(target).unwrap();
    assert!(
        st.file_type().is_block_device(),
        "{} is not a block device",
        target.display()
    );
    assert_eq!(nix::sys::stat::major(st.rdev()), 7, "not a loop device");
    nix::sys::stat::minor(st.rdev())
}

/// Polls (bounded) until no loop device is backed by a file below `root`
/// (`losetup -d` of a device in use finishes lazily).
async fn loops_gone(root: &Path) {
    eventually(
        &format!("no loop device backed below {}", root.display()),
        Duration::from_secs(10),
        || loops_under(root).is_empty(),
        || format!("{:?}", loops_under(root)),
    )
    .await;
}

/// Writes `marker` at the start of a block device and flushes it.
fn write_device(dev: &Path, marker: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all(marker).unwrap();
    f.sync_all().unwrap();
}

/// The first `len` bytes of a block device.
fn read_device(dev: &Path, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The driver's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn meta_path(pool: &Path, id: &str) -> PathBuf {
    pool.join(format!(".hostpath-csi/volumes/{id}.json"))
}

fn snapshots_dir(pool: &Path) -> PathBuf {
    pool.join(".hostpath-csi/snapshots")
}

// ------------------------------------- 1. wrong-volume unpublish of Block

/// NodeUnpublishVolume naming volume B at the target where volume A (a
/// Block volume in another pool) is published answers OK and leaves A's
/// publication alone: still mounted, its data reachable, its device attached.
#[tokio::test]
async fn unpublish_of_another_volume_leaves_a_block_publication_alone() {
    let mut d = Driver::start_with(&[("a", None), ("b", None)]).await;
    create_ok(&mut d.c, in_pool(block_volume("vol-a", 16 * MIB), "b")).await;
    create_ok(&mut d.c, in_pool(block_volume("vol-b", 16 * MIB), "a")).await;
    let ta = d.path("pods/ta");
    stage_publish(&mut d.c, "vol-a", &ta, rwo_block()).await;
    let marker = b"volume A's own data";
    write_device(&ta, marker);
    let pool_b = d.pool_paths[1].clone();
    assert_eq!(loops_under(&pool_b).len(), 1, "A's device is not attached");

    let call = d.c.node.node_unpublish_volume(unpublish_req("vol-b", &ta));
    bounded("NodeUnpublishVolume(vol-b, tA)", RPC_BOUND, call)
        .await
        .expect("unpublishing a volume that is not published there is OK");

    assert!(
        is_mount_point(&ta),
        "A's publication at {} was unmounted by an unpublish of B",
        ta.display()
    );
    assert_eq!(read_device(&ta, marker.len()), marker, "A's data at tA");
    assert_eq!(
        loops_under(&pool_b).len(),
        1,
        "A's loop device was detached by an unpublish of B"
    );
    unpublish_unstage(&mut d.c, "vol-a", &ta).await;
    assert!(!is_mount_point(&ta));
    loops_gone(&pool_b).await;
}

// ------------------------ 2. Block bind of a reused or detached device

/// Detaches loop device `n` (backing `file`) and waits, polling tightly,
/// until the kernel no longer shows it backing `file`: the number is free
/// then, and other processes on this machine take free numbers.
async fn detach_loop(n: u64, file: &Path) {
    let dev = format!("/dev/loop{n}");
    run("losetup", &["-d".as_ref(), dev.as_ref()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hostpath_csi::block::attached(n as u32).is_some_and(|d| d.backing_file == file) {
        assert!(
            Instant::now() < deadline,
            "{dev} is still attached to {}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What loop device `n` backs now, if anything.
fn backing_of(n: u64) -> Option<PathBuf> {
    hostpath_csi::block::attached(n as u32).map(|d| d.backing_file)
}

/// A Block publication whose loop device was detached and then attached
/// to another file is left alone by unpublish (it may be someone else's);
/// once the device is detached for good, unpublish undoes the bind.
#[tokio::test]
async fn block_bind_of_a_reused_device_is_left_and_of_a_detached_one_undone() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("v", 16 * MIB)).await;
    let t = d.path("pods/v");
    stage_publish(&mut d.c, "v", &t, rwo_block()).await;
    let n = loop_minor(&t);
    let dev = PathBuf::from(format!("/dev/loop{n}"));
    let other = d.path("other.img");
    fs::File::create(&other)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();

    // The same device now backs a file that is not the volume's.
    detach_loop(n, &d.pool().join("v")).await;
    let reused = Command::new("losetup")
        .arg(&dev)
        .arg(&other)
        .status()
        .unwrap()
        .success();
    if !reused {
        // Another process took the free number first (the machine is shared).
        eprintln!(
            "{} was taken by {:?}: not tested",
            dev.display(),
            backing_of(n)
        );
        return;
    }
    let call = d.c.node.node_unpublish_volume(unpublish_req("v", &t));
    bounded("NodeUnpublishVolume", RPC_BOUND, call)
        .await
        .unwrap();
    assert_eq!(
        mounts_under(&t),
        vec![t.clone()],
        "the bind of a device that now backs another file was undone"
    );
    assert_eq!(
        loops_under(d.dir.path()),
        vec![other.clone()],
        "the other file's device was detached"
    );

    // Detached for good: the bind holds nothing, unpublish undoes it.
    detach_loop(n, &other).await;
    let call = d.c.node.node_unpublish_volume(unpublish_req("v", &t));
    bounded("NodeUnpublishVolume", RPC_BOUND, call)
        .await
        .unwrap();
    if is_mount_point(&t) {
        if let Some(taken) = backing_of(n) {
            // Someone else attached the free number before the unpublish:
            // leaving the bind is then right.
            eprintln!(
                "{} was taken by {}: not tested",
                dev.display(),
                taken.display()
            );
            return;
        }
    }
    assert!(!is_mount_point(&t), "the bind of a detached device is left");
    assert!(!t.exists(), "the target {} is left", t.display());
    let staging = staging_for(&t);
    d.c.node
        .node_unstage_volume(unstage_req("v", &staging))
        .await
        .unwrap();
    d.c.controller.delete_volume(delete_req("v")).await.unwrap();
}

// --------------------------------------------------- 3. copy memory

/// Levels of the chain (the copy refuses trees deeper than 2,048).
const CHAIN_DEPTH: usize = 2_000;
/// Files at the bottom of the chain, each with a second name elsewhere.
const LINKED_FILES: usize = 1_000;
/// Peak resident memory the driver may reach copying the tree (the tree
/// copy used to keep whole paths per level and per link: about 1 GiB).
const COPY_RSS_KIB: u64 = 256 << 10;

fn open_dir_at(dir: &impl std::os::fd::AsFd, name: &str) -> std::os::fd::OwnedFd {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// The name of every level of the chain: 255 bytes, the longest allowed.
fn level_name() -> String {
    "d".repeat(255)
}

/// `chain/` holding `depth` levels of 255-byte names with `files` files at
/// the bottom, each also linked as `links/l<i>` (built by descriptor: the
/// path is far longer than PATH_MAX).
fn build_linked_chain(root: &Path, depth: usize, files: usize) {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode as Perm;
    let dir_mode = Perm::from_bits_truncate(0o755);
    let root = nix::fcntl::open(root, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Perm::empty()).unwrap();
    nix::sys::stat::mkdirat(&root, "chain", dir_mode).unwrap();
    nix::sys::stat::mkdirat(&root, "links", dir_mode).unwrap();
    let links = open_dir_at(&root, "links");
    let mut cur = open_dir_at(&root, "chain");
    let name = level_name();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(&cur, name.as_str(), dir_mode).unwrap();
        cur = open_dir_at(&cur, &name);
    }
    for i in 0..files {
        let f = format!("f{i:06}");
        let fd = nix::fcntl::openat(
            &cur,
            f.as_str(),
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Perm::from_bits_truncate(0o644),
        )
        .unwrap();
        nix::unistd::write(&fd, f.as_bytes()).unwrap();
        nix::unistd::linkat(
            &cur,
            f.as_str(),
            &links,
            format!("l{i:06}").as_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .unwrap();
    }
}

/// Entries at the bottom of a chain built by `build_linked_chain` below
/// `root`, and in its `links` directory.
fn linked_chain_counts(root: &Path, depth: usize) -> (usize, usize) {
    use nix::fcntl::OFlag;
    let root = nix::fcntl::open(
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let mut cur = open_dir_at(&root, "chain");
    let name = level_name();
    for _ in 0..depth {
        cur = open_dir_at(&cur, &name);
    }
    let count = |fd: std::os::fd::OwnedFd| {
        let dir = nix::dir::Dir::from_fd(fd).unwrap();
        dir.into_iter()
            .flatten()
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
            .count()
    };
    (count(cur), count(open_dir_at(&root, "links")))
}

/// A snapshot of a 2,000-level chain of 255-byte names with 1,000 files
/// that each have a second link elsewhere: the driver's peak memory stays
/// under 256 MiB, and the snapshot either holds the whole tree or is
/// refused, leaving nothing behind.
#[tokio::test]
async fn copying_a_deep_linked_tree_keeps_the_driver_memory_bounded() {
    let mut d = Driver::start().await;
    let pid = d.pid();
    create_ok(&mut d.c, dir_volume("src", GIB)).await;
    build_linked_chain(&d.pool().join("src"), CHAIN_DEPTH, LINKED_FILES);
    let before = peak_rss_kib(pid);

    let call = d.c.controller.create_snapshot(snapshot_req("snap", "src"));
    let r = bounded("CreateSnapshot of a deep linked tree", RPC_BOUND, call).await;
    d.assert_alive(pid, "snapshot of a deep linked tree");
    let peak = peak_rss_kib(pid);
    eprintln!("driver peak RSS: {before} KiB before the snapshot, {peak} KiB after");
    assert!(
        peak < COPY_RSS_KIB,
        "the driver peaked at {peak} KiB copying the tree (bound {COPY_RSS_KIB} KiB)"
    );
    match r {
        Ok(resp) => {
            let snap = resp.into_inner().snapshot.unwrap();
            let data = snapshots_dir(d.pool()).join(&snap.snapshot_id).join("data");
            assert_eq!(
                linked_chain_counts(&data, CHAIN_DEPTH),
                (LINKED_FILES, LINKED_FILES),
                "files at the bottom of the chain and links in the snapshot"
            );
        }
        Err(s) => {
            eprintln!("snapshot refused: {s:?}");
            assert!(
                !listed_snapshot_ids(&mut d.c).await.contains(&"snap".into()),
                "a refused snapshot is listed"
            );
            let dir = snapshots_dir(d.pool());
            eventually(
                "the refused snapshot leaves nothing in the snapshot directory",
                EVENTUALLY,
                || {
                    fs::read_dir(&dir)
                        .unwrap()
                        .flatten()
                        .all(|e| !e.file_name().to_string_lossy().contains("snap"))
                },
                || format!("{:?}", tree_top(&dir)),
            )
            .await;
        }
    }
    probe_within(&mut d.c, Duration::from_secs(5))
        .await
        .unwrap();
}

/// Names directly in `dir`.
fn tree_top(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ------------------------------------------------------ 4. file lease

/// How long a copy may take with a tenant's lease in the way: the kernel's
/// lease-break-time is 45 s per file, so a copy that waits for the break
/// takes far longer.
const LEASE_BOUND: Duration = Duration::from_secs(20);

/// A process (`sleep`) holding write leases (F_SETLEASE, F_WRLCK) on
/// `files` and ignoring lease-break notices, so it never releases them;
/// killed on drop. A write lease, because any open breaks it: a read lease
/// is broken only by opens for writing, which a copy's source never gets.
fn lease_holder(files: &[PathBuf]) -> Reaper {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let paths: Vec<std::ffi::CString> = files
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap())
        .collect();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // system calls (signal, open, fcntl) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGIO, libc::SIG_IGN);
            for p in &paths {
                // Not close-on-exec: the lease stays with `sleep`.
                let fd = libc::open(p.as_ptr(), libc::O_RDONLY);
                if fd < 0 || libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Reaper::new(cmd.spawn().expect("start the lease holder"))
}

/// A tenant process holds leases on files of a volume and never lets go:
/// CreateSnapshot returns within a bound (made or ABORTED) instead of
/// waiting out the lease break, and the driver stays alive.
#[tokio::test]
async fn a_tenant_file_lease_does_not_stall_a_snapshot() {
    let mut d = Driver::start().await;
    let pid = d.pid();
    create_ok(&mut d.c, dir_volume("src", GIB)).await;
    let files: Vec<PathBuf> = (1..=2)
        .map(|i| d.pool().join(format!("src/f{i}")))
        .collect();
    for f in &files {
        fs::write(f, b"data\n").unwrap();
    }
    let mut holder = lease_holder(&files);
    let started = Instant::now();
    let call = d.c.controller.create_snapshot(snapshot_req("snap", "src"));
    let r = bounded(
        "CreateSnapshot of a volume with leased files",
        LEASE_BOUND,
        call,
    )
    .await;
    eprintln!(
        "CreateSnapshot answered in {:?}: {:?}",
        started.elapsed(),
        r.as_ref().map(|_| ())
    );
    match r {
        Ok(_) => {}
        Err(s) if s.code() == Code::Aborted => {}
        Err(s) => panic!("CreateSnapshot with a lease in the way: {s:?}"),
    }
    assert!(
        holder.wait_exit(Duration::ZERO).is_none(),
        "the lease holder exited: the test held no lease"
    );
    d.assert_alive(pid, "snapshot of leased files");
    probe_within(&mut d.c, Duration::from_secs(5))
        .await
        .unwrap();
}

// ------------------------------------------- 5. btrfs power cut after create

/// A filesystem image attached to a loop device and mounted with `options`;
/// unmounted and detached on drop.
struct ImageMount {
    device: PathBuf,
    mount_point: PathBuf,
}

impl ImageMount {
    fn new(image: &Path, mount_point: &Path, options: &str) -> ImageMount {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("run losetup");
        assert!(out.status.success(), "losetup {} failed", image.display());
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        fs::create_dir_all(mount_point).unwrap();
        let m = ImageMount {
            device,
            mount_point: mount_point.to_path_buf(),
        };
        let mut cmd = Command::new("mount");
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        let ok = cmd
            .arg(&m.device)
            .arg(&m.mount_point)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {} failed", m.device.display());
        m
    }

    /// Unmounts for real (not lazily), so the copy can be mounted next.
    fn unmount(self) {
        cleanup_kernel_state_below(&self.mount_point);
        let last = unmount_patiently(&self.mount_point);
        assert!(
            last.is_ok(),
            "umount {}: {last:?}",
            self.mount_point.display()
        );
    }
}

/// What is mounted below `root` (not `root` itself), and loop devices on
/// its files, undone.
fn cleanup_kernel_state_below(root: &Path) {
    for p in mounts_under(root).into_iter().filter(|p| p != root) {
        cleanup_kernel_state(&p);
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
    detach_loops_under(root);
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        cleanup_kernel_state(&self.mount_point);
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A pool on btrfs (`commit=300`, so nothing is committed behind the
/// driver's back): the disk as a power cut right after an acknowledged
/// CreateVolume leaves it still holds the volume, and a driver started on
/// it lists it (and keeps its metadata).
#[tokio::test]
async fn btrfs_power_cut_after_create_keeps_the_volume() {
    let dir = tempfile::Builder::new()
        .prefix("hpc-review-btrfs-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("img");
    let cut = dir.path().join("img.cut");
    fs::File::create(&image)
        .unwrap()
        .set_len(400 << 20)
        .unwrap();
    run(
        "mkfs.btrfs",
        &["-q".as_ref(), "-f".as_ref(), image.as_os_str()],
    );
    let mnt = dir.path().join("mnt");
    let live = ImageMount::new(&image, &mnt, "commit=300");
    let pool = mnt.join("pool");
    let mut d = Driver::start_with(&[("p", Some(pool.clone()))]).await;
    // What start-up wrote is on disk before the create.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nix::unistd::sync();
    create_ok(&mut d.c, dir_volume("v1", 16 * MIB)).await;
    // The disk as a power cut now would leave it.
    run(
        "cp",
        &[
            "--sparse=always".as_ref(),
            image.as_os_str(),
            cut.as_os_str(),
        ],
    );
    d.kill9();
    drop(d);
    live.unmount();

    let _copy = ImageMount::new(&cut, &mnt, "");
    let mut d = Driver::start_with(&[("p", Some(pool.clone()))]).await;
    let listed = listed_ids(&mut d.c).await;
    assert!(
        pool.join("v1").is_dir(),
        "the volume's directory is lost after the cut"
    );
    assert!(
        meta_path(&pool, "v1").is_file(),
        "the volume's metadata is lost after the cut"
    );
    assert!(
        listed.contains(&"v1".to_owned()),
        "v1 is not listed after the cut: {listed:?}"
    );
    d.c.controller
        .delete_volume(delete_req("v1"))
        .await
        .unwrap();
    drop(d);
}

// ------------------------------------------------------ 6. not-ready pool

/// A driver restarted before a `requireMount` pool's filesystem is mounted
/// answers UNAVAILABLE to DeleteVolume of a volume it cannot see (it may be
/// in that pool), and once the mount appears the volume is still there.
#[tokio::test]
async fn delete_while_a_pool_is_not_ready_is_unavailable() {
    let fs = LoopFs::new("ext4", 64);
    let base = tempfile::Builder::new()
        .prefix("hpc-review-rm-")
        .tempdir()
        .unwrap();
    let mnt = base.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let json = serde_json::json!([
        {"name": "local", "path": base.path().join("local")},
        {"name": "tpl", "path": mnt, "requireMount": true},
    ])
    .to_string();
    let bind = MountGuard::bind(&fs.mount_point, &mnt);
    let mut d = Driver::start_with_datadir(&json).await;
    create_ok(&mut d.c, in_pool(dir_volume("v1", 16 * MIB), "tpl")).await;
    fs::write(mnt.join("v1/keep"), b"data").unwrap();
    d.c.controller
        .create_snapshot(snapshot_req("s1", "v1"))
        .await
        .unwrap();
    d.kill9();
    // The node reboots: the pool's filesystem is not mounted yet.
    drop(bind);
    assert!(!is_mount_point(&mnt));
    d.restart().await;

    for id in ["v1", "never-was"] {
        let call = d.c.controller.delete_volume(delete_req(id));
        let r = bounded("DeleteVolume", RPC_BOUND, call).await;
        assert_eq!(
            code(&r),
            Code::Unavailable,
            "DeleteVolume {id} while pool tpl is not mounted: {r:?}"
        );
    }
    // The same for snapshots: a delete that found nothing must not say OK
    // (the snapshotter would forget a snapshot that still holds data).
    for id in ["s1", "never-was"] {
        let call = d.c.controller.delete_snapshot(delete_snapshot_req(id));
        let r = bounded("DeleteSnapshot", RPC_BOUND, call).await;
        assert_eq!(
            code(&r),
            Code::Unavailable,
            "DeleteSnapshot {id} while pool tpl is not mounted: {r:?}"
        );
    }

    let _bind = MountGuard::bind(&fs.mount_point, &mnt);
    let mut listed = Vec::new();
    let deadline = Instant::now() + EVENTUALLY;
    while !listed.contains(&"v1".to_owned()) && Instant::now() < deadline {
        listed = listed_ids(&mut d.c).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        listed.contains(&"v1".to_owned()),
        "v1 is not listed once its pool is mounted: {listed:?}"
    );
    assert_eq!(fs::read(mnt.join("v1/keep")).unwrap(), b"data");
    d.c.controller
        .delete_snapshot(delete_snapshot_req("s1"))
        .await
        .unwrap();
    d.c.controller
        .delete_volume(delete_req("v1"))
        .await
        .unwrap();
    drop(d);
}

// ------------------------------- 7. damaged metadata of a published image

/// A published `layout: image` volume whose metadata file is replaced by
/// garbage is still unpublished and unstaged for real (both mounts gone,
/// the loop device detached), and then deleted.
#[tokio::test]
async fn damaged_metadata_of_a_published_image_volume_still_unpublishes() {
    let mut d = Driver::start().await;
    let cap = mount_cap_fs("ext4");
    let req = with_params(
        create_req("img", 64 * MIB, cap.clone()),
        &[("layout", "image")],
    );
    create_ok(&mut d.c, req).await;
    let t = d.path("pods/img");
    let staging = staging_for(&t);
    stage_publish(&mut d.c, "img", &t, cap).await;
    fs::write(t.join("data"), b"tenant data").unwrap();
    assert!(is_mount_point(&t) && is_mount_point(&staging));
    assert_eq!(loops_under(d.pool()).len(), 1);

    fs::write(meta_path(d.pool(), "img"), b"garbage\n").unwrap();

    let call = d.c.node.node_unpublish_volume(unpublish_req("img", &t));
    bounded("NodeUnpublishVolume", RPC_BOUND, call)
        .await
        .unwrap();
    let call = d.c.node.node_unstage_volume(unstage_req("img", &staging));
    bounded("NodeUnstageVolume", RPC_BOUND, call).await.unwrap();
    assert!(
        mounts_under(&t).is_empty(),
        "the publication is left: {:?}",
        mounts_under(&t)
    );
    assert!(
        mounts_under(&staging).is_empty(),
        "the staged mount is left: {:?}",
        mounts_under(&staging)
    );
    loops_gone(d.pool()).await;
    let call = d.c.controller.delete_volume(delete_req("img"));
    bounded("DeleteVolume", RPC_BOUND, call).await.unwrap();
    eventually_removed(&d, "img").await;
}

// -------------------------------------------------- 8. ephemeral size 0

/// The admin's cap on inline ephemeral volumes in this test.
const EPHEMERAL_CAP: u64 = 64 << 20;

/// An inline ephemeral volume asking for `size: "0"` is refused or gets at
/// most the `--max-ephemeral-size` cap (it used to get 1 GiB).
#[tokio::test]
async fn ephemeral_size_zero_stays_within_the_cap() {
    let mut d = Driver::start_args(&[("local", None)], &["--max-ephemeral-size", "64Mi"]).await;
    let target = d.path("pod/eph0");
    let publish = ephemeral_publish_req("eph0", &target, &[("size", "0")]);
    let call = d.c.node.node_publish_volume(publish);
    match bounded("NodePublishVolume", RPC_BOUND, call).await {
        Ok(_) => {
            let size = fs::metadata(d.pool().join("eph0")).unwrap().len();
            let total = nix::sys::statvfs::statvfs(&target).unwrap();
            let total = total.blocks() * total.fragment_size();
            eprintln!("backing file {size} bytes, filesystem {total} bytes");
            assert!(
                size <= EPHEMERAL_CAP,
                "an ephemeral volume of {size} bytes above the {EPHEMERAL_CAP}-byte cap"
            );
            assert!(total <= EPHEMERAL_CAP, "a filesystem of {total} bytes");
            let call =
                d.c.node
                    .node_unpublish_volume(unpublish_req("eph0", &target));
            bounded("NodeUnpublishVolume", RPC_BOUND, call)
                .await
                .unwrap();
            eventually_removed(&d, "eph0").await;
        }
        Err(s) if s.code() == Code::InvalidArgument => {
            assert!(listed_ids(&mut d.c).await.is_empty(), "refused, yet made");
            assert!(!is_mount_point(&target));
        }
        Err(s) => panic!("ephemeral volume of size 0: {s:?}"),
    }
}

// --------------------------- 9. snapshot staging and recovery of a later run

/// Files in the volume snapshotted right after each restart.
const SWEEP_FILES: usize = 5_000;
/// Metadata files of volumes that are gone, as a crash leaves them:
/// recovery removes each with a flush, so its sweep of the snapshot
/// directory comes while the snapshot is being built.
const GONE_META: usize = 3_000;
/// Restarts, each with a snapshot right after it (the sweep racing the
/// snapshot is timing-dependent; two rounds catch it far more often).
const SWEEP_ROUNDS: usize = 2;

/// Metadata of `n` volumes named `<prefix><i>` that no longer exist,
/// copied from `like`'s.
fn leave_gone_metadata(pool: &Path, like: &str, prefix: &str, n: usize) {
    let text = fs::read_to_string(meta_path(pool, like)).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    for i in 0..n {
        let id = format!("{prefix}{i:05}");
        meta["id"] = serde_json::Value::String(id.clone());
        fs::write(meta_path(pool, &id), meta.to_string()).unwrap();
    }
}

/// After a restart, start-up recovery eventually removes an earlier
/// process's half-built snapshot, but never the one a CreateSnapshot made
/// right after the restart is building: that snapshot is complete.
#[tokio::test]
async fn recovery_sweeps_earlier_snapshot_staging_only() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("src", GIB)).await;
    make_files(&d.pool().join("src"), SWEEP_FILES);
    for round in 0..SWEEP_ROUNDS {
        d.kill9();
        // An earlier process's half-built snapshot.
        let leftover = snapshots_dir(d.pool()).join(format!(".tmp-old{round}.new@deadbeef"));
        make_files(&leftover.join("data"), 100);
        leave_gone_metadata(d.pool(), "src", &format!("gone{round}-"), GONE_META);
        nix::unistd::sync();

        d.restart().await;
        let (snap, back) = (format!("snap{round}"), format!("back{round}"));
        let call = d.c.controller.create_snapshot(snapshot_req(&snap, "src"));
        bounded("CreateSnapshot right after a restart", RPC_BOUND, call)
            .await
            .unwrap_or_else(|s| panic!("CreateSnapshot right after restart {round}: {s:?}"));
        create_ok(&mut d.c, restore_of(dir_volume(&back, GIB), &snap)).await;
        assert_eq!(
            count_entries(&d.pool().join(&back)),
            SWEEP_FILES,
            "files in the restore of the snapshot taken right after restart {round}"
        );
        eventually(
            "the earlier process's half-built snapshot is removed",
            EVENTUALLY,
            || fs::symlink_metadata(&leftover).is_err(),
            || tail(&d.log(), 20),
        )
        .await;
        assert!(listed_snapshot_ids(&mut d.c).await.contains(&snap));
    }
}
