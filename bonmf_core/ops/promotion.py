"""The promotion gate as a pure function: metrics in, a decision with its reason out.

A candidate is promoted only when
  1. every absolute floor from configuration holds (e.g. `hr@10 >= 0.3`),
  2. it beats the best baseline on the primary metric (when `beat_baselines` is on), and
  3. it beats the current production model on the primary metric by at least `min_improvement`
     (absolute), or no production model exists.
Otherwise it holds, and the reason says which rule failed. `force=True` promotes anyway and the
decision says so ("forced"), keeping the reasons the gate would have given.
"""

from __future__ import annotations

from dataclasses import dataclass

from bonmf_core.config import PromotionConfig


@dataclass(frozen=True)
class Decision:
    decision: str               # promote | hold | forced
    reason: str
    compared: dict

    @property
    def promoted(self) -> bool:
        return self.decision in ("promote", "forced")


def decide(candidate: dict, production: dict | None, config: PromotionConfig,
           baselines: dict[str, dict] | None = None, force: bool = False,
           forced_by: str | None = None) -> Decision:
    """Decide on `candidate` (metric → value) against `production` (metric → value or None)
    and `baselines` (name → metric → value)."""
    primary = config.primary_metric
    if primary not in candidate:
        raise KeyError(f"candidate metrics lack the primary metric {primary!r}: {sorted(candidate)}")
    value = float(candidate[primary])
    failures: list[str] = []
    compared: dict = {"primary_metric": primary, "candidate": {primary: value},
                      "floors": {}, "min_improvement": config.min_improvement}

    for metric, floor in sorted(config.floors.items()):
        if metric not in candidate:
            failures.append(f"{metric} not measured (floor {floor:g})")
            continue
        got = float(candidate[metric])
        compared["candidate"][metric] = got
        compared["floors"][metric] = {"floor": float(floor), "value": got, "ok": got >= floor}
        if got < floor:
            failures.append(f"{metric} {got:.4f} below the floor {floor:g}")

    if config.beat_baselines and baselines:
        scored = {n: float(m[primary]) for n, m in baselines.items() if primary in m}
        compared["baselines"] = scored
        if scored:
            best = max(scored, key=scored.get)
            if value <= scored[best]:
                failures.append(f"{primary} {value:.4f} does not beat the baseline "
                                f"{best} ({scored[best]:.4f})")

    if production is not None and primary in production:
        prod = float(production[primary])
        compared["production"] = {primary: prod}
        compared["improvement"] = value - prod
        if value < prod + config.min_improvement:
            failures.append(f"{primary} {value:.4f} does not beat production {prod:.4f} by "
                            f"the margin {config.min_improvement:g}")
    else:
        compared["production"] = None

    if force:
        why = "; ".join(failures) if failures else "the gate would have promoted it too"
        return Decision("forced", f"forced by {forced_by or 'configuration'} ({why})", compared)
    if failures:
        return Decision("hold", "; ".join(failures), compared)
    if compared["production"] is None:
        return Decision("promote", f"no production model; {primary} {value:.4f} passes every "
                        "floor", compared)
    return Decision("promote", f"{primary} {value:.4f} beats production "
                    f"{compared['production'][primary]:.4f} by {compared['improvement']:+.4f} "
                    f"(margin {config.min_improvement:g})", compared)
