"""Lightweight content featurizers that need no pretrained weights.

They give every dataset usable `text` and `image` matrices at once (hashed bag of words; a
tiny colour thumbnail plus colour statistics). The pretrained transformer / vision encoders
replace them where configured; the model takes any feature matrix aligned with the item index.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from .dataset import Dataset

_TOKEN = re.compile(r"[a-z0-9]+")


def hashed_bag_of_words(texts: list[str], dim: int = 512) -> np.ndarray:
    """log(1 + term count) in `dim` hashed buckets (crc32: stable across runs), L2-normalised."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        for token in _TOKEN.findall(text.lower()):
            out[row, zlib.crc32(token.encode()) % dim] += 1.0
    np.log1p(out, out=out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def tiny_image_features(paths: list[str | None], size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An RGB thumbnail (size×size) plus per-channel mean/std, in [0, 1].

    Images are opened by content, not extension. A missing or unreadable image gives a zero
    row and `False` in the returned presence mask; it never raises.
    """
    from PIL import Image, UnidentifiedImageError

    dim = size * size * 3 + 6
    out = np.zeros((len(paths), dim), np.float32)
    present = np.zeros(len(paths), bool)
    for row, path in enumerate(paths):
        if not path:
            continue
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                rgb = np.asarray(img, np.float32) / 255.0
                thumb = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError):
            continue
        stats = np.concatenate([rgb.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).std(0)])
        out[row] = np.concatenate([thumb.ravel(), stats])
        present[row] = True
    return out, present


def basic_content_features(dataset: Dataset, modalities) -> tuple[dict[str, np.ndarray], dict]:
    """Feature matrices for the requested content modalities, and what produced them.

    Matrices the dataset already carries (e.g. from the pretrained encoders) win; otherwise
    the lightweight featurizers above are used.
    """
    features, report = {}, {}
    for m in modalities:
        if m == "id":
            continue
        if m in dataset.features:
            features[m] = dataset.features[m].astype(np.float32)
            report[m] = {"source": "dataset", "dim": int(features[m].shape[1])}
        elif m == "text":
            features[m] = hashed_bag_of_words(dataset.item_text())
            report[m] = {"source": "hashed_bag_of_words", "dim": features[m].shape[1]}
        elif m == "image":
            paths = dataset.items["image_path"].tolist()
            features[m], present = tiny_image_features(paths)
            report[m] = {"source": "tiny_image_features", "dim": features[m].shape[1],
                         "images_missing_or_unreadable": int((~present).sum())}
        else:
            raise ValueError(f"unknown modality {m!r}")
    return features, report


def content_features(dataset: Dataset, modalities, encoders: dict | None = None
                     ) -> tuple[dict[str, np.ndarray], dict]:
    """Content matrices for `modalities` as configured by the params `encoders` section.

    `source: pretrained` encodes the catalog with the transformer / vision encoders through the
    embedding cache (see catalog_encoding); `basic` uses the weight-free featurizers. Matrices
    the dataset already carries win either way.
    """
    encoders = encoders or {"source": "basic"}
    source = encoders.get("source", "pretrained")
    wanted = [m for m in modalities if m != "id" and m not in dataset.features]
    if source == "basic" or not wanted:
        return basic_content_features(dataset, modalities)
    if source != "pretrained":
        raise ValueError(f"encoders.source must be 'pretrained' or 'basic', got {source!r}")
    from .catalog_encoding import EncoderSettings, encode_catalog
    from .store import Store

    store = Store(encoders.get("store_url"))
    try:
        encoded = encode_catalog(dataset, store, EncoderSettings.from_params(encoders), wanted)
    finally:
        store.dispose()
    features, report = basic_content_features(
        dataset, [m for m in modalities if m != "id" and m not in encoded])
    for m, e in encoded.items():
        features[m] = e.vectors
        report[m] = {"source": "pretrained", **{k: e.manifest[k] for k in (
            "encoder", "dim", "items", "present", "missing", "unreadable", "encoded_now",
            "cache_hits")}}
    return features, report
