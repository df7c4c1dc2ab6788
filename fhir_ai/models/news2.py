"""NEWS2 (Royal College of Physicians, 2017), scored with numpy for many patients at once.

Source: RCP. National Early Warning Score (NEWS) 2: Standardising the assessment of acute-illness
severity in the NHS. Updated report of a working party. London: RCP, 2017 — Chart 1 (scoring),
Chart 3 (thresholds and triggers) and Chart 4 (clinical response). © Royal College of Physicians 2017,
reproduced with acknowledgement as the RCP permits.

Decisions (read these before using the numbers):

* **Values between charted bands.** The chart is written for whole numbers (temperature to one
  decimal), so 20.5 breaths/min or 38.05 °C fall in no printed band. Each band is taken to run up to
  and including its *upper* edge: a value belongs to the first band whose upper edge it does not exceed.
  So 20.5 breaths/min scores 2 (above 20), 38.05 °C scores 1 (above 38.0), 35.0 °C scores 3,
  35.01 °C scores 1. Values are not rounded first. Comparisons allow 1e-6 so that a unit conversion
  landing a hair above an edge ((100.4 - 32) * (5 / 9) = 38.00000000000001 °C) still scores as charted.
* **Missing data.** NEWS2 is defined on all seven parameters. Where any is missing (NaN, or
  ``on_oxygen`` / ``alert`` unknown) ``total`` and ``band`` are missing (NaN / None) — a missing
  value is never scored as normal. ``partial_total`` is the sum of the subscores that could be
  computed, with ``n_missing`` saying how many could not; because every subscore is ≥ 0 it is a lower
  bound of the true total, and ``min_band`` (the band of that lower bound) is the least urgent band
  the patient can be in. Where nothing is missing ``partial_total == total`` and ``min_band == band``.
* **SpO2 on scale 2 (target 88–92 %, hypercapnic respiratory failure).** ≤83 → 3, 84–85 → 2,
  86–87 → 1, 88–92 → 0; at 93 or more it scores 0 on air and 1/2/3 (93–94 / 95–96 / ≥97) on oxygen,
  so there it needs ``on_oxygen``; below 93 it does not.
* **Consciousness.** ``alert`` true → 0; false (new confusion, V, P or U) → 3.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fhir_ai.errors import BadRequest

PARAMETERS: tuple[str, ...] = ("respiration_rate", "spo2", "air_or_oxygen", "systolic_bp",
                               "pulse", "consciousness", "temperature")

BANDS: tuple[str, ...] = ("low", "low-medium", "medium", "high")

# RCP 2017 Chart 4 ("Clinical response to the NEWS trigger thresholds"): monitoring frequency,
# then the clinical response. "zero" is the total-0 row of the low band, which Chart 4 separates.
CLINICAL_RESPONSE: dict[str, str] = {
    "zero": "Minimum 12-hourly monitoring. Continue routine NEWS monitoring.",
    "low": ("Minimum 4–6-hourly monitoring. Inform registered nurse, who must assess the patient; "
            "registered nurse decides whether increased frequency of monitoring and/or escalation "
            "of care is required."),
    "low-medium": ("Minimum 1-hourly monitoring (3 in a single parameter: urgent ward-based "
                   "response). Registered nurse to inform medical team caring for the patient, who "
                   "will review and decide whether escalation of care is necessary."),
    "medium": ("Urgent response threshold. Minimum 1-hourly monitoring. Registered nurse to "
               "immediately inform the medical team caring for the patient; registered nurse to "
               "request urgent assessment by a clinician or team with core competencies in the care "
               "of acutely ill patients; provide clinical care in an environment with monitoring "
               "facilities."),
    "high": ("Emergency response threshold. Continuous monitoring of vital signs. Registered nurse "
             "to immediately inform the medical team caring for the patient – this should be at "
             "least at specialist registrar level; emergency assessment by a team with critical "
             "care competencies, including practitioner(s) with advanced airway management skills; "
             "consider transfer of care to a level 2 or 3 clinical care facility, ie "
             "higher-dependency unit or ICU; clinical care in an environment with monitoring "
             "facilities."),
}

# Tolerance on band edges; see the module docstring (unit conversions, not clinical slack).
_EPS = 1e-6



def _table(edges: Sequence[tuple[float, int]], top: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """A band table for ``np.searchsorted``: the upper edges (+ ``_EPS``, then +inf) and the scores
    (then ``top`` above the last edge, then NaN, where NaN values sort: after +inf)."""
    return (np.array([edge + _EPS for edge, _ in edges] + [np.inf]),
            np.array([float(score) for _, score in edges] + [float(top), np.nan]))


# (upper edge of band, score), ascending; values above the last edge get the second argument.
_RESP = _table(((8, 3), (11, 1), (20, 0), (24, 2)), 3)
_SPO2_SCALE1 = _table(((91, 3), (93, 2), (95, 1)), 0)
_SPO2_SCALE2_LOW = _table(((83, 3), (85, 2), (87, 1), (92, 0)), np.nan)   # identical on air and oxygen
_SPO2_SCALE2_O2 = _table(((94, 1), (96, 2)), 3)                            # ≥93 on oxygen
_SBP = _table(((90, 3), (100, 2), (110, 1), (219, 0)), 3)
_PULSE = _table(((40, 3), (50, 1), (90, 0), (110, 1), (130, 2)), 3)
_TEMP = _table(((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1)), 2)

_AVPU = {"A": 1.0, "C": 0.0, "V": 0.0, "P": 0.0, "U": 0.0,
         "ALERT": 1.0, "CONFUSION": 0.0, "VOICE": 0.0, "VERBAL": 0.0, "PAIN": 0.0,
         "UNRESPONSIVE": 0.0}
_AVPU_NUMERIC = {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}   # KTAS "Mental": 1 alert … 4 unresponsive


@dataclass(frozen=True)
class News2Result:
    """Scores for n patients; every array has the broadcast shape of the inputs."""

    total: NDArray[np.float64]               # NaN where any parameter is missing
    partial_total: NDArray[np.float64]       # sum of the available subscores (lower bound)
    subscores: dict[str, NDArray[np.float64]]  # PARAMETERS → 0–3, NaN where missing
    n_missing: NDArray[np.int64]
    band: NDArray[np.object_]                # "low" | "low-medium" | "medium" | "high" | None
    min_band: NDArray[np.object_]            # band of partial_total: the least urgent possible
    clinical_response: NDArray[np.object_]   # Chart 4 text for ``band``; None where band is None


def _floats(x: ArrayLike, name: str) -> NDArray[np.float64]:
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"news2: {name} must be numeric (NaN for missing)",
                         expression=name) from exc


def _bands(values: NDArray[np.float64], table: tuple[NDArray[np.float64], NDArray[np.float64]]
           ) -> NDArray[np.float64]:
    """Score each value by the first band whose upper edge it does not exceed (NaN stays NaN)."""
    edges, scores = table
    return np.asarray(scores[np.searchsorted(edges, values)])


def _flags(x: ArrayLike, name: str) -> NDArray[np.float64]:
    """True/False/unknown as 1.0/0.0/NaN (None and NaN are unknown)."""
    arr = np.asarray(x)
    if arr.dtype.kind in "biuf":   # the common, vectorisable case
        f = arr.astype(float)
        return np.where(np.isnan(f), np.nan, (f != 0).astype(float))
    arr = arr.astype(object)
    out = np.full(arr.shape, np.nan)
    for idx, v in np.ndenumerate(arr):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        if isinstance(v, (bool, np.bool_, int, np.integer, float, np.floating)):
            out[idx] = 1.0 if v else 0.0
        else:
            raise BadRequest(f"news2: {name} must be true, false or missing", expression=name)
    return out


def _spo2(spo2: NDArray[np.float64], o2: NDArray[np.float64],
          scale2: NDArray[np.bool_]) -> NDArray[np.float64]:
    s1 = _bands(spo2, _SPO2_SCALE1)
    if not scale2.any():
        return s1
    high = spo2 > 92 + _EPS
    s2 = _bands(spo2, _SPO2_SCALE2_LOW)   # NaN above 92: decided below by oxygen
    s2_o2 = _bands(spo2, _SPO2_SCALE2_O2)
    s2 = np.where(high & (o2 == 0), 0.0, s2)
    s2 = np.where(high & (o2 == 1), s2_o2, s2)
    return np.where(scale2, s2, s1)


# Band codes: 0 none (total missing), then BANDS in order; their Chart 4 responses likewise.
_BAND_NAMES = np.array([None, *BANDS], dtype=object)
_RESPONSES = np.array([None, *(CLINICAL_RESPONSE[name] for name in BANDS)], dtype=object)


def _pick(table: NDArray[np.object_], codes: NDArray[np.intp]) -> NDArray[np.object_]:
    """table[codes] as an array of the codes' shape (also 0-d)."""
    return table[np.ravel(codes)].reshape(np.shape(codes))


def _band(total: NDArray[np.float64], any3: NDArray[np.bool_]) -> NDArray[np.intp]:
    """0 where the total is NaN (or between charted totals), else 1 + the index of its band in BANDS:
    ≤4 low (low-medium with a 3 in any parameter), 5–6 medium, ≥7 high."""
    low = total <= 4
    return low * (1 + any3) + 3 * ((total >= 5) & (total <= 6)) + 4 * (total >= 7)


def news2(resp_rate: ArrayLike, spo2: ArrayLike, on_oxygen: ArrayLike, systolic_bp: ArrayLike,
          pulse: ArrayLike, alert: ArrayLike, temperature: ArrayLike, *,
          spo2_scale: ArrayLike = 1) -> News2Result:
    """Score NEWS2 for every patient; inputs broadcast together (NaN or None = missing).

    Units: breaths/min, SpO2 %, mmHg, beats/min, °C. ``on_oxygen``: true if on supplemental oxygen.
    ``alert``: true if alert (see ``alert_from_gcs`` / ``alert_from_avpu``). ``spo2_scale``: 1 or 2.
    """
    rr = _floats(resp_rate, "resp_rate")
    sat = _floats(spo2, "spo2")
    sbp = _floats(systolic_bp, "systolic_bp")
    hr = _floats(pulse, "pulse")
    temp = _floats(temperature, "temperature")
    o2 = _flags(on_oxygen, "on_oxygen")
    alert_f = _flags(alert, "alert")
    scale = _floats(spo2_scale, "spo2_scale")
    scale2 = scale == 2.0
    if not np.all(scale2 | (scale == 1.0)):
        raise BadRequest("news2: spo2_scale must be 1 or 2", expression="spo2_scale")
    arrays = (rr, sat, o2, sbp, hr, alert_f, temp)
    if len({a.shape for a in arrays}) > 1 or scale2.shape not in ((), rr.shape):   # else nothing to do
        rr, sat, o2, sbp, hr, alert_f, temp, scale2 = np.broadcast_arrays(*arrays, scale2)

    # o2 and alert_f are 1.0, 0.0 or NaN: air 0 / oxygen 2, alert 0 / not alert 3, NaN stays NaN.
    subscores = {
        "respiration_rate": _bands(rr, _RESP),
        "spo2": _spo2(sat, o2, scale2),
        "air_or_oxygen": o2 * 2.0,
        "systolic_bp": _bands(sbp, _SBP),
        "pulse": _bands(hr, _PULSE),
        "consciousness": (1.0 - alert_f) * 3.0,
        "temperature": _bands(temp, _TEMP),
    }
    stacked = np.stack([subscores[p] for p in PARAMETERS])
    missing = np.isnan(stacked)
    n_missing = missing.sum(axis=0).astype(np.int64)
    partial = np.where(missing, 0.0, stacked).sum(axis=0)
    total = np.where(n_missing == 0, partial, np.nan)
    any3 = np.any(stacked == 3, axis=0)

    band = _band(total, any3)
    response = _pick(_RESPONSES, band)
    response[total == 0] = CLINICAL_RESPONSE["zero"]
    return News2Result(total=total, partial_total=partial, subscores=subscores,
                       n_missing=n_missing, band=_pick(_BAND_NAMES, band),
                       min_band=_pick(_BAND_NAMES, _band(partial, any3)),
                       clinical_response=response)


def alert_from_gcs(gcs: ArrayLike) -> NDArray[np.float64]:
    """Glasgow Coma Scale → alert flag: 15 → 1.0 (alert), 3–14 → 0.0, NaN → NaN (unknown)."""
    g = _floats(gcs, "gcs")
    bad = ~np.isnan(g) & ((g < 3) | (g > 15))
    if np.any(bad):
        raise BadRequest("alert_from_gcs: GCS must lie between 3 and 15", expression="gcs")
    return np.where(np.isnan(g), np.nan, np.where(g >= 15, 1.0, 0.0))


def alert_from_avpu(code: Any) -> NDArray[np.float64]:
    """ACVPU code(s) → alert flag: A/1 → 1.0; C, V/2, P/3, U/4 → 0.0; None/NaN/"" → NaN.

    Letters and words are case-insensitive ("A", "alert", "verbal"); numbers follow the KTAS
    data set's ``Mental`` codes (1 alert, 2 verbal, 3 pain, 4 unresponsive). Anything else is an
    error rather than a guess.
    """
    arr = np.asarray(code, dtype=object)
    out = np.full(arr.shape, np.nan)
    for idx, v in np.ndenumerate(arr):
        if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
            continue
        if isinstance(v, str):
            key = v.strip().upper()
            if not key:
                continue
            if key.isdigit():
                v = int(key)
            elif key in _AVPU:
                out[idx] = _AVPU[key]
                continue
            else:
                raise BadRequest("alert_from_avpu: unknown AVPU code", expression="code")
        if isinstance(v, (bool, np.bool_)) or not isinstance(
                v, (int, np.integer, float, np.floating)) or float(v) not in _AVPU_NUMERIC:
            raise BadRequest("alert_from_avpu: unknown AVPU code", expression="code")
        out[idx] = _AVPU_NUMERIC[int(v)]
    return out
