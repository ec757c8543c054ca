"""Catalog encoding through the SQLAlchemy embedding cache: hits, invalidation, concurrency."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonmf_core.config import ConfigError, EncodersConfig, load_config
from bonmf_core.content.text import compose_item_texts
from bonmf_core.content.catalog import (encode_catalog,
                                         with_content_features)
from bonmf_core.data.dataset import Dataset
from bonmf_core.content.embedding_cache import EmbeddingCache
from bonmf_core.store.schema import SCHEMA_VERSION, SchemaVersion
from bonmf_core.store.database import Store, StoreVersionError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = EncodersConfig(device="cpu", batch_size=8, image_workers=0)


def tiny(small_demo, n_items=24, **item_changes) -> Dataset:
    items = small_demo.items.iloc[:n_items].copy().reset_index(drop=True)
    for column, (row, value) in item_changes.items():
        items.loc[row, column] = value
    inter = small_demo.interactions[small_demo.interactions["item"] < n_items]
    return Dataset("tiny", inter.reset_index(drop=True), items, small_demo.users)


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.dispose()


def test_text_template_skips_absent_fields_and_reads_genres_as_words():
    items = pd.DataFrame({"item_id": ["1", "2"], "title": ["Heat", "Up"],
                          "genres": ["Action|Crime", ""], "overview": [None, "A balloon."]})
    fields = EncodersConfig().text_fields
    assert compose_item_texts(items, fields, " | ") == ["Heat | Action, Crime", "Up | A balloon."]
    assert compose_item_texts(items, ("overview", "title"), " / ") == ["Heat", "A balloon. / Up"]


def test_second_run_encodes_nothing_and_returns_the_same_vectors(small_demo, store):
    data = tiny(small_demo)
    first = encode_catalog(data, store, SETTINGS)
    for modality in ("text", "image"):
        m = first[modality].manifest
        assert m["encoded_now"] == 24 and m["cache_hits"] == 0 and m["present"] == 24
    assert first["text"].vectors.shape == (24, 384) and first["image"].vectors.shape == (24, 1280)
    np.testing.assert_allclose(np.linalg.norm(first["text"].vectors, axis=1), 1.0, atol=1e-5)

    second = encode_catalog(data, store, SETTINGS)
    for modality in ("text", "image"):
        assert second[modality].manifest["encoded_now"] == 0
        assert second[modality].manifest["cache_hits"] == 24
        np.testing.assert_array_equal(second[modality].vectors, first[modality].vectors)
    assert second["image"].manifest["preprocessing"]["input_size"] == [3, 224, 224]
    enriched = with_content_features(data, second)
    assert set(enriched.features) == {"text", "image"} and enriched.content_hash() == data.content_hash()


def test_changing_one_items_text_reencodes_only_that_text(small_demo, store):
    encode_catalog(tiny(small_demo), store, SETTINGS)
    changed = tiny(small_demo, title=(3, "A completely new title"))
    out = encode_catalog(changed, store, SETTINGS)
    assert out["text"].manifest["encoded_now"] == 1
    assert out["image"].manifest["encoded_now"] == 0


def test_changing_the_encoder_invalidates_only_its_entries(small_demo, store):
    data = tiny(small_demo)
    first = encode_catalog(data, store, SETTINGS)
    cache = EmbeddingCache(store)
    before = cache.count()
    shorter = EncodersConfig(device="cpu", batch_size=8, image_workers=0, text_max_length=16)
    out = encode_catalog(data, store, shorter)
    assert out["text"].manifest["encoded_now"] == 24            # new text encoder identity
    assert out["image"].manifest["encoded_now"] == 0            # image encoder unchanged
    assert out["text"].manifest["encoder_key"] != first["text"].manifest["encoder_key"]
    assert cache.count() == before + 24                          # old entries kept
    again = encode_catalog(data, store, SETTINGS)                # the old encoder still hits
    assert again["text"].manifest["encoded_now"] == 0


def test_missing_and_corrupt_images_are_masked_and_counted(small_demo, store, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    data = tiny(small_demo, n_items=6, image_path=(1, str(corrupt)))
    data.items.loc[2, "image_path"] = str(tmp_path / "gone.png")
    out = encode_catalog(data, store, SETTINGS, modalities=("image",))
    m = out["image"].manifest
    assert (m["missing"], m["unreadable"], m["present"]) == (1, 1, 4)
    assert out["image"].present.tolist() == [True, False, False, True, True, True]
    assert not out["image"].vectors[1:3].any()
    # The corrupt file's failure is cached by its bytes: not retried on the next run.
    assert encode_catalog(data, store, SETTINGS, modalities=("image",))["image"].manifest[
        "encoded_now"] == 0


_WORKER = """
import sys, os
import numpy as np
from bonmf_core.config import EncodersConfig
from bonmf_core.content.catalog import encode_catalog
from bonmf_core.data.demo import demo_dataset
from bonmf_core.content.embedding_cache import EmbeddingCache
from bonmf_core.store.database import Store

url, crash_after, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = demo_dataset(seed=0, n_users=100, n_items=40, image_dir=sys.argv[4])
if crash_after:  # die like a killed process after this many committed chunks
    original, calls = EmbeddingCache.put_many, []
    def put_then_maybe_die(self, *args, **kwargs):
        n = original(self, *args, **kwargs)
        calls.append(n)
        if len(calls) >= crash_after:
            os._exit(9)
        return n
    EmbeddingCache.put_many = put_then_maybe_die
settings = EncodersConfig(device="cpu", batch_size=4, image_workers=0, write_chunk=8)
result = encode_catalog(data, Store(url), settings, modalities=("text",))
np.save(out, result["text"].vectors)
"""


def _worker(tmp_path, url, crash_after, name):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), url, str(crash_after),
                             str(tmp_path / f"{name}.npy"), str(tmp_path / "img")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_concurrent_writers_and_a_crash_leave_a_consistent_cache(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store(url).dispose()
    crashed = _worker(tmp_path, url, 2, "crashed")
    assert crashed.wait(300) == 9, crashed.stdout.read().decode()[-2000:]
    store = Store(url)
    assert EmbeddingCache(store).count() == 16    # two committed chunks of 8, nothing partial

    a, b = _worker(tmp_path, url, 0, "a"), _worker(tmp_path, url, 0, "b")
    for proc in (a, b):
        assert proc.wait(300) == 0, proc.stdout.read().decode()[-2000:]
    assert EmbeddingCache(store).count() == 40    # each vector stored once
    va, vb = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_array_equal(va, vb)
    assert (np.abs(np.linalg.norm(va, axis=1) - 1) < 1e-5).all()
    store.dispose()


def test_schema_version_recorded_and_newer_database_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    store = Store(url)
    assert store.schema_version() == SCHEMA_VERSION
    Store(url).dispose()                                   # reopening is idempotent
    with store.session() as s:
        s.add(SchemaVersion(version=SCHEMA_VERSION + 1))
    with pytest.raises(StoreVersionError, match="upgrade"):
        Store(url)
    store.dispose()


def test_unknown_encoder_setting_refused():
    with pytest.raises(ConfigError, match="encoders.text_modle: unknown key"):
        load_config(sets=["encoders.text_modle=x"], use_default_file=False)
    assert load_config(sets=["encoders.text_fields=[title]"],
                       use_default_file=False).encoders.text_fields == ["title"]


def test_cold_items_recommended_through_pretrained_content(small_demo, store):
    """BoNMF text+image on encoder vectors ranks never-seen items far above chance."""
    from bonmf_core.evaluation.evaluator import evaluate
    from bonmf_core.experiment.variants import fit_variant
    from bonmf_core.data.splits import cold_item_split

    data = with_content_features(small_demo, encode_catalog(small_demo, store, SETTINGS))
    split = cold_item_split(data, seed=0)
    params = load_config(flags={"train": {"epochs": 6, "refit": False}}, use_default_file=False)  # small data: small batches
    model, _ = fit_variant("text+image", data, split, params, 0, data.features)
    got = evaluate(model, split, "test", (10,))
    # Chance: a random top 10 of the cold candidates holds 10/|candidates| of a user's items.
    chance = 10 / len(split.cold_test_items)
    assert got["recall@10"] > 3 * chance, (got, chance)
