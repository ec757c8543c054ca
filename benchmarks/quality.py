"""Quality benchmark: variants × seeds on one protocol, mean ± std, written as JSON.

    python benchmarks/quality.py --data demo|DIR --protocol ncf|full|cold_items|cold_users \
        --variants pop,bpr,id,text,image,text+image --seeds 0,1,2 --out FILE.json

For ML-1M with the canonical NCF test files pass `--ncf-dir ../shared/datasets/ml-1m-ncf`.
Under `torchrun --nproc_per_node N` the BoNMF and BPR fits train data-parallel (DDP); rank 0
evaluates and writes the JSON, which records `world_size`.
Below the main table, a second one: NDCG@k (the first k) per item-popularity slice (head /
torso / tail from the training interactions, `protocol.head_share` and
`protocol.tail_max_interactions`), with each slice's mean user count; in the JSON as
`results[variant]["slices"]`.
The configuration is read as by every entry point (defaults < --params / ./params.yaml <
--set < these flags) and runs through the same runner as the Dagster assets and DVC stages.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bonmf_core import distributed
from bonmf_core.atomic import write_json
from bonmf_core.config import PROTOCOLS, add_config_arguments, load_config
from bonmf_core.errors import ConfigError
from bonmf_core.data.readers import load_dataset
from bonmf_core.experiment.report import format_table
from bonmf_core.experiment.runner import run_protocol


def format_slice_table(results: dict) -> str:
    """variant × slice NDCG@k (mean ± std over seeds); the header gives each slice's users."""
    metric = f"ndcg@{results['ks'][0]}"
    sliced = {v: r["slices"] for v, r in results["results"].items() if r.get("slices")}
    if not sliced:
        return ""
    names = list(dict.fromkeys(n for s in sliced.values() for n in s))
    first = next(iter(sliced.values()))
    users = [f"{n} ({first[n]['users']['mean']:.0f} users)" if n in first else n for n in names]
    lines = [f"{metric} by item-popularity slice", "| variant | " + " | ".join(users) + " |",
             "|---|" + "---|" * len(names)]
    for variant, slices in sliced.items():
        cells = [f"{slices[n][metric]['mean']:.4f} ± {slices[n][metric]['std']:.4f}"
                 if metric in slices.get(n, {}) else "—" for n in names]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flags_from(args) -> dict:
    flags: dict = {}
    if args.data:
        flags.setdefault("data", {})["source"] = args.data
    if args.protocol:
        flags.setdefault("protocol", {})["name"] = args.protocol
    if args.seeds:
        flags.setdefault("protocol", {})["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.ncf_dir:
        flags.setdefault("protocol", {})["ncf_dir"] = args.ncf_dir
    return flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="demo | a dataset directory (default: data.source)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None)
    p.add_argument("--variants", default=None,
                   help="comma-separated (default: pipeline.candidates + pipeline.baselines)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: protocol.seeds)")
    p.add_argument("--ncf-dir", default=None)
    p.add_argument("--cache", default=None,
                   help="fit cache folder: an unchanged (variant, seed) fit is reused from "
                        "there and BoNMF models are saved in it (default: no cache)")
    add_config_arguments(p)
    p.add_argument("--out", required=True)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    cfg = load_config(args.params, args.set, flags_from(args))
    try:
        distributed.init()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    with distributed.main_first():   # a generated demo is written once, by rank 0
        dataset = load_dataset(cfg.data)
    results = run_protocol(dataset, cfg, args.variants, cache_root=args.cache)
    results["world_size"] = distributed.world_size()
    if not distributed.is_main():
        return 0
    print(format_table(results))
    sliced = format_slice_table(results)
    if sliced:
        print("\n" + sliced)
    for variant, rec in results["validation"].items():
        print(f"validation {rec['metric']} {variant}: {rec['mean']:.4f} "
              f"(best epochs {rec['best_epochs']})")
        for tuning in rec.get("tuning", []):   # a setting validation chose after training
            print(f"  {tuning['parameter']}: {tuning['chosen']} "
                  f"(valid {max(tuning['valid'].values(), default=float('nan')):.4f})")
    print(f"seconds: {results['seconds']:.1f}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
