"""Domain errors: each names its gRPC code and an ErrorInfo reason, so the API maps them in one place."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    description: str


class ServiceError(Exception):
    """An error the caller can act on; `message` is shown to the caller as is."""

    code = "INTERNAL"
    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, *, reason: str | None = None,
                 violations: tuple[Violation, ...] | list[Violation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"
    reason = "JOB_NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"
    reason = "REQUEST_ID_REUSED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"
    reason = "JOB_NOT_CANCELLABLE"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_ACTIVE_JOBS"


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota is used up; `subject` and `limit` feed the google.rpc.QuotaFailure detail."""

    reason = "RETAINED_BYTES_QUOTA_EXCEEDED"

    def __init__(self, message: str, *, subject: str, limit: str) -> None:
        super().__init__(message)
        self.subject, self.limit = subject, limit


class Unavailable(ServiceError):
    """The database is busy (a lock held past its timeout) or unreachable, or this server is shutting
    down: the same call may work shortly, so the caller is told when to retry (google.rpc.RetryInfo)."""

    code = "UNAVAILABLE"
    reason = "DATABASE_UNAVAILABLE"

    def __init__(self, message: str, *, reason: str | None = None, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"
    reason = "INVALID_TOKEN"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"
    reason = "INSUFFICIENT_SCOPE"


class StorageError(Exception):
    """Storage failed after its retries; the message is safe to show on the failed job."""
