"""The benchmark scripts run end to end on the demo data and write the documented JSON keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path):
    env = {**os.environ, "BONMF_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_quality_json_shape(tmp_path):
    out = tmp_path / "q.json"
    _run("quality.py", "--data", "demo", "--protocol", "cold_items",
         "--variants", "pop,genre_pop,content_knn,text", "--seeds", "0,1",
         "--set", "train.epochs=1", "--set", "train.refit=false",
         "--set", 'encoders.source="basic"', "--out", str(out), "-q", tmp_path=tmp_path)
    data = json.loads(out.read_text())
    assert data["protocol"] == "cold_items" and data["seeds"] == [0, 1]
    assert data["dataset"] == "demo-seed0" and data["seconds"] > 0
    assert data["features"]["text"]["source"] == "hashed_bag_of_words"
    assert data["results"]["content_knn"]["ndcg@10"]["mean"] > 0.1  # cold items, from content
    for variant in ("pop", "genre_pop", "content_knn", "text"):
        for metric in ("hr@10", "ndcg@10", "recall@10"):
            assert set(data["results"][variant][metric]) >= {"mean", "std"}
    assert data["features"]["text"]["source"] == "hashed_bag_of_words"


def test_fold_in_prior_grid_on_validation_users(tmp_path):
    """`--priors` adds the MAP fold-in at each weight; the head's own weight (dot: 1) is the
    default one, so its row equals `map_newton`'s, and another weight answers differently."""
    out = tmp_path / "f.json"
    _run("fold_in.py", "--data", "demo", "--given", "3", "--split", "valid", "--priors", "1,30",
         "--n", "3", "--set", "train.epochs=2", "--set", "train.lr=0.01", "--out", str(out),
         tmp_path=tmp_path)
    data = json.loads(out.read_text())
    assert data["users"] == "valid" and data["head"] == "dot"
    row = data["quality"]["given3"]
    assert set(row) >= {"map_newton", "map_prior1", "map_prior30", "reference_adam60",
                        "start_only"}
    assert row["map_prior1"] == row["map_newton"]
    assert row["map_prior30"] != row["map_newton"]
    assert data["latency_10_liked"]["map_newton"]["p50_ms"] > 0


def test_train_throughput_json_shape(tmp_path):
    out = tmp_path / "t.json"
    _run("train_throughput.py", "--data", "demo", "--variants", "id,text+image", "--epochs",
         "2", "--reference", "--set", 'encoders.source="basic"', "--out", str(out),
         tmp_path=tmp_path)
    data = json.loads(out.read_text())
    for variant in ("id", "text+image"):
        run = data["variants"][variant]
        assert run["samples_per_s"] > 0 and run["epoch_s"] > 0 and run["peak_rss_mb"] > 0
        assert len(run["epoch_s_each"]) == 2 and min(run["epoch_s_each"]) <= run["epoch_s"]
    assert data["epoch_cost_vs_id"]["id"] == 1.0 and data["epoch_cost_vs_id"]["text+image"] > 0
    assert data["reference"]["samples_per_s"] > 0 and data["id_speed_vs_reference"] > 0
    assert data["features"]["text"]["source"] == "hashed_bag_of_words"


def test_eval_speed_json_shape(tmp_path):
    out = tmp_path / "e.json"
    _run("eval_speed.py", "--data", "demo", "--out", str(out), tmp_path=tmp_path)
    data = json.loads(out.read_text())
    assert data["users"] == 3000 and data["items"] == 1000
    assert all(data[k] > 0 for k in ("ncf_evaluate_s", "full_evaluate_s", "sampled_metrics_s"))


def test_encode_catalog_json_shape(tmp_path):
    out = tmp_path / "e.json"
    proc = _run("encode_catalog.py", "--data", "demo", "--check-fp32", "16", "--out", str(out),
                tmp_path=tmp_path)
    data = json.loads(out.read_text())
    for key in ("text_items_per_s", "image_items_per_s", "text_s", "image_s", "cached_rerun_s"):
        assert data[key] > 0, key
    import torch   # the encoders pick the GPU where there is one (encoders.device: auto)

    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert data["items"] == 1000
    assert data["manifests"]["text"]["encoded_now"] == 1000
    assert data["cached_rerun_s"] < data["text_s"] + data["image_s"]
    assert data["cosine_to_fp32"]["text"]["min"] >= 0.99
    assert data["cosine_to_fp32"]["image"]["min"] >= 0.99
    assert "cached_rerun_s" in proc.stdout


def test_retrieval_json_shape(tmp_path):
    out = tmp_path / "r.json"
    _run("retrieval.py", "--items", "5000", "--queries", "20", "--epochs", "1",
         "--out", str(out),
         tmp_path=tmp_path)
    data = json.loads(out.read_text())
    assert data["items"] == 5000 and data["queries"] == 20
    assert data["retrieval"]["index"] == "faiss IVF-SQ8" and data["retrieval"]["lists"] > 1
    for api in ("recommend", "similar_items"):
        assert 0.9 <= data[api]["recall@10"] <= 1.0, (api, data[api])
        for path in ("two_stage", "exact"):
            assert 0 < data[api][path]["p50_ms"] <= data[api][path]["p99_ms"]
    assert data["recommend"]["seen_items_returned"] == 0
    assert data["peak_rss_mb"] > 0 and data["retrieval"]["build_s"] >= 0
