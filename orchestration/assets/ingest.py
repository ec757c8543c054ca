"""Ingest: the raw snapshot (checked by `checks.py`) and the validated dataset built from it."""


import time

import dagster as dg

from bonmf_core import registry
from bonmf_core.snapshot import dataset_from_raw, load_snapshot, read_raw, save_snapshot

from ..config import SnapshotConfig
from ..resources import StateResource, StoreResource


@dg.asset(group_name="ingest", kinds={"pandas", "parquet"},
          description="The configured source (demo, MovieLens-1M directory or saved dataset) "
                      "ingested leniently into raw tables, saved as parquet by content hash. "
                      "Its data-quality checks gate everything downstream.")
def dataset_snapshot(context: dg.AssetExecutionContext, config: SnapshotConfig,
                     state: StateResource, store: StoreResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    raw = read_raw(config.source, config.demo_seed, config.demo_users, config.demo_items)
    digest, path = save_snapshot(raw, state.folder("snapshots"))
    counts = raw.counts()
    with store.open() as s:
        row = registry.record_snapshot(s, digest, name=raw.name, source=raw.source,
                                       path=str(path), **counts)
    context.log.info(f"snapshot {digest} ({row['status']}): {counts}")
    return dg.MaterializeResult(
        value={"content_hash": digest, "path": str(path), "name": raw.name,
               "source": raw.source, **counts},
        metadata={"content_hash": digest, "path": dg.MetadataValue.path(str(path)),
                  "source": raw.source, **counts, "parse_problems": raw.problems,
                  "registry_status": row["status"],
                  "seconds": round(time.perf_counter() - started, 3)},
        data_version=dg.DataVersion(digest))


@dg.asset(group_name="ingest", kinds={"pandas"},
          description="The strict BoNMF dataset (dense indices, id maps) built from a snapshot "
                      "that passed its checks; recorded as the last accepted snapshot, the "
                      "drift baseline of the next one.")
def validated_dataset(context: dg.AssetExecutionContext, dataset_snapshot: dict,
                      state: StateResource, store: StoreResource) -> dg.MaterializeResult:
    digest = dataset_snapshot["content_hash"]
    with store.open() as s:
        row = registry.get_snapshot(s, digest)
    if row is None or row["status"] not in ("validated", "accepted"):
        raise dg.Failure(f"snapshot {digest} has not passed its checks (status "
                         f"{row and row['status']}); materialize it with its checks first")
    out = state.path / "datasets" / digest
    if (out / "dataset.json").exists():
        from bonmf_core.dataset import Dataset
        dataset = Dataset.load(out)
    else:
        dataset = dataset_from_raw(load_snapshot(dataset_snapshot["path"]))
        dataset.save(out)
    with store.open() as s:
        registry.accept_snapshot(s, digest)
    summary = dataset.summary()
    dataset_hash = dataset.content_hash()
    return dg.MaterializeResult(
        value={"snapshot_hash": digest, "dataset_hash": dataset_hash, "path": str(out),
               "name": dataset.name, "users": summary["users"], "items": summary["items"],
               "interactions": summary["interactions"]},
        metadata={"dataset_hash": dataset_hash, "snapshot_hash": digest,
                  "path": dg.MetadataValue.path(str(out)),
                  **{k: summary[k] for k in ("users", "items", "interactions",
                                              "items_with_interactions")},
                  "density": round(summary["density"], 6),
                  "text_fields": summary["text_fields"],
                  "user_attributes": summary["user_attributes"]},
        data_version=dg.DataVersion(dataset_hash))
