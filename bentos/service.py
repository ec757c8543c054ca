"""The BoNMF recommendation service (BentoML). The answers come from
`bonmf_core.serving.engine.ServingEngine`; this module only types the HTTP API and maps errors.

    recommend            a user id → top-k items (unknown user: popularity, flagged)
    recommend_for_items  liked item ids (anonymous / new user) → top-k items (fold-in)
    similar_items        an item id → nearest items in the model's item space
    score_new_item       a new item's title / text / image → its embeddings, the users most
                         likely to want it and its nearest catalog items (cold start)
    metadata             registry version, Bento and model tags, metrics with protocol,
                         dataset hash, encoders, limits

The model is the BentoML model `BONMF_BENTO_MODEL` (default `bonmf:latest`; `bonmf package`
pins the exact tag in the Bento it builds). Requests are parsed strictly (`inputs.py`); with
an API key (`$BONMF_API_KEY` or `serving.api_key_file`) every endpoint but /readyz and /livez
needs it (`security.py`); the Bento binds `serving.host` (127.0.0.1) unless `--host` says
otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Optional

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound
from pydantic import BaseModel, Field, ValidationError

from bentos.inputs import StrictInput
from bentos.security import (ApiKey, ApiKeyAuth, BodyLimit, exposure_warning,
                             listening_addresses)
from bonmf_core.config import ServingConfig
from bonmf_core.serving.engine import NewItem, RequestError, ServingEngine, UnknownIdError


def _model_tag() -> str:
    """`$BONMF_BENTO_MODEL`, else the model pinned by the Bento this file is served from,
    else `bonmf:latest`. `bentoml serve TAG` does not apply a Bento's `envs` (where
    packaging pins the model), so without reading them a Bento in a store holding several
    models would serve the latest one instead of its own."""
    if os.environ.get("BONMF_BENTO_MODEL"):
        return os.environ["BONMF_BENTO_MODEL"]
    here = Path(__file__).resolve()
    bento_yaml = here.parents[2] / "bento.yaml"  # a Bento's layout: <bento>/src/bentos/
    if here.parents[1].name == "src" and bento_yaml.is_file():
        import yaml

        envs = yaml.safe_load(bento_yaml.read_text()).get("envs") or []
        pinned = [e.get("value") for e in envs if e.get("name") == "BONMF_BENTO_MODEL"]
        if pinned and pinned[0]:
            return pinned[0]
    return "bonmf:latest"


MODEL_TAG = _model_tag()


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _serving() -> ServingConfig:
    """The `serving` section recorded in the packaged model (read once, at import): its
    limits, key file and host. Bundles from before it was recorded whole carry the limits."""
    try:
        info = json.loads((Path(bentoml.models.get(MODEL_TAG).path) / "serving.json")
                          .read_text())
        recorded = info.get("serving") or info.get("limits", {})
    except Exception:  # the model store is not reachable at import: the schema's defaults
        recorded = {}
    return ServingConfig.model_validate(recorded)


SERVING = _serving()
MAX_K, MAX_LIKED = SERVING.max_k, SERVING.max_liked_items
MAX_TEXT, MAX_IMAGE = SERVING.max_text_chars, SERVING.max_image_bytes
API_KEY = ApiKey()  # resolved when the service starts (Recommendations.__init__)

K = Annotated[int, Field(ge=1, le=MAX_K, description=f"how many results (1–{MAX_K})")]
Id = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


# Requests: strict (a wrong type or an unknown key is a 400 naming the field).
class RecommendRequest(StrictInput):
    user_id: Id
    k: K = 10
    exclude_seen: bool = True


class ItemsRequest(StrictInput):
    item_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_LIKED)]
    k: K = 10
    exclude_liked: bool = True


class SimilarRequest(StrictInput):
    item_id: Id
    k: K = 10


class NewItemRequest(StrictInput):
    title: Text = ""
    text: Text = ""
    genres: Annotated[str, Field(max_length=1000)] = ""
    # `Path = None`, not Optional: BentoML 1.4.40 turns an upload into a Path only for a
    # plain Path field (Optional breaks its schema).
    image: Path = Field(None, description="an image file (multipart/form-data)")
    k_users: K = 10
    k_items: K = 10
    return_embedding: bool = True


class NoInput(StrictInput):
    pass


# Typed answers: they document the API (OpenAPI) and spare BentoML from building a JSON
# schema for every `dict` response (~10% of the server's time per recommend request).
class Item(BaseModel):
    item_id: str
    title: str
    score: float


class UserRecommendations(BaseModel):
    user_id: str
    known_user: bool
    fallback: Optional[str] = Field(None, description='"popularity" for an unknown user')
    reason: Optional[str] = None
    items: list[Item]


class ItemsForProfile(BaseModel):
    liked: int
    method: str
    items: list[Item]


class SimilarItems(BaseModel):
    item_id: str
    title: str
    items: list[Item]


def _http_error(exc: RequestError) -> BentoMLException:
    if isinstance(exc, UnknownIdError):
        return NotFound(str(exc))
    if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        return PayloadTooLarge(str(exc))
    return InvalidArgument(str(exc))


class _ClientErrorsInOneLine(logging.Filter):
    """BentoML logs every failed request as an error with its traceback. A client's mistake
    (a 4xx) gets one line with the reason instead, so the log's tracebacks are the server's
    own faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = 400 if isinstance(exc, ValidationError) else \
            int(getattr(exc, "error_code", 500)) if isinstance(exc, BentoMLException) else 500
        if status < 500:
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg} → {status}: %s".replace("Exception on", "Refused")
            record.args = (*(record.args or ()), str(exc)[:300])
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsInOneLine())


def _warn_if_exposed() -> None:
    """Print a warning when this worker listens beyond loopback without a key (once per
    server: the first worker)."""
    from bentoml._internal.context import server_context

    warning = exposure_warning(listening_addresses(), API_KEY.required)
    if warning and (server_context.worker_index or 1) == 1:
        print(warning, file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In a BentoML worker, ask Linux to SIGTERM it when its parent (`bentoml serve`) dies,
    even by SIGKILL: BentoML starts each worker in a session of its own, so a killed parent
    would leave it serving, orphaned. Not in-process (tests, notebooks), not off Linux."""
    import ctypes
    import signal

    from bentoml._internal.context import server_context

    if server_context.worker_index is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@bentoml.service(
    name="bonmf",
    workers=int(os.environ.get("BONMF_SERVE_WORKERS", "1")),
    traffic={"timeout": 30, "max_concurrency": 512},
    logging={"access": {"enabled": os.environ.get("BONMF_ACCESS_LOG", "0") == "1"}},
    labels={"project": "bonmf"},
    # The Bento's own default interface; `bentoml serve --host` (or $BENTOML_HOST) wins.
    http={"host": SERVING.host},
)
class Recommendations:
    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        _die_with_parent()
        # First: a configured key that cannot be read stops the start, with the reason,
        # before the model's load time is spent.
        API_KEY.resolve(SERVING.api_key_file)
        _warn_if_exposed()
        # One worker process per core: intra-op threads would only contend.
        torch.set_num_threads(int(os.environ.get("BONMF_TORCH_THREADS", "1")))
        self.engine = ServingEngine(self.bento_model.path)
        bento = getattr(Recommendations, "bento", None)  # None when served from source
        self.engine.info.update(bento_model_tag=str(self.bento_model.tag),
                                bento_tag=str(bento.tag) if bento is not None else None)
        # Everything loaded so far (torch, transformers, the encoders, the id maps) lives as
        # long as the process: freeze it out of the garbage collector's full scans.
        import gc
        gc.collect()
        gc.freeze()

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RequestError as exc:
            raise _http_error(exc) from None

    # The cheap APIs (about 1 ms of scoring) are `async`: they run on the event loop instead of
    # hopping to a thread pool, which took ~278 → ~390 requests/s on ML-1M with one worker.
    # Fold-in and new-item encoding take longer and stay in the pool.
    @bentoml.api(input_spec=RecommendRequest)
    async def recommend(self, user_id: str, k: int = 10,
                        exclude_seen: bool = True) -> UserRecommendations:
        """Top-k items for a user; an unknown user gets the most popular items, with
        `fallback: "popularity"`."""
        return UserRecommendations(**self._call(self.engine.recommend, user_id, k, exclude_seen))

    @bentoml.api(input_spec=ItemsRequest)
    def recommend_for_items(self, item_ids: list[str], k: int = 10,
                            exclude_liked: bool = True) -> ItemsForProfile:
        """Top-k items for an anonymous profile of liked items (folded into the user space)."""
        return ItemsForProfile(**self._call(self.engine.recommend_for_items, item_ids, k,
                                            exclude_liked))

    @bentoml.api(input_spec=SimilarRequest)
    async def similar_items(self, item_id: str, k: int = 10) -> SimilarItems:
        """Nearest catalog items in the model's item space."""
        return SimilarItems(**self._call(self.engine.similar_items, item_id, k))

    @bentoml.api(input_spec=NewItemRequest)
    def score_new_item(self, title: str = "", text: str = "", genres: str = "",
                       image: Path | None = None, k_users: int = 10, k_items: int = 10,
                       return_embedding: bool = True) -> dict:
        """Cold start: a new item's content → its embeddings, likely users, nearest items.
        Send JSON, or multipart/form-data with an `image` file."""
        data = None if image is None else _image_bytes(image)
        return self._call(self.engine.score_new_item,
                          NewItem(title=title, text=text, genres=genres, image=data),
                          k_users, k_items, return_embedding)

    @bentoml.api(input_spec=NoInput)
    async def metadata(self) -> dict:
        """Registry version, Bento and model tags, metrics with their protocol, dataset hash,
        encoders, limits."""
        return self.engine.metadata()


def _image_bytes(image: Path) -> bytes:
    size = os.path.getsize(image)
    if size > MAX_IMAGE:
        raise PayloadTooLarge(f"image: {size} bytes, the limit is {MAX_IMAGE}")
    return Path(image).read_bytes()


# Outermost first: without the key nothing else of a request is looked at.
Recommendations.add_asgi_middleware(ApiKeyAuth, api_key=API_KEY)
Recommendations.add_asgi_middleware(BodyLimit, max_bytes=MAX_IMAGE + 4 * MAX_TEXT + (1 << 16),
                                    on_overflow=PayloadTooLarge)
