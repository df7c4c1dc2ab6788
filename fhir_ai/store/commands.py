"""`fhir-ai audit export` and `fhir-ai audit verify`: the auditors' offline tools."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy.engine import make_url
from tqdm import tqdm

from ..search.values import date_range
from . import export
from .engine import schema_problem
from .repository import Store
from .verify import verify


def _store(ctx: click.Context) -> Store:
    """The store, read as it is: an auditor's check never migrates (writes to) the database, and never creates
    one where none is (an SQLite path that does not exist)."""
    url = ctx.obj["settings"].effective_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        raise click.ClickException(f"no fhir_ai database at {parsed.render_as_string(hide_password=True)} "
                                   "(no such file)")
    store = Store(url, migrate=False)
    problem = schema_problem(store.engine)
    if problem:
        store.close()
        raise click.ClickException(problem)
    return store


@click.group("audit")
def audit() -> None:
    """Export and verify the audit trail (RiskAssessment versions, Provenance, AuditEvent)."""


@audit.command("export")
@click.option("--since", default=None, help="FHIR date or dateTime (2026-11, 2026-11-20T08:00:00+09:00); "
                                            "default: everything.")
@click.option("--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for RiskAssessment.<ext>, Provenance.<ext>, AuditEvent.<ext>.")
@click.option("--type", "types", multiple=True, type=click.Choice(export.TYPES),
              help="Only these resource types (repeatable; default all three).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def export_command(ctx: click.Context, since: str | None, fmt: str, out_dir: Path, types: tuple[str, ...],
                   no_progress: bool) -> None:
    """Stream what was stored at or after --since to NDJSON (the stored JSON, byte for byte) or CSV."""
    try:
        start = date_range(since)[0] if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    store = _store(ctx)
    try:
        for resource_type in types or export.TYPES:
            total, rows = store.export_rows(resource_type, start)
            path = out_dir / f"{resource_type}.{fmt}"
            with path.open("w", encoding="utf-8", newline="") as out, \
                    tqdm(total=total, unit=" res", desc=resource_type, disable=no_progress, file=sys.stderr) as bar:
                count = export.write(resource_type, rows, out, fmt, tick=lambda: bar.update(1))
            click.echo(f"{path}: {count} {resource_type}")
    finally:
        store.close()


@audit.command("verify")
@click.option("--anchor", default=None, metavar="SEQ:HASH",
              help="A chain position and hash you recorded earlier (e.g. printed by a previous verify): "
                   "detects removal of the newest events.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def verify_command(ctx: click.Context, anchor: str | None, no_progress: bool) -> None:
    """Check the audit hash chain and every stored assessment version and Provenance against it.

    Exit status 0 when everything verifies, 1 when anything was altered, added or removed.
    """
    pin = None
    if anchor:
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise click.BadParameter("expected SEQ:HASH (a number and a 64-digit sha256)", param_hint="--anchor")
        pin = (int(seq), digest.lower())
    store = _store(ctx)
    try:
        with store.session() as session, tqdm(unit=" events", desc="AuditEvent", disable=no_progress,
                                              file=sys.stderr) as bar:
            report = verify(session, anchor=pin, progress=bar.update)
    finally:
        store.close()
    click.echo(f"{report.events} audit events, {report.versions} assessment versions, "
               f"{report.provenance} Provenance, {report.card_events} CDS card events checked; "
               f"head {report.head_seq}:{report.head_hash}")
    if report.card_events_before:
        click.echo(f"note: {report.card_events_before} CDS card event(s) were stored before card events were "
                   "audited; nothing records them to check them by")
    if report.ok:
        click.echo("OK: the audit trail is intact")
        return
    for problem in report.problems:
        click.echo(f"FAIL: {problem}")
    sys.exit(1)
