//! The one place where core errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::CoreError;

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        let message = e.to_string();
        let code = match &e {
            CoreError::InvalidArgument(_) => Code::InvalidArgument,
            CoreError::NotFound(_) => Code::NotFound,
            CoreError::AlreadyExists(_) => Code::AlreadyExists,
            CoreError::OutOfRange(_) => Code::OutOfRange,
            CoreError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoreError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoreError::Aborted(_) => Code::Aborted,
            CoreError::Unavailable(_) => Code::Unavailable,
            CoreError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            CoreError::Internal(_) => Code::Internal,
        };
        Status::new(code, message)
    }
}
