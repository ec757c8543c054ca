"""Distributed (DDP) training under a real `torchrun --nproc_per_node 2` (gloo, loopback),
compared with the same run in one process.

Run as a script (`torchrun ... tests/test_ddp.py worker OUT`) this file is also the worker of
the first test: it trains on the small demo and writes what each rank saw and holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.demo_users=600", "data.demo_items=250", "model.gmf_dim=16",
         "model.mlp_layers=[32,16,8]", "train.epochs=6", "train.lr=0.01", "bpr.epochs=6",
         "bpr.dim=16"]
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               BONMF_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    return env


def _run(args: list[str], state: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    """`python ARGS` in one process, or under torchrun with `ranks` processes on loopback; in
    the temporary folder above `state`, so that no ./params.yaml is read."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                     str(ranks), "--master-addr", "127.0.0.1", "--master-port",
                     str(_free_port())]
    done = subprocess.run(launcher + args, cwd=state.parent, env=_env(state), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _sets(extra=()) -> list[str]:
    return [a for s in [*SMALL, *extra] for a in ("--set", s)]


def _close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(a)


# -- the trainer itself: sharding, all-reduce, rank 0 writes ---------------------------------

def test_two_ranks_shard_the_batches_stay_in_sync_and_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(Path(__file__)), "worker", str(one)], tmp_path / "s1")
    _run([str(Path(__file__)), "worker", str(two)], tmp_path / "s2", ranks=2)
    single = json.loads((one / "rank0.json").read_text())
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))

    assert single["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2
    # each rank scored about half of every batch; together all of it (a last batch smaller
    # than the number of ranks may be dropped)
    assert abs(r0["rows"] - r1["rows"]) <= r0["steps"]
    assert single["rows"] - r0["epochs"] <= r0["rows"] + r1["rows"] <= single["rows"]
    assert r0["steps"] == r1["steps"] and r0["steps"] >= single["steps"] - r0["epochs"]
    # all-reduced gradients: both ranks hold the same weights after every step
    assert r0["weights"] == r1["weights"]
    # the same optimisation as one process, up to floating-point summation order
    for a, b in zip(single["losses"], r0["losses"], strict=True):
        assert _close(a, b, 1e-3)
    for a, b in zip(single["valid"], r0["valid"], strict=True):
        assert _close(a, b)
    # rank 0 validates and writes the checkpoint; rank 1 writes nothing
    assert (two / "ckpt-0" / "best.safetensors").is_file()
    assert not (two / "ckpt-1").exists()


def _worker(out: Path) -> None:
    import torch

    from bonmf_core import distributed
    from bonmf_core.config import load_config
    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.data.splits import leave_one_out_split
    from bonmf_core.experiment.variants import build_bonmf
    from bonmf_core.training import train

    torch.set_num_threads(1)
    rank = distributed.rank()
    cfg = load_config(None, [*SMALL, "train.epochs=4", "train.refit=false"],
                      use_default_file=False)
    dataset = demo_dataset(seed=0, n_users=600, n_items=250, image_dir=out / f"images-{rank}")
    split = leave_one_out_split(dataset, seed=0, n_negatives=50)
    torch.manual_seed(0)
    model = build_bonmf(dataset, ("id",), cfg.model, {})
    seen = {"rows": 0, "steps": 0}

    def count(module, args):
        if module.training:
            seen["rows"] += len(args[0])
            seen["steps"] += 1

    model.register_forward_pre_hook(count)
    result = train(model, split, cfg.train, seed=0, checkpoint_dir=out / f"ckpt-{rank}")
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.contiguous().numpy().tobytes())
    (out / f"rank{rank}.json").write_text(json.dumps({
        **seen, "weights": digest.hexdigest(), "world_size": result.world_size,
        "epochs": result.epochs_run, "losses": [h["loss"] for h in result.history],
        "valid": [h["valid"][cfg.train.metric] for h in result.history]}))


# -- the entry points under torchrun ----------------------------------------------------------

def test_quality_benchmark_two_ranks_within_one_percent_of_one_process(tmp_path):
    args = [str(ROOT / "benchmarks" / "quality.py"), "--data", "demo", "--protocol", "ncf", "--variants",
            "id,bpr,pop", *_sets()]
    one = _run([*args, "--out", str(tmp_path / "one.json")], tmp_path / "state")
    two = _run([*args, "--out", str(tmp_path / "two.json")], tmp_path / "state", ranks=2)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    for variant in ("id", "bpr", "pop"):
        for metric in ("hr@10", "ndcg@10"):
            assert _close(a["results"][variant][metric]["mean"],
                          b["results"][variant][metric]["mean"]), (variant, metric)
    assert a["results"]["id"]["hr@10"]["mean"] > a["results"]["pop"]["hr@10"]["mean"] + 0.2
    # only rank 0 reports
    assert one.stdout.count("seconds:") == two.stdout.count("seconds:") == 1


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A saved small demo dataset and its (weight-free) content features."""
    from bonmf_core.config import load_config
    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.ops.stages import run_encode

    root = tmp_path_factory.mktemp("stage")
    demo_dataset(seed=0, n_users=600, n_items=250, image_dir=root / "images").save(
        root / "dataset")
    cfg = load_config(None, ["encoders.source=basic"], use_default_file=False)
    run_encode(cfg, root / "dataset", root / "features")
    return root


def test_stage_train_under_torchrun_records_world_size_and_only_rank0_writes(encoded, tmp_path):
    # each rank gets its own state folder and output paths, as on two machines, so anything
    # rank 1 wrote would show
    _run([str(Path(__file__)), "stage", str(encoded), str(tmp_path), *_sets(
        ["encoders.source=basic", "pipeline.candidates=[id]", "pipeline.baselines=[pop,bpr]"])],
        tmp_path / "unused", ranks=2)
    fits = json.loads((tmp_path / "fits-0.json").read_text())
    assert fits["world_size"] == 2
    assert {f["spec"]["world_size"] for f in fits["fits"]} == {2}
    assert fits["candidate"]["variant"] == "id" and fits["candidate"]["metrics"]["hr@10"] > 0.5
    assert (tmp_path / "model-0").is_dir() and any((tmp_path / "model-0").iterdir())
    assert any((tmp_path / "state-0" / "training").iterdir())
    assert not any(p.name.endswith("-1") for p in tmp_path.iterdir())


def _stage(root: Path, out: Path, sets: list[str]) -> int:
    from orchestration.cli import main

    rank = os.environ.get("RANK", "0")
    os.environ["BONMF_STATE_DIR"] = str(out / f"state-{rank}")
    return main(["stage", "train", "--dataset", str(root / "dataset"), "--features",
                 str(root / "features"), "--model", str(out / f"model-{rank}"),
                 "--fits", str(out / f"fits-{rank}.json"), *sets])


# -- refusing a WORLD_SIZE without torchrun ---------------------------------------------------

def test_world_size_without_torchrun_is_refused_clearly(encoded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BONMF_STATE_DIR", str(tmp_path))   # restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert _stage(encoded, tmp_path, ["--set", "encoders.source=basic"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "torchrun --nproc_per_node 2" in err
    assert "Traceback" not in err
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]))
    else:
        raise SystemExit(_stage(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]))
