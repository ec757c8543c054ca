"""The README's main command, run for real as a subprocess: the whole Dagster graph in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

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
    # The run names its HTML report (self-contained, the gate's decision in it); --out has it.
    page = Path(next(line for line in proc.stdout.splitlines()
                     if line.startswith("report:")).split()[1])
    assert page.name == "report.html" and page.parent.parent == state / "reports"
    assert "Promotion gate: PROMOTE" in page.read_text()
    assert (out / "report.html").read_bytes() == page.read_bytes()
    assert json.loads((out / "report.json").read_text())["gate"]["decision"] == "promote"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "ncf" and metrics["seeds"] == [0] and metrics["ks"] == [10]
    assert metrics["results"]["id"]["hr@10"]["mean"] > metrics["results"]["pop"]["hr@10"]["mean"]
    model, meta, id_maps = load_model(out / "model")
    assert meta["variant"] == "id" and meta["seed"] == 0
    assert len(id_maps["item_ids"]) == model.config.n_items == 1000
    # Production model, store, Dagster home (telemetry off) and demo pictures: all in the state dir.
    assert (state / "production" / "model" / "model.safetensors").exists()
    assert (state / "bonmf.db").exists() and (state / "demo").is_dir()
    assert f"store:      sqlite:///{state / 'bonmf.db'}" in proc.stdout
    assert "enabled: false" in (state / "dagster" / "dagster.yaml").read_text()


def test_bonmf_run_under_torchrun_is_refused_before_anything_runs(tmp_path):
    # Two ranks of `bonmf run` would be two pipelines promoting into one registry.
    state = tmp_path / "state"
    proc = _bonmf("run", env_extra={"BONMF_STATE_DIR": str(state), "WORLD_SIZE": "2",
                                    "RANK": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "WORLD_SIZE=2" in proc.stderr and "bonmf stage train" in proc.stderr
    assert not state.exists()


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
    assert "nope" in proc.stderr and "data folder not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_param_key_is_named(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  learnig_rate: 0.1\n")
    proc = _bonmf("run", "--params", str(params), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "learnig_rate" in proc.stderr
    assert Path(tmp_path / "o").exists() is False


def _registry_row(state: Path) -> dict:
    from bonmf_core.ops import registry
    from bonmf_core.store.database import Store

    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        return registry.production_model(store)
    finally:
        store.dispose()


def test_editing_params_yaml_changes_what_bonmf_run_does(tmp_path):
    """One section at a time is what a user edits; each edit must show in what the run did.
    `bonmf run` in a folder with a params.yaml and no --params reads that file."""
    state = tmp_path / "state"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"demo_users": 200, "demo_items": 150},
        "protocol": {"name": "full", "ks": [5], "seeds": [1]},
        "model": {"gmf_dim": 8, "mlp_layers": [16, 8], "content_hidden": 16},
        "train": {"epochs": 1, "metric": "recall@5", "refit": False},
        "bpr": {"epochs": 1, "dim": 8, "refit": False},
        "encoders": {"source": "basic"},
        "pipeline": {"candidates": ["id"], "baselines": ["pop", "bpr"]},
        "promotion": {"primary_metric": "recall@5", "floors": {}, "min_improvement": 0.0,
                      "beat_baselines": False},
        "serving": {"bento_name": "edited-bento"},
        "dvc": {"push_after_promotion": False},
    }))
    proc = _bonmf("run", cwd=tmp_path, env_extra={"BONMF_STATE_DIR": str(state),
                                                  "BONMF_PARAMS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines of output"
    assert "Traceback" not in proc.stdout + proc.stderr
    report = json.loads(next((state / "reports").glob("*/metrics.json")).read_text())
    # pipeline: only the configured candidate and baselines were trained
    assert set(report["results"]) == {"id", "pop", "bpr"}
    # protocol: the full protocol at k=5 on seed 1
    assert (report["protocol"], report["ks"], report["seeds"]) == ("full", [5], [1])
    assert "recall@5" in report["results"]["id"]
    # data: a 200 x 150 demo
    assert report["dataset_details"]["users"] == 200 and report["dataset_details"]["items"] == 150
    row = _registry_row(state)
    # train: one epoch recorded in the registry; model: the configured width
    assert row["metrics"]["per_seed"]["1"]["epochs_run"] == 1
    assert row["config"]["model"]["gmf_dim"] == 8 and row["config"]["train"]["epochs"] == 1
    model, _, _ = load_model(state / "production" / "model")
    assert model.config.gmf_dim == 8 and model.config.mlp_layers == (16, 8)
    # bpr: its own schedule
    assert report["results"]["bpr"]["epochs_run"]["mean"] == 1
    # encoders: the weight-free featurizers (no transformer ran)
    assert report["params"]["encoders"]["source"] == "basic"
    # promotion: the gate compares on the configured metric
    assert "recall@5" in proc.stdout.split("gate:", 1)[1].splitlines()[0]
    # serving: the Bento carries the configured name
    assert "bento:      edited-bento:" in proc.stdout
    # dvc: versioning switched off, and the run says so
    assert "dvc.push_after_promotion is off" in proc.stdout

    # checks: a threshold no user meets blocks the run before training (exit 1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"demo_users": 200, "demo_items": 150}, "encoders": {"source": "basic"},
        "checks": {"min_interactions_per_user": 10_000}}))
    blocked = _bonmf("run", cwd=tmp_path, env_extra={"BONMF_STATE_DIR": str(state),
                                                     "BONMF_PARAMS": ""})
    assert blocked.returncode == 1 and "check FAIL interactions" in blocked.stdout


def test_retrain_section_drives_the_schedule_and_sensor(tmp_path):
    """retrain: the cron and the sensor interval come from the same params file."""
    params = tmp_path / "p.yaml"
    params.write_text("retrain: {cron: '15 4 * * *', timezone: Europe/Paris, "
                      "sensor_interval_s: 45}\n")
    code = ("import orchestration.definitions as d; "
            "s = d.defs.resolve_schedule_def('periodic_retrain'); "
            "n = d.defs.resolve_sensor_def('new_data_sensor'); "
            "print(s.cron_schedule, s.execution_timezone, n.minimum_interval_seconds)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "BONMF_PARAMS": str(params)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["15", "4", "*", "*", "*", "Europe/Paris", "45"]


def test_set_and_flags_override_the_file_and_errors_name_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {epochs: 9}\n")
    shown = _bonmf("params", "--set", "train.epochs=4", cwd=tmp_path,
                   env_extra={"BONMF_PARAMS": ""})
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["train"]["epochs"] == 4
    assert "resolved from: params.yaml + --set train.epochs=4" in shown.stdout
    bad = _bonmf("run", "--set", "train.metric=ndcg", cwd=tmp_path,
                 env_extra={"BONMF_PARAMS": "", "BONMF_STATE_DIR": str(tmp_path / "s")})
    assert bad.returncode == 2 and "--set: train.metric" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "s").exists()
