"""Typed resources: the metadata store, the state folders and the params file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import dagster as dg

from bonmf_core.params import load_params
from bonmf_core.settings import state_dir

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class StoreResource(dg.ConfigurableResource):
    """The SQLAlchemy metadata store (embedding cache + registry). None = SQLite in the state
    dir (or `BONMF_STORE_URL`)."""

    url: str | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator:
        from bonmf_core.store import Store

        store = Store(self.url)
        try:
            yield store
        finally:
            store.dispose()


class StateResource(dg.ConfigurableResource):
    """Where generated state lives: snapshots, datasets, features, models, reports, production.
    Empty = `BONMF_STATE_DIR` or ./.bonmf, resolved when a run starts."""

    root: str = ""

    @property
    def path(self) -> Path:
        return Path(self.root).resolve() if self.root else state_dir()

    def folder(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def production_dir(self) -> Path:
        return self.path / "production" / "model"


class ParamsResource(dg.ConfigurableResource):
    """The one hyper-parameter file every entry point reads (params.yaml at the repo root).
    The asset configs override the knobs they expose; everything else comes from here."""

    path: str | None = str(REPO_PARAMS) if REPO_PARAMS.exists() else None

    def load(self) -> dict:
        return load_params(self.path)
