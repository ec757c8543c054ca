"""Training throughput: samples/s, seconds per epoch and peak RSS per BoNMF variant, all in
one run, beside the plain same-architecture NeuMF loop (`benchmarks/reference_loop.py`).

    python benchmarks/train_throughput.py --data demo|DIR --variants id,text+image --reference \
        --epochs 5 --out FILE.json

Trains on the `ncf` leave-one-out split without validation, so only training is timed. The
variants and the reference take turns, one epoch each per round (shared machines slow down
in phases); epoch times are medians over the rounds and each ratio the median of the rounds'
paired ratios. Content features are the configured encoders' (`encoders.source`, pretrained
by default: the embedding cache is filled first, outside the timing); `--set encoders.source=basic` for weight-free ones.
Printed ratios: each variant against the first (the content path's cost over ID-only) and the
first against the reference loop. Under `torchrun --nproc_per_node N` it trains data-parallel
(DDP, the same global batch); samples/s is then the throughput of all ranks together, and
rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from statistics import median
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bonmf_core import distributed  # noqa: E402
from bonmf_core.atomic import write_json  # noqa: E402
from bonmf_core.config import BASELINE_VARIANTS, add_config_arguments, load_config  # noqa: E402
from bonmf_core.content.features import content_features  # noqa: E402
from bonmf_core.data.readers import load_dataset  # noqa: E402
from bonmf_core.experiment.variants import build_bonmf, modalities_of, parse_variants  # noqa: E402
from bonmf_core.data.splits import leave_one_out_split  # noqa: E402
from bonmf_core.training import train  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="default: data.source")
    p.add_argument("--variants", "--variant", default="id", help="comma-separated BoNMF variants")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of each variant (and of the reference), one per round")
    p.add_argument("--reference", action="store_true",
                   help="also time the plain NeuMF loop (benchmarks/reference_loop.py)")
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    if set(variants) & set(BASELINE_VARIANTS):
        sys.exit("train_throughput measures BoNMF variants: id, text, image, text+image")
    cfg = load_config(args.params, args.set,
                      {"train": {"epochs": args.epochs},
                       **({"data": {"source": args.data}} if args.data else {})})
    with distributed.main_first():   # a generated demo is written once, by rank 0
        dataset = load_dataset(cfg.data)
    split = leave_one_out_split(dataset, seed=0)
    wanted = sorted({m for v in variants for m in modalities_of(v)} - {"id"})
    with distributed.main_first():
        features, feature_report = content_features(dataset, wanted, cfg.encoders)
    # Interleaved: every variant (and the reference) trains one epoch per round, so a slow
    # phase of a shared machine hits them all alike; the figures are medians over rounds and
    # each ratio is the median of the rounds' paired ratios.
    models = {v: build_bonmf(dataset, modalities_of(v), cfg.model, features) for v in variants}
    one_epoch = cfg.train.model_copy(update={"epochs": 1})
    epochs: dict[str, list[float]] = {v: [] for v in variants}
    samples_per_s: dict[str, list[float]] = {v: [] for v in variants}
    reference: list[dict] = []
    for round_ in range(args.epochs):
        for variant, model in models.items():
            result = train(model, split, one_epoch, seed=round_, validate=False)
            epochs[variant].append(result.seconds)
            samples_per_s[variant].append(result.samples_per_s)
        if args.reference:
            from reference_loop import run_reference

            reference.append(run_reference(
                split.train["user"].to_numpy(), split.train["item"].to_numpy(),
                dataset.n_users, dataset.n_items, epochs=1, seed=round_,
                batch_size=cfg.train.batch_size, negatives=cfg.train.negatives))
    runs = {v: {"samples_per_s": median(samples_per_s[v]), "epoch_s": median(epochs[v]),
                "epoch_s_each": epochs[v], "epochs": args.epochs,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            for v in variants}
    if not distributed.is_main():
        return 0
    first = variants[0]
    out = {"data": dataset.name, "world_size": distributed.world_size(),
           "batch_size": cfg.train.batch_size, "negatives": cfg.train.negatives,
           "features": feature_report, "variants": runs,
           "epoch_cost_vs_" + first: {v: median(a / b for a, b in zip(epochs[v], epochs[first]))
                                      for v in variants}}
    if args.reference:
        ref_epochs = [r["epoch_s"] for r in reference]
        out["reference"] = {**reference[-1], "epochs": args.epochs, "epoch_s": median(ref_epochs),
                            "epoch_s_each": ref_epochs,
                            "samples_per_s": median(r["samples_per_s"] for r in reference)}
        out[first + "_speed_vs_reference"] = median(r / e for r, e in zip(ref_epochs,
                                                                          epochs[first]))
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
