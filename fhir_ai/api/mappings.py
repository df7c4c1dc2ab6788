"""Integrators: list, check and reload the mapping files (and the models they feed) of this server."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify

from ..auth.policy import requires
from .. import reloads
from ..models.registry import check_mappings
from ..pipeline import Pipeline
from ..store import actors
from .fhir_io import fhir_response

log = logging.getLogger(__name__)
bp = Blueprint("mappings", __name__)


def _pipeline() -> Pipeline:
    return current_app.extensions["fhir_ai"]


def _problems(pipeline: Pipeline) -> tuple[dict[str, Any], dict[str, list[str]]]:
    return check_mappings(pipeline.settings.mappings_dir, pipeline.settings.models_dir)


def _outcome(problems: dict[str, list[str]], ok_text: str) -> dict[str, Any]:
    """One issue per problem, as ``$check`` and a refused ``$reload`` both answer: the file and field in
    ``expression`` and at the head of ``diagnostics`` (as ``fhir-ai mappings check`` and start-up print it)."""
    if not problems:
        return {"resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational", "diagnostics": ok_text}]}
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": f"{where}: {message}", "expression": [where]}
        for where, messages in sorted(problems.items()) for message in messages]}


@bp.get("/mappings")
@requires("Mapping", "r")
def list_mappings():  # type: ignore[no-untyped-def]
    """What this process serves: each mapping's file, version, digest and the model version it feeds."""
    pipeline = _pipeline()
    registry = pipeline.registry
    out = []
    for model_id, mapping in sorted(registry.mappings.items()):
        model = registry.models.get(model_id)
        out.append({"model": model_id, "file": mapping.path.name, "version": mapping.version,
                    "digest": mapping.digest, "inputs": len(mapping.inputs), "features": len(mapping.features),
                    "modelVersion": model.version if model else None})
    state = reloads.follower(pipeline).state
    body: dict[str, Any] = {"mappings": out, "reload": state.seen}
    if state.differs:
        body["warning"] = state.differs
    return jsonify(body)


@bp.post("/mappings/$check")
@requires("Mapping", "r")
def check():  # type: ignore[no-untyped-def]
    """Validate the mapping files on disk now (without loading them): every problem, with file and field."""
    found, problems = _problems(_pipeline())
    return fhir_response(_outcome(problems, f"{len(found)} mapping(s) valid: {', '.join(sorted(found))}"))


@bp.post("/mappings/$reload")
@requires("Mapping", "u", audit="operation")     # changes how every patient is scored: who did it, when
def reload():  # type: ignore[no-untyped-def]
    """Load the mappings and models from disk, only if all of them are valid, into every worker.

    The answering process loads them now and records the reload in the store; every other web and
    Celery worker process sharing the store follows within ``reload_check_interval`` seconds.
    """
    pipeline = _pipeline()
    found, problems = reloads.load_from_disk(pipeline)
    if problems:        # nothing was loaded: every problem, one issue each (as $check)
        return fhir_response(_outcome(problems, ""), 422)
    seq = reloads.follower(pipeline).announce(actors.current().client_id)
    log.info("mappings reloaded (reload %d): %s", seq, ", ".join(f"{k} {m.version}" for k, m in sorted(found.items())))
    models = pipeline.registry.models
    return fhir_response(_outcome({}, f"reload {seq}: " + ", ".join(
        f"{k} (mapping {m.version}, model {models[k].version if k in models else 'none'})"
        for k, m in sorted(found.items()))
        + f"; other worker processes follow within {pipeline.settings.reload_check_interval:g} s"))
