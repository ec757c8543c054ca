"""The pipeline's steps, one function each: snapshot, validate, encode, train, evaluate.

Both drivers call these and nothing else does the work:
- the Dagster assets (`orchestration/assets/`), which keep their results content-addressed in
  the state folder and record them in the registry;
- the DVC stages (`dvc.yaml` → `bonmf stage <name>` → the `run_*` functions at the end of this
  module), which read and write fixed paths in the workspace so DVC can hash and version them.

Training and evaluation are the experiment runner's (`experiment.runner`, `experiment.report`);
the functions here put its inputs and outputs where each driver wants them. No Dagster and no
DVC here. The package step is `bonmf package` (bentos/packaging.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bonmf_core.config import BonmfConfig, ChecksConfig, DataConfig
from bonmf_core.data.paths import outside_reason
from bonmf_core.errors import DataError

log = logging.getLogger(__name__)


# -- snapshot ---------------------------------------------------------------------------------

def snapshot(data: DataConfig, *, root: str | Path | None = None, out: str | Path | None = None
             ) -> dict:
    """Ingest the `data` section's source leniently and save the raw snapshot.

    `root`: under `root/<content hash>/` (the state folder's content-addressed store; an
    existing snapshot is reused). `out`: exactly at `out`, self-contained — the pictures are
    copied into `out/images` and referenced by paths relative to the working directory (the
    repo root, where DVC runs its stages), so the folder's bytes do not depend on where the
    repo lives and DVC can version it.
    """
    from bonmf_core.data.snapshot import read_raw, save_snapshot

    if (root is None) == (out is None):
        raise ValueError("snapshot needs exactly one of root (content-addressed) or out")
    raw = read_raw(data)
    if root is not None:
        digest, path = save_snapshot(raw, root)
    else:
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        raw.items = copy_images(raw.items, out / "images", root=raw.root)
        raw.root = str(out)   # as written (relative in DVC's stages): no absolute path inside
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


def copy_images(items, folder: str | Path, root: str | Path | None = None):
    """`items` with every readable `image_path` copied into `folder` and pointing there (as
    `folder/<file name>`, relative when `folder` is). A path that leads outside `root` (the
    dataset's own folder) is neither read nor copied: it stays as written, for the catalog
    check to block by row."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "image_path" not in items.columns:
        return items
    moved = []
    for source in items["image_path"]:
        if (not isinstance(source, str) or not source or outside_reason(source, root)
                or not Path(source).is_file()):
            moved.append(source)
            continue
        # the path inside the dataset folder is kept, so images/a/1.jpg and images/b/1.jpg
        # stay two files
        inside = (Path(source).resolve().relative_to(Path(root).resolve()) if root is not None
                  else Path(Path(source).name))
        target = folder / inside
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(source, target)
        moved.append(str(target))
    return items.assign(image_path=moved)


# -- validate ---------------------------------------------------------------------------------

def check_thresholds(checks: ChecksConfig, rating_scale) -> dict:
    """The `checks` section → the data checks' thresholds (a rating scale left null is the one
    the source declares)."""
    section = checks.model_dump(mode="json")
    if section["rating_scale"] is None and rating_scale:
        section["rating_scale"] = list(rating_scale)
    return section


def validate(snapshot_path: str | Path, checks: ChecksConfig,
             previous_profile: dict | None = None, docs_root: str | Path | None = None):
    """Run the Great Expectations checks on a saved snapshot → (raw tables, SnapshotValidation).

    Never raises for bad data: the outcome says which checks failed. `previous_profile`: the
    last accepted snapshot's profile (drift baseline; None skips drift). `docs_root`: where
    Data Docs go when `checks.data_docs` is on.
    """
    from data_checks import validate_snapshot

    from bonmf_core.data.snapshot import load_snapshot

    raw = load_snapshot(snapshot_path)
    docs = docs_root if checks.data_docs and docs_root else None
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
    result = validate_snapshot(raw.interactions, raw.items, raw.users,
                               check_thresholds(checks, raw.rating_scale),
                               previous_profile=previous_profile, docs_dir=docs,
                               parse_problems=raw.problems, origins=raw.origins,
                               image_root=raw.root)
    return raw, result


def build_dataset(snapshot_path: str | Path, out: str | Path):
    """The strict Dataset from a snapshot that passed its checks, saved at `out` (an existing
    one there is reused: it is keyed by the snapshot's content)."""
    from bonmf_core.data.dataset import Dataset
    from bonmf_core.data.snapshot import dataset_from_raw, load_snapshot

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


# -- encode and train -------------------------------------------------------------------------

def load_features(variants, files: dict[str, dict]) -> tuple[dict, dict]:
    """The content matrices `variants` need → ({modality: matrix}, {modality: identity}).

    `files`: modality → {"path": .npy, "identity": what identifies it}. Fits are keyed by the
    identity (encoder and data), not the float bytes: a cold encode and a cache read are the
    same features.
    """
    from bonmf_core.experiment.variants import modalities_of

    wanted = sorted({m for v in variants for m in modalities_of(v)} - {"id"})
    missing = [m for m in wanted if m not in files]
    if missing:
        raise ValueError(f"variants {list(variants)} need {missing} features, which were not "
                         f"encoded")
    return ({m: np.load(files[m]["path"], allow_pickle=False) for m in wanted},
            {m: str(files[m]["identity"]) for m in wanted})


def strip_fit(fit: dict) -> dict:
    """A fit's JSON-able record (no in-memory scorer, no machine-local cache path)."""
    return {k: v for k, v in fit.items() if k not in ("scorer", "artifact_path", "reused")}


# -- file-to-file entry points: `bonmf stage <name>`, the stages of dvc.yaml ------------------
# Each reads its inputs from fixed workspace paths and writes its outputs to fixed paths, so DVC
# can hash them; paths inside the outputs are kept relative to the working directory.

def run_snapshot(cfg: BonmfConfig, out: str | Path) -> dict:
    info = snapshot(cfg.data, out=out)
    log.info("snapshot %s: %s", info["content_hash"], {k: info[k] for k in
                                                       ("n_users", "n_items", "n_interactions")})
    return info


def run_validate(cfg: BonmfConfig, snapshot_dir: str | Path, out: str | Path,
                 report: str | Path) -> dict:
    """Checks, then the dataset. A blocking failure raises DataError naming the failed checks,
    after writing the report, and writes no dataset."""
    from bonmf_core.atomic import write_json
    from bonmf_core.settings import state_dir

    _, result = validate(snapshot_dir, cfg.checks, docs_root=state_dir() / "data_docs")
    outcome = result.to_dict()
    write_json(report, outcome)
    if not result.passed:
        raise DataError(f"blocking data checks failed: {', '.join(outcome['blocking'])} "
                        f"(details in {report})", path=snapshot_dir)
    dataset = build_dataset(snapshot_dir, out)
    return dataset_info(dataset, out, json.loads(
        (Path(snapshot_dir) / "snapshot.json").read_text())["content_hash"])


def run_encode(cfg: BonmfConfig, dataset_dir: str | Path, out: str | Path) -> dict:
    """text.npy, image.npy and features.json (manifests, keys, identities) in `out`."""
    from bonmf_core.atomic import atomic_dir
    from bonmf_core.content.features import encode_modality
    from bonmf_core.data.dataset import Dataset

    dataset = Dataset.load(dataset_dir)
    manifest = {}
    with atomic_dir(out) as tmp:
        for modality in ("text", "image"):
            features = encode_modality(dataset, modality, cfg.encoders)
            features.save(tmp / f"{modality}.npy")
            manifest[modality] = {
                "file": f"{modality}.npy", "key": features.key,
                "identity": f"{dataset.content_hash()}/{modality}-{features.key}",
                "items_with_content": int(features.present.sum()),
                "manifest": json.loads(json.dumps(features.manifest, default=str))}
        (tmp / "features.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def run_train(cfg: BonmfConfig, dataset_dir: str | Path, features_dir: str | Path,
              model_out: str | Path, fits_out: str | Path) -> dict:
    """Every candidate and baseline on every seed; the best candidate's model copied to
    `model_out`; every fit's metrics and the candidate's training history in `fits_out`.
    Under torchrun the fits train data-parallel and only rank 0 writes."""
    from bonmf_core import distributed
    from bonmf_core.atomic import atomic_dir, write_json
    from bonmf_core.data.dataset import Dataset
    from bonmf_core.data.splits import make_splits
    from bonmf_core.experiment.report import training_curve
    from bonmf_core.experiment.runner import aggregate, choose_candidate, run_fits
    from bonmf_core.settings import state_dir

    dataset = Dataset.load(dataset_dir)
    candidates, baselines = cfg.pipeline.candidates, cfg.pipeline.baselines
    variants = candidates + baselines
    manifest = json.loads((Path(features_dir) / "features.json").read_text())
    files = {m: {"path": Path(features_dir) / e["file"], "identity": e["identity"]}
             for m, e in manifest.items()}
    features, feature_ids = load_features(variants, files)
    splits = make_splits(dataset, cfg.protocol)
    fits = run_fits(variants, dataset, splits, cfg, features,
                    dataset_hash=dataset.content_hash(), feature_ids=feature_ids,
                    cache_root=state_dir() / "training")
    chosen = choose_candidate([f for f in fits if f["variant"] in candidates], candidates,
                              cfg.train.metric)
    if distributed.is_main():
        with atomic_dir(model_out) as tmp:
            shutil.copytree(chosen["fit"]["artifact_path"], tmp, dirs_exist_ok=True)
    results = aggregate(fits, slices=True)   # per popularity slice too (the report)
    record = {
        "world_size": distributed.world_size(),
        "split_descriptions": [s.describe() for s in splits],
        "dataset": dataset_info(dataset, dataset_dir, snapshot_hash=None),
        "candidate": {"variant": chosen["variant"], "seed": chosen["fit"]["seed"],
                      "metrics": chosen["metrics"], "model": str(model_out),
                      "chosen_on": chosen["chosen_on"], "validation": chosen["validation"]},
        "results": {v: results[v] for v in baselines + candidates},   # the table's row order
        "curve": training_curve(chosen["fit"], cfg.train.metric),
        "fits": [strip_fit(f) for f in fits],
    }
    if distributed.is_main():
        write_json(fits_out, record)
    return record


def run_evaluate(cfg: BonmfConfig, fits_path: str | Path, out: str | Path) -> dict:
    from bonmf_core.experiment.report import write_report
    from bonmf_core.experiment.runner import results_record

    record = json.loads(Path(fits_path).read_text())
    data = record["dataset"]
    results = results_record(cfg, record["split_descriptions"],
                             {**data, "content_hash": data["dataset_hash"]}, record["results"],
                             {"variant": record["candidate"]["variant"], "model_version": None})
    return write_report(results, out, record["curve"])
