"""The `fhir-ai` command: serve, assess, bulk-assess, train, mappings check, write-back, data, demo."""
from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from .config import DEMO_HOSPITAL, Settings, load_settings
from .errors import FhirAiError, MappingError
from .fhir import times

log = logging.getLogger("fhir_ai")


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _as_of(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return times.parse_datetime(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--as-of") from exc


class _Group(click.Group):
    """Turns fhir_ai errors into a clear message and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MappingError as exc:
            click.echo(str(exc), err=True)
            sys.exit(2)
        except FhirAiError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default: FHIR_AI_LOG_LEVEL or INFO).")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """fhir_ai: AI triage and deterioration warnings as a FHIR service.

    Configuration comes from FHIR_AI_* environment variables (see README.md).
    """
    settings = load_settings()
    logging.basicConfig(level=(log_level or settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"settings": settings}


@main.command()
@click.option("--host", default=None, help="Address to bind (default FHIR_AI_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default FHIR_AI_PORT or 8080).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="gunicorn worker processes.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads per worker.")
@click.option("--dev", is_flag=True, help="Flask's development server (never for production traffic).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int, threads: int, dev: bool) -> None:
    """Serve the FHIR API under gunicorn (models and mappings load once, before workers fork)."""
    from .app import create_app
    settings = _settings(ctx)
    host = host or settings.host
    port = port or settings.port
    app = create_app(settings=settings)   # fails here, before binding, on a bad mapping or model
    if dev:
        app.run(host=host, port=port)
        return
    from .server import run_gunicorn
    run_gunicorn(app, host=host, port=port, workers=workers, threads=threads)


@main.command()
@click.argument("patient_id")
@click.option("--model", "models", multiple=True, help="Model id (repeatable; default deterioration).")
@click.option("--as-of", default=None, help="FHIR dateTime; default now.")
@click.option("--write-back/--no-write-back", default=None, help="Override FHIR_AI_WRITE_BACK.")
@click.pass_context
def assess(ctx: click.Context, patient_id: str, models: tuple[str, ...], as_of: str | None,
           write_back: bool | None) -> None:
    """Assess one patient from the configured source; print the RiskAssessments as JSON."""
    from .pipeline import Pipeline
    pipeline = Pipeline.from_settings(_settings(ctx))
    try:
        result = pipeline.assess(patient_id, models=list(models) or None, as_of=_as_of(as_of),
                                 write_back=write_back)
    finally:
        pipeline.close()
    click.echo(json.dumps({"resources": result.resources, "issues": result.issues}, indent=2, ensure_ascii=False))


@main.command("bulk-assess")
@click.option("--input", "input_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bulk-Data NDJSON folder (Patient/Encounter/Observation.ndjson).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write RiskAssessment NDJSON.")
@click.option("--model", "models", multiple=True, help="Model id (repeatable; default deterioration).")
@click.option("--as-of", default=None, help="One as-of time for everyone; default: each patient's latest data.")
@click.option("--explain", type=click.Choice(["elevated", "all", "none"]), default="elevated", show_default=True,
              help="Which patients get a rationale (elevated = moderate or high risk).")
@click.option("--news2/--no-news2", default=False, show_default=True, help="Also write NEWS2 companions.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def bulk_assess(ctx: click.Context, input_dir: Path, output: Path, models: tuple[str, ...], as_of: str | None,
                explain: str, news2: bool, progress: bool) -> None:
    """Score every patient in an NDJSON export; one RiskAssessment per patient per model."""
    from .bulk import bulk_assess as run
    from .mapping import load_directory
    from .models.registry import ModelRegistry
    settings = _settings(ctx)
    registry = ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))
    stats = run(input_dir, output, registry, models=list(models) or ["deterioration"], as_of=_as_of(as_of),
                explain=explain, news2=news2, progress=progress)
    click.echo(f"{stats.summary()}, {stats.resources_read} resources read in {stats.seconds:.2f} s "
               f"= {stats.patients_per_second:.0f} patients/s -> {output}")


@main.command("bulk-export-assess")
@click.option("--group", default=None, help="Export Group/{id} (a ward); default: Patient/$export (everyone).")
@click.option("--full", is_flag=True, help="Ignore the last run's transactionTime (no _since).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to keep the RiskAssessment NDJSON.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the downloaded NDJSON, kept in export/ and changed/ below it; each run empties "
                   "those first (default: a temporary folder, removed afterwards).")
@click.option("--model", "models", multiple=True, help="Model id (repeatable; default deterioration).")
@click.option("--explain", type=click.Choice(["elevated", "all", "none"]), default="elevated", show_default=True)
@click.option("--write-back/--no-write-back", default=None, help="Override FHIR_AI_WRITE_BACK.")
@click.pass_context
def bulk_export_assess(ctx: click.Context, group: str | None, full: bool, output: Path, workdir: Path | None,
                       models: tuple[str, ...], explain: str, write_back: bool | None) -> None:
    """Bulk Data: $export at the hospital (since the last run), score everyone, write back in Bundles.

    Exit status 0 when complete, 1 when not (the next run asks since the same point again), 3 when
    complete but the server could not export some resources (reported, not asked for again), 2 when the
    export failed or was refused, or the run was stopped (its job cancelled, or taken over by another run).
    """
    import tempfile
    from .bulkdata import client_from_settings, export_and_assess, issue_codes
    from .jobs import JobStore
    from .mapping import load_directory
    from .models.registry import ModelRegistry
    from .store import Store
    settings = _settings(ctx)
    if settings.source_is_folder:
        raise click.UsageError("bulk-export-assess needs FHIR_AI_SOURCE_URL to be the hospital's FHIR server")
    registry = ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))
    store = Store(settings.effective_database_url)
    client = client_from_settings(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="fhir-ai-export-") as scratch:
            run = export_and_assess(settings, registry, JobStore(store), client, workdir=workdir or Path(scratch),
                                    output=output, group=group, full=full, models=list(models) or None,
                                    explain=explain, write_back=write_back)
    finally:
        client.close()
        store.close()
    click.echo(f"export {run.transaction_time} (since {run.since or 'the beginning'}): {run.patients} patients, "
               f"{run.assessed} assessed, {run.stored} new in the store; written back {run.written.written} in "
               f"{run.written.bundles} bundle(s), failed {run.written.failed} (queued {run.queued}) -> {output}"
               + (f"; the export reported {run.export_errors} error(s): not complete, the next run asks since "
                  f"{run.since or 'the beginning'} again" if run.export_errors else "")
               + (f"; partial: the server could not export {run.export_skipped} resource(s) (issue codes: "
                  f"{issue_codes(run.issues.skipped_codes)}), not asked for again" if run.partial else "")
               + (f"; {run.patients_gone} patient(s) whose inputs were deleted are gone at the server: not "
                  "rescored, their assessments kept" if run.patients_gone else ""))
    sys.exit(3 if run.partial else 0 if run.complete else 1)


@main.group()
def mappings() -> None:
    """Check mapping files."""


@mappings.command("check")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.pass_context
def mappings_check(ctx: click.Context, directory: Path | None) -> None:
    """Validate every mapping in DIRECTORY (default FHIR_AI_MAPPINGS_DIR) and its model's feature order."""
    from .models.registry import check_mappings
    settings = _settings(ctx)
    directory = directory or Path(settings.mappings_dir)
    found, problems = check_mappings(directory, settings.models_dir)
    for where, messages in sorted(problems.items()):
        for message in messages:
            click.echo(f"{where}: {message}", err=True)
    if problems:
        click.echo(f"{sum(len(m) for m in problems.values())} problem(s) in {directory}", err=True)
        sys.exit(1)
    for model_id, mapping in found.items():
        click.echo(f"ok: {mapping.path.name} (model {model_id}, {len(mapping.inputs)} inputs, "
                   f"{len(mapping.features)} features)")


@main.group()
def train() -> None:
    """Train models reproducibly (seeded; the data hash goes into the model card)."""


@train.command("deterioration")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The PhysioNet 2012 folder (set-a/b tar files, Outcomes files, holdout-ids.txt).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=2012, show_default=True)
@click.option("--sets", default="a,b", show_default=True, help="Training sets (set c is held out: refused).")
@click.option("--limit", type=int, default=None, help="Use only the first N stays (quick runs and tests).")
@click.option("--rounds", type=int, default=None, help="Boosting rounds (default 400).")
@click.pass_context
def train_deterioration(ctx: click.Context, data_dir: Path, out_dir: Path, seed: int, sets: str,
                        limit: int | None, rounds: int | None) -> None:
    """In-hospital mortality model from PhysioNet/CinC 2012 through the FHIR path; writes model + card."""
    from .mapping import load_mapping
    from .models import train_deterioration as trainer
    settings = _settings(ctx)
    mapping = load_mapping(_mapping_file(settings, "deterioration"))
    command = " ".join(["fhir-ai", "train", "deterioration", "--data", str(data_dir), "--out", str(out_dir),
                        "--seed", str(seed), "--sets", sets] + (["--limit", str(limit)] if limit else [])
                       + (["--rounds", str(rounds)] if rounds else []))
    card = trainer.train(data_dir, out_dir, mapping, seed=seed, sets=tuple(s.strip() for s in sets.split(",")),
                         limit=limit, rounds=rounds or trainer.ROUNDS, command=command)
    m = card["metrics"]
    click.echo(f"model {card['version']} -> {out_dir}")
    click.echo(f"cross-validated AUROC {m['model']['auroc']:.3f}, event-1 {m['model']['event1']:.3f}, "
               f"H {m['model']['hosmer_lemeshow_h']:.2f} on {m['model']['n']} stays")
    click.echo(f"SAPS-I  AUROC {m['saps_i']['auroc']:.3f}, event-1 {m['saps_i']['event1']:.3f}, "
               f"H {m['saps_i']['hosmer_lemeshow_h']:.2f} on {m['saps_i']['n']} stays")
    click.echo(f"NEWS2   AUROC {m['news2']['auroc']:.3f}, event-1 {m['news2']['event1']:.3f}, "
               f"H {m['news2']['hosmer_lemeshow_h']:.2f} on {m['news2']['n']} stays")


@train.command("triage")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The KTAS folder (train.csv, holdout-ids.txt); holdout rows are never read.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=2019, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N visits (quick runs and tests).")
@click.option("--rounds", type=int, default=None, help="Boosting rounds (default 300).")
@click.pass_context
def train_triage(ctx: click.Context, data_dir: Path, out_dir: Path, seed: int, limit: int | None,
                 rounds: int | None) -> None:
    """KTAS level model from the KTAS training visits through the FHIR path; writes model + card."""
    from .mapping import load_mapping
    from .models import train_triage as trainer
    mapping = load_mapping(_mapping_file(_settings(ctx), "triage"))
    command = " ".join(["fhir-ai", "train", "triage", "--data", str(data_dir), "--out", str(out_dir),
                        "--seed", str(seed)] + (["--limit", str(limit)] if limit else [])
                       + (["--rounds", str(rounds)] if rounds else []))
    card = trainer.train(data_dir, out_dir, mapping, seed=seed, limit=limit, rounds=rounds or trainer.ROUNDS,
                         command=command)
    m = card["metrics"]
    click.echo(f"model {card['version']} -> {out_dir}  (decision rule beta {card['decision']['beta']})")
    for name in ("model", "model_argmax", "nurse"):
        r = m[name]
        click.echo(f"{name:<13} exact {r['exact_accuracy']:.3f}  kappa linear {r['kappa_linear']:.3f}  "
                   f"quadratic {r['kappa_quadratic']:.3f}  under {r['under_triage']:.3f}  over {r['over_triage']:.3f}")
    sr = card["second_reader"]
    click.echo(f"second reader: AUROC(under-triage) {sr['auroc_under_triage']:.3f}, flag at {sr['flag_threshold']:.3f}: "
               f"sensitivity {sr['flag_sensitivity']:.2f}, PPV {sr['flag_ppv']:.2f}, {sr['flag_rate']:.1%} flagged")


def _mapping_file(settings: Settings, model_id: str) -> Path:
    from .mapping.loader import SUFFIXES
    for suffix in SUFFIXES:
        path = Path(settings.mappings_dir) / f"{model_id}{suffix}"
        if path.exists():
            return path
    raise MappingError({f"{settings.mappings_dir}: {model_id}": ["no mapping file for this model"]})


@main.group("write-back")
def write_back() -> None:
    """See and retry write-backs to the hospital's server."""


@write_back.command("status")
@click.pass_context
def write_back_status(ctx: click.Context) -> None:
    """Count write-backs by state and list the ones not delivered."""
    from .store import Store
    store = Store(_settings(ctx).effective_database_url)
    rows = store.outbox()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
        if row.status != "delivered":
            click.echo(f"{row.status}\tRiskAssessment/{row.resource_id}\tattempts={row.attempts}\t{row.last_error or ''}")
    click.echo(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no write-backs recorded")
    from .delivery import summary
    health = summary(store, _settings(ctx))
    oldest = health["oldestPendingSeconds"]
    click.echo(f"health: {health['status']} (oldest pending "
               f"{'-' if oldest is None else f'{oldest} s'}, stale after {health['staleAfterSeconds']:.0f} s)")


@write_back.command("retry")
@click.pass_context
def write_back_retry(ctx: click.Context) -> None:
    """Deliver every pending write-back now."""
    from .pipeline import Pipeline
    pipeline = Pipeline.from_settings(_settings(ctx))
    try:
        counts = pipeline.retry_write_backs()
    finally:
        pipeline.close()
    click.echo(f"delivered {counts['delivered']}, still failing {counts['failed']}")


@main.command()
@click.option("--once", is_flag=True, help="One write-back delivery pass, then exit (cron, tests); no Celery.")
@click.option("--interval", type=float, default=None, help="Seconds between write-back passes (default FHIR_AI_WORKER_INTERVAL).")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Run the scheduler (write-back passes, ward rescoring) inside this worker.")
@click.option("--concurrency", type=int, default=None, help="Celery pool processes (default: CPU count).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True)
@click.option("--delivery-only", is_flag=True, help="Only the write-back delivery loop, without Celery/Redis.")
@click.pass_context
def worker(ctx: click.Context, once: bool, interval: float | None, beat: bool, concurrency: int | None, pool: str,
           delivery_only: bool) -> None:
    """A Celery worker (Redis broker): batch jobs, event-driven rescoring, and write-back delivery.

    Write-back delivery (backoff with jitter, Retry-After, a circuit per server) runs as a periodic
    task; several workers may run at once (rows are claimed before they are sent). A site without batch
    jobs (FHIR_AI_BROKER_URL=none) runs --delivery-only or --once; the Celery worker is refused there.
    """
    import signal
    from .delivery import Worker, run_housekeeping
    from .store import Store
    settings = _settings(ctx)
    if not once and not delivery_only:
        import dataclasses
        from .jobs.worker import run_worker
        if interval is not None:
            settings = dataclasses.replace(settings, worker_interval=interval)
        run_worker(settings, beat=beat, concurrency=concurrency, pool=pool,
                   loglevel=logging.getLevelName(logging.getLogger().level))
        return
    from .jobs.state import JobStore
    store = Store(settings.effective_database_url)
    runner = Worker(settings, store)

    def expire_jobs() -> None:
        # Finished jobs past FHIR_AI_JOB_RETENTION (Celery's beat does this hourly where it runs; a site
        # without batch jobs still has the job rows of `bulk-export-assess` runs).
        JobStore(store).expire_after(settings.job_retention)
    try:
        if once:
            report = runner.run_once()
            run_housekeeping(expire_jobs)       # as the loop does: a failure is logged, the report stands
            click.echo(str(report))
            sys.exit(1 if report.failed else 0)
        signal.signal(signal.SIGTERM, lambda *_: runner.stop())
        try:
            runner.run_forever(interval, housekeeping=expire_jobs,
                               housekeeping_every=min(3600.0, settings.job_retention or 3600.0))
        except KeyboardInterrupt:
            runner.stop()
    finally:
        runner.close()
        store.close()


@main.command("check-site")
@click.argument("url")
@click.option("--sample", type=int, default=200, show_default=True, help="Observations to sample for code coverage.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.pass_context
def check_site(ctx: click.Context, url: str, sample: int, as_json: bool) -> None:
    """Check a hospital FHIR server: CapabilityStatement, SMART configuration, mapping codes seen.

    Uses FHIR_AI_SOURCE_TOKEN or the FHIR_AI_SMART_* client when configured. Exit 1 when
    something fhir_ai needs is missing.
    """
    from .sitecheck import check_site as run, render
    report = run(url, _settings(ctx), sample=sample)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report))
    sys.exit(0 if report.ok else 1)


@main.group()
def data() -> None:
    """Convert the shared data sets to FHIR NDJSON (holdout records are never written)."""


@data.command("physionet2012")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--sets", default="a", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--limit", type=int, default=None)
@click.option("--unit-variant", type=click.Choice(["alt"]), default=None,
              help="Write some values in alternative units (tests unit conversion).")
def data_physionet(data_dir: Path, sets: str, out_dir: Path, limit: int | None, unit_variant: str | None) -> None:
    """PhysioNet/CinC 2012 records → Patient/Encounter/Observation NDJSON (+ labels.csv)."""
    from .datasets.physionet2012 import convert_physionet
    counts = convert_physionet(data_dir, [s.strip() for s in sets.split(",")], out_dir, limit, unit_variant)
    click.echo(json.dumps(counts))


@data.command("ktas")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--limit", type=int, default=None)
def data_ktas(data_dir: Path, out_dir: Path, limit: int | None) -> None:
    """KTAS training visits → NDJSON (holdout rows are never written)."""
    from .datasets.ktas import convert_ktas
    click.echo(json.dumps(convert_ktas(data_dir, out_dir, limit)))


@data.command("demo")
@click.option("--out", "out_dir", default=str(DEMO_HOSPITAL), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def data_demo(out_dir: Path) -> None:
    """Regenerate the synthetic demo hospital (seeded: same bytes every time)."""
    from .datasets.demo import generate_demo_hospital
    click.echo(json.dumps(generate_demo_hospital(out_dir)))


@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The main job on embedded defaults: assess every patient of the demo hospital into SQLite."""
    from .datasets.demo import DEFAULT_ANCHOR
    from .fhir.sources import FolderSource
    from .pipeline import Pipeline
    settings = _settings(ctx)
    pipeline = Pipeline.from_settings(settings)
    source = pipeline.source
    if not isinstance(source, FolderSource):
        raise click.UsageError("demo runs on a folder source; unset FHIR_AI_SOURCE_URL to use the demo hospital")
    as_of = times.parse_datetime(DEFAULT_ANCHOR) if Path(settings.source_url) == DEMO_HOSPITAL else None
    click.echo(f"source: {settings.source_url}\nstore:  {settings.effective_database_url}\n"
               f"as of:  {times.format_datetime(as_of) if as_of else 'now'}\n")
    click.echo(f"{'patient':<12} {'model':<14} {'status':<10} {'risk':<9} {'p':>6}  top reason")
    try:
        for patient_id in source.patient_ids():
            result = pipeline.assess(patient_id, as_of=as_of)
            for resource in result.resources:
                prediction = (resource.get("prediction") or [{}])[0]
                risk = ((prediction.get("qualitativeRisk") or {}).get("coding") or [{}])[0].get("code", "-")
                p = prediction.get("probabilityDecimal")
                reason = _top_reason(prediction.get("rationale") or (resource.get("note") or [{}])[0].get("text", ""))
                model = resource["method"]["coding"][0]["code"]
                click.echo(f"{patient_id:<12} {model:<14} {resource['status']:<10} {risk:<9} "
                           f"{'' if p is None else f'{p:.3f}':>6}  {reason}")
    finally:
        pipeline.close()
    click.echo("\nStored. Serve them with `fhir-ai serve` and read GET /RiskAssessment?patient=demo-001")


def _top_reason(rationale: str) -> str:
    """The demo's one-line reason: the model's first contributing input, or NEWS2's highest-scoring parameter."""
    if rationale.startswith("NEWS2 ") and ": " in rationale:
        head, _, rest = rationale.partition(": ")
        parts = [p.strip() for p in rest.split(". Clinical response")[0].split(";")]
        points = [(int(m.group(1)), p) for p in parts if (m := re.search(r" (\d+) points?$", p))]
        top = max(points, key=lambda x: x[0], default=(0, ""))
        return f"{head}: {top[1]}"[:70] if top[0] > 0 else head[:70]      # NEWS2 0: no parameter stands out
    return rationale.replace("Top contributing inputs: ", "").split(";")[0][:70]


# Auditors and access: `fhir-ai audit export|verify`, `fhir-ai auth token`.
from .auth.commands import auth as _auth_commands  # noqa: E402
from .store.commands import audit as _audit_commands  # noqa: E402

main.add_command(_audit_commands)
main.add_command(_auth_commands)


if __name__ == "__main__":
    main()
