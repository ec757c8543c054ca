"""Per-API latency of the serving logic in-process (no HTTP): what each answer costs the CPU.

    python benchmarks/serve_engine.py [--state DIR] [--model TAG] [--n 200] --out FILE.json

Loads the production Bento's model (`<state>/artifacts/bento/bento.json`, or `--model TAG`)
with one torch thread, as a server worker does, and times recommend (one user, and batches),
recommend_for_items (10 and 100 liked items), similar_items and score_new_item (text only,
text + image) → p50 / p95 milliseconds each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, n: int) -> dict:
    fn()  # warm
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3),
            "p95_ms": round(float(np.percentile(times, 95)), 3), "n": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", default=None)
    p.add_argument("--model", default=None, help="BentoML model tag (default: production)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from bonmf_core.settings import state_dir

    state = Path(args.state).resolve() if args.state else state_dir()
    record = json.loads((state / "artifacts" / "bento" / "bento.json").read_text())
    os.environ.setdefault("BENTOML_HOME", record["bentoml_home"])
    import bentoml
    from PIL import Image

    from bonmf_core.serving.engine import NewItem, ServingEngine

    torch.set_num_threads(1)
    started = time.perf_counter()
    engine = ServingEngine(bentoml.models.get(args.model or record["model_tag"]).path)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    users = [engine.user_ids[i] for i in rng.integers(len(engine.user_ids), size=4096)]
    items = engine.item_ids
    cursor = iter(range(10**9))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    text = NewItem(title="A quiet space station drama", genres="Drama|Sci-Fi",
                   text="Two engineers keep a failing station alive while a storm passes.")
    with_image = NewItem(**{**text.__dict__, "image": buf.getvalue()})
    n = args.n
    result = {
        "recommend": timed(lambda: engine.recommend(users[next(cursor) % 4096], 10), n),
        "recommend_batch_32_per_user": {
            k: round(v / 32, 3) if k.endswith("ms") else v for k, v in timed(
                lambda: engine.recommend_many(users[:32], 10), max(10, n // 10)).items()},
        "recommend_for_items_10": timed(
            lambda: engine.recommend_for_items(list(items[:10]), 10), max(10, n // 10)),
        "recommend_for_items_100": timed(
            lambda: engine.recommend_for_items(list(items[:100]), 10), max(10, n // 10)),
        "similar_items": timed(lambda: engine.similar_items(items[next(cursor) % len(items)]),
                               n),
        "score_new_item_text": timed(lambda: engine.score_new_item(text), max(10, n // 10)),
        "score_new_item_text_image": timed(lambda: engine.score_new_item(with_image),
                                           max(10, n // 10)),
        "load_s": round(load_s, 2), "users": len(engine.user_ids), "items": len(items),
        "variant": engine.info.get("variant"), "encoders": engine.metadata()["encoders"]}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
