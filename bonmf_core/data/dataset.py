"""The normalized dataset every reader returns and every other module consumes.

Users and items are addressed by dense indices (0..n-1) everywhere inside the library; the id
maps (`user_ids[idx]`, `item_ids[idx]`, raw ids as strings) translate back to the source's ids
and are saved with the data so an index means the same thing in every later run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.atomic import atomic_dir
from bonmf_core.data.raw import image_identity
from bonmf_core.errors import DataError

FORMAT_VERSION = 1

# Catalog columns with a fixed meaning; any other catalog column is a free text field.
CATALOG_CORE_COLUMNS = ("item_id", "title", "genres", "image_path")


@dataclass
class Dataset:
    """Interactions + item catalog (+ optional user attributes) with stable id maps.

    interactions: columns `user`, `item` (int64 indices), optional `rating` (float32) and
        `timestamp` (int64 seconds).
    items: one row per item index, in index order: `item_id` (str), `title` (str),
        `genres` (str, '|'-separated, may be empty), `image_path` (str or None), plus any text
        fields (e.g. `overview`, `keywords`).
    users: optional, one row per user index: `user_id` (str) plus categorical attribute columns.
    features: optional precomputed content matrices aligned with the item index, by modality.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    rating_scale: tuple[float, float] | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- id maps -------------------------------------------------------------------------
    @property
    def item_ids(self) -> np.ndarray:
        return self.items["item_id"].to_numpy(dtype=object)

    @property
    def user_ids(self) -> np.ndarray:
        if self.users is not None:
            return self.users["user_id"].to_numpy(dtype=object)
        return np.arange(self.n_users).astype(str).astype(object)

    @property
    def n_users(self) -> int:
        if self.users is not None:
            return len(self.users)
        return int(self.interactions["user"].max()) + 1 if len(self.interactions) else 0

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def has_timestamps(self) -> bool:
        return "timestamp" in self.interactions.columns

    @property
    def text_fields(self) -> list[str]:
        return [c for c in self.items.columns if c not in CATALOG_CORE_COLUMNS]

    @property
    def user_attribute_columns(self) -> list[str]:
        if self.users is None:
            return []
        return [c for c in self.users.columns if c != "user_id"]

    def user_attribute_codes(self) -> np.ndarray | None:
        """User attributes as an int matrix (n_users × n_attributes) of category codes."""
        cols = self.user_attribute_columns
        if not cols:
            return None
        return np.stack([pd.Categorical(self.users[c].astype(str)).codes.astype(np.int64)
                         for c in cols], axis=1)

    def content_hash(self) -> str:
        """A hash of interactions and catalog: equal data, equal hash, across runs."""
        h = hashlib.sha256()
        h.update(pd.util.hash_pandas_object(self.interactions, index=False).to_numpy().tobytes())
        # Images are identified by name and bytes, not by where the folder happens to live:
        # an edited poster is a new dataset, so the fits that used the old one are not reused.
        items = self.items.assign(image_path=self.items["image_path"].map(image_identity))
        h.update(pd.util.hash_pandas_object(items.astype(str), index=False).to_numpy().tobytes())
        if self.users is not None:
            h.update(pd.util.hash_pandas_object(self.users.astype(str), index=False).to_numpy().tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": len(self.interactions),
            "items_with_interactions": int(self.interactions["item"].nunique()),
            "density": len(self.interactions) / max(1, self.n_users * self.n_items),
            "timestamps": self.has_timestamps,
            "user_attributes": self.user_attribute_columns,
            "text_fields": self.text_fields,
            "features": {k: list(v.shape) for k, v in self.features.items()},
        }

    # -- invariants ----------------------------------------------------------------------
    def validate(self) -> None:
        inter = self.interactions
        for col in ("user", "item"):
            if col not in inter.columns:
                raise DataError("interactions lack a required column", field=col)
            if not pd.api.types.is_integer_dtype(inter[col]):
                raise DataError("must hold integer indices", field=col)
        if len(inter):
            if inter["item"].min() < 0 or inter["item"].max() >= self.n_items:
                raise DataError("item index outside the catalog", field="item")
            if inter["user"].min() < 0 or (self.users is not None
                                           and inter["user"].max() >= len(self.users)):
                raise DataError("user index outside the user table", field="user")
        if "item_id" not in self.items.columns or self.items["item_id"].duplicated().any():
            raise DataError("catalog item ids must be present and unique", field="item_id")
        for name, mat in self.features.items():
            if mat.shape[0] != self.n_items:
                raise DataError(f"feature matrix has {mat.shape[0]} rows for {self.n_items} items",
                                field=f"features.{name}")

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the dataset (parquet + json, no pickles) atomically to directory `path`."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.interactions.to_parquet(tmp / "interactions.parquet", index=False)
            self.items.to_parquet(tmp / "items.parquet", index=False)
            if self.users is not None:
                self.users.to_parquet(tmp / "users.parquet", index=False)
            for name, mat in self.features.items():
                np.save(tmp / f"features.{name}.npy", mat, allow_pickle=False)
            meta = {"format_version": FORMAT_VERSION, "name": self.name,
                    "rating_scale": self.rating_scale, "features": sorted(self.features),
                    "content_hash": self.content_hash()}
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        path = Path(path)
        meta_path = path / "dataset.json"
        if not meta_path.exists():
            raise DataError("not a saved dataset (dataset.json missing)", path=path)
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"unsupported format_version {meta.get('format_version')}",
                            path=meta_path, field="format_version")
        users_path = path / "users.parquet"
        features = {name: np.load(path / f"features.{name}.npy", allow_pickle=False)
                    for name in meta.get("features", [])}
        scale = meta.get("rating_scale")
        return cls(name=meta["name"],
                   interactions=pd.read_parquet(path / "interactions.parquet"),
                   items=pd.read_parquet(path / "items.parquet"),
                   users=pd.read_parquet(users_path) if users_path.exists() else None,
                   rating_scale=tuple(scale) if scale else None,
                   features=features)


def find_saved_dataset(root: str | Path, content_hash: str) -> Path:
    """The saved dataset directly under `root` (e.g. `<state>/datasets`) whose content hash is
    `content_hash`: how a registered model finds the data it was trained on."""
    for meta in sorted(Path(root).glob("*/dataset.json")):
        if json.loads(meta.read_text()).get("content_hash") == content_hash:
            return meta.parent
    raise FileNotFoundError(f"no saved dataset with content hash {content_hash} under {root}")


def index_ids(first_seen: pd.Series, extra: pd.Series | None = None) -> tuple[np.ndarray, dict]:
    """Dense indices for raw ids: order of first appearance, then unseen `extra` ids in order.

    First-appearance order is what the NCF reference files use for ML-1M items, so indices
    built this way line up with them.
    """
    ids = pd.unique(first_seen.astype(str))
    if extra is not None:
        extra_ids = pd.unique(extra.astype(str))
        ids = np.concatenate([ids, extra_ids[~pd.Index(extra_ids).isin(ids)]])
    ids = ids.astype(object)
    return ids, {v: i for i, v in enumerate(ids)}
