"""Training: the splits, the BoNMF candidate (with its ablation variants) and the baselines.

Both training assets run the experiment runner (`bonmf_core.experiment.runner.run_fits`) with
the fit cache in the state folder, so an unchanged re-run trains nothing.
"""


import time

import dagster as dg

from bonmf_core.ops import registry, stages

from ..resources import ParamsResource, StateResource, StoreResource


def _dataset(validated_dataset: dict):
    from bonmf_core.data.dataset import Dataset

    return Dataset.load(validated_dataset["path"])


@dg.asset(group_name="training", kinds={"numpy"},
          description="Train / validation / test splits per seed for the configured protocol "
                      "(ncf leave-one-out with 99 sampled negatives, full, cold_items or "
                      "cold_users).")
def splits(context: dg.AssetExecutionContext, validated_dataset: dict,
           params: ParamsResource) -> dg.MaterializeResult:
    from bonmf_core.data.splits import make_splits

    protocol = params.load().protocol
    out = make_splits(_dataset(validated_dataset), protocol)
    described = [s.describe() for s in out]
    return dg.MaterializeResult(
        value={"splits": out, "protocol": protocol.model_dump(mode="json"),
               "dataset_hash": validated_dataset["dataset_hash"]},
        metadata={"protocol": protocol.name, "seeds": list(protocol.seeds),
                  "ks": list(protocol.ks), "splits": dg.MetadataValue.json(described),
                  "train_rows": int(described[0]["train"]),
                  "test_rows": int(described[0]["test"])})


def _fit_all(context, variants, cfg, validated_dataset: dict, splits: dict,
             text_embeddings: dict, image_embeddings: dict, state) -> list[dict]:
    from bonmf_core.experiment.runner import run_fits

    features, feature_ids = stages.load_features(
        variants, {"text": text_embeddings, "image": image_embeddings})
    return run_fits(variants, _dataset(validated_dataset), splits["splits"], cfg, features,
                    dataset_hash=splits["dataset_hash"], feature_ids=feature_ids,
                    cache_root=state.folder("training"), report=context.log.info)


@dg.asset(group_name="training", kinds={"pytorch"},
          description="BoNMF variants (pipeline.candidates) trained on every seed's split "
                      "(cached by data, features and hyper-parameters, so an unchanged re-run "
                      "trains nothing); the best on the validation train.metric is the candidate, registered "
                      "in the model registry.")
def bonmf_candidate(context: dg.AssetExecutionContext, validated_dataset: dict, splits: dict,
                    text_embeddings: dict, image_embeddings: dict, params: ParamsResource,
                    state: StateResource, store: StoreResource) -> dg.MaterializeResult:
    from bonmf_core.experiment.runner import choose_candidate

    started = time.perf_counter()
    cfg = params.load()
    variants, metric = cfg.pipeline.candidates, cfg.train.metric
    fits = _fit_all(context, variants, cfg, validated_dataset, splits, text_embeddings,
                    image_embeddings, state)
    choice = choose_candidate(fits, variants, metric)
    best, chosen, results, metrics = (choice[k] for k in ("variant", "fit", "results",
                                                          "metrics"))
    with store.open() as s:
        version, created = registry.register_model(
            s, artifact_path=chosen["artifact_path"], variant=best, seed=chosen["seed"],
            dataset_hash=splits["dataset_hash"],
            config={"model": cfg.model.model_dump(mode="json"),
                    "train": cfg.train.model_dump(mode="json")},
            metrics={"mean": metrics, "per_seed": {str(f["seed"]): f["metrics"]
                                                   for f in fits if f["variant"] == best}},
            protocol=splits["protocol"], run_id=context.run.run_id)
    reused = sum(f["reused"] for f in fits)
    return dg.MaterializeResult(
        value={"variant": best, "version_id": version["id"], "artifact_path":
               chosen["artifact_path"], "artifact_sha256": version["artifact_sha256"],
               "metrics": metrics, "metric": metric, "results": results,
               "fits": [stages.strip_fit(f) | {"reused": f["reused"]} for f in fits],
               "dataset_hash": splits["dataset_hash"]},
        metadata={"candidate_variant": best, "model_version": version["id"],
                  "chosen_on": choice["chosen_on"],
                  **{f"valid {v} {metric}": dg.MetadataValue.float(x)
                     for v, x in choice["validation"].items()},
                  "newly_registered": created, "stage": version["stage"],
                  "artifact": dg.MetadataValue.path(chosen["artifact_path"]),
                  "artifact_sha256": version["artifact_sha256"],
                  **{k: dg.MetadataValue.float(float(v)) for k, v in metrics.items()
                     if "@" in k},
                  "fits_trained": len(fits) - reused, "fits_reused": reused,
                  "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3))})


@dg.asset(group_name="training", kinds={"pytorch"},
          description="The baselines the candidate must beat (pipeline.baselines: popularity, "
                      "BPR-MF, ...), fitted and evaluated on the same splits; cached like the "
                      "candidate.")
def baselines(context: dg.AssetExecutionContext, validated_dataset: dict, splits: dict,
              text_embeddings: dict, image_embeddings: dict, params: ParamsResource,
              state: StateResource) -> dg.MaterializeResult:
    from bonmf_core.experiment.runner import aggregate

    started = time.perf_counter()
    cfg = params.load()
    variants, metric = cfg.pipeline.baselines, cfg.train.metric
    if not variants:
        return dg.MaterializeResult(value={"results": {}, "fits": []},
                                    metadata={"baselines": "none configured", "fits_trained": 0,
                                              "fits_reused": 0})
    fits = _fit_all(context, variants, cfg, validated_dataset, splits, text_embeddings,
                    image_embeddings, state)
    results = aggregate(fits, slices=True)   # per popularity slice too (the report)
    return dg.MaterializeResult(
        value={"results": results, "fits": [stages.strip_fit(f) for f in fits]},
        metadata={**{f"{v} {metric}": dg.MetadataValue.float(float(results[v][metric]["mean"]))
                     for v in variants},
                  "fits_trained": sum(not f["reused"] for f in fits),
                  "fits_reused": sum(f["reused"] for f in fits),
                  "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3))})
