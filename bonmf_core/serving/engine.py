"""Answering recommendation requests from a serving bundle: the service's runtime, no BentoML.

`ServingEngine(path)` loads a bundle (written by `bonmf_core.serving.bundle.write_bundle`;
its layout is described there) once and answers recommend / recommend_for_items /
similar_items / score_new_item / metadata with raw ids and titles. Every score comes from the
model's own methods (`BoNMF.score_sides`, `fold_in`, `content_item_vectors`), so serving
follows any change of the model's head; the item and user sides are prepared once at load.
A catalog of at least `serving.ann_min_items` items answers recommend / recommend_for_items /
similar_items in two stages (`bonmf_core.serving.retrieval`: an ANN index built at load
proposes candidates, the full head re-ranks them); smaller catalogs score every item.

The runtime imports neither the store (SQLAlchemy) nor the training code: a Bento carries only
what this module needs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bonmf_core.config import ServingConfig
from bonmf_core.models.artifacts import load_model

BUNDLE_VERSION = 1
CONTENT_MODALITIES = ("text", "image")
# score_new_item on a model without a content path: this many nearest catalog items in
# content space stand in for the new item in the model's item space.
CONTENT_NEIGHBOURS = 20


class RequestError(ValueError):
    """A request the service cannot answer as asked: a 4xx naming the field."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class PayloadTooLargeError(RequestError):
    """Content too large to process (an image over the pixel limit): a 413."""

    status = 413


class UnknownIdError(RequestError):
    """Ids the model does not know (a 404 that lists them)."""

    status = 404

    def __init__(self, kind: str, ids: list[str], field: str):
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:20]) + (" …" if len(ids) > 20 else "")
        super().__init__(f"unknown {kind} id{'s' if len(ids) > 1 else ''}: {shown}", field)


# -- answering --------------------------------------------------------------------------------

@dataclass
class NewItem:
    title: str
    text: str = ""
    genres: str = ""
    image: bytes | None = None


class ServingEngine:
    """Loads a bundle once; answers recommend / recommend_for_items / similar_items /
    score_new_item / metadata with raw ids and titles."""

    def __init__(self, path: str | Path, load_encoders: bool = True):
        from safetensors.torch import load_file

        self.path = Path(path)
        info_path = self.path / "serving.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{self.path}: not a serving bundle (serving.json missing)")
        self.info = json.loads(info_path.read_text())
        if self.info.get("bundle_version") != BUNDLE_VERSION:
            raise ValueError(f"{info_path}: bundle_version {self.info.get('bundle_version')}, "
                             f"this code reads {BUNDLE_VERSION}")
        self.model, self.model_meta, ids = load_model(self.path / "model")
        self.user_ids, self.item_ids = ids["user_ids"], ids["item_ids"]
        self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.titles = json.loads((self.path / "catalog.json").read_text())["titles"]
        catalog = load_file(str(self.path / "catalog.safetensors"))
        self.popularity = catalog["popularity"]
        self.seen_indptr = catalog["seen_indptr"].numpy()
        self.seen_items = catalog["seen_items"].numpy()
        self.content = {m: catalog[f"content_{m}"] for m in CONTENT_MODALITIES
                        if f"content_{m}" in catalog}
        # The whole `serving` section since it was recorded; older bundles: the limits.
        self.limits = ServingConfig.model_validate(self.info.get("serving")
                                                   or self.info.get("limits", {}))
        self._precompute()
        self.retrieval = self._retrieval()
        self.encoders = _ContentEncoders(self.path, self.info["encoders"]) if load_encoders \
            else None

    @torch.no_grad()  # not inference_mode: fold-in differentiates through the item side
    def _precompute(self) -> None:
        m = self.model
        self.items = m.item_side(m.item_vectors(torch.arange(len(self.item_ids))))
        self.users = m.user_side(m.user_vectors(torch.arange(len(self.user_ids))))
        self.item_unit = torch.nn.functional.normalize(self.items.vectors, dim=1)
        self.popular_order = torch.argsort(self.popularity, descending=True, stable=True)
        self.content_unit = {k: torch.nn.functional.normalize(v, dim=1)
                             for k, v in self.content.items()}

    def _retrieval(self):
        if len(self.item_ids) < self.limits.ann_min_items:
            return None
        from bonmf_core.serving.retrieval import Retrieval

        return Retrieval(self.model, self.items, self.item_unit, self.limits)

    def _items(self, scores: torch.Tensor, k: int, rows: torch.Tensor | None = None
               ) -> list[dict]:
        """Top-k of `scores` as answer rows; `rows`: the item index of each score (a
        candidate list) when not the whole catalog."""
        k = min(k, int(torch.isfinite(scores).sum()))
        values, idx = torch.topk(scores, k)
        if rows is not None:
            idx = rows[idx]
        return [{"item_id": self.item_ids[i], "title": self.titles[i], "score": round(v, 6)}
                for v, i in zip(values.tolist(), idx.tolist())]

    def _ranked(self, users, k: int, drop: list[np.ndarray]) -> list[list[dict]]:
        """Top-k per user side (U rows), items in `drop[r]` excluded: every item scored by
        the head, or — a large catalog — the index's candidates re-ranked by it."""
        if self.retrieval is None:
            return self._exact(users, k, drop)
        found = self.retrieval.candidates(users, k, max(len(d) for d in drop))
        out = []
        for r, seen in enumerate(drop):
            cand = found[r][found[r] >= 0]
            cand = cand[~np.isin(cand, seen)] if len(seen) else cand
            if len(cand) < min(k, len(self.item_ids) - len(seen)):
                # The probed lists held too few unseen items for k answers (a very large k
                # or history): this user is scored exactly rather than answered short.
                out.extend(self._exact(users.select([r]), k, [seen]))
                continue
            cand = torch.from_numpy(cand)
            scores = self.model.score_sides(users.select([r]), self.items.select(cand))[0]
            out.append(self._items(scores, k, cand))
        return out

    def _exact(self, users, k: int, drop: list[np.ndarray]) -> list[list[dict]]:
        scores = self.model.score_sides(users, self.items)
        for r, seen in enumerate(drop):
            scores[r, torch.from_numpy(seen)] = float("-inf")
        return [self._items(scores[r], k) for r in range(len(drop))]

    def _seen(self, u: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[u]:self.seen_indptr[u + 1]]

    # -- the API ----------------------------------------------------------------------
    def check_k(self, k: int, field: str = "k") -> int:
        top = self.limits.max_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
            raise RequestError(f"must be an integer from 1 to {top}, got {k!r}", field)
        return k

    @torch.inference_mode()
    def recommend_many(self, user_ids: list[str], k: int = 10, exclude_seen: bool = True
                       ) -> list[dict]:
        """One answer per user, scored in one pass. Unknown users get the most popular items
        (minus nothing: they have no history), flagged `fallback: "popularity"`."""
        self.check_k(k)
        known = [(j, self.user_index[u]) for j, u in enumerate(user_ids) if u in self.user_index]
        answers: list[dict | None] = [None] * len(user_ids)
        if known:
            rows = torch.tensor([u for _, u in known])
            none = np.zeros(0, np.int64)
            drop = [self._seen(u) if exclude_seen else none for _, u in known]
            for (j, _), items in zip(known, self._ranked(self.users.select(rows), k, drop)):
                answers[j] = {"user_id": user_ids[j], "known_user": True, "fallback": None,
                              "items": items}
        for j, u in enumerate(user_ids):
            if answers[j] is None:
                answers[j] = self.popular(k) | {"user_id": u}
        return answers

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True) -> dict:
        return self.recommend_many([user_id], k, exclude_seen)[0]

    def popular(self, k: int) -> dict:
        idx = self.popular_order[:k].tolist()
        total = float(self.popularity.sum()) or 1.0
        return {"known_user": False, "fallback": "popularity",
                "reason": "unknown user: the most popular items instead",
                "items": [{"item_id": self.item_ids[i], "title": self.titles[i],
                           "score": round(float(self.popularity[i]) / total, 6)} for i in idx]}

    def _known_items(self, item_ids: list[str], field: str) -> list[int]:
        missing = [i for i in item_ids if i not in self.item_index]
        if missing:
            raise UnknownIdError("item", missing, field)
        return [self.item_index[i] for i in item_ids]

    def recommend_for_items(self, item_ids: list[str], k: int = 10,
                            exclude_liked: bool = True) -> dict:
        """Top-k for an anonymous profile of liked items: a user vector is fitted to them
        (fold-in: the trained item side and MLP stay fixed) and scored like a known user."""
        self.check_k(k)
        top = self.limits.max_liked_items
        if not item_ids:
            raise RequestError("needs at least one item id", "item_ids")
        if len(item_ids) > top:
            raise RequestError(f"at most {top} item ids, got {len(item_ids)}", "item_ids")
        liked = sorted(set(self._known_items(item_ids, "item_ids")))
        uv = self.model.fold_in(liked, self.items)
        drop = np.asarray(liked if exclude_liked else [], np.int64)
        with torch.inference_mode():
            items = self._ranked(self.model.user_side(uv[None, :]), k, [drop])[0]
        return {"liked": len(liked), "method": "fold_in", "items": items}

    @torch.inference_mode()
    def similar_items(self, item_id: str, k: int = 10) -> dict:
        """Nearest catalog items by cosine similarity in the model's item space."""
        self.check_k(k)
        i = self._known_items([item_id], "item_id")[0]
        return {"item_id": item_id, "title": self.titles[i],
                "items": self._nearest(self.item_unit[i], k, exclude=i)}

    def _nearest(self, unit: torch.Tensor, k: int, exclude: int | None = None) -> list[dict]:
        """The k catalog items of highest cosine with a unit vector: all scored, or the
        index's candidates re-scored exactly (a large catalog)."""
        if self.retrieval is None:
            return self._nearest_exact(unit, k, exclude)
        cand = self.retrieval.neighbours(unit, k)
        keep = (cand >= 0) if exclude is None else (cand >= 0) & (cand != exclude)
        cand = cand[keep]
        if len(cand) < min(k, len(self.item_ids) - (exclude is not None)):
            return self._nearest_exact(unit, k, exclude)   # too few in the probed lists
        cand = torch.from_numpy(cand)
        return self._items(self.item_unit[cand] @ unit, k, cand)

    def _nearest_exact(self, unit: torch.Tensor, k: int, exclude: int | None) -> list[dict]:
        scores = self.item_unit @ unit
        if exclude is not None:
            scores[exclude] = float("-inf")
        return self._items(scores, k)

    @torch.inference_mode()
    def score_new_item(self, item: NewItem, k_users: int = 10, k_items: int = 10,
                       return_embedding: bool = True) -> dict:
        """Cold start: a new item's content → its content embeddings (the packaged encoders),
        its vector in the model's item space, the users most likely to want it and its
        nearest catalog items.

        A model with a content path projects the embeddings like it does cold catalog items;
        an ID-only model places the item at the similarity-weighted mean of its nearest
        catalog items in content space (`method` says which).
        """
        self.check_k(k_users, "k_users")
        self.check_k(k_items, "k_items")
        raw, present = self.encoders.encode(item, self.limits.max_image_pixels) \
            if self.encoders else ({}, {})
        if not any(present.values()):
            raise RequestError("no usable content: give a title/text or an image", "title")
        content = [m for m in self.model.config.modalities if m != "id"]
        if content:
            iv = self.model.content_item_vectors({m: raw[m][None] for m in content})[0]
            method = "content_projection"
            neighbours = None
        else:
            iv, neighbours = self._content_neighbours(raw, present)
            method = "content_neighbours"
        user_scores = self.model.score_sides(self.users, self.model.item_side(iv[None]))[:, 0]
        top_u = torch.topk(user_scores, min(k_users, len(self.user_ids)))
        out = {"method": method, "modalities": sorted(m for m, ok in present.items() if ok),
               "users": [{"user_id": self.user_ids[u], "score": round(v, 6)}
                         for v, u in zip(top_u.values.tolist(), top_u.indices.tolist())],
               "similar_items": self._nearest(torch.nn.functional.normalize(iv, dim=0),
                                              k_items),
               "item_vector": [round(x, 6) for x in iv.tolist()]}
        if neighbours is not None:
            out["content_neighbours"] = neighbours
        if return_embedding:
            out["embedding"] = {m: [round(x, 6) for x in raw[m].tolist()]
                                for m, ok in present.items() if ok}
        return out

    def _content_neighbours(self, raw: dict, present: dict) -> tuple[torch.Tensor, list]:
        sims = None
        for m, ok in present.items():
            if ok and m in self.content_unit:
                s = self.content_unit[m] @ torch.nn.functional.normalize(raw[m], dim=0)
                sims = s if sims is None else sims + s
        top = torch.topk(sims, min(CONTENT_NEIGHBOURS, len(self.item_ids)))
        weights = torch.softmax(top.values * 10.0, dim=0)
        iv = (weights[:, None] * self.items.vectors[top.indices]).sum(0)
        return iv, [self.item_ids[i] for i in top.indices.tolist()[:5]]

    def metadata(self) -> dict:
        keys = ("model_version", "variant", "modalities", "metrics", "protocol", "dataset",
                "model_artifact_sha256", "code_version", "created_at", "bento_tag",
                "bento_model_tag")
        out = {k: self.info.get(k) for k in keys}
        enc = self.info["encoders"]
        out["encoders"] = ({"source": "basic", "text": "hashed_bag_of_words",
                            "image": "tiny_image_features"} if enc["source"] == "basic" else
                           {"source": "pretrained",
                            "text": enc["identity"]["text"]["name"],
                            "image": enc["identity"]["image"]["name"]})
        out["users"], out["items"] = len(self.user_ids), len(self.item_ids)
        out["limits"] = self.limits.model_dump(include={k for k in ServingConfig.model_fields
                                                        if k.startswith("max_")})
        return out


class _ContentEncoders:
    """The bundle's encoders applied to one new item, as the catalog was encoded."""

    def __init__(self, bundle: Path, config: dict):
        self.config = config
        self.text = self.image = None
        if config["source"] == "pretrained":
            from bonmf_core.content.encoders import ImageEncoder, TextEncoder

            text_model = config["text_model"]
            if text_model == "encoders/text":
                text_model = str(bundle / text_model)
            self.text = TextEncoder(text_model, max_length=config["text_max_length"])
            self.image = ImageEncoder(config["image_model"],
                                      weights=str(bundle / config["image_weights"]),
                                      data_config=config["image_data_config"], workers=0)

    def _text(self, item: NewItem) -> str:
        import pandas as pd

        from bonmf_core.content.text import compose_item_texts

        row = pd.DataFrame({"title": [item.title], "genres": [item.genres],
                            "overview": [item.text]})
        # The one composer the catalog's text went through, whichever encoder read it.
        return compose_item_texts(row, self.config["text_fields"],
                                  self.config["text_separator"])[0]

    def encode(self, item: NewItem, max_pixels: int | None = None) -> tuple[dict, dict]:
        from bonmf_core.content.features import hashed_bag_of_words, tiny_image_features

        text = self._text(item)
        raw, present = {}, {}
        if self.text is not None:
            raw["text"] = torch.from_numpy(self.text.encode([text])[0])
        else:
            raw["text"] = torch.from_numpy(hashed_bag_of_words([text])[0])
        present["text"] = bool(text.strip())
        if not present["text"]:
            raw["text"].zero_()
        encode_images = self.image.encode if self.image is not None else tiny_image_features
        if item.image is not None:  # the encoders read files (by content, as the catalog)
            _check_image(item.image, max_pixels)
            with tempfile.NamedTemporaryFile(suffix=".img") as fh:
                fh.write(item.image)
                fh.flush()
                vectors, ok = encode_images([fh.name])
        else:
            vectors, ok = encode_images([None])  # a zero row, like a catalog item's
        if item.image is not None and not ok[0]:
            raise RequestError("not a decodable image (PNG, JPEG, WebP, ...)", "image")
        raw["image"], present["image"] = torch.from_numpy(vectors[0]), bool(ok[0])
        return raw, present


def _check_image(data: bytes, max_pixels: int | None) -> None:
    """Refuse an unusable upload with the reason, before the encoders see it: empty or
    undecodable → 400, over the pixel limit or a decompression bomb → 413."""
    from bonmf_core.content.encoders import open_image
    from bonmf_core.errors import ImageError

    try:
        open_image(data, max_pixels)
    except ImageError as exc:
        raise (PayloadTooLargeError if exc.too_large else RequestError)(str(exc), "image") \
            from None
