"""SMART Backend Services: signed assertions (RS384, ES384) checked with real keys, token caching,
renewal before expiry, and exactly one renewal on 401 — token endpoint stubbed with `responses`."""
from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qs

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_ai.config import load_settings
from fhir_ai.errors import ConfigurationError, UpstreamError
from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.smart import (ASSERTION_TYPE, SmartBackendAuth, auth_from_settings,
                                load_private_key, public_jwk)

BASE = "https://ehr.example.org/fhir"
TOKEN_URL = "https://auth.example.org/oauth/token"
CLIENT = "fhir-ai-test-client"


def make_key(alg: str):
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1())


def pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class TokenServer:
    """The hospital's authorisation server: discovery document and a token endpoint that records
    every request and answers with numbered tokens."""

    def __init__(self, rsps: responses.RequestsMock, expires_in: int | None = 300) -> None:
        self.forms: list[dict[str, str]] = []
        self.expires_in = expires_in
        rsps.get(f"{BASE}/.well-known/smart-configuration",
                 json={"token_endpoint": TOKEN_URL, "grant_types_supported": ["client_credentials"]})
        rsps.add_callback(responses.POST, TOKEN_URL, callback=self._token)

    def _token(self, request):  # type: ignore[no-untyped-def]
        form = {k: v[0] for k, v in parse_qs(request.body).items()}
        self.forms.append(form)
        body = {"access_token": f"token-{len(self.forms)}", "token_type": "bearer",
                "scope": form.get("scope", "")}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_is_signed_and_verifiable_with_the_public_key(rsps, alg: str) -> None:
    key, clock = make_key(alg), Clock()
    server = TokenServer(rsps)
    auth = SmartBackendAuth(BASE, CLIENT, key, alg=alg, kid="key-1", clock=clock)

    assert auth.headers() == {"Authorization": "Bearer token-1"}

    form = server.forms[0]
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert form["scope"].split() == ["system/Patient.rs", "system/Encounter.rs",
                                     "system/Observation.rs", "system/RiskAssessment.cu"]
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == alg and header["kid"] == "key-1" and header["typ"] == "JWT"
    claims = jwt.decode(assertion, key.public_key(), algorithms=[alg], audience=TOKEN_URL,
                        options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]})
    assert claims["iss"] == claims["sub"] == CLIENT
    assert claims["aud"] == TOKEN_URL                   # the discovered token URL
    assert 0 < claims["exp"] - clock.now <= 300
    # a different key (same algorithm) must not verify it: the signature is real
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(assertion, make_key(alg).public_key(), algorithms=[alg], audience=TOKEN_URL)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_default_kid_is_the_jwk_thumbprint_of_the_registered_key(alg: str) -> None:
    key = make_key(alg)
    auth = SmartBackendAuth(BASE, CLIENT, key, alg=alg, token_url=TOKEN_URL)
    jwk = public_jwk(key, alg)
    assert auth.kid == jwk["kid"] and len(jwk["kid"]) == 43       # base64url sha-256
    assert jwt.get_unverified_header(auth.assertion(TOKEN_URL))["kid"] == jwk["kid"]
    assert "d" not in jwk                                          # never the private part
    verified = jwt.decode(auth.assertion(TOKEN_URL), jwt.PyJWK(jwk).key, algorithms=[alg],
                          audience=TOKEN_URL)
    assert verified["iss"] == CLIENT


def test_every_assertion_has_a_new_jti() -> None:
    auth = SmartBackendAuth(BASE, CLIENT, make_key("RS384"), token_url=TOKEN_URL)
    jtis = {jwt.decode(auth.assertion(TOKEN_URL), options={"verify_signature": False})["jti"]
            for _ in range(50)}
    assert len(jtis) == 50


def test_token_is_cached_then_renewed_before_expiry(rsps) -> None:
    clock = Clock()
    server = TokenServer(rsps, expires_in=300)
    auth = SmartBackendAuth(BASE, CLIENT, make_key("ES384"), alg="ES384", clock=clock)
    start = clock.now
    for _ in range(5):
        assert auth.headers()["Authorization"] == "Bearer token-1"
    clock.now = start + 239          # 61 s left: still good
    assert auth.headers()["Authorization"] == "Bearer token-1"
    clock.now = start + 241          # within the last minute: renewed before it expires
    assert auth.headers()["Authorization"] == "Bearer token-2"
    assert len(server.forms) == 2
    assert len(rsps.calls) == 3      # discovery once, two token requests
    jtis = {jwt.decode(f["client_assertion"], options={"verify_signature": False})["jti"]
            for f in server.forms}
    assert len(jtis) == 2


def test_short_lived_token_is_renewed_at_half_life(rsps) -> None:
    clock = Clock()
    server = TokenServer(rsps, expires_in=40)
    auth = SmartBackendAuth(BASE, CLIENT, make_key("RS384"), clock=clock)
    auth.headers()
    clock.now += 19
    auth.headers()
    assert len(server.forms) == 1
    clock.now += 2
    auth.headers()
    assert len(server.forms) == 2


def test_configured_token_url_skips_discovery(rsps) -> None:
    TokenServer(rsps)
    auth = SmartBackendAuth(BASE, CLIENT, make_key("RS384"), token_url=TOKEN_URL)
    auth.headers()
    assert [c.request.url for c in rsps.calls] == [TOKEN_URL]


def test_client_renews_once_on_401_and_then_succeeds(rsps) -> None:
    server = TokenServer(rsps)
    seen: list[str] = []

    def patient(request):  # type: ignore[no-untyped-def]
        seen.append(request.headers["Authorization"])
        if len(seen) == 1:
            return 401, {}, ""
        return 200, {"Content-Type": "application/fhir+json"}, '{"resourceType":"Patient","id":"p1"}'

    rsps.add_callback(responses.GET, f"{BASE}/Patient/p1", callback=patient)
    client = FhirClient(BASE, auth=SmartBackendAuth(BASE, CLIENT, make_key("RS384")), retries=0)
    assert client.get("Patient/p1")["id"] == "p1"
    assert seen == ["Bearer token-1", "Bearer token-2"]
    assert len(server.forms) == 2


def test_client_gives_up_after_one_renewal(rsps) -> None:
    server = TokenServer(rsps)
    rsps.get(f"{BASE}/Patient/p1", status=401, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "login", "diagnostics": "token not accepted"}]})
    client = FhirClient(BASE, auth=SmartBackendAuth(BASE, CLIENT, make_key("RS384")), retries=3,
                        sleep=lambda s: None)
    with pytest.raises(UpstreamError) as caught:
        client.get("Patient/p1")
    assert caught.value.upstream_status == 401 and not caught.value.temporary
    assert "token not accepted" in caught.value.message
    assert len(server.forms) == 2                                   # one renewal, no more
    assert len([c for c in rsps.calls if "/Patient/" in c.request.url]) == 2


def test_token_endpoint_refusal_is_a_permanent_upstream_error(rsps) -> None:
    rsps.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": TOKEN_URL})
    rsps.post(TOKEN_URL, status=401, json={"error": "invalid_client",
                                           "error_description": "unknown kid"})
    auth = SmartBackendAuth(BASE, CLIENT, make_key("RS384"))
    with pytest.raises(UpstreamError, match="invalid_client unknown kid") as caught:
        auth.headers()
    assert caught.value.temporary is False


def test_token_endpoint_outage_is_temporary(rsps) -> None:
    rsps.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": TOKEN_URL})
    rsps.post(TOKEN_URL, status=503)
    with pytest.raises(UpstreamError) as caught:
        SmartBackendAuth(BASE, CLIENT, make_key("RS384")).headers()
    assert caught.value.temporary is True


def test_discovery_without_token_endpoint_is_an_error(rsps) -> None:
    rsps.get(f"{BASE}/.well-known/smart-configuration", json={"capabilities": []})
    with pytest.raises(UpstreamError, match="no token_endpoint"):
        SmartBackendAuth(BASE, CLIENT, make_key("RS384")).headers()


@pytest.mark.parametrize("alg, key", [
    ("RS384", lambda: ec.generate_private_key(ec.SECP384R1())),
    ("ES384", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("ES384", lambda: ec.generate_private_key(ec.SECP256R1())),
    ("HS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
])
def test_key_must_fit_the_algorithm(alg, key) -> None:
    with pytest.raises(ConfigurationError):
        SmartBackendAuth(BASE, CLIENT, key(), alg=alg)


def test_settings_build_the_auth_from_a_pem_file_and_never_log_secrets(tmp_path, rsps,
                                                                       caplog) -> None:
    key = make_key("ES384")
    key_file = tmp_path / "client.pem"
    key_file.write_text(pem(key))
    settings = load_settings({"source_url": BASE, "smart_client_id": CLIENT,
                              "smart_private_key": str(key_file), "smart_alg": "ES384"})
    TokenServer(rsps)
    caplog.set_level(logging.DEBUG)
    auth = auth_from_settings(settings)
    assert auth is not None and auth.alg == "ES384"
    assert auth.headers()["Authorization"] == "Bearer token-1"
    text = caplog.text + repr(auth) + repr(settings)
    assert "token-1" not in text and "PRIVATE KEY" not in text
    # PEM text works as well as a path
    assert load_private_key(pem(key)).private_numbers() == key.private_numbers()


def test_settings_without_smart_client_mean_no_auth_and_bad_setups_are_refused(tmp_path) -> None:
    assert auth_from_settings(load_settings({"source_url": BASE})) is None
    with pytest.raises(ConfigurationError, match="PRIVATE_KEY"):
        auth_from_settings(load_settings({"source_url": BASE, "smart_client_id": CLIENT}))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        auth_from_settings(load_settings({"source_url": BASE, "smart_client_id": CLIENT,
                                          "smart_private_key": str(tmp_path / "missing.pem")}))
    with pytest.raises(ConfigurationError, match="not both"):
        auth_from_settings(load_settings({"source_url": BASE, "smart_client_id": CLIENT,
                                          "smart_private_key": pem(make_key("RS384")),
                                          "source_token": "static"}))


def test_static_bearer_token_still_works(rsps) -> None:
    rsps.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    FhirClient(BASE, token="static-token").get("Patient/p1")
    assert rsps.calls[0].request.headers["Authorization"] == "Bearer static-token"
    with pytest.raises(ConfigurationError):
        FhirClient(BASE, token="static-token",
                   auth=SmartBackendAuth(BASE, CLIENT, make_key("RS384")))
