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
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

SUFFIX = "-writer"
_PATH = "fhir_ai_writer_path"           # in each pooled connection's info: its database's lock file
_KEY = "fhir_ai_writer_lock"            # and while it holds the lock: (this process's pid, the descriptor)

# Every lock-file descriptor this process has open (waiting or holding), so a forked child closes its copies.
# Opening one and recording it happen under _state, and a fork waits for _state: a child never inherits a
# descriptor it does not know of (whose copy would keep the lock alive after the parent let go of it).
_open: set[int] = set()
_state = threading.Lock()
_warned: set[str] = set()


def watch(engine: Engine, database: str) -> None:
    """Queue the chain writers of ``engine`` (on-disk SQLite at ``database``) on its writer lock."""
    path = database + SUFFIX

    @event.listens_for(engine, "connect")
    def _connect(_dbapi_connection: Any, record: Any) -> None:
        record.info[_PATH] = path

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
    """Take the writer lock for the transaction of ``connection`` (which must not have written yet) and hold
    it until the connection is back in the pool; waits as long as the holder's transaction lasts (as a
    PostgreSQL row lock does). A no-op for PostgreSQL, in-memory SQLite, or a connection that holds it."""
    info = connection.info
    path = info.get(_PATH)
    if path is None or _KEY in info:
        return
    try:
        with _state:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _open.add(fd)
    except OSError as exc:      # a read-only folder: SQLite's busy handler alone, as before
        _without(path, exc)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException as exc:
        _close_fd(fd)
        if isinstance(exc, OSError):        # no locks on this file system (ENOLCK, EOPNOTSUPP): as above
            _without(path, exc)
            return
        raise
    info[_KEY] = (os.getpid(), fd)


def _without(path: str, exc: OSError) -> None:
    if path not in _warned:
        _warned.add(path)
        log.warning("cannot use the SQLite writer lock %s (%s); writers wait by SQLite's busy handler",
                    path, exc.strerror)


def _release(info: dict[str, Any]) -> None:
    held = info.pop(_KEY, None)
    if held is not None and held[0] == os.getpid():     # a copy of the parent's info in a child: not ours
        _close_fd(held[1])          # closing the last descriptor of the open file lets go of the flock


def _close_fd(fd: int) -> None:
    with _state:
        _open.discard(fd)
        os.close(fd)


def _after_fork_in_child() -> None:
    # The child's copies share their open files with the parent: closing them leaves the lock to the parent
    # (an unlock would free it under the parent's feet).
    global _state
    for fd in _open:
        try:
            os.close(fd)
        except OSError:
            pass
    _open.clear()
    _state = threading.Lock()


os.register_at_fork(before=lambda: _state.acquire(), after_in_parent=lambda: _state.release(),
                    after_in_child=_after_fork_in_child)
