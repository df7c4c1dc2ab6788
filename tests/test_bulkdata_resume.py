"""Bulk Data runs that stop while the hospital's server prepares the export (the process killed, the host
restarted): the next run polls the export that run started instead of kicking off a second one, unless
that export is gone (404/410), asked for something else, or was kicked off longer ago than the wait limit.
A run that is still going (its job heard from within STALE_AFTER) is never taken for one that stopped."""
from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import responses
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

import fhir_ai.bulkdata as bulkdata
from fhir_ai.bulkdata import STALE_AFTER, BulkDataClient, export_and_assess
from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.errors import FhirAiError
from fhir_ai.jobs import JobStore
from fhir_ai.jobs.tables import JobRow
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.store import Store
from test_bulkdata import (BASE, FILES, STATUS, TOKEN, Clock, add_files, client, clock, jobs,  # noqa: F401
                           manifest, registry)

SCOPE = f"{BASE}/Patient/$export"
OTHER_STATUS = f"{BASE}/$export-poll/43"


def settings() -> Any:
    return load_settings({"source_url": BASE, "write_back": False})


def killed_while_polling(database_url: str, registry: ModelRegistry, workdir: Path, *, full: bool = False,
                         silent_for: float | None = STALE_AFTER + 60) -> None:
    """A run in another process that dies - no exception handler, no finally - at its first wait for the
    export (as under SIGKILL or a host restart): what it left in the job table is all there is. Its job
    is then made ``silent_for`` seconds quiet (as if it had died that long ago; None: just now)."""
    pid = os.fork()
    if pid == 0:                                                     # the child: never returns
        try:
            store = Store(database_url)
            doomed = BulkDataClient(BASE, token=TOKEN, sleep=lambda _: os._exit(0), max_wait=600)
            export_and_assess(settings(), registry, JobStore(store), doomed, workdir=workdir,
                              output=workdir / "o.ndjson", full=full)
        finally:
            os._exit(1)                                             # it did not stop where it should have
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if silent_for is not None:
        store = Store(database_url)
        try:
            dead = JobStore(store).last("bulk-export", SCOPE, status="running")
            assert dead is not None
            change(store, dead.id, updated_at=datetime.now(timezone.utc) - timedelta(seconds=silent_for))
        finally:
            store.close()


def change(store: Store, job_id: str, **values: Any) -> None:
    with store.session() as session, session.begin():
        session.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def kicks(method: str = "GET") -> list[Any]:
    """The kick-off requests made (GET: the export; POST: the changed patients' full records)."""
    return [c.request for c in responses.calls
            if c.request.method == method and c.request.url.split("?")[0] == SCOPE]


@responses.activate
def test_the_next_run_resumes_the_export_a_killed_run_left_behind(registry: ModelRegistry, jobs: JobStore,
                                                                  client: BulkDataClient, database_url: str,
                                                                  tmp_path: Path) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "killed")
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    assert stopped is not None and stopped.result["exports"]["export"]["statusUrl"] == STATUS
    responses.reset()
    responses.get(STATUS, status=202, headers={"Retry-After": "1"})
    responses.get(STATUS, json=manifest())
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert kicks() == [] and kicks("POST") == []                   # no second export asked for
    assert [c.request.url for c in responses.calls[:2]] == [STATUS, STATUS]
    assert run.resumed == stopped.id and run.patients == 12 and run.complete
    done = jobs.last("bulk-export", SCOPE)
    assert done.id == run.job_id and done.request["resumes"] == stopped.id
    assert done.result["transactionTime"] == "2026-11-20T08:00:00Z" and "exports" not in done.result
    assert jobs.get(stopped.id).status == "failed" and run.job_id in jobs.get(stopped.id).error
    assert jobs.last("bulk-export", SCOPE, status="running") is None


@responses.activate
@pytest.mark.parametrize("gone", [404, 410])
def test_an_export_that_is_gone_is_kicked_off_anew(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient,
                                                   database_url: str, tmp_path: Path, gone: int) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202)
    killed_while_polling(database_url, registry, tmp_path / "killed")
    responses.reset()
    responses.get(STATUS, status=gone, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found", "diagnostics": "no such job"}]})
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, json=manifest())
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert [c.request.url.split("?")[0] for c in responses.calls[:3]] == [STATUS, SCOPE, OTHER_STATUS]
    assert not any(c.request.method == "DELETE" for c in responses.calls)     # nothing there to cancel
    assert run.complete and run.patients == 12 and run.resumed is not None


@responses.activate
def test_an_export_that_asked_for_something_else_is_not_resumed(registry: ModelRegistry, jobs: JobStore,
                                                                client: BulkDataClient, database_url: str,
                                                                tmp_path: Path) -> None:
    """A run that stopped during an incremental export does not hand that export to a --full run: it is
    not polled but cancelled, and the stopped run's job is failed (silent past STALE_AFTER, it is dead)."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, json=manifest("2026-11-20T08:00:00Z"))
    add_files()
    export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "1", output=tmp_path / "1.ndjson")
    responses.reset()
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202)
    killed_while_polling(database_url, registry, tmp_path / "killed")           # asked _since 08:00
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    assert stopped.request["since"] == "2026-11-20T08:00:00Z"
    responses.reset()
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, json=manifest("2026-11-20T10:00:00Z"))
    responses.delete(STATUS, status=202)
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson",
                            full=True)
    assert run.resumed is None and run.since is None and len(kicks()) == 1
    assert "_since" not in parse_qs(urlsplit(kicks()[0].url).query)
    assert [c.request.method for c in responses.calls if c.request.url.startswith(STATUS)] == ["DELETE"]
    after = jobs.get(stopped.id)
    assert after.status == "failed" and f"job {run.job_id} cancelled" in after.error


@responses.activate
@pytest.mark.parametrize("now_changed", ["demo-002", "demo-003"])
def test_a_run_killed_during_the_changed_patients_export(registry: ModelRegistry, jobs: JobStore,
                                                         client: BulkDataClient, database_url: str, tmp_path: Path,
                                                         now_changed: str) -> None:
    """Killed while demo-002's full record was being prepared: the next run polls the incremental export
    again (its manifest is still there). When it names the same patients, their export is polled too (no
    kick-off at all); when it names others, that export is cancelled and theirs kicked off."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, json=manifest("2026-11-20T08:00:00Z"))
    add_files()
    export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "1", output=tmp_path / "1.ndjson")
    responses.reset()
    changed, full = f"{FILES}/changed", f"{FILES}/full"

    def incremental(patient: str) -> None:
        responses.get(STATUS, json=manifest("2026-11-20T09:00:00Z", base=changed))
        responses.get(f"{changed}/Patient.ndjson", body=b"")
        responses.get(f"{changed}/Encounter.ndjson", body=b"")
        obs = [l for l in (DEMO_HOSPITAL / "Observation.ndjson").read_bytes().splitlines()
               if f"Patient/{patient}".encode() in l]
        responses.get(f"{changed}/Observation.ndjson", body=obs[-1] + b"\n")

    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    incremental("demo-002")
    responses.post(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, status=202)
    killed_while_polling(database_url, registry, tmp_path / "killed")
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    assert set(stopped.result["exports"]) == {"export", "changed"}
    assert "demo-002" not in json.dumps(stopped.result)                       # a hash, not the patients
    responses.reset()
    incremental(now_changed)
    fresh = f"{BASE}/$export-poll/44"
    responses.delete(OTHER_STATUS, status=202)
    responses.post(SCOPE, status=202, headers={"Content-Location": fresh})
    for status_url in (OTHER_STATUS, fresh):
        responses.get(status_url, json=manifest("2026-11-20T09:00:05Z", base=full))
    add_files(full, only=(now_changed,))
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert kicks() == []
    cancelled = [c.request.url for c in responses.calls if c.request.method == "DELETE"]
    if now_changed == "demo-002":
        assert kicks("POST") == [] and cancelled == []
    else:
        assert cancelled == [OTHER_STATUS]
        assert [p["valueReference"]["reference"] for p in json.loads(kicks("POST")[0].body)["parameter"]
                if p["name"] == "patient"] == ["Patient/demo-003"]
    assert run.resumed == stopped.id and run.since == "2026-11-20T08:00:00Z" and run.patients == 1 and run.complete
    assert jobs.last("bulk-export", SCOPE).result["transactionTime"] == "2026-11-20T09:00:00Z"


# -- telling a live run from one that stopped ------------------------------------------------------------

class Hospital:
    """A server with one export per kick-off (its own status URL); GET on a status URL: 202 until
    ``ready``, 404 once DELETEd."""

    def __init__(self) -> None:
        self.kicks, self.deleted, self.ready = 0, set(), False
        responses.add_callback(responses.GET, SCOPE, callback=self.kick_off)
        responses.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/\$export-poll/\d+"),
                               callback=self.status)
        responses.add_callback(responses.DELETE, re.compile(rf"{re.escape(BASE)}/\$export-poll/\d+"),
                               callback=self.delete)
        add_files()

    def kick_off(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.kicks += 1
        return 202, {"Content-Location": f"{BASE}/$export-poll/{self.kicks}"}, ""

    def status(self, request: Any) -> tuple[int, dict[str, str], str]:
        if request.url in self.deleted:
            return 404, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-found", "diagnostics": "no such export"}]})
        if not self.ready:
            return 202, {"Retry-After": "3600"}, ""
        return 200, {}, json.dumps(manifest())

    def delete(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.deleted.add(request.url)
        return 202, {}, ""


class LiveRun:
    """Run A, alive in another thread, in its first wait between two polls (a Retry-After of an hour:
    a long export keeps a run there for hours) until ``finish``."""

    def __init__(self, database_url: str, registry: ModelRegistry, tmp_path: Path) -> None:
        self.waiting, self.go, self.run, self.error = threading.Event(), threading.Event(), None, None
        self.thread = threading.Thread(target=self._run, args=(database_url, registry, tmp_path))
        self.thread.start()
        assert self.waiting.wait(20)

    def _nap(self, _: float) -> None:
        self.waiting.set()
        assert self.go.wait(20)

    def _run(self, database_url: str, registry: ModelRegistry, tmp_path: Path) -> None:
        store = Store(database_url)
        try:
            self.run = export_and_assess(settings(), registry, JobStore(store),
                                         BulkDataClient(BASE, token=TOKEN, sleep=self._nap, max_wait=7200),
                                         workdir=tmp_path / "a", output=tmp_path / "a.ndjson")
        except BaseException as exc:          # noqa: BLE001 - the test looks at it
            self.error = exc
        finally:
            store.close()

    def finish(self) -> None:
        self.go.set()
        self.thread.join(20)
        assert not self.thread.is_alive()


@responses.activate
def test_a_second_run_leaves_a_live_runs_export_alone(registry: ModelRegistry, jobs: JobStore, database_url: str,
                                                      tmp_path: Path) -> None:
    """Runs overlap (cron every hour, an export that takes longer). B kicks off its own export; when B
    gives up (its own wait limit) it cancels that one, not the one A is waiting for."""
    hospital = Hospital()
    a = LiveRun(database_url, registry, tmp_path)
    a_job = jobs.last("bulk-export", SCOPE, status="running")
    impatient = BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None, max_wait=0.0)
    with pytest.raises(FhirAiError):
        export_and_assess(settings(), registry, jobs, impatient, workdir=tmp_path / "b", output=tmp_path / "b.ndjson")
    assert hospital.kicks == 2 and hospital.deleted == {f"{BASE}/$export-poll/2"}       # B's own, only
    assert jobs.get(a_job.id).status == "running"
    hospital.ready = True
    a.finish()
    assert a.error is None and a.run is not None and a.run.complete and a.run.resumed is None
    assert jobs.get(a_job.id).status == "completed"


@responses.activate
def test_a_live_run_is_not_taken_over(registry: ModelRegistry, jobs: JobStore, database_url: str,
                                      tmp_path: Path) -> None:
    hospital = Hospital()
    a = LiveRun(database_url, registry, tmp_path)
    a_job = jobs.last("bulk-export", SCOPE, status="running")
    hospital.ready = True
    b = export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None),
                          workdir=tmp_path / "b", output=tmp_path / "b.ndjson")
    assert b.resumed is None and hospital.kicks == 2 and b.complete
    assert jobs.get(a_job.id).status == "running"
    a.finish()
    assert a.error is None and jobs.get(a_job.id).status == "completed" and not hospital.deleted


@responses.activate
def test_a_run_silent_too_long_is_taken_over_and_its_job_stays_failed(registry: ModelRegistry, jobs: JobStore,
                                                                      database_url: str, tmp_path: Path) -> None:
    """A run not heard from for STALE_AFTER (say its host was suspended) is taken over; should it wake up,
    it stops at its next step (RunStopped: the other run did the work), its job does not come back as
    completed, and it cancels nothing the other run polls."""
    hospital = Hospital()
    a = LiveRun(database_url, registry, tmp_path)
    a_job = jobs.last("bulk-export", SCOPE, status="running")
    change(jobs.store, a_job.id, updated_at=datetime.now(timezone.utc) - timedelta(seconds=STALE_AFTER + 1))
    hospital.ready = True
    b = export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None),
                          workdir=tmp_path / "b", output=tmp_path / "b.ndjson")
    assert b.resumed == a_job.id and hospital.kicks == 1 and b.complete
    a.finish()
    assert isinstance(a.error, bulkdata.RunStopped) and "was failed while the run went on" in a.error.message
    after = jobs.get(a_job.id)
    assert after.status == "failed" and b.job_id in after.error
    assert jobs.last("bulk-export", SCOPE).id == b.job_id and not hospital.deleted


@responses.activate
def test_a_run_killed_just_now_is_not_resumed_yet(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient,
                                                  database_url: str, tmp_path: Path) -> None:
    """Nothing tells a run killed a moment ago from one waiting between polls: it is left alone until
    STALE_AFTER has passed; this run kicks off its own export."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "killed", silent_for=STALE_AFTER - 60)
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    responses.reset()
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, json=manifest())
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert run.resumed is None and len(kicks()) == 1 and run.complete
    assert not any(c.request.url.startswith(STATUS) for c in responses.calls)
    assert jobs.get(stopped.id).status == "running"


def test_only_one_run_takes_a_silent_job_over(jobs: JobStore) -> None:
    now = datetime.now(timezone.utc)
    jobs.create("stopped", kind="bulk-export", scope=SCOPE, as_of=now, request={})
    jobs.start("stopped")
    assert not jobs.take_over("stopped", silent_since=now - timedelta(seconds=60), message="by b")  # heard from
    assert jobs.take_over("stopped", silent_since=now + timedelta(seconds=1), message="by b")
    assert not jobs.take_over("stopped", silent_since=now + timedelta(seconds=1), message="by c")
    assert not jobs.heartbeat("stopped")
    assert not jobs.set_result("stopped", {"transactionTime": "x"}, status="completed")
    after = jobs.get("stopped")
    assert after.status == "failed" and after.error == "by b" and after.result == {}


@responses.activate
def test_a_running_export_job_is_refreshed_while_its_run_waits(registry: ModelRegistry, jobs: JobStore,
                                                               database_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """However long the run sleeps between polls (a Retry-After of an hour), its job is refreshed every
    HEARTBEAT seconds; once the run has ended, no more."""
    monkeypatch.setattr(bulkdata, "HEARTBEAT", 0.05)
    hospital = Hospital()
    a = LiveRun(database_url, registry, tmp_path)
    a_job = jobs.last("bulk-export", SCOPE, status="running")
    seen = [_updated(jobs, a_job.id)]
    for _ in range(3):
        time.sleep(0.3)
        seen.append(_updated(jobs, a_job.id))
    assert seen == sorted(seen) and len(set(seen)) == 4
    hospital.ready = True
    a.finish()
    ended = _updated(jobs, a_job.id)
    time.sleep(0.3)
    assert _updated(jobs, a_job.id) == ended and jobs.get(a_job.id).status == "completed"


def _updated(jobs: JobStore, job_id: str) -> datetime:
    with jobs.store.session() as session:
        return session.get(JobRow, job_id).updated_at


# -- a chain of stopped runs ---------------------------------------------------------------------------

def recorded(jobs: JobStore) -> dict[str, Any]:
    return jobs.last("bulk-export", SCOPE, status="running").result["exports"]["export"]


@responses.activate
def test_a_chain_of_stopped_runs_keeps_when_the_export_was_kicked_off(registry: ModelRegistry, jobs: JobStore,
                                                                      database_url: str, tmp_path: Path) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    before = datetime.now(timezone.utc)
    killed_while_polling(database_url, registry, tmp_path / "k1")
    first = recorded(jobs)
    assert before <= datetime.fromisoformat(first["kickedOffAt"]) <= datetime.now(timezone.utc)
    killed_while_polling(database_url, registry, tmp_path / "k2")          # resumes it
    killed_while_polling(database_url, registry, tmp_path / "k3")          # and again
    assert recorded(jobs) == first


@responses.activate
def test_an_export_kicked_off_longer_ago_than_the_wait_limit_is_cancelled_and_asked_anew(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, database_url: str, tmp_path: Path) -> None:
    """Otherwise each run stopped (a wrapper's timeout sends SIGTERM, which runs no finally) hands a stuck
    export to the next, and every later run polls it, for ever."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "k1")
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    year_ago = (datetime.now(timezone.utc) - timedelta(days=365)).isoformat()
    change(jobs.store, stopped.id, result=orjson.dumps({"since": None, "exports": {"export": {
        **recorded(jobs), "kickedOffAt": year_ago}}}).decode())
    responses.reset()
    responses.delete(STATUS, status=202)
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, json=manifest())
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert [(c.request.method, c.request.url.split("?")[0]) for c in responses.calls[:3]] == [
        ("DELETE", STATUS), ("GET", SCOPE), ("GET", OTHER_STATUS)]
    assert run.resumed == stopped.id and run.complete


@responses.activate
def test_a_resumed_export_is_waited_for_only_what_is_left_of_the_wait_limit(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, clock: Clock, database_url: str,
        tmp_path: Path) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "k1")
    stopped = jobs.last("bulk-export", SCOPE, status="running")
    change(jobs.store, stopped.id, result=orjson.dumps({"since": None, "exports": {"export": {
        **recorded(jobs), "kickedOffAt": (datetime.now(timezone.utc) - timedelta(seconds=500)).isoformat()}}}).decode())
    responses.reset()
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    responses.delete(STATUS, status=202)
    with pytest.raises(FhirAiError, match="did not finish within 600 s"):
        export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert 99 <= sum(clock.sleeps) <= 101                          # client's max_wait 600, 500 s gone already
    assert kicks() == [] and responses.calls[-1].request.method == "DELETE"


@responses.activate
def test_a_run_killed_and_rerun_at_once_is_taken_over_later_whatever_it_asked(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, database_url: str, tmp_path: Path) -> None:
    """Killed, then rerun within STALE_AFTER: the rerun leaves it alone and completes, so _since moves on.
    A later run, once the dead run has been silent past STALE_AFTER, still fails its job and cancels its
    export though it asked another _since (else it stays 'running' for ever, its export never cancelled)."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "killed", silent_for=None)     # killed just now
    dead = jobs.last("bulk-export", SCOPE, status="running")
    responses.reset()
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, json=manifest("2026-11-20T08:00:00Z"))
    add_files()
    rerun = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "1", output=tmp_path / "1.ndjson")
    assert rerun.complete and rerun.resumed is None and jobs.get(dead.id).status == "running"
    assert not any(c.request.method == "DELETE" for c in responses.calls)          # it might be alive
    change(jobs.store, dead.id, updated_at=datetime.now(timezone.utc) - timedelta(days=1))
    responses.reset()
    changed, third = f"{FILES}/changed", f"{BASE}/$export-poll/99"
    responses.get(SCOPE, status=202, headers={"Content-Location": third})
    responses.get(third, json=manifest("2026-11-21T08:00:00Z", base=changed))
    for kind in ("Patient", "Encounter", "Observation"):
        responses.get(f"{changed}/{kind}.ndjson", body=b"")
    responses.delete(STATUS, status=202)
    later = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "2", output=tmp_path / "2.ndjson")
    assert later.complete and later.resumed is None and later.since == "2026-11-20T08:00:00Z"
    after = jobs.get(dead.id)
    assert after.status == "failed" and f"job {later.job_id} cancelled" in after.error
    assert [c.request.method for c in responses.calls if c.request.url == STATUS] == ["DELETE"]
    assert jobs.last("bulk-export", SCOPE, status="running") is None


@responses.activate
def test_every_silent_job_is_taken_over_not_only_the_newest(registry: ModelRegistry, jobs: JobStore,
                                                            client: BulkDataClient, database_url: str,
                                                            tmp_path: Path) -> None:
    """Two runs killed one after the other: the newer one's export is resumed, the older one's cancelled,
    and both jobs are failed."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "k1", silent_for=None)
    older = jobs.last("bulk-export", SCOPE, status="running")
    responses.reset()
    responses.get(SCOPE, status=202, headers={"Content-Location": OTHER_STATUS})
    responses.get(OTHER_STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "k2")                  # the newer: silent too long
    newer = jobs.last("bulk-export", SCOPE, status="running")
    assert newer.id != older.id and jobs.get(older.id).status == "running"
    change(jobs.store, older.id, updated_at=datetime.now(timezone.utc) - timedelta(seconds=STALE_AFTER + 120))
    responses.reset()
    responses.get(OTHER_STATUS, json=manifest())
    responses.delete(STATUS, status=202)
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert run.complete and run.resumed == newer.id and kicks() == []
    assert [c.request.method for c in responses.calls if c.request.url == STATUS] == ["DELETE"]
    assert f"job {run.job_id} resumed" in jobs.get(newer.id).error
    assert f"job {run.job_id} cancelled" in jobs.get(older.id).error


@responses.activate
def test_a_run_that_cannot_record_the_exports_it_takes_over_fails_and_cancels_them(
        registry: ModelRegistry, jobs: JobStore, database_url: str, tmp_path: Path,
        client: BulkDataClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database hiccup (SQLite 'database is locked', a PostgreSQL failover) while the exports taken
    over are written into the new job: the job is failed, not left 'running' with its heartbeat going on
    (no run would ever take it over), and the export taken over is cancelled, not recorded nowhere."""
    monkeypatch.setattr(bulkdata, "HEARTBEAT", 0.05)
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "30"})
    killed_while_polling(database_url, registry, tmp_path / "killed")            # silent > STALE_AFTER
    responses.reset()
    responses.delete(STATUS, status=202)
    real = JobStore.set_result

    def locked(self: JobStore, job_id: str, result: dict[str, Any], status: str | None = None) -> bool:
        if "exports" in result:
            raise OperationalError("UPDATE job ...", {}, Exception("database is locked"))
        return real(self, job_id, result, status)

    monkeypatch.setattr(JobStore, "set_result", locked)
    with pytest.raises(OperationalError):
        export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    beats = [t for t in threading.enumerate() if t.name.startswith("heartbeat bulk-")]
    try:
        assert not beats
        assert jobs.last("bulk-export", SCOPE, status="running") is None
        assert jobs.last("bulk-export", SCOPE, status="failed").error == "the run stopped: OperationalError"
        assert [(c.request.method, c.request.url) for c in responses.calls] == [("DELETE", STATUS)]
    finally:
        for t in beats:          # do not leak into other tests
            jobs.fail(t.name.split()[-1], "test cleanup")


@responses.activate
def test_an_admin_cancelling_a_running_export_job_stops_the_run_and_its_export(registry: ModelRegistry, jobs: JobStore,
                                                                                tmp_path: Path) -> None:
    """DELETE /jobs/{id} of a bulk-export-assess run while it polls: the run stops at its next wait (RunStopped,
    nothing scored or written back), the export it started is cancelled at the server, the job stays cancelled."""
    polls: list[int] = []

    def status(_request: Any) -> tuple[int, dict[str, str], str]:
        polls.append(1)
        if len(polls) == 2:                      # the admin, meanwhile
            assert jobs.cancel(jobs.last("bulk-export", SCOPE, status="running").id)
        return 202, {"Retry-After": "5"}, ""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.add_callback(responses.GET, STATUS, callback=status)
    responses.delete(STATUS, status=202)
    with pytest.raises(bulkdata.RunStopped, match="was cancelled while the run went on"):
        export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None),
                          workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert len(polls) == 2 and [c.request.method for c in responses.calls].count("DELETE") == 1
    assert jobs.last("bulk-export", SCOPE, status="cancelled") is not None
    assert jobs.last("bulk-export", SCOPE) is None and not (tmp_path / "o.ndjson").exists()


@responses.activate
def test_a_status_that_cannot_be_read_once_does_not_stop_a_healthy_run(registry: ModelRegistry, jobs: JobStore,
                                                                        tmp_path: Path, monkeypatch: Any) -> None:
    """A database hiccup on one of the run's checks between polls: the run goes on (the next check asks
    again), nothing is cancelled, the run completes."""
    from sqlalchemy.exc import OperationalError
    real, calls = jobs.status, []

    def flaky(job_id: str) -> str | None:
        calls.append(1)
        if len(calls) == 2:
            raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return real(job_id)
    monkeypatch.setattr(jobs, "status", flaky)
    add_files()
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "5"})
    responses.get(STATUS, json=manifest())
    run = export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None),
                            workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert run.complete and len(calls) > 2 and "DELETE" not in [c.request.method for c in responses.calls]


@responses.activate
def test_a_run_whose_job_was_taken_over_and_then_deleted_leaves_the_other_runs_export_alone(
        registry: ModelRegistry, jobs: JobStore, tmp_path: Path) -> None:
    """Run A stalls; B takes A's job over (failed, naming B) and polls A's export; an admin then deletes the
    failed job. A wakes and stops, and does not cancel the export B polls."""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "5"})
    responses.delete(STATUS, status=202)

    def asleep(_seconds: float) -> None:
        a = jobs.last("bulk-export", SCOPE, status="running")
        assert jobs.take_over(a.id, silent_since=datetime.now(timezone.utc) + timedelta(seconds=1),
                              message="the run stopped while its export was under way; job bulk-B resumed it")
        assert jobs.cancel(a.id)
    with pytest.raises(bulkdata.RunStopped):
        export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=asleep),
                          workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert "DELETE" not in [c.request.method for c in responses.calls]


@responses.activate
def test_an_admin_cancelled_runs_export_cancel_is_retried(registry: ModelRegistry, jobs: JobStore,
                                                          tmp_path: Path) -> None:
    """The DELETE of the export of a run an admin cancelled answers 503 first: retried (the run's checks do not
    cut its own clean-up short)."""
    polls: list[int] = []

    def status(_request: Any) -> tuple[int, dict[str, str], str]:
        polls.append(1)
        if len(polls) == 2:
            assert jobs.cancel(jobs.last("bulk-export", SCOPE, status="running").id)
        return 202, {"Retry-After": "5"}, ""
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.add_callback(responses.GET, STATUS, callback=status)
    responses.delete(STATUS, status=503)
    responses.delete(STATUS, status=202)
    with pytest.raises(bulkdata.RunStopped):
        export_and_assess(settings(), registry, jobs, BulkDataClient(BASE, token=TOKEN, sleep=lambda _: None),
                          workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert [c.response.status_code for c in responses.calls if c.request.method == "DELETE"] == [503, 202]
