"""`bonmf` command line. `bonmf run`: the whole Dagster graph in-process on the demo default.

snapshot → data-quality checks → encoding → training (BoNMF + baselines) → evaluation →
promotion decision → packaging → versioning, with the state (SQLite store, snapshots, models,
reports, DAGSTER_HOME) in the state folder (`BONMF_STATE_DIR`, default ./.bonmf).

Configuration, for every command: schema defaults < params file (--params, else
$BONMF_PARAMS, else ./params.yaml) < --set section.key=value < explicit flags.
`bonmf params` prints the resolved configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bonmf_core.config import PROTOCOLS, add_config_arguments
from bonmf_core.errors import ConfigError, ConfigMismatchError, DataError, LeakageError

# Loggers of the libraries underneath: WARNING unless -v (their INFO chatter buries the summary).
QUIET_LOGGERS = ("alembic", "great_expectations", "bentoml", "dvc", "transformers", "timm",
                 "urllib3", "filelock", "httpx", "matplotlib", "PIL")


def _config_options(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="libraries' logs and full tracebacks")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonmf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole graph (checks, encoding, training, "
                                     "evaluation, promotion) in-process")
    run.add_argument("--data", default=None,
                     help="'demo' (default), a MovieLens-1M directory or a saved dataset")
    _config_options(run)
    run.add_argument("--protocol", choices=PROTOCOLS, default=None)
    run.add_argument("--ncf-dir", default=None,
                     help="canonical NCF test files (ml-1m.test.rating/.negative)")
    run.add_argument("--variants", default=None,
                     help="comma-separated; BoNMF variants (id, text, image, text+image) are "
                          "the candidates, the others (pop, bpr, genre_pop, content_knn, ease, "
                          "item_knn) the baselines (default: params pipeline.candidates + baselines)")
    run.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1,2")
    run.add_argument("--epochs", type=int, default=None,
                     help="override train.epochs and bpr.epochs")
    run.add_argument("--encoders", choices=("pretrained", "basic"), default=None,
                     help="override encoders.source")
    run.add_argument("--force-promotion", metavar="WHO", default=None,
                     help="promote the candidate whatever the gate says (recorded with WHO)")
    run.add_argument("--out", default=None,
                     help="also copy the report (report.html/.json, metrics.json/.md/.png) and the candidate "
                          "model here")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    shown = sub.add_parser("params", help="print the resolved configuration (YAML) and where "
                                          "it was read from")
    _config_options(shown)
    shown.add_argument("--defaults", action="store_true",
                       help="the schema defaults only (no params file, no --set)")
    package = sub.add_parser(
        "package", help="save a model into the BentoML store, build the Bento in bentos/ "
                        "and export it as a .bento archive (skipped when unchanged)")
    package.add_argument("--model", default=None,
                         help="model artifact folder (default: <state>/production/model)")
    package.add_argument("--dataset", default=None,
                         help="the saved dataset it was trained on (default: found in "
                              "<state>/datasets by the model's dataset hash)")
    package.add_argument("--out", default=None,
                         help="folder for the .bento archive and bento.json "
                              "(default: <state>/artifacts/bento)")
    _config_options(package)
    package.add_argument("--no-build", action="store_true",
                         help="only save the BentoML model; no Bento, no archive")
    _stage_parser(sub)
    restore = sub.add_parser(
        "restore", help="restore the dataset and model of a promoted version into promoted/ "
                        "(from the DVC remote, verified by hash; nothing changes on failure)")
    which = restore.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="model version id in the registry")
    which.add_argument("--rev", help="git revision whose promoted/*.dvc to restore "
                                     "(a commit, or a version tag such as model@v3)")
    _config_options(restore)
    _operator_parsers(sub)
    return p


def _operator_parsers(sub) -> None:
    """`bonmf status` and `bonmf serve`: the operator's commands on the state folder."""
    status = sub.add_parser("status", help="the production model, the last run, the last "
                                           "data checks and the last gate decision")
    _config_options(status)
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    serve = sub.add_parser(
        "serve", help="serve the production model's Bento (bentoml serve) on 127.0.0.1 "
                      "unless serving.host or --host says otherwise")
    _config_options(serve)
    serve.add_argument("--host", default=None, help="interface to bind (default serving.host)")
    serve.add_argument("--port", type=int, default=3000)


def _stage_parser(sub) -> None:
    """`bonmf stage <name>`: one pipeline step on fixed workspace paths (what dvc.yaml runs)."""
    stage = sub.add_parser("stage", help="run one pipeline stage on workspace paths "
                                         "(the commands of dvc.yaml)")
    stages = stage.add_subparsers(dest="stage", required=True)
    paths = {
        "snapshot": {"--out": "the raw snapshot folder (pictures copied inside)"},
        "validate": {"--snapshot": "the raw snapshot folder",
                     "--out": "the validated dataset folder",
                     "--report": "the data checks' outcome (JSON)"},
        "encode": {"--dataset": "the validated dataset folder",
                   "--out": "the feature folder (text.npy, image.npy, features.json)"},
        "train": {"--dataset": "the validated dataset folder", "--features": "the feature folder",
                  "--model": "where the candidate model goes",
                  "--fits": "every fit's metrics and the training curve (JSON)"},
        "evaluate": {"--fits": "the train stage's JSON",
                     "--out": "the report folder (metrics.json/.md/.png, training_curve.json)"},
    }
    for name, options in paths.items():
        parser = stages.add_parser(name)
        _config_options(parser)
        for option, help_text in options.items():
            parser.add_argument(option, required=True, help=help_text)


INPUT_ERRORS = ("DataError", "ConfigError")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    if not verbose:
        quiet_libraries()
    try:
        return _run(args)
    except (DataError, ConfigMismatchError, LeakageError, KeyError, ValueError,
            FileNotFoundError) as exc:
        if verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Other libraries' loggers at WARNING (some set their own level at import, so by name
    too), their progress bars and warnings off. Detail stays in Dagster's event log."""
    import os
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # A library that sets its own logger's level when it is (lazily) imported still reaches
    # the console handler: the handler itself drops other libraries' records below WARNING.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING
                          or r.name.startswith("bonmf_core"))
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_flags(args) -> dict:
    """The explicit `bonmf run` flags as a nested override (the last layer of precedence)."""
    from bonmf_core.config import BASELINE_VARIANTS
    from bonmf_core.experiment.variants import parse_variants

    flags: dict = {}

    def put(section: str, key: str, value) -> None:
        flags.setdefault(section, {})[key] = value

    if args.data:
        put("data", "source", args.data)
    if args.protocol:
        put("protocol", "name", args.protocol)
    if args.ncf_dir:
        put("protocol", "ncf_dir", args.ncf_dir)
    if args.seeds:
        try:
            put("protocol", "seeds", [int(s) for s in args.seeds.split(",")])
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if args.encoders:
        put("encoders", "source", args.encoders)
    if args.variants:
        variants = parse_variants(args.variants)
        candidates = [v for v in variants if v not in BASELINE_VARIANTS]
        if not candidates:
            raise ValueError("--variants needs at least one BoNMF variant "
                             "(id, text, image, text+image) to be the candidate")
        put("pipeline", "candidates", candidates)
        put("pipeline", "baselines", [v for v in variants if v in BASELINE_VARIANTS])
    if args.epochs:
        put("train", "epochs", args.epochs)
        put("bpr", "epochs", args.epochs)
    return flags


def build_config(args):
    """The configuration a command runs with: defaults < params file < --set < flags."""
    from bonmf_core.config import load_config
    from bonmf_core.data.snapshot import source_kind

    flags = run_flags(args) if args.command == "run" else {}
    cfg = load_config(args.params, args.set, flags)
    if args.command == "run":
        source_kind(cfg.data.source)  # a wrong --data fails here, before anything runs
    return cfg


def _package(args) -> int:
    from bentos.packaging import package_cli  # imports BentoML: only for `package`

    return package_cli(args)


def _stage(args) -> int:
    from bonmf_core.ops import stages

    # DVC shows each stage's output: this library's progress, not every library's INFO chatter.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("bonmf_core").setLevel(logging.INFO)
    cfg = build_config(args)
    if args.stage == "snapshot":
        stages.run_snapshot(cfg, args.out)
    elif args.stage == "validate":
        stages.run_validate(cfg, args.snapshot, args.out, args.report)
    elif args.stage == "encode":
        stages.run_encode(cfg, args.dataset, args.out)
    elif args.stage == "train":   # under torchrun: data-parallel, rank 0 writes
        from bonmf_core import distributed

        distributed.init()
        stages.run_train(cfg, args.dataset, args.features, args.model, args.fits)
    else:
        out = stages.run_evaluate(cfg, args.fits, args.out)
        print(out["table"])
    return 0


def _params(args) -> int:
    import yaml

    from bonmf_core.config import BonmfConfig, config_file_of

    cfg = BonmfConfig() if args.defaults else build_config(args)
    source = "schema defaults" if args.defaults else (config_file_of(args.params) or
                                                     "schema defaults (no params file)")
    print(f"# resolved from: {source}" + (f" + --set {' '.join(args.set)}" if args.set and
                                          not args.defaults else ""))
    print(yaml.safe_dump(cfg.dump(), sort_keys=False), end="")
    return 0


def _restore(args) -> int:
    from bonmf_core.ops import versioning
    from bonmf_core.settings import state_dir
    from bonmf_core.store.database import Store

    cfg = build_config(args)
    settings = cfg.dvc
    state = state_dir()
    try:
        repo = versioning.find_repo(settings, state)
        if repo is None:
            raise versioning.VersioningError(
                f"no DVC repository holds the state folder {state}; set dvc.repo")
        if args.version is not None:
            store = Store(cfg.encoders.store_url)
            try:
                hashes = versioning.hashes_of_version(store, args.version)
            finally:
                store.dispose()
            label = f"model version {args.version}"
        else:
            hashes, label = versioning.hashes_at_rev(repo, args.rev), f"revision {args.rev}"
        done = versioning.restore(repo, state, settings, hashes, label)
    except versioning.VersioningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in versioning.ARTIFACTS:
        print(f"restored {repo / done[name]['path']} (md5 {done[name]['md5']})")
    print(json.dumps(done))
    return 0


def _status(args) -> int:
    from bonmf_core.settings import state_dir
    from orchestration import status

    collected = status.collect(build_config(args), state_dir())
    print(json.dumps(collected, default=str) if args.json else status.render(collected))
    return 0


def _serve(args) -> int:
    """Replace this process with `bentoml serve` of the production Bento (so signals reach
    BentoML directly). The environment passes through: BONMF_API_KEY (or
    serving.api_key_file) turns the service's API-key check on."""
    import os

    from bonmf_core.settings import state_dir
    from orchestration import status

    cfg = build_config(args)
    production = status.collect(cfg, state_dir())["production"]
    command, env = serve_command(cfg, state_dir(), production, args.host, args.port)
    auth = ("API key from $BONMF_API_KEY" if os.environ.get("BONMF_API_KEY") else
            f"API key from {cfg.serving.api_key_file}" if cfg.serving.api_key_file else
            "none: anyone who can reach the address can call it")
    print(f"serving model version {production['version']} ({production['variant']}) as "
          f"{production['bento_tag']} on http://{command[command.index('--host') + 1]}:"
          f"{args.port}; auth: {auth}", flush=True)
    os.execve(command[0], command, env)


def serve_command(cfg, state: Path, production: dict | None, host: str | None,
                  port: int) -> tuple[list[str], dict]:
    """The `bentoml serve` argv and environment for the production Bento, or a ValueError
    saying what is missing."""
    import os

    if production is None:
        raise ValueError(f"no production model in {state}: `bonmf run` trains and promotes one")
    record_file = Path(state) / "artifacts" / "bento" / "bento.json"
    if production["bento_tag"] is None:
        raise ValueError(f"model version {production['version']} is in production but "
                         f"{record_file} holds no Bento of it: run `bonmf package` (or "
                         f"`bonmf run`) to build one")
    record = json.loads(record_file.read_text())
    bentoml = Path(sys.executable).with_name("bentoml")
    executable = str(bentoml) if bentoml.exists() else shutil.which("bentoml")
    if executable is None:
        raise FileNotFoundError("the bentoml command is not installed beside this Python")
    env = {**os.environ, "BENTOML_HOME": record["bentoml_home"],
           "BENTOML_DO_NOT_TRACK": "true"}
    return [executable, "serve", production["bento_tag"], "--host",
            host or cfg.serving.host, "--port", str(port)], env


def _run(args) -> int:
    if args.command == "status":
        return _status(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "package":
        return _package(args)
    if args.command == "stage":
        return _stage(args)
    if args.command == "restore":
        return _restore(args)
    if args.command == "params":
        return _params(args)
    from bonmf_core import distributed

    if distributed.world_size() > 1:   # N ranks would be N pipelines racing for one registry
        raise ConfigError(f"`bonmf run` is one pipeline, not a data-parallel job "
                          f"(WORLD_SIZE={distributed.world_size()}): start it without torchrun; "
                          f"distributed training is `torchrun … bonmf stage train` "
                          f"(docs/distributed-training.md)")
    cfg = build_config(args)
    from orchestration.main import run_pipeline  # imports Dagster: only for `run`

    summary = run_pipeline(cfg, force=args.force_promotion is not None,
                           forced_by=args.force_promotion,
                           # a failed step's stack trace is Dagster's ERROR record: -v only
                           log_level="INFO" if args.verbose else "CRITICAL",
                           progress=not args.quiet)
    print()
    print(f"run {summary['run_id']} ({summary['seconds']:.1f} s): "
          f"{'succeeded' if summary['success'] else 'FAILED'}")
    for run_id in summary.get("dead_runs_marked", []):
        print(f"  earlier run {run_id} had lost its process: marked failed (run_failures)")
    for name, check in summary.get("checks", {}).items():
        mark = "ok  " if check["passed"] else ("FAIL" if check["severity"] == "ERROR" else "warn")
        print(f"  check {mark} {name}: {check['description'][:400]}")
    if not summary["success"]:
        print(f"error: {summary.get('error')}", file=sys.stderr)
        print(f"nothing downstream of the failure ran; the registry and the production model "
              f"are unchanged. Details: {summary['ui']}")
        # unreadable input (a file, a column, an encoding) is the caller's to fix: 2, as for
        # bad arguments; a blocking check or a failed step is 1
        return 2 if summary.get("error_class") in INPUT_ERRORS else 1
    print()
    print(summary["table"])
    decision, candidate = summary["decision"], summary["candidate"]
    print()
    print(f"candidate:  {candidate['variant']} (model version {candidate['version_id']}, "
          f"{summary['fits_reused']}/{summary['fits_total']} fits reused from the cache)")
    print(f"gate:       {decision['decision'].upper()} — {decision['reason']}")
    print(f"production: " + (f"model version {decision['production_version']} at "
                             f"{decision['production_path']}" if decision["production_version"]
                             else "none yet"))
    package = summary.get("package") or {}
    if package.get("packaged"):
        print(f"bento:      {package.get('bento_tag', package['model_tag'])}"
              + (f" → {package['archive']}" if package.get("archive") else "")
              + (" (unchanged)" if package.get("reused") else ""))
        if package.get("bento_tag"):
            print(f"serve it:   BENTOML_HOME={package['bentoml_home']} bentoml serve "
                  f"{package['bento_tag']} --host 127.0.0.1")
    versioned = summary.get("versioned") or {}
    if versioned.get("versioned"):
        where = (f" on branch {versioned['git_branch']}" if versioned.get("git_branch") else "")
        where += f", tag {versioned['git_tag']}" if versioned.get("git_tag") else ""
        print(f"dvc:        model version {versioned['model_version']} pushed to "
              f"{versioned['remote']['url']}, pointer files committed at "
              f"{versioned['git_rev']}{where} (restore: bonmf restore --version "
              f"{versioned['model_version']})")
    elif versioned.get("reason"):
        print(f"dvc:        not versioned — {versioned['reason']}")
    print(f"report:     {summary['report']['html']} (+ report.json, metrics.json/.md/.png)")
    print(f"candidate artifact: {candidate['artifact_path']}")
    print(f"store:      {summary['store']}")
    print(f"open the UI: {summary['ui']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("json", "markdown", "plot", "html", "data"):
            shutil.copy2(summary["report"][name], out / Path(summary["report"][name]).name)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        shutil.copytree(candidate["artifact_path"], out / "model")
        print(f"copied:     report and candidate model to {out}")
    print(json.dumps({"decision": decision["decision"], "candidate": candidate["variant"],
                      "model_version": candidate["version_id"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
