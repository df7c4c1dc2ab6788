"""What the single-patient $assess path now computes once instead of per request gives what it gave."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import jwt
import numpy as np
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_ai.auth import scopes
from fhir_ai.auth.tokens import TokenVerifier
from fhir_ai.config import DEMO_HOSPITAL, Settings
from fhir_ai.errors import Unauthorized
from fhir_ai.features import FeatureSet
from fhir_ai.jobs import JobStore, runtime
from fhir_ai.jobs.celery_app import app as celery
from fhir_ai.mapping import load_directory
from fhir_ai.models.metrics import apply_calibration
from fhir_ai.models.registry import ModelRegistry

try:
    from .credentials import ROLE_TOKENS, bearer
    from .stored import risk_assessment, save
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]
    from stored import risk_assessment, save  # type: ignore[no-redef]


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


@pytest.mark.parametrize("model_id", ["deterioration", "triage"])
def test_explanations_come_from_the_tables_and_equal_pred_contrib(registry, model_id, monkeypatch):
    """One patient's explanation and a batch's come from the tabulated TreeSHAP (LightGBM is not asked),
    with LightGBM's values; a model the tables cannot take is explained by LightGBM; a registry of the
    same files shares one set of tables."""
    model = registry.get(model_id)[0]
    X = np.random.default_rng(5).normal(size=(40, len(model.feature_names))) * 20 + 50
    X[::3, ::4] = np.nan
    shape = (len(X), -1) if model.kind == "binary" else (len(X), len(model.classes), -1)
    expected = np.asarray(model.booster.predict(X, pred_contrib=True)).reshape(shape)
    registry.warm()
    asked = []
    original = model.booster.predict
    monkeypatch.setattr(model.booster, "predict", lambda *a, **k: asked.append(k) or original(*a, **k))
    for i in range(len(X)):
        assert np.allclose(model.contributions(X[i:i + 1]), expected[i:i + 1], rtol=0, atol=1e-9)
    assert np.allclose(model.contributions(X), expected, rtol=0, atol=1e-9)
    assert asked == []
    again = ModelRegistry.load(Settings().models_dir, load_directory(Settings().mappings_dir)).get(model_id)[0]
    assert again.explainer() is model.explainer() is not None
    # A structure the tables refuse (here: any, by a builder that refuses) falls back to pred_contrib.
    from fhir_ai.models import registry as registry_module
    monkeypatch.setattr(registry_module, "_EXPLAINERS", {})
    monkeypatch.setattr(registry_module.TreeExplainer, "from_booster",
                        classmethod(lambda cls, booster: (_ for _ in ()).throw(NotImplementedError("refused"))))
    refused = ModelRegistry.load(Settings().models_dir, load_directory(Settings().mappings_dir)).get(model_id)[0]
    monkeypatch.setattr(refused.booster, "predict", lambda *a, **k: asked.append(k) or original(*a, **k))
    assert refused.explainer() is None
    assert np.allclose(refused.contributions(X[:2]), expected[:2], rtol=0, atol=1e-9)
    assert asked and asked[0].get("pred_contrib") is True


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


@pytest.mark.parametrize("model_id", ["deterioration", "triage"])
def test_one_row_is_predicted_as_booster_predict_predicts_it_bit_for_bit(registry, model_id, monkeypatch):
    """One patient's row goes through LightGBM's single-row fast API (not Booster.predict): the same
    numbers, bit for bit, for rows with and without missing values, in the shape predict gives; several
    rows still go through Booster.predict; threads may share the predictor."""
    import threading
    model = registry.get(model_id)[0]
    X = np.random.default_rng(11).normal(size=(400, len(model.feature_names))) * 30 + 40
    X[::3, ::4] = np.nan
    X[5] = np.nan                                   # nothing known at all
    expected = model.booster.predict(X, num_threads=1)
    expected_f32 = model.booster.predict(X[7:8].astype(np.float32), num_threads=1)
    asked = []
    original = model.booster.predict
    monkeypatch.setattr(model.booster, "predict", lambda *a, **k: asked.append(1) or original(*a, **k))
    rows = [model.raw_probability(X[i:i + 1]) for i in range(len(X))]
    assert not asked, "a single row went through Booster.predict"
    assert all(r.shape == expected[:1].shape for r in rows)
    assert np.concatenate(rows).tobytes() == expected.tobytes()
    # A float32 or non-contiguous row is read as predict reads it.
    assert model.raw_probability(np.asfortranarray(X[7:8]).astype(np.float32)).tobytes() == expected_f32.tobytes()
    assert not asked
    assert model.raw_probability(X[:3]).tobytes() == expected[:3].tobytes() and len(asked) == 1
    # Threads at once get each their own row's answer.
    found: dict[int, bytes] = {}

    def work(start: int) -> None:
        for i in range(start, len(X), 4):
            found[i] = model.raw_probability(X[i:i + 1]).tobytes()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(found[i] == expected[i:i + 1].tobytes() for i in range(len(X)))
    with pytest.raises(ValueError):
        model._single_row().predict(X[0, :-1])


# -- the parsed-once role scopes, through the API ---------------------------------------------------------
# Every request of a static token reads its role's scopes parsed once (scopes.role_scopes). Comparing that
# copy with a fresh parse only finds drift between the two; here each configured role's token is sent to
# every route and must get exactly what its scopes grant, and a 403 OperationOutcome naming the missing
# scope (with nothing done) for the rest.

# The roles as scopes.ROLES defines them (least privilege; its comments say what each role is for).
GRANTS = {
    "ehr": {"RiskAssessment": "crus"},           # assess (c), read and search (r s), withdraw (u)
    "integrator": {"Mapping": "ru", "WriteBack": "rs"},    # check (r) and reload (u) mappings, watch the outbox
    "auditor": {"RiskAssessment": "rs", "Provenance": "rs", "AuditEvent": "rs"},  # reads only
    "admin": {"*": "cruds"},                     # operators: everything
}
PUBLIC_ROUTES = {("GET", "/metadata"), ("GET", "/health"), ("GET", "/OperationDefinition/assess"),
                 ("GET", "/OperationDefinition/assess-bundle"), ("GET", "/OperationDefinition/group-assess"),
                 ("GET", "/OperationDefinition/assess-all"), ("GET", "/OperationDefinition/withdraw"),
                 ("GET", "/cds-services")}
FLASK_STATIC = ("GET", "/static/<path:filename>")     # Flask's own; fhir_ai has no static folder
OWN_AUTH_ROUTES = {("POST", "/cds-services/<service_id>"), ("POST", "/cds-services/<service_id>/feedback"),
                   ("POST", "/subscriptions/notify")}      # CDS Hooks JWTs, subscription notification tokens
ASSESS_AT = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]}
# (method, route, path, body, the scope it needs, the status when allowed). {role} is the caller's role;
# {audit} an AuditEvent id. A body "push" is the demo patient's record as a Bundle.
ROUTES = [
    ("POST", "/Patient/<patient_id>/$assess", "/Patient/demo-005/$assess", ASSESS_AT, "RiskAssessment.c", 200),
    ("POST", "/$assess", "/$assess", "push", "RiskAssessment.c", 200),
    ("POST", "/Group/<group_id>/$assess", "/Group/ward/$assess", ASSESS_AT, "RiskAssessment.c", 202),
    ("POST", "/$assess-all", "/$assess-all", ASSESS_AT, "RiskAssessment.c", 202),
    ("GET", "/jobs", "/jobs", None, "RiskAssessment.r", 200),
    ("GET", "/jobs/<job_id>", "/jobs/job-{role}", None, "RiskAssessment.r", 202),
    ("DELETE", "/jobs/<job_id>", "/jobs/job-{role}", None, "RiskAssessment.c", 202),
    ("GET", "/RiskAssessment", "/RiskAssessment?patient=p1", None, "RiskAssessment.s", 200),
    ("GET", "/RiskAssessment/<resource_id>", "/RiskAssessment/m1", None, "RiskAssessment.r", 200),
    ("GET", "/RiskAssessment/<resource_id>/_history", "/RiskAssessment/m1/_history", None, "RiskAssessment.r", 200),
    ("GET", "/RiskAssessment/_history", "/RiskAssessment/_history", None, "RiskAssessment.r", 200),
    ("GET", "/RiskAssessment/<resource_id>/_history/<version>", "/RiskAssessment/m1/_history/1", None,
     "RiskAssessment.r", 200),
    ("POST", "/RiskAssessment/<resource_id>/$withdraw", "/RiskAssessment/m1/$withdraw",
     {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "test"}]}, "RiskAssessment.u", 200),
    ("GET", "/Provenance", "/Provenance?target=RiskAssessment/m1", None, "Provenance.s", 200),
    ("GET", "/Provenance/<resource_id>", "/Provenance/prov-m1-1", None, "Provenance.r", 200),
    ("GET", "/AuditEvent", "/AuditEvent?action=C", None, "AuditEvent.s", 200),
    ("GET", "/AuditEvent/<resource_id>", "/AuditEvent/{audit}", None, "AuditEvent.r", 200),
    ("GET", "/audit/cds-cards", "/audit/cds-cards", None, "AuditEvent.s", 200),
    ("GET", "/mappings", "/mappings", None, "Mapping.r", 200),
    ("POST", "/mappings/$check", "/mappings/$check", None, "Mapping.r", 200),
    ("POST", "/mappings/$reload", "/mappings/$reload", None, "Mapping.u", 200),
    ("GET", "/write-back", "/write-back", None, "WriteBack.s", 200),
]


def _granted(role: str, needed: str) -> bool:
    resource, letter = needed.split(".")
    return any(letter in GRANTS[role].get(key, "") for key in (resource, "*"))


@pytest.fixture
def one_patient_hospital(tmp_path, settings_overrides):
    """The demo hospital cut down to demo-005 (in a Group 'ward'), so the batch kick-offs stay small.

    It changes settings_overrides: a test asks for it before ``app``."""
    folder = tmp_path / "hospital"
    folder.mkdir()
    for kind in ("Patient", "Encounter", "Observation"):
        lines = [line for line in (DEMO_HOSPITAL / f"{kind}.ndjson").read_bytes().splitlines()
                 if b'"demo-005"' in line or b'"Patient/demo-005"' in line]
        (folder / f"{kind}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "Group.ndjson").write_text(json.dumps({
        "resourceType": "Group", "id": "ward", "type": "person", "actual": True,
        "member": [{"entity": {"reference": "Patient/demo-005"}}]}) + "\n")
    settings_overrides["source_url"] = str(folder)
    return folder


@pytest.fixture
def eager_jobs():
    """Batch tasks run inside the request (no broker), as in test_jobs."""
    saved = celery.conf.task_always_eager, celery.conf.task_eager_propagates
    celery.conf.task_always_eager = celery.conf.task_eager_propagates = True
    yield
    celery.conf.task_always_eager, celery.conf.task_eager_propagates = saved
    runtime.close()


def _routed(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_is_in_the_role_table(app):
    assert _routed(app) == {(method, rule) for method, rule, *_ in ROUTES} | PUBLIC_ROUTES | OWN_AUTH_ROUTES | {
        FLASK_STATIC}
    assert set(GRANTS) == set(scopes.ROLES) == set(ROLE_TOKENS)      # a new role needs a row here and a token


@pytest.mark.parametrize("role", sorted(scopes.ROLES))
def test_each_role_can_do_what_its_scopes_grant_and_nothing_else(one_patient_hospital, eager_jobs, app, client, role):
    parsed = scopes.role_scopes(role)          # what every request with this role's static token is given
    assert {k: set(v) for k, v in parsed.grants.items()} == {k: set(v) for k, v in GRANTS[role].items()}
    runtime.configure(app.config["FHIR_AI"], app.extensions["fhir_ai"])
    save(app, risk_assessment("m1"))
    JobStore(app.extensions["fhir_ai"].store).create(
        f"job-{role}", kind="group", scope="ward", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
        request={"request": "test"}, requested_by=f"{role}-client", requested_role=role)
    audit_id = client.get("/AuditEvent?_count=1").json["entry"][0]["resource"]["id"]      # (the admin token)
    push = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": orjson.loads(line)} for kind in ("Patient", "Encounter", "Observation")
            for line in (one_patient_hospital / f"{kind}.ndjson").read_bytes().splitlines()]}},
        {"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]}
    allowed, refused = [], []
    for method, rule, path, body, needed, ok in ROUTES:
        headers = bearer(ROLE_TOKENS[role]) | ({"Prefer": "respond-async"} if ok == 202 and method == "POST" else {})
        path = path.format(role=role, audit=audit_id)
        if body is None:
            response = client.open(path, method=method, headers=headers)
        else:
            response = client.open(path, method=method, json=push if body == "push" else body,
                                   content_type="application/fhir+json", headers=headers)
        if _granted(role, needed):
            assert response.status_code == ok, (role, method, path, response.get_json())
            allowed.append(rule)
        else:
            assert response.status_code == 403, (role, method, path, response.get_json())
            assert response.json["resourceType"] == "OperationOutcome"
            assert response.json["issue"][0]["code"] == "forbidden"
            assert f'scope="system/{needed}"' in response.headers["WWW-Authenticate"]
            refused.append(rule)
    assert allowed and (refused or role == "admin")
    # What was refused left no trace: no assessment made, m1 not withdrawn, the role's job still there.
    assert (client.get("/RiskAssessment?patient=Patient/demo-005").json["total"] > 0) == _granted(
        role, "RiskAssessment.c")
    assert client.get("/RiskAssessment/m1").json["status"] == (
        "entered-in-error" if _granted(role, "RiskAssessment.u") else "final")
    assert (client.get(f"/jobs/job-{role}").status_code == 404) == _granted(role, "RiskAssessment.c")


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


def test_a_forked_worker_freezes_what_was_loaded_and_collects_less_often() -> None:
    """gunicorn's post_fork hook, run in a fresh interpreter (it changes the collector of its process)."""
    import subprocess
    import sys
    script = ("import gc; from fhir_ai import server; before = gc.get_freeze_count(); server._post_fork(None, None); "
              "print(gc.get_threshold() == server.GC_THRESHOLDS, gc.get_threshold()[0] > 700, "
              "gc.get_freeze_count() > before)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True"]



@pytest.mark.parametrize("warm", [False, True])
def test_a_worker_forked_after_the_models_were_loaded_can_load_them_again(warm: bool) -> None:
    """gunicorn loads the models (and builds the explanation tables) in its master, then forks; a mapping
    $reload makes a worker load the models again. With GNU OpenMP's thread pool started in the master,
    that second load hung for ever in the worker; it must finish (in a fresh interpreter: it forks)."""
    import subprocess
    import sys
    script = f"""
import os, signal
from fhir_ai.config import Settings
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry
settings = Settings()
registry = ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))
if {warm}:
    registry.warm()
pid = os.fork()
if pid == 0:
    signal.alarm(30)                      # a hang ends the child with SIGALRM
    again = ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir))
    again.get("deterioration")[0].booster.predict(__import__("numpy").zeros((64, 149)))   # several threads
    os._exit(0)
print(os.waitpid(pid, 0)[1])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0"]


def test_a_prefork_worker_builds_the_tables_before_its_pool_forks(monkeypatch) -> None:
    """fhir-ai worker (prefork) builds each model's TreeSHAP tables in the parent: pool processes forked
    afterwards find them in the per-process cache instead of building their own."""
    import hashlib
    from pathlib import Path

    from fhir_ai.jobs import worker
    from fhir_ai.models import registry as registry_module
    monkeypatch.setattr(registry_module, "_EXPLAINERS", {})
    settings = Settings()
    worker._build_tables(settings)
    keys = {hashlib.sha256((Path(settings.models_dir) / m / "model.txt").read_bytes()).hexdigest()
            for m in ("deterioration", "triage")}
    assert keys <= set(registry_module._EXPLAINERS)
    child = ModelRegistry.load(settings.models_dir, load_directory(settings.mappings_dir)).get("deterioration")[0]
    assert child.explainer() is registry_module._EXPLAINERS[child.file_key]
