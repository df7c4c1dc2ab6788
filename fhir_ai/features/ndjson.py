"""Bulk-Data NDJSON → per-patient-chunk ObservationColumns with DuckDB, in bounded memory.

DuckDB reads the Observation files with explicit columns (no per-line JSON parsing in Python), keeps
the codings some mapping knows, and parses full dateTimes with an offset; everything else (dates, odd
forms) is left to ``Extractor.add_columns``, the same core every other path uses. Exports are not sorted
by patient, so rows are first partitioned into chunks of whole patients in an on-disk DuckDB database
(temporary; DuckDB spills to it beyond ``memory_limit``), then handed out one chunk at a time: memory
stays flat however many patients the export holds.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import orjson

from ..errors import BadRequest
from .columns import STATUSES, UCUM, ObservationColumns, patient_id

log = logging.getLogger(__name__)

_QUANTITY = "STRUCT(value DOUBLE, unit VARCHAR, system VARCHAR, code VARCHAR)"
_CODING = "STRUCT(coding STRUCT(system VARCHAR, code VARCHAR)[])"
_VALUES = (f"valueQuantity {_QUANTITY}, valueInteger BIGINT, valueBoolean BOOLEAN, "
           "valueCodeableConcept JSON")
_OBSERVATION = {
    "resourceType": "VARCHAR", "id": "VARCHAR", "status": "VARCHAR",
    "subject": "STRUCT(reference VARCHAR)", "code": _CODING,
    "effectiveDateTime": "VARCHAR", "effectiveInstant": "VARCHAR",
    "effectivePeriod": 'STRUCT("start" VARCHAR, "end" VARCHAR)', "issued": "VARCHAR",
    "valueQuantity": _QUANTITY, "valueInteger": "BIGINT", "valueBoolean": "BOOLEAN",
    "valueCodeableConcept": "JSON",
    "component": f"STRUCT(code {_CODING}, {_VALUES})[]",
}
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


class NdjsonExport:
    """One export folder staged for chunked reading; use as a context manager (removes its temp files)."""

    def __init__(self, files: list[Path], codes: list[tuple[str, str]], *, chunk_patients: int = 2000,
                 memory_limit: str = "512MB", threads: int | None = None) -> None:
        self.files = files
        self.codes = list(dict.fromkeys(codes))
        self.chunk_patients = chunk_patients
        self._tmp = tempfile.TemporaryDirectory(prefix="fhir-ai-bulk-")
        # In memory up to memory_limit, spilling to the temporary folder beyond it.
        self.con = duckdb.connect()
        self.con.execute(f"SET memory_limit = {_sql_text(memory_limit)}")
        self.con.execute(f"SET temp_directory = {_sql_text(self._tmp.name)}")
        self.con.execute("SET enable_progress_bar = false")
        self.con.execute("SET TimeZone = 'UTC'")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.patients = 0
        self.chunks = 0
        self.resources_read = 0

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
        self.con.close()
        self._tmp.cleanup()

    def _of(self, kind: str) -> list[Path]:
        return [p for p in self.files if p.name.split(".", 1)[0] == kind]

    def _stage(self) -> None:
        con = self.con
        con.execute("CREATE TABLE codes AS SELECT unnest(range(?)) AS no, unnest(?::VARCHAR[]) AS system, "
                    "unnest(?::VARCHAR[]) AS code",
                    [len(self.codes), [s for s, _ in self.codes], [c for _, c in self.codes]])
        observations = self._of("Observation")
        if observations:
            # Insertion order is file order, so rowid numbers the Observations as they were read.
            con.execute(f"""
                CREATE TABLE obs AS
                SELECT id, status, subject.reference AS ref,
                       coalesce(nullif(effectiveDateTime, ''), nullif(effectiveInstant, ''),
                                nullif(effectivePeriod."end", ''), nullif(effectivePeriod."start", ''),
                                nullif(issued, '')) AS t,
                       code.coding AS codings, valueQuantity AS q, valueInteger AS vi, valueBoolean AS vb,
                       valueCodeableConcept AS vc, component
                FROM read_ndjson({_files(observations)}, columns = {_columns(_OBSERVATION)})
                WHERE resourceType = 'Observation'""")
        else:
            con.execute(f"CREATE TABLE obs AS SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS status, "
                        f"NULL::VARCHAR AS ref, NULL::VARCHAR AS t, NULL::{_CODING}.coding AS codings, "
                        f"NULL::{_QUANTITY} AS q, NULL::BIGINT AS vi, NULL::BOOLEAN AS vb, NULL::JSON AS vc, "
                        f"NULL::{_OBSERVATION['component']} AS component WHERE false")
        self.resources_read += con.execute("SELECT count(*) FROM obs").fetchone()[0]  # type: ignore[index]
        statics = self._of("Patient") + self._of("Encounter")
        if statics:
            con.execute(f"""
                CREATE TABLE statics AS
                SELECT json AS resource,
                       CASE WHEN json->>'resourceType' = 'Patient' THEN 'Patient/' || (json->>'id')
                            ELSE coalesce(json->'subject'->>'reference', json->'patient'->>'reference') END AS ref
                FROM read_ndjson_objects({_files(statics)}, format = 'newline_delimited')""")
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
        con.execute("CREATE TABLE refmap AS SELECT unnest(?::VARCHAR[]) AS ref, unnest(?::BIGINT[]) AS pkey",
                    [[r for r, _ in mapped], [k for _, k in mapped]])
        # One row per (Observation, part, known coding). Most Observations have one coding and no
        # components: that case is a plain column read; only the rest is unnested.
        head = "id, status, ref, t"
        component = "h.valueQuantity AS q, h.valueInteger AS vi, h.valueBoolean AS vb, h.valueCodeableConcept AS vc"
        con.execute(f"""
            CREATE TABLE flat AS
            SELECT rowid AS obs, 0 AS part, 0 AS k, codings[1] AS cd, {head}, q, vi, vb, vc FROM obs
            UNION ALL
            SELECT obs, 0, k, codings[k + 1], {head}, q, vi, vb, vc FROM (
                SELECT rowid AS obs, codings, unnest(range(1, len(codings))) AS k, {head}, q, vi, vb, vc
                FROM obs WHERE len(codings) > 1)
            UNION ALL
            SELECT obs, part, k, h.code.coding[k + 1], {head}, {component} FROM (
                SELECT obs, part, h, unnest(range(len(h.code.coding))) AS k, {head} FROM (
                    SELECT rowid AS obs, unnest(range(1, len(component) + 1)) AS part, unnest(component) AS h,
                           {head} FROM obs WHERE component IS NOT NULL))""")
        con.execute(f"""
            CREATE TABLE rows AS
            SELECT m.pkey // {int(self.chunk_patients)} AS chunk, f.obs, f.part, f.k, f.id, m.pkey,
                   CASE f.status {" ".join(f"WHEN {_sql_text(s)} THEN {i}" for i, s in enumerate(STATUSES))}
                        ELSE -1 END AS status,
                   CASE WHEN regexp_full_match(f.t, {_sql_text(_FULL_DATETIME)})
                        THEN epoch_us(TRY_CAST(f.t AS TIMESTAMPTZ)) END AS us,
                   f.t, c.no AS code, f.q IS NOT NULL AS has_q, f.q.value AS qv,
                   CASE WHEN f.q.system IS NULL OR f.q.system = {_sql_text(UCUM)} THEN f.q.code END AS ucode,
                   f.q.unit AS utext, f.q.code AS usent, f.vi, f.vb, f.vc
            FROM flat f JOIN codes c ON f.cd.system = c.system AND f.cd.code = c.code
            JOIN refmap m ON m.ref = f.ref
            ORDER BY chunk, f.obs, f.part, f.k""")
        con.execute("DROP TABLE flat")
        con.execute("""CREATE TABLE units AS SELECT row_number() OVER () - 1 AS no, ucode, utext, usent
                       FROM (SELECT DISTINCT ucode, utext, usent FROM rows WHERE has_q)""")
        self.units = [tuple(u) for u in con.execute("SELECT ucode, utext, usent FROM units ORDER BY no").fetchall()]
        con.execute(f"""CREATE TABLE static_rows AS SELECT m.pkey // {int(self.chunk_patients)} AS chunk,
                        s.rowid AS seq, s.resource FROM statics s JOIN refmap m USING (ref) ORDER BY chunk, seq""")
        log.info("bulk export staged: %d patients in %d chunk(s)", self.patients, self.chunks)

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in range(self.chunks):
            resources = [orjson.loads(text) for (text,) in self.con.execute(
                "SELECT resource FROM static_rows WHERE chunk = ? ORDER BY seq", [chunk]).fetchall()]
            yield Chunk(resources, self._columns(chunk),
                        min(self.chunk_patients, self.patients - chunk * self.chunk_patients))

    def _columns(self, chunk: int) -> ObservationColumns:
        data = self.con.execute("""
            SELECT r.obs, r.id, r.part, r.pkey, r.code, r.status,
                   coalesce(r.us::DOUBLE, 'NaN'::DOUBLE) AS us, CASE WHEN r.us IS NULL THEN r.t END AS t,
                   r.has_q, coalesce(r.qv, 'NaN'::DOUBLE) AS qv, coalesce(u.no, -1) AS unit,
                   coalesce(r.vi::DOUBLE, 'NaN'::DOUBLE) AS vi, coalesce(r.vb::BIGINT, -1) AS vb, r.vc
            FROM rows r LEFT JOIN units u ON r.has_q AND u.ucode IS NOT DISTINCT FROM r.ucode
                 AND u.utext IS NOT DISTINCT FROM r.utext AND u.usent IS NOT DISTINCT FROM r.usent
            WHERE r.chunk = ?
            ORDER BY r.obs, r.part, r.k""", [chunk]).fetchnumpy()
        n = len(data["obs"])
        return ObservationColumns(
            obs=_plain(data["obs"], np.int64), obs_id=_objects(data["id"]), part=_plain(data["part"], np.int64),
            patient=_plain(data["pkey"], np.int64), code=_plain(data["code"], np.int64),
            status=_plain(data["status"], np.int64), time=_plain(data["us"], np.float64) / 1e6,
            time_text=_objects(data["t"]), has_quantity=_plain(data["has_q"], bool),
            quantity=_plain(data["qv"], np.float64), unit=_plain(data["unit"], np.int64),
            integer=_plain(data["vi"], np.float64), boolean=_plain(data["vb"], np.int64),
            concept=_objects(data["vc"]) if n else np.empty(0, dtype=object),
            patient_ids=self.patient_ids, codes=self.codes, units=self.units)  # type: ignore[arg-type]


def _plain(values: Any, dtype: Any) -> np.ndarray:
    return np.asarray(np.ma.getdata(values), dtype=dtype)


def _objects(values: Any) -> np.ndarray:
    """An object column with None where DuckDB had NULL."""
    out = np.asarray(np.ma.getdata(values), dtype=object).copy()
    mask = np.ma.getmaskarray(values)
    if mask.any():
        out[mask] = None
    return out
