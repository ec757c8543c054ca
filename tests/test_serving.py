"""The service's logic (bonmf_core.serving) and the BentoML service class, in-process, on
models trained on the demo: seen items excluded, popularity fallback flagged, fold-in and new
items landing near their kind, 4xx-type errors naming the field or the unknown ids."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from bonmf_core.params import load_params
from bonmf_core.recommender import Recommender
from bonmf_core.serving import (NewItem, RequestError, ServingEngine, UnknownIdError,
                                write_bundle)

FAST = {"train": {"epochs": 6, "batch_size": 1024, "lr": 0.01, "refit": False},
        "encoders": {"source": "basic"}}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bundle(tmp_path_factory, dataset, variant: str, encoders: dict) -> Path:
    params = load_params(None, FAST)
    folder = tmp_path_factory.mktemp(f"serving-{variant.replace('+', '_')}")
    Recommender.fit(dataset, variant, params).save(folder / "model")
    return write_bundle(folder / "bundle", folder / "model", dataset, encoders,
                        info={"model_version": 3, "metrics": {"ndcg@10": 0.5},
                              "protocol": {"name": "ncf"}},
                        limits=params["serving"])


@pytest.fixture(scope="module")
def content_engine(small_demo, tmp_path_factory):
    return ServingEngine(_bundle(tmp_path_factory, small_demo, "text+image", {"source": "basic"}))


@pytest.fixture(scope="module")
def id_engine(small_demo, tmp_path_factory):
    return ServingEngine(_bundle(tmp_path_factory, small_demo, "id", {"source": "basic"}))


def _genres(dataset) -> dict:
    return dict(zip(dataset.items["item_id"], dataset.items["genres"]))


def _kind_share(items: list[dict], genres: dict, kind: str) -> float:
    return float(np.mean([kind in genres[i["item_id"]].split("|") for i in items]))


def _base_rate(dataset, kind: str) -> float:
    return float(dataset.items["genres"].str.split("|").apply(lambda g: kind in g).mean())


def _new_space_item(dataset) -> NewItem:
    """A new item of one kind (space): words of pure-space catalog items, a space picture."""
    from PIL import Image

    from bonmf_core.demo import THEMES, _draw_picture

    rng = np.random.default_rng(7)
    pure = dataset.items[dataset.items["genres"] == "space"]
    words = " ".join(pure["overview"].head(10)).split()
    mix = np.zeros(len(THEMES))
    mix[THEMES.index("space")] = 1.0
    buf = io.BytesIO()
    Image.fromarray(_draw_picture(rng, mix)).save(buf, format="PNG")
    return NewItem(title="The Nebula Saga", genres="space",
                   text=" ".join(rng.choice(words, size=14)), image=buf.getvalue())


def test_recommend_excludes_seen_items_and_matches_the_model(content_engine, small_demo):
    e = content_engine
    u = "u5"
    answer = e.recommend(u, k=20)
    assert answer["known_user"] and answer["fallback"] is None
    ids = [i["item_id"] for i in answer["items"]]
    seen = {e.item_ids[i] for i in e._seen(e.user_index[u])}
    assert len(ids) == 20 and not set(ids) & seen and len(seen) > 0
    scores = [i["score"] for i in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    # Same ranking as the model's own full scoring with the seen items masked.
    full = e.model.score_users(torch.tensor([e.user_index[u]]))[0].clone()
    full[torch.from_numpy(e._seen(e.user_index[u]))] = float("-inf")
    assert ids == [e.item_ids[i] for i in torch.topk(full, 20).indices.tolist()]
    assert all(i["title"] for i in answer["items"])
    with_seen = [i["item_id"] for i in e.recommend(u, k=50, exclude_seen=False)["items"]]
    assert set(with_seen) & seen  # seen items come back when not excluded


def test_batch_of_users_answers_like_one_at_a_time(content_engine):
    users = ["u1", "nobody", "u7", "u1"]
    batch = content_engine.recommend_many(users, k=5)
    assert [a["user_id"] for a in batch] == users
    for user, answer in zip(users, batch):
        single = content_engine.recommend(user, k=5)
        assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in single["items"]]


def test_unknown_user_gets_flagged_popularity_fallback(content_engine, small_demo):
    answer = content_engine.recommend("never-seen-user", k=5)
    assert answer["known_user"] is False and answer["fallback"] == "popularity"
    assert "unknown user" in answer["reason"]
    counts = small_demo.interactions.groupby("item")["user"].nunique()
    top = [small_demo.item_ids[i] for i in counts.sort_values(ascending=False,
                                                              kind="stable").index[:5]]
    assert [i["item_id"] for i in answer["items"]] == top


def test_liked_items_of_one_kind_are_folded_in_near_that_kind(content_engine, small_demo):
    genres = _genres(small_demo)
    liked = [i for i, g in genres.items() if g == "space"][:10]
    answer = content_engine.recommend_for_items(liked, k=10)
    assert answer["method"] == "fold_in" and answer["liked"] == len(liked)
    assert not {i["item_id"] for i in answer["items"]} & set(liked)
    share = _kind_share(answer["items"], genres, "space")
    assert share >= 2 * _base_rate(small_demo, "space"), share
    # Deterministic: the same profile gets the same answer.
    again = content_engine.recommend_for_items(list(reversed(liked)), k=10)
    assert [i["item_id"] for i in again["items"]] == [i["item_id"] for i in answer["items"]]


def test_similar_items_excludes_itself_and_shares_its_kind(content_engine, small_demo):
    genres = _genres(small_demo)
    space = [i for i, g in genres.items() if g == "space"][:5]
    shares = []
    for item in space:
        answer = content_engine.similar_items(item, k=10)
        assert item not in [i["item_id"] for i in answer["items"]]
        assert answer["title"] == small_demo.items.set_index("item_id").loc[item, "title"]
        shares.append(_kind_share(answer["items"], genres, "space"))
    assert np.mean(shares) >= 2 * _base_rate(small_demo, "space")


@pytest.mark.parametrize("engine_name, method", [("content_engine", "content_projection"),
                                                 ("id_engine", "content_neighbours")])
def test_new_item_lands_near_its_kind(engine_name, method, small_demo, request):
    engine = request.getfixturevalue(engine_name)
    genres = _genres(small_demo)
    answer = engine.score_new_item(_new_space_item(small_demo), k_users=7, k_items=10)
    assert answer["method"] == method and answer["modalities"] == ["image", "text"]
    assert len(answer["users"]) == 7 and len(answer["similar_items"]) == 10
    assert set(answer["embedding"]) == {"text", "image"}
    share = _kind_share(answer["similar_items"], genres, "space")
    assert share >= 2 * _base_rate(small_demo, "space"), share
    # The users it picks like that kind more than users at large do.
    interactions = small_demo.interactions
    space_items = {small_demo.item_ids.tolist().index(i) for i, g in genres.items()
                   if "space" in g.split("|")}
    liking = interactions.assign(space=interactions["item"].isin(space_items)) \
        .groupby("user")["space"].mean()
    picked = [small_demo.user_ids.tolist().index(u["user_id"]) for u in answer["users"]]
    assert liking.loc[picked].mean() > liking.mean()


def test_catalog_item_content_finds_itself(content_engine, small_demo):
    row = small_demo.items.iloc[17]
    answer = content_engine.score_new_item(NewItem(
        title=row["title"], text=row["overview"], genres=row["genres"],
        image=Path(row["image_path"]).read_bytes()), k_users=3, k_items=3)
    assert answer["similar_items"][0]["item_id"] == row["item_id"]
    text_only = content_engine.score_new_item(NewItem(title=row["title"], text=row["overview"]),
                                              return_embedding=False)
    assert text_only["modalities"] == ["text"] and "embedding" not in text_only


def test_bad_requests_name_the_field(content_engine):
    e = content_engine
    for k in (0, 1001, -3, "10", 2.5, True):
        with pytest.raises(RequestError, match="k: must be an integer from 1 to 1000"):
            e.recommend("u1", k=k)
    with pytest.raises(UnknownIdError) as err:
        e.recommend_for_items(["d1", "no-such-item", "d2", "also-missing"])
    assert err.value.status == 404 and err.value.ids == ["no-such-item", "also-missing"]
    assert "'no-such-item'" in str(err.value) and "item_ids" in str(err.value)
    with pytest.raises(RequestError, match="item_ids: needs at least one"):
        e.recommend_for_items([])
    with pytest.raises(RequestError, match="at most 1000 item ids"):
        e.recommend_for_items(["d1"] * 1001)
    with pytest.raises(UnknownIdError, match="item_id: unknown item id: 'zzz'"):
        e.similar_items("zzz")
    with pytest.raises(RequestError, match="image: not a decodable image"):
        e.score_new_item(NewItem(title="x", image=b"definitely not a picture"))
    with pytest.raises(RequestError, match="no usable content"):
        e.score_new_item(NewItem(title="  "))
    with pytest.raises(RequestError, match="k_users"):
        e.score_new_item(NewItem(title="x"), k_users=0)


def test_metadata_carries_version_metrics_protocol_and_encoders(content_engine, small_demo):
    meta = content_engine.metadata()
    assert meta["model_version"] == 3 and meta["metrics"] == {"ndcg@10": 0.5}
    assert meta["protocol"] == {"name": "ncf"} and meta["variant"] == "text+image"
    assert meta["dataset"]["content_hash"] == small_demo.content_hash()
    assert meta["encoders"]["source"] == "basic" and meta["items"] == small_demo.n_items
    assert meta["limits"]["max_k"] == 1000 and len(meta["model_artifact_sha256"]) == 64


def test_bundle_refuses_a_model_from_other_data(small_demo, content_engine, tmp_path):
    from bonmf_core.dataset import Dataset
    from bonmf_core.demo import demo_dataset

    model_dir = content_engine.path / "model"
    other = demo_dataset(seed=1, n_users=100, n_items=40, image_dir=tmp_path / "img")
    with pytest.raises(ValueError, match="id maps do not match dataset"):
        write_bundle(tmp_path / "a", model_dir, other, {"source": "basic"})
    # Same ids, other texts: the text features the model was trained on differ.
    items = small_demo.items.copy()
    items["overview"] = "entirely different words"
    edited = Dataset(name=small_demo.name, interactions=small_demo.interactions, items=items,
                     users=small_demo.users, rating_scale=small_demo.rating_scale)
    with pytest.raises(ValueError, match="text features differ"):
        write_bundle(tmp_path / "b", model_dir, edited, {"source": "basic"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pretrained_encoders_travel_in_the_bundle(small_demo, tmp_path_factory):
    """The packaged MiniLM / EfficientNet give a catalog item's own content the vector the
    catalog was encoded with, so a new item lands in the same space."""
    params = load_params()
    bundle = _bundle(tmp_path_factory, small_demo, "id", params["encoders"])
    assert (bundle / "encoders" / "text" / "config.json").exists()
    assert (bundle / "encoders" / "image" / "weights.safetensors").exists()
    engine = ServingEngine(bundle)
    row = small_demo.items.iloc[3]
    answer = engine.score_new_item(NewItem(
        title=row["title"], text=row["overview"], genres=row["genres"],
        image=Path(row["image_path"]).read_bytes()), k_items=3)
    for m in ("text", "image"):
        new = torch.tensor(answer["embedding"][m])
        cos = torch.nn.functional.cosine_similarity(new, engine.content[m][3], dim=0)
        assert cos > 0.99, (m, float(cos))
    assert answer["content_neighbours"][0] == row["item_id"]
    assert engine.metadata()["encoders"] == {
        "source": "pretrained", "text": "sentence-transformers/all-MiniLM-L6-v2",
        "image": "efficientnet_lite0"}


def test_service_class_answers_in_process_and_maps_errors(content_engine, tmp_path_factory):
    """bentos/service.py's class over a model saved in the BentoML store (no HTTP)."""
    import os

    from bentos.packaging import configure_bentoml, save_bento_model

    configure_bentoml()
    tag = save_bento_model(content_engine.path, "bonmf-test", {"model_version": "3"}, {})
    os.environ["BONMF_BENTO_MODEL"] = tag
    try:
        import importlib

        import bentos.service as service_module
        service_module = importlib.reload(service_module)  # picks up BONMF_BENTO_MODEL
        from bentoml.exceptions import InvalidArgument, NotFound

        svc = service_module.Recommendations()
        import asyncio

        answer = asyncio.run(svc.recommend(user_id="u5", k=3))
        assert [i.item_id for i in answer.items] == \
            [i["item_id"] for i in content_engine.recommend("u5", k=3)["items"]]
        assert asyncio.run(svc.recommend(user_id="stranger", k=2)).fallback == "popularity"
        assert asyncio.run(svc.metadata())["model_version"] == 3
        with pytest.raises(NotFound, match="'nope'"):
            svc.recommend_for_items(item_ids=["d1", "nope"], k=3)
        with pytest.raises(InvalidArgument, match="k: must be"):
            asyncio.run(svc.similar_items(item_id="d1", k=5000))
    finally:
        os.environ.pop("BONMF_BENTO_MODEL", None)
