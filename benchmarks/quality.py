"""Quality benchmark: variants × seeds on one protocol, mean ± std, written as JSON.

    python benchmarks/quality.py --data demo|DIR --protocol ncf|full|cold_items \
        --variants pop,bpr,id,text,image,text+image --seeds 0,1,2 --out FILE.json

For ML-1M with the canonical NCF test files pass `--ncf-dir ../shared/datasets/ml-1m-ncf`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bonmf_core.atomic import write_json
from bonmf_core.experiment.variants import format_table, load_dataset, run_protocol
from bonmf_core.params import load_params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo")
    p.add_argument("--protocol", choices=("ncf", "full", "cold_items"), default="ncf")
    p.add_argument("--variants", default="pop,bpr,id")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ncf-dir", default=None)
    p.add_argument("--params", default=None, help="params.yaml to start from")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                   help="override one parameter, e.g. --set train.lr=0.001")
    p.add_argument("--out", required=True)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)

    overrides: dict = {"protocol": {"name": args.protocol,
                                    "seeds": [int(s) for s in args.seeds.split(",")]}}
    if args.ncf_dir:
        overrides["protocol"]["ncf_dir"] = args.ncf_dir
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = json.loads(value)
    params = load_params(args.params, overrides)
    dataset = load_dataset(args.data, params["data"]["demo_seed"])
    results = run_protocol(dataset, params, args.variants)
    print(format_table(results))
    print(f"seconds: {results['seconds']:.1f}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
