"""The batch kick-off asks for ``Prefer: respond-async`` (FHIR asynchronous request pattern, as Bulk Data's
kick-off): without it, 400 naming the header and no job. ``GET /jobs`` lists the caller's jobs (an admin's:
everyone's), newest first, paged by ``link[next]``, with the same visibility as the status URLs."""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fhir_ai.app import create_app
from fhir_ai.jobs import JobStore, runtime
from fhir_ai.jobs.tables import JobRow
from fhir_ai.store.provenance import CLIENT_SYSTEM
from fhir_ai.store.trail_tables import AuditEventRow

# The batch-job fixtures (demo hospital folder with wards, tasks run eagerly) and helpers of test_jobs.
try:
    from .credentials import ROLE_TOKENS, bearer
    from .test_auth import AUDIENCE, ISSUER, JWKS, token
    from .test_jobs import AS_OF, eager, hospital, jc, job_app, kick_off, parameters, store_of  # noqa: F401
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]
    from test_auth import AUDIENCE, ISSUER, JWKS, token  # type: ignore[no-redef]
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
@pytest.mark.parametrize("prefer", [None, "handling=lenient", "respond-asynchronously", "return=minimal",
                                    'x-note="a, respond-async, b"'])     # inside a quoted value: no preference
def test_a_kick_off_without_prefer_respond_async_is_refused_naming_the_header(jc: FlaskClient, job_app: Flask,
                                                                              url: str, prefer: str | None) -> None:
    headers = {"Prefer": prefer} if prefer else {}
    response = jc.post(url, json=parameters(asOf=AS_OF), headers=headers)
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == "required"
    assert issue["location"] == ["http.Prefer"] and "Prefer: respond-async" in issue["diagnostics"]
    assert job_rows(job_app) == 0                       # nothing started


@pytest.mark.parametrize("prefer, without", [
    (["Respond-Async"], []),                                        # preference names are case-insensitive
    (["handling=lenient, respond-async"], ["handling=lenient"]),    # a list of preferences
    (["respond-async; wait=10"], ["wait=10"]),                      # with parameters
    (["handling=strict", "respond-async"], ["handling=strict"]),    # two lines: two Prefer headers (RFC 7240)
    (['x-note="a, b", respond-async'], ['x-note="a, b"']),          # a quoted comma ends no preference
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
    assert listed[1]["status"] == "failed"
    assert listed[1]["error"] == {"status": 404, "code": "not-found",
                                  "diagnostics": "the job failed; GET http://localhost/jobs/mine for the reason"}
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
    ("_cursor=99999999999999999999~x", "_cursor"), ("status=running", "status"),
    # digits, but not ASCII ones: "²" and "①" (int() cannot read them: was 500), "٣" (it can: was taken)
    ("_count=%C2%B2", "_count"), ("_count=%E2%91%A0", "_count"), ("_count=%D9%A3", "_count"),
    ("_cursor=%D9%A3~x", "_cursor")])
def test_bad_job_list_parameters_are_400_naming_them(jc: FlaskClient, query: str, where: str) -> None:
    response = jc.get(f"/jobs?{query}")
    assert response.status_code == 400, query
    assert response.get_json()["issue"][0]["expression"] == [where]


def test_listing_jobs_is_not_audited_like_a_progress_poll(jc: FlaskClient, job_app: Flask) -> None:
    kick_off(jc, "/Group/ward-b/$assess")
    before = audit_rows(job_app)
    assert jc.get("/jobs").status_code == 200
    assert audit_rows(job_app) == before


@responses.activate
def test_the_job_list_does_not_show_why_a_job_failed_only_its_audited_status_url_does(
        settings_overrides: dict[str, Any], eager: None) -> None:
    """The hospital's OperationOutcome, which a failed job's reason quotes, may name a patient; the list
    is not audited, so it gives the status and where to read the reason (an audited read)."""
    base = "https://ehr.example.org/fhir"
    responses.get(f"{base}/Group/ward-x", status=400, json={"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "invalid",
        "diagnostics": "Group member Patient/pat-4711 (DOE, JANE) references a merged record"}]})
    app = create_app({**settings_overrides, "source_url": base})
    runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
    try:
        client = app.test_client()
        status_url = kick_off(client, "/Group/ward-x/$assess")
        before = audit_rows(app)
        listed = client.get("/jobs")
        assert audit_rows(app) == before                       # not audited ...
        text = listed.get_data(as_text=True)
        assert "pat-4711" not in text and "DOE" not in text    # ... so nothing the hospital said
        (job,) = listed.get_json()["jobs"]
        assert job["status"] == "failed" and job["error"]["status"] == 502 and job["error"]["code"] == "transient"
        assert f"GET http://localhost{status_url}" in job["error"]["diagnostics"]
        answer = client.get(status_url)                        # the status URL says why, and is audited
        assert answer.status_code == 502 and "pat-4711" in answer.get_json()["issue"][0]["diagnostics"]
        assert audit_rows(app) == before + 1
    finally:
        app.extensions["fhir_ai"].close()
        runtime.close()


def test_a_listed_bulk_data_run_shows_the_patients_it_scored(jc: FlaskClient, job_app: Flask) -> None:
    """A Bulk Data run (fhir-ai bulk-export-assess) has no patient rows: its numbers come from its result;
    what it does not count is null, not 0."""
    jobs = JobStore(store_of(job_app))
    jobs.create("bulk-1", kind="bulk-export", scope="https://ehr.example.org/fhir/Patient/$export",
                as_of=datetime(2026, 11, 20, tzinfo=timezone.utc), request={"request": "GET x", "since": None})
    jobs.start("bulk-1")
    assert jc.get("/jobs").get_json()["jobs"][0]["patients"] is None           # under way: not known yet
    jobs.set_result("bulk-1", {"transactionTime": AS_OF, "patients": 12, "assessed": 11, "stored": 11,
                               "written": 11, "bundles": 1}, status="completed")
    (listed,) = jc.get("/jobs").get_json()["jobs"]
    assert (listed["kind"], listed["status"], listed["patients"], listed["done"], listed["assessed"]) == \
        ("bulk-export", "completed", 12, 12, 11)
    assert listed["insufficientData"] is listed["notApplicable"] is listed["failed"] is None
    manifest = jc.get("/jobs/bulk-1").get_json()                               # its status URL: the same
    assert (manifest["patients"], manifest["assessed"], manifest["failed"]) == (12, 11, None)


# -- who owns a job -------------------------------------------------------------------------------------

OTHER_ISSUER = "https://idp.partner.test"


@pytest.fixture
def jwt_jobs(settings_overrides: dict[str, Any], hospital: Path, eager: None) -> Iterator[Flask]:
    """A job app that also takes JWTs from two issuers."""
    app = create_app({**settings_overrides, "source_url": str(hospital), "auth_jwks": json.dumps(JWKS),
                      "auth_issuer": f"{ISSUER},{OTHER_ISSUER}", "auth_audience": AUDIENCE})
    runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
    yield app
    app.extensions["fhir_ai"].close()


def _jwt(client: str, issuer: str = ISSUER) -> dict[str, str]:
    return bearer(token(sub=client, iss=issuer, scope="system/RiskAssessment.crus"))


def _kick_off_as(client: FlaskClient, headers: dict[str, str]) -> str:
    response = client.post("/Group/ward-b/$assess", json=parameters(asOf=AS_OF),
                           headers={**headers, "Prefer": "respond-async"})
    assert response.status_code == 202, response.get_json()
    return response.headers["Content-Location"].removeprefix("http://localhost")


def _listed(client: FlaskClient, headers: dict[str, str]) -> list[str]:
    response = client.get("/jobs", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [j["job"] for j in response.get_json()["jobs"]]


def test_a_job_is_its_owners_by_how_it_authenticated_not_by_a_client_id_alone(jwt_jobs: Flask) -> None:
    """A static token's client, a JWT client of the same name, and that client id at another trusted
    issuer are three callers: none lists, reads or cancels another's job."""
    client = jwt_jobs.test_client()
    static, jwt_ehr, elsewhere = bearer(ROLE_TOKENS["ehr"]), _jwt("ehr-client"), _jwt("ehr-client", OTHER_ISSUER)
    jobs = {who: _kick_off_as(client, headers) for who, headers in
            (("static", static), ("jwt", jwt_ehr), ("elsewhere", elsewhere))}
    for who, headers in (("static", static), ("jwt", jwt_ehr), ("elsewhere", elsewhere)):
        assert _listed(client, headers) == [jobs[who].rsplit("/", 1)[1]], who
        assert client.get(jobs[who], headers=headers).status_code == 200, who
        for other, url in jobs.items():
            if other != who:
                assert client.get(url, headers=headers).status_code == 404, (who, other)
                assert client.delete(url, headers=headers).status_code == 404, (who, other)
    assert len(_listed(client, bearer(ROLE_TOKENS["admin"]))) == 3       # an admin sees them all
    # The assessments a job stores are audited under the client id, as the client's own requests are.
    with store_of(jwt_jobs).session() as session:
        assert {"ehr-client"} <= set(session.scalars(select(AuditEventRow.agent)))
        assert not {a for a in session.scalars(select(AuditEventRow.agent)) if a.startswith(("jwt", "static:"))}


def test_the_audit_trail_names_a_jwt_clients_issuer_as_well_as_its_client_id(jwt_jobs: Flask) -> None:
    """The same client id at two trusted issuers is two callers in the AuditEvents and Provenance of what
    their jobs store and of their own requests: the issuer is the client identifier's system, so an auditor
    finds one of them by ``agent:identifier=<issuer>|<client id>`` and both by ``agent=<client id>``."""
    client = jwt_jobs.test_client()
    here, elsewhere = _jwt("ehr-client"), _jwt("ehr-client", OTHER_ISSUER)
    for headers in (here, elsewhere):
        _kick_off_as(client, headers)
        assert client.get("/RiskAssessment?patient=demo-003", headers=headers).status_code == 200
    auditor = bearer(ROLE_TOKENS["auditor"])

    def events(query: str) -> list[dict[str, Any]]:
        response = client.get(f"/AuditEvent?{query}&_count=200", headers=auditor)
        assert response.status_code == 200, response.get_json()
        return [entry["resource"] for entry in response.get_json().get("entry", [])]

    # The first job stores the ward's assessments; the second finds them stored (repeats, audited as reads).
    for issuer, stored in ((ISSUER, ("C", "create")), (OTHER_ISSUER, ("R", "read"))):
        mine = events(f"agent:identifier={issuer}|ehr-client")
        assert {(e["action"], e["subtype"][0]["code"]) for e in mine} >= {stored, ("E", "search-type")}
        assert {json.dumps(e["agent"][0]["who"], sort_keys=True) for e in mine} == {json.dumps(
            {"identifier": {"system": issuer, "value": "ehr-client"},
             "display": f"ehr-client (issuer {issuer})"}, sort_keys=True)}
        created = [e for e in mine if e["action"] == "C"]
        provenance_ids = {entity["what"]["reference"].split("/_history")[0] for e in created
                          for entity in e.get("entity", []) if entity["what"]["reference"].startswith("Provenance/")}
        assert bool(provenance_ids) == (issuer == ISSUER)
        for reference in provenance_ids:
            provenance = client.get(f"/{reference}", headers=auditor).get_json()
            (enterer,) = [a for a in provenance["agent"] if a["type"]["coding"][0]["code"] == "enterer"]
            assert enterer["who"]["identifier"] == {"system": issuer, "value": "ehr-client"}
    both = events("agent=ehr-client")
    assert {e["agent"][0]["who"]["identifier"]["system"] for e in both} == {ISSUER, OTHER_ISSUER}
    # A static token's client stays in fhir_ai's own namespace, with no issuer.
    static = events("agent=auditor-client&subtype=search-type")
    assert static and {e["agent"][0]["who"]["identifier"]["system"] for e in static} == {CLIENT_SYSTEM}


def test_a_jwt_client_calling_itself_fhir_ai_is_audited_as_a_client_not_as_fhir_ai(jwt_jobs: Flask) -> None:
    """Only static tokens reserve the name 'fhir-ai'; a JWT client of that name starting a job is still a
    client in the audit trail of what the job stores, not fhir_ai acting on its own."""
    client = jwt_jobs.test_client()
    _kick_off_as(client, _jwt("fhir-ai"))
    with store_of(jwt_jobs).session() as session:
        created = [orjson.loads(text) for text in session.scalars(
            select(AuditEventRow.resource).where(AuditEventRow.agent == "fhir-ai", AuditEventRow.action == "C"))]
    assert created and {event["agent"][0]["type"]["text"] for event in created} == {"client"}


def test_long_client_ids_that_share_their_first_256_characters_are_two_owners(jwt_jobs: Flask) -> None:
    client = jwt_jobs.test_client()
    first, second = _jwt("x" * 300 + "-a"), _jwt("x" * 300 + "-b")
    mine = _kick_off_as(client, first)
    assert _listed(client, second) == [] and client.get(mine, headers=second).status_code == 404
    assert _listed(client, first) == [mine.rsplit("/", 1)[1]]
    with store_of(jwt_jobs).session() as session:
        (owner,) = session.scalars(select(JobRow.requested_by))
    assert owner.startswith("jwt#sha256:") and len(owner) <= 256


def test_jobs_recorded_by_a_bare_client_id_stay_a_static_clients_and_no_jwt_clients(jwt_jobs: Flask) -> None:
    """Jobs started before owners were keyed name the bare client id: the static token of that name (this
    server's own configuration) still sees them; a JWT client of that name does not (an admin does)."""
    client = jwt_jobs.test_client()
    JobStore(store_of(jwt_jobs)).create("before", kind="group", scope="ward-a",
                                        as_of=datetime(2026, 11, 20, tzinfo=timezone.utc), request={"request": "x"},
                                        requested_by="ehr-client", requested_role="ehr")
    assert _listed(client, bearer(ROLE_TOKENS["ehr"])) == ["before"]
    assert client.get("/jobs/before", headers=bearer(ROLE_TOKENS["ehr"])).status_code == 202
    assert _listed(client, _jwt("ehr-client")) == []
    assert client.get("/jobs/before", headers=_jwt("ehr-client")).status_code == 404
    assert _listed(client, bearer(ROLE_TOKENS["admin"])) == ["before"]
