"""HTTP API: one blueprint per area."""
from . import health, metadata, operations, risk_assessments, write_back

BLUEPRINTS = [metadata.bp, operations.bp, risk_assessments.bp, health.bp, write_back.bp]
