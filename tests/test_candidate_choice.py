"""The candidate is chosen on validation, never on the test set (issue 12: the gate promotes
the content model when it beats ID-only on validation)."""

from bonmf_core.experiment.runner import choose_candidate, validation_score


def _fit(variant, seed, test, valid_curve):
    return {"variant": variant, "seed": seed, "metrics": {"ndcg@10": test},
            "history": [{"epoch": e + 1, "valid": {"ndcg@10": v}}
                        for e, v in enumerate(valid_curve)] if valid_curve else []}


def test_validation_chooses_even_when_the_test_set_disagrees():
    fits = [_fit("id", 0, 0.50, [0.30, 0.31]), _fit("id", 1, 0.52, [0.30, 0.29]),
            _fit("text+image", 0, 0.40, [0.33, 0.32]), _fit("text+image", 1, 0.41, [0.34])]
    choice = choose_candidate(fits, ["id", "text+image"], "ndcg@10")
    assert choice["variant"] == "text+image" and choice["chosen_on"] == "validation"
    assert choice["validation"]["text+image"] == (0.33 + 0.34) / 2
    assert choice["metrics"]["ndcg@10"] == (0.40 + 0.41) / 2     # reported: the test means
    assert validation_score(fits[0], "ndcg@10") == 0.31            # the best epoch's


def test_without_a_validation_set_the_choice_says_it_used_the_test_set():
    fits = [_fit("id", 0, 0.50, None), _fit("text+image", 0, 0.40, None)]
    choice = choose_candidate(fits, ["id", "text+image"], "ndcg@10")
    assert choice["variant"] == "id" and choice["chosen_on"] == "test"


def test_content_weights_chosen_after_training_count_as_the_shipped_models_validation():
    tuned = _fit("text+image", 0, 0.40, [0.29, 0.30])
    tuned["tuning"] = {"parameter": "content_weights", "metric": "ndcg@10",
                       "chosen": {"text": 1.0, "image": 0.0},
                       "valid": {"text=1,image=1": 0.30, "text=1,image=0": 0.32}}
    fits = [_fit("id", 0, 0.50, [0.31]), tuned]
    assert validation_score(tuned, "ndcg@10") == 0.32
    assert choose_candidate(fits, ["id", "text+image"], "ndcg@10")["variant"] == "text+image"
    # Weights chosen on another metric say nothing about this one.
    assert validation_score(tuned, "hr@10") is None
