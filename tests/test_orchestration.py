"""The Dagster project for real: definitions, a whole in-process run on a tiny demo, blocking
checks on a corrupted snapshot, the registry after each, schedules and sensors.

Real Dagster (persistent instance in a temp DAGSTER_HOME), real Great Expectations, real
SQLite. Kept small: a 300-user demo, weight-free encoders, a few epochs.
"""

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest
import yaml

from bonmf_core.ops import registry
from bonmf_core.config import load_config
from bonmf_core.hashing import sha256_tree as directory_sha256
from bonmf_core.store.database import Store
from test_registry import write_movielens

TINY = {"data": {"demo_users": 300, "demo_items": 250},
        "encoders": {"source": "basic"},
        "train": {"epochs": 3, "batch_size": 1024, "lr": 0.01, "patience": 2, "refit": False},
        "bpr": {"epochs": 2},
        "pipeline": {"candidates": ["id", "text+image"], "baselines": ["pop"]}}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny batches on a shared 2-core machine: one intra-op thread avoids OpenMP barrier
    stalls when other processes hold the cores (same results, many times faster there)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("orchestration-state")


@pytest.fixture(scope="module")
def first_run(state):
    from orchestration.main import run_pipeline

    summary = run_pipeline(load_config(flags=TINY, use_default_file=False), state=state, log_level="WARNING")
    assert summary["success"], summary.get("error")
    return summary


def _store(state) -> Store:
    return Store(f"sqlite:///{Path(state) / 'bonmf.db'}")


def test_definitions_load_with_the_whole_graph():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"dataset_snapshot", "validated_dataset", "text_embeddings",
                    "image_embeddings", "splits", "bonmf_candidate", "baselines",
                    "offline_evaluation", "promotion_decision", "bento_package"} <= keys
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups["dataset_snapshot"] == "ingest" and groups["promotion_decision"] == "promotion"
    assert groups["bento_package"] == "packaging"
    assert graph.get(dg.AssetKey("bento_package")).parent_keys >= {
        dg.AssetKey("promotion_decision")}
    from orchestration.checks import snapshot_checks

    assert {k.name for k in graph.asset_check_keys} == {"parsing", "interactions", "catalog",
                                                        "referential", "drift"}
    checks = {c.name: c for c in snapshot_checks.check_specs}
    assert set(checks) == {"parsing", "interactions", "catalog", "referential", "drift"}
    assert all(checks[n].blocking for n in ("parsing", "interactions", "catalog",
                                            "referential"))
    assert not checks["drift"].blocking
    assert graph.get(dg.AssetKey("validated_dataset")).parent_keys == {dg.AssetKey("dataset_snapshot")}
    assert defs.resolve_job_def("retrain") is not None
    assert defs.resolve_schedule_def("periodic_retrain").cron_schedule == "0 3 * * 1"
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {"new_data_sensor", "record_run_failures", "mark_dead_runs"}
    assert sensors["mark_dead_runs"].default_status == dg.DefaultSensorStatus.RUNNING


def test_whole_graph_on_the_demo_ends_with_a_promoted_model(first_run, state):
    s = first_run
    assert set(s["steps"]) >= {"dataset_snapshot", "snapshot_checks", "validated_dataset",
                               "text_embeddings", "image_embeddings", "splits",
                               "bonmf_candidate", "baselines", "offline_evaluation",
                               "promotion_decision"}
    assert all(c["passed"] for n, c in s["checks"].items() if n != "drift")
    assert "| pop |" in s["table"] and "| text+image |" in s["table"]
    decision = s["decision"]
    assert decision["decision"] == "promote", decision["reason"]
    production = Path(decision["production_path"])
    assert (production / "model.safetensors").exists() and (production / "registry.json").exists()
    for name in ("json", "markdown", "plot", "html", "data", "curves_plot"):
        assert Path(s["report"][name]).exists()
    assert "Promotion gate: PROMOTE" in Path(s["report"]["html"]).read_text()
    instance_config = yaml.safe_load((Path(state) / "dagster" / "dagster.yaml").read_text())
    assert instance_config["telemetry"] == {"enabled": False}
    assert instance_config["run_monitoring"]["enabled"] is True
    assert s["dead_runs_marked"] == []
    store = _store(state)
    try:
        snap = registry.get_snapshot(store, s["snapshot"])
        assert snap["status"] == "accepted" and snap["validation"]["passed"] is True
        models = registry.list_models(store)
        assert len(models) == 1 and models[0]["stage"] == "production"
        assert models[0]["dataset_hash"] == s["dataset"] and models[0]["code_version"]
        assert models[0]["protocol"]["name"] == "ncf"
        assert [e["decision"] for e in registry.list_events(store)] == ["promote"]
    finally:
        store.dispose()

    # The production model is packaged: a BentoML model (tag in the registry), a Bento and
    # its .bento archive for handoff.
    package = s["package"]
    assert package["packaged"] and not package["reused"]
    archive = Path(package["archive"])
    assert archive.exists() and archive.parent == Path(state) / "artifacts" / "bento"
    from bonmf_core.hashing import sha256_file as file_sha256
    assert file_sha256(archive) == package["archive_sha256"]
    store = _store(state)
    try:
        assert registry.production_model(store)["bento_tag"] == package["model_tag"]
    finally:
        store.dispose()

    # The production model serves: load it back.
    from bonmf_core.models.artifacts import load_model
    model, meta, ids = load_model(production)
    assert meta["variant"] == s["candidate"]["variant"] and len(ids["item_ids"]) == 250


def test_unchanged_rerun_reuses_everything_and_adds_nothing(first_run, state):
    from orchestration.main import run_pipeline

    again = run_pipeline(load_config(flags=TINY, use_default_file=False), state=state, log_level="WARNING")
    assert again["success"]
    assert again["fits_reused"] == again["fits_total"]
    # Each fit's cost and early stopping, the first run's as trained, the rerun's as reused.
    first_fits = {(f["variant"], f["seed"]): f for f in first_run["fits"]}
    assert len(first_fits) == first_run["fits_total"] and not any(
        f["reused"] for f in first_run["fits"])
    for fit in again["fits"]:
        trained = first_fits[(fit["variant"], fit["seed"])]
        assert fit["reused"] and 1 <= trained["best_epoch"] <= trained["epochs_run"]
        assert fit["epochs_run"] == trained["epochs_run"]
    assert again["candidate"]["version_id"] == first_run["candidate"]["version_id"]
    assert again["decision"]["new_event"] is False
    # Same production model: nothing is rebuilt, the same archive is handed off.
    assert again["package"]["reused"] is True
    assert again["package"]["bento_tag"] == first_run["package"]["bento_tag"]
    assert again["package"]["archive_sha256"] == first_run["package"]["archive_sha256"]
    store = _store(state)
    try:
        assert len(registry.list_models(store)) == 1 and len(registry.list_events(store)) == 1
    finally:
        store.dispose()


def test_corrupted_snapshot_is_blocked_and_changes_nothing(first_run, state, tmp_path):
    from orchestration.main import run_pipeline

    # Out-of-scale ratings, an unknown movie, and 3 of 8 posters that do not decode.
    bad = write_movielens(tmp_path / "bad-ml", broken_posters=(2, 4, 6), ratings=[
        (u, m, 9 if (u, m) == (1, 2) else 1 + (u + m) % 5, 978300000 + u * 100 + m)
        for u in range(1, 7) for m in range(1, 9)] + [(3, 999, 4, 978309999)])
    store = _store(state)
    try:
        models_before = registry.list_models(store)
        events_before = registry.list_events(store)
        accepted_before = registry.last_accepted_snapshot(store)
    finally:
        store.dispose()
    production = Path(first_run["decision"]["production_path"])
    production_hash = directory_sha256(production)

    params = load_config(flags={**TINY, "data": {"source": str(bad)}}, use_default_file=False)
    s = run_pipeline(params, state=state, log_level="ERROR")

    assert not s["success"]
    assert set(s["steps"]) == {"dataset_snapshot", "snapshot_checks"}  # nothing downstream ran
    assert s["failed_steps"] == ["snapshot_checks"]
    checks = s["checks"]
    assert not checks["interactions"]["passed"] and "scale" in checks["interactions"]["description"]
    assert not checks["referential"]["passed"]
    assert not checks["catalog"]["passed"] and "image" in checks["catalog"]["description"]

    store = _store(state)
    try:
        assert registry.list_models(store) == models_before
        assert registry.list_events(store) == events_before
        assert registry.last_accepted_snapshot(store) == accepted_before
        rejected = [r for r in registry.list_snapshots(store) if r["status"] == "rejected"]
        assert len(rejected) == 1 and rejected[0]["source"] == str(bad.resolve())
        assert set(rejected[0]["validation"]["blocking"]) == {"interactions", "catalog",
                                                               "referential"}
        failures = registry.list_run_failures(store)
        assert [f["run_id"] for f in failures] == [s["run_id"]]
        assert failures[0]["failed_steps"] == ["snapshot_checks"]
    finally:
        store.dispose()
    assert directory_sha256(production) == production_hash

    # The check metadata tells what failed, how many rows and shows examples.
    with dg.DagsterInstance.get() as instance:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("dataset_snapshot"), "interactions")])
        evaluation = list(record.values())[0].event.dagster_event.event_specific_data
        meta = evaluation.metadata
        assert meta["unexpected_rows"].value >= 1 and "rating" in meta["failures"].value
        # ... and as typed tables: one row per failed expectation, one per offending row.
        assert isinstance(meta["failures_table"], dg.TableMetadataValue)
        assert all(r.data["unexpected"] >= 1 for r in meta["failures_table"].records)
        rows = meta["failing_rows"]
        assert isinstance(rows, dg.TableMetadataValue)
        assert any(str(__import__("json").loads(r.data["values"]).get("rating")) in ("9", "9.0")
                   for r in rows.records)

        # The run-failure sensor records the same run (into another store here, to see it do so).
        from orchestration.resources import StoreResource
        from orchestration.sensors import record_run_failures

        run = instance.get_run_by_id(s["run_id"])
        failure_event = instance.get_records_for_run(
            s["run_id"], of_type=dg.DagsterEventType.RUN_FAILURE).records[0].event_log_entry
        other = f"sqlite:///{tmp_path / 'other.db'}"
        ctx = dg.build_run_status_sensor_context(
            sensor_name="record_run_failures", dagster_event=failure_event.dagster_event,
            dagster_instance=instance, dagster_run=run,
            resources={"store": StoreResource(url=other)}).for_run_failure()
        record_run_failures(ctx)
        record_run_failures(ctx)  # twice: still one row
    other_store = Store(other)
    try:
        rows = registry.list_run_failures(other_store)
        assert len(rows) == 1 and rows[0]["run_id"] == s["run_id"]
        assert rows[0]["job_name"] == "retrain" and rows[0]["failed_steps"] == ["snapshot_checks"]
    finally:
        other_store.dispose()


def test_schedule_requests_one_retrain_per_tick():
    from orchestration.resources import ParamsResource
    from orchestration.schedules import build_schedule, periodic_retrain

    when = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.timezone.utc)
    with dg.build_schedule_context(scheduled_execution_time=when,
                                   resources={"params": ParamsResource()}) as context:
        result = periodic_retrain.evaluate_tick(context)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.run_key == "scheduled-2026-03-02T03:00"
    assert request.tags["bonmf/trigger"] == "schedule"
    # No per-op config: the run reads the one configuration through ParamsResource.
    assert not request.run_config
    assert build_schedule("*/10 * * * *", "Europe/Paris").cron_schedule == "*/10 * * * *"


def test_new_data_sensor_requests_once_per_content(tmp_path):
    from orchestration.resources import ParamsResource
    from orchestration.sensors import new_data_sensor

    folder = write_movielens(tmp_path / "ml")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"data": {"source": str(folder)}}))
    resources = {"params": ParamsResource(path=str(params_file))}

    with dg.build_sensor_context(resources=resources) as context:
        first = new_data_sensor.evaluate_tick(context)
    assert len(first.run_requests) == 1
    key = first.run_requests[0].run_key
    assert first.cursor == key and first.run_requests[0].tags["bonmf/source_fingerprint"] == key
    assert not first.run_requests[0].run_config   # the run reads the same ParamsResource

    with dg.build_sensor_context(cursor=key, resources=resources) as context:
        second = new_data_sensor.evaluate_tick(context)
    assert second.run_requests == [] and "unchanged" in second.skip_message

    with open(folder / "ratings.dat", "a") as f:
        f.write("6::8::4::978399999\n")
    with dg.build_sensor_context(cursor=key, resources=resources) as context:
        third = new_data_sensor.evaluate_tick(context)
    assert len(third.run_requests) == 1 and third.run_requests[0].run_key != key


# -- dead runs: a process killed with SIGKILL leaves its run STARTED ----------------------------

DOOMED_JOB = """
import time, dagster as dg

@dg.op
def wait_forever():
    time.sleep(600)

@dg.job(name="doomed")
def doomed():
    wait_forever()

with dg.DagsterInstance.get() as instance:
    doomed.execute_in_process(instance=instance, tags=%r)
"""


def start_doomed_run(dagster_home: Path, tags: dict | None = None, timeout: float = 120):
    """A Dagster run executing in another process, stuck in its one step → (process, run_id)
    once the run is STARTED and its engine event has logged the process's pid."""
    import os
    import subprocess
    import sys
    import time

    from orchestration.run_health import run_pid

    dagster_home = Path(dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        known = {r.dagster_run.run_id for r in instance.get_run_records()}
    process = subprocess.Popen([sys.executable, "-c", DOOMED_JOB % (tags or {})],
                               env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the doomed run's process ended by itself"
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            new = [r.dagster_run for r in instance.get_run_records()
                   if r.dagster_run.run_id not in known]
            if new and new[0].status == dg.DagsterRunStatus.STARTED and \
                    run_pid(instance, new[0].run_id) == process.pid:
                return process, new[0].run_id
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no STARTED run after {timeout} s")


def test_dead_runs_are_marked_failed_and_recorded_by_the_sensor(tmp_path):
    from orchestration.resources import StoreResource
    from orchestration.run_health import HOST_TAG
    from orchestration.sensors import mark_dead_runs_sensor

    home = tmp_path / "dagster"
    processes = []
    try:
        dead, dead_id = start_doomed_run(home)
        alive, alive_id = start_doomed_run(home)
        elsewhere, elsewhere_id = start_doomed_run(home, {HOST_TAG: "another-machine"})
        processes += [dead, alive, elsewhere]
        for process in (dead, elsewhere):
            process.kill()          # SIGKILL: no failure event, no finally
            process.wait(timeout=30)
        url = f"sqlite:///{tmp_path / 'bonmf.db'}"
        resources = {"store": StoreResource(url=url)}
        with dg.DagsterInstance.from_config(str(home)) as instance:
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                first = mark_dead_runs_sensor.evaluate_tick(context)
            assert first.run_requests == [] and dead_id in first.skip_message
            status = {i: instance.get_run_by_id(i).status for i in (dead_id, alive_id,
                                                                      elsewhere_id)}
            assert status == {dead_id: dg.DagsterRunStatus.FAILURE,
                              alive_id: dg.DagsterRunStatus.STARTED,       # still running
                              elsewhere_id: dg.DagsterRunStatus.STARTED}   # not ours to judge
            failure = instance.get_records_for_run(
                dead_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
            assert len(failure) == 1 and f"pid {dead.pid}" in failure[0].event_log_entry.message
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                second = mark_dead_runs_sensor.evaluate_tick(context)
            assert "no run in progress has lost its process" in second.skip_message
        store = Store(url)
        try:
            rows = registry.list_run_failures(store)
        finally:
            store.dispose()
        assert [(r["run_id"], r["job_name"]) for r in rows] == [(dead_id, "doomed")]
        assert f"(pid {dead.pid}) is gone" in rows[0]["message"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
