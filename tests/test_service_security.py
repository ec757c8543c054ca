"""The service secure by default, strict about its inputs, with a clean lifecycle — against
real `bentoml serve` processes of packaged demo Bentos, over HTTP on loopback:

- strict inputs: wrong types, unknown keys, k out of range, bad images (empty, undecodable,
  truncated, a decompression bomb, over `serving.max_image_pixels`) are 4xx naming the field
  or the reason; a file field given as text (a URL) is refused, never fetched;
- an API key (`$BONMF_API_KEY` or `serving.api_key_file`) guards every endpoint but /readyz
  and /livez, /metrics included;
- the Bento binds 127.0.0.1 unless told otherwise; another interface without a key is warned
  about; every printed or documented serve line names the host;
- no process of a server survives `stop()`, after SIGKILL of `bentoml serve` or of the
  process that launched it;
- a fuzz of generated malformed requests gets only 4xx and leaves the server answering;
- a newly promoted Bento replaces a running one behind a port swap without a failed request.

The unit tests of the guards (`bentos/security.py`, `bentos/inputs.py`, `open_image`) come
first; they need no server.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest

from bonmf_core.recommender import Recommender
from test_serving import FAST

REPO = Path(__file__).resolve().parents[1]
MAX_K = 1000  # the schema's default serving.max_k, which the demo Bentos are packaged with


# -- images -----------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width × height (8-bit RGB) with almost no pixel data: what a
    decompression bomb looks like to a server before it decodes anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) +
            _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def real_png(size: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 60, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_open_image_names_each_reason():
    from bonmf_core.content.encoders import open_image
    from bonmf_core.errors import ImageError

    img = open_image(real_png(20), max_pixels=400)
    assert img.mode == "RGB" and img.size == (20, 20)
    cases = [(b"", "empty", False), (b"plain text, no image", "not a decodable image", False),
             (real_png(64)[:80], "not a decodable image", False),
             (png_header(20000, 20000), "decompression bomb", True),
             (png_header(6000, 5000), "30000000 pixels, the limit is 25000000", True)]
    for data, says, too_large in cases:
        with pytest.raises(ImageError, match=says) as err:
            open_image(data, max_pixels=25_000_000)
        assert err.value.too_large is too_large and isinstance(err.value, ValueError)


def test_catalog_images_flag_bombs_instead_of_raising(tmp_path):
    """The catalog encoder's loader flags a bomb poster as unreadable, like a corrupt one."""
    from bonmf_core.content.encoders import _ImageFiles

    paths = []
    for name, data in [("ok.png", real_png()), ("bomb.png", png_header(20000, 20000)),
                       ("junk.png", b"junk")]:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    files = _ImageFiles(paths + [None], transform=lambda img: img.size)
    assert [files[i] for i in range(4)] == [((48, 48), True), (None, False), (None, False),
                                            (None, False)]


# -- the guards in-process ------------------------------------------------------------------

def test_api_key_comes_from_env_then_file_and_refuses_unusable_keys(tmp_path):
    from bentos.security import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("  from-the-file\n")
    assert resolve_api_key(None, {}) is None
    assert resolve_api_key(str(key_file), {}) == "from-the-file"
    assert resolve_api_key(str(key_file), {"BONMF_API_KEY": "from-env"}) == "from-env"
    with pytest.raises(ValueError, match=r"\$BONMF_API_KEY is set but empty"):
        resolve_api_key(str(key_file), {"BONMF_API_KEY": "  "})
    with pytest.raises(ValueError, match=f"api_key_file {tmp_path / 'missing'}: cannot read"):
        resolve_api_key(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        resolve_api_key(str(tmp_path / "empty"), {})


def test_api_key_accepts_only_the_exact_bearer_token():
    from bentos.security import ApiKey

    key = ApiKey()
    key.resolve(None, {"BONMF_API_KEY": "k3y-Value"})
    assert key.required
    assert key.accepts(b"Bearer k3y-Value") and key.accepts(b"bearer k3y-Value")
    for wrong in (None, b"", b"k3y-Value", b"Bearer", b"Bearer k3y-Valu", b"Bearer k3y-Value2",
                  b"Basic k3y-Value", b"Bearer K3Y-VALUE", b"Bearer \xffk3y-Value"):
        assert not key.accepts(wrong), wrong
    open_key = ApiKey()
    open_key.resolve(None, {})
    assert not open_key.required and open_key.accepts(None)


def _asgi(middleware_app, path: str, headers=(), body: bytes = b"", more=False):
    """Drive an ASGI app with one HTTP request → (status, body, whether the app ran)."""
    import asyncio

    sent, reached = [], []
    chunks = [{"type": "http.request", "body": body, "more_body": more},
              {"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    async def run():
        scope = {"type": "http", "path": path, "method": "POST", "headers": list(headers)}
        try:
            await middleware_app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - what a chunked overflow raises
            return exc
        return None

    raised = asyncio.run(run())
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if "body" in m), raised


async def _app_ok(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_auth_middleware_guards_all_but_the_probes():
    from bentos.security import ApiKey, ApiKeyAuth

    key = ApiKey()
    app = ApiKeyAuth(_app_ok, key)
    assert _asgi(app, "/recommend")[0] == 503  # before the service resolved its key
    assert _asgi(app, "/livez")[0] == 200
    key.resolve(None, {"BONMF_API_KEY": "abc123"})
    for path in ("/recommend", "/metrics", "/docs.json", "/", "/readyz/", "/livez2",
                 "/readyz/../metrics"):
        status, body, _ = _asgi(app, path)
        assert status == 401 and b"Bearer" in body, path
    assert _asgi(app, "/metrics", [(b"authorization", b"Bearer abc123")])[0] == 200
    assert _asgi(app, "/readyz")[0] == _asgi(app, "/livez")[0] == 200


def test_body_limit_refuses_by_length_and_while_reading():
    from bentos.security import BodyLimit, BodyTooLarge

    app = BodyLimit(_app_ok, max_bytes=100)
    assert _asgi(app, "/x", [(b"content-length", b"101")])[0] == 413
    assert _asgi(app, "/x", body=b"x" * 100)[0] == 200
    status, _, raised = _asgi(app, "/x", body=b"x" * 60, more=True)  # chunked: 120 bytes
    assert status is None and isinstance(raised, BodyTooLarge)


def test_exposure_warning_only_beyond_loopback_without_a_key():
    from bentos.security import exposure_warning

    assert exposure_warning(["127.0.0.1", "::1"], key_required=False) is None
    assert exposure_warning(["0.0.0.0"], key_required=True) is None
    warning = exposure_warning(["127.0.0.1", "0.0.0.0", "::"], key_required=False)
    assert "0.0.0.0" in warning and "::" in warning and "BONMF_API_KEY" in warning


def test_serving_host_must_be_an_ip_address():
    from bonmf_core.config import load_config
    from bonmf_core.errors import ConfigError

    assert load_config(use_default_file=False).serving.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="serving.host: .*must be an IP address"):
        load_config(sets=["serving.host=localhost"], use_default_file=False)


def test_every_documented_or_printed_serve_line_names_the_host():
    """README.md, bentos/README.md, orchestration/ and packaging: each `bentoml serve`
    command (not the tool's name in prose, `bentoml serve`) names --host, on its line or
    the f-string's continuation line."""
    files = [REPO / "README.md", REPO / "bentos" / "README.md", REPO / "bentos" / "packaging.py",
             *sorted((REPO / "orchestration").rglob("*.py")),
             *sorted((REPO / "orchestration").rglob("*.md"))]
    commands = []
    for path in files:
        text = path.read_text()
        for match in re.finditer(r"bentoml serve(?!`)", text):
            end = text.find("\n", text.find("\n", match.end()) + 1)
            commands.append((path.name, text[match.start():end if end > 0 else None]))
    names = {name for name, _ in commands}
    assert {"README.md", "cli.py", "packaging.py"} <= names, names
    missing = [(name, line) for name, line in commands if "--host" not in line]
    assert not missing, missing


def test_package_cli_prints_the_serve_line_with_the_host(packaged, capsys):
    import argparse

    from bentos.packaging import package_cli

    folder = packaged["folder"]
    args = argparse.Namespace(params=None, set=FAST, model=str(folder / "model-v21"),
                              dataset=str(folder / "dataset"), out=str(folder / "out-v21"),
                              no_build=False)
    assert package_cli(args) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"serve it: .*bentoml serve {packaged['v21']['bento_tag']} "
                     rf"--host 127\.0\.0\.1$", printed, re.M), printed


# -- the served Bentos ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def packaged(small_demo, tmp_path_factory):
    """Two Bentos of the demo: v21 with the schema's serving defaults (no key file), v22
    packaged with `serving.api_key_file` (a new BentoML model: the section differs)."""
    import torch

    from bentos.packaging import package
    from bonmf_core.config import load_config

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("security-bentos")
    small_demo.save(folder / "dataset")
    key_file = folder / "api-key"
    key_file.write_text(secrets.token_urlsafe(24) + "\n")
    out = {"folder": folder, "key_file": key_file}
    for version, variant, sets in [(21, "text+image", []),
                                   (22, "id", [f"serving.api_key_file={key_file}"])]:
        config = load_config(None, FAST + sets, use_default_file=False)
        Recommender.fit(small_demo, variant, config).save(folder / f"model-v{version}")
        out[f"v{version}"] = package(folder / f"model-v{version}", folder / "dataset",
                                     folder / f"out-v{version}", config,
                                     {"model_version": version, "variant": variant})
    assert out["v21"]["model_tag"] != out["v22"]["model_tag"]
    return out


def _server(tag: str, **kwargs):
    from bentos.server import BentoServer

    env = {"OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    os.environ.pop("BONMF_API_KEY", None)  # only what a test passes reaches a server
    return BentoServer(tag, env=env, **kwargs)


def _assert_none_left(server, pids, marker: str | None = None, port: int | None = None,
                      since: float | None = None) -> None:
    """No process of the server runs: neither the pids seen nor any process started since
    the server whose environment carries its marker; and its port no longer answers."""
    from bentos.server import MARKER_ENV

    marker, port = marker or server.marker, port or server.port
    since = since if since is not None else server._started_at
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        marked = []
        for p in psutil.process_iter(["create_time"]):
            try:
                if (p.info["create_time"] or 0) >= since - 1 and \
                        p.environ().get(MARKER_ENV) == marker:
                    marked.append(p.pid)
            except psutil.Error:
                continue
        if (not left and not marked) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left and not marked, (left, marked)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.fixture(scope="module")
def api_key():
    return "test-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def server(packaged, api_key):
    """v21 with `$BONMF_API_KEY`: the strict-input, auth and fuzz tests' server."""
    srv = _server(packaged["v21"]["bento_tag"], env={"BONMF_API_KEY": api_key})
    with srv:
        srv.key = api_key
        srv.worker_pids = sorted(p.pid for p in srv.processes() if p.pid != srv.proc.pid)
        all_pids = [p.pid for p in srv.processes()]
        yield srv
    _assert_none_left(srv, all_pids)


@pytest.fixture(scope="module")
def keyfile_server(packaged):
    """v22, its key from `serving.api_key_file` (no environment variable)."""
    srv = _server(packaged["v22"]["bento_tag"])
    with srv:
        srv.key = packaged["key_file"].read_text().strip()
        all_pids = [p.pid for p in srv.processes()]
        yield srv
    _assert_none_left(srv, all_pids)


def request(server, method: str, path: str, body: bytes | None = None, headers=None,
            key: str | None = "default", timeout: float = 60) -> tuple[int, bytes]:
    """One request on its own connection → (status, body)."""
    headers = dict(headers or {})
    if key == "default":
        key = getattr(server, "key", None)
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {key}")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_json(server, path: str, payload, **kwargs) -> tuple[int, bytes]:
    return request(server, "POST", path, json.dumps(payload).encode(),
                   {"Content-Type": "application/json"}, **kwargs)


def multipart(parts: list[tuple], boundary: str = "fuzzboundary") -> tuple[bytes, dict]:
    """parts: (name, value) text fields or (name, filename, bytes) files."""
    out = b""
    for part in parts:
        if len(part) == 2:
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{part[0]}"'
                    f'\r\n\r\n').encode() + str(part[1]).encode() + b"\r\n"
        else:
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{part[0]}"; '
                    f'filename="{part[1]}"\r\nContent-Type: application/octet-stream'
                    f'\r\n\r\n').encode() + part[2] + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_form(server, parts, **kwargs) -> tuple[int, bytes]:
    body, headers = multipart(parts)
    return request(server, "POST", "/score_new_item", body, headers, **kwargs)


# -- strict inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("route, payload, says", [
    ("/recommend", {"user_id": "u1", "k": "5"}, "k: Input should be a valid integer"),
    ("/recommend", {"user_id": "u1", "k": True}, "k: Input should be a valid integer"),
    ("/recommend", {"user_id": "u1", "k": 5.0}, "k: Input should be a valid integer"),
    ("/recommend", {"user_id": "u1", "exclude_seen": "no"}, "exclude_seen: Input should be "
                                                            "a valid boolean"),
    ("/recommend", {"user_id": "u1", "exclude_seen": 0}, "exclude_seen: Input should be a "
                                                         "valid boolean"),
    ("/recommend", {"user_id": 17}, "user_id: Input should be a valid string"),
    ("/recommend", {"user_id": "u1", "K": 5}, "K: Extra inputs are not permitted"),
    ("/recommend", {"user_id": "u1", "k": 0}, "k: Input should be greater than or equal to 1"),
    ("/recommend", {"user_id": "u1", "k": MAX_K + 1}, f"k: Input should be less than or equal "
                                                      f"to {MAX_K}"),
    ("/recommend", ["u1"], "Input should be an object"),
    ("/recommend_for_items", {"item_ids": "d1"}, "item_ids: Input should be a valid array"),
    ("/recommend_for_items", {"item_ids": ["d1", 2]}, "item_ids.1: Input should be a valid "
                                                      "string"),
    ("/recommend_for_items", {"item_ids": ["d1"] * (MAX_K + 1)}, "item_ids: List should have "
                                                                "at most"),
    ("/similar_items", {"item_id": "d1", "k": None}, "k: Input should be a valid integer"),
    ("/score_new_item", {"title": "x", "k_users": "3"}, "k_users: Input should be a valid "
                                                        "integer"),
    ("/score_new_item", {"title": "x", "image": "http://127.0.0.1:9/poster.png"},
     "image: must be a file, uploaded as multipart/form-data"),
    ("/metadata", {"verbose": True}, "verbose: Extra inputs are not permitted"),
])
def test_wrong_types_and_ranges_are_400_naming_the_field(server, route, payload, says):
    status, body = post_json(server, route, payload)
    assert status == 400 and says in body.decode(), (status, body)


def test_the_largest_k_is_served(server):
    status, body = post_json(server, "/similar_items", {"item_id": "d1", "k": MAX_K})
    assert status == 200 and len(json.loads(body)["items"]) == 249  # every other item


@pytest.mark.parametrize("image, status, says", [
    (b"", 400, "image: the file is empty"),
    (b"GIF89a but not really", 400, "image: not a decodable image"),
    (None, 400, "image: not a decodable image"),  # a real PNG cut short
    (png_header(20000, 20000), 413, "image: refused as a decompression bomb"),
    (png_header(6000, 5000), 413, "image: 6000×5000 = 30000000 pixels, the limit is 25000000"),
])
def test_bad_images_are_refused_with_the_reason(server, image, status, says):
    image = real_png(64)[:90] if image is None else image
    got, body = post_form(server, [("title", "A poster"), ("image", "poster.png", image)])
    assert got == status and says in body.decode(), (got, body)


def test_a_good_image_and_text_fields_as_sent(server):
    """multipart text fields are text as sent: a title "1984" is not turned into a number;
    k fields parse as JSON numbers; an image answers with both modalities."""
    status, body = post_form(server, [("title", "1984"), ("k_users", "3"),
                                      ("image", "poster.png", real_png())])
    answer = json.loads(body)
    assert status == 200 and answer["modalities"] == ["image", "text"]
    assert len(answer["users"]) == 3
    status, body = post_form(server, [("title", "1984"), ("k_users", '"3"')])
    assert status == 400 and "k_users: Input should be a valid integer" in body.decode()


def test_a_file_field_sent_as_text_is_never_fetched(server):
    """BentoML would download a URL given as the image; here it is a 400 and nothing
    connects to the URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/poster.png"
    try:
        status, body = post_form(server, [("title", "x"), ("image", url)])
        assert status == 400 and "image: must be a file" in body.decode()
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize("parts, says", [
    ([("title", "x"), ("image", "a.png", b"1"), ("image", "b.png", b"2")], "Too many files"),
    ([("title", "x"), ("title", "y")], "title: given 2 times"),
    ([("title", "x"), ("genres", "g.txt", b"space")], "genres: a text field, not a file"),
    ([("title", "x"), ("colour", "blue")], "colour: Extra inputs are not permitted"),
])
def test_multipart_oddities_are_400(server, parts, says):
    status, body = post_form(server, parts)
    assert status == 400 and says in body.decode(), (status, body)


def test_content_types_outside_the_api_are_415(server):
    for route, content_type in [("/recommend", "text/plain"), ("/recommend", "multipart/"
                                                                             "form-data; "
                                                                             "boundary=x"),
                                ("/metadata", "application/xml")]:
        status, body = request(server, "POST", route, b'{"user_id": "u1"}',
                               {"Content-Type": content_type})
        assert status == 415 and "send application/json" in body.decode(), (route, body)
    status, body = request(server, "POST", "/recommend", b"\x80\x04N.",
                           {"Content-Type": "application/vnd.bentoml+pickle"})
    assert status == 415


def test_a_chunked_body_over_the_limit_is_413(server):
    """No Content-Length to refuse up front: the limit stops the read."""
    from bonmf_core.config import ServingConfig

    limits = ServingConfig()  # what the Bento was packaged with
    limit = limits.max_image_bytes + 4 * limits.max_text_chars + (1 << 16)
    # Just over the limit: the server has read it all when it answers, so it closes the
    # connection cleanly instead of resetting it under unread data.
    chunks = [b"x" * (1 << 20)] * (limit >> 20) + [b"x" * ((limit & ((1 << 20) - 1)) + 1000)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", "/score_new_item")
        conn.putheader("Authorization", f"Bearer {server.key}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the client finished: fine
        response = conn.getresponse()
        assert response.status == 413 and b"over" in response.read()
    finally:
        conn.close()


# -- authentication ---------------------------------------------------------------------------

SYSTEM_GET = ["/metrics", "/docs.json", "/schema.json", "/", "/healthz"]
API_CALLS = [("/recommend", {"user_id": "u1", "k": 2}), ("/recommend_for_items",
                                                          {"item_ids": ["d1"], "k": 2}),
             ("/similar_items", {"item_id": "d1", "k": 2}), ("/score_new_item", {"title": "x"}),
             ("/metadata", {})]


def test_every_endpoint_but_the_probes_needs_the_key(server):
    for wrong in (None, "not-the-key", server.key[:-1], server.key + "x"):
        for route, payload in API_CALLS:
            status, body = post_json(server, route, payload, key=wrong)
            assert status == 401 and b"Bearer" in body, (route, wrong, status)
        for path in SYSTEM_GET:
            assert request(server, "GET", path, key=wrong)[0] == 401, path
    status, _ = request(server, "GET", "/metrics", headers={"Authorization": f"Basic "
                                                                               f"{server.key}"},
                        key=None)
    assert status == 401
    for route, payload in API_CALLS:
        assert post_json(server, route, payload)[0] == 200, route
    status, metrics = request(server, "GET", "/metrics")
    assert status == 200 and b"bentoml_service_request" in metrics
    for path in ("/readyz", "/livez"):
        assert request(server, "GET", path, key=None)[0] == 200


def test_a_401_carries_the_challenge_header(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
        response.read()
    finally:
        conn.close()


def test_the_key_file_of_the_serving_section_guards_its_bento(keyfile_server, packaged):
    srv = keyfile_server
    assert post_json(srv, "/recommend", {"user_id": "u1"}, key=None)[0] == 401
    status, body = post_json(srv, "/metadata", {})
    meta = json.loads(body)
    assert status == 200 and meta["model_version"] == 22
    assert meta["bento_tag"] == packaged["v22"]["bento_tag"]
    assert meta["bento_model_tag"] == packaged["v22"]["model_tag"]


def test_metadata_names_registry_version_and_bento_tag(server, packaged):
    meta = json.loads(post_json(server, "/metadata", {})[1])
    assert meta["model_version"] == 21 and meta["bento_tag"] == packaged["v21"]["bento_tag"]
    assert meta["limits"]["max_image_pixels"] == 25_000_000
    assert "api_key_file" not in json.dumps(meta)  # deployment details stay private


def test_a_key_file_that_cannot_be_read_stops_the_start(keyfile_server, packaged):
    """Configured but unreadable: the start fails at once with the reason instead of serving
    without the key that was asked for."""
    key_file = packaged["key_file"]
    moved = key_file.with_suffix(".away")
    key_file.rename(moved)
    srv = _server(packaged["v22"]["bento_tag"], ready_timeout=120)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=re.escape(f"api_key_file {key_file}: cannot "
                                                         f"read")):
            srv.start()
    finally:
        moved.rename(key_file)
    assert time.monotonic() - started < 60
    _assert_none_left(srv, [])


# -- fuzz -------------------------------------------------------------------------------------

FIELDS = {
    "/recommend": {"user_id": "id", "k": "k", "exclude_seen": "bool"},
    "/recommend_for_items": {"item_ids": "ids", "k": "k", "exclude_liked": "bool"},
    "/similar_items": {"item_id": "id", "k": "k"},
    "/score_new_item": {"title": "text", "text": "text", "genres": "text", "k_users": "k",
                        "k_items": "k", "return_embedding": "bool"},
    "/metadata": {},
}
VALID = {"/recommend": {"user_id": "u1"}, "/recommend_for_items": {"item_ids": ["d1"]},
         "/similar_items": {"item_id": "d1"}, "/score_new_item": {"title": "x"},
         "/metadata": {}}
WRONG = {  # values each kind of field must refuse
    "k": ["5", 5.5, True, False, None, [], {}, 0, -1, MAX_K + 1, 2 ** 64, 1e308, "ten"],
    "id": [17, None, [], {}, "", "x" * 257, True, 3.5, ["u1"]],
    "ids": ["d1", [], [1], [None], [["d1"]], {"d1": 1}, None, ["d1"] * (MAX_K + 1), [""]],
    "bool": ["no", "true", 0, 1, None, [], {}, "False"],
    "text": [17, None, [], {}, True, "x" * 20001],
}


def _json_case(rng: random.Random) -> tuple:
    route = rng.choice(list(FIELDS))
    kind = rng.randrange(6)
    if kind == 0 and FIELDS[route]:  # one field of a wrong type or out of range
        field = rng.choice(list(FIELDS[route]))
        payload = {**VALID[route], field: rng.choice(WRONG[FIELDS[route][field]])}
    elif kind == 1:  # an unknown key (odd names too)
        name = rng.choice(["K", "user", "", " ", "é" * 5, "k" * 1000, "__proto__", "a.b"])
        payload = {**VALID[route], name: rng.choice([1, "x", None, [], {}])}
    elif kind == 2:  # not an object
        payload = rng.choice([[], [VALID[route]], 1, -0.5, "text", None, True])
    elif kind == 3 and route != "/metadata":  # a required field missing, or all of them
        payload = {k: v for k, v in VALID[route].items() if rng.random() < 0.3
                   and k not in ("user_id", "item_ids", "item_id", "title")}
        if route == "/score_new_item":
            payload["title"] = " " * rng.randrange(3)  # no usable content
    else:  # deep or wide nesting
        depth = rng.choice([50, 150, 400])
        payload = {**VALID[route], "nested": json.loads("[" * depth + "]" * depth)}
    return "POST", route, json.dumps(payload).encode(), {"Content-Type": "application/json"}


def _bytes_case(rng: random.Random) -> tuple:
    route = rng.choice(list(FIELDS))
    valid = json.dumps(VALID[route]).encode()
    choices = [
        lambda: valid[: rng.randrange(1, len(valid))],                    # truncated
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) + b"\xff",
        lambda: valid + b",",                                              # trailing junk
        lambda: valid.replace(b'"', b"'") if b'"' in valid else b"{'a': 1}",
        lambda: json.dumps(VALID[route]).encode("utf-16"),                 # other encodings
        lambda: json.dumps(VALID[route]).encode("utf-32"),
        lambda: b"\xef\xbb\xbf" + valid,                                   # a UTF-8 BOM
        lambda: b'{"user_id": "\xff\xfe", "item_id": "\xc3"}',              # invalid UTF-8
        lambda: b'{"user_id": "\\ud800"}',                                 # lone surrogate
        lambda: zlib.compress(valid),                                      # compressed
        lambda: b"[" * 5000,
        lambda: b'{"k": NaN, "user_id": Infinity}',
        lambda: b"   ",
    ]
    headers = {"Content-Type": rng.choice(["application/json", "application/json; "
                                           "charset=utf-16"])}
    if rng.random() < 0.2:
        headers["Content-Encoding"] = "gzip"
    return "POST", route, rng.choice(choices)(), headers


def _multipart_case(rng: random.Random) -> tuple:
    image = rng.choice([b"", b"junk", png_header(20000, 20000), png_header(6000, 5000),
                        real_png(32)[:60]])
    base = [("title", "x")]
    variants = [
        base + [("image", "p.png", image)],                               # a bad image
        base + [("image", "http://127.0.0.1:1/p.png")],                   # file as text
        base + [("image", "a.png", real_png(8)), ("image", "b.png", real_png(8))],
        base + [("k_users", rng.choice(["abc", '"5"', "0", "1001", "true", "5.5", "[1]",
                                        "null", "[" * 3000]))],
        base + [("title", "y")],                                          # duplicate
        base + [("genres", "g.txt", b"space")],                           # text as a file
        base + [("x" * rng.choice([1, 300, 5000]), "1")],                 # unknown field
        [("k_items", "0"), ("image", "p.png", real_png(8))],              # invalid k
    ]
    body, headers = multipart(rng.choice(variants), boundary=f"b{rng.randrange(10 ** 6)}")
    oddity = rng.randrange(5)
    if oddity == 1:  # the boundary missing from the header
        headers["Content-Type"] = "multipart/form-data"
    elif oddity == 2:  # another boundary announced than used
        headers["Content-Type"] = "multipart/form-data; boundary=other"
    elif oddity == 3:  # cut short (an invalid field first, so even a lenient parse is a 400)
        body, headers = multipart([("k_users", "0"), ("title", "x" * 200)])
        body = body[: rng.randrange(20, len(body) - 5)]
    elif oddity == 4:  # a urlencoded form with a file field as text
        body, headers = (b"title=x&image=http%3A%2F%2F127.0.0.1%3A1%2Fp.png&k_users=0",
                         {"Content-Type": "application/x-www-form-urlencoded"})
    return "POST", "/score_new_item", body, headers


def _http_case(rng: random.Random) -> tuple:
    """Wrong methods, unknown paths, foreign content types, odd sizes, bad keys."""
    route = rng.choice(list(FIELDS))
    body = json.dumps(VALID[route]).encode()
    cases = [
        (rng.choice(["GET", "PUT", "DELETE", "PATCH"]), route, body, {}),
        ("POST", rng.choice(SYSTEM_GET + ["/readyz", "/livez"]), body, {}),
        (rng.choice(["GET", "POST"]), rng.choice(["/nope", "/recommend/extra", "/../etc/passwd",
                                                   "/static_content/../../etc/passwd",
                                                   "/" + "a" * 4000, "/%00"]),
         body, {}),
        ("POST", route, body, {"Content-Type": rng.choice(["text/plain", "application/xml",
                                                           "application/vnd.bentoml+pickle",
                                                           "image/png"])}),
        ("POST", route, body, {"Content-Type": "application/json",
                               "Authorization": rng.choice(["Bearer", "Bearer wrong",
                                                            "Basic dXNlcjpwdw==", "bearer",
                                                            "Token x", "Bearer \x7f"])}),
        ("POST", "/recommend", json.dumps({"user_id": "u" * rng.choice([257, 10 ** 5, 10 ** 6])
                                           }).encode(), {"Content-Type": "application/json"}),
        ("POST", "/score_new_item", b"{" + b" " * 100, {"Content-Type": "application/json",
                                                        "Content-Length": str(11 << 20)}),
    ]
    return rng.choice(cases)


def _raw_case(rng: random.Random, key: str) -> bytes:
    """Malformed HTTP itself, sent over a plain socket."""
    auth = f"Authorization: Bearer {key}\r\n".encode()
    return rng.choice([
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: "
        b"chunked\r\n" + auth + b"\r\n{}",
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth +
        b"\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GARBAGE / HTTP/9.9\r\n\r\n",
        b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n" + auth +
        b"Content-Type: application/json\r\nContent-Type: text/plain\r\n\r\n{}{}",
    ])


def _raw_status(server, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split()[1])


def test_fuzz_only_4xx_and_the_server_keeps_answering(server):
    rng = random.Random(20261202)
    log_from = len(server.log_tail(10 ** 9))
    makers = [_json_case] * 4 + [_bytes_case] * 3 + [_multipart_case] * 3 + [_http_case] * 2
    results = []
    for i in range(300):
        method, path, body, headers = rng.choice(makers)(rng)
        headers = {"Authorization": f"Bearer {server.key}", **headers}
        status, reply = request(server, method, path, body, headers, key=None)
        results.append((status, method, path, body[:120], reply[:200]))
    for _ in range(30):
        results.append((_raw_status(server, _raw_case(rng, server.key)), "RAW", "", b"", b""))
    outside = [r for r in results if not 400 <= r[0] < 500]
    assert not outside, outside[:5]
    assert len(results) >= 200 and len({r[2] for r in results}) >= 12  # every endpoint
    assert {400, 401, 404, 405, 413, 415} <= {r[0] for r in results}  # every kind of refusal
    # Still answering, by the same worker (none crashed and was restarted).
    assert request(server, "GET", "/readyz", key=None)[0] == 200
    status, body = post_json(server, "/recommend", {"user_id": "u1", "k": 3})
    assert status == 200 and len(json.loads(body)["items"]) == 3
    workers = sorted(p.pid for p in server.processes() if p.pid != server.proc.pid)
    assert workers == server.worker_pids
    # Each refusal is one log line with its reason, never a traceback.
    log = server.log_tail(10 ** 9)[log_from:]
    at = log.find("Traceback")
    assert at < 0, log[max(0, at - 400):at + 3000]
    assert "Refused /recommend [POST] → 400" in log


# -- binding and lifecycle --------------------------------------------------------------------

def _listening(server) -> dict[int, set[str]]:
    """pid → the addresses it listens on, over the server's processes."""
    return {p.pid: {c.laddr.ip for c in p.net_connections("inet") if c.status == "LISTEN"}
            for p in server.processes()}


def test_the_bento_binds_loopback_by_itself_and_a_killed_parent_leaves_nothing(packaged):
    """No --host: the Bento's own configuration (serving.host) binds 127.0.0.1, and without
    a key it serves openly there, with no warning. Then the worst stop: the worker hangs
    (SIGSTOP: it cannot act on the parent-death signal) and `bentoml serve` is SIGKILLed;
    `stop()` still finds the orphan and ends it."""
    srv = _server(packaged["v21"]["bento_tag"], host=None, stop_timeout=3)
    with srv:
        assert "--host" not in srv.command()
        addresses = _listening(srv)
        assert set().union(*addresses.values()) == {"127.0.0.1"}, addresses
        assert post_json(srv, "/recommend", {"user_id": "u1"}, key=None)[0] == 200
        assert "without an API key" not in srv.log_tail()
        worker = next(p for p in srv.processes() if p.pid != srv.proc.pid)
        pids = [p.pid for p in srv.processes()]
        worker.suspend()
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=10)
        time.sleep(0.5)
        assert worker.is_running() and worker.ppid() != srv.proc.pid  # orphaned, alive
        assert worker.pid in [p.pid for p in srv.processes()]
    _assert_none_left(srv, pids)


def test_all_interfaces_without_a_key_warns_and_workers_die_with_their_parent(packaged):
    """--host 0.0.0.0 and no key: the server says so. A worker whose `bentoml serve` is
    SIGKILLed ends by itself (the parent-death signal the service sets)."""
    srv = _server(packaged["v21"]["bento_tag"], host="0.0.0.0")
    with srv:
        assert re.search(r"WARNING: serving on 0\.0\.0\.0 without an API key",
                         srv.log_tail(10 ** 6))
        assert "0.0.0.0" in set().union(*_listening(srv).values())
        worker = next(p for p in srv.processes() if p.pid != srv.proc.pid)
        pids = [p.pid for p in srv.processes()]
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=10)
        worker.wait(timeout=20)  # psutil.TimeoutExpired if it had stayed
    _assert_none_left(srv, pids)


LAUNCHER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from bentos.server import BentoServer
srv = BentoServer({tag!r}, env={{"OMP_NUM_THREADS": "1"}}).start()
print(json.dumps({{"pids": [p.pid for p in srv.processes()], "port": srv.port,
                  "marker": srv.marker}}), flush=True)
time.sleep(600)
"""


def test_a_killed_launcher_takes_its_server_along(packaged):
    """The test or benchmark that started a server is SIGKILLed (no `finally` runs): the
    server goes too, workers included."""
    since = time.time()
    script = LAUNCHER.format(repo=str(REPO), tag=packaged["v21"]["bento_tag"])
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        started = json.loads(launcher.stdout.readline())
        assert len(started["pids"]) >= 2 and all(psutil.pid_exists(p) for p in started["pids"])
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
    _assert_none_left(None, started["pids"], started["marker"], started["port"], since)


# -- replacing a running Bento ----------------------------------------------------------------

class PortSwap:
    """A TCP front port whose upstream can be switched: what a load balancer (or nginx with
    `nginx -s reload`) does in front of two servers. Each client connection is piped to the
    upstream current when it was accepted; `active[port]` counts those still open."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.active: dict[int, int] = {}
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            port = self.upstream
            with self._lock:
                self.active[port] = self.active.get(port, 0) + 1
            threading.Thread(target=self._pipe, args=(client, port), daemon=True).start()

    def _pipe(self, client, port):
        upstream = None
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=60)
            back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            back.start()
            _copy(client, upstream)
            back.join(60)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    s.close()
            with self._lock:
                self.active[port] -= 1

    def close(self):
        self.sock.close()


def _copy(src, dst):
    """src → dst until src's end, then pass the end on (half-close)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_a_promoted_bento_replaces_the_running_one_without_a_failed_request(
        packaged, keyfile_server):
    """Blue (v21) serves behind the front port; green (v22) is started and ready; the port
    is swapped; blue is stopped once its connections drained. A client hammering the front
    port the whole time sees only 200s, first from v21, then from v22."""
    green = keyfile_server
    blue = _server(packaged["v21"]["bento_tag"], env={"BONMF_API_KEY": green.key})
    blue.start()
    front = PortSwap(blue.port)
    answers, failures, stop = [], [], threading.Event()

    def client():
        class Front:
            port, key = front.port, green.key
        while not stop.is_set():
            try:
                status, body = post_json(Front, "/metadata", {}, timeout=30)
                answers.append((status, json.loads(body).get("model_version")
                                if status == 200 else body))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        front.upstream = green.port           # the swap: new connections go to green
        deadline = time.monotonic() + 30
        while front.active.get(blue.port, 0) and time.monotonic() < deadline:
            time.sleep(0.05)                  # blue's connections drain
        blue.stop()                           # graceful: it finishes what it has
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        front.close()
        blue.stop()
    assert not failures, failures[:3]
    assert answers and all(status == 200 for status, _ in answers), answers[:3]
    versions = [v for _, v in answers]
    assert versions[0] == 21 and versions[-1] == 22 and set(versions) == {21, 22}
    assert blue.proc.poll() is not None
