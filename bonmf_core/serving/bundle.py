"""Building a serving bundle: everything the answers need, in one folder, so a service never
reads the training state or the store.

    model/                 the BoNMF artifact (weights, config, id maps)
    catalog.safetensors    item popularity, users' seen items (CSR), the catalog's content
                           embeddings and their presence masks
    catalog.json           item titles
    encoders/              the content encoders' weights (pretrained source): text/ is a
                           transformers folder, image/ a timm state dict + its preprocessing
    serving.json           bundle version, registry version, metrics + protocol, dataset hash,
                           encoder settings and identities, request limits, the `serving`
                           section (limits, API key file, host)

Build time only: this module reaches the embedding cache (the store, SQLAlchemy) and the
encoders' sources. The runtime that answers from a bundle is `bonmf_core.serving.engine`.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bonmf_core.atomic import atomic_dir
from bonmf_core.config import EncodersConfig, ServingConfig
from bonmf_core.data.dataset import Dataset
from bonmf_core.models.artifacts import load_model
from bonmf_core.models.bonmf import BoNMF
from bonmf_core.serving.engine import BUNDLE_VERSION, CONTENT_MODALITIES


def item_titles(dataset: Dataset) -> list[str]:
    items = dataset.items
    if "title" not in items:
        return [str(i) for i in items["item_id"]]
    return [str(t) if isinstance(t, str) and t else str(i)
            for t, i in zip(items["title"], items["item_id"])]


def write_bundle(out: str | Path, model_dir: str | Path, dataset: Dataset,
                 encoders: EncodersConfig, *, info: dict | None = None,
                 serving: ServingConfig | None = None) -> Path:
    """Write a serving bundle (atomically) for the model in `model_dir`, trained on `dataset`.

    `encoders`: how the catalog was encoded; its content embeddings come through the
    embedding cache (no re-encoding when cached) and the encoders' weights are copied in.
    `info`: registry facts (model version, metrics, protocol, dataset hash, ...) for `metadata`.
    `serving`: the section the bundle records — limits, key file, host (default: the
    schema's).
    A model whose id maps or content features do not match the dataset / encoders is refused.
    """
    from safetensors.torch import save_file

    from bonmf_core.content.features import content_features
    from bonmf_core.data.splits import implicit_pairs, positive_matrix
    from bonmf_core.hashing import sha256_tree

    model, meta, ids = load_model(model_dir)
    _check_ids(ids, dataset, model_dir)
    features, report = content_features(dataset, CONTENT_MODALITIES, encoders)
    _check_model_features(model, features, model_dir)
    pairs = implicit_pairs(dataset)
    seen = positive_matrix(dataset.n_users, dataset.n_items, pairs)
    # Distinct users per item: the popularity fallback's ranking.
    popularity = np.bincount(pairs["item"].to_numpy(), minlength=dataset.n_items
                             ).astype(np.float32)
    tensors = {"popularity": torch.from_numpy(popularity),
               "seen_indptr": torch.from_numpy(seen.indptr.astype(np.int64)),
               "seen_items": torch.from_numpy(seen.indices.astype(np.int64))}
    for m, mat in features.items():
        mat = np.ascontiguousarray(mat, np.float32)
        tensors[f"content_{m}"] = torch.from_numpy(mat)
        tensors[f"present_{m}"] = torch.from_numpy(np.abs(mat).sum(1) > 0)
    limits = (serving or ServingConfig()).model_dump()
    out = Path(out)
    with atomic_dir(out) as tmp:
        shutil.copytree(model_dir, tmp / "model")
        save_file(tensors, str(tmp / "catalog.safetensors"))
        (tmp / "catalog.json").write_text(json.dumps({"titles": item_titles(dataset)}))
        info_json = {
            "bundle_version": BUNDLE_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_artifact_sha256": sha256_tree(model_dir),
            "variant": meta.get("variant"), "modalities": list(model.config.modalities),
            "dataset": {"name": dataset.name, "content_hash": dataset.content_hash(),
                        "users": dataset.n_users, "items": dataset.n_items},
            "encoders": _copy_encoders(encoders, tmp / "encoders"), "content": report,
            "limits": {k: v for k, v in limits.items() if k.startswith("max_")},
            "serving": limits,  # the whole section: the Bento's key file and host too
            **(info or {})}
        (tmp / "serving.json").write_text(json.dumps(info_json, indent=2, default=str))
    return out


def _check_ids(ids: dict, dataset: Dataset, model_dir) -> None:
    if ids["item_ids"] != [str(i) for i in dataset.item_ids] or \
            ids["user_ids"] != [str(u) for u in dataset.user_ids]:
        raise ValueError(f"{model_dir}: the model's id maps do not match dataset "
                         f"{dataset.name!r} ({dataset.n_users} users, {dataset.n_items} items): "
                         f"package it with the dataset it was trained on")


def _check_model_features(model: BoNMF, features: dict, model_dir) -> None:
    """A content model must have been trained on the vectors the packaged encoders produce:
    otherwise a new item's embedding would land in another space than the catalog's."""
    for m in model.config.modalities:
        if m == "id":
            continue
        trained = getattr(model, f"feat_{m}").numpy()
        ours = features[m]
        if trained.shape != ours.shape or not np.allclose(trained, ours, atol=1e-3):
            raise ValueError(f"{model_dir}: the model's {m} features differ from what the "
                             f"configured encoders produce for this catalog (params "
                             f"'encoders'): package with the encoder settings it was trained with")


def _copy_encoders(encoders: EncodersConfig, folder: Path) -> dict:
    """Copy the pretrained encoders' weights into the bundle → the settings to load them."""
    from bonmf_core.content.catalog import identity_for

    if encoders.source == "basic":
        return {"source": "basic", "text_fields": list(encoders.text_fields),
                "text_separator": encoders.text_separator}
    config = {"source": "pretrained", "text_max_length": encoders.text_max_length,
              "text_fields": list(encoders.text_fields),
              "text_separator": encoders.text_separator, "image_model": encoders.image_model,
              "identity": {k: identity_for(k, encoders) for k in CONTENT_MODALITIES}}
    config["text_model"] = _copy_text_model(encoders.text_model, folder / "text")
    config["image_weights"], config["image_data_config"] = _save_image_weights(
        encoders.image_model, encoders.image_weights, folder / "image")
    return config


def _copy_text_model(model: str, dest: Path) -> str:
    from bonmf_core.content.encoders import default_text_model_path

    path = default_text_model_path() if model == "default" else Path(model)
    if not path.exists():  # a hub name: the serving machine resolves it (cache or network)
        return model
    shutil.copytree(path, dest, ignore=shutil.ignore_patterns("*.onnx", "*.h5", "*.msgpack",
                                                              "*.ot", "onnx", "openvino"))
    return "encoders/text"


def _save_image_weights(model: str, weights: str, dest: Path) -> tuple[str, dict]:
    """The image backbone's weights as a timm-native safetensors file (whatever the source
    format: the packaged lite0 file maps by order) and its preprocessing config."""
    from safetensors.torch import save_file

    from bonmf_core.content.encoders import ImageEncoder

    encoder = ImageEncoder(model, weights=weights, device="cpu", precision="fp32",
                           fold_batchnorm=False)
    dest.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(dest / "weights.safetensors"))
    return "encoders/image/weights.safetensors", encoder.preprocessing()
