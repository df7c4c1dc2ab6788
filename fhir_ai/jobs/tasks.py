"""Celery tasks: expand a job into patients, assess them in chunks, deliver write-backs, rescore wards.

Every task is acknowledged late and safe to run twice: a patient already recorded is skipped, and
assessing one again stores nothing new (its RiskAssessment id is a hash of its inputs).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from kombu.exceptions import ChannelError, KombuError, OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, OperationalError as DatabaseUnavailable

from ..assessment import is_not_applicable, not_assessed_reason
from ..errors import FhirAiError, UpstreamError
from ..store import actors
from ..store.actors import Actor
from . import members, runtime
from .celery_app import app, wards
from .state import FINAL, JobStore

log = logging.getLogger(__name__)

# A database that is briefly away (restart, failover) is worth waiting for; anything else is a bug.
RETRY = {"autoretry_for": (DatabaseUnavailable,), "retry_backoff": 2, "retry_backoff_max": 60,
         "max_retries": 8}


class QueueUnavailable(FhirAiError):
    """The job queue (Redis) cannot be reached; the job was not started (it is listed as failed, 503).
    Retry-After steers a caller's, and a hospital's notification redelivery, next attempt."""
    status = 503
    code = "transient"
    retry_after_seconds = 30


def new_job_id() -> str:
    return uuid.uuid4().hex


def submit(jobs: JobStore, *, kind: str, scope: str, as_of: datetime, request: dict[str, Any],
           actor: Actor | None = None, job_id: str | None = None, owner: str | None = None) -> tuple[str, bool]:
    """Store a queued job and queue its expansion; (job id, False if that id already existed).

    ``owner``: whose job it is (``JobRow.requested_by``, compared exactly by the API: how the caller
    authenticated and who it is, fhir_ai.api.jobs._owner_key); the actor's client id by default. The
    client id the audit trail names stays in the request (``client``)."""
    actor = actor or actors.current()
    job_id = job_id or new_job_id()
    created = jobs.create(job_id, kind=kind, scope=scope, as_of=as_of,
                          request={**request, "client": actor.client_id,
                                   **({"issuer": actor.issuer} if actor.issuer else {})},
                          requested_by=owner or actor.client_id, requested_role=actor.role)
    if not created:
        return job_id, False
    try:
        expand_job.apply_async((job_id,), retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
    except (KombuError, KombuOperationalError, RedisError, OSError) as exc:
        jobs.fail(job_id, "the job queue is unavailable", 503)
        log.error("job %s: could not queue it (%s)", job_id, type(exc).__name__)
        raise QueueUnavailable("the job queue (Redis) is unavailable; try again later") from exc
    log.info("job %s queued (%s)", job_id, kind)
    return job_id, True


# A patient's outcome for each requested model, in job_item.status: the outcome itself for a one-model
# job ("assessed", "insufficient", "not-applicable", "failed"), else "=" and one letter per model in the
# order asked ("=na": the first model not applicable, the second assessed). Counting the rows by status
# (one GROUP BY) then counts patients per model, as bulk-assess does, with no JSON read and no migration
# (String(16): at most MAX_MODELS models in one job). Rows written before hold one outcome per patient.
LETTERS = {"assessed": "a", "insufficient": "i", "not-applicable": "n", "failed": "f", "withdrawn": "w"}
OUTCOME_OF = {letter: outcome for outcome, letter in LETTERS.items()}
MAX_MODELS = 15


def assessment_status(resource: dict[str, Any]) -> str:
    """One RiskAssessment's outcome: ``assessed``, or, when it was cancelled, why: ``not-applicable``
    (the model is not for this visit, mapping ``scoring.encounter_classes``) or ``insufficient`` (too
    little data; also a cancelled NEWS2). The reason is the one the assessment itself gives in its note
    ("Not assessed: not applicable. …", models.scoring). ``withdrawn``: the same data's assessment was
    withdrawn as entered in error, and it is what the job got back (no current risk)."""
    if resource.get("status") == "entered-in-error":
        return "withdrawn"
    if resource.get("status") != "cancelled":
        return "assessed"
    return "not-applicable" if is_not_applicable(not_assessed_reason(resource)) else "insufficient"


def job_models(request: dict[str, Any]) -> list[str]:
    """The models a job asked for, each once; none asked: the pipeline's default, one model."""
    return list(dict.fromkeys(request.get("models") or []))


def model_outcomes(models: list[str], resources: list[dict[str, Any]]) -> list[str]:
    """Each requested model's outcome, read from that model's own RiskAssessment (its method code); the
    NEWS2 companion is not a model asked for and is not counted (as in bulk-assess). No model named:
    the pipeline's default model, whose RiskAssessment comes first. A model without its assessment is a
    bug (KeyError: the patient fails by the kind of error)."""
    if not models:
        return [assessment_status(resources[0])]
    mine = {resource["method"]["coding"][0]["code"]: resource for resource in reversed(resources)}
    return [assessment_status(mine[model]) for model in models]


def patient_status(outcomes: list[str]) -> str:
    """job_item.status for a patient's outcomes, one per model (see LETTERS)."""
    if len(outcomes) == 1:
        return outcomes[0]
    return "=" + "".join(LETTERS[outcome] for outcome in outcomes)


def outcomes(status: str) -> list[str]:
    """The outcomes a job_item.status holds, one per model (none while pending)."""
    if status.startswith("="):
        return [OUTCOME_OF[letter] for letter in status[1:]]
    return [] if status == "pending" else [status]


@contextmanager
def _acting_for(client_id: str, role: str, *, owner: str, issuer: str | None = None) -> Iterator[None]:
    """Store under the name of whoever asked for the job (its client id and, for a JWT client, its issuer),
    so the audit trail says who. fhir_ai itself only when the job is its own (``owner``, the job's
    requested_by, is its bare name): a client's owner key says how it authenticated, so a JWT client that
    calls itself 'fhir-ai' stays a client."""
    kind = "local" if owner == actors.LOCAL.client_id else "client"
    token = actors.set_current(Actor(client_id, role, None, kind, issuer if kind == "client" else None))
    try:
        yield
    finally:
        actors.reset(token)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start:start + size]


MAX_ATTEMPTS = 3     # claims of one patient abandoned (its worker process died while assessing it) before it fails


def claim_lease(settings: Any) -> float:
    """How long a claim on a patient holds: well past any one assessment, and run out by the time Redis
    hands a dead worker's chunk to another worker (the visibility timeout)."""
    return max(60.0, settings.job_visibility_timeout / 2)


def silence(settings: Any) -> float:
    """How long a job may show no progress before resume_jobs takes it for one whose tasks were lost."""
    return 2 * max(60.0, settings.job_visibility_timeout)


@app.task(name="fhir_ai.expand_job", bind=True, **RETRY)
def expand_job(self: Any, job_id: str) -> int:
    """Find the job's patients (once), then queue a chunk task for each group of pending ones."""
    jobs = runtime.jobs()
    job = jobs.get(job_id)
    if job is None or job.status in FINAL or not jobs.start(job_id):
        return 0
    if job.total is None:
        source = runtime.pipeline().source
        try:
            patients = (members.active_patients(source) if job.kind == "all"
                        else members.group_members(source, job.scope))
        except UpstreamError as exc:
            if exc.temporary and self.request.retries < 5:
                raise self.retry(countdown=min(300, 10 * 2 ** self.request.retries), exc=exc)
            jobs.fail(job_id, exc.message, exc.status)
            return 0
        except FhirAiError as exc:
            jobs.fail(job_id, exc.message, exc.status)
            return 0
        except DatabaseUnavailable:
            raise                               # tried again (RETRY), then by resume_jobs
        except Exception as exc:   # noqa: BLE001 - a bug or data nobody foresaw must not leave the job running
            jobs.fail(job_id, f"internal error ({type(exc).__name__}) while finding the job's patients", 500)
            log.error("job %s: finding its patients failed: unexpected %s at\n%s", job_id, type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)))
            return 0
        jobs.expand(job_id, patients)
    pending = jobs.pending(job_id)
    if not pending:
        jobs.finish_if_done(job_id)
        return 0
    size = runtime.settings().job_chunk_size
    for chunk in _chunks(pending, size):
        assess_chunk.apply_async((job_id, chunk))
    log.info("job %s: %d patient(s) pending in chunks of %d", job_id, len(pending), size)
    return len(pending)


@app.task(name="fhir_ai.assess_chunk", bind=True, **RETRY)
def assess_chunk(self: Any, job_id: str, patient_ids: list[str]) -> int:
    """Assess each still-pending patient of the chunk; stop early when the job was cancelled."""
    jobs = runtime.jobs()
    job = jobs.get(job_id)
    if job is None or job.status != "running":
        return 0
    pipeline = runtime.pipeline()
    request = job.request
    models = job_models(request)
    failed = patient_status(["failed"] * max(1, len(models)))       # a patient not assessed: by every model
    lease = claim_lease(runtime.settings())
    holder = f"{self.request.id or 'direct'}:{uuid.uuid4().hex[:12]}"      # this execution, no other
    held_elsewhere: list[str] = []
    assessed = 0
    # Jobs started before owners were keyed by how the caller authenticated have no "client".
    issuer = request.get("issuer")
    with _acting_for(request.get("client") or job.requested_by, job.requested_role, owner=job.requested_by,
                     issuer=issuer if isinstance(issuer, str) else None):
        for patient_id in patient_ids:
            if jobs.status(job_id) != "running":
                log.info("job %s: %s; chunk stopped", job_id, jobs.status(job_id))
                return assessed
            abandoned = jobs.claim(job_id, patient_id, lease=lease, holder=holder)
            if abandoned is None:
                # Done before this task was redelivered, or held: another copy may be on it, or a worker
                # that died held it (looked at again below, once its claim has run out).
                held_elsewhere.append(patient_id)
                continue
            if abandoned >= MAX_ATTEMPTS:
                # Claimed that often and never recorded: each time its worker process died (out of memory,
                # a crash in native code). Given up, so that it does not take down worker after worker.
                jobs.record(job_id, patient_id, failed, error=f"not assessed: the worker stopped while assessing "
                            f"this patient, {abandoned} times")
                log.error("job %s: patient %s given up after %d attempts that stopped the worker", job_id,
                          patient_id, abandoned)
                continue
            try:
                result = pipeline.assess(patient_id, models=models or None, as_of=job.as_of,
                                         write_back=request.get("writeBack"))
                status = patient_status(model_outcomes(models, result.resources))
            except FhirAiError as exc:
                # The client already retried temporary faults; record the patient as failed, go on.
                jobs.record(job_id, patient_id, failed, error=exc.message)
                log.warning("job %s: patient %s not assessed (%s)", job_id, patient_id, type(exc).__name__)
                continue
            except DatabaseUnavailable:
                _let_go(jobs, job_id, patient_id, holder)
                raise           # the whole chunk is tried again (RETRY): the store is away, not the patient
            except Exception as exc:   # noqa: BLE001 - one patient must not leave the job running forever
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    # A lost database connection, however it surfaced: the chunk is tried again (RETRY).
                    _let_go(jobs, job_id, patient_id, holder)
                    raise DatabaseUnavailable(exc.statement, exc.params, exc.orig,
                                              connection_invalidated=True) from exc
                # A bug or data nobody foresaw: the patient fails, the others go on. Only the kind of
                # error is kept, and logged with where it happened, never its text (it may quote patient data).
                jobs.record(job_id, patient_id, failed, error=f"internal error ({type(exc).__name__})")
                log.error("job %s: patient %s not assessed: unexpected %s at\n%s", job_id, patient_id,
                          type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
                continue
            # Each RiskAssessment with its own outcome: the manifest labels each by it.
            jobs.record(job_id, patient_id, status, [{"reference": f"RiskAssessment/{r['id']}",
                                                      "model": r["method"]["coding"][0]["code"],
                                                      "status": assessment_status(r)} for r in result.resources])
            assessed += 1
    until, still_held = jobs.held(job_id, held_elsewhere)
    if still_held and not self.request.is_eager:      # (run eagerly, a countdown would not wait)
        # Still pending under another claim: looked at again once it has run out (a copy that is alive has
        # recorded them by then; a dead worker's patient is assessed then, its abandoned claim counted).
        wait = max(1.0, (until - datetime.now(timezone.utc)).total_seconds() + 1.0)
        assess_chunk.apply_async((job_id, still_held), countdown=wait)
    jobs.finish_if_done(job_id)
    return assessed


def _let_go(jobs: JobStore, job_id: str, patient_id: str, holder: str) -> None:
    """Release a claim when the store fails mid-assessment (not an abandoned claim); if the store is too far
    gone for that, the claim runs out and the patient is tried again then."""
    try:
        jobs.release(job_id, patient_id, holder)
    except DBAPIError:
        log.info("job %s: a claim could not be let go (the store is away); it runs out by itself", job_id)


_delivery: dict[int, Any] = {}
_delivery_lock = threading.Lock()


@app.task(name="fhir_ai.deliver_write_backs", ignore_result=True)
def deliver_write_backs() -> dict[str, int]:
    """One pass of the write-back worker (fhir_ai.delivery); its circuits live in this process.

    One pass at a time per process: under ``--pool=threads`` a tick that arrives while the last one is
    still delivering is skipped (``skipped``: 1) rather than run beside it on the same circuits, which
    are not locked; the running pass delivers what the skipped one would have.
    """
    from ..delivery import PassReport, Worker
    if not _delivery_lock.acquire(blocking=False):
        log.info("write-back delivery: the previous pass in this process is still running; tick skipped")
        return _pass_summary(PassReport(), skipped=1)
    try:
        pid = os.getpid()
        if pid not in _delivery:
            _delivery.clear()
            _delivery[pid] = Worker(runtime.settings(), runtime.pipeline().store)
        report = _delivery[pid].run_once()
    finally:
        _delivery_lock.release()
    return _pass_summary(report)


def _pass_summary(report: Any, skipped: int = 0) -> dict[str, int]:
    return {"claimed": report.claimed, "delivered": report.delivered, "retryLater": report.retry_later,
            "failed": report.failed, "deferred": report.deferred, "skipped": skipped}


def ward_job_id(ward: str, slot: int) -> str:
    """The same ward in the same time slot is one job, however many schedulers fire."""
    return "ward-" + hashlib.sha256(f"{ward}|{slot}".encode()).hexdigest()[:32]


@app.task(name="fhir_ai.rescore_wards", bind=True, ignore_result=True)
def rescore_wards(self: Any, now: float | None = None) -> list[str]:
    """Start a rescoring job for each configured ward, as of the start of the slot the tick was sent in.

    The slot is read from the scheduler's clock, not this worker's: beat sends each tick just after a slot
    starts with ``expires`` one interval later (celery_app.schedule), so the tick's send time is its expiry
    less the interval. A worker whose clock is a little behind would otherwise take the tick for the slot
    before (whose job exists: the ward would go unscored), and one that ran it late for the slot after."""
    settings = runtime.settings()
    interval = max(1.0, settings.ward_interval)
    stamp = now if now is not None else _sent_at(self.request.expires, interval)
    slot = int(stamp // interval)
    as_of = datetime.fromtimestamp(slot * interval, timezone.utc)
    started = []
    for ward in wards(settings):
        job_id, created = submit(runtime.jobs(), kind="ward", scope=ward, as_of=as_of,
                                 # the URL a client would have asked (a scheduled job has no request of its own)
                                 request={"request": f"{settings.public_url.rstrip('/')}/Group/{ward}/$assess",
                                          "scheduled": True, "models": []},
                                 actor=actors.LOCAL, job_id=ward_job_id(ward, slot))
        if created:
            started.append(job_id)
    return started


@app.task(name="fhir_ai.resume_jobs", ignore_result=True)
def resume_jobs() -> list[str]:
    """Jobs whose tasks were lost (the queue emptied by a Redis restart, a task that gave up on a database
    away for long): no progress for ``silence`` seconds while queued or running, and nothing waiting in the
    queue (a job queued behind others is silent, not lost). Their patients are found again or their
    unclaimed pending patients queued again (claims keep a copy from assessing anyone twice); a job with
    none left is finished."""
    settings = runtime.settings()
    jobs = runtime.jobs()
    resumed: list[str] = []
    backlog = _queue_waiting(settings)
    if backlog != 0:
        # Work still waiting in the queue (a job's chunks may be among it: silent, not lost), or Redis away
        # (nothing could be queued): looked at again next time.
        if backlog:
            log.info("resume_jobs: %d task(s) waiting in the queue; silent jobs are not resumed meanwhile",
                     backlog)
        return resumed
    silent_since = datetime.now(timezone.utc) - timedelta(seconds=silence(settings))
    for job_id, expanded, waiting in jobs.stalled(silent_since):
        jobs.touch(job_id)
        if not expanded:
            expand_job.apply_async((job_id,))
        elif waiting:
            for chunk in _chunks(waiting, settings.job_chunk_size):
                assess_chunk.apply_async((job_id, chunk))
        elif not jobs.finish_if_done(job_id):
            continue                            # every pending patient is claimed: a worker is on them
        log.warning("job %s: no progress for %.0f s; resumed (%d patient(s) queued again)", job_id,
                    silence(settings), len(waiting))
        resumed.append(job_id)
    return resumed


def _sent_at(expires: Any, interval: float) -> float:
    """When beat sent a tick whose ``expires`` (an ISO 8601 text in the message) is one interval after;
    this worker's clock for a tick without one (run by hand)."""
    try:
        when = datetime.fromisoformat(str(expires)) if expires else None
    except ValueError:
        when = None
    if when is None:
        return datetime.now(timezone.utc).timestamp()
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp() - interval


def _queue_waiting(settings: Any) -> int | None:
    """Messages waiting in the job queue, as the broker counts them (kombu sums Redis' priority lists);
    None when the broker does not answer."""
    try:
        with app.connection_for_read(settings.broker_url) as connection:
            return connection.default_channel.queue_declare(queue=settings.job_queue, passive=True).message_count
    except ChannelError:
        return 0                                # no such queue: kombu drops an emptied Redis list
    except (KombuError, RedisError, OSError):
        return None


@app.task(name="fhir_ai.expire_jobs", ignore_result=True)
def expire_jobs() -> int:
    """Forget finished jobs older than the retention (their assessments and audit trail stay)."""
    return runtime.jobs().expire_after(runtime.settings().job_retention)


# The hospital's server briefly away (restart, overload): a rescoring waits for it, about 20 minutes in
# all. A wait stays under half the visibility timeout: a task waiting longer would be handed to a second
# worker meanwhile.
RESCORE_RETRIES = 8
RESCORE_BACKOFF_MAX = 300.0


@app.task(name="fhir_ai.rescore_patient", bind=True, **RETRY)
def rescore_patient(self: Any, patient_id: str, requested_by: str = "subscription") -> list[str]:
    """Event-driven rescoring (Subscriptions): one patient, as of now, after the debounce window.

    A temporary fault of the hospital's server (the client's own retries spent) is tried again later,
    with growing waits (Retry-After when the server gave one), never dropped while it may still pass."""
    from ..subscriptions import debouncer
    settings = runtime.settings()
    # Release first: an observation arriving while we assess deserves an assessment of its own.
    debouncer(settings).release(patient_id)
    try:
        with _acting_for(requested_by, "system", owner=requested_by):
            result = runtime.pipeline().assess(patient_id)
    except UpstreamError as exc:
        if not exc.temporary or self.request.retries >= RESCORE_RETRIES:
            log.error("rescoring of patient %s given up: %s", patient_id, type(exc).__name__)
            raise
        longest = min(RESCORE_BACKOFF_MAX, max(1.0, settings.job_visibility_timeout / 2))
        wait = min(longest, exc.retry_after or 10.0 * 2 ** self.request.retries)
        log.warning("rescoring of patient %s: the hospital's server failed (%s); again in %.0f s",
                    patient_id, type(exc).__name__, wait)
        raise self.retry(exc=exc, countdown=wait, max_retries=RESCORE_RETRIES)
    log.info("rescored patient %s after new observations", patient_id)
    return [r["id"] for r in result.resources]
