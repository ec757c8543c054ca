"""The Dagster definitions: `dagster dev -m orchestration.definitions` opens them in the UI."""

from __future__ import annotations

import dagster as dg

from bonmf_core.config import load_config

from .assets import ALL_ASSETS
from .checks import snapshot_checks
from .executors import build_executor
from .jobs import retrain_job
from .progress import step_progress_logger
from .resources import ParamsResource, StateResource, StoreResource
from .schedules import periodic_retrain
from .sensors import mark_dead_runs_sensor, new_data_sensor, record_run_failures


def build_definitions(params_path: str | None = None, sets=(), state_root: str = "",
                      store_url: str | None = None, progress: bool = False,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """Definitions bound to a configuration (params file + `section.key=value` overrides), a
    state folder and a store (defaults: `$BONMF_PARAMS` or ./params.yaml, `BONMF_STATE_DIR`
    or ./.bonmf, SQLite in the state folder). `progress`: add the one-line-per-step logger
    (what `bonmf run` prints while the graph runs). `executor`: the jobs' executor
    (`orchestration.executors.build_executor`; None = Dagster's default)."""
    loggers = {"console": dg.colored_console_logger}
    if progress:
        loggers["progress"] = step_progress_logger
    return dg.Definitions(
        assets=ALL_ASSETS,
        loggers=loggers,
        asset_checks=[snapshot_checks],
        jobs=[retrain_job],
        executor=executor,
        schedules=[periodic_retrain],
        sensors=[new_data_sensor, record_run_failures, mark_dead_runs_sensor],
        resources={
            "params": ParamsResource(path=params_path, set=list(sets)),
            "state": StateResource(root=state_root),
            "store": StoreResource(url=store_url),
        },
    )


# The UI's launches read $BONMF_PARAMS (which `bonmf run --params` prints) or ./params.yaml.
defs = build_definitions(executor=build_executor(load_config().pipeline))
