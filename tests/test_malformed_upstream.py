"""Resources that are JSON but not valid FHIR: never a 500, never a silent "no risk".

An Observation whose value or time cannot be read is not used and the RiskAssessment's note names it; a
Patient birthDate or an Encounter period that cannot be read counts as that input missing, and the note
names the resource and element. The bulk (DuckDB) path gives the very same assessments.
"""
from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from fhir_ai.bulk import bulk_assess
from fhir_ai.features import Extractor
from fhir_ai.fhir.sources import _unique
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.pipeline import build_assessments

try:
    from .factories import encounter, fhir_time, observation, patient, searchset, sepsis_observations
    from .test_upstream_faults import (AS_OF, BASE, FHIR_JSON, PATIENT, FakeHospital, app, assess,  # noqa: F401
                                       assessments, hospital, issues, registry, sleeps)
except ImportError:
    from factories import (encounter, fhir_time, observation, patient,  # type: ignore[no-redef]
                           searchset, sepsis_observations)
    from test_upstream_faults import (AS_OF, BASE, FHIR_JSON, PATIENT, FakeHospital, app,  # type: ignore[no-redef]  # noqa: F401
                                      assess, assessments, hospital, issues, registry, sleeps)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def notes(resource: dict[str, Any]) -> str:
    return " ".join(n["text"] for n in resource.get("note", ()))


def heart_rate(oid: str, **changes: Any) -> dict[str, Any]:
    """A heart rate 10 minutes before AS_OF, with ``changes`` applied (None removes an element)."""
    resource = observation(PATIENT, "8867-4", 131, "/min", AS_OF - timedelta(minutes=10), id=oid)
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


def serve_observations(hospital: FakeHospital, *extra: dict[str, Any]) -> None:
    """The next Observation search answers the patient's good Observations plus ``extra`` as they are
    (the fake's own search would trip over malformed code or subject elements)."""
    good = [r for r in hospital.resources["Observation"].values()]
    body = json.dumps(searchset([*good, *extra], BASE, total=len(good) + len(extra)))
    hospital.fail("Observation", (200, {"Content-Type": FHIR_JSON}, body))


def assessed(client: FlaskClient) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    response = assess(client)
    assert response.status_code == 200, response.get_data(as_text=True)
    model, news2 = assessments(response)
    assert model["resourceType"] == "RiskAssessment" and model["status"] == "final"
    return model, news2, issues(response)


# -- the walkthrough's repros ---------------------------------------------------------------------

def test_string_quantity_value_is_named_in_the_note_and_not_used(client: FlaskClient,
                                                                  hospital: FakeHospital) -> None:
    hospital.add(heart_rate("obs-high", valueQuantity={"value": "high", "unit": "/min", "system": UCUM,
                                                       "code": "/min"}))
    model, news2, warnings = assessed(client)
    text = notes(model)
    assert "Observation/obs-high (heart_rate): valueQuantity.value is not a number" in text
    assert "high" not in text.replace("obs-high", "")            # the value itself is never shown
    assert "Observation/obs-high" not in {b["reference"] for b in model["basis"]}
    assert "Observation/obs-high" not in {b["reference"] for b in news2.get("basis", ())}
    assert any(i["code"] == "value" and "not used" in i["diagnostics"] for i in warnings)


def test_unreadable_birth_date_is_a_missing_age_named_in_the_note(client: FlaskClient,
                                                                   hospital: FakeHospital) -> None:
    hospital.add(patient(id=PATIENT, birthDate="nineteen fifty"))
    model, _, warnings = assessed(client)
    text = notes(model)
    assert "Patient/pat-1 (age): birthDate is not a FHIR date" in text
    assert "nineteen" not in text
    assert "Age (years)" in text.split("Missing inputs", 1)[1].split(".", 1)[0]
    assert any(i["code"] == "value" for i in warnings)


def test_unreadable_encounter_start_is_a_missing_encounter_named_in_the_note(client: FlaskClient,
                                                                             hospital: FakeHospital) -> None:
    hospital.add(encounter(PATIENT, id="enc-1", period={"start": "soon"}))
    model, _, _ = assessed(client)
    text = notes(model)
    assert "Encounter/enc-1 (encounter): period.start is not a FHIR dateTime; the encounter is not used" in text
    assert "soon" not in text
    assert "encounter" not in model                  # an encounter we cannot place in time is not current
    assert "ICU type" in text.split("Missing inputs", 1)[1].split(".", 1)[0]


# -- more of what a server can send ---------------------------------------------------------------

QUANTITY = {"unit": "/min", "system": UCUM, "code": "/min"}


@pytest.mark.parametrize("changes, reason", [
    ({"valueQuantity": {**QUANTITY, "value": True}}, "valueQuantity.value is not a number"),
    ({"valueQuantity": {**QUANTITY, "value": [131]}}, "valueQuantity.value is not a number"),
    ({"valueQuantity": {**QUANTITY, "value": {"v": 131}}}, "valueQuantity.value is not a number"),
    ({"valueQuantity": {**QUANTITY, "value": "131"}}, "valueQuantity.value is not a number"),
    ({"valueQuantity": "131 /min"}, "valueQuantity is not a valid Quantity"),
    ({"valueQuantity": [131]}, "valueQuantity is not a valid Quantity"),
    ({"valueQuantity": None, "valueInteger": "131"}, "valueInteger is not an integer"),
    ({"valueQuantity": None, "valueInteger": 13.5}, "valueInteger is not an integer"),
    # a value of another type than the input reads: named, not taken for no value at all
    ({"valueQuantity": None, "valueBoolean": True}, "valueBoolean given where valueQuantity is read"),
    ({"valueQuantity": None, "valueCodeableConcept": {"text": "fast"}},
     "valueCodeableConcept given where valueQuantity is read"),
    ({"effectiveDateTime": "soon"}, "unreadable effective time"),
    ({"effectiveDateTime": 20261120}, "unreadable effective time"),
    ({"effectiveDateTime": {"start": "2026-11-20"}}, "unreadable effective time"),
    ({"effectiveDateTime": None, "effectivePeriod": "yesterday"}, "unreadable effective time"),
    ({"effectiveDateTime": "2026-13-01T00:00:00Z"}, "unreadable effective time"),
    # unit, system or code that are not strings (the bulk path once read them as the text '5', 'true')
    ({"valueQuantity": {**QUANTITY, "value": 131, "unit": 5}}, "valueQuantity is not a valid Quantity"),
    ({"valueQuantity": {**QUANTITY, "value": 131, "system": True}}, "valueQuantity is not a valid Quantity"),
    # an effective[x] that is there but unreadable does not fall back on issued (another time)
    ({"effectiveDateTime": False, "issued": fhir_time(AS_OF - timedelta(minutes=10))}, "unreadable effective time"),
    ({"effectiveDateTime": 0, "issued": fhir_time(AS_OF - timedelta(minutes=10))}, "unreadable effective time"),
    ({"effectiveDateTime": None, "effectivePeriod": {"end": False, "start": fhir_time(AS_OF - timedelta(hours=1))},
      "issued": fhir_time(AS_OF - timedelta(minutes=10))}, "unreadable effective time"),
])
def test_unreadable_observation_is_named_in_the_note(client: FlaskClient, hospital: FakeHospital,
                                                     changes: dict[str, Any], reason: str) -> None:
    serve_observations(hospital, heart_rate("obs-bad", **changes))
    model, _, _ = assessed(client)
    assert f"Observation/obs-bad (heart_rate): {reason}" in notes(model)
    assert "Observation/obs-bad" not in {b["reference"] for b in model["basis"]}


@pytest.mark.parametrize("changes", [
    {"code": None},
    {"code": "heart rate"},
    {"code": {"coding": {"system": LOINC, "code": "8867-4"}}},
    {"code": {"coding": ["8867-4"]}},
    {"subject": "Patient/pat-1"},
    {"subject": {"reference": 5}},
    {"subject": {"reference": {"reference": "Patient/pat-1"}}},
    {"status": ["final"]},
])
def test_observation_that_names_no_patient_or_code_is_left_out(client: FlaskClient, hospital: FakeHospital,
                                                               changes: dict[str, Any]) -> None:
    """Without a readable code or subject nothing says what was measured, or of whom: like an
    Observation of a code no model reads, it is not used (and cannot be attributed to this patient)."""
    serve_observations(hospital, heart_rate("obs-odd", **changes))
    model, _, _ = assessed(client)
    assert "Observation/obs-odd" not in {b["reference"] for b in model["basis"]}


@pytest.mark.parametrize("rid", [{"x": 1}, ["obs-odd"], 123, True])
def test_observation_whose_id_is_no_string_is_left_out(client: FlaskClient, hospital: FakeHospital, rid: Any) -> None:
    """An id that is an object or list once made $assess answer 500 (unhashable in the source's de-duplication);
    a number was used and printed. Such an Observation cannot be named: it is left out, never printed."""
    serve_observations(hospital, heart_rate("obs-odd", id=rid),            # would be used
                       heart_rate("obs-odd", id=rid, valueQuantity={**QUANTITY, "value": "high"}))  # would be named
    model, _, _ = assessed(client)
    text = notes(model) + json.dumps(model["basis"])
    for piece in ("obs-odd", "'x'", '{"x"', "Observation/123", "Observation/True", "Observation/[", "Observation/{"):
        assert piece not in text, piece


@pytest.mark.parametrize("rid", [["enc-odd"], {"id": "enc-odd"}, 5])
def test_encounter_whose_id_is_no_string_is_left_out(client: FlaskClient, hospital: FakeHospital, rid: Any) -> None:
    """An Encounter with such an id (the current one, were it used): 200, not used, its id never printed."""
    good = list(hospital.resources["Encounter"].values())
    odd = encounter(PATIENT, id="placeholder", period={"start": fhir_time(AS_OF - timedelta(hours=2))})
    odd["id"] = rid
    hospital.fail("Encounter", (200, {"Content-Type": FHIR_JSON},
                                json.dumps(searchset([*good, odd], BASE, total=len(good) + 1))))
    model, _, _ = assessed(client)
    assert model["encounter"] == {"reference": "Encounter/enc-1"}
    assert "enc-odd" not in json.dumps(model)


@pytest.mark.parametrize("component", [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}}, ["8480-6"]])
def test_component_that_cannot_be_read_is_ignored(client: FlaskClient, hospital: FakeHospital, component: Any) -> None:
    """A component list that is not one (or holds no objects) names no code we can read: ignored; the
    Observation's own code and value are valid FHIR and are used."""
    serve_observations(hospital, heart_rate("obs-odd", component=component))
    model, _, _ = assessed(client)
    assert "Observation/obs-odd" in {b["reference"] for b in model["basis"]}


@pytest.mark.parametrize("changes", [
    {"birthDate": 1950}, {"birthDate": "1950-02-30"}, {"birthDate": ["1950"]}, {"gender": ["male"]},
    {"birthDate": "0000"},
])
def test_unreadable_patient_elements(client: FlaskClient, hospital: FakeHospital, changes: dict[str, Any]) -> None:
    hospital.add(patient(id=PATIENT, **changes))
    model, _, _ = assessed(client)
    element = next(iter(changes))
    assert f"Patient/pat-1 ({'age' if element == 'birthDate' else 'sex_male'}): {element} is not" in notes(model)


@pytest.mark.parametrize("changes, expected", [
    ({"period": "yesterday"}, "(encounter): period is not a Period; the encounter is not used"),
    ({"period": {"start": 20261119}}, "(encounter): period.start is not a FHIR dateTime; the encounter is not used"),
    ({"period": {"start": fhir_time(AS_OF - timedelta(days=1)), "end": "later"}},
     "(encounter): period.end is not a FHIR dateTime; the encounter is not used"),
    ({"serviceType": "ICU"}, "(icu_type): serviceType is not a CodeableConcept"),
    ({"status": ["in-progress"]}, "(encounter): status is not a code; the encounter is not used"),
])
def test_unreadable_encounter_elements(client: FlaskClient, hospital: FakeHospital, changes: dict[str, Any],
                                       expected: str) -> None:
    changes.setdefault("period", {"start": fhir_time(AS_OF - timedelta(days=1))})
    hospital.add(encounter(PATIENT, id="enc-1", **changes))
    model, _, _ = assessed(client)
    assert f"Encounter/enc-1 {expected}" in notes(model)


# -- the bulk path gives the same treatment -------------------------------------------------------

def bad_export(folder: Path, shapes: bool) -> list[dict[str, Any]]:
    """Two patients: p-bad has every repro, p-ok is the same without them. ``shapes``: also elements whose
    shape is wrong (DuckDB's typed reader fails on them: the slow way)."""
    resources: list[dict[str, Any]] = []
    for pid in ("p-bad", "p-ok"):
        resources.append(patient(id=pid, birthDate="nineteen fifty" if pid == "p-bad" else "1950-01-01"))
        resources.append(encounter(pid, id=f"{pid}-enc", period={
            "start": "soon" if pid == "p-bad" else fhir_time(AS_OF - timedelta(days=1))}))
        resources.extend(sepsis_observations(pid, f"{pid}-enc", last=AS_OF - timedelta(minutes=15)))
    WHEN = AS_OF - timedelta(minutes=20)         # before each patient's latest data: the as-of time
    odd = [
        observation("p-bad", "8867-4", 0, "/min", WHEN, id="high",
                    valueQuantity={"value": "high", "unit": "/min", "system": UCUM, "code": "/min"}),
        observation("p-bad", "8867-4", 0, "/min", WHEN, id="numstr",
                    valueQuantity={"value": "72", "unit": "/min", "system": UCUM, "code": "/min"}),
        observation("p-bad", "8867-4", 0, "/min", WHEN, id="true",
                    valueQuantity={"value": True, "unit": "/min", "system": UCUM, "code": "/min"}),
        observation("p-bad", "9269-2", 0, "{score}", WHEN, id="gcs-text", valueQuantity=None,
                    valueInteger="fourteen"),
        observation("p-bad", "9269-2", 0, "{score}", WHEN, id="gcs-frac", valueQuantity=None, valueInteger=13.5),
        observation("p-bad", "8867-4", 0, "/min", WHEN, id="hr-coded", valueQuantity=None,
                    valueCodeableConcept={"text": "fast"}),
        observation("p-bad", "9279-1", 20, "/min", "soon", id="rr-soon"),
        observation("p-bad", "9279-1", 20, "/min", WHEN, id="rr-number-time", effectiveDateTime=20261120),
        observation("p-bad", "85354-9", 0, "mm[Hg]", WHEN, id="bp", valueQuantity=None, component=[
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
             "valueQuantity": {"value": "low", "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}]),
        # leaves DuckDB's typed reader once read as text ('5', 'true', '40617009'): no exception, used
        observation("p-bad", "8867-4", 131, "/min", WHEN, id="unit-number",
                    valueQuantity={"value": 131, "unit": 5, "system": UCUM, "code": "/min"}),
        observation("p-bad", "8867-4", 131, "/min", WHEN, id="system-true",
                    valueQuantity={"value": 131, "unit": "/min", "system": True, "code": "/min"}),
        observation("p-bad", "9279-1", 20, "/min", WHEN, id="code-object",
                    valueQuantity={"value": 20, "unit": "/min", "system": UCUM, "code": {"c": "/min"}}),
        {**observation("p-bad", "40617009", 0, "", WHEN, id="vent-number-code", valueQuantity=None,
                       valueBoolean=True),
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": 40617009}]}},
        # an effective[x] that is there but unreadable: not the issued time instead
        observation("p-bad", "9279-1", 20, "/min", WHEN, id="rr-false-time", effectiveDateTime=False,
                    issued=fhir_time(WHEN)),
        observation("p-bad", "9279-1", 20, "/min", WHEN, id="rr-zero-end", effectiveDateTime=None,
                    effectivePeriod={"start": fhir_time(WHEN), "end": 0}, issued=fhir_time(WHEN)),
        # ids that are no strings: left out (never printed, never a 500)
        observation("p-bad", "8867-4", 131, "/min", WHEN, id={"x": "obj-id"}),
        observation("p-bad", "8867-4", 131, "/min", WHEN, id=["list-id"],
                    valueQuantity={"value": "high", "unit": "/min", "system": UCUM, "code": "/min"}),
        observation("p-bad", "8867-4", 131, "/min", WHEN, id=47110815201),
        encounter("p-bad", id=["enc-list-id"], period={"start": fhir_time(AS_OF - timedelta(hours=3))}),
        patient(id={"x": "patient-object-id"}, birthDate="1950-01-01"),
    ]
    if shapes:
        odd += [
            observation("p-bad", "8867-4", 0, "/min", WHEN, id="q-text", valueQuantity="131 /min"),
            observation("p-bad", "8867-4", 0, "/min", WHEN, id="q-unit",
                        valueQuantity={"value": 131, "unit": ["/min"], "system": UCUM, "code": "/min"}),
            {**observation("p-bad", "8867-4", 131, "/min", WHEN, id="code-text"), "code": "heart rate"},
            observation("p-bad", "8867-4", 131, "/min", WHEN, id="subject-text", subject="Patient/p-bad"),
            observation("p-bad", "8867-4", 131, "/min", WHEN, id="period-text", effectiveDateTime=None,
                        effectivePeriod="yesterday"),
            observation("p-bad", "8867-4", 131, "/min", WHEN, id="component-object",
                        component={"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}}),
            observation("p-bad", "85354-9", 0, "mm[Hg]", WHEN, id="bp-odd", valueQuantity=None, component=[
                "8462-4", {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": "low"}]),
        ]
    for resource in odd:
        for key in ("valueQuantity", "effectiveDateTime"):
            if key in resource and resource[key] is None:
                resource.pop(key)
    resources.extend(odd)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("Patient", "Encounter", "Observation"):
        (folder / f"{kind}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources
                                                         if r["resourceType"] == kind))
    return resources


@pytest.mark.parametrize("shapes", [False, True])
def test_bulk_path_gives_the_same_treatment(tmp_path: Path, registry: ModelRegistry,  # noqa: F811
                                            shapes: bool) -> None:
    resources = bad_export(tmp_path / "export", shapes)
    out = tmp_path / "ra.ndjson"
    stats = bulk_assess(tmp_path / "export", out, registry, models=["deterioration"], explain="all", news2=True,
                        progress=False)
    assert stats.patients == 2
    ours = {r["subject"]["reference"] + "|" + r["method"]["coding"][0]["code"]: r
            for r in map(orjson.loads, out.read_bytes().splitlines())}
    model, mapping = registry.get("deterioration")
    extractor = Extractor(mapping)
    # As a source hands them over: fhir.sources leaves out Observations and Encounters whose id is no string.
    extractor.add_all([r for r in copy.deepcopy(resources) if r["resourceType"] == "Patient"]
                      + _unique(r for r in copy.deepcopy(resources) if r["resourceType"] != "Patient"))
    _, built = build_assessments(model, extractor.finish(), explain="all", news2=True)
    expected = {r["subject"]["reference"] + "|" + r["method"]["coding"][0]["code"]: r for rs in built for r in rs}
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key] == expected[key], key
    text = notes(ours["Patient/p-bad|deterioration"])
    for piece in ("Observation/high (heart_rate): valueQuantity.value is not a number",
                  "Observation/numstr (heart_rate): valueQuantity.value is not a number",
                  "Observation/true (heart_rate): valueQuantity.value is not a number",
                  "Observation/gcs-text (gcs): valueInteger is not an integer",
                  "Observation/gcs-frac (gcs): valueInteger is not an integer",
                  "Observation/hr-coded (heart_rate): valueCodeableConcept given where valueQuantity is read",
                  "Observation/rr-soon (resp_rate): unreadable effective time",
                  "Observation/rr-number-time (resp_rate): unreadable effective time",
                  "Observation/bp (systolic_bp): valueQuantity.value is not a number",
                  "Observation/unit-number (heart_rate): valueQuantity is not a valid Quantity",
                  "Observation/system-true (heart_rate): valueQuantity is not a valid Quantity",
                  "Observation/code-object (resp_rate): valueQuantity is not a valid Quantity",
                  "Observation/rr-false-time (resp_rate): unreadable effective time",
                  "Observation/rr-zero-end (resp_rate): unreadable effective time",
                  "Patient/p-bad (age): birthDate is not a FHIR date",
                  "Encounter/p-bad-enc (encounter): period.start is not a FHIR dateTime; the encounter is not used"):
        assert piece in text, piece
    if shapes:
        for piece in ("Observation/q-text (heart_rate): valueQuantity is not a valid Quantity",
                      "Observation/q-unit (heart_rate): valueQuantity is not a valid Quantity",
                      "Observation/period-text (heart_rate): unreadable effective time",
                      "Observation/bp-odd (systolic_bp): valueQuantity is not a valid Quantity"):
            assert piece in text, piece
        basis = {b["reference"] for b in ours["Patient/p-bad|deterioration"]["basis"]}
        assert "Observation/component-object" in basis       # its own code and value are fine
        assert not {"Observation/code-text", "Observation/subject-text"} & basis
    assert "Values not used" not in notes(ours["Patient/p-ok|deterioration"])
    everything = out.read_text()
    for piece in ("vent-number-code", "obj-id", "list-id", "47110815201", "enc-list-id", "patient-object-id"):
        assert piece not in everything, piece


# -- the folder source -----------------------------------------------------------------------------

def test_folder_source_with_invalid_fhir(settings_overrides: dict[str, Any], tmp_path: Path) -> None:
    """The same repros from a folder source: 200, and the note names each unusable resource."""
    from fhir_ai.app import create_app

    folder = tmp_path / "hospital"
    folder.mkdir()
    enc_start = fhir_time(AS_OF - timedelta(days=1))
    resources = [patient(id=PATIENT, birthDate="nineteen fifty"),
                 encounter(PATIENT, id="enc-1", period={"start": enc_start}),
                 encounter(PATIENT, id="enc-2", period={"start": "soon"}),
                 *sepsis_observations(PATIENT, "enc-1", last=AS_OF - timedelta(minutes=15)),
                 heart_rate("obs-high", valueQuantity={"value": "high", "unit": "/min", "system": UCUM,
                                                       "code": "/min"}),
                 heart_rate("obs-no-subject", subject="Patient/pat-1"),
                 heart_rate("obs-no-code", code={"coding": "8867-4"}),
                 heart_rate("obs-period", effectiveDateTime=None, effectivePeriod="yesterday")]
    for kind in ("Patient", "Encounter", "Observation"):
        (folder / f"{kind}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources
                                                         if r["resourceType"] == kind))
    app = create_app({**settings_overrides, "source_url": str(folder)})
    try:
        response = assess(app.test_client())
    finally:
        app.extensions["fhir_ai"].close()
    assert response.status_code == 200, response.get_data(as_text=True)
    model = assessments(response)[0]
    assert model["status"] == "final"
    text = notes(model)
    for piece in ("Observation/obs-high (heart_rate): valueQuantity.value is not a number",
                  "Patient/pat-1 (age): birthDate is not a FHIR date",
                  "Encounter/enc-2 (encounter): period.start is not a FHIR dateTime; the encounter is not used"):
        assert piece in text, piece
    assert model["encounter"] == {"reference": "Encounter/enc-1"}
