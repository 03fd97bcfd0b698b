//! StorageClass parameters (`CreateVolumeRequest.parameters`) and
//! VolumeAttributesClass parameters (`mutable_parameters`): every
//! parameter this driver reads is named and parsed here, once.

use std::collections::HashMap;

use super::layout::Layout;
use super::VolumeMode;
use crate::error::{CoreError, CoreResult};

pub const STORAGE_POOL: &str = "storagePool";
pub const LAYOUT: &str = "layout";
pub const PREALLOCATION: &str = "preallocation";
pub const BLOCK_SIZE: &str = "blockSize";
pub const ENFORCE_SIZE: &str = "enforceSize";
/// An inline ephemeral volume's size (volume attribute).
pub const SIZE: &str = "size";

/// What a StorageClass asks of new volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    pub storage_pool: Option<String>,
    /// `None`: the default layout for the volume's mode.
    pub layout: Option<Layout>,
    pub preallocate: bool,
    pub block_size: u32,
    pub enforce_size: bool,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            storage_pool: None,
            layout: None,
            preallocate: false,
            block_size: 512,
            enforce_size: false,
        }
    }
}

/// What a VolumeAttributesClass may change on an existing volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MutableParams {
    pub preallocate: Option<bool>,
}

fn parse_bool(key: &'static str, value: &str) -> CoreResult<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" | "" => Ok(false),
        _ => Err(CoreError::invalid(key, value, "use true or false")),
    }
}

impl CreateParams {
    /// Reads the parameters this driver knows; others (e.g. the
    /// `csi.storage.k8s.io/*` ones the provisioner adds) are ignored.
    pub fn parse(parameters: &HashMap<String, String>) -> CoreResult<Self> {
        let mut p = CreateParams::default();
        for (key, value) in parameters {
            match key.as_str() {
                STORAGE_POOL => p.storage_pool = Some(value.clone()).filter(|v| !v.is_empty()),
                LAYOUT if value.is_empty() => p.layout = None,
                LAYOUT => p.layout = Some(Layout::selectable(value)?),
                PREALLOCATION => p.preallocate = parse_bool(PREALLOCATION, value)?,
                ENFORCE_SIZE => p.enforce_size = parse_bool(ENFORCE_SIZE, value)?,
                BLOCK_SIZE => {
                    p.block_size = match value.as_str() {
                        "512" | "" => 512,
                        "4096" => 4096,
                        other => {
                            return Err(CoreError::invalid(BLOCK_SIZE, other, "use 512 or 4096"))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(p)
    }

    /// Parameters with `mutable_parameters` applied over them (the spec:
    /// mutable parameters take precedence).
    pub fn parse_with_mutable(
        parameters: &HashMap<String, String>,
        mutable: &HashMap<String, String>,
    ) -> CoreResult<Self> {
        let mut p = CreateParams::parse(parameters)?;
        let m = MutableParams::parse(mutable)?;
        if let Some(prealloc) = m.preallocate {
            p.preallocate = prealloc;
        }
        Ok(p)
    }

    /// The layout a volume of `mode` gets under these parameters.
    pub fn layout_for(&self, mode: VolumeMode) -> CoreResult<Layout> {
        let layout = match self.layout {
            Some(l) if l.mode() == mode => l,
            // A Block request is always a Block file, whatever the class says.
            Some(_) | None => Layout::default_for(mode),
        };
        if self.enforce_size && !layout.limits_size() {
            return Err(CoreError::NotPossibleHere(format!(
                "enforceSize needs a hard size limit, which a {} volume cannot have on this node (no project quota); use layout: image",
                layout.describe()
            )));
        }
        Ok(layout)
    }
}

impl MutableParams {
    /// Refuses anything but the parameters that may change.
    pub fn parse(mutable: &HashMap<String, String>) -> CoreResult<Self> {
        let mut m = MutableParams::default();
        for (key, value) in mutable {
            match key.as_str() {
                PREALLOCATION => m.preallocate = Some(parse_bool(PREALLOCATION, value)?),
                other => {
                    return Err(CoreError::invalid(
                        "mutable_parameters",
                        other,
                        format!("only {PREALLOCATION} can change"),
                    ))
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn mutable_parameters_win() {
        let p = CreateParams::parse_with_mutable(
            &map(&[(PREALLOCATION, "true")]),
            &map(&[(PREALLOCATION, "false")]),
        )
        .unwrap();
        assert!(!p.preallocate);
        assert!(MutableParams::parse(&map(&[("layout", "image")])).is_err());
    }

    #[test]
    fn layouts_follow_the_mode() {
        let image = CreateParams::parse(&map(&[(LAYOUT, "image")])).unwrap();
        assert_eq!(
            image.layout_for(VolumeMode::Filesystem).unwrap().name(),
            "image"
        );
        assert_eq!(image.layout_for(VolumeMode::Block).unwrap().name(), "file");
        assert_eq!(
            CreateParams::default()
                .layout_for(VolumeMode::Filesystem)
                .unwrap()
                .name(),
            "directory"
        );
        assert!(CreateParams::parse(&map(&[(LAYOUT, "qcow9")])).is_err());
        let enforce = CreateParams::parse(&map(&[(ENFORCE_SIZE, "true")])).unwrap();
        assert!(matches!(
            enforce.layout_for(VolumeMode::Filesystem),
            Err(CoreError::NotPossibleHere(_))
        ));
        assert!(CreateParams::parse(&map(&[(BLOCK_SIZE, "1024")])).is_err());
    }
}
