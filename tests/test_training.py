import json

import numpy as np
import pytest
import torch

from bonmf_core.models.baselines import MatrixFactorization, Popularity
from bonmf_core.evaluation.evaluator import evaluate
from bonmf_core.config import EncodersConfig, TrainConfig, load_config
from bonmf_core.content.features import basic_content_features
from bonmf_core.experiment.runner import run_protocol
from bonmf_core.experiment.variants import build_bonmf, fit_variant
from bonmf_core.data.splits import cold_item_split, leave_one_out_split
from bonmf_core.training import NegativeSampler, train, train_with_refit

FAST = {"epochs": 4, "batch_size": 2048, "patience": 2}


@pytest.fixture(scope="module")
def loo(small_demo):
    return leave_one_out_split(small_demo, seed=0, n_negatives=50)


def _params(**train):
    return load_config(flags={"train": {"refit": False, "lr": 0.01, **FAST, **train},
                              "model": {"gmf_dim": 16, "mlp_layers": [32, 16, 8],
                                        "content_hidden": 64}}, use_default_file=False)


def test_negative_sampler_never_returns_a_positive_or_a_non_candidate():
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 3, 4])
    candidates = np.array([0, 1, 2, 3, 4, 5, 6])
    sampler = NegativeSampler(users, items, 2, 10, candidates, torch.Generator().manual_seed(0))
    u = torch.tensor([0] * 500 + [1] * 500)
    neg = sampler.sample(u).numpy()
    assert set(neg[:500]) == {3, 4, 5, 6}
    assert set(neg[500:]) == {0, 1, 2, 5, 6}


def test_id_bonmf_learns_far_above_popularity(small_demo, loo):
    params = _params()
    model, result = fit_variant("id", small_demo, loo, params, 0, {})
    ours = evaluate(model, loo)
    pop = evaluate(Popularity(small_demo.n_items).fit(loo.train), loo)
    assert ours["hr@10"] > pop["hr@10"] + 0.2
    assert ours["ndcg@10"] > pop["ndcg@10"] + 0.15
    assert result.samples_per_s > 0 and result.history[0]["loss"] > result.history[-1]["loss"]


def test_bpr_mf_learns(small_demo, loo):
    model = MatrixFactorization(small_demo.n_users, small_demo.n_items, 16)
    train(model, loo, TrainConfig(loss="bpr", lr=0.01, **FAST))
    pop = evaluate(Popularity(small_demo.n_items).fit(loo.train), loo)
    assert evaluate(model, loo)["ndcg@10"] > pop["ndcg@10"] + 0.1


def test_softmax_loss_is_the_positives_cross_entropy_among_its_negatives(small_demo, loo):
    from bonmf_core.training import _loss

    params = _params(loss="softmax", negatives=8)
    model = build_bonmf(small_demo, ("id",), params.model, {})
    users, items = torch.tensor([0, 1, 2]), torch.tensor([[5, 1, 2], [7, 3, 4], [9, 0, 8]])
    cfg = params.train.model_copy(update={"embedding_reg": 0.0})
    loss = _loss(model, users, items, torch.tensor([[1.0, 0.0, 0.0]]), cfg)
    logits = model(users, items)
    expected = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # and it trains a ranking model far above popularity
    trained, result = fit_variant("id", small_demo, loo, params, 0, {})
    pop = evaluate(Popularity(small_demo.n_items).fit(loo.train), loo)
    assert evaluate(trained, loo)["ndcg@10"] > pop["ndcg@10"] + 0.3
    assert result.history[0]["loss"] > result.history[-1]["loss"]


def test_the_dot_head_trains_and_scores_cold_items_from_content(small_demo):
    params = load_config(flags={"train": {"refit": False, **FAST, "epochs": 6, "patience": 3},
                                "model": {"head": "dot", "gmf_dim": 16}},
                         use_default_file=False)
    split = cold_item_split(small_demo, seed=0)
    feats, _ = basic_content_features(small_demo, ["text"], EncodersConfig())
    model, result = fit_variant("text", small_demo, split, params, 0, feats)
    assert model.config.head == "dot" and result.history[0]["loss"] > result.history[-1]["loss"]
    pop = evaluate(Popularity(small_demo.n_items).fit(split.train), split)
    # Cold items have no interactions: popularity ranks them at random; content must not.
    assert evaluate(model, split)["ndcg@10"] > pop["ndcg@10"] + 0.3


def test_same_seed_same_run(small_demo, loo):
    runs = []
    for _ in range(2):
        model, result = fit_variant("id", small_demo, loo, _params(epochs=1), 7, {})
        runs.append(([h["loss"] for h in result.history], evaluate(model, loo)))
    assert runs[0] == runs[1]


def test_early_stopping_keeps_the_best_epoch(small_demo, loo):
    params = _params(epochs=12, patience=1, lr=0.02)
    model, result = fit_variant("id", small_demo, loo, params, 0, {})
    valid_curve = [h["valid"]["ndcg@10"] for h in result.history]
    assert result.best_metric == max(valid_curve)
    assert result.best_epoch == 1 + int(np.argmax(valid_curve))
    # The model holds the best epoch's weights, not the last one's.
    assert evaluate(model, loo, "valid")["ndcg@10"] == pytest.approx(result.best_metric)
    if result.epochs_run < 12:
        assert result.epochs_run - result.best_epoch == 1


def test_checkpoint_is_safetensors_of_best_weights(small_demo, loo, tmp_path):
    from safetensors.torch import load_file

    model, result = fit_variant("id", small_demo, loo, _params(epochs=3), 0, {})
    cfg = TrainConfig(**{**FAST, "epochs": 2})
    train(model, loo, cfg, checkpoint_dir=tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "best.safetensors"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor)
    record = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert record["train_config"]["epochs"] == 2 and "valid" in record["record"]


def test_cold_items_recommended_through_content(small_demo):
    """Held-out items, never seen in training, ranked for their users from content alone."""
    split = cold_item_split(small_demo, seed=0)
    params = _params(epochs=8, patience=3)
    feats, _ = basic_content_features(small_demo, ["text", "image"], EncodersConfig())
    model, _ = fit_variant("text+image", small_demo, split, params, 0, feats)
    content = evaluate(model, split)
    id_only, _ = fit_variant("id", small_demo, split, params, 0, {})
    blind = evaluate(id_only, split)
    pop = evaluate(Popularity(small_demo.n_items).fit(split.train), split)
    # Chance level: a random ranking of ~50 cold items puts a user's few items in the top 10
    # about 10/50 of the time; content must do far better, and better than the ID-only model
    # (whose cold items all look alike) and popularity (no counts for cold items).
    n_cold = len(split.cold_test_items)
    assert content["recall@10"] > 1.5 * 10 / n_cold
    assert content["ndcg@10"] > blind["ndcg@10"] + 0.1
    assert content["ndcg@10"] > pop["ndcg@10"] + 0.1
    # The content weights were chosen on the validation (cold) items after training: every
    # combination but "no content" was scored there, all ones first, and the best one kept.
    tuning = model.tuning
    assert tuning["parameter"] == "content_weights" and len(tuning["valid"]) == 3 * 3 - 1
    assert next(iter(tuning["valid"])) == "text=1,image=1"
    assert "text=0,image=0" not in tuning["valid"]
    best = ",".join(f"{m}={w:g}" for m, w in tuning["chosen"].items())
    assert tuning["valid"][best] == max(tuning["valid"].values())
    assert model.config.content_weights == tuning["chosen"]
    assert evaluate(model, split, "valid")["ndcg@10"] == pytest.approx(tuning["valid"][best])


def test_run_protocol_reports_protocol_seeds_and_spread(small_demo):
    params = _params(epochs=3, lr=0.01)
    params.protocol.seeds = [0, 1]
    out = run_protocol(small_demo, params, "pop,id")
    assert out["protocol"] == "ncf" and out["seeds"] == [0, 1]
    assert out["dataset_details"]["content_hash"] == small_demo.content_hash()
    assert len(out["protocol_details"]["splits"]) == 2
    hr = out["results"]["id"]["hr@10"]
    assert len(hr["values"]) == 2 and hr["std"] == pytest.approx(np.std(hr["values"]))
    assert out["results"]["pop"]["hr@10"]["mean"] < hr["mean"]
    # The validation figure a default is chosen on, per seed at the best epoch; pop has none.
    valid = out["validation"]
    assert set(valid) == {"id"} and valid["id"]["metric"] == params.train.metric
    assert len(valid["id"]["values"]) == 2 and 0 < valid["id"]["mean"] <= 1
    assert valid["id"]["best_epochs"] == [f for f in valid["id"]["best_epochs"] if 1 <= f <= 3]


def test_user_attributes_are_wired(small_demo, loo):
    params = _params(epochs=1)
    params.model.user_attributes = True
    model = build_bonmf(small_demo, ("id",), params.model, {})
    assert model.config.user_attribute_cardinalities == (small_demo.users["segment"].nunique(),)


def test_refit_trains_a_fresh_model_on_train_and_valid_for_the_best_epochs(small_demo, loo):
    cfg = TrainConfig(**FAST, lr=0.01, refit=True)
    built = []

    def build():
        built.append(MatrixFactorization(small_demo.n_users, small_demo.n_items, 8))
        return built[-1]

    model, result = train_with_refit(build, loo, cfg)
    assert len(built) == 2 and model is built[1]
    assert result.refit["epochs"] == result.best_epoch
    assert result.refit["train_pairs"] == len(loo.train) + len(loo.valid)
    # The refit model has learned the validation pairs (they were in its training data):
    # it ranks them far better than the early-stopped model that never saw them.
    assert evaluate(model, _valid_as_test(loo))["hr@10"] > evaluate(built[0], _valid_as_test(loo))["hr@10"]


def test_continue_refit_trains_the_early_stopped_model_one_more_epoch(small_demo, loo):
    cfg = TrainConfig(**FAST, lr=0.01, refit="continue")
    built = []

    def build():
        built.append(MatrixFactorization(small_demo.n_users, small_demo.n_items, 8))
        return built[-1]

    torch.manual_seed(0)
    plain, _ = train_with_refit(build, loo, cfg.model_copy(update={"refit": False}))
    before = evaluate(plain, _valid_as_test(loo))["hr@10"]
    model, result = train_with_refit(build, loo, cfg)
    assert len(built) == 2 and model is built[1]          # no fresh model: the same one
    assert result.refit["mode"] == "continue" and result.refit["epochs"] == 1
    assert result.refit["train_pairs"] == len(loo.train) + len(loo.valid)
    assert evaluate(model, _valid_as_test(loo))["hr@10"] > before


def _valid_as_test(split):
    from dataclasses import replace

    # Judge on the validation pairs without the leakage guard's objection: the guard would
    # rightly refuse, since the refit model trained on them; here that is the point.
    return replace(split, test=split.valid, test_negatives=split.valid_negatives,
                   train=split.train.iloc[:0])


def test_early_stopping_on_any_metric_and_k(small_demo, loo):
    """train.metric other than …@10 is validated at its own k (it raised KeyError before)."""
    params = _params(epochs=2, metric="hr@5")
    _, result = fit_variant("id", small_demo, loo, params, 0, {})
    assert result.best_metric == max(h["valid"]["hr@5"] for h in result.history)
    assert "hr@10" not in result.history[0]["valid"]


def test_sgd_learning_rate_is_per_training_pair_as_per_example_sgd():
    """One sgd step over a batch moves the weights as the per-example loop of Rendle et al.
    (logistic loss + reg·(‖u‖² + ‖i‖²) per pair, one step each) does, to first order in lr,
    so `train.lr` keeps its meaning whatever the batch size."""
    from bonmf_core.training import _epoch_pairs, _optimizers, _run_epoch
    from test_model import _model

    users = np.repeat(np.arange(6), 3)
    items = (users * 5 + np.tile(np.arange(3), 6)) % 20
    sampler = NegativeSampler(users, items, 30, 20, np.arange(20), torch.Generator())
    u_pos, i_pos = torch.tensor(users), torch.tensor(items)
    cfg = TrainConfig(optimizer="sgd", lr=1e-4, negatives=2, embedding_reg=0.01)

    batched = _model(head="dot").train()
    looped = _model(head="dot").train()
    start = {k: v.clone() for k, v in batched.state_dict().items()}
    sampler.gen.manual_seed(7)
    _run_epoch(batched, _optimizers(batched, cfg), sampler, u_pos, i_pos, cfg, torch.Generator()
               .manual_seed(3))
    sampler.gen.manual_seed(7)
    rows_u, rows_i, _, groups = _epoch_pairs(sampler, u_pos, i_pos, cfg,
                                             torch.Generator().manual_seed(3))
    assert groups >= len(rows_u)   # the whole epoch is one step
    step = torch.optim.SGD(looped.parameters(), lr=cfg.lr)
    for u, row in zip(rows_u, rows_i):
        for col, i in enumerate(row):
            logit = looped(u[None], i[None])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logit, torch.tensor([1.0 if col == 0 else 0.0]))
            loss = loss + cfg.embedding_reg * (looped.user_vectors(u[None]).square().sum()
                                               + looped.item_vectors(i[None]).square().sum())
            step.zero_grad()
            loss.backward()
            step.step()
    moved = {k: (looped.state_dict()[k] - start[k]).abs().max() for k in start
             if start[k].is_floating_point()}
    assert max(moved.values()) > 1e-5           # the loop did move the weights
    for k, v in batched.state_dict().items():
        if v.is_floating_point():
            diff = (v - looped.state_dict()[k]).abs().max()
            assert diff <= 0.01 * max(moved[k], 1e-12) + 1e-9, k


def test_sgd_keeps_the_shared_content_layers_on_adam():
    """Per-pair SGD suits the per-row tables; a projection every item shares would sum all the
    batch's pair gradients into one step, so it takes Adam (a step the summed loss does not
    rescale)."""
    from bonmf_core.training import _optimizers
    from test_model import _model

    model = _model(modalities=("id", "text"), head="dot")
    sgd, adam = _optimizers(model, TrainConfig(optimizer="sgd", lr=0.003))
    assert (type(sgd).__name__, type(adam).__name__) == ("SGD", "Adam")
    ids = lambda opt: {id(p) for g in opt.param_groups for p in g["params"]}
    tables = {id(model.user_embedding.weight), id(model.item_embedding.weight), id(model.bias)}
    assert ids(sgd) == tables
    assert ids(adam) == {id(p) for p in model.content.parameters()}
    assert {g["lr"] for o in (sgd, adam) for g in o.param_groups} == {0.003}
    (only,) = _optimizers(_model(head="dot"), TrainConfig(optimizer="sgd"))
    assert type(only).__name__ == "SGD"


def test_a_content_model_trains_under_per_pair_sgd(small_demo):
    params = load_config(flags={"train": {"refit": False, **FAST, "epochs": 6, "patience": 3,
                                          "optimizer": "sgd", "lr": 0.01},
                                "model": {"head": "dot", "gmf_dim": 16}},
                         use_default_file=False)
    split = cold_item_split(small_demo, seed=0)
    feats, _ = basic_content_features(small_demo, ["text"], EncodersConfig())
    model, result = fit_variant("text", small_demo, split, params, 0, feats)
    losses = [r["loss"] for r in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    pop = evaluate(Popularity(small_demo.n_items).fit(split.train), split)
    # cold items are scored from the content projection alone: it learned under sgd
    assert evaluate(model, split)["ndcg@10"] > pop["ndcg@10"] + 0.3
