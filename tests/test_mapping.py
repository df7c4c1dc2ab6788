"""Mapping files: validation errors name file and field; the default mapping accepts the documented FHIR."""
from __future__ import annotations

import csv
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fhir_ai.cli import main
from fhir_ai.errors import MappingError, MappingMismatch, ModelError
from fhir_ai.mapping import load_directory, load_mapping
from fhir_ai.mapping.loader import read_file
from fhir_ai.models.registry import ModelRegistry, check_against_mapping, check_mappings, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "mappings" / "deterioration.yaml"
MODELS = REPO / "fhir_ai" / "models" / "trained"
PHYSIONET_CSV = REPO.parent / "shared" / "data" / "physionet2012" / "fhir-mapping.csv"


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(DEFAULT)


def _write(tmp_path: Path, document: dict, name: str = "deterioration.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    return path


def _document() -> dict:
    return read_file(DEFAULT)


@pytest.mark.skipif(not PHYSIONET_CSV.exists(), reason="shared data not mounted")
def test_default_mapping_accepts_every_documented_code_and_unit(mapping):
    rows = list(csv.DictReader(PHYSIONET_CSV.open(encoding="utf-8")))
    checked = 0
    for row in rows:
        if row["fhir_resource"] != "Observation":
            continue
        key = (row["code_system"], row["code"])
        assert key in mapping.code_index, f"{row['variable']}: {key} is not mapped"
        for index in mapping.code_index[key]:
            spec = mapping.input_list[index]
            if spec.value_type == "quantity":
                assert spec.unit_conversion(row["ucum_unit"], row["ucum_unit"]) is not None, \
                    f"{row['variable']}: unit {row['ucum_unit']!r} not convertible to {spec.unit!r}"
            else:
                assert spec.value_type == "boolean" and row["variable"] == "MechVent"
        checked += 1
    assert checked == 38          # every Observation row of the CSV
    elements = {(spec.resource, spec.element) for spec in mapping.inputs.values()}
    assert {("Patient", "age"), ("Patient", "gender"), ("Encounter", "serviceType")} <= elements


@pytest.mark.parametrize("input_name, unit, value, expected", [
    ("temperature", "[degF]", 98.6, 37.0),
    ("temperature", "Cel", 37.2, 37.2),
    ("creatinine", "umol/L", 88.4, 1.0),           # molar mass 113.12 g/mol
    ("glucose", "mmol/L", 5.5, 99.09),
    ("fio2", "%", 50, 0.5),
    ("fio2", "1", 0.5, 0.5),
    ("paco2", "kPa", 5.3, 39.75),
    ("spo2", "1", 0.95, 95.0),
    ("systolic_bp", "mmHg", 120, 120.0),            # common non-UCUM text, via aliases
    ("weight", "[lb_av]", 154, 69.85),
])
def test_unit_conversions(mapping, input_name, unit, value, expected):
    scale, offset = mapping.inputs[input_name].unit_conversion(unit, unit)
    assert value * scale + offset == pytest.approx(expected, abs=0.01)


def test_incommensurable_unit_is_refused(mapping):
    assert mapping.inputs["heart_rate"].unit_conversion("mm[Hg]", None) is None
    assert mapping.inputs["sodium"].unit_conversion("mg/dL", None) is None   # no molar mass for sodium


def test_every_problem_is_reported_with_file_and_field(tmp_path):
    doc = _document()
    doc["inputs"]["heart_rate"]["unit"] = "beats per fortnight"
    del doc["inputs"]["resp_rate"]["codes"]
    doc["inputs"]["temperature"]["plausible"] = [45, 25]
    doc["features"][5]["input"] = "heartrate"
    doc["features"][6]["window"] = {"start": "-2 days"}
    doc["surprise"] = True
    path = _write(tmp_path, doc)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    problems = info.value.problems
    assert set(problems) >= {
        f"{path}: inputs.heart_rate.unit",
        f"{path}: inputs.resp_rate.codes",
        f"{path}: inputs.temperature.plausible",
        f"{path}: surprise",
    }, problems
    assert "unknown unit" in " ".join(problems[f"{path}: inputs.heart_rate.unit"])
    assert not any(".value." in where for where in problems), problems


def test_error_paths_are_the_paths_in_the_file(tmp_path):
    """marshmallow's Dict fields nest errors under 'key'/'value' segments the file does not have."""
    doc = read_file(REPO / "mappings" / "triage.yaml")
    doc["inputs"]["mental"]["value"] = "text"                        # the input's own 'value:' field
    doc["inputs"]["heart_rate"]["unit_aliases"] = {"bpm?": "beats per fortnight"}
    doc["inputs"]["complaint"]["categories"]["Chest Pain"] = {"label": "x", "keywords": ["chest"]}
    doc["inputs"]["Pulse"] = {"resource": "Observation", "label": "Pulse", "codes": [{"system": "s", "code": "c"}],
                              "unit": "/min"}
    doc["inputs"]["value"] = doc["inputs"].pop("spo2")                # an input may be named 'value'
    doc["inputs"]["value"]["unit"] = "per cent"
    doc["features"] = [f for f in doc["features"] if f["input"] != "spo2"]
    path = _write(tmp_path, doc, name="triage.yaml")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    problems = info.value.problems
    assert set(problems) == {
        f"{path}: inputs.mental.value",
        f"{path}: inputs.heart_rate.unit_aliases.bpm?",
        f"{path}: inputs.complaint.categories.Chest Pain",
        f"{path}: inputs.Pulse",
        f"{path}: inputs.value.unit",
    }, problems
    assert "Must be one of" in problems[f"{path}: inputs.mental.value"][0]
    assert problems[f"{path}: inputs.Pulse"] == [
        "name 'Pulse': use lower-case letters, digits and _, starting with a letter"]


def test_encounter_classes_are_checked(tmp_path):
    doc = _document()
    doc["scoring"]["encounter_classes"] = ["EMER", "in patient"]
    path = _write(tmp_path, doc)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert f"{path}: scoring.encounter_classes.1" in info.value.problems, info.value.problems
    doc["scoring"]["encounter_classes"] = ["EMER", "IMP"]
    assert load_mapping(_write(tmp_path, doc)).encounter_classes == ("EMER", "IMP")


def test_cross_references_are_checked(tmp_path):
    doc = _document()
    doc["features"][5]["input"] = "heartrate"
    doc["scoring"]["core_inputs"].append("pulse_ox")
    doc["news2"]["inputs"]["pulse"] = "hr"
    path = _write(tmp_path, doc)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    keys = set(info.value.problems)
    assert f"{path}: features.5.input" in keys
    assert f"{path}: scoring.core_inputs.6" in keys
    assert f"{path}: news2.inputs.pulse" in keys


def test_toml_mapping_loads_like_yaml(tmp_path, mapping):
    tomli_w = pytest.importorskip("tomli_w")
    path = tmp_path / "deterioration.toml"
    path.write_bytes(tomli_w.dumps(_document()).encode())
    assert tomllib.loads(path.read_text())["model"] == "deterioration"
    assert load_mapping(path).feature_names == mapping.feature_names


def test_file_name_must_match_model(tmp_path):
    path = _write(tmp_path, _document(), name="triage.yaml")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert f"{path}: model" in info.value.problems


def test_broken_yaml_names_the_file(tmp_path):
    path = tmp_path / "deterioration.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(MappingError) as info:
        load_directory(tmp_path)
    assert any(str(path) in key for key in info.value.problems)


def test_feature_order_is_checked_against_the_model(tmp_path, mapping):
    model = load_model(REPO / "fhir_ai" / "models" / "trained" / "deterioration", mapping)
    doc = _document()
    doc["features"][3], doc["features"][4] = doc["features"][4], doc["features"][3]
    reordered = load_mapping(_write(tmp_path, doc))
    with pytest.raises(ModelError, match="order differs"):
        check_against_mapping(model, reordered)
    doc = _document()
    doc["features"].pop()
    shorter = load_mapping(_write(tmp_path, doc))
    with pytest.raises(ModelError, match="missing"):
        check_against_mapping(model, shorter)


def test_cli_mappings_check(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["mappings", "check", str(REPO / "mappings")])
    assert ok.exit_code == 0, ok.output
    assert "ok: deterioration.yaml" in ok.output
    doc = _document()
    doc["inputs"]["heart_rate"]["statuses"] = ["final", "maybe"]
    _write(tmp_path, doc)
    bad = runner.invoke(main, ["mappings", "check", str(tmp_path)])
    assert bad.exit_code == 1
    assert "deterioration.yaml: inputs.heart_rate.statuses.1" in bad.output


def test_service_refuses_to_start_on_invalid_mapping(tmp_path):
    from fhir_ai.app import create_app
    shutil.copy(DEFAULT, tmp_path / "deterioration.yaml")
    (tmp_path / "deterioration.yaml").write_text(DEFAULT.read_text().replace("unit: /min", "unit: /fortnight", 1))
    with pytest.raises(MappingError, match="inputs.heart_rate"):
        create_app({"mappings_dir": str(tmp_path), "instance_path": str(tmp_path / "instance")})


def _folder_with(tmp_path: Path, old: str, new: str, name: str = "deterioration.yaml") -> Path:
    """The shipped mappings, with ``old`` replaced by ``new`` (once) in ``name``."""
    folder = tmp_path / "mappings"
    shutil.copytree(REPO / "mappings", folder)
    text = (folder / name).read_text()
    assert old in text
    (folder / name).write_text(text.replace(old, new, 1))
    return folder


def test_the_shipped_cards_record_the_units_their_models_were_trained_on():
    """Each card's units are those of the mapping file it names by digest; the shipped mappings keep them."""
    for model_id in ("deterioration", "triage"):
        card = load_model(MODELS / model_id).card
        mapping = load_mapping(REPO / "mappings" / f"{model_id}.yaml")
        assert card["mapping"]["units"] == mapping.feature_units, model_id
    assert check_mappings(REPO / "mappings", MODELS)[1] == {}


@pytest.mark.parametrize("old, new, where, says", [
    # the walkthrough's case: another kind of quantity, every heart rate dropped at scoring
    ("unit: /min", "unit: kg", "inputs.heart_rate.unit", "'kg' measures mass, not rate"),
    # the same kind on another scale is worse: nothing is dropped, the model reads other numbers
    ("unit: mg/dL\n    plausible:\n    - 10\n", "unit: mmol/L\n    plausible:\n    - 10\n",
     "inputs.glucose.unit", "on another scale"),        # convertible by its molar mass, still not the same
    ("unit: Cel", "unit: '[degF]'", "inputs.temperature.unit", "on another scale"),
])
def test_an_input_unit_other_than_the_trained_one_is_refused(tmp_path, old, new, where, says):
    folder = _folder_with(tmp_path, old, new)
    path = folder / "deterioration.yaml"
    _, problems = check_mappings(folder, MODELS)
    assert list(problems) == [f"{path}: {where}"], problems
    message = problems[f"{path}: {where}"][0]
    assert "model deterioration" in message and "was trained on this input in" in message and says in message
    with pytest.raises(MappingMismatch) as info:         # start-up: the same problem, file and field
        ModelRegistry.load(MODELS, load_directory(folder))
    assert info.value.problems == problems
    assert isinstance(info.value, ModelError)


def test_another_code_for_the_trained_unit_is_accepted(tmp_path):
    folder = _folder_with(tmp_path, "unit: /min", "unit: '{beats}/min'")
    assert check_mappings(folder, MODELS)[1] == {}


def test_a_card_without_units_is_checked_on_features_only(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS / "deterioration", models / "deterioration")
    card = json.loads((models / "deterioration" / "card.json").read_text())
    del card["mapping"]["units"]
    (models / "deterioration" / "card.json").write_text(json.dumps(card))
    folder = _folder_with(tmp_path, "unit: /min", "unit: kg")
    found, problems = check_mappings(folder, models)
    assert problems == {} and "deterioration" in found


def test_service_refuses_to_start_on_a_unit_the_model_was_not_trained_on(tmp_path):
    from fhir_ai.app import create_app
    folder = _folder_with(tmp_path, "unit: /min", "unit: kg")
    with pytest.raises(MappingError) as info:
        create_app({"mappings_dir": str(folder), "instance_path": str(tmp_path / "instance")})
    assert f"{folder / 'deterioration.yaml'}: inputs.heart_rate.unit: model deterioration" in str(info.value)
