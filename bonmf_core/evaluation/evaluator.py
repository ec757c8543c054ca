"""Offline evaluation of any scorer on a `Split`, by the split's protocol.

A scorer is anything with `score_pairs(users, items) -> Tensor` and
`score_users(users) -> Tensor (len(users) × n_items)`: BoNMF, BPR-MF and popularity alike.
Under `cold_users` the users were never trained on, so the scorer needs `score_profiles(users,
revealed items)` instead (`ProfileScorer`: BoNMF by fold-in, `pop`, `item_knn`, `ease`).

Item-popularity slices (`popularity_slices`, passed as `evaluate(..., slices=)`): from the
split's *training* interactions only, `head` = the most popular items until they hold
`protocol.head_share` of the training interactions (the item that crosses the mark included,
ties by item index), `tail` = items with at most `protocol.tail_max_interactions` training
interactions (cold items included; the tail rule wins over head), `torso` = the rest. Each
slice's metrics use the same ranking (same candidates and masking); only the held-out items in
the slice count as positives, and users without one are left out of that slice's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from bonmf_core.errors import LeakageError
from bonmf_core.evaluation.metrics import (full_ranking_metrics, hit_ratio_at_k, ndcg_at_k,
                                           rank_of_positive, ranking_sums, sampled_metrics,
                                           topk_items)
from bonmf_core.data.splits import Split, assert_no_overlap, positive_matrix
from bonmf_core.config import ProtocolConfig

_PROTOCOL = ProtocolConfig()
DEFAULT_KS = tuple(_PROTOCOL.ks)   # the configuration's protocol.ks
SLICE_NAMES = ("head", "torso", "tail")


class Scorer(Protocol):
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor: ...

    def score_users(self, users: torch.Tensor) -> torch.Tensor: ...


class ProfileScorer(Scorer, Protocol):
    """A scorer of users it never trained on (`cold_users`): from the items each one reveals
    (and, for BoNMF with user attributes, the user's attributes) → (len(users) × n_items)."""

    def score_profiles(self, users: torch.Tensor, profiles: list[np.ndarray]
                       ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ItemSlices:
    """Every item's popularity slice (`labels[item]` indexes `SLICE_NAMES`), from training."""

    labels: np.ndarray
    train_counts: np.ndarray
    head_share: float
    tail_max_interactions: int

    def items(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.labels == SLICE_NAMES.index(name))

    def thresholds(self) -> dict:
        return {"head_share": self.head_share,
                "tail_max_interactions": self.tail_max_interactions}

    def describe(self) -> dict:
        """The definition and each slice's size (items, training interactions)."""
        return {"by": "item training interactions", **self.thresholds(),
                "items": {n: int((self.labels == i).sum()) for i, n in enumerate(SLICE_NAMES)},
                "train_interactions": {n: int(self.train_counts[self.labels == i].sum())
                                       for i, n in enumerate(SLICE_NAMES)}}


def popularity_slices(split: Split, head_share: float = _PROTOCOL.head_share,
                      tail_max_interactions: int = _PROTOCOL.tail_max_interactions
                      ) -> ItemSlices:
    """head / torso / tail of the split's items by their number of training interactions
    (never held-out ones; see the module docstring for the definition)."""
    counts = np.bincount(split.train["item"].to_numpy(np.int64), minlength=split.n_items)
    order = np.lexsort((np.arange(split.n_items), -counts))   # most popular first, then index
    held_before = np.cumsum(counts[order]) - counts[order]    # by the more popular items
    head = np.zeros(split.n_items, bool)
    head[order[held_before < head_share * counts.sum()]] = True
    tail = counts <= tail_max_interactions
    labels = np.where(tail, 2, np.where(head, 0, 1)).astype(np.int8)
    return ItemSlices(labels, counts, float(head_share), int(tail_max_interactions))


def _slice_record(sums: dict[str, float]) -> dict:
    """Summed per-user metrics of one slice → means, with its user and pair counts last."""
    users, pairs = sums.pop("users", 0.0), sums.pop("pairs", 0.0)
    means = {k: v / users for k, v in sums.items()} if users > 0 else {}
    return {**means, "users": float(users), "pairs": float(pairs)}


def _sampled_slices(rank: torch.Tensor, positives: np.ndarray, slices: ItemSlices,
                    ks) -> dict:
    """Per slice: HR/NDCG@k of the rows whose (single) positive is in the slice."""
    of = torch.from_numpy(slices.labels[positives].astype(np.int64))
    out = {}
    for i, name in enumerate(SLICE_NAMES):
        rows = of == i
        r = rank[rows]
        sums = {"users": float(rows.sum()), "pairs": float(rows.sum())}
        for k in ks:
            sums[f"hr@{k}"] = hit_ratio_at_k(r, k).sum().item()
            sums[f"ndcg@{k}"] = ndcg_at_k(r, k).sum().item()
        out[name] = _slice_record(sums)
    return out


def _full_slice_sums(scores: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, ks,
                     sums: dict[str, dict[str, float]]) -> None:
    """Add one user chunk's per-slice Recall/NDCG/HR sums to `sums` (slice → metric → sum).

    The top-k list is the one `full_ranking_metrics` ranks (computed once, same tie-break
    against every held-out item); a slice counts only its own held-out items as hits and as
    relevant."""
    top = topk_items(scores, truth, min(max(ks), scores.shape[1]))
    hit_any, top_label = torch.gather(truth, 1, top), labels[top]
    for i, name in enumerate(SLICE_NAMES):
        n_rel = (truth & (labels == i)[None, :]).sum(1).float()
        keep = n_rel > 0
        hits = (hit_any & (top_label == i))[keep].float()
        acc = sums.setdefault(name, {})
        acc["pairs"] = acc.get("pairs", 0.0) + n_rel.sum().item()
        for metric, value in ranking_sums(hits, n_rel[keep], ks).items():
            acc[metric] = acc.get(metric, 0.0) + value


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
    if split.protocol == "cold_users":
        trained = np.isin(frame["user"].to_numpy(), split.train["user"].to_numpy())
        if trained.any():
            raise LeakageError(f"{int(trained.sum())} {which} interactions belong to users "
                               f"with training interactions (e.g. user "
                               f"{frame['user'].to_numpy()[trained][0]}); cold users must be "
                               f"unseen; refusing to evaluate")
    if cold is not None and np.isin(cold, split.train["item"].to_numpy()).any():
        raise LeakageError(f"cold {which} items have training interactions; refusing to evaluate")


@torch.inference_mode()
def evaluate_sampled(scorer: Scorer, users: np.ndarray, positives: np.ndarray,
                     negatives: np.ndarray, ks=DEFAULT_KS, chunk: int = 256,
                     slices: ItemSlices | None = None) -> dict:
    """Rank each positive among its sampled negatives (entries of -1 are dropped candidates).
    With `slices`, also "slices": slice → metrics of the users whose positive is in it."""
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
    if slices is not None:
        out["slices"] = _sampled_slices(rank_of_positive(scores, valid), positives, slices, ks)
    return out


@torch.inference_mode()
def evaluate_full(scorer: Scorer, split: Split, which: str = "test", ks=DEFAULT_KS,
                  chunk: int = 1024, slices: ItemSlices | None = None) -> dict:
    """Rank every candidate item for each user with held-out items.

    `full`: all items, with the user's training (and, for test, validation) items masked.
    `cold_items`: only the held-out cold items of the set are candidates.
    With `slices`, also "slices": slice → metrics over the held-out items in the slice.
    """
    frame, _, cold = _held_out(split, which)
    truth_all = positive_matrix(split.n_users, split.n_items, frame)
    users = np.flatnonzero(np.diff(truth_all.indptr) > 0)
    seen_frames = [split.train] + ([split.valid] if which == "test" and cold is None else [])
    seen = positive_matrix(split.n_users, split.n_items, *seen_frames)
    sums: dict[str, float] = {}
    slice_sums: dict[str, dict[str, float]] = {}
    labels = None if slices is None else torch.from_numpy(slices.labels.astype(np.int64))
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        scores = scorer.score_users(torch.from_numpy(block).long()).float()
        truth = torch.from_numpy(truth_all[block].toarray())
        if cold is not None:
            cols = torch.from_numpy(cold).long()
            scores, truth = scores[:, cols], truth[:, cols]
            block_labels = None if labels is None else labels[cols]
        else:
            block_labels = labels
            mask = torch.from_numpy(seen[block].toarray())
            scores = scores.masked_fill(mask, float("-inf"))
        _add_ranked_block(scores, truth, ks, block_labels, sums, slice_sums)
    return _ranked_means(sums, slice_sums, slices)


def _add_ranked_block(scores, truth, ks, labels, sums: dict, slice_sums: dict) -> None:
    """Add one block of ranked users to the metric sums (and, with `labels`, the slices')."""
    for key, value in full_ranking_metrics(scores, truth, ks).items():
        sums[key] = sums.get(key, 0.0) + value
    if labels is not None:
        _full_slice_sums(scores, truth, labels, ks, slice_sums)


def _ranked_means(sums: dict, slice_sums: dict, slices: ItemSlices | None) -> dict:
    """The summed blocks as means over their users (+ "users", and "slices" with `slices`)."""
    n = max(sums.pop("users", 0.0), 1.0)
    out = {**{k: v / n for k, v in sums.items()}, "users": n}
    if slices is not None:
        out["slices"] = {name: _slice_record(slice_sums.get(name, {})) for name in SLICE_NAMES}
    return out


@torch.no_grad()   # not inference_mode: BoNMF's fold-in differentiates (its own enable_grad)
def evaluate_cold_users(scorer: ProfileScorer, split: Split, which: str = "test",
                        ks=DEFAULT_KS, chunk: int = 1024, slices: ItemSlices | None = None
                        ) -> dict:
    """`cold_users`: each held-out user reveals their earliest `g` interactions; the rest are
    ranked against every item except the revealed ones (HR/NDCG/Recall@k), for each `g` in
    `split.given` on the test set — the first `g` as the plain keys (with "slices"), the others
    as "given{g}/<metric>" — and for the first `g` alone on the validation set."""
    if not hasattr(scorer, "score_profiles"):
        raise ValueError(f"{type(scorer).__name__} cannot score users it never trained on "
                         f"(cold_users needs score_profiles)")
    givens = split.given if which == "test" else split.given[:1]
    out: dict = {}
    labels = None if slices is None else torch.from_numpy(slices.labels.astype(np.int64))
    for g in givens:
        users, profiles, rest = split.reveal(which, g)
        truth_all = positive_matrix(split.n_users, split.n_items, rest)
        sums: dict[str, float] = {}
        slice_sums: dict[str, dict[str, float]] = {}
        for start in range(0, len(users), chunk):
            block, shown = users[start:start + chunk], profiles[start:start + chunk]
            scores = scorer.score_profiles(torch.from_numpy(block).long(), shown).float()
            rows = np.repeat(np.arange(len(block)), [len(p) for p in shown])
            scores[torch.from_numpy(rows), torch.from_numpy(np.concatenate(shown))] = -np.inf
            truth = torch.from_numpy(truth_all[block].toarray())
            _add_ranked_block(scores, truth, ks, labels if g == givens[0] else None, sums,
                              slice_sums)
        if g == givens[0]:
            out.update(_ranked_means(sums, slice_sums, slices), given=float(g))
        else:
            means = _ranked_means(sums, {}, None)
            out.update({f"given{g}/{k}": v for k, v in means.items() if k != "users"})
    return out


def evaluate(scorer: Scorer, split: Split, which: str = "test", ks=DEFAULT_KS,
             slices: ItemSlices | None = None) -> dict:
    """Metrics of `scorer` on the split's `which` set, by the split's protocol.

    With `slices` (`popularity_slices(split, ...)`), also "slices": {head|torso|tail: {metric:
    mean, "users", "pairs"}} from the same scores (an empty slice has only its counts)."""
    check_no_leakage(split, which)
    frame, negatives, _ = _held_out(split, which)
    if len(frame) == 0:
        raise ValueError(f"the split has no {which} interactions to evaluate")
    if split.protocol == "ncf":
        return evaluate_sampled(scorer, frame["user"].to_numpy(), frame["item"].to_numpy(),
                                negatives, ks, slices=slices)
    if split.protocol == "cold_users":
        return evaluate_cold_users(scorer, split, which, ks, slices=slices)
    return evaluate_full(scorer, split, which, ks, slices=slices)
