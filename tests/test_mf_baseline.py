"""The `mf` baseline (dot-product MF with biases, logistic loss over sampled negatives; Rendle
et al. 2020): its score by hand, learning on the NCF protocol, the dimension chosen on the
validation set (never the test set), every protocol, the cache key and the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bonmf_core.config import BASELINE_VARIANTS, TrainConfig, load_config
from bonmf_core.data.splits import cold_item_split, leave_one_out_split, ratio_split
from bonmf_core.errors import ConfigError
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.experiment import variants
from bonmf_core.experiment.runner import fit_spec, run_fits
from bonmf_core.models.baselines import BiasedMF, Popularity

REPO = Path(__file__).resolve().parents[1]
FAST = ["mf.epochs=6", "mf.patience=2", "mf.lr=0.01", "mf.negatives=4"]


def _cfg(*sets):
    return load_config(sets=list(sets), use_default_file=False)


# -- the model --------------------------------------------------------------------------------

def test_score_is_dot_product_plus_biases_by_hand():
    torch.manual_seed(0)
    model = BiasedMF(3, 4, dim=2)
    with torch.no_grad():
        model.user.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]]))
        model.item.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]))
        model.user_bias.weight.copy_(torch.tensor([[0.1], [-0.2], [0.3]]))
        model.item_bias.weight.copy_(torch.tensor([[0.0], [0.5], [-0.5], [1.5]]))
        model.bias.fill_(0.25)
    # score(u, i) = <p_u, q_i> + b_u + b_i + b
    expected = torch.tensor([[1.35, 4.85, 0.85, 1.85],
                             [0.55, 0.55, -1.95, 1.55],
                             [0.55, 4.05, 3.05, 2.05]])
    scores = model.score_users(torch.arange(3))
    assert scores.shape == (3, 4)
    assert torch.allclose(scores, expected, atol=1e-6)
    users = torch.tensor([2, 0, 1])
    items = torch.tensor([[1, 3], [0, 2], [3, 3]])
    assert torch.allclose(model.score_pairs(users, items), expected[users[:, None], items],
                          atol=1e-6)
    assert torch.allclose(model.score_pairs(users, items[:, 0]), expected[users, items[:, 0]],
                          atol=1e-6)
    # the per-pair L2 term the trainer weights by mf.l2: ½(‖p_u‖² + ‖q_i‖² + b_u² + b_i²)
    _, norms = model(users, items, return_norms=True)
    p, q = model.user.weight, model.item.weight
    bu, bi = model.user_bias.weight[:, 0], model.item_bias.weight[:, 0]
    by_hand = 0.5 * np.mean([(p[u].pow(2).sum() + q[i].pow(2).sum() + bu[u] ** 2 + bi[i] ** 2)
                             .item() for u, row in zip(users, items) for i in row])
    assert norms.item() == pytest.approx(by_hand, rel=1e-6)


def test_initialisation_follows_the_recipe():
    torch.manual_seed(0)
    model = BiasedMF(2000, 1500, dim=32, init_std=0.1)
    assert model.user.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert model.item.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert (model.user_bias.weight == 0).all() and (model.item_bias.weight == 0).all()
    assert model.bias.item() == 0.0


# -- learning ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ncf_split(small_demo):
    return leave_one_out_split(small_demo, seed=0)


def test_beats_popularity_on_the_ncf_protocol(small_demo, ncf_split):
    cfg = _cfg(*FAST, "mf.dims=[32]")
    scorer, result = variants.fit_variant("mf", small_demo, ncf_split, cfg, 0, {})
    assert isinstance(scorer, BiasedMF) and scorer.dim == 32
    mf = evaluate(scorer, ncf_split, "test", (10,))
    pop = evaluate(Popularity(small_demo.n_items).fit(ncf_split.train), ncf_split, "test", (10,))
    assert mf["hr@10"] > pop["hr@10"] + 0.05
    assert mf["ndcg@10"] > pop["ndcg@10"] + 0.03
    # trained by the shared trainer: early stopping on validation, then the refit
    assert 1 <= result.best_epoch <= result.epochs_run <= 6
    assert result.refit is not None and result.refit["epochs"] == result.best_epoch
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    assert all("valid" in h for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the biases learned something: popular items' biases are above the rarest items'
    counts = np.bincount(ncf_split.train["item"], minlength=small_demo.n_items)
    bias = scorer.item_bias.weight[:, 0].detach().numpy()
    order = np.argsort(counts)
    assert bias[order[-20:]].mean() > bias[order[:20]].mean()


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_the_configured_optimizer_is_used(small_demo, ncf_split, optimizer, monkeypatch):
    import bonmf_core.training as training

    made = []
    real = training._optimizers

    def spy(model, cfg):
        optimizers = real(model, cfg)
        made.append(" + ".join(type(o).__name__ for o in optimizers))
        return optimizers

    monkeypatch.setattr(training, "_optimizers", spy)
    # sgd's learning rate is per training pair, adagrad's on the batch's mean loss
    lr = {"adagrad": 0.05, "sgd": 0.002}[optimizer]
    cfg = _cfg("mf.epochs=1", "mf.dims=[8]", f"mf.optimizer={optimizer}", f"mf.lr={lr}")
    variants.fit_variant("mf", small_demo, ncf_split, cfg, 0, {})
    assert made == [{"adagrad": "Adagrad", "sgd": "SGD"}[optimizer]] * 2   # search + refit


def test_schedule_is_complete_without_train_defaults():
    cfg = _cfg("mf.lr=0.05", "mf.l2=0.02", "mf.negatives=12", "train.metric=hr@5",
               "train.negatives=1", "train.embedding_reg=0.9", "mf.optimizer=sgd")
    schedule = cfg.mf.as_train(cfg.train.metric)
    assert isinstance(schedule, TrainConfig)
    assert (schedule.loss, schedule.lr, schedule.metric, schedule.negatives) == \
        ("bce", 0.05, "hr@5", 12)
    assert schedule.embedding_reg == 0.02 and schedule.weight_decay == 0.0
    assert schedule.optimizer == "sgd" and schedule.epochs == cfg.mf.epochs
    # the refit's copy keeps the optimizer
    assert schedule.model_copy(update={"epochs": 2}).optimizer == "sgd"


# -- the dimension, chosen on validation ------------------------------------------------------

def test_dimension_is_chosen_on_validation_never_on_test(small_demo, ncf_split, monkeypatch):
    import bonmf_core.training as training

    cfg = _cfg(*FAST, "mf.dims=[2, 48]")
    seen = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate",
                        lambda scorer, split, which="test", ks=(10,): seen.append(which)
                        or real(scorer, split, which, ks))
    scorer, result = variants.fit_variant("mf", small_demo, ncf_split, cfg, 0, {})
    assert seen and set(seen) == {"valid"}          # the search looks at validation only
    tuning = scorer.tuning
    assert tuning["parameter"] == "dim" and set(tuning["valid"]) == {"2", "48"}
    # each recorded value is that dimension's best validation metric, computed here independently
    mine = {}
    for dim in (2, 48):
        torch.manual_seed(0)
        model = BiasedMF(small_demo.n_users, small_demo.n_items, dim, cfg.mf.init_std)
        r = training.train(model, ncf_split, cfg.mf.as_train("ndcg@10"), seed=0)
        mine[str(dim)] = r.best_metric
        assert tuning["valid"][str(dim)] == pytest.approx(r.best_metric, abs=1e-9)
    best = max((2, 48), key=lambda d: mine[str(d)])
    assert mine["2"] != pytest.approx(mine["48"], abs=1e-4)      # the choice mattered
    assert tuning["chosen"] == best == scorer.dim and tuning["metric"] == "ndcg@10"
    assert tuning["refit"] is True and tuning["cold_items"] is False
    assert result.best_metric == pytest.approx(mine[str(best)], abs=1e-9)
    # a different test set changes neither the choice nor the model
    test = ncf_split.test
    poisoned = replace(ncf_split, test=test.assign(item=np.roll(test["item"].to_numpy(), 7)),
                       test_negatives=np.roll(ncf_split.test_negatives, 3, axis=0))
    other, _ = variants.fit_variant("mf", small_demo, poisoned, cfg, 0, {})
    assert other.tuning == tuning
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(),
                                                 scorer.state_dict().values()))


def test_without_refit_the_model_is_the_validation_winner(small_demo, ncf_split):
    cfg = _cfg(*FAST, "mf.dims=[4, 16]", "mf.refit=false")
    scorer, result = variants.fit_variant("mf", small_demo, ncf_split, cfg, 0, {})
    assert result.refit is None and scorer.tuning["refit"] is False
    assert scorer.dim == scorer.tuning["chosen"]
    assert evaluate(scorer, ncf_split, "valid", (10,))["ndcg@10"] == \
        pytest.approx(scorer.tuning["valid"][str(scorer.dim)], abs=1e-6)


# -- protocols, registration, cache key -------------------------------------------------------

def test_full_and_cold_items_protocols(small_demo):
    cfg = _cfg(*FAST, "mf.dims=[16, 32]")
    full = ratio_split(small_demo, seed=1)
    cold = cold_item_split(small_demo, seed=1)
    fits = run_fits(["pop", "mf"], small_demo, [full, cold], cfg, {}, report=lambda _: None)
    by = {(f["split"]["protocol"], f["variant"]): f for f in fits}
    m = by[("full", "mf")]
    assert m["metrics"]["recall@10"] > by[("full", "pop")]["metrics"]["recall@10"] + 0.03
    assert m["tuning"]["chosen"] in (16, 32) and set(m["tuning"]["valid"]) == {"16", "32"}
    assert m["best_epoch"] >= 1 and m["history"]
    # cold items: nothing to learn them from; no search, the first dimension, a finite score
    c = by[("cold_items", "mf")]
    assert c["tuning"]["cold_items"] is True and c["tuning"]["valid"] == {}
    assert c["scorer"].dim == 16
    scores = c["scorer"].score_users(torch.arange(small_demo.n_users))
    assert torch.isfinite(scores).all()
    cold_items = torch.from_numpy(cold.cold_test_items).long()
    assert (c["scorer"].item_bias.weight[cold_items] == 0).all()   # never trained
    assert 0.0 <= c["metrics"]["hr@10"] <= 1.0 and c["metrics"]["users"] > 0


def test_registered_and_in_params_yaml():
    assert "mf" in BASELINE_VARIANTS and "mf" in variants.VARIANTS
    assert variants.parse_variants("pop,mf") == ["pop", "mf"]
    assert variants.modalities_of("mf") == ()
    cfg = load_config(REPO / "params.yaml")
    assert cfg.mf == _cfg().mf                                    # params.yaml mirrors the schema
    assert _cfg("pipeline.baselines=[pop, mf]").pipeline.baselines == ["pop", "mf"]
    dvc = (REPO / "dvc.yaml").read_text()
    assert dvc.count("      - mf\n") == 2


@pytest.mark.parametrize("assignment", ["mf.dims=[]", "mf.dims=[0, 8]", "mf.negatives=0",
                                        "mf.optimizer=rmsprop", "mf.l2=-1", "mf.dim=8"])
def test_bad_settings_are_refused(assignment):
    with pytest.raises(ConfigError, match=r"mf\."):
        _cfg(assignment)


def test_the_fit_cache_key_follows_the_mf_section(small_demo):
    split = ratio_split(small_demo, seed=1)
    base = fit_spec("mf", "h", split, _cfg(), 0, {})
    for setting in ("mf.dims=[32]", "mf.negatives=16", "mf.l2=0.01", "mf.optimizer=sgd",
                    "mf.lr=0.01"):
        assert fit_spec("mf", "h", split, _cfg(setting), 0, {}) != base, setting
    # the BoNMF schedule and the other baselines' sections do not touch it
    assert fit_spec("mf", "h", split, _cfg("train.lr=0.5", "bpr.dim=8"), 0, {}) == base
    assert base["train"]["dims"] == [64, 128]


# -- the benchmark ----------------------------------------------------------------------------

def test_quality_benchmark_json_on_demo_ncf(tmp_path):
    out = tmp_path / "q.json"
    env = {**os.environ, "BONMF_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--data", "demo",
         "--protocol", "ncf", "--variants", "pop,mf", "--seeds", "0",
         "--set", "data.demo_users=800", "--set", "data.demo_items=300",
         "--set", 'encoders.source="basic"', "--params", str(REPO / "params.yaml"),
         *[a for s in FAST + ["mf.dims=[16, 32]"] for a in ("--set", s)],
         "--out", str(out), "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["protocol"] == "ncf" and data["seeds"] == [0]
    assert data["params"]["mf"]["dims"] == [16, 32] and data["params"]["mf"]["epochs"] == 6
    results = data["results"]
    assert set(results["mf"]["hr@10"]) >= {"mean", "std", "values"}
    assert results["mf"]["hr@10"]["mean"] > results["pop"]["hr@10"]["mean"] + 0.05
    assert results["mf"]["ndcg@10"]["mean"] > results["pop"]["ndcg@10"]["mean"]
