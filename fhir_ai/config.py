"""Configuration in one place: defaults, then FHIR_AI_* environment, then explicit overrides.

Nothing else in fhir_ai reads ``os.environ``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigurationError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEMO_HOSPITAL = REPO_DIR / "fixtures" / "demo-hospital"
DEFAULT_MAPPINGS = REPO_DIR / "mappings"
DEFAULT_MODELS = PACKAGE_DIR / "models" / "trained"
ENV_PREFIX = "FHIR_AI_"
# FHIR_AI_BROKER_URL=none: this site runs no batch jobs (no Celery, no Redis).
NO_BROKER = "none"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    """Every setting fhir_ai reads. Environment names are FHIR_AI_<NAME IN CAPITALS>."""

    # The hospital: a FHIR base URL, or a folder of Bulk-Data NDJSON / Bundles.
    source_url: str = str(DEMO_HOSPITAL)
    source_token: str | None = None
    source_timeout: float = 10.0          # seconds per request (connect and read)
    source_retries: int = 3               # extra attempts for 408/429/5xx and network faults
    source_retry_after_cap: float = 30.0  # never sleep longer than this on Retry-After
    # Read a patient's record (Patient, Encounters, Observations) in one batch request (POST [base]):
    # auto (if the server's CapabilityStatement lists the batch interaction), true or false.
    source_batch: str = "auto"
    # SMART Backend Services (instead of source_token): client id, private key (PEM text or a
    # path to a PEM file; kept out of repr), RS384 or ES384, key id (default: JWK thumbprint).
    smart_client_id: str | None = None
    smart_private_key: str | None = field(default=None, repr=False)
    smart_alg: str = "RS384"
    smart_key_id: str | None = None
    smart_scopes: str = ("system/Patient.rs system/Encounter.rs system/Observation.rs "
                         "system/RiskAssessment.cu")
    smart_token_url: str | None = None    # default: discovered from .well-known/smart-configuration
    # The write-back worker (fhir-ai worker): seconds between passes, rows per pass, backoff
    # base and cap, failures that open a server's circuit, how long it stays open, and the age
    # at which a pending write-back makes /health report "degraded".
    worker_interval: float = 10.0
    worker_batch: int = 100
    write_back_backoff: float = 30.0
    write_back_backoff_cap: float = 3600.0
    circuit_failures: int = 5
    circuit_cooldown: float = 60.0
    write_back_stale_after: float = 900.0
    # Batch jobs on Celery (fhir_ai/jobs): the broker (``none``: no batch jobs, no Redis), the queue's name,
    # patients per task, how long Redis keeps a task a worker took before handing it to another worker if that
    # one died (seconds; a task should finish well within it), the wards rescored on a schedule (Group ids,
    # comma-separated) and how often (seconds); how long /health counts a Celery worker (or the beat
    # scheduler) as alive after its last heartbeat (seconds; each beats every quarter of it, at most every 15 s).
    broker_url: str = DEFAULT_BROKER
    job_queue: str = "fhir_ai"
    job_chunk_size: int = 10
    job_visibility_timeout: float = 600.0
    job_retention: float = 7 * 86400.0     # seconds a finished job's status and manifest stay (0: forever)
    wards: str = ""
    ward_interval: float = 900.0
    worker_stale_after: float = 60.0
    # Bulk Data export (fhir_ai/bulkdata.py): entries per write-back transaction Bundle, and the
    # longest time to wait for the hospital's server to finish an export (seconds).
    bulk_bundle_size: int = 100
    bulk_export_timeout: float = 21600.0
    # Subscriptions (rest-hook): "subscription-id=secret" pairs (comma-separated) that the hospital's
    # server sends as Authorization: Bearer <secret>; observations for one patient arriving within
    # rescore_debounce seconds cost one assessment.
    subscription_secrets: str = field(default="", repr=False)
    rescore_debounce: float = 60.0
    # Who may call the API (fhir_ai/auth): static bearer tokens as "client:role:sha256hex" entries
    # (comma-separated; `fhir-ai auth token` makes one), and/or JWTs (RS384/ES384) checked against
    # a JWKS (JSON text or a file path) or a JWKS URL, with allowed issuers (comma-separated), the
    # required audience and clock leeway in seconds.
    auth_tokens: str = field(default="", repr=False)
    auth_jwks: str = ""
    auth_jwks_url: str = ""
    auth_issuer: str = ""
    auth_audience: str = ""
    auth_leeway: float = 30.0
    database_url: str = ""                # default: sqlite file in instance_path
    instance_path: str = str(REPO_DIR / "instance")
    mappings_dir: str = str(DEFAULT_MAPPINGS)
    # How often (seconds) a worker process looks for a mapping reload done by another worker ($reload).
    reload_check_interval: float = 5.0
    models_dir: str = str(DEFAULT_MODELS)
    write_back: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # The largest request body accepted (bytes; larger ones get 413 before they are read): room for
    # an $assess Parameters or Bundle and a CDS Hooks call with its prefetch.
    max_request_bytes: int = 16 * 1024 * 1024
    # The base URL clients reach this server at (behind a proxy or load balancer): status URLs
    # (Content-Location), manifest and paging links. Empty: taken from each request's Host header.
    public_url: str = ""
    log_level: str = "INFO"
    # CDS Hooks (fhir_ai/cds): trusted EHRs as JSON text or a path to a JSON file,
    # {iss: {"jwks": {...} | "jwks_url": URL, "jku": [URLs allowed in the JWT header]}};
    # the public base URL the EHR calls (JWT aud, card links; default: the request's own);
    # card language when the request names none (en | ko); the time budget, in seconds, for all the
    # fhirServer fetches of one hook call together, retries and waits included (also the timeout for
    # fetching an issuer's JWKS); allowed fhirServer URL prefixes (comma-separated; empty: any).
    cds_issuers: str = ""
    cds_require_jwt: bool = True
    cds_jwt_leeway: float = 30.0
    cds_jwt_max_lifetime: float = 3600.0
    cds_public_url: str = ""
    cds_language: str = "en"
    cds_fetch_timeout: float = 5.0
    cds_fhir_servers: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.instance_path) / 'fhir_ai.sqlite3'}"

    @property
    def source_is_folder(self) -> bool:
        return not self.source_url.startswith(("http://", "https://"))

    @property
    def cds_fhir_server_list(self) -> list[str] | None:
        """The base URLs a CDS hook's ``fhirServer`` may be (or lie below), ``None`` for any (``*``).
        Unset: only the hospital server fhir_ai reads (``source_url``), none when that is a folder; an EHR's
        hook never makes fhir_ai call (and send its access token to) a host nobody configured."""
        listed = [p.strip() for p in self.cds_fhir_servers.split(",") if p.strip()]
        if "*" in listed:
            if len(listed) > 1:
                raise ConfigurationError(f"{ENV_PREFIX}CDS_FHIR_SERVERS: '*' (any server) cannot be combined with "
                                         "a list", expression="cds_fhir_servers")
            return None
        if listed:
            return listed
        return [] if self.source_is_folder else [self.source_url]

    @property
    def jobs_enabled(self) -> bool:
        """Whether this site runs batch jobs (Celery on the Redis at ``broker_url``): False for ``none``. Without
        them ``$assess``, push mode, CDS Hooks and write-back (``fhir-ai worker --delivery-only``) need no Redis;
        the batch kick-offs, the Subscription endpoint and the Celery worker are refused (fhir_ai.jobs.disabled).
        An empty value is refused rather than guessed at: unset means the default Redis, ``none`` no jobs. So is a
        value that is neither ``none`` nor a URL (``off``, ``false``, ``disabled``): Celery would take it for the
        name of a host, and every batch kick-off would answer 503 "try again later" for good."""
        value = self.broker_url.strip()
        if not value:
            raise ConfigurationError(f"{ENV_PREFIX}BROKER_URL is empty: set it to '{NO_BROKER}' to run without batch "
                                     f"jobs (no Redis) or to a redis:// URL, or leave it unset for {DEFAULT_BROKER}",
                                     expression="broker_url")
        if value.lower() == NO_BROKER:
            return False
        if "://" not in value:          # (the value itself is not repeated: it may be a secret put in by mistake)
            raise ConfigurationError(f"{ENV_PREFIX}BROKER_URL is neither '{NO_BROKER}' (no batch jobs, no Redis) nor a "
                                     f"URL such as {DEFAULT_BROKER}", expression="broker_url")
        scheme = value.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss"):
            # Celery would take amqp:// or sentinel://, but the worker heartbeats (/health), the Subscription
            # debouncer and the queue's health check talk to Redis itself at this URL: they would all fail.
            raise ConfigurationError(f"{ENV_PREFIX}BROKER_URL: a {scheme}:// broker is not supported; fhir_ai keeps "
                                     "its worker heartbeats and the Subscription debouncer in Redis beside the queue: "
                                     f"use a redis:// or rediss:// URL, or '{NO_BROKER}'", expression="broker_url")
        return True

    @property
    def ward_ids(self) -> list[str]:
        """The Group ids of ``wards``, rescored on a schedule."""
        return [w.strip() for w in self.wards.split(",") if w.strip()]

    @property
    def source_batch_mode(self) -> bool | None:
        """``source_batch`` as ServerSource takes it: True, False, or None for auto."""
        value = str(self.source_batch).strip().lower()
        if value == "auto":
            return None
        try:
            return _bool(value)
        except ValueError:
            raise ConfigurationError(f"{ENV_PREFIX}SOURCE_BATCH: {self.source_batch!r} is not auto, true or false",
                                     expression="source_batch") from None


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "extra"}
# Settings whose empty environment value is refused instead of taken as unset (the default): an operator who
# writes FHIR_AI_BROKER_URL= means "no broker", and would otherwise get the default Redis without a word.
_EMPTY_REFUSED = {"broker_url"}


def _coerce(name: str, raw: Any) -> Any:
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            return _bool(raw)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}: {exc}", expression=name) from exc
    return raw


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then ``FHIR_AI_*`` variables from ``environ`` (default: the process), then overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and (environ[key] != "" or name in _EMPTY_REFUSED):
            values[name] = _coerce(name, environ[key])
    for name, raw in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigurationError(f"unknown setting {name!r}", expression=name)
        values[name] = _coerce(name, raw) if isinstance(raw, str) else raw
    settings = Settings(**values)
    settings.source_batch_mode           # refuses a value that is not auto, true or false, at start-up
    settings.cds_fhir_server_list        # refuses '*' in a list, at start-up
    _check_numbers(settings)
    _check_jobs(settings)
    return settings


# Numeric settings that must be above 0 (a time-out, interval or window of 0 makes no sense, a batch of 0
# does nothing); every other number must be 0 or more. None may be NaN or infinite.
_ABOVE_ZERO = {"source_timeout", "worker_interval", "worker_batch", "circuit_failures", "write_back_stale_after",
               "job_chunk_size", "job_visibility_timeout", "ward_interval", "worker_stale_after",
               "bulk_bundle_size", "bulk_export_timeout", "max_request_bytes", "cds_jwt_max_lifetime",
               "cds_fetch_timeout"}


def _check_numbers(settings: Settings) -> None:
    """At start-up: a negative, NaN or infinite number (FHIR_AI_WORKER_STALE_AFTER=nan made /health degraded
    for good, and the workers beat every 0.25 s), or 0 where that makes no sense, is refused, naming the setting."""
    for name, field in _FIELDS.items():
        if not isinstance(field.default, (int, float)) or isinstance(field.default, bool):
            continue
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}: {value!r} is not a number", expression=name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name in _ABOVE_ZERO):
            raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}: {value!r} is not a "
                                     + ("number above 0" if name in _ABOVE_ZERO else "number of 0 or more"),
                                     expression=name)


def _check_jobs(settings: Settings) -> None:
    """At start-up: refuses an empty broker URL, and, without batch jobs, what only batch jobs would do (a ward
    schedule nobody would run; Subscription secrets for an endpoint that refuses every notification)."""
    if settings.jobs_enabled:
        return
    off = f"{ENV_PREFIX}BROKER_URL is {NO_BROKER!r} (no batch jobs)"
    if settings.ward_ids:
        raise ConfigurationError(f"{ENV_PREFIX}WARDS is set but {off}: scheduled ward rescoring runs as batch jobs; "
                                 f"unset {ENV_PREFIX}WARDS or configure a broker",
                                 expression=["wards", "broker_url"])
    if settings.subscription_secrets.strip():
        raise ConfigurationError(f"{ENV_PREFIX}SUBSCRIPTION_SECRETS is set but {off}: Subscription notifications "
                                 f"queue rescorings as batch jobs, so the endpoint refuses them; unset "
                                 f"{ENV_PREFIX}SUBSCRIPTION_SECRETS or configure a broker",
                                 expression=["subscription_secrets", "broker_url"])
