"""The Dagster definitions: `dagster dev -m orchestration.definitions` opens them in the UI."""

from __future__ import annotations

import os

import dagster as dg

from .assets import ALL_ASSETS
from .checks import snapshot_checks
from .jobs import retrain_job
from .resources import REPO_PARAMS, ParamsResource, StateResource, StoreResource
from .schedules import periodic_retrain
from .sensors import new_data_sensor, record_run_failures


def build_definitions(params_path: str | None = None, state_root: str = "",
                      store_url: str | None = None) -> dg.Definitions:
    """Definitions bound to a params file, a state folder and a store (defaults: the repo's
    params.yaml, `BONMF_STATE_DIR` or ./.bonmf, SQLite in the state folder)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=[snapshot_checks],
        jobs=[retrain_job],
        schedules=[periodic_retrain],
        sensors=[new_data_sensor, record_run_failures],
        resources={
            "params": ParamsResource(path=params_path or (str(REPO_PARAMS)
                                                          if REPO_PARAMS.exists() else None)),
            "state": StateResource(root=state_root),
            "store": StoreResource(url=store_url),
        },
    )


# BONMF_PARAMS: the params file the UI's launches read (`bonmf run --params` prints it).
defs = build_definitions(params_path=os.environ.get("BONMF_PARAMS") or None)
