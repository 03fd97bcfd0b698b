//! The core: volumes on real files in pools. It knows nothing about gRPC.

pub mod meta;
pub mod params;
pub mod publish;
pub mod snapshot;
pub mod stats;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::block;
use crate::config::PoolConfig;
use crate::copy;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::names::validate_name;
use crate::pool::Pool;
use crate::xfs;

pub use meta::{ContentSource, Layout, VolumeMeta, VolumeMode};
pub use params::CreateParams;

const MIB: u64 = 1 << 20;
/// Size given to a block or image volume when the request names none.
pub const DEFAULT_FILE_VOLUME_SIZE: u64 = 1 << 30;

/// A volume as found in a pool.
#[derive(Debug, Clone)]
pub struct Volume {
    pub meta: VolumeMeta,
    pub path: PathBuf,
    /// True when no metadata file exists (made by the Go driver).
    pub legacy: bool,
}

impl Volume {
    /// Whether CreateVolume `parameters` could have made this volume (for
    /// ValidateVolumeCapabilities); the error says why not.
    pub fn could_be_made_with(&self, parameters: &HashMap<String, String>) -> Result<(), String> {
        if parameters.is_empty() {
            return Ok(());
        }
        let asked = CreateParams::parse(parameters).map_err(|e| e.to_string())?;
        if let Some(pool) = asked
            .storage_pool
            .as_ref()
            .filter(|p| **p != self.meta.pool)
        {
            return Err(format!(
                "volume {} is in pool {}, not {pool}",
                self.meta.id, self.meta.pool
            ));
        }
        let layout = asked
            .layout_for(self.meta.mode)
            .map_err(|e| e.to_string())?;
        if layout != self.meta.layout && !self.legacy {
            return Err(format!(
                "volume {} has layout {:?}, not {layout:?}",
                self.meta.id, self.meta.layout
            ));
        }
        Ok(())
    }
}

/// A request to create a volume, already translated from CSI.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub mode: VolumeMode,
    /// `fs_type` of the mount capability, if any.
    pub fs_type: Option<String>,
    pub params: CreateParams,
    pub source: Option<ContentSource>,
    /// Made by NodePublishVolume for an inline ephemeral volume.
    pub ephemeral: bool,
}

/// The outcome of an expansion.
#[derive(Debug, Clone, Copy)]
pub struct Expanded {
    pub capacity_bytes: u64,
    pub node_expansion_required: bool,
}

pub struct Core {
    pub node_id: String,
    pools: Vec<Pool>,
    busy: Mutex<HashSet<String>>,
    stats_cache: stats::StatsCache,
}

/// Holds an operation's claim on a name; dropping it releases the claim.
pub struct NameLock<'a> {
    core: &'a Core,
    key: String,
}

impl Drop for NameLock<'_> {
    fn drop(&mut self) {
        self.core.busy.lock().unwrap().remove(&self.key);
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Core {
    /// Opens every pool and reconciles what an interrupted run left behind.
    pub fn new(node_id: String, pools: &[PoolConfig]) -> CoreResult<Arc<Core>> {
        if pools.is_empty() {
            return Err(CoreError::InvalidArgument(
                "no storage pool configured".into(),
            ));
        }
        let pools = pools
            .iter()
            .map(Pool::open)
            .collect::<CoreResult<Vec<_>>>()?;
        let core = Core {
            node_id,
            pools,
            busy: Mutex::new(HashSet::new()),
            stats_cache: stats::StatsCache::default(),
        };
        for pool in &core.pools {
            pool.set_ready_hook(Box::new(|pool| {
                sweep_orphan_metadata(pool);
                snapshot::sweep_orphans(pool);
            }));
        }
        Ok(Arc::new(core))
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn default_pool(&self) -> &Pool {
        &self.pools[0]
    }

    /// The pool named `name`, or the default pool when `None`.
    pub fn pool(&self, name: Option<&str>) -> CoreResult<&Pool> {
        let Some(name) = name else {
            return Ok(self.default_pool());
        };
        self.pools.iter().find(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
            CoreError::InvalidArgument(format!(
                "unknown storage pool {name:?}; this node has: {}",
                known.join(", ")
            ))
        })
    }

    /// Claims `name` for one operation; a second concurrent claim is ABORTED.
    pub fn lock(&self, kind: &str, name: &str) -> CoreResult<NameLock<'_>> {
        let key = format!("{kind}/{name}");
        if !self.busy.lock().unwrap().insert(key.clone()) {
            return Err(CoreError::Aborted(format!(
                "an operation on {kind} {name} is already in progress"
            )));
        }
        Ok(NameLock { core: self, key })
    }
}

/// Metadata without a volume is what an interrupted create or delete leaves.
fn sweep_orphan_metadata(pool: &Pool) {
    let Ok(entries) = fs::read_dir(pool.meta_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            let _ = fs::remove_file(entry.path());
            continue;
        }
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let empty = entry.metadata().is_ok_and(|m| m.len() == 0);
        if empty && crate::names::is_valid_name(id) {
            // Written but never flushed: the create was never acknowledged.
            tracing::warn!(pool = %pool.name, volume = id, "rolling back a create interrupted before its flush");
            remove_any(&pool.volume_path(id));
            let _ = fs::remove_file(entry.path());
            continue;
        }
        if fs::symlink_metadata(pool.volume_path(id)).is_err() {
            tracing::info!(pool = %pool.name, volume = id, "removing metadata of a volume that was never completed or was deleted");
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Core {
    /// Looks a volume up in one pool. Symlinks and odd file types are not volumes.
    fn volume_in(&self, pool: &Pool, id: &str) -> CoreResult<Option<Volume>> {
        let path = pool.volume_path(id);
        let st = match fs::symlink_metadata(&path) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CoreError::io(format!("stat {}", path.display()), e)),
        };
        let ft = st.file_type();
        if !(ft.is_dir() || ft.is_file()) {
            return Ok(None);
        }
        let (meta, legacy) = match meta::read::<VolumeMeta>(&pool.meta_path(id))? {
            Some(m) => (m, false),
            None => (
                VolumeMeta::inferred(id, &pool.name, ft.is_dir(), st.len()),
                true,
            ),
        };
        if meta.layout.is_file() == ft.is_dir() {
            return Err(CoreError::Internal(format!(
                "volume {id}: metadata says {:?} but {} is a {}",
                meta.layout,
                path.display(),
                if ft.is_dir() { "directory" } else { "file" }
            )));
        }
        Ok(Some(Volume { meta, path, legacy }))
    }

    /// Finds a volume by ID in any pool.
    pub fn find_volume(&self, id: &str) -> CoreResult<Option<Volume>> {
        validate_name("volume ID", id)?;
        for pool in &self.pools {
            if let Some(v) = self.volume_in(pool, id)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Like `find_volume`, but a missing volume is NOT_FOUND.
    pub fn get_volume(&self, id: &str) -> CoreResult<Volume> {
        self.find_volume(id)?.ok_or_else(|| {
            CoreError::NotFound(format!(
                "volume {id} does not exist on node {}",
                self.node_id
            ))
        })
    }

    pub fn pool_of(&self, volume: &Volume) -> CoreResult<&Pool> {
        self.pool(Some(&volume.meta.pool))
    }

    /// Picks the capacity to give for a request, within the range asked.
    pub fn decide_capacity(
        &self,
        pool: &Pool,
        layout: Layout,
        fs_type: Option<&str>,
        required: i64,
        limit: i64,
    ) -> CoreResult<u64> {
        if required < 0 || limit < 0 {
            return Err(CoreError::InvalidArgument(format!(
                "capacity_range must not be negative (required_bytes {required}, limit_bytes {limit})"
            )));
        }
        let (required, limit) = (required as u64, limit as u64);
        if limit > 0 && required > limit {
            return Err(CoreError::InvalidArgument(format!(
                "capacity_range.required_bytes {required} exceeds limit_bytes {limit}"
            )));
        }
        let (granule, minimum) = match layout {
            Layout::Directory => (4096, 0),
            Layout::File => (MIB, MIB),
            Layout::Image => (MIB, xfs::min_filesystem_size(fs_type.unwrap_or("xfs"))),
        };
        let wanted = if required == 0 && layout.is_file() {
            if limit > 0 {
                DEFAULT_FILE_VOLUME_SIZE.min(limit)
            } else {
                DEFAULT_FILE_VOLUME_SIZE
            }
        } else {
            required
        };
        let mut capacity = round_up(wanted, granule).max(minimum);
        if limit > 0 && capacity > limit {
            // Round within the limit instead; loop devices need 4 KiB multiples.
            capacity = limit / 4096 * 4096;
            if capacity < wanted.max(minimum) || (layout.is_file() && capacity == 0) {
                return Err(CoreError::OutOfRange(format!(
                    "the smallest {layout:?} volume this pool can make for {wanted} bytes is {} bytes, above limit_bytes {limit}",
                    round_up(wanted, granule).max(minimum)
                )));
            }
        }
        let total = pool.usage()?.total_bytes;
        if capacity > total {
            return Err(CoreError::OutOfRange(format!(
                "{capacity} bytes is more than pool {} can ever hold ({total} bytes)",
                pool.name
            )));
        }
        Ok(capacity)
    }

    /// Creates a volume, or returns the existing one when the request matches.
    pub fn create_volume(&self, req: &CreateRequest) -> CoreResult<Volume> {
        validate_name("name", &req.name)?;
        let _lock = self.lock("volume", &req.name)?;
        let pool = self.pool(req.params.storage_pool.as_deref())?;
        let layout = req.params.layout_for(req.mode)?;
        if layout.is_file() {
            block::check_loop_support()?;
        }
        let fs_type = match layout {
            Layout::Image => Some(xfs::check_fs_type(req.fs_type.as_deref())?),
            _ => None,
        };
        if let Some(existing) = self.find_volume(&req.name)? {
            return self.check_compatible(existing, req, pool, layout);
        }
        pool.ensure_accessible()?;
        if fs::symlink_metadata(pool.volume_path(&req.name)).is_ok() {
            return Err(CoreError::AlreadyExists(format!(
                "pool {} already holds an entry named {} that is not a volume (a symlink or special file)",
                pool.name, req.name
            )));
        }
        let capacity = self.decide_capacity(
            pool,
            layout,
            fs_type.as_deref(),
            req.required_bytes,
            req.limit_bytes,
        )?;
        let mut meta = VolumeMeta {
            id: req.name.clone(),
            pool: pool.name.clone(),
            capacity_bytes: capacity,
            mode: req.mode,
            layout,
            fs_type,
            block_size: req.params.block_size,
            preallocated: req.params.preallocate,
            source: req.source.clone(),
            created_unix: now_unix(),
            ephemeral: req.ephemeral,
        };
        let staged = pool.tmp_path(&req.name, "create");
        let result = self.build_volume(pool, &mut meta, &staged);
        if let Err(e) = result {
            remove_any(&staged);
            return Err(e);
        }
        let path = pool.volume_path(&req.name);
        // Journaling filesystems keep metadata operations in order, so after
        // a crash the volume is never in place without its metadata file.
        // A volume that holds no data of its own (an empty directory or a
        // sparse file) is made durable by one fdatasync of its metadata
        // file, written last: that commit carries both renames, and the
        // kernel batches concurrent ones. Cut off before it, the metadata
        // file is empty and start-up rolls the create back. Anything that
        // wrote data (clones, images, zero-filled preallocation) takes a
        // grouped syncfs.
        let holds_no_data = meta.source.is_none()
            && (meta.layout == Layout::Directory
                || (meta.layout == Layout::File && !meta.preallocated));
        let publish = (|| {
            meta::write_atomic(&pool.meta_path(&req.name), &meta)?;
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &staged,
                nix::fcntl::AT_FDCWD,
                &path,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .context(|| format!("move new volume into place at {}", path.display()))?;
            if holds_no_data {
                // The metadata file's data is written last; forcing it to
                // disk commits the journal up to that point, which holds
                // both renames: one commit per create, batched by the kernel.
                meta::flush(&pool.meta_path(&req.name))
            } else {
                pool.sync()
            }
        })();
        if let Err(e) = publish {
            remove_any(&staged);
            if fs::symlink_metadata(&path).is_err() {
                let _ = meta::remove(&pool.meta_path(&req.name));
            }
            return Err(e);
        }
        tracing::info!(volume = %req.name, pool = %pool.name, ?layout, capacity, "volume created");
        Ok(Volume {
            meta,
            path,
            legacy: false,
        })
    }

    fn check_compatible(
        &self,
        existing: Volume,
        req: &CreateRequest,
        pool: &Pool,
        layout: Layout,
    ) -> CoreResult<Volume> {
        let m = &existing.meta;
        let conflict = |why: String| {
            Err(CoreError::AlreadyExists(format!(
                "volume {} already exists with {why}",
                req.name
            )))
        };
        if m.pool != pool.name {
            return conflict(format!("pool {} (asked for {})", m.pool, pool.name));
        }
        if m.mode != req.mode {
            return conflict(format!("mode {:?} (asked for {:?})", m.mode, req.mode));
        }
        if existing.legacy {
            return Ok(existing);
        }
        if m.layout != layout {
            return conflict(format!("layout {:?} (asked for {layout:?})", m.layout));
        }
        let (required, limit) = (
            req.required_bytes.max(0) as u64,
            req.limit_bytes.max(0) as u64,
        );
        if m.capacity_bytes < required || (limit > 0 && m.capacity_bytes > limit) {
            return conflict(format!(
                "capacity {} bytes, outside the requested range [{required}, {}]",
                m.capacity_bytes,
                if limit > 0 {
                    limit.to_string()
                } else {
                    "unlimited".into()
                }
            ));
        }
        if req.source != m.source {
            return conflict(format!("another content source ({:?})", m.source));
        }
        if m.layout == Layout::File && m.block_size != req.params.block_size {
            return conflict(format!(
                "blockSize {} (asked for {})",
                m.block_size, req.params.block_size
            ));
        }
        // A clone keeps its source's filesystem whatever was asked, so only
        // an empty image volume is held to the asked fs_type.
        if let (Some(have), Some(asked), None) = (&m.fs_type, &req.fs_type, &m.source) {
            if !asked.is_empty() && have != asked {
                return conflict(format!("filesystem {have} (asked for {asked})"));
            }
        }
        Ok(existing)
    }

    /// Builds a complete volume at `staged` (in the pool's temp area). A
    /// clone may adjust `meta` (an image keeps its source's filesystem).
    fn build_volume(&self, pool: &Pool, meta: &mut VolumeMeta, staged: &Path) -> CoreResult<()> {
        match meta.layout {
            Layout::Directory => {
                fs::create_dir(staged).context(|| format!("create {}", staged.display()))?;
                fs::set_permissions(staged, fs::Permissions::from_mode(0o777))
                    .context(|| format!("chmod {}", staged.display()))?;
            }
            Layout::File | Layout::Image => {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(staged)
                    .context(|| format!("create {}", staged.display()))?;
                fs::set_permissions(staged, fs::Permissions::from_mode(0o660))
                    .context(|| format!("chmod {}", staged.display()))?;
                file.set_len(meta.capacity_bytes)
                    .map_err(|e| space_error(e, &pool.name, staged))?;
            }
        }
        if let Some(source) = meta.source.clone() {
            self.fill_from_source(pool, meta, &source, staged)?;
        } else if meta.layout == Layout::Image {
            xfs::make_filesystem(staged, meta.fs_type.as_deref().unwrap_or("xfs"))?;
        }
        if meta.preallocated && meta.layout.is_file() {
            block::preallocate(staged, meta.capacity_bytes)
                .map_err(|e| space_error(e, &pool.name, staged))?;
        }
        Ok(())
    }

    /// Copies a source volume or snapshot into a volume being built. The
    /// source may be in use: the copy is then crash-consistent at best.
    fn fill_from_source(
        &self,
        pool: &Pool,
        meta: &mut VolumeMeta,
        source: &ContentSource,
        staged: &Path,
    ) -> CoreResult<()> {
        let (src_path, src_layout, src_capacity, src_fs_type) = match source {
            ContentSource::Volume(id) => {
                let v = self.find_volume(id)?.ok_or_else(|| {
                    CoreError::NotFound(format!(
                        "source volume {id} does not exist on node {}",
                        self.node_id
                    ))
                })?;
                (v.path, v.meta.layout, v.meta.capacity_bytes, v.meta.fs_type)
            }
            ContentSource::Snapshot(id) => {
                let s = self.get_snapshot(id)?;
                (
                    s.data_path,
                    s.meta.layout,
                    s.meta.size_bytes,
                    s.meta.fs_type,
                )
            }
        };
        // The pairing is checked before sizes: an impossible clone says so.
        match (src_layout, meta.layout) {
            (Layout::Directory, Layout::Directory)
            | (Layout::File, Layout::File)
            | (Layout::Image, Layout::Image)
            | (Layout::File, Layout::Directory) => {
                if src_capacity > meta.capacity_bytes && meta.capacity_bytes != 0 {
                    return Err(CoreError::OutOfRange(format!(
                        "source is {src_capacity} bytes, larger than the new volume ({} bytes)",
                        meta.capacity_bytes
                    )));
                }
            }
            // Only disk.img has to fit (checked below): CDI sizes the
            // Filesystem volume above its disk for filesystem overhead.
            (Layout::Directory, Layout::File) => {}
            (from, to) => {
                return Err(CoreError::InvalidArgument(format!(
                    "cannot clone a {} volume into a {} volume; supported: the same layout, and a Block volume into a Filesystem directory volume (as {}) and back",
                    describe_layout(from),
                    describe_layout(to),
                    copy::DISK_IMAGE
                )))
            }
        }
        let (id, capacity) = (meta.id.clone(), meta.capacity_bytes);
        let space = |e: CoreError| match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => CoreError::ResourceExhausted(format!(
                "pool {} ran out of space while copying into {id}",
                pool.name
            )),
            _ => e,
        };
        let grow = |path: &Path| {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .context(|| format!("open {}", path.display()))?;
            file.set_len(capacity)
                .map_err(|e| space_error(e, &pool.name, path))
        };
        match (src_layout, meta.layout) {
            (Layout::Directory, Layout::Directory) => {
                copy::copy_tree_contents(&src_path, staged).map_err(space)?;
            }
            (Layout::File, Layout::File) | (Layout::Image, Layout::Image) => {
                copy::copy_file_into(&src_path, staged).map_err(space)?;
                grow(staged)?;
                if meta.layout == Layout::Image {
                    // The bytes are the source's filesystem, whatever the request said.
                    let fs_type = match src_fs_type {
                        Some(t) => Some(t),
                        None => match xfs::probe(staged)? {
                            xfs::Probe::Filesystem(t) => Some(t),
                            _ => None,
                        },
                    };
                    if let Some(t) = fs_type.filter(|t| meta.fs_type.as_ref() != Some(t)) {
                        tracing::info!(volume = %meta.id, fs_type = %t, "clone keeps its source's filesystem type");
                        meta.fs_type = Some(t);
                    }
                }
            }
            (Layout::File, Layout::Directory) => {
                // CDI's convention: a Filesystem VM disk is the file disk.img.
                let disk = staged.join(copy::DISK_IMAGE);
                copy::copy_file_new(&src_path, &disk).map_err(space)?;
            }
            (Layout::Directory, Layout::File) => {
                let disk = src_path.join(copy::DISK_IMAGE);
                let from = copy::open_regular(&disk)?.ok_or_else(|| {
                    CoreError::InvalidArgument(format!(
                        "the source holds no regular file {} to copy into a Block volume",
                        copy::DISK_IMAGE
                    ))
                })?;
                let len = from
                    .metadata()
                    .context(|| format!("stat {}", disk.display()))?
                    .len();
                if len > meta.capacity_bytes {
                    return Err(CoreError::OutOfRange(format!(
                        "the source's {} is {len} bytes, larger than the new Block volume ({} bytes)",
                        copy::DISK_IMAGE,
                        meta.capacity_bytes
                    )));
                }
                copy::copy_open_into(&from, &disk, staged).map_err(space)?;
                grow(staged)?;
            }
            _ => unreachable!("pairings are checked above"),
        }
        Ok(())
    }

    /// Deletes a volume; an unknown ID is success.
    pub fn delete_volume(&self, id: &str) -> CoreResult<()> {
        validate_name("volume ID", id)?;
        let _lock = self.lock("volume", id)?;
        let Some(volume) = self.find_volume(id)? else {
            return Ok(());
        };
        let pool = self.pool_of(&volume)?;
        if volume.meta.layout.is_file() {
            self.release_loop_devices(id, &volume.path)?;
        } else if let Some(at) = self.publications(&volume)?.first() {
            // Deleting it would pull the data out from under a pod.
            return Err(CoreError::FailedPrecondition(format!(
                "volume {id} is still published at {}; unpublish it first",
                at.display()
            )));
        }
        let doomed = pool.tmp_path(id, "delete");
        fs::rename(&volume.path, &doomed)
            .context(|| format!("move {} out of the pool", volume.path.display()))?;
        meta::remove(&pool.meta_path(id))?;
        pool.sync_root_entries()?;
        remove_any(&doomed);
        self.stats_cache.forget(id);
        tracing::info!(volume = id, pool = %pool.name, "volume deleted");
        Ok(())
    }

    /// Refuses while a mount uses one of the volume's loop devices; otherwise
    /// detaches the unused ones (left by a crash, or still closing after an
    /// unpublish) and waits for the kernel to let go of the file.
    fn release_loop_devices(&self, id: &str, file: &Path) -> CoreResult<()> {
        for dev in block::find_attached_devices(file)? {
            let held = block::is_in_use(&dev)?
                || !block::detach_and_wait(&dev, publish::DELETE_DETACH_WAIT)?;
            if held {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {id} is still attached as {}; unpublish it first",
                    dev.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Every volume of every pool, sorted by ID.
    pub fn all_volumes(&self) -> CoreResult<Vec<Volume>> {
        let mut out = Vec::new();
        let mut seen = HashMap::new();
        for pool in &self.pools {
            let entries = match fs::read_dir(&pool.root) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(pool = %pool.name, error = %e, "cannot list pool");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str() else { continue };
                if !crate::names::is_valid_name(id) || seen.contains_key(id) {
                    continue;
                }
                if let Ok(Some(v)) = self.volume_in(pool, id) {
                    seen.insert(id.to_owned(), ());
                    out.push(v);
                }
            }
        }
        out.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        Ok(out)
    }

    /// One page of volumes after `start_token`.
    pub fn list_volumes(
        &self,
        start_token: &str,
        max_entries: i32,
    ) -> CoreResult<(Vec<Volume>, String)> {
        if max_entries < 0 {
            return Err(CoreError::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let after = token::decode(start_token)?;
        let all = self.all_volumes()?;
        Ok(token::page(
            all,
            after.as_deref(),
            max_entries as usize,
            |v| &v.meta.id,
        ))
    }

    /// Grows a volume to at least `required` bytes.
    pub fn expand_volume(&self, id: &str, required: i64, limit: i64) -> CoreResult<Expanded> {
        validate_name("volume ID", id)?;
        let _lock = self.lock("volume", id)?;
        let volume = self.get_volume(id)?;
        let pool = self.pool_of(&volume)?;
        let m = &volume.meta;
        let capacity =
            self.decide_capacity(pool, m.layout, m.fs_type.as_deref(), required, limit)?;
        if capacity < m.capacity_bytes {
            if limit > 0 && (limit as u64) < m.capacity_bytes {
                return Err(CoreError::OutOfRange(format!(
                    "volume {id} is {} bytes; it cannot shrink to {limit}",
                    m.capacity_bytes
                )));
            }
            // Already at least as large as asked.
            return Ok(Expanded {
                capacity_bytes: m.capacity_bytes,
                node_expansion_required: false,
            });
        }
        if capacity == m.capacity_bytes && !volume.legacy {
            return Ok(Expanded {
                capacity_bytes: capacity,
                node_expansion_required: m.layout.is_file(),
            });
        }
        if m.layout.is_file() {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&volume.path)
                .context(|| format!("open {}", volume.path.display()))?;
            file.set_len(capacity)
                .map_err(|e| space_error(e, &pool.name, &volume.path))?;
            if m.preallocated {
                block::preallocate(&volume.path, capacity)
                    .map_err(|e| space_error(e, &pool.name, &volume.path))?;
            }
        }
        let mut updated = m.clone();
        updated.capacity_bytes = capacity;
        meta::write_atomic(&pool.meta_path(id), &updated)?;
        pool.sync()?;
        tracing::info!(
            volume = id,
            from = m.capacity_bytes,
            to = capacity,
            "volume expanded"
        );
        Ok(Expanded {
            capacity_bytes: capacity,
            node_expansion_required: m.layout.is_file(),
        })
    }

    /// Applies mutable parameters (ModifyVolume).
    pub fn modify_volume(&self, id: &str, mutable: &HashMap<String, String>) -> CoreResult<()> {
        validate_name("volume ID", id)?;
        let preallocate = params::parse_mutable(mutable)?;
        let _lock = self.lock("volume", id)?;
        let volume = self.get_volume(id)?;
        let pool = self.pool_of(&volume)?;
        let Some(true) = preallocate else {
            return Ok(());
        };
        if !volume.meta.layout.is_file() {
            return Err(CoreError::InvalidArgument(format!(
                "volume {id} is a directory; preallocation applies to Block and image volumes"
            )));
        }
        block::preallocate(&volume.path, volume.meta.capacity_bytes)
            .map_err(|e| space_error(e, &pool.name, &volume.path))?;
        if !volume.meta.preallocated {
            let mut updated = volume.meta.clone();
            updated.preallocated = true;
            meta::write_atomic(&pool.meta_path(id), &updated)?;
        }
        pool.sync()?;
        tracing::info!(volume = id, "volume preallocated");
        Ok(())
    }

    /// Condition of a volume's backing store: `None` when healthy.
    pub fn volume_problem(&self, volume: &Volume) -> Option<String> {
        match fs::symlink_metadata(&volume.path) {
            Err(e) => Some(format!("backing {} is missing: {e}", volume.path.display())),
            Ok(st) if st.is_dir() != (volume.meta.layout == Layout::Directory) => Some(format!(
                "backing {} has the wrong file type",
                volume.path.display()
            )),
            Ok(_) => None,
        }
    }
}

fn describe_layout(layout: Layout) -> &'static str {
    match layout {
        Layout::Directory => "Filesystem (directory)",
        Layout::File => "Block",
        Layout::Image => "Filesystem (image)",
    }
}

/// Maps ENOSPC to RESOURCE_EXHAUSTED with a useful message.
pub fn space_error(e: std::io::Error, pool: &str, path: &Path) -> CoreError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => CoreError::ResourceExhausted(format!(
            "pool {pool} has no space left for {}",
            path.display()
        )),
        _ => CoreError::io(format!("allocate {}", path.display()), e),
    }
}

/// Removes a file or directory tree; failures are logged (start-up sweeps them).
pub fn remove_any(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(st) if st.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove; start-up will retry");
    }
}
