"""Training throughput: samples/s, seconds per epoch and peak RSS for one variant.

    python benchmarks/train_throughput.py --data demo|DIR --variant id --epochs 2 --out FILE.json

Trains on the `ncf` leave-one-out split without validation, so only training is timed.
Under `torchrun --nproc_per_node N` it trains data-parallel (DDP, the same global batch);
samples/s is then the throughput of all ranks together, and rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from bonmf_core import distributed
from bonmf_core.atomic import write_json
from bonmf_core.config import BASELINE_VARIANTS, add_config_arguments, load_config
from bonmf_core.content.features import basic_content_features
from bonmf_core.data.readers import load_dataset
from bonmf_core.experiment.variants import build_bonmf, modalities_of, parse_variants
from bonmf_core.data.splits import leave_one_out_split
from bonmf_core.training import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="default: data.source")
    p.add_argument("--variant", default="id")
    p.add_argument("--epochs", type=int, default=2)
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    (variant,) = parse_variants(args.variant)
    if variant in BASELINE_VARIANTS:
        sys.exit("train_throughput measures BoNMF variants: id, text, image, text+image")
    cfg = load_config(args.params, args.set,
                      {"train": {"epochs": args.epochs},
                       **({"data": {"source": args.data}} if args.data else {})})
    with distributed.main_first():   # a generated demo is written once, by rank 0
        dataset = load_dataset(cfg.data)
    split = leave_one_out_split(dataset, seed=0)
    modalities = modalities_of(variant)
    features, _ = basic_content_features(dataset, [m for m in modalities if m != "id"],
                                         cfg.encoders)
    model = build_bonmf(dataset, modalities, cfg.model, features)
    started = time.perf_counter()
    result = train(model, split, cfg.train, seed=0, validate=False)
    if not distributed.is_main():
        return 0
    out = {
        "data": dataset.name, "variant": variant, "epochs": result.epochs_run,
        "world_size": result.world_size,
        "batch_size": cfg.train.batch_size, "negatives": cfg.train.negatives,
        "samples_per_s": result.samples_per_s,
        "epoch_s": result.seconds / result.epochs_run,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
