"""The columnar form every Observation takes before feature extraction, and its per-resource builder.

One row per (Observation part, coding whose code some mapping knows): part 0 is the Observation itself,
part k its k-th component (blood-pressure panels). Two front-ends fill it — ``ColumnBuilder`` from
resource dicts (single patients, training) and ``features.ndjson`` from a Bulk-Data export with DuckDB —
and ``Extractor.add_columns`` is the one core that turns it into values, so every path gives the same
features.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from ..fhir import times
from ..mapping.schema import OBSERVATION_STATUSES

UCUM = "http://unitsofmeasure.org"
STATUSES: tuple[str, ...] = tuple(OBSERVATION_STATUSES)
_STATUS_NO = {status: i for i, status in enumerate(STATUSES)}
UnitKey = tuple[str | None, str | None, str | None]   # (UCUM code or None, unit text, code as sent)


@dataclass
class ObservationColumns:
    """Rows in input order (an Observation's rows are contiguous, parts and codings in order)."""
    obs: np.ndarray            # int64: Observation ordinal, unique per Observation in this batch
    obs_id: np.ndarray         # object: Observation.id
    part: np.ndarray           # int64: 0 = Observation.code, k = component k
    patient: np.ndarray        # int64: index into patient_ids
    code: np.ndarray           # int64: index into codes
    status: np.ndarray         # int64: index into STATUSES, -1 = missing or unknown
    time: np.ndarray           # float64: epoch seconds; NaN = parse time_text (None there = no time at all)
    time_text: np.ndarray      # object: the effective time as sent, where ``time`` is NaN
    has_quantity: np.ndarray   # bool: the part has a valueQuantity
    quantity: np.ndarray       # float64: valueQuantity.value, NaN = none
    unit: np.ndarray           # int64: index into units, -1 = no valueQuantity
    integer: np.ndarray        # float64: valueInteger, NaN = none
    boolean: np.ndarray        # int64: valueBoolean 0/1, -1 = none
    concept: np.ndarray        # object: valueCodeableConcept (dict, or its JSON text), None = none
    patient_ids: Sequence[str]
    codes: Sequence[tuple[str, str]]
    units: Sequence[UnitKey]

    def __len__(self) -> int:
        return len(self.obs)

    def take(self, index: np.ndarray) -> "ObservationColumns":
        """The same batch restricted to (or reordered by) ``index``."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, np.ndarray) else value
        return ObservationColumns(**values)


def unit_key(quantity: dict) -> UnitKey:
    code = quantity.get("code")
    return (code if quantity.get("system") in (None, UCUM) else None, quantity.get("unit"), code)


def patient_id(reference: str | None) -> str | None:
    """The Patient id a reference points to ('Patient/1', '.../Patient/1', 'Patient/1/_history/2')."""
    if not reference:
        return None
    if reference.startswith("Patient/"):
        return reference[8:].split("/_history", 1)[0]
    return reference.rsplit("Patient/", 1)[-1] if "Patient/" in reference else None


class ColumnBuilder:
    """Flattens Observation dicts into ObservationColumns, keeping only codings some input knows."""

    def __init__(self, known_codes: dict[tuple[str, str], Any]) -> None:
        self._known = known_codes
        self._codes: dict[tuple[str, str], int] = {}
        self._units: dict[UnitKey, int] = {}
        self._sent_units: dict[tuple, int] = {}
        self._patients: dict[str, int] = {}
        self._subjects: dict[str | None, str | None] = {}     # reference -> patient id
        self._epochs: dict[str, float] = {}                    # time text -> epoch (emptied by take)
        self.rows: list[tuple] = []                             # buffered rows (a new list after take)
        self._count = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, obs: dict) -> str | None:
        """Buffer the Observation's known codings; the patient id if it had any, else None."""
        known = self._known
        code = obs.get("code")
        components = obs.get("component")
        codings = (code.get("coding") if code else None) or ()
        if not components:
            # The common case, one part: the Observation's own codings.
            if len(codings) == 1:
                coding = codings[0]
                key = (coding.get("system"), coding.get("code"))
                if key not in known:
                    return None           # a code no model reads: nothing to do
                matched = [key]
            else:
                matched = [key for key in [(c.get("system"), c.get("code")) for c in codings] if key in known]
                if not matched:
                    return None
            pid = self._patient_id(obs)
            if pid is None:
                return None
            head = self._head(obs, pid)
            values = self._values(obs)
            codes, rows = self._codes, self.rows
            for key in matched:
                code_no = codes.get(key)
                if code_no is None:
                    code_no = codes[key] = len(codes)
                rows.append((*head, 0, code_no, *values))
            return pid
        pid = self._patient_id(obs)
        if pid is None:
            return None
        parts = [(codings, obs)]
        for component in components:
            parts.append((((component.get("code") or {}).get("coding")) or (), component))
        head: tuple | None = None
        for part, (codings, holder) in enumerate(parts):
            values: tuple | None = None
            for coding in codings:
                key = (coding.get("system"), coding.get("code"))
                if key not in known:
                    continue
                if head is None:
                    head = self._head(obs, pid)
                if values is None:
                    values = self._values(holder)
                self.rows.append((*head, part, self._codes.setdefault(key, len(self._codes)), *values))
        return pid if head is not None else None

    def _patient_id(self, obs: dict) -> str | None:
        reference = (obs.get("subject") or obs.get("patient") or {}).get("reference")
        try:
            return self._subjects[reference]
        except KeyError:
            pid = self._subjects[reference] = patient_id(reference)
            return pid

    def _head(self, obs: dict, pid: str) -> tuple:
        """What every row of the Observation shares: ordinal, id, patient, status, time."""
        when = times.effective_time(obs)
        if when:
            t = self._epochs.get(when)
            if t is None:
                t = self._epochs[when] = epoch(when)
        else:
            t = np.nan
        patients = self._patients
        patient = patients.get(pid)
        if patient is None:
            patient = patients[pid] = len(patients)
        head = (self._count, obs.get("id"), patient, _STATUS_NO.get(obs.get("status"), -1),  # type: ignore[arg-type]
                t, when if t != t else None)
        self._count += 1
        return head

    def _values(self, holder: dict) -> tuple:
        q = holder.get("valueQuantity")
        if q is not None:
            raw = q.get("value")
            quantity = float(raw) if raw is not None else np.nan
            sent = (q.get("system"), q.get("code"), q.get("unit"))
            unit = self._sent_units.get(sent)
            if unit is None:
                unit = self._sent_units[sent] = self._units.setdefault(unit_key(q), len(self._units))
        else:
            quantity, unit = np.nan, -1
        integer = float(holder["valueInteger"]) if "valueInteger" in holder else np.nan
        boolean = (1 if holder["valueBoolean"] else 0) if "valueBoolean" in holder else -1
        return q is not None, quantity, unit, integer, boolean, holder.get("valueCodeableConcept")

    def take(self) -> ObservationColumns:
        """Everything buffered so far as columns; the buffer starts again empty."""
        rows, self.rows = self.rows, []
        self._epochs = {}
        n = len(rows)
        cols = list(zip(*rows)) if rows else [()] * 14
        obs, ids, patients, status, t, when, part, code, has_q, quantity, unit, integer, boolean, concept = cols
        columns = ObservationColumns(
            obs=np.fromiter(obs, np.int64, n), obs_id=_objects(ids), part=np.fromiter(part, np.int64, n),
            patient=np.fromiter(patients, np.int64, n), code=np.fromiter(code, np.int64, n),
            status=np.fromiter(status, np.int64, n), time=np.fromiter(t, np.float64, n), time_text=_objects(when),
            has_quantity=np.fromiter(has_q, bool, n), quantity=np.fromiter(quantity, np.float64, n),
            unit=np.fromiter(unit, np.int64, n), integer=np.fromiter(integer, np.float64, n),
            boolean=np.fromiter(boolean, np.int64, n), concept=_objects(concept),
            patient_ids=list(self._patients), codes=list(self._codes), units=list(self._units))
        return columns


def epoch(text: str) -> float:
    """times.to_epoch with a fast path for the common full dateTime with offset; NaN if unreadable."""
    try:
        if len(text) > 10:
            parsed = datetime.fromisoformat(text)
            if parsed.tzinfo is not None:
                return parsed.timestamp()     # the instant does not depend on the zone it is written in
        return times.to_epoch(text)
    except ValueError:
        return np.nan


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
