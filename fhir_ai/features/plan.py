"""What feature extraction needs to know about a mapping, worked out once per loaded mapping.

``plan_for(mapping)`` is cached per Mapping object (a reloaded mapping is a new object, so it gets a new
plan; the plan goes when its mapping does). Extractors are cheap to make: one per request and model.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..mapping import Input, Mapping
from .aggregate import ZERO_WHEN_EMPTY
from .columns import STATUSES, UnitKey

# Value types of inputs (Plan.kind).
QUANTITY, INTEGER, BOOLEAN, CODING = 0, 1, 2, 3
_KINDS = {"quantity": QUANTITY, "integer": INTEGER, "boolean": BOOLEAN, "coding": CODING}
_MAX_CONVERSIONS = 4096      # units come from hospital data: bound what is remembered


@dataclass
class Group:
    """Rows of one input inside one window, and what is made of them."""
    input: int
    window: int
    features: list[tuple[int, str]] = field(default_factory=list)    # (column, aggregate)
    news2: list[str] = field(default_factory=list)                   # NEWS2 parameters read from it
    second_reader: bool = False


@dataclass
class Plan:
    mapping: weakref.ref[Mapping]         # not the mapping itself: the plan must not keep it alive
    inputs: list[Input]
    static: list[Input]
    allowed: np.ndarray                  # (inputs, statuses + 1) bool; the last column is "no/unknown status"
    kind: np.ndarray                     # int64 per input: its value type, see QUANTITY...
    kinds: list[bool]                    # which value types some input has
    numeric: np.ndarray                  # bool per input: quantity or integer (checked for plausibility)
    low: np.ndarray                      # plausible range per input (-inf, inf when none)
    high: np.ndarray
    window_low: np.ndarray               # per window: start relative to as-of (-inf: unbounded; encounter: see below)
    window_high: np.ndarray              # per window: end relative to as-of
    encounter_windows: list[int]         # windows starting at the current encounter's start
    groups: list[Group]                  # ordered by (window, input): rows sorted by input keep group order
    group_of_input: np.ndarray           # (windows, inputs) int64: the group reading the input there, -1 = none
    group_input: np.ndarray              # int64 per group
    group_present: np.ndarray            # bool per group: marks its input present (model features read it)
    group_used: np.ndarray               # bool per group: its rows are the basis of the assessment
    aggregates: list[str]                # every aggregate some group needs, each once
    pair_group: np.ndarray               # per (feature column, aggregate) pair: the group ...
    pair_column: np.ndarray              # ... the X column ...
    pair_aggregate: np.ndarray           # ... and the index into ``aggregates``
    zero_columns: np.ndarray             # X columns that are 0, not NaN, without values (count, sum)
    static_columns: list[tuple[int, Input, str | None]]
    news2_groups: dict[str, int]         # NEWS2 parameter -> group
    second_reader_group: int | None
    extra_group: np.ndarray              # groups whose latest value is kept: NEWS2 parameters, then second reader
    feature_inputs: list[tuple[str, int]]   # (name, index) of each input some model feature reads, in feature order
    conversions: dict[UnitKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    tables: dict[tuple[UnitKey, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def unit_tables(self, units: Sequence[UnitKey]) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset), each (units, inputs): a quantity in unit u of input i is value * scale + offset
        in the input's unit; NaN where it cannot be converted (or the input takes no quantity)."""
        key = tuple(units)
        tables = self.tables.get(key)
        if tables is None:
            rows = [self._conversion(unit) for unit in key]
            tables = (np.array([scale for scale, _ in rows]).reshape(len(key), len(self.inputs)),
                      np.array([offset for _, offset in rows]).reshape(len(key), len(self.inputs)))
            if len(self.tables) >= _MAX_CONVERSIONS:
                self.tables.clear()
            self.tables[key] = tables
        return tables

    def _conversion(self, unit: UnitKey) -> tuple[np.ndarray, np.ndarray]:
        found = self.conversions.get(unit)
        if found is None:
            scale = np.full(len(self.inputs), np.nan)
            offset = np.full(len(self.inputs), np.nan)
            for spec in self.inputs:
                if spec.value_type == "quantity":
                    conv = spec.unit_conversion(unit[0], unit[1])
                    if conv is not None:
                        scale[spec.index], offset[spec.index] = conv
            if len(self.conversions) >= _MAX_CONVERSIONS:
                self.conversions.clear()
            found = self.conversions[unit] = (scale, offset)
        return found


_PLANS: dict[int, Plan] = {}


def plan_for(mapping: Mapping) -> Plan:
    plan = _PLANS.get(id(mapping))
    if plan is None or plan.mapping() is not mapping:
        plan = _PLANS[id(mapping)] = _build(mapping)
        weakref.finalize(mapping, _PLANS.pop, id(mapping), None)
    return plan


def _build(mapping: Mapping) -> Plan:
    inputs = mapping.input_list
    n = len(inputs)
    allowed = np.zeros((n, len(STATUSES) + 1), dtype=bool)
    kind = np.full(n, -1, dtype=np.int64)
    low = np.full(n, -np.inf)
    high = np.full(n, np.inf)
    for spec in inputs:
        for status in spec.statuses:
            allowed[spec.index, STATUSES.index(status)] = True
        kind[spec.index] = _KINDS[spec.value_type]
        if spec.plausible:
            low[spec.index], high[spec.index] = spec.plausible

    windows: dict[tuple[float | str | None, float | None], int] = {}
    keyed: dict[tuple[int, int], Group] = {}

    def group(spec: Input, start: float | str | None, end: float | None) -> Group:
        window = windows.setdefault((start, end), len(windows))
        return keyed.setdefault((window, spec.index), Group(spec.index, window))

    static_columns = []
    for col, feature in enumerate(mapping.features):
        spec = mapping.inputs[feature.input]
        if not spec.is_observation:
            static_columns.append((col, spec, feature.category))
            continue
        group(spec, feature.window_start, feature.window_end).features.append((col, feature.aggregate))
    if mapping.news2:
        for param, name in mapping.news2["inputs"].items():
            group(mapping.inputs[name], -mapping.news2["window"], 0.0).news2.append(param)
    if mapping.second_reader:
        reader = mapping.second_reader
        group(mapping.inputs[reader["input"]], reader["start"], reader["end"]).second_reader = True

    groups = [keyed[key] for key in sorted(keyed)]
    group_of_input = np.full((len(windows), n), -1, dtype=np.int64)
    for g, item in enumerate(groups):
        group_of_input[item.window, item.input] = g
    aggregates = list(dict.fromkeys(aggregate for item in groups for _, aggregate in item.features))
    pairs = [(g, col, aggregates.index(aggregate)) for g, item in enumerate(groups)
             for col, aggregate in item.features]
    pair_group, pair_column, pair_aggregate = (np.array(values, dtype=np.int64) for values in
                                               (zip(*pairs) if pairs else ((), (), ())))
    news2_groups = {param: g for g, item in enumerate(groups) for param in item.news2}
    if mapping.news2:
        news2_groups = {param: news2_groups[param] for param in mapping.news2["inputs"]}   # the mapping's order
    second_reader_group = next((g for g, item in enumerate(groups) if item.second_reader), None)
    return Plan(
        mapping=weakref.ref(mapping), inputs=inputs, static=[spec for spec in inputs if not spec.is_observation],
        window_low=np.array([-np.inf if start in ("unbounded", "encounter") else float(start)  # type: ignore[arg-type]
                             for start, _ in windows], dtype=np.float64),
        window_high=np.array([end or 0.0 for _, end in windows], dtype=np.float64),
        encounter_windows=[w for w, (start, _) in enumerate(windows) if start == "encounter"],
        allowed=allowed, kind=kind, kinds=[bool((kind == k).any()) for k in range(len(_KINDS))],
        numeric=(kind == QUANTITY) | (kind == INTEGER), low=low, high=high, groups=groups,
        group_of_input=group_of_input, group_input=np.array([item.input for item in groups], dtype=np.int64),
        group_present=np.array([bool(item.features) for item in groups], dtype=bool),
        group_used=np.array([bool(item.features) or item.second_reader for item in groups], dtype=bool),
        aggregates=aggregates, pair_group=pair_group, pair_column=pair_column, pair_aggregate=pair_aggregate,
        zero_columns=np.array([col for item in groups for col, aggregate in item.features
                               if aggregate in ZERO_WHEN_EMPTY], dtype=np.int64),
        static_columns=static_columns, news2_groups=news2_groups, second_reader_group=second_reader_group,
        extra_group=np.array([*news2_groups.values(), *([] if second_reader_group is None else [second_reader_group])],
                             dtype=np.int64),
        feature_inputs=[(name, mapping.inputs[name].index) for name in dict.fromkeys(f.input for f in mapping.features)])
