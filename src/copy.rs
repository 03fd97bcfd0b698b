//! The clone engine. Files: FICLONE (reflink) first, then copy_file_range
//! over data extents only (holes stay holes), then read/write over data
//! extents. Trees keep modes, owners, times, symlinks, hard links and xattrs.
//!
//! A source may be in use while it is copied: a clone of a busy volume is
//! crash-consistent at best, and its owner may even swap parts of it for
//! symlinks or FIFOs mid-copy. So trees are walked by descriptor (openat,
//! O_NOFOLLOW), files are type-checked before they are opened for reading,
//! and the copy never reads or writes outside the source and target roots.
//!
//! When a copy returns, its data has been written back (not flushed): the
//! journal commit that later makes the new volume visible can then never
//! reach the disk ahead of the data, so a power cut cannot expose a
//! half-copied clone. Reflinks are journaled and need no such wait.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::dir::{Dir, OwningIter};
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, mkdirat, mknodat, FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{lseek, Whence};

use crate::dirfd::{self, Place};
use crate::error::{CoreError, CoreResult, IoContext};

/// CDI's name for the VM disk inside a Filesystem-mode volume.
pub const DISK_IMAGE: &str = "disk.img";

/// Deepest directory tree copied. Each level holds two descriptors, so a
/// deeper tree is refused instead of failing half-way on EMFILE.
pub const MAX_TREE_DEPTH: usize = 2048;

const GIB: u64 = 1 << 30;
/// Data is copied in pieces of this size (progress is counted per piece).
const CHUNK: i64 = 64 << 20;
/// Buffer of the read/write fallback.
const RW_BUFFER: usize = 4 << 20;
/// Copied files of a tree whose writeback runs while later ones are copied.
const WRITEBACK_WINDOW: usize = 64;

nix::ioctl_write_int_bad!(ficlone, 0x4004_9409);

/// How a file was copied (reported in logs and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    CopyFileRange,
    ReadWrite,
}

/// Opens `path` for reading if it is a regular file, without following a
/// symlink and without opening anything else (a FIFO would block, a device
/// could act on open). `None` when it is missing or not a regular file.
pub fn open_regular(path: &Path) -> CoreResult<Option<File>> {
    match open_regular_at(AT_FDCWD, path) {
        Err(Errno::EWOULDBLOCK) => Err(CoreError::Unsettled {
            what: path.to_path_buf(),
        }),
        other => other.context(|| format!("open {}", path.display())),
    }
}

/// Copies `src` into the existing file `dst`, replacing its contents.
pub fn copy_file_into(src: &Path, dst: &Path) -> CoreResult<Method> {
    let from = open_regular(src)?.ok_or_else(|| not_regular(src))?;
    copy_open_into(&from, src, dst)
}

/// Copies the open file `from` (read from `label`) into the existing file `dst`.
pub fn copy_open_into(from: &File, label: &Path, dst: &Path) -> CoreResult<Method> {
    let to = nix::fcntl::open(
        dst,
        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context(|| format!("open {}", dst.display()))?;
    let to = File::from(to);
    let mut progress = Progress::new(label);
    let method = copy_data(from, &to, label, dst, &mut progress)?;
    if method != Method::Reflink {
        wait_writeback(&to, dst)?;
    }
    progress.finish();
    Ok(method)
}

/// Copies `src` to a new file `dst` (mode 0660).
pub fn copy_file_new(src: &Path, dst: &Path) -> CoreResult<Method> {
    let from = open_regular(src)?.ok_or_else(|| not_regular(src))?;
    let to = create_new(dst)?;
    let mut progress = Progress::new(src);
    let method = copy_data(&from, &to, src, dst, &mut progress)?;
    if method != Method::Reflink {
        wait_writeback(&to, dst)?;
    }
    progress.finish();
    Ok(method)
}

/// Reflinks `src` to a new file `dst`, or fails: never a data copy (for
/// snapshots taken while a filesystem is frozen).
pub fn reflink_file_new(src: &Path, dst: &Path) -> CoreResult<()> {
    let from = open_regular(src)?.ok_or_else(|| not_regular(src))?;
    let to = create_new(dst)?;
    if reflink(&from, &to) {
        return Ok(());
    }
    Err(CoreError::NotPossibleHere(format!(
        "{} cannot be reflinked here, and a data copy is not taken while its filesystem is frozen",
        src.display()
    )))
}

/// Creates the new file `dst` (mode 0660) for writing; never an existing
/// entry, never through a symlink.
fn create_new(dst: &Path) -> CoreResult<File> {
    nix::fcntl::open(
        dst,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o660),
    )
    .map(File::from)
    .context(|| format!("create {}", dst.display()))
}

/// Starts writeback of a whole file without waiting for it.
fn start_writeback(file: &File) {
    // SAFETY: plain syscall on a valid descriptor; a failure shows in the wait.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Writes a file's dirty data back and waits for it (no cache flush: the
/// caller's sync does that once for the whole volume).
fn wait_writeback(file: &File, label: &Path) -> CoreResult<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(CoreError::io(
            format!("write back {}", label.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn not_regular(path: &Path) -> CoreError {
    CoreError::Unacceptable(format!("{} is not a regular file", path.display()))
}

/// Reflinks the whole of `from` into `to` (FICLONE); false where the
/// filesystem cannot.
pub fn reflink(from: &File, to: &File) -> bool {
    // SAFETY: FICLONE takes the source descriptor as its argument.
    unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd()) }.is_ok()
}

/// See `open_regular`; `name` is looked up in `dir` without following links.
fn open_regular_at<P: ?Sized + nix::NixPath>(
    dir: impl AsFd,
    name: &P,
) -> nix::Result<Option<File>> {
    // O_PATH opens nothing: it only names the inode, which is then checked
    // and reopened through /proc for reading.
    let handle = match openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !is_kind(&fstat(&handle)?, SFlag::S_IFREG) {
        return Ok(None);
    }
    reopen(&handle).map(Some)
}

/// Opens the regular file behind an O_PATH descriptor for reading.
/// Non-blocking: a tenant's file lease (F_SETLEASE) makes the open fail
/// with EWOULDBLOCK instead of stalling the copy for the lease break time.
fn reopen(handle: &OwnedFd) -> nix::Result<File> {
    let proc = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    // O_NOATIME keeps the source's access times; only the owner or root may ask.
    match nix::fcntl::open(proc.as_str(), flags | OFlag::O_NOATIME, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::EPERM) => nix::fcntl::open(proc.as_str(), flags, Mode::empty()).map(File::from),
        Err(e) => Err(e),
    }
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// Bytes copied so far; logged every GiB and at the end of big copies.
struct Progress<'a> {
    src: &'a Path,
    copied: u64,
    reflinked: u64,
    started: Instant,
    next_report: u64,
}

impl<'a> Progress<'a> {
    fn new(src: &'a Path) -> Self {
        Progress {
            src,
            copied: 0,
            reflinked: 0,
            started: Instant::now(),
            next_report: GIB,
        }
    }

    fn mb_per_s(&self) -> f64 {
        self.copied as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn add(&mut self, n: u64) {
        self.copied += n;
        if self.copied >= self.next_report {
            tracing::info!(src = %self.src.display(), bytes_done = self.copied, mb_per_s = self.mb_per_s(), "copy progress");
            self.next_report += GIB;
        }
    }

    /// Logs a summary of copies of a GiB or more (bytes copied and reflinked).
    fn finish(&self) {
        if self.copied + self.reflinked >= GIB {
            tracing::info!(src = %self.src.display(), bytes = self.copied, reflinked = self.reflinked, mb_per_s = self.mb_per_s(), secs = self.started.elapsed().as_secs_f64(), "copy finished");
        }
    }
}

/// Copies the whole of `from` into `to`, reflinking when the filesystem can.
fn copy_data(
    from: &File,
    to: &File,
    src: &Path,
    dst: &Path,
    progress: &mut Progress,
) -> CoreResult<Method> {
    let len = from
        .metadata()
        .context(|| format!("stat {}", src.display()))?
        .len();
    // SAFETY: FICLONE takes the source descriptor as its argument.
    if unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd()) }.is_ok() {
        progress.reflinked += len;
        return Ok(Method::Reflink);
    }
    to.set_len(0)
        .context(|| format!("truncate {}", dst.display()))?;
    to.set_len(len)
        .context(|| format!("size {}", dst.display()))?;
    // The source is read once, front to back: a larger readahead window.
    let _ = nix::fcntl::posix_fadvise(
        from,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
    );
    let what = || format!("copy {} to {}", src.display(), dst.display());
    let mut method = Method::CopyFileRange;
    let mut buf = Vec::new();
    let mut offset: i64 = 0;
    while (offset as u64) < len {
        let data = match lseek(from, offset, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break,
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
        let mut pos = data;
        while pos < hole {
            let end = (pos + CHUNK).min(hole);
            copy_range(from, to, pos, end, &mut method, &mut buf).context(what)?;
            progress.add((end - pos) as u64);
            pos = end;
        }
        offset = hole;
    }
    Ok(method)
}

/// Copies bytes `[start, end)`; falls back to read/write when the kernel
/// cannot copy_file_range between these files. A source that shrinks
/// under the copy ends it early.
fn copy_range(
    from: &File,
    to: &File,
    start: i64,
    end: i64,
    method: &mut Method,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut off_in = start;
    let mut off_out = start;
    while off_in < end {
        let want = (end - off_in) as usize;
        if *method == Method::CopyFileRange {
            match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)
            {
                Ok(0) => return Ok(()),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::EXDEV)
                | Err(Errno::EINVAL)
                | Err(Errno::ENOSYS)
                | Err(Errno::EOPNOTSUPP) => *method = Method::ReadWrite,
                Err(e) => return Err(e.into()),
            }
        }
        if buf.is_empty() {
            buf.resize(RW_BUFFER, 0);
        }
        let n = want.min(buf.len());
        let got = match nix::sys::uio::pread(from, &mut buf[..n], off_in) {
            Ok(0) => return Ok(()),
            Ok(got) => got,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut written = 0;
        while written < got {
            match nix::sys::uio::pwrite(to, &buf[written..got], off_in + written as i64) {
                Ok(w) => written += w,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        off_in += got as i64;
        off_out = off_in;
    }
    Ok(())
}

/// One directory being copied: its source (whose entries stream from the
/// same descriptor, so memory does not grow with the directory) and target.
struct Level {
    entries: OwningIter,
    dst: OwnedFd,
    st: FileStat,
    /// Where it is below the roots (for messages and hard links).
    rel: Rel,
    /// Where the source directory lives: entries elsewhere are mounts.
    place: Place,
}

impl Level {
    fn src(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `entries` and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.entries.as_raw_fd()) }
    }

    /// The next entry name other than `.` and `..`.
    fn next_name(&mut self) -> nix::Result<Option<CString>> {
        for entry in self.entries.by_ref() {
            let name = entry?.file_name().to_owned();
            if name.as_bytes() != b"." && name.as_bytes() != b".." {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }
}

/// A path below the roots as a chain of names shared between levels, so a
/// deep tree costs one name per level, not one whole path per level.
#[derive(Clone, Default)]
struct Rel(Option<std::rc::Rc<(CString, Rel)>>);

impl Rel {
    fn child(&self, name: &CStr) -> Rel {
        Rel(Some(std::rc::Rc::new((name.to_owned(), self.clone()))))
    }

    fn to_path(&self) -> PathBuf {
        let mut names = Vec::new();
        let mut at = self;
        while let Some(node) = &at.0 {
            names.push(OsStr::from_bytes(node.0.to_bytes()));
            at = &node.1;
        }
        names.iter().rev().collect()
    }
}

/// Bytes of paths kept to recreate hard links; past it, further links are
/// copied as separate files (a tenant's millions of links cannot take
/// the driver's memory).
const LINKS_BUDGET: usize = 16 << 20;

/// What an attempt to copy one entry found.
enum Step {
    /// Copied (or vanished); `Some` is a directory to descend into.
    Done(Option<Box<Level>>),
    /// The entry changed type under the copy: look again.
    Changed,
}

struct TreeCopy<'a> {
    src_root: &'a Path,
    dst_root: OwnedFd,
    /// First copy of each multiply-linked source inode, below the target root.
    links: HashMap<(u64, u64), PathBuf>,
    /// Bytes of the paths in `links`.
    links_bytes: usize,
    progress: Progress<'a>,
    /// Copied (not reflinked) files whose writeback was started, oldest first.
    writeback: VecDeque<(File, PathBuf)>,
}

/// Copies the contents of directory `src` into the existing directory `dst`
/// (and `src`'s owner, mode, xattrs and times onto `dst`). The walk is
/// iterative and by descriptor, so neither depth nor path length can crash
/// it, and a symlink swapped in mid-copy is copied as a link, not followed.
pub fn copy_tree_contents(src: &Path, dst: &Path) -> CoreResult<()> {
    raise_fd_limit();
    let open_dir = |p: &Path| {
        nix::fcntl::open(
            p,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    let src_fd = open_dir(src).map_err(|e| match e {
        Errno::ENOTDIR | Errno::ELOOP => {
            CoreError::Unacceptable(format!("{} is not a directory", src.display()))
        }
        e => CoreError::io(format!("open {}", src.display()), e.into()),
    })?;
    let dst_fd = open_dir(dst).context(|| format!("open {}", dst.display()))?;
    let st = fstat(&src_fd).context(|| format!("stat {}", src.display()))?;
    let place = Place::of(src_fd.as_fd()).context(|| format!("stat {}", src.display()))?;
    let mut walk = TreeCopy {
        src_root: src,
        dst_root: dst_fd
            .try_clone()
            .context(|| format!("dup {}", dst.display()))?,
        links: HashMap::new(),
        links_bytes: 0,
        progress: Progress::new(src),
        writeback: VecDeque::new(),
    };
    let entries = Dir::from_fd(src_fd)
        .context(|| format!("list {}", src.display()))?
        .into_iter();
    let mut stack = vec![Level {
        entries,
        dst: dst_fd,
        st,
        rel: Rel::default(),
        place,
    }];
    while let Some(top) = stack.last_mut() {
        let next = top
            .next_name()
            .context(|| format!("list {}", src.join(top.rel.to_path()).display()))?;
        let Some(name) = next else {
            let done = stack.pop().expect("stack is not empty");
            walk.finish_dir(&done)?;
            continue;
        };
        if let Some(child) = walk.copy_entry(top, &name)? {
            if stack.len() >= MAX_TREE_DEPTH {
                return Err(CoreError::NotPossibleHere(format!(
                    "{} is more than {MAX_TREE_DEPTH} directories deep; such a tree is not cloned",
                    src.display()
                )));
            }
            stack.push(child);
        }
    }
    while let Some((file, label)) = walk.writeback.pop_front() {
        wait_writeback(&file, &label)?;
    }
    walk.progress.finish();
    Ok(())
}

impl TreeCopy<'_> {
    fn label(&self, parent: &Level, name: &CStr) -> PathBuf {
        self.src_root
            .join(parent.rel.to_path())
            .join(OsStr::from_bytes(name.to_bytes()))
    }

    fn copy_entry(&mut self, parent: &Level, name: &CStr) -> CoreResult<Option<Level>> {
        for _ in 0..8 {
            let st = match dirfd::stat_entry(parent.src(), name) {
                Ok(st) => st,
                Err(Errno::ENOENT) => return Ok(None),
                // Another filesystem mounted inside: never asked anything
                // (it may hang); only the mount point is kept.
                Err(Errno::EXDEV) => {
                    mkdirat(&parent.dst, name, Mode::from_bits_truncate(0o755)).context(|| {
                        format!("create copy of {}", self.label(parent, name).display())
                    })?;
                    return Ok(None);
                }
                Err(e) => {
                    let path = self.label(parent, name);
                    return Err(CoreError::io(format!("stat {}", path.display()), e.into()));
                }
            };
            let step = if is_kind(&st, SFlag::S_IFDIR) {
                self.copy_dir(parent, name)?
            } else if is_kind(&st, SFlag::S_IFREG) {
                self.copy_file(parent, name)?
            } else if is_kind(&st, SFlag::S_IFLNK) {
                self.copy_symlink(parent, name, &st)?
            } else {
                self.copy_node(parent, name, &st)?
            };
            if let Step::Done(level) = step {
                return Ok(level.map(|l| *l));
            }
        }
        Err(CoreError::Unsettled {
            what: self.label(parent, name),
        })
    }

    fn copy_dir(&mut self, parent: &Level, name: &CStr) -> CoreResult<Step> {
        let label = || self.label(parent, name).display().to_string();
        let src = match dirfd::open_entry(
            parent.src(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NONBLOCK,
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Step::Done(None)),
            // Swapped for a symlink, a file or a mount since the stat.
            Err(Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => return Ok(Step::Changed),
            Err(e) => return Err(CoreError::io(format!("open {}", label()), e.into())),
        };
        let st = fstat(&src).context(|| format!("stat {}", label()))?;
        mkdirat(&parent.dst, name, Mode::from_bits_truncate(0o700))
            .context(|| format!("create copy of {}", label()))?;
        let dst = openat(
            &parent.dst,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .context(|| format!("open copy of {}", label()))?;
        let place = Place::of(src.as_fd()).context(|| format!("stat {}", label()))?;
        let level = Level {
            entries: Dir::from_fd(src)
                .context(|| format!("list {}", label()))?
                .into_iter(),
            rel: parent.rel.child(name),
            dst,
            st,
            place,
        };
        if place != parent.place {
            // Another mount inside the volume: keep only the mount point.
            self.finish_dir(&level)?;
            return Ok(Step::Done(None));
        }
        Ok(Step::Done(Some(Box::new(level))))
    }

    fn copy_file(&mut self, parent: &Level, name: &CStr) -> CoreResult<Step> {
        let label = self.label(parent, name);
        let handle = match dirfd::open_entry(parent.src(), name, OFlag::O_PATH) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Step::Done(None)),
            Err(Errno::EXDEV | Errno::ELOOP) => return Ok(Step::Changed),
            Err(e) => return Err(CoreError::io(format!("open {}", label.display()), e.into())),
        };
        let st = fstat(&handle).context(|| format!("stat {}", label.display()))?;
        if !is_kind(&st, SFlag::S_IFREG) {
            return Ok(Step::Changed);
        }
        let rel = parent.rel.child(name).to_path();
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                match nix::unistd::linkat(
                    &self.dst_root,
                    first,
                    &parent.dst,
                    name,
                    AtFlags::empty(),
                ) {
                    Ok(()) => return Ok(Step::Done(None)),
                    // The first copy lies deeper than a path can name: copy
                    // this one as a file of its own (the link is not kept).
                    Err(Errno::ENAMETOOLONG) => {}
                    Err(e) => {
                        return Err(CoreError::io(
                            format!("link copy of {}", label.display()),
                            e.into(),
                        ))
                    }
                }
            } else if rel.as_os_str().len() < libc::PATH_MAX as usize
                && self.links_bytes + rel.as_os_str().len() <= LINKS_BUDGET
            {
                self.links_bytes += rel.as_os_str().len();
                self.links.insert(key, rel.clone());
            }
        }
        let from = match reopen(&handle) {
            Ok(f) => f,
            // Leased by its owner: the copy cannot be consistent now.
            Err(Errno::EWOULDBLOCK) => return Err(CoreError::Unsettled { what: label }),
            Err(e) => return Err(CoreError::io(format!("open {}", label.display()), e.into())),
        };
        let to = openat(
            &parent.dst,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .context(|| format!("create copy of {}", label.display()))?;
        let to = File::from(to);
        let dst_label = Path::new("<target>").join(&rel);
        let method = copy_data(&from, &to, &label, &dst_label, &mut self.progress)?;
        apply_to_fd(from.as_fd(), to.as_fd(), &st, &label)?;
        if method != Method::Reflink && st.st_size > 0 {
            start_writeback(&to);
            self.writeback.push_back((to, dst_label));
            if self.writeback.len() > WRITEBACK_WINDOW {
                let (file, label) = self.writeback.pop_front().expect("window is not empty");
                wait_writeback(&file, &label)?;
            }
        }
        Ok(Step::Done(None))
    }

    fn copy_symlink(&mut self, parent: &Level, name: &CStr, st: &FileStat) -> CoreResult<Step> {
        let label = self.label(parent, name);
        let target = match readlinkat(parent.src(), name) {
            Ok(t) => t,
            Err(Errno::ENOENT) => return Ok(Step::Done(None)),
            Err(Errno::EINVAL) => return Ok(Step::Changed),
            Err(e) => {
                return Err(CoreError::io(
                    format!("readlink {}", label.display()),
                    e.into(),
                ))
            }
        };
        nix::unistd::symlinkat(target.as_os_str(), &parent.dst, name)
            .context(|| format!("create copy of {}", label.display()))?;
        apply_at(parent, name, st, true, &label)?;
        Ok(Step::Done(None))
    }

    /// FIFOs, sockets and device nodes are recreated, never opened.
    fn copy_node(&mut self, parent: &Level, name: &CStr, st: &FileStat) -> CoreResult<Step> {
        let label = self.label(parent, name);
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        mknodat(
            &parent.dst,
            name,
            kind,
            Mode::from_bits_truncate(0o600),
            st.st_rdev,
        )
        .context(|| format!("create copy of {}", label.display()))?;
        apply_at(parent, name, st, false, &label)?;
        Ok(Step::Done(None))
    }

    /// A directory's attributes go on after its entries (they change its mtime).
    fn finish_dir(&self, level: &Level) -> CoreResult<()> {
        let label = self.src_root.join(level.rel.to_path());
        apply_to_fd(level.src(), level.dst.as_fd(), &level.st, &label)
    }
}

/// Owner, mode, xattrs and times onto an open copy. chown comes first (it
/// clears set-id bits), times last.
fn apply_to_fd(from: BorrowedFd, to: BorrowedFd, st: &FileStat, label: &Path) -> CoreResult<()> {
    let what = || format!("copy attributes of {}", label.display());
    nix::unistd::fchown(
        to,
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
    )
    .context(what)?;
    nix::sys::stat::fchmod(to, Mode::from_bits_truncate(st.st_mode & 0o7777)).context(what)?;
    copy_xattrs(Xattrs::Fd(from), Xattrs::Fd(to), label)?;
    nix::sys::stat::futimens(to, &atime(st), &mtime(st)).context(what)
}

/// The same for an entry that is not opened (symlink or special file).
fn apply_at(
    parent: &Level,
    name: &CStr,
    st: &FileStat,
    is_link: bool,
    label: &Path,
) -> CoreResult<()> {
    let what = || format!("copy attributes of {}", label.display());
    nix::unistd::fchownat(
        &parent.dst,
        name,
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .context(what)?;
    if !is_link {
        // The target entry is the node just made, so following is safe.
        nix::sys::stat::fchmodat(
            &parent.dst,
            name,
            Mode::from_bits_truncate(st.st_mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .context(what)?;
    }
    // l*xattr through the directory descriptors' /proc names: no re-resolution
    // of the source path, and the final component is not followed.
    let (src, dst) = (
        proc_entry(parent.src(), name),
        proc_entry(parent.dst.as_fd(), name),
    );
    copy_xattrs(Xattrs::Link(&src), Xattrs::Link(&dst), label)?;
    nix::sys::stat::utimensat(
        &parent.dst,
        name,
        &atime(st),
        &mtime(st),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .context(what)
}

fn atime(st: &FileStat) -> TimeSpec {
    TimeSpec::new(st.st_atime, st.st_atime_nsec)
}

fn mtime(st: &FileStat) -> TimeSpec {
    TimeSpec::new(st.st_mtime, st.st_mtime_nsec)
}

fn proc_entry(dir: BorrowedFd, name: &CStr) -> CString {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    CString::new(path).expect("names hold no NUL")
}

/// Where extended attributes are read or written.
#[derive(Clone, Copy)]
enum Xattrs<'a> {
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed.
    Link(&'a CStr),
}

impl Xattrs<'_> {
    fn list(self, buf: &mut [u8]) -> isize {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: the buffer is valid for `len` bytes (a null, 0-length one asks the size).
        unsafe {
            match self {
                Xattrs::Fd(fd) => libc::flistxattr(fd.as_raw_fd(), ptr, len),
                Xattrs::Link(p) => libc::llistxattr(p.as_ptr(), ptr, len),
            }
        }
    }

    fn get(self, name: &CStr, buf: &mut [u8]) -> isize {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: as above.
        unsafe {
            match self {
                Xattrs::Fd(fd) => libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len),
                Xattrs::Link(p) => libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr, len),
            }
        }
    }

    fn set(self, name: &CStr, value: &[u8]) -> std::io::Result<()> {
        let (ptr, len) = (value.as_ptr().cast(), value.len());
        // SAFETY: the value is valid for `len` bytes.
        let rc = unsafe {
            match self {
                Xattrs::Fd(fd) => libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len, 0),
                Xattrs::Link(p) => libc::lsetxattr(p.as_ptr(), name.as_ptr(), ptr, len, 0),
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Calls `f` once for the size and once for the data; retries if it grew.
fn read_sized(mut f: impl FnMut(&mut [u8]) -> isize) -> std::io::Result<Vec<u8>> {
    loop {
        let size = f(&mut []);
        if size < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        let n = f(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
}

fn copy_xattrs(from: Xattrs, to: Xattrs, label: &Path) -> CoreResult<()> {
    let names = match read_sized(|buf| from.list(buf)) {
        Ok(names) => names,
        // No xattr support, or no /proc to name a symlink by.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOENT)) => {
            return Ok(())
        }
        Err(e) => {
            return Err(CoreError::io(
                format!("list xattrs of {}", label.display()),
                e,
            ))
        }
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        let value = match read_sized(|buf| from.get(&cname, buf)) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => {
                return Err(CoreError::io(
                    format!(
                        "read xattr {} of {}",
                        cname.to_string_lossy(),
                        label.display()
                    ),
                    e,
                ))
            }
        };
        if let Err(e) = to.set(&cname, &value) {
            // Some namespaces (e.g. security.*) may be refused; user data is not.
            if name.starts_with(b"user.") {
                return Err(CoreError::io(
                    format!(
                        "copy xattr {} of {}",
                        cname.to_string_lossy(),
                        label.display()
                    ),
                    e,
                ));
            }
            tracing::debug!(path = %label.display(), xattr = %cname.to_string_lossy(), error = %e, "xattr not copied");
        }
    }
    Ok(())
}

/// Deep trees need a descriptor per level on each side; lift the soft
/// limit to the hard one once (as the Go runtime does for every program).
fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

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

    #[test]
    fn fifos_and_symlinks_are_not_opened_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open_regular(&fifo).unwrap().is_none());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(open_regular(&link).unwrap().is_none());
        assert!(open_regular(&dir.path().join("missing")).unwrap().is_none());
        assert!(matches!(
            copy_file_new(&fifo, &dir.path().join("x")),
            Err(CoreError::Unacceptable(_))
        ));
    }

    #[test]
    fn xattr_lists_longer_than_any_fixed_buffer_are_read_whole() {
        let mut calls = 0;
        let data = read_sized(|buf| {
            calls += 1;
            if buf.is_empty() {
                return 10_000;
            }
            buf.fill(b'a');
            buf.len() as isize
        })
        .unwrap();
        assert_eq!(data.len(), 10_000);
        assert_eq!(calls, 2);
    }
}
