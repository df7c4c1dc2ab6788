"""Metrics: hand-checked values, the PhysioNet 2012 scoring rules, KTAS anchor, calibration maps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from fhir_ai.errors import BadRequest
from fhir_ai.models.metrics import (apply_calibration, auroc, best_event1_threshold, brier,
                                    calibration_table, event1_score, exact_accuracy, fit_isotonic,
                                    fit_platt, hosmer_lemeshow_h, triage_error_rates,
                                    weighted_kappa)

KTAS_TRAIN = Path("/work/shared/data/ktas/train.csv")


def test_auroc_and_brier_by_hand() -> None:
    # pairs (neg, pos): (.1,.35) (.1,.8) (.4,.35)x (.4,.8) → 3 of 4 ranked right
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))
    assert brier([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    with pytest.raises(BadRequest):
        brier([0, 1], [0.2, 60])   # percentages are refused


def test_event1_by_hand() -> None:
    # TP 2, FN 1, FP 3: Se 2/3, PPV 2/5
    assert event1_score([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 1, 0, 0]) == pytest.approx(0.4)
    # nothing predicted positive: PPV is 0/0, MATLAB's min ignores NaN, Se = 0 wins
    assert event1_score([1, 0, 0], [0, 0, 0]) == 0.0
    assert math.isnan(event1_score([0, 0], [0, 0]))


HAND_Y = [0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
HAND_P = [0.1, 0.1, 0.2, 0.2, 0.5, 0.5, 0.8, 0.8, 0.9, 0.9]
# M = 1: one record per decile. Σ (O-E)²/(E(1-E)+0.001), divided by 0.9 - 0.1:
HAND_H = ((0.01 + 0.81 + 0.01 + 0.01) / 0.091 + 4 * 0.04 / 0.161 + (0.25 + 0.25) / 0.251) / 0.8


def test_hosmer_lemeshow_h_by_hand() -> None:
    assert HAND_H == pytest.approx(15.27074, abs=1e-4)
    assert hosmer_lemeshow_h(HAND_Y, HAND_P) == pytest.approx(HAND_H, rel=1e-12)
    # order of the input does not matter
    rev = slice(None, None, -1)
    assert hosmer_lemeshow_h(HAND_Y[rev], HAND_P[rev]) == pytest.approx(HAND_H, rel=1e-12)


def test_hosmer_lemeshow_drops_the_highest_risk_remainder() -> None:
    # 12 records → M = floor(12/10) = 1; lemeshow.m never looks at the two highest risks.
    y = HAND_Y + [0, 0]
    p = HAND_P + [0.95, 0.99]
    assert hosmer_lemeshow_h(y, p) == pytest.approx(HAND_H, rel=1e-12)


def _lemeshow_m(y: np.ndarray, p: np.ndarray) -> float:
    """Line-by-line port of the challenge's lemeshow.m, as an independent reference."""
    data = sorted(zip(p.tolist(), y.tolist()), key=lambda r: r[0])   # stable, like sortrows
    n, d = len(data), 10
    m = n // d
    total, centroid = 0.0, []
    for i in range(1, d + 1):
        ind2 = i * m
        ind1 = ind2 - m + 1
        rows = data[ind1 - 1:ind2]
        obs = sum(r[1] for r in rows)
        c = sum(r[0] for r in rows) / m
        centroid.append(c)
        exp = m * c
        total += (obs - exp) ** 2 / (m * c * (1 - c) + 0.001)
    return total / (centroid[9] - centroid[0])


def test_hosmer_lemeshow_matches_a_port_of_lemeshow_m() -> None:
    rng = np.random.default_rng(7)
    p = np.round(rng.beta(1, 6, size=4003), 3)   # rounded: plenty of ties, N not a multiple of 10
    y = (rng.random(4003) < p * 1.3).astype(int)
    assert hosmer_lemeshow_h(y, p) == pytest.approx(_lemeshow_m(y, p), rel=1e-10)


def test_hosmer_lemeshow_needs_ten_records() -> None:
    with pytest.raises(BadRequest):
        hosmer_lemeshow_h([0, 1], [0.1, 0.2])


def test_best_event1_threshold_by_hand() -> None:
    y = [0, 0, 1, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # t=.3 keeps 4 with 3 deaths: Se 1, PPV .75; every other cut scores less
    assert best_event1_threshold(y, p) == (0.3, 0.75)


def test_best_event1_threshold_agrees_with_brute_force_with_ties() -> None:
    rng = np.random.default_rng(3)
    p = np.round(rng.random(300), 1)
    y = (rng.random(300) < p).astype(int)
    t, s = best_event1_threshold(y, p)
    brute = {float(c): event1_score(y, (p >= c).astype(int)) for c in np.unique(p)}
    assert s == pytest.approx(max(brute.values()))
    assert brute[t] == pytest.approx(s)
    assert t == max(c for c, v in brute.items() if v == pytest.approx(s))


def test_calibration_table() -> None:
    rows = calibration_table([0, 1, 0, 1, 1], [0.9, 0.1, 0.2, 0.8, 0.7], bins=2)
    assert [r["n"] for r in rows] == [3, 2]
    assert rows[0]["mean_predicted"] == pytest.approx((0.1 + 0.2 + 0.7) / 3)
    assert rows[0]["observed_events"] == 2 and rows[1]["observed_events"] == 1
    assert rows[1]["p_min"] == 0.8 and rows[1]["p_max"] == 0.9
    json.dumps(rows)


def test_triage_error_rates_three_rows() -> None:
    # row 1 predicted 4 for a true 3: under-triage; row 2 predicted 2 for 3: over; row 3 right
    assert triage_error_rates([3, 3, 2], [4, 2, 2]) == {"under": pytest.approx(1 / 3),
                                                        "over": pytest.approx(1 / 3)}
    assert triage_error_rates([1, 5], [2, 5]) == {"under": 0.5, "over": 0.0}


def test_kappa_by_hand_and_against_sklearn() -> None:
    # po = .75; marginals (.5,.5) and (.25,.75) → pe = .5 → kappa .5 (two levels: weights irrelevant)
    assert weighted_kappa([1, 1, 2, 2], [1, 2, 2, 2]) == pytest.approx(0.5)
    t = [1, 2, 3, 4, 5, 3, 3, 2, 4, 4]
    q = [1, 3, 3, 5, 5, 2, 3, 2, 3, 4]
    for w in ("linear", "quadratic", None):
        assert weighted_kappa(t, q, w) == pytest.approx(cohen_kappa_score(t, q, weights=w))
    assert weighted_kappa(t, q, "quadratic") != pytest.approx(weighted_kappa(t, q, "linear"))
    assert exact_accuracy(t, q) == pytest.approx(0.6)   # positions 1, 3, 5, 7, 8, 10
    with pytest.raises(BadRequest):
        weighted_kappa(t, q, "cubic")


@pytest.mark.skipif(not KTAS_TRAIN.exists(), reason="shared KTAS data not mounted")
def test_ktas_nurse_vs_expert_anchor() -> None:
    import csv

    with open(KTAS_TRAIN, encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=";"))
    assert len(rows) == 950
    expert = np.array([int(r["KTAS_expert"]) for r in rows])
    nurse = np.array([int(r["KTAS_RN"]) for r in rows])
    mistriage = np.array([int(r["mistriage"]) for r in rows])
    assert round(exact_accuracy(expert, nurse), 3) == 0.849
    assert round(weighted_kappa(expert, nurse, "linear"), 3) == 0.824
    # the data set's own mistriage column: 2 = under-triage, 1 = over-triage
    rates = triage_error_rates(expert, nurse)
    assert rates["under"] == pytest.approx(np.mean(mistriage == 2))
    assert rates["over"] == pytest.approx(np.mean(mistriage == 1))


@pytest.fixture
def noisy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    raw = rng.normal(size=3000)
    y = (rng.random(3000) < 1 / (1 + np.exp(-(1.5 * raw - 1)))).astype(int)
    return raw, y


def test_isotonic_is_monotone_bounded_and_survives_json(noisy) -> None:
    from sklearn.isotonic import IsotonicRegression

    raw, y = noisy
    params = json.loads(json.dumps(fit_isotonic(raw, y)))
    grid = np.linspace(-5, 5, 2001)
    out = apply_calibration(params, grid)
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(raw, y)
    # the same knots; the same values except an end block's 0 or 1 (Laplace instead, next test)
    np.testing.assert_allclose(params["x"], iso.X_thresholds_, atol=0)
    certain = (iso.y_thresholds_ == 0) | (iso.y_thresholds_ == 1)
    np.testing.assert_allclose(np.asarray(params["y"])[~certain], iso.y_thresholds_[~certain], atol=1e-12)
    assert certain.any() and out.min() > 0 and out.max() < 1
    # between knots that are not an end block's, the map is sklearn's
    x = iso.X_thresholds_
    inner = (grid >= x[~certain].min()) & (grid <= x[~certain].max())
    np.testing.assert_allclose(out[inner], iso.predict(grid)[inner], atol=1e-12)


def test_isotonic_end_blocks_get_laplace_not_certainty() -> None:
    # The 40 lowest scores have no event and the 30 highest all have it: plain isotonic regression says
    # 0 and 1 there, which a RiskAssessment would state as probabilityDecimal 0 (or 1).
    rng = np.random.default_rng(5)
    raw = np.concatenate([np.linspace(-3, -2, 40), rng.uniform(-1, 1, 200), np.linspace(2, 3, 30)])
    y = np.concatenate([np.zeros(40), (rng.random(200) < 0.5).astype(float), np.ones(30)])
    plain = np.asarray(__import__("sklearn.isotonic", fromlist=["IsotonicRegression"]).IsotonicRegression(
        out_of_bounds="clip", y_min=0, y_max=1).fit(raw, y).predict(raw))
    n_low, n_high = int(np.sum(plain == 0)), int(np.sum(plain == 1))
    assert n_low >= 40 and n_high >= 30          # the fixture does make end blocks of certainty
    params = json.loads(json.dumps(fit_isotonic(raw, y)))
    out = apply_calibration(params, np.array([-10.0, -3.0, 3.0, 10.0]))
    assert out[0] == out[1] == pytest.approx(1 / (n_low + 2))
    assert out[2] == out[3] == pytest.approx((n_high + 1) / (n_high + 2))
    assert params["ends"]["low"] == {"cases": n_low, "events": 0, "probability": pytest.approx(1 / (n_low + 2)),
                                     "held_at_next_block": False}
    assert params["ends"]["high"]["cases"] == n_high
    grid = apply_calibration(params, np.linspace(-4, 4, 801))
    assert np.all(np.diff(grid) >= 0)


def test_isotonic_floor_stays_below_the_next_block() -> None:
    raw = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    params = fit_isotonic(raw, [0, 0, 0, 0, 1])        # four cases without the event, then one with it
    assert params["y"] == [pytest.approx(1 / 6), pytest.approx(1 / 6), pytest.approx(2 / 3)]
    assert params["ends"]["low"]["cases"] == 4 and not params["ends"]["low"]["held_at_next_block"]
    assert params["ends"]["high"]["cases"] == 1 and not params["ends"]["high"]["held_at_next_block"]
    # One case without the event below a block of rate 1/5: Laplace's 1/3 would exceed that block, so the
    # floor is held at its value and the map stays non-decreasing.
    held = fit_isotonic(np.arange(6.0), [0, 1, 0, 0, 0, 0])
    assert held["ends"]["low"] == {"cases": 1, "events": 0, "probability": pytest.approx(0.2),
                                   "held_at_next_block": True}
    assert np.all(np.diff(held["y"]) >= 0) and min(held["y"]) == pytest.approx(0.2)
    all_zero = fit_isotonic([0.0, 1.0, 2.0], [0, 0, 0])
    assert all_zero["y"] == [pytest.approx(1 / 5)] * len(all_zero["y"]) and "high" not in all_zero["ends"]


def test_platt_by_hand_and_against_logistic_regression(noisy) -> None:
    from sklearn.linear_model import LogisticRegression

    # separable: smoothed targets 3/4 and 1/4 are hit exactly → a = 2·ln 3, b = -ln 3
    sep = fit_platt([0, 0, 1, 1], [0, 0, 1, 1])
    assert sep["a"] == pytest.approx(2 * math.log(3)) and sep["b"] == pytest.approx(-math.log(3))
    raw, y = noisy
    params = json.loads(json.dumps(fit_platt(raw, y)))
    lr = LogisticRegression(C=1e12).fit(raw[:, None], y)
    assert params["a"] == pytest.approx(lr.coef_[0, 0], abs=0.02)
    assert params["b"] == pytest.approx(lr.intercept_[0], abs=0.02)
    out = apply_calibration(params, np.linspace(-5, 5, 101))
    assert np.all(np.diff(out) > 0) and out.min() > 0 and out.max() < 1


def test_platt_on_logit_of_probabilities(noisy) -> None:
    raw, y = noisy
    prob = 1 / (1 + np.exp(-raw))
    params = json.loads(json.dumps(fit_platt(prob, y, logit_input=True)))
    assert params["a"] == pytest.approx(fit_platt(raw, y)["a"], rel=1e-6)
    np.testing.assert_allclose(apply_calibration(params, prob),
                               apply_calibration(fit_platt(raw, y), raw), atol=1e-9)


def test_unknown_calibration_kind() -> None:
    with pytest.raises(BadRequest):
        apply_calibration({"kind": "pickle"}, [0.5])


def test_shipped_deterioration_card_states_no_certainty() -> None:
    # The served model's calibration: the lowest and highest raw scores give neither 0 nor 1 (before the
    # Laplace ends, the 684 lowest-scored training stays were calibrated to probabilityDecimal 0).
    from pathlib import Path
    card = json.loads((Path(__file__).parents[1] / "fhir_ai/models/trained/deterioration/card.json").read_text())
    out = apply_calibration(card["calibration"], np.array([-1e9, 0.0, 1.0, 1e9]))
    assert 0 < out.min() and out.max() < 1
    assert card["calibration"]["ends"]["low"]["cases"] > 0
