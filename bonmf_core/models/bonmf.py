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
# The head: NeuMF (GMF ⊕ MLP, the paper's) or a dot product with user, item and global biases
# (the tuned MF of Rendle et al. 2020, which ranks better than NeuMF on ML-1M: RESULTS).
HEADS = ("neumf", "dot")
# The dot head's embeddings start N(0, 0.1²) as in Rendle et al.; NeuMF's N(0, 0.01²).
INIT_STD = {"neumf": 0.01, "dot": 0.1}
# fold_in (a new user's vector, `BoNMF.fold_in_many`): Newton steps, negatives per liked item,
# the weight of the population prior per head. Chosen on the `cold_users` validation users of
# ML-1M (benchmarks/fold_in.py --split valid --priors; benchmarks/RESULTS.md): at NeuMF's 3
# the dot head's new users stayed at popularity's level; 1 lets three revealed items move them.
FOLD_IN_STEPS, FOLD_IN_NEGATIVES = 5, 4
FOLD_IN_PRIOR = {"neumf": 3.0, "dot": 1.0}
# Options older artifacts may carry (always 0 in the ones this version can score).
RETIRED_OPTIONS = ("modality_dropout", "content_align")


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
    head: str                      # one of HEADS
    gmf_dim: int                   # the dot head: the embedding width
    mlp_layers: tuple[int, ...]    # first entry = concatenated embedding width (NeuMF only)
    content_hidden: int
    # content features are PCA-reduced to this width (0 = keep), or to one per modality
    content_dim: int | dict[str, int]
    id_dropout: float
    dropout: float
    # modality -> the weight its content vector gets when scoring (absent = 1): chosen on
    # validation after training (`experiment.variants`); {} for artifacts saved before it.
    content_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {tuple(self.modalities)}")
        self.modalities = tuple(sorted(set(self.modalities), key=MODALITIES.index))
        self.mlp_layers = tuple(self.mlp_layers)
        self.content_weights = {m: float(w) for m, w in self.content_weights.items()}
        self.user_attribute_cardinalities = tuple(self.user_attribute_cardinalities)
        missing = [m for m in self.modalities if m != "id" and m not in self.feature_dims]
        if missing:
            raise ValueError(f"modalities {missing} need feature matrices (feature_dims)")
        if self.mlp_layers[0] % 2:
            raise ValueError("mlp_layers[0] must be even: it is user ⊕ item embedding width")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BoNMFConfig":
        data = dict(data)
        data.setdefault("head", "neumf")   # artifacts saved before the dot head existed
        for key in RETIRED_OPTIONS:   # measured, not adopted, removed (benchmarks/RESULTS.md)
            value = data.pop(key, 0.0)
            if value:
                raise ValueError(f"this model was trained with {key}={value}, an "
                                 "option this version no longer has: retrain it")
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
        # A catalog with fewer content rows than `dim` has fewer directions: the rest stay 0.
        basis = torch.zeros(features.shape[1], dim)
        basis[:, :min(dim, len(vh))] = vh[:dim].T
    scale = (centred @ basis).pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    return mean, basis / scale


@dataclass(frozen=True)
class Side:
    """User or item vectors prepared for scoring against many of the other side: the vectors
    (GMF part ⊕ MLP part) and the first MLP layer's share of them. That layer is linear over
    [user ⊕ item], so each side's share is computed once instead of once per pair. Under the
    dot head the MLP part is the side's bias, and `first` is that bias."""

    vectors: torch.Tensor   # (N, width)
    first: torch.Tensor     # (N, mlp_layers[1] or 1); NeuMF's user side carries the layer's bias

    def select(self, rows) -> "Side":
        return Side(self.vectors[rows], self.first[rows])


class _GatherParts(torch.autograd.Function):
    """Rows of a vector table as its GMF part and its MLP part, and their sum of squares (the
    per-example L2 term), in one autograd node.

    Autograd's own chain (gather, split, ‖x‖²) materializes three batch-sized gradients in
    backward (the norm's, their sum and the split's cat) before scattering them into the
    table; here each part's gradient is scattered straight into its columns and the L2 term's
    goes in at table size (`counts · row`) or as a second scatter, whichever touches less.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, gmf_dim: int):
        flat = index.reshape(-1)
        parts = [table[:, :gmf_dim].index_select(0, flat),
                 table[:, gmf_dim:].index_select(0, flat)]
        squares = sum(torch.dot(p.view(-1), p.view(-1)) for p in parts)
        ctx.save_for_backward(table, flat, *parts)
        ctx.gmf_dim = gmf_dim
        return (*(p.view(*index.shape, -1) for p in parts), squares)

    @staticmethod
    def backward(ctx, grad_gmf, grad_mlp, grad_squares):
        table, flat, gmf, mlp = ctx.saved_tensors
        g = ctx.gmf_dim
        by_row = grad_squares is not None and len(flat) >= len(table)
        grads = []
        for part, part_grad, width in ((gmf, grad_gmf, g), (mlp, grad_mlp, table.shape[1] - g)):
            # One contiguous buffer per part: index_add_ into a column slice of the whole
            # table is ~6× slower on CPU.
            grad = table.new_zeros(len(table), width)
            if part_grad is not None:
                grad.index_add_(0, flat, part_grad.reshape(len(flat), width))
            if grad_squares is not None and not by_row:
                grad.index_add_(0, flat, part, alpha=2 * grad_squares.item())
            grads.append(grad)
        grad = torch.cat(grads, 1)
        if by_row:   # each row's L2 gradient is (times read) · 2 · row
            counts = torch.bincount(flat, minlength=len(table)).to(table.dtype)
            grad.addcmul_(table, (counts * (2 * grad_squares)).unsqueeze(1))
        return grad, None, None


class _GatherItemRows(torch.autograd.Function):
    """The item side of a training batch: each table row's GMF part and its share of the first
    MLP layer, read per occurrence, and the occurrences' sum of squares (the L2 term).

    The first layer runs once per table row instead of once per occurrence: an ML-1M batch
    reads 8,190 item occurrences from a table of at most 3,883 rows, so its forward and both
    backward products shrink by half. That pays only while the table has no more rows than
    the index reads, which `item_table` ensures (over the distinct items otherwise); the L2
    term goes in at table size (`counts · row`).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                gmf_dim: int):
        flat = index.reshape(-1)
        first = table[:, gmf_dim:] @ weight.T
        counts = torch.bincount(flat, minlength=len(table)).to(table.dtype)
        squares = torch.dot(counts, (table * table).sum(1))
        ctx.save_for_backward(table, weight, flat, counts)
        ctx.gmf_dim = gmf_dim
        return (table[:, :gmf_dim].index_select(0, flat).view(*index.shape, -1),
                first.index_select(0, flat).view(*index.shape, -1), squares)

    @staticmethod
    def backward(ctx, grad_gmf, grad_first, grad_squares):
        table, weight, flat, counts = ctx.saved_tensors
        g = ctx.gmf_dim
        # One contiguous buffer per part (index_add_ into a column slice is ~6× slower).
        gmf = table.new_zeros(len(table), g)
        if grad_gmf is not None:
            gmf.index_add_(0, flat, grad_gmf.reshape(len(flat), g))
        first = table.new_zeros(len(table), len(weight))
        if grad_first is not None:
            first.index_add_(0, flat, grad_first.reshape(len(flat), len(weight)))
        grad = torch.cat([gmf, first @ weight], 1)
        if grad_squares is not None:
            grad.addcmul_(table, (counts * (2 * grad_squares)).unsqueeze(1))
        return grad, first.T @ table[:, g:], None, None


class _BatchedDot(torch.autograd.Function):
    """(B, C, D) · (B, D) → (B, C): the GMF branch of C items per user. Its backward writes
    the items' gradient as a broadcast product; autograd's (bmm with an inner size of 1)
    took ~1 ms of a ~10 ms ML-1M training step."""

    @staticmethod
    def forward(ctx, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(items, users)
        return torch.bmm(items, users.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        items, users = ctx.saved_tensors
        return (grad.unsqueeze(-1) * users.unsqueeze(1),
                torch.bmm(grad.unsqueeze(1), items).squeeze(1))


def _distinct_rows(ids: torch.Tensor, n: int):
    """(index, pick) for building a table over `ids` only: `pick(t)` takes the rows of a
    per-entity tensor `t` the table needs and `index` points into them. Fewer ids than
    entities → their distinct ones (a batch, a serving call); else every entity, as is."""
    if ids.numel() >= n:
        return ids, lambda t: t
    rows, index = torch.unique(ids, return_inverse=True)
    return index, lambda t: t.index_select(0, rows)   # backward: index_add_, not index_put_


def _content_projection(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """Reduced content features → an item vector: an MLP with one GELU hidden layer, or one
    linear map when `hidden` is 0."""
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class BoNMF(nn.Module):
    """NeuMF (or a dot product with biases: `head`) over fused ID + content representations.

    Each user/item has one vector of width `gmf_dim + mlp_layers[0] // 2`: the first part feeds
    the GMF branch, the rest the MLP branch (one table each side: half the embedding lookups).
    Under the dot head the vector is `gmf_dim` embedding columns and one bias column, and
    score(u, i) = <u_emb, i_emb> + u_bias + i_bias + b; content projections feed both, so a
    cold item gets a popularity prior (its bias) from its content as well.
    `forward(users (B,), items (B,) or (B, C))` scores each user against its C items, so a
    positive and its sampled negatives share one user lookup and one user-side MLP product.
    """

    def __init__(self, config: BoNMFConfig, features: dict[str, torch.Tensor] | None = None,
                 user_attributes: torch.Tensor | None = None):
        super().__init__()
        self.config = c = config
        width = c.gmf_dim + (1 if c.head == "dot" else c.mlp_layers[0] // 2)
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
        if c.head == "dot":
            self.bias = nn.Parameter(torch.zeros(()))
        else:
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
        if isinstance(dim, dict):
            dim = dim[modality]
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
            # A normal tensor even when first asked for under inference mode (scoring), so
            # training can read it too.
            with torch.inference_mode(False), torch.no_grad():
                cached = (stamp, self.reduce_features(modality, bufs[0]))
            self._reduced_cache[modality] = cached
        return cached[1]

    def reset_parameters(self) -> None:
        embeddings = [self.user_embedding, *self.user_attr]
        if "id" in self.config.modalities:
            embeddings.append(self.item_embedding)
        dot = self.config.head == "dot"
        for emb in embeddings:
            nn.init.normal_(emb.weight, std=INIT_STD[self.config.head])
            if dot:
                nn.init.zeros_(emb.weight[:, -1])   # the bias column
        if dot:
            nn.init.zeros_(self.bias)
            return
        for mod in self.mlp:
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.kaiming_uniform_(self.out.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.out.bias)

    # -- representations -----------------------------------------------------------------
    # Each side's vectors are rows of a table (`user_table`, `item_table`) read through an
    # index: the trained embeddings plus whatever is computed per user/item (attributes,
    # content projections) built once per call, then one gather per batch.
    def user_table(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, index): `users`' vectors are `table[index]`."""
        if not self.config.user_attribute_cardinalities:
            return self.user_embedding.weight, users
        index, pick = _distinct_rows(users, self.config.n_users)
        table, codes = pick(self.user_embedding.weight), pick(self.user_attributes)
        for j, emb in enumerate(self.user_attr):
            table = table + emb(codes[:, j])
        return table, index

    def item_table(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, index): `items`' vectors are `table[index]`.

        An item's vector is its ID embedding (zero for items without training interactions:
        they are scored from content alone) plus its content projections. Each training step
        drops the ID part of each item with probability `id_dropout`, for all of the item's
        occurrences in the batch (DropoutNet's per-item draw), so the content path learns to
        score alone. A draw per occurrence needed the table twice (content only, ID + content)
        and its gradient at twice the size: 0.85 ms of a 13 ms ML-1M step (RESULTS).
        """
        c = self.config
        index, pick = _distinct_rows(items, c.n_items)
        if not self.content and self.training:
            return pick(self.item_embedding.weight), index
        if not self.content:
            return pick(self.item_embedding.weight) * pick(self.warm_items).unsqueeze(1), index
        content = self._content_rows(pick)
        if "id" not in c.modalities:
            return content, index
        ident = pick(self.item_embedding.weight)
        if not self.training:
            return ident * pick(self.warm_items).unsqueeze(1) + content, index
        if not c.id_dropout:
            return ident + content, index
        keep = (torch.rand(len(ident), 1, device=ident.device) >= c.id_dropout).to(ident.dtype)
        return torch.addcmul(content, ident, keep), index

    def _content_rows(self, pick) -> torch.Tensor:
        """The content projections summed, for the catalog rows `pick` selects."""
        if self.training and not self.config.content_hidden:
            # Training (every weight 1) with linear projections: one matrix product over the
            # modalities' features side by side instead of one per modality and their sum.
            layers = list(self.content.values())
            weight = torch.cat([layer.weight for layer in layers], 1)
            return torch.addmm(sum(layer.bias for layer in layers),
                               pick(self._reduced_side_by_side()), weight.T)
        return sum(self._weighted(m, project(pick(self._reduced(m))))
                   for m, project in self.content.items())

    def _reduced_side_by_side(self) -> torch.Tensor:
        """The content modalities' reduced features concatenated (items × Σ widths), cached
        as `_reduced` is."""
        parts = [self._reduced(m) for m in self.content]
        stamp = tuple(self._reduced_cache[m][0] for m in self.content)
        cached = self._reduced_cache.get("side_by_side")
        if cached is None or cached[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():
                cached = (stamp, parts[0] if len(parts) == 1 else torch.cat(parts, 1))
            self._reduced_cache["side_by_side"] = cached
        return cached[1]

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        table, index = self.user_table(users)
        return nn.functional.embedding(index, table)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        table, index = self.item_table(items)
        return nn.functional.embedding(index, table)

    # -- the head: GMF ⊕ MLP over a user and an item vector --------------------------------
    def user_side(self, vectors: torch.Tensor) -> Side:
        if self.config.head == "dot":
            return Side(vectors, vectors[..., -1:])
        first, g = self.mlp[0], self.config.gmf_dim
        half = vectors.shape[-1] - g
        return Side(vectors, nn.functional.linear(vectors[..., g:], first.weight[:, :half],
                                                  first.bias))

    def item_side(self, vectors: torch.Tensor) -> Side:
        if self.config.head == "dot":
            return Side(vectors, vectors[..., -1:])
        first, g = self.mlp[0], self.config.gmf_dim
        half = vectors.shape[-1] - g
        return Side(vectors, nn.functional.linear(vectors[..., g:], first.weight[:, half:]))

    def _score(self, user_gmf, user_mlp, item_gmf, item_first) -> torch.Tensor:
        """Scores of users (B, 1, ·) against items (B, C, ·): the users as their GMF and MLP
        parts, the items as their GMF part and their share of the first MLP layer
        (`_GatherItemRows`). `score_sides`'s numbers for a batch of (user, C items) rows,
        shaped for the training step's backward (the GMF weights go onto the user side before
        the product, and the first MLP layer runs once per user and once per item)."""
        if self.config.head == "dot":   # the MLP parts are the biases
            return (_BatchedDot.apply(item_gmf, user_gmf.squeeze(1)) + user_mlp[..., 0]
                    + item_first[..., 0] + self.bias)
        g, first, w = self.config.gmf_dim, self.mlp[0], self.out.weight[0]
        half = user_mlp.shape[-1]
        gmf = _BatchedDot.apply(item_gmf, (user_gmf * w[:g]).squeeze(1))
        hidden = nn.functional.linear(user_mlp, first.weight[:, :half], first.bias) + item_first
        return gmf + self.mlp[1:](hidden) @ w[g:] + self.out.bias

    def score_sides(self, users: Side, items: Side) -> torch.Tensor:
        """Logits of every user against every item (U, I): `score_users` and serving.

        The GMF part is one matrix product; only the layers after the first run per pair,
        in blocks of ~32k pairs so the intermediates stay in cache (≈5× faster than blocks
        of 1M pairs on ML-1M).
        """
        g = self.config.gmf_dim
        if self.config.head == "dot":
            return (users.vectors[:, :g] @ items.vectors[:, :g].T + users.first
                    + items.first.T + self.bias)
        w = self.out.weight[0]
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
        flat = items.dim() == 1
        g = self.config.gmf_dim
        user_gmf, user_mlp, user_sq = _GatherParts.apply(*self.user_table(users[:, None]), g)
        table, index = self.item_table(items[:, None] if flat else items)
        item_gmf, item_first, item_sq = _GatherItemRows.apply(
            table, self._item_first_weight(table), index, g)
        logits = self._score(user_gmf, user_mlp, item_gmf, item_first)
        logits = logits.squeeze(1) if flat else logits
        if return_norms:
            return logits, user_sq / users.numel() + item_sq / items.numel()
        return logits

    def _item_first_weight(self, table: torch.Tensor) -> torch.Tensor:
        """The first MLP layer's item columns; under the dot head the identity on the bias
        column (so `_GatherItemRows` passes the bias through)."""
        if self.config.head == "dot":
            return table.new_ones(1, 1)
        return self.mlp[0].weight[:, table.shape[1] - self.config.gmf_dim:]

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
        return sum(self._weighted(m, project(self.reduce_features(m, raw[m])))
                   for m, project in self.content.items())

    def _weighted(self, modality: str, vectors: torch.Tensor) -> torch.Tensor:
        """A modality's content vectors times its scoring weight (`content_weights`; training
        always sees weight 1: the weights are chosen after it)."""
        weight = 1.0 if self.training else self.config.content_weights.get(modality, 1.0)
        return vectors if weight == 1.0 else vectors * weight

    def cold_start_vectors(self, users: torch.Tensor | None = None, n: int = 1
                           ) -> torch.Tensor:
        """Where fold-in starts for users it has never trained on (n or len(users), W): the
        mean user ID embedding, plus the given users' attribute embeddings when the model has
        them (`cold_users` knows a held-out user's attributes; a service caller has none)."""
        with torch.no_grad():
            if users is None or not self.config.user_attribute_cardinalities:
                mean, _ = self.user_prior()
                return mean.expand(n if users is None else len(users), -1).clone()
            warm = torch.nonzero(self.warm_users).squeeze(1)
            vec = self.user_embedding.weight[warm].mean(0).expand(len(users), -1).clone()
            codes = self.user_attributes[users]
            for j, emb in enumerate(self.user_attr):
                vec = vec + emb(codes[:, j])
            return vec

    def user_prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The population of trained user vectors as a Gaussian: its mean (W,) and precision
        (W, W) (the inverse covariance, with a small ridge so it is always invertible). Cached
        until the user weights change."""
        tables = [self.user_embedding.weight, *(e.weight for e in self.user_attr),
                  self.warm_users]
        stamp = tuple((t.data_ptr(), t._version) for t in tables)
        cached = self._reduced_cache.get("user_prior")   # the cache of derived tensors
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                vectors = self.user_vectors(torch.nonzero(self.warm_users).squeeze(1))
                mean = vectors.mean(0)
                centred = vectors - mean
                cov = centred.T @ centred / max(len(vectors) - 1, 1)
                ridge = 1e-3 * cov.diagonal().mean().clamp_min(1e-8)
                precision = torch.linalg.inv(cov + ridge * torch.eye(len(cov)))
            cached = (stamp, (mean, precision))
            self._reduced_cache["user_prior"] = cached
        return cached[1]

    def fold_in(self, liked: Sequence[int], items: Side | None = None, **options
                ) -> torch.Tensor:
        """A user vector (W,) for one profile of liked item indices: `fold_in_many` of it."""
        return self.fold_in_many([liked], items, **options)[0]

    def fold_in_many(self, profiles: Sequence[Sequence[int]], items: Side | None = None, *,
                     starts: torch.Tensor | None = None, prior: float | None = None,
                     negatives: float = FOLD_IN_NEGATIVES, steps: int = FOLD_IN_STEPS,
                     chunk: int = 32) -> torch.Tensor:
        """User vectors (P, W) for profiles of liked item indices, everything trained frozen:
        the service's new-user answer and the `cold_users` protocol are this one function.

        Each vector is the MAP estimate under the population prior (`user_prior`, centred on
        `starts`, default `cold_start_vectors`) of the training objective's expectation: the
        logistic loss of every liked item as a positive plus `negatives` per liked item spread
        evenly over every other item (what uniform negative sampling draws on average), plus
        `prior`/2 · (u − start)ᵀ Σ⁻¹ (u − start) (`prior` default: the head's `FOLD_IN_PRIOR`).
        The head is piecewise linear in the user vector (GMF and the dot head are linear, the
        MLP is ReLU), so Gauss–Newton is Newton here: `steps`
        solves of a W × W system instead of tens of stochastic gradient steps, and the answer is
        deterministic — the same profile (in any order, with repeats) gets the same vector, alone
        or in a batch. `items`: `item_side` of all items when the caller has it already.
        """
        with torch.no_grad():
            if items is None:
                items = self.item_side(self.item_vectors(torch.arange(self.config.n_items)))
            if starts is None:
                starts = self.cold_start_vectors(n=len(profiles))
            _, precision = self.user_prior()
            if prior is None:
                prior = FOLD_IN_PRIOR[self.config.head]
            out = torch.empty_like(starts)
            for s in range(0, len(profiles), chunk):
                out[s:s + chunk] = self._map_user_vectors(
                    profiles[s:s + chunk], items, starts[s:s + chunk], precision, prior,
                    negatives, steps)
        return out

    def _map_user_vectors(self, profiles, items: Side, starts, precision, prior, negatives,
                          steps) -> torch.Tensor:
        n_items, g = len(items.vectors), self.config.gmf_dim
        labels = torch.zeros(len(profiles), n_items)
        for row, liked in enumerate(profiles):
            labels[row, torch.as_tensor(sorted(set(int(i) for i in liked)), dtype=torch.long)] = 1
        n_liked = labels.sum(1, keepdim=True)
        # Each liked item counts once; its `negatives` are spread over the other items.
        weights = torch.where(labels > 0, 1.0,
                              negatives * n_liked / (n_items - n_liked).clamp_min(1))
        eye = prior * precision
        if self.config.head == "dot":
            return self._map_dot(items, labels, weights, starts, eye, steps)
        first = self.mlp[0]
        w_out = self.out.weight[0]
        user_first_weight = first.weight[:, :first.weight.shape[1] // 2]   # (H1, W - g)
        jac_gmf = items.vectors[:, :g] * w_out[:g]          # ∂logit/∂u_gmf: the same per user
        u = starts.clone()
        factors = None
        for _ in range(steps):
            side = self.user_side(u)
            with torch.inference_mode(False), torch.enable_grad():
                hidden = (side.first[:, None, :] + items.first[None]).detach().requires_grad_()
                mlp_logit = self.mlp[1:](hidden) @ w_out[g:]
                delta, = torch.autograd.grad(mlp_logit.sum(), [hidden])
            logits = (u[:, None, :g] * jac_gmf).sum(-1) + mlp_logit.detach() + self.out.bias
            p = torch.sigmoid(logits)
            residual = weights * (p - labels)
            grad = torch.cat([residual @ jac_gmf,
                              torch.einsum("pn,pnh->ph", residual, delta) @ user_first_weight],
                             -1) + (u - starts) @ eye
            if factors is None:
                # The Hessian of the first step serves them all (a chord Newton method): the
                # W × W product over the catalog is most of a step's cost, the gradient is cheap.
                jac = torch.cat([jac_gmf.expand(len(u), -1, -1), delta @ user_first_weight], -1)
                curvature = (weights * p * (1 - p)).unsqueeze(-1)
                factors = torch.linalg.lu_factor(jac.transpose(1, 2) @ (curvature * jac) + eye)
            u = u - torch.linalg.lu_solve(*factors, grad.unsqueeze(-1)).squeeze(-1)
        return u

    def _map_dot(self, items: Side, labels, weights, starts, eye, steps) -> torch.Tensor:
        """`_map_user_vectors` under the dot head: the logit is linear in the user vector
        ([embedding ⊕ bias] · [item embedding ⊕ 1] + item bias + b), so every user shares one
        Jacobian and each step is a Newton step on a logistic regression."""
        g = self.config.gmf_dim
        jac = torch.cat([items.vectors[:, :g], items.vectors.new_ones(len(items.vectors), 1)], 1)
        offset = items.first[:, 0] + self.bias
        u, factors = starts.clone(), None
        for _ in range(steps):
            p = torch.sigmoid(u @ jac.T + offset)
            grad = (weights * (p - labels)) @ jac + (u - starts) @ eye
            if factors is None:   # chord Newton, as `_map_user_vectors`
                curvature = (weights * p * (1 - p)).unsqueeze(-1)
                factors = torch.linalg.lu_factor(jac.T @ (curvature * jac) + eye)
            u = u - torch.linalg.lu_solve(*factors, grad.unsqueeze(-1)).squeeze(-1)
        return u

    def score_profiles(self, users: torch.Tensor | None, profiles: Sequence[Sequence[int]]
                       ) -> torch.Tensor:
        """Scores of every item for users never trained on (P × n_items), from the items each
        revealed (`fold_in_many`) and, with user attributes, the users' own (`cold_users`)."""
        items = self.item_side(self.item_vectors(torch.arange(self.config.n_items)))
        starts = self.cold_start_vectors(users, n=len(profiles))
        vectors = self.fold_in_many(profiles, items, starts=starts)
        with torch.no_grad():
            return self.score_sides(self.user_side(vectors), items)
