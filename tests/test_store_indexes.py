"""The store's indexes on the run's backend (SQLite, or PostgreSQL with --database=postgresql): migrations
0004, 0005, 0006 and 0007 on a fresh database and on one with data in it (down to 0003 and up again), and searches that
give the same answers before and after."""
from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from fhir_ai.search import parse_query
from fhir_ai.search.params import parse_history
from fhir_ai.store import Store
from fhir_ai.store.engine import alembic_config, migrate

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]

HISTORY = {"ix_risk_assessment_version_history": ["last_updated", "id", "version_id"]}
SQLITE = {"ix_search_index_lookup": ["resource_type", "resource_seq", "param", "code"]}
ELSEWHERE = {"ix_search_index_value": ["resource_type", "param", "code"],
             "ix_search_index_resource": ["resource_type", "resource_id"]}
ENTITY_VALUE = {"ix_provenance_entity_value": ["reference_id", "reference_type"]}
SEARCHES = [("Provenance", "entity=Observation/a1-obs-1"), ("Provenance", "entity=Observation/nothing"),
            ("Provenance", "entity=a2-obs-1"), ("Provenance", "entity:missing=false"),
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
        assert _indexes(store, "risk_assessment_version") == HISTORY
        assert _indexes(store, "provenance_entity") == ({} if sqlite else ENTITY_VALUE)
    finally:
        store.close()


def _plan(store: Store, sql: str) -> str:
    """SQLite's EXPLAIN QUERY PLAN of ``sql``, its lines joined."""
    with store.engine.connect() as connection:
        return " ".join(str(row[-1]) for row in connection.execute(text(f"EXPLAIN QUERY PLAN {sql}")))


def _history(store: Store, *params: tuple[str, str]) -> list[tuple[str, str]]:
    """Every page of a type-level history: (id, versionId) in the order served."""
    out, cursor = [], None
    while True:
        query = parse_history([*params, ("_count", "2"), *((("_cursor", cursor),) if cursor else ())])
        page = store.history(query)
        out += [(r["id"], r["meta"]["versionId"]) for r in page.resources]
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor.encode()


def test_type_level_history_reads_its_index_in_order(database_url):
    """0006: GET /RiskAssessment/_history reads ix_risk_assessment_version_history in its own order (SQLite:
    no sort step); down to 0005 and up again it answers the same, pages included."""
    store = Store(database_url)
    try:
        _fill(store)
        served = _history(store)
        assert served == [("a3", "2"), ("a3", "1"), ("a2", "1"), ("a1", "1")]      # newest first; a1 repeat is no version
        with store.engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0005_search_index_seq")
        assert _indexes(store, "risk_assessment_version") == {}
        assert _history(store) == served
        migrate(store.engine)
        assert _indexes(store, "risk_assessment_version") == HISTORY
        assert _history(store) == served
        if store.engine.dialect.name == "sqlite":
            plan = _plan(store, "SELECT last_updated, id, version_id, resource FROM risk_assessment_version "
                                "WHERE last_updated <= '9999' ORDER BY last_updated DESC, id DESC, version_id DESC LIMIT 3")
            assert "ix_risk_assessment_version_history" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        store.close()


def _index_rows(store: Store) -> list[tuple]:
    with store.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(text(
            "SELECT id, resource_type, resource_id, resource_seq, param, system, code, number FROM search_index "
            "ORDER BY id"))]


def _resource_seqs(store: Store) -> set[tuple]:
    """(type, id, seq) of every stored resource: what each index row's resource_seq must be."""
    with store.engine.connect() as connection:
        return {tuple(r) for r in connection.execute(text(
            "SELECT 'RiskAssessment', id, seq FROM risk_assessment UNION ALL SELECT 'Provenance', id, seq "
            "FROM provenance UNION ALL SELECT 'AuditEvent', id, seq FROM audit_event"))}


def test_an_existing_database_is_upgraded_and_searches_answer_the_same(database_url):
    """Rows stored before 0005 (no resource_seq: downgraded to 0003, as 0003 and 0004 left them) get the
    seq of their resource on upgrade, exactly what a new write stores; searches answer the same after it.
    (This code cannot write or search a 0003/0004 database, so the data is written at the head.)"""
    store = Store(database_url)
    try:
        sqlite = store.engine.dialect.name == "sqlite"
        _fill(store)
        before = _answers(store)
        assert before["Provenance?entity=Observation/a1-obs-1"][0] == 1
        assert before["RiskAssessment?subject=Patient/p1"][0] == 2
        assert before["AuditEvent?patient=Patient/p2"][0] >= 2
        written = _index_rows(store)
        seqs = _resource_seqs(store)
        assert {(t, rid, seq) for _, t, rid, seq, *_ in written} == seqs and None not in {r[3] for r in written}
        with store.engine.begin() as connection:                          # down to 0003 ...
            command.downgrade(alembic_config(connection), "0003_mapping_reload")
        assert _indexes(store, "search_index") == ELSEWHERE
        assert "ix_risk_assessment_patient_id" in _indexes(store, "risk_assessment")
        with store.engine.connect() as connection:
            assert "resource_seq" not in {c["name"] for c in inspect(connection).get_columns("search_index")}
        migrate(store.engine, "0004_search_index_layout")                  # ... 0004 ...
        assert _indexes(store, "search_index") == ({"ix_search_index_lookup": [
            "resource_type", "resource_id", "param", "code"]} if sqlite else ELSEWHERE)
        migrate(store.engine)                                              # ... and up again: filled
        assert _indexes(store, "search_index") == (SQLITE if sqlite else ELSEWHERE)
        assert "ix_risk_assessment_patient_id" not in _indexes(store, "risk_assessment")
        assert _index_rows(store) == written
        assert _answers(store) == before
        store.save_assessment(risk_assessment("a4", subject="Patient/p2",
                                              basis=[{"reference": "Observation/a1-obs-1"}]),
                              model_id="deterioration", model_version="1.0")
        after = _answers(store)
        assert after["Provenance?entity=Observation/a1-obs-1"][0] == 2
        assert {(t, rid, seq) for _, t, rid, seq, *_ in _index_rows(store)} == _resource_seqs(store)
        with store.engine.begin() as connection:                          # down to 0004 and back
            command.downgrade(alembic_config(connection), "0004_search_index_layout")
        migrate(store.engine)
        assert _answers(store) == after
        assert {(t, rid, seq) for _, t, rid, seq, *_ in _index_rows(store)} == _resource_seqs(store)
    finally:
        store.close()


def _entity_keys(store: Store) -> set[tuple]:
    with store.engine.connect() as connection:
        return {tuple(r) for r in connection.execute(text(
            "SELECT provenance_seq, reference_id, reference_type FROM provenance_entity"))}


def _entity_index_rows(store: Store) -> set[tuple]:
    with store.engine.connect() as connection:
        return {tuple(r) for r in connection.execute(text(
            "SELECT s.resource_seq, s.code, s.system, s.resource_id, p.id FROM search_index s "
            "LEFT JOIN provenance p ON p.seq = s.resource_seq "
            "WHERE s.resource_type = 'Provenance' AND s.param = 'entity'"))}


def test_provenance_entities_have_their_own_table_and_migrate_both_ways(database_url):
    """0007: Provenance entity references are provenance_entity keys, not search index rows; down to 0006 they
    are index rows of their Provenance again (as 0006 wrote them), up again keys, and searches answer the same.
    On SQLite an entity search probes the table's own key (a WITHOUT ROWID table, no other index)."""
    store = Store(database_url)
    try:
        _fill(store)
        before = _answers(store)
        assert before["Provenance?entity=Observation/a1-obs-1"][0] == 1
        assert before["Provenance?entity=a2-obs-1"][0] == 1
        keys = _entity_keys(store)
        assert len(keys) >= 3 and _entity_index_rows(store) == set()
        with store.engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0006_version_history_index")
        with store.engine.connect() as connection:
            assert "provenance_entity" not in inspect(connection).get_table_names()
        rows = _entity_index_rows(store)
        assert {(seq, code, system or "") for seq, code, system, _, _ in rows} == keys
        assert all(rid == owner and rid is not None for *_, rid, owner in rows)
        migrate(store.engine)
        assert _entity_keys(store) == keys and _entity_index_rows(store) == set()
        assert _answers(store) == before
        if store.engine.dialect.name == "sqlite":
            plan = _plan(store, "SELECT id FROM provenance p WHERE EXISTS (SELECT 1 FROM provenance_entity e "
                                "WHERE e.provenance_seq = p.seq AND e.reference_id = 'x' AND e.reference_type = 'Observation')")
            assert "USING PRIMARY KEY (provenance_seq=? AND reference_id=? AND reference_type=?)" in plan, plan
    finally:
        store.close()


def _provenance_ids(store: Store, query: str) -> list[str]:
    parsed = parse_query("Provenance", [tuple(query.split("=", 1))])
    return [r["id"] for r in store.search(parsed).resources]


def test_entity_references_longer_than_their_columns_are_stored(database_url):
    """Keys are cut to the columns (512 for the id, 64 for the type) before they are made distinct: two
    references alike up to there are one key (PostgreSQL would cut them anyway, and then refuse the second
    as a duplicate of the first, failing the whole $assess). Ids that long cannot be searched for (a FHIR id
    is at most 64 characters); the rest of the Provenance can."""
    store = Store(database_url)
    try:
        long_id, long_type = "x" * 600, "T" * 64
        store.save_assessment(risk_assessment("a1", basis=[
            {"reference": f"Observation/{long_id}a"}, {"reference": f"Observation/{long_id}b"},
            {"reference": f"https://h.test/fhir/{long_type}A/o1"}, {"reference": f"https://h.test/fhir/{long_type}B/o1"},
            {"reference": "Observation/short"}]), model_id="deterioration", model_version="1.0")
        assert _provenance_ids(store, "entity=Observation/short") == ["prov-a1-1"]
        assert _provenance_ids(store, "entity=o1") == ["prov-a1-1"]
        assert len(_entity_keys(store)) == 3
    finally:
        store.close()


def test_an_entity_type_longer_than_its_column_migrates(database_url):
    """0007 cuts what 0006 stored to the new columns (PostgreSQL refused a 70-character type)."""
    store = Store(database_url)
    try:
        store.save_assessment(risk_assessment("a1"), model_id="deterioration", model_version="1.0")
        with store.engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0006_version_history_index")
            connection.execute(text("UPDATE search_index SET system = :type WHERE resource_type = 'Provenance' "
                                    "AND param = 'entity'"), {"type": "T" * 70})
        migrate(store.engine)
        assert _provenance_ids(store, "entity=a1-obs-1") == ["prov-a1-1"]
        assert {key[2] for key in _entity_keys(store)} == {"T" * 64}
    finally:
        store.close()
