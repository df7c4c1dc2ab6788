"""Health checks for load balancers and operators (no patient data)."""
from __future__ import annotations

import os
from typing import Any

import redis
from flask import Blueprint, current_app, jsonify
from sqlalchemy import select

from ..config import Settings
from ..delivery import summary
from ..fhir import times
from ..jobs.celery_app import wards
from ..jobs.tables import JobRow
from ..pipeline import Pipeline
from ..store.searching import utc

bp = Blueprint("health", __name__)

_queues: dict[tuple[int, str], redis.Redis] = {}


def queue_status(settings: Settings) -> dict[str, Any]:
    """Whether the job queue (Redis) answers: batch jobs, Subscriptions and scheduled rescoring need it;
    a single $assess does not. A short timeout: a load balancer is waiting."""
    key = (os.getpid(), settings.broker_url)
    try:
        if key not in _queues:
            _queues[key] = redis.Redis.from_url(settings.broker_url, socket_timeout=0.5,
                                                socket_connect_timeout=0.5)
        _queues[key].ping()
    except (redis.RedisError, OSError, ValueError) as exc:     # ValueError: not a redis:// URL
        return {"status": "unreachable", "reason": type(exc).__name__}
    return {"status": "ok"}


@bp.get("/health")
def health():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    # degraded when write-backs failed for good or have waited longer than write_back_stale_after,
    # or when the job queue cannot be reached (batch jobs and Subscriptions answer 503 meanwhile)
    write_back = summary(pipeline.store, pipeline.settings)
    queue = queue_status(pipeline.settings)
    status = write_back["status"] if queue["status"] == "ok" else "degraded"
    body = {"status": status,
            "models": {m.model_id: m.version for m in pipeline.registry.models.values()},
            "writeBack": write_back, "queue": queue}
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
