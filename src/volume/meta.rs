//! Per-volume metadata, kept in `<pool>/.hostpath-csi/volumes/<id>.json`.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, CoreResult, IoContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeMode {
    Filesystem,
    Block,
}

/// How a volume is stored in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A directory (Filesystem mode, upstream-compatible).
    Directory,
    /// A regular file used raw through a loop device (Block mode).
    File,
    /// A regular file holding a filesystem, loop-mounted (hard size limit).
    Image,
}

impl Layout {
    pub fn is_file(self) -> bool {
        matches!(self, Layout::File | Layout::Image)
    }
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
    pub fs_type: Option<String>,
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
    /// Go driver made, or a bare file (treated as a raw block volume).
    pub fn inferred(id: &str, pool: &str, is_dir: bool, file_size: u64) -> Self {
        VolumeMeta {
            id: id.to_owned(),
            pool: pool.to_owned(),
            capacity_bytes: if is_dir { 0 } else { file_size },
            mode: if is_dir {
                VolumeMode::Filesystem
            } else {
                VolumeMode::Block
            },
            layout: if is_dir {
                Layout::Directory
            } else {
                Layout::File
            },
            fs_type: None,
            block_size: 512,
            preallocated: false,
            source: None,
            created_unix: 0,
            ephemeral: false,
        }
    }
}

/// Reads a metadata file; `None` when there is none.
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> CoreResult<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            CoreError::Internal(format!("metadata {} is corrupt: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CoreError::io(format!("read {}", path.display()), e)),
    }
}

/// Writes `value` to `path` atomically: a temp file beside it, then rename.
/// Durability comes from the caller's pool sync.
pub fn write_atomic<T: Serialize>(path: &Path, value: &T) -> CoreResult<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| CoreError::Internal(format!("encode metadata: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).context(|| format!("create {}", tmp.display()))?;
    file.write_all(&bytes)
        .context(|| format!("write {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path).context(|| format!("rename {} into place", path.display()))
}

/// Forces a metadata file's content (and the journal up to it) to disk.
pub fn flush(path: &Path) -> CoreResult<()> {
    File::open(path)
        .and_then(|f| f.sync_data())
        .context(|| format!("flush {}", path.display()))
}

/// Removes a metadata file; a missing one is fine.
pub fn remove(path: &Path) -> CoreResult<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CoreError::io(format!("remove {}", path.display()), e)),
    }
}
