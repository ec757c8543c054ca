"""data_checks on small synthetic snapshots, with real Great Expectations (no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_checks import CheckThresholds, snapshot_profile, validate_snapshot

N_USERS, N_ITEMS, PER_USER = 50, 40, 8
SCALE = {"rating_scale": (1, 5)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("posters")
    paths = []
    for i in range(N_ITEMS):
        path = folder / f"{i}.png"
        Image.new("RGB", (16, 16), (6 * i, 100, 200)).save(path)
        paths.append(str(path))
    # A PNG under a .jpg name: readable, because an image is judged by its content.
    disguised = folder / "disguised.jpg"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(disguised, format="PNG")
    paths[0] = str(disguised)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"these bytes are no JPEG " * 40)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg")
    truncated = folder / "truncated.jpg"  # a JPEG header opens fine; decoding must fail
    truncated.write_bytes((folder / "whole.jpg").read_bytes()[:2000])
    return {"paths": paths, "corrupt": str(corrupt), "truncated": str(truncated),
            "missing": str(folder / "gone.jpg")}


@pytest.fixture(scope="module")
def snapshot(images) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A clean snapshot: every user rated PER_USER distinct items, every item has text and art."""
    rng = np.random.default_rng(0)
    item_ids = [f"m{i}" for i in range(N_ITEMS)]
    pairs = [(f"u{u}", item_ids[i]) for u in range(N_USERS)
             for i in rng.choice(N_ITEMS, PER_USER, replace=False)]
    interactions = pd.DataFrame(pairs, columns=["user_id", "item_id"])
    interactions["rating"] = rng.integers(1, 6, len(pairs))
    interactions["timestamp"] = 978_300_000 + rng.permutation(len(pairs))
    items = pd.DataFrame({
        "item_id": item_ids,
        "title": [f"Movie {i} (1999)" for i in range(N_ITEMS)],
        "genres": ["Drama|Comedy" if i % 3 else "" for i in range(N_ITEMS)],
        "image_path": images["paths"],
        "overview": [f"A story about thing {i}." for i in range(N_ITEMS)],
    })
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(N_USERS)],
                          "gender": ["F", "M"] * (N_USERS // 2)})
    return interactions, items, users


@pytest.fixture(scope="module")
def clean_result(snapshot):
    return validate_snapshot(*snapshot, thresholds=CheckThresholds(**SCALE))


def _validate(interactions, items, users=None, previous_profile=None, **thresholds):
    return validate_snapshot(interactions, items, users, CheckThresholds(**(SCALE | thresholds)),
                             previous_profile=previous_profile)


def _failure(outcome, expectation: str, column: str | None = None) -> dict:
    found = [f for f in outcome.failures
             if f["expectation"] == expectation and (column is None or column in f["columns"])]
    assert len(found) == 1, (expectation, column, outcome.failures)
    return found[0]


def _rows(failure: dict) -> list:
    return [e["row"] for e in failure["examples"]]


# -- a clean snapshot ----------------------------------------------------------------------------

def test_clean_snapshot_passes_every_check(clean_result):
    assert clean_result.passed and clean_result.blocking == []
    assert [c.name for c in clean_result.checks] == ["parsing", "interactions", "catalog",
                                                     "referential", "drift"]
    assert all(c.passed and not c.failures for c in clean_result.checks)
    assert [c.severity for c in clean_result.checks] == ["ERROR"] * 4 + ["WARN"]
    # the PNG named .jpg counts as readable
    assert clean_result.check("catalog").statistics["readable_image_share"] == 1.0
    assert clean_result.check("drift").statistics == {"evaluated": False}


def test_result_is_json_serializable_without_nan(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions["rating"] = interactions["rating"].astype(object)
    interactions.loc[2, "rating"] = np.nan
    interactions.loc[3, "rating"] = "n/a"
    items.loc[1, "title"] = None
    result = _validate(interactions, items, users, previous_profile=snapshot_profile(*snapshot))
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["blocking"] == ["interactions", "catalog"]
    json.dumps(result.profile, allow_nan=False)


def test_importing_the_package_loads_neither_gx_nor_orchestration():
    code = ("import sys, data_checks; "
            "print(sorted(m for m in ('great_expectations', 'dagster', 'bentoml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- interactions --------------------------------------------------------------------------------

def test_ratings_outside_the_scale_fail_naming_the_rows(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions.loc[[3, 17], "rating"] = [0, 9]
    check = _validate(interactions, items, users).check("interactions")
    assert not check.passed
    failure = _failure(check, "expect_column_values_to_be_between", "rating")
    assert failure["unexpected_count"] == 2
    assert failure["unexpected_percent"] == pytest.approx(100 * 2 / len(interactions))
    assert [(e["row"], e["rating"]) for e in failure["examples"]] == [(3, 0), (17, 9)]
    assert failure["examples"][0]["user_id"] == interactions.loc[3, "user_id"]


def test_non_numeric_ratings_are_reported_as_written(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions["rating"] = interactions["rating"].astype(str)
    interactions.loc[5, "rating"] = "five"
    interactions.loc[6, "rating"] = None
    check = _validate(interactions, items, users).check("interactions")
    failure = _failure(check, "expect_column_values_to_not_be_null", "rating")
    assert failure["unexpected_count"] == 2
    assert [(e["row"], e["rating"]) for e in failure["examples"]] == [(5, "five"), (6, None)]
    # numeric strings are numbers; the two unreadable ones are not counted again as out of scale
    assert [f["expectation"] for f in check.failures] == ["expect_column_values_to_not_be_null"]


def test_implausible_timestamps(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions["timestamp"] = interactions["timestamp"].astype(object)
    interactions.loc[1, "timestamp"] = 978_300_000_000  # milliseconds: far in the future
    interactions.loc[2, "timestamp"] = 86_400  # 1970
    interactions.loc[4, "timestamp"] = 978_300_000.5
    interactions.loc[8, "timestamp"] = "yesterday"
    check = _validate(interactions, items, users).check("interactions")
    assert _rows(_failure(check, "expect_column_values_to_be_between", "timestamp")) == [1, 2]
    assert _rows(_failure(check, "expect_column_values_to_be_in_set", "timestamp")) == [4]
    assert _rows(_failure(check, "expect_column_values_to_not_be_null", "timestamp")) == [8]


def test_missing_columns_are_named_not_raised(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    result = _validate(interactions.drop(columns=["item_id"]), items.drop(columns=["title"]), users)
    assert result.blocking == [result.check(n) for n in ("interactions", "catalog", "referential")]
    assert _failure(result.check("interactions"), "expect_column_to_exist")["columns"] == ["item_id"]
    assert _failure(result.check("catalog"), "expect_column_to_exist")["columns"] == ["title"]
    missing = _failure(result.check("referential"), "expect_column_to_exist")
    assert (missing["table"], missing["columns"]) == ("interactions", ["item_id"])


def test_duplicate_interactions_are_found(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    doubled = pd.concat([interactions, interactions.iloc[[7]]], ignore_index=True)
    check = _validate(doubled, items, users).check("interactions")
    failure = _failure(check, "expect_compound_columns_to_be_unique")
    assert failure["columns"] == ["user_id", "item_id", "timestamp"]
    assert failure["unexpected_count"] == 2 and _rows(failure) == [7, len(interactions)]


def test_null_ids_and_mixed_id_types(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    items["item_id"] = range(N_ITEMS)  # ints in the catalog, "m<i>" strings below
    interactions["item_id"] = interactions["item_id"].str[1:].astype(int).astype(object)
    interactions.loc[0, "item_id"] = str(interactions.loc[0, "item_id"])  # '7' and 7: one id
    interactions.loc[9, "user_id"] = None
    result = _validate(interactions, items, users)
    assert _rows(_failure(result.check("interactions"), "expect_column_values_to_not_be_null",
                          "user_id")) == [9]
    assert result.check("referential").passed  # a null id is not an unknown id


def test_too_few_interactions_per_user(snapshot):
    check = _validate(*snapshot, min_interactions_per_user=PER_USER + 1).check("interactions")
    failure = _failure(check, "expect_column_values_to_be_between", "user_id")
    assert failure["unexpected_count"] == N_USERS
    assert failure["examples"][0] == {"user_id": "u0", "n_interactions": PER_USER}


# -- referential integrity -----------------------------------------------------------------------

def test_unknown_items_and_users_fail_referential(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions.loc[[4, 11], "item_id"] = "ghost"
    interactions.loc[6, "user_id"] = "stranger"
    check = _validate(interactions, items, users).check("referential")
    assert not check.passed
    items_failure = _failure(check, "expect_column_values_to_be_in_set", "item_id")
    assert items_failure["unexpected_count"] == 2
    assert [(e["row"], e["item_id"]) for e in items_failure["examples"]] == [(4, "ghost"),
                                                                           (11, "ghost")]
    assert _rows(_failure(check, "expect_column_values_to_be_in_set", "user_id")) == [6]
    assert check.statistics["unknown_items"] == ["ghost"]
    assert check.statistics["unknown_users"] == ["stranger"]


def test_without_a_users_table_only_items_are_matched(snapshot):
    interactions, items, _ = snapshot
    interactions = interactions.copy()
    interactions.loc[6, "user_id"] = "stranger"
    check = _validate(interactions, items).check("referential")
    assert check.passed and "n_unknown_users" not in check.statistics


# -- catalog -------------------------------------------------------------------------------------

def test_few_broken_images_pass_the_threshold(snapshot, images):
    interactions, items, users = (t.copy() for t in snapshot)
    items.loc[[1, 2, 3], "image_path"] = images["corrupt"]
    check = _validate(interactions, items, users).check("catalog")
    assert check.passed
    assert check.statistics["readable_image_share"] == pytest.approx(37 / 40)


def test_broken_images_beyond_the_threshold_fail(snapshot, images):
    interactions, items, users = (t.copy() for t in snapshot)
    items.loc[[1, 2, 3], "image_path"] = images["corrupt"]
    items.loc[4, "image_path"] = images["truncated"]
    items.loc[5, "image_path"] = images["missing"]
    items.loc[6, "image_path"] = None  # no image, in a catalog that has images: unreadable
    check = _validate(interactions, items, users).check("catalog")
    failure = _failure(check, "expect_column_values_to_be_in_set", "image_path")
    assert failure["unexpected_count"] == 6 and failure["threshold"] == 0.9
    assert _rows(failure) == [1, 2, 3, 4, 5]
    problems = [e["image_problem"] for e in failure["examples"]]
    assert "UnidentifiedImageError" in problems[0] and "truncated" in problems[3]
    assert problems[4] == "file not found"
    assert check.statistics["image_problems"]["no image path"] == 1


def test_catalog_without_images_skips_the_image_check(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    items["image_path"] = None
    check = _validate(interactions, items, users).check("catalog")
    assert check.passed and "readable_image_share" not in check.statistics


@pytest.mark.parametrize("n_without_text, passes", [(15, True), (25, False)])
def test_text_coverage(snapshot, n_without_text, passes):
    interactions, items, users = (t.copy() for t in snapshot)
    items.loc[:n_without_text - 1, "overview"] = ["", "  ", None] * 5 + [""] * (n_without_text - 15)
    check = _validate(interactions, items, users).check("catalog")
    assert check.passed is passes
    assert check.statistics["text_coverage"] == pytest.approx(1 - n_without_text / N_ITEMS)
    if not passes:
        failure = _failure(check, "expect_column_values_to_be_in_set", "has_text")
        assert failure["unexpected_count"] == n_without_text and _rows(failure) == [0, 1, 2, 3, 4]
        assert "overview" in failure["description"]


def test_text_coverage_falls_back_to_titles(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    items = items.drop(columns=["overview"])
    assert _validate(interactions, items, users).check("catalog").statistics["text_coverage"] == 1.0


def test_duplicate_item_ids_and_blank_titles(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    items.loc[3, "item_id"] = "m2"
    items.loc[8, "title"] = "   "
    check = _validate(interactions, items, users).check("catalog")
    assert _rows(_failure(check, "expect_column_values_to_be_unique", "item_id")) == [2, 3]
    assert _rows(_failure(check, "expect_column_values_to_match_regex", "title")) == [8]


# -- drift ---------------------------------------------------------------------------------------

def test_identical_snapshot_shows_no_drift(snapshot):
    result = _validate(*snapshot, previous_profile=snapshot_profile(*snapshot))
    drift = result.check("drift")
    assert drift.passed and drift.statistics["evaluated"]
    assert drift.statistics["volume_change"] == 0 and drift.statistics["new_item_share"] == 0


def test_volume_change_and_new_items_warn_without_blocking(snapshot):
    interactions, items, users = snapshot
    previous = snapshot_profile(interactions.iloc[:150], items.iloc[:25], users)
    result = _validate(interactions, items, users, previous_profile=previous)
    drift = result.check("drift")
    assert drift.severity == "WARN" and not drift.passed
    assert result.passed and result.warnings == [drift]  # drift warns, it does not block
    volume = _failure(drift, "max_volume_change")
    assert volume["observed_value"] == pytest.approx(len(interactions) / 150 - 1)
    new_items = _failure(drift, "max_new_item_share")
    assert new_items["unexpected_count"] == 15 and new_items["observed_value"] == 15 / 40
    assert new_items["examples"][0] == {"item_id": "m25"}


def test_rating_shift_warns(snapshot):
    interactions, items, users = (t.copy() for t in snapshot)
    previous = snapshot_profile(interactions, items, users)
    interactions["rating"] = 5
    drift = _validate(interactions, items, users, previous_profile=previous).check("drift")
    assert [f["expectation"] for f in drift.failures] == ["max_rating_mean_shift"]
    assert drift.statistics["rating_histogram_distance"] > 0.5


# -- thresholds, docs ----------------------------------------------------------------------------

def test_thresholds_from_a_dict():
    thresholds = CheckThresholds.from_dict({"rating_scale": [1, 5], "min_interactions_per_user": 20})
    assert thresholds.rating_scale == (1.0, 5.0) and thresholds.min_interactions_per_user == 20
    assert CheckThresholds.from_dict(thresholds.to_dict()) == thresholds
    with pytest.raises(ValueError, match="unknown threshold.*readable_images_min"):
        CheckThresholds.from_dict({"readable_images_min": 0.5})
    with pytest.raises(ValueError, match="text_coverage_min"):
        CheckThresholds(text_coverage_min=50)
    with pytest.raises(ValueError, match="rating_scale"):
        CheckThresholds(rating_scale=(5, 1))


def test_thresholds_given_as_a_dict_to_the_runner(snapshot):
    with pytest.raises(ValueError, match="unknown threshold"):
        validate_snapshot(*snapshot, thresholds={"max_volume": 1})
    result = validate_snapshot(*snapshot, thresholds={"min_interactions_per_user": PER_USER + 1})
    assert not result.check("interactions").passed


def test_data_docs_site_is_built(snapshot, tmp_path):
    interactions, items, users = (t.copy() for t in snapshot)
    interactions.loc[0, "rating"] = 7
    result = validate_snapshot(interactions, items, users, CheckThresholds(**SCALE),
                               docs_dir=tmp_path / "docs")
    index = tmp_path / "docs" / "index.html"
    assert result.docs_index == str(index) and index.is_file()
    # validations/<suite>/<run name>/<run time>/<batch>.html, one per validated frame
    pages = {p.relative_to(tmp_path / "docs" / "validations").parts[0]
             for p in (tmp_path / "docs" / "validations").rglob("*.html")}
    assert pages == {"parsing", "interactions", "interactions_per_user", "catalog", "referential"}
    assert "rating" in (tmp_path / "docs" / "expectations" / "interactions.html").read_text()
