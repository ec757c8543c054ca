"""The BoNMF model: NeuMF (GMF + MLP) over user/item representations fused with item content.

An item's vector in each branch is the sum of its ID embedding and learned projections of its
content features (text, image). Which parts exist is the `modalities` setting — `id`, `text`,
`image` or any combination — so one code path is both the model and its ablation. Items without
training interactions have no trained ID embedding; they are scored from content alone, a path
that training teaches by dropping ID embeddings at random (`id_dropout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field

import torch
from torch import nn

MODALITIES = ("id", "text", "image")
# fold_in: Adam steps, sampled negatives per liked item (at least 16), step size, L2 on the
# fitted vector. Few steps suffice: one vector against a fixed, trained scorer.
FOLD_IN_STEPS, FOLD_IN_NEGATIVES, FOLD_IN_LR, FOLD_IN_REG = 60, 4, 0.05, 1e-3


@dataclass
class BoNMFConfig:
    """The architecture a BoNMF is built with and saved by. The hyper-parameters (after `_`)
    have no defaults here: they come from the configuration's `model` section
    (`bonmf_core.config.ModelConfig`, see `experiment.variants.build_bonmf`)."""

    n_users: int
    n_items: int
    modalities: tuple[str, ...] = ("id",)
    feature_dims: dict[str, int] = field(default_factory=dict)  # modality -> input width
    user_attribute_cardinalities: tuple[int, ...] = ()
    _: KW_ONLY
    gmf_dim: int
    mlp_layers: tuple[int, ...]    # first entry = concatenated embedding width
    content_hidden: int
    content_dim: int               # content features are PCA-reduced to this width (0 = keep)
    id_dropout: float
    dropout: float

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {tuple(self.modalities)}")
        self.modalities = tuple(sorted(set(self.modalities), key=MODALITIES.index))
        self.mlp_layers = tuple(self.mlp_layers)
        self.user_attribute_cardinalities = tuple(self.user_attribute_cardinalities)
        missing = [m for m in self.modalities if m != "id" and m not in self.feature_dims]
        if missing:
            raise ValueError(f"modalities {missing} need feature matrices (feature_dims)")
        if self.mlp_layers[0] % 2:
            raise ValueError("mlp_layers[0] must be even: it is user ⊕ item embedding width")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BoNMFConfig":
        return cls(**data)


@torch.no_grad()
def _pca_basis(features: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, basis) so that (x - mean) @ basis keeps the top-`dim` principal directions,
    scaled so a typical reduced row has unit norm.

    Pretrained vectors are wide (384 text, 1280 image) and every training batch projects
    almost the whole catalog: reducing them once makes the content path ~10× cheaper
    (ML-1M text+image: 181 s → about 15 s per epoch) and centres them. Rows without content
    (all zeros: a missing poster) do not shape the basis.
    """
    rows = features[features.abs().sum(1) > 0]
    if len(rows) == 0:
        rows = features
    mean = rows.mean(0)
    centred = rows - mean
    if dim >= features.shape[1]:
        basis = torch.eye(features.shape[1])
    else:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh[:dim].T.contiguous()
    scale = (centred @ basis).pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    return mean, basis / scale


@dataclass(frozen=True)
class Side:
    """User or item vectors prepared for scoring against many of the other side: the vectors
    (GMF part ⊕ MLP part) and the first MLP layer's share of them. That layer is linear over
    [user ⊕ item], so each side's share is computed once instead of once per pair."""

    vectors: torch.Tensor   # (N, width)
    first: torch.Tensor     # (N, mlp_layers[1]); the user side carries the layer's bias

    def select(self, rows) -> "Side":
        return Side(self.vectors[rows], self.first[rows])


def _others(n: int, taken: torch.Tensor) -> torch.Tensor:
    """Indices below `n` not in `taken`; all of them when `taken` covers every index."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[taken] = False
    return torch.nonzero(mask).squeeze(1) if mask.any() else torch.arange(n)


def _content_projection(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class BoNMF(nn.Module):
    """NeuMF over fused ID + content representations.

    Each user/item has one vector of width `gmf_dim + mlp_layers[0] // 2`: the first part feeds
    the GMF branch, the rest the MLP branch (one table each side: half the embedding lookups).
    `forward(users (B,), items (B,) or (B, C))` scores each user against its C items, so a
    positive and its sampled negatives share one user lookup and one user-side MLP product.
    """

    def __init__(self, config: BoNMFConfig, features: dict[str, torch.Tensor] | None = None,
                 user_attributes: torch.Tensor | None = None):
        super().__init__()
        self.config = c = config
        width = c.gmf_dim + c.mlp_layers[0] // 2
        self.user_embedding = nn.Embedding(c.n_users, width)
        self.user_attr = nn.ModuleList(nn.Embedding(n, width)
                                       for n in c.user_attribute_cardinalities)
        if "id" in c.modalities:
            self.item_embedding = nn.Embedding(c.n_items, width)
        # Each content modality is projected to the same width as the ID embedding (GMF part ⊕
        # MLP part), so ID and content vectors add up.
        content = [m for m in c.modalities if m != "id"]
        self.content = nn.ModuleDict({m: _content_projection(self._reduced_dim(m),
                                                             c.content_hidden, width)
                                      for m in content})
        layers: list[nn.Module] = []
        for a, b in zip(c.mlp_layers[:-1], c.mlp_layers[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if c.dropout:
                layers.append(nn.Dropout(c.dropout))
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(c.gmf_dim + c.mlp_layers[-1], 1)

        # Data the model scores with but does not learn: content features, user attributes and
        # which items have trained ID embeddings. Buffers, so they travel with the weights.
        for m in content:
            feat = features[m].float() if features and m in features else None
            if feat is None or tuple(feat.shape) != (c.n_items, c.feature_dims[m]):
                raise ValueError(f"feature matrix for '{m}' must be {c.n_items}×"
                                 f"{c.feature_dims[m]}")
            self.register_buffer(f"feat_{m}", feat)
            mean, basis = _pca_basis(feat, self._reduced_dim(m))
            self.register_buffer(f"reduce_mean_{m}", mean)
            self.register_buffer(f"reduce_basis_{m}", basis)
        self._reduced_cache: dict[str, tuple] = {}
        if c.user_attribute_cardinalities:
            if user_attributes is None or tuple(user_attributes.shape) != (
                    c.n_users, len(c.user_attribute_cardinalities)):
                raise ValueError("user_attributes must be n_users × n_attributes codes")
            self.register_buffer("user_attributes", user_attributes.long())
        self.register_buffer("warm_items", torch.ones(c.n_items, dtype=torch.bool))
        # Users with training interactions: a new user's fold-in starts from their mean
        # (under `cold_users` the held-out users' rows stay at their random start).
        self.register_buffer("warm_users", torch.ones(c.n_users, dtype=torch.bool))
        self.reset_parameters()

    def _reduced_dim(self, modality: str) -> int:
        raw, dim = self.config.feature_dims[modality], self.config.content_dim
        return raw if not dim or dim >= raw else dim

    def reduce_features(self, modality: str, raw: torch.Tensor) -> torch.Tensor:
        """Raw content vectors (…, raw dim) → the reduced space the projections read.

        Public so new items (cold start at serving time) go through the same transform.
        """
        return (raw - getattr(self, f"reduce_mean_{modality}")) @ getattr(
            self, f"reduce_basis_{modality}")

    def _reduced(self, modality: str) -> torch.Tensor:
        """The catalog's reduced features, recomputed only when a buffer changed (load)."""
        bufs = [getattr(self, f"{p}_{modality}") for p in ("feat", "reduce_mean", "reduce_basis")]
        stamp = tuple((b.data_ptr(), b._version) for b in bufs)
        cached = self._reduced_cache.get(modality)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                cached = (stamp, self.reduce_features(modality, bufs[0]))
            self._reduced_cache[modality] = cached
        return cached[1]

    def reset_parameters(self) -> None:
        embeddings = [self.user_embedding, *self.user_attr]
        if "id" in self.config.modalities:
            embeddings.append(self.item_embedding)
        for emb in embeddings:
            nn.init.normal_(emb.weight, std=0.01)
        for mod in self.mlp:
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.kaiming_uniform_(self.out.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.out.bias)

    # -- representations -----------------------------------------------------------------
    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        vec = self.user_embedding(users)
        if self.config.user_attribute_cardinalities:
            codes = self.user_attributes[users]
            for j, emb in enumerate(self.user_attr):
                vec = vec + emb(codes[..., j])
        return vec

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        c = self.config
        vec = None
        if "id" in c.modalities:
            vec = self.item_embedding(items)
            # Cold items have untrained ID embeddings: score them from content alone. Training
            # only sees warm items, so the mask is needed there only for ID dropout.
            if not self.training:
                keep = self.warm_items[items]
            elif c.id_dropout and self.content:
                keep = torch.rand(items.shape, device=items.device) >= c.id_dropout
            else:
                keep = None
            if keep is not None:
                vec = vec * keep.unsqueeze(-1).to(vec.dtype)
        if self.content:
            # Project each distinct item once per call: a batch repeats items many times.
            uniq, inverse = torch.unique(items, return_inverse=True)
            for m, project in self.content.items():
                # embedding() as the gather: its backward is ~8× faster on CPU than that of
                # advanced indexing (index_put with accumulation).
                v = nn.functional.embedding(inverse, project(self._reduced(m)[uniq]))
                vec = v if vec is None else vec + v
        return vec

    # -- the head: GMF ⊕ MLP over a user and an item vector --------------------------------
    def user_side(self, vectors: torch.Tensor) -> Side:
        first, g = self.mlp[0], self.config.gmf_dim
        half = vectors.shape[-1] - g
        return Side(vectors, nn.functional.linear(vectors[..., g:], first.weight[:, :half],
                                                  first.bias))

    def item_side(self, vectors: torch.Tensor) -> Side:
        first, g = self.mlp[0], self.config.gmf_dim
        half = vectors.shape[-1] - g
        return Side(vectors, nn.functional.linear(vectors[..., g:], first.weight[:, half:]))

    def _pair_logits(self, users: Side, items: Side) -> torch.Tensor:
        """Logits of user/item sides paired element by element (shapes broadcast)."""
        g, w = self.config.gmf_dim, self.out.weight[0]
        gmf = users.vectors[..., :g] * items.vectors[..., :g]
        return gmf @ w[:g] + self.mlp[1:](users.first + items.first) @ w[g:] + self.out.bias

    def _score(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """Scores for user vectors (..., 1 or C, W) against item vectors (..., C, W)."""
        return self._pair_logits(self.user_side(user_vec), self.item_side(item_vec))

    def score_sides(self, users: Side, items: Side) -> torch.Tensor:
        """Logits of every user against every item (U, I): `score_users` and serving.

        The GMF part is one matrix product; only the layers after the first run per pair,
        in blocks of ~32k pairs so the intermediates stay in cache (≈5× faster than blocks
        of 1M pairs on ML-1M).
        """
        g, w = self.config.gmf_dim, self.out.weight[0]
        out = (users.vectors[:, :g] * w[:g]) @ items.vectors[:, :g].T + self.out.bias
        rest = self.mlp[1:]
        step = max(1, 32768 // max(1, len(items.vectors)))
        for s in range(0, len(users.vectors), step):
            out[s:s + step] += rest(users.first[s:s + step, None, :] +
                                    items.first[None, :, :]) @ w[g:]
        return out

    def forward(self, users: torch.Tensor, items: torch.Tensor, return_norms: bool = False):
        """Logits: users (B,) with items (B,) → (B,); with items (B, C) → (B, C).

        With `return_norms`, also the mean squared norm of the user and item vectors used
        (per-example L2 regularization, as in tuned MF/NCF training).
        """
        u = self.user_vectors(users)
        i = self.item_vectors(items)
        if items.dim() == 2:
            u = u.unsqueeze(1)
        logits = self._score(u, i)
        if return_norms:
            return logits, u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean()
        return logits

    # -- scoring (the evaluation Scorer interface) ---------------------------------------
    @torch.inference_mode()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(users, items)

    @torch.inference_mode()
    def score_users(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item (or `items`) for each user (users × items); `forward`'s
        numbers, computed pair-free where possible (`score_sides`)."""
        items = torch.arange(self.config.n_items) if items is None else items
        return self.score_sides(self.user_side(self.user_vectors(users)),
                                self.item_side(self.item_vectors(items)))

    # -- what training never saw: new items, new users ----------------------------------
    def content_item_vectors(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """Item vectors (N, W) of new items from their raw content features alone (N, raw
        dim per modality): how cold catalog items are scored (no trained ID embedding)."""
        if not self.content:
            raise ValueError("this model has no content path (modalities: "
                             f"{', '.join(self.config.modalities)})")
        return sum(project(self.reduce_features(m, raw[m])) for m, project in self.content.items())

    def cold_start_vectors(self, users: torch.Tensor | None = None, n: int = 1
                           ) -> torch.Tensor:
        """Where fold-in starts for users it has never trained on (n or len(users), W): the
        mean user ID embedding, plus the given users' attribute embeddings when the model has
        them (`cold_users` knows a held-out user's attributes; a service caller has none)."""
        with torch.no_grad():
            warm = torch.nonzero(self.warm_users).squeeze(1)
            if users is None or not self.config.user_attribute_cardinalities:
                mean = self.user_vectors(warm).mean(0)
                return mean.expand(n if users is None else len(users), -1).clone()
            vec = self.user_embedding.weight[warm].mean(0).expand(len(users), -1).clone()
            codes = self.user_attributes[users]
            for j, emb in enumerate(self.user_attr):
                vec = vec + emb(codes[:, j])
            return vec

    def fold_in(self, liked: Sequence[int], items: Side | None = None, *,
                steps: int = FOLD_IN_STEPS, negatives: int = FOLD_IN_NEGATIVES,
                lr: float = FOLD_IN_LR, reg: float = FOLD_IN_REG) -> torch.Tensor:
        """A user vector (W,) for one profile of liked item indices: `fold_in_many` of it."""
        return self.fold_in_many([liked], items, steps=steps, negatives=negatives, lr=lr,
                                 reg=reg)[0]

    def fold_in_many(self, profiles: Sequence[Sequence[int]], items: Side | None = None, *,
                     starts: torch.Tensor | None = None, steps: int = FOLD_IN_STEPS,
                     negatives: int = FOLD_IN_NEGATIVES, lr: float = FOLD_IN_LR,
                     reg: float = FOLD_IN_REG) -> torch.Tensor:
        """User vectors (P, W) for profiles of liked item indices, everything trained frozen:
        per profile, BCE against its liked items and sampled other items plus L2 on the vector,
        from `starts` (default: `cold_start_vectors`). The service's new-user answer and the
        `cold_users` protocol are this one function.

        Each profile's loss is its own mean, summed over profiles, and Adam is per element:
        a profile gets the same vector alone or in a batch. Its negatives come from a generator
        seeded by the profile, so the same profile always gets the same vector. `items`:
        `item_side` of all items when the caller has it already. Not under
        `torch.inference_mode` (it differentiates).
        """
        liked = [torch.as_tensor(sorted(set(int(i) for i in p)), dtype=torch.long)
                 for p in profiles]
        with torch.no_grad():
            if items is None:
                items = self.item_side(self.item_vectors(torch.arange(self.config.n_items)))
            start = self.cold_start_vectors(n=len(liked)) if starts is None else starts
        rows, weights, labels = self._fold_in_rows(liked, len(items.vectors), steps, negatives)
        u = start.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(steps):
                logits = self._pair_logits(self.user_side(u[:, None, :]),
                                           items.select(rows[:, step]))
                bce = nn.functional.binary_cross_entropy_with_logits(
                    logits, labels, weight=weights, reduction="sum")
                loss = bce + reg * u.pow(2).sum()
                # The gradient of u alone: the trained weights stay frozen, their .grad untouched.
                u.grad, = torch.autograd.grad(loss, [u])
                opt.step()
        return u.detach()

    @staticmethod
    def _fold_in_rows(liked: list[torch.Tensor], n_items: int, steps: int, negatives: int):
        """Per profile and step, its liked items then max(16, negatives × liked) items it did not
        like, padded to one width → (rows (P, steps, width), weights (P, width): 1 / the
        profile's own count on its entries and 0 on padding, labels (P, width): the logits'
        shape at each step)."""
        n_neg = [max(16, negatives * len(p)) for p in liked]
        n_pos = max(len(p) for p in liked)
        width = n_pos + max(n_neg)
        rows = torch.zeros(len(liked), steps, width, dtype=torch.long)
        weights = torch.zeros(len(liked), width)
        labels = torch.zeros(len(liked), width)
        for j, (p, k) in enumerate(zip(liked, n_neg)):
            gen = torch.Generator().manual_seed(len(p) * 7919 + int(p.sum()))
            pool = _others(n_items, p)
            rows[j, :, :len(p)] = p
            rows[j, :, n_pos:n_pos + k] = pool[torch.randint(len(pool), (steps, k), generator=gen)]
            weights[j, :len(p)] = weights[j, n_pos:n_pos + k] = 1.0 / (len(p) + k)
            labels[j, :len(p)] = 1.0
        return rows, weights, labels

    def score_profiles(self, users: torch.Tensor | None, profiles: Sequence[Sequence[int]]
                       ) -> torch.Tensor:
        """Scores of every item for users never trained on (P × n_items), from the items each
        revealed (`fold_in_many`) and, with user attributes, the users' own (`cold_users`)."""
        items = self.item_side(self.item_vectors(torch.arange(self.config.n_items)))
        starts = self.cold_start_vectors(users, n=len(profiles))
        vectors = self.fold_in_many(profiles, items, starts=starts)
        with torch.no_grad():
            return self.score_sides(self.user_side(vectors), items)
