"""Health checks for load balancers and operators (no patient data)."""
from __future__ import annotations

import os
from typing import Any

import redis
from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import select

from ..config import Settings
from ..delivery import summary
from ..errors import FhirAiError
from ..fhir import times
from ..jobs import heartbeat
from ..jobs.celery_app import wards
from ..jobs.disabled import SETTING as JOBS_OFF
from ..jobs.tables import JobRow
from ..pipeline import Pipeline
from ..store.searching import utc

bp = Blueprint("health", __name__)

_queues: dict[tuple[int, str], redis.Redis] = {}


def _queue(settings: Settings) -> redis.Redis:
    """This process's client for the job queue, on short timeouts: a load balancer is waiting."""
    key = (os.getpid(), settings.broker_url)
    if key not in _queues:
        _queues[key] = redis.Redis.from_url(settings.broker_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return _queues[key]


def queue_status(settings: Settings) -> dict[str, Any]:
    """Whether the job queue (Redis) answers: batch jobs, Subscriptions and scheduled rescoring need it;
    a single $assess does not. A site without batch jobs has none, and it is not asked for."""
    if not settings.jobs_enabled:
        return {"status": "disabled", "message": f"this server runs no batch jobs ({JOBS_OFF}): the batch "
                                                 "kick-offs and the Subscription endpoint answer 501; write-backs "
                                                 "are delivered by `fhir-ai worker --delivery-only` (or --once)"}
    try:
        _queue(settings).ping()
    except (redis.RedisError, OSError, ValueError) as exc:     # ValueError: not a redis:// URL
        return {"status": "unreachable", "reason": type(exc).__name__}
    return {"status": "ok"}


def worker_status(settings: Settings, queue: dict[str, Any], *, names: bool = True) -> dict[str, dict[str, Any]]:
    """The Celery workers and beat schedulers seen within worker_stale_after (their heartbeats, in Redis);
    named only with ``names``. Not asked of a queue that did not answer its ping: /health waits for one
    timeout, not two."""
    if queue["status"] == "disabled":
        return {"worker": {"status": "disabled"}, "beat": {"status": "disabled"}}
    if queue["status"] != "ok":
        unknown = {"status": "unknown", "message": "the job queue (Redis) cannot be reached, so neither can the "
                                                   "heartbeats of the workers"}
        return {"worker": unknown, "beat": unknown}
    try:
        return heartbeat.read(_queue(settings), settings, names=names)
    except (redis.RedisError, OSError) as exc:
        unknown = {"status": "unknown", "reason": type(exc).__name__,
                   "message": "the job queue (Redis) did not answer when asked for the workers' heartbeats"}
        return {"worker": unknown, "beat": unknown}


def _operator() -> bool:
    """Whether the caller showed a valid admin token. /health needs none (load balancers), so it counts the
    workers and schedulers for anyone but names them (host, pid, queue) only to an operator: least privilege."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:
        who = current_app.extensions["fhir_ai_auth"].verify(token.strip())
    except FhirAiError:
        return False
    return who.role == "admin"


@bp.get("/health")
def health():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    # degraded when write-backs failed for good or have waited longer than write_back_stale_after, and, on a
    # site that runs batch jobs, when the job queue cannot be reached (batch jobs and Subscriptions answer 503
    # meanwhile), when no Celery worker has been seen within worker_stale_after (jobs would wait), or when no
    # beat scheduler has (write-back retries, the resumption of lost jobs, job expiry and any ward schedule
    # stop: celery_app.schedule). A site without batch jobs has no queue, workers or scheduler to miss.
    settings = pipeline.settings
    write_back = summary(pipeline.store, settings)
    queue = queue_status(settings)
    seen = worker_status(settings, queue, names=_operator())
    status = write_back["status"]
    if queue["status"] != "disabled" and (queue["status"] != "ok" or seen["worker"]["status"] != "ok"
                                          or seen["beat"]["status"] != "ok"):
        status = "degraded"
    body = {"status": status,
            "models": {m.model_id: m.version for m in pipeline.registry.models.values()},
            "writeBack": write_back, "queue": queue, "workers": seen["worker"], "scheduler": seen["beat"]}
    ward_jobs = latest_ward_jobs(pipeline)
    if ward_jobs:
        body["wards"] = ward_jobs
        if any(w["status"] == "failed" for w in ward_jobs):
            body["status"] = "degraded"        # a scheduled rescoring that fails every interval is not healthy
    return jsonify(body), 200


def latest_ward_jobs(pipeline: Pipeline) -> list[dict[str, Any]]:
    """Each configured ward's latest scheduled job: its state, as-of time and, if it failed, the status it
    failed with (the reason is on its status URL). A ward no job was started for yet says so."""
    out = []
    with pipeline.store.session() as session:
        for ward in wards(pipeline.settings):
            job = session.scalars(select(JobRow).where(JobRow.kind == "ward", JobRow.scope == ward)
                                  .order_by(JobRow.created_at.desc()).limit(1)).first()
            entry: dict[str, Any] = {"ward": ward, "status": job.status if job else "not started yet"}
            if job is not None:
                entry.update(job=job.id, asOf=times.format_datetime(utc(job.as_of)))
                if job.status == "failed":
                    entry["errorStatus"] = job.error_status
            out.append(entry)
    return out
