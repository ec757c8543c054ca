"""Training: the splits, the BoNMF candidate (with its ablation variants) and the baselines."""


import time

import dagster as dg

from bonmf_core import registry, stages

from ..config import BaselineConfig, CandidateConfig, SplitConfig, params_with
from ..resources import ParamsResource, StateResource, StoreResource


def _dataset(validated_dataset: dict):
    from bonmf_core.dataset import Dataset

    return Dataset.load(validated_dataset["path"])


def _checked(variants, role: str) -> list[str]:
    try:
        return stages.check_variants(variants, role)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


@dg.asset(group_name="training", kinds={"numpy"},
          description="Train / validation / test splits per seed for the configured protocol "
                      "(ncf leave-one-out with 99 sampled negatives, full, or cold_items).")
def splits(context: dg.AssetExecutionContext, config: SplitConfig, validated_dataset: dict,
           params: ParamsResource) -> dg.MaterializeResult:
    proto = params_with(config, params.load())["protocol"]
    out = stages.make_splits(_dataset(validated_dataset), proto)
    described = [s.describe() for s in out]
    return dg.MaterializeResult(
        value={"splits": out, "protocol": proto, "dataset_hash": validated_dataset["dataset_hash"]},
        metadata={"protocol": proto["name"], "seeds": list(proto["seeds"]),
                  "ks": list(proto["ks"]), "splits": dg.MetadataValue.json(described),
                  "train_rows": described[0]["train"], "test_rows": described[0]["test"]})


def _fit_all(context, variants, validated_dataset: dict, splits: dict, params: dict,
             text_embeddings: dict, image_embeddings: dict, state) -> list[dict]:
    features, feature_ids = stages.load_features(
        variants, {"text": text_embeddings, "image": image_embeddings})
    return stages.fit_variants(variants, _dataset(validated_dataset), splits["splits"], params,
                               features, feature_ids, splits["dataset_hash"],
                               state.folder("training"), report=context.log.info)


@dg.asset(group_name="training", kinds={"pytorch"},
          description="BoNMF variants trained on every seed's split (cached by data, features "
                      "and hyper-parameters, so an unchanged re-run trains nothing); the best on "
                      "the primary metric is the candidate, registered in the model registry.")
def bonmf_candidate(context: dg.AssetExecutionContext, config: CandidateConfig,
                    validated_dataset: dict, splits: dict, text_embeddings: dict,
                    image_embeddings: dict, params: ParamsResource, state: StateResource,
                    store: StoreResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    p = params_with(config, params.load())
    p["protocol"] = splits["protocol"]
    variants = _checked(config.variants, "candidates")
    fits = _fit_all(context, variants, validated_dataset, splits, p, text_embeddings,
                    image_embeddings, state)
    choice = stages.choose_candidate(fits, variants, config.metric)
    best, chosen, results, metrics = (choice[k] for k in ("variant", "fit", "results",
                                                          "metrics"))
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
               "metrics": metrics, "metric": config.metric, "results": results, "fits": fits,
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
    from bonmf_core.pipeline import aggregate

    started = time.perf_counter()
    p = params_with(config, params.load())
    p["protocol"] = splits["protocol"]
    variants = _checked(config.variants, "baselines")
    if not variants:
        return dg.MaterializeResult(value={"results": {}, "fits": []},
                                    metadata={"baselines": "none configured"})
    fits = _fit_all(context, variants, validated_dataset, splits, p, text_embeddings,
                    image_embeddings, state)
    results = aggregate(fits)
    metric = config.metric
    return dg.MaterializeResult(
        value={"results": results, "fits": fits},
        metadata={**{f"{v} {metric}": round(results[v][metric]["mean"], 5) for v in variants},
                  "fits_reused": sum(f["reused"] for f in fits),
                  "seconds": round(time.perf_counter() - started, 3)})
