"""The numbers the checks compare against: the `checks` section of the one configuration.

Their defaults, types and ranges live in `bonmf_core.config.ChecksConfig`; this frozen view
of it is what the checks take (hashable, comparable, refuses unknown keys by name).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ConfigDict, ValidationError

from bonmf_core.config import ChecksConfig


class CheckThresholds(ChecksConfig):
    """Limits for the snapshot checks (see `ChecksConfig` for each one's meaning).

    rating_scale: (low, high) every rating must lie in; None checks only that ratings are
    numbers. Drift limits compare against the previous accepted snapshot; volume change is
    |n_now / n_prev - 1|.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_dict(cls, values: Mapping) -> CheckThresholds:
        """Thresholds from a plain mapping; a misspelt key is refused rather than ignored."""
        try:
            return cls(**dict(values))
        except ValidationError as exc:
            raise ValueError("; ".join(_describe(e, cls.model_fields)
                                       for e in exc.errors())) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _describe(error: dict, known) -> str:
    key = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"unknown threshold {key!r}; known thresholds: {', '.join(known)}"
    return f"{key}: {error['msg']}"
