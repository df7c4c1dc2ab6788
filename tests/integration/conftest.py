"""Fixtures that run the real third-party FHIR server sekmet-fhir (see sekmet.py)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:  # tests/ may or may not become a package; support both import styles
    from .sekmet import SekmetServer, start_or_skip
except ImportError:
    from sekmet import SekmetServer, start_or_skip  # type: ignore[no-redef]


def _in_ci() -> bool:
    # The test runner's environment, not fhir_ai configuration (that is read only in
    # fhir_ai/config.py): CI=true means sekmet must run, so an install failure is a failure.
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SekmetServer]:
    """One sekmet server for the whole session, empty at first; tests use their own ids.

    A test may ``stop()`` and ``start()`` it (outage); the port and the data survive.
    """
    server = SekmetServer(tmp_path_factory.mktemp("sekmet-data"))
    start_or_skip(server, in_ci=_in_ci())
    yield server
    server.stop()


@pytest.fixture
def sekmet_factory(tmp_path: Path) -> Iterator[Callable[..., SekmetServer]]:
    """Start extra, private sekmet servers (about a second each); all stopped after the test."""
    servers: list[SekmetServer] = []

    def make(**kwargs: object) -> SekmetServer:
        server = SekmetServer(tmp_path / f"sekmet-{len(servers)}", **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return start_or_skip(server, in_ci=_in_ci())

    yield make
    for server in servers:
        server.stop()
