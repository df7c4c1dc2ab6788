"""A process forked after the store opened a connection (gunicorn preload, Celery prefork) does not use
the parent's pooled connection: it opens its own, and both processes keep working."""
from __future__ import annotations

import multiprocessing
import uuid
from typing import Any

from fhir_ai.store import Store

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]


def _connection_id(store: Store) -> Any:
    with store.transaction() as connection:
        if connection.dialect.name == "postgresql":
            return connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        # SQLite has no server-side id: mark the pool's record of this connection
        return connection.connection.info.setdefault("test-mark", uuid.uuid4().hex)


def _child(store: Store, results: Any) -> None:
    saved = store.save_assessment(risk_assessment("from-child", subject="Patient/c"), model_id="deterioration",
                                  model_version="1.0")
    results.put((_connection_id(store), saved.created))


def test_a_forked_child_opens_its_own_connection(database_url):
    store = Store(database_url)
    try:
        parent = _connection_id(store)          # a connection now waits in the parent's pool
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_child, args=(store, results))
        child.start()
        child_connection, created = results.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0 and created
        assert child_connection != parent
        assert _connection_id(store) == parent      # the parent's pooled connection still works, still its own
        assert store.get_assessment("from-child")["id"] == "from-child"
    finally:
        store.close()
