"""Assessments are never changed in place: versions, vread, history (instance and type), withdrawal as
entered-in-error, Provenance."""
from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.provenance import Provenance

from fhir_ai import codes

try:
    from .stored import risk_assessment, save
except ImportError:
    from stored import risk_assessment, save  # type: ignore[no-redef]

AS_OF = "2026-11-20T08:00:00Z"
FHIR = "application/fhir+json"


def assess(client, patient="demo-005"):
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]}
    response = client.post(f"/Patient/{patient}/$assess", json=body, content_type=FHIR)
    assert response.status_code == 200, response.json
    return response.json["entry"][0]["resource"]


def withdraw(client, rid, reason="assessed the wrong patient", headers=None):
    body = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": reason}]}
    return client.post(f"/RiskAssessment/{rid}/$withdraw", json=body, content_type=FHIR, headers=headers or {})


def test_every_assessment_has_provenance_after_the_ai_transparency_approach(client):
    ra = assess(client)
    bundle = client.get(f"/Provenance?target=RiskAssessment/{ra['id']}").json
    assert bundle["total"] == 1
    prov = bundle["entry"][0]["resource"]
    Provenance.model_validate(prov)
    assert prov["target"] == [{"reference": f"RiskAssessment/{ra['id']}/_history/1"}]
    device = prov["contained"][0]
    method = ra["method"]["coding"][0]
    assert device["resourceType"] == "Device" and device["version"] == [{"value": method["version"]}]
    assert device["identifier"][0] == {"system": codes.MODEL_VERSION_SYSTEM,
                                       "value": f"deterioration|{method['version']}"}
    author = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "author")
    assert author["who"]["reference"] == "#model"
    enterer = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "enterer")
    assert enterer["who"]["identifier"]["value"] == "test-suite"
    inputs = {e["what"]["reference"] for e in prov["entity"] if "reference" in e["what"]}
    assert inputs == {b["reference"] for b in ra["basis"]}
    card = [e for e in prov["entity"] if "identifier" in e["what"]]
    assert card[0]["what"]["identifier"]["value"] == f"deterioration|{method['version']}"
    # by id, and by patient / entity
    assert client.get(f"/Provenance/{prov['id']}").json == prov
    observation = ra["basis"][0]["reference"]
    assert prov["id"] in {e["resource"]["id"] for e in client.get(f"/Provenance?entity={observation}").json["entry"]}
    assert client.get("/Provenance?patient=demo-005").json["total"] == 2      # the model's and NEWS2's
    # Reading a patient's Provenance is a read of that patient's record: its AuditEvents name the patient.
    reads = client.get("/AuditEvent?patient=demo-005&subtype=read,search-type&_count=200").json
    seen = set()
    for entry in reads["entry"]:
        event = entry["resource"]
        for entity in event.get("entity", []):
            reference = entity.get("what", {}).get("reference", "")
            if reference.startswith("Provenance/"):
                seen.add((event["subtype"][0]["code"], reference))
    mine = f"Provenance/{prov['id']}/_history/1"
    assert ("read", mine) in seen and ("search-type", mine) in seen


def test_withdrawal_is_a_new_version_and_history_keeps_the_old_one(client):
    ra = assess(client, "demo-004")
    response = withdraw(client, ra["id"], headers={"If-Match": 'W/"1"'})
    assert response.status_code == 200, response.json
    assert response.json["status"] == "entered-in-error"
    assert response.json["meta"]["versionId"] == "2"
    assert response.headers["ETag"] == 'W/"2"'
    assert response.json["note"][-1]["text"] == "Entered in error: assessed the wrong patient"

    current = client.get(f"/RiskAssessment/{ra['id']}")
    assert current.json["status"] == "entered-in-error" and current.headers["ETag"] == 'W/"2"'
    first = client.get(f"/RiskAssessment/{ra['id']}/_history/1").json
    assert first["status"] == "final" and first["prediction"] == ra["prediction"]
    history = client.get(f"/RiskAssessment/{ra['id']}/_history").json
    Bundle.model_validate(history)
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]

    # The withdrawal has its own Provenance: who, why, which version it replaces.
    provs = client.get(f"/Provenance?target=RiskAssessment/{ra['id']}&_sort=recorded").json["entry"]
    nullify = provs[-1]["resource"]
    assert nullify["activity"]["coding"][0]["code"] == "NULLIFY"
    assert nullify["reason"][0]["text"] == "assessed the wrong patient"
    assert nullify["entity"][0]["what"]["reference"] == f"RiskAssessment/{ra['id']}/_history/1"
    # Still found by search (an auditor must see it), with its status.
    found = client.get(f"/RiskAssessment?_id={ra['id']}").json["entry"][0]["resource"]
    assert found["status"] == "entered-in-error"
    # Withdrawing again changes nothing, but is on record.
    again = withdraw(client, ra["id"])
    assert again.status_code == 200 and again.json["meta"]["versionId"] == "2"
    events = client.get(f"/AuditEvent?entity=RiskAssessment/{ra['id']}/_history/2&subtype=withdraw").json["entry"]
    repeat = [e["resource"] for e in events if e["resource"]["action"] == "R"]
    assert len(repeat) == 1 and repeat[0]["outcomeDesc"].startswith("repeated withdrawal")
    assert {"reference": "Patient/demo-004"} in [e["what"] for e in repeat[0]["entity"]]


def test_assessing_the_same_data_again_after_a_withdrawal_says_so(client):
    """The same data give the same assessment, which was withdrawn: $assess returns it as it stands
    (entered-in-error) with a warning, never as a current risk, and stores nothing new."""
    ra = assess(client, "demo-006")
    assert withdraw(client, ra["id"]).status_code == 200
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]}
    again = client.post("/Patient/demo-006/$assess", json=body, content_type=FHIR).json
    resources = [e["resource"] for e in again["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert resources[0]["id"] == ra["id"] and resources[0]["status"] == "entered-in-error"
    outcome = next(e["resource"] for e in again["entry"] if e["resource"]["resourceType"] == "OperationOutcome")
    withdrawn = [i for i in outcome["issue"] if i["code"] == "business-rule"]
    assert len(withdrawn) == 1 and withdrawn[0]["severity"] == "warning"
    assert f"RiskAssessment/{ra['id']}" in withdrawn[0]["diagnostics"]
    assert "withdrawn as entered in error" in withdrawn[0]["diagnostics"]
    # the NEWS2 companion was not withdrawn: no warning for it
    assert resources[1]["status"] in ("final", "preliminary", "cancelled")
    assert client.get(f"/RiskAssessment/{ra['id']}/_history").json["total"] == 2


def test_reads_say_when_the_resource_last_changed_as_an_http_date(client):
    """Last-Modified is an HTTP date (RFC 9110 IMF-fixdate, whole seconds, GMT), for every stored type."""
    ra = assess(client, "demo-002")
    provenance = client.get(f"/Provenance?target=RiskAssessment/{ra['id']}").json["entry"][0]["resource"]
    event = client.get("/AuditEvent?_count=1").json["entry"][0]["resource"]
    for path, resource in ((f"/RiskAssessment/{ra['id']}", ra), (f"/RiskAssessment/{ra['id']}/_history/1", ra),
                           (f"/Provenance/{provenance['id']}", provenance), (f"/AuditEvent/{event['id']}", event)):
        response = client.get(path)
        assert response.status_code == 200, path
        header = response.headers["Last-Modified"]
        assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", header), header
        updated = datetime.fromisoformat(resource["meta"]["lastUpdated"].replace("Z", "+00:00"))
        assert parsedate_to_datetime(header) == updated.replace(microsecond=0), path
        assert response.headers["ETag"] == f'W/"{resource["meta"]["versionId"]}"'


def test_withdrawn_assessments_can_be_left_out_of_a_search(client):
    """status (ours: R4 defines none for RiskAssessment) is the current version's: an EHR showing a patient's
    risks asks status:not=entered-in-error; an auditor still finds everything."""
    kept, gone = assess(client, "demo-007"), assess(client, "demo-008")
    assert withdraw(client, gone["id"]).status_code == 200

    def ids(query):
        response = client.get(f"/RiskAssessment?{query}")
        assert response.status_code == 200, response.json
        return {e["resource"]["id"] for e in response.json.get("entry", [])}

    both = {kept["id"], gone["id"]}
    assert ids("status:not=entered-in-error") & both == {kept["id"]}
    assert ids("status=entered-in-error") == {gone["id"]}
    assert ids("status=http://hl7.org/fhir/observation-status|entered-in-error") == {gone["id"]}
    assert ids("status=|entered-in-error") == set()                      # the code has a system
    assert ids("status=final,entered-in-error") & both == both
    assert ids(f"_id={gone['id']}&status:missing=true") == set()
    statement = client.get("/metadata").json
    (resource,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "RiskAssessment"]
    (status,) = [p for p in resource["searchParam"] if p["name"] == "status"]
    assert status["type"] == "token" and "entered-in-error" in status["documentation"]


def test_withdrawal_errors(client):
    ra = assess(client, "demo-002")
    assert withdraw(client, "no-such-id").status_code == 404
    conflict = withdraw(client, ra["id"], headers={"If-Match": 'W/"7"'})
    assert conflict.status_code == 412 and conflict.json["resourceType"] == "OperationOutcome"
    missing = client.post(f"/RiskAssessment/{ra['id']}/$withdraw", json={"resourceType": "Parameters"},
                          content_type=FHIR)
    assert missing.status_code == 400
    assert client.get(f"/RiskAssessment/{ra['id']}").json["meta"]["versionId"] == "1"


def test_vread_and_history_of_unknown_versions(client):
    ra = assess(client, "demo-003")
    assert client.get(f"/RiskAssessment/{ra['id']}/_history/2").status_code == 404
    assert client.get(f"/RiskAssessment/{ra['id']}/_history/x").status_code == 400
    assert client.get("/RiskAssessment/nope/_history").status_code == 404
    assert client.put(f"/RiskAssessment/{ra['id']}", json=ra).status_code == 405
    assert client.delete(f"/RiskAssessment/{ra['id']}").status_code == 405


T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def stamp(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def timeline(app):
    """h1, h2, h3 stored a minute apart from T0, h2 withdrawn at +3 min, h4 stored at +4 min; the store's
    clock is ``set_clock(minutes)``."""
    store = app.extensions["fhir_ai"].store

    def set_clock(minutes: float) -> None:
        store._now = lambda: T0 + timedelta(minutes=minutes)

    for minute, rid in enumerate(["h1", "h2", "h3"]):
        set_clock(minute)
        save(app, risk_assessment(rid))
    set_clock(3)
    store.withdraw_assessment("h2", reason="wrong patient")
    set_clock(4)
    save(app, risk_assessment("h4"))
    return set_clock


def versions(bundle):
    return [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle.get("entry", [])]


def link(bundle, relation):
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == relation), None)


def test_type_history_lists_every_version_newest_first(client, timeline):
    response = client.get("/RiskAssessment/_history")
    assert response.status_code == 200, response.json
    body = response.json
    Bundle.model_validate(body)
    assert body["type"] == "history" and body["total"] == 5
    assert versions(body) == [("h4", "1"), ("h2", "2"), ("h3", "1"), ("h2", "1"), ("h1", "1")]
    assert [e["request"] for e in body["entry"]] == [
        {"method": "POST", "url": "RiskAssessment"}, {"method": "PUT", "url": "RiskAssessment/h2"},
        {"method": "POST", "url": "RiskAssessment"}, {"method": "POST", "url": "RiskAssessment"},
        {"method": "POST", "url": "RiskAssessment"}]
    withdrawn = body["entry"][1]
    assert withdrawn["resource"]["status"] == "entered-in-error"
    assert withdrawn["response"] == {"status": "200 OK", "etag": 'W/"2"',
                                     "lastModified": withdrawn["resource"]["meta"]["lastUpdated"]}
    assert withdrawn["fullUrl"] == "http://localhost/RiskAssessment/h2"
    assert body["entry"][3]["resource"]["status"] == "final"
    assert link(body, "self") == "http://localhost/RiskAssessment/_history" and link(body, "next") is None


@pytest.mark.parametrize("query, expected", [
    (f"_since={stamp(2)}", [("h4", "1"), ("h2", "2"), ("h3", "1")]),          # at or after: inclusive
    (f"_since={stamp(2.5)}", [("h4", "1"), ("h2", "2")]),
    ("_since=2026-11-20T17:03:00%2B09:00", [("h4", "1"), ("h2", "2")]),        # 08:03Z
    (f"_since={stamp(10)}", []),
    (f"_at={stamp(2.5)}", [("h3", "1"), ("h2", "1"), ("h1", "1")]),             # h2 not yet withdrawn
    (f"_at={stamp(3.5)}", [("h2", "2"), ("h3", "1"), ("h1", "1")]),
    (f"_at={stamp(3)}", [("h2", "2"), ("h3", "1"), ("h1", "1")]),               # withdrawn that second
    ("_at=2026-11-20T08:02", [("h3", "1"), ("h2", "1"), ("h1", "1")]),         # that minute
    ("_at=2026-11-20", [("h4", "1"), ("h2", "2"), ("h3", "1"), ("h2", "1"), ("h1", "1")]),
    ("_at=2026-11-19", []),
    (f"_since={stamp(1)}&_at={stamp(2.5)}", [("h3", "1"), ("h2", "1")]),
])
def test_type_history_since_and_at(client, timeline, query, expected):
    body = client.get(f"/RiskAssessment/_history?{query}").json
    assert versions(body) == expected
    assert body["total"] == len(expected)


def test_type_history_pages_by_next_links_while_new_versions_arrive(client, timeline):
    first = client.get(f"/RiskAssessment/_history?_count=2&_since={stamp(0)}").json
    assert versions(first) == [("h4", "1"), ("h2", "2")] and first["total"] == 5
    assert link(first, "self") == f"http://localhost/RiskAssessment/_history?_count=2&_since={stamp(0).replace(':', '%3A')}"
    # A new assessment and a withdrawal arrive between pages: the pages already begun do not show them.
    timeline(5)
    client.post("/RiskAssessment/h1/$withdraw", content_type=FHIR,
                json={"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "test"}]})
    timeline(6)
    client.application.extensions["fhir_ai"].store.save_assessment(
        risk_assessment("h5"), model_id="deterioration", model_version="1.0")
    pages, url = [first], link(first, "next")
    from sqlalchemy import event
    statements: list[str] = []
    engine = client.application.extensions["fhir_ai"].store.engine
    record = lambda conn, cursor, statement, *rest: statements.append(statement.lower())  # noqa: E731
    event.listen(engine, "before_cursor_execute", record)
    try:
        while url:
            assert "_count=2" in url and "_since=" in url and "_cursor=" in url
            page = client.get(url.replace("http://localhost", "")).json
            assert page["total"] == 5 and link(page, "self") == url
            pages.append(page)
            url = link(page, "next")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    # The later pages carry the first page's total in their cursor: the range is not counted again.
    assert statements and not any("count(" in s for s in statements if "risk_assessment_version" in s)
    # ... for the query it was counted for only: the same cursor on other parameters is counted anew.
    cursor = link(first, "next").split("_cursor=")[1]
    other = client.get(f"/RiskAssessment/_history?_count=2&_since={stamp(3)}&_cursor={cursor}").json
    assert other["total"] == 2          # h2's withdrawal (+3 min) and h4 (+4 min), not the first query's 5
    assert [versions(p) for p in pages] == [[("h4", "1"), ("h2", "2")], [("h3", "1"), ("h2", "1")], [("h1", "1")]]
    again = client.get("/RiskAssessment/_history?_count=2").json
    assert versions(again) == [("h5", "1"), ("h1", "2")] and again["total"] == 7
    counted = client.get("/RiskAssessment/_history?_count=0").json
    assert counted["total"] == 7 and "entry" not in counted and link(counted, "next") is None


@pytest.mark.parametrize("query, expression", [
    ("_since=2026-11-20", "_since"),                      # a date, not an instant
    ("_since=2026-11-20T08:00:00", "_since"),             # no zone
    ("_since=2026-11-20T08:00Z", "_since"),               # no seconds
    ("_since=2026-13-20T08:00:00Z", "_since"),
    ("_since=yesterday", "_since"),
    ("_at=2026-13-01", "_at"),
    ("_at=ge2026-11-20", "_at"),
    ("_count=abc", "_count"),
    ("_count=-1", "_count"),
    ("_count=201", "_count"),
    ("_cursor=forged", "_cursor"),
    ("_cursor=eyJoIjoxfQ", "_cursor"),                     # {"h":1}: not a history cursor
    ("patient=p1", "patient"),
])
def test_type_history_bad_parameters_are_400(client, query, expression):
    response = client.get(f"/RiskAssessment/_history?{query}")
    assert response.status_code == 400, response.json
    assert response.json["resourceType"] == "OperationOutcome"
    assert response.json["issue"][0]["expression"] == [expression]


def test_type_history_lenient_ignores_unknown_parameters_and_is_audited_and_declared(client, timeline):
    lenient = client.get("/RiskAssessment/_history?patient=p1&_count=1", headers={"Prefer": "handling=lenient"})
    assert lenient.status_code == 200 and versions(lenient.json) == [("h4", "1")]
    assert "patient" not in link(lenient.json, "next")
    client.get(f"/RiskAssessment/_history?_since={stamp(3)}")
    audited = [e["resource"] for e in client.get("/AuditEvent?subtype=history-type").json["entry"]]
    assert len(audited) == 2 and {e["action"] for e in audited} == {"R"} and {e["outcome"] for e in audited} == {"0"}
    event = audited[0]                                                  # newest first
    query = next(e["query"] for e in event["entity"] if "query" in e)
    assert base64.b64decode(query).decode() == f"_since={stamp(3)}"
    what = {e["what"]["reference"] for e in event["entity"] if "what" in e}
    assert what == {"RiskAssessment/h4/_history/1", "RiskAssessment/h2/_history/2", "Patient/p1"}
    statement = client.get("/metadata").json
    resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == "RiskAssessment")
    assert {"history-instance", "history-type"} <= {i["code"] for i in resource["interaction"]}


def test_versions_are_stamped_while_the_audit_chain_is_held(app, monkeypatch):
    """lastUpdated is taken under the chain's lock (which serialises every writer), so it follows commit
    order: a version stamped before another can never commit after it and slip behind a history page's
    high-water mark or a client's _since."""
    import fhir_ai.store.trail as trail
    store = app.extensions["fhir_ai"].store
    held: list[bool] = []
    real_init = trail.Chain.__init__

    def init(self, connection):  # type: ignore[no-untyped-def]
        real_init(self, connection)
        held.append(True)

    stamped: list[bool] = []
    real_now = store._now
    monkeypatch.setattr(trail.Chain, "__init__", init)
    monkeypatch.setattr(store, "_now", lambda: (stamped.append(len(held) > len(stamped)), real_now())[1])
    save(app, risk_assessment("lock-1"))
    store.withdraw_assessment("lock-1", reason="wrong patient")
    assert stamped == [True, True]
