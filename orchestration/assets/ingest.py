"""Ingest: the raw snapshot (checked by `checks.py`) and the validated dataset built from it."""


import time

import dagster as dg

from bonmf_core.ops import registry, stages

from ..resources import ParamsResource, StateResource, StoreResource


@dg.asset(group_name="ingest", kinds={"pandas", "parquet"},
          description="The configured source (demo, MovieLens-1M directory or saved dataset) "
                      "ingested leniently into raw tables, saved as parquet by content hash. "
                      "Its data-quality checks gate everything downstream.")
def dataset_snapshot(context: dg.AssetExecutionContext, params: ParamsResource,
                     state: StateResource, store: StoreResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    info = stages.snapshot(params.load().data, root=state.folder("snapshots"))
    digest, path = info["content_hash"], info["path"]
    counts = {k: info[k] for k in ("n_users", "n_items", "n_interactions")}
    with store.open() as s:
        row = registry.record_snapshot(s, digest, name=info["name"], source=info["source"],
                                       path=path, **counts)
    context.log.info(f"snapshot {digest} ({row['status']}): {counts}")
    return dg.MaterializeResult(
        value={k: info[k] for k in ("content_hash", "path", "name", "source")} | counts,
        metadata={"content_hash": digest, "path": dg.MetadataValue.path(path),
                  "source": info["source"], **counts, "parse_problems": info["problems"],
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
    dataset = stages.build_dataset(dataset_snapshot["path"], out)
    with store.open() as s:
        registry.accept_snapshot(s, digest)
    info = stages.dataset_info(dataset, out, digest)
    summary = dataset.summary()
    dataset_hash = info["dataset_hash"]
    return dg.MaterializeResult(
        value=info,
        metadata={"dataset_hash": dataset_hash, "snapshot_hash": digest,
                  "path": dg.MetadataValue.path(str(out)),
                  **{k: summary[k] for k in ("users", "items", "interactions",
                                              "items_with_interactions")},
                  "density": round(summary["density"], 6),
                  "text_fields": summary["text_fields"],
                  "user_attributes": summary["user_attributes"]},
        data_version=dg.DataVersion(dataset_hash))
