"""One error handler: every failure becomes an OperationOutcome with the right status, never a trace."""
from __future__ import annotations

import logging

from flask import Flask
from werkzeug.exceptions import HTTPException

from ..errors import FhirAiError, NotSupported, UpstreamError
from .fhir_io import fhir_response

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}


def register(app: Flask) -> None:
    @app.errorhandler(FhirAiError)
    def _ours(exc: FhirAiError):  # type: ignore[no-untyped-def]
        if isinstance(exc, UpstreamError):
            # The message quotes the hospital server's own words (an OperationOutcome may name a patient):
            # the caller gets them, the log only what failed and how.
            log.error("%s (HTTP %d; the hospital server's status %s)", type(exc).__name__, exc.status,
                      exc.upstream_status or "none")
        elif exc.status >= 500 and not isinstance(exc, NotSupported):
            # (a 501 for what this server is configured not to do is the caller's question, not our failure)
            log.error("%s: %s", type(exc).__name__, exc.message)
        response = fhir_response(exc.to_operation_outcome(), exc.status)
        if exc.retry_after_seconds is not None:
            response.headers["Retry-After"] = str(exc.retry_after_seconds)
        if exc.status == 401:         # RFC 9110: a 401 says how to authenticate (e.g. the Subscription endpoint)
            response.headers.setdefault("WWW-Authenticate", 'Bearer realm="fhir_ai"')
        return response

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": _HTTP_CODES.get(status, "processing"),
            "diagnostics": exc.description or exc.name}]}
        response = fhir_response(outcome, status)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unexpected error (%s)", type(exc).__name__)
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "fatal", "code": "exception",
            "diagnostics": "internal error; the server log has the details"}]}
        return fhir_response(outcome, 500)
