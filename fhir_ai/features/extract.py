"""One columnar feature-extraction path for training, bulk scoring and single patients.

Resources go in one at a time (cheap dict look-ups per Observation); values land in flat arrays
(patient, input, time, value); every feature is then a vectorised grouped aggregate over a window
relative to each patient's as-of time. What a mapping needs (status, unit and plausibility tables, the
(input, window) groups, which aggregate goes to which column) is worked out once per loaded mapping
(``plan.plan_for``), and ``finish`` computes every window of every patient in one pass, so that one
patient costs a fixed number of numpy calls rather than a few per feature.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from datetime import datetime
from typing import Any, Iterable

import numpy as np
import orjson

from ..fhir import times
from ..mapping import Input, Mapping
from .aggregate import segment_starts, segment_values
from .columns import (BOOLEAN_INVALID, CONCEPT_INVALID, INTEGER_INVALID, QUANTITY_INVALID, QUANTITY_NOT_NUMBER,
                      ColumnBuilder, ObservationColumns, patient_id)
from .plan import BOOLEAN, CODING, INTEGER, QUANTITY, plan_for

_FLUSH_ROWS = 200_000
OTHER_TYPE = 11      # a value[x] of a type the input does not read (valueInteger for a coded input, say)
# Why a matched value was not used (0 = used); unit, coded-value and plausibility reasons carry detail.
# Upstream data that is JSON but not valid FHIR is never used and never raises: an Observation part whose
# value[x] or time cannot be read is reported here (6-10: see features.columns); a Patient or Encounter element
# that cannot be read counts as that input missing and is reported as ``Unreadable`` (same note, "Values not
# used"). The texts name the element, never the value (it may be PHI).
_REASONS = {1: "no effective time", 2: "unreadable effective time", 3: "unit cannot be converted",
            4: "coded value not in the mapping's values", 5: "implausible value",
            QUANTITY_INVALID: "valueQuantity is not a valid Quantity",
            QUANTITY_NOT_NUMBER: "valueQuantity.value is not a number",
            INTEGER_INVALID: "valueInteger is not an integer", BOOLEAN_INVALID: "valueBoolean is not true or false",
            CONCEPT_INVALID: "valueCodeableConcept is not a valid CodeableConcept", OTHER_TYPE: "value of another type"}
_READS = {QUANTITY: "valueQuantity", INTEGER: "valueInteger", BOOLEAN: "valueBoolean", CODING: "valueCodeableConcept"}

log = logging.getLogger(__name__)

_ENDED_ENCOUNTER = {"cancelled", "entered-in-error"}


# Encounter statuses of a visit still going on, whatever its period.end says.
OPEN_STATUSES = ("in-progress", "arrived", "triaged", "onleave")


def pinned_encounter_problem(encounter: dict, as_of: float) -> str | None:
    """Why an assessment as of ``as_of`` (epoch seconds) cannot be for this pinned encounter: it starts
    later, or it ended before (and is not still open); None if it can, or if its period is unreadable
    (reported by the extraction)."""
    try:
        start, end = _period_start(encounter), _period_end(encounter)
    except Unreadable:
        return None
    period = encounter.get("period") or {}
    if start is not None and start > as_of:
        return f"starts at {period.get('start')}, after asOf"
    if end is not None and end < as_of and encounter.get("status") not in OPEN_STATUSES:
        return f"ended at {period.get('end')}, before asOf"
    return None


class Unreadable(ValueError):
    """A Patient or Encounter element that is there but is not valid FHIR (the text names it, not its value)."""

    def __init__(self, element: str, expected: str) -> None:
        super().__init__(f"{element} is not {expected}")


@dataclass
class Dropped:
    """A value we refused, and why (reported to the caller; never logged with its value)."""
    reference: str
    input: str
    reason: str

    def as_text(self) -> str:
        return f"{self.reference} ({self.input}): {self.reason}"


@dataclass
class FeatureSet:
    """Feature matrix and everything an assessment needs to explain itself, one row per patient."""
    mapping: Mapping
    patient_ids: list[str]
    X: np.ndarray                          # (patients, features), NaN = missing
    as_of: np.ndarray                      # epoch seconds, NaN where nothing anchors the patient
    encounter_ids: list[str | None]
    basis: list[list[str]]                 # Observation references actually used
    dropped: list[list[Dropped]]
    present: np.ndarray                    # (patients, inputs) bool: input had a value in a feature window
    news2_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    news2_basis: list[list[str]] = field(default_factory=list)   # Observations behind the NEWS2 values
    reference: np.ndarray | None = None    # the clinician's own rating (second-reader input), NaN if absent
    encounter_classes: list[str | None] = field(default_factory=list)   # the current encounter's class code

    @property
    def feature_names(self) -> list[str]:
        return self.mapping.feature_names

    def row(self, patient_id: str) -> int:
        return self.patient_ids.index(patient_id)

    def core_count(self) -> np.ndarray:
        columns = [self.mapping.inputs[name].index for name in self.mapping.core_inputs]
        return self.present[:, columns].sum(axis=1)

    def applicable(self) -> np.ndarray:
        """True where the current encounter is of a class the model is for (every row if it names none)."""
        return self._applicable

    @cached_property
    def _applicable(self) -> np.ndarray:     # once: reasons are asked row by row
        wanted = self.mapping.encounter_classes
        if not wanted:
            return np.ones(len(self.patient_ids), dtype=bool)
        return np.array([c in wanted for c in self.encounter_classes], dtype=bool)

    def sufficient(self) -> np.ndarray:
        """Enough core inputs, on a visit the model is for."""
        return (self.core_count() >= self.mapping.min_core_inputs) & self.applicable()

    def missing_inputs(self, row: int) -> list[str]:
        """Inputs some model feature reads that had no value for this patient."""
        present = self.present[row].tolist()
        return [name for name, index in plan_for(self.mapping).feature_inputs if not present[index]]


class Extractor:
    """Accumulate FHIR resources for any number of patients; ``finish`` builds the FeatureSet."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self._plan = plan_for(mapping)
        self._inputs = self._plan.inputs
        self._patients: dict[str, int] = {}
        self._patient_resources: dict[int, dict] = {}
        self._encounters: dict[int, list[dict]] = {}
        self._chunks: list[tuple[np.ndarray, ...]] = []      # (P, I, T, V, O) per add_columns call
        self._refs: list[str] = []
        self._builder = ColumnBuilder(mapping.code_index)
        self._dropped: list[tuple[int, float, Dropped]] = []

    # -- input ---------------------------------------------------------------------------------
    def patient_row(self, patient_id: str) -> int:
        row = self._patients.get(patient_id)
        if row is None:
            row = self._patients[patient_id] = len(self._patients)
        return row

    def add(self, resource: dict) -> None:
        kind = resource.get("resourceType")
        if kind == "Observation":
            self.add_observation(resource)
        elif kind == "Patient":
            self.add_patient(resource)
        elif kind == "Encounter":
            self.add_encounter(resource)

    def add_all(self, resources: Iterable[dict]) -> None:
        builder, patients = self._builder, self._patients
        add = builder.add
        for resource in resources:
            if resource.get("resourceType") == "Observation":
                pid = add(resource)
                if pid is not None:
                    if pid not in patients:       # rows follow the order patients first appear in
                        patients[pid] = len(patients)
                    if len(builder.rows) >= _FLUSH_ROWS:
                        self._flush()
            else:
                self.add(resource)

    def add_patient(self, patient: dict) -> None:
        pid = patient.get("id")
        if pid.__class__ is str:       # a Patient without a string id is no one's we can tell: not used
            self._patient_resources[self.patient_row(pid)] = patient

    def add_encounter(self, encounter: dict) -> None:
        patient_id = _patient_id(encounter)
        if patient_id is None:
            return
        status = encounter.get("status")
        if status is not None and status.__class__ is not str:
            # An encounter whose status cannot be read may be cancelled or entered in error: not used, said so.
            self._dropped.append((self.patient_row(patient_id), np.nan,
                                  Dropped(_reference(encounter), "encounter", "status is not a code; "
                                          "the encounter is not used")))
            return
        if status not in _ENDED_ENCOUNTER:
            self._encounters.setdefault(self.patient_row(patient_id), []).append(encounter)

    def add_observation(self, obs: dict) -> None:
        pid = self._builder.add(obs)
        if pid is not None:
            self.patient_row(pid)         # rows follow the order patients first appear in
            if len(self._builder) >= _FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if len(self._builder):
            self.add_columns(self._builder.take())

    def add_columns(self, cols: ObservationColumns) -> None:
        """The one extraction core: Observation rows → (patient, input, time, value) arrays and drops.

        Every caller goes through here (``add_observation`` buffers into columns first), so statuses,
        time parsing, unit conversion, plausibility and what counts as dropped are decided once.
        """
        if not len(cols):
            return
        plan = self._plan
        rows, inputs = self._match(cols)          # rows None: every row once, in order

        def pick(column: np.ndarray) -> np.ndarray:
            return column if rows is None else column[rows]

        if not len(inputs):
            return
        patient = pick(cols.patient)
        if len(cols.patient_ids) == 1:
            lookup = np.array([self.patient_row(cols.patient_ids[0])], dtype=np.int64)
        else:
            first = np.unique(patient, return_index=True)
            for code in first[0][np.argsort(first[1], kind="stable")].tolist():
                self.patient_row(cols.patient_ids[code])
            lookup = np.fromiter((self._patients.get(pid, -1) for pid in cols.patient_ids), np.int64,
                                 len(cols.patient_ids))
        P = lookup[patient]
        T = pick(cols.time)
        problem = np.zeros(len(inputs), dtype=np.int8)      # 0 ok, see _REASONS
        untimed = np.isnan(T)
        if untimed.any():
            T = self._parse_times(cols, rows, T, untimed)
            untimed = np.isnan(T)
            problem[untimed] = np.where(_is_none(pick(cols.time_text)[untimed]), 1, 2)
            counted = ~untimed & plan.allowed[inputs, pick(cols.status)]
        else:
            counted = plan.allowed[inputs, pick(cols.status)]      # status -1 reads the last (False) column
        text: dict[int, str] = {}
        V = self._values(cols, pick, inputs, counted, problem, text)
        invalid = pick(cols.invalid)
        if invalid.any():
            # A value[x] that cannot be read (features.columns): its value is NaN, so nothing above used it.
            unread = np.flatnonzero(counted & (invalid > 0))
            problem[unread] = invalid[unread]
        kept = np.flatnonzero(counted & (problem == 0) & ~np.isnan(V))
        self._keep(cols, kept if rows is None else rows[kept], P[kept], inputs[kept], T[kept], V[kept])
        for j in np.flatnonzero(problem).tolist():
            reason = text.get(j) or _REASONS[int(problem[j])]
            ref = f"Observation/{cols.obs_id[j if rows is None else rows[j]]}"
            self._dropped.append((int(P[j]), float(T[j]), Dropped(ref, self._inputs[inputs[j]].name, reason)))

    def _match(self, cols: ObservationColumns) -> tuple[np.ndarray | None, np.ndarray]:
        """(row, input) pairs: each coding's inputs; one pair per input and Observation part.

        Rows are None when every row is one pair (each code names one input): the common case.
        """
        index = self.mapping.code_index
        targets = [index.get(tuple(code), ()) for code in cols.codes]   # type: ignore[arg-type]
        rows: np.ndarray | None
        if all(len(t) == 1 for t in targets):
            rows = None
            inputs = np.array([t[0] for t in targets], dtype=np.int64)[cols.code]
            obs, part = cols.obs, cols.part
        else:
            counts = np.fromiter((len(t) for t in targets), np.int64, len(targets))
            per_row = counts[cols.code]
            rows = np.repeat(np.arange(len(cols)), per_row)
            if not len(rows):
                return rows, rows
            starts = np.cumsum(counts) - counts
            flat = np.fromiter((i for t in targets for i in t), np.int64, int(counts.sum()))
            offset = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            inputs = flat[starts[cols.code[rows]] + offset]
            obs, part = cols.obs[rows], cols.part[rows]
        # The same input named twice in one part (two codings of one concept) is one value, not two.
        same = obs[1:] == obs[:-1]
        if same.any():
            same &= part[1:] == part[:-1]
            if same.any():
                group = np.concatenate(([0], np.cumsum(~same)))
                key = group * (len(self._inputs) + 1) + inputs
                if len(np.unique(key)) < len(key):
                    keep = np.sort(np.unique(key, return_index=True)[1])
                    rows = keep if rows is None else rows[keep]
                    inputs = inputs[keep]
        return rows, inputs

    @staticmethod
    def _parse_times(cols: ObservationColumns, rows: np.ndarray | None, T: np.ndarray,
                     untimed: np.ndarray) -> np.ndarray:
        """Times the front-end left unparsed (``time_text``), parsed here (NaN if unreadable)."""
        T = T.copy()
        parsed: dict[str, float] = {}
        for j in np.flatnonzero(untimed).tolist():
            text = cols.time_text[j if rows is None else rows[j]]
            if text is None:
                continue
            if text not in parsed:
                try:
                    parsed[text] = times.to_epoch(text)
                except ValueError:                 # (times raises only ValueError for what it cannot read)
                    parsed[text] = np.nan
            T[j] = parsed[text]
        return T

    def _values(self, cols: ObservationColumns, pick: Any, inputs: np.ndarray, counted: np.ndarray,
                problem: np.ndarray, text: dict[int, str]) -> np.ndarray:
        """Each row's value in its input's unit (NaN = none); refusals of counted rows into problem/text."""
        plan = self._plan
        kind = plan.kind[inputs]
        has_q, q, integer = pick(cols.has_quantity), pick(cols.quantity), pick(cols.integer)
        V = np.where(has_q, q, integer)                 # quantity inputs: valueQuantity, else valueInteger
        if plan.kinds[INTEGER]:
            V = np.where(kind == INTEGER, np.where(~np.isnan(integer), integer, np.where(has_q, q, np.nan)), V)
        if plan.kinds[BOOLEAN]:
            b = pick(cols.boolean)
            V = np.where(kind == BOOLEAN, np.where(b >= 0, b, np.nan), V)
        if plan.kinds[CODING]:
            coded = kind == CODING
            V[coded] = np.nan
            which = np.flatnonzero(coded & counted)
            for j, concept in zip(which.tolist(), pick(cols.concept)[which].tolist()):
                V[j], problem[j] = self._coded(self._inputs[inputs[j]], concept)
        converted = np.flatnonzero(counted & (kind == QUANTITY) & has_q & ~np.isnan(q))
        if len(converted):
            scale, shift = plan.unit_tables(cols.units)
            unit, index = pick(cols.unit)[converted], inputs[converted]
            factor = scale[unit, index]
            V[converted] = V[converted] * factor + shift[unit, index]
            bad = np.isnan(factor)
            for j, u in zip(converted[bad].tolist(), unit[bad].tolist()):
                spec = self._inputs[inputs[j]]
                code, unit_text, sent = cols.units[u]
                problem[j] = 3
                text[j] = f"unit {sent or unit_text!r} cannot be converted to {spec.unit!r}"
        low, high = plan.low[inputs], plan.high[inputs]
        # (comparisons with NaN are False: values without a number or a unit are not implausible)
        for j in np.flatnonzero(counted & plan.numeric[inputs] & ((V < low) | (V > high))).tolist():
            spec = self._inputs[inputs[j]]
            low_j, high_j = spec.plausible         # type: ignore[misc]
            problem[j] = 5
            text[j] = (f"implausible value {V[j]:g} {spec.unit or ''} "
                       f"(plausible {low_j:g}-{high_j:g})").replace("  ", " ")
        # A part with a value the input cannot read (another value[x]) is reported, not taken for no value.
        # Few rows get here (no number so far and no problem): checked one by one.
        unread = np.flatnonzero(counted & (problem == 0) & np.isnan(V))
        if len(unread):
            boolean, concept = pick(cols.boolean), pick(cols.concept)
            for j in unread.tolist():
                k = int(kind[j])
                given = {QUANTITY: bool(has_q[j]), INTEGER: not np.isnan(integer[j]), BOOLEAN: boolean[j] >= 0,
                         CODING: concept[j] is not None}
                readable = given[k] or (k in (QUANTITY, INTEGER) and (given[QUANTITY] or given[INTEGER]))
                other = [_READS[g] for g, present in given.items() if present and g != k]
                if not readable and other:
                    problem[j] = OTHER_TYPE
                    text[j] = f"{other[0]} given where {_READS[k]} is read"
        return V

    @staticmethod
    def _coded(spec: Input, concept: Any) -> tuple[float, int]:
        """(value, problem) of a valueCodeableConcept: the first coding the input maps."""
        if concept is None:
            return np.nan, 0
        try:
            if isinstance(concept, (str, bytes)):
                concept = orjson.loads(concept)
            for coding in concept.get("coding") or ():
                mapped = spec.coded_value(coding.get("system"), coding.get("code"))
                if mapped is not None:
                    return mapped, 0
        except (AttributeError, TypeError, ValueError):     # codings that are no objects, codes that are lists
            return np.nan, CONCEPT_INVALID
        return np.nan, 4

    def _keep(self, cols: ObservationColumns, rows: np.ndarray, P: np.ndarray, I: np.ndarray, T: np.ndarray,
              V: np.ndarray) -> None:
        if not len(rows):
            return
        obs = cols.obs[rows]
        change = np.empty(len(obs), dtype=bool)
        change[0] = True
        np.not_equal(obs[1:], obs[:-1], out=change[1:])
        if (obs[1:] >= obs[:-1]).all():
            # Rows in Observation order (always so from ColumnBuilder): references in that order.
            first = np.flatnonzero(change)
            ordinal = np.cumsum(change) - 1
        else:
            _, first, inverse = np.unique(obs, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")          # references in order of first appearance
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            first, ordinal = first[order], rank[inverse]
        base = len(self._refs)
        self._refs.extend([f"Observation/{oid}" for oid in cols.obs_id[rows[first]].tolist()])
        self._chunks.append((P, I, T, V, base + ordinal))

    # -- output --------------------------------------------------------------------------------
    def finish(self, as_of: datetime | dict[str, datetime] | None = None,
               patient_ids: list[str] | None = None, encounters: dict[str, str] | None = None) -> FeatureSet:
        """Build features. ``as_of``: one time for all, per patient, or None = each patient's latest data.

        ``encounters`` pins a patient's current encounter by id (e.g. the ED visit being triaged).
        """
        self._flush()
        for pid in patient_ids or ():
            self.patient_row(pid)
        ids = list(self._patients)
        n = len(ids)
        plan = self._plan
        if len(self._chunks) == 1:
            P, I, T, V, O = self._chunks[0]
        else:
            P, I, T, V, O = (np.concatenate(parts) if self._chunks else np.empty(0, dtype)
                             for parts, dtype in zip(zip(*self._chunks) if self._chunks else [()] * 5,
                                                     (np.int64, np.int64, np.float64, np.float64, np.int64)))
        unreadable: list[tuple[int, float, Dropped]] = []
        periods = self._periods(unreadable)
        anchor = self._as_of(ids, as_of, P, T, periods)
        encounter_ids, enc_start, current = self._current_encounters(n, anchor, encounters or {}, periods)
        # Rows sorted by input, patient and time: each (window, input) group's rows of each patient
        # are one contiguous run, in time order.
        order = np.lexsort((T, P, I))
        P, I, T, V, O = P[order], I[order], T[order], V[order], O[order]

        X = np.full((n, len(self.mapping.features)), np.nan)
        X[:, plan.zero_columns] = 0.0
        present = np.zeros((n, len(self._inputs)), dtype=bool)
        self._static_columns(X, present, anchor, enc_start, current, unreadable)

        # Every group's rows at once: each window's rows (in order) of the inputs some group reads in it.
        a = anchor[P]
        low = a + plan.window_low[:, None]          # (windows, rows)
        if plan.encounter_windows:
            low[plan.encounter_windows] = enc_start[P]
        groups = plan.group_of_input[:, I]
        window, sel = np.nonzero((groups >= 0) & (T >= low) & (T <= a + plan.window_high[:, None]))
        G = groups[window, sel]
        used = np.zeros(len(P), dtype=bool)
        news2_used = np.zeros(len(P), dtype=bool)
        # Latest values kept beside the features: one row per NEWS2 parameter, then the second reader's.
        extras = np.full((len(plan.extra_group), n), np.nan)
        news2 = dict(zip(plan.news2_groups, extras))
        reference = None if plan.second_reader_group is None else extras[-1]
        if len(sel):
            PS, VS = P[sel], V[sel]
            starts, ends = segment_starts((G, PS), len(sel))
            seg_group, seg_patient = G[starts], PS[starts]
            hours = (T[sel] - anchor[PS]) / 3600.0 if "slope" in plan.aggregates else None
            values = np.stack([segment_values(aggregate, VS, starts, ends, hours) for aggregate in plan.aggregates]
                              or [np.empty(len(starts))])
            # Each (group, patient) has at most one segment: its number, -1 = no values.
            segment = np.full((len(plan.groups), n), -1, dtype=np.int64)
            segment[seg_group, seg_patient] = np.arange(len(starts))
            found = segment[plan.pair_group]            # (column/aggregate pairs, patients)
            has = found >= 0
            X[:, plan.pair_column] = np.where(has, values[plan.pair_aggregate[:, None], found], X[:, plan.pair_column].T).T
            marks = plan.group_present[seg_group]
            present[seg_patient[marks], plan.group_input[seg_group[marks]]] = True
            used[sel[plan.group_used[G]]] = True
            found = segment[plan.extra_group]           # (extras, patients)
            has = found >= 0
            latest = ends[found] - 1
            extras[has] = VS[latest[has]]
            # The latest value of each patient is the one NEWS2 reads.
            news2_used[sel[latest[:len(news2)][has[:len(news2)]]]] = True
        keys = P * len(self._refs) + O
        basis = self._basis(n, keys[used], len(self._refs))
        news2_basis = self._basis(n, keys[news2_used], len(self._refs))
        dropped: list[list[Dropped]] = [[] for _ in range(n)]
        for row, t, item in [*self._dropped, *unreadable]:
            if not (t > anchor[row]):     # keep NaN times; hide what lies after the as-of time
                dropped[row].append(item)
        classes = [_class_code(current.get(row)) for row in range(n)] if self.mapping.encounter_classes else []
        return FeatureSet(self.mapping, ids, X, anchor, encounter_ids, basis, dropped, present, news2, news2_basis,
                          reference, classes)

    def _periods(self, unreadable: list[tuple[int, float, Dropped]]) -> dict[int, list[tuple[float | None, dict]]]:
        """Each patient's encounters with their start times (None: no start; such an encounter is never current).

        An encounter whose period cannot be read cannot be placed in time: it is not used (it could otherwise
        be taken for the current one), and the note says so.
        """
        periods: dict[int, list[tuple[float | None, dict]]] = {}
        for row, encounters in self._encounters.items():
            items = periods[row] = []
            for enc in encounters:
                try:
                    start = _period_start(enc)
                    _period_end(enc)
                except Unreadable as exc:
                    unreadable.append((row, np.nan, Dropped(_reference(enc), "encounter",
                                                            f"{exc}; the encounter is not used")))
                    start = None
                items.append((start, enc))
        return periods

    def _as_of(self, ids: list[str], as_of: Any, P: np.ndarray, T: np.ndarray,
               periods: dict[int, list[tuple[float | None, dict]]]) -> np.ndarray:
        n = len(ids)
        if isinstance(as_of, datetime):
            return np.full(n, as_of.timestamp())
        anchor = np.full(n, np.nan)
        if isinstance(as_of, dict):
            for pid, when in as_of.items():
                if pid in self._patients:
                    anchor[self._patients[pid]] = when.timestamp()
        missing = np.isnan(anchor)
        if missing.any():
            # An export is a snapshot: each patient as of their own latest data, never the wall clock.
            latest = np.full(n, -np.inf)
            if len(P):
                np.maximum.at(latest, P, T)
            for row, items in periods.items():
                for start, _ in items:
                    if start is not None:
                        latest[row] = max(latest[row], start)
            latest[np.isinf(latest)] = np.nan
            anchor[missing] = latest[missing]
        return anchor

    def _current_encounters(self, n: int, anchor: np.ndarray, pinned: dict[str, str],
                            periods: dict[int, list[tuple[float | None, dict]]]
                            ) -> tuple[list[str | None], np.ndarray, dict[int, dict]]:
        """Each patient's current encounter: ids, start times, and the resource (for Encounter inputs)."""
        ids: list[str | None] = [None] * n
        starts = np.full(n, np.nan)
        pinned_rows = {self._patients[pid]: eid for pid, eid in pinned.items() if pid in self._patients}
        for row, items in periods.items():
            best: tuple[float, dict] | None = None
            when = float(anchor[row])
            if row in pinned_rows:
                chosen = [(start, e) for start, e in items if e.get("id") == pinned_rows[row]]
                if chosen and chosen[0][0] is not None:
                    starts[row], ids[row] = chosen[0][0], chosen[0][1]["id"]
                continue
            for start, enc in items:
                if start is None or (when == when and start > when):
                    continue
                end = _period_end(enc)
                if end is not None and when == when and end < when \
                        and enc.get("status") not in OPEN_STATUSES:
                    continue
                if best is None or start > best[0]:
                    best = (start, enc)
            if best is not None:
                starts[row] = best[0]
                ids[row] = best[1].get("id")
        # Encounter inputs read the last encounter (in the order given) that starts when the current one does.
        current: dict[int, dict] = {}
        for row, items in periods.items():
            start = starts[row]
            for when, enc in items:
                if when == start:
                    current[row] = enc
        return ids, starts, current

    def _static_columns(self, X: np.ndarray, present: np.ndarray, anchor: np.ndarray, enc_start: np.ndarray,
                        current: dict[int, dict], unreadable: list[tuple[int, float, Dropped]]) -> None:
        """Patient and Encounter inputs into their X columns (and ``present``); unreadable ones are missing
        and reported (``unreadable``)."""
        plan = self._plan
        if not plan.static_columns:
            return
        found: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
        for spec in plan.static:
            sources = self._patient_resources if spec.resource == "Patient" else current
            for row, source in sources.items():
                reference = enc_start[row] if not np.isnan(enc_start[row]) else anchor[row]
                try:
                    values = static_value(spec, source, reference)
                except Unreadable as exc:
                    unreadable.append((row, np.nan, Dropped(_reference(source), spec.name, str(exc))))
                    continue
                for key, value in values.items():
                    found.setdefault((spec.name, key), []).append((row, value))
        rows: list[int] = []
        columns: list[int] = []
        inputs: list[int] = []
        values: list[float] = []
        for col, spec, category in plan.static_columns:
            for row, value in found.get((spec.name, category), ()):
                rows.append(row)
                columns.append(col)
                inputs.append(spec.index)
                values.append(value)
        if rows:
            V = np.array(values, dtype=np.float64)
            X[rows, columns] = V
            ok = ~np.isnan(V)
            present[np.array(rows)[ok], np.array(inputs)[ok]] = True

    def _basis(self, n: int, keys: np.ndarray, width: int) -> list[list[str]]:
        """Each patient's Observation references (keys: patient * width + reference number), each once."""
        basis: list[list[str]] = [[] for _ in range(n)]
        if len(keys) == 0:
            return basis
        keys = np.sort(keys)                   # (np.unique's hash table is slower on large unsorted input)
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        rows, obs = np.divmod(keys, width)
        refs = self._refs
        picked = [refs[o] for o in obs.tolist()]
        bounds = (np.flatnonzero(rows[1:] != rows[:-1]) + 1).tolist()
        for row, start, end in zip(rows[[0, *bounds]].tolist(), [0, *bounds], [*bounds, len(picked)]):
            basis[row] = picked[start:end]
        return basis


# Where each Patient/Encounter input is read, and what it must be, for the note when it cannot be read.
_ELEMENTS = {"age": ("birthDate", "a FHIR date"), "gender": ("gender", "a code"),
             "reasonText": ("reasonCode", "a list of CodeableConcepts"), "class": ("class", "a Coding"),
             "serviceType": ("serviceType", "a CodeableConcept"), "type": ("type", "a list of CodeableConcepts"),
             "modeOfArrival": ("extension", "a list of Extensions"), "serviceProvider": ("serviceProvider", "a Reference")}


def static_value(spec: Input, resource: dict, reference_epoch: float) -> dict[str | None, float]:
    """The value(s) of a Patient or Encounter input; {} when absent.

    Raises ``Unreadable`` (naming the element, not the value) when the element is there but is not valid
    FHIR: the caller counts the input missing and says so in the assessment's note.
    """
    try:
        return _static_value(spec, resource, reference_epoch)
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError) as exc:
        element, expected = _ELEMENTS.get(spec.element or "", (spec.element or "element", "valid FHIR"))
        raise Unreadable(element, expected) from exc


def _static_value(spec: Input, resource: dict, reference_epoch: float) -> dict[str | None, float]:
    element = spec.element
    if element == "age":
        birth = resource.get("birthDate")
        if not birth or np.isnan(reference_epoch):
            return {}
        born = _parse_datetime(birth) if birth.__class__ is str else times.parse_datetime(birth)
        ref = datetime.fromtimestamp(reference_epoch, tz=born.tzinfo)
        years = ref.year - born.year - ((ref.month, ref.day) < (born.month, born.day))
        if spec.plausible and not (spec.plausible[0] <= years <= spec.plausible[1]):
            return {}
        return {None: float(years)}
    if element == "gender":
        gender = resource.get("gender") or ""
        if gender.__class__ is not str:
            raise TypeError("gender")
        value = spec.values.get(gender)
        return {} if value is None else {None: value}
    if element == "reasonText":
        texts = [c.get("text") or "" for c in resource.get("reasonCode") or ()]
        texts += [d for c in resource.get("reasonCode") or () for d in
                  (coding.get("display") or "" for coding in c.get("coding") or ())]
        text = " ".join(t for t in texts if t).casefold()
        if not text.strip():
            return {}
        return {key: float(_keyword_pattern(tuple(category["keywords"])).search(text) is not None)
                for key, category in spec.categories.items()}
    codings = _element_codings(resource, element)
    for coding in codings:
        value = spec.coded_value(coding.get("system"), coding.get("code"))
        if value is not None:
            return {None: value}
    return {}


@lru_cache(maxsize=512)
def _keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for a category's keywords.

    Latin keywords match whole words ("ha" is headache, not the start of "hand"); a trailing * makes a
    prefix ("lacer*" finds "laceration"); spaces match any run of spaces or punctuation. Hangul keywords
    match anywhere, because Korean attaches particles to words ("복통이", "두통으로").
    """
    parts = []
    for keyword in keywords:
        word = keyword.casefold().strip()
        prefix = word.endswith("*")
        word = word.rstrip("*")
        body = r"[\s,./\-]+".join(re.escape(piece) for piece in word.split())
        if _HANGUL.search(word):
            parts.append(body)
        else:
            parts.append(rf"(?<!\w){body}" + ("" if prefix else r"(?!\w)"))
    return re.compile("|".join(parts))


_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")


def _element_codings(resource: dict, element: str | None) -> list[dict]:
    if element == "class":
        value = resource.get("class")
        return [value] if isinstance(value, dict) else []
    if element == "serviceType":
        return (resource.get("serviceType") or {}).get("coding") or []
    if element == "type":
        return [c for t in resource.get("type") or () for c in t.get("coding") or ()]
    if element == "modeOfArrival":
        return [ext["valueCoding"] for ext in resource.get("extension") or ()
                if ext.get("url", "").endswith("encounter-modeOfArrival") and "valueCoding" in ext]
    if element == "serviceProvider":
        provider = resource.get("serviceProvider") or {}
        ident = provider.get("identifier") or {}
        return [{"system": ident.get("system"), "code": ident.get("value")},
                {"code": provider.get("reference")}, {"code": provider.get("display")}]
    return []


def _patient_id(resource: dict) -> str | None:
    subject = resource.get("subject") or resource.get("patient")
    return patient_id(subject.get("reference") if isinstance(subject, dict) else None)


def _reference(resource: dict) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _is_none(values: np.ndarray) -> np.ndarray:
    return np.fromiter((v is None for v in values), bool, len(values))


# The same birth dates and encounter periods come back request after request: parse each once.
_parse_datetime = lru_cache(maxsize=4096)(times.parse_datetime)
_to_epoch = lru_cache(maxsize=4096)(times.to_epoch)


def _period_time(enc: dict, end: str) -> float | None:
    """period.start or period.end in epoch seconds, None if absent; Unreadable if there but not valid."""
    period = enc.get("period")
    if not period:
        return None
    if not isinstance(period, dict):
        raise Unreadable("period", "a Period")
    when = period.get(end)
    if not when:
        return None
    try:
        return _to_epoch(when) if when.__class__ is str else times.to_epoch(when)
    except ValueError:
        raise Unreadable(f"period.{end}", "a FHIR dateTime") from None


def _class_code(encounter: dict | None) -> str | None:
    """Encounter.class (a Coding in R4) as its code; None when there is no encounter or no readable class."""
    coding = (encounter or {}).get("class")
    code = coding.get("code") if isinstance(coding, dict) else None
    return code if isinstance(code, str) else None


def _period_start(enc: dict) -> float | None:
    return _period_time(enc, "start")


def _period_end(enc: dict) -> float | None:
    return _period_time(enc, "end")
