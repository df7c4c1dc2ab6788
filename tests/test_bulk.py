"""Bulk scoring: the DuckDB NDJSON front-end gives exactly what the per-resource path gives, chunk by chunk."""
from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from fhir_ai.bulk import bulk_assess, input_files
from fhir_ai.errors import BadRequest
from fhir_ai.features import Extractor
from fhir_ai.features.ndjson import NdjsonExport
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.pipeline import build_assessments

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry.load(REPO / "fhir_ai" / "models" / "trained", load_directory(REPO / "mappings"))


def quantity(value, code, unit=None, system=UCUM):
    q = {"value": value, "unit": unit or code, "code": code}
    if system:
        q["system"] = system
    return q


def observation(oid, patient, code, when, *, status="final", subject=None, **value):
    resource = {"resourceType": "Observation", "id": oid, "status": status,
                "subject": {"reference": subject or f"Patient/{patient}"},
                "code": {"coding": [{"system": LOINC, "code": code}]}}
    if when is not None:
        resource["effectiveDateTime"] = when
    resource.update(value)
    return resource


def messy_export(folder: Path) -> None:
    """Five patients and everything an export gets wrong or unusual, in no patient order."""
    patients = [{"resourceType": "Patient", "id": f"p{i}", "gender": "male" if i % 2 else "female",
                 "birthDate": f"19{40 + i}-03-0{i + 1}"} for i in range(5)]
    encounters = [{"resourceType": "Encounter", "id": f"e{i}", "status": "in-progress",
                   "subject": {"reference": f"Patient/p{i}"}, "period": {"start": "2026-11-19T08:00:00+09:00"},
                   "serviceType": {"coding": [{"system": "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype",
                                               "code": str(i % 4 + 1)}]}} for i in range(4)]
    encounters.append({"resourceType": "Encounter", "id": "gone", "status": "cancelled",
                       "subject": {"reference": "Patient/p1"}, "period": {"start": "2026-11-20T01:00:00Z"}})
    obs = []
    for i in range(4):
        p = f"p{i}"
        for h in range(0, 40, 4):
            obs.append(observation(f"{p}-hr{h}", p, "8867-4", f"2026-11-19T{h % 24:02d}:15:00{'+09:00' if h % 8 else 'Z'}"
                                   if h < 24 else f"2026-11-20T{h - 24:02d}:15:00-05:00",
                                   valueQuantity=quantity(70 + h + i, "/min")))
            obs.append(observation(f"{p}-rr{h}", p, "9279-1", f"2026-11-20T{h % 24:02d}:20:00.5Z",
                                   status="amended" if h == 8 else "final", valueQuantity=quantity(14 + h % 5, "/min")))
        obs.append({"resourceType": "Observation", "id": f"{p}-bp", "status": "final",
                    "subject": {"reference": f"Patient/{p}"},
                    "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
                    "effectivePeriod": {"start": "2026-11-20T09:00:00+01:00", "end": "2026-11-20T09:05:00+01:00"},
                    "component": [
                        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}, {"system": LOINC, "code": "76534-7"}]},
                         "valueQuantity": quantity(101 + i, "mm[Hg]", "mmHg")},
                        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                         "valueQuantity": {"value": 61, "unit": "mmHg"}}]})
        obs.append(observation(f"{p}-t", p, "8310-5", "2026-11-20T06:00:00+09:00",
                               valueQuantity=quantity(100.4, "[degF]", "°F")))
        obs.append(observation(f"{p}-err", p, "8310-5", "2026-11-20T07:00:00Z", status="entered-in-error",
                               valueQuantity=quantity(43, "Cel")))
        obs.append(observation(f"{p}-pre", p, "59408-5", "2026-11-20T07:00:00Z", status="preliminary",
                               valueQuantity=quantity(88, "%")))
        obs.append(observation(f"{p}-spo2", p, "59408-5", "2026-11-20T07:30:00+05:30", valueQuantity=quantity(0.95, "1")))
        obs.append(observation(f"{p}-crea", p, "2160-0", "2026-11-20T05:00:00Z", issued="2026-11-20T06:00:00Z",
                               valueQuantity=quantity(97, "umol/L", "µmol/L")))
        obs.append(observation(f"{p}-local", p, "2160-0", "2026-11-20T05:30:00Z",
                               valueQuantity=quantity(1.1, "mg/dL", system="http://hospital.invalid/units")))
        obs.append(observation(f"{p}-weird", p, "8867-4", "2026-11-20T05:30:00Z", valueQuantity=quantity(80, "mm[Hg]")))
        obs.append(observation(f"{p}-crazy", p, "8867-4", "2026-11-20T05:40:00Z", valueQuantity=quantity(900, "/min")))
        obs.append(observation(f"{p}-notime", p, "9279-1", None, valueQuantity=quantity(20, "/min")))
        obs.append(observation(f"{p}-badtime", p, "9279-1", "2026-02-30T10:00:00Z", valueQuantity=quantity(21, "/min")))
        obs.append(observation(f"{p}-naive", p, "9279-1", "2026-11-20T10:00:00", valueQuantity=quantity(22, "/min")))
        obs.append(observation(f"{p}-date", p, "29463-7", "2026-11-19", valueQuantity=quantity(154, "[lb_av]", "lb")))
        obs.append(observation(f"{p}-gcs", p, "9269-2", "2026-11-20T08:00:00Z", valueInteger=13))
        obs.append(observation(f"{p}-vent", p, "40617009", "2026-11-20T08:00:00Z", valueBoolean=bool(i % 2)))
        obs[-1]["code"]["coding"][0]["system"] = "http://snomed.info/sct"
        obs.append(observation(f"{p}-other", p, "1234-5", "2026-11-20T08:00:00Z", valueQuantity=quantity(1, "1")))
        obs.append(observation(f"{p}-novalue", p, "8867-4", "2026-11-20T08:10:00Z",
                               valueQuantity={"unit": "/min", "code": "/min", "system": UCUM}))
        obs.append(observation(f"{p}-same1", p, "8478-0", "2026-11-20T09:00:00Z", valueQuantity=quantity(70, "mm[Hg]")))
        obs.append(observation(f"{p}-same2", p, "76536-2", "2026-11-20T09:00:00Z", valueQuantity=quantity(75, "mm[Hg]")))
    obs.append(observation("abs", "p3", "8867-4", "2026-11-20T09:30:00Z",
                           subject="https://hospital.invalid/fhir/Patient/p3", valueQuantity=quantity(99, "/min")))
    obs.append(observation("only-obs", "p9", "8867-4", "2026-11-20T09:30:00Z", valueQuantity=quantity(99, "/min")))
    obs.append(observation("group", "x", "8867-4", "2026-11-20T09:30:00Z", subject="Group/ward",
                           valueQuantity=quantity(99, "/min")))
    obs = obs[::3] + obs[1::3] + obs[2::3]           # not sorted by patient
    folder.mkdir(parents=True, exist_ok=True)
    for name, resources in (("Patient", patients), ("Encounter", encounters)):
        (folder / f"{name}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    with gzip.open(folder / "Observation.ndjson.gz", "wb") as fh:
        fh.write(b"".join(orjson.dumps(r) + b"\n" for r in obs))


def per_resource(folder: Path, registry: ModelRegistry, explain: str) -> dict[str, dict]:
    """The single-patient/training way: every resource through Extractor.add, all patients at once."""
    model, mapping = registry.get("deterioration")
    extractor = Extractor(mapping)
    for path in input_files(folder):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            for line in fh:
                extractor.add(orjson.loads(line))
    _, built = build_assessments(model, extractor.finish(), explain=explain, news2=True)
    return {r["subject"]["reference"] + "|" + r["method"]["coding"][0]["code"]: r for rs in built for r in rs}


@pytest.mark.parametrize("chunk_patients", [1, 2, 1000])
def test_bulk_equals_the_per_resource_path(tmp_path, registry, chunk_patients):
    messy_export(tmp_path / "export")
    out = tmp_path / "ra.ndjson"
    stats = bulk_assess(tmp_path / "export", out, registry, models=["deterioration"], explain="all", news2=True,
                        progress=False, chunk_patients=chunk_patients)
    ours = {r["subject"]["reference"] + "|" + r["method"]["coding"][0]["code"]: r
            for r in map(orjson.loads, out.read_bytes().splitlines())}
    expected = per_resource(tmp_path / "export", registry, "all")
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key] == expected[key], key
    assert stats.patients == 6                  # p0..p4 and p9 (only an Observation); never the Group
    notes = " ".join(n["text"] for n in ours["Patient/p0|deterioration"]["note"])
    for reason in ("implausible value 900", "cannot be converted", "unreadable effective time", "no effective time"):
        assert reason in notes


def test_export_is_handed_out_in_whole_patient_chunks(tmp_path, registry):
    messy_export(tmp_path / "export")
    _, mapping = registry.get("deterioration")
    with NdjsonExport(input_files(tmp_path / "export"), list(mapping.code_index), chunk_patients=2) as export:
        chunks = list(export)
    assert export.patients == 6 and len(chunks) == 3
    seen: set[str] = set()
    for chunk in chunks:
        ids = {chunk.columns.patient_ids[k] for k in chunk.columns.patient} | {
            r["id"] if r["resourceType"] == "Patient" else r["subject"]["reference"][8:] for r in chunk.resources}
        assert len(ids) <= 2 and not ids & seen     # a patient never spans two chunks
        seen |= ids


def test_bulk_output_is_valid_fhir_r4b(tmp_path, registry):
    """Validation stays off the bulk hot path; the builder's output shape is checked here instead."""
    messy_export(tmp_path / "export")
    out = tmp_path / "ra.ndjson"
    bulk_assess(tmp_path / "export", out, registry, models=["deterioration"], explain="elevated", news2=True,
                progress=False)
    resources = list(map(orjson.loads, out.read_bytes().splitlines()))
    assert {r["status"] for r in resources} >= {"final"}
    for resource in resources:
        RiskAssessment.model_validate(resource)     # the whole resource, every basis reference included


def test_bad_json_line_is_a_bad_request(tmp_path, registry):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Observation.ndjson").write_bytes(b'{"resourceType": "Observation", "id": "a"}\n{not json\n')
    with pytest.raises(BadRequest, match="cannot read the export"):
        bulk_assess(folder, tmp_path / "out.ndjson", registry, models=["deterioration"], progress=False)
