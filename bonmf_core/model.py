"""The BoNMF model: NeuMF (GMF + MLP) over user/item representations fused with item content.

An item's vector in each branch is the sum of its ID embedding and learned projections of its
content features (text, image). Which parts exist is the `modalities` setting — `id`, `text`,
`image` or any combination — so one code path is both the model and its ablation. Items without
training interactions have no trained ID embedding; they are scored from content alone, a path
that training teaches by dropping ID embeddings at random (`id_dropout`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

MODALITIES = ("id", "text", "image")


@dataclass
class BoNMFConfig:
    n_users: int
    n_items: int
    modalities: tuple[str, ...] = ("id",)
    gmf_dim: int = 64
    mlp_layers: tuple[int, ...] = (128, 64, 32)  # first entry = concatenated embedding width
    feature_dims: dict[str, int] = field(default_factory=dict)  # modality -> input width
    content_hidden: int = 256
    user_attribute_cardinalities: tuple[int, ...] = ()
    id_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.modalities = tuple(sorted(set(self.modalities), key=MODALITIES.index))
        self.mlp_layers = tuple(self.mlp_layers)
        self.user_attribute_cardinalities = tuple(self.user_attribute_cardinalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {self.modalities}")
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


def _content_projection(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class BoNMF(nn.Module):
    def __init__(self, config: BoNMFConfig, features: dict[str, torch.Tensor] | None = None,
                 user_attributes: torch.Tensor | None = None):
        super().__init__()
        self.config = c = config
        half = c.mlp_layers[0] // 2
        self.user_gmf = nn.Embedding(c.n_users, c.gmf_dim)
        self.user_mlp = nn.Embedding(c.n_users, half)
        self.user_attr = nn.ModuleList(nn.Embedding(n, c.gmf_dim + half)
                                       for n in c.user_attribute_cardinalities)
        if "id" in c.modalities:
            self.item_gmf = nn.Embedding(c.n_items, c.gmf_dim)
            self.item_mlp = nn.Embedding(c.n_items, half)
        self.content = nn.ModuleDict({m: _content_projection(c.feature_dims[m], c.content_hidden,
                                                             c.gmf_dim + half)
                                      for m in c.modalities if m != "id"})
        layers: list[nn.Module] = []
        for a, b in zip(c.mlp_layers[:-1], c.mlp_layers[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if c.dropout:
                layers.append(nn.Dropout(c.dropout))
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(c.gmf_dim + c.mlp_layers[-1], 1)

        # Data the model scores with but does not learn: content features, their presence
        # masks, user attributes and which items have trained ID embeddings.
        for m in self.content:
            feat = features[m].float() if features and m in features else None
            if feat is None or feat.shape != (c.n_items, c.feature_dims[m]):
                raise ValueError(f"feature matrix for '{m}' must be {c.n_items}×"
                                 f"{c.feature_dims[m]}")
            self.register_buffer(f"feat_{m}", feat)
        if c.user_attribute_cardinalities:
            if user_attributes is None or user_attributes.shape != (
                    c.n_users, len(c.user_attribute_cardinalities)):
                raise ValueError("user_attributes must be n_users × n_attributes codes")
            self.register_buffer("user_attributes", user_attributes.long())
        self.register_buffer("warm_items", torch.ones(c.n_items, dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in [self.user_gmf, self.user_mlp, *self.user_attr]:
            nn.init.normal_(emb.weight, std=0.01)
        if "id" in self.config.modalities:
            nn.init.normal_(self.item_gmf.weight, std=0.01)
            nn.init.normal_(self.item_mlp.weight, std=0.01)
        for mod in self.mlp:
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.kaiming_uniform_(self.out.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.out.bias)

    # -- representations -----------------------------------------------------------------
    def user_vectors(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gmf, mlp = self.user_gmf(users), self.user_mlp(users)
        if self.config.user_attribute_cardinalities:
            codes = self.user_attributes[users]
            extra = sum(emb(codes[:, j]) for j, emb in enumerate(self.user_attr))
            gmf = gmf + extra[:, :self.config.gmf_dim]
            mlp = mlp + extra[:, self.config.gmf_dim:]
        return gmf, mlp

    def item_vectors(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        gmf = mlp = None
        if "id" in c.modalities:
            # Cold items have untrained ID embeddings: score them from content alone.
            keep = self.warm_items[items]
            if self.training and c.id_dropout and self.content:
                keep = keep & (torch.rand(items.shape, device=items.device) >= c.id_dropout)
            keep = keep.unsqueeze(-1).to(self.item_gmf.weight.dtype)
            gmf, mlp = self.item_gmf(items) * keep, self.item_mlp(items) * keep
        for m, proj in self.content.items():
            v = proj(getattr(self, f"feat_{m}")[items])
            g, h = v[..., :c.gmf_dim], v[..., c.gmf_dim:]
            gmf = g if gmf is None else gmf + g
            mlp = h if mlp is None else mlp + h
        return gmf, mlp

    def _fuse(self, ug, um, ig, im) -> torch.Tensor:
        gmf = ug * ig
        mlp = self.mlp(torch.cat(torch.broadcast_tensors(um, im), dim=-1))
        return self.out(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits for (user, item) pairs."""
        ug, um = self.user_vectors(users)
        ig, im = self.item_vectors(items)
        return self._fuse(ug, um, ig, im)

    # -- scoring (the evaluation Scorer interface) ---------------------------------------
    @torch.inference_mode()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(users, items)

    @torch.inference_mode()
    def score_users(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item (or `items`) for each user: item vectors computed once."""
        items = torch.arange(self.config.n_items) if items is None else items
        ig, im = self.item_vectors(items)
        ug, um = self.user_vectors(users)
        # The first MLP layer is linear over [user ⊕ item]: split it to avoid building the
        # users × items × width concatenation.
        first = self.mlp[0]
        half = um.shape[1]
        hu = um @ first.weight[:, :half].T + first.bias
        hi = im @ first.weight[:, half:].T
        w_gmf, w_mlp = self.out.weight[0, :self.config.gmf_dim], self.out.weight[0, self.config.gmf_dim:]
        rest = self.mlp[1:]
        out = torch.empty(len(users), len(items))
        step = max(1, 2_000_000 // max(1, len(items)))
        for s in range(0, len(users), step):
            h = rest(hu[s:s + step, None, :] + hi[None, :, :])
            out[s:s + step] = ((ug[s:s + step] * w_gmf) @ ig.T + h @ w_mlp + self.out.bias)
        return out
