"""What a validation run hands back: one outcome per check, each failure with rows to look at."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .thresholds import CheckThresholds

ERROR = "ERROR"
WARN = "WARN"
MAX_EXAMPLES = 5


@dataclass
class CheckOutcome:
    """One check (interactions, catalog, referential or drift) over the whole snapshot.

    failures: one dict per failed expectation: expectation, table, columns, description,
        unexpected_count, unexpected_percent (of the non-missing values), examples (up to 5
        offending rows as {"row": input row position, column: value, ...}), and where it
        applies observed_value, threshold or error.
    """

    name: str
    severity: str
    passed: bool
    description: str
    failures: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable({"name": self.name, "severity": self.severity, "passed": self.passed,
                         "description": self.description, "failures": self.failures,
                         "statistics": self.statistics})


@dataclass
class SnapshotValidation:
    """All outcomes of one `validate_snapshot` call.

    profile: `snapshot_profile` of the validated tables, to store as the next run's
        `previous_profile` once the snapshot is accepted (left out of `to_dict`: it holds every id).
    docs_index: path of the Data Docs index.html when a docs site was built.
    """

    checks: list[CheckOutcome]
    thresholds: CheckThresholds
    profile: dict
    docs_index: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when no ERROR check failed; failed WARN checks do not block."""
        return not self.blocking

    @property
    def blocking(self) -> list[CheckOutcome]:
        return [c for c in self.checks if c.severity == ERROR and not c.passed]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [c for c in self.checks if c.severity == WARN and not c.passed]

    def check(self, name: str) -> CheckOutcome:
        for outcome in self.checks:
            if outcome.name == name:
                return outcome
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict:
        return {"passed": self.passed,
                "blocking": [c.name for c in self.blocking],
                "warnings": [c.name for c in self.warnings],
                "checks": [c.to_dict() for c in self.checks],
                "thresholds": self.thresholds.to_dict(),
                "docs_index": self.docs_index,
                "seconds": round(self.seconds, 3)}


def failure(expectation: str, table: str, columns: list[str], description: str, *,
            unexpected_count: int | None = None, unexpected_percent: float | None = None,
            examples: list[dict] | None = None, **extra) -> dict:
    return {"expectation": expectation, "table": table, "columns": columns,
            "description": description, "unexpected_count": unexpected_count,
            "unexpected_percent": unexpected_percent, "examples": examples or [], **extra}


def missing_column(table: str, column: str, why: str) -> dict:
    return failure("expect_column_to_exist", table, [column],
                   f"{table} has no '{column}' column: {why}")


def examples_at(frame: pd.DataFrame, index_list: list) -> list[dict]:
    """The first offending rows of `frame` as dicts, the row label first.

    GX lists offending rows by index label, or, when the index is named, as dicts holding the
    label under that name; both are accepted.
    """
    key = frame.index.name or "row"
    labels = [item[key] if isinstance(item, dict) else item for item in index_list[:MAX_EXAMPLES]]
    rows = frame.loc[labels]
    return [jsonable({key: label, **row}) for label, row in zip(rows.index, rows.to_dict("records"))]


def jsonable(value):
    """numpy/pandas scalars, NaN and timestamps turned into what json.dumps writes as-is."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, (dt.datetime, dt.date, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, str):
        return value
    return str(value)
