"""PhysioNet/CinC Challenge 2012 records as FHIR R4 (SOURCE.md "FHIR representation" + fhir-mapping.csv)."""
from __future__ import annotations

import csv
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fhir_ai.datasets import (CATEGORY_DISPLAY, LOINC, OBSERVATION_CATEGORY, SNOMED, UCUM, V3_ACT_CODE,
                              write_ndjson)
from fhir_ai.errors import BadRequest, ConfigurationError

log = logging.getLogger(__name__)

__all__ = ["Stay", "read_records", "record_to_fhir", "load_outcomes", "holdout_ids", "iter_stays",
           "write_ndjson", "convert_physionet", "VARIABLES"]

RECORD_ID_SYSTEM = "https://fhir-ai.invalid/NamingSystem/physionet2012-recordid"
ICUTYPE_SYSTEM = "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype"
ICUTYPE_DISPLAY = {"1": "Coronary Care Unit", "2": "Cardiac Surgery Recovery Unit",
                   "3": "Medical ICU", "4": "Surgical ICU"}
GENDER = {"0": "female", "1": "male"}
ADMISSION = "2100-01-01T00:00:00Z"
ADMISSION_YEAR = 2100
HOLDOUT_SETS = frozenset({"c"})

# variable: (category, code system, code, display, UCUM unit or None for valueBoolean).
# Copied from fhir-mapping.csv; tests/test_datasets.py checks this table against that file.
VARIABLES: dict[str, tuple[str, str, str, str, str | None]] = {
    "Height": ("vital-signs", LOINC, "8302-2", "Body height", "cm"),
    "Weight": ("vital-signs", LOINC, "29463-7", "Body weight", "kg"),
    "Albumin": ("laboratory", LOINC, "1751-7", "Albumin [Mass/volume] in Serum or Plasma", "g/dL"),
    "ALP": ("laboratory", LOINC, "6768-6",
            "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma", "U/L"),
    "ALT": ("laboratory", LOINC, "1742-6",
            "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L"),
    "AST": ("laboratory", LOINC, "1920-8",
            "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L"),
    "Bilirubin": ("laboratory", LOINC, "1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL"),
    "BUN": ("laboratory", LOINC, "3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL"),
    "Cholesterol": ("laboratory", LOINC, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL"),
    "Creatinine": ("laboratory", LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL"),
    "DiasABP": ("vital-signs", LOINC, "76213-8", "Invasive Diastolic blood pressure", "mm[Hg]"),
    "FiO2": ("vital-signs", LOINC, "3150-0", "Inhaled oxygen concentration", "1"),
    "GCS": ("survey", LOINC, "9269-2", "Glasgow coma score total", "{score}"),
    "Glucose": ("laboratory", LOINC, "2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL"),
    "HCO3": ("laboratory", LOINC, "1963-8", "Bicarbonate [Moles/volume] in Serum or Plasma", "mmol/L"),
    "HCT": ("laboratory", LOINC, "4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%"),
    "HR": ("vital-signs", LOINC, "8867-4", "Heart rate", "/min"),
    "K": ("laboratory", LOINC, "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L"),
    "Lactate": ("laboratory", LOINC, "32693-4", "Lactate [Moles/volume] in Blood", "mmol/L"),
    "Mg": ("laboratory", LOINC, "19123-9", "Magnesium [Mass/volume] in Serum or Plasma", "mg/dL"),
    "MAP": ("vital-signs", LOINC, "76214-6", "Invasive Mean blood pressure", "mm[Hg]"),
    "MechVent": ("procedure", SNOMED, "40617009", "Artificial ventilation (regime/therapy)", None),
    "Na": ("laboratory", LOINC, "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L"),
    "NIDiasABP": ("vital-signs", LOINC, "8462-4", "Diastolic blood pressure", "mm[Hg]"),
    "NIMAP": ("vital-signs", LOINC, "8478-0", "Mean blood pressure", "mm[Hg]"),
    "NISysABP": ("vital-signs", LOINC, "8480-6", "Systolic blood pressure", "mm[Hg]"),
    "PaCO2": ("laboratory", LOINC, "2019-8", "Carbon dioxide [Partial pressure] in Arterial blood", "mm[Hg]"),
    "PaO2": ("laboratory", LOINC, "2703-7", "Oxygen [Partial pressure] in Arterial blood", "mm[Hg]"),
    "pH": ("laboratory", LOINC, "2744-1", "pH of Arterial blood", "[pH]"),
    "Platelets": ("laboratory", LOINC, "777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL"),
    "RespRate": ("vital-signs", LOINC, "9279-1", "Respiratory rate", "/min"),
    "SaO2": ("laboratory", LOINC, "2708-6", "Oxygen saturation in Arterial blood", "%"),
    "SysABP": ("vital-signs", LOINC, "76215-3", "Invasive Systolic blood pressure", "mm[Hg]"),
    "Temp": ("vital-signs", LOINC, "8310-5", "Body temperature", "Cel"),
    "TroponinI": ("laboratory", LOINC, "10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma", "ug/L"),
    "TroponinT": ("laboratory", LOINC, "6598-7", "Troponin T.cardiac [Mass/volume] in Serum or Plasma", "ug/L"),
    "Urine": ("vital-signs", LOINC, "9187-6", "Urine output", "mL"),
    "WBC": ("laboratory", LOINC, "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL"),
}
# General descriptors that live on Patient/Encounter rather than in Observations.
DESCRIPTORS = frozenset({"RecordID", "Age", "Gender", "ICUType"})

# The documented alternative units a consumer must convert (SOURCE.md "Units"): (unit, value -> value).
ALT_UNITS: dict[str, tuple[str, Any]] = {
    "Temp": ("[degF]", lambda c: round(c * 9 / 5 + 32, 4)),
    "Creatinine": ("umol/L", lambda mg_dl: round(mg_dl * 88.4, 4)),
    "Glucose": ("mmol/L", lambda mg_dl: round(mg_dl / 18.0156, 4)),
    "FiO2": ("%", lambda fraction: round(fraction * 100, 6)),
}

Line = tuple[str, str, str]


class Stay(NamedTuple):
    """One ICU stay: its id, its FHIR resources, and its outcome row (see load_outcomes)."""
    record_id: int
    resources: list[dict[str, Any]]
    outcome: dict[str, Any]


def _offset_to_datetime(hhmm: str) -> str:
    hours, minutes = hhmm.split(":")
    h, m = int(hours), int(minutes)
    return f"2100-01-{1 + h // 24:02d}T{h % 24:02d}:{m:02d}:00Z"


# All offsets of a 48 h record fit in a small cache; converting a string once saves ~30% of the run time.
_TIMES: dict[str, str] = {}


def _when(hhmm: str) -> str:
    when = _TIMES.get(hhmm)
    if when is None:
        when = _TIMES[hhmm] = _offset_to_datetime(hhmm)
    return when


def _number(text: str) -> int | float:
    # Keep integers as integers so "73" is written as 73, not 73.0 (FHIR decimals keep their precision).
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_records(tar_path: str | Path) -> Iterator[tuple[int, list[Line]]]:
    """Yield (RecordID, [(HH:MM, parameter, value), ...]) for each ``<RecordID>.txt`` in a set's tar, in file order."""
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".txt"):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            text = fh.read().decode("ascii")
            rows = text.splitlines()
            if not rows or rows[0].strip() != "Time,Parameter,Value":
                raise BadRequest(f"{tar_path}:{member.name}: header is not 'Time,Parameter,Value'")
            lines: list[Line] = []
            for row in rows[1:]:
                if not row:
                    continue
                time, param, value = row.split(",", 2)
                lines.append((time, param, value.strip()))
            yield int(Path(member.name).stem), lines


def _patient(record_id: int, descriptors: dict[str, str]) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient", "id": f"p2012-{record_id}",
        "identifier": [{"system": RECORD_ID_SYSTEM, "value": str(record_id)}],
        "gender": GENDER.get(descriptors.get("Gender", "-1"), "unknown"),
    }
    age = descriptors.get("Age")
    if age is not None and _number(age) != -1:
        patient["birthDate"] = f"{ADMISSION_YEAR - int(_number(age)):04d}-01-01"
    return patient


def _encounter(record_id: int, descriptors: dict[str, str]) -> dict[str, Any]:
    encounter: dict[str, Any] = {
        "resourceType": "Encounter", "id": f"p2012-enc-{record_id}", "status": "in-progress",
        "class": {"system": V3_ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
        "subject": {"reference": f"Patient/p2012-{record_id}"},
        "period": {"start": ADMISSION},
    }
    icu = descriptors.get("ICUType", "-1")
    if icu in ICUTYPE_DISPLAY:
        display = ICUTYPE_DISPLAY[icu]
        encounter["serviceType"] = {"coding": [{"system": ICUTYPE_SYSTEM, "code": icu, "display": display}],
                                    "text": display}
    elif icu != "-1":
        log.warning("record %s: unknown ICUType code %r, serviceType left out", record_id, icu)
    return encounter


def _static_parts(param: str, spec: tuple[str, str, str, str, str | None]
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    category, system, code, display, _unit = spec
    return ([{"coding": [{"system": OBSERVATION_CATEGORY, "code": category,
                          "display": CATEGORY_DISPLAY[category]}]}],
            {"coding": [{"system": system, "code": code, "display": display}], "text": param})


def record_to_fhir(record_id: int, lines: Iterable[Line], *,
                   unit_variant: str | None = None) -> list[dict[str, Any]]:
    """Return [Patient, Encounter, Observation...] for one record as FHIR R4 JSON dicts.

    ``unit_variant="alt"`` writes the 1st, 3rd, 5th ... Temp/Creatinine/Glucose/FiO2 Observation of
    the record in its documented alternative unit ([degF], umol/L, mmol/L, %), so every record that
    has one of these variables mixes both units; ids stay the same.
    """
    if unit_variant not in (None, "alt"):
        raise BadRequest(f"unknown unit_variant {unit_variant!r} (expected None or 'alt')")
    alt = unit_variant == "alt"
    subject = {"reference": f"Patient/p2012-{record_id}"}
    encounter_ref = {"reference": f"Encounter/p2012-enc-{record_id}"}
    prefix = f"p2012-{record_id}-"
    # category/code/references are shared by the Observations of one record (never across records):
    # building them once per record makes the 3.5 M-Observation conversion about 3x faster.
    # Callers treat the result as read-only (copy.deepcopy before editing one resource).
    static: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    alt_seen: dict[str, int] = {}
    descriptors: dict[str, str] = {}
    observations: list[dict[str, Any]] = []
    for n, (hhmm, param, value) in enumerate(lines, start=1):
        if param in DESCRIPTORS:
            descriptors.setdefault(param, value)
            continue
        if not param:
            continue  # set-c quirk: a line without a parameter name is dropped (SOURCE.md)
        spec = VARIABLES.get(param)
        if spec is None:
            log.warning("record %s line %d: unknown parameter %r dropped", record_id, n, param)
            continue
        try:  # inlined _number(): this loop runs 3.5 M times
            number: int | float = int(value)
        except ValueError:
            number = float(value)
        if number == -1:
            continue  # -1 means missing
        shared = static.get(param)
        if shared is None:
            shared = static[param] = _static_parts(param, spec)
        obs: dict[str, Any] = {
            "resourceType": "Observation", "id": prefix + str(n), "status": "final",
            "category": shared[0], "code": shared[1], "subject": subject, "encounter": encounter_ref,
            "effectiveDateTime": _TIMES.get(hhmm) or _when(hhmm),
        }
        unit = spec[4]
        if unit is None:
            obs["valueBoolean"] = number == 1
        else:
            if alt and param in ALT_UNITS:
                seen = alt_seen[param] = alt_seen.get(param, 0) + 1
                if seen % 2 == 1:
                    unit, convert = ALT_UNITS[param]
                    number = convert(number)
            obs["valueQuantity"] = {"value": number, "unit": unit, "system": UCUM, "code": unit}
        observations.append(obs)
    return [_patient(record_id, descriptors), _encounter(record_id, descriptors), *observations]


def _score(text: str) -> int | float | None:
    number = _number(text)
    return None if number == -1 else number


def load_outcomes(path: str | Path) -> dict[int, dict[str, Any]]:
    """Read an Outcomes-<set>.txt file into {RecordID: {saps_i, sofa, length_of_stay, survival, in_hospital_death}}.

    -1 becomes None for SAPS-I, SOFA and Survival (Survival -1 means "no death recorded").
    """
    outcomes: dict[int, dict[str, Any]] = {}
    with open(path, newline="", encoding="ascii") as fh:
        for row in csv.DictReader(fh):
            outcomes[int(row["RecordID"])] = {
                "saps_i": _score(row["SAPS-I"]),
                "sofa": _score(row["SOFA"]),
                "length_of_stay": _number(row["Length_of_stay"]),
                "survival": _score(row["Survival"]),
                "in_hospital_death": int(row["In-hospital_death"]),
            }
    return outcomes


def holdout_ids(data_dir: str | Path) -> set[int]:
    """The holdout (set-c) RecordIDs listed in ``holdout-ids.txt``; a missing file is a configuration error."""
    path = Path(data_dir) / "holdout-ids.txt"
    if not path.is_file():
        raise ConfigurationError(f"{path} not found: refusing to read PhysioNet 2012 without the holdout list")
    return {int(line) for line in path.read_text(encoding="ascii").split() if line}


def _set_name(name: str) -> str:
    short = name.lower().removeprefix("set-")
    if short in HOLDOUT_SETS:
        raise BadRequest("PhysioNet 2012 set-c is the holdout and is never read for training or tuning")
    if short not in ("a", "b"):
        raise BadRequest(f"unknown PhysioNet 2012 set {name!r} (expected 'a' or 'b')")
    return short


def iter_stays(data_dir: str | Path, sets: Iterable[str] = ("a", "b"), limit: int | None = None, *,
               unit_variant: str | None = None) -> Iterator[Stay]:
    """Yield non-holdout stays as Stay(record_id, resources, outcome); set "c" and holdout ids are refused."""
    data = Path(data_dir)
    names = [_set_name(s) for s in sets]  # validate all before reading anything
    excluded = holdout_ids(data)
    produced = 0
    for name in names:
        outcomes = load_outcomes(data / f"Outcomes-{name}.txt")
        for record_id, lines in read_records(data / f"set-{name}.tar.gz"):
            if limit is not None and produced >= limit:
                return
            if record_id in excluded:
                log.warning("set-%s: holdout record %s skipped", name, record_id)
                continue
            outcome = outcomes.get(record_id)
            if outcome is None:
                raise BadRequest(f"set-{name}: record {record_id} has no row in Outcomes-{name}.txt")
            produced += 1
            yield Stay(record_id, record_to_fhir(record_id, lines, unit_variant=unit_variant), outcome)


def convert_physionet(data_dir: str | Path, sets: Iterable[str], out_dir: str | Path, limit: int | None = None,
                      unit_variant: str | None = None) -> dict[str, int]:
    """Write non-holdout stays as Bulk-Data NDJSON plus ``labels.csv`` (patient_id + outcomes); return counts.

    labels.csv sits beside the NDJSON files so training can join labels by Patient id; it is not FHIR.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["patient_id", "record_id", "saps_i", "sofa", "length_of_stay", "survival", "in_hospital_death"]
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as labels_fh:
        labels = csv.writer(labels_fh)
        labels.writerow(columns)

        def resources() -> Iterator[dict[str, Any]]:
            for stay in iter_stays(data_dir, sets, limit, unit_variant=unit_variant):
                row = {"patient_id": f"p2012-{stay.record_id}", "record_id": stay.record_id, **stay.outcome}
                labels.writerow(["" if row[c] is None else row[c] for c in columns])
                yield from stay.resources

        counts = write_ndjson(resources(), out)
    counts["labels"] = counts.get("Patient", 0)
    return counts

