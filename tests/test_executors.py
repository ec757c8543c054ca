"""`pipeline.executor` for real: the tiny `bonmf run` on the embedded demo, each step in another
process — Dagster's multiprocess executor, and dagster-dask on a local `dask.distributed`
cluster of 2 workers — ends like an in-process run (same assets, a promoted model version 1,
its metrics); values pass between steps only through the filesystem I/O manager. A bad
executor config, or an executor whose package is missing, is a clear error (exit 2) before
anything runs. No step, fork-server or dask process outlives its run.

Each run is a `bonmf run` subprocess in a session of its own, tagged with an environment
marker: afterwards no process carrying the marker may be left (any is killed, by pid, and
the test fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = {"dataset_snapshot", "validated_dataset", "text_embeddings", "image_embeddings",
          "splits", "bonmf_candidate", "baselines", "offline_evaluation", "promotion_decision",
          "bento_package", "versioned_artifacts"}
CHECKS = {"parsing", "interactions", "catalog", "referential", "drift"}
# The tiny run of tests/test_cli.py, one epoch: the embedded demo (3000 users × 1000 items),
# weight-free encoders, pop vs id — id beats pop by far (ndcg@10 ≈ 0.40 vs 0.22), so the gate
# promotes on any machine.
# One epoch: a learning rate that lets it beat popularity (the gate must promote).
TINY = ["--variants", "pop,id", "--encoders", "basic", "--epochs", "1", "--set", "train.lr=0.01"]
METRICS = ("hr@10", "ndcg@10")
MARKER = "BONMF_EXECUTOR_TEST_MARKER"


def _tagged(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return str(proc.pid)


def _restore_signals():
    # Background shells here ignore SIGINT/SIGTERM; the run (and so its workers) must not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_tagged(argv: list[str], *, env: dict, cwd: Path, timeout: int, grace: float = 20):
    """Run `argv` in a session of its own, every process it starts tagged with a marker in its
    environment → CompletedProcess, pid. Fails if a tagged process is alive `grace` seconds
    after it exits (those are killed, by pid)."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(argv, cwd=cwd, env={**env, MARKER: marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_restore_signals)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv)} ran over {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        survivors = [p for p in _tagged(marker) if _alive(p)]
        deadline = time.monotonic() + grace       # dask's nanny needs a few seconds to stop
        while survivors and time.monotonic() < deadline:
            time.sleep(0.5)
            survivors = [p for p in survivors if _alive(p)]
        left = [_describe(p) for p in survivors]
        for p in survivors:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left, "processes outlived the run:\n" + "\n".join(left)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), proc.pid


def bonmf(*args, state: Path, cwd: Path | None = None, timeout: int = 420):
    """`bonmf ARGS` (one torch thread, state in `state`) → (CompletedProcess, its pid)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BONMF_STATE_DIR": str(state),
           "BONMF_PARAMS": ""}
    return run_tagged([sys.executable, "-m", "orchestration.cli", *args], env=env,
                      cwd=cwd or REPO, timeout=timeout)


def test_the_leak_check_sees_a_process_left_behind():
    code = ("import subprocess; subprocess.Popen(['sleep', '60'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)")
    with pytest.raises(AssertionError, match=r"outlived the run:\s+[0-9]+ sleep 60"):
        run_tagged([sys.executable, "-c", code], env=dict(os.environ), cwd=REPO, timeout=60,
                   grace=1)


def _run_events(state: Path) -> tuple[dict, list]:
    """The one run in `state`'s Dagster instance: its record and its event-log entries."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(state / "dagster")) as instance:
        runs = instance.get_runs()
        assert len(runs) == 1, [r.run_id for r in runs]
        entries = [r.event_log_entry for r in
                   instance.get_records_for_run(runs[0].run_id, limit=100_000).records]
        return runs[0], entries


def _check_run(proc, pid: int, state: Path, executor: str) -> dict:
    """What every executor's run must show; → facts to compare across executors."""
    import dagster as dg

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "): succeeded" in proc.stdout
    for check in CHECKS:
        assert f"check ok   {check}" in proc.stdout
    assert "gate:       PROMOTE" in proc.stdout
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == {"decision": "promote", "candidate": "id", "model_version": 1}

    run, entries = _run_events(state)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags.get("bonmf/trigger") == "cli"
    events = [e for e in entries if e.dagster_event is not None]
    materialized = {e.dagster_event.asset_key.to_user_string() for e in events
                    if e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION}
    assert materialized == ASSETS
    # Every step ran outside the `bonmf run` process: nothing it computed was in that
    # process's memory, each value went to the filesystem I/O manager and came back from it.
    step_pids = {e.step_key: e.dagster_event.pid for e in events
                 if e.dagster_event.event_type == dg.DagsterEventType.STEP_START}
    assert set(step_pids) >= ASSETS | {"snapshot_checks"}
    assert pid not in step_pids.values(), step_pids
    storage = state / "dagster" / "storage"
    for asset in ASSETS:
        assert (storage / asset).is_file(), f"{asset} not stored under {storage}"
    loaded = {e.step_key for e in events
              if e.dagster_event.event_type == dg.DagsterEventType.LOADED_INPUT}
    assert {"validated_dataset", "splits", "bonmf_candidate", "offline_evaluation",
            "promotion_decision"} <= loaded

    # The registry and the production model: what an in-process run leaves.
    from bonmf_core.ops import registry
    from bonmf_core.store.database import Store

    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        production = registry.production_model(store)
        models = registry.list_models(store)
    finally:
        store.dispose()
    assert production["id"] == 1 and production["variant"] == "id"
    assert production["run_id"] == run.run_id and production["bento_tag"]
    assert [m["stage"] for m in models] == ["production"]
    assert 0 < production["metrics"]["mean"]["ndcg@10"] <= 1
    assert (state / "production" / "model" / "model.safetensors").exists()
    report = Path(next(line for line in proc.stdout.splitlines()
                       if line.startswith("report:")).split()[1])
    metrics = json.loads((report.parent / "metrics.json").read_text())
    for variant in ("pop", "id"):
        for metric in METRICS:
            assert 0 < metrics["results"][variant][metric]["mean"] <= 1
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    return {"executor": executor, "step_pids": step_pids, "table": table,
            "results": metrics["results"], "fit": Path(production["artifact_path"]).parent.name}


@pytest.fixture(scope="module")
def finished() -> dict:
    return {}


def _params_file(tmp_path: Path, executor: str, config: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"]["executor"] = executor
    params["pipeline"]["executor_config"] = config or {}
    path = tmp_path / f"{executor}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_multiprocess_runs_each_step_in_its_own_process(tmp_path, finished):
    # The run reads --params; a ./params.yaml it does not use (naming an executor whose
    # package is absent) must not matter — not even to the Dagster definitions' import.
    (tmp_path / "params.yaml").write_text("pipeline: {executor: celery}\n")
    params = _params_file(tmp_path, "multiprocess")
    started = time.perf_counter()
    proc, pid = bonmf("run", "--params", str(params), *TINY, "-q", state=tmp_path / "state",
                      cwd=tmp_path)
    facts = _check_run(proc, pid, tmp_path / "state", "multiprocess")
    # one fresh process per step (forked from the fork server): no two steps share one
    pids = list(facts["step_pids"].values())
    assert len(set(pids)) == len(pids), facts["step_pids"]
    finished["multiprocess"] = facts | {"seconds": round(time.perf_counter() - started, 1)}


def test_dask_local_cluster_of_two_workers(tmp_path, finished):
    started = time.perf_counter()
    proc, pid = bonmf("run", *TINY, "-q", "--set", "pipeline.executor=dask",
                      "--set", "pipeline.executor_config={cluster: {local: {n_workers: 2}}}",
                      state=tmp_path / "state")
    facts = _check_run(proc, pid, tmp_path / "state", "dask")
    # the steps ran on the cluster's 2 worker processes (each runs many steps)
    assert 1 <= len(set(facts["step_pids"].values())) <= 2, facts["step_pids"]
    assert "distributed.sizeof" not in proc.stderr
    finished["dask"] = facts | {"seconds": round(time.perf_counter() - started, 1)}


def test_executors_agree_on_the_result(finished):
    if set(finished) != {"multiprocess", "dask"}:
        pytest.skip("needs both runs above")
    mp, dask = finished["multiprocess"], finished["dask"]
    # Same data, seed and code: the same fits, whatever ran them (one torch thread each).
    assert mp["fit"] == dask["fit"]                      # the same fit spec (its cache key)
    def quality(facts):
        return {v: {m: facts["results"][v][m]["mean"] for m in METRICS} for v in ("pop", "id")}

    assert quality(mp) == quality(dask)
    assert quality(mp)["id"]["ndcg@10"] > quality(mp)["pop"]["ndcg@10"]
    print(f"\nmeasured: multiprocess {mp['seconds']} s, dask {dask['seconds']} s")


def test_bad_executor_config_key_is_named_before_anything_runs(tmp_path):
    state = tmp_path / "state"
    proc, _ = bonmf("run", *TINY, "--set", "pipeline.executor=dask",
                    "--set", "pipeline.executor_config={cluster: {lokal: {n_workers: 2}}}",
                    state=state, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pipeline.executor_config (dask)" in proc.stderr
    assert '"lokal" at pipeline.executor_config.cluster' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not state.exists()
    proc, _ = bonmf("run", *TINY, "--set", "pipeline.executor=multiprocess",
                    "--set", "pipeline.executor_config={max_concurrent: two}",
                    state=state, timeout=120)
    assert proc.returncode == 2 and "pipeline.executor_config.max_concurrent" in proc.stderr
    assert "Traceback" not in proc.stderr and not state.exists()


def test_executor_without_its_package_names_the_pip_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("dagster_celery") is not None:
        pytest.skip("dagster-celery is installed here")
    import dagster as dg

    from orchestration.executors import integration_version

    state = tmp_path / "state"
    proc, _ = bonmf("run", *TINY, "--set", "pipeline.executor=celery", state=state, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"pip install 'dagster-celery=={integration_version()}'" in proc.stderr
    assert "pipeline.executor: celery" in proc.stderr and dg.__version__ in proc.stderr
    assert "Traceback" not in proc.stderr and not state.exists()


def test_executor_config_defaults_and_schema():
    import dagster as dg

    from bonmf_core.config import load_config
    from bonmf_core.errors import ConfigError
    from orchestration.executors import (FORKSERVER_PRELOAD, build_executor, executor_config,
                                         integration_version)

    def pipeline(executor, config=None):
        flags = {"pipeline": {"executor": executor, "executor_config": config or {}}}
        return load_config(flags=flags, use_default_file=False).pipeline

    assert integration_version() == "0.29.27" if dg.__version__ == "1.13.27" else True
    assert executor_config(pipeline("dask")) == {"cluster": {"local": {}}}
    assert executor_config(pipeline("dask", {"cluster": {"existing": {"address": "h:8786"}}})) \
        == {"cluster": {"existing": {"address": "h:8786"}}}
    assert executor_config(pipeline("multiprocess", {"max_concurrent": 2})) == {
        "max_concurrent": 2,
        "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}}
    spawn = {"start_method": {"spawn": {}}}
    assert executor_config(pipeline("multiprocess", spawn)) == spawn
    assert executor_config(pipeline("in_process")) == {}
    for name in ("in_process", "multiprocess", "dask"):
        assert build_executor(pipeline(name)).name == name
    assert build_executor(pipeline("in_process", {"retries": {"disabled": {}}})).name == \
        "in_process"
    with pytest.raises(ConfigError, match=r"\"address\" at pipeline\.executor_config\.cluster"
                                          r"\.existing"):
        build_executor(pipeline("dask", {"cluster": {"existing": {}}}))
    with pytest.raises(ConfigError, match="unexpected config entry \"foo\" at "
                                          "pipeline.executor_config"):
        build_executor(pipeline("in_process", {"foo": 1}))
    with pytest.raises(ConfigError, match="pipeline.executor"):
        load_config(flags={"pipeline": {"executor": "ray"}}, use_default_file=False)


def test_ui_definitions_carry_the_configured_executor(tmp_path):
    """`dagster dev -m orchestration.definitions` launches with the params file's executor."""
    params = _params_file(tmp_path, "dask", {"cluster": {"local": {"n_workers": 2}}})
    code = ("import orchestration.definitions as d; "
            "print(d.defs.resolve_job_def('retrain').executor_def.name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "BONMF_PARAMS": str(params)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["dask"]
