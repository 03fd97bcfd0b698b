//! Mounts: bind mounts, read-only remounts, unmounts, and mountinfo queries.
//! What is mounted where is always read from the kernel.

use std::ffi::OsString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use sys_mount::{Mount, MountFlags, UnmountFlags};

use crate::error::{CoreError, CoreResult, IoContext};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub major: u32,
    pub minor: u32,
    /// Path inside the source filesystem that is mounted (bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountInfo {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Parses the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 3 {
                return None;
            }
            let (major, minor) = l[2].split_once(':')?;
            Some(MountInfo {
                id: l[0].parse().ok()?,
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: unescape(l[3]),
                mount_point: unescape(l[4]),
                options: l[5].split(',').map(str::to_owned).collect(),
                fs_type: r[0].to_owned(),
                source: unescape(r[1]).to_string_lossy().into_owned(),
                super_options: r[2].split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// All mounts of this process's mount namespace.
pub fn mounts() -> CoreResult<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context(|| "read mountinfo".into())?;
    Ok(parse_mountinfo(&text))
}

/// What is mounted at `path`, from the kernel without reading mountinfo:
/// `None` when `path` is no mount point, else the stat of the topmost
/// mount's root (a directory's device and inode, or a device node).
pub fn mounted_at(path: &Path) -> CoreResult<Option<nix::sys::stat::FileStat>> {
    if !is_mount_point(path)? {
        return Ok(None);
    }
    match nix::sys::stat::fstatat(
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => Ok(Some(st)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(CoreError::io(format!("stat {}", path.display()), e.into())),
    }
}

/// The options of the mount at `path` that a publish compares (`ro`,
/// `nosuid`, ...), from statvfs.
pub fn visible_options(path: &Path) -> CoreResult<Vec<&'static str>> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path).context(|| format!("statvfs {}", path.display()))?;
    let f = st.flags();
    Ok([
        (FsFlags::ST_RDONLY, "ro"),
        (FsFlags::ST_NOSUID, "nosuid"),
        (FsFlags::ST_NODEV, "nodev"),
        (FsFlags::ST_NOEXEC, "noexec"),
        (FsFlags::ST_NOATIME, "noatime"),
    ]
    .into_iter()
    .filter(|(flag, _)| f.contains(*flag))
    .map(|(_, name)| name)
    .collect())
}

/// The topmost mount at exactly `path` among `mounts`, if any.
pub fn topmost<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> CoreResult<Option<MountInfo>> {
    if statx_mount_root(path) == Some(false) {
        return Ok(None);
    }
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

pub fn is_mount_point(path: &Path) -> CoreResult<bool> {
    match statx_mount_root(path) {
        Some(answer) => Ok(answer),
        None => Ok(mount_at(path)?.is_some()),
    }
}

/// Asks the kernel whether `path` is the root of a mount (statx
/// STATX_ATTR_MOUNT_ROOT) without reading mountinfo; a missing path is not
/// a mount point. `None` when the kernel cannot tell.
fn statx_mount_root(path: &Path) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: valid C string and a buffer of the right type.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            libc::STATX_TYPE,
            buf.as_mut_ptr(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return (err.raw_os_error() == Some(libc::ENOENT)).then_some(false);
    }
    // SAFETY: statx succeeded and filled the buffer.
    let st = unsafe { buf.assume_init() };
    let attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    (st.stx_attributes_mask & attr != 0).then_some(st.stx_attributes & attr != 0)
}

/// True when `a` and `b` are on one filesystem: the same device number, or
/// mounts of the same block device (btrfs subvolumes have their own numbers).
pub fn same_filesystem(a: &Path, b: &Path) -> bool {
    let (Ok(sa), Ok(sb)) = (fs::metadata(a), fs::metadata(b)) else {
        return false;
    };
    if sa.dev() == sb.dev() {
        return true;
    }
    let Ok(all) = mounts() else {
        return false;
    };
    let source = |path: &Path, dev: u64| {
        containing_mount(&all, path, dev).filter(|m| m.source.starts_with("/dev/"))
    };
    match (source(a, sa.dev()), source(b, sb.dev())) {
        (Some(ma), Some(mb)) => ma.source == mb.source,
        _ => false,
    }
}

/// The mount that holds `path` (as `findmnt -T`): the deepest mount point
/// above it whose device is the path's.
fn containing_mount<'a>(all: &'a [MountInfo], path: &Path, dev: u64) -> Option<&'a MountInfo> {
    let path = fs::canonicalize(path).ok()?;
    let (major, minor) = (
        nix::sys::stat::major(dev) as u32,
        nix::sys::stat::minor(dev) as u32,
    );
    all.iter()
        .filter(|m| m.major == major && m.minor == minor && path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

/// Filesystem type name of the filesystem holding `path`, from statfs.
pub fn fs_type_of(path: &Path) -> Option<String> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    let magic = st.filesystem_type().0 as u64;
    Some(
        match magic {
            0x5846_5342 => "xfs",
            0xEF53 => "ext4",
            0x0102_1994 => "tmpfs",
            0x9123_683E => "btrfs",
            0x794C_7630 => "overlay",
            0x2FC1_2FC1 => "zfs",
            other => return Some(format!("0x{other:x}")),
        }
        .to_owned(),
    )
}

/// Options a CO may pass in `mount_flags` for a bind mount.
fn flag_for_option(option: &str) -> Option<MsFlags> {
    Some(match option {
        "ro" => MsFlags::MS_RDONLY,
        "rw" | "defaults" | "bind" => MsFlags::empty(),
        "nosuid" => MsFlags::MS_NOSUID,
        "nodev" => MsFlags::MS_NODEV,
        "noexec" => MsFlags::MS_NOEXEC,
        "noatime" => MsFlags::MS_NOATIME,
        "nodiratime" => MsFlags::MS_NODIRATIME,
        "relatime" => MsFlags::MS_RELATIME,
        "sync" => MsFlags::MS_SYNCHRONOUS,
        _ => return None,
    })
}

/// Turns `mount_flags` into flags, refusing what a bind mount cannot honour.
pub fn parse_mount_flags(options: &[String]) -> CoreResult<MsFlags> {
    let mut flags = MsFlags::empty();
    for option in options {
        for part in option.split(',').filter(|p| !p.is_empty()) {
            flags |= flag_for_option(part).ok_or_else(|| {
                CoreError::invalid(
                    "mount_flags",
                    part,
                    "supported: ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime, sync",
                )
            })?;
        }
    }
    Ok(flags)
}

/// The mount options that `flags` show in mountinfo, to compare publishes.
pub fn flags_visible(flags: MsFlags) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (f, name) in [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
        (MsFlags::MS_NOATIME, "noatime"),
    ] {
        if flags.contains(f) {
            v.push(name);
        }
    }
    v
}

/// Bind-mounts `source` onto `target`, then applies `flags` (e.g. read-only)
/// with a remount, as the kernel ignores them on the first bind call.
/// `source` is opened without following a final symlink and mounted through
/// its descriptor, so a swapped path cannot redirect the mount.
pub fn bind_mount(source: &Path, target: &Path, flags: MsFlags) -> CoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let handle = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(source)
        .context(|| format!("open {}", source.display()))?;
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    Mount::builder()
        .fstype("none")
        .flags(MountFlags::BIND)
        .mount(&via_fd, target)
        .context(|| format!("bind mount {} on {}", source.display(), target.display()))?;
    let extra = flags & !MsFlags::MS_BIND;
    if !extra.is_empty() {
        let remount = nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra,
            None::<&str>,
        );
        if let Err(e) = remount {
            let _ = unmount(target);
            return Err(CoreError::io(
                format!(
                    "remount {} with {:?}",
                    target.display(),
                    flags_visible(extra)
                ),
                e.into(),
            ));
        }
    }
    Ok(())
}

/// Mounts a block device holding a filesystem.
pub fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: MsFlags,
    data: &str,
) -> CoreResult<()> {
    nix::mount::mount(
        Some(device),
        target,
        Some(fs_type),
        flags,
        if data.is_empty() { None } else { Some(data) },
    )
    .context(|| {
        format!(
            "mount {} ({fs_type}) on {}",
            device.display(),
            target.display()
        )
    })
}

/// How long an unmount waits for a process to close what it holds open
/// under the mount (a pod's last reader going away, a short-lived probe).
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Unmounts `target` once. A mount still in use is retried for a short
/// while; past that it is `MountBusy` (never a lazy unmount: the caller
/// must not be told a device is free while something writes to it).
pub fn unmount(target: &Path) -> CoreResult<()> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match sys_mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if std::time::Instant::now() >= deadline {
                    return Err(CoreError::MountBusy {
                        path: target.to_owned(),
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(CoreError::io(format!("unmount {}", target.display()), e)),
        }
    }
}

/// Unmounts every mount stacked on `target`; no mount there is fine.
pub fn unmount_all(target: &Path) -> CoreResult<()> {
    for _ in 0..64 {
        if !is_mount_point(target)? {
            return Ok(());
        }
        match unmount(target) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(CoreError::Internal(format!(
        "{} still mounted after 64 unmounts",
        target.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:5 /loop3 /t/x ro,nosuid - devtmpfs udev rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt two"));
        assert_eq!((m[0].major, m[0].minor), (98, 0));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(m[1].read_only());
        assert_eq!(m[1].root, PathBuf::from("/loop3"));
    }

    #[test]
    fn mount_flags_are_checked() {
        assert_eq!(
            parse_mount_flags(&["ro,noexec".into()]).unwrap(),
            MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC
        );
        assert!(parse_mount_flags(&["uid=5".into()]).is_err());
    }
}
