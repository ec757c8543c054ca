"""The one runner: split → fit each variant → evaluate → aggregate.

The Dagster assets, the DVC stages and `benchmarks/quality.py` all run experiments through
`run_fits` (and `run_protocol`, which adds the split and the results record around it). The
fit cache is an option: with `cache_root`, each (variant, seed) fit is keyed by everything that
determines its result (dataset hash, split, content features, hyper-parameters, variant, seed)
and an unchanged re-run finds the saved model and metrics instead of training again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bonmf_core import distributed
from bonmf_core.atomic import write_json
from bonmf_core.config import BonmfConfig
from bonmf_core.data.dataset import Dataset
from bonmf_core.data.splits import Split, make_splits
from bonmf_core.evaluation.evaluator import evaluate, popularity_slices
from bonmf_core.evaluation.metrics import mean_std
from bonmf_core.experiment.variants import (BASELINES, SGD_BASELINES, check_protocol,
                                            fit_variant, modalities_of, parse_variants)
from bonmf_core.hashing import sha256_array, sha256_json

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def fit_spec(variant: str, dataset_hash: str, split: Split, cfg: BonmfConfig, seed: int,
             feature_ids: dict[str, str]) -> dict:
    """Everything that determines a fit's result (and so its cache key)."""
    used = [m for m in modalities_of(variant) if m != "id"]
    # A baseline with its own section is keyed on that section (its λ grid, its neighbours).
    schedule = {"bpr": cfg.bpr, "ease": cfg.ease, "item_knn": cfg.item_knn,
                "mf": cfg.mf}.get(variant, cfg.train)
    spec = {"v": CACHE_VERSION, "variant": variant, "seed": seed, "dataset": dataset_hash,
            "split": split.describe(), "features": {m: feature_ids.get(m) for m in used},
            "train": schedule.model_dump(mode="json"), "metric": cfg.train.metric,
            "model": cfg.model.model_dump(mode="json") if variant not in BASELINES else None,
            # the recorded metrics include the popularity slices these thresholds define
            "slices": {"head_share": cfg.protocol.head_share,
                       "tail_max_interactions": cfg.protocol.tail_max_interactions}}
    if distributed.enabled():   # a DDP fit is not bit-identical to the one-process fit
        spec["world_size"] = distributed.world_size()
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def fit_one(variant: str, dataset: Dataset, split: Split, cfg: BonmfConfig,
            features: dict[str, np.ndarray], *, dataset_hash: str, feature_ids: dict[str, str],
            cache_root: str | Path | None = None) -> dict:
    """Fit + evaluate one variant on the split's test set → its result record.

    {"key", "variant", "seed", "metrics", "artifact_path" (BoNMF, with a cache), "reused",
    "best_epoch", "history", "split", "spec", "slice_definition"}. With `cache_root` the BoNMF
    model is saved there (`save_model`) and the same fit later is reused; baselines keep only
    metrics. `metrics["slices"]`: the item-popularity slices' metrics (`popularity_slices`
    with `cfg.protocol.head_share` / `tail_max_interactions`, part of the cache key).
    """
    seed = split.seed or 0
    spec = fit_spec(variant, dataset_hash, split, cfg, seed, feature_ids)
    key = sha256_json(spec)[:20]
    folder = Path(cache_root) / key if cache_root else None
    # Under torchrun rank 0 decides (its cache may be the only one), the others follow.
    slices = popularity_slices(split, cfg.protocol.head_share,
                               cfg.protocol.tail_max_interactions)
    cached = distributed.on_main(lambda: _cached(folder))
    if cached is not None:
        return cached
    started = time.perf_counter()
    if distributed.is_main() or variant in SGD_BASELINES or variant not in BASELINES:
        scorer, train_result = fit_variant(variant, dataset, split, cfg, seed, features)
    else:   # a baseline without SGD: rank 0 alone fits it
        scorer, train_result = None, None
    fit_s = time.perf_counter() - started
    if not distributed.is_main():   # rank 0 evaluates and saves; the others wait for its record
        return {**distributed.broadcast(None), "scorer": scorer}
    t0 = time.perf_counter()
    metrics = evaluate(scorer, split, "test", tuple(cfg.protocol.ks), slices=slices)
    metrics.update(fit_s=fit_s, eval_s=time.perf_counter() - t0)
    result = {"key": key, "variant": variant, "seed": seed, "metrics": metrics,
              "artifact_path": None, "best_epoch": None, "dataset_hash": dataset_hash,
              "split": split.describe(), "spec": spec,
              "slice_definition": slices.describe()}
    if getattr(scorer, "tuning", None) is not None:   # what validation chose (ease, item_knn)
        result["tuning"] = scorer.tuning
    if train_result is not None:
        metrics.update(best_epoch=train_result.best_epoch, epochs_run=train_result.epochs_run,
                       samples_per_s=train_result.samples_per_s)
        result["best_epoch"] = train_result.best_epoch
        result["history"] = train_result.history   # the training curve (epochs, validation)
    if folder is not None:
        if variant not in BASELINES:
            result["artifact_path"] = str(_save(folder / "model", scorer, dataset, cfg, result))
        write_json(folder / "result.json", result)
    result["reused"] = False
    distributed.broadcast(result)
    result["scorer"] = scorer   # in memory only (not in result.json)
    return result


def _cached(folder: Path | None) -> dict | None:
    if folder is not None and (folder / "result.json").exists():
        result = json.loads((folder / "result.json").read_text())
        if result.get("artifact_path") is None or Path(result["artifact_path"]).exists():
            result["reused"] = True
            return result
    return None


def _save(path: Path, scorer, dataset: Dataset, cfg: BonmfConfig, result: dict) -> Path:
    from bonmf_core.models.artifacts import save_model

    metrics = result["metrics"]
    save_model(path, scorer, user_ids=dataset.user_ids, item_ids=dataset.item_ids,
               metadata={"variant": result["variant"], "seed": result["seed"],
                         "train": cfg.train.model_dump(mode="json"),
                         "model_params": cfg.model.model_dump(mode="json"),
                         "dataset": {"name": dataset.name,
                                     "content_hash": result["dataset_hash"]},
                         "protocol": result["split"],
                         "metrics": {k: v for k, v in metrics.items()
                                     if isinstance(v, (int, float))},
                         "best_epoch": result["best_epoch"]})
    return path


def run_fits(variants, dataset: Dataset, splits: list[Split], cfg: BonmfConfig,
             features: dict[str, np.ndarray], *, dataset_hash: str | None = None,
             feature_ids: dict[str, str] | None = None, cache_root: str | Path | None = None,
             report: Callable[[str], None] = log.info) -> list[dict]:
    """Every variant on every split → one result per (split, variant), in that order.

    `feature_ids`: what identifies each content matrix in the cache key (e.g. the encoder
    identity and the dataset hash: a cold encode and a cache read are the same features);
    default: a hash of its bytes.
    """
    check_protocol(variants, cfg.protocol.name)
    dataset_hash = dataset_hash or dataset.content_hash()
    ids = {m: (feature_ids or {}).get(m) or sha256_array(f)[:16] for m, f in features.items()}
    fits = []
    for split in splits:
        for variant in variants:
            fit = fit_one(variant, dataset, split, cfg, features, dataset_hash=dataset_hash,
                          feature_ids=ids, cache_root=cache_root)
            report(f"{variant} seed {split.seed}: {'reused' if fit['reused'] else 'trained'} "
                   f"{ {k: round(v, 4) for k, v in fit['metrics'].items() if '@' in k} }")
            fits.append(fit)
    return fits


def aggregate(fits: list[dict], slices: bool = False) -> dict:
    """{variant: {metric: {mean, std, values}}} over the seeds of each variant; with `slices`,
    also {"slices": {slice: {metric: {mean, std, values}}}} where the fits measured them."""
    by_variant: dict[str, list[dict]] = {}
    for fit in fits:
        by_variant.setdefault(fit["variant"], []).append(fit["metrics"])
    out = {v: mean_std(runs) for v, runs in by_variant.items()}
    if slices:
        for v, runs in by_variant.items():
            if any(r.get("slices") for r in runs):
                out[v]["slices"] = aggregate_slices(runs)
    return out


def aggregate_slices(runs: list[dict]) -> dict:
    """{slice: {metric: {mean, std, values}}} over runs' `metrics["slices"]`: a metric's mean is
    over the seeds where its slice had users (an empty slice records only its counts)."""
    per_slice: dict[str, list[dict]] = {}
    for run in runs:
        for name, m in (run.get("slices") or {}).items():
            per_slice.setdefault(name, []).append(m)
    out = {}
    for name, records in per_slice.items():
        keys = list(dict.fromkeys(k for r in records for k in r))
        out[name] = {k: mean_std([{k: r[k]} for r in records if k in r])[k] for k in keys}
    return out


def validation_score(fit: dict, metric: str) -> float | None:
    """The fit's validation `metric` at its best epoch (from its training history) — with the
    content weights validation chose after training (`tuning`), that of the model as shipped —
    or None when it had no validation set."""
    scores = [h["valid"][metric] for h in fit.get("history") or []
              if isinstance(h.get("valid"), dict) and metric in h["valid"]]
    tuning = fit.get("tuning") or {}
    if scores and tuning.get("parameter") == "content_weights" and tuning.get("metric") == metric:
        scores += list(tuning["valid"].values())
    return max(scores) if scores else None


def choose_candidate(fits: list[dict], candidates, metric: str) -> dict:
    """The best of `candidates` on the *validation* `metric` (mean over seeds of each fit's best
    epoch; the test set never chooses) → {variant, fit (its first seed's), metrics (test means),
    results (every variant's test mean ± std), chosen_on, validation (variant → mean)}.
    Only when a candidate has no validation set (e.g. `ncf` without one) is the choice made on
    the test metric, and `chosen_on` says so."""
    results = aggregate(fits, slices=True)
    validation: dict[str, float] = {}
    for v in candidates:
        scores = [validation_score(f, metric) for f in fits if f["variant"] == v]
        if scores and all(x is not None for x in scores):
            validation[v] = float(np.mean(scores))
    if len(validation) == len(candidates):
        best, chosen_on = max(candidates, key=validation.__getitem__), "validation"
    else:
        log.warning("no validation metric for every candidate: choosing on the test metric")
        best, chosen_on = max(candidates, key=lambda v: results[v][metric]["mean"]), "test"
    chosen = next(f for f in fits if f["variant"] == best)
    return {"variant": best, "fit": chosen, "results": results, "chosen_on": chosen_on,
            "validation": validation,
            "metrics": {k: v["mean"] for k, v in results[best].items() if k != "slices"}}


def results_record(cfg: BonmfConfig, splits: list[dict], dataset: dict, results: dict,
                   candidate: dict | None = None, **extra) -> dict:
    """The evaluation record (what metrics.json holds): the protocol it was measured on, the
    dataset, the candidate and every variant's mean ± std. `splits`: Split.describe()s;
    `dataset`: {name, content_hash, users, items, interactions}."""
    protocol = cfg.protocol
    return {
        "protocol": protocol.name, "dataset": dataset["name"],
        "ks": list(protocol.ks), "seeds": list(protocol.seeds),
        "protocol_details": {"splits": splits, "ncf_dir": protocol.ncf_dir,
                             "order": protocol.order, "cold_fraction": protocol.cold_fraction,
                             "min_rating": protocol.min_rating,
                             "cold_user_fraction": protocol.cold_user_fraction,
                             "given": protocol.given,
                             "slices": {"head_share": protocol.head_share,
                                        "tail_max_interactions":
                                            protocol.tail_max_interactions}},
        "dataset_details": {k: dataset[k] for k in ("content_hash", "users", "items",
                                                    "interactions")},
        "candidate": candidate,
        "params": {k: getattr(cfg, k).model_dump(mode="json")
                   for k in ("model", "train", "bpr", "ease", "item_knn", "mf", "encoders")},
        "results": results,
        **extra,
    }


def dataset_record(dataset: Dataset, dataset_hash: str | None = None) -> dict:
    summary = dataset.summary()
    return {"name": dataset.name, "content_hash": dataset_hash or dataset.content_hash(),
            **{k: summary[k] for k in ("users", "items", "interactions")}}


def run_protocol(dataset: Dataset, cfg: BonmfConfig, variants=None,
                 cache_root: str | Path | None = None) -> dict:
    """Evaluate `variants` (default: the pipeline's candidates + baselines) on `dataset` under
    `cfg.protocol`, mean ± std over its seeds → the results record (+ "seconds", "features").
    Content comes from `cfg.encoders`."""
    from bonmf_core.content.features import content_features

    variants = parse_variants(variants if variants is not None else
                              cfg.pipeline.candidates + cfg.pipeline.baselines)
    started = time.perf_counter()
    wanted = sorted({m for v in variants for m in modalities_of(v)} - {"id"})
    with distributed.main_first():   # under torchrun rank 0 fills the embedding cache
        features, feature_report = content_features(dataset, wanted, cfg.encoders)
    splits = make_splits(dataset, cfg.protocol)
    dataset_hash = dataset.content_hash()
    fits = run_fits(variants, dataset, splits, cfg, features, dataset_hash=dataset_hash,
                    cache_root=cache_root)
    return results_record(cfg, [s.describe() for s in splits],
                          dataset_record(dataset, dataset_hash), aggregate(fits, slices=True),
                          validation=validation_record(fits, cfg.train.metric),
                          features=feature_report, seconds=time.perf_counter() - started)


def validation_record(fits: list[dict], metric: str) -> dict:
    """{variant: {metric, values (per seed, at its best epoch), best_epochs, mean, and
    `tuning` (per seed) where validation also chose a setting after training}} for the fits
    that had a validation set: what a default may be chosen on (the test set never is)."""
    out: dict[str, dict] = {}
    for fit in fits:
        score = validation_score(fit, metric)
        if score is not None:
            rec = out.setdefault(fit["variant"], {"metric": metric, "values": [],
                                                  "best_epochs": []})
            rec["values"].append(score)
            rec["best_epochs"].append(fit.get("best_epoch"))
            if fit.get("tuning") is not None:
                rec.setdefault("tuning", []).append(fit["tuning"])
    for rec in out.values():
        rec["mean"] = float(np.mean(rec["values"]))
    return out
