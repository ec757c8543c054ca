"""Content matrices by configuration: pretrained (through the cache) or weight-free.

The weight-free featurizers need no pretrained weights.

They give every dataset usable `text` and `image` matrices at once (hashed bag of words; a
tiny colour thumbnail plus colour statistics). The pretrained transformer / vision encoders
replace them where configured; the model takes any feature matrix aligned with the item index.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonmf_core.config import EncodersConfig
from bonmf_core.content.text import compose_item_texts
from bonmf_core.data.dataset import Dataset
from bonmf_core.hashing import sha256_json

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
        if not isinstance(path, str) or not path:   # None, or NaN from a parquet round trip
            continue
        try:
            with Image.open(path) as img:
                img.draft("RGB", (4 * size, 4 * size))   # JPEGs decode small: cheaper
                img = img.convert("RGB")
                rgb = np.asarray(img, np.float32) / 255.0
                thumb = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            continue   # a bomb counts as unreadable, as in the data checks
        stats = np.concatenate([rgb.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).std(0)])
        out[row] = np.concatenate([thumb.ravel(), stats])
        present[row] = True
    return out, present


def basic_content_features(dataset: Dataset, modalities, encoders: EncodersConfig
                           ) -> tuple[dict[str, np.ndarray], dict]:
    """Weight-free feature matrices for the requested content modalities, and what produced
    them. Matrices the dataset already carries (e.g. from the pretrained encoders) win. The
    text is the one the text encoder would read (`encoders.text_fields`)."""
    features, report = _carried(dataset, modalities)
    for m in modalities:
        if m == "id" or m in features:
            continue
        if m == "text":
            features[m] = hashed_bag_of_words(compose_item_texts(
                dataset.items, encoders.text_fields, encoders.text_separator))
            report[m] = {"source": "hashed_bag_of_words", "dim": features[m].shape[1]}
        elif m == "image":
            paths = dataset.items["image_path"].tolist()
            features[m], present = tiny_image_features(paths)
            report[m] = {"source": "tiny_image_features", "dim": features[m].shape[1],
                         "images_missing_or_unreadable": int((~present).sum())}
        else:
            raise ValueError(f"unknown modality {m!r}")
    return features, report


def _carried(dataset: Dataset, modalities) -> tuple[dict, dict]:
    """The matrices the dataset already carries for `modalities` (they win over encoding)."""
    features = {m: dataset.features[m].astype(np.float32) for m in modalities
                if m != "id" and m in dataset.features}
    return features, {m: {"source": "dataset", "dim": int(f.shape[1])}
                      for m, f in features.items()}


@dataclass
class Features:
    """One modality's content matrix, which items had content, and what produced it."""

    modality: str
    vectors: np.ndarray
    present: np.ndarray
    manifest: dict
    key: str            # encoder + settings, short hash: names the saved matrix

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(self.vectors, dtype=np.float32), allow_pickle=False)
        return path


def encode_modality(dataset: Dataset, modality: str, encoders: EncodersConfig) -> Features:
    """The catalog's `modality` ('text' | 'image') as `encoders` says: `pretrained` through
    the embedding cache in the store at `encoders.store_url` (only changed items are
    encoded), or the weight-free `basic` featurizers."""
    if encoders.source == "basic":
        matrices, report = basic_content_features(dataset, [modality], encoders)
        vectors = matrices[modality]
        present = np.abs(vectors).sum(1) > 0
        manifest = {"encoder": f"basic-{modality}", "dim": int(vectors.shape[1]),
                    "items": len(vectors), **report.get(modality, {})}
    else:
        from bonmf_core.content.catalog import encode_catalog
        from bonmf_core.store.database import Store

        store = Store(encoders.store_url)
        try:
            encoded = encode_catalog(dataset, store, encoders, (modality,))[modality]
        finally:
            store.dispose()
        vectors, present, manifest = encoded.vectors, encoded.present, encoded.manifest
    key = sha256_json([manifest.get("encoder"), encoders.model_dump(mode="json")])[:12]
    return Features(modality, vectors, np.asarray(present, dtype=bool), manifest, key)


def content_features(dataset: Dataset, modalities, encoders: EncodersConfig
                     ) -> tuple[dict[str, np.ndarray], dict]:
    """Content matrices for `modalities` as `encoders` configures them (matrices the dataset
    already carries win), and per modality what produced them."""
    features, report = _carried(dataset, modalities)
    for m in modalities:
        if m == "id" or m in features:
            continue
        encoded = encode_modality(dataset, m, encoders)
        features[m] = encoded.vectors
        # the basic featurizers name themselves; the pretrained path is named by its encoder
        report[m] = {"source": encoded.manifest.get("source", encoders.source), **{k: v for k, v in encoded.manifest.items()
                                                    if k in REPORTED}}
    return features, report


REPORTED = ("encoder", "dim", "items", "present", "missing", "unreadable", "encoded_now",
            "cache_hits", "images_missing_or_unreadable")
