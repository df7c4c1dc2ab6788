"""Seeded synthetic demo hospital (FHIR R4 NDJSON) for the README demo and tests; no real data.

Codes and units are those of the PhysioNet 2012 fhir-mapping.csv, so a model trained on that form can
score the demo patients. The data deliberately carries the mess a real server sends: Fahrenheit,
umol/L, mmol/L and % values, a blood-pressure panel, entered-in-error and amended results, +09:00 offsets.
Regenerate the committed copy with:
``python -c "from fhir_ai.datasets.demo import generate_demo_hospital as g; g('fixtures/demo-hospital')"``
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fhir_ai.datasets import (CATEGORY_DISPLAY, LOINC, OBSERVATION_CATEGORY, UCUM, V3_ACT_CODE,
                              write_ndjson)
from fhir_ai.datasets.physionet2012 import ICUTYPE_DISPLAY, ICUTYPE_SYSTEM, VARIABLES
from fhir_ai.errors import BadRequest

__all__ = ["generate_demo_hospital", "DEFAULT_SEED", "DEFAULT_ANCHOR"]

DEFAULT_SEED = 20261125
DEFAULT_ANCHOR = "2026-11-20T08:00:00+00:00"
MRN_SYSTEM = "https://demo-hospital.invalid/mrn"
KST = timezone(timedelta(hours=9))
SPO2_CODINGS = [(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
                (LOINC, "2708-6", "Oxygen saturation in Arterial blood")]
UNIT_DISPLAY = {"/min": "/min", "Cel": "°C", "[degF]": "°F", "mm[Hg]": "mmHg", "umol/L": "µmol/L",
                "10*3/uL": "10³/µL", "{score}": "score", "1": "fraction"}

# (id, family, given, gender, age, hours admitted before anchor, ICU type, reason, course, +09:00 times)
PATIENTS: list[tuple[str, str, str, str, int, int, str, str, str, bool]] = [
    ("001", "김", "민준", "male", 67, 60, "3", "Community-acquired pneumonia", "stable", False),
    ("002", "이", "서연", "female", 54, 50, "4", "Elective colectomy, post-operative care", "stable", False),
    ("003", "박", "지훈", "male", 72, 40, "1", "NSTEMI", "stable", True),
    ("004", "최", "수아", "female", 81, 56, "3", "Urinary tract infection", "stable", False),
    ("005", "정", "현우", "male", 63, 70, "3", "Cholangitis", "sepsis", False),
    ("006", "강", "미숙", "female", 76, 52, "3", "COPD exacerbation", "respiratory", False),
    ("007", "조", "성호", "male", 58, 30, "4", "Subdural haematoma, post-craniotomy", "neuro", False),
    ("008", "윤", "영희", "female", 69, 64, "2", "Cardiac surgery (CABG)", "aki", False),
    ("009", "장", "도윤", "male", 47, 49, "3", "Diabetic ketoacidosis, resolving", "stable", False),
    ("010", "임", "하은", "female", 35, 26, "4", "Trauma, observation", "none", False),
    ("011", "한", "정수", "male", 88, 54, "1", "Heart failure", "stable", True),
    ("012", "오", "은지", "female", 59, 58, "4", "Pancreatitis", "stable", False),
]

# signal: (stable baseline, spread of the per-patient baseline, noise sd, decimals)
BASELINE: dict[str, tuple[float, float, float, int]] = {
    "HR": (80, 8, 4, 0), "RespRate": (16, 2, 1.5, 0), "Temp": (36.8, 0.2, 0.25, 1),
    "NISysABP": (126, 10, 7, 0), "NIDiasABP": (72, 6, 5, 0), "SpO2": (97, 1, 1, 0), "GCS": (15, 0, 0, 0),
    "Urine": (300, 60, 60, 0), "FiO2": (0.28, 0.04, 0.0, 2), "Creatinine": (0.9, 0.2, 0.05, 2),
    "BUN": (16, 4, 1.5, 0), "Glucose": (120, 15, 12, 0), "Lactate": (1.2, 0.3, 0.2, 1),
    "WBC": (8.5, 2, 0.8, 1), "Platelets": (230, 40, 12, 0), "HCO3": (24, 1.5, 1, 0), "K": (4.1, 0.3, 0.2, 1),
    "Na": (139, 2, 1.2, 0), "pH": (7.40, 0.02, 0.02, 2), "PaO2": (92, 8, 6, 0), "PaCO2": (40, 3, 2, 0),
    "SaO2": (97, 1, 0.8, 0), "Bilirubin": (0.7, 0.2, 0.1, 1), "Weight": (68, 10, 0.3, 1),
    "Height": (165, 8, 0, 0),
}
# How far each course has moved a signal by the anchor (the change builds up over the last ~18 h).
COURSES: dict[str, dict[str, float]] = {
    "stable": {},
    "sepsis": {"HR": 42, "RespRate": 11, "Temp": 2.0, "NISysABP": -42, "NIDiasABP": -22, "SpO2": -5,
               "GCS": -3, "Urine": -230, "Lactate": 4.6, "WBC": 13, "Platelets": -120, "HCO3": -8,
               "Creatinine": 1.3, "BUN": 18, "pH": -0.12, "PaCO2": -8, "Bilirubin": 2.1, "FiO2": 0.2},
    "respiratory": {"HR": 30, "RespRate": 15, "SpO2": -10, "FiO2": 0.45, "PaO2": -32, "PaCO2": 24,
                    "pH": -0.16, "GCS": -2, "SaO2": -9, "Lactate": 1.6},
    "neuro": {"GCS": -8, "NISysABP": 34, "NIDiasABP": 12, "HR": -22, "RespRate": -5, "Temp": 0.6},
    "aki": {"Creatinine": 3.0, "BUN": 42, "K": 1.7, "Urine": -250, "HCO3": -6, "pH": -0.08, "HR": 10},
}
LIMITS = {"SpO2": (70, 100), "SaO2": (70, 100), "GCS": (3, 15), "FiO2": (0.21, 1.0), "Urine": (0, 2000)}
VITALS = ("HR", "RespRate", "NISysABP", "NIDiasABP", "SpO2")
LABS = ("Creatinine", "BUN", "Glucose", "WBC", "Platelets", "HCO3", "K", "Na")
GAS = ("pH", "PaO2", "PaCO2", "SaO2")


def _ramp(hours_before_anchor: float) -> float:
    return max(0.0, 1.0 - hours_before_anchor / 18.0) ** 1.3


class _Ward:
    """Builds one patient's Observations; keeps the id counter and the patient's time zone."""

    def __init__(self, pid: str, enc: str, tz: timezone, anchor: datetime) -> None:
        self.pid, self.enc, self.tz, self.anchor = pid, enc, tz, anchor
        self.observations: list[dict[str, Any]] = []

    def stamp(self, when: datetime) -> str:
        text = when.astimezone(self.tz).isoformat(timespec="seconds")
        return text.replace("+00:00", "Z")

    def renumber(self) -> None:
        """Order by time (stable) and give ids in that order, so 'the last creatinine' is the latest."""
        self.observations.sort(key=lambda o: datetime.fromisoformat(o["effectiveDateTime"]))
        for n, obs in enumerate(self.observations, start=1):
            obs["id"] = f"demo-obs-{self.pid}-{n:04d}"

    def add(self, name: str, when: datetime, value: float | bool | None, *, unit: str | None = None,
            status: str = "final", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if name == "SpO2":
            category, codings, ucum = "vital-signs", SPO2_CODINGS, "%"
        else:
            category, system, code, display, ucum = VARIABLES[name]  # type: ignore[assignment]
            codings = [(system, code, display)]
        obs: dict[str, Any] = {
            "resourceType": "Observation", "id": f"demo-obs-{self.pid}-{len(self.observations) + 1:04d}",
            "status": status,
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category,
                                      "display": CATEGORY_DISPLAY[category]}]}],
            "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]},
            "subject": {"reference": f"Patient/demo-{self.pid}"},
            "encounter": {"reference": f"Encounter/{self.enc}"},
            "effectiveDateTime": self.stamp(when),
        }
        if isinstance(value, bool):
            obs["valueBoolean"] = value
        elif value is not None:
            ucum = unit or ucum
            obs["valueQuantity"] = {"value": value, "unit": UNIT_DISPLAY.get(ucum, ucum), "system": UCUM,
                                    "code": ucum}
        obs.update(extra or {})
        self.observations.append(obs)
        return obs


def _value(rng: random.Random, name: str, base: dict[str, float], course: dict[str, float],
           hours_before: float) -> float:
    _, _, noise, decimals = BASELINE[name]
    value = base[name] + course.get(name, 0.0) * _ramp(hours_before) + rng.gauss(0, noise)
    low, high = LIMITS.get(name, (0.0, float("inf")))
    value = min(max(value, low), high)
    return round(value, decimals) if decimals else int(round(value))


def _times(rng: random.Random, start: datetime, anchor: datetime, every_h: float,
           jitter_min: int = 12) -> list[datetime]:
    """Charting times every ``every_h`` hours, counted back from just before the anchor to admission
    (at most 48 h), so every series has a recent value."""
    first = max(start, anchor - timedelta(hours=48))
    out, t = [], anchor - timedelta(minutes=15 + jitter_min)
    while t > first:
        out.append(t)
        t -= timedelta(hours=every_h)
    return [t - timedelta(minutes=rng.randint(0, jitter_min)) for t in reversed(out)]


def _blood_pressure(ward: _Ward, when: datetime, sbp: float, dbp: float, *, panel: bool,
                    arterial: bool) -> None:
    mean = int(round((sbp + 2 * dbp) / 3))
    if panel:
        # One 85354-9 panel with systolic/diastolic components, as many EHRs send it (US Core style);
        # built from a value-less SBP Observation whose code is then replaced.
        ward.add("NISysABP", when, None, extra={
            "code": {"coding": [{"system": LOINC, "code": "85354-9",
                                 "display": "Blood pressure panel with all children optional"}]},
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": c, "display": d}]},
                 "valueQuantity": {"value": v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}
                for c, d, v in (("8480-6", "Systolic blood pressure", sbp),
                                ("8462-4", "Diastolic blood pressure", dbp))]})
        return
    names = ("SysABP", "DiasABP", "MAP") if arterial else ("NISysABP", "NIDiasABP", "NIMAP")
    for name, value in zip(names, (sbp, dbp, mean)):
        ward.add(name, when, value)


def _observe(rng: random.Random, ward: _Ward, course_name: str, start: datetime, anchor: datetime,
             *, bp_panel: bool) -> None:
    """Chart one patient's clean course; the mess is added afterwards by _mess()."""
    base = {k: v[0] + rng.uniform(-v[1], v[1]) for k, v in BASELINE.items()}
    course = COURSES[course_name]
    sick = course_name != "stable"

    def hb(t: datetime) -> float:
        return (anchor - t).total_seconds() / 3600

    ward.add("Height", start, int(round(base["Height"])))
    ward.add("Weight", start, round(base["Weight"], 1))
    for t in _times(rng, start, anchor, 2.0):
        # Sicker patients are charted hourly once they start to slide.
        slots = [t, t + timedelta(hours=1)] if sick and hb(t) < 12 else [t]
        for when in (s for s in slots if s < anchor):
            v = {n: _value(rng, n, base, course, hb(when)) for n in VITALS}
            ward.add("HR", when, v["HR"])
            ward.add("RespRate", when, v["RespRate"])
            _blood_pressure(ward, when, v["NISysABP"], v["NIDiasABP"], panel=bp_panel,
                            arterial=course_name == "respiratory" and hb(when) < 9)
            ward.add("SpO2", when, v["SpO2"])
    for t in _times(rng, start, anchor, 4.0):
        ward.add("Temp", t, _value(rng, "Temp", base, course, hb(t)))
        ward.add("GCS", t, _value(rng, "GCS", base, course, hb(t)))
        ward.add("Urine", t, 5 * round(_value(rng, "Urine", base, course, hb(t)) / 5))
        if course_name in ("sepsis", "respiratory"):
            ward.add("FiO2", t, _value(rng, "FiO2", base, course, hb(t)))
        if course_name == "respiratory" and hb(t) < 9:
            ward.add("MechVent", t, True)  # intubated about 9 h before the anchor
    for t in _times(rng, start, anchor, 12.0 if sick else 24.0, jitter_min=30):
        for name in (*LABS, "Bilirubin"):
            ward.add(name, t, _value(rng, name, base, course, hb(t)))
    for t in _times(rng, start, anchor, 6.0 if sick else 48.0, jitter_min=20):
        for name in ("Lactate", *GAS):
            ward.add(name, t, _value(rng, name, base, course, hb(t)))


def _of(ward: _Ward, name: str) -> list[dict[str, Any]]:
    code = VARIABLES[name][2]
    return [o for o in ward.observations if o["code"]["coding"][0]["code"] == code]


def _convert(obs: dict[str, Any], ucum: str, value: float) -> None:
    obs["valueQuantity"] = {"value": value, "unit": UNIT_DISPLAY.get(ucum, ucum), "system": UCUM, "code": ucum}


def _mess(pid: str, ward: _Ward) -> None:
    """Add the documented real-world mess to specific patients (ids fixed so tests can find it)."""
    temps = _of(ward, "Temp")
    if pid == "004":  # this ward charts in Fahrenheit
        for obs in temps:
            _convert(obs, "[degF]", round(obs["valueQuantity"]["value"] * 9 / 5 + 32, 1))
    if pid == "005":
        obs = temps[-2]
        _convert(obs, "[degF]", round(obs["valueQuantity"]["value"] * 9 / 5 + 32, 1))
    if pid == "008":  # a referring lab reports creatinine in SI units
        obs = _of(ward, "Creatinine")[-2]
        _convert(obs, "umol/L", int(round(obs["valueQuantity"]["value"] * 88.4)))
    if pid == "009":
        obs = _of(ward, "Glucose")[-1]
        _convert(obs, "mmol/L", round(obs["valueQuantity"]["value"] / 18.0156, 1))
    if pid == "006":
        obs = _of(ward, "FiO2")[-1]
        _convert(obs, "%", int(round(obs["valueQuantity"]["value"] * 100)))
    if pid == "012":
        # A heart rate typed into the wrong chart and withdrawn: it must be ignored, not alarm.
        obs = _of(ward, "HR")[-2]
        obs["status"] = "entered-in-error"
        obs["valueQuantity"]["value"] = 212
        # A haemolysed potassium re-run and corrected.
        obs = _of(ward, "K")[-1]
        obs["status"] = "amended"
        obs["note"] = [{"text": "Corrected result after re-run (first sample haemolysed)."}]


def _patient(pid: str, family: str, given: str, gender: str, age: int, anchor: datetime,
             rng: random.Random) -> dict[str, Any]:
    birth = anchor.date().replace(year=anchor.year - age) - timedelta(days=rng.randint(1, 360))
    return {"resourceType": "Patient", "id": f"demo-{pid}",
            "identifier": [{"system": MRN_SYSTEM, "value": f"DH{int(pid) * 7919 % 100000:05d}"}],
            "name": [{"use": "official", "text": family + given, "family": family, "given": [given]}],
            "gender": gender, "birthDate": birth.isoformat()}


def _encounter(eid: str, pid: str, tz: timezone, start: datetime, end: datetime | None, icu: str,
               reason: str) -> dict[str, Any]:
    period = {"start": start.astimezone(tz).isoformat(timespec="seconds").replace("+00:00", "Z")}
    if end is not None:
        period["end"] = end.astimezone(tz).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"resourceType": "Encounter", "id": eid, "status": "finished" if end else "in-progress",
            "class": {"system": V3_ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
            "serviceType": {"coding": [{"system": ICUTYPE_SYSTEM, "code": icu, "display": ICUTYPE_DISPLAY[icu]}],
                            "text": ICUTYPE_DISPLAY[icu]},
            "subject": {"reference": f"Patient/demo-{pid}"}, "period": period,
            "reasonCode": [{"text": reason}]}


def demo_resources(*, seed: int = DEFAULT_SEED, anchor: str = DEFAULT_ANCHOR) -> list[dict[str, Any]]:
    """All demo resources in output order: Patients, Encounters, then Observations."""
    rng = random.Random(seed)
    when = datetime.fromisoformat(anchor)
    if when.tzinfo is None:
        raise BadRequest("anchor needs a UTC offset, e.g. 2026-11-20T08:00:00+00:00")
    when = when.astimezone(timezone.utc)
    patients, encounters, observations = [], [], []
    for pid, family, given, gender, age, hours, icu, reason, course, korean_time in PATIENTS:
        tz = KST if korean_time else timezone.utc
        start = when - timedelta(hours=hours, minutes=rng.randint(0, 59))
        patients.append(_patient(pid, family, given, gender, age, when, rng))
        encounters.append(_encounter(f"demo-enc-{pid}", pid, tz, start, None, icu, reason))
        ward = _Ward(pid, f"demo-enc-{pid}", tz, when)
        if course != "none":  # demo-010: admitted, nothing charted yet ("insufficient data")
            _observe(rng, ward, course, start, when, bp_panel=pid == "011")
            ward.renumber()
            _mess(pid, ward)
        if pid == "001":
            # An earlier, finished stay: its results must not leak into today's assessment.
            old_start = when - timedelta(days=104, hours=5)
            old_end = old_start + timedelta(days=6, hours=3)
            encounters.append(_encounter("demo-enc-013", pid, tz, old_start, old_end, "3", "Pneumonia"))
            old = _Ward(pid, "demo-enc-013", tz, when)
            for i, (name, value) in enumerate((("HR", 118), ("RespRate", 26), ("Temp", 38.9), ("Lactate", 3.4),
                                               ("Creatinine", 1.9), ("HR", 96), ("Temp", 37.6))):
                old.add(name, old_start + timedelta(hours=3 + 20 * i), value)
            for obs in old.observations:  # separate id range from the current stay
                obs["id"] = obs["id"].replace("demo-obs-001-", "demo-obs-001-old-")
            observations.extend(old.observations)
        observations.extend(ward.observations)
    return [*patients, *encounters, *observations]


def generate_demo_hospital(out_dir: str | Path, *, seed: int = DEFAULT_SEED,
                           anchor: str = DEFAULT_ANCHOR) -> dict[str, int]:
    """Write the demo hospital as Patient/Encounter/Observation.ndjson into out_dir; return counts."""
    return write_ndjson(demo_resources(seed=seed, anchor=anchor), out_dir)
