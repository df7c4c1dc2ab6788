"""Talking FHIR: the HTTP client, the data sources (server or folder) and time helpers."""
from .client import FhirClient
from .sources import FolderSource, ServerSource, Source, make_source

__all__ = ["FhirClient", "FolderSource", "ServerSource", "Source", "make_source"]
