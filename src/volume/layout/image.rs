//! A Filesystem volume with a hard size limit: a file holding an XFS (or
//! ext4) filesystem, attached and mounted at stage; publish binds the
//! staged mount. Inline ephemeral volumes are mounted at the target directly
//! (kubelet never stages them).

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sys::stat::FileStat;

use super::{file_backed, CloneRoute, Layout, LayoutKind, Sizing, Traits};
use crate::block::{self, LoopDevice};
use crate::error::{CoreError, CoreResult, IoContext};
use crate::fstools::{GrowStrategy, ImageFs};
use crate::mount::{self, MountInfo};
use crate::volume::node::{NodeStats, PublishRequest, StageRequest};
use crate::volume::{Core, Volume, VolumeMeta, VolumeMode, DEFAULT_FILE_VOLUME_SIZE};

const MIB: u64 = 1 << 20;

pub struct Image;

fn fs_of(vol: &Volume) -> ImageFs {
    vol.meta.fs_type.unwrap_or(ImageFs::DEFAULT)
}

/// Attaches the volume and mounts its filesystem at `at`, first growing
/// it when the file was expanded while unmounted: ext4 offline before the
/// mount (no CAP_SYS_RESOURCE needed), XFS once mounted (online only).
fn attach_and_mount(vol: &Volume, at: &Path, flags: MsFlags) -> CoreResult<LoopDevice> {
    fs::create_dir_all(at).context(|| format!("create {}", at.display()))?;
    let fs = fs_of(vol);
    // Another device on the image (one whose detach waits for a process
    // that still holds it, or another process's) may still carry a mounted
    // instance of the filesystem: a second one through a new device, or a
    // fsck of it, would corrupt it.
    if let Some(other) = file_backed::devices(vol)?
        .into_iter()
        .find(|d| !d.ours || d.autoclear)
    {
        return Err(CoreError::VolumeInUse {
            id: vol.id().to_owned(),
            by: format!(
                "{} still backs its image ({}); it is not mounted again through another device",
                other.path.display(),
                if other.ours {
                    "its detach waits for a process that holds it open, maybe a mount in another mount namespace"
                } else {
                    "attached by another process"
                }
            ),
        });
    }
    let dev = file_backed::ensure_attached(vol, false)?;
    let undo = |e: CoreError| {
        let _ = file_backed::release(vol, Duration::ZERO, false);
        e
    };
    let device = block::device_size(&dev.path).map_err(undo)?;
    let grow = fs
        .size_on(&dev.path)
        .map_err(undo)?
        .is_some_and(|size| size < device);
    if grow && fs.grow_strategy() == GrowStrategy::OfflineFirst {
        fs.grow_unmounted(&dev.path).map_err(undo)?;
    }
    mount::mount_device(&dev.path, at, fs.name(), flags, fs.mount_data()).map_err(undo)?;
    if grow && fs.grow_strategy() == GrowStrategy::Online {
        if let Err(e) = fs.grow_mounted(&dev.path, at) {
            let _ = mount::unmount(at);
            return Err(undo(e));
        }
    }
    Ok(dev)
}

const TRAITS: Traits = Traits {
    name: "image",
    describe: "Filesystem (image)",
    mode: VolumeMode::Filesystem,
    is_file: true,
    is_default: false,
    selectable: true,
    limits_size: true,
    holds_filesystem: true,
    freezable: true,
};

impl LayoutKind for Image {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn sizing(&self, fs: Option<ImageFs>) -> Sizing {
        Sizing {
            granule: MIB,
            minimum: fs.unwrap_or(ImageFs::DEFAULT).min_size(),
            default: Some(DEFAULT_FILE_VOLUME_SIZE),
        }
    }

    fn build(&self, meta: &VolumeMeta, staged: &Path) -> CoreResult<()> {
        file_backed::build(meta, staged)?;
        if meta.source.is_none() {
            meta.fs_type.unwrap_or(ImageFs::DEFAULT).make(staged)?;
        }
        Ok(())
    }

    fn holds_no_data(&self, _meta: &VolumeMeta) -> bool {
        false
    }

    fn clone_route(&self, from: Layout) -> Option<CloneRoute> {
        (from.name() == "image").then_some(CloneRoute::File)
    }

    fn stage(&self, _core: &Core, vol: &Volume, req: &StageRequest) -> CoreResult<()> {
        let have = fs_of(vol);
        if let Some(asked) = req
            .fs_type
            .as_deref()
            .filter(|t| !t.is_empty() && *t != have.name())
        {
            return Err(CoreError::CapabilityMismatch {
                id: vol.id().to_owned(),
                have: format!("{} image", have.name()),
                asked: asked.to_owned(),
            });
        }
        let flags = mount::parse_mount_flags(&req.mount_flags)?;
        let dev = attach_and_mount(vol, &req.staging, flags)?;
        tracing::info!(volume = vol.id(), staging = %req.staging.display(), device = %dev.path.display(), "image volume staged");
        Ok(())
    }

    fn publish(
        &self,
        _core: &Core,
        vol: &Volume,
        req: &PublishRequest,
        flags: MsFlags,
    ) -> CoreResult<()> {
        if vol.meta.ephemeral {
            attach_and_mount(vol, &req.target, flags)?;
            return Ok(());
        }
        let staging = req.staging.as_deref().ok_or_else(|| CoreError::NotStaged {
            id: vol.id().to_owned(),
            path: "(no staging_target_path)".into(),
        })?;
        let mounts = mount::mounts()?;
        let staged =
            mount::topmost(&mounts, staging).is_some_and(|m| self.owns_mount(vol, m, &mounts));
        if !staged {
            return Err(CoreError::NotStaged {
                id: vol.id().to_owned(),
                path: staging.to_path_buf(),
            });
        }
        fs::create_dir_all(&req.target).context(|| format!("create {}", req.target.display()))?;
        mount::bind_mount(staging, &req.target, flags)
    }

    fn owns_mount(&self, vol: &Volume, m: &MountInfo, _mounts: &[MountInfo]) -> bool {
        file_backed::uses_device(vol, block::mounted_loop(m))
    }

    fn owns_target(&self, vol: &Volume, root: &FileStat) -> bool {
        file_backed::uses_device(vol, block::filesystem_of(root))
    }

    /// An inline ephemeral volume is mounted at its target directly: its
    /// device goes with that mount.
    fn after_unpublish(&self, vol: &Volume, _target: &Path, _root: &FileStat) -> CoreResult<()> {
        if vol.meta.ephemeral {
            file_backed::release(vol, crate::volume::node::DETACH_WAIT, false)?;
        }
        Ok(())
    }

    fn release(&self, vol: &Volume, wait: Duration, for_delete: bool) -> CoreResult<()> {
        file_backed::release(vol, wait, for_delete)
    }

    fn usage(
        &self,
        _core: &Core,
        _vol: &Volume,
        path: &Path,
        _root: &FileStat,
    ) -> CoreResult<NodeStats> {
        let st =
            nix::sys::statvfs::statvfs(path).context(|| format!("statvfs {}", path.display()))?;
        let f = st.fragment_size();
        Ok(NodeStats {
            total_bytes: st.blocks() * f,
            available_bytes: st.blocks_available() * f,
            used_bytes: (st.blocks() - st.blocks_free()) * f,
            inodes: Some((st.files(), st.files() - st.files_free(), st.files_free())),
            problem: None,
        })
    }

    fn settle(&self, vol: &Volume) {
        file_backed::settle(vol)
    }

    fn grow(&self, vol: &Volume, capacity: u64) -> CoreResult<()> {
        file_backed::grow(vol, capacity)
    }

    fn preallocate(&self, vol: &Volume) -> CoreResult<()> {
        file_backed::preallocate(vol)
    }

    fn node_expand(&self, _core: &Core, vol: &Volume) -> CoreResult<u64> {
        let (dev, devs) = file_backed::refresh_devices(vol)?;
        let fs = fs_of(vol);
        let mount_point = mount::mounts()?
            .into_iter()
            .find(|m| block::mounted_loop(m).is_some_and(|n| devs.iter().any(|d| d.number == n)))
            .map(|m| m.mount_point)
            .ok_or_else(|| CoreError::NotStaged {
                id: vol.id().to_owned(),
                path: "(not mounted anywhere)".into(),
            })?;
        // XFS keeps its superblock in its own cache, so always ask it (a
        // no-op when grown); ext4's on the device is current.
        let device = block::device_size(&dev.path)?;
        let grown = fs != ImageFs::Xfs && fs.size_on(&dev.path)?.is_some_and(|size| size >= device);
        if !grown {
            fs.grow_mounted(&dev.path, &mount_point)?;
        }
        Ok(device)
    }
}
