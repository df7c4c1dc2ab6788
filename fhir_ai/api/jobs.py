"""Batch assessment in the FHIR asynchronous request pattern: kick-off 202, status URL, manifest, DELETE,
and the list of a caller's jobs."""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import orjson
from flask import Blueprint, current_app, request

from .. import codes
from ..auth.guard import not_audited, note_entities, principal
from ..auth.tokens import Principal
from ..auth.policy import requires
from ..errors import BadRequest, FhirAiError, NotFound
from ..fhir import times
from ..jobs import runtime
from ..jobs.celery_app import configure as configure_celery
from ..jobs.disabled import JobsDisabled, SETTING as JOBS_OFF, require as require_jobs
from ..jobs.state import JobStore, JobView
from ..jobs.tasks import MAX_MODELS, job_models, outcomes, submit
from ..pipeline import Pipeline
from ..search.params import DEFAULT_COUNT, MAX_COUNT, whole_number_param
from ..store import actors
from ..store.actors import Actor
from ..store.audit import Entity
from ..store.searching import utc
from .fhir_io import base_url, check_accept, check_id, fhir_response, lenient, preferences, read_body
from .metadata import assess_parameters
from .operations import parse_parameters

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__)

GROUP_DEFINITION = f"{codes.BASE}/OperationDefinition/group-assess"
ALL_DEFINITION = f"{codes.BASE}/OperationDefinition/assess-all"
POLL_SECONDS = 3
MAX_AUDITED_PATIENTS = 200     # a manifest read names its patients in the AuditEvent up to this many
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)


class AsyncRequired(BadRequest):
    """A batch kick-off without ``Prefer: respond-async``: these operations have no synchronous answer."""
    code = "required"


def _failure_code(status: int) -> str:
    """The OperationOutcome issue code of a job that failed with this status."""
    return "not-found" if status == 404 else "transient" if status in (502, 503, 504) else "exception"


class JobFailed(FhirAiError):
    """A job ended in error; the status URL answers with the error's own status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = _failure_code(status)


def _pipeline() -> Pipeline:
    return current_app.extensions["fhir_ai"]


def _jobs() -> JobStore:
    pipeline = _pipeline()
    settings = current_app.config["FHIR_AI"]
    if settings.jobs_enabled:                  # without batch jobs, only the store: Bulk Data runs, past jobs
        configure_celery(settings)
        runtime.configure(settings, pipeline)     # eager runs (tests) use this app's pipeline
    return JobStore(pipeline.store)


def _wants_async() -> bool:
    """``Prefer: respond-async`` among the request's preferences (fhir_io.preferences)."""
    return "respond-async" in preferences()


def _kick_off(kind: str, scope: str, line: str) -> Any:
    check_accept(request)
    if not _wants_async():
        # FHIR asynchronous request pattern (R4 async.html, as Bulk Data's kick-off): the client asks
        # for it with Prefer: respond-async. Without it a client expects a synchronous answer, which
        # a ward or the whole hospital cannot have: say so instead of answering 202 it did not ask for.
        raise AsyncRequired("this operation runs asynchronously only: send the header 'Prefer: respond-async' "
                            "(the answer is 202 with Content-Location, the job's status URL)",
                            header="Prefer")
    params = parse_parameters(read_body("Parameters", optional=True), strict=not lenient())
    if params.encounter:
        raise BadRequest("encounter cannot be given for a batch of patients",
                         expression="Parameters.parameter.where(name='encounter')")
    pipeline = _pipeline()
    for model_id in params.models:
        pipeline.registry.get(model_id)       # unknown model → 400 now, not in the worker
    if len(job_models({"models": params.models})) > MAX_MODELS:     # job_item.status holds one letter each
        raise BadRequest(f"a job assesses at most {MAX_MODELS} models",
                         expression="Parameters.parameter.where(name='model')")
    as_of = params.as_of or times_now()
    job_id, _ = submit(_jobs(), kind=kind, scope=scope, as_of=as_of, owner=_owner_key(actors.current(), principal()),
                       request={"request": line, "models": params.models, "writeBack": params.write_back})
    location = f"{base_url()}/jobs/{job_id}"
    outcome = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "diagnostics": f"accepted; poll {location} for progress and the result"}]}
    return fhir_response(outcome, 202, {"Content-Location": location})


# The kinds of job that run on Celery (a Bulk Data run, ``bulk-export``, runs in its own `fhir-ai` command).
CELERY_KINDS = ("group", "all", "ward")
UNCLAIMED_SECONDS = 30


def _stranded(job: JobView) -> bool:
    """A Celery job still queued or running on a server that now runs no batch jobs: left from before the switch,
    no worker here will take it."""
    return (job.status in ("queued", "running") and job.kind in CELERY_KINDS
            and not current_app.config["FHIR_AI"].jobs_enabled)          # a job still queued after this long says no worker has taken it


def times_now() -> Any:
    from ..assessment import now
    return now()


# Every kick-off, manifest read and cancel is audited (who asked which ward, who saw its results);
# the assessments a job stores are audited one by one under the same caller's name.
@bp.post("/Group/<group_id>/$assess")
@requires("RiskAssessment", "c", audit="operation")
def group_assess(group_id: str):  # type: ignore[no-untyped-def]
    require_jobs(current_app.config["FHIR_AI"], "Group/[id]/$assess")
    check_id(group_id, "Group.id")
    return _kick_off("group", group_id, f"{base_url()}/Group/{group_id}/$assess")


@bp.post("/$assess-all")
@requires("RiskAssessment", "c", audit="operation")
def assess_all():  # type: ignore[no-untyped-def]
    require_jobs(current_app.config["FHIR_AI"], "$assess-all")
    return _kick_off("all", "all", f"{base_url()}/$assess-all")


OWNER_LENGTH = 256      # JobRow.requested_by


def _owner_key(actor: Actor, who: Principal | None) -> str | None:
    """Who owns the jobs this caller starts: how it authenticated and who it is, so that no other
    caller's key is ever equal to it: ``static:<name>`` for a static token (its name is unique in this
    server's configuration), ``jwt:<iss>|<client id>`` for a JWT (a client id is unique only at its
    issuer: another trusted issuer, or a static token of that name, is someone else); when that would be
    ambiguous (``|`` in the issuer) or longer than the column, ``jwt#sha256:`` and the hash of both.
    None for the server itself (scheduled jobs: the actor's client id). ``who``: the request's principal."""
    if actor.kind != "client" or who is None:
        return None
    if who.kind == "static":
        return f"static:{who.client_id}"
    key = f"jwt:{who.issuer}|{who.client_id}"
    if "|" in (who.issuer or "") or len(key) > OWNER_LENGTH:
        key = "jwt#sha256:" + hashlib.sha256(orjson.dumps([who.issuer, who.client_id])).hexdigest()
    return key


def _owners() -> list[str] | None:
    """Whose jobs the caller sees: a client its own (keys compared exactly); an admin (or the server
    itself) everyone's (None). Jobs started before owners were keyed name the bare client id: a static
    token's client (named in this server's own configuration) still sees those of its name; a JWT
    client's such jobs are seen by admins only (a JWT's client id may be anyone's elsewhere)."""
    actor = actors.current()
    if actor.kind != "client" or actor.role == "admin":
        return None
    who = principal()
    key = _owner_key(actor, who)
    if key is None:
        return [actor.client_id]
    return [key, actor.client_id] if who is not None and who.kind == "static" else [key]


def _visible(job: JobView | None) -> JobView:
    """Only the client that asked (or an admin) sees a job; a cancelled one is gone."""
    owners = _owners()
    if job is None or job.status == "cancelled" or (owners is not None and job.requested_by not in owners):
        raise NotFound("no such job (unknown, or cancelled)")
    return job


def counts(job: JobView) -> dict[str, int | None]:
    """The job's outcomes, as the manifest and the job list name them: one per patient and model asked
    for (as bulk-assess counts; with two models they add up to twice the patients done), each model's by
    its own RiskAssessment (NEWS2, a companion, is not counted). ``notApplicable``: the model is not for
    the patient's current visit (mapping ``scoring.encounter_classes``, e.g. the triage model for an
    inpatient); ``insufficientData``: too little data to assess; ``failed``: the patient could not be
    assessed (counted for each model); ``withdrawn``: the same data's assessment was withdrawn as entered in
    error, and the job got it back as it stands (no current risk). A Bulk Data run (kind ``bulk-export``, fhir-ai bulk-export-assess)
    has no patient rows: its result's ``assessed`` once complete; what it does not count, null."""
    if job.kind == "bulk-export":
        return {"assessed": job.result.get("assessed"), "insufficientData": None, "notApplicable": None,
                "failed": None, "withdrawn": None}
    tally: Counter[str] = Counter()
    for status, n in job.counts.items():
        for outcome in outcomes(status):
            tally[outcome] += n
    return {"assessed": tally["assessed"], "insufficientData": tally["insufficient"],
            "notApplicable": tally["not-applicable"], "failed": tally["failed"], "withdrawn": tally["withdrawn"]}


def _patients(job: JobView) -> tuple[int | None, int | None]:
    """(patients, done): known once the members are read; a Bulk Data run's from its result."""
    if job.kind == "bulk-export":
        patients = job.result.get("patients")
        return patients, patients if job.status == "completed" else None
    return job.total, job.done


def _tally(job: JobView) -> str:
    """The counts in words, for a running job's progress answer."""
    n = counts(job)
    return (f"{n['assessed']} assessed, {n['insufficientData']} insufficient data, "
            f"{n['notApplicable']} not applicable, {n['failed']} failed"
            + (f", {n['withdrawn']} withdrawn" if n["withdrawn"] else ""))


@bp.get("/jobs/<job_id>")
@requires("RiskAssessment", "r", audit="read")
def job_status(job_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(job_id, "job id")
    jobs = _jobs()
    job = _visible(jobs.get(job_id))
    unfinished = job.status in ("queued", "running")
    if _stranded(job):
        # Started while this site ran batch jobs: no worker here will take it. An error ends a client's polling
        # (FHIR async pattern); 202 would have it poll for ever. A Bulk Data run needs no queue and is answered
        # as ever, as are ended jobs (their manifests are in the store).
        raise JobsDisabled(f"job {job_id} ({job.kind}) was started when this server ran batch jobs; it runs none now "
                           f"({JOBS_OFF}), so the job will not progress here: DELETE cancels it")
    if unfinished:
        not_audited()           # progress only: no patient's data
        progress = "finding patients" if job.total is None else f"{job.done}/{job.total} patients"
        waited = (times_now() - utc(job.created_at)).total_seconds()
        if job.status == "queued" and waited >= UNCLAIMED_SECONDS:
            # No worker has taken it: a site that forgot `fhir-ai worker` must not see "finding patients" for ever.
            progress = (f"waiting for a worker since {times.format_datetime(job.created_at)} (no `fhir-ai worker` "
                        "has taken the job yet)")
        said = f"{job.status}: {progress}" + ("" if job.total is None else f" ({_tally(job)})")
        return fhir_response({"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational", "diagnostics": said}]},
            202, {"X-Progress": progress, "Retry-After": str(POLL_SECONDS)})
    if job.status == "failed":
        raise JobFailed(job.error or "the job failed", job.error_status or 500)
    body = manifest(job, jobs)
    patients = list(dict.fromkeys(item["patient"] for item in body["output"] + body["error"]))
    # A ward's patients by name; a hospital-wide job's by its Group (every assessment read through
    # the manifest's links is audited on its own): one event naming 10,000 patients is 2 MB.
    named = patients if len(patients) <= MAX_AUDITED_PATIENTS else []
    note_entities(([Entity(f"Group/{job.scope}")] if job.kind in ("group", "ward") else [])
                  + [Entity(p) for p in named])
    return _plain_json(body)


@bp.delete("/jobs/<job_id>")
@requires("RiskAssessment", "c", audit="delete")
def job_cancel(job_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(job_id, "job id")
    jobs = _jobs()
    _visible(jobs.get(job_id))
    jobs.cancel(job_id)
    log.info("job %s cancelled", job_id)
    return fhir_response({"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational", "diagnostics": "job cancelled"}]}, 202)


@bp.get("/jobs")
@requires("RiskAssessment", "r", audit="read")
def job_list():  # type: ignore[no-untyped-def]
    """The caller's jobs (an admin's: everyone's), newest first, ``_count`` at a time, paged by
    ``link[next]``; each with its status URL, state and counts. Not audited, like a progress poll: job
    ids, scopes and counts, no patient's data (reading a manifest is audited)."""
    check_accept(request)
    not_audited()
    count, cursor = _list_parameters()
    jobs = _jobs().newest(requested_by=_owners(), limit=count + 1, after=_decode(cursor) if cursor else None)
    base = base_url()
    page = [("_count", str(count))]
    body: dict[str, Any] = {"jobs": [_listed(job, base) for job in jobs[:count]], "link": [
        {"relation": "self", "url": f"{base}/jobs?{urlencode(page + ([('_cursor', cursor)] if cursor else []))}"}]}
    if len(jobs) > count:
        last = jobs[count - 1]
        after = f"{(last.created_at - EPOCH) // MICROSECOND}~{last.id}"      # exact: no float seconds
        body["link"].append({"relation": "next", "url": f"{base}/jobs?{urlencode(page + [('_cursor', after)])}"})
    return _plain_json(body)


def _plain_json(body: dict[str, Any]) -> Any:
    """A manifest or the job list: JSON, but no FHIR resource (as Bulk Data serves its manifest)."""
    return fhir_response(body, 200, {"Content-Type": "application/json; charset=utf-8"})


def _list_parameters() -> tuple[int, str | None]:
    """``_count`` (1 to MAX_COUNT) and ``_cursor`` (from a ``next`` link); others → 400 unless lenient."""
    unknown = sorted(set(request.args) - {"_count", "_cursor", "_format"})
    if unknown and not lenient():
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; the job list takes _count and _cursor",
                         expression=unknown)
    count = whole_number_param("_count", request.args.get("_count", str(DEFAULT_COUNT)), 1, MAX_COUNT)
    return count, request.args.get("_cursor")


def _decode(cursor: str) -> tuple[datetime, str]:
    """A ``next`` link's ``_cursor``: the created time (µs since the epoch) and id of the page's last job."""
    micros, _, last_id = cursor.partition("~")
    try:
        if not (micros.isascii() and micros.isdigit()) or not last_id:
            raise ValueError(cursor)
        return EPOCH + int(micros) * MICROSECOND, last_id
    except (ValueError, OverflowError) as exc:
        raise BadRequest("_cursor is not one this server issued; start the list again",
                         expression="_cursor") from exc


def _listed(job: JobView, base: str) -> dict[str, Any]:
    """One job in the list: what GET /jobs/{id} would say about it, without the manifest's output. A
    failed job's reason is not given: it may quote the hospital's server (an OperationOutcome naming a
    patient), and the list is not audited; its status URL, which is, gives it."""
    patients, done = _patients(job)
    url = f"{base}/jobs/{job.id}"
    entry: dict[str, Any] = {
        "job": job.id, "url": url, "kind": job.kind, "scope": job.scope, "status": job.status,
        "request": job.request.get("request"), "transactionTime": times.format_datetime(job.as_of),
        "requested": times.format_datetime(job.created_at),
        "completed": times.format_datetime(job.finished_at) if job.finished_at else None,
        "patients": patients, "done": done, **counts(job)}
    if job.status == "failed":
        status = job.error_status or 500
        entry["error"] = {"status": status, "code": _failure_code(status),
                          "diagnostics": f"the job failed; GET {url} for the reason"}
    elif _stranded(job):        # what its status URL answers (501)
        entry["error"] = {"status": 501, "code": JobsDisabled.code,
                          "diagnostics": f"this server runs no batch jobs now ({JOBS_OFF}): the job will not "
                                         f"progress here; DELETE {url} cancels it"}
    return entry


def manifest(job: JobView, jobs: JobStore) -> dict[str, Any]:
    """The completed job's result, shaped like a Bulk Data manifest: what was made, what failed."""
    base = base_url()
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for item in jobs.items(job.id):
        if "failed" in outcomes(item.status):
            errors.append({"type": "OperationOutcome", "patient": f"Patient/{item.patient_id}",
                           "diagnostics": item.error or "not assessed"})
            continue
        for entry in item.assessments:
            # Each RiskAssessment's own outcome and model (the model asked for, or NEWS2 beside it); a patient
            # recorded before they were kept, the patient's outcome and no model.
            reference, status = ((entry["reference"], entry["status"]) if isinstance(entry, dict)
                                 else (entry, item.status))
            out = {"type": "RiskAssessment", "url": f"{base}/{reference}", "patient": f"Patient/{item.patient_id}",
                   "status": status}
            if isinstance(entry, dict) and entry.get("model"):
                out["model"] = entry["model"]
            output.append(out)
    return {
        "transactionTime": times.format_datetime(job.as_of),
        "request": job.request.get("request"),
        "requiresAccessToken": True,
        "job": job.id, "kind": job.kind, "scope": job.scope,
        "patients": _patients(job)[0] or 0, **counts(job),
        "completed": times.format_datetime(job.finished_at) if job.finished_at else None,
        "output": output, "error": errors,
    }


def batch_definition(kind: str, models: list[str]) -> dict[str, Any]:
    """The OperationDefinition of Group/[id]/$assess (``group``) or $assess-all (``all``)."""
    group = kind == "group"
    return {
        "resourceType": "OperationDefinition", "id": "group-assess" if group else "assess-all",
        "url": GROUP_DEFINITION if group else ALL_DEFINITION,
        "name": "GroupAssess" if group else "AssessAll", "status": "active", "kind": "operation",
        "code": "assess" if group else "assess-all",
        "description": (("Assess every active Patient member of the Group" if group else
                         "Assess everyone with an in-progress inpatient or emergency Encounter at the source")
                        + ", asynchronously (the kick-off must send Prefer: respond-async; without it: 400): "
                          "202 with Content-Location of a status URL "
                          "that answers 202 with X-Progress while the job runs and 200 with a manifest of the "
                          "RiskAssessments made (and of the patients that could not be assessed) when it is "
                          "done; DELETE on it cancels. Each patient is assessed as by Patient/[id]/$assess."),
        **({"resource": ["Group"]} if group else {}),          # FHIR JSON has no empty arrays
        "system": not group, "type": False, "instance": group, "affectsState": True,
        "parameter": assess_parameters(models, "Assess as of this time (default: the moment of the request), "
                                               "the same for the whole job."),
    }


@bp.get("/OperationDefinition/group-assess")
def group_assess_definition():  # type: ignore[no-untyped-def]
    return fhir_response(batch_definition("group", sorted(_pipeline().registry.models)))


@bp.get("/OperationDefinition/assess-all")
def assess_all_definition():  # type: ignore[no-untyped-def]
    return fhir_response(batch_definition("all", sorted(_pipeline().registry.models)))


def capability_additions(statement: dict[str, Any]) -> None:
    """Group/$assess, $assess-all (async) and the subscription notification endpoint; none of them on a server
    that runs no batch jobs (they answer 501 there)."""
    if not current_app.config["FHIR_AI"].jobs_enabled:
        return
    rest = statement["rest"][0]
    resources = rest.setdefault("resource", [])
    resources.append({"type": "Group", "operation": [{
        "name": "assess", "definition": GROUP_DEFINITION,
        "documentation": "asynchronous only (Prefer: respond-async; 202 + Content-Location)"}]})
    rest.setdefault("operation", []).append({
        "name": "assess-all", "definition": ALL_DEFINITION,
        "documentation": "asynchronous only (Prefer: respond-async): everyone with an active inpatient or ED "
                         "encounter"})
    rest.setdefault("extension", []).append({
        "url": f"{codes.BASE}/StructureDefinition/subscription-notification-endpoint",
        "valueUrl": f"{base_url()}/subscriptions/notify"})
