"""Real processes against the real PostgreSQL (127.0.0.1:5432/test) and Redis (127.0.0.1:6379): a Celery
worker killed mid-job and a new one finishing it, then several Celery workers and gunicorn workers assessing
overlapping patient sets at once. Nothing lost, nothing stored twice. Loopback only; every wait is bounded.

They need PostgreSQL whatever the suite's store backend, so they run once: in the PostgreSQL pass
(`pytest --database=postgresql`, which .ci/run makes), and are skipped in the SQLite pass."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from sqlalchemy import create_engine, func, select, text

from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.jobs import JobStore
from fhir_ai.jobs.celery_app import configure
from fhir_ai.jobs.tables import JobItemRow
from fhir_ai.jobs.tasks import submit
from fhir_ai.store import Store, actors
from fhir_ai.store.tables import AssessmentRow, OutboxRow
from fhir_ai.fhir import times

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

try:
    from .. import databases
except ImportError:
    import databases  # type: ignore[no-redef]
REDIS = "redis://127.0.0.1:6379/0"
AS_OF = "2026-11-20T08:00:00Z"
TOKEN = "concurrency-test-token"


def _need(ok: Callable[[], Any], what: str) -> None:
    try:
        ok()
    except Exception as exc:  # noqa: BLE001 - any failure means the service is not there
        if os.environ.get("CI"):
            pytest.fail(f"{what} is not available ({exc}); .ci/run starts it")
        pytest.skip(f"{what} is not available ({exc})")


# -- a small hospital FHIR server on loopback: demo patients cloned, slow on purpose ---------------

class Hospital:
    """Patients c-000 … (each a clone of a demo patient), Groups, Encounter search, and PUTs recorded."""

    def __init__(self, patients: int, delay: float, groups: dict[str, list[str]]) -> None:
        self.delay = delay
        self.groups = groups
        self.puts: Counter[str] = Counter()
        self.lock = threading.Lock()
        demo = {name: [json.loads(line) for line in (DEMO_HOSPITAL / f"{name}.ndjson").read_text().splitlines()
                       if line.strip()] for name in ("Patient", "Encounter", "Observation")}
        demo_ids = sorted(p["id"] for p in demo["Patient"])
        self.patients: dict[str, dict[str, Any]] = {}
        self.encounters: dict[str, list[dict[str, Any]]] = {}
        self.observations: dict[str, list[dict[str, Any]]] = {}
        for n in range(patients):
            pid, original = f"c-{n:03d}", demo_ids[n % len(demo_ids)]
            self.patients[pid] = {**next(p for p in demo["Patient"] if p["id"] == original), "id": pid}
            for kind, store in (("Encounter", self.encounters), ("Observation", self.observations)):
                store[pid] = [{**r, "id": f"{pid}-{r['id']}", "subject": {"reference": f"Patient/{pid}"},
                               **({"encounter": {"reference": f"Encounter/{pid}-{r['encounter']['reference'].split('/')[-1]}"}}
                                  if "encounter" in r else {})}
                              for r in demo[kind] if r["subject"]["reference"] == f"Patient/{original}"]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda *_: None    # a killed worker drops its connection: expected here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hospital":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hospital = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                time.sleep(hospital.delay)
                parts = urlsplit(self.path)
                path = parts.path.removeprefix("/fhir/").split("/")
                query = parse_qs(parts.query)
                if path[0] == "Patient" and len(path) == 2 and path[1] in hospital.patients:
                    return self._send(200, hospital.patients[path[1]])
                if path[0] == "Group" and len(path) == 2 and path[1] in hospital.groups:
                    return self._send(200, {"resourceType": "Group", "id": path[1], "type": "person", "actual": True,
                                            "member": [{"entity": {"reference": f"Patient/{p}"}}
                                                       for p in hospital.groups[path[1]]]})
                if path == ["Encounter"]:
                    patient = query.get("patient", [None])[0]
                    found = (hospital.encounters.get(patient, []) if patient
                             else [e for es in hospital.encounters.values() for e in es
                                   if e["status"] == "in-progress"])
                    return self._send(200, searchset(found))
                if path == ["Observation"]:
                    return self._send(200, searchset(hospital.observations.get(query.get("patient", [""])[0], [])))
                self._send(404, {"resourceType": "OperationOutcome",
                                 "issue": [{"severity": "error", "code": "not-found"}]})

            def do_PUT(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hospital.lock:
                    hospital.puts[body["id"]] += 1
                self._send(200, body)

        return Handler


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


# -- fixtures: a fresh PostgreSQL schema, a private queue, processes ----------------------------------

@pytest.fixture
def postgres_url() -> Iterator[str]:
    server = databases.server_url()
    if not server:
        pytest.skip("runs in the PostgreSQL pass (pytest --database=postgresql)")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    _need(lambda: admin.connect().close(), "PostgreSQL at 127.0.0.1:5432/test")
    schema = f"conc_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield databases.with_schema(server, schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def queue() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=1)
    _need(client.ping, "Redis at 127.0.0.1:6379")
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    keys = client.keys(f"*{name}*")
    if keys:
        client.delete(*keys)
    configure(load_settings())     # this process's Celery app back on the default queue


class Processes:
    """Started processes (each in its own process group), stopped at the end whatever happens."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.started = folder, env, []

    def start(self, name: str, *args: str, module: bool = False) -> subprocess.Popen:
        """``fhir-ai ARGS`` (or ``python ARGS`` with module=True) in a new process group."""
        log = open(self.folder / f"{name}.log", "ab")
        command = [sys.executable, *args] if module else [sys.executable, "-m", "fhir_ai.cli", *args]
        process = subprocess.Popen(command, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((process, log))
        return process

    def kill(self, process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def close(self) -> None:
        for process, log in self.started:
            if process.poll() is None:
                self.kill(process, signal.SIGTERM)
            log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.folder.glob("*.log"))


@contextmanager
def processes(tmp_path: Path, env: dict[str, str]) -> Iterator[Processes]:
    group = Processes(tmp_path, env)
    try:
        yield group
    finally:
        group.close()


def environment(postgres_url: str, queue: str, hospital: Hospital, tmp_path: Path, **extra: str) -> dict[str, str]:
    from fhir_ai.auth.tokens import hash_token
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_AI_")}
    env.update({"FHIR_AI_DATABASE_URL": postgres_url, "FHIR_AI_BROKER_URL": REDIS, "FHIR_AI_JOB_QUEUE": queue,
                "FHIR_AI_SOURCE_URL": hospital.url, "FHIR_AI_WRITE_BACK": "true", "FHIR_AI_SOURCE_RETRIES": "1",
                "FHIR_AI_INSTANCE_PATH": str(tmp_path / "instance"), "FHIR_AI_JOB_VISIBILITY_TIMEOUT": "4",
                "FHIR_AI_JOB_CHUNK_SIZE": "3", "FHIR_AI_AUTH_TOKENS": f"concurrency-test:admin:{hash_token(TOKEN)}",
                "FHIR_AI_LOG_LEVEL": "INFO", **extra})
    return env


def wait_for(condition: Callable[[], Any], timeout: float, what: str, group: Processes) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{group.logs()}")


def check_store(url: str, patients: list[str], hospital: Hospital) -> dict[str, int]:
    """Two RiskAssessments per patient as of AS_OF (the model's and NEWS2), each stored once, each written
    back; scheduled rescoring (as of its own slot time) may add others, which are checked the same way."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(AssessmentRow.id, AssessmentRow.identifier, AssessmentRow.patient_id)
                                      .where(AssessmentRow.occurrence == times.parse_datetime(AS_OF))).all()
            every = connection.execute(select(AssessmentRow.id, AssessmentRow.identifier)).all()
            outbox = connection.execute(select(OutboxRow.resource_id, OutboxRow.status)
                                        .where(OutboxRow.resource_id.in_([r[0] for r in rows]))).all()
            items = connection.execute(select(JobItemRow.status, func.count()).group_by(JobItemRow.status)).all()
    finally:
        engine.dispose()
    per_patient = Counter(p for _, _, p in rows)
    assert sorted(per_patient) == sorted(patients), "a patient is missing or foreign"
    assert set(per_patient.values()) == {2}, f"not exactly two assessments each: {per_patient}"
    assert len({i for i, _, _ in rows}) == len({k for _, k, _ in rows}) == len(rows)
    assert len({i for i, _ in every}) == len({k for _, k in every}) == len(every)
    assert sorted(r for r, _ in outbox) == sorted(i for i, _, _ in rows), "outbox rows lost or doubled"
    assert {s for _, s in outbox} == {"delivered"}
    assert {i for i, _, _ in rows} <= set(hospital.puts)
    return {"assessments": len(rows), "outbox": len(outbox), "puts": sum(hospital.puts.values()),
            **{f"items_{s}": n for s, n in items}}


# -- the tests -------------------------------------------------------------------------------------

def test_a_job_survives_its_worker_being_killed_and_scheduled_rescoring_runs(
        postgres_url: str, queue: str, tmp_path: Path) -> None:
    patients = [f"c-{n:03d}" for n in range(18)]
    with Hospital(len(patients), 0.04, {"ward-a": patients, "ward-b": patients[:3]}) as hospital, \
            processes(tmp_path, environment(postgres_url, queue, hospital, tmp_path)) as group:
        settings = load_settings({"database_url": postgres_url, "broker_url": REDIS, "job_queue": queue,
                                  "source_url": hospital.url})
        configure(settings)
        store = Store(postgres_url)
        jobs = JobStore(store)
        try:
            first = group.start("worker-1", "worker", "--no-beat", "--concurrency", "2")
            job_id, _ = submit(jobs, kind="group", scope="ward-a", as_of=times.parse_datetime(AS_OF),
                               request={"request": "POST /Group/ward-a/$assess", "models": []})
            wait_for(lambda: (jobs.get(job_id).done or 0) >= 4, 60, "the first patients", group)
            group.kill(first)                      # SIGKILL, the whole process group, mid-job
            at_kill = jobs.get(job_id)
            assert at_kill.status == "running" and at_kill.done < len(patients), "the job ended before the kill"
            # A new worker (with the scheduler: ward-b every 2 s) picks up what the dead one held.
            group.env.update(FHIR_AI_WARDS="ward-b", FHIR_AI_WARD_INTERVAL="2", FHIR_AI_WORKER_INTERVAL="1")
            group.start("worker-2", "worker", "--beat", "--concurrency", "2")
            done = wait_for(lambda: (j := jobs.get(job_id)).status == "completed" and j, 90, "the job", group)
            assert done.counts.get("failed", 0) == 0 and done.total == len(patients)
            figures = check_store(postgres_url, patients, hospital)
            ward = wait_for(lambda: jobs.last("ward", "ward-b"), 30, "a scheduled ward-b job", group)
            assert ward.total == 3 and ward.requested_by == actors.LOCAL.client_id
            print(f"\nkill test: {at_kill.done}/{len(patients)} done at the kill; {figures}")
        finally:
            store.close()


def test_celery_and_gunicorn_workers_at_once_lose_and_duplicate_nothing(
        postgres_url: str, queue: str, tmp_path: Path) -> None:
    patients = [f"c-{n:03d}" for n in range(30)]
    groups = {"ward-a": patients[:20], "ward-b": patients[10:], "ward-c": patients[::2]}
    with Hospital(len(patients), 0.01, groups) as hospital, \
            processes(tmp_path, environment(postgres_url, queue, hospital, tmp_path)) as group:
        Store(postgres_url).close()            # migrate once, before processes race to do it
        for n in range(3):
            group.start(f"worker-{n}", "worker", "--no-beat", "--concurrency", "1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        group.start("gunicorn", "serve", "--port", str(port), "--workers", "2")   # `fhir-ai serve`: gunicorn
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json",
                "Prefer": "respond-async"}
        body = json.dumps({"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]})

        def up() -> bool:
            try:
                return requests.get(f"{base}/metadata", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(up, 60, "gunicorn", group)
        started = time.monotonic()
        kick_offs = [f"/Group/{g}/$assess" for g in groups] + ["/$assess-all"]
        with ThreadPoolExecutor(8) as pool:
            accepted = list(pool.map(lambda path: requests.post(base + path, data=body, headers=auth, timeout=30),
                                     kick_offs))
            # meanwhile, single-patient $assess through the gunicorn workers, for patients the jobs also take
            direct = list(pool.map(lambda p: requests.post(f"{base}/Patient/{p}/$assess", data=body,
                                                           headers=auth, timeout=60), patients[5:15]))
        assert [r.status_code for r in accepted] == [202] * 4
        assert [r.status_code for r in direct] == [200] * 10
        locations = [r.headers["Content-Location"] for r in accepted]

        def finished() -> list[dict[str, Any]] | None:
            answers = [requests.get(url, headers=auth, timeout=10) for url in locations]
            if any(a.status_code == 202 for a in answers):
                return None
            assert [a.status_code for a in answers] == [200] * 4, [a.text[:300] for a in answers]
            return [a.json() for a in answers]
        manifests = wait_for(finished, 120, "four jobs", group)
        seconds = time.monotonic() - started
        for manifest, members in zip(manifests, [*groups.values(), patients]):
            assert manifest["patients"] == len(members) and manifest["failed"] == 0
            assert sorted({o["patient"] for o in manifest["output"]}) == sorted(f"Patient/{p}" for p in members)
        figures = check_store(postgres_url, patients, hospital)
        repeats = sum(len(m) for m in groups.values()) + len(patients) + 10 - len(patients)
        print(f"\nconcurrency: 3 Celery + 2 gunicorn workers, {len(patients)} patients asked "
              f"{repeats + len(patients)} times, {seconds:.1f} s; {figures}")
