"""`bonmf` command line: the main job (train + evaluate + save) on the embedded demo default."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import ConfigMismatchError, DataError, LeakageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonmf", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate BoNMF and its baselines, save the model")
    run.add_argument("--data", default=None,
                     help="'demo' (default), a MovieLens-1M directory or a saved dataset")
    run.add_argument("--params", default=None, help="params.yaml (default: built-in defaults)")
    run.add_argument("--protocol", choices=("ncf", "full", "cold_items"), default=None)
    run.add_argument("--ncf-dir", default=None,
                     help="canonical NCF test files (ml-1m.test.rating/.negative)")
    run.add_argument("--variants", default="pop,bpr,id,text+image")
    run.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1,2")
    run.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    run.add_argument("--out", default=None,
                     help="output folder (default: <state dir>/runs/<timestamp>)")
    run.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        return _run(args)
    except (DataError, ConfigMismatchError, LeakageError, KeyError, ValueError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .jobs import train_and_evaluate
    from .params import load_params
    from .settings import state_dir

    overrides: dict = {"data": {}, "protocol": {}, "train": {}}
    if args.data:
        overrides["data"]["source"] = args.data
    if args.protocol:
        overrides["protocol"]["name"] = args.protocol
    if args.ncf_dir:
        overrides["protocol"]["ncf_dir"] = args.ncf_dir
    if args.seeds:
        overrides["protocol"]["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.epochs:
        overrides["train"]["epochs"] = args.epochs
    params = load_params(args.params, overrides)
    out = Path(args.out) if args.out else state_dir() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    summary = train_and_evaluate(params, args.variants, out)
    print()
    print(summary["table"])
    print()
    print(f"model:   {summary['model_path']}")
    print(f"metrics: {summary['metrics_path']}")
    print(json.dumps({"best_variant": summary["best_variant"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
