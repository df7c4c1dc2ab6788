"""The columnar form every Observation takes before feature extraction, and its per-resource builder.

One row per (Observation part, coding whose code some mapping knows): part 0 is the Observation itself,
part k its k-th component (blood-pressure panels). Two front-ends fill it — ``ColumnBuilder`` from
resource dicts (single patients, training) and ``features.ndjson`` from a Bulk-Data export with DuckDB —
and ``Extractor.add_columns`` is the one core that turns it into values, so every path gives the same
features.

Resources from a hospital server can be JSON without being valid FHIR. What cannot be read never raises
here: an Observation without a readable code or subject says neither what was measured nor of whom, so it is
left out like one of a code no model reads (so is one whose id is not a string: it cannot be named); a part
whose value[x] or effective time cannot be read (an effective[x] that is there but unreadable included: it
does not fall back on ``issued``) gets a row that says why (``invalid``, ``time_text``), so that
``Extractor.add_columns`` reports it in the assessment's note ("Values not used") and never uses it.
``features.ndjson`` makes the same decisions in SQL.
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
# Why a part's value[x] cannot be read (0 = it can). ``features.extract._REASONS`` has their texts (no values:
# they may be PHI); ``features.ndjson`` computes the same codes in SQL.
QUANTITY_INVALID = 6        # valueQuantity is not an object, or its unit/system/code are not strings
QUANTITY_NOT_NUMBER = 7     # valueQuantity.value is not a JSON number (a string, true, a list; NaN, ±Infinity)
INTEGER_INVALID = 8         # valueInteger is not a JSON integer (BIGINT/UBIGINT range, as DuckDB reads it)
BOOLEAN_INVALID = 9         # valueBoolean is not true or false
CONCEPT_INVALID = 10        # valueCodeableConcept is not an object, or its codings cannot be read
_NO_SUBJECT: dict = {}
_INTEGER_LOW, _INTEGER_HIGH = -2 ** 63, 2 ** 64
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
    invalid: np.ndarray        # int8: 0, or why the part's value[x] cannot be read (QUANTITY_INVALID, ...)
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


def patient_id(reference: Any) -> str | None:
    """The Patient id a reference points to ('Patient/1', '.../Patient/1', 'Patient/1/_history/2').

    None for anything else, a reference that is not a string included (it names no one we can tell).
    """
    if not reference or reference.__class__ is not str:
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
        # A code, coding or component list that is not what FHIR says it is names nothing we know: left out,
        # like a code no model reads (cheap class checks; the common case does no more than before).
        try:
            codings = code.get("coding") or ()
        except AttributeError:      # no code, or one that is no object
            codings = ()
        if components and components.__class__ is not list:
            components = None
        if not components:
            # The common case, one part: the Observation's own codings.
            try:
                if len(codings) == 1:
                    coding = codings[0]
                    key = (coding.get("system"), coding.get("code"))
                    if key not in known:
                        return None           # a code no model reads: nothing to do
                    matched = [key]
                else:
                    matched = [key for key in map(_coding_key, codings) if key is not None and key in known]
                    if not matched:
                        return None
            except (AttributeError, TypeError, KeyError):
                return None     # codings that are no list of objects, a code that is a list: nothing we know
            pid = self._patient_id(obs)
            if pid is None or not _usable_id(obs):
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
        if pid is None or not _usable_id(obs):
            return None
        parts = [(codings, obs)]
        for component in components:
            if component.__class__ is not dict:
                parts.append(((), {}))      # keeps the numbering of the other components (as DuckDB's)
                continue
            part_code = component.get("code")
            part_codings = part_code.get("coding") if part_code.__class__ is dict else None
            parts.append((part_codings if part_codings.__class__ is list else (), component))
        if codings.__class__ is not list:
            parts[0] = ((), obs)
        head: tuple | None = None
        for part, (codings, holder) in enumerate(parts):
            values: tuple | None = None
            for coding in codings:
                key = _coding_key(coding)
                if key is None or key not in known:
                    continue
                if head is None:
                    head = self._head(obs, pid)
                if values is None:
                    values = self._values(holder)
                self.rows.append((*head, part, self._codes.setdefault(key, len(self._codes)), *values))
        return pid if head is not None else None

    def _patient_id(self, obs: dict) -> str | None:
        try:
            reference = (obs.get("subject") or obs.get("patient") or _NO_SUBJECT).get("reference")
            return self._subjects[reference]
        except KeyError:
            pid = self._subjects[reference] = patient_id(reference)    # None unless a string names a Patient
            return pid
        except (AttributeError, TypeError):
            return None       # a subject that is no object, a reference that is a list: no one's we can tell

    def _head(self, obs: dict, pid: str) -> tuple:
        """What every row of the Observation shares: ordinal, id, patient, status, time."""
        when = times.effective_time(obs)
        if when.__class__ is not str and when is not None:
            when = ""        # an effective time that is not a string (false, 0, a list): unreadable, reported
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
        try:
            status = _STATUS_NO.get(obs.get("status"), -1)    # type: ignore[arg-type]
        except TypeError:      # a status that is a list: unknown, like any status we do not know
            status = -1
        head = (self._count, obs.get("id"), patient, status, t, when if t != t else None)
        self._count += 1
        return head

    def _values(self, holder: dict) -> tuple:
        """(has_quantity, quantity, unit, integer, boolean, concept, invalid) of one part.

        A value[x] that is not what FHIR says (valueQuantity.value "high", true or a list; valueInteger 13.5;
        valueBoolean "yes") is not converted but flagged (``invalid``): the reading is reported and not used.
        Class checks and one range comparison only (NaN and ±inf fail it); nothing is tried and caught.
        """
        invalid = 0
        q = holder.get("valueQuantity")
        if q.__class__ is dict:
            raw = q.get("value")
            # A JSON number (a bool's class is bool, not int); NaN and ±inf fail the range (constants: fast).
            if (raw.__class__ is float or raw.__class__ is int) \
                    and -1.7976931348623157e308 <= raw <= 1.7976931348623157e308:
                quantity = float(raw)
            elif raw is None:
                quantity = np.nan          # a Quantity without a value: nothing to use (not an error)
            else:
                quantity, invalid = np.nan, QUANTITY_NOT_NUMBER
            sent = (q.get("system"), q.get("code"), q.get("unit"))
            try:
                unit = self._sent_units.get(sent)
                if unit is None:           # a unit not seen before: checked once, then cached
                    if not all(v is None or v.__class__ is str for v in sent):
                        raise TypeError("unit, system or code is not a string")
                    unit = self._sent_units[sent] = self._units.setdefault(unit_key(q), len(self._units))
            except TypeError:              # a unit, system or code that is not a string
                quantity, unit, invalid = np.nan, -1, QUANTITY_INVALID
        elif q is not None:
            quantity, unit, invalid = np.nan, -1, QUANTITY_INVALID      # a valueQuantity that is no object
        else:
            quantity, unit = np.nan, -1
        if "valueInteger" in holder:
            integer = holder["valueInteger"]
            if integer.__class__ is int and _INTEGER_LOW <= integer < _INTEGER_HIGH:
                integer = float(integer)
            elif integer is None:
                integer = np.nan
            else:                          # 13.5, "14", true
                integer, invalid = np.nan, invalid or INTEGER_INVALID
        else:
            integer = np.nan
        if "valueBoolean" in holder:
            boolean = holder["valueBoolean"]
            if boolean.__class__ is bool:
                boolean = 1 if boolean else 0
            elif boolean is None:
                boolean = -1
            else:                          # "yes", 1
                boolean, invalid = -1, invalid or BOOLEAN_INVALID
        else:
            boolean = -1
        concept = holder.get("valueCodeableConcept")
        if concept is not None and concept.__class__ is not dict:
            concept, invalid = None, invalid or CONCEPT_INVALID
        return q is not None, quantity, unit, integer, boolean, concept, invalid

    def take(self) -> ObservationColumns:
        """Everything buffered so far as columns; the buffer starts again empty."""
        rows, self.rows = self.rows, []
        self._epochs = {}
        n = len(rows)
        cols = list(zip(*rows)) if rows else [()] * 15
        obs, ids, patients, status, t, when, part, code, has_q, quantity, unit, integer, boolean, concept, invalid \
            = cols
        columns = ObservationColumns(
            obs=np.fromiter(obs, np.int64, n), obs_id=_objects(ids), part=np.fromiter(part, np.int64, n),
            patient=np.fromiter(patients, np.int64, n), code=np.fromiter(code, np.int64, n),
            status=np.fromiter(status, np.int64, n), time=np.fromiter(t, np.float64, n), time_text=_objects(when),
            has_quantity=np.fromiter(has_q, bool, n), quantity=np.fromiter(quantity, np.float64, n),
            unit=np.fromiter(unit, np.int64, n), integer=np.fromiter(integer, np.float64, n),
            boolean=np.fromiter(boolean, np.int64, n), concept=_objects(concept),
            invalid=np.fromiter(invalid, np.int8, n),
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
    except (ValueError, OverflowError):       # OverflowError: year 1 with a positive offset, say
        return np.nan


def _usable_id(resource: dict) -> bool:
    """False for an id that is there but no string (a number, object or list): such a resource cannot be
    named in a basis or note, nor told apart from another; it is left out (``fhir.sources`` and
    ``features.ndjson`` leave it out too). A resource without an id is kept, as before."""
    rid = resource.get("id")
    return rid.__class__ is str or rid is None


def _coding_key(coding: Any) -> tuple[Any, Any] | None:
    """(system, code) of a coding; None if it is no object or its parts cannot be looked up (lists)."""
    if coding.__class__ is not dict:
        return None
    key = (coding.get("system"), coding.get("code"))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
