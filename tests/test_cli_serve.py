"""`fhir-ai serve` refuses settings gunicorn would start but never serve with."""
from __future__ import annotations

import re

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


def test_the_demo_assesses_every_demo_patient_and_names_each_ones_top_reason(runner: CliRunner) -> None:
    """README's first command: `fhir-ai demo` assesses the demo hospital (deterioration and NEWS2 for each
    patient) and prints one line each; NEWS2's reason is its highest-scoring parameter, in points."""
    result = runner.invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("demo-")]
    patients = {line.split()[0] for line in lines}
    assert len(patients) == 12 and len(lines) == 24
    news2 = {line.split()[0]: line for line in lines if line.split()[1] == "news2"}
    for patient, line in news2.items():
        if " cancelled " in line:
            continue                                 # not scored (no parameter recorded)
        reason = line.split("NEWS2 ", 1)[1]
        assert re.search(r"\d+ points?$", reason) or re.fullmatch(r"0 \(low\)\s*", reason), line
    # demo-005 (the septic course): consciousness scores 3, respiration rate 2 — the reason is the 3
    assert news2["demo-005"].rstrip().endswith("3 points"), news2["demo-005"]
