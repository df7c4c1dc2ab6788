"""Health checks for load balancers and operators (no patient data)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..pipeline import Pipeline

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    pending = len(pipeline.store.outbox(status="pending"))
    failed = len(pipeline.store.outbox(status="failed"))
    body = {"status": "ok" if not failed else "degraded",
            "models": {m.model_id: m.version for m in pipeline.registry.models.values()},
            "writeBack": {"pending": pending, "failed": failed}}
    return jsonify(body), 200
