"""`fhir-ai worker`: a Celery worker on the configured queue, optionally with the beat scheduler inside."""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from ..config import Settings
from . import runtime
from .celery_app import configure

log = logging.getLogger(__name__)


def _load(**_: Any) -> None:
    # Load mappings and models when a pool process starts, not on its first task, and build the models'
    # TreeSHAP tables (≈0.6 s) then too. Not in the parent before the pool forks: loading LightGBM models
    # there left the forked pool processes hanging on their first task (seen in the concurrency test).
    runtime.pipeline().registry.warm()


def _close(**_: Any) -> None:
    runtime.close()


def run_worker(settings: Settings, *, beat: bool = True, concurrency: int | None = None, pool: str = "prefork",
               loglevel: str = "INFO") -> None:
    """Run until SIGTERM (warm shutdown: running tasks finish; unfinished ones go back to the queue)."""
    runtime.configure(settings)
    app = configure(settings)
    worker_process_init.connect(_load, weak=False)
    worker_process_shutdown.connect(_close, weak=False)
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={settings.job_queue}", f"--pool={pool}",
            f"--hostname=fhir_ai-{os.getpid()}@{socket.gethostname()}", "--without-gossip", "--without-mingle"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if beat:
        argv.append("--beat")
    log.info("Celery worker on queue %s (beat %s)", settings.job_queue, "on" if beat else "off")
    app.worker_main(argv)
