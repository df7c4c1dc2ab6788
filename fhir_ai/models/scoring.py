"""Score a FeatureSet with a loaded model: probabilities, risk categories, reasons, NEWS2."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from ..assessment import NOT_APPLICABLE, Scored, fingerprint_row
from ..features import FeatureSet
from ..mapping import Mapping
from .explain import top_reasons
from .news2 import News2Result, alert_from_gcs, news2
from .registry import LoadedModel

EXPLAIN_MODES = ("all", "elevated", "none")


def insufficient_reason(fs: FeatureSet, row: int) -> str:
    """Why a row is not assessed, starting with what kind of reason it is (the notes say 'Not assessed: …')."""
    mapping = fs.mapping
    if not fs.applicable()[row]:
        encounter = fs.encounter_ids[row]
        found = fs.encounter_classes[row]
        return (f"{NOT_APPLICABLE}. The {mapping.model} model is for encounters of class "
                f"{', '.join(mapping.encounter_classes)}; "
                + (f"the current encounter (Encounter/{encounter}) is of class {found or 'none given'}."
                   if encounter else "the patient has no current encounter with a start time."))
    have = [name for name in mapping.core_inputs if fs.present[row, mapping.inputs[name].index]]
    labels = [mapping.inputs[name].label for name in mapping.core_inputs]
    return (f"insufficient data. Found {len(have)} of the core inputs ({', '.join(labels)}) in the time window; "
            f"at least {mapping.min_core_inputs} are needed.")


def score_binary(model: LoadedModel, fs: FeatureSet, *, explain: str = "all", k: int = 5) -> list[Scored]:
    """One Scored per patient row; explanations for everyone, only moderate/high ('elevated'), or none."""
    n = len(fs.patient_ids)
    sufficient = fs.sufficient()
    probability = np.full(n, np.nan)
    risk = np.full(n, None, dtype=object)
    rows = np.flatnonzero(sufficient)
    if len(rows):
        probability[rows] = model.probability(fs.X[rows])
        risk[rows] = model.risk_category(probability[rows])
    wanted = rows if explain == "all" else rows[risk[rows] != "low"] if explain == "elevated" else rows[:0]
    contributions = model.contributions(fs.X[wanted]) if len(wanted) else None
    reasons = {int(r): top_reasons(fs.mapping, fs.X[r], contributions[j], k) for j, r in enumerate(wanted)}
    out = []
    for row in range(n):
        as_of = fs.as_of[row]
        out.append(Scored(
            patient_id=fs.patient_ids[row], encounter_id=fs.encounter_ids[row],
            as_of=None if np.isnan(as_of) else datetime.fromtimestamp(as_of, timezone.utc),
            model_id=model.model_id, model_version=model.version, basis=fs.basis[row],
            missing=[fs.mapping.inputs[name].label for name in fs.missing_inputs(row)],
            dropped=[d.as_text() for d in fs.dropped[row]], sufficient=bool(sufficient[row]),
            insufficient_reason="" if sufficient[row] else insufficient_reason(fs, row),
            probability=None if np.isnan(probability[row]) else float(probability[row]),
            risk=risk[row], reasons=reasons.get(row, []), fingerprint=fingerprint_row(fs.X, row)))
    return out


def news2_scores(fs: FeatureSet) -> News2Result | None:
    """NEWS2 from the mapping's news2 inputs (latest value in the NEWS2 window).

    No FiO2 in the window is read as room air: wards chart oxygen when it is given, and ICU data
    records FiO2 for ventilated patients only.
    """
    mapping: Mapping = fs.mapping
    if not mapping.news2:
        return None
    get = fs.news2_inputs.get
    n = len(fs.patient_ids)
    nan = np.full(n, np.nan)
    fio2 = get("fio2", nan)
    on_oxygen = (fio2 > 0.21 + 1e-9).astype(float)      # NaN compares False: room air
    if "gcs" in fs.news2_inputs:
        alert = alert_from_gcs(np.clip(fs.news2_inputs["gcs"], 3, 15))
    else:
        alert = get("avpu", nan)
    return news2(get("resp_rate", nan), get("spo2", nan), on_oxygen, get("systolic_bp", nan),
                 get("pulse", nan), alert, get("temperature", nan))


@dataclass
class TriageScored(Scored):
    """A triage result: per-level probabilities, the decision, and the second-reader comparison."""
    probabilities: list[float] = field(default_factory=list)      # urgency-weighted, sum 1 (decision basis)
    class_probabilities: list[float] = field(default_factory=list)  # the model's own class probabilities
    level: int | None = None
    nurse_level: int | None = None
    p_under: float | None = None
    p_over: float | None = None
    flagged: bool = False
    flag_threshold: float | None = None


def score_triage(model: LoadedModel, fs: FeatureSet, *, explain: str = "all", k: int = 5) -> list[TriageScored]:
    """KTAS level per patient; the nurse's level (if recorded) is compared, never replaced."""
    from .train_triage import decide, mistriage_probabilities, urgency_weights
    n = len(fs.patient_ids)
    sufficient = fs.sufficient()
    rows = np.flatnonzero(sufficient)
    beta = float(model.card["decision"]["beta"])
    threshold = float(model.card["second_reader"]["flag_threshold"])
    probs = np.full((n, 5), np.nan)
    if len(rows):
        probs[rows] = model.probability(fs.X[rows])
    weighted = probs * urgency_weights(beta)
    weighted = weighted / weighted.sum(axis=1, keepdims=True)
    levels = np.zeros(n, dtype=int)
    if len(rows):
        levels[rows] = decide(probs[rows], beta)
    nurse = fs.reference if fs.reference is not None else np.full(n, np.nan)
    has_nurse = ~np.isnan(nurse)
    p_under = np.full(n, np.nan)
    p_over = np.full(n, np.nan)
    both = rows[has_nurse[rows]]
    if len(both):
        p_under[both], p_over[both] = mistriage_probabilities(probs[both], nurse[both].astype(int))
    wanted = rows if explain != "none" else rows[:0]
    contributions = model.contributions(fs.X[wanted]) if len(wanted) else None
    reasons = {int(r): top_reasons(fs.mapping, fs.X[r], contributions[j, levels[r] - 1], k)
               for j, r in enumerate(wanted)}
    out: list[TriageScored] = []
    for row in range(n):
        as_of = fs.as_of[row]
        ok = bool(sufficient[row])
        out.append(TriageScored(
            patient_id=fs.patient_ids[row], encounter_id=fs.encounter_ids[row],
            as_of=None if np.isnan(as_of) else datetime.fromtimestamp(as_of, timezone.utc),
            model_id=model.model_id, model_version=model.version, basis=fs.basis[row],
            missing=[fs.mapping.inputs[name].label for name in fs.missing_inputs(row)],
            dropped=[d.as_text() for d in fs.dropped[row]], sufficient=ok,
            insufficient_reason="" if ok else insufficient_reason(fs, row),
            reasons=reasons.get(row, []), fingerprint=fingerprint_row(fs.X, row) + nurse[row:row + 1].tobytes(),
            probabilities=weighted[row].tolist() if ok else [], class_probabilities=probs[row].tolist() if ok else [],
            level=int(levels[row]) if ok else None,
            nurse_level=int(nurse[row]) if has_nurse[row] else None,
            p_under=None if np.isnan(p_under[row]) else float(p_under[row]),
            p_over=None if np.isnan(p_over[row]) else float(p_over[row]),
            flagged=bool(p_under[row] >= threshold) if not np.isnan(p_under[row]) else False,
            flag_threshold=threshold))
    return out
