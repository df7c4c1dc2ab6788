"""Alembic migrations of the store; ``fhir_ai.store.engine.migrate`` runs them at start-up."""
