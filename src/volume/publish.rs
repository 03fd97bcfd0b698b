//! Node-side work: stage, publish, unpublish, unstage, stats and expansion.
//! What is attached and mounted is always read back from the kernel, so a
//! restarted driver picks up where the last one stopped.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::MsFlags;

use super::{Core, Layout, Volume, VolumeMode};
use crate::block::{self, AttachOptions, LoopDevice};
use crate::error::{CoreError, CoreResult, IoContext};
use crate::mount::{self, MountInfo};
use crate::names::validate_name;
use crate::xfs;

/// Serialises loop attach/detach decisions (find-or-attach, last-user-detach).
static LOOP_LOCK: Mutex<()> = Mutex::new(());

const LOOP_MAJOR: u32 = 7;
/// How long unpublish and unstage wait for a deferred loop detach: short, as
/// kubelet is waiting; the detach completes on its own later.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long DeleteVolume waits before it refuses because a device is held.
pub(crate) const DELETE_DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume_id: String,
    pub target: PathBuf,
    pub staging: Option<PathBuf>,
    /// Access type of the capability.
    pub mode: VolumeMode,
    pub read_only: bool,
    pub mount_flags: Vec<String>,
    /// SINGLE_NODE_SINGLE_WRITER: no other publication may exist.
    pub single_writer: bool,
}

#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// `None` for raw block volumes.
    pub inodes: Option<(u64, u64, u64)>,
    /// `Some(message)` when the volume is abnormal.
    pub problem: Option<String>,
}

fn require_absolute(what: &str, path: &Path) -> CoreResult<()> {
    if path.as_os_str().is_empty() {
        return Err(CoreError::InvalidArgument(format!("{what} is required")));
    }
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(CoreError::InvalidArgument(format!(
            "{what} {} must be an absolute path without '..'",
            path.display()
        )));
    }
    Ok(())
}

/// `(major, minor, path inside the filesystem)` of a directory, as mountinfo shows it.
fn dir_identity(path: &Path, mounts: &[MountInfo]) -> Option<(u32, u32, PathBuf)> {
    let st = fs::metadata(path).ok()?;
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

/// The loop device number whose node is bind-mounted by `m` (a published
/// Block volume), whether or not the device is still attached.
fn bound_loop(m: &MountInfo) -> Option<u32> {
    if !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") || m.root == Path::new("/") {
        return None;
    }
    let st = fs::symlink_metadata(&m.mount_point).ok()?;
    (st.file_type().is_block_device() && nix::sys::stat::major(st.rdev()) as u32 == LOOP_MAJOR)
        .then(|| nix::sys::stat::minor(st.rdev()) as u32)
}

fn check_access_type(volume: &Volume, mode: VolumeMode) -> CoreResult<()> {
    if volume.meta.mode != mode {
        // The spec's "exceeds capabilities" of the volume.
        return Err(CoreError::FailedPrecondition(format!(
            "volume {} is a {:?}-mode volume; the capability asks for {:?}",
            volume.meta.id, volume.meta.mode, mode
        )));
    }
    Ok(())
}

impl Core {
    /// Where the volume is mounted now (targets and staging paths).
    pub fn publications(&self, volume: &Volume) -> CoreResult<Vec<PathBuf>> {
        let mounts = mount::mounts()?;
        let mut out = Vec::new();
        match volume.meta.layout {
            Layout::Directory => {
                if let Some((ma, mi, root)) = dir_identity(&volume.path, &mounts) {
                    out.extend(
                        mounts
                            .iter()
                            .filter(|m| {
                                m.major == ma
                                    && m.minor == mi
                                    && m.root == root
                                    && m.mount_point != volume.path
                            })
                            .map(|m| m.mount_point.clone()),
                    );
                }
            }
            Layout::Image => {
                let devs = block::find_attached_devices(&volume.path)?;
                out.extend(
                    mounts
                        .iter()
                        .filter(|m| {
                            m.major == LOOP_MAJOR && devs.iter().any(|d| d.number == m.minor)
                        })
                        .map(|m| m.mount_point.clone()),
                );
            }
            Layout::File => {
                let devs = block::find_attached_devices(&volume.path)?;
                if !devs.is_empty() {
                    out.extend(
                        mounts
                            .iter()
                            .filter(|m| {
                                bound_loop(m).is_some_and(|n| devs.iter().any(|d| d.number == n))
                            })
                            .map(|m| m.mount_point.clone()),
                    );
                }
            }
        }
        Ok(out)
    }

    /// The loop device for a file volume, attaching one if none exists.
    /// Read-only and read-write users get separate devices: a read-only bind
    /// mount of a device node does not stop writes to the device. A device
    /// with a deferred detach pending is never reused.
    fn ensure_attached(&self, volume: &Volume, read_only: bool) -> CoreResult<LoopDevice> {
        if let Some(dev) = block::find_attached_devices(&volume.path)?
            .into_iter()
            .find(|d| d.read_only == read_only && !d.autoclear)
        {
            return Ok(dev);
        }
        block::attach(
            &volume.path,
            AttachOptions {
                read_only,
                direct_io: true,
                block_size: volume.meta.block_size,
            },
        )
    }

    /// Detaches the volume's loop devices that no mount uses any more.
    fn release_if_unused(&self, volume_path: &Path) -> CoreResult<()> {
        for dev in block::find_attached_devices(volume_path)? {
            if !block::is_in_use(&dev)? {
                block::detach_and_wait(&dev, DETACH_WAIT)?;
            }
        }
        Ok(())
    }

    /// `fs_type` is the capability's (empty: any); an image volume holds
    /// one filesystem and cannot be staged as another.
    pub fn stage(
        &self,
        id: &str,
        staging: &Path,
        mode: VolumeMode,
        fs_type: Option<&str>,
        mount_flags: &[String],
    ) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        require_absolute("staging_target_path", staging)?;
        let volume = self.get_volume(id)?;
        check_access_type(&volume, mode)?;
        if volume.meta.layout != Layout::Image {
            return Ok(());
        }
        if let (Some(asked), Some(have)) = (fs_type, volume.meta.fs_type.as_deref()) {
            if !asked.is_empty() && asked != have {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {id} holds a {have} filesystem; the capability asks for {asked}"
                )));
            }
        }
        let flags = mount::parse_mount_flags(mount_flags)?;
        let _guard = LOOP_LOCK.lock().unwrap();
        if let Some(m) = mount::mount_at(staging)? {
            if self.is_mount_of(&volume, &m)? {
                return Ok(());
            }
            return Err(CoreError::AlreadyExists(format!(
                "{} already has another filesystem mounted",
                staging.display()
            )));
        }
        fs::create_dir_all(staging).context(|| format!("create {}", staging.display()))?;
        let dev = self.ensure_attached(&volume, false)?;
        let fs_type = volume.meta.fs_type.clone().unwrap_or_else(|| "xfs".into());
        let data = if fs_type == "xfs" { "nouuid" } else { "" };
        // An expansion made while unstaged is applied now: ext4 offline before
        // mounting (no CAP_SYS_RESOURCE needed), XFS once mounted (it can
        // only grow online).
        let grow = (|| {
            let device = block::device_size(&dev.path)?;
            Ok::<_, CoreError>(
                xfs::filesystem_size(&dev.path, &fs_type)?.is_some_and(|fs| fs < device),
            )
        })();
        let grow = match grow {
            Ok(g) => g,
            Err(e) => {
                let _ = self.release_if_unused(&volume.path);
                return Err(e);
            }
        };
        if grow && fs_type != "xfs" {
            if let Err(e) = xfs::grow_unmounted(&fs_type, &dev.path) {
                let _ = self.release_if_unused(&volume.path);
                return Err(e);
            }
        }
        if let Err(e) = mount::mount_device(&dev.path, staging, &fs_type, flags, data) {
            let _ = self.release_if_unused(&volume.path);
            return Err(e);
        }
        if grow && fs_type == "xfs" {
            if let Err(e) = xfs::grow_filesystem(&fs_type, &dev.path, staging) {
                let _ = mount::unmount_all(staging);
                let _ = self.release_if_unused(&volume.path);
                return Err(e);
            }
        }
        tracing::info!(volume = id, staging = %staging.display(), device = %dev.path.display(), "image volume staged");
        Ok(())
    }

    pub fn unstage(&self, id: &str, staging: &Path) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        require_absolute("staging_target_path", staging)?;
        let _guard = LOOP_LOCK.lock().unwrap();
        if let Some(m) = mount::mount_at(staging)? {
            mount::unmount_all(staging)?;
            if m.major == LOOP_MAJOR {
                if let Some(dev) = block::attached(m.minor) {
                    if !block::is_in_use(&dev)? {
                        block::detach_and_wait(&dev, DETACH_WAIT)?;
                    }
                }
            }
            tracing::info!(volume = id, staging = %staging.display(), "volume unstaged");
        }
        if let Some(volume) = self.find_volume(id)? {
            if volume.meta.layout == Layout::Image {
                self.release_if_unused(&volume.path)?;
            }
        }
        Ok(())
    }

    /// True when the mount at `target` is this volume's.
    fn is_mount_of(&self, volume: &Volume, m: &MountInfo) -> CoreResult<bool> {
        Ok(match volume.meta.layout {
            Layout::Directory => {
                let mounts = mount::mounts()?;
                dir_identity(&volume.path, &mounts)
                    .is_some_and(|(ma, mi, root)| m.major == ma && m.minor == mi && m.root == root)
            }
            Layout::Image => {
                m.major == LOOP_MAJOR
                    && block::find_attached_devices(&volume.path)?
                        .iter()
                        .any(|d| m.minor == d.number)
            }
            Layout::File => match bound_loop(m) {
                Some(n) => block::find_attached_devices(&volume.path)?
                    .iter()
                    .any(|d| d.number == n),
                None => false,
            },
        })
    }

    /// Creates the volume behind an inline ephemeral publish (kubelet calls
    /// NodePublishVolume with no CreateVolume). Its attributes are read like
    /// StorageClass parameters, plus `size`. Idempotent.
    pub fn ensure_ephemeral(
        &self,
        id: &str,
        mode: VolumeMode,
        attributes: &std::collections::HashMap<String, String>,
    ) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        if mode != VolumeMode::Filesystem {
            return Err(CoreError::InvalidArgument(
                "ephemeral inline volumes are Filesystem volumes".into(),
            ));
        }
        let params = super::CreateParams::parse(attributes)?;
        if params.layout == Some(Layout::Image) {
            return Err(CoreError::InvalidArgument(
                "ephemeral inline volumes cannot use layout: image (kubelet does not stage them)"
                    .into(),
            ));
        }
        let size = match attributes.get("size") {
            Some(q) => crate::config::cr::parse_quantity(q)
                .and_then(|b| i64::try_from(b).ok())
                .ok_or_else(|| {
                    CoreError::InvalidArgument(format!(
                        "volume attribute size {q:?} is not a quantity"
                    ))
                })?,
            None => 0,
        };
        self.create_volume(&super::CreateRequest {
            name: id.to_owned(),
            required_bytes: size,
            limit_bytes: 0,
            mode,
            fs_type: None,
            params,
            source: None,
            ephemeral: true,
        })?;
        Ok(())
    }

    pub fn publish(&self, req: &PublishRequest) -> CoreResult<()> {
        validate_name("volume_id", &req.volume_id)?;
        require_absolute("target_path", &req.target)?;
        let volume = self.get_volume(&req.volume_id)?;
        check_access_type(&volume, req.mode)?;
        // STAGE_UNSTAGE_VOLUME is advertised, so a CO stages first and says
        // where (the spec's FAILED_PRECONDITION); kubelet never stages an
        // ephemeral inline volume.
        if req.staging.is_none() && !volume.meta.ephemeral {
            return Err(CoreError::FailedPrecondition(format!(
                "staging_target_path is not set: call NodeStageVolume for {} first (this driver has STAGE_UNSTAGE_VOLUME)",
                req.volume_id
            )));
        }
        if volume.meta.mode == VolumeMode::Block && !req.mount_flags.is_empty() {
            return Err(CoreError::InvalidArgument(
                "mount_flags cannot be applied to a Block volume".into(),
            ));
        }
        let mut flags = mount::parse_mount_flags(&req.mount_flags)?;
        if req.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // Directory volumes never touch loop devices: no need to serialise.
        let _guard = volume
            .meta
            .layout
            .is_file()
            .then(|| LOOP_LOCK.lock().unwrap());
        if let Some(existing) = mount::mount_at(&req.target)? {
            if !self.is_mount_of(&volume, &existing)? {
                return Err(CoreError::AlreadyExists(format!(
                    "{} already has something else mounted",
                    req.target.display()
                )));
            }
            let want: Vec<&str> = mount::flags_visible(flags);
            let have_ro = existing.read_only();
            let same = want.iter().all(|o| existing.options.iter().any(|h| h == o))
                && have_ro == flags.contains(MsFlags::MS_RDONLY);
            if !same {
                return Err(CoreError::AlreadyExists(format!(
                    "volume {} is already published at {} with other options ({})",
                    req.volume_id,
                    req.target.display(),
                    existing.options.join(",")
                )));
            }
            return Ok(());
        }
        if req.single_writer {
            let elsewhere: Vec<PathBuf> = self
                .publications(&volume)?
                .into_iter()
                .filter(|p| p != &req.target && Some(p.as_path()) != req.staging.as_deref())
                .collect();
            if !elsewhere.is_empty() {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} has SINGLE_NODE_SINGLE_WRITER access and is already published at {}",
                    req.volume_id,
                    elsewhere[0].display()
                )));
            }
        }
        match volume.meta.layout {
            Layout::Directory => {
                fs::create_dir_all(&req.target)
                    .context(|| format!("create {}", req.target.display()))?;
                mount::bind_mount(&volume.path, &req.target, flags)?;
            }
            Layout::Image => {
                let staging = req.staging.as_deref().ok_or_else(|| {
                    CoreError::FailedPrecondition(format!(
                        "image volume {} must be staged first (no staging_target_path)",
                        req.volume_id
                    ))
                })?;
                let staged = mount::mount_at(staging)?
                    .map(|m| self.is_mount_of(&volume, &m))
                    .transpose()?
                    .unwrap_or(false);
                if !staged {
                    return Err(CoreError::FailedPrecondition(format!(
                        "image volume {} is not staged at {}",
                        req.volume_id,
                        staging.display()
                    )));
                }
                fs::create_dir_all(&req.target)
                    .context(|| format!("create {}", req.target.display()))?;
                mount::bind_mount(staging, &req.target, flags)?;
            }
            Layout::File => {
                let dev = self.ensure_attached(&volume, req.read_only)?;
                if let Some(parent) = req.target.parent() {
                    fs::create_dir_all(parent)
                        .context(|| format!("create {}", parent.display()))?;
                }
                match fs::symlink_metadata(&req.target) {
                    Ok(st) if st.is_file() => {}
                    Ok(st) if st.is_dir() => {
                        // Some COs pre-create a directory; a device needs a file.
                        fs::remove_dir(&req.target)
                            .context(|| format!("replace directory {}", req.target.display()))?;
                        fs::File::create(&req.target)
                            .context(|| format!("create {}", req.target.display()))?;
                    }
                    Ok(_) => {
                        return Err(CoreError::InvalidArgument(format!(
                            "{} exists and is not a regular file",
                            req.target.display()
                        )))
                    }
                    Err(_) => {
                        fs::File::create(&req.target)
                            .context(|| format!("create {}", req.target.display()))?;
                    }
                }
                if let Err(e) = mount::bind_mount(&dev.path, &req.target, flags) {
                    let _ = fs::remove_file(&req.target);
                    let _ = self.release_if_unused(&volume.path);
                    return Err(e);
                }
            }
        }
        tracing::info!(volume = %req.volume_id, target = %req.target.display(), read_only = req.read_only, "volume published");
        Ok(())
    }

    pub fn unpublish(&self, id: &str, target: &Path) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        require_absolute("target_path", target)?;
        let volume = self.find_volume(id)?;
        let file_backed = volume.as_ref().is_none_or(|v| v.meta.layout.is_file());
        let _guard = file_backed.then(|| LOOP_LOCK.lock().unwrap());
        let was_mounted = mount::is_mount_point(target)?;
        if was_mounted {
            mount::unmount_all(target)?;
        }
        match fs::symlink_metadata(target) {
            Ok(st) if st.is_dir() => match fs::remove_dir(target) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    return Err(CoreError::FailedPrecondition(format!(
                        "{} is not empty after unmount; refusing to delete data",
                        target.display()
                    )))
                }
                Err(e) => return Err(CoreError::io(format!("remove {}", target.display()), e)),
            },
            Ok(_) => fs::remove_file(target).context(|| format!("remove {}", target.display()))?,
            Err(_) => {}
        }
        if let Some(volume) = volume {
            if volume.meta.layout == Layout::File {
                self.release_if_unused(&volume.path)?;
            }
            if volume.meta.ephemeral && self.publications(&volume)?.is_empty() {
                drop(_guard);
                self.delete_volume(id)?;
            }
        }
        if was_mounted {
            tracing::info!(volume = id, target = %target.display(), "volume unpublished");
        }
        Ok(())
    }

    /// Usage and condition of a volume published (or staged) at `path`.
    pub fn node_stats(&self, id: &str, path: &Path) -> CoreResult<NodeStats> {
        validate_name("volume_id", id)?;
        if path.as_os_str().is_empty() {
            return Err(CoreError::InvalidArgument("volume_path is required".into()));
        }
        let volume = match self.find_volume(id)? {
            Some(v) => v,
            None => return self.orphan_stats(id),
        };
        let not_here = || {
            CoreError::NotFound(format!(
                "volume {id} is not published or staged at {}",
                path.display()
            ))
        };
        if !path.is_absolute() || fs::symlink_metadata(path).is_err() {
            return Err(not_here());
        }
        let mut stats = NodeStats {
            problem: self.volume_problem(&volume),
            ..Default::default()
        };
        let published = self.publications(&volume)?;
        if !published.iter().any(|p| p == path) {
            // A Block target whose loop device was lost is still this
            // volume's publication, and abnormal.
            let lost = match volume.meta.layout {
                Layout::File => self.lost_device_at(&volume, path)?,
                _ => None,
            };
            let Some(problem) = lost else {
                return Err(not_here());
            };
            stats.total_bytes = volume.meta.capacity_bytes;
            stats.problem = stats.problem.or(Some(problem));
            return Ok(stats);
        }
        match volume.meta.layout {
            Layout::Directory => {
                let usage = self
                    .stats_cache
                    .usage(id, &volume.path)
                    .context(|| format!("measure {}", volume.path.display()))?;
                let pool = self.pool_of(&volume)?.usage()?;
                let total = if volume.meta.capacity_bytes > 0 {
                    volume.meta.capacity_bytes
                } else {
                    usage.bytes + pool.available_bytes
                };
                stats.total_bytes = total;
                stats.used_bytes = usage.bytes;
                stats.available_bytes = total.saturating_sub(usage.bytes).min(pool.available_bytes);
                stats.inodes = Some((
                    usage.inodes + pool.free_inodes,
                    usage.inodes,
                    pool.free_inodes,
                ));
            }
            Layout::Image => {
                let st = nix::sys::statvfs::statvfs(path)
                    .context(|| format!("statvfs {}", path.display()))?;
                let f = st.fragment_size();
                stats.total_bytes = st.blocks() * f;
                stats.available_bytes = st.blocks_available() * f;
                stats.used_bytes = (st.blocks() - st.blocks_free()) * f;
                stats.inodes = Some((st.files(), st.files() - st.files_free(), st.files_free()));
            }
            Layout::File => {
                // The device's size: after ControllerExpandVolume and before
                // NodeExpandVolume it is still the old one.
                stats.total_bytes = mount::mount_at(path)?
                    .as_ref()
                    .and_then(bound_loop)
                    .and_then(|n| block::device_size(Path::new(&format!("/dev/loop{n}"))).ok())
                    .unwrap_or(volume.meta.capacity_bytes);
            }
        }
        Ok(stats)
    }

    /// A volume whose metadata exists but whose backing store vanished
    /// under a running driver: report it abnormal instead of unknown.
    fn orphan_stats(&self, id: &str) -> CoreResult<NodeStats> {
        for pool in self.pools() {
            if let Some(m) = super::meta::read::<super::VolumeMeta>(&pool.meta_path(id))? {
                return Ok(NodeStats {
                    total_bytes: m.capacity_bytes,
                    inodes: (m.layout != Layout::File).then_some((0, 0, 0)),
                    problem: Some(format!(
                        "backing {} of volume {id} is missing",
                        pool.volume_path(id).display()
                    )),
                    ..Default::default()
                });
            }
        }
        Err(CoreError::NotFound(format!(
            "volume {id} does not exist on node {}",
            self.node_id
        )))
    }

    /// Why the Block target at `path` no longer reaches the volume: its loop
    /// device was detached or now backs another file. `None` when `path` is
    /// no loop device node, or is another volume's publication.
    fn lost_device_at(&self, volume: &Volume, path: &Path) -> CoreResult<Option<String>> {
        let Some(n) = mount::mount_at(path)?.as_ref().and_then(bound_loop) else {
            return Ok(None);
        };
        Ok(match block::attached(n) {
            None => Some(format!(
                "/dev/loop{n} published at {} is no longer attached; no loop device backs {}",
                path.display(),
                volume.path.display()
            )),
            Some(d)
                if d.backing_file != volume.path
                    && self
                        .pools()
                        .iter()
                        .any(|p| d.backing_file.parent() == Some(p.root.as_path())) =>
            {
                None
            }
            Some(d) => Some(format!(
                "/dev/loop{n} published at {} now backs {}, not {}",
                path.display(),
                d.backing_file.display(),
                volume.path.display()
            )),
        })
    }

    /// Makes the node see a grown volume; returns the size now in effect.
    /// `required` (0 = none) larger than the recorded capacity grows the
    /// volume here first, so expansion also works when the controller half
    /// ran on another node (a cluster-wide resizer) or not at all.
    /// `mode` is the capability's access type, when the CO sent one.
    pub fn node_expand(
        &self,
        id: &str,
        path: &Path,
        mode: Option<VolumeMode>,
        required: u64,
        limit: u64,
    ) -> CoreResult<u64> {
        validate_name("volume_id", id)?;
        if path.as_os_str().is_empty() {
            return Err(CoreError::InvalidArgument("volume_path is required".into()));
        }
        let mut volume = self.get_volume(id)?;
        if !path.is_absolute() || fs::symlink_metadata(path).is_err() {
            return Err(CoreError::NotFound(format!(
                "volume {id} is not published at {}",
                path.display()
            )));
        }
        if let Some(mode) = mode.filter(|m| *m != volume.meta.mode) {
            // NodeExpandVolume's table: capabilities the volume exceeds.
            return Err(CoreError::InvalidArgument(format!(
                "volume {id} is a {:?}-mode volume; the capability asks for {mode:?}",
                volume.meta.mode
            )));
        }
        if limit > 0 && limit < volume.meta.capacity_bytes {
            return Err(CoreError::OutOfRange(format!(
                "volume {id} is already {} bytes, above limit_bytes {limit}; volumes never shrink",
                volume.meta.capacity_bytes
            )));
        }
        if required > volume.meta.capacity_bytes && volume.meta.capacity_bytes > 0 {
            self.expand_volume(id, required as i64, limit as i64)?;
            volume = self.get_volume(id)?;
        }
        if !volume.meta.layout.is_file() {
            return Ok(volume.meta.capacity_bytes);
        }
        let _guard = LOOP_LOCK.lock().unwrap();
        let devs = block::find_attached_devices(&volume.path)?;
        let Some(dev) = devs.first().cloned() else {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {id} is not attached on this node"
            )));
        };
        // Every user of the file (read-only and read-write devices) grows.
        for d in &devs {
            block::refresh_capacity(d)?;
        }
        if volume.meta.layout == Layout::Image {
            let fs_type = volume.meta.fs_type.clone().unwrap_or_else(|| "xfs".into());
            let mount_point = mount::mounts()?
                .into_iter()
                .find(|m| m.major == LOOP_MAJOR && devs.iter().any(|d| d.number == m.minor))
                .map(|m| m.mount_point)
                .ok_or_else(|| {
                    CoreError::FailedPrecondition(format!("image volume {id} is not mounted"))
                })?;
            // XFS keeps its superblock in its own cache, so always ask it
            // (a no-op when grown); ext4's on the device is current.
            let grown = fs_type != "xfs"
                && xfs::filesystem_size(&dev.path, &fs_type)?
                    .is_some_and(|fs| fs >= block::device_size(&dev.path).unwrap_or(0));
            if !grown {
                xfs::grow_filesystem(&fs_type, &dev.path, &mount_point)?;
            }
        }
        let size = block::device_size(&dev.path)?;
        tracing::info!(volume = id, device = %dev.path.display(), size, "volume expanded on node");
        Ok(size)
    }
}
