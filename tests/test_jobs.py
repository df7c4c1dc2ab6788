"""Batch jobs: the asynchronous request pattern (202, X-Progress, manifest, DELETE), job state, redelivery
without duplicates, scheduled ward rescoring and the write-back delivery task. Tasks run eagerly here;
tests/integration/test_concurrency.py runs them on real Celery workers with Redis and PostgreSQL."""
from __future__ import annotations

import dataclasses
import os
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import responses
from celery import beat
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from fhir_ai.app import create_app
from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.jobs import JobStore, runtime
from fhir_ai.jobs import tasks
from fhir_ai.jobs.celery_app import app as celery, configure, schedule
from fhir_ai.jobs.tables import JobItemRow, JobRow
from fhir_ai.store.tables import AssessmentRow, OutboxRow
from fhir_ai.store.trail_tables import AuditEventRow

AS_OF = "2026-11-20T08:00:00Z"
WARD = ["demo-001", "demo-002", "demo-003", "demo-004"]


def parameters(**values: Any) -> dict[str, Any]:
    kinds = {"asOf": "valueDateTime", "model": "valueCode", "writeBack": "valueBoolean", "encounter": "valueString"}
    return {"resourceType": "Parameters", "parameter": [{"name": k, kinds[k]: v} for k, v in values.items()]}


def group(group_id: str, patients: list[str], inactive: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"resourceType": "Group", "id": group_id, "type": "person", "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}, **({"inactive": True} if p in inactive else {})}
                       for p in patients] + [{"entity": {"reference": "Device/monitor-1"}}]}


@pytest.fixture
def hospital(tmp_path: Path) -> Path:
    """The demo hospital (linked, not copied) plus a Group file with two wards."""
    folder = tmp_path / "hospital"
    folder.mkdir()
    for name in ("Patient.ndjson", "Encounter.ndjson", "Observation.ndjson"):
        (folder / name).symlink_to(DEMO_HOSPITAL / name)
    lines = [group("ward-a", WARD + ["demo-005"], inactive=("demo-005",)), group("ward-b", ["demo-003", "demo-006"])]
    (folder / "Group.ndjson").write_text("\n".join(json.dumps(g) for g in lines) + "\n")
    return folder


@pytest.fixture
def eager() -> Iterator[None]:
    """Tasks run inside the request (no broker), exceptions propagate."""
    saved = celery.conf.task_always_eager, celery.conf.task_eager_propagates
    celery.conf.task_always_eager = celery.conf.task_eager_propagates = True
    yield
    celery.conf.task_always_eager, celery.conf.task_eager_propagates = saved
    runtime.close()


@pytest.fixture
def job_app(settings_overrides: dict[str, Any], hospital: Path, eager: None) -> Iterator[Flask]:
    settings_overrides["source_url"] = str(hospital)
    app = create_app(settings_overrides)
    app.config["TESTING"] = True
    runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
    yield app
    app.extensions["fhir_ai"].close()


@pytest.fixture
def jc(job_app: Flask) -> FlaskClient:
    return job_app.test_client()


def store_of(app: Flask) -> Any:
    return app.extensions["fhir_ai"].store


def assessment_rows(app: Flask) -> list[tuple[str, str]]:
    with store_of(app).session() as session:
        return [tuple(r) for r in session.execute(select(AssessmentRow.patient_id, AssessmentRow.identifier))]


def kick_off(jc: FlaskClient, url: str, body: dict[str, Any] | None = None) -> str:
    response = jc.post(url, json=body or parameters(asOf=AS_OF), headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.get_json()
    location = response.headers["Content-Location"]
    assert location.startswith("http://localhost/jobs/")
    return location.removeprefix("http://localhost")


# -- the asynchronous request pattern ---------------------------------------------------------------

def test_group_assess_answers_202_then_a_manifest_of_every_active_member(jc: FlaskClient, job_app: Flask) -> None:
    status_url = kick_off(jc, "/Group/ward-a/$assess")
    assert jc.get(status_url, headers={"Accept": "application/fhir+xml"}).status_code == 406
    assert jc.get(status_url, headers={"Accept": "application/*"}).status_code == 200
    response = jc.get(status_url)
    assert response.status_code == 200
    assert response.mimetype == "application/json"          # a manifest, as in Bulk Data: no FHIR resource
    manifest = response.get_json()
    assert manifest["transactionTime"] == AS_OF
    assert manifest["request"] == "http://localhost/Group/ward-a/$assess"   # the kick-off URL, as in Bulk Data
    assert manifest["patients"] == 4 and manifest["assessed"] + manifest["insufficientData"] == 4
    assert manifest["failed"] == 0 and manifest["error"] == []
    # the inactive member (demo-005) and the Device member are left out
    patients = sorted({o["patient"] for o in manifest["output"]})
    assert patients == [f"Patient/{p}" for p in WARD]
    assert len(manifest["output"]) == 8          # the model's RiskAssessment and NEWS2 for each
    # each entry says which it is (a client picks the model's without reading every resource)
    assert sorted(o["model"] for o in manifest["output"]) == ["deterioration"] * 4 + ["news2"] * 4
    first = manifest["output"][0]["url"].removeprefix("http://localhost")
    assert jc.get(first).status_code == 200
    rows = assessment_rows(job_app)
    assert sorted({p for p, _ in rows}) == WARD and len(rows) == 8


def test_a_job_says_which_assessments_it_got_back_withdrawn(jc: FlaskClient, job_app: Flask) -> None:
    """A clinician withdrew one patient's assessment; the ward is assessed again on the same data: the job
    gets that assessment back as it stands and counts it 'withdrawn', not 'assessed' (no current risk)."""
    first = jc.get(kick_off(jc, "/Group/ward-a/$assess")).get_json()
    model = next(o for o in first["output"] if o["status"] == "assessed" and "news2" not in o["url"]
                 and jc.get(o["url"].removeprefix("http://localhost")).get_json()["method"]["coding"][0]["code"]
                 == "deterioration")
    withdrawn = jc.post(model["url"].removeprefix("http://localhost") + "/$withdraw", json={
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "wrong patient"}]})
    assert withdrawn.status_code == 200, withdrawn.get_json()
    again = jc.get(kick_off(jc, "/Group/ward-a/$assess")).get_json()
    assert again["withdrawn"] == 1 and again["assessed"] == first["assessed"] - 1
    assert [o["status"] for o in again["output"] if o["url"] == model["url"]] == ["withdrawn"]
    assert first["withdrawn"] == 0


def test_a_repeated_job_stores_nothing_new(jc: FlaskClient, job_app: Flask) -> None:
    first = jc.get(kick_off(jc, "/Group/ward-a/$assess")).get_json()
    second = jc.get(kick_off(jc, "/Group/ward-b/$assess")).get_json()   # demo-003 again, demo-006 new
    again = jc.get(kick_off(jc, "/Group/ward-a/$assess")).get_json()
    assert sorted(o["url"] for o in again["output"]) == sorted(o["url"] for o in first["output"])
    rows = assessment_rows(job_app)
    assert len(rows) == len({i for _, i in rows}) == 10   # 5 patients × 2, nothing twice
    assert {o["patient"] for o in second["output"]} == {"Patient/demo-003", "Patient/demo-006"}


def test_assess_all_takes_everyone_with_an_active_inpatient_encounter(jc: FlaskClient, job_app: Flask) -> None:
    manifest = jc.get(kick_off(jc, "/$assess-all")).get_json()
    assert manifest["kind"] == "all"
    # the demo hospital: 12 patients, each with an in-progress inpatient stay
    assert manifest["patients"] == 12
    assert len({o["patient"] for o in manifest["output"]}) == 12


def test_a_running_job_answers_202_with_progress(jc: FlaskClient, job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    jobs.create("job-1", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
                request={"request": "POST /Group/ward-a/$assess"}, requested_by="test-suite", requested_role="admin")
    response = jc.get("/jobs/job-1")
    assert response.status_code == 202
    assert response.headers["X-Progress"] == "finding patients" and response.headers["Retry-After"] == "3"
    jobs.start("job-1")
    jobs.expand("job-1", ["p1", "p2", "p3", "p2"])
    jobs.record("job-1", "p1", "assessed", ["RiskAssessment/x"])
    response = jc.get("/jobs/job-1")
    assert response.status_code == 202 and response.headers["X-Progress"] == "1/3 patients"
    assert not jobs.finish_if_done("job-1")
    for p in ("p2", "p3"):
        jobs.record("job-1", p, "failed", error="upstream said no")
    assert jobs.finish_if_done("job-1") and not jobs.finish_if_done("job-1")
    manifest = jc.get("/jobs/job-1").get_json()
    assert manifest["failed"] == 2 and [e["patient"] for e in manifest["error"]] == ["Patient/p2", "Patient/p3"]


def test_delete_cancels_a_job_and_its_remaining_patients(jc: FlaskClient, job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    jobs.create("job-2", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []}, requested_by="test-suite", requested_role="admin")
    jobs.start("job-2")
    jobs.expand("job-2", WARD)
    assert jc.delete("/jobs/job-2").status_code == 202
    assert jc.get("/jobs/job-2").status_code == 404
    assert jc.delete("/jobs/job-2").status_code == 404
    # a chunk task that arrives after the cancel assesses nobody
    assert tasks.assess_chunk(  "job-2", WARD) == 0
    assert assessment_rows(job_app) == []
    assert jc.get("/jobs/no-such-job").status_code == 404


def test_kick_off_manifest_read_and_cancel_are_audited_but_progress_polls_are_not(jc: FlaskClient,
                                                                                  job_app: Flask) -> None:
    def events() -> list[tuple[str, str, set[str]]]:
        with store_of(job_app).session() as session:
            rows = session.execute(select(AuditEventRow.action, AuditEventRow.resource)
                                   .where(AuditEventRow.role != "system").order_by(AuditEventRow.seq))
            out = []
            for action, text in rows:
                resource = json.loads(text)
                out.append((action, resource["subtype"][0]["code"] if resource.get("subtype") else "",
                            {e["what"]["reference"] for e in resource.get("entity", [])}))
            return out

    before = len(events())
    status_url = kick_off(jc, "/Group/ward-a/$assess")
    kicked = events()[before:]
    # The kick-off itself (who asked for which ward), and one create per stored assessment (here, with
    # tasks run eagerly, before the kick-off's own event, which is written as its answer goes out).
    operations = [entities for action, _, entities in kicked if action == "E"]
    assert operations == [{"Group/ward-a"}]
    assert [a for a, _, _ in kicked].count("C") == 8
    before = len(events())
    assert jc.get(status_url).status_code == 200
    read = events()[before:]
    assert len(read) == 1 and read[0][0] == "R"
    assert {f"Patient/{p}" for p in WARD} | {"Group/ward-a"} == read[0][2]   # whose results were seen
    jobs = JobStore(store_of(job_app))
    jobs.create("job-7", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []}, requested_by="test-suite", requested_role="admin")
    before = len(events())
    assert jc.get("/jobs/job-7").status_code == 202                # progress: not audited
    assert events()[before:] == []
    assert jc.delete("/jobs/job-7").status_code == 202
    assert [a for a, _, _ in events()[before:]] == ["D"]


def test_status_urls_use_the_public_url_not_the_callers_host_header(settings_overrides: dict[str, Any],
                                                                     hospital: Path, eager: None) -> None:
    settings_overrides.update(source_url=str(hospital), public_url="https://fhir-ai.hospital.example/api/")
    app = create_app(settings_overrides)
    runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
    try:
        client = app.test_client()
        response = client.post("/Group/ward-b/$assess", json=parameters(asOf=AS_OF),
                               headers={"Prefer": "respond-async", "Host": "evil.example:9999"})
        location = response.headers["Content-Location"]
        assert location.startswith("https://fhir-ai.hospital.example/api/jobs/")
        manifest = client.get(location.removeprefix("https://fhir-ai.hospital.example/api")).get_json()
        assert manifest["request"] == "https://fhir-ai.hospital.example/api/Group/ward-b/$assess"
        assert all(o["url"].startswith("https://fhir-ai.hospital.example/api/RiskAssessment/")
                   for o in manifest["output"])
    finally:
        app.extensions["fhir_ai"].close()


def test_an_unknown_group_fails_the_job_with_404(jc: FlaskClient) -> None:
    response = jc.get(kick_off(jc, "/Group/no-such-ward/$assess"))
    assert response.status_code == 404
    assert "Group/no-such-ward" in response.get_json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("body, where", [
    (parameters(encounter="Encounter/e1"), "encounter"),
    (parameters(model="no-such-model"), "model"),
    (parameters(asOf="yesterday"), "valueDateTime"),     # the asOf parameter's value
])
def test_bad_kick_off_parameters_are_refused_before_a_job_exists(jc: FlaskClient, job_app: Flask,
                                                                  body: dict[str, Any], where: str) -> None:
    response = jc.post("/Group/ward-a/$assess", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 400, where
    assert where in response.get_json()["issue"][0]["expression"][0]
    with store_of(job_app).session() as session:
        from fhir_ai.jobs.tables import JobRow
        assert session.scalar(select(func.count()).select_from(JobRow)) == 0


def test_jobs_are_visible_only_to_the_client_that_asked(jc: FlaskClient, job_app: Flask) -> None:
    credentials = pytest.importorskip("credentials")
    jobs = JobStore(store_of(job_app))
    jobs.create("job-3", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
                request={"request": "x"}, requested_by="test-suite", requested_role="admin")
    other = credentials.bearer(credentials.ROLE_TOKENS["ehr"])
    assert jc.get("/jobs/job-3", headers=other).status_code == 404
    assert jc.delete("/jobs/job-3", headers=other).status_code == 404
    assert jc.get("/jobs/job-3").status_code == 202


@pytest.mark.parametrize("path", ["/Group/%2e%2e/$assess", "/Group/./$assess", "/Patient/%2e%2e/$assess"])
def test_an_id_of_dots_only_is_refused_not_read_as_a_path(jc: FlaskClient, path: str) -> None:
    """'..' matches FHIR's id pattern, but [base]/Group/.. is the server base once a client normalises it:
    another resource than the one named. 400 naming the id, no job started."""
    response = jc.post(path, json=parameters(asOf=AS_OF), headers={"Prefer": "respond-async"})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["issue"][0]["expression"][0].endswith(".id")
    assert jc.get("/jobs").get_json()["jobs"] == []


def test_a_job_no_worker_has_taken_says_so(jc: FlaskClient, job_app: Flask) -> None:
    """A site that forgot `fhir-ai worker`: the job stays queued; after half a minute its progress says that no
    worker has taken it, instead of 'finding patients' for ever."""
    jobs = JobStore(store_of(job_app))
    jobs.create("idle", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
                request={}, requested_by="test-suite", requested_role="admin")
    fresh = jc.get("/jobs/idle")
    assert fresh.status_code == 202 and fresh.headers["X-Progress"] == "finding patients"
    with store_of(job_app).engine.begin() as connection:
        connection.execute(update(JobRow).where(JobRow.id == "idle").values(
            created_at=datetime.now(timezone.utc) - timedelta(minutes=2)))
    stale = jc.get("/jobs/idle")
    assert stale.status_code == 202 and stale.headers["X-Progress"].startswith("waiting for a worker since ")
    assert "fhir-ai worker" in stale.get_json()["issue"][0]["diagnostics"]


def test_a_ward_that_fails_every_interval_shows_in_health_and_at_beat_start(settings_overrides: dict[str, Any],
                                                                            hospital: Path, eager: None,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """FHIR_AI_WARDS naming a Group the source does not have: each slot's job fails. /health says degraded and
    names the ward and the status its latest job failed with; the log line names the ward; the beat's start
    warns about ids that cannot be Groups and about a missing FHIR_AI_PUBLIC_URL."""
    from fhir_ai.jobs.worker import ward_problems
    settings_overrides.update(source_url=str(hospital), wards="ward-a,nope")
    app = create_app(settings_overrides)
    try:
        runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
        client = app.test_client()
        assert [w["status"] for w in client.get("/health").get_json()["wards"]] == ["not started yet"] * 2
        with caplog.at_level("WARNING"):
            tasks.rescore_wards(now=datetime(2026, 11, 20, 8, tzinfo=timezone.utc).timestamp())
        body = client.get("/health").get_json()
        assert body["status"] == "degraded"
        by_ward = {w["ward"]: w for w in body["wards"]}
        assert by_ward["ward-a"]["status"] == "completed"
        assert by_ward["nope"]["status"] == "failed" and by_ward["nope"]["errorStatus"] == 404
        assert "(ward nope) failed (404)" in caplog.text
        settings = app.config["FHIR_AI"]
    finally:
        app.extensions["fhir_ai"].close()
        configure(load_settings())
    problems = ward_problems(dataclasses.replace(settings, wards="ward-a,bad id,..", public_url=""))
    assert len(problems) == 3 and "'bad id'" in problems[0] and "'..'" in problems[1]
    assert "FHIR_AI_PUBLIC_URL" in problems[2]
    assert ward_problems(dataclasses.replace(settings, public_url="https://fhir-ai.hospital.test")) == []


def test_an_unreachable_queue_answers_503_and_marks_the_job_failed(settings_overrides: dict[str, Any],
                                                                   hospital: Path) -> None:
    settings_overrides.update(source_url=str(hospital), broker_url="redis://127.0.0.1:9/0")   # nothing listens
    app = create_app(settings_overrides)
    try:
        response = app.test_client().post("/Group/ward-a/$assess", json=parameters(asOf=AS_OF),
                                          headers={"Prefer": "respond-async"})
        assert response.status_code == 503
        assert "queue" in response.get_json()["issue"][0]["diagnostics"]
        assert response.headers["Retry-After"] == "30"                  # when to try again
        with store_of(app).session() as session:
            from fhir_ai.jobs.tables import JobRow
            assert [r.status for r in session.scalars(select(JobRow))] == ["failed"]
    finally:
        app.extensions["fhir_ai"].close()
        configure(load_settings())


# -- tasks: redelivery, schedule, write-back ------------------------------------------------------------

def reopen(app: Flask, job_id: str, patient_id: str, *, claimed_until: datetime | None = None) -> None:
    """The patient as a worker that died while assessing it leaves it: pending, claimed until ``claimed_until``
    (None: the claim has run out, as by the time Redis hands the chunk to another worker)."""
    from fhir_ai.jobs.tables import JobItemRow
    with store_of(app).session() as session, session.begin():
        session.execute(update(JobItemRow).where(JobItemRow.job_id == job_id, JobItemRow.patient_id == patient_id)
                        .values(status="pending", claimed_until=claimed_until))

def test_a_redelivered_chunk_skips_recorded_patients_and_repeats_are_no_ops(job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    as_of = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)
    jobs.create("job-4", kind="group", scope="ward-a", as_of=as_of, request={"request": "x", "models": []})
    jobs.start("job-4")
    jobs.expand("job-4", WARD)
    assert tasks.assess_chunk("job-4", WARD[:2]) == 2
    rows = assessment_rows(job_app)
    # Killed after storing WARD[1] but before recording it: still pending, its claim run out, redelivered.
    reopen(job_app, "job-4", WARD[1])
    assert tasks.assess_chunk("job-4", WARD[:2]) == 1           # WARD[0] skipped, WARD[1] repeated
    assert assessment_rows(job_app) == rows                     # ... and the repeat stored nothing
    assert jobs.status("job-4") == "running"
    assert tasks.assess_chunk("job-4", WARD[2:]) == 2
    assert jobs.status("job-4") == "completed"
    assert jobs.expand("job-4", ["someone-else"]) is False       # a restarted expansion keeps the first list
    assert len(assessment_rows(job_app)) == 8


def _fragile_ward(job_app: Flask, monkeypatch: pytest.MonkeyPatch, job_id: str, models: list[str]) -> JobStore:
    """A running job for WARD whose second patient's assessment raises an unexpected error."""
    jobs = JobStore(store_of(job_app))
    as_of = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)
    jobs.create(job_id, kind="group", scope="ward-a", as_of=as_of, request={"request": "x", "models": models})
    jobs.start(job_id)
    jobs.expand(job_id, WARD)
    pipeline = job_app.extensions["fhir_ai"]
    assess = pipeline.assess

    def fragile(patient_id: str, **kwargs: Any) -> Any:
        if patient_id == WARD[1]:
            name = "Kim " + "Minji"            # patient data in the error's text, which must not spread
            raise ValueError(f"could not convert string to float: {name!r}")
        return assess(patient_id, **kwargs)
    monkeypatch.setattr(pipeline, "assess", fragile)
    return jobs


def test_an_unexpected_error_fails_that_patient_and_the_job_still_ends(job_app: Flask,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    jobs = _fragile_ward(job_app, monkeypatch, "job-5", [])
    assert tasks.assess_chunk("job-5", WARD) == 3
    assert jobs.status("job-5") == "completed"                 # not left running for ever
    items = {item.patient_id: item for item in jobs.items("job-5")}
    assert items[WARD[1]].status == "failed" and items[WARD[1]].error == "internal error (ValueError)"
    assert {items[p].status for p in WARD if p != WARD[1]} == {"assessed"}
    assert "Kim Minji" not in (items[WARD[1]].error or "") and "Kim Minji" not in caplog.text
    assert "ValueError" in caplog.text and "fragile" in caplog.text          # the kind, and where


def test_a_patient_that_fails_in_a_two_model_job_is_failed_once_per_model(jc: FlaskClient, job_app: Flask,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _fragile_ward(job_app, monkeypatch, "job-6", ["triage", "deterioration", "triage"])    # a repeat is one
    assert tasks.assess_chunk("job-6", WARD) == 3
    manifest = jc.get("/jobs/job-6").get_json()
    assert (manifest["patients"], manifest["assessed"], manifest["insufficientData"], manifest["notApplicable"],
            manifest["failed"]) == (4, 3, 0, 3, 2)                     # 4 patients x 2 models
    assert [e["patient"] for e in manifest["error"]] == [f"Patient/{WARD[1]}"]
    assert f"Patient/{WARD[1]}" not in {o["patient"] for o in manifest["output"]}
    assert len(manifest["output"]) == 9                                # triage, deterioration, NEWS2 for 3


@pytest.mark.parametrize("kind", ["OperationalError", "InterfaceError"])
def test_the_store_being_away_retries_the_whole_chunk(job_app: Flask, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    from sqlalchemy.exc import OperationalError
    jobs = JobStore(store_of(job_app))
    jobs.create("job-6", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []})
    jobs.start("job-6")
    jobs.expand("job-6", WARD[:1])
    pipeline = job_app.extensions["fhir_ai"]

    def away(patient_id: str, **kwargs: Any) -> Any:
        # A lost connection may surface as another DBAPIError (psycopg: "connection already closed").
        import sqlalchemy.exc
        raise getattr(sqlalchemy.exc, kind)("INSERT", {}, Exception("connection lost"), connection_invalidated=True)
    monkeypatch.setattr(pipeline, "assess", away)
    with pytest.raises(OperationalError):            # what the task retries (RETRY's autoretry_for)
        tasks.assess_chunk("job-6", WARD[:1])
    assert jobs.item_status("job-6", WARD[0]) == "pending"      # not failed: tried again with the chunk


def test_finished_jobs_expire_after_the_retention_but_the_last_export_and_all_assessments_stay(
        job_app: Flask, jc: FlaskClient) -> None:
    jobs = JobStore(store_of(job_app))
    old = kick_off(jc, "/Group/ward-a/$assess")
    newer = kick_off(jc, "/Group/ward-a/$assess")          # the same ward again: the newest run stays
    assert jc.get(old).status_code == 200 and jc.get(newer).status_code == 200
    stored = assessment_rows(job_app)
    as_of = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)
    for n in range(3):      # three exports of one scope: the newest completed one holds the next _since
        jobs.create(f"export-{n}", kind="bulk-export", scope="Group/ward-a", as_of=as_of, request={"request": "x"})
        jobs.set_result(f"export-{n}", {"transactionTime": f"2026-11-2{n}T00:00:00Z"}, status="completed")
    jobs.create("running", kind="group", scope="ward-b", as_of=as_of, request={"request": "x", "models": []})
    jobs.start("running")
    runtime.configure(dataclasses.replace(job_app.config["FHIR_AI"], job_retention=3600), job_app.extensions["fhir_ai"])
    assert tasks.expire_jobs() == 0                          # all finished within the hour: nothing goes
    expired = jobs.expire(datetime.now(timezone.utc) + timedelta(days=1))
    assert expired == 3                                      # the older ward-a run and the two older exports
    assert jc.get(old).status_code == 404 and jc.get(newer).status_code == 200
    assert jobs.get("export-2") is not None and jobs.get("export-0") is None
    assert jobs.last("bulk-export", "Group/ward-a").result["transactionTime"] == "2026-11-22T00:00:00Z"
    assert jobs.status("running") == "running"               # unfinished jobs never expire
    assert assessment_rows(job_app) == stored                # the assessments a job stored stay
    with store_of(job_app).session() as session:
        left = set(session.scalars(select(JobItemRow.job_id)))
    assert left == {newer.rsplit("/", 1)[1]}                 # the expired jobs' patients went with them


def test_the_beat_schedule_holds_delivery_and_the_configured_wards() -> None:
    settings = load_settings({"wards": "ward-a, ward-b", "ward_interval": 300, "worker_interval": 7})
    app = configure(settings)
    try:
        entries = beat.Scheduler(app=app, lazy=True)
        entries.setup_schedule()
        due = {name: entry.schedule.run_every.total_seconds() for name, entry in entries.schedule.items()
               if not name.startswith("celery.")}
        assert due == {"deliver-write-backs": 7.0, "rescore-wards": 300.0, "expire-jobs": 3600.0, "resume-jobs": 300.0}
        assert schedule(load_settings({"wards": "", "job_retention": 0})).keys() == {"deliver-write-backs", "resume-jobs"}
    finally:
        configure(load_settings())


def test_ward_ticks_fall_on_the_slot_boundaries_whenever_beat_started() -> None:
    from fhir_ai.jobs.celery_app import on_slots
    clock = [datetime(2026, 11, 20, 8, 7, 30, tzinfo=timezone.utc)]
    every = on_slots(timedelta(minutes=15), nowfun=lambda: clock[0])
    started = clock[0]                                    # beat (re)started mid-slot
    due, wait = every.is_due(started)
    assert not due and wait == 450.0                      # the next boundary, 08:15, not 08:22:30
    clock[0] = datetime(2026, 11, 20, 8, 15, 0, 500000, tzinfo=timezone.utc)
    due, wait = every.is_due(started)
    assert due and 899 < wait < 900
    assert every.is_due(clock[0]) == (False, pytest.approx(899.5))   # ran: not again in the same slot
    clock[0] = datetime(2026, 11, 20, 8, 29, 59, tzinfo=timezone.utc)
    assert not every.is_due(datetime(2026, 11, 20, 8, 15, 0, 500000, tzinfo=timezone.utc))[0]
    clock[0] = datetime(2026, 11, 20, 9, 1, tzinfo=timezone.utc)     # beat was down for two slots: one tick
    assert every.is_due(datetime(2026, 11, 20, 8, 15, 0, 500000, tzinfo=timezone.utc))[0]
    # The clock is read once: a boundary passing between two readings must not push the tick a slot on.
    boundary = datetime(2026, 11, 20, 9, 15, tzinfo=timezone.utc)
    readings = iter([boundary - timedelta(microseconds=1), boundary + timedelta(microseconds=1)])
    racing = on_slots(timedelta(minutes=15), nowfun=lambda: next(readings))
    assert racing.is_due(datetime(2026, 11, 20, 9, 1, tzinfo=timezone.utc)) == (False, 0.05)


def test_a_dead_workers_task_is_swept_back_within_the_visibility_timeout() -> None:
    # kombu's defaults sweep for unacknowledged tasks only every 10 s x 10 calls = 100 s, whatever the
    # visibility timeout; the configured broker must sweep often enough to honour the timeout.
    app = configure(load_settings({"job_visibility_timeout": 4}))
    try:
        options = app.conf.broker_transport_options
        sweep = options["unacked_restore_interval"] * options["unacked_restore_throttle"]
        assert options["visibility_timeout"] == 4 and sweep <= 1.0
        assert options["unacked_mutex_expire"] <= 300
        app = configure(load_settings({"job_visibility_timeout": 3600}))
        options = app.conf.broker_transport_options
        assert options["unacked_restore_interval"] * options["unacked_restore_throttle"] <= 10
    finally:
        configure(load_settings())


def test_scheduled_rescoring_starts_one_job_per_ward_per_slot(job_app: Flask) -> None:
    settings = load_settings({**{k: getattr(job_app.config["FHIR_AI"], k) for k in
                                 ("database_url", "source_url", "mappings_dir", "models_dir", "write_back")},
                              "wards": "ward-a,ward-b", "ward_interval": 900})
    runtime.configure(settings, job_app.extensions["fhir_ai"])
    slot_time = datetime(2026, 11, 20, 8, 5, tzinfo=timezone.utc).timestamp()
    started = tasks.rescore_wards(now=slot_time)
    assert len(started) == 2
    # A second scheduler (another worker with --beat) firing in the same slot starts nothing new.
    assert tasks.rescore_wards(now=slot_time + 60) == []
    jobs = JobStore(store_of(job_app))
    job = jobs.get(started[0])
    assert job is not None and job.status == "completed" and job.kind == "ward"
    assert job.as_of == datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)   # the slot's start
    assert job.request["request"] in ("/Group/ward-a/$assess", "/Group/ward-b/$assess") and job.request["scheduled"]
    assert len(tasks.rescore_wards(now=slot_time + 900)) == 2                  # the next slot
    assert {p for p, _ in assessment_rows(job_app)} == set(WARD) | {"demo-006"}


@responses.activate
def test_write_back_delivery_runs_as_a_task(settings_overrides: dict[str, Any], eager: None) -> None:
    base = "https://ehr.example.org/fhir"
    settings = load_settings({**settings_overrides, "source_url": base, "write_back": True})
    from fhir_ai.store import Store
    store = Store(settings.effective_database_url)
    try:
        resource = {"resourceType": "RiskAssessment", "id": "ra-1", "status": "final",
                    "identifier": [{"system": "https://fhir-ai.invalid/id", "value": "ra-1"}],
                    "subject": {"reference": "Patient/p1"}, "method": {"coding": [{"code": "deterioration"}]}}
        store.save_assessment(resource, model_id="deterioration", model_version="1", write_back_target=base)
        import fhir_ai.delivery as delivery
        saved_grace, delivery.FRESH_GRACE = delivery.FRESH_GRACE, 0.0
        responses.put(f"{base}/RiskAssessment/ra-1", json={}, status=200)
        runtime.configure(settings)
        try:
            report = tasks.deliver_write_backs.delay().get()
        finally:
            delivery.FRESH_GRACE = saved_grace
        assert report["delivered"] == 1
        assert [row.status for row in store.outbox()] == ["delivered"]
        with store.session() as session:
            assert session.scalar(select(func.count()).select_from(OutboxRow)) == 1
    finally:
        store.close()
        runtime.close()


def test_overlapping_write_back_ticks_in_one_process_do_not_share_the_circuits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --pool=threads two ticks can overlap in one process; the second is skipped, not run beside
    the first on the same (unlocked) circuit state, and the next tick runs again."""
    import threading

    from fhir_ai.delivery import PassReport
    inside, release, calls = threading.Event(), threading.Event(), []

    class SlowWorker:
        def run_once(self) -> PassReport:
            calls.append(threading.get_ident())
            inside.set()
            assert release.wait(10)
            return PassReport(claimed=1, delivered=1)

    monkeypatch.setitem(tasks._delivery, os.getpid(), SlowWorker())
    first: list[dict[str, int]] = []
    runner = threading.Thread(target=lambda: first.append(tasks.deliver_write_backs()))
    runner.start()
    assert inside.wait(10)
    second = tasks.deliver_write_backs()               # while the first pass is still delivering
    release.set()
    runner.join(10)
    assert second["skipped"] == 1 and second["delivered"] == 0
    assert first == [{"claimed": 1, "delivered": 1, "retryLater": 0, "failed": 0, "deferred": 0, "skipped": 0}]
    assert len(calls) == 1
    assert tasks.deliver_write_backs()["skipped"] == 0  # the lock is released: the next tick runs
    assert len(calls) == 2


def test_the_capability_statement_lists_the_batch_operations(jc: FlaskClient) -> None:
    rest = jc.get("/metadata").get_json()["rest"][0]
    group = next(r for r in rest["resource"] if r["type"] == "Group")
    assert group["operation"][0]["name"] == "assess"
    assert "assess-all" in [o["name"] for o in rest["operation"]]
    assert any(e["valueUrl"].endswith("/subscriptions/notify") for e in rest["extension"])


def test_every_operation_definition_the_capability_statement_names_is_served(jc: FlaskClient) -> None:
    from fhir.resources.R4B.operationdefinition import OperationDefinition
    rest = jc.get("/metadata").get_json()["rest"][0]
    named = [o["definition"] for o in rest.get("operation", [])]
    named += [o["definition"] for r in rest["resource"] for o in r.get("operation", [])]
    assert len(named) >= 5
    for url in named:
        path = url.replace("https://fhir-ai.invalid", "")
        response = jc.get(path, headers={"Authorization": ""})            # public, like /metadata
        assert response.status_code == 200, url
        body = response.get_json()
        definition = OperationDefinition.model_validate(body)
        assert definition.url == url
        assert all(value != [] for value in body.values())            # FHIR JSON has no empty arrays


# -- claims, attempts and jobs whose tasks were lost (review of the ninth session) ----------------------

def running_job(app: Flask, job_id: str, patients: list[str]) -> JobStore:
    jobs = JobStore(store_of(app))
    jobs.create(job_id, kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []})
    jobs.start(job_id)
    jobs.expand(job_id, patients)
    return jobs


def item(app: Flask, job_id: str, patient_id: str) -> JobItemRow:
    with store_of(app).session() as session:
        return session.get(JobItemRow, (job_id, patient_id))


def test_a_patient_claimed_by_another_copy_of_the_chunk_is_left_to_it(job_app: Flask) -> None:
    """Two copies of a chunk at once (an expansion redelivered after queuing its chunks, a chunk past the
    visibility timeout): the patient another copy holds is not assessed again here, and once it has an
    outcome a late copy's outcome does not overwrite it."""
    jobs = running_job(job_app, "job-c", WARD[:2])
    assert jobs.claim("job-c", WARD[0], lease=600, holder="other-copy") == 0     # the other copy is on it
    assert tasks.assess_chunk("job-c", WARD[:2]) == 1             # only WARD[1] here
    assert {p for p, _ in assessment_rows(job_app)} == {WARD[1]}
    assert item(job_app, "job-c", WARD[0]).status == "pending" and jobs.status("job-c") == "running"
    assert jobs.record("job-c", WARD[0], "assessed", [{"reference": "RiskAssessment/x", "status": "assessed"}])
    assert not jobs.record("job-c", WARD[0], "failed", error="a late copy timed out")   # the first outcome stays
    assert item(job_app, "job-c", WARD[0]).status == "assessed" and item(job_app, "job-c", WARD[0]).error is None


def test_a_patient_whose_assessment_stops_the_worker_is_given_up_after_three_attempts(job_app: Flask) -> None:
    """A claim that runs out without an outcome was abandoned (its worker process died: killed for memory, a
    crash in native code); after three such, the next claim records the patient failed instead of assessing."""
    jobs = running_job(job_app, "job-p", WARD[:2])
    gone = datetime.now(timezone.utc) - timedelta(seconds=1)
    for abandoned in (0, 1, 2):
        assert jobs.claim("job-p", WARD[0], lease=600, holder=f"worker-{abandoned}") == abandoned
        reopen(job_app, "job-p", WARD[0], claimed_until=gone)     # the worker died; its claim ran out
    assert tasks.assess_chunk("job-p", WARD[:2]) == 1
    poisoned = item(job_app, "job-p", WARD[0])
    assert poisoned.status == "failed" and "worker stopped while assessing this patient, 3 times" in poisoned.error
    assert {p for p, _ in assessment_rows(job_app)} == {WARD[1]}
    assert jobs.status("job-p") == "completed"


def test_a_store_failing_mid_assessment_lets_the_claim_go_without_counting_it(job_app: Flask, monkeypatch) -> None:
    """The database away (a deadlock, a restart): the chunk is tried again, and the patient's claim is let go,
    not left to count as a worker that died."""
    from sqlalchemy.exc import OperationalError
    jobs = running_job(job_app, "job-d", WARD[:1])

    def away(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))
    monkeypatch.setattr(job_app.extensions["fhir_ai"], "assess", away)
    with pytest.raises(OperationalError):
        tasks.assess_chunk("job-d", WARD[:1])
    row = item(job_app, "job-d", WARD[0])
    assert (row.status, row.claimed_until, row.attempts) == ("pending", None, 0)
    monkeypatch.undo()
    assert tasks.assess_chunk("job-d", WARD[:1]) == 1 and jobs.status("job-d") == "completed"


def silent(app: Flask, job_id: str, minutes: float = 60) -> None:
    """Make the job look as if nothing happened to it for ``minutes``."""
    from fhir_ai.jobs.tables import JobRow
    then = datetime.now(timezone.utc) - timedelta(minutes=minutes)
    with store_of(app).session() as session, session.begin():
        session.execute(update(JobRow).where(JobRow.id == job_id).values(updated_at=then))
        session.execute(update(JobItemRow).where(JobItemRow.job_id == job_id).values(updated_at=then))


@pytest.fixture
def empty_queue(monkeypatch) -> None:
    """resume_jobs sees no task waiting in the job queue (the real Redis queue is not asked)."""
    monkeypatch.setattr(tasks, "_queue_waiting", lambda settings: 0)


@pytest.mark.parametrize("backlog", [3, None])
def test_silent_jobs_are_not_resumed_while_tasks_wait_in_the_queue_or_redis_is_away(job_app: Flask, monkeypatch,
                                                                                     backlog) -> None:
    running_job(job_app, "job-w", WARD)
    silent(job_app, "job-w")
    monkeypatch.setattr(tasks, "_queue_waiting", lambda settings: backlog)
    assert tasks.resume_jobs() == []
    assert JobStore(store_of(job_app)).pending("job-w") == WARD


def test_a_job_whose_chunks_were_lost_is_resumed(job_app: Flask, empty_queue: None) -> None:
    """Redis restarted without persistence: the chunks queued are gone, the job 'running' with patients
    pending. After a silence resume_jobs queues them again (a patient claimed by a live worker is left)."""
    jobs = running_job(job_app, "job-l", WARD)
    assert tasks.assess_chunk("job-l", WARD[:1]) == 1             # then the queue lost the rest
    jobs.claim("job-l", WARD[3], lease=3600, holder="live")        # a live worker is on this one
    assert tasks.resume_jobs() == []                              # progress just now: nothing lost yet
    silent(job_app, "job-l")
    assert tasks.resume_jobs() == ["job-l"]
    assert {item(job_app, "job-l", p).status for p in WARD[:3]} == {"assessed"}
    assert item(job_app, "job-l", WARD[3]).status == "pending"    # left to the worker that holds it
    assert tasks.resume_jobs() == []                              # resumed: silent no more
    assert jobs.record("job-l", WARD[3], "assessed", [])
    jobs.finish_if_done("job-l")
    assert jobs.status("job-l") == "completed"


def test_a_job_whose_expansion_was_lost_is_expanded_again(job_app: Flask, empty_queue: None) -> None:
    jobs = JobStore(store_of(job_app))
    jobs.create("job-e", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []})       # queued; its expand_job message lost
    silent(job_app, "job-e")
    assert tasks.resume_jobs() == ["job-e"]
    assert jobs.status("job-e") == "completed" and len(jobs.items("job-e")) == 4


def test_a_job_with_every_patient_recorded_but_not_finished_is_finished(job_app: Flask, empty_queue: None) -> None:
    jobs = running_job(job_app, "job-f", WARD[:1])
    jobs.record("job-f", WARD[0], "assessed", [])                 # the chunk died before finish_if_done
    silent(job_app, "job-f")
    assert tasks.resume_jobs() == ["job-f"] and jobs.status("job-f") == "completed"


def test_an_unexpected_error_finding_the_patients_fails_the_job(job_app: Flask, monkeypatch) -> None:
    """A Group member nobody foresaw (a bug): the job fails with the kind of error, it does not stay running."""
    def broken(source, group_id):
        raise AttributeError("'str' object has no attribute 'get'")
    monkeypatch.setattr(tasks.members, "group_members", broken)
    jobs = JobStore(store_of(job_app))
    jobs.create("job-x", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc),
                request={"request": "x", "models": []})
    assert tasks.expand_job("job-x") == 0
    failed = jobs.get("job-x")
    assert failed.status == "failed" and failed.error_status == 500
    assert failed.error == "internal error (AttributeError) while finding the job's patients"


def test_a_ward_tick_is_the_slot_the_scheduler_sent_it_in_whatever_the_worker_s_clock(job_app: Flask) -> None:
    """beat sends the 08:15 tick just after 08:15 by its clock, expiring one interval later: the slot comes
    from that, so a worker whose clock is behind, or that runs the tick late, starts the 08:15 job."""
    settings = load_settings({"wards": "ward-a", "ward_interval": 900})
    runtime.configure(settings, job_app.extensions["fhir_ai"])
    boundary = datetime(2026, 11, 20, 8, 15, tzinfo=timezone.utc)
    sent = boundary + timedelta(milliseconds=2)
    tasks.rescore_wards.push_request(expires=(sent + timedelta(seconds=900)).isoformat())
    try:
        started = tasks.rescore_wards()
    finally:
        tasks.rescore_wards.pop_request()
    assert started == [tasks.ward_job_id("ward-a", int(boundary.timestamp() // 900))]
    assert JobStore(store_of(job_app)).get(started[0]).as_of == boundary


def test_group_members_are_read_as_fhir_references() -> None:
    """Versioned references count; an absolute one only on the source's own server (a Patient p2 elsewhere
    is another person); an entity that is not an object is skipped, not a crash."""
    from fhir_ai.jobs.members import group_patients
    base = "https://fhir.hospital.example/r4"
    group = {"resourceType": "Group", "id": "w", "member": [
        {"entity": {"reference": "Patient/p1/_history/3"}},
        {"entity": {"reference": f"{base}/Patient/p3"}},
        {"entity": {"reference": "https://other.example/fhir/Patient/p2"}},
        {"entity": "Patient/p4"},
        {"entity": {"reference": "Practitioner/d1"}},
        {"entity": {"reference": "Patient/p5"}, "inactive": True}]}
    assert group_patients(group, base) == ["p1", "p3"]
    assert group_patients(group) == ["p1"]                         # a folder source: no absolute references


def test_a_claim_is_nobody_else_s_until_it_runs_out_even_for_the_same_task(job_app: Flask) -> None:
    """A chunk past the visibility timeout is handed to another worker with the same task id while the first
    may still run: the copy leaves the claimed patient alone; once the claim has run out (the holder died),
    the patient is assessed and the abandoned claim counted."""
    jobs = running_job(job_app, "job-r", WARD[:1])
    assert jobs.claim("job-r", WARD[0], lease=600, holder="task-1:aaaa") == 0
    assert tasks.assess_chunk.apply(args=("job-r", WARD[:1]), task_id="task-1").get() == 0     # left alone
    assert item(job_app, "job-r", WARD[0]).status == "pending"
    reopen(job_app, "job-r", WARD[0], claimed_until=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert tasks.assess_chunk.apply(args=("job-r", WARD[:1]), task_id="task-1").get() == 1
    assert item(job_app, "job-r", WARD[0]).attempts == 1 and jobs.status("job-r") == "completed"


def test_a_patient_held_by_another_claim_is_looked_at_again_when_the_claim_runs_out(job_app: Flask,
                                                                                      monkeypatch) -> None:
    """Not left to resume_jobs' long silence: the chunk that found the patient held queues it again for just
    after the claim runs out."""
    jobs = running_job(job_app, "job-h", WARD[:2])
    jobs.claim("job-h", WARD[0], lease=120, holder="a-worker-that-died")
    queued_again: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(tasks.assess_chunk, "apply_async", lambda args, **options: queued_again.append((args, options)))
    assert tasks.assess_chunk("job-h", WARD[:2]) == 1
    assert [args for args, _ in queued_again] == [("job-h", [WARD[0]])]
    assert 110 <= queued_again[0][1]["countdown"] <= 122


def test_the_queue_backlog_is_read_from_redis() -> None:
    import uuid as uuid_

    import redis
    settings = load_settings({"job_queue": f"test-backlog-{uuid_.uuid4().hex[:8]}"})
    client = redis.Redis.from_url(settings.broker_url)
    try:
        assert tasks._queue_waiting(settings) == 0
        client.rpush(settings.job_queue, b"a", b"b")
        client.rpush(f"{settings.job_queue}\x06\x163", b"c")          # a priority list of kombu's
        assert tasks._queue_waiting(settings) == 3
    finally:
        client.delete(settings.job_queue, f"{settings.job_queue}\x06\x163")
        client.close()
    assert tasks._queue_waiting(load_settings({"broker_url": "redis://127.0.0.1:9/0"})) is None
