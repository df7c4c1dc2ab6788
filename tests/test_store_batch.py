"""Storing several assessments in one transaction (``Store.save_assessments``, what $assess uses), and the
plain-SQL inserts under it: the same rows, events and errors as one save at a time, on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError

from fhir_ai.errors import Unprocessable
from fhir_ai.search.params import parse_query
from fhir_ai.store import NewAssessment, Store, indexing, rawsql
from fhir_ai.store.tables import AssessmentRow, OutboxRow
from fhir_ai.store.trail_tables import (AssessmentVersionRow, AuditEventRow, ChainHeadRow, ProvenanceRow,
                                       SearchIndexRow)
from fhir_ai.store.verify import verify

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]

AS_OF = "2026-11-20T08:00:00Z"
FHIR = "application/fhir+json"
TARGET = "https://hospital.test/fhir"


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    yield store
    store.close()


def item(rid: str, **kwargs) -> NewAssessment:
    return NewAssessment(risk_assessment(rid, **kwargs), "deterioration", "1.0")


def _events(store: Store) -> list[tuple[str, str]]:
    """(action, first entity reference) of every AuditEvent, in chain order."""
    with store.session() as session:
        rows = session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))
        return [(row.action, _first_entity(row.resource)) for row in rows]


def _first_entity(text: str) -> str:
    return orjson.loads(text)["entity"][0]["what"]["reference"]


def _count(store: Store, table) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(table))


def test_assess_stores_the_model_and_news2_assessments_in_one_transaction(app, client):
    store = app.extensions["fhir_ai"].store
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda connection: commits.append(1))
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]}
    first = client.post("/Patient/demo-005/$assess", json=body, content_type=FHIR)
    assert first.status_code == 200 and len(commits) == 1
    stored = [e["resource"] for e in first.json["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert len(stored) == 2
    assert [store.get_assessment(r["id"]) for r in stored] == stored
    again = client.post("/Patient/demo-005/$assess", json=body, content_type=FHIR)
    assert len(commits) == 2                                     # the repeat: one transaction (its read events)
    assert [e["resource"] for e in again.json["entry"][:2]] == stored
    refs = [f"RiskAssessment/{r['id']}/_history/1" for r in stored]
    assert _events(store) == [("C", refs[0]), ("C", refs[1]), ("R", refs[0]), ("R", refs[1])]
    with store.session() as session:
        report = verify(session)
    assert report.ok, report.problems


def test_a_batch_stores_what_one_save_at_a_time_stores(store):
    saved = store.save_assessments([item("b1"), NewAssessment(risk_assessment("b2"), "news2", "2", TARGET)])
    assert [s.created for s in saved] == [True, True]
    assert [s.resource["id"] for s in saved] == ["b1", "b2"]
    assert all(s.resource["meta"]["versionId"] == "1" for s in saved)
    single = store.save_assessment(risk_assessment("b3"), model_id="deterioration", model_version="1.0")
    for rid, found in (("b1", saved[0].resource), ("b2", saved[1].resource), ("b3", single.resource)):
        assert store.get_assessment(rid) == found
        assert store.assessment_history(rid) == [found]
        assert store.get_provenance(f"prov-{rid}-1")["target"] == [{"reference": f"RiskAssessment/{rid}/_history/1"}]
    with store.session() as session:
        seqs = list(session.scalars(select(AssessmentRow.seq).order_by(AssessmentRow.id)))
        prov_seqs = list(session.scalars(select(ProvenanceRow.seq).order_by(ProvenanceRow.target_id)))
        news2 = session.get(AssessmentRow, "b2")
        index = set(session.execute(select(SearchIndexRow.param, SearchIndexRow.code)
                                    .where(SearchIndexRow.resource_id == "b1")))
        report = verify(session)
    assert seqs == [1, 2, 3] and prov_seqs == [1, 2, 3]
    assert (news2.model_id, news2.model_version, news2.probability, news2.risk) == ("news2", "2", 0.25, "moderate")
    assert {("identifier", "key-b1"), ("subject", "p1"), ("risk", "moderate")} <= index
    assert [(row.resource_id, row.target) for row in store.outbox()] == [("b2", TARGET)]
    assert _events(store) == [("C", f"RiskAssessment/{rid}/_history/1") for rid in ("b1", "b2", "b3")]
    assert report.ok and report.versions == 3 and report.provenance == 3, report.problems


def test_repeats_in_and_across_batches_store_nothing_new_and_are_audited_as_reads(store):
    first = store.save_assessments([item("r1"), item("r1")])     # the same identifier twice in one batch
    assert [s.created for s in first] == [True, False]
    assert first[1].resource == first[0].resource
    again = store.save_assessments([item("r1"), item("r2")])
    assert [s.created for s in again] == [False, True]
    assert again[0].resource == first[0].resource
    assert _count(store, AssessmentRow) == 2 and _count(store, ProvenanceRow) == 2
    assert [action for action, _ in _events(store)] == ["C", "R", "R", "C"]
    with store.session() as session:
        assert verify(session).ok


def test_a_batch_is_all_or_nothing(store):
    store.save_assessment(risk_assessment("x1"), model_id="deterioration", model_version="1.0")
    with store.session() as session:
        head = session.get(ChainHeadRow, 1)
        before = (head.seq, head.hash)
    clash = risk_assessment("x1")
    clash["identifier"][0]["value"] = "another-identifier"
    with pytest.raises(Unprocessable, match="another identifier"):
        store.save_assessments([item("ok1"), NewAssessment(clash, "deterioration", "1.0", TARGET)])
    assert store.get_assessment("ok1") is None and store.get_provenance("prov-ok1-1") is None
    assert _count(store, AssessmentRow) == 1 and store.outbox() == []
    with store.session() as session:
        head = session.get(ChainHeadRow, 1)
        assert (head.seq, head.hash) == before
        assert verify(session).ok
    assert store.save_assessments([]) == []


def test_withdrawal_after_a_batch_keeps_the_trail_verifiable(store):
    store.save_assessments([item("w1"), item("w2")])
    withdrawn = store.withdraw_assessment("w2", reason="wrong patient")
    assert withdrawn.created and withdrawn.resource["meta"]["versionId"] == "2"
    assert store.get_provenance("prov-w2-2")["activity"]["coding"][0]["code"] == "NULLIFY"
    with store.session() as session:
        assert session.scalar(select(ProvenanceRow.seq).where(ProvenanceRow.id == "prov-w2-2")) == 3
        report = verify(session)
    assert report.ok and report.versions == 3, report.problems


def test_plain_inserts_store_what_core_inserts_store(store):
    when = datetime(2026, 11, 20, 8, 0, 0, 123456, tzinfo=timezone.utc)
    columns = ("resource_type", "resource_id", "target", "status", "attempts", "created_at", "updated_at")
    plain = rawsql.Insert(OutboxRow.__table__, columns)
    with store.transaction() as connection:
        plain.execute(connection, [("RiskAssessment", "plain", TARGET, "pending", 0, when, when),
                                   ("RiskAssessment", "plain2", TARGET, "failed", 1, when, when)])
        connection.execute(insert(OutboxRow.__table__), [dict(zip(columns, ("RiskAssessment", "core", TARGET,
                                                                            "pending", 0, when, when)))])
    rows = {row.resource_id: row for row in store.outbox()}
    assert rows["plain"].created_at == rows["core"].created_at
    assert rows["plain"].updated_at == rows["core"].updated_at
    assert (rows["plain2"].status, rows["plain2"].attempts) == ("failed", 1)
    numbers = rawsql.Insert(SearchIndexRow.__table__, ("resource_type", "resource_id", "param", "system", "code",
                                                       "number"))
    with store.transaction() as connection:        # an int and a float in one column, a missing number
        numbers.execute(connection, [("X", "n", "probability", None, None, 1),
                                     ("X", "n", "probability", None, None, 0.5),
                                     ("X", "n", "subject", "Patient", "p1", None)])
    with store.session() as session:
        values = sorted(session.execute(select(SearchIndexRow.number, SearchIndexRow.code)
                                        .where(SearchIndexRow.resource_id == "n")), key=str)
    assert values == sorted([(1.0, None), (0.5, None), (None, "p1")], key=str)


def test_plain_sql_errors_are_sqlalchemy_errors_and_roll_back(store):
    store.save_assessment(risk_assessment("e1"), model_id="deterioration", model_version="1.0")
    versions = rawsql.Insert(AssessmentVersionRow.__table__, ("id", "version_id", "last_updated", "resource"))
    now = datetime.now(timezone.utc)
    with pytest.raises(IntegrityError):
        with store.transaction() as connection:
            versions.execute(connection, [("e2", 1, now, "{}")])
            versions.execute(connection, [("e1", 1, now, "{}")])    # already stored: primary key
    with pytest.raises(DBAPIError):
        with store.transaction() as connection:
            rawsql.run(connection, "SELECT no_such_column FROM risk_assessment")
    assert store.assessment_history("e2") == []
    with store.session() as session:
        assert verify(session).ok


@pytest.mark.parametrize("reference, parsed", [
    ("Patient/p1", ("Patient", "p1")),
    ("https://h.test/fhir/Observation/o-1", ("Observation", "o-1")),
    ("Observation/o-1/_history/2", ("Observation", "o-1")),
    ("Observation/o-1/", ("Observation", "o-1")),
    ("o-1", (None, "o-1")),
    ("/o-1", ("", "o-1")),
    ("Patient/", (None, "Patient")),
    ("#model", None),
    ("", None),
])
def test_references_split_into_type_and_id(reference, parsed):
    assert indexing.split_reference(reference) == parsed


def test_provenance_entities_of_every_shape_are_indexed_as_references():
    """Basis references (the common 'Type/id' alone) and every other shape of entity.what: references become
    provenance_entity keys (id, type; each once), identifiers search index rows."""
    prov = {"entity": [{"what": {"reference": "Observation/o1"}},
                       {"what": {"reference": "https://h.test/fhir/Observation/o2"}},
                       {"what": {"reference": "Observation/o3/_history/4"}},
                       {"what": {"reference": "Observation/o4/"}},
                       {"what": {"reference": "o5"}},
                       {"what": {"reference": "#contained"}},
                       {"what": {"reference": ""}},
                       {"what": {"reference": "Observation/o6", "display": "SpO2"}},
                       {"what": {"identifier": {"system": "s", "value": "card"}, "display": "model card"}},
                       {"what": {"reference": "Observation/o1"}, "role": "quotation"},
                       {"what": {"reference": "Device/o1", "identifier": {"value": "d1"}}},
                       {"what": None}, {}]}
    assert indexing.provenance(prov, "p1") == (
        [("entity:identifier", "s", "card", None), ("entity:identifier", None, "d1", None),
         ("patient", "Patient", "p1", None)],
        [("o1", "Observation"), ("o2", "Observation"), ("o3", "Observation"), ("o4", "Observation"), ("o5", ""),
         ("o6", "Observation"), ("o1", "Device")])


def _search(store: Store, resource_type: str, query: str) -> list[str]:
    parsed = parse_query(resource_type, [tuple(part.split("=", 1)) for part in query.split("&")])
    return sorted(r["id"] for r in store.search(parsed).resources)


def test_every_provenance_and_audit_search_finds_a_stored_batch(store):
    """The index rows of a batch (many basis references per Provenance) answer every supported search."""
    basis = [{"reference": f"Observation/s1-obs-{n}"} for n in range(60)] + [
        {"reference": "https://h.test/fhir/Observation/far/_history/3"}]
    store.save_assessments([item("s1", basis=basis), NewAssessment(risk_assessment("s2"), "news2", "2")])
    assert _search(store, "Provenance", "entity=Observation/s1-obs-59") == ["prov-s1-1"]
    assert _search(store, "Provenance", "entity=s1-obs-0") == ["prov-s1-1"]
    assert _search(store, "Provenance", "entity=Observation/far") == ["prov-s1-1"]
    assert _search(store, "Provenance", "entity=Observation/s2-obs-1") == ["prov-s2-1"]
    assert _search(store, "Provenance", "entity:identifier=https://fhir-ai.invalid/model-card|deterioration|1.0") \
        == ["prov-s1-1"]                                         # NEWS2 has no model card
    assert _search(store, "Provenance", "target=RiskAssessment/s2") == ["prov-s2-1"]
    assert _search(store, "Provenance", "patient=p1") == ["prov-s1-1", "prov-s2-1"]
    assert _search(store, "Provenance", "agent:identifier=fhir-ai") == ["prov-s1-1", "prov-s2-1"]
    assert _search(store, "Provenance", "entity:missing=true") == []
    created = _search(store, "AuditEvent", "entity=RiskAssessment/s1&action=C&outcome=0")
    assert len(created) == 1
    assert _search(store, "AuditEvent", "entity=Provenance/prov-s1-1") == created
    assert _search(store, "AuditEvent", "patient=p1&subtype=assess&type=rest") == sorted(
        _search(store, "AuditEvent", "agent=fhir-ai"))
    assert len(_search(store, "AuditEvent", "patient=p1")) == 2
    assert _search(store, "RiskAssessment", "subject=Patient/p1&identifier=key-s2") == ["s2"]
    with store.session() as session:
        assert verify(session).ok


def test_a_failed_insert_stores_nothing_of_the_batch(store):
    """One INSERT of the batch failing (here the outbox: on PostgreSQL part of the one combined statement)
    rolls back every row of it: assessments, Provenance, events, index rows, the chain head."""
    store.save_assessments([item("f0")])
    with store.transaction() as connection:     # the outbox row the batch would add, already there
        rawsql.Insert(OutboxRow.__table__, ("resource_type", "resource_id", "target", "status", "attempts",
                                            "created_at", "updated_at")).execute(
            connection, [("RiskAssessment", "f2", TARGET, "pending", 0, datetime.now(timezone.utc),
                          datetime.now(timezone.utc))])
    with store.session() as session:
        head = session.get(ChainHeadRow, 1)
        before = (head.seq, head.hash, session.scalar(select(func.count()).select_from(SearchIndexRow)))
    with pytest.raises(IntegrityError):
        store.save_assessments([item("f1"), NewAssessment(risk_assessment("f2"), "deterioration", "1.0", TARGET)])
    with store.session() as session:
        head = session.get(ChainHeadRow, 1)
        assert (head.seq, head.hash, session.scalar(select(func.count()).select_from(SearchIndexRow))) == before
        assert verify(session).ok
    assert store.get_assessment("f1") is None and store.get_provenance("prov-f2-1") is None
    saved = store.save_assessments([item("f1")])                # the next batch numbers on from the last
    with store.session() as session:
        assert session.scalar(select(AssessmentRow.seq).where(AssessmentRow.id == "f1")) == 2
        assert verify(session).ok
    assert saved[0].created


def test_index_rows_sent_as_json_store_what_arrays_store(store):
    """Rows sent as one JSON array (PostgreSQL) store what a Core insert stores: quotes, backslashes,
    non-ASCII, empty and missing texts, ints, exact floats; NaN (no JSON for it) goes as arrays."""
    columns = ("resource_type", "resource_id", "param", "system", "code", "number")
    values = [("X", "j1", "code", 'sy"s\\tem', "ünï/cødé\n", None), ("X", "j2", "code", None, "", 1),
              ("X", "j3", "probability", None, None, 0.1 + 0.2), ("X", "j4", "probability", None, None, 1e-300)]
    with store.transaction() as connection:
        rawsql.Insert(SearchIndexRow.__table__, columns).execute(connection, values)
        rawsql.Insert(SearchIndexRow.__table__, columns).execute(
            connection, [("X", "j5", "probability", None, None, float("nan"))])
        connection.execute(insert(SearchIndexRow.__table__), [dict(zip(columns, ("X", "j6", "probability", None,
                                                                                 None, float("nan"))))])
    with store.session() as session:
        stored = session.execute(select(*[getattr(SearchIndexRow, c) for c in columns])
                                 .where(SearchIndexRow.resource_type == "X").order_by(SearchIndexRow.id)).all()
    assert [tuple(row) for row in stored[:4]] == [v[:5] + (None if v[5] is None else float(v[5]),) for v in values]
    assert str(stored[4].number) == str(stored[5].number)     # NaN as a Core insert stores it (SQLite: NULL)


def test_timestamps_of_every_kind_store_what_core_inserts_store(store):
    """Datetimes with microseconds, another offset, or none (the session's zone) are the same instant
    whether they go as plain-SQL rows (PostgreSQL: JSON text) or through a Core insert."""
    seoul = timezone(timedelta(hours=9))
    times = [datetime(2026, 11, 20, 8, 0, 0, 123456, tzinfo=timezone.utc), datetime(2026, 11, 21, 0, 30, tzinfo=seoul),
             datetime(2026, 11, 20, 8, 0, 0, 1), datetime(2026, 11, 20, 8, 0)]
    columns = ("resource_type", "resource_id", "target", "status", "attempts", "created_at", "updated_at")
    with store.transaction() as connection:
        rawsql.Insert(OutboxRow.__table__, columns).execute(connection, [
            ("RiskAssessment", f"plain{n}", TARGET, "pending", 0, when, when) for n, when in enumerate(times)])
        connection.execute(insert(OutboxRow.__table__), [
            dict(zip(columns, ("RiskAssessment", f"core{n}", TARGET, "pending", 0, when, when)))
            for n, when in enumerate(times)])
    rows = {row.resource_id: row for row in store.outbox()}
    for n in range(len(times)):
        assert (rows[f"plain{n}"].created_at, rows[f"plain{n}"].updated_at) == (rows[f"core{n}"].created_at,
                                                                                rows[f"core{n}"].updated_at)
