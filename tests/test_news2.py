"""NEWS2 scoring: every band edge on both sides, SpO2 scale 2, bands, responses, missing data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fhir_ai.errors import BadRequest
from fhir_ai.models.news2 import (CLINICAL_RESPONSE, PARAMETERS, alert_from_avpu, alert_from_gcs,
                                  news2)

NORMAL = dict(resp_rate=16.0, spo2=97.0, on_oxygen=False, systolic_bp=120.0, pulse=70.0,
              alert=True, temperature=37.0)


def score(**changes: object):
    args = {**NORMAL, **changes}
    scale = args.pop("spo2_scale", 1)
    return news2(**args, spo2_scale=scale)


# (argument, value, parameter, expected subscore). Pairs straddle each printed edge.
EDGES = [
    ("resp_rate", 0, "respiration_rate", 3), ("resp_rate", 8, "respiration_rate", 3),
    ("resp_rate", 8.5, "respiration_rate", 1), ("resp_rate", 9, "respiration_rate", 1),
    ("resp_rate", 11, "respiration_rate", 1), ("resp_rate", 11.5, "respiration_rate", 0),
    ("resp_rate", 12, "respiration_rate", 0), ("resp_rate", 20, "respiration_rate", 0),
    ("resp_rate", 20.5, "respiration_rate", 2), ("resp_rate", 21, "respiration_rate", 2),
    ("resp_rate", 24, "respiration_rate", 2), ("resp_rate", 25, "respiration_rate", 3),
    ("resp_rate", 60, "respiration_rate", 3),
    ("spo2", 70, "spo2", 3), ("spo2", 91, "spo2", 3), ("spo2", 91.5, "spo2", 2),
    ("spo2", 92, "spo2", 2), ("spo2", 93, "spo2", 2), ("spo2", 94, "spo2", 1),
    ("spo2", 95, "spo2", 1), ("spo2", 95.5, "spo2", 0), ("spo2", 96, "spo2", 0),
    ("spo2", 100, "spo2", 0),
    ("systolic_bp", 60, "systolic_bp", 3), ("systolic_bp", 90, "systolic_bp", 3),
    ("systolic_bp", 91, "systolic_bp", 2), ("systolic_bp", 100, "systolic_bp", 2),
    ("systolic_bp", 101, "systolic_bp", 1), ("systolic_bp", 110, "systolic_bp", 1),
    ("systolic_bp", 111, "systolic_bp", 0), ("systolic_bp", 219, "systolic_bp", 0),
    ("systolic_bp", 219.5, "systolic_bp", 3), ("systolic_bp", 220, "systolic_bp", 3),
    ("pulse", 30, "pulse", 3), ("pulse", 40, "pulse", 3), ("pulse", 41, "pulse", 1),
    ("pulse", 50, "pulse", 1), ("pulse", 51, "pulse", 0), ("pulse", 90, "pulse", 0),
    ("pulse", 91, "pulse", 1), ("pulse", 110, "pulse", 1), ("pulse", 111, "pulse", 2),
    ("pulse", 130, "pulse", 2), ("pulse", 131, "pulse", 3),
    ("temperature", 34.0, "temperature", 3), ("temperature", 35.0, "temperature", 3),
    ("temperature", 35.05, "temperature", 1), ("temperature", 35.1, "temperature", 1),
    ("temperature", 36.0, "temperature", 1), ("temperature", 36.05, "temperature", 0),
    ("temperature", 36.1, "temperature", 0), ("temperature", 38.0, "temperature", 0),
    ("temperature", 38.05, "temperature", 1), ("temperature", 38.1, "temperature", 1),
    ("temperature", 39.0, "temperature", 1), ("temperature", 39.05, "temperature", 2),
    ("temperature", 39.1, "temperature", 2), ("temperature", 41.0, "temperature", 2),
    # 100.4 °F converted this way is 38.00000000000001 in floating point; charted as 38.0.
    ("temperature", (100.4 - 32) * (5 / 9), "temperature", 0),
    ("on_oxygen", False, "air_or_oxygen", 0), ("on_oxygen", True, "air_or_oxygen", 2),
    ("alert", True, "consciousness", 0), ("alert", False, "consciousness", 3),
]


@pytest.mark.parametrize("arg,value,param,expected", EDGES)
def test_band_edges(arg: str, value: float, param: str, expected: int) -> None:
    r = score(**{arg: value})
    assert r.subscores[param][()] == expected
    assert r.total[()] == expected   # every other parameter is normal and on air
    assert r.n_missing[()] == 0


def test_band_edges_vectorised_in_one_call() -> None:
    n = len(EDGES)
    cols = {k: np.full(n, v, dtype=float) for k, v in NORMAL.items()}
    for i, (arg, value, _, _) in enumerate(EDGES):
        cols[arg][i] = value
    r = news2(**cols)
    got = np.array([r.subscores[param][i] for i, (_, _, param, _) in enumerate(EDGES)])
    np.testing.assert_array_equal(got, [e[3] for e in EDGES])
    assert r.total.shape == (n,)


SCALE2 = [  # (spo2, on_oxygen, expected subscore)
    (80, False, 3), (83, False, 3), (84, False, 2), (85, False, 2), (86, False, 1), (87, False, 1),
    (88, False, 0), (92, False, 0), (93, False, 0), (97, False, 0), (100, False, 0),
    (83, True, 3), (84, True, 2), (87, True, 1), (88, True, 0), (92, True, 0), (92.5, True, 1),
    (93, True, 1), (94, True, 1), (95, True, 2), (96, True, 2), (96.5, True, 3), (97, True, 3),
    (100, True, 3),
]


@pytest.mark.parametrize("spo2,on_oxygen,expected", SCALE2)
def test_spo2_scale2_air_vs_oxygen(spo2: float, on_oxygen: bool, expected: int) -> None:
    r = score(spo2=spo2, on_oxygen=on_oxygen, spo2_scale=2)
    assert r.subscores["spo2"][()] == expected
    assert r.total[()] == expected + (2 if on_oxygen else 0)


def test_scale_may_differ_per_patient() -> None:
    r = news2([16, 16], [90, 90], [False, False], [120, 120], [70, 70], [True, True],
              [37, 37], spo2_scale=[1, 2])
    np.testing.assert_array_equal(r.subscores["spo2"], [3, 0])


def test_scale2_needs_oxygen_status_only_from_93() -> None:
    r = score(spo2=[90, 93], on_oxygen=None, spo2_scale=2)
    assert r.subscores["spo2"][0] == 0
    assert math.isnan(r.subscores["spo2"][1])
    np.testing.assert_array_equal(r.n_missing, [1, 2])   # air_or_oxygen, and spo2 at 93


def test_bad_scale_rejected() -> None:
    with pytest.raises(BadRequest):
        score(spo2_scale=3)


@pytest.mark.parametrize("changes,total,band", [
    ({}, 0, "low"),
    ({"resp_rate": 22, "temperature": 39.5}, 4, "low"),
    ({"resp_rate": 22, "temperature": 39.5, "systolic_bp": 105}, 5, "medium"),
    ({"resp_rate": 22, "temperature": 39.5, "systolic_bp": 105, "pulse": 95}, 6, "medium"),
    ({"resp_rate": 22, "temperature": 39.5, "systolic_bp": 105, "pulse": 95, "spo2": 94}, 7, "high"),
    ({"resp_rate": 25}, 3, "low-medium"),
    ({"resp_rate": 25, "pulse": 95}, 4, "low-medium"),
    ({"resp_rate": 25, "pulse": 95, "systolic_bp": 105}, 5, "medium"),
    ({"alert": False, "on_oxygen": True, "pulse": 95, "systolic_bp": 105}, 7, "high"),
])
def test_bands(changes: dict, total: int, band: str) -> None:
    r = score(**changes)
    assert r.total[()] == total
    assert r.band[()] == band
    assert r.min_band[()] == band
    expected = CLINICAL_RESPONSE["zero" if total == 0 else band]
    assert r.clinical_response[()] == expected


def test_responses_follow_rcp_chart4() -> None:
    assert "12-hourly" in CLINICAL_RESPONSE["zero"]
    assert "4–6-hourly" in CLINICAL_RESPONSE["low"]
    assert "medical team" in CLINICAL_RESPONSE["low-medium"]
    assert "urgent assessment" in CLINICAL_RESPONSE["medium"]
    assert "Continuous monitoring" in CLINICAL_RESPONSE["high"]


def test_missing_is_never_scored_as_normal() -> None:
    r = score(resp_rate=[np.nan, np.nan, 16], pulse=[95, 135, 95], systolic_bp=[120, 85, 120],
              alert=[True, False, None], temperature=[37, 39.5, 37])
    assert np.all(np.isnan(r.total[:2])) and np.isnan(r.total[2])
    np.testing.assert_array_equal(r.n_missing, [1, 1, 1])
    np.testing.assert_array_equal(r.partial_total, [1, 3 + 3 + 3 + 2, 1])
    assert list(r.band) == [None, None, None]
    assert list(r.clinical_response) == [None, None, None]
    # the partial total is a lower bound: 11 is already "high" whatever is missing
    assert list(r.min_band) == ["low", "high", "low"]
    assert math.isnan(r.subscores["respiration_rate"][0])
    assert math.isnan(r.subscores["consciousness"][2])


def test_missing_with_a_three_is_at_least_low_medium() -> None:
    r = score(temperature=np.nan, pulse=135)
    assert r.band[()] is None
    assert r.min_band[()] == "low-medium"


def test_unknown_oxygen_counts_as_missing_on_scale1() -> None:
    r = score(on_oxygen=None)
    assert r.subscores["spo2"][()] == 0
    assert math.isnan(r.subscores["air_or_oxygen"][()])
    assert r.n_missing[()] == 1 and math.isnan(r.total[()])


def test_all_parameters_reported() -> None:
    assert set(score().subscores) == set(PARAMETERS) and len(PARAMETERS) == 7


def test_alert_from_gcs() -> None:
    np.testing.assert_array_equal(alert_from_gcs([15, 14, 3, np.nan]), [1, 0, 0, np.nan])
    with pytest.raises(BadRequest):
        alert_from_gcs([16])


def test_alert_from_avpu() -> None:
    got = alert_from_avpu(["A", "c", "V", "P", "U", 1, 2, 3, 4, "1", None, "", np.nan, "Alert"])
    np.testing.assert_array_equal(got, [1, 0, 0, 0, 0, 1, 0, 0, 0, 1, np.nan, np.nan, np.nan, 1])
    for bad in ("X", 5, 0, True):
        with pytest.raises(BadRequest):
            alert_from_avpu([bad])


def test_helpers_feed_news2() -> None:
    r = score(alert=alert_from_avpu(["A", "V"]))
    np.testing.assert_array_equal(r.subscores["consciousness"], [0, 3])
