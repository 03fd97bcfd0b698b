//! Filesystem tools behind typed functions: `blkid`, `mkfs.xfs`,
//! `mkfs.ext4`, `xfs_growfs`, `e2fsck`, `resize2fs`. Always an argument
//! vector. Superblocks are read directly where a size is all we need.
//!
//! `ImageFs` is the filesystem inside a `layout: image` volume (and on a
//! pvcTemplate pool); it owns everything that differs between them.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, CoreResult};

const MIB: u64 = 1 << 20;

/// A filesystem an image volume can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFs {
    Xfs,
    Ext4,
}

/// How a grown device's filesystem catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowStrategy {
    /// Only while mounted (XFS).
    Online,
    /// Before mounting, with no capability needed; online needs
    /// CAP_SYS_RESOURCE (ext4).
    OfflineFirst,
}

impl ImageFs {
    pub const DEFAULT: ImageFs = ImageFs::Xfs;

    pub fn name(self) -> &'static str {
        match self {
            ImageFs::Xfs => "xfs",
            ImageFs::Ext4 => "ext4",
        }
    }

    /// The filesystem a mount capability's `fs_type` asks for (empty: the default).
    pub fn from_fs_type(fs_type: Option<&str>) -> CoreResult<ImageFs> {
        match fs_type.unwrap_or("") {
            "" => Ok(ImageFs::DEFAULT),
            t => ImageFs::parse(t)
                .ok_or_else(|| CoreError::invalid("fs_type", t, "image volumes hold xfs or ext4")),
        }
    }

    pub fn parse(name: &str) -> Option<ImageFs> {
        match name {
            "xfs" => Some(ImageFs::Xfs),
            "ext4" => Some(ImageFs::Ext4),
            _ => None,
        }
    }

    /// The smallest filesystem `mkfs` accepts (mkfs.xfs refuses under 300 MB).
    pub fn min_size(self) -> u64 {
        match self {
            ImageFs::Xfs => 300 * MIB,
            ImageFs::Ext4 => 16 * MIB,
        }
    }

    /// Mount data: clones of one XFS image share a UUID.
    pub fn mount_data(self) -> &'static str {
        match self {
            ImageFs::Xfs => "nouuid",
            ImageFs::Ext4 => "",
        }
    }

    pub fn grow_strategy(self) -> GrowStrategy {
        match self {
            ImageFs::Xfs => GrowStrategy::Online,
            ImageFs::Ext4 => GrowStrategy::OfflineFirst,
        }
    }

    /// Makes this filesystem on a file or device (XFS with reflink on).
    pub fn make(self, target: &Path) -> CoreResult<()> {
        let t = target.as_os_str();
        match self {
            ImageFs::Xfs => run(
                "mkfs.xfs",
                &["-q".as_ref(), "-m".as_ref(), "reflink=1".as_ref(), t],
            )?,
            ImageFs::Ext4 => run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    t,
                ],
            )?,
        };
        Ok(())
    }

    /// Size in bytes of this filesystem on `device`, from its superblock;
    /// `None` when no such superblock is there.
    pub fn size_on(self, device: &Path) -> CoreResult<Option<u64>> {
        let f = File::open(device)
            .map_err(|e| CoreError::io(format!("open {}", device.display()), e))?;
        let read = |buf: &mut [u8], at: u64| {
            f.read_exact_at(buf, at)
                .map_err(|e| CoreError::io(format!("read superblock of {}", device.display()), e))
        };
        let le32 =
            |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64;
        match self {
            ImageFs::Xfs => {
                let mut sb = [0u8; 16];
                read(&mut sb, 0)?;
                if &sb[0..4] != b"XFSB" {
                    return Ok(None);
                }
                let block = u32::from_be_bytes(sb[4..8].try_into().unwrap()) as u64;
                let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap());
                Ok(Some(block * blocks))
            }
            ImageFs::Ext4 => {
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
        }
    }

    /// Grows an unmounted filesystem to fill its device (ext4: resize2fs
    /// insists on a fresh check first).
    pub fn grow_unmounted(self, device: &Path) -> CoreResult<()> {
        if self != ImageFs::Ext4 {
            return Err(CoreError::NotPossibleHere(format!(
                "an unmounted {} filesystem cannot be grown",
                self.name()
            )));
        }
        let output = Command::new("e2fsck")
            .args(["-f", "-p"])
            .arg(device)
            .output()
            .map_err(|source| CoreError::ToolMissing {
                program: "e2fsck",
                source,
            })?;
        // 0: clean, 1: errors fixed. Anything else needs a human.
        if !matches!(output.status.code(), Some(0) | Some(1)) {
            return Err(tool_failed(
                "e2fsck",
                &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
                &output,
            ));
        }
        run("resize2fs", &[device.as_os_str()])?;
        Ok(())
    }

    /// Grows a mounted filesystem to fill its device.
    pub fn grow_mounted(self, device: &Path, mount_point: &Path) -> CoreResult<()> {
        match self {
            ImageFs::Xfs => run("xfs_growfs", &["-d".as_ref(), mount_point.as_os_str()])?,
            // The kernel refuses an online ext4 resize (EPERM) without it.
            ImageFs::Ext4 if !has_capability(CAP_SYS_RESOURCE) => {
                return Err(CoreError::NotPossibleHere(format!(
                    "growing the mounted ext4 filesystem on {} needs CAP_SYS_RESOURCE, which this driver lacks; unstage and stage the volume to grow it offline",
                    device.display()
                )))
            }
            ImageFs::Ext4 => run("resize2fs", &[device.as_os_str()])?,
        };
        Ok(())
    }
}

fn tool_failed(program: &'static str, args: &[&OsStr], output: &std::process::Output) -> CoreError {
    let text = if output.stderr.is_empty() {
        &output.stdout
    } else {
        &output.stderr
    };
    CoreError::ToolFailed {
        program,
        args: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(text).trim().to_owned(),
    }
}

fn run(program: &'static str, args: &[&OsStr]) -> CoreResult<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CoreError::ToolMissing { program, source })?;
    if !output.status.success() {
        return Err(tool_failed(program, args, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
    let args: [&OsStr; 4] = [
        "-p".as_ref(),
        "-o".as_ref(),
        "export".as_ref(),
        device.as_os_str(),
    ];
    let output = Command::new("blkid")
        .args(args)
        .output()
        .map_err(|source| CoreError::ToolMissing {
            program: "blkid",
            source,
        })?;
    // Exit code 2: nothing found.
    if output.status.code() == Some(2) {
        return Ok(Probe::Blank);
    }
    if !output.status.success() {
        return Err(tool_failed("blkid", &args, &output));
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
