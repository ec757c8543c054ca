"""Drift against the previous accepted snapshot, from a small JSON-serializable profile of it.

Storing the profile rather than the previous tables keeps the comparison cheap: ratings as a
histogram and mean, ids as sorted lists (tens of kilobytes for MovieLens-1M), the row count.
Drift is a warning: data moves for good reasons, and a person decides whether it did here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .frames import as_text
from .results import WARN, CheckOutcome, failure, jsonable
from .thresholds import CheckThresholds

PROFILE_VERSION = 1
_PROFILE_KEYS = ("profile_version", "n_interactions", "rating_mean", "rating_histogram",
                 "user_ids", "item_ids")
_EXAMPLE_IDS = 5


def snapshot_profile(interactions: pd.DataFrame, items: pd.DataFrame,
                     users: pd.DataFrame | None = None) -> dict:
    """Rating histogram and mean, user ids (from the interactions), catalog item ids, volume.

    Tolerates broken tables (a missing column leaves its part None): the profile of a snapshot
    under validation is compared before anyone knows whether it is valid.
    """
    ratings = _ratings(interactions)
    profile = {
        "profile_version": PROFILE_VERSION,
        "n_interactions": len(interactions),
        "rating_mean": float(ratings.mean()) if len(ratings) else None,
        "rating_histogram": _histogram(ratings) if len(ratings) else None,
        "user_ids": _sorted_ids(interactions, "user_id"),
        "item_ids": _sorted_ids(items, "item_id"),
    }
    if users is not None:
        profile["n_user_records"] = len(users)
    return jsonable(profile)


def _ratings(interactions: pd.DataFrame) -> pd.Series:
    if "rating" not in interactions.columns:
        return pd.Series([], dtype=float)
    return pd.to_numeric(interactions["rating"].astype(object), errors="coerce").dropna()


def _histogram(ratings: pd.Series) -> dict[str, float]:
    """Share of ratings per half-unit bin, keyed by the bin's value ("4.0", "4.5")."""
    bins = (np.round(ratings.to_numpy(dtype=float) * 2) / 2).astype(float)
    values, counts = np.unique(bins, return_counts=True)
    return {f"{v:.1f}": float(c / len(bins)) for v, c in zip(values, counts)}


def _sorted_ids(table: pd.DataFrame, column: str) -> list[str] | None:
    if column not in table.columns:
        return None
    return sorted(set(as_text(table[column]).dropna()))


def drift_check(current: dict, previous: dict | None, thresholds: CheckThresholds) -> CheckOutcome:
    """Rating mean shift, new item/user shares and volume change against the limits (WARN)."""
    if previous is None:
        return CheckOutcome("drift", WARN, True, "no previous profile: drift not evaluated",
                            statistics={"evaluated": False})
    _check_profile(previous)
    stats: dict = {"evaluated": True}
    failures: list[dict] = []

    if current["rating_mean"] is not None and previous["rating_mean"] is not None:
        shift = current["rating_mean"] - previous["rating_mean"]
        stats |= {"rating_mean": current["rating_mean"], "previous_rating_mean": previous["rating_mean"],
                  "rating_mean_shift": shift,
                  "rating_histogram_distance": _total_variation(current["rating_histogram"],
                                                                previous["rating_histogram"])}
        if abs(shift) > thresholds.max_rating_mean_shift:
            failures.append(failure(
                "max_rating_mean_shift", "interactions", ["rating"],
                f"mean rating moved by {shift:+.3f} (limit ±{thresholds.max_rating_mean_shift:g})",
                observed_value=shift, threshold=thresholds.max_rating_mean_shift))

    for kind, limit in (("item", thresholds.max_new_item_share),
                        ("user", thresholds.max_new_user_share)):
        now, before = current[f"{kind}_ids"], previous[f"{kind}_ids"]
        if now is None or before is None:
            continue
        new = sorted(set(now) - set(before))
        share = len(new) / len(now) if now else 0.0
        stats |= {f"n_{kind}s": len(now), f"new_{kind}s": len(new), f"new_{kind}_share": share,
                  f"removed_{kind}s": len(set(before) - set(now))}
        if share > limit:
            failures.append(failure(
                f"max_new_{kind}_share", "items" if kind == "item" else "interactions",
                [f"{kind}_id"], f"{share:.1%} of {kind}s are new (limit {limit:.0%})",
                unexpected_count=len(new), unexpected_percent=100 * share,
                examples=[{f"{kind}_id": i} for i in new[:_EXAMPLE_IDS]],
                observed_value=share, threshold=limit))

    n_now, n_before = current["n_interactions"], previous["n_interactions"]
    stats |= {"n_interactions": n_now, "previous_n_interactions": n_before}
    if n_before:
        change = n_now / n_before - 1
        stats["volume_change"] = change
        if abs(change) > thresholds.max_volume_change:
            failures.append(failure(
                "max_volume_change", "interactions", [],
                f"interaction count went from {n_before} to {n_now} ({change:+.1%}, "
                f"limit ±{thresholds.max_volume_change:.0%})",
                observed_value=change, threshold=thresholds.max_volume_change))

    description = ("; ".join(f["description"] for f in failures) if failures
                   else "within the drift limits of the previous snapshot")
    return CheckOutcome("drift", WARN, not failures, description, failures, jsonable(stats))


def _check_profile(profile: dict) -> None:
    missing = [k for k in _PROFILE_KEYS if k not in profile]
    if missing or profile["profile_version"] != PROFILE_VERSION:
        raise ValueError(f"previous_profile is not a snapshot_profile (version {PROFILE_VERSION}): "
                         f"missing {missing}, version {profile.get('profile_version')!r}")


def _total_variation(a: dict[str, float], b: dict[str, float]) -> float:
    """Half the L1 distance between two histograms: 0 identical, 1 disjoint."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
