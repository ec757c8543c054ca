"""Offline evaluation: candidate, ablation and baselines in one report (table, JSON, plot)."""


import base64

import dagster as dg

from bonmf_core import stages

from ..resources import StateResource


@dg.asset(group_name="evaluation", kinds={"markdown"},
          description="Offline evaluation on the held-out test sets: every BoNMF variant "
                      "(the ablation) and every baseline, mean ± std over seeds, as a markdown "
                      "table, metrics.json and a bar chart.")
def offline_evaluation(context: dg.AssetExecutionContext, bonmf_candidate: dict,
                       baselines: dict, splits: dict, validated_dataset: dict,
                       state: StateResource) -> dg.MaterializeResult:
    proto = splits["protocol"]
    results = stages.evaluation_results(
        proto, [s.describe() for s in splits["splits"]], validated_dataset,
        {"variant": bonmf_candidate["variant"], "model_version": bonmf_candidate["version_id"]},
        {**baselines["results"], **bonmf_candidate["results"]})
    chosen = next(f for f in bonmf_candidate["fits"]
                  if f["variant"] == bonmf_candidate["variant"])
    written = stages.evaluate(results, state.path / "reports" / validated_dataset["dataset_hash"],
                              stages.training_curve(chosen, bonmf_candidate["metric"]))
    table, report = written["table"], written["report"]
    with open(report["plot"], "rb") as f:
        png = base64.b64encode(f.read()).decode()
    return dg.MaterializeResult(
        value={"results": results, "table": table, "report": report},
        metadata={"table": dg.MetadataValue.md(table),
                  "plot": dg.MetadataValue.md(f"![metrics](data:image/png;base64,{png})"),
                  "metrics_json": dg.MetadataValue.path(report["json"]),
                  "candidate": bonmf_candidate["variant"]})
