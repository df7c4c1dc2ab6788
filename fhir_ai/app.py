"""create_app(): configuration → pipeline (mappings, models, source, store) → blueprints → one error handler."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask

from . import auth, reloads
from .api import blueprints, errors
from .config import Settings, load_settings
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def create_app(test_config: Mapping[str, Any] | None = None, *, settings: Settings | None = None,
               pipeline: Pipeline | None = None) -> Flask:
    """The Flask app. Refuses to start (MappingError / ModelError) on an invalid mapping or model."""
    app = Flask(__name__, instance_path=None)
    settings = settings or load_settings(test_config)
    app.config["FHIR_AI"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes   # 413 (an OperationOutcome), not read
    app.json.sort_keys = False
    app.extensions["fhir_ai"] = pipeline or Pipeline.from_settings(settings)
    for blueprint in blueprints():
        app.register_blueprint(blueprint)
    errors.register(app)
    auth.init_app(app)          # every request: token, scope, audit (fhir_ai/auth)
    follower = reloads.follower(app.extensions["fhir_ai"])
    app.before_request(follower.follow)    # a $reload answered by another worker reaches this one too
    return app
