"""Mapping reloads that reach every worker: ``$reload`` records a generation in the store, and each
web or Celery worker process, on any machine sharing that store, follows it within
``reload_check_interval`` seconds (checked at the start of a request or task, one small query).

Each process loads the files from its own ``mappings_dir``: machines must be deployed with the same
files. A process that finds different files (another digest) or invalid ones keeps serving what it
had and says so in its log and in ``GET /mappings``.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from .mapping import Mapping
from .models.registry import ModelRegistry, check_mappings
from .store.tables import Base

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger(__name__)


class MappingReloadRow(Base):
    """One accepted ``$reload``: what was loaded (digest over every mapping and model), by whom, when."""
    __tablename__ = "mapping_reload"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64))
    loaded: Mapped[str] = mapped_column(Text)             # JSON: {model: {mapping, digest, model version}}
    requested_by: Mapped[str] = mapped_column(String(256))
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def loaded(registry: ModelRegistry) -> dict[str, dict[str, Any]]:
    """What a registry serves: each mapping's version and digest and its model's version."""
    return {model_id: {"mapping": mapping.version, "digest": mapping.digest,
                       "model": registry.models[model_id].version if model_id in registry.models else None}
            for model_id, mapping in sorted(registry.mappings.items())}


def digest_of(registry: ModelRegistry) -> str:
    return hashlib.sha256(orjson.dumps(loaded(registry), option=orjson.OPT_SORT_KEYS)).hexdigest()


def load_from_disk(pipeline: Pipeline) -> tuple[dict[str, Mapping], dict[str, list[str]]]:
    """Check the mappings on disk against their models; load them into ``pipeline`` only if all are valid."""
    found, problems = check_mappings(pipeline.settings.mappings_dir, pipeline.settings.models_dir)
    if not problems:
        pipeline.registry = ModelRegistry.load(pipeline.settings.models_dir, found)
    return found, problems


@dataclass
class _State:
    seen: int                      # the last generation this process has followed (or started after)
    next_check: float
    differs: str | None = None     # why this process does not serve the recorded generation, if so


class Follower:
    """Keeps one process's pipeline on the latest recorded generation."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.interval = max(0.0, pipeline.settings.reload_check_interval)
        self._lock = threading.Lock()
        # A process that starts now loads the files as they are now: it is already on the newest generation.
        self.state = _State(seen=self._latest_seq(), next_check=time.monotonic() + self.interval)

    def _latest(self) -> MappingReloadRow | None:
        with self.pipeline.store.session() as session:
            return session.scalar(select(MappingReloadRow).order_by(MappingReloadRow.seq.desc()).limit(1))

    def _latest_seq(self) -> int:
        row = self._latest()
        return row.seq if row else 0

    def announce(self, requested_by: str) -> int:
        """Record the generation this process has just loaded (after a successful ``$reload``)."""
        registry = self.pipeline.registry
        row = MappingReloadRow(digest=digest_of(registry), loaded=orjson.dumps(loaded(registry)).decode(),
                               requested_by=requested_by, recorded=datetime.now(timezone.utc))
        with self.pipeline.store.session() as session, session.begin():
            session.add(row)
            session.flush()
            seq = row.seq
        with self._lock:
            self.state = _State(seen=max(seq, self.state.seen), next_check=time.monotonic() + self.interval)
        return seq

    def follow(self) -> None:
        """Reload if another process recorded a newer generation (checked at most every interval)."""
        now = time.monotonic()
        if now < self.state.next_check:
            return
        with self._lock:
            if now < self.state.next_check:
                return
            self.state.next_check = now + self.interval
            latest = self._latest()
            if latest is None or latest.seq <= self.state.seen:
                return
            self.state.seen = latest.seq
            _, problems = load_from_disk(self.pipeline)
            if problems:
                self.state.differs = (f"reload {latest.seq} by {latest.requested_by} not followed: the mappings "
                                      f"here are invalid ({len(problems)} problem(s)); still serving the earlier ones")
                log.error("mappings: %s", self.state.differs)
                return
            mine = digest_of(self.pipeline.registry)
            if mine != latest.digest:
                self.state.differs = (f"reload {latest.seq} by {latest.requested_by}: the mappings or models on "
                                      "this machine differ from the ones reloaded there (another digest)")
                log.warning("mappings: %s", self.state.differs)
            else:
                self.state.differs = None
            log.info("mappings: followed reload %d: %s", latest.seq,
                     ", ".join(f"{k} {v['mapping']}" for k, v in loaded(self.pipeline.registry).items()))


_followers: weakref.WeakKeyDictionary[Any, Follower] = weakref.WeakKeyDictionary()
_followers_lock = threading.Lock()


def follower(pipeline: Pipeline) -> Follower:
    with _followers_lock:
        found = _followers.get(pipeline)
        if found is None:
            found = _followers[pipeline] = Follower(pipeline)
        return found
