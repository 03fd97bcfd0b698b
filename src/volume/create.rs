//! CreateVolume: a new volume, a clone of a volume, or a restore of a
//! snapshot. A volume is built in the pool's temp area and renamed into
//! place only when complete and durable, so a crash at any point leaves
//! either no volume or a whole one.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::guard::{Access, Guard};
use super::layout::{CloneRoute, Sizing};
use super::{meta, ContentSource, Core, CreateParams, Layout, Volume, VolumeMeta, VolumeMode};
use crate::block;
use crate::copy;
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::fstools::ImageFs;
use crate::names::validate_name;
use crate::pool::{Pool, PoolDirs};

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

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The capacity to give within the range asked, by the layout's rules, on
/// a pool of `pool_total` bytes. Pure: no I/O.
pub fn decide_capacity(
    sizing: Sizing,
    required: i64,
    limit: i64,
    pool_total: u64,
) -> CoreResult<u64> {
    if required < 0 || limit < 0 {
        return Err(CoreError::invalid(
            "capacity_range",
            &format!("[{required}, {limit}]"),
            "must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(CoreError::invalid(
            "capacity_range",
            &format!("[{required}, {limit}]"),
            "required_bytes exceeds limit_bytes",
        ));
    }
    let wanted = match (required, sizing.default) {
        // Nothing required: the default, or the most the limit allows.
        (0, Some(default)) if limit > 0 => default.min(limit / 4096 * 4096),
        (0, Some(default)) => default,
        _ => required,
    };
    let smallest = round_up(wanted, sizing.granule).max(sizing.minimum);
    let mut capacity = smallest;
    if limit > 0 && capacity > limit {
        // Round within the limit instead; loop devices need 4 KiB multiples.
        capacity = limit / 4096 * 4096;
        if capacity < wanted.max(sizing.minimum) || (sizing.default.is_some() && capacity == 0) {
            return Err(CoreError::SizeOutOfRange(format!(
                "the smallest volume of this layout for {wanted} bytes is {smallest} bytes, above limit_bytes {limit}"
            )));
        }
    }
    if capacity > pool_total {
        return Err(CoreError::SizeOutOfRange(format!(
            "{capacity} bytes is more than the pool can ever hold ({pool_total} bytes)"
        )));
    }
    Ok(capacity)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a clone's bytes come from.
struct SourceView {
    path: PathBuf,
    layout: Layout,
    capacity: u64,
    fs_type: Option<ImageFs>,
}

impl Core {
    /// Creates a volume, or returns the existing one when the request matches.
    pub fn create_volume(&self, req: &CreateRequest) -> CoreResult<Volume> {
        validate_name("name", &req.name)?;
        let _guard = self
            .guards
            .acquire(Object::Volume, &req.name, Access::Write)?;
        let pool = self.pool(req.params.storage_pool.as_deref())?;
        let layout = req.params.layout_for(req.mode)?;
        if layout.is_file() {
            block::check_loop_support()?;
        }
        let fs_type = layout
            .holds_filesystem()
            .then(|| ImageFs::from_fs_type(req.fs_type.as_deref()))
            .transpose()?;
        if let Some(existing) = self.find_volume(&req.name)? {
            check_compatible(&existing, req, &pool.name, layout)?;
            return if existing.legacy {
                adopt(existing, req, pool)
            } else {
                Ok(existing)
            };
        }
        let dirs = pool.dirs()?;
        if std::fs::symlink_metadata(pool.volume_path(&req.name)).is_ok() {
            return Err(CoreError::Conflict {
                kind: Object::Volume,
                id: req.name.clone(),
                field: "pool entry",
                have: "a symlink or special file".into(),
                asked: "a volume".into(),
            });
        }
        let sizing = layout.sizing(fs_type);
        let capacity = decide_capacity(
            sizing,
            req.required_bytes,
            req.limit_bytes,
            pool.usage()?.total_bytes,
        )?;
        self.check_room(pool, capacity)?;
        let (source, _source_guard) = self.hold_source(req.source.as_ref())?;
        check_source_filesystem(source.as_ref(), req.fs_type.as_deref(), layout)?;
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
        let staged_name = pool.tmp_name(&req.name, "create");
        let staged = pool.tmp_path(&staged_name);
        let built = self.build(&mut meta, &staged, source.as_ref());
        if let Err(e) = built {
            pool.discard(&dirs, staged_name);
            return Err(e.in_pool(&pool.name, || format!("volume {}", req.name)));
        }
        self.put_in_place(pool, &dirs, &meta, &staged_name)?;
        self.index.insert(&req.name, self.pool_index(&pool.name));
        tracing::info!(volume = %req.name, pool = %pool.name, layout = layout.name(), capacity, "volume created");
        Ok(Volume {
            path: pool.volume_path(&req.name),
            meta,
            legacy: false,
            problem: None,
        })
    }

    /// Holds a clone's source for reading while it is copied.
    fn hold_source(
        &self,
        source: Option<&ContentSource>,
    ) -> CoreResult<(Option<SourceView>, Option<Guard<'_>>)> {
        let Some(source) = source else {
            return Ok((None, None));
        };
        let elsewhere = |kind, id: &str| CoreError::SourceElsewhere {
            kind,
            id: id.to_owned(),
            node: self.node_id.clone(),
        };
        Ok(match source {
            ContentSource::Volume(id) => {
                let guard = self.guards.acquire(Object::Volume, id, Access::Read)?;
                let v = self
                    .find_volume(id)?
                    .ok_or_else(|| elsewhere(Object::SourceVolume, id))?;
                v.layout().settle(&v);
                let view = SourceView {
                    path: v.path,
                    layout: v.meta.layout,
                    capacity: v.meta.capacity_bytes,
                    fs_type: v.meta.fs_type,
                };
                (Some(view), Some(guard))
            }
            ContentSource::Snapshot(id) => {
                let guard = self.guards.acquire(Object::Snapshot, id, Access::Read)?;
                let s = self
                    .find_snapshot(id)?
                    .ok_or_else(|| elsewhere(Object::SourceSnapshot, id))?;
                let view = SourceView {
                    path: s.data_path,
                    layout: s.meta.layout,
                    capacity: s.meta.size_bytes,
                    fs_type: s.meta.fs_type,
                };
                (Some(view), Some(guard))
            }
        })
    }

    /// Builds a complete volume at `staged`. A clone may adjust `meta` (an
    /// image keeps its source's filesystem).
    fn build(
        &self,
        meta: &mut VolumeMeta,
        staged: &Path,
        source: Option<&SourceView>,
    ) -> CoreResult<()> {
        let layout = meta.layout;
        if let Some(src) = source {
            let route = layout.clone_route(src.layout).ok_or_else(|| {
                CoreError::Unacceptable(format!(
                    "cannot clone a {} volume into a {} volume; supported: the same layout, and a Block volume into a Filesystem directory volume (as {}) and back",
                    src.layout.describe(),
                    layout.describe(),
                    copy::DISK_IMAGE
                ))
            })?;
            // Only disk.img has to fit a Block target (checked when copied):
            // CDI sizes the Filesystem volume above its disk for overhead.
            if route != CloneRoute::DiskImageIntoFile
                && src.capacity > meta.capacity_bytes
                && meta.capacity_bytes != 0
            {
                return Err(CoreError::SizeOutOfRange(format!(
                    "the source is {} bytes, larger than the new volume ({} bytes)",
                    src.capacity, meta.capacity_bytes
                )));
            }
            meta.fs_type = src.fs_type.or(meta.fs_type);
            layout.build(meta, staged)?;
            fill(route, src, meta, staged)?;
        } else {
            layout.build(meta, staged)?;
        }
        if meta.preallocated && layout.is_file() {
            // Built aside: nobody can use the file yet.
            block::preallocate(staged, meta.capacity_bytes, 0)?;
        }
        Ok(())
    }

    /// Moves a built volume into the pool, durably. A volume without data
    /// of its own costs one metadata flush (written last, it commits the
    /// journal up to and including the rename; cut off before, start-up
    /// finds an empty metadata file beside an empty volume and rolls the
    /// create back). Anything that wrote data is synced first, then its
    /// metadata, then it appears.
    fn put_in_place(
        &self,
        pool: &Pool,
        dirs: &std::sync::Arc<PoolDirs>,
        meta: &VolumeMeta,
        staged: &str,
    ) -> CoreResult<()> {
        use std::os::fd::AsFd;
        // The one-flush path relies on the journal ordering the renames
        // before the flushed file (XFS, ext4); elsewhere (btrfs) the pool
        // root is synced too.
        let fast = meta.layout.holds_no_data(meta) && dirs.ordered_journal;
        let placed = (|| {
            if fast {
                meta::write_new(dirs, meta)?;
            } else {
                pool.sync(dirs)?;
                meta::write(dirs, meta)?;
            }
            nix::fcntl::renameat2(
                dirs.tmp.as_fd(),
                staged,
                dirs.root.as_fd(),
                meta.id.as_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .context(|| format!("move new volume {} into place", meta.id))?;
            if fast {
                meta::flush(dirs, &meta.id)
            } else {
                pool.sync_root_entries(dirs)
            }
        })();
        if let Err(e) = placed {
            pool.discard(dirs, staged.to_owned());
            if std::fs::symlink_metadata(pool.volume_path(&meta.id)).is_err() {
                let _ = meta::remove(dirs, &meta.id);
            }
            return Err(e.in_pool(&pool.name, || format!("volume {}", meta.id)));
        }
        Ok(())
    }
}

/// Copies a source's content into a volume being built. The source may be
/// in use: the copy is then crash-consistent at best.
fn fill(route: CloneRoute, src: &SourceView, meta: &VolumeMeta, staged: &Path) -> CoreResult<()> {
    let grow = |path: &Path| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .context(|| format!("open {}", path.display()))?;
        file.set_len(meta.capacity_bytes)
            .context(|| format!("size {}", path.display()))
    };
    match route {
        CloneRoute::Tree => copy::copy_tree_contents(&src.path, staged),
        CloneRoute::File => {
            copy::copy_file_into(&src.path, staged)?;
            grow(staged)
        }
        CloneRoute::FileIntoDiskImage => {
            copy::copy_file_new(&src.path, &staged.join(copy::DISK_IMAGE)).map(drop)
        }
        CloneRoute::DiskImageIntoFile => {
            let disk = src.path.join(copy::DISK_IMAGE);
            let from = copy::open_regular(&disk)?.ok_or_else(|| {
                CoreError::Unacceptable(format!(
                    "the source holds no regular file {} to copy into a Block volume",
                    copy::DISK_IMAGE
                ))
            })?;
            let len = from
                .metadata()
                .context(|| format!("stat {}", disk.display()))?
                .len();
            if len > meta.capacity_bytes {
                return Err(CoreError::SizeOutOfRange(format!(
                    "the source's {} is {len} bytes, larger than the new Block volume ({} bytes)",
                    copy::DISK_IMAGE,
                    meta.capacity_bytes
                )));
            }
            copy::copy_open_into(&from, &disk, staged)?;
            grow(staged)
        }
    }
}

/// The same name asked again: the same request gets the same volume; a
/// different one is ALREADY_EXISTS, naming what differs. A volume without
/// metadata is held to its pool and mode only (`adopt` does the rest).
fn check_compatible(
    existing: &Volume,
    req: &CreateRequest,
    pool: &str,
    layout: Layout,
) -> CoreResult<()> {
    let m = &existing.meta;
    let conflict = |field: &'static str, have: String, asked: String| {
        Err(CoreError::Conflict {
            kind: Object::Volume,
            id: req.name.clone(),
            field,
            have,
            asked,
        })
    };
    if m.pool != pool {
        return conflict("pool", m.pool.clone(), pool.to_owned());
    }
    if m.mode != req.mode {
        return conflict("mode", format!("{:?}", m.mode), format!("{:?}", req.mode));
    }
    if existing.legacy {
        return Ok(());
    }
    if m.layout != layout {
        return conflict("layout", m.layout.name().into(), layout.name().into());
    }
    let (required, limit) = (
        req.required_bytes.max(0) as u64,
        req.limit_bytes.max(0) as u64,
    );
    if m.capacity_bytes < required || (limit > 0 && m.capacity_bytes > limit) {
        let range = format!(
            "[{required}, {}]",
            if limit > 0 {
                limit.to_string()
            } else {
                "unlimited".into()
            }
        );
        return conflict("capacity", m.capacity_bytes.to_string(), range);
    }
    if req.source != m.source {
        return conflict(
            "content source",
            format!("{:?}", m.source),
            format!("{:?}", req.source),
        );
    }
    if m.layout.mode() == VolumeMode::Block && m.block_size != req.params.block_size {
        return conflict(
            "blockSize",
            m.block_size.to_string(),
            req.params.block_size.to_string(),
        );
    }
    // A clone keeps its source's filesystem whatever was asked, so only an
    // empty image volume is held to the asked fs_type.
    if let (Some(have), Some(asked), None) = (m.fs_type, req.fs_type.as_deref(), &m.source) {
        if !asked.is_empty() && have.name() != asked {
            return conflict("filesystem", have.name().into(), asked.into());
        }
    }
    Ok(())
}

/// A clone or restore of an image keeps its source's filesystem: one that
/// asks for another could never be staged with the capability it asked
/// for, so it is refused rather than made unusable.
fn check_source_filesystem(
    source: Option<&SourceView>,
    asked: Option<&str>,
    layout: Layout,
) -> CoreResult<()> {
    let (Some(have), Some(asked)) = (source.and_then(|s| s.fs_type), asked) else {
        return Ok(());
    };
    if layout.holds_filesystem() && !asked.is_empty() && have.name() != asked {
        return Err(CoreError::Unacceptable(format!(
            "the source is a {} image and a clone keeps its filesystem; this volume asks for {asked}",
            have.name()
        )));
    }
    Ok(())
}

/// A volume without metadata (the Go driver's, or a bare file) asked for
/// again: taken over only with an honest capacity. A file is its size, so
/// a request it cannot satisfy is ALREADY_EXISTS; a directory has no limit
/// of its own and gets the capacity asked for, recorded from now on.
fn adopt(mut existing: Volume, req: &CreateRequest, pool: &Pool) -> CoreResult<Volume> {
    if existing.problem.is_some() {
        return Err(CoreError::Conflict {
            kind: Object::Volume,
            id: req.name.clone(),
            field: "metadata",
            have: "a damaged metadata file".into(),
            asked: "a healthy volume".into(),
        });
    }
    if let Some(source) = &req.source {
        // Nothing says it holds the source's content: the Go driver makes
        // the directory first and fills it after, so one it was cut off in
        // is half a copy. Never acknowledged as a clone or restore.
        return Err(CoreError::Conflict {
            kind: Object::Volume,
            id: req.name.clone(),
            field: "content source",
            have: "a volume made without metadata, whose content is unknown".into(),
            asked: format!("{source:?}"),
        });
    }
    let (required, limit) = (
        req.required_bytes.max(0) as u64,
        req.limit_bytes.max(0) as u64,
    );
    let m = &mut existing.meta;
    if m.layout.is_file() {
        if m.capacity_bytes < required || (limit > 0 && m.capacity_bytes > limit) {
            return Err(CoreError::Conflict {
                kind: Object::Volume,
                id: req.name.clone(),
                field: "capacity (the file's size)",
                have: m.capacity_bytes.to_string(),
                asked: format!(
                    "[{required}, {}]",
                    if limit > 0 {
                        limit.to_string()
                    } else {
                        "unlimited".into()
                    }
                ),
            });
        }
        return Ok(existing);
    }
    let sizing = m.layout.sizing(None);
    m.capacity_bytes = decide_capacity(
        sizing,
        req.required_bytes,
        req.limit_bytes,
        pool.usage()?.total_bytes,
    )?;
    meta::write(&*pool.dirs()?, m)?;
    existing.legacy = false;
    tracing::info!(volume = %req.name, pool = %pool.name, capacity = m.capacity_bytes, "adopted a volume made without metadata (the Go driver's)");
    Ok(existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const DIR: Sizing = Sizing {
        granule: 4096,
        minimum: 0,
        default: None,
    };
    const FILE: Sizing = Sizing {
        granule: 1 << 20,
        minimum: 1 << 20,
        default: Some(GIB),
    };

    #[test]
    fn nothing_required_under_an_unaligned_limit_takes_the_aligned_limit() {
        assert_eq!(
            decide_capacity(FILE, 0, (100 << 20) + 1, 10 * GIB).unwrap(),
            100 << 20
        );
    }

    #[test]
    fn capacities_round_within_the_range() {
        assert_eq!(decide_capacity(DIR, 1, 0, 10 * GIB).unwrap(), 4096);
        assert_eq!(decide_capacity(FILE, 0, 0, 10 * GIB).unwrap(), GIB);
        assert_eq!(
            decide_capacity(FILE, 0, 512 << 20, 10 * GIB).unwrap(),
            512 << 20
        );
        // Rounding up would pass the limit: round within it instead.
        assert_eq!(
            decide_capacity(FILE, 2_000_000, 2_090_000, 10 * GIB).unwrap(),
            2_090_000 / 4096 * 4096
        );
    }

    fn request(mode: VolumeMode, required: i64) -> CreateRequest {
        CreateRequest {
            name: "v".into(),
            required_bytes: required,
            limit_bytes: 0,
            mode,
            fs_type: None,
            params: CreateParams::default(),
            source: None,
            ephemeral: false,
        }
    }

    fn existing(layout: &str, capacity: u64) -> Volume {
        let layout = Layout::named(layout).unwrap();
        let mut meta = VolumeMeta::inferred("v", "local", !layout.is_file(), capacity);
        meta.layout = layout;
        meta.mode = layout.mode();
        meta.capacity_bytes = capacity;
        Volume {
            meta,
            path: "/pool/v".into(),
            legacy: false,
            problem: None,
        }
    }

    #[test]
    fn the_same_request_again_is_compatible_and_a_different_one_names_the_field() {
        let dir = Layout::named("directory").unwrap();
        let v = existing("directory", GIB);
        assert!(check_compatible(
            &v,
            &request(VolumeMode::Filesystem, GIB as i64),
            "local",
            dir
        )
        .is_ok());
        let field = |r: CoreResult<()>| match r {
            Err(CoreError::Conflict { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(check_compatible(
                &v,
                &request(VolumeMode::Filesystem, 2 * GIB as i64),
                "local",
                dir
            )),
            "capacity"
        );
        assert_eq!(
            field(check_compatible(
                &v,
                &request(VolumeMode::Filesystem, 1),
                "other",
                dir
            )),
            "pool"
        );
        assert_eq!(
            field(check_compatible(
                &v,
                &request(VolumeMode::Block, 1),
                "local",
                dir
            )),
            "mode"
        );
        let image = Layout::named("image").unwrap();
        assert_eq!(
            field(check_compatible(
                &v,
                &request(VolumeMode::Filesystem, 1),
                "local",
                image
            )),
            "layout"
        );
        let mut clone = request(VolumeMode::Filesystem, 1);
        clone.source = Some(ContentSource::Volume("src".into()));
        assert_eq!(
            field(check_compatible(&v, &clone, "local", dir)),
            "content source"
        );
        let block = existing("file", GIB);
        let mut bs = request(VolumeMode::Block, 1);
        bs.params.block_size = 4096;
        assert_eq!(
            field(check_compatible(
                &block,
                &bs,
                "local",
                Layout::named("file").unwrap()
            )),
            "blockSize"
        );
    }

    #[test]
    fn impossible_ranges_say_why() {
        assert!(matches!(
            decide_capacity(DIR, -1, 0, GIB),
            Err(CoreError::InvalidValue { .. })
        ));
        assert!(matches!(
            decide_capacity(DIR, 10, 5, GIB),
            Err(CoreError::InvalidValue { .. })
        ));
        assert!(matches!(
            decide_capacity(FILE, 0, 4096, GIB),
            Err(CoreError::SizeOutOfRange(_))
        ));
        assert!(matches!(
            decide_capacity(DIR, 2 * GIB as i64, 0, GIB),
            Err(CoreError::SizeOutOfRange(_))
        ));
    }
}
