"""Train the deterioration model on PhysioNet/CinC 2012 sets a+b through the FHIR path; write model + card."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..datasets import physionet2012
from ..features import Extractor
from ..mapping import Mapping
from . import metrics, training
from .news2 import news2, alert_from_gcs

log = logging.getLogger(__name__)

ROUNDS = 400
FOLDS = 5
MODERATE_SENSITIVITY = 0.80


def build_dataset(data_dir: Path, mapping: Mapping, sets: tuple[str, ...], limit: int | None,
                  progress: Callable[[int], None] | None = None) -> tuple[Any, np.ndarray, np.ndarray, list[int]]:
    """FHIR resources of every stay → the same Extractor that serving uses (as of each stay's latest data)."""
    extractor = Extractor(mapping)
    labels, saps, ids = [], [], []
    for stay in physionet2012.iter_stays(data_dir, sets=sets, limit=limit):
        extractor.add_all(stay.resources)
        labels.append(int(stay.outcome["in_hospital_death"]))
        saps.append(np.nan if stay.outcome["saps_i"] is None else float(stay.outcome["saps_i"]))
        ids.append(stay.record_id)
        if progress:
            progress(1)
    fs = extractor.finish(as_of=None, patient_ids=[f"p2012-{i}" for i in ids])
    assert fs.patient_ids == [f"p2012-{i}" for i in ids], "extractor rows must follow stay order"
    return fs, np.asarray(labels), np.asarray(saps), ids


def _news2_total(fs: Any) -> tuple[np.ndarray, np.ndarray]:
    inp = fs.news2_inputs
    fio2 = inp["fio2"]
    on_o2 = np.where(np.isnan(fio2), 0.0, (fio2 > 0.21 + 1e-9).astype(float))
    result = news2(inp["resp_rate"], inp["spo2"], on_o2, inp["systolic_bp"], inp["pulse"],
                   alert_from_gcs(np.clip(inp["gcs"], 3, 15)), inp["temperature"])
    return result.partial_total, result.n_missing


def _baseline(score: np.ndarray, y: np.ndarray, splits: list) -> dict[str, Any]:
    """AUROC, cross-fitted event-1 and H for a score that is not a probability (Platt per fold)."""
    prob = training.cross_fitted(lambda s, t: metrics.fit_platt(s, t), metrics.apply_calibration, score, y, splits)
    decision = training.cross_fitted(lambda p, t: metrics.best_event1_threshold(t, p)[0],
                                     lambda thr, p: (p >= thr).astype(float), prob, y, splits)
    return {"auroc": metrics.auroc(y, score), "event1": metrics.event1_score(y, decision),
            "hosmer_lemeshow_h": metrics.hosmer_lemeshow_h(y, prob), "n": int(len(y))}


def evaluate(oof_raw: np.ndarray, y: np.ndarray, splits: list, saps: np.ndarray,
             news2_total: np.ndarray) -> dict[str, Any]:
    calibrated = training.cross_fitted(metrics.fit_isotonic, metrics.apply_calibration, oof_raw, y, splits)
    decision = training.cross_fitted(lambda p, t: metrics.best_event1_threshold(t, p)[0],
                                     lambda thr, p: (p >= thr).astype(float), calibrated, y, splits)
    ours = {"auroc": metrics.auroc(y, oof_raw), "event1": metrics.event1_score(y, decision),
            "hosmer_lemeshow_h": metrics.hosmer_lemeshow_h(y, calibrated), "brier": metrics.brier(y, calibrated),
            "n": int(len(y)), "deaths": int(y.sum())}
    has_saps = ~np.isnan(saps)
    sub_splits = _subset_splits(splits, has_saps)
    ours_on_saps = {"auroc": metrics.auroc(y[has_saps], oof_raw[has_saps]), "n": int(has_saps.sum())}
    return {
        "model": ours,
        "model_on_saps_stays": ours_on_saps,
        "saps_i": _baseline(saps[has_saps], y[has_saps], sub_splits),
        "news2": _baseline(news2_total, y, splits),
        "calibration_table": metrics.calibration_table(y, calibrated),
    }


def _subset_splits(splits: list, mask: np.ndarray) -> list:
    new_index = np.cumsum(mask) - 1
    return [(new_index[tr[mask[tr]]], new_index[te[mask[te]]]) for tr, te in splits]


def train(data_dir: Path | str, out_dir: Path | str, mapping: Mapping, *, seed: int = 2012,
          sets: tuple[str, ...] = ("a", "b"), limit: int | None = None, rounds: int = ROUNDS,
          folds: int = FOLDS, command: str = "", progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = [data_dir / f"set-{s}.tar.gz" for s in sets] + [data_dir / f"Outcomes-{s}.txt" for s in sets]
    files.append(data_dir / "holdout-ids.txt")
    data_hashes = training.file_sha256(files)
    fs, y, saps, ids = build_dataset(data_dir, mapping, sets, limit, progress)
    X, names = fs.X, mapping.feature_names
    params = training.lgb_params("binary", seed)
    splits = training.folds(y, folds, seed)
    log.info("training deterioration on %d stays (%d deaths), %d features", len(y), y.sum(), len(names))
    oof = training.out_of_fold(params, X, y, names, rounds, splits)
    news2_total, news2_missing = _news2_total(fs)
    results = evaluate(oof, y, splits, saps, news2_total)
    results["news2"]["complete_stays"] = int((news2_missing == 0).sum())

    calibration = metrics.fit_isotonic(oof, y)
    calibrated = metrics.apply_calibration(calibration, oof)
    high, best = metrics.best_event1_threshold(y, calibrated)
    order = np.sort(calibrated[y == 1])
    moderate = float(order[int(np.floor((1 - MODERATE_SENSITIVITY) * len(order)))])
    if moderate >= high:
        moderate = high / 2
    booster = training.fit(params, X, y, names, rounds)
    version_hash = training.combined_hash({"data": data_hashes, "mapping": mapping.digest, "params": params,
                                           "rounds": rounds, "folds": folds, "sets": sets, "limit": limit,
                                           # how probabilities are made: a change gives another version
                                           "calibration": "isotonic, Laplace end blocks",
                                           "env": training.environment()["lightgbm"]})
    version = f"{mapping.version}.{version_hash[:10]}"
    importance = dict(zip(names, booster.feature_importance("gain").tolist()))
    card = {
        "model": "deterioration", "version": version, "kind": "binary",
        "title": "In-hospital mortality of adult ICU stays (deterioration)",
        "intended_use": ("Decision support for clinicians caring for adult inpatients (ICU-like monitoring): "
                         "flags patients whose recorded vital signs and labs resemble those of ICU stays "
                         "that ended in death. It augments, never replaces, clinical judgement and NEWS2."),
        "outcome": {"system": "http://snomed.info/sct", "code": "419099009", "display": "Dead",
                    "time_frame": "until hospital discharge"},
        "probability_convention": "probabilityDecimal is a calibrated probability in 0-1 (not percent).",
        "features": names,
        "mapping": training.mapping_record(mapping),
        "calibration": calibration,
        "thresholds": {"moderate": moderate, "high": float(high),
                       "rule": (f"high: calibrated probability >= the threshold maximising event-1 "
                                f"(min of sensitivity and PPV) on out-of-fold predictions ({best:.3f}); "
                                f"moderate: the probability at which {MODERATE_SENSITIVITY:.0%} of deaths are "
                                "flagged out of fold; low below that.")},
        "training": {"data": "PhysioNet/CinC 2012 sets " + ", ".join(sets) + " (set-c is held out and never read)",
                     "stays": int(len(y)), "deaths": int(y.sum()), "data_sha256": data_hashes,
                     "seed": seed, "folds": folds, "rounds": rounds, "params": params, "limit": limit,
                     "as_of": "each stay's latest observation (the first 48 h of the ICU stay)",
                     "command": command, "environment": training.environment()},
        "metrics": results,
        "top_features_by_gain": sorted(importance, key=importance.get, reverse=True)[:15],
        "limitations": [
            "Trained on one US academic centre's ICU stays (MIMIC-II, 2001-2008); Korean regional wards differ "
            "in case mix, charting frequency and units. Validate locally before clinical use.",
            "The outcome is in-hospital death, not every form of deterioration (ICU transfer, arrest).",
            "Features summarise the last 48 h before the as-of time; patients with few recorded values get "
            "an explicit 'insufficient data' answer instead of a score.",
            "Invasive and non-invasive blood pressures are pooled so that wards without arterial lines are served.",
            "Cross-validated figures come from sets a and b; the held-out set-c was not used for anything.",
        ],
    }
    from .card import deterioration_markdown
    training.write_artefacts(out_dir, booster, card, deterioration_markdown(card))
    return card
