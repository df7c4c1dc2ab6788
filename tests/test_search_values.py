"""Search parameter values: prefixes, the range a partial date or a number stands for, tokens, references."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fhir_ai.errors import BadRequest, NotSupported
from fhir_ai.search import parse_query
from fhir_ai.search import values
from fhir_ai.search.params import Cursor
from fhir_ai.search.values import (Reference, Token, date_range, parse_date, parse_number, parse_reference,
                                   parse_token, split_values)

UTC = timezone.utc


@pytest.mark.parametrize("text, low, high", [
    ("2026", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("2026-02", datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
    ("2026-12", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 11, 21, tzinfo=UTC)),
    ("2026-11-20T08:00", datetime(2026, 11, 20, 8, tzinfo=UTC), datetime(2026, 11, 20, 8, 1, tzinfo=UTC)),
    ("2026-11-20T08:00:00Z", datetime(2026, 11, 20, 8, tzinfo=UTC), datetime(2026, 11, 20, 8, 0, 1, tzinfo=UTC)),
    # Seoul is 9 h ahead: 17:00+09:00 is 08:00Z.
    ("2026-11-20T17:00:00+09:00", datetime(2026, 11, 20, 8, tzinfo=UTC),
     datetime(2026, 11, 20, 8, 0, 1, tzinfo=UTC)),
    ("2026-11-20T08:00:00.5Z", datetime(2026, 11, 20, 8, 0, 0, 500000, tzinfo=UTC),
     datetime(2026, 11, 20, 8, 0, 0, 600000, tzinfo=UTC)),
    ("2026-11-20T03:00:00-05:00", datetime(2026, 11, 20, 8, tzinfo=UTC),
     datetime(2026, 11, 20, 8, 0, 1, tzinfo=UTC)),
])
def test_a_date_stands_for_the_range_of_its_precision(text, low, high):
    assert date_range(text) == (low, high)


@pytest.mark.parametrize("text", ["2026-13", "2026-02-30", "26-11-20", "2026-11-20T25:00:00Z", "yesterday",
                                  "2026-11-20T08:00:00+15:00", ""])
def test_malformed_dates_are_refused(text):
    with pytest.raises(ValueError):
        date_range(text)


@pytest.mark.parametrize("text, prefix", [("2026", "eq"), ("eq2026", "eq"), ("ne2026", "ne"), ("lt2026", "lt"),
                                          ("gt2026", "gt"), ("le2026", "le"), ("ge2026", "ge"), ("sa2026", "sa"),
                                          ("eb2026", "eb"), ("ap2026", "ap")])
def test_date_prefixes(text, prefix):
    assert parse_date(text).prefix == prefix


def test_unknown_date_prefixes():
    with pytest.raises(ValueError, match="'xx2026' is no value: a number or date, optionally after a prefix "
                                         r"\(eq, .*\); 'xx' is none of them"):
        parse_date("xx2026")
    with pytest.raises(ValueError, match="not a FHIR date"):
        parse_date("ap")


NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize("text, low, high", [
    # 10 days before now: ± 1 day around the value's own day
    ("ap2026-11-16", datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 11, 18, tzinfo=UTC)),
    # 5 days ahead (09:00 in Seoul is 00:00Z): ± 12 h around the second
    ("ap2026-12-01T09:00:00+09:00", datetime(2026, 11, 30, 12, tzinfo=UTC),
     datetime(2026, 12, 1, 12, 0, 1, tzinfo=UTC)),
    # at now: the value's own precision range, nothing more
    ("ap2026-11-26", datetime(2026, 11, 26, tzinfo=UTC), datetime(2026, 11, 27, tzinfo=UTC)),
    # a month that began 25 days ago: ± 2.5 days
    ("ap2026-11", datetime(2026, 10, 29, 12, tzinfo=UTC), datetime(2026, 12, 3, 12, tzinfo=UTC)),
    # far from now the range is held within what a datetime can hold
    ("ap0001", datetime.min.replace(tzinfo=UTC),
     datetime(2, 1, 1, tzinfo=UTC) + (NOW - datetime(1, 1, 1, tzinfo=UTC)) / 10),
])
def test_ap_date_widens_by_a_tenth_of_the_distance_to_now(text, low, high):
    value = parse_date(text, now=NOW)
    assert value.prefix == "ap"
    assert (value.low, value.high) == (low, high)


def test_ap_date_reads_now_from_the_clock(monkeypatch):
    monkeypatch.setattr(values, "clock", lambda: NOW)
    assert parse_date("ap2026-11-16") == parse_date("ap2026-11-16", now=NOW)
    assert parse_date("eq2026-11-16", now=NOW) == parse_date("eq2026-11-16")   # only ap depends on now


@pytest.mark.parametrize("text, prefix, value, low, high", [
    ("0.25", "eq", 0.25, 0.245, 0.255),
    ("gt0.8", "gt", 0.8, 0.75, 0.85),
    ("100", "eq", 100, 99.5, 100.5),
    ("1e-2", "eq", 0.01, 0.005, 0.015),
    ("ap0.5", "ap", 0.5, 0.45, 0.55),
    ("le-1.5", "le", -1.5, -1.55, -1.45),
])
def test_numbers_carry_their_precision(text, prefix, value, low, high):
    number = parse_number(text)
    assert number.prefix == prefix
    assert number.value == pytest.approx(value)
    assert (number.low, number.high) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize("text", ["0.2.5", "high", "gt", "1e", "--1"])
def test_malformed_numbers_are_refused(text):
    with pytest.raises(ValueError):
        parse_number(text)


@pytest.mark.parametrize("text, token", [
    ("high", Token(None, "high")),
    ("http://x|high", Token("http://x", "high")),
    ("|high", Token("", "high")),
    ("http://x|", Token("http://x", None)),
    ("https://fhir-ai.invalid/CodeSystem/model-version|deterioration|1.2", Token(
        "https://fhir-ai.invalid/CodeSystem/model-version", "deterioration|1.2")),
    (r"a\|b", Token(None, "a|b")),
])
def test_tokens(text, token):
    assert parse_token(text) == token


def test_commas_separate_alternatives_unless_escaped():
    assert split_values(r"a,b\,c,d") == ["a", "b,c", "d"]


@pytest.mark.parametrize("text, reference", [
    ("p1", Reference(None, "p1")),
    ("Patient/p1", Reference("Patient", "p1")),
    ("Patient/p1/_history/3", Reference("Patient", "p1")),
    ("https://hospital.test/fhir/Patient/p1", Reference("Patient", "p1")),
])
def test_references(text, reference):
    assert parse_reference(text) == reference


@pytest.mark.parametrize("text", ["Patient/", "patient/p1", "Patient/p 1", "a/b/c", "https://x"])
def test_malformed_references_are_refused(text):
    with pytest.raises(ValueError):
        parse_reference(text)


def test_query_parsing_names_the_offending_parameter():
    with pytest.raises(BadRequest) as err:
        parse_query("RiskAssessment", [("probability", "gtx")])
    assert err.value.expression == ["probability"]
    with pytest.raises(BadRequest) as err:
        parse_query("RiskAssessment", [("risk:above", "high")])
    assert err.value.expression == ["risk:above"]
    with pytest.raises(NotSupported):
        parse_query("RiskAssessment", [("_include", "RiskAssessment:subject")])


def test_lenient_parsing_ignores_but_never_guesses_paging():
    query = parse_query("RiskAssessment", [("colour", "blue"), ("date", "never"), ("risk", "high")], lenient=True)
    assert query.ignored == ["colour", "date"] and len(query.filters) == 1
    with pytest.raises(BadRequest):
        parse_query("RiskAssessment", [("_count", "lots")], lenient=True)


def test_cursor_round_trip_and_forgery():
    cursor = Cursor(42, "2026-11-20T08:00:00+00:00", 7)
    assert Cursor.decode(cursor.encode()) == cursor
    with pytest.raises(BadRequest):
        Cursor.decode("not-a-cursor")
