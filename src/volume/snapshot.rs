//! Snapshots: a reflink-or-sparse copy of a volume under
//! `<snapshot dir>/<snapshot_id>/{data, meta.json}`, built aside and renamed
//! into place when complete.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{meta, remove_any, token, Core, Layout};
use crate::copy;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::names::{is_valid_name, validate_name};
use crate::pool::Pool;

const DATA: &str = "data";
const META: &str = "meta.json";
const STAGING_PREFIX: &str = ".tmp-";
/// Group snapshot metadata, inside the default pool's snapshot directory.
const GROUPS: &str = ".groups";
/// Journal of a group snapshot in progress (`<prefix><name>.json`).
const PENDING_PREFIX: &str = ".pending-";

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
    pub fs_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data_path: PathBuf,
}

/// Removes half-built snapshots (and half-deleted ones), and undoes group
/// snapshots an earlier run did not finish: thaws what they froze and
/// removes the members they took.
pub fn sweep_orphans(pool: &Pool) {
    recover_groups(&pool.snapshot_dir().join(GROUPS));
    let Ok(entries) = fs::read_dir(pool.snapshot_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(STAGING_PREFIX) {
            tracing::info!(pool = %pool.name, path = %entry.path().display(), "removing half-built snapshot");
            remove_any(&entry.path());
        }
    }
}

impl Core {
    fn snapshot_in(&self, pool: &Pool, id: &str) -> CoreResult<Option<Snapshot>> {
        let dir = pool.snapshot_dir().join(id);
        let Some(m) = meta::read::<SnapshotMeta>(&dir.join(META))? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: m,
            data_path: dir.join(DATA),
        }))
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
        validate_name("snapshot ID", id)?;
        self.find_snapshot(id)?.ok_or_else(|| {
            CoreError::NotFound(format!(
                "snapshot {id} does not exist on node {}",
                self.node_id
            ))
        })
    }

    /// Takes a snapshot of `source_id`, or returns the existing one by name.
    pub fn create_snapshot(
        &self,
        name: &str,
        source_id: &str,
        group_id: Option<&str>,
    ) -> CoreResult<Snapshot> {
        validate_name("name", name)?;
        validate_name("source_volume_id", source_id)?;
        let _lock = self.lock("snapshot", name)?;
        if let Some(existing) = self.find_snapshot(name)? {
            if existing.meta.source_volume_id != source_id {
                return Err(CoreError::AlreadyExists(format!(
                    "snapshot {name} already exists for volume {}",
                    existing.meta.source_volume_id
                )));
            }
            return Ok(existing);
        }
        let _source_lock = self.lock("volume", source_id).ok();
        let volume = self.find_volume(source_id)?.ok_or_else(|| {
            CoreError::NotFound(format!(
                "source volume {source_id} does not exist on node {}",
                self.node_id
            ))
        })?;
        let pool = self.pool_of(&volume)?;
        let staging = pool
            .snapshot_dir()
            .join(format!("{STAGING_PREFIX}{name}.{}", std::process::id()));
        remove_any(&staging);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let snap_meta = SnapshotMeta {
            id: name.to_owned(),
            source_volume_id: source_id.to_owned(),
            pool: pool.name.clone(),
            size_bytes: volume.meta.capacity_bytes,
            layout: volume.meta.layout,
            created_unix: now.as_secs() as i64,
            created_nanos: now.subsec_nanos() as i32,
            group_id: group_id.map(str::to_owned),
            fs_type: volume.meta.fs_type.clone(),
        };
        let build = || -> CoreResult<()> {
            fs::create_dir(&staging).context(|| format!("create {}", staging.display()))?;
            let data = staging.join(DATA);
            if volume.meta.layout.is_file() {
                copy::copy_file_new(&volume.path, &data)?;
            } else {
                fs::create_dir(&data).context(|| format!("create {}", data.display()))?;
                copy::copy_tree_contents(&volume.path, &data)?;
            }
            meta::write_atomic(&staging.join(META), &snap_meta)?;
            pool.sync()?;
            fs::rename(&staging, pool.snapshot_dir().join(name))
                .context(|| format!("move snapshot {name} into place"))?;
            pool.sync()
        };
        if let Err(e) = build() {
            remove_any(&staging);
            return Err(match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => CoreError::ResourceExhausted(format!(
                    "pool {} has no space left for snapshot {name}",
                    pool.name
                )),
                _ => e,
            });
        }
        tracing::info!(snapshot = name, volume = source_id, pool = %pool.name, "snapshot created");
        self.snapshot_in(pool, name)?
            .ok_or_else(|| CoreError::Internal(format!("snapshot {name} vanished after creation")))
    }

    /// Deletes a snapshot; an unknown ID is success.
    pub fn delete_snapshot(&self, id: &str) -> CoreResult<()> {
        if id.is_empty() {
            return Err(CoreError::InvalidArgument("snapshot_id is required".into()));
        }
        if !is_valid_name(id) {
            return Ok(());
        }
        let _lock = self.lock("snapshot", id)?;
        for pool in self.pools() {
            let dir = pool.snapshot_dir().join(id);
            if fs::symlink_metadata(&dir).is_ok() {
                // Aside within the snapshot directory: `snapshotPath` may be
                // another filesystem than the pool, and a crash leaves a name
                // that start-up sweeps.
                let doomed = pool.snapshot_dir().join(format!(
                    "{STAGING_PREFIX}{id}.delete.{}",
                    std::process::id()
                ));
                remove_any(&doomed);
                fs::rename(&dir, &doomed).context(|| format!("move {} aside", dir.display()))?;
                pool.sync()?;
                remove_any(&doomed);
                tracing::info!(snapshot = id, pool = %pool.name, "snapshot deleted");
            }
        }
        Ok(())
    }

    /// DeleteSnapshot as a CO sends it: a member of a group snapshot that
    /// still exists must not be deleted on its own (the CSI spec's
    /// INVALID_ARGUMENT); the group is deleted as a whole.
    pub fn delete_standalone_snapshot(&self, id: &str) -> CoreResult<()> {
        if let Some(s) = self.find_snapshot(id)? {
            if let Some(group) = s.meta.group_id.as_deref() {
                if self.read_group(group)?.is_some() {
                    return Err(CoreError::InvalidArgument(format!(
                        "snapshot {id} is part of group snapshot {group}: delete the group snapshot instead"
                    )));
                }
            }
        }
        self.delete_snapshot(id)
    }

    /// Every snapshot, sorted by ID.
    pub fn all_snapshots(&self) -> Vec<Snapshot> {
        let mut out = Vec::new();
        for pool in self.pools() {
            let Ok(entries) = fs::read_dir(pool.snapshot_dir()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !is_valid_name(&name) {
                    continue;
                }
                if let Ok(Some(s)) = self.snapshot_in(pool, &name) {
                    out.push(s);
                }
            }
        }
        out.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        out.dedup_by(|a, b| a.meta.id == b.meta.id);
        out
    }

    /// One page of snapshots, filtered by snapshot ID and/or source volume.
    pub fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        start_token: &str,
        max_entries: i32,
    ) -> CoreResult<(Vec<Snapshot>, String)> {
        if max_entries < 0 {
            return Err(CoreError::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let after = token::decode(start_token)?;
        let all: Vec<Snapshot> = self
            .all_snapshots()
            .into_iter()
            .filter(|s| snapshot_id.is_empty() || s.meta.id == snapshot_id)
            .filter(|s| source_volume_id.is_empty() || s.meta.source_volume_id == source_volume_id)
            .collect();
        Ok(token::page(
            all,
            after.as_deref(),
            max_entries as usize,
            |s| &s.meta.id,
        ))
    }
}

/// A group snapshot: member snapshots taken as close to one moment as the
/// node allows (image filesystems frozen while members are reflinked).
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    pub id: String,
    pub members: Vec<Snapshot>,
    pub created_unix: i64,
    pub created_nanos: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupMeta {
    id: String,
    source_volume_ids: Vec<String>,
    member_ids: Vec<String>,
    created_unix: i64,
    created_nanos: i32,
}

/// Written before anything is frozen or taken, removed when the group is
/// complete or undone: what start-up must thaw and remove after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingGroup {
    id: String,
    /// Mount points that may be frozen.
    frozen: Vec<PathBuf>,
    /// Snapshot directories of the members.
    members: Vec<PathBuf>,
}

nix::ioctl_readwrite_bad!(fifreeze, 0xC004_5877, libc::c_int);
nix::ioctl_readwrite_bad!(fithaw, 0xC004_5878, libc::c_int);

/// One group at a time freezes: a second would see EBUSY and could thaw a
/// filesystem the first still needs frozen.
static FREEZE_LOCK: Mutex<()> = Mutex::new(());

/// Frozen filesystems, thawed on drop whatever happens.
struct Frozen(Vec<(PathBuf, fs::File)>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for (path, dir) in self.0.drain(..).rev() {
            match thaw(&dir) {
                Ok(()) => tracing::info!(mount = %path.display(), "filesystem thawed"),
                Err(e) => {
                    tracing::error!(mount = %path.display(), error = %e, "cannot thaw filesystem")
                }
            }
        }
    }
}

fn thaw(dir: &fs::File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW on a directory of the filesystem.
    unsafe { fithaw(std::os::fd::AsRawFd::as_raw_fd(dir), &mut arg) }.map(drop)
}

/// Undoes the group snapshots a previous run left pending in `groups`.
fn recover_groups(groups: &Path) {
    let Ok(entries) = fs::read_dir(groups) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(PENDING_PREFIX) {
            continue;
        }
        let pending = match meta::read::<PendingGroup>(&entry.path()) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "unreadable group journal removed");
                let _ = fs::remove_file(entry.path());
                continue;
            }
        };
        for mount_point in &pending.frozen {
            // EINVAL: it was not frozen (or the freeze never happened).
            if let Ok(dir) = fs::File::open(mount_point) {
                if thaw(&dir).is_ok() {
                    tracing::warn!(mount = %mount_point.display(), group = %pending.id, "thawed a filesystem an interrupted group snapshot left frozen");
                }
            }
        }
        let complete = groups.join(format!("{}.json", pending.id)).exists();
        if !complete {
            for dir in &pending.members {
                let member = meta::read::<SnapshotMeta>(&dir.join(META)).ok().flatten();
                if member.is_some_and(|m| m.group_id.as_deref() == Some(pending.id.as_str())) {
                    tracing::info!(group = %pending.id, snapshot = %dir.display(), "removing a member of an interrupted group snapshot");
                    remove_any(dir);
                }
            }
        }
        let _ = fs::remove_file(entry.path());
    }
}

/// True when both lists hold the same IDs, in any order.
fn same_set(a: &[String], b: &[String]) -> bool {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    sorted(a) == sorted(b)
}

/// Refuses a `snapshot_ids` list that is not the group's members. An empty
/// list is accepted: the ID alone names the group here.
fn check_members(g: &GroupMeta, snapshot_ids: &[String]) -> CoreResult<()> {
    if snapshot_ids.is_empty() || same_set(&g.member_ids, snapshot_ids) {
        return Ok(());
    }
    Err(CoreError::InvalidArgument(format!(
        "snapshot_ids {snapshot_ids:?} are not the members of group snapshot {} ({:?})",
        g.id, g.member_ids
    )))
}

fn member_id(group: &str, index: usize) -> String {
    let base: String = group.chars().take(crate::names::MAX_NAME_LEN - 8).collect();
    format!("{base}-m{index}")
}

impl Core {
    fn group_dir(&self) -> PathBuf {
        self.default_pool().snapshot_dir().join(GROUPS)
    }

    fn read_group(&self, id: &str) -> CoreResult<Option<GroupMeta>> {
        meta::read::<GroupMeta>(&self.group_dir().join(format!("{id}.json")))
    }

    fn group_from_meta(&self, g: GroupMeta) -> CoreResult<GroupSnapshot> {
        let members = g
            .member_ids
            .iter()
            .map(|m| {
                self.find_snapshot(m)?.ok_or_else(|| {
                    CoreError::Internal(format!(
                        "group snapshot {} is damaged: its member snapshot {m} is missing",
                        g.id
                    ))
                })
            })
            .collect::<CoreResult<Vec<_>>>()?;
        Ok(GroupSnapshot {
            id: g.id,
            members,
            created_unix: g.created_unix,
            created_nanos: g.created_nanos,
        })
    }

    pub fn create_group_snapshot(
        &self,
        name: &str,
        sources: &[String],
    ) -> CoreResult<GroupSnapshot> {
        validate_name("name", name)?;
        for s in sources {
            validate_name("source_volume_id", s)?;
        }
        let _lock = self.lock("group", name)?;
        if let Some(existing) = self.read_group(name)? {
            if !same_set(&existing.source_volume_ids, sources) {
                return Err(CoreError::AlreadyExists(format!(
                    "group snapshot {name} already exists for volumes {:?}",
                    existing.source_volume_ids
                )));
            }
            return self.group_from_meta(existing);
        }
        let mut volumes = Vec::new();
        for s in sources {
            volumes.push(self.find_volume(s)?.ok_or_else(|| {
                CoreError::NotFound(format!(
                    "source volume {s} does not exist on node {}",
                    self.node_id
                ))
            })?);
        }
        let mut member_dirs = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let id = member_id(name, i);
            if let Some(taken) = self.find_snapshot(&id)? {
                if taken.meta.group_id.as_deref() != Some(name) {
                    return Err(CoreError::AlreadyExists(format!(
                        "snapshot {id}, the name of member {i} of group snapshot {name}, is already taken"
                    )));
                }
                // Left by an earlier attempt at this very group whose
                // clean-up failed: garbage, not a conflict.
                tracing::info!(group = name, snapshot = %id, "removing a member left by a failed attempt");
                self.delete_snapshot(&id)?;
            }
            member_dirs.push(self.pool_of(v)?.snapshot_dir().join(&id));
        }
        // Only image filesystems can be frozen. A published directory or
        // Block volume keeps taking writes while the other members are
        // taken, so several of them cannot be write-order consistent, which
        // the spec requires or else a failure.
        if volumes.len() > 1 {
            for v in volumes.iter().filter(|v| v.meta.layout != Layout::Image) {
                if let Some(at) = self.publications(v)?.first() {
                    return Err(CoreError::FailedPrecondition(format!(
                        "cannot snapshot these volumes together: {} is published at {} and, not being a layout: image volume, cannot be frozen; unpublish it (stop the VM) or snapshot it on its own",
                        v.meta.id,
                        at.display()
                    )));
                }
            }
        }
        let _one_freezer = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut mounts = Vec::new();
        for v in volumes.iter().filter(|v| v.meta.layout == Layout::Image) {
            mounts.push(self.publications(v)?);
        }
        let journal = self
            .group_dir()
            .join(format!("{PENDING_PREFIX}{name}.json"));
        fs::create_dir_all(self.group_dir())
            .context(|| "create group snapshot directory".into())?;
        meta::write_atomic(
            &journal,
            &PendingGroup {
                id: name.to_owned(),
                frozen: mounts.iter().flatten().cloned().collect(),
                members: member_dirs,
            },
        )?;
        // The group's creation time is when it is taken: at the freeze.
        let taken_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut frozen = Frozen(Vec::new());
        let taken =
            freeze_all(&mounts, &mut frozen).and_then(|()| self.take_members(name, sources));
        drop(frozen);
        let members = match taken {
            Ok(members) => members,
            Err((e, partial)) => {
                for m in &partial {
                    if let Err(err) = self.delete_snapshot(&m.meta.id) {
                        tracing::warn!(snapshot = %m.meta.id, error = %err, "cannot remove a member of a failed group snapshot; start-up will");
                        return Err(e);
                    }
                }
                let _ = fs::remove_file(&journal);
                return Err(e);
            }
        };
        let g = GroupMeta {
            id: name.to_owned(),
            source_volume_ids: sources.to_vec(),
            member_ids: members.iter().map(|m| m.meta.id.clone()).collect(),
            created_unix: taken_at.as_secs() as i64,
            created_nanos: taken_at.subsec_nanos() as i32,
        };
        meta::write_atomic(&self.group_dir().join(format!("{name}.json")), &g)?;
        self.default_pool().sync()?;
        let _ = fs::remove_file(&journal);
        tracing::info!(
            group = name,
            members = members.len(),
            "group snapshot created"
        );
        Ok(GroupSnapshot {
            id: g.id,
            members,
            created_unix: g.created_unix,
            created_nanos: g.created_nanos,
        })
    }

    /// Snapshots every source in turn; on failure returns what was taken.
    fn take_members(
        &self,
        group: &str,
        sources: &[String],
    ) -> Result<Vec<Snapshot>, (CoreError, Vec<Snapshot>)> {
        let mut members = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            match self.create_snapshot(&member_id(group, i), s, Some(group)) {
                Ok(snap) => members.push(snap),
                Err(e) => return Err((e, members)),
            }
        }
        Ok(members)
    }

    /// The group snapshot `id`. `snapshot_ids`, when the CO sends them,
    /// must be exactly its members (the spec's mismatch INVALID_ARGUMENT).
    pub fn get_group_snapshot(
        &self,
        id: &str,
        snapshot_ids: &[String],
    ) -> CoreResult<GroupSnapshot> {
        validate_name("group_snapshot_id", id)?;
        let g = self
            .read_group(id)?
            .ok_or_else(|| CoreError::NotFound(format!("group snapshot {id} does not exist")))?;
        check_members(&g, snapshot_ids)?;
        self.group_from_meta(g)
    }

    /// Deletes a group snapshot and its members; an unknown group is success.
    pub fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> CoreResult<()> {
        if !is_valid_name(id) {
            return Ok(());
        }
        let _lock = self.lock("group", id)?;
        let Some(g) = self.read_group(id)? else {
            return Ok(());
        };
        check_members(&g, snapshot_ids)?;
        for m in &g.member_ids {
            self.delete_snapshot(m)?;
        }
        meta::remove(&self.group_dir().join(format!("{id}.json")))?;
        self.default_pool().sync()?;
        tracing::info!(group = id, "group snapshot deleted");
        Ok(())
    }
}

/// Freezes each image filesystem through one of its mounts (they all
/// reach the same superblock). Already frozen (EBUSY) is left alone:
/// whoever froze it thaws it.
fn freeze_all(
    mounts: &[Vec<PathBuf>],
    frozen: &mut Frozen,
) -> Result<(), (CoreError, Vec<Snapshot>)> {
    for mount_point in mounts.iter().filter_map(|m| m.first()) {
        let fail = |what: &str, e: std::io::Error| {
            (
                CoreError::io(format!("{what} {}", mount_point.display()), e),
                Vec::new(),
            )
        };
        let dir = fs::File::open(mount_point).map_err(|e| fail("open", e))?;
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE on a directory of the mounted filesystem.
        match unsafe { fifreeze(std::os::fd::AsRawFd::as_raw_fd(&dir), &mut arg) } {
            Ok(_) => {
                tracing::info!(mount = %mount_point.display(), "filesystem frozen");
                frozen.0.push((mount_point.clone(), dir));
            }
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(fail("FIFREEZE", e.into())),
        }
    }
    Ok(())
}
