//! File operations relative to an open directory, never following a
//! symlink: the building blocks for touching trees a tenant controls and
//! for the driver's own metadata.
//!
//! Everything here takes a directory descriptor and a single name (or a
//! path resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so
//! a name swapped for a symlink between two calls is never followed.

use std::ffi::CStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};

/// Flags for opening a directory found inside a tree: never a symlink,
/// never blocking (a FIFO swapped in cannot hang us).
pub const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NONBLOCK);

/// Opens the directory `name` inside `dir` without following a symlink.
pub fn open_dir_at<P: ?Sized + nix::NixPath>(dir: impl AsFd, name: &P) -> nix::Result<OwnedFd> {
    openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// openat2 settings that keep a lookup inside the directory and its mount,
/// following no symlink.
fn beneath(flags: OFlag) -> nix::fcntl::OpenHow {
    use nix::fcntl::{OpenHow, ResolveFlag};
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        )
}

/// Opens `rel` below `dir`: no symlink anywhere on the way, no `..` out of
/// `dir`, no crossing into another mount. Kernels without openat2 (before
/// 5.6) get the same guarantees component by component.
pub fn open_beneath(dir: BorrowedFd, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = beneath(flags);
    match nix::fcntl::openat2(dir, rel, how) {
        Err(Errno::ENOSYS) => open_by_components(dir, rel, flags),
        other => other,
    }
}

/// Opens the entry `name` of `dir` without leaving `dir`'s mount: a name
/// with another filesystem mounted on it is EXDEV, and that filesystem is
/// never asked anything on the way (a tenant's hung FUSE or NFS mount
/// cannot block the caller). No symlink is followed.
pub fn open_entry<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd,
    name: &P,
    flags: OFlag,
) -> nix::Result<OwnedFd> {
    let how = beneath(flags);
    match nix::fcntl::openat2(dir, name, how) {
        // Before 5.6: the mount check is left to the caller (by device).
        Err(Errno::ENOSYS) => openat(
            dir,
            name,
            flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ),
        other => other,
    }
}

/// What the entry `name` of `dir` is (a symlink itself, not its target),
/// asked of `dir`'s filesystem only: EXDEV when another filesystem is
/// mounted on it.
pub fn stat_entry<P: ?Sized + nix::NixPath>(dir: BorrowedFd, name: &P) -> nix::Result<FileStat> {
    fstat(open_entry(dir, name, OFlag::O_PATH)?)
}

fn open_by_components(dir: BorrowedFd, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    use std::path::Component;
    let parts: Vec<_> = rel.components().collect();
    let Some((last, walk)) = parts.split_last() else {
        return openat(dir, ".", flags | OFlag::O_CLOEXEC, Mode::empty());
    };
    let dev = fstat(dir)?.st_dev;
    let mut current: Option<OwnedFd> = None;
    for part in walk {
        let Component::Normal(name) = part else {
            return Err(Errno::EXDEV);
        };
        let at = current.as_ref().map_or(dir, |f| f.as_fd());
        let next = open_dir_at(at, *name)?;
        if fstat(&next)?.st_dev != dev {
            return Err(Errno::EXDEV);
        }
        current = Some(next);
    }
    let Component::Normal(name) = last else {
        return Err(Errno::EXDEV);
    };
    let at = current.as_ref().map_or(dir, |f| f.as_fd());
    openat(
        at,
        *name,
        flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

/// The names in a directory (UTF-8 ones; `.` and `..` left out). For the
/// driver's own small directories, never for a tenant's tree.
pub fn entry_names(dir: BorrowedFd) -> Vec<String> {
    let Ok(listing) = nix::dir::Dir::openat(dir, ".", DIR_FLAGS, Mode::empty()) else {
        return Vec::new();
    };
    listing
        .into_iter()
        .flatten()
        .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
        .filter(|n| n != "." && n != "..")
        .collect()
}

/// True when the stat is of the given file type.
pub fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// The mount an open file is on (statx STATX_MNT_ID, Linux 5.8+); `None`
/// where the kernel cannot say.
pub fn mount_id(fd: BorrowedFd) -> Option<u64> {
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: an empty C string with AT_EMPTY_PATH stats the descriptor itself.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            buf.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded and filled the buffer.
    let st = unsafe { buf.assume_init() };
    (st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id)
}

/// Where an open directory lives: its device and mount. Two directories
/// with different places are on different filesystems or mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub dev: u64,
    pub mount: Option<u64>,
}

impl Place {
    pub fn of(fd: BorrowedFd) -> nix::Result<Place> {
        Ok(Place {
            dev: fstat(fd)?.st_dev,
            mount: mount_id(fd),
        })
    }
}

const FS_IMMUTABLE_FL: libc::c_int = 0x10;
const FS_APPEND_FL: libc::c_int = 0x20;
nix::ioctl_read_bad!(fs_ioc_getflags, libc::FS_IOC_GETFLAGS, libc::c_int);
nix::ioctl_write_ptr_bad!(fs_ioc_setflags, libc::FS_IOC_SETFLAGS, libc::c_int);

/// Clears `chattr +i` and `+a` on an open file or directory, so it (or its
/// entries) can be removed. True when a flag was cleared. Filesystems
/// without flags (ENOTTY, EOPNOTSUPP) have nothing to clear.
pub fn clear_protection(fd: BorrowedFd) -> nix::Result<bool> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int.
    match unsafe { fs_ioc_getflags(fd.as_raw_fd(), &mut flags) } {
        Ok(_) => {}
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => return Ok(false),
        Err(e) => return Err(e),
    }
    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) == 0 {
        return Ok(false);
    }
    let cleared = flags & !(FS_IMMUTABLE_FL | FS_APPEND_FL);
    // SAFETY: FS_IOC_SETFLAGS reads one int.
    unsafe { fs_ioc_setflags(fd.as_raw_fd(), &cleared) }?;
    Ok(true)
}

/// Clears the protection flags of the regular file or directory `name` in
/// `dir`. Other file types cannot carry them and are never opened (opening
/// a device node can act on the device).
pub fn clear_protection_at(dir: BorrowedFd, name: &CStr) -> nix::Result<bool> {
    let st = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if !(is_kind(&st, SFlag::S_IFREG) || is_kind(&st, SFlag::S_IFDIR)) {
        return Ok(false);
    }
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    clear_protection(fd.as_fd())
}

/// Reads a small regular file `name` in `dir`: never a symlink, never a
/// FIFO or device (opened non-blocking and checked), never more than
/// `max_len` bytes. `Ok(None)` when there is no such entry.
pub fn read_small_file(
    dir: BorrowedFd,
    name: &CStr,
    max_len: u64,
) -> Result<Option<Vec<u8>>, ReadError> {
    let fd = match openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => return Err(ReadError::NotRegular("a symlink")),
        Err(Errno::EISDIR) => return Err(ReadError::NotRegular("a directory")),
        Err(Errno::ENXIO) => return Err(ReadError::NotRegular("a socket or FIFO")),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let st = fstat(&fd).map_err(ReadError::Io)?;
    if !is_kind(&st, SFlag::S_IFREG) {
        return Err(ReadError::NotRegular("not a regular file"));
    }
    if st.st_size as u64 > max_len {
        return Err(ReadError::TooLarge(st.st_size as u64));
    }
    let mut bytes = Vec::with_capacity(st.st_size as usize);
    std::io::Read::read_to_end(&mut File::from(fd).take(max_len + 1), &mut bytes)
        .map_err(|e| ReadError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    Ok(Some(bytes))
}

/// Why a small file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("it is {0}")]
    NotRegular(&'static str),
    #[error("it is {0} bytes, too large")]
    TooLarge(u64),
    #[error("{0}")]
    Io(Errno),
}

use std::io::Read as _;

/// This process among all that ever served the node's pools: names of
/// temporary entries carry it, so recovery removes only those of earlier
/// processes (a PID alone repeats: it is 1 in every container).
pub fn instance_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}{:x}", std::process::id(), nanos)
    })
}

/// Marks the names of temporary files `write_durably` makes.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Writes `bytes` to `name` in `dir` so that after a crash the file is
/// either its old or its new self, and the new one is on disk when this
/// returns: temp file, fsync, rename over, fsync of the directory.
pub fn write_durably(dir: BorrowedFd, name: &str, bytes: &[u8]) -> nix::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = format!(
        ".{name}.{}.{}{TEMP_SUFFIX}",
        instance_tag(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let mut file = File::from(fd);
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
    drop(file);
    let renamed = written.and_then(|()| nix::fcntl::renameat(dir, tmp.as_str(), dir, name));
    if let Err(e) = renamed {
        let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    nix::unistd::fsync(dir)
}

/// Removes `name` from `dir` and makes the removal durable; a missing
/// entry is fine.
pub fn remove_durably(dir: BorrowedFd, name: &str) -> nix::Result<()> {
    match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => nix::unistd::fsync(dir),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_refuse_links_fifos_dirs_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("ok"), b"{}").unwrap();
        std::os::unix::fs::symlink("ok", dir.path().join("link")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; 100]).unwrap();
        let read = |n: &CStr| read_small_file(d.as_fd(), n, 64);
        assert_eq!(read(c"ok").unwrap().unwrap(), b"{}");
        assert!(read(c"missing").unwrap().is_none());
        for bad in [c"link", c"fifo", c"dir", c"big"] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durable_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        write_durably(d.as_fd(), "m.json", b"one").unwrap();
        write_durably(d.as_fd(), "m.json", b"two!").unwrap();
        assert_eq!(std::fs::read(dir.path().join("m.json")).unwrap(), b"two!");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
        remove_durably(d.as_fd(), "m.json").unwrap();
        remove_durably(d.as_fd(), "m.json").unwrap();
    }

    #[test]
    fn beneath_refuses_symlinks_and_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("a/link")).unwrap();
        let d = File::open(dir.path()).unwrap();
        assert!(open_beneath(d.as_fd(), Path::new("a/b"), OFlag::O_RDONLY).is_ok());
        assert!(open_beneath(d.as_fd(), Path::new("a/link/passwd"), OFlag::O_RDONLY).is_err());
        assert!(open_beneath(d.as_fd(), Path::new("../x"), OFlag::O_RDONLY).is_err());
        assert!(open_by_components(d.as_fd(), Path::new("a/link"), OFlag::O_RDONLY).is_err());
        assert!(open_by_components(d.as_fd(), Path::new("a/b"), OFlag::O_RDONLY).is_ok());
    }
}
