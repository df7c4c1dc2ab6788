"""Train the KTAS triage model on the KTAS training visits through the FHIR path; write model + card."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import ktas
from ..features import Extractor, FeatureSet
from ..mapping import Mapping
from . import metrics, training

log = logging.getLogger(__name__)

ROUNDS = 300
FOLDS = 5
LEVELS = [1, 2, 3, 4, 5]
BETAS = [1.0, 1.15, 1.3, 1.45, 1.6, 1.8, 2.0, 2.3, 2.6, 3.0]


def urgency_weights(beta: float) -> np.ndarray:
    """Weights for levels 1..5: beta**4 … 1 (more urgent levels count more in the decision)."""
    return beta ** np.arange(4, -1, -1, dtype=float)


def decide(probabilities: np.ndarray, beta: float) -> np.ndarray:
    """Predicted KTAS level (1..5) from class probabilities and the urgency weighting."""
    return (probabilities * urgency_weights(beta)).argmax(axis=1) + 1


def mistriage_probabilities(probabilities: np.ndarray, nurse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(true level more urgent than the nurse's) = under-triage, P(less urgent) = over-triage."""
    levels = np.arange(1, 6)
    under = (probabilities * (levels[None, :] < nurse[:, None])).sum(axis=1)
    over = (probabilities * (levels[None, :] > nurse[:, None])).sum(axis=1)
    return under, over


def choose_beta(probabilities: np.ndarray, y: np.ndarray, target_under: float) -> float:
    """The smallest urgency weighting whose under-triage rate is at most the target (else the largest)."""
    for beta in BETAS:
        if metrics.triage_error_rates(y, decide(probabilities, beta))["under"] <= target_under:
            return beta
    return BETAS[-1]


def choose_flag_threshold(p_under: np.ndarray, nurse_under: np.ndarray) -> float:
    """Threshold on P(under-triage) with the best F1 for finding the nurse's under-triaged visits."""
    best, threshold = -1.0, 0.5
    for t in np.unique(np.round(p_under, 3)):
        flag = p_under >= t
        tp = float((flag & nurse_under).sum())
        if tp == 0:
            continue
        f1 = 2 * tp / (flag.sum() + nurse_under.sum())
        if f1 > best:
            best, threshold = f1, float(t)
    return threshold


def summary(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    rates = metrics.triage_error_rates(y, pred)
    return {"exact_accuracy": metrics.exact_accuracy(y, pred),
            "kappa_linear": metrics.weighted_kappa(y, pred, "linear", labels=LEVELS),
            "kappa_quadratic": metrics.weighted_kappa(y, pred, "quadratic", labels=LEVELS),
            "under_triage": rates["under"], "over_triage": rates["over"],
            "emergency_agreement": float(np.mean((y <= 3) == (pred <= 3)))}


def build_dataset(data_dir: Path, mapping: Mapping, limit: int | None) -> tuple[FeatureSet, np.ndarray, np.ndarray]:
    extractor = Extractor(mapping)
    expert, nurse, ids = [], [], []
    for visit in ktas.iter_visits(data_dir, limit=limit):
        extractor.add_all(visit.resources)
        expert.append(int(visit.label["ktas_expert"]))
        nurse.append(int(visit.label["ktas_rn"]))
        ids.append(f"ktas-{visit.row_id}")
    fs = extractor.finish(as_of=None, patient_ids=ids)
    assert fs.patient_ids == ids
    return fs, np.asarray(expert), np.asarray(nurse)


def train(data_dir: Path | str, out_dir: Path | str, mapping: Mapping, *, seed: int = 2019,
          limit: int | None = None, rounds: int = ROUNDS, folds: int = FOLDS, command: str = "") -> dict[str, Any]:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data_hashes = training.file_sha256([data_dir / "train.csv", data_dir / "holdout-ids.txt"])
    fs, y, nurse = build_dataset(data_dir, mapping, limit)
    X, names = fs.X, mapping.feature_names
    params = training.lgb_params("multiclass", seed, num_class=5, num_leaves=7, min_data_in_leaf=10)
    splits = training.folds(y, folds, seed)
    oof = training.out_of_fold(params, X, y - 1, names, rounds, splits, n_outputs=5)
    nurse_metrics = summary(y, nurse)
    target = nurse_metrics["under_triage"]

    # Decision rule: weight urgent levels so that under-triage stays at or below the nurse's rate.
    # Cross-fitted: each fold's rule is chosen on the other folds, so the figures below are honest.
    pred_cv = np.zeros(len(y), dtype=int)
    for train_idx, test_idx in splits:
        beta = choose_beta(oof[train_idx], y[train_idx], target)
        pred_cv[test_idx] = decide(oof[test_idx], beta)
    beta = choose_beta(oof, y, target)
    trade_off = [{"beta": b, **summary(y, decide(oof, b))} for b in BETAS]

    nurse_under = nurse > y
    p_under, p_over = mistriage_probabilities(oof, nurse)
    flag_cv = np.zeros(len(y), dtype=bool)
    for train_idx, test_idx in splits:
        t = choose_flag_threshold(p_under[train_idx], nurse_under[train_idx])
        flag_cv[test_idx] = p_under[test_idx] >= t
    flag_threshold = choose_flag_threshold(p_under, nurse_under)
    tp = float((flag_cv & nurse_under).sum())
    second_reader = {
        "auroc_under_triage": metrics.auroc(nurse_under.astype(int), p_under),
        "auroc_over_triage": metrics.auroc((nurse < y).astype(int), p_over),
        "flag_threshold": flag_threshold,
        "flag_rate": float(flag_cv.mean()),
        "flag_sensitivity": tp / max(1.0, float(nurse_under.sum())),
        "flag_ppv": tp / max(1.0, float(flag_cv.sum())),
        "nurse_under_triaged": int(nurse_under.sum()),
    }
    booster = training.fit(params, X, y - 1, names, rounds)
    version_hash = training.combined_hash({"data": data_hashes, "mapping": mapping.digest, "params": params,
                                           "rounds": rounds, "folds": folds, "limit": limit,
                                           "env": training.environment()["lightgbm"]})
    version = f"{mapping.version}.{version_hash[:10]}"
    importance = dict(zip(names, booster.feature_importance("gain").tolist()))
    card = {
        "model": "triage", "version": version, "kind": "multiclass", "classes": ["1", "2", "3", "4", "5"],
        "title": "KTAS triage level at emergency department arrival",
        "intended_use": ("A second opinion for the triage nurse in Korean emergency departments, within a second "
                         "of the arrival vital signs being recorded: a KTAS level, the probability of each level, "
                         "and - when the nurse's level is known - the probability that it is an under- or "
                         "over-triage. It never replaces the nurse's level."),
        "probability_convention": ("probabilityDecimal per level is the model's class probability (0-1). The "
                                   "predicted level is the one with the highest urgency-weighted probability; "
                                   "it is marked with qualitativeRisk 'high' (see decision rule)."),
        "features": names,
        "mapping": training.mapping_record(mapping),
        "decision": {"beta": beta, "weights": urgency_weights(beta).tolist(),
                     "rule": (f"level = argmax(p_k * w_k) with w = beta^(5-k), beta {beta}: the smallest weighting "
                              f"whose out-of-fold under-triage rate is at most the nurses' "
                              f"({target:.3f}) on the same visits"),
                     "trade_off": trade_off},
        "second_reader": second_reader,
        "training": {"data": "KTAS train.csv (Moon et al. 2019), holdout rows excluded",
                     "visits": int(len(y)), "data_sha256": data_hashes, "seed": seed, "folds": folds,
                     "rounds": rounds, "params": params, "limit": limit, "command": command,
                     "environment": training.environment(),
                     "nurse_level_used_as_input": False},
        "metrics": {"model_argmax": summary(y, oof.argmax(axis=1) + 1), "model": summary(y, pred_cv),
                    "nurse": nurse_metrics, "n": int(len(y))},
        "top_features_by_gain": sorted(importance, key=importance.get, reverse=True)[:15],
        "limitations": [
            "950 visits from two Korean EDs (2016-2017): small, and the model is far less accurate than "
            "experienced triage nurses; use it as a second reader, never as the triage.",
            "The chief complaint is read through keyword categories (English and Korean) in the mapping; "
            "unrecognised text contributes nothing.",
            "SpO2 was recorded at only one of the two EDs; missing values are handled, but accuracy without "
            "SpO2 is lower.",
            "Probabilities come from a multiclass model on few rare-level examples (KTAS 1: 20 visits).",
        ],
    }
    from .card import triage_markdown
    training.write_artefacts(out_dir, booster, card, triage_markdown(card))
    return card
