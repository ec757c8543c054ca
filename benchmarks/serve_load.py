"""Load test of the served Bento's `recommend` API, and a bounded soak.

    python benchmarks/serve_load.py --bento latest --rps 100 --concurrency 8 --seconds 30 \\
        --out results/serve_load_100rps.json
    python benchmarks/serve_load.py --bento latest --rps 0 --concurrency 16 --seconds 30 \\
        --out results/serve_load_saturation.json
    # the soak: 10,000 requests at concurrency 64, then it stops by itself; a worker's RSS
    # warms up over its first ~10,000 requests (then flat), hence the longer warmup
    python benchmarks/serve_load.py --bento latest --rps 0 --concurrency 64 --requests 10000 \\
        --warmup 40 --out results/serve_soak.json
    python benchmarks/serve_load.py --demo ...   # a demo model packaged on the spot

Starts `bentoml serve TAG` (TAG `latest` = the production Bento recorded in
`<state>/artifacts/bento/bento.json`; or any Bento tag), then drives `recommend` from this
process — a lean asyncio HTTP/1.1 client over keep-alive connections, so the client costs the
2 cores as little as possible — with a realistic mix of users: known users drawn in proportion
to their activity (active users ask more often) and 5% users the model has never seen
(the popularity fallback). Stops the server and prints / writes
{"rps", "p50_ms", "p95_ms", "p99_ms", "errors", "worker_rss_mb", "worker_rss_growth_pct", ...}.

`--requests N` bounds the run by requests instead of `--seconds`: N measured requests after the
warmup. Worker memory (RSS of the server's worker processes) is sampled every second; the
growth is from the end of the warmup to the end of the run (from a short warmup it includes
the worker's own warm-up: benchmarks/RESULTS.md, "Serving soak"). `$BONMF_API_KEY`, when set, reaches
the server and every request carries it. The server — its workers included — is stopped on
every path out of this script (error, Ctrl-C, SIGTERM; `BentoServer` also on SIGKILL of this
process, on Linux).

`--rps R` is an open loop: request i is due at i/R seconds and its latency counts from then,
so a server that falls behind shows the queueing (no coordinated omission). `--rps 0` sends as
fast as `--concurrency` connections allow (saturation throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonmf_core.config import add_config_arguments  # noqa: E402  (after the path insert)

UNKNOWN_SHARE = 0.05


def resolve_bento(tag: str, state: Path) -> tuple[str, str]:
    """(bento tag, BENTOML_HOME) for `latest` (the production Bento) or an explicit tag."""
    record_path = state / "artifacts" / "bento" / "bento.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    home = os.environ.get("BENTOML_HOME") or record.get("bentoml_home") or str(state / "bentoml")
    if tag == "latest":
        if not record:
            sys.exit(f"{record_path} not found: package a production model first "
                     f"(`bonmf run`, or `bonmf package`), or pass --bento TAG")
        return record["bento_tag"], home
    return tag, home


def user_mix(bento_tag: str, n: int, seed: int = 0) -> list[str]:
    """`n` user ids: known users ∝ their number of interactions, 5% unknown."""
    import bentoml
    from safetensors.numpy import load_file

    model_tag = next(str(m.tag) for m in bentoml.bentos.get(bento_tag).info.all_models)
    path = Path(bentoml.models.get(model_tag).path)
    users = json.loads((path / "model" / "id_maps.json").read_text())["user_ids"]
    activity = np.diff(load_file(str(path / "catalog.safetensors"))["seen_indptr"]).astype(float)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(users), size=n, p=activity / activity.sum())
    unknown = rng.random(n) < UNKNOWN_SHARE
    return [f"new-user-{i}" if unknown[i] else users[u] for i, u in enumerate(picks)]


async def _request(reader, writer, host: str, body: bytes, auth: bytes) -> int:
    writer.write(b"POST /recommend HTTP/1.1\r\nHost: " + host.encode() + auth +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " +
                 str(len(body)).encode() + b"\r\n\r\n" + body)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(status_line.split()[1])


class RssSampler:
    """The server's worker RSS (MB, summed) once a second: `mark()` at the end of the
    warmup, `summary()` at the end → baseline, final, peak and growth."""

    def __init__(self, rss_mb):
        self.rss_mb, self.samples, self.baseline = rss_mb, [], None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(self.rss_mb())
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        self.samples.append(self.rss_mb())

    def mark(self) -> None:
        self.baseline = self.rss_mb()

    def summary(self) -> dict:
        base = self.baseline or (self.samples[0] if self.samples else 0.0)
        final = self.samples[-1] if self.samples else 0.0
        return {"worker_rss_mb": {"after_warmup": round(base, 1), "final": round(final, 1),
                                  "peak": round(max(self.samples, default=0.0), 1)},
                "worker_rss_growth_pct": round(100 * (final - base) / base, 2) if base else None,
                "worker_rss_samples_mb": [round(x, 1) for x in self.samples]}


async def drive(host: str, port: int, users: list[str], rps: float, concurrency: int,
                seconds: float, warmup: float, requests: int | None = None,
                rss_mb=None, api_key: str | None = None) -> dict:
    """Send requests for warmup + seconds (or, with `requests`, until that many were sent
    after the warmup); latencies of those due after the warmup."""
    bodies = [json.dumps({"user_id": u, "k": 10}).encode() for u in users]
    auth = b"\r\nAuthorization: Bearer " + api_key.encode() if api_key else b""
    total = warmup + seconds
    start = time.perf_counter() + 0.05
    latencies, errors, counted, budget = [], 0, 0, requests
    next_i, measuring = 0, None
    sampler = RssSampler(rss_mb) if rss_mb else None

    def take() -> tuple[int, float] | None:
        """The next request's index and due time, or None when the run is over."""
        nonlocal next_i, budget, measuring
        i = next_i
        next_i += 1
        due = start + i / rps if rps > 0 else time.perf_counter()
        if due - start >= warmup:
            if measuring is None:  # the first measured request: the warmup is over
                measuring = time.perf_counter()
                if sampler:
                    sampler.mark()
            if budget is not None:
                budget -= 1
                if budget < 0:
                    return None
        if budget is None and due - start >= total:
            return None
        return i, due

    async def worker():
        nonlocal errors, counted
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (job := take()) is not None:
                i, due = job
                now = time.perf_counter()
                if rps > 0 and due > now:
                    await asyncio.sleep(due - now)
                sent = time.perf_counter()
                try:
                    status = await _request(reader, writer, host, bodies[i % len(bodies)], auth)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                done = time.perf_counter()
                if (due if rps > 0 else sent) - start < warmup:
                    continue
                counted += 1
                if status != 200:
                    errors += 1
                latencies.append(done - (due if rps > 0 else sent))
        finally:
            writer.close()

    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop)) if sampler else None
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ended = time.perf_counter()
    stop.set()
    if sampling:
        await sampling
    wall = ended - (measuring or ended)
    lat = np.array(latencies) * 1000
    result = {"rps": round(counted / max(wall, 1e-9), 1),
              "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
              "p95_ms": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
              "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
              "max_ms": round(float(lat.max()), 2) if len(lat) else None,
              "errors": errors, "requests": counted, "measured_s": round(wall, 2)}
    return {**result, **(sampler.summary() if sampler else {})}


def worker_rss_mb(server) -> float:
    """RSS of the server's worker processes (not `bentoml serve` itself), MB."""
    import psutil

    total = 0
    for p in server.processes():
        if p.pid == server.proc.pid:
            continue
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2 ** 20


def demo_bento(folder: Path, args) -> str:
    """Package a demo model on the spot (`data.demo_*` size, weight-free content features,
    a short training) into `folder` → its Bento tag; BENTOML_HOME is set to `folder`."""
    os.environ["BENTOML_HOME"] = str(folder / "bentoml")
    import torch

    from bentos.packaging import package
    from bonmf_core.config import load_config
    from bonmf_core.data.demo import demo_dataset
    from bonmf_core.recommender import Recommender

    torch.set_num_threads(1)
    config = load_config(args.params, ["encoders.source=basic", "train.epochs=3",
                                       "train.refit=false", *args.set])
    dataset = demo_dataset(seed=config.data.demo_seed, n_users=config.data.demo_users,
                           n_items=config.data.demo_items, image_dir=folder / "images")
    Recommender.fit(dataset, "id", config).save(folder / "model")
    dataset.save(folder / "dataset")
    record = package(folder / "model", folder / "dataset", folder / "out", config,
                     {"model_version": 0, "variant": "id"})
    return record["bento_tag"]


def _stop_on_sigterm() -> None:
    """SIGTERM → SystemExit, so the `with BentoServer` block stops the server."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bento", default="latest", help="Bento tag, or `latest` (production)")
    p.add_argument("--demo", action="store_true",
                   help="package a demo model on the spot and load that (ignores --bento)")
    p.add_argument("--rps", type=float, default=100.0, help="target rate; 0 = saturate")
    p.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    p.add_argument("--seconds", type=float, default=30.0, help="measured duration")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests instead of --seconds (a bounded soak)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    p.add_argument("--state", default=None, help="state folder (default BONMF_STATE_DIR)")
    p.add_argument("--workers", type=int, default=None,
                   help="server worker processes (BONMF_SERVE_WORKERS; default 1)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    add_config_arguments(p)
    args = p.parse_args()
    _stop_on_sigterm()

    import tempfile

    from bonmf_core.settings import state_dir

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.demo:
            tag, home = demo_bento(Path(tmp), args), os.environ["BENTOML_HOME"]
        else:
            state = Path(args.state).resolve() if args.state else state_dir()
            tag, home = resolve_bento(args.bento, state)
        result = run(args, tag, home)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


def run(args, tag: str, home: str) -> dict:
    os.environ["BENTOML_HOME"] = home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from bentos.server import BentoServer

    users = user_mix(tag, 20000)
    env = {"BENTOML_HOME": home, "OMP_NUM_THREADS": "1"}
    if args.workers:
        env["BONMF_SERVE_WORKERS"] = str(args.workers)
    started = time.perf_counter()
    with BentoServer(tag, env=env) as server:
        ready_s = time.perf_counter() - started
        result = asyncio.run(drive(server.host, server.port, users, args.rps, args.concurrency,
                                   args.seconds, args.warmup, args.requests,
                                   lambda: worker_rss_mb(server),
                                   os.environ.get("BONMF_API_KEY")))
    result.update(target_rps=args.rps, concurrency=args.concurrency,
                  seconds=None if args.requests else args.seconds,
                  requests_target=args.requests, bento=tag, demo=args.demo,
                  server_workers=args.workers or int(os.environ.get("BONMF_SERVE_WORKERS",
                                                                    "1")),
                  server_ready_s=round(ready_s, 2), cpu_count=os.cpu_count(),
                  unknown_user_share=UNKNOWN_SHARE)
    return result


if __name__ == "__main__":
    main()
