"""Evaluation metrics for model cards: discrimination, PhysioNet 2012 scores, ordinal triage, calibration.

Probabilities are fractions in [0, 1] everywhere in this module (never percentages). Labels ``y`` are
0/1 for binary outcomes and KTAS levels 1–5 for triage. Every function returns plain Python floats,
lists and dicts so its output can go straight into a JSON model card; calibration parameters are
JSON too, because model artefacts are stored as text, never pickled.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit   # overflow-free logistic; scipy comes with scikit-learn
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from fhir_ai.errors import BadRequest

log = logging.getLogger(__name__)


def _binary(y: ArrayLike, name: str = "y") -> NDArray[np.float64]:
    arr = np.asarray(y, dtype=float).ravel()
    if not np.all(np.isin(arr, (0.0, 1.0))):
        raise BadRequest(f"{name} must contain only 0 and 1", expression=name)
    return arr


def _probs(p: ArrayLike, n: int, name: str = "p") -> NDArray[np.float64]:
    arr = np.asarray(p, dtype=float).ravel()
    if arr.shape[0] != n:
        raise BadRequest(f"{name} has {arr.shape[0]} values, expected {n}", expression=name)
    if np.any(np.isnan(arr)) or np.any((arr < 0) | (arr > 1)):
        raise BadRequest(f"{name} must be probabilities in [0, 1] without NaN", expression=name)
    return arr


def auroc(y: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve; NaN when only one class is present (it is undefined then)."""
    yy = _binary(y)
    pp = np.asarray(p, dtype=float).ravel()   # any score works for a ranking metric
    if pp.shape != yy.shape or np.any(np.isnan(pp)):
        raise BadRequest("p must be one score per label, without NaN", expression="p")
    if yy.min() == yy.max():
        log.warning("auroc undefined: only one class among %d labels", yy.size)
        return math.nan
    return float(roc_auc_score(yy, pp))


def brier(y: ArrayLike, p: ArrayLike) -> float:
    """Brier score: mean squared difference between probability and 0/1 outcome."""
    yy = _binary(y)
    pp = _probs(p, yy.size)
    return float(np.mean((pp - yy) ** 2))


# --- PhysioNet/Computing in Cardiology Challenge 2012 -------------------------------------------
# Followed: the challenge's genresults.m (Version 2.0, 22 March 2012) for event 1 and lemeshow.m
# (Ikaro Silva, Version 1.4, 25 March 2012) for event 2, as distributed with the challenge in
# physionet.org/files/challenge-2012/1.0.0 (copy read: GitHub AbhiramAroop/Final-Year-Project,
# physionet.org/files/challenge-2012/1.0.0/sources/lciti_at_neurostat.mit.edu/entry7/{genresults,
# lemeshow}.m, commit 6f5f3be6a11ea60d9799dcc5e78f3460305f2294).

def event1_score(y: ArrayLike, decision: ArrayLike) -> float:
    """Challenge event 1: min(sensitivity, positive predictivity) of a 0/1 decision.

    As in genresults.m, Se = TP/(TP+FN) and PPV = TP/(TP+FP) are computed as 0/0 = NaN when undefined,
    and MATLAB's ``min`` ignores NaN: the score is the other one, NaN only if both are undefined.
    """
    yy = _binary(y)
    dd = _binary(decision, "decision")
    if dd.shape != yy.shape:
        raise BadRequest("decision must have one value per label", expression="decision")
    tp = float(np.sum((yy == 1) & (dd == 1)))
    fn = float(np.sum((yy == 1) & (dd == 0)))
    fp = float(np.sum((yy == 0) & (dd == 1)))
    se = tp / (tp + fn) if tp + fn else math.nan
    ppv = tp / (tp + fp) if tp + fp else math.nan
    return float(np.fmin(se, ppv))


def hosmer_lemeshow_h(y: ArrayLike, p: ArrayLike) -> float:
    """Challenge event 2: Hosmer–Lemeshow H over deciles of risk, divided by the deciles' risk range.

    Exactly lemeshow.m: sort by risk (stable, like MATLAB ``sortrows``); ten groups of
    M = floor(N/10) consecutive records, so the N mod 10 *highest-risk* records are left out;
    per group H_g = (O - M·c)² / (M·c·(1-c) + 0.001) with c the group's mean risk;
    H = Σ H_g / (c_10 - c_1). Lower is better. A constant predictor divides by zero (inf, or NaN
    when the sum is also 0), as it did in the challenge.
    """
    yy = _binary(y)
    pp = _probs(p, yy.size)
    m = yy.size // 10
    if m == 0:
        raise BadRequest("hosmer_lemeshow_h needs at least 10 records", expression="y")
    order = np.argsort(pp, kind="stable")
    ys = yy[order][: 10 * m].reshape(10, m)
    ps = pp[order][: 10 * m].reshape(10, m)
    obs = ys.sum(axis=1)
    centroid = ps.mean(axis=1)
    expected = m * centroid
    h = (obs - expected) ** 2 / (m * centroid * (1 - centroid) + 0.001)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(h.sum()) / np.float64(centroid[-1] - centroid[0]))


def best_event1_threshold(y: ArrayLike, p: ArrayLike) -> tuple[float, float]:
    """Threshold t maximising event1_score(y, p >= t) over the distinct values of p.

    Ties go to the highest threshold (fewest alarms). Returns (threshold, score); (nan, nan) when
    y has no positive case.
    """
    yy = _binary(y)
    pp = np.asarray(p, dtype=float).ravel()
    if pp.shape != yy.shape or np.any(np.isnan(pp)):
        raise BadRequest("p must be one score per label, without NaN", expression="p")
    positives = yy.sum()
    if positives == 0:
        return math.nan, math.nan
    order = np.argsort(-pp, kind="stable")
    ps, ys = pp[order], yy[order]
    tp = np.cumsum(ys)
    # Only the last index of each run of equal scores is a reachable cut (p >= t keeps ties together).
    last = np.r_[ps[1:] != ps[:-1], True]
    k = np.arange(1, ps.size + 1)[last]
    tp = tp[last]
    scores = np.minimum(tp / positives, tp / k)
    best = int(np.argmax(scores))   # first maximum = highest threshold
    return float(ps[last][best]), float(scores[best])


def calibration_table(y: ArrayLike, p: ArrayLike, bins: int = 10) -> list[dict[str, float | int]]:
    """Observed vs predicted risk in ``bins`` equal-count groups of increasing risk.

    Unlike lemeshow.m no record is dropped: group sizes differ by at most one (numpy array_split
    of the stable risk order). Empty groups (fewer records than bins) are left out.
    """
    yy = _binary(y)
    pp = _probs(p, yy.size)
    if bins < 1:
        raise BadRequest("bins must be at least 1", expression="bins")
    order = np.argsort(pp, kind="stable")
    rows: list[dict[str, float | int]] = []
    for i, idx in enumerate(np.array_split(order, bins)):
        if idx.size == 0:
            continue
        rows.append({
            "bin": i + 1,
            "n": int(idx.size),
            "p_min": float(pp[idx].min()),
            "p_max": float(pp[idx].max()),
            "mean_predicted": float(pp[idx].mean()),
            "observed_rate": float(yy[idx].mean()),
            "expected_events": float(pp[idx].sum()),
            "observed_events": int(yy[idx].sum()),
        })
    return rows


# --- Ordinal triage (KTAS 1 = most urgent … 5 = least urgent) ------------------------------------

def _levels(true_level: ArrayLike, pred_level: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
    t = np.asarray(true_level).ravel()
    q = np.asarray(pred_level).ravel()
    if t.shape != q.shape or t.size == 0:
        raise BadRequest("true and predicted levels must be non-empty and of equal length",
                         expression="pred_level")
    return t, q


def exact_accuracy(true_level: ArrayLike, pred_level: ArrayLike) -> float:
    """Share of cases whose predicted level equals the true level."""
    t, q = _levels(true_level, pred_level)
    return float(np.mean(t == q))


def weighted_kappa(true_level: ArrayLike, pred_level: ArrayLike, weights: str | None = "linear",
                   labels: ArrayLike | None = None) -> float:
    """Cohen's kappa with "linear" or "quadratic" weights (None: unweighted), via scikit-learn.

    Weights depend on the distance between positions in ``labels`` (default: the sorted levels seen),
    so pass labels=[1, 2, 3, 4, 5] when a level may be absent from both columns.
    """
    if weights not in ("linear", "quadratic", None):
        raise BadRequest("weights must be 'linear', 'quadratic' or None", expression="weights")
    t, q = _levels(true_level, pred_level)
    lab = None if labels is None else list(np.asarray(labels).ravel())
    return float(cohen_kappa_score(t, q, labels=lab, weights=weights))


def triage_error_rates(true_level: ArrayLike, pred_level: ArrayLike) -> dict[str, float]:
    """Fractions of all cases under-triaged (predicted level number higher = less urgent) and over."""
    t, q = _levels(true_level, pred_level)
    t = t.astype(float)
    q = q.astype(float)
    return {"under": float(np.mean(q > t)), "over": float(np.mean(q < t))}


# --- Calibration maps (JSON-serialisable) --------------------------------------------------------

def fit_isotonic(raw: ArrayLike, y: ArrayLike) -> dict[str, Any]:
    """Fit a non-decreasing map raw score → probability; returns {"kind", "x", "y", "ends"} knots.

    Outside the fitted range the map is flat (clipped), which is what np.interp does in
    apply_calibration, so the stored knots reproduce sklearn's prediction exactly, except at the ends:
    isotonic regression gives the block of lowest scores the value 0 when none of its cases had the event
    (and the block of highest scores 1 when all had), a certainty a finite sample cannot support, which a
    RiskAssessment would then state as probabilityDecimal 0. Such an end block gets Laplace's rule of
    succession instead, (k + 1) / (n + 2) over its n cases with k events (k = 0 for the bottom block, k = n for
    the top one: 1 / (n + 2) and (n + 1) / (n + 2)), kept within its neighbouring block so the map stays non-decreasing.
    """
    yy = _binary(y)
    rr = np.asarray(raw, dtype=float).ravel()
    if rr.shape != yy.shape or np.any(np.isnan(rr)):
        raise BadRequest("raw must be one score per label, without NaN", expression="raw")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(rr, yy)
    x = np.asarray(iso.X_thresholds_, dtype=float)
    v = np.asarray(iso.y_thresholds_, dtype=float).copy()
    ends: dict[str, Any] = {}
    if v[0] <= 0.0:                                  # the zeros are the first block(s): v is non-decreasing
        zero = v <= 0.0
        n = int(np.sum(rr <= x[zero].max()))         # the cases fitted to 0, none with the event
        floor = 1.0 / (n + 2)
        if not zero.all():
            floor = min(floor, float(v[~zero][0]))
        v[zero] = floor
        ends["low"] = {"cases": n, "events": 0, "probability": floor, "held_at_next_block": floor < 1.0 / (n + 2)}
    if v[-1] >= 1.0:
        one = v >= 1.0
        n = int(np.sum(rr >= x[one].min()))          # the cases fitted to 1, all with the event
        ceiling = (n + 1.0) / (n + 2)
        if not one.all():
            ceiling = max(ceiling, float(v[~one][-1]))
        v[one] = ceiling
        ends["high"] = {"cases": n, "events": n, "probability": ceiling,
                        "held_at_next_block": ceiling > (n + 1.0) / (n + 2)}
    return {"kind": "isotonic", "x": [float(t) for t in x], "y": [float(t) for t in v],
            "ends": {"rule": "Laplace (k + 1) / (n + 2) for an end block fitted to 0 or 1", **ends}}


def _logit(x: NDArray[np.float64]) -> NDArray[np.float64]:
    x = np.clip(x, 1e-12, 1 - 1e-12)
    return np.log(x / (1 - x))


def fit_platt(raw: ArrayLike, y: ArrayLike, *, logit_input: bool = False,
              max_iter: int = 100) -> dict[str, Any]:
    """Platt scaling p = 1/(1+exp(-(a·s+b))), s = raw (or logit(raw) when logit_input).

    Uses Platt's (1999) smoothed targets (N₊+1)/(N₊+2) and 1/(N₋+2) instead of 1 and 0, which keeps
    the fit finite when the classes are separable; solved by Newton's method with backtracking.
    """
    yy = _binary(y)
    s = np.asarray(raw, dtype=float).ravel()
    if s.shape != yy.shape or np.any(np.isnan(s)):
        raise BadRequest("raw must be one score per label, without NaN", expression="raw")
    if logit_input:
        s = _logit(s)
    n_pos = yy.sum()
    n_neg = yy.size - n_pos
    t = np.where(yy == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        z = a * s + b
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    a, b = 0.0, float(np.log((n_pos + 1) / (n_neg + 1)))
    current = loss(a, b)
    for _ in range(max_iter):
        q = expit(a * s + b)
        w = q * (1 - q)
        g = np.array([np.sum((q - t) * s), np.sum(q - t)])
        hess = np.array([[np.sum(w * s * s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]])
        hess += 1e-12 * np.eye(2)   # a constant score makes the Hessian singular
        step = np.linalg.solve(hess, g)
        # Backtracking (as in Lin, Lin & Weng 2007): a full Newton step can overshoot.
        size = 1.0
        while size > 1e-10:
            new = loss(a - size * float(step[0]), b - size * float(step[1]))
            if new <= current - 1e-4 * size * float(g @ step):
                break
            size /= 2
        else:
            break
        a, b, current = a - size * float(step[0]), b - size * float(step[1]), new
        if size * np.max(np.abs(step)) < 1e-10:
            break
    return {"kind": "platt", "a": a, "b": b, "logit_input": bool(logit_input)}


def apply_calibration(params: dict[str, Any], raw: ArrayLike) -> NDArray[np.float64]:
    """Map raw scores to probabilities in [0, 1] with parameters from fit_isotonic or fit_platt."""
    s = np.asarray(raw, dtype=float)
    kind = params.get("kind")
    if kind == "isotonic":
        return np.interp(s, np.asarray(params["x"], dtype=float),
                         np.asarray(params["y"], dtype=float))
    if kind == "platt":
        if params.get("logit_input"):
            s = _logit(s)
        return expit(float(params["a"]) * s + float(params["b"]))
    raise BadRequest(f"unknown calibration kind {kind!r}", expression="kind")
