"""A site without batch jobs (FHIR_AI_BROKER_URL=none): what needs the job queue says so, without trying Redis.

Imports neither Celery nor Redis: /health, the CLI and the API ask it before touching either.
"""
from __future__ import annotations

from ..config import ENV_PREFIX, NO_BROKER, Settings
from ..errors import NotSupported

SETTING = f"{ENV_PREFIX}BROKER_URL={NO_BROKER}"


class JobsDisabled(NotSupported):
    """Something that runs as a batch job, asked of a server configured without them.

    501 Not Implemented, issue code ``not-supported``: this server does not have the functionality, by its own
    configuration, for as long as that configuration stands. Not 503 with Retry-After (QueueUnavailable): that
    is an outage, and tells clients, and a hospital's server redelivering notifications, to come back, which
    they would do for ever; not 400 or 404: the request and its resource are not at fault. The
    CapabilityStatement of such a server does not declare these operations either (api/jobs.py)."""
    status = 501
    code = "not-supported"


def require(settings: Settings, what: str) -> None:
    """Raise JobsDisabled naming ``what`` (e.g. "Group/[id]/$assess") when this site runs no batch jobs."""
    if not settings.jobs_enabled:
        raise JobsDisabled(f"{what} is not available on this server: it runs no batch jobs ({SETTING})")
