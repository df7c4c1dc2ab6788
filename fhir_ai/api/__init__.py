"""HTTP API: one blueprint per area."""
from . import health, metadata, operations, risk_assessments, write_back

BLUEPRINTS = [metadata.bp, operations.bp, risk_assessments.bp, health.bp, write_back.bp]

# EHR integration: CDS Hooks and push mode (POST /$assess).
from . import cds_hooks, push  # noqa: E402

BLUEPRINTS += [cds_hooks.bp, push.bp]

# Auditors: Provenance and AuditEvent (read and search).
from . import audit, provenance  # noqa: E402

BLUEPRINTS += [provenance.bp, audit.bp]

# Batch jobs (async Group/$assess, $assess-all, job status) and Subscription notifications.
from . import jobs, subscriptions  # noqa: E402

BLUEPRINTS += [jobs.bp, subscriptions.bp]
