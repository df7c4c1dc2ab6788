"""Grouped aggregates over (patient, time)-sorted value arrays, vectorised with numpy.

The core works on segments: runs of rows that belong to one group (a patient, or a patient and a
feature window). ``Extractor.finish`` segments every feature window of every patient at once and asks
for each aggregate once; ``grouped`` is the same core for one window, one segment per patient.
"""
from __future__ import annotations

import numpy as np

from ..mapping.schema import AGGREGATES

ZERO_WHEN_EMPTY = frozenset({"count", "sum"})      # a patient without values counts 0, sums to 0


def segment_starts(keys: tuple[np.ndarray, ...], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs where every key array stays the same (rows already grouped)."""
    change = np.empty(size, dtype=bool)
    change[0] = True
    np.not_equal(keys[0][1:], keys[0][:-1], out=change[1:])
    for key in keys[1:]:
        change[1:] |= key[1:] != key[:-1]
    starts = np.flatnonzero(change)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = size
    return starts, ends


def segment_values(aggregate: str, V: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   hours: np.ndarray | None = None) -> np.ndarray:
    """One value per segment (segments are non-empty, contiguous and cover V in order).

    ``hours``: each row's time relative to its as-of time (only ``slope`` reads it).
    """
    if aggregate == "last":
        return V[ends - 1]
    if aggregate == "first":
        return V[starts]
    if aggregate == "min":
        return np.minimum.reduceat(V, starts)
    if aggregate == "max":
        return np.maximum.reduceat(V, starts)
    if aggregate == "any":
        return (np.maximum.reduceat(V, starts) > 0).astype(np.float64)
    if aggregate == "mean":
        return np.add.reduceat(V, starts) / (ends - starts)
    if aggregate == "delta":
        return V[ends - 1] - V[starts]
    if aggregate == "count":
        return (ends - starts).astype(np.float64)
    if aggregate == "sum":
        # bincount adds each segment's values one after the other, from 0.
        segment = np.repeat(np.arange(len(starts)), ends - starts)
        return np.bincount(segment, weights=V, minlength=len(starts))
    if aggregate in ("median", "std"):
        fn = np.median if aggregate == "median" else np.std
        return np.array([fn(V[s:e]) for s, e in zip(starts.tolist(), ends.tolist())], dtype=np.float64)
    if aggregate == "slope":
        assert hours is not None
        return _slopes(hours, V, starts, ends)
    raise ValueError(f"unknown aggregate {aggregate!r}")


def grouped(aggregate: str | None, P: np.ndarray, T: np.ndarray, V: np.ndarray,
            anchor: np.ndarray, n: int) -> np.ndarray:
    """One value per patient row (NaN where the patient had no value; 0 for count and sum).

    ``P`` must be sorted and ``T`` sorted within each patient (Extractor.finish guarantees it).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}")
    out = np.zeros(n) if aggregate in ZERO_WHEN_EMPTY else np.full(n, np.nan)
    if len(P):
        starts, ends = segment_starts((P,), len(P))
        hours = (T - anchor[P]) / 3600.0 if aggregate == "slope" else None
        out[P[starts]] = segment_values(aggregate, V, starts, ends, hours)
    return out


def _slopes(hours: np.ndarray, V: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Least-squares slope per segment (value units per hour); NaN with fewer than 2 distinct times."""
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
