"""Data-set converters against the documented FHIR form (SOURCE.md + fhir-mapping.csv) and the demo hospital."""
from __future__ import annotations

import csv
import io
import itertools
import json
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from fhir_ai.datasets import demo, ktas, physionet2012 as p2012, write_ndjson
from fhir_ai.errors import BadRequest, ConfigurationError

DATA = Path("/work/shared/data")
P2012 = DATA / "physionet2012"
KTAS = DATA / "ktas"
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "demo-hospital"
MODELS = {"Patient": Patient, "Encounter": Encounter, "Observation": Observation}

needs_physionet = pytest.mark.skipif(not (P2012 / "set-a.tar.gz").is_file(), reason="PhysioNet 2012 not present")
needs_ktas = pytest.mark.skipif(not (KTAS / "train.csv").is_file(), reason="KTAS data not present")


def validate(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        MODELS[resource["resourceType"]].model_validate(resource)


def by_id(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in resources}


@pytest.fixture(scope="module")
def first_records() -> list[tuple[int, list[tuple[str, str, str]]]]:
    return list(itertools.islice(p2012.read_records(P2012 / "set-a.tar.gz"), 3))


# ---------------------------------------------------------------- PhysioNet 2012

@needs_physionet
def test_variable_table_matches_documented_mapping() -> None:
    with open(P2012 / "fhir-mapping.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["fhir_resource"] == "Observation"]
    assert {r["variable"] for r in rows} == set(p2012.VARIABLES)
    for row in rows:
        unit = row["ucum_unit"] or None
        assert p2012.VARIABLES[row["variable"]] == (row["category"], row["code_system"], row["code"],
                                                    row["display"], unit), row["variable"]


@needs_physionet
def test_record_resources_follow_the_documented_form(first_records) -> None:
    record_id, lines = first_records[0]
    assert record_id == 132539 and lines[:3] == [("00:00", "RecordID", "132539"), ("00:00", "Age", "54"),
                                                 ("00:00", "Gender", "0")]
    resources = p2012.record_to_fhir(record_id, lines)
    patient, encounter, *observations = resources
    assert patient == {"resourceType": "Patient", "id": "p2012-132539",
                       "identifier": [{"system": p2012.RECORD_ID_SYSTEM, "value": "132539"}],
                       "gender": "female", "birthDate": "2046-01-01"}
    assert encounter["id"] == "p2012-enc-132539" and encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP"
    assert encounter["class"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert encounter["period"] == {"start": "2100-01-01T00:00:00Z"}
    assert encounter["serviceType"]["coding"] == [{"system": p2012.ICUTYPE_SYSTEM, "code": "4",
                                                   "display": "Surgical ICU"}]
    # Height (line 4) and Weight (line 6) are -1: no Observation; line 7 is "00:07,GCS,15".
    ids = [o["id"] for o in observations]
    assert "p2012-132539-4" not in ids and "p2012-132539-6" not in ids
    assert ids[0] == "p2012-132539-7"
    gcs = observations[0]
    assert gcs["code"]["coding"][0]["code"] == "9269-2"
    assert gcs["category"][0]["coding"][0]["code"] == "survey"
    assert gcs["effectiveDateTime"] == "2100-01-01T00:07:00Z"
    assert gcs["valueQuantity"] == {"value": 15, "unit": "{score}", "system": "http://unitsofmeasure.org",
                                    "code": "{score}"}
    assert gcs["subject"] == {"reference": "Patient/p2012-132539"}
    assert gcs["encounter"] == {"reference": "Encounter/p2012-enc-132539"}
    # One Observation per non-descriptor line that is not -1; ids count every line after the header.
    expected = [n for n, (_, param, value) in enumerate(lines, 1)
                if param not in p2012.DESCRIPTORS and value != "-1"]
    assert ids == [f"p2012-132539-{n}" for n in expected]
    assert lines[-1] == ("47:37", "Urine", "280")
    assert observations[-1]["effectiveDateTime"] == "2100-01-02T23:37:00Z"
    assert observations[-1]["id"] == f"p2012-132539-{len(lines)}"


@needs_physionet
def test_mechvent_height_weight_and_decimals(first_records) -> None:
    record_id, lines = first_records[1]  # 132540: male, 76 y, cardiac surgery, ventilated
    patient, encounter, *observations = p2012.record_to_fhir(record_id, lines)
    assert (patient["gender"], patient["birthDate"]) == ("male", "2024-01-01")
    assert encounter["serviceType"]["text"] == "Cardiac Surgery Recovery Unit"
    obs = by_id(observations)
    assert obs["p2012-132540-4"]["code"]["coding"][0]["code"] == "8302-2"
    assert obs["p2012-132540-4"]["valueQuantity"]["value"] == 175.3
    assert obs["p2012-132540-4"]["effectiveDateTime"] == "2100-01-01T00:00:00Z"
    assert obs["p2012-132540-6"]["valueQuantity"] == {"value": 76, "unit": "kg",
                                                      "system": "http://unitsofmeasure.org", "code": "kg"}
    vents = [o for o in observations if o["code"]["coding"][0]["code"] == "40617009"]
    assert vents and all(o["valueBoolean"] is True and "valueQuantity" not in o for o in vents)
    assert vents[0]["code"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert vents[0]["category"][0]["coding"][0]["code"] == "procedure"


def test_time_anchor_missing_values_and_empty_parameter() -> None:
    lines = [("00:00", "RecordID", "7"), ("00:00", "Age", "-1"), ("00:00", "Gender", "-1"),
             ("00:00", "Height", "-1"), ("00:00", "ICUType", "-1"), ("00:00", "Weight", "-1"),
             ("00:00", "HR", "88"), ("24:00", "DiasABP", "-1"), ("30:15", "", "5"),
             ("47:59", "Temp", "-17.8"), ("47:59", "MechVent", "1")]
    patient, encounter, *observations = p2012.record_to_fhir(7, lines)
    assert patient["gender"] == "unknown" and "birthDate" not in patient
    assert "serviceType" not in encounter
    assert [(o["id"], o["effectiveDateTime"]) for o in observations] == [
        ("p2012-7-7", "2100-01-01T00:00:00Z"),
        ("p2012-7-10", "2100-01-02T23:59:00Z"),  # outliers pass through unchanged
        ("p2012-7-11", "2100-01-02T23:59:00Z")]
    assert observations[1]["valueQuantity"]["value"] == -17.8
    assert p2012._offset_to_datetime("24:00") == "2100-01-02T00:00:00Z"
    assert p2012.record_to_fhir(8, [("00:00", "Age", "90")])[0]["birthDate"] == "2010-01-01"


@needs_physionet
def test_alt_unit_variant_converts_every_other_value_and_keeps_ids(first_records) -> None:
    record_id, lines = first_records[1]
    plain = by_id(p2012.record_to_fhir(record_id, lines))
    alt = by_id(p2012.record_to_fhir(record_id, lines, unit_variant="alt"))
    assert plain.keys() == alt.keys()
    factors = {"[degF]": lambda v: v * 9 / 5 + 32, "umol/L": lambda v: v * 88.4,
               "mmol/L": lambda v: v / 18.0156, "%": lambda v: v * 100}
    seen = set()
    occurrence: dict[str, int] = {}
    for rid, obs in plain.items():
        name = obs.get("code", {}).get("text")
        if name not in p2012.ALT_UNITS:
            assert alt[rid] == obs
            continue
        occurrence[name] = occurrence.get(name, 0) + 1
        got = alt[rid]["valueQuantity"]
        if occurrence[name] % 2 == 0:
            assert got == obs["valueQuantity"]
            continue
        unit = p2012.ALT_UNITS[name][0]
        seen.add(unit)
        assert got["code"] == got["unit"] == unit and alt[rid]["code"] == obs["code"]
        assert got["value"] == pytest.approx(factors[unit](obs["valueQuantity"]["value"]), abs=1e-3)
    assert seen == {"[degF]", "umol/L", "mmol/L", "%"}
    with pytest.raises(BadRequest):
        p2012.record_to_fhir(record_id, lines, unit_variant="metric")


@needs_physionet
def test_resources_validate_as_fhir(first_records) -> None:
    for record_id, lines in first_records[:2]:
        validate(p2012.record_to_fhir(record_id, lines))
        validate(p2012.record_to_fhir(record_id, lines, unit_variant="alt"))


@needs_physionet
def test_load_outcomes_maps_minus_one_to_none() -> None:
    outcomes = p2012.load_outcomes(P2012 / "Outcomes-a.txt")
    assert len(outcomes) == 4000
    assert outcomes[132539] == {"saps_i": 6, "sofa": 1, "length_of_stay": 5, "survival": None,
                                "in_hospital_death": 0}
    with open(P2012 / "Outcomes-a.txt", newline="") as fh:
        raw = {int(r["RecordID"]): r for r in csv.DictReader(fh)}
    missing = [rid for rid, r in raw.items() if r["SAPS-I"] == "-1"]
    assert missing and all(outcomes[rid]["saps_i"] is None for rid in missing)
    assert sum(o["in_hospital_death"] for o in outcomes.values()) == 554


@needs_physionet
@pytest.mark.parametrize("sets", [("c",), ("set-c",), ("a", "c"), ("C",)])
def test_iter_stays_refuses_the_holdout_set(sets) -> None:
    with pytest.raises(BadRequest, match="holdout"):
        next(p2012.iter_stays(P2012, sets=sets))


@needs_physionet
def test_iter_stays_real_data_has_labels_and_no_holdout_ids() -> None:
    holdout = p2012.holdout_ids(P2012)
    assert len(holdout) == 4000 and 152871 in holdout
    stays = list(p2012.iter_stays(P2012, sets=("b",), limit=3))
    assert len(stays) == 3
    for stay in stays:
        assert stay.record_id not in holdout
        assert stay.resources[0]["id"] == f"p2012-{stay.record_id}"
        assert stay.outcome["in_hospital_death"] in (0, 1)


def make_tar(path: Path, records: dict[int, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for record_id, body in records.items():
            data = ("Time,Parameter,Value\n" + body).encode()
            info = tarfile.TarInfo(f"set-a/{record_id}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_iter_stays_filters_ids_listed_as_holdout(tmp_path: Path) -> None:
    body = "00:00,RecordID,{id}\n00:00,Age,70\n00:00,Gender,1\n00:30,HR,90\n"
    make_tar(tmp_path / "set-a.tar.gz", {1: body.format(id=1), 2: body.format(id=2), 3: body.format(id=3)})
    (tmp_path / "Outcomes-a.txt").write_text(
        "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
        "1,10,-1,4,-1,0\n2,12,3,5,2,1\n3,-1,2,6,-1,0\n")
    with pytest.raises(ConfigurationError):  # no holdout list, no data
        next(p2012.iter_stays(tmp_path, sets=("a",)))
    (tmp_path / "holdout-ids.txt").write_text("2\n")
    stays = list(p2012.iter_stays(tmp_path, sets=("a",)))
    assert [s.record_id for s in stays] == [1, 3]
    assert stays[0].outcome["sofa"] is None and stays[1].outcome["saps_i"] is None
    assert [s.record_id for s in p2012.iter_stays(tmp_path, sets=("a",), limit=1)] == [1]

    out = tmp_path / "out"
    counts = p2012.convert_physionet(tmp_path, ("a",), out)
    assert counts == {"Patient": 2, "Encounter": 2, "Observation": 2, "labels": 2}
    patients = [orjson.loads(line) for line in (out / "Patient.ndjson").read_bytes().splitlines()]
    assert [pt["id"] for pt in patients] == ["p2012-1", "p2012-3"]
    labels = list(csv.DictReader(io.StringIO((out / "labels.csv").read_text(encoding="utf-8"))))
    assert labels[0]["patient_id"] == "p2012-1" and labels[0]["sofa"] == "" and labels[1]["saps_i"] == ""


def test_write_ndjson_layout_and_counts(tmp_path: Path) -> None:
    resources = [{"resourceType": "Patient", "id": "a"}, {"resourceType": "Observation", "id": "o1"},
                 {"resourceType": "Patient", "id": "b", "name": [{"text": "김민준"}]}]
    counts = write_ndjson(iter(resources), tmp_path / "x")
    assert counts == {"Patient": 2, "Observation": 1}
    lines = (tmp_path / "x" / "Patient.ndjson").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [resources[0], resources[2]]
    assert sorted(f.name for f in (tmp_path / "x").iterdir()) == ["Observation.ndjson", "Patient.ndjson"]


# ---------------------------------------------------------------- KTAS

@pytest.fixture(scope="module")
def ktas_rows() -> list[dict[str, Any]]:
    return ktas.read_rows(KTAS / "train.csv")


@pytest.fixture(scope="module")
def raw_ktas() -> dict[int, dict[str, str]]:
    with open(KTAS / "train.csv", encoding="latin-1", newline="") as fh:
        return {int(r["row_id"]): r for r in csv.DictReader(fh, delimiter=";")}


def obs_by_column(resources: list[dict[str, Any]], row_id: int) -> dict[str, dict[str, Any]]:
    prefix = f"ktas-{row_id}-"
    return {r["id"].removeprefix(prefix): r for r in resources if r["resourceType"] == "Observation"}


@needs_ktas
def test_ktas_read_rows_normalises_tokens(ktas_rows, raw_ktas) -> None:
    assert len(ktas_rows) == 950
    rows = {r["row_id"]: r for r in ktas_rows}
    assert raw_ktas[1]["KTAS duration_min"] == "5,00" and rows[1]["KTAS duration_min"] == 5.0
    comma = next(i for i, r in raw_ktas.items() if r["KTAS duration_min"].split(",")[1] not in ("00", ""))
    assert rows[comma]["KTAS duration_min"] == float(raw_ktas[comma]["KTAS duration_min"].replace(",", "."))
    bos = [i for i, r in raw_ktas.items() if r["NRS_pain"] == "#BOÞ!"]
    qq = [i for i, r in raw_ktas.items() if r["SBP"] == "??"]
    assert bos and qq
    assert all(rows[i]["NRS_pain"] is None for i in bos) and all(rows[i]["SBP"] is None for i in qq)
    assert rows[1]["BT"] == 36.6 and rows[2]["Saturation"] is None  # Group-1 rows have no SpO2


@needs_ktas
def test_ktas_row_to_fhir_documented_form(ktas_rows, raw_ktas) -> None:
    row = next(r for r in ktas_rows if r["row_id"] == 1)
    resources = ktas.row_to_fhir(row)
    patient, encounter = resources[0], resources[1]
    assert patient == {"resourceType": "Patient", "id": "ktas-1",
                       "identifier": [{"system": ktas.ROW_ID_SYSTEM, "value": "1"}],
                       "gender": "male", "birthDate": "2029-01-01"}
    assert encounter["id"] == "ktas-enc-1" and encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "EMER" and encounter["period"] == {"start": "2100-01-01T00:00:00Z"}
    assert encounter["extension"] == [{"url": "http://hl7.org/fhir/StructureDefinition/encounter-modeOfArrival",
                                       "valueCoding": {"system": ktas.ARRIVAL_SYSTEM, "code": "3",
                                                       "display": "Private vehicle"}}]
    assert encounter["type"][0]["coding"][0] == {"system": ktas.INJURY_SYSTEM, "code": "2",
                                                 "display": "Injury visit"}
    assert encounter["reasonCode"] == [{"text": "right ocular pain"}]
    assert encounter["serviceProvider"]["identifier"] == {"system": ktas.ED_SYSTEM, "value": "2"}
    obs = obs_by_column(resources, 1)
    assert set(obs) == {"mental", "pain", "nrs-pain", "sbp", "dbp", "hr", "rr", "bt", "saturation", "ktas-rn"}
    assert obs["mental"]["code"]["coding"][0]["code"] == "11454-6"
    assert obs["mental"]["valueCodeableConcept"]["coding"][0]["code"] == "248234008"
    assert obs["pain"]["valueBoolean"] is True and obs["pain"]["code"]["coding"][0]["code"] == "22253000"
    assert obs["nrs-pain"]["valueQuantity"]["value"] == 2
    assert obs["bt"]["valueQuantity"] == {"value": 36.6, "unit": "Cel", "system": "http://unitsofmeasure.org",
                                          "code": "Cel"}
    assert [c["code"] for c in obs["saturation"]["code"]["coding"]] == ["59408-5", "2708-6"]
    nurse = obs["ktas-rn"]
    assert nurse["code"]["coding"][0] == {"system": "http://loinc.org", "code": "11283-9",
                                          "display": "Acuity assessment at First encounter"}
    assert nurse["valueCodeableConcept"]["coding"] == [{"system": "https://fhir-ai.invalid/CodeSystem/ktas-level",
                                                       "code": "2", "display": "KTAS 2 Emergent"}]
    assert all(o["effectiveDateTime"] == "2100-01-01T00:00:00Z" for o in obs.values())
    assert all(o["subject"] == {"reference": "Patient/ktas-1"} for o in obs.values())
    # Label and post-visit columns never reach FHIR (row 1: expert 4 vs nurse 2, diagnosis "Corneal abrasion").
    text = json.dumps(resources)
    assert "Corneal abrasion" not in text and "KTAS_expert" not in text and "KTAS 4" not in text
    validate(resources)


@needs_ktas
def test_ktas_missing_tokens_produce_no_observation(ktas_rows, raw_ktas) -> None:
    rows = {r["row_id"]: r for r in ktas_rows}
    bos = next(i for i, r in raw_ktas.items() if r["NRS_pain"] == "#BOÞ!" and r["Pain"] == "0")
    obs = obs_by_column(ktas.row_to_fhir(rows[bos]), bos)
    assert "nrs-pain" not in obs and obs["pain"]["valueBoolean"] is False
    qq = next(i for i, r in raw_ktas.items() if r["HR"] == "??")
    assert "hr" not in obs_by_column(ktas.row_to_fhir(rows[qq]), qq)
    lost = [i for i, r in raw_ktas.items() if set(r["Chief_complain"]) <= {"?", " "}]
    assert lost and raw_ktas[lost[0]]["Chief_complain"]
    for i in lost:
        assert "reasonCode" not in ktas.row_to_fhir(rows[i])[1]
    partial = dict(rows[1], Chief_complain="Pain, ??nus")  # merely contains '??': passed through
    assert ktas.row_to_fhir(partial)[1]["reasonCode"] == [{"text": "Pain, ??nus"}]


@needs_ktas
def test_ktas_all_train_resources_validate_and_ids_unique() -> None:
    visits = list(ktas.iter_visits(KTAS))
    assert len(visits) == 950
    holdout = ktas.holdout_ids(KTAS)
    assert len(holdout) == 317 and not holdout & {v.row_id for v in visits}
    resources = [r for v in visits for r in v.resources]
    assert len({r["id"] for r in resources}) == len(resources)
    validate(resources[::7])
    label = visits[0].label
    assert label["ktas_expert"] == 4 and label["ktas_rn"] == 2 and label["diagnosis"] == "Corneal abrasion"


def test_ktas_iter_visits_skips_holdout_rows(tmp_path: Path) -> None:
    header = ("row_id;Group;Sex;Age;Patients number per hour;Arrival mode;Injury;Chief_complain;Mental;Pain;"
              "NRS_pain;SBP;DBP;HR;RR;BT;Saturation;KTAS_RN;Diagnosis in ED;Disposition;KTAS_expert;"
              "Error_group;Length of stay_min;KTAS duration_min;mistriage")
    rows = ["4;1;1;30;5;1;1;?? ??;1;0;#BOÞ!;120;80;??;18;36,5;;4;Gastritis;1;4;0;60;2,50;0",
            "5;2;2;60;5;2;2;fall down;2;1;7;90;60;120;24;38.2;93;2;Fracture;2;1;2;300;4,00;2"]
    (tmp_path / "train.csv").write_bytes("\n".join([header, *rows, ""]).encode("latin-1"))
    with pytest.raises(ConfigurationError):
        next(ktas.iter_visits(tmp_path))
    (tmp_path / "holdout-ids.txt").write_text("5\n")
    visits = list(ktas.iter_visits(tmp_path))
    assert [v.row_id for v in visits] == [4]
    resources = visits[0].resources
    assert "reasonCode" not in resources[1]
    obs = obs_by_column(resources, 4)
    assert "nrs-pain" not in obs and "hr" not in obs and "saturation" not in obs
    assert obs["bt"]["valueQuantity"]["value"] == 36.5  # decimal comma
    assert visits[0].label["ktas_duration_min"] == 2.5 and visits[0].label["ktas_expert"] == 4
    counts = ktas.convert_ktas(tmp_path, tmp_path / "out")
    assert counts["Patient"] == 1 and counts["labels"] == 1
    assert "Gastritis" not in (tmp_path / "out" / "Encounter.ndjson").read_text()


# ---------------------------------------------------------------- demo hospital

def read_folder(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {t: [orjson.loads(line) for line in (folder / f"{t}.ndjson").read_bytes().splitlines()]
            for t in MODELS}


def test_demo_is_deterministic_and_matches_committed_fixture(tmp_path: Path) -> None:
    counts = demo.generate_demo_hospital(tmp_path / "one")
    demo.generate_demo_hospital(tmp_path / "two")
    for name in ("Patient.ndjson", "Encounter.ndjson", "Observation.ndjson"):
        one = (tmp_path / "one" / name).read_bytes()
        assert one == (tmp_path / "two" / name).read_bytes()
        assert one == (FIXTURE / name).read_bytes(), f"regenerate fixtures/demo-hospital ({name} differs)"
    assert counts["Patient"] == 12 and counts["Encounter"] == 13
    assert sum(f.stat().st_size for f in FIXTURE.glob("*.ndjson")) < 1_500_000
    demo.generate_demo_hospital(tmp_path / "other", seed=1)
    other = (tmp_path / "other" / "Observation.ndjson").read_bytes()
    assert other != (tmp_path / "one" / "Observation.ndjson").read_bytes()


def test_demo_content_and_mess() -> None:
    data = read_folder(FIXTURE)
    patients, encounters, observations = data["Patient"], data["Encounter"], data["Observation"]
    assert [p["id"] for p in patients] == [f"demo-{i:03d}" for i in range(1, 13)]
    assert sorted(e["id"] for e in encounters) == [f"demo-enc-{i:03d}" for i in range(1, 14)]
    assert all("\uac00" <= p["name"][0]["family"] <= "\ud7a3" for p in patients)  # Hangul syllables
    current = [e for e in encounters if e["status"] == "in-progress"]
    assert len(current) == 12 and all(e["class"]["code"] == "IMP" for e in encounters)
    old = next(e for e in encounters if e["id"] == "demo-enc-013")
    assert old["status"] == "finished" and old["subject"]["reference"] == "Patient/demo-001" and "end" in old["period"]
    per_patient = {p["id"]: [o for o in observations if o["subject"]["reference"] == f"Patient/{p['id']}"]
                   for p in patients}
    assert per_patient["demo-010"] == [] and all(per_patient[p] for p in per_patient if p != "demo-010")
    allowed = {v[2] for v in p2012.VARIABLES.values()} | {"59408-5", "85354-9"}
    assert {o["code"]["coding"][0]["code"] for o in observations} <= allowed
    units = {(o["code"]["coding"][0]["code"], o["valueQuantity"]["code"]) for o in observations if "valueQuantity" in o}
    assert {("8310-5", "[degF]"), ("2160-0", "umol/L"), ("2345-7", "mmol/L"), ("3150-0", "%")} <= units
    panel = next(o for o in observations if o["code"]["coding"][0]["code"] == "85354-9")
    assert [c["code"]["coding"][0]["code"] for c in panel["component"]] == ["8480-6", "8462-4"]
    statuses = [o["status"] for o in observations]
    assert statuses.count("entered-in-error") == 1 and statuses.count("amended") == 1
    assert any(o["effectiveDateTime"].endswith("+09:00") for o in observations)
    assert sum(o.get("valueBoolean") is True for o in per_patient["demo-006"]) >= 2  # MechVent
    assert len({o["id"] for o in observations}) == len(observations)
    validate(patients + encounters + observations[::5])


def test_demo_times_and_deterioration() -> None:
    anchor = datetime.fromisoformat(demo.DEFAULT_ANCHOR)
    data = read_folder(FIXTURE)
    for enc in data["Encounter"]:
        start = datetime.fromisoformat(enc["period"]["start"])
        if enc["status"] == "in-progress":
            assert 24 <= (anchor - start).total_seconds() / 3600 <= 73
    for o in data["Observation"]:
        assert datetime.fromisoformat(o["effectiveDateTime"]) < anchor

    def series(pid: str, code: str) -> list[float]:
        obs = [o for o in data["Observation"]
               if o["encounter"]["reference"] == f"Encounter/demo-enc-{pid}" and o["code"]["coding"][0]["code"] == code]
        obs.sort(key=lambda o: datetime.fromisoformat(o["effectiveDateTime"]))
        return [o["valueQuantity"]["value"] for o in obs]

    hr, lactate = series("005", "8867-4"), series("005", "32693-4")  # septic
    assert hr[-1] > hr[0] + 25 and lactate[-1] > 3 * lactate[0] / 2 + 1
    assert series("007", "9269-2")[-1] <= 10 < series("007", "9269-2")[0]  # falling GCS
    stable = series("002", "8867-4")
    assert max(stable) - min(stable) < 30
