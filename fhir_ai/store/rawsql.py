"""Plain SQL for the hot write path (every $assess): a few fixed statements and INSERTs of many rows.

Each statement goes straight to the DB-API cursor of the caller's Connection (its transaction), without
SQLAlchemy's per-statement and per-row bookkeeping, which costs more than SQLite itself here. Values go
through each column type's own bind processor (SQLite's DateTime → text), so the rows are exactly what a
Core insert stores; driver errors are raised as SQLAlchemy's (``OperationalError``, ``IntegrityError``…).

SQLite takes many rows as one ``executemany`` per table, on one cursor (prepared once, stepped per row:
as cheap as a multi-row ``VALUES`` for ~150 index rows, cheaper for a few; measured). PostgreSQL
(psycopg) takes each table's rows as one ``INSERT … SELECT FROM jsonb_array_elements(json)``, the rows
one JSON text made by orjson (an executemany runs one INSERT per row; arrays, binary or text, psycopg
dumps element by element in Python), or as ``unnest`` of binary arrays where JSON cannot hold a value
as it is (NaN…); ``insert_all`` sends the INSERTs of several tables as ONE statement (data-modifying
WITH queries): one round trip for all the rows of a transaction.
"""
from __future__ import annotations

from itertools import chain
from math import isfinite
from typing import Any, Callable, Iterable, Sequence

import orjson
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


_STATEMENTS: dict[tuple[str, str, tuple[int, ...]], str] = {}


def statement(connection: Connection, template: str, *counts: int) -> str:
    """``template`` with each ``{}`` replaced by a list of ``counts[i]`` placeholders (for IN lists);
    made once per template, paramstyle and counts."""
    key = (template, connection.dialect.paramstyle, counts)
    sql = _STATEMENTS.get(key)
    if sql is None:
        mark = placeholder(connection.dialect)
        sql = _STATEMENTS[key] = template.format(*(", ".join([mark] * n) for n in counts))
    return sql


def run(connection: Connection, sql: str, parameters: Any = (), *, many: bool = False) -> list[tuple[Any, ...]]:
    """Execute ``sql`` in the transaction of ``connection``; the rows it returns, if any.

    As ``exec_driver_sql`` would: a driver error becomes SQLAlchemy's, a lost server connection is
    invalidated (the pool will not hand it out again).
    """
    return run_all(connection, [(sql, parameters)], many=many)


def run_all(connection: Connection, statements: Iterable[tuple[str, Any]], *,
            many: bool = False) -> list[tuple[Any, ...]]:
    """``run`` for several statements on one cursor; the rows the last one returns, if any."""
    dbapi_error = connection.dialect.loaded_dbapi.Error
    cursor = connection.connection.cursor()
    sql, parameters = "", ()
    try:
        for sql, parameters in statements:
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
        self._json_sql: dict[tuple[str, str], str] = {}
        self._floats = [i for i, name in enumerate(self.columns) if table.c[name].type.python_type is float]

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
                elements = ", ".join(f"(r->>{i})::{cast[4:-2]}" for i, cast in enumerate(casts))
                self._json_sql[key] = f"{head} SELECT {elements} FROM jsonb_array_elements(%s::jsonb) AS r"
            else:
                sql = f"{head} VALUES ({', '.join([placeholder(dialect)] * len(self.columns))})"
            self._compiled[key] = (sql, processors)
        return self._compiled[key]

    def _processed(self, processors: list[tuple[int, Processor]], rows: list[tuple[Any, ...]]) -> list[list[Any]]:
        """The rows as columns, each value through its column's bind processor."""
        columns = [list(values) for values in zip(*rows)]
        for i, process in processors:
            done: dict[Any, Any] = {}       # a transaction's rows share their timestamps: each formatted once
            for value in columns[i]:
                if value not in done:
                    done[value] = process(value)
            columns[i] = [done[value] for value in columns[i]]
        return columns

    def unnest(self, dialect: Dialect, rows: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
        """PostgreSQL (psycopg): (one INSERT … SELECT FROM jsonb_array_elements, the rows as one JSON
        text), or where JSON cannot hold a value as it is (NaN, infinity, bytes, Decimal…) (one INSERT …
        SELECT FROM unnest, the column arrays)."""
        sql, processors = self._for(dialect)
        columns = self._processed(processors, rows)
        if all(value is None or isfinite(value) for i in self._floats for value in columns[i]):
            try:
                text = orjson.dumps(list(zip(*columns))).decode()
            except orjson.JSONEncodeError:
                pass
            else:
                return self._json_sql[(dialect.name, dialect.paramstyle)], [text]
        return sql, columns

    def many(self, dialect: Dialect, rows: list[tuple[Any, ...]]) -> tuple[str, list[tuple[Any, ...]]]:
        """SQLite: (the one-row INSERT, the rows through their bind processors) for an ``executemany``."""
        sql, processors = self._for(dialect)
        if processors:
            rows = list(zip(*self._processed(processors, rows)))
        return sql, rows

    def execute(self, connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        insert_all(connection, [(self, rows)])


_COMBINED: dict[tuple[Any, ...], str] = {}


def insert_all(connection: Connection, batches: Iterable[tuple[Insert, list[tuple[Any, ...]]]],
               then: tuple[str, tuple[Any, ...]] | None = None) -> None:
    """Insert the rows of several tables, in the order given (tables without rows are skipped), and run
    ``then`` (an UPDATE without RETURNING, its parameters) after them.

    PostgreSQL (psycopg): ONE statement for all of it, ``then`` and the first tables' INSERTs as WITH
    queries of the last INSERT (all run, one round trip; a constraint violation fails the statement as it
    would fail its own INSERT). SQLite: an ``executemany`` per table and ``then``, on one cursor.
    """
    batches = [(insert, rows) for insert, rows in batches if rows]
    dialect = connection.dialect
    if not batches or not _unnest(dialect):
        statements: list[tuple[str, Any]] = [insert.many(dialect, rows) for insert, rows in batches]
        if then is not None:
            statements.append((then[0], [then[1]]))
        run_all(connection, statements, many=True)
        return
    parts = [insert.unnest(dialect, rows) for insert, rows in batches]
    key = (then[0] if then else None, *(text for text, _ in parts))
    sql = _COMBINED.get(key)
    if sql is None:
        *first, last = [text for text, _ in parts]
        withs = [f"i{n} AS ({text})" for n, text in enumerate(first)]
        if then is not None:
            withs.insert(0, f"u AS ({then[0]})")
        sql = _COMBINED[key] = f"WITH {', '.join(withs)} {last}" if withs else last
    parameters = list(then[1]) if then is not None else []
    parameters.extend(chain.from_iterable(columns for _, columns in parts))
    run(connection, sql, parameters)
