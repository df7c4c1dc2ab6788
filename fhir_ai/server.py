"""Run the Flask app under gunicorn (the development server never serves production traffic)."""
from __future__ import annotations

import gc
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        # gunicorn >= 25.1 opens a control socket at one path per user ($XDG_RUNTIME_DIR or
        # ~/.gunicorn/gunicorn.ctl) for every instance: a second fhir-ai serve on the host takes it over
        # and removes it when it stops. fhir_ai does not use it (gunicornc); none is opened.
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Flask:
        return self.application


# A request allocates ~100,000 objects (the hospital's Bundles as dicts, the features, the resources it
# builds): with the default first-generation threshold (700) that is ~140 collections per request and
# a full collection about every request. 20,000 collects the first generation ~5 times a request and
# the rest in the default proportions (a full collection every ~20 requests); the garbage is the same.
GC_THRESHOLDS = (20_000, 10, 10)


def prepare_worker_gc() -> None:
    """What each worker does to the collector once it is forked (bench/assess.py does the same)."""
    # Models and mappings were loaded before the fork; freezing them keeps the collector off them
    # (a full collection walking them pushed p99 latency from ~5 ms to ~57 ms).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _post_fork(server: Any, worker: Any) -> None:
    prepare_worker_gc()


def run_gunicorn(app: Flask, *, host: str, port: int, workers: int = 2, threads: int = 1,
                 timeout: int = 60) -> None:
    options = {"bind": f"{host}:{port}", "workers": workers, "threads": threads, "timeout": timeout,
               "preload_app": True, "post_fork": _post_fork, "accesslog": "-",
               # Access log without the query string: search parameters can carry patient ids.
               "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'}
    app.extensions["fhir_ai"].registry.warm()      # TreeSHAP tables: built once, shared by the workers
    # Collect once and freeze before forking: the loaded models stay shared copy-on-write pages
    # instead of being touched (and copied) by each worker's first collection.
    gc.collect()
    gc.freeze()
    _Gunicorn(app, options).run()
