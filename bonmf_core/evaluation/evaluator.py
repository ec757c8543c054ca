"""Offline evaluation of any scorer on a `Split`, by the split's protocol.

A scorer is anything with `score_pairs(users, items) -> Tensor` and
`score_users(users) -> Tensor (len(users) × n_items)`: BoNMF, BPR-MF and popularity alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from bonmf_core.errors import LeakageError
from bonmf_core.evaluation.metrics import full_ranking_metrics, sampled_metrics
from bonmf_core.data.splits import Split, assert_no_overlap, positive_matrix
from bonmf_core.config import ProtocolConfig

DEFAULT_KS = tuple(ProtocolConfig().ks)   # the configuration's protocol.ks


class Scorer(Protocol):
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor: ...

    def score_users(self, users: torch.Tensor) -> torch.Tensor: ...


def _held_out(split: Split, which: str):
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', not {which!r}")
    frame = split.test if which == "test" else split.valid
    negatives = split.test_negatives if which == "test" else split.valid_negatives
    cold = split.cold_test_items if which == "test" else split.cold_valid_items
    return frame, negatives, cold


def check_no_leakage(split: Split, which: str = "test") -> None:
    """The guard run before every evaluation: held-out pairs (and cold items) unseen in training."""
    frame, _, cold = _held_out(split, which)
    assert_no_overlap(split.train, frame, what=which)
    if cold is not None and np.isin(cold, split.train["item"].to_numpy()).any():
        raise LeakageError(f"cold {which} items have training interactions; refusing to evaluate")


@torch.inference_mode()
def evaluate_sampled(scorer: Scorer, users: np.ndarray, positives: np.ndarray,
                     negatives: np.ndarray, ks=DEFAULT_KS, chunk: int = 256) -> dict:
    """Rank each positive among its sampled negatives (entries of -1 are dropped candidates)."""
    candidates = np.concatenate([positives[:, None], negatives], axis=1)
    valid = torch.from_numpy(candidates >= 0)
    cand = torch.from_numpy(np.where(candidates >= 0, candidates, 0))
    u = torch.tensor(users, dtype=torch.long)
    scores = torch.empty(cand.shape)
    for start in range(0, len(cand), chunk):
        sl = slice(start, start + chunk)
        scores[sl] = scorer.score_pairs(u[sl], cand[sl]).float()
    out = sampled_metrics(scores, ks, valid)
    out["users"] = float(len(users))
    return out


@torch.inference_mode()
def evaluate_full(scorer: Scorer, split: Split, which: str = "test", ks=DEFAULT_KS,
                  chunk: int = 1024) -> dict:
    """Rank every candidate item for each user with held-out items.

    `full`: all items, with the user's training (and, for test, validation) items masked.
    `cold_items`: only the held-out cold items of the set are candidates.
    """
    frame, _, cold = _held_out(split, which)
    truth_all = positive_matrix(split.n_users, split.n_items, frame)
    users = np.flatnonzero(np.diff(truth_all.indptr) > 0)
    seen_frames = [split.train] + ([split.valid] if which == "test" and cold is None else [])
    seen = positive_matrix(split.n_users, split.n_items, *seen_frames)
    sums: dict[str, float] = {}
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        scores = scorer.score_users(torch.from_numpy(block).long()).float()
        truth = torch.from_numpy(truth_all[block].toarray())
        if cold is not None:
            cols = torch.from_numpy(cold).long()
            scores, truth = scores[:, cols], truth[:, cols]
        else:
            mask = torch.from_numpy(seen[block].toarray())
            scores = scores.masked_fill(mask, float("-inf"))
        for key, value in full_ranking_metrics(scores, truth, ks).items():
            sums[key] = sums.get(key, 0.0) + value
    n = max(sums.pop("users", 0.0), 1.0)
    return {**{k: v / n for k, v in sums.items()}, "users": n}


def evaluate(scorer: Scorer, split: Split, which: str = "test", ks=DEFAULT_KS) -> dict:
    """Metrics of `scorer` on the split's `which` set, by the split's protocol."""
    check_no_leakage(split, which)
    frame, negatives, _ = _held_out(split, which)
    if len(frame) == 0:
        raise ValueError(f"the split has no {which} interactions to evaluate")
    if split.protocol == "ncf":
        return evaluate_sampled(scorer, frame["user"].to_numpy(), frame["item"].to_numpy(),
                                negatives, ks)
    return evaluate_full(scorer, split, which, ks)
