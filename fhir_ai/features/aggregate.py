"""Grouped aggregates over (patient, time)-sorted value arrays, vectorised with numpy."""
from __future__ import annotations

import numpy as np


def grouped(aggregate: str | None, P: np.ndarray, T: np.ndarray, V: np.ndarray,
            anchor: np.ndarray, n: int) -> np.ndarray:
    """One value per patient row (NaN where the patient had no value; 0 for count and sum).

    ``P`` must be sorted and ``T`` sorted within each patient (Extractor.finish guarantees it).
    """
    return grouped_many([aggregate], P, T, V, anchor, n)[0]


def grouped_many(aggregates: list[str | None], P: np.ndarray, T: np.ndarray, V: np.ndarray,
                 anchor: np.ndarray, n: int) -> list[np.ndarray]:
    """Several aggregates of the same values; the per-patient segments are found once."""
    segments = None
    if len(P):
        # np.r_ costs more than the work itself for a single patient's few values.
        change = np.empty(len(P), dtype=bool)
        change[0] = True
        np.not_equal(P[1:], P[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:]
        ends[-1] = len(P)
        segments = (starts, P[starts], ends)
    return [_one(aggregate, P, T, V, anchor, n, segments) for aggregate in aggregates]


def _one(aggregate: str | None, P: np.ndarray, T: np.ndarray, V: np.ndarray, anchor: np.ndarray, n: int,
         segments: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    if aggregate == "count":
        return np.bincount(P, minlength=n).astype(np.float64)
    if aggregate == "sum":
        return np.bincount(P, weights=V, minlength=n)
    out = np.full(n, np.nan)
    if segments is None:
        if aggregate not in _KNOWN:
            raise ValueError(f"unknown aggregate {aggregate!r}")
        return out
    starts, rows, ends = segments
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


_KNOWN = {"last", "first", "min", "max", "any", "mean", "delta", "median", "std", "slope"}


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
