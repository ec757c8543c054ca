"""The service's logic (bonmf_core.serving) and the BentoML service class, in-process, on
models trained on the demo: seen items excluded, popularity fallback flagged, fold-in and new
items landing near their kind, 4xx-type errors naming the field or the unknown ids; every
score the model's own; the runtime free of the store (SQLAlchemy)."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bonmf_core.config import EncodersConfig, load_config
from bonmf_core.recommender import Recommender
from bonmf_core.serving.bundle import write_bundle
from bonmf_core.serving.engine import NewItem, RequestError, ServingEngine, UnknownIdError

FAST = ["train.epochs=6", "train.batch_size=1024", "train.lr=0.01", "train.refit=false",
        "encoders.source=basic"]
BASIC = EncodersConfig(source="basic")


def fast_config():
    """The schema's defaults (no params file) with a short training."""
    return load_config(None, FAST, use_default_file=False)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bundle(tmp_path_factory, dataset, variant: str, encoders: EncodersConfig) -> Path:
    config = fast_config()
    folder = tmp_path_factory.mktemp(f"serving-{variant.replace('+', '_')}")
    Recommender.fit(dataset, variant, config).save(folder / "model")
    return write_bundle(folder / "bundle", folder / "model", dataset, encoders,
                        info={"model_version": 3, "metrics": {"ndcg@10": 0.5},
                              "protocol": {"name": "ncf"}},
                        serving=config.serving)


@pytest.fixture(scope="module")
def content_engine(small_demo, tmp_path_factory):
    return ServingEngine(_bundle(tmp_path_factory, small_demo, "text+image", BASIC))


@pytest.fixture(scope="module")
def id_engine(small_demo, tmp_path_factory):
    return ServingEngine(_bundle(tmp_path_factory, small_demo, "id", BASIC))


def _genres(dataset) -> dict:
    return dict(zip(dataset.items["item_id"], dataset.items["genres"]))


def _kind_share(items: list[dict], genres: dict, kind: str) -> float:
    return float(np.mean([kind in genres[i["item_id"]].split("|") for i in items]))


def _base_rate(dataset, kind: str) -> float:
    return float(dataset.items["genres"].str.split("|").apply(lambda g: kind in g).mean())


def _new_space_item(dataset) -> NewItem:
    """A new item of one kind (space): words of pure-space catalog items, a space picture."""
    from PIL import Image

    from bonmf_core.data.demo import THEMES, _draw_picture

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


def test_unusable_images_are_refused_with_the_reason_and_status(content_engine):
    """Empty and undecodable → 400, over the pixel limit or a decompression bomb → 413,
    each before the encoders decode a pixel; never another exception type."""
    from bonmf_core.serving.engine import PayloadTooLargeError
    from test_service_security import png_header, real_png

    cases = [(b"", 400, "image: the file is empty"),
             (real_png(64)[:90], 400, "image: not a decodable image"),
             (png_header(6000, 5000), 413, "image: 6000×5000 = 30000000 pixels"),
             (png_header(20000, 20000), 413, "image: refused as a decompression bomb")]
    for data, status, says in cases:
        with pytest.raises(RequestError, match=says) as err:
            content_engine.score_new_item(NewItem(title="x", image=data))
        assert err.value.status == status
        assert isinstance(err.value, PayloadTooLargeError) == (status == 413)
    answer = content_engine.score_new_item(NewItem(title="x", image=real_png()))
    assert answer["modalities"] == ["image", "text"]


def test_metadata_carries_version_metrics_protocol_and_encoders(content_engine, small_demo):
    meta = content_engine.metadata()
    assert meta["model_version"] == 3 and meta["metrics"] == {"ndcg@10": 0.5}
    assert meta["protocol"] == {"name": "ncf"} and meta["variant"] == "text+image"
    assert meta["dataset"]["content_hash"] == small_demo.content_hash()
    assert meta["encoders"]["source"] == "basic" and meta["items"] == small_demo.n_items
    assert meta["limits"]["max_k"] == 1000 and len(meta["model_artifact_sha256"]) == 64
    assert meta["limits"]["max_image_pixels"] == 25_000_000


def test_bundle_refuses_a_model_from_other_data(small_demo, content_engine, tmp_path):
    from bonmf_core.data.dataset import Dataset
    from bonmf_core.data.demo import demo_dataset

    model_dir = content_engine.path / "model"
    other = demo_dataset(seed=1, n_users=100, n_items=40, image_dir=tmp_path / "img")
    with pytest.raises(ValueError, match="id maps do not match dataset"):
        write_bundle(tmp_path / "a", model_dir, other, BASIC)
    # Same ids, other texts: the text features the model was trained on differ.
    items = small_demo.items.copy()
    items["overview"] = "entirely different words"
    edited = Dataset(name=small_demo.name, interactions=small_demo.interactions, items=items,
                     users=small_demo.users, rating_scale=small_demo.rating_scale)
    with pytest.raises(ValueError, match="text features differ"):
        write_bundle(tmp_path / "b", model_dir, edited, BASIC)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pretrained_encoders_travel_in_the_bundle(small_demo, tmp_path_factory):
    """The packaged MiniLM / EfficientNet give a catalog item's own content the vector the
    catalog was encoded with, so a new item lands in the same space."""
    bundle = _bundle(tmp_path_factory, small_demo, "id", EncodersConfig())
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


# -- the engine scores through the model's own methods ------------------------------------

def test_engine_answers_are_the_models_methods(content_engine, small_demo):
    """Every score the engine gives is a BoNMF method's output (score_sides, fold_in,
    content_item_vectors), so a change of the model's head is a change of serving."""
    e, m = content_engine, content_engine.model
    all_items = torch.arange(len(e.item_ids))
    with torch.inference_mode():
        items = m.item_side(m.item_vectors(all_items))
        u = e.user_index["u5"]
        expected = m.score_sides(m.user_side(m.user_vectors(torch.tensor([u]))), items)[0]
    answer = e.recommend("u5", k=10, exclude_seen=False)
    top = torch.topk(expected, 10)
    assert [i["item_id"] for i in answer["items"]] == [e.item_ids[i] for i in top.indices]
    assert np.allclose([i["score"] for i in answer["items"]], top.values, atol=1e-5)
    # Fold-in: the model's vector for the profile, scored by the model.
    liked_ids = ["d1", "d4", "d9"]
    liked = sorted(e.item_index[i] for i in liked_ids)
    uv = m.fold_in(liked)
    with torch.inference_mode():
        scores = m.score_sides(m.user_side(uv[None]), items)[0]
    answer = e.recommend_for_items(liked_ids, k=8, exclude_liked=False)
    top = torch.topk(scores, 8)
    assert [i["item_id"] for i in answer["items"]] == [e.item_ids[i] for i in top.indices]
    assert np.allclose([i["score"] for i in answer["items"]], top.values, atol=1e-5)
    # A new item: its vector is the model's content projection, its users the model's scores.
    row = small_demo.items.iloc[40]
    new = e.score_new_item(NewItem(title=row["title"], text=row["overview"],
                                   genres=row["genres"],
                                   image=Path(row["image_path"]).read_bytes()), k_users=6)
    raw = {mod: torch.tensor(v)[None] for mod, v in new["embedding"].items()}
    with torch.inference_mode():
        iv = m.content_item_vectors(raw)[0]
        user_scores = m.score_sides(m.user_side(m.user_vectors(torch.arange(len(e.user_ids)))),
                                    m.item_side(iv[None]))[:, 0]
    assert np.allclose(new["item_vector"], iv.tolist(), atol=1e-4)
    top = torch.topk(user_scores, 6)
    assert [x["user_id"] for x in new["users"]] == [e.user_ids[i] for i in top.indices]


def test_a_changed_head_changes_the_served_scores(content_engine):
    """The engine holds no copy of the head: a model whose output bias moved by 1 serves
    every logit moved by 1 (same ranking)."""
    engine = ServingEngine(content_engine.path, load_encoders=False)
    before = engine.recommend("u5", k=5)["items"]
    with torch.no_grad():
        bias = engine.model.bias if engine.model.config.head == "dot" else engine.model.out.bias
        bias += 1.0
    after = engine.recommend("u5", k=5)["items"]
    assert [i["item_id"] for i in after] == [i["item_id"] for i in before]
    assert np.allclose([i["score"] for i in after], [i["score"] + 1.0 for i in before],
                       atol=1e-5)


def test_fold_in_is_deterministic_and_leaves_the_model_untouched(content_engine):
    m = content_engine.model
    state = {k: v.clone() for k, v in m.state_dict().items()}
    a = m.fold_in([5, 2, 9])
    b = m.fold_in([9, 5, 2, 5], content_engine.items)  # same profile: order, repeats
    assert torch.equal(a, b) and a.shape == (m.user_embedding.embedding_dim,)
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    # The fitted vector prefers its liked items to the catalog at large.
    with torch.inference_mode():
        scores = m.score_sides(m.user_side(a[None]), content_engine.items)[0]
    assert scores[[2, 5, 9]].mean() > scores.mean()


def test_score_sides_equals_the_pairwise_forward(content_engine):
    """The all-pairs product (serving, score_users) gives the training forward's numbers."""
    m = content_engine.model
    users, items = torch.arange(0, 600, 37), torch.arange(0, 250, 11)
    with torch.inference_mode():
        pairwise = m(users[:, None].expand(-1, len(items)).reshape(-1),
                     items.repeat(len(users))).reshape(len(users), len(items))
        sides = m.score_sides(m.user_side(m.user_vectors(users)),
                              m.item_side(m.item_vectors(items)))
    assert torch.allclose(sides, pairwise, atol=1e-5)
    assert torch.allclose(m.score_users(users, items), sides)


@pytest.mark.parametrize("large_catalog", [False, True], ids=["exact", "two_stage"])
def test_runtime_runs_from_the_bentos_files_without_sqlalchemy(content_engine, tmp_path,
                                                               large_catalog):
    """The service, from a copy of exactly the files a Bento carries (packaging.INCLUDE),
    imports, loads its model and answers every API without SQLAlchemy or the store — also
    when its catalog counts as large (the ANN index: retrieval.py and faiss in the Bento)."""
    from bentos.packaging import INCLUDE, REPO_ROOT, configure_bentoml, save_bento_model

    configure_bentoml()
    bundle = Path(content_engine.path)
    if large_catalog:
        bundle = tmp_path / "bundle"
        shutil.copytree(content_engine.path, bundle)
        info = json.loads((bundle / "serving.json").read_text())
        info["serving"] = {**info.get("serving", {}), "ann_min_items": 1, "ann_lists": 4}
        (bundle / "serving.json").write_text(json.dumps(info))
    tag = save_bento_model(bundle, "bonmf-runtime", {"model_version": "3"}, {})
    src = tmp_path / "src"
    for name in INCLUDE:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, src / name)
    script = """
import asyncio, json, sys
import bentos.service as service
svc = service.Recommendations()
asyncio.run(svc.recommend(user_id="u5", k=3))
svc.recommend_for_items(item_ids=["d1", "d2"], k=3)
asyncio.run(svc.similar_items(item_id="d1", k=3))
svc.score_new_item(title="The Nebula Saga", text="stars and ships", genres="space")
asyncio.run(svc.metadata())
ours = [m for m in sys.modules if m.split(".")[0] in ("bonmf_core", "bentos")]
print(json.dumps({"sqlalchemy": [m for m in sys.modules if m.split(".")[0] == "sqlalchemy"],
                  "modules": ours, "files": [sys.modules[m].__file__ for m in ours]}))
"""
    env = {**os.environ, "BONMF_BENTO_MODEL": tag, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=src, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["sqlalchemy"] == []
    assert not [m for m in loaded["modules"] if m.startswith(("bonmf_core.store",
                                                              "bonmf_core.serving.bundle"))]
    assert all(Path(f).is_relative_to(src) for f in loaded["files"]), loaded["files"]
    assert ("bonmf_core.serving.retrieval" in loaded["modules"]) == large_catalog
