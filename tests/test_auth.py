"""Who may do what: 401 without a valid token, 403 without the scope (both OperationOutcomes, both
audited), the role × endpoint matrix, and JWT verification (RS384/ES384, exp, aud, iss, kid, JWKS URL)."""
from __future__ import annotations

import json
import time

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_ai.app import create_app
from fhir_ai.errors import ConfigurationError

try:
    from .credentials import ROLE_TOKENS, bearer
    from .stored import risk_assessment, save
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]
    from stored import risk_assessment, save  # type: ignore[no-redef]

FHIR = "application/fhir+json"
ASSESS = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]}
WITHDRAW = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "test"}]}
NO_TOKEN = {"Authorization": ""}

# (method, path, body) → who gets 2xx; everyone else with a token gets 403, without one 401.
MATRIX = [
    ("GET", "/metadata", None, "public"),
    ("GET", "/health", None, "public"),
    ("GET", "/OperationDefinition/assess", None, "public"),
    ("GET", "/cds-services", None, "public"),
    ("POST", "/Patient/demo-005/$assess", ASSESS, {"ehr", "admin"}),
    ("GET", "/RiskAssessment/m1", None, {"ehr", "auditor", "admin"}),
    ("GET", "/RiskAssessment?patient=p1", None, {"ehr", "auditor", "admin"}),
    ("GET", "/RiskAssessment/m1/_history", None, {"ehr", "auditor", "admin"}),
    ("GET", "/RiskAssessment/_history", None, {"ehr", "auditor", "admin"}),
    ("GET", "/RiskAssessment/m1/_history/1", None, {"ehr", "auditor", "admin"}),
    ("POST", "/RiskAssessment/m1/$withdraw", WITHDRAW, {"ehr", "admin"}),
    ("GET", "/Provenance?target=RiskAssessment/m1", None, {"auditor", "admin"}),
    ("GET", "/Provenance/prov-m1-1", None, {"auditor", "admin"}),
    ("GET", "/AuditEvent", None, {"auditor", "admin"}),
    ("GET", "/AuditEvent?action=C", None, {"auditor", "admin"}),
    ("GET", "/write-back", None, {"integrator", "admin"}),
    ("GET", "/mappings", None, {"integrator", "admin"}),
    ("POST", "/mappings/$check", None, {"integrator", "admin"}),
    ("POST", "/mappings/$reload", None, {"integrator", "admin"}),
    ("GET", "/audit/cds-cards", None, {"auditor", "admin"}),
]
ROLES = ["ehr", "integrator", "auditor", "admin"]


def call(client, method, path, body, headers):
    if body is None:
        return client.open(path, method=method, headers=headers)
    return client.open(path, method=method, json=body, content_type=FHIR, headers=headers)


@pytest.mark.parametrize("method, path, body, allowed", MATRIX, ids=[f"{m} {p}" for m, p, _, _ in MATRIX])
def test_role_endpoint_matrix(app, client, method, path, body, allowed):
    save(app, risk_assessment("m1"))
    for role in ROLES:
        response = call(client, method, path, body, bearer(ROLE_TOKENS[role]))
        expected = 200 if allowed == "public" or role in allowed else 403
        assert response.status_code == expected, (role, response.get_json())
        if expected == 403:
            assert response.json["resourceType"] == "OperationOutcome"
            assert response.json["issue"][0]["code"] == "forbidden"
            assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    anonymous = call(client, method, path, body, NO_TOKEN)
    assert anonymous.status_code == (200 if allowed == "public" else 401)
    if allowed != "public":
        assert anonymous.json["issue"][0]["code"] == "login"
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_paths_need_a_token_too(client):
    assert client.get("/Nothing/here", headers=NO_TOKEN).status_code == 401
    assert client.get("/Nothing/here").status_code == 404


@pytest.mark.parametrize("header", ["Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer ", "bearer"])
def test_bad_credentials_are_401(client, header):
    response = client.get("/RiskAssessment", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json["resourceType"] == "OperationOutcome"


def test_every_denial_is_audited(client):
    client.get("/RiskAssessment", headers=NO_TOKEN)
    client.get("/RiskAssessment/x", headers={"Authorization": "Bearer wrong"})
    client.post("/Patient/demo-005/$assess", json=ASSESS, content_type=FHIR, headers=bearer(ROLE_TOKENS["auditor"]))
    client.get("/AuditEvent", headers=bearer(ROLE_TOKENS["ehr"]))
    denials = client.get("/AuditEvent?outcome=4").json["entry"]
    by_agent = {}
    for entry in denials:
        event = entry["resource"]
        by_agent.setdefault(event["agent"][0]["who"]["identifier"]["value"], []).append(event)
    assert len(by_agent["anonymous"]) == 2
    assert [e["action"] for e in by_agent["auditor-client"]] == ["E"]
    assert "401" in by_agent["anonymous"][0]["outcomeDesc"] or "401" in by_agent["anonymous"][1]["outcomeDesc"]
    assert "403" in by_agent["ehr-client"][0]["outcomeDesc"]
    assert by_agent["ehr-client"][0]["agent"][0]["role"][0]["coding"][0]["code"] == "ehr"


def test_misconfigured_tokens_stop_the_start(settings_overrides):
    with pytest.raises(ConfigurationError, match="FHIR_AI_AUTH_TOKENS"):
        create_app({**settings_overrides, "auth_tokens": "someone:superuser:abc"})
    with pytest.raises(ConfigurationError, match="ISSUER"):
        create_app({**settings_overrides, "auth_jwks_url": "https://idp.example/jwks"})


def test_no_token_may_take_fhir_ais_own_name(settings_overrides):
    """Scheduled ward jobs and Bulk Data runs are recorded under 'fhir-ai' (store.actors.LOCAL): a token of
    that name would own them (list, read, cancel)."""
    with pytest.raises(ConfigurationError, match="'fhir-ai' is fhir_ai's own"):
        create_app({**settings_overrides, "auth_tokens": f"fhir-ai:ehr:{'0' * 64}"})


def test_the_token_command_refuses_fhir_ais_own_name(runner):
    from fhir_ai.cli import main
    refused = runner.invoke(main, ["auth", "token", "--client", "fhir-ai", "--role", "ehr"])
    assert refused.exit_code == 2 and "fhir_ai's own name" in refused.output
    made = runner.invoke(main, ["auth", "token", "--client", "ward-7", "--role", "ehr"])
    assert made.exit_code == 0 and "FHIR_AI_AUTH_TOKENS entry: ward-7:ehr:" in made.output


# -- JWT ----------------------------------------------------------------------------------------
ISSUER, AUDIENCE = "https://idp.hospital.test", "https://fhir-ai.hospital.test"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key, kid, alg):
    data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()) if alg == "RS384"
                      else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


JWKS = {"keys": [jwk(RSA_KEY, "rsa-1", "RS384"), jwk(EC_KEY, "ec-1", "ES384")]}


def token(key=RSA_KEY, alg="RS384", kid="rsa-1", **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ehr-system-7", "exp": now + 300, "iat": now,
            "scope": "system/RiskAssessment.rs", **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def jwt_app(settings_overrides):
    app = create_app({**settings_overrides, "auth_jwks": json.dumps(JWKS), "auth_issuer": ISSUER,
                      "auth_audience": AUDIENCE})
    yield app
    app.extensions["fhir_ai"].close()


@pytest.mark.parametrize("make, status", [
    (lambda: token(), 200),
    (lambda: token(EC_KEY, "ES384", "ec-1"), 200),
    (lambda: token(scope="system/RiskAssessment.read openid"), 200),              # SMART v1 syntax
    (lambda: token(scope="system/*.read"), 200),
    (lambda: token(scope="system/Provenance.rs"), 403),
    (lambda: token(scope="patient/RiskAssessment.rs"), 403),                      # no patient context here
    (lambda: token(scope="user/RiskAssessment.rs"), 403),                         # no user permissions here
    (lambda: token(scope="user/*.cruds"), 403),                                   # ... so not the whole hospital
    (lambda: token(scope=None), 403),
    (lambda: token(exp=int(time.time()) - 3600), 401),
    (lambda: token(aud="https://elsewhere.test"), 401),
    (lambda: token(iss="https://evil.test"), 401),
    (lambda: token(exp=None), 401),
    (lambda: token(OTHER_KEY, kid="rsa-1"), 401),                                 # wrong signature
    (lambda: token(OTHER_KEY, kid="rsa-9"), 401),                                 # unknown kid
    (lambda: token(RSA_KEY, "RS256"), 401),                                       # algorithm not allowed
    (lambda: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
                        "a-shared-secret-that-is-long-enough-for-hs256", algorithm="HS256"), 401),
    (lambda: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
                        None, algorithm="none"), 401),
    (lambda: "a.b.c", 401),
])
def test_jwt_verification(jwt_app, make, status):
    client = jwt_app.test_client()
    response = client.get("/RiskAssessment", headers=bearer(make()))
    assert response.status_code == status, response.json
    if status == 200:
        event = client.get("/AuditEvent?subtype=search-type").json  # by the admin test token
        agents = {e["resource"]["agent"][0]["who"]["identifier"]["value"] for e in event["entry"]}
        assert "ehr-system-7" in agents


@responses.activate
def test_jwks_url_is_fetched_and_refetched_for_a_new_key(settings_overrides):
    url = "https://idp.hospital.test/jwks"
    responses.get(url, json={"keys": [jwk(RSA_KEY, "rsa-1", "RS384")]})
    app = create_app({**settings_overrides, "auth_jwks_url": url, "auth_issuer": ISSUER, "auth_audience": AUDIENCE})
    try:
        client = app.test_client()
        assert client.get("/RiskAssessment", headers=bearer(token())).status_code == 200
        assert client.get("/RiskAssessment", headers=bearer(token())).status_code == 200
        assert len(responses.calls) == 1                              # cached
        # The issuer rotates to a new key: the unknown kid triggers one more fetch.
        responses.replace(responses.GET, url, json={"keys": [jwk(EC_KEY, "ec-2", "ES384")]})
        assert client.get("/RiskAssessment", headers=bearer(token(EC_KEY, "ES384", "ec-2"))).status_code == 200
        assert len(responses.calls) == 2
    finally:
        app.extensions["fhir_ai"].close()
