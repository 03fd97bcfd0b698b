//! StorageClass parameters (`CreateVolumeRequest.parameters`) and
//! VolumeAttributesClass parameters (`mutable_parameters`).

use std::collections::HashMap;

use super::{Layout, VolumeMode};
use crate::error::{CoreError, CoreResult};

pub const STORAGE_POOL: &str = "storagePool";
pub const LAYOUT: &str = "layout";
pub const PREALLOCATION: &str = "preallocation";
pub const BLOCK_SIZE: &str = "blockSize";
pub const ENFORCE_SIZE: &str = "enforceSize";

/// What a StorageClass asks of new volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    pub storage_pool: Option<String>,
    /// `Some(Layout::Image)` for `layout: image`; `None` means the default.
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

fn parse_bool(key: &str, value: &str) -> CoreResult<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" | "" => Ok(false),
        _ => Err(CoreError::InvalidArgument(format!(
            "parameter {key}: {value:?} is not true or false"
        ))),
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
                LAYOUT => {
                    p.layout = match value.as_str() {
                        "directory" | "" => Some(Layout::Directory),
                        "image" => Some(Layout::Image),
                        other => {
                            return Err(CoreError::InvalidArgument(format!(
                                "parameter {LAYOUT}: {other:?} is not \"directory\" or \"image\""
                            )))
                        }
                    }
                }
                PREALLOCATION => p.preallocate = parse_bool(key, value)?,
                ENFORCE_SIZE => p.enforce_size = parse_bool(key, value)?,
                BLOCK_SIZE => {
                    p.block_size = match value.as_str() {
                        "512" | "" => 512,
                        "4096" => 4096,
                        other => {
                            return Err(CoreError::InvalidArgument(format!(
                                "parameter {BLOCK_SIZE}: {other:?} is not 512 or 4096"
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(p)
    }

    /// The layout a volume of `mode` gets under these parameters.
    pub fn layout_for(&self, mode: VolumeMode) -> CoreResult<Layout> {
        match (mode, self.layout) {
            (VolumeMode::Block, _) => Ok(Layout::File),
            (VolumeMode::Filesystem, Some(Layout::Image)) => Ok(Layout::Image),
            (VolumeMode::Filesystem, _) if self.enforce_size => Err(CoreError::FailedPrecondition(
                "enforceSize needs a hard size limit, which a directory volume cannot have on this node (no project quota); use layout: image".into(),
            )),
            (VolumeMode::Filesystem, _) => Ok(Layout::Directory),
        }
    }
}

/// Checks `mutable_parameters`; returns the requested preallocation, if any.
pub fn parse_mutable(mutable: &HashMap<String, String>) -> CoreResult<Option<bool>> {
    let mut preallocate = None;
    for (key, value) in mutable {
        match key.as_str() {
            PREALLOCATION => preallocate = Some(parse_bool(key, value)?),
            other => {
                return Err(CoreError::InvalidArgument(format!(
                    "mutable parameter {other:?} is not supported (only {PREALLOCATION})"
                )))
            }
        }
    }
    Ok(preallocate)
}
