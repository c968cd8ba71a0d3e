//! One error type for the service, and its mapping to gRPC status codes.
//!
//! Callers (the CLI, grpcurl users, the filter) act on the code, and people read the
//! message, so every variant carries a sentence that names what was wrong.

use caracal_domain::money::MoneyError;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A dependency (database, Redis) is down or saturated; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected database answer; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    pub fn invalid(field: &str, err: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {err}"))
    }
}

impl From<MoneyError> for ServiceError {
    fn from(err: MoneyError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

impl From<DieselError> for ServiceError {
    fn from(err: DieselError) -> Self {
        match err {
            DieselError::NotFound => Self::NotFound("not found".to_owned()),
            DieselError::DatabaseError(kind, info) => {
                let constraint = info.constraint_name().unwrap_or_default().to_owned();
                let message = info.message().to_owned();
                match kind {
                    DatabaseErrorKind::UniqueViolation => {
                        Self::AlreadyExists(format!("already exists ({constraint})"))
                    }
                    DatabaseErrorKind::ForeignKeyViolation => {
                        Self::NotFound(format!("referenced row does not exist ({constraint})"))
                    }
                    DatabaseErrorKind::CheckViolation
                        if constraint.starts_with("agents_parent") =>
                    {
                        Self::FailedPrecondition(message)
                    }
                    DatabaseErrorKind::CheckViolation | DatabaseErrorKind::NotNullViolation => {
                        Self::InvalidArgument(format!("rejected by the database: {message}"))
                    }
                    DatabaseErrorKind::SerializationFailure => {
                        Self::Aborted("concurrent change, retry the request".to_owned())
                    }
                    DatabaseErrorKind::ClosedConnection => {
                        Self::Unavailable("database connection lost".to_owned())
                    }
                    _ => Self::Internal(format!("database: {message}")),
                }
            }
            other => Self::Internal(format!("database: {other}")),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        let code = match &err {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Aborted(_) => Code::Aborted,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        Status::new(code, err.to_string())
    }
}
