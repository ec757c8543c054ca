"""Packaging: a model artifact → a BentoML model → a Bento (`service.py`) → an archive.

    package(model_dir, dataset_dir, out_dir, config, info)

1. writes a serving bundle (`bonmf_core.serving.bundle.write_bundle`: weights, id maps,
   titles, popularity, seen items, catalog content embeddings, encoder weights, the request
   limits of the `serving` section) and saves it with `bentoml.models.create`, labelled with
   the registry version and the artifact's sha256;
2. builds the Bento from `bentos/service.py` fully offline (`lock_packages: false`: the
   requirements are the pinned versions installed here, not resolved against an index); it
   carries only the service's runtime (`INCLUDE`: no store, no SQLAlchemy, no training);
3. exports it to `<out>/<name>-<version>.bento.tar` and writes `<out>/bento.json` last (atomic):
   what was packaged, from which artifact, with the archive's sha256.

A second call for the same artifact finds the model, the Bento and the archive by their labels
and hashes and rebuilds nothing. BentoML's home is `BENTOML_HOME` or `<state>/bentoml`;
telemetry is off.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bonmf_core.atomic import write_json
from bonmf_core.config import BonmfConfig
from bonmf_core.hashing import sha256_file
from bonmf_core.settings import state_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE = "bentos.service:Recommendations"
# What the Bento carries of the project: the service and the modules its runtime
# (bonmf_core.serving.engine) imports — not the bundle builder, the store or training.
# tests/test_serving.py runs the service from a copy of exactly these files.
INCLUDE = ["bentos/__init__.py", "bentos/service.py", "bentos/inputs.py",
           "bentos/security.py", "bonmf_core/__init__.py",
           "bonmf_core/atomic.py", "bonmf_core/config.py", "bonmf_core/errors.py",
           "bonmf_core/hashing.py", "bonmf_core/content/__init__.py",
           "bonmf_core/content/encoders.py", "bonmf_core/content/features.py",
           "bonmf_core/content/text.py", "bonmf_core/data/__init__.py",
           "bonmf_core/data/dataset.py", "bonmf_core/data/raw.py", "bonmf_core/data/paths.py",
           "bonmf_core/models/__init__.py",
           "bonmf_core/models/artifacts.py", "bonmf_core/models/bonmf.py",
           "bonmf_core/serving/__init__.py", "bonmf_core/serving/engine.py",
           "bonmf_core/serving/retrieval.py"]   # imported from serving.ann_min_items items
# What the service imports at run time, pinned to the versions installed here.
RUNTIME_PACKAGES = ["torch", "torchvision", "numpy", "pandas", "safetensors", "pillow",
                    "PyYAML", "tqdm", "transformers", "timm", "pydantic", "bentoml",
                    "starlette", "psutil", "faiss-cpu"]


def configure_bentoml(state: str | Path | None = None) -> Path:
    """BENTOML_HOME (default `<state>/bentoml`) and no telemetry; before importing bentoml."""
    home = Path(os.environ.setdefault(
        "BENTOML_HOME", str(Path(state or state_dir()).resolve() / "bentoml")))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    home.mkdir(parents=True, exist_ok=True)
    return home


def _pinned(names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def serving_hash(serving) -> str:
    """Identifies the `serving` section a bundle records: changing a limit, the key file or
    the host makes a new BentoML model instead of reusing one with the old section."""
    import hashlib

    text = json.dumps(serving.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def serve_command(bentoml_home: str, bento_tag: str, host: str) -> str:
    """The `bentoml serve` line to print: the host always named, so a copied command never
    falls back to BentoML's own default of every interface."""
    return f"BENTOML_HOME={bentoml_home} bentoml serve {bento_tag} --host {host}"


def find_model(name: str, artifact_sha256: str, model_version,
               serving_sha: str) -> str | None:
    """The tag of a BentoML model already saved from this artifact (as this registry
    version, with this `serving` section), if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # none saved under this name yet
        return None
    for model in models:
        labels = model.info.labels
        if labels.get("artifact_sha256", "") == artifact_sha256[:63] and \
                labels.get("model_version", "") == str(model_version or "") and \
                labels.get("serving_sha256", "") == serving_sha:
            return str(model.tag)
    return None


def save_bento_model(bundle: Path, name: str, labels: dict, metadata: dict) -> str:
    import bentoml

    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copytree(bundle, model.path, dirs_exist_ok=True)
    return str(model.tag)


def source_hash() -> str:
    """sha256 of the sources a Bento carries (INCLUDE): a code change means a new Bento."""
    import hashlib

    h = hashlib.sha256()
    files = sorted({f for pattern in INCLUDE for f in REPO_ROOT.glob(pattern) if f.is_file()})
    for f in files:
        h.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def find_bento(name: str, model_tag: str, code: str) -> str | None:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentos = bentoml.bentos.list(name)
    except NotFound:
        return None
    for bento in bentos:
        labels = bento.info.labels
        if labels.get("model_tag") == model_tag.replace(":", "-") and \
                labels.get("source_hash") == code:
            return str(bento.tag)
    return None


def build_bento(name: str, model_tag: str, labels: dict) -> str:
    """`bentoml build` of service.py with the model pinned (offline, no locking)."""
    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema

    previous = os.environ.get("BONMF_BENTO_MODEL")
    os.environ["BONMF_BENTO_MODEL"] = model_tag   # the service resolves its model at import,
    sys.modules.pop("bentos.service", None)        # so import it afresh for this model
    try:
        bento = bentoml.bentos.build(
            SERVICE, name=name, build_ctx=str(REPO_ROOT), include=INCLUDE,
            exclude=["**/__pycache__", "**/*.pyc"],
            labels={**labels, "model_tag": model_tag.replace(":", "-")},
            description=f"BoNMF recommendations, model {model_tag}",
            envs=[BentoEnvSchema(name="BONMF_BENTO_MODEL", value=model_tag)],
            python={"lock_packages": False, "packages": _pinned(RUNTIME_PACKAGES)},
            models=[model_tag])
    finally:
        sys.modules.pop("bentos.service", None)
        if previous is None:
            os.environ.pop("BONMF_BENTO_MODEL", None)
        else:
            os.environ["BONMF_BENTO_MODEL"] = previous
    return str(bento.tag)


# Archive format → file suffix; `bentoml import` reads the format from the suffix. Plain tar
# by default: the weights barely compress — on ML-1M (145 MB: MiniLM, EfficientNet, the
# catalog's embeddings) xz made 111 MB in 99 s and gzip 115 MB in 30 s, tar 145 MB in 0.3 s.
ARCHIVE_SUFFIXES = {"tar": ".bento.tar", "gz": ".bento.tar.gz", "xz": ".bento"}


def archive_format() -> str:
    fmt = os.environ.get("BONMF_BENTO_ARCHIVE_FORMAT", "tar")
    if fmt not in ARCHIVE_SUFFIXES:
        raise ValueError(f"BONMF_BENTO_ARCHIVE_FORMAT must be one of "
                         f"{', '.join(ARCHIVE_SUFFIXES)}, got {fmt!r}")
    return fmt


def export_bento(bento_tag: str, out: Path) -> Path:
    """`<out>/<name>-<version>.bento.tar` (or .tar.gz / .bento by `archive_format`), written
    under a temporary name and renamed."""
    import bentoml

    out.mkdir(parents=True, exist_ok=True)
    fmt = archive_format()
    final = out / (bento_tag.replace(":", "-") + ARCHIVE_SUFFIXES[fmt])
    tmp = out / f".tmp-{os.getpid()}-{final.name}"
    try:
        written = Path(bentoml.export_bento(bento_tag, str(tmp), output_format=fmt))
        os.replace(written, final)
    finally:
        for leftover in out.glob(f".tmp-*-{final.name}*"):
            leftover.unlink(missing_ok=True)
    return final


def _unchanged(out: Path, artifact_sha: str, code: str, serving_sha: str) -> dict | None:
    """The previous packaging of this artifact with these sources and `serving` section, if
    its archive is intact and its Bento and model are still in the store."""
    import bentoml

    record_path = out / "bento.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    archive = Path(record.get("archive", ""))
    if record.get("artifact_sha256") != artifact_sha or record.get("source_hash") != code \
            or record.get("serving_sha256") != serving_sha or not archive.exists():
        return None
    try:
        bentoml.bentos.get(record["bento_tag"])
        bentoml.models.get(record["model_tag"])
    except Exception:  # deleted from the store: rebuild
        return None
    if sha256_file(archive) != record.get("archive_sha256"):
        return None
    return record


def package(model_dir: str | Path, dataset_dir: str | Path, out: str | Path,
            config: BonmfConfig, info: dict | None = None, build: bool = True) -> dict:
    """Package the model trained on the dataset in `dataset_dir` → the record (bento.json).

    `config`: its `encoders` section (what encoded the catalog: the bundle carries those
    encoders) and `serving` section (the Bento's name, the request limits).
    `info`: registry facts carried into the model's labels/metadata and the service's
    `metadata` answer (model_version, metrics, protocol, dataset_hash, code_version, ...).
    """
    from bonmf_core.data.dataset import Dataset
    from bonmf_core.hashing import sha256_tree
    from bonmf_core.serving.bundle import write_bundle

    configure_bentoml()
    started = time.perf_counter()
    # Absolute paths: BentoML's export resolves a relative target against its own root.
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    name = config.serving.bento_name
    artifact_sha = sha256_tree(model_dir)
    code = source_hash()
    serving_sha = serving_hash(config.serving)
    if build:
        previous = _unchanged(out, artifact_sha, code, serving_sha)
        if previous is not None:
            return {**previous, "reused": True, "seconds": round(time.perf_counter() - started, 3)}
    info = dict(info or {})
    model_tag = find_model(name, artifact_sha, info.get("model_version"), serving_sha)
    if model_tag is None:
        dataset = Dataset.load(dataset_dir)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = write_bundle(Path(tmp) / "bundle", model_dir, dataset, config.encoders,
                                  info=info, serving=config.serving)
            labels = {"artifact_sha256": artifact_sha[:63], "serving_sha256": serving_sha,
                      "model_version": str(info.get("model_version") or ""),
                      "variant": str(info.get("variant", "")),
                      "dataset_hash": str(info.get("dataset_hash", dataset.content_hash()))}
            # BentoML metadata takes basic types only: nested dicts as JSON strings.
            metadata = {k: json.dumps(info[k], default=str) for k in (
                "metrics", "protocol", "code_version", "seed") if info.get(k) is not None}
            model_tag = save_bento_model(bundle, name, labels, metadata)
    record = {"model_tag": model_tag, "artifact_sha256": artifact_sha,
              "serving_sha256": serving_sha,
              "model_version": info.get("model_version"), "bentoml_home":
              os.environ["BENTOML_HOME"]}
    if build:
        bento_tag = find_bento(name, model_tag, code) or build_bento(
            name, model_tag, {"model_version": str(info.get("model_version") or ""),
                              "source_hash": code})
        archive = export_bento(bento_tag, out)
        record.update(bento_tag=bento_tag, source_hash=code, archive=str(archive),
                      archive_sha256=sha256_file(archive),
                      archive_bytes=archive.stat().st_size)
        write_json(out / "bento.json", record)
    return {**record, "reused": False, "seconds": round(time.perf_counter() - started, 3)}


def production_info(store_url: str | None = None) -> dict | None:
    """The registry facts of the production model (None when there is none)."""
    from bonmf_core.ops import registry
    from bonmf_core.store.database import Store

    store = Store(store_url)
    try:
        row = registry.production_model(store)
    finally:
        store.dispose()
    return None if row is None else model_info(row)


def model_info(row: dict) -> dict:
    """The registry facts of a model version that travel with its package."""
    return {"model_version": row["id"], "variant": row["variant"], "metrics": row["metrics"],
            "protocol": row["protocol"], "dataset_hash": row["dataset_hash"],
            "code_version": row["code_version"], "artifact_sha256": row["artifact_sha256"],
            "seed": row["seed"]}


def package_cli(args) -> int:
    """`bonmf package`: the production model by default, any artifact with --model."""
    from bonmf_core.config import load_config
    from bonmf_core.data.dataset import find_saved_dataset
    from bonmf_core.ops import registry
    from bonmf_core.store.database import Store

    state = state_dir()
    config = load_config(args.params, getattr(args, "set", None) or [])
    model_dir = Path(args.model) if args.model else state / "production" / "model"
    if not (model_dir / "config.json").exists():
        print(f"error: {model_dir}: no model artifact (run `bonmf run` until a model is "
              f"promoted, or pass --model)", file=sys.stderr)
        return 2
    info = production_info(config.encoders.store_url) if not args.model else None
    if info is None:
        meta = json.loads((model_dir / "config.json").read_text())
        info = {"variant": meta.get("variant"), "seed": meta.get("seed"),
                "metrics": meta.get("metrics")}
    registry_file = model_dir / "registry.json"
    if registry_file.exists():
        info.setdefault("dataset_hash", json.loads(registry_file.read_text())["dataset_hash"])
    dataset_dir = Path(args.dataset) if args.dataset else find_saved_dataset(
        state / "datasets", info["dataset_hash"])
    out = Path(args.out) if args.out else state / "artifacts" / "bento"
    record = package(model_dir, dataset_dir, out, config, info, build=not args.no_build)
    if info.get("model_version") and not args.model:
        store = Store(config.encoders.store_url)
        try:
            registry.set_bento_tag(store, info["model_version"], record["model_tag"])
        finally:
            store.dispose()
    print(json.dumps({k: v for k, v in record.items() if k != "bentoml_home"}, indent=2))
    if "archive" in record:
        command = serve_command(record["bentoml_home"], record["bento_tag"],
                                config.serving.host)
        print(f"serve it:  {command}")
    return 0
