"""What the single-patient $assess path now computes once instead of per request gives what it gave."""
from __future__ import annotations

import json
import time

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_ai.auth import scopes
from fhir_ai.auth.tokens import TokenVerifier
from fhir_ai.config import Settings
from fhir_ai.errors import Unauthorized
from fhir_ai.features import FeatureSet
from fhir_ai.mapping import load_directory
from fhir_ai.models.metrics import apply_calibration
from fhir_ai.models.registry import ModelRegistry


@pytest.fixture(scope="module")
def registry():
    settings = Settings()
    return ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))


@pytest.mark.parametrize("model_id", ["deterioration", "triage"])
def test_missing_inputs_are_the_feature_inputs_without_a_value(registry, model_id):
    mapping = registry.get(model_id)[1]
    rng = np.random.default_rng(7)
    present = rng.random((40, len(mapping.input_list))) < 0.5
    present[0], present[1] = False, True
    fs = FeatureSet(mapping, [f"p{i}" for i in range(40)], np.full((40, len(mapping.features)), np.nan),
                    np.zeros(40), [None] * 40, [[] for _ in range(40)], [[] for _ in range(40)], present)
    for row in range(40):
        expected = [name for name in dict.fromkeys(f.input for f in mapping.features)
                    if not present[row, mapping.inputs[name].index]]
        assert fs.missing_inputs(row) == expected
    assert fs.missing_inputs(1) == [] and len(fs.missing_inputs(0)) == len({f.input for f in mapping.features})


def test_calibrated_probability_is_the_cards_calibration_bit_for_bit(registry):
    model = registry.get("deterioration")[0]
    assert model.card["calibration"]["kind"] == "isotonic"
    X = np.random.default_rng(3).normal(size=(300, len(model.feature_names))) * 20 + 50
    X[::7, ::3] = np.nan
    raw = model.raw_probability(X)
    expected = np.clip(apply_calibration(model.card["calibration"], raw), 0.0, 1.0)
    for _ in range(2):                       # the knots are made into arrays once, then reused
        assert model.probability(X).tobytes() == expected.tobytes()
    # A card whose calibration is replaced (a new dict) is followed, not the arrays made before.
    original = model.card["calibration"]
    try:
        model.card["calibration"] = {"kind": "platt", "a": 2.0, "b": -1.0}
        assert model.probability(X).tobytes() == np.clip(
            apply_calibration(model.card["calibration"], raw), 0.0, 1.0).tobytes()
    finally:
        model.card["calibration"] = original
    assert model.probability(X).tobytes() == expected.tobytes()


def test_role_scopes_are_the_parsed_roles():
    for role, text in scopes.ROLES.items():
        assert scopes.role_scopes(role) == scopes.Scopes.parse(text)
    with pytest.raises(KeyError):
        scopes.role_scopes("superuser")


ISSUER, AUDIENCE = "https://idp.hospital.test", "https://fhir-ai.hospital.test"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(kid: str) -> dict:
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())), "kid": kid, "alg": "RS384"}


def _token(kid: str) -> str:
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "ehr-1", "exp": int(time.time()) + 300,
                       "scope": "system/RiskAssessment.rs"}, KEY, algorithm="RS384", headers={"kid": kid})


def test_parsed_signing_keys_follow_each_fetch():
    served = [{"keys": [_jwk("k1")]}]
    verifier = TokenVerifier(static=[], jwks_url="https://idp.hospital.test/jwks", fetch=lambda url: served[0],
                             issuers=[ISSUER], audience=AUDIENCE)
    for _ in range(2):
        assert verifier.verify(_token("k1")).client_id == "ehr-1"
    # The issuer rotates: an unknown kid fetches again, and the new set's keys are the ones used.
    served[0] = {"keys": [_jwk("k2")]}
    assert verifier.verify(_token("k2")).client_id == "ehr-1"
    with pytest.raises(Unauthorized, match="kid"):
        verifier.verify(_token("k1"))
    # A fetched set where one key is unusable: the usable one still verifies, request after request.
    verifier = TokenVerifier(static=[], jwks_url="https://idp.hospital.test/jwks",
                             fetch=lambda url: {"keys": [{"kty": "RSA", "kid": "bad"}, _jwk("k3")]},
                             issuers=[ISSUER], audience=AUDIENCE)
    for _ in range(2):
        assert verifier.verify(_token("k3")).client_id == "ehr-1"


def test_configured_keys_are_used_on_every_request_and_a_bad_set_fails_every_time():
    verifier = TokenVerifier(static=[], jwks={"keys": [_jwk("k1")]}, issuers=[ISSUER], audience=AUDIENCE)
    for _ in range(3):
        assert verifier.verify(_token("k1")).scopes == scopes.Scopes.parse("system/RiskAssessment.rs")
    broken = TokenVerifier(static=[], jwks={"keys": []}, issuers=[ISSUER], audience=AUDIENCE)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="no usable signing key"):
            broken.verify(_token("k1"))


def test_a_fetched_set_without_a_usable_key_is_a_401_not_a_crash(caplog):
    verifier = TokenVerifier(static=[], jwks_url="https://idp.hospital.test/jwks",
                             fetch=lambda url: {"keys": [{"kty": "RSA", "kid": "bad"}]},
                             issuers=[ISSUER], audience=AUDIENCE)
    with caplog.at_level("WARNING"):
        with pytest.raises(Unauthorized, match="kid"):
            verifier.verify(_token("k1"))
    assert "holds no usable key" in caplog.text


def test_a_configured_set_without_a_usable_key_stops_start_up_with_a_clear_error():
    from fhir_ai.auth.tokens import _load_jwks
    from fhir_ai.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="auth_jwks|JWKS"):
        _load_jwks(json.dumps({"keys": [{"kty": "RSA", "kid": "bad"}]}))
