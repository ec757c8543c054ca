"""`bonmf run`'s live progress: one line per finished step, from Dagster's own event stream.

Everything else (asset logs, metadata, check results) stays in the run's event log, where the
UI shows it; the console gets a line a step and then the summary.
"""

from __future__ import annotations

import logging
import sys

import dagster as dg


class StepLineHandler(logging.Handler):
    """Prints `  done  <step>  <seconds>` as each step succeeds (or `FAILED`)."""

    def emit(self, record: logging.LogRecord) -> None:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        if event is None:
            return
        if event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000.0
            line = f"  done    {event.step_key:<24} {seconds:7.1f} s"
        elif event.event_type == dg.DagsterEventType.STEP_FAILURE:
            line = f"  FAILED  {event.step_key}"
        else:
            return
        print(line, file=sys.stdout, flush=True)


@dg.logger(description="One line per finished step on stdout (bonmf run's progress).")
def step_progress_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("bonmf.progress", level=logging.DEBUG)  # step events are DEBUG
    logger.addHandler(StepLineHandler())
    return logger
