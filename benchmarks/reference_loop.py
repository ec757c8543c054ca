"""The reference for training speed: a plain PyTorch NeuMF loop of the same architecture.

    python benchmarks/reference_loop.py --data ../shared/datasets/ml-1m --epochs 2 --out FILE.json

What a practitioner would write from the NCF paper (He et al. 2017), nothing tuned: separate GMF
and MLP embedding tables (GMF 64; MLP 64 + 64 → 128-64-32), one linear prediction layer, every
training pair plus 4 uniform negatives per positive (drawn with `torch.randint`, no check against
the user's positives) shuffled into rows of (user, item, label), batches of 8192 rows, BCE with
logits, `torch.optim.Adam`; denormals flushed and 2 torch threads, as `bonmf_core.training`.
`benchmarks/train_throughput.py --reference` runs it beside BoNMF in one process, so the ratio
is measured on one machine at one time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PlainNeuMF(nn.Module):
    def __init__(self, n_users: int, n_items: int, gmf_dim: int = 64,
                 mlp_layers: tuple[int, ...] = (128, 64, 32)):
        super().__init__()
        half = mlp_layers[0] // 2
        self.user_gmf, self.item_gmf = nn.Embedding(n_users, gmf_dim), nn.Embedding(n_items, gmf_dim)
        self.user_mlp, self.item_mlp = nn.Embedding(n_users, half), nn.Embedding(n_items, half)
        layers: list[nn.Module] = []
        for a, b in zip(mlp_layers[:-1], mlp_layers[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(gmf_dim + mlp_layers[-1], 1)
        for emb in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(emb.weight, std=0.01)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.user_gmf(users) * self.item_gmf(items)
        mlp = self.mlp(torch.cat([self.user_mlp(users), self.item_mlp(items)], -1))
        return self.out(torch.cat([gmf, mlp], -1)).squeeze(-1)


def run_reference(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, *,
                  epochs: int = 2, batch_size: int = 8192, negatives: int = 4, lr: float = 0.001,
                  seed: int = 0, threads: int = 2) -> dict:
    """Train `PlainNeuMF` on the (user, item) positives → {samples_per_s, epoch_s, ...}."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    model = PlainNeuMF(n_users, n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    u_pos = torch.from_numpy(users.astype(np.int64))
    i_pos = torch.from_numpy(items.astype(np.int64))
    epoch_s = []
    samples = 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        u = torch.cat([u_pos, u_pos.repeat(negatives)])
        i = torch.cat([i_pos, torch.randint(n_items, (len(u_pos) * negatives,))])
        y = torch.cat([torch.ones(len(u_pos)), torch.zeros(len(u_pos) * negatives)])
        order = torch.randperm(len(u))
        u, i, y = u[order], i[order], y[order]
        for s in range(0, len(u), batch_size):
            loss = loss_fn(model(u[s:s + batch_size], i[s:s + batch_size]), y[s:s + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - t0)
        samples += len(u)
    return {"samples_per_s": samples / sum(epoch_s), "epoch_s": sum(epoch_s) / len(epoch_s),
            "epochs": epochs, "batch_size": batch_size, "negatives": negatives,
            "threads": threads, "final_loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="demo | a dataset directory (default: data.source)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from bonmf_core.atomic import write_json
    from bonmf_core.config import load_config
    from bonmf_core.data.readers import load_dataset
    from bonmf_core.data.splits import leave_one_out_split

    cfg = load_config(flags={"data": {"source": args.data}} if args.data else None)
    dataset = load_dataset(cfg.data)
    train = leave_one_out_split(dataset, seed=0).train
    out = {"data": dataset.name, **run_reference(train["user"].to_numpy(),
                                                  train["item"].to_numpy(), dataset.n_users,
                                                  dataset.n_items, epochs=args.epochs)}
    print(json.dumps(out, indent=2))
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
