"""assessment.validate: full fhir.resources validation, with basis references checked by shape."""
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
