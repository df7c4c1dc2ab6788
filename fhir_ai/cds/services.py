"""The CDS Services fhir_ai offers, and their prefetch templates built from each model's mapping."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from ..fhir.sources import code_token
from ..mapping import Mapping
from ..models.registry import ModelRegistry

PATIENT_KEY, ENCOUNTER_KEY, OBSERVATIONS_KEY = "patient", "encounter", "observations"


@dataclass(frozen=True)
class Service:
    """One CDS Service: a model behind one hook."""
    id: str
    hook: str
    model_id: str
    title: str
    description: str
    usage: str
    ed_only: bool = False          # answers only for an emergency-department encounter

    def requires_encounter(self) -> bool:
        return self.hook == "encounter-start"


SERVICES = (
    Service("deterioration", "patient-view", "deterioration", "fhir_ai deterioration risk",
            "Risk of in-hospital death of an adult inpatient (LightGBM, calibrated), with NEWS2 next to it, "
            "the inputs that moved the prediction and what was missing.",
            "Register for inpatient wards and ICUs."),
    Service("triage", "encounter-start", "triage", "fhir_ai KTAS triage",
            "Predicted KTAS level (1 resuscitation ... 5 non-urgent) at emergency department arrival, with the "
            "triage nurse's KTAS next to it.",
            "Register for emergency department encounters; other encounters get a 'not assessed' card.",
            ed_only=True),
    Service("triage-ed-view", "patient-view", "triage", "fhir_ai KTAS triage (ED patient view)",
            "The KTAS triage prediction when an emergency department patient's chart is opened.",
            "Register only for emergency department workstations; other encounters get a 'not assessed' "
            "card. Without context.encounterId, the patient's active emergency department encounter is "
            "assessed.", ed_only=True),
)


def available(registry: ModelRegistry) -> list[Service]:
    """Only services whose model is actually loaded: discovery must not promise what cannot answer."""
    return [s for s in SERVICES if s.model_id in registry.models]


def find(registry: ModelRegistry, service_id: str) -> Service | None:
    return next((s for s in available(registry) if s.id == service_id), None)


_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
MAX_TEMPLATE = 1800   # like fhir.sources.MAX_URL: many proxies and servers refuse much longer URLs


def observation_chunks(mapping: Mapping) -> list[list[tuple[str, str]]]:
    """The mapping's codes split so that each Observation template stays under MAX_TEMPLATE characters."""
    chunks: list[list[tuple[str, str]]] = [[]]
    for code in mapping.query_codes():
        if chunks[-1] and len(observation_query(mapping, chunks[-1] + [code], _EPOCH)) > MAX_TEMPLATE:
            chunks.append([])
        chunks[-1].append(code)
    return chunks


def observation_keys(mapping: Mapping) -> list[str]:
    """'observations', then 'observations-2', ... one prefetch key per chunk of codes."""
    return [OBSERVATIONS_KEY if i == 0 else f"{OBSERVATIONS_KEY}-{i + 1}"
            for i in range(len(observation_chunks(mapping)))]


def observation_query(mapping: Mapping, codes: list[tuple[str, str]], now: datetime,
                      patient: str = "{{context.patientId}}") -> str:
    """Observation search for these codes (and the mapping's look-back, if it has a finite one)."""
    tokens = ",".join(code_token(system, code) for system, code in codes)
    query = f"Observation?patient={patient}&code={quote(tokens, safe='|,:/')}"
    lookback = mapping.longest_lookback()
    if lookback is not None:
        # Prefetch tokens cannot say "now - 48 h" (CDS Hooks 2.0), so the date is fixed when discovery is
        # read, rounded down to the day: a client that caches it sends more history, never less.
        since = (now - timedelta(seconds=lookback)).date().isoformat()
        query += f"&date=ge{since}"
    return query + "&_count=500"


def encounter_template(service: Service) -> str:
    """The read of the hook's encounter where the hook requires ``context.encounterId`` (encounter-start);
    elsewhere (patient-view: encounterId is OPTIONAL) the search of the patient's encounters, which the EHR
    can always fill. A template naming an absent context field cannot be filled, so the EHR would omit the
    key; with the search, fhir_ai has what $assess uses without a pinned encounter (the patient's current
    encounter) and still finds context.encounterId among them when the EHR sends it."""
    if service.requires_encounter():
        return "Encounter/{{context.encounterId}}"
    return "Encounter?patient={{context.patientId}}"


def prefetch(service: Service, mapping: Mapping, now: datetime) -> dict[str, str]:
    """Exactly what the mapping needs: the Patient, the Encounter(s), the Observations by code (and date)."""
    templates = {PATIENT_KEY: "Patient/{{context.patientId}}", ENCOUNTER_KEY: encounter_template(service)}
    for key, codes in zip(observation_keys(mapping), observation_chunks(mapping)):
        templates[key] = observation_query(mapping, codes, now)
    return templates


def discovery(registry: ModelRegistry, now: datetime) -> dict[str, Any]:
    services = []
    for service in available(registry):
        model, mapping = registry.get(service.model_id)
        services.append({
            "hook": service.hook, "title": service.title,
            "description": f"{service.description} Model {model.model_id} version {model.version}.",
            "id": service.id, "prefetch": prefetch(service, mapping, now),
            "usageRequirements": (f"{service.usage} Calls need a JWT signed by a trusted EHR (RS384 or ES384). "
                                  "Missing prefetch keys are fetched from fhirServer with fhirAuthorization."),
        })
    return {"services": services}
