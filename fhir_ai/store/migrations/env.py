"""Alembic environment: runs on the connection fhir_ai hands over, or on ``-x url=...`` from the CLI."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fhir_ai.store import trail_tables  # (registers the audit trail tables)
from fhir_ai.store.tables import Base

config = context.config
connection = config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=Base.metadata,
                      render_as_batch=conn.dialect.name == "sqlite", compare_type=True,
                      include_object=lambda item, *_: trail_tables.created_on(item, conn.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
