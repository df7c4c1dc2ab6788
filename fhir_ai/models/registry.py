"""Load each model once (LightGBM text file + model card) and check it against its mapping."""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from ..errors import MappingMismatch, ModelError, NotSupported
from ..mapping import Input, Mapping, units
from .metrics import apply_calibration
from .treeshap import TreeExplainer

log = logging.getLogger(__name__)

MODEL_FILE = "model.txt"
CARD_FILE = "card.json"
_EXPLAINER_LOCK = threading.Lock()
_ONE_THREAD_LOCK = threading.RLock()
_SINGLE_ROW_LOCK = threading.Lock()


class SingleRowPredictor:
    """``Booster.predict`` for one row, by LightGBM's single-row fast C API.

    ``Booster.predict`` sets up a predictor on every call (Python checks, a new C++ Predictor and its
    buffers): ≈0.04 ms alone, 0.2-0.3 ms inside a request, where the caches are cold. The fast API sets
    it up once (``LGBM_BoosterPredictForMatSingleRowFastInit``) and then only walks the trees: the same
    trees, the same row-to-feature conversion and output transform (sigmoid, softmax) as predict, so the
    same numbers (a test compares them bit for bit). LightGBM serialises calls on one booster with its
    own lock, so threads may share it.

    The number of trees is the booster's (LightGBM resets it whenever a predictor is set up on that
    booster): every call here and in ``LoadedModel`` predicts with all of them (``best_iteration`` is -1
    for a model loaded from its file). A ``Booster.predict`` on the same booster with another
    ``num_iteration`` would change what this predicts; nothing does that.
    """

    def __init__(self, booster: lgb.Booster) -> None:
        self._booster = booster                  # the handle below points into it: keep it alive
        self._ncol = booster.num_feature()
        self._nout = booster.num_model_per_iteration() if booster.num_model_per_iteration() > 1 else 1
        handle = ctypes.c_void_p()
        # num_iteration as Booster.predict picks it (best_iteration; -1 when there is none: every tree).
        lgb.basic._safe_call(lgb.basic._LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(lgb.basic._C_API_PREDICT_NORMAL), ctypes.c_int(0),
            ctypes.c_int(booster.best_iteration), ctypes.c_int(lgb.basic._C_API_DTYPE_FLOAT64),
            ctypes.c_int32(self._ncol), lgb.basic._c_str("num_threads=1"), ctypes.byref(handle)))
        self._handle = handle
        self._predict = lgb.basic._LIB.LGBM_BoosterPredictForMatSingleRowFast
        self._free = lgb.basic._LIB.LGBM_FastConfigFree

    def predict(self, row: np.ndarray) -> np.ndarray:
        """(1,) for a binary model, (classes,) for a multiclass one."""
        data = np.ascontiguousarray(row, dtype=np.float64)
        if data.shape != (self._ncol,):
            raise ValueError(f"a row of {self._ncol} features was expected, not {data.shape}")
        out = np.empty(self._nout, dtype=np.float64)
        length = ctypes.c_int64(0)
        lgb.basic._safe_call(self._predict(self._handle, data.ctypes.data_as(ctypes.c_void_p), ctypes.byref(length),
                                           out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))))
        if length.value != self._nout:
            raise ValueError(f"LightGBM returned {length.value} values for one row, not {self._nout}")
        return out

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self._free(handle)
            self._handle = None


@dataclass
class LoadedModel:
    """A Booster with the card that describes it; model id and version travel with every answer."""
    model_id: str
    version: str
    booster: lgb.Booster
    card: dict[str, Any]
    path: Path
    _calibration_arrays: tuple[dict[str, Any], dict[str, Any]] | None = field(default=None, init=False, repr=False,
                                                                             compare=False)
    # SHA-256 of the model file's bytes the booster was made from: the key of its TreeSHAP tables.
    file_key: str | None = field(default=None, repr=False, compare=False)
    _explainer: TreeExplainer | None = field(default=None, init=False, repr=False, compare=False)
    _explainer_failed: bool = field(default=False, init=False, repr=False, compare=False)
    _single_row_predictor: SingleRowPredictor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def feature_names(self) -> list[str]:
        return list(self.card["features"])

    @property
    def kind(self) -> str:
        return self.card.get("kind", "binary")

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.card.get("classes", [])]

    def raw_probability(self, X: np.ndarray) -> np.ndarray:
        if X.shape[0] == 1:         # one patient ($assess, CDS Hooks): the same trees, without Booster.predict's setup
            return self._single_row().predict(X[0])[None, :] if self.kind == "multiclass" else \
                self._single_row().predict(X[0])
        return self.booster.predict(X, num_threads=1)

    def _single_row(self) -> SingleRowPredictor:
        predictor = self._single_row_predictor
        if predictor is None:
            with _SINGLE_ROW_LOCK:
                predictor = self._single_row_predictor
                if predictor is None:
                    predictor = self._single_row_predictor = SingleRowPredictor(self.booster)
        return predictor

    def probability(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probabilities in 0–1: (n,) for binary models, (n, classes) for multiclass."""
        raw = self.raw_probability(X)
        calibration = self.card.get("calibration")
        if self.kind == "binary" and calibration:
            return np.clip(apply_calibration(self._calibration(calibration), raw), 0.0, 1.0)
        return raw

    def _calibration(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """The card's calibration with isotonic knots as float arrays, made once (apply_calibration would
        turn the lists into arrays on every call)."""
        made = self._calibration_arrays
        if made is None or made[0] is not calibration:
            prepared = dict(calibration)
            if calibration.get("kind") == "isotonic":
                prepared["x"] = np.asarray(calibration["x"], dtype=float)
                prepared["y"] = np.asarray(calibration["y"], dtype=float)
            made = self._calibration_arrays = (calibration, prepared)
        return made[1]

    def explainer(self) -> TreeExplainer | None:
        """The tabulated TreeSHAP of this model (treeshap.py; the same values as pred_contrib), built on
        first use or by ``ModelRegistry.warm`` at start-up; None for a structure it does not cover."""
        if self._explainer is None and not self._explainer_failed:
            with _EXPLAINER_LOCK:
                if self._explainer is None and not self._explainer_failed:
                    try:
                        self._explainer = _shared_explainer(self.file_key, self.booster)
                    except NotImplementedError as exc:
                        log.info("model %s: explanations by LightGBM's pred_contrib (%s)", self.model_id, exc)
                        self._explainer_failed = True
                    except Exception:   # a bug or no memory: never stop serving, explain the slow way
                        log.exception("model %s: the TreeSHAP tables could not be built; explanations by "
                                      "LightGBM's pred_contrib", self.model_id)
                        self._explainer_failed = True
        return self._explainer

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """SHAP contributions (log-odds space; path-dependent TreeSHAP, as LightGBM's pred_contrib):
        (n, features + 1) or (n, classes, features + 1)."""
        # The tables take ≈0.06 ms a row on one core (≈0.2 ms on a cold cache in a request); LightGBM
        # ≈1 ms a row per core. LightGBM stays the fallback for a structure the tables do not cover.
        explainer = self.explainer()
        if explainer is not None:
            contrib = explainer.contributions(X)
        else:
            contrib = self.booster.predict(X, pred_contrib=True, num_threads=1)
        if self.kind == "multiclass":
            k = len(self.classes)
            return np.asarray(contrib).reshape(X.shape[0], k, X.shape[1] + 1)
        return np.asarray(contrib)

    def risk_category(self, p: np.ndarray) -> np.ndarray:
        """risk-probability codes from the card's thresholds (binary models)."""
        thresholds = self.card["thresholds"]
        out = np.full(p.shape, "low", dtype=object)
        out[p >= thresholds["moderate"]] = "moderate"
        out[p >= thresholds["high"]] = "high"
        return out


@contextmanager
def lightgbm_on_one_thread() -> Iterator[None]:
    """LightGBM's OpenMP work (parsing a model, dumping it) on the calling thread only, for the duration.

    gunicorn loads the models in its master and then forks the workers. Once a process has run an
    OpenMP region on several threads, GNU libgomp's thread pool does not survive a fork: a forked
    worker's next multi-threaded region (loading models again for a mapping ``$reload``) hangs for
    ever. Loading and dumping on one thread never starts the pool, so the workers can still use
    several threads later. Loading a model takes a few milliseconds more.
    """
    with _ONE_THREAD_LOCK:        # the setting is process-wide: two loads at once restore it in turn
        found = ctypes.c_int(0)
        lgb.basic._safe_call(lgb.basic._LIB.LGBM_GetMaxThreads(ctypes.byref(found)))
        lgb.basic._safe_call(lgb.basic._LIB.LGBM_SetMaxThreads(ctypes.c_int(1)))
        try:
            yield
        finally:
            lgb.basic._safe_call(lgb.basic._LIB.LGBM_SetMaxThreads(ctypes.c_int(found.value)))


def load_model(directory: Path | str, mapping: Mapping | None = None) -> LoadedModel:
    directory = Path(directory)
    try:
        card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
        text = (directory / MODEL_FILE).read_bytes()         # read once: the booster and its key agree
        with lightgbm_on_one_thread():
            booster = lgb.Booster(model_str=text.decode("utf-8"))
    except (OSError, ValueError, lgb.basic.LightGBMError) as exc:
        raise ModelError(f"cannot load model from {directory}: {exc}", expression=str(directory)) from exc
    model = LoadedModel(card["model"], card["version"], booster, card, directory)
    model.file_key = hashlib.sha256(text).hexdigest()
    if booster.feature_name() != model.feature_names:
        raise ModelError(f"{directory}: the model file's features differ from its card")
    if mapping is not None:
        check_against_mapping(model, mapping)
    return model


def _feature_problem(model: LoadedModel, mapping: Mapping) -> str | None:
    expected, actual = model.feature_names, mapping.feature_names
    if expected == actual:
        return None
    missing = [f for f in expected if f not in actual]
    extra = [f for f in actual if f not in expected]
    detail = []
    if missing:
        detail.append(f"missing {missing[:10]}")
    if extra:
        detail.append(f"not known to the model {extra[:10]}")
    if not missing and not extra:
        first = next(i for i, (a, b) in enumerate(zip(expected, actual)) if a != b)
        detail.append(f"order differs from position {first}: model has {expected[first]!r}, "
                      f"mapping has {actual[first]!r}")
    return f"features do not match model {model.model_id} {model.version}: " + "; ".join(detail)


def _unit_problem(model: LoadedModel, trained: str | None, spec: Input) -> str | None:
    """Why an input's unit in the served mapping is not the one the model was trained on, or None.

    The extractor converts every value into the input's declared unit, so that unit is the scale of the
    model's feature: any other unit, even one of the same kind (mmol/L for mg/dL, /h for /min), gives the
    model other numbers; one of another kind (kg for /min) drops every value.
    """
    served = spec.unit
    if units.same_unit(trained, served):
        return None
    by = f"model {model.model_id} {model.version} was trained on this input"
    if trained is None:
        return f"{by} without a unit (not a quantity), not in {served!r}: changing its value type needs retraining"
    if served is None:
        return f"{by} in {trained!r}; without a unit its values are not that quantity: declare {trained!r}"
    convertible = units.conversion(units.normalise_unit(served) or "", units.normalise_unit(trained) or "",
                                   spec.molar_mass) is not None
    what = (f"in {served!r} the model would read every value on another scale" if convertible else
            f"{served!r} measures {units.dimension(served) or 'something else'}, not {units.dimension(trained)} "
            "(every value would be dropped)")
    return (f"{by} in {trained!r}; {what}: declare {trained!r} (values sent in other units are converted "
            "into it) or retrain the model on the new unit")


def mapping_problems(model: LoadedModel, mapping: Mapping) -> dict[str, list[str]]:
    """Why a mapping does not fit its trained model ('file: field.path' → messages; empty if it does):
    the features (names and order) and the unit of each input they read, as the card recorded at training
    (``mapping.units``; a card written before units were recorded is checked on features only)."""
    problems: dict[str, list[str]] = {}
    feature_problem = _feature_problem(model, mapping)
    if feature_problem:
        problems[f"{mapping.path}: features"] = [feature_problem]
    trained_with = model.card.get("mapping") or {}
    trained_units = trained_with.get("units")
    if trained_units is None:
        if trained_with.get("digest") != mapping.digest:
            log.warning("model %s %s: its card records no input units; the units of %s are not checked against it",
                        model.model_id, model.version, mapping.path)
        return problems
    for name in mapping.feature_units:
        if name not in trained_units:      # an input the model never read: the features differ (above)
            continue
        problem = _unit_problem(model, trained_units[name], mapping.inputs[name])
        if problem:
            problems[f"{mapping.path}: inputs.{name}.unit"] = [problem]
    return problems


def check_against_mapping(model: LoadedModel, mapping: Mapping) -> None:
    """The mapping must produce exactly the model's features, in the model's order, in the trained units."""
    problems = mapping_problems(model, mapping)
    if problems:
        raise MappingMismatch(problems)


def check_mappings(mappings_dir: Path | str, models_dir: Path | str) -> tuple[dict[str, Mapping], dict[str, list[str]]]:
    """Every mapping in a folder as it is on disk now, and every problem ('file: field.path' → messages),
    including a mapping that no longer fits its trained model (features, input units)."""
    from ..mapping import check_directory
    found, problems = check_directory(mappings_dir)
    for model_id, mapping in found.items():
        directory = Path(models_dir) / model_id
        if (directory / MODEL_FILE).exists():
            try:
                problems.update(mapping_problems(load_model(directory), mapping))
            except ModelError as exc:
                problems.setdefault(f"{mapping.path}: features", []).append(exc.message)
    return found, problems


_EXPLAINERS: dict[str, TreeExplainer] = {}


def _shared_explainer(file_key: str | None, booster: lgb.Booster) -> TreeExplainer:
    """One set of tables per model file (a reload or another app in the same process reuses them);
    the few most recent files are kept; a booster not loaded from a file (no key) gets its own.
    Called under _EXPLAINER_LOCK."""
    explainer = _EXPLAINERS.pop(file_key, None) if file_key else None
    if explainer is None:
        with lightgbm_on_one_thread():                # dump_model: see lightgbm_on_one_thread
            explainer = TreeExplainer.from_booster(booster)
    if not file_key:
        return explainer
    _EXPLAINERS[file_key] = explainer             # most recent last
    while len(_EXPLAINERS) > 8:
        del _EXPLAINERS[next(iter(_EXPLAINERS))]
    return explainer


class ModelRegistry:
    """Every model fhir_ai serves, loaded at start-up."""

    def __init__(self, models: dict[str, LoadedModel], mappings: dict[str, Mapping]) -> None:
        self.models = models
        self.mappings = mappings

    @classmethod
    def load(cls, models_dir: Path | str, mappings: dict[str, Mapping]) -> "ModelRegistry":
        models_dir = Path(models_dir)
        models: dict[str, LoadedModel] = {}
        problems: dict[str, list[str]] = {}
        for model_id, mapping in mappings.items():
            directory = models_dir / model_id
            if not (directory / MODEL_FILE).exists():
                log.warning("mapping %s has no trained model in %s; it cannot be assessed", model_id, models_dir)
                continue
            models[model_id] = load_model(directory)
            problems.update(mapping_problems(models[model_id], mapping))
            log.info("loaded model %s version %s", model_id, models[model_id].version)
        if problems:        # every mapping's problems at once, as $check lists them
            raise MappingMismatch(problems)
        return cls(models, mappings)

    def warm(self) -> None:
        """Build what each model builds on first use (its TreeSHAP tables) now: before gunicorn forks
        its workers, so they share the tables and no request pays for them."""
        for model in self.models.values():
            model.explainer()

    def get(self, model_id: str) -> tuple[LoadedModel, Mapping]:
        if model_id not in self.models:
            raise NotSupported(f"unknown model {model_id!r}; available: {sorted(self.models)}",
                               expression="Parameters.parameter.where(name='model')")
        return self.models[model_id], self.mappings[model_id]
