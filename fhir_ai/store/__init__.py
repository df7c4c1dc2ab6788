"""Storage: SQLAlchemy on SQLite (embedded default) or PostgreSQL, schema by Alembic migrations."""
from .actors import Actor
from .audit import Access, Entity
from .repository import Saved, Store
from .trail import NewAssessment

__all__ = ["Access", "Actor", "Entity", "NewAssessment", "Saved", "Store"]
