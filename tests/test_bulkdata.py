"""Bulk Data client against a transport-mocked hospital: kick-off 202, polling 202 with X-Progress and
Retry-After, 429, the manifest, downloads (and where the token goes), errors, DELETE, _since from the last
run, incremental runs re-exporting changed patients in full, and write-back in bounded transaction Bundles."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import requests
import responses
from sqlalchemy import func, select
from click.testing import CliRunner

from fhir_ai.bulkdata import BulkDataClient, Manifest, export_and_assess
from fhir_ai.cli import main
from fhir_ai.config import DEMO_HOSPITAL, load_settings
from fhir_ai.errors import UpstreamError, UpstreamTimeout
from fhir_ai.jobs import JobStore
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.store import Store
from fhir_ai.store.trail_tables import AuditEventRow, ProvenanceRow
from fhir_ai.store.verify import verify

BASE = "https://ehr.example.org/fhir"
STATUS = "https://ehr.example.org/fhir/$export-poll/42"
FILES = "https://ehr.example.org/files"
TOKEN = "hospital-token"
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                          "diagnostics": "export failed: disk full"}]}


class Clock:
    """Sleeps recorded instead of slept; the monotonic clock moves with them."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def manifest(transaction_time: str = "2026-11-20T08:00:00Z", requires_token: bool | None = True,
             base: str = FILES, errors: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"transactionTime": transaction_time, "request": f"{BASE}/Patient/$export",
                            "output": [{"type": t, "url": f"{base}/{t}.ndjson"}
                                       for t in ("Patient", "Encounter", "Observation")],
                            "error": [{"type": "OperationOutcome", "url": f"{base}/errors.ndjson"}] if errors else []}
    if requires_token is not None:
        body["requiresAccessToken"] = requires_token
    return body


def add_files(base: str = FILES, only: tuple[str, ...] | None = None) -> None:
    for kind in ("Patient", "Encounter", "Observation"):
        lines = (DEMO_HOSPITAL / f"{kind}.ndjson").read_bytes()
        if only:
            keep = [l for l in lines.splitlines() if any(p.encode() in l for p in only)]
            lines = b"\n".join(keep) + b"\n"
        responses.get(f"{base}/{kind}.ndjson", body=lines, content_type="application/fhir+ndjson")


def add_export(manifest_body: dict[str, Any], *, polls: int = 2, kick_off: str = f"{BASE}/Patient/$export",
               method: str = "GET") -> None:
    responses.add(method, kick_off, status=202, headers={"Content-Location": STATUS})
    for n in range(polls):
        responses.get(STATUS, status=202, headers={"X-Progress": f"{(n + 1) * 30}% done", "Retry-After": "7"})
    responses.get(STATUS, status=429, headers={"Retry-After": "11"})          # polled too fast
    responses.get(STATUS, json=manifest_body)


def transaction_sink(received: list[dict[str, Any]], fail_entry: str | None = None) -> None:
    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        bundle = json.loads(request.body)
        received.append(bundle)
        entries = [{"response": {"status": "400" if fail_entry and e["resource"]["id"] == fail_entry else "200 OK"}}
                   for e in bundle["entry"]]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
    responses.add_callback(responses.POST, BASE, callback=answer, content_type="application/fhir+json")


def cli_env(settings_overrides: dict[str, Any], *, write_back: bool) -> dict[str, str]:
    env = {f"FHIR_AI_{k.upper()}": str(v) for k, v in settings_overrides.items()}
    env.update(FHIR_AI_SOURCE_URL=BASE, FHIR_AI_WRITE_BACK=str(write_back).lower(), FHIR_AI_SOURCE_TOKEN=TOKEN)
    return env


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(clock: Clock) -> Iterator[BulkDataClient]:
    c = BulkDataClient(BASE, token=TOKEN, sleep=clock.sleep, clock=lambda: clock.now, max_wait=600)
    yield c
    c.close()


@pytest.fixture
def registry() -> ModelRegistry:
    settings = load_settings()
    return ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))


@pytest.fixture
def jobs(database_url: str) -> Iterator[JobStore]:
    store = Store(database_url)
    yield JobStore(store)
    store.close()


# -- the protocol ----------------------------------------------------------------------------------

@responses.activate
def test_kick_off_poll_and_download_honour_the_protocol(client: BulkDataClient, clock: Clock, tmp_path: Path) -> None:
    add_export(manifest())
    add_files()
    status_url = client.kick_off(since="2026-11-19T00:00:00Z")
    assert status_url == STATUS
    kick = responses.calls[0].request
    assert kick.headers["Prefer"] == "respond-async" and kick.headers["Authorization"] == f"Bearer {TOKEN}"
    query = parse_qs(urlsplit(kick.url).query)
    assert query == {"_type": ["Patient,Encounter,Observation"], "_since": ["2026-11-19T00:00:00Z"],
                     "_outputFormat": ["application/fhir+ndjson"]}
    result = client.poll(status_url)
    assert clock.sleeps == [7.0, 7.0, 11.0]          # Retry-After of each 202, then of the 429
    assert result.transaction_time == "2026-11-20T08:00:00Z" and len(result.output) == 3
    paths = client.download(result, tmp_path).files
    assert sorted(paths) == ["Encounter", "Observation", "Patient"]
    assert paths["Patient"][0].read_bytes() == (DEMO_HOSPITAL / "Patient.ndjson").read_bytes()
    downloads = [c.request for c in responses.calls if c.request.url.startswith(FILES)]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in downloads)   # requiresAccessToken


@responses.activate
@pytest.mark.parametrize("requires, base, expected", [
    (False, FILES, False),                                  # pre-signed files: never the token
    (None, FILES, True),                                    # our own host, manifest silent: the token
    (None, "https://bucket.example.net/x", False),          # another host, manifest silent: never
    (True, "https://bucket.example.net/x", True),           # the manifest says files need it
])
def test_the_token_goes_with_files_only_where_it_belongs(client: BulkDataClient, tmp_path: Path,
                                                         requires: bool | None, base: str, expected: bool) -> None:
    add_files(base)
    client.download(Manifest.parse(manifest(requires_token=requires, base=base)), tmp_path)
    sent = ["Authorization" in c.request.headers for c in responses.calls]
    assert sent == [expected] * 3


@responses.activate
def test_a_status_url_on_another_host_is_refused(client: BulkDataClient) -> None:
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": "https://evil.example.com/poll"})
    with pytest.raises(UpstreamError, match="another host"):
        client.kick_off()


@responses.activate
def test_kick_off_refusal_and_failed_export_carry_the_servers_message(client: BulkDataClient) -> None:
    responses.get(f"{BASE}/Group/ward-9/$export", status=400, json={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported",
                                                       "details": {"text": "_type Encounter not supported"}}]})
    with pytest.raises(UpstreamError, match="_type Encounter not supported") as refused:
        client.kick_off(group="ward-9")
    assert refused.value.temporary is False and refused.value.upstream_status == 400
    responses.get(STATUS, status=202, headers={"Retry-After": "1"})
    responses.get(STATUS, status=500, json=OUTCOME)        # the export failed: not polled again
    with pytest.raises(UpstreamError, match=r"disk full.*issue codes: processing") as failed:
        client.poll(STATUS)
    assert failed.value.upstream_status == 500 and failed.value.temporary is False
    assert len(responses.calls) == 3
    responses.get(STATUS, status=404)                      # the export itself is gone: not retried
    with pytest.raises(UpstreamError, match="HTTP 404"):
        client.poll(STATUS)
    assert len(responses.calls) == 4


@responses.activate
def test_kick_off_retries_429_with_retry_after(client: BulkDataClient, clock: Clock) -> None:
    responses.get(f"{BASE}/Patient/$export", status=429, headers={"Retry-After": "13"})
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": "/fhir/$export-poll/42"})
    assert client.kick_off() == STATUS
    assert clock.sleeps == [13.0]


@responses.activate
def test_an_export_that_never_ends_is_cancelled(registry: ModelRegistry, jobs: JobStore, clock: Clock,
                                                tmp_path: Path) -> None:
    slow = BulkDataClient(BASE, token=TOKEN, sleep=clock.sleep, clock=lambda: clock.now, max_wait=20)
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=202, headers={"Retry-After": "8"})
    responses.delete(STATUS, status=202)
    with pytest.raises(UpstreamTimeout):
        export_and_assess(load_settings({"source_url": BASE}), registry, jobs, slow, workdir=tmp_path,
                          output=tmp_path / "out.ndjson")
    assert responses.calls[-1].request.method == "DELETE"
    assert sum(clock.sleeps) <= 20
    job = jobs.last("bulk-export", f"{BASE}/Patient/$export", status="failed")
    assert job is not None and job.error_status == 504


@responses.activate
def test_error_files_are_downloaded_and_counted(client: BulkDataClient, tmp_path: Path) -> None:
    add_files()
    responses.get(f"{FILES}/errors.ndjson", body=json.dumps(OUTCOME) + "\n")
    got = client.download(Manifest.parse(manifest(errors=True)), tmp_path)
    assert len(got.files) == 3 and (tmp_path / "errors.000.ndjson").exists()
    # A bare processing error is the whole export failing (disk full): it keeps _since (see PER_RESOURCE).
    assert got.errors == 1 and got.error_codes == {"processing": 1} and got.skipped == 0


# -- whole runs: score, write back, remember -------------------------------------------------------------

@responses.activate
def test_a_run_scores_everyone_and_writes_back_in_bounded_transactions(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path) -> None:
    add_export(manifest(), kick_off=f"{BASE}/Group/ward-3/$export")
    add_files()
    received: list[dict[str, Any]] = []
    transaction_sink(received)
    settings = load_settings({"source_url": BASE, "bulk_bundle_size": 5})
    run = export_and_assess(settings, registry, jobs, client, workdir=tmp_path / "w", output=tmp_path / "ra.ndjson",
                            group="ward-3")
    assert run.patients == 12 and run.since is None
    lines = [orjson.loads(l) for l in (tmp_path / "ra.ndjson").read_bytes().splitlines()]
    assert len(lines) == 12 and {r["resourceType"] for r in lines} == {"RiskAssessment"}
    assert [len(b["entry"]) for b in received] == [5, 5, 2]
    assert all(b["type"] == "transaction" for b in received)
    entries = [e for b in received for e in b["entry"]]
    assert {e["request"]["method"] for e in entries} == {"PUT"}
    assert sorted(e["request"]["url"] for e in entries) == sorted(f"RiskAssessment/{r['id']}" for r in lines)
    assert run.written.written == 12 and run.written.failed == 0
    job = jobs.last("bulk-export", f"{BASE}/Group/ward-3/$export")
    assert job is not None and job.result["transactionTime"] == "2026-11-20T08:00:00Z"
    # Every assessment is kept here too, as $assess keeps its own: stored, with its Provenance
    # (model version, inputs, mapping) and a 'create' AuditEvent, nothing queued (all were written back).
    assert run.stored == 12 and job.result["stored"] == 12
    store = jobs.store
    for line in lines:
        assert store.get_assessment(line["id"])["identifier"] == line["identifier"]
    with store.session() as session:
        provenance = {row.target_id: orjson.loads(row.resource) for row in session.scalars(select(ProvenanceRow))}
        audits = [orjson.loads(row.resource) for row in session.scalars(select(AuditEventRow))]
    assert set(provenance) == {line["id"] for line in lines}
    some = lines[0]
    what = [e["what"] for e in provenance[some["id"]]["entity"]]
    assert [w["reference"] for w in what if "reference" in w] == [b["reference"] for b in some["basis"]]
    assert [w["identifier"]["value"] for w in what if "identifier" in w] == [
        f"deterioration|{some['method']['coding'][0]['version']}",            # the model card
        f"deterioration|{registry.mappings['deterioration'].digest}"]       # the mapping it was scored with
    created = [a for a in audits if a["action"] == "C"]
    assert len(created) == 12
    # Each delivery is on record (target, delivered), so a later withdrawal is written back there too.
    assert sorted((row.resource_id, row.target, row.status) for row in store.outbox()) == sorted(
        (line["id"], BASE, "delivered") for line in lines)
    withdrawn = lines[0]["id"]
    store.withdraw_assessment(withdrawn, reason="wrong patient")
    assert [row.resource_id for row in store.outbox(status="pending")] == [withdrawn]
    # A re-run over the same export sends everything again except the withdrawn one, whose newer
    # version goes through the outbox: the hospital's copy is not put back to 'final'.
    received.clear()
    add_export(manifest(), kick_off=f"{BASE}/Group/ward-3/$export")
    add_files()
    again = export_and_assess(settings, registry, jobs, client, workdir=tmp_path / "w2",
                              output=tmp_path / "ra2.ndjson", group="ward-3", full=True)
    resent = [e["resource"]["id"] for b in received for e in b["entry"]]
    assert again.stored == 0 and len(resent) == 11 and withdrawn not in resent
    assert store.get_assessment(withdrawn)["status"] == "entered-in-error"
    assert [row.resource_id for row in store.outbox(status="pending")] == [withdrawn]
    with store.session() as session:
        assert verify(session).ok                       # the audit chain and the stored copies agree


@responses.activate
def test_the_next_run_asks_since_the_last_transaction_time_and_reexports_changed_patients(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path) -> None:
    settings = load_settings({"source_url": BASE, "write_back": False})
    add_export(manifest("2026-11-20T08:00:00Z"), polls=0)
    add_files()
    export_and_assess(settings, registry, jobs, client, workdir=tmp_path / "1", output=tmp_path / "1.ndjson")
    responses.reset()
    # Second run: _since the first; only demo-002's new observations changed.
    changed = f"{FILES}/changed"
    add_export(manifest("2026-11-20T09:00:00Z", base=changed), polls=0)
    responses.get(f"{changed}/Patient.ndjson", body=b"")
    responses.get(f"{changed}/Encounter.ndjson", body=b"")
    obs = [l for l in (DEMO_HOSPITAL / "Observation.ndjson").read_bytes().splitlines() if b"Patient/demo-002" in l]
    responses.get(f"{changed}/Observation.ndjson", body=b"\n".join(obs[-3:]) + b"\n")
    # ... then a POST kick-off for that patient's full record
    full = f"{FILES}/full"
    responses.post(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, json=manifest("2026-11-20T09:00:05Z", base=full))
    add_files(full, only=("demo-002",))
    run = export_and_assess(settings, registry, jobs, client, workdir=tmp_path / "2", output=tmp_path / "2.ndjson")
    assert run.since == "2026-11-20T08:00:00Z" and run.transaction_time == "2026-11-20T09:00:00Z"
    first = responses.calls[0].request
    assert parse_qs(urlsplit(first.url).query)["_since"] == ["2026-11-20T08:00:00Z"]
    post = next(c.request for c in responses.calls if c.request.method == "POST")
    params = json.loads(post.body)["parameter"]
    assert [p["valueReference"]["reference"] for p in params if p["name"] == "patient"] == ["Patient/demo-002"]
    assert not any(p["name"] == "_since" for p in params)           # the whole record, not just the change
    assert run.patients == 1
    assert jobs.last("bulk-export", f"{BASE}/Patient/$export").result["transactionTime"] == "2026-11-20T09:00:00Z"


@responses.activate
def test_a_refused_write_back_keeps_since_where_it_was(registry: ModelRegistry, jobs: JobStore,
                                                       client: BulkDataClient, tmp_path: Path) -> None:
    add_export(manifest(), polls=0)
    add_files()
    received: list[dict[str, Any]] = []
    transaction_sink(received, fail_entry="__set_below__")
    settings = load_settings({"source_url": BASE, "bulk_bundle_size": 50})
    responses.replace(responses.POST, BASE, status=422, json=OUTCOME)
    run = export_and_assess(settings, registry, jobs, client, workdir=tmp_path, output=tmp_path / "ra.ndjson")
    assert run.written.failed == 12 and "disk full" in run.written.errors[0]
    assert jobs.last("bulk-export", f"{BASE}/Patient/$export") is None       # the next run starts over
    assert jobs.last("bulk-export", f"{BASE}/Patient/$export", status="failed").error_status == 502
    # Not lost: stored here and queued for the write-back worker, one row each, with the reason.
    ids = sorted(orjson.loads(l)["id"] for l in (tmp_path / "ra.ndjson").read_bytes().splitlines())
    assert run.stored == 12 and run.queued == 12
    pending = jobs.store.outbox(status="pending")
    assert sorted(row.resource_id for row in pending) == ids
    assert {(row.target, row.attempts) for row in pending} == {(BASE, 1)}
    assert "disk full" in pending[0].last_error
    # A second run over the same export stores nothing twice and queues nothing twice.
    again = export_and_assess(settings, registry, jobs, client, workdir=tmp_path / "again",
                              output=tmp_path / "ra2.ndjson")
    assert again.stored == 0 and again.queued == 12 and again.written.failed == 12
    assert len(jobs.store.outbox()) == 12                                      # the same rows, due again
    with jobs.store.session() as session:
        assert session.scalar(select(func.count()).select_from(ProvenanceRow)) == 12


@responses.activate
def test_the_cli_runs_an_export(settings_overrides: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    import fhir_ai.bulkdata as bulkdata
    monkeypatch.setattr(bulkdata, "DEFAULT_POLL", 0.0)
    add_export(manifest(), polls=0)
    responses.replace(responses.GET, STATUS, json=manifest())      # no 429 here: nothing to sleep for
    add_files()
    received: list[dict[str, Any]] = []
    transaction_sink(received)
    result = CliRunner(env=cli_env(settings_overrides, write_back=True)).invoke(main, ["bulk-export-assess", "--output", str(tmp_path / "o.ndjson")])
    assert result.exit_code == 0, result.output
    assert "12 patients" in result.output and "written back 12 in 1 bundle(s)" in result.output


@responses.activate
def test_entries_the_server_refused_and_bundles_that_got_no_answer_are_queued(
        registry: ModelRegistry, jobs: JobStore, client: BulkDataClient, tmp_path: Path) -> None:
    """Bundles of 5: the first answers 200 with one entry refused, the second gets no answer (connection
    reset, after the retries), the third answers with too few entries. Nothing is counted written that
    was not; everything not written is queued for the worker."""
    add_export(manifest(), polls=0)
    add_files()
    bundles: list[list[str]] = []

    def answer(request: Any):  # type: ignore[no-untyped-def]
        ids = [e["resource"]["id"] for e in json.loads(request.body)["entry"]]
        bundles.append(ids)
        if len(bundles) == 1:
            entries = [{"response": {"status": "422" if i == 2 else "200 OK"}} for i in range(len(ids))]
        elif len(bundles) == 2:
            raise requests.ConnectionError("reset")
        else:
            entries = [{"response": {"status": "200 OK"}}]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    responses.add_callback(responses.POST, BASE, callback=answer, content_type="application/fhir+json")
    settings = load_settings({"source_url": BASE, "bulk_bundle_size": 5})
    run = export_and_assess(settings, registry, jobs, client, workdir=tmp_path, output=tmp_path / "ra.ndjson")
    sent = [rid for ids in bundles for rid in ids]
    first, third = bundles[0], bundles[-1]
    second = sorted(set(sent) - set(first) - set(third))
    not_written = sorted([first[2], *second, *third])
    assert len(set(sent)) == 12 and len(third) == 2
    assert run.written.written == 4 and run.written.failed == 8
    assert sorted(run.written.failed_ids) == not_written and run.queued == 8
    assert sorted(row.resource_id for row in jobs.store.outbox(status="pending")) == not_written
    assert jobs.last("bulk-export", f"{BASE}/Patient/$export", status="failed").error_status == 502


@responses.activate
@pytest.mark.parametrize("answer", [
    {"resourceType": "Bundle", "type": "transaction-response", "entry": {"response": {"status": "200"}}},
    {"resourceType": "Bundle", "type": "transaction-response", "entry": ["200 OK", "200 OK"]},
    {"resourceType": "Bundle", "type": "transaction-response",
     "entry": [{"response": "200 OK"}, {"response": {"status": "201 Created"}}]},
])
def test_a_malformed_transaction_response_counts_as_not_written(client: BulkDataClient, answer: dict) -> None:
    """An answer that does not answer the Bundle entry by entry (entry not a list, entries not objects,
    a response that is not an object) is counted as not written, never taken as written or a crash."""
    responses.post(BASE, json=answer)
    sent = [{"resourceType": "RiskAssessment", "id": f"ra-{i}", "status": "final"} for i in range(2)]
    counts = client.write_bundles(sent, size=10)
    assert counts.bundles == 1 and counts.written + counts.failed == 2
    assert "ra-0" in counts.failed_ids and counts.failed >= 1
    assert set(counts.written_ids) <= {"ra-1"}
