"""fhir_ai: FHIR interoperability server for AI triage and deterioration warnings."""

__version__ = "0.1.0"
