"""Metrics by item-popularity slice: head / torso / tail from the training interactions only,
the same ranking with only the slice's held-out items counting, aggregated into the results
record, the report and benchmarks/quality.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from bonmf_core.config import ProtocolConfig, load_config
from bonmf_core.data.splits import Split, make_split
from bonmf_core.evaluation.evaluator import SLICE_NAMES, evaluate, popularity_slices

REPO = Path(__file__).resolve().parents[1]
LOG2_3 = math.log2(3)


class MatrixScorer:
    """Scores from a fixed users × items matrix; counts how often it is asked."""

    def __init__(self, matrix):
        self.m = torch.as_tensor(np.asarray(matrix, np.float32))
        self.calls = 0

    def score_pairs(self, users, items):
        self.calls += 1
        return self.m[users[:, None], items] if items.dim() == 2 else self.m[users, items]

    def score_users(self, users):
        self.calls += 1
        return self.m[users]


def frame(pairs):
    return pd.DataFrame({"user": np.array([p[0] for p in pairs], np.int64),
                         "item": np.array([p[1] for p in pairs], np.int64)})


# Training counts per item: 0→6, 1→4, 2→4, 3→3, 4→2, 5→1, 6→0, 7→0 (20 interactions).
TRAIN = frame([(u, 0) for u in range(6)] + [(u, 1) for u in range(4)]
              + [(u, 2) for u in range(4, 8)] + [(u, 3) for u in range(3)]
              + [(3, 4), (4, 4), (5, 5)])
N_USERS, N_ITEMS = 8, 8


def labels(split, **thresholds):
    cfg = ProtocolConfig(**thresholds)
    s = popularity_slices(split, cfg.head_share, cfg.tail_max_interactions)
    return {name: s.items(name).tolist() for name in SLICE_NAMES}


def full_split(test, valid=None, protocol="full", **kw):
    return Split(protocol, N_USERS, N_ITEMS, TRAIN, valid if valid is not None else frame([]),
                 test, **kw)


# -- the definition ------------------------------------------------------------------------------

def test_slices_match_a_hand_computation_at_the_boundaries():
    split = full_split(frame([(0, 2)]))
    assert TRAIN.groupby("item").size().to_dict() == {0: 6, 1: 4, 2: 4, 3: 3, 4: 2, 5: 1}
    # 30% of 20 = 6: item 0 holds exactly 6, so the next item (6 held before it) is not head
    assert labels(split, head_share=0.3, tail_max_interactions=2) == {
        "head": [0], "torso": [1, 2, 3], "tail": [4, 5, 6, 7]}
    # 35% = 7: item 1 starts at 6 < 7, so it crosses the mark and is head; item 2 ties with it
    # at 4 interactions but comes later (item index) and starts at 10: torso
    assert labels(split, head_share=0.35, tail_max_interactions=2) == {
        "head": [0, 1], "torso": [2, 3], "tail": [4, 5, 6, 7]}
    # the tail rule (≤ 4 interactions) wins over head for item 1; ≤ 3 keeps item 3 tail too
    assert labels(split, head_share=0.35, tail_max_interactions=4) == {
        "head": [0], "torso": [], "tail": [1, 2, 3, 4, 5, 6, 7]}
    # tail_max 0: only cold items (no training interaction) are tail
    assert labels(split, head_share=0.5, tail_max_interactions=0) == {
        "head": [0, 1], "torso": [2, 3, 4, 5], "tail": [6, 7]}
    # the defaults (20%, ≤ 20): every item here has ≤ 20 interactions, and the tail rule wins
    assert labels(split) == {"head": [], "torso": [], "tail": list(range(8))}
    desc = popularity_slices(split, 0.35, 2).describe()
    assert desc["items"] == {"head": 2, "torso": 2, "tail": 4}
    assert desc["train_interactions"] == {"head": 10, "torso": 7, "tail": 3}
    assert desc["head_share"] == 0.35 and desc["tail_max_interactions"] == 2


def test_thresholds_are_configuration():
    cfg = load_config(sets=["protocol.head_share=0.35", "protocol.tail_max_interactions=2"],
                      use_default_file=False)
    assert (cfg.protocol.head_share, cfg.protocol.tail_max_interactions) == (0.35, 2)
    defaults = ProtocolConfig()
    assert (defaults.head_share, defaults.tail_max_interactions) == (0.2, 20)
    repo = load_config(REPO / "params.yaml")
    assert (repo.protocol.head_share, repo.protocol.tail_max_interactions) == (0.2, 20)
    for bad in ({"head_share": 0}, {"head_share": 1.5}, {"tail_max_interactions": -1}):
        with pytest.raises(ValidationError):
            ProtocolConfig(**bad)
    fields = ProtocolConfig.model_fields
    assert "head" in fields["head_share"].description
    assert "tail" in fields["tail_max_interactions"].description


def test_held_out_data_never_changes_the_slices():
    base = popularity_slices(full_split(frame([(0, 2)])), 0.35, 2)
    # a test (and validation) set piling onto the cold and tail items
    heavy = frame([(u, i) for u in range(N_USERS) for i in (6, 7) ] + [(6, 5), (7, 4)])
    for split in (full_split(heavy), full_split(frame([(0, 2)]), valid=heavy),
                  full_split(frame([(6, 0)]), protocol="ncf",
                             test_negatives=np.array([[3, 4, 5]]))):
        other = popularity_slices(split, 0.35, 2)
        assert np.array_equal(other.labels, base.labels)
        assert np.array_equal(other.train_counts, base.train_counts)
    # ... while the training set does: moving item 5's only interaction to item 6 makes 5 cold
    moved = TRAIN.copy()
    moved.loc[moved["item"] == 5, "item"] = 6
    assert popularity_slices(Split("full", N_USERS, N_ITEMS, moved, frame([]), frame([(0, 2)])),
                             0.35, 0).items("tail").tolist() == [5, 7]


# -- the metrics ------------------------------------------------------------------------------

def test_ncf_slices_are_the_metrics_of_the_users_whose_test_item_is_in_the_slice():
    # head {0, 1}, torso {2, 3}, tail {4, 5, 6, 7}
    test = frame([(0, 2), (1, 4), (2, 6), (6, 0)])
    negatives = np.array([[4, 5, 6], [2, 5, 6], [2, 4, 5], [3, 4, 5]])
    split = full_split(test, protocol="ncf", test_negatives=negatives)
    scores = np.zeros((N_USERS, N_ITEMS))
    scores[0, [2, 4, 5, 6]] = [5, 6, 1, 0]      # rank 1
    scores[1, [4, 2, 5, 6]] = [9, 1, 2, 3]      # rank 0
    scores[2, [6, 2, 4, 5]] = [1, 5, 4, 3]      # rank 3
    scores[6, [0, 3, 4, 5]] = [2, 3, 1, 0]      # rank 1
    scorer = MatrixScorer(scores)
    out = evaluate(scorer, split, ks=(1, 2), slices=popularity_slices(split, 0.35, 2))
    assert scorer.calls == 1   # one scoring pass (a chunk of 4 users) for all of it
    assert out["hr@2"] == pytest.approx(0.75) and out["hr@1"] == pytest.approx(0.25)
    sl = out["slices"]
    assert list(sl) == ["head", "torso", "tail"]
    for name in ("head", "torso"):   # one user each, at rank 1
        assert sl[name]["users"] == 1 and sl[name]["pairs"] == 1
        assert sl[name]["hr@1"] == 0 and sl[name]["hr@2"] == 1
        assert sl[name]["ndcg@1"] == 0
        assert sl[name]["ndcg@2"] == pytest.approx(1 / LOG2_3, abs=1e-6)
    assert sl["tail"]["users"] == 2 and sl["tail"]["pairs"] == 2   # ranks 0 and 3
    assert sl["tail"]["hr@1"] == pytest.approx(0.5) and sl["tail"]["hr@2"] == pytest.approx(0.5)
    assert sl["tail"]["ndcg@2"] == pytest.approx(0.5, abs=1e-6)
    assert "recall@2" not in sl["tail"]   # the sampled protocol has no recall
    # every user is in exactly one slice: the user-weighted slice means are the overall ones
    for metric in ("hr@1", "hr@2", "ndcg@1", "ndcg@2"):
        weighted = sum(sl[n][metric] * sl[n]["users"] for n in sl) / out["users"]
        assert weighted == pytest.approx(out[metric], abs=1e-6)
    # without slices nothing changes and no "slices" key appears
    plain = evaluate(MatrixScorer(scores), split, ks=(1, 2))
    assert "slices" not in plain
    assert {k: v for k, v in out.items() if k != "slices"} == pytest.approx(plain)


def test_full_slices_keep_the_ranking_and_count_only_their_own_positives():
    # user 0 trained 0, 1, 3 → candidates 2, 4, 5, 6, 7; test 2 (torso), 6 and 7 (tail)
    # user 6 trained 2 → candidates 0, 1, 3..7; test 0 (head), 7 (tail)
    test = frame([(0, 2), (0, 6), (0, 7), (6, 0), (6, 7)])
    split = full_split(test)
    scores = np.zeros((N_USERS, N_ITEMS))
    scores[0] = [50, 50, 1, 50, 5, 4, 3, 0]      # masked 0, 1, 3 → order 4, 5, 6, 2, 7
    scores[6] = [2, 9, 50, 1, -1, -1, -1, 8]     # masked 2 → order 1, 7, 0, 3, ...
    scorer = MatrixScorer(scores)
    out = evaluate(scorer, split, ks=(1, 3), slices=popularity_slices(split, 0.35, 2))
    assert scorer.calls == 1
    sl = out["slices"]
    # head: user 6 only; item 0 third, behind the (tail) positive 7, which still takes a place
    assert sl["head"]["users"] == 1 and sl["head"]["pairs"] == 1
    assert sl["head"]["recall@3"] == 1 and sl["head"]["hr@3"] == 1 and sl["head"]["hr@1"] == 0
    assert sl["head"]["ndcg@3"] == pytest.approx(0.5, abs=1e-6)
    # torso: user 0's item 2 is fourth → nothing in the top 3
    assert sl["torso"]["users"] == 1 and sl["torso"]["pairs"] == 1
    assert sl["torso"]["recall@3"] == 0 and sl["torso"]["ndcg@3"] == 0
    # tail: user 0 has 6 (third) and 7 (fifth), user 6 has 7 (second)
    assert sl["tail"]["users"] == 2 and sl["tail"]["pairs"] == 3
    assert sl["tail"]["recall@3"] == pytest.approx((0.5 + 1) / 2)
    assert sl["tail"]["hr@3"] == 1 and sl["tail"]["hr@1"] == 0 and sl["tail"]["recall@1"] == 0
    assert sl["tail"]["ndcg@3"] == pytest.approx((0.5 / (1 + 1 / LOG2_3) + 1 / LOG2_3) / 2,
                                                 abs=1e-6)
    # the overall metrics are untouched (user 0: 6 third; user 6: 7 second, 0 third)
    assert out["recall@3"] == pytest.approx((1 / 3 + 1) / 2)
    # one slice holding every item reproduces the overall metrics exactly
    everything = evaluate(scorer, split, ks=(1, 3), slices=popularity_slices(split, 0.2, 100))
    assert everything["slices"]["tail"]["users"] == out["users"] == 2
    for metric in ("recall@1", "recall@3", "ndcg@1", "ndcg@3", "hr@1", "hr@3"):
        assert everything["slices"]["tail"][metric] == pytest.approx(out[metric], abs=1e-6)
    assert everything["slices"]["head"] == {"users": 0.0, "pairs": 0.0}
    # ties count against the positives, in every slice as overall: scoring all alike earns 0
    alike = evaluate(MatrixScorer(np.zeros((N_USERS, N_ITEMS))), split, ks=(1, 2),
                     slices=popularity_slices(split, 0.35, 2))
    assert alike["hr@1"] == 0 and alike["hr@2"] == 0
    for name in SLICE_NAMES:
        assert alike["slices"][name]["hr@1"] == 0 and alike["slices"][name]["hr@2"] == 0, name


def test_full_slices_are_the_same_over_user_chunks():
    from bonmf_core.evaluation.evaluator import evaluate_full

    rng = np.random.default_rng(0)
    test = frame([(0, 2), (0, 6), (0, 7), (6, 0), (6, 7), (7, 5), (5, 6), (4, 7)])
    split = full_split(test)
    scorer = MatrixScorer(rng.normal(size=(N_USERS, N_ITEMS)))
    slices = popularity_slices(split, 0.35, 2)
    whole = evaluate_full(scorer, split, ks=(2, 5), slices=slices)
    chunked = evaluate_full(scorer, split, ks=(2, 5), chunk=2, slices=slices)
    for name in SLICE_NAMES:
        assert chunked["slices"][name] == pytest.approx(whole["slices"][name], abs=1e-6)


def test_cold_items_protocol_puts_every_test_item_in_the_tail():
    train = frame([(0, 0), (0, 1), (1, 1), (1, 2)])
    test = frame([(0, 4), (1, 3)])
    split = Split("cold_items", 2, 6, train, frame([]), test,
                  cold_test_items=np.array([3, 4, 5]), cold_valid_items=np.array([], np.int64))
    scores = [[50, 40, 30, 2, 3, 1], [50, 40, 30, 2, 1, 3]]
    out = evaluate(MatrixScorer(scores), split, ks=(1, 2),
                   slices=popularity_slices(split, 0.2, 0))
    assert out["slices"]["head"] == {"users": 0.0, "pairs": 0.0}
    assert out["slices"]["torso"] == {"users": 0.0, "pairs": 0.0}
    tail = out["slices"]["tail"]
    assert tail["users"] == 2 and tail["hr@1"] == pytest.approx(out["hr@1"]) == 0.5
    assert tail["ndcg@2"] == pytest.approx(out["ndcg@2"], abs=1e-6)


# -- the runner, the report and the benchmark -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from bonmf_core.data.demo import demo_dataset

    return demo_dataset(seed=0, n_users=300, n_items=150,
                        image_dir=tmp_path_factory.mktemp("slices-demo") / "images")


def test_runner_aggregates_slices_over_seeds_and_the_report_shows_them(tiny_demo, tmp_path):
    from bonmf_core.experiment.report import write_report
    from bonmf_core.experiment.runner import aggregate, run_fits, run_protocol

    cfg = load_config(sets=["protocol.seeds=[0, 1]", "protocol.head_share=0.3",
                            "protocol.tail_max_interactions=30"], use_default_file=False)
    results = run_protocol(tiny_demo, cfg, "pop,item_knn")
    assert results["protocol_details"]["slices"] == {"head_share": 0.3,
                                                     "tail_max_interactions": 30}
    fits = run_fits(["pop"], tiny_demo, [make_split(tiny_demo, cfg.protocol, s) for s in (0, 1)],
                    cfg, {}, report=lambda _: None)
    per_seed = [f["metrics"]["slices"] for f in fits]
    assert fits[0]["slice_definition"]["head_share"] == 0.3
    assert sum(fits[0]["slice_definition"]["items"].values()) == tiny_demo.n_items
    for variant in ("pop", "item_knn"):
        slices = results["results"][variant]["slices"]
        assert list(slices) == ["head", "torso", "tail"]
        for name, metrics in slices.items():
            assert {"hr@10", "ndcg@10", "users", "pairs"} <= set(metrics), (variant, name)
            for m in metrics.values():
                assert set(m) >= {"mean", "std"} and len(m["values"]) == 2
    # one test item per user under ncf: the slices' users add up to all of them
    pop = results["results"]["pop"]
    assert sum(pop["slices"][n]["users"]["mean"] for n in SLICE_NAMES) == pytest.approx(
        pop["users"]["mean"])
    # the record's figure is the mean ± std of the per-seed fits
    head = pop["slices"]["head"]["ndcg@10"]
    values = [s["head"]["ndcg@10"] for s in per_seed]
    assert head["mean"] == pytest.approx(np.mean(values), abs=1e-9)
    assert head["std"] == pytest.approx(np.std(values), abs=1e-9)
    # popularity ranks head items well and the tail badly: a difference the slices must show
    assert pop["slices"]["head"]["hr@10"]["mean"] > pop["slices"]["tail"]["hr@10"]["mean"]
    assert "slices" not in aggregate(fits)   # only where asked for
    assert "slices" not in aggregate(fits)["pop"]

    written = write_report(results, tmp_path / "report")
    page = Path(written["report"]["html"]).read_text()
    assert "<h2>Metrics per slice</h2>" in page
    for variant in ("pop", "item_knn"):
        for name in SLICE_NAMES:
            m = results["results"][variant]["slices"][name]["ndcg@10"]
            assert re.search(rf"<td>{variant}</td><td>{name}</td><td>ndcg@10</td>"
                             rf"<td class='num'>{m['mean']:.4f} ± {m['std']:.4f}</td>", page)
    saved = json.loads(Path(written["report"]["json"]).read_text())
    assert saved["results"]["item_knn"]["slices"]["tail"]["ndcg@10"]["mean"] == pytest.approx(
        results["results"]["item_knn"]["slices"]["tail"]["ndcg@10"]["mean"])


def test_a_cached_fit_is_reused_only_with_the_same_slice_thresholds(tiny_demo, tmp_path):
    from bonmf_core.experiment.runner import run_fits

    cfg = load_config(use_default_file=False)
    split = make_split(tiny_demo, cfg.protocol, 0)
    first = run_fits(["pop"], tiny_demo, [split], cfg, {}, cache_root=tmp_path,
                     report=lambda _: None)[0]
    again = run_fits(["pop"], tiny_demo, [split], cfg, {}, cache_root=tmp_path,
                     report=lambda _: None)[0]
    assert again["reused"] and again["metrics"]["slices"] == first["metrics"]["slices"]
    # The thresholds are part of the fit's key: other thresholds are another fit, measured anew.
    other = load_config(sets=["protocol.tail_max_interactions=5"], use_default_file=False)
    changed = run_fits(["pop"], tiny_demo, [split], other, {}, cache_root=tmp_path,
                       report=lambda _: None)[0]
    assert not changed["reused"] and changed["key"] != first["key"]
    assert changed["slice_definition"]["tail_max_interactions"] == 5
    assert changed["spec"]["slices"]["tail_max_interactions"] == 5
    assert (tmp_path / first["key"] / "result.json").exists()


def test_quality_benchmark_has_slices_for_every_variant(tmp_path):
    out = tmp_path / "q.json"
    env = {**os.environ, "BONMF_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--data", "demo",
         "--protocol", "ncf", "--variants", "pop,item_knn", "--seeds", "0",
         "--set", "data.demo_users=300", "--set", "data.demo_items=150",
         "--set", "protocol.tail_max_interactions=30", "--out", str(out), "-q"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for variant in ("pop", "item_knn"):
        slices = data["results"][variant]["slices"]
        assert list(slices) == ["head", "torso", "tail"]
        assert all("ndcg@10" in slices[n] for n in SLICE_NAMES)
    # the second table: one row per variant, one NDCG@10 column per slice
    assert "ndcg@10 by item-popularity slice" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| variant | head"))
    assert re.fullmatch(r"\| variant \| head \(\d+ users\) \| torso \(\d+ users\) \| "
                        r"tail \(\d+ users\) \|", header)
    below = proc.stdout.split("ndcg@10 by item-popularity slice", 1)[1].splitlines()
    row = next(line for line in below if line.startswith("| item_knn |"))
    tail = data["results"]["item_knn"]["slices"]["tail"]["ndcg@10"]
    assert f"{tail['mean']:.4f} ± {tail['std']:.4f}" in row
