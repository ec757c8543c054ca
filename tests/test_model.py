import pytest
import torch

from bonmf_core.config import ModelConfig
from bonmf_core.models.bonmf import BoNMF, BoNMFConfig

# The schema's model defaults (the hyper-parameters BoNMFConfig takes from configuration).
ARCH = ModelConfig().model_dump(exclude={"user_attributes", "content_weight_grid"})


def _model(modalities=("id",), attrs=False, n_users=30, n_items=20, seed=0, hidden=16,
           head="neumf"):
    torch.manual_seed(seed)
    feats = {"text": torch.randn(n_items, 12), "image": torch.randn(n_items, 7)}
    cfg = BoNMFConfig(n_users, n_items, modalities=modalities,
                      **{**ARCH, "gmf_dim": 8, "mlp_layers": (16, 8, 4), "content_hidden": hidden,
                         "head": head},
                      feature_dims={m: feats[m].shape[1] for m in modalities if m != "id"},
                      user_attribute_cardinalities=(3, 2) if attrs else ())
    user_attrs = torch.stack([torch.arange(n_users) % 3, torch.arange(n_users) % 2], 1)
    model = BoNMF(cfg, features={m: feats[m] for m in modalities if m != "id"},
                  user_attributes=user_attrs if attrs else None)
    # Non-trivial weights everywhere, so the checks below are not comparing zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("head", ["neumf", "dot"])
@pytest.mark.parametrize("modalities,attrs", [(("id",), False), (("id", "text"), True),
                                              (("text", "image"), False),
                                              (("id", "text", "image"), True)])
def test_full_catalog_scoring_equals_pairwise_forward(modalities, attrs, head):
    """score_users splits the first MLP layer for speed; it must give the forward's numbers."""
    model = _model(modalities, attrs, head=head)
    users = torch.arange(30)
    full = model.score_users(users)
    pairs = model(users.repeat_interleave(20), torch.arange(20).repeat(30)).view(30, 20)
    grouped = model(users, torch.arange(20).expand(30, 20))
    torch.testing.assert_close(full, pairs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, pairs, rtol=1e-5, atol=1e-5)


def test_a_linear_content_projection_scores_like_the_forward_and_learns():
    """content_hidden 0: one linear map per modality, through the same scoring paths."""
    model = _model(("id", "text", "image"), hidden=0)
    assert all(isinstance(p, torch.nn.Linear) for p in model.content.values())
    users = torch.arange(30)
    pairs = model(users.repeat_interleave(20), torch.arange(20).repeat(30)).view(30, 20)
    torch.testing.assert_close(model.score_users(users), pairs, rtol=1e-5, atol=1e-5)
    model.train()
    logits, norms = model(users, torch.arange(20).expand(30, 20), return_norms=True)
    (logits.mean() + norms).backward()
    assert model.content["image"].weight.grad.abs().sum() > 0
    # Training reads the modalities side by side through one product: the same vectors.
    model.config.id_dropout = 0.0
    with torch.no_grad():
        expected = model.item_embedding.weight + sum(
            project(model._reduced(m)) for m, project in model.content.items())
        torch.testing.assert_close(model.train().item_vectors(torch.arange(20)), expected)


def test_the_training_regularizer_is_the_mean_squared_norm_of_the_vectors_used():
    model = _model(("id", "text"))
    users, items = torch.arange(6), torch.arange(18).view(6, 3)
    _, norms = model(users, items, return_norms=True)
    u, i = model.user_vectors(users), model.item_vectors(items)
    torch.testing.assert_close(norms, u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean())


def test_cold_items_are_scored_from_content_alone():
    model = _model(("id", "text"))
    model.warm_items[5] = False
    before = model.score_users(torch.arange(30))
    with torch.no_grad():
        model.item_embedding.weight[5] += 100.0  # an untrained ID row must not matter
        model.item_embedding.weight[6] += 1.0    # a warm item's row does
    after = model.score_users(torch.arange(30))
    torch.testing.assert_close(before[:, 5], after[:, 5])
    assert not torch.allclose(before[:, 6], after[:, 6])


def test_id_dropout_only_while_training():
    model = _model(("id", "text"))
    model.config.id_dropout = 0.5
    users, items = torch.zeros(200, dtype=torch.long), torch.full((200,), 3)
    model.train()
    torch.manual_seed(1)
    steps = torch.stack([model(users, items) for _ in range(20)])
    assert (steps == steps[:, :1]).all()          # one draw per item and step
    assert steps[:, 0].unique().numel() == 2      # with and without the ID embedding
    model.eval()
    assert model(users, items).unique().numel() == 1


def test_user_attributes_change_user_vectors():
    model = _model(("id",), attrs=True)
    with torch.no_grad():
        before = model.user_vectors(torch.tensor([4])).clone()
        model.user_attr[0].weight[4 % 3] += 1.0
    assert not torch.allclose(before, model.user_vectors(torch.tensor([4])))


@pytest.mark.parametrize("kwargs,match", [
    (dict(modalities=("id", "audio")), "modalities"),
    (dict(modalities=("id", "text")), "feature matrices"),
    (dict(modalities=()), "modalities"),
    (dict(mlp_layers=(15, 8)), "even"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BoNMFConfig(10, 10, **{**ARCH, **kwargs})


def test_feature_matrix_must_align_with_items():
    cfg = BoNMFConfig(5, 10, modalities=("id", "text"), feature_dims={"text": 4}, **ARCH)
    with pytest.raises(ValueError, match="10×4"):
        BoNMF(cfg, features={"text": torch.zeros(9, 4)})


def test_modalities_are_normalised_to_one_order():
    a = BoNMFConfig(5, 10, modalities=("image", "id", "text"), feature_dims={"text": 1, "image": 1},
                    **ARCH)
    assert a.modalities == ("id", "text", "image")
    assert BoNMFConfig.from_dict(a.to_dict()) == a


def test_a_catalog_smaller_than_the_content_dim_still_trains_and_scores():
    """PCA of 20 items has at most 20 directions: the reduced space keeps `content_dim` wide
    (the projection's input) with the missing directions 0."""
    feats = {"text": torch.randn(20, 300)}
    cfg = BoNMFConfig(10, 20, modalities=("id", "text"),
                      **{**ARCH, "gmf_dim": 8, "mlp_layers": (16, 8, 4), "content_hidden": 16,
                         "content_dim": 64}, feature_dims={"text": 300})
    model = BoNMF(cfg, features=feats)
    loss = model(torch.arange(10), torch.arange(10)).sum()
    loss.backward()
    reduced = model.reduce_features("text", feats["text"])
    assert reduced.shape == (20, 64) and (reduced[:, 20:] == 0).all()
    assert torch.isfinite(model.eval().score_users(torch.arange(10))).all()


def test_id_dropout_drops_the_id_part_of_whole_items_while_training_only():
    """Each step drops the ID part of about `id_dropout` of the items, for every occurrence of
    a dropped item in the batch (one draw per item, as DropoutNet)."""
    model = _model(("id", "text"), n_items=400)
    model.config.id_dropout = 0.5
    items = torch.arange(400).repeat(3)
    with torch.no_grad():
        text = model.content["text"](model._reduced("text"))[items]
        full = model.item_embedding(items) + text
        torch.manual_seed(0)
        trained = model.train().item_vectors(items)
    is_text = torch.isclose(trained, text).all(-1)
    assert (is_text | torch.isclose(trained, full).all(-1)).all()  # each one or the other
    per_item = is_text.view(3, 400)
    assert (per_item == per_item[0]).all()                        # the same for each occurrence
    assert 0.4 < per_item[0].float().mean() < 0.6                 # about half of the items
    torch.testing.assert_close(model.eval().item_vectors(items), full)


def test_each_content_modality_can_have_its_own_reduced_width():
    feats = {"text": torch.randn(40, 30), "image": torch.randn(40, 50)}
    cfg = BoNMFConfig(10, 40, modalities=("id", "text", "image"),
                      **{**ARCH, "gmf_dim": 8, "mlp_layers": (16, 8, 4), "content_hidden": 0,
                         "content_dim": {"text": 12, "image": 4}},
                      feature_dims={"text": 30, "image": 50})
    model = BoNMF(cfg, features=feats)
    assert model.reduce_features("text", feats["text"]).shape == (40, 12)
    assert model.reduce_features("image", feats["image"]).shape == (40, 4)
    assert model.content["image"].in_features == 4
    model(torch.arange(10), torch.arange(10)).sum().backward()
    assert BoNMFConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value,match", [({"text": 64}, "names text and image"),
                                         ({"text": 64, "image": -1}, ">= 0"),
                                         ({"text": 64, "audio": 8}, "text")])
def test_a_content_dim_mapping_is_checked(value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(content_dim=value)
    assert ModelConfig(content_dim={"text": 64, "image": 16}).content_dim["image"] == 16


def test_artifacts_with_retired_options_load_when_they_were_off_only():
    cfg = _model(("id", "text")).config.to_dict()
    assert BoNMFConfig.from_dict({**cfg, "modality_dropout": 0.0, "content_align": 0.0}) \
        == BoNMFConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="modality_dropout=0.3"):
        BoNMFConfig.from_dict({**cfg, "modality_dropout": 0.3})


def test_content_weights_scale_each_modality_when_scoring_only():
    model = _model(("id", "text", "image"))
    items = torch.arange(20)
    full = model.item_vectors(items)
    model.config.content_weights = {"image": 0.0}
    text_only = model.item_vectors(items)
    model.config.content_weights = {}
    with torch.no_grad():
        ids = model.item_embedding(items) * model.warm_items[items, None]
        text = model.content["text"](model._reduced("text"))
        image = model.content["image"](model._reduced("image"))
    torch.testing.assert_close(full, ids + text + image)
    torch.testing.assert_close(text_only, ids + text)
    model.config.content_weights = {"text": 0.5, "image": 2.0}
    torch.testing.assert_close(model.item_vectors(items), ids + 0.5 * text + 2.0 * image)
    raw = {"text": model.feat_text[:3], "image": model.feat_image[:3]}
    torch.testing.assert_close(model.content_item_vectors(raw), (0.5 * text + 2.0 * image)[:3])
    # Training always sees weight 1 (the weights are chosen after it): ID dropout off here.
    model.config.id_dropout = 0.0
    with torch.no_grad():
        trained = model.train().item_vectors(items)
    torch.testing.assert_close(trained, model.item_embedding(items) + text + image)


def test_the_fused_gathers_and_batched_dot_have_exact_gradients():
    from bonmf_core.models.bonmf import _BatchedDot, _GatherParts
    table = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    for index in (torch.tensor([[0, 3, 3], [6, 0, 1]]),      # fewer rows read than the table
                  torch.tensor([[2, 2, 2, 2], [5, 5, 1, 0]])):  # more: the counts path
        assert torch.autograd.gradcheck(lambda t: _GatherParts.apply(t, index, 2), (table,))
        gmf, mlp, squares = _GatherParts.apply(table, index, 2)
        torch.testing.assert_close(torch.cat([gmf, mlp], -1), table.detach()[index])
        torch.testing.assert_close(squares, table.detach()[index].pow(2).sum())
    from bonmf_core.models.bonmf import _GatherItemRows
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    for index in (torch.tensor([[2, 2, 2, 2], [5, 5, 1, 0]]), torch.arange(7).repeat(2)):
        assert torch.autograd.gradcheck(
            lambda t, w: _GatherItemRows.apply(t, w, index, 2), (table, weight))
        gmf, first, squares = _GatherItemRows.apply(table, weight, index, 2)
        rows = table.detach()[index]
        torch.testing.assert_close(gmf, rows[..., :2])
        torch.testing.assert_close(first, rows[..., 2:] @ weight.detach().T)
        torch.testing.assert_close(squares, rows.pow(2).sum())
    items = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    users = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_BatchedDot.apply, (items, users))
    torch.testing.assert_close(_BatchedDot.apply(items, users),
                               (items * users[:, None]).sum(-1))


@pytest.mark.parametrize("modalities", [("id",), ("id", "text", "image")])
def test_the_dot_head_scores_the_biased_inner_product(modalities):
    model = _model(modalities, attrs=True, head="dot", hidden=0)
    assert not hasattr(model, "mlp") and model.user_embedding.weight.shape[1] == 8 + 1
    users, items = torch.arange(30), torch.arange(20)
    u, i = model.user_vectors(users), model.item_vectors(items)
    expected = u[:, :8] @ i[:, :8].T + u[:, 8:] + i[:, 8:].T + model.bias
    torch.testing.assert_close(model.score_users(users), expected.detach())
    # The retrieval proxy is the exact score less the user's constant (bias + b).
    from bonmf_core.serving.retrieval import HeadProxy
    item_side = model.item_side(i.detach())
    queries = torch.from_numpy(HeadProxy(model, item_side).queries(model.user_side(u.detach())))
    torch.testing.assert_close(queries @ i.detach().T + u[:, 8:].detach() + model.bias.detach(),
                               expected.detach())
    # Training reaches the biases: they get gradients, content projections feed them too.
    model.train()
    logits, norms = model(users, items.expand(30, 20), return_norms=True)
    (logits.mean() + norms).backward()
    assert model.bias.grad is not None and model.user_embedding.weight.grad[:, 8].abs().sum() > 0
    if "text" in modalities:
        assert model.content["text"].weight.grad[8].abs().sum() > 0


def test_a_fresh_dot_head_starts_as_tuned_mf_does():
    """Embeddings N(0, 0.1²), biases 0 (Rendle et al.), and an artifact round-trips the head."""
    torch.manual_seed(0)
    cfg = BoNMFConfig(500, 400, **{**ARCH, "head": "dot"})
    model = BoNMF(cfg)
    weights = model.item_embedding.weight
    assert (weights[:, -1] == 0).all() and model.bias.item() == 0
    assert 0.09 < weights[:, :-1].std().item() < 0.11
    assert BoNMFConfig.from_dict(cfg.to_dict()).head == "dot"
    old = {k: v for k, v in _model().config.to_dict().items() if k != "head"}
    assert BoNMFConfig.from_dict(old).head == "neumf"   # saved before the option existed
    with pytest.raises(ValueError, match="head must be one of"):
        BoNMFConfig(5, 5, **{**ARCH, "head": "mlp"})


@pytest.mark.parametrize("head", ["neumf", "dot"])
def test_fold_in_is_a_stationary_point_of_its_map_objective(head):
    """Both heads' fold-in solve the objective `fold_in_many` states (the chord Newton steps
    converge): the logistic loss of the liked items, `negatives` per liked item spread over
    the rest, and the population prior around the start."""
    from fold_in_objective import map_gradient

    model = _model(("id", "text"), head=head, n_users=60, n_items=40)
    liked = [3, 7, 8, 21]
    with torch.no_grad():
        items = model.item_side(model.item_vectors(torch.arange(40)))
    start = model.cold_start_vectors(n=1)[0]
    gradient = map_gradient(model, items, liked, start)
    answer = model.fold_in_many([liked], items, steps=30)[0]
    assert gradient(answer).norm() < 1e-3 * gradient(start).norm()
    assert not torch.allclose(answer, start)
