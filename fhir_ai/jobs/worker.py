"""`fhir-ai worker`: a Celery worker on the configured queue, optionally with the beat scheduler inside."""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from ..config import Settings
from ..errors import ConfigurationError
from ..fhir.ids import usable_id
from . import runtime
from .celery_app import configure, wards
from .disabled import SETTING as JOBS_OFF

log = logging.getLogger(__name__)


def _load(**_: Any) -> None:
    # Load mappings and models when a pool process starts, not on its first task; their TreeSHAP tables
    # come from the parent (_build_tables), or are built here if it could not build them.
    runtime.pipeline().registry.warm()


def _build_tables(settings: Settings) -> None:
    """Build the models' TreeSHAP tables once in the parent, before the pool forks: they land in the
    per-process cache (keyed by model file), so every pool process finds them there instead of building
    its own (≈0.65 s and ≈24 MB each). Models are parsed on one OpenMP thread (registry.
    lightgbm_on_one_thread), so the fork leaves no OpenMP pool behind for the pool processes to hang on."""
    from ..mapping import load_directory
    from ..models.registry import ModelRegistry
    try:
        ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir)).warm()
    except Exception:               # the pool processes load (and report) for themselves
        log.exception("could not build the explanation tables before starting the pool")


def _close(**_: Any) -> None:
    runtime.close()


def ward_problems(settings: Settings) -> list[str]:
    """What an operator should fix in the ward schedule before it runs (said when the beat starts): ward ids
    that are no FHIR ids (each slot's job would fail), no FHIR_AI_PUBLIC_URL (the manifests' request would be
    a bare path)."""
    configured = wards(settings)
    problems = [f"FHIR_AI_WARDS entry {ward!r} is not a FHIR Group id; its job fails every "
                f"{settings.ward_interval:g} s" for ward in configured
                if not usable_id(ward)]
    if configured and not settings.public_url:
        problems.append("FHIR_AI_PUBLIC_URL is unset: a scheduled ward job's manifest names its request as a bare "
                        "path (/Group/<id>/$assess)")
    return problems


def run_worker(settings: Settings, *, beat: bool = True, concurrency: int | None = None, pool: str = "prefork",
               loglevel: str = "INFO") -> None:
    """Run until SIGTERM (warm shutdown: running tasks finish; unfinished ones go back to the queue). Refused at
    once on a site without batch jobs: there is no queue to consume, and write-backs have their own loop."""
    if not settings.jobs_enabled:
        raise ConfigurationError(f"this site runs no batch jobs ({JOBS_OFF}), so there is no Celery worker to run: "
                                 "deliver write-backs with `fhir-ai worker --delivery-only` (a loop, without Redis) "
                                 "or `fhir-ai worker --once` (one pass, e.g. from cron)", expression="broker_url")
    runtime.configure(settings)
    app = configure(settings)
    if pool == "prefork":
        _build_tables(settings)
    worker_process_init.connect(_load, weak=False)
    worker_process_shutdown.connect(_close, weak=False)
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={settings.job_queue}", f"--pool={pool}",
            f"--hostname=fhir_ai-{os.getpid()}@{socket.gethostname()}", "--without-gossip", "--without-mingle"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if beat:
        argv.append("--beat")
        for problem in ward_problems(settings):
            log.warning("ward schedule: %s", problem)
    log.info("Celery worker on queue %s (beat %s)", settings.job_queue, "on" if beat else "off")
    app.worker_main(argv)
