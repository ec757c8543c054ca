"""Where a dataset's image paths may lead: inside the dataset's own folder, nowhere else.

A catalog is data someone else wrote. An `image_path` of `../../etc/passwd`, `/etc/shadow` or
a poster that is a symlink to either would otherwise be read, copied into the promoted
dataset and pushed to the DVC remote. Paths are judged after resolving symlinks, so a link
inside the folder that points out of it is outside too.
"""

from __future__ import annotations

import os
from pathlib import Path


def outside_reason(path: str | None, root: str | Path | None) -> str | None:
    """Why `path` may not be read as part of the dataset rooted at `root`, or None when it
    may (or when there is no path). Relative paths are taken from the working directory, as
    every reader writes them (absolute, or relative to the repo root for DVC's stages)."""
    if not isinstance(path, str) or not path.strip():
        return None
    if "://" in path:
        return "a URL, not a file inside the dataset folder"
    if root is None:
        return None
    written, real = Path(os.path.abspath(root)), Path(root).resolve()
    target = Path(os.path.abspath(path))   # '..' collapsed, links not yet followed
    if not (_within(target, written) or _within(target, real)):
        return f"outside the dataset folder {written}"
    if not _within(target.resolve(), real):
        return f"a link that leads outside the dataset folder {written}"
    return None


def _within(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def resolve_image_path(value, folder: Path) -> str | None:
    """A catalog's `image_path` cell (relative to the dataset folder) as the path readers
    store. Kept even when it leads outside: the check names the row instead of a reader
    silently dropping it."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if "://" in value:
        return value
    return os.path.abspath(folder / value)
