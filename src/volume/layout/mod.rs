//! How a volume is stored in its pool. Each layout is one module that
//! implements `LayoutKind`; the rest of the core asks the layout instead of
//! switching on it. A new layout (qcow2, a btrfs subvolume) is one new file
//! plus one line in `REGISTERED`.

mod block_file;
mod directory;
mod file_backed;
mod image;

use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sys::stat::FileStat;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::node::{NodeStats, PublishRequest, StageRequest};
use super::{Core, Volume, VolumeMeta, VolumeMode};
use crate::error::{CoreError, CoreResult};
use crate::fstools::ImageFs;
use crate::mount::MountInfo;

/// Every layout, by the name metadata and parameters use.
const REGISTERED: &[&dyn LayoutKind] =
    &[&directory::Directory, &block_file::BlockFile, &image::Image];

/// Size rules of a layout.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Capacities are rounded up to a multiple of this.
    pub granule: u64,
    pub minimum: u64,
    /// Given when a request names no size (`None`: zero is fine).
    pub default: Option<u64>,
}

/// How one layout's content is copied into another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneRoute {
    /// Directory tree into directory tree.
    Tree,
    /// Whole file into whole file.
    File,
    /// A file becomes `disk.img` inside a directory (CDI's Filesystem VM disk).
    FileIntoDiskImage,
    /// A directory's `disk.img` becomes the file.
    DiskImageIntoFile,
}

/// What a layout is: fixed facts, one table per layout.
#[derive(Debug)]
pub struct Traits {
    /// The name in metadata and in `parameters.layout`.
    pub name: &'static str,
    /// For people: "Filesystem (directory)", "Block", ...
    pub describe: &'static str,
    pub mode: VolumeMode,
    /// The volume is a regular file (else a directory).
    pub is_file: bool,
    /// Chosen for its mode when the parameters name no layout.
    pub is_default: bool,
    /// A StorageClass may name it in `parameters.layout`.
    pub selectable: bool,
    /// Writes beyond the capacity fail (a hard limit).
    pub limits_size: bool,
    /// The volume holds a filesystem the driver makes (its `fs_type`).
    pub holds_filesystem: bool,
    /// Published volumes of this layout can be frozen (group snapshots).
    pub freezable: bool,
}

/// What a layout does.
pub trait LayoutKind: Send + Sync {
    fn traits(&self) -> &'static Traits;
    fn sizing(&self, fs: Option<ImageFs>) -> Sizing;
    /// Makes a new, empty volume at `staged` (in the pool's temp area).
    fn build(&self, meta: &VolumeMeta, staged: &Path) -> CoreResult<()>;
    /// A fresh volume of this layout holds no data of its own (a create
    /// then needs one metadata flush, not a filesystem sync).
    fn holds_no_data(&self, meta: &VolumeMeta) -> bool;
    /// How a volume of layout `from` is cloned into this one.
    fn clone_route(&self, from: Layout) -> Option<CloneRoute>;
    /// Makes the volume ready for publishing at the staging path.
    fn stage(&self, _core: &Core, _vol: &Volume, _req: &StageRequest) -> CoreResult<()> {
        Ok(())
    }
    /// Publishes at `req.target` (already checked to hold nothing else).
    fn publish(
        &self,
        core: &Core,
        vol: &Volume,
        req: &PublishRequest,
        flags: MsFlags,
    ) -> CoreResult<()>;
    /// Whether `m` is one of this volume's mounts (a publication or its
    /// staging), made by this driver.
    fn owns_mount(&self, vol: &Volume, m: &MountInfo, mounts: &[MountInfo]) -> bool;
    /// This volume's mounts among `mounts` (all of mountinfo).
    fn mounts_of<'a>(&self, vol: &Volume, mounts: &'a [MountInfo]) -> Vec<&'a MountInfo> {
        mounts
            .iter()
            .filter(|m| self.owns_mount(vol, m, mounts))
            .collect()
    }
    /// Whether the mount whose root stats as `root` (the topmost mount at a
    /// path, see `mount::mounted_at`) is one of this volume's: the same
    /// question as `owns_mount`, answered without reading mountinfo.
    fn owns_target(&self, vol: &Volume, root: &FileStat) -> bool;
    /// Undoes what a publication held after its mount at `target` (whose
    /// root stat was `root`) is gone.
    fn after_unpublish(&self, _vol: &Volume, _target: &Path, _root: &FileStat) -> CoreResult<()> {
        Ok(())
    }
    /// Lets go of what no mount uses any more (loop devices), waiting up
    /// to `wait` for a detach the kernel defers. With `for_delete`, a
    /// device still in use is an error.
    fn release(&self, _vol: &Volume, _wait: Duration, _for_delete: bool) -> CoreResult<()> {
        Ok(())
    }
    /// Usage of the volume mounted at `path` (mount `m`).
    fn usage(
        &self,
        core: &Core,
        vol: &Volume,
        path: &Path,
        root: &FileStat,
    ) -> CoreResult<NodeStats>;
    /// Grows the backing store to `capacity` (controller side).
    fn grow(&self, _vol: &Volume, _capacity: u64) -> CoreResult<()> {
        Ok(())
    }
    /// Allocates every byte of the volume.
    fn preallocate(&self, vol: &Volume) -> CoreResult<()> {
        Err(CoreError::Unacceptable(format!(
            "volume {} is a {} volume; preallocation applies to Block and image volumes",
            vol.id(),
            self.traits().describe
        )))
    }
    /// Flushes what users of the volume have written but not yet sent to
    /// its backing store (a mounted image's page cache, a loop device's
    /// buffers), so a snapshot or clone taken next includes it.
    fn settle(&self, _vol: &Volume) {}
    /// Makes the node see a grown volume; returns the size now in effect.
    fn node_expand(&self, _core: &Core, vol: &Volume) -> CoreResult<u64> {
        Ok(vol.meta.capacity_bytes)
    }
    /// Whether the mount whose root stats as `root` is a publication whose
    /// backing is gone for good (a Block bind of a loop device that no
    /// longer backs any file): it holds nothing, so undoing it is safe
    /// whichever volume it was. One that now backs another file is not.
    fn orphaned(&self, _root: &FileStat) -> bool {
        false
    }
    /// Why a mount at a publish target no longer reaches the volume (a
    /// Block volume's loop device was lost); `None` when it is not this
    /// volume's at all.
    fn lost_publication(&self, _vol: &Volume, _root: &FileStat, _at: &Path) -> Option<String> {
        None
    }
}

/// A layout: a handle on its registered implementation.
#[derive(Clone, Copy)]
pub struct Layout(&'static dyn LayoutKind);

impl std::ops::Deref for Layout {
    type Target = dyn LayoutKind;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for Layout {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}
impl Eq for Layout {}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Layout {
    pub fn name(&self) -> &'static str {
        self.0.traits().name
    }
    pub fn describe(&self) -> &'static str {
        self.0.traits().describe
    }
    pub fn mode(&self) -> VolumeMode {
        self.0.traits().mode
    }
    pub fn is_file(&self) -> bool {
        self.0.traits().is_file
    }
    pub fn limits_size(&self) -> bool {
        self.0.traits().limits_size
    }
    pub fn holds_filesystem(&self) -> bool {
        self.0.traits().holds_filesystem
    }
    pub fn freezable(&self) -> bool {
        self.0.traits().freezable
    }

    pub fn named(name: &str) -> Option<Layout> {
        REGISTERED
            .iter()
            .find(|l| l.traits().name == name)
            .map(|l| Layout(*l))
    }

    /// The layout `parameters.layout` names.
    pub fn selectable(name: &str) -> CoreResult<Layout> {
        Layout::named(name)
            .filter(|l| l.0.traits().selectable)
            .ok_or_else(|| {
                let known: Vec<&str> = REGISTERED
                    .iter()
                    .map(|l| l.traits())
                    .filter(|t| t.selectable)
                    .map(|t| t.name)
                    .collect();
                CoreError::invalid(
                    super::params::LAYOUT,
                    name,
                    format!("use one of {}", known.join(", ")),
                )
            })
    }

    /// The layout a volume of `mode` gets when nothing else is asked.
    pub fn default_for(mode: VolumeMode) -> Layout {
        REGISTERED
            .iter()
            .find(|l| l.traits().mode == mode && l.traits().is_default)
            .map(|l| Layout(*l))
            .expect("a default layout for every mode")
    }

    /// What a bare directory or file (no metadata) is taken for.
    pub fn for_backing(is_dir: bool) -> Layout {
        Layout::default_for(if is_dir {
            VolumeMode::Filesystem
        } else {
            VolumeMode::Block
        })
    }
}

impl Serialize for Layout {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Layout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Layout::named(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown layout {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_defaults_exist() {
        for l in REGISTERED {
            let layout = Layout::named(l.traits().name).unwrap();
            let json = serde_json::to_string(&layout).unwrap();
            assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
        }
        assert_eq!(Layout::default_for(VolumeMode::Block).name(), "file");
        assert_eq!(Layout::for_backing(true).name(), "directory");
        assert!(
            Layout::selectable("file").is_err(),
            "Block is chosen by the access type"
        );
    }
}
