"""Several processes storing assessments into one SQLite database at once: how long each waits; prints figures.

    python bench/writers.py                   # 2 processes x 300 assessments, with and without the writer lock, 3 pairs

Each process runs the whole single-patient pipeline (features, scoring, explanation, storing) on patients of
the generated export read from a folder (no HTTP, so a process is busy all the time), as two gunicorn workers
under load would. Every transaction that appends to the audit chain queues on ``<database>-writer``
(``fhir_ai.store.writer_lock``); ``without`` runs the same code with that lock switched off, so writers wait by
SQLite's busy handler (sleeps of 1, 2, 5 ... 100 ms). Printed per run: the assessments per second of all the
processes together, and each process's median, p99 and longest assessment.

    python bench/writers.py --wal-pages       # one process: which tables and indexes a stored $assess writes

``--wal-pages`` stores 20 assessments with WAL checkpoints off, reads the frames each transaction appended to
the ``-wal`` file (every page a commit writes and syncs) and names the table or index each page belongs to.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))      # this checkout's fhir_ai, whatever an editable install points at


def work(export: Path, database: str, ids: list[str], warm: list[str], as_of: dict[str, str], lock: bool,
         start: "multiprocessing.Event",
         out: "multiprocessing.Queue[tuple[float, list[float]]]") -> None:
    from fhir_ai.config import load_settings
    from fhir_ai.fhir import times
    from fhir_ai.pipeline import Pipeline
    from fhir_ai.store import writer_lock
    if not lock:
        writer_lock.acquire = lambda connection: None      # type: ignore[assignment]
    pipeline = Pipeline.from_settings(load_settings({"source_url": str(export), "database_url": database,
                                                     "write_back": "false", "log_level": "WARNING"}))
    for patient_id in warm:                                  # warm-up: the folder's index, first calls
        pipeline.assess(patient_id, as_of=times.parse_datetime(as_of[patient_id]))
    from fhir_ai.server import prepare_worker_gc
    prepare_worker_gc()                                      # what the gunicorn workers do after the fork
    out.put((0.0, []))                                       # ready
    start.wait()
    spent: list[float] = []
    began = time.perf_counter()
    for patient_id in ids:
        t = time.perf_counter()
        result = pipeline.assess(patient_id, as_of=times.parse_datetime(as_of[patient_id]))
        spent.append(time.perf_counter() - t)
        assert result.resources, patient_id
    out.put((time.perf_counter() - began, spent))
    pipeline.close()


def run(export: Path, ids: list[str], warm: list[str], as_of: dict[str, str], processes: int, per: int, lock: bool) -> str:
    from fhir_ai.store import Store
    ctx = multiprocessing.get_context("spawn")            # each process starts as a fresh worker would
    with tempfile.TemporaryDirectory(prefix="fhir-ai-writers-") as tmp:
        database = f"sqlite:///{tmp}/bench.sqlite3"
        Store(database).close()                              # migrated once, before the processes start
        start, out = ctx.Event(), ctx.Queue()
        shares = [ids[k * per:(k + 1) * per] for k in range(processes)]
        workers = [ctx.Process(target=work, args=(export, database, share, warm[k * 3:(k + 1) * 3], as_of, lock, start, out))
                   for k, share in enumerate(shares)]
        for worker in workers:
            worker.start()
        for _ in workers:
            out.get(timeout=600)                             # each one ready (models and folder loaded, warm)
        results = []
        began = time.perf_counter()
        start.set()
        for _ in workers:
            results.append(out.get(timeout=600))
        wall = time.perf_counter() - began
        for worker in workers:
            worker.join()
    rate = processes * per / wall
    each = []
    for _, spent in results:
        ms = sorted(s * 1e3 for s in spent)
        each.append(f"p50 {statistics.median(ms):.1f} p99 {ms[int(len(ms) * 0.99) - 1]:.1f} max {ms[-1]:.0f} ms")
    return f"{'with' if lock else 'without':>7} the writer lock: {rate:6.0f} assessments/s; " + "; ".join(each)


def wal_pages(export: Path, ids: list[str], warm: list[str], as_of: dict[str, str]) -> None:
    import collections
    import sqlite3
    import struct
    from fhir_ai.config import load_settings
    from fhir_ai.fhir import times
    from fhir_ai.pipeline import Pipeline
    from fhir_ai.store import checkpoint
    checkpoint.CHECKPOINTER.ensure_running = lambda: None    # type: ignore[method-assign]  # the WAL stays whole
    with tempfile.TemporaryDirectory(prefix="fhir-ai-wal-") as tmp:
        path = f"{tmp}/bench.sqlite3"
        pipeline = Pipeline.from_settings(load_settings({"source_url": str(export), "database_url": f"sqlite:///{path}",
                                                         "write_back": "false", "log_level": "WARNING"}))
        for patient_id in warm + ids[:100]:                  # an index of some depth first
            pipeline.assess(patient_id, as_of=times.parse_datetime(as_of[patient_id]))
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        measured = ids[100:120]
        for patient_id in measured:
            pipeline.assess(patient_id, as_of=times.parse_datetime(as_of[patient_id]))
        wal = Path(path + "-wal").read_bytes()
        page_size = struct.unpack(">I", wal[8:12])[0]
        transactions: list[list[int]] = [[]]
        for offset in range(32, len(wal) - 24 - page_size + 1, 24 + page_size):
            page, commit = struct.unpack(">II", wal[offset:offset + 8])
            transactions[-1].append(page)
            if commit:
                transactions.append([])
        transactions = [t for t in transactions if t]
        with sqlite3.connect(path) as connection:
            owner = dict(connection.execute("SELECT pageno, name || ' (' || pagetype || ')' FROM dbstat"))
        pipeline.close()
    pages = collections.Counter(owner.get(page, "new page") for t in transactions for page in t)
    per = [len(t) for t in transactions]
    print(f"{len(measured)} $assess stored, {len(transactions)} transactions: {statistics.mean(per):.1f} pages of "
          f"{page_size} bytes each written to the WAL (range {min(per)}-{max(per)}); by table or index, per transaction:")
    for name, n in pages.most_common():
        print(f"  {n / len(transactions):5.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-process", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--wal-pages", action="store_true", help="which tables and indexes a stored $assess writes")
    args = parser.parse_args()
    import generate
    from assess import load_patients
    from bulk import machine
    print("machine:", machine())
    count = args.processes * args.per_process
    export = generate.cached(1000)
    patients = load_patients(export, 1000)
    if count > 1000 - 3 * args.processes:
        raise SystemExit("at most 1000 assessments in all, less 3 warm-up patients per process")
    ids, warm = list(patients)[:count], list(patients)[-3 * args.processes:]
    as_of = {pid: item["as_of"] for pid, item in patients.items()}
    if args.wal_pages:
        wal_pages(export, ids, warm, as_of)
        return
    print(f"{args.processes} processes x {args.per_process} assessments (explanations on, stored, no write-back), "
          "one SQLite database; each process's assessment times:")
    for pair in range(args.pairs):
        for lock in (pair % 2 == 0, pair % 2 == 1):          # alternate which goes first
            print(f"  pair {pair + 1}: " + run(export, ids, warm, as_of, args.processes, args.per_process, lock))
    print("machine at the end:", machine())


if __name__ == "__main__":
    main()
