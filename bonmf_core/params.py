"""Hyper-parameters: one set of defaults, overridable by a `params.yaml` and by keyword.

The repository's `params.yaml` repeats these defaults so every entry point (CLI, benchmarks,
orchestration, DVC) reads one file. Unknown keys are refused, naming the key: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path

DEFAULT_PARAMS: dict = {
    "data": {
        "source": "demo",          # "demo", a MovieLens-1M directory, or a saved dataset dir
        "demo_seed": 0,
    },
    "protocol": {
        "name": "ncf",             # ncf | full | cold_items
        "seeds": [0],
        "ks": [10],
        "ncf_dir": None,           # canonical NCF test files; None = sample our own
        "order": "random",         # full protocol: random | temporal
        "cold_fraction": 0.2,      # cold_items protocol
    },
    "model": {
        "gmf_dim": 64,
        "mlp_layers": [128, 64, 32],
        "content_hidden": 256,
        "id_dropout": 0.3,         # only where content features exist
        "dropout": 0.0,
        "user_attributes": False,  # add user attribute embeddings where the dataset has them
    },
    "train": {
        "loss": "bce",
        "negatives": 4,
        "epochs": 30,
        "batch_size": 8192,
        "lr": 0.003,
        "weight_decay": 0.0,
        "embedding_reg": 0.001,    # L2 on each batch's user/item vectors
        "lr_decay": 0.8,           # learning rate × this after every epoch
        "patience": 3,
        "metric": "ndcg@10",
        "refit": True,             # after early stopping, retrain on train ∪ valid
    },
    "bpr": {
        "dim": 64,
        "negatives": 4,
        "epochs": 40,
        "batch_size": 8192,
        "lr": 0.01,
        "weight_decay": 0.0,
        "embedding_reg": 0.001,
        "lr_decay": 0.85,
        "patience": 3,
        "refit": True,
    },
}


def merge_params(base: dict, override: dict, where: str = "params") -> dict:
    """Deep-merge `override` into a copy of `base`, refusing keys `base` does not have."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in out:
            raise KeyError(f"{where}: unknown key '{key}' (known: {', '.join(out)})")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"{where}.{key} must be a mapping")
            out[key] = merge_params(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_params(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults ← `path` (YAML, if given) ← `overrides`."""
    import yaml

    params = copy.deepcopy(DEFAULT_PARAMS)
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        params = merge_params(params, loaded, where=str(path))
    return merge_params(params, overrides or {}, where="overrides")
