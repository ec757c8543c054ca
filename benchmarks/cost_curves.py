"""Cost curves: training time and peak memory against the number of interactions, and
full-ranking evaluation time against the catalog size, each with a fitted power-law exponent.

    python benchmarks/cost_curves.py --data DIR|demo --fractions 0.1,0.3,1.0 \
        --synthetic-multiplier 10 --catalog-sizes 1000,4000,16000,64000 --epochs 1 \
        [--threads N] [--plot FILE.png] --out FILE.json

Training curve. The dataset's interactions are subsampled to each of `--fractions` (seeded,
row-level: that share of the interaction rows, drawn without replacement, order kept; the user
and item tables stay whole, so the model's tables are the same size at every fraction and only
the interactions change). `--synthetic-multiplier M` (0 = skip) adds a dataset with M× the full
interactions, made by replicating the users with new ids: each copy's users are new users with
the same histories, over the same catalog. That keeps the real catalog, its popularity curve
and every per-user count (a `demo_dataset` of ML-1M × 10 would need a dense 60k × 3.7k
affinity matrix and has its own, different, item distribution). Note that ML-1M × 10 crosses
`NegativeSampler.DENSE_LIMIT` (users × items > 2e8): its sampler switches from the dense
bitmap to binary search, as any real dataset of that size would; each row says which.

Each size trains the ID-only BoNMF (the configured `model` section, user attributes off) with
`train(..., validate=False)` for `--epochs` on a leave-one-out split (1 sampled negative per
held-out item: no evaluation runs, so the split is as light as it gets), in a fresh
subprocess of this script (the hidden `--one-size` mode, printing one JSON line), so the peak
RSS (`ru_maxrss`) is that size's own and not the maximum of the whole run. A subprocess also
reports its RSS after the imports (torch, and `torch._dynamo`, which Adam's constructor
imports: ~2 s and ~170 MB of every process, outside the epoch time) and just before training
(the peak above the imports is what the data, the split and training added; its exponent is
the one to read, the import baseline flattens the plain peak's) and the parameter bytes;
torch's CPU allocator keeps no statistics, so there is no allocated-tensor figure on CPU. Small datasets train in smaller
batches (`training.MIN_STEPS` steps an epoch at least): each row gives its batch and steps.

Evaluation curve. For each of `--catalog-sizes`, a randomly initialised ID-only BoNMF over
`--eval-users` users and that many items, on a synthetic `full` split (each user
`--eval-history` training items, masked, and `--eval-test` held-out items, uniformly drawn), is
evaluated by `evaluate_full` (all items ranked): best of `--eval-repeat` runs; also the scoring
alone (`score_users`).

The same-run reference of every figure is the smallest size: the printed and saved ratios are
against it, and the exponent b of seconds ∝ size^b (least squares on log-log) summarises the
curve (b ≈ 1: linear). JSON: the rows, the ratios, the exponents, the torch thread count and
the CPU model. `--plot FILE.png` draws the three curves on log-log axes (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonmf_core.atomic import write_json  # noqa: E402
from bonmf_core.config import add_config_arguments, load_config  # noqa: E402

SEED = 0


def _rss_mb() -> float:
    """The current resident set size (MB), from /proc/self/statm."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB on Linux


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def power_law_exponent(sizes, values) -> float | None:
    """b of values ∝ sizes^b, least squares on log-log; None with fewer than two sizes."""
    x, y = np.asarray(sizes, float), np.asarray(values, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if len(np.unique(x[ok])) < 2:
        return None
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def _parse_floats(spec: str) -> list[float]:
    return [float(s) for s in spec.split(",") if s.strip()]


# -- the training sizes ------------------------------------------------------------------------

def _size_arrays(dataset, fractions, multiplier):
    """Yield (label, fraction, multiplier, arrays dict, n_users, n_items) per training size."""
    inter = dataset.interactions
    base = {"user": inter["user"].to_numpy(np.int64), "item": inter["item"].to_numpy(np.int64)}
    if dataset.has_timestamps:
        base["timestamp"] = inter["timestamp"].to_numpy(np.int64)
    n = len(inter)
    for f in fractions:
        if f >= 1.0:
            yield f"fraction {f:g}", f, 1, base, dataset.n_users, dataset.n_items
            continue
        rng = np.random.default_rng(SEED)
        keep = np.sort(rng.choice(n, size=max(1, int(round(f * n))), replace=False))
        yield (f"fraction {f:g}", f, 1, {k: v[keep] for k, v in base.items()},
               dataset.n_users, dataset.n_items)
    if multiplier:
        # Copy k's users are users k·n_users … (k+1)·n_users - 1, with the same histories.
        arrays = {"user": np.concatenate([base["user"] + k * dataset.n_users
                                          for k in range(multiplier)]),
                  **{c: np.tile(base[c], multiplier) for c in base if c != "user"}}
        yield (f"synthetic x{multiplier}", None, multiplier, arrays,
               dataset.n_users * multiplier, dataset.n_items)


def one_size(args) -> int:
    """The `--one-size DIR` mode: train on the arrays in DIR, print one JSON line."""
    import pandas as pd
    import torch
    import torch._dynamo  # noqa: F401  (Adam imports it: ~2 s and ~170 MB, once per process)

    from bonmf_core.data.dataset import Dataset
    from bonmf_core.data.splits import leave_one_out_split
    from bonmf_core.experiment.variants import build_bonmf
    from bonmf_core.training import MIN_BATCH, MIN_STEPS, NegativeSampler, train

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_import = _rss_mb()
    folder = Path(args.one_size)
    meta = json.loads((folder / "meta.json").read_text())
    cfg = load_config(args.params, args.set,
                      {"train": {"epochs": args.epochs}, "model": {"user_attributes": False}})
    t0 = time.perf_counter()
    with np.load(folder / "arrays.npz") as arrays:
        interactions = pd.DataFrame({k: arrays[k] for k in arrays.files})
    n_users, n_items = meta["n_users"], meta["n_items"]
    dataset = Dataset(name=meta["name"], interactions=interactions,
                      items=pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)]}),
                      users=pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)]}))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    split = leave_one_out_split(dataset, seed=SEED, n_negatives=1)
    split_s = time.perf_counter() - t0
    del dataset, interactions
    model = build_bonmf_like(build_bonmf, split, cfg)
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    result = train(model, split, cfg.train, seed=SEED, validate=False)
    train_wall = time.perf_counter() - t0
    width = 1 + cfg.train.negatives
    n_train = len(split.train)
    groups = max(1, min(cfg.train.batch_size, max(MIN_BATCH, n_train * width // MIN_STEPS))
                 // width)
    row = {"users": n_users, "items": n_items, "interactions": int(meta["interactions"]),
           "train_pairs": n_train, "epochs": result.epochs_run,
           "epoch_s": result.seconds / result.epochs_run,
           "samples_per_s": result.samples_per_s, "train_wall_s": train_wall,
           "load_s": load_s, "split_s": split_s,
           "batch_samples": groups * width, "steps_per_epoch": math.ceil(n_train / groups),
           "sampler": ("dense bitmap" if n_users * n_items <= NegativeSampler.DENSE_LIMIT
                       else "sorted keys"),
           "peak_rss_mb": _peak_rss_mb(), "rss_after_import_mb": rss_import,
           "rss_before_train_mb": rss_before, "params_mb": params_mb,
           "torch_threads": torch.get_num_threads()}
    print(json.dumps(row))
    return 0


def build_bonmf_like(build_bonmf, split, cfg):
    """The ID-only BoNMF over the split's users and items (a Dataset of the split's shape)."""
    import pandas as pd

    from bonmf_core.data.dataset import Dataset

    stub = Dataset(name="cost-curves", interactions=split.train,
                   items=pd.DataFrame({"item_id": [f"i{i}" for i in range(split.n_items)]}),
                   users=pd.DataFrame({"user_id": [f"u{u}" for u in range(split.n_users)]}))
    return build_bonmf(stub, ("id",), cfg.model, {})


def training_curve(args, cfg) -> tuple[str, list[dict]]:
    """→ (the dataset's name, one row per size, by interactions)."""
    from bonmf_core.data.readers import load_dataset

    dataset = load_dataset(cfg.data)
    rows = []
    passthrough = [a for s in args.set for a in ("--set", s)]
    passthrough += ["--params", args.params] if args.params else []
    passthrough += ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="bonmf-cost-curves-") as tmp:
        for label, fraction, multiplier, arrays, n_users, n_items in _size_arrays(
                dataset, args.fractions, args.synthetic_multiplier):
            folder = Path(tmp) / "size"
            folder.mkdir(exist_ok=True)
            np.savez(folder / "arrays.npz", **arrays)
            (folder / "meta.json").write_text(json.dumps(
                {"name": f"{dataset.name} {label}", "n_users": n_users, "n_items": n_items,
                 "interactions": len(arrays["user"])}))
            del arrays
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--one-size", str(folder),
                 "--epochs", str(args.epochs), *passthrough],
                capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"cost_curves: the {label} run failed (exit {proc.returncode})")
            lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
            row = {"label": label, "fraction": fraction, "multiplier": multiplier,
                   **json.loads(lines[-1]), "subprocess_s": time.perf_counter() - started}
            rows.append(row)
            print(f"  {label:>16}: {row['interactions']:>10,} interactions  "
                  f"{row['epoch_s']:8.2f} s/epoch  {row['samples_per_s'] / 1e6:6.3f} M samples/s"
                  f"  peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
    rows.sort(key=lambda r: r["interactions"])
    return dataset.name, rows


# -- the evaluation sizes ----------------------------------------------------------------------

def synthetic_full_split(n_users: int, n_items: int, history: int, test: int, seed: int = SEED):
    """A `full` split: each user `history` training items and `test` held-out ones, uniform."""
    import pandas as pd

    from bonmf_core.data.splits import Split

    rng = np.random.default_rng(seed)
    per_user = min(history + test, n_items)
    n_test = min(test, max(1, per_user // 2))
    picks = np.stack([rng.choice(n_items, size=per_user, replace=False) for _ in range(n_users)])
    users = np.repeat(np.arange(n_users, dtype=np.int64), per_user).reshape(n_users, per_user)
    frame = lambda cols: pd.DataFrame({"user": users[:, cols].ravel(),  # noqa: E731
                                       "item": picks[:, cols].ravel().astype(np.int64)})
    empty = pd.DataFrame({"user": np.array([], np.int64), "item": np.array([], np.int64)})
    return Split("full", n_users, n_items, frame(slice(n_test, None)), empty,
                 frame(slice(0, n_test)), seed=seed, info={"source": "synthetic"})


def evaluation_curve(args, cfg) -> list[dict]:
    import torch

    from bonmf_core.evaluation.evaluator import evaluate_full
    from bonmf_core.experiment.variants import build_bonmf

    rows = []
    for n_items in sorted(args.catalog_sizes):
        split = synthetic_full_split(args.eval_users, n_items, args.eval_history, args.eval_test)
        torch.manual_seed(SEED)
        model = build_bonmf_like(build_bonmf, split, cfg).eval()
        users = torch.arange(args.eval_users)
        times, score_times = [], []
        for _ in range(args.eval_repeat):
            t0 = time.perf_counter()
            metrics = evaluate_full(model, split, "test")
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for s in range(0, len(users), 1024):   # evaluate_full's chunks
                model.score_users(users[s:s + 1024])
            score_times.append(time.perf_counter() - t0)
        row = {"items": n_items, "users": args.eval_users, "eval_s": min(times),
               "score_s": min(score_times), "ms_per_user": 1000 * min(times) / args.eval_users,
               "ranked_users": metrics["users"]}
        rows.append(row)
        print(f"  {n_items:>8,} items: evaluate_full {row['eval_s']:7.3f} s "
              f"(scoring {row['score_s']:7.3f} s) for {args.eval_users} users", flush=True)
        del model, split
    return rows


# -- output ------------------------------------------------------------------------------------

def _markdown(out: dict) -> str:
    lines = ["| size | interactions | s/epoch | × smallest | M samples/s | peak RSS MB "
             "| × smallest |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r, q in zip(out["train_curve"], out["train_ratios"]):
        lines.append(f"| {r['label']} | {r['interactions']:,} | {r['epoch_s']:.3f} | "
                     f"{q['epoch_s']:.2f} | {r['samples_per_s'] / 1e6:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {q['peak_rss_mb']:.2f} |")
    fit = out["train_fit"]
    lines += ["", f"Exponents (∝ interactions^b): s/epoch b = {_fmt(fit['epoch_s'])}, "
                  f"peak RSS b = {_fmt(fit['peak_rss_mb'])}, peak RSS above the imports "
                  f"b = {_fmt(fit['peak_above_import_mb'])}.", "",
              "| catalog items | evaluate_full s | × smallest | scoring s | ms/user |",
              "|---:|---:|---:|---:|---:|"]
    for r, q in zip(out["eval_curve"], out["eval_ratios"]):
        lines.append(f"| {r['items']:,} | {r['eval_s']:.3f} | {q['eval_s']:.2f} | "
                     f"{r['score_s']:.3f} | {r['ms_per_user']:.3f} |")
    lines += ["", f"Exponent (∝ items^b): evaluate_full b = {_fmt(out['eval_fit']['eval_s'])}, "
                  f"scoring b = {_fmt(out['eval_fit']['score_s'])}."]
    return "\n".join(lines) + "\n"


def _fmt(b) -> str:
    return "n/a" if b is None else f"{b:.2f}"


def plot(out: dict, path: str) -> str:
    """A log-log figure of the three curves → the path written (matplotlib is a dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, ev = out["train_curve"], out["eval_curve"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [(axes[0], [r["interactions"] for r in train], [r["epoch_s"] for r in train],
               "interactions", "seconds per epoch", out["train_fit"]["epoch_s"]),
              (axes[1], [r["interactions"] for r in train], [r["peak_rss_mb"] for r in train],
               "interactions", "peak RSS (MB)", out["train_fit"]["peak_rss_mb"]),
              (axes[2], [r["items"] for r in ev], [r["eval_s"] for r in ev],
               "catalog items", f"evaluate_full seconds ({out['eval_users']} users)",
               out["eval_fit"]["eval_s"])]
    axes[1].loglog([r["interactions"] for r in train],
                   [r["peak_rss_mb"] - r["rss_after_import_mb"] for r in train], "s-",
                   label="peak RSS above the imports")
    for ax, x, y, xlabel, ylabel, b in panels:
        ax.loglog(x, y, "o-", label=ylabel.split(" (")[0])
        if b is not None:   # the least-squares line the exponent comes from
            slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
            xs = np.array([min(x), max(x)], float)
            ax.loglog(xs, np.exp(intercept) * xs ** slope, "--", color="grey",
                      label=f"fit ∝ size^{b:.2f}")
        ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"BoNMF cost curves — {out['data']}, {out['cpu_model']}, "
                 f"{out['torch_threads']} torch threads", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="default: data.source")
    p.add_argument("--fractions", type=_parse_floats, default=[0.1, 0.3, 1.0],
                   help="shares of the interaction rows (comma-separated)")
    p.add_argument("--synthetic-multiplier", type=int, default=10,
                   help="also M× the interactions by replicated users (0 = skip)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--catalog-sizes", type=lambda s: [int(v) for v in _parse_floats(s)],
                   default=[1000, 4000, 16000, 64000])
    p.add_argument("--eval-users", type=int, default=1000)
    p.add_argument("--eval-history", type=int, default=20,
                   help="training (masked) items per evaluated user")
    p.add_argument("--eval-test", type=int, default=5, help="held-out items per user")
    p.add_argument("--eval-repeat", type=int, default=2, help="evaluation: best of N runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own); every subprocess uses it too")
    p.add_argument("--plot", default=None, help="FILE.png: log-log curves")
    p.add_argument("--one-size", default=None, help=argparse.SUPPRESS)
    add_config_arguments(p)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.one_size:
        return one_size(args)
    if not args.out:
        p.error("--out FILE.json is required")
    if not args.fractions or any(not 0 < f <= 1 for f in args.fractions):
        p.error("--fractions must lie in (0, 1]")
    if args.synthetic_multiplier < 0 or not args.catalog_sizes:
        p.error("--synthetic-multiplier must be >= 0 and --catalog-sizes non-empty")
    args.fractions = sorted(set(args.fractions))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.params, args.set,
                      {"train": {"epochs": args.epochs}, "model": {"user_attributes": False},
                       **({"data": {"source": args.data}} if args.data else {})})
    started = time.perf_counter()
    print("training curve (ID-only BoNMF, one subprocess per size):", flush=True)
    name, train_rows = training_curve(args, cfg)
    print("evaluation curve (random-init ID-only BoNMF, full ranking):", flush=True)
    eval_rows = evaluation_curve(args, cfg)

    first, efirst = train_rows[0], eval_rows[0]
    out = {
        "data": name, "source": str(cfg.data.source),
        "cpu_model": cpu_model(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.train.batch_size, "negatives": cfg.train.negatives,
        "epochs": args.epochs, "eval_users": args.eval_users,
        "reference": "the smallest size of each curve (ratios are against it)",
        "train_curve": train_rows,
        "train_ratios": [{"label": r["label"],
                          "interactions": r["interactions"] / first["interactions"],
                          "epoch_s": r["epoch_s"] / first["epoch_s"],
                          "peak_rss_mb": r["peak_rss_mb"] / first["peak_rss_mb"]}
                         for r in train_rows],
        "train_fit": {
            "epoch_s": power_law_exponent([r["interactions"] for r in train_rows],
                                          [r["epoch_s"] for r in train_rows]),
            "peak_rss_mb": power_law_exponent([r["interactions"] for r in train_rows],
                                              [r["peak_rss_mb"] for r in train_rows]),
            "peak_above_import_mb": power_law_exponent(
                [r["interactions"] for r in train_rows],
                [r["peak_rss_mb"] - r["rss_after_import_mb"] for r in train_rows])},
        "eval_curve": eval_rows,
        "eval_ratios": [{"items": r["items"] / efirst["items"],
                         "eval_s": r["eval_s"] / efirst["eval_s"],
                         "score_s": r["score_s"] / efirst["score_s"]} for r in eval_rows],
        "eval_fit": {"eval_s": power_law_exponent([r["items"] for r in eval_rows],
                                                  [r["eval_s"] for r in eval_rows]),
                     "score_s": power_law_exponent([r["items"] for r in eval_rows],
                                                   [r["score_s"] for r in eval_rows])},
    }
    out["seconds"] = time.perf_counter() - started
    if args.plot:
        out["plot"] = plot(out, args.plot)
    print()
    print(_markdown(out))
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
