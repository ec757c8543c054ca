"""A user's own data folder: `interactions.csv|tsv|parquet`, optional `items.*`, `users.*`,
images, and an optional `dataset.yaml` describing them.

Column names default to the `data.columns` section (`user_id`, `item_id`, `rating`,
`timestamp`; `item_id`, `title`, `genres`, `text`, `image_path`); a `dataset.yaml` beside the
files may rename them, declare the rating scale, the encoding and a name, and wins over
`params.yaml` because it travels with the data:

    name: my-shop
    encoding: utf-8
    rating_scale: [1, 5]
    columns: {user_id: customer, item_id: sku, timestamp: ts, text: [description]}

Reading is lenient (as every snapshot reader): lines that do not parse are recorded with their
line numbers, values are kept as written, and the data checks judge both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from bonmf_core.config import ColumnsConfig, DataConfig
from bonmf_core.data.paths import resolve_image_path
from bonmf_core.data.raw import RawTables, numeric_or_text as _numeric_or_text, str_series as _str
from bonmf_core.data.textfiles import Records, decode_text, read_file, split_csv
from bonmf_core.errors import DataError

EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")
DESCRIPTION_FILE = "dataset.yaml"
_DESCRIPTION_KEYS = ("name", "encoding", "rating_scale", "columns")


def generic_file(folder: Path, table: str) -> Path | None:
    """`folder/<table>.<ext>` for the one extension present; two of them is ambiguous."""
    found = [folder / f"{table}{ext}" for ext in EXTENSIONS if (folder / f"{table}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} exist: keep one",
                        path=folder)
    return found[0] if found else None


def describe(folder: Path, data: DataConfig) -> tuple[DataConfig, str]:
    """The `data` section with the folder's `dataset.yaml` laid over it, and the name it
    gives the dataset (the folder's name when none)."""
    path = folder / DESCRIPTION_FILE
    if not path.is_file():
        return data, folder.resolve().name
    try:
        given = yaml.safe_load(decode_text(read_file(path), path, "utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"not valid YAML: {getattr(e, 'problem', e)}", path=path,
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(given, dict):
        raise DataError("must be a mapping of name, encoding, rating_scale, columns", path=path)
    unknown = sorted(set(given) - set(_DESCRIPTION_KEYS))
    if unknown:
        raise DataError(f"unknown key(s) {unknown}; known: {list(_DESCRIPTION_KEYS)}",
                        path=path, field=unknown[0])
    merged = {**data.model_dump(), **{k: given[k] for k in ("encoding", "rating_scale")
                                      if k in given},
              "columns": {**data.columns.model_dump(), **(given.get("columns") or {})}}
    try:
        return DataConfig.model_validate(merged), str(given.get("name") or folder.resolve().name)
    except ValidationError as e:
        detail = e.errors()[0]
        raise DataError(detail["msg"], path=path,
                        field=".".join(map(str, detail["loc"])) or None) from None


def _read(path: Path, encoding: str) -> tuple[pd.DataFrame, np.ndarray | None, dict]:
    """A table as text cells, the source line of each row (None for Parquet) and the lines
    that did not parse."""
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as e:
            raise DataError(f"not a readable Parquet file: {e}", path=path) from None
        return frame, None, {}
    records: Records = split_csv(decode_text(read_file(path), path, encoding), path,
                                 delimiter="\t" if path.suffix == ".tsv" else ",")
    frame = pd.DataFrame(records.rows, columns=records.header, dtype=object)
    return frame, np.asarray(records.lines, dtype=np.int64), records.problems()


def read_raw_generic(folder: Path, data: DataConfig):
    """Lenient read of a generic data folder into `RawTables`."""
    data, name = describe(folder, data)
    cols = data.columns
    problems, origins = {}, {}

    def table(name: str, required: bool = False):
        path = generic_file(folder, name)
        if path is None:
            if required:
                raise DataError(f"{name}.csv|tsv|parquet is missing", path=folder)
            return None
        frame, lines, found = _read(path, data.encoding)
        problems.update(found)
        frame = frame.rename(columns=lambda c: str(c).strip())
        # the file's own column names, so a strict error names what the user wrote
        origins[name] = {"file": path.name, "lines": lines, "found": list(frame.columns),
                         "columns": {"user_id": cols.user_id, "item_id": cols.item_id,
                                     "rating": cols.rating, "timestamp": cols.timestamp,
                                     "title": cols.title, "image_path": cols.image_path}}
        return frame

    inter = table("interactions", required=True)
    interactions = pd.DataFrame({
        canonical: _ids(inter[given]) for canonical, given in
        (("user_id", cols.user_id), ("item_id", cols.item_id)) if given in inter.columns})
    if cols.rating and cols.rating in inter.columns:
        interactions["rating"] = _numeric_or_text(_text(inter[cols.rating]))
    if cols.timestamp and cols.timestamp in inter.columns:
        interactions["timestamp"] = _seconds_or_text(_text(inter[cols.timestamp]))
    items = _items(table("items"), interactions, cols, folder)
    users = _users(table("users"), cols)
    return RawTables(name=name, source=str(folder.resolve()),
                     interactions=interactions.reset_index(drop=True), items=items,
                     users=users, rating_scale=data.rating_scale, item_order="first_seen",
                     user_order="table", problems=problems, root=str(folder.resolve()),
                     origins=origins)


def _text(col: pd.Series) -> pd.Series:
    return _str(col.astype(object).where(col.notna(), "").astype(str).to_numpy())


def _ids(col: pd.Series) -> pd.Series:
    """Ids as stripped text; an empty cell is a missing id (the checks name its line)."""
    text = _text(col).str.strip()
    return text.where(text != "", None)


def _seconds_or_text(col: pd.Series) -> pd.Series:
    """Integer seconds as they are; ISO-8601 datetimes (naive = UTC) as epoch seconds. A cell
    that is neither stays as written, so the checks name exactly that line."""
    num = _numeric_or_text(col, integer=True)
    if num.dtype.kind in "if" or not len(col):
        return num
    text = col.str.strip()
    seconds = pd.to_numeric(text, errors="coerce")
    dt = pd.to_datetime(text.where(seconds.isna()), errors="coerce", utc=True, format="ISO8601")
    from_dt = (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    seconds = seconds.fillna(from_dt)
    if seconds.notna().all():
        return seconds.astype(np.int64)
    # One type per column (Parquet): the parseable cells as their seconds, written as text.
    as_text = seconds.map(lambda v: "" if pd.isna(v) else str(int(v)))
    return _str(np.where(seconds.notna(), as_text, col).astype(str))


def _items(frame: pd.DataFrame | None, interactions: pd.DataFrame, cols: ColumnsConfig,
           folder: Path) -> pd.DataFrame:
    if frame is None:   # no catalog: the items are the ids the interactions name
        ids = pd.unique(interactions["item_id"].dropna()) if "item_id" in interactions else []
        return pd.DataFrame({"item_id": _str(ids), "title": _str(ids),
                             "genres": _str([""] * len(ids)),
                             "image_path": _str([None] * len(ids))})
    items = pd.DataFrame(index=range(len(frame)))
    if cols.item_id in frame.columns:
        items["item_id"] = _ids(frame[cols.item_id]).to_numpy()
    if cols.title in frame.columns:
        items["title"] = _text(frame[cols.title]).to_numpy()
    elif "item_id" in items:   # an untitled catalog is still recommendable: show the id
        items["title"] = items["item_id"].fillna("").to_numpy()
    items["genres"] = (_text(frame[cols.genres]).to_numpy()
                       if cols.genres and cols.genres in frame.columns else "")
    items["image_path"] = _str([resolve_image_path(v, folder) for v in frame[cols.image_path]]
                               if cols.image_path and cols.image_path in frame.columns
                               else [None] * len(frame))
    for c in cols.text:
        if c in frame.columns and c not in items.columns:
            items[c] = _text(frame[c]).to_numpy()
    return items.astype({c: "str" for c in items.columns if c != "image_path"})


def _users(frame: pd.DataFrame | None, cols: ColumnsConfig) -> pd.DataFrame | None:
    if frame is None:
        return None
    users = pd.DataFrame(index=range(len(frame)))
    if cols.user_id in frame.columns:
        users["user_id"] = _ids(frame[cols.user_id]).to_numpy()
    attributes = cols.user_attributes or [c for c in frame.columns if c != cols.user_id]
    for c in attributes:
        if c not in frame.columns:
            raise DataError(f"user attribute column '{c}' not found; columns found: "
                            f"{list(frame.columns)}", field="data.columns.user_attributes")
        users[c] = _text(frame[c]).to_numpy()
    return users.astype({c: "str" for c in users.columns})
