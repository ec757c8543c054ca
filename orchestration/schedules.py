"""Periodic retraining (cron from params.yaml `retrain.cron`, default weekly)."""


import dagster as dg

from .config import DEFAULTS, run_config_from_params
from .jobs import retrain_job
from .resources import ParamsResource


def build_schedule(cron: str = DEFAULTS["retrain"]["cron"],
                   timezone: str = DEFAULTS["retrain"]["timezone"]) -> dg.ScheduleDefinition:
    @dg.schedule(name="periodic_retrain", cron_schedule=cron, execution_timezone=timezone,
                 job=retrain_job, default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Retrain on the configured source ({cron}, {timezone}).")
    def periodic_retrain(context: dg.ScheduleEvaluationContext, params: ParamsResource):
        when = context.scheduled_execution_time
        stamp = when.strftime("%Y-%m-%dT%H:%M") if when else "manual"
        return dg.RunRequest(run_key=f"scheduled-{stamp}",
                             run_config=run_config_from_params(params.load()),
                             tags={"bonmf/trigger": "schedule", "bonmf/scheduled_for": stamp})

    return periodic_retrain


periodic_retrain = build_schedule()
