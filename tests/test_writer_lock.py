"""SQLite: every transaction that appends to the audit chain queues on ``<database>-writer`` (an OS file lock,
store.writer_lock), held from the chain's first statement until the connection is back in the pool."""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from fhir_ai.store import Access, Store, writer_lock
from fhir_ai.store.audit import Chain

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]


@pytest.fixture
def store(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db' / 'fhir_ai.sqlite3'}")
    yield store
    store.close()


def lock_file(store: Store) -> str:
    return str(store.engine.url.database) + writer_lock.SUFFIX


def held_elsewhere(store: Store) -> bool:
    """Whether someone holds the writer lock (asked by an open file of our own, as another process would)."""
    fd = os.open(lock_file(store), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                # closing lets go of a lock we took
    return False


def save(store: Store, rid: str) -> None:
    store.save_assessment(risk_assessment(rid, subject="Patient/p1"), model_id="deterioration", model_version="1.0")


def test_a_chain_transaction_holds_the_lock_until_it_commits(store):
    with store.transaction() as connection:
        Chain(connection)
        assert held_elsewhere(store)
    assert not held_elsewhere(store)
    save(store, "ra-1")                             # and a whole save lets go of it too
    assert not held_elsewhere(store)


def test_a_rolled_back_chain_transaction_lets_go_of_it(store):
    with pytest.raises(RuntimeError), store.transaction() as connection:
        Chain(connection)
        assert held_elsewhere(store)
        raise RuntimeError("boom")
    assert not held_elsewhere(store)
    save(store, "ra-1")
    assert store.get_assessment("ra-1")["id"] == "ra-1"


def test_a_save_waits_for_the_lock_held_by_another_process(store):
    """Held here by a file of our own, as another process would hold it (no SQLite lock involved): a save
    and an audited read wait for it, then go through the moment it is let go."""
    save(store, "ra-0")                             # the schema and pool are warm
    fd = os.open(lock_file(store), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done: list[str] = []
    writers = [threading.Thread(target=lambda: (save(store, "ra-1"), done.append("save"))),
               threading.Thread(target=lambda: (store.record_access(Access("R", "read")), done.append("read")))]
    try:
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(timeout=0.5)
        assert done == [] and all(thread.is_alive() for thread in writers)
    finally:
        os.close(fd)
    for thread in writers:
        thread.join(timeout=30)
    assert sorted(done) == ["read", "save"]
    assert store.get_assessment("ra-1")["id"] == "ra-1"


def test_threads_of_one_process_queue_on_it_too(store):
    """Each transaction opens the lock file anew, so two threads of one process exclude each other. The holder
    takes the file lock alone (no SQLite lock held): the other thread's save waits for that file lock."""
    save(store, "ra-0")
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.engine.connect() as connection:
            writer_lock.acquire(connection)
            entered.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    other = threading.Thread(target=save, args=(store, "ra-2"))
    other.start()
    other.join(timeout=0.5)
    assert other.is_alive() and store.get_assessment("ra-2") is None     # queued behind the holder
    release.set()
    holder.join(timeout=30)
    other.join(timeout=30)
    assert not other.is_alive() and store.get_assessment("ra-2")["id"] == "ra-2"


def test_the_lock_is_let_go_when_the_connection_is_closed_or_invalidated(store):
    with store.engine.connect() as connection:
        writer_lock.acquire(connection)
        assert held_elsewhere(store)
        connection.invalidate()                     # a lost connection (rawsql invalidates those)
        assert not held_elsewhere(store)
    with store.engine.connect() as connection:
        writer_lock.acquire(connection)
        assert held_elsewhere(store)
    assert not held_elsewhere(store)                # checked in
    assert not writer_lock._open


def test_no_descriptor_is_left_open(store):
    for n in range(30):
        save(store, f"ra-{n}")
        store.record_access(Access("R", "read"))
    assert not [fd for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(lock_file(store))]
    assert not writer_lock._open


def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(store):
    """The child gets a copy of the open lock file; it closes its copy, so the parent's commit frees the lock
    while the child still runs (an unlock in the child would have freed it under the parent's feet)."""
    read_end, write_end = os.pipe()
    with store.transaction() as connection:
        Chain(connection)
        pid = os.fork()
        if pid == 0:                                # the child: tell whether the lock is still the parent's
            try:
                os.close(read_end)
                os.write(write_end, b"held" if held_elsewhere(store) else b"free")
                threading.Event().wait(2)           # still alive while the parent commits
            finally:
                os._exit(0)
        os.close(write_end)
        assert os.read(read_end, 4) == b"held"
    try:
        assert not held_elsewhere(store)            # committed: free although the child is alive
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)


def test_a_child_forked_while_a_thread_waits_for_the_lock_does_not_keep_it(store):
    """A thread waits for the lock (held elsewhere) when the process forks: the child's copy of the waiting
    descriptor is closed too, so once that thread has its turn and commits, the lock is free again although
    the child still runs."""
    save(store, "ra-0")
    fd = os.open(lock_file(store), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    waiter = threading.Thread(target=save, args=(store, "ra-1"))
    waiter.start()
    for _ in range(3000):                           # until the waiter's descriptor is open (it then waits)
        if writer_lock._open:
            break
        threading.Event().wait(0.01)
    assert writer_lock._open
    pid = os.fork()
    if pid == 0:
        os.close(fd)                                # the test's own holder is the parent's alone
        threading.Event().wait(3)                   # the child outlives the parent's save
        os._exit(0)
    try:
        os.close(fd)                                # the waiter's turn
        waiter.join(timeout=30)
        assert store.get_assessment("ra-1")["id"] == "ra-1"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # the child is still there
        assert not held_elsewhere(store)
    finally:
        os.waitpid(pid, 0)


def test_a_child_does_not_close_a_descriptor_of_its_parent_s_transaction(store):
    """A child forked inside a chain transaction that ends it (the connection's info names the parent's
    descriptor, whose number the child may have reused) closes nothing of its own."""
    read_end, write_end = os.pipe()
    with store.engine.connect() as connection:
        writer_lock.acquire(connection)
        info = dict(connection.info)
        pid = os.fork()
        if pid == 0:
            try:
                mine = os.open(os.devnull, os.O_RDONLY)     # likely the number the parent's descriptor had
                writer_lock._release(info)
                os.fstat(mine)
                os.write(write_end, b"kept")
            except OSError:
                os.write(write_end, b"lost")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read_end, 4) == b"kept"
        assert held_elsewhere(store)                # and the parent still holds it
    os.close(read_end)
    os.close(write_end)


def test_a_file_system_without_locks_goes_without(store, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="fhir_ai.store.writer_lock"):
        save(store, "ra-1")
        save(store, "ra-2")
    assert store.get_assessment("ra-2")
    assert not writer_lock._open
    assert [r.getMessage() for r in caplog.records if r.name == "fhir_ai.store.writer_lock"] == [
        f"cannot use the SQLite writer lock {lock_file(store)} (No locks available); writers wait by SQLite's "
        "busy handler"]


def test_a_folder_where_the_lock_file_cannot_be_made_goes_without(tmp_path, monkeypatch, caplog):
    store = Store(f"sqlite:///{tmp_path / 'ro' / 'fhir_ai.sqlite3'}")
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(writer_lock.SUFFIX):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="fhir_ai.store.writer_lock"):
            save(store, "ra-1")
            save(store, "ra-2")
        assert store.get_assessment("ra-2")
        warnings = [r for r in caplog.records if r.name == "fhir_ai.store.writer_lock"]
        assert len(warnings) == 1 and "busy handler" in warnings[0].getMessage()
    finally:
        store.close()
