"""The README's main job, run for real as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bonmf_core.artifacts import load_model


def _bonmf(*args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bonmf_core.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_main_job_on_the_demo_default(tmp_path):
    out = tmp_path / "run"
    proc = _bonmf("run", "--epochs", "2", "--variants", "pop,id", "--out", str(out), "-q",
                  env_extra={"BONMF_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stderr
    assert "| pop |" in proc.stdout and "| id |" in proc.stdout
    assert "protocol=ncf dataset=demo-seed0 seeds=0" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "ncf" and metrics["seeds"] == [0] and metrics["ks"] == [10]
    assert metrics["results"]["id"]["hr@10"]["mean"] > metrics["results"]["pop"]["hr@10"]["mean"]
    model, meta, id_maps = load_model(out / "model")
    assert meta["variant"] == "id" and meta["seed"] == 0
    assert len(id_maps["item_ids"]) == model.config.n_items == 1000
    # Demo pictures went to the configured state folder, not the working directory.
    assert (tmp_path / "state" / "demo").is_dir()


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
