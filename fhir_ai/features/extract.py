"""One columnar feature-extraction path for training, bulk scoring and single patients.

Resources go in one at a time (cheap dict look-ups per Observation); values land in flat arrays
(patient, input, time, value); every feature is then a vectorised grouped aggregate over a window
relative to each patient's as-of time.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime
from typing import Any, Iterable

import numpy as np
import orjson

from ..fhir import times
from ..mapping import Input, Mapping
from .aggregate import grouped, grouped_many
from .columns import STATUSES, ColumnBuilder, ObservationColumns, patient_id

_FLUSH_ROWS = 200_000
# Why a matched value was not used (0 = used); unit, coded-value and plausibility reasons carry detail.
_REASONS = {1: "no effective time", 2: "unreadable effective time", 3: "unit cannot be converted",
            4: "coded value not in the mapping's values", 5: "implausible value"}

log = logging.getLogger(__name__)

UCUM = "http://unitsofmeasure.org"
_ENDED_ENCOUNTER = {"cancelled", "entered-in-error"}


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

    @property
    def feature_names(self) -> list[str]:
        return self.mapping.feature_names

    def row(self, patient_id: str) -> int:
        return self.patient_ids.index(patient_id)

    def core_count(self) -> np.ndarray:
        columns = [self.mapping.inputs[name].index for name in self.mapping.core_inputs]
        return self.present[:, columns].sum(axis=1)

    def sufficient(self) -> np.ndarray:
        return self.core_count() >= self.mapping.min_core_inputs

    def missing_inputs(self, row: int) -> list[str]:
        """Inputs some model feature reads that had no value for this patient."""
        wanted = dict.fromkeys(f.input for f in self.mapping.features)
        return [name for name in wanted if not self.present[row, self.mapping.inputs[name].index]]


class Extractor:
    """Accumulate FHIR resources for any number of patients; ``finish`` builds the FeatureSet."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self._inputs = mapping.input_list
        self._static = [spec for spec in self._inputs if not spec.is_observation]
        self._patients: dict[str, int] = {}
        self._patient_resources: dict[int, dict] = {}
        self._encounters: dict[int, list[dict]] = {}
        self._chunks: list[tuple[np.ndarray, ...]] = []      # (P, I, T, V, O) per add_columns call
        self._refs: list[str] = []
        self._builder = ColumnBuilder(mapping.code_index)
        self._dropped: list[tuple[int, float, Dropped]] = []
        self._conversions: dict[tuple[int, str | None, str | None], tuple[float, float] | None] = {}

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
        for resource in resources:
            self.add(resource)

    def add_patient(self, patient: dict) -> None:
        self._patient_resources[self.patient_row(patient["id"])] = patient

    def add_encounter(self, encounter: dict) -> None:
        patient_id = _patient_id(encounter)
        if patient_id is not None and encounter.get("status") not in _ENDED_ENCOUNTER:
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
        rows, inputs = self._match(cols)
        if not len(rows):
            return
        first = np.unique(cols.patient[rows], return_index=True)
        for code in first[0][np.argsort(first[1], kind="stable")]:
            self.patient_row(cols.patient_ids[code])
        lookup = np.fromiter((self._patients.get(pid, -1) for pid in cols.patient_ids), np.int64,
                             len(cols.patient_ids))
        P = lookup[cols.patient[rows]]
        T = self._times(cols, rows)
        problem = np.zeros(len(rows), dtype=np.int8)      # 0 ok, see _REASONS
        problem[np.isnan(T)] = np.where(_is_none(cols.time_text[rows[np.isnan(T)]]), 1, 2)
        timed = problem == 0
        allowed = np.zeros((len(self._inputs), len(STATUSES) + 1), dtype=bool)
        for spec in self._inputs:
            for status in spec.statuses:
                allowed[spec.index, STATUSES.index(status)] = True
        counted = timed & allowed[inputs, cols.status[rows]]     # status -1 reads the last (False) column
        V = np.full(len(rows), np.nan)
        text: dict[int, str] = {}
        for spec in self._inputs:
            sel = np.flatnonzero(counted & (inputs == spec.index))
            if len(sel):
                self._values(spec, cols, rows, sel, V, problem, text)
        kept = counted & (problem == 0) & ~np.isnan(V)
        self._keep(cols, rows[kept], P[kept], inputs[kept], T[kept], V[kept])
        for j in np.flatnonzero(problem):
            reason = text.get(int(j)) or _REASONS[problem[j]]
            ref = f"Observation/{cols.obs_id[rows[j]]}"
            self._dropped.append((int(P[j]), float(T[j]), Dropped(ref, self._inputs[inputs[j]].name, reason)))

    def _match(self, cols: ObservationColumns) -> tuple[np.ndarray, np.ndarray]:
        """(row, input) pairs: each coding's inputs; one pair per input and Observation part."""
        index = self.mapping.code_index
        targets = [index.get(tuple(code), []) for code in cols.codes]   # type: ignore[arg-type]
        counts = np.fromiter((len(t) for t in targets), np.int64, len(targets))
        per_row = counts[cols.code]
        rows = np.repeat(np.arange(len(cols)), per_row)
        if not len(rows):
            return rows, rows
        starts = np.cumsum(counts) - counts
        flat = np.fromiter((i for t in targets for i in t), np.int64, int(counts.sum()))
        offset = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        inputs = flat[starts[cols.code[rows]] + offset]
        # The same input named twice in one part (two codings of one concept) is one value, not two.
        group = np.concatenate(([0], np.cumsum((np.diff(cols.obs[rows]) != 0) | (np.diff(cols.part[rows]) != 0))))
        key = group * (len(self._inputs) + 1) + inputs
        if len(np.unique(key)) < len(key):
            keep = np.sort(np.unique(key, return_index=True)[1])
            rows, inputs = rows[keep], inputs[keep]
        return rows, inputs

    @staticmethod
    def _times(cols: ObservationColumns, rows: np.ndarray) -> np.ndarray:
        T = cols.time[rows].copy()
        missing = np.flatnonzero(np.isnan(T))
        parsed: dict[str, float] = {}
        for j in missing:
            text = cols.time_text[rows[j]]
            if text is None:
                continue
            if text not in parsed:
                try:
                    parsed[text] = times.to_epoch(text)
                except ValueError:
                    parsed[text] = np.nan
            T[j] = parsed[text]
        return T

    def _values(self, spec: Input, cols: ObservationColumns, rows: np.ndarray, sel: np.ndarray,
                V: np.ndarray, problem: np.ndarray, text: dict[int, str]) -> None:
        """Values of one input's rows ``sel`` into V (NaN = no value); refusals into problem/text."""
        r = rows[sel]
        kind = spec.value_type
        if kind == "boolean":
            b = cols.boolean[r]
            V[sel] = np.where(b >= 0, b.astype(np.float64), np.nan)
            return
        if kind == "coding":
            for j, concept in zip(sel, cols.concept[r]):
                if concept is None:
                    continue
                if isinstance(concept, (str, bytes)):
                    concept = orjson.loads(concept)
                for coding in concept.get("coding") or ():
                    mapped = spec.coded_value(coding.get("system"), coding.get("code"))
                    if mapped is not None:
                        V[j] = mapped
                        break
                else:
                    problem[j] = 4
            return
        q, has_q, integer = cols.quantity[r], cols.has_quantity[r], cols.integer[r]
        if kind == "integer":
            value = np.where(~np.isnan(integer), integer, np.where(has_q, q, np.nan))
        else:
            value = np.where(has_q, q, integer)
            converted = np.flatnonzero(has_q & ~np.isnan(q))
            if len(converted):
                units, inverse = np.unique(cols.unit[r[converted]], return_inverse=True)
                scale = np.empty(len(units))
                shift = np.empty(len(units))
                for u, unit in enumerate(units):
                    code, unit_text, sent = cols.units[unit]
                    key = (spec.index, code, unit_text)
                    if key not in self._conversions:
                        self._conversions[key] = spec.unit_conversion(code, unit_text)
                    conv = self._conversions[key]
                    scale[u], shift[u] = conv if conv is not None else (np.nan, np.nan)
                    if conv is None:
                        bad = converted[inverse == u]
                        problem[sel[bad]] = 3
                        reason = f"unit {sent or unit_text!r} cannot be converted to {spec.unit!r}"
                        text.update(dict.fromkeys(sel[bad].tolist(), reason))
                value[converted] = value[converted] * scale[inverse] + shift[inverse]
        V[sel] = value
        if spec.plausible:
            low, high = spec.plausible
            out = np.flatnonzero(~np.isnan(value) & ~((low <= value) & (value <= high)) & (problem[sel] == 0))
            for j in out:
                problem[sel[j]] = 5
                text[int(sel[j])] = (f"implausible value {value[j]:g} {spec.unit or ''} "
                                     f"(plausible {low:g}-{high:g})").replace("  ", " ")

    def _keep(self, cols: ObservationColumns, rows: np.ndarray, P: np.ndarray, I: np.ndarray, T: np.ndarray,
              V: np.ndarray) -> None:
        if not len(rows):
            return
        ordinals, first, inverse = np.unique(cols.obs[rows], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")          # references in order of first appearance
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        base = len(self._refs)
        self._refs.extend(f"Observation/{cols.obs_id[rows[first[k]]]}" for k in order)
        self._chunks.append((P, I, T, V, base + rank[inverse]))

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
        P, I, T, V, O = (np.concatenate(parts) if self._chunks else np.empty(0, dtype)
                         for parts, dtype in zip(zip(*self._chunks) if self._chunks else [()] * 5,
                                                 (np.int64, np.int64, np.float64, np.float64, np.int64)))
        anchor = self._as_of(ids, as_of, P, T)
        encounter_ids, enc_start = self._current_encounters(n, anchor, encounters or {})
        order = np.lexsort((T, P))
        P, I, T, V, O = P[order], I[order], T[order], V[order], O[order]

        features = self.mapping.features
        X = np.full((n, len(features)), np.nan)
        used = np.zeros(len(P), dtype=bool)
        present = np.zeros((n, len(self._inputs)), dtype=bool)
        # Rows of each input (still sorted by patient and time), found with one stable sort.
        by_i = np.argsort(I, kind="stable")
        bounds = np.searchsorted(I[by_i], np.arange(len(self._inputs) + 1))
        by_input = {spec.index: by_i[bounds[spec.index]:bounds[spec.index + 1]]
                    for spec in self._inputs if spec.is_observation}
        statics = self._static_values(n, anchor, enc_start)
        # Features of one input over one window share the selection and the per-patient segments.
        groups: dict[tuple, list[int]] = {}
        for col, feature in enumerate(features):
            spec = self.mapping.inputs[feature.input]
            if not spec.is_observation:
                X[:, col] = statics[(feature.input, feature.category)]
                present[:, spec.index] |= ~np.isnan(X[:, col])
                continue
            groups.setdefault((spec.index, feature.window_start, feature.window_end), []).append(col)
        for (index, start, end), columns in groups.items():
            sel = by_input[index]
            sel = sel[self._in_window(start, end, P[sel], T[sel], anchor, enc_start)]
            values = grouped_many([features[col].aggregate for col in columns], P[sel], T[sel], V[sel], anchor, n)
            for col, value in zip(columns, values):
                X[:, col] = value
            used[sel] = True
            present[P[sel], index] = True
        news2 = {}
        news2_used = np.zeros(len(P), dtype=bool)
        if self.mapping.news2:
            for param, name in self.mapping.news2["inputs"].items():
                sel = by_input[self.mapping.inputs[name].index]
                sel = sel[self._in_window(-self.mapping.news2["window"], 0.0, P[sel], T[sel], anchor, enc_start)]
                news2[param] = grouped("last", P[sel], T[sel], V[sel], anchor, n)
                # The latest value of each patient is the one NEWS2 reads.
                if len(sel):
                    last = np.append(P[sel][1:] != P[sel][:-1], True)
                    news2_used[sel[last]] = True
        reference = None
        if self.mapping.second_reader:
            spec = self.mapping.inputs[self.mapping.second_reader["input"]]
            sel = by_input[spec.index]
            sel = sel[self._in_window(self.mapping.second_reader["start"], self.mapping.second_reader["end"],
                                      P[sel], T[sel], anchor, enc_start)]
            reference = grouped("last", P[sel], T[sel], V[sel], anchor, n)
            used[sel] = True
        basis = self._basis(n, P[used], O[used])
        news2_basis = self._basis(n, P[news2_used], O[news2_used])
        dropped: list[list[Dropped]] = [[] for _ in range(n)]
        for row, t, item in self._dropped:
            if not (t > anchor[row]):     # keep NaN times; hide what lies after the as-of time
                dropped[row].append(item)
        return FeatureSet(self.mapping, ids, X, anchor, encounter_ids, basis, dropped, present, news2, news2_basis,
                          reference)

    def _as_of(self, ids: list[str], as_of: Any, P: np.ndarray, T: np.ndarray) -> np.ndarray:
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
            for row, encounters in self._encounters.items():
                for enc in encounters:
                    start = _period_start(enc)
                    if start is not None:
                        latest[row] = max(latest[row], start)
            latest[np.isinf(latest)] = np.nan
            anchor[missing] = latest[missing]
        return anchor

    def _current_encounters(self, n: int, anchor: np.ndarray,
                            pinned: dict[str, str]) -> tuple[list[str | None], np.ndarray]:
        ids: list[str | None] = [None] * n
        starts = np.full(n, np.nan)
        pinned_rows = {self._patients[pid]: eid for pid, eid in pinned.items() if pid in self._patients}
        for row, encounters in self._encounters.items():
            best: tuple[float, dict] | None = None
            if row in pinned_rows:
                chosen = [e for e in encounters if e.get("id") == pinned_rows[row]]
                start = _period_start(chosen[0]) if chosen else None
                if start is not None:
                    starts[row], ids[row] = start, chosen[0]["id"]
                continue
            for enc in encounters:
                start = _period_start(enc)
                if start is None or (not np.isnan(anchor[row]) and start > anchor[row]):
                    continue
                end = _period_end(enc)
                if end is not None and not np.isnan(anchor[row]) and end < anchor[row] \
                        and enc.get("status") not in ("in-progress", "arrived", "triaged", "onleave"):
                    continue
                if best is None or start > best[0]:
                    best = (start, enc)
            if best is not None:
                starts[row] = best[0]
                ids[row] = best[1].get("id")
        return ids, starts

    @staticmethod
    def _in_window(start: float | str | None, end: float | None, P: np.ndarray, T: np.ndarray,
                   anchor: np.ndarray, enc_start: np.ndarray) -> np.ndarray:
        a = anchor[P]
        upper = T <= a + (end or 0.0)
        if start == "unbounded":
            return upper
        if start == "encounter":
            return upper & (T >= enc_start[P])
        return upper & (T >= a + float(start))

    def _static_values(self, n: int, anchor: np.ndarray, enc_start: np.ndarray) -> dict[tuple[str, str | None], np.ndarray]:
        out: dict[tuple[str, str | None], np.ndarray] = {}
        current: dict[int, dict] = {}
        for row, encounters in self._encounters.items():
            start = enc_start[row]
            for enc in encounters:
                if _period_start(enc) == start:
                    current[row] = enc
        for spec in self._static:
            keys = list(spec.categories) if spec.element == "reasonText" else [None]
            columns = {key: np.full(n, np.nan) for key in keys}
            for row in range(n):
                source = self._patient_resources.get(row) if spec.resource == "Patient" else current.get(row)
                if source is None:
                    continue
                reference = enc_start[row] if not np.isnan(enc_start[row]) else anchor[row]
                for key, value in static_value(spec, source, reference).items():
                    columns[key][row] = value
            for key, column in columns.items():
                out[(spec.name, key)] = column
        return out

    def _basis(self, n: int, P: np.ndarray, O: np.ndarray) -> list[list[str]]:
        """Each patient's Observation references, in order of first use, each once."""
        basis: list[list[str]] = [[] for _ in range(n)]
        if len(P) == 0:
            return basis
        width = len(self._refs)
        pairs = np.unique(P * width + O)
        rows, obs = np.divmod(pairs, width)
        refs = np.asarray(self._refs, dtype=object)[obs]
        bounds = np.flatnonzero(np.diff(rows)) + 1
        for row, group in zip(rows[np.r_[0, bounds]].tolist(), np.split(refs, bounds)):
            basis[row] = group.tolist()
        return basis


def static_value(spec: Input, resource: dict, reference_epoch: float) -> dict[str | None, float]:
    """The value(s) of a Patient or Encounter input; {} when absent."""
    element = spec.element
    if element == "age":
        birth = resource.get("birthDate")
        if not birth or np.isnan(reference_epoch):
            return {}
        born = times.parse_datetime(birth)
        ref = datetime.fromtimestamp(reference_epoch, tz=born.tzinfo)
        years = ref.year - born.year - ((ref.month, ref.day) < (born.month, born.day))
        if spec.plausible and not (spec.plausible[0] <= years <= spec.plausible[1]):
            return {}
        return {None: float(years)}
    if element == "gender":
        value = spec.values.get(resource.get("gender") or "")
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
    return patient_id((resource.get("subject") or resource.get("patient") or {}).get("reference"))


def _is_none(values: np.ndarray) -> np.ndarray:
    return np.fromiter((v is None for v in values), bool, len(values))


def _period_start(enc: dict) -> float | None:
    start = (enc.get("period") or {}).get("start")
    return times.to_epoch(start) if start else None


def _period_end(enc: dict) -> float | None:
    end = (enc.get("period") or {}).get("end")
    return times.to_epoch(end) if end else None
