//! Snapshots: a reflink-or-sparse copy of a volume under
//! `<snapshot dir>/<snapshot_id>/{data, meta.json}`, built aside and renamed
//! into place when complete and durable on the snapshot area's own
//! filesystem (a `snapshotPath` may be another filesystem than the pool).
//!
//! Snapshots the Go driver made in the same directory (`<id>/data` beside
//! an empty directory named after the source volume, no metadata) are
//! listed and restorable as directory snapshots.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::guard::Access;
use super::meta::{self, Found};
use super::registry::{next_token, page_size, Index};
use super::{token, Core, Layout};
use crate::copy;
use crate::dirfd;
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::fstools::ImageFs;
use crate::names::{is_valid_name, validate_name};
use crate::pool::Pool;

const DATA: &str = "data";
const META: &str = "meta.json";
/// Snapshots being built or deleted (swept at start-up).
const STAGING_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub source_volume_id: String,
    pub pool: String,
    pub size_bytes: u64,
    pub layout: Layout,
    pub created_unix: i64,
    pub created_nanos: i32,
    /// Group snapshot this one belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Filesystem inside an image volume's snapshot (restores keep it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<ImageFs>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data_path: PathBuf,
}

/// How a snapshot's data is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Reflink where possible, else a sparse copy.
    Copy,
    /// Reflinks only: fails rather than copy data (under a freeze).
    ReflinkOnly,
}

/// Snapshot IDs in order, for ListSnapshots.
pub type SnapshotIndex = Index;

fn now() -> (i64, i32) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs() as i64, t.subsec_nanos() as i32)
}

/// Reads a snapshot directory: ours (with metadata) or the Go driver's.
fn read_snapshot(pool: &Pool, dir: &OwnedFd, id: &str) -> CoreResult<Option<Snapshot>> {
    let data_path = pool.snapshot_dir().join(id).join(DATA);
    match meta::read_at::<SnapshotMeta>(dir.as_fd(), META) {
        Found::Present(m) => Ok(Some(Snapshot { meta: m, data_path })),
        Found::Damaged(why) => Err(CoreError::Damaged {
            what: format!("snapshot {id}"),
            why: format!("its {META}: {why}"),
        }),
        Found::Absent => {
            Ok(go_driver_snapshot(pool, dir, id).map(|meta| Snapshot { meta, data_path }))
        }
    }
}

/// The Go driver's layout: `data/` and one empty directory named after the
/// source volume; the directory's change time is the creation time.
fn go_driver_snapshot(pool: &Pool, dir: &OwnedFd, id: &str) -> Option<SnapshotMeta> {
    let st = nix::sys::stat::fstat(dir).ok()?;
    let listing = nix::dir::Dir::openat(dir.as_fd(), ".", dirfd::DIR_FLAGS, Mode::empty()).ok()?;
    let mut has_data = false;
    let mut source = None;
    for entry in listing.into_iter().flatten() {
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if entry.file_type() != Some(nix::dir::Type::Directory) || name == "." || name == ".." {
            continue;
        }
        if name == DATA {
            has_data = true;
        } else if is_valid_name(name) {
            source = Some(name.to_owned());
        }
    }
    let source = source.filter(|_| has_data)?;
    Some(SnapshotMeta {
        id: id.to_owned(),
        source_volume_id: source,
        pool: pool.name.clone(),
        size_bytes: 0,
        layout: Layout::default_for(super::VolumeMode::Filesystem),
        created_unix: st.st_ctime,
        created_nanos: st.st_ctime_nsec as i32,
        group_id: None,
        fs_type: None,
    })
}

impl Core {
    fn snapshot_in(&self, pool: &Pool, id: &str) -> CoreResult<Option<Snapshot>> {
        let Ok(dirs) = pool.dirs() else {
            return Ok(None);
        };
        let dir = match dirfd::open_dir_at(dirs.snapshots.as_fd(), id) {
            Ok(d) => d,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
            Err(e) => return Err(CoreError::io(format!("open snapshot {id}"), e.into())),
        };
        read_snapshot(pool, &dir, id)
    }

    pub fn find_snapshot(&self, id: &str) -> CoreResult<Option<Snapshot>> {
        if !is_valid_name(id) {
            return Ok(None);
        }
        for pool in self.pools() {
            if let Some(s) = self.snapshot_in(pool, id)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    pub fn get_snapshot(&self, id: &str) -> CoreResult<Snapshot> {
        validate_name("snapshot_id", id)?;
        match self.find_snapshot(id)? {
            Some(s) => Ok(s),
            None => Err(self
                .not_ready_pool(Object::Snapshot, id)
                .unwrap_or_else(|| CoreError::missing(Object::Snapshot, id, &self.node_id))),
        }
    }

    /// Takes a snapshot of `source_id`, or returns the existing one by name.
    pub fn create_snapshot(
        &self,
        name: &str,
        source_id: &str,
        group_id: Option<&str>,
        take: Take,
    ) -> CoreResult<Snapshot> {
        validate_name("name", name)?;
        validate_name("source_volume_id", source_id)?;
        let _guard = self.guards.acquire(Object::Snapshot, name, Access::Write)?;
        if let Some(existing) = self.find_snapshot(name)? {
            if existing.meta.source_volume_id != source_id {
                return Err(CoreError::Conflict {
                    kind: Object::Snapshot,
                    id: name.to_owned(),
                    field: "source volume",
                    have: existing.meta.source_volume_id,
                    asked: source_id.to_owned(),
                });
            }
            return Ok(existing);
        }
        let _source = self
            .guards
            .acquire(Object::Volume, source_id, Access::Read)?;
        let vol = self
            .find_volume(source_id)?
            .ok_or_else(|| CoreError::missing(Object::SourceVolume, source_id, &self.node_id))?;
        let pool = self.pool_of(&vol)?;
        let dirs = pool.dirs()?;
        let (created_unix, created_nanos) = now();
        let snap_meta = SnapshotMeta {
            id: name.to_owned(),
            source_volume_id: source_id.to_owned(),
            pool: pool.name.clone(),
            size_bytes: vol.meta.capacity_bytes,
            layout: vol.meta.layout,
            created_unix,
            created_nanos,
            group_id: group_id.map(str::to_owned),
            fs_type: vol.meta.fs_type,
        };
        if take == Take::Copy {
            // Under a group's freeze the filesystem is already flushed.
            vol.layout().settle(&vol);
        }
        let staging = staging_name(pool, name, "new");
        remove_in_snapshots(pool, &staging);
        let built = (|| {
            nix::sys::stat::mkdirat(
                dirs.snapshots.as_fd(),
                staging.as_str(),
                Mode::from_bits_truncate(0o700),
            )
            .context(|| format!("create snapshot staging {staging}"))?;
            let staged = dirfd::open_dir_at(dirs.snapshots.as_fd(), staging.as_str())
                .context(|| format!("open snapshot staging {staging}"))?;
            let data = pool.snapshot_dir().join(&staging).join(DATA);
            match (vol.meta.layout.is_file(), take) {
                (true, Take::ReflinkOnly) => copy::reflink_file_new(&vol.path, &data)?,
                (true, Take::Copy) => copy::copy_file_new(&vol.path, &data).map(drop)?,
                (false, _) => {
                    std::fs::create_dir(&data).context(|| format!("create {}", data.display()))?;
                    copy::copy_tree_contents(&vol.path, &data)?
                }
            }
            meta::write_at(staged.as_fd(), META, &snap_meta)?;
            // Under a group's freeze the reflinks are made durable after the
            // thaw (the group syncs before it answers): no flush in the window.
            if take == Take::Copy {
                pool.sync_snapshots(&dirs)?;
            }
            nix::fcntl::renameat(
                dirs.snapshots.as_fd(),
                staging.as_str(),
                dirs.snapshots.as_fd(),
                name,
            )
            .context(|| format!("move snapshot {name} into place"))?;
            nix::unistd::fsync(dirs.snapshots.as_fd())
                .context(|| "flush the snapshot directory".into())
        })();
        if let Err(e) = built {
            remove_in_snapshots(pool, &staging);
            return Err(e.in_pool(&pool.name, || format!("snapshot {name}")));
        }
        self.snapshot_index
            .insert(name, self.pool_index(&pool.name));
        tracing::info!(snapshot = name, volume = source_id, pool = %pool.name, "snapshot created");
        Ok(Snapshot {
            meta: snap_meta,
            data_path: pool.snapshot_dir().join(name).join(DATA),
        })
    }

    /// Deletes a snapshot; an unknown ID is success.
    pub fn delete_snapshot(&self, id: &str) -> CoreResult<()> {
        if id.is_empty() {
            return Err(CoreError::Required {
                field: "snapshot_id",
            });
        }
        if !is_valid_name(id) {
            return Ok(());
        }
        let _guard = self.guards.acquire(Object::Snapshot, id, Access::Write)?;
        let mut found = false;
        for pool in self.pools() {
            let Ok(dirs) = pool.dirs() else { continue };
            if nix::sys::stat::fstatat(
                dirs.snapshots.as_fd(),
                id,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_err()
            {
                continue;
            }
            // Aside in the snapshot directory (a crash leaves a name that
            // start-up sweeps), durably, then removed.
            let doomed = staging_name(pool, id, "delete");
            remove_in_snapshots(pool, &doomed);
            nix::fcntl::renameat(
                dirs.snapshots.as_fd(),
                id,
                dirs.snapshots.as_fd(),
                doomed.as_str(),
            )
            .context(|| format!("move snapshot {id} aside"))?;
            nix::unistd::fsync(dirs.snapshots.as_fd())
                .context(|| "flush the snapshot directory".into())?;
            pool.discard_snapshot(&dirs, doomed);
            tracing::info!(snapshot = id, pool = %pool.name, "snapshot deleted");
            found = true;
        }
        if !found {
            if let Some(e) = self.not_ready_pool(Object::Snapshot, id) {
                return Err(e);
            }
        }
        self.snapshot_index.remove(id);
        Ok(())
    }

    /// DeleteSnapshot as a CO sends it: a member of a group snapshot that
    /// still exists must not be deleted on its own (the CSI spec's
    /// INVALID_ARGUMENT); the group is deleted as a whole.
    pub fn delete_standalone_snapshot(&self, id: &str) -> CoreResult<()> {
        if let Some(s) = self.find_snapshot(id).ok().flatten() {
            if let Some(group) = s.meta.group_id.as_deref() {
                if self.group_exists(group) {
                    return Err(CoreError::Unacceptable(format!(
                        "snapshot {id} is part of group snapshot {group}: delete the group snapshot instead"
                    )));
                }
            }
        }
        self.delete_snapshot(id)
    }

    fn rebuild_snapshot_index(&self) -> BTreeMap<String, usize> {
        let mut map = BTreeMap::new();
        for (i, pool) in self.pools().iter().enumerate() {
            let Ok(dirs) = pool.dirs() else { continue };
            let Ok(listing) =
                nix::dir::Dir::openat(dirs.snapshots.as_fd(), ".", dirfd::DIR_FLAGS, Mode::empty())
            else {
                continue;
            };
            for entry in listing.into_iter().flatten() {
                let Ok(name) = entry.file_name().to_str() else {
                    continue;
                };
                if is_valid_name(name) && entry.file_type() != Some(nix::dir::Type::File) {
                    map.entry(name.to_owned()).or_insert(i);
                }
            }
        }
        map
    }

    /// One page of snapshots, filtered by snapshot ID and/or source volume.
    pub fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        start_token: &str,
        max_entries: i32,
    ) -> CoreResult<(Vec<Snapshot>, String)> {
        let max = page_size(max_entries)?;
        if !snapshot_id.is_empty() {
            let found = self.find_snapshot(snapshot_id).ok().flatten();
            let matches = found.filter(|s| {
                source_volume_id.is_empty() || s.meta.source_volume_id == source_volume_id
            });
            return Ok((matches.into_iter().collect(), String::new()));
        }
        let after = token::decode(start_token)?;
        self.snapshot_index
            .refresh(after.is_none(), || self.rebuild_snapshot_index());
        let (page, more) = self.snapshot_index.page(after.as_deref(), max, |id, pool| {
            let s = match self.snapshot_in(&self.pools()[pool], id) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(snapshot = id, error = %e, "snapshot left out of the listing");
                    return Ok(None);
                }
            };
            Ok(s.filter(|s| source_volume_id.is_empty() || s.meta.source_volume_id == source_volume_id))
        })?;
        let next = next_token(more, page.last().map(|s| s.meta.id.as_str()));
        Ok((page, next))
    }
}

/// The name of a snapshot being built or deleted by this process: start-up
/// recovery removes those of earlier processes only, and in a shared pool
/// only this node's.
fn staging_name(pool: &Pool, id: &str, purpose: &str) -> String {
    format!(
        "{STAGING_PREFIX}{id}.{purpose}{}@{}",
        pool.node_tag(),
        dirfd::instance_tag()
    )
}

/// Whether a staging entry was left by an earlier process of this node.
fn left_by_earlier_run(pool: &Pool, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
        return false;
    };
    let Some((head, instance)) = rest.rsplit_once('@') else {
        // Named by an older version of this driver: no instance at all.
        return pool.node_tag().is_empty();
    };
    instance != dirfd::instance_tag() && head.ends_with(pool.node_tag())
}

/// Removes an entry of the snapshot directory (a staging or doomed copy).
fn remove_in_snapshots(pool: &Pool, name: &str) {
    let Ok(dirs) = pool.dirs() else { return };
    let Ok(cname) = CString::new(name) else {
        return;
    };
    if let Err(errors) = crate::tree::remove(
        dirs.snapshots.as_fd(),
        &cname,
        &pool.snapshot_dir().join(name),
    ) {
        for e in errors.iter().take(3) {
            tracing::warn!(pool = %pool.name, entry = name, error = %e, "cannot remove; start-up will retry");
        }
    }
}

/// Removes half-built and half-deleted snapshots an earlier run left.
pub fn recover(_core: &Core, pool: &Pool) {
    let Ok(dirs) = pool.dirs() else { return };
    let leftovers: Vec<String> = dirfd::entry_names(dirs.snapshots.as_fd())
        .into_iter()
        .filter(|n| left_by_earlier_run(pool, n))
        .collect();
    for name in leftovers {
        tracing::info!(pool = %pool.name, entry = %name, "removing half-built snapshot");
        remove_in_snapshots(pool, &name);
    }
}
