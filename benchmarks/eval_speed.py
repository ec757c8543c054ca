"""Evaluation speed: sampled (users × 100 candidates) and full ranking (users × items).

    python benchmarks/eval_speed.py --data DIR|demo --out FILE.json [--ncf-dir DIR]

Times the metric computation on a given score matrix and, separately, the end-to-end
evaluation including scoring by an (untrained) ID-only BoNMF of the default size.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bonmf_core.atomic import write_json
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.config import add_config_arguments, load_config
from bonmf_core.data.readers import load_dataset
from bonmf_core.data.splits import make_split
from bonmf_core.evaluation.metrics import full_ranking_metrics, sampled_metrics
from bonmf_core.experiment.variants import build_bonmf


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="default: data.source")
    p.add_argument("--ncf-dir", default=None)
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.set, {"data": {"source": args.data}} if args.data else {})
    dataset = load_dataset(cfg.data)
    ncf = make_split(dataset, cfg.protocol.model_copy(
        update={"name": "ncf", "ncf_dir": args.ncf_dir or cfg.protocol.ncf_dir}), 0)
    full = make_split(dataset, cfg.protocol.model_copy(update={"name": "full"}), 0)
    model = build_bonmf(dataset, ("id",), cfg.model, {}).eval()
    n_users, n_items = dataset.n_users, dataset.n_items

    rng = np.random.default_rng(0)
    sampled_scores = torch.from_numpy(rng.random((n_users, 100), dtype=np.float32))
    full_scores = torch.from_numpy(rng.random((n_users, n_items), dtype=np.float32))
    truth = torch.from_numpy(rng.random((n_users, n_items)) < 0.01)
    out = {
        "data": dataset.name, "users": n_users, "items": n_items,
        "sampled_metrics_s": best_of(lambda: sampled_metrics(sampled_scores)),
        "full_ranking_metrics_s": best_of(lambda: full_ranking_metrics(full_scores, truth)),
        "ncf_evaluate_s": best_of(lambda: evaluate(model, ncf)),
        "full_evaluate_s": best_of(lambda: evaluate(model, full), repeat=1),
        "full_scoring_only_s": best_of(lambda: model.score_users(torch.arange(n_users)), repeat=1),
    }
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
