//! Finding volumes: by ID in the pools, and in order for ListVolumes.
//!
//! Listing keeps a sorted index of volume IDs in memory, rebuilt from the
//! pools (one directory read each) when a listing starts and kept current
//! by creates and deletes, so paging through N volumes costs O(N) in all.

use std::collections::BTreeMap;
use std::fs;
use std::ops::Bound;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use super::meta::{self, Found};
use super::{token, Core, Volume, VolumeMeta};
use crate::error::{CoreError, CoreResult, Object};
use crate::fstools::ImageFs;
use crate::names::{is_valid_name, validate_name};
use crate::pool::Pool;

/// The most entries one ListVolumes or ListSnapshots page holds, so a
/// response stays far below the 4 MiB clients accept.
pub const MAX_PAGE: usize = 2000;

/// IDs in order (volumes, or snapshots), with the index of the pool that
/// holds each; `None` until a listing builds it.
#[derive(Debug, Default)]
pub struct Index {
    ids: Mutex<Option<BTreeMap<String, usize>>>,
}

impl Index {
    pub fn insert(&self, id: &str, pool: usize) {
        if let Some(map) = self.ids.lock().unwrap().as_mut() {
            map.entry(id.to_owned()).or_insert(pool);
        }
    }

    pub fn remove(&self, id: &str) {
        if let Some(map) = self.ids.lock().unwrap().as_mut() {
            map.remove(id);
        }
    }

    /// Rebuilds the index when a listing starts (no token) or was never
    /// built: the pools are read once per listing, not once per page.
    pub fn refresh(&self, starting: bool, build: impl FnOnce() -> BTreeMap<String, usize>) {
        let stale = starting || self.ids.lock().unwrap().is_none();
        if stale {
            let fresh = build();
            *self.ids.lock().unwrap() = Some(fresh);
        }
    }

    /// Up to `max` objects after `after`, in ID order, loaded by `load`;
    /// entries that vanished out of band are dropped as they are met.
    /// True as second value when more follow.
    pub fn page<T>(
        &self,
        after: Option<&str>,
        max: usize,
        mut load: impl FnMut(&str, usize) -> CoreResult<Option<T>>,
    ) -> CoreResult<(Vec<T>, bool)> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = after.map(str::to_owned);
        loop {
            let batch: Vec<(String, usize)> = {
                let guard = self.ids.lock().unwrap();
                let Some(map) = guard.as_ref() else {
                    return Ok((out, false));
                };
                let lower = cursor.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                map.range::<str, _>((lower, Bound::Unbounded))
                    .take(max + 1 - out.len())
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            };
            if batch.is_empty() {
                return Ok((out, false));
            }
            for (id, pool) in batch {
                if out.len() == max {
                    return Ok((out, true));
                }
                match load(&id, pool)? {
                    Some(v) => out.push(v),
                    None => self.remove(&id),
                }
                cursor = Some(id);
            }
        }
    }
}

/// The page size for a request's `max_entries` (0: as many as fit).
pub fn page_size(max_entries: i32) -> CoreResult<usize> {
    if max_entries < 0 {
        return Err(CoreError::invalid(
            "max_entries",
            &max_entries.to_string(),
            "must not be negative",
        ));
    }
    Ok(if max_entries == 0 {
        MAX_PAGE
    } else {
        (max_entries as usize).min(MAX_PAGE)
    })
}

/// The next_token after a page.
pub fn next_token(more: bool, last: Option<&str>) -> String {
    match (more, last) {
        (true, Some(last)) => token::encode(last),
        _ => String::new(),
    }
}

/// With its metadata damaged, a file that holds an XFS or ext4 superblock
/// is taken for an image volume (so its mounts are still recognised and
/// undone); anything else stays what its file type says.
fn inferred_from_content(mut meta: VolumeMeta, path: &std::path::Path) -> VolumeMeta {
    if !meta.layout.is_file() {
        return meta;
    }
    for fs in [ImageFs::Xfs, ImageFs::Ext4] {
        if matches!(fs.size_on(path), Ok(Some(_))) {
            if let Some(image) = super::Layout::named("image") {
                meta.layout = image;
                meta.mode = image.mode();
                meta.fs_type = Some(fs);
            }
            break;
        }
    }
    meta
}

impl Core {
    /// Looks a volume up in one pool. Symlinks and odd file types are not
    /// volumes; a volume whose metadata is damaged is still one (reported
    /// abnormal), never hidden.
    fn volume_in(&self, pool: &Pool, id: &str) -> CoreResult<Option<Volume>> {
        let path = pool.volume_path(id);
        // A `snapshotPath` inside the pool (the Go driver's `<pool>/snapshots`)
        // is never a volume.
        if pool.snapshot_dir() == path {
            return Ok(None);
        }
        let st = match fs::symlink_metadata(&path) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CoreError::io(format!("stat {}", path.display()), e)),
        };
        let ft = st.file_type();
        if !(ft.is_dir() || ft.is_file()) {
            return Ok(None);
        }
        let inferred = || VolumeMeta::inferred(id, &pool.name, ft.is_dir(), st.len());
        let dirs = pool.dirs()?;
        let (meta, legacy, problem) = match meta::read(&dirs, id) {
            Found::Present(mut m) if m.layout.is_file() != ft.is_dir() => {
                // The pool it lies in, whatever name it was made under (a
                // pool renamed, or `pathConfig` moved to `storagePools`).
                m.pool.clone_from(&pool.name);
                (m, false, None)
            }
            Found::Present(m) => (
                inferred(),
                true,
                Some(format!(
                    "its metadata says {} but {} is a {}",
                    m.layout.describe(),
                    path.display(),
                    if ft.is_dir() { "directory" } else { "file" }
                )),
            ),
            Found::Absent => (inferred(), true, None),
            Found::Damaged(why) => (
                inferred_from_content(inferred(), &path),
                true,
                Some(format!("its metadata file is damaged: {why}")),
            ),
        };
        if let Some(p) = &problem {
            tracing::warn!(pool = %pool.name, volume = id, "volume kept and reported abnormal: {p}");
        }
        Ok(Some(Volume {
            meta,
            path,
            legacy,
            problem,
        }))
    }

    /// Finds a volume by ID in any pool.
    pub fn find_volume(&self, id: &str) -> CoreResult<Option<Volume>> {
        validate_name("volume_id", id)?;
        for pool in self.pools() {
            if !pool.is_initialized() {
                continue;
            }
            if let Some(v) = self.volume_in(pool, id)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Like `find_volume`, but a missing volume is NOT_FOUND, or
    /// UNAVAILABLE while a pool that may hold it is not ready.
    pub fn get_volume(&self, id: &str) -> CoreResult<Volume> {
        match self.find_volume(id)? {
            Some(v) => Ok(v),
            None => Err(self
                .not_ready_pool(Object::Volume, id)
                .unwrap_or_else(|| CoreError::missing(Object::Volume, id, &self.node_id))),
        }
    }

    /// UNAVAILABLE for `id` when some pool is not ready (waiting for its
    /// mount): the volume or snapshot may be in it, so "not found" (or a
    /// delete that does nothing) would be a guess.
    pub fn not_ready_pool(&self, kind: Object, id: &str) -> Option<CoreError> {
        self.pools()
            .iter()
            .find(|p| !p.is_initialized())
            .map(|p| CoreError::PoolUnavailable {
                pool: p.name.clone(),
                why: format!("it is not ready, and {kind} {id} may be in it"),
            })
    }

    pub fn pool_of(&self, vol: &Volume) -> CoreResult<&Pool> {
        self.pool(Some(&vol.meta.pool))
    }

    pub(crate) fn pool_index(&self, name: &str) -> usize {
        self.pools()
            .iter()
            .position(|p| p.name == name)
            .unwrap_or(0)
    }

    /// Reads every pool's entries into the index.
    fn rebuild_index(&self) -> BTreeMap<String, usize> {
        let mut map = BTreeMap::new();
        for (i, pool) in self.pools().iter().enumerate() {
            if pool.dirs().is_err() {
                continue;
            }
            let Ok(entries) = fs::read_dir(&pool.root) else {
                tracing::warn!(pool = %pool.name, "cannot list pool");
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().filter(|n| is_valid_name(n)) else {
                    continue;
                };
                let Ok(ft) = entry.file_type() else { continue };
                if (ft.is_dir() || ft.is_file()) && pool.snapshot_dir() != entry.path() {
                    map.entry(id.to_owned()).or_insert(i);
                }
            }
        }
        map
    }

    /// One page of volumes after `start_token`; `max_entries` 0 means as
    /// many as fit in one response.
    pub fn list_volumes(
        &self,
        start_token: &str,
        max_entries: i32,
    ) -> CoreResult<(Vec<Volume>, String)> {
        let max = page_size(max_entries)?;
        let after = token::decode(start_token)?;
        self.index.refresh(after.is_none(), || self.rebuild_index());
        let (page, more) = self.index.page(after.as_deref(), max, |id, pool| {
            self.volume_in(&self.pools()[pool], id)
        })?;
        let next = next_token(more, page.last().map(|v| v.meta.id.as_str()));
        Ok((page, next))
    }

    /// Every volume of every pool, in ID order (metrics, tools).
    pub fn all_volumes(&self) -> CoreResult<Vec<Volume>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = self.list_volumes(&token, 0)?;
            out.extend(page);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// Condition of a volume's backing store: `None` when healthy.
    pub fn volume_problem(&self, vol: &Volume) -> Option<String> {
        if let Some(p) = &vol.problem {
            return Some(format!("volume {}: {p}", vol.id()));
        }
        match fs::symlink_metadata(&vol.path) {
            Err(e) => Some(format!("backing {} is missing: {e}", vol.path.display())),
            Ok(st) if st.is_dir() == vol.layout().is_file() => Some(format!(
                "backing {} has the wrong file type",
                vol.path.display()
            )),
            Ok(st)
                if vol.layout().is_file()
                    && vol.meta.capacity_bytes > 0
                    && st.size() < vol.meta.capacity_bytes =>
            {
                Some(format!(
                    "backing {} is {} bytes, smaller than the volume's {}",
                    vol.path.display(),
                    st.size(),
                    vol.meta.capacity_bytes
                ))
            }
            Ok(_) => None,
        }
    }
}
