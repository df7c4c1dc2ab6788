"""KTAS triage rows (Moon et al. 2019) as FHIR R4 (SOURCE.md "FHIR representation" + fhir-mapping.csv)."""
from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fhir_ai.datasets import (CATEGORY_DISPLAY, LOINC, OBSERVATION_CATEGORY, SNOMED, UCUM, V3_ACT_CODE,
                              write_ndjson)
from fhir_ai.errors import BadRequest, ConfigurationError

log = logging.getLogger(__name__)

__all__ = ["Visit", "read_rows", "row_to_fhir", "holdout_ids", "iter_visits", "convert_ktas",
           "KTAS_LEVEL_SYSTEM", "OBSERVATION_COLUMNS"]

ROW_ID_SYSTEM = "https://fhir-ai.invalid/NamingSystem/ktas-row-id"
ED_SYSTEM = "https://fhir-ai.invalid/NamingSystem/ktas-ed"
ARRIVAL_SYSTEM = "https://fhir-ai.invalid/CodeSystem/ktas-arrival-mode"
INJURY_SYSTEM = "https://fhir-ai.invalid/CodeSystem/ktas-injury"
KTAS_LEVEL_SYSTEM = "https://fhir-ai.invalid/CodeSystem/ktas-level"
MODE_OF_ARRIVAL_URL = "http://hl7.org/fhir/StructureDefinition/encounter-modeOfArrival"
ARRIVAL = "2100-01-01T00:00:00Z"
ARRIVAL_YEAR = 2100

# Cells that mean "no value": '??' (lost Korean text / missing vital), empty, and Turkish Excel's
# '#BOŞ!' (#NULL!) which reaches us as '#BOÞ!' after the latin-1 round trip.
MISSING_TOKENS = frozenset({"", "??", "#BOÞ!", "#BOŞ!"})
TEXT_COLUMNS = frozenset({"Chief_complain", "Diagnosis in ED"})
# Text made only of question marks is Korean text lost in an earlier encoding, not a complaint.
_LOST_TEXT = re.compile(r"^[?\s]+$")

GENDER = {1: "female", 2: "male"}
ED_DISPLAY = {1: "Local emergency department (3rd degree)", 2: "Regional emergency department (4th degree)"}
ARRIVAL_DISPLAY = {1: "Walking", 2: "Public ambulance", 3: "Private vehicle", 4: "Private ambulance",
                   5: "Other", 6: "Other", 7: "Other"}
INJURY_DISPLAY = {1: "Disease (non-injury) visit", 2: "Injury visit"}
AVPU = {1: ("248234008", "Mentally alert", "A"), 2: ("255373000", "Verbal", "V"),
        3: ("450847001", "Responds to pain", "P"), 4: ("422768004", "Unresponsive", "U")}
KTAS_LEVEL_DISPLAY = {1: "KTAS 1 Resuscitation", 2: "KTAS 2 Emergent", 3: "KTAS 3 Urgent",
                      4: "KTAS 4 Less urgent", 5: "KTAS 5 Non-urgent"}

# Quantity columns: column -> (category, [(system, code, display)...], UCUM unit). From fhir-mapping.csv.
QUANTITIES: dict[str, tuple[str, list[tuple[str, str, str]], str]] = {
    "NRS_pain": ("survey", [(LOINC, "72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported")],
                 "{score}"),
    "SBP": ("vital-signs", [(LOINC, "8480-6", "Systolic blood pressure")], "mm[Hg]"),
    "DBP": ("vital-signs", [(LOINC, "8462-4", "Diastolic blood pressure")], "mm[Hg]"),
    "HR": ("vital-signs", [(LOINC, "8867-4", "Heart rate")], "/min"),
    "RR": ("vital-signs", [(LOINC, "9279-1", "Respiratory rate")], "/min"),
    "BT": ("vital-signs", [(LOINC, "8310-5", "Body temperature")], "Cel"),
    # SpO2 coded as US Core does: pulse oximetry plus the generic arterial saturation code.
    "Saturation": ("vital-signs", [(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
                                   (LOINC, "2708-6", "Oxygen saturation in Arterial blood")], "%"),
}
# Every column that becomes an Observation, in output order. KTAS_expert and post-visit columns never do.
OBSERVATION_COLUMNS = ("Mental", "Pain", "NRS_pain", "SBP", "DBP", "HR", "RR", "BT", "Saturation", "KTAS_RN")
LABEL_COLUMNS = {"KTAS_expert": "ktas_expert", "KTAS_RN": "ktas_rn", "mistriage": "mistriage",
                 "Error_group": "error_group", "Disposition": "disposition", "Diagnosis in ED": "diagnosis",
                 "Length of stay_min": "length_of_stay_min", "KTAS duration_min": "ktas_duration_min"}


class Visit(NamedTuple):
    """One ED visit: its row_id, its FHIR resources, and its labels (never part of the FHIR)."""
    row_id: int
    resources: list[dict[str, Any]]
    label: dict[str, Any]


def _cell(column: str, raw: str) -> int | float | str | None:
    text = raw.strip()
    if text in MISSING_TOKENS:
        return None
    if column in TEXT_COLUMNS:
        return None if _LOST_TEXT.match(text) else text
    number = text.replace(",", ".")  # decimal comma ("5,00")
    try:
        return int(number)
    except ValueError:
        try:
            return float(number)
        except ValueError:
            raise BadRequest(f"KTAS column {column!r}: unexpected value {text!r}") from None


def read_rows(csv_path: str | Path) -> list[dict[str, Any]]:
    """Read a KTAS CSV (latin-1, ';', decimal comma) into dicts keyed by the original column names.

    Numbers become int/float, missing tokens ('??', '', '#BOÞ!') and text made only of '?' become None.
    """
    with open(csv_path, encoding="latin-1", newline="") as fh:
        reader = csv.reader(fh, delimiter=";")
        header = [h.strip() for h in next(reader)]
        rows = []
        for raw in reader:
            if not raw:
                continue
            if len(raw) != len(header):
                raise BadRequest(f"{csv_path}: row {reader.line_num} has {len(raw)} cells, expected {len(header)}")
            rows.append({col: _cell(col, cell) for col, cell in zip(header, raw)})
    return rows


def _coding(system: str, code: int | str, display: str) -> dict[str, str]:
    return {"system": system, "code": str(code), "display": display}


def _patient(row_id: int, row: dict[str, Any]) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": f"ktas-{row_id}",
                               "identifier": [{"system": ROW_ID_SYSTEM, "value": str(row_id)}],
                               "gender": GENDER.get(row.get("Sex"), "unknown")}  # type: ignore[arg-type]
    age = row.get("Age")
    if age is not None:
        patient["birthDate"] = f"{ARRIVAL_YEAR - int(age):04d}-01-01"
    return patient


def _encounter(row_id: int, row: dict[str, Any]) -> dict[str, Any]:
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": f"ktas-enc-{row_id}"}
    mode = row.get("Arrival mode")
    if mode in ARRIVAL_DISPLAY:
        enc["extension"] = [{"url": MODE_OF_ARRIVAL_URL,
                             "valueCoding": _coding(ARRIVAL_SYSTEM, mode, ARRIVAL_DISPLAY[mode])}]
    enc["status"] = "in-progress"
    enc["class"] = {"system": V3_ACT_CODE, "code": "EMER", "display": "emergency"}
    injury = row.get("Injury")
    if injury in INJURY_DISPLAY:
        enc["type"] = [{"coding": [_coding(INJURY_SYSTEM, injury, INJURY_DISPLAY[injury])],
                        "text": INJURY_DISPLAY[injury]}]
    enc["subject"] = {"reference": f"Patient/ktas-{row_id}"}
    enc["period"] = {"start": ARRIVAL}
    complaint = row.get("Chief_complain")
    if complaint is not None:
        enc["reasonCode"] = [{"text": complaint}]
    group = row.get("Group")
    if group in ED_DISPLAY:
        enc["serviceProvider"] = {"identifier": {"system": ED_SYSTEM, "value": str(group)},
                                  "display": ED_DISPLAY[group]}
    return enc


def _observation(row_id: int, column: str, category: str, codings: list[dict[str, str]],
                 value: dict[str, Any]) -> dict[str, Any]:
    slug = re.sub(r"[^a-z0-9]+", "-", column.lower()).strip("-")
    return {
        "resourceType": "Observation", "id": f"ktas-{row_id}-{slug}", "status": "final",
        "category": [{"coding": [_coding(OBSERVATION_CATEGORY, category, CATEGORY_DISPLAY[category])]}],
        "code": {"coding": codings, "text": column},
        "subject": {"reference": f"Patient/ktas-{row_id}"},
        "encounter": {"reference": f"Encounter/ktas-enc-{row_id}"},
        "effectiveDateTime": ARRIVAL,
        **value,
    }


def _observations(row_id: int, row: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for column in OBSERVATION_COLUMNS:
        value = row.get(column)
        if value is None:
            continue  # missing -> no Observation; NRS_pain is never filled with 0
        if column == "Mental":
            if value not in AVPU:
                log.warning("ktas-%s: Mental code %r unknown, not emitted", row_id, value)
                continue
            code, display, letter = AVPU[value]
            out.append(_observation(
                row_id, column, "survey", [_coding(LOINC, "11454-6", "Responsiveness assessment at First encounter")],
                {"valueCodeableConcept": {"coding": [_coding(SNOMED, code, display)], "text": letter}}))
        elif column == "Pain":
            out.append(_observation(row_id, column, "survey", [_coding(SNOMED, "22253000", "Pain (finding)")],
                                    {"valueBoolean": value == 1}))
        elif column == "KTAS_RN":
            if value not in KTAS_LEVEL_DISPLAY:
                log.warning("ktas-%s: KTAS_RN %r unknown, not emitted", row_id, value)
                continue
            display = KTAS_LEVEL_DISPLAY[value]
            out.append(_observation(
                row_id, column, "survey", [_coding(LOINC, "11283-9", "Acuity assessment at First encounter")],
                {"valueCodeableConcept": {"coding": [_coding(KTAS_LEVEL_SYSTEM, value, display)], "text": display}}))
        else:
            category, codes, unit = QUANTITIES[column]
            out.append(_observation(
                row_id, column, category, [_coding(*c) for c in codes],
                {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}))
    return out


def row_to_fhir(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Return [Patient, Encounter, Observation...] for one row from read_rows() as FHIR R4 JSON dicts."""
    row_id = row.get("row_id")
    if not isinstance(row_id, int):
        raise BadRequest("KTAS row has no integer row_id")
    return [_patient(row_id, row), _encounter(row_id, row), *_observations(row_id, row)]


def holdout_ids(data_dir: str | Path) -> set[int]:
    """The holdout row_ids listed in ``holdout-ids.txt``; a missing file is a configuration error."""
    path = Path(data_dir) / "holdout-ids.txt"
    if not path.is_file():
        raise ConfigurationError(f"{path} not found: refusing to read KTAS without the holdout list")
    return {int(line) for line in path.read_text(encoding="ascii").split() if line}


def iter_visits(data_dir: str | Path, limit: int | None = None) -> Iterator[Visit]:
    """Yield Visit(row_id, resources, label) for train.csv rows, skipping every holdout row_id."""
    data = Path(data_dir)
    excluded = holdout_ids(data)
    produced = 0
    for row in read_rows(data / "train.csv"):
        if limit is not None and produced >= limit:
            return
        row_id = row["row_id"]
        if row_id in excluded:
            log.warning("KTAS holdout row %s found in train.csv, skipped", row_id)
            continue
        label = {key: row.get(column) for column, key in LABEL_COLUMNS.items()}
        produced += 1
        yield Visit(row_id, row_to_fhir(row), label)


def convert_ktas(data_dir: str | Path, out_dir: str | Path, limit: int | None = None) -> dict[str, int]:
    """Write train.csv visits as Bulk-Data NDJSON plus ``labels.csv`` (patient_id + labels); return counts.

    labels.csv sits beside the NDJSON files so training can join labels by Patient id; it is not FHIR.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["patient_id", "row_id", *LABEL_COLUMNS.values()]
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as labels_fh:
        labels = csv.writer(labels_fh)
        labels.writerow(columns)

        def resources() -> Iterator[dict[str, Any]]:
            for visit in iter_visits(data_dir, limit):
                row = {"patient_id": f"ktas-{visit.row_id}", "row_id": visit.row_id, **visit.label}
                labels.writerow(["" if row[c] is None else row[c] for c in columns])
                yield from visit.resources

        counts = write_ndjson(resources(), out)
    counts["labels"] = counts.get("Patient", 0)
    return counts
