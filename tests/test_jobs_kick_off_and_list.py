"""The batch kick-off asks for ``Prefer: respond-async`` (FHIR asynchronous request pattern, as Bulk Data's
kick-off): without it, 400 naming the header and no job. ``GET /jobs`` lists the caller's jobs (an admin's:
everyone's), newest first, paged by ``link[next]``, with the same visibility as the status URLs."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fhir_ai.jobs import JobStore
from fhir_ai.jobs.tables import JobRow
from fhir_ai.store.trail_tables import AuditEventRow

# The batch-job fixtures (demo hospital folder with wards, tasks run eagerly) and helpers of test_jobs.
try:
    from .credentials import ROLE_TOKENS, bearer
    from .test_jobs import AS_OF, eager, hospital, jc, job_app, kick_off, parameters, store_of  # noqa: F401
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]
    from test_jobs import (AS_OF, eager, hospital, jc, job_app, kick_off,  # type: ignore  # noqa: F401
                           parameters, store_of)


def job_rows(app: Flask) -> int:
    with store_of(app).session() as session:
        return int(session.scalar(select(func.count()).select_from(JobRow)) or 0)


def audit_rows(app: Flask) -> int:
    with store_of(app).session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEventRow)) or 0)


# -- Prefer: respond-async ----------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/Group/ward-a/$assess", "/$assess-all"])
@pytest.mark.parametrize("prefer", [None, "handling=lenient", "respond-asynchronously", "return=minimal"])
def test_a_kick_off_without_prefer_respond_async_is_refused_naming_the_header(jc: FlaskClient, job_app: Flask,
                                                                              url: str, prefer: str | None) -> None:
    headers = {"Prefer": prefer} if prefer else {}
    response = jc.post(url, json=parameters(asOf=AS_OF), headers=headers)
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == "required"
    assert issue["expression"] == ["http.Prefer"] and "Prefer: respond-async" in issue["diagnostics"]
    assert job_rows(job_app) == 0                       # nothing started


@pytest.mark.parametrize("prefer, without", [
    (["Respond-Async"], []),                                        # preference names are case-insensitive
    (["handling=lenient, respond-async"], ["handling=lenient"]),    # a list of preferences
    (["respond-async; wait=10"], ["wait=10"]),                      # with parameters
    (["handling=strict", "respond-async"], ["handling=strict"]),    # two lines: two Prefer headers (RFC 7240)
])
def test_respond_async_is_found_however_the_client_writes_its_preferences(
        jc: FlaskClient, job_app: Flask, prefer: list[str], without: list[str]) -> None:
    response = jc.post("/Group/ward-b/$assess", json=parameters(asOf=AS_OF),
                       headers=[("Prefer", value) for value in without])
    assert response.status_code == 400 and job_rows(job_app) == 0      # the other preferences alone: refused
    response = jc.post("/Group/ward-b/$assess", json=parameters(asOf=AS_OF),
                       headers=[("Prefer", value) for value in prefer])
    assert response.status_code == 202, response.get_json()
    assert response.headers["Content-Location"].startswith("http://localhost/jobs/")


def test_the_operation_definitions_say_the_header_is_required(jc: FlaskClient) -> None:
    for name in ("group-assess", "assess-all"):
        description = jc.get(f"/OperationDefinition/{name}").get_json()["description"]
        assert "must send Prefer: respond-async" in description and "400" in description


# -- GET /jobs ------------------------------------------------------------------------------------------

def _job(jobs: JobStore, job_id: str, created: datetime, by: str = "test-suite", role: str = "admin") -> None:
    jobs.create(job_id, kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
                request={"request": f"http://localhost/Group/ward-a/$assess#{job_id}"}, requested_by=by,
                requested_role=role)
    with jobs.store.session() as session, session.begin():
        session.get(JobRow, job_id).created_at = created       # a known order, a tie included


def test_the_job_list_shows_each_job_with_its_status_url_and_counts(jc: FlaskClient, job_app: Flask) -> None:
    status_url = kick_off(jc, "/Group/ward-a/$assess", parameters(asOf=AS_OF, model="triage"))
    response = jc.get("/jobs")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    (listed,) = body["jobs"]
    assert listed["url"] == f"http://localhost{status_url}" and listed["job"] == status_url.rsplit("/", 1)[1]
    assert listed["status"] == "completed" and listed["kind"] == "group" and listed["scope"] == "ward-a"
    assert listed["request"] == "http://localhost/Group/ward-a/$assess" and listed["transactionTime"] == AS_OF
    assert (listed["patients"], listed["done"], listed["assessed"], listed["insufficientData"],
            listed["notApplicable"], listed["failed"]) == (4, 4, 0, 0, 4, 0)
    assert listed["completed"] is not None and listed["requested"] <= listed["completed"]
    assert body["link"] == [{"relation": "self", "url": "http://localhost/jobs?_count=50"}]
    assert jc.get("/jobs", headers={"Accept": "application/fhir+xml"}).status_code == 406


def test_each_client_lists_only_its_own_jobs_an_admin_everyones_and_cancelled_ones_are_gone(
        jc: FlaskClient, job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    _job(jobs, "mine", now)
    _job(jobs, "ehr-job", now + timedelta(minutes=1), by="ehr-client", role="ehr")
    _job(jobs, "gone", now + timedelta(minutes=2))
    jobs.cancel("gone")
    jobs.fail("mine", "Group/ward-a is not known to the hospital's FHIR server", 404)
    ehr = bearer(ROLE_TOKENS["ehr"])
    assert [j["job"] for j in jc.get("/jobs", headers=ehr).get_json()["jobs"]] == ["ehr-job"]
    listed = jc.get("/jobs").get_json()["jobs"]                 # the admin
    assert [j["job"] for j in listed] == ["ehr-job", "mine"]
    assert listed[0]["patients"] is None and listed[0]["status"] == "queued"      # members not read yet
    assert listed[1]["status"] == "failed" and "not known" in listed[1]["error"]
    # The same rule as the status URL: what the list shows, the status URL answers (and the reverse).
    assert jc.get("/jobs/ehr-job", headers=ehr).status_code == 202
    assert jc.get("/jobs/mine", headers=ehr).status_code == 404
    assert jc.get("/jobs", headers=bearer(ROLE_TOKENS["integrator"])).status_code == 403   # no RiskAssessment.r


def test_the_job_list_pages_by_next_links_newest_first(jc: FlaskClient, job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    now = datetime(2026, 11, 26, 12, 0, 0, 123457, tzinfo=timezone.utc)
    for n in range(5):
        _job(jobs, f"job-{n}", now + timedelta(seconds=n // 2))      # job-0/1 and job-2/3 share a time
    seen, url, pages = [], "/jobs?_count=2", 0
    while url:
        body = jc.get(url).get_json()
        seen += [j["job"] for j in body["jobs"]]
        pages += 1
        url = next((link["url"].removeprefix("http://localhost") for link in body["link"]
                    if link["relation"] == "next"), None)
    assert seen == ["job-4", "job-3", "job-2", "job-1", "job-0"] and pages == 3


@pytest.mark.parametrize("query, where", [
    ("_count=0", "_count"), ("_count=many", "_count"), ("_count=201", "_count"), ("_cursor=yesterday", "_cursor"),
    ("_cursor=99999999999999999999~x", "_cursor"), ("status=running", "status")])
def test_bad_job_list_parameters_are_400_naming_them(jc: FlaskClient, query: str, where: str) -> None:
    response = jc.get(f"/jobs?{query}")
    assert response.status_code == 400, query
    assert response.get_json()["issue"][0]["expression"] == [where]


def test_listing_jobs_is_not_audited_like_a_progress_poll(jc: FlaskClient, job_app: Flask) -> None:
    kick_off(jc, "/Group/ward-b/$assess")
    before = audit_rows(job_app)
    assert jc.get("/jobs").status_code == 200
    assert audit_rows(job_app) == before
