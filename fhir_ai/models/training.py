"""What every training command shares: data hashes, reproducible LightGBM, folds, artefact writing."""
from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any, Iterable

import lightgbm as lgb
import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..mapping import Mapping
from .registry import CARD_FILE, MODEL_FILE

log = logging.getLogger(__name__)


def file_sha256(paths: Iterable[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[Path(path).name] = digest.hexdigest()
    return out


def combined_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def lgb_params(objective: str, seed: int, **extra: Any) -> dict[str, Any]:
    """Fixed, deterministic parameters (same command + data → same trees)."""
    params = {
        "objective": objective, "learning_rate": 0.03, "num_leaves": 15, "min_data_in_leaf": 30,
        "feature_fraction": 0.6, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 2.0,
        "seed": seed, "deterministic": True, "force_row_wise": True, "num_threads": 2, "verbose": -1,
    }
    params.update(extra)
    return params


def fit(params: dict[str, Any], X: np.ndarray, y: np.ndarray, names: list[str], rounds: int) -> lgb.Booster:
    data = lgb.Dataset(X, label=y, feature_name=names, free_raw_data=True, params={"verbose": -1})
    return lgb.train(params, data, num_boost_round=rounds)


def folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def out_of_fold(params: dict[str, Any], X: np.ndarray, y: np.ndarray, names: list[str], rounds: int,
                splits: list[tuple[np.ndarray, np.ndarray]], n_outputs: int = 1) -> np.ndarray:
    """Predictions for every row from a model that never saw it."""
    oof = np.zeros((len(y), n_outputs)) if n_outputs > 1 else np.zeros(len(y))
    for train_idx, test_idx in splits:
        booster = fit(params, X[train_idx], y[train_idx], names, rounds)
        oof[test_idx] = booster.predict(X[test_idx], num_threads=2)
    return oof


def cross_fitted(fit_fn: Any, apply_fn: Any, oof: np.ndarray, y: np.ndarray,
                 splits: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Apply a post-processing step fitted on the other folds only, so its own metrics stay honest."""
    out = np.zeros(len(y))
    for train_idx, test_idx in splits:
        out[test_idx] = apply_fn(fit_fn(oof[train_idx], y[train_idx]), oof[test_idx])
    return out


def mapping_record(mapping: Mapping) -> dict[str, Any]:
    """The card's ``mapping``: which file the model was trained with, and the unit of each input its
    features read (a served mapping must keep those units; see registry.mapping_problems)."""
    return {"file": mapping.path.name, "version": mapping.version, "digest": mapping.digest,
            "units": mapping.feature_units}


def environment() -> dict[str, str]:
    import sklearn
    return {"python": platform.python_version(), "lightgbm": lgb.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__}


def write_artefacts(out_dir: Path, booster: lgb.Booster, card: dict[str, Any], card_markdown: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_dir / MODEL_FILE))
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "MODEL_CARD.md").write_text(card_markdown, encoding="utf-8")
    return out_dir
