"""Scores → RiskAssessment resources (plain dicts; validated with fhir.resources.R4B before they leave)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from operator import itemgetter
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from . import codes
from .features import FeatureSet
from .fhir import ids, times
from .models.explain import Reason


NOT_ASSESSED = "Not assessed:"          # how the note of a cancelled assessment begins; the reason follows
NOT_APPLICABLE = "not applicable"       # how a reason begins when the model is not for the visit (models.scoring)


def not_assessed_reason(resource: dict[str, Any]) -> str | None:
    """The reason a cancelled RiskAssessment gives in its note ('not applicable. …', 'insufficient data. …')."""
    for note in resource.get("note") or []:
        text = note.get("text") or ""
        if text.startswith(NOT_ASSESSED):
            return text[len(NOT_ASSESSED):].strip()
    return None


def is_not_applicable(reason: str | None) -> bool:
    """True for a reason (``Scored.insufficient_reason``, ``not_assessed_reason``) saying the model does not
    apply to the patient's visit (mapping ``scoring.encounter_classes``), not that data was too scarce."""
    return (reason or "").startswith(NOT_APPLICABLE)


@dataclass
class Scored:
    """One patient's result for one model, before it becomes FHIR."""
    patient_id: str
    encounter_id: str | None
    as_of: datetime | None
    model_id: str
    model_version: str
    basis: list[str]
    missing: list[str]
    dropped: list[str]
    sufficient: bool
    insufficient_reason: str = ""
    probability: float | None = None
    risk: str | None = None
    reasons: list[Reason] = field(default_factory=list)
    fingerprint: bytes = b""


def assessment_key(*parts: Any) -> str:
    """Deterministic sha256 over the parts that make two assessments the same."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SERIALIZE_NUMPY)).hexdigest()


def fingerprint_row(X: np.ndarray, row: int) -> bytes:
    # Rounded so that unit conversion noise (1e-15) does not make a "new" assessment; NaN stays NaN.
    return np.round(X[row], 9).tobytes()


def resource_id(key: str) -> str:
    return f"fai-{key[:40]}"


def _method(model_id: str, version: str, title: str) -> dict[str, Any]:
    return {"coding": [
        {"system": codes.MODEL_SYSTEM, "code": model_id, "version": version, "display": title},
        {"system": codes.MODEL_VERSION_SYSTEM, "code": f"{model_id}|{version}"},
    ], "text": f"{title}, version {version}"}


def _risk(code: str) -> dict[str, Any]:
    return {"coding": [{"system": codes.RISK_PROBABILITY, "code": code, "display": codes.RISK_DISPLAY[code]}]}


def _base(scored: Scored, key: str, title: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": resource_id(key),
        "meta": {"security": [dict(codes.AI_ASSERTED)]},
        "identifier": [{"system": codes.ASSESSMENT_IDENTIFIER, "value": key}],
        "status": "final",
        "method": _method(scored.model_id, scored.model_version, title),
        "subject": {"reference": f"Patient/{scored.patient_id}"},
        "performer": {"identifier": {"system": codes.MODEL_VERSION_SYSTEM,
                                     "value": f"{scored.model_id}|{scored.model_version}"},
                      "display": f"fhir_ai {title} {scored.model_version}"},
    }
    if scored.encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{scored.encounter_id}"}
    if scored.as_of is not None:
        resource["occurrenceDateTime"] = times.format_datetime(scored.as_of)
    if scored.basis:
        resource["basis"] = [{"reference": ref} for ref in scored.basis]
    return resource


def _notes(scored: Scored, extra: list[str]) -> list[dict[str, str]]:
    notes = list(extra)
    if scored.missing:
        notes.append("Missing inputs (no usable value in the time window): " + ", ".join(scored.missing) + ".")
    if scored.dropped:
        shown = scored.dropped[:20]
        more = f" (and {len(scored.dropped) - 20} more)" if len(scored.dropped) > 20 else ""
        notes.append("Values not used: " + "; ".join(shown) + more + ".")
    return [{"text": text} for text in notes]


@dataclass(frozen=True)
class Outcome:
    """What a binary model predicts, and over which time frame."""
    coding: dict[str, str]
    text: str
    time_frame: str
    title: str


DETERIORATION = Outcome(
    coding={"system": codes.SNOMED, "code": "419099009", "display": "Dead"},
    text="In-hospital death", time_frame="until hospital discharge",
    title="deterioration model (in-hospital mortality)")

PROBABILITY_NOTE = ("probabilityDecimal is a calibrated probability between 0 and 1 (0.25 = 25%), "
                    "not a percentage.")


def binary_assessment(scored: Scored, outcome: Outcome = DETERIORATION) -> dict[str, Any]:
    """The RiskAssessment for a binary model, or an explicit 'insufficient data' one."""
    key = assessment_key(scored.patient_id, scored.encounter_id, scored.model_id, scored.model_version,
                         sorted(scored.basis), scored.fingerprint.hex(), scored.sufficient)
    resource = _base(scored, key, outcome.title)
    if not scored.sufficient:
        # Never a number from nothing, and never a silent "no risk": say that it was not assessed.
        resource["status"] = "cancelled"
        resource["note"] = _notes(scored, [f"{NOT_ASSESSED} {scored.insufficient_reason}"])
        return resource
    assert scored.probability is not None and scored.risk is not None
    prediction: dict[str, Any] = {
        "outcome": {"coding": [dict(outcome.coding)], "text": outcome.text},
        "probabilityDecimal": probability_decimal(scored.probability),
        "qualitativeRisk": _risk(scored.risk),
    }
    if scored.as_of is not None:
        prediction["whenPeriod"] = {"start": times.format_datetime(scored.as_of)}
    if scored.reasons:
        prediction["rationale"] = "Top contributing inputs: " + "; ".join(r.text() for r in scored.reasons) + "."
    resource["prediction"] = [prediction]
    resource["note"] = _notes(scored, [f"Time frame: {outcome.time_frame}. {PROBABILITY_NOTE}"])
    return resource


NEWS2_VERSION = "rcp-2017"
NEWS2_RISK = {"low": "low", "low-medium": "moderate", "medium": "moderate", "high": "high"}
NEWS2_PARAMETERS_TEXT = {
    "respiration_rate": "respiration rate", "spo2": "SpO2", "air_or_oxygen": "air or oxygen",
    "systolic_bp": "systolic blood pressure", "pulse": "pulse", "consciousness": "consciousness",
    "temperature": "temperature"}


def news2_assessment(scored: Scored, basis: list[str], total: float, partial: float, band: str | None,
                     min_band: str | None, response: str | None, subscores: dict[str, float]) -> dict[str, Any]:
    """Companion RiskAssessment for NEWS2 (RCP 2017): the score, its band and clinical response."""
    scored = dataclasses.replace(scored, model_id="news2", model_version=NEWS2_VERSION, basis=basis)
    key = assessment_key(scored.patient_id, scored.encounter_id, "news2", NEWS2_VERSION,
                         sorted(basis), [None if math.isnan(v) else v for v in subscores.values()])
    resource = _base(scored, key, "NEWS2 (Royal College of Physicians 2017)")
    missing = [NEWS2_PARAMETERS_TEXT[p] for p, v in subscores.items() if math.isnan(v)]
    # Sub-scores as points ('respiration rate 2 points'), never to be read as the measured value.
    shown = "; ".join(f"{NEWS2_PARAMETERS_TEXT[p]} {int(v)} point{'' if int(v) == 1 else 's'}"
                      for p, v in subscores.items() if not math.isnan(v))
    measured = [p for p, v in subscores.items() if p != "air_or_oxygen" and not math.isnan(v)]
    if not measured:
        resource["status"] = "cancelled"
        resource["note"] = [{"text": "NEWS2 not scored: none of its seven parameters was recorded in the window."}]
        return resource
    outcome = {"text": "Clinical deterioration (NEWS2 band)"}
    if missing:
        resource["status"] = "preliminary"
        rationale = (f"NEWS2 incomplete: partial score {int(partial)} from {7 - len(missing)} of 7 parameters "
                     f"({shown}); missing: {', '.join(missing)}. The band is at least {min_band}.")
        prediction = {"outcome": outcome, "qualitativeRisk": _risk(NEWS2_RISK[min_band or "low"]),
                      "rationale": rationale,
                      "extension": [{"url": codes.SCORE_EXTENSION, "valueInteger": int(partial)}]}
    else:
        rationale = f"NEWS2 {int(total)} ({band}): {shown}. Clinical response: {response}"
        prediction = {"outcome": outcome, "qualitativeRisk": _risk(NEWS2_RISK[band or "low"]),
                      "rationale": rationale,
                      "extension": [{"url": codes.SCORE_EXTENSION, "valueInteger": int(total)}]}
    resource["prediction"] = [prediction]
    return resource


def _strings(pattern: str) -> re.Pattern[str]:
    """One or more strings matching ``pattern`` (which never matches a newline), joined by newlines."""
    return re.compile(rf"(?:{pattern})(?:\n(?:{pattern}))*")


_ID = ids.ID.pattern
# Optional elements (no choice) as this module writes them, checked by shape: exactly these keys,
# each a str matching a pattern stricter than the model's check of that primitive (Reference.reference
# and Identifier.value are String: a string with some non-whitespace; Identifier.system is Uri: no
# whitespace; Annotation.text is Markdown: any string that pydantic takes, so no lone surrogates).
# (where, element) → (a list of them?, {key: pattern}).
_SHAPES: dict[tuple[str, str], tuple[bool, dict[str, re.Pattern[str]]]] = {
    ("RiskAssessment", "basis"): (True, {"reference": _strings(rf"Observation/{_ID}")}),
    ("RiskAssessment", "encounter"): (False, {"reference": _strings(rf"Encounter/{_ID}")}),
    ("RiskAssessment", "identifier"): (True, {"system": _strings(r"[!-~]{1,1024}"),
                                              "value": _strings(r"[!-~]{1,1024}")}),
    ("RiskAssessment", "note"): (True, {"text": _strings(r"[^\s\ud800-\udfff](?:[^\n\ud800-\udfff]*[^\s\ud800-\udfff])?")}),
}


def _shaped(entries: list[Any], patterns: dict[str, re.Pattern[str]]) -> bool:
    """Is every entry a dict (no subclass) with exactly these keys, each a str matching its pattern?
    All entries at once (a basis may hold hundreds): the values of a key joined by newlines."""
    if set(map(type, entries)) != {dict} or set(map(len, entries)) != {len(patterns)}:
        return False
    for key, pattern in patterns.items():
        try:
            values = list(map(itemgetter(key), entries))
        except KeyError:
            return False
        if set(map(type, values)) != {str}:
            return False
        joined = "\n".join(values)
        if joined.count("\n") != len(values) - 1 or pattern.fullmatch(joined) is None:
            return False
    return True


# Optional elements that are no choice ([x]) and whose values repeat from one RiskAssessment to the
# next: the model's method and performer, meta, outcome and risk codings, score extensions;
# (single elements, lists of elements) of the resource and of each prediction.
_REPEATING = {"RiskAssessment": (("meta", "method", "performer", "code"), ()),
              "prediction": (("outcome", "qualitativeRisk"), ("extension",))}
# Values fhir.resources accepted, by place: (where, element, "value" | "item", frozen value). None of
# these elements holds patient data (notes, which may quote values not used, are not among them).
_ACCEPTED: dict[tuple[Any, ...], None] = {}
_ACCEPTED_MAX = 4096


class _NotPlain(Exception):
    pass


def _frozen(value: Any) -> Any:
    """A hashable copy of JSON made of dicts, lists, str and int only (exact types, order kept);
    _NotPlain for anything else (floats, bools, None, subclasses...)."""
    kind = type(value)
    if kind is str:
        return value
    if kind is dict:
        out: list[Any] = ["d"]
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            out += (key, _frozen(item))
        return tuple(out)
    if kind is list:
        return ("l", *map(_frozen, value))
    if kind is int:
        return ("i", value)
    raise _NotPlain


def _place(where: str, element: str, how: str, value: Any) -> tuple[Any, ...] | None:
    try:
        return where, element, how, _frozen(value)
    except _NotPlain:
        return None


def _leave_out_accepted(container: dict[str, Any], where: str, learned: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A shallow copy of ``container`` without the repeating elements (or list items) that were
    accepted before in this place; the places of the others go to ``learned``."""
    singles, lists = _REPEATING[where]
    out = dict(container)
    for element in singles:
        if element in out:
            place = _place(where, element, "value", out[element])
            if place in _ACCEPTED:
                del out[element]
            elif place is not None:
                learned.append(place)
    for element in lists:
        items = out.get(element)
        if type(items) is not list:
            continue
        keep = []
        for item in items:
            place = _place(where, element, "item", item)
            if place not in _ACCEPTED:
                keep.append(item)
                if place is not None:
                    learned.append(place)
        if not keep:
            del out[element]
        elif len(keep) < len(items):
            out[element] = keep
    return out


def validate(resource: dict[str, Any]) -> dict[str, Any]:
    """Full fhir.resources.R4B validation (single-patient path); raises ValueError on a bad resource.

    fhir.resources validates an element on its own: whether it is accepted depends on nothing around
    it (the parent checks only required and choice elements, nulls in lists and unknown names, and
    those are never left out here). So what the model is given is cut down in ways that decide nothing
    differently — tests check that every variant is accepted or refused exactly as when the model
    validates the whole resource:

    * ``basis`` holds up to hundreds of references of one shape, ``{"reference": "Observation/<id>"}``,
      and validating each as a pydantic Reference costs about 20 µs. When every entry has exactly
      that shape with a valid id (a stricter check than the model's), the model validates only the
      first; once such an entry was accepted there, none. ``encounter``, ``identifier`` and ``note``
      likewise (see _SHAPES).
    * An optional repeating element (method, performer, meta, outcome and risk codings, score
      extensions) whose exact value — dicts, lists, str and int of exactly these types — was accepted
      in the same place before is left out: it would be accepted again.

    What was accepted is remembered only after the whole resource was accepted.
    """
    from fhir.resources.R4B import get_fhir_model_class
    checked = resource
    learned: list[tuple[Any, ...]] = []
    if type(resource) is dict and resource.get("resourceType") == "RiskAssessment":
        checked = _leave_out_accepted(resource, "RiskAssessment", learned)
        for (where, element), (many, patterns) in _SHAPES.items():
            value = checked.get(element)
            entries = value if many else [value]
            if type(entries) is not list or not entries or not _shaped(entries, patterns):
                continue
            place = (where, element, "shape")
            if place in _ACCEPTED:
                del checked[element]
            else:
                learned.append(place)
                if len(entries) > 1:
                    checked[element] = value[:1]
        predictions = checked.get("prediction")
        if type(predictions) is list:
            checked["prediction"] = [_leave_out_accepted(item, "prediction", learned) if type(item) is dict
                                     else item for item in predictions]
    get_fhir_model_class(resource["resourceType"]).model_validate(checked)
    if learned:
        if len(_ACCEPTED) > _ACCEPTED_MAX:
            _ACCEPTED.clear()
        _ACCEPTED.update(dict.fromkeys(learned))
    return resource


def now() -> datetime:
    return datetime.now(timezone.utc)


KTAS_LEVELS = {1: ("Resuscitation", "소생"), 2: ("Emergent", "긴급"), 3: ("Urgent", "응급"),
               4: ("Less urgent", "준응급"), 5: ("Non-urgent", "비응급")}
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
TRIAGE_OUTCOMES = f"{codes.BASE}/CodeSystem/triage-review"
UNWEIGHTED = f"{codes.BASE}/StructureDefinition/class-probability"


def ktas_coding(level: int) -> dict[str, Any]:
    english, korean = KTAS_LEVELS[level]
    return {"system": codes.KTAS_SYSTEM, "code": str(level), "display": f"KTAS {level} {english}",
            "_display": {"extension": [{"url": TRANSLATION, "extension": [
                {"url": "lang", "valueCode": "ko"}, {"url": "content", "valueString": f"KTAS {level} {korean}"}]}]}}


def probability_decimal(p: float) -> float:
    """A model's probability as probabilityDecimal, to 4 decimals, but never 0 or 1 when it is neither: a model
    probability of 0.00004 rounded to 0.0 would state a certainty the model does not have (0.0001 or 0.9999)."""
    p = float(p)
    rounded = round(p, 4)
    if 0.0 < p < 1.0:
        return min(max(rounded, 0.0001), 0.9999)
    return rounded


def probability_text(p: float) -> str:
    """A probability in a rationale, two decimals: '<0.01' / '>0.99' rather than a '0.00' / '1.00' it is not."""
    p = float(p)
    if 0.0 < p < 0.005:
        return "<0.01"
    if 0.995 <= p < 1.0:
        return ">0.99"
    return f"{p:.2f}"


def _band(p: float) -> str:
    return "moderate" if p >= 0.2 else "low" if p >= 0.05 else "negligible"


def triage_assessment(scored: Any) -> dict[str, Any]:
    """KTAS RiskAssessment: one prediction per level, the predicted level marked, the nurse compared."""
    key = assessment_key(scored.patient_id, scored.encounter_id, scored.model_id, scored.model_version,
                         sorted(scored.basis), scored.fingerprint.hex(), scored.sufficient)
    resource = _base(scored, key, "KTAS triage model")
    resource["code"] = {"coding": [{"system": codes.LOINC, "code": "11283-9",
                                    "display": "Acuity assessment at First encounter"}], "text": "KTAS triage"}
    nurse_note = (f"The triage nurse's KTAS level ({scored.nurse_level}) stands; this is a second opinion."
                  if scored.nurse_level else "No nurse KTAS level was recorded; nothing was compared.")
    if not scored.sufficient:
        resource["status"] = "cancelled"
        resource["note"] = _notes(scored, [f"{NOT_ASSESSED} {scored.insufficient_reason}",
                                           nurse_note])
        return resource
    reasons = "; ".join(r.text() for r in scored.reasons)
    predictions: list[dict[str, Any]] = []
    for level in range(1, 6):
        p = float(scored.probabilities[level - 1])
        english, korean = KTAS_LEVELS[level]
        prediction: dict[str, Any] = {
            "outcome": {"coding": [ktas_coding(level)], "text": f"KTAS {level} {english} / {korean}"},
            "probabilityDecimal": probability_decimal(p),
            "qualitativeRisk": _risk("high" if level == scored.level else _band(p)),
            "extension": [{"url": UNWEIGHTED,
                           "valueDecimal": probability_decimal(scored.class_probabilities[level - 1])}],
        }
        if level == scored.level:
            # Without explanations (bulk-assess --explain none) the sentence about inputs is left out, as the
            # deterioration rationale is, rather than an empty "Top contributing inputs: ."
            prediction["rationale"] = (f"Predicted KTAS level {level} ({english}, {korean})."
                                       + (f" Top contributing inputs: {reasons}." if reasons else ""))
        predictions.append(prediction)
    if scored.nurse_level and scored.p_under is not None:
        nurse = scored.nurse_level
        predictions.append({
            "outcome": {"coding": [{"system": TRIAGE_OUTCOMES, "code": "under-triage",
                                    "display": "Nurse's KTAS level less urgent than the patient needs"}],
                        "text": "Possible under-triage / 과소분류 가능성"},
            "probabilityDecimal": probability_decimal(scored.p_under),
            "qualitativeRisk": _risk("high" if scored.flagged else _band(scored.p_under)),
            "rationale": (f"Nurse assigned KTAS {nurse}; probability that the right level is more urgent: "
                          f"{probability_text(scored.p_under)}" + (f" (at or above {scored.flag_threshold:.2f}: please re-check "
                                                     "this patient)." if scored.flagged else "."))})
        predictions.append({
            "outcome": {"coding": [{"system": TRIAGE_OUTCOMES, "code": "over-triage",
                                    "display": "Nurse's KTAS level more urgent than the patient needs"}],
                        "text": "Possible over-triage / 과대분류 가능성"},
            "probabilityDecimal": probability_decimal(scored.p_over),
            "qualitativeRisk": _risk(_band(float(scored.p_over))),
            "rationale": f"Nurse assigned KTAS {nurse}; probability that the right level is less urgent: "
                         f"{probability_text(scored.p_over)}."})
    resource["prediction"] = predictions
    resource["note"] = _notes(scored, [
        "probabilityDecimal per KTAS level is the model's class probability re-weighted toward urgent levels "
        "(see the model card's decision rule), between 0 and 1; the unweighted class probability is in the "
        f"{UNWEIGHTED} extension. qualitativeRisk 'high' marks the predicted level.", nurse_note])
    return resource
