"""Write-back that survives an outage of the real sekmet server: queue, restart, worker, exactly once.

Run with ``-s`` to see the figures line (``OUTAGE FIGURES queued=… delivered=… duplicates=…``);
the same figures are attached to the test report as user properties.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fhir_ai.app import create_app
from fhir_ai.config import load_settings
from fhir_ai.delivery import Worker
from fhir_ai.pipeline import Pipeline
from fhir_ai.sitecheck import check_site

try:
    from .sekmet import SekmetServer
    from ..factories import encounter, fhir_time, new_id, patient, sepsis_observations
except ImportError:
    from sekmet import SekmetServer  # type: ignore[no-redef]
    from factories import encounter, fhir_time, new_id, patient, sepsis_observations  # type: ignore[no-redef]

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
AS_OF = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def load_patients(server: SekmetServer, count: int) -> list[str]:
    """``count`` patients in an ICU stay with 20 vital signs and labs in the 12 h before AS_OF."""
    ids, resources = [], []
    for _ in range(count):
        pid, eid = new_id("pat"), new_id("enc")
        resources += [patient(id=pid),
                      encounter(pid, id=eid, period={"start": fhir_time(AS_OF - timedelta(days=1))}),
                      *sepsis_observations(pid, eid, last=AS_OF - timedelta(minutes=10))]
        ids.append(pid)
    server.load(resources)
    return ids


def overrides(database_url: str, server: SekmetServer, **extra: Any) -> dict[str, Any]:
    # source_retries=0: a refused connection fails at once instead of sleeping 1+2+4 s per resource;
    # tiny backoff and cooldown so the test need not wait for production-sized delays.
    return {"database_url": database_url, "source_url": server.base_url,
            "write_back": True, "source_retries": 0, "source_timeout": 5.0, "write_back_backoff": 0.05,
            "write_back_backoff_cap": 0.2, "circuit_failures": 3, "circuit_cooldown": 0.3, **extra}


def on_sekmet_by_identifier(server: SekmetServer, resource: dict[str, Any]) -> list[dict[str, Any]]:
    ident = resource["identifier"][0]
    return server.search("RiskAssessment", {"identifier": f"{ident['system']}|{ident['value']}"})


def sleep_until_due(rows: list[Any]) -> None:
    """Until the last of ``rows`` is due (backoff ≤ 0.2 s, deferral until the circuit's trial ≤ 0.3 s)."""
    due = max(row.next_attempt_at or datetime.now(timezone.utc) for row in rows)
    due = due if due.tzinfo else due.replace(tzinfo=timezone.utc)
    time.sleep(max(0.0, (due - datetime.now(timezone.utc)).total_seconds()) + 0.05)


def run_together(workers: list[Worker]) -> list[Any]:
    """One pass of each worker, all at once in threads; their reports (a worker's error is raised)."""
    with ThreadPoolExecutor(len(workers)) as pool:
        return list(pool.map(lambda worker: worker.run_once(), workers))


def test_smart_less_pull_and_write_back(sekmet: SekmetServer, database_url: str) -> None:
    (pid,) = load_patients(sekmet, 1)
    app = create_app(overrides(database_url, sekmet))
    try:
        body = json.dumps({"resourceType": "Parameters",
                           "parameter": [{"name": "asOf", "valueDateTime": fhir_time(AS_OF)}]})
        response = app.test_client().post(f"/Patient/{pid}/$assess", data=body, content_type=FHIR_JSON)
        assert response.status_code == 200, response.get_data(as_text=True)
        ours = [e["resource"] for e in response.get_json()["entry"]
                if e["resource"]["resourceType"] == "RiskAssessment"]
        assert len(ours) == 2                                  # the model and its NEWS2 companion
        found = sekmet.search("RiskAssessment", {"subject": f"Patient/{pid}"})
        assert sorted(r["id"] for r in found) == sorted(r["id"] for r in ours)
        for resource in ours:
            assert len(on_sekmet_by_identifier(sekmet, resource)) == 1
        store = app.extensions["fhir_ai"].store
        assert {row.status for row in store.outbox()} == {"delivered"}
        assert app.test_client().get("/health").get_json()["writeBack"]["pending"] == 0
    finally:
        app.extensions["fhir_ai"].close()


def test_outage_queues_then_the_worker_delivers_each_assessment_exactly_once(
        sekmet: SekmetServer, database_url: str, record_property) -> None:
    settings = load_settings(overrides(database_url, sekmet))
    pipeline = Pipeline.from_settings(settings)
    app = create_app(settings=settings, pipeline=pipeline)
    api = app.test_client()
    patients = load_patients(sekmet, 3)
    # SMART-less pull while the server is up (what push mode or a CDS prefetch would hand us)
    charts = {pid: pipeline.fetch(pid, ["deterioration"], AS_OF) for pid in patients}
    assert all(len(chart) == 22 for chart in charts.values())   # Patient, Encounter, 20 Observations

    sekmet.stop()
    try:
        assessed: dict[str, list[dict[str, Any]]] = {}
        for pid in patients:
            result = pipeline.assess(pid, as_of=AS_OF, resources=charts[pid], write_back=True)
            assessed[pid] = result.resources
            warnings = [i for i in result.issues if "write-back" in i["diagnostics"]]
            assert warnings and all(i["severity"] == "warning" and i["code"] == "transient"
                                    for i in warnings)
            assert "queued for retry" in warnings[0]["diagnostics"]
        ours = [r for resources in assessed.values() for r in resources]
        queued = len(pipeline.store.outbox(status="pending"))
        assert queued == len(ours) == 6                          # nothing lost: all stored, all queued
        listing = api.get("/write-back").get_json()
        assert listing["pending"] == 6 and listing["failed"] == 0
        assert {e["resource"] for e in listing["entries"]} == {f"RiskAssessment/{r['id']}" for r in ours}

        # A worker during the outage: three refused connections open the circuit; the rest wait.
        # Its circuit's clock stands still for this pass: on a loaded machine the real 0.3 s
        # cooldown can run out between rows (slow commits), and the half-open trial it then rightly
        # lets through makes this (4, 2, 0).
        frozen = time.monotonic()
        during = Worker(settings, pipeline.store, clock=lambda: frozen).run_once()
        assert (during.retry_later, during.deferred, during.delivered) == (3, 3, 0)
        assert len(pipeline.store.outbox(status="pending")) == 6
    finally:
        sekmet.start()

    # Two workers at once after the restart, once every row is due: rows are claimed, so each is
    # delivered once. Usually one pass does it; a PUT that a loaded machine lets time out is
    # retried (by id, so never a duplicate) in further passes, a bounded number of them.
    workers = [Worker(settings, pipeline.store) for _ in range(2)]
    reports: list[Any] = []
    for _ in range(10):
        pending = pipeline.store.outbox(status="pending")
        if not pending:
            break
        sleep_until_due(pending)
        reports += run_together(workers)
    delivered = sum(r.delivered for r in reports)
    assert delivered == 6 and sum(r.failed for r in reports) == 0, [str(r) for r in reports]
    # No row claimed by both workers: one claim each, plus one per attempt that left it pending.
    assert sum(r.claimed for r in reports) == 6 + sum(r.retry_later + r.deferred for r in reports)
    assert {row.status for row in pipeline.store.outbox()} == {"delivered"}
    assert Worker(settings, pipeline.store).run_once().claimed == 0   # nothing left, nothing resent

    # Exactly once on the hospital's server: by subject and by our identifier.
    duplicates = 0
    for pid, resources in assessed.items():
        found = sekmet.search("RiskAssessment", {"subject": f"Patient/{pid}"})
        counts = Counter(r["id"] for r in found)
        assert set(counts) == {r["id"] for r in resources}
        duplicates += sum(n - 1 for n in counts.values())
        for resource in resources:
            matches = on_sekmet_by_identifier(sekmet, resource)
            assert len(matches) == 1
            assert matches[0]["prediction"] == resource["prediction"]
    assert duplicates == 0
    health = api.get("/health").get_json()
    assert health["writeBack"]["pending"] == 0 and health["writeBack"]["failed"] == 0

    figures = {"queued": queued, "delivered": delivered, "duplicates": duplicates,
               "patients": len(patients), "during_outage_attempted": during.retry_later,
               "during_outage_deferred_by_circuit": during.deferred}
    for key, value in figures.items():
        record_property(key, value)
    print("\nOUTAGE FIGURES " + " ".join(f"{k}={v}" for k, v in figures.items()))
    pipeline.close()


def test_check_site_against_the_real_server(sekmet: SekmetServer, tmp_path: Path) -> None:
    load_patients(sekmet, 1)
    report = check_site(sekmet.base_url, load_settings({}), sample=50)
    items = {c.item: c for c in report.checks}
    assert report.fhir_version == "4.0.1"
    assert items["Observation search-type (patient, code, date)"].ok
    assert items["RiskAssessment update creates (updateCreate)"].ok
    assert report.sampled > 0 and report.codes["deterioration"]["codesSeen"] > 0
    assert report.ok, [(c.item, c.detail) for c in report.checks if c.required and not c.ok]
    batch = items["batch answers as the separate requests do"]      # sekmet lists batch: compared for real
    assert batch.ok and batch.detail.startswith("the same "), batch.detail
