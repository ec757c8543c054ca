"""The library side of the orchestrated pipeline: cached fits, aggregation, the report.

`fit_cached` trains one (variant, seed) on one split and evaluates it, keyed by everything that
determines the result (dataset hash, split, content features, hyper-parameters, variant, seed):
an unchanged re-run finds the saved model and metrics and skips training. No Dagster here;
`orchestration/` calls these functions from its assets.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_dir, atomic_file, write_json
from .dataset import Dataset
from .experiment import BASELINES, fit_variant, modalities_of
from .metrics import mean_std
from .splits import Split


CACHE_VERSION = 1


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def fit_spec(variant: str, dataset_hash: str, split: Split, params: dict, seed: int,
             feature_hashes: dict[str, str]) -> dict:
    """Everything that determines a fit's result."""
    used = [m for m in modalities_of(variant) if m != "id"]
    section = params["bpr"] if variant == "bpr" else params["train"]
    spec = {"v": CACHE_VERSION, "variant": variant, "seed": seed, "dataset": dataset_hash,
            "split": split.describe(), "features": {m: feature_hashes.get(m) for m in used},
            "train": section, "metric": params["train"]["metric"],
            "model": params["model"] if variant not in BASELINES else None}
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def fit_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def fit_cached(variant: str, dataset: Dataset, split: Split, params: dict, seed: int,
               features: dict[str, np.ndarray], ks, cache_root: str | Path,
               dataset_hash: str | None = None, feature_ids: dict[str, str] | None = None
               ) -> dict:
    """Fit + evaluate on the split's test set, or reuse the saved result of the same fit.

    Returns {"key", "variant", "seed", "metrics", "artifact_path" (BoNMF only), "reused",
    "best_epoch", "seconds"}. BoNMF models are saved as artifacts (`save_model`), baselines
    keep only their metrics. `feature_ids`: what identifies each content matrix (e.g. the
    encoder identity and the dataset hash); default: a hash of its bytes.
    """
    from .artifacts import save_model
    from .evaluation import evaluate

    dataset_hash = dataset_hash or dataset.content_hash()
    ids = {m: (feature_ids or {}).get(m) or array_sha256(f) for m, f in features.items()}
    spec = fit_spec(variant, dataset_hash, split, params, seed, ids)
    key = fit_key(spec)
    folder = Path(cache_root) / key
    result_path = folder / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("artifact_path") is None or Path(result["artifact_path"]).exists():
            result["reused"] = True
            return result
    started = time.perf_counter()
    scorer, train_result = fit_variant(variant, dataset, split, params, seed, features)
    fit_s = time.perf_counter() - started
    t0 = time.perf_counter()
    metrics = evaluate(scorer, split, "test", tuple(ks))
    metrics.update(fit_s=fit_s, eval_s=time.perf_counter() - t0)
    result = {"key": key, "variant": variant, "seed": seed, "metrics": metrics,
              "artifact_path": None, "best_epoch": None, "dataset_hash": dataset_hash,
              "split": split.describe(), "spec": spec}
    if train_result is not None:
        metrics.update(best_epoch=train_result.best_epoch, epochs_run=train_result.epochs_run,
                       samples_per_s=train_result.samples_per_s)
        result["best_epoch"] = train_result.best_epoch
        result["history"] = train_result.history   # the training curve (epochs, validation)
    if variant not in BASELINES:
        artifact = folder / "model"
        save_model(artifact, scorer, user_ids=dataset.user_ids, item_ids=dataset.item_ids,
                   metadata={"variant": variant, "seed": seed, "train": params["train"],
                             "model_params": params["model"],
                             "dataset": {"name": dataset.name, "content_hash": dataset_hash},
                             "protocol": split.describe(),
                             "metrics": {k: v for k, v in metrics.items()
                                         if isinstance(v, (int, float))},
                             "best_epoch": result["best_epoch"]})
        result["artifact_path"] = str(artifact)
    write_json(result_path, result)
    result["reused"] = False
    return result


def aggregate(fits: list[dict]) -> dict:
    """{variant: {metric: {mean, std, values}}} over the seeds of each variant."""
    by_variant: dict[str, list[dict]] = {}
    for fit in fits:
        by_variant.setdefault(fit["variant"], []).append(fit["metrics"])
    return {v: mean_std(runs) for v, runs in by_variant.items()}


def means(results: dict) -> dict:
    """{metric: mean} from one variant's mean_std entry."""
    return {k: v["mean"] for k, v in results.items()}


def bar_chart(results: dict, metrics: list[str], path: str | Path, highlight: str | None = None
              ) -> Path:
    """A small PNG bar chart of `metrics` per variant (PIL; no plotting library needed)."""
    from PIL import Image, ImageDraw

    variants = list(results)
    w, row_h, left = 640, 22, 110
    h = 30 + row_h * len(variants) * len(metrics) + 10 * len(metrics)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    colors = [(70, 110, 200), (220, 120, 50), (60, 160, 90), (150, 80, 170)]
    y = 10
    top = max([results[v][m]["mean"] for v in variants for m in metrics if m in results[v]] or [1])
    for mi, metric in enumerate(metrics):
        draw.text((5, y), metric, fill="black")
        y += 14
        for v in variants:
            value = results[v].get(metric, {}).get("mean")
            if value is None:
                continue
            bar = int((w - left - 70) * value / max(top, 1e-9))
            color = (200, 40, 40) if v == highlight else colors[mi % len(colors)]
            draw.text((5, y + 4), v[:16], fill="black")
            draw.rectangle([left, y + 3, left + bar, y + row_h - 5], fill=color)
            draw.text((left + bar + 5, y + 4), f"{value:.4f}", fill="black")
            y += row_h
        y += 4
    path = Path(path)
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def write_report(out: str | Path, results: dict, table: str, chart_metrics: list[str],
                 highlight: str | None = None) -> dict:
    """metrics.json, metrics.md and metrics.png in `out` (one atomic directory swap)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
        (tmp / "metrics.md").write_text(table + "\n")
        bar_chart(results["results"], chart_metrics, tmp / "metrics.png", highlight)
    return {"json": str(out / "metrics.json"), "markdown": str(out / "metrics.md"),
            "plot": str(out / "metrics.png")}
