"""Typed resources: the metadata store, the state folders and the run's configuration."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import dagster as dg

from bonmf_core.config import BonmfConfig, load_config
from bonmf_core.settings import state_dir

class StoreResource(dg.ConfigurableResource):
    """The SQLAlchemy metadata store (embedding cache + registry). None = SQLite in the state
    dir (or `BONMF_STORE_URL`)."""

    url: str | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator:
        from bonmf_core.store.database import Store

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
    """The run's one configuration object (`bonmf_core.config.BonmfConfig`), resolved the way
    every entry point resolves it: schema defaults < the params file < `set`.

    path: the params file; empty = `$BONMF_PARAMS`, else ./params.yaml where it exists.
    set: `section.key=value` overrides (YAML values), applied in order — what `bonmf run
    --set` and its flags pass, and what a launch from the UI edits.
    Every asset reads its section from `load()`; a bad key fails the run at its first step,
    naming the key path.
    """

    path: str | None = None
    set: list[str] = []

    def load(self) -> BonmfConfig:
        return load_config(self.path or None, self.set)
