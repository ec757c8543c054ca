"""benchmarks/cost_curves.py on tiny sizes, and benchmarks/gpu.py: its refusal without CUDA,
its whole flow with the CPU standing in (tiny sizes), and its training loop against `train`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path, check=True):
    env = {**os.environ, "BONMF_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cost_curves_json_shape(tmp_path):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    _run("cost_curves.py", "--data", "demo", "--set", "data.demo_users=150",
         "--set", "data.demo_items=80", "--fractions", "0.5,1.0",
         "--synthetic-multiplier", "2", "--catalog-sizes", "200,400", "--epochs", "1",
         "--eval-users", "200", "--eval-repeat", "1", "--threads", "1",
         "--plot", str(png), "--out", str(out), tmp_path=tmp_path)
    data = json.loads(out.read_text())
    rows = data["train_curve"]
    assert [r["label"] for r in rows] == ["fraction 0.5", "fraction 1", "synthetic x2"]
    sizes = [r["interactions"] for r in rows]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert rows[2]["users"] == 2 * rows[1]["users"] and rows[2]["items"] == rows[1]["items"]
    for r in rows:
        assert r["epoch_s"] > 0 and r["samples_per_s"] > 0 and r["epochs"] == 1
        assert r["peak_rss_mb"] > 0 and r["torch_threads"] == 1
    assert data["train_ratios"][0]["epoch_s"] == 1.0
    assert math.isfinite(data["train_fit"]["epoch_s"])
    assert math.isfinite(data["train_fit"]["peak_rss_mb"])
    ev = data["eval_curve"]
    assert [r["items"] for r in ev] == [200, 400]
    assert all(r["eval_s"] > 0 and r["score_s"] > 0 and r["users"] == 200 for r in ev)
    assert math.isfinite(data["eval_fit"]["eval_s"])
    assert data["torch_threads"] == 1 and data["cpu_model"]
    assert Path(data["plot"]).exists()


def test_gpu_benchmark_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the refusal path does not apply")
    proc = _run("gpu.py", "--out", str(tmp_path / "g.json"), tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert "CUDA" in message and "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "g.json").exists()


def test_gpu_benchmark_flow_on_cpu(tmp_path):
    """The CUDA script's every step, with the CPU standing in for the GPU at tiny sizes (at
    least content_dim = 128 items: a smaller catalog breaks BoNMF's PCA basis)."""
    out = tmp_path / "g.json"
    _run("gpu.py", "--cpu-smoke", "--cpu-threads", "1", "--image-model", "vit_tiny_patch16_224",
         "--batch", "4", "--batches", "1", "--warmup", "1", "--images", "8",
         "--cpu-images", "4", "--cpu-batch", "4", "--users", "150", "--items", "160",
         "--mean-interactions", "15", "--warmup-steps", "1", "--cpu-steps", "3",
         "--out", str(out), tmp_path=tmp_path)
    data = json.loads(out.read_text())
    syn = data["image"]["synthetic"]
    for key in ("reference_cpu_fp32", "fp16", "bf16"):
        assert syn[key]["images_per_s"] > 0 and syn[key]["feature_dim"] == 192
    pipe = data["image"]["pipeline"]
    assert pipe["device"]["encoded"] == 8 and pipe["reference_cpu"]["encoded"] == 4
    for variant in ("id", "text+image"):
        run = data["train"][variant]
        assert run["device"]["steps"] == run["device"]["epoch_steps"]   # a whole epoch
        assert run["reference_cpu"]["steps"] == 3
        assert run["device"]["steps_samples_per_s"] > 0 and run["speedup_vs_cpu"] > 0


def test_gpu_training_loop_is_train_epoch(small_demo):
    """gpu.py's device loop is `train`'s epoch: on the CPU, the same loss to the last digit."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu

    from bonmf_core.config import load_config
    from bonmf_core.data.splits import leave_one_out_split
    from bonmf_core.experiment.variants import build_bonmf
    from bonmf_core.training import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [], {"train": {"epochs": 1}, "model": {"user_attributes": False}},
                          use_default_file=False)
        split = leave_one_out_split(small_demo, seed=0, n_negatives=1)
        torch.manual_seed(0)
        result = train(build_bonmf(small_demo, ("id",), cfg.model, {}), split, cfg.train,
                       seed=0, validate=False)
        torch.manual_seed(0)
        loop = gpu.train_steps(build_bonmf(small_demo, ("id",), cfg.model, {}), split,
                               cfg.train, torch.device("cpu"), None)
    finally:
        torch.set_num_threads(threads)
    assert loop["loss"] == pytest.approx(result.history[0]["loss"], rel=1e-9)
    assert loop["samples"] == len(split.train) * (1 + cfg.train.negatives)
