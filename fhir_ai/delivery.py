"""The write-back worker: delivers the outbox with backoff, Retry-After and a circuit per server."""
from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .config import Settings
from .errors import FhirAiError, UpstreamError
from .fhir import smart
from .fhir.client import FhirClient
from .fhir.times import format_datetime
from .store import Store

log = logging.getLogger(__name__)

# A row stored by a request is delivered by that request; the worker waits this long before
# treating an untried row as abandoned (the process died between storing and sending).
FRESH_GRACE = 30.0


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def backoff_delay(attempts: int, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before attempt ``attempts + 1``: exponential with "equal jitter" — between half
    and all of min(cap, base * 2**(attempts-1)), so workers that failed together spread out but
    never retry at once."""
    ceiling = min(cap, base * 2 ** max(0, attempts - 1))
    return ceiling / 2 + rand() * ceiling / 2


class Circuit:
    """One upstream server's breaker: closed → open after ``threshold`` failures in a row →
    half-open after ``cooldown`` (one trial delivery) → closed on success, open again on failure."""

    def __init__(self, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.open_until = 0.0
        self._trial = False

    def allow(self) -> bool:
        """May a delivery go out now? In half-open, only one trial at a time."""
        if self.state == "open" and self._clock() >= self.open_until:
            self.state, self._trial = "half-open", False
        if self.state == "closed":
            return True
        if self.state == "half-open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        if self.state != "closed":
            log.info("circuit closed again")
        self.state, self.failures, self._trial = "closed", 0, False

    def failure(self, hold: float | None = None) -> None:
        """A temporary failure; ``hold`` (Retry-After) keeps the circuit open at least that long."""
        self.failures += 1
        trip = self.state == "half-open" or self.failures >= self.threshold
        if trip or hold:
            if self.state != "open":
                log.warning("circuit open after %d failure(s) in a row", self.failures)
            self.state, self._trial = "open", False
            self.open_until = self._clock() + max(self.cooldown if trip else 0.0, hold or 0.0)

    def seconds_until_trial(self) -> float:
        return max(0.0, self.open_until - self._clock()) if self.state == "open" else 0.0


@dataclass
class PassReport:
    """What one pass of the worker did."""
    claimed: int = 0
    delivered: int = 0
    retry_later: int = 0
    failed: int = 0
    deferred: int = 0            # not tried: the server's circuit was open
    lost: int = 0                # not tried: the claim ran out and another worker took the row
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"claimed {self.claimed}, delivered {self.delivered}, retry later "
                f"{self.retry_later}, failed {self.failed}, deferred (circuit open) {self.deferred}"
                + (f", left to another worker {self.lost}" if self.lost else ""))


def run_housekeeping(housekeeping: Callable[[], Any]) -> None:
    """Run what beat would (job expiry) beside write-back delivery; a failure is logged, never raised: delivery
    and its report are about write-backs, and the next round tries again."""
    try:
        housekeeping()
    except Exception:
        log.exception("housekeeping failed (job expiry, FHIR_AI_JOB_RETENTION); the next round tries again")


class Worker:
    """Delivers pending write-backs; safe to run several at once (rows are claimed first)."""

    def __init__(self, settings: Settings, store: Store, *,
                 client_factory: Callable[[str], FhirClient] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.store = store
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._client_factory = client_factory or self._make_client
        self._clients: dict[str, FhirClient] = {}
        self._circuits: dict[str, Circuit] = {}
        self._clock, self._now, self._rand = clock, now, rand
        # Long enough for one PUT with its timeout; a crashed worker's claim runs out after this.
        self.lease = max(60.0, 3 * settings.source_timeout)
        self._stop = threading.Event()

    def circuit(self, target: str) -> Circuit:
        if target not in self._circuits:
            self._circuits[target] = Circuit(self.settings.circuit_failures,
                                             self.settings.circuit_cooldown, self._clock)
        return self._circuits[target]

    def circuits(self) -> dict[str, str]:
        return {target: c.state for target, c in self._circuits.items()}

    # -- one pass ----------------------------------------------------------------------------------

    def run_once(self) -> PassReport:
        """Claim what is due and try each row once."""
        from .pipeline import outbound  # the pipeline imports the models; load it only when used
        report = PassReport()
        rows = self.store.claim_write_backs(self.id, lease=self.lease, limit=self.settings.worker_batch,
                                            min_age=FRESH_GRACE, now=self._now())
        report.claimed = len(rows)
        for row in rows:
            circuit = self.circuit(row.target)
            if circuit.seconds_until_trial() > 0:
                # open and its trial not due (allow() would refuse and change nothing): deferred
                # without reading the resource or renewing the claim, during an outage every pass.
                self._defer(row, circuit.seconds_until_trial(), report)
                continue
            # Checked before the circuit: a half-open circuit's one trial must go to a request
            # whose answer reports back (success/failure), or it stays "under way" for good.
            resource = self.store.get_assessment(row.resource_id)
            if resource is None or row.resource_type != "RiskAssessment":
                self.store.record_delivery(row.id, ok=False, permanent=True, worker=self.id,
                                           error="the stored resource to write back is missing")
                report.failed += 1
                continue
            body = outbound(resource)
            # The lease began when the whole batch was claimed, and the rows before this one may have
            # taken long (a slow server): renew it now, or leave the row if another worker took it since.
            if not self.store.renew_claim(row.id, self.id, lease=self.lease, now=self._now()):
                report.lost += 1
                continue
            if not circuit.allow():
                # open: until its trial; half-open with the trial under way: shortly after
                self._defer(row, circuit.seconds_until_trial() or min(1.0, circuit.cooldown), report)
                continue
            self._deliver(row, body, circuit, report)
        if rows:
            log.info("write-back pass: %s", report)
        return report

    def _defer(self, row: Any, wait: float, report: PassReport) -> None:
        self.store.defer_write_back(row.id, self._now() + timedelta(seconds=wait), worker=self.id)
        report.deferred += 1

    def _deliver(self, row: Any, resource: dict[str, Any], circuit: Circuit,
                 report: PassReport) -> None:
        try:
            self._client(row.target).put(resource)   # PUT by deterministic id: never a duplicate
        except UpstreamError as exc:
            if not exc.temporary:
                self._fail(row, exc.message, report)
                return
            circuit.failure(hold=exc.retry_after)
            delay = backoff_delay(row.attempts + 1, self.settings.write_back_backoff,
                                  self.settings.write_back_backoff_cap, self._rand)
            if exc.retry_after is not None:  # the server said when: never earlier than that
                delay = max(delay, exc.retry_after)
            retry_at = self._now() + timedelta(seconds=delay)
            self.store.record_delivery(row.id, ok=False, error=exc.message, retry_at=retry_at, worker=self.id)
            log.warning("write-back of %s/%s: %s; next try in %.0f s (circuit %s)",
                        row.resource_type, row.resource_id, exc.upstream_status or "no answer",
                        delay, circuit.state)
            report.retry_later += 1
            report.errors.append(exc.message)
        except FhirAiError as exc:     # e.g. the server says 404/400: retrying will not help
            circuit.success()          # it answered, so it is up
            self._fail(row, exc.message, report)
        else:
            circuit.success()
            self.store.record_delivery(row.id, ok=True, worker=self.id)
            report.delivered += 1

    def _fail(self, row: Any, message: str, report: PassReport) -> None:
        self.store.record_delivery(row.id, ok=False, error=message, permanent=True, worker=self.id)
        log.error("write-back of %s/%s refused; marked failed (needs attention)",
                  row.resource_type, row.resource_id)
        report.failed += 1
        report.errors.append(message)

    # -- running -----------------------------------------------------------------------------------

    def run_forever(self, interval: float | None = None, *, housekeeping: Callable[[], Any] | None = None,
                    housekeeping_every: float = 3600.0) -> None:
        """Passes every ``interval`` seconds until stop() (or SIGTERM via the CLI); ``housekeeping`` (what
        beat would run hourly for a site without it: job expiry) at the start and every ``housekeeping_every``."""
        interval = self.settings.worker_interval if interval is None else interval
        log.info("write-back worker %s started (every %.0f s)", self.id, interval)
        next_housekeeping = self._clock()
        while not self._stop.is_set():
            if housekeeping is not None and self._clock() >= next_housekeeping:
                next_housekeeping = self._clock() + housekeeping_every
                run_housekeeping(housekeeping)
            try:
                report = self.run_once()
            except FhirAiError as exc:  # e.g. the database is briefly unavailable: try next pass
                log.error("write-back pass failed: %s", exc.message)
                report = PassReport()
            # A full batch means more is waiting: go again at once.
            if report.claimed < self.settings.worker_batch:
                self._stop.wait(interval)
        log.info("write-back worker %s stopped", self.id)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def _client(self, target: str) -> FhirClient:
        if target not in self._clients:
            self._clients[target] = self._client_factory(target)
        return self._clients[target]

    def _make_client(self, target: str) -> FhirClient:
        """One attempt per pass (retries=0): the worker's backoff spaces the retries instead."""
        s = self.settings
        ours = target.rstrip("/") == s.source_url.rstrip("/")
        if not ours:  # credentials belong to the configured server only
            log.warning("write-back target %s is not the configured source; sending without "
                        "credentials", target)
        return FhirClient(target, token=s.source_token if ours else None, timeout=s.source_timeout,
                          retries=0, auth=smart.auth_from_settings(s, target) if ours else None)


def summary(store: Store, settings: Settings, now: datetime | None = None,
            detail: bool = False) -> dict[str, Any]:
    """Pending and failed write-backs, the oldest pending age, and ok/degraded for /health."""
    now = now or datetime.now(timezone.utc)
    pending, failed = store.outbox(status="pending"), store.outbox(status="failed")
    ages = [(now - _utc(row.created_at)).total_seconds() for row in pending]  # type: ignore[operator]
    stale = sum(1 for age in ages if age > settings.write_back_stale_after)
    body: dict[str, Any] = {
        "status": "degraded" if failed or stale else "ok",
        "pending": len(pending), "failed": len(failed), "stalePending": stale,
        "oldestPendingSeconds": round(max(ages)) if ages else None,
        "staleAfterSeconds": settings.write_back_stale_after,
    }
    if detail:
        body["entries"] = [_entry(row) for row in pending + failed]
    return body


_SERVER_STATUS = re.compile(r"HTTP \d{3}")


def shown_error(error: str | None) -> str | None:
    """An outbox row's error as /write-back shows it: up to the hospital server's status ('... HTTP 422'),
    not the words that follow (its OperationOutcome may name the patient: the row and the log keep ids)."""
    if not error:
        return error
    status = _SERVER_STATUS.search(error)
    if status is None or not error[status.end():].strip(" :"):
        return error
    return error[:status.end()] + " (the server's words are in the outbox row)"


def _entry(row: Any) -> dict[str, Any]:
    next_at, created = _utc(row.next_attempt_at), _utc(row.created_at)
    return {"resource": f"{row.resource_type}/{row.resource_id}", "target": row.target,
            "status": row.status, "attempts": row.attempts, "lastError": shown_error(row.last_error),
            "created": format_datetime(created) if created else None,
            "nextAttempt": format_datetime(next_at) if next_at else None}
