"""Fold-in for new users: quality on the `cold_users` protocol and latency, against the
reference it replaced (60 Adam steps on sampled negatives, L2 towards 0), in one run.

    python benchmarks/fold_in.py --data ../shared/datasets/ml-1m --given 1,3,5,10 \
        --cache .bonmf/fits --out results/fold_in.json

Trains (or, with `--cache`, reuses) the ID-only BoNMF of `cold_users` seed 0 through the one
runner, then on its test users, for each `given`: NDCG@10 of (a) `BoNMF.fold_in_many` (what the
service and the protocol use), (b) the reference fold-in, (c) no fold-in (the start vector
alone), and how many of (a)'s top 10 (b) shares. Latency: p50 / p95 of one profile of 10 liked
items with the catalog's item side precomputed (as the serving engine holds it), at one torch
thread (a server worker's setting), (a) against (b).

How `FOLD_IN_PRIOR` is chosen (on the validation users, never the test ones):

    python benchmarks/fold_in.py --data ../shared/datasets/ml-1m --given 1,3,10 --split valid \
        --priors 0.3,0.6,1,3,10 --cache .bonmf/fits --out results/fold_in_valid.json

adds (a) at each prior weight as `map_prior<w>` beside the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonmf_core.atomic import write_json  # noqa: E402
from bonmf_core.config import add_config_arguments, load_config  # noqa: E402
from bonmf_core.data.readers import load_dataset  # noqa: E402
from bonmf_core.data.splits import make_split  # noqa: E402
from bonmf_core.evaluation.evaluator import evaluate_cold_users  # noqa: E402
from bonmf_core.experiment.runner import fit_one  # noqa: E402


def reference_fold_in(model, profiles, items, starts, steps=60, negatives=4, lr=0.05,
                      reg=1e-3) -> torch.Tensor:
    """The fold-in before the MAP solve: Adam on BCE against the liked items and
    max(16, negatives × liked) fresh uniform negatives per step, from the start vector, L2 on
    the vector itself; the negatives' generator seeded by the profile."""
    out = []
    for liked, start in zip(profiles, starts):
        liked = torch.as_tensor(sorted(set(int(i) for i in liked)), dtype=torch.long)
        mask = torch.ones(len(items.vectors), dtype=torch.bool)
        mask[liked] = False
        pool = torch.nonzero(mask).squeeze(1)
        gen = torch.Generator().manual_seed(len(liked) * 7919 + int(liked.sum()))
        n_neg = max(16, negatives * len(liked))
        labels = torch.cat([torch.ones(len(liked)), torch.zeros(n_neg)])
        u = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(steps):
                rows = torch.cat([liked, pool[torch.randint(len(pool), (n_neg,), generator=gen)]])
                logits = model.score_sides(model.user_side(u[None]), items.select(rows))[0]
                loss = nn.functional.binary_cross_entropy_with_logits(logits, labels) + \
                    reg * u.pow(2).sum()
                u.grad, = torch.autograd.grad(loss, [u])
                opt.step()
        out.append(u.detach())
    return torch.stack(out)


class _Answer:
    """A `ProfileScorer` over one trained model and one way to fit the new users' vectors."""

    def __init__(self, model, fit):
        self.model, self.fit, self.top = model, fit, {}
        with torch.no_grad():
            self.items = model.item_side(model.item_vectors(torch.arange(model.config.n_items)))

    def score_users(self, users):
        raise TypeError("cold users have no trained row")

    def score_profiles(self, users, profiles):
        starts = self.model.cold_start_vectors(users, n=len(profiles))
        vectors = self.fit(self.model, profiles, self.items, starts)
        with torch.no_grad():
            scores = self.model.score_sides(self.model.user_side(vectors), self.items)
        shown = scores.clone()
        for row, p in enumerate(profiles):
            shown[row, torch.as_tensor(np.asarray(p), dtype=torch.long)] = -np.inf
        for u, top in zip(users.tolist(), torch.topk(shown, 10).indices):
            self.top[u] = set(top.tolist())
        return scores


FITS = {
    "map_newton": lambda m, profiles, items, starts: m.fold_in_many(profiles, items,
                                                                     starts=starts),
    "reference_adam60": reference_fold_in,
    "start_only": lambda m, profiles, items, starts: starts,
}


def latency(fn, n: int) -> dict:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "n": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="demo | a dataset directory (default: data.source)")
    p.add_argument("--given", default="3", help="comma-separated revealed counts")
    p.add_argument("--cache", default=None, help="fit cache folder (reuse the trained model)")
    p.add_argument("--n", type=int, default=100, help="latency repetitions")
    p.add_argument("--split", choices=("test", "valid"), default="test",
                   help="the held-out users to answer (valid: for choosing the prior)")
    p.add_argument("--priors", default="",
                   help="comma-separated prior weights to compare (default: the head's only)")
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    given = [int(g) for g in args.given.split(",")]
    flags = {"protocol": {"name": "cold_users", "given": given}}
    if args.data:
        flags["data"] = {"source": args.data}
    cfg = load_config(args.params, args.set, flags)
    dataset = load_dataset(cfg.data)
    split = make_split(dataset, cfg.protocol, seed=0)
    fit = fit_one("id", dataset, split, cfg, {}, dataset_hash=dataset.content_hash(),
                  feature_ids={}, cache_root=args.cache)
    model = fit.get("scorer")
    if model is None:
        from bonmf_core.models.artifacts import load_model
        model = load_model(fit["artifact_path"])[0]
    fits = dict(FITS)
    for w in (float(x) for x in args.priors.split(",") if x):
        fits[f"map_prior{w:g}"] = (lambda m, profiles, items, starts, w=w:
                                   m.fold_in_many(profiles, items, starts=starts, prior=w))
    quality: dict = {}
    for g in given:
        row = {}
        answers = {}
        for name, fn in fits.items():
            answers[name] = _Answer(model, fn)
            row[name] = evaluate_cold_users(answers[name], replace(split, given=(g,)),
                                            args.split)["ndcg@10"]
        a, b = answers["map_newton"].top, answers["reference_adam60"].top
        row["top10_shared_with_reference"] = float(np.mean([len(a[u] & b[u]) / 10 for u in a]))
        quality[f"given{g}"] = row
        print(f"given {g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    torch.set_num_threads(1)
    answer = _Answer(model, FITS["map_newton"])
    liked = np.unique(split.train["item"].to_numpy())[:: max(1, split.n_items // 10)][:10]
    start = model.cold_start_vectors(n=1)
    speed = {"map_newton": latency(lambda: model.fold_in(liked.tolist(), answer.items), args.n),
             "reference_adam60": latency(lambda: reference_fold_in(
                 model, [liked], answer.items, start), max(10, args.n // 5))}
    speed["speedup"] = speed["reference_adam60"]["p50_ms"] / speed["map_newton"]["p50_ms"]
    print(f"10 liked items, 1 thread: map_newton p50 {speed['map_newton']['p50_ms']:.2f} ms "
          f"(p95 {speed['map_newton']['p95_ms']:.2f}); reference p50 "
          f"{speed['reference_adam60']['p50_ms']:.2f} ms; speed-up {speed['speedup']:.1f}x")
    write_json(args.out, {"dataset": dataset.name, "protocol": split.describe(),
                          "users": args.split, "head": model.config.head,
                          "metric": "ndcg@10", "quality": quality, "latency_10_liked": speed,
                          "model_fit": {"best_epoch": fit.get("best_epoch"),
                                        "reused": fit.get("reused")}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
