"""The metadata store, the embedding cache, the schema migration, a whole `bonmf run` and
Dagster's own instance storage on a real PostgreSQL server (`pg_server.py`: pgserver's binaries
on a free loopback port, stopped at the end of the session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from bonmf_core.content.embedding_cache import EmbeddingCache
from bonmf_core.ops import registry
from bonmf_core.store.database import Store, StoreUnavailableError, StoreVersionError
from bonmf_core.store.schema import SCHEMA_VERSION, SchemaVersion
from pg_server import postgres  # noqa: F401  (the session-scoped server fixture)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def pg_url(postgres):  # noqa: F811
    """A fresh database on the session's server, per test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture()
def store(pg_url):
    s = Store(pg_url)
    assert s.dialect == "postgresql"
    yield s
    s.dispose()


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1",
            **extra}


# -- the registry ------------------------------------------------------------------------------

def _artifact(path: Path, payload: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(payload)
    (path / "config.json").write_text("{}")
    return path


def _register(store, tmp_path, name, ndcg):
    return registry.register_model(
        store, artifact_path=_artifact(tmp_path / name, name), variant="text+image", seed=0,
        dataset_hash="d1", config={"train": {"epochs": 1}},
        metrics={"mean": {"ndcg@10": ndcg, "hr@10": 0.6}}, protocol={"name": "ncf"},
        code="test", run_id=str(uuid.uuid4()))


def test_snapshots_on_postgres_move_pending_validated_accepted(store):
    for n, name in enumerate(("first", "second", "bad")):
        registry.record_snapshot(store, name * 4, name=name, source="demo", path=f"/s/{name}",
                                 n_users=10 + n, n_items=5, n_interactions=50)
    again = registry.record_snapshot(store, "first" * 4, name="other", source="x", path="/y",
                                     n_users=1, n_items=1, n_interactions=1)
    assert again["name"] == "first" and again["status"] == "pending"   # returned unchanged
    registry.record_validation(store, "first" * 4, {"checks": []}, True, {"n_items": 5})
    registry.accept_snapshot(store, "first" * 4)
    registry.record_validation(store, "second" * 4, {"checks": []}, True, {"n_items": 6})
    accepted = registry.accept_snapshot(store, "second" * 4)
    assert accepted["accepted_at"].tzinfo is not None   # TIMESTAMPTZ round-trips as aware
    registry.record_validation(store, "bad" * 4, {"checks": [{"name": "x", "passed": False}]},
                               False)
    with pytest.raises(ValueError, match="failed its checks"):
        registry.accept_snapshot(store, "bad" * 4)
    assert registry.last_accepted_snapshot(store)["content_hash"] == "second" * 4
    assert registry.last_accepted_snapshot(store, exclude="second" * 4)["profile"] == {
        "n_items": 5}
    # NULLS LAST on PostgreSQL: the latest validated snapshot, not a never-validated one.
    registry.record_snapshot(store, "fresh" * 4, name="fresh", source="demo", path="/f",
                             n_users=1, n_items=1, n_interactions=1)
    assert registry.latest_snapshot(store)["content_hash"] == "bad" * 4
    assert [s["status"] for s in registry.list_snapshots(store)] == [
        "accepted", "accepted", "rejected", "pending"]


def test_registry_on_postgres_registers_promotes_and_archives(store, tmp_path):
    v1, created = _register(store, tmp_path, "a", 0.30)
    assert created and v1["stage"] == "candidate" and isinstance(v1["id"], int)
    same, created = registry.register_model(
        store, artifact_path=tmp_path / "a", variant="x", seed=1, dataset_hash="d2",
        config={}, metrics={}, protocol={}, code="test")
    assert not created and same["id"] == v1["id"]
    prod_dir = tmp_path / "production" / "model"
    event, created = registry.record_decision(store, v1["id"], decision="promote", reason="first",
                                              compared={"improvement": None},
                                              production_dir=prod_dir)
    assert created and registry.production_model(store)["id"] == v1["id"]
    assert json.loads((prod_dir / "registry.json").read_text())["model_version"] == v1["id"]
    _, created = registry.record_decision(store, v1["id"], decision="promote", reason="again",
                                          compared={})
    assert not created                                   # idempotent

    v2, _ = _register(store, tmp_path, "b", 0.40)
    registry.record_decision(store, v2["id"], decision="promote", reason="better",
                             compared={"improvement": 0.1}, production_id=v1["id"])
    stages = {m["id"]: m["stage"] for m in registry.list_models(store)}
    assert stages == {v1["id"]: "archived", v2["id"]: "production"}   # one in production
    v3, _ = _register(store, tmp_path, "c", 0.10)
    held, _ = registry.record_decision(store, v3["id"], decision="hold", reason="worse",
                                       compared={}, production_id=v2["id"])
    assert registry.latest_event(store)["id"] == held["id"]
    assert [e["decision"] for e in registry.list_events(store)] == ["promote", "promote", "hold"]

    assert registry.set_bento_tag(store, v2["id"], "bonmf:abc")["bento_tag"] == "bonmf:abc"
    assert registry.record_dvc_hashes(store, v2["id"], {"model": "md5"})["dvc"] == {"model": "md5"}
    with pytest.raises(KeyError, match="model version 999"):
        registry.set_bento_tag(store, 999, "x")
    with pytest.raises(ValueError, match="promote, hold or forced"):
        registry.record_decision(store, v3["id"], decision="maybe", reason="", compared={})


def test_run_failures_on_postgres_are_recorded_once(store):
    row, created = registry.record_run_failure(store, "run-1", job_name="retrain",
                                               message="x" * 30_000, failed_steps=["train"],
                                               tags={"bonmf/trigger": "cli"})
    assert created and len(row["message"]) == 20_000 and row["failed_steps"] == ["train"]
    _, created = registry.record_run_failure(store, "run-1", job_name="retrain", message="again")
    assert not created and len(registry.list_run_failures(store)) == 1


# -- the embedding cache with concurrent writers -----------------------------------------------

IDENTITY = {"kind": "text", "name": "test-encoder", "weights": "w1", "max_length": 8}
DIM, SHARED, OWN, CHUNK, ROUNDS, WRITERS = 8, 1200, 100, 400, 4, 4


def identity(round_: int) -> dict:
    return {**IDENTITY, "round": round_}


def all_keys() -> list[str]:
    return [f"shared-{i}" for i in range(SHARED)] + [
        f"own{w}-{i}" for w in range(WRITERS) for i in range(OWN)]


def expected_vector(content_hash: str) -> np.ndarray:
    """The vector every writer stores for a hash: the same key always means the same bytes."""
    seed = int(content_hash.split("-")[-1]) + 7919 * len(content_hash)
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def cache_writer(url: str, worker: int, go_file: str) -> None:
    """One writer process, released together with the others: per round a new encoder (all
    writers register it at once), then the shared keys in this writer's own order plus keys
    only it writes, in chunked transactions."""
    import time

    store = Store(url)
    cache = EmbeddingCache(store)
    while not os.path.exists(go_file):
        time.sleep(0.005)
    for round_ in range(ROUNDS):
        keys = [f"shared-{i}" for i in range(SHARED)] + [f"own{worker}-{i}" for i in range(OWN)]
        np.random.default_rng(worker * 100 + round_).shuffle(keys)
        key = cache.register(identity(round_), DIM, {"fields": ["title"]})
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start:start + CHUNK]
            cache.put_many(key, chunk, np.stack([expected_vector(h) for h in chunk]))
        assert set(cache.get_many(key, keys)) == set(keys), "a writer misses its own rows"
    store.dispose()


def _writer(url: str, worker: int, go_file: Path) -> subprocess.Popen:
    code = ("import sys; from test_postgres import cache_writer; "
            "cache_writer(sys.argv[1], int(sys.argv[2]), sys.argv[3])")
    return subprocess.Popen([sys.executable, "-c", code, url, str(worker), str(go_file)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_concurrent_cache_writers_lose_and_duplicate_nothing(pg_url, tmp_path):
    """Writer processes register the same encoders and write overlapping keys in different
    orders at the same time: none fails (no unique violation, no deadlock), and each
    (encoder, hash) is stored once with its exact bytes."""
    go = tmp_path / "go"
    Store(pg_url).dispose()                       # the schema exists before the race starts
    procs = [_writer(pg_url, w, go) for w in range(WRITERS)]
    go.touch()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    every = all_keys()
    assert _rows(pg_url, "SELECT count(*) FROM encoders") == [(ROUNDS,)]
    assert _rows(pg_url, "SELECT encoder_key, content_hash FROM embeddings GROUP BY 1, 2 "
                         "HAVING count(*) > 1") == []
    store = Store(pg_url)
    try:
        cache = EmbeddingCache(store)
        assert cache.count() == ROUNDS * len(every)
        for round_ in range(ROUNDS):
            key = cache.register(identity(round_), DIM)
            got = cache.get_many(key, every)
            assert len(got) == cache.count(key) == len(every)
            for h in every:
                vector, present = got[h]
                assert present and np.array_equal(vector, expected_vector(h)), (round_, h)
        assert cache.encoder(identity(0)) == {"dim": DIM, "preprocessing": {"fields": ["title"]}}
        # A rewrite of existing keys adds nothing and keeps the first bytes.
        key = cache.register(identity(0), DIM)
        cache.put_many(key, every[:5], np.zeros((5, DIM), np.float32))
        assert cache.count(key) == len(every)
        assert np.array_equal(cache.get_many(key, every[:1])[every[0]][0],
                              expected_vector(every[0]))
    finally:
        store.dispose()


# -- the schema migration ----------------------------------------------------------------------

def test_v1_postgres_store_is_upgraded_in_place(pg_url, tmp_path):
    """A store written before model_versions.bento_tag / dvc_json gains them, rows intact."""
    s = Store(pg_url)
    v1, _ = _register(s, tmp_path, "a", 0.3)
    s.dispose()
    engine = create_engine(pg_url)
    with engine.begin() as conn:   # make it a v1 database, as the first release wrote it
        conn.execute(text("ALTER TABLE model_versions DROP COLUMN bento_tag, DROP COLUMN dvc_json"))
        conn.execute(text("DELETE FROM schema_version"))
        conn.execute(text("INSERT INTO schema_version (version, applied_at) "
                          "VALUES (1, '2026-01-01T00:00:00Z')"))
    engine.dispose()
    s = Store(pg_url)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 2
        columns = {c["name"] for c in inspect(s.engine).get_columns("model_versions")}
        assert {"bento_tag", "dvc_json"} <= columns
        row = registry.get_model(s, v1["id"])
        assert row["artifact_sha256"] == v1["artifact_sha256"] and row["bento_tag"] is None
        assert registry.set_bento_tag(s, v1["id"], "bonmf:abc")["bento_tag"] == "bonmf:abc"
        assert registry.record_dvc_hashes(s, v1["id"], {"data": "md5"})["dvc"] == {"data": "md5"}
        assert sorted(_rows(pg_url, "SELECT version FROM schema_version")) == [(1,), (2,)]
    finally:
        s.dispose()
    Store(pg_url).dispose()                      # reopening an upgraded store changes nothing
    assert sorted(_rows(pg_url, "SELECT version FROM schema_version")) == [(1,), (2,)]


def test_stores_opened_at_once_create_one_schema_and_newer_is_refused(pg_url, tmp_path):
    """Processes that open a fresh database together all succeed (the schema is created once,
    under a lock); a database from a newer release is refused with a clear message."""
    code = "import sys; from bonmf_core.store.database import Store; Store(sys.argv[1]).dispose()"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]
    for proc in procs:
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-3000:]
    assert _rows(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    store = Store(pg_url)
    with store.session() as s:
        s.add(SchemaVersion(version=SCHEMA_VERSION + 1))
    store.dispose()
    with pytest.raises(StoreVersionError, match="upgrade bonmf"):
        Store(pg_url)


def test_wrong_credentials_are_one_clear_error_without_the_password(postgres, tmp_path):  # noqa: F811
    url = postgres.url("postgres").replace(postgres.password, "not-the-password")
    with pytest.raises(StoreUnavailableError, match="password authentication failed") as err:
        Store(url)
    assert "not-the-password" not in str(err.value) and ":***@" in str(err.value)
    proc = _bonmf("status", env=_env(BONMF_STATE_DIR=str(tmp_path), BONMF_STORE_URL=url))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: cannot open the store postgresql+psycopg://bonmf:***@")
    assert "Traceback" not in proc.stderr and "not-the-password" not in proc.stderr


# -- one whole `bonmf run`, its store and Dagster's instance on PostgreSQL ---------------------

def dagster_yaml() -> str:
    """bonmf's own dagster.yaml plus PostgreSQL storage read from the environment
    (docs/postgres.md shows the same block)."""
    from orchestration.main import DAGSTER_YAML

    return DAGSTER_YAML + (
        # psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, on which
        # dagster-postgres's `NOTIFY run_events, %(id)s` is a syntax error.
        "storage:\n  postgres:\n    postgres_db:\n      scheme: postgresql+psycopg2\n"
        "      hostname: {env: BONMF_PG_HOST}\n      port: {env: BONMF_PG_PORT}\n"
        "      username: {env: BONMF_PG_USER}\n      password: {env: BONMF_PG_PASSWORD}\n"
        "      db_name: {env: BONMF_PG_DB}\n")


def _bonmf(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=900)


def test_bonmf_run_writes_its_store_and_dagster_runs_to_postgres(postgres, tmp_path):  # noqa: F811
    store_url = postgres.create_database("bonmf_store")
    postgres.create_database("dagster")
    state = tmp_path / "state"
    (state / "dagster").mkdir(parents=True)
    (state / "dagster" / "dagster.yaml").write_text(dagster_yaml())
    env = _env(BONMF_STATE_DIR=str(state), BONMF_STORE_URL=store_url, BONMF_PARAMS="",
               **postgres.env("dagster"))
    proc = _bonmf("run", "--variants", "pop,id", "--encoders", "basic", "--epochs", "1",
                  "--set", "train.lr=0.01",
                  "--set", "promotion.floors={}", "--set", "data.demo_users=200",
                  "--set", "data.demo_items=250", "-q", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["decision"] == "promote"
    # The credentials stay in the environment: not printed, not written into the state.
    assert postgres.password not in proc.stdout + proc.stderr
    assert not [p for p in state.rglob("*") if p.is_file() and postgres.password.encode()
                in p.read_bytes()]

    # The project's store is PostgreSQL: no SQLite file, the rows are in the database.
    assert not (state / "bonmf.db").exists()
    assert "store:      postgresql+psycopg://" in proc.stdout and "***" in proc.stdout
    models = _rows(store_url, "SELECT id, variant, stage, run_id FROM model_versions")
    production = [m for m in models if m[2] == "production"]
    assert len(production) == 1 and production[0][1] == summary["candidate"] == "id"
    assert _rows(store_url, "SELECT status, n_users, n_items FROM dataset_snapshots") == [
        ("accepted", 200, 250)]
    events = _rows(store_url, "SELECT decision, candidate_id FROM promotion_events")
    assert events == [("promote", production[0][0])]
    assert _rows(store_url, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]

    # Dagster's runs and event log are in PostgreSQL too; the user's dagster.yaml was kept.
    assert "postgres_db" in (state / "dagster" / "dagster.yaml").read_text()
    dagster_url = postgres.url("dagster")
    runs = _rows(dagster_url, "SELECT run_id, status FROM runs")
    run_id = production[0][3]
    assert (run_id, "SUCCESS") in runs
    steps = _rows(dagster_url, "SELECT count(*) FROM event_logs WHERE run_id = "
                               f"'{run_id}' AND dagster_event_type = 'STEP_SUCCESS'")
    assert steps[0][0] >= 8
    assert not list((state / "dagster").glob("**/*.db"))   # no SQLite instance storage

    # `bonmf status` answers from both: the production model and Dagster's last run.
    status = _bonmf("status", "--json", env=env)
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
    collected = json.loads(status.stdout)
    assert collected["production"]["version"] == production[0][0]
    assert collected["last_run"]["run_id"] == run_id
