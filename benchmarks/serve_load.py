"""Load test of the served Bento's `recommend` API.

    python benchmarks/serve_load.py --bento latest --rps 100 --concurrency 8 --seconds 30 \\
        --out results/serve_load_100rps.json
    python benchmarks/serve_load.py --bento latest --rps 0 --concurrency 16 --seconds 30 \\
        --out results/serve_load_saturation.json

Starts `bentoml serve TAG` (TAG `latest` = the production Bento recorded in
`<state>/artifacts/bento/bento.json`; or any Bento tag), then drives `recommend` from this
process — a lean asyncio HTTP/1.1 client over keep-alive connections, so the client costs the
2 cores as little as possible — with a realistic mix of users: known users drawn in proportion
to their activity (active users ask more often) and 5% users the model has never seen
(the popularity fallback). Stops the server and prints / writes
{"rps", "p50_ms", "p95_ms", "p99_ms", "errors", ...}.

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


async def _request(reader, writer, host: str, body: bytes) -> int:
    writer.write(b"POST /recommend HTTP/1.1\r\nHost: " + host.encode() +
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


async def drive(host: str, port: int, users: list[str], rps: float, concurrency: int,
                seconds: float, warmup: float) -> dict:
    """Send requests for warmup + seconds; latencies of those due after the warmup."""
    bodies = [json.dumps({"user_id": u, "k": 10}).encode() for u in users]
    total = warmup + seconds
    start = time.perf_counter() + 0.05
    latencies, errors, counted = [], 0, 0
    next_i = 0

    async def worker():
        nonlocal next_i, errors, counted
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                i = next_i
                next_i += 1
                due = start + (i / rps if rps > 0 else 0.0)
                now = time.perf_counter()
                if (due if rps > 0 else now) - start >= total:
                    return
                if rps > 0 and due > now:
                    await asyncio.sleep(due - now)
                sent = time.perf_counter()
                try:
                    status = await _request(reader, writer, host, bodies[i % len(bodies)])
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

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0 - warmup
    lat = np.array(latencies) * 1000
    return {"rps": round(counted / max(wall, 1e-9), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "errors": errors, "requests": counted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bento", default="latest", help="Bento tag, or `latest` (production)")
    p.add_argument("--rps", type=float, default=100.0, help="target rate; 0 = saturate")
    p.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    p.add_argument("--seconds", type=float, default=30.0, help="measured duration")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    p.add_argument("--state", default=None, help="state folder (default BONMF_STATE_DIR)")
    p.add_argument("--workers", type=int, default=None,
                   help="server worker processes (BONMF_SERVE_WORKERS; default 1)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args()

    from bonmf_core.settings import state_dir

    state = Path(args.state).resolve() if args.state else state_dir()
    tag, home = resolve_bento(args.bento, state)
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
                                   args.seconds, args.warmup))
    result.update(target_rps=args.rps, concurrency=args.concurrency, seconds=args.seconds,
                  bento=tag, server_workers=args.workers or int(
                      os.environ.get("BONMF_SERVE_WORKERS", "1")),
                  server_ready_s=round(ready_s, 2), cpu_count=os.cpu_count(),
                  unknown_user_share=UNKNOWN_SHARE)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
