"""The EHR's CDS Hooks JWT: accepted when right, refused for every rule it breaks (keys made here)."""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Any

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fhir_ai.cds.jwt_verify import JwtVerifier, parse_issuers
from fhir_ai.errors import ConfigurationError, Unauthorized

ISS = "https://fhir-ehr.example.com/"
AUD = "https://cds.example.org/cds-services/deterioration"
JKU = "https://fhir-ehr.example.com/jwk_uri"
JWKS_URL = "https://fhir-ehr.example.com/.well-known/jwks.json"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


JWKS = {"keys": [public_jwk(RSA_KEY, "rsa-1", "RS384"), public_jwk(EC_KEY, "ec-1", "ES384")]}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {"iss": ISS, "aud": AUD, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()),
           "tenant": "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def token(alg: str = "RS384", key: Any = None, kid: str | None = "rsa-1", payload: dict[str, Any] | None = None,
          **header: Any) -> str:
    if key is None:
        key = RSA_KEY if alg.startswith("RS") else EC_KEY
    headers = {"typ": "JWT", **header}
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload if payload is not None else claims(), key, algorithm=alg, headers=headers)


class Seen:
    """In-memory stand-in for Store.use_jti."""

    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()

    def __call__(self, issuer: str, jti: str, expires: datetime) -> bool:
        if (issuer, jti) in self.ids:
            return False
        self.ids.add((issuer, jti))
        return True


def verifier(issuers: dict[str, Any] | None = None) -> JwtVerifier:
    config = issuers if issuers is not None else {ISS: {"jwks": JWKS, "jku": [JKU]}}
    return JwtVerifier(parse_issuers(json.dumps(config)), Seen())


def refused(v: JwtVerifier, bearer: str | None, match: str, audience: str = AUD) -> None:
    with pytest.raises(Unauthorized, match=match):
        v.verify(bearer, audience)


# -- accepted -----------------------------------------------------------------------------------------

def test_rs384_with_configured_jwks_is_accepted() -> None:
    verified = verifier().verify(f"Bearer {token('RS384')}", AUD)
    assert verified.issuer == ISS and verified.tenant == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"


def test_es384_is_accepted_and_aud_may_be_an_array() -> None:
    bearer = f"Bearer {token('ES384', kid='ec-1', payload=claims(aud=[AUD]))}"
    assert verifier().verify(bearer, AUD).issuer == ISS


@responses.activate
def test_jku_on_the_allow_list_is_fetched_once_and_cached() -> None:
    responses.get(JKU, json={"keys": [public_jwk(EC_KEY, "ec-jku", "ES384")]})
    v = verifier({ISS: {"jku": [JKU]}})
    for _ in range(2):
        v.verify(f"Bearer {token('ES384', kid='ec-jku', jku=JKU)}", AUD)
    assert len(responses.calls) == 1


@responses.activate
def test_configured_jwks_url_is_used_without_jku() -> None:
    responses.get(JWKS_URL, json=JWKS)
    v = verifier({ISS: {"jwks_url": JWKS_URL}})
    assert v.verify(f"Bearer {token()}", AUD).jti


def test_spec_example_header_and_payload_shape_are_what_we_check() -> None:
    """The spec's own example header/payload (spec-22, spec-23) carry exactly the fields we require."""
    base = "/work/shared/conformance/cds-hooks/spec-2.0.1-examples/"
    with open(base + "spec-22-example.json") as f:
        header = json.load(f)
    with open(base + "spec-23-example.json") as f:
        payload = json.load(f)
    assert header["alg"] == "ES384" and header["kid"] and header["typ"] == "JWT"
    # Re-sign the example payload with our key (and fresh times): accepted for its own aud.
    now = int(time.time())
    signed = token("ES384", kid="ec-1", payload={**payload, "exp": now + 60, "iat": now})
    assert verifier().verify(f"Bearer {signed}", payload["aud"]).tenant == payload["tenant"]


# -- every rejection ----------------------------------------------------------------------------------

def test_no_authorization_header() -> None:
    refused(verifier(), None, "Authorization: Bearer")


def test_not_a_bearer_token() -> None:
    refused(verifier(), f"Basic {token()}", "must be 'Bearer")


def test_malformed_token() -> None:
    refused(verifier(), "Bearer not.a.jwt", "malformed")


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": "rsa-1"})
    refused(verifier(), f"Bearer {unsigned}", "alg 'none'")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_is_refused(alg: str) -> None:
    signed = jwt.encode(claims(), "a-shared-secret-" * 8, algorithm=alg,
                        headers={"kid": "rsa-1"})
    refused(verifier(), f"Bearer {signed}", "symmetric")


def test_hmac_signed_with_the_public_key_is_refused() -> None:
    """The classic algorithm-confusion attack: HS384 keyed with the RSA public key's PEM."""
    from cryptography.hazmat.primitives import serialization
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    import hmac
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing = b64(json.dumps({"alg": "HS384", "kid": "rsa-1", "typ": "JWT"}).encode()) + "." + \
        b64(json.dumps(claims()).encode())
    forged = signing + "." + b64(hmac.new(pem, signing.encode(), hashlib.sha384).digest())
    refused(verifier(), f"Bearer {forged}", "symmetric")


def test_other_asymmetric_algorithms_are_refused() -> None:
    refused(verifier(), f"Bearer {token('RS256')}", "not accepted")


def test_missing_kid() -> None:
    refused(verifier(), f"Bearer {token(kid=None)}", "no kid")


def test_wrong_typ() -> None:
    refused(verifier(), f"Bearer {token(typ='at+jwt')}", "typ must be JWT")


def test_unknown_issuer() -> None:
    refused(verifier(), f"Bearer {token(payload=claims(iss='https://evil.example/'))}", "not trusted")


def test_missing_issuer() -> None:
    refused(verifier(), f"Bearer {token(payload=claims(iss=None))}", "not trusted")


@responses.activate
def test_jku_not_on_the_allow_list_is_never_fetched() -> None:
    refused(verifier(), f"Bearer {token(jku='https://evil.example/jwks')}", "not on the allow-list")
    assert len(responses.calls) == 0


def test_jku_allowed_for_another_issuer_only() -> None:
    v = verifier({ISS: {"jwks": JWKS}, "https://other-ehr.example/": {"jku": [JKU]}})
    refused(v, f"Bearer {token(jku=JKU)}", "not on the allow-list")


@responses.activate
def test_jku_that_cannot_be_fetched() -> None:
    responses.get(JKU, status=503)
    refused(verifier({ISS: {"jku": [JKU]}}), f"Bearer {token(jku=JKU)}", "cannot fetch the JWK Set")


def test_unknown_kid() -> None:
    refused(verifier(), f"Bearer {token(kid='rotated-away')}", "no key 'rotated-away'")


def test_signature_by_another_key_under_a_known_kid() -> None:
    refused(verifier(), f"Bearer {token(key=OTHER_RSA)}", "signature does not verify")


def test_key_type_does_not_match_the_algorithm() -> None:
    refused(verifier(), f"Bearer {token('ES384', kid='rsa-1')}", "not for ES384")


@pytest.mark.parametrize("aud", [AUD + "/", "https://cds.example.org/cds-services/triage",
                                 "https://cds.example.org/cds-services", ["https://x.example/"]])
def test_aud_must_be_exactly_the_url_called(aud: Any) -> None:
    refused(verifier(), f"Bearer {token(payload=claims(aud=aud))}", "aud must be exactly")


def test_expired() -> None:
    past = int(time.time()) - 3600
    refused(verifier(), f"Bearer {token(payload=claims(exp=past, iat=past - 60))}", "expired")


@pytest.mark.parametrize("claim", ["exp", "iat", "jti", "aud"])
def test_required_claims(claim: str) -> None:
    refused(verifier(), f"Bearer {token(payload=claims(**{claim: None}))}", f"'{claim}'")


def test_lifetime_longer_than_allowed() -> None:
    far = int(time.time()) + 7 * 24 * 3600
    refused(verifier(), f"Bearer {token(payload=claims(exp=far))}", "lives longer")


def test_replayed_jti_is_refused() -> None:
    v = verifier()
    bearer = f"Bearer {token()}"
    v.verify(bearer, AUD)
    refused(v, bearer, "already used")


def test_replay_is_refused_by_the_store_across_verifiers(database_url: str) -> None:
    """Two workers (two verifiers) share the store: a token used at one is refused at the other."""
    from fhir_ai.store import Store
    store = Store(database_url)
    try:
        config = parse_issuers({ISS: {"jwks": JWKS}})
        first, second = JwtVerifier(config, store.use_jti), JwtVerifier(config, store.use_jti)
        bearer = f"Bearer {token()}"
        first.verify(bearer, AUD)
        refused(second, bearer, "already used")
    finally:
        store.close()


def test_issuer_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="give jwks"):
        parse_issuers(json.dumps({ISS: {}}))
    with pytest.raises(ConfigurationError, match="not JSON"):
        parse_issuers("{not json")
    assert parse_issuers("") == {}
