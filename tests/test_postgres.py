"""The store on the run's backend (SQLite, or PostgreSQL with --database=postgresql): migrations match the
tables, and several processes writing the same and different assessments at once lose and duplicate nothing."""
from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

import fhir_ai.app  # noqa: F401  (imports the modules that define tables…)
import fhir_ai.jobs.tables  # noqa: F401  (…and this one, which the app imports lazily)
from fhir_ai.errors import ConfigurationError
from fhir_ai.store import Store
from fhir_ai.store.tables import AssessmentRow, Base
from fhir_ai.store.trail_tables import AssessmentVersionRow, AuditEventRow, ProvenanceRow, created_on
from fhir_ai.store.verify import verify

try:
    from . import databases
    from .stored import risk_assessment
except ImportError:
    import databases  # type: ignore[no-redef]
    from stored import risk_assessment  # type: ignore[no-redef]

WORKERS, SHARED, OWN = 4, 12, 8


def test_migrations_create_exactly_the_tables_the_code_defines(database_url):
    store = Store(database_url)
    try:
        with store.engine.connect() as connection:
            # an index made for the other backend only is left out (trail_tables.only_on_sqlite)
            context = MigrationContext.configure(connection, opts={
                "include_object": lambda item, *_: created_on(item, connection.dialect.name)})
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], ("the models and the migrations differ: add a migration in "
                            f"fhir_ai/store/migrations/versions/ ({diff})")
        Store(database_url).close()                      # a second start migrates nothing and fails nothing
    finally:
        store.close()


def test_a_database_from_before_migrations_is_refused(database_url):
    from fhir_ai.store.engine import make_engine
    engine = make_engine(database_url)
    AssessmentRow.__table__.create(engine)
    engine.dispose()
    with pytest.raises(ConfigurationError, match="earlier fhir_ai"):
        Store(database_url)


def _writer(url: str, worker: int, barrier: Any, results: Any) -> None:
    store = Store(url, migrate=False)
    outcomes: list[tuple[str, bool]] = []
    barrier.wait()
    for i in range(max(SHARED, OWN)):
        # Interleaved: the same assessments as every other worker, and this worker's own.
        if i < SHARED:
            saved = store.save_assessment(risk_assessment(f"shared-{i}", subject=f"Patient/s{i}"),
                                          model_id="deterioration", model_version="1.0")
            outcomes.append((saved.resource["id"], saved.created))
        if i < OWN:
            saved = store.save_assessment(risk_assessment(f"own-{worker}-{i}", subject=f"Patient/w{worker}"),
                                          model_id="deterioration", model_version="1.0",
                                          write_back_target="https://hospital.test/fhir")
            outcomes.append((saved.resource["id"], saved.created))
    withdrawn = store.withdraw_assessment("shared-0", reason=f"worker {worker}")
    outcomes.append(("withdraw", withdrawn.created))
    store.close()
    results.put(outcomes)


@pytest.mark.timeout(120)
def test_concurrent_writers_lose_nothing_and_duplicate_nothing(database_url):
    Store(database_url).close()                              # migrate once, before the writers start
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    processes = [context.Process(target=_writer, args=(database_url, w, barrier, results)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=100) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    created: dict[str, int] = {}
    for worker_outcomes in outcomes:
        for rid, was_created in worker_outcomes:
            created[rid] = created.get(rid, 0) + was_created
    assert all(created[f"shared-{i}"] == 1 for i in range(SHARED))          # one winner each, the rest repeats
    assert all(created[f"own-{w}-{i}"] == 1 for w in range(WORKERS) for i in range(OWN))
    assert created["withdraw"] == 1                                          # one new version, not four

    store = Store(database_url, migrate=False)
    try:
        with store.session() as session:
            count = lambda table: session.scalar(select(func.count()).select_from(table))  # noqa: E731
            assert count(AssessmentRow) == SHARED + WORKERS * OWN
            assert count(AssessmentVersionRow) == SHARED + WORKERS * OWN + 1
            assert count(ProvenanceRow) == SHARED + WORKERS * OWN + 1
            # every save is audited (creates and repeats), plus the one withdrawal and the others' repeats of it
            assert count(AuditEventRow) == WORKERS * (SHARED + OWN) + 1 + (WORKERS - 1)
            assert len(store.outbox()) == WORKERS * OWN
            seqs = list(session.scalars(select(AssessmentRow.seq).order_by(AssessmentRow.seq)))
            assert seqs == list(range(1, len(seqs) + 1))                      # storage order has no gaps
            report = verify(session)
        assert report.ok, report.problems
    finally:
        store.close()


def test_fresh_database_isolation(database_url):
    """Each test gets an empty store (a PostgreSQL schema of its own, or a SQLite file)."""
    store = Store(database_url)
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT COUNT(*) FROM risk_assessment")).scalar_one() == 0
            if databases.backend() == "postgresql":
                schema = connection.execute(text("SELECT current_schema()")).scalar_one()
                assert schema.startswith("t_")
            assert "audit_chain" in inspect(connection).get_table_names()
    finally:
        store.close()
