//! The core's error type, named by cause. It knows nothing about gRPC:
//! `csi::status` alone decides which code each cause gets.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What kind of object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Object {
    Volume,
    Snapshot,
    GroupSnapshot,
    SourceVolume,
    SourceSnapshot,
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Object::Volume => "volume",
            Object::Snapshot => "snapshot",
            Object::GroupSnapshot => "group snapshot",
            Object::SourceVolume => "source volume",
            Object::SourceSnapshot => "source snapshot",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    // The request is malformed.
    #[error("{field} is required")]
    Required { field: &'static str },
    #[error("{field} {value:?} is not valid: {why}")]
    InvalidValue {
        field: &'static str,
        value: String,
        why: String,
    },
    /// A well-formed request this driver cannot serve as asked.
    #[error("{0}")]
    Unacceptable(String),

    // Something named does not exist.
    #[error("{kind} {id} does not exist on node {node}")]
    Missing {
        kind: Object,
        id: String,
        node: String,
    },
    #[error("volume {id} is not published or staged at {path}")]
    NotAt { id: String, path: PathBuf },
    #[error("{kind} {id} does not exist on node {node}: this driver clones and restores only within one node; to move a VM disk to another node use a host-assisted copy (CDI cloneStrategy: copy)")]
    SourceElsewhere {
        kind: Object,
        id: String,
        node: String,
    },

    // A name is taken by something else.
    #[error("{kind} {id} already exists with {field} {have} (asked for {asked})")]
    Conflict {
        kind: Object,
        id: String,
        field: &'static str,
        have: String,
        asked: String,
    },
    #[error("volume {id} is already published at {path} with other options ({have})")]
    PublishedDifferently {
        id: String,
        path: PathBuf,
        have: String,
    },

    // Sizes.
    #[error("{0}")]
    SizeOutOfRange(String),

    // The state of things forbids it.
    #[error("volume {id} is in use ({by}); unpublish it first")]
    VolumeInUse { id: String, by: String },
    #[error("volume {id} is not staged at {path}")]
    NotStaged { id: String, path: PathBuf },
    #[error("volume {id} is a {have} volume; the request asks for {asked}")]
    CapabilityMismatch {
        id: String,
        have: String,
        asked: String,
    },
    #[error(
        "{path} holds {what} that this driver did not put there for this volume; it is left alone"
    )]
    ForeignContent { path: PathBuf, what: String },
    #[error("volume {id} has another filesystem mounted inside it at {mount}; unmount it first")]
    MountInside { id: String, mount: PathBuf },
    #[error("volume {id} has SINGLE_NODE_SINGLE_WRITER access and is already published at {at}")]
    SingleWriterTaken { id: String, at: PathBuf },
    /// The node lacks what the request needs (loop devices, a capability,
    /// reflinks for a short freeze, quotas).
    #[error("{0}")]
    NotPossibleHere(String),
    #[error("cannot run {program}: {source} (is it installed on the node?)")]
    ToolMissing {
        program: &'static str,
        source: io::Error,
    },

    // Resources.
    #[error("pool {pool} has no space left for {what}")]
    NoSpace { pool: String, what: String },
    #[error("{0}")]
    NotOnThisNode(String),

    // Concurrency.
    #[error("an operation on {kind} {id} is already in progress; retry")]
    Busy { kind: Object, id: String },
    #[error("starting_token {token:?} was not issued by this driver")]
    BadToken { token: String },
    #[error("{what} kept changing while it was copied; retry the request")]
    Unsettled { what: PathBuf },
    #[error("the driver is still recovering from an interrupted run; retry")]
    Recovering,
    #[error("{path} is still open in a process on the node; it stays mounted until that process closes it")]
    MountBusy { path: PathBuf },

    // The node is not ready for it.
    #[error("pool {pool} is not available: {why}")]
    PoolUnavailable { pool: String, why: String },

    // Faults.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    ToolFailed {
        program: &'static str,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("{what} is damaged: {why}")]
    Damaged { what: String, why: String },
    #[error("the metadata of volume {id} is damaged ({why}); it is kept as it is for an admin, and is not changed until it is repaired")]
    MetadataDamaged { id: String, why: String },
    #[error("{0}")]
    Internal(String),
}

pub type CoreResult<T> = Result<T, CoreError>;

/// Adds a human context to an I/O error.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> CoreResult<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> CoreResult<T> {
        self.map_err(|source| CoreError::Io {
            context: what(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> CoreResult<T> {
        self.map_err(|errno| CoreError::Io {
            context: what(),
            source: io::Error::from(errno),
        })
    }
}

impl CoreError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        CoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// The raw OS error behind an I/O failure, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CoreError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the cause is a full filesystem (or quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self, CoreError::NoSpace { .. })
            || matches!(self.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    }

    /// Names an out-of-space failure after the pool and what was being
    /// written; other errors pass through.
    pub fn in_pool(self, pool: &str, what: impl FnOnce() -> String) -> Self {
        if self.is_no_space() && !matches!(self, CoreError::NoSpace { .. }) {
            CoreError::NoSpace {
                pool: pool.to_owned(),
                what: what(),
            }
        } else {
            self
        }
    }

    pub fn missing(kind: Object, id: &str, node: &str) -> Self {
        CoreError::Missing {
            kind,
            id: id.to_owned(),
            node: node.to_owned(),
        }
    }

    pub fn invalid(field: &'static str, value: &str, why: impl Into<String>) -> Self {
        CoreError::InvalidValue {
            field,
            value: value.chars().take(64).collect(),
            why: why.into(),
        }
    }
}

/// Checks that a required string field is present.
pub fn required(field: &'static str, value: &str) -> CoreResult<()> {
    if value.is_empty() {
        return Err(CoreError::Required { field });
    }
    Ok(())
}
