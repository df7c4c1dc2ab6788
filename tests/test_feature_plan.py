"""The per-mapping extraction plan: every feature window of every patient in one pass gives what one
window at a time gives; the plan is made once per loaded mapping."""
from __future__ import annotations

import gc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from fhir_ai.features import Extractor
from fhir_ai.features.aggregate import grouped
from fhir_ai.features.plan import plan_for
from fhir_ai.fhir import times
from fhir_ai.mapping import load_mapping

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
AS_OF = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
HR, RR, GCS = "8867-4", "9279-1", "9269-2"

MAPPING = """
model: {model}
version: '1'
defaults:
  statuses: [final, amended]
  window: {{start: -48h, end: 0h}}
inputs:
  heart_rate:
    resource: Observation
    label: Heart rate
    codes: [{{system: 'http://loinc.org', code: '8867-4'}}]
    unit: /min
    plausible: [1, 300]
  pulse:
    resource: Observation
    label: Pulse (the same code, read twice)
    codes: [{{system: 'http://loinc.org', code: '8867-4'}}]
    unit: /min
  resp_rate:
    resource: Observation
    label: Respiratory rate
    codes: [{{system: 'http://loinc.org', code: '9279-1'}}]
    unit: /min
  gcs:
    resource: Observation
    label: GCS
    value: integer
    codes: [{{system: 'http://loinc.org', code: '9269-2'}}]
    plausible: [3, 15]
features:
- input: heart_rate
  aggregates: [first, last, min, max, mean, count, sum, any, delta, median, std, slope]
- input: heart_rate
  name: hr_encounter_max
  aggregate: max
  window: {{start: encounter, end: 0h}}
- input: heart_rate
  name: hr_ever_first
  aggregate: first
  window: {{start: unbounded, end: -2h}}
- input: pulse
  aggregates: [mean, slope]
  window: {{start: -12h, end: 0h}}
- input: pulse
  name: pulse_mean_again
  aggregate: mean
  window: {{start: -12h, end: 0h}}
- input: resp_rate
  aggregates: [last, count]
- input: gcs
  aggregates: [min, last]
scoring:
  core_inputs: [heart_rate, resp_rate]
  min_core_inputs: 1
news2:
  window: 24h
  inputs:
    pulse: heart_rate
    resp_rate: resp_rate
"""


@pytest.fixture(scope="module")
def mapping(tmp_path_factory):
    path = tmp_path_factory.mktemp("mappings") / "planned.yaml"
    path.write_text(MAPPING.format(model="planned"))
    return load_mapping(path)


def resources(rng: np.random.Generator, patients: int) -> list[dict]:
    out = []
    for p in range(patients):
        pid = f"p{p}"
        out.append({"resourceType": "Encounter", "id": f"e{p}", "status": "in-progress",
                    "subject": {"reference": f"Patient/{pid}"},
                    "period": {"start": times.format_datetime(AS_OF - timedelta(hours=float(rng.integers(1, 60))))}})
        for k in range(int(rng.integers(0, 30))):
            code = [HR, HR, RR, GCS][int(rng.integers(0, 4))]
            when = AS_OF - timedelta(minutes=int(rng.integers(-120, 80 * 60)))
            obs = {"resourceType": "Observation", "id": f"{pid}-{k}",
                   "status": ["final", "amended", "preliminary"][int(rng.integers(0, 3))],
                   "subject": {"reference": f"Patient/{pid}"},
                   "code": {"coding": [{"system": LOINC, "code": code}]},
                   "effectiveDateTime": times.format_datetime(when)}
            if code == GCS:
                obs["valueInteger"] = int(rng.integers(2, 16))
            else:
                obs["valueQuantity"] = {"value": round(float(rng.normal(80, 40)), 1), "unit": "/min",
                                        "system": "http://unitsofmeasure.org", "code": "/min"}
            out.append(obs)
    rng.shuffle(out)              # patients and times in no order
    return out


def reference_features(mapping, fs, extractor_input: list[dict]) -> np.ndarray:
    """Each feature computed on its own: its input's values in its window, through ``grouped``."""
    n = len(fs.patient_ids)
    rows: dict[str, list[tuple[int, float, float]]] = {}
    counted = {"final", "amended"}
    for r in extractor_input:
        if r["resourceType"] != "Observation" or r["status"] not in counted:
            continue
        code = r["code"]["coding"][0]["code"]
        value = r["valueInteger"] if "valueInteger" in r else r["valueQuantity"]["value"]
        row = fs.patient_ids.index(r["subject"]["reference"].split("/")[1])
        t = times.to_epoch(r["effectiveDateTime"])
        for name, spec in mapping.inputs.items():
            if (LOINC, code) in spec.codes and not (spec.plausible and not
                                                     spec.plausible[0] <= value <= spec.plausible[1]):
                rows.setdefault(name, []).append((row, t, float(value)))
    enc_start = np.array([times.to_epoch(r["period"]["start"]) for pid in fs.patient_ids
                          for r in extractor_input if r.get("id") == f"e{pid[1:]}"])
    X = np.full((n, len(mapping.features)), np.nan)
    for col, feature in enumerate(mapping.features):
        values = sorted(rows.get(feature.input, []), key=lambda item: (item[0], item[1]))
        P = np.array([v[0] for v in values], dtype=np.int64)
        T = np.array([v[1] for v in values])
        V = np.array([v[2] for v in values])
        a = fs.as_of[P]
        keep = T <= a + feature.window_end
        if feature.window_start == "encounter":
            keep &= T >= enc_start[P]
        elif feature.window_start != "unbounded":
            keep &= T >= a + feature.window_start
        X[:, col] = grouped(feature.aggregate, P[keep], T[keep], V[keep], fs.as_of, n)
    return X


def test_one_pass_over_all_windows_equals_each_feature_on_its_own(mapping):
    rng = np.random.default_rng(2026)
    data = resources(rng, 40)
    extractor = Extractor(mapping)
    extractor.add_all(data)
    fs = extractor.finish(as_of=AS_OF)
    expected = reference_features(mapping, fs, data)
    assert np.isfinite(expected).sum() > 500          # the data exercises every window
    np.testing.assert_array_equal(fs.X, expected)
    # NEWS2 reads each parameter's latest counted value of the last 24 h
    np.testing.assert_array_equal(
        fs.news2_inputs["pulse"], reference_news2(fs, data, HR))


def reference_news2(fs, data, code) -> np.ndarray:
    latest: dict[int, tuple[float, float]] = {}
    for r in data:
        if r["resourceType"] != "Observation" or r["status"] not in ("final", "amended") or \
                r["code"]["coding"][0]["code"] != code or not 1 <= r["valueQuantity"]["value"] <= 300:
            continue
        row = fs.patient_ids.index(r["subject"]["reference"].split("/")[1])
        t = times.to_epoch(r["effectiveDateTime"])
        if AS_OF.timestamp() - 86400 <= t <= AS_OF.timestamp() and (row not in latest or t >= latest[row][0]):
            latest[row] = (t, r["valueQuantity"]["value"])
    out = np.full(len(fs.patient_ids), np.nan)
    for row, (_, value) in latest.items():
        out[row] = value
    return out


def test_many_patients_at_once_equal_one_at_a_time(mapping):
    data = resources(np.random.default_rng(7), 25)
    together = Extractor(mapping)
    together.add_all(data)
    fs = together.finish(as_of=AS_OF)
    for row, pid in enumerate(fs.patient_ids):
        alone = Extractor(mapping)
        alone.add_all(r for r in data if r.get("subject", {}).get("reference") == f"Patient/{pid}")
        single = alone.finish(as_of=AS_OF, patient_ids=[pid])
        np.testing.assert_array_equal(single.X[0], fs.X[row])
        assert single.basis[0] == fs.basis[row]
        assert single.news2_basis[0] == fs.news2_basis[row]
        assert [d.as_text() for d in single.dropped[0]] == [d.as_text() for d in fs.dropped[row]]
        np.testing.assert_array_equal(single.present[0], fs.present[row])


def test_a_plan_is_made_once_per_loaded_mapping(tmp_path):
    path = tmp_path / "again.yaml"
    path.write_text(MAPPING.format(model="again"))
    first = load_mapping(path)
    plan = plan_for(first)
    assert plan_for(first) is plan
    assert Extractor(first)._plan is plan
    reloaded = load_mapping(path)               # $reload: a new object, a new plan
    assert plan_for(reloaded) is not plan
    from fhir_ai.features import plan as plans
    key = id(first)
    del first, plan
    gc.collect()
    assert key not in plans._PLANS or plans._PLANS[key].mapping() is not None   # gone with its mapping
