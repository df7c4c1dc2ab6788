"""Seeded synthetic Bulk-Data export for the benchmarks: N patients × ~100 vital-sign and lab Observations.

Codes and units come from mappings/deterioration.yaml. The data carries what real exports carry: blood
pressure as panels with components, mixed time-zone offsets, alternative units (°F, mmol/L glucose,
µmol/L creatinine, FiO2 in %), amended, entered-in-error and preliminary results, a few implausible
values, and Observations in no particular patient order (exports are not sorted by patient).
"""
from __future__ import annotations

import random
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ICU_SYSTEM = "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
OFFSETS = [timedelta(0), timedelta(hours=9), timedelta(hours=-5), timedelta(hours=5, minutes=30),
           timedelta(hours=1), timedelta(hours=-3)]
BUCKETS = 32

# input: (mean, sd, decimals, drift when deteriorating)
VITALS = {"heart_rate": (82, 10, 0, 30), "resp_rate": (17, 3, 0, 10), "temperature": (37.0, 0.4, 1, 1.5),
          "spo2": (96, 2, 0, -9), "mean_bp": (88, 9, 0, -25), "gcs": (14, 1.5, 0, -5), "fio2": (0.3, 0.08, 2, 0.3)}
LABS = {"creatinine": (1.1, 0.4, 2, 1.5), "bun": (20, 8, 0, 25), "glucose": (130, 30, 0, 60),
        "potassium": (4.1, 0.4, 1, 0.8), "sodium": (139, 3, 0, -4), "bicarbonate": (24, 2.5, 0, -8),
        "wbc": (9, 3, 1, 8), "platelets": (220, 60, 0, -90), "hematocrit": (34, 5, 1, -6),
        "lactate": (1.5, 0.6, 1, 3.5), "ph": (7.39, 0.04, 2, -0.12), "paco2": (40, 5, 0, 8),
        "pao2": (95, 20, 0, -30)}
# Alternative units a hospital sends (code, unit text, factor from the mapping's unit): share of values.
ALT_UNITS = {"temperature": ("[degF]", "°F", None, 0.15), "glucose": ("mmol/L", "mmol/L", 1 / 18.0156, 0.2),
             "creatinine": ("umol/L", "µmol/L", 88.4017, 0.2), "fio2": ("%", "%", 100.0, 0.5),
             "potassium": ("meq/L", "mEq/L", 1.0, 0.3)}


def codes_from_mapping() -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(input → its first (system, code)), (input → UCUM unit) from mappings/deterioration.yaml."""
    data = yaml.safe_load((REPO / "mappings" / "deterioration.yaml").read_text())
    inputs = data["inputs"]
    codes = {name: (spec["codes"][0]["system"], spec["codes"][0]["code"])
             for name, spec in inputs.items() if spec["resource"] == "Observation"}
    units = {name: spec.get("unit", "") for name, spec in inputs.items() if spec["resource"] == "Observation"}
    codes["bp_panel"] = (inputs["systolic_bp"]["panel_codes"][0]["system"],
                         inputs["systolic_bp"]["panel_codes"][0]["code"])
    return codes, units


def _when(t: datetime, offset: timedelta) -> str:
    local = t.astimezone(timezone(offset))
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    return text + ("Z" if offset == timedelta(0) else local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:])


class _Patient:
    """Writes one patient's resources; Observations go to random buckets so the export is unsorted."""

    def __init__(self, rng: random.Random, index: int, codes: dict, units: dict) -> None:
        self.rng, self.codes, self.units = rng, codes, units
        self.pid = f"b{index:06d}"
        self.n = 0
        self.offset = rng.choice(OFFSETS)
        self.bad = rng.random() < 0.15        # deteriorating over the last day
        self.start = datetime(2026, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=rng.randrange(0, 200 * 1440))
        self.hours = rng.uniform(22, 44)
        self.base = {k: rng.gauss(m, s * 0.6) for k, (m, s, _, _) in {**VITALS, **LABS}.items()}
        self.lines: list[bytes] = []

    def value(self, name: str, t: datetime) -> float:
        mean, sd, decimals, drift = {**VITALS, **LABS}[name]
        progress = max(0.0, ((t - self.start).total_seconds() / 3600 - (self.hours - 24)) / 24) if self.bad else 0
        value = round(self.base[name] + drift * progress + self.rng.gauss(0, sd * 0.4), decimals)
        return int(value) if decimals == 0 else value

    def observation(self, t: datetime, category: str, code: tuple[str, str], **body) -> None:
        rng = self.rng
        self.n += 1
        status = "final"
        roll = rng.random()
        if roll < 0.02:
            status = "entered-in-error"
        elif roll < 0.05:
            status = "amended"
        elif roll < 0.06:
            status = "preliminary"
        offset = timedelta(0) if category == "laboratory" and rng.random() < 0.5 else self.offset
        resource = {"resourceType": "Observation", "id": f"{self.pid}-{self.n}", "status": status,
                    "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
                    "code": {"coding": [{"system": code[0], "code": code[1]}]},
                    "subject": {"reference": f"Patient/{self.pid}"},
                    "encounter": {"reference": f"Encounter/{self.pid}-e"},
                    "effectiveDateTime": _when(t, offset), **body}
        if category == "laboratory":
            resource["issued"] = _when(t + timedelta(minutes=40), timedelta(0))
        self.lines.append(orjson.dumps(resource))

    def quantity(self, name: str, t: datetime) -> dict:
        value = self.value(name, t)
        code = text = self.units[name]
        alt = ALT_UNITS.get(name)
        if alt and self.rng.random() < alt[3]:
            code, text = alt[0], alt[1]
            value = round(value * 9 / 5 + 32, 1) if alt[2] is None else round(value * alt[2], 2)
        if self.rng.random() < 0.003:
            value = value * 40              # implausible: dropped and reported
        return {"value": value, "unit": text, "system": UCUM, "code": code}

    def write(self) -> tuple[bytes, bytes]:
        rng = self.rng
        t = self.start + timedelta(minutes=rng.randrange(10, 60))
        end = self.start + timedelta(hours=self.hours)
        while t < end:                                     # a vital-signs round every ~3 h
            for name in ("heart_rate", "resp_rate", "spo2", "mean_bp") + (("temperature",) if rng.random() < 0.6
                                                                           else ()):
                self.observation(t + timedelta(minutes=rng.randrange(0, 9)), "vital-signs", self.codes[name],
                                 valueQuantity=self.quantity(name, t))
            sbp = round(self.value("mean_bp", t) * 1.4 + rng.gauss(0, 6))
            self.observation(t + timedelta(minutes=9), "vital-signs", self.codes["bp_panel"], component=[
                {"code": {"coding": [{"system": LOINC, "code": self.codes["systolic_bp"][1]}]},
                 "valueQuantity": {"value": sbp, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": LOINC, "code": self.codes["diastolic_bp"][1]}]},
                 "valueQuantity": {"value": round(sbp * 0.58 + rng.gauss(0, 4)), "unit": "mmHg",
                                   "system": UCUM, "code": "mm[Hg]"}}])
            if rng.random() < 0.5:
                self.observation(t + timedelta(minutes=10), "vital-signs", self.codes["gcs"],
                                 valueQuantity={"value": min(15, max(3, round(self.value("gcs", t)))),
                                                "unit": "score", "system": UCUM, "code": "{score}"})
            if rng.random() < 0.35:
                self.observation(t + timedelta(minutes=11), "vital-signs", self.codes["fio2"],
                                 valueQuantity=self.quantity("fio2", t))
            if rng.random() < 0.4:
                self.observation(t + timedelta(minutes=12), "vital-signs", self.codes["urine_output"],
                                 valueQuantity={"value": round(rng.uniform(20, 400)), "unit": "mL",
                                                "system": UCUM, "code": "mL"})
            t += timedelta(minutes=rng.randrange(150, 210))
        labs = list(LABS)
        t = self.start + timedelta(hours=2)
        while t < end:                                     # labs twice a day
            for name in rng.sample(labs, rng.randrange(5, 12)):
                self.observation(t + timedelta(minutes=rng.randrange(0, 30)), "laboratory", self.codes[name],
                                 valueQuantity=self.quantity(name, t))
            t += timedelta(hours=rng.uniform(10, 14))
        if rng.random() < 0.7:
            self.observation(self.start + timedelta(minutes=5), "vital-signs", self.codes["weight"],
                             valueQuantity={"value": round(rng.uniform(45, 120), 1), "unit": "kg",
                                            "system": UCUM, "code": "kg"})
        patient = {"resourceType": "Patient", "id": self.pid, "gender": rng.choice(["male", "female"]),
                   "birthDate": f"{rng.randrange(1930, 2007)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"}
        encounter = {"resourceType": "Encounter", "id": f"{self.pid}-e", "status": "in-progress",
                     "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                     "serviceType": {"coding": [{"system": ICU_SYSTEM, "code": str(rng.randrange(1, 5))}]},
                     "subject": {"reference": f"Patient/{self.pid}"},
                     "period": {"start": _when(self.start, self.offset)}}
        return orjson.dumps(patient), orjson.dumps(encounter)


def generate(out_dir: Path, patients: int, seed: int = 2026) -> dict[str, int]:
    """Write Patient/Encounter/Observation.ndjson into ``out_dir``; return line counts."""
    rng = random.Random(seed)
    codes, units = codes_from_mapping()
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"Patient": 0, "Encounter": 0, "Observation": 0}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        buckets = [open(Path(tmp) / f"{i}.ndjson", "wb") for i in range(BUCKETS)]
        with open(out_dir / "Patient.ndjson", "wb") as pat, open(out_dir / "Encounter.ndjson", "wb") as enc:
            for i in range(patients):
                p = _Patient(rng, i, codes, units)
                patient, encounter = p.write()
                pat.write(patient + b"\n")
                enc.write(encounter + b"\n")
                for line in p.lines:
                    buckets[rng.randrange(BUCKETS)].write(line + b"\n")
                counts["Observation"] += len(p.lines)
                counts["Patient"] += 1
                counts["Encounter"] += 1
        for fh in buckets:
            fh.close()
        with open(out_dir / "Observation.ndjson", "wb") as out:
            for i in range(BUCKETS):
                with open(Path(tmp) / f"{i}.ndjson", "rb") as fh:
                    shutil.copyfileobj(fh, out)
    return counts


def cached(patients: int, seed: int = 2026, root: Path = Path(tempfile.gettempdir()) / "fhir-ai-bench") -> Path:
    """The generated export for (patients, seed), made once and reused (never inside the repository)."""
    out = root / f"export-{patients}-{seed}"
    if not (out / "Observation.ndjson").exists():
        generate(out, patients, seed)
    return out
