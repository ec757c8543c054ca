"""`validate_snapshot`: every check over one raw snapshot, in one ephemeral GX context."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from . import suites
from .drift import drift_check, snapshot_profile
from .frames import (SOURCE_COLUMNS, as_text, catalog_frame, interaction_frame,
                     per_user_counts, referential_frame)
from .results import (ERROR, MAX_EXAMPLES, CheckOutcome, SnapshotValidation, examples_at, failure, jsonable,
                      missing_column)
from .thresholds import CheckThresholds

_DOCS_SITE = "snapshot_checks"
# SUMMARY keeps the first offending row labels without materializing every unexpected value,
# which on a badly broken million-row table would be a million-element list.
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
# Suite (one per validated frame) -> the input table whose rows it checks.
_INPUT_TABLES = {"interactions": "interactions", "interactions_per_user": "interactions",
                 "catalog": "items", "referential": "interactions", "parsing": "files"}


def validate_snapshot(interactions: pd.DataFrame, items: pd.DataFrame,
                      users: pd.DataFrame | None = None,
                      thresholds: CheckThresholds | Mapping = CheckThresholds(),
                      previous_profile: dict | None = None,
                      docs_dir: str | Path | None = None, *,
                      parse_problems: Mapping | None = None, origins: Mapping | None = None,
                      image_root: str | Path | None = None) -> SnapshotValidation:
    """Run the parsing, interactions, catalog, referential (ERROR) and drift (WARN) checks.

    Never raises for bad data: a broken table comes back as failed checks naming what is wrong.
    previous_profile: `snapshot_profile` of the last accepted snapshot (None skips drift).
    docs_dir: when given, a Great Expectations Data Docs site is written there.
    parse_problems: per file, the lines the reader could not parse (`RawTables.problems`).
    origins: per table, {"file", "lines"}: each failure's examples then name file and line.
    image_root: the dataset's own folder; an image path leading outside it blocks.
    """
    started = time.perf_counter()
    if not isinstance(thresholds, CheckThresholds):
        thresholds = CheckThresholds.from_dict(thresholds)
    context = _gx_context()
    inter = interaction_frame(interactions)
    profile = snapshot_profile(interactions, items, users)
    locate = _locator(origins or {})
    checks = [
        _parsing_check(context, parse_problems or {}, thresholds),
        _interactions_check(context, inter, thresholds, locate),
        _catalog_check(context, items, thresholds, image_root, locate),
        _referential_check(context, inter, items, users, locate),
        drift_check(profile, previous_profile, thresholds),
    ]
    docs_index = _build_docs(context, Path(docs_dir)) if docs_dir is not None else None
    return SnapshotValidation(checks, thresholds, profile, docs_index,
                              time.perf_counter() - started)


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # Metric progress bars go to stderr for every validation: noise in logs and test output.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _locator(origins: Mapping):
    """A function that adds "file" and "line" to a failure's examples from `origins`."""
    def locate(failure: dict) -> dict:
        origin = origins.get(failure["table"])
        if origin is None:
            return failure
        lines = origin["lines"]     # None for Parquet: rows, not lines
        for example in failure["examples"]:
            row = example.get("row")
            if not isinstance(row, int) or row < 0:
                continue
            if lines is None:
                example["file"], example["file_row"] = origin["file"], row + 1
            elif row < len(lines):
                example["file"], example["line"] = origin["file"], int(lines[row])
        return failure
    return locate


def _parsing_check(context, problems: Mapping, thresholds: CheckThresholds) -> CheckOutcome:
    """Lines the reader could not parse (wrong field count, broken quoting): a row lost
    silently is worse than a blocked run, so more than `max_malformed_lines` blocks."""
    import great_expectations.expectations as gxe

    rows = [{"file": file, "line": e["line"], "problem": e["problem"]}
            for file, found in problems.items() for e in found["examples"]]
    total = sum(found["malformed_lines"] for found in problems.values())
    limit = thresholds.max_malformed_lines
    where = ", ".join(f"{r['file']}:{r['line']} ({r['problem']})" for r in rows[:3])
    frame = pd.DataFrame({"location": [f"{r['file']}:{r['line']}" for r in rows[:total]] +
                          [None] * max(0, total - len(rows))})
    expectation = gxe.ExpectTableRowCountToBeBetween(
        min_value=0, max_value=limit,
        description=f"at most {limit} line(s) fail to parse" + (f"; found {total}: {where}"
                                                                  if total else ""))
    found, stats = _validate(context, "parsing", frame, [expectation])
    stats |= {"malformed_lines": total, "files": {f: p["malformed_lines"]
                                                  for f, p in problems.items()}}
    if found:
        found[0]["examples"] = rows[:MAX_EXAMPLES]
        found[0]["unexpected_count"] = total
        found[0]["columns"] = []
    return _outcome("parsing", found, stats)


def _interactions_check(context, inter: pd.DataFrame, thresholds: CheckThresholds,
                        locate) -> CheckOutcome:
    timestamp_max = int(time.time() + thresholds.timestamp_max_slack_days * 86_400)
    failures, stats = _validate(context, "interactions", inter,
                                suites.interactions_suite(inter, thresholds, timestamp_max))
    if "user_id" in inter.columns:
        counts = per_user_counts(inter)
        more, _ = _validate(context, "interactions_per_user", counts,
                            suites.per_user_suite(thresholds))
        failures += more
        stats["min_interactions_per_user"] = int(counts["n_interactions"].min()) if len(counts) else 0
    stats |= _interaction_statistics(inter)
    return _outcome("interactions", [locate(f) for f in failures], stats)


def _interaction_statistics(inter: pd.DataFrame) -> dict:
    stats = {"n_interactions": len(inter)}
    for col in ("user_id", "item_id"):
        if col in inter.columns:
            stats[f"n_distinct_{col}s"] = int(inter[col].nunique())
    if "rating_value" in inter.columns:
        stats |= {"rating_min": inter["rating_value"].min(), "rating_max": inter["rating_value"].max(),
                  "rating_mean": inter["rating_value"].mean()}
    if "timestamp_value" in inter.columns:
        stats |= {"timestamp_min": inter["timestamp_value"].min(),
                  "timestamp_max": inter["timestamp_value"].max()}
    return stats


def _catalog_check(context, items: pd.DataFrame, thresholds: CheckThresholds,
                   image_root, locate) -> CheckOutcome:
    started = time.perf_counter()
    frame = catalog_frame(items, image_root)  # decodes every image: the slow part
    prepare_seconds = time.perf_counter() - started
    failures, stats = _validate(context, "catalog", frame,
                                suites.catalog_suite(frame, items, thresholds))
    stats |= {"n_items": len(frame), "text_coverage": frame["has_text"].mean() if len(frame) else 0.0}
    if "image_readable" in frame.columns:
        stats |= {"readable_image_share": frame["image_readable"].mean() if len(frame) else 0.0,
                  "image_problems": frame["image_problem"].value_counts().head(10).to_dict(),
                  "image_check_seconds": prepare_seconds}
    else:
        stats["images"] = "the catalog declares no image paths: not checked"
    return _outcome("catalog", [locate(f) for f in failures], stats)


def _referential_check(context, inter: pd.DataFrame, items: pd.DataFrame,
                       users: pd.DataFrame | None, locate) -> CheckOutcome:
    failures = [missing_column("interactions", col, "needed to match interactions to the "
                               + ("catalog" if col == "item_id" else "users table"))
                for col in ("user_id", "item_id") if col not in inter.columns]
    if "item_id" not in items.columns:
        failures.append(missing_column("items", "item_id", "needed to match interactions to it"))
    if users is not None and "user_id" not in users.columns:
        failures.append(missing_column("users", "user_id", "needed to match interactions to it"))
    if failures:
        return _outcome("referential", failures, {"evaluated": False})

    frame = referential_frame(inter, as_text(items["item_id"]),
                              None if users is None else as_text(users["user_id"]))
    failures, stats = _validate(context, "referential", frame, suites.referential_suite(frame))
    stats |= _unknown_ids(frame, "item_id", "item_in_catalog")
    if "user_in_users" in frame.columns:
        stats |= _unknown_ids(frame, "user_id", "user_in_users")
    return _outcome("referential", [locate(f) for f in failures], stats)


def _unknown_ids(frame: pd.DataFrame, column: str, known_column: str) -> dict:
    unknown = sorted(set(frame.loc[frame[known_column].eq(False), column]))
    kind = column.removesuffix("_id")
    return {f"n_unknown_{kind}s": len(unknown), f"unknown_{kind}s": unknown[:5]}


def _validate(context, name: str, frame: pd.DataFrame, expectations: list) -> tuple[list, dict]:
    """Validate `frame` against a suite named `name`; the failures and the run's statistics.

    A ValidationDefinition (rather than batch.validate) stores the result in the context, which
    is what a Data Docs build renders.
    """
    import great_expectations as gx

    source = (context.data_sources.all().get("snapshot")
              or context.data_sources.add_pandas("snapshot"))
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite))
    run = definition.run(batch_parameters={"dataframe": frame}, result_format=_RESULT_FORMAT)
    # GX returns results in metric-computation order; the suite's order reads better
    # (schema before values) and does not change between runs.
    position = {e.id: i for i, e in enumerate(suite.expectations)}
    failed = sorted((r for r in run.results if not r.success),
                    key=lambda r: position.get(r.expectation_config.id, len(position)))
    failures = [_failure(result, frame, _INPUT_TABLES[name]) for result in failed]
    stats = {f"{name}_expectations": run.statistics["evaluated_expectations"],
             f"{name}_failed": run.statistics["unsuccessful_expectations"]}
    return failures, stats


def _failure(result, frame: pd.DataFrame, table: str) -> dict:
    """A failed GX expectation as a failure dict, with the offending rows as examples."""
    config = result.expectation_config
    kwargs = config.kwargs
    checked = list(kwargs.get("column_list") or ([kwargs["column"]] if "column" in kwargs else []))
    columns = list(dict.fromkeys(SOURCE_COLUMNS.get(c, c) for c in checked))
    found = result.result or {}
    extra = {"checked_columns": checked} if checked != columns else {}
    if "observed_value" in found:
        extra["observed_value"] = jsonable(found["observed_value"])
    if "mostly" in kwargs:
        extra["threshold"] = kwargs["mostly"]
    error = _exception_message(result.exception_info)
    if error:
        extra["error"] = error
    return failure(config.type, table, columns, config.description or config.type,
                   unexpected_count=found.get("unexpected_count"),
                   unexpected_percent=found.get("unexpected_percent"),
                   examples=examples_at(frame, found.get("partial_unexpected_index_list") or []),
                   **extra)


def _exception_message(info) -> str | None:
    """GX reports errors either flat or keyed by metric; the first message either way."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    messages = [e.get("exception_message") for e in entries
                if isinstance(e, dict) and e.get("raised_exception", True) and e.get("exception_message")]
    return messages[0] if messages else None


def _outcome(name: str, failures: list[dict], stats: dict) -> CheckOutcome:
    if not failures:
        return CheckOutcome(name, ERROR, True, "all expectations met", [], jsonable(stats))
    parts = [f["description"] + (f" ({f['unexpected_count']} unexpected{_first_at(f)})"
                                 if f["unexpected_count"] else "")
             for f in failures]
    summary = f"{len(failures)} expectation(s) failed: " + "; ".join(parts)
    return CheckOutcome(name, ERROR, False, summary, failures, jsonable(stats))


def _first_at(failure: dict) -> str:
    """'; first at ratings.dat:17' when the examples know their line ('' for parsing, whose
    description already lists them)."""
    for example in failure["examples"]:
        if "line" in example and "problem" not in example:
            return f"; first at {example['file']}:{example['line']}"
        if "file_row" in example:   # Parquet: rows counted from 1, as lines are
            return f"; first at {example['file']} row {example['file_row']}"
    return ""


def _build_docs(context, docs_dir: Path) -> str:
    """Render the stored suites and validation results as a static site in `docs_dir`."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(_DOCS_SITE, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    context.build_data_docs(site_names=[_DOCS_SITE])
    return str(docs_dir.resolve() / "index.html")
