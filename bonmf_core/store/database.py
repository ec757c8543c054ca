"""The metadata store: one SQLAlchemy engine over the tables of `schema.py`.

SQLite file by default (`<state dir>/bonmf.db`); any SQLAlchemy URL (PostgreSQL, …) by
configuration (`BONMF_STORE_URL` or the `url` argument). SQLite runs in WAL mode with a busy
timeout so concurrent writers (two encode runs, a Dagster run and the service) wait for each
other instead of failing, and readers never block.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bonmf_core.store.schema import SCHEMA_VERSION, Base, SchemaVersion
from bonmf_core.settings import state_dir


# pg_advisory_lock key of the schema migration: any fixed 64-bit number, the same in every process.
_MIGRATION_LOCK = 0x626F6E6D66   # "bonmf"


class StoreVersionError(RuntimeError, ValueError):
    """The database was written by a newer schema than this code knows (a user error: the
    CLI prints it without a traceback)."""


class StoreUnavailableError(ConnectionError, ValueError):
    """The store's database cannot be reached or opened (server down, wrong credentials,
    missing driver); the message names the URL with its password masked."""


def default_store_url() -> str:
    url = os.environ.get("BONMF_STORE_URL")
    return url or f"sqlite:///{state_dir() / 'bonmf.db'}"


def masked_url(url: str | None = None) -> str:
    """A store URL (None = the default) with its password masked: what may be printed."""
    from sqlalchemy.engine import make_url

    return make_url(url or default_store_url()).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """Engine + session factory; creates (or migrates) the schema on open."""

    def __init__(self, url: str | None = None):
        self.url = url or default_store_url()
        if self.url.startswith("sqlite:///") and self.url != "sqlite:///:memory:":
            Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            self.url, connect_args={"timeout": 60} if self.url.startswith("sqlite") else {})
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self.migrate()
        except (OperationalError, InterfaceError) as exc:
            self.engine.dispose()
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            raise StoreUnavailableError(
                f"cannot open the store {self.safe_url} (BONMF_STORE_URL or "
                f"encoders.store_url): {reason}") from None

    @property
    def safe_url(self) -> str:
        """The URL with its password masked: what messages and logs may show."""
        return masked_url(self.url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block succeeds, rolled back when it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def schema_version(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.max(SchemaVersion.version))) or 0)

    def migrate(self) -> None:
        """Create missing tables and record the schema version (idempotent, concurrent-safe).

        Revisions that change existing tables go into `_MIGRATIONS` as (version, function);
        version 1 is the initial schema, created by `create_all`.
        """
        with self._migration_lock():
            self._migrate()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """One migrating process at a time on PostgreSQL, whose CREATE TABLE races fail
        (`pg_class` unique violation) where SQLite's single writer lock serializes them."""
        if self.dialect != "postgresql":
            yield
            return
        with self.engine.connect() as conn:   # a session-level lock on its own connection
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                conn.commit()

    def _migrate(self) -> None:
        Base.metadata.create_all(self.engine)  # checks first; concurrent openers are serialized
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.safe_url} has schema version {current}, this code knows up to "
                f"{SCHEMA_VERSION}: upgrade bonmf before using this store")
        for version, apply in _MIGRATIONS:
            if version > current:
                with self.session() as s:
                    apply(s)
        if current < SCHEMA_VERSION:
            with contextlib.suppress(IntegrityError), self.session() as s:  # a racer won
                s.merge(SchemaVersion(version=SCHEMA_VERSION))

    def dispose(self) -> None:
        self.engine.dispose()


def _add_model_version_columns(session: Session) -> None:
    """v2: model_versions.bento_tag and .dvc_json (absent from a v1 database; a fresh one
    already has them from create_all)."""
    have = {c["name"] for c in inspect(session.connection()).get_columns("model_versions")}
    for name, sql_type in (("bento_tag", "VARCHAR(256)"), ("dvc_json", "TEXT")):
        if name not in have:
            session.execute(text(f"ALTER TABLE model_versions ADD COLUMN {name} {sql_type}"))


# (version, function(session)) for revisions after the initial schema, in order.
_MIGRATIONS: list = [(2, _add_model_version_columns)]
