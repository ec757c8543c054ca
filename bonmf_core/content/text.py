"""The one item-text composer: what the text encoder reads for an item."""

from __future__ import annotations

import pandas as pd


def compose_item_texts(items: pd.DataFrame, fields, separator: str) -> list[str]:
    """Each item's text from `fields` in order; absent or empty fields are left out.

    Genres ('Action|Comedy') read as a list ('Action, Comedy'): the encoder sees words, not a
    storage format.
    """
    parts = []
    for name in fields:
        if name not in items.columns:
            continue
        column = items[name].astype("string").fillna("").str.strip()
        if name == "genres":
            column = column.str.replace("|", ", ", regex=False)
        parts.append(column.tolist())
    return [separator.join(p for p in row if p) for row in zip(*parts)] if parts else [""] * len(items)
