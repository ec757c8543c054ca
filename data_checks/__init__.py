"""Checks a raw dataset snapshot must pass before training (Great Expectations + pandas).

    from data_checks import validate_snapshot, CheckThresholds
    result = validate_snapshot(interactions, items, users, CheckThresholds(rating_scale=(1, 5)))
    result.passed, result.blocking, result.to_dict()

Importing this package does not import Great Expectations (seconds); a validation does.
"""

from __future__ import annotations

from .drift import snapshot_profile
from .results import CheckOutcome, SnapshotValidation
from .runner import validate_snapshot
from .thresholds import CheckThresholds

__all__ = ["CheckOutcome", "CheckThresholds", "SnapshotValidation", "snapshot_profile",
           "validate_snapshot"]
