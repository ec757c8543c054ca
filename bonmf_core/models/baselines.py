"""Baselines every BoNMF result is measured against, through the same evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn


class Popularity:
    """Scores an item by its number of training interactions, the same for every user."""

    def __init__(self, n_items: int):
        self.counts = torch.zeros(n_items)

    def fit(self, train: pd.DataFrame) -> "Popularity":
        self.counts = torch.from_numpy(
            np.bincount(train["item"].to_numpy(), minlength=len(self.counts)).astype(np.float32))
        return self

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items]

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(len(users), -1)

    def score_profiles(self, users: torch.Tensor, profiles) -> torch.Tensor:
        """New users (`cold_users`): the same popularity for everyone, whatever they revealed."""
        return self.counts.expand(len(profiles), -1).clone()


class MatrixFactorization(nn.Module):
    """Dot-product MF with an item bias (BPR-MF when trained with the BPR loss)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.user.weight, std=0.01)
        nn.init.normal_(self.item.weight, std=0.01)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor, return_norms: bool = False):
        """Logits: users (B,) with items (B,) → (B,); with items (B, C) → (B, C)."""
        u, i = self.user(users), self.item(items)
        if items.dim() == 2:
            u = u.unsqueeze(1)
        logits = (u * i).sum(-1) + self.item_bias(items).squeeze(-1)
        if return_norms:
            return logits, u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean()
        return logits

    @torch.inference_mode()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(users, items)

    @torch.inference_mode()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user(users) @ self.item.weight.T + self.item_bias.weight.T


class ContentKNN:
    """Scores an item by its content similarity to the user's training history.

    Item vectors are the content embeddings (each modality L2-normalised, concatenated, so
    text and image weigh equally), the same encoder space BoNMF sees. A user's score for an item
    is the mean cosine similarity to the `neighbors` most similar history items (None = all of
    them, which is the dot product with the mean history vector). Works for cold items: it needs
    no interactions on the item itself.
    """

    def __init__(self, features: dict[str, np.ndarray], neighbors: int | None = None):
        parts = [f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
                 for _, f in sorted(features.items())]
        if not parts:
            raise ValueError("content_knn needs at least one content modality")
        self.vectors = torch.from_numpy(
            (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32))
        self.neighbors = neighbors
        self.similarity: torch.Tensor | None = None
        self.candidates: torch.Tensor | None = None

    def fit(self, train: pd.DataFrame) -> "ContentKNN":
        order = np.argsort(train["user"].to_numpy(), kind="stable")
        users = train["user"].to_numpy()[order]
        self.history = train["item"].to_numpy()[order]
        n_users = int(users.max()) + 1 if len(users) else 0
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users))])
        v = self.vectors
        sums = torch.zeros(n_users, v.shape[1])
        sums.index_add_(0, torch.from_numpy(users).long(), v[torch.from_numpy(self.history).long()])
        counts = torch.from_numpy(np.diff(self.indptr)).float().clamp(min=1).unsqueeze(1)
        self.profiles = sums / counts
        return self

    def restrict_to(self, items) -> "ContentKNN":
        """Score only these items on the top-k path (e.g. a protocol's cold candidates); the
        rest get -inf. Top-k over the whole catalog costs items × history per user."""
        self.candidates = None if items is None else torch.as_tensor(np.asarray(items)).long()
        self.similarity = None
        return self

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        if self.neighbors is None:
            return self.profiles[users] @ self.vectors.T
        cols = self.candidates if self.candidates is not None else torch.arange(len(self.vectors))
        if self.similarity is None:  # candidate × item cosine, once; per user a gather + top-k
            self.similarity = self.vectors[cols] @ self.vectors.T
        out = torch.full((len(users), len(self.vectors)), float("-inf"))
        for row, u in enumerate(users.tolist()):
            hist = torch.from_numpy(self.history[self.indptr[u]:self.indptr[u + 1]]).long()
            if len(hist) == 0:
                out[row, cols] = 0.0
                continue
            sims = self.similarity[:, hist]                          # candidates × history
            k = min(self.neighbors, len(hist))
            out[row, cols] = sims.topk(k, dim=1).values.mean(1) if k < len(hist) else sims.mean(1)
        return out

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if items.dim() == 1:
            return self.score_users(users).gather(1, items[:, None]).squeeze(1)
        if self.neighbors is None:  # (B, C): no need to score the whole catalog
            return torch.einsum("bd,bcd->bc", self.profiles[users], self.vectors[items])
        return self.score_users(users).gather(1, items)


class GenrePopularity:
    """Scores an item by the popularity of its genres: the mean, over the item's genres, of
    training interactions per item of that genre. The same for every user; a cold item gets
    its genres' popularity. Items without genres get the overall mean."""

    def __init__(self, genres: pd.Series):
        lists = genres.fillna("").astype(str).str.split("|")
        names = sorted({g for gs in lists for g in gs if g})
        if not names:
            raise ValueError("genre_pop needs a catalog with genres")
        index = {g: i for i, g in enumerate(names)}
        self.membership = np.zeros((len(genres), len(names)), np.float32)
        for row, gs in enumerate(lists):
            for g in gs:
                if g:
                    self.membership[row, index[g]] = 1.0
        self.scores = torch.zeros(len(genres))

    def fit(self, train: pd.DataFrame) -> "GenrePopularity":
        counts = np.bincount(train["item"].to_numpy(), minlength=len(self.membership))
        warm = (counts > 0).astype(np.float32)
        per_genre = (self.membership.T @ counts) / np.maximum(self.membership.T @ warm, 1.0)
        n_genres = self.membership.sum(1)
        score = (self.membership @ per_genre) / np.maximum(n_genres, 1.0)
        score[n_genres == 0] = counts[counts > 0].mean() if (counts > 0).any() else 0.0
        self.scores = torch.from_numpy(score.astype(np.float32))
        return self

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.scores[items]

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(len(users), -1)


def interaction_matrix(train: pd.DataFrame, n_users: int, n_items: int):
    """The binary user × item training matrix X (scipy CSR, float32; duplicates count once)."""
    import scipy.sparse as sp

    users, items = train["user"].to_numpy(), train["item"].to_numpy()
    x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                      shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def check_item_matrix_memory(variant: str, n_items: int, copies: int, itemsize: int,
                             limit_mb: float) -> float:
    """Refuse (ConfigError) a catalog whose dense item × item matrices would exceed the limit;
    → the estimate in MB. `copies` matrices of `itemsize` bytes live at the peak."""
    from bonmf_core.errors import ConfigError

    need_mb = copies * itemsize * float(n_items) ** 2 / 2**20
    if need_mb > limit_mb:
        raise ConfigError(
            f"{variant}: {n_items} items need dense {n_items} × {n_items} item matrices of "
            f"~{need_mb:,.0f} MB, above {variant}.max_memory_mb = {limit_mb:,.0f} MB; raise "
            f"the limit or use another baseline")
    return need_mb


class _ItemItemScorer:
    """A user's score for item j is Σ over the user's training items i of W[i, j] (X · W).

    Vectorized over the whole score matrix: one sparse × dense product per block of users.
    An item without training interactions (a cold item) has an all-zero column: it scores 0
    for every user, so under `cold_items` it ranks nowhere (ties count against the positive).
    """

    weights: torch.Tensor      # item × item, float32
    x = None                   # scipy CSR user × item

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        rows = self.x[users.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows @ self.weights.numpy(), dtype=np.float32))

    def score_profiles(self, users: torch.Tensor, profiles) -> torch.Tensor:
        """Users never trained on (`cold_users`): the same X · W with X the items each one
        revealed, so item_knn scores a new user from their revealed items' neighbours."""
        revealed = pd.DataFrame({
            "user": np.repeat(np.arange(len(profiles)), [len(p) for p in profiles]),
            "item": np.concatenate([np.asarray(p, np.int64) for p in profiles])})
        x = interaction_matrix(revealed, len(profiles), self.weights.shape[0])
        return torch.from_numpy(np.asarray(x @ self.weights.numpy(), dtype=np.float32))

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        scores = self.score_users(users)
        if items.dim() == 1:
            return scores.gather(1, items[:, None]).squeeze(1)
        return scores.gather(1, items)

    def compact(self):
        """Drop what only fitting needed (the matrices a hyper-parameter search shares);
        scoring needs X and W alone."""
        return self


class EASE(_ItemItemScorer):
    """EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): the closed-form item-item
    model B = I − P · diag(1/diag(P)), P = (XᵀX + λI)⁻¹, so diag(B) = 0, with X the binary
    user × item training matrix. The Gram matrix and its inverse are float64 (a Cholesky
    inverse: XᵀX + λI is positive definite for λ > 0); B is kept in float32."""

    def __init__(self, n_users: int, n_items: int, lam: float, max_memory_mb: float = 4096.0):
        if lam <= 0:
            raise ValueError(f"EASE needs λ > 0, got {lam}")
        # at the peak: three float64 item × item matrices (Gram, λ-shifted copy or inverse,
        # Cholesky factor) + float32 B, counted as four float64 ones
        check_item_matrix_memory("ease", n_items, 4, 8, max_memory_mb)
        self.n_users, self.n_items, self.lam = n_users, n_items, float(lam)
        self.gram: torch.Tensor | None = None

    def fit(self, train: pd.DataFrame, gram: torch.Tensor | None = None) -> "EASE":
        """`gram`: XᵀX of this `train` already computed (the λ search shares it)."""
        self.x = interaction_matrix(train, self.n_users, self.n_items)
        g = gram if gram is not None else gram_matrix(self.x)
        a = g.clone()
        a.diagonal().add_(self.lam)
        chol = torch.linalg.cholesky(a)
        del a
        p = torch.cholesky_inverse(chol)
        del chol
        p.div_(-p.diagonal().clone().unsqueeze(0))    # B[i, j] = −P[i, j] / P[j, j], i ≠ j
        p.diagonal().zero_()                          # I − P·diag(1/diag P): diagonal 0
        self.weights = p.float().contiguous()   # row-major: X · B without a copy per block
        self.gram = g
        return self

    def compact(self) -> "EASE":
        self.gram = None
        return self


def gram_matrix(x) -> torch.Tensor:
    """XᵀX (item co-occurrence counts) of a sparse binary matrix → dense float64 tensor."""
    return torch.from_numpy(np.ascontiguousarray((x.T @ x).toarray(), dtype=np.float64))


class ItemKNN(_ItemItemScorer):
    """Item-item collaborative filtering: W[i, j] = cosine of items i and j over the binary
    training interactions (|U_i ∩ U_j| / √(|U_i| |U_j|)), W[i, i] = 0. With `neighbors` = k,
    each item j keeps only its k most similar items (the top k of column j); None = all.
    A user scores item j by Σ over their training items i of W[i, j]."""

    def __init__(self, n_users: int, n_items: int, neighbors: int | None = None,
                 max_memory_mb: float = 4096.0):
        if neighbors is not None and neighbors < 1:
            raise ValueError(f"item_knn neighbours must be >= 1 or None, got {neighbors}")
        # at the peak: the float64 co-occurrence matrix, the float32 similarity and its pruned
        # copy, counted as three float64 ones
        check_item_matrix_memory("item_knn", n_items, 3, 8, max_memory_mb)
        self.n_users, self.n_items, self.neighbors = n_users, n_items, neighbors
        self.similarity: torch.Tensor | None = None

    def fit(self, train: pd.DataFrame, similarity: torch.Tensor | None = None) -> "ItemKNN":
        """`similarity`: this `train`'s full cosine matrix already computed (the search over
        neighbour counts shares it)."""
        self.x = interaction_matrix(train, self.n_users, self.n_items)
        sim = similarity if similarity is not None else cosine_similarity(self.x)
        self.similarity = sim
        self.weights = sim if self.neighbors is None else top_k_columns(sim, self.neighbors)
        return self

    def compact(self) -> "ItemKNN":
        self.similarity = None
        return self


def cosine_similarity(x) -> torch.Tensor:
    """Item × item cosine of the columns of a sparse binary matrix, diagonal 0 (float32)."""
    sim = gram_matrix(x)                                  # |U_i ∩ U_j|
    norms = sim.diagonal().sqrt().clamp(min=1e-12)        # √|U_i|; an unseen item's column is 0
    sim.div_(norms.unsqueeze(1)).div_(norms.unsqueeze(0))
    sim.diagonal().zero_()
    return sim.float().contiguous()


def top_k_columns(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each column's k largest entries (its item's k nearest neighbours), zero the rest."""
    if k >= sim.shape[0]:
        return sim
    values, index = sim.topk(k, dim=0)
    return torch.zeros_like(sim).scatter_(0, index, values)


class BiasedMF(nn.Module):
    """The `mf` baseline: score(u, i) = <p_u, q_i> + b_u + b_i + b, trained with the logistic
    loss over each positive and sampled negatives (the shared trainer, `loss="bce"`).

    The recipe of Rendle, Krichene, Zhang, Anderson 2020 ("Neural Collaborative Filtering vs.
    Matrix Factorization Revisited"; google-research `dot_vs_learned_similarity/mf_simple.py`):
    embeddings drawn from N(0, 0.1²) whatever the dimension, biases 0, and L2 `reg` on the
    user's and item's embedding and biases in every training pair (their SGD step
    v += lr·(g·w − reg·v), i.e. a reg/2·‖v‖² term per pair). `return_norms` gives that term per
    pair (the mean over the batch's pairs of ½(‖p_u‖² + ‖q_i‖² + b_u² + b_i²)), which the
    trainer multiplies by `embedding_reg` (= `mf.l2`).
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.1):
        super().__init__()
        self.dim = dim
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor, return_norms: bool = False):
        """Logits: users (B,) with items (B,) → (B,); with items (B, C) → (B, C)."""
        u, i = self.user(users), self.item(items)
        bu, bi = self.user_bias(users).squeeze(-1), self.item_bias(items).squeeze(-1)
        if items.dim() == 2:
            u, bu = u.unsqueeze(1), bu.unsqueeze(1)
        logits = (u * i).sum(-1) + bu + bi + self.bias
        if return_norms:   # per pair: every pair of a row shares its user
            return logits, 0.5 * (u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean()
                                  + bu.pow(2).mean() + bi.pow(2).mean())
        return logits

    @torch.inference_mode()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(users, items)

    @torch.inference_mode()
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return (self.user(users) @ self.item.weight.T + self.user_bias(users)
                + self.item_bias.weight.T + self.bias)
