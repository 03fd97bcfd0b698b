//! What every layout stored as one regular file shares: making the file,
//! growing it without ever lifting its limit on failure, preallocation,
//! and its loop devices.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::block::{self, AttachOptions, FileId, LoopDevice};
use crate::error::{CoreError, CoreResult, IoContext};
use crate::mount;
use crate::volume::{Volume, VolumeMeta};

/// Creates the sparse file of a new volume.
pub fn build(meta: &VolumeMeta, staged: &Path) -> CoreResult<()> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(staged)
        .context(|| format!("create {}", staged.display()))?;
    fs::set_permissions(staged, fs::Permissions::from_mode(0o660))
        .context(|| format!("chmod {}", staged.display()))?;
    file.set_len(meta.capacity_bytes)
        .context(|| format!("size {}", staged.display()))
}

fn open_rw(path: &Path) -> CoreResult<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .context(|| format!("open {}", path.display()))
}

/// Grows the file to `capacity` (and allocates it when the volume is
/// preallocated). A failure puts the old size back, so an image volume's
/// hard limit is never silently lifted; success is on disk when this returns.
pub fn grow(vol: &Volume, capacity: u64) -> CoreResult<()> {
    let file = open_rw(&vol.path)?;
    let old = file
        .metadata()
        .context(|| format!("stat {}", vol.path.display()))?
        .len();
    let grown = (|| {
        file.set_len(capacity)
            .context(|| format!("grow {}", vol.path.display()))?;
        if vol.meta.preallocated {
            // Users see the new bytes only after node expansion.
            block::preallocate(&vol.path, capacity, reachable_by_users(vol, old)?)?;
        }
        file.sync_all()
            .context(|| format!("flush {}", vol.path.display()))
    })();
    if let Err(e) = grown {
        if let Err(undo) = file.set_len(old).and_then(|()| file.sync_all()) {
            tracing::error!(volume = vol.id(), error = %undo, "cannot put the old size back after a failed expansion");
        }
        return Err(e);
    }
    Ok(())
}

/// Allocates every byte of the file.
pub fn preallocate(vol: &Volume) -> CoreResult<()> {
    let capacity = vol.meta.capacity_bytes;
    block::preallocate(&vol.path, capacity, reachable_by_users(vol, capacity)?)?;
    open_rw(&vol.path)?
        .sync_all()
        .context(|| format!("flush {}", vol.path.display()))
}

/// How many bytes of the file a user can write now: `size` while a loop
/// device backs it (it is published or staged), else none.
fn reachable_by_users(vol: &Volume, size: u64) -> CoreResult<u64> {
    Ok(if devices(vol)?.is_empty() { 0 } else { size })
}

/// Makes every device backing the file (read-only and read-write ones)
/// see its new size; returns the first and all of them. Not attached here
/// is `NotPossibleHere`.
pub fn refresh_devices(vol: &Volume) -> CoreResult<(LoopDevice, Vec<LoopDevice>)> {
    let devs = devices(vol)?;
    let Some(first) = devs.first().cloned() else {
        return Err(CoreError::NotPossibleHere(format!(
            "volume {} is not attached on this node",
            vol.id()
        )));
    };
    for d in &devs {
        block::refresh_capacity(d)?;
    }
    Ok((first, devs))
}

/// The loop devices backing the volume's file.
pub fn devices(vol: &Volume) -> CoreResult<Vec<LoopDevice>> {
    Ok(FileId::of_path(&vol.path)?
        .map(block::devices_of)
        .unwrap_or_default())
}

/// The volume's loop device for `read_only` use, attaching one if none
/// exists. Read-only and read-write users get separate devices: a
/// read-only bind mount of a device node does not stop writes to the
/// device. A device with a deferred detach pending is never reused.
pub fn ensure_attached(vol: &Volume, read_only: bool) -> CoreResult<LoopDevice> {
    if let Some(dev) = devices(vol)?
        .into_iter()
        .find(|d| d.ours && d.read_only == read_only && !d.autoclear)
    {
        return Ok(dev);
    }
    block::attach(
        &vol.path,
        AttachOptions {
            read_only,
            direct_io: true,
            block_size: vol.meta.block_size,
        },
    )
}

/// Detaches the volume's devices (this driver's only) that no mount uses.
/// With `for_delete`, a device a mount uses, one still held open after
/// `wait`, or one another process attached, refuses.
pub fn release(vol: &Volume, wait: Duration, for_delete: bool) -> CoreResult<()> {
    let devs = devices(vol)?;
    if devs.is_empty() {
        return Ok(());
    }
    let mounts = mount::mounts()?;
    for dev in devs {
        if !dev.ours {
            // Another process's device on the volume file: never detached.
            if for_delete {
                return Err(CoreError::VolumeInUse {
                    id: vol.id().to_owned(),
                    by: format!(
                        "attached as {} by another process (not by this driver)",
                        dev.path.display()
                    ),
                });
            }
            tracing::info!(volume = vol.id(), device = %dev.path.display(), "left alone: a loop device this driver did not attach");
            continue;
        }
        let in_use = block::in_use_for(&mounts, dev.number, dev.file)?;
        let held = !in_use && !block::detach_and_wait(&dev, wait)?;
        if for_delete && (in_use || held) {
            return Err(CoreError::VolumeInUse {
                id: vol.id().to_owned(),
                by: format!(
                    "attached as {}{}",
                    dev.path.display(),
                    if in_use {
                        ", which a mount uses"
                    } else {
                        ", held open"
                    }
                ),
            });
        }
    }
    Ok(())
}

/// Whether the mount `m` uses one of the volume's devices, through `via`
/// (the device number a mount shows, if any).
pub fn uses_device(vol: &Volume, via: Option<u32>) -> bool {
    let Some(n) = via else { return false };
    devices(vol).is_ok_and(|devs| devs.iter().any(|d| d.number == n))
}

/// Flushes the volume's mounted filesystems (syncfs) and its loop devices'
/// buffers (fsync of the device), so the backing file holds what was
/// written. Best effort: a failure leaves the copy crash-consistent.
pub fn settle(vol: &Volume) {
    let Ok(devs) = devices(vol) else { return };
    if devs.is_empty() {
        return;
    }
    let mounts = mount::mounts().unwrap_or_default();
    for dev in devs {
        if let Some(m) = mounts
            .iter()
            .find(|m| block::mounted_loop(m) == Some(dev.number))
        {
            if let Ok(dir) = fs::File::open(&m.mount_point) {
                let _ = nix::unistd::syncfs(&dir);
            }
        } else if let Ok(node) = fs::File::open(&dev.path) {
            let _ = node.sync_all();
        }
    }
}
