"""DVC for real: the pipeline in dvc.yaml, push/pull, experiments, and the versions Dagster
pushes after each promotion, restored by registry id or git revision.

Each test works in a temporary git repository made from this checkout's DVC files and code
(what a clean clone has), with a tiny demo in its params.yaml, the real `dvc` and `git`
executables, a real SQLite registry and real Dagster runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bonmf_core.ops import registry
from bonmf_core.config import load_config
from bonmf_core.store.database import Store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"data": {"demo_users": 150, "demo_items": 200},
        "encoders": {"source": "basic"},
        "train": {"epochs": 2, "batch_size": 512, "lr": 0.01, "patience": 3, "refit": False},
        "bpr": {"epochs": 1, "refit": False},
        "protocol": {"seeds": [0]},
        "promotion": {"floors": {}},
        "pipeline": {"candidates": ["id", "text+image"], "baselines": ["pop"]}}
CODE_DEPS = ("bonmf_core", "data_checks", "bentos", "orchestration")   # dvc.yaml's code dependencies
STAGES = ("snapshot", "validate", "encode", "train", "evaluate", "package")


def make_project(root: Path, params: dict) -> Path:
    """A git repo holding this checkout's DVC setup, code and a tiny params.yaml, committed."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc",
                    ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in CODE_DEPS:
        shutil.copytree(REPO / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "params.yaml").write_text(yaml.safe_dump(params.dump(), sort_keys=False))
    git(root, "init", "-q")
    git(root, "config", "user.email", "tests@bonmf.invalid")
    git(root, "config", "user.name", "bonmf tests")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


def env(root: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "BONMF_STATE_DIR": str(root / ".bonmf"), "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / ".bonmf" / "site"),
            "BENTOML_HOME": str(root / ".bonmf" / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env(root),
                          capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def bonmf(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bonmf"), *args], cwd=root, env=env(root),
                          capture_output=True, text=True)


def tree_digest(path: Path) -> dict[str, str]:
    """relative file name → sha256, for byte-for-byte comparisons of folders."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


# -- the pipeline: dvc repro, push / pull, experiments ------------------------------------------

@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("dvc") / "repo", load_config(flags=TINY, use_default_file=False))
    started = time.perf_counter()
    done = dvc(root, "repro", *STAGES)
    print(f"dvc repro (cold): {time.perf_counter() - started:.1f} s")
    return root, done


def test_repro_runs_every_stage_and_a_second_repro_does_nothing(reproduced):
    root, first = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    assert lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 2
    summary = json.loads((root / "reports" / "summary.json").read_text())
    candidate = summary["candidate"]
    assert candidate["variant"] in ("id", "text+image") and 0 < candidate["ndcg@10"] <= 1
    assert set(summary["variants"]) == {"pop", "id", "text+image"}
    curve = json.loads((root / "reports" / "training_curve.json").read_text())
    assert [r["epoch"] for r in curve] == [1, 2] and all(r["valid"] > 0 for r in curve)
    assert (root / "reports" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "artifacts" / "model" / "model.safetensors").exists()
    bento = json.loads((root / "artifacts" / "bento" / "bento.json").read_text())
    archive = root / "artifacts" / "bento" / Path(bento["archive"]).name
    assert archive.exists() and archive.stat().st_size == bento["archive_bytes"]
    # The snapshot is self-contained: pictures inside, referenced relative to the repo root.
    items = __import__("pandas").read_parquet(root / "artifacts/snapshot/items.parquet")
    assert items["image_path"].str.startswith("artifacts/snapshot/images/").all()
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["reports/summary.json"]["data"]
    assert metrics["candidate"]["ndcg@10"] == pytest.approx(candidate["ndcg@10"])
    # `dvc plots show` draws the report's curves: the same epochs, the same picture.
    report = json.loads((root / "reports" / "report.json").read_text())
    assert list(report["curves"].values()) == [curve]
    assert "<h2>Training curves</h2>" in (root / "reports" / "report.html").read_text()
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)["data"]
    assert {"reports/metrics.png", "reports/training_curves.png"} <= set(plots)
    for name, field in (("validation metric by epoch", "valid"), ("training loss by epoch",
                                                                  "loss")):
        drawn = plots[name][0]["content"]["data"]["values"]
        assert [v["epoch"] for v in drawn] == [r["epoch"] for r in curve]
        assert [v[field] for v in drawn] == pytest.approx([r[field] for r in curve])

    before = (root / "dvc.lock").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "artifacts").rglob("*") if p.is_file()}
    started = time.perf_counter()
    second = dvc(root, "repro", *STAGES)
    print(f"dvc repro (unchanged): {time.perf_counter() - started:.1f} s")
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    assert (root / "dvc.lock").read_text() == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    assert dvc(root, "status", "--json", *STAGES).stdout.strip() == "{}"


def test_push_delete_pull_is_byte_identical(reproduced):
    root, _ = reproduced
    tracked = [root / "artifacts" / n for n in ("snapshot", "dataset", "features", "model",
                                                 "bento", "fits.json")]
    before = {str(p): tree_digest(p) for p in tracked}
    started = time.perf_counter()
    dvc(root, "push", *STAGES)
    pushed = time.perf_counter() - started
    remote = root / ".bonmf" / "dvc-remote"     # the default remote from .dvc/config
    assert len(list(remote.rglob("*.dir"))) == 5   # the five tracked folders

    for p in tracked:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    started = time.perf_counter()
    dvc(root, "pull", *STAGES)
    print(f"dvc push: {pushed:.1f} s, dvc pull: {time.perf_counter() - started:.1f} s")
    assert {str(p): tree_digest(p) for p in tracked} == before
    assert "Running stage" not in dvc(root, "repro", *STAGES).stdout


def test_exp_run_set_param_changes_the_metrics(reproduced):
    root, _ = reproduced
    summary_before = (root / "reports" / "summary.json").read_text()
    started = time.perf_counter()
    done = dvc(root, "exp", "run", "-S", "train.epochs=4", "evaluate")
    print(f"dvc exp run -S train.epochs=4: {time.perf_counter() - started:.1f} s")
    assert "Running stage 'train'" in done.stdout and "Running stage 'snapshot'" not in done.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"] == 4
    curve = json.loads((root / "reports" / "training_curve.json").read_text())
    assert [r["epoch"] for r in curve] == [1, 2, 3, 4]
    assert (root / "reports" / "summary.json").read_text() != summary_before
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    assert shown   # the experiment is recorded
    # Bad params fail naming the key, and nothing runs.
    bad = dvc(root, "exp", "run", "-S", "train.epochz=1", "evaluate", check=False)
    assert bad.returncode != 0


# -- versions pushed after promotion, and restoring them ------------------------------------------

@pytest.fixture(scope="module")
def promoted_twice(tmp_path_factory):
    """Two Dagster runs in a DVC repo: version 1 promoted, then version 2 (forced)."""
    from orchestration.main import run_pipeline

    root = make_project(tmp_path_factory.mktemp("dvc-promoted") / "repo",
                        load_config(flags=TINY, use_default_file=False))
    state = root / ".bonmf"
    saved = {k: os.environ.get(k) for k in ("BONMF_STATE_DIR", "DAGSTER_HOME",
                                            "DVC_SITE_CACHE_DIR")}
    try:
        runs = []
        # Version 2 trains at another rate: with early stopping, more epochs alone may keep
        # version 1's best epoch and so its very weights (one shared object in the remote).
        for epochs, lr, force in ((2, 0.01, False), (3, 0.02, True)):
            train = {**TINY["train"], "epochs": epochs, "lr": lr}
            params = load_config(flags={**TINY, "train": train}, use_default_file=False)
            s = run_pipeline(params, state=state, force=force, forced_by="tests" if force
                             else None, log_level="WARNING")
            assert s["success"], s.get("error")
            assert s["decision"]["decision"] in ("promote", "forced")
            print(f"versioned_artifacts step: {s['steps']['versioned_artifacts']:.1f} s")
            runs.append(s)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return root, state, runs


def _models(state: Path) -> list[dict]:
    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        return registry.list_models(store)
    finally:
        store.dispose()


def test_each_promotion_is_pushed_committed_and_recorded(promoted_twice, monkeypatch):
    root, state, runs = promoted_twice
    v1, v2 = _models(state)
    assert v2["stage"] == "production" and v1["stage"] == "archived"
    for version in (v1, v2):
        dvc_info = version["dvc"]
        assert set(dvc_info) >= {"dataset", "model", "git_rev", "remote"}
        assert dvc_info["model"]["md5"].endswith(".dir") and dvc_info["dataset"]["nfiles"] > 3
        # The commit holds exactly these hashes.
        pointer = yaml.safe_load(git(root, "show", f"{dvc_info['git_rev']}:promoted/model.dvc"))
        assert pointer["outs"][0]["md5"] == dvc_info["model"]["md5"]
        assert Path(dvc_info["remote"]["url"]) == state / "dvc-remote"
    assert v1["dvc"]["git_rev"] != v2["dvc"]["git_rev"]
    assert v1["dvc"]["dataset"]["md5"] == v2["dvc"]["dataset"]["md5"]  # same data, one object
    assert v1["dvc"]["model"]["md5"] != v2["dvc"]["model"]["md5"]
    # The commits went to the registry branch, one tag per version; the branch checked out
    # (main, holding no pointer files) did not move.
    assert git(root, "log", "--format=%s", "-1").strip() == "project"
    log = git(root, "log", "--format=%s", "bonmf/registry")
    assert "bonmf: model version 1" in log and "bonmf: model version 2" in log
    for version in (v1, v2):
        assert version["dvc"]["git_branch"] == "bonmf/registry"
        assert version["dvc"]["git_tag"] == f"model@v{version['id']}"
        assert git(root, "rev-parse", f"model@v{version['id']}^{{commit}}").strip() == \
            version["dvc"]["git_rev"]
    assert git(root, "rev-parse", "bonmf/registry").strip() == v2["dvc"]["git_rev"]
    assert _committed_pointers(root, "bonmf/registry") == _workspace_pointers(root)
    # The workspace copy is the production model; the dataset is complete (pictures inside).
    assert tree_digest(root / "promoted" / "model")["model/model.safetensors"] == \
        tree_digest(state / "production" / "model")["model/model.safetensors"]
    from bonmf_core.data.dataset import Dataset
    monkeypatch.chdir(root)   # image paths are relative to the workspace, images hashed by bytes
    dataset = Dataset.load(root / "promoted" / "dataset")
    assert dataset.content_hash() == v2["dataset_hash"]
    assert all((root / p).is_file() for p in dataset.items["image_path"])
    # The asset's metadata carries the same hashes.
    import dagster as dg
    os.environ["DAGSTER_HOME"] = str(state / "dagster")
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("versioned_artifacts"))
        meta = event.asset_materialization.metadata
        assert meta["model_md5"].value == v2["dvc"]["model"]["md5"]
        assert meta["git_rev"].value == v2["dvc"]["git_rev"]


def test_restore_an_older_version_by_id_and_by_revision(promoted_twice):
    root, state, _ = promoted_twice
    v1, v2 = _models(state)
    v1_model = yaml.safe_load(git(root, "show", f"{v1['dvc']['git_rev']}:promoted/model.dvc"))
    started = time.perf_counter()
    done = bonmf(root, "restore", "--version", "1")
    print(f"bonmf restore --version 1: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr
    assert json.loads((root / "promoted" / "model" / "registry.json").read_text())[
        "model_version"] == 1
    restored = yaml.safe_load((root / "promoted" / "model.dvc").read_text())["outs"][0]
    assert restored["md5"] == v1_model["outs"][0]["md5"] == v1["dvc"]["model"]["md5"]
    assert dvc(root, "status", "--json", "promoted/model.dvc",
               "promoted/dataset.dvc").stdout.strip() == "{}"
    assert not list((root / "promoted").glob(".restore-*"))

    # Back to version 2 by its git revision: byte-identical to what was pushed.
    done = bonmf(root, "restore", "--rev", v2["dvc"]["git_rev"])
    assert done.returncode == 0, done.stderr
    v2_digest = tree_digest(root / "promoted" / "model")
    assert json.loads((root / "promoted" / "model" / "registry.json").read_text())[
        "model_version"] == 2
    assert v2_digest["model/model.safetensors"] == \
        tree_digest(state / "production" / "model")["model/model.safetensors"]
    assert _workspace_pointers(root) == _committed_pointers(root, v2["dvc"]["git_rev"])
    # A version tag is a revision too.
    done = bonmf(root, "restore", "--rev", "model@v1")
    assert done.returncode == 0, done.stderr
    assert _workspace_pointers(root) == _committed_pointers(root, "model@v1")

    unknown = bonmf(root, "restore", "--rev", "no-such-rev")
    assert unknown.returncode == 1 and "no-such-rev" in unknown.stderr
    never = bonmf(root, "restore", "--version", "99")
    assert never.returncode == 1 and "99 is not registered" in never.stderr


def test_restore_fails_cleanly_when_the_remote_lacks_data(promoted_twice):
    root, state, _ = promoted_twice
    v1 = _models(state)[0]
    before = tree_digest(root / "promoted")
    # One file of version 1's model vanishes from the remote (local cache alike: another
    # machine would not have it either).
    listing = json.loads(_object(state / "dvc-remote", v1["dvc"]["model"]["md5"]).read_text())
    weights = next(e for e in listing if e["relpath"] == "model.safetensors")
    v2 = _models(state)[1]
    listing2 = json.loads(_object(state / "dvc-remote", v2["dvc"]["model"]["md5"]).read_text())
    assert weights["md5"] not in {e["md5"] for e in listing2}   # version 2 keeps its own
    for store_root in (state / "dvc-remote", root / ".dvc" / "cache"):
        obj = _object(store_root, weights["md5"])
        if obj.exists():
            obj.chmod(0o644)
            obj.unlink()
    done = bonmf(root, "restore", "--version", "1")
    assert done.returncode == 1
    assert "lacks 1 of its objects" in done.stderr and "model.safetensors" in done.stderr
    assert "Nothing was changed" in done.stderr
    assert tree_digest(root / "promoted") == before
    assert not list((root / "promoted").glob(".restore-*"))


def test_corrupted_cache_object_is_detected_and_changes_nothing(promoted_twice):
    root, state, _ = promoted_twice
    v2 = _models(state)[1]
    assert bonmf(root, "restore", "--version", "2").returncode == 0
    before = tree_digest(root / "promoted")
    listing = json.loads(_object(root / ".dvc" / "cache", v2["dvc"]["model"]["md5"]).read_text())
    config = next(e for e in listing if e["relpath"] == "config.json")
    obj = _object(root / ".dvc" / "cache", config["md5"])
    stat = obj.stat()
    obj.chmod(0o644)

    # Bit rot: same size, same mtime, so DVC's own bookkeeping trusts the object; the
    # restore's hash check does not.
    data = bytearray(obj.read_bytes())
    data[0] ^= 0x01
    obj.write_bytes(bytes(data))
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done = bonmf(root, "restore", "--version", "2")
    assert done.returncode == 1 and "corrupted" in done.stderr and "config.json" in done.stderr
    assert tree_digest(root / "promoted") == before
    assert not list((root / "promoted").glob(".restore-*"))
    # The bad object was dropped: the next restore fetches a good copy from the remote.
    done = bonmf(root, "restore", "--version", "2")
    assert done.returncode == 0, done.stderr
    assert tree_digest(root / "promoted") == before

    # A visibly edited object (new mtime): DVC notices it and fetches the remote's copy.
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes() + b" ")
    done = bonmf(root, "restore", "--version", "2")
    assert done.returncode == 0, done.stderr
    assert tree_digest(root / "promoted") == before


def _workspace_pointers(root: Path) -> dict[str, str]:
    return {n: (root / "promoted" / f"{n}.dvc").read_text() for n in ("dataset", "model")}


def _committed_pointers(root: Path, rev: str) -> dict[str, str]:
    return {n: git(root, "show", f"{rev}:promoted/{n}.dvc") for n in ("dataset", "model")}


def _object(store_root: Path, md5: str) -> Path:
    digest = md5.removesuffix(".dir")
    return Path(store_root) / "files" / "md5" / digest[:2] / (digest[2:] + (
        ".dir" if md5.endswith(".dir") else ""))


def test_promotion_commit_works_without_a_git_identity(tmp_path, monkeypatch):
    """A fresh machine has no user.name/email: the pointer-file commit must still land."""
    from bonmf_core.ops.versioning import _commit

    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "model.dvc").write_text("outs: []\n")
    (repo / "unrelated.txt").write_text("staged, not committed\n")
    git(repo, "add", "unrelated.txt")
    rev = _commit(repo, ["model.dvc"], "bonmf: model version 1 promoted")
    log = git(repo, "log", "--format=%an <%ae>|%s", "-1").strip()
    assert log == "bonmf <bonmf@localhost>|bonmf: model version 1 promoted" and len(rev) == 40
    assert git(repo, "diff", "--cached", "--name-only").split() == ["unrelated.txt"]


def _git_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "code.py").write_text("print('work')\n")
    git(path, "add", "code.py")
    git(path, "-c", "user.name=you", "-c", "user.email=you@example.invalid", "commit", "-q",
        "-m", "work")
    return path


def test_registry_branch_and_tags_leave_the_checkout_alone(tmp_path, monkeypatch):
    """Default: commits to `bonmf/registry` through a private index, an annotated tag per
    version; HEAD, the index and the working tree (staged and unstaged changes) stay as they
    were. Also without a git identity."""
    from bonmf_core.config import DvcConfig
    from bonmf_core.ops.versioning import record_in_git

    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = _git_repo(tmp_path / "repo")
    (repo / "code.py").write_text("print('unstaged edit')\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    head, index = git(repo, "rev-parse", "HEAD").strip(), git(repo, "write-tree").strip()
    status = git(repo, "status", "--porcelain")
    settings = DvcConfig()
    assert (settings.git_branch, settings.git_tag) == ("bonmf/registry", "model@v{version}")

    revs = []
    for version, content in ((1, "outs: [v1]\n"), (2, "outs: [v2]\n"), (3, "outs: [v2]\n")):
        (repo / "model.dvc").write_text(content)
        got = record_in_git(repo, settings, ["model.dvc"], f"bonmf: model version {version}",
                            version)
        assert got["git_branch"] == "bonmf/registry" and got["git_tag"] == f"model@v{version}"
        revs.append(got["git_rev"])
        assert git(repo, "rev-parse", "bonmf/registry").strip() == got["git_rev"]
        assert git(repo, "show", f"model@v{version}:model.dvc") == content
        assert git(repo, "cat-file", "-t", f"model@v{version}").strip() == "tag"
    assert revs[2] == revs[1]            # nothing changed: no empty commit, the tag added
    assert git(repo, "rev-parse", f"{revs[0]}^").strip() == head   # starts at your commit
    assert git(repo, "rev-parse", f"{revs[1]}^").strip() == revs[0]
    assert git(repo, "log", "-1", "--format=%an", "bonmf/registry").strip() == "bonmf"
    assert sorted(git(repo, "ls-tree", "--name-only", "bonmf/registry").split()) == \
        ["code.py", "model.dvc"]         # your committed tree + the pointer, not your edits
    assert git(repo, "show", "bonmf/registry:code.py") == "print('work')\n"
    assert git(repo, "rev-parse", "HEAD").strip() == head
    assert git(repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert git(repo, "write-tree").strip() == index
    assert [l for l in git(repo, "status", "--porcelain").splitlines()
            if l != "?? model.dvc"] == status.splitlines()


def test_registry_branch_null_commits_on_the_current_branch(tmp_path):
    """`dvc.git_branch: null, dvc.git_tag: null`: what bonmf did before."""
    from bonmf_core.config import DvcConfig
    from bonmf_core.ops.versioning import record_in_git

    repo = _git_repo(tmp_path / "repo")
    git(repo, "config", "user.email", "tests@bonmf.invalid")
    git(repo, "config", "user.name", "bonmf tests")
    (repo / "model.dvc").write_text("outs: []\n")
    got = record_in_git(repo, DvcConfig(git_branch=None, git_tag=None), ["model.dvc"],
                        "bonmf: model version 1 promoted", 1)
    assert got == {"git_rev": git(repo, "rev-parse", "HEAD").strip(), "git_branch": "main",
                   "git_tag": None}
    assert git(repo, "log", "-1", "--format=%s").strip() == "bonmf: model version 1 promoted"
    assert git(repo, "status", "--porcelain").strip() == ""
    assert git(repo, "tag").strip() == "" and "bonmf/registry" not in git(repo, "branch")
