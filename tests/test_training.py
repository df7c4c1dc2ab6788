"""Training is reproducible, never reads the holdout, and shares one feature path with serving."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from fhir_ai.bulk import bulk_assess
from fhir_ai.cli import main
from fhir_ai.config import load_settings
from fhir_ai.datasets import physionet2012, write_ndjson
from fhir_ai.features import Extractor
from fhir_ai.fhir import times
from fhir_ai.mapping import load_directory, load_mapping
from fhir_ai.models.registry import ModelRegistry, load_model
from fhir_ai.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "physionet2012"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="shared data not mounted")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "deterioration"
    result = CliRunner().invoke(main, ["train", "deterioration", "--data", str(DATA), "--out", str(out),
                                       "--sets", "a", "--limit", "300", "--rounds", "25"])
    assert result.exit_code == 0, result.output
    return out


def test_training_writes_model_and_card(tiny_model):
    card = json.loads((tiny_model / "card.json").read_text())
    assert (tiny_model / "model.txt").exists() and (tiny_model / "MODEL_CARD.md").exists()
    assert card["training"]["stays"] == 300
    assert set(card["training"]["data_sha256"]) == {"set-a.tar.gz", "Outcomes-a.txt", "holdout-ids.txt"}
    assert card["training"]["command"].startswith("fhir-ai train deterioration")
    mapping = load_mapping(REPO / "mappings" / "deterioration.yaml")
    assert card["features"] == mapping.feature_names
    # The unit of every input the features read: a served mapping must keep it (registry.mapping_problems).
    assert card["mapping"]["units"] == mapping.feature_units
    assert card["mapping"]["units"]["heart_rate"] == "/min" and card["mapping"]["units"]["age"] is None
    assert 0 < card["thresholds"]["moderate"] < card["thresholds"]["high"] < 1
    assert 0.5 < card["metrics"]["model"]["auroc"] <= 1
    assert "set-c" in card["training"]["data"]


def test_training_is_reproducible(tiny_model, tmp_path):
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["train", "deterioration", "--data", str(DATA), "--out", str(again),
                                       "--sets", "a", "--limit", "300", "--rounds", "25"])
    assert result.exit_code == 0, result.output
    assert (again / "model.txt").read_bytes() == (tiny_model / "model.txt").read_bytes()
    first, second = (json.loads((d / "card.json").read_text()) for d in (tiny_model, again))
    assert first["version"] == second["version"]
    assert first["metrics"] == second["metrics"]


def test_holdout_set_is_refused():
    result = CliRunner().invoke(main, ["train", "deterioration", "--data", str(DATA), "--out", "/tmp/never",
                                       "--sets", "a,c", "--limit", "5"])
    assert result.exit_code != 0
    assert not Path("/tmp/never/model.txt").exists()


def test_training_bulk_and_single_patient_paths_give_the_same_features(tiny_model, tmp_path, database_url):
    """Raw records → FHIR → (training extractor | bulk NDJSON | folder source + $assess path)."""
    mapping = load_mapping(REPO / "mappings" / "deterioration.yaml")
    stays = list(physionet2012.iter_stays(DATA, sets=("a",), limit=6, unit_variant="alt"))
    training = Extractor(mapping)
    for stay in stays:
        training.add_all(stay.resources)
    train_fs = training.finish(as_of=None)

    folder = tmp_path / "export"
    write_ndjson((r for stay in stays for r in stay.resources), folder)
    registry = ModelRegistry({"deterioration": load_model(tiny_model, mapping)}, {"deterioration": mapping})
    out = tmp_path / "ra.ndjson"
    stats = bulk_assess(folder, out, registry, models=["deterioration"], explain="all", progress=False)
    assert stats.patients == 6
    bulk = {r["subject"]["reference"]: r for r in map(orjson.loads, out.read_bytes().splitlines())}

    settings = load_settings({"source_url": str(folder), "instance_path": str(tmp_path / "i"),
                              "database_url": database_url,
                              "mappings_dir": str(REPO / "mappings"), "models_dir": str(tiny_model.parent),
                              "write_back": False})
    pipeline = Pipeline.from_settings(settings)
    try:
        for row, patient_id in enumerate(train_fs.patient_ids):
            as_of = times.parse_datetime(bulk[f"Patient/{patient_id}"]["occurrenceDateTime"])
            single = pipeline.features_for(patient_id, ["deterioration"], as_of)["deterioration"]
            np.testing.assert_allclose(single.X[0], train_fs.X[row], rtol=1e-12, equal_nan=True)
            result = pipeline.assess(patient_id, as_of=as_of)
            ours = result.resources[0]
            assert ours["identifier"] == bulk[f"Patient/{patient_id}"]["identifier"]
            assert ours["prediction"][0]["probabilityDecimal"] == \
                bulk[f"Patient/{patient_id}"]["prediction"][0]["probabilityDecimal"]
    finally:
        pipeline.close()
