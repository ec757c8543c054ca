import numpy as np

from bonmf_core.data.demo import demo_dataset
from bonmf_core.config import EncodersConfig
from bonmf_core.content.features import basic_content_features


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = demo_dataset(seed=3, n_users=200, n_items=80, image_dir=tmp_path / "a")
    b = demo_dataset(seed=3, n_users=200, n_items=80, image_dir=tmp_path / "b")
    c = demo_dataset(seed=4, n_users=200, n_items=80, image_dir=tmp_path / "c")
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash()
    assert (tmp_path / "a" / "0.png").read_bytes() == (tmp_path / "b" / "0.png").read_bytes()


def test_shape_skew_and_timestamps(small_demo):
    d = small_demo
    assert (d.n_users, d.n_items) == (600, 250)
    assert d.has_timestamps and d.interactions["timestamp"].is_monotonic_increasing
    assert not d.interactions.duplicated(["user", "item"]).any()
    counts = np.sort(np.bincount(d.interactions["item"], minlength=d.n_items))[::-1]
    # Popularity skew: the top 10% of items hold far more than 10% of interactions.
    assert counts[: d.n_items // 10].sum() / counts.sum() > 0.2
    assert set(d.interactions["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert d.items["image_path"].map(lambda p: p.endswith(".png")).all()
    assert d.user_attribute_columns == ["segment"]


def test_content_carries_taste(small_demo):
    """Items a user interacted with are closer in text space than random item pairs."""
    feats, _ = basic_content_features(small_demo, ["text"], EncodersConfig())
    text = feats["text"]
    inter = small_demo.interactions
    rng = np.random.default_rng(0)
    same_user = []
    for _, group in inter.groupby("user"):
        items = group["item"].to_numpy()
        a, b = rng.choice(items, 2, replace=False)
        same_user.append(text[a] @ text[b])
    random_pairs = [text[a] @ text[b] for a, b in rng.integers(0, small_demo.n_items, (600, 2))]
    assert np.mean(same_user) > np.mean(random_pairs) + 0.05


def test_genres_are_theme_names(small_demo):
    from bonmf_core.data.demo import THEMES

    genres = set("|".join(small_demo.items["genres"]).split("|"))
    assert genres <= set(THEMES) and len(genres) >= 6
