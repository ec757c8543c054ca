"""Data-quality checks on the raw snapshot (Great Expectations, via `data_checks`).

One validation computes all five checks; each becomes its own asset check result. ERROR checks
(parsing, interactions, catalog, referential) are blocking: when one fails, nothing downstream of the
snapshot runs in that run, so the last accepted data, the registry's models and the production
model stay as they were. Drift is a WARN check and never blocks.
"""


import json

import dagster as dg

from bonmf_core.ops import registry

from .assets.ingest import dataset_snapshot
from .resources import ParamsResource, StateResource, StoreResource

ERROR_CHECKS = {
    "parsing": "every line of every file parses (field count, quoting); at most "
               "checks.max_malformed_lines may not, and each one is named by file and line",
    "interactions": "schema and types, non-null ids, ratings within the scale, plausible "
                    "timestamps, no duplicate (user, item, time) rows, enough interactions "
                    "per user",
    "catalog": "unique item ids, non-empty titles, image paths inside the dataset folder, "
               "text coverage and readable-image ratio above their thresholds",
    "referential": "every interaction's item is in the catalog and its user in the users table",
}
DRIFT = "rating distribution, share of new items/users and volume against the previous " \
        "accepted snapshot"

SPECS = [dg.AssetCheckSpec(name, asset=dataset_snapshot, description=desc, blocking=True)
         for name, desc in ERROR_CHECKS.items()]
SPECS.append(dg.AssetCheckSpec("drift", asset=dataset_snapshot, description=DRIFT,
                               blocking=False))


@dg.multi_asset_check(specs=SPECS, name="snapshot_checks", compute_kind="great_expectations",
                      description="Great Expectations suites over the raw snapshot; the "
                                  "outcome is recorded with the snapshot in the registry.")
def snapshot_checks(context: dg.AssetCheckExecutionContext, dataset_snapshot: dict,
                    params: ParamsResource, state: StateResource, store: StoreResource):
    from bonmf_core.ops import stages

    digest = dataset_snapshot["content_hash"]
    with store.open() as s:
        previous = registry.last_accepted_snapshot(s, exclude=digest)
    _, result = stages.validate(dataset_snapshot["path"], params.load().checks,
                                previous_profile=previous and previous["profile"],
                                docs_root=state.path / "data_docs" / digest)
    report = result.to_dict()
    with store.open() as s:
        registry.record_validation(s, digest, report, result.passed, result.profile)
    context.log.info(f"snapshot {digest}: passed={result.passed} "
                     f"blocking={report['blocking']} warnings={report['warnings']}")
    for outcome in result.checks:
        yield dg.AssetCheckResult(
            asset_key=dataset_snapshot_key(), check_name=outcome.name, passed=outcome.passed,
            severity=(dg.AssetCheckSeverity.ERROR if outcome.severity == "ERROR"
                      else dg.AssetCheckSeverity.WARN),
            description=outcome.description,
            metadata=_check_metadata(outcome, report, previous))


def dataset_snapshot_key() -> dg.AssetKey:
    return dg.AssetKey("dataset_snapshot")


def _check_metadata(outcome, report: dict, previous: dict | None) -> dict:
    failures = outcome.failures
    meta = {
        "summary": outcome.description,
        "failed_expectations": len(failures),
        "unexpected_rows": sum(int(f.get("unexpected_count") or 0) for f in failures),
        "statistics": dg.MetadataValue.json(_jsonable(outcome.statistics)),
    }
    if failures:
        lines = ["| expectation | columns | unexpected | example |", "|---|---|---|---|"]
        for f in failures:
            example = json.dumps(f["examples"][0], default=str)[:160] if f["examples"] else ""
            lines.append(f"| {f['description']} | {', '.join(f['columns'])} | "
                         f"{f.get('unexpected_count') or ''} | `{example}` |")
        meta["failures"] = dg.MetadataValue.md("\n".join(lines))
        meta["failures_table"] = failures_table(failures)
        meta["failing_rows"] = failing_rows(failures)
        meta["failure_details"] = dg.MetadataValue.json(_jsonable(failures))
    if outcome.name == "drift":
        meta["compared_with"] = previous["content_hash"] if previous else "none (first snapshot)"
    if report.get("docs_index"):
        meta["data_docs"] = dg.MetadataValue.path(report["docs_index"])
    return meta


def failures_table(failures: list[dict]) -> dg.MetadataValue:
    """One typed row per failed expectation."""
    schema = dg.TableSchema([dg.TableColumn("expectation", "string"),
                             dg.TableColumn("table", "string"),
                             dg.TableColumn("columns", "string"),
                             dg.TableColumn("unexpected", "int"),
                             dg.TableColumn("unexpected_percent", "float"),
                             dg.TableColumn("description", "string")])
    rows = [dg.TableRecord({"expectation": f["expectation"], "table": str(f.get("table") or ""),
                            "columns": ", ".join(f.get("columns") or []),
                            "unexpected": int(f.get("unexpected_count") or 0),
                            "unexpected_percent": float(f.get("unexpected_percent") or 0.0),
                            "description": f["description"]}) for f in failures]
    return dg.MetadataValue.table(rows, schema=schema)


def failing_rows(failures: list[dict]) -> dg.MetadataValue:
    """The offending rows themselves (up to 5 examples per failed expectation): which
    expectation, the row's position in its input table and its values."""
    schema = dg.TableSchema([dg.TableColumn("expectation", "string"),
                             dg.TableColumn("table", "string"),
                             dg.TableColumn("row", "int"),
                             dg.TableColumn("values", "string")])
    rows = [dg.TableRecord({"expectation": f["expectation"], "table": str(f.get("table") or ""),
                            "row": _position(e.get("row")),
                            "values": json.dumps({k: v for k, v in e.items() if k != "row"},
                                                 default=str)[:500]})
            for f in failures for e in f.get("examples") or []]
    return dg.MetadataValue.table(rows, schema=schema)


def _position(value) -> int:
    """A row position as an int (-1 where the check names none, e.g. a whole-table check)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
