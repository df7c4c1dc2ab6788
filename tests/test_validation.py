"""assessment.validate: full fhir.resources validation, with basis, encounter, identifier and notes checked
by shape and elements accepted before left out; it accepts and refuses exactly what the model does."""
from __future__ import annotations

import copy

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from pydantic import ValidationError

from fhir_ai import assessment


def resource(basis: list) -> dict:
    return {"resourceType": "RiskAssessment", "id": "ra-1", "status": "final",
            "subject": {"reference": "Patient/p-1"}, "occurrenceDateTime": "2026-11-20T08:00:00Z",
            "basis": basis, "prediction": [{"probabilityDecimal": 0.25}]}


MANY = [{"reference": f"Observation/o-{n}"} for n in range(300)]


def full_model_accepts(r: dict) -> bool:
    try:
        RiskAssessment.model_validate(r)
        return True
    except ValidationError:
        return False


def our_check_accepts(r: dict) -> bool:
    try:
        assessment.validate(r)
        return True
    except ValueError:          # pydantic's ValidationError is a ValueError
        return False


@pytest.mark.parametrize("basis", [
    MANY,
    MANY[:1],
    [],
    MANY[:5] + [{"reference": "Observation/o-x", "display": "latest pulse"}],       # another shape: model checks
    MANY[:5] + [{"reference": "Observation/ spaced"}],                               # not an id
    MANY[:5] + [{"reference": 42}],                                                  # not a string
    MANY[:5] + [{"reference": ""}],                                                  # empty string
    MANY[:5] + [{"reference": "Observation/o-1", "bogus": True}],                    # unknown element
    MANY[:5] + [{"referenze": "Observation/o-1"}],                                   # misspelt element
    MANY[:5] + ["Observation/o-1"],                                                  # not an object
    MANY[:5] + [{"reference": "Observation/o-1 "}],                                  # trailing space
    [{"reference": 42}] + MANY[:5],                                                  # the first one bad
])
def test_the_shortcut_accepts_exactly_what_full_validation_accepts(basis: list) -> None:
    r = resource(copy.deepcopy(basis))
    assert our_check_accepts(r) == full_model_accepts(r)


def test_bad_entries_anywhere_in_a_long_basis_are_refused() -> None:
    for bad in ({"reference": 42}, {"reference": "Observation/o-1", "bogus": True}, {"referenze": "x"}):
        r = resource(MANY[:150] + [bad] + MANY[150:])
        with pytest.raises(ValueError):
            assessment.validate(r)
    assert assessment.validate(resource(MANY))["basis"] == MANY     # the resource itself is unchanged


# -- elements accepted before are not validated again (by exact value, in the same place) ---------------

class Text(str):
    pass


def complete() -> dict:
    """A RiskAssessment with every repeating element this module writes (and notes)."""
    coding = {"system": "http://terminology.hl7.org/CodeSystem/risk-probability", "code": "high", "display": "High"}
    return {"resourceType": "RiskAssessment", "id": "ra-2",
            "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                                   "code": "AIAST"}]},
            "identifier": [{"system": "https://fhir-ai.invalid/identifier/risk-assessment", "value": "k-1"}],
            "status": "final",
            "method": {"coding": [{"system": "https://fhir-ai.invalid/CodeSystem/model", "code": "m", "version": "1"}],
                       "text": "model m, version 1"},
            "subject": {"reference": "Patient/p-1"},
            "performer": {"identifier": {"system": "https://fhir-ai.invalid/CodeSystem/model-version",
                                         "value": "m|1"}, "display": "fhir_ai m 1"},
            "encounter": {"reference": "Encounter/e-1"},
            "occurrenceDateTime": "2026-11-20T08:00:00Z",
            "basis": copy.deepcopy(MANY[:40]),
            "prediction": [{"outcome": {"text": "Death"}, "probabilityDecimal": 0.25,
                            "qualitativeRisk": {"coding": [coding]}, "whenPeriod": {"start": "2026-11-20T08:00:00Z"},
                            "rationale": "because",
                            "extension": [{"url": "https://fhir-ai.invalid/StructureDefinition/score",
                                           "valueInteger": 5}]}],
            "note": [{"text": "Time frame: until discharge."}, {"text": "Missing inputs: lactate."}]}


def changed(path: tuple, value: object) -> dict:
    r = complete()
    *parents, last = path
    target = r
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return r


DELETE = object()
VARIANTS = [
    ((), None),                                                                     # the complete resource
    (("method", "coding", 0, "code"), 5),                                          # int for a code
    (("method", "coding", 0, "code"), Text("m")),                                  # a str subclass
    (("method", "bogus"), "x"),                                                    # unknown element
    (("method",), [complete()["method"]]),                                         # a list for one element
    (("meta", "security", 0), None),                                               # null in a list
    (("meta",), {"security": []}),
    (("note", 1), None),
    (("note", 1), {"text": ""}),
    (("note", 1), {"text": "x", "bogus": 1}),
    (("note",), []),
    (("note",), {"text": "Time frame: until discharge."}),                         # one element for a list
    (("note",), [{"text": "Time frame: until discharge."}]),
    (("performer",), complete()["meta"]),                                          # valid elsewhere, not here
    (("encounter",), [{"reference": "Encounter/e-1"}]),
    (("encounter",), {"reference": "Encounter/e 1"}),
    (("encounter",), {"reference": "Encounter/e-1\nEncounter/e-2"}),
    (("encounter",), {"reference": "Encounter/e-2"}),
    (("encounter",), {"reference": "Encounter/e-2", "display": "visit"}),
    (("basis",), {"reference": "Observation/o-1"}),                                # one element for a list
    (("basis",), [{"reference": "Observation/o-1\nObservation/o-2"}] + MANY[:3]),
    (("basis",), MANY[:3] + [{"reference": "Observation/o-1\nObservation/o-2"}]),
    (("basis",), [{"reference": "Observation/o-9"}]),
    (("basis",), []),
    (("prediction", 0, "outcome"), {"coding": [{"code": 5}]}),
    (("prediction", 0, "outcome"), '{"text": "Death"}'),                           # JSON text: fhir.resources parses it
    (("prediction", 0, "extension", 0, "valueInteger"), True),
    (("prediction", 0, "extension", 0, "valueInteger"), "5"),
    (("prediction", 0, "extension", 0, "valueInteger"), 2 ** 40),
    (("prediction", 0, "extension", 0, "valueInteger"), 6),
    (("prediction", 0, "probabilityRange"), {"low": {"value": 0.1}}),              # a second choice of probability[x]
    (("prediction", 0, "whenPeriod"), DELETE),
    (("prediction", 0), None),
    (("prediction", 0), {"outcome": {"text": "Death"}, "qualitativeRisk": complete()["prediction"][0]["qualitativeRisk"]}),
    (("prediction",), [{"outcome": {"text": "Death"}}, {"outcome": {"text": "Death"}, "bogus": 1}]),
    (("subject",), DELETE),                                                        # required
    (("status",), DELETE),                                                         # required
    (("code",), {"text": "KTAS"}),
    (("code",), {"text": 5}),
    (("identifier",), {"system": "https://fhir-ai.invalid/identifier/risk-assessment", "value": "k-1"}),
    (("identifier",), [None]),
    (("identifier",), []),
    (("identifier", 0, "value"), "k 1"),
    (("identifier", 0, "value"), ""),
    (("identifier", 0, "value"), 5),
    (("identifier", 0, "value"), "\ud800"),
    (("identifier", 0, "value"), Text("k-1")),
    (("identifier", 0, "system"), "a b"),
    (("identifier", 0, "system"), DELETE),
    (("identifier", 0, "use"), "official"),
    (("identifier", 0, "use"), "no-such-use"),
    (("identifier", 0, "bogus"), 1),
    (("note", 0, "text"), " leading space"),
    (("note", 0, "text"), "two\nlines"),
    (("note", 0, "text"), "\ud800"),
    (("note", 0, "text"), "한국어 메모 — 위험을 높임"),
    (("note", 0, "authorString"), "me"),
    (("note", 0, "time"), "not a time"),
    (("note", 0, "text"), DELETE),
]


@pytest.fixture
def nothing_accepted_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assessment, "_ACCEPTED", {})


@pytest.mark.usefixtures("nothing_accepted_yet")
@pytest.mark.parametrize("path, value", VARIANTS)
def test_what_was_accepted_before_decides_nothing(path: tuple, value: object) -> None:
    variant = changed(path, value) if path else complete()
    expected = full_model_accepts(copy.deepcopy(variant))
    untouched = copy.deepcopy(variant)
    assert our_check_accepts(variant) == expected                 # nothing accepted yet
    assert our_check_accepts(complete())                          # every repeating element accepted once
    assert our_check_accepts(variant) == expected                 # now left out where it was accepted
    assert our_check_accepts(variant) == expected
    assert our_check_accepts(complete())
    assert variant == untouched                                   # never changed


@pytest.mark.usefixtures("nothing_accepted_yet")
def test_remembered_only_after_the_whole_resource_was_accepted() -> None:
    bad = changed(("subject",), DELETE)
    bad["method"]["coding"][0]["code"] = 5                        # refused with the resource, never remembered
    assert not our_check_accepts(bad)
    assert assessment._ACCEPTED == {}
    assert our_check_accepts(complete()) and assessment._ACCEPTED
    worse = changed(("method", "coding", 0, "code"), 5)
    assert not our_check_accepts(worse)


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assessment, "_ACCEPTED", {})
    monkeypatch.setattr(assessment, "_ACCEPTED_MAX", 10)
    for n in range(30):
        r = complete()
        r["method"]["text"] = f"model m, version {n}"
        assert our_check_accepts(r)
        assert len(assessment._ACCEPTED) <= 10 + 8


def test_the_elements_left_out_are_optional_and_no_choice() -> None:
    from fhir.resources.R4B.riskassessment import RiskAssessmentPrediction
    models = {"RiskAssessment": RiskAssessment, "prediction": RiskAssessmentPrediction}
    for where, (singles, lists) in assessment._REPEATING.items():
        fields = models[where].model_fields
        for name in singles + lists:
            info = fields[name]
            assert not info.is_required() and "one_of_many" not in (info.json_schema_extra or {}), name
            assert (name in lists) == (getattr(info.annotation, "__origin__", None) is list
                                       or "List" in str(info.annotation)), name
    for (where, name), (many, _) in assessment._SHAPES.items():
        info = models[where].model_fields[name]
        assert not info.is_required() and "one_of_many" not in (info.json_schema_extra or {})
        assert many == ("List" in str(info.annotation) or "list" in str(info.annotation))
