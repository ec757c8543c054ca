"""Encoding: text and image embeddings of the catalog, incremental through the embedding cache."""


import time

import dagster as dg
import numpy as np

from ..resources import ParamsResource, StateResource, StoreResource


def _encode(context, modality: str, validated_dataset: dict, params: ParamsResource,
            state: StateResource, store: StoreResource):
    from bonmf_core.content.features import encode_modality
    from bonmf_core.data.dataset import Dataset

    started = time.perf_counter()
    encoders = params.load().encoders
    if encoders.store_url is None and store.url:
        encoders = encoders.model_copy(update={"store_url": store.url})
    dataset = Dataset.load(validated_dataset["path"])
    try:
        features = encode_modality(dataset, modality, encoders)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    out = features.save(state.folder("features", validated_dataset["dataset_hash"])
                        / f"{modality}-{features.key}.npy")
    vectors, present, manifest = features.vectors, features.present, features.manifest
    seconds = time.perf_counter() - started
    shown = {k: v for k, v in manifest.items()
             if isinstance(v, (int, float, str, bool)) and v is not None}
    context.log.info(f"{modality}: {shown}")
    return dg.MaterializeResult(
        value={"modality": modality, "path": str(out), "dim": int(vectors.shape[1]),
               "identity": f"{validated_dataset['snapshot_hash']}/{out.stem}",
               "present": int(np.asarray(present).sum()), "encoder": manifest.get("encoder")},
        metadata={"path": dg.MetadataValue.path(str(out)), "dim": int(vectors.shape[1]),
                  "items": int(vectors.shape[0]),
                  "items_with_content": int(np.asarray(present).sum()),
                  "seconds": dg.MetadataValue.float(round(seconds, 3)),
                  "items_per_s": dg.MetadataValue.float(round(vectors.shape[0] / max(seconds, 1e-9), 1)),
                  **shown})


@dg.asset(group_name="encoding", kinds={"pytorch"},
          description="Text embeddings of the catalog (title | genres | overview | keywords; "
                      "offline MiniLM by default). Only items whose text changed are encoded; "
                      "the rest come from the embedding cache in the store.")
def text_embeddings(context: dg.AssetExecutionContext, validated_dataset: dict,
                    params: ParamsResource, state: StateResource,
                    store: StoreResource) -> dg.MaterializeResult:
    return _encode(context, "text", validated_dataset, params, state, store)


@dg.asset(group_name="encoding", kinds={"pytorch"},
          description="Image embeddings of the catalog's posters (EfficientNet-Lite0 by "
                      "default), incremental through the embedding cache; unreadable images "
                      "are zero rows and counted.")
def image_embeddings(context: dg.AssetExecutionContext, validated_dataset: dict,
                     params: ParamsResource, state: StateResource,
                     store: StoreResource) -> dg.MaterializeResult:
    return _encode(context, "image", validated_dataset, params, state, store)
