"""Job state in the store: create, expand into patients, record each patient, finish, cancel."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from sqlalchemy import case, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..store import Store, actors
from .tables import JobItemRow, JobRow

log = logging.getLogger(__name__)

FINAL = frozenset({"completed", "failed", "cancelled"})


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass
class JobView:
    """A job as the API and the tasks see it (no ORM objects leave this module)."""
    id: str
    kind: str
    scope: str
    status: str
    request: dict[str, Any]
    as_of: datetime
    total: int | None
    requested_by: str
    requested_role: str
    created_at: datetime
    finished_at: datetime | None
    error: str | None = None
    error_status: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)   # items by status

    @property
    def done(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "pending")


@dataclass
class ItemView:
    patient_id: str
    status: str
    assessments: list[Any]     # {"reference", "status"} each; jobs recorded before: reference strings
    error: str | None


class JobStore:
    """Job rows on the store's database; every call is one short transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- creating ------------------------------------------------------------------------------
    def create(self, job_id: str, *, kind: str, scope: str, as_of: datetime, request: dict[str, Any],
               requested_by: str | None = None, requested_role: str | None = None) -> bool:
        """Insert a queued job; False if a job with this id exists (scheduled runs use fixed ids)."""
        now = _utcnow()
        requested_by = requested_by or actors.LOCAL.client_id
        requested_role = requested_role or actors.LOCAL.role
        row = JobRow(id=job_id, kind=kind, scope=scope, status="queued", request=orjson.dumps(request).decode(),
                     as_of=as_of, requested_by=requested_by[:256], requested_role=requested_role[:64],
                     created_at=now, updated_at=now)
        with self.store.session() as session:
            try:
                with session.begin():
                    session.add(row)
            except IntegrityError:
                return False
        return True

    def expand(self, job_id: str, patient_ids: list[str]) -> bool:
        """Record the job's patients once (a repeat after a crash keeps the first list). True if new."""
        now = _utcnow()
        unique = list(dict.fromkeys(patient_ids))
        with self.store.session() as session:
            try:
                with session.begin():
                    # The WHERE makes the first expansion win when a restarted task races the old one.
                    result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.total.is_(None))
                                             .values(total=len(unique), updated_at=now))
                    if result.rowcount != 1:
                        return False
                    # Core INSERTs in slices, not an ORM object per patient: a province-wide job of 100,000
                    # patients stays small in memory (one transaction all the same: the list is all or nothing).
                    for start in range(0, len(unique), 5000):
                        session.execute(insert(JobItemRow), [
                            {"job_id": job_id, "patient_id": p, "status": "pending", "updated_at": now}
                            for p in unique[start:start + 5000]])
            except IntegrityError:
                return False
        return True

    # -- progress -------------------------------------------------------------------------------
    def start(self, job_id: str) -> bool:
        """queued → running; True if the job is (now) running."""
        with self.store.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                            .values(status="running", updated_at=_utcnow()))
            return session.scalar(select(JobRow.status).where(JobRow.id == job_id)) == "running"

    def claim(self, job_id: str, patient_id: str, *, lease: float, holder: str) -> int | None:
        """Take a pending patient for ``lease`` seconds before assessing it (``holder``: this execution of
        the task, unique): how many claims on it were abandoned before (their holders stopped before
        recording an outcome: 0 the first time), or None when it is not to be assessed here (done, or held
        by a claim that has not run out: another copy of the chunk may be assessing it right now)."""
        now = _utcnow()
        free = (JobItemRow.claimed_until.is_(None)) | (JobItemRow.claimed_until < now)
        abandoned = case((JobItemRow.claimed_until.is_(None), 0), else_=1)
        with self.store.session() as session, session.begin():
            result = session.execute(update(JobItemRow)
                                     .where(JobItemRow.job_id == job_id, JobItemRow.patient_id == patient_id,
                                            JobItemRow.status == "pending", free)
                                     .values(attempts=JobItemRow.attempts + abandoned, updated_at=now,
                                             claimed_by=holder[:64], claimed_until=now + timedelta(seconds=lease)))
            if result.rowcount != 1:
                return None
            return session.scalar(select(JobItemRow.attempts).where(JobItemRow.job_id == job_id,
                                                                     JobItemRow.patient_id == patient_id))

    def release(self, job_id: str, patient_id: str, holder: str) -> None:
        """Let go of a claim without an outcome, not as an abandoned one (the database was away: the task
        is tried again); nothing if the claim is no longer ``holder``'s."""
        with self.store.session() as session, session.begin():
            session.execute(update(JobItemRow)
                            .where(JobItemRow.job_id == job_id, JobItemRow.patient_id == patient_id,
                                   JobItemRow.status == "pending", JobItemRow.claimed_by == holder[:64])
                            .values(claimed_until=None, claimed_by=None))

    def held(self, job_id: str, patient_ids: list[str]) -> tuple[datetime, list[str]]:
        """Those of ``patient_ids`` still pending, and when the last of their claims runs out (now if none is
        held any more)."""
        now = _utcnow()
        if not patient_ids:
            return now, []
        with self.store.session() as session:
            rows = session.execute(select(JobItemRow.patient_id, JobItemRow.claimed_until)
                                   .where(JobItemRow.job_id == job_id, JobItemRow.patient_id.in_(patient_ids),
                                          JobItemRow.status == "pending")
                                   .order_by(JobItemRow.patient_id)).all()
        return max([now, *(_utc(until) for _, until in rows if until is not None)]), [str(p) for p, _ in rows]

    def record(self, job_id: str, patient_id: str, status: str, assessments: list[Any] | None = None,
               error: str | None = None) -> bool:
        """A pending patient's outcome (its claim let go); False, changing nothing, when the patient already
        has one (a copy of the chunk that ran past its claim does not overwrite the first outcome)."""
        with self.store.session() as session, session.begin():
            result = session.execute(update(JobItemRow)
                                     .where(JobItemRow.job_id == job_id, JobItemRow.patient_id == patient_id,
                                            JobItemRow.status == "pending")
                                     .values(status=status, error=(error or None) and error[:2000],
                                             updated_at=_utcnow(), claimed_until=None, claimed_by=None,
                                             assessments=orjson.dumps(assessments or []).decode()))
            return result.rowcount == 1

    def stalled(self, silent_since: datetime, *, limit: int = 100) -> list[tuple[str, bool, list[str]]]:
        """Queued or running jobs of patients (group, all, ward) with no sign of progress since ``silent_since`` (no
        patient claimed or recorded; the job row not touched): (job id, whether its patients are known,
        its pending patients no worker holds). Their tasks were lost (a Redis restart, a task that gave up)."""
        now = _utcnow()
        last_item = (select(func.max(JobItemRow.updated_at)).where(JobItemRow.job_id == JobRow.id)
                     .correlate(JobRow).scalar_subquery())
        quiet = (JobRow.updated_at < silent_since) & ((last_item.is_(None)) | (last_item < silent_since))
        out = []
        with self.store.session() as session:
            rows = list(session.execute(select(JobRow.id, JobRow.total)
                                        .where(JobRow.status.in_(("queued", "running")),
                                               JobRow.kind.in_(("group", "all", "ward")), quiet)
                                        .order_by(JobRow.created_at).limit(max(1, limit))))
            for job_id, total in rows:
                free = (JobItemRow.claimed_until.is_(None)) | (JobItemRow.claimed_until < now)
                waiting = list(session.scalars(select(JobItemRow.patient_id)
                                               .where(JobItemRow.job_id == job_id, JobItemRow.status == "pending",
                                                      free).order_by(JobItemRow.patient_id)))
                out.append((str(job_id), total is not None, waiting))
        return out

    def touch(self, job_id: str) -> None:
        """Mark a job as just resumed (its silence starts again)."""
        with self.store.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.not_in(FINAL))
                            .values(updated_at=_utcnow()))

    def finish_if_done(self, job_id: str) -> bool:
        """running → completed once no patient is pending (of two racing tasks, one does it)."""
        pending = exists().where(JobItemRow.job_id == job_id, JobItemRow.status == "pending")
        now = _utcnow()
        with self.store.session() as session, session.begin():
            result = session.execute(update(JobRow)
                                     .where(JobRow.id == job_id, JobRow.status == "running",
                                            JobRow.total.is_not(None), ~pending)
                                     .values(status="completed", finished_at=now, updated_at=now))
            done = result.rowcount == 1
        if done:
            log.info("job %s completed", job_id)
        return done

    def fail(self, job_id: str, message: str, status: int = 500) -> None:
        now = _utcnow()
        with self.store.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.not_in(FINAL))
                            .values(status="failed", error=message[:2000], error_status=status,
                                    finished_at=now, updated_at=now))
            row = session.get(JobRow, job_id)
        # What failed, by its kind and Group (a ward's id is no patient data); the reason, which may quote the
        # hospital server's words, is on the job's status URL.
        log.warning("job %s (%s %s) failed (%s)", job_id, row.kind if row else "?", row.scope if row else "?",
                    status)

    def cancel(self, job_id: str) -> bool:
        """Cancel (or forget a finished job): the status URL answers 404 afterwards. False if unknown."""
        now = _utcnow()
        with self.store.session() as session, session.begin():
            row = session.get(JobRow, job_id)
            if row is None or row.status == "cancelled":
                return False
            row.status, row.updated_at = "cancelled", now
            row.finished_at = row.finished_at or now
        return True

    def set_result(self, job_id: str, result: dict[str, Any], status: str | None = None) -> bool:
        """Replace the result of a job that has not ended (and end it with ``status``); False if it had
        ended (e.g. failed by a run that took it over: it does not come back as completed)."""
        now = _utcnow()
        values: dict[str, Any] = {"result": orjson.dumps(result).decode(), "updated_at": now}
        if status:
            values.update(status=status, finished_at=now)
        with self.store.session() as session, session.begin():
            changed = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.not_in(FINAL))
                                      .values(**values))
            return changed.rowcount == 1

    def heartbeat(self, job_id: str) -> bool:
        """A running job's sign of life (its updated_at now); False if it is no longer running."""
        with self.store.session() as session, session.begin():
            result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
                                     .values(updated_at=_utcnow()))
            return result.rowcount == 1

    def take_over(self, job_id: str, *, silent_since: datetime, message: str) -> bool:
        """Fail a running job not heard from (updated_at) since ``silent_since``, so that the caller may
        carry on its work; True for exactly one caller, and never for a job whose run is alive."""
        now = _utcnow()
        with self.store.session() as session, session.begin():
            result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running",
                                                          JobRow.updated_at < silent_since)
                                     .values(status="failed", error=message[:2000], error_status=500,
                                             finished_at=now, updated_at=now))
            claimed = result.rowcount == 1
        if claimed:
            log.warning("job %s taken over (its run stopped)", job_id)
        return claimed

    def expire_after(self, retention: float) -> int:
        """``expire`` jobs that finished more than ``retention`` seconds ago (nothing when it is 0: forever)."""
        if retention <= 0:
            return 0
        return self.expire(datetime.now(timezone.utc) - timedelta(seconds=retention))

    def expire(self, finished_before: datetime) -> int:
        """Forget jobs that ended before ``finished_before`` (their status URLs answer 404 afterwards).

        The newest completed job of each kind and scope stays: a Bulk Data export's next ``_since``
        comes from it. The assessments a job stored are never touched (they and their audit trail
        stay); only the job's progress and manifest go.
        """
        newest = (select(JobRow.kind, JobRow.scope, func.max(JobRow.created_at).label("created_at"))
                  .where(JobRow.status == "completed").group_by(JobRow.kind, JobRow.scope).subquery())
        keep = select(JobRow.id).join(newest, (JobRow.kind == newest.c.kind) & (JobRow.scope == newest.c.scope)
                                      & (JobRow.created_at == newest.c.created_at)).where(JobRow.status == "completed")
        old = select(JobRow.id).where(JobRow.status.in_(FINAL), JobRow.finished_at < finished_before,
                                      JobRow.id.not_in(keep))
        with self.store.session() as session, session.begin():
            ids = list(session.scalars(old))
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                session.execute(delete(JobItemRow).where(JobItemRow.job_id.in_(batch)))
                session.execute(delete(JobRow).where(JobRow.id.in_(batch)))
        if ids:
            log.info("expired %d finished job(s)", len(ids))
        return len(ids)

    # -- reading --------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobView | None:
        with self.store.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return None
            counts = dict(session.execute(select(JobItemRow.status, func.count())
                                          .where(JobItemRow.job_id == job_id).group_by(JobItemRow.status)).all())
            return _view(row, {str(k): int(v) for k, v in counts.items()})

    def newest(self, *, requested_by: str | list[str] | None = None, limit: int = 100,
               after: tuple[datetime, str] | None = None) -> list[JobView]:
        """Jobs newest first, each with its patients counted by status; cancelled ones are gone (as at
        their status URLs). Only ``requested_by``'s (any of them, a list) when given; ``after``
        (created_at, id of the last job of a page) continues where that page ended."""
        query = select(JobRow).where(JobRow.status != "cancelled")
        if requested_by is not None:
            query = query.where(JobRow.requested_by.in_([requested_by] if isinstance(requested_by, str)
                                                        else requested_by))
        if after is not None:
            created, last_id = after
            query = query.where((JobRow.created_at < created)
                                | ((JobRow.created_at == created) & (JobRow.id < last_id)))
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(max(1, limit))
        with self.store.session() as session:
            rows = list(session.scalars(query))
            counts: dict[str, dict[str, int]] = {row.id: {} for row in rows}
            if rows:
                for job_id, status, n in session.execute(
                        select(JobItemRow.job_id, JobItemRow.status, func.count())
                        .where(JobItemRow.job_id.in_(list(counts))).group_by(JobItemRow.job_id, JobItemRow.status)):
                    counts[str(job_id)][str(status)] = int(n)
            return [_view(row, counts[row.id]) for row in rows]

    def status(self, job_id: str) -> str | None:
        with self.store.session() as session:
            return session.scalar(select(JobRow.status).where(JobRow.id == job_id))

    def items(self, job_id: str, status: str | None = None) -> list[ItemView]:
        query = select(JobItemRow).where(JobItemRow.job_id == job_id).order_by(JobItemRow.patient_id)
        if status:
            query = query.where(JobItemRow.status == status)
        with self.store.session() as session:
            return [ItemView(r.patient_id, r.status, orjson.loads(r.assessments) if r.assessments else [], r.error)
                    for r in session.scalars(query)]

    def pending(self, job_id: str) -> list[str]:
        return [item.patient_id for item in self.items(job_id, "pending")]

    def item_status(self, job_id: str, patient_id: str) -> str | None:
        with self.store.session() as session:
            return session.scalar(select(JobItemRow.status).where(JobItemRow.job_id == job_id,
                                                                  JobItemRow.patient_id == patient_id))

    def every(self, kind: str, scope: str, status: str, *, limit: int = 100) -> list[JobView]:
        """The jobs of this kind and scope in ``status``, newest first (``limit`` at most)."""
        with self.store.session() as session:
            rows = session.scalars(select(JobRow).where(JobRow.kind == kind, JobRow.scope == scope,
                                                        JobRow.status == status)
                                   .order_by(JobRow.created_at.desc()).limit(max(1, limit)))
            return [_view(row, {}) for row in rows]

    def last(self, kind: str, scope: str, status: str = "completed") -> JobView | None:
        """The newest job of this kind and scope in ``status`` (e.g. the last export, for _since)."""
        return next(iter(self.every(kind, scope, status, limit=1)), None)


def _view(row: JobRow, counts: dict[str, int]) -> JobView:
    return JobView(id=row.id, kind=row.kind, scope=row.scope, status=row.status, request=orjson.loads(row.request),
                   as_of=_utc(row.as_of), total=row.total, requested_by=row.requested_by,  # type: ignore[arg-type]
                   requested_role=row.requested_role, created_at=_utc(row.created_at),  # type: ignore[arg-type]
                   finished_at=_utc(row.finished_at), error=row.error, error_status=row.error_status,
                   result=orjson.loads(row.result) if row.result else {}, counts=counts)
