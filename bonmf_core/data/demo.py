"""The built-in demo dataset: a deterministic world where content predicts taste.

Every item is a mixture of a few hidden themes. Users have theme tastes; which items they
interact with depends on taste × theme plus item popularity. The same themes generate each
item's words, genres and picture (background colour and shape), so a model that reads content
can place an item nobody has interacted with yet — which is what cold-start tests need.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from bonmf_core.atomic import atomic_dir
from bonmf_core.data.dataset import Dataset
from bonmf_core.settings import state_dir
from bonmf_core.config import DataConfig

_DATA = DataConfig()   # the demo's defaults are the configuration's

THEMES = ("space", "crime", "romance", "horror", "comedy", "war", "fantasy", "sports")
# One palette colour (RGB) and one shape per theme: the picture's two visual cues.
PALETTE = np.array([[20, 30, 120], [60, 60, 60], [230, 80, 150], [120, 0, 0],
                    [250, 210, 40], [90, 110, 40], [140, 60, 200], [30, 170, 90]], np.uint8)
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "dots")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tos", "va", "dur", "pel", "sin", "gor", "ath", "bel",
              "cor", "dun", "fel", "hal")
IMAGE_SIZE = 32


def _theme_vocabulary(rng: np.random.Generator, words_per_theme: int = 24) -> list[list[str]]:
    """Distinct made-up words per theme, plus the theme name itself."""
    seen: set[str] = set()
    vocab = []
    for theme in THEMES:
        words = [theme]
        while len(words) < words_per_theme:
            w = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        vocab.append(words)
    return vocab


def _draw_picture(rng: np.random.Generator, mix: np.ndarray) -> np.ndarray:
    """A small RGB picture: background from the main theme, a shape from the second."""
    order = np.argsort(-mix)
    main, second = order[0], order[1] if mix[order[1]] > 0.15 else order[0]
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = PALETTE[main]
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    c = IMAGE_SIZE / 2 + rng.normal(0, 2, size=2)
    r = IMAGE_SIZE * rng.uniform(0.2, 0.3)
    dy, dx = yy - c[0], xx - c[1]
    shape = SHAPES[second]
    mask = {
        "circle": dy ** 2 + dx ** 2 < r ** 2,
        "square": (abs(dy) < r) & (abs(dx) < r),
        "triangle": (dy > -r) & (dy < r) & (abs(dx) < (dy + r) / 2),
        "cross": (abs(dy) < r / 3) | (abs(dx) < r / 3),
        "ring": abs(np.sqrt(dy ** 2 + dx ** 2) - r) < 2,
        "bar": abs(dy) < r / 2,
        "diamond": abs(dy) + abs(dx) < r,
        "dots": ((yy % 8) < 3) & ((xx % 8) < 3),
    }[shape]
    img[mask] = 255 - PALETTE[second]
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_pictures(pictures: list[np.ndarray], folder: Path) -> list[str]:
    from PIL import Image

    paths = [folder / f"{i}.png" for i in range(len(pictures))]
    if not all(p.exists() for p in paths):
        with atomic_dir(folder) as tmp:
            for i, pic in enumerate(pictures):
                Image.fromarray(pic).save(tmp / f"{i}.png", optimize=False, compress_level=1)
    return [str(p) for p in paths]


def demo_dataset(seed: int = _DATA.demo_seed, n_users: int = _DATA.demo_users,
                 n_items: int = _DATA.demo_items,
                 mean_interactions: float = 45.0, image_dir: str | os.PathLike | None = None
                 ) -> Dataset:
    """Generate the demo dataset. Same arguments, same data (and same pictures on disk).

    Pictures go to `image_dir` (default: `<state dir>/demo/seed-<seed>-<users>x<items>/images`).
    """
    rng = np.random.default_rng(seed)
    n_themes = len(THEMES)
    vocab = _theme_vocabulary(rng)

    # Items: sparse theme mixtures (mostly one or two themes) and a skewed popularity.
    item_mix = rng.dirichlet(np.full(n_themes, 0.15), size=n_items)
    item_pop = rng.lognormal(0.0, 1.4, size=n_items)

    # Users: theme tastes, a few strong ones each; an activity level with a long tail.
    user_taste = rng.dirichlet(np.full(n_themes, 0.3), size=n_users)
    counts = np.clip(rng.lognormal(np.log(mean_interactions) - 0.5, 1.0, size=n_users),
                     8, n_items // 3).astype(int)

    # Which items each user picks: sampled without replacement ∝ exp(3·affinity/σ)·popularity,
    # for all users at once with the Gumbel top-k trick.
    affinity = user_taste @ item_mix.T
    logits = 3.0 * affinity / affinity.std() + np.log(item_pop)[None, :]
    keys = logits + rng.gumbel(size=logits.shape)
    order = np.argsort(-keys, axis=1)
    rows = np.repeat(np.arange(n_users), counts)
    ranks = np.concatenate([np.arange(c) for c in counts])
    items = order[rows, ranks]

    # Ratings follow affinity; timestamps spread each user's history over their active span.
    z = (affinity[rows, items] - affinity.mean()) / affinity.std()
    rating = np.clip(np.round(2.6 + 0.9 * z + rng.normal(0, 0.8, size=len(rows))), 1, 5)
    start = 1_577_836_800 + rng.integers(0, 300 * 86400, size=n_users)
    span = rng.integers(5 * 86400, 400 * 86400, size=n_users)
    ts = start[rows] + (rng.random(len(rows)) * span[rows]).astype(np.int64)
    interactions = pd.DataFrame({"user": rows.astype(np.int64), "item": items.astype(np.int64),
                                 "rating": rating.astype(np.float32),
                                 "timestamp": ts.astype(np.int64)})
    interactions = interactions.sort_values(["timestamp", "user"], kind="stable")
    interactions = interactions.reset_index(drop=True)

    # Content, from the same theme mixtures.
    titles, genres, overviews, pictures = [], [], [], []
    for i in range(n_items):
        mix = item_mix[i]
        top = np.argsort(-mix)[:2]
        word_themes = rng.choice(n_themes, size=14, p=mix)
        words = [vocab[t][rng.integers(len(vocab[t]))] for t in word_themes]
        titles.append(f"The {vocab[top[0]][rng.integers(1, len(vocab[top[0]]))].title()} "
                      f"{'Saga' if i % 3 == 0 else 'Story' if i % 3 == 1 else 'Files'} {i}")
        genres.append("|".join(THEMES[t] for t in top if mix[t] > 0.2) or THEMES[top[0]])
        overviews.append(" ".join(words))
        pictures.append(_draw_picture(rng, mix))

    folder = Path(image_dir) if image_dir else (
        state_dir() / "demo" / f"seed-{seed}-{n_users}x{n_items}" / "images")  # pictures depend on both
    image_paths = _write_pictures(pictures, folder)
    items_df = pd.DataFrame({"item_id": [f"d{i}" for i in range(n_items)], "title": titles,
                             "genres": genres, "image_path": image_paths,
                             "overview": overviews})

    # A user attribute that carries a noisy hint of the strongest taste (like age or
    # occupation in ML-1M): useful for users with few interactions.
    hint = np.where(rng.random(n_users) < 0.7, user_taste.argmax(1),
                    rng.integers(0, n_themes, n_users))
    users_df = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)],
                             "segment": [f"s{h}" for h in hint]})
    return Dataset(name=f"demo-seed{seed}", interactions=interactions, items=items_df,
                   users=users_df, rating_scale=(1.0, 5.0))
