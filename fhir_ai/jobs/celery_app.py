"""The Celery app: Redis broker, late acknowledgement, one queue, and the beat schedule."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.schedules import schedule as every, schedstate

from ..config import Settings
from . import heartbeat

app = Celery("fhir_ai", include=["fhir_ai.jobs.tasks"])
app.steps["consumer"].add(heartbeat.WorkerHeartbeat)     # every worker of this app says it is alive (/health)
_configured: dict[str, Any] = {}


def wards(settings: Settings) -> list[str]:
    return settings.ward_ids


class on_slots(every):  # noqa: N801 - named like Celery's own schedules
    """Every ``run_every``, at the start of each wall-clock slot (epoch seconds // interval), not at
    an offset from when beat started: a ward job's asOf is its slot's start (the data up to the tick,
    not up to an interval before it), and a beat restarted within a slot still fires at the next
    boundary instead of a whole interval after the restart."""

    def _slot(self, moment: datetime) -> int:
        return int(moment.timestamp() // self.run_every.total_seconds())

    def _until_next(self, now: datetime) -> float:
        return (self._slot(now) + 1) * self.run_every.total_seconds() - now.timestamp()

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return timedelta(seconds=self._until_next(self.now()))

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.now()          # read once: a boundary between two readings would skip a slot
        due = self._slot(now) > self._slot(self.maybe_make_aware(last_run_at))
        # Beat checks again at the next boundary (it caps its own sleep at beat_max_loop_interval).
        return schedstate(due, max(0.05, self._until_next(now)))

    def __reduce__(self) -> Any:
        return self.__class__, (self.run_every, self.relative, self.nowfun)


def schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks: write-back delivery every worker_interval, each ward every ward_interval, resuming
    jobs whose tasks were lost, and forgetting finished jobs older than job_retention (checked hourly)."""
    # expires: a tick nobody ran in time is dropped, so a backlog never piles up while workers are down.
    entries: dict[str, dict[str, Any]] = {
        "deliver-write-backs": {"task": "fhir_ai.deliver_write_backs",
                                "schedule": timedelta(seconds=settings.worker_interval),
                                "options": {"expires": max(1.0, settings.worker_interval)}},
    }
    # Jobs whose tasks were lost are resumed (tasks.resume_jobs): looked for every quarter of their silence.
    entries["resume-jobs"] = {"task": "fhir_ai.resume_jobs",
                              "schedule": timedelta(seconds=max(15.0, settings.job_visibility_timeout / 2)),
                              "options": {"expires": max(15.0, settings.job_visibility_timeout / 2)}}
    if settings.job_retention > 0:
        entries["expire-jobs"] = {"task": "fhir_ai.expire_jobs",
                                  "schedule": timedelta(seconds=min(3600.0, settings.job_retention)),
                                  "options": {"expires": 60.0}}
    if wards(settings):
        entries["rescore-wards"] = {"task": "fhir_ai.rescore_wards",
                                    "schedule": on_slots(timedelta(seconds=max(1.0, settings.ward_interval))),
                                    "options": {"expires": max(1.0, settings.ward_interval)}}
    return entries


def transport_options(settings: Settings) -> dict[str, float]:
    """Redis transport options: when a task taken by a dead worker is handed to another one.

    kombu gives back an unacknowledged task once it is older than ``visibility_timeout``, but only
    when a live worker sweeps for such tasks: by default every ``unacked_restore_interval`` (10 s) ×
    ``unacked_restore_throttle`` (10) = 100 s, whatever the timeout. Sweep every quarter of the
    timeout (at most every 10 s, at least every second) on every call, so a killed worker's task
    comes back within about 1.25 × the timeout. The sweep's lock expires after the timeout (at most
    5 minutes), so a worker killed while sweeping does not stop the others for long.
    """
    timeout = max(1.0, settings.job_visibility_timeout)
    return {"visibility_timeout": timeout,
            "unacked_restore_interval": min(10.0, max(1.0, timeout / 4)),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": int(min(300.0, max(5.0, timeout)))}


def configure(settings: Settings) -> Celery:
    """Apply the settings to the app (idempotent; again only when they changed)."""
    key = (settings.broker_url, settings.job_queue, settings.job_visibility_timeout, settings.worker_interval,
           settings.wards, settings.ward_interval, settings.job_retention, settings.worker_stale_after)
    if _configured.get("key") == key:
        return app
    if _configured:
        # The app keeps the connection and producer pools of the broker it first used: let go of
        # them (kombu keeps one pool per broker URL, so going back to a URL finds its pool again).
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.update(
        broker_url=settings.broker_url,
        # Redis hands a task taken by a worker that died (never acknowledged) to another worker after this.
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.job_queue,
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True,                # job state lives in the store, not in a result backend
        # Acknowledge after the task ran, and give a task back when its worker process dies:
        # tasks are idempotent (deterministic assessment ids), so running one again is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A pool process loads the models and builds their explanation tables (≈2 s of CPU) before it
        # reports up; Celery kills one that has not reported within 4 s by default, which several
        # starting at once on a busy host can miss, and would then start and kill it again.
        worker_proc_alive_timeout=60.0,
        worker_hijack_root_logger=False,
        timezone="UTC", enable_utc=True,
        # Celery's in-memory scheduler (no schedule file to share or clean up) that records its heartbeat on
        # its ticks; it ticks at least once per heartbeat interval.
        beat_scheduler="fhir_ai.jobs.heartbeat:Scheduler",
        beat_max_loop_interval=heartbeat.interval(settings),
        beat_schedule=schedule(settings),
    )
    _configured["key"] = key
    return app
