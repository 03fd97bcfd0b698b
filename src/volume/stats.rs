//! Usage of a directory volume: a bounded walk, cached for a short while.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a walk's result is reused.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// A walk stops after this many entries (and says the figure is a floor).
const MAX_ENTRIES: u64 = 2_000_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes allocated on disk (holes not counted).
    pub bytes: u64,
    /// Files, directories and links, the root included.
    pub inodes: u64,
    /// True when the walk hit its bound.
    pub truncated: bool,
}

/// Walks `root` without following symlinks or crossing into other mounts.
pub fn walk(root: &Path) -> std::io::Result<TreeUsage> {
    let top = fs::symlink_metadata(root)?;
    let dev = top.dev();
    let mut usage = TreeUsage {
        bytes: top.blocks() * 512,
        inodes: 1,
        truncated: false,
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(st) = entry.metadata() else { continue };
            usage.inodes += 1;
            if usage.inodes > MAX_ENTRIES {
                usage.truncated = true;
                return Ok(usage);
            }
            if st.nlink() <= 1 || st.is_dir() {
                usage.bytes += st.blocks() * 512;
            } else {
                // Hard links: count a share so the total stays right.
                usage.bytes += st.blocks() * 512 / st.nlink();
            }
            if st.is_dir() && st.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[derive(Default)]
pub struct StatsCache {
    entries: Mutex<HashMap<String, (Instant, TreeUsage)>>,
}

impl StatsCache {
    pub fn usage(&self, id: &str, root: &Path) -> std::io::Result<TreeUsage> {
        if let Some((at, u)) = self.entries.lock().unwrap().get(id) {
            if at.elapsed() < CACHE_TTL {
                return Ok(*u);
            }
        }
        let u = walk(root)?;
        self.entries
            .lock()
            .unwrap()
            .insert(id.to_owned(), (Instant::now(), u));
        Ok(u)
    }

    pub fn forget(&self, id: &str) {
        self.entries.lock().unwrap().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_own_tree_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/f"), vec![1u8; 64 * 1024]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        let u = walk(dir.path()).unwrap();
        assert_eq!(u.inodes, 4);
        assert!(u.bytes >= 64 * 1024 && u.bytes < 1 << 20, "{u:?}");
    }
}
