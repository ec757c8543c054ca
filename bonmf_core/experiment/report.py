"""Reports: the metrics table, the ablation chart (matplotlib, error bars over seeds), the
training curve and the report folder that holds them."""

from __future__ import annotations

import json
from pathlib import Path

from bonmf_core.atomic import atomic_dir, write_json


def format_table(results: dict) -> str:
    """A markdown table of mean ± std per variant and metric."""
    ks = results["ks"]
    names = [n for n in ("hr", "ndcg", "recall")
             if any(f"{n}@{ks[0]}" in r for r in results["results"].values())]
    cols = [f"{n}@{k}" for k in ks for n in names]
    seeds = results["seeds"]
    lines = [f"protocol={results['protocol']} dataset={results['dataset']} "
             f"seeds={','.join(map(str, seeds))}",
             "| variant | " + " | ".join(cols) + " | fit s |",
             "|---|" + "---|" * (len(cols) + 1)]
    for variant, r in results["results"].items():
        cells = [f"{r[c]['mean']:.4f} ± {r[c]['std']:.4f}" for c in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {r['fit_s']['mean']:.1f} |")
    return "\n".join(lines)


def metrics_chart(results: dict, metrics: list[str], path: str | Path,
                  highlight: str | None = None) -> Path:
    """Grouped bars of `metrics` per variant, mean with ± std error bars over the seeds; the
    candidate (`highlight`) drawn darker. Titled with the protocol, dataset and seeds."""
    import matplotlib

    matplotlib.use("Agg")   # no display: files only, also on a headless server
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(results["results"])
    shown = [m for m in metrics if any(m in r for r in results["results"].values())]
    x = np.arange(len(variants))
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(variants) + 2), 4.2), dpi=110)
    for i, metric in enumerate(shown):
        means = [results["results"][v].get(metric, {}).get("mean", np.nan) for v in variants]
        stds = [results["results"][v].get(metric, {}).get("std", 0.0) for v in variants]
        bars = ax.bar(x + (i - (len(shown) - 1) / 2) * width, means, width, yerr=stds,
                      capsize=3, label=metric, color=f"C{i}")
        for bar, variant in zip(bars, variants):
            if variant == highlight:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.6)
        ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [f"{v}\n(candidate)" if v == highlight else v for v in variants])
    ax.set_xlabel("variant")
    ax.set_ylabel("metric on the test set (mean ± std over seeds)")
    seeds = ",".join(map(str, results["seeds"]))
    ax.set_title(f"{results['dataset']} — protocol {results['protocol']}, seeds {seeds}")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_ylim(0, max([0.05] + [results["results"][v][m]["mean"] + results["results"][v][m]["std"]
                                 for v in variants for m in shown
                                 if m in results["results"][v]]) * 1.2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def training_curve(fit: dict, metric: str) -> list[dict]:
    """Per-epoch loss and validation `metric` of one fit (empty for baselines without epochs)."""
    return [{"epoch": r["epoch"], "loss": float(r["loss"]),
             "valid": float(r["valid"][metric]) if "valid" in r else None}
            for r in fit.get("history") or []]


def summary(results: dict) -> dict:
    """The ranking metrics' means only (DVC's metrics file: `dvc metrics diff` compares them)."""
    means = {v: {k: round(m["mean"], 6) for k, m in r.items() if "@" in k}
             for v, r in results["results"].items()}
    best = (results.get("candidate") or {}).get("variant")
    return {"candidate": {"variant": best, **means.get(best, {})}, "variants": means}


def write_report(results: dict, out: str | Path, curve: list[dict] | None = None) -> dict:
    """The report folder, swapped in whole: metrics.json (everything), metrics.md (the table),
    metrics.png (the chart), training_curve.json (the candidate's epochs) and summary.json →
    {table, report: {name: path}}."""
    out = Path(out)
    table = format_table(results)
    k = results["ks"][0]
    highlight = (results.get("candidate") or {}).get("variant")
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
        (tmp / "metrics.md").write_text(table + "\n")
        metrics_chart(results, [f"hr@{k}", f"ndcg@{k}", f"recall@{k}"], tmp / "metrics.png",
                      highlight)
        write_json(tmp / "training_curve.json", curve or [])
        write_json(tmp / "summary.json", summary(results))
    names = {"json": "metrics.json", "markdown": "metrics.md", "plot": "metrics.png",
             "curve": "training_curve.json", "summary": "summary.json"}
    return {"table": table, "report": {k: str(out / v) for k, v in names.items()}}
