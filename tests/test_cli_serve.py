"""`fhir-ai serve` refuses settings gunicorn would start but never serve with."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fhir_ai.cli import main


@pytest.mark.parametrize("option", ["--workers", "--threads"])
def test_serve_needs_at_least_one_worker_and_thread(runner: CliRunner, option: str) -> None:
    # gunicorn itself starts a master with no workers: the port is bound and every request hangs.
    result = runner.invoke(main, ["serve", option, "0"])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output and "0 is not in the range x>=1" in result.output
