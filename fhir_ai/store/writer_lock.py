"""SQLite: writers of the audit chain queue on an OS file lock, not on SQLite's busy handler.

SQLite lets one writer at a time and tells the others SQLITE_BUSY; with ``busy_timeout`` its handler
sleeps and tries again, 1, 2, 5, 10 … 100 ms at a time. Under load (two gunicorn workers each storing an
assessment every few ms) a worker that found the lock taken sleeps past the moment it was freed, the CPU
stays idle meanwhile, and a worker that keeps losing can wait hundreds of ms while the other goes on
(measured: one save waited 745 ms of two processes saving at full speed). Here every transaction that
appends to the audit chain (each one that stores an assessment or an AuditEvent: ``audit.Chain``) first
takes an exclusive ``flock`` on ``<database>-writer`` beside the database: a waiting process sleeps in the
kernel and wakes the moment the holder lets go, in turn. The lock is let go when the transaction's
connection goes back to the pool, after its commit or rollback (the ``checkin`` event).

Only transactions that have written nothing yet take it (``audit.Chain`` locks the head first), so no
holder of SQLite's write lock ever waits here; other writers (the outbox, job state) keep SQLite's own
busy handler, and a chain writer that meets one of them waits as before. A process that dies lets go of
the lock with its files. PostgreSQL queues writers on the chain head's row lock by itself: nothing to do.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

SUFFIX = "-writer"
_KEY = "fhir_ai_writer_lock"           # the held descriptor, in the pooled connection's info

_paths: "weakref.WeakKeyDictionary[Engine, str]" = weakref.WeakKeyDictionary()   # engine → its lock file
_held: set[int] = set()                 # descriptors this process holds locked
_held_lock = threading.Lock()
_warned: set[str] = set()


def watch(engine: Engine, database: str) -> None:
    """Queue the chain writers of ``engine`` (on-disk SQLite at ``database``) on its writer lock."""
    _paths[engine] = database + SUFFIX

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        _release(record.info)

    @event.listens_for(engine, "close")
    def _close(_dbapi_connection: Any, record: Any) -> None:
        _release(record.info)

    @event.listens_for(engine, "invalidate")
    def _invalidate(_dbapi_connection: Any, record: Any, _exception: Any) -> None:
        _release(record.info)


def acquire(connection: Connection) -> None:
    """Take the writer lock for the transaction of ``connection`` (which must not have written yet);
    a no-op for PostgreSQL, in-memory SQLite, or a connection that holds it already."""
    path = _paths.get(connection.engine)
    if path is None or _KEY in connection.info:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:      # a read-only folder: SQLite's busy handler alone, as before
        if path not in _warned:
            _warned.add(path)
            log.warning("cannot open the SQLite writer lock %s (%s); writers wait by SQLite's busy handler",
                        path, exc.strerror)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    with _held_lock:
        _held.add(fd)
    connection.info[_KEY] = fd


def _release(info: dict[str, Any]) -> None:
    fd = info.pop(_KEY, None)
    if fd is None:
        return
    with _held_lock:
        _held.discard(fd)
    os.close(fd)                # closing the last descriptor of the open file lets go of the flock


def _after_fork_in_child() -> None:
    # A child forked while another thread held the lock shares that open file with the parent: closing
    # the child's copies leaves the lock to the parent (an unlock would free it under the parent's feet).
    global _held_lock
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()
    _held_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
