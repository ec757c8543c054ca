"""Two-stage retrieval (ANN candidates + full-head re-rank) against exact scoring on a large
synthetic catalog: recall@10, latency per request, index build time and memory.

    OMP_NUM_THREADS=2 python benchmarks/retrieval.py [--items 1000000] [--queries 200]
        [--set serving.ann_candidates=500] [--threads 1] [--epochs 10] [--out FILE.json]

The head is a real BoNMF of the default architecture (`model` section defaults: GMF 64, MLP
128-64-32), briefly trained on the demo dataset (schema defaults, `--epochs`, 10): its MLP,
output layer and user vectors are the trained ones. The catalog is synthetic: each item vector
is a Beta(0.5, 0.5) mix of two trained item vectors plus Gaussian noise of half the trained
vectors' per-dimension spread, so it has the trained vectors' scale and cluster structure.
Each user has 20 random seen items (excluded from both answers). The engine is the real
`ServingEngine` over a bundle written to a temporary folder; the exact reference is the same
engine with its index switched off, timed in the same run, on the same users.

Recall@10 = |two-stage top-10 ∩ exact top-10| / 10, averaged over the queries (users for
recommend, catalog items for similar_items). Latency: one request at a time, `--threads`
torch/faiss threads (1 = what a server worker uses).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEEN_PER_USER = 20


def trained_head(epochs: int = 10, seed: int = 0):
    """A default-architecture BoNMF (id variant) briefly trained on the demo dataset."""
    from bonmf_core.config import load_config
    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.recommender import Recommender

    config = load_config(None, [f"train.epochs={epochs}", "train.refit=false",
                                "encoders.source=basic"], use_default_file=False)
    return Recommender.fit(demo_dataset(seed=seed), "id", config, seed=seed).model


def synthetic_items(head, n_items: int, seed: int = 0):
    """(n_items, width) item vectors around the trained ones (module docstring)."""
    import torch

    with torch.no_grad():
        trained = head.item_vectors(torch.arange(head.config.n_items))
    gen = torch.Generator().manual_seed(seed)
    a = torch.distributions.Beta(0.5, 0.5).sample((n_items, 1))
    j, k = (torch.randint(len(trained), (n_items,), generator=gen) for _ in range(2))
    noise = torch.randn(n_items, trained.shape[1], generator=gen) * (0.5 * trained.std(0))
    return a * trained[j] + (1 - a) * trained[k] + noise


def synthetic_bundle(out: Path, head, item_vectors, serving, seen: list[np.ndarray]) -> Path:
    """A serving bundle whose model is `head` with `item_vectors` as its catalog (ID
    embeddings), `seen[u]` the items of user u, written as `write_bundle` lays it out."""
    import torch
    from safetensors.torch import save_file

    from bonmf_core.models.artifacts import save_model
    from bonmf_core.models.bonmf import BoNMF, BoNMFConfig
    from bonmf_core.serving.engine import BUNDLE_VERSION

    config = BoNMFConfig.from_dict({**head.config.to_dict(), "n_items": len(item_vectors)})
    model = BoNMF(config)
    state = {k: v for k, v in head.state_dict().items()
             if k not in ("item_embedding.weight", "warm_items")}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.item_embedding.weight.copy_(item_vectors)
    model.eval()
    n_users, n_items = config.n_users, config.n_items
    user_ids = [f"u{u}" for u in range(n_users)]
    item_ids = [f"i{i}" for i in range(n_items)]
    save_model(out / "model", model, user_ids=user_ids, item_ids=item_ids)
    indptr = np.zeros(n_users + 1, np.int64)
    indptr[1:] = np.cumsum([len(s) for s in seen])
    flat = np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, np.int64)
    popularity = np.bincount(flat, minlength=n_items).astype(np.float32)
    save_file({"popularity": torch.from_numpy(popularity),
               "seen_indptr": torch.from_numpy(indptr), "seen_items": torch.from_numpy(flat)},
              str(out / "catalog.safetensors"))
    (out / "catalog.json").write_text(json.dumps({"titles": item_ids}))
    (out / "serving.json").write_text(json.dumps({
        "bundle_version": BUNDLE_VERSION, "variant": "id", "modalities": ["id"],
        "encoders": {"source": "basic", "text_fields": ["title"], "text_separator": " | "},
        "serving": serving.model_dump()}))
    return out


def random_seen(n_users: int, n_items: int, per_user: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_items, per_user, replace=False)) for _ in range(n_users)]


def _timed(fn, args) -> tuple[list, list[float]]:
    answers, times = [], []
    for a in args:
        started = time.perf_counter()
        answers.append(fn(a))
        times.append((time.perf_counter() - started) * 1000)
    return answers, times


def _ms(times: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3)}


def _recall(approx: list[dict], exact: list[dict]) -> float:
    hits = [len({x["item_id"] for x in a["items"]} & {x["item_id"] for x in e["items"]})
            / max(1, len(e["items"])) for a, e in zip(approx, exact)]
    return round(float(np.mean(hits)), 4)


def compare(engine, users: list[str], items: list[str], k: int = 10) -> dict:
    """Two-stage vs exact answers of one engine (its index switched off for exact)."""
    retrieval = engine.retrieval
    two_rec, two_rec_ms = _timed(lambda u: engine.recommend(u, k), users)
    two_sim, two_sim_ms = _timed(lambda i: engine.similar_items(i, k), items)
    engine.retrieval = None
    try:
        ex_rec, ex_rec_ms = _timed(lambda u: engine.recommend(u, k), users)
        ex_sim, ex_sim_ms = _timed(lambda i: engine.similar_items(i, k), items)
    finally:
        engine.retrieval = retrieval
    seen_leak = sum(len({x["item_id"] for x in a["items"]} &
                        {engine.item_ids[s] for s in engine._seen(engine.user_index[u])})
                    for a, u in zip(two_rec, users))
    return {"recommend": {"recall@10": _recall(two_rec, ex_rec), "two_stage": _ms(two_rec_ms),
                          "exact": _ms(ex_rec_ms), "seen_items_returned": seen_leak},
            "similar_items": {"recall@10": _recall(two_sim, ex_sim),
                              "two_stage": _ms(two_sim_ms), "exact": _ms(ex_sim_ms)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads per request")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the head")
    p.add_argument("--set", action="append", default=[], metavar="serving.KEY=VALUE")
    p.add_argument("--keep", default=None, help="write the bundle here (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import faiss
    import torch

    from bonmf_core.config import load_config
    from bonmf_core.serving.engine import ServingEngine

    torch.set_num_threads(args.build_threads)
    torch.set_flush_denormal(True)
    faiss.omp_set_num_threads(args.build_threads)
    serving = load_config(None, [*args.set, "serving.ann_min_items=1"],
                          use_default_file=False).serving
    started = time.perf_counter()
    head = trained_head(args.epochs)
    train_s = time.perf_counter() - started
    vectors = synthetic_items(head, args.items)
    seen = random_seen(head.config.n_users, args.items, SEEN_PER_USER)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_bundle(folder, head, vectors, serving, seen)
        del vectors
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        engine = ServingEngine(folder, load_encoders=False)
        load_s = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    users = [engine.user_ids[u] for u in rng.choice(len(engine.user_ids), args.queries,
                                                    replace=False)]
    items = [engine.item_ids[i] for i in rng.choice(len(engine.item_ids), args.queries,
                                                    replace=False)]
    engine.recommend(users[0]), engine.similar_items(items[0])  # warm
    result = {"items": args.items, "users": len(engine.user_ids), "queries": args.queries,
              "threads": args.threads,
              "head": f"default BoNMF, trained {args.epochs} epochs on demo",
              "train_head_s": round(train_s, 1), "engine_load_s": round(load_s, 1),
              "retrieval": engine.retrieval.describe(),
              **compare(engine, users, items),
              "peak_rss_mb_before_load": round(rss_before), "cpu_load_1min": os.getloadavg()[0],
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
