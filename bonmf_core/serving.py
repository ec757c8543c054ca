"""Answering recommendation requests from a packaged model: the service's logic, no BentoML.

A *serving bundle* is a folder that holds everything the answers need, so a service never
reads the training state or the store:

    model/                 the BoNMF artifact (weights, config, id maps)
    catalog.safetensors    item popularity, users' seen items (CSR), the catalog's content
                           embeddings and their presence masks
    catalog.json           item titles, popularity order
    encoders/              the content encoders' weights (pretrained source): text/ is a
                           transformers folder, image/ a timm state dict + its preprocessing
    serving.json           bundle version, registry version, metrics + protocol, dataset hash,
                           encoder settings and identities, request limits

`write_bundle` builds one from a model artifact and the dataset it was trained on;
`ServingEngine.load` answers from it. Every request is one vectorized pass over the catalog:
item vectors, their first MLP layer and the similarity matrix's normalised rows are computed
once at load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .artifacts import load_model
from .atomic import atomic_dir
from .dataset import Dataset
from .model import BoNMF

BUNDLE_VERSION = 1
CONTENT_MODALITIES = ("text", "image")
# Fold-in (recommend_for_items): gradient steps, sampled negatives per liked item, step size.
FOLD_IN_STEPS, FOLD_IN_NEGATIVES, FOLD_IN_LR, FOLD_IN_REG = 60, 4, 0.05, 1e-3
# score_new_item on a model without a content path: this many nearest catalog items in
# content space stand in for the new item in the model's item space.
CONTENT_NEIGHBOURS = 20


class RequestError(ValueError):
    """A request the service cannot answer as asked: a 4xx naming the field."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class UnknownIdError(RequestError):
    """Ids the model does not know (a 404 that lists them)."""

    status = 404

    def __init__(self, kind: str, ids: list[str], field: str):
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:20]) + (" …" if len(ids) > 20 else "")
        super().__init__(f"unknown {kind} id{'s' if len(ids) > 1 else ''}: {shown}", field)


# -- building a bundle ------------------------------------------------------------------------



def item_titles(dataset: Dataset) -> list[str]:
    items = dataset.items
    if "title" not in items:
        return [str(i) for i in items["item_id"]]
    return [str(t) if isinstance(t, str) and t else str(i)
            for t, i in zip(items["title"], items["item_id"])]


def write_bundle(out: str | Path, model_dir: str | Path, dataset: Dataset, encoders: dict,
                 *, info: dict | None = None, limits: dict | None = None) -> Path:
    """Write a serving bundle (atomically) for the model in `model_dir`, trained on `dataset`.

    `encoders`: params.yaml's `encoders` section; the catalog's content embeddings come through
    the embedding cache (no re-encoding when cached) and the encoders' weights are copied in.
    `info`: registry facts (model version, metrics, protocol, dataset hash, ...) for `metadata`.
    A model whose id maps or content features do not match the dataset / encoders is refused.
    """
    from safetensors.torch import save_file

    from .features import content_features
    from .splits import implicit_pairs, positive_matrix

    model, meta, ids = load_model(model_dir)
    _check_ids(ids, dataset, model_dir)
    features, report = content_features(dataset, CONTENT_MODALITIES, encoders)
    _check_model_features(model, features, model_dir)
    pairs = implicit_pairs(dataset)
    seen = positive_matrix(dataset.n_users, dataset.n_items, pairs)
    # Distinct users per item: the popularity fallback's ranking.
    popularity = np.bincount(pairs["item"].to_numpy(), minlength=dataset.n_items
                             ).astype(np.float32)
    tensors = {"popularity": torch.from_numpy(popularity),
               "seen_indptr": torch.from_numpy(seen.indptr.astype(np.int64)),
               "seen_items": torch.from_numpy(seen.indices.astype(np.int64))}
    for m, mat in features.items():
        mat = np.ascontiguousarray(mat, np.float32)
        tensors[f"content_{m}"] = torch.from_numpy(mat)
        tensors[f"present_{m}"] = torch.from_numpy(np.abs(mat).sum(1) > 0)
    out = Path(out)
    with atomic_dir(out) as tmp:
        shutil.copytree(model_dir, tmp / "model")
        save_file(tensors, str(tmp / "catalog.safetensors"))
        (tmp / "catalog.json").write_text(json.dumps({"titles": item_titles(dataset)}))
        encoder_config = _copy_encoders(encoders, tmp / "encoders")
        serving = {
            "bundle_version": BUNDLE_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_artifact_sha256": _artifact_sha(model_dir),
            "variant": meta.get("variant"), "modalities": list(model.config.modalities),
            "dataset": {"name": dataset.name, "content_hash": dataset.content_hash(),
                        "users": dataset.n_users, "items": dataset.n_items},
            "encoders": encoder_config, "content": report,
            "limits": {k: v for k, v in (limits or {}).items() if k.startswith("max_")},
            **(info or {})}
        (tmp / "serving.json").write_text(json.dumps(serving, indent=2, default=str))
    return out


def _artifact_sha(model_dir) -> str:
    from .registry import directory_sha256

    return directory_sha256(model_dir)


def _check_ids(ids: dict, dataset: Dataset, model_dir) -> None:
    if ids["item_ids"] != [str(i) for i in dataset.item_ids] or \
            ids["user_ids"] != [str(u) for u in dataset.user_ids]:
        raise ValueError(f"{model_dir}: the model's id maps do not match dataset "
                         f"{dataset.name!r} ({dataset.n_users} users, {dataset.n_items} items): "
                         f"package it with the dataset it was trained on")


def _check_model_features(model: BoNMF, features: dict, model_dir) -> None:
    """A content model must have been trained on the vectors the packaged encoders produce:
    otherwise a new item's embedding would land in another space than the catalog's."""
    for m in model.config.modalities:
        if m == "id":
            continue
        trained = getattr(model, f"feat_{m}").numpy()
        ours = features[m]
        if trained.shape != ours.shape or not np.allclose(trained, ours, atol=1e-3):
            raise ValueError(f"{model_dir}: the model's {m} features differ from what the "
                             f"configured encoders produce for this catalog (params "
                             f"'encoders'): package with the encoder settings it was trained with")


def _copy_encoders(encoders: dict, folder: Path) -> dict:
    """Copy the pretrained encoders' weights into the bundle → the settings to load them."""
    from .catalog_encoding import EncoderSettings, identity_for

    source = (encoders or {}).get("source", "basic")
    if source == "basic":
        return {"source": "basic"}
    settings = EncoderSettings.from_params(encoders)
    config = {"source": "pretrained", "text_max_length": settings.text_max_length,
              "text_fields": list(settings.text_fields),
              "text_separator": settings.text_separator, "image_model": settings.image_model,
              "identity": {k: identity_for(k, settings) for k in CONTENT_MODALITIES}}
    config["text_model"] = _copy_text_model(settings.text_model, folder / "text")
    config["image_weights"], config["image_data_config"] = _save_image_weights(
        settings.image_model, settings.image_weights, folder / "image")
    return config


def _copy_text_model(model: str, dest: Path) -> str:
    from .encoders import default_text_model_path

    path = default_text_model_path() if model == "default" else Path(model)
    if not path.exists():  # a hub name: the serving machine resolves it (cache or network)
        return model
    shutil.copytree(path, dest, ignore=shutil.ignore_patterns("*.onnx", "*.h5", "*.msgpack",
                                                              "*.ot", "onnx", "openvino"))
    return "encoders/text"


def _save_image_weights(model: str, weights: str, dest: Path) -> tuple[str, dict]:
    """The image backbone's weights as a timm-native safetensors file (whatever the source
    format: the packaged lite0 file maps by order) and its preprocessing config."""
    from safetensors.torch import save_file

    from .encoders import ImageEncoder

    encoder = ImageEncoder(model, weights=weights, device="cpu", precision="fp32",
                           fold_batchnorm=False)
    dest.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(dest / "weights.safetensors"))
    return "encoders/image/weights.safetensors", encoder.preprocessing()


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
        self.limits = self.info.get("limits", {})
        self._precompute()
        self.encoders = _ContentEncoders(self.path, self.info["encoders"]) if load_encoders \
            else None

    @torch.no_grad()  # not inference_mode: fold-in differentiates through these tensors
    def _precompute(self) -> None:
        m = self.model
        g = m.config.gmf_dim
        first = m.mlp[0]
        self._g, self._half = g, m.user_embedding.embedding_dim - g
        self.item_vecs = m.item_vectors(torch.arange(len(self.item_ids)))
        self.user_vecs = m.user_vectors(torch.arange(len(self.user_ids)))
        self._item_first = torch.nn.functional.linear(self.item_vecs[:, g:],
                                                      first.weight[:, self._half:])
        self._user_first = torch.nn.functional.linear(self.user_vecs[:, g:],
                                                      first.weight[:, :self._half], first.bias)
        self._w = m.out.weight[0]
        self._item_gmf_t = (self.item_vecs[:, :g] * self._w[:g]).T.contiguous()
        self.item_unit = torch.nn.functional.normalize(self.item_vecs, dim=1)
        self.popular_order = torch.argsort(self.popularity, descending=True, stable=True)
        self.content_unit = {k: torch.nn.functional.normalize(v, dim=1)
                             for k, v in self.content.items()}

    # -- scoring primitives ------------------------------------------------------------
    def _scores_for_user_vectors(self, uv: torch.Tensor) -> torch.Tensor:
        """(B, W) user vectors → (B, n_items) logits; same numbers as BoNMF.score_users."""
        g = self._g
        hu = torch.nn.functional.linear(uv[:, g:], self.model.mlp[0].weight[:, :self._half],
                                        self.model.mlp[0].bias)
        return self._scores(uv, hu)

    def _scores(self, uv: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        g, rest = self._g, self.model.mlp[1:]
        out = uv[:, :g] @ self._item_gmf_t + self.model.out.bias
        out += rest(hu[:, None, :] + self._item_first[None, :, :]) @ self._w[g:]
        return out

    def _user_scores_for_item_vector(self, iv: torch.Tensor) -> torch.Tensor:
        """(W,) item vector → (n_users,) logits of every known user."""
        g, rest = self._g, self.model.mlp[1:]
        hi = torch.nn.functional.linear(iv[g:], self.model.mlp[0].weight[:, self._half:])
        return (self.user_vecs[:, :g] * self._w[:g]) @ iv[:g] + self.model.out.bias + \
            rest(self._user_first + hi) @ self._w[g:]

    def _items(self, scores: torch.Tensor, k: int) -> list[dict]:
        k = min(k, int(torch.isfinite(scores).sum()))
        values, idx = torch.topk(scores, k)
        return [{"item_id": self.item_ids[i], "title": self.titles[i], "score": round(v, 6)}
                for v, i in zip(values.tolist(), idx.tolist())]

    def _seen(self, u: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[u]:self.seen_indptr[u + 1]]

    # -- the API ----------------------------------------------------------------------
    def check_k(self, k: int, field: str = "k") -> int:
        top = int(self.limits.get("max_k", 1000))
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
            scores = self._scores(self.user_vecs[rows], self._user_first[rows])
            if exclude_seen:
                for r, (_, u) in enumerate(known):
                    scores[r, torch.from_numpy(self._seen(u))] = float("-inf")
            for r, (j, _) in enumerate(known):
                answers[j] = {"user_id": user_ids[j], "known_user": True, "fallback": None,
                              "items": self._items(scores[r], k)}
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
        top = int(self.limits.get("max_liked_items", 1000))
        if not item_ids:
            raise RequestError("needs at least one item id", "item_ids")
        if len(item_ids) > top:
            raise RequestError(f"at most {top} item ids, got {len(item_ids)}", "item_ids")
        liked = sorted(set(self._known_items(item_ids, "item_ids")))
        uv = self.fold_in(liked)
        with torch.inference_mode():
            scores = self._scores_for_user_vectors(uv[None, :])[0]
            if exclude_liked:
                scores[liked] = float("-inf")
        return {"liked": len(liked), "method": "fold_in", "items": self._items(scores, k)}

    def fold_in(self, liked: list[int]) -> torch.Tensor:
        """A user vector for these liked items: BCE against them and sampled negatives, from
        the mean user vector, with a fixed generator (the same profile gets the same answer)."""
        gen = torch.Generator().manual_seed(len(liked) * 7919 + sum(liked))
        n = len(self.item_ids)
        n_neg = max(16, FOLD_IN_NEGATIVES * len(liked))
        liked_t = torch.tensor(liked)
        mask = torch.ones(n, dtype=torch.bool)
        mask[liked_t] = False
        pool = torch.nonzero(mask).squeeze(1)
        if len(pool) == 0:
            pool = torch.arange(n)
        u = self.user_vecs.mean(0).clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=FOLD_IN_LR)
        pos_v = self.item_vecs[liked_t]
        labels = torch.cat([torch.ones(len(liked)), torch.zeros(n_neg)])
        g, rest, first = self._g, self.model.mlp[1:], self.model.mlp[0]
        for _ in range(FOLD_IN_STEPS):
            neg = pool[torch.randint(len(pool), (n_neg,), generator=gen)]
            items = torch.cat([pos_v, self.item_vecs[neg]])
            hi = torch.cat([self._item_first[liked_t], self._item_first[neg]])
            hu = torch.nn.functional.linear(u[g:], first.weight[:, :self._half], first.bias)
            logits = (items[:, :g] * u[:g]) @ self._w[:g] + rest(hu + hi) @ self._w[g:] + \
                self.model.out.bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + \
                FOLD_IN_REG * u.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return u.detach()

    @torch.inference_mode()
    def similar_items(self, item_id: str, k: int = 10) -> dict:
        """Nearest catalog items by cosine similarity in the model's item space."""
        self.check_k(k)
        i = self._known_items([item_id], "item_id")[0]
        scores = self.item_unit @ self.item_unit[i]
        scores[i] = float("-inf")
        return {"item_id": item_id, "title": self.titles[i], "items": self._items(scores, k)}

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
        raw, present = self.encoders.encode(item) if self.encoders else ({}, {})
        if not any(present.values()):
            raise RequestError("no usable content: give a title/text or an image", "title")
        content = [m for m in self.model.config.modalities if m != "id"]
        if content:
            iv = sum(self.model.content[m](self.model.reduce_features(m, raw[m][None]))[0]
                     for m in content)
            method = "content_projection"
            neighbours = None
        else:
            iv, neighbours = self._content_neighbours(raw, present)
            method = "content_neighbours"
        user_scores = self._user_scores_for_item_vector(iv)
        top_u = torch.topk(user_scores, min(k_users, len(self.user_ids)))
        item_scores = self.item_unit @ torch.nn.functional.normalize(iv, dim=0)
        out = {"method": method, "modalities": sorted(m for m, ok in present.items() if ok),
               "users": [{"user_id": self.user_ids[u], "score": round(v, 6)}
                         for v, u in zip(top_u.values.tolist(), top_u.indices.tolist())],
               "similar_items": self._items(item_scores, k_items),
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
        iv = (weights[:, None] * self.item_vecs[top.indices]).sum(0)
        return iv, [self.item_ids[i] for i in top.indices.tolist()[:5]]

    def metadata(self) -> dict:
        keys = ("model_version", "variant", "modalities", "metrics", "protocol", "dataset",
                "model_artifact_sha256", "code_version", "created_at", "bento_model_tag")
        out = {k: self.info.get(k) for k in keys}
        enc = self.info["encoders"]
        out["encoders"] = ({"source": "basic", "text": "hashed_bag_of_words",
                            "image": "tiny_image_features"} if enc["source"] == "basic" else
                           {"source": "pretrained",
                            "text": enc["identity"]["text"]["name"],
                            "image": enc["identity"]["image"]["name"]})
        out["users"], out["items"] = len(self.user_ids), len(self.item_ids)
        out["limits"] = self.limits
        return out


class _ContentEncoders:
    """The bundle's encoders applied to one new item, as the catalog was encoded."""

    def __init__(self, bundle: Path, config: dict):
        self.config = config
        self.text = self.image = None
        if config["source"] == "pretrained":
            from .encoders import ImageEncoder, TextEncoder

            text_model = config["text_model"]
            if text_model == "encoders/text":
                text_model = str(bundle / text_model)
            self.text = TextEncoder(text_model, max_length=config["text_max_length"])
            self.image = ImageEncoder(config["image_model"],
                                      weights=str(bundle / config["image_weights"]),
                                      data_config=config["image_data_config"], workers=0)

    def _text(self, item: NewItem) -> str:
        import pandas as pd

        from .catalog_encoding import compose_item_texts

        row = pd.DataFrame({"title": [item.title], "genres": [item.genres],
                            "overview": [item.text]})
        if self.config["source"] == "basic":  # Dataset.item_text's composition
            return " | ".join(p for p in (item.title, item.genres, item.text) if p)
        return compose_item_texts(row, self.config["text_fields"],
                                  self.config["text_separator"])[0]

    def encode(self, item: NewItem) -> tuple[dict, dict]:
        from .features import hashed_bag_of_words, tiny_image_features

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
        if item.image:  # the encoders read files (decoded by content, as the catalog was)
            with tempfile.NamedTemporaryFile(suffix=".img") as fh:
                fh.write(item.image)
                fh.flush()
                vectors, ok = encode_images([fh.name])
        else:
            vectors, ok = encode_images([None])  # a zero row, like a catalog item's
        if item.image and not ok[0]:
            raise RequestError("not a decodable image (PNG, JPEG, WebP, ...)", "image")
        raw["image"], present["image"] = torch.from_numpy(vectors[0]), bool(ok[0])
        return raw, present
