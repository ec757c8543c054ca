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
        "demo_users": 3000,
        "demo_items": 1000,
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
        "content_dim": 128,        # PCA width of each content modality before its projection
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
    "encoders": {
        "source": "pretrained",    # pretrained (transformer + vision model) | basic (weight-free)
        "store_url": None,         # metadata store (embedding cache); None = SQLite in state dir
        "text_model": "default",   # default = offline MiniLM; or a hub name / local folder
        "text_max_length": 128,
        "text_fields": ["title", "genres", "overview", "keywords"],
        "text_separator": " | ",
        "image_model": "efficientnet_lite0",
        "image_weights": "default",  # default (packaged, lite0 only) | hub | path to a file
        "device": "auto",          # auto = CUDA when present, else CPU
        "precision": "auto",       # auto = fp16 on CUDA, bf16 on a CPU with native bf16
        "batch_size": None,
        "image_workers": None,
        "write_chunk": 256,
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
    # -- orchestration (orchestration/, `bonmf run`) --------------------------------------
    "pipeline": {
        "candidates": ["id", "text+image"],  # BoNMF variants; the best one is the candidate
        "baselines": ["pop", "bpr"],       # it must beat these (promotion.beat_baselines)
    },
    "checks": {                            # data_checks.CheckThresholds, + data_docs
        "rating_scale": None,              # None = the scale the source declares
        "min_interactions_per_user": 1,
        "timestamp_min": 788918400,        # 1995-01-01 UTC
        "timestamp_max_slack_days": 1.0,
        "text_coverage_min": 0.5,
        "readable_image_min": 0.9,
        "max_rating_mean_shift": 0.25,
        "max_new_item_share": 0.2,
        "max_new_user_share": 0.2,
        "max_volume_change": 0.5,
        "data_docs": False,                # build a GX Data Docs site under the state dir
    },
    "promotion": {
        "primary_metric": "ndcg@10",
        "min_improvement": 0.001,          # absolute margin over the production model
        "floors": {"hr@10": 0.2, "ndcg@10": 0.1},
        "beat_baselines": True,
    },
    "retrain": {
        "cron": "0 3 * * 1",               # weekly, Monday 03:00
        "timezone": "UTC",
        "sensor_interval_s": 300,          # how often the new-data sensor looks at the source
    },
    # -- packaging and serving (bentos/, `bonmf package`) ----------------------------------
    "serving": {
        "bento_name": "bonmf",             # BentoML model and Bento name
        "max_k": 1000,                     # largest k a request may ask for
        "max_liked_items": 1000,           # recommend_for_items: ids per request
        "max_text_chars": 20000,           # score_new_item: title + text
        "max_image_bytes": 10485760,       # score_new_item: image upload (10 MiB)
    },
    # -- data and model versioning (dvc.yaml, DVC after promotion) -------------------------
    "dvc": {
        "remote": None,                    # None = <state dir>/dvc-remote; or s3://…, ssh://…
        "remote_name": "storage",
        "push_after_promotion": True,      # track, push and commit each promoted version
        "repo": None,                      # None = the git repo holding the state folder
        "git_commit": True,                # commit the pointer files (promoted/*.dvc)
        "lock_timeout_s": 600,             # wait this long for another DVC operation
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
