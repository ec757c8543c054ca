"""Shared fixtures: a small demo dataset (the test fixture the library itself ships)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def _isolated_state(tmp_path_factory):
    """Generated state goes to a temp folder, never into the checkout; so does BentoML's
    store (read once per process, at first use), and nothing calls home."""
    os.environ["BONMF_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    from bonmf_core.data.demo import demo_dataset

    return demo_dataset(seed=0, n_users=600, n_items=250,
                        image_dir=tmp_path_factory.mktemp("demo-images"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (team-provided data; absent on a fresh machine)")
    return path


@pytest.fixture(scope="session")
def ml1m():
    """The real MovieLens-1M, read once per session; skipped where ../shared is absent."""
    from bonmf_core.data.readers import read_movielens

    return read_movielens(shared_dataset("ml-1m"))


@pytest.fixture(scope="session")
def ncf_dir() -> Path:
    return shared_dataset("ml-1m-ncf")
