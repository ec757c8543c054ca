"""Encode an item catalog's text and images once, through the embedding cache.

`encode_catalog` composes each item's text by a template, hashes each item's content (the
composed text; the image file's bytes), looks the hashes up in the cache, encodes only the
misses — loading the encoder only when there are any — and returns per modality a float
matrix aligned with the dataset's item index, a presence mask and a manifest.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bonmf_core.config import EncodersConfig
from bonmf_core.content.text import compose_item_texts
from bonmf_core.data.dataset import Dataset
from bonmf_core.hashing import sha256_bytes, sha256_file_or_none
from bonmf_core.content.embedding_cache import EmbeddingCache, encoder_key as _key
from bonmf_core.content.encoders import (image_identity, image_weights_hash, pick_device, resolve_precision,
                       text_identity, text_weights_hash)
from bonmf_core.store.database import Store

log = logging.getLogger(__name__)


@dataclass
class ModalityEmbeddings:
    vectors: np.ndarray        # (n_items, dim) float32, zero rows where absent
    present: np.ndarray        # (n_items,) bool
    manifest: dict = field(default_factory=dict)


def image_content_hashes(paths) -> list[str | None]:
    """sha256 of each image file's bytes; None where the file is missing or unreadable."""
    with ThreadPoolExecutor(max_workers=4) as pool:  # I/O bound; hashlib releases the GIL
        return list(pool.map(sha256_file_or_none, paths))


def encode_catalog(dataset: Dataset, store: Store | None = None,
                   settings: EncodersConfig | None = None,
                   modalities=("text", "image")) -> dict[str, ModalityEmbeddings]:
    """Text and/or image embeddings of every catalog item, through the cache (`settings`:
    the `encoders` section; None = its defaults)."""
    settings = settings or EncodersConfig()
    cache = EmbeddingCache(store or Store())
    out = {}
    for modality in modalities:
        if modality == "text":
            texts = compose_item_texts(dataset.items, settings.text_fields, settings.text_separator)
            hashes = [sha256_bytes(t.encode()) if t else None for t in texts]
            out["text"] = _encode_modality("text", texts, hashes, cache, settings)
        elif modality == "image":
            paths = dataset.items["image_path"].tolist() if "image_path" in dataset.items else []
            paths = [p if isinstance(p, str) else None for p in paths] or [None] * dataset.n_items
            out["image"] = _encode_modality("image", paths, image_content_hashes(paths), cache,
                                            settings)
        else:
            raise ValueError(f"unknown modality {modality!r} (text, image)")
    return out


def with_content_features(dataset: Dataset, embeddings: dict[str, ModalityEmbeddings]) -> Dataset:
    """The dataset with the embedding matrices as its content features (same data otherwise)."""
    features = {**dataset.features, **{m: e.vectors for m, e in embeddings.items()}}
    return Dataset(name=dataset.name, interactions=dataset.interactions, items=dataset.items,
                   users=dataset.users, rating_scale=dataset.rating_scale, features=features)


def identity_for(kind: str, settings: EncodersConfig) -> dict:
    """The cache identity of the configured encoder, computed without loading it."""
    precision = resolve_precision(pick_device(settings.device), settings.precision)
    if kind == "text":
        name, weights = text_weights_hash(settings.text_model)
        return text_identity(name, weights, settings.text_max_length, precision)
    return image_identity(settings.image_model,
                          image_weights_hash(settings.image_model, settings.image_weights),
                          precision)


def _load_encoder(kind: str, settings: EncodersConfig):
    from bonmf_core.content.encoders import ImageEncoder, TextEncoder

    if kind == "text":
        return TextEncoder(settings.text_model, device=settings.device,
                           batch_size=settings.batch_size, max_length=settings.text_max_length,
                           precision=settings.precision)
    return ImageEncoder(settings.image_model, weights=settings.image_weights,
                        device=settings.device, batch_size=settings.batch_size,
                        workers=settings.image_workers, precision=settings.precision)


def _encode_modality(kind: str, contents: list, hashes: list[str | None], cache: EmbeddingCache,
                     settings: EncodersConfig) -> ModalityEmbeddings:
    started = time.perf_counter()
    identity = identity_for(kind, settings)
    key = _key(identity)
    known = cache.encoder(identity)
    found = cache.get_many(key, [h for h in hashes if h]) if known else {}
    first_of = {}
    for row, h in enumerate(hashes):
        if h and h not in found:
            first_of.setdefault(h, row)
    encoded_now, encode_s, encoder = 0, 0.0, None
    if first_of or known is None:
        encoder = _load_encoder(kind, settings)
        key = cache.register(identity, encoder.dim,
                             encoder.preprocessing() if kind == "image" else
                             {"text_fields": list(settings.text_fields),
                              "separator": settings.text_separator})
        known = cache.encoder(identity)
        t0 = time.perf_counter()
        encoded_now = _encode_misses(kind, encoder, contents, first_of, cache, key, found,
                                     settings.write_chunk)
        encode_s = time.perf_counter() - t0
    dim = known["dim"]
    vectors = np.zeros((len(hashes), dim), np.float32)
    present = np.zeros(len(hashes), bool)
    for row, h in enumerate(hashes):
        if h and h in found:
            vector, ok = found[h]
            present[row] = ok
            if ok:
                vectors[row] = vector
    n_missing = sum(h is None for h in hashes)
    manifest = {
        "encoder": identity, "encoder_key": key, "dim": dim,
        "preprocessing": known["preprocessing"],
        "device": str(pick_device(settings.device)),
        "items": len(hashes), "present": int(present.sum()),
        "missing": n_missing,                                  # no text / no image file
        "unreadable": int(len(hashes) - n_missing - present.sum()),  # e.g. corrupt image
        "encoded_now": encoded_now, "cache_hits": int(len(hashes) - n_missing - len(first_of)),
        "encode_s": encode_s, "items_per_s": encoded_now / encode_s if encode_s else None,
        "seconds": time.perf_counter() - started,
    }
    log.info("%s: %d items, %d encoded now, %d from cache, %d missing, %d unreadable (%.1fs)",
             kind, len(hashes), encoded_now, manifest["cache_hits"], n_missing,
             manifest["unreadable"], manifest["seconds"])
    return ModalityEmbeddings(vectors, present, manifest)


def _encode_misses(kind, encoder, contents, first_of: dict[str, int], cache: EmbeddingCache,
                   key: str, found: dict, chunk: int) -> int:
    """Encode each missing content once; commit to the cache every `chunk` vectors."""
    miss_hashes = list(first_of)
    miss_contents = [contents[first_of[h]] for h in miss_hashes]
    buffer_h, buffer_v, buffer_p = [], [], []

    def flush():
        if buffer_h:
            cache.put_many(key, buffer_h, np.stack(buffer_v), buffer_p)
            buffer_h.clear(), buffer_v.clear(), buffer_p.clear()

    for batch in encoder.iter_batches(miss_contents):
        if kind == "text":
            rows, vectors = batch
            ok = np.ones(len(rows), bool)
        else:
            rows, readable_vectors, ok = batch
            vectors = np.zeros((len(rows), encoder.dim), np.float32)
            vectors[ok] = readable_vectors
        for r, v, p in zip(rows, vectors, ok):
            h = miss_hashes[r]
            found[h] = (v, bool(p))
            buffer_h.append(h), buffer_v.append(v), buffer_p.append(bool(p))
        if len(buffer_h) >= chunk:
            flush()
    flush()
    return len(miss_hashes)
