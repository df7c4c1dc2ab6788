"""DuckDB staging of a Bulk-Data export: file order, chunks prepared in the background, clean shutdown."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from fhir_ai.bulk import bulk_assess, input_files
from fhir_ai.features import ndjson
from fhir_ai.features.ndjson import NdjsonExport
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry
from test_bulk import per_resource

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
# (code, UCUM unit, unit text, low, high): a few vital signs the deterioration mapping reads
VITALS = [("8867-4", "/min", "/min", 50, 130), ("9279-1", "/min", "/min", 10, 30),
          ("8310-5", "Cel", "°C", 35.5, 39.5), ("8310-5", "[degF]", "°F", 96, 103),
          ("59408-5", "%", "%", 85, 100), ("2160-0", "umol/L", "µmol/L", 50, 300)]


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry.load(REPO / "fhir_ai" / "models" / "trained", load_directory(REPO / "mappings"))


def big_export(folder: Path, patients: int = 40, per_patient: int = 120, seed: int = 7) -> None:
    """Several thousand Observations over two files, shuffled, with the same values at the same times
    (so that only file order decides which Observation a patient's basis names first)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    resources = []
    for p in range(patients):
        pid = f"pt{p:03d}"
        for n in range(per_patient):
            code, unit, text, low, high = VITALS[n % len(VITALS)]
            hour, minute = divmod(n // 3 * 7, 60)
            status = rng.choice(["final"] * 8 + ["amended", "preliminary"])
            obs = {"resourceType": "Observation", "id": f"{pid}-{n}", "status": status,
                   "subject": {"reference": f"Patient/{pid}"},
                   "code": {"coding": [{"system": LOINC, "code": code}]},
                   "effectiveDateTime": f"2026-11-{19 + hour // 24}T{hour % 24:02d}:{minute:02d}:00+09:00",
                   "valueQuantity": {"value": round(rng.uniform(low, high), 1), "unit": text, "system": UCUM,
                                     "code": unit}}
            if n % 17 == 0:      # a second coding: another code of the same input, or one no input knows, first
                other = {"system": LOINC, "code": "8331-1" if code == "8310-5" else "1234-5"}
                obs["code"]["coding"].insert(n % 2, other)
            if n % 29 == 0:      # a blood-pressure panel
                obs["code"] = {"coding": [{"system": LOINC, "code": "85354-9"}]}
                obs.pop("valueQuantity")
                obs["component"] = [
                    {"code": {"coding": [{"system": LOINC, "code": part}]},
                     "valueQuantity": {"value": rng.randint(low, high), "unit": "mmHg", "system": UCUM,
                                       "code": "mm[Hg]"}}
                    for part, low, high in (("8480-6", 90, 150), ("8462-4", 50, 90))]
            resources.append(obs)
            if n % 40 == 1:      # a duplicate reading: same value, same time, another id
                twin = orjson.loads(orjson.dumps(obs))
                twin["id"] += "-twin"
                resources.append(twin)
    rng.shuffle(resources)
    half = len(resources) // 2
    (folder / "Observation.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources[:half]))
    (folder / "Observation.2.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources[half:]))
    (folder / "Patient.ndjson").write_bytes(b"".join(
        orjson.dumps({"resourceType": "Patient", "id": f"pt{p:03d}", "gender": "female" if p % 2 else "male",
                      "birthDate": f"19{30 + p % 60:02d}-05-17"}) + b"\n" for p in range(patients)))


@pytest.mark.parametrize("chunk_patients, on_disk", [(7, False), (40, False), (7, True)])
def test_large_export_over_two_files_equals_the_per_resource_path(tmp_path, registry, monkeypatch, chunk_patients,
                                                                   on_disk):
    if on_disk:       # what an export larger than the in-memory threshold gets
        monkeypatch.setattr(ndjson, "_IN_MEMORY_NDJSON", 0)
    big_export(tmp_path / "export")
    out = tmp_path / "ra.ndjson"
    stats = bulk_assess(tmp_path / "export", out, registry, models=["deterioration"], explain="all", news2=True,
                        progress=False, chunk_patients=chunk_patients)
    expected = per_resource(tmp_path / "export", registry, "all")
    assert stats.patients == 40
    for line in out.read_bytes().splitlines():
        ours = orjson.loads(line)
        # the same resource, basis in file order across both files
        assert ours == expected.pop(ours["subject"]["reference"] + "|" + ours["method"]["coding"][0]["code"])
    assert not expected


def test_on_disk_staging_hands_out_the_same_chunks(tmp_path, registry):
    big_export(tmp_path / "export", patients=15, per_patient=60)
    _, mapping = registry.get("deterioration")
    handed = {}
    for on_disk in (False, True):
        with NdjsonExport(input_files(tmp_path / "export"), list(mapping.code_index), chunk_patients=4,
                          on_disk=on_disk) as export:
            assert export.on_disk is on_disk
            handed[on_disk] = [(chunk.resources, chunk.columns) for chunk in export]
    assert len(handed[True]) == len(handed[False]) == 4
    for (res_mem, cols_mem), (res_disk, cols_disk) in zip(handed[False], handed[True]):
        assert res_mem == res_disk
        for name in ("obs", "part", "patient", "code", "status", "has_quantity", "unit", "boolean"):
            assert np.array_equal(getattr(cols_mem, name), getattr(cols_disk, name)), name
        for name in ("time", "quantity", "integer"):
            assert np.array_equal(getattr(cols_mem, name), getattr(cols_disk, name), equal_nan=True), name
        assert list(cols_mem.obs_id) == list(cols_disk.obs_id) and list(cols_mem.time_text) == list(cols_disk.time_text)
        assert cols_mem.units == cols_disk.units and cols_mem.patient_ids == cols_disk.patient_ids


def test_iteration_stopped_early_shuts_down_cleanly(tmp_path, registry):
    big_export(tmp_path / "export", patients=12, per_patient=30)
    _, mapping = registry.get("deterioration")
    with NdjsonExport(input_files(tmp_path / "export"), list(mapping.code_index), chunk_patients=3) as export:
        chunks = iter(export)
        first = next(chunks)                       # the second chunk is being prepared meanwhile
        assert first.patients == 3 and len(first.columns)
    # closed while the generator was suspended: no hang, no error; the generator finishes quietly
    chunks.close()
    with NdjsonExport(input_files(tmp_path / "export"), list(mapping.code_index), chunk_patients=3) as export:
        seen = [chunk.patients for chunk in export]
    assert seen == [3, 3, 3, 3]


def test_a_failure_while_scoring_leaves_no_thread_behind(tmp_path, registry):
    import threading
    big_export(tmp_path / "export", patients=9, per_patient=20)
    _, mapping = registry.get("deterioration")
    with pytest.raises(RuntimeError, match="scoring failed"):
        with NdjsonExport(input_files(tmp_path / "export"), list(mapping.code_index), chunk_patients=2) as export:
            for _ in export:
                raise RuntimeError("scoring failed")
    assert not [t for t in threading.enumerate() if t.name.startswith("fhir-ai-bulk")]


def test_export_without_observations(tmp_path, registry):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Patient.ndjson").write_bytes(b'{"resourceType": "Patient", "id": "a", "gender": "male"}\n')
    out = tmp_path / "ra.ndjson"
    stats = bulk_assess(folder, out, registry, models=["deterioration"], progress=False)
    assert stats.patients == 1 and stats.insufficient == 1 and stats.resources_read == 1
    (resource,) = map(orjson.loads, out.read_bytes().splitlines())
    assert resource["status"] == "cancelled" and resource["subject"] == {"reference": "Patient/a"}
