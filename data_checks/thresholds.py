"""The numbers the checks compare against, in one place so a params file can override them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

# 1995-01-01T00:00:00Z: older than any MovieLens rating, so an earlier stamp is a unit or
# parsing mistake (milliseconds, days, a zero default), not an old interaction.
TIMESTAMP_1995 = 788_918_400

_SHARES = ("text_coverage_min", "readable_image_min", "max_new_item_share", "max_new_user_share")


@dataclass(frozen=True)
class CheckThresholds:
    """Limits for the snapshot checks; `from_dict` builds one from a params file section.

    rating_scale: (low, high) every rating must lie in; None checks only that ratings are numbers.
    min_interactions_per_user: fewest interactions any user in the interactions may have.
    timestamp_min / timestamp_max_slack_days: plausible timestamps lie in
        [timestamp_min, now + slack] (seconds since the epoch; slack absorbs clock skew).
    text_coverage_min: share of items that must have some non-empty free text.
    readable_image_min: share of items whose image must decode (when the catalog has images).
    max_rating_mean_shift, max_new_item_share, max_new_user_share, max_volume_change: drift
        limits against the previous accepted snapshot; volume change is |n_now / n_prev - 1|.
    """

    rating_scale: tuple[float, float] | None = None
    min_interactions_per_user: int = 1
    timestamp_min: int = TIMESTAMP_1995
    timestamp_max_slack_days: float = 1.0
    text_coverage_min: float = 0.5
    readable_image_min: float = 0.9
    max_rating_mean_shift: float = 0.25
    max_new_item_share: float = 0.2
    max_new_user_share: float = 0.2
    max_volume_change: float = 0.5

    def __post_init__(self) -> None:
        if self.rating_scale is not None:
            # YAML and JSON give lists; a tuple keeps the dataclass hashable and comparable.
            scale = tuple(float(v) for v in self.rating_scale)
            if len(scale) != 2 or not scale[0] < scale[1]:
                raise ValueError(f"rating_scale must be (low, high) with low < high, "
                                 f"got {self.rating_scale!r}")
            object.__setattr__(self, "rating_scale", scale)
        if int(self.min_interactions_per_user) != self.min_interactions_per_user \
                or self.min_interactions_per_user < 0:
            raise ValueError("min_interactions_per_user must be a non-negative integer, "
                             f"got {self.min_interactions_per_user!r}")
        for name in _SHARES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a share in [0, 1], got {value!r}")
        for name in ("timestamp_max_slack_days", "max_rating_mean_shift", "max_volume_change"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping) -> CheckThresholds:
        """Thresholds from a plain mapping; a misspelt key is refused rather than ignored."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ValueError(f"unknown threshold(s): {', '.join(unknown)}; "
                             f"known thresholds: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.rating_scale is not None:
            values["rating_scale"] = list(self.rating_scale)
        return values
