"""GET /write-back: pending and failed deliveries to the hospital's server (ids only, no values)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..auth.policy import requires
from ..delivery import summary
from ..pipeline import Pipeline

bp = Blueprint("write_back", __name__)


@bp.get("/write-back")
@requires("WriteBack", "s", audit="search-type")
def write_back_status():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    return jsonify(summary(pipeline.store, pipeline.settings, detail=True)), 200
