"""Baselines every BoNMF result is measured against, through the same evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn


class Popularity:
    """Scores an item by its number of training interactions, the same for every user."""

    def __init__(self, n_items: int):
        self.counts = torch.zeros(n_items)

    def fit(self, train: pd.DataFrame) -> "Popularity":
        self.counts = torch.from_numpy(
            np.bincount(train["item"].to_numpy(), minlength=len(self.counts)).astype(np.float32))
        return self

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items]

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(len(users), -1)


class MatrixFactorization(nn.Module):
    """Dot-product MF with an item bias (BPR-MF when trained with the BPR loss)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.user.weight, std=0.01)
        nn.init.normal_(self.item.weight, std=0.01)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor, return_norms: bool = False):
        """Logits: users (B,) with items (B,) → (B,); with items (B, C) → (B, C)."""
        u, i = self.user(users), self.item(items)
        if items.dim() == 2:
            u = u.unsqueeze(1)
        logits = (u * i).sum(-1) + self.item_bias(items).squeeze(-1)
        if return_norms:
            return logits, u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean()
        return logits

    @torch.inference_mode()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(users, items)

    @torch.inference_mode()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user(users) @ self.item.weight.T + self.item_bias.weight.T
