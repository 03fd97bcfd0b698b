//! A Block volume: a regular file attached to a loop device (direct I/O)
//! whose node is bind-mounted onto the publish target.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sys::stat::FileStat;

use super::{file_backed, CloneRoute, Layout, LayoutKind, Sizing, Traits};
use crate::block;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::fstools::ImageFs;
use crate::mount::{self, MountInfo};
use crate::volume::node::{NodeStats, PublishRequest};
use crate::volume::{Core, Volume, VolumeMeta, VolumeMode, DEFAULT_FILE_VOLUME_SIZE};

const MIB: u64 = 1 << 20;

pub struct BlockFile;

/// Makes `target` an empty regular file to bind a device node onto. A
/// directory some COs pre-create is replaced when empty; anything with
/// content is somebody's data and is refused.
fn prepare_target(target: &Path) -> CoreResult<()> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).context(|| format!("create {}", parent.display()))?;
    }
    match fs::symlink_metadata(target) {
        Ok(st) if st.is_file() && st.len() == 0 => Ok(()),
        Ok(st) if st.is_dir() => {
            fs::remove_dir(target).map_err(|_| CoreError::ForeignContent {
                path: target.to_path_buf(),
                what: "a directory with entries".into(),
            })?;
            create_empty(target)
        }
        Ok(st) => Err(CoreError::ForeignContent {
            path: target.to_path_buf(),
            what: if st.is_file() {
                format!("a file of {} bytes", st.len())
            } else {
                "something that is not a regular file".into()
            },
        }),
        Err(_) => create_empty(target),
    }
}

fn create_empty(target: &Path) -> CoreResult<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map(drop)
        .context(|| format!("create {}", target.display()))
}

const TRAITS: Traits = Traits {
    name: "file",
    describe: "Block",
    mode: VolumeMode::Block,
    is_file: true,
    is_default: true,
    selectable: false,
    limits_size: true,
    holds_filesystem: false,
    freezable: false,
};

impl LayoutKind for BlockFile {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn sizing(&self, _fs: Option<ImageFs>) -> Sizing {
        Sizing {
            granule: MIB,
            minimum: MIB,
            default: Some(DEFAULT_FILE_VOLUME_SIZE),
        }
    }

    fn build(&self, meta: &VolumeMeta, staged: &Path) -> CoreResult<()> {
        file_backed::build(meta, staged)
    }

    fn holds_no_data(&self, meta: &VolumeMeta) -> bool {
        meta.source.is_none() && !meta.preallocated
    }

    fn clone_route(&self, from: Layout) -> Option<CloneRoute> {
        match from.name() {
            "file" => Some(CloneRoute::File),
            "directory" => Some(CloneRoute::DiskImageIntoFile),
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
        prepare_target(&req.target)?;
        let dev = file_backed::ensure_attached(vol, req.read_only)?;
        if let Err(e) = mount::bind_mount(&dev.path, &req.target, flags) {
            let _ = fs::remove_file(&req.target);
            let _ = file_backed::release(vol, Duration::ZERO, false);
            return Err(e);
        }
        block::note_bind(dev.number, &req.target, dev.file)?;
        Ok(())
    }

    fn owns_mount(&self, vol: &Volume, m: &MountInfo, _mounts: &[MountInfo]) -> bool {
        file_backed::uses_device(vol, block::bound_loop(m))
    }

    fn owns_target(&self, vol: &Volume, root: &FileStat) -> bool {
        file_backed::uses_device(vol, block::node_of(root))
    }

    /// The device goes when its last publication does; the binds are known
    /// without reading mountinfo (see `block::note_bind`).
    fn after_unpublish(&self, vol: &Volume, target: &Path, root: &FileStat) -> CoreResult<()> {
        let (Some(n), Some(file)) = (block::node_of(root), file_backed_id(vol)) else {
            return Ok(());
        };
        if !block::drop_bind(n, target, file)? {
            return Ok(());
        }
        match block::attached(n) {
            Some(dev) if dev.file == file => {
                block::detach_and_wait(&dev, crate::volume::node::DETACH_WAIT).map(drop)
            }
            _ => Ok(()),
        }
    }

    fn release(&self, vol: &Volume, wait: Duration, for_delete: bool) -> CoreResult<()> {
        file_backed::release(vol, wait, for_delete)
    }

    fn usage(
        &self,
        _core: &Core,
        vol: &Volume,
        _path: &Path,
        root: &FileStat,
    ) -> CoreResult<NodeStats> {
        // The device's size: after ControllerExpandVolume and before
        // NodeExpandVolume it is still the old one.
        let total = block::node_of(root)
            .and_then(|n| block::device_size(&block::device_path(n)).ok())
            .unwrap_or(vol.meta.capacity_bytes);
        Ok(NodeStats {
            total_bytes: total,
            ..Default::default()
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
        let (dev, _) = file_backed::refresh_devices(vol)?;
        block::device_size(&dev.path)
    }

    fn orphaned(&self, root: &FileStat) -> bool {
        block::node_of(root).is_some_and(|n| block::attached(n).is_none())
    }

    fn lost_publication(&self, vol: &Volume, root: &FileStat, at: &Path) -> Option<String> {
        let n = block::node_of(root)?;
        match block::attached(n) {
            None => Some(format!(
                "{} published at {} is no longer attached; no loop device backs {}",
                block::device_path(n).display(),
                at.display(),
                vol.path.display()
            )),
            Some(d) if d.file == file_backed_id(vol)? => None,
            Some(d) if d.backing_file.parent() == vol.path.parent() => None,
            Some(d) => Some(format!(
                "{} published at {} now backs {}, not {}",
                block::device_path(n).display(),
                at.display(),
                d.backing_file.display(),
                vol.path.display()
            )),
        }
    }
}

fn file_backed_id(vol: &Volume) -> Option<block::FileId> {
    block::FileId::of_path(&vol.path).ok().flatten()
}
