"""Grouped aggregates over (patient, time)-sorted value arrays, vectorised with numpy."""
from __future__ import annotations

import numpy as np


def grouped(aggregate: str | None, P: np.ndarray, T: np.ndarray, V: np.ndarray,
            anchor: np.ndarray, n: int) -> np.ndarray:
    """One value per patient row (NaN where the patient had no value; 0 for count and sum).

    ``P`` must be sorted and ``T`` sorted within each patient (Extractor.finish guarantees it).
    """
    count = np.bincount(P, minlength=n).astype(np.float64)
    if aggregate == "count":
        return count
    if aggregate == "sum":
        return np.bincount(P, weights=V, minlength=n)
    out = np.full(n, np.nan)
    if len(P) == 0:
        return out
    starts = np.flatnonzero(np.r_[True, P[1:] != P[:-1]])
    rows = P[starts]
    ends = np.r_[starts[1:], len(P)]
    if aggregate == "last":
        out[rows] = V[ends - 1]
    elif aggregate == "first":
        out[rows] = V[starts]
    elif aggregate == "min":
        out[rows] = np.minimum.reduceat(V, starts)
    elif aggregate == "max":
        out[rows] = np.maximum.reduceat(V, starts)
    elif aggregate == "any":
        out[rows] = (np.maximum.reduceat(V, starts) > 0).astype(np.float64)
    elif aggregate == "mean":
        out[rows] = np.add.reduceat(V, starts) / (ends - starts)
    elif aggregate == "delta":
        out[rows] = V[ends - 1] - V[starts]
    elif aggregate in ("median", "std"):
        fn = np.median if aggregate == "median" else np.std
        out[rows] = [fn(V[s:e]) for s, e in zip(starts, ends)]
    elif aggregate == "slope":
        out[rows] = _slopes(P, (T - anchor[P]) / 3600.0, V, starts, ends)
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}")
    return out


def _slopes(P: np.ndarray, hours: np.ndarray, V: np.ndarray, starts: np.ndarray,
            ends: np.ndarray) -> np.ndarray:
    """Least-squares slope per group (value units per hour); NaN with fewer than 2 distinct times."""
    k = (ends - starts).astype(np.float64)
    st = np.add.reduceat(hours, starts)
    sv = np.add.reduceat(V, starts)
    stt = np.add.reduceat(hours * hours, starts)
    stv = np.add.reduceat(hours * V, starts)
    denominator = k * stt - st * st
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (k * stv - st * sv) / denominator
    slope[(k < 2) | (np.abs(denominator) < 1e-12)] = np.nan
    return slope
