"""Runs whose process is gone: mark them failed in Dagster and record them in the store.

A run killed with SIGKILL (or by the OOM killer, or a lost machine) writes no failure event:
Dagster would show it STARTED forever and the store's `run_failures` would never hear of it.
Dagster's own run monitoring cannot help here: the default run launcher has no worker health
check, and `bonmf run` executes in-process with no launcher at all. Every run, however it was
started, logs an engine event carrying the pid of the process executing it ("Executing steps
in process (pid: N)", "Started process for run (pid: N)"); a run in progress whose first such
process no longer exists — or whose pid now belongs to a process started after the run — is
dead. The store (SQLite under the state folder by default) is local to one machine, so is the
process table checked; runs tagged with another host (`bonmf/host`) are left alone.

Called when `bonmf run` starts and by the `mark_dead_runs` sensor.
"""

from __future__ import annotations

import socket

import dagster as dg

HOST_TAG = "bonmf/host"
IN_PROGRESS = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# A process this much younger than its run cannot be the one that started it (pid reused).
PID_REUSE_SLACK_S = 2.0


def host_tags() -> dict[str, str]:
    """Tags a run started here carries, so another machine sharing the store never judges it."""
    return {HOST_TAG: socket.gethostname()}


def record_failed_run(store_resource, run, message: str,
                      instance: dg.DagsterInstance | None = None) -> tuple[dict, bool]:
    """Record a failed run in the store once (its failed steps from the event log when an
    instance is given) → (row, created)."""
    from bonmf_core.ops import registry

    failed_steps: list[str] = []
    if instance is not None:
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
        failed_steps = [r.event_log_entry.step_key for r in records if r.event_log_entry.step_key]
    with store_resource.open() as s:
        return registry.record_run_failure(s, run.run_id, job_name=run.job_name,
                                           message=message, failed_steps=failed_steps,
                                           tags=dict(run.tags))


def run_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the outermost process that executed the run (its first engine event that
    names one), or None when none was logged yet."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=50).records
    for record in records:
        data = record.event_log_entry.dagster_event.event_specific_data
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        if pid is not None:
            return int(pid.value)
    return None


def process_alive(pid: int, run_started: float) -> bool:
    """Whether `pid` is a live process old enough to be the run's own."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.create_time() <= run_started + PID_REUSE_SLACK_S
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True     # it exists; not ours to judge


def mark_dead_runs(instance: dg.DagsterInstance, store_resource) -> list[dict]:
    """Mark every in-progress run of this machine whose process is gone as failed (a
    RUN_FAILURE event, so the UI and the run-failure sensor see it) and record it in the store
    → one {run_id, job_name, pid, message} per run marked."""
    here = socket.gethostname()
    marked = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        if run.tags.get(HOST_TAG, here) != here:
            continue
        pid = run_pid(instance, run.run_id)
        started = record.start_time or record.create_timestamp.timestamp()
        if pid is None or process_alive(pid, started):
            continue
        message = (f"the process running it (pid {pid}) is gone: killed or crashed while the "
                   f"run was {run.status.value}; marked failed by bonmf")
        instance.report_run_failed(run, message)
        record_failed_run(store_resource, instance.get_run_by_id(run.run_id), message, instance)
        marked.append({"run_id": run.run_id, "job_name": run.job_name, "pid": pid,
                       "message": message})
    return marked
