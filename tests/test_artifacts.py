import json

import pytest
import torch

from bonmf_core.models.artifacts import load_model, save_model
from bonmf_core.errors import ConfigMismatchError
from bonmf_core.models.bonmf import BoNMF, BoNMFConfig


def _model(n_users=12, n_items=9, head="neumf"):
    torch.manual_seed(0)
    cfg = BoNMFConfig(n_users, n_items, modalities=("id", "text"), feature_dims={"text": 5},
                      user_attribute_cardinalities=(2,), head=head, gmf_dim=4, mlp_layers=(8, 4),
                      content_hidden=8, content_dim=128, id_dropout=0.0, dropout=0.0)
    model = BoNMF(cfg, features={"text": torch.randn(n_items, 5)},
                  user_attributes=(torch.arange(n_users) % 2)[:, None])
    with torch.no_grad():
        model.warm_items[3] = False
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def _ids(model):
    return ([f"u{i}" for i in range(model.config.n_users)],
            [f"i{i}" for i in range(model.config.n_items)])


@pytest.mark.parametrize("head", ["neumf", "dot"])
def test_round_trip_scores_identically_without_pickles(tmp_path, head):
    model = _model(head=head)
    model.config.content_weights = {"text": 0.5}   # chosen on validation, saved with the config
    users, items = _ids(model)
    save_model(tmp_path / "m", model, user_ids=users, item_ids=items,
               metadata={"seed": 3, "metrics": {"ndcg@10": 0.5}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "id_maps.json", "model.safetensors"]
    loaded, meta, id_maps = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.score_users(torch.arange(12)), model.score_users(torch.arange(12)))
    assert not loaded.warm_items[3] and loaded.warm_items[2]
    assert loaded.config.content_weights == {"text": 0.5} and loaded.config.head == head
    assert meta["seed"] == 3 and id_maps["item_ids"][4] == "i4"
    # safetensors starts with an 8-byte header length then JSON: no pickle opcodes anywhere.
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:16]


def test_mismatched_expected_config_is_refused_with_each_difference(tmp_path):
    model = _model()
    save_model(tmp_path / "m", model, user_ids=_ids(model)[0], item_ids=_ids(model)[1])
    with pytest.raises(ConfigMismatchError, match=r"n_items: saved 9, expected 10; gmf_dim: saved 4, expected 8"):
        load_model(tmp_path / "m", expected={"gmf_dim": 8, "n_items": 10})
    load_model(tmp_path / "m", expected={"gmf_dim": 4})  # a matching subset loads


def test_config_that_disagrees_with_weights_is_refused(tmp_path):
    model = _model()
    save_model(tmp_path / "m", model, user_ids=_ids(model)[0], item_ids=_ids(model)[1])
    cfg_path = tmp_path / "m" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model"]["mlp_layers"] = [8, 6]
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigMismatchError, match="weights do not match config.json"):
        load_model(tmp_path / "m")


def test_failed_save_leaves_previous_artifact_untouched(tmp_path):
    model = _model()
    users, items = _ids(model)
    save_model(tmp_path / "m", model, user_ids=users, item_ids=items, metadata={"v": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ConfigMismatchError):
        save_model(tmp_path / "m", model, user_ids=users[:-1], item_ids=items, metadata={"v": 2})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        save_model(tmp_path / "m", model, user_ids=users, item_ids=items,
                   metadata={"v": Unserializable()})
    after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp leftovers


def test_not_an_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a BoNMF model artifact"):
        load_model(tmp_path)
