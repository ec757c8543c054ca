"""Sensors: new data on the source launches a retrain; failed runs are recorded in the store."""


import dagster as dg

from bonmf_core.ops import registry
from bonmf_core.data.snapshot import source_fingerprint

from bonmf_core.config import load_config

from .jobs import retrain_job
from .resources import ParamsResource, StoreResource


@dg.sensor(job=retrain_job, minimum_interval_seconds=load_config().retrain.sensor_interval_s,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Fingerprints the configured source (file bytes, poster names and "
                       "sizes; the demo's arguments) and requests a retrain whose run key is "
                       "that fingerprint: the same data never trains twice.")
def new_data_sensor(context: dg.SensorEvaluationContext, params: ParamsResource):
    data = params.load().data
    fingerprint = source_fingerprint(data.source, data.demo_seed, data.demo_users,
                                     data.demo_items)
    if context.cursor == fingerprint:
        return dg.SkipReason(f"source {data.source} unchanged ({fingerprint})")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint,
                         tags={"bonmf/trigger": "new_data", "bonmf/source_fingerprint": fingerprint})


def record_failed_run(store_resource: StoreResource, run, message: str,
                      instance: dg.DagsterInstance | None = None) -> tuple[dict, bool]:
    """Record a failed run (its failed steps from the event log when an instance is given)."""
    failed_steps: list[str] = []
    if instance is not None:
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
        failed_steps = [r.event_log_entry.step_key for r in records if r.event_log_entry.step_key]
    with store_resource.open() as s:
        return registry.record_run_failure(s, run.run_id, job_name=run.job_name,
                                           message=message, failed_steps=failed_steps,
                                           tags=dict(run.tags))


@dg.run_failure_sensor(name="record_run_failures", default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Writes every failed run of this code location (job, "
                                   "failed steps, message) to the store's run_failures table.")
def record_run_failures(context: dg.RunFailureSensorContext, store: StoreResource):
    row, created = record_failed_run(store, context.dagster_run, context.failure_event.message or
                                     "run failed", context.instance)
    context.log.info(f"run {row['run_id']} failure {'recorded' if created else 'already known'}")
