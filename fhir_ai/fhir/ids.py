"""FHIR logical ids (https://hl7.org/fhir/R4/datatypes.html#id) as fhir_ai accepts them in a URL it answers or sends."""
from __future__ import annotations

import re
from typing import Any

ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def usable_id(value: Any) -> bool:
    """A FHIR id that can stand in a URL path: '.' and '..' match the pattern but are path segments
    ([base]/Group/.. is the server base once a client normalises it)."""
    return isinstance(value, str) and ID.fullmatch(value) is not None and value.strip(".") != ""
