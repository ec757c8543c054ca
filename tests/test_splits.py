"""Splits for the three protocols, negative sampling and the leakage guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonmf_core.models.baselines import Popularity
from bonmf_core.data.dataset import Dataset
from bonmf_core.data.demo import demo_dataset
from bonmf_core.errors import DataError, LeakageError
from bonmf_core.evaluation.evaluator import check_no_leakage, evaluate
from bonmf_core.config import ProtocolConfig
from bonmf_core.data.splits import (assert_no_overlap, cold_item_split, implicit_pairs,
                               leave_one_out_split, make_split, make_splits, ncf_reference_split,
                               positive_matrix, ratio_split, sample_negatives)


def make_dataset(rows, n_items, user_ids=None, name="tiny", timestamps=True) -> Dataset:
    """rows: (user, item, timestamp) in file order."""
    users = [r[0] for r in rows]
    items = [r[1] for r in rows]
    inter = {"user": np.array(users, np.int64), "item": np.array(items, np.int64),
             "rating": np.full(len(rows), 4.0, np.float32)}
    if timestamps:
        inter["timestamp"] = np.array([r[2] for r in rows], np.int64)
    n_users = max(users) + 1
    if user_ids is None:
        user_ids = [str(u) for u in range(n_users)]
    return Dataset(name=name, interactions=pd.DataFrame(inter),
                   items=pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                                       "title": [f"t{j}" for j in range(n_items)],
                                       "genres": [""] * n_items, "image_path": None}),
                   users=pd.DataFrame({"user_id": user_ids}))


def pair_set(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user"].tolist(), frame["item"].tolist()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dataset:
    return demo_dataset(seed=0, n_users=400, n_items=200,
                        image_dir=tmp_path_factory.mktemp("demo") / "images")


# -- implicit pairs ------------------------------------------------------------------------------

def test_implicit_pairs_dedupes_keeping_latest_and_orders_by_time():
    ds = make_dataset([(0, 1, 5), (0, 2, 1), (0, 1, 2), (1, 0, 3)], n_items=4)
    pairs = implicit_pairs(ds)
    assert list(zip(pairs["user"], pairs["item"], pairs["timestamp"])) == [
        (0, 2, 1), (0, 1, 5), (1, 0, 3)]


# -- leave one out -------------------------------------------------------------------------------

@pytest.fixture
def loo_data() -> Dataset:
    rows = [  # (user, item, timestamp), file order matters for ties
        (0, 3, 30), (0, 0, 10), (2, 7, 5), (0, 2, 30), (0, 1, 20),  # u0: 3 and 2 tie at 30
        (1, 5, 1),                                                   # u1: one interaction
        (2, 6, 9),                                                   # u2: two interactions
        (3, 4, 1), (3, 5, 2), (3, 4, 3),                             # u3: duplicate item 4
        (4, 8, 4), (4, 9, 3), (4, 10, 2), (4, 11, 1),                # u4: reverse file order
    ]
    return make_dataset(rows, n_items=30)


def test_leave_one_out_latest_is_test_second_latest_valid(loo_data):
    split = leave_one_out_split(loo_data, seed=0, n_negatives=5)
    test = dict(zip(split.test["user"], split.test["item"]))
    valid = dict(zip(split.valid["user"], split.valid["item"]))
    # u0: items 3 and 2 share the latest timestamp; item 2 is later in the file -> test.
    assert test[0] == 2 and valid[0] == 3
    # u1: a single interaction stays in training, no test and no validation row.
    assert 1 not in test and 1 not in valid
    assert pair_set(split.train) >= {(1, 5)}
    # u2: two interactions -> one train, one test, no validation.
    assert test[2] == 6 and 2 not in valid and (2, 7) in pair_set(split.train)
    # u3: (3, 4) deduplicated keeping its latest time (3) -> test 4, 5 trains, no validation.
    assert test[3] == 4 and 3 not in valid and (3, 5) in pair_set(split.train)
    # u4: timestamps, not file order, decide.
    assert test[4] == 8 and valid[4] == 9
    assert pair_set(split.train) == {(0, 0), (0, 1), (1, 5), (2, 7), (3, 5), (4, 10), (4, 11)}
    assert len(split.test) == 4 and len(split.valid) == 2


def test_leave_one_out_sets_disjoint_and_sizes_add_up(loo_data):
    split = leave_one_out_split(loo_data, seed=0, n_negatives=5)
    tr, va, te = pair_set(split.train), pair_set(split.valid), pair_set(split.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    n_pairs = len(implicit_pairs(loo_data))
    assert n_pairs == 13  # 14 rows, one duplicate
    assert len(split.train) + len(split.valid) + len(split.test) == n_pairs
    assert tr | va | te == pair_set(implicit_pairs(loo_data))


def test_leave_one_out_negatives_tiny(loo_data):
    split = leave_one_out_split(loo_data, seed=3, n_negatives=5)
    positives = {}
    for u, i in pair_set(implicit_pairs(loo_data)):
        positives.setdefault(u, set()).add(i)
    interacted = set(loo_data.interactions["item"].tolist())
    for frame, negs in ((split.test, split.test_negatives), (split.valid, split.valid_negatives)):
        assert negs.shape == (len(frame), 5)
        for u, row in zip(frame["user"], negs):
            assert len(set(row.tolist())) == 5
            assert not set(row.tolist()) & positives[u]
            assert set(row.tolist()) <= interacted


def test_leave_one_out_demo(demo):
    split = leave_one_out_split(demo, seed=0)
    pairs = implicit_pairs(demo)
    assert len(split.test) == demo.n_users and len(split.valid) == demo.n_users
    assert len(split.train) + len(split.valid) + len(split.test) == len(pairs)
    tr, va, te = pair_set(split.train), pair_set(split.valid), pair_set(split.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    # Test = each user's latest, validation = the one before.
    last = pairs.groupby("user").tail(1)
    second = pairs.groupby("user").nth(-2)
    assert te == pair_set(last) and va == pair_set(second)
    ts = dict(zip(zip(pairs["user"], pairs["item"]), pairs["timestamp"]))
    max_train = {}
    for u, i in tr:
        max_train[u] = max(max_train.get(u, -1), ts[(u, i)])
    for u, i in va:
        assert ts[(u, i)] >= max_train[u]

    pos = positive_matrix(demo.n_users, demo.n_items, pairs).toarray()
    for frame, negs in ((split.test, split.test_negatives), (split.valid, split.valid_negatives)):
        assert negs.shape == (len(frame), 99)
        users = frame["user"].to_numpy()
        # distinct within a row
        srt = np.sort(negs, axis=1)
        assert (np.diff(srt, axis=1) > 0).all()
        # never one of the user's positives (train, valid or test)
        assert not pos[users[:, None], negs].any()
        assert ((negs >= 0) & (negs < demo.n_items)).all()


def test_leave_one_out_negatives_seeded(demo):
    a = leave_one_out_split(demo, seed=1)
    b = leave_one_out_split(demo, seed=1)
    c = leave_one_out_split(demo, seed=2)
    np.testing.assert_array_equal(a.test_negatives, b.test_negatives)
    np.testing.assert_array_equal(a.valid_negatives, b.valid_negatives)
    assert not np.array_equal(np.sort(a.test_negatives, 1), np.sort(c.test_negatives, 1))
    # the held-out sets themselves do not depend on the seed
    assert pair_set(a.test) == pair_set(c.test)


def test_sample_negatives_refuses_when_too_few_unseen():
    ds = make_dataset([(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 3, 1)], n_items=4)
    pos = positive_matrix(ds.n_users, ds.n_items, implicit_pairs(ds))
    rng = np.random.default_rng(0)
    out = sample_negatives(pos, np.array([0]), 1, np.arange(4), rng)
    assert out.tolist() == [[3]]
    with pytest.raises(DataError, match="fewer than 2"):
        sample_negatives(pos, np.array([0]), 2, np.arange(4), rng)


# -- ratio split ---------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["random", "temporal"])
def test_ratio_split_proportions_and_disjoint(demo, order):
    split = ratio_split(demo, seed=0, order=order)
    pairs = implicit_pairs(demo)
    tr, va, te = pair_set(split.train), pair_set(split.valid), pair_set(split.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == pair_set(pairs)
    total = len(pairs)
    assert len(split.train) / total == pytest.approx(0.8, abs=0.02)
    assert len(split.valid) / total == pytest.approx(0.1, abs=0.02)
    assert len(split.test) / total == pytest.approx(0.1, abs=0.02)
    count = pairs.groupby("user").size()
    n_tr = split.train.groupby("user").size().reindex(count.index, fill_value=0)
    n_va = split.valid.groupby("user").size().reindex(count.index, fill_value=0)
    n_te = split.test.groupby("user").size().reindex(count.index, fill_value=0)
    # per user: validation and test are each 10 % rounded, training the rest
    assert (abs(n_va - 0.1 * count) <= 0.5 + 1e-9).all()
    assert (abs(n_te - 0.1 * count) <= 0.5 + 1e-9).all()
    assert (n_tr + n_va + n_te == count).all()
    assert (n_tr >= 1).all()


def test_ratio_split_temporal_order(demo):
    split = ratio_split(demo, order="temporal")
    pairs = implicit_pairs(demo)
    ts = pairs.set_index(["user", "item"])["timestamp"]

    def with_ts(frame):
        return frame.assign(ts=ts.loc[list(zip(frame["user"], frame["item"]))].to_numpy())

    tr, va, te = with_ts(split.train), with_ts(split.valid), with_ts(split.test)
    max_tr = tr.groupby("user")["ts"].max()
    min_va, max_va = va.groupby("user")["ts"].min(), va.groupby("user")["ts"].max()
    min_te = te.groupby("user")["ts"].min()
    assert (max_tr.reindex(min_te.index) <= min_te).all()
    assert (max_tr.reindex(min_va.index) <= min_va).all()
    assert (max_va.reindex(min_te.index).dropna() <= min_te.reindex(max_va.index).dropna()).all()


def test_ratio_split_random_is_not_temporal(demo):
    # sanity: the random split really shuffles (some test item older than a training one)
    split = ratio_split(demo, seed=0, order="random")
    ts = implicit_pairs(demo).set_index(["user", "item"])["timestamp"]
    tr = split.train.assign(ts=ts.loc[list(zip(split.train["user"], split.train["item"]))].to_numpy())
    te = split.test.assign(ts=ts.loc[list(zip(split.test["user"], split.test["item"]))].to_numpy())
    later = tr.groupby("user")["ts"].max().reindex(te.groupby("user")["ts"].min().index)
    assert (later > te.groupby("user")["ts"].min()).sum() > 50


def test_ratio_split_seeded(demo):
    a, b, c = (ratio_split(demo, seed=s) for s in (5, 5, 6))
    pd.testing.assert_frame_equal(a.test, b.test)
    pd.testing.assert_frame_equal(a.train, b.train)
    assert pair_set(a.test) != pair_set(c.test)
    t1, t2 = ratio_split(demo, seed=5, order="temporal"), ratio_split(demo, seed=6, order="temporal")
    assert pair_set(t1.test) == pair_set(t2.test)


def test_ratio_split_temporal_needs_timestamps():
    ds = make_dataset([(0, 0, 0), (0, 1, 0), (1, 2, 0)], n_items=3, timestamps=False)
    with pytest.raises(DataError, match="timestamp"):
        ratio_split(ds, order="temporal")
    # random works without timestamps
    split = ratio_split(ds, order="random")
    assert len(split.train) + len(split.valid) + len(split.test) == 3
    with pytest.raises(ValueError, match="order"):
        ratio_split(ds, order="sideways")


def test_min_rating_drops_low_ratings_before_the_full_split(demo):
    ratings = demo.interactions["rating"].to_numpy()
    assert (ratings < 3).any() and (ratings >= 3).any()
    protocol = ProtocolConfig(name="full", min_rating=3)
    split = make_split(demo, protocol, seed=0)
    low = demo.interactions.loc[ratings < 3, ["user", "item"]]
    high = demo.interactions.loc[ratings >= 3, ["user", "item"]]
    kept = pair_set(split.train) | pair_set(split.valid) | pair_set(split.test)
    # every kept pair was rated >= 3 at least once; pairs only ever rated low are gone
    assert kept <= pair_set(high) and kept == pair_set(high)
    assert not (pair_set(low) - pair_set(high)) & kept
    assert split.describe()["min_rating"] == 3
    assert split.describe()["dropped_below_min_rating"] == int((ratings < 3).sum())
    assert "min_rating" not in make_split(demo, ProtocolConfig(name="full"), 0).describe()


def test_min_rating_is_refused_where_it_cannot_apply(demo):
    from bonmf_core.errors import ConfigError

    with pytest.raises(ConfigError, match="protocol.min_rating applies to the full protocol"):
        make_split(demo, ProtocolConfig(name="ncf", min_rating=3), seed=0)
    implicit = make_dataset([(0, 0, 0), (0, 1, 0), (1, 2, 0)], n_items=3)
    implicit.interactions = implicit.interactions.drop(columns=["rating"])
    with pytest.raises(DataError, match="needs ratings"):
        ratio_split(implicit, min_rating=3)
    with pytest.raises(DataError, match="drops every interaction"):
        ratio_split(make_dataset([(0, 0, 0), (1, 1, 0)], n_items=2), min_rating=5)


# -- cold items ----------------------------------------------------------------------------------

def test_cold_item_split(demo):
    split = cold_item_split(demo, seed=0, fraction=0.2, valid_fraction=0.1)
    pairs = implicit_pairs(demo)
    n_with = pairs["item"].nunique()
    train_items = set(split.train["item"].tolist())
    cold_test, cold_valid = set(split.cold_test_items.tolist()), set(split.cold_valid_items.tolist())
    assert len(cold_test) == round(0.2 * n_with) and len(cold_valid) == round(0.1 * n_with)
    assert not cold_test & cold_valid
    assert not cold_test & train_items and not cold_valid & train_items
    assert set(split.test["item"]) <= cold_test and set(split.valid["item"]) <= cold_valid
    # every cold item's interactions by a user with training history are held out
    train_users = set(split.train["user"].tolist())
    assert set(split.test["user"]) <= train_users and set(split.valid["user"]) <= train_users
    expect_test = {(u, i) for u, i in pair_set(pairs) if i in cold_test and u in train_users}
    assert pair_set(split.test) == expect_test
    assert len(split.train) + len(split.valid) + len(split.test) <= len(pairs)
    check_no_leakage(split, "test")
    check_no_leakage(split, "valid")


def test_cold_item_split_seeded(demo):
    a, b, c = (cold_item_split(demo, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.cold_test_items, b.cold_test_items)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert set(a.cold_test_items.tolist()) != set(c.cold_test_items.tolist())


def test_make_split_dispatch(demo):
    assert make_split(demo, ProtocolConfig(name="full"), 0).protocol == "full"
    cold = ProtocolConfig(name="cold_items", cold_fraction=0.3)
    assert make_split(demo, cold, 0).info["cold_fraction"] == 0.3
    assert [s.seed for s in make_splits(demo, ProtocolConfig(name="full", seeds=[3, 4]))] == [3, 4]


# -- leakage guard -------------------------------------------------------------------------------

def test_assert_no_overlap_names_count():
    train = pd.DataFrame({"user": [0, 0, 1, 2], "item": [1, 2, 3, 4]})
    test = pd.DataFrame({"user": [0, 1, 2, 3], "item": [2, 3, 5, 1]})
    with pytest.raises(LeakageError, match=r"^2 test interactions also appear in training"):
        assert_no_overlap(train, test)
    with pytest.raises(LeakageError, match=r"^2 valid interactions"):
        assert_no_overlap(train, test, what="valid")
    assert_no_overlap(train, test.iloc[2:])  # no shared pair: passes
    # same item for another user is not a leak
    assert_no_overlap(pd.DataFrame({"user": [1], "item": [2]}),
                      pd.DataFrame({"user": [0], "item": [2]}))


@pytest.mark.parametrize("protocol", ["ncf", "full", "cold_items"])
def test_evaluate_refuses_injected_test_pair(demo, protocol):
    split = make_split(demo, ProtocolConfig(name=protocol), 0)
    model = Popularity(demo.n_items).fit(split.train)
    evaluate(model, split)  # clean split evaluates
    split.train = pd.concat([split.train, split.test.iloc[[3]]], ignore_index=True)
    with pytest.raises(LeakageError, match=r"^1 test interactions"):
        evaluate(model, split)


def test_evaluate_refuses_cold_item_in_train(demo):
    split = cold_item_split(demo, seed=0)
    cold = int(split.cold_test_items[0])
    # a user who never interacted with the cold item: the pair is not a test pair
    test_users_of_cold = set(split.test.loc[split.test["item"] == cold, "user"])
    user = next(u for u in range(demo.n_users) if u not in test_users_of_cold)
    split.train = pd.concat([split.train, pd.DataFrame({"user": [user], "item": [cold]})],
                            ignore_index=True)
    with pytest.raises(LeakageError, match="cold test items"):
        evaluate(Popularity(demo.n_items).fit(split.train), split)
    evaluate(Popularity(demo.n_items).fit(split.train), split, which="valid")  # valid is clean


# -- the canonical NCF files ---------------------------------------------------------------------

N_ITEMS_NCF = 150
PERM = [(7 * j + 3) % N_ITEMS_NCF for j in range(N_ITEMS_NCF)]  # first-appearance order


def _ncf_dataset() -> Dataset:
    """Users table order differs from UserID order; item first appearance follows PERM."""
    user_ids = ["4", "5", "6", "1", "2", "3"]  # index 3 is UserID 1 (NCF user 0), ...
    rows = []
    for f in range(3):  # three filler users, 50 items each, in PERM order
        rows += [(f, PERM[50 * f + j], 1 + j) for j in range(50)]
    rows += [(3, PERM[0], 100), (3, PERM[1], 200), (3, PERM[2], 300)]
    rows += [(4, PERM[3], 100), (4, PERM[4], 200)]
    rows += [(5, PERM[5], 100), (5, PERM[6], 200), (5, PERM[7], 300)]
    return make_dataset(rows, N_ITEMS_NCF, user_ids=user_ids, name="fake-ml")


NCF_TEST = [(0, 1), (1, 4), (2, 5)]  # (NCF user, NCF item); user 0's test is not its latest
NCF_NEGS = [
    [1, 0] + list(range(10, 107)),    # one equal to the test item, one other known positive
    [4, 4] + list(range(20, 117)),    # two equal to the test item
    list(range(50, 149)),             # clean
]


def _write_ncf(folder: Path, tests=NCF_TEST, negs=NCF_NEGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-1m.test.rating").write_text(
        "".join(f"{u}\t{i}\t4\t{1000 + u}\n" for u, i in tests))
    (folder / "ml-1m.test.negative").write_text(
        "".join(f"({u},{i})\t" + "\t".join(map(str, n)) + "\n" for (u, i), n in zip(tests, negs)))
    return folder


def test_ncf_reference_split_maps_ids(tmp_path):
    assert all(len(n) == 99 for n in NCF_NEGS)
    ds = _ncf_dataset()
    split = ncf_reference_split(ds, _write_ncf(tmp_path / "ncf"), seed=0)
    perm = np.array(PERM)
    assert split.test["user"].tolist() == [3, 4, 5]
    assert split.test["item"].tolist() == [PERM[1], PERM[4], PERM[5]]
    expected = perm[np.array(NCF_NEGS)]
    expected[expected == perm[[1, 4, 5]][:, None]] = -1
    np.testing.assert_array_equal(split.test_negatives, expected)
    assert (split.test_negatives == -1).sum(1).tolist() == [1, 2, 0]
    info = split.info
    assert info["negatives_equal_to_test_item"] == 3
    assert info["negatives_that_are_other_known_positives"] == 1
    assert info["train_pairs_total"] == 158 - 3
    assert len(split.train) + len(split.valid) == 155
    assert not pair_set(split.train) & pair_set(split.test)


def test_ncf_reference_split_validation(tmp_path):
    ds = _ncf_dataset()
    folder = _write_ncf(tmp_path / "ncf")
    split = ncf_reference_split(ds, folder, seed=0)
    valid = dict(zip(split.valid["user"], split.valid["item"]))
    # latest remaining rating per user with >= 2 remaining; user 4 has only one left
    assert valid == {0: PERM[49], 1: PERM[99], 2: PERM[149], 3: PERM[2], 5: PERM[7]}
    assert not pair_set(split.train) & pair_set(split.valid)
    assert not pair_set(split.valid) & pair_set(split.test)
    pos = positive_matrix(ds.n_users, ds.n_items, implicit_pairs(ds)).toarray()
    vn = split.valid_negatives
    assert vn.shape == (5, 99)
    assert not pos[split.valid["user"].to_numpy()[:, None], vn].any()
    assert (np.diff(np.sort(vn, 1), axis=1) > 0).all()
    # without validation everything else trains
    nov = ncf_reference_split(ds, folder, validation=False)
    assert len(nov.valid) == 0 and len(nov.train) == 155
    # the oracle ranks every positive first, with the -1 candidates dropped
    truth = positive_matrix(ds.n_users, ds.n_items, split.test).toarray()

    class Oracle:
        def score_pairs(self, users, items):
            import torch
            return torch.from_numpy(truth[users.numpy()[:, None], items.numpy()].astype(np.float32))

        def score_users(self, users):
            raise AssertionError("not used by ncf")

    out = evaluate(Oracle(), split)
    assert out["hr@10"] == 1.0 and out["ndcg@10"] == pytest.approx(1.0)


def test_ncf_reference_split_unknown_pair_names_file_and_line(tmp_path):
    ds = _ncf_dataset()
    tests = [(0, 1), (1, 100), (2, 5)]  # NCF user 1 never rated NCF item 100
    folder = _write_ncf(tmp_path / "bad", tests=tests)
    with pytest.raises(DataError) as exc:
        ncf_reference_split(ds, folder)
    msg = str(exc.value)
    assert "ml-1m.test.rating" in msg and "line 2" in msg


def test_ncf_reference_split_bad_files(tmp_path):
    ds = _ncf_dataset()
    with pytest.raises(DataError, match="not found"):
        ncf_reference_split(ds, tmp_path / "missing")
    folder = _write_ncf(tmp_path / "short", negs=[n[:50] for n in NCF_NEGS])
    with pytest.raises(DataError, match="ml-1m.test.negative"):
        ncf_reference_split(ds, folder)
    folder = _write_ncf(tmp_path / "nouser", tests=[(0, 1), (1, 4), (9, 5)])  # UserID 10
    with pytest.raises(DataError, match="line 3: user 9 is not in dataset"):
        ncf_reference_split(ds, folder)


# -- the real MovieLens-1M with the published NCF files ---------------------------------------

def test_real_ncf_reference_split_and_popularity(ml1m, ncf_dir):
    ds = ml1m
    split = ncf_reference_split(ds, ncf_dir, seed=0)
    assert split.info["train_pairs_total"] == 994_169
    assert split.info["negatives_equal_to_test_item"] == 156
    assert len(split.test) == 6040 and split.test["user"].nunique() == 6040
    assert (split.test_negatives == -1).sum() == 156
    out = evaluate(Popularity(ds.n_items).fit(split.train), split)
    assert out["hr@10"] == pytest.approx(0.453, abs=0.005)
    assert out["ndcg@10"] == pytest.approx(0.254, abs=0.005)


def test_ncf_reference_split_rejects_out_of_range_and_mislabelled_negatives(tmp_path):
    ds = _ncf_dataset()
    bad_negs = [list(n) for n in NCF_NEGS]
    bad_negs[1][3] = -1
    folder = _write_ncf(tmp_path / "negid", negs=bad_negs)
    with pytest.raises(DataError, match=r"ml-1m\.test\.negative, line 2: item id -1"):
        ncf_reference_split(ds, folder)
    folder = _write_ncf(tmp_path / "label")
    lines = (folder / "ml-1m.test.negative").read_text().splitlines(keepends=True)
    lines[0] = "(0,99)" + lines[0][lines[0].index("\t"):]
    (folder / "ml-1m.test.negative").write_text("".join(lines))
    with pytest.raises(DataError, match=r"line 1: label \(0,99\) does not match"):
        ncf_reference_split(ds, folder)
