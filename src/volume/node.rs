//! Node-side work: stage, publish, unpublish, unstage and expansion.
//!
//! What is attached and mounted is always read back from the kernel, so a
//! restarted driver picks up where the last one stopped. Node RPCs undo
//! only what this driver did at that path for that volume: a foreign
//! mount, somebody's file or another volume's staging is left alone.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sys::stat::FileStat;

use super::guard::Access;
use super::{params, Core, CreateParams, CreateRequest, Layout, Volume, VolumeMode};
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::fstools::ImageFs;
use crate::mount;
use crate::names::validate_name;

/// How long unpublish and unstage wait for a deferred loop detach: short,
/// as kubelet is waiting; the detach completes on its own later.
pub const DETACH_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging: PathBuf,
    pub mode: VolumeMode,
    pub access: super::capability::AccessMode,
    /// The capability's `fs_type` (empty: any).
    pub fs_type: Option<String>,
    pub mount_flags: Vec<String>,
}

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
    /// The attributes of an inline ephemeral volume (made here).
    pub ephemeral: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// `None` for raw Block volumes.
    pub inodes: Option<(u64, u64, u64)>,
    /// `Some(message)` when the volume is abnormal.
    pub problem: Option<String>,
}

/// A path from a request, checked and put in the form mountinfo shows:
/// absolute, no `..`, no NUL, its parent directory resolved (so a parent
/// that is a symlink cannot make one target look like two).
pub fn request_path(field: &'static str, raw: &Path) -> CoreResult<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = raw.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(CoreError::Required { field });
    }
    let shown = raw.to_string_lossy();
    if bytes.contains(&0) {
        return Err(CoreError::invalid(field, &shown, "it contains a NUL byte"));
    }
    if bytes.len() >= libc::PATH_MAX as usize
        || raw
            .components()
            .any(|c| c.as_os_str().len() > libc::NAME_MAX as usize)
    {
        return Err(CoreError::invalid(
            field,
            &shown,
            "it is longer than a path or a name can be",
        ));
    }
    if !raw.is_absolute()
        || raw
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(CoreError::invalid(
            field,
            &shown,
            "use an absolute path without '..'",
        ));
    }
    let (Some(parent), Some(name)) = (raw.parent(), raw.file_name()) else {
        return Err(CoreError::invalid(field, &shown, "it names no entry"));
    };
    Ok(match fs::canonicalize(parent) {
        Ok(p) => p.join(name),
        Err(_) => raw.to_path_buf(),
    })
}

/// A path a node RPC looks a volume up at (stats, expansion): one that is
/// not absolute cannot hold the volume (NOT_FOUND, as the spec's tables
/// say); a NUL byte is malformed.
pub fn lookup_path(field: &'static str, id: &str, raw: &Path) -> CoreResult<PathBuf> {
    if raw.as_os_str().is_empty() {
        return Err(CoreError::Required { field });
    }
    if !raw.is_absolute() && !std::os::unix::ffi::OsStrExt::as_bytes(raw.as_os_str()).contains(&0) {
        return Err(CoreError::NotAt {
            id: id.to_owned(),
            path: raw.to_path_buf(),
        });
    }
    request_path(field, raw)
}

impl Core {
    /// Where the volume is mounted now (publish targets and staging paths).
    pub fn publications(&self, vol: &Volume) -> CoreResult<Vec<PathBuf>> {
        let mounts = mount::mounts()?;
        Ok(vol
            .layout()
            .mounts_of(vol, &mounts)
            .into_iter()
            .map(|m| m.mount_point.clone())
            .collect())
    }

    /// A request path checked like `request_path`, refused when it lies in
    /// a storage pool: a publication or staging there could hide or replace
    /// a volume.
    fn outside_pools(&self, field: &'static str, raw: &Path) -> CoreResult<PathBuf> {
        let path = request_path(field, raw)?;
        if let Some(pool) = self.pool_holding(&path) {
            return Err(CoreError::invalid(
                field,
                &path.to_string_lossy(),
                format!("it lies in storage pool {pool}"),
            ));
        }
        Ok(path)
    }

    /// The pool whose directory holds `path` (a request path, whose parent
    /// `request_path` has already resolved; pool roots are resolved at
    /// start-up).
    fn pool_holding(&self, path: &Path) -> Option<String> {
        self.pools()
            .iter()
            .find(|p| path.starts_with(&p.root))
            .map(|p| p.name.clone())
    }

    pub fn stage(&self, req: &StageRequest) -> CoreResult<()> {
        validate_name("volume_id", &req.volume_id)?;
        let staging = self.outside_pools("staging_target_path", &req.staging)?;
        let _guard = self
            .guards
            .acquire(Object::Volume, &req.volume_id, Access::Node)?;
        let vol = self.get_volume(&req.volume_id)?;
        check_access_type(&vol, req.mode)?;
        super::capability::check_layout_access(&[req.access], vol.meta.layout).map_err(|_| {
            CoreError::CapabilityMismatch {
                id: vol.id().to_owned(),
                have: format!("a {} volume (one node mounts it)", vol.meta.layout.name()),
                asked: format!("{:?} access", req.access),
            }
        })?;
        if let Some(root) = mount::mounted_at(&staging)? {
            if vol.layout().owns_target(&vol, &root) {
                return same_staging(&vol, &staging, req);
            }
            return Err(CoreError::ForeignContent {
                path: staging,
                what: "another mount".into(),
            });
        }
        let req = StageRequest {
            staging,
            ..req.clone()
        };
        vol.layout().stage(self, &vol, &req)
    }

    /// Undoes a stage of this volume at `staging`; anything else mounted
    /// there (another volume's staging, a foreign mount) is left alone.
    pub fn unstage(&self, id: &str, staging: &Path) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        let staging = request_path("staging_target_path", staging)?;
        let _guard = self.guards.acquire(Object::Volume, id, Access::Node)?;
        let Some(vol) = self.find_volume(id)? else {
            return Ok(());
        };
        if !self.unmount_own(&vol, &staging)?.is_empty() {
            vol.layout().release(&vol, DETACH_WAIT, false)?;
            tracing::info!(volume = id, staging = %staging.display(), "volume unstaged");
        } else if vol.layout().holds_filesystem() {
            // A retry after a crash between the unmount and the detach:
            // release the devices no mount uses any more.
            vol.layout().release(&vol, DETACH_WAIT, false)?;
        }
        Ok(())
    }

    /// Unmounts every mount of `vol` stacked at `path`, stopping at the
    /// first that is not this volume's; returns the roots unmounted. Asks
    /// the kernel about `path` alone, never reading all of mountinfo.
    fn unmount_own(&self, vol: &Volume, path: &Path) -> CoreResult<Vec<FileStat>> {
        let mut unmounted = Vec::new();
        for _ in 0..64 {
            let Some(root) = mount::mounted_at(path)? else {
                break;
            };
            // A Block publication whose loop device was detached holds
            // nothing any more: undoing it is safe.
            let ours = vol.layout().owns_target(vol, &root) || vol.layout().orphaned(&root);
            if !ours {
                if unmounted.is_empty() {
                    tracing::info!(volume = vol.id(), path = %path.display(), "left alone: the mount there is not this volume's");
                }
                break;
            }
            mount::unmount(path)?;
            // The device under a mount of ours is ours to release, even
            // one attached before devices carried the driver's tag.
            let device =
                crate::block::node_of(&root).or_else(|| crate::block::filesystem_of(&root));
            if let (Some(n), Some(file)) = (
                device,
                crate::block::FileId::of_path(&vol.path).ok().flatten(),
            ) {
                crate::block::claim(n, file);
            }
            unmounted.push(root);
        }
        Ok(unmounted)
    }

    pub fn publish(&self, req: &PublishRequest) -> CoreResult<()> {
        validate_name("volume_id", &req.volume_id)?;
        let target = self.outside_pools("target_path", &req.target)?;
        let staging = req
            .staging
            .as_deref()
            .map(|s| request_path("staging_target_path", s))
            .transpose()?;
        let req = PublishRequest {
            target,
            staging,
            ..req.clone()
        };
        if let Some(attributes) = &req.ephemeral {
            self.ensure_ephemeral(&req.volume_id, req.mode, attributes)?;
        }
        let _guard = self
            .guards
            .acquire(Object::Volume, &req.volume_id, Access::Node)?;
        let vol = self.get_volume(&req.volume_id)?;
        check_access_type(&vol, req.mode)?;
        // STAGE_UNSTAGE_VOLUME is advertised, so a CO stages first and says
        // where; kubelet never stages an inline ephemeral volume.
        if req.staging.is_none() && !is_ephemeral(&vol) {
            return Err(CoreError::NotStaged {
                id: req.volume_id.clone(),
                path: "(no staging_target_path: call NodeStageVolume first)".into(),
            });
        }
        if vol.meta.mode == VolumeMode::Block && !req.mount_flags.is_empty() {
            return Err(CoreError::Unacceptable(
                "mount_flags cannot be applied to a Block volume".into(),
            ));
        }
        let mut flags = mount::parse_mount_flags(&req.mount_flags)?;
        if req.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if let Some(root) = mount::mounted_at(&req.target)? {
            return same_publication(&vol, &root, &req, flags);
        }
        if req.single_writer {
            let staging = req.staging.as_deref();
            let elsewhere = self
                .publications(&vol)?
                .into_iter()
                .find(|p| *p != req.target && Some(p.as_path()) != staging);
            if let Some(at) = elsewhere {
                return Err(CoreError::SingleWriterTaken {
                    id: req.volume_id.clone(),
                    at,
                });
            }
        }
        if vol.meta.mode == VolumeMode::Filesystem
            && fs::symlink_metadata(&req.target).is_ok_and(|m| !m.is_dir())
        {
            return Err(CoreError::ForeignContent {
                path: req.target.clone(),
                what: "an entry that is not a directory".into(),
            });
        }
        vol.layout().publish(self, &vol, &req, flags)?;
        tracing::info!(volume = %req.volume_id, target = %req.target.display(), read_only = req.read_only, "volume published");
        Ok(())
    }

    /// Unpublishes `id` from `target` when what is mounted there is this
    /// volume's; removes the target only when it is empty. An inline
    /// ephemeral volume goes with its last publication.
    pub fn unpublish(&self, id: &str, target: &Path) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        let target = request_path("target_path", target)?;
        let guard = self.guards.acquire(Object::Volume, id, Access::Node)?;
        let vol = self.find_volume(id)?;
        let mut unmounted = false;
        if let Some(vol) = &vol {
            for root in self.unmount_own(vol, &target)? {
                vol.layout().after_unpublish(vol, &target, &root)?;
                unmounted = true;
            }
            if !unmounted && vol.layout().is_file() && !vol.layout().holds_filesystem() {
                // A retry after a crash: release what it may have left attached.
                vol.layout().release(vol, DETACH_WAIT, false)?;
            }
        }
        // A path in a pool may be a volume: never removed for a request.
        if !mount::is_mount_point(&target)? && self.pool_holding(&target).is_none() {
            remove_if_empty(&target)?;
        }
        if unmounted {
            tracing::info!(volume = id, target = %target.display(), "volume unpublished");
        }
        drop(guard);
        let Some(vol) = vol else { return Ok(()) };
        if is_ephemeral(&vol) && self.publications(&vol)?.is_empty() {
            self.delete_volume(id)?;
        }
        Ok(())
    }

    /// Creates the volume behind an inline ephemeral publish (kubelet calls
    /// NodePublishVolume with no CreateVolume). Pod authors choose its
    /// attributes, so its size is a hard limit (an image volume) and capped.
    fn ensure_ephemeral(
        &self,
        id: &str,
        mode: VolumeMode,
        attributes: &HashMap<String, String>,
    ) -> CoreResult<()> {
        if mode != VolumeMode::Filesystem {
            return Err(CoreError::Unacceptable(
                "inline ephemeral volumes are Filesystem volumes".into(),
            ));
        }
        // The Go driver's own inline volume (a `csi-<sha256>` directory
        // without metadata) is served as it is, never taken over as a
        // persistent volume: it goes at its last unpublish.
        if self
            .find_volume(id)?
            .is_some_and(|v| is_ephemeral(&v) && v.legacy)
        {
            return Ok(());
        }
        let cap = self.settings.max_ephemeral_size;
        let size = match attributes.get(params::SIZE) {
            Some(q) => crate::config::cr::parse_quantity(q)
                .and_then(|b| u64::try_from(b).ok())
                .ok_or_else(|| CoreError::invalid("volume attribute size", q, "not a quantity"))?,
            None => cap,
        };
        // Zero asks for nothing in particular: the cap, not an unbounded default.
        let size = if size == 0 { cap } else { size };
        if size > cap {
            return Err(CoreError::invalid(
                "volume attribute size",
                &size.to_string(),
                format!("inline ephemeral volumes are at most {cap} bytes on this node (serve --max-ephemeral-size)"),
            ));
        }
        let mut params = CreateParams::parse(attributes)?;
        params.layout = Layout::named("image");
        // XFS cannot be made this small; ext4 can.
        let fs = if size < ImageFs::Xfs.min_size() {
            ImageFs::Ext4
        } else {
            ImageFs::Xfs
        };
        let fs_type = Some(fs.name().to_owned());
        self.create_volume(&CreateRequest {
            name: id.to_owned(),
            required_bytes: size as i64,
            // Rounding never takes it past the cap.
            limit_bytes: cap as i64,
            mode,
            fs_type,
            params,
            source: None,
            ephemeral: true,
        })
        .map(drop)
    }

    /// Makes the node see a grown volume; returns the size now in effect.
    /// `required` (0 = none) larger than the recorded capacity grows the
    /// volume here first, so expansion also works when the controller half
    /// ran on another node (a cluster-wide resizer) or not at all.
    pub fn node_expand(
        &self,
        id: &str,
        path: &Path,
        mode: Option<VolumeMode>,
        required: u64,
        limit: u64,
    ) -> CoreResult<u64> {
        validate_name("volume_id", id)?;
        let path = lookup_path("volume_path", id, path)?;
        let vol = self.get_volume(id)?;
        if fs::symlink_metadata(&path).is_err() {
            return Err(CoreError::NotAt {
                id: id.to_owned(),
                path,
            });
        }
        if let Some(mode) = mode.filter(|m| *m != vol.meta.mode) {
            // NodeExpandVolume's table: capabilities the volume exceeds.
            return Err(CoreError::Unacceptable(format!(
                "volume {id} is a {:?}-mode volume; the capability asks for {mode:?}",
                vol.meta.mode
            )));
        }
        if limit > 0 && limit < vol.meta.capacity_bytes {
            return Err(CoreError::SizeOutOfRange(format!(
                "volume {id} is already {} bytes, above limit_bytes {limit}; volumes never shrink",
                vol.meta.capacity_bytes
            )));
        }
        let vol = if required > vol.meta.capacity_bytes && vol.meta.capacity_bytes > 0 {
            self.expand_volume(id, required as i64, limit as i64)?;
            self.get_volume(id)?
        } else {
            vol
        };
        let _guard = self.guards.acquire(Object::Volume, id, Access::Node)?;
        // Read again under the guard: it may have changed (or gone) since.
        drop(vol);
        let vol = self.get_volume(id)?;
        let size = vol.layout().node_expand(self, &vol)?;
        tracing::info!(volume = id, size, "volume expanded on node");
        Ok(size)
    }
}

fn check_access_type(vol: &Volume, mode: VolumeMode) -> CoreResult<()> {
    if vol.meta.mode != mode {
        // The spec's "exceeds capabilities" of the volume.
        return Err(CoreError::CapabilityMismatch {
            id: vol.id().to_owned(),
            have: format!("{:?}-mode", vol.meta.mode),
            asked: format!("{mode:?} access"),
        });
    }
    Ok(())
}

/// A publish at a target that already holds a mount (whose root stats as
/// `root`): the same publication again is OK; this volume with other
/// options is ALREADY_EXISTS; anything else is not ours to cover.
fn same_publication(
    vol: &Volume,
    root: &FileStat,
    req: &PublishRequest,
    flags: MsFlags,
) -> CoreResult<()> {
    if !vol.layout().owns_target(vol, root) {
        return Err(CoreError::ForeignContent {
            path: req.target.clone(),
            what: "another mount".into(),
        });
    }
    let have = mount::visible_options(&req.target)?;
    let same = mount::flags_visible(flags).iter().all(|o| have.contains(o))
        && have.contains(&"ro") == flags.contains(MsFlags::MS_RDONLY);
    if !same {
        return Err(CoreError::PublishedDifferently {
            id: req.volume_id.clone(),
            path: req.target.clone(),
            have: have.join(","),
        });
    }
    Ok(())
}

/// A stage asked again at a path where the volume is staged: OK when it
/// asks for what is there, else the spec's ALREADY_EXISTS (another
/// filesystem type, or mount flags the staging mount does not have).
fn same_staging(vol: &Volume, staging: &Path, req: &StageRequest) -> CoreResult<()> {
    let wrong_fs = match (vol.meta.fs_type, req.fs_type.as_deref()) {
        (Some(have), Some(asked)) => have.name() != asked,
        _ => false,
    };
    let flags = mount::parse_mount_flags(&req.mount_flags)?;
    let have = mount::visible_options(staging)?;
    let same_flags = mount::flags_visible(flags).iter().all(|o| have.contains(o));
    if wrong_fs || !same_flags {
        return Err(CoreError::PublishedDifferently {
            id: vol.id().to_owned(),
            path: staging.to_owned(),
            have: format!(
                "{} {}",
                vol.meta.fs_type.map_or("", |f| f.name()),
                have.join(",")
            ),
        });
    }
    Ok(())
}

/// Removes a publish target this driver may have made: an empty directory
/// or an empty file. Anything with content is somebody's and stays.
fn remove_if_empty(target: &Path) -> CoreResult<()> {
    match fs::symlink_metadata(target) {
        Ok(st) if st.is_dir() => match fs::remove_dir(target) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY | libc::EEXIST | libc::EBUSY)
                ) =>
            {
                tracing::info!(target = %target.display(), "left alone: the directory is not empty");
                Ok(())
            }
            Err(e) => Err(CoreError::io(format!("remove {}", target.display()), e)),
        },
        Ok(st) if st.is_file() && st.len() == 0 => {
            fs::remove_file(target).context(|| format!("remove {}", target.display()))
        }
        Ok(_) => {
            tracing::info!(target = %target.display(), "left alone: not an empty file or directory");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// An inline ephemeral volume: ours (metadata says so) or the Go driver's
/// (`csi-<sha256>` handles kubelet gives inline volumes, no metadata).
fn is_ephemeral(vol: &Volume) -> bool {
    if vol.meta.ephemeral {
        return true;
    }
    vol.legacy
        && vol.problem.is_none()
        && vol
            .id()
            .strip_prefix("csi-")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
