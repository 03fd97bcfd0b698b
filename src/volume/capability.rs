//! Volume capabilities as the core sees them (the gRPC layer translates),
//! and the decisions made on them: which mode a request asks for, whether
//! a volume can serve a capability, and whether this node fits a
//! request's topology.

use std::collections::HashMap;

use super::{params, Core, CreateParams, Layout, Volume, VolumeMode};
use crate::error::{CoreError, CoreResult};

/// A capability's access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    Unknown,
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    /// Modes a node-local volume can serve.
    pub fn single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }
}

/// One volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: AccessMode,
    /// `None`: the request named no access type.
    pub mode: Option<VolumeMode>,
    /// The mount capability's `fs_type` (empty: any).
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// The CSI name of the access mode, for messages.
    pub access_name: &'static str,
}

/// Checks one capability and returns the volume mode it asks for.
pub fn check_capability(cap: &Capability, shared_pool: bool) -> CoreResult<VolumeMode> {
    if cap.access == AccessMode::Unknown {
        return Err(CoreError::Required {
            field: "volume_capability.access_mode",
        });
    }
    if !cap.access.single_node() && !shared_pool {
        return Err(CoreError::Unacceptable(format!(
            "access mode {} is not supported: volumes of this pool live on one node (use a pool marked shared for multi-node access)",
            cap.access_name
        )));
    }
    cap.mode.ok_or(CoreError::Required {
        field: "volume_capability.access_type",
    })
}

/// A `layout: image` volume holds one filesystem, which only one kernel may
/// mount: multi-node access modes (a live migration mounts a RWX claim on
/// two nodes at once) would mount it twice and corrupt it.
pub fn check_layout_access(access: &[AccessMode], layout: Layout) -> CoreResult<()> {
    if !layout.holds_filesystem() {
        return Ok(());
    }
    match access.iter().find(|a| !a.single_node()) {
        Some(a) => Err(CoreError::Unacceptable(format!(
            "access mode {a:?} is not supported for layout {}: its filesystem can be mounted on one node only (use layout directory or a Block volume for multi-node access)",
            layout.name()
        ))),
        None => Ok(()),
    }
}

/// Checks a list of capabilities; they must agree on one volume mode.
pub fn check_capabilities(caps: &[Capability], shared_pool: bool) -> CoreResult<VolumeMode> {
    let mut mode = None;
    for cap in caps {
        let m = check_capability(cap, shared_pool)?;
        if mode.is_some_and(|x| x != m) {
            return Err(CoreError::Unacceptable(
                "volume_capabilities mix block and mount access types".into(),
            ));
        }
        mode = Some(m);
    }
    mode.ok_or(CoreError::Required {
        field: "volume_capabilities",
    })
}

/// The `fs_type` the capabilities ask for, if any.
pub fn fs_type_of(caps: &[Capability]) -> Option<String> {
    caps.iter()
        .map(|c| c.fs_type.clone())
        .find(|t| !t.is_empty())
}

/// What ValidateVolumeCapabilities answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    Confirmed,
    /// Not confirmed, and why.
    Unconfirmed(String),
}

impl Core {
    /// Refuses a create whose requisite topology leaves this node out (a
    /// node-local pool serves only here). `requisite` holds the node
    /// values of the topology key, `None` for a segment without it.
    pub fn check_topology(
        &self,
        pool_shared: bool,
        requisite: &[Option<String>],
    ) -> CoreResult<()> {
        if pool_shared
            || requisite.is_empty()
            || requisite
                .iter()
                .any(|n| n.as_deref() == Some(self.node_id.as_str()))
        {
            return Ok(());
        }
        Err(CoreError::NotOnThisNode(format!(
            "node {} is not among the requisite topologies; this pool is local to it",
            self.node_id
        )))
    }

    /// Whether volume `id` can serve `caps`, as made with `parameters` and
    /// published with `context`. Malformed capabilities are an error; ones
    /// the volume cannot serve are answered unconfirmed.
    pub fn validate_capabilities(
        &self,
        id: &str,
        caps: &[Capability],
        parameters: &HashMap<String, String>,
        context: &HashMap<String, String>,
    ) -> CoreResult<Validation> {
        if caps.is_empty() {
            return Err(CoreError::Required {
                field: "volume_capabilities",
            });
        }
        if caps
            .iter()
            .any(|c| c.access == AccessMode::Unknown || c.mode.is_none())
        {
            return Err(CoreError::Unacceptable(
                "each volume capability needs an access_mode and an access_type".into(),
            ));
        }
        let vol = self.get_volume(id)?;
        let shared = self.pool_of(&vol)?.shared;
        Ok(
            match unconfirmed_because(&vol, caps, parameters, context, shared) {
                None => Validation::Confirmed,
                Some(why) => Validation::Unconfirmed(why),
            },
        )
    }
}

fn unconfirmed_because(
    vol: &Volume,
    caps: &[Capability],
    parameters: &HashMap<String, String>,
    context: &HashMap<String, String>,
    shared: bool,
) -> Option<String> {
    if let Some(why) = not_made_with(vol, parameters) {
        return Some(why);
    }
    if let Some(p) = context
        .get(params::STORAGE_POOL)
        .filter(|p| **p != vol.meta.pool)
    {
        return Some(format!(
            "volume {} is in pool {}, not {p}",
            vol.id(),
            vol.meta.pool
        ));
    }
    // An image volume holds one filesystem; it cannot be mounted as another.
    if let (Some(have), Some(asked)) = (vol.meta.fs_type, fs_type_of(caps)) {
        if have.name() != asked {
            return Some(format!(
                "volume {} holds {}, not {asked}",
                vol.id(),
                have.name()
            ));
        }
    }
    let access: Vec<AccessMode> = caps.iter().map(|c| c.access).collect();
    if let Err(e) = check_layout_access(&access, vol.meta.layout) {
        return Some(e.to_string());
    }
    match check_capabilities(caps, shared) {
        Ok(mode) if mode == vol.meta.mode => None,
        Ok(mode) => Some(format!(
            "volume {} is {:?} mode, not {mode:?}",
            vol.id(),
            vol.meta.mode
        )),
        Err(e) => Some(e.to_string()),
    }
}

/// Why CreateVolume `parameters` could not have made this volume, if so.
fn not_made_with(vol: &Volume, parameters: &HashMap<String, String>) -> Option<String> {
    if parameters.is_empty() {
        return None;
    }
    let asked = match CreateParams::parse(parameters) {
        Ok(p) => p,
        Err(e) => return Some(e.to_string()),
    };
    if let Some(pool) = asked.storage_pool.as_ref().filter(|p| **p != vol.meta.pool) {
        return Some(format!(
            "volume {} is in pool {}, not {pool}",
            vol.id(),
            vol.meta.pool
        ));
    }
    let layout = match asked.layout_for(vol.meta.mode) {
        Ok(l) => l,
        Err(e) => return Some(e.to_string()),
    };
    (layout != vol.meta.layout && !vol.legacy).then(|| {
        format!(
            "volume {} has layout {}, not {}",
            vol.id(),
            vol.meta.layout.name(),
            layout.name()
        )
    })
}
