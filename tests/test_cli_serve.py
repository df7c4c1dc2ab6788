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


def test_gunicorn_opens_no_shared_control_socket() -> None:
    # gunicorn >= 25.1 opens ~/.gunicorn/gunicorn.ctl for every instance on the host: a second
    # fhir-ai serve took it over and removed it on exit.
    from flask import Flask
    from fhir_ai.server import _Gunicorn
    options = {"bind": "127.0.0.1:0", "workers": 1}
    config = _Gunicorn(Flask(__name__), options).cfg
    assert config.settings["bind"].value == ["127.0.0.1:0"]
    if "control_socket_disable" in config.settings:
        assert config.control_socket_disable is True
