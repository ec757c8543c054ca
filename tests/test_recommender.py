import pytest

from bonmf_core.config import load_config
from bonmf_core.recommender import Recommender


@pytest.fixture(scope="module")
def rec(small_demo):
    params = load_config(flags={"train": {"epochs": 3, "batch_size": 2048, "lr": 0.01},
                                "model": {"gmf_dim": 16, "mlp_layers": [32, 16]}},
                         use_default_file=False)
    return Recommender.fit(small_demo, "id", params)


def test_recommend_excludes_seen_items_and_ranks_best_first(rec, small_demo):
    user = small_demo.user_ids[5]
    seen = set(small_demo.item_ids[small_demo.interactions.query("user == 5")["item"]])
    recs = rec.recommend(user, k=20)
    assert len(recs) == 20 and not seen & {r["item_id"] for r in recs}
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    with_seen = {r["item_id"] for r in rec.recommend(user, k=50, exclude_seen=False)}
    assert with_seen & seen  # a trained model ranks some of the user's own items high


def test_similar_items_share_the_theme(rec, small_demo):
    """Demo items with the same main genre sit near each other in the learned item space."""
    genres = small_demo.items["genres"].str.split("|").str[0]
    hits = total = 0
    for idx in range(0, small_demo.n_items, 10):
        top = rec.similar_items(small_demo.item_ids[idx], k=5)
        assert small_demo.item_ids[idx] not in {t["item_id"] for t in top}
        index = {i: n for n, i in enumerate(small_demo.item_ids)}
        hits += sum(genres[index[t["item_id"]]] == genres[idx] for t in top)
        total += 5
    assert hits / total > 2 / 8  # chance is ~1/8 (eight themes)


def test_save_load_round_trip_and_unknown_ids(rec, small_demo, tmp_path):
    rec.save(tmp_path / "r")
    again = Recommender.load(tmp_path / "r")
    user = small_demo.user_ids[7]
    assert again.recommend(user, k=10) == rec.recommend(user, k=10)
    assert again.metadata["variant"] == "id"
    with pytest.raises(KeyError, match="unknown user id 'nobody'"):
        again.recommend("nobody")
    with pytest.raises(KeyError, match="unknown item id"):
        again.similar_items("nothing")


def test_fit_on_a_catalog_too_small_for_99_negatives():
    import pandas as pd

    from bonmf_core.data.dataset import Dataset

    users = [u for u in range(40) for _ in range(6)]
    items = [(u + k) % 30 for u in range(40) for k in range(6)]
    ds = Dataset(name="tiny", interactions=pd.DataFrame({"user": users, "item": items}),
                 items=pd.DataFrame({"item_id": [f"i{i}" for i in range(30)],
                                     "title": [f"t{i}" for i in range(30)], "genres": "",
                                     "image_path": None}),
                 users=pd.DataFrame({"user_id": [f"u{u}" for u in range(40)]}))
    params = load_config(flags={"train": {"epochs": 2, "batch_size": 256}}, use_default_file=False)
    rec = Recommender.fit(ds, "id", params)
    recs = rec.recommend("u3", k=5)
    assert len(recs) == 5 and not {r["item_id"] for r in recs} & {f"i{(3 + k) % 30}" for k in range(6)}
