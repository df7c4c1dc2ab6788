"""/health and the heartbeats of real `fhir-ai worker` processes (Redis at 127.0.0.1:6379, a private queue; the
store is the suite's: SQLite, or PostgreSQL with --database=postgresql). A running worker is listed; without its
beat scheduler /health says degraded (beat drives write-back retries, the resumption of lost jobs and job
expiry), with it ok; a killed worker goes stale and /health says degraded; a worker stopped with SIGTERM is
dropped at once. The staleness window is 2 s, and every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from fhir_ai.app import create_app
from fhir_ai.config import ENV_PREFIX, load_settings
from fhir_ai.jobs import heartbeat

try:
    from ..credentials import ROLE_TOKENS, bearer
    from .test_concurrency import REDIS, Processes, processes, queue, wait_for  # noqa: F401  (queue: fixture)
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]
    from test_concurrency import REDIS, Processes, processes, queue, wait_for  # type: ignore[no-redef]  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

STALE = 2.0          # seconds: workers beat every 0.5 s
NO_SLOT = 10**9      # a ward interval whose next slot does not come during the test (no ward job runs)


def worker_environment(overrides: dict[str, Any]) -> dict[str, str]:
    """The app's settings as FHIR_AI_* variables (as conftest's runner passes them), nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
                for name, value in overrides.items()})
    return env


@pytest.fixture
def watched(settings_overrides: dict[str, Any], queue: str,
            tmp_path: Path) -> Iterator[Callable[..., tuple[Flask, Processes]]]:
    """``watched(**settings)``: the API on a private queue with a 2 s staleness window, and a place to start
    workers with the same settings; everything stopped and closed after the test."""
    with ExitStack() as stack:
        def start(**extra: Any) -> tuple[Flask, Processes]:
            settings_overrides.update(broker_url=REDIS, job_queue=queue, worker_stale_after=STALE, **extra)
            app = create_app(settings_overrides)
            stack.callback(app.extensions["fhir_ai"].close)
            return app, stack.enter_context(processes(tmp_path, worker_environment(settings_overrides)))
        yield start


def health(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/health")
    assert response.status_code == 200
    return response.get_json()


def test_a_running_worker_is_listed_and_one_killed_makes_health_degraded(watched) -> None:
    app, group = watched()
    before = health(app)
    assert before["status"] == "degraded" and before["queue"]["status"] == "ok"
    assert before["workers"]["status"] == "none seen" and before["workers"]["lastHeartbeat"] is None
    assert "no Celery worker (`fhir-ai worker`)" in before["workers"]["message"]
    assert "none has recorded a heartbeat" in before["workers"]["message"]

    worker = group.start("worker", "worker", "--no-beat", "--concurrency", "1")
    up = wait_for(lambda: (b := health(app))["workers"]["status"] == "ok" and b, 120, "the worker's heartbeat", group)
    name = f"fhir_ai-{worker.pid}@{socket.gethostname()}"
    assert [w["name"] for w in up["workers"]["seen"]] == [name]
    assert up["workers"]["staleAfterSeconds"] == STALE and "message" not in up["workers"]
    # The worker runs without the scheduler (--no-beat): even without FHIR_AI_WARDS that is degraded, and said.
    assert up["scheduler"]["status"] == "none seen" and up["status"] == "degraded", up
    assert ("write-back retries and withdrawals, the resumption of lost jobs and job expiry"
            in up["scheduler"]["message"])

    group.kill(worker)                               # SIGKILL, the whole process group: no goodbye
    gone = wait_for(lambda: (b := health(app))["workers"]["status"] == "none seen" and b, 30,
                    "the heartbeat to go stale", group)
    assert gone["status"] == "degraded" and gone["workers"]["seen"] == []
    assert gone["workers"]["lastHeartbeat"] is not None
    message = gone["workers"]["message"]
    assert f"in the last {STALE:g} s" in message and f"from {name}" in message and "as it stopped" not in message


def test_with_its_beat_health_is_ok_and_a_stopped_worker_is_dropped_at_once(watched) -> None:
    app, group = watched(wards="ward-a", ward_interval=NO_SLOT)
    worker = group.start("worker-beat", "worker", "--beat", "--concurrency", "1")
    up = wait_for(lambda: (b := health(app))["workers"]["status"] == "ok" and b["scheduler"]["status"] == "ok" and b,
                  120, "the worker's and the beat's heartbeats", group)
    assert up["status"] == "ok", up
    assert [w["status"] for w in up["wards"]] == ["not started yet"]
    assert len(up["scheduler"]["seen"]) == 1 and up["scheduler"]["seen"][0]["name"].startswith("beat-")

    worker.send_signal(signal.SIGTERM)               # warm shutdown of the worker: it says it stopped
    worker.wait(timeout=60)
    stopped = health(app)["workers"]
    assert stopped["status"] == "none seen" and "as it stopped" in stopped["message"], stopped

    # The beat process goes with its worker; its heartbeat goes stale (or was recorded stopped).
    down = wait_for(lambda: (b := health(app))["scheduler"]["status"] == "none seen" and b, 30,
                    "the beat's heartbeat to go stale", group)
    assert down["status"] == "degraded"
    assert "no scheduler (`fhir-ai worker --beat`)" in down["scheduler"]["message"]
    assert "ward rescoring" in down["scheduler"]["message"]


def test_old_and_foreign_heartbeats_never_break_health(watched) -> None:
    """A process not seen for a day is forgotten when another starts beating; an entry /health cannot read
    (another version's, or garbage) is passed over, not a 500."""
    app, _ = watched()
    settings = load_settings({"broker_url": REDIS, "job_queue": app.config["FHIR_AI"].job_queue,
                              "worker_stale_after": STALE})
    client = redis.Redis.from_url(REDIS)
    try:
        long_ago = time.time() - heartbeat.KEEP_SECONDS - 60
        client.hset(heartbeat.key(settings, "worker"), mapping={
            "fhir_ai-1@gone": json.dumps({"since": long_ago, "seen": long_ago, "stopped": None}),
            "garbage": b"\xff not json", "half": json.dumps({"seen": "soon"})})
        body = health(app)
        assert body["workers"]["status"] == "none seen"
        assert "from fhir_ai-1@gone" in body["workers"]["message"]     # the last one seen, however long ago
        recorder = heartbeat.Recorder(settings, "worker", "fhir_ai-2@here")
        assert recorder.beat()
        assert sorted(client.hkeys(heartbeat.key(settings, "worker"))) == [b"fhir_ai-2@here", b"garbage", b"half"]
        assert heartbeat.Recorder(settings, "beat", "beat-2@here").beat()      # a scheduler too: nothing missing
        body = health(app)
        assert body["status"] == "ok" and [w["name"] for w in body["workers"]["seen"]] == ["fhir_ai-2@here"]
        # /health needs no token: anyone else gets the count and times, not host names, pids or the queue
        for headers in ({"Authorization": ""}, bearer(ROLE_TOKENS["ehr"]), bearer("not-a-token")):
            seen = app.test_client().get("/health", headers=headers).get_json()
            assert seen["status"] == "ok" and seen["workers"]["count"] == 1
            assert "name" not in seen["workers"]["seen"][0] and "fhir_ai-2@here" not in json.dumps(seen)
            assert app.config["FHIR_AI"].job_queue not in json.dumps(seen)
        assert recorder.beat(stopped=True)
        assert health(app)["workers"]["status"] == "none seen"
        client.set(heartbeat.key(settings, "beat"), "not a hash")        # Redis answers with an error
        body = health(app)
        assert body["status"] == "degraded" and body["workers"]["status"] == body["scheduler"]["status"] == "unknown"
        assert body["workers"]["reason"] == "ResponseError"
    finally:
        client.close()
