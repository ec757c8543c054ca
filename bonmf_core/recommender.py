"""The small public API: `Recommender.fit(dataset)`, `.recommend(user_id)`, `.similar_items(item_id)`.

Wraps a trained BoNMF with its id maps and each user's seen items, in raw ids, so callers
(the service, notebooks) never handle internal indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bonmf_core.config import BonmfConfig
from bonmf_core.models.artifacts import load_model, load_tensors, save_model
from bonmf_core.data.dataset import Dataset
from bonmf_core.models.bonmf import BoNMF


class Recommender:
    def __init__(self, model: BoNMF, user_ids, item_ids, seen_indptr: np.ndarray,
                 seen_items: np.ndarray, metadata: dict | None = None):
        self.model = model.eval()
        self.user_ids, self.item_ids = list(user_ids), list(item_ids)
        self._user_index = {u: i for i, u in enumerate(self.user_ids)}
        self._item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.seen_indptr, self.seen_items = seen_indptr, seen_items
        self.metadata = metadata or {}

    @classmethod
    def fit(cls, dataset: Dataset, variant: str = "id", config: BonmfConfig | None = None,
            seed: int = 0) -> "Recommender":
        """Train on all of `dataset`: leave-one-out validation picks the epochs, then a refit
        on every interaction (`config.train.refit`). `config`: None = the schema defaults."""
        from bonmf_core.experiment.variants import fit_variant, modalities_of
        from bonmf_core.content.features import content_features
        from bonmf_core.data.splits import implicit_pairs, leave_one_out_split, positive_matrix

        config = config or BonmfConfig()
        features, report = content_features(
            dataset, [m for m in modalities_of(variant) if m != "id"], config.encoders)
        # Validation only picks the epoch count here; a small catalog gets fewer negatives.
        most_seen = int(implicit_pairs(dataset).groupby("user").size().max())
        n_negatives = max(1, min(99, dataset.n_items - most_seen))
        split = leave_one_out_split(dataset, seed=seed, n_negatives=n_negatives)
        model, result = fit_variant(variant, dataset, split, config, seed, features)
        if not isinstance(model, BoNMF):
            raise ValueError(f"Recommender wraps BoNMF variants, not {variant!r}")
        seen = positive_matrix(dataset.n_users, dataset.n_items, implicit_pairs(dataset))
        return cls(model, dataset.user_ids, dataset.item_ids, seen.indptr, seen.indices,
                   {"variant": variant, "seed": seed, "features": report,
                    "dataset": {"name": dataset.name, "content_hash": dataset.content_hash()},
                    "best_epoch": result.best_epoch})

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True) -> list[dict]:
        """Top-k items for a known user, best first: [{"item_id", "score"}]."""
        if user_id not in self._user_index:
            raise KeyError(f"unknown user id {user_id!r}")
        u = self._user_index[user_id]
        scores = self.model.score_users(torch.tensor([u]))[0].clone()
        if exclude_seen:
            scores[torch.from_numpy(self.seen(u)).long()] = float("-inf")
        return self._top(scores, k)

    def similar_items(self, item_id: str, k: int = 10) -> list[dict]:
        """Nearest items by cosine similarity in the model's item space (itself excluded)."""
        if item_id not in self._item_index:
            raise KeyError(f"unknown item id {item_id!r}")
        with torch.inference_mode():
            vectors = torch.nn.functional.normalize(
                self.model.item_vectors(torch.arange(len(self.item_ids))), dim=1)
        i = self._item_index[item_id]
        scores = (vectors @ vectors[i]).clone()
        scores[i] = float("-inf")
        return self._top(scores, k)

    def seen(self, user_index: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[user_index]:self.seen_indptr[user_index + 1]]

    def _top(self, scores: torch.Tensor, k: int) -> list[dict]:
        k = min(k, int(torch.isfinite(scores).sum()))
        values, idx = torch.topk(scores, k)
        return [{"item_id": self.item_ids[i], "score": float(v)}
                for v, i in zip(values.tolist(), idx.tolist())]

    def save(self, path: str | Path) -> Path:
        return save_model(path, self.model, user_ids=self.user_ids, item_ids=self.item_ids,
                          metadata=self.metadata,
                          tensors={"seen_indptr": torch.from_numpy(self.seen_indptr.astype(np.int64)),
                                   "seen_items": torch.from_numpy(self.seen_items.astype(np.int64))})

    @classmethod
    def load(cls, path: str | Path) -> "Recommender":
        model, meta, ids = load_model(path)
        seen = load_tensors(path)
        return cls(model, ids["user_ids"], ids["item_ids"], seen["seen_indptr"].numpy(),
                   seen["seen_items"].numpy(), meta)
