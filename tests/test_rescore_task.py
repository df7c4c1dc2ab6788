"""The event-driven rescoring task (Subscriptions) when the hospital's server fails for a while."""
from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from fhir_ai.errors import UpstreamError
from fhir_ai.jobs import runtime, tasks
from fhir_ai.jobs.celery_app import app as celery
from fhir_ai.store.trail_tables import AuditEventRow
from test_subscriptions import sub_app  # noqa: F401  (fixture)


@pytest.fixture
def eager_rescoring(sub_app: Flask) -> Any:  # noqa: F811
    runtime.configure(sub_app.config["FHIR_AI"], sub_app.extensions["fhir_ai"])
    saved = celery.conf.task_always_eager
    celery.conf.task_always_eager = True     # retries run at once (their countdown is not waited for)
    yield sub_app.extensions["fhir_ai"]
    celery.conf.task_always_eager = saved
    runtime.close()


def failing(pipeline: Any, times: int, error: UpstreamError) -> list[str]:
    """Make ``pipeline.assess`` fail ``times`` times with ``error``, then assess; the calls made."""
    assess, calls = pipeline.assess, []

    def flaky(patient_id: str, **kwargs: Any) -> Any:
        calls.append(patient_id)
        if len(calls) <= times:
            raise error
        return assess(patient_id, **kwargs)
    pipeline.assess = flaky
    return calls


def test_a_temporary_fault_of_the_hospital_server_is_tried_again(eager_rescoring: Any) -> None:
    pipeline = eager_rescoring
    calls = failing(pipeline, 2, UpstreamError("GET /Patient/demo-004: failed after 2 attempt(s) (HTTP 503)",
                                               upstream_status=503))
    ids = tasks.rescore_patient.delay("demo-004", "subscription/sub-1").get()
    assert calls == ["demo-004"] * 3 and len(ids) == 2           # the third try got through
    assert pipeline.store.get_assessment(ids[0])["subject"]["reference"] == "Patient/demo-004"
    with pipeline.store.session() as session:       # audited as the subscription that asked
        agents = set(session.scalars(select(AuditEventRow.agent).where(AuditEventRow.action == "C")))
    assert agents == {"subscription/sub-1"}


def test_a_lasting_fault_is_given_up_after_the_retries(eager_rescoring: Any) -> None:
    calls = failing(eager_rescoring, 100, UpstreamError("GET /Patient/demo-004: HTTP 503", upstream_status=503))
    with pytest.raises(UpstreamError):
        tasks.rescore_patient.delay("demo-004").get()
    assert len(calls) == tasks.RESCORE_RETRIES + 1


def test_a_permanent_refusal_is_not_tried_again(eager_rescoring: Any) -> None:
    calls = failing(eager_rescoring, 100, UpstreamError("GET /Patient/x: HTTP 400", temporary=False,
                                                        upstream_status=400))
    with pytest.raises(UpstreamError):
        tasks.rescore_patient.delay("demo-004").get()
    assert calls == ["demo-004"]
