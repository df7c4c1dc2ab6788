"""The store's indexes on the run's backend (SQLite, or PostgreSQL with --database=postgresql): migration
0004 on a fresh database and on one upgraded from 0003 with data in it (and back), and searches that give
the same answers before and after it."""
from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from fhir_ai.search import parse_query
from fhir_ai.store import Store
from fhir_ai.store.engine import alembic_config, migrate

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]

SQLITE = {"ix_search_index_lookup": ["resource_type", "resource_id", "param", "code"]}
ELSEWHERE = {"ix_search_index_value": ["resource_type", "param", "code"],
             "ix_search_index_resource": ["resource_type", "resource_id"]}
BEFORE = {**ELSEWHERE}
SEARCHES = [("Provenance", "entity=Observation/a1-obs-1"), ("Provenance", "entity=Observation/nothing"),
            ("Provenance", "target=RiskAssessment/a2"), ("Provenance", "patient=Patient/p2"),
            ("RiskAssessment", "subject=Patient/p1"), ("RiskAssessment", "risk=high"),
            ("RiskAssessment", "probability=gt0.3"), ("RiskAssessment", "probability:missing=true"),
            ("RiskAssessment", "encounter:missing=true"), ("RiskAssessment", "risk:not=high"),
            ("AuditEvent", "entity=RiskAssessment/a1&action=C"), ("AuditEvent", "patient=Patient/p2"),
            ("AuditEvent", "subtype=read")]


def _indexes(store: Store, table: str) -> dict[str, list[str]]:
    with store.engine.connect() as connection:
        return {ix["name"]: ix["column_names"] for ix in inspect(connection).get_indexes(table)}


def _fill(store: Store) -> None:
    for rid, subject, risk, probability, encounter in (
            ("a1", "Patient/p1", "low", 0.12, "Encounter/e1"), ("a2", "Patient/p1", "high", 0.81, None),
            ("a3", "Patient/p2", "moderate", None, "Encounter/e3")):
        resource = risk_assessment(rid, subject=subject, risk=risk, probability=probability, encounter=encounter)
        store.save_assessment(resource, model_id="deterioration", model_version="1.0")
    store.save_assessment(risk_assessment("a1", subject="Patient/p1"), model_id="deterioration",
                          model_version="1.0")                         # a repeat: one more AuditEvent
    store.withdraw_assessment("a3", reason="test")


def _answers(store: Store) -> dict[str, tuple[int, list[str]]]:
    out = {}
    for resource_type, query in SEARCHES:
        page = store.search(parse_query(resource_type, [tuple(p.split("=", 1)) for p in query.split("&")]))
        out[f"{resource_type}?{query}"] = (page.total, [r["id"] for r in page.resources])
    return out


def test_a_fresh_database_has_the_indexes_of_its_backend(database_url):
    store = Store(database_url)
    try:
        sqlite = store.engine.dialect.name == "sqlite"
        search_index = _indexes(store, "search_index")
        assert search_index == (SQLITE if sqlite else ELSEWHERE)
        assert "ix_risk_assessment_patient_id" not in _indexes(store, "risk_assessment")
        assert _indexes(store, "risk_assessment")["ix_risk_assessment_patient_created"] == ["patient_id", "created_at"]
    finally:
        store.close()


def test_an_existing_database_is_upgraded_and_searches_answer_the_same(database_url):
    store = Store(database_url, migrate=False)
    try:
        migrate(store.engine, "0003_mapping_reload")
        assert _indexes(store, "search_index") == BEFORE
        assert "ix_risk_assessment_patient_id" in _indexes(store, "risk_assessment")
        _fill(store)
        before = _answers(store)
        assert before["Provenance?entity=Observation/a1-obs-1"][0] == 1
        assert before["RiskAssessment?subject=Patient/p1"][0] == 2
        assert before["AuditEvent?patient=Patient/p2"][0] >= 2
        migrate(store.engine)
        sqlite = store.engine.dialect.name == "sqlite"
        assert _indexes(store, "search_index") == (SQLITE if sqlite else ELSEWHERE)
        assert "ix_risk_assessment_patient_id" not in _indexes(store, "risk_assessment")
        assert _answers(store) == before
        store.save_assessment(risk_assessment("a4", subject="Patient/p2", basis=[{"reference": "Observation/a1-obs-1"}]),
                              model_id="deterioration", model_version="1.0")
        after = _answers(store)
        assert after["Provenance?entity=Observation/a1-obs-1"][0] == 2
        with store.engine.begin() as connection:                          # and back down
            command.downgrade(alembic_config(connection), "0003_mapping_reload")
        assert _indexes(store, "search_index") == BEFORE
        assert "ix_risk_assessment_patient_id" in _indexes(store, "risk_assessment")
        assert _answers(store) == after
        migrate(store.engine)
        assert _answers(store) == after
    finally:
        store.close()
