"""Raw dataset snapshots: ingest leniently, save by content hash, build the Dataset after checks.

The readers in `readers.py` are strict: a bad rating or an unknown movie id raises. Before
training, the orchestration wants the opposite order — take whatever arrived, let the data
checks (`data_checks/`) say what is wrong with it, and only build the strict `Dataset` once the
checks pass. So this module:

- `read_raw(data)` ingests 'demo', a MovieLens-1M directory, a generic folder
  (`generic.py`) or a saved dataset directory into RAW frames (`raw.RawTables`: raw string
  ids; ratings/timestamps numeric where every value parses, text otherwise; the source line
  of every row; the lines that did not parse), raising only for files it cannot read;
- `save_snapshot` / `load_snapshot` keep them as parquet under `<root>/<content hash>/`;
- `dataset_from_raw` builds the strict `Dataset` from validated raw frames, with the index
  order each source uses (ML-1M: users by numeric id, items by first appearance, exactly what
  `read_movielens` gives, so the canonical NCF test files still line up); `strict_dataset`
  does the same for frames that skipped the checks, raising on what they would block;
- `source_fingerprint` is a cheap hash of what a source would ingest (file bytes and poster
  names/sizes), the sensor's run key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.atomic import atomic_dir
from bonmf_core.data.dataset import Dataset
from bonmf_core.errors import DataError
from bonmf_core.config import DataConfig
from bonmf_core.data.generic import generic_file, read_raw_generic
from bonmf_core.data.paths import outside_reason
from bonmf_core.data.raw import (RawTables, image_identity, numeric_or_text as _numeric_or_text,
                                 str_series as _str)
from bonmf_core.data.readers import poster_paths
from bonmf_core.data.textfiles import decode_text, read_file, split_csv, split_dat

SNAPSHOT_FORMAT = 1
ML_RATING_SCALE = (1.0, 5.0)


# -- sources ----------------------------------------------------------------------------------

def source_kind(source: str | Path) -> str:
    """'demo' | 'saved' (dataset.json) | 'movielens' (ratings.dat) | 'generic'
    (interactions.csv|tsv|parquet)."""
    if str(source) == "demo":
        return "demo"
    path = Path(source)
    if not path.is_dir():
        raise DataError("data folder not found (expected 'demo' or a folder)", path=path)
    if (path / "dataset.json").exists():
        return "saved"
    if (path / "ratings.dat").exists():
        return "movielens"
    if generic_file(path, "interactions") is not None:
        return "generic"
    raise DataError("not a dataset: expected 'demo', a folder with interactions.csv|tsv|parquet "
                    "(+ optional items.*, users.*), a MovieLens-1M folder (ratings.dat) or a "
                    "saved dataset (dataset.json)", path=path)


def read_raw(data: DataConfig, image_dir: str | Path | None = None) -> RawTables:
    """Ingest the `data` section's source into raw frames (lenient: bad values are for the
    checks to find; only unreadable files raise)."""
    kind = source_kind(data.source)
    if kind == "demo":
        from bonmf_core.data.demo import demo_dataset
        from bonmf_core.settings import state_dir

        # The pictures depend on every demo argument, so the folder is keyed by all of them.
        image_dir = Path(image_dir or (state_dir() / "demo" / f"seed-{data.demo_seed}-"
                                       f"{data.demo_users}x{data.demo_items}" / "images"))
        ds = demo_dataset(seed=data.demo_seed, n_users=data.demo_users,
                          n_items=data.demo_items, image_dir=image_dir)
        return raw_tables_from_dataset(ds, source="demo", root=image_dir)
    folder = Path(data.source)
    if kind == "saved":
        return raw_tables_from_dataset(Dataset.load(folder), source=str(folder.resolve()),
                                       root=folder)
    if kind == "generic":
        return read_raw_generic(folder, data)
    return read_raw_movielens(folder)


def raw_tables_from_dataset(ds: Dataset, source: str = "",
                            root: str | Path | None = None) -> RawTables:
    """A Dataset's frames with indices mapped back to raw ids (catalog / table order);
    `root` is the folder its image paths must stay in."""
    inter = ds.interactions
    frame = pd.DataFrame({"user_id": _str(ds.user_ids[inter["user"].to_numpy()]),
                          "item_id": _str(ds.item_ids[inter["item"].to_numpy()])})
    for col in ("rating", "timestamp"):
        if col in inter.columns:
            frame[col] = inter[col].to_numpy()
    return RawTables(name=ds.name, source=source or ds.name, interactions=frame,
                     items=ds.items.reset_index(drop=True).copy(),
                     users=None if ds.users is None else ds.users.reset_index(drop=True).copy(),
                     rating_scale=ds.rating_scale, item_order="catalog", user_order="table",
                     root=None if root is None else str(Path(root).resolve()))


def read_raw_movielens(directory: str | Path) -> RawTables:
    """Lenient parse of a MovieLens-1M directory (ratings.dat, movies.dat, optional users.dat,
    overviews_tmdb.csv, posters/). Lines with the wrong number of fields are kept out of the
    frames and recorded in `problems` with their line numbers (the parsing check blocks on
    them); values are kept as written for the checks to judge."""
    directory = Path(directory)
    problems: dict = {}
    origins: dict = {}
    ratings = _read_dat_lenient(directory / "ratings.dat",
                                ("user_id", "item_id", "rating", "timestamp"), problems,
                                origins, "interactions")
    interactions = pd.DataFrame({"user_id": _str(ratings["user_id"].str.strip()),
                                 "item_id": _str(ratings["item_id"].str.strip()),
                                 "rating": _numeric_or_text(ratings["rating"]),
                                 "timestamp": _numeric_or_text(ratings["timestamp"], integer=True)})
    movies = _read_dat_lenient(directory / "movies.dat", ("item_id", "title", "genres"),
                               problems, origins, "items")
    items = pd.DataFrame({"item_id": _str(movies["item_id"].str.strip()),
                          "title": _str(movies["title"]), "genres": _str(movies["genres"])})
    posters = directory / "posters"
    found = poster_paths(posters) if posters.is_dir() else {}
    items["image_path"] = _str([found.get(i) for i in items["item_id"]])
    overviews = directory / "overviews_tmdb.csv"
    if overviews.exists():
        _add_overviews(items, overviews, problems)
    users = None
    if (directory / "users.dat").exists():
        u = _read_dat_lenient(directory / "users.dat",
                              ("user_id", "gender", "age", "occupation", "zip"), problems,
                              origins, "users")
        users = pd.DataFrame({"user_id": _str(u["user_id"].str.strip()),
                              **{c: _str(u[c]) for c in ("gender", "age", "occupation")}})
    return RawTables(name=directory.resolve().name, source=str(directory.resolve()),
                     interactions=interactions, items=items, users=users,
                     rating_scale=ML_RATING_SCALE, item_order="first_seen",
                     user_order="numeric", problems=problems,
                     root=str(directory.resolve()), origins=origins)


def _add_overviews(items: pd.DataFrame, path: Path, problems: dict) -> None:
    """The TMDB overview/keywords side file (UTF-8 CSV keyed by movieId) as text columns."""
    records = split_csv(decode_text(read_file(path), path, "utf-8"), path)
    problems.update(records.problems())
    text = pd.DataFrame(records.rows, columns=records.header, dtype=object)
    if "movieId" not in text.columns:
        raise DataError(f"column 'movieId' not found; columns found: {records.header}",
                        path=path, field="movieId")
    text = (text.assign(movieId=text["movieId"].str.strip())
            .drop_duplicates("movieId").set_index("movieId"))
    for src, dst in (("tmdb_overview", "overview"), ("tmdb_keywords", "keywords")):
        if src in text.columns:
            items[dst] = _str(text[src].reindex(items["item_id"]).fillna("").to_numpy())


def _read_dat_lenient(path: Path, names: tuple[str, ...], problems: dict, origins: dict,
                      table: str) -> pd.DataFrame:
    records = split_dat(decode_text(read_file(path), path, "auto"), names, path.name)
    problems.update(records.problems())
    origins[table] = {"file": path.name, "lines": np.asarray(records.lines, dtype=np.int64)}
    return pd.DataFrame(records.rows, columns=list(names), dtype=object).astype(str)


# -- storage ----------------------------------------------------------------------------------

def save_snapshot(raw: RawTables, root: str | Path) -> tuple[str, Path]:
    """Write `raw` under `root/<content hash>/` (once: an existing snapshot is reused)."""
    digest = raw.content_hash()
    path = Path(root) / digest
    if not (path / "snapshot.json").exists():
        with atomic_dir(path) as tmp:
            raw.interactions.to_parquet(tmp / "interactions.parquet", index=False)
            raw.items.to_parquet(tmp / "items.parquet", index=False)
            if raw.users is not None:
                raw.users.to_parquet(tmp / "users.parquet", index=False)
            origins = {}
            for table, origin in raw.origins.items():
                if origin["lines"] is not None:     # None: Parquet, rows are their own origin
                    np.save(tmp / f"lines.{table}.npy", origin["lines"], allow_pickle=False)
                origins[table] = origin["file"]
            (tmp / "snapshot.json").write_text(json.dumps({
                "format": SNAPSHOT_FORMAT, "content_hash": digest, "name": raw.name,
                "source": raw.source, "rating_scale": raw.rating_scale,
                "item_order": raw.item_order, "user_order": raw.user_order,
                "problems": raw.problems, "root": raw.root, "origins": origins,
                **raw.counts()}, indent=2))
    return digest, path


def load_snapshot(path: str | Path) -> RawTables:
    path = Path(path)
    meta = json.loads((path / "snapshot.json").read_text())
    users = path / "users.parquet"
    scale = meta.get("rating_scale")
    return RawTables(name=meta["name"], source=meta["source"],
                     interactions=pd.read_parquet(path / "interactions.parquet"),
                     items=pd.read_parquet(path / "items.parquet"),
                     users=pd.read_parquet(users) if users.exists() else None,
                     rating_scale=tuple(scale) if scale else None,
                     item_order=meta["item_order"], user_order=meta["user_order"],
                     problems=meta.get("problems", {}), root=meta.get("root"),
                     origins={table: {"file": file, "lines": _lines(path, table)}
                              for table, file in meta.get("origins", {}).items()})


def _lines(path: Path, table: str) -> np.ndarray | None:
    lines = path / f"lines.{table}.npy"
    return np.load(lines, allow_pickle=False) if lines.exists() else None


# -- the strict build -------------------------------------------------------------------------

def strict_dataset(raw: RawTables) -> Dataset:
    """The `Dataset` from raw frames that have not been through the checks (the benchmarks'
    and the library's direct path): the first problem the checks would block on raises a
    DataError naming its file and line instead."""
    for file, found in raw.problems.items():
        first = found["examples"][0]
        raise DataError(f"{first['problem']} ({found['malformed_lines']} line(s) do not parse)",
                        path=Path(raw.root or ".") / file, line=first["line"])
    _require_structure(raw)
    for column in ("rating", "timestamp"):
        values = raw.interactions.get(column)
        if values is not None and values.dtype.kind not in "if":
            row = int(np.argmax(pd.to_numeric(values, errors="coerce").isna().to_numpy()))
            expected = ("epoch seconds or an ISO 8601 datetime" if column == "timestamp"
                        else "a number")
            raise _row_error(raw, "interactions", row, column,
                             f"expected {expected}, found {values.iloc[row]!r}")
    if raw.rating_scale is not None and "rating" in raw.interactions:
        low, high = raw.rating_scale
        outside = ~raw.interactions["rating"].between(low, high).to_numpy()
        if outside.any():
            row = int(np.argmax(outside))
            raise _row_error(raw, "interactions", row, "rating",
                             f"rating {raw.interactions['rating'].iloc[row]:g} is outside "
                             f"the declared scale [{low:g}, {high:g}]")
    for row, path in enumerate(raw.items.get("image_path", [])):
        reason = outside_reason(path, raw.root)
        if reason:
            raise _row_error(raw, "items", row, "image_path", f"{path!r} is {reason}")
    return dataset_from_raw(raw)


def _require_structure(raw: RawTables) -> None:
    """Columns present, ids present, catalog ids unique, some interactions: what the blocking
    checks ask of the structure, as the first DataError (named by file and line)."""
    tables = (("interactions", raw.interactions, ("user_id", "item_id")),
              ("items", raw.items, ("item_id", "title")),
              ("users", raw.users, ("user_id",)))
    for table, frame, required in tables:
        if frame is None:
            continue
        origin = raw.origins.get(table, {})
        where = Path(raw.root or ".") / origin["file"] if origin else None
        for column in required:
            if column not in frame.columns:
                given = origin.get("columns", {}).get(column, column)
                raise DataError(f"no '{given}' column; columns found: "
                                f"{origin.get('found', list(frame.columns))}", path=where,
                                field=given)
            missing = frame[column].isna().to_numpy()
            if missing.any():
                raise _row_error(raw, table, int(np.argmax(missing)), column,
                                 f"missing {column}")
        if table != "interactions":
            repeated = frame[required[0]].duplicated().to_numpy()
            if repeated.any():
                row = int(np.argmax(repeated))
                raise _row_error(raw, table, row, required[0],
                                 f"{required[0]} {frame[required[0]].iloc[row]!r} appears "
                                 f"more than once")
    key = [c for c in ("user_id", "item_id", "timestamp") if c in raw.interactions.columns]
    repeated = raw.interactions.duplicated(subset=key).to_numpy()
    if repeated.any():   # the same pair at another time is a repeat interaction, kept
        raise _row_error(raw, "interactions", int(np.argmax(repeated)), "item_id",
                         f"the same ({', '.join(key)}) appears more than once")
    if raw.interactions.empty:
        raise DataError("holds no interactions", path=Path(raw.root or ".") / raw.origins.get(
            "interactions", {}).get("file", "."))


def _row_error(raw: RawTables, table: str, row: int, column: str, message: str) -> DataError:
    origin = raw.origins.get(table)
    if origin is None:
        return DataError(f"{table} row {row + 1}: {message}", field=column)
    column = origin.get("columns", {}).get(column) or column   # the name in the user's file
    if origin["lines"] is None:
        return DataError(f"row {row + 1}: {message}", path=Path(raw.root or ".") / origin["file"],
                         field=column)
    return DataError(message, path=Path(raw.root or ".") / origin["file"],
                     line=int(origin["lines"][row]), field=column)


def dataset_from_raw(raw: RawTables) -> Dataset:
    """The strict `Dataset` from raw frames that passed the checks (raises DataError if not)."""
    inter, items = raw.interactions, raw.items.reset_index(drop=True)
    inter_items = inter["item_id"].astype(str)
    if raw.item_order == "first_seen":
        order = pd.unique(pd.concat([inter_items, items["item_id"].astype(str)],
                                    ignore_index=True))
    else:
        order = items["item_id"].astype(str).to_numpy()
    item_index = pd.Index(order)
    if not item_index.is_unique:
        raise DataError("catalog item ids must be unique", field="item_id")
    catalog_pos = pd.Index(items["item_id"].astype(str)).get_indexer(item_index)
    if (catalog_pos < 0).any():
        unknown = ~inter_items.isin(set(items["item_id"].astype(str))).to_numpy()
        row = int(np.argmax(unknown))
        raise _row_error(raw, "interactions", row, "item_id",
                         f"item {inter_items.iloc[row]!r} is not in the catalog")
    items = items.iloc[catalog_pos].reset_index(drop=True)

    inter_users = inter["user_id"].astype(str)
    users = raw.users.reset_index(drop=True) if raw.users is not None else None
    known = users["user_id"].astype(str) if users is not None else pd.Series(pd.unique(inter_users))
    if raw.user_order == "numeric":
        ids = pd.unique(known.to_numpy())
        user_order = ids[np.argsort(pd.to_numeric(pd.Series(ids)).to_numpy(), kind="stable")]
    else:
        user_order = pd.unique(known.to_numpy())
    user_index = pd.Index(user_order)
    if users is not None:
        users = users.iloc[pd.Index(users["user_id"].astype(str)).get_indexer(user_index)]
        users = users.reset_index(drop=True)
        users = pd.DataFrame({c: _str(users[c].astype(str).to_numpy()) for c in users.columns})
    else:
        users = pd.DataFrame({"user_id": _str(user_order)})
    u = user_index.get_indexer(inter_users)
    i = item_index.get_indexer(inter_items)
    if (u < 0).any():
        row = int(np.argmax(u < 0))
        raise _row_error(raw, "interactions", row, "user_id",
                         f"user {inter_users.iloc[row]!r} is not in the users table")
    frame = pd.DataFrame({"user": u.astype(np.int64), "item": i.astype(np.int64)})
    if "rating" in inter.columns:
        frame["rating"] = pd.to_numeric(inter["rating"]).to_numpy(dtype=np.float32)
    if "timestamp" in inter.columns:
        frame["timestamp"] = pd.to_numeric(inter["timestamp"]).to_numpy(dtype=np.int64)
    out_items = pd.DataFrame({"item_id": _str(items["item_id"].astype(str).to_numpy())})
    for col in items.columns:
        if col != "item_id":
            out_items[col] = _str(items[col].to_numpy())
    return Dataset(name=raw.name, interactions=frame, items=out_items, users=users,
                   rating_scale=raw.rating_scale)


def source_fingerprint(data: DataConfig) -> str:
    """A cheap hash of what `read_raw(data)` would ingest, without parsing it (any format).

    Files directly in the source folder are hashed by content; image folders (posters/,
    images/) by file name, size and modification time (an edited poster is seen without
    reading every picture); links that lead outside the folder are ignored. The demo is its
    arguments.
    """
    source, demo_seed, demo_users, demo_items = (data.source, data.demo_seed, data.demo_users,
                                                 data.demo_items)
    h = hashlib.sha256()
    if str(source) == "demo":
        h.update(f"demo:{demo_seed}:{demo_users}:{demo_items}".encode())
        return h.hexdigest()[:16]
    root = Path(source)
    if not root.is_dir():
        raise DataError("source folder not found", path=root)
    for entry in sorted(root.rglob("*")):
        if not entry.is_file() or entry.name.startswith(".") or outside_reason(str(entry), root):
            continue
        rel = str(entry.relative_to(root))
        if entry.parent == root:
            h.update(rel.encode() + b"\0")
            with open(entry, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            stat = entry.stat()
            h.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
