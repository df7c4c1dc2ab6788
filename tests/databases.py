"""Which database the test suite runs against, and a fresh, empty one per test (or module).

`python3 -m pytest` uses SQLite files; `python3 -m pytest --database=postgresql` (or
FHIR_AI_TEST_DATABASE_URL=postgresql+psycopg://...) uses PostgreSQL, one schema per test, dropped after.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

URL_ENV = "FHIR_AI_TEST_DATABASE_URL"
MACHINE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_selected: dict[str, str] = {}


def select(url: str | None) -> None:
    """Called once by conftest with --database / the environment: '' means SQLite."""
    _selected["url"] = url or ""


def server_url() -> str:
    """The PostgreSQL server URL of this run ('' when the run uses SQLite)."""
    if "url" not in _selected:
        _selected["url"] = os.environ.get(URL_ENV, "")
    return _selected["url"]


def backend() -> str:
    return "postgresql" if server_url() else "sqlite"


def with_schema(url: str, schema: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options=-csearch_path%3D{schema}"


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A new empty schema on the server at ``url``; the URL to use it; dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield with_schema(url, schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def fresh_database(folder: Path) -> Iterator[str]:
    """An empty database for one test (or module): a SQLite file in ``folder``, or a PostgreSQL schema."""
    url = server_url()
    if not url:
        folder.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{folder / 'fhir_ai.sqlite3'}"
        return
    with postgres_schema(url) as schema_url:
        yield schema_url
