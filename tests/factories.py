"""Small FHIR R4 resource factories for tests: realistic defaults, any field overridden by keyword."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICU_TYPE = "https://fhir-ai.invalid/CodeSystem/physionet2012-icutype"


def new_id(prefix: str) -> str:
    """A fresh id: shared servers (the sekmet session fixture) need every test to use its own."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def fhir_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def patient(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("id", new_id("pat"))
    kwargs.setdefault("gender", "male")
    kwargs.setdefault("birthDate", "1958-03-14")
    return {"resourceType": "Patient", **kwargs}


def encounter(patient_id: str, **kwargs: Any) -> dict[str, Any]:
    """An in-progress inpatient (medical ICU) stay that started a day ago."""
    kwargs.setdefault("id", new_id("enc"))
    kwargs.setdefault("status", "in-progress")
    kwargs.setdefault("class", {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"})
    kwargs.setdefault("serviceType", {"coding": [{"system": ICU_TYPE, "code": "3", "display": "Medical ICU"}]})
    kwargs.setdefault("subject", {"reference": f"Patient/{patient_id}"})
    kwargs.setdefault("period", {"start": fhir_time(datetime.now(timezone.utc) - timedelta(days=1))})
    return {"resourceType": "Encounter", **kwargs}


def observation(patient_id: str, code: str, value: float, unit: str, when: datetime | str,
                **kwargs: Any) -> dict[str, Any]:
    """A final LOINC-coded Observation with a UCUM valueQuantity."""
    kwargs.setdefault("id", new_id("obs"))
    kwargs.setdefault("status", "final")
    kwargs.setdefault("category", [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs"}]}])
    kwargs.setdefault("code", {"coding": [{"system": LOINC, "code": code}]})
    kwargs.setdefault("subject", {"reference": f"Patient/{patient_id}"})
    kwargs.setdefault("effectiveDateTime", when if isinstance(when, str) else fhir_time(when))
    kwargs.setdefault("valueQuantity", {"value": value, "unit": unit, "system": UCUM, "code": unit})
    return {"resourceType": "Observation", **kwargs}


# (LOINC code, UCUM unit, category, values oldest → newest): a septic course over the last 12 hours.
SEPSIS_COURSE: list[tuple[str, str, str, list[float]]] = [
    ("8867-4", "/min", "vital-signs", [96, 108, 121, 128]),      # heart rate
    ("9279-1", "/min", "vital-signs", [20, 24, 27]),             # respiratory rate
    ("8480-6", "mm[Hg]", "vital-signs", [118, 102, 91]),         # systolic blood pressure
    ("59408-5", "%", "vital-signs", [96, 94, 92]),               # SpO2 (pulse oximetry)
    ("8310-5", "Cel", "vital-signs", [38.1, 38.9]),              # body temperature
    ("9269-2", "{score}", "survey", [14]),                       # Glasgow coma score
    ("32693-4", "mmol/L", "laboratory", [2.1, 3.8]),             # lactate
    ("2160-0", "mg/dL", "laboratory", [1.4]),                    # creatinine
    ("6690-2", "10*3/uL", "laboratory", [17.2]),                 # leukocytes
]


def sepsis_observations(patient_id: str, encounter_id: str, last: datetime,
                        hours: float = 12.0) -> list[dict[str, Any]]:
    """20 vital-sign and lab Observations spread evenly over ``hours`` up to ``last``."""
    out = []
    for code, unit, category, values in SEPSIS_COURSE:
        for i, value in enumerate(values):
            when = last - timedelta(hours=hours * (len(values) - 1 - i) / max(len(values) - 1, 1))
            out.append(observation(
                patient_id, code, value, unit, when,
                category=[{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
                encounter={"reference": f"Encounter/{encounter_id}"}))
    return out


def searchset(resources: list[dict[str, Any]], base: str, *, self_url: str | None = None,
              next_url: str | None = None, total: int | None = None) -> dict[str, Any]:
    """A search result Bundle as a server sends it (absolute fullUrls under ``base``)."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    links = [("self", self_url), ("next", next_url)]
    bundle["link"] = [{"relation": relation, "url": url} for relation, url in links if url]
    bundle["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                        "search": {"mode": "match"}} for r in resources]
    return bundle


def operation_outcome(text: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "details": {"text": text}}]}
