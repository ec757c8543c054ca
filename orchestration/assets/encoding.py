"""Encoding: text and image embeddings of the catalog, incremental through the embedding cache."""


import hashlib
import json
import time

import dagster as dg
import numpy as np

from ..config import EncodingConfig, params_with
from ..resources import ParamsResource, StateResource, StoreResource


def _encode(context, modality: str, validated_dataset: dict, config: EncodingConfig,
            params: ParamsResource, state: StateResource, store: StoreResource):
    from bonmf_core.dataset import Dataset

    started = time.perf_counter()
    section = params_with(config, params.load())["encoders"]
    dataset = Dataset.load(validated_dataset["path"])
    if section["source"] == "basic":
        from bonmf_core.features import basic_content_features

        features, report = basic_content_features(dataset, [modality])
        vectors = features[modality]
        present = np.abs(vectors).sum(1) > 0
        manifest = {"encoder": f"basic-{modality}", "dim": int(vectors.shape[1]),
                    "items": len(vectors), **report.get(modality, {})}
    elif section["source"] == "pretrained":
        from bonmf_core.catalog_encoding import EncoderSettings, encode_catalog

        settings = EncoderSettings.from_params(section)
        with store.open() as s:
            encoded = encode_catalog(dataset, s, settings, (modality,))[modality]
        vectors, present, manifest = encoded.vectors, encoded.present, encoded.manifest
    else:
        raise dg.Failure(f"encoder_source must be 'pretrained' or 'basic', got "
                         f"{section['source']!r}")
    key = hashlib.sha256(json.dumps([manifest.get("encoder"), section], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    out = state.folder("features", validated_dataset["dataset_hash"]) / f"{modality}-{key}.npy"
    np.save(out, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
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
                  "seconds": round(seconds, 3), **shown})


@dg.asset(group_name="encoding", kinds={"pytorch"},
          description="Text embeddings of the catalog (title | genres | overview | keywords; "
                      "offline MiniLM by default). Only items whose text changed are encoded; "
                      "the rest come from the embedding cache in the store.")
def text_embeddings(context: dg.AssetExecutionContext, config: EncodingConfig,
                    validated_dataset: dict, params: ParamsResource, state: StateResource,
                    store: StoreResource) -> dg.MaterializeResult:
    return _encode(context, "text", validated_dataset, config, params, state, store)


@dg.asset(group_name="encoding", kinds={"pytorch"},
          description="Image embeddings of the catalog's posters (EfficientNet-Lite0 by "
                      "default), incremental through the embedding cache; unreadable images "
                      "are zero rows and counted.")
def image_embeddings(context: dg.AssetExecutionContext, config: EncodingConfig,
                     validated_dataset: dict, params: ParamsResource, state: StateResource,
                     store: StoreResource) -> dg.MaterializeResult:
    return _encode(context, "image", validated_dataset, config, params, state, store)
