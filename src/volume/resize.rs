//! ControllerExpandVolume and ControllerModifyVolume. The backing store
//! changes first and is made durable, then the metadata; a failure undoes
//! the change, so a volume is always its old or its new self.

use std::collections::HashMap;

use super::create::decide_capacity;
use super::guard::Access;
use super::params::MutableParams;
use super::{meta, Core};
use crate::error::{CoreError, CoreResult, Object};
use crate::names::validate_name;

/// The outcome of an expansion.
#[derive(Debug, Clone, Copy)]
pub struct Expanded {
    pub capacity_bytes: u64,
    pub node_expansion_required: bool,
}

impl Core {
    /// Grows a volume to at least `required` bytes.
    pub fn expand_volume(&self, id: &str, required: i64, limit: i64) -> CoreResult<Expanded> {
        validate_name("volume_id", id)?;
        let _guard = self.guards.acquire(Object::Volume, id, Access::Write)?;
        let vol = self.get_volume(id)?;
        refuse_if_damaged(&vol)?;
        let pool = self.pool_of(&vol)?;
        let m = &vol.meta;
        let node_expansion_required = m.layout.is_file();
        let capacity = decide_capacity(
            m.layout.sizing(m.fs_type),
            required,
            limit,
            pool.usage()?.total_bytes,
        )?;
        if capacity < m.capacity_bytes {
            if limit > 0 && (limit as u64) < m.capacity_bytes {
                return Err(CoreError::SizeOutOfRange(format!(
                    "volume {id} is {} bytes; it cannot shrink to {limit}",
                    m.capacity_bytes
                )));
            }
            // Already at least as large as asked.
            return Ok(Expanded {
                capacity_bytes: m.capacity_bytes,
                node_expansion_required: false,
            });
        }
        if capacity == m.capacity_bytes && !vol.legacy {
            return Ok(Expanded {
                capacity_bytes: capacity,
                node_expansion_required,
            });
        }
        let dirs = pool.dirs()?;
        m.layout.grow(&vol, capacity).map_err(|e| {
            e.in_pool(&pool.name, || {
                format!("growing volume {id} to {capacity} bytes")
            })
        })?;
        let mut updated = m.clone();
        updated.capacity_bytes = capacity;
        if let Err(e) = meta::write(&dirs, &updated) {
            // Not acknowledged: the file goes back to its recorded size.
            let _ = m.layout.grow(&vol, m.capacity_bytes.max(1)).map_err(|undo| {
                tracing::error!(volume = id, error = %undo, "cannot undo an expansion whose metadata write failed");
            });
            return Err(e);
        }
        tracing::info!(
            volume = id,
            from = m.capacity_bytes,
            to = capacity,
            "volume expanded"
        );
        Ok(Expanded {
            capacity_bytes: capacity,
            node_expansion_required,
        })
    }

    /// Applies mutable parameters (ModifyVolume).
    pub fn modify_volume(&self, id: &str, mutable: &HashMap<String, String>) -> CoreResult<()> {
        validate_name("volume_id", id)?;
        let asked = MutableParams::parse(mutable)?;
        let _guard = self.guards.acquire(Object::Volume, id, Access::Write)?;
        let vol = self.get_volume(id)?;
        let pool = self.pool_of(&vol)?;
        let Some(true) = asked.preallocate else {
            return Ok(());
        };
        refuse_if_damaged(&vol)?;
        vol.layout()
            .preallocate(&vol)
            .map_err(|e| e.in_pool(&pool.name, || format!("preallocating volume {id}")))?;
        if !vol.meta.preallocated {
            let mut updated = vol.meta.clone();
            updated.preallocated = true;
            meta::write(&*pool.dirs()?, &updated)?;
        }
        tracing::info!(volume = id, "volume preallocated");
        Ok(())
    }
}

/// Metadata that could not be read is inferred for serving; writing the
/// guess back would erase what it lost (block size, source) and hide the
/// damage. Changes wait for an admin.
fn refuse_if_damaged(vol: &super::Volume) -> CoreResult<()> {
    match &vol.problem {
        Some(why) => Err(CoreError::MetadataDamaged {
            id: vol.id().to_owned(),
            why: why.to_string(),
        }),
        None => Ok(()),
    }
}
