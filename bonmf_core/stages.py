"""The pipeline's steps, one function each: snapshot, validate, encode, train, evaluate.

Both drivers call these and nothing else does the work:
- the Dagster assets (`orchestration/assets/`), which keep their results content-addressed in
  the state folder and record them in the registry;
- the DVC stages (`dvc.yaml` → `bonmf stage <name>` → the `run_*` functions at the end of this
  module), which read and write fixed paths in the workspace so DVC can hash and version them.

No Dagster and no DVC here. The package step is `bonmf package` (bentos/packaging.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)


# -- snapshot ---------------------------------------------------------------------------------

def snapshot(data: dict, *, root: str | Path | None = None, out: str | Path | None = None
             ) -> dict:
    """Ingest the `data` params section's source leniently and save the raw snapshot.

    `root`: under `root/<content hash>/` (the state folder's content-addressed store; an
    existing snapshot is reused). `out`: exactly at `out`, self-contained — the pictures are
    copied into `out/images` and referenced by paths relative to the working directory (the
    repo root, where DVC runs its stages), so the folder's bytes do not depend on where the
    repo lives and DVC can version it.
    """
    from .snapshot import read_raw, save_snapshot

    if (root is None) == (out is None):
        raise ValueError("snapshot needs exactly one of root (content-addressed) or out")
    raw = read_raw(data["source"], data["demo_seed"], data["demo_users"], data["demo_items"])
    if root is not None:
        digest, path = save_snapshot(raw, root)
    else:
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        raw.items = copy_images(raw.items, out / "images")
        staging = Path(tempfile.mkdtemp(prefix=".snapshot.", dir=out.parent))
        try:
            digest, saved = save_snapshot(raw, staging)
            for file in saved.iterdir():
                file.replace(out / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        path = out
    return {"content_hash": digest, "path": str(path), "name": raw.name, "source": raw.source,
            "problems": raw.problems, **raw.counts()}


def copy_images(items, folder: str | Path):
    """`items` with every readable `image_path` copied into `folder` and pointing there (as
    `folder/<file name>`, relative when `folder` is). File names are kept: the dataset's
    content hash identifies images by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "image_path" not in items.columns:
        return items
    moved, seen = [], {}
    for source in items["image_path"]:
        if not isinstance(source, str) or not source or not Path(source).is_file():
            moved.append(source)
            continue
        name = Path(source).name
        if seen.setdefault(name, source) != source:
            raise DataError(f"two images share the file name {name!r} ({seen[name]} and "
                            f"{source}); they would overwrite each other", field="image_path")
        shutil.copy2(source, folder / name)
        moved.append(str(folder / name))
    return items.assign(image_path=moved)


# -- validate ---------------------------------------------------------------------------------

def check_thresholds(checks: dict, rating_scale) -> tuple[dict, bool]:
    """The `checks` params section → (data_checks thresholds, whether to build Data Docs)."""
    section = dict(checks)
    docs = bool(section.pop("data_docs", False))
    if section.get("rating_scale") is None:
        section["rating_scale"] = list(rating_scale) if rating_scale else None
    return section, docs


def validate(snapshot_path: str | Path, checks: dict, previous_profile: dict | None = None,
             docs_root: str | Path | None = None):
    """Run the Great Expectations checks on a saved snapshot → (raw tables, SnapshotValidation).

    Never raises for bad data: the outcome says which checks failed. `previous_profile`: the
    last accepted snapshot's profile (drift baseline; None skips drift). `docs_root`: where
    Data Docs go when the `checks.data_docs` switch is on.
    """
    from data_checks import validate_snapshot

    from .snapshot import load_snapshot

    raw = load_snapshot(snapshot_path)
    thresholds, docs = check_thresholds(checks, raw.rating_scale)
    if docs and docs_root:
        Path(docs_root).mkdir(parents=True, exist_ok=True)
    result = validate_snapshot(raw.interactions, raw.items, raw.users, thresholds,
                               previous_profile=previous_profile,
                               docs_dir=docs_root if docs and docs_root else None)
    return raw, result


def build_dataset(snapshot_path: str | Path, out: str | Path):
    """The strict Dataset from a snapshot that passed its checks, saved at `out` (an existing
    one there is reused: it is keyed by the snapshot's content)."""
    from .dataset import Dataset
    from .snapshot import dataset_from_raw, load_snapshot

    out = Path(out)
    if (out / "dataset.json").exists():
        return Dataset.load(out)
    dataset = dataset_from_raw(load_snapshot(snapshot_path))
    dataset.save(out)
    return dataset


def dataset_info(dataset, path: str | Path, snapshot_hash: str | None) -> dict:
    """What downstream steps need to know about a saved dataset."""
    summary = dataset.summary()
    return {"snapshot_hash": snapshot_hash, "dataset_hash": dataset.content_hash(),
            "path": str(path), "name": dataset.name, "users": summary["users"],
            "items": summary["items"], "interactions": summary["interactions"]}


# -- encode -----------------------------------------------------------------------------------

@dataclass
class Features:
    """One modality's content matrix, which items had content, and what produced it."""

    modality: str
    vectors: np.ndarray
    present: np.ndarray
    manifest: dict
    key: str            # encoder + settings, short hash: names the saved matrix

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(self.vectors, dtype=np.float32), allow_pickle=False)
        return path


def encode(dataset, modality: str, encoders: dict, store_url: str | None = None) -> Features:
    """Encode the catalog's `modality` ('text' | 'image') as the `encoders` params section says:
    `pretrained` through the embedding cache in the store at `store_url` (only changed items
    are encoded), or the weight-free `basic` featurizers."""
    if encoders["source"] == "basic":
        from .features import basic_content_features

        matrices, report = basic_content_features(dataset, [modality])
        vectors = matrices[modality]
        present = np.abs(vectors).sum(1) > 0
        manifest = {"encoder": f"basic-{modality}", "dim": int(vectors.shape[1]),
                    "items": len(vectors), **report.get(modality, {})}
    elif encoders["source"] == "pretrained":
        from .catalog_encoding import EncoderSettings, encode_catalog
        from .store import Store

        store = Store(store_url)
        try:
            encoded = encode_catalog(dataset, store, EncoderSettings.from_params(encoders),
                                     (modality,))[modality]
        finally:
            store.dispose()
        vectors, present, manifest = encoded.vectors, encoded.present, encoded.manifest
    else:
        raise ValueError(f"encoders.source must be 'pretrained' or 'basic', got "
                         f"{encoders['source']!r}")
    key = hashlib.sha256(json.dumps([manifest.get("encoder"), encoders], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    return Features(modality, vectors, np.asarray(present, dtype=bool), manifest, key)


def load_features(variants, files: dict[str, dict]) -> tuple[dict, dict]:
    """The content matrices `variants` need → ({modality: matrix}, {modality: identity}).

    `files`: modality → {"path": .npy, "identity": what identifies it}. Fits are keyed by the
    identity (encoder and data), not the float bytes: a cold encode and a cache read are the
    same features.
    """
    from .experiment import modalities_of

    wanted = sorted({m for v in variants for m in modalities_of(v)} - {"id"})
    missing = [m for m in wanted if m not in files]
    if missing:
        raise ValueError(f"variants {list(variants)} need {missing} features, which were not "
                         f"encoded")
    return ({m: np.load(files[m]["path"], allow_pickle=False) for m in wanted},
            {m: str(files[m]["identity"]) for m in wanted})


# -- train ------------------------------------------------------------------------------------

def make_splits(dataset, protocol: dict) -> list:
    """One split per seed of the `protocol` params section."""
    from .splits import make_split

    return [make_split(dataset, protocol["name"], seed=seed, ncf_dir=protocol["ncf_dir"],
                       order=protocol["order"], cold_fraction=protocol["cold_fraction"])
            for seed in protocol["seeds"]]


def check_variants(variants, role: str) -> list[str]:
    """`role` 'candidates' must be BoNMF variants (at least one); 'baselines' must not be."""
    from .experiment import BASELINES

    variants = list(variants)
    if role == "candidates":
        if not variants or any(v in BASELINES for v in variants):
            raise ValueError(f"candidate variants must be BoNMF variants (id, text, image, "
                             f"text+image), got {variants}")
    elif any(v not in BASELINES for v in variants):
        raise ValueError(f"baselines must be among {BASELINES}, got "
                         f"{[v for v in variants if v not in BASELINES]}")
    return variants


def fit_variants(variants, dataset, splits: list, params: dict, features: dict,
                 feature_ids: dict, dataset_hash: str, cache_root: str | Path,
                 report: Callable[[str], None] = log.info) -> list[dict]:
    """Fit and test-evaluate every variant on every split, reusing cached fits (keyed by data,
    split, features and hyper-parameters) → one result dict per (split, variant)."""
    from .pipeline import fit_cached

    fits = []
    for split in splits:
        for variant in variants:
            fit = fit_cached(variant, dataset, split, params, split.seed, features,
                             params["protocol"]["ks"], cache_root, dataset_hash=dataset_hash,
                             feature_ids=feature_ids)
            report(f"{variant} seed {split.seed}: {'reused' if fit['reused'] else 'trained'} "
                   f"{ {k: round(v, 4) for k, v in fit['metrics'].items() if '@' in k} }")
            fits.append(fit)
    return fits


def choose_candidate(fits: list[dict], variants, metric: str) -> dict:
    """The best variant on `metric` (mean over seeds) → {variant, fit (its first seed's),
    metrics (means), results (every variant's mean ± std)}."""
    from .pipeline import aggregate

    results = aggregate(fits)
    best = max(variants, key=lambda v: results[v][metric]["mean"])
    chosen = next(f for f in fits if f["variant"] == best)
    return {"variant": best, "fit": chosen, "results": results,
            "metrics": {k: v["mean"] for k, v in results[best].items()}}


def training_curve(fit: dict, metric: str) -> list[dict]:
    """Per-epoch loss and validation `metric` of one fit (empty for cached fits made before
    histories were kept, and for baselines without epochs)."""
    return [{"epoch": r["epoch"], "loss": float(r["loss"]),
             "valid": float(r["valid"][metric]) if "valid" in r else None}
            for r in fit.get("history") or []]


# -- evaluate ---------------------------------------------------------------------------------

def evaluation_results(protocol: dict, split_descriptions: list[dict], dataset: dict,
                       candidate: dict, results: dict) -> dict:
    """The evaluation record (what metrics.json holds): protocol, dataset, the candidate and
    every variant's mean ± std. `candidate`: {variant, model_version}; `results`: baselines and
    BoNMF variants."""
    return {
        "protocol": protocol["name"], "dataset": dataset["name"],
        "ks": list(protocol["ks"]), "seeds": list(protocol["seeds"]),
        "protocol_details": {"splits": split_descriptions},
        "dataset_details": {"content_hash": dataset["dataset_hash"],
                            **{k: dataset[k] for k in ("users", "items", "interactions")}},
        "candidate": candidate,
        "results": results,
    }


def evaluate(results: dict, out: str | Path, curve: list[dict] | None = None) -> dict:
    """Write the report into `out`: metrics.json (everything), metrics.md (the table),
    metrics.png (the ablation bar chart), training_curve.json (the candidate's epochs) and
    summary.json (the ranking metrics' means) → {table, report}."""
    from .atomic import write_json
    from .experiment import format_table
    from .pipeline import write_report

    table = format_table(results)
    k = results["ks"][0]
    report = write_report(out, results, table, [f"hr@{k}", f"ndcg@{k}"],
                          highlight=results["candidate"]["variant"])
    report["curve"] = str(write_json(Path(out) / "training_curve.json", curve or []))
    report["summary"] = str(write_json(Path(out) / "summary.json", summary(results)))
    return {"table": table, "report": report}


def summary(results: dict) -> dict:
    """The ranking metrics' means only (DVC's metrics file: `dvc metrics diff` compares them)."""
    means = {v: {k: round(m["mean"], 6) for k, m in r.items() if "@" in k}
             for v, r in results["results"].items()}
    best = results["candidate"]["variant"]
    return {"candidate": {"variant": best, **means[best]}, "variants": means}


# -- file-to-file entry points: `bonmf stage <name>`, the stages of dvc.yaml ------------------
# Each reads its inputs from fixed workspace paths and writes its outputs to fixed paths, so DVC
# can hash them; paths inside the outputs are kept relative to the working directory.

def run_snapshot(params: dict, out: str | Path) -> dict:
    info = snapshot(params["data"], out=out)
    log.info("snapshot %s: %s", info["content_hash"], {k: info[k] for k in
                                                       ("n_users", "n_items", "n_interactions")})
    return info


def run_validate(params: dict, snapshot_dir: str | Path, out: str | Path,
                 report: str | Path) -> dict:
    """Checks, then the dataset. A blocking failure raises DataError naming the failed checks,
    after writing the report, and writes no dataset."""
    from .atomic import write_json
    from .settings import state_dir

    _, result = validate(snapshot_dir, params["checks"], docs_root=state_dir() / "data_docs")
    outcome = result.to_dict()
    write_json(report, outcome)
    if not result.passed:
        raise DataError(f"blocking data checks failed: {', '.join(outcome['blocking'])} "
                        f"(details in {report})", path=snapshot_dir)
    dataset = build_dataset(snapshot_dir, out)
    return dataset_info(dataset, out, json.loads(
        (Path(snapshot_dir) / "snapshot.json").read_text())["content_hash"])


def run_encode(params: dict, dataset_dir: str | Path, out: str | Path) -> dict:
    """text.npy, image.npy and features.json (manifests, keys, identities) in `out`."""
    from .atomic import atomic_dir
    from .dataset import Dataset

    dataset = Dataset.load(dataset_dir)
    section = params["encoders"]
    manifest = {}
    with atomic_dir(out) as tmp:
        for modality in ("text", "image"):
            features = encode(dataset, modality, section, section["store_url"])
            features.save(tmp / f"{modality}.npy")
            manifest[modality] = {
                "file": f"{modality}.npy", "key": features.key,
                "identity": f"{dataset.content_hash()}/{modality}-{features.key}",
                "items_with_content": int(features.present.sum()),
                "manifest": json.loads(json.dumps(features.manifest, default=str))}
        (tmp / "features.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def run_train(params: dict, dataset_dir: str | Path, features_dir: str | Path,
              model_out: str | Path, fits_out: str | Path) -> dict:
    """Every candidate and baseline on every seed; the best candidate's model copied to
    `model_out`; every fit's metrics and the candidate's training history in `fits_out`."""
    from .atomic import atomic_dir, write_json
    from .dataset import Dataset
    from .pipeline import aggregate
    from .settings import state_dir

    dataset = Dataset.load(dataset_dir)
    candidates = check_variants(params["pipeline"]["candidates"], "candidates")
    baselines = check_variants(params["pipeline"]["baselines"], "baselines")
    variants = candidates + baselines
    manifest = json.loads((Path(features_dir) / "features.json").read_text())
    files = {m: {"path": Path(features_dir) / e["file"], "identity": e["identity"]}
             for m, e in manifest.items()}
    features, feature_ids = load_features(variants, files)
    splits = make_splits(dataset, params["protocol"])
    dataset_hash = dataset.content_hash()
    fits = fit_variants(variants, dataset, splits, params, features, feature_ids, dataset_hash,
                        state_dir() / "training")
    metric = params["train"]["metric"]
    chosen = choose_candidate([f for f in fits if f["variant"] in candidates], candidates,
                              metric)
    with atomic_dir(model_out) as tmp:
        shutil.copytree(chosen["fit"]["artifact_path"], tmp, dirs_exist_ok=True)
    results = aggregate(fits)
    record = {
        "protocol": params["protocol"], "split_descriptions": [s.describe() for s in splits],
        "dataset": dataset_info(dataset, dataset_dir, snapshot_hash=None),
        "candidate": {"variant": chosen["variant"], "seed": chosen["fit"]["seed"],
                      "metrics": chosen["metrics"], "model": str(model_out)},
        "results": {v: results[v] for v in baselines + candidates},   # the table's row order
        "curve": training_curve(chosen["fit"], metric),
        # Paths into the state folder's fit cache would tie this file to one machine.
        "fits": [{k: v for k, v in f.items() if k not in ("artifact_path", "reused")}
                 for f in fits],
    }
    write_json(fits_out, record)
    return record


def run_evaluate(params: dict, fits_path: str | Path, out: str | Path) -> dict:
    record = json.loads(Path(fits_path).read_text())
    results = evaluation_results(record["protocol"], record["split_descriptions"],
                                 record["dataset"], {"variant": record["candidate"]["variant"],
                                                     "model_version": None},
                                 record["results"])
    return evaluate(results, out, record["curve"])
