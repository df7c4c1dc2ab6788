"""Turn LightGBM contributions into plain-word reasons a clinician can check."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..mapping import Mapping


@dataclass(frozen=True)
class Reason:
    feature: str
    label: str
    value: float | None
    unit: str | None
    contribution: float      # log-odds; > 0 raises the risk

    def text(self, language: str = "en") -> str:
        direction = ("raised" if self.contribution > 0 else "lowered")
        if language == "ko":
            direction = "위험을 높임" if self.contribution > 0 else "위험을 낮춤"
        if self.value is None:
            shown = "not measured" if language == "en" else "측정 안 됨"
        else:
            unit = unit_display(self.unit)
            shown = _number(self.value) + (f" {unit}" if unit else "")
        if language == "ko":
            return f"{self.label}: {shown} — {direction}"
        return f"{self.label}: {shown} — {direction} the risk"


# How a clinician writes the UCUM units the mappings use (a reason shows "31 mmHg", not "31 mm[Hg]").
_UNIT_DISPLAY = {"mm[Hg]": "mmHg", "Cel": "°C", "[degF]": "°F", "10*3/uL": "×10³/µL", "10*9/L": "×10⁹/L",
                 "ug/L": "µg/L", "umol/L": "µmol/L", "meq/L": "mEq/L", "[pH]": "", "1": "", "{score}": ""}


def unit_display(unit: str | None) -> str:
    """A UCUM code as a clinician writes it ('' for dimensionless); other codes as they are."""
    if not unit:
        return ""
    shown = _UNIT_DISPLAY.get(unit, unit)
    if shown.endswith("/h") and shown[:-2] in _UNIT_DISPLAY:        # a slope's unit per hour
        shown = _UNIT_DISPLAY[shown[:-2]] + "/h"
    return shown


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def top_reasons(mapping: Mapping, x: np.ndarray, contributions: np.ndarray, k: int = 5,
                language: str = "en") -> list[Reason]:
    """The k features that moved this prediction most (by |contribution|), largest first."""
    contributions = np.asarray(contributions)[: len(mapping.features)]   # drop the bias term
    order = np.argsort(-np.abs(contributions), kind="stable")
    reasons = []
    for col in order[:k]:
        c = float(contributions[col])
        if c == 0.0:
            break
        feature = mapping.features[col]
        spec = mapping.inputs[feature.input]
        value = float(x[col])
        label = feature.label
        if language == "ko" and spec.label_ko:
            label = label.replace(spec.label, spec.label_ko)
        unit = spec.unit if feature.aggregate not in ("count", "any", "slope") else None
        if feature.aggregate == "slope" and spec.unit:
            unit = f"{spec.unit}/h"
        reasons.append(Reason(feature.name, label, None if math.isnan(value) else value, unit, c))
    return reasons
