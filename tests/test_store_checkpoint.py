"""SQLite WAL checkpoints run by a background thread of each process, not by the commit of a request
(fhir_ai.store.checkpoint); SQLite only, whatever the run's backend."""
from __future__ import annotations

import gc
import multiprocessing
import sqlite3
import time
from typing import Any
from pathlib import Path

from fhir_ai.store import Store
from fhir_ai.store.checkpoint import BACKSTOP_PAGES, CHECKPOINTER, Checkpointer

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]


def _rows_in_the_database_file(path: Path) -> int:
    """Assessments in the main database file alone (immutable: the WAL is not read), i.e. checkpointed."""
    connection = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM risk_assessment").fetchone()[0]
    finally:
        connection.close()


def _save(store: Store, first: int, count: int) -> None:
    for n in range(first, first + count):
        store.save_assessment(risk_assessment(f"c{n}", basis=[{"reference": f"Observation/c{n}-{k}"}
                                                             for k in range(50)]),
                              model_id="deterioration", model_version="1.0")


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_commits_leave_checkpoints_to_the_background_thread(tmp_path):
    path = tmp_path / "store.sqlite3"
    store = Store(f"sqlite:///{path}")
    try:
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == BACKSTOP_PAGES
        _save(store, 0, 10)       # ~400 WAL pages: below SQLite's default of 1000, no commit checkpoints
        # The thread copies them into the database file soon after, without anyone asking.
        assert _wait_for(lambda: _rows_in_the_database_file(path) == 10), _rows_in_the_database_file(path)
        _save(store, 10, 3)
        assert _wait_for(lambda: _rows_in_the_database_file(path) == 13)
    finally:
        store.close()


def _child(url: str, path: str, out: "multiprocessing.Queue[int]") -> None:
    store = Store(url, migrate=False)
    _save(store, 100, 2)
    out.put(_rows_in_the_database_file(Path(path)) if _wait_for(
        lambda: _rows_in_the_database_file(Path(path)) == 2) else -1)


def test_a_forked_worker_checkpoints_in_its_own_thread(tmp_path):
    """gunicorn and Celery fork after start-up: the parent's thread does not exist in the child (and a lock
    it held at the fork is not held in the child)."""
    path = tmp_path / "store.sqlite3"
    Store(f"sqlite:///{path}").close()
    gc.collect()
    assert str(path) not in CHECKPOINTER._paths       # the parent's thread does not look at this file
    CHECKPOINTER.ensure_running()
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_child, args=(f"sqlite:///{path}", str(path), out))
    with CHECKPOINTER._lock:                           # as if the parent's thread were in a round
        child.start()
    child.join(30)
    assert out.get(timeout=5) == 2


def test_a_database_that_went_away_is_skipped(tmp_path):
    checkpointer = Checkpointer()
    path = tmp_path / "gone.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x)")
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()

    class Engine:      # what watch() needs of an engine: something that can die
        pass
    engine = Engine()
    checkpointer.watch(engine, str(path))
    checkpointer.checkpoint_all()
    assert checkpointer.runs == 1
    checkpointer.checkpoint_all()
    assert checkpointer.runs == 1                 # nothing written since: not checkpointed again
    connection.close()
    path.unlink()
    checkpointer.checkpoint_all()                 # no error: the file is gone (and the engine still lives)
    del engine
    assert checkpointer._paths == {}


def _use_sqlite(path: str) -> None:
    connection = sqlite3.connect(path, timeout=30)
    connection.execute("SELECT count(*) FROM t").fetchall()
    connection.close()


def test_a_child_forked_during_a_checkpoint_round_can_use_sqlite(tmp_path):
    """A fork while the thread is inside SQLite's C code would leave SQLite's own mutexes held in the child,
    hanging its first SQLite call: forks wait for a round to end. Rounds every 1 ms (not 100) make the race
    likely: without the wait, a run of 30 forks hung a child about every other time (at the real interval, 2
children in 400 hung)."""
    FORKS = 80
    path = str(tmp_path / "db.sqlite3")
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.commit()
    engine: Any = type("Engine", (), {})()          # what watch() needs of an engine: something that can die
    checkpointer = Checkpointer(interval=0.001)
    checkpointer.watch(engine, path)
    checkpointer.ensure_running()
    context = multiprocessing.get_context("fork")
    hung = 0
    for i in range(FORKS):
        writer.execute("INSERT INTO t VALUES (?)", (i,))       # the WAL grows: the next round checkpoints
        writer.commit()
        time.sleep(0.0005 * (i % 4))
        child = context.Process(target=_use_sqlite, args=(path,))
        child.start()
        child.join(5)
        if child.is_alive():
            hung += 1
            child.kill()
            child.join()
    writer.close()
    assert hung == 0, f"{hung} of {FORKS} forked children hung on their first SQLite call"
    assert checkpointer.runs > 0


def test_a_database_moved_away_is_not_made_anew(tmp_path):
    """The thread opens databases by path: one moved (or deleted) with its WAL still beside the old name must
    not be created empty there (SQLite would then throw that WAL away as stale)."""
    path = tmp_path / "db.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    checkpointer = Checkpointer()
    engine: Any = type("Engine", (), {})()
    checkpointer.watch(engine, str(path))
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()
    path.rename(tmp_path / "moved.sqlite3")
    checkpointer.checkpoint_all()
    assert not path.exists() and checkpointer.runs == 0
    connection.close()
