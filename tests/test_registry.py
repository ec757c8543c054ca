"""Registry, promotion gate and raw snapshots: real SQLite, no Dagster."""

import json

import numpy as np
import pytest
from PIL import Image

from bonmf_core.ops import registry
from bonmf_core.config import ConfigError, DataConfig, PromotionConfig, load_config
from bonmf_core.ops.promotion import decide
from bonmf_core.data.snapshot import (dataset_from_raw, load_snapshot, raw_tables_from_dataset,
                                 read_raw_movielens, save_snapshot, source_fingerprint)
from bonmf_core.store.database import Store

GATE = PromotionConfig(primary_metric="ndcg@10", min_improvement=0.01,
                  floors={"hr@10": 0.3, "ndcg@10": 0.1}, beat_baselines=True)


# -- the gate as a pure function ---------------------------------------------------------------

def test_gate_promotes_first_candidate_that_passes_floors_and_baselines():
    d = decide({"hr@10": 0.6, "ndcg@10": 0.35}, None, GATE, {"pop": {"ndcg@10": 0.2}})
    assert d.decision == "promote" and d.promoted and "no production model" in d.reason
    assert d.compared["floors"]["hr@10"]["ok"] and d.compared["baselines"] == {"pop": 0.2}


@pytest.mark.parametrize("candidate, production, baselines, why", [
    ({"hr@10": 0.25, "ndcg@10": 0.35}, None, {}, "hr@10 0.2500 below the floor 0.3"),
    ({"hr@10": 0.6, "ndcg@10": 0.15}, None, {"bpr": {"ndcg@10": 0.2}}, "does not beat the baseline bpr"),
    ({"hr@10": 0.6, "ndcg@10": 0.355}, {"ndcg@10": 0.35}, {}, "does not beat production 0.3500 by the margin 0.01"),
    ({"hr@10": 0.6, "ndcg@10": 0.30}, {"ndcg@10": 0.35}, {}, "does not beat production"),
])
def test_gate_holds_with_the_reason(candidate, production, baselines, why):
    d = decide(candidate, production, GATE, baselines)
    assert d.decision == "hold" and not d.promoted
    assert why in d.reason


def test_gate_promotes_a_better_candidate_and_can_be_forced():
    better = decide({"hr@10": 0.6, "ndcg@10": 0.40}, {"ndcg@10": 0.35}, GATE)
    assert better.decision == "promote" and better.compared["improvement"] == pytest.approx(0.05)
    forced = decide({"hr@10": 0.1, "ndcg@10": 0.05}, {"ndcg@10": 0.35}, GATE, force=True,
                    forced_by="alice")
    assert forced.decision == "forced" and forced.promoted
    assert "alice" in forced.reason and "below the floor" in forced.reason


def test_gate_config_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="promotion.margin: unknown key"):
        load_config(flags={"promotion": {"margin": 0.1}}, use_default_file=False)


# -- the registry over a real SQLite store -----------------------------------------------------

def _artifact(path, payload: str):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(payload)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'reg.db'}")
    yield s
    s.dispose()


def _register(store, tmp_path, name, ndcg):
    return registry.register_model(
        store, artifact_path=_artifact(tmp_path / name, name), variant="text+image", seed=0,
        dataset_hash="d1", config={"train": {"epochs": 1}},
        metrics={"mean": {"ndcg@10": ndcg, "hr@10": 0.6}}, protocol={"name": "ncf"},
        code="test")


def test_register_is_idempotent_by_artifact_content(store, tmp_path):
    v1, created = _register(store, tmp_path, "a", 0.3)
    assert created and v1["stage"] == "candidate" and v1["metrics"]["mean"]["ndcg@10"] == 0.3
    again, created = registry.register_model(
        store, artifact_path=tmp_path / "a", variant="x", seed=1, dataset_hash="d2", config={},
        metrics={}, protocol={}, code="test")
    assert not created and again["id"] == v1["id"]
    assert len(registry.list_models(store)) == 1


def test_v1_store_migrates_to_v2_keeping_its_rows(tmp_path):
    """A store written before the bento_tag / dvc_json columns gains them, rows intact."""
    import sqlite3

    from bonmf_core.store.schema import SCHEMA_VERSION

    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = Store(url)
    v1, _ = _register(s, tmp_path, "a", 0.3)
    s.dispose()
    with sqlite3.connect(tmp_path / "old.db") as db:   # make it a v1 database
        db.execute("ALTER TABLE model_versions DROP COLUMN bento_tag")
        db.execute("ALTER TABLE model_versions DROP COLUMN dvc_json")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (1, '2026-01-01')")
    s = Store(url)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 2
        row = registry.get_model(s, v1["id"])
        assert row["artifact_sha256"] == v1["artifact_sha256"] and row["bento_tag"] is None
        assert registry.set_bento_tag(s, v1["id"], "bonmf:abc")["bento_tag"] == "bonmf:abc"
        assert registry.record_dvc_hashes(s, v1["id"], {"data": "md5"})["dvc"] == {"data": "md5"}
        with pytest.raises(KeyError, match="model version 99"):
            registry.set_bento_tag(s, 99, "x")
    finally:
        s.dispose()


def test_promotion_flow_holds_worse_promotes_better(store, tmp_path):
    prod_dir = tmp_path / "production" / "model"
    v1, _ = _register(store, tmp_path, "a", 0.30)
    d = decide(v1["metrics"]["mean"], None, GATE)
    event, created = registry.record_decision(store, v1["id"], decision=d.decision,
                                              reason=d.reason, compared=d.compared,
                                              production_dir=prod_dir)
    assert created and registry.production_model(store)["id"] == v1["id"]
    assert (prod_dir / "model.safetensors").read_text() == "a"
    assert json.loads((prod_dir / "registry.json").read_text())["model_version"] == v1["id"]

    # Same candidate again: nothing new.
    again, created = registry.record_decision(store, v1["id"], decision="promote", reason="x",
                                              compared={}, production_dir=prod_dir)
    assert not created and again["id"] == event["id"]

    # A worse candidate is held; production and its files stay.
    v2, _ = _register(store, tmp_path, "b", 0.25)
    d = decide(v2["metrics"]["mean"], v1["metrics"]["mean"], GATE)
    assert d.decision == "hold"
    registry.record_decision(store, v2["id"], decision=d.decision, reason=d.reason,
                             compared=d.compared, production_id=v1["id"])
    _, created = registry.record_decision(store, v2["id"], decision=d.decision, reason=d.reason,
                                          compared=d.compared, production_id=v1["id"])
    assert not created  # the same hold twice is one event
    assert registry.production_model(store)["id"] == v1["id"]
    assert (prod_dir / "model.safetensors").read_text() == "a"

    # A better one is promoted; the old production model is archived.
    v3, _ = _register(store, tmp_path, "c", 0.40)
    d = decide(v3["metrics"]["mean"], v1["metrics"]["mean"], GATE)
    assert d.decision == "promote"
    registry.record_decision(store, v3["id"], decision=d.decision, reason=d.reason,
                             compared=d.compared, production_id=v1["id"],
                             production_dir=prod_dir)
    stages = {m["id"]: m["stage"] for m in registry.list_models(store)}
    assert stages == {v1["id"]: "archived", v2["id"]: "candidate", v3["id"]: "production"}
    assert (prod_dir / "model.safetensors").read_text() == "c"
    assert [e["decision"] for e in registry.list_events(store)] == ["promote", "hold", "promote"]


def test_snapshot_lifecycle_and_run_failures(store):
    registry.record_snapshot(store, "h1", name="n", source="demo", path="/p", n_users=1,
                             n_items=2, n_interactions=3)
    registry.record_validation(store, "h1", {"passed": True}, True, {"profile": 1})
    registry.accept_snapshot(store, "h1")
    registry.record_snapshot(store, "h2", name="n", source="demo", path="/q", n_users=1,
                             n_items=2, n_interactions=3)
    registry.record_validation(store, "h2", {"passed": False}, False)
    assert registry.get_snapshot(store, "h2")["status"] == "rejected"
    with pytest.raises(ValueError, match="failed its checks"):
        registry.accept_snapshot(store, "h2")
    last = registry.last_accepted_snapshot(store)
    assert last["content_hash"] == "h1" and last["profile"] == {"profile": 1}
    assert registry.last_accepted_snapshot(store, exclude="h1") is None

    row, created = registry.record_run_failure(store, "r1", job_name="retrain", message="boom",
                                               failed_steps=["snapshot_checks"])
    assert created and row["failed_steps"] == ["snapshot_checks"]
    assert registry.record_run_failure(store, "r1", job_name="retrain", message="x")[1] is False


def test_code_version_is_a_git_revision_or_package_version():
    assert registry.code_version()


# -- raw snapshots -----------------------------------------------------------------------------

def write_movielens(folder, ratings=None, broken_posters=()):
    """A tiny MovieLens-1M-format directory (6 users, 8 movies, posters)."""
    folder.mkdir(parents=True)
    rows = ratings or [(u, m, 1 + (u + m) % 5, 978300000 + 60 * (u * 10 + m))
                       for u in range(1, 7) for m in range(1, 9) if (u + m) % 3]
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows))
    (folder / "movies.dat").write_text("".join(
        f"{m}::Movie {m} ({1990 + m})::{'Comedy|Drama' if m % 2 else 'Action'}\n"
        for m in range(1, 9)), encoding="latin-1")
    (folder / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u}::0000{u}\n"
                                              for u in range(1, 7)))
    (folder / "overviews_tmdb.csv").write_text(
        "movieId,tmdb_overview,tmdb_keywords\n" +
        "".join(f"{m},A story about thing {m},kw{m}\n" for m in range(1, 9)))
    posters = folder / "posters"
    posters.mkdir()
    for m in range(1, 9):
        if m in broken_posters:
            (posters / f"{m}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        else:
            Image.fromarray(np.full((12, 8, 3), 30 * m, np.uint8)).save(posters / f"{m}.jpg")
    return folder


def test_lenient_movielens_builds_exactly_what_the_strict_reader_builds(tmp_path):
    from bonmf_core.data.readers import read_movielens

    folder = write_movielens(tmp_path / "ml")
    raw = read_raw_movielens(folder)
    assert raw.interactions["rating"].dtype.kind == "f" and raw.problems == {}
    strict = read_movielens(folder)
    built = dataset_from_raw(raw)
    assert list(built.item_ids) == list(strict.item_ids)
    assert list(built.user_ids) == list(strict.user_ids)
    assert built.content_hash() == strict.content_hash()


def test_lenient_movielens_keeps_bad_values_for_the_checks(tmp_path):
    folder = write_movielens(tmp_path / "ml", ratings=[(1, 1, 5, 978300000), (1, 2, "x", 978300001),
                                                       (2, 99, 9, 978300002)])
    with open(folder / "ratings.dat", "a") as f:
        f.write("3::1::4\n")  # a line with a field missing
    raw = read_raw_movielens(folder)
    assert raw.interactions["rating"].tolist() == ["5", "x", "9"]  # text: not every value parses
    assert "99" in set(raw.interactions["item_id"])
    assert raw.problems == {"ratings.dat": {"malformed_lines": 1, "examples": [
        {"line": 4, "problem": "expected 4 '::'-separated fields, found 3: '3::1::4'"}]}}
    assert raw.origins["interactions"]["lines"].tolist() == [1, 2, 3]


def test_demo_roundtrip_and_snapshot_storage(tmp_path, small_demo):
    raw = raw_tables_from_dataset(small_demo, source="demo")
    assert set(raw.interactions.columns) == {"user_id", "item_id", "rating", "timestamp"}
    assert dataset_from_raw(raw).content_hash() == small_demo.content_hash()
    digest, path = save_snapshot(raw, tmp_path / "snaps")
    assert digest == raw.content_hash() and path.name == digest
    again, _ = save_snapshot(raw_tables_from_dataset(small_demo), tmp_path / "snaps")
    assert again == digest
    loaded = load_snapshot(path)
    assert dataset_from_raw(loaded).content_hash() == small_demo.content_hash()


def test_source_fingerprint_follows_the_data(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    first = source_fingerprint(DataConfig(source=str(folder)))
    assert source_fingerprint(DataConfig(source=str(folder))) == first
    with open(folder / "ratings.dat", "a") as f:
        f.write("6::8::4::978399999\n")
    assert source_fingerprint(DataConfig(source=str(folder))) != first
    assert (source_fingerprint(DataConfig(demo_seed=0, demo_users=10, demo_items=20))
            != source_fingerprint(DataConfig(demo_seed=1, demo_users=10, demo_items=20)))
