"""Mappings: how a hospital's codes and units become model inputs."""
from .loader import Feature, Input, Mapping, check_directory, load_directory, load_mapping

__all__ = ["Feature", "Input", "Mapping", "check_directory", "load_directory", "load_mapping"]
