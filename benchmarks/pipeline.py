"""The whole orchestrated graph, cold and unchanged: wall seconds per asset and in total, peak RSS.

    python benchmarks/pipeline.py --data demo|DIR --out FILE.json [--state DIR] [--params P]
        [--epochs N] [--encoders pretrained|basic] [--seeds 0,1] [--variants id,text+image,pop,bpr]

Runs `orchestration.main.run_pipeline` twice, each in its own process (so each peak RSS is its
own): a cold run in a fresh state folder (nothing cached: encoding, training, everything), then
the same command with nothing changed, which should reuse the embedding cache and the training
cache and finish in seconds. Target on ML-1M, 2 CPU cores: cold ≤ 15 min, re-run ≤ 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bonmf_core.config import add_config_arguments


def _one(args) -> int:
    """Child: one run, its summary (with peak RSS) as JSON on the last stdout line."""
    from orchestration.cli import _parser, build_config
    from orchestration.main import run_pipeline

    cli = ["run", "--data", args.data]
    for flag, value in (("--params", args.params), ("--epochs", args.epochs),
                        ("--encoders", args.encoders), ("--seeds", args.seeds),
                        ("--variants", args.variants)):
        if value is not None:
            cli += [flag, str(value)]
    cli += [f"--set={s}" for s in args.set]
    cfg = build_config(_parser().parse_args(cli))
    started = time.perf_counter()
    summary = run_pipeline(cfg, state=Path(args.state), log_level="WARNING")
    wall = time.perf_counter() - started
    out = {"success": summary["success"], "error": summary.get("error"),
           "wall_s": round(wall, 2), "dagster_run_s": summary["seconds"],
           "steps_s": summary["steps"], "peak_rss_mb": round(
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if summary["success"]:
        out.update(decision=summary["decision"]["decision"],
                   reason=summary["decision"]["reason"],
                   candidate=summary["candidate"]["variant"],
                   metrics=summary["candidate"]["metrics"],
                   fits_reused=summary["fits_reused"], fits_total=summary["fits_total"],
                   fits=summary["fits"])
    print(json.dumps(out, default=float))
    return 0 if summary["success"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo")
    p.add_argument("--out", required=True)
    p.add_argument("--state", default=None, help="state folder (default: a fresh temp folder, "
                                                 "removed afterwards)")
    add_config_arguments(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--encoders", choices=("pretrained", "basic"), default=None)
    p.add_argument("--seeds", default=None)
    p.add_argument("--variants", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return _one(args)

    temp = None
    if args.state is None:
        temp = tempfile.mkdtemp(prefix="bonmf-pipeline-bench-")
        args.state = temp
    elif Path(args.state).exists() and any(Path(args.state).iterdir()):
        sys.exit(f"--state {args.state} is not empty: the cold run needs a fresh folder")
    child = [sys.executable, __file__, "--one", "--data", args.data, "--out", args.out,
             "--state", args.state]
    for flag in ("params", "epochs", "encoders", "seeds", "variants"):
        if getattr(args, flag) is not None:
            child += [f"--{flag}", str(getattr(args, flag))]
    child += [f"--set={s}" for s in args.set]
    env = {**os.environ, "BONMF_STATE_DIR": str(Path(args.state).resolve())}
    runs = {}
    try:
        for name in ("cold", "unchanged"):
            proc = subprocess.run(child, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                sys.exit(f"{name} run produced no result (exit {proc.returncode})")
            runs[name] = json.loads(lines[-1])
            print(f"{name}: {runs[name]['wall_s']} s, success={runs[name]['success']}",
                  file=sys.stderr)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    result = {"benchmark": "pipeline", "data": args.data, "cpus": os.cpu_count(),
              "options": {k: getattr(args, k) for k in ("params", "set", "epochs", "encoders",
                                                        "seeds", "variants")},
              "cold": runs["cold"], "unchanged": runs["unchanged"],
              "total_s": {k: v["wall_s"] for k, v in runs.items()},
              "peak_rss_mb": max(v["peak_rss_mb"] for v in runs.values())}
    from bonmf_core.atomic import write_json

    write_json(args.out, result)
    print(json.dumps(result["total_s"]))
    return 0 if all(v["success"] for v in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
