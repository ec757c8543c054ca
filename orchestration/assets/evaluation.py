"""Offline evaluation: candidate, ablation and baselines in one report (table, JSON, plot)."""


import base64

import dagster as dg

from ..resources import StateResource


@dg.asset(group_name="evaluation", kinds={"markdown"},
          description="Offline evaluation on the held-out test sets: every BoNMF variant "
                      "(the ablation) and every baseline, mean ± std over seeds, as a markdown "
                      "table, metrics.json and a bar chart.")
def offline_evaluation(context: dg.AssetExecutionContext, bonmf_candidate: dict,
                       baselines: dict, splits: dict, validated_dataset: dict,
                       state: StateResource) -> dg.MaterializeResult:
    from bonmf_core.experiment import format_table
    from bonmf_core.pipeline import write_report

    proto = splits["protocol"]
    results = {
        "protocol": proto["name"], "dataset": validated_dataset["name"],
        "ks": list(proto["ks"]), "seeds": list(proto["seeds"]),
        "protocol_details": {"splits": [s.describe() for s in splits["splits"]]},
        "dataset_details": {"content_hash": validated_dataset["dataset_hash"],
                            **{k: validated_dataset[k] for k in ("users", "items",
                                                                  "interactions")}},
        "candidate": {"variant": bonmf_candidate["variant"],
                      "model_version": bonmf_candidate["version_id"]},
        "results": {**baselines["results"], **bonmf_candidate["results"]},
    }
    table = format_table(results)
    k = proto["ks"][0]
    report = write_report(state.path / "reports" / validated_dataset["dataset_hash"], results,
                          table, [f"hr@{k}", f"ndcg@{k}"], highlight=bonmf_candidate["variant"])
    with open(report["plot"], "rb") as f:
        png = base64.b64encode(f.read()).decode()
    return dg.MaterializeResult(
        value={"results": results, "table": table, "report": report},
        metadata={"table": dg.MetadataValue.md(table),
                  "plot": dg.MetadataValue.md(f"![metrics](data:image/png;base64,{png})"),
                  "metrics_json": dg.MetadataValue.path(report["json"]),
                  "candidate": bonmf_candidate["variant"]})
