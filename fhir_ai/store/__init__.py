"""Storage: SQLAlchemy on SQLite (embedded default) or PostgreSQL."""
from .repository import Saved, Store

__all__ = ["Saved", "Store"]
