//! Loop devices through raw ioctls: attach (LOOP_CONFIGURE, direct I/O),
//! find by backing file, resize, detach, and which mounts use them. All
//! knowledge of loop devices (their major, `/dev/loopN`) lives here.
//!
//! The kernel is the only record of which device backs which file. A
//! backing file is identified by its device and inode numbers, never by
//! the path the kernel kept: that is the path as the attaching process saw
//! it, which a restarted driver in another container may not see. An
//! index from file to devices, built from one scan and kept by attach and
//! detach, spares each lookup a scan of every device; each hit is checked
//! against the kernel before use.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult, IoContext};
use crate::mount::MountInfo;

/// The block major number of loop devices.
pub const LOOP_MAJOR: u32 = 7;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_write_ptr_bad!(loop_set_status64, 0x4C04, LoopInfo64);
nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
nix::ioctl_write_int_bad!(loop_set_direct_io, 0x4C08);
nix::ioctl_write_int_bad!(loop_set_block_size, 0x4C09);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

const LOOP_CONTROL: &str = "/dev/loop-control";

fn open_loop_control(path: &Path) -> CoreResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                CoreError::NotPossibleHere(format!(
                    "loop devices are unavailable on this node ({e} opening {}): Block and image volumes need the loop module and a privileged driver",
                    path.display()
                ))
            }
            _ => CoreError::io(format!("open {}", path.display()), e),
        })
}

/// Checks that this node can attach loop devices at all, so a Block or
/// image volume is refused at CreateVolume rather than at publish.
pub fn check_loop_support() -> CoreResult<()> {
    open_loop_control(Path::new(LOOP_CONTROL)).map(drop)
}

/// How to attach a file.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    pub read_only: bool,
    pub direct_io: bool,
    pub block_size: u32,
}

/// A backing file, by device and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The file at `path` (not following a final symlink); `None` when absent.
    pub fn of_path(path: &Path) -> CoreResult<Option<FileId>> {
        match fs::symlink_metadata(path) {
            Ok(st) => Ok(Some(FileId {
                dev: st.dev(),
                ino: st.ino(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CoreError::io(format!("stat {}", path.display()), e)),
        }
    }
}

/// A loop device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub number: u32,
    /// As the attaching process named it (for messages only).
    pub backing_file: PathBuf,
    pub file: FileId,
    pub read_only: bool,
    /// Detach requested while open: it goes away at the last close.
    pub autoclear: bool,
    /// Attached by this driver (its name carries `OWN_TAG`), or handed to
    /// it by a mount it undid (see `claim`). Others' devices on a volume
    /// file are never reused or detached.
    pub ours: bool,
}

/// The start of the name (`lo_file_name`, seen only through
/// LOOP_GET_STATUS64) of every loop device this driver attaches. sysfs and
/// `losetup -l` still show the real backing file.
const OWN_TAG: &[u8] = b"hostpath-csi:";

/// Untagged devices this driver took over from its own mounts (attached by
/// a version before the tag): (device number, backing file).
static CLAIMED: Mutex<BTreeSet<(u32, u64, u64)>> = Mutex::new(BTreeSet::new());

/// Marks device `n` on `file` as this driver's: a mount of ours used it.
pub fn claim(n: u32, file: FileId) {
    CLAIMED.lock().unwrap().insert((n, file.dev, file.ino));
}

fn claimed(n: u32, file: FileId) -> bool {
    CLAIMED.lock().unwrap().contains(&(n, file.dev, file.ino))
}

/// The name a device of ours carries: the tag, then as much of the end of
/// the path as fits.
fn own_name(file: &Path) -> [u8; LO_NAME_SIZE] {
    let mut out = [0u8; LO_NAME_SIZE];
    let path = file.as_os_str().as_encoded_bytes();
    let room = LO_NAME_SIZE - 1 - OWN_TAG.len();
    let tail = &path[path.len().saturating_sub(room)..];
    out[..OWN_TAG.len()].copy_from_slice(OWN_TAG);
    out[OWN_TAG.len()..OWN_TAG.len() + tail.len()].copy_from_slice(tail);
    out
}

/// The device node path of loop device `n`.
pub fn device_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

/// Files to their loop devices; `None` until the first lookup scans.
static INDEX: Mutex<Option<HashMap<FileId, BTreeSet<u32>>>> = Mutex::new(None);

fn scan_all() -> HashMap<FileId, BTreeSet<u32>> {
    let mut map: HashMap<FileId, BTreeSet<u32>> = HashMap::new();
    for dev in list_attached() {
        map.entry(dev.file).or_default().insert(dev.number);
    }
    map
}

fn index_note(file: FileId, n: u32, present: bool) {
    let mut index = INDEX.lock().unwrap();
    let Some(map) = index.as_mut() else { return };
    if present {
        map.entry(file).or_default().insert(n);
    } else if let Some(set) = map.get_mut(&file) {
        set.remove(&n);
        if set.is_empty() {
            map.remove(&file);
        }
    }
}

/// Forgets the index, so the next lookup scans every device again (after
/// a restart, or when devices may have been attached by someone else).
pub fn rescan() {
    *INDEX.lock().unwrap() = Some(scan_all());
}

/// Every device backing `file` (a read-only and a read-write publish of
/// one volume use two), each checked against the kernel.
pub fn devices_of(file: FileId) -> Vec<LoopDevice> {
    let candidates: Vec<u32> = {
        let mut index = INDEX.lock().unwrap();
        let map = index.get_or_insert_with(scan_all);
        map.get(&file)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for n in candidates {
        match attached(n).filter(|d| d.file == file) {
            Some(d) => out.push(d),
            None => index_note(file, n, false),
        }
    }
    out
}

/// Opens `/dev/loopN`, creating the node when the kernel made the device but
/// this mount namespace's /dev lacks it (as in some containers).
fn open_device(n: u32, write: bool) -> CoreResult<File> {
    let path = device_path(n);
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dev = nix::sys::stat::makedev(LOOP_MAJOR as u64, n as u64);
            let _ = nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                dev,
            );
            open().context(|| format!("open {}", path.display()))
        }
        other => other.context(|| format!("open {}", path.display())),
    }
}

/// Every attached loop device, from sysfs.
pub fn list_attached() -> Vec<LoopDevice> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(number) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        out.extend(attached(number));
    }
    out.sort_by_key(|d| d.number);
    out
}

/// Every device backing the file at `path`, by its device and inode.
pub fn find_attached_devices(path: &Path) -> CoreResult<Vec<LoopDevice>> {
    Ok(FileId::of_path(path)?.map(devices_of).unwrap_or_default())
}

/// The backing file path sysfs shows for device `n`, reading nothing else
/// (opening the device would itself hold off a pending detach).
fn sysfs_backing(n: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// The device with this number, from its sysfs entry and one status
/// ioctl; `None` when nothing is attached to it.
pub fn attached(number: u32) -> Option<LoopDevice> {
    let dir = PathBuf::from(format!("/sys/block/loop{number}"));
    let backing = fs::read_to_string(dir.join("loop/backing_file")).ok()?;
    let info = status(number).ok()?;
    let flag = |name: &str| fs::read_to_string(dir.join(name)).is_ok_and(|v| v.trim() == "1");
    let file = FileId {
        dev: info.lo_device,
        ino: info.lo_inode,
    };
    Some(LoopDevice {
        path: device_path(number),
        number,
        backing_file: PathBuf::from(backing.trim_end_matches('\n')),
        file,
        read_only: flag("ro"),
        autoclear: flag("loop/autoclear"),
        ours: info.lo_file_name.starts_with(OWN_TAG) || claimed(number, file),
    })
}

fn status(n: u32) -> CoreResult<LoopInfo64> {
    let dev = open_device(n, false)?;
    let mut info = zeroed_info();
    // SAFETY: the fd is a loop device and `info` is a properly sized buffer.
    unsafe { loop_get_status64(dev.as_raw_fd(), &mut info) }
        .context(|| format!("LOOP_GET_STATUS64 on loop{n}"))?;
    Ok(info)
}

/// Attaches `file` to a free loop device; retries when another process takes
/// the device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
pub fn attach(file: &Path, opts: AttachOptions) -> CoreResult<LoopDevice> {
    attach_via(file, opts, false)
}

/// As `attach`, but through LOOP_SET_FD and friends, the only way on
/// kernels before 5.8 (RHEL 8's 4.18 among them): lets tests cover that path.
pub fn attach_legacy(file: &Path, opts: AttachOptions) -> CoreResult<LoopDevice> {
    attach_via(file, opts, true)
}

fn attach_via(file: &Path, opts: AttachOptions, legacy_only: bool) -> CoreResult<LoopDevice> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(file)
        .context(|| format!("open {}", file.display()))?;
    let st = backing
        .metadata()
        .context(|| format!("stat {}", file.display()))?;
    let file_id = FileId {
        dev: st.dev(),
        ino: st.ino(),
    };
    let control = open_loop_control(Path::new(LOOP_CONTROL))?;
    let mut direct_io = opts.direct_io;
    let mut legacy = legacy_only;
    for _attempt in 0..256 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .context(|| "LOOP_CTL_GET_FREE".into())? as u32;
        let dev = match open_device(n, true) {
            Ok(dev) => dev,
            // Removed by someone else since GET_FREE.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENOENT)) => {
                continue
            }
            Err(e) => return Err(e),
        };
        let mut info = zeroed_info();
        info.lo_flags = if opts.read_only {
            LO_FLAGS_READ_ONLY
        } else {
            0
        } | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
        info.lo_file_name = own_name(file);
        let result = if legacy {
            configure_legacy(&dev, &backing, &info, opts.block_size, direct_io)
                .map(|dio| direct_io = dio)
        } else {
            let config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: opts.block_size,
                info,
                reserved: [0; 8],
            };
            // SAFETY: `config` is a valid loop_config for the duration of the call.
            unsafe { loop_configure(dev.as_raw_fd(), &config) }.map(drop)
        };
        match result {
            Ok(()) => {
                // The kernel may quietly fall back to buffered I/O.
                let direct_io = fs::read_to_string(format!("/sys/block/loop{n}/loop/dio"))
                    .map_or(direct_io, |v| v.trim() == "1");
                tracing::info!(device = %device_path(n).display(), file = %file.display(), direct_io, read_only = opts.read_only, "loop device attached");
                index_note(file_id, n, true);
                forget_binds_of(n);
                return Ok(LoopDevice {
                    path: device_path(n),
                    number: n,
                    backing_file: file.to_path_buf(),
                    file: file_id,
                    read_only: opts.read_only,
                    autoclear: false,
                    ours: true,
                });
            }
            Err(nix::errno::Errno::EBUSY) => continue,
            Err(nix::errno::Errno::EINVAL) if direct_io && !legacy => {
                // The backing filesystem cannot do direct I/O at this alignment.
                direct_io = false;
                continue;
            }
            // Kernels before 5.8 have no LOOP_CONFIGURE.
            Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) if !legacy => {
                legacy = true;
                direct_io = opts.direct_io;
                continue;
            }
            Err(e) => {
                return Err(CoreError::io(
                    format!("configure loop{n} for {}", file.display()),
                    e.into(),
                ))
            }
        }
    }
    Err(CoreError::NotPossibleHere(
        "could not claim a free loop device after 256 attempts".into(),
    ))
}

/// LOOP_SET_FD and friends, for kernels without LOOP_CONFIGURE. Returns
/// whether direct I/O is on.
fn configure_legacy(
    dev: &File,
    backing: &File,
    info: &LoopInfo64,
    block_size: u32,
    direct_io: bool,
) -> nix::Result<bool> {
    let fd = dev.as_raw_fd();
    // SAFETY: plain integer and pointer ioctls on a loop device fd.
    unsafe { loop_set_fd(fd, backing.as_raw_fd()) }?;
    let rest = (|| {
        let mut info = *info;
        info.lo_flags &= !(LO_FLAGS_READ_ONLY | LO_FLAGS_DIRECT_IO);
        // SAFETY: `info` is a valid loop_info64.
        unsafe { loop_set_status64(fd, &info) }?;
        // SAFETY: integer argument.
        unsafe { loop_set_block_size(fd, block_size as libc::c_int) }?;
        // SAFETY: integer argument; failure only means buffered I/O.
        Ok(direct_io && unsafe { loop_set_direct_io(fd, 1) }.is_ok())
    })();
    if rest.is_err() {
        // SAFETY: no argument.
        let _ = unsafe { loop_clr_fd(fd) };
    }
    rest
}

/// Detaches a loop device. The kernel defers it while the device is open.
fn detach(device: &LoopDevice) -> CoreResult<()> {
    let dev = open_device(device.number, false)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    match unsafe { loop_clr_fd(dev.as_raw_fd()) } {
        Ok(_) | Err(nix::errno::Errno::ENXIO) => {
            tracing::info!(device = %device.path.display(), file = %device.backing_file.display(), "loop device detached");
            Ok(())
        }
        Err(e) => Err(CoreError::io(
            format!("LOOP_CLR_FD {}", device.path.display()),
            e.into(),
        )),
    }
}

/// Waits until `device` no longer backs its file. The kernel defers a detach
/// while anyone holds the device open (udev, blkid, another tool's scan), so
/// this polls sysfs, never opening the device itself. True once it is gone.
pub fn wait_detached(device: &LoopDevice, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // The detach usually completes as the last fd closes: poll soon, then
    // back off (this runs under the publish lock).
    let mut pause = Duration::from_micros(100);
    loop {
        let gone = sysfs_backing(device.number).is_none_or(|f| f != device.backing_file);
        if gone {
            index_note(device.file, device.number, false);
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(device = %device.path.display(), "loop device still held open; its detach stays pending");
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Detaches `device` and waits (bounded) for the kernel to finish.
pub fn detach_and_wait(device: &LoopDevice, timeout: Duration) -> CoreResult<bool> {
    detach(device)?;
    Ok(wait_detached(device, timeout))
}

/// Makes an attached device pick up its backing file's new size.
pub fn refresh_capacity(device: &LoopDevice) -> CoreResult<()> {
    let dev = open_device(device.number, false)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    unsafe { loop_set_capacity(dev.as_raw_fd()) }
        .context(|| format!("LOOP_SET_CAPACITY {}", device.path.display()))?;
    Ok(())
}

/// Size in bytes of a block device.
pub fn device_size(path: &Path) -> CoreResult<u64> {
    let mut f = File::open(path).context(|| format!("open {}", path.display()))?;
    f.seek(SeekFrom::End(0))
        .context(|| format!("size of {}", path.display()))
}

/// The loop device whose node a mount binds (a published Block volume):
/// a bind from devtmpfs (or a tmpfs /dev) of the node `loopN`.
pub fn bound_loop(m: &MountInfo) -> Option<u32> {
    if !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") {
        return None;
    }
    m.root
        .file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

/// The loop device whose node a stat describes (the root of a published
/// Block volume's bind mount).
pub fn node_of(st: &nix::sys::stat::FileStat) -> Option<u32> {
    let is_block = st.st_mode & libc::S_IFMT == libc::S_IFBLK;
    let major = nix::sys::stat::major(st.st_rdev) as u32;
    (is_block && major == LOOP_MAJOR).then(|| nix::sys::stat::minor(st.st_rdev) as u32)
}

/// The loop device a mounted filesystem whose root stats as `st` sits on.
pub fn filesystem_of(st: &nix::sys::stat::FileStat) -> Option<u32> {
    (nix::sys::stat::major(st.st_dev) as u32 == LOOP_MAJOR)
        .then(|| nix::sys::stat::minor(st.st_dev) as u32)
}

/// The loop device a filesystem mount sits on.
pub fn mounted_loop(m: &MountInfo) -> Option<u32> {
    (m.major == LOOP_MAJOR).then_some(m.minor)
}

/// Where each loop device's node is bind-mounted (published Block volumes),
/// and for which backing file each bind was made: read from mountinfo
/// once, then kept by `note_bind` and `drop_bind`, so a publish or
/// unpublish does not read mountinfo (a millisecond of kernel time per
/// read with hundreds of mounts). A bind made for another file is not this
/// file's: a loop device's number is reused after a detach, and a stale
/// bind of the old device must not keep the new one in use.
type Binds = HashMap<u32, HashMap<PathBuf, Option<FileId>>>;
static BINDS: Mutex<Option<Binds>> = Mutex::new(None);

fn with_binds<T>(work: impl FnOnce(&mut Binds) -> T) -> CoreResult<T> {
    let mut binds = BINDS.lock().unwrap();
    if binds.is_none() {
        let mut map: Binds = HashMap::new();
        for m in crate::mount::mounts()? {
            if let Some(n) = bound_loop(&m) {
                let file = attached(n).map(|d| d.file);
                map.entry(n).or_default().insert(m.mount_point, file);
            }
        }
        *binds = Some(map);
    }
    Ok(work(binds.as_mut().expect("just filled")))
}

/// Reads the binds from mountinfo now (at start-up, before this process
/// attaches anything), so every bind found is tied to the file its device
/// backs at that moment.
pub fn load_binds() -> CoreResult<()> {
    with_binds(|_| ())
}

/// A device freshly attached: binds of its node that exist already were
/// made for an earlier user of the number and are none of the new file's.
fn forget_binds_of(n: u32) {
    if let Some(map) = BINDS.lock().unwrap().as_mut() {
        if let Some(set) = map.get_mut(&n) {
            for file in set.values_mut() {
                *file = None;
            }
        }
    }
}

/// Records that device `n`'s node is now bind-mounted at `target` for `file`.
pub fn note_bind(n: u32, target: &Path, file: FileId) -> CoreResult<()> {
    with_binds(|b| {
        b.entry(n)
            .or_default()
            .insert(target.to_path_buf(), Some(file));
    })
}

/// The binds of device `n` made for `file` that the kernel still shows
/// (one stat each); stale ones are forgotten.
fn live_binds(n: u32, file: FileId) -> CoreResult<Vec<PathBuf>> {
    let known: Vec<PathBuf> = with_binds(|b| {
        b.get(&n)
            .map(|set| {
                set.iter()
                    .filter(|(_, f)| **f == Some(file))
                    .map(|(t, _)| t.clone())
                    .collect()
            })
            .unwrap_or_default()
    })?;
    let (live, gone): (Vec<PathBuf>, Vec<PathBuf>) = known.into_iter().partition(
        |t| matches!(crate::mount::mounted_at(t), Ok(Some(st)) if node_of(&st) == Some(n)),
    );
    with_binds(|b| {
        if let Some(set) = b.get_mut(&n) {
            for t in &gone {
                set.remove(t);
            }
            if set.is_empty() {
                b.remove(&n);
            }
        }
    })?;
    Ok(live)
}

/// Records that the bind of device `n` at `target` is gone; true when no
/// other bind of it for `file` remains.
pub fn drop_bind(n: u32, target: &Path, file: FileId) -> CoreResult<bool> {
    with_binds(|b| {
        if let Some(set) = b.get_mut(&n) {
            set.remove(target);
        }
    })?;
    Ok(live_binds(n, file)?.is_empty())
}

/// True when device `n` (backing `file`) is used: a filesystem on it (from
/// `mounts`), or a live bind of its node made for `file`.
pub fn in_use_for(mounts: &[MountInfo], n: u32, file: FileId) -> CoreResult<bool> {
    if mounts.iter().any(|m| mounted_loop(m) == Some(n)) {
        return Ok(true);
    }
    Ok(!live_binds(n, file)?.is_empty())
}

/// True when one of `mounts` uses device `n`: a filesystem on it, or its
/// node bind-mounted somewhere.
pub fn used_by(mounts: &[MountInfo], n: u32) -> bool {
    mounts
        .iter()
        .any(|m| mounted_loop(m) == Some(n) || bound_loop(m) == Some(n))
}

/// True when some mount uses the device: a filesystem on it, or its node
/// bind-mounted somewhere (a published Block volume).
pub fn is_in_use(device: &LoopDevice) -> CoreResult<bool> {
    Ok(used_by(&crate::mount::mounts()?, device.number))
}

/// Allocates every byte of `path` up to `len`: fallocate, or zeroes written
/// into the holes where the filesystem cannot fallocate. Data is untouched.
///
/// `reachable` is how many bytes from the start a current user of the file
/// (a published volume's loop device) can write. Zeroes are never written
/// there: a write racing ours would be lost. A hole below it, on a
/// filesystem without fallocate, makes this `NotPossibleHere`, before
/// anything is written.
pub fn preallocate(path: &Path, len: u64, reachable: u64) -> CoreResult<()> {
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .context(|| format!("open {}", path.display()))?;
    match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len as i64) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {}
        Err(e) => {
            return Err(CoreError::io(
                format!("allocate {}", path.display()),
                e.into(),
            ));
        }
    }
    let holes = holes_below(&file, len).context(|| format!("find holes in {}", path.display()))?;
    if holes.iter().any(|&(at, _)| at < reachable) {
        return Err(CoreError::NotPossibleHere(format!(
            "the filesystem under {} cannot allocate in place (no fallocate), and the file is in use:              zeroes cannot be written under a running user; preallocate it while it is not published",
            path.display()
        )));
    }
    fill_with_zeroes(&file, &holes).context(|| format!("allocate {}", path.display()))
}

/// The holes of `file` below `len`, as (start, end) ranges.
fn holes_below(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut holes = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        let hole = match nix::unistd::lseek(file, offset as i64, nix::unistd::Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(_) => offset,
        };
        if hole >= len {
            break;
        }
        let data = match nix::unistd::lseek(file, hole as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => (d as u64).min(len),
            Err(_) => len,
        };
        holes.push((hole, data));
        offset = data;
    }
    Ok(holes)
}

fn fill_with_zeroes(file: &File, holes: &[(u64, u64)]) -> std::io::Result<()> {
    let zeroes = vec![0u8; 1 << 20];
    let mut writer = file;
    for &(start, end) in holes {
        writer.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(zeroes.len());
            writer.write_all(&zeroes[..n])?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_loop_control_is_a_failed_precondition_that_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_loop_control(&dir.path().join("loop-control")).unwrap_err();
        assert!(
            matches!(&e, CoreError::NotPossibleHere(m) if m.contains("loop")),
            "{e}"
        );
    }
}
