"""The item-item baselines `ease` and `item_knn`: their closed forms, the hyper-parameter choice on
the validation set (never the test set), the memory refusal, every protocol, and the benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonmf_core.config import BASELINE_VARIANTS, load_config
from bonmf_core.data.splits import cold_item_split, leave_one_out_split, ratio_split
from bonmf_core.errors import ConfigError
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.experiment import variants
from bonmf_core.experiment.runner import run_fits
from bonmf_core.models.baselines import EASE, ItemKNN, Popularity

REPO = Path(__file__).resolve().parents[1]


def _frame(pairs) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["user", "item"])


def _cfg(*sets):
    return load_config(sets=list(sets), use_default_file=False)


# -- closed forms -----------------------------------------------------------------------------

def _planted():
    """Items: 0 = A, 1 = B (every holder of A also holds B), 2 the most popular item overall.
    The last user holds only A."""
    rng = np.random.default_rng(0)
    pairs = []
    for u in range(12):                       # A and B together, plus one of 2/3/4
        pairs += [(u, 0), (u, 1), (u, int(rng.integers(2, 5)))]
    for u in range(12, 52):                   # no A: item 2 (popular) with 3 or 4
        pairs += [(u, 2), (u, int(rng.integers(3, 5)))]
    pairs.append((52, 0))
    return _frame(sorted(set(pairs))), 53, 5


def test_ease_zero_diagonal_and_closed_form():
    rng = np.random.default_rng(1)
    x = (rng.random((40, 12)) < 0.3).astype(np.float64)
    train = _frame([(u, i) for u, i in zip(*np.nonzero(x))])
    lam = 7.5
    model = EASE(40, 12, lam).fit(train)
    b = model.weights.double().numpy()
    assert np.all(np.diag(b) == 0.0)
    p = np.linalg.inv(x.T @ x + lam * np.eye(12))
    expected = np.eye(12) - p / np.diag(p)[None, :]     # I − P · diag(1/diag P)
    np.testing.assert_allclose(b, expected, rtol=1e-4, atol=1e-6)
    # the scores are X · B, for a block of users and for pairs alike
    users = torch.tensor([0, 5, 39])
    np.testing.assert_allclose(model.score_users(users).numpy(), (x @ expected)[[0, 5, 39]],
                               rtol=1e-4, atol=1e-5)
    items = torch.tensor([[1, 2, 3], [0, 11, 4], [7, 7, 2]])
    assert torch.allclose(model.score_pairs(users, items),
                          model.score_users(users).gather(1, items))
    assert torch.allclose(model.score_pairs(users, items[:, 0]),
                          model.score_users(users)[[0, 1, 2], [1, 0, 7]])


@pytest.mark.parametrize("make", [lambda: EASE(53, 5, 1.0), lambda: ItemKNN(53, 5, None)],
                         ids=["ease", "item_knn"])
def test_planted_item_item_structure_is_recovered(make):
    train, n_users, n_items = _planted()
    model = make().fit(train)
    scores = model.score_users(torch.tensor([52]))[0]
    scores[0] = float("-inf")                                 # the user's own item
    assert int(scores.argmax()) == 1                          # B, for the holder of A alone
    pop = Popularity(n_items).fit(train).score_users(torch.tensor([52]))[0].clone()
    pop[0] = float("-inf")
    assert int(pop.argmax()) == 2                             # popularity would say item 2


def test_item_knn_cosine_matches_hand_computation():
    # users × items: u0 {0, 1}, u1 {0, 2}, u2 {0, 1, 2}
    train = _frame([(0, 0), (0, 1), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)])
    model = ItemKNN(3, 3, None).fit(train)
    c01 = 2 / math.sqrt(3 * 2)         # |U0 ∩ U1| = 2, |U0| = 3, |U1| = 2
    c02 = 2 / math.sqrt(3 * 2)
    c12 = 1 / math.sqrt(2 * 2)
    expected = torch.tensor([[0, c01, c02], [c01, 0, c12], [c02, c12, 0]], dtype=torch.float32)
    assert torch.allclose(model.similarity, expected, atol=1e-6)
    # u0 (items 0, 1) scores item 2 as the sum of its similarities to 0 and 1
    assert model.score_users(torch.tensor([0]))[0, 2].item() == pytest.approx(c02 + c12, abs=1e-6)
    # one neighbour per item: item 2 keeps only item 0 (c02 > c12)
    pruned = ItemKNN(3, 3, 1).fit(train)
    assert pruned.weights[:, 2].tolist() == pytest.approx([c02, 0.0, 0.0], abs=1e-6)
    assert pruned.score_users(torch.tensor([0]))[0, 2].item() == pytest.approx(c02, abs=1e-6)


def test_an_item_without_interactions_scores_zero():
    train = _frame([(0, 0), (0, 1), (1, 1), (1, 2)])       # item 3 never seen
    for model in (EASE(2, 4, 2.0).fit(train), ItemKNN(2, 4, None).fit(train)):
        scores = model.score_users(torch.tensor([0, 1]))
        assert torch.isfinite(scores).all() and (scores[:, 3] == 0).all()


# -- the choice on validation -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ncf_split(small_demo):
    return leave_one_out_split(small_demo, seed=0)


CASES = {"ease": ("ease.lambdas=[1, 30, 300, 3000]", [1.0, 30.0, 300.0, 3000.0],
                  lambda d, o: EASE(d.n_users, d.n_items, o)),
         "item_knn": ("item_knn.neighbours=[2, 20, null]", [2, 20, None],
                      lambda d, o: ItemKNN(d.n_users, d.n_items, o))}


@pytest.mark.parametrize("variant", ["ease", "item_knn"])
def test_choice_is_made_on_validation_never_on_test(variant, small_demo, ncf_split, monkeypatch):
    setting, options, make = CASES[variant]
    cfg = _cfg(setting)
    seen = []
    real = variants.evaluate
    monkeypatch.setattr(variants, "evaluate",
                        lambda scorer, split, which="test", ks=(10,): seen.append(which)
                        or real(scorer, split, which, ks))
    scorer, result = variants.fit_variant(variant, small_demo, ncf_split, cfg, 0, {})
    assert result is None and seen == ["valid"] * len(options)
    tuning = scorer.tuning
    # the recorded choice is the argmax of validation metrics computed here independently
    mine = {str(o): evaluate(make(small_demo, o).fit(ncf_split.train), ncf_split, "valid",
                             (10,))["ndcg@10"] for o in options}
    assert tuning["valid"].keys() == mine.keys()
    for key in mine:
        assert tuning["valid"][key] == pytest.approx(mine[key], abs=1e-9)
    best = max(options, key=lambda o: mine[str(o)])
    assert tuning["chosen"] == best and tuning["metric"] == "ndcg@10" and tuning["refit"]
    assert len(set(round(v, 6) for v in mine.values())) > 1   # the choice mattered
    # the final model is fitted on train ∪ valid and holds no test pair
    x = scorer.x
    assert x.nnz == len(ncf_split.train) + len(ncf_split.valid)
    test = ncf_split.test
    assert np.asarray(x[test["user"].to_numpy(), test["item"].to_numpy()]).sum() == 0
    # a different test set changes neither the choice nor the model
    poisoned = replace(ncf_split, test=test.assign(item=np.roll(test["item"].to_numpy(), 7)),
                       test_negatives=np.roll(ncf_split.test_negatives, 3, axis=0))
    other, _ = variants.fit_variant(variant, small_demo, poisoned, cfg, 0, {})
    assert other.tuning == tuning and torch.equal(other.weights, scorer.weights)


def test_without_refit_the_model_is_the_validation_winner(small_demo, ncf_split):
    cfg = _cfg("ease.lambdas=[5, 500]", "ease.refit=false")
    scorer, _ = variants.fit_variant("ease", small_demo, ncf_split, cfg, 0, {})
    assert scorer.x.nnz == len(ncf_split.train) and scorer.tuning["refit"] is False
    assert scorer.lam == scorer.tuning["chosen"]


# -- limits and configuration -----------------------------------------------------------------

def test_too_large_a_catalog_is_refused_naming_its_size(small_demo, ncf_split):
    with pytest.raises(ConfigError, match=r"20000 items.*ease\.max_memory_mb"):
        EASE(10, 20000, 100.0, max_memory_mb=1024)
    with pytest.raises(ConfigError, match=r"30000 items.*item_knn\.max_memory_mb"):
        ItemKNN(10, 30000, None, max_memory_mb=1024)
    n = small_demo.n_items
    for variant in ("ease", "item_knn"):
        cfg = _cfg(f"{variant}.max_memory_mb=0.01")
        with pytest.raises(ConfigError, match=rf"{n} items"):
            variants.fit_variant(variant, small_demo, ncf_split, cfg, 0, {})


@pytest.mark.parametrize("assignment, words", [("ease.lambdas=[0, 10]", "ease.lambdas"),
                                               ("ease.lambdas=[]", "ease.lambdas"),
                                               ("item_knn.neighbours=[0]", "item_knn.neighbours"),
                                               ("ease.max_memory_mb=0", "ease.max_memory_mb"),
                                               ("item_knn.k=3", "item_knn.k")])
def test_bad_settings_are_refused(assignment, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(assignment)


def test_registered_and_in_params_yaml():
    assert {"ease", "item_knn"} <= set(BASELINE_VARIANTS) <= set(variants.VARIANTS)
    assert variants.parse_variants("ease,item_knn") == ["ease", "item_knn"]
    assert variants.modalities_of("ease") == () == variants.modalities_of("item_knn")
    cfg = load_config(REPO / "params.yaml")
    assert cfg.ease == _cfg().ease and cfg.item_knn == _cfg().item_knn   # mirrors the schema
    assert _cfg("pipeline.baselines=[pop, ease, item_knn]").pipeline.baselines[1:] == \
        ["ease", "item_knn"]


# -- every protocol ---------------------------------------------------------------------------

def test_every_protocol(small_demo):
    cfg = _cfg("ease.lambdas=[50, 500]", "item_knn.neighbours=[20, null]")
    full = ratio_split(small_demo, seed=1)
    cold = cold_item_split(small_demo, seed=1)
    fits = run_fits(["pop", "ease", "item_knn"], small_demo, [full, cold], cfg, {},
                    report=lambda _: None)
    by = {(f["split"]["protocol"], f["variant"]): f for f in fits}
    for variant in ("ease", "item_knn"):
        m = by[("full", variant)]["metrics"]
        assert m["recall@10"] > by[("full", "pop")]["metrics"]["recall@10"] + 0.05
        assert by[("full", variant)]["seed"] == 1
        assert by[("full", variant)]["scorer"].tuning["cold_items"] is False
        # cold items have no interactions to score from: all 0, ranked nowhere, like pop
        c = by[("cold_items", variant)]
        assert c["scorer"].tuning["cold_items"] is True and c["scorer"].tuning["valid"] == {}
        scores = c["scorer"].score_users(torch.arange(small_demo.n_users))
        assert (scores[:, torch.from_numpy(cold.cold_test_items).long()] == 0).all()
        assert c["metrics"]["hr@10"] == 0.0 and c["metrics"]["users"] > 0
        # the choice travels with the result record (and so into the results JSON)
        assert json.loads(json.dumps(by[("full", variant)]["tuning"]))["chosen"] == \
            by[("full", variant)]["scorer"].tuning["chosen"]


def test_the_fit_cache_key_follows_the_baselines_own_section(small_demo):
    from bonmf_core.experiment.runner import fit_spec

    split = ratio_split(small_demo, seed=1)
    for variant, a, b in (("ease", "ease.lambdas=[50]", "ease.lambdas=[500]"),
                          ("item_knn", "item_knn.neighbours=[20]", "item_knn.neighbours=[50]")):
        specs = [fit_spec(variant, "h", split, _cfg(s), 0, {}) for s in (a, b)]
        assert specs[0] != specs[1]   # another grid is another fit, never a stale cache hit
        assert fit_spec(variant, "h", split, _cfg(a, "train.lr=0.5"), 0, {}) == specs[0]


# -- the benchmark ----------------------------------------------------------------------------

def test_quality_benchmark_json_on_demo_ncf(tmp_path):
    out = tmp_path / "q.json"
    env = {**os.environ, "BONMF_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--data", "demo",
         "--protocol", "ncf", "--variants", "pop,ease,item_knn", "--seeds", "0",
         "--set", "data.demo_users=800", "--set", "data.demo_items=300",
         "--set", 'encoders.source="basic"', "--params", str(REPO / "params.yaml"),
         "--out", str(out), "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["protocol"] == "ncf" and data["seeds"] == [0]
    results = data["results"]
    for variant in ("ease", "item_knn"):
        assert set(results[variant]["hr@10"]) >= {"mean", "std", "values"}
        assert results[variant]["hr@10"]["mean"] > results["pop"]["hr@10"]["mean"] + 0.1
        assert results[variant]["ndcg@10"]["mean"] > results["pop"]["ndcg@10"]["mean"]
