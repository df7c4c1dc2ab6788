"""SQLite WAL checkpoints off the request path: one background thread per process.

In WAL mode a commit appends pages to the ``-wal`` file; a checkpoint copies them back into the database
and syncs it. By default the commit that takes the WAL past 1000 pages runs that checkpoint itself, so
one request in ~20 ``$assess`` paid ~4–5 ms more (measured). Here the connections of our engines leave
checkpoints to a thread of their own process (``PRAGMA wal_checkpoint(PASSIVE)``: it never waits for or
blocks readers and writers) a few times a second when the WAL has grown; a commit still checkpoints
itself only past ``BACKSTOP_PAGES``, should that thread not keep up (or not run). Durability is SQLite's
either way: a commit is in the synced WAL before it returns.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

INTERVAL = 0.1          # seconds between looks at the WAL files
BACKSTOP_PAGES = 10000  # a commit checkpoints itself past this many WAL pages (~40 MB)


class Checkpointer:
    """The WAL files of this process's SQLite engines, checkpointed by one daemon thread."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._paths: dict[str, int] = {}             # database file → how many live engines use it
        self._seen: dict[str, tuple[float, int]] = {}   # database file → WAL (mtime, size) last checkpointed
        self._lock = threading.Lock()
        # Held for a whole round, and by a fork (os.register_at_fork): a child must never be forked while
        # the thread is inside SQLite's C code, whose own locks would stay held in the child and hang its
        # first SQLite call (gunicorn's master runs this thread and forks workers).
        self._round = threading.Lock()
        self._thread: threading.Thread | None = None
        self.runs = 0                                # checkpoints run (tests, diagnostics)
        _INSTANCES.add(self)

    def watch(self, engine: Any, path: str) -> None:
        """Checkpoint ``path`` for as long as ``engine`` lives."""
        with self._lock:
            self._paths[path] = self._paths.get(path, 0) + 1
        weakref.finalize(engine, self._forget, path)

    def _forget(self, path: str) -> None:
        with self._lock:
            left = self._paths.get(path, 0) - 1
            if left > 0:
                self._paths[path] = left
            else:
                self._paths.pop(path, None)
                self._seen.pop(path, None)

    def ensure_running(self) -> None:
        """Start the thread in this process if it is not running (a forked child starts its own)."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint", daemon=True)
                self._thread.start()

    def before_fork(self) -> None:
        self._round.acquire()           # waits for a round under way to end

    def after_fork_in_parent(self) -> None:
        self._round.release()

    def after_fork_in_child(self) -> None:
        """A forked child has no thread of ours, and the locks were held at the fork (ours by the fork
        itself, perhaps the other by the parent's thread): start afresh (the next connection starts the thread)."""
        self._lock, self._round = threading.Lock(), threading.Lock()
        self._thread = None

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.checkpoint_all()
            except Exception:                            # never let the thread die: commits would then
                log.exception("WAL checkpoint round failed")   # checkpoint only past the backstop

    def checkpoint_all(self) -> None:
        with self._round:
            # No self._lock here (list() of a dict is one step under the GIL): whoever holds it while
            # forking must not wait on a round that waits for it.
            for path in list(self._paths):
                self._checkpoint(path)

    def _checkpoint(self, path: str) -> None:
        try:
            stat = os.stat(path + "-wal")
        except OSError:
            return                                       # no WAL (yet, or any more)
        mark = (stat.st_mtime, stat.st_size)
        if self._seen.get(path) == mark:
            return                                       # nothing written since the last checkpoint
        try:
            # mode=rw: a database moved or deleted meanwhile is not created anew (which would make
            # SQLite discard the WAL left beside it as stale)
            connection = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=0)
            try:
                # Under back-to-back writes from several processes this never lets the WAL start over: a
                # writer is nearly always inside its transaction during the round, so the round never copies
                # every frame, and SQLite restarts the WAL only for a writer that begins when it has (read
                # marks showed no reader holding an old snapshot). The WAL then grows to the backstop. A
                # second checkpoint under the writer lock when many frames remain did restart it (WAL
                # 15-19 MB instead of 41 MB), but made about ten 2-4 ms stalls a second instead of one 4-10 ms
                # backstop commit, with the longest save no better: not taken (tenth session's measurement).
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as exc:                 # e.g. the file went away; a later round tries again
            log.debug("WAL checkpoint of a database skipped: %s", type(exc).__name__)
            return
        self._seen[path] = mark
        self.runs += 1


_INSTANCES: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _before_fork() -> None:
    for checkpointer in list(_INSTANCES):
        checkpointer.before_fork()


def _after_fork_in_parent() -> None:
    for checkpointer in list(_INSTANCES):
        checkpointer.after_fork_in_parent()


def _after_fork_in_child() -> None:
    for checkpointer in list(_INSTANCES):
        checkpointer.after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
CHECKPOINTER = Checkpointer()
