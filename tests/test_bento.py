"""The Bento for real: packaged offline, exported as a .bento archive, imported into a fresh
BentoML home (another machine, as far as BentoML knows), served by `bentoml serve` in a
subprocess on 127.0.0.1 and asked over HTTP — correct answers and 4xx for bad requests."""

import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from bonmf_core.recommender import Recommender
from test_serving import fast_config


@pytest.fixture(scope="module")
def packaged(small_demo, tmp_path_factory):
    import torch

    from bentos.packaging import package

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("bento")
    config = fast_config()
    Recommender.fit(small_demo, "text+image", config).save(folder / "model")
    small_demo.save(folder / "dataset")
    info = {"model_version": 11, "variant": "text+image", "metrics": {"ndcg@10": 0.61},
            "protocol": {"name": "ncf", "ks": [10]}, "dataset_hash": small_demo.content_hash()}
    first = package(folder / "model", folder / "dataset", folder / "out", config, info)
    again = package(folder / "model", folder / "dataset", folder / "out", config, info)
    return first, again, folder


def test_packaging_is_recorded_and_skipped_when_unchanged(packaged):
    first, again, folder = packaged
    record = json.loads((folder / "out" / "bento.json").read_text())
    assert record["bento_tag"] == first["bento_tag"] and not first["reused"]
    assert again["reused"] and again["bento_tag"] == first["bento_tag"]
    archive = Path(first["archive"])
    assert archive.exists() and archive.stat().st_mtime == Path(again["archive"]).stat().st_mtime
    import bentoml

    bento = bentoml.bentos.get(first["bento_tag"])
    assert [str(m.tag) for m in bento.info.all_models] == [first["model_tag"]]
    model = bentoml.models.get(first["model_tag"])
    assert model.info.labels["model_version"] == "11"
    assert json.loads(model.info.metadata["metrics"]) == {"ndcg@10": 0.61}
    # Offline build: nothing was locked against an index; the pins are the installed ones.
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    assert "torch==" in requirements and "bentoml==" in requirements
    # Its own configuration binds loopback (serving.host), whatever `bentoml serve` says.
    import yaml

    info = yaml.safe_load((Path(bento.path) / "bento.yaml").read_text())
    assert info["services"][0]["config"]["http"]["host"] == "127.0.0.1"
    # Only what serving needs: no store (SQLAlchemy), no bundle builder, no training.
    assert "sqlalchemy" not in requirements.lower()
    src = Path(bento.path) / "src"
    assert (src / "bonmf_core" / "serving" / "engine.py").exists()
    assert not (src / "bonmf_core" / "store").exists()
    assert not (src / "bonmf_core" / "serving" / "bundle.py").exists()
    assert not (src / "bonmf_core" / "training.py").exists()


@pytest.fixture(scope="module")
def server(packaged, tmp_path_factory):
    """The exported archive imported into an empty BentoML home and served from there."""
    from bentos.server import BentoServer

    first, _, _ = packaged
    home = tmp_path_factory.mktemp("fresh-bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    subprocess.run([str(bentoml_cli), "import", first["archive"]], env=env, check=True,
                   capture_output=True, timeout=120)
    with BentoServer(first["bento_tag"], env={"BENTOML_HOME": str(home),
                                              "OMP_NUM_THREADS": "1"}) as srv:
        srv.model_tag, srv.bento_tag = first["model_tag"], first["bento_tag"]
        tree = srv.processes()
        assert len(tree) >= 2  # `bentoml serve` and its worker
        yield srv
    # Stopped as a whole tree: the worker (in a session of its own) included.
    assert srv.proc.poll() is not None and not [p for p in tree if p.is_running()]


def _post(server, route: str, body=None, data: bytes | None = None, headers=None):
    req = urllib.request.Request(
        server.url + route, data=data if data is not None else json.dumps(body).encode(),
        headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _multipart(fields: dict, image: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="poster.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + image
                 + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_served_recommendations_exclude_seen_and_flag_the_fallback(server, small_demo):
    status, answer = _post(server, "/recommend", {"user_id": "u5", "k": 15})
    assert status == 200 and answer["known_user"] and answer["fallback"] is None
    u = small_demo.user_ids.tolist().index("u5")
    seen = set(small_demo.item_ids[small_demo.interactions.query("user == @u")["item"]])
    ids = [i["item_id"] for i in answer["items"]]
    assert len(ids) == 15 and not set(ids) & seen
    status, answer = _post(server, "/recommend", {"user_id": "someone-new"})
    assert status == 200 and answer["fallback"] == "popularity" and len(answer["items"]) == 10
    status, meta = _post(server, "/metadata", {})
    assert status == 200 and meta["model_version"] == 11
    assert meta["bento_model_tag"] == server.model_tag and meta["bento_tag"] == server.bento_tag
    assert meta["protocol"]["name"] == "ncf" and meta["dataset"]["content_hash"]


def test_served_new_item_with_image_lands_near_its_kind(server, small_demo):
    from test_serving import _base_rate, _genres, _kind_share, _new_space_item

    item = _new_space_item(small_demo)
    body, headers = _multipart({"title": item.title, "text": item.text, "genres": item.genres,
                                "k_items": 10, "k_users": 5}, item.image)
    status, answer = _post(server, "/score_new_item", data=body, headers=headers)
    assert status == 200, answer
    assert answer["modalities"] == ["image", "text"] and len(answer["users"]) == 5
    share = _kind_share(answer["similar_items"], _genres(small_demo), "space")
    assert share >= 2 * _base_rate(small_demo, "space")
    status, liked = _post(server, "/recommend_for_items", {"item_ids": ["d1", "d2"], "k": 4})
    assert status == 200 and len(liked["items"]) == 4
    status, similar = _post(server, "/similar_items", {"item_id": "d3", "k": 4})
    assert status == 200 and "d3" not in [i["item_id"] for i in similar["items"]]


@pytest.mark.parametrize("route, body, status, says", [
    ("/recommend", {"user_id": "u1", "k": 0}, 400, "greater than or equal to 1"),
    ("/recommend", {"user_id": "u1", "k": 1001}, 400, "less than or equal to 1000"),
    ("/recommend", {"user_id": 17}, 400, "valid string"),
    ("/recommend", {"k": 3}, 400, "user_id"),
    ("/recommend_for_items", {"item_ids": ["d1", "not-an-item"]}, 404, "'not-an-item'"),
    ("/recommend_for_items", {"item_ids": []}, 400, "at least 1"),
    ("/similar_items", {"item_id": "missing-item"}, 404, "'missing-item'"),
    ("/score_new_item", {"title": ""}, 400, "no usable content"),
])
def test_served_bad_requests_get_a_clear_4xx(server, route, body, status, says):
    got, text = _post(server, route, body)
    assert got == status and says in text, (got, text)


def test_served_malformed_json_and_bad_image_are_400(server):
    got, text = _post(server, "/recommend", data=b"{not json")
    assert got == 400 and "json" in text.lower()
    body, headers = _multipart({"title": "x"}, b"this is not an image")
    got, text = _post(server, "/score_new_item", data=body, headers=headers)
    assert got == 400 and "image: not a decodable image" in text


def test_served_oversized_body_is_refused_before_it_is_read(server):
    """413 from the Content-Length alone: the server never waits for 50 MB that never come."""
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"POST /score_new_item HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 52428800\r\n\r\n{")
        reply = b""
        while b"}" not in reply:  # headers and the JSON body may come in separate packets
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "over the limit" in reply
    # And the server is still answering.
    assert _post(server, "/recommend", {"user_id": "u1", "k": 1})[0] == 200


def test_each_build_pins_its_own_model_in_one_process(packaged, small_demo, tmp_path):
    """A long-lived process (the Dagster daemon, a notebook) packaging a second model must not
    reuse the service module imported for the first one."""
    import bentoml

    from bentos.packaging import package

    first, _, folder = packaged
    config = fast_config()
    Recommender.fit(small_demo, "id", config).save(tmp_path / "model")
    second = package(tmp_path / "model", folder / "dataset", tmp_path / "out", config,
                     {"model_version": 12})
    assert second["model_tag"] != first["model_tag"]
    for record in (first, second):
        models = bentoml.bentos.get(record["bento_tag"]).info.all_models
        assert [str(m.tag) for m in models] == [record["model_tag"]]


def test_a_service_that_cannot_load_fails_fast_with_the_reason(tmp_path):
    """A model that is not a serving bundle: `BentoServer` reports BentoML's load error at once
    instead of waiting out its readiness timeout, and leaves no server behind."""
    import time

    import bentoml

    from bentos.packaging import configure_bentoml
    from bentos.server import BentoServer

    configure_bentoml()
    with bentoml.models.create("not-a-bundle") as model:
        (Path(model.path) / "readme.txt").write_text("no serving.json here")
    server = BentoServer("bentos.service:Recommendations", cwd=Path(__file__).parents[1],
                         env={"BONMF_BENTO_MODEL": str(model.tag), "OMP_NUM_THREADS": "1"},
                         ready_timeout=120)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="not a serving bundle"):
        server.start()
    assert time.monotonic() - started < 60
    assert server.proc.poll() is not None
