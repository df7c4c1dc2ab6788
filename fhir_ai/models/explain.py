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
            shown = _number(self.value) + (f" {self.unit}" if self.unit and self.unit not in ("1", "{score}") else "")
        if language == "ko":
            return f"{self.label}: {shown} — {direction}"
        return f"{self.label}: {shown} — {direction} the risk"


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
