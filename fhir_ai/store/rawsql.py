"""Plain SQL for the hot write path (every $assess): a few fixed statements and INSERTs of many rows.

Each statement goes straight to the DB-API cursor of the caller's Connection (its transaction), without
SQLAlchemy's per-statement and per-row bookkeeping, which costs more than SQLite itself here. Values go
through each column type's own bind processor (SQLite's DateTime → text), so the rows are exactly what a
Core insert stores; driver errors are raised as SQLAlchemy's (``OperationalError``, ``IntegrityError``…).
SQLite takes many rows as one ``executemany``; PostgreSQL (psycopg) as one ``INSERT … SELECT FROM
unnest(arrays)`` with the arrays sent in binary: one statement however many rows (an executemany runs one
INSERT per row), and no quoting of the JSON texts (text-format arrays cost more than they save).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError

_PLACEHOLDER = {"qmark": "?", "format": "%s", "pyformat": "%s"}
Processor = Callable[[Any], Any]


def placeholder(dialect: Dialect) -> str:
    try:
        return _PLACEHOLDER[dialect.paramstyle]
    except KeyError:
        raise NotImplementedError(f"no plain-SQL placeholder for paramstyle {dialect.paramstyle!r}") from None


def statement(connection: Connection, template: str, *counts: int) -> str:
    """``template`` with each ``{}`` replaced by a list of ``counts[i]`` placeholders (for IN lists)."""
    mark = placeholder(connection.dialect)
    return template.format(*(", ".join([mark] * n) for n in counts))


def run(connection: Connection, sql: str, parameters: Any = (), *, many: bool = False) -> list[tuple[Any, ...]]:
    """Execute ``sql`` in the transaction of ``connection``; the rows it returns, if any.

    As ``exec_driver_sql`` would: a driver error becomes SQLAlchemy's, a lost server connection is
    invalidated (the pool will not hand it out again).
    """
    dbapi_error = connection.dialect.loaded_dbapi.Error
    cursor = connection.connection.cursor()
    try:
        if many:
            cursor.executemany(sql, parameters)
        else:
            cursor.execute(sql, parameters)
        return cursor.fetchall() if cursor.description else []
    except dbapi_error as error:
        lost = connection.dialect.is_disconnect(error, connection.connection.dbapi_connection, cursor)
        if lost:
            connection.invalidate()
        raise DBAPIError.instance(sql, parameters, error, dbapi_error, connection_invalidated=lost,
                                  dialect=connection.dialect, ismulti=many) from error
    finally:
        cursor.close()


def _as_float(value: Any) -> Any:
    return None if value is None else float(value)


def _unnest(dialect: Dialect) -> bool:
    return dialect.name == "postgresql" and dialect.driver == "psycopg"


class Insert:
    """INSERT INTO ``table`` (``columns``) of rows given as tuples in ``columns`` order."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self._compiled: dict[tuple[str, str], tuple[str, list[tuple[int, Processor]]]] = {}

    def _for(self, dialect: Dialect) -> tuple[str, list[tuple[int, Processor]]]:
        key = (dialect.name, dialect.paramstyle)
        if key not in self._compiled:
            quote = dialect.identifier_preparer
            head = f"INSERT INTO {quote.format_table(self.table)} ({', '.join(quote.quote(c) for c in self.columns)})"
            unnest = _unnest(dialect)
            processors: list[tuple[int, Processor]] = []
            casts = []
            for i, name in enumerate(self.columns):
                column_type = self.table.c[name].type
                process = column_type.dialect_impl(dialect).bind_processor(dialect)
                if unnest and process is None and column_type.python_type is float:
                    process = _as_float     # an array has one element type: 1 and 0.5 in one column fail
                if process is not None:
                    processors.append((i, process))
                if unnest:
                    casts.append(f"%b::{column_type.compile(dialect=dialect)}[]")     # %b: binary
            if unnest:
                sql = f"{head} SELECT * FROM unnest({', '.join(casts)})"
            else:
                sql = f"{head} VALUES ({', '.join([placeholder(dialect)] * len(self.columns))})"
            self._compiled[key] = (sql, processors)
        return self._compiled[key]

    def execute(self, connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        dialect = connection.dialect
        sql, processors = self._for(dialect)
        if _unnest(dialect):
            columns = [list(values) for values in zip(*rows)]
            for i, process in processors:
                columns[i] = [process(value) for value in columns[i]]
            run(connection, sql, columns)
            return
        if processors:
            columns = list(zip(*rows))
            for i, process in processors:
                columns[i] = tuple(process(value) for value in columns[i])
            rows = list(zip(*columns))
        run(connection, sql, rows, many=True)
