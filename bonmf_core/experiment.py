"""Run a protocol end to end: split per seed, fit each variant, evaluate, aggregate.

Variants: `pop` (popularity), `bpr` (BPR-MF), the cold-item baselines `genre_pop` (popularity
of the item's genres) and `content_knn` (content similarity to the user's history, in the
text+image encoder space), and BoNMF with its item-side modalities — `id` (= NeuMF), `text`,
`image`, `text+image` (ID embedding plus the named content).
Every variant of a seed sees the same split, so differences are the models', not the data's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from .baselines import ContentKNN, GenrePopularity, MatrixFactorization, Popularity
from .dataset import Dataset
from .evaluation import evaluate
from .features import content_features
from .metrics import mean_std
from .model import BoNMF, BoNMFConfig
from .splits import Split, make_split
from .training import TrainConfig, train_with_refit

log = logging.getLogger("bonmf.experiment")

VARIANTS = ("pop", "bpr", "genre_pop", "content_knn", "id", "text", "image", "text+image")
BASELINES = ("pop", "bpr", "genre_pop", "content_knn")
CONTENT_KNN_NEIGHBORS = (None, 10)  # None = all of the history; chosen on validation


def parse_variants(spec: str | list[str]) -> list[str]:
    names = [v.strip() for v in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def modalities_of(variant: str) -> tuple[str, ...]:
    """The item modalities a variant uses: for BoNMF the ID embedding plus the named content."""
    if variant == "content_knn":
        return ("text", "image")
    if variant in BASELINES:
        return ()
    return ("id",) + tuple(m for m in variant.split("+") if m != "id")


def build_bonmf(dataset: Dataset, modalities, model_params: dict,
                features: dict[str, np.ndarray]) -> BoNMF:
    attrs = dataset.user_attribute_codes() if model_params.get("user_attributes") else None
    config = BoNMFConfig(
        n_users=dataset.n_users, n_items=dataset.n_items, modalities=tuple(modalities),
        gmf_dim=model_params["gmf_dim"], mlp_layers=tuple(model_params["mlp_layers"]),
        content_hidden=model_params["content_hidden"],
        content_dim=model_params["content_dim"],
        feature_dims={m: int(features[m].shape[1]) for m in modalities if m != "id"},
        user_attribute_cardinalities=tuple(int(c) for c in attrs.max(0) + 1) if attrs is not None else (),
        id_dropout=model_params["id_dropout"], dropout=model_params["dropout"])
    return BoNMF(config, features={m: torch.from_numpy(f) for m, f in features.items()
                                   if m in modalities},
                 user_attributes=torch.from_numpy(attrs) if attrs is not None else None)


def train_config(section: dict, seed: int, **fixed) -> tuple[TrainConfig, bool]:
    """A TrainConfig from a params section (`train` or `bpr`), and whether to refit."""
    fields = {k: v for k, v in section.items() if k not in ("refit", "dim")}
    return TrainConfig(**{**fields, **fixed, "seed": seed}), section["refit"]


def fit_variant(variant: str, dataset: Dataset, split: Split, params: dict, seed: int,
                features: dict[str, np.ndarray]):
    """Fit one variant → (scorer, TrainResult or None)."""
    if variant == "pop":
        return Popularity(dataset.n_items).fit(split.train), None
    if variant == "genre_pop":
        return GenrePopularity(dataset.items["genres"]).fit(split.train), None
    if variant == "content_knn":
        return _fit_content_knn(features, split, params["train"]["metric"]), None
    if variant == "bpr":
        dim = params["bpr"]["dim"]
        build = lambda: MatrixFactorization(dataset.n_users, dataset.n_items, dim)  # noqa: E731
        cfg, refit = train_config(params["bpr"], seed, loss="bpr",
                                  metric=params["train"]["metric"])
    else:
        build = lambda: build_bonmf(dataset, modalities_of(variant),  # noqa: E731
                                    params["model"], features)
        cfg, refit = train_config(params["train"], seed)
    return train_with_refit(build, split, cfg, refit=refit)


def _fit_content_knn(features: dict[str, np.ndarray], split: Split, metric: str) -> ContentKNN:
    """Pick the content space (text, image or both) and the neighbour count on the validation
    set, as for any tuned baseline: the cold-start comparison is against its best setting."""
    spaces = [s for s in (("text",), ("image",), ("text", "image"))
              if all(m in features for m in s)]
    ks = (int(metric.split("@")[1]),)
    best, best_value, best_space = None, -1.0, None
    for space in spaces:
        for neighbors in CONTENT_KNN_NEIGHBORS:
            scorer = ContentKNN({m: features[m] for m in space}, neighbors).fit(split.train)
            if len(split.valid) == 0:
                return scorer.restrict_to(split.cold_test_items)
            scorer.restrict_to(split.cold_valid_items)
            value = evaluate(scorer, split, "valid", ks)[metric]
            if value > best_value:
                best, best_value, best_space = scorer, value, space
    log.info("content_knn: %s, neighbors=%s (valid %s %.4f)", "+".join(best_space),
             best.neighbors, metric, best_value)
    best.space = "+".join(best_space)
    return best.restrict_to(split.cold_test_items)


def run_protocol(dataset: Dataset, params: dict, variants, seeds=None,
                 keep_models: bool = False) -> dict:
    """Evaluate `variants` on `dataset` under `params['protocol']`, mean ± std over seeds."""
    proto = params["protocol"]
    seeds = list(proto["seeds"] if seeds is None else seeds)
    ks = tuple(proto["ks"])
    variants = parse_variants(variants)
    started = time.perf_counter()
    wanted = sorted({m for v in variants for m in modalities_of(v)} - {"id"})
    features, feature_report = content_features(dataset, wanted, params.get("encoders"))

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    split_info, models = [], {}
    for seed in seeds:
        split = make_split(dataset, proto["name"], seed=seed, ncf_dir=proto.get("ncf_dir"),
                           order=proto.get("order", "random"),
                           cold_fraction=proto.get("cold_fraction", 0.2))
        split_info.append(split.describe())
        for variant in variants:
            t0 = time.perf_counter()
            scorer, result = fit_variant(variant, dataset, split, params, seed, features)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = evaluate(scorer, split, "test", ks)
            metrics.update(fit_s=fit_s, eval_s=time.perf_counter() - t0)
            if result is not None:
                metrics.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                               samples_per_s=result.samples_per_s)
            runs[variant].append(metrics)
            log.info("seed %d %-10s %s", seed, variant, _brief(metrics, ks))
            if keep_models:
                models[(variant, seed)] = (scorer, result, split)
    # "protocol" and "dataset" are plain names (what a dashboard groups by); the details that
    # make a number reproducible sit beside them.
    out = {
        "protocol": proto["name"],
        "dataset": dataset.name,
        "ks": list(ks),
        "seeds": seeds,
        "protocol_details": {"splits": split_info, **{
            k: proto[k] for k in ("ncf_dir", "order", "cold_fraction") if k in proto}},
        "dataset_details": {"content_hash": dataset.content_hash(), **{
            k: v for k, v in dataset.summary().items() if k in ("users", "items", "interactions")}},
        "features": feature_report,
        "params": {k: params[k] for k in ("model", "train", "bpr", "encoders") if k in params},
        "results": {v: mean_std(r) for v, r in runs.items()},
        "seconds": time.perf_counter() - started,
    }
    if keep_models:
        out["_models"] = models
    return out


def _brief(metrics: dict, ks) -> str:
    return " ".join(f"{name}@{k} {metrics[f'{name}@{k}']:.4f}" for k in ks
                    for name in ("hr", "ndcg", "recall") if f"{name}@{k}" in metrics)


def format_table(results: dict) -> str:
    """A markdown table of mean ± std per variant and metric."""
    ks = results["ks"]
    names = [n for n in ("hr", "ndcg", "recall")
             if any(f"{n}@{ks[0]}" in r for r in results["results"].values())]
    cols = [f"{n}@{k}" for k in ks for n in names]
    seeds = results["seeds"]
    lines = [f"protocol={results['protocol']} dataset={results['dataset']} "
             f"seeds={','.join(map(str, seeds))}",
             "| variant | " + " | ".join(cols) + " | fit s |",
             "|---|" + "---|" * (len(cols) + 1)]
    for variant, r in results["results"].items():
        cells = [f"{r[c]['mean']:.4f} ± {r[c]['std']:.4f}" for c in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {r['fit_s']['mean']:.1f} |")
    return "\n".join(lines)


def load_dataset(source: str | Path, demo_seed: int = 0) -> Dataset:
    """`demo`, a MovieLens-1M directory (ratings.dat), or a saved dataset (dataset.json)."""
    from .demo import demo_dataset
    from .errors import DataError
    from .readers import read_movielens

    if str(source) == "demo":
        return demo_dataset(seed=demo_seed)
    path = Path(source)
    if (path / "dataset.json").exists():
        return Dataset.load(path)
    if (path / "ratings.dat").exists():
        return read_movielens(path)
    raise DataError("not a dataset: expected 'demo', a MovieLens-1M directory (ratings.dat) "
                    "or a saved dataset (dataset.json)", path=path)

