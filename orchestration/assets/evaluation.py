"""Offline evaluation: candidate, ablation and baselines in one report (HTML page, JSON,
table, charts)."""


import base64

import dagster as dg

from bonmf_core.ops import registry

from ..resources import ParamsResource, StateResource, StoreResource


@dg.asset(group_name="evaluation", kinds={"html"},
          description="Offline evaluation on the held-out test sets: every BoNMF variant "
                      "(the ablation) and every baseline, mean ± std over seeds — report.html "
                      "(metrics with error bars, training curves, data checks; the gate's "
                      "decision is added by promotion_decision), report.json, metrics.json, "
                      "a markdown table and the charts.")
def offline_evaluation(context: dg.AssetExecutionContext, bonmf_candidate: dict,
                       baselines: dict, splits: dict, validated_dataset: dict,
                       params: ParamsResource, state: StateResource,
                       store: StoreResource) -> dg.MaterializeResult:
    from bonmf_core.experiment.report import training_curve, write_report
    from bonmf_core.experiment.runner import results_record

    data = validated_dataset
    results = results_record(
        params.load(), [s.describe() for s in splits["splits"]],
        {"name": data["name"], "content_hash": data["dataset_hash"],
         **{k: data[k] for k in ("users", "items", "interactions")}},
        {**baselines["results"], **bonmf_candidate["results"]},
        {"variant": bonmf_candidate["variant"], "model_version": bonmf_candidate["version_id"]})
    metric = bonmf_candidate["metric"]
    chosen = next(f for f in bonmf_candidate["fits"]
                  if f["variant"] == bonmf_candidate["variant"])
    with store.open() as s:
        snapshot = registry.get_snapshot(s, data["snapshot_hash"]) or {}
    written = write_report(results, state.path / "reports" / data["dataset_hash"],
                           training_curve(chosen, metric), curves=_curves(
                               [*bonmf_candidate["fits"], *baselines["fits"]], metric),
                           checks=(snapshot.get("validation") or {}).get("checks"),
                           run_id=context.run.run_id)
    table, report = written["table"], written["report"]
    context.log.info(f"report: {report['html']}")
    return dg.MaterializeResult(
        value={"results": results, "table": table, "report": report},
        metadata={"report": dg.MetadataValue.path(report["html"]),
                  "results_table": metrics_table(results),
                  "table": dg.MetadataValue.md(table),
                  "plot": dg.MetadataValue.md(_inline_png(report["plot"], "metrics")),
                  "training_curves": dg.MetadataValue.md(
                      _inline_png(report["curves_plot"], "training curves")),
                  "metrics_json": dg.MetadataValue.path(report["json"]),
                  "candidate": bonmf_candidate["variant"],
                  "variants": len(results["results"]), "seeds": len(results["seeds"]),
                  **{f"candidate {k}": dg.MetadataValue.float(float(v["mean"]))
                     for k, v in bonmf_candidate["results"][bonmf_candidate["variant"]].items()
                     if "@" in k},
                  **_means(results)})


def _curves(fits: list[dict], metric: str) -> dict[str, list[dict]]:
    """Every fit that trained epoch by epoch, named variant and seed."""
    from bonmf_core.experiment.report import training_curve

    return {f"{f['variant']} seed {f['seed']}": training_curve(f, metric)
            for f in fits if f.get("history")}


def _means(results: dict) -> dict:
    """`<variant> <metric>` → float mean: what the UI plots across runs."""
    return {f"{variant} {name}": dg.MetadataValue.float(float(m["mean"]))
            for variant, r in results["results"].items() for name, m in r.items() if "@" in name}


def metrics_table(results: dict) -> dg.MetadataValue:
    """The evaluation as a typed table: one row per variant, mean and std per metric."""
    names = sorted({n for r in results["results"].values() for n in r if "@" in n})
    columns = [dg.TableColumn("variant", "string")] + [
        dg.TableColumn(f"{n} {stat}", "float") for n in names for stat in ("mean", "std")]
    rows = [dg.TableRecord({"variant": variant, **{
        f"{n} {stat}": float(r[n][stat]) for n in names if n in r for stat in ("mean", "std")}})
        for variant, r in results["results"].items()]
    return dg.MetadataValue.table(rows, schema=dg.TableSchema(columns))


def _inline_png(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        return f"![{alt}](data:image/png;base64,{base64.b64encode(f.read()).decode()})"
