"""GPU benchmark: catalog image encoding with a ViT and BoNMF training on CUDA, each beside a
same-run CPU reference. One short prepared script for a CUDA machine (~1-2 minutes on an H200).

    python benchmarks/gpu.py --out FILE.json [--images 2048] [--batch 128]

Refuses (exit code 2, one line) where `torch.cuda.is_available()` is false.

(a) Image encoding, a randomly initialised ViT-B/16 (`timm.create_model("vit_base_patch16_224",
pretrained=False)`, classifier removed; no weights are needed to time it):
- synthetic 224×224 batches of `--batch` on CUDA under fp16 and bf16 autocast (fp32 weights),
  warm-up batches first, then images/s and the peak allocated CUDA memory; the CPU reference
  is the same model in fp32 on a few small batches (`--cpu-images`);
- the project's own decode + transform + encode path: `ImageEncoder` (DataLoader decoding
  workers, the model's timm transform, weights cast to the `auto` precision: fp16 on CUDA)
  over `--images` synthetic poster JPEGs (300×450, 256 distinct files, repeated), with the
  random weights saved to a temporary state-dict file; also the decode + transform alone
  (the same loader, no model), and the same encoder on the CPU over `--cpu-images` files.

(b) BoNMF training samples/s on a synthetic ML-1M-sized dataset (`demo_dataset` with 6040
users, 3706 items and a mean of 165.6 interactions per user: ~1M interactions, the ML-1M
shape), leave-one-out split, ID-only and text+image with random content features of the real
widths (384 text, 1280 image). `training.train` has no device support (its sampler, batches
and labels live on the CPU and the model is never moved), so this measures a plain loop that
is `training._run_epoch` with a device (on the CPU it reproduces `train`'s epoch loss to the
last digit: tests/test_cost_benchmarks.py): the same negative sampler and epoch pairs
(`_epoch_pairs`, on the CPU, as in `train`), the same step (`_train_step`), the same optimizers
(`_optimizers`: fused Adam by default) and batches; the model and the epoch's tensors are moved
to the device once. CUDA: a few warm-up steps, then one full epoch (samples/s of the steps
alone and of the whole epoch with its negative sampling); CPU reference: the first
`--cpu-steps` steps of an epoch in the same loop (steps-only samples/s, the comparable figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bonmf_core.atomic import write_json  # noqa: E402
from bonmf_core.config import add_config_arguments, load_config  # noqa: E402
from cost_curves import cpu_model  # noqa: E402

ML1M_USERS, ML1M_ITEMS, ML1M_MEAN = 6040, 3706, 1_000_209 / 6040
FEATURE_DIMS = {"text": 384, "image": 1280}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device):
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


# -- (a) image encoding ------------------------------------------------------------------------

def synthetic_images(model, device, batch: int, batches: int, warmup: int,
                     dtype=None) -> dict:
    """images/s of `model` on random 224×224 batches (under autocast to `dtype` if given)."""
    import contextlib

    import torch

    x = torch.randn(batch, 3, 224, 224, device=device)
    cast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())
    with torch.inference_mode(), cast:
        for _ in range(warmup):
            model(x)
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            out = model(x)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"images": batch * batches, "batch": batch, "seconds": seconds,
            "images_per_s": batch * batches / seconds, "feature_dim": int(out.shape[-1]),
            "peak_allocated_mb": _peak_mb(device)}


def write_posters(folder: Path, distinct: int = 256) -> list[str]:
    """`distinct` synthetic 300×450 JPEG posters (gradients and blocks) → their paths."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:450, :300]
    paths = []
    for i in range(distinct):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (yy / 449.0)[..., None]
        img = (c0 * (1 - t) + c1 * t).astype(np.float32)
        for _ in range(4):
            y, x = rng.integers(0, 400), rng.integers(0, 250)
            img[y:y + rng.integers(20, 120), x:x + rng.integers(20, 120)] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape)
        path = folder / f"{i}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def decode_only(encoder, paths: list[str], batch: int) -> dict:
    """images/s of the encoder's decode + transform alone (its loader, workers, no model)."""
    import torch

    from bonmf_core.content.encoders import _collate, _ImageFiles

    loader = torch.utils.data.DataLoader(_ImageFiles(paths, encoder.transform),
                                         batch_size=batch, num_workers=encoder.workers,
                                         collate_fn=_collate)
    t0 = time.perf_counter()
    n = 0
    for images, ok in loader:
        n += int(ok.sum())
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
            "workers": encoder.workers}


def encoder_pipeline(model_name: str, weights: Path, device: str, paths: list[str],
                     batch: int, warmup_paths: list[str]) -> dict:
    """The project's ImageEncoder (decode + transform + forward) over `paths` → images/s."""
    import torch

    from bonmf_core.content.encoders import ImageEncoder

    enc = ImageEncoder(model_name, weights=str(weights), device=device, batch_size=batch)
    if warmup_paths:
        enc.encode(warmup_paths)
    dev = torch.device(device)
    _sync(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    vectors, present = enc.encode(paths)
    _sync(dev)
    seconds = time.perf_counter() - t0
    out = {"images": len(paths), "encoded": int(present.sum()), "seconds": seconds,
           "images_per_s": len(paths) / seconds, "precision": enc.precision,
           "batch": enc.batch_size, "workers": enc.workers, "dim": int(vectors.shape[1]),
           "peak_allocated_mb": _peak_mb(dev)}
    if dev.type == "cuda":
        out["decode_only"] = decode_only(enc, paths, enc.batch_size)
    del enc
    return out


def image_benchmarks(args, device) -> dict:
    import timm
    import torch

    print(f"(a) image encoding: {args.image_model}, random weights", flush=True)
    torch.manual_seed(0)
    full = timm.create_model(args.image_model, pretrained=False)
    out: dict = {"model": args.image_model, "weights": "random init (timm, pretrained=False)"}
    with tempfile.TemporaryDirectory(prefix="bonmf-gpu-") as tmp:
        weights = Path(tmp) / "random.pth"
        torch.save(full.state_dict(), weights)
        full.reset_classifier(0)
        model = full.eval()
        cpu = torch.device("cpu")
        synthetic = out["synthetic"] = {"reference_cpu_fp32": synthetic_images(
            model, cpu, args.cpu_batch, max(1, args.cpu_images // args.cpu_batch), warmup=1)}
        model = model.to(device)
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            synthetic[name] = synthetic_images(model, device, args.batch, args.batches,
                                               args.warmup, dtype)
        del model, full
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = synthetic["reference_cpu_fp32"]["images_per_s"]
        for name in ("fp16", "bf16"):
            r = synthetic[name]
            synthetic[f"{name}_speedup_vs_cpu"] = r["images_per_s"] / ref
            print(f"  synthetic {name:>4} on {device.type}: {r['images_per_s']:9.1f} images/s  "
                  f"(CPU fp32 reference {ref:.1f} images/s: ×{r['images_per_s'] / ref:.1f})",
                  flush=True)
        distinct = write_posters(Path(tmp) / "posters", min(256, args.images))
        paths = [distinct[i % len(distinct)] for i in range(args.images)]
        pipeline = out["pipeline"] = {"reference_cpu": encoder_pipeline(
            args.image_model, weights, "cpu", paths[:args.cpu_images], args.cpu_batch, [])}
        pipeline["device"] = encoder_pipeline(args.image_model, weights, device.type, paths,
                                              args.batch,
                                              distinct[:min(len(distinct), args.batch * 2)])
    cpu_r, dev_r = pipeline["reference_cpu"], pipeline["device"]
    pipeline["speedup_vs_cpu"] = dev_r["images_per_s"] / cpu_r["images_per_s"]
    print(f"  ImageEncoder decode+transform+encode on {device.type} ({dev_r['precision']}): "
          f"{dev_r['images_per_s']:9.1f} images/s  (CPU {cpu_r['precision']} reference "
          f"{cpu_r['images_per_s']:.1f} images/s: ×{pipeline['speedup_vs_cpu']:.1f})",
          flush=True)
    if "decode_only" in dev_r:
        print(f"  decode+transform alone ({dev_r['decode_only']['workers']} workers): "
              f"{dev_r['decode_only']['images_per_s']:9.1f} images/s", flush=True)
    return out


# -- (b) training ------------------------------------------------------------------------------

def train_steps(model, split, cfg, device, max_steps: int | None, warmup_steps: int = 0,
                seed: int = 0) -> dict:
    """`training._run_epoch` on `device`: one epoch (or its first `max_steps` steps) after
    `warmup_steps` steps on a separate epoch draw → timings and samples/s."""
    import torch

    from bonmf_core.training import NegativeSampler, _epoch_pairs, _optimizers, _train_step

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.set_flush_denormal(True)
    users = split.train["user"].to_numpy()
    items = split.train["item"].to_numpy()
    warm = split.warm_items()
    model.warm_items.copy_(torch.from_numpy(warm))
    model.warm_users.copy_(torch.from_numpy(split.warm_users()))
    sampler = NegativeSampler(users, items, split.n_users, split.n_items, np.flatnonzero(warm),
                              gen)
    u_pos = torch.tensor(users, dtype=torch.long)
    i_pos = torch.tensor(items, dtype=torch.long)
    model.to(device)
    optimizers = _optimizers(model, cfg)
    model.train()

    def run(steps_cap):
        _sync(device)
        t0 = time.perf_counter()
        u, it, labels, groups = _epoch_pairs(sampler, u_pos, i_pos, cfg, gen)
        u, it, labels = u.to(device), it.to(device), labels.to(device)
        _sync(device)
        t1 = time.perf_counter()
        steps = done = 0
        total = 0.0
        for s in range(0, len(u), groups):
            batch = it[s:s + groups]
            n = len(batch)
            total += _train_step(model, optimizers, u[s:s + groups], batch, labels, cfg,
                                 pairs=batch.numel()) * n
            steps, done = steps + 1, done + n
            if steps_cap and steps >= steps_cap:
                break
        _sync(device)
        t2 = time.perf_counter()
        width = it.shape[1]
        return {"steps": steps, "epoch_steps": -(-len(u) // groups),
                "batch_samples": groups * width,
                "samples": done * width, "sampling_s": t1 - t0, "steps_s": t2 - t1,
                "steps_samples_per_s": done * width / (t2 - t1),
                "samples_per_s": done * width / (t2 - t0), "loss": total / max(done, 1)}

    if warmup_steps:
        run(warmup_steps)
    _reset_peak(device)
    result = run(max_steps)
    result["peak_allocated_mb"] = _peak_mb(device)
    result["device"] = device.type
    return result


def training_benchmarks(args, device) -> dict:
    import torch

    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.data.splits import leave_one_out_split
    from bonmf_core.experiment.variants import build_bonmf

    cfg = load_config(args.params, args.set, {"model": {"user_attributes": False}})
    print(f"(b) training: synthetic {args.users} users × {args.items} items", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bonmf-gpu-demo-") as tmp:
        dataset = demo_dataset(seed=0, n_users=args.users, n_items=args.items,
                               mean_interactions=args.mean_interactions,
                               image_dir=Path(tmp) / "images")
    split = leave_one_out_split(dataset, seed=0, n_negatives=1)
    rng = np.random.default_rng(0)
    features = {m: rng.standard_normal((dataset.n_items, d)).astype(np.float32)
                for m, d in FEATURE_DIMS.items()}
    out: dict = {"data": {"users": dataset.n_users, "items": dataset.n_items,
                          "interactions": len(dataset.interactions),
                          "train_pairs": len(split.train),
                          "generated_s": time.perf_counter() - t0},
                 "batch_size": cfg.train.batch_size, "negatives": cfg.train.negatives,
                 "loop": "training._run_epoch with a device (train() has no device support)"}
    print(f"  {len(dataset.interactions):,} interactions, {len(split.train):,} training pairs",
          flush=True)
    for variant, modalities in (("id", ("id",)), ("text+image", ("id", "text", "image"))):
        runs = {}
        for key, dev, steps, warmup in (("device", device, None, args.warmup_steps),
                                        ("reference_cpu", torch.device("cpu"), args.cpu_steps, 3)):
            torch.manual_seed(0)
            model = build_bonmf(dataset, modalities, cfg.model, features)
            runs[key] = train_steps(model, split, cfg.train, dev, steps, warmup)
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        fast, ref = runs["device"], runs["reference_cpu"]
        runs["speedup_vs_cpu"] = fast["steps_samples_per_s"] / ref["steps_samples_per_s"]
        out[variant] = runs
        print(f"  {variant:>10} on {device.type}: {fast['steps_samples_per_s'] / 1e6:7.2f} M "
              f"samples/s in steps, {fast['samples_per_s'] / 1e6:6.2f} M/s with sampling, "
              f"epoch {fast['sampling_s'] + fast['steps_s']:.2f} s  (CPU reference, "
              f"{ref['steps']} steps: {ref['steps_samples_per_s'] / 1e6:.2f} M samples/s: "
              f"×{runs['speedup_vs_cpu']:.1f})", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=128, help="CUDA image batch")
    p.add_argument("--batches", type=int, default=20, help="timed synthetic CUDA batches")
    p.add_argument("--warmup", type=int, default=3, help="warm-up synthetic batches")
    p.add_argument("--images", type=int, default=2048, help="JPEGs through ImageEncoder on CUDA")
    p.add_argument("--cpu-images", type=int, default=32, help="images of each CPU reference")
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--users", type=int, default=ML1M_USERS)
    p.add_argument("--items", type=int, default=ML1M_ITEMS)
    p.add_argument("--mean-interactions", type=float, default=ML1M_MEAN)
    p.add_argument("--warmup-steps", type=int, default=10, help="CUDA training warm-up steps")
    p.add_argument("--cpu-steps", type=int, default=60, help="training steps of the CPU reference")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of the CPU references (default: torch's own)")
    p.add_argument("--skip", choices=("image", "train"), default=None)
    # Runs the whole script with the CPU standing in for CUDA (tiny sizes): tests only.
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is false here "
              "(nothing measured)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    started = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_model": cpu_model(),
           "cpus": os.cpu_count(), "cpu_torch_threads": torch.get_num_threads()}
    print(f"device: {out['device']}; CPU reference: {out['cpu_model']}, "
          f"{out['cpu_torch_threads']} torch threads", flush=True)
    if args.skip != "image":
        out["image"] = image_benchmarks(args, device)
    if args.skip != "train":
        out["train"] = training_benchmarks(args, device)
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
