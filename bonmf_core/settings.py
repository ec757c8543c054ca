"""Paths and switches that come from the environment, never from code."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """Where the project keeps generated state (demo pictures, runs, artifacts).

    `BONMF_STATE_DIR` overrides the default `./.bonmf`.
    """
    return Path(os.environ.get("BONMF_STATE_DIR", ".bonmf")).resolve()
