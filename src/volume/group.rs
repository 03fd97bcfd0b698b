//! Group snapshots: member snapshots taken as close to one moment as the
//! node allows. Members nobody has published cannot change and are copied
//! first; published `layout: image` members are then frozen and reflinked
//! in one short window with a hard deadline. A freeze is never held across
//! a data copy: a published member whose pool cannot reflink is refused.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::freeze::{self, Freeze};
use super::guard::Access;
use super::meta::{self, Found};
use super::snapshot::{Snapshot, Take};
use super::{Core, Volume};
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::names::{is_valid_name, validate_name, MAX_NAME_LEN};

/// Group snapshot metadata, inside the default pool's snapshot directory.
const GROUPS: &str = ".groups";
/// Journal of a group snapshot in progress (`<prefix><name>.json`).
const PENDING_PREFIX: &str = ".pending-";

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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PendingGroup {
    id: String,
    /// Mount points this driver froze (or was about to freeze).
    frozen: Vec<PathBuf>,
    /// The device of each frozen filesystem, so recovery never thaws what
    /// is mounted there now if it is another filesystem.
    #[serde(default)]
    frozen_devs: Vec<u64>,
    /// Snapshot directories of the members.
    members: Vec<PathBuf>,
    /// The process that took the group (see `dirfd::instance_tag`).
    #[serde(default)]
    instance: String,
}

fn member_id(group: &str, index: usize) -> String {
    let base: String = group.chars().take(MAX_NAME_LEN - 8).collect();
    format!("{base}-m{index}")
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
    Err(CoreError::Unacceptable(format!(
        "snapshot_ids {snapshot_ids:?} are not the members of group snapshot {} ({:?})",
        g.id, g.member_ids
    )))
}

/// One member to take: its source and where it is published.
struct Member {
    id: String,
    source: String,
    mounted_at: Option<PathBuf>,
}

impl Core {
    fn groups_dir(&self) -> CoreResult<std::os::fd::OwnedFd> {
        let dirs = self.default_pool().dirs()?;
        if let Ok(fd) = crate::dirfd::open_dir_at(dirs.snapshots.as_fd(), GROUPS) {
            return Ok(fd);
        }
        match nix::sys::stat::mkdirat(
            dirs.snapshots.as_fd(),
            GROUPS,
            nix::sys::stat::Mode::from_bits_truncate(0o700),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => {
                return Err(CoreError::io(
                    "create the group snapshot directory",
                    e.into(),
                ))
            }
        }
        crate::dirfd::open_dir_at(dirs.snapshots.as_fd(), GROUPS)
            .context(|| "open the group snapshot directory".into())
    }

    fn read_group(&self, id: &str) -> CoreResult<Option<GroupMeta>> {
        let dirs = self.default_pool().dirs()?;
        let groups = match crate::dirfd::open_dir_at(dirs.snapshots.as_fd(), GROUPS) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(CoreError::io("open the group snapshot directory", e.into())),
        };
        match meta::read_at::<GroupMeta>(groups.as_fd(), &format!("{id}.json")) {
            Found::Present(g) => Ok(Some(g)),
            Found::Absent => Ok(None),
            Found::Damaged(why) => Err(CoreError::Damaged {
                what: format!("group snapshot {id}"),
                why,
            }),
        }
    }

    pub(crate) fn group_exists(&self, id: &str) -> bool {
        !matches!(self.read_group(id), Ok(None))
    }

    fn group_from_meta(&self, g: GroupMeta) -> CoreResult<GroupSnapshot> {
        let members = g
            .member_ids
            .iter()
            .map(|m| {
                self.find_snapshot(m)?.ok_or_else(|| CoreError::Damaged {
                    what: format!("group snapshot {}", g.id),
                    why: format!("its member snapshot {m} is missing"),
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
            validate_name("source_volume_ids", s)?;
        }
        let _guard = self
            .guards
            .acquire(Object::GroupSnapshot, name, Access::Write)?;
        if let Some(existing) = self.read_group(name)? {
            if !same_set(&existing.source_volume_ids, sources) {
                return Err(CoreError::Conflict {
                    kind: Object::GroupSnapshot,
                    id: name.to_owned(),
                    field: "source volumes",
                    have: format!("{:?}", existing.source_volume_ids),
                    asked: format!("{sources:?}"),
                });
            }
            return self.group_from_meta(existing);
        }
        // Nobody publishes or unpublishes a member while the group is taken.
        let _held = self
            .guards
            .acquire_all(Object::Volume, sources, Access::Node)?;
        let members = self.plan_members(name, sources)?;
        let journal = format!("{PENDING_PREFIX}{name}.json");
        let groups = self.groups_dir()?;
        let mut pending = PendingGroup {
            id: name.to_owned(),
            instance: crate::dirfd::instance_tag().to_owned(),
            frozen: Vec::new(),
            frozen_devs: Vec::new(),
            members: members
                .iter()
                .filter_map(|m| self.member_dir(&m.source, &m.id).ok())
                .collect(),
        };
        meta::write_at(groups.as_fd(), &journal, &pending)?;
        let taken = self.take_members(name, &members, &mut pending, &groups, &journal);
        if !pending.frozen.is_empty() {
            // Thawed by now, whatever happened: a journal left behind must
            // not make a later start thaw a freeze someone else took.
            pending.frozen.clear();
            pending.frozen_devs.clear();
            let _ = meta::write_at(groups.as_fd(), &journal, &pending);
        }
        let (snapshots, taken_at) = match taken {
            Ok(t) => t,
            Err((e, partial)) => {
                for id in &partial {
                    if let Err(err) = self.delete_snapshot(id) {
                        tracing::warn!(snapshot = %id, error = %err, "cannot remove a member of a failed group snapshot; start-up will");
                        return Err(e);
                    }
                }
                let _ = crate::dirfd::remove_durably(groups.as_fd(), &journal);
                return Err(e);
            }
        };
        let g = GroupMeta {
            id: name.to_owned(),
            source_volume_ids: sources.to_vec(),
            member_ids: snapshots.iter().map(|m| m.meta.id.clone()).collect(),
            created_unix: taken_at.0,
            created_nanos: taken_at.1,
        };
        meta::write_at(groups.as_fd(), &format!("{name}.json"), &g)?;
        let _ = crate::dirfd::remove_durably(groups.as_fd(), &journal);
        tracing::info!(
            group = name,
            members = snapshots.len(),
            "group snapshot created"
        );
        Ok(GroupSnapshot {
            id: g.id,
            members: snapshots,
            created_unix: g.created_unix,
            created_nanos: g.created_nanos,
        })
    }

    fn member_dir(&self, source: &str, member: &str) -> CoreResult<PathBuf> {
        let vol = self.get_volume(source)?;
        Ok(self.pool_of(&vol)?.snapshot_dir().join(member))
    }

    /// Checks the sources and says which are published where. Several
    /// members can be write-order consistent only if every published one
    /// can be frozen, and frozen only briefly if its pool can reflink.
    fn plan_members(&self, name: &str, sources: &[String]) -> CoreResult<Vec<Member>> {
        let volumes: Vec<Volume> = sources
            .iter()
            .map(|s| {
                self.find_volume(s)?
                    .ok_or_else(|| CoreError::missing(Object::SourceVolume, s, &self.node_id))
            })
            .collect::<CoreResult<_>>()?;
        let mut members = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let id = member_id(name, i);
            if let Some(taken) = self.find_snapshot(&id)? {
                if taken.meta.group_id.as_deref() != Some(name) {
                    return Err(CoreError::Conflict {
                        kind: Object::Snapshot,
                        id,
                        field: "group",
                        have: format!("{:?}", taken.meta.group_id),
                        asked: name.to_owned(),
                    });
                }
                // Left by an earlier attempt at this very group whose
                // clean-up failed: garbage, not a conflict.
                tracing::info!(group = name, snapshot = %id, "removing a member left by a failed attempt");
                self.delete_snapshot(&id)?;
            }
            let mounted_at = self.publications(v)?.into_iter().next();
            if let Some(at) = &mounted_at {
                self.check_freezable(v, at, volumes.len())?;
            }
            members.push(Member {
                id,
                source: v.id().to_owned(),
                mounted_at: mounted_at.filter(|_| v.layout().freezable()),
            });
        }
        Ok(members)
    }

    fn check_freezable(
        &self,
        v: &Volume,
        at: &std::path::Path,
        group_size: usize,
    ) -> CoreResult<()> {
        if !v.layout().freezable() {
            if group_size > 1 {
                return Err(CoreError::NotPossibleHere(format!(
                    "cannot snapshot these volumes together: {} is published at {} and, not being a layout: image volume, cannot be frozen; unpublish it (stop the VM) or snapshot it on its own",
                    v.id(),
                    at.display()
                )));
            }
            return Ok(());
        }
        if !self.pool_of(v)?.dirs()?.reflink {
            return Err(CoreError::NotPossibleHere(format!(
                "cannot snapshot {} while it is published at {}: its pool cannot reflink, so its filesystem would stay frozen for a whole data copy; unpublish it (stop the VM) first, or use a pool on XFS with reflink or btrfs",
                v.id(),
                at.display()
            )));
        }
        Ok(())
    }

    /// Copies the unpublished members, then freezes the published ones and
    /// reflinks them. On failure returns the member IDs already taken.
    #[allow(clippy::type_complexity)]
    fn take_members(
        &self,
        group: &str,
        members: &[Member],
        pending: &mut PendingGroup,
        groups: &std::os::fd::OwnedFd,
        journal: &str,
    ) -> Result<(Vec<Snapshot>, (i64, i32)), (CoreError, Vec<String>)> {
        let mut taken: Vec<Snapshot> = Vec::new();
        let fail = |e, taken: &[Snapshot]| {
            (
                e,
                taken.iter().map(|s| s.meta.id.clone()).collect::<Vec<_>>(),
            )
        };
        for m in members.iter().filter(|m| m.mounted_at.is_none()) {
            match self.create_snapshot(&m.id, &m.source, Some(group), Take::Copy) {
                Ok(s) => taken.push(s),
                Err(e) => return Err(fail(e, &taken)),
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let taken_at = (now.as_secs() as i64, now.subsec_nanos() as i32);
        let window = Freeze::start(self.settings.freeze_timeout);
        for m in members.iter().filter(|m| m.mounted_at.is_some()) {
            let at = m.mounted_at.clone().expect("filtered");
            // Recorded with its device: recovery thaws it only if the
            // filesystem mounted there then is this one.
            let dev = match std::fs::metadata(&at) {
                Ok(st) => std::os::unix::fs::MetadataExt::dev(&st),
                Err(e) => {
                    return Err(fail(
                        CoreError::io(format!("stat {}", at.display()), e),
                        &taken,
                    ))
                }
            };
            pending.frozen.push(at.clone());
            pending.frozen_devs.push(dev);
            let frozen = meta::write_at(groups.as_fd(), journal, &*pending)
                .and_then(|()| window.freeze(&at));
            if let Err(e) = frozen {
                pending.frozen.pop();
                pending.frozen_devs.pop();
                let _ = meta::write_at(groups.as_fd(), journal, &*pending);
                return Err(fail(e, &taken));
            }
        }
        for m in members.iter().filter(|m| m.mounted_at.is_some()) {
            match self.create_snapshot(&m.id, &m.source, Some(group), Take::ReflinkOnly) {
                Ok(s) => taken.push(s),
                Err(e) => return Err(fail(e, &taken)),
            }
        }
        if window.end() {
            return Err(fail(
                CoreError::Internal("the freeze deadline passed while the group's members were taken; the group snapshot was not taken".into()),
                &taken,
            ));
        }
        // What was reflinked under the freeze is made durable now, thawed.
        for m in members.iter().filter(|m| m.mounted_at.is_some()) {
            let synced = self.get_volume(&m.source).and_then(|vol| {
                let pool = self.pool_of(&vol)?;
                pool.sync_snapshots(&*pool.dirs()?)
            });
            if let Err(e) = synced {
                return Err(fail(e, &taken));
            }
        }
        // Members in the order of the sources.
        taken.sort_by_key(|s| members.iter().position(|m| m.id == s.meta.id));
        Ok((taken, taken_at))
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
            .ok_or_else(|| CoreError::missing(Object::GroupSnapshot, id, &self.node_id))?;
        check_members(&g, snapshot_ids)?;
        self.group_from_meta(g)
    }

    /// Deletes a group snapshot and its members; an unknown group is success.
    pub fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> CoreResult<()> {
        if !is_valid_name(id) {
            return Ok(());
        }
        let _guard = self
            .guards
            .acquire(Object::GroupSnapshot, id, Access::Write)?;
        let Some(g) = self.read_group(id)? else {
            return Ok(());
        };
        check_members(&g, snapshot_ids)?;
        for m in &g.member_ids {
            self.delete_snapshot(m)?;
        }
        crate::dirfd::remove_durably(self.groups_dir()?.as_fd(), &format!("{id}.json"))
            .context(|| format!("remove group snapshot {id}"))?;
        tracing::info!(group = id, "group snapshot deleted");
        Ok(())
    }
}

/// The journals earlier processes left (never this process's: they may be
/// in flight).
fn leftover_journals(core: &Core) -> Vec<(std::os::fd::OwnedFd, String, PendingGroup)> {
    let Ok(dirs) = core.default_pool().dirs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Ok(groups) = crate::dirfd::open_dir_at(dirs.snapshots.as_fd(), GROUPS) else {
        return out;
    };
    for name in crate::dirfd::entry_names(groups.as_fd()) {
        if !name.starts_with(PENDING_PREFIX) {
            continue;
        }
        match meta::read_at::<PendingGroup>(groups.as_fd(), &name) {
            Found::Present(p) if p.instance == crate::dirfd::instance_tag() => {}
            Found::Present(p) => {
                if let Ok(fd) = groups.try_clone() {
                    out.push((fd, name, p));
                }
            }
            Found::Absent => {}
            Found::Damaged(why) => {
                tracing::warn!(journal = %name, "unreadable group journal removed ({why})");
                let _ = crate::dirfd::remove_durably(groups.as_fd(), &name);
            }
        }
    }
    out
}

/// Thaws what an interrupted group snapshot left frozen: only filesystems
/// this driver froze, and only if the one mounted there now is the one it
/// froze. Runs before the driver serves: a frozen VM must not wait.
pub fn thaw_leftovers(core: &Core) {
    for (_, _, pending) in leftover_journals(core) {
        for (i, mount_point) in pending.frozen.iter().enumerate() {
            let Ok(dir) = std::fs::File::open(mount_point) else {
                continue;
            };
            let dev = dir
                .metadata()
                .map(|st| std::os::unix::fs::MetadataExt::dev(&st))
                .unwrap_or(0);
            if pending.frozen_devs.get(i) != Some(&dev) {
                tracing::warn!(mount = %mount_point.display(), group = %pending.id, "not thawed: the filesystem mounted there now is not the one recorded as frozen");
                continue;
            }
            // EINVAL: not frozen (the freeze never happened, or was undone).
            if freeze::thaw(&dir).is_ok() {
                tracing::warn!(mount = %mount_point.display(), group = %pending.id, "thawed a filesystem an interrupted group snapshot left frozen");
            }
        }
    }
}

/// Undoes the group snapshots earlier processes left pending: removes the
/// members they took, under the group's guard (a retry may be running).
pub fn recover(core: &Core) {
    for (groups, name, pending) in leftover_journals(core) {
        let Ok(_guard) = core
            .guards
            .acquire(Object::GroupSnapshot, &pending.id, Access::Write)
        else {
            continue;
        };
        if !core.group_exists(&pending.id) {
            for dir in &pending.members {
                let Some(member) = dir.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let ours = matches!(core.find_snapshot(member), Ok(Some(s)) if s.meta.group_id.as_deref() == Some(pending.id.as_str()));
                if ours {
                    tracing::info!(group = %pending.id, snapshot = member, "removing a member of an interrupted group snapshot");
                    let _ = core.delete_snapshot(member);
                }
            }
        }
        let _ = crate::dirfd::remove_durably(groups.as_fd(), &name);
    }
}
