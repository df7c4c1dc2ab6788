"""HTTP API: one blueprint per area.

Blueprints are imported when the app is built, not when ``fhir_ai.api`` is imported, so that light
helpers (``fhir_io``, used by the CLI and auth) do not pull in models, the pipeline and Celery.
"""
from __future__ import annotations

from importlib import import_module

from flask import Blueprint

MODULES = [
    "metadata", "operations", "risk_assessments", "health", "write_back",
    "cds_hooks", "push",            # EHR integration: CDS Hooks and push mode (POST /$assess)
    "provenance", "audit",          # auditors: Provenance and AuditEvent (read and search)
    "jobs", "subscriptions",        # batch jobs (async pattern) and Subscription notifications
    "mappings",                     # integrators: list, check and reload mappings
]


def blueprints() -> list[Blueprint]:
    return [import_module(f"{__name__}.{name}").bp for name in MODULES]
