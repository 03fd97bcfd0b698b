//! DeleteVolume. A volume leaves its pool in one durable rename into the
//! temp area; its tree is removed in the background (a pod may have left a
//! 50,000-level chain or millions of files in it), without ever following
//! a symlink out or crossing a mount.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use super::guard::Access;
use super::{meta, Core, Volume};
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::mount;
use crate::names::validate_name;

/// How long DeleteVolume waits before it refuses because a loop device is
/// held open (by udev, blkid, a scan).
pub const DELETE_DETACH_WAIT: Duration = Duration::from_secs(5);

impl Core {
    /// Deletes a volume; an unknown ID is success.
    pub fn delete_volume(&self, id: &str) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        let _guard = self.guards.acquire(Object::Volume, id, Access::Write)?;
        let Some(vol) = self.find_volume(id)? else {
            // Gone, unless it is in a pool that is not ready yet.
            return self.not_ready_pool(Object::Volume, id).map_or(Ok(()), Err);
        };
        let pool = self.pool_of(&vol)?;
        let dirs = pool.dirs()?;
        self.check_unused(&vol)?;
        let doomed = pool.tmp_name(id, "delete");
        let mut moved =
            nix::fcntl::renameat(dirs.root.as_fd(), id, dirs.tmp.as_fd(), doomed.as_str());
        if moved == Err(nix::errno::Errno::EPERM) {
            // A pod made its volume's root immutable or append-only.
            let name = std::ffi::CString::new(id).expect("validated names hold no NUL");
            if crate::dirfd::clear_protection_at(dirs.root.as_fd(), &name).unwrap_or(false) {
                moved =
                    nix::fcntl::renameat(dirs.root.as_fd(), id, dirs.tmp.as_fd(), doomed.as_str());
            }
        }
        moved.context(|| format!("move {} out of the pool", vol.path.display()))?;
        meta::remove_unsynced(&dirs, id)?;
        pool.sync_root_entries(&dirs)?;
        self.index.remove(id);
        self.stats_cache.forget(id);
        pool.discard(&dirs, doomed);
        tracing::info!(volume = id, pool = %pool.name, "volume deleted");
        Ok(())
    }

    /// Refuses to delete a volume that is published, staged or attached,
    /// or that has another filesystem mounted inside it (deleting would
    /// pull data from under a pod, or reach into what is not ours).
    fn check_unused(&self, vol: &Volume) -> CoreResult<()> {
        // A file volume's devices first: a refusal names the device.
        if vol.layout().is_file() {
            // Devices someone else attached since the index was built count too.
            crate::block::rescan();
            vol.layout().release(vol, DELETE_DETACH_WAIT, true)?;
        }
        let mounts = mount::mounts()?;
        if let Some(m) = vol.layout().mounts_of(vol, &mounts).first() {
            return Err(CoreError::VolumeInUse {
                id: vol.id().to_owned(),
                by: format!("published or staged at {}", m.mount_point.display()),
            });
        }
        if !vol.layout().is_file() {
            let inside: Option<PathBuf> = mounts
                .iter()
                .map(|m| &m.mount_point)
                .find(|p| p.starts_with(&vol.path) && **p != vol.path)
                .cloned();
            if let Some(mount) = inside {
                return Err(CoreError::MountInside {
                    id: vol.id().to_owned(),
                    mount,
                });
            }
        }
        Ok(())
    }
}
