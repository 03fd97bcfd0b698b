//! `hostpath-csi rollback-check`: reads a node's pools, never writes, and
//! lists what the Go driver could not serve if this driver were replaced by
//! it again: Block volumes (it has no Block mode), `layout: image` volumes
//! (it would bind-mount a file as a directory), and snapshots in this
//! driver's layout (it can neither list, restore nor delete them; in a
//! shared `snapshotPath` they even break its ListSnapshots). The private area
//! `.hostpath-csi` is reported too: the Go driver lists it as a volume.
//!
//! It reads `<pool>/.hostpath-csi/volumes/<id>.json` and the snapshot
//! directories directly, so it runs beside a stopped driver, or a running
//! one, without opening (and so locking or sweeping) the pools.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::config::PoolConfig;

/// How bad a finding is for a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The Go driver cannot serve it: pods using it fail after a rollback.
    Breaks,
    /// Worth knowing; nothing stops working.
    Notice,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub pool: String,
    /// Volume or snapshot ID, or the path for other findings.
    pub object: String,
    pub what: String,
}

/// Why a pool could not be checked at all.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool}: cannot read {path}: {source}")]
pub struct CheckError {
    pub pool: String,
    pub path: PathBuf,
    pub source: std::io::Error,
}

const PRIVATE_DIR: &str = crate::pool::PRIVATE_DIR;

/// Entries of `dir`, or none when it does not exist.
fn entries(pool: &str, dir: &Path) -> Result<Vec<std::fs::DirEntry>, CheckError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<Vec<_>, _>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
    .map_err(|source| CheckError {
        pool: pool.into(),
        path: dir.to_owned(),
        source,
    })
}

fn finding(severity: Severity, pool: &str, object: &str, what: impl Into<String>) -> Finding {
    Finding {
        severity,
        pool: pool.into(),
        object: object.into(),
        what: what.into(),
    }
}

/// One volume's metadata file, read loosely (fields may grow).
fn check_volume_meta(pool: &str, file: &Path, out: &mut Vec<Finding>) {
    let id = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta: Option<Value> = std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(meta) = meta else {
        out.push(finding(
            Severity::Notice,
            pool,
            &id,
            format!(
                "metadata {} is unreadable; check the volume by hand",
                file.display()
            ),
        ));
        return;
    };
    let field = |k: &str| meta[k].as_str().unwrap_or_default().to_owned();
    match (field("mode").as_str(), field("layout").as_str()) {
        ("block", _) | (_, "file") => out.push(finding(
            Severity::Breaks,
            pool,
            &id,
            "Block volume: the Go driver has no Block mode, so no pod can use it after a rollback",
        )),
        (_, "image") => out.push(finding(
            Severity::Breaks,
            pool,
            &id,
            "layout: image volume (a filesystem in a file): the Go driver would bind-mount the file as a directory",
        )),
        _ => {}
    }
    if meta["ephemeral"].as_bool() == Some(true) {
        out.push(finding(
            Severity::Notice,
            pool,
            &id,
            "inline ephemeral volume of a running pod: the Go driver removes it only if its ID starts with csi-",
        ));
    }
}

/// Snapshots in `dir`: this driver's layout (`<id>/meta.json`) breaks;
/// the Go driver's own (`<id>/data` beside `<id>/<source volume>/`) is fine.
fn check_snapshots(
    pool: &str,
    dir: &Path,
    in_pool_snapshot_path: bool,
    out: &mut Vec<Finding>,
) -> Result<(), CheckError> {
    for entry in entries(pool, dir)? {
        let path = entry.path();
        let id = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || id.starts_with('.') {
            continue;
        }
        if path.join("meta.json").is_file() {
            let why = if in_pool_snapshot_path {
                "snapshot in hostpath-csi's layout inside the Go driver's snapshotPath: the Go driver cannot restore or delete it, and its ListSnapshots fails on it"
            } else {
                "snapshot in hostpath-csi's private area: the Go driver cannot see, restore or delete it"
            };
            out.push(finding(Severity::Breaks, pool, &id, why));
        }
    }
    Ok(())
}

/// Checks one pool; the findings are appended to `out`.
pub fn check_pool(cfg: &PoolConfig, out: &mut Vec<Finding>) -> Result<(), CheckError> {
    let pool = cfg.name.as_str();
    if !cfg.path.is_dir() {
        out.push(finding(
            Severity::Notice,
            pool,
            &cfg.path.display().to_string(),
            "pool directory is missing (or not mounted): nothing to check",
        ));
        return Ok(());
    }
    let private = cfg.path.join(PRIVATE_DIR);
    let mut metas: Vec<_> = entries(pool, &private.join("volumes"))?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    metas.sort();
    let described: Vec<String> = metas
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    for file in &metas {
        check_volume_meta(pool, file, out);
    }
    // A file in the pool without metadata: a Block or image volume all the same.
    let mut bare: Vec<String> = entries(pool, &cfg.path)?
        .into_iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !described.contains(n))
        .collect();
    bare.sort();
    for name in bare {
        out.push(finding(
            Severity::Breaks,
            pool,
            &name,
            "a file in the pool (a Block or image volume): the Go driver only serves directories",
        ));
    }
    let own = private.join("snapshots");
    check_snapshots(pool, &own, false, out)?;
    if let Some(path) = cfg.snapshot_path.as_deref().filter(|p| *p != own) {
        check_snapshots(pool, path, true, out)?;
    }
    if private.is_dir() {
        out.push(finding(
            Severity::Notice,
            pool,
            &private.display().to_string(),
            "hostpath-csi's private area: the Go driver lists it as a volume; delete it after the rollback once nothing above is needed",
        ));
    }
    Ok(())
}

/// Checks every pool, in order.
pub fn check(pools: &[PoolConfig]) -> Result<Vec<Finding>, CheckError> {
    let mut out = Vec::new();
    for p in pools {
        check_pool(p, &mut out)?;
    }
    Ok(out)
}

/// The report as text: one line per finding and a verdict.
pub fn report(findings: &[Finding]) -> String {
    let mut text = String::new();
    for f in findings {
        let tag = match f.severity {
            Severity::Breaks => "BREAKS",
            Severity::Notice => "notice",
        };
        text.push_str(&format!(
            "{tag}  pool {}  {}: {}\n",
            f.pool, f.object, f.what
        ));
    }
    let breaks = findings
        .iter()
        .filter(|f| f.severity == Severity::Breaks)
        .count();
    if breaks == 0 {
        text.push_str("rollback-check: nothing would break on a rollback to the Go driver\n");
    } else {
        text.push_str(&format!(
            "rollback-check: {breaks} volume(s) or snapshot(s) would break on a rollback to the Go driver; move or delete them first (deploy/MIGRATION.md)\n"
        ));
    }
    text
}

/// `hostpath-csi rollback-check`
#[derive(clap::Args, Debug)]
pub struct RollbackCheckArgs {
    /// Pools as the driver's --datadir (relative paths from `/`).
    #[arg(long, conflicts_with = "config")]
    pub datadir: Option<String>,
    /// A HostPathProvisioner CR (YAML) naming the pools.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the findings as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
