//! A storage pool: a directory whose entries are volumes, plus the private
//! area `.hostpath-csi/` (metadata, temp, snapshots) that is never a volume.
//!
//! Once ready, a pool is held by descriptors: its root, its private
//! directories and an exclusive lock that keeps a second driver off it.
//! Work inside the pool goes through those descriptors, so a pool path
//! replaced by a symlink is never written through: the pool is then simply
//! not ready.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::config::PoolConfig;
use crate::dirfd;
use crate::error::{CoreError, CoreResult, IoContext};

/// Name of the private area inside every pool.
pub const PRIVATE_DIR: &str = ".hostpath-csi";
const META_DIR: &str = "volumes";
const TMP_DIR: &str = "tmp";
const SNAPSHOT_DIR: &str = "snapshots";
const LOCK_FILE: &str = "lock";
/// Former temp areas, renamed aside at start-up and removed in the background.
const TRASH_PREFIX: &str = "trash-";

/// Space and inode figures of a pool's filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// The descriptors of a ready pool.
#[derive(Debug)]
pub struct PoolDirs {
    pub root: OwnedFd,
    pub private: OwnedFd,
    pub meta: OwnedFd,
    pub tmp: OwnedFd,
    pub snapshots: OwnedFd,
    /// Held for as long as this driver serves the pool (flock).
    _lock: File,
    root_id: (u64, u64),
    /// FICLONE works between files of the pool.
    pub reflink: bool,
    /// The snapshot directory is on the pool's own filesystem.
    snapshots_on_pool: bool,
    /// One fsync of a file also commits every earlier rename in the
    /// filesystem (XFS's and ext4's journals do; btrfs's log does not).
    pub ordered_journal: bool,
}

/// Work to run when a pool becomes ready (sweeping what a crash left).
pub type ReadyHook = Box<dyn Fn(&Pool) + Send + Sync>;

pub struct Pool {
    pub name: String,
    pub root: PathBuf,
    pub shared: bool,
    require_mount: bool,
    /// Suffix of this node's lock and temp area: empty, or `-<node>` in a
    /// shared pool that every node's driver serves at once.
    node_tag: String,
    /// Serialises (re)initialisation.
    init: Mutex<()>,
    snapshot_path: PathBuf,
    dirs: Mutex<Option<Arc<PoolDirs>>>,
    /// Recovery the core runs each time the pool becomes ready.
    on_ready: std::sync::OnceLock<ReadyHook>,
    sync: GroupSync,
    dir_sync: GroupSync,
    snapshot_sync: GroupSync,
    reaper: Mutex<Option<mpsc::Sender<Doomed>>>,
    /// Leftovers the background removal could not remove.
    unremovable: Arc<AtomicU64>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("shared", &self.shared)
            .finish()
    }
}

/// Where a doomed entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    /// The private area itself (a previous run's temp area).
    Private,
    Tmp,
    Snapshots,
}

/// An entry to remove in the background: `name` inside `dir`.
struct Doomed {
    dir: Arc<PoolDirs>,
    area: Area,
    name: String,
}

/// Why a pool could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
pub enum PoolOpenError {
    #[error("pool {pool} is in use: {path} is already served by another hostpath-csi process (its lock {lock} is held); refusing to start a second driver on it")]
    InUse {
        pool: String,
        path: PathBuf,
        lock: PathBuf,
    },
    #[error("pool {pool}: {source}")]
    Io {
        pool: String,
        #[source]
        source: CoreError,
    },
}

impl Pool {
    /// Opens (creating if needed) a pool. A pool that must be a mount
    /// point and is not one yet is opened as "waiting": not ready, and
    /// nothing is written into it.
    pub fn open(cfg: &PoolConfig, node_id: &str) -> Result<Pool, PoolOpenError> {
        let io = |source| PoolOpenError::Io {
            pool: cfg.name.clone(),
            source,
        };
        std::fs::create_dir_all(&cfg.path)
            .context(|| format!("cannot create {}", cfg.path.display()))
            .map_err(io)?;
        let root = cfg
            .path
            .canonicalize()
            .context(|| format!("cannot resolve {}", cfg.path.display()))
            .map_err(io)?;
        let pool = Pool {
            name: cfg.name.clone(),
            shared: cfg.shared,
            require_mount: cfg.require_mount,
            snapshot_path: cfg
                .snapshot_path
                .clone()
                .unwrap_or_else(|| root.join(PRIVATE_DIR).join(SNAPSHOT_DIR)),
            root,
            node_tag: if cfg.shared {
                let safe: String = node_id
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("-{safe}")
            } else {
                String::new()
            },
            init: Mutex::new(()),
            dirs: Mutex::new(None),
            on_ready: std::sync::OnceLock::new(),
            sync: GroupSync::default(),
            dir_sync: GroupSync::default(),
            snapshot_sync: GroupSync::default(),
            reaper: Mutex::new(None),
            unremovable: Arc::new(AtomicU64::new(0)),
        };
        match pool.initialize() {
            Ok(()) => Ok(pool),
            Err(InitError::Waiting(why)) => {
                tracing::warn!(pool = %pool.name, "{why}");
                Ok(pool)
            }
            Err(InitError::InUse { lock }) => Err(PoolOpenError::InUse {
                pool: pool.name.clone(),
                path: pool.root.clone(),
                lock,
            }),
            Err(InitError::Failed(e)) => Err(io(e)),
        }
    }

    /// Makes the pool usable: checks its mount, opens and locks the private
    /// area, moves the last run's temp area aside for background removal.
    /// Runs again when the root was replaced (a mount appeared).
    fn initialize(&self) -> Result<(), InitError> {
        let _one_at_a_time = self.init.lock().unwrap();
        if self.require_mount
            && !crate::mount::is_mount_point(&self.root).map_err(InitError::Failed)?
        {
            return Err(InitError::Waiting(format!(
                "pool {} waits for its filesystem to be mounted on {}",
                self.name,
                self.root.display()
            )));
        }
        let dirs = Arc::new(self.open_dirs()?);
        self.start_reaper(&dirs);
        *self.dirs.lock().unwrap() = Some(dirs);
        if let Some(hook) = self.on_ready.get() {
            hook(self);
        }
        tracing::info!(pool = %self.name, path = %self.root.display(), "pool ready");
        Ok(())
    }

    fn open_dirs(&self) -> Result<PoolDirs, InitError> {
        let failed =
            |what: String| move |e: Errno| InitError::Failed(CoreError::io(what, e.into()));
        // The root itself must not be a symlink (the path was resolved once,
        // at start-up; a later swap is refused here).
        let root = dirfd::open_dir_at(nix::fcntl::AT_FDCWD, &self.root)
            .map_err(failed(format!("open pool root {}", self.root.display())))?;
        let st = nix::sys::stat::fstat(&root).map_err(failed("stat pool root".into()))?;
        let private = make_dir_at(root.as_fd(), PRIVATE_DIR, 0o700).map_err(failed(format!(
            "open {}/{PRIVATE_DIR}",
            self.root.display()
        )))?;
        let lock_name = format!("{LOCK_FILE}{}", self.node_tag);
        let lock = lock_pool(private.as_fd(), &lock_name).map_err(|e| match e {
            Errno::EWOULDBLOCK => InitError::InUse {
                lock: self.root.join(PRIVATE_DIR).join(&lock_name),
            },
            e => InitError::Failed(CoreError::io("lock pool", e.into())),
        })?;
        let meta = make_dir_at(private.as_fd(), META_DIR, 0o700)
            .map_err(failed("open metadata dir".into()))?;
        let tmp_name = self.tmp_dir_name();
        trash_old_tmp(private.as_fd(), &tmp_name, &self.node_tag)
            .map_err(failed("move old temp area aside".into()))?;
        let tmp = make_dir_at(private.as_fd(), &tmp_name, 0o700)
            .map_err(failed("open temp dir".into()))?;
        let snapshots = self.open_snapshot_dir(&private).map_err(failed(format!(
            "open snapshot dir {}",
            self.snapshot_path.display()
        )))?;
        let snap_dev = nix::sys::stat::fstat(&snapshots)
            .map(|s| s.st_dev)
            .unwrap_or(0);
        let fs = crate::mount::fs_type_of(&self.root).unwrap_or_default();
        Ok(PoolDirs {
            ordered_journal: matches!(fs.as_str(), "xfs" | "ext4"),
            reflink: probe_reflink(tmp.as_fd()),
            snapshots_on_pool: snap_dev == st.st_dev,
            root,
            private,
            meta,
            tmp,
            snapshots,
            _lock: lock,
            root_id: (st.st_dev, st.st_ino),
        })
    }

    fn tmp_dir_name(&self) -> String {
        format!("{TMP_DIR}{}", self.node_tag)
    }

    fn open_snapshot_dir(&self, private: &OwnedFd) -> nix::Result<OwnedFd> {
        let inside = self.root.join(PRIVATE_DIR).join(SNAPSHOT_DIR);
        if self.snapshot_path == inside {
            return make_dir_at(private.as_fd(), SNAPSHOT_DIR, 0o700);
        }
        std::fs::create_dir_all(&self.snapshot_path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        dirfd::open_dir_at(nix::fcntl::AT_FDCWD, &self.snapshot_path)
    }

    /// One background thread per pool removes doomed entries: deletes and
    /// the previous runs' temp areas, however large or deep.
    fn start_reaper(&self, dirs: &Arc<PoolDirs>) {
        let mut slot = self.reaper.lock().unwrap();
        let sender = slot.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Doomed>();
            let (pool, unremovable) = (self.name.clone(), self.unremovable.clone());
            std::thread::Builder::new()
                .name(format!("reaper-{pool}"))
                .spawn(move || reap(&pool, rx, &unremovable))
                .expect("spawn reaper thread");
            tx
        });
        for name in trash_entries(dirs.private.as_fd(), &self.node_tag) {
            let _ = sender.send(Doomed {
                dir: dirs.clone(),
                area: Area::Private,
                name,
            });
        }
    }

    /// Removes `name` from the temp area in the background.
    pub fn discard(&self, dirs: &Arc<PoolDirs>, name: String) {
        self.send_doomed(dirs, Area::Tmp, name);
    }

    /// Removes `name` from the snapshot area in the background.
    pub fn discard_snapshot(&self, dirs: &Arc<PoolDirs>, name: String) {
        self.send_doomed(dirs, Area::Snapshots, name);
    }

    fn send_doomed(&self, dirs: &Arc<PoolDirs>, area: Area, name: String) {
        if let Some(tx) = self.reaper.lock().unwrap().as_ref() {
            let _ = tx.send(Doomed {
                dir: dirs.clone(),
                area,
                name,
            });
        }
    }

    /// Leftovers the background removal could not remove (a metric).
    pub fn unremovable_leftovers(&self) -> u64 {
        self.unremovable.load(Ordering::Relaxed)
    }

    /// Installs the recovery hook, and runs it now if the pool is ready.
    pub fn set_ready_hook(&self, hook: ReadyHook) {
        if self.on_ready.set(hook).is_ok() && self.is_initialized() {
            (self.on_ready.get().expect("just set"))(self);
        }
    }

    /// True once the pool has been initialised on its current root.
    pub fn is_initialized(&self) -> bool {
        self.dirs.lock().unwrap().is_some()
    }

    /// The descriptors of the pool, when it is ready and its root is still
    /// the directory it was opened on (a pvcTemplate pool whose mount
    /// appeared is initialised here).
    pub fn dirs(&self) -> CoreResult<Arc<PoolDirs>> {
        let current = std::fs::symlink_metadata(&self.root)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        let known = self.dirs.lock().unwrap().clone();
        match (known, current) {
            (Some(d), Some(id)) if d.root_id == id => return Ok(d),
            (_, None) => {
                return Err(self.unavailable(format!(
                    "{} is missing or is not a directory (a symlink is never followed)",
                    self.root.display()
                )))
            }
            _ => {}
        }
        match self.initialize() {
            Ok(()) => self
                .dirs
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| self.unavailable("not ready".into())),
            Err(InitError::Waiting(why)) => Err(self.unavailable(why)),
            Err(InitError::InUse { lock }) => Err(self.unavailable(format!(
                "it is served by another hostpath-csi process (lock {})",
                lock.display()
            ))),
            Err(InitError::Failed(e)) => Err(self.unavailable(e.to_string())),
        }
    }

    fn unavailable(&self, why: String) -> CoreError {
        CoreError::PoolUnavailable {
            pool: self.name.clone(),
            why,
        }
    }

    /// True when the pool is ready to serve.
    pub fn is_accessible(&self) -> bool {
        self.dirs().is_ok()
    }

    /// Path of a volume; `id` must already be validated.
    pub fn volume_path(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Path of an entry of the temp area (for tools that need a path; the
    /// private area is out of every tenant's reach).
    pub fn tmp_path(&self, name: &str) -> PathBuf {
        self.root
            .join(PRIVATE_DIR)
            .join(self.tmp_dir_name())
            .join(name)
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_path
    }

    /// Suffix of this node's names in areas a shared pool's nodes share.
    pub fn node_tag(&self) -> &str {
        &self.node_tag
    }

    /// A fresh name in the temp area, unique within this process and run.
    pub fn tmp_name(&self, id: &str, purpose: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("{id}.{purpose}.{}.{n}", std::process::id())
    }

    /// Filesystem figures from statfs.
    pub fn usage(&self) -> CoreResult<PoolUsage> {
        let st = nix::sys::statfs::statfs(&self.root)
            .context(|| format!("pool {}: statfs", self.name))?;
        let bsize = st.block_size() as u64;
        Ok(PoolUsage {
            total_bytes: st.blocks() * bsize,
            available_bytes: st.blocks_available() * bsize,
            total_inodes: st.files(),
            free_inodes: st.files_free(),
        })
    }

    /// Whether the pool or its snapshot area lives on the filesystem that
    /// holds `os_dir` (upstream's metric and meaning).
    pub fn shares_os_filesystem(&self, os_dir: &Path) -> bool {
        [&self.root, &self.snapshot_path]
            .iter()
            .any(|p| crate::mount::same_filesystem(p, os_dir))
    }

    /// The filesystem type name of the pool (`xfs`, `ext4`, `tmpfs`, ...).
    pub fn fs_type(&self) -> String {
        crate::mount::fs_type_of(&self.root).unwrap_or_else(|| "unknown".into())
    }

    /// Makes everything written to the pool so far durable. Concurrent
    /// callers share one `syncfs`, so many creates cost one flush.
    pub fn sync(&self, dirs: &PoolDirs) -> CoreResult<()> {
        self.sync
            .run(dirs.root.as_fd(), "syncfs", |fd| nix::unistd::syncfs(fd))
    }

    /// Makes name changes in the pool root durable (a journal commit, no
    /// data writeback): enough for a delete. Grouped like `sync`.
    pub fn sync_root_entries(&self, dirs: &PoolDirs) -> CoreResult<()> {
        self.dir_sync
            .run(dirs.root.as_fd(), "fsync pool root", |fd| {
                nix::unistd::fsync(fd)
            })
    }

    /// Makes everything written to the snapshot area durable: its own
    /// filesystem's sync when `snapshotPath` is elsewhere.
    pub fn sync_snapshots(&self, dirs: &PoolDirs) -> CoreResult<()> {
        if dirs.snapshots_on_pool {
            return self.sync(dirs);
        }
        self.snapshot_sync
            .run(dirs.snapshots.as_fd(), "syncfs snapshot area", |fd| {
                nix::unistd::syncfs(fd)
            })
    }
}

enum InitError {
    Waiting(String),
    InUse { lock: PathBuf },
    Failed(CoreError),
}

/// Creates (if needed) and opens the directory `name` in `dir`.
fn make_dir_at(dir: BorrowedFd, name: &str, mode: u32) -> nix::Result<OwnedFd> {
    match nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    let fd = dirfd::open_dir_at(dir, name)?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))?;
    Ok(fd)
}

fn lock_pool(private: BorrowedFd, name: &str) -> nix::Result<File> {
    let fd = nix::fcntl::openat(
        private,
        name,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let file = File::from(fd);
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(Errno::last());
    }
    Ok(file)
}

/// Renames the temp area aside in O(1), whatever it holds: start-up never
/// waits for leftovers.
fn trash_old_tmp(private: BorrowedFd, tmp: &str, node_tag: &str) -> nix::Result<()> {
    static N: AtomicU64 = AtomicU64::new(0);
    let aside = format!(
        "{TRASH_PREFIX}{node_tag}@{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        N.fetch_add(1, Ordering::Relaxed)
    );
    match nix::fcntl::renameat(private, tmp, private, aside.as_str()) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

fn trash_entries(private: BorrowedFd, node_tag: &str) -> Vec<String> {
    let prefix = format!("{TRASH_PREFIX}{node_tag}");
    dirfd::entry_names(private)
        .into_iter()
        // A shared pool's other nodes have their own trash.
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with('@'))
        })
        .collect()
}

/// Names the entries of a previous run's temp area in the log (what the
/// crash interrupted) before the area is removed.
fn log_leftovers(pool: &str, dir: BorrowedFd, name: &str) {
    let Ok(listing) = nix::dir::Dir::openat(dir, name, dirfd::DIR_FLAGS, Mode::empty()) else {
        return;
    };
    for entry in listing.into_iter().flatten().take(1000) {
        let Ok(n) = entry.file_name().to_str() else {
            continue;
        };
        if n != "." && n != ".." {
            tracing::info!(
                pool,
                leftover = n,
                "removed leftover of interrupted operation"
            );
        }
    }
}

/// Waits before the background removal tries a failed entry again (a
/// tenant's process may still be changing it); after the last, the entry
/// stays until the next start or an admin.
const RETRY_AFTER: [std::time::Duration; 3] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(10),
    std::time::Duration::from_secs(60),
];

/// Removes doomed entries one after the other, retrying failures later.
/// `unremovable` counts the entries that currently could not be removed.
fn reap(pool: &str, jobs: mpsc::Receiver<Doomed>, unremovable: &AtomicU64) {
    use std::time::Instant;
    let mut later: Vec<(Instant, Doomed, usize)> = Vec::new();
    loop {
        let now = Instant::now();
        let wait = later
            .iter()
            .map(|(due, ..)| due.saturating_duration_since(now))
            .min()
            .unwrap_or(std::time::Duration::from_secs(3600));
        let mut due: Vec<(Doomed, usize)> = Vec::new();
        match jobs.recv_timeout(wait) {
            Ok(job) => due.push((job, 0)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) if later.is_empty() => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = later.drain(..).partition(|(at, ..)| *at <= now);
        later = waiting;
        due.extend(ready.into_iter().map(|(_, job, tries)| (job, tries)));
        for (job, tries) in due {
            let removed = reap_one(pool, &job, tries == 0);
            match (removed, tries) {
                (true, 0) => {}
                (true, _) => {
                    unremovable.fetch_sub(1, Ordering::Relaxed);
                }
                (false, t) => {
                    if t == 0 {
                        unremovable.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(pause) = RETRY_AFTER.get(t) {
                        later.push((Instant::now() + *pause, job, t + 1));
                    }
                }
            }
        }
    }
}

/// One attempt at removing a doomed entry; true when it is gone.
fn reap_one(pool: &str, job: &Doomed, first: bool) -> bool {
    if job.area == Area::Private && first {
        log_leftovers(pool, job.dir.private.as_fd(), &job.name);
    }
    let (dir, area) = match job.area {
        Area::Private => (&job.dir.private, ""),
        Area::Tmp => (&job.dir.tmp, "tmp"),
        Area::Snapshots => (&job.dir.snapshots, "snapshots"),
    };
    let Ok(name) = CString::new(job.name.as_str()) else {
        return true;
    };
    let label = Path::new(PRIVATE_DIR).join(area).join(&job.name);
    match crate::tree::remove(dir.as_fd(), &name, &label) {
        Ok(()) => {
            tracing::debug!(pool, entry = %label.display(), "removed");
            true
        }
        Err(errors) => {
            for e in errors.iter().take(5) {
                tracing::warn!(pool, entry = %label.display(), error = %e, "cannot remove a leftover yet; counted in hostpath_csi_unremovable_leftovers and retried");
            }
            false
        }
    }
}

/// True when the pool's filesystem can reflink (probed with two files).
fn probe_reflink(tmp: BorrowedFd) -> bool {
    let make = |name: &str| {
        nix::fcntl::openat(
            tmp,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(File::from)
    };
    let result = (|| {
        let a = make(".reflink-probe-a").ok()?;
        std::io::Write::write_all(&mut &a, &[0u8; 4096]).ok()?;
        let b = make(".reflink-probe-b").ok()?;
        Some(crate::copy::reflink(&a, &b))
    })();
    for n in [".reflink-probe-a", ".reflink-probe-b"] {
        let _ = nix::unistd::unlinkat(tmp, n, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    result.unwrap_or(false)
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
        fd: BorrowedFd,
        what: &'static str,
        flush: impl Fn(BorrowedFd) -> nix::Result<()>,
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
