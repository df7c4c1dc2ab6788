"""Feature extraction: FHIR resources → model feature matrix (one path for training and serving)."""
from .extract import Dropped, Extractor, FeatureSet

__all__ = ["Dropped", "Extractor", "FeatureSet"]
