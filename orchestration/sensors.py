"""Sensors: new data on the source launches a retrain; failed runs are recorded in the store;
runs whose process died without a word are marked failed (`run_health`)."""


import dagster as dg

from bonmf_core.data.snapshot import source_fingerprint

from bonmf_core.config import load_config

from .jobs import retrain_job
from .resources import ParamsResource, StoreResource
from .run_health import mark_dead_runs, record_failed_run


@dg.sensor(job=retrain_job, minimum_interval_seconds=load_config().retrain.sensor_interval_s,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Fingerprints the configured source, any format (file bytes, image names and "
                       "sizes; the demo's arguments) and requests a retrain whose run key is "
                       "that fingerprint: the same data never trains twice.")
def new_data_sensor(context: dg.SensorEvaluationContext, params: ParamsResource):
    data = params.load().data
    fingerprint = source_fingerprint(data)
    if context.cursor == fingerprint:
        return dg.SkipReason(f"source {data.source} unchanged ({fingerprint})")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint,
                         tags={"bonmf/trigger": "new_data", "bonmf/source_fingerprint": fingerprint})


@dg.run_failure_sensor(name="record_run_failures", default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Writes every failed run of this code location (job, "
                                   "failed steps, message) to the store's run_failures table.")
def record_run_failures(context: dg.RunFailureSensorContext, store: StoreResource):
    row, created = record_failed_run(store, context.dagster_run, context.failure_event.message or
                                     "run failed", context.instance)
    context.log.info(f"run {row['run_id']} failure {'recorded' if created else 'already known'}")


@dg.sensor(name="mark_dead_runs", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks failed every in-progress run whose process is gone (killed with "
                       "SIGKILL, crashed, OOM): a RUN_FAILURE event in Dagster and a row in "
                       "the store's run_failures table.")
def mark_dead_runs_sensor(context: dg.SensorEvaluationContext, store: StoreResource):
    marked = mark_dead_runs(context.instance, store)
    if not marked:
        return dg.SkipReason("no run in progress has lost its process")
    for run in marked:
        context.log.info(f"run {run['run_id']} marked failed: {run['message']}")
    return dg.SkipReason(f"marked {len(marked)} dead run(s) failed: "
                         f"{', '.join(r['run_id'] for r in marked)}")
