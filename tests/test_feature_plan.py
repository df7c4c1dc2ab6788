"""The per-mapping extraction plan: every feature window of every patient in one pass gives what one
window at a time gives; the plan is made once per loaded mapping."""
from __future__ import annotations

import gc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pytest

from fhir_ai.features import Extractor
from fhir_ai.features.aggregate import grouped
from fhir_ai.features.ndjson import NdjsonExport
from fhir_ai.features.plan import plan_for
from fhir_ai.fhir import times
from fhir_ai.mapping import load_directory, load_mapping
from fhir_ai.mapping.schema import AGGREGATES

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


# -- hand-computed truth -------------------------------------------------------------------------------
# The tests above compare the one-pass plan with a reference built from the same per-segment formulas
# (aggregate.grouped), so a mistake the two share would pass. Here a few Observations written by hand go
# through both front-ends — the per-resource path (ColumnBuilder, one Extractor per patient as $assess
# uses it) and the bulk NDJSON path (DuckDB, features.ndjson) — and every feature is compared with a value
# worked out by hand from the data below (the arithmetic is in the comments).

SNOMED = "http://snomed.info/sct"
SYS, DIA, BP_PANEL, VENT = "8480-6", "8462-4", "85354-9", "40617009"

HAND_MAPPING = """
model: hand
version: '1'
defaults:
  statuses: [final, amended]
  window: {start: -48h, end: 0h}
inputs:
  heart_rate:
    resource: Observation
    label: Heart rate
    codes: [{system: 'http://loinc.org', code: '8867-4'}]
    unit: /min
    plausible: [1, 300]
  systolic_bp: {resource: Observation, label: Systolic BP, unit: 'mm[Hg]', plausible: [20, 300],
                codes: [{system: 'http://loinc.org', code: '8480-6'}],
                panel_codes: [{system: 'http://loinc.org', code: '85354-9'}]}
  diastolic_bp: {resource: Observation, label: Diastolic BP, unit: 'mm[Hg]', plausible: [5, 200],
                 codes: [{system: 'http://loinc.org', code: '8462-4'}],
                 panel_codes: [{system: 'http://loinc.org', code: '85354-9'}]}
  mech_vent:
    resource: Observation
    label: Mechanical ventilation
    codes: [{system: 'http://snomed.info/sct', code: '40617009'}]
    value: boolean
features:
- input: heart_rate
  aggregates: [first, last, min, max, mean, median, std, count, sum, slope, delta, any]
- {input: heart_rate, name: hr_12h_mean, aggregate: mean, window: {start: -12h, end: 0h}}
- {input: heart_rate, name: hr_12h_count, aggregate: count, window: {start: -12h, end: 0h}}
- {input: heart_rate, name: hr_12h_slope, aggregate: slope, window: {start: -12h, end: 0h}}
- {input: heart_rate, name: hr_enc_first, aggregate: first, window: {start: encounter, end: 0h}}
- {input: heart_rate, name: hr_enc_count, aggregate: count, window: {start: encounter, end: 0h}}
- {input: heart_rate, name: hr_ever_first, aggregate: first, window: {start: unbounded, end: -2h}}
- {input: heart_rate, name: hr_until_2h_last, aggregate: last, window: {start: unbounded, end: -2h}}
- input: systolic_bp
  aggregates: [first, last, min, max, mean, count]
- input: diastolic_bp
  aggregates: [mean, count]
- input: mech_vent
  aggregates: [any, count, last]
scoring:
  core_inputs: [heart_rate]
  min_core_inputs: 1
"""


def _obs(oid: str, pid: str, code: str, when: str, status: str = "final", system: str = LOINC, **value) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": status, "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": system, "code": code}]}, "effectiveDateTime": when, **value}


def _per_min(value: float) -> dict:
    return {"valueQuantity": {"value": value, "unit": "beats/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"}}


def _mmhg(value: float) -> dict:
    return {"valueQuantity": {"value": value, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}


def _panel(oid: str, pid: str, when: str, systolic: float, diastolic: float, status: str = "final") -> dict:
    return {**_obs(oid, pid, BP_PANEL, when, status),
            "component": [{"code": {"coding": [{"system": LOINC, "code": SYS}]}, **_mmhg(systolic)},
                          # unit text only, no system or code: read as the UCUM mm[Hg]
                          {"code": {"coding": [{"system": LOINC, "code": DIA}]},
                           "valueQuantity": {"value": diastolic, "unit": "mmHg"}}]}


# As of 2026-11-20T12:00:00Z. Windows (both ends included):
#   48 h:        2026-11-18T12:00:00Z .. 2026-11-20T12:00:00Z
#   12 h:        2026-11-20T00:00:00Z .. 2026-11-20T12:00:00Z
#   encounter:   2026-11-19T11:00:00Z (hand-a's current encounter starts) .. 2026-11-20T12:00:00Z
#   unbounded:   anything up to 2026-11-20T10:00:00Z (end -2h)
# Hours below are relative to the as-of time. Resources are in no time or patient order.
HAND_RESOURCES = [
    {"resourceType": "Patient", "id": "hand-a", "gender": "female", "birthDate": "1950-01-01"},
    {"resourceType": "Patient", "id": "hand-b"},
    {"resourceType": "Patient", "id": "hand-c"},        # no data at all
    # hand-a's current encounter: 2026-11-19T20:00+09:00 = 2026-11-19T11:00Z (-25 h)
    {"resourceType": "Encounter", "id": "enc-a", "status": "in-progress", "subject": {"reference": "Patient/hand-a"},
     "period": {"start": "2026-11-19T20:00:00+09:00"}},
    # an older, finished stay (not current) and a later one entered in error (never counted)
    {"resourceType": "Encounter", "id": "enc-a-old", "status": "finished", "subject": {"reference": "Patient/hand-a"},
     "period": {"start": "2026-11-01T08:00:00Z", "end": "2026-11-05T08:00:00Z"}},
    {"resourceType": "Encounter", "id": "enc-a-void", "status": "entered-in-error",
     "subject": {"reference": "Patient/hand-a"}, "period": {"start": "2026-11-20T06:00:00Z"}},
    # heart rate, hand-a
    _obs("hr-tokyo", "hand-a", HR, "2026-11-20T09:30:00+09:00", **_per_min(120)),     # 00:30Z, -11.5 h
    _obs("hr-after", "hand-a", HR, "2026-11-20T12:00:01Z", **_per_min(60)),           # 1 s after as-of: out
    _obs("hr-before", "hand-a", HR, "2026-11-18T11:59:59Z", **_per_min(200)),         # 1 s before 48 h: out
    _obs("hr-error", "hand-a", HR, "2026-11-20T08:00:00Z", "entered-in-error", **_per_min(150)),   # out
    _obs("hr-edge48", "hand-a", HR, "2026-11-18T21:00:00+09:00", **_per_min(90)),     # 12:00Z on the 18th, -48 h
    _obs("hr-ny", "hand-a", HR, "2026-11-20T05:00:00-05:00", **_per_min(110)),        # 10:00Z, -2 h
    _obs("hr-prelim", "hand-a", HR, "2026-11-20T11:30:00Z", "preliminary", **_per_min(130)),       # out
    _obs("hr-amended", "hand-a", HR, "2026-11-19T06:00:00-05:00", "amended", **_per_min(100)),     # 11:00Z, -25 h
    _obs("hr-implausible", "hand-a", HR, "2026-11-20T09:00:00+05:30", **_per_min(400)),  # 03:30Z: dropped
    _obs("hr-edge-asof", "hand-a", HR, "2026-11-20T13:00:00+01:00", **_per_min(70)),  # 12:00Z, 0 h
    # heart rate, hand-b: one value
    _obs("hr-b", "hand-b", HR, "2026-11-20T11:00:00+09:00", **_per_min(70)),          # 02:00Z, -10 h
    # blood pressure, hand-a: panels with components, and one systolic of its own
    _panel("bp-edge12", "hand-a", "2026-11-19T23:00:00-01:00", 130, 80),              # 00:00Z on the 20th, -12 h
    _panel("bp-error", "hand-a", "2026-11-20T09:00:00Z", 250, 150, "entered-in-error"),          # out
    _panel("bp-amended", "hand-a", "2026-11-20T17:00:00+09:00", 110, 70, "amended"),  # 08:00Z, -4 h
    _obs("sys-old", "hand-a", SYS, "2026-11-18T06:00:00Z", **_mmhg(90)),               # -54 h: out
    # mechanical ventilation (valueBoolean)
    _obs("mv-off", "hand-a", VENT, "2026-11-19T12:00:00Z", system=SNOMED, valueBoolean=False),
    _obs("mv-on", "hand-a", VENT, "2026-11-20T06:00:00+02:00", system=SNOMED, valueBoolean=True),  # 04:00Z
    _obs("mv-b", "hand-b", VENT, "2026-11-20T03:00:00Z", system=SNOMED, valueBoolean=False),
]

NAN = float("nan")
HAND_EXPECTED = {
    "hand-a": {
        # heart rate in 48 h, in time order: hr-edge48 90 (-48 h), hr-amended 100 (-25 h), hr-tokyo 120
        # (-11.5 h), hr-ny 110 (-2 h), hr-edge-asof 70 (0 h). Not counted: hr-before (1 s too early),
        # hr-after (1 s too late), hr-error (entered-in-error), hr-prelim (preliminary), hr-implausible (400).
        "heart_rate_first": 90, "heart_rate_last": 70, "heart_rate_min": 70, "heart_rate_max": 120,
        "heart_rate_count": 5,
        "heart_rate_sum": 490,                          # 90 + 100 + 120 + 110 + 70
        "heart_rate_mean": 98,                          # 490 / 5
        "heart_rate_median": 100,                       # sorted 70 90 100 110 120
        "heart_rate_std": 296 ** 0.5,                   # deviations -8 2 22 12 -28: (64+4+484+144+784)/5 = 296
        "heart_rate_delta": -20,                        # last - first = 70 - 90
        "heart_rate_any": 1,                            # some value > 0
        # least squares over (hours, value): mean hours = (-48-25-11.5-2+0)/5 = -17.3, mean value 98;
        # dt = -30.7 -7.7 5.8 15.3 17.3, dv = -8 2 22 12 -28;
        # sum dt*dv = 245.6 - 15.4 + 127.6 + 183.6 - 484.4 = 57; sum dt^2 = 942.49 + 59.29 + 33.64 + 234.09
        # + 299.29 = 1568.8
        "heart_rate_slope": 57 / 1568.8,
        # 12 h: hr-tokyo 120 (-11.5 h), hr-ny 110 (-2 h), hr-edge-asof 70 (0 h)
        "hr_12h_mean": 100, "hr_12h_count": 3,          # 300 / 3
        # mean hours = -13.5/3 = -4.5; dt = -7 2.5 4.5; dv = 20 10 -30;
        # sum dt*dv = -140 + 25 - 135 = -250; sum dt^2 = 49 + 6.25 + 20.25 = 75.5
        "hr_12h_slope": -250 / 75.5,
        # encounter enc-a from -25 h: hr-amended (exactly at its start) 100, 120, 110, 70. The entered-in-error
        # encounter (from 06:00Z: 110 first, 2 values) and the finished one are not current.
        "hr_enc_first": 100, "hr_enc_count": 4,
        # unbounded .. -2 h: hr-before 200 is the earliest; hr-ny 110 lies exactly on the end
        "hr_ever_first": 200, "hr_until_2h_last": 110,
        # systolic: bp-edge12 130 (-12 h), bp-amended 110 (-4 h); bp-error and sys-old (-54 h) not counted
        "systolic_bp_first": 130, "systolic_bp_last": 110, "systolic_bp_min": 110, "systolic_bp_max": 130,
        "systolic_bp_mean": 120, "systolic_bp_count": 2,             # (130 + 110) / 2
        "diastolic_bp_mean": 75, "diastolic_bp_count": 2,            # (80 + 70) / 2
        # ventilation: false (-24 h), then true (-8 h)
        "mech_vent_any": 1, "mech_vent_count": 2, "mech_vent_last": 1,
    },
    "hand-b": {
        # one heart rate, 70 at -10 h: in every heart-rate window but the encounter's (hand-b has none)
        "heart_rate_first": 70, "heart_rate_last": 70, "heart_rate_min": 70, "heart_rate_max": 70,
        "heart_rate_count": 1, "heart_rate_sum": 70, "heart_rate_mean": 70, "heart_rate_median": 70,
        "heart_rate_std": 0, "heart_rate_delta": 0, "heart_rate_any": 1,
        "heart_rate_slope": NAN,                        # fewer than two times
        "hr_12h_mean": 70, "hr_12h_count": 1, "hr_12h_slope": NAN,
        "hr_enc_first": NAN, "hr_enc_count": 0,
        "hr_ever_first": 70, "hr_until_2h_last": 70,
        "systolic_bp_first": NAN, "systolic_bp_last": NAN, "systolic_bp_min": NAN, "systolic_bp_max": NAN,
        "systolic_bp_mean": NAN, "systolic_bp_count": 0,
        "diastolic_bp_mean": NAN, "diastolic_bp_count": 0,
        "mech_vent_any": 0, "mech_vent_count": 1, "mech_vent_last": 0,   # one false
    },
}
# hand-c has nothing: counts and sums are 0, everything else missing.
HAND_EXPECTED["hand-c"] = {name: 0 if name.endswith(("_count", "_sum")) else NAN for name in HAND_EXPECTED["hand-a"]}
# The Observations each patient's features rest on (every counted value inside some feature window).
HAND_BASIS = {
    "hand-a": {"hr-before", "hr-edge48", "hr-amended", "hr-tokyo", "hr-ny", "hr-edge-asof",
               "bp-edge12", "bp-amended", "mv-off", "mv-on"},
    "hand-b": {"hr-b", "mv-b"},
    "hand-c": set(),
}


@pytest.fixture(scope="module")
def hand_mappings(tmp_path_factory):
    """The hand mapping (every aggregate, every kind of window) and the shipped deterioration mapping."""
    path = tmp_path_factory.mktemp("hand") / "hand.yaml"
    path.write_text(HAND_MAPPING)
    return {"hand": load_mapping(path), "deterioration": load_directory(REPO / "mappings")["deterioration"]}


def _by_patient(fs) -> dict[str, tuple[dict[str, float], set[str], list[str]]]:
    """Per patient: the hand-checked features, the basis Observation ids and what was dropped."""
    wanted = [(col, name) for col, name in enumerate(fs.feature_names) if name in HAND_EXPECTED["hand-a"]]
    return {pid: ({name: float(fs.X[row, col]) for col, name in wanted},
                  {ref.split("/", 1)[1] for ref in fs.basis[row]},
                  [d.as_text() for d in fs.dropped[row]])
            for row, pid in enumerate(fs.patient_ids)}


def _single_patient(mapping) -> dict:
    """The $assess path: one Extractor per patient, fed that patient's resources as dicts."""
    out = {}
    for pid in HAND_EXPECTED:
        mine = [r for r in HAND_RESOURCES if r.get("id") == pid or
                (r.get("subject") or {}).get("reference") == f"Patient/{pid}"]
        extractor = Extractor(mapping)
        extractor.add_all(mine)
        out.update(_by_patient(extractor.finish(as_of=AS_OF, patient_ids=[pid])))
    return out


def _bulk(mapping, folder: Path) -> dict:
    """The bulk-assess path: NDJSON files staged by DuckDB, two patients per chunk."""
    folder.mkdir()
    files = []
    for kind in ("Patient", "Encounter", "Observation"):
        files.append(folder / f"{kind}.ndjson")
        files[-1].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in HAND_RESOURCES if r["resourceType"] == kind))
    out = {}
    with NdjsonExport(files, list(mapping.code_index), chunk_patients=2) as export:
        for chunk in export:
            extractor = Extractor(mapping)
            extractor.add_all(chunk.resources)
            extractor.add_columns(chunk.columns)
            out.update(_by_patient(extractor.finish(as_of=AS_OF)))
    return out


@pytest.mark.parametrize("path", ["single-patient", "bulk-ndjson"])
@pytest.mark.parametrize("model", ["hand", "deterioration"])
def test_window_aggregates_equal_the_hand_computed_values(hand_mappings, tmp_path, model, path):
    mapping = hand_mappings[model]
    got = _single_patient(mapping) if path == "single-patient" else _bulk(mapping, tmp_path / "export")
    assert sorted(got) == sorted(HAND_EXPECTED)
    checked = set(got["hand-a"][0])
    # the hand mapping has every hand-computed feature; deterioration names the 48 h ones the same way
    assert (checked == set(HAND_EXPECTED["hand-a"])) if model == "hand" else (len(checked) == 16)
    assert {a for name in checked for a in AGGREGATES if name.endswith("_" + a)} == (
        set(AGGREGATES) if model == "hand" else {"first", "last", "min", "max", "mean", "count", "any"})
    for pid, expected in HAND_EXPECTED.items():
        values, basis, dropped = got[pid]
        assert values == pytest.approx({name: expected[name] for name in checked}, rel=1e-12, abs=1e-12,
                                       nan_ok=True), pid
        assert basis == (HAND_BASIS[pid] if model == "hand" else HAND_BASIS[pid] - {"hr-before"}), pid
        # the one refused value, reported without leaving out why
        assert dropped == (["Observation/hr-implausible (heart_rate): implausible value 400 /min (plausible 1-300)"]
                           if pid == "hand-a" else []), pid
