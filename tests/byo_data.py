"""Generators of small user-owned data folders for the bring-your-own-data tests.

`write_generic` writes a MovieLens-100k-shaped pair (`user_id,item_id,rating,timestamp` and
`item_id,title,genres`, plus a `text` column and posters when asked), generated here with a
seeded clustered preference model, so no third-party data is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")


def write_generic(folder: Path, *, n_users: int = 100, n_items: int = 200, per_user: int = 15,
                  seed: int = 0, text: bool = True, images: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    taste = rng.integers(0, len(GENRES), n_users)
    genre = rng.integers(0, len(GENRES), n_items)
    lines = ["user_id,item_id,rating,timestamp"]
    t0 = 880_000_000
    for u in range(n_users):
        liked = rng.permutation(np.flatnonzero(genre == taste[u]))[:per_user // 2]
        pool = np.concatenate([liked, rng.permutation(n_items)])   # half to taste, half not
        chosen = list(dict.fromkeys(pool.tolist()))[:per_user]
        for j, i in enumerate(chosen):
            rating = 5 if genre[i] == taste[u] else int(rng.integers(1, 5))
            lines.append(f"{u + 1},{i + 1},{rating},{t0 + 1000 * u + j}")
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    header = "item_id,title,genres" + (",text" if text else "") + (",image_path" if images else "")
    rows = [header]
    for i in range(n_items):
        g = GENRES[genre[i]]
        row = f'{i + 1},"Film {i + 1} (199{i % 10})",{g}'
        if text:
            row += f',"A {g.lower()} story, number {i + 1}"'
        if images:
            row += f",posters/{i + 1}.png"
        rows.append(row)
    (folder / "items.csv").write_text("\n".join(rows) + "\n")
    if images:
        (folder / "posters").mkdir(exist_ok=True)
        for i in range(n_items):
            colour = tuple(int(c) for c in (np.array([40, 80, 120]) * (genre[i] + 1)) % 256)
            Image.new("RGB", (24, 36), colour).save(folder / "posters" / f"{i + 1}.png")
    return folder
