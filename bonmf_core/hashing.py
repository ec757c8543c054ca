"""Content hashes, one implementation each: bytes, files, file sets, folders, JSON, arrays.

Everything that keys a cache or identifies an artifact hashes through here, so two modules
never disagree on how the same content is hashed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_BLOCK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in blocks (md5 is DVC's)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    return file_digest(path, "md5")


def sha256_file_or_none(path) -> str | None:
    """sha256 of the file's bytes; None where it is missing, unreadable or not a path."""
    if not isinstance(path, (str, Path)) or not str(path):
        return None
    try:
        return sha256_file(path)
    except OSError:
        return None


def sha256_files(paths) -> str:
    """One hash over the bytes of several files, in sorted path order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """One hash over a folder's files (relative names and bytes), independent of where it is."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0" + sha256_file(file).encode())
    return h.hexdigest()


def sha256_json(value) -> str:
    """Hash of the canonical JSON (sorted keys; non-JSON values by their str())."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def sha256_array(array) -> str:
    import numpy as np

    return sha256_bytes(np.ascontiguousarray(array).tobytes())
