"""Database engine and schema migrations (Alembic ``upgrade head`` at start-up)."""
from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError
from . import writer_lock
from .checkpoint import BACKSTOP_PAGES, CHECKPOINTER

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any constant: PostgreSQL advisory lock that lets one process at a time migrate a database.
_MIGRATION_LOCK = 0x66686972


_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A pooled connection opened before a fork (gunicorn preload, Celery prefork) belongs to the
    # parent: used by a child too, it garbles both. The child starts with empty pools instead
    # (close=False: the parent's connections are left to the parent).
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    sqlite = url.startswith("sqlite")
    # A ping per checkout guards against server connections that died (PostgreSQL restarts, idle
    # timeouts); an SQLite connection is a file handle that cannot die that way, so it skips it.
    # hide_parameters: a failed statement's error (logged with its traceback) names its SQL, never the
    # values bound to it (an assessment's JSON, search values).
    engine = create_engine(url, future=True, pool_pre_ping=not sqlite, hide_parameters=True)
    if sqlite:
        database = engine.url.database
        on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers and a writer work at once; busy_timeout waits instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=FULL")   # a commit is synced before it returns (nothing lost)
            if on_disk:     # checkpoints by this process's checkpoint thread (checkpoint.py), not by commits
                cursor.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
                CHECKPOINTER.ensure_running()
            cursor.close()
        if on_disk:
            path = os.path.abspath(database)
            CHECKPOINTER.watch(engine, path)
            writer_lock.watch(engine, path)
    _ENGINES.add(engine)
    return engine


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; refuses a database made before migrations existed."""
    from alembic import command
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        tables = set(inspect(connection).get_table_names())
        if "risk_assessment" in tables and "alembic_version" not in tables:
            raise ConfigurationError(
                f"the database at {engine.url.render_as_string(hide_password=True)} was created by an earlier "
                "fhir_ai without migrations; move it away (or export what you need) and start again",
                expression="database_url")
        command.upgrade(alembic_config(connection), revision)


def schema_problem(engine: Engine) -> str | None:
    """Why a read-only tool (``fhir-ai audit``) cannot read this database as it is, or None: no fhir_ai schema
    there, or another revision than this fhir_ai's (an older one is upgraded by ``fhir-ai serve`` or
    ``fhir-ai worker`` at start; the auditor's tools never write, so they do not migrate it themselves)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    where = engine.url.render_as_string(hide_password=True)
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return f"no fhir_ai database at {where} (no schema revision recorded)"
    if current != head:
        return (f"the database at {where} is at schema revision {current}, this fhir_ai reads {head}: start "
                "`fhir-ai serve` (or `fhir-ai worker`) of this version once to upgrade it, or use the fhir_ai "
                "version that wrote it; the audit tools never change the database")
    return None

