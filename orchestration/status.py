"""`bonmf status`: the operator's first questions answered from the registry and Dagster.

Which model serves (version, variant, metrics with their protocol, Bento tag, DVC revision),
when the last run was and how it ended, what the last data checks said and what the gate last
decided and why. Reads only: where nothing ran yet, no store or Dagster home is created.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def collect(cfg, state: Path) -> dict:
    """Everything `bonmf status` shows, as plain JSON-able values."""
    from bonmf_core.ops import registry
    from bonmf_core.store.database import Store, default_store_url

    url = cfg.encoders.store_url or default_store_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return {"state_dir": str(state), "production": None, "last_run": None,
                "checks": None, "gate": None, "report": None}   # nothing ran here yet
    store = Store(url)
    try:
        production = registry.production_model(store)
        event = registry.latest_event(store)
        snapshot = registry.latest_snapshot(store)
        failures = {f["run_id"]: f for f in registry.list_run_failures(store)}
    finally:
        store.dispose()
    return {"state_dir": str(state),
            "production": production and _production(production, state),
            "last_run": last_run(state, failures),
            "checks": snapshot and _checks(snapshot),
            "gate": event and {k: _plain(event[k]) for k in (
                "decision", "reason", "candidate_id", "production_id", "forced_by", "run_id",
                "created_at")},
            "report": _latest_report(state)}


def _production(row: dict, state: Path) -> dict:
    bento_file = Path(state) / "artifacts" / "bento" / "bento.json"
    bento = json.loads(bento_file.read_text()) if bento_file.exists() else {}
    dvc = row.get("dvc") or {}
    return {"version": row["id"], "variant": row["variant"], "dataset_hash": row["dataset_hash"],
            "promoted_at": _plain(row["promoted_at"]),
            "metrics": {k: v for k, v in (row["metrics"] or {}).get("mean", {}).items()
                        if "@" in k},
            "protocol": {k: (row["protocol"] or {}).get(k) for k in ("name", "ks", "seeds")},
            "bento_model_tag": row.get("bento_tag"),
            # the exported Bento is this version's only when packaging caught up with it
            "bento_tag": bento.get("bento_tag") if bento.get("model_version") == row["id"]
            else None,
            "dvc": {k: dvc.get(k) for k in ("git_rev", "git_branch", "git_tag")} if dvc
            else None}


def _checks(snapshot: dict) -> dict:
    validation = snapshot.get("validation") or {}
    return {"snapshot": snapshot["content_hash"], "source": snapshot["source"],
            "status": snapshot["status"], "validated_at": _plain(snapshot.get("validated_at")),
            "checks": [{k: c[k] for k in ("name", "severity", "passed", "description")}
                       for c in validation.get("checks", [])]}


def last_run(state: Path, failures: dict) -> dict | None:
    """The newest Dagster run in `<state>/dagster`, or None when there is none."""
    home = Path(state) / "dagster"
    if not (home / "dagster.yaml").exists():
        return None
    import dagster as dg

    from .run_health import process_alive, run_pid

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(limit=1)
        if not records:
            return None
        record = records[0]
        run = record.dagster_run
        out = {"run_id": run.run_id, "job": run.job_name, "status": run.status.value,
               "trigger": run.tags.get("bonmf/trigger"),
               "started": _timestamp(record.start_time), "ended": _timestamp(record.end_time)}
        if run.status == dg.DagsterRunStatus.STARTED:
            pid = run_pid(instance, run.run_id)
            out["process_alive"] = pid is not None and process_alive(pid, record.start_time or 0)
    failure = failures.get(run.run_id)
    if failure:
        out.update(message=failure["message"], failed_steps=failure["failed_steps"])
    return out


def _latest_report(state: Path) -> str | None:
    reports = sorted((Path(state) / "reports").glob("*/report.html"),
                     key=lambda p: p.stat().st_mtime)
    return str(reports[-1]) if reports else None


def _timestamp(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(
        seconds, timezone.utc).isoformat(timespec="seconds")


def _plain(value):
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else value


# -- the text ---------------------------------------------------------------------------------

def render(status: dict) -> str:
    lines = [f"state:      {status['state_dir']}"]
    lines += _production_lines(status["production"])
    lines += _run_lines(status["last_run"])
    lines += _check_lines(status["checks"])
    gate = status["gate"]
    lines.append("gate:       none yet" if gate is None else
                 f"gate:       {gate['decision'].upper()} candidate v{gate['candidate_id']} at "
                 f"{gate['created_at']} — {gate['reason']}")
    lines.append(f"report:     {status['report'] or 'none yet'}")
    return "\n".join(lines)


def _production_lines(p: dict | None) -> list[str]:
    if p is None:
        return ["production: none yet (`bonmf run` trains and promotes one)"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(p["metrics"].items()))
    protocol = p["protocol"]
    dvc = p["dvc"] or {}
    return [f"production: model version {p['version']} ({p['variant']}), promoted "
            f"{p['promoted_at']}, dataset {p['dataset_hash']}",
            f"  metrics:  {metrics} (protocol {protocol['name']}, K "
            f"{','.join(map(str, protocol['ks'] or []))}, seeds "
            f"{','.join(map(str, protocol['seeds'] or []))})",
            f"  bento:    {p['bento_tag'] or 'not packaged'} (model {p['bento_model_tag']})",
            "  dvc:      " + (f"{dvc['git_rev']} on {dvc.get('git_branch')}"
                              + (f", tag {dvc['git_tag']}" if dvc.get("git_tag") else "")
                              if dvc.get("git_rev") else "not versioned")]


def _run_lines(run: dict | None) -> list[str]:
    if run is None:
        return ["last run:   none yet"]
    line = (f"last run:   {run['run_id']} ({run['job']}, {run['trigger'] or 'ui'}) "
            f"{run['status']}, started {run['started']}, ended {run['ended'] or '—'}")
    if run.get("process_alive") is False:
        line += " — its process is gone (it will be marked failed)"
    out = [line]
    if run.get("message"):
        out.append(f"  failure:  {run['message'][:300]}")
    return out


def _check_lines(checks: dict | None) -> list[str]:
    if checks is None:
        return ["checks:     none yet"]
    out = [f"checks:     snapshot {checks['snapshot']} {checks['status']} "
           f"({checks['validated_at']})"]
    for c in checks["checks"]:
        mark = "ok  " if c["passed"] else ("FAIL" if c["severity"] == "ERROR" else "warn")
        out.append(f"  {mark} {c['name']}: {c['description'][:160]}")
    return out
