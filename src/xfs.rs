//! External filesystem tools behind typed functions: `blkid`, `mkfs.xfs`,
//! `mkfs.ext4`, `xfs_growfs`, `e2fsck`, `resize2fs`. Always an argument
//! vector. Superblocks are read directly where a size is all we need.

use std::fs::File;
use std::os::unix::fs::FileExt;
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

/// Size in bytes of the filesystem on `device`, from its superblock; `None`
/// when no superblock of `fs_type` is there.
pub fn filesystem_size(device: &Path, fs_type: &str) -> CoreResult<Option<u64>> {
    let f =
        File::open(device).map_err(|e| CoreError::io(format!("open {}", device.display()), e))?;
    let read = |buf: &mut [u8], at: u64| {
        f.read_exact_at(buf, at)
            .map_err(|e| CoreError::io(format!("read superblock of {}", device.display()), e))
    };
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64;
    match fs_type {
        "xfs" => {
            let mut sb = [0u8; 16];
            read(&mut sb, 0)?;
            if &sb[0..4] != b"XFSB" {
                return Ok(None);
            }
            let block = u32::from_be_bytes(sb[4..8].try_into().unwrap()) as u64;
            let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap());
            Ok(Some(block * blocks))
        }
        "ext4" | "ext3" | "ext2" => {
            let mut sb = [0u8; 0x158];
            read(&mut sb, 1024)?;
            if sb[0x38..0x3A] != [0x53, 0xEF] {
                return Ok(None);
            }
            let block = 1024u64 << le32(&sb, 0x18);
            let hi = if le32(&sb, 0x60) & 0x80 != 0 {
                le32(&sb, 0x150)
            } else {
                0
            };
            Ok(Some(block * (hi << 32 | le32(&sb, 0x04))))
        }
        _ => Ok(None),
    }
}

/// True when this process has the capability numbered `bit` in effect.
fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps >> bit & 1 == 1)
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Grows an unmounted ext2/3/4 filesystem to fill its device. resize2fs
/// insists on a fresh check first.
pub fn grow_unmounted(fs_type: &str, device: &Path) -> CoreResult<()> {
    if !matches!(fs_type, "ext4" | "ext3" | "ext2") {
        return Err(CoreError::FailedPrecondition(format!(
            "cannot grow an unmounted {fs_type} filesystem"
        )));
    }
    let output = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .output()
        .map_err(|e| CoreError::FailedPrecondition(format!("cannot run e2fsck: {e}")))?;
    // 0: clean, 1: errors fixed. Anything else needs a human.
    if !matches!(output.status.code(), Some(0) | Some(1)) {
        return Err(CoreError::Internal(format!(
            "e2fsck -f -p {} failed ({}): {}",
            device.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim()
        )));
    }
    run("resize2fs", &[device.as_os_str()])?;
    Ok(())
}

/// Grows a mounted filesystem to fill its device.
pub fn grow_filesystem(fs_type: &str, device: &Path, mount_point: &Path) -> CoreResult<()> {
    match fs_type {
        "xfs" => run("xfs_growfs", &["-d".as_ref(), mount_point.as_os_str()])?,
        // The kernel refuses an online ext4 resize (EPERM) without it.
        "ext4" | "ext3" | "ext2" if !has_capability(CAP_SYS_RESOURCE) => {
            return Err(CoreError::FailedPrecondition(format!(
                "growing the mounted {fs_type} filesystem on {} needs CAP_SYS_RESOURCE, which this driver lacks; unstage and stage the volume to grow it offline",
                device.display()
            )))
        }
        "ext4" | "ext3" | "ext2" => run("resize2fs", &[device.as_os_str()])?,
        other => {
            return Err(CoreError::FailedPrecondition(format!(
                "cannot grow a {other} filesystem"
            )))
        }
    };
    Ok(())
}
