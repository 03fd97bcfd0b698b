//! Driver configuration: upstream's `--datadir` JSON and the
//! HostPathProvisioner custom resource.

pub mod cr;

use std::path::PathBuf;

use serde::Deserialize;

pub use cr::HostPathProvisioner;

/// Longest pool name (it is used in object names and StorageClass parameters).
pub const MAX_POOL_NAME_LEN: usize = 50;
/// Longest pool path in a HostPathProvisioner CR (upstream's webhook).
pub const MAX_POOL_PATH_LEN: usize = 255;
/// Longest pool path the driver serves: a CR path plus the `/csi` it is
/// given, and room below it for the private area and volume names within
/// PATH_MAX.
pub const MAX_SERVED_POOL_PATH_LEN: usize = 1024;

/// One storage pool as the driver serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    /// Directory that holds the pool's volumes.
    pub path: PathBuf,
    /// Storage that every node sees (e.g. an RWX pvcTemplate): no topology.
    pub shared: bool,
    /// Where snapshots go, when not under the pool's private area.
    pub snapshot_path: Option<PathBuf>,
    /// The pool is a filesystem mounted on `path` by the pvcTemplate
    /// mounter: nothing is written there until that mount exists.
    pub require_mount: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// One entry of upstream's `--datadir` JSON array; unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DataDirEntry {
    name: String,
    path: String,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    snapshot_path: Option<String>,
    /// Upstream's operator names one whenever it passes a `snapshotPath`
    /// (`<path>/snapshots`); given alone, that is where the snapshots are.
    #[serde(default)]
    snapshot_provider: Option<String>,
    #[serde(default)]
    require_mount: bool,
}

/// The snapshot directory upstream's operator gives a pool with a
/// `snapshotProvider`: `<pool path>/snapshots`.
pub const GO_SNAPSHOT_DIR: &str = "snapshots";

/// Where the Go driver finds a relative `--datadir` path: it hands the path
/// to the OS as is, so it is relative to its working directory, which is `/`
/// in its image; upstream's operator passes `<pool>-data-dir/csi` and mounts
/// the pool at `/<pool>-data-dir`. Resolved against `/` here, whatever the
/// working directory.
pub const RELATIVE_PATH_BASE: &str = "/";

fn resolve_datadir_path(field: &str, path: String) -> String {
    if path.is_empty() || path.starts_with('/') {
        return path;
    }
    let resolved = format!("{RELATIVE_PATH_BASE}{path}");
    tracing::info!(
        field,
        path,
        resolved,
        "relative pool path resolved against /, as the Go driver's image does"
    );
    resolved
}

/// Parses `--datadir`. The first entry is the default pool; relative paths
/// are resolved against `/` (see [`RELATIVE_PATH_BASE`]).
pub fn parse_datadir(json: &str) -> Result<Vec<PoolConfig>, ConfigError> {
    let entries: Vec<DataDirEntry> = serde_json::from_str(json)
        .map_err(|e| ConfigError::new("--datadir", format!("not a JSON array of pools: {e}")))?;
    if entries.is_empty() {
        return Err(ConfigError::new("--datadir", "names no pool"));
    }
    let pools = entries
        .into_iter()
        .map(|e| {
            let path = PathBuf::from(resolve_datadir_path("path", e.path));
            let snapshot_path = match e.snapshot_path.filter(|p| !p.is_empty()) {
                Some(p) => Some(PathBuf::from(resolve_datadir_path("snapshotPath", p))),
                None => e
                    .snapshot_provider
                    .filter(|p| !p.is_empty())
                    .map(|_| path.join(GO_SNAPSHOT_DIR)),
            };
            PoolConfig {
                path,
                shared: e.shared,
                snapshot_path,
                require_mount: e.require_mount,
                name: e.name,
            }
        })
        .collect::<Vec<_>>();
    validate_pools(&pools, |i| format!("--datadir[{i}]"))?;
    Ok(pools)
}

/// Checks names and paths of a pool list; `at` names entry `i` for errors.
pub fn validate_pools(
    pools: &[PoolConfig],
    at: impl Fn(usize) -> String,
) -> Result<(), ConfigError> {
    for (i, pool) in pools.iter().enumerate() {
        validate_pool_name(&pool.name)
            .map_err(|m| ConfigError::new(format!("{}.name", at(i)), m.to_string()))?;
        validate_pool_path(&pool.path.to_string_lossy(), MAX_SERVED_POOL_PATH_LEN)
            .map_err(|m| ConfigError::new(format!("{}.path", at(i)), m.to_string()))?;
        if let Some(j) = pools[..i].iter().position(|p| p.name == pool.name) {
            return Err(ConfigError::new(
                format!("{}.name", at(i)),
                format!("duplicate pool name {:?} (also {}.name)", pool.name, at(j)),
            ));
        }
        if let Some(j) = pools[..i].iter().position(|p| p.path == pool.path) {
            return Err(ConfigError::new(
                format!("{}.path", at(i)),
                format!("duplicate pool path {:?} (also {}.path)", pool.path, at(j)),
            ));
        }
    }
    Ok(())
}

/// What is wrong with a pool's name or path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("must not be empty")]
    Empty,
    #[error("{0} characters is longer than {1}")]
    TooLong(usize, usize),
    #[error("{0:?} may only hold ASCII letters, digits, '-', '_' and '.'")]
    BadCharacters(String),
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("must not be the root directory")]
    Root,
    #[error("contains a NUL byte")]
    Nul,
    #[error("{0:?} must not contain '..'")]
    DotDot(String),
}

/// A pool name must be usable as a StorageClass parameter and in object names.
pub fn validate_pool_name(name: &str) -> Result<(), FieldProblem> {
    if name.is_empty() {
        return Err(FieldProblem::Empty);
    }
    if name.len() > MAX_POOL_NAME_LEN {
        return Err(FieldProblem::TooLong(name.len(), MAX_POOL_NAME_LEN));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(FieldProblem::BadCharacters(name.to_owned()));
    }
    Ok(())
}

/// A pool path must be absolute, not `/`, and at most `max` characters.
pub fn validate_pool_path(path: &str, max: usize) -> Result<(), FieldProblem> {
    if path.is_empty() {
        return Err(FieldProblem::Empty);
    }
    if path.len() > max {
        return Err(FieldProblem::TooLong(path.len(), max));
    }
    if !path.starts_with('/') {
        return Err(FieldProblem::NotAbsolute(path.to_owned()));
    }
    if path.trim_end_matches('/').is_empty() {
        return Err(FieldProblem::Root);
    }
    if path.contains('\0') {
        return Err(FieldProblem::Nul);
    }
    if path.split('/').any(|c| c == "..") {
        return Err(FieldProblem::DotDot(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datadir_upstream_form_parses_and_ignores_unknown_fields() {
        let pools = parse_datadir(
            r#"[{"name":"local","path":"/local-data-dir/csi","shared":false,
                 "snapshotPath":"/snap","snapshotProvider":"reflink","future":1},
                {"name":"b","path":"/b"}]"#,
        )
        .unwrap();
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[0].name, "local");
        assert_eq!(
            pools[0].snapshot_path.as_deref(),
            Some(std::path::Path::new("/snap"))
        );
        assert!(!pools[1].shared);
    }

    #[test]
    fn the_longest_cr_path_with_its_csi_directory_is_served() {
        // A CR path of 255 characters (upstream's limit) becomes <path>/csi.
        let path = format!("/{}/csi", "p".repeat(254));
        let json = serde_json::json!([{"name": "local", "path": path}]).to_string();
        assert!(parse_datadir(&json).is_ok());
        let too_long = format!("/{}", "p".repeat(MAX_SERVED_POOL_PATH_LEN));
        let json = serde_json::json!([{"name": "local", "path": too_long}]).to_string();
        assert!(parse_datadir(&json).is_err());
    }

    #[test]
    fn a_snapshot_provider_alone_finds_the_go_drivers_snapshot_directory() {
        let pools = parse_datadir(
            r#"[{"name":"local","path":"/p/csi","snapshotProvider":"reflink"},
                {"name":"b","path":"/b"}]"#,
        )
        .unwrap();
        assert_eq!(
            pools[0].snapshot_path.as_deref(),
            Some(std::path::Path::new("/p/csi/snapshots"))
        );
        assert_eq!(pools[1].snapshot_path, None);
    }

    #[test]
    fn relative_paths_resolve_against_root_as_upstream_passes_them() {
        // PV_DIR as upstream's operator builds it (daemonset.go).
        let pools = parse_datadir(
            r#"[{"name":"local","path":"local-data-dir/csi","snapshotPath":"local-data-dir/csi/snapshots","snapshotProvider":"reflink","shared":false}]"#,
        )
        .unwrap();
        assert_eq!(pools[0].path, std::path::Path::new("/local-data-dir/csi"));
        assert_eq!(
            pools[0].snapshot_path.as_deref(),
            Some(std::path::Path::new("/local-data-dir/csi/snapshots"))
        );
    }

    #[test]
    fn datadir_errors_name_the_entry() {
        let e =
            parse_datadir(r#"[{"name":"a","path":"/a"},{"name":"a","path":"/b"}]"#).unwrap_err();
        assert_eq!(e.field, "--datadir[1].name");
        let e = parse_datadir(r#"[{"name":"a","path":"../etc"}]"#).unwrap_err();
        assert_eq!(e.field, "--datadir[0].path");
        let e = parse_datadir(r#"[{"name":"a","path":""}]"#).unwrap_err();
        assert_eq!(e.field, "--datadir[0].path");
        assert!(parse_datadir("[]").is_err());
        assert!(parse_datadir("{").is_err());
    }
}
