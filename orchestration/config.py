"""Run configuration: typed `dg.Config` per asset, defaults read from the repo's params.yaml.

Each config exposes the knobs a person tunes from the launchpad; every other hyper-parameter
comes from the params file (`ParamsResource`). `params_with(config, params)` overlays a config
on the params dict the library takes; `run_config_from_params(params)` goes the other way, so
the CLI can run the graph with any params file and overrides.
"""

from __future__ import annotations

import copy
import os

import dagster as dg

from bonmf_core.params import load_params

from .resources import REPO_PARAMS

# BONMF_PARAMS (the file `ParamsResource` reads in the UI) or the repo's params.yaml.
DEFAULTS = load_params(os.environ.get("BONMF_PARAMS")
                       or (REPO_PARAMS if REPO_PARAMS.exists() else None))
_D, _P, _T, _B = DEFAULTS["data"], DEFAULTS["protocol"], DEFAULTS["train"], DEFAULTS["bpr"]
_E, _G, _X = DEFAULTS["encoders"], DEFAULTS["promotion"], DEFAULTS["pipeline"]
_V = DEFAULTS["dvc"]


class SnapshotConfig(dg.Config):
    """Where the data comes from: 'demo', a MovieLens-1M directory or a saved dataset."""

    source: str = _D["source"]
    demo_seed: int = _D["demo_seed"]
    demo_users: int = _D["demo_users"]
    demo_items: int = _D["demo_items"]

    def apply(self, params: dict) -> dict:
        params["data"].update(source=self.source, demo_seed=self.demo_seed,
                              demo_users=self.demo_users, demo_items=self.demo_items)
        return params


class EncodingConfig(dg.Config):
    """Catalog encoders: `pretrained` (MiniLM text, EfficientNet-Lite0 images, through the
    embedding cache) or `basic` (weight-free featurizers)."""

    encoder_source: str = _E["source"]
    text_model: str = _E["text_model"]
    image_model: str = _E["image_model"]
    image_weights: str = _E["image_weights"]
    device: str = _E["device"]
    precision: str = _E["precision"]

    def apply(self, params: dict) -> dict:
        params["encoders"].update(source=self.encoder_source, text_model=self.text_model,
                                  image_model=self.image_model, image_weights=self.image_weights,
                                  device=self.device, precision=self.precision)
        return params


class SplitConfig(dg.Config):
    """Evaluation protocol: ncf (leave-one-out, 99 sampled negatives) | full | cold_items."""

    protocol: str = _P["name"]
    seeds: list[int] = list(_P["seeds"])
    ks: list[int] = list(_P["ks"])
    ncf_dir: str | None = _P["ncf_dir"]
    order: str = _P["order"]
    cold_fraction: float = _P["cold_fraction"]

    def apply(self, params: dict) -> dict:
        params["protocol"].update(name=self.protocol, seeds=list(self.seeds), ks=list(self.ks),
                                  ncf_dir=self.ncf_dir, order=self.order,
                                  cold_fraction=self.cold_fraction)
        return params


class CandidateConfig(dg.Config):
    """BoNMF variants to train (the best on the primary metric is the candidate; the others
    are its ablation) and the training knobs most often tuned."""

    variants: list[str] = list(_X["candidates"])
    epochs: int = _T["epochs"]
    batch_size: int = _T["batch_size"]
    lr: float = _T["lr"]
    negatives: int = _T["negatives"]
    patience: int = _T["patience"]
    loss: str = _T["loss"]
    metric: str = _T["metric"]

    def apply(self, params: dict) -> dict:
        params["pipeline"]["candidates"] = list(self.variants)
        params["train"].update(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                               negatives=self.negatives, patience=self.patience, loss=self.loss,
                               metric=self.metric)
        return params


class BaselineConfig(dg.Config):
    """The baselines the candidate must beat (pop, bpr, genre_pop, content_knn)."""

    variants: list[str] = list(_X["baselines"])
    bpr_epochs: int = _B["epochs"]
    metric: str = _T["metric"]

    def apply(self, params: dict) -> dict:
        params["pipeline"]["baselines"] = list(self.variants)
        params["bpr"]["epochs"] = self.bpr_epochs
        params["train"]["metric"] = self.metric
        return params


class PromotionConfig(dg.Config):
    """The gate: absolute floors, margin over production, optional forced promotion."""

    primary_metric: str = _G["primary_metric"]
    min_improvement: float = _G["min_improvement"]
    floors: dict[str, float] = dict(_G["floors"])
    beat_baselines: bool = _G["beat_baselines"]
    force: bool = False
    forced_by: str | None = None

    def apply(self, params: dict) -> dict:
        params["promotion"].update(primary_metric=self.primary_metric,
                                   min_improvement=self.min_improvement,
                                   floors=dict(self.floors), beat_baselines=self.beat_baselines)
        return params


class VersioningConfig(dg.Config):
    """After a promotion: track the production model and its dataset with DVC, push them to
    the remote and commit the pointer files (params.yaml `dvc`)."""

    push_after_promotion: bool = _V["push_after_promotion"]
    remote: str | None = _V["remote"]
    remote_name: str = _V["remote_name"]
    repo: str | None = _V["repo"]
    git_commit: bool = _V["git_commit"]
    lock_timeout_s: float = _V["lock_timeout_s"]

    def apply(self, params: dict) -> dict:
        params["dvc"].update(push_after_promotion=self.push_after_promotion,
                             remote=self.remote, remote_name=self.remote_name, repo=self.repo,
                             git_commit=self.git_commit, lock_timeout_s=self.lock_timeout_s)
        return params


def params_with(config: dg.Config, params: dict) -> dict:
    """A copy of `params` with `config`'s fields applied."""
    return config.apply(copy.deepcopy(params))


def run_config_from_params(params: dict, force: bool = False,
                           forced_by: str | None = None) -> dict:
    """The run config that makes every asset use `params` (a full params dict)."""
    d, p, t, e, g, x = (params[k] for k in ("data", "protocol", "train", "encoders",
                                              "promotion", "pipeline"))
    encoding = {"encoder_source": e["source"], "text_model": e["text_model"],
                "image_model": e["image_model"], "image_weights": str(e["image_weights"]),
                "device": e["device"], "precision": e["precision"]}
    ops = {
        "dataset_snapshot": {"source": str(d["source"]), "demo_seed": d["demo_seed"],
                             "demo_users": d["demo_users"], "demo_items": d["demo_items"]},
        "text_embeddings": encoding,
        "image_embeddings": dict(encoding),
        "bento_package": dict(encoding),
        "splits": {"protocol": p["name"], "seeds": list(p["seeds"]), "ks": list(p["ks"]),
                   "ncf_dir": p["ncf_dir"], "order": p["order"],
                   "cold_fraction": float(p["cold_fraction"])},
        "bonmf_candidate": {"variants": list(x["candidates"]), "epochs": t["epochs"],
                            "batch_size": t["batch_size"], "lr": float(t["lr"]),
                            "negatives": t["negatives"], "patience": t["patience"],
                            "loss": t["loss"], "metric": t["metric"]},
        "baselines": {"variants": list(x["baselines"]), "bpr_epochs": params["bpr"]["epochs"],
                      "metric": t["metric"]},
        "promotion_decision": {"primary_metric": g["primary_metric"],
                               "min_improvement": float(g["min_improvement"]),
                               "floors": {k: float(v) for k, v in g["floors"].items()},
                               "beat_baselines": bool(g["beat_baselines"]),
                               "force": bool(force), "forced_by": forced_by},
        "versioned_artifacts": {k: params["dvc"][k] for k in VersioningConfig.model_fields},
    }
    return {"ops": {name: {"config": cfg} for name, cfg in ops.items()}}
