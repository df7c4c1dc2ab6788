"""What a task needs in this process: the settings and one Pipeline (made after any fork)."""
from __future__ import annotations

import os
import threading

from .. import reloads
from ..config import Settings, load_settings
from ..pipeline import Pipeline
from .state import JobStore

_lock = threading.Lock()
_state: dict[str, object] = {}


def configure(settings: Settings, pipeline: Pipeline | None = None) -> None:
    """Use these settings (and this pipeline, e.g. the web app's) for tasks run in this process."""
    with _lock:
        if _state.get("settings") is not settings or (pipeline is not None and _state.get("pipeline") is not pipeline):
            _state.update(settings=settings, pipeline=pipeline, pid=os.getpid() if pipeline else None, own=False)


def settings() -> Settings:
    with _lock:
        if _state.get("settings") is None:
            _state["settings"] = load_settings()
        return _state["settings"]  # type: ignore[return-value]


def pipeline() -> Pipeline:
    """This process's Pipeline; a forked worker child makes its own (connections do not survive a fork)."""
    current = settings()
    with _lock:
        if _state.get("pipeline") is None or _state.get("pid") != os.getpid():
            _state.update(pipeline=Pipeline.from_settings(current), pid=os.getpid(), own=True)
        found: Pipeline = _state["pipeline"]  # type: ignore[assignment]
    reloads.follower(found).follow()        # a $reload done by a web worker reaches the task workers too
    return found


def jobs() -> JobStore:
    return JobStore(pipeline().store)


def close() -> None:
    """Close the Pipeline if this module made it."""
    with _lock:
        made = _state.get("own") and _state.get("pid") == os.getpid()
        if made and _state.get("pipeline") is not None:
            _state["pipeline"].close()  # type: ignore[attr-defined]
        _state.update(pipeline=None, pid=None, own=False)
