"""Catalog encoding benchmark: a cold cache, then the same catalog again on the warm cache.

    python benchmarks/encode_catalog.py --data ../shared/datasets/ml-1m --out FILE.json \
        [--check-fp32 200] [--set encoders.device=cpu] [--set encoders.precision=fp32] [--set encoders.image_model=NAME]

Prints and writes {"text_items_per_s", "image_items_per_s", "text_s", "image_s",
"cached_rerun_s", "device", ...}. items/s counts encoding (decode + forward + cache writes);
`text_s` / `image_s` are the whole modality including loading the model. `--check-fp32 N`
re-encodes N items in fp32 and reports the min/mean cosine of the fast vectors to them.
The cold run uses a fresh SQLite store in a temporary folder unless --store-url is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonmf_core.atomic import write_json  # noqa: E402
from bonmf_core.config import EncodersConfig, add_config_arguments, load_config  # noqa: E402
from bonmf_core.content.catalog import encode_catalog  # noqa: E402
from bonmf_core.data.readers import load_dataset  # noqa: E402
from bonmf_core.store.database import Store  # noqa: E402


def _cosine_to_fp32(dataset, settings: EncodersConfig, fast: dict, n: int) -> dict:
    """Encode the first n items in fp32 (no cache) and compare with the cached fast vectors."""
    from bonmf_core.content.text import compose_item_texts
    from bonmf_core.content.encoders import ImageEncoder, TextEncoder

    out = {}
    texts = compose_item_texts(dataset.items.iloc[:n], settings.text_fields, settings.text_separator)
    ref = TextEncoder(settings.text_model, device=settings.device, precision="fp32",
                      max_length=settings.text_max_length).encode(texts)
    cos = (ref * fast["text"].vectors[:n]).sum(1)
    out["text"] = {"min": float(cos.min()), "mean": float(cos.mean()), "items": n}
    paths = [p if isinstance(p, str) else None for p in dataset.items["image_path"][:n]]
    ref, present = ImageEncoder(settings.image_model, weights=settings.image_weights,
                                device=settings.device, precision="fp32",
                                workers=settings.image_workers).encode(paths)
    a, b = ref[present], fast["image"].vectors[:n][present]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    out["image"] = {"min": float(cos.min()), "mean": float(cos.mean()), "items": int(present.sum())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="default: data.source")
    p.add_argument("--out", required=True)
    p.add_argument("--store-url", default=None, help="default: a fresh SQLite file (cold cache)")
    add_config_arguments(p)   # encoders.* (device, precision, text_model, ...) by --set
    p.add_argument("--check-fp32", type=int, default=0, metavar="N")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    cfg = load_config(args.params, args.set, {"data": {"source": args.data}} if args.data else {})
    dataset = load_dataset(cfg.data)
    settings = cfg.encoders
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.store_url or f"sqlite:///{tmp}/cache.db")
        cold = encode_catalog(dataset, store, settings)
        started = time.perf_counter()
        warm = encode_catalog(dataset, store, settings)
        rerun_s = time.perf_counter() - started
        assert all(warm[m].manifest["encoded_now"] == 0 for m in warm), "warm run re-encoded"
        result = {
            "text_items_per_s": cold["text"].manifest["items_per_s"],
            "image_items_per_s": cold["image"].manifest["items_per_s"],
            "text_s": cold["text"].manifest["seconds"],
            "image_s": cold["image"].manifest["seconds"],
            "cached_rerun_s": rerun_s,
            "device": cold["text"].manifest["device"],
            "dataset": dataset.name, "items": dataset.n_items,
            "manifests": {m: {k: v for k, v in e.manifest.items()} for m, e in cold.items()},
        }
        if args.check_fp32:
            result["cosine_to_fp32"] = _cosine_to_fp32(dataset, settings, cold, args.check_fp32)
        store.dispose()
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "manifests"}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
