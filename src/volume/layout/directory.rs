//! A Filesystem volume that is a directory of the pool, bind-mounted at
//! publish (upstream-compatible; size accounted, not enforced).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::stat::FileStat;

use super::{CloneRoute, Layout, LayoutKind, Sizing, Traits};
use crate::error::{CoreResult, IoContext};
use crate::fstools::ImageFs;
use crate::mount::{self, MountInfo};
use crate::volume::node::{NodeStats, PublishRequest};
use crate::volume::{Core, Volume, VolumeMeta, VolumeMode};

pub struct Directory;

/// `(major, minor, path inside the filesystem)` of a directory, as
/// mountinfo shows a bind mount of it.
fn identity(path: &Path, mounts: &[MountInfo]) -> Option<(u32, u32, PathBuf)> {
    let st = fs::symlink_metadata(path).ok().filter(|m| m.is_dir())?;
    let (major, minor) = (
        nix::sys::stat::major(st.dev()) as u32,
        nix::sys::stat::minor(st.dev()) as u32,
    );
    let best = mounts
        .iter()
        .filter(|m| m.major == major && m.minor == minor && path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())?;
    let rel = path.strip_prefix(&best.mount_point).ok()?;
    Some((major, minor, best.root.join(rel)))
}

const TRAITS: Traits = Traits {
    name: "directory",
    describe: "Filesystem (directory)",
    mode: VolumeMode::Filesystem,
    is_file: false,
    is_default: true,
    selectable: true,
    limits_size: false,
    holds_filesystem: false,
    freezable: false,
};

impl LayoutKind for Directory {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn sizing(&self, _fs: Option<ImageFs>) -> Sizing {
        Sizing {
            granule: 4096,
            minimum: 0,
            default: None,
        }
    }

    fn build(&self, _meta: &VolumeMeta, staged: &Path) -> CoreResult<()> {
        fs::create_dir(staged).context(|| format!("create {}", staged.display()))?;
        // Pods run as arbitrary UIDs; kubelet applies fsGroup.
        fs::set_permissions(staged, fs::Permissions::from_mode(0o777))
            .context(|| format!("chmod {}", staged.display()))
    }

    fn holds_no_data(&self, meta: &VolumeMeta) -> bool {
        meta.source.is_none()
    }

    fn clone_route(&self, from: Layout) -> Option<CloneRoute> {
        match from.name() {
            "directory" => Some(CloneRoute::Tree),
            "file" => Some(CloneRoute::FileIntoDiskImage),
            _ => None,
        }
    }

    fn publish(
        &self,
        _core: &Core,
        vol: &Volume,
        req: &PublishRequest,
        flags: MsFlags,
    ) -> CoreResult<()> {
        fs::create_dir_all(&req.target).context(|| format!("create {}", req.target.display()))?;
        mount::bind_mount(&vol.path, &req.target, flags)
    }

    fn mounts_of<'a>(&self, vol: &Volume, mounts: &'a [MountInfo]) -> Vec<&'a MountInfo> {
        let Some((ma, mi, root)) = identity(&vol.path, mounts) else {
            return Vec::new();
        };
        mounts
            .iter()
            .filter(|m| {
                m.mount_point != vol.path && m.major == ma && m.minor == mi && m.root == root
            })
            .collect()
    }

    fn owns_target(&self, vol: &Volume, root: &FileStat) -> bool {
        // A bind mount's root is the volume directory itself.
        fs::symlink_metadata(&vol.path)
            .is_ok_and(|st| st.is_dir() && st.dev() == root.st_dev && st.ino() == root.st_ino)
    }

    fn owns_mount(&self, vol: &Volume, m: &MountInfo, mounts: &[MountInfo]) -> bool {
        m.mount_point != vol.path
            && identity(&vol.path, mounts)
                .is_some_and(|(ma, mi, root)| m.major == ma && m.minor == mi && m.root == root)
    }

    fn usage(
        &self,
        core: &Core,
        vol: &Volume,
        _path: &Path,
        _root: &FileStat,
    ) -> CoreResult<NodeStats> {
        let usage = core.stats_cache.usage(vol)?;
        let pool = core.pool(Some(&vol.meta.pool))?.usage()?;
        let total = if vol.meta.capacity_bytes > 0 {
            vol.meta.capacity_bytes
        } else {
            usage.bytes + pool.available_bytes
        };
        Ok(NodeStats {
            total_bytes: total,
            used_bytes: usage.bytes,
            available_bytes: total.saturating_sub(usage.bytes).min(pool.available_bytes),
            inodes: Some((
                usage.inodes + pool.free_inodes,
                usage.inodes,
                pool.free_inodes,
            )),
            problem: None,
        })
    }
}
