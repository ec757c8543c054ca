"""Readers that turn files on disk into a `Dataset`.

`read_movielens` reads the MovieLens-1M directory format strictly; `load_dataset` reads any
source the `data` section names (a user's own folder goes through `generic.py`'s reader and the
strict build of `snapshot.py`, the one implementation the checked path uses too). Every problem with the input surfaces as a `DataError` naming the file
and the line (or row) and field, never as a pandas traceback, because the person who can fix
the file is usually not the person who can read one.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.data.dataset import Dataset, index_ids
from bonmf_core.data.textfiles import decode_text, guess_encoding
from bonmf_core.errors import DataError

# '::' is two bytes, which pandas only splits with its slow python engine; swapping it for one
# byte that never occurs in text (the ASCII unit separator) keeps the fast C parser.
_DAT_SEP = b"::"
_ONE_BYTE_SEP = b"\x1f"
_OTHER_SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}

ML_RATING_SCALE = (1.0, 5.0)
ML_RATINGS_FIELDS = ("UserID", "MovieID", "Rating", "Timestamp")
ML_MOVIES_FIELDS = ("MovieID", "Title", "Genres")
ML_USERS_FIELDS = ("UserID", "Gender", "Age", "Occupation", "Zip-code")


@dataclass
class _Table:
    """A parsed file plus what is needed to point at one of its rows in an error."""

    frame: pd.DataFrame
    path: Path
    first_line: int | None  # file line of row 0; None for Parquet, whose rows have no lines

    def error(self, message: str, row: int | None = None, field: str | None = None) -> DataError:
        if row is not None and self.first_line is None:
            return DataError(f"row {row + 1}: {message}", path=self.path, field=field)
        line = None if row is None else row + self.first_line
        return DataError(message, path=self.path, line=line, field=field)

    def column(self, name: str) -> pd.Series:
        if name not in self.frame.columns:
            raise self.error(f"column '{name}' not found; columns found: "
                             f"{list(map(str, self.frame.columns))}", field=name)
        return self.frame[name]


def _show(value) -> str:
    """A cell as an error message shows it: quoted text, whatever dtype it came in."""
    return "an empty cell" if pd.isna(value) else repr(str(value))


def _first(mask) -> int | None:
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if len(hits) else None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError("required file is missing", path=path)


def _read_bytes(path: Path) -> bytes:
    _require_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e}", path=path) from None




# -- shared column checks ------------------------------------------------------------------

def _numbers(t: _Table, name: str, *, integer: bool) -> pd.Series:
    col = t.column(name)
    if integer and pd.api.types.is_integer_dtype(col) and not col.hasnans:  # fast, common case
        return col.astype(np.int64)
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy()
    if integer:
        bad = bad | ((num.to_numpy(dtype=float) % 1) != 0)
    row = _first(bad)
    if row is not None:
        kind = "an integer" if integer else "a number"
        raise t.error(f"expected {kind}, found {_show(col.iloc[row])}", row, name)
    return num.astype(np.int64) if integer else num


def _check_scale(t: _Table, rating: pd.Series, name: str, scale: tuple[float, float]) -> None:
    lo, hi = scale
    row = _first(~rating.between(lo, hi).to_numpy())
    if row is not None:
        raise t.error(f"rating {rating.iloc[row]:g} is outside the declared scale {lo:g}-{hi:g}",
                      row, name)


def _ids(t: _Table, name: str) -> pd.Series:
    col = t.column(name)
    row = _first(col.isna().to_numpy())
    if row is not None:
        raise t.error("id is missing", row, name)
    return col.astype(str)


def _unique_ids(t: _Table, ids: pd.Series, name: str) -> None:
    row = _first(ids.duplicated().to_numpy())
    if row is not None:
        raise t.error(f"id {_show(ids.iloc[row])} appears more than once", row, name)


def _known(t: _Table, ids: pd.Series, known: pd.Series, name: str, where: Path) -> None:
    row = _first(~ids.isin(known).to_numpy())
    if row is not None:
        raise t.error(f"id {_show(ids.iloc[row])} is not in {where}", row, name)


def _index(first_seen: pd.Series, extra: pd.Series | None = None) -> np.ndarray:
    """Raw ids in index order, exactly as `index_ids(first_seen, extra)` orders them.

    Concatenating first keeps the order (first appearance, then unseen extras) but stays
    linear: `index_ids`' own extra handling runs np.isin on pandas string arrays, which is
    quadratic (~12 s for 30k items).
    """
    if extra is not None:
        first_seen = pd.concat([first_seen, extra], ignore_index=True)
    return index_ids(first_seen)[0]


def _str_column(values, n: int | None = None) -> pd.Series:
    """A pandas `str` column (missing = NaN), the dtype `Dataset.load` gives back."""
    if n is not None:
        values = [values] * n
    return pd.Series(values, dtype="str").reset_index(drop=True)


# -- MovieLens-1M --------------------------------------------------------------------------

def _read_dat(path: Path, fields: tuple[str, ...], str_fields: tuple[str, ...] = ()) -> _Table:
    """Parse a '::'-separated MovieLens file; fields not in `str_fields` get dtype inference."""
    data = _read_bytes(path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if b"\x00" in data:  # e.g. saved as UTF-16 by a Windows editor
        raise DataError("file holds NUL bytes and cannot be decoded as text "
                        "(is it UTF-16? save it as ASCII/ISO-8859-1)", path=path)
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    data = data.rstrip(b"\n")
    if not data:
        raise DataError("file is empty", path=path)
    data = data.replace(_DAT_SEP, _ONE_BYTE_SEP)
    _check_field_counts(data, path, fields)
    # GroupLens ships ISO-8859-1; a copy re-saved as UTF-8 would otherwise decode to 'CafÃ©',
    # and a file mixing both is refused with the offending byte's offset.
    encoding = guess_encoding(data)
    if encoding == "utf-8":
        decode_text(data, path, "utf-8")
    frame = pd.read_csv(io.BytesIO(data), sep=_ONE_BYTE_SEP.decode(), header=None,
                        names=list(fields), dtype={f: str for f in str_fields},
                        quoting=csv.QUOTE_NONE, na_filter=False, encoding=encoding,
                        engine="c")
    return _Table(frame, path, first_line=1)


def _check_field_counts(data: bytes, path: Path, fields: tuple[str, ...]) -> None:
    """Raise on the first line whose field count is wrong, found with vectorized counting."""
    buf = np.frombuffer(data, dtype=np.uint8)
    line_ends = np.flatnonzero(buf == ord("\n"))
    line_of_sep = np.searchsorted(line_ends, np.flatnonzero(buf == _ONE_BYTE_SEP[0]))
    counts = np.bincount(line_of_sep, minlength=len(line_ends) + 1) + 1
    row = _first(counts != len(fields))
    if row is None:
        return
    start = line_ends[row - 1] + 1 if row else 0
    end = line_ends[row] if row < len(line_ends) else len(data)
    text = data[start:end].decode("iso-8859-1").replace(_ONE_BYTE_SEP.decode(), "::")
    hint = ""
    if counts[row] == 1:
        seen = [name for sep, name in _OTHER_SEPARATORS.items() if sep in text]
        hint = f" (the line looks {seen[0]}-separated)" if seen else ""
    raise DataError(f"expected {len(fields)} '::'-separated fields ({'::'.join(fields)}), "
                    f"found {counts[row]}{hint}: {text[:80]!r}", path=path, line=row + 1)


def read_movielens(directory: str | Path, overviews: str | Path | None = "auto",
                   posters: str | Path | None = "auto") -> Dataset:
    """Read a MovieLens-1M directory (ratings.dat, movies.dat, optional users.dat).

    Users are indexed by ascending numeric UserID (index = UserID - 1 on ML-1M); items by first
    appearance in ratings.dat, then unrated movies in movies.dat order. Both match the index
    spaces of the canonical NCF evaluation files.

    overviews: CSV keyed by `movieId` with `tmdb_overview`, `tmdb_keywords` (-> text fields
        `overview`, `keywords`); "auto" uses `overviews_tmdb.csv` in the directory if present.
    posters: folder of `<MovieID>.<ext>` images (-> `image_path`); "auto" uses `posters/`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("MovieLens directory not found", path=directory)
    ratings = _read_dat(directory / "ratings.dat", ML_RATINGS_FIELDS)
    movies = _read_dat(directory / "movies.dat", ML_MOVIES_FIELDS, ("Title", "Genres"))
    users_path = directory / "users.dat"
    users = (_read_dat(users_path, ML_USERS_FIELDS, ML_USERS_FIELDS[1:])
             if users_path.exists() else None)

    movie_ids = _numbers(movies, "MovieID", integer=True)
    _unique_ids(movies, movie_ids, "MovieID")
    rated = _numbers(ratings, "MovieID", integer=True)
    _known(ratings, rated, movie_ids, "MovieID", movies.path)
    raters = _numbers(ratings, "UserID", integer=True)
    rating = _numbers(ratings, "Rating", integer=False)
    _check_scale(ratings, rating, "Rating", ML_RATING_SCALE)
    timestamp = _numbers(ratings, "Timestamp", integer=True)

    if users is not None:
        user_numbers = _numbers(users, "UserID", integer=True)
        _unique_ids(users, user_numbers, "UserID")
        _known(ratings, raters, user_numbers, "UserID", users.path)
    else:
        user_numbers = raters
    order = np.sort(pd.unique(user_numbers.to_numpy()))
    user_ids = _index(pd.Series(order))
    first_seen = pd.unique(rated.to_numpy())
    item_ids = _index(pd.Series(first_seen), extra=movie_ids)

    interactions = pd.DataFrame({
        "user": pd.Index(order).get_indexer(raters.to_numpy()).astype(np.int64),
        "item": pd.Index(first_seen).get_indexer(rated.to_numpy()).astype(np.int64),
        "rating": rating.to_numpy(dtype=np.float32),
        "timestamp": timestamp.to_numpy(dtype=np.int64),
    })
    return Dataset(name=directory.resolve().name, interactions=interactions,
                   items=_ml_items(directory, movies, movie_ids, item_ids, overviews, posters),
                   users=_ml_users(users, user_numbers, user_ids), rating_scale=ML_RATING_SCALE)


def _ml_items(directory: Path, movies: _Table, movie_ids: pd.Series, item_ids: np.ndarray,
              overviews, posters) -> pd.DataFrame:
    rows = movies.frame.set_index(movie_ids.astype(str).to_numpy()).reindex(item_ids)
    items = pd.DataFrame({"item_id": _str_column(item_ids),
                          "title": _str_column(rows["Title"].to_numpy()),
                          "genres": _str_column(rows["Genres"].to_numpy())})
    folder = _side_path(directory, posters, "posters")
    if folder is not None and not folder.is_dir():
        raise DataError("posters folder not found", path=folder)
    found = poster_paths(folder) if folder is not None else {}
    items["image_path"] = _str_column([found.get(i) for i in item_ids])
    overview_path = _side_path(directory, overviews, "overviews_tmdb.csv")
    if overview_path is not None:
        text = _read_overviews(overview_path).reindex(item_ids).fillna("")
        items["overview"] = _str_column(text["tmdb_overview"].to_numpy())
        items["keywords"] = _str_column(text["tmdb_keywords"].to_numpy())
    return items


def _side_path(directory: Path, given, auto_name: str) -> Path | None:
    if given is None:
        return None
    if isinstance(given, str) and given == "auto":
        auto = directory / auto_name
        return auto if auto.exists() else None
    return Path(given)


def poster_paths(folder: Path) -> dict[str, str]:
    """MovieID -> absolute image path; the first name in sorted order wins on duplicates."""
    root = folder.resolve()
    found: dict[str, str] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        stem, dot, _ = entry.name.rpartition(".")
        if dot and stem and entry.is_file():
            found.setdefault(stem, str(root / entry.name))
    return found


def _read_overviews(path: Path) -> pd.DataFrame:
    t = _read_csv(path, "utf-8")
    ids = _numbers(t, "movieId", integer=True).astype(str)
    _unique_ids(t, ids, "movieId")
    cols = [t.column(c) for c in ("tmdb_overview", "tmdb_keywords")]
    return pd.concat(cols, axis=1).set_axis(ids.to_numpy())


def _ml_users(users: _Table | None, user_numbers: pd.Series,
              user_ids: np.ndarray) -> pd.DataFrame:
    """The id map, plus gender/age/occupation from users.dat (zip codes are left out)."""
    frame = pd.DataFrame({"user_id": _str_column(user_ids)})
    if users is None:
        return frame
    rows = users.frame.set_index(user_numbers.astype(str).to_numpy()).reindex(user_ids)
    for field, column in (("Gender", "gender"), ("Age", "age"), ("Occupation", "occupation")):
        frame[column] = _str_column(rows[field].to_numpy())
    return frame


def _read_csv(path: Path, encoding: str, tsv: bool = False) -> _Table:
    text = decode_text(_read_bytes(path), path, encoding).rstrip("\n")
    if not text:
        raise DataError("file is empty", path=path)
    try:
        # Ids stay exact strings ('007' is not 7); only empty cells count as missing, so an
        # item literally called 'NA' survives. TSV has no quoting convention: quotes are data.
        frame = pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", dtype=str,
                            keep_default_na=False, na_values=[""], skip_blank_lines=False,
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"malformed {'TSV' if tsv else 'CSV'}: {e}", path=path) from None
    # Line numbers count the header as line 1; they drift only after quoted multi-line cells.
    return _Table(frame, path, first_line=2)


def load_dataset(data) -> Dataset:
    """The dataset the `data` section (or a bare source string) names, read strictly: `demo`,
    a MovieLens-1M directory (ratings.dat), a generic folder (interactions.csv|tsv|parquet)
    or a saved dataset (dataset.json). Image paths must stay inside the data's folder."""
    from bonmf_core.config import DataConfig
    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.data.snapshot import (raw_tables_from_dataset, read_raw_generic,
                                          source_kind, strict_dataset)

    if not isinstance(data, DataConfig):
        data = DataConfig(source=str(data))
    kind = source_kind(data.source)
    if kind == "demo":
        return demo_dataset(seed=data.demo_seed, n_users=data.demo_users,
                            n_items=data.demo_items)
    path = Path(data.source)
    if kind == "movielens":
        return read_movielens(path)
    if kind == "generic":
        return strict_dataset(read_raw_generic(path, data))
    dataset = Dataset.load(path)
    strict_dataset(raw_tables_from_dataset(dataset, root=path))   # refuses escaping paths
    return dataset
