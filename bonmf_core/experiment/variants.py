"""The variants and how each one is fitted on a split.

Variants: `pop` (popularity), `bpr` (BPR-MF), the cold-item baselines `genre_pop` (popularity
of the item's genres) and `content_knn` (content similarity to the user's history, in the
text+image encoder space), and BoNMF with its item-side modalities — `id` (= NeuMF), `text`,
`image`, `text+image` (ID embedding plus the named content).
The runner (`experiment.runner`) gives every variant of a seed the same split, so
differences are the models', not the data's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bonmf_core.models.baselines import ContentKNN, GenrePopularity, MatrixFactorization, Popularity
from bonmf_core.data.dataset import Dataset
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.config import BASELINE_VARIANTS, BONMF_VARIANTS, BonmfConfig, ModelConfig
from bonmf_core.models.bonmf import BoNMF, BoNMFConfig
from bonmf_core.data.splits import Split
from bonmf_core.training import train_with_refit

log = logging.getLogger(__name__)

BASELINES = BASELINE_VARIANTS
VARIANTS = BASELINE_VARIANTS + BONMF_VARIANTS
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


def build_bonmf(dataset: Dataset, modalities, model: ModelConfig,
                features: dict[str, np.ndarray]) -> BoNMF:
    attrs = dataset.user_attribute_codes() if model.user_attributes else None
    config = BoNMFConfig(
        n_users=dataset.n_users, n_items=dataset.n_items, modalities=tuple(modalities),
        gmf_dim=model.gmf_dim, mlp_layers=tuple(model.mlp_layers),
        content_hidden=model.content_hidden, content_dim=model.content_dim,
        feature_dims={m: int(features[m].shape[1]) for m in modalities if m != "id"},
        user_attribute_cardinalities=tuple(int(c) for c in attrs.max(0) + 1)
        if attrs is not None else (),
        id_dropout=model.id_dropout, dropout=model.dropout)
    return BoNMF(config, features={m: torch.from_numpy(f) for m, f in features.items()
                                   if m in modalities},
                 user_attributes=torch.from_numpy(attrs) if attrs is not None else None)


def fit_variant(variant: str, dataset: Dataset, split: Split, cfg: BonmfConfig, seed: int,
                features: dict[str, np.ndarray]):
    """Fit one variant → (scorer, TrainResult or None)."""
    if variant == "pop":
        return Popularity(dataset.n_items).fit(split.train), None
    if variant == "genre_pop":
        return GenrePopularity(dataset.items["genres"]).fit(split.train), None
    if variant == "content_knn":
        return _fit_content_knn(features, split, cfg.train.metric), None
    if variant == "bpr":
        dim = cfg.bpr.dim
        build = lambda: MatrixFactorization(dataset.n_users, dataset.n_items, dim)  # noqa: E731
        schedule = cfg.bpr.as_train(cfg.train.metric)
    else:
        build = lambda: build_bonmf(dataset, modalities_of(variant),  # noqa: E731
                                    cfg.model, features)
        schedule = cfg.train
    return train_with_refit(build, split, schedule, seed=seed)


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
