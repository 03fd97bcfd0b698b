//! What start-up does about an interrupted run, in the background so the
//! driver serves at once. Each object is held with the operation guard
//! while it is looked at, so recovery never races a live request.
//!
//! Rules: metadata without a volume is what an interrupted create or
//! delete leaves, and goes. A volume beside an empty metadata file is a
//! create cut off before its flush; it is rolled back only when it holds
//! no data (an empty directory, a file with no blocks). Any other damaged
//! metadata is kept, logged and reported (the volume stays listed, with an
//! abnormal condition): data is never deleted for it. A file larger than
//! its metadata says is an expansion that was never acknowledged, and is
//! put back to its recorded size, unless a loop device uses it.
//!
//! Requests wait while recovery runs (see `guard`); recovery waits for a
//! request that began before it.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Weak};

use super::guard::{Access, Guards};
use super::meta::{self, Found};
use super::{group, snapshot, Core};
use crate::error::Object;
use crate::names::is_valid_name;
use crate::pool::Pool;

/// Runs recovery for every pool now, and again whenever a pool becomes
/// ready later (a pvcTemplate pool whose mount appears).
pub fn install(core: &Arc<Core>) {
    for (i, pool) in core.pools().iter().enumerate() {
        let weak: Weak<Core> = Arc::downgrade(core);
        pool.set_ready_hook(Box::new(move |_pool: &Pool| {
            let Some(core) = weak.upgrade() else { return };
            // Before the thread starts: requests wait from now on.
            core.guards.recovery_began();
            let ended = RecoveryEnded(core);
            let spawned = std::thread::Builder::new()
                .name("recovery".into())
                .spawn(move || {
                    let ended = ended;
                    Guards::as_recovery(|| recover_pool(&ended.0, i));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start recovery");
            }
        }));
    }
}

/// Lets requests in when recovery ends, however it ends.
struct RecoveryEnded(Arc<Core>);

impl Drop for RecoveryEnded {
    fn drop(&mut self) {
        self.0.guards.recovery_ended();
    }
}

/// How long recovery waits for a request that holds a volume (one that
/// began before the pool became ready) before it leaves it for next time.
const GUARD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn acquire_patiently<'a>(core: &'a Core, id: &str) -> Option<super::guard::Guard<'a>> {
    let deadline = std::time::Instant::now() + GUARD_WAIT;
    loop {
        match core.guards.acquire(Object::Volume, id, Access::Write) {
            Ok(g) => return Some(g),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(_) => {
                tracing::warn!(
                    volume = id,
                    "recovery left a volume that stayed busy; the next start looks at it again"
                );
                return None;
            }
        }
    }
}

fn recover_pool(core: &Core, index: usize) {
    let pool = &core.pools()[index];
    let Ok(dirs) = pool.dirs() else { return };
    let mut damaged = 0u64;
    for name in crate::dirfd::entry_names(dirs.meta.as_fd()) {
        if name.starts_with('.') {
            // A temp file of an earlier process's interrupted metadata write
            // (never this one's, which may be in flight; in a shared pool,
            // other nodes' are theirs to sweep).
            let earlier = name.ends_with(crate::dirfd::TEMP_SUFFIX)
                && !name.contains(crate::dirfd::instance_tag())
                && !pool.shared;
            if earlier {
                let _ = nix::unistd::unlinkat(
                    dirs.meta.as_fd(),
                    name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            continue;
        }
        let Some(id) = name.strip_suffix(".json").filter(|id| is_valid_name(id)) else {
            continue;
        };
        let Some(_guard) = acquire_patiently(core, id) else {
            continue;
        };
        damaged += recover_volume(pool, id) as u64;
    }
    if damaged > 0 {
        tracing::warn!(pool = %pool.name, damaged, "volumes with damaged metadata were kept and are reported abnormal; an admin should look at them");
    }
    snapshot::recover(core, pool);
    if index == 0 {
        group::recover(core);
    }
}

/// Looks at one volume's metadata; true when it is damaged and kept.
fn recover_volume(pool: &Pool, id: &str) -> bool {
    let Ok(dirs) = pool.dirs() else { return false };
    let path = pool.volume_path(id);
    let st = match fs::symlink_metadata(&path) {
        Ok(st) => st,
        // In a shared pool another node may be creating it right now.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !pool.shared => {
            tracing::info!(pool = %pool.name, volume = id, "removing metadata of a volume that was never completed or was deleted");
            let _ = meta::remove(&dirs, id);
            return false;
        }
        Err(e) => {
            tracing::warn!(pool = %pool.name, volume = id, error = %e, "metadata kept: its volume cannot be looked at");
            return false;
        }
    };
    match meta::read(&dirs, id) {
        Found::Damaged(why) if why == "it is empty" && holds_no_data(&path, &st) => {
            tracing::warn!(pool = %pool.name, volume = id, "rolling back a create interrupted before its flush (the volume holds no data)");
            let doomed = pool.tmp_name(id, "rollback");
            if nix::fcntl::renameat(dirs.root.as_fd(), id, dirs.tmp.as_fd(), doomed.as_str())
                .is_ok()
            {
                let _ = meta::remove(&dirs, id);
                let _ = pool.sync_root_entries(&dirs);
                pool.discard(&dirs, doomed);
            }
            false
        }
        Found::Damaged(why) => {
            tracing::warn!(pool = %pool.name, volume = id, "metadata damaged ({why}); the volume is kept and reported abnormal");
            true
        }
        Found::Present(m)
            if m.layout.is_file()
                && st.is_file()
                && m.capacity_bytes > 0
                && st.len() > m.capacity_bytes =>
        {
            let in_use = crate::block::FileId::of_path(&path)
                .ok()
                .flatten()
                .is_some_and(|f| crate::block::list_attached().iter().any(|d| d.file == f));
            if in_use {
                // A loop device (maybe a mounted filesystem already grown
                // to it) uses the larger size: shrinking would cut it off.
                tracing::warn!(pool = %pool.name, volume = id, file = st.len(), recorded = m.capacity_bytes, "an expansion that was never acknowledged is in use; the file keeps its size");
                return false;
            }
            tracing::warn!(pool = %pool.name, volume = id, file = st.len(), recorded = m.capacity_bytes, "putting back the size of an expansion that was never acknowledged");
            if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.set_len(m.capacity_bytes).and_then(|()| f.sync_all());
            }
            false
        }
        Found::Present(_) | Found::Absent => false,
    }
}

/// An empty directory, or a file with no blocks allocated.
fn holds_no_data(path: &std::path::Path, st: &fs::Metadata) -> bool {
    if st.is_dir() {
        return fs::read_dir(path).is_ok_and(|mut d| d.next().is_none());
    }
    st.is_file() && st.blocks() == 0
}
