"""Raw dataset snapshots: ingest leniently, save by content hash, build the Dataset after checks.

The readers in `readers.py` are strict: a bad rating or an unknown movie id raises. Before
training, the orchestration wants the opposite order — take whatever arrived, let the data
checks (`data_checks/`) say what is wrong with it, and only build the strict `Dataset` once the
checks pass. So this module:

- `read_raw(source, ...)` ingests 'demo', a MovieLens-1M directory or a saved dataset directory
  into RAW frames (raw string ids; ratings/timestamps numeric where every value parses, text
  otherwise), never raising for bad values;
- `save_snapshot` / `load_snapshot` keep them as parquet under `<root>/<content hash>/`;
- `dataset_from_raw` builds the strict `Dataset` from validated raw frames, with the index
  order each source uses (ML-1M: users by numeric id, items by first appearance, exactly what
  `read_movielens` gives, so the canonical NCF test files still line up);
- `source_fingerprint` is a cheap hash of what a source would ingest (file bytes and poster
  names/sizes), the sensor's run key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.atomic import atomic_dir
from bonmf_core.data.dataset import Dataset
from bonmf_core.errors import DataError
from bonmf_core.data.readers import poster_paths
from bonmf_core.config import DataConfig

_DATA = DataConfig()   # the demo's defaults are the configuration's

SNAPSHOT_FORMAT = 1
ML_RATING_SCALE = (1.0, 5.0)


@dataclass
class RawTables:
    """Raw frames as the data checks take them, plus what is needed to build the Dataset.

    interactions: user_id (str), item_id (str), rating, timestamp.
    items: item_id, title, genres, image_path, free text columns.
    users: user_id + attribute columns, or None.
    item_order / user_order: how `dataset_from_raw` indexes them ('first_seen' | 'catalog',
        'numeric' | 'table').
    """

    name: str
    source: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    rating_scale: tuple[float, float] | None = None
    item_order: str = "catalog"
    user_order: str = "table"
    problems: dict = field(default_factory=dict)   # lines the lenient parser had to skip

    def content_hash(self) -> str:
        """Equal raw data (and equal image files by name and size), equal hash."""
        h = hashlib.sha256()
        for frame in (self.interactions, self.items, self.users):
            if frame is None:
                h.update(b"none")
                continue
            h.update(",".join(map(str, frame.columns)).encode())
            h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        if "image_path" in self.items.columns:
            for p in self.items["image_path"]:
                h.update(_file_stamp(p, with_mtime=False).encode())
        h.update(json.dumps([self.rating_scale, self.item_order, self.user_order]).encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict:
        return {"n_interactions": len(self.interactions), "n_items": len(self.items),
                "n_users": int(self.interactions["user_id"].nunique())
                if "user_id" in self.interactions.columns else 0}


def _file_stamp(path, with_mtime: bool) -> str:
    if not isinstance(path, str) or not path:
        return "-"
    try:
        st = os.stat(path)
    except OSError:
        return f"{Path(path).name}:missing"
    return f"{Path(path).name}:{st.st_size}" + (f":{st.st_mtime_ns}" if with_mtime else "")


# -- sources ----------------------------------------------------------------------------------

def source_kind(source: str | Path) -> str:
    if str(source) == "demo":
        return "demo"
    path = Path(source)
    if (path / "dataset.json").exists():
        return "saved"
    if (path / "ratings.dat").exists():
        return "movielens"
    raise DataError("not a dataset: expected 'demo', a MovieLens-1M directory (ratings.dat) "
                    "or a saved dataset (dataset.json)", path=path)


def read_raw(source: str | Path, demo_seed: int = _DATA.demo_seed,
             demo_users: int = _DATA.demo_users, demo_items: int = _DATA.demo_items, image_dir: str | Path | None = None) -> RawTables:
    """Ingest `source` into raw frames (lenient: bad values are for the checks to find)."""
    kind = source_kind(source)
    if kind == "demo":
        from bonmf_core.data.demo import demo_dataset
        from bonmf_core.settings import state_dir

        # The pictures depend on every demo argument, so the folder is keyed by all of them.
        image_dir = image_dir or (state_dir() / "demo" /
                                  f"seed-{demo_seed}-{demo_users}x{demo_items}" / "images")
        ds = demo_dataset(seed=demo_seed, n_users=demo_users, n_items=demo_items,
                          image_dir=image_dir)
        return raw_tables_from_dataset(ds, source="demo")
    if kind == "saved":
        return raw_tables_from_dataset(Dataset.load(source), source=str(Path(source).resolve()))
    return read_raw_movielens(source)


def raw_tables_from_dataset(ds: Dataset, source: str = "") -> RawTables:
    """A Dataset's frames with indices mapped back to raw ids (catalog / table order)."""
    inter = ds.interactions
    frame = pd.DataFrame({"user_id": _str(ds.user_ids[inter["user"].to_numpy()]),
                          "item_id": _str(ds.item_ids[inter["item"].to_numpy()])})
    for col in ("rating", "timestamp"):
        if col in inter.columns:
            frame[col] = inter[col].to_numpy()
    return RawTables(name=ds.name, source=source or ds.name, interactions=frame,
                     items=ds.items.reset_index(drop=True).copy(),
                     users=None if ds.users is None else ds.users.reset_index(drop=True).copy(),
                     rating_scale=ds.rating_scale, item_order="catalog", user_order="table")


def read_raw_movielens(directory: str | Path) -> RawTables:
    """Lenient parse of a MovieLens-1M directory (ratings.dat, movies.dat, optional users.dat,
    overviews_tmdb.csv, posters/). Lines with the wrong number of fields are skipped and
    counted in `problems`; values are kept as written for the checks to judge."""
    directory = Path(directory)
    problems: dict = {}
    ratings = _read_dat_lenient(directory / "ratings.dat",
                                ("user_id", "item_id", "rating", "timestamp"), problems)
    interactions = pd.DataFrame({"user_id": _str(ratings["user_id"].str.strip()),
                                 "item_id": _str(ratings["item_id"].str.strip()),
                                 "rating": _numeric_or_text(ratings["rating"]),
                                 "timestamp": _numeric_or_text(ratings["timestamp"], integer=True)})
    movies = _read_dat_lenient(directory / "movies.dat", ("item_id", "title", "genres"), problems)
    items = pd.DataFrame({"item_id": _str(movies["item_id"].str.strip()),
                          "title": _str(movies["title"]), "genres": _str(movies["genres"])})
    posters = directory / "posters"
    found = poster_paths(posters) if posters.is_dir() else {}
    items["image_path"] = _str([found.get(i) for i in items["item_id"]])
    overviews = directory / "overviews_tmdb.csv"
    if overviews.exists():
        text = pd.read_csv(overviews, dtype=str, keep_default_na=False, on_bad_lines="skip")
        if "movieId" in text.columns:
            text = (text.assign(movieId=text["movieId"].str.strip())
                    .drop_duplicates("movieId").set_index("movieId"))
            for src, dst in (("tmdb_overview", "overview"), ("tmdb_keywords", "keywords")):
                if src in text.columns:
                    items[dst] = _str(text[src].reindex(items["item_id"]).fillna("").to_numpy())
    users = None
    if (directory / "users.dat").exists():
        u = _read_dat_lenient(directory / "users.dat",
                              ("user_id", "gender", "age", "occupation", "zip"), problems)
        users = pd.DataFrame({"user_id": _str(u["user_id"].str.strip()),
                              **{c: _str(u[c]) for c in ("gender", "age", "occupation")}})
    return RawTables(name=directory.resolve().name, source=str(directory.resolve()),
                     interactions=interactions, items=items, users=users,
                     rating_scale=ML_RATING_SCALE, item_order="first_seen",
                     user_order="numeric", problems=problems)


def _read_dat_lenient(path: Path, names: tuple[str, ...], problems: dict) -> pd.DataFrame:
    if not path.is_file():
        raise DataError("required file is missing", path=path)
    data = path.read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n")
    try:
        data.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        encoding = "iso-8859-1"
    data = data.replace(b"::", b"\x1f")
    skipped: list[int] = []
    frame = _split_lines(data, names, encoding, skipped)
    if skipped:
        problems[path.name] = {"skipped_lines": len(skipped)}
    return frame


def _split_lines(data: bytes, names, encoding: str, skipped: list) -> pd.DataFrame:
    """Split on the one-byte separator; lines with the wrong field count are skipped."""
    text = data.decode(encoding)
    rows, n = [], len(names)
    for line in text.split("\n"):
        parts = line.split("\x1f")
        if len(parts) == n:
            rows.append(parts)
        elif line.strip():
            skipped.append(1)
    return pd.DataFrame(rows, columns=list(names), dtype=object).astype(str)


def _str(values) -> pd.Series:
    return pd.Series(np.asarray(values, dtype=object), dtype="str").reset_index(drop=True)


def _numeric_or_text(col: pd.Series, integer: bool = False) -> pd.Series:
    """Numbers when every value parses (ints for whole-number columns), else the text as is."""
    num = pd.to_numeric(col.str.strip(), errors="coerce")
    if len(col) and num.notna().all():
        if integer and (num % 1 == 0).all():
            return num.astype(np.int64).reset_index(drop=True)
        return num.astype(np.float64).reset_index(drop=True)
    return _str(col)


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
            (tmp / "snapshot.json").write_text(json.dumps({
                "format": SNAPSHOT_FORMAT, "content_hash": digest, "name": raw.name,
                "source": raw.source, "rating_scale": raw.rating_scale,
                "item_order": raw.item_order, "user_order": raw.user_order,
                "problems": raw.problems, **raw.counts()}, indent=2))
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
                     problems=meta.get("problems", {}))


# -- the strict build -------------------------------------------------------------------------

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
        raise DataError(f"interactions name item {item_index[np.argmax(catalog_pos < 0)]!r} "
                        "that is not in the catalog", field="item_id")
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
        raise DataError(f"interactions name user {inter_users.iloc[int(np.argmax(u < 0))]!r} "
                        "that is not in the users table", field="user_id")
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


def source_fingerprint(source: str | Path, demo_seed: int = _DATA.demo_seed,
                       demo_users: int = _DATA.demo_users,
                       demo_items: int = _DATA.demo_items) -> str:
    """A cheap hash of what `read_raw(source, ...)` would ingest, without parsing it.

    Files directly in the source folder are hashed by content; image folders (posters/,
    images/) by file name and size. The demo is its arguments.
    """
    h = hashlib.sha256()
    if str(source) == "demo":
        h.update(f"demo:{demo_seed}:{demo_users}:{demo_items}".encode())
        return h.hexdigest()[:16]
    root = Path(source)
    if not root.is_dir():
        raise DataError("source folder not found", path=root)
    for entry in sorted(root.rglob("*")):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        rel = str(entry.relative_to(root))
        if entry.parent == root:
            h.update(rel.encode() + b"\0")
            with open(entry, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{rel}:{entry.stat().st_size}".encode())
    return h.hexdigest()[:16]
