"""Health checks for load balancers and operators (no patient data)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..delivery import summary
from ..pipeline import Pipeline

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    # degraded when write-backs failed for good or have waited longer than write_back_stale_after
    write_back = summary(pipeline.store, pipeline.settings)
    body = {"status": write_back["status"],
            "models": {m.model_id: m.version for m in pipeline.registry.models.values()},
            "writeBack": write_back}
    return jsonify(body), 200
