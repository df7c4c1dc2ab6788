"""One exception root for fhir_ai; each error knows its HTTP status and OperationOutcome issue code."""
from __future__ import annotations

from typing import Any


class FhirAiError(Exception):
    """Root of every error fhir_ai raises on purpose.

    ``status`` is the HTTP status the API answers with, ``code`` the OperationOutcome
    ``issue.code`` (http://hl7.org/fhir/issue-type), ``expression`` the FHIRPath (or
    file/field path) of the offending element.
    """

    status: int = 500
    code: str = "exception"
    severity: str = "error"
    retry_after_seconds: int | None = None     # the answer's Retry-After (a 503 worth repeating later)

    def __init__(self, message: str, *, expression: list[str] | str | None = None,
                 details: str | None = None, header: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if isinstance(expression, str):
            expression = [expression]
        self.expression = list(expression or [])
        self.details = details
        self.header = header          # an HTTP header at fault: issue.location 'http.<header>' (R4)

    def issue(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code,
                                 "diagnostics": self.message}
        if self.details:
            issue["details"] = {"text": self.details}
        if self.expression:
            issue["expression"] = self.expression
        if self.header:
            issue["location"] = [f"http.{self.header}"]
        return issue

    def to_operation_outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": [self.issue()]}


class BadRequest(FhirAiError):
    """The caller sent something we cannot use (bad parameter, malformed resource)."""
    status = 400
    code = "invalid"


class NotFound(FhirAiError):
    """A resource does not exist (here or at the hospital's server)."""
    status = 404
    code = "not-found"


class NotSupported(FhirAiError):
    """A valid request for something this server does not do."""
    status = 400
    code = "not-supported"


class UnsupportedMediaType(FhirAiError):
    """The request body is not FHIR JSON."""
    status = 415
    code = "not-supported"


class NotAcceptable(FhirAiError):
    """The caller asked for a format this server does not speak (e.g. XML)."""
    status = 406
    code = "not-supported"


class Unprocessable(FhirAiError):
    """Well-formed input that fails a business rule."""
    status = 422
    code = "processing"


class UpstreamError(FhirAiError):
    """The hospital's FHIR server failed. ``temporary`` errors are worth retrying."""
    status = 502
    code = "transient"

    def __init__(self, message: str, *, temporary: bool = True, upstream_status: int | None = None,
                 retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.temporary = temporary
        self.upstream_status = upstream_status
        self.retry_after = retry_after    # seconds the server asked us to wait (Retry-After)


class UpstreamTimeout(UpstreamError):
    """The hospital's FHIR server did not answer in time."""
    status = 504
    code = "timeout"


class UpstreamNotFound(NotFound):
    """The hospital's FHIR server says the resource does not exist."""


class ConfigurationError(FhirAiError):
    """Configuration (settings, mappings, model files) is invalid; the service must not start."""
    status = 500
    code = "exception"


class MappingError(ConfigurationError):
    """A mapping file is invalid. ``problems`` maps 'file: field.path' to messages."""

    def __init__(self, problems: dict[str, list[str]]) -> None:
        self.problems = problems
        lines = [f"{where}: {msg}" for where, msgs in sorted(problems.items()) for msg in msgs]
        super().__init__("invalid mapping:\n  " + "\n  ".join(lines), expression=sorted(problems))


class ModelError(ConfigurationError):
    """A model file is missing, unreadable, or does not fit its mapping."""


class MappingMismatch(MappingError, ModelError):
    """A valid mapping that does not fit the model trained with it (features, input units), keyed
    'file: field.path' like every other mapping problem."""


class Unauthorized(FhirAiError):
    status = 401
    code = "login"


class Forbidden(FhirAiError):
    status = 403
    code = "forbidden"
