"""A site without batch jobs (FHIR_AI_BROKER_URL=none): no Redis is contacted, /health is healthy, what needs the
job queue answers 501 with an OperationOutcome, /metadata does not declare it, the Celery worker is refused.
And on a site with batch jobs, a missing beat scheduler degrades /health (it drives write-back retries, the
resumption of lost jobs and job expiry). The store is the suite's (SQLite, or PostgreSQL with --database)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
import redis.connection
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.cli import main
from fhir_ai.config import load_settings
from fhir_ai.delivery import Worker
from fhir_ai.errors import ConfigurationError
from fhir_ai.jobs import JobStore, heartbeat
from fhir_ai.jobs.celery_app import app as celery_app

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]

FHIR = "application/fhir+json"
AS_OF = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
def no_redis(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test on any attempt to make a Redis client from a URL or to open a Redis connection (kombu's
    transport opens its connections through redis-py too)."""
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def attempt(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            pytest.fail(f"Redis contacted ({what}) on a site without batch jobs")
        return attempt
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, *a, **k: refuse("Redis.from_url")()))
    monkeypatch.setattr(redis, "from_url", refuse("redis.from_url"))
    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", refuse("Connection.connect"))
    return attempts


@pytest.fixture
def off(settings_overrides: dict[str, Any], no_redis: list[str]) -> Iterator[Flask]:
    app = create_app({**settings_overrides, "broker_url": "none"})      # `app`, if also asked for, keeps jobs on
    app.config["TESTING"] = True
    yield app
    app.extensions["fhir_ai"].close()
    assert no_redis == []


@pytest.fixture
def oc(off: Flask) -> FlaskClient:
    return off.test_client()


# -- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["none", "NONE", " None "])
def test_none_switches_batch_jobs_off(value: str) -> None:
    assert load_settings(environ={"FHIR_AI_BROKER_URL": value}).jobs_enabled is False
    assert load_settings({"broker_url": value}, environ={}).jobs_enabled is False
    assert load_settings(environ={}).jobs_enabled is True          # the default: Redis on localhost


@pytest.mark.parametrize("source", ["environment", "override"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_broker_url_is_refused_naming_the_setting(source: str, value: str) -> None:
    # Not taken as unset (the default Redis) nor guessed to mean none: said at start, with both choices.
    with pytest.raises(ConfigurationError) as refused:
        if source == "environment":
            load_settings(environ={"FHIR_AI_BROKER_URL": value})
        else:
            load_settings({"broker_url": value}, environ={})
    assert "FHIR_AI_BROKER_URL is empty" in refused.value.message and "'none'" in refused.value.message
    assert refused.value.expression == ["broker_url"]


@pytest.mark.parametrize("value", ["off", "false", "disabled", "no", "127.0.0.1:6379"])
def test_a_broker_url_that_is_neither_none_nor_a_url_is_refused(value: str) -> None:
    # Celery would take 'off' for a host name: every kick-off a 503 "try again later", /health "unreachable".
    with pytest.raises(ConfigurationError) as refused:
        load_settings(environ={"FHIR_AI_BROKER_URL": value})
    assert "FHIR_AI_BROKER_URL is neither 'none'" in refused.value.message
    assert f"'{value}'" not in refused.value.message           # not repeated (it might be a secret)
    assert refused.value.expression == ["broker_url"]
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache:6380/1", "REDIS://cache/2"):
        assert load_settings(environ={"FHIR_AI_BROKER_URL": url}).jobs_enabled is True


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//", "sentinel://127.0.0.1:26379/0"])
def test_a_broker_other_than_redis_is_refused_at_start(url: str) -> None:
    # Celery would take it, but the heartbeats, the debouncer and /health's queue check talk to Redis at this URL.
    with pytest.raises(ConfigurationError) as refused:
        load_settings(environ={"FHIR_AI_BROKER_URL": url})
    scheme = url.split("://")[0]
    assert f"a {scheme}:// broker is not supported" in refused.value.message and "redis://" in refused.value.message
    assert "guest" not in refused.value.message and refused.value.expression == ["broker_url"]


@pytest.mark.parametrize("setting, value", [("wards", "ward-3a"), ("subscription_secrets", "sub-1=s3cret")])
def test_what_only_batch_jobs_do_is_refused_without_them(setting: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        load_settings(environ={"FHIR_AI_BROKER_URL": "none", f"FHIR_AI_{setting.upper()}": value})
    assert f"FHIR_AI_{setting.upper()} is set but FHIR_AI_BROKER_URL is 'none'" in refused.value.message
    assert refused.value.expression == [setting, "broker_url"]
    assert getattr(load_settings(environ={f"FHIR_AI_{setting.upper()}": value}), setting) == value   # with jobs: fine


# -- /health ---------------------------------------------------------------------------------------------------

def test_health_is_healthy_without_batch_jobs_and_no_redis_is_contacted(oc: FlaskClient) -> None:
    body = oc.get("/health").json
    assert body["status"] == "ok", body
    assert body["queue"]["status"] == "disabled" and "FHIR_AI_BROKER_URL=none" in body["queue"]["message"]
    assert body["workers"] == {"status": "disabled"} and body["scheduler"] == {"status": "disabled"}
    assert body["writeBack"]["status"] == "ok" and "wards" not in body
    # what such a site serves needs no Redis either
    assessed = oc.post("/Patient/demo-005/$assess", content_type=FHIR, json={
        "resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T07:00:00Z"}]})
    assert assessed.status_code == 200, assessed.json


def test_write_backs_are_judged_as_before_without_batch_jobs(off: Flask, oc: FlaskClient) -> None:
    store = off.extensions["fhir_ai"].store
    store.save_assessment(risk_assessment("ra-off"), model_id="deterioration", model_version="1.0",
                          write_back_target="https://ehr.example.org/fhir")
    store.record_delivery(store.outbox()[0].id, ok=False, permanent=True, error="refused, HTTP 422")
    body = oc.get("/health").json
    assert body["status"] == "degraded" and body["writeBack"]["failed"] == 1
    assert body["queue"]["status"] == "disabled"


# -- what needs the queue: 501 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, named", [
    ("/Group/ward-3a/$assess", "Group/[id]/$assess"),
    ("/$assess-all", "$assess-all"),
    ("/subscriptions/notify", "the Subscription notification endpoint (/subscriptions/notify)"),
])
def test_what_needs_the_job_queue_answers_501_not_supported(off: Flask, oc: FlaskClient, path: str,
                                                            named: str) -> None:
    response = oc.post(path, headers={"Prefer": "respond-async"}, content_type=FHIR,
                       json={"resourceType": "Parameters" if "assess" in path else "Bundle"})
    # A permanent choice of this server's configuration: no Retry-After, nothing to come back for.
    assert response.status_code == 501 and "Retry-After" not in response.headers
    assert response.mimetype == FHIR and response.json["resourceType"] == "OperationOutcome"
    issue = response.json["issue"][0]
    assert (issue["severity"], issue["code"]) == ("error", "not-supported")
    assert issue["diagnostics"].startswith(f"{named} is not available on this server")
    assert "FHIR_AI_BROKER_URL=none" in issue["diagnostics"]
    assert JobStore(off.extensions["fhir_ai"].store).newest() == []            # no job started, none failed


def test_the_subscription_endpoint_says_501_before_asking_for_a_secret(oc: FlaskClient) -> None:
    response = oc.post("/subscriptions/notify", headers={"Authorization": ""}, data=b"not even JSON",
                       content_type=FHIR)
    assert response.status_code == 501 and response.json["issue"][0]["code"] == "not-supported"


def test_job_status_urls_without_batch_jobs(off: Flask, oc: FlaskClient) -> None:
    """The status URLs read the store only: a Bulk Data run (`fhir-ai bulk-export-assess`, no Redis) and ended jobs
    are answered as ever; a job started before jobs were switched off says it will not progress here."""
    jobs = JobStore(off.extensions["fhir_ai"].store)
    jobs.create("leftover", kind="group", scope="ward-3a", as_of=AS_OF, request={"request": "x"})
    jobs.create("export", kind="bulk-export", scope="all", as_of=AS_OF, request={"request": "y"})
    jobs.start("export")
    jobs.create("done", kind="group", scope="ward-3b", as_of=AS_OF, request={"request": "z"})
    jobs.set_result("done", {}, status="completed")

    leftover = oc.get("/jobs/leftover")
    assert leftover.status_code == 501 and leftover.json["issue"][0]["code"] == "not-supported"
    assert "will not progress here: DELETE cancels it" in leftover.json["issue"][0]["diagnostics"]
    assert oc.get("/jobs/export").status_code == 202                          # the run goes on
    done = oc.get("/jobs/done")
    assert done.status_code == 200 and done.json["job"] == "done" and done.json["output"] == []
    listed = oc.get("/jobs")
    assert listed.status_code == 200
    assert {j["job"] for j in listed.json["jobs"]} == {"leftover", "export", "done"}
    # the list says of the leftover what its status URL says (it was listed as plainly 'queued')
    entries = {j["job"]: j for j in listed.json["jobs"]}
    assert entries["leftover"]["error"]["status"] == 501 and "will not progress" in \
        entries["leftover"]["error"]["diagnostics"]
    assert "error" not in entries["export"] and "error" not in entries["done"]
    assert oc.delete("/jobs/leftover").status_code == 202
    assert oc.get("/jobs/leftover").status_code == 404


# -- /metadata ---------------------------------------------------------------------------------------------------

def declared(statement: dict[str, Any]) -> dict[str, Any]:
    rest = statement["rest"][0]
    return {"Group": [r for r in rest["resource"] if r["type"] == "Group"],
            "operations": sorted(o["name"] for o in rest.get("operation", [])),
            "extensions": [e["url"].rsplit("/", 1)[-1] for e in rest.get("extension", [])]}


def test_the_capability_statement_declares_no_batch_operations_without_batch_jobs(oc: FlaskClient,
                                                                                   client: FlaskClient) -> None:
    on = declared(client.get("/metadata").json)                # the suite's app: batch jobs on (default)
    assert on["Group"] and "assess-all" in on["operations"]
    assert "subscription-notification-endpoint" in on["extensions"]
    off = declared(oc.get("/metadata").json)
    assert off == {"Group": [], "operations": ["assess"], "extensions": []}    # push mode's $assess stays


# -- the worker --------------------------------------------------------------------------------------------------

def test_the_celery_worker_is_refused_and_write_back_delivery_still_runs(runner: CliRunner, no_redis: list[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(celery_app, "worker_main", lambda *a, **k: pytest.fail("a Celery worker was started"))
    env = {**runner.env, "FHIR_AI_BROKER_URL": "none"}
    refused = runner.invoke(main, ["worker"], env=env)
    assert refused.exit_code == 2, refused.output
    assert "runs no batch jobs (FHIR_AI_BROKER_URL=none)" in refused.output
    assert "fhir-ai worker --delivery-only" in refused.output and "--once" in refused.output

    once = runner.invoke(main, ["worker", "--once"], env=env)
    assert once.exit_code == 0, once.output
    loops: list[float | None] = []
    monkeypatch.setattr(Worker, "run_forever", lambda self, interval=None, **_: loops.append(interval))
    looped = runner.invoke(main, ["worker", "--delivery-only", "--interval", "5"], env=env)
    assert looped.exit_code == 0, looped.output
    assert loops == [5.0]
    assert no_redis == []


# -- with batch jobs: the scheduler is needed -----------------------------------------------------------------------

@pytest.fixture
def private_queue(settings_overrides: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Settings on a queue of their own on the machine's Redis (skipped without one); its keys removed after."""
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    queue = f"fhir-ai-test-nojobs-{uuid.uuid4().hex[:12]}"
    settings_overrides.update(broker_url="redis://127.0.0.1:6379/0", job_queue=queue)
    yield settings_overrides
    client.delete(*(heartbeat.key(load_settings(settings_overrides), role) for role in heartbeat.ROLES))
    client.close()


def test_with_batch_jobs_a_missing_scheduler_degrades_health(private_queue: dict[str, Any]) -> None:
    app = create_app(private_queue)
    settings = app.config["FHIR_AI"]
    try:
        assert heartbeat.Recorder(settings, "worker", "fhir_ai-1@here").beat()
        body = app.test_client().get("/health").json
        assert body["workers"]["status"] == "ok" and body["scheduler"]["status"] == "none seen"
        assert body["status"] == "degraded", body                 # no FHIR_AI_WARDS: degraded all the same
        assert body["scheduler"]["message"].endswith(
            ": write-back retries and withdrawals, the resumption of lost jobs and job expiry "
            "(FHIR_AI_JOB_RETENTION) do not run")
        assert heartbeat.Recorder(settings, "beat", "beat-1@here").beat()
        body = app.test_client().get("/health").json
        assert body["status"] == "ok" and body["scheduler"]["status"] == "ok"
    finally:
        app.extensions["fhir_ai"].close()


@pytest.mark.parametrize("overrides, said, unsaid", [
    ({"wards": "ward-3a"}, ["ward rescoring (FHIR_AI_WARDS)", "job expiry"], []),
    ({"job_retention": 0}, ["write-back retries", "the resumption of lost jobs"], ["job expiry", "ward"]),
])
def test_the_scheduler_message_names_what_this_sites_schedule_drives(overrides: dict[str, Any], said: list[str],
                                                                      unsaid: list[str]) -> None:
    settings = load_settings(overrides, environ={})
    message = heartbeat.section(settings, "beat", {}, time.time())["message"]
    assert all(s in message for s in said) and not any(u in message for u in unsaid), message


# -- job expiry without beat ------------------------------------------------------------------------------------

def test_the_worker_without_celery_expires_finished_jobs(off: Flask, runner: CliRunner, no_redis: list[str]) -> None:
    # Celery's beat expires finished jobs hourly; a site without it still has the job rows of its
    # `bulk-export-assess` runs, and `worker --once` / `--delivery-only` expire them instead.
    from datetime import timedelta
    jobs = JobStore(off.extensions["fhir_ai"].store)
    for n in range(3):
        jobs.create(f"export-{n}", kind="bulk-export", scope="Group/ward-a", as_of=AS_OF, request={"request": "x"})
        jobs.set_result(f"export-{n}", {"transactionTime": f"2026-11-2{n}T00:00:00Z"}, status="completed")
    env = {**runner.env, "FHIR_AI_BROKER_URL": "none", "FHIR_AI_JOB_RETENTION": "3600"}
    assert runner.invoke(main, ["worker", "--once"], env=env).exit_code == 0
    assert [jobs.get(f"export-{n}") is not None for n in range(3)] == [True, True, True]   # within the hour
    old = datetime.now(timezone.utc) - timedelta(hours=2)
    from sqlalchemy import update
    from fhir_ai.jobs.tables import JobRow
    with jobs.store.session() as session, session.begin():
        session.execute(update(JobRow).where(JobRow.id.in_(["export-0", "export-1"])).values(finished_at=old))
    once = runner.invoke(main, ["worker", "--once"], env=env)
    assert once.exit_code == 0, once.output
    # the two older exports go; the newest completed one of its scope stays (it holds the next _since)
    assert [jobs.get(f"export-{n}") is not None for n in range(3)] == [False, False, True]


def test_the_delivery_loop_runs_housekeeping_at_start_and_every_period_and_survives_its_failure(
        off: Flask) -> None:
    ticks = iter(float(t) for t in range(1000))
    worker = Worker(off.config["FHIR_AI"], off.extensions["fhir_ai"].store, clock=lambda: next(ticks))
    calls: list[int] = []
    passes = [0]

    def housekeeping() -> None:
        calls.append(passes[0])
        if len(calls) == 1:
            raise RuntimeError("database away")          # logged; the loop goes on

    def one_pass() -> Any:
        passes[0] += 1
        if passes[0] == 8:
            worker.stop()
        from fhir_ai.delivery import PassReport
        return PassReport()
    worker.run_once = one_pass                           # type: ignore[method-assign]
    worker._stop.wait = lambda _timeout=None: False      # type: ignore[method-assign]
    worker.run_forever(0.0, housekeeping=housekeeping, housekeeping_every=5.0)
    assert passes[0] == 8
    assert len(calls) >= 2 and calls[0] == 0            # at the start, and again after the period


def test_worker_once_reports_its_pass_when_job_expiry_fails(off: Flask, runner: CliRunner,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The write-backs were delivered and recorded before expiry runs: its failure (the database briefly away)
    # is logged, and the pass's report and exit status (1 only when write-backs failed) stand, as in the loop.
    def away(self: JobStore, retention: float) -> int:
        raise RuntimeError("database away")
    monkeypatch.setattr(JobStore, "expire_after", away)
    once = runner.invoke(main, ["worker", "--once"], env={**runner.env, "FHIR_AI_BROKER_URL": "none"})
    assert once.exit_code == 0, (once.output, once.exception)
    assert "claimed 0, delivered 0" in once.output
