//! NodeGetVolumeStats: a volume's own usage and condition.
//!
//! Kubelet asks for every volume every minute, and a directory volume's
//! usage is a walk of a tree its pod controls. So walks are single-flight
//! per volume (concurrent callers wait for the one walk) and their result
//! is reused for a short while.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::meta::{self, Found};
use super::node::{lookup_path, NodeStats};
use super::{Core, Volume};
use crate::error::{CoreError, CoreResult, IoContext, Object};
use crate::mount;
use crate::names::validate_name;
use crate::tree::{self, TreeUsage};

/// How long a walk's result is reused.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a caller waits for another caller's walk before walking itself.
const WAIT_FOR_WALK: Duration = Duration::from_secs(60);

enum Entry {
    /// A walk is running; the last result, if any, is served meanwhile.
    Walking(Option<TreeUsage>),
    Done(Instant, TreeUsage),
}

#[derive(Default)]
pub struct StatsCache {
    entries: Mutex<HashMap<String, Entry>>,
    walked: Condvar,
}

impl StatsCache {
    /// The usage of a directory volume: cached, or walked once for all callers.
    pub fn usage(&self, vol: &Volume) -> CoreResult<TreeUsage> {
        let id = vol.id();
        let deadline = Instant::now() + WAIT_FOR_WALK;
        let mut entries = self.entries.lock().unwrap();
        let last = loop {
            match entries.get(id) {
                Some(Entry::Done(at, u)) if at.elapsed() < CACHE_TTL => return Ok(*u),
                // Another caller is walking: its previous result will do,
                // rather than holding a lane while a huge tree is walked.
                Some(Entry::Walking(Some(u))) => return Ok(*u),
                Some(Entry::Walking(None)) if Instant::now() < deadline => {
                    entries = self
                        .walked
                        .wait_timeout(entries, Duration::from_secs(1))
                        .unwrap()
                        .0;
                }
                Some(Entry::Done(_, u)) => break Some(*u),
                _ => break None,
            }
        };
        entries.insert(id.to_owned(), Entry::Walking(last));
        drop(entries);
        let walked =
            tree::usage_at(&vol.path).context(|| format!("measure {}", vol.path.display()));
        let mut entries = self.entries.lock().unwrap();
        match &walked {
            Ok(u) => entries.insert(id.to_owned(), Entry::Done(Instant::now(), *u)),
            Err(_) => entries.remove(id),
        };
        drop(entries);
        self.walked.notify_all();
        walked
    }

    pub fn forget(&self, id: &str) {
        self.entries.lock().unwrap().remove(id);
    }
}

impl Core {
    /// Usage and condition of a volume published (or staged) at `path`.
    pub fn node_stats(&self, id: &str, path: &Path) -> CoreResult<NodeStats> {
        validate_name("volume_id", id)?;
        let path = lookup_path("volume_path", id, path)?;
        let Some(vol) = self.find_volume(id)? else {
            return self.orphan_stats(id);
        };
        let not_here = || CoreError::NotAt {
            id: id.to_owned(),
            path: path.clone(),
        };
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(not_here());
        }
        let Some(root) = mount::mounted_at(&path)? else {
            return Err(not_here());
        };
        let problem = self.volume_problem(&vol);
        if !vol.layout().owns_target(&vol, &root) {
            // A Block target whose loop device was lost is still this
            // volume's publication, and abnormal.
            let lost = vol
                .layout()
                .lost_publication(&vol, &root, &path)
                .ok_or_else(not_here)?;
            return Ok(NodeStats {
                total_bytes: vol.meta.capacity_bytes,
                problem: problem.or(Some(lost)),
                ..Default::default()
            });
        }
        let mut stats = vol.layout().usage(self, &vol, &path, &root)?;
        stats.problem = problem;
        Ok(stats)
    }

    /// A volume whose metadata exists but whose backing store vanished
    /// under a running driver: abnormal, not unknown.
    fn orphan_stats(&self, id: &str) -> CoreResult<NodeStats> {
        for pool in self.pools() {
            let Ok(dirs) = pool.dirs() else { continue };
            if let Found::Present(m) = meta::read(&dirs, id) {
                return Ok(NodeStats {
                    total_bytes: m.capacity_bytes,
                    inodes: (!m.layout.is_file() || m.layout.holds_filesystem())
                        .then_some((0, 0, 0)),
                    problem: Some(format!(
                        "backing {} of volume {id} is missing",
                        pool.volume_path(id).display()
                    )),
                    ..Default::default()
                });
            }
        }
        Err(CoreError::missing(Object::Volume, id, &self.node_id))
    }
}
