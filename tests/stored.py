"""Stored RiskAssessments for search, history and audit tests (no model run: written to the store directly)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask

from fhir_ai import codes
from fhir_ai.app import create_app
from fhir_ai.config import DEFAULT_MAPPINGS, DEFAULT_MODELS, DEMO_HOSPITAL

try:
    from . import databases
    from .credentials import TEST_TOKENS_SETTING
except ImportError:
    import databases  # type: ignore[no-redef]
    from credentials import TEST_TOKENS_SETTING  # type: ignore[no-redef]


def risk_assessment(rid: str, *, subject: str = "Patient/p1", encounter: str | None = "Encounter/e1",
                    date: str | None = "2026-11-20T08:00:00Z", probability: float | None = 0.25,
                    risk: str | None = "moderate", model: str = "deterioration", version: str = "1.0",
                    **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment", "id": rid, "status": "final",
        "meta": {"security": [dict(codes.AI_ASSERTED)]},
        "identifier": [{"system": codes.ASSESSMENT_IDENTIFIER, "value": f"key-{rid}"}],
        "method": {"coding": [{"system": codes.MODEL_SYSTEM, "code": model, "version": version},
                              {"system": codes.MODEL_VERSION_SYSTEM, "code": f"{model}|{version}"}]},
        "subject": {"reference": subject},
        "performer": {"identifier": {"system": codes.MODEL_VERSION_SYSTEM, "value": f"{model}|{version}"}},
        "basis": [{"reference": f"Observation/{rid}-obs-1"}, {"reference": f"Observation/{rid}-obs-2"}],
    }
    if encounter:
        resource["encounter"] = {"reference": encounter}
    if date:
        resource["occurrenceDateTime"] = date
    if probability is not None or risk is not None:
        prediction: dict[str, Any] = {}
        if probability is not None:
            prediction["probabilityDecimal"] = probability
        if risk is not None:
            prediction["qualitativeRisk"] = {"coding": [{"system": codes.RISK_PROBABILITY, "code": risk}]}
        resource["prediction"] = [prediction]
    resource.update(extra)
    return resource


def save(app: Flask, resource: dict[str, Any]) -> dict[str, Any]:
    method = resource["method"]["coding"][0]
    store = app.extensions["fhir_ai"].store
    return store.save_assessment(resource, model_id=method["code"], model_version=method["version"]).resource


@contextmanager
def module_app(folder: Path, **settings: Any) -> Iterator[Flask]:
    """An app on an empty database of its own (for a module's worth of read-only tests)."""
    with databases.fresh_database(folder) as url:
        app = create_app({"instance_path": str(folder), "database_url": url, "auth_tokens": TEST_TOKENS_SETTING,
                          "mappings_dir": str(DEFAULT_MAPPINGS), "models_dir": str(DEFAULT_MODELS),
                          "source_url": str(DEMO_HOSPITAL), "write_back": False, **settings})
        app.testing = True
        try:
            yield app
        finally:
            app.extensions["fhir_ai"].close()


def ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"}
