"""The main job, shared by the CLI and later by orchestration: data → train → evaluate → save."""

from __future__ import annotations

from pathlib import Path

from .artifacts import save_model
from .atomic import atomic_file, write_json
from .experiment import BASELINES, format_table, load_dataset, run_protocol
from .model import BoNMF


def train_and_evaluate(params: dict, variants: str | list[str], out: str | Path) -> dict:
    """Run the configured protocol over `variants`; save metrics and the best BoNMF model.

    Writes `out/model/` (the best BoNMF variant by the primary metric, first seed),
    `out/metrics.json` and `out/metrics.md`. Each is written atomically, and nothing is written
    before training and evaluation have succeeded; the three are not one transaction.
    """
    out = Path(out)
    dataset = load_dataset(params["data"]["source"], params["data"]["demo_seed"])
    results = run_protocol(dataset, params, variants, keep_models=True)
    models = results.pop("_models")

    primary = params["train"]["metric"]
    bonmf_variants = [v for v in results["results"] if v not in BASELINES]
    summary = {"table": format_table(results), "best_variant": None, "model_path": None}
    if bonmf_variants:
        best = max(bonmf_variants, key=lambda v: results["results"][v][primary]["mean"])
        seed = results["seeds"][0]
        model, train_result, split = models[(best, seed)]
        assert isinstance(model, BoNMF)
        save_model(out / "model", model, user_ids=dataset.user_ids, item_ids=dataset.item_ids,
                   metadata={"variant": best, "seed": seed, "train": params["train"],
                             "dataset": {"name": results["dataset"],
                                         **results["dataset_details"]},
                             "protocol": {"name": results["protocol"], "ks": results["ks"],
                                          "seeds": results["seeds"]},
                             "metrics": {k: v["values"][0] for k, v in
                                         results["results"][best].items()},
                             "best_epoch": train_result.best_epoch})
        summary.update(best_variant=best, model_path=str(out / "model"))
    write_json(out / "metrics.json", results)
    with atomic_file(out / "metrics.md") as tmp:
        tmp.write_text(summary["table"] + "\n")
    summary["metrics_path"] = str(out / "metrics.json")
    summary["results"] = results
    return summary
