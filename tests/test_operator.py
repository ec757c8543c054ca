"""The operator's day, for real: one `bonmf run` (a subprocess, as a user types it) in a temp git
+ DVC project checked out on a working branch with local changes, then what an operator does
next — reads the HTML report, asks `bonmf status`, opens the Dagster UI (a real
dagster-webserver, asked through its GraphQL API; a headless Chromium screenshot where
Chromium is installed), serves the model with `bonmf serve` — and what must not happen: the
working branch, its index and its working tree changed by the promotion commit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from bonmf_core.config import load_config
from bonmf_core.ops import registry
from bonmf_core.store.database import Store
from orchestration.main import DAGSTER_YAML
from test_dvc import BIN, TINY, env, git, make_project
from test_orchestration import start_doomed_run

WORK_BRANCH = "feature/my-work"


@pytest.fixture(scope="module")
def operated(tmp_path_factory):
    """A project on a working branch with a staged and an unstaged change; one `bonmf run`."""
    root = make_project(tmp_path_factory.mktemp("operator") / "repo",
                        load_config(flags=TINY, use_default_file=False))
    git(root, "checkout", "-q", "-b", WORK_BRANCH)
    (root / "notes.txt").write_text("staged work in progress\n")
    git(root, "add", "notes.txt")
    with open(root / "dvc.yaml", "a") as f:
        f.write("# an unstaged edit\n")
    before = {"head": git(root, "rev-parse", "HEAD").strip(),
              "branch": git(root, "symbolic-ref", "--short", "HEAD").strip(),
              "index": git(root, "write-tree").strip(),
              "status": git(root, "status", "--porcelain"),
              "branches": git(root, "branch", "--format=%(refname:short)").split()}
    # An earlier run in this state folder was killed with SIGKILL: Dagster still says STARTED.
    home = root / ".bonmf" / "dagster"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    doomed, before["dead_run"] = start_doomed_run(home)
    doomed.kill()
    doomed.wait(timeout=30)
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "bonmf"), "run", "-q"], cwd=root, capture_output=True,
                          text=True, timeout=1200, env={**env(root), "BONMF_PARAMS": ""})
    print(f"bonmf run (tiny demo, cold): {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, root / ".bonmf", proc, before


def _production(state: Path) -> dict:
    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        return registry.production_model(store) | {"event": registry.latest_event(store)}
    finally:
        store.dispose()


# -- 1. versioning off your branch --------------------------------------------------------------

def test_promotion_commit_leaves_your_branch_index_and_work_tree_alone(operated):
    root, state, proc, before = operated
    production = _production(state)
    dvc_info = production["dvc"]
    assert git(root, "rev-parse", "HEAD").strip() == before["head"]
    assert git(root, "symbolic-ref", "--short", "HEAD").strip() == before["branch"]
    assert git(root, "write-tree").strip() == before["index"]     # the index, byte for byte
    # The only new entries are the untracked promoted/ folder DVC works in.
    status = git(root, "status", "--porcelain", "--untracked-files=normal")
    assert [line for line in status.splitlines() if not line.startswith("?? promoted/")] == \
        before["status"].splitlines()
    assert set(git(root, "branch", "--format=%(refname:short)").split()) == \
        {*before["branches"], "bonmf/registry"}

    # The registry branch starts at the commit checked out then, and holds the pointers.
    assert dvc_info["git_branch"] == "bonmf/registry" and dvc_info["git_tag"] == \
        f"model@v{production['id']}"
    assert git(root, "rev-parse", "bonmf/registry").strip() == dvc_info["git_rev"]
    assert git(root, "rev-parse", f"{dvc_info['git_rev']}^").strip() == before["head"]
    changed = git(root, "diff", "--name-only", before["head"], "bonmf/registry").split()
    assert sorted(changed) == ["promoted/.gitignore", "promoted/dataset.dvc",
                               "promoted/model.dvc"]
    pointer = yaml.safe_load(git(root, "show", "bonmf/registry:promoted/model.dvc"))
    assert pointer["outs"][0]["md5"] == dvc_info["model"]["md5"]
    # An annotated tag per version, on that commit.
    tag = dvc_info["git_tag"]
    assert git(root, "cat-file", "-t", tag).strip() == "tag"
    assert git(root, "rev-parse", f"{tag}^{{commit}}").strip() == dvc_info["git_rev"]
    assert f"on branch bonmf/registry, tag {tag}" in proc.stdout

    # Restoring by the tag works and still leaves the branch alone.
    done = subprocess.run([str(BIN / "bonmf"), "restore", "--rev", tag], cwd=root, env=env(root),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((root / "promoted" / "model.dvc").read_text())["outs"][0]["md5"] == \
        dvc_info["model"]["md5"]
    assert git(root, "rev-parse", "HEAD").strip() == before["head"]
    assert git(root, "write-tree").strip() == before["index"]


# -- 2. dead runs are marked --------------------------------------------------------------------

def test_bonmf_run_marks_an_earlier_killed_run_failed_on_start(operated):
    import dagster as dg

    root, state, proc, before = operated
    dead = before["dead_run"]
    assert f"earlier run {dead} had lost its process: marked failed" in proc.stdout
    with dg.DagsterInstance.from_config(str(state / "dagster")) as instance:
        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        failures = registry.list_run_failures(store)
    finally:
        store.dispose()
    assert [(f["run_id"], f["job_name"]) for f in failures] == [(dead, "doomed")]
    assert "is gone" in failures[0]["message"]


# -- 3. a report people read ----------------------------------------------------------------------

def _report(proc) -> Path:
    match = re.search(r"^report:\s+(\S+report\.html)", proc.stdout, re.M)
    assert match, proc.stdout[-2000:]
    return Path(match.group(1))


def _cell_numbers(html_text: str, row_label: str) -> list[tuple[float, float]]:
    """The `mean ± std` cells of the metrics-table row whose first cell starts with the label."""
    row = re.search(rf"<tr[^>]*><td>{re.escape(row_label)}( \(candidate\))?</td>(.*?)</tr>",
                    html_text)
    assert row, f"no row {row_label!r}"
    return [(float(m), float(s)) for m, s in re.findall(r"([0-9.]+) ± ([0-9.]+)", row.group(2))]


def test_the_html_report_is_self_contained_and_shows_what_the_run_did(operated):
    from PIL import Image

    root, state, proc, _ = operated
    page_path = _report(proc)
    page = page_path.read_text()
    data = json.loads((page_path.parent / "report.json").read_text())
    metrics = json.loads((page_path.parent / "metrics.json").read_text())
    assert data["results"] == metrics
    # Self-contained: no external resource to fetch.
    assert not re.search(r"""(src|href)=['"](https?:|file:|/)""", page)
    # Every variant's numbers, as metrics.json has them (compared as numbers, 4 decimals shown).
    cols = [f"{n}@10" for n in ("hr", "ndcg", "recall") if f"{n}@10" in metrics["results"]["id"]]
    for variant, result in metrics["results"].items():
        shown = _cell_numbers(page, variant)
        assert len(shown) == len(cols)
        for (mean, std), col in zip(shown, cols):
            assert mean == pytest.approx(result[col]["mean"], abs=5.1e-5)
            assert std == pytest.approx(result[col]["std"], abs=5.1e-5)
    # The gate: its decision and its reason, as the registry recorded them.
    production = _production(state)
    gate = data["gate"]
    assert gate["decision"] == production["event"]["decision"] == "promote"
    assert gate["reason"] == production["event"]["reason"]
    assert f"Promotion gate: {gate['decision'].upper()}" in page
    assert __import__("html").escape(gate["reason"]) in page
    # The data checks' summary.
    assert [c["name"] for c in data["checks"]] == ["parsing", "interactions", "catalog",
                                                  "referential", "drift"][-len(data["checks"]):]
    assert all(f"<td>{c['name']}</td>" in page for c in data["checks"])
    # Training curves: one per epoch-wise fit (BoNMF variants), with TINY's 2 epochs each.
    assert set(data["curves"]) == {"id seed 0", "text+image seed 0"}
    assert all([e["epoch"] for e in c] == [1, 2] for c in data["curves"].values())
    # The pictures are real, non-blank PNGs.
    pictures = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pictures) == 2
    for encoded in pictures:
        image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
        assert image.width > 400 and len(image.getcolors(maxcolors=1 << 20)) > 20


# -- 5. status at a glance ---------------------------------------------------------------------

def _bonmf(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bonmf"), *args], cwd=root, env=env(root),
                          capture_output=True, text=True, timeout=timeout)


def test_status_answers_the_operators_first_questions(operated):
    root, state, proc, _ = operated
    production = _production(state)
    bento = json.loads((state / "artifacts" / "bento" / "bento.json").read_text())
    shown = _bonmf(root, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    p = status["production"]
    assert (p["version"], p["variant"]) == (production["id"], production["variant"])
    assert p["metrics"] == {k: v for k, v in production["metrics"]["mean"].items() if "@" in k}
    assert p["protocol"] == {"name": "ncf", "ks": [10], "seeds": [0]}
    assert p["bento_tag"] == bento["bento_tag"] and p["bento_model_tag"] == production["bento_tag"]
    assert p["dvc"]["git_rev"] == production["dvc"]["git_rev"]
    run_id = re.search(r"^run (\S+) ", proc.stdout, re.M).group(1)
    assert status["last_run"]["run_id"] == run_id and status["last_run"]["status"] == "SUCCESS"
    assert status["last_run"]["trigger"] == "cli"
    assert {c["name"] for c in status["checks"]["checks"]} >= {"interactions", "catalog",
                                                                "referential", "drift"}
    assert status["checks"]["status"] == "accepted"
    assert status["gate"]["decision"] == "promote"
    assert status["gate"]["reason"] == production["event"]["reason"]
    assert status["report"] == str(_report(proc))

    text = _bonmf(root, "status")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert len(lines) <= 20
    assert f"production: model version {p['version']} ({p['variant']})" in text.stdout
    assert bento["bento_tag"] in text.stdout and production["dvc"]["git_rev"] in text.stdout
    assert f"last run:   {run_id} (retrain, cli) SUCCESS" in text.stdout
    assert "gate:       PROMOTE" in text.stdout and "ok   interactions" in text.stdout


def test_status_on_a_fresh_state_says_so_and_creates_nothing(tmp_path):
    state = tmp_path / "fresh"
    done = subprocess.run([str(BIN / "bonmf"), "status"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "BONMF_STATE_DIR": str(state),
                                          "BONMF_PARAMS": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "production: none yet" in done.stdout and "last run:   none yet" in done.stdout
    assert not state.exists()


# -- 4. typed metadata ----------------------------------------------------------------------

def test_key_figures_are_typed_metadata(operated):
    import dagster as dg

    _, state, _, _ = operated
    expected = {
        "dataset_snapshot": {}, "validated_dataset": {"users": int, "interactions": int},
        "text_embeddings": {"dim": int, "items": int, "seconds": float},
        "splits": {"train_rows": int, "test_rows": int},
        "bonmf_candidate": {"model_version": int, "ndcg@10": float, "hr@10": float,
                            "fits_trained": int, "seconds": float},
        "baselines": {"pop ndcg@10": float, "fits_reused": int},
        "offline_evaluation": {"candidate ndcg@10": float, "id ndcg@10": float,
                               "pop hr@10": float, "variants": int},
        "promotion_decision": {"candidate_version": int, "production_version": int,
                               "candidate_primary": float, "best_baseline_primary": float},
        "bento_package": {"model_version": int, "archive_bytes": int, "archive_mb": float},
        "versioned_artifacts": {"model_version": int, "model_nfiles": int,
                                "dataset_size": int, "seconds": float}}
    python_type = {dg.IntMetadataValue: int, dg.FloatMetadataValue: float}
    instance = dg.DagsterInstance.from_config(str(state / "dagster"))
    try:
        for asset, figures in expected.items():
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            meta = event.asset_materialization.metadata
            for key, kind in figures.items():
                assert python_type.get(type(meta[key])) is kind, (asset, key, meta[key])
        evaluation = instance.get_latest_materialization_event(
            dg.AssetKey("offline_evaluation")).asset_materialization.metadata
        table = evaluation["results_table"]
        assert isinstance(table, dg.TableMetadataValue)
        assert {r.data["variant"] for r in table.records} == {"pop", "id", "text+image"}
        assert isinstance(evaluation["report"], dg.PathMetadataValue)
        assert evaluation["report"].path.endswith("report.html")
    finally:
        instance.dispose()


# -- 7. the UI, for real ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals():
    # Started from a non-interactive shell, children inherit ignored SIGINT/SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(command: list[str], cwd: Path, environ: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=environ, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_default_signals)


def _stop(process: subprocess.Popen) -> None:
    """Stop the process and every descendant (BentoML workers sit in their own group)."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with __import__("contextlib").suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        p.kill()
    process.wait(timeout=15)


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


ASSETS_QUERY = """{ assetNodes { assetKey { path } groupName
  assetMaterializations(limit: 1) { runId
    metadataEntries { label __typename
      ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue } } } } }"""
CHECK_QUERY = """{ assetCheckExecutions(assetKey: {path: ["dataset_snapshot"]},
  checkName: "%s", limit: 1) { runId status evaluation { success severity } } }"""


def test_dagster_webserver_shows_the_run(operated, tmp_path):
    root, state, proc, _ = operated
    run_id = re.search(r"^run (\S+) ", proc.stdout, re.M).group(1)
    port = _free_port()
    log = tmp_path / "webserver.log"
    server = _start([str(BIN / "dagster-webserver"), "-m", "orchestration.definitions",
                     "-h", "127.0.0.1", "-p", str(port)], root,
                    {**env(root), "DAGSTER_HOME": str(state / "dagster"),
                     "BONMF_PARAMS": str(root / "params.yaml")}, log)
    try:
        started = time.perf_counter()
        _wait_http(f"http://127.0.0.1:{port}/server_info", server, log, 120)
        nodes = _graphql(port, ASSETS_QUERY)["assetNodes"]
        print(f"dagster-webserver answered GraphQL after {time.perf_counter() - started:.1f} s")
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert len(by_key) == 11 and by_key["dataset_snapshot"]["groupName"] == "ingest"
        assert by_key["versioned_artifacts"]["groupName"] == "versioning"
        # Every asset's latest materialization is this run's, its figures typed for plotting.
        assert {n["assetMaterializations"][0]["runId"] for n in nodes} == {run_id}
        entries = {e["label"]: e for e in
                   by_key["offline_evaluation"]["assetMaterializations"][0]["metadataEntries"]}
        evaluation = json.loads((_report(proc).parent / "metrics.json").read_text())
        candidate = evaluation["candidate"]["variant"]
        assert entries["candidate ndcg@10"]["__typename"] == "FloatMetadataEntry"
        assert entries["candidate ndcg@10"]["floatValue"] == pytest.approx(
            evaluation["results"][candidate]["ndcg@10"]["mean"])
        assert entries["variants"]["intValue"] == 3
        for check in ("interactions", "catalog", "referential", "drift"):
            execution = _graphql(port, CHECK_QUERY % check)["assetCheckExecutions"][0]
            assert execution["runId"] == run_id and execution["status"] == "SUCCEEDED"
            assert execution["evaluation"]["success"] is True
        if shutil.which("chromium"):
            _screenshot_is_not_blank(port, tmp_path)
    finally:
        _stop(server)


def _screenshot_is_not_blank(port: int, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "lineage.png"
    done = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--window-size=1400,900",
                           "--virtual-time-budget=30000", f"--screenshot={shot}",
                           f"http://127.0.0.1:{port}/asset-groups"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    dominant = max(count for count, _ in colors)
    print(f"lineage screenshot: {len(colors)} colours, dominant {dominant / (1400 * 900):.0%}")
    assert image.size == (1400, 900) and len(colors) > 50
    assert dominant < 0.95 * image.width * image.height


# -- 5. bonmf serve ---------------------------------------------------------------------------

def test_bonmf_serve_serves_production_on_localhost_with_the_api_key(operated, tmp_path):
    import psutil

    root, state, _, _ = operated
    production = _production(state)
    port = _free_port()
    log = tmp_path / "serve.log"
    server = _start([str(BIN / "bonmf"), "serve", "--port", str(port)], root,
                    {**env(root), "BONMF_API_KEY": "operator-test-key"}, log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", server, log, 180)
        first = log.read_text().splitlines()[0]
        assert f"serving model version {production['id']}" in first
        assert f"http://127.0.0.1:{port}" in first and "$BONMF_API_KEY" in first
        listening = {c.laddr for p in [psutil.Process(server.pid),
                                       *psutil.Process(server.pid).children(True)]
                     for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening and {a.ip for a in listening if a.port == port} == {"127.0.0.1"}

        def metadata(headers: dict) -> int | dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metadata", data=b"{}",
                                             headers={"Content-Type": "application/json",
                                                      **headers})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code

        served = metadata({"Authorization": "Bearer operator-test-key"})
        assert isinstance(served, dict) and served["model_version"] == production["id"]
        assert metadata({}) == 401      # the environment reached the service
    finally:
        _stop(server)


def test_bonmf_serve_without_a_production_model_is_a_clear_error(tmp_path):
    done = subprocess.run([str(BIN / "bonmf"), "serve"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "BONMF_STATE_DIR": str(tmp_path / "s"),
                               "BONMF_PARAMS": ""})
    assert done.returncode == 2 and "no production model" in done.stderr
    assert "Traceback" not in done.stderr


def test_report_page_shows_slices_and_a_held_candidate_against_production(tmp_path):
    """The page from synthetic results: per-slice rows where results carry slices, and a HOLD
    with the production model's figure and the improvement against the margin."""
    from bonmf_core.experiment.report import add_gate, write_report

    def m(mean, std=0.01):
        return {"mean": mean, "std": std}

    results = {"protocol": "cold_items", "dataset": "demo-seed0", "seeds": [0, 1], "ks": [10],
               "dataset_details": {"content_hash": "abc", "users": 3, "items": 4,
                                   "interactions": 5},
               "candidate": {"variant": "text"},
               "results": {"pop": {"hr@10": m(0.2), "ndcg@10": m(0.1), "fit_s": m(0.0)},
                           "text": {"hr@10": m(0.5), "ndcg@10": m(0.3125, 0.0205),
                                    "fit_s": m(2.0),
                                    "slices": {"head items": {"ndcg@10": m(0.4)},
                                               "tail items": {"ndcg@10": m(0.05)}}}}}
    curves = {"text seed 0": [{"epoch": 1, "loss": 0.7, "valid": 0.2},
                              {"epoch": 2, "loss": 0.5, "valid": 0.3}]}
    checks = [{"name": "catalog", "severity": "ERROR", "passed": True,
               "description": "all expectations met", "failures": []},
              {"name": "drift", "severity": "WARN", "passed": False,
               "description": "volume changed", "failures": [{}, {}]}]
    written = write_report(results, tmp_path / "r", curves=curves, checks=checks, run_id="r1")
    page = Path(written["report"]["html"]).read_text()
    assert "no decision recorded" in page and "run r1" in page
    assert re.search(r"<td>text</td><td>tail items</td><td>ndcg@10</td>"
                     r"<td class='num'>0\.0500 ± 0\.0100</td>", page)
    assert "<td class='warn'>warning</td><td class='num'>2</td>" in page
    gate = {"decision": "hold", "reason": "improvement 0.0025 is below the margin 0.01",
            "candidate_version": 7, "production_version": 3,
            "compared": {"primary_metric": "ndcg@10", "candidate": {"ndcg@10": 0.3125},
                         "production": {"ndcg@10": 0.31}, "production_version": 3,
                         "improvement": 0.0025, "min_improvement": 0.01,
                         "baselines": {"pop": 0.1}}}
    page = add_gate(tmp_path / "r", gate).read_text()
    assert "Promotion gate: HOLD" in page and gate["reason"] in page
    assert "<td>production before</td><td>3</td><td class='num'>0.3100</td>" in page
    assert "<td class='num'>+0.0025</td>" in page
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["gate"] == gate and data["curves"] == curves
    assert [c["failed_expectations"] for c in data["checks"]] == [0, 2]
