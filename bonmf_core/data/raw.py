"""Raw tables: what a source holds, read leniently, before the data checks judge it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.data.paths import outside_reason
from bonmf_core.hashing import sha256_file_or_none


@dataclass
class RawTables:
    """Raw frames as the data checks take them, plus what is needed to build the Dataset.

    interactions: user_id (str), item_id (str), rating, timestamp.
    items: item_id, title, genres, image_path, free text columns.
    users: user_id + attribute columns, or None.
    item_order / user_order: how `dataset_from_raw` indexes them ('first_seen' | 'catalog',
        'numeric' | 'table').
    problems: per file, the lines that did not parse ({"malformed_lines", "examples"}).
    root: the dataset's own folder; no image path may lead outside it.
    origins: table -> {"file": name, "lines": source line of each row}, so that a finding
        names the file and the line rather than a row position.
    """

    name: str
    source: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    rating_scale: tuple[float, float] | None = None
    item_order: str = "catalog"
    user_order: str = "table"
    problems: dict = field(default_factory=dict)
    root: str | None = None
    origins: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        """Equal raw data and equal image bytes, equal hash: an edited poster is new data."""
        h = hashlib.sha256()
        for frame in (self.interactions, self.items, self.users):
            if frame is None:
                h.update(b"none")
                continue
            h.update(",".join(map(str, frame.columns)).encode())
            h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        if "image_path" in self.items.columns:
            for p in self.items["image_path"]:
                h.update(image_identity(p, self.root).encode())
        h.update(json.dumps([self.rating_scale, self.item_order, self.user_order]).encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict:
        return {"n_interactions": len(self.interactions), "n_items": len(self.items),
                "n_users": int(self.interactions["user_id"].nunique())
                if "user_id" in self.interactions.columns else 0}


def image_identity(path, root: str | Path | None = None) -> str:
    """An image as the content hashes see it: its file name and the sha256 of its bytes. A
    path that leads outside `root` is never opened (the checks block it by row)."""
    if not isinstance(path, str) or not path:
        return "-"
    if outside_reason(path, root):
        return f"outside:{path}"
    return f"{Path(path).name}:{sha256_file_or_none(path) or 'missing'}"


def str_series(values) -> pd.Series:
    return pd.Series(np.asarray(values, dtype=object), dtype="str").reset_index(drop=True)


def numeric_or_text(col: pd.Series, integer: bool = False) -> pd.Series:
    """Numbers when every value parses (ints for whole-number columns), else the text as is."""
    num = pd.to_numeric(col.str.strip(), errors="coerce")
    if len(col) and num.notna().all():
        if integer and (num % 1 == 0).all():
            return num.astype(np.int64).reset_index(drop=True)
        return num.astype(np.float64).reset_index(drop=True)
    return str_series(col)
