"""UCUM unit conversion for the units hospitals actually send (linear scale + offset, a small table)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

UCUM_SYSTEM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class Unit:
    dimension: str
    factor: float          # value_in_base = value * factor + offset
    offset: float = 0.0


# Base units: Cel, mm[Hg], 1, g/L, mol/L, /min, mL, cm, kg, U/L, h, {score}.
# "eq" is treated as mol (monovalent ions: Na+, K+, HCO3-, Cl-), which is what labs mean by mEq/L.
_UNITS: dict[str, Unit] = {
    "Cel": Unit("temperature", 1.0),
    "[degF]": Unit("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": Unit("temperature", 1.0, -273.15),
    "mm[Hg]": Unit("pressure", 1.0),
    "kPa": Unit("pressure", 7.500615758),
    "Pa": Unit("pressure", 0.007500615758),
    "cm[H2O]": Unit("pressure", 0.735559),
    "1": Unit("fraction", 1.0),
    "%": Unit("fraction", 0.01),
    "g/L": Unit("mass-concentration", 1.0),
    "g/dL": Unit("mass-concentration", 10.0),
    "mg/dL": Unit("mass-concentration", 0.01),
    "mg/L": Unit("mass-concentration", 0.001),
    "ug/L": Unit("mass-concentration", 1e-6),
    "ng/mL": Unit("mass-concentration", 1e-6),
    "ug/mL": Unit("mass-concentration", 1e-3),
    "ng/L": Unit("mass-concentration", 1e-9),
    "pg/mL": Unit("mass-concentration", 1e-9),
    "mol/L": Unit("substance-concentration", 1.0),
    "mmol/L": Unit("substance-concentration", 1e-3),
    "umol/L": Unit("substance-concentration", 1e-6),
    "nmol/L": Unit("substance-concentration", 1e-9),
    "meq/L": Unit("substance-concentration", 1e-3),
    "mEq/L": Unit("substance-concentration", 1e-3),
    "/min": Unit("rate", 1.0),
    "{beats}/min": Unit("rate", 1.0),
    "{breaths}/min": Unit("rate", 1.0),
    "/h": Unit("rate", 1.0 / 60.0),
    "/s": Unit("rate", 60.0),
    "mL": Unit("volume", 1.0),
    "L": Unit("volume", 1000.0),
    "dL": Unit("volume", 100.0),
    "cm": Unit("length", 1.0),
    "m": Unit("length", 100.0),
    "mm": Unit("length", 0.1),
    "[in_i]": Unit("length", 2.54),
    "kg": Unit("mass", 1.0),
    "g": Unit("mass", 0.001),
    "[lb_av]": Unit("mass", 0.45359237),
    "U/L": Unit("enzyme-activity", 1.0),
    "[IU]/L": Unit("enzyme-activity", 1.0),
    "kU/L": Unit("enzyme-activity", 1000.0),
    "10*3/uL": Unit("number-concentration", 1.0),
    "10*9/L": Unit("number-concentration", 1.0),
    "/nL": Unit("number-concentration", 1.0),
    "10*3/mm3": Unit("number-concentration", 1.0),
    "/uL": Unit("number-concentration", 1e-3),
    "10*6/uL": Unit("number-concentration", 1000.0),
    "10*12/L": Unit("number-concentration", 1000.0),
    "[pH]": Unit("pH", 1.0),
    "{score}": Unit("score", 1.0),
    "{#}": Unit("score", 1.0),
    "a": Unit("time", 8766.0),
    "d": Unit("time", 24.0),
    "h": Unit("time", 1.0),
    "min": Unit("time", 1.0 / 60.0),
}

# What people write instead of UCUM codes (Quantity.unit text, or a code from another system).
ALIASES: dict[str, str] = {
    "mmHg": "mm[Hg]", "mm Hg": "mm[Hg]", "degC": "Cel", "°C": "Cel", "C": "Cel", "celsius": "Cel",
    "degF": "[degF]", "°F": "[degF]", "F": "[degF]", "fahrenheit": "[degF]",
    "bpm": "/min", "beats/min": "/min", "breaths/min": "/min", "/minute": "/min", "per min": "/min",
    "IU/L": "U/L", "iu/L": "U/L", "u/L": "U/L", "mEq/l": "mEq/L", "mmol/l": "mmol/L",
    "umol/l": "umol/L", "µmol/L": "umol/L", "μmol/L": "umol/L", "mg/dl": "mg/dL", "g/dl": "g/dL",
    "ml": "mL", "lb": "[lb_av]", "lbs": "[lb_av]", "in": "[in_i]", "kpa": "kPa",
    "cells/nL": "/nL", "K/uL": "10*3/uL", "x10^3/uL": "10*3/uL", "x10^9/L": "10*9/L",
    "fraction": "1", "ratio": "1", "percent": "%", "score": "{score}", "points": "{score}",
}

MOLAR_DIMENSIONS = {"mass-concentration", "substance-concentration"}


def normalise_unit(code: str | None, text: str | None = None) -> str | None:
    """The UCUM code for a Quantity's ``code`` (or, failing that, its ``unit`` text)."""
    for candidate in (code, text):
        if candidate is None:
            continue
        candidate = candidate.strip()
        if candidate in _UNITS:
            return candidate
        if candidate in ALIASES:
            return ALIASES[candidate]
    return None


def is_known(code: str) -> bool:
    return normalise_unit(code) is not None


def dimension(code: str | None) -> str | None:
    """What a unit measures ('rate', 'mass', ...), None for a unit not in the table."""
    unit = _UNITS.get(normalise_unit(code) or "")
    return unit.dimension if unit else None


def same_unit(a: str | None, b: str | None) -> bool:
    """Two codes for one unit ('/min' and '{beats}/min', '10*3/uL' and '10*9/L'): values need no conversion."""
    if a == b:
        return True
    found = conversion(normalise_unit(a) or "", normalise_unit(b) or "")
    return found is not None and abs(found[0] - 1.0) < 1e-12 and abs(found[1]) < 1e-12


@lru_cache(maxsize=4096)
def conversion(source: str, target: str, molar_mass: float | None = None) -> tuple[float, float] | None:
    """(scale, offset) such that ``value_in_target = value * scale + offset``, or None if incommensurable.

    Mass and substance concentrations convert into each other only when the analyte's molar mass
    (g/mol) is given.
    """
    src, dst = _UNITS.get(source), _UNITS.get(target)
    if src is None or dst is None:
        return None
    factor = 1.0
    if src.dimension != dst.dimension:
        if not (molar_mass and {src.dimension, dst.dimension} == MOLAR_DIMENSIONS):
            return None
        # g/L = mol/L * g/mol
        factor = molar_mass if src.dimension == "substance-concentration" else 1.0 / molar_mass
    # base = v * src.factor + src.offset ; target = (base - dst.offset) / dst.factor
    scale = src.factor * factor / dst.factor
    offset = (src.offset * factor - dst.offset) / dst.factor
    return scale, offset
