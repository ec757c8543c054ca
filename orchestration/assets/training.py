"""Training: the splits, the BoNMF candidate (with its ablation variants) and the baselines."""


import time

import dagster as dg
import numpy as np

from bonmf_core import registry

from ..config import BaselineConfig, CandidateConfig, SplitConfig, params_with
from ..resources import ParamsResource, StateResource, StoreResource


def _dataset(validated_dataset: dict):
    from bonmf_core.dataset import Dataset

    return Dataset.load(validated_dataset["path"])


def _features(variants, text_embeddings: dict, image_embeddings: dict) -> dict:
    from bonmf_core.experiment import modalities_of

    wanted = {m for v in variants for m in modalities_of(v)} - {"id"}
    files = {"text": text_embeddings, "image": image_embeddings}
    # Identified by encoder and data (the file name holds the dataset hash and the encoder
    # settings), not by the float bytes: a cold encode and a cache read are the same features.
    ids = {m: f"{files[m]['identity']}" for m in wanted}
    return {m: np.load(files[m]["path"], allow_pickle=False) for m in sorted(wanted)}, ids


@dg.asset(group_name="training", kinds={"numpy"},
          description="Train / validation / test splits per seed for the configured protocol "
                      "(ncf leave-one-out with 99 sampled negatives, full, or cold_items).")
def splits(context: dg.AssetExecutionContext, config: SplitConfig, validated_dataset: dict,
           params: ParamsResource) -> dg.MaterializeResult:
    from bonmf_core.splits import make_split

    proto = params_with(config, params.load())["protocol"]
    dataset = _dataset(validated_dataset)
    out = [make_split(dataset, proto["name"], seed=seed, ncf_dir=proto["ncf_dir"],
                      order=proto["order"], cold_fraction=proto["cold_fraction"])
           for seed in proto["seeds"]]
    described = [s.describe() for s in out]
    return dg.MaterializeResult(
        value={"splits": out, "protocol": proto, "dataset_hash": validated_dataset["dataset_hash"]},
        metadata={"protocol": proto["name"], "seeds": list(proto["seeds"]),
                  "ks": list(proto["ks"]), "splits": dg.MetadataValue.json(described),
                  "train_rows": described[0]["train"], "test_rows": described[0]["test"]})


def _fit_all(context, variants, dataset, splits: dict, params: dict, features: tuple, state):
    from bonmf_core.pipeline import fit_cached

    fits = []
    for split in splits["splits"]:
        for variant in variants:
            fit = fit_cached(variant, dataset, split, params, split.seed, features[0],
                             splits["protocol"]["ks"], state.folder("training"),
                             dataset_hash=splits["dataset_hash"], feature_ids=features[1])
            context.log.info(f"{variant} seed {split.seed}: "
                             f"{'reused' if fit['reused'] else 'trained'} "
                             f"{ {k: round(v, 4) for k, v in fit['metrics'].items() if '@' in k} }")
            fits.append(fit)
    return fits


@dg.asset(group_name="training", kinds={"pytorch"},
          description="BoNMF variants trained on every seed's split (cached by data, features "
                      "and hyper-parameters, so an unchanged re-run trains nothing); the best on "
                      "the primary metric is the candidate, registered in the model registry.")
def bonmf_candidate(context: dg.AssetExecutionContext, config: CandidateConfig,
                    validated_dataset: dict, splits: dict, text_embeddings: dict,
                    image_embeddings: dict, params: ParamsResource, state: StateResource,
                    store: StoreResource) -> dg.MaterializeResult:
    from bonmf_core.experiment import BASELINES
    from bonmf_core.pipeline import aggregate

    started = time.perf_counter()
    p = params_with(config, params.load())
    p["protocol"] = splits["protocol"]
    variants = list(config.variants)
    wrong = [v for v in variants if v in BASELINES]
    if wrong or not variants:
        raise dg.Failure(f"candidate variants must be BoNMF variants (id, text, image, "
                         f"text+image), got {variants}")
    dataset = _dataset(validated_dataset)
    fits = _fit_all(context, variants, dataset, splits, p,
                    _features(variants, text_embeddings, image_embeddings), state)
    results = aggregate(fits)
    primary = config.metric
    best = max(variants, key=lambda v: results[v][primary]["mean"])
    chosen = next(f for f in fits if f["variant"] == best)   # first seed's model
    metrics = {k: v["mean"] for k, v in results[best].items()}
    with store.open() as s:
        version, created = registry.register_model(
            s, artifact_path=chosen["artifact_path"], variant=best, seed=chosen["seed"],
            dataset_hash=splits["dataset_hash"],
            config={"model": p["model"], "train": p["train"]},
            metrics={"mean": metrics, "per_seed": {str(f["seed"]): f["metrics"]
                                                   for f in fits if f["variant"] == best}},
            protocol=splits["protocol"], run_id=context.run.run_id)
    reused = sum(f["reused"] for f in fits)
    return dg.MaterializeResult(
        value={"variant": best, "version_id": version["id"], "artifact_path":
               chosen["artifact_path"], "artifact_sha256": version["artifact_sha256"],
               "metrics": metrics, "results": results, "fits": fits,
               "dataset_hash": splits["dataset_hash"]},
        metadata={"candidate_variant": best, "model_version": version["id"],
                  "newly_registered": created, "stage": version["stage"],
                  "artifact": dg.MetadataValue.path(chosen["artifact_path"]),
                  "artifact_sha256": version["artifact_sha256"],
                  **{k: round(float(v), 5) for k, v in metrics.items() if "@" in k},
                  "fits_trained": len(fits) - reused, "fits_reused": reused,
                  "seconds": round(time.perf_counter() - started, 3)})


@dg.asset(group_name="training", kinds={"pytorch"},
          description="The baselines the candidate must beat (popularity, BPR-MF, ...), fitted "
                      "and evaluated on the same splits; cached like the candidate.")
def baselines(context: dg.AssetExecutionContext, config: BaselineConfig,
              validated_dataset: dict, splits: dict, text_embeddings: dict,
              image_embeddings: dict, params: ParamsResource,
              state: StateResource) -> dg.MaterializeResult:
    from bonmf_core.experiment import BASELINES
    from bonmf_core.pipeline import aggregate

    started = time.perf_counter()
    p = params_with(config, params.load())
    p["protocol"] = splits["protocol"]
    variants = list(config.variants)
    wrong = [v for v in variants if v not in BASELINES]
    if wrong:
        raise dg.Failure(f"baselines must be among {BASELINES}, got {wrong}")
    if not variants:
        return dg.MaterializeResult(value={"results": {}, "fits": []},
                                    metadata={"baselines": "none configured"})
    dataset = _dataset(validated_dataset)
    fits = _fit_all(context, variants, dataset, splits, p,
                    _features(variants, text_embeddings, image_embeddings), state)
    results = aggregate(fits)
    metric = config.metric
    return dg.MaterializeResult(
        value={"results": results, "fits": fits},
        metadata={**{f"{v} {metric}": round(results[v][metric]["mean"], 5) for v in variants},
                  "fits_reused": sum(f["reused"] for f in fits),
                  "seconds": round(time.perf_counter() - started, 3)})
