"""Bulk-Data NDJSON → per-patient-chunk ObservationColumns with DuckDB, in bounded memory.

DuckDB reads the Observation files once with explicit columns (no per-line JSON parsing in Python) into
one table: in memory for exports up to 256 MB of Observation NDJSON, beyond that in a temporary on-disk
database (compressed, cached only up to ``memory_limit``), so memory stops growing however many
patients the export holds. Exports are not sorted by patient: patients are numbered in id order and cut
into chunks of whole patients; each chunk's rows (one per Observation part and coding some mapping knows,
in file order) are selected, flattened and fetched when the chunk is due — in a background thread,
while the caller scores the chunk before it. Full dateTimes with an offset are parsed by DuckDB;
everything else (dates, odd forms) is left to ``Extractor.add_columns``, the same core every other
path uses.

Exports can hold JSON that is not valid FHIR. Value leaves (valueQuantity.value/unit/system/code, valueInteger,
valueBoolean, valueCodeableConcept), coding system/code, subject.reference and the id are read as JSON and
checked in SQL exactly as ``columns.ColumnBuilder`` checks them (a string, true or NaN is no number; a unit 5
or a code 40617009 is no string: ``invalid``, or no match), so one bad reading is reported in its patient's
assessment instead of failing the export or being used, and both paths agree. (A VARCHAR column would read
5, true or {"a": 1} as the text '5', 'true', '{"a":1}' without a word.) Elements whose
very shape is wrong (a valueQuantity or component that is no object/list) make DuckDB's typed reader fail;
only then are the Observation files rewritten once, in Python, into the shape ColumnBuilder reads them as
(``_normalized``), and staged from that copy: the fast path is untouched.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import orjson

from ..errors import BadRequest
from .columns import (BOOLEAN_INVALID, CONCEPT_INVALID, INTEGER_INVALID, QUANTITY_INVALID, QUANTITY_NOT_NUMBER,
                      STATUSES, ObservationColumns, UnitKey, patient_id, unit_key)

log = logging.getLogger(__name__)

# Values as JSON: DuckDB would cast "72" or true to 72.0 / 1.0 and fail the whole read on "high"; the checks
# below decide instead. _INVALID marks a part _normalized found unreadable (only in a rewritten copy).
_INVALID = "fhirAiInvalid"
# So are the coding and unit leaves and the id: a VARCHAR column would read 8867, true or {"a": 1} as the text
# '8867', 'true', '{"a":1}' and match or use what ColumnBuilder refuses. Codings are matched on their JSON text
# ('"8867-4"', never 8867), units are checked once per distinct unit (table units, column bad).
_QUANTITY = "STRUCT(value JSON, unit JSON, system JSON, code JSON)"
_CODING = "STRUCT(coding STRUCT(system JSON, code JSON)[])"
_VALUES = (f"valueQuantity {_QUANTITY}, valueInteger JSON, valueBoolean JSON, "
           f"valueCodeableConcept JSON, {_INVALID} INTEGER")
_OBSERVATION = {
    "resourceType": "VARCHAR", "id": "JSON", "status": "VARCHAR",
    "subject": "STRUCT(reference JSON)", "code": _CODING,
    "effectiveDateTime": "VARCHAR", "effectiveInstant": "VARCHAR",
    "effectivePeriod": 'STRUCT("start" VARCHAR, "end" VARCHAR)', "issued": "VARCHAR",
    "valueQuantity": _QUANTITY, "valueInteger": "JSON", "valueBoolean": "JSON",
    "valueCodeableConcept": "JSON", _INVALID: "INTEGER",
    "component": f"STRUCT(code {_CODING}, {_VALUES})[]",
}
_NUMBER = "('BIGINT', 'UBIGINT', 'DOUBLE')"
# Staged in memory up to this much Observation NDJSON: the table takes about 245 bytes per Observation
# (0.47 of its NDJSON), about 120 MB here. Beyond it on disk, compressed (about 25 bytes per Observation):
# ≈ 1 CPU second more per 10,000 patients, but the peak stays where the largest in-memory export puts
# it (≈ 650 MB with the default memory_limit) instead of climbing to ≈ 800 MB at 640 MB of NDJSON.
# Gzipped files count eight times their size.
_IN_MEMORY_NDJSON = 256 * 2**20
# Only what fromisoformat and DuckDB read alike goes to DuckDB's parser; the rest to fhir_ai.fhir.times.
_FULL_DATETIME = (r"^\d{4}-\d{2}-\d{2}T([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?"
                  r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$")


@dataclass
class Chunk:
    """Whole patients: their Patient and Encounter resources and their Observation rows."""
    resources: list[dict[str, Any]]
    columns: ObservationColumns
    patients: int


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _columns(spec: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_sql_text(k)}: {_sql_text(v)}" for k, v in spec.items()) + "}"


def _files(paths: list[Path]) -> str:
    return "[" + ", ".join(_sql_text(str(p)) for p in paths) + "]"


# One chunk's rows: the Observation's own codings (part 0) and each component's (part k), one row per
# coding some mapping knows. Most Observations have one coding and no components: that case is a plain
# column read; only the rest is unnested. Each branch scans the table again (the scan is cheap; holding
# the chunk's Observations for all three would cost ~100 MB per chunk). Every chunk scans the whole
# table: about 0.1 s per million Observations, in the background.
_HEAD = "obs, id, status, pkey, t"
_CHUNK_OBS = ("SELECT o.rowid AS obs, o.id, o.status, m.pkey, o.t, o.codings, o.q, o.vi, o.vb, o.vc, o.bad, "
              "o.component "
              "FROM obs o JOIN refmap m ON m.ref = o.ref WHERE m.chunk = $chunk")
_CHUNK_ROWS = f"""
    WITH flat AS (
        SELECT 0 AS part, 0 AS k, codings[1] AS cd, {_HEAD}, q, vi, vb, vc, bad FROM ({_CHUNK_OBS})
        UNION ALL
        SELECT 0, k, codings[k + 1], {_HEAD}, q, vi, vb, vc, bad FROM (
            SELECT unnest(range(1, len(codings))) AS k, codings, {_HEAD}, q, vi, vb, vc, bad
            FROM ({_CHUNK_OBS} AND len(o.codings) > 1))
        UNION ALL
        SELECT part, k, h.code.coding[k + 1], {_HEAD},
               h.valueQuantity, h.valueInteger, h.valueBoolean, h.valueCodeableConcept, h.{_INVALID} FROM (
            SELECT part, h, unnest(range(len(h.code.coding))) AS k, {_HEAD} FROM (
                SELECT unnest(range(1, len(component) + 1)) AS part, unnest(component) AS h, {_HEAD}
                FROM ({_CHUNK_OBS} AND o.component IS NOT NULL)))),
    r AS (
        SELECT f.obs, f.part, f.k, f.id, f.pkey, f.status, c.no AS code, f.q, f.vi, f.vb, f.vc, f.t, f.bad,
               json_type(f.q.value) AS tq, json_type(f.vi) AS tvi, json_type(f.vb) AS tvb, json_type(f.vc) AS tvc,
               CASE WHEN regexp_full_match(f.t, {_sql_text(_FULL_DATETIME)})
                    THEN epoch_us(TRY_CAST(f.t AS TIMESTAMPTZ)) END AS us
        FROM flat f JOIN codes c ON f.cd.system = c.jsystem AND f.cd.code = c.jcode),
    v AS (
        SELECT *, CASE WHEN tq IN {_NUMBER} THEN q.value::DOUBLE END AS qd FROM r)
    SELECT r.obs, r.part, r.k, r.id, r.pkey, r.code,
           CASE r.status {" ".join(f"WHEN {_sql_text(s)} THEN {i}" for i, s in enumerate(STATUSES))}
                ELSE -1 END AS status,
           coalesce(r.us::DOUBLE, 'NaN'::DOUBLE) AS us, CASE WHEN r.us IS NULL THEN r.t END AS t,
           r.q IS NOT NULL AS has_q,
           CASE WHEN isfinite(r.qd) AND NOT coalesce(u.bad, false) THEN r.qd ELSE 'NaN'::DOUBLE END AS qv,
           CASE WHEN u.bad THEN -1 ELSE coalesce(u.no, -1) END AS unit,
           CASE WHEN r.tvi IN ('BIGINT', 'UBIGINT') THEN r.vi::DOUBLE ELSE 'NaN'::DOUBLE END AS vi,
           CASE WHEN r.tvb = 'BOOLEAN' THEN r.vb::BOOLEAN::BIGINT ELSE -1 END AS vb,
           CASE WHEN r.tvc = 'OBJECT' THEN r.vc END AS vc,
           -- the codes and order of ColumnBuilder._values (features.columns)
           CASE WHEN r.bad IS NOT NULL THEN r.bad
                WHEN u.bad THEN {QUANTITY_INVALID}
                WHEN r.tq NOT IN {_NUMBER} AND r.tq <> 'NULL' OR NOT isfinite(r.qd) THEN {QUANTITY_NOT_NUMBER}
                WHEN r.tvi NOT IN ('BIGINT', 'UBIGINT', 'NULL') THEN {INTEGER_INVALID}
                WHEN r.tvb NOT IN ('BOOLEAN', 'NULL') THEN {BOOLEAN_INVALID}
                WHEN r.tvc NOT IN ('OBJECT', 'NULL') THEN {CONCEPT_INVALID}
                ELSE 0 END AS invalid
    FROM v r LEFT JOIN units u ON r.q IS NOT NULL AND u.system IS NOT DISTINCT FROM r.q.system
         AND u.usent IS NOT DISTINCT FROM r.q.code AND u.utext IS NOT DISTINCT FROM r.q.unit"""


class NdjsonExport:
    """One export folder staged for chunked reading; use as a context manager (removes its temp files).

    ``threads``: DuckDB threads while the export is read (default: one per core). While chunks are
    handed out DuckDB uses one thread, so that the caller's scoring keeps a core of its own.
    ``on_disk``: stage in a temporary on-disk database rather than in memory (default: when the
    Observation NDJSON is larger than ``_IN_MEMORY_NDJSON``).
    """

    def __init__(self, files: list[Path], codes: list[tuple[str, str]], *, chunk_patients: int = 2000,
                 memory_limit: str = "512MB", threads: int | None = None, on_disk: bool | None = None) -> None:
        self.files = files
        self.codes = list(dict.fromkeys(codes))
        self.chunk_patients = chunk_patients
        self._tmp = tempfile.TemporaryDirectory(prefix="fhir-ai-bulk-")
        if on_disk is None:
            on_disk = _ndjson_bytes(self._of("Observation")) > _IN_MEMORY_NDJSON
        self.on_disk = on_disk
        # In memory (fastest) while the staged table stays well under memory_limit; beyond that in a
        # temporary on-disk database: compressed (about 25 bytes per Observation), cached in memory up
        # to memory_limit, so memory stays flat. Intermediates beyond memory_limit spill to the folder.
        self.con = duckdb.connect(str(Path(self._tmp.name) / "export.duckdb") if on_disk else ":memory:")
        self.con.execute(f"SET memory_limit = {_sql_text(memory_limit)}")
        self.con.execute(f"SET temp_directory = {_sql_text(self._tmp.name)}")
        self.con.execute("SET enable_progress_bar = false")
        self.con.execute("SET TimeZone = 'UTC'")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.patients = 0
        self.chunks = 0
        self.resources_read = 0
        self.patient_ids: list[str] = []
        self.units: list[UnitKey] = []
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "NdjsonExport":
        try:
            self._stage()
        except duckdb.Error as exc:
            self.close()
            raise BadRequest(f"cannot read the export: {exc}", expression="--input") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.con.close()
        self._tmp.cleanup()

    def _of(self, kind: str) -> list[Path]:
        return [p for p in self.files if p.name.split(".", 1)[0] == kind]

    def _stage(self) -> None:
        con = self.con
        con.execute("CREATE TABLE codes AS SELECT no, to_json(system) AS jsystem, to_json(code) AS jcode FROM ("
                    "SELECT unnest(range(?)) AS no, unnest(?::VARCHAR[]) AS system, unnest(?::VARCHAR[]) AS code)",
                    [len(self.codes), [s for s, _ in self.codes], [c for _, c in self.codes]])
        observations = self._of("Observation")
        if observations:
            try:
                self._stage_observations(observations)
            except duckdb.InvalidInputException:
                # An element whose shape is not FHIR's (a valueQuantity that is a string, a component that is
                # no list): rewrite the files once as ColumnBuilder reads them, and stage that copy.
                log.warning("bulk export: some Observations are not valid FHIR; reading them the slow way")
                self._stage_observations(self._normalized_copy(observations))
        else:
            con.execute(f"CREATE TABLE obs AS SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS status, "
                        f"NULL::VARCHAR AS ref, NULL::VARCHAR AS t, NULL::{_CODING}.coding AS codings, "
                        f"NULL::{_QUANTITY} AS q, NULL::JSON AS vi, NULL::JSON AS vb, NULL::JSON AS vc, "
                        f"NULL::INTEGER AS bad, NULL::{_OBSERVATION['component']} AS component WHERE false")
        self.resources_read += con.execute("SELECT count(*) FROM obs").fetchone()[0]  # type: ignore[index]
        statics = self._of("Patient") + self._of("Encounter")
        if statics:
            con.execute(f"""
                CREATE TABLE statics AS
                SELECT resource,
                       CASE WHEN kind = 'Patient'
                            THEN CASE WHEN tid = 'VARCHAR' THEN 'Patient/' || (resource->>'id') END
                            -- an Encounter whose id or reference is no string is left out (as by fhir.sources
                            -- and Extractor): it cannot be named, nor told whose it is
                            WHEN tid = 'VARCHAR' OR tid IS NULL OR tid = 'NULL'
                            THEN CASE WHEN json_type(ref) = 'VARCHAR' THEN ref->>'$' END END AS ref
                FROM (SELECT json AS resource, json->>'resourceType' AS kind, json_type(json->'id') AS tid,
                             coalesce(json->'subject'->'reference', json->'patient'->'reference') AS ref
                      FROM read_ndjson_objects({_files(statics)}, format = 'newline_delimited'))""")
        else:
            con.execute("CREATE TABLE statics AS SELECT NULL::JSON AS resource, NULL::VARCHAR AS ref WHERE false")
        self.resources_read += con.execute("SELECT count(*) FROM statics").fetchone()[0]  # type: ignore[index]
        # Patient ids come from fhir_ai's own reading of a reference; chunks hold whole patients.
        refs = [r for (r,) in con.execute("SELECT DISTINCT ref FROM obs UNION SELECT DISTINCT ref FROM statics")
                .fetchall() if r is not None]
        ids = {ref: patient_id(ref) for ref in refs}
        keys: dict[str, int] = {}
        for pid in sorted(p for p in ids.values() if p is not None):
            keys.setdefault(pid, len(keys))
        self.patient_ids = list(keys)
        self.patients = len(keys)
        self.chunks = max(1, -(-self.patients // self.chunk_patients))
        mapped = [(ref, keys[pid]) for ref, pid in ids.items() if pid is not None]
        con.execute(f"""CREATE TABLE refmap AS SELECT ref, pkey, pkey // {int(self.chunk_patients)} AS chunk
                        FROM (SELECT unnest(?::VARCHAR[]) AS ref, unnest(?::BIGINT[]) AS pkey)""",
                    [[r for r, _ in mapped], [k for _, k in mapped]])
        # Every unit a value was sent with (a few dozen), numbered once for all chunks.
        # (As JSON text; bad: a unit, system or code that is not a string, QUANTITY_INVALID as in ColumnBuilder.
        # Checked here once per distinct unit, not per row. The good ones are numbered first.)
        con.execute("""
            CREATE TABLE units AS
            SELECT row_number() OVER (ORDER BY bad, system, usent, utext) - 1 AS no, system, usent, utext, bad FROM (
                SELECT *, coalesce(json_type(system) NOT IN ('VARCHAR', 'NULL'), false)
                          OR coalesce(json_type(usent) NOT IN ('VARCHAR', 'NULL'), false)
                          OR coalesce(json_type(utext) NOT IN ('VARCHAR', 'NULL'), false) AS bad FROM (
                    SELECT DISTINCT q.system AS system, q.code AS usent, q.unit AS utext FROM (
                        SELECT q FROM obs WHERE q IS NOT NULL
                        UNION ALL
                        SELECT h.valueQuantity FROM (SELECT unnest(component) AS h FROM obs
                                                     WHERE component IS NOT NULL)
                        WHERE h.valueQuantity IS NOT NULL)))""")
        self.units = [unit_key({"system": system, "code": usent, "unit": utext})     # as ColumnBuilder keys them
                      for system, usent, utext in con.execute(
                          "SELECT system->>'$', usent->>'$', utext->>'$' FROM units WHERE NOT bad ORDER BY no")
                      .fetchall()]
        con.execute("""CREATE TABLE static_rows AS SELECT m.chunk, s.rowid AS seq, s.resource
                       FROM statics s JOIN refmap m USING (ref) ORDER BY chunk, seq""")
        log.info("bulk export staged: %d patients in %d chunk(s)", self.patients, self.chunks)

    def _stage_observations(self, observations: list[Path]) -> None:
        # The one pass over the Observations. Insertion order is file order, so rowid numbers the
        # Observations as they were read. A reference that is not a JSON string names no patient (as in
        # ColumnBuilder), rather than the text of whatever it is; an Observation whose id is there but is no
        # string cannot be named and is left out (as by ColumnBuilder and fhir.sources).
        self.con.execute("DROP TABLE IF EXISTS obs")
        self.con.execute(f"""
            CREATE TABLE obs AS
            SELECT id->>'$' AS id, status,
                   CASE WHEN json_type(subject.reference) = 'VARCHAR' THEN subject.reference->>'$' END AS ref,
                   coalesce(effectiveDateTime, effectiveInstant, effectivePeriod."end", effectivePeriod."start",
                            issued) AS t,
                   code.coding AS codings, valueQuantity AS q, valueInteger AS vi, valueBoolean AS vb,
                   valueCodeableConcept AS vc, {_INVALID} AS bad, component
            FROM read_ndjson({_files(observations)}, columns = {_columns(_OBSERVATION)})
            WHERE resourceType = 'Observation' AND (id IS NULL OR json_type(id) = 'VARCHAR')""")

    def _normalized_copy(self, observations: list[Path]) -> list[Path]:
        """The Observation files rewritten by ``_normalized`` (same order), in the export's temp folder."""
        copy = Path(self._tmp.name) / "Observation.normalized.ndjson"
        with open(copy, "wb") as out:
            for path in observations:
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rb") as handle:
                    for number, line in enumerate(handle, start=1):
                        if not line.strip():
                            continue
                        try:
                            resource = orjson.loads(line)
                        except orjson.JSONDecodeError as exc:
                            raise BadRequest(f"cannot read the export: {path.name}, line {number}: not valid JSON",
                                             expression="--input") from exc
                        if not isinstance(resource, dict):
                            raise BadRequest(f"cannot read the export: {path.name}, line {number}: not a FHIR "
                                             "resource", expression="--input")
                        out.write(orjson.dumps(_normalized(resource)) + b"\n")
        return [copy]

    def __iter__(self) -> Iterator[Chunk]:
        """Chunks in order; the next one is prepared in a background thread while the caller scores this one.

        DuckDB releases the GIL while a query runs, so selecting and flattening chunk k+1 overlaps the
        (Python) scoring of chunk k; from the second chunk on DuckDB uses one thread, so the scoring keeps
        a core. At most two chunks are held at a time.
        """
        cursor = self.con.cursor()
        pool = self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fhir-ai-bulk")
        try:
            pending: Future[Chunk] = pool.submit(self._chunk, cursor, 0)
            for chunk in range(self.chunks):
                ready = pending.result()
                if chunk == 0:
                    cursor.execute("SET threads = 1")       # nothing runs in the background just now
                if chunk + 1 < self.chunks:
                    pending = pool.submit(self._chunk, cursor, chunk + 1)
                yield ready
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            with contextlib.suppress(duckdb.Error):     # already closed if the caller closed the export
                cursor.close()

    def _chunk(self, con: duckdb.DuckDBPyConnection, chunk: int) -> Chunk:
        resources = [orjson.loads(text) for (text,) in con.execute(
            "SELECT resource FROM static_rows WHERE chunk = ? ORDER BY seq", [chunk]).fetchall()]
        data = con.execute(_CHUNK_ROWS, {"chunk": chunk}).fetchnumpy()
        n = len(data["obs"])
        # File order: Observations as read, then parts and codings in order (sorted here, not in DuckDB).
        order = np.lexsort((_plain(data["k"], np.int64), _plain(data["part"], np.int64), _plain(data["obs"], np.int64)))
        data = {name: values[order] for name, values in data.items()}
        columns = ObservationColumns(
            obs=_plain(data["obs"], np.int64), obs_id=_objects(data["id"]), part=_plain(data["part"], np.int64),
            patient=_plain(data["pkey"], np.int64), code=_plain(data["code"], np.int64),
            status=_plain(data["status"], np.int64), time=_plain(data["us"], np.float64) / 1e6,
            time_text=_objects(data["t"]), has_quantity=_plain(data["has_q"], bool),
            quantity=_plain(data["qv"], np.float64), unit=_plain(data["unit"], np.int64),
            integer=_plain(data["vi"], np.float64), boolean=_plain(data["vb"], np.int64),
            concept=_objects(data["vc"]) if n else np.empty(0, dtype=object),
            invalid=_plain(data["invalid"], np.int8),
            patient_ids=self.patient_ids, codes=self.codes, units=self.units)
        return Chunk(resources, columns, min(self.chunk_patients, self.patients - chunk * self.chunk_patients))


def _normalized(obs: dict[str, Any]) -> dict[str, Any]:
    """An Observation in the shape DuckDB's typed reader accepts, read as ``ColumnBuilder`` reads it.

    Codes, codings, subjects and components that are not FHIR's shape name nothing (removed, or an empty
    component that keeps the others' numbers); an effectivePeriod that is no object is an unreadable time;
    a valueQuantity that is no object, or whose unit/system/code are not strings, is marked invalid
    (QUANTITY_INVALID, as ColumnBuilder flags it).
    """
    _normalize_code(obs)
    if not isinstance(obs.get("subject"), dict):
        obs.pop("subject", None)
    period = obs.get("effectivePeriod")
    if period is not None and not isinstance(period, dict):
        obs["effectivePeriod"] = {"end": "unreadable"}
    elif isinstance(period, dict):
        obs["effectivePeriod"] = {k: v if v is None or isinstance(v, str) else "unreadable"
                                  for k, v in period.items() if k in ("start", "end")}
    _normalize_values(obs)
    components = obs.get("component")
    if components is not None:
        if not isinstance(components, list):
            obs.pop("component")
        else:
            obs["component"] = [_normalize_values(_normalize_code(c)) if isinstance(c, dict) else {}
                                for c in components]
    return obs


def _normalize_code(holder: dict[str, Any]) -> dict[str, Any]:
    code = holder.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    if not isinstance(codings, list):
        holder.pop("code", None)
    else:
        holder["code"] = {"coding": [
            {k: v for k, v in c.items() if k in ("system", "code") and isinstance(v, str)}
            if isinstance(c, dict) and all(isinstance(c.get(k), (str, type(None))) for k in ("system", "code"))
            else {} for c in codings]}
    return holder


def _normalize_values(holder: dict[str, Any]) -> dict[str, Any]:
    q = holder.get("valueQuantity")
    if q is not None and not (isinstance(q, dict) and all(
            isinstance(q.get(k), (str, type(None))) for k in ("unit", "system", "code"))):
        holder.pop("valueQuantity")
        holder[_INVALID] = QUANTITY_INVALID
    return holder


def _ndjson_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size * (8 if p.suffix == ".gz" else 1) for p in paths)


def _plain(values: Any, dtype: Any) -> np.ndarray:
    return np.asarray(np.ma.getdata(values), dtype=dtype)


def _objects(values: Any) -> np.ndarray:
    """An object column with None where DuckDB had NULL."""
    out = np.asarray(np.ma.getdata(values), dtype=object).copy()
    mask = np.ma.getmaskarray(values)
    if mask.any():
        out[mask] = None
    return out
