"""POST /subscriptions/notify: the rest-hook endpoint for R4 backport Subscription notifications."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app, request
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from .. import subscriptions
from ..auth.policy import authenticates_itself
from ..errors import Unauthorized
from ..fhir.times import format_datetime
from ..jobs import runtime
from ..jobs.celery_app import configure as configure_celery
from ..jobs.disabled import require as require_jobs
from ..jobs.tasks import QueueUnavailable, rescore_patient
from ..pipeline import Pipeline
from .fhir_io import fhir_response, read_body

log = logging.getLogger(__name__)

bp = authenticates_itself(Blueprint("subscriptions", __name__))
SECRET_HEADER = "X-Subscription-Secret"


def _presented() -> str | None:
    """The secret the hospital's server sent: Subscription.channel.header 'Authorization: Bearer …' (or ours)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get(SECRET_HEADER)


@bp.post("/subscriptions/notify")
def notify():  # type: ignore[no-untyped-def]
    settings = current_app.config["FHIR_AI"]
    # Without batch jobs there is no endpoint to authenticate against (no secrets can be configured, config.py):
    # said before any secret is compared or the body read, and, like a disabled endpoint, not audited.
    require_jobs(settings, "the Subscription notification endpoint (/subscriptions/notify)")
    presented = _presented()
    try:
        subscriptions.screen(settings, presented)         # a stranger's body is never read
        notification = subscriptions.parse_notification(read_body("Bundle"))
        subscriptions.authenticate(settings, notification.subscription, presented)
    except Unauthorized as exc:
        _denied(exc)
        raise
    from ..auth.guard import set_actor   # not at import time: fhir_ai.auth imports the api package
    set_actor(f"subscription/{notification.subscription}", "system")
    if notification.type == "handshake":                # a new (or re-created) subscription: numbering restarts
        try:
            subscriptions.event_log(settings).restart(notification, datetime.now(timezone.utc))
        except RedisError as exc:
            raise QueueUnavailable("the job queue (Redis) is unavailable; try again later") from exc
    if notification.type not in ("event-notification", "heartbeat"):
        log.info("Subscription/%s: %s", notification.subscription, notification.type)
        return _answer(f"{notification.type} received")
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    configure_celery(settings)
    runtime.configure(settings, pipeline)
    window = settings.rescore_debounce
    requested_by = f"subscription/{notification.subscription}"     # the assessment's AuditEvent names it

    def enqueue(patient_id: str) -> None:
        # The countdown lets the rest of a burst arrive first; the debounce key stops repeats meanwhile.
        try:
            rescore_patient.apply_async((patient_id, requested_by), countdown=window, retry=True,
                                        retry_policy={"max_retries": 2, "interval_start": 0.2})
        except (KombuError, RedisError, OSError) as exc:  # the hospital's server will send it again
            raise QueueUnavailable("the job queue (Redis) is unavailable; try again later") from exc

    codes = pipeline.registry.get("deterioration")[1].query_codes() if "deterioration" in pipeline.registry.models \
        else []
    try:
        outcome = subscriptions.handle(notification, source=pipeline.source, codes=codes,
                                       debounce=subscriptions.debouncer(settings), enqueue=enqueue,
                                       events=subscriptions.event_log(settings))
    except RedisError as exc:  # Redis (the debounce keys) is down: the hospital's server will retry
        raise QueueUnavailable("the job queue (Redis) is unavailable; try again later") from exc
    text = (f"{notification.type}: {outcome.events} event(s): rescoring queued for {len(outcome.queued)} "
            f"patient(s), {len(outcome.debounced)} already queued, {outcome.ignored} ignored")
    if outcome.gone:
        text += f" ({outcome.gone} whose focus was not found at the hospital's server, 404/410)"
    if outcome.unreadable_source:
        text += (f" ({outcome.unreadable_source} id-only event(s) not read: the configured source is a folder, which "
                 "cannot read one resource; send full-resource notifications or configure the hospital's server)")
    if outcome.unread:    # the event log counted them as missed: a catch-up search is owed until one succeeds
        text += (f"; {outcome.unread} event(s) whose focus could not be read ({outcome.unread_reason}): "
                 "left to the catch-up search for missed events, owed until one succeeds")
    if outcome.restarted:
        text += ("; event numbers restarted without a handshake (the subscription re-created?): numbered from "
                 "here on, and what changed since the last notification before it is caught up")
    if outcome.missed:
        text += (f"; {outcome.missed} event(s) missed or sent without their focus: " + (
            f"catch-up search failed ({outcome.recovery_failed})"
            + (", tried again with the next notification" if outcome.recovery_retried else "")
            if outcome.recovery_failed else
            f"catch-up search found {len(outcome.recovered)} patient(s) with changed vital signs"
            + (f" in as many pages as one search may read; the rest is owed, continued from "
               f"{format_datetime(outcome.recovery_resumes)} with the next notification"
               if outcome.recovery_resumes else "")
            + (f"; given up on: {outcome.recovery_skipped}" if outcome.recovery_skipped else "")))
    return _answer(text)


def _denied(exc: Unauthorized) -> None:
    """Audited like the API's other 401s: an anonymous caller's refused ``create``, with the reason
    (never the secret presented)."""
    from ..auth.guard import refused     # not at import time: fhir_ai.auth imports the api package
    refused(exc, "create")


def _answer(text: str) -> Any:
    return fhir_response({"resourceType": "OperationOutcome",
                          "issue": [{"severity": "information", "code": "informational", "diagnostics": text}]})
