//! Clones, snapshots and group snapshots (issue 4) on real XFS-with-reflink
//! and ext4 pools, as root: content and holes, trees, cross-mode clones,
//! crash and space safety, and sources that change under the copy.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hostpath_csi::proto::group_controller_service_capability::rpc::Type as GroupCap;
use hostpath_csi::proto::*;
use nix::fcntl::{RenameFlags, AT_FDCWD};
use nix::sys::stat::Mode as Perm;
use nix::unistd::Whence;
use tonic::Code;

const UMIB: u64 = 1 << 20;

// ---------------------------------------------------------------- requests

// ------------------------------------------------------------ file helpers

/// xorshift64*: cheap, deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Random 1 MiB chunks at scattered offsets, a few small unaligned writes
/// and the last byte: what a VM disk with holes looks like.
fn write_scattered(path: &Path, seed: u64, chunks: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; UMIB as usize];
    for _ in 0..chunks {
        rng.fill(&mut buf);
        f.write_all_at(&buf, rng.next() % (len / UMIB) * UMIB)
            .unwrap();
    }
    for _ in 0..8 {
        rng.fill(&mut buf[..3000]);
        f.write_all_at(&buf[..3000], rng.next() % (len - 8192))
            .unwrap();
    }
    f.write_all_at(&[0xAB], len - 1).unwrap();
    f.sync_all().unwrap();
}

/// Writes `len` bytes of real (non-zero, per-chunk distinct) data.
fn write_dense(path: &Path, len: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    Rng(7).fill(&mut buf);
    let mut off = 0;
    while off < len {
        buf[..8].copy_from_slice(&off.to_le_bytes());
        let n = (len - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    f.sync_all().unwrap();
}

/// Size and a digest of a file's logical content, however it is stored:
/// FNV-1a over (offset, bytes) of every non-zero 4 KiB block.
fn digest(path: &Path) -> (u64, u64) {
    const ZERO: [u8; 4096] = [0; 4096];
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; 4 << 20];
    let mut off: i64 = 0;
    loop {
        let data = match nix::unistd::lseek(&f, off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA {}: {e}", path.display()),
        };
        let end = nix::unistd::lseek(&f, data, Whence::SeekHole).unwrap();
        let mut pos = data / 4096 * 4096;
        while pos < end {
            let want = (end - pos).min(buf.len() as i64) as usize;
            let n = f.read_at(&mut buf[..want], pos as u64).unwrap();
            assert!(n > 0);
            for (i, blk) in buf[..n].chunks(4096).enumerate() {
                if blk != &ZERO[..blk.len()] {
                    eat(&(pos as u64 + i as u64 * 4096).to_le_bytes());
                    eat(blk);
                }
            }
            pos += n as i64;
        }
        off = end;
    }
    (len, h)
}

/// Bytes allocated to a file.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_available() * st.fragment_size()
}

fn near(a: u64, b: u64, slack: u64) -> bool {
    a.abs_diff(b) <= slack
}

/// (mapped bytes, bytes in extents flagged FIEMAP_EXTENT_SHARED).
fn fiemap_shared(path: &Path) -> (u64, u64) {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extents: [Extent; 128],
    }
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const EXTENT_LAST: u32 = 0x1;
    const EXTENT_SHARED: u32 = 0x2000;
    let f = File::open(path).unwrap();
    let (mut mapped, mut shared, mut start) = (0u64, 0u64, 0u64);
    loop {
        let mut fm = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: 128,
            reserved: 0,
            extents: [Extent::default(); 128],
        });
        // SAFETY: FS_IOC_FIEMAP fills at most `count` extents of the buffer.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut *fm as *mut Fiemap) };
        assert_eq!(
            rc,
            0,
            "FIEMAP {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        if fm.mapped == 0 {
            break;
        }
        let extents = &fm.extents[..fm.mapped as usize];
        for e in extents {
            mapped += e.length;
            if e.flags & EXTENT_SHARED != 0 {
                shared += e.length;
            }
        }
        let last = extents.last().unwrap();
        if last.flags & EXTENT_LAST != 0 {
            break;
        }
        start = last.logical + last.length;
    }
    (mapped, shared)
}

fn drop_caches() {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn is_empty_dir(p: &Path) -> bool {
    fs::read_dir(p).unwrap().next().is_none()
}

/// Waits (up to a minute) for `cond`: leftovers are removed in the
/// background after the RPC or the restart.
async fn settles(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn private(d: &Driver, what: &str) -> PathBuf {
    d.pool().join(".hostpath-csi").join(what)
}

/// Runs a program and returns whether it succeeded, with its output.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kernel_log() -> Vec<String> {
    let out = Command::new("dmesg").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn kernel_log_len() -> usize {
    kernel_log().len()
}

/// XFS errors the kernel logged since `from` lines.
fn xfs_errors_since(from: usize) -> Vec<String> {
    kernel_log()
        .into_iter()
        .skip(from)
        .filter(|l| {
            l.contains("XFS")
                && ["rror", "orrupt", "ailed", "hutdown"]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .collect()
}

// ------------------------------------------------------ node-side helpers

/// Writes 64 KiB files (`w-<n>`, every byte `n`) with fsync until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut i: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let mut f = File::create(dir.join(format!("w-{i}"))).unwrap();
                f.write_all(&[i as u8; 65536]).unwrap();
                f.sync_all().unwrap();
                c.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        });
        Writer {
            stop,
            count,
            thread: Some(thread),
        }
    }

    fn written(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `n` more files are written: proof nothing is frozen.
    async fn advances(&self, n: u64) -> bool {
        let from = self.written();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.written() >= from + n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
    }
}

// ------------------------------------------------ sparse block clones

#[tokio::test]
async fn block_clone_on_xfs_reflinks_and_keeps_holes() {
    let fs = LoopFs::new("xfs", 8192);
    let d = Driver::start_with(&[("xfs", Some(fs.mount_point.join("pool")))]).await;
    block_clone_reflinks(d, true).await;
}

/// btrfs reflinks too; the pool is in a subvolume, whose files carry the
/// subvolume's own device number.
#[tokio::test]
async fn block_clone_on_a_btrfs_subvolume_reflinks_and_keeps_holes() {
    let fs = LoopFs::new("btrfs", 8192);
    let pool = fs.subvolume("vms").join("pool");
    let d = Driver::start_with(&[("btrfs", Some(pool))]).await;
    // btrfs's free-space figure moves with chunk allocation, so the
    // pool-space check is XFS's alone; shared extents are checked on both.
    block_clone_reflinks(d, false).await;
}

async fn block_clone_reflinks(mut d: Driver, check_pool_space: bool) {
    create_ok(&mut d.c, block_volume("src", 4 * GIB)).await;
    let src = d.pool().join("src");
    write_scattered(&src, 1, 48);
    let want = digest(&src);
    let src_alloc = allocated(&src);
    assert!((40 * UMIB..64 * UMIB).contains(&src_alloc), "{src_alloc}");
    nix::unistd::sync();
    let free_before = free_bytes(d.pool());

    create_ok(&mut d.c, clone_of(block_volume("same", 4 * GIB), "src")).await;
    let grown = create_ok(&mut d.c, clone_of(block_volume("grown", 6 * GIB), "src")).await;
    assert_eq!(grown.capacity_bytes, 6 * GIB);
    let snapshot = snapshot_ok(&mut d.c, "snap", "src").await;
    assert!(snapshot.ready_to_use);
    let snap_data = private(&d, "snapshots/snap/data");
    for (name, len) in [("same", 4 * GIB), ("grown", 6 * GIB)] {
        let p = d.pool().join(name);
        assert_eq!(fs::metadata(&p).unwrap().len(), len as u64, "{name}");
        assert_eq!(
            digest(&p).1,
            want.1,
            "{name}: content differs from the source"
        );
    }
    for p in [
        d.pool().join("same"),
        d.pool().join("grown"),
        snap_data.clone(),
    ] {
        assert!(
            near(allocated(&p), src_alloc, UMIB),
            "{}: {} vs {src_alloc}",
            p.display(),
            allocated(&p)
        );
        let (mapped, shared) = fiemap_shared(&p);
        assert!(
            mapped > 0 && shared * 10 >= mapped * 9,
            "{}: {shared} of {mapped} bytes shared",
            p.display()
        );
    }
    nix::unistd::sync();
    let used = free_before.saturating_sub(free_bytes(d.pool()));
    assert!(
        !check_pool_space || used < src_alloc / 4,
        "reflinks used {used} bytes of pool space"
    );
    // Restoring the snapshot reflinks again.
    create_ok(&mut d.c, restore_of(block_volume("back", 4 * GIB), "snap")).await;
    assert_eq!(digest(&d.pool().join("back")), want);
    // Writes to a clone stay private to it.
    write_scattered(&d.pool().join("same"), 99, 4);
    assert_eq!(digest(&src), want);
    assert_eq!(digest(&d.pool().join("back")), want);
}

#[tokio::test]
async fn block_clone_on_ext4_keeps_holes() {
    let fs = LoopFs::new("ext4", 8192);
    let mut d = Driver::start_with(&[("ext4", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, block_volume("src", 4 * GIB)).await;
    let src = d.pool().join("src");
    write_scattered(&src, 2, 48);
    let want = digest(&src);
    let src_alloc = allocated(&src);
    drop_caches();
    create_ok(&mut d.c, clone_of(block_volume("same", 4 * GIB), "src")).await;
    create_ok(&mut d.c, clone_of(block_volume("grown", 5 * GIB), "src")).await;
    snapshot_ok(&mut d.c, "snap", "src").await;
    create_ok(&mut d.c, clone_of(dir_volume("as-fs", 5 * GIB), "src")).await;
    let copies = [
        d.pool().join("same"),
        d.pool().join("grown"),
        private(&d, "snapshots/snap/data"),
        d.pool().join("as-fs/disk.img"),
    ];
    for p in &copies {
        assert_eq!(digest(p).1, want.1, "{}: content differs", p.display());
        // Extent-tree blocks may differ a little; holes must not be filled.
        assert!(
            near(allocated(p), src_alloc, 2 * UMIB),
            "{}: {} allocated vs {src_alloc}",
            p.display(),
            allocated(p)
        );
    }
    assert_eq!(fs::metadata(&copies[1]).unwrap().len(), 5 * GIB as u64);
    assert_eq!(fs::metadata(&copies[3]).unwrap().len(), 4 * GIB as u64);
    // A smaller target is refused and leaves nothing behind.
    let r =
        d.c.controller
            .create_volume(clone_of(block_volume("small", 2 * GIB), "src"))
            .await;
    assert_eq!(code(&r), Code::OutOfRange);
    assert!(!d.pool().join("small").exists());
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

// ---------------------------------------------------------------- trees

fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        AT_FDCWD,
        path,
        &TimeSpec::new(atime.0, atime.1),
        &TimeSpec::new(mtime.0, mtime.1),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Every user.* xattr of a path (not following symlinks).
fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a null buffer asks for the size.
    let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(size >= 0);
    let mut names = vec![0u8; size as usize];
    // SAFETY: the buffer is `size` bytes.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0);
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0);
        value.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Everything that a copy must keep, per relative path (symlinks not followed).
#[derive(Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    content: Option<(u64, u64)>,
}

fn describe(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let st = fs::symlink_metadata(&p).unwrap();
            let ft = st.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                Entry {
                    kind,
                    mode: st.mode() & 0o7777,
                    uid: st.uid(),
                    gid: st.gid(),
                    size: if ft.is_dir() { 0 } else { st.len() },
                    mtime: (st.mtime(), st.mtime_nsec()),
                    link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                    xattrs: if ft.is_symlink() {
                        BTreeMap::new()
                    } else {
                        user_xattrs(&p)
                    },
                    content: ft.is_file().then(|| digest(&p)),
                },
            );
        }
    }
    out
}

/// Builds a tree with every awkward thing a VM or app volume holds.
fn build_awkward_tree(root: &Path, outside: &Path, many_xattrs: bool) {
    let j = |p: &str| root.join(p);
    fs::create_dir_all(j("sub/deeper")).unwrap();
    fs::write(j("plain"), b"plain data").unwrap();
    fs::write(j("empty"), b"").unwrap();
    // Symlinks that point out of the volume: copied as links, never followed.
    std::os::unix::fs::symlink(outside.join("secret"), j("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc/passwd", j("sub/rel-link")).unwrap();
    std::os::unix::fs::symlink(outside, j("dir-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/dangling", j("dangling")).unwrap();
    std::os::unix::fs::symlink("plain", j("inside-link")).unwrap();
    // Hard links, within and across directories.
    fs::write(j("hard-a"), b"shared inode").unwrap();
    fs::hard_link(j("hard-a"), j("sub/hard-b")).unwrap();
    fs::hard_link(j("hard-a"), j("sub/deeper/hard-c")).unwrap();
    fs::write(j("pair-1"), b"two names").unwrap();
    fs::hard_link(j("pair-1"), j("pair-2")).unwrap();
    // Odd permissions and owners.
    fs::create_dir(j("setgid")).unwrap();
    chown(&j("setgid"), 1000, 2000);
    chmod(&j("setgid"), 0o2775);
    fs::write(j("setgid/inside"), b"group owned").unwrap();
    chown(&j("setgid/inside"), 1000, 2000);
    fs::create_dir(j("sticky")).unwrap();
    chmod(&j("sticky"), 0o1777);
    fs::write(j("locked"), b"nobody may read this").unwrap();
    chmod(&j("locked"), 0o000);
    fs::write(j("setuid"), b"#!/bin/true\n").unwrap();
    chown(&j("setuid"), 1234, 5678);
    chmod(&j("setuid"), 0o4755);
    fs::create_dir(j("closed")).unwrap();
    fs::write(j("closed/kept"), b"inside a 000 directory").unwrap();
    chmod(&j("closed"), 0o000);
    chown(&j("dangling"), 4321, 8765);
    nix::unistd::mkfifo(&j("pipe"), Perm::from_bits_truncate(0o620)).unwrap();
    // A sparse file inside the tree.
    let f = File::create(j("sub/sparse.img")).unwrap();
    f.set_len(256 * UMIB).unwrap();
    f.write_all_at(b"middle", 128 * UMIB).unwrap();
    drop(f);
    // Extended attributes on files and directories.
    set_xattr(&j("plain"), "user.color", b"blue");
    set_xattr(&j("sub"), "user.dir", b"on a directory");
    set_xattr(&j("hard-a"), "user.big", &vec![b'x'; 3000]);
    set_xattr(&j("locked"), "user.locked", b"still copied");
    if many_xattrs {
        // More names than fit a 4 KiB list buffer (XFS allows it).
        for i in 0..64 {
            let name = format!("user.{}-{i:03}", "n".repeat(90));
            set_xattr(&j("plain"), &name, format!("value {i}").as_bytes());
        }
    }
    // Times with nanoseconds, set last (children change a directory's mtime).
    for (i, p) in [
        "plain",
        "empty",
        "hard-a",
        "locked",
        "setuid",
        "pipe",
        "sub/sparse.img",
    ]
    .iter()
    .enumerate()
    {
        set_times(
            &j(p),
            (1_000_000_000 + i as i64, 111),
            (1_100_000_000 + i as i64, 222_333_444),
        );
    }
    set_times(&j("abs-link"), (1_200_000_000, 5), (1_200_000_001, 6));
    for (i, p) in ["sub/deeper", "sub", "setgid", "sticky", "closed"]
        .iter()
        .enumerate()
    {
        set_times(
            &j(p),
            (1_300_000_000, 0),
            (1_300_000_000 + i as i64, 999_999_999),
        );
    }
}

async fn tree_clone_on(fs_type: &str) {
    let fs = LoopFs::new(fs_type, 512);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    let outside = d.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    set_times(
        &outside.join("secret"),
        (1_400_000_000, 0),
        (1_400_000_000, 0),
    );
    create_ok(&mut d.c, dir_volume("src", 256 * MIB)).await;
    let src = d.pool().join("src");
    build_awkward_tree(&src, &outside, fs_type == "xfs");
    let before = describe(&src);
    let atime = |p: &Path| {
        let st = fs::metadata(p.join("plain")).unwrap();
        (st.atime(), st.atime_nsec())
    };
    let src_atime = atime(&src);
    create_ok(&mut d.c, clone_of(dir_volume("dst", 256 * MIB), "src")).await;
    let dst = d.pool().join("dst");
    // Access times are copied, and the copy's reads leave the source's alone.
    assert_eq!(atime(&dst), src_atime);
    assert_eq!(atime(&src), src_atime);
    let after = describe(&dst);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (path, want) in &before {
        assert_eq!(&after[path], want, "{}", path.display());
    }
    assert_eq!(
        fs::metadata(&dst).unwrap().mode() & 0o7777,
        fs::metadata(&src).unwrap().mode() & 0o7777
    );
    // Hard links are links again.
    let ino = |p: &str| fs::metadata(dst.join(p)).unwrap().ino();
    assert_eq!(ino("hard-a"), ino("sub/hard-b"));
    assert_eq!(ino("hard-a"), ino("sub/deeper/hard-c"));
    assert_eq!(fs::metadata(dst.join("hard-a")).unwrap().nlink(), 3);
    assert_eq!(ino("pair-1"), ino("pair-2"));
    assert_ne!(
        ino("pair-1"),
        fs::metadata(src.join("pair-1")).unwrap().ino()
    );
    // Holes stay holes; the outside target is untouched and not copied in.
    assert!(allocated(&dst.join("sub/sparse.img")) < UMIB);
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
    assert_eq!(
        fs::metadata(outside.join("secret")).unwrap().mtime(),
        1_400_000_000
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert!(fs::symlink_metadata(dst.join("dir-link"))
        .unwrap()
        .file_type()
        .is_symlink());
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

#[tokio::test]
async fn tree_clone_keeps_links_xattrs_modes_and_times_on_xfs() {
    tree_clone_on("xfs").await;
}

#[tokio::test]
async fn tree_clone_keeps_links_xattrs_modes_and_times_on_ext4() {
    tree_clone_on("ext4").await;
}

#[tokio::test]
async fn tree_clone_keeps_links_xattrs_modes_and_times_on_btrfs() {
    tree_clone_on("btrfs").await;
}

/// A pod keeps swapping directories and files of its volume for symlinks to
/// host paths (and a FIFO) while clones run: no clone may contain host data,
/// and none may hang.
#[tokio::test]
async fn tree_clone_never_follows_links_swapped_in_during_the_copy() {
    let mut d = Driver::start().await;
    let outside = d.path("host");
    fs::create_dir(&outside).unwrap();
    for i in 0..8 {
        fs::write(outside.join(format!("f{i}")), b"HOST-SECRET").unwrap();
    }
    fs::write(outside.join("disk.img"), b"HOST-SECRET").unwrap();
    create_ok(&mut d.c, dir_volume("src", GIB)).await;
    let src = d.pool().join("src");
    let mut pairs = Vec::new();
    for base in [src.clone(), src.join("n")] {
        fs::create_dir_all(base.join("d")).unwrap();
        for i in 0..8 {
            fs::write(base.join(format!("d/f{i}")), b"public").unwrap();
        }
        std::os::unix::fs::symlink(&outside, base.join("dl")).unwrap();
        pairs.push((base.join("d"), base.join("dl")));
    }
    fs::write(src.join("x"), b"public").unwrap();
    std::os::unix::fs::symlink(outside.join("f0"), src.join("xl")).unwrap();
    pairs.push((src.join("x"), src.join("xl")));
    fs::write(src.join("q"), b"public").unwrap();
    nix::unistd::mkfifo(&src.join("qf"), Perm::from_bits_truncate(0o600)).unwrap();
    pairs.push((src.join("q"), src.join("qf")));
    // disk.img for Filesystem -> Block clones, swapped with a FIFO and a link.
    fs::write(src.join("disk.img"), vec![7u8; 4096]).unwrap();
    nix::unistd::mkfifo(&src.join("disk-fifo"), Perm::from_bits_truncate(0o600)).unwrap();
    std::os::unix::fs::symlink(outside.join("disk.img"), src.join("disk-link")).unwrap();
    pairs.push((src.join("disk.img"), src.join("disk-fifo")));
    pairs.push((src.join("disk.img"), src.join("disk-link")));

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), swaps.clone());
    let swapper = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            for (a, b) in &pairs {
                nix::fcntl::renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE)
                    .unwrap();
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    for i in 0..30 {
        let name = format!("c{i}");
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            d.c.controller
                .create_volume(clone_of(dir_volume(&name, GIB), "src")),
        )
        .await
        .expect("a clone hung (a FIFO was opened?)");
        r.unwrap_or_else(|s| panic!("clone {name}: {s:?}"));
        for (path, e) in describe(&d.pool().join(&name)) {
            if e.kind == "file" {
                let data = fs::read(d.pool().join(&name).join(&path)).unwrap();
                assert!(
                    !data.windows(11).any(|w| w == b"HOST-SECRET"),
                    "{name}/{} holds host data",
                    path.display()
                );
            }
        }
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            d.c.controller
                .create_volume(clone_of(block_volume(&format!("b{i}"), 16 * MIB), "src")),
        )
        .await
        .expect("a Filesystem-to-Block clone hung");
        match r {
            Ok(_) => {
                let data = fs::read(d.pool().join(format!("b{i}"))).unwrap();
                assert!(
                    !data.windows(11).any(|w| w == b"HOST-SECRET"),
                    "b{i} holds host data"
                );
            }
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(swaps.load(Ordering::Relaxed) > 1000);
    for i in 0..8 {
        assert_eq!(
            fs::read(outside.join(format!("f{i}"))).unwrap(),
            b"HOST-SECRET"
        );
    }
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

/// Paths longer than PATH_MAX and trees deeper than any stack: the copy
/// works by descriptors, and the driver survives.
#[tokio::test]
async fn deep_trees_are_copied_or_refused_cleanly() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("deep", GIB)).await;
    make_deep(&d.pool().join("deep"), 1500);
    create_ok(&mut d.c, clone_of(dir_volume("deep-copy", GIB), "deep")).await;
    assert_eq!(depth_of(&d.pool().join("deep-copy")), 1500);
    snapshot_ok(&mut d.c, "deep-snap", "deep").await;
    create_ok(&mut d.c, dir_volume("deeper", GIB)).await;
    make_deep(&d.pool().join("deeper"), 3000);
    let r =
        d.c.controller
            .create_volume(clone_of(dir_volume("deeper-copy", GIB), "deeper"))
            .await;
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(
        d.c.identity.probe(ProbeRequest {}).await.is_ok(),
        "the driver died"
    );
    assert!(!d.pool().join("deeper-copy").exists());
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await);
}

// ---------------------------------------------------------- cross-mode

#[tokio::test]
async fn cross_mode_clones_follow_the_disk_img_convention() {
    let mut d = Driver::start().await;
    // Block -> Filesystem: the disk becomes <target>/disk.img.
    create_ok(&mut d.c, block_volume("blk", 64 * MIB)).await;
    write_scattered(&d.pool().join("blk"), 3, 8);
    let want = digest(&d.pool().join("blk"));
    create_ok(&mut d.c, clone_of(dir_volume("fs", 64 * MIB), "blk")).await;
    let img = d.pool().join("fs/disk.img");
    assert_eq!(digest(&img), want);
    assert!(near(
        allocated(&img),
        allocated(&d.pool().join("blk")),
        UMIB
    ));
    let r =
        d.c.controller
            .create_volume(clone_of(dir_volume("fs-small", 32 * MIB), "blk"))
            .await;
    assert_eq!(code(&r), Code::OutOfRange);

    // Filesystem holding disk.img -> Block. CDI sizes the Filesystem PVC
    // above the disk (filesystem overhead), so only disk.img must fit.
    create_ok(&mut d.c, dir_volume("cdi", 10 * GIB)).await;
    let disk = d.pool().join("cdi/disk.img");
    File::create(&disk)
        .unwrap()
        .set_len(100 * UMIB + 4096)
        .unwrap();
    write_scattered(&disk, 4, 6);
    let (disk_len, disk_hash) = digest(&disk);
    let v = create_ok(
        &mut d.c,
        clone_of(block_volume("blk2", 100 * MIB + 4096), "cdi"),
    )
    .await;
    assert_eq!(v.capacity_bytes, 101 * MIB);
    let blk2 = d.pool().join("blk2");
    assert_eq!(fs::metadata(&blk2).unwrap().len(), 101 * UMIB);
    assert_eq!(digest(&blk2).1, disk_hash);
    assert!(disk_len < 101 * UMIB);
    let r =
        d.c.controller
            .create_volume(clone_of(block_volume("blk-small", 100 * MIB), "cdi"))
            .await;
    assert_eq!(code(&r), Code::OutOfRange, "{r:?}");
    // And through a snapshot of each side.
    snapshot_ok(&mut d.c, "blk-snap", "blk").await;
    create_ok(
        &mut d.c,
        restore_of(dir_volume("fs-from-snap", 64 * MIB), "blk-snap"),
    )
    .await;
    assert_eq!(digest(&d.pool().join("fs-from-snap/disk.img")), want);
    snapshot_ok(&mut d.c, "cdi-snap", "cdi").await;
    create_ok(
        &mut d.c,
        restore_of(block_volume("blk-from-snap", 101 * MIB), "cdi-snap"),
    )
    .await;
    assert_eq!(digest(&d.pool().join("blk-from-snap")).1, disk_hash);

    // A directory without a regular disk.img cannot become a disk.
    create_ok(&mut d.c, dir_volume("no-disk", GIB)).await;
    let r =
        d.c.controller
            .create_volume(clone_of(block_volume("x1", GIB), "no-disk"))
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    std::os::unix::fs::symlink("/etc/passwd", d.pool().join("no-disk/disk.img")).unwrap();
    let r =
        d.c.controller
            .create_volume(clone_of(block_volume("x2", GIB), "no-disk"))
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    fs::remove_file(d.pool().join("no-disk/disk.img")).unwrap();
    nix::unistd::mkfifo(
        &d.pool().join("no-disk/disk.img"),
        Perm::from_bits_truncate(0o600),
    )
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        d.c.controller
            .create_volume(clone_of(block_volume("x3", GIB), "no-disk")),
    )
    .await
    .expect("a FIFO disk.img must not hang the clone");
    assert_eq!(code(&r), Code::InvalidArgument);

    // Every other cross-mode pairing is INVALID_ARGUMENT with a clear message.
    create_ok(&mut d.c, image_volume("img", 300 * MIB, "")).await;
    for (req, src) in [
        (block_volume("x4", GIB), "img"),
        (image_volume("x5", GIB, ""), "blk"),
        (image_volume("x6", GIB, ""), "cdi"),
        (dir_volume("x7", GIB), "img"),
    ] {
        let name = req.name.clone();
        let r = d.c.controller.create_volume(clone_of(req, src)).await;
        let s = r.expect_err(&name);
        assert_eq!(s.code(), Code::InvalidArgument, "{name}: {s:?}");
        assert!(s.message().contains("clone"), "{name}: {}", s.message());
    }
    let ids = listed_ids(&mut d.c).await;
    assert!(
        ids.iter()
            .all(|i| !i.starts_with('x') && !i.ends_with("-small")),
        "{ids:?}"
    );
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

#[tokio::test]
async fn image_clones_are_grown_and_keep_their_filesystem() {
    let fs = LoopFs::new("xfs", 4096);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, image_volume("img", 400 * MIB, "")).await;
    create_ok(&mut d.c, image_volume("img4", 64 * MIB, "ext4")).await;
    for id in ["img", "img4"] {
        let (_, m) = mount_rwo(&mut d, id).await;
        fs::write(m.join("hello"), format!("from {id}")).unwrap();
        unpublish_unstage(&mut d.c, id, &m).await;
    }
    // A larger target is grown (the filesystem at the next stage).
    let v = create_ok(
        &mut d.c,
        clone_of(image_volume("img-big", 700 * MIB, ""), "img"),
    )
    .await;
    assert_eq!(v.capacity_bytes, 700 * MIB);
    // No fs_type in the request: the clone keeps the source's filesystem.
    create_ok(
        &mut d.c,
        clone_of(image_volume("img4-copy", 128 * MIB, ""), "img4"),
    )
    .await;
    snapshot_ok(&mut d.c, "img4-snap", "img4").await;
    create_ok(
        &mut d.c,
        restore_of(image_volume("img4-back", 64 * MIB, ""), "img4-snap"),
    )
    .await;
    // Another filesystem asked for: refused, not made unstageable.
    for req in [
        clone_of(image_volume("img4-as-xfs", 400 * MIB, "xfs"), "img4"),
        restore_of(image_volume("img4-back-xfs", 400 * MIB, "xfs"), "img4-snap"),
    ] {
        let r = d.c.controller.create_volume(req).await;
        assert_code(
            &r,
            Code::InvalidArgument,
            "a clone asking for another filesystem",
        );
    }
    let ids = listed_ids(&mut d.c).await;
    assert!(!ids.iter().any(|i| i.ends_with("-xfs")), "{ids:?}");
    for (id, from, min_size) in [
        ("img-big", "img", 600 * UMIB),
        ("img4-copy", "img4", 100 * UMIB),
        ("img4-back", "img4", 40 * UMIB),
    ] {
        let (_, m) = mount_rwo(&mut d, id).await;
        assert_eq!(
            fs::read_to_string(m.join("hello")).unwrap(),
            format!("from {from}")
        );
        let st = nix::sys::statvfs::statvfs(&m).unwrap();
        let size = st.blocks() * st.fragment_size();
        assert!(size >= min_size, "{id}: filesystem is {size} bytes");
        fs::write(m.join("more"), b"writable").unwrap();
        unpublish_unstage(&mut d.c, id, &m).await;
    }
    let r =
        d.c.controller
            .create_volume(clone_of(image_volume("img-small", 350 * MIB, ""), "img"))
            .await;
    assert_eq!(code(&r), Code::OutOfRange, "{r:?}");
}

// ------------------------------------------------------------ snapshots

#[tokio::test]
async fn snapshot_restore_idempotency_listing_and_paging() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, block_volume("blk", 256 * MIB)).await;
    write_scattered(&d.pool().join("blk"), 5, 16);
    let blk_digest = digest(&d.pool().join("blk"));
    create_ok(&mut d.c, dir_volume("tree", GIB)).await;
    let outside = d.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"x").unwrap();
    build_awkward_tree(&d.pool().join("tree"), &outside, false);
    let tree_before = describe(&d.pool().join("tree"));

    let s1 = snapshot_ok(&mut d.c, "s-blk", "blk").await;
    assert_eq!(s1.size_bytes, 256 * MIB);
    assert!(s1.ready_to_use);
    // Idempotent by name: the very same answer, even after a restart.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = snapshot_ok(&mut d.c, "s-blk", "blk").await;
    assert_eq!(again, s1);
    d.restart().await;
    let again = snapshot_ok(&mut d.c, "s-blk", "blk").await;
    assert_eq!(again, s1);
    let r =
        d.c.controller
            .create_snapshot(snapshot_req("s-blk", "tree"))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    snapshot_ok(&mut d.c, "s-tree", "tree").await;

    // Change both sources; restores give the snapshot's content.
    write_scattered(&d.pool().join("blk"), 6, 4);
    fs::write(d.pool().join("tree/plain"), b"changed").unwrap();
    fs::remove_file(d.pool().join("tree/empty")).unwrap();
    create_ok(
        &mut d.c,
        restore_of(block_volume("blk-back", 256 * MIB), "s-blk"),
    )
    .await;
    assert_eq!(digest(&d.pool().join("blk-back")), blk_digest);
    create_ok(&mut d.c, restore_of(dir_volume("tree-back", GIB), "s-tree")).await;
    assert_eq!(describe(&d.pool().join("tree-back")), tree_before);
    let r =
        d.c.controller
            .create_volume(restore_of(block_volume("blk-small", 128 * MIB), "s-blk"))
            .await;
    assert_eq!(code(&r), Code::OutOfRange);
    // Snapshots are independent: the source can go away.
    delete_ok(&mut d.c, "blk").await;
    create_ok(
        &mut d.c,
        restore_of(block_volume("blk-back2", 512 * MIB), "s-blk"),
    )
    .await;
    assert_eq!(digest(&d.pool().join("blk-back2")).1, blk_digest.1);

    // Listing: filters by id and by source, pages, tokens.
    for i in 0..5 {
        snapshot_ok(&mut d.c, &format!("s-t{i}"), "tree").await;
    }
    let mut list = async |id: &str, source: &str, max: i32, token: &str| {
        let r =
            d.c.controller
                .list_snapshots(list_snapshots_req(id, source, max, token));
        r.await.unwrap().into_inner()
    };
    let (mut all, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = list("", "", 3, &token).await;
        assert!(page.entries.len() <= 3);
        all.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(
        all,
        ["s-blk", "s-t0", "s-t1", "s-t2", "s-t3", "s-t4", "s-tree"]
    );
    let by_source = list("", "tree", 4, "").await;
    assert_eq!(by_source.entries.len(), 4);
    let rest = list("", "tree", 4, &by_source.next_token).await;
    assert_eq!(rest.entries.len(), 2);
    assert!(rest.next_token.is_empty());
    // The deleted source's snapshot still lists under its old source.
    assert_eq!(list("", "blk", 0, "").await.entries.len(), 1);
    let one = list("s-t2", "", 0, "").await;
    assert_eq!(one.entries.len(), 1);
    assert_eq!(
        one.entries[0].snapshot.as_ref().unwrap().source_volume_id,
        "tree"
    );
    assert!(list("s-t2", "blk", 0, "").await.entries.is_empty());
    for bad in ["not-a-token", "../x"] {
        let r =
            d.c.controller
                .list_snapshots(list_snapshots_req("", "", 0, bad));
        assert_code(&r.await, Code::Aborted, bad);
    }
    // Delete is idempotent and unknown ids succeed.
    for id in ["s-t0", "s-t0", "never-was"] {
        let r =
            d.c.controller
                .delete_snapshot(delete_snapshot_req(id))
                .await;
        assert_code(&r, Code::Ok, id);
    }
    assert_eq!(listed_snapshot_ids(&mut d.c).await.len(), 6);
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

/// Upstream's `snapshotPath`, here on another filesystem than the pool.
#[tokio::test]
async fn snapshot_path_from_datadir_is_honoured() {
    let snapfs = LoopFs::new("xfs", 1024);
    let root = tempfile::Builder::new()
        .prefix("hpc-snappath-")
        .tempdir()
        .unwrap();
    let pool = root.path().join("pool");
    let snaps = snapfs.mount_point.join("snapshots");
    let json =
        serde_json::json!([{"name": "local", "path": pool, "snapshotPath": snaps}]).to_string();
    let mut d = Driver::start_with_datadir(&json).await;
    create_ok(&mut d.c, block_volume("blk", 64 * MIB)).await;
    write_scattered(&d.pool().join("blk"), 8, 4);
    let want = digest(&d.pool().join("blk"));
    create_ok(&mut d.c, dir_volume("tree", GIB)).await;
    fs::write(d.pool().join("tree/f"), b"file").unwrap();
    snapshot_ok(&mut d.c, "s1", "blk").await;
    snapshot_ok(&mut d.c, "s2", "tree").await;
    assert_eq!(digest(&snaps.join("s1/data")), want);
    assert_eq!(fs::read(snaps.join("s2/data/f")).unwrap(), b"file");
    let unused = private(&d, "snapshots");
    assert!(!unused.exists() || is_empty_dir(&unused));
    d.restart().await;
    assert_eq!(listed_snapshot_ids(&mut d.c).await, ["s1", "s2"]);
    create_ok(&mut d.c, restore_of(block_volume("back", 64 * MIB), "s1")).await;
    assert_eq!(digest(&d.pool().join("back")), want);
    for id in ["s1", "s2", "s1"] {
        let r =
            d.c.controller
                .delete_snapshot(delete_snapshot_req(id))
                .await;
        assert_code(&r, Code::Ok, id);
    }
    assert!(listed_snapshot_ids(&mut d.c).await.is_empty());
    let left: Vec<_> = fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".groups")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let tmp = private(&d, "tmp");
    assert!(settles(|| is_empty_dir(&tmp)).await, "leftovers in tmp");
}

// ---------------------------------------------------- group snapshots

#[tokio::test]
async fn group_snapshot_of_a_busy_image_volume_restores_cleanly() {
    let fs = LoopFs::new("xfs", 4096);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    let caps =
        d.c.group
            .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(group_controller_service_capability::Type::Rpc(r)) if r.r#type == GroupCap::CreateDeleteGetVolumeGroupSnapshot as i32)));
    create_ok(&mut d.c, image_volume("vm-root", 512 * MIB, "")).await;
    create_ok(&mut d.c, block_volume("vm-data", 64 * MIB)).await;
    write_scattered(&d.pool().join("vm-data"), 9, 4);
    let data_digest = digest(&d.pool().join("vm-data"));
    create_ok(&mut d.c, dir_volume("vm-cfg", GIB)).await;
    fs::write(d.pool().join("vm-cfg/cloud-init"), b"#cloud-config").unwrap();
    let (staging, m) = mount_rwo(&mut d, "vm-root").await;
    let _thaw = FreezeGuard::thaw_on_drop(&staging);
    let writer = Writer::start(m.clone());
    assert!(writer.advances(20).await);

    let members = ["vm-root", "vm-data", "vm-cfg"];
    let g = group_ok(&mut d.c, "vm-snap", &members).await;
    assert!(
        writer.advances(20).await,
        "writes did not resume: the freeze was not released"
    );
    assert!(g.ready_to_use);
    assert_eq!(g.snapshots.len(), 3);
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, "vm-snap");
        assert!(s.ready_to_use);
    }
    let again = group_ok(&mut d.c, "vm-snap", &members).await;
    assert_eq!(again, g);
    let r =
        d.c.group
            .create_volume_group_snapshot(group_req("vm-snap", &["vm-root"]))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    let got =
        d.c.group
            .get_volume_group_snapshot(get_group_req("vm-snap", vec![]));
    assert_eq!(got.await.unwrap().into_inner().group_snapshot.unwrap(), g);
    // The same sources in another order are the same request.
    let reordered = group_ok(&mut d.c, "vm-snap", &["vm-cfg", "vm-root", "vm-data"]).await;
    assert_eq!(reordered, g);
    // snapshot_ids, when sent, must be the members (in any order).
    let mut member_ids: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    member_ids.reverse();
    let get = |ids: Vec<String>| get_group_req("vm-snap", ids);
    let r = d.c.group.get_volume_group_snapshot(get(member_ids.clone()));
    assert_code(&r.await, Code::Ok, "the members in another order");
    for wrong in [
        vec![member_ids[0].clone()],
        vec!["someone-else".to_string(); 3],
    ] {
        let r =
            d.c.group
                .get_volume_group_snapshot(get(wrong.clone()))
                .await;
        assert_code(&r, Code::InvalidArgument, &format!("get with {wrong:?}"));
        let r =
            d.c.group
                .delete_volume_group_snapshot(delete_group_req("vm-snap", wrong.clone()));
        assert_code(
            &r.await,
            Code::InvalidArgument,
            &format!("delete with {wrong:?}"),
        );
    }
    // A member must not be deleted on its own while its group exists.
    let r =
        d.c.controller
            .delete_snapshot(delete_snapshot_req(&member_ids[0]));
    assert_code(
        &r.await,
        Code::InvalidArgument,
        "a delete of a group's member",
    );
    let r = d.c.group.get_volume_group_snapshot(get(vec![])).await;
    assert_code(&r, Code::Ok, "the refused delete left the group whole");
    // A published Block volume cannot be frozen, so it cannot be taken
    // together with another volume: refused, nothing frozen or left.
    let disk = d.path("pods/vm-data");
    publish_ok(&mut d.c, "vm-data", &disk, block_rwo()).await;
    let r =
        d.c.group
            .create_volume_group_snapshot(group_req("vm-live", &["vm-root", "vm-data"]))
            .await;
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(r.unwrap_err().message().contains("vm-data"));
    assert!(writer.advances(5).await, "a refused group left a freeze");
    // On its own it is a plain (reflink, so atomic) snapshot.
    let alone = group_ok(&mut d.c, "vm-live-data", &["vm-data"]).await;
    unpublish_ok(&mut d.c, "vm-data", &disk).await;
    // A group whose record never got written (a failed clean-up left its
    // members): retrying it replaces the leftovers instead of conflicting.
    let snapshots_dir = d.pool().join(".hostpath-csi/snapshots");
    fs::remove_file(snapshots_dir.join(".groups/vm-live-data.json")).unwrap();
    let retried = group_ok(&mut d.c, "vm-live-data", &["vm-data"]).await;
    assert_eq!(retried.snapshots.len(), 1);
    assert_eq!(
        retried.snapshots[0].snapshot_id,
        alone.snapshots[0].snapshot_id
    );
    assert!(d
        .log()
        .contains("removing a member left by a failed attempt"));
    let r =
        d.c.group
            .delete_volume_group_snapshot(delete_group_req("vm-live-data", vec![]));
    r.await.unwrap();

    // Restore the frozen member: a clean filesystem with whole files.
    let member = |src: &str| {
        g.snapshots
            .iter()
            .find(|s| s.source_volume_id == src)
            .unwrap()
            .snapshot_id
            .clone()
    };
    create_ok(
        &mut d.c,
        restore_of(image_volume("root-back", 512 * MIB, ""), &member("vm-root")),
    )
    .await;
    // A frozen XFS has a covered (not unmounted) log, so the first mount
    // replays it; that replay must succeed without errors, and the
    // filesystem must then check clean.
    let img = d.pool().join("root-back");
    let kernel_log = kernel_log_len();
    let (_, back) = mount_rwo(&mut d, "root-back").await;
    let mut files = 0;
    for e in fs::read_dir(&back).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("w-") else {
            continue;
        };
        let data = fs::read(e.path()).unwrap();
        let n: u64 = n.parse().unwrap();
        assert!(
            data.is_empty() || data == vec![n as u8; 65536],
            "{name} is torn ({} bytes)",
            data.len()
        );
        files += 1;
    }
    assert!(files >= 20, "only {files} files in the restored image");
    unpublish_unstage(&mut d.c, "root-back", &back).await;
    let errors = xfs_errors_since(kernel_log);
    assert!(
        errors.is_empty(),
        "mounting the restored image logged:\n{}",
        errors.join("\n")
    );
    let (ok, out) = run("xfs_repair", &["-n".as_ref(), img.as_os_str()]);
    assert!(ok, "xfs_repair -n on the restored image:\n{out}");
    assert!(
        !out.contains("ALERT"),
        "xfs_repair -n on the restored image:\n{out}"
    );
    create_ok(
        &mut d.c,
        restore_of(block_volume("data-back", 64 * MIB), &member("vm-data")),
    )
    .await;
    assert_eq!(digest(&d.pool().join("data-back")), data_digest);
    create_ok(
        &mut d.c,
        restore_of(dir_volume("cfg-back", GIB), &member("vm-cfg")),
    )
    .await;
    assert_eq!(
        fs::read(d.pool().join("cfg-back/cloud-init")).unwrap(),
        b"#cloud-config"
    );

    // A member name taken by another snapshot: refused before anything is
    // frozen or taken.
    snapshot_ok(&mut d.c, "broken-m1", "vm-cfg").await;
    let r =
        d.c.group
            .create_volume_group_snapshot(group_req("broken", &["vm-root", "vm-data"]))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists, "{r:?}");
    assert!(!listed_snapshot_ids(&mut d.c)
        .await
        .contains(&"broken-m0".to_string()));
    // A member that fails half-way (a tree too deep to copy) thaws the
    // frozen filesystem and removes the members already taken.
    create_ok(&mut d.c, dir_volume("too-deep", GIB)).await;
    make_deep(&d.pool().join("too-deep"), 2100);
    let r =
        d.c.group
            .create_volume_group_snapshot(group_req("half", &["vm-root", "too-deep"]))
            .await;
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(
        writer.advances(10).await,
        "the freeze was not released after an error"
    );
    let ids = listed_snapshot_ids(&mut d.c).await;
    assert!(ids.iter().all(|i| !i.starts_with("half")), "{ids:?}");
    assert!(d.log().contains("filesystem thawed"));
    // Unknown sources: NOT_FOUND, nothing frozen, nothing left.
    for ids in [vec!["vm-root", "no-such-volume"], vec!["no-such-volume"]] {
        let r =
            d.c.group
                .create_volume_group_snapshot(group_req("g-missing", &ids))
                .await;
        assert_eq!(code(&r), Code::NotFound, "{ids:?}: {r:?}");
    }
    assert!(writer.advances(10).await);
    let ids = listed_snapshot_ids(&mut d.c).await;
    assert!(ids.iter().all(|i| !i.starts_with("g-missing")), "{ids:?}");

    // Deleting the group deletes its members, idempotently.
    for _ in 0..2 {
        let r =
            d.c.group
                .delete_volume_group_snapshot(delete_group_req("vm-snap", vec![]));
        r.await.unwrap();
    }
    let ids = listed_snapshot_ids(&mut d.c).await;
    assert_eq!(ids, ["broken-m1"]);
    let r =
        d.c.group
            .get_volume_group_snapshot(get_group_req("vm-snap", vec![]));
    assert_code(&r.await, Code::NotFound, "a deleted group");
    writer.stop();
    unpublish_unstage(&mut d.c, "vm-root", &m).await;
}

/// A group whose published image member is on a reflink pool and whose
/// big unpublished member is on a pool that copies: the copy runs with
/// nothing frozen, and kill -9 in the middle leaves no member and no freeze.
#[tokio::test]
async fn a_crash_during_a_group_snapshot_leaves_nothing_frozen_or_half_taken() {
    let fast = LoopFs::new("xfs", 1024);
    let slow = LoopFs::new("ext4", 6144);
    let mut d = Driver::start_with(&[
        ("p", Some(fast.mount_point.join("pool"))),
        ("q", Some(slow.mount_point.join("pool"))),
    ])
    .await;
    create_ok(&mut d.c, image_volume("vm-root", 320 * MIB, "")).await;
    let big = with_params(block_volume("vm-big", 2 * GIB), &[("storagePool", "q")]);
    create_ok(&mut d.c, big).await;
    let big_path = slow.mount_point.join("pool/vm-big");
    write_dense(&big_path, 2 * GIB as u64);
    let (staging, m) = mount_rwo(&mut d, "vm-root").await;
    let _thaw = FreezeGuard::thaw_on_drop(&staging);
    let writer = Writer::start(m.clone());
    assert!(writer.advances(5).await);
    drop_caches();
    let mut group = d.c.group.clone();
    let call = tokio::spawn(async move {
        group
            .create_volume_group_snapshot(group_req("g", &["vm-root", "vm-big"]))
            .await
    });
    // Wait until the big member is being copied.
    let snapshots = slow.mount_point.join("pool/.hostpath-csi/snapshots");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copying = fs::read_dir(&snapshots).unwrap().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".tmp-g-m1")
                && fs::metadata(e.path().join("data")).is_ok_and(|m| m.blocks() * 512 > 32 * UMIB)
        });
        if copying {
            break;
        }
        assert!(
            !call.is_finished(),
            "the group snapshot finished before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the copy never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        writer.advances(5).await,
        "the image filesystem was frozen while another member's data was copied"
    );
    d.kill9();
    let _ = call.await;
    d.restart().await;
    assert!(
        writer.advances(5).await,
        "the filesystem is frozen after a restart"
    );
    assert!(listed_snapshot_ids(&mut d.c).await.is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> = fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "leftovers stayed: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The retry succeeds.
    let g = group_ok(&mut d.c, "g", &["vm-root", "vm-big"]).await;
    assert_eq!(g.snapshots.len(), 2);
    assert!(writer.advances(5).await);
    writer.stop();
    unpublish_unstage(&mut d.c, "vm-root", &m).await;
}

// ------------------------------------------------------------ faults

#[tokio::test]
async fn kill_during_a_2gib_clone_leaves_nothing_and_the_retry_succeeds() {
    let fs = LoopFs::new("ext4", 8192);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, block_volume("src", 2 * GIB)).await;
    let src = d.pool().join("src");
    write_dense(&src, 2 * GIB as u64);
    let tmp = private(&d, "tmp");
    let snapshots = private(&d, "snapshots");

    // Interrupt a clone, then a snapshot, half-way.
    for what in ["clone", "snapshot"] {
        drop_caches();
        let mut c = d.c.controller.clone();
        let call = tokio::spawn(async move {
            if what == "clone" {
                c.create_volume(clone_of(block_volume("dst", 2 * GIB), "src"))
                    .await
                    .map(|_| ())
            } else {
                c.create_snapshot(snapshot_req("snap", "src"))
                    .await
                    .map(|_| ())
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let partial = |dir: &Path| {
                let mut found = false;
                let mut stack = vec![dir.to_path_buf()];
                while let Some(p) = stack.pop() {
                    for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                        let st = fs::symlink_metadata(e.path()).unwrap();
                        if st.is_dir() {
                            stack.push(e.path());
                        } else if st.blocks() * 512 > 64 * UMIB {
                            found = true;
                        }
                    }
                }
                found
            };
            if partial(&tmp) || partial(&snapshots) {
                break;
            }
            assert!(
                !call.is_finished(),
                "the {what} finished before it could be interrupted"
            );
            assert!(
                Instant::now() < deadline,
                "the {what} never started copying"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        d.kill9();
        assert!(call.await.unwrap().is_err());
        d.restart().await;
        assert!(
            settles(|| is_empty_dir(&tmp)).await,
            "leftovers in tmp after start-up"
        );
        assert!(!d.pool().join("dst").exists());
        assert!(!private(&d, "volumes/dst.json").exists());
        assert_eq!(listed_ids(&mut d.c).await, ["src"]);
        assert!(listed_snapshot_ids(&mut d.c).await.is_empty());
        assert!(
            settles(|| is_empty_dir(&snapshots)).await,
            "a half-built snapshot survived the restart"
        );
    }
    assert!(d.log().contains("removed leftover"));

    // The retries succeed and copy everything.
    create_ok(&mut d.c, clone_of(block_volume("dst", 2 * GIB), "src")).await;
    snapshot_ok(&mut d.c, "snap", "src").await;
    let a = File::open(&src).unwrap();
    let mut buf_a = vec![0u8; 16 << 20];
    let mut buf_b = vec![0u8; 16 << 20];
    for other in [d.pool().join("dst"), snapshots.join("snap/data")] {
        let b = File::open(&other).unwrap();
        assert_eq!(b.metadata().unwrap().len(), 2 * GIB as u64);
        let mut off = 0u64;
        while off < 2 * GIB as u64 {
            a.read_exact_at(&mut buf_a, off).unwrap();
            b.read_exact_at(&mut buf_b, off).unwrap();
            assert!(buf_a == buf_b, "{} differs at {off}", other.display());
            off += buf_a.len() as u64;
        }
    }
    // Copies over 1 GiB report progress in the log.
    let log = d.log();
    assert!(
        log.contains("copy progress") && log.contains("mb_per_s"),
        "no progress in the log"
    );
}

#[tokio::test]
async fn enospc_fails_with_resource_exhausted_and_leaves_the_pool_as_it_was() {
    let fs = LoopFs::new("ext4", 400);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, block_volume("blk", 100 * MIB)).await;
    write_dense(&d.pool().join("blk"), 100 * UMIB);
    create_ok(&mut d.c, dir_volume("tree", GIB / 4)).await;
    for i in 0..25 {
        let p = d.pool().join(format!("tree/f{i}"));
        File::create(&p).unwrap().set_len(4 * UMIB).unwrap();
        write_dense(&p, 4 * UMIB);
    }
    // Another volume full of data takes all but ~50 MiB.
    create_ok(&mut d.c, dir_volume("filler", GIB / 4)).await;
    let filler = d.pool().join("filler/data");
    let f = File::create(&filler).unwrap();
    nix::unistd::sync();
    let keep = 50 * UMIB;
    let fill = free_bytes(d.pool()).saturating_sub(keep);
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, fill as i64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let tree_before = tree(d.pool());
    let free_before = free_bytes(d.pool());
    assert!(free_before < 100 * UMIB);

    let attempts: Vec<(&str, CreateVolumeRequest)> = vec![
        (
            "block clone",
            clone_of(block_volume("c1", 100 * MIB), "blk"),
        ),
        ("tree clone", clone_of(dir_volume("c2", GIB / 4), "tree")),
        (
            "block to disk.img",
            clone_of(dir_volume("c3", GIB / 4), "blk"),
        ),
    ];
    for (what, req) in attempts {
        let r = d.c.controller.create_volume(req).await;
        assert_eq!(code(&r), Code::ResourceExhausted, "{what}: {r:?}");
        let pool = d.pool().to_path_buf();
        let settled = settles(|| {
            nix::unistd::sync();
            tree(&pool) == tree_before && near(free_bytes(&pool), free_before, UMIB)
        })
        .await;
        assert_eq!(tree(d.pool()), tree_before, "{what} left something behind");
        assert!(
            settled,
            "{what}: free space {} -> {}",
            free_before,
            free_bytes(d.pool())
        );
    }
    for source in ["blk", "tree"] {
        let r =
            d.c.controller
                .create_snapshot(snapshot_req(&format!("s-{source}"), source))
                .await;
        assert_eq!(
            code(&r),
            Code::ResourceExhausted,
            "snapshot of {source}: {r:?}"
        );
        nix::unistd::sync();
        assert_eq!(
            tree(d.pool()),
            tree_before,
            "snapshot of {source} left something behind"
        );
        assert!(near(free_bytes(d.pool()), free_before, UMIB));
    }
    assert!(listed_snapshot_ids(&mut d.c).await.is_empty());
    assert_eq!(listed_ids(&mut d.c).await, ["blk", "filler", "tree"]);
    // With space back, the same requests succeed.
    fs::remove_file(&filler).unwrap();
    create_ok(&mut d.c, clone_of(block_volume("c1", 100 * MIB), "blk")).await;
    assert_eq!(digest(&d.pool().join("c1")), digest(&d.pool().join("blk")));
}

/// A snapshot or clone of a published image volume includes what the pod
/// wrote but did not flush: the driver syncs the mounted filesystem first.
#[tokio::test]
async fn copies_of_a_published_image_include_unflushed_writes() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, image_volume("img", 320 * MIB, "")).await;
    let (_, m) = mount_rwo(&mut d, "img").await;
    fs::write(m.join("note"), b"written, not flushed").unwrap();
    snapshot_ok(&mut d.c, "s", "img").await;
    create_ok(
        &mut d.c,
        restore_of(image_volume("from-snap", 320 * MIB, ""), "s"),
    )
    .await;
    fs::write(m.join("later"), b"also unflushed").unwrap();
    create_ok(
        &mut d.c,
        clone_of(image_volume("from-clone", 320 * MIB, ""), "img"),
    )
    .await;
    for (id, file, want) in [
        ("from-snap", "note", &b"written, not flushed"[..]),
        ("from-clone", "later", &b"also unflushed"[..]),
    ] {
        let (_, copy) = mount_rwo(&mut d, id).await;
        assert_eq!(fs::read(copy.join(file)).unwrap(), want, "{id}");
        unpublish_unstage(&mut d.c, id, &copy).await;
    }
    unpublish_unstage(&mut d.c, "img", &m).await;
}

/// True when the filesystem at `mount_point` is frozen (a second FIFREEZE
/// is EBUSY).
fn is_frozen(mount_point: &Path) -> bool {
    let dir = fs::File::open(mount_point).unwrap();
    // SAFETY: FIFREEZE takes no argument.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            0xC004_5877u64 as _,
            0,
        )
    };
    if r == 0 {
        // It was not frozen: undo ours.
        // SAFETY: FITHAW takes no argument.
        unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                0xC004_5878u64 as _,
                0,
            )
        };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY)
}

/// A group journal an interrupted run left names a mount point it froze.
/// Recovery thaws it only if the filesystem mounted there is the one the
/// journal recorded (by device): one frozen by someone else, or a journal
/// without a device, is left frozen.
#[tokio::test]
async fn recovery_thaws_only_the_filesystem_it_recorded_as_frozen() {
    let mut d = Driver::start().await;
    let theirs = LoopFs::new("xfs", 320);
    let ours = LoopFs::new("xfs", 320);
    let _a = FreezeGuard::freeze(&theirs.mount_point);
    let _b = FreezeGuard::freeze(&ours.mount_point);
    let dev = |p: &Path| fs::metadata(p).unwrap().dev();
    d.kill9();
    let groups = d.pool().join(".hostpath-csi/snapshots/.groups");
    fs::create_dir_all(&groups).unwrap();
    let journal = |id: &str, at: &Path, devs: Option<Vec<u64>>| {
        let mut j = serde_json::json!({
            "id": id, "frozen": [at], "members": [], "instance": "earlier",
        });
        if let Some(devs) = devs {
            j["frozen_devs"] = serde_json::json!(devs);
        }
        fs::write(groups.join(format!(".pending-{id}.json")), j.to_string()).unwrap();
    };
    journal("no-dev", &theirs.mount_point, None);
    journal(
        "other-dev",
        &theirs.mount_point,
        Some(vec![dev(&ours.mount_point)]),
    );
    journal(
        "ours",
        &ours.mount_point,
        Some(vec![dev(&ours.mount_point)]),
    );
    d.restart().await;
    assert!(
        is_frozen(&theirs.mount_point),
        "a filesystem someone else froze was thawed"
    );
    assert!(
        !is_frozen(&ours.mount_point),
        "the filesystem the journal recorded stayed frozen"
    );
}
