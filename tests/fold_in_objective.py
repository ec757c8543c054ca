"""The objective `BoNMF.fold_in_many` states, for tests that check its answer is a stationary
point: the logistic loss of the liked items, `FOLD_IN_NEGATIVES` per liked item spread over the
other items, and the population prior (the head's weight) around the start."""

import torch

from bonmf_core.models.bonmf import FOLD_IN_NEGATIVES, FOLD_IN_PRIOR


def map_gradient(model, items, liked, start):
    """→ a function u ↦ ∇ of the objective at u (items: `item_side` of the whole catalog)."""
    n_items = len(items.vectors)
    _, precision = model.user_prior()
    labels = torch.zeros(n_items)
    labels[list(liked)] = 1
    spread = FOLD_IN_NEGATIVES * len(liked) / (n_items - len(liked))
    weights = torch.where(labels > 0, 1.0, spread)

    def gradient(u):
        u = u.clone().requires_grad_()
        with torch.enable_grad():
            logits = model.score_sides(model.user_side(u[None]), items)[0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels, weight=weights, reduction="sum")
            weight = FOLD_IN_PRIOR[model.config.head]
            loss = loss + weight / 2 * (u - start) @ precision @ (u - start)
            return torch.autograd.grad(loss, [u])[0]

    return gradient
