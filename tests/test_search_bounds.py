"""Search values at the edges of what the server can hold: answered (200) or refused (400 naming the
parameter), never a 500."""
from __future__ import annotations

import base64
import json

import pytest

try:
    from .credentials import ROLE_TOKENS, bearer
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]


def cursor(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", [
    "/RiskAssessment?date=9999-12-31", "/RiskAssessment?date=9999", "/RiskAssessment?date=9999-12",
    "/RiskAssessment?date=ap9999-12-31", "/RiskAssessment?date=0001-01-01T00:00:00%2B01:00",
    "/RiskAssessment?_lastUpdated=9999-12-31", "/RiskAssessment?date=ge9999-12-31T23:59:59.999999Z",
    "/AuditEvent?date=9999-12-31", "/Provenance?recorded=9999-12-31", "/RiskAssessment/_history?_since=9999-12-31T23:59:59Z",
])
def test_dates_at_the_end_of_the_calendar_are_searched(client, path):
    answer = client.get(path, headers=bearer(ROLE_TOKENS["auditor"]))
    assert answer.status_code == 200, answer.get_data(as_text=True)


@pytest.mark.parametrize("query, name", [
    ("probability=1e1000000", "probability"), ("probability=-1e400", "probability"),
    ("_cursor=" + cursor([1]), "_cursor"), ("_cursor=" + cursor("x"), "_cursor"),
    ("_cursor=" + cursor({"h": 2 ** 70, "k": None, "s": 1}), "_cursor"),
    ("_cursor=" + cursor({"h": 1, "k": {"a": 1}, "s": 1}), "_cursor"),
    ("_cursor=" + cursor({"h": 1, "k": None, "s": True}), "_cursor"),
    ("patient=" + ",".join(["x"] * 101), "patient"),
])
def test_values_beyond_what_the_server_can_compare_are_a_400_naming_the_parameter(client, query, name):
    answer = client.get(f"/RiskAssessment?{query}", headers=bearer(ROLE_TOKENS["auditor"]))
    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert answer.json["issue"][0]["expression"] == [name]


def test_too_many_values_across_parameters_is_a_400(client):
    query = "&".join(f"identifier=v{n}," + ",".join(f"v{n}-{k}" for k in range(99)) for n in range(5))
    answer = client.get(f"/RiskAssessment?{query}", headers=bearer(ROLE_TOKENS["auditor"]))
    assert answer.status_code == 400 and "400 in one search" in answer.json["issue"][0]["diagnostics"]


def test_a_version_beyond_any_database_integer_is_not_found(client):
    answer = client.get("/RiskAssessment/a/_history/99999999999999999999999", headers=bearer(ROLE_TOKENS["auditor"]))
    assert answer.status_code == 404 and answer.json["resourceType"] == "OperationOutcome"
