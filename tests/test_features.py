"""Feature extraction: aggregates, windows, statuses, units, panels, time zones, many patients at once."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from fhir_ai.features import Extractor
from fhir_ai.mapping import load_mapping

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
AS_OF = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(REPO / "mappings" / "deterioration.yaml")


def obs(oid: str, code: str, value: float | None, unit: str, when: str, *, patient: str = "p1",
        status: str = "final", **extra) -> dict:
    resource = {"resourceType": "Observation", "id": oid, "status": status,
                "subject": {"reference": f"Patient/{patient}"},
                "code": {"coding": [{"system": LOINC, "code": code}]}, "effectiveDateTime": when}
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                     "code": unit}
    resource.update(extra)
    return resource


def features(mapping, resources, as_of=AS_OF, patient_ids=None):
    extractor = Extractor(mapping)
    extractor.add_all(resources)
    return extractor.finish(as_of=as_of, patient_ids=patient_ids)


def value(fs, name, row=0):
    return fs.X[row, fs.feature_names.index(name)]


def test_aggregates_over_the_window(mapping):
    fs = features(mapping, [
        obs("a", "8867-4", 80, "/min", "2026-11-20T06:00:00Z"),
        obs("b", "8867-4", 100, "/min", "2026-11-20T08:00:00Z"),
        obs("c", "8867-4", 120, "/min", "2026-11-20T10:00:00Z"),
        obs("old", "8867-4", 200, "/min", "2026-11-18T11:59:00Z"),     # 48 h + 1 min before as-of
        obs("future", "8867-4", 40, "/min", "2026-11-20T12:01:00Z"),  # after as-of: never used
    ])
    assert value(fs, "heart_rate_first") == 80
    assert value(fs, "heart_rate_last") == 120
    assert value(fs, "heart_rate_min") == 80
    assert value(fs, "heart_rate_max") == 120
    assert value(fs, "heart_rate_mean") == 100
    assert value(fs, "heart_rate_count") == 3
    assert sorted(fs.basis[0]) == ["Observation/a", "Observation/b", "Observation/c"]


def test_grouped_aggregates_slope_median_std_delta_any():
    from fhir_ai.features.aggregate import grouped
    P = np.array([0, 0, 0, 2, 2])
    T = np.array([0.0, 3600, 7200, 0, 3600])
    V = np.array([1.0, 3.0, 5.0, 4.0, 0.0])
    anchor = np.array([7200.0, 7200.0, 3600.0])
    assert grouped("slope", P, T, V, anchor, 3)[[0, 2]].tolist() == [2.0, -4.0]
    assert math.isnan(grouped("slope", P, T, V, anchor, 3)[1])
    assert grouped("median", P, T, V, anchor, 3)[[0, 2]].tolist() == [3.0, 2.0]
    assert grouped("std", P, T, V, anchor, 3)[0] == pytest.approx(np.std([1, 3, 5]))
    assert grouped("delta", P, T, V, anchor, 3)[[0, 2]].tolist() == [4.0, -4.0]
    assert grouped("any", P, T, V, anchor, 3)[[0, 2]].tolist() == [1.0, 1.0]
    assert grouped("sum", P, T, V, anchor, 3).tolist() == [9.0, 0.0, 4.0]
    assert grouped("count", P, T, V, anchor, 3).tolist() == [3.0, 0.0, 2.0]


def test_statuses_units_and_implausible_values(mapping):
    fs = features(mapping, [
        obs("f", "8310-5", 101.3, "[degF]", "2026-11-20T09:00:00Z"),
        obs("err", "8310-5", 41.0, "Cel", "2026-11-20T10:00:00Z", status="entered-in-error"),
        obs("pre", "8310-5", 40.0, "Cel", "2026-11-20T10:30:00Z", status="preliminary"),
        obs("amd", "2823-3", 4.1, "mmol/L", "2026-11-20T09:00:00Z", status="amended"),
        obs("crazy", "8867-4", 900, "/min", "2026-11-20T09:00:00Z"),
        obs("weird", "8867-4", 80, "mm[Hg]", "2026-11-20T09:05:00Z"),
        obs("crea", "2160-0", 176.8, "umol/L", "2026-11-20T09:00:00Z"),
    ])
    assert value(fs, "temperature_last") == pytest.approx(38.5)
    assert value(fs, "temperature_count") == 1
    assert value(fs, "potassium_last") == 4.1
    assert value(fs, "creatinine_last") == pytest.approx(2.0, abs=1e-3)
    assert math.isnan(value(fs, "heart_rate_last"))
    reasons = {d.reference: d.reason for d in fs.dropped[0]}
    assert reasons["Observation/crazy"].startswith("implausible value 900")
    assert "cannot be converted" in reasons["Observation/weird"]
    assert "Observation/err" not in reasons and "Observation/err" not in fs.basis[0]


def test_blood_pressure_panel_components_and_time_zones(mapping):
    panel = {"resourceType": "Observation", "id": "bp", "status": "final",
             "subject": {"reference": "Patient/p1"},
             "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
             "effectiveDateTime": "2026-11-20T20:00:00+09:00",           # = 11:00Z
             "component": [
                 {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                  "valueQuantity": {"value": 92, "unit": "mmHg"}},
                 {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                  "valueQuantity": {"value": 55, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                                    "code": "mm[Hg]"}}]}
    later_utc = obs("s2", "8480-6", 130, "mm[Hg]", "2026-11-20T10:30:00Z")   # earlier than the panel in UTC
    fs = features(mapping, [panel, later_utc])
    assert value(fs, "systolic_bp_last") == 92
    assert value(fs, "systolic_bp_first") == 130
    assert value(fs, "diastolic_bp_last") == 55
    assert fs.basis[0].count("Observation/bp") == 1


def test_patient_and_encounter_inputs(mapping):
    resources = [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-11-21"},
        {"resourceType": "Encounter", "id": "old", "status": "finished", "subject": {"reference": "Patient/p1"},
         "period": {"start": "2025-01-01T00:00:00Z", "end": "2025-01-05T00:00:00Z"},
         "serviceType": {"coding": [{"system": "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype",
                                     "code": "2"}]}},
        {"resourceType": "Encounter", "id": "now", "status": "in-progress", "subject": {"reference": "Patient/p1"},
         "period": {"start": "2026-11-19T00:00:00Z"},
         "serviceType": {"coding": [{"system": "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype",
                                     "code": "3"}]}},
    ]
    fs = features(mapping, resources)
    assert value(fs, "age") == 75            # birthday on 2026-11-21, after the encounter started
    assert value(fs, "sex_male") == 0
    assert value(fs, "icu_type") == 3
    assert fs.encounter_ids == ["now"]


def test_many_patients_at_once_equal_one_at_a_time(mapping):
    rng = np.random.default_rng(7)
    resources = []
    for p in range(5):
        for j in range(30):
            hour = int(rng.integers(0, 60))
            code, unit, mu = [("8867-4", "/min", 90), ("9279-1", "/min", 18), ("8310-5", "Cel", 37),
                              ("2524-7", "mmol/L", 2)][j % 4]
            resources.append(obs(f"p{p}-{j}", code, round(float(rng.normal(mu, 3)), 1), unit,
                                 f"2026-11-{18 + hour // 24:02d}T{hour % 24:02d}:00:00Z", patient=f"p{p}"))
    together = features(mapping, resources, as_of=None)
    for p in range(5):
        alone = features(mapping, [r for r in resources if r["subject"]["reference"] == f"Patient/p{p}"],
                         as_of=None)
        row = together.patient_ids.index(f"p{p}")
        np.testing.assert_array_equal(together.X[row], alone.X[0])
        assert together.as_of[row] == alone.as_of[0]
        assert sorted(together.basis[row]) == sorted(alone.basis[0])


def test_as_of_defaults_to_each_patients_latest_data(mapping):
    fs = features(mapping, [obs("x", "8867-4", 80, "/min", "2100-01-02T10:00:00Z", patient="a"),
                            obs("y", "8867-4", 90, "/min", "2100-01-01T03:00:00Z", patient="b")], as_of=None)
    assert fs.as_of.tolist() == [datetime(2100, 1, 2, 10, tzinfo=timezone.utc).timestamp(),
                                 datetime(2100, 1, 1, 3, tzinfo=timezone.utc).timestamp()]
    assert value(fs, "heart_rate_last", 0) == 80 and value(fs, "heart_rate_last", 1) == 90


def test_insufficient_data_is_detected(mapping):
    fs = features(mapping, [obs("x", "8867-4", 80, "/min", "2026-11-20T10:00:00Z")], patient_ids=["p1", "empty"])
    assert fs.sufficient().tolist() == [False, False]
    fs = features(mapping, [obs("x", "8867-4", 80, "/min", "2026-11-20T10:00:00Z"),
                            obs("y", "9279-1", 18, "/min", "2026-11-20T10:00:00Z")])
    assert fs.sufficient().tolist() == [True]
    assert "spo2" in fs.missing_inputs(0) and "heart_rate" not in fs.missing_inputs(0)
