"""The `cold_users` protocol: held-out users never train, each reveals their earliest items,
the rest are ranked against every unrevealed item; BoNMF answers by the service's fold-in,
`pop` and the item-item baselines from what was revealed; other variants are refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bonmf_core.config import load_config
from bonmf_core.data.splits import cold_user_split, implicit_pairs, make_split
from bonmf_core.errors import ConfigError, DataError, LeakageError
from bonmf_core.evaluation.evaluator import check_no_leakage, evaluate
from bonmf_core.experiment import variants
from bonmf_core.experiment.runner import run_fits
from bonmf_core.models.baselines import ItemKNN, Popularity


def _cfg(**sections):
    base = {"train": {"refit": False, "epochs": 4, "batch_size": 2048, "patience": 2},
            "model": {"gmf_dim": 16, "mlp_layers": [32, 16, 8], "content_hidden": 64},
            "item_knn": {"neighbours": [20, None]}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_config(flags=base, use_default_file=False)


@pytest.fixture(scope="module")
def split(small_demo):
    return cold_user_split(small_demo, seed=0, fraction=0.2, given=(3, 1))


# -- the split --------------------------------------------------------------------------------

def test_held_out_users_never_train_and_nothing_is_lost(small_demo, split):
    train_users = set(split.train["user"])
    test_users, valid_users = set(split.test["user"]), set(split.valid["user"])
    assert test_users and valid_users
    assert not train_users & test_users and not train_users & valid_users
    assert not test_users & valid_users
    assert len(split.train) + len(split.valid) + len(split.test) == len(implicit_pairs(small_demo))
    counts = implicit_pairs(small_demo).groupby("user").size()
    assert (counts[list(test_users | valid_users)] > 3).all()   # each keeps something to rank
    assert split.info["cold_test_users"] == len(test_users)
    assert not split.warm_users()[list(test_users)].any()
    other = cold_user_split(small_demo, seed=1, given=(3, 1))
    assert set(other.test["user"]) != test_users
    assert cold_user_split(small_demo, seed=0, given=(3, 1)).test.equals(split.test)


def test_reveal_shows_each_users_earliest_interactions(small_demo, split):
    pairs = implicit_pairs(small_demo)
    users, shown, rest = split.reveal("test", 3)
    assert list(users) == sorted(set(split.test["user"]))
    for user, items in list(zip(users, shown))[:40]:
        mine = pairs[pairs["user"] == user].sort_values(["timestamp", "order"], kind="stable")
        assert list(items) == list(mine["item"][:3])
        ranked = set(rest.loc[rest["user"] == user, "item"])
        assert ranked == set(mine["item"][3:]) and not ranked & set(items)


def test_too_few_eligible_users_names_the_field(small_demo):
    with pytest.raises(DataError, match="protocol.given"):
        cold_user_split(small_demo, seed=0, given=(100_000,))


def test_given_configuration():
    assert _cfg(protocol={"given": 5}).protocol.given == [5]
    assert _cfg(protocol={"given": [1, 3, 5]}).protocol.given == [1, 3, 5]
    for bad in ([0], [3, 3], []):
        with pytest.raises(ConfigError, match="given"):
            _cfg(protocol={"given": bad})
    cfg = _cfg(protocol={"name": "cold_users", "given": [2], "cold_user_fraction": 0.3})
    assert cfg.protocol.cold_user_fraction == 0.3


def test_make_split_dispatches(small_demo):
    cfg = _cfg(protocol={"name": "cold_users", "given": [2, 4]})
    split = make_split(small_demo, cfg.protocol, seed=3)
    assert split.protocol == "cold_users" and split.given == (2, 4) and split.seed == 3


def test_a_held_out_user_in_training_is_refused(split):
    leaked = split.test.iloc[:1]
    poisoned = type(split)(**{**split.__dict__,
                              "train": pd.concat([split.train, leaked], ignore_index=True),
                              "test": split.test.iloc[1:].reset_index(drop=True)})
    with pytest.raises(LeakageError, match="cold users must be unseen"):
        check_no_leakage(poisoned)


# -- evaluation --------------------------------------------------------------------------------

class _Cheater:
    """Scores each user's revealed items highest, then the items it will be asked to rank."""

    def __init__(self, split, rest):
        self.n_items, self.rest = split.n_items, rest

    def score_users(self, users):   # never called under cold_users
        raise AssertionError("cold users have no trained row")

    def score_profiles(self, users, profiles):
        scores = torch.zeros(len(profiles), self.n_items)
        for row, (u, shown) in enumerate(zip(users.tolist(), profiles)):
            scores[row, self.rest.loc[self.rest["user"] == u, "item"].to_numpy().copy()] = 1.0
            scores[row, torch.as_tensor(shown)] = 2.0
        return scores


def test_revealed_items_are_excluded_from_the_ranking(split):
    _, _, rest = split.reveal("test", 3)
    metrics = evaluate(_Cheater(split, rest), split, "test")
    # Were the revealed items ranked, each user's top 3 would be misses.
    assert metrics["hr@10"] == 1.0 and metrics["ndcg@10"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["given"] == 3.0 and metrics["users"] == split.info["cold_test_users"]


def test_every_given_is_reported_the_first_is_the_headline(split):
    pop = Popularity(split.n_items).fit(split.train)
    metrics = evaluate(pop, split, "test")
    assert metrics["given"] == 3.0
    assert {"given1/hr@10", "given1/ndcg@10", "given1/recall@10"} <= set(metrics)
    # One revealed item fewer to exclude, one more to find: the numbers differ.
    assert metrics["given1/recall@10"] != metrics["recall@10"]
    assert "given1/hr@10" not in evaluate(pop, split, "valid")


def test_pop_scores_everyone_alike_and_item_knn_from_the_revealed_items(split):
    pop = Popularity(split.n_items).fit(split.train)
    scores = pop.score_profiles(torch.tensor([1, 2]), [np.array([0, 1]), np.array([5])])
    assert torch.equal(scores[0], scores[1])
    knn = ItemKNN(split.n_users, split.n_items, None, 1024).fit(split.train)
    profiles = [np.array([3, 7, 7]), np.array([11])]
    got = knn.score_profiles(torch.tensor([0, 1]), profiles)
    w = knn.weights.numpy()
    assert np.allclose(got[0].numpy(), w[3] + w[7], atol=1e-5)   # a repeat counts once
    assert np.allclose(got[1].numpy(), w[11], atol=1e-5)


# -- BoNMF: the service's fold-in, batched -----------------------------------------------------

@pytest.fixture(scope="module")
def cold_fits(small_demo, split):
    cfg = _cfg(protocol={"name": "cold_users", "given": [3, 1]})
    return {f["variant"]: f for f in run_fits(["pop", "item_knn", "id"], small_demo, [split],
                                                cfg, {}, report=lambda _: None)}


def test_cold_users_end_to_end(cold_fits, split):
    pop, knn, bonmf = (cold_fits[v]["metrics"] for v in ("pop", "item_knn", "id"))
    for m in (pop, knn, bonmf):
        assert m["users"] == split.info["cold_test_users"] and "given1/ndcg@10" in m
        assert set(m["slices"]) == {"head", "torso", "tail"}
    # The demo's users have tastes their first items reveal: profile-aware beats popularity.
    assert knn["ndcg@10"] > pop["ndcg@10"] and bonmf["ndcg@10"] > pop["ndcg@10"]
    model = cold_fits["id"]["scorer"]
    assert not model.warm_users[torch.from_numpy(split.test["user"].unique())].any()


def test_batched_fold_in_is_the_single_profile_fold_in(cold_fits):
    model = cold_fits["id"]["scorer"]
    profiles = [[4, 9, 2], [17], [30, 31, 32, 33, 34, 35, 36]]
    batch = model.fold_in_many(profiles)
    for row, liked in zip(batch, profiles):
        assert torch.allclose(row, model.fold_in(liked), atol=1e-5)
    assert torch.allclose(model.fold_in([9, 4, 2, 4]), batch[0], atol=1e-6)   # a set
    warm = model.warm_users
    expected = model.user_vectors(torch.nonzero(warm).squeeze(1)).mean(0)
    assert torch.allclose(model.cold_start_vectors(n=2)[1], expected.detach(), atol=1e-6)


def test_user_attributes_move_the_fold_in_start(small_demo, split):
    cfg = _cfg(protocol={"name": "cold_users"}, model={"user_attributes": True},
               train={"epochs": 2})
    scorer, _ = variants.fit_variant("id", small_demo, split, cfg, 0, {})
    users = torch.from_numpy(split.test["user"].unique()[:50]).long()
    starts = scorer.cold_start_vectors(users)
    codes = scorer.user_attributes[users]
    differ = (codes[:, None, :] != codes[None, :, :]).any(-1)
    i, j = torch.nonzero(differ)[0]
    assert not torch.allclose(starts[i], starts[j])
    assert torch.allclose(scorer.cold_start_vectors(None, n=1)[0],
                          scorer.cold_start_vectors(n=3)[2])


def test_variants_that_cannot_score_new_users_are_refused(small_demo, split):
    cfg = _cfg(protocol={"name": "cold_users"})
    for variant in ("bpr", "mf", "genre_pop", "content_knn"):
        with pytest.raises(ConfigError, match=f"{variant}.*cold_users"):
            run_fits(["pop", variant], small_demo, [split], cfg, {}, report=lambda _: None)


def test_fold_in_solves_the_map_objective(cold_fits):
    """The Newton answer is (near) a stationary point of the objective the docstring states:
    the logistic loss of the liked items plus `negatives` per liked item spread over the
    others, plus the population prior around the start."""
    from fold_in_objective import map_gradient

    model = cold_fits["id"]["scorer"]
    liked = torch.tensor([4, 9, 2, 40, 41])
    with torch.no_grad():
        items = model.item_side(model.item_vectors(torch.arange(model.config.n_items)))
    start = model.cold_start_vectors(n=1)[0]
    gradient = map_gradient(model, items, liked.tolist(), start)
    answer = model.fold_in(liked.tolist())
    assert gradient(answer).norm() < 0.02 * gradient(start).norm()
    assert not torch.allclose(answer, start)
