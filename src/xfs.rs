//! External filesystem tools behind typed functions: `blkid`, `mkfs.xfs`,
//! `mkfs.ext4`, `xfs_growfs`, `resize2fs`. Always an argument vector.

use std::path::Path;
use std::process::Command;

use crate::error::{CoreError, CoreResult};

const MIB: u64 = 1 << 20;

/// Filesystems an image volume may hold.
pub const IMAGE_FILESYSTEMS: &[&str] = &["xfs", "ext4"];

/// The smallest filesystem `mkfs` accepts (mkfs.xfs refuses under 300 MB).
pub fn min_filesystem_size(fs_type: &str) -> u64 {
    match fs_type {
        "xfs" => 300 * MIB,
        _ => 16 * MIB,
    }
}

/// Checks the `fs_type` of a mount capability for an image volume.
pub fn check_fs_type(fs_type: Option<&str>) -> CoreResult<String> {
    match fs_type.unwrap_or("") {
        "" => Ok("xfs".into()),
        t if IMAGE_FILESYSTEMS.contains(&t) => Ok(t.to_owned()),
        t => Err(CoreError::InvalidArgument(format!(
            "fs_type {t:?} is not supported for image volumes (use xfs or ext4)"
        ))),
    }
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> CoreResult<String> {
    let output = Command::new(program).args(args).output().map_err(|e| {
        CoreError::FailedPrecondition(format!(
            "cannot run {program}: {e} (is it installed on the node?)"
        ))
    })?;
    if !output.status.success() {
        return Err(CoreError::Internal(format!(
            "{program} {} failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Makes a filesystem on a file or device (XFS with reflink on).
pub fn make_filesystem(target: &Path, fs_type: &str) -> CoreResult<()> {
    let t = target.as_os_str();
    match fs_type {
        "xfs" => run(
            "mkfs.xfs",
            &["-q".as_ref(), "-m".as_ref(), "reflink=1".as_ref(), t],
        )?,
        "ext4" => run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                t,
            ],
        )?,
        other => {
            return Err(CoreError::InvalidArgument(format!(
                "cannot make a {other} filesystem"
            )))
        }
    };
    Ok(())
}

/// What `blkid` finds on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// A partition table (never formatted over).
    PartitionTable(String),
    /// Some other signature (RAID member, LVM, ...).
    Other(String),
}

/// Probes a device with `blkid -p` (low-level, no cache).
pub fn probe(device: &Path) -> CoreResult<Probe> {
    let output = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .map_err(|e| CoreError::FailedPrecondition(format!("cannot run blkid: {e}")))?;
    // Exit code 2: nothing found.
    if output.status.code() == Some(2) {
        return Ok(Probe::Blank);
    }
    if !output.status.success() {
        return Err(CoreError::Internal(format!(
            "blkid -p {} failed: {}",
            device.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    if let Some(pt) = field("PTTYPE") {
        return Ok(Probe::PartitionTable(pt));
    }
    match (field("TYPE"), field("USAGE")) {
        (Some(t), Some(u)) if u == "filesystem" => Ok(Probe::Filesystem(t)),
        (Some(t), _) => Ok(Probe::Other(t)),
        (None, _) => Ok(Probe::Blank),
    }
}

/// Grows a mounted filesystem to fill its device.
pub fn grow_filesystem(fs_type: &str, device: &Path, mount_point: &Path) -> CoreResult<()> {
    match fs_type {
        "xfs" => run("xfs_growfs", &["-d".as_ref(), mount_point.as_os_str()])?,
        "ext4" | "ext3" | "ext2" => run("resize2fs", &[device.as_os_str()])?,
        other => {
            return Err(CoreError::FailedPrecondition(format!(
                "cannot grow a {other} filesystem"
            )))
        }
    };
    Ok(())
}
