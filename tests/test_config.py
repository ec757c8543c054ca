"""The one configuration: schema defaults < params file < --set < flags; refusals by name."""

import re
from pathlib import Path

import pytest
import yaml

from bonmf_core.config import BonmfConfig, load_config, parse_set
from bonmf_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_validates_against_the_schema():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, BonmfConfig) and cfg.data.source == "demo"


def test_precedence_defaults_file_set_flags(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01, "epochs": 7, "patience": 5}}))
    cfg = load_config(path, ["train.epochs=3", "train.patience=4"], {"train": {"patience": 2}})
    assert cfg.train.lr == 0.01            # file over default
    assert cfg.train.epochs == 3           # --set over file
    assert cfg.train.patience == 2         # flag over --set
    assert cfg.train.negatives == BonmfConfig().train.negatives   # untouched: the default


def test_default_file_is_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BONMF_PARAMS", raising=False)
    assert load_config().train.epochs == BonmfConfig().train.epochs   # no file: defaults
    (tmp_path / "params.yaml").write_text("train: {epochs: 4}\n")
    assert load_config().train.epochs == 4
    other = tmp_path / "other.yaml"
    other.write_text("train: {epochs: 6}\n")
    monkeypatch.setenv("BONMF_PARAMS", str(other))
    assert load_config().train.epochs == 6


def test_unknown_key_is_refused_with_file_and_key_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 0.01}}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: train.learning_rate: unknown key")):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: bogus: unknown key"):
        load_config(sets=["bogus.x=1"], use_default_file=False)


@pytest.mark.parametrize("assignment, words", [
    ("train.metric=ndcg10", "train.metric"),
    ("protocol.name=loo", "protocol.name"),
    ("train.lr=-1", "train.lr"),
    ("model.mlp_layers=[33, 8]", "model.mlp_layers"),
    ("pipeline.candidates=[pop]", "pipeline.candidates"),
    ("pipeline.baselines=[id]", "pipeline.baselines"),
    ("promotion.floors={hr10: 0.2}", "promotion.floors"),
    ("checks.rating_scale=[5, 1]", "checks.rating_scale"),
    ("checks.text_coverage_min=50", "checks.text_coverage_min"),
])
def test_bad_values_are_refused_naming_the_key(assignment, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(sets=[assignment], use_default_file=False)


def test_set_parses_yaml_values_and_refuses_malformed_assignments():
    assert parse_set(["a.b=3", "a.c=[x, y]", "d.e=null", "d.f=true"]) == {
        "a": {"b": 3, "c": ["x", "y"]}, "d": {"e": None, "f": True}}
    for bad in ("train", "train.lr", "=3", "train.=3"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_set([bad])


def test_content_dim_takes_one_width_or_one_per_modality_from_set():
    cfg = load_config(sets=["model.content_dim={text: 128, image: 32}"], use_default_file=False)
    assert cfg.model.content_dim == {"text": 128, "image": 32}
    assert load_config(sets=["model.content_dim=64"], use_default_file=False
                       ).model.content_dim == 64
    with pytest.raises(ConfigError, match="model.content_dim"):
        load_config(sets=["model.content_dim={text: 128}"], use_default_file=False)


def test_bpr_schedule_is_complete_without_train_defaults():
    cfg = load_config(sets=["bpr.lr=0.05", "train.metric=hr@5"], use_default_file=False)
    schedule = cfg.bpr.as_train(cfg.train.metric)
    assert (schedule.loss, schedule.lr, schedule.metric) == ("bpr", 0.05, "hr@5")
    assert schedule.epochs == cfg.bpr.epochs and schedule.lr_decay == cfg.bpr.lr_decay


def test_no_module_outside_the_schema_reads_params_by_key():
    """Library code takes the typed models: no params["section"]["key"] look-ups left."""
    offenders = []
    for path in (REPO / "bonmf_core").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"params\[\"(data|protocol|model|train|bpr|encoders|pipeline|checks|"
                         r"promotion|retrain|serving|dvc)\"\]", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert offenders == []


def test_library_imports_no_upper_layer():
    pattern = re.compile(r"^\s*(from|import) (orchestration|bentos|dagster|bentoml)\b")
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "bonmf_core").rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.match(line)]
    assert offenders == []
