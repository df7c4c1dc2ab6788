"""Batch jobs on Celery + Redis: ward and hospital-wide assessment, scheduled rescoring, write-back delivery."""
from .state import JobStore, JobView

__all__ = ["JobStore", "JobView"]
