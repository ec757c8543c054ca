"""Saved BoNMF models: weights (safetensors), config and id maps as JSON — no pickles.

Layout of an artifact directory (written atomically):
    model.safetensors   every parameter and buffer (content features, warm-item mask, ...)
    tensors.safetensors optional extra arrays (e.g. users' seen items)
    config.json         format version, model config, training config, seed, dataset, metrics
    id_maps.json        raw user and item ids in index order
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bonmf_core.atomic import atomic_dir
from bonmf_core.errors import ConfigMismatchError
from bonmf_core.models.bonmf import BoNMF, BoNMFConfig
from bonmf_core.hashing import sha256_file

ARTIFACT_VERSION = 1


def save_model(path: str | Path, model: BoNMF, *, user_ids, item_ids, metadata: dict | None = None,
               tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` with its id maps and free-form JSON `metadata` to directory `path`.

    `tensors`: extra arrays that travel with the model (e.g. users' seen items), stored in
    `tensors.safetensors` and read back with `load_tensors`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if len(user_ids) != model.config.n_users or len(item_ids) != model.config.n_items:
        raise ConfigMismatchError(
            f"id maps ({len(user_ids)} users, {len(item_ids)} items) do not fit the model "
            f"({model.config.n_users} users, {model.config.n_items} items)")
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(tmp / "tensors.safetensors"))
        config = {"format_version": ARTIFACT_VERSION, "model": model.config.to_dict(),
                  **(metadata or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
        (tmp / "id_maps.json").write_text(json.dumps(
            {"user_ids": [str(u) for u in user_ids], "item_ids": [str(i) for i in item_ids]}))
    return path


def load_model(path: str | Path, expected: dict | None = None) -> tuple[BoNMF, dict, dict]:
    """Load an artifact → (model in eval mode, config.json contents, id maps).

    `expected` is a (partial) model config the caller relies on; any field that differs from
    the saved one is refused with a message listing each difference.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("model.safetensors", "config.json", "id_maps.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: not a BoNMF model artifact ({name} missing)")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format_version") != ARTIFACT_VERSION:
        raise ConfigMismatchError(f"{path / 'config.json'}: artifact format_version "
                                  f"{meta.get('format_version')}, this code reads {ARTIFACT_VERSION}")
    saved = BoNMFConfig.from_dict(meta["model"]).to_dict()
    if expected:
        wanted = {**saved, **expected}
        try:
            wanted = BoNMFConfig.from_dict(wanted).to_dict()
        except (TypeError, ValueError) as exc:
            raise ConfigMismatchError(f"expected config is invalid: {exc}") from None
        diffs = [f"{k}: saved {saved[k]!r}, expected {wanted[k]!r}"
                 for k in saved if saved[k] != wanted[k]]
        if diffs:
            raise ConfigMismatchError(f"{path}: model config does not match: " + "; ".join(diffs))
    config = BoNMFConfig.from_dict(meta["model"])
    state = load_file(str(path / "model.safetensors"))
    # Artifacts saved before `warm_users` existed trained every user (no cold_users protocol).
    state.setdefault("warm_users", torch.ones(config.n_users, dtype=torch.bool))
    features = {m: state[f"feat_{m}"] for m in config.modalities if f"feat_{m}" in state}
    try:
        model = BoNMF(config, features=features, user_attributes=state.get("user_attributes"))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ConfigMismatchError(f"{path}: weights do not match config.json: {exc}") from None
    id_maps = json.loads((path / "id_maps.json").read_text())
    if len(id_maps["user_ids"]) != config.n_users or len(id_maps["item_ids"]) != config.n_items:
        raise ConfigMismatchError(f"{path / 'id_maps.json'}: id maps do not fit the model config")
    model.eval()
    return model, meta, id_maps


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors saved with a model ({} when there are none)."""
    from safetensors.torch import load_file

    file = Path(path) / "tensors.safetensors"
    return load_file(str(file)) if file.exists() else {}


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
