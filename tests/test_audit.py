"""AuditEvents for creates, reads, searches; searching them; the hash chain catches tampering; export."""
from __future__ import annotations

import base64
import csv
import json
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.reference import Reference
from sqlalchemy import text

from fhir_ai.cli import main
from fhir_ai.store.actors import Actor
from fhir_ai.store import export
from fhir_ai.store.audit import Access, build_event
from fhir_ai.store.provenance import CLIENT_SYSTEM, client_reference
from fhir_ai.store.verify import verify

try:
    from .stored import risk_assessment, save
except ImportError:
    from stored import risk_assessment, save  # type: ignore[no-redef]

AS_OF = "2026-11-20T08:00:00Z"
FHIR = "application/fhir+json"


def assess(client, patient="demo-005"):
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]}
    return client.post(f"/Patient/{patient}/$assess", json=body, content_type=FHIR).json["entry"][0]["resource"]


def events(client, query=""):
    return [e["resource"] for e in client.get(f"/AuditEvent?{query}").json.get("entry", [])]


def test_create_read_and_search_are_audited(client):
    ra = assess(client)
    created = events(client, f"entity=RiskAssessment/{ra['id']}&action=C")
    assert len(created) == 1
    event = created[0]
    AuditEvent.model_validate(event)
    agent = event["agent"][0]
    assert agent["who"]["identifier"]["value"] == "test-suite"
    assert agent["role"][0]["coding"][0]["code"] == "admin"
    assert agent["network"]["address"] == "127.0.0.1"
    assert event["outcome"] == "0" and event["subtype"][1]["code"] == "assess"
    what = {e["what"]["reference"]: e for e in event["entity"] if "what" in e}
    assert f"RiskAssessment/{ra['id']}/_history/1" in what and "Patient/demo-005" in what
    assert what[f"RiskAssessment/{ra['id']}/_history/1"]["detail"][0]["type"] == "sha256"

    client.get(f"/RiskAssessment/{ra['id']}")
    client.get("/RiskAssessment?patient=demo-005&risk=high,moderate,low")
    reads = events(client, f"entity=RiskAssessment/{ra['id']}&action=R&subtype=read")
    assert len(reads) == 1 and reads[0]["agent"][0]["who"]["identifier"]["value"] == "test-suite"
    searches = events(client, "action=E&subtype=search-type&patient=demo-005")
    query = next(e["query"] for e in searches[0]["entity"] if "query" in e)
    assert base64.b64decode(query).decode() == "patient=demo-005&risk=high,moderate,low"
    # Who read what about this patient: the reads and searches name the patient.
    about = events(client, "patient=Patient/demo-005")
    assert {e["action"] for e in about} == {"C", "R", "E"}


def test_failures_are_audited_with_their_outcome(client):
    client.get("/RiskAssessment/does-not-exist")
    client.get("/RiskAssessment?colour=blue")
    failed = events(client, "outcome=4")
    assert {e["subtype"][0]["code"] for e in failed} >= {"read", "search-type"}
    assert any("404" in e.get("outcomeDesc", "") for e in failed)


def test_audit_event_search_parameters(client, app):
    ra = save(app, risk_assessment("x1"))
    client.get("/RiskAssessment/x1")
    # Stored by this process itself (no request): the agent is fhir-ai; the read is the test client's.
    assert [e["action"] for e in events(client, "agent=fhir-ai&entity=RiskAssessment/x1")] == ["C"]
    assert [e["action"] for e in events(client, "agent=test-suite&entity=RiskAssessment/x1")] == ["R"]
    assert events(client, "agent=someone-else") == []
    assert len(events(client, "date=ge2000-01-01&entity=RiskAssessment/x1")) == 2
    assert events(client, "date=lt2000-01-01") == []
    assert len(events(client, "address=127.0.0.1&entity=RiskAssessment/x1")) == 1
    one = events(client, "entity=RiskAssessment/x1&action=R")[0]
    assert client.get(f"/AuditEvent/{one['id']}").json["id"] == one["id"]
    newest_first = events(client, "_count=3")
    chain = [int(e["extension"][0]["extension"][0]["valueString"]) for e in newest_first]
    assert chain == sorted(chain, reverse=True)
    assert ra["id"] == "x1"
    assert client.get("/AuditEvent?action=Z&colour=1").status_code == 400
    assert client.put(f"/AuditEvent/{one['id']}", json=one).status_code == 405
    assert client.delete(f"/AuditEvent/{one['id']}").status_code == 405


def _trail(app, n=3):
    for i in range(n):
        save(app, risk_assessment(f"t{i}"))
    store = app.extensions["fhir_ai"].store
    with store.session() as session:
        report = verify(session)
    assert report.ok, report.problems
    assert report.events == n and report.versions == n and report.provenance == n
    return store


def _report(store):
    with store.session() as session:
        return verify(session)


@pytest.mark.parametrize("statement, expected", [
    # an event's content changed (outcome 0 → 4)
    ("UPDATE audit_event SET resource = REPLACE(resource, '\"outcome\":\"0\"', '\"outcome\":\"4\"') WHERE seq = 2",
     "altered"),
    # an event's searchable column changed (hide who did it)
    ("UPDATE audit_event SET agent = 'nobody' WHERE seq = 2", "columns differ"),
    # an event removed from the middle
    ("DELETE FROM audit_event WHERE seq = 2", "chain broken"),
    # an event's index rows removed (to hide it from searches)
    ("DELETE FROM search_index WHERE resource_type = 'AuditEvent' AND param = 'entity'", "search index"),
    # an event's index rows moved to another event (searches would find that one instead)
    ("UPDATE search_index SET resource_seq = 1 WHERE resource_type = 'AuditEvent' AND resource_seq = 2",
     "search index"),
    ("UPDATE search_index SET resource_id = (SELECT id FROM audit_event WHERE seq = 1) "
     "WHERE resource_type = 'AuditEvent' AND resource_seq = 2", "search index"),
    # a stored assessment changed after the fact
    ("UPDATE risk_assessment_version SET resource = REPLACE(resource, '0.25', '0.05')", "differs from what"),
    # a Provenance removed
    ("DELETE FROM provenance WHERE id = 'prov-t1-1'", "no longer stored"),
    # the newest event removed, head left as it was
    ("DELETE FROM audit_event WHERE seq = 3", "chain head"),
])
def test_tampering_is_detected(app, statement, expected):
    store = _trail(app)
    with store.engine.begin() as connection:
        connection.execute(text(statement))
    report = _report(store)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_removing_the_newest_events_and_rewinding_the_head_needs_an_anchor(app, runner):
    store = _trail(app)
    report = _report(store)
    anchor = f"{report.head_seq}:{report.head_hash}"
    with store.engine.begin() as connection:
        previous = connection.execute(text("SELECT hash FROM audit_event WHERE seq = 2")).scalar_one()
        connection.execute(text("DELETE FROM search_index WHERE resource_type = 'AuditEvent' AND resource_id = "
                                "(SELECT id FROM audit_event WHERE seq = 3)"))
        connection.execute(text("DELETE FROM audit_event WHERE seq = 3"))
        connection.execute(text("UPDATE audit_chain SET seq = 2, hash = :h"), {"h": previous})
        connection.execute(text("DELETE FROM search_index WHERE resource_id IN ('t2', 'prov-t2-1')"))
        connection.execute(text("DELETE FROM provenance WHERE id = 'prov-t2-1'"))
        connection.execute(text("DELETE FROM risk_assessment_version WHERE id = 't2'"))
        connection.execute(text("DELETE FROM risk_assessment WHERE id = 't2'"))
    assert _report(store).ok                      # a clean cut at the end cannot be seen from inside ...
    result = runner.invoke(main, ["audit", "verify", "--no-progress", "--anchor", anchor])
    assert result.exit_code == 1                  # ... but an anchor recorded earlier catches it
    assert "before the anchor" in result.output


def test_verify_command(app, runner):
    store = _trail(app)
    result = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "3 audit events" in result.output
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE risk_assessment SET resource = REPLACE(resource, 'final', 'amended')"))
    result = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert result.exit_code == 1 and "FAIL: RiskAssessment/t0: the current resource differs" in result.output


def test_export_ndjson_and_csv(app, client, runner, tmp_path):
    _trail(app, 2)
    client.get("/RiskAssessment/t0")
    out = tmp_path / "nd"
    result = runner.invoke(main, ["audit", "export", "--format", "ndjson", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = {name: (out / f"{name}.ndjson").read_text().splitlines()
             for name in ("RiskAssessment", "Provenance", "AuditEvent")}
    assert [len(v) for v in lines.values()] == [2, 2, 3]
    assert {json.loads(line)["resourceType"] for line in lines["AuditEvent"]} == {"AuditEvent"}
    csv_out = tmp_path / "csv"
    result = runner.invoke(main, ["audit", "export", "--format", "csv", "--out", str(csv_out), "--no-progress",
                                  "--type", "AuditEvent", "--since", "2000"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((csv_out / "AuditEvent.csv").open()))
    assert [r["action"] for r in rows] == ["C", "C", "R"]
    assert rows[2]["agent"] == "test-suite" and rows[2]["entities"].startswith("RiskAssessment/t0/_history/1")
    assert not (csv_out / "RiskAssessment.csv").exists()
    later = runner.invoke(main, ["audit", "export", "--out", str(tmp_path / "later"), "--no-progress",
                                 "--since", "2999-01-01"])
    assert later.exit_code == 0 and (tmp_path / "later" / "AuditEvent.ndjson").read_text() == ""
    bad = runner.invoke(main, ["audit", "export", "--out", str(tmp_path / "x"), "--since", "last week"])
    assert bad.exit_code == 2


@pytest.mark.parametrize("issuer, identifier", [
    (None, {"system": CLIENT_SYSTEM, "value": "ehr-1"}),
    ("https://idp.hospital.test", {"system": "https://idp.hospital.test", "value": "ehr-1"}),
    ("urn:oid:1.2.410.200", {"system": "urn:oid:1.2.410.200", "value": "ehr-1"}),
    # not a URI: it cannot be the identifier's system, so it is named as the assigner
    ("hospital idp", {"system": CLIENT_SYSTEM, "value": "ehr-1", "assigner": {"display": "hospital idp"}}),
])
def test_a_client_reference_names_the_issuer_its_client_id_belongs_to(issuer, identifier) -> None:
    reference = client_reference(Actor("ehr-1", "ehr", None, "client", issuer))
    assert reference["identifier"] == identifier
    Reference.model_validate(reference)            # a valid FHIR Reference either way
    event = build_event(Access("R", "read"), Actor("ehr-1", "ehr", None, "client", issuer), datetime.now(timezone.utc))
    assert event["agent"][0]["who"] == reference


def test_a_user_stated_by_the_caller_is_a_second_agent_and_the_requestor() -> None:
    """CDS Hooks: the EHR authenticated, the user it names (context.userId) is the one acting."""
    ehr = Actor("https://ehr.example.org/", "ehr", "10.0.0.7", "client")
    event = build_event(Access("C", "create", operation="assess"), ehr, datetime.now(timezone.utc))
    assert [a["requestor"] for a in event["agent"]] == [True]
    event = build_event(Access("C", "create", operation="assess"), replace(ehr, user="Practitioner/123"),
                        datetime.now(timezone.utc))
    first, user = event["agent"]
    assert first["who"]["identifier"]["value"] == "https://ehr.example.org/" and first["requestor"] is False
    assert first["network"]["address"] == "10.0.0.7"
    assert user["who"] == {"reference": "Practitioner/123"} and user["requestor"] is True
    AuditEvent.model_validate(event)                 # a valid R4 AuditEvent
    header, columns = export.COLUMNS["AuditEvent"]
    row = dict(zip(header, columns(event)))
    assert row["agent"] == "https://ehr.example.org/" and row["user"] == "Practitioner/123"
