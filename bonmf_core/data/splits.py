"""Train/validation/test splits for the three evaluation protocols, and negative sampling.

- `ncf`: leave-one-out (latest interaction per user is test, second latest validation), each
  held-out item ranked among 99 sampled items the user never interacted with. Also the
  canonical ML-1M NCF files, so numbers compare with the published ones.
- `full`: per-user 8:1:1 ratio split (random or temporal); every item is ranked.
- `cold_items`: a seeded share of items held out entirely; they are ranked for their users.
- `cold_users`: a seeded share of users held out of training entirely; each reveals their
  earliest `given` interactions and the rest are ranked against every item not revealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.config import PROTOCOLS, ProtocolConfig
from bonmf_core.data.dataset import Dataset
from bonmf_core.errors import ConfigError, DataError, LeakageError

_PROTOCOL = ProtocolConfig()   # option defaults are the configuration's


@dataclass
class Split:
    """Interactions as (user, item) index pairs, split for one protocol.

    For `ncf`, `test_negatives`/`valid_negatives` hold the sampled candidates aligned with the
    rows of `test`/`valid` (one row per user). For `cold_items`, `cold_test_items` and
    `cold_valid_items` are the held-out items (the candidate sets of test and validation).
    For `cold_users`, `test`/`valid` hold every interaction of the held-out users in time
    order, and `given` the counts each user reveals from the start of it (`reveal`).
    """

    protocol: str
    n_users: int
    n_items: int
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    seed: int | None = None
    test_negatives: np.ndarray | None = None
    valid_negatives: np.ndarray | None = None
    cold_test_items: np.ndarray | None = None
    cold_valid_items: np.ndarray | None = None
    given: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)

    def warm_items(self) -> np.ndarray:
        """Boolean mask of items that have at least one training interaction."""
        mask = np.zeros(self.n_items, bool)
        mask[self.train["item"].to_numpy()] = True
        return mask

    def warm_users(self) -> np.ndarray:
        """Boolean mask of users that have at least one training interaction."""
        mask = np.zeros(self.n_users, bool)
        mask[self.train["user"].to_numpy()] = True
        return mask

    def reveal(self, which: str, given: int) -> tuple[np.ndarray, list[np.ndarray],
                                                      pd.DataFrame]:
        """`cold_users`: (users, each one's `given` earliest items, the rest of their
        interactions as a frame: what is ranked) for the `valid` or `test` users."""
        frame = self.test if which == "test" else self.valid
        position = frame.groupby("user", sort=False).cumcount().to_numpy()
        shown = frame[position < given]
        users, starts = np.unique(shown["user"].to_numpy(), return_index=True)
        items = shown["item"].to_numpy()[np.argsort(shown["user"].to_numpy(), kind="stable")]
        bounds = list(starts[1:]) if len(starts) else []
        return users, np.split(items, bounds), frame[position >= given].reset_index(drop=True)

    def describe(self) -> dict:
        return {"protocol": self.protocol, "seed": self.seed, "train": len(self.train),
                "valid": len(self.valid), "test": len(self.test), **self.info}


def implicit_pairs(dataset: Dataset) -> pd.DataFrame:
    """One row per (user, item): every rating counts as a positive; the latest one is kept."""
    cols = ["user", "item"] + (["timestamp"] if dataset.has_timestamps else [])
    frame = dataset.interactions[cols].copy()
    frame["order"] = np.arange(len(frame))  # file order breaks timestamp ties, as NCF did
    if not dataset.has_timestamps:
        frame["timestamp"] = frame["order"]
    frame = frame.sort_values(["user", "timestamp", "order"], kind="stable")
    frame = frame.drop_duplicates(["user", "item"], keep="last")
    return frame.reset_index(drop=True)


def assert_no_overlap(train: pd.DataFrame, test: pd.DataFrame, what: str = "test") -> None:
    """Refuse to evaluate when a (user, item) pair is both trained on and tested."""
    keys_train = train["user"].to_numpy(np.int64) << 32 | train["item"].to_numpy(np.int64)
    keys_test = test["user"].to_numpy(np.int64) << 32 | test["item"].to_numpy(np.int64)
    # Binary search of the (large) training keys in the (small) sorted test keys: ~10× faster
    # than np.isin's hashing of both sides on ML-1M.
    sorted_test = np.sort(keys_test)
    if len(sorted_test) == 0:
        return
    pos = np.searchsorted(sorted_test, keys_train).clip(max=len(sorted_test) - 1)
    shared = np.isin(keys_test, keys_train[sorted_test[pos] == keys_train])
    if shared.any():
        row = test.iloc[int(np.argmax(shared))]
        raise LeakageError(f"{int(shared.sum())} {what} interactions also appear in training "
                           f"(e.g. user {row['user']}, item {row['item']}); refusing to evaluate")


def positive_matrix(n_users: int, n_items: int, *frames: pd.DataFrame):
    """A sparse user × item matrix (scipy CSR, bool) of every pair in the given frames."""
    import scipy.sparse as sp

    users = np.concatenate([f["user"].to_numpy() for f in frames])
    items = np.concatenate([f["item"].to_numpy() for f in frames])
    mat = sp.csr_matrix((np.ones(len(users), bool), (users, items)), shape=(n_users, n_items))
    mat.sum_duplicates()
    return mat


def sample_negatives(positives, users: np.ndarray, n: int, candidates: np.ndarray,
                     rng: np.random.Generator, chunk: int = 2048) -> np.ndarray:
    """For each user, `n` distinct items from `candidates` that the user never interacted with.

    Sampling is without replacement and vectorized: every candidate gets a random key, the
    user's positives get +inf, and the `n` smallest keys win.
    """
    out = np.empty((len(users), n), np.int64)
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        keys = rng.random((len(block), len(candidates)), dtype=np.float32)
        known = positives[block][:, candidates].toarray()
        if (len(candidates) - known.sum(1) < n).any():
            raise DataError(f"a user has fewer than {n} never-seen items to sample from",
                            field="negatives")
        keys[known] = np.inf
        picked = np.argpartition(keys, n - 1, axis=1)[:, :n]
        out[start:start + len(block)] = candidates[picked]
    return out


def leave_one_out_split(dataset: Dataset, seed: int = 0, n_negatives: int = 99) -> Split:
    """The NCF protocol on any dataset: latest interaction test, second latest validation."""
    pairs = implicit_pairs(dataset)
    from_end = pairs.groupby("user").cumcount(ascending=False).to_numpy()
    counts = pairs.groupby("user")["item"].transform("size").to_numpy()
    # A user needs at least one training interaction for a test one, two for validation too.
    is_test = (from_end == 0) & (counts >= 2)
    is_valid = (from_end == 1) & (counts >= 3)
    cols = ["user", "item"]
    train = pairs.loc[~is_test & ~is_valid, cols].reset_index(drop=True)
    valid = pairs.loc[is_valid, cols].reset_index(drop=True)
    test = pairs.loc[is_test, cols].reset_index(drop=True)
    positives = positive_matrix(dataset.n_users, dataset.n_items, pairs)
    candidates = np.flatnonzero(np.bincount(pairs["item"], minlength=dataset.n_items) > 0)
    rng = np.random.default_rng(seed)
    return Split("ncf", dataset.n_users, dataset.n_items, train, valid, test, seed=seed,
                 test_negatives=sample_negatives(positives, test["user"].to_numpy(),
                                                 n_negatives, candidates, rng),
                 valid_negatives=sample_negatives(positives, valid["user"].to_numpy(),
                                                  n_negatives, candidates, rng),
                 info={"negatives": n_negatives, "source": "leave_one_out"})


def ncf_reference_split(dataset: Dataset, ncf_dir: str | Path, seed: int = 0,
                        validation: bool = True) -> Split:
    """The canonical ML-1M NCF test files (He et al., 2017) mapped onto `dataset`'s indices.

    NCF ids: user = UserID - 1, item = order of first appearance in ratings.dat. The training
    set is every other rating; with `validation`, each user's latest remaining rating is held
    out (with 99 fresh negatives) for early stopping. The original files contain sampled
    negatives equal to the user's own test item; those are dropped from the candidates (the
    positive is ranked once) and counted in `info`.
    """
    ncf_dir = Path(ncf_dir)
    rating_path, negative_path = ncf_dir / "ml-1m.test.rating", ncf_dir / "ml-1m.test.negative"
    for p in (rating_path, negative_path):
        if not p.exists():
            raise DataError("NCF reference file not found", path=p)
    test_raw = pd.read_csv(rating_path, sep="\t", header=None,
                           names=["user", "item", "rating", "timestamp"])
    neg_raw = pd.read_csv(negative_path, sep="\t", header=None)
    if neg_raw.shape[1] != 100 or len(neg_raw) != len(test_raw):
        raise DataError(f"expected {len(test_raw)} lines of '(user,item)' + 99 negatives, "
                        f"got {len(neg_raw)} lines of {neg_raw.shape[1]} fields", path=negative_path)

    # Map NCF ids onto ours: users through the raw UserID, items through first appearance.
    user_index = {uid: i for i, uid in enumerate(dataset.user_ids)}
    first_seen = pd.unique(dataset.interactions["item"].to_numpy())
    unknown_users = [n for n, u in enumerate(test_raw["user"]) if str(u + 1) not in user_index]
    if unknown_users:
        raise DataError(f"user {test_raw['user'][unknown_users[0]]} is not in dataset "
                        f"'{dataset.name}'", path=rating_path, line=unknown_users[0] + 1)
    users = np.array([user_index[str(u + 1)] for u in test_raw["user"]], np.int64)
    items = first_seen[_checked_ids(test_raw["item"].to_numpy(), len(first_seen), rating_path)]
    negs = first_seen[_checked_ids(neg_raw.iloc[:, 1:].to_numpy(np.int64), len(first_seen),
                                   negative_path)]
    labels = neg_raw.iloc[:, 0].astype(str).str.strip()
    expected = "(" + test_raw["user"].astype(str) + "," + test_raw["item"].astype(str) + ")"
    if (labels != expected).any():
        bad = int(np.argmax((labels != expected).to_numpy()))
        raise DataError(f"label {labels[bad]} does not match the rating file's {expected[bad]}",
                        path=negative_path, line=bad + 1)
    test = pd.DataFrame({"user": users, "item": items})

    pairs = implicit_pairs(dataset)
    key = lambda f: f["user"].to_numpy(np.int64) << 32 | f["item"].to_numpy(np.int64)  # noqa: E731
    found = np.isin(key(test), key(pairs))
    if not found.all():
        bad = int(np.argmin(found))
        raise DataError(f"test pair not among the dataset's interactions; is this the ML-1M "
                        f"ratings.dat the files were made from?", path=rating_path, line=bad + 1)
    remaining = pairs[~np.isin(key(pairs), key(test))]
    n_dup = int((negs == items[:, None]).sum())
    positives = positive_matrix(dataset.n_users, dataset.n_items, pairs)
    n_neg_known = int(np.asarray(positives[np.repeat(users, 99), negs.ravel()]).sum()) - n_dup
    # Dropped candidates are marked -1; the evaluator gives them no rank.
    negs = np.where(negs == items[:, None], -1, negs)
    info = {"source": "ncf_reference_files", "negatives": 99, "train_pairs_total": len(remaining),
            "negatives_equal_to_test_item": n_dup,
            "negatives_equal_to_test_item_handling": "dropped from candidates",
            "negatives_that_are_other_known_positives": n_neg_known}

    valid = pd.DataFrame({"user": np.array([], np.int64), "item": np.array([], np.int64)})
    valid_negs = np.empty((0, 99), np.int64)
    train = remaining
    if validation:
        from_end = remaining.groupby("user").cumcount(ascending=False).to_numpy()
        counts = remaining.groupby("user")["item"].transform("size").to_numpy()
        is_valid = (from_end == 0) & (counts >= 2)
        valid = remaining.loc[is_valid, ["user", "item"]].reset_index(drop=True)
        train = remaining[~is_valid]
        candidates = np.flatnonzero(np.bincount(pairs["item"], minlength=dataset.n_items) > 0)
        valid_negs = sample_negatives(positives, valid["user"].to_numpy(), 99, candidates,
                                      np.random.default_rng(seed))
    return Split("ncf", dataset.n_users, dataset.n_items,
                 train[["user", "item"]].reset_index(drop=True), valid, test, seed=seed,
                 test_negatives=negs, valid_negatives=valid_negs, info=info)


def _checked_ids(ids: np.ndarray, n: int, path: Path) -> np.ndarray:
    """NCF item ids must index the dataset's items (no negative wrap-around)."""
    bad = (ids < 0) | (ids >= n)
    if bad.any():
        line = int(np.argmax(bad.reshape(len(ids), -1).any(1))) + 1
        raise DataError(f"item id {ids[bad][0]} outside 0..{n - 1}", path=path, line=line)
    return ids


def ratio_split(dataset: Dataset, seed: int = 0, ratios=(0.8, 0.1, 0.1),
                order: str = _PROTOCOL.order, min_rating: float | None = None) -> Split:
    """Per-user ratio split for full ranking: `random` (seeded shuffle) or `temporal`.
    `min_rating`: interactions rated below it are dropped first (neither trained on, tested
    nor masked: RecBole's `val_interval` filter), the count recorded in the split's info."""
    if order not in ("random", "temporal"):
        raise ValueError(f"order must be 'random' or 'temporal', not {order!r}")
    if order == "temporal" and not dataset.has_timestamps:
        raise DataError("a temporal split needs timestamps", field="timestamp")
    dataset, dropped = _rated_at_least(dataset, min_rating)
    pairs = implicit_pairs(dataset)
    rng = np.random.default_rng(seed)
    if order == "random":
        pairs = pairs.assign(key=rng.random(len(pairs))).sort_values(["user", "key"])
    position = pairs.groupby("user").cumcount().to_numpy()
    count = pairs.groupby("user")["item"].transform("size").to_numpy()
    n_test = np.floor(count * ratios[2] + 0.5).astype(int)
    n_valid = np.floor(count * ratios[1] + 0.5).astype(int)
    n_train = np.maximum(count - n_test - n_valid, 1)
    n_valid = np.minimum(n_valid, count - n_train)
    part = np.where(position < n_train, 0, np.where(position < n_train + n_valid, 1, 2))
    cols = ["user", "item"]
    frames = [pairs.loc[part == p, cols].reset_index(drop=True) for p in range(3)]
    info = {"ratios": list(ratios), "order": order}
    if min_rating is not None:
        info |= {"min_rating": min_rating, "dropped_below_min_rating": dropped}
    return Split("full", dataset.n_users, dataset.n_items, *frames, seed=seed, info=info)


def _rated_at_least(dataset: Dataset, min_rating: float | None) -> tuple[Dataset, int]:
    """The dataset without interactions rated below `min_rating` → (dataset, rows dropped)."""
    if min_rating is None:
        return dataset, 0
    if "rating" not in dataset.interactions:
        raise DataError(f"protocol.min_rating={min_rating:g} needs ratings, and "
                        f"{dataset.name} has none (implicit feedback)", field="rating")
    keep = dataset.interactions["rating"].to_numpy() >= min_rating
    if not keep.any():
        raise DataError(f"protocol.min_rating={min_rating:g} drops every interaction of "
                        f"{dataset.name}", field="rating")
    kept = dataset.interactions.loc[keep].reset_index(drop=True)
    return replace(dataset, interactions=kept), int((~keep).sum())


def cold_item_split(dataset: Dataset, seed: int = 0, fraction: float = _PROTOCOL.cold_fraction,
                    valid_fraction: float = 0.1) -> Split:
    """Hold out a seeded `fraction` of items entirely (test) and `valid_fraction` (validation).

    None of the held-out items' interactions are seen in training; each is ranked among the
    other held-out items of its set, for every user who interacted with it.
    """
    pairs = implicit_pairs(dataset)
    items = np.flatnonzero(np.bincount(pairs["item"], minlength=dataset.n_items) > 0)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(items)
    n_test = int(round(fraction * len(items)))
    n_valid = int(round(valid_fraction * len(items)))
    test_items = np.sort(shuffled[:n_test])
    valid_items = np.sort(shuffled[n_test:n_test + n_valid])
    cols = ["user", "item"]
    in_test = pairs["item"].isin(test_items).to_numpy()
    in_valid = pairs["item"].isin(valid_items).to_numpy()
    train = pairs.loc[~in_test & ~in_valid, cols].reset_index(drop=True)
    # Only users with some training history get ranked (a cold user is another protocol).
    known = np.zeros(dataset.n_users, bool)
    known[train["user"].to_numpy()] = True
    test = pairs.loc[in_test & known[pairs["user"]], cols].reset_index(drop=True)
    valid = pairs.loc[in_valid & known[pairs["user"]], cols].reset_index(drop=True)
    return Split("cold_items", dataset.n_users, dataset.n_items, train, valid, test, seed=seed,
                 cold_test_items=test_items, cold_valid_items=valid_items,
                 info={"cold_fraction": fraction, "cold_valid_fraction": valid_fraction,
                       "cold_test_items": int(n_test), "cold_valid_items": int(n_valid)})


def cold_user_split(dataset: Dataset, seed: int = 0,
                    fraction: float = _PROTOCOL.cold_user_fraction,
                    given=tuple(_PROTOCOL.given), valid_fraction: float = 0.1) -> Split:
    """Hold out a seeded `fraction` of the users entirely (test) and `valid_fraction`
    (validation); everyone else's interactions are the training set.

    Only users with more than max(`given`) interactions can be held out (each must keep an
    item to rank after revealing); the others always train. A held-out user's interactions stay
    in time order (`implicit_pairs`), so `Split.reveal` shows the earliest ones.
    """
    given = tuple(int(g) for g in given)
    pairs = implicit_pairs(dataset)
    counts = np.bincount(pairs["user"], minlength=dataset.n_users)
    eligible = np.flatnonzero(counts > max(given))
    shuffled = np.random.default_rng(seed).permutation(eligible)
    n_test = int(round(fraction * len(eligible)))
    n_valid = int(round(valid_fraction * len(eligible)))
    if n_test == 0 or len(eligible) - n_test - n_valid < 1:
        raise DataError(f"cold_users needs users with more than {max(given)} interactions to "
                        f"hold out, and others to train on: {dataset.name} has "
                        f"{len(eligible)} of {dataset.n_users}", field="protocol.given")
    role = np.zeros(dataset.n_users, np.int8)            # 0 train, 1 valid, 2 test
    role[shuffled[:n_test]] = 2
    role[shuffled[n_test:n_test + n_valid]] = 1
    of = role[pairs["user"].to_numpy()]
    cols = ["user", "item"]
    frames = [pairs.loc[of == r, cols].reset_index(drop=True) for r in (0, 1, 2)]
    return Split("cold_users", dataset.n_users, dataset.n_items, *frames, seed=seed,
                 given=given,
                 info={"cold_user_fraction": fraction, "cold_valid_fraction": valid_fraction,
                       "given": list(given), "eligible_users": int(len(eligible)),
                       "cold_test_users": n_test, "cold_valid_users": n_valid})


def make_split(dataset: Dataset, protocol: ProtocolConfig, seed: int) -> Split:
    """The split of `protocol` (the params `protocol` section) for one seed."""
    if protocol.min_rating is not None and protocol.name != "full":
        # ncf's test items (and the canonical files) are fixed with every rating counted
        raise ConfigError(f"protocol.min_rating applies to the full protocol, not to "
                          f"{protocol.name}: set it to null or use --protocol full")
    if protocol.name == "ncf":
        if protocol.ncf_dir:
            return ncf_reference_split(dataset, protocol.ncf_dir, seed=seed)
        return leave_one_out_split(dataset, seed=seed)
    if protocol.name == "full":
        return ratio_split(dataset, seed=seed, order=protocol.order,
                           min_rating=protocol.min_rating)
    if protocol.name == "cold_items":
        return cold_item_split(dataset, seed=seed, fraction=protocol.cold_fraction)
    if protocol.name == "cold_users":
        return cold_user_split(dataset, seed=seed, fraction=protocol.cold_user_fraction,
                               given=protocol.given)
    raise ValueError(f"unknown protocol {protocol.name!r}; choose from {', '.join(PROTOCOLS)}")


def make_splits(dataset: Dataset, protocol: ProtocolConfig) -> list[Split]:
    """One split per seed of `protocol`."""
    return [make_split(dataset, protocol, seed) for seed in protocol.seeds]
