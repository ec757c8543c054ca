"""Evaluation by protocol: masking, candidate sets, oracle and baseline sanity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bonmf_core.models.baselines import Popularity
from bonmf_core.data.demo import demo_dataset
from bonmf_core.evaluation.evaluator import evaluate, evaluate_sampled
from bonmf_core.config import ProtocolConfig
from bonmf_core.data.splits import Split, make_split, positive_matrix

LOG2_3 = math.log2(3)


class MatrixScorer:
    """Scores from a fixed users × items matrix."""

    def __init__(self, matrix):
        self.m = torch.as_tensor(np.asarray(matrix, np.float32))

    def score_pairs(self, users, items):
        if items.dim() == 2:
            return self.m[users[:, None], items]
        return self.m[users, items]

    def score_users(self, users):
        return self.m[users]


class Constant(MatrixScorer):
    def __init__(self, n_users, n_items):
        super().__init__(np.zeros((n_users, n_items)))


def frame(pairs):
    return pd.DataFrame({"user": np.array([p[0] for p in pairs], np.int64),
                         "item": np.array([p[1] for p in pairs], np.int64)})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_dataset(seed=0, n_users=400, n_items=200,
                        image_dir=tmp_path_factory.mktemp("demo") / "images")


# -- full protocol: training and validation items are masked ---------------------------------

def _full_split():
    train = frame([(0, 0), (0, 1), (1, 5)])
    valid = frame([(0, 2)])
    test = frame([(0, 3), (1, 0), (1, 4)])
    scores = [[10, 9, 8, 5, 6, 1],      # training (0, 1) and validation (2) items score highest
              [3, 2, 0, -1, 1, 100]]    # training item 5 scores highest
    return Split("full", 2, 6, train, valid, test), MatrixScorer(scores)


def test_full_masks_training_and_validation_items():
    split, scorer = _full_split()
    out = evaluate(scorer, split, ks=(1, 2, 3))
    assert out["users"] == 2
    # user 0: candidates 3 (5), 4 (6), 5 (1) -> test item 3 at rank 1
    # user 1: candidates 0 (3), 1 (2), 2 (0), 3 (-1), 4 (1) -> ranking 0, 1, 4, 2, 3
    assert out["hr@1"] == pytest.approx((0 + 1) / 2)
    assert out["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert out["ndcg@1"] == pytest.approx((0 + 1) / 2)
    assert out["hr@2"] == pytest.approx(1.0)
    assert out["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert out["ndcg@2"] == pytest.approx((1 / LOG2_3 + 1 / (1 + 1 / LOG2_3)) / 2, abs=1e-6)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1 / LOG2_3 + 1.5 / (1 + 1 / LOG2_3)) / 2, abs=1e-6)


def test_full_validation_masks_training_only():
    split, scorer = _full_split()
    out = evaluate(scorer, split, which="valid", ks=(1,))
    # only user 0 has a validation item; with 0, 1 masked, item 2 (8) ranks first
    assert out["users"] == 1
    assert out["hr@1"] == 1.0 and out["ndcg@1"] == 1.0 and out["recall@1"] == 1.0


def test_full_unmasked_validation_would_hurt():
    # the same scorer with the validation row moved into the test set's blind spot:
    # if validation were not masked, item 2 would push test item 3 out of the top 2.
    split, scorer = _full_split()
    no_valid = Split("full", 2, 6, split.train, frame([]), split.test)
    with_valid = evaluate(scorer, split, ks=(2,))
    without = evaluate(scorer, no_valid, ks=(2,))
    assert with_valid["hr@2"] == 1.0
    assert without["hr@2"] == pytest.approx(0.5)  # user 0 misses: 2 and 4 outrank 3


def test_evaluate_rejects_bad_which_and_empty_sets():
    split, scorer = _full_split()
    with pytest.raises(ValueError, match="which"):
        evaluate(scorer, split, which="train")
    empty = Split("full", 2, 6, split.train, frame([]), split.test)
    with pytest.raises(ValueError, match="no valid"):
        evaluate(scorer, empty, which="valid")


# -- cold items: only cold items are candidates --------------------------------------------------

def test_cold_items_ranks_only_among_cold_items():
    train = frame([(0, 0), (0, 1), (1, 1), (1, 2)])
    test = frame([(0, 4), (1, 3)])
    split = Split("cold_items", 2, 6, train, frame([]), test,
                  cold_test_items=np.array([3, 4, 5]), cold_valid_items=np.array([], np.int64))
    # warm items (0, 1, 2) get the highest scores, and 2 is not in user 0's training set
    scores = [[50, 40, 30, 2, 3, 1],
              [50, 40, 30, 2, 1, 3]]
    out = evaluate(MatrixScorer(scores), split, ks=(1, 2))
    assert out["users"] == 2
    # user 0: 4 (3) first -> hit@1; user 1: 5 (3), 3 (2) -> rank 1
    assert out["hr@1"] == pytest.approx(0.5)
    assert out["hr@2"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx((1 + 1 / LOG2_3) / 2, abs=1e-6)


# -- sampled (ncf) -----------------------------------------------------------------------------

def test_evaluate_sampled_drops_minus_one_candidates():
    scores = np.zeros((1, 6), np.float32)
    scores[0] = [0, 0, 5, 0, 9, 0]  # positive 2 (5); item 4 (9) would outrank it
    negs = np.array([[0, -1, 1]])  # -1 is a dropped candidate (would read item 0 otherwise)
    out = evaluate_sampled(MatrixScorer(scores), np.array([0]), np.array([2]), negs, ks=(1,))
    assert out["hr@1"] == 1.0 and out["users"] == 1.0
    out = evaluate_sampled(MatrixScorer(scores), np.array([0]), np.array([2]),
                           np.array([[4, -1, 1]]), ks=(1, 2))
    assert out["hr@1"] == 0.0 and out["ndcg@2"] == pytest.approx(1 / LOG2_3)


# -- oracle and baseline sanity on the demo ------------------------------------------------------

@pytest.mark.parametrize("protocol", ["ncf", "full", "cold_items"])
@pytest.mark.parametrize("which", ["test", "valid"])
def test_oracle_is_perfect(demo, protocol, which):
    split = make_split(demo, ProtocolConfig(name=protocol), 0)
    held = split.test if which == "test" else split.valid
    truth = positive_matrix(demo.n_users, demo.n_items, held).toarray()
    max_rel = int(truth.sum(1).max())
    k = max(10, max_rel)
    out = evaluate(MatrixScorer(truth), split, which=which, ks=(10, k))
    assert out["users"] == held["user"].nunique()
    assert out["hr@10"] == 1.0
    assert out["ndcg@10"] == pytest.approx(1.0, abs=1e-6)
    if protocol != "ncf":
        assert out[f"recall@{k}"] == pytest.approx(1.0, abs=1e-6)
        assert out[f"ndcg@{k}"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("protocol", ["ncf", "full"])
def test_popularity_beats_constant(demo, protocol):
    split = make_split(demo, ProtocolConfig(name=protocol), 0)
    pop = evaluate(Popularity(demo.n_items).fit(split.train), split)
    const = evaluate(Constant(demo.n_users, demo.n_items), split)
    assert pop["hr@10"] > const["hr@10"] + 0.05
    assert pop["ndcg@10"] > const["ndcg@10"] + 0.03
    # Ties count against the held-out items: a constant scorer earns nothing by luck.
    assert const["hr@10"] == 0.0 and const["ndcg@10"] == 0.0


def test_cold_items_popularity_earns_nothing_from_tie_order(demo):
    """Cold items have no training counts: popularity ties them all, and ties earn no hits."""
    split = make_split(demo, ProtocolConfig(name="cold_items"), 0)
    pop = evaluate(Popularity(demo.n_items).fit(split.train), split)
    assert pop["hr@10"] == 0.0 and pop["recall@10"] == 0.0
