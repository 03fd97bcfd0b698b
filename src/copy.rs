//! The clone engine. Files: FICLONE (reflink) first, then copy_file_range
//! over data extents only (holes stay holes), then read/write over data
//! extents. Trees keep modes, owners, times, symlinks, hard links and xattrs.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{lseek, Whence};

use crate::error::{CoreError, CoreResult, IoContext};

/// CDI's name for the VM disk inside a Filesystem-mode volume.
pub const DISK_IMAGE: &str = "disk.img";

const GIB: u64 = 1 << 30;

nix::ioctl_write_int_bad!(ficlone, 0x4004_9409);

/// How a file was copied (reported in logs and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    CopyFileRange,
    ReadWrite,
}

/// Copies `src` into the existing file `dst`, replacing its contents.
pub fn copy_file_into(src: &Path, dst: &Path) -> CoreResult<Method> {
    let from = open_nofollow(src, false)?;
    let to = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .context(|| format!("open {}", dst.display()))?;
    copy_open_files(&from, &to, src, dst)
}

/// Copies `src` to a new file `dst` (mode 0660).
pub fn copy_file_new(src: &Path, dst: &Path) -> CoreResult<Method> {
    let from = open_nofollow(src, false)?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o660)
        .custom_flags(libc::O_CLOEXEC)
        .open(dst)
        .context(|| format!("create {}", dst.display()))?;
    copy_open_files(&from, &to, src, dst)
}

fn open_nofollow(path: &Path, write: bool) -> CoreResult<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .context(|| format!("open {}", path.display()))
}

fn copy_open_files(from: &File, to: &File, src: &Path, dst: &Path) -> CoreResult<Method> {
    let len = from
        .metadata()
        .context(|| format!("stat {}", src.display()))?
        .len();
    // SAFETY: FICLONE takes the source descriptor as its argument.
    if unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd()) }.is_ok() {
        tracing::debug!(src = %src.display(), dst = %dst.display(), "reflinked");
        return Ok(Method::Reflink);
    }
    to.set_len(0)
        .context(|| format!("truncate {}", dst.display()))?;
    to.set_len(len)
        .context(|| format!("size {}", dst.display()))?;
    let started = Instant::now();
    let mut progress = Progress::new(src, len, started);
    let mut method = Method::CopyFileRange;
    let mut offset: i64 = 0;
    while (offset as u64) < len {
        let data = match lseek(from, offset, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => {
                return Err(CoreError::io(
                    format!("SEEK_DATA in {}", src.display()),
                    e.into(),
                ))
            }
        };
        let hole = lseek(from, data, Whence::SeekHole)
            .context(|| format!("SEEK_HOLE in {}", src.display()))?
            .min(len as i64);
        copy_range(from, to, data, hole, &mut method, &mut progress)
            .context(|| format!("copy {} to {}", src.display(), dst.display()))?;
        offset = hole;
    }
    if len >= GIB {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        tracing::info!(src = %src.display(), bytes = progress.copied, mb_per_s = progress.copied as f64 / 1e6 / secs, ?method, "copy finished");
    }
    Ok(method)
}

struct Progress<'a> {
    src: &'a Path,
    total: u64,
    copied: u64,
    started: Instant,
    next_report: u64,
}

impl<'a> Progress<'a> {
    fn new(src: &'a Path, total: u64, started: Instant) -> Self {
        Progress {
            src,
            total,
            copied: 0,
            started,
            next_report: GIB,
        }
    }

    fn add(&mut self, n: u64) {
        self.copied += n;
        if self.total >= GIB && self.copied >= self.next_report {
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(src = %self.src.display(), bytes_done = self.copied, mb_per_s = self.copied as f64 / 1e6 / secs, "copy progress");
            self.next_report += GIB;
        }
    }
}

/// Copies bytes `[start, end)`; falls back to read/write when the kernel
/// cannot copy_file_range between these files.
fn copy_range(
    from: &File,
    to: &File,
    start: i64,
    end: i64,
    method: &mut Method,
    progress: &mut Progress,
) -> std::io::Result<()> {
    let mut off_in = start;
    let mut off_out = start;
    while off_in < end {
        let want = ((end - off_in) as usize).min(1 << 30);
        if *method == Method::CopyFileRange {
            match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)
            {
                Ok(0) => break,
                Ok(n) => {
                    progress.add(n as u64);
                    continue;
                }
                Err(nix::errno::Errno::EXDEV)
                | Err(nix::errno::Errno::EINVAL)
                | Err(nix::errno::Errno::ENOSYS)
                | Err(nix::errno::Errno::EOPNOTSUPP) => *method = Method::ReadWrite,
                Err(e) => return Err(e.into()),
            }
        }
        let mut buf = vec![0u8; want.min(4 << 20)];
        let n = nix::sys::uio::pread(from, &mut buf, off_in)?;
        if n == 0 {
            break;
        }
        let mut written = 0;
        while written < n {
            written += nix::sys::uio::pwrite(to, &buf[written..n], off_out + written as i64)?;
        }
        off_in += n as i64;
        off_out += n as i64;
        progress.add(n as u64);
    }
    Ok(())
}

/// Copies the contents of directory `src` into the existing directory `dst`.
/// Symlinks are copied as links and never followed; nothing outside the two
/// roots is read or written.
pub fn copy_tree_contents(src: &Path, dst: &Path) -> CoreResult<()> {
    let top = fs::symlink_metadata(src).context(|| format!("stat {}", src.display()))?;
    if !top.is_dir() {
        return Err(CoreError::InvalidArgument(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let mut links: HashMap<(u64, u64), std::path::PathBuf> = HashMap::new();
    copy_dir_entries(src, dst, top.dev(), &mut links)?;
    copy_attributes(src, dst, &top)
}

fn copy_dir_entries(
    src: &Path,
    dst: &Path,
    dev: u64,
    links: &mut HashMap<(u64, u64), std::path::PathBuf>,
) -> CoreResult<()> {
    for entry in fs::read_dir(src).context(|| format!("list {}", src.display()))? {
        let entry = entry.context(|| format!("list {}", src.display()))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let st = fs::symlink_metadata(&from).context(|| format!("stat {}", from.display()))?;
        let ft = st.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).context(|| format!("create {}", to.display()))?;
            if st.dev() == dev {
                copy_dir_entries(&from, &to, dev, links)?;
            }
            copy_attributes(&from, &to, &st)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).context(|| format!("readlink {}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .context(|| format!("symlink {}", to.display()))?;
            copy_attributes(&from, &to, &st)?;
        } else if ft.is_file() {
            if st.nlink() > 1 {
                if let Some(first) = links.get(&(st.dev(), st.ino())) {
                    fs::hard_link(first, &to).context(|| format!("link {}", to.display()))?;
                    continue;
                }
                links.insert((st.dev(), st.ino()), to.clone());
            }
            copy_file_new(&from, &to)?;
            copy_attributes(&from, &to, &st)?;
        } else {
            // Device nodes, FIFOs and sockets are recreated, not read.
            nix::sys::stat::mknod(
                &to,
                nix::sys::stat::SFlag::from_bits_truncate(st.mode() & libc::S_IFMT),
                nix::sys::stat::Mode::from_bits_truncate(st.mode() & 0o7777),
                st.rdev(),
            )
            .context(|| format!("mknod {}", to.display()))?;
            copy_attributes(&from, &to, &st)?;
        }
    }
    Ok(())
}

/// Owner, mode, xattrs and times, without following symlinks.
fn copy_attributes(from: &Path, to: &Path, st: &fs::Metadata) -> CoreResult<()> {
    let is_link = st.file_type().is_symlink();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        to,
        Some(nix::unistd::Uid::from_raw(st.uid())),
        Some(nix::unistd::Gid::from_raw(st.gid())),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .context(|| format!("chown {}", to.display()))?;
    if !is_link {
        fs::set_permissions(to, fs::Permissions::from_mode(st.mode() & 0o7777))
            .context(|| format!("chmod {}", to.display()))?;
    }
    copy_xattrs(from, to)?;
    let atime = TimeSpec::new(st.atime(), st.atime_nsec());
    let mtime = TimeSpec::new(st.mtime(), st.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .context(|| format!("set times of {}", to.display()))
}

fn cpath(p: &Path) -> CoreResult<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| CoreError::InvalidArgument(format!("{} holds a NUL byte", p.display())))
}

fn copy_xattrs(from: &Path, to: &Path) -> CoreResult<()> {
    let (cfrom, cto) = (cpath(from)?, cpath(to)?);
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffers are valid for the lengths passed.
    let n = unsafe { libc::llistxattr(cfrom.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Ok(());
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                cfrom.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        // SAFETY: as above.
        let rc = unsafe {
            libc::lsetxattr(
                cto.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                len as usize,
                0,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // Some namespaces (e.g. security.*) may be refused; user data is not.
            if name.starts_with(b"user.") {
                return Err(CoreError::io(format!("set xattr on {}", to.display()), err));
            }
            tracing::debug!(path = %to.display(), error = %err, "xattr not copied");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy_file_new(&src, &dst).unwrap();
        let a = fs::read(&src).unwrap();
        let b = fs::read(&dst).unwrap();
        assert_eq!(a, b);
        let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "holes were filled: {blocks} bytes allocated"
        );
    }
}
