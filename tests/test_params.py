from pathlib import Path

import pytest
import yaml

from bonmf_core.params import DEFAULT_PARAMS, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_the_defaults():
    """params.yaml is the one file every entry point reads; it must not drift from the code."""
    assert load_params(REPO / "params.yaml") == DEFAULT_PARAMS


def test_yaml_and_overrides_merge_deeply(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01}}))
    params = load_params(path, {"train": {"epochs": 2}})
    assert params["train"]["lr"] == 0.01 and params["train"]["epochs"] == 2
    assert params["train"]["negatives"] == DEFAULT_PARAMS["train"]["negatives"]


def test_unknown_key_is_refused_by_name(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 0.01}}))
    with pytest.raises(KeyError, match="learning_rate"):
        load_params(path)
