"""Tabulated TreeSHAP gives LightGBM's own pred_contrib, for the trained models and small made-up ones."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from fhir_ai.models import treeshap
from fhir_ai.models.treeshap import K_ZERO_THRESHOLD, TreeExplainer

TRAINED = Path(__file__).resolve().parents[1] / "fhir_ai" / "models" / "trained"


def _nodes(booster: lgb.Booster) -> list[dict[str, Any]]:
    found = []
    for tree in booster.dump_model()["tree_info"]:
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_index" in node:
                found.append(node)
                stack += [node["left_child"], node["right_child"]]
    return found


def _rows(booster: lgb.Booster, n: int, seed: int) -> np.ndarray:
    """Rows whose values sit on, just below and just above the model's thresholds, with NaN and 0 mixed
    in, plus an all-NaN row, an all-zero row and rows at +-inf."""
    rng = np.random.default_rng(seed)
    width = booster.num_feature()
    thresholds: dict[int, list[float]] = {}
    for node in _nodes(booster):
        thresholds.setdefault(node["split_feature"], []).append(node["threshold"])
    X = rng.normal(size=(n, width))
    for f, values in thresholds.items():
        t = rng.choice(values, size=n)
        X[:, f] = np.choose(rng.integers(0, 3, size=n), [np.nextafter(t, -np.inf), t, np.nextafter(t, np.inf)])
    X[rng.random(X.shape) < 0.15] = np.nan
    X[rng.random(X.shape) < 0.05] = 0.0
    X[rng.random(X.shape) < 0.02] = K_ZERO_THRESHOLD / 2
    special = np.array([np.full(width, np.nan), np.zeros(width), np.full(width, np.inf), np.full(width, -np.inf)])
    return np.vstack([X, special])


def _check(booster: lgb.Booster, X: np.ndarray) -> None:
    expected = booster.predict(X, pred_contrib=True)
    got = TreeExplainer.from_booster(booster).contributions(X)
    assert got.shape == expected.shape
    # the summation order differs from LightGBM's recursion; 1e-9 is still far below any reported digit
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("model_id", ["deterioration", "triage"])
def test_trained_models_match_lightgbm(model_id: str) -> None:
    path = TRAINED / model_id / "model.txt"
    if not path.exists():
        pytest.skip(f"no trained {model_id} model")
    booster = lgb.Booster(model_file=str(path))
    _check(booster, _rows(booster, 300, seed=len(model_id)))


def _made_up_data(seed: int, zero_as_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-3, 3, size=(1500, 4))
    y = ((np.sin(2 * X[:, 0]) + (np.abs(X[:, 1]) < 1) + 0.3 * X[:, 2] + rng.normal(0, 0.3, 1500)) > 0.8)
    if zero_as_missing:
        X[rng.random(X.shape) < 0.2] = 0.0
    else:
        X[:, :2][rng.random((1500, 2)) < 0.2] = np.nan          # features 2 and 3 never missing: type None
    return X, y.astype(float)


def _train(X: np.ndarray, y: np.ndarray, **params: Any) -> lgb.Booster:
    params = {"objective": "binary", "num_leaves": 12, "min_data_in_leaf": 10, "learning_rate": 0.2,
              "verbosity": -1, "num_threads": 1, "seed": 7, **params}
    return lgb.train(params, lgb.Dataset(X, y), num_boost_round=25)


def _paths_repeat_a_feature(booster: lgb.Booster) -> bool:
    def walk(node: dict[str, Any], seen: frozenset[int]) -> bool:
        if "split_index" not in node:
            return False
        f = node["split_feature"]
        return f in seen or walk(node["left_child"], seen | {f}) or walk(node["right_child"], seen | {f})
    return any(walk(tree["tree_structure"], frozenset()) for tree in booster.dump_model()["tree_info"])


def test_made_up_model_with_missing_values_and_repeated_features() -> None:
    X, y = _made_up_data(seed=1)
    booster = _train(X, y)
    nodes = _nodes(booster)
    # the model exercises what the test is about
    assert _paths_repeat_a_feature(booster)
    assert {(n["missing_type"], n["default_left"]) for n in nodes} >= {("NaN", True), ("NaN", False)}
    assert "None" in {n["missing_type"] for n in nodes}
    _check(booster, _rows(booster, 200, seed=2))


def test_zero_as_missing_model() -> None:
    X, y = _made_up_data(seed=3, zero_as_missing=True)
    booster = _train(X, y, zero_as_missing=True)
    assert "Zero" in {n["missing_type"] for n in _nodes(booster)}
    _check(booster, _rows(booster, 200, seed=4))


def test_multiclass_layout_and_one_row() -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(600, 3))
    y = np.digitize(X[:, 0] + 0.5 * X[:, 1], [-1, 0, 1])
    booster = lgb.train({"objective": "multiclass", "num_class": 4, "num_leaves": 6, "verbosity": -1,
                         "num_threads": 1, "min_data_in_leaf": 5}, lgb.Dataset(X, y), num_boost_round=10)
    explainer = TreeExplainer.from_booster(booster)
    expected = booster.predict(X[:50], pred_contrib=True)
    assert explainer.contributions(X[:50]).shape == expected.shape == (50, 4 * 4)
    np.testing.assert_allclose(explainer.row(X[7]), expected[7].reshape(4, 4), rtol=0, atol=1e-9)
    assert explainer.nbytes > 0


def test_one_leaf_tree_is_only_a_bias() -> None:
    X = np.random.default_rng(6).normal(size=(200, 3))
    booster = lgb.train({"objective": "regression", "verbosity": -1, "num_threads": 1},
                        lgb.Dataset(X, np.full(200, 2.5)), num_boost_round=3)
    assert "split_index" not in booster.dump_model()["tree_info"][0]["tree_structure"]
    _check(booster, X[:20])


def test_categorical_splits_are_refused() -> None:
    rng = np.random.default_rng(8)
    X = np.column_stack([rng.integers(0, 6, 500), rng.normal(size=500)])
    y = (X[:, 0] % 2 == 0).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1, "min_data_in_leaf": 5},
                        lgb.Dataset(X, y, categorical_feature=[0]), num_boost_round=3)
    with pytest.raises(NotImplementedError, match="categorical"):
        TreeExplainer.from_booster(booster)


def test_rows_must_have_the_models_width() -> None:
    X, y = _made_up_data(seed=9)
    explainer = TreeExplainer.from_booster(_train(X, y))
    with pytest.raises(ValueError, match="4 features"):
        explainer.contributions(X[:3, :3])


def _group_kinds(booster: lgb.Booster) -> dict[str, int]:
    """How treeshap groups the model's leaves: groups of nodes, single leaves, and single leaves with a
    feature whose nodes lie in two chunks of 8 (they need a bit per feature and chunk)."""
    kinds = {"nodes": 0, "leaf": 0, "leaf across chunks": 0}
    for tree in booster.dump_model()["tree_info"]:
        for nodes, leaves in treeshap._groups(tree["tree_structure"]):
            kinds["nodes" if nodes else "leaf"] += 1
            chunks: dict[int, set[int]] = {}
            for node, feature, _, _ in leaves[0][3]:
                chunks.setdefault(feature, set()).add(node // 8)
            kinds["leaf across chunks"] += not nodes and any(len(c) > 1 for c in chunks.values())
    return kinds


@pytest.mark.parametrize("memory_weight", [0.0, treeshap.MEMORY_WEIGHT, 1e9])
def test_any_grouping_of_leaves_gives_lightgbms_values(memory_weight: float, monkeypatch) -> None:
    """Deep trees on few features: large groups of nodes (weight 0), the default mix, and mostly single
    leaves (weight 1e9), whose repeated features span chunks, all equal pred_contrib."""
    X, y = _made_up_data(seed=11)
    booster = _train(X, y, num_leaves=40, min_data_in_leaf=5)
    monkeypatch.setattr(treeshap, "MEMORY_WEIGHT", memory_weight)
    kinds = _group_kinds(booster)
    assert kinds["nodes"] > 0 and kinds["leaf across chunks"] > 0
    if memory_weight == 0.0:
        assert kinds["nodes"] > kinds["leaf"]
    if memory_weight == 1e9:
        assert kinds["leaf"] > 5 * kinds["nodes"]
    _check(booster, _rows(booster, 200, seed=12))


def test_rows_explained_from_several_threads_at_once() -> None:
    X, y = _made_up_data(seed=13)
    booster = _train(X, y)
    explainer = TreeExplainer.from_booster(booster)
    rows = _rows(booster, 200, seed=14)
    expected = explainer.contributions(rows)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda i: explainer.row(rows[i % len(rows)]), range(8 * len(rows))))
    assert all(np.array_equal(g, expected[i % len(rows)]) for i, g in enumerate(got))


def test_linear_trees_and_oversized_tables_are_refused(monkeypatch) -> None:
    """Linear trees' leaves are not constants (the tables would ignore their coefficients); a model whose
    tables would pass the build budget is refused before anything big is allocated."""
    X, y = _made_up_data(11)
    X = np.nan_to_num(X)                                     # linear trees take no missing values
    with pytest.raises(NotImplementedError, match="linear"):
        TreeExplainer.from_booster(_train(X, y, linear_tree=True))
    booster = _train(X, y)
    monkeypatch.setattr(treeshap, "BUILD_BUDGET_BYTES", 1024)
    with pytest.raises(NotImplementedError, match="MB"):
        TreeExplainer.from_booster(booster)


def test_the_registry_keys_tables_by_the_model_files_content(tmp_path: Path) -> None:
    """A model file replaced in place (same path) gets its own tables, and a copy of a file elsewhere shares
    its tables: the key is the content, not the path or its timestamps."""
    import json
    import os

    from fhir_ai.models.registry import load_model
    X, y = _made_up_data(12)
    first, second = _train(X, y, seed=1), _train(X, y, seed=2, learning_rate=0.3)
    card = {"model": "made-up", "version": "1", "features": first.feature_name(), "kind": "binary"}

    def place(folder: Path, booster: lgb.Booster) -> Path:
        folder.mkdir(exist_ok=True)
        (folder / "model.txt").write_text(booster.model_to_string())
        (folder / "card.json").write_text(json.dumps(card))
        os.utime(folder / "model.txt", ns=(10**18, 10**18))     # the same timestamps every time
        return folder

    a = load_model(place(tmp_path / "a", first))
    replaced = load_model(place(tmp_path / "a", second))
    copied = load_model(place(tmp_path / "b", first))
    assert a.explainer() is copied.explainer() is not replaced.explainer()
    for model, booster in ((a, first), (replaced, second)):
        assert np.allclose(model.contributions(X[:50]), booster.predict(X[:50], pred_contrib=True), rtol=0, atol=1e-9)


@pytest.mark.parametrize("unit, shown", [
    ("mm[Hg]", "92 mmHg"), ("Cel", "38.4 °C"), ("10*3/uL", "12.5 ×10³/µL"), ("/min", "118 /min"),
    ("{score}", "14"), ("[pH]", "7.31"), ("mm[Hg]/h", "-4 mmHg/h"), (None, "3"),
])
def test_a_reason_shows_units_as_clinicians_write_them(unit, shown) -> None:
    from fhir_ai.models.explain import Reason
    value = {"92 mmHg": 92.0, "38.4 °C": 38.4, "12.5 ×10³/µL": 12.5, "118 /min": 118.0, "14": 14.0,
             "7.31": 7.31, "-4 mmHg/h": -4.0, "3": 3.0}[shown]
    assert Reason("f", "Label", value, unit, 0.5).text() == f"Label: {shown} — raised the risk"
