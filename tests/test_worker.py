"""The write-back worker: backoff with jitter, Retry-After, a circuit per server, claims so no row
is sent twice, permanent refusals marked failed; its status in the CLI, /write-back and /health."""
from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
import responses

from fhir_ai.app import create_app
from fhir_ai.cli import main
from fhir_ai.config import load_settings
from fhir_ai.delivery import Circuit, Worker, backoff_delay, summary
from fhir_ai.errors import ConfigurationError
from fhir_ai.store import Store

BASE = "https://ehr.example.org/fhir"
OTHER = "https://other.example.org/fhir"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def risk_assessment(n: int) -> dict[str, Any]:
    return {"resourceType": "RiskAssessment", "id": f"ra-{n:03d}", "status": "final",
            "identifier": [{"system": "https://fhir-ai.invalid/id", "value": f"ra-{n:03d}"}],
            "subject": {"reference": f"Patient/p{n}"},
            "method": {"coding": [{"code": "deterioration", "version": "1"}]},
            "prediction": [{"probabilityDecimal": 0.1}]}


def queue(store: Store, count: int, target: str = BASE, start: int = 0) -> list[str]:
    ids = []
    for n in range(start, start + count):
        saved = store.save_assessment(risk_assessment(n), model_id="deterioration", model_version="1",
                                      write_back_target=target)
        ids.append(saved.resource["id"])
    return ids


class Clocks:
    """Wall clock (claims, next attempts) and monotonic clock (circuits), moved together."""

    def __init__(self) -> None:
        self.wall = T0 + timedelta(hours=1)   # rows are stored "now"; an hour later they are due
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def store(database_url: str):
    store = Store(database_url)
    yield store
    store.close()


@pytest.fixture
def clocks(monkeypatch) -> Clocks:
    import fhir_ai.store.repository as repository
    clocks = Clocks()
    monkeypatch.setattr(repository, "_utcnow", lambda: T0)   # rows created at T0
    return clocks


def make_worker(store: Store, clocks: Clocks, rand: float = 0.5, **overrides: Any) -> Worker:
    settings = load_settings({"source_url": BASE, "source_timeout": 5.0, "write_back_backoff": 10.0,
                              "write_back_backoff_cap": 600.0, "circuit_failures": 3,
                              "circuit_cooldown": 60.0, **overrides})
    return Worker(settings, store, clock=lambda: clocks.mono, now=lambda: clocks.wall,
                  rand=lambda: rand)


def refuse(ids: list[str]) -> None:
    """The server is down for these rows: every PUT's connection is refused."""
    for rid in ids:
        responses.put(f"{BASE}/RiskAssessment/{rid}", body=requests.ConnectionError("refused"))


def delete_stored(store: Store, resource_id: str) -> None:
    from fhir_ai.store.tables import AssessmentRow
    with store.session() as session, session.begin():
        session.delete(session.get(AssessmentRow, resource_id))


def row_of(store: Store, resource_id: str):
    return store.outbox(resource_id=resource_id)[0]


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# -- backoff -----------------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_between_half_and_full_and_is_capped() -> None:
    for attempts, ceiling in [(1, 10), (2, 20), (3, 40), (4, 80), (7, 600), (30, 600)]:
        assert backoff_delay(attempts, 10, 600, rand=lambda: 0.0) == ceiling / 2
        assert backoff_delay(attempts, 10, 600, rand=lambda: 1.0) == ceiling
    import random
    rng = random.Random(7)
    samples = [backoff_delay(3, 10, 600, rand=rng.random) for _ in range(2000)]
    assert min(samples) >= 20 and max(samples) <= 40
    assert max(samples) - min(samples) > 15          # it really is spread, not a constant


# -- the circuit -------------------------------------------------------------------------------

def test_circuit_opens_half_opens_and_closes() -> None:
    now = [0.0]
    circuit = Circuit(threshold=3, cooldown=60, clock=lambda: now[0])
    for _ in range(2):
        assert circuit.allow()
        circuit.failure()
    assert circuit.state == "closed"
    circuit.failure()
    assert circuit.state == "open" and not circuit.allow()
    now[0] = 59.9
    assert not circuit.allow()
    now[0] = 60.0
    assert circuit.allow() and circuit.state == "half-open"
    assert not circuit.allow()                       # one trial at a time
    circuit.failure()                                # trial failed: open for another cooldown
    assert circuit.state == "open" and not circuit.allow()
    now[0] = 120.0
    assert circuit.allow()
    circuit.success()
    assert circuit.state == "closed" and circuit.allow() and circuit.failures == 0


def test_retry_after_holds_the_circuit_open_even_below_the_threshold() -> None:
    now = [0.0]
    circuit = Circuit(threshold=5, cooldown=60, clock=lambda: now[0])
    circuit.failure(hold=120)
    assert circuit.state == "open" and circuit.seconds_until_trial() == 120
    now[0] = 119
    assert not circuit.allow()
    now[0] = 120
    assert circuit.allow()


# -- the worker against a stubbed server -------------------------------------------------------

@responses.activate
def test_pending_rows_are_delivered_by_put_once(store, clocks) -> None:
    ids = queue(store, 3)
    for rid in ids:
        responses.put(f"{BASE}/RiskAssessment/{rid}", json={"resourceType": "RiskAssessment", "id": rid})
    worker = make_worker(store, clocks)
    report = worker.run_once()
    assert (report.claimed, report.delivered) == (3, 3)
    assert [c.request.method for c in responses.calls] == ["PUT"] * 3
    body = responses.calls[0].request.body
    assert b'"versionId"' not in body and b'"lastUpdated"' not in body   # the server keeps its own
    assert {r.status for r in store.outbox()} == {"delivered"}
    assert worker.run_once().claimed == 0                               # nothing sent twice


@responses.activate
def test_fresh_rows_are_left_to_the_request_that_stored_them(store, clocks) -> None:
    queue(store, 1)
    clocks.wall = T0 + timedelta(seconds=5)
    assert make_worker(store, clocks).run_once().claimed == 0
    clocks.wall = T0 + timedelta(seconds=31)
    responses.put(f"{BASE}/RiskAssessment/ra-000", json={})
    assert make_worker(store, clocks).run_once().delivered == 1


@responses.activate
def test_temporary_failure_backs_off_then_delivers(store, clocks) -> None:
    (rid,) = queue(store, 1)
    url = f"{BASE}/RiskAssessment/{rid}"
    responses.put(url, status=503)
    worker = make_worker(store, clocks, rand=0.5)
    assert worker.run_once().retry_later == 1
    row = row_of(store, rid)
    assert row.status == "pending" and row.attempts == 1 and "503" in row.last_error
    assert as_utc(row.next_attempt_at) == clocks.wall + timedelta(seconds=7.5)   # 10 s: 5 + 0.5*5
    assert worker.run_once().claimed == 0                                       # not due yet
    clocks.advance(8)
    responses.replace(responses.PUT, url, status=503)
    worker.run_once()
    row = row_of(store, rid)
    assert row.attempts == 2
    assert as_utc(row.next_attempt_at) == clocks.wall + timedelta(seconds=15)   # doubled: 20 s
    clocks.advance(16)
    responses.replace(responses.PUT, url, json={"resourceType": "RiskAssessment", "id": rid})
    assert worker.run_once().delivered == 1
    row = row_of(store, rid)
    assert row.status == "delivered" and row.attempts == 3 and row.last_error is None


@responses.activate
def test_rows_for_an_open_circuit_are_deferred_without_reading_them(store, clocks, monkeypatch) -> None:
    """During an outage every pass claims the due rows; while the circuit is open and its trial not due,
    each is put back at once: no stored resource read, no claim renewed (only the deferral's UPDATE)."""
    ids = queue(store, 3)
    responses.put(f"{BASE}/RiskAssessment/{ids[0]}", status=429, headers={"Retry-After": "120"})
    worker = make_worker(store, clocks)
    reads: list[str] = []
    original = store.get_assessment
    monkeypatch.setattr(store, "get_assessment", lambda rid: reads.append(rid) or original(rid))
    report = worker.run_once()
    assert (report.retry_later, report.deferred) == (1, 2)
    assert reads == [ids[0]]                      # the one that was tried; the other two were not read
    assert all(row_of(store, rid).claimed_by is None for rid in ids[1:])


@responses.activate
def test_429_retry_after_is_honoured_for_the_row_and_the_server(store, clocks) -> None:
    ids = queue(store, 3)
    responses.put(f"{BASE}/RiskAssessment/{ids[0]}", status=429, headers={"Retry-After": "120"})
    worker = make_worker(store, clocks)
    report = worker.run_once()
    assert (report.retry_later, report.deferred) == (1, 2)   # the other two were not even tried
    assert len(responses.calls) == 1
    first = row_of(store, ids[0])
    assert as_utc(first.next_attempt_at) >= clocks.wall + timedelta(seconds=120)
    assert first.attempts == 1
    others = [row_of(store, rid) for rid in ids[1:]]
    assert all(r.attempts == 0 and r.claimed_by is None for r in others)   # deferred, not failed
    clocks.advance(119)
    assert worker.run_once().claimed == 0
    clocks.advance(2)
    for rid in ids:
        responses.replace(responses.PUT, f"{BASE}/RiskAssessment/{rid}", json={}) if rid == ids[0] \
            else responses.put(f"{BASE}/RiskAssessment/{rid}", json={})
    assert worker.run_once().delivered == 3


@responses.activate
def test_circuit_opens_after_repeated_failures_and_recovers_through_half_open(store, clocks) -> None:
    ids = queue(store, 6)
    refuse(ids)
    worker = make_worker(store, clocks)           # threshold 3, cooldown 60
    report = worker.run_once()
    assert (report.retry_later, report.deferred) == (3, 3)
    assert len(responses.calls) == 3              # after the third failure nothing more is sent
    assert worker.circuits() == {BASE: "open"}

    clocks.advance(61)                            # half-open: exactly one trial
    report = worker.run_once()
    assert len(responses.calls) == 4
    assert report.retry_later == 1 and worker.circuits() == {BASE: "open"}

    clocks.advance(3600)                          # the server is back
    for rid in ids:
        responses.replace(responses.PUT, f"{BASE}/RiskAssessment/{rid}", json={})
    report = worker.run_once()
    assert report.delivered == 6 and worker.circuits() == {BASE: "closed"}
    assert Counter(c.request.url for c in responses.calls
                   if getattr(c.response, "status_code", None) == 200) == {f"{BASE}/RiskAssessment/{r}": 1 for r in ids}


@responses.activate
def test_a_row_without_its_stored_resource_does_not_use_up_the_half_open_trial(store, clocks) -> None:
    ids = queue(store, 4)
    refuse(ids)
    worker = make_worker(store, clocks)           # threshold 3, cooldown 60
    assert worker.run_once().deferred == 1 and worker.circuits() == {BASE: "open"}
    delete_stored(store, ids[0])                  # the first row the trial would take

    clocks.advance(61)                            # half-open, and the server is back
    for rid in ids[1:]:
        responses.replace(responses.PUT, f"{BASE}/RiskAssessment/{rid}", json={})
    report = worker.run_once()
    # The missing resource is failed without a request; the trial goes to a real delivery, which
    # closes the circuit (it used to stay half-open with its trial "under way" for good, deferring
    # every later row of this server at every pass).
    assert (report.failed, report.delivered, report.deferred) == (1, 3, 0), str(report)
    assert worker.circuits() == {BASE: "closed"}
    assert {row_of(store, rid).status for rid in ids[1:]} == {"delivered"}


@responses.activate
def test_one_servers_circuit_does_not_stop_another(store, clocks) -> None:
    down = queue(store, 3, target=BASE)
    up = queue(store, 2, target=OTHER, start=10)
    for rid in down:
        responses.put(f"{BASE}/RiskAssessment/{rid}", status=502)
    for rid in up:
        responses.put(f"{OTHER}/RiskAssessment/{rid}", json={})
    report = make_worker(store, clocks, circuit_failures=1).run_once()
    assert report.delivered == 2 and report.retry_later == 1 and report.deferred == 2
    # credentials belong to the configured server only
    assert all("Authorization" not in c.request.headers for c in responses.calls)


@pytest.mark.parametrize("status", [400, 404, 409, 422])
@responses.activate
def test_permanent_refusal_marks_failed_and_is_not_retried(store, clocks, status: int) -> None:
    (rid,) = queue(store, 1)
    responses.put(f"{BASE}/RiskAssessment/{rid}", status=status, json={
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": "subject unknown"}]})
    worker = make_worker(store, clocks)
    assert worker.run_once().failed == 1
    row = row_of(store, rid)
    assert row.status == "failed" and "subject unknown" in row.last_error
    clocks.advance(10_000)
    assert worker.run_once().claimed == 0 and len(responses.calls) == 1
    assert worker.circuits() == {BASE: "closed"}      # the server answered: it is up


def test_a_claimed_row_is_not_claimed_again_until_the_lease_runs_out(store, clocks) -> None:
    ids = queue(store, 4)
    a = store.claim_write_backs("worker-a", lease=60, now=clocks.wall)
    assert [r.resource_id for r in a] == ids
    assert store.claim_write_backs("worker-b", lease=60, now=clocks.wall) == []
    # worker-a crashed: after its lease the rows are free again
    later = store.claim_write_backs("worker-b", lease=60, now=clocks.wall + timedelta(seconds=61))
    assert [r.resource_id for r in later] == ids and {r.claimed_by for r in later} == {"worker-b"}


@responses.activate
def test_two_workers_racing_never_send_a_row_twice(store, clocks) -> None:
    ids = queue(store, 40)
    lock = threading.Lock()
    sent: list[str] = []

    def put(request):  # type: ignore[no-untyped-def]
        with lock:
            sent.append(request.url.rsplit("/", 1)[1])
        return 200, {}, "{}"

    for rid in ids:
        responses.add_callback(responses.PUT, f"{BASE}/RiskAssessment/{rid}", callback=put)
    workers = [make_worker(store, clocks, worker_batch=7) for _ in range(4)]
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            barrier.wait()
            while worker.run_once().claimed:
                pass
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert Counter(sent) == Counter(ids)          # every row exactly once
    assert {r.status for r in store.outbox()} == {"delivered"}


@responses.activate
def test_a_slow_server_does_not_let_a_second_worker_send_a_row_again(store, clocks) -> None:
    """A batch is claimed at once but sent row by row: each row's claim is renewed just before its PUT,
    so while a slow server holds worker a, worker b takes only the rows whose claim really ran out, and
    a then leaves those to b. Every row goes out once; no late result undoes another's."""
    ids = queue(store, 3)
    a, b = make_worker(store, clocks), make_worker(store, clocks)
    sent: list[str] = []
    b_reports = []

    def put(request):  # type: ignore[no-untyped-def]
        rid = request.url.rsplit("/", 1)[1]
        sent.append(rid)
        if len(sent) <= 2:                        # a's first two PUTs take 40 s each (lease: 60 s)
            clocks.advance(40)
        if len(sent) == 2:                        # 80 s after a's claim: b's pass runs meanwhile
            b_reports.append(b.run_once())
        return 200, {}, "{}"

    for rid in ids:
        responses.add_callback(responses.PUT, f"{BASE}/RiskAssessment/{rid}", callback=put)
    report = a.run_once()
    assert (report.claimed, report.delivered, report.lost) == (3, 2, 1), str(report)
    # b found only the third row free (the second's claim was renewed at 40 s) and sent it.
    assert [(r.claimed, r.delivered) for r in b_reports] == [(1, 1)]
    assert sent == [ids[0], ids[1], ids[2]]       # each row exactly once
    assert {r.status for r in store.outbox()} == {"delivered"}


def test_a_result_from_a_worker_without_the_claim_changes_nothing(store, clocks) -> None:
    (rid,) = queue(store, 1)
    (row,) = store.claim_write_backs("worker-a", lease=60, now=clocks.wall)
    (taken,) = store.claim_write_backs("worker-b", lease=60, now=clocks.wall + timedelta(seconds=61))
    assert not store.renew_claim(row.id, "worker-a", lease=60, now=clocks.wall + timedelta(seconds=61))
    store.record_delivery(taken.id, ok=True, worker="worker-b")
    store.record_delivery(row.id, ok=False, error="late timeout", worker="worker-a")   # a's late answer
    after = row_of(store, rid)
    assert (after.status, after.attempts, after.last_error) == ("delivered", 1, None)


@responses.activate
def test_missing_stored_resource_is_failed_not_looped(store, clocks) -> None:
    (rid,) = queue(store, 1)
    delete_stored(store, rid)
    assert make_worker(store, clocks).run_once().failed == 1
    assert row_of(store, rid).status == "failed"


# -- visibility --------------------------------------------------------------------------------

def test_summary_is_degraded_on_failed_or_old_pending(store, clocks) -> None:
    settings = load_settings({"write_back_stale_after": 900})
    assert summary(store, settings, now=T0)["status"] == "ok"
    queue(store, 2)
    fresh = summary(store, settings, now=T0 + timedelta(seconds=60))
    assert fresh["status"] == "ok" and fresh["pending"] == 2 and fresh["oldestPendingSeconds"] == 60
    old = summary(store, settings, now=T0 + timedelta(seconds=901), detail=True)
    assert old["status"] == "degraded" and old["stalePending"] == 2
    assert {e["resource"] for e in old["entries"]} == {"RiskAssessment/ra-000", "RiskAssessment/ra-001"}
    store.record_delivery(store.outbox()[0].id, ok=False, error="HTTP 422", permanent=True)
    failed = summary(store, settings, now=T0 + timedelta(seconds=60))
    assert failed["status"] == "degraded" and failed["failed"] == 1 and failed["pending"] == 1


def test_health_and_write_back_endpoint_show_the_outbox(app, client) -> None:
    store = app.extensions["fhir_ai"].store
    assert client.get("/health").json["writeBack"]["status"] == "ok"
    queue(store, 2)
    store.record_delivery(store.outbox()[0].id, ok=False, permanent=True,
                          error="PUT /r4/RiskAssessment/ra-000: refused, HTTP 422: subject Jane Q. Doe unknown")
    health = client.get("/health").json
    assert health["status"] == "degraded"
    assert (health["writeBack"]["pending"], health["writeBack"]["failed"]) == (1, 1)
    listing = client.get("/write-back")
    assert listing.status_code == 200
    entries = {e["resource"]: e for e in listing.json["entries"]}
    assert entries["RiskAssessment/ra-000"]["status"] == "failed"
    # up to the server's status: its words may name the patient (they stay in the outbox row)
    assert entries["RiskAssessment/ra-000"]["lastError"] == ("PUT /r4/RiskAssessment/ra-000: refused, HTTP 422 "
                                                             "(the server's words are in the outbox row)")
    assert "Jane" in store.outbox(status="failed")[0].last_error
    assert entries["RiskAssessment/ra-001"]["status"] == "pending"
    # the listing is audited (who looked at the write-backs, when)
    from fhir_ai.store.trail_tables import AuditEventRow
    from sqlalchemy import func, select
    with store.session() as session:
        before = session.scalar(select(func.count()).select_from(AuditEventRow))
    assert client.get("/write-back").status_code == 200
    with store.session() as session:
        after = session.scalar(select(func.count()).select_from(AuditEventRow))
        newest = session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq.desc()).limit(1)).one()
    assert after == before + 1 and '"search-type"' in newest.resource


def test_health_says_when_the_job_queue_cannot_be_reached(settings_overrides) -> None:
    import socket
    with socket.socket() as probe:                    # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings_overrides["broker_url"] = f"redis://127.0.0.1:{port}/0"
    app = create_app(settings_overrides)
    try:
        health = app.test_client().get("/health")
        assert health.status_code == 200                       # $assess still works: no reason to take it out
        assert health.json["status"] == "degraded"
        assert health.json["queue"]["status"] == "unreachable"
        assert health.json["writeBack"]["status"] == "ok"
        # the workers' heartbeats live in Redis too: not asked again (one timeout, not two), said unknown
        assert health.json["workers"]["status"] == health.json["scheduler"]["status"] == "unknown"
        assert "cannot be reached" in health.json["workers"]["message"]
    finally:
        app.extensions["fhir_ai"].close()
    # A broker /health cannot ping (sentinel://: it said "unreachable", ValueError, for good) is refused at start.
    settings_overrides["broker_url"] = "sentinel://127.0.0.1:26379/0"
    with pytest.raises(ConfigurationError, match="a sentinel:// broker is not supported"):
        create_app(settings_overrides)


@responses.activate
def test_cli_worker_once_and_status(runner, settings_overrides) -> None:
    settings_overrides.update(source_url=BASE, write_back=True)
    store = Store(settings_overrides["database_url"])
    ids = queue(store, 2)
    for row in store.outbox():   # what the request's own failed attempt leaves behind
        store.record_delivery(row.id, ok=False, error="connection failed")
    store.close()
    responses.put(f"{BASE}/RiskAssessment/{ids[0]}", json={})
    responses.put(f"{BASE}/RiskAssessment/{ids[1]}", status=422)
    env = {**runner.env, "FHIR_AI_SOURCE_URL": BASE, "FHIR_AI_WRITE_BACK": "true"}
    result = runner.invoke(main, ["worker", "--once"], env=env)
    assert result.exit_code == 1, result.output       # one refused: exit 1 for cron/alerts
    assert "delivered 1" in result.output and "failed 1" in result.output
    status = runner.invoke(main, ["write-back", "status"], env=env)
    assert status.exit_code == 0
    assert f"failed\tRiskAssessment/{ids[1]}" in status.output
    assert "delivered: 1, failed: 1" in status.output and "health: degraded" in status.output
