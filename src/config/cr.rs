//! The `HostPathProvisioner` custom resource
//! (`hostpathprovisioner.kubevirt.io/v1beta1`), typed and validated.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{validate_pool_name, validate_pool_path, ConfigError, PoolConfig};

pub const API_VERSION: &str = "hostpathprovisioner.kubevirt.io/v1beta1";
pub const KIND: &str = "HostPathProvisioner";
/// Name of the pool made from the deprecated `spec.pathConfig`.
pub const LEGACY_POOL: &str = "legacy";
/// Sub-directory of a pool path that holds the CSI volumes (as upstream).
pub const CSI_SUBDIR: &str = "csi";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathProvisioner {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
    /// Misplaced `workload` at the top level (a common copy mistake): warned about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_config: Option<PathConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feature_gates: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_pools: Vec<StoragePool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathConfig {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub use_naming_prefix: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoragePool {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_template: Option<PvcTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_provider: Option<String>,
    /// Name of the Immediate-binding StorageClass upstream makes for a
    /// shared (ReadWriteMany) pool; `hpp-overlay` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_class_name: Option<String>,
    /// Fields this version does not know: warned about, never silently dropped.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A PersistentVolumeClaimSpec, as upstream's pvcTemplate is: every field
/// is passed on to the pool's claims.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<serde_json::Value>,
    /// Pre-populates each claim (e.g. from a snapshot), as upstream passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source_ref: Option<serde_json::Value>,
    /// Binds the claims to one PV (only sensible for a shared pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_attributes_class_name: Option<String>,
    /// Fields this version does not know: warned about, never silently dropped.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Resources {
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "quantities"
    )]
    pub requests: BTreeMap<String, String>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "quantities"
    )]
    pub limits: BTreeMap<String, String>,
}

/// A Kubernetes quantity is int-or-string: `storage: 5Gi` or `storage: 1073741824`.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u64),
    Float(f64),
    Str(String),
}

fn quantities<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, IntOrString>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                IntOrString::Int(i) => i.to_string(),
                IntOrString::Float(f) => f.to_string(),
                IntOrString::Str(s) => s,
            };
            (k, text)
        })
        .collect())
}

impl PvcTemplate {
    /// A template that every node shares (ReadWriteMany) makes a shared pool.
    pub fn is_shared(&self) -> bool {
        self.access_modes.iter().any(|m| m == "ReadWriteMany")
    }
}

impl HostPathProvisioner {
    /// Parses a CR from YAML and validates it. Returns the CR and warnings.
    pub fn from_yaml(yaml: &str) -> Result<(Self, Vec<String>), ConfigError> {
        let cr: HostPathProvisioner = serde_norway::from_str(yaml).map_err(|e| {
            ConfigError::new("(document)", format!("not a HostPathProvisioner: {e}"))
        })?;
        let warnings = cr.validate()?;
        Ok((cr, warnings))
    }

    /// Checks every rule; returns warnings for what is odd but accepted.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        if !self.api_version.is_empty() && self.api_version != API_VERSION {
            return Err(ConfigError::new(
                "apiVersion",
                format!("{:?} is not {API_VERSION}", self.api_version),
            ));
        }
        if !self.kind.is_empty() && self.kind != KIND {
            return Err(ConfigError::new(
                "kind",
                format!("{:?} is not {KIND}", self.kind),
            ));
        }
        if self.workload.is_some() {
            warnings.push(
                "workload: found at the top level and ignored; it belongs under spec.workload"
                    .into(),
            );
        }
        let spec = &self.spec;
        if let Some(policy) = &spec.image_pull_policy {
            if !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never") {
                return Err(ConfigError::new(
                    "spec.imagePullPolicy",
                    format!("{policy:?} is not Always, IfNotPresent or Never"),
                ));
            }
        }
        match (&spec.path_config, spec.storage_pools.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::new(
                    "spec.pathConfig",
                    "pathConfig and storagePools are mutually exclusive",
                ))
            }
            (None, true) => {
                return Err(ConfigError::new(
                    "spec.storagePools",
                    "give at least one storage pool (or the deprecated pathConfig)",
                ))
            }
            (Some(pc), true) => {
                validate_pool_path(&pc.path, super::MAX_POOL_PATH_LEN)
                    .map_err(|m| ConfigError::new("spec.pathConfig.path", m.to_string()))?;
                warnings.push("spec.pathConfig is deprecated; use spec.storagePools".into());
            }
            (None, false) => {}
        }
        for (i, pool) in spec.storage_pools.iter().enumerate() {
            let at = format!("spec.storagePools[{i}]");
            validate_pool_name(&pool.name)
                .map_err(|m| ConfigError::new(format!("{at}.name"), m.to_string()))?;
            validate_pool_path(&pool.path, super::MAX_POOL_PATH_LEN)
                .map_err(|m| ConfigError::new(format!("{at}.path"), m.to_string()))?;
            let earlier = &spec.storage_pools[..i];
            if let Some(j) = earlier.iter().position(|p| p.name == pool.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "duplicate name {:?} (also spec.storagePools[{j}].name)",
                        pool.name
                    ),
                ));
            }
            if let Some(j) = earlier
                .iter()
                .position(|p| p.path.trim_end_matches('/') == pool.path.trim_end_matches('/'))
            {
                return Err(ConfigError::new(
                    format!("{at}.path"),
                    format!(
                        "duplicate path {:?} (also spec.storagePools[{j}].path)",
                        pool.path
                    ),
                ));
            }
            warnings.extend(pool_warnings(pool, &at));
            if let Some(t) = &pool.pvc_template {
                validate_pvc_template(t, &format!("{at}.pvcTemplate"))?;
            }
        }
        Ok(warnings)
    }

    /// The pools the driver serves; volumes live in `<path>/csi`.
    pub fn pools(&self) -> Vec<PoolConfig> {
        if let Some(pc) = &self.spec.path_config {
            if self.spec.storage_pools.is_empty() {
                return vec![PoolConfig {
                    name: LEGACY_POOL.into(),
                    path: PathBuf::from(&pc.path).join(CSI_SUBDIR),
                    shared: false,
                    snapshot_path: None,
                    require_mount: false,
                }];
            }
        }
        self.spec
            .storage_pools
            .iter()
            .map(|p| {
                let path = PathBuf::from(&p.path).join(CSI_SUBDIR);
                PoolConfig {
                    name: p.name.clone(),
                    // Where upstream's operator puts the Go driver's snapshots.
                    snapshot_path: p
                        .snapshot_provider
                        .as_ref()
                        .map(|_| path.join(super::GO_SNAPSHOT_DIR)),
                    path,
                    shared: p.pvc_template.as_ref().is_some_and(PvcTemplate::is_shared),
                    require_mount: p.pvc_template.is_some(),
                }
            })
            .collect()
    }
}

/// What is accepted but odd in a pool: unknown fields (never dropped
/// silently), and a volumeName every node's claim would share.
fn pool_warnings(pool: &StoragePool, at: &str) -> Vec<String> {
    let mut warnings: Vec<String> = pool
        .unknown
        .keys()
        .map(|key| format!("{at}.{key}: unknown field, ignored"))
        .collect();
    if let Some(t) = &pool.pvc_template {
        warnings.extend(t.unknown.keys().map(|key| {
            format!("{at}.pvcTemplate.{key}: not a PersistentVolumeClaimSpec field, ignored")
        }));
        if t.volume_name.is_some() && !t.is_shared() {
            warnings.push(format!(
                "{at}.pvcTemplate.volumeName: every node's claim names the same PersistentVolume, so only one of them can bind"
            ));
        }
    }
    warnings
}

fn validate_pvc_template(t: &PvcTemplate, at: &str) -> Result<(), ConfigError> {
    if let Some(mode) = &t.volume_mode {
        if mode != "Block" && mode != "Filesystem" {
            return Err(ConfigError::new(
                format!("{at}.volumeMode"),
                format!("{mode:?} is neither Block nor Filesystem"),
            ));
        }
    }
    for (k, m) in t.access_modes.iter().enumerate() {
        if !matches!(
            m.as_str(),
            "ReadWriteOnce" | "ReadOnlyMany" | "ReadWriteMany" | "ReadWriteOncePod"
        ) {
            return Err(ConfigError::new(
                format!("{at}.accessModes[{k}]"),
                format!("{m:?} is not a Kubernetes access mode"),
            ));
        }
    }
    match t.resources.requests.get("storage") {
        None => Err(ConfigError::new(
            format!("{at}.resources.requests.storage"),
            "is required",
        )),
        Some(q) => match parse_quantity(q) {
            Some(b) if b > 0 => Ok(()),
            _ => Err(ConfigError::new(
                format!("{at}.resources.requests.storage"),
                format!("{q:?} is not a valid positive Kubernetes quantity"),
            )),
        },
    }
}

/// Parses a Kubernetes quantity (`5Gi`, `500M`, `1e9`, `1.5Ti`) into bytes.
pub fn parse_quantity(q: &str) -> Option<u128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    if number.is_empty()
        || number.matches('.').count() > 1
        || number.starts_with('.') && number.len() == 1
    {
        return None;
    }
    let number = number.strip_prefix('+').unwrap_or(number);
    let value: f64 = number.parse().ok()?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let bytes = (value * multiplier).ceil();
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("5Gi"), Some(5 << 30));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("1e3"), Some(1000));
        assert_eq!(parse_quantity("1.5Ki"), Some(1536));
        for bad in ["", "Gi", "5GB", "-1Gi", "1..2", "abc"] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
    }
}
