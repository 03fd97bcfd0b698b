//! The core's error type. It knows nothing about gRPC; `csi::status` maps it.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
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
}
