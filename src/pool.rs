//! A storage pool: a directory whose entries are volumes, plus the private
//! area `.hostpath-csi/` (metadata, temp, snapshots) that is never a volume.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use nix::sys::statfs::statfs;

use crate::config::PoolConfig;
use crate::error::{CoreError, CoreResult, IoContext};

/// Name of the private area inside every pool.
pub const PRIVATE_DIR: &str = ".hostpath-csi";

/// Space and inode figures of a pool's filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

pub struct Pool {
    pub name: String,
    pub root: PathBuf,
    pub shared: bool,
    require_mount: bool,
    private: PathBuf,
    meta_dir: PathBuf,
    tmp_dir: PathBuf,
    snapshot_dir: PathBuf,
    /// The pool root as opened when the pool became ready; `None` while a
    /// pvcTemplate pool waits for its mount.
    root_dir: Mutex<Option<File>>,
    /// Recovery the core runs each time the pool becomes ready.
    on_ready: std::sync::OnceLock<ReadyHook>,
    sync: GroupSync,
    dir_sync: GroupSync,
}

/// Work to run when a pool becomes ready (sweeping what a crash left).
pub type ReadyHook = Box<dyn Fn(&Pool) + Send + Sync>;

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("shared", &self.shared)
            .finish()
    }
}

impl Pool {
    /// Opens (creating if needed) a pool and sweeps leftovers of interrupted
    /// work. A pool that must be a mount point and is not one yet is opened
    /// as "waiting": not ready, and nothing is written into it.
    pub fn open(cfg: &PoolConfig) -> CoreResult<Pool> {
        fs::create_dir_all(&cfg.path)
            .context(|| format!("pool {}: cannot create {}", cfg.name, cfg.path.display()))?;
        let root = cfg
            .path
            .canonicalize()
            .context(|| format!("pool {}: cannot resolve {}", cfg.name, cfg.path.display()))?;
        let private = root.join(PRIVATE_DIR);
        let snapshot_dir = match &cfg.snapshot_path {
            Some(p) => p.clone(),
            None => private.join("snapshots"),
        };
        let pool = Pool {
            name: cfg.name.clone(),
            shared: cfg.shared,
            require_mount: cfg.require_mount,
            meta_dir: private.join("volumes"),
            tmp_dir: private.join("tmp"),
            private,
            snapshot_dir,
            root_dir: Mutex::new(None),
            on_ready: std::sync::OnceLock::new(),
            root,
            sync: GroupSync::default(),
            dir_sync: GroupSync::default(),
        };
        match pool.initialize() {
            Ok(()) => {}
            Err(CoreError::Unavailable(why)) => tracing::warn!(pool = %pool.name, "{why}"),
            Err(e) => return Err(e),
        }
        Ok(pool)
    }

    /// Makes the pool usable: checks its mount, creates the private area and
    /// sweeps leftovers. Runs again when the root was replaced (a mount
    /// appeared or the directory was recreated).
    fn initialize(&self) -> CoreResult<()> {
        if self.require_mount && !crate::mount::is_mount_point(&self.root)? {
            return Err(CoreError::Unavailable(format!(
                "pool {} waits for its filesystem to be mounted on {}",
                self.name,
                self.root.display()
            )));
        }
        for dir in [
            &self.private,
            &self.meta_dir,
            &self.tmp_dir,
            &self.snapshot_dir,
        ] {
            fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
        }
        fs::set_permissions(&self.private, fs::Permissions::from_mode(0o700))
            .context(|| format!("cannot restrict {}", self.private.display()))?;
        self.sweep_tmp();
        let handle = File::open(&self.root)
            .context(|| format!("pool {}: cannot open {}", self.name, self.root.display()))?;
        *self.root_dir.lock().unwrap() = Some(handle);
        if let Some(hook) = self.on_ready.get() {
            hook(self);
        }
        tracing::info!(pool = %self.name, path = %self.root.display(), "pool ready");
        Ok(())
    }

    /// Installs the recovery hook, and runs it now if the pool is ready.
    pub fn set_ready_hook(&self, hook: ReadyHook) {
        if self.on_ready.set(hook).is_ok() && self.is_initialized() {
            (self.on_ready.get().expect("just set"))(self);
        }
    }

    /// True once the pool has been initialised on its current root.
    pub fn is_initialized(&self) -> bool {
        self.root_dir.lock().unwrap().is_some()
    }

    /// Removes whatever an interrupted operation left in the temp area.
    fn sweep_tmp(&self) {
        let Ok(entries) = fs::read_dir(&self.tmp_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let result = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match result {
                Ok(()) => {
                    tracing::info!(pool = %self.name, path = %path.display(), "removed leftover of interrupted operation")
                }
                Err(e) => {
                    tracing::warn!(pool = %self.name, path = %path.display(), error = %e, "cannot remove leftover")
                }
            }
        }
    }

    /// Path of a volume; `id` must already be validated.
    pub fn volume_path(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn meta_path(&self, id: &str) -> PathBuf {
        self.meta_dir.join(format!("{id}.json"))
    }

    pub fn meta_dir(&self) -> &Path {
        &self.meta_dir
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// A fresh path in the temp area, unique within this process and run.
    pub fn tmp_path(&self, id: &str, purpose: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir
            .join(format!("{id}.{purpose}.{}.{n}", std::process::id()))
    }

    /// Filesystem figures from statfs.
    pub fn usage(&self) -> CoreResult<PoolUsage> {
        let st = statfs(&self.root).context(|| format!("pool {}: statfs", self.name))?;
        let bsize = st.block_size() as u64;
        Ok(PoolUsage {
            total_bytes: st.blocks() * bsize,
            available_bytes: st.blocks_available() * bsize,
            total_inodes: st.files(),
            free_inodes: st.files_free(),
        })
    }

    /// True when the pool root is present and is the directory the pool
    /// was initialised on; a replaced root is initialised again when the
    /// pool waits for a mount.
    pub fn is_accessible(&self) -> bool {
        let current = match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => (m.dev(), m.ino()),
            _ => return false,
        };
        let known = self
            .root_dir
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        if known == Some(current) {
            return true;
        }
        // A pvcTemplate pool whose mount appeared, or a recreated directory.
        self.initialize().is_ok()
    }

    /// Errors with UNAVAILABLE when the pool root has gone away.
    pub fn ensure_accessible(&self) -> CoreResult<()> {
        if self.is_accessible() {
            Ok(())
        } else {
            Err(CoreError::Unavailable(format!(
                "pool {} at {} is not accessible",
                self.name,
                self.root.display()
            )))
        }
    }

    /// Whether the pool or its snapshot area lives on the filesystem that
    /// holds `os_dir` (upstream's metric and meaning).
    pub fn shares_os_filesystem(&self, os_dir: &Path) -> bool {
        [&self.root, &self.snapshot_dir]
            .iter()
            .any(|p| crate::mount::same_filesystem(p, os_dir))
    }

    /// The filesystem type name of the pool (`xfs`, `ext4`, `tmpfs`, ...).
    pub fn fs_type(&self) -> String {
        crate::mount::fs_type_of(&self.root).unwrap_or_else(|| "unknown".into())
    }

    /// Makes everything written to the pool so far durable. Concurrent
    /// callers share one `syncfs`, so many creates cost one flush.
    pub fn sync(&self) -> CoreResult<()> {
        self.with_root(|f| self.sync.run(f, "syncfs", |fd| nix::unistd::syncfs(fd)))
    }

    /// Makes name changes in the pool root durable (a journal commit, no
    /// data writeback): enough for a delete, whose only durable effect is
    /// the volume leaving the root. Grouped like `sync`.
    pub fn sync_root_entries(&self) -> CoreResult<()> {
        self.with_root(|f| {
            self.dir_sync
                .run(f, "fsync pool root", |fd| nix::unistd::fsync(fd))
        })
    }

    fn with_root(&self, work: impl FnOnce(&File) -> CoreResult<()>) -> CoreResult<()> {
        let handle = self.root_dir.lock().unwrap().as_ref().map(File::try_clone);
        match handle {
            Some(Ok(f)) => work(&f),
            Some(Err(e)) => Err(CoreError::io(format!("pool {}: reopen root", self.name), e)),
            None => Err(CoreError::Unavailable(format!(
                "pool {} is not ready",
                self.name
            ))),
        }
    }
}

/// Group commit: callers take a ticket; one leader syncs for all tickets
/// issued before its flush started.
#[derive(Debug, Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    issued: u64,
    completed: u64,
    running: bool,
    last_error: Option<(u64, i32)>,
}

impl GroupSync {
    fn run(
        &self,
        fd: &File,
        what: &'static str,
        flush: impl Fn(&File) -> nix::Result<()>,
    ) -> CoreResult<()> {
        let mut st = self.state.lock().unwrap();
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.completed >= ticket {
                return match st.last_error {
                    Some((upto, errno)) if upto >= ticket => Err(CoreError::io(
                        what,
                        std::io::Error::from_raw_os_error(errno),
                    )),
                    _ => Ok(()),
                };
            }
            if !st.running {
                st.running = true;
                let covers = st.issued;
                drop(st);
                let result = flush(fd);
                st = self.state.lock().unwrap();
                st.running = false;
                st.completed = covers;
                if let Err(errno) = result {
                    st.last_error = Some((covers, errno as i32));
                }
                self.done.notify_all();
            } else {
                st = self.done.wait(st).unwrap();
            }
        }
    }
}
