"""Shared fixtures (flaskr style): settings for a private instance, then ``app``, ``client``, ``runner``."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.config import DEFAULT_MAPPINGS, DEFAULT_MODELS, DEMO_HOSPITAL, ENV_PREFIX

try:
    from . import databases
    from .credentials import TEST_TOKENS_SETTING, TokenClient
except ImportError:
    import databases  # type: ignore[no-redef]
    from credentials import TEST_TOKENS_SETTING, TokenClient  # type: ignore[no-redef]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--database", choices=["sqlite", "postgresql"], default=None,
                     help=f"store backend for the whole suite (default: sqlite, or {databases.URL_ENV} if set); "
                          f"postgresql uses {databases.URL_ENV} or {databases.MACHINE_POSTGRES}")


def pytest_configure(config: pytest.Config) -> None:
    choice = config.getoption("--database", default=None)
    env_url = os.environ.get(databases.URL_ENV, "")
    if choice == "sqlite":
        databases.select("")
    elif choice == "postgresql":
        databases.select(env_url or databases.MACHINE_POSTGRES)
    else:
        databases.select(env_url)


def pytest_report_header(config: pytest.Config) -> str:
    return f"fhir_ai store backend: {databases.backend()}"


@pytest.fixture(scope="session", autouse=True)
def _test_token() -> Iterator[None]:
    """Apps built from the environment accept the test token; test clients send it."""
    saved_env, saved_class = os.environ.get(ENV_PREFIX + "AUTH_TOKENS"), Flask.test_client_class
    os.environ[ENV_PREFIX + "AUTH_TOKENS"] = TEST_TOKENS_SETTING
    Flask.test_client_class = TokenClient
    yield
    Flask.test_client_class = saved_class
    if saved_env is None:
        os.environ.pop(ENV_PREFIX + "AUTH_TOKENS", None)
    else:
        os.environ[ENV_PREFIX + "AUTH_TOKENS"] = saved_env


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """An empty store for this test: SQLite under tmp_path, or a fresh PostgreSQL schema (--database)."""
    with databases.fresh_database(tmp_path / "instance") as url:
        yield url


@pytest.fixture
def settings_overrides(tmp_path: Path, database_url: str) -> dict[str, Any]:
    """A private instance: its own database (SQLite file or PostgreSQL schema), the repo's mappings and trained models, the demo
    hospital folder as source, no write-back. Tests change entries before asking for ``app``."""
    return {
        "instance_path": str(tmp_path / "instance"),
        "database_url": database_url,
        "auth_tokens": TEST_TOKENS_SETTING,
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
