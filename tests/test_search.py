"""GET /RiskAssessment: all ten R4 search parameters with their prefixes and modifiers, sorting,
_summary=count, and keyset paging that stays correct while new assessments arrive."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir_ai import codes
from fhir_ai.search import values

try:
    from .stored import ids, module_app, risk_assessment, save
except ImportError:
    from stored import ids, module_app, risk_assessment, save  # type: ignore[no-redef]

MV = codes.MODEL_VERSION_SYSTEM
SEOUL_LATE = quote("2026-11-21T00:30:00+09:00")   # = 2026-11-20T15:30:00Z

CORPUS = [
    risk_assessment("a1", date="2026-11-20T08:00:00Z", probability=0.12, risk="low"),
    risk_assessment("a2", encounter="Encounter/e2", date="2026-11-20T23:30:00Z", probability=0.45,
                    version="1.1"),
    risk_assessment("a3", subject="Patient/p2", encounter="Encounter/e3", date="2026-11-21T00:30:00+09:00",
                    probability=0.81, risk="high", version="1.1", condition={"reference": "Condition/c1"}),
    risk_assessment("a4", subject="Patient/p3", encounter=None, date="2026-12-01T10:00:00Z", probability=None,
                    risk=None, model="news2", version="rcp-2017", status="cancelled",
                    performer={"reference": "Device/d1"}),
    risk_assessment("a5", subject="Group/g1", encounter=None, date="2025-06-15T00:00:00Z", probability=0.25),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with module_app(tmp_path_factory.mktemp("search")) as app:
        for resource in CORPUS:
            save(app, resource)
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.mark.parametrize("query, expected", [
    # date: partial dates, every prefix, time zones (a3 is the 21st in Seoul but the 20th in UTC)
    ("date=2026-11-20", {"a1", "a2", "a3"}),
    ("date=2026-11-21", set()),
    (f"date={SEOUL_LATE}", {"a3"}),
    ("date=2026-11-20T15:30:00Z", {"a3"}),
    ("date=2026-11", {"a1", "a2", "a3"}),
    ("date=2026", {"a1", "a2", "a3", "a4"}),
    ("date=eq2026-11-20", {"a1", "a2", "a3"}),
    ("date=ne2026-11-20", {"a4", "a5"}),
    ("date=ge2026-11-20T15:30:00Z", {"a2", "a3", "a4"}),
    ("date=gt2026-11-20T15:30:00Z", {"a2", "a4"}),
    ("date=lt2026-11-20T15:30:00Z", {"a1", "a5"}),
    ("date=le2026-11-20T15:30:00Z", {"a1", "a3", "a5"}),
    ("date=gt2026-11-20T10:00:00-05:00", {"a2", "a3", "a4"}),    # 15:00Z: a3 (15:30Z) is after it
    ("date=sa2026-11-20", {"a4"}),
    ("date=eb2026", {"a5"}),
    ("date=ge2026-11-20&date=lt2026-12", {"a1", "a2", "a3"}),     # repeated: AND
    ("date=2025,2026-12", {"a4", "a5"}),                          # comma: OR
    ("date:missing=false", {"a1", "a2", "a3", "a4", "a5"}),
    # probability: number prefixes with the value's precision
    ("probability=0.45", {"a2"}),
    ("probability=0.2", set()),
    ("probability=0.25", {"a5"}),
    ("probability=gt0.4", {"a2", "a3"}),
    ("probability=lt0.2", {"a1"}),
    ("probability=ge0.45", {"a2", "a3"}),
    ("probability=le0.25", {"a1", "a5"}),
    ("probability=ne0.45", {"a1", "a3", "a5"}),
    ("probability=ap0.8", {"a3"}),
    ("probability=sa0.8", {"a3"}),
    ("probability=eb0.2", {"a1"}),
    ("probability:missing=true", {"a4"}),
    # risk: token on qualitativeRisk
    ("risk=high", {"a3"}),
    (f"risk={codes.RISK_PROBABILITY}|moderate", {"a2", "a5"}),
    ("risk=moderate,high", {"a2", "a3", "a5"}),
    ("risk:not=moderate", {"a1", "a3", "a4"}),
    ("risk=http://other.example|high", set()),
    # method: model id, and model *and* version
    ("method=deterioration", {"a1", "a2", "a3", "a5"}),
    (f"method={codes.MODEL_SYSTEM}|news2", {"a4"}),
    (f"method={MV}|deterioration|1.1", {"a2", "a3"}),
    ("method=|deterioration", set()),
    # identifier: system|value
    (f"identifier={codes.ASSESSMENT_IDENTIFIER}|key-a3", {"a3"}),
    ("identifier=key-a3", {"a3"}),
    ("identifier=http://other.example|key-a3", set()),
    # patient / subject / encounter / condition / performer: references
    ("patient=p1", {"a1", "a2"}),
    ("patient=Patient/p2", {"a3"}),
    ("patient=https://hospital.test/fhir/Patient/p1", {"a1", "a2"}),
    ("patient=g1", set()),
    ("subject=Patient/p1", {"a1", "a2"}),
    ("subject=Group/g1", {"a5"}),
    ("subject:Group=g1", {"a5"}),
    ("subject=g1", {"a5"}),
    ("encounter=e2", {"a2"}),
    ("encounter=Encounter/e3", {"a3"}),
    ("encounter:missing=true", {"a4", "a5"}),
    ("condition=Condition/c1", {"a3"}),
    ("condition=c1", {"a3"}),
    ("performer=Device/d1", {"a4"}),
    (f"performer:identifier={MV}|deterioration|1.0", {"a1", "a5"}),
    # combinations, _id, _lastUpdated
    ("patient=p1&risk=moderate", {"a2"}),
    ("_id=a1,a3", {"a1", "a3"}),
    ("_lastUpdated=ge2026-01-01", {"a1", "a2", "a3", "a4", "a5"}),
    ("_lastUpdated=lt2000", set()),
])
def test_search_parameters(client, query, expected):
    response = client.get(f"/RiskAssessment?{query}")
    assert response.status_code == 200, response.json
    assert ids(response.json) == expected
    assert response.json["total"] == len(expected)


NOW = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("query, expected", [
    # ± 10% of the time from the value to NOW (2026-11-30T08:00Z), around the value's own range
    ("date=ap2026-11-19T08:00:00Z", {"a1"}),              # 11 days: ± 26.4 h reaches 11-20T10:24, not 15:30
    ("date=ap2026-11-21T12:00:00Z", {"a2", "a3"}),        # 8 d 20 h: ± 21.2 h reaches back to 11-20T14:48
    ("date=ap2026-11-22T00:00:00Z", set()),               # 8 d 8 h: ± 20 h, from 11-21T04:00
    ("date=ap2026-12-01T09:00:00Z", {"a4"}),              # 1 d 1 h ahead: ± 2.5 h
    ("date=ap2026-12-01T06:00:00Z", set()),               # 22 h ahead: ± 2.2 h ends at 08:12, before 10:00
    ("date=ap2025", {"a5"}),                              # a whole year, widened by about 70 days
    ("date=ap2026-11-20,ap2026-12-01T10:00:00Z", {"a1", "a2", "a3", "a4"}),
])
def test_date_ap_is_approximately_relative_to_now(client, monkeypatch, query, expected):
    monkeypatch.setattr(values, "clock", lambda: NOW)
    response = client.get(f"/RiskAssessment?{query}")
    assert response.status_code == 200, response.json
    assert ids(response.json) == expected


def test_date_ap_pages_keep_the_first_pages_now(client, monkeypatch):
    """Every page of one ap search measures from the first page's now (the cursor carries it): a clock
    that moves on between pages must not widen the range and let a1 in on a later page."""
    monkeypatch.setattr(values, "clock", lambda: NOW)
    first = client.get("/RiskAssessment?date=ap2026-11-21T12:00:00Z&_count=1").json
    assert first["total"] == 2
    monkeypatch.setattr(values, "clock", lambda: NOW + timedelta(days=100))   # ± about 10 weeks now
    assert ids(client.get("/RiskAssessment?date=ap2026-11-21T12:00:00Z").json) >= {"a1", "a2", "a3", "a4"}
    later = _follow(client, next(link["url"] for link in first["link"] if link["relation"] == "next"))
    assert [ids(page) for page in [first, *later]] == [{"a3"}, {"a2"}]
    assert all(page["total"] == 2 for page in later)


@pytest.mark.parametrize("path, param", [("Provenance", "recorded"), ("AuditEvent", "date")])
def test_date_ap_on_provenance_and_audit_events(client, monkeypatch, path, param):
    """Their dates are when this server stored: NOW is put 10 days after one of them."""
    first = client.get(f"/{path}?_count=1").json["entry"][0]["resource"]
    recorded = datetime.fromisoformat(first["recorded"].replace("Z", "+00:00"))
    monkeypatch.setattr(values, "clock", lambda: recorded + timedelta(days=10))

    def found(when: datetime) -> set[str]:
        value = quote(f"ap{when.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
        response = client.get(f"/{path}?{param}={value}&_count=200")
        assert response.status_code == 200, response.json
        return ids(response.json)

    assert first["id"] in found(recorded - timedelta(days=1))        # 11 days from now: ± 26.4 h
    assert first["id"] not in found(recorded - timedelta(days=2))    # 12 days: ± 28.8 h ends 19.2 h before


def test_bundle_is_a_valid_searchset(client):
    body = client.get("/RiskAssessment?patient=p1").json
    Bundle.model_validate(body)
    assert body["entry"][0]["fullUrl"].startswith("http://localhost/RiskAssessment/")
    assert body["link"][0]["relation"] == "self" and "patient=p1" in body["link"][0]["url"]


@pytest.mark.parametrize("query, expression", [
    ("date=2026-13-01", "date"),
    ("date=xx2026", "date"),
    ("date=ap2026-13", "date"),
    ("probability=abc", "probability"),
    ("risk:above=high", "risk:above"),
    ("patient=Observation/1", "patient"),
    ("subject=Observation/1", "subject"),
    ("encounter:missing=maybe", "encounter:missing"),
    ("colour=blue", "colour"),
    ("_sort=probability", "_sort"),
    ("_summary=true", "_summary"),
    ("_count=201", "_count"),
    ("_count=%2B5", "_count"),                 # int() would take '+5', '1_0' and Arabic-Indic digits
    ("_count=1_0", "_count"),
    ("_count=%D9%A3", "_count"),
    ("_cursor=forged", "_cursor"),
    ("_include=RiskAssessment:subject", "_include"),
])
def test_malformed_or_unknown_parameters_are_400(client, query, expression):
    response = client.get(f"/RiskAssessment?{query}")
    assert response.status_code == 400
    assert response.json["resourceType"] == "OperationOutcome"
    assert response.json["issue"][0]["expression"] == [expression]


def test_lenient_handling_ignores_what_it_cannot_use(client):
    response = client.get("/RiskAssessment?colour=blue&date=never&risk=high", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    assert ids(response.json) == {"a3"}
    outcome = response.json["entry"][-1]
    assert outcome["search"]["mode"] == "outcome" and "colour" in outcome["resource"]["issue"][0]["diagnostics"]


def test_include_is_not_advertised(client):
    statement = client.get("/metadata").json
    resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == "RiskAssessment")
    assert "searchInclude" not in resource
    names = {p["name"] for p in resource["searchParam"]}
    assert names >= {"condition", "date", "encounter", "identifier", "method", "patient", "performer",
                     "probability", "risk", "subject", "_count", "_sort", "_summary"}


def test_summary_count(client):
    body = client.get("/RiskAssessment?_summary=count&patient=p1").json
    assert body["total"] == 2 and "entry" not in body


def test_sort_by_date_both_ways_and_default_newest_stored_first(client):
    ascending = [e["resource"]["id"] for e in client.get("/RiskAssessment?_sort=date").json["entry"]]
    assert ascending == ["a5", "a1", "a3", "a2", "a4"]
    descending = [e["resource"]["id"] for e in client.get("/RiskAssessment?_sort=-date").json["entry"]]
    assert descending == ascending[::-1]
    stored = [e["resource"]["id"] for e in client.get("/RiskAssessment").json["entry"]]
    assert stored == ["a5", "a4", "a3", "a2", "a1"]


def _follow(client, url):
    pages = []
    while url:
        body = client.get(url.replace("http://localhost", "")).json
        pages.append(body)
        url = next((link["url"] for link in body.get("link", []) if link["relation"] == "next"), None)
    return pages


@pytest.mark.parametrize("sort", ["", "&_sort=date", "&_sort=-date"])
def test_paging_stays_correct_while_new_assessments_arrive(tmp_path, sort):
    with module_app(tmp_path) as app:
        client = app.test_client()
        for n in range(7):
            save(app, risk_assessment(f"old-{n}", date=f"2026-11-{10 + n}T08:00:00Z"))
        first = client.get(f"/RiskAssessment?patient=p1&_count=3{sort}").json
        assert first["total"] == 7 and len(first["entry"]) == 3
        # New assessments arrive between pages, some dated in the middle of the ones already paged.
        for n in range(5):
            save(app, risk_assessment(f"new-{n}", date=f"2026-11-{10 + n}T12:00:00Z"))
        next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
        rest = _follow(client, next_url)
        seen = [e["resource"]["id"] for page in [first, *rest] for e in page["entry"]]
        assert sorted(seen) == sorted(f"old-{n}" for n in range(7))        # nothing skipped, nothing twice
        assert all(page["total"] == 7 for page in rest)
        assert [len(page["entry"]) for page in [first, *rest]] == [3, 3, 1]
        assert client.get("/RiskAssessment?patient=p1&_summary=count").json["total"] == 12
