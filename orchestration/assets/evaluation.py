"""Offline evaluation: candidate, ablation and baselines in one report (table, JSON, chart)."""


import base64

import dagster as dg

from ..resources import ParamsResource, StateResource


@dg.asset(group_name="evaluation", kinds={"markdown"},
          description="Offline evaluation on the held-out test sets: every BoNMF variant "
                      "(the ablation) and every baseline, mean ± std over seeds, as a markdown "
                      "table, metrics.json and a chart with error bars.")
def offline_evaluation(context: dg.AssetExecutionContext, bonmf_candidate: dict,
                       baselines: dict, splits: dict, validated_dataset: dict,
                       params: ParamsResource, state: StateResource) -> dg.MaterializeResult:
    from bonmf_core.experiment.report import training_curve, write_report
    from bonmf_core.experiment.runner import results_record

    data = validated_dataset
    results = results_record(
        params.load(), [s.describe() for s in splits["splits"]],
        {"name": data["name"], "content_hash": data["dataset_hash"],
         **{k: data[k] for k in ("users", "items", "interactions")}},
        {**baselines["results"], **bonmf_candidate["results"]},
        {"variant": bonmf_candidate["variant"], "model_version": bonmf_candidate["version_id"]})
    chosen = next(f for f in bonmf_candidate["fits"]
                  if f["variant"] == bonmf_candidate["variant"])
    written = write_report(results, state.path / "reports" / data["dataset_hash"],
                           training_curve(chosen, bonmf_candidate["metric"]))
    table, report = written["table"], written["report"]
    with open(report["plot"], "rb") as f:
        png = base64.b64encode(f.read()).decode()
    candidate = bonmf_candidate["results"][bonmf_candidate["variant"]]
    return dg.MaterializeResult(
        value={"results": results, "table": table, "report": report},
        metadata={"table": dg.MetadataValue.md(table),
                  "plot": dg.MetadataValue.md(f"![metrics](data:image/png;base64,{png})"),
                  "metrics_json": dg.MetadataValue.path(report["json"]),
                  "candidate": bonmf_candidate["variant"],
                  **{f"candidate {k}": dg.MetadataValue.float(float(v["mean"]))
                     for k, v in candidate.items() if "@" in k}})
