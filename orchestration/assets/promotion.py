"""Promotion: the gate decision, recorded in the registry; the production copy on promotion."""


from pathlib import Path

import dagster as dg

from bonmf_core.experiment.report import add_gate
from bonmf_core.ops import registry
from bonmf_core.ops.promotion import decide

from ..resources import ParamsResource, StateResource, StoreResource


class ForcePromotion(dg.Config):
    """A person's override of the gate for this run (not a hyper-parameter: the gate's rules
    are the configuration's `promotion` section)."""

    force: bool = False
    forced_by: str | None = None


@dg.asset(group_name="promotion", kinds={"sqlite"},
          description="The promotion gate: the candidate must pass the absolute floors, beat "
                      "the baselines and beat the production model by the configured margin. "
                      "Promotion copies the artifact atomically to <state>/production/model; a "
                      "hold records why. Re-running with the same candidate adds nothing.")
def promotion_decision(context: dg.AssetExecutionContext, config: ForcePromotion,
                       bonmf_candidate: dict, baselines: dict, offline_evaluation: dict,
                       params: ParamsResource, state: StateResource,
                       store: StoreResource) -> dg.MaterializeResult:
    gate = params.load().promotion
    baseline_means = {v: {k: m["mean"] for k, m in r.items() if k != "slices"}
                      for v, r in baselines["results"].items()}
    with store.open() as s:
        production = registry.production_model(s)
        candidate_id = bonmf_candidate["version_id"]
        if production is not None and production["id"] == candidate_id:
            event, created = registry.record_decision(
                s, candidate_id, decision="promote", reason="already in production",
                compared={}, production_id=production["id"])
            decision = event["decision"]
            reason = f"candidate v{candidate_id} is already the production model"
            compared = event["compared"] or {}
        else:
            d = decide(bonmf_candidate["metrics"],
                       production["metrics"]["mean"] if production else None, gate,
                       baseline_means, force=config.force, forced_by=config.forced_by)
            compared = {**d.compared, "production_version": production and production["id"],
                        "same_dataset": bool(production) and
                        production["dataset_hash"] == bonmf_candidate["dataset_hash"]}
            event, created = registry.record_decision(
                s, candidate_id, decision=d.decision, reason=d.reason, compared=compared,
                production_id=production and production["id"],
                forced_by=config.forced_by if config.force else None, run_id=context.run.run_id,
                production_dir=state.production_dir if d.promoted else None)
            decision, reason = d.decision, d.reason
        now = registry.production_model(s)
    context.log.info(f"gate: {decision} — {reason}")
    value = {"decision": decision, "reason": reason, "candidate_version": candidate_id,
             "production_version": now and now["id"], "event_id": event["id"],
             "new_event": created, "production_path": str(state.production_dir)
             if now else None, "compared": compared}
    report = add_gate(Path(offline_evaluation["report"]["html"]).parent, value)
    return dg.MaterializeResult(value=value, metadata={
        "decision": decision, "reason": reason, "candidate_version": candidate_id,
        **({"production_version": now["id"]} if now else {}),
        "promoted": decision in ("promote", "forced"),
        "promotion_event": event["id"], "new_event": created,
        **_figures(compared),
        "production_path": dg.MetadataValue.path(str(state.production_dir)),
        "report": dg.MetadataValue.path(str(report)),
        "compared": dg.MetadataValue.json(compared)})


def _figures(compared: dict) -> dict:
    """The gate's numbers as floats (absent when not compared, never a placeholder string:
    the UI plots a key across runs only when it always has one type)."""
    metric = compared.get("primary_metric")
    figures = {"candidate_primary": (compared.get("candidate") or {}).get(metric),
               "production_primary": (compared.get("production") or {}).get(metric),
               "improvement": compared.get("improvement"),
               "best_baseline_primary": max((compared.get("baselines") or {}).values(),
                                            default=None)}
    return {k: dg.MetadataValue.float(float(v)) for k, v in figures.items() if v is not None}
