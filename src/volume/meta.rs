//! Per-volume metadata, kept in `<pool>/.hostpath-csi/volumes/<id>.json`,
//! and the durable JSON files snapshots and groups use.
//!
//! Reads never follow a symlink, never block on a FIFO and never read
//! more than a small file's worth; what cannot be read is reported as
//! damaged, never taken for absent. Rewrites are whole-file replacements
//! made durable before they return.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd};

use serde::{Deserialize, Serialize};

use super::layout::Layout;
use crate::dirfd::{self, ReadError};
use crate::error::{CoreError, CoreResult, IoContext};
use crate::fstools::ImageFs;
use crate::pool::PoolDirs;

/// Largest metadata file read.
const MAX_META_LEN: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeMode {
    Filesystem,
    Block,
}

/// What a volume was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Volume(String),
    Snapshot(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub id: String,
    pub pool: String,
    /// 0 means unknown (a volume the Go driver made).
    pub capacity_bytes: u64,
    pub mode: VolumeMode,
    pub layout: Layout,
    /// Filesystem inside an image volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<ImageFs>,
    /// Logical block size of the loop device (512 or 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub preallocated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
    #[serde(default)]
    pub created_unix: u64,
    /// A CSI ephemeral inline volume: made at publish, removed at unpublish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

fn default_block_size() -> u32 {
    512
}

impl VolumeMeta {
    /// Metadata for a volume found without a metadata file: a directory the
    /// Go driver made, or a bare file (treated as a raw Block volume).
    pub fn inferred(id: &str, pool: &str, is_dir: bool, file_size: u64) -> Self {
        let layout = Layout::for_backing(is_dir);
        VolumeMeta {
            id: id.to_owned(),
            pool: pool.to_owned(),
            capacity_bytes: if is_dir { 0 } else { file_size },
            mode: layout.mode(),
            layout,
            fs_type: None,
            block_size: 512,
            preallocated: false,
            source: None,
            created_unix: 0,
            ephemeral: false,
        }
    }

    pub fn file_name(id: &str) -> String {
        format!("{id}.json")
    }
}

/// What reading a metadata file found.
#[derive(Debug)]
pub enum Found<T> {
    Absent,
    Present(T),
    /// Empty, truncated, garbage or not a regular file: kept and reported,
    /// never a reason to delete anything.
    Damaged(String),
}

/// Reads the JSON file `name` in `dir`.
pub fn read_at<T: for<'de> Deserialize<'de>>(dir: BorrowedFd, name: &str) -> Found<T> {
    let Ok(cname) = CString::new(name) else {
        return Found::Absent;
    };
    match dirfd::read_small_file(dir, &cname, MAX_META_LEN) {
        Ok(None) => Found::Absent,
        Ok(Some(bytes)) if bytes.is_empty() => Found::Damaged("it is empty".into()),
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(v) => Found::Present(v),
            Err(e) => Found::Damaged(format!("it does not parse: {e}")),
        },
        Err(ReadError::Io(e)) => Found::Damaged(format!("it cannot be read: {e}")),
        Err(e) => Found::Damaged(e.to_string()),
    }
}

/// Writes `value` as the JSON file `name` in `dir`, durably (see `dirfd::write_durably`).
pub fn write_at<T: Serialize>(dir: BorrowedFd, name: &str, value: &T) -> CoreResult<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| CoreError::Internal(format!("encode {name}: {e}")))?;
    dirfd::write_durably(dir, name, &bytes).context(|| format!("write {name}"))
}

/// The metadata of volume `id` in a pool.
pub fn read(dirs: &PoolDirs, id: &str) -> Found<VolumeMeta> {
    read_at(dirs.meta.as_fd(), &VolumeMeta::file_name(id))
}

/// Rewrites a volume's metadata durably.
pub fn write(dirs: &PoolDirs, meta: &VolumeMeta) -> CoreResult<()> {
    write_at(dirs.meta.as_fd(), &VolumeMeta::file_name(&meta.id), meta)
}

/// Writes a new volume's metadata file without waiting for the disk: a
/// create makes it durable with one `flush` after the volume is in place.
pub fn write_new(dirs: &PoolDirs, meta: &VolumeMeta) -> CoreResult<()> {
    use std::io::Write;
    let name = VolumeMeta::file_name(&meta.id);
    let bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| CoreError::Internal(format!("encode {name}: {e}")))?;
    let fd = nix::fcntl::openat(
        dirs.meta.as_fd(),
        name.as_str(),
        nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_TRUNC
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .context(|| format!("create {name}"))?;
    std::fs::File::from(fd)
        .write_all(&bytes)
        .context(|| format!("write {name}"))
}

/// Forces a new metadata file's content (and the journal up to it) to disk.
pub fn flush(dirs: &PoolDirs, id: &str) -> CoreResult<()> {
    let name = VolumeMeta::file_name(id);
    let fd = nix::fcntl::openat(
        dirs.meta.as_fd(),
        name.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .context(|| format!("open {name}"))?;
    nix::unistd::fdatasync(&fd).context(|| format!("flush {name}"))
}

/// Removes a volume's metadata file durably; a missing one is fine.
pub fn remove(dirs: &PoolDirs, id: &str) -> CoreResult<()> {
    dirfd::remove_durably(dirs.meta.as_fd(), &VolumeMeta::file_name(id))
        .context(|| format!("remove metadata of {id}"))
}

/// Removes a volume's metadata file; the caller's journal commit (a sync
/// of the pool root, which on a journaling filesystem carries every
/// earlier metadata change) makes it durable.
pub fn remove_unsynced(dirs: &PoolDirs, id: &str) -> CoreResult<()> {
    let name = VolumeMeta::file_name(id);
    match nix::unistd::unlinkat(
        dirs.meta.as_fd(),
        name.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(CoreError::io(format!("remove {name}"), e.into())),
    }
}
