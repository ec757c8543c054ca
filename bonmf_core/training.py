"""Training: vectorized negative sampling, BCE (NCF recipe) or BPR, early stopping, checkpoints."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonmf_core import distributed
from bonmf_core.atomic import atomic_file
from bonmf_core.config import TrainConfig
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.data.splits import Split

log = logging.getLogger(__name__)


MIN_STEPS, MIN_BATCH = 64, 512


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    seconds: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)
    refit: dict | None = None
    world_size: int = 1


class NegativeSampler:
    """Uniform negatives among `candidates`, never one of the user's training positives.

    Vectorized: draw all at once, then redraw only the collisions until none is left.
    Positives are looked up in a dense bitmap when users × items is small enough (ML-1M:
    22 MB), else by binary search over sorted pair keys.
    """

    DENSE_LIMIT = 200_000_000

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                 candidates: np.ndarray, generator: torch.Generator):
        self.n_items = n_items
        keys = torch.from_numpy(np.unique(users.astype(np.int64) * n_items + items))
        if n_users * n_items <= self.DENSE_LIMIT:
            self.dense = torch.zeros(n_users * n_items, dtype=torch.bool)
            self.dense[keys] = True
        else:
            self.dense, self.keys = None, keys
        self.candidates = torch.from_numpy(candidates.astype(np.int64))
        self.gen = generator

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.n_items + items
        if self.dense is not None:
            return self.dense[keys]
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == keys

    def _draw(self, n: int) -> torch.Tensor:
        return self.candidates[torch.randint(len(self.candidates), (n,), generator=self.gen)]

    def sample(self, users: torch.Tensor) -> torch.Tensor:
        items = self._draw(len(users))
        todo = torch.nonzero(self.is_positive(users, items)).squeeze(1)
        for _ in range(1000):
            if len(todo) == 0:
                return items
            items[todo] = self._draw(len(todo))
            todo = todo[self.is_positive(users[todo], items[todo])]
        raise ValueError("could not sample negatives: some user interacted with (almost) "
                         "every candidate item")


def _set_seed(seed: int) -> torch.Generator:
    # Dropout masks and ID dropout: a different stream on each rank (the same as before on rank
    # 0 and in one process). Shuffling and negatives: the same stream on every rank, so all
    # ranks draw the same epoch of training pairs and each takes its own shard of every batch.
    torch.manual_seed(distributed.rank_seed(seed))
    return torch.Generator().manual_seed(seed)


def train(model: nn.Module, split: Split, cfg: TrainConfig, *, seed: int = 0,
          checkpoint_dir: str | Path | None = None, validate: bool = True) -> TrainResult:
    """Fit `model` on `split.train`, early-stopping on `split.valid` by `cfg.metric`; keeps the
    best weights (also written to `checkpoint_dir` when given)."""
    gen = _set_seed(seed)
    # Denormal floats slow CPU training ~1.7× after a few epochs; flushing them changes no metric.
    torch.set_flush_denormal(True)
    users = split.train["user"].to_numpy()
    items = split.train["item"].to_numpy()
    warm = split.warm_items()
    if hasattr(model, "warm_items"):
        model.warm_items.copy_(torch.from_numpy(warm))
    if hasattr(model, "warm_users"):
        model.warm_users.copy_(torch.from_numpy(split.warm_users()))
    # Negatives come from items seen in training only: sampling held-out (cold) items as
    # negatives would teach the model that they are bad for everyone.
    sampler = NegativeSampler(users, items, split.n_users, split.n_items, np.flatnonzero(warm), gen)
    u_pos, i_pos = torch.tensor(users, dtype=torch.long), torch.tensor(items, dtype=torch.long)
    optimizers = _optimizers(model, cfg)
    validate = validate and len(split.valid) > 0
    # Several ranks (torchrun): gradients all-reduced by DDP; rank 0 validates and saves.
    net = distributed.wrap(model) if distributed.init() else model

    best_state, best_metric, best_epoch, stale = None, -math.inf, 0, 0
    history, samples, train_seconds = [], 0, 0.0
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        run_epoch = _run_epoch_sharded if net is not model else _run_epoch
        loss_sum, n_samples = run_epoch(net, optimizers, sampler, u_pos, i_pos, cfg, gen)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] *= cfg.lr_decay
        seconds = time.perf_counter() - t0
        samples += n_samples
        train_seconds += seconds
        record = {"epoch": epoch, "loss": loss_sum, "train_s": round(seconds, 3),
                  "samples_per_s": n_samples / seconds}
        if validate:
            model.eval()
            record["valid"] = distributed.on_main(
                lambda: evaluate(model, split, "valid", ks=(cfg.metric_k,)))
            metric = record["valid"][cfg.metric]
            if metric > best_metric:
                best_metric, best_epoch, stale = metric, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                _checkpoint(model, cfg, record, checkpoint_dir, seed)
            else:
                stale += 1
        history.append(record)
        log.debug("epoch %d/%d loss %.4f%s %.2fM samples/s %.1fs", epoch, cfg.epochs, loss_sum,
                 f" valid {cfg.metric} {record['valid'][cfg.metric]:.4f}" if validate else "",
                 record["samples_per_s"] / 1e6, seconds)
        if validate and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
        _checkpoint(model, cfg, history[-1] if history else {}, checkpoint_dir, seed)
    model.eval()
    return TrainResult(best_epoch=best_epoch, best_metric=best_metric if validate else float("nan"),
                       epochs_run=epoch, seconds=train_seconds,
                       samples_per_s=samples / max(train_seconds, 1e-9), history=history,
                       world_size=distributed.world_size())


def train_with_refit(build: Callable[[], nn.Module], split: Split, cfg: TrainConfig, *,
                     seed: int = 0, first: tuple[nn.Module, TrainResult] | None = None
                     ) -> tuple[nn.Module, TrainResult]:
    """Early-stop on `split.valid`, then (with `cfg.refit`) train a fresh model on train ∪ valid
    for the selected number of epochs, same seed.

    Under leave-one-out the validation interaction is each user's second latest — the most
    informative for predicting the latest; holding it out of the final model costs ~0.015
    HR@10 on ML-1M. The test set is never seen by either stage.
    `first`: the (model, result) of the first stage, already run by the caller with this
    `build`, split, cfg and seed (a search over builds that kept the best); only the refit is left.
    """
    if first is None:
        torch.manual_seed(seed)  # the initial weights are part of the seeded run
        model = build()
        result = train(model, split, cfg, seed=seed)
    else:
        model, result = first
    if not cfg.refit or len(split.valid) == 0:
        return model, result
    merged = replace(split, train=pd.concat([split.train, split.valid], ignore_index=True),
                     valid=split.valid.iloc[:0], valid_negatives=None)
    if cfg.refit == "continue":
        # One more epoch of the early-stopped model on train ∪ valid at the learning rate it
        # stopped with: the validation interactions are learned without training again.
        final, schedule = model, {"epochs": 1, "lr": cfg.lr * cfg.lr_decay ** result.best_epoch}
    else:
        torch.manual_seed(seed)
        final, schedule = build(), {"epochs": result.best_epoch}
    second = train(final, merged, cfg.model_copy(update=schedule), seed=seed + 1_000_003
                   if cfg.refit == "continue" else seed, validate=False)
    result.refit = {"mode": "continue" if cfg.refit == "continue" else "retrain",
                    "epochs": second.epochs_run, "seconds": second.seconds,
                    "train_pairs": len(merged.train)}
    result.seconds += second.seconds
    return final, result


def _optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """`cfg.optimizer`, stepped together.

    Under sgd the learning rate is per training pair: `_loss_scale` turns the batch's mean loss
    into its sum, so a step of B pairs moves each embedding row as B per-example SGD steps
    would (to first order) whatever the batch size. That holds for the embedding tables and the
    global bias only: a layer every item shares (a content projection, the MLP) would sum all B
    pair gradients into one step and blow up (ML-1M: training loss 1.1 against 0.2), so those
    layers take Adam at the same rate, which the summed loss does not rescale.
    """
    kind, params = cfg.optimizer, list(model.parameters())
    if kind == "adam":
        return [torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)]
    if kind == "adagrad":
        return [torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if kind != "sgd":
        raise ValueError(f"unknown optimizer {kind!r}")
    rows = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)}
    per_pair, shared = [], []
    for p in params:
        (per_pair if id(p) in rows or p.dim() == 0 else shared).append(p)
    optimizers = [torch.optim.SGD(per_pair, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if shared:
        optimizers.append(torch.optim.Adam(shared, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True))
    return optimizers


def _run_epoch(model, optimizers, sampler, u_pos, i_pos, cfg, gen) -> tuple[float, int]:
    """One pass over the positives, each with `negatives` fresh negatives.

    A positive and its negatives form one row of a (groups × 1+negatives) item matrix scored
    against one user lookup. BCE labels column 0 as 1 and the rest 0 (the NCF recipe); BPR
    pushes column 0 above each negative.
    """
    users, items, labels, groups = _epoch_pairs(sampler, u_pos, i_pos, cfg, gen)
    total = 0.0
    for s in range(0, len(users), groups):
        batch = items[s:s + groups]
        total += _train_step(model, optimizers, users[s:s + groups], batch, labels, cfg,
                             pairs=batch.numel()) * len(batch)
    return total / len(users), len(users) * items.shape[1]


def _run_epoch_sharded(ddp, optimizers, sampler, u_pos, i_pos, cfg, gen) -> tuple[float, int]:
    """`_run_epoch` over W ranks: the same epoch of pairs and the same global batches; each rank
    scores its 1/W of every batch, and DDP averages the gradients.

    Weighting each shard's mean loss by its share of the batch (× W, since DDP divides by W)
    makes the averaged gradient that of the whole batch's mean loss, as in one process. A last
    batch with fewer rows than ranks is dropped (no rank may step on an empty shard).
    → (the epoch's mean loss over all ranks, samples of all ranks).
    """
    users, items, labels, groups = _epoch_pairs(sampler, u_pos, i_pos, cfg, gen)
    rank, size = distributed.rank(), distributed.world_size()
    total, done = 0.0, 0
    for s in range(0, len(users), groups):
        n = min(groups, len(users) - s)
        if n < size:
            break
        lo, hi = s + n * rank // size, s + n * (rank + 1) // size
        total += _train_step(ddp, optimizers, users[lo:hi], items[lo:hi], labels, cfg,
                             pairs=n * items.shape[1], weight=(hi - lo) * size / n) * (hi - lo)
        done += n
    return distributed.all_reduce_sum(total) / done, done * items.shape[1]


def _train_step(model, optimizers, users, items, labels, cfg, *, pairs: int,
                weight: float = 1.0) -> float:
    """One step of every optimizer on the batch's mean loss × `weight` × `_loss_scale` (`pairs`
    is the whole batch's pair count, a DDP shard's too) → the unweighted mean loss."""
    loss = _loss(model, users, items, labels, cfg)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    (loss * (weight * _loss_scale(cfg, pairs))).backward()
    for opt in optimizers:
        opt.step()
    return loss.item()


def _loss_scale(cfg: TrainConfig, pairs: int) -> float:
    """What the batch's mean loss is multiplied by before backward: its pair count under sgd
    (a learning rate per training pair), else 1."""
    return float(pairs) if cfg.optimizer == "sgd" else 1.0


def _epoch_pairs(sampler, u_pos, i_pos, cfg, gen):
    """The epoch's training rows, shuffled: (users, items = [positive | negatives], BCE labels of
    a row, positives per batch)."""
    order = torch.randperm(len(u_pos), generator=gen)
    users = u_pos[order]
    negatives = sampler.sample(users.repeat_interleave(cfg.negatives)).view(-1, cfg.negatives)
    items = torch.cat([i_pos[order, None], negatives], dim=1)
    width = items.shape[1]
    labels = torch.zeros(1, width)
    labels[0, 0] = 1.0
    # A small dataset gets smaller batches, so an epoch still makes >= MIN_STEPS optimizer steps:
    # at batch 8192 a 25k-interaction catalog took 15 steps an epoch and its content path
    # barely learned (cold recall at chance); ML-1M-sized data is unaffected.
    groups = max(1, min(cfg.batch_size, max(MIN_BATCH, len(users) * width // MIN_STEPS)) // width)
    return users, items, labels, groups


def _loss(model, users, items, labels, cfg) -> torch.Tensor:
    """A batch's mean loss. BCE labels column 0 as 1 and the rest 0 (the NCF recipe); BPR
    pushes column 0 above each negative; softmax is the cross-entropy of column 0 among its
    row (a sampled softmax: the positive against its negatives, a ranking loss per user)."""
    logits, norms = model(users, items, return_norms=True)
    if cfg.loss == "bce":
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.expand_as(logits))
    elif cfg.loss == "softmax":
        loss = nn.functional.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))
    else:
        loss = -nn.functional.logsigmoid(logits[:, :1] - logits[:, 1:]).mean()
    if cfg.embedding_reg:
        loss = loss + cfg.embedding_reg * norms
    return loss


def _checkpoint(model: nn.Module, cfg: TrainConfig, record: dict, checkpoint_dir, seed: int
                ) -> None:
    """Write the best weights so far (safetensors) and the epoch's record, atomically (rank 0
    only: every rank holds the same weights)."""
    if not checkpoint_dir or not distributed.is_main():
        return
    from safetensors.torch import save_file

    folder = Path(checkpoint_dir)
    with atomic_file(folder / "best.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_file(folder / "best.json") as tmp:
        tmp.write_text(json.dumps({"train_config": cfg.model_dump(), "seed": seed,
                                   "record": record}, default=float))
