"""Shared fixtures (flaskr style): settings for a private instance, then ``app``, ``client``, ``runner``."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.config import DEFAULT_MAPPINGS, DEFAULT_MODELS, DEMO_HOSPITAL, ENV_PREFIX


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    """A private instance: its own SQLite file, the repo's mappings and trained models, the demo
    hospital folder as source, no write-back. Tests change entries before asking for ``app``."""
    return {
        "instance_path": str(tmp_path / "instance"),
        "database_url": f"sqlite:///{tmp_path / 'instance' / 'fhir_ai.sqlite3'}",
        "mappings_dir": str(DEFAULT_MAPPINGS),
        "models_dir": str(DEFAULT_MODELS),
        "source_url": str(DEMO_HOSPITAL),
        "write_back": False,
    }


@pytest.fixture
def app(settings_overrides: dict[str, Any]) -> Iterator[Flask]:
    app = create_app(settings_overrides)
    app.config["TESTING"] = True
    yield app
    app.extensions["fhir_ai"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(settings_overrides: dict[str, Any]) -> CliRunner:
    """Runs ``fhir_ai.cli.main`` (``runner.invoke(main, [...])``) with the same settings, passed the
    way an operator passes them: FHIR_AI_* variables in the command's environment."""
    env = {ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
           for name, value in settings_overrides.items()}
    return CliRunner(env=env)
