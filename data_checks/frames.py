"""Raw tables turned into frames the expectations can evaluate, whatever shape the input is in.

The raw columns are kept for the examples a failure shows (a rating of "abc" must be shown as
"abc"), and derived columns carry what an expectation tests (`rating_value`, `image_readable`),
so an expectation never has to compare a string with a number. Frames of input rows are indexed
by the row's position, named `row`, which is what a failure's examples point at.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from bonmf_core.data.paths import outside_reason

# Catalog columns with a fixed meaning; every other catalog column is a free text field
# (same rule as bonmf_core.data.dataset.CATALOG_CORE_COLUMNS).
CATALOG_CORE_COLUMNS = ("item_id", "title", "genres", "image_path")

# Derived column -> the input column it is read from, so a failure names what to fix.
SOURCE_COLUMNS = {"rating_value": "rating", "timestamp_value": "timestamp",
                  "timestamp_is_integer": "timestamp", "item_in_catalog": "item_id",
                  "user_in_users": "user_id", "image_readable": "image_path",
                  "image_inside": "image_path",
                  "n_interactions": "user_id"}


def as_text(column: pd.Series) -> pd.Series:
    """Ids as Python strings (object dtype), missing values as None: '7' and 7 name one id."""
    missing = column.isna().to_numpy()
    if pd.api.types.is_string_dtype(column.dtype) and column.dtype != object:
        values = column.to_numpy(dtype=object, na_value=None)
    else:
        values = column.astype(str).to_numpy(dtype=object)
        values[missing] = None
    return pd.Series(values, index=column.index, dtype=object)


def as_number(column: pd.Series) -> np.ndarray:
    """Floats, NaN where a value is missing or not a number (text, say)."""
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        return column.to_numpy(dtype=float, na_value=np.nan)
    return pd.to_numeric(column.astype(object), errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _row_index(n: int) -> pd.RangeIndex:
    return pd.RangeIndex(n, name="row")


def interaction_frame(interactions: pd.DataFrame) -> pd.DataFrame:
    """Ids as text, rating/timestamp kept raw next to their numeric reading."""
    frame = pd.DataFrame(index=_row_index(len(interactions)))
    for col in ("user_id", "item_id"):
        if col in interactions.columns:
            frame[col] = as_text(interactions[col]).set_axis(frame.index)
    if "rating" in interactions.columns:
        frame["rating"] = interactions["rating"].to_numpy()
        frame["rating_value"] = as_number(interactions["rating"])
    if "timestamp" in interactions.columns:
        value = as_number(interactions["timestamp"])
        frame["timestamp"] = interactions["timestamp"].to_numpy()
        frame["timestamp_value"] = value
        # None where the value is not a number at all: that is reported once, as non-numeric.
        frame["timestamp_is_integer"] = pd.Series(
            np.where(np.isnan(value), None, value % 1 == 0), index=frame.index, dtype=object)
    return frame


def per_user_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Interactions per user id, indexed by the user id (what a failure's examples point at)."""
    counts = frame["user_id"].value_counts(dropna=True).sort_index()
    return pd.DataFrame({"n_interactions": counts.to_numpy(dtype=np.int64)},
                        index=pd.Index(counts.index.to_numpy(dtype=object), name="user_id"))


def text_columns(items: pd.DataFrame) -> list[str]:
    return [str(c) for c in items.columns if c not in CATALOG_CORE_COLUMNS]


def has_text(items: pd.DataFrame) -> np.ndarray:
    """Whether each item has a non-blank value in some free text column (title if there are none)."""
    cols = text_columns(items) or (["title"] if "title" in items.columns else [])
    found = np.zeros(len(items), dtype=bool)
    for col in cols:
        text = as_text(items[col]).to_numpy()
        found |= np.array([v is not None and bool(v.strip()) for v in text], dtype=bool)
    return found


def catalog_frame(items: pd.DataFrame, image_root=None) -> pd.DataFrame:
    """Catalog ids/titles as text, text coverage, image containment and readability as
    derived columns. An image path leading outside `image_root` (the dataset's folder) is
    never opened: `image_inside` is False and the image counts as unreadable.

    The free text columns themselves are left out: overviews are long and the examples of a
    failure only need to say which item lacks text.
    """
    frame = pd.DataFrame(index=_row_index(len(items)))
    for col in ("item_id", "title"):
        if col in items.columns:
            frame[col] = as_text(items[col]).set_axis(frame.index)
    frame["has_text"] = has_text(items)
    if declares_images(items):
        paths = as_text(items["image_path"])
        outside = [outside_reason(p, image_root) for p in paths]
        problems = image_problems([None if o else p for p, o in zip(paths, outside)])
        problems = [o or p for o, p in zip(outside, problems)]
        frame["image_path"] = paths.set_axis(frame.index)
        frame["image_inside"] = pd.Series([None if p is None else o is None
                                           for p, o in zip(paths, outside)],
                                          index=frame.index, dtype=object)
        frame["image_readable"] = np.array([p is None for p in problems], dtype=bool)
        frame["image_problem"] = pd.Series(problems, index=frame.index, dtype=object)
    return frame


def declares_images(items: pd.DataFrame) -> bool:
    """A catalog without any image path has no images to check (rather than all broken)."""
    return "image_path" in items.columns and bool(items["image_path"].notna().any())


def image_problems(paths: list[str | None]) -> list[str | None]:
    """For each path, why its image cannot be decoded, or None when it can.

    Threads rather than processes: file reads and PIL's decoders release the GIL, and a pool of
    threads starts instantly. Each distinct path is opened once.
    """
    distinct = sorted({p for p in paths if p})
    workers = min(32, 4 * (os.cpu_count() or 1), max(1, len(distinct)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(distinct, pool.map(image_problem, distinct)))
    return [found[p] if p else "no image path" for p in paths]


def image_problem(path: str) -> str | None:
    """Decode the image, judged by its content, not its file name; None when it decodes."""
    from PIL import Image

    if not path.strip():
        return "no image path"
    if "://" in path:
        return "not a local file"
    try:
        with Image.open(path) as image:
            # JPEG decodes at up to 1/8 scale in draft mode: every byte is still read (so a
            # truncated file fails) at a fraction of the cost of a full decode.
            image.draft("RGB", (64, 64))
            image.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # noqa: BLE001 - a corrupt file can trip any error inside a decoder
        return f"{type(e).__name__}: {e}"
    return None


def referential_frame(interactions: pd.DataFrame, item_ids: pd.Series,
                      user_ids: pd.Series | None) -> pd.DataFrame:
    """Per interaction row: is its item in the catalog (and its user in the users table)?

    Membership is a derived boolean rather than an `in set` expectation over thousands of ids,
    which would be copied into the suite and every Data Docs page. Missing ids stay None: a
    null id is the interactions check's finding, not an unknown id.
    """
    frame = interactions[["user_id", "item_id"]].copy()
    frame["item_in_catalog"] = _membership(frame["item_id"], item_ids)
    if user_ids is not None:
        frame["user_in_users"] = _membership(frame["user_id"], user_ids)
    return frame


def _membership(ids: pd.Series, known: pd.Series) -> pd.Series:
    found = ids.isin(set(known.dropna()))
    return found.astype(object).where(ids.notna(), None)
