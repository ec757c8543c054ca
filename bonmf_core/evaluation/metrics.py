"""Ranking metrics computed over whole score matrices (no Python loop per user).

Ties count against the positive: an item scored equal to the held-out one ranks above it,
so a model that scores everything alike earns nothing by luck.
"""

from __future__ import annotations

import numpy as np
import torch
from bonmf_core.config import ProtocolConfig

DEFAULT_KS = tuple(ProtocolConfig().ks)   # the configuration's protocol.ks


def rank_of_positive(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of column 0 among each row's candidates (`valid` masks dropped ones)."""
    pos = scores[:, :1]
    beats = scores[:, 1:] >= pos
    if valid is not None:
        beats &= valid[:, 1:]
    return beats.sum(1)


def hit_ratio_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row 1.0 when the single held-out item ranks in the top k."""
    return (rank < k).float()


def ndcg_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row NDCG@k for a single held-out item at 0-based `rank`."""
    return torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(()))


def sampled_metrics(scores: torch.Tensor, ks=DEFAULT_KS, valid: torch.Tensor | None = None) -> dict:
    """HR@k and NDCG@k for candidate lists whose column 0 is the positive."""
    rank = rank_of_positive(scores, valid)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = hit_ratio_at_k(rank, k).mean().item()
        out[f"ndcg@{k}"] = ndcg_at_k(rank, k).mean().item()
    return out


def topk_items(scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (users × k) of the top-k scored items, ties broken against relevant items.

    `scores` has excluded items already set to -inf; `truth` is a bool matrix of relevant items.
    """
    # Break ties against relevant items (as the sampled metrics do): in float64, pull each
    # relevant score down by far less than the gap between two distinct float32 values.
    key = scores.double()
    key = torch.where(truth, key - (key.abs() * 1e-10 + 1e-300), key)
    return torch.topk(key, k, dim=1).indices


def topk_hits(scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (users × k): whether each of the top-k scored items is relevant."""
    return torch.gather(truth, 1, topk_items(scores, truth, k))


def ranking_sums(hits: torch.Tensor, n_rel: torch.Tensor, ks=DEFAULT_KS) -> dict:
    """Recall@k, NDCG@k and HR@k summed over users from their top-k `hits` (users × max k,
    float) and their relevant counts `n_rel` (each > 0), plus "users"."""
    discounts = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=torch.float32) + 2.0)
    out = {"users": float(len(n_rel))}
    for k in ks:
        h = hits[:, :k]
        dcg = (h * discounts[:k]).sum(1)
        ideal_len = torch.clamp(n_rel, max=k).long()
        idcg = torch.cumsum(discounts[:k], 0)[ideal_len - 1]
        out[f"recall@{k}"] = (h.sum(1) / n_rel).sum().item()
        out[f"ndcg@{k}"] = (dcg / idcg).sum().item()
        out[f"hr@{k}"] = (h.sum(1) > 0).float().sum().item()
    return out


def full_ranking_metrics(scores: torch.Tensor, truth: torch.Tensor, ks=DEFAULT_KS) -> dict:
    """Recall@k, NDCG@k and HR@k summed over users (divide by user count to average).

    Returned as sums so callers can accumulate over user chunks.
    """
    n_rel = truth.sum(1).float()
    keep = n_rel > 0
    scores, truth, n_rel = scores[keep], truth[keep], n_rel[keep]
    hits = topk_hits(scores, truth, min(max(ks), scores.shape[1])).float()
    return ranking_sums(hits, n_rel, ks)


def mean_std(runs: list[dict]) -> dict:
    """{metric: {"mean", "std", "values"}} over runs (population std; 0 for one run)."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out = {}
    for key in keys:
        values = np.array([r[key] for r in runs], float)
        out[key] = {"mean": float(values.mean()), "std": float(values.std()),
                    "values": values.tolist()}
    return out
