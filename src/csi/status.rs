//! The one place where core errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::CoreError;

/// The gRPC code for each cause.
pub fn code_of(e: &CoreError) -> Code {
    use CoreError as E;
    match e {
        E::Required { .. } | E::InvalidValue { .. } | E::Unacceptable(_) => Code::InvalidArgument,
        E::Missing { .. } | E::NotAt { .. } | E::SourceElsewhere { .. } => Code::NotFound,
        E::Conflict { .. } | E::PublishedDifferently { .. } => Code::AlreadyExists,
        E::SizeOutOfRange(_) => Code::OutOfRange,
        E::VolumeInUse { .. }
        | E::NotStaged { .. }
        | E::CapabilityMismatch { .. }
        | E::ForeignContent { .. }
        | E::MountInside { .. }
        | E::SingleWriterTaken { .. }
        | E::MountBusy { .. }
        | E::MetadataDamaged { .. }
        | E::NotPossibleHere(_)
        | E::ToolMissing { .. } => Code::FailedPrecondition,
        E::NoSpace { .. } | E::NotOnThisNode(_) => Code::ResourceExhausted,
        E::Busy { .. } | E::BadToken { .. } | E::Unsettled { .. } => Code::Aborted,
        E::PoolUnavailable { .. } | E::Recovering => Code::Unavailable,
        E::Io { .. } if e.is_no_space() => Code::ResourceExhausted,
        E::Io { .. } | E::ToolFailed { .. } | E::Damaged { .. } | E::Internal(_) => Code::Internal,
    }
}

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        Status::new(code_of(&e), e.to_string())
    }
}
