"""The expectations of each ERROR check, built for the frames `frames.py` derives.

An expectation on a column is only added when the column exists; a missing required column is
reported by `ExpectColumnToExist`, because an expectation on an absent column can only raise.
Great Expectations is imported inside each function: importing it costs seconds.
"""

from __future__ import annotations

import pandas as pd

from .frames import text_columns
from .thresholds import CheckThresholds

REQUIRED_INTERACTION_COLUMNS = ("user_id", "item_id")
REQUIRED_CATALOG_COLUMNS = ("item_id", "title")
_NOT_BLANK = r"\S"


def interactions_suite(frame: pd.DataFrame, thresholds: CheckThresholds,
                       timestamp_max: int) -> list:
    import great_expectations.expectations as gxe

    suite = [gxe.ExpectTableRowCountToBeBetween(
        min_value=1, description="the snapshot has interactions")]
    for col in REQUIRED_INTERACTION_COLUMNS:
        suite.append(gxe.ExpectColumnToExist(
            column=col, description=f"interactions have a '{col}' column"))
        if col in frame.columns:
            suite.append(gxe.ExpectColumnValuesToNotBeNull(
                column=col, description=f"every interaction names its {col}"))
    if "rating_value" in frame.columns:
        suite.append(gxe.ExpectColumnValuesToNotBeNull(
            column="rating_value",
            description="every rating is a number (missing or non-numeric ratings found)"))
        if thresholds.rating_scale is not None:
            low, high = thresholds.rating_scale
            suite.append(gxe.ExpectColumnValuesToBeBetween(
                column="rating_value", min_value=low, max_value=high,
                description=f"ratings lie within the declared scale [{low:g}, {high:g}]"))
    if "timestamp_value" in frame.columns:
        suite += [
            gxe.ExpectColumnValuesToNotBeNull(
                column="timestamp_value",
                description="every timestamp is a number (missing or non-numeric found)"),
            gxe.ExpectColumnValuesToBeInSet(
                column="timestamp_is_integer", value_set=[True],
                description="timestamps are whole seconds since the epoch"),
            gxe.ExpectColumnValuesToBeBetween(
                column="timestamp_value", min_value=thresholds.timestamp_min,
                max_value=timestamp_max,
                description=f"timestamps lie in [{thresholds.timestamp_min}, {timestamp_max}] "
                            "(seconds since the epoch)"),
        ]
    keys = [c for c in ("user_id", "item_id", "timestamp_value") if c in frame.columns]
    if {"user_id", "item_id"} <= set(keys):
        suite.append(gxe.ExpectCompoundColumnsToBeUnique(
            column_list=keys,
            description="no interaction is repeated (same "
                        f"{', '.join(k.removesuffix('_value') for k in keys)})"))
    return suite


def per_user_suite(thresholds: CheckThresholds) -> list:
    import great_expectations.expectations as gxe

    n = thresholds.min_interactions_per_user
    return [gxe.ExpectColumnValuesToBeBetween(
        column="n_interactions", min_value=n,
        description=f"every user has at least {n} interaction(s)")]


def catalog_suite(frame: pd.DataFrame, items: pd.DataFrame, thresholds: CheckThresholds) -> list:
    import great_expectations.expectations as gxe

    suite = [gxe.ExpectTableRowCountToBeBetween(min_value=1, description="the catalog has items")]
    for col in REQUIRED_CATALOG_COLUMNS:
        suite.append(gxe.ExpectColumnToExist(column=col, description=f"items have a '{col}' column"))
        if col in frame.columns:
            suite += [
                gxe.ExpectColumnValuesToNotBeNull(
                    column=col, description=f"every item has a {col}"),
                gxe.ExpectColumnValuesToMatchRegex(
                    column=col, regex=_NOT_BLANK, description=f"no item's {col} is blank"),
            ]
    if "item_id" in frame.columns:
        suite.append(gxe.ExpectColumnValuesToBeUnique(
            column="item_id", description="item ids are unique"))
    text_cols = text_columns(items) or ["title"]
    suite.append(gxe.ExpectColumnValuesToBeInSet(
        column="has_text", value_set=[True], mostly=thresholds.text_coverage_min,
        description=f"at least {thresholds.text_coverage_min:.0%} of items have text in "
                    f"{', '.join(text_cols)}"))
    if "image_inside" in frame.columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(
            column="image_inside", value_set=[True],
            description="every image path stays inside the dataset folder (no absolute "
                        "paths elsewhere, no '..' escapes, no links that lead out)"))
    if "image_readable" in frame.columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(
            column="image_readable", value_set=[True], mostly=thresholds.readable_image_min,
            description=f"at least {thresholds.readable_image_min:.0%} of items have an image "
                        "that decodes"))
    return suite


def referential_suite(frame: pd.DataFrame) -> list:
    import great_expectations.expectations as gxe

    suite = [gxe.ExpectColumnValuesToBeInSet(
        column="item_in_catalog", value_set=[True],
        description="every interaction's item_id is in the catalog")]
    if "user_in_users" in frame.columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(
            column="user_in_users", value_set=[True],
            description="every interaction's user_id is in the users table"))
    return suite
