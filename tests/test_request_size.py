"""A request body over FHIR_AI_MAX_REQUEST_BYTES gets 413 as an OperationOutcome, before it is parsed."""
from __future__ import annotations

import io
from typing import Any

from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.config import load_settings

FHIR = "application/fhir+json"


def too_costly(response: Any) -> None:
    assert response.status_code == 413
    assert response.mimetype == FHIR
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-costly"


def test_the_default_limit_refuses_a_body_over_16_mib(client: FlaskClient) -> None:
    padding = "x" * (16 * 1024 * 1024)
    body = '{"resourceType": "Parameters", "parameter": [{"name": "note", "valueString": "%s"}]}' % padding
    too_costly(client.post("/Patient/demo-001/$assess", data=body, content_type=FHIR))
    assert client.post("/Patient/demo-001/$assess", json={"resourceType": "Parameters"},
                       content_type=FHIR).status_code == 200


def test_the_limit_is_configurable(settings_overrides: dict[str, Any]) -> None:
    assert load_settings(environ={"FHIR_AI_MAX_REQUEST_BYTES": "2048"}).max_request_bytes == 2048
    settings_overrides.update(max_request_bytes=2048, subscription_secrets="sub-1=s3cret")
    app = create_app(settings_overrides)
    try:
        client = app.test_client()
        body = b'{"resourceType": "Parameters", "parameter": []}' + b" " * 3000
        too_costly(client.post("/Patient/demo-001/$assess", data=body, content_type=FHIR))
        # the subscription endpoint: with its secret, an oversize body is 413; without it, 401 first
        too_costly(client.post("/subscriptions/notify", data=body, content_type=FHIR,
                               headers={"Authorization": "Bearer s3cret"}))
        assert client.post("/subscriptions/notify", data=body, content_type=FHIR,
                           headers={"Authorization": ""}).status_code == 401
    finally:
        app.extensions["fhir_ai"].close()


def test_a_chunked_body_over_the_limit_is_refused_not_cut_off(settings_overrides: dict[str, Any]) -> None:
    # gunicorn hands a chunked body (no Content-Length) over as a terminated stream; Werkzeug then
    # stops reading at the limit instead of refusing, and what it read would be parsed as the body.
    settings_overrides.update(max_request_bytes=2048)
    app = create_app(settings_overrides)
    try:
        client = app.test_client()
        body = b'{"resourceType": "Parameters", "parameter": []}' + b" " * 3000   # valid JSON when cut off
        environ = {"wsgi.input_terminated": True}
        chunked = {"Transfer-Encoding": "chunked"}
        too_costly(client.post("/Patient/demo-001/$assess", input_stream=io.BytesIO(body), content_type=FHIR,
                               headers=chunked, environ_overrides=environ))
        small = b'{"resourceType": "Parameters", "parameter": []}'
        assert client.post("/Patient/demo-001/$assess", input_stream=io.BytesIO(small), content_type=FHIR,
                           headers=chunked, environ_overrides=environ).status_code == 200
    finally:
        app.extensions["fhir_ai"].close()
