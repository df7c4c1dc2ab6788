"""The auditors' tools read the database as it is: `fhir-ai audit verify|export` never migrates it (an
auditor's check must not write) and never creates one where none is."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from flask import Flask

from fhir_ai.cli import main
from fhir_ai.store.engine import alembic_config


def revision(app: Flask) -> str | None:
    with app.extensions["fhir_ai"].store.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@pytest.mark.parametrize("args", [["audit", "verify", "--no-progress"],
                                  ["audit", "export", "--out", "OUT", "--no-progress"]])
def test_an_older_schema_is_named_not_upgraded(app: Flask, runner: CliRunner, args: list[str],
                                               tmp_path: Path) -> None:
    head = revision(app)
    with app.extensions["fhir_ai"].store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0008_job_item_claims")
    result = runner.invoke(main, [a.replace("OUT", str(tmp_path / "out")) for a in args])
    assert result.exit_code != 0
    assert "is at schema revision 0008_job_item_claims" in result.output and head in result.output
    assert "never change the database" in result.output
    assert revision(app) == "0008_job_item_claims"            # left as it was


def test_the_current_schema_verifies(app: Flask, runner: CliRunner) -> None:
    result = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert result.exit_code == 0, result.output


def test_no_database_is_created_where_none_is(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fhir_ai.sqlite3"
    result = runner.invoke(main, ["audit", "verify", "--no-progress"],
                           env={**runner.env, "FHIR_AI_DATABASE_URL": f"sqlite:///{missing}"})
    assert result.exit_code != 0 and "no fhir_ai database at" in result.output
    assert not missing.exists() and not missing.parent.exists()
