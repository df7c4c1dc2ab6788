"""Code systems and identifier systems fhir_ai writes (its own live under https://fhir-ai.invalid/)."""

BASE = "https://fhir-ai.invalid"
MODEL_SYSTEM = f"{BASE}/CodeSystem/model"                  # code = model id, Coding.version = model version
MODEL_VERSION_SYSTEM = f"{BASE}/CodeSystem/model-version"  # code = "<model id>|<version>" (searchable token)
ASSESSMENT_IDENTIFIER = f"{BASE}/identifier/risk-assessment"
SCORE_EXTENSION = f"{BASE}/StructureDefinition/score"
KTAS_SYSTEM = f"{BASE}/CodeSystem/ktas-level"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
RISK_DISPLAY = {"negligible": "Negligible likelihood", "low": "Low likelihood", "moderate": "Moderate likelihood",
                "high": "High likelihood", "certain": "Certain"}
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED = {"system": OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"}
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
FHIR_JSON = "application/fhir+json"
