//! The core: volumes and snapshots on real files in pools. It knows
//! nothing about gRPC.
//!
//! - `registry`: the pools, finding volumes, and the listing index;
//! - `guard`: the one operation guard every operation takes;
//! - `layout/`: what a directory, a Block file and an image volume are;
//! - `create`, `resize`, `delete`, `recovery`: the controller side;
//! - `node`, `stats`: the node side;
//! - `snapshot`, `group`, `freeze`: snapshots and group snapshots;
//! - `meta`, `params`, `token`: metadata files, parameters, paging tokens.

pub mod capability;
pub mod capacity;
pub mod create;
pub mod delete;
pub mod freeze;
pub mod group;
pub mod guard;
pub mod layout;
pub mod meta;
pub mod node;
pub mod params;
pub mod recovery;
pub mod registry;
pub mod resize;
pub mod snapshot;
pub mod stats;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::PoolConfig;
use crate::error::{CoreError, CoreResult};
use crate::pool::{Pool, PoolOpenError};

pub use create::CreateRequest;
pub use layout::Layout;
pub use meta::{ContentSource, VolumeMeta, VolumeMode};
pub use node::{NodeStats, PublishRequest, StageRequest};
pub use params::CreateParams;
pub use resize::Expanded;

/// Size given to a Block or image volume when the request names none.
pub const DEFAULT_FILE_VOLUME_SIZE: u64 = 1 << 30;

/// Policy an admin sets on the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest inline ephemeral volume a pod may ask for.
    pub max_ephemeral_size: u64,
    /// Longest a group snapshot may keep a filesystem frozen.
    pub freeze_timeout: Duration,
    /// Capacity accounting: thin (upstream's: the pool's free space is
    /// what may be asked for, files are sparse) or strict.
    pub strict_capacity: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_ephemeral_size: 1 << 30,
            freeze_timeout: Duration::from_secs(10),
            strict_capacity: false,
        }
    }
}

/// A volume as found in a pool.
#[derive(Debug, Clone)]
pub struct Volume {
    pub meta: VolumeMeta,
    pub path: PathBuf,
    /// No metadata file: made by the Go driver (or damaged, see `problem`).
    pub legacy: bool,
    /// Why the volume is abnormal (damaged metadata), if it is.
    pub problem: Option<String>,
}

impl Volume {
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    pub fn layout(&self) -> Layout {
        self.meta.layout
    }
}

pub struct Core {
    pub node_id: String,
    pools: Vec<Pool>,
    pub settings: Settings,
    guards: guard::Guards,
    stats_cache: stats::StatsCache,
    index: registry::Index,
    snapshot_index: registry::Index,
}

/// Why the core could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no storage pool configured")]
    NoPools,
    #[error(transparent)]
    Pool(#[from] PoolOpenError),
}

impl Core {
    /// Opens every pool; recovery of what an interrupted run left runs in
    /// the background, so the driver serves at once.
    pub fn new(
        node_id: String,
        pools: &[PoolConfig],
        settings: Settings,
    ) -> Result<Arc<Core>, StartError> {
        if pools.is_empty() {
            return Err(StartError::NoPools);
        }
        let pools = pools
            .iter()
            .map(|cfg| Pool::open(cfg, &node_id))
            .collect::<Result<Vec<_>, _>>()?;
        let core = Arc::new(Core {
            node_id,
            pools,
            settings,
            guards: guard::Guards::default(),
            stats_cache: stats::StatsCache::default(),
            index: registry::Index::default(),
            snapshot_index: registry::Index::default(),
        });
        group::thaw_leftovers(&core);
        recovery::install(&core);
        Ok(core)
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn default_pool(&self) -> &Pool {
        &self.pools[0]
    }

    /// The pool named `name`, or the default pool when `None`.
    pub fn pool(&self, name: Option<&str>) -> CoreResult<&Pool> {
        let Some(name) = name else {
            return Ok(self.default_pool());
        };
        self.pools.iter().find(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
            CoreError::invalid(
                "storagePool",
                name,
                format!("this node has pools {}", known.join(", ")),
            )
        })
    }
}
