"""Domain errors: each names its gRPC code, an ErrorInfo reason and metadata, so the API maps them in one place.

`metadata` (google.rpc.ErrorInfo.metadata, AIP-193) holds what the message names, keyed by the
API's own field names (`job_id`, `request_id`, `limit` ...), so that a program need not parse
the message.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """One bad request field, named by its path in the request (`fields[3].name`), and what is wrong."""

    field: str
    description: str


class ServiceError(Exception):
    """An error the caller can act on; `message` is shown to the caller as is."""

    code = "INTERNAL"
    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    """Bad input: always with its field violations (google.rpc.BadRequest); an empty field is the
    request as a whole (bytes that are no message). ErrorInfo names the fields too."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: Sequence[Violation], *, reason: str | None = None) -> None:
        fields = ", ".join(dict.fromkeys(v.field for v in violations if v.field))
        super().__init__(message, reason=reason, metadata={"field": fields} if fields else None)
        self.violations = tuple(violations)


class JobNotFound(ServiceError):
    """No such job in the caller's tenant (another tenant's job included: no existence oracle)."""

    code = "NOT_FOUND"
    reason = "JOB_NOT_FOUND"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id} not found.", metadata={"job_id": job_id})


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"
    reason = "REQUEST_ID_REUSED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"
    reason = "JOB_NOT_CANCELLABLE"


class QuotaExceeded(ServiceError):
    """A tenant's quota is used up; the google.rpc.QuotaFailure detail names the tenant (`tenant:<id>`)
    and, in `description`, the quota and its use."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str, tenant: str, description: str,
                 metadata: Mapping[str, str]) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.subject, self.description = f"tenant:{tenant}", description


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


class WorkStopped(Exception):
    """Background work stopped because it was told to (a cancel, shutdown, a lost lease, a stall):
    not a failure, so spans and logs say "stopped" rather than "error"."""
