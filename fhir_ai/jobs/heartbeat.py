"""Worker and scheduler heartbeats in Redis, so /health can say when no `fhir-ai worker` (or no beat) runs.

Each Celery worker records ``{since, seen, stopped}`` under its node name in the hash
``fhir_ai:<queue>:heartbeat:worker`` every quarter of ``worker_stale_after`` (at most every 15 s), from its
consumer's own timer: it beats only while its consumer is connected and its event loop turns, so a worker
that is wedged or cut off from the broker stops beating too. The beat scheduler records itself in
``…:heartbeat:beat`` on its ticks. Reading both is one round trip for /health, on its short timeouts.

Redis, not the store: a heartbeat is about the broker's consumers (no broker, no work), it needs no
migration, and the worker's parent process, which forks the pool, keeps out of SQLite. Times are epoch
seconds by each host's clock (as job claims are): hosts must keep their clocks in sync (NTP).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from celery import bootsteps
from celery.beat import Scheduler as CelerysScheduler

from ..config import Settings
from ..fhir import times

log = logging.getLogger(__name__)

ROLES = ("worker", "beat")
# Heartbeats older than this are dropped when a process starts beating (and the whole hash expires this
# long after the last one): /health keeps "the last heartbeat" of a site whose workers are all gone for a day.
KEEP_SECONDS = 86400
# Recording one must never hold up the consumer's event loop or beat for long.
TIMEOUT = 1.0


def interval(settings: Settings) -> float:
    """Seconds between two heartbeats of one process: four fit in the staleness window, so one lost beat
    (a slow broker, a long timer round) never makes a live worker look gone."""
    return min(15.0, max(0.25, settings.worker_stale_after / 4))


def key(settings: Settings, role: str) -> str:
    return f"fhir_ai:{settings.job_queue}:heartbeat:{role}"


class Recorder:
    """One process's heartbeat: its name, when it started beating, and each beat. Never raises: a heartbeat
    that cannot be recorded is logged (once per outage) and the worker goes on."""

    def __init__(self, settings: Settings, role: str, name: str) -> None:
        self.settings, self.role, self.name = settings, role, name
        self.since: float | None = None
        self._client: redis.Redis | None = None
        self._pid = 0
        self._failing = False
        self._pruned = False

    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():     # a forked beat process makes its own
            self._client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=TIMEOUT,
                                                socket_connect_timeout=TIMEOUT)
            self._pid = os.getpid()
        return self._client

    def beat(self, *, stopped: bool = False) -> bool:
        now = time.time()
        if self.since is None:
            self.since = now
        try:
            client = self.client()
            if not self._pruned:
                self._prune(client, now)
                self._pruned = True
            value = json.dumps({"since": self.since, "seen": now, "stopped": now if stopped else None})
            pipe = client.pipeline(transaction=False)
            pipe.hset(key(self.settings, self.role), self.name, value)
            pipe.expire(key(self.settings, self.role), KEEP_SECONDS)
            pipe.execute()
        except (redis.RedisError, OSError, ValueError) as exc:     # ValueError: not a redis:// URL
            if not self._failing:
                log.warning("could not record the %s heartbeat of %s (%s); /health will not count it until it can",
                            self.role, self.name, type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("the %s heartbeat of %s is recorded again", self.role, self.name)
        self._failing = False
        return True

    def _prune(self, client: redis.Redis, now: float) -> None:
        """Forget processes not seen for KEEP_SECONDS (each start of a worker adds a name: pid@host)."""
        hash_key = key(self.settings, self.role)
        old = [name for name, entry in _entries(client.hgetall(hash_key)).items()
               if now - entry.seen > KEEP_SECONDS]
        if old:
            client.hdel(hash_key, *old)


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Consumer bootstep: beats on the consumer's timer from the moment it is connected. A reconnect
    stops and starts it again; the worker's shutdown records it stopped, so /health drops it at once."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.recorder: Recorder | None = None
        self.tref: Any = None

    def start(self, c: Any) -> None:
        from . import runtime          # runtime imports the pipeline: not at import time of the Celery app
        settings = runtime.settings()
        if self.recorder is None:
            self.recorder = Recorder(settings, "worker", c.hostname)
        self.recorder.beat()
        self.tref = c.timer.call_repeatedly(interval(settings), self.recorder.beat)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            c.timer.cancel(self.tref)
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.recorder is not None:
            self.recorder.beat(stopped=True)


class Scheduler(CelerysScheduler):
    """Celery's in-memory scheduler, beating on its ticks (beat_max_loop_interval is the heartbeat interval,
    so it ticks often enough): a beat process whose loop is stuck stops beating."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorder: Recorder | None = None
        self._next_beat = 0.0

    def _beat(self, *, stopped: bool = False) -> None:
        from . import runtime
        settings = runtime.settings()
        if self._recorder is None:
            self._recorder = Recorder(settings, "beat", f"beat-{os.getpid()}@{socket.gethostname()}")
        if stopped or time.monotonic() >= self._next_beat:
            self._recorder.beat(stopped=stopped)
            self._next_beat = time.monotonic() + interval(settings)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay = super().tick(*args, **kwargs)
        try:
            self._beat()
        except Exception:           # the schedule matters more than being seen: never stop beat over it
            log.exception("could not record the beat heartbeat")
        return delay

    def close(self) -> None:
        super().close()
        if self._recorder is not None:
            self._beat(stopped=True)


@dataclass(frozen=True)
class Entry:
    name: str
    since: float
    seen: float
    stopped: float | None


def _entries(raw: dict[bytes, bytes]) -> dict[str, Entry]:
    out = {}
    for raw_name, value in raw.items():
        name = raw_name.decode("utf-8", "replace")
        try:
            fields = json.loads(value)
            stopped = fields.get("stopped")
            out[name] = Entry(name, float(fields["since"]), float(fields["seen"]),
                              None if stopped is None else float(stopped))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue                      # not ours, or written by another version: never a 500 on /health
    return out


def _instant(epoch: float) -> str:
    return times.format_datetime(datetime.fromtimestamp(epoch, timezone.utc).replace(microsecond=0))


# Who is missing (said in /health's message) and, for a worker, what waits meanwhile.
_WHO = {"worker": "no Celery worker (`fhir-ai worker`)", "beat": "no scheduler (`fhir-ai worker --beat`)"}
_WORKER_MISSING = "batch jobs, Subscription rescoring and scheduled tasks wait until one runs"
# What each entry of the beat schedule (celery_app.schedule) does, in /health's words.
SCHEDULED = {"deliver-write-backs": "write-back retries and withdrawals",
             "resume-jobs": "the resumption of lost jobs",
             "expire-jobs": "job expiry (FHIR_AI_JOB_RETENTION)",
             "rescore-wards": "ward rescoring (FHIR_AI_WARDS)"}


def _missing(settings: Settings, role: str) -> str:
    """What stops while nobody of this role runs: for the scheduler, each task of this site's beat schedule."""
    if role == "worker":
        return _WORKER_MISSING
    from .celery_app import schedule     # celery_app imports this module
    stopped = [SCHEDULED[name] for name in schedule(settings)]
    return (", ".join(stopped[:-1]) + " and " + stopped[-1] if len(stopped) > 1 else stopped[0]) + " do not run"


def section(settings: Settings, role: str, raw: dict[bytes, bytes], now: float, *,
            names: bool = True) -> dict[str, Any]:
    """/health's view of one role: who was seen within ``worker_stale_after`` seconds, the newest heartbeat
    of any (a stopped or silent one too), and when none was seen, what that means. Without ``names`` (a caller
    who is not an operator) the processes are counted, not named: no host names, pids or queue name."""
    window = settings.worker_stale_after
    entries = sorted(_entries(raw).values(), key=lambda e: e.name)
    alive = [e for e in entries if e.stopped is None and now - e.seen <= window]
    newest = max(entries, key=lambda e: e.seen, default=None)
    out: dict[str, Any] = {
        "status": "ok" if alive else "none seen", "staleAfterSeconds": window,
        "seen": [{"name": e.name, "lastHeartbeat": _instant(e.seen), "since": _instant(e.since)} for e in alive],
        "count": len(alive), "lastHeartbeat": _instant(newest.seen) if newest else None}
    if not names:
        out["seen"] = [{k: v for k, v in entry.items() if k != "name"} for entry in out["seen"]]
    if not alive:
        who, what = _WHO[role], _missing(settings, role)
        if newest is None:
            last = "none has recorded a heartbeat"
        else:
            last = (f"the last heartbeat was at {_instant(newest.seen)}"
                    + (f", from {newest.name}" if names else "")
                    + (" as it stopped" if newest.stopped is not None else ""))
        queue = f" on queue {settings.job_queue!r}" if names else ""
        out["message"] = f"{who}{queue} has been seen in the last {window:g} s ({last}): {what}"
    return out


def read(client: redis.Redis, settings: Settings, now: float | None = None, *,
         names: bool = True) -> dict[str, dict[str, Any]]:
    """Both roles' sections in one round trip (raises redis.RedisError / OSError when Redis does not answer)."""
    pipe = client.pipeline(transaction=False)
    for role in ROLES:
        pipe.hgetall(key(settings, role))
    found = pipe.execute()
    now = time.time() if now is None else now
    return {role: section(settings, role, raw, now, names=names) for role, raw in zip(ROLES, found)}
