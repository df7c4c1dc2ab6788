"""Bulk Data runs that stop while the hospital's server prepares the export (the process killed, the host
restarted): the next run polls the export that run started instead of kicking off a second one, unless
that export is gone (404/410) or asked for something else."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from fhir_ai.bulkdata import BulkDataClient, export_and_assess
from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.jobs import JobStore
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.store import Store
from test_bulkdata import (BASE, FILES, STATUS, TOKEN, Clock, add_files, client, clock, jobs,  # noqa: F401
                           manifest, registry)

SCOPE = f"{BASE}/Patient/$export"
OTHER_STATUS = f"{BASE}/$export-poll/43"


def settings() -> Any:
    return load_settings({"source_url": BASE, "write_back": False})


def killed_while_polling(database_url: str, registry: ModelRegistry, workdir: Path, *, full: bool = False) -> None:
    """A run in another process that dies - no exception handler, no finally - at its first wait for the
    export (as under SIGKILL or a host restart): what it left in the job table is all there is."""
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
    """A run that stopped during an incremental export does not hand that export to a --full run (nor
    is it cancelled: it might belong to a run still going)."""
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
    add_files()
    run = export_and_assess(settings(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson",
                            full=True)
    assert run.resumed is None and run.since is None and len(kicks()) == 1
    assert "_since" not in parse_qs(urlsplit(kicks()[0].url).query)
    assert not any(c.request.url.startswith(STATUS) for c in responses.calls)
    assert jobs.get(stopped.id).status == "running"


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
