"""The raw limit: the fastest plain pipeline we could write for the same job, without fhir_ai.

DuckDB ``read_ndjson`` with explicit columns → SQL flattening (panels through their components), status
filter, time-zone-aware times, unit conversion, plausibility, each patient's own as-of time and 48 h
window, grouped aggregates → LightGBM ``Booster.predict`` → isotonic calibration → minimal RiskAssessment
dicts with ``orjson.dumps``. It reads the same mapping (codes, units, plausible ranges) and model card, and
knows only the units the generator emits; fhir_ai handles the general case.
"""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import orjson
import yaml

UCUM_FACTORS = {  # (scale, offset) into the mapping's unit, for the alternative units the generator writes
    ("temperature", "[degF]"): (5 / 9, -32 * 5 / 9), ("glucose", "mmol/L"): (18.0156, 0.0),
    ("creatinine", "umol/L"): (113.12 / 10000, 0.0), ("fio2", "%"): (0.01, 0.0), ("potassium", "meq/L"): (1.0, 0.0),
}
QUANTITY = "STRUCT(value DOUBLE, unit VARCHAR, system VARCHAR, code VARCHAR)"
CODING = "STRUCT(coding STRUCT(system VARCHAR, code VARCHAR)[])"
OBS_COLUMNS = {"id": "VARCHAR", "status": "VARCHAR", "subject": "STRUCT(reference VARCHAR)",
               "code": CODING, "effectiveDateTime": "VARCHAR", "valueQuantity": QUANTITY, "valueBoolean": "BOOLEAN",
               "component": f"STRUCT(code {CODING}, valueQuantity {QUANTITY})[]"}


def _struct(columns: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in columns.items()) + "}"


def run(export: Path, model_dir: Path, mapping_file: Path, output: Path, explain: bool = False) -> dict:
    mapping = yaml.safe_load(mapping_file.read_text())
    card = json.loads((model_dir / "card.json").read_text())
    booster = lgb.Booster(model_file=str(model_dir / "model.txt"))
    inputs = [name for name, spec in mapping["inputs"].items() if spec["resource"] == "Observation"]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE TABLE codes (system VARCHAR, code VARCHAR, input INTEGER)")
    con.executemany("INSERT INTO codes VALUES (?, ?, ?)",
                    [(c["system"], c["code"], i) for i, name in enumerate(inputs)
                     for c in mapping["inputs"][name]["codes"]])
    con.execute("CREATE TABLE spec (input INTEGER, unit VARCHAR, scale DOUBLE, shift DOUBLE, lo DOUBLE, hi DOUBLE)")
    rows = []
    for i, name in enumerate(inputs):
        spec = mapping["inputs"][name]
        lo, hi = spec.get("plausible", (-1e308, 1e308))
        rows.append((i, spec.get("unit"), 1.0, 0.0, lo, hi))
        rows += [(i, unit, a, b, lo, hi) for (n, unit), (a, b) in UCUM_FACTORS.items() if n == name]
    con.executemany("INSERT INTO spec VALUES (?, ?, ?, ?, ?, ?)", rows)
    unbounded = [inputs.index(f["input"]) for f in mapping["features"]
                 if (f.get("window") or {}).get("start") == "unbounded"]
    con.execute(f"""
        CREATE TABLE v AS
        WITH o AS (SELECT * FROM read_ndjson('{export / "Observation.ndjson"}', columns = {_struct(OBS_COLUMNS)})
                   WHERE status IN ('final', 'amended', 'corrected')),
        parts AS (SELECT subject.reference AS ref, effectiveDateTime AS t,
                         unnest(list_concat([{{'code': code, 'valueQuantity': valueQuantity}}],
                                            coalesce(component, []))) AS p FROM o),
        codings AS (SELECT ref, t, p.valueQuantity AS q, unnest(p.code.coding) AS c FROM parts)
        SELECT ref, epoch_us(CAST(t AS TIMESTAMPTZ)) AS us, k.input, q.value * s.scale + s.shift AS v
        FROM codings JOIN codes k ON c.system = k.system AND c.code = k.code
        JOIN spec s ON s.input = k.input AND s.unit = q.code
        WHERE q.value * s.scale + s.shift BETWEEN s.lo AND s.hi""")
    agg = con.execute(f"""
        WITH a AS (SELECT ref, max(us) AS anchor FROM v GROUP BY ref)
        SELECT ref, input, count(*), min(v), max(v), avg(v), sum(v), arg_min(v, us), arg_max(v, us), any_value(anchor)
        FROM v JOIN a USING (ref)
        WHERE us <= anchor AND (us >= anchor - 172800000000 OR input IN ({",".join(map(str, unbounded)) or "-1"}))
        GROUP BY ref, input""").fetchnumpy()
    patients = con.execute(f"""
        SELECT 'Patient/' || p.id AS ref, p.gender, date_sub('year', CAST(p.birthDate AS TIMESTAMPTZ),
               CAST(e.period.start AS TIMESTAMPTZ)) AS age, e.serviceType.coding[1].code AS icu, e.id AS enc
        FROM read_ndjson('{export / "Patient.ndjson"}', columns = {{'id': 'VARCHAR', 'gender': 'VARCHAR',
                                                                     'birthDate': 'VARCHAR'}}) p
        LEFT JOIN read_ndjson('{export / "Encounter.ndjson"}', columns = {{'id': 'VARCHAR',
                 'subject': 'STRUCT(reference VARCHAR)', 'period': 'STRUCT("start" VARCHAR)',
                 'serviceType': '{CODING}'}}) e ON e.subject.reference = 'Patient/' || p.id""").fetchnumpy()
    refs = list(patients["ref"])
    row_of = {ref: i for i, ref in enumerate(refs)}
    features = card["features"]
    column = {name: j for j, name in enumerate(features)}
    X = np.full((len(refs), len(features)), np.nan)
    X[:, column["age"]] = patients["age"].astype(float)
    X[:, column["sex_male"]] = np.where(patients["gender"] == "male", 1.0, 0.0)
    X[:, column["icu_type"]] = [float(c) if c else np.nan for c in patients["icu"]]
    rows_ = np.array([row_of[r] for r in agg["ref"]])
    stats = {"count": 2, "min": 3, "max": 4, "mean": 5, "sum": 6, "first": 7, "last": 8}
    values = [np.asarray(agg[k], dtype=float) for k in list(agg)[2:9]]
    for j, name in enumerate(features):
        base, _, how = name.rpartition("_")
        if base not in inputs or how not in stats:
            continue
        sel = np.asarray(agg["input"]) == inputs.index(base)
        X[rows_[sel], j] = values[stats[how] - 2][sel]
        if how == "count":
            X[np.isnan(X[:, j]), j] = 0.0
    anchor = np.full(len(refs), np.nan)
    anchor[rows_] = np.asarray(agg["any_value(anchor)"], dtype=float) / 1e6
    core = [column[f"{name}_count"] for name in mapping["scoring"]["core_inputs"]]
    sufficient = (X[:, core] > 0).sum(axis=1) >= mapping["scoring"]["min_core_inputs"]
    raw = booster.predict(X[sufficient])
    p = np.full(len(refs), np.nan)
    p[sufficient] = np.interp(raw, card["calibration"]["x"], card["calibration"]["y"])
    t = card["thresholds"]
    risk = np.where(p >= t["high"], "high", np.where(p >= t["moderate"], "moderate", "low"))
    explained = 0
    if explain:
        elevated = sufficient & (p >= t["moderate"])
        booster.predict(X[elevated], pred_contrib=True)
        explained = int(elevated.sum())
    with open(output, "wb") as out:
        for i, ref in enumerate(refs):
            resource = {"resourceType": "RiskAssessment", "status": "final" if sufficient[i] else "cancelled",
                        "subject": {"reference": ref}, "encounter": {"reference": f"Encounter/{patients['enc'][i]}"}}
            if sufficient[i]:
                resource["prediction"] = [{"probabilityDecimal": round(float(p[i]), 4),
                                           "qualitativeRisk": {"coding": [{"code": str(risk[i])}]}}]
            out.write(orjson.dumps(resource) + b"\n")
    return {"patients": len(refs), "assessed": int(sufficient.sum()), "explained": explained,
            "probability": dict(zip(refs, p.tolist())), "anchor": dict(zip(refs, anchor.tolist()))}
