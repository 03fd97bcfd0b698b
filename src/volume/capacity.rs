//! GetCapacity, and the accounting CreateVolume follows with it.
//!
//! Thin (the default, upstream's semantics): files are sparse and a pool
//! promises only what it holds now, so `available_capacity` is the free
//! space and `maximum_volume_size` the pool's size: a VM disk larger than
//! the free space still schedules (the scheduler compares the request
//! with the maximum), and CreateVolume refuses only what the pool could
//! never hold. Strict (`serve --strict-capacity`): both figures are the
//! free space, and CreateVolume refuses anything above it.

use super::Core;
use crate::error::{CoreError, CoreResult};
use crate::pool::Pool;

/// What GetCapacity reports for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub available: u64,
    pub maximum: u64,
}

impl Core {
    /// The pool's capacity as seen from `topology`: nothing for another
    /// node, nothing while the pool is not ready.
    pub fn capacity(&self, pool: &Pool, other_node: bool) -> CoreResult<Capacity> {
        let none = Capacity {
            available: 0,
            maximum: 0,
        };
        if other_node || pool.dirs().is_err() {
            return Ok(none);
        }
        let usage = pool.usage()?;
        Ok(Capacity {
            available: usage.available_bytes,
            maximum: if self.settings.strict_capacity {
                usage.available_bytes
            } else {
                usage.total_bytes
            },
        })
    }

    /// Refuses, under strict accounting, a volume the pool has no room for.
    pub(crate) fn check_room(&self, pool: &Pool, capacity: u64) -> CoreResult<()> {
        if !self.settings.strict_capacity {
            return Ok(());
        }
        let available = pool.usage()?.available_bytes;
        if capacity > available {
            return Err(CoreError::NoSpace {
                pool: pool.name.clone(),
                what: format!(
                    "a volume of {capacity} bytes (strict accounting: {available} bytes are free)"
                ),
            });
        }
        Ok(())
    }
}
