"""The BoNMF recommendation service (BentoML). The answers come from
`bonmf_core.serving.engine.ServingEngine`; this module only types the HTTP API and maps errors.

    recommend            a user id → top-k items (unknown user: popularity, flagged)
    recommend_for_items  liked item ids (anonymous / new user) → top-k items (fold-in)
    similar_items        an item id → nearest items in the model's item space
    score_new_item       a new item's title / text / image → its embeddings, the users most
                         likely to want it and its nearest catalog items (cold start)
    metadata             model version, metrics with protocol, dataset hash, encoders

The model is the BentoML model `BONMF_BENTO_MODEL` (default `bonmf:latest`; `bonmf package`
pins the exact tag in the Bento it builds).
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Optional

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound
from pydantic import BaseModel, Field

from bonmf_core.config import ServingConfig
from bonmf_core.serving.engine import NewItem, RequestError, ServingEngine, UnknownIdError

MODEL_TAG = os.environ.get("BONMF_BENTO_MODEL", "bonmf:latest")


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _limits() -> ServingConfig:
    """The request limits recorded in the packaged model (read once, at import): the
    `serving` section the bundle was written with."""
    try:
        path = Path(bentoml.models.get(MODEL_TAG).path) / "serving.json"
        recorded = json.loads(path.read_text()).get("limits", {})
    except Exception:  # the model store is not reachable at import: the schema's defaults
        recorded = {}
    return ServingConfig.model_validate(recorded)


LIMITS = _limits()
MAX_K, MAX_LIKED = LIMITS.max_k, LIMITS.max_liked_items
MAX_TEXT, MAX_IMAGE = LIMITS.max_text_chars, LIMITS.max_image_bytes

K = Annotated[int, Field(ge=1, le=MAX_K, description=f"how many results (1–{MAX_K})")]
Id = Annotated[str, Field(min_length=1, max_length=256)]


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


class BodyLimit:
    """ASGI middleware: refuse a request body over the limit with 413 before reading it
    (Content-Length), or as soon as a chunked body passes it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, send, length: int):
        body = json.dumps({"error": f"request body of {length} bytes is over the limit of "
                                    f"{self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _http_error(exc: Exception) -> BentoMLException:
    if isinstance(exc, UnknownIdError):
        return NotFound(str(exc))
    return InvalidArgument(str(exc))


@bentoml.service(
    name="bonmf",
    workers=int(os.environ.get("BONMF_SERVE_WORKERS", "1")),
    traffic={"timeout": 30, "max_concurrency": 512},
    logging={"access": {"enabled": os.environ.get("BONMF_ACCESS_LOG", "0") == "1"}},
    labels={"project": "bonmf"},
)
class Recommendations:
    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        # One worker process per core: intra-op threads would only contend.
        torch.set_num_threads(int(os.environ.get("BONMF_TORCH_THREADS", "1")))
        self.engine = ServingEngine(self.bento_model.path)
        self.engine.info["bento_model_tag"] = str(self.bento_model.tag)
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
    @bentoml.api
    async def recommend(self, user_id: Id, k: K = 10,
                        exclude_seen: bool = True) -> UserRecommendations:
        """Top-k items for a user; an unknown user gets the most popular items, with
        `fallback: "popularity"`."""
        return UserRecommendations(**self._call(self.engine.recommend, user_id, k, exclude_seen))

    @bentoml.api
    def recommend_for_items(self, item_ids: Annotated[list[Id], Field(min_length=1,
                                                                      max_length=MAX_LIKED)],
                            k: K = 10, exclude_liked: bool = True) -> ItemsForProfile:
        """Top-k items for an anonymous profile of liked items (folded into the user space)."""
        return ItemsForProfile(**self._call(self.engine.recommend_for_items, item_ids, k,
                                            exclude_liked))

    @bentoml.api
    async def similar_items(self, item_id: Id, k: K = 10) -> SimilarItems:
        """Nearest catalog items in the model's item space."""
        return SimilarItems(**self._call(self.engine.similar_items, item_id, k))

    @bentoml.api
    def score_new_item(self, title: Annotated[str, Field(max_length=MAX_TEXT)] = "",
                       text: Annotated[str, Field(max_length=MAX_TEXT)] = "",
                       genres: Annotated[str, Field(max_length=1000)] = "",
                       # `Path = None`, not Optional: BentoML 1.4.40 turns an upload into
                       # a Path only for a plain Path field (Optional breaks its schema).
                       image: Path = None, k_users: K = 10, k_items: K = 10,
                       return_embedding: bool = True) -> dict:
        """Cold start: a new item's content → its embeddings, likely users, nearest items.
        Send JSON, or multipart/form-data with an `image` file."""
        data = None
        if image is not None:
            size = os.path.getsize(image)
            if size > MAX_IMAGE:
                raise PayloadTooLarge(f"image: {size} bytes, the limit is {MAX_IMAGE}")
            data = Path(image).read_bytes()
        return self._call(self.engine.score_new_item,
                          NewItem(title=title, text=text, genres=genres, image=data),
                          k_users, k_items, return_embedding)

    @bentoml.api
    async def metadata(self) -> dict:
        """Model version, metrics with their protocol, dataset hash, encoders, limits."""
        return self.engine.metadata()


Recommendations.add_asgi_middleware(BodyLimit, max_bytes=MAX_IMAGE + 4 * MAX_TEXT + (1 << 16))
