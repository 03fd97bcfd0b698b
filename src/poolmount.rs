//! The pvcTemplate pool mounter: `hostpath-csi pool mount|unmount`.
//!
//! A mounter pod gets one PV per node (a block device or a directory) and
//! puts it on `<pool.path>/csi`, where the driver finds its pool. Everything
//! is read back from the kernel (mountinfo, blkid, sysfs), so running it
//! again is a no-op and a restarted pod picks up where the last one was.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;

use crate::block;
use crate::error::{CoreError, IoContext};
use crate::fstools::{self, ImageFs, Probe};
use crate::mount::{self, MountInfo};

/// Filesystem made on a blank device (with reflink on, see `xfs`).
pub const POOL_FILESYSTEM: ImageFs = ImageFs::Xfs;

/// What to mount where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// Block device or directory, as this process sees it (e.g. `/dev/data`
    /// or `/source` inside the mounter pod).
    pub source: PathBuf,
    /// Pool directory on the host, e.g. `/var/myvolumes/csi`.
    pub target: PathBuf,
    /// Where the host's root is visible (e.g. `/host`); `target` lies under it.
    pub host_root: Option<PathBuf>,
}

/// What `ensure_mounted` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// The source was already mounted on the target; nothing changed.
    AlreadyMounted,
    /// A directory source was bind-mounted.
    BindMounted,
    /// A block device was mounted (and formatted first when it was blank).
    Mounted {
        fs_type: String,
        formatted: bool,
        project_quota: bool,
    },
}

impl std::fmt::Display for MountOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountOutcome::AlreadyMounted => f.write_str("already mounted"),
            MountOutcome::BindMounted => f.write_str("bind mounted"),
            MountOutcome::Mounted {
                fs_type,
                formatted,
                project_quota,
            } => write!(
                f,
                "mounted {fs_type}{}{}",
                if *formatted { ", newly formatted" } else { "" },
                if *project_quota {
                    ", prjquota"
                } else {
                    ", without prjquota"
                }
            ),
        }
    }
}

/// What `unmount_pool` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnmountOutcome {
    NotMounted,
    Unmounted,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolMountError {
    #[error("--source {}: {reason}", path.display())]
    BadSource { path: PathBuf, reason: String },
    #[error("--target {}: {reason}", path.display())]
    BadTarget { path: PathBuf, reason: String },
    #[error("{} still holds published volumes; unpublish them first: {}", target.display(), users.join("; "))]
    InUse { target: PathBuf, users: Vec<String> },
    #[error(transparent)]
    Core(#[from] CoreError),
}

type Result<T> = std::result::Result<T, PoolMountError>;

fn bad_target(path: &Path, reason: impl Into<String>) -> PoolMountError {
    PoolMountError::BadTarget {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn bad_source(path: &Path, reason: impl Into<String>) -> PoolMountError {
    PoolMountError::BadSource {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// `target` as this process reaches it: below `host_root` when one is given.
pub fn resolve_target(target: &Path, host_root: Option<&Path>) -> Result<PathBuf> {
    if !target.is_absolute() {
        return Err(bad_target(target, "must be an absolute path"));
    }
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(bad_target(target, "must not contain '..'"));
    }
    let relative = target.strip_prefix("/").unwrap_or(target);
    if relative.as_os_str().is_empty() {
        return Err(bad_target(target, "must not be the root directory"));
    }
    Ok(match host_root {
        Some(root) => root.join(relative),
        None => target.to_owned(),
    })
}

enum Source {
    Block { rdev: u64 },
    Directory { dev: u64, ino: u64 },
}

fn inspect_source(path: &Path) -> Result<Source> {
    let st = match fs::metadata(path) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad_source(path, "does not exist"))
        }
        Err(e) => return Err(CoreError::io(format!("stat {}", path.display()), e).into()),
    };
    if st.file_type().is_block_device() {
        Ok(Source::Block { rdev: st.rdev() })
    } else if st.is_dir() {
        Ok(Source::Directory {
            dev: st.dev(),
            ino: st.ino(),
        })
    } else {
        Err(bad_source(
            path,
            "is neither a block device nor a directory (a Block PVC is a device, a Filesystem PVC a directory)",
        ))
    }
}

fn same_dev(m: &MountInfo, rdev: u64) -> bool {
    u64::from(m.major) == nix::sys::stat::major(rdev)
        && u64::from(m.minor) == nix::sys::stat::minor(rdev)
}

/// Does the mount on `target` come from `source`?
fn mounted_from(source: &Source, target: &Path, m: &MountInfo) -> Result<bool> {
    Ok(match source {
        Source::Block { rdev } => same_dev(m, *rdev),
        Source::Directory { dev, ino } => {
            let st = fs::metadata(target).context(|| format!("stat {}", target.display()))?;
            st.dev() == *dev && st.ino() == *ino
        }
    })
}

/// Mounts `req.source` on `req.target` unless it is already there.
pub fn ensure_mounted(req: &MountRequest) -> Result<MountOutcome> {
    let target = resolve_target(&req.target, req.host_root.as_deref())?;
    let source = inspect_source(&req.source)?;
    if let Source::Directory { .. } = source {
        if req.source == target || target.starts_with(&req.source) {
            return Err(bad_source(
                &req.source,
                format!("contains the target {}", target.display()),
            ));
        }
    }
    match fs::symlink_metadata(&target) {
        Ok(st) if st.is_dir() => {}
        Ok(_) => return Err(bad_target(&req.target, "exists and is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(&target).context(|| format!("create {}", target.display()))?
        }
        Err(e) => return Err(CoreError::io(format!("stat {}", target.display()), e).into()),
    }
    if let Some(existing) = mount::mount_at(&target)? {
        if mounted_from(&source, &target, &existing)? {
            return Ok(MountOutcome::AlreadyMounted);
        }
        return Err(bad_target(
            &req.target,
            format!(
                "already has {} ({}) mounted on it; refusing to stack another mount",
                existing.source, existing.fs_type
            ),
        ));
    }
    match source {
        Source::Directory { .. } => {
            mount::bind_mount(&req.source, &target, MsFlags::empty())?;
            Ok(MountOutcome::BindMounted)
        }
        Source::Block { .. } => mount_block(&req.source, &target),
    }
}

fn mount_block(device: &Path, target: &Path) -> Result<MountOutcome> {
    let (fs_type, formatted) = match fstools::probe(device)? {
        Probe::Blank => {
            tracing::info!(device = %device.display(), "blank device: making an XFS filesystem");
            POOL_FILESYSTEM.make(device)?;
            (POOL_FILESYSTEM.name().to_owned(), true)
        }
        Probe::Filesystem(t) => (t, false),
        Probe::PartitionTable(pt) => {
            return Err(bad_source(
                device,
                format!(
                    "has a {pt} partition table; refusing to format or mount it (give a partition, or wipe the device)"
                ),
            ))
        }
        Probe::Other(t) => {
            return Err(bad_source(
                device,
                format!("holds a {t} signature, not a filesystem; refusing to touch it"),
            ))
        }
    };
    let project_quota = if ImageFs::parse(&fs_type) == Some(ImageFs::Xfs) {
        match mount::mount_device(device, target, &fs_type, MsFlags::empty(), "prjquota") {
            Ok(()) => true,
            // A kernel without quota support refuses the option with EINVAL.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                tracing::warn!(
                    device = %device.display(),
                    "the kernel refused prjquota ({e}); mounting without project quotas, so directory volumes are not size-limited"
                );
                mount::mount_device(device, target, &fs_type, MsFlags::empty(), "")?;
                false
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        mount::mount_device(device, target, &fs_type, MsFlags::empty(), "")?;
        false
    };
    Ok(MountOutcome::Mounted {
        fs_type,
        formatted,
        project_quota,
    })
}

/// Who still uses the pool mounted at `target`: bind mounts of something
/// inside it, mounts below it, and loop devices backed by files in it.
pub fn pool_users(target: &Path, logical_target: &Path) -> Result<Vec<String>> {
    let all = mount::mounts()?;
    let Some(pool) = all.iter().rev().find(|m| m.mount_point == target) else {
        return Ok(Vec::new());
    };
    let mut users = Vec::new();
    for m in &all {
        if m.id == pool.id {
            continue;
        }
        let same_fs = m.major == pool.major && m.minor == pool.minor;
        if same_fs && m.root != pool.root && m.root.starts_with(&pool.root) {
            users.push(format!(
                "{} is bind-mounted on {}",
                m.root.display(),
                m.mount_point.display()
            ));
        } else if m.mount_point != target && m.mount_point.starts_with(target) {
            users.push(format!(
                "{} is mounted on {}",
                m.source,
                m.mount_point.display()
            ));
        }
    }
    for dev in block::list_attached() {
        let of_pool =
            dev.backing_file.starts_with(target) || dev.backing_file.starts_with(logical_target);
        // A detach already requested finishes once a brief opener (udev,
        // a scan) closes the device; only a device that stays is a user.
        let detaching = of_pool
            && dev.autoclear
            && !block::is_in_use(&dev).unwrap_or(true)
            && block::wait_detached(&dev, Duration::from_secs(5));
        if of_pool && !detaching {
            users.push(format!(
                "{} is backed by {}",
                dev.path.display(),
                dev.backing_file.display()
            ));
        }
    }
    Ok(users)
}

/// Unmounts the pool on `target`, refusing while volumes of it are published.
pub fn unmount_pool(target: &Path, host_root: Option<&Path>) -> Result<UnmountOutcome> {
    let resolved = resolve_target(target, host_root)?;
    if mount::mount_at(&resolved)?.is_none() {
        return Ok(UnmountOutcome::NotMounted);
    }
    let users = pool_users(&resolved, target)?;
    if !users.is_empty() {
        return Err(PoolMountError::InUse {
            target: target.to_owned(),
            users,
        });
    }
    mount::unmount_all(&resolved)?;
    Ok(UnmountOutcome::Unmounted)
}

/// Keeps the pool mounted: checks every `interval` until SIGTERM or SIGINT.
/// A wrong source ends the loop with an error, so the pod shows it.
pub async fn watch(req: MountRequest, interval: Duration) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| CoreError::io("install SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| CoreError::io("install SIGINT handler", e))?;
    let mut first = true;
    loop {
        let r = req.clone();
        let outcome = tokio::task::spawn_blocking(move || ensure_mounted(&r))
            .await
            .map_err(|e| CoreError::Internal(format!("mount check panicked: {e}")))??;
        match (&outcome, first) {
            (MountOutcome::AlreadyMounted, false) => {}
            (_, true) => report(&req, &outcome),
            (_, false) => {
                tracing::warn!(target = %req.target.display(), "the pool mount was gone; {outcome}");
                report(&req, &outcome);
            }
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

/// One status line on stdout, for people and scripts.
pub fn report(req: &MountRequest, outcome: &MountOutcome) {
    println!(
        "{} on {}: {outcome}",
        req.source.display(),
        req.target.display()
    );
}

/// `hostpath-csi pool …`
#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    #[command(subcommand)]
    pub command: PoolCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum PoolCommand {
    /// Mount a pvcTemplate PV (block device or directory) on the pool path.
    Mount(MountArgs),
    /// Undo `pool mount`; refused while volumes of the pool are published.
    Unmount(UnmountArgs),
}

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Block device (formatted XFS when blank) or directory (bind-mounted).
    #[arg(long)]
    pub source: PathBuf,
    /// Pool directory on the host, normally `<pool.path>/csi`.
    #[arg(long)]
    pub target: PathBuf,
    /// Where the host's root is mounted in this container, e.g. /host.
    #[arg(long)]
    pub host_root: Option<PathBuf>,
    /// Keep running and re-check the mount every --interval-secs.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between checks with --watch.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval_secs: u64,
}

#[derive(clap::Args, Debug)]
pub struct UnmountArgs {
    /// Pool directory on the host, as given to `pool mount`.
    #[arg(long)]
    pub target: PathBuf,
    /// Where the host's root is mounted in this container, e.g. /host.
    #[arg(long)]
    pub host_root: Option<PathBuf>,
}

/// Runs a `pool` subcommand.
pub async fn run(args: PoolArgs) -> std::result::Result<(), String> {
    match args.command {
        PoolCommand::Mount(a) => {
            let req = MountRequest {
                source: a.source,
                target: a.target,
                host_root: a.host_root,
            };
            if a.watch {
                watch(req, Duration::from_secs(a.interval_secs))
                    .await
                    .map_err(|e| e.to_string())
            } else {
                let r = req.clone();
                let outcome = tokio::task::spawn_blocking(move || ensure_mounted(&r))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                report(&req, &outcome);
                Ok(())
            }
        }
        PoolCommand::Unmount(a) => {
            let outcome = tokio::task::spawn_blocking(move || {
                unmount_pool(&a.target, a.host_root.as_deref()).map(|o| (a.target, o))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            match outcome {
                (t, UnmountOutcome::NotMounted) => println!("{}: not mounted", t.display()),
                (t, UnmountOutcome::Unmounted) => println!("{}: unmounted", t.display()),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_under_the_host_root() {
        assert_eq!(
            resolve_target(Path::new("/var/pool/csi"), Some(Path::new("/host"))).unwrap(),
            PathBuf::from("/host/var/pool/csi")
        );
        assert_eq!(
            resolve_target(Path::new("/var/pool/csi"), None).unwrap(),
            PathBuf::from("/var/pool/csi")
        );
        for bad in ["relative", "/", "/a/../b"] {
            assert!(
                resolve_target(Path::new(bad), Some(Path::new("/host"))).is_err(),
                "{bad}"
            );
        }
    }
}
