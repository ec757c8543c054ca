"""The metadata store: one SQLAlchemy schema, SQLite by default, any URL by configuration."""

from bonmf_core.store.database import Store

__all__ = ["Store"]
