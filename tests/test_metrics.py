"""Ranking metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from bonmf_core.evaluation.metrics import (full_ranking_metrics, hit_ratio_at_k, mean_std, ndcg_at_k,
                                rank_of_positive, sampled_metrics)

LOG2_3 = math.log2(3)


# -- rank of the positive (column 0) ---------------------------------------------------------

def test_rank_counts_only_strictly_better_and_tied_candidates():
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.3],    # positive best -> 0
                           [0.5, 0.9, 0.1, 0.8],    # two better -> 2
                           [0.1, 0.2, 0.3, 0.4]])   # all better -> 3
    assert rank_of_positive(scores).tolist() == [0, 2, 3]


def test_ties_count_against_the_positive():
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.7],    # one tie + one better -> 2
                           [1.0, 1.0, 1.0, 1.0]])   # everything tied -> last
    assert rank_of_positive(scores).tolist() == [2, 3]


def test_masked_candidates_are_ignored():
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.7],
                           [0.2, 0.9, 0.9, 0.1]])
    valid = torch.tensor([[True, True, True, False],    # the better one is dropped -> 1
                          [True, False, False, True]])  # both better ones dropped -> 0
    assert rank_of_positive(scores, valid).tolist() == [1, 0]


# -- HR@k / NDCG@k for one held-out item --------------------------------------------------------

def test_hit_ratio_at_k():
    rank = torch.tensor([0, 1, 9, 10, 50])
    assert hit_ratio_at_k(rank, 10).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert hit_ratio_at_k(rank, 1).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_ndcg_at_k():
    rank = torch.tensor([0, 1, 2, 9, 10, 50])
    got = ndcg_at_k(rank, 10).tolist()
    want = [1.0, 1 / LOG2_3, 0.5, 1 / math.log2(11), 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-6)


def test_sampled_metrics_means_over_rows():
    # ranks: 0, 2 (one tie + one better), 1 (better one masked), 3
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3],
                           [0.5, 0.5, 0.7, 0.1],
                           [0.5, 0.6, 0.9, 0.1],
                           [0.0, 0.1, 0.2, 0.3]])
    valid = torch.tensor([[True, True, True, True],
                          [True, True, True, True],
                          [True, True, False, True],
                          [True, True, True, True]])
    out = sampled_metrics(scores, ks=(1, 3), valid=valid)
    assert out["hr@1"] == pytest.approx(1 / 4)
    assert out["ndcg@1"] == pytest.approx(1 / 4)
    assert out["hr@3"] == pytest.approx(3 / 4)
    assert out["ndcg@3"] == pytest.approx((1 + 0.5 + 1 / LOG2_3) / 4, abs=1e-6)


# -- full ranking --------------------------------------------------------------------------------

def _tiny_full():
    scores = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5],   # relevant 1, 3 -> top3 = 0,1,2: hit at position 1
        [0.5, 0.1, 0.2, 0.4, 0.3],   # relevant 0, 4 -> top3 = 0,3,4: hits at 0 and 2
        [0.9, 0.1, 0.5, 0.7, 0.0],   # relevant 0,1,2,3 -> top3 = 0,3,2: all hits
        [0.1, 0.2, 0.3, 0.4, 0.5],   # nothing relevant -> excluded
    ])
    truth = torch.tensor([
        [False, True, False, True, False],
        [True, False, False, False, True],
        [True, True, True, True, False],
        [False, False, False, False, False],
    ])
    return scores, truth


def test_full_ranking_metrics_by_hand():
    scores, truth = _tiny_full()
    out = full_ranking_metrics(scores, truth, ks=(1, 3))
    assert out["users"] == 3.0  # the user with no relevant item is excluded
    idcg2 = 1 + 1 / LOG2_3       # two relevant items, k = 3
    # k = 3
    assert out["recall@3"] == pytest.approx(0.5 + 1.0 + 0.75, abs=1e-6)
    assert out["ndcg@3"] == pytest.approx((1 / LOG2_3) / idcg2        # user 0
                                          + (1 + 0.5) / idcg2          # user 1
                                          + 1.0,                       # user 2: ideal = 3, not 4
                                          abs=1e-6)
    assert out["hr@3"] == pytest.approx(3.0)
    # k = 1
    assert out["recall@1"] == pytest.approx(0.0 + 0.5 + 0.25, abs=1e-6)
    assert out["ndcg@1"] == pytest.approx(0.0 + 1.0 + 1.0, abs=1e-6)
    assert out["hr@1"] == pytest.approx(2.0)


def test_full_ranking_ndcg_ideal_uses_min_of_relevant_and_k():
    # 4 relevant items, all ranked in the top 3: a perfect top-3 (NDCG 1), recall 3/4.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.0]])
    truth = torch.tensor([[True, True, True, True, False]])
    out = full_ranking_metrics(scores, truth, ks=(3,))
    assert out["ndcg@3"] == pytest.approx(1.0, abs=1e-6)
    assert out["recall@3"] == pytest.approx(0.75, abs=1e-6)


def test_full_ranking_excluded_items_never_counted():
    # -inf (masked) items are never in the top k even if relevant-looking users exist.
    scores = torch.tensor([[float("-inf"), 0.1, 0.2, 0.3, 0.4]])
    truth = torch.tensor([[False, True, False, False, False]])
    out = full_ranking_metrics(scores, truth, ks=(3,))
    assert out["hr@3"] == 0.0 and out["recall@3"] == 0.0
    out = full_ranking_metrics(scores, truth, ks=(4,))
    assert out["hr@4"] == 1.0 and out["ndcg@4"] == pytest.approx(1 / math.log2(5), abs=1e-6)


def test_full_ranking_ties_count_against_relevant_items():
    # Every user scores all items alike; user i's only relevant item is item i. Under
    # "ties count against the positive" no user can hit at k=1 (or at any k < 5).
    scores = torch.zeros(5, 5)
    truth = torch.eye(5, dtype=torch.bool)
    out = full_ranking_metrics(scores, truth, ks=(1, 4))
    assert out["hr@1"] == 0.0 and out["ndcg@1"] == 0.0 and out["recall@1"] == 0.0
    assert out["hr@4"] == 0.0


# -- mean / std over runs -----------------------------------------------------------------------

def test_mean_std_population_std_and_numeric_keys_only():
    runs = [{"hr@10": 0.5, "ndcg@10": 0.2, "users": 10, "name": "a"},
            {"hr@10": 0.7, "ndcg@10": 0.4, "users": 10, "name": "b"},
            {"hr@10": 0.9, "ndcg@10": 0.3, "users": 10, "name": "c"}]
    out = mean_std(runs)
    assert set(out) == {"hr@10", "ndcg@10", "users"}
    assert out["hr@10"]["mean"] == pytest.approx(0.7)
    assert out["hr@10"]["std"] == pytest.approx(math.sqrt((0.04 + 0 + 0.04) / 3))
    assert out["hr@10"]["values"] == [0.5, 0.7, 0.9]
    assert out["ndcg@10"]["mean"] == pytest.approx(0.3)
    assert out["ndcg@10"]["std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert out["users"] == {"mean": 10.0, "std": 0.0, "values": [10.0, 10.0, 10.0]}


def test_mean_std_single_run_has_zero_std():
    out = mean_std([{"hr@10": 0.42}])
    assert out["hr@10"]["mean"] == pytest.approx(0.42)
    assert out["hr@10"]["std"] == 0.0
