"""The variants and how each one is fitted on a split.

Variants: `pop` (popularity), `bpr` (BPR-MF), the item-item baselines `ease` (EASE, closed
form, λ picked on validation) and `item_knn` (item cosine, neighbour count picked on
validation), `mf` (dot-product MF with biases and the logistic loss over many sampled
negatives, Rendle et al. 2020; its dimension picked on validation), the cold-item baselines `genre_pop` (popularity of the item's genres) and
`content_knn` (content similarity to the user's history, in the text+image encoder space)
— under `cold_users` only `pop`, `item_knn`, `ease` and BoNMF apply (`check_protocol`) —
and BoNMF with its item-side modalities — `id` (= NeuMF), `text`,
`image`, `text+image` (ID embedding plus the named content).
The runner (`experiment.runner`) gives every variant of a seed the same split, so
differences are the models', not the data's.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonmf_core.models.baselines import (EASE, BiasedMF, ContentKNN, GenrePopularity, ItemKNN,
                                         MatrixFactorization, Popularity)
from bonmf_core.data.dataset import Dataset
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.config import BASELINE_VARIANTS, BONMF_VARIANTS, BonmfConfig, ModelConfig
from bonmf_core.models.bonmf import BoNMF, BoNMFConfig
from bonmf_core.data.splits import Split
from bonmf_core.errors import ConfigError
from bonmf_core.training import train, train_with_refit

log = logging.getLogger(__name__)

BASELINES = BASELINE_VARIANTS
SGD_BASELINES = ("bpr", "mf")   # trained by `training.train`: every torchrun rank takes part
VARIANTS = BASELINE_VARIANTS + BONMF_VARIANTS
CONTENT_KNN_NEIGHBORS = (None, 10)  # None = all of the history; chosen on validation
# What can score users it never trained on (`cold_users`: `score_profiles`): BoNMF by fold-in,
# the item-item baselines from the revealed items, popularity for everyone alike.
COLD_USER_VARIANTS = ("pop", "item_knn", "ease") + BONMF_VARIANTS


def check_protocol(variants, protocol: str) -> None:
    """Refuse, before anything trains, variants that cannot answer the protocol's question."""
    if protocol == "cold_users":
        wrong = [v for v in variants if v not in COLD_USER_VARIANTS]
        if wrong:
            raise ConfigError(
                f"variants {', '.join(wrong)} cannot score users they never trained on "
                f"(protocol cold_users); choose from {', '.join(COLD_USER_VARIANTS)} "
                f"(e.g. --set pipeline.baselines=[pop,item_knn])")


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
        head=model.head, gmf_dim=model.gmf_dim, mlp_layers=tuple(model.mlp_layers),
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
    if variant == "ease":
        e = cfg.ease
        return _fit_tuned(
            "ease", "lambda", e.lambdas, split, cfg.train.metric, e.refit,
            lambda lam: EASE(dataset.n_users, dataset.n_items, lam, e.max_memory_mb),
            lambda scorer: {"gram": scorer.gram}), None
    if variant == "item_knn":
        c = cfg.item_knn
        return _fit_tuned(
            "item_knn", "neighbours", c.neighbours, split, cfg.train.metric, c.refit,
            lambda k: ItemKNN(dataset.n_users, dataset.n_items, k, c.max_memory_mb),
            lambda scorer: {"similarity": scorer.similarity}), None
    if variant == "mf":
        return _fit_mf(dataset, split, cfg, seed)
    if variant == "bpr":
        dim = cfg.bpr.dim
        build = lambda: MatrixFactorization(dataset.n_users, dataset.n_items, dim)  # noqa: E731
        schedule = cfg.bpr.as_train(cfg.train.metric)
    else:
        return _fit_bonmf(variant, dataset, split, cfg, seed, features)
    return train_with_refit(build, split, schedule, seed=seed)


def _fit_bonmf(variant: str, dataset: Dataset, split: Split, cfg: BonmfConfig, seed: int,
               features: dict[str, np.ndarray]):
    """BoNMF through the shared trainer (early stopping, refit), then the content weights
    chosen on the first stage's validation set and given to the final model."""
    build = lambda: build_bonmf(dataset, modalities_of(variant),  # noqa: E731
                                cfg.model, features)
    torch.manual_seed(seed)   # as train_with_refit: the initial weights are seeded
    model = build()
    first = train(model, split, cfg.train, seed=seed)
    chosen, values = choose_content_weights(model, split, cfg.model.content_weight_grid,
                                            cfg.train.metric)
    final, result = train_with_refit(build, split, cfg.train, seed=seed, first=(model, first))
    final.config.content_weights = chosen
    if values:
        final.tuning = {"parameter": "content_weights", "chosen": chosen,
                        "metric": cfg.train.metric, "valid": values,
                        "best_epoch": result.best_epoch, "refit": result.refit is not None}
    return final, result


def choose_content_weights(model: BoNMF, split: Split, grid, metric: str
                           ) -> tuple[dict[str, float], dict[str, float]]:
    """The weight of each content modality's vector at scoring time, picked on the validation
    set (never the test set) from `grid` per modality: fusion that can turn a weak modality
    down after training shows it is weak (posters on cold items), where a gate learned on
    training interactions keeps what fits the warm items. All ones first and kept on a tie;
    all zeros skipped (no content: cold items would score nothing).
    → ({modality: weight}, {"text=…,image=…": validation metric}); both empty when there is
    nothing to choose (no content, one option, no validation set).
    """
    content = [m for m in model.config.modalities if m != "id"]
    options = sorted(set(float(w) for w in grid), key=lambda w: (w != 1.0, -w))
    if not content or len(options) < 2 or len(split.valid) == 0:
        return {}, {}
    ks = (int(metric.split("@")[1]),)
    values: dict[str, float] = {}
    best, best_key = {}, None
    for combo in itertools.product(options, repeat=len(content)):
        if not any(combo):
            continue
        weights = dict(zip(content, combo))
        model.config.content_weights = weights
        key = ",".join(f"{m}={w:g}" for m, w in weights.items())
        values[key] = evaluate(model, split, "valid", ks)[metric]
        if best_key is None or values[key] > values[best_key]:
            best, best_key = weights, key
    model.config.content_weights = best
    log.info("content weights: %s (valid %s %.4f; first option %.4f)", best_key, metric,
             values[best_key], next(iter(values.values())))
    return best, values


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


def _fit_tuned(variant: str, parameter: str, options, split: Split, metric: str, refit: bool,
               make, shared):
    """An item-item baseline with one hyper-parameter: each option in `options` is fitted on
    `split.train` and scored on the validation set (never the test set) by `metric`; the best
    (the first on a tie, or the first when there is no validation set) is kept and, with
    `refit`, fitted again on train ∪ valid, as BPR-MF and BoNMF are. `make(option)` → an
    unfitted scorer; `shared(scorer)` → fit() keywords that the next option on the same
    training set reuses (the item × item matrix that does not depend on the option).

    The choice is recorded on the scorer as `tuning` {parameter, chosen, metric, valid (option
    → validation metric), refit, cold_items}.
    """
    ks = (int(metric.split("@")[1]),)
    values: dict[str, float] = {}
    options = list(options)
    best, scorer, chosen, reuse = None, None, options[0], {}
    # Cold candidates have no interactions: every option scores them all 0 and ranks them
    # nowhere (as `pop` does), so there is nothing to search.
    cold = split.cold_valid_items is not None or split.cold_test_items is not None
    if cold:
        log.warning("%s scores cold items from their interactions, which they have none of: "
                    "every cold candidate scores 0 (not applicable, like pop); no search",
                    variant)
    elif len(split.valid) and len(options) > 1:
        best_value = -1.0
        for option in options:
            scorer = make(option).fit(split.train, **reuse)
            reuse = shared(scorer)
            value = evaluate(scorer, split, "valid", ks)[metric]
            values[str(option)] = value
            if value > best_value:
                best, best_value, chosen = scorer, value, option
        log.info("%s: %s=%s (valid %s %.4f; %s)", variant, parameter, chosen, metric,
                 best_value, ", ".join(f"{k}: {v:.4f}" for k, v in values.items()))
    merge = refit and len(split.valid) > 0
    if merge:
        best = scorer = reuse = None    # free the search's item × item matrices first
        best = make(chosen).fit(pd.concat([split.train, split.valid], ignore_index=True))
    elif best is None:
        best = make(chosen).fit(split.train)
    best.tuning = {"parameter": parameter, "chosen": chosen, "metric": metric,
                   "valid": values, "refit": merge, "cold_items": cold}
    return best.compact()


def _fit_mf(dataset: Dataset, split: Split, cfg: BonmfConfig, seed: int):
    """The `mf` baseline through the shared trainer: each of `mf.dims` is trained on
    `split.train` and early-stopped on the validation set (never the test set); the dimension
    with the best validation metric (the first on a tie, or when there is none) is kept and,
    with `mf.refit`, retrained on train ∪ valid for its best epoch count, as BPR-MF is.
    Under `cold_items` the cold candidates have no interactions to learn from (their vectors
    stay at their random start, as BPR-MF's do) and the validation metric is over them: no
    search, the first dimension. → (scorer, TrainResult); the choice is on `scorer.tuning`.
    """
    m = cfg.mf
    schedule = m.as_train(cfg.train.metric)

    def make(dim):
        return lambda: BiasedMF(dataset.n_users, dataset.n_items, dim, m.init_std)

    cold = split.cold_valid_items is not None or split.cold_test_items is not None
    dims, values, first, chosen = list(m.dims), {}, None, m.dims[0]
    if len(split.valid) and len(dims) > 1 and not cold:
        best_value = -np.inf
        for dim in dims:
            torch.manual_seed(seed)   # as train_with_refit: the initial weights are seeded
            model = make(dim)()
            result = train(model, split, schedule, seed=seed)
            values[str(dim)] = result.best_metric
            if result.best_metric > best_value:
                best_value, chosen, first = result.best_metric, dim, (model, result)
            else:
                del model
        log.info("mf: dim=%s (valid %s %.4f; %s)", chosen, schedule.metric, best_value,
                 ", ".join(f"{k}: {v:.4f}" for k, v in values.items()))
    model, result = train_with_refit(make(chosen), split, schedule, seed=seed, first=first)
    model.tuning = {"parameter": "dim", "chosen": chosen, "metric": schedule.metric,
                    "valid": values, "best_epoch": result.best_epoch,
                    "refit": result.refit is not None, "cold_items": cold}
    return model, result
