"""Reports: the metrics table, the ablation chart (matplotlib, error bars over seeds), the
training curves, and the report folder that holds them — with `report.html`, one
self-contained page (pictures inline) built from `report.json`, the data behind it.

The page has the metrics per variant (mean ± std over seeds, chart with error bars), per slice
where the results carry slices (`results[variant]["slices"]`: slice → metric → {mean, std}),
every fit's training curve, the data checks' outcome and, once the gate has decided
(`add_gate`), its comparison with production and its reason.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from bonmf_core.atomic import atomic_dir, atomic_file, write_json


def format_table(results: dict) -> str:
    """A markdown table of mean ± std per variant and metric."""
    cols = _metric_columns(results)
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
    import numpy as np

    plt = _pyplot()

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


REPORT_FILES = {"json": "metrics.json", "markdown": "metrics.md", "plot": "metrics.png",
                "curve": "training_curve.json", "curves_plot": "training_curves.png",
                "summary": "summary.json", "html": "report.html", "data": "report.json"}


def write_report(results: dict, out: str | Path, curve: list[dict] | None = None, *,
                 curves: dict[str, list[dict]] | None = None, checks: list[dict] | None = None,
                 run_id: str | None = None) -> dict:
    """The report folder, swapped in whole: metrics.json (everything), metrics.md (the table),
    metrics.png (the chart), training_curve.json (the candidate's epochs: `dvc plots`),
    training_curves.png (every fit in `curves`, name → epochs; default the candidate's),
    summary.json, report.json and report.html → {table, report: {name: path}}.
    `checks`: the data checks' outcomes ({name, severity, passed, description, failures})."""
    out = Path(out)
    table = format_table(results)
    k = results["ks"][0]
    highlight = (results.get("candidate") or {}).get("variant")
    curves = curves or ({f"{highlight} (candidate)": curve} if curve else {})
    data = {"results": results, "curves": curves, "checks": checks_summary(checks),
            "gate": None, "run_id": run_id}
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
        (tmp / "metrics.md").write_text(table + "\n")
        metrics_chart(results, [f"hr@{k}", f"ndcg@{k}", f"recall@{k}"], tmp / "metrics.png",
                      highlight)
        write_json(tmp / "training_curve.json", curve or [])
        curves_chart(curves, results["params"]["train"]["metric"] if "params" in results
                     else "valid", tmp / "training_curves.png")
        write_json(tmp / "summary.json", summary(results))
        write_json(tmp / "report.json", data)
        (tmp / "report.html").write_text(render_html(data, tmp))
    return {"table": table, "report": {k: str(out / v) for k, v in REPORT_FILES.items()}}


def add_gate(report_dir: str | Path, gate: dict) -> Path:
    """Put the gate's decision (decision, reason, compared, candidate/production versions)
    into the report written by `write_report` and render the page again → report.html."""
    report_dir = Path(report_dir)
    data = json.loads((report_dir / "report.json").read_text())
    data["gate"] = gate
    with atomic_file(report_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    with atomic_file(report_dir / "report.html") as tmp:
        tmp.write_text(render_html(data, report_dir))
    return report_dir / "report.html"


def checks_summary(checks: list[dict] | None) -> list[dict] | None:
    """One line per data check: name, severity, passed, description, failed expectations."""
    if checks is None:
        return None
    return [{"name": c["name"], "severity": c["severity"], "passed": bool(c["passed"]),
             "description": c["description"], "failed_expectations": len(c.get("failures") or [])}
            for c in checks]


def curves_chart(curves: dict[str, list[dict]], metric: str, path: str | Path) -> Path:
    """Training loss and validation metric by epoch, one line per fit, side by side."""
    plt = _pyplot()
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for i, (name, epochs) in enumerate(curves.items()):
        xs = [e["epoch"] for e in epochs]
        loss_ax.plot(xs, [e["loss"] for e in epochs], marker="o", color=f"C{i}", label=name)
        valid = [(e["epoch"], e["valid"]) for e in epochs if e.get("valid") is not None]
        if valid:
            valid_ax.plot(*zip(*valid), marker="o", color=f"C{i}", label=name)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    valid_ax.set(title=f"validation {metric}", xlabel="epoch", ylabel=metric)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, valid_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    if not curves:
        loss_ax.text(0.5, 0.5, "no epoch-wise fits", ha="center", transform=loss_ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # no display: files only, also on a headless server
    import matplotlib.pyplot as plt

    return plt


# -- the HTML page ------------------------------------------------------------------------------

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692b}.fail{color:#b00020;font-weight:bold}.warn{color:#a15c00}
tr.candidate{background:#eef5ff}img{max-width:100%}h2{border-bottom:1px solid #ddd}"""


def render_html(data: dict, folder: Path) -> str:
    """The self-contained page (CSS and pictures inline) for report.json's `data`."""
    results = data["results"]
    seeds = ",".join(map(str, results["seeds"]))
    title = f"BoNMF report — {results['dataset']}, protocol {results['protocol']}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>",
             f"<p>seeds {_e(seeds)} · K {_e(','.join(map(str, results['ks'])))} · dataset "
             f"{_e(results['dataset_details']['content_hash'])} "
             f"({results['dataset_details']['users']} users, "
             f"{results['dataset_details']['items']} items, "
             f"{results['dataset_details']['interactions']} interactions)"
             + (f" · run {_e(data['run_id'])}" if data.get("run_id") else "") + "</p>",
             _gate_html(data.get("gate")), _checks_html(data.get("checks")),
             "<h2>Metrics per variant</h2>", _metrics_table_html(results),
             _img(folder / "metrics.png", "metrics per variant, mean ± std over seeds"),
             _slices_html(results),
             "<h2>Training curves</h2>",
             _img(folder / "training_curves.png", "training loss and validation metric"),
             "</body></html>"]
    return "\n".join(p for p in parts if p)


def _e(value) -> str:
    return html.escape(str(value))


def _img(path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{encoded}'>"


def _metric_columns(results: dict) -> list[str]:
    names = [n for n in ("hr", "ndcg", "recall")
             if any(f"{n}@{results['ks'][0]}" in r for r in results["results"].values())]
    return [f"{n}@{k}" for k in results["ks"] for n in names]


def _metrics_table_html(results: dict) -> str:
    cols = _metric_columns(results)
    best = (results.get("candidate") or {}).get("variant")
    rows = ["<table><tr><th>variant</th>" + "".join(f"<th>{_e(c)}</th>" for c in cols)
            + "<th>fit s</th></tr>"]
    for variant, r in results["results"].items():
        cells = "".join(f"<td class='num'>{r[c]['mean']:.4f} ± {r[c]['std']:.4f}</td>"
                        if c in r else "<td></td>" for c in cols)
        mark = " (candidate)" if variant == best else ""
        rows.append(f"<tr{' class=candidate' if mark else ''}><td>{_e(variant)}{mark}</td>"
                    f"{cells}<td class='num'>{r['fit_s']['mean']:.1f}</td></tr>")
    return "\n".join(rows) + "</table>"


def _slices_html(results: dict) -> str:
    """Per-slice metrics (e.g. item popularity buckets) where the protocol computed them."""
    sliced = {v: r["slices"] for v, r in results["results"].items() if r.get("slices")}
    if not sliced:
        return ""
    rows = ["<h2>Metrics per slice</h2><table><tr><th>variant</th><th>slice</th>"
            "<th>metric</th><th>mean ± std</th></tr>"]
    for variant, slices in sliced.items():
        for name, metrics in slices.items():
            for metric, m in metrics.items():
                rows.append(f"<tr><td>{_e(variant)}</td><td>{_e(name)}</td><td>{_e(metric)}"
                            f"</td><td class='num'>{m['mean']:.4f} ± {m['std']:.4f}</td></tr>")
    return "\n".join(rows) + "</table>"


def _checks_html(checks: list[dict] | None) -> str:
    if checks is None:
        return "<h2>Data checks</h2><p>not recorded for this report</p>"
    rows = ["<h2>Data checks</h2><table><tr><th>check</th><th>severity</th><th>outcome</th>"
            "<th>failed expectations</th><th>what</th></tr>"]
    for c in checks:
        css, word = (("ok", "passed") if c["passed"] else
                     ("fail", "FAILED") if c["severity"] == "ERROR" else ("warn", "warning"))
        rows.append(f"<tr><td>{_e(c['name'])}</td><td>{_e(c['severity'])}</td>"
                    f"<td class='{css}'>{word}</td><td class='num'>{c['failed_expectations']}"
                    f"</td><td>{_e(c['description'])}</td></tr>")
    return "\n".join(rows) + "</table>"


def _gate_html(gate: dict | None) -> str:
    if gate is None:
        return "<h2>Promotion gate</h2><p>no decision recorded in this report</p>"
    compared = gate.get("compared") or {}
    metric = compared.get("primary_metric")
    production = compared.get("production") or {}
    rows = [f"<h2>Promotion gate: {_e(gate['decision'].upper())}</h2>",
            f"<p>{_e(gate['reason'])}</p><table>",
            f"<tr><th></th><th>model version</th><th>{_e(metric or 'primary metric')}</th></tr>",
            f"<tr><td>candidate</td><td>{_version(gate.get('candidate_version'))}</td>"
            f"<td class='num'>{_num((compared.get('candidate') or {}).get(metric))}</td></tr>",
            f"<tr><td>production before</td><td>{_version(compared.get('production_version'))}"
            f"</td>"
            f"<td class='num'>{_num(production.get(metric))}</td></tr>"]
    if "improvement" in compared:
        rows.append(f"<tr><td>improvement</td><td>margin {compared['min_improvement']:g}</td>"
                    f"<td class='num'>{compared['improvement']:+.4f}</td></tr>")
    for name, value in (compared.get("baselines") or {}).items():
        rows.append(f"<tr><td>baseline {_e(name)}</td><td></td>"
                    f"<td class='num'>{_num(value)}</td></tr>")
    for name, floor in (compared.get("floors") or {}).items():
        rows.append(f"<tr><td>floor {_e(name)} ≥ {floor['floor']:g}</td><td></td>"
                    f"<td class='num {'ok' if floor['ok'] else 'fail'}'>"
                    f"{floor['value']:.4f}</td></tr>")
    return "\n".join(rows) + "</table>"


def _version(value) -> str:
    return "none" if value is None else _e(value)


def _num(value) -> str:
    return "—" if value is None else f"{float(value):.4f}"
