//! Walks over trees a tenant controls: removal and usage.
//!
//! A pod can put anything in its volume: a 50,000-level directory chain,
//! millions of entries, symlinks swapped for directories mid-walk, mounts,
//! `chattr +i`. So every walk here is iterative (no recursion), opens each
//! directory by descriptor with O_NOFOLLOW (a swapped symlink is never
//! followed), streams entries (memory does not grow with a directory's
//! size), never crosses into another mount, and holds a bounded number of
//! descriptors however deep the tree is.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, OwningIter, Type};
use nix::errno::Errno;
use nix::sys::stat::SFlag;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::dirfd::{self, is_kind, Place};

/// Directories held open at once by a removal; deeper levels are moved up
/// to the top of the tree being removed (it is ours, in the private area).
const REMOVE_OPEN_LEVELS: usize = 64;
/// Deepest level a usage walk descends to; below it the figure is a floor.
const USAGE_MAX_DEPTH: usize = 256;
/// A usage walk stops after this many entries (and says the figure is a floor).
const USAGE_MAX_ENTRIES: u64 = 2_000_000;

/// Why a removal left something behind.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{path} is a mount point inside the tree; it was left alone")]
    ForeignMount { path: PathBuf },
    #[error("{path}: {errno}")]
    Io { path: PathBuf, errno: Errno },
    #[error("{path} still holds entries that cannot be removed")]
    Stuck { path: PathBuf },
}

/// One open directory of a walk.
struct Frame {
    dir: OwningIter,
    name: CString,
    /// An entry was removed during the current pass.
    progress: bool,
    /// Something below could not be removed.
    failed: bool,
}

impl Frame {
    fn open(parent: BorrowedFd, name: &CStr) -> nix::Result<Frame> {
        let fd = dirfd::open_entry(parent, name, dirfd::DIR_FLAGS)?;
        Ok(Frame {
            dir: Dir::from_fd(fd)?.into_iter(),
            name: name.to_owned(),
            progress: false,
            failed: false,
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.dir` and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.dir.as_raw_fd()) }
    }

    /// Starts another pass over the directory's entries.
    fn rewind(&mut self) -> nix::Result<()> {
        let fd = dirfd::open_dir_at(self.fd(), ".")?;
        self.dir = Dir::from_fd(fd)?.into_iter();
        self.progress = false;
        Ok(())
    }

    /// The next entry other than `.` and `..`.
    fn next_entry(&mut self) -> Option<nix::Result<(CString, Option<Type>)>> {
        loop {
            match self.dir.next()? {
                Err(e) => return Some(Err(e)),
                Ok(entry) => {
                    let name = entry.file_name();
                    if matches!(name.to_bytes(), b"." | b"..") {
                        continue;
                    }
                    return Some(Ok((name.to_owned(), entry.file_type())));
                }
            }
        }
    }
}

/// Removes the entry `name` of `parent` (a file, or a whole tree) that the
/// driver owns, however the tenant shaped it. Mounts inside are never
/// entered or removed; protection flags are cleared; what cannot be
/// removed is reported, and everything else is gone.
pub fn remove(parent: BorrowedFd, name: &CStr, label: &Path) -> Result<(), Vec<RemoveError>> {
    let io = |errno| {
        vec![RemoveError::Io {
            path: label.to_path_buf(),
            errno,
        }]
    };
    let st = match dirfd::stat_entry(parent, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EXDEV) => {
            return Err(vec![RemoveError::ForeignMount {
                path: label.to_path_buf(),
            }])
        }
        Err(e) => return Err(io(e)),
    };
    if !is_kind(&st, SFlag::S_IFDIR) {
        return unlink_file(parent, name).map_err(io);
    }
    let mut walk = Removal {
        label: label.to_path_buf(),
        errors: Vec::new(),
        hoisted: 0,
    };
    walk.run(parent, name);
    if walk.errors.is_empty() {
        Ok(())
    } else {
        Err(walk.errors)
    }
}

fn unlink_file(dir: BorrowedFd, name: &CStr) -> nix::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EPERM) => {
            if dirfd::clear_protection_at(dir, name)? {
                unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
            } else {
                Err(Errno::EPERM)
            }
        }
        Err(e) => Err(e),
    }
}

struct Removal {
    label: PathBuf,
    errors: Vec<RemoveError>,
    hoisted: u64,
}

impl Removal {
    fn path_of(&self, stack: &[Frame], name: &CStr) -> PathBuf {
        let mut p = self.label.clone();
        for f in stack.iter().skip(1) {
            p.push(OsStr::from_bytes(f.name.to_bytes()));
        }
        p.push(OsStr::from_bytes(name.to_bytes()));
        p
    }

    fn run(&mut self, parent: BorrowedFd, name: &CStr) {
        let root = match Frame::open(parent, name) {
            Ok(f) => f,
            Err(errno) => {
                self.errors.push(RemoveError::Io {
                    path: self.label.clone(),
                    errno,
                });
                return;
            }
        };
        let _ = dirfd::clear_protection(root.fd());
        let place = match Place::of(root.fd()) {
            Ok(p) => p,
            Err(errno) => {
                self.errors.push(RemoveError::Io {
                    path: self.label.clone(),
                    errno,
                });
                return;
            }
        };
        let mut stack = vec![root];
        while !stack.is_empty() {
            let entry = stack.last_mut().expect("not empty").next_entry();
            match entry {
                Some(Ok((child, kind))) => self.visit(&mut stack, &child, kind, place),
                Some(Err(errno)) => {
                    let path = self.path_of(
                        &stack[..stack.len() - 1],
                        &stack[stack.len() - 1].name.clone(),
                    );
                    self.errors.push(RemoveError::Io { path, errno });
                    stack.last_mut().expect("not empty").failed = true;
                    self.finish_frame(&mut stack, parent);
                }
                None => self.finish_frame(&mut stack, parent),
            }
        }
    }

    /// Removes one entry of the directory on top of the stack, or opens it.
    fn visit(&mut self, stack: &mut Vec<Frame>, name: &CStr, kind: Option<Type>, place: Place) {
        let top = stack.last_mut().expect("not empty");
        let dir = top.fd();
        let is_dir = match kind {
            Some(Type::Directory) => true,
            Some(_) => false,
            // A mount point (EXDEV) is opened as a directory below, which
            // reports it without entering it.
            None => dirfd::stat_entry(dir, name)
                .map(|st| is_kind(&st, SFlag::S_IFDIR))
                .unwrap_or_else(|e| e == Errno::EXDEV),
        };
        if !is_dir {
            match unlink_file(dir, name) {
                Ok(()) => top.progress = true,
                // Turned into a directory since it was listed: next pass.
                Err(Errno::EISDIR) => top.progress = true,
                Err(errno) => {
                    top.failed = true;
                    let path = self.path_of(stack, name);
                    self.errors.push(RemoveError::Io { path, errno });
                }
            }
            return;
        }
        let child = match Frame::open(dir, name) {
            Ok(f) => f,
            Err(Errno::ENOENT) => return,
            Err(Errno::EXDEV) => {
                top.failed = true;
                let path = self.path_of(stack, name);
                self.errors.push(RemoveError::ForeignMount { path });
                return;
            }
            // Swapped for something else since it was listed: next pass.
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                top.progress = true;
                return;
            }
            Err(errno) => {
                top.failed = true;
                let path = self.path_of(stack, name);
                self.errors.push(RemoveError::Io { path, errno });
                return;
            }
        };
        if Place::of(child.fd()).ok() != Some(place) {
            top.failed = true;
            let path = self.path_of(stack, name);
            self.errors.push(RemoveError::ForeignMount { path });
            return;
        }
        let _ = dirfd::clear_protection(child.fd());
        if stack.len() < REMOVE_OPEN_LEVELS {
            stack.push(child);
            return;
        }
        // Too deep to hold open: move it to the top of the tree, where a
        // later pass of the top directory finds it.
        drop(child);
        let top_fd = stack[0].fd();
        let dir = stack.last().expect("not empty").fd();
        // The tenant chose the names at the top: never replace one (a
        // `.deep-1` of theirs may be an ancestor of what moves); take the
        // next free name instead.
        let moved = loop {
            self.hoisted += 1;
            let hoisted = CString::new(format!(".deep-{}", self.hoisted)).expect("no NUL");
            match nix::fcntl::renameat2(
                dir,
                name,
                top_fd,
                hoisted.as_c_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                Err(Errno::EEXIST) => continue,
                other => break other,
            }
        };
        match moved {
            Ok(()) => stack.last_mut().expect("not empty").progress = true,
            Err(errno) => {
                let path = self.path_of(stack, name);
                stack.last_mut().expect("not empty").failed = true;
                self.errors.push(RemoveError::Io { path, errno });
            }
        }
    }

    /// The directory on top ran out of entries: remove it, or go round
    /// again when entries appeared or were moved in during the pass.
    fn finish_frame(&mut self, stack: &mut Vec<Frame>, parent: BorrowedFd) {
        let mut frame = stack.pop().expect("not empty");
        let path = self.path_of(stack, &frame.name.clone());
        if frame.failed {
            if let Some(up) = stack.last_mut() {
                up.failed = true;
            }
            return;
        }
        let above = stack.last().map_or(parent, |f| f.fd());
        match unlinkat(above, frame.name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) => {
                if let Some(up) = stack.last_mut() {
                    up.progress = true;
                }
            }
            // Renamed or swapped for something else while it was emptied:
            // the parent's next pass finds it under whatever name it has.
            Err(Errno::ENOENT | Errno::ENOTDIR) if !stack.is_empty() => {
                stack.last_mut().expect("not empty").progress = true;
            }
            Err(Errno::ENOENT) => {}
            Err(Errno::ENOTEMPTY | Errno::EEXIST) if frame.progress => match frame.rewind() {
                Ok(()) => stack.push(frame),
                Err(errno) => self.fail(stack, RemoveError::Io { path, errno }),
            },
            Err(Errno::ENOTEMPTY | Errno::EEXIST) => self.fail(stack, RemoveError::Stuck { path }),
            Err(errno) => self.fail(stack, RemoveError::Io { path, errno }),
        }
    }

    fn fail(&mut self, stack: &mut [Frame], error: RemoveError) {
        if let Some(up) = stack.last_mut() {
            up.failed = true;
        }
        self.errors.push(error);
    }
}

/// Space and inodes a tree uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes allocated on disk (holes not counted).
    pub bytes: u64,
    /// Files, directories and links, the root included.
    pub inodes: u64,
    /// True when the walk hit a bound (depth or entries): a floor.
    pub truncated: bool,
}

/// Measures the tree below the open directory `root` without following a
/// symlink, leaving its mount, or holding more than `USAGE_MAX_DEPTH`
/// descriptors.
pub fn usage(root: BorrowedFd) -> nix::Result<TreeUsage> {
    let top = nix::sys::stat::fstat(root)?;
    let place = Place::of(root)?;
    let mut usage = TreeUsage {
        bytes: top.st_blocks as u64 * 512,
        inodes: 1,
        truncated: false,
    };
    let first = Dir::from_fd(dirfd::open_dir_at(root, ".")?)?.into_iter();
    let mut stack: Vec<OwningIter> = vec![first];
    while let Some(dir) = stack.last_mut() {
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else {
            stack.pop();
            continue;
        };
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        // SAFETY: the descriptor is owned by the iterator on the stack.
        let fd = unsafe { BorrowedFd::borrow_raw(dir.as_raw_fd()) };
        // Never asks a filesystem mounted inside (EXDEV): it is not ours.
        let Ok(st) = dirfd::stat_entry(fd, name) else {
            continue;
        };
        usage.inodes += 1;
        if usage.inodes > USAGE_MAX_ENTRIES {
            usage.truncated = true;
            break;
        }
        let is_dir = is_kind(&st, SFlag::S_IFDIR);
        let blocks = st.st_blocks as u64 * 512;
        // Hard links: count a share so the total stays right.
        usage.bytes += if is_dir || st.st_nlink <= 1 {
            blocks
        } else {
            blocks / st.st_nlink
        };
        if !is_dir || st.st_dev != place.dev {
            continue;
        }
        if stack.len() >= USAGE_MAX_DEPTH {
            usage.truncated = true;
            continue;
        }
        // Swapped for a symlink or a mount since the stat: refused.
        let Ok(child) = dirfd::open_entry(fd, name, dirfd::DIR_FLAGS) else {
            continue;
        };
        if Place::of(child.as_fd()).ok() != Some(place) {
            continue;
        }
        if let Ok(d) = Dir::from_fd(child) {
            stack.push(d.into_iter());
        }
    }
    Ok(usage)
}

/// Measures the directory at `path` (opened without following a final symlink).
pub fn usage_at(path: &Path) -> nix::Result<TreeUsage> {
    let fd: OwnedFd = dirfd::open_dir_at(nix::fcntl::AT_FDCWD, path)?;
    usage(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn remove_all(parent: &Path, name: &str) -> Result<(), Vec<RemoveError>> {
        let d = File::open(parent).unwrap();
        let c = CString::new(name).unwrap();
        remove(d.as_fd(), &c, &parent.join(name))
    }

    #[test]
    fn removes_a_chain_deeper_than_it_holds_open() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("t");
        std::fs::create_dir(&top).unwrap();
        // Built by descriptor: the path would exceed PATH_MAX.
        let mut fd: OwnedFd = File::open(&top).unwrap().into();
        for _ in 0..3 * REMOVE_OPEN_LEVELS + 5 {
            nix::sys::stat::mkdirat(&fd, "d", nix::sys::stat::Mode::from_bits_truncate(0o755))
                .unwrap();
            std::fs::write(format!("/proc/self/fd/{}/f", fd.as_raw_fd()), b"x").unwrap();
            fd = dirfd::open_dir_at(&fd, "d").unwrap();
        }
        drop(fd);
        remove_all(dir.path(), "t").unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn never_follows_a_symlink_out() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let top = dir.path().join("t");
        std::fs::create_dir_all(top.join("a")).unwrap();
        std::os::unix::fs::symlink(&outside, top.join("a/link")).unwrap();
        remove_all(dir.path(), "t").unwrap();
        assert!(outside.join("keep").exists());
        assert!(!top.exists());
    }

    #[test]
    fn usage_counts_own_tree_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), vec![1u8; 64 * 1024]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        let u = usage_at(dir.path()).unwrap();
        assert_eq!(u.inodes, 4);
        assert!(u.bytes >= 64 * 1024 && u.bytes < 1 << 20, "{u:?}");
    }
}
