"""The Dagster executor, from the configuration (`pipeline.executor`, `pipeline.executor_config`).

`in_process` runs every step in the calling process (`execute_in_process`, values kept in
memory). Every other executor runs steps in other processes — or on other machines — so the job
must be rebuildable there: `rebuild_retrain_job` is a module-level reconstructor taking only
strings (params file, state folder, store URL), and the run goes through `dg.execute_job` against
the persistent instance in `<state>/dagster`, values between assets through the filesystem I/O
manager (`<state>/dagster/storage`). Nothing an asset needs lives in process memory.

dask, celery and k8s come from Dagster's integration packages; choosing one that is not
installed fails before the run with the `pip install` line that fixes it. docs/executors.md
has a complete example of each.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import dagster as dg

from bonmf_core.errors import ConfigError

# name → (module, attribute, the package that provides it)
EXECUTORS = {
    "in_process": ("dagster", "in_process_executor", "dagster"),
    "multiprocess": ("dagster", "multiprocess_executor", "dagster"),
    "dask": ("dagster_dask", "dask_executor", "dagster-dask"),
    "celery": ("dagster_celery", "celery_executor", "dagster-celery"),
    "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s"),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def integration_version() -> str:
    """The dagster-<integration> release that matches this Dagster (1.13.27 → 0.29.27)."""
    major, minor, patch = (int(p) for p in dg.__version__.split(".")[:3])
    return f"{major - 1}.{minor + 16}.{patch}" if major == 1 else dg.__version__


def executor_definition(name: str) -> dg.ExecutorDefinition:
    """The (unconfigured) executor `name`; ConfigError naming the package when it is missing."""
    module, attribute, package = EXECUTORS[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise ConfigError(
            f"pipeline.executor: {name} needs the {package} package, which is not installed: "
            f"pip install '{package}=={integration_version()}' (the release matching dagster "
            f"{dg.__version__})") from exc


# What each step process preloads under multiprocess's default start method here (forkserver):
# the project's definitions and its heavy libraries are imported once, in the fork server,
# instead of once per step (a third of the tiny test run's wall time under `spawn`). Each step
# is still a fresh process forked from that server, sharing no memory with the run's process
# or with other steps.
FORKSERVER_PRELOAD = ["orchestration.executors", "orchestration.assets", "orchestration.checks",
                      "torch", "great_expectations"]


def executor_config(pipeline) -> dict:
    """`pipeline.executor_config` with bonmf's defaults filled in: dask without `cluster` → a
    local cluster (`cluster: {local: {}}`: one worker process per core); multiprocess without
    `start_method` → forkserver preloading FORKSERVER_PRELOAD. Anything set explicitly wins."""
    config = dict(pipeline.executor_config or {})
    if pipeline.executor == "dask" and "cluster" not in config:
        config["cluster"] = {"local": {}}
    if pipeline.executor == "multiprocess" and "start_method" not in config:
        config["start_method"] = {"forkserver": {"preload_modules": list(FORKSERVER_PRELOAD)}}
    return config


def build_executor(pipeline) -> dg.ExecutorDefinition:
    """The configured executor of a PipelineConfig, its config checked against the executor's
    own schema now (ConfigError naming the key), not when the first step starts."""
    definition = executor_definition(pipeline.executor)
    config = executor_config(pipeline)
    configured = definition.configured(config, name=definition.name) if config else definition
    _validate(configured, pipeline.executor)
    return configured


def _validate(executor: dg.ExecutorDefinition, name: str) -> None:
    @dg.op
    def noop() -> None:
        return None

    @dg.job(name="validate_executor", executor_def=executor)
    def probe():
        noop()

    try:
        dg.validate_run_config(probe, {})
    except dg.DagsterInvalidConfigError as exc:
        problems = " ".join(_keyed(e.message) for e in exc.errors)
        raise ConfigError(f"pipeline.executor_config ({name}): {problems}") from None


def _keyed(message: str) -> str:
    """Dagster's `at path root:config:cluster` → `at pipeline.executor_config.cluster`."""
    return re.sub(r"path root(?::execution)?:config((?::[\w-]+)*)",
                  lambda m: "pipeline.executor_config" + m.group(1).replace(":", "."), message)


@contextlib.contextmanager
def params_env(params_path: str):
    """$BONMF_PARAMS = the run's params file while inside, as it was afterwards. Wraps the
    import of orchestration.definitions, whose module-level (UI) `defs` builds its executor from
    $BONMF_PARAMS or ./params.yaml: a run reads its own file, never a ./params.yaml it was not
    started with (nor, in a step process, whatever the worker's folder holds)."""
    import os

    before = os.environ.get("BONMF_PARAMS")
    os.environ["BONMF_PARAMS"] = params_path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BONMF_PARAMS", None)
        else:
            os.environ["BONMF_PARAMS"] = before


def rebuild_retrain_job(params_path: str, state_root: str, store_url: str | None = None,
                        progress: bool = False) -> dg.JobDefinition:
    """The `retrain` job with the params file's executor: what every step process rebuilds."""
    import warnings

    dask_setup()
    # pydantic warns about resource schemas as each step process rebuilds them: harmless, and
    # the run's own process hides the same warning.
    with contextlib.suppress(ImportError):
        from pydantic.json_schema import PydanticJsonSchemaWarning

        warnings.filterwarnings("ignore", category=PydanticJsonSchemaWarning)

    from bonmf_core.config import load_config

    with params_env(params_path):
        from .definitions import build_definitions

    executor = build_executor(load_config(params_path).pipeline)
    return build_definitions(params_path=params_path, state_root=state_root,
                             store_url=store_url, progress=progress,
                             executor=executor).resolve_job_def("retrain")


class FinishedRun:
    """What the summary reads of a finished run, the same for every executor: success, run_id,
    all_events and output_for_node (outputs loaded while the run's I/O manager was open)."""

    def __init__(self, result, outputs: dict[str, object]):
        self.success, self.run_id = result.success, result.run_id
        self.all_events = list(result.all_events)
        self._outputs = outputs

    def output_for_node(self, node: str):
        return self._outputs[node]


def execute_retrain(cfg, job: dg.JobDefinition, *, params_path: str, state_root: str,
                    progress: bool, run_config: dict, instance: dg.DagsterInstance,
                    tags: dict):
    """Run the `retrain` job `job` with the configured executor → the run's result."""
    pipeline = cfg.pipeline
    build_executor(pipeline)            # a bad executor or config fails here, before the run
    if pipeline.executor == "in_process":
        if pipeline.executor_config:
            run_config = {**run_config, "execution": {"config": pipeline.executor_config}}
        return job.execute_in_process(run_config=run_config, instance=instance,
                                      raise_on_error=False, tags=tags)
    recon = dg.build_reconstructable_job(
        "orchestration.executors", "rebuild_retrain_job",
        reconstructable_kwargs={"params_path": params_path, "state_root": state_root,
                                "store_url": cfg.encoders.store_url, "progress": progress},
        reconstructor_working_directory=str(REPO_ROOT))
    clusters = (_closing_local_dask_clusters() if pipeline.executor == "dask"
                else contextlib.nullcontext())
    with clusters, dg.execute_job(recon, instance, run_config=run_config, tags=tags,
                                  raise_on_error=False) as result:
        outputs = _asset_values(result, job, instance) if result.success else {}
        return FinishedRun(result, outputs)


def dask_setup(worker=None) -> None:
    """dask's preload hook (`dask worker --preload orchestration.executors`; local clusters of
    a run get it automatically): dask cannot size Dagster's events and run records (it then
    uses a fixed estimate) and says so on each worker: harmless, so kept off the console."""
    import logging

    logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)


@contextlib.contextmanager
def _closing_local_dask_clusters():
    """Close the local dask clusters a run started (dagster-dask starts `cluster: local` in the
    run's process and leaves it open until the interpreter exits): no worker process outlives
    its run, and the nanny's shutdown notes come before the run's summary, not after it."""
    import logging

    import dask
    from distributed.deploy.spec import SpecCluster

    dask_setup()                                   # the scheduler, in this process
    preload = list(dask.config.get("distributed.worker.preload", default=None) or [])
    before = set(getattr(SpecCluster, "_instances", ()))
    try:
        with dask.config.set({"distributed.worker.preload": [*preload, __name__]}):
            yield
    finally:
        started = [c for c in getattr(SpecCluster, "_instances", ()) if c not in before]
        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)   # "still alive after 4 s, killing": an idle worker
        try:
            for cluster in started:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=30)
        finally:
            nanny.setLevel(level)


def _asset_values(result, job: dg.JobDefinition, instance: dg.DagsterInstance) -> dict:
    """Each materialized asset's value, read back through the job's I/O manager by asset key
    (where the steps stored it; `output_for_node` would look under the run's op outputs)."""
    keys = {e.step_key: e.asset_key for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION}
    # The I/O manager logs each load at DEBUG on a console logger of its own (stderr, resolved
    # per record): not the user's business after the run, so that stream is muted meanwhile.
    with dg.build_resources({"io_manager": job.resource_defs["io_manager"]},
                            instance=instance) as resources, \
            contextlib.redirect_stderr(io.StringIO()):
        return {step: resources.io_manager.load_input(
                    dg.build_input_context(asset_key=key, instance=instance))
                for step, key in keys.items()}
