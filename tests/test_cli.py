"""The README's main command, run for real as a subprocess: the whole Dagster graph in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bonmf_core.models.artifacts import load_model
from test_registry import write_movielens


def _bonmf(*args, env_extra=None, cwd=None):
    # One intra-op thread: the same results, without OpenMP stalls on a busy shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=900)


def test_main_command_runs_the_graph_on_the_demo_default(tmp_path):
    out, state = tmp_path / "run", tmp_path / "state"
    proc = _bonmf("run", "--epochs", "2", "--variants", "pop,id", "--encoders", "basic",
                  "--out", str(out), "-q", env_extra={"BONMF_STATE_DIR": str(state)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| pop |" in proc.stdout and "| id |" in proc.stdout
    assert "protocol=ncf dataset=demo-seed0 seeds=0" in proc.stdout
    for check in ("interactions", "catalog", "referential"):
        assert f"check ok   {check}" in proc.stdout
    assert "gate:       PROMOTE" in proc.stdout
    assert f"DAGSTER_HOME={state / 'dagster'}" in proc.stdout
    assert "dagster dev -m orchestration.definitions" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["decision"] == "promote" and summary["candidate"] == "id"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "ncf" and metrics["seeds"] == [0] and metrics["ks"] == [10]
    assert metrics["results"]["id"]["hr@10"]["mean"] > metrics["results"]["pop"]["hr@10"]["mean"]
    model, meta, id_maps = load_model(out / "model")
    assert meta["variant"] == "id" and meta["seed"] == 0
    assert len(id_maps["item_ids"]) == model.config.n_items == 1000
    # Production model, store, Dagster home (telemetry off) and demo pictures: all in the state dir.
    assert (state / "production" / "model" / "model.safetensors").exists()
    assert (state / "bonmf.db").exists() and (state / "demo").is_dir()
    assert "enabled: false" in (state / "dagster" / "dagster.yaml").read_text()


def test_bad_snapshot_fails_its_checks_with_status_1(tmp_path):
    bad = write_movielens(tmp_path / "ml", ratings=[(1, 1, 7, 978300000), (1, 42, 3, 978300001)])
    proc = _bonmf("run", "--data", str(bad), "--encoders", "basic", "-q",
                  env_extra={"BONMF_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "check FAIL interactions" in proc.stdout and "check FAIL referential" in proc.stdout
    assert "registry and the production model are unchanged" in proc.stdout
    assert not (tmp_path / "state" / "production").exists()


def test_bad_data_path_is_a_clear_error(tmp_path):
    proc = _bonmf("run", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "not a dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_param_key_is_named(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  learnig_rate: 0.1\n")
    proc = _bonmf("run", "--params", str(params), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "learnig_rate" in proc.stderr
    assert Path(tmp_path / "o").exists() is False
