"""Periodic retraining (cron from the configuration's `retrain` section, default weekly)."""


import dagster as dg

from bonmf_core.config import load_config

from .jobs import retrain_job


def build_schedule(cron: str, timezone: str) -> dg.ScheduleDefinition:
    @dg.schedule(name="periodic_retrain", cron_schedule=cron, execution_timezone=timezone,
                 job=retrain_job, default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Retrain on the configured source ({cron}, {timezone}).")
    def periodic_retrain(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time
        stamp = when.strftime("%Y-%m-%dT%H:%M") if when else "manual"
        return dg.RunRequest(run_key=f"scheduled-{stamp}",
                             tags={"bonmf/trigger": "schedule", "bonmf/scheduled_for": stamp})

    return periodic_retrain


_RETRAIN = load_config().retrain   # read when the definitions load
periodic_retrain = build_schedule(_RETRAIN.cron, _RETRAIN.timezone)
