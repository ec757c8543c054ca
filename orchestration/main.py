"""Run the whole graph in-process (what `bonmf run` and the benchmark do).

`dagster.materialize`-style in-process execution of the `retrain` job against a persistent
Dagster instance in `<state dir>/dagster` (telemetry off), so the runs, their metadata and
check results show up in the UI afterwards (`ui_command()`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Telemetry off; run monitoring on, so the daemon of `dagster dev` fails UI launches stuck in
# STARTING (runs that did start and then lost their process: `run_health`).
DAGSTER_YAML = ("telemetry:\n  enabled: false\n"
                "run_monitoring:\n  enabled: true\n  start_timeout_seconds: 300\n")
EARLIER_DAGSTER_YAML = "telemetry:\n  enabled: false\n"   # what older versions wrote


def prepare_dagster_home(state: Path) -> Path:
    """`<state>/dagster` with bonmf's dagster.yaml (a user-edited one is kept); exported as
    DAGSTER_HOME."""
    home = Path(state) / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text() == EARLIER_DAGSTER_YAML:
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def ui_command(state: Path, params_path: str | None = None) -> str:
    env = f"DAGSTER_HOME={Path(state) / 'dagster'} BONMF_STATE_DIR={state}"
    if params_path:
        env += f" BONMF_PARAMS={params_path}"
    import sys

    # the dagster beside this Python (a relative .venv/bin is wrong outside the repo root)
    return f"{env} {Path(sys.executable).parent / 'dagster'} dev -m orchestration.definitions"


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Wall seconds per step (asset or check) of a run, from its event log."""
    import dagster as dg

    starts, ends = {}, {}
    for record in instance.get_records_for_run(run_id, limit=100_000).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS,
                                  dg.DagsterEventType.STEP_FAILURE):
            ends[entry.step_key] = entry.timestamp
    return {k: round(ends[k] - starts[k], 3) for k in starts if k in ends}


def write_run_config(cfg, state: Path) -> Path:
    """The resolved configuration as a complete params file, `<state>/configs/<hash>.yaml`:
    what the run's ParamsResource reads, and a record of exactly what it ran with."""
    import yaml

    from bonmf_core.atomic import atomic_file
    from bonmf_core.hashing import sha256_json

    values = cfg.dump()
    path = Path(state) / "configs" / f"{sha256_json(values)[:16]}.yaml"
    if not path.exists():
        with atomic_file(path) as tmp:
            tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def run_pipeline(cfg, *, state: Path | None = None, force: bool = False,
                 forced_by: str | None = None, tags: dict | None = None,
                 log_level: str = "WARNING", progress: bool = False) -> dict:
    """Materialize every asset (and its checks) with the configuration `cfg` (a BonmfConfig),
    on its `pipeline.executor` (in-process by default: docs/executors.md); → a summary dict.

    summary: success, run_id, seconds, steps (seconds per step), failed_steps, checks (name →
    passed), and on success the evaluation (table, report paths), the candidate, each
    candidate fit (variant, seed, reused, fit_s, best_epoch, epochs_run) and the gate
    decision. A failed run is recorded in the store's run_failures table.
    """
    from bonmf_core.settings import state_dir

    from .executors import build_executor

    build_executor(cfg.pipeline)  # a bad pipeline.executor(_config) fails before any state
    state = Path(state).resolve() if state else state_dir()
    os.environ["BONMF_STATE_DIR"] = str(state)
    prepare_dagster_home(state)
    os.environ.setdefault("BENTOML_HOME", str(state / "bentoml"))  # before bentoml imports
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    import dagster as dg

    from bonmf_core.store.database import masked_url

    from .executors import execute_retrain, params_env

    with params_env(str(write_run_config(cfg, state))):   # the UI `defs` read at import
        from .definitions import build_definitions
    from .resources import StoreResource
    from .run_health import host_tags, mark_dead_runs, record_failed_run

    params_path = str(write_run_config(cfg, state))
    store_url = cfg.encoders.store_url
    defs = build_definitions(params_path=params_path, state_root=str(state), store_url=store_url,
                             progress=progress)
    job = defs.resolve_job_def("retrain")
    started = time.perf_counter()
    run_config = {"ops": {"promotion_decision": {"config": {"force": force,
                                                            "forced_by": forced_by}}},
                  "loggers": {"console": {"config": {"log_level": log_level}},
                              **({"progress": {}} if progress else {})}}
    with dg.DagsterInstance.get() as instance:
        # Runs an earlier, killed `bonmf run` left STARTED are failed now, before this one.
        dead = mark_dead_runs(instance, StoreResource(url=store_url))
        # pipeline.executor: in-process, or rebuilt in step processes (orchestration/executors)
        result = execute_retrain(
            cfg, job, params_path=params_path, state_root=str(state), progress=progress,
            run_config=run_config, instance=instance,
            tags={"bonmf/trigger": "cli", **host_tags(), **(tags or {})})
        seconds = time.perf_counter() - started
        summary: dict = {"success": result.success, "run_id": result.run_id,
                         "seconds": round(seconds, 3),
                         "steps": step_seconds(instance, result.run_id),
                         "state_dir": str(state), "dagster_home": os.environ["DAGSTER_HOME"],
                         "store": masked_url(store_url),
                         "ui": ui_command(state, params_path),
                         "dead_runs_marked": [r["run_id"] for r in dead]}
        summary["checks"] = {
            e.asset_check_evaluation_data.check_name: {
                "passed": e.asset_check_evaluation_data.passed,
                "severity": e.asset_check_evaluation_data.severity.value,
                "description": e.asset_check_evaluation_data.description}
            for e in result.all_events if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}
        summary["failed_steps"] = [e.step_key for e in result.all_events
                                   if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        if not result.success:
            failure = next((e for e in result.all_events
                            if e.event_type == dg.DagsterEventType.STEP_FAILURE), None)
            message = _failure_message(failure)
            summary["error"], summary["error_class"] = message, _failure_class(failure)
            record_failed_run(StoreResource(url=store_url), instance.get_run_by_id(result.run_id),
                              message, instance)
            return summary
    snapshot = result.output_for_node("dataset_snapshot")
    evaluation = result.output_for_node("offline_evaluation")
    candidate = result.output_for_node("bonmf_candidate")
    decision = result.output_for_node("promotion_decision")
    summary.update(
        snapshot=snapshot["content_hash"],
        dataset=result.output_for_node("validated_dataset")["dataset_hash"],
        table=evaluation["table"], report=evaluation["report"],
        results=evaluation["results"],
        candidate={k: candidate[k] for k in ("variant", "version_id", "artifact_path",
                                             "artifact_sha256", "metrics")},
        fits=[_fit_record(f) for f in candidate["fits"]],
        fits_reused=sum(f["reused"] for f in candidate["fits"]),
        fits_total=len(candidate["fits"]),
        decision=decision, package=result.output_for_node("bento_package"),
        versioned=result.output_for_node("versioned_artifacts"))
    return summary


def _fit_record(fit: dict) -> dict:
    """One candidate fit in a run's summary: what it cost and where early stopping ended it
    (so a slow run can be explained from its summary alone)."""
    metrics = fit["metrics"]
    return {"variant": fit["variant"], "seed": fit["seed"], "reused": fit["reused"],
            **{k: metrics.get(k) for k in ("fit_s", "best_epoch", "epochs_run")}}


def _failure_class(event) -> str | None:
    """The class name of the innermost error ('DataError' for unreadable input)."""
    error = getattr(getattr(event, "step_failure_data", None), "error", None)
    while error is not None and error.cause is not None:
        error = error.cause
    return None if error is None else error.cls_name


def _failure_message(event) -> str:
    """The innermost error of a step failure (the user code's, not Dagster's wrapper)."""
    if event is None or event.step_failure_data is None or event.step_failure_data.error is None:
        return "run failed"
    error = event.step_failure_data.error
    while error.cause is not None:
        error = error.cause
    return f"{event.step_key}: {error.message.strip()}"
