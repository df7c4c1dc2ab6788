"""Bulk Data runs when things go wrong: error files (partial success), a reused work folder, a status URL
that fails for a while or says the export failed, downloads cut off, the manifest's deleted resources,
file URLs where the token must not go, and subjects that are not patients."""
from __future__ import annotations

import http.client
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import responses
from click.testing import CliRunner

from fhir_ai import bulkdata
from fhir_ai.bulkdata import FAILING_FOR, MAX_POLL, BulkDataClient, Manifest, changed_patients, export_and_assess
from fhir_ai.cli import main
from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.errors import UpstreamError
from fhir_ai.jobs import JobStore
from fhir_ai.models.registry import ModelRegistry
from test_bulkdata import (BASE, FILES, OUTCOME, STATUS, TOKEN, Clock, add_export, add_files,  # noqa: F401
                           cli_env, client, clock, jobs, manifest, registry)

SCOPE = f"{BASE}/Patient/$export"
PHI = "Jane Roe, MRN 4711"               # what a diagnostics text may hold: never logged, never stored


def no_write_back() -> Any:
    return load_settings({"source_url": BASE, "write_back": False})


def first_run(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path) -> list[dict[str, Any]]:
    """A complete run at 08:00 (the next one asks _since then); its RiskAssessments."""
    add_export(manifest("2026-11-20T08:00:00Z"), polls=0)
    add_files()
    export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "1", output=tmp_path / "1.ndjson")
    responses.reset()
    return [orjson.loads(line) for line in (tmp_path / "1.ndjson").read_bytes().splitlines()]


def outcome(*issues: tuple[str, str]) -> bytes:
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": severity, "code": code, "diagnostics": f"Observation of {PHI} not exported"}
        for severity, code in issues]})


# -- H1: error files make a partial success -----------------------------------------------------------

@responses.activate
def test_an_export_with_errors_is_scored_but_does_not_move_since(registry: ModelRegistry, jobs: JobStore,
                                                                 client: BulkDataClient, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    add_export(manifest("2026-11-20T08:00:00Z", errors=True), polls=0)
    add_files()
    responses.get(f"{FILES}/errors.ndjson", body=b"\n".join([
        outcome(("error", "exception"), ("warning", "informational")),
        b"<html>proxy error</html>",                       # not an OperationOutcome: counted, no crash
        outcome(("information", "informational")), b""]))
    caplog.set_level(logging.INFO, logger="fhir_ai")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert run.patients == 12 and run.stored == 12                 # what was exported is scored and kept
    assert run.export_errors == 2 and not run.complete
    assert jobs.last("bulk-export", SCOPE) is None                 # not completed: the next run starts over
    failed = jobs.last("bulk-export", SCOPE, status="failed")
    assert failed is not None and "2 error(s) (issue codes: exception 1, unreadable 1)" in failed.error
    assert "export reported 2 error(s)" in caplog.text
    assert "Jane" not in caplog.text and "Jane" not in failed.error


@responses.activate
def test_warnings_in_the_error_files_do_not_block(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient,
                                                  tmp_path: Path) -> None:
    add_export(manifest("2026-11-20T08:00:00Z", errors=True), polls=0)
    add_files()
    responses.get(f"{FILES}/errors.ndjson", body=outcome(("warning", "informational"),
                                                         ("information", "informational")) + b"\n")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert run.complete and run.export_errors == 0
    assert jobs.last("bulk-export", SCOPE).result["transactionTime"] == "2026-11-20T08:00:00Z"


@responses.activate
@pytest.mark.parametrize("issue, status, says", [
    (("fatal", "too-costly"), 1, "the export reported 1 error(s): not complete"),
    (("error", "not-found"), 3, "partial: the server could not export 1 resource(s) (issue codes: not-found 1)"),
])
def test_the_cli_exit_status_says_whether_the_export_was_complete(settings_overrides: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   issue: tuple[str, str], status: int,
                                                                   says: str) -> None:
    """1: not complete, the next run asks since the same point; 3: complete, but the server could not
    export some resources (reported by issue code, never by diagnostics)."""
    import fhir_ai.bulkdata as bulkdata
    monkeypatch.setattr(bulkdata, "DEFAULT_POLL", 0.0)
    add_export(manifest(errors=True), polls=0)
    responses.replace(responses.GET, STATUS, json=manifest(errors=True))
    add_files()
    responses.get(f"{FILES}/errors.ndjson", body=outcome(issue) + b"\n")
    result = CliRunner(env=cli_env(settings_overrides, write_back=False)).invoke(main, ["bulk-export-assess", "--output", str(tmp_path / "o.ndjson")])
    assert result.exit_code == status, result.output
    assert "12 patients" in result.output and says in result.output and "Jane" not in result.output


@responses.activate
@pytest.mark.parametrize("severity, code, keeps_since", [
    ("error", "not-found", False), ("error", "invalid", False), ("error", "business-rule", False),
    ("error", "code-invalid", False), ("error", "deleted", False), ("error", "duplicate", False),
    # A whole export failing (the Bulk Data IG's own example: processing, "An internal timeout has
    # occurred"), a type the server will not export, access we lost: asking again may bring them.
    ("error", "processing", True), ("error", "not-supported", True), ("error", "forbidden", True),
    ("error", "suppressed", True),
    ("error", "exception", True), ("error", "transient", True), ("error", "timeout", True),
    ("error", "throttled", True), ("error", "incomplete", True), ("error", "too-costly", True),
    ("error", "expired", True), ("error", "conflict", True), ("error", "made-up-code", True),
    ("fatal", "not-found", True), (None, "not-found", True),      # fatal, or no severity: never per resource
])
def test_which_error_file_issues_keep_since(client: BulkDataClient, tmp_path: Path, severity: str | None,
                                            code: str, keeps_since: bool) -> None:
    responses.get(f"{FILES}/errors.ndjson", body=outcome((severity, code)) + b"\n")   # type: ignore[arg-type]
    got = client.download(Manifest.parse({**manifest(errors=True), "output": []}), tmp_path)
    assert (got.errors, got.skipped) == ((1, 0) if keeps_since else (0, 1))
    assert (got.error_codes if keeps_since else got.skipped_codes) == {code: 1}


@responses.activate
def test_resources_the_server_cannot_export_for_good_do_not_pin_since(registry: ModelRegistry, jobs: JobStore,
                                                                       client: BulkDataClient, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issues that lie with one resource (not-found, invalid, business-rule ...) are reported by code, but
    the run is complete (partial): its transactionTime is the next _since, so one bad resource does not
    hold every later incremental export at the same point."""
    first_run(registry, jobs, client, tmp_path)
    add_export({**manifest("2026-11-20T09:00:00Z", errors=True), "output": []}, polls=0)
    responses.get(f"{FILES}/errors.ndjson", body=b"\n".join([
        outcome(("error", "not-found")), outcome(("error", "invalid"), ("warning", "informational")),
        outcome(("error", "not-found"))]))
    caplog.set_level(logging.INFO, logger="fhir_ai")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2",
                            output=tmp_path / "2.ndjson")
    assert run.complete and run.partial and run.export_errors == 0 and run.export_skipped == 3
    job = jobs.last("bulk-export", SCOPE)
    assert job is not None and job.id == run.job_id
    assert job.result["transactionTime"] == "2026-11-20T09:00:00Z"
    assert job.result["notExported"] == {"not-found": 2, "invalid": 1}
    assert "could not export 3 resource(s) (issue codes: not-found 2, invalid 1)" in caplog.text
    assert "Jane" not in caplog.text and "Jane" not in json.dumps(job.result)
    responses.reset()
    add_export({**manifest("2026-11-20T10:00:00Z"), "output": []}, polls=0)
    export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "3", output=tmp_path / "3.ndjson")
    assert "_since=2026-11-20T09%3A00%3A00Z" in responses.calls[0].request.url


@responses.activate
def test_a_transient_issue_beside_per_resource_ones_keeps_since(registry: ModelRegistry, jobs: JobStore,
                                                                client: BulkDataClient, tmp_path: Path) -> None:
    add_export({**manifest("2026-11-20T08:00:00Z", errors=True), "output": []}, polls=0)
    responses.get(f"{FILES}/errors.ndjson", body=outcome(("error", "not-found"), ("error", "timeout")))
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert not run.complete and not run.partial and (run.export_errors, run.export_skipped) == (1, 1)
    assert jobs.last("bulk-export", SCOPE) is None
    failed = jobs.last("bulk-export", SCOPE, status="failed").error
    assert "1 error(s) (issue codes: timeout 1)" in failed and "could not export 1 resource(s)" in failed


@responses.activate
@pytest.mark.parametrize("code, text", [
    ("processing", "An internal timeout has occurred"),       # the Bulk Data IG's own error file example
    ("not-supported", "Observation export is not supported on this node"),
    ("forbidden", "client not authorised for Observation"),   # a scope we lost
])
def test_an_error_file_saying_a_whole_export_failed_keeps_since(registry: ModelRegistry, jobs: JobStore,
                                                                client: BulkDataClient, tmp_path: Path, code: str,
                                                                text: str) -> None:
    """Asking again may well bring what such a failure left out: the next run asks since the same point."""
    add_export(manifest("2026-11-20T09:00:00Z", errors=True), polls=0)
    add_files()
    responses.get(f"{FILES}/errors.ndjson", body=orjson.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "details": {"text": text}}]}) + b"\n")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert not run.complete and not run.partial and run.issues.error_codes == {code: 1}
    assert jobs.last("bulk-export", SCOPE) is None                 # no transactionTime kept for the next _since


# -- H2: a reused work folder --------------------------------------------------------------------------

@responses.activate
def test_a_reused_workdir_never_scores_an_earlier_runs_files(registry: ModelRegistry, jobs: JobStore,
                                                            client: BulkDataClient, tmp_path: Path) -> None:
    add_export(manifest("2026-11-20T08:00:00Z"), polls=0)
    add_files()
    first = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "w",
                              output=tmp_path / "1.ndjson")
    assert first.patients == 12
    responses.reset()
    empty = {**manifest("2026-11-20T09:00:00Z"), "output": []}
    add_export(empty, polls=0)
    again = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "w",
                              output=tmp_path / "2.ndjson", full=True)
    assert again.patients == 0 and not list((tmp_path / "w" / "export").glob("*.ndjson"))


# -- M1 / L1: polling ---------------------------------------------------------------------------------

@responses.activate
def test_no_answer_while_polling_is_polled_again(client: BulkDataClient, clock: Clock) -> None:
    responses.get(STATUS, status=202, headers={"Retry-After": "7"})
    responses.get(STATUS, body=requests.ConnectionError("reset by peer"))
    responses.get(STATUS, body=requests.ReadTimeout("no answer"))
    responses.get(STATUS, json=manifest())
    assert client.poll(STATUS).transaction_time == "2026-11-20T08:00:00Z"
    assert clock.sleeps == [7.0, 5.0, 10.0]


@responses.activate
def test_a_long_export_outlasts_a_run_of_failures_and_long_retry_afters(clock: Clock) -> None:
    patient = BulkDataClient(BASE, token=TOKEN, sleep=clock.sleep, clock=lambda: clock.now, max_wait=21600)
    responses.get(STATUS, status=202, headers={"Retry-After": "3600"})
    for _ in range(8):
        responses.get(STATUS, status=503, body="<html>proxy</html>")      # no OperationOutcome: retried
    responses.get(STATUS, status=503, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "transient", "diagnostics": "node restarting"}]})
    for _ in range(3):
        responses.get(STATUS, status=429, headers={"Retry-After": "3000"})
    responses.get(STATUS, json=manifest())
    assert patient.poll(STATUS).transaction_time == "2026-11-20T08:00:00Z"
    assert clock.sleeps == [3600.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0, 3000.0, 3000.0, 3000.0]


@responses.activate
def test_retry_after_is_honoured_up_to_the_budget(client: BulkDataClient, clock: Clock) -> None:
    responses.get(STATUS, status=202, headers={"Retry-After": "3600"})      # the client's budget is 600 s
    with pytest.raises(UpstreamError, match="did not finish within 600 s"):
        client.poll(STATUS)
    assert clock.sleeps == [600.0] and len(responses.calls) == 2            # one last look at the end


@responses.activate
def test_a_status_url_failing_for_long_is_given_up(clock: Clock) -> None:
    patient = BulkDataClient(BASE, token=TOKEN, sleep=clock.sleep, clock=lambda: clock.now, max_wait=21600)
    responses.get(STATUS, status=503)
    with pytest.raises(UpstreamError, match="HTTP 503"):
        patient.poll(STATUS)
    assert FAILING_FOR <= sum(clock.sleeps) < FAILING_FOR + MAX_POLL


@responses.activate
@pytest.mark.parametrize("status", [400, 500, 503])
def test_an_export_the_server_says_failed_is_not_polled_again(client: BulkDataClient, status: int) -> None:
    responses.get(STATUS, status=status, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "too-costly"}, {"severity": "error", "code": "processing"}]})
    with pytest.raises(UpstreamError, match="issue codes: too-costly, processing") as failed:
        client.poll(STATUS)
    assert failed.value.temporary is False and len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize("delete_status", [202, 500])
def test_an_export_given_up_for_any_error_is_cancelled(registry: ModelRegistry, jobs: JobStore,
                                                       client: BulkDataClient, tmp_path: Path,
                                                       delete_status: int) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=500, json=OUTCOME)
    responses.delete(STATUS, status=delete_status)
    with pytest.raises(UpstreamError, match="disk full"):     # a failed DELETE does not hide why
        export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert any(c.request.method == "DELETE" for c in responses.calls)
    assert "disk full" in jobs.last("bulk-export", SCOPE, status="failed").error


# -- M2: every failure leaves the job failed; downloads cut off ---------------------------------------

@responses.activate
def test_an_unexpected_error_leaves_the_job_failed(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fhir_ai.bulk

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError(f"odd value for {PHI}")
    monkeypatch.setattr(fhir_ai.bulk, "bulk_assess", broken)
    add_export(manifest(), polls=0)
    add_files()
    with pytest.raises(ValueError):
        export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert jobs.last("bulk-export", SCOPE, status="running") is None
    failed = jobs.last("bulk-export", SCOPE, status="failed")
    assert failed.error == "the run stopped: ValueError" and failed.error_status == 500


@responses.activate
def test_a_malformed_changed_file_fails_the_run_clearly(registry: ModelRegistry, jobs: JobStore,
                                                        client: BulkDataClient, tmp_path: Path) -> None:
    first_run(registry, jobs, client, tmp_path)
    add_export(manifest("2026-11-20T09:00:00Z"), polls=0)
    responses.get(f"{FILES}/Patient.ndjson", body=b"")
    responses.get(f"{FILES}/Encounter.ndjson", body=b"[1, 2]\n")
    responses.get(f"{FILES}/Observation.ndjson", body=b'{"resourceType": "Obs\n')
    with pytest.raises(UpstreamError, match=r"Encounter.001.ndjson line 1 is not a JSON object"):
        export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2", output=tmp_path / "2.ndjson")
    assert jobs.last("bulk-export", SCOPE, status="running") is None
    assert jobs.last("bulk-export", SCOPE, status="failed").error_status == 502


class CutOff(io.BufferedReader):
    """A body whose connection breaks after the first bytes."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))      # type: ignore[arg-type]
        self.sent = False

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        if self.sent:
            raise http.client.IncompleteRead(b"")
        self.sent = True
        return super().read(20)


@responses.activate
def test_a_download_cut_off_is_fetched_again_and_never_left_half(client: BulkDataClient, clock: Clock,
                                                                 tmp_path: Path) -> None:
    whole = (DEMO_HOSPITAL / "Patient.ndjson").read_bytes()
    responses.get(f"{FILES}/Patient.ndjson", body=CutOff(whole))
    responses.get(f"{FILES}/Patient.ndjson", body=whole)
    body = manifest()
    body["output"] = body["output"][:1]
    got = client.download(Manifest.parse(body), tmp_path)
    assert got.files["Patient"][0].read_bytes() == whole and len(responses.calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Patient.000.ndjson"]
    responses.reset()
    for _ in range(client.retries + 1):
        responses.get(f"{FILES}/Patient.ndjson", body=CutOff(whole))          # cut off every time
    with pytest.raises(UpstreamError, match="cut off"):
        client.download(Manifest.parse(body), tmp_path / "again")
    assert len(responses.calls) == client.retries + 1 and not list((tmp_path / "again").iterdir())


# -- M3: deleted resources -----------------------------------------------------------------------------

def add_deletions(*references: str) -> str:
    """An incremental export at 09:00 with nothing changed and these resources deleted (one Bundle)."""
    url = f"{FILES}/deleted.ndjson"
    add_export({**manifest("2026-11-20T09:00:00Z"), "output": [], "deleted": [{"type": "Bundle", "url": url}]},
               polls=0)
    responses.get(url, body=orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": reference}} for reference in references]}) + b"\n")
    return url


def second_run_rescoring(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path,
                         patient: str) -> tuple[Any, list[str]]:
    """The second run, its changed-patients export serving ``patient``'s whole record: the run and the
    patients its POST kick-off named."""
    full = f"{FILES}/full"
    responses.post(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, json=manifest("2026-11-20T09:00:05Z", base=full))
    add_files(full, only=(patient,))
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2",
                            output=tmp_path / "2.ndjson")
    post = next(c.request for c in responses.calls if c.request.method == "POST")
    return run, [p["valueReference"]["reference"] for p in json.loads(post.body)["parameter"] if p["name"] == "patient"]


@responses.activate
def test_a_deleted_observation_has_its_patient_rescored(registry: ModelRegistry, jobs: JobStore,
                                                        client: BulkDataClient, tmp_path: Path) -> None:
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    assert used.startswith("Observation/")
    # Second run: nothing changed but two deletions, one an input of demo-002's assessment, so
    # demo-002's whole record is exported again (POST kick-off) and scored.
    deletions = add_deletions("Observation/never-used", f"{BASE}/{used}")
    responses.get(f"{BASE}/Patient/demo-002", json={"resourceType": "Patient", "id": "demo-002"})   # still there
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-002")
    assert asked == ["Patient/demo-002"]
    assert run.patients == 1 and run.complete
    assert any(c.request.url == deletions and c.request.headers["Authorization"] == f"Bearer {TOKEN}"
               for c in responses.calls)


@responses.activate
def test_a_deleted_resource_no_assessment_used_changes_nothing(registry: ModelRegistry, jobs: JobStore,
                                                               client: BulkDataClient, tmp_path: Path) -> None:
    first_run(registry, jobs, client, tmp_path)
    deletions = add_deletions("Observation/never-used", "Patient/demo-002")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2",
                            output=tmp_path / "2.ndjson")
    assert run.patients == 0 and not any(c.request.method == "POST" for c in responses.calls)
    assert jobs.last("bulk-export", SCOPE).result["transactionTime"] == "2026-11-20T09:00:00Z"


@responses.activate
@pytest.mark.parametrize("status", [404, 410])
def test_a_patient_whose_deleted_inputs_were_purged_with_them_is_not_asked_for(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path, status: int) -> None:
    """A patient known only from deleted inputs, and no longer at the server (a record purged): a kick-off
    naming them fails (HTTP 404 at many servers) on every run, so they are left out and counted; the run
    completes, _since moves on, the other patients are rescored."""
    scored = first_run(registry, jobs, client, tmp_path)
    inputs = {r["subject"]["reference"].split("/")[1]: r["basis"][0]["reference"] for r in scored
              if r["subject"]["reference"] in ("Patient/demo-002", "Patient/demo-003")}
    add_deletions(*(f"{BASE}/{used}" for used in inputs.values()), "Patient/demo-002")
    responses.get(f"{BASE}/Patient/demo-002", status=status, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "deleted" if status == 410 else "not-found"}]})
    responses.get(f"{BASE}/Patient/demo-003", json={"resourceType": "Patient", "id": "demo-003"})
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-003")
    assert asked == ["Patient/demo-003"]
    assert run.complete and run.patients == 1 and run.patients_gone == 1
    last = jobs.last("bulk-export", SCOPE)
    assert last.result["transactionTime"] == "2026-11-20T09:00:00Z" and last.result["patientsGone"] == 1
    # Only demo-002, the export listing the patient itself as deleted: gone without a read, no kick-off at all.
    responses.reset()
    add_deletions(f"{BASE}/{inputs['demo-002']}", f"{BASE}/Patient/demo-002")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "3",
                            output=tmp_path / "3.ndjson")
    assert run.complete and run.patients == 0 and run.patients_gone == 1
    assert not any(c.request.method == "POST" or "/Patient/demo-002" in c.request.url for c in responses.calls)


@responses.activate
@pytest.mark.parametrize("hidden, unsure", [
    ("forbidden", False), ("security", False), ("suppressed", False), ("not-supported", False),  # not for us
    ("not-found", True),          # no patient could be read here: not found may mean not for this client
])
def test_a_404_that_may_mean_not_for_this_client_leaves_the_patient_asked_for(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path, hidden: str,
        unsure: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A server may hide what a client may not see behind a 404. Such a 404 (an access issue code), or any 404
    when this client cannot read a single patient here, does not make a patient gone: asked for as before."""
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    add_deletions(f"{BASE}/{used}")
    responses.get(f"{BASE}/Patient/demo-002", status=404, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": hidden}]})
    caplog.set_level(logging.WARNING, logger="fhir_ai")
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-002")
    assert asked == ["Patient/demo-002"] and run.complete and run.patients_gone == 0
    assert ("no patient could be read here" in caplog.text) is unsure


def incremental(used: str, changed: list[dict[str, Any]], *deleted: str) -> None:
    """The second run's export: ``changed`` resources (Patients, Observations), and deleted: ``used`` and
    ``deleted`` (references)."""
    url, files = f"{FILES}/deleted.ndjson", f"{FILES}/inc"
    kinds = sorted({r["resourceType"] for r in changed})
    add_export({**manifest("2026-11-20T09:00:00Z"), "deleted": [{"type": "Bundle", "url": url}],
                "output": [{"type": kind, "url": f"{files}/{kind}.ndjson"} for kind in kinds]}, polls=0)
    responses.get(url, body=orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": f"{BASE}/{ref}"}} for ref in (used, *deleted)]}) + b"\n")
    for kind in kinds:
        responses.get(f"{files}/{kind}.ndjson", body=b"\n".join(orjson.dumps(r) for r in changed
                                                                 if r["resourceType"] == kind) + b"\n")


@responses.activate
def test_a_patient_the_export_deletes_is_not_asked_for_though_a_changed_resource_names_them(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path) -> None:
    """Patient/demo-002 deleted, and an Observation naming demo-002 changed in the same window (a server without
    referential integrity): demo-002 is not asked for (the kick-off would fail every run). Unless the export
    holds the Patient itself again (made anew): then it is."""
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    orphan = {"resourceType": "Observation", "id": "late", "status": "final", "subject": {"reference": "Patient/demo-002"},
              "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}
    incremental(used, [orphan], "Patient/demo-002")
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2",
                            output=tmp_path / "2.ndjson")
    assert run.complete and run.patients == 0 and run.patients_gone == 1
    assert not any(c.request.method == "POST" for c in responses.calls)
    responses.reset()
    incremental(used, [orphan, {"resourceType": "Patient", "id": "demo-002"}], "Patient/demo-002")
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-002")
    assert asked == ["Patient/demo-002"] and run.patients_gone == 0


@responses.activate
@pytest.mark.parametrize("controls, gone", [
    ([(403, None), (200, "Patient")], True),          # a restricted record first, then one that can be read
    ([(200, "Bundle")], False),                        # a 200 that is not that Patient proves nothing
    ([(200, "OperationOutcome")], False),
])
def test_control_reads_must_read_that_patient(registry: ModelRegistry, jobs: JobStore, client: BulkDataClient,
                                              tmp_path: Path, controls: list[tuple[int, str | None]],
                                              gone: bool) -> None:
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    names = [f"c{n}" for n in range(len(controls))]
    incremental(used, [{"resourceType": "Patient", "id": name} for name in [".", *names]])
    responses.get(f"{BASE}/Patient/demo-002", status=404, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found"}]})
    for name, (status, kind) in zip(names, controls):
        body = {"resourceType": kind, "id": name} if kind else {"resourceType": "OperationOutcome", "issue": []}
        responses.get(f"{BASE}/Patient/{name}", status=status, json=body)
    full = f"{FILES}/full"
    responses.post(SCOPE, status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, json=manifest("2026-11-20T09:00:05Z", base=full))
    add_files(full, only=("demo-002",))
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "2",
                            output=tmp_path / "2.ndjson")
    post = next(c.request for c in responses.calls if c.request.method == "POST")
    asked = [p["valueReference"]["reference"] for p in json.loads(post.body)["parameter"] if p["name"] == "patient"]
    assert ("Patient/demo-002" not in asked) is gone and run.patients_gone == int(gone)
    assert not any(c.request.url.rstrip("/").endswith("/Patient") or "/Patient/." in c.request.url
                   for c in responses.calls)


@responses.activate
def test_a_404_is_gone_once_a_patient_the_export_changed_can_be_read(registry: ModelRegistry, jobs: JobStore,
                                                                     client: BulkDataClient, tmp_path: Path) -> None:
    """demo-002 answers 404 not-found and no other patient whose inputs were deleted was read: a patient the
    export changed (demo-003) is read to tell, answers 200, so demo-002 is gone; demo-003 is rescored."""
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    deleted, changed = f"{FILES}/deleted.ndjson", f"{FILES}/inc"
    add_export({**manifest("2026-11-20T09:00:00Z"), "output": [{"type": "Patient", "url": f"{changed}/Patient.ndjson"}],
                "deleted": [{"type": "Bundle", "url": deleted}]}, polls=0)
    responses.get(deleted, body=orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": f"{BASE}/{used}"}}]}) + b"\n")
    responses.get(f"{changed}/Patient.ndjson", body=orjson.dumps({"resourceType": "Patient", "id": "demo-003"}) + b"\n")
    responses.get(f"{BASE}/Patient/demo-002", status=404, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found"}]})
    responses.get(f"{BASE}/Patient/demo-003", json={"resourceType": "Patient", "id": "demo-003"})
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-003")
    assert asked == ["Patient/demo-003"] and run.complete and run.patients_gone == 1
    assert [c.request.url for c in responses.calls if "/Patient/demo-" in c.request.url] == [
        f"{BASE}/Patient/demo-002", f"{BASE}/Patient/demo-003"]


@responses.activate
@pytest.mark.parametrize("answer", [
    {"status": 500}, {"status": 403, "json": {"resourceType": "OperationOutcome", "issue": []}},
    {"status": 404, "body": "Cannot GET /fhir/Patient/demo-002"},            # a front end's, not the server's
    {"status": 302, "headers": {"Location": "https://login.example.org/"}}, {"status": 401}])
def test_a_patient_read_that_tells_nothing_leaves_the_patient_asked_for(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path, answer: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """Only a 410, or a 404 that is a FHIR OperationOutcome, says a patient is gone. A 5xx after the retries, a
    403 (a client that may not read patients), a 404 that is no FHIR, a redirect, a 401: the patient is asked for
    as before the check, the run goes on (the read's status is logged, not the patient)."""
    scored = first_run(registry, jobs, client, tmp_path)
    used = next(r for r in scored if r["subject"]["reference"] == "Patient/demo-002")["basis"][0]["reference"]
    add_deletions(f"{BASE}/{used}")
    for _ in range(client.retries + 1):
        responses.get(f"{BASE}/Patient/demo-002", **answer)
    caplog.set_level(logging.WARNING, logger="fhir_ai")
    run, asked = second_run_rescoring(registry, jobs, client, tmp_path, "demo-002")
    assert asked == ["Patient/demo-002"] and run.complete and run.patients == 1 and run.patients_gone == 0
    said = [r.getMessage() for r in caplog.records if "asked for all the same" in r.getMessage()]
    assert len(said) == 1 and "demo-002" not in said[0]


# -- M4: where files may come from ---------------------------------------------------------------------

@responses.activate
@pytest.mark.parametrize("url, host", [
    ("http://ehr.example.org/files/Patient.ndjson?sig=s3cr3t", "ehr.example.org"),   # our host, but not https
    ("http://169.254.169.254/latest/meta-data/x.ndjson?sig=s3cr3t", "169.254.169.254"),
    ("file:///etc/passwd", "no host"),
    ("ftp://files.example.net/Patient.ndjson", "files.example.net"),
])
def test_file_urls_off_our_origin_must_be_https(client: BulkDataClient, tmp_path: Path, url: str, host: str) -> None:
    body = {**manifest(requires_token=True), "output": [{"type": "Patient", "url": url}]}
    with pytest.raises(UpstreamError, match=f"on {host} ") as refused:
        client.download(Manifest.parse(body), tmp_path)
    assert "s3cr3t" not in refused.value.message and len(responses.calls) == 0


@responses.activate
def test_files_on_our_own_plain_http_server_are_fetched(clock: Clock, tmp_path: Path) -> None:
    local = BulkDataClient("http://fhir.internal:8080/fhir", token=TOKEN, sleep=clock.sleep)
    responses.get("http://fhir.internal:8080/files/Patient.ndjson", body=b"{}\n")
    body = {**manifest(requires_token=None), "output": [{"type": "Patient",
                                                         "url": "http://fhir.internal:8080/files/Patient.ndjson"}]}
    local.download(Manifest.parse(body), tmp_path)
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


# -- redirected file requests --------------------------------------------------------------------------

BUCKET = "https://bucket.example.net/exports"
SIGNED = "X-Amz-Signature=s3cr3t"


def one_file(url: str, requires_token: bool | None = True) -> Manifest:
    return Manifest.parse({**manifest(requires_token=requires_token), "output": [{"type": "Patient", "url": url}]})


@responses.activate
@pytest.mark.parametrize("status", [302, 303, 307])
def test_a_file_redirected_to_object_storage_is_fetched_without_our_token(client: BulkDataClient, tmp_path: Path,
                                                                          status: int) -> None:
    whole = (DEMO_HOSPITAL / "Patient.ndjson").read_bytes()
    responses.get(f"{FILES}/Patient.ndjson", status=status, headers={"Location": f"{BUCKET}/p.ndjson?{SIGNED}"})
    responses.get(f"{BUCKET}/p.ndjson?{SIGNED}", body=whole)
    got = client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert got.files["Patient"][0].read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Patient.000.ndjson"]     # no .part left
    # What went on the wire: the token to the FHIR server's origin the manifest named, not to the bucket.
    sent = [(c.request.url.split("?")[0], c.request.headers.get("Authorization")) for c in responses.calls]
    assert sent == [(f"{FILES}/Patient.ndjson", f"Bearer {TOKEN}"), (f"{BUCKET}/p.ndjson", None)]


@responses.activate
def test_a_redirect_keeps_the_token_on_the_origin_the_manifest_named_only(client: BulkDataClient,
                                                                          tmp_path: Path) -> None:
    """A relative Location on our server keeps the token; a hop from a foreign file server the manifest
    said needs the token (requiresAccessToken) to yet another host does not carry it there."""
    responses.get(f"{FILES}/Patient.ndjson", status=307, headers={"Location": "/files/v2/Patient.ndjson"})
    responses.get(f"{FILES}/v2/Patient.ndjson", body=b"{}\n")
    client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path / "ours")
    assert [c.request.headers.get("Authorization") for c in responses.calls] == [f"Bearer {TOKEN}"] * 2
    responses.reset()
    responses.get("https://files.example.com/Patient.ndjson", status=302,
                  headers={"Location": f"{BUCKET}/p.ndjson?{SIGNED}"})
    responses.get(f"{BUCKET}/p.ndjson?{SIGNED}", status=302,
                  headers={"Location": "https://files.example.com/again.ndjson"})
    responses.get("https://files.example.com/again.ndjson", body=b"{}\n")
    client.download(one_file("https://files.example.com/Patient.ndjson"), tmp_path / "theirs")
    assert [c.request.headers.get("Authorization") for c in responses.calls] == [f"Bearer {TOKEN}", None,
                                                                                f"Bearer {TOKEN}"]


@responses.activate
@pytest.mark.parametrize("target, host", [
    (f"http://bucket.example.net/p.ndjson?{SIGNED}", "bucket.example.net"),       # not https
    ("http://ehr.example.org/files/p.ndjson", "ehr.example.org"),                 # our host, downgraded
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ("file:///etc/passwd", "no host"),
])
def test_a_redirect_off_our_origin_must_be_https_too(client: BulkDataClient, tmp_path: Path, target: str,
                                                     host: str) -> None:
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": target})
    with pytest.raises(UpstreamError, match=f"redirect of an export file leads to {host} ") as refused:
        client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert "s3cr3t" not in refused.value.message and refused.value.temporary is False
    assert len(responses.calls) == 1 and not list(tmp_path.iterdir())          # the target never asked


# urlsplit reads 'https://evil.example\\@ehr.example.org/...' as host ehr.example.org; requests (urllib3)
# connects to evil.example. User information in a URL the server hands us is refused as well.
CONFUSING = ["https://evil.example\\@ehr.example.org/files/p.ndjson", "https://evil.example\\@ehr.example.org:443/x",
             "https://evil.example@ehr.example.org/files/p.ndjson", "https://u:p@bucket.example.net/p.ndjson"]


@responses.activate
@pytest.mark.parametrize("target", CONFUSING)
def test_a_redirect_to_a_url_whose_host_parsers_read_differently_is_refused(client: BulkDataClient,
                                                                             tmp_path: Path, target: str) -> None:
    """Any hop (the object storage the token is kept from, too) may send such a Location."""
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": f"{BUCKET}/p.ndjson?{SIGNED}"})
    responses.get(f"{BUCKET}/p.ndjson?{SIGNED}", status=302, headers={"Location": target})
    responses.get(re.compile(r"https://(evil\.example|bucket\.example\.net|ehr\.example\.org)/.*"), body=b"{}\n")
    with pytest.raises(UpstreamError, match="user information or a backslash") as refused:
        client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert refused.value.temporary is False and "s3cr3t" not in refused.value.message
    assert [c.request.url.split("?")[0] for c in responses.calls] == [f"{FILES}/Patient.ndjson", f"{BUCKET}/p.ndjson"]


@responses.activate
@pytest.mark.parametrize("url", CONFUSING[:3])
def test_a_manifest_file_url_whose_host_parsers_read_differently_is_never_asked(client: BulkDataClient,
                                                                               tmp_path: Path, url: str) -> None:
    responses.get(re.compile(r"https://evil\.example/.*"), body=b"{}\n")
    with pytest.raises(UpstreamError, match="user information or a backslash"):
        client.download(one_file(url), tmp_path)
    assert len(responses.calls) == 0                 # the token went nowhere


@responses.activate
def test_a_status_url_whose_host_parsers_read_differently_is_refused(client: BulkDataClient) -> None:
    responses.get(SCOPE, status=202, headers={"Content-Location": "https://evil.example\\@ehr.example.org/fhir/s/1"})
    responses.get(re.compile(r"https://evil\.example/.*"), status=202)
    with pytest.raises(UpstreamError, match="user information or a backslash"):
        client.kick_off()
    assert [c.request.url.split("?")[0] for c in responses.calls] == [SCOPE]


@responses.activate
@pytest.mark.parametrize("location", ["https://bucket.example.net:99999/p.ndjson", "https://[bucket/p.ndjson",
                                      "https://[::1/p.ndjson"])
def test_a_redirect_or_status_url_that_is_no_url_is_an_upstream_error(client: BulkDataClient, tmp_path: Path,
                                                                       location: str) -> None:
    """Not a ValueError's traceback (the CLI) nor a job failed with 'ValueError'."""
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": location})
    with pytest.raises(UpstreamError, match="a URL that cannot be read") as refused:
        client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert refused.value.temporary is False and len(responses.calls) == 1
    responses.get(SCOPE, status=202, headers={"Content-Location": location})
    with pytest.raises(UpstreamError, match="a URL that cannot be read") as refused:
        client.kick_off()
    assert refused.value.temporary is False


@responses.activate
def test_redirects_are_followed_within_a_bound(client: BulkDataClient, tmp_path: Path) -> None:
    from fhir_ai.bulkdata import MAX_REDIRECTS
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": f"{FILES}/Patient.ndjson"})
    with pytest.raises(UpstreamError, match=f"more than {MAX_REDIRECTS} redirects"):
        client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert len(responses.calls) == MAX_REDIRECTS + 1 and not list(tmp_path.iterdir())
    responses.reset()
    responses.get(f"{FILES}/Patient.ndjson", status=302)                       # no Location
    with pytest.raises(UpstreamError, match="HTTP 302 without Location"):
        client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)


@responses.activate
def test_a_redirected_download_cut_off_starts_again_at_the_manifests_url(client: BulkDataClient, clock: Clock,
                                                                         tmp_path: Path) -> None:
    """The second attempt asks the manifest's URL again (a pre-signed URL may have expired meanwhile)."""
    whole = (DEMO_HOSPITAL / "Patient.ndjson").read_bytes()
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": f"{BUCKET}/1?{SIGNED}"})
    responses.get(f"{BUCKET}/1?{SIGNED}", body=CutOff(whole))
    responses.get(f"{FILES}/Patient.ndjson", status=302, headers={"Location": f"{BUCKET}/2?{SIGNED}"})
    responses.get(f"{BUCKET}/2?{SIGNED}", body=whole)
    got = client.download(one_file(f"{FILES}/Patient.ndjson"), tmp_path)
    assert got.files["Patient"][0].read_bytes() == whole
    assert [c.request.url.split("?")[0] for c in responses.calls] == [
        f"{FILES}/Patient.ndjson", f"{BUCKET}/1", f"{FILES}/Patient.ndjson", f"{BUCKET}/2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Patient.000.ndjson"]


# -- M5: which subjects are patients -------------------------------------------------------------------

def test_only_patient_subjects_count_as_changed_patients(tmp_path: Path) -> None:
    path = tmp_path / "Observation.000.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps({"resourceType": "Observation", "id": str(n), "subject": {"reference": r}})
                                for n, r in enumerate([
                                    "Group/ward-7", "Device/monitor-9", "Location/bed-3",
                                    "Patient/p1/_history/3", f"{BASE}/Patient/p2", "https://other.example/fhir/Patient/p3",
                                    "#contained", "Patient/p4",
                                    # our server written other ways: host case, default port, behind a TLS proxy
                                    "https://EHR.example.org/fhir/Patient/p5", "https://ehr.example.org:443/fhir/Patient/p6",
                                    "http://ehr.example.org/fhir/Patient/p7", "https://ehr.example.org:8443/fhir/Patient/p8",
                                    "https://ehr.example.org/other/Patient/p9", "https://ehr.example.org:x/fhir/Patient/p10",
                                    ])) + b"\n")
    assert changed_patients({"Observation": [path]}, BASE) == ["p1", "p2", "p4", "p5", "p6", "p7"]


@responses.activate
def test_an_export_of_nothing_but_errors_is_a_partial_success(registry: ModelRegistry, jobs: JobStore,
                                                              client: BulkDataClient, tmp_path: Path) -> None:
    add_export({**manifest("2026-11-20T08:00:00Z", errors=True), "output": []}, polls=0)
    responses.get(f"{FILES}/errors.ndjson", body=outcome(("error", "exception")))
    run = export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path, output=tmp_path / "o.ndjson")
    assert run.patients == 0 and run.export_errors == 1 and not run.complete
    failed = jobs.last("bulk-export", SCOPE, status="failed")
    assert failed is not None and "1 error(s)" in failed.error           # not "holds no NDJSON files"


@responses.activate
def test_a_long_run_of_429s_then_failures_never_overflows_the_back_off(clock: Clock,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    slow = BulkDataClient(BASE, token=TOKEN, sleep=clock.sleep, clock=lambda: clock.now, max_wait=10 ** 7)
    for _ in range(1100):
        responses.get(STATUS, status=429, headers={"Retry-After": "1"})
    responses.get(STATUS, status=503, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "transient", "diagnostics": "Kim Minji's export is queued"}]})
    responses.get(STATUS, json=manifest())
    caplog.set_level(logging.WARNING, logger="fhir_ai")
    assert slow.poll(STATUS).transaction_time == "2026-11-20T08:00:00Z"
    assert clock.sleeps[-1] == 300.0                                      # the back-off's cap
    assert "Kim Minji" not in caplog.text                                 # the status is logged, not the text


@responses.activate
def test_a_run_whose_heartbeat_cannot_start_fails_its_job(registry: ModelRegistry, jobs: JobStore,
                                                          client: BulkDataClient, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had (RuntimeError: can't start new thread): the job is failed, not left running."""
    def no_thread(self: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(bulkdata._Heartbeat, "start", no_thread)
    with pytest.raises(RuntimeError):
        export_and_assess(no_write_back(), registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "o.ndjson")
    assert jobs.last("bulk-export", SCOPE, status="running") is None
    assert jobs.last("bulk-export", SCOPE, status="failed").error == "the run stopped: RuntimeError"
    assert len(responses.calls) == 0


@responses.activate
@pytest.mark.parametrize(("base", "wire"), [
    ("https://bücher.example/fhir", "https://xn--bcher-kva.example/fhir"),
    ("https://BÜCHER.Example/fhir", "https://xn--bcher-kva.example/fhir"),
    ("https://[fe80::1%25eth0]/fhir", "https://[fe80::1%25eth0]/fhir")])
def test_a_server_whose_host_urllib3_normalises_is_reached(base: str, wire: str) -> None:
    """An internationalised host name (IDNA) or an IPv6 zone (RFC 6874 '%25') reads the same to both
    parsers once normalised as urllib3 normalises it: the server is asked, with the token."""
    responses.get(f"{wire}/Patient/$export", status=202, headers={"Content-Location": f"{wire}/poll/1"})
    client = BulkDataClient(base, token="t", sleep=lambda _: None)
    assert client.kick_off() == f"{wire}/poll/1"
    assert responses.calls[0].request.headers["Authorization"] == "Bearer t"
    assert client.owns(f"{base}/poll/2") and client.owns(f"{wire}/poll/2")


def test_a_url_whose_host_the_two_parsers_read_differently_is_refused_as_such(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every such URL has user information or a backslash: the message says what is wrong."""
    real = bulkdata.parse_url
    monkeypatch.setattr(bulkdata, "parse_url", lambda url: real(url.replace("ehr.example.org", "evil.example")))
    with pytest.raises(UpstreamError, match="reads differently to urlsplit and to urllib3") as refused:
        BulkDataClient(BASE, token=TOKEN).cancel(STATUS)
    assert "user information" not in refused.value.message and refused.value.temporary is False
