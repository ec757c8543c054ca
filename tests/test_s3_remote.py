"""DVC's remote on real S3-compatible object storage: SeaweedFS on loopback (tests/s3_server.py).

A tiny `bonmf run` in a git + DVC repo promotes version 1 and pushes it to
`s3://<bucket>/dvc` through dvc-s3; the endpoint comes from `$BONMF_DVC_ENDPOINT_URL` and the
key pair from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY only. Then the local DVC cache is
wiped (and, separately, a fresh clone made) and `bonmf restore` must bring back the same bytes
from the bucket alone. Wrong or missing credentials, a missing bucket and an empty prefix are
each one clear `error:` line that changes nothing. No mocks: every request is real HTTP to the
server, which the module starts once and always stops.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import s3_server
from bonmf_core.config import DvcConfig
from bonmf_core.ops import registry, versioning
from bonmf_core.store.database import Store
from orchestration import cli

BIN = Path(sys.executable).parent
TINY_RUN = ["run", "--variants", "pop,id", "--encoders", "basic", "--epochs", "1", "-q",
            "--set", "promotion.floors={}", "--set", "data.demo_users=150",
            "--set", "data.demo_items=200", "--set", "train.refit=false",
            "--set", "promotion.beat_baselines=false"]
PREFIX = "dvc"                       # the remote is s3://<bucket>/dvc


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def _digest(folder: Path) -> dict[str, str]:
    """relative path → sha256 of every file under `folder` (byte-for-byte comparisons)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bonmf(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`bonmf` as another process (another machine's view: no in-process S3 client caches)."""
    return subprocess.run([str(BIN / "bonmf"), *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


def _in_process(repo: Path, env: dict, *argv: str) -> int:
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(repo)
    os.environ.clear()
    os.environ.update(env)
    try:
        return cli.main(list(argv))
    finally:   # run_pipeline sets DAGSTER_HOME & co.: leave the process as it was
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def _new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    (path / ".gitignore").write_text(".bonmf/\n")
    _git(path, "add", ".")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc init")
    return path


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server.running(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def promoted(s3, tmp_path_factory):
    """Version 1 promoted by a real `bonmf run` and pushed to the bucket."""
    repo = _new_repo(tmp_path_factory.mktemp("s3-project") / "repo")
    state = repo / ".bonmf"
    env = s3.env(BONMF_STATE_DIR=str(state), BONMF_DVC_REMOTE=f"s3://{s3.bucket}/{PREFIX}",
                 BONMF_DVC_ENDPOINT_URL=s3.endpoint, OMP_NUM_THREADS="1",
                 DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(state / "dvc-site-cache"))
    assert _in_process(repo, env, *TINY_RUN) == 0
    store = Store(f"sqlite:///{state / 'bonmf.db'}")
    try:
        versions = registry.list_models(store)
    finally:
        store.dispose()
    assert [v["stage"] for v in versions] == ["production"]
    return repo, state, env, versions[0]


def _expected_keys(repo: Path, version: dict) -> set[str]:
    """The bucket keys DVC must have written: each directory listing and every file in it."""
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    keys = set()
    for name in versioning.ARTIFACTS:
        dir_md5 = version["dvc"][name]["md5"]
        listing = json.loads((cache / dir_md5[:2] / dir_md5[2:]).read_text())
        for md5 in [dir_md5, *(entry["md5"] for entry in listing)]:
            keys.add(f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}")
    return keys


def test_promotion_pushes_every_object_to_the_bucket_and_no_secret_to_disk(promoted, s3):
    repo, state, _, version = promoted
    assert version["dvc"]["remote"]["url"] == f"s3://{s3.bucket}/{PREFIX}"
    expected = _expected_keys(repo, version)
    assert len(expected) > 5 and expected <= s3.keys(f"{PREFIX}/")
    assert not (state / versioning.DEFAULT_REMOTE_DIR).exists()   # nothing went to the folder
    local = (repo / ".dvc" / "config.local").read_text()
    assert f"url = s3://{s3.bucket}/{PREFIX}" in local and f"endpointurl = {s3.endpoint}" in local
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()   # committed: no endpoint
    # The key pair lives in the environment only: no file of the project or its state holds it.
    for path in repo.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert s3.secret_key.encode() not in data and s3.access_key.encode() not in data, path


def test_restore_after_wiping_the_local_cache_is_byte_identical(promoted, s3):
    repo, state, env, version = promoted
    promoted_dir = repo / versioning.PROMOTED
    pushed = _digest(promoted_dir)
    assert "model/model.safetensors" in pushed and any(k.startswith("dataset/") for k in pushed)
    shutil.rmtree(repo / ".dvc" / "cache")
    for name in versioning.ARTIFACTS:
        shutil.rmtree(promoted_dir / name)
    done = _bonmf(repo, env, "restore", "--version", str(version["id"]))
    assert done.returncode == 0, done.stderr
    assert _digest(promoted_dir) == pushed
    assert _digest(promoted_dir / "model") == _digest(state / "production" / "model")
    assert json.loads(done.stdout.strip().splitlines()[-1])["remote"] == \
        f"s3://{s3.bucket}/{PREFIX}"


def test_a_fresh_clone_restores_a_version_tag_from_the_bucket_alone(promoted, s3, tmp_path):
    repo, _, env, version = promoted
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    _git(clone, "fetch", "-q", "origin", "refs/tags/*:refs/tags/*")
    assert not (clone / ".dvc" / "cache").exists() and not (clone / ".dvc" / "config.local").exists()
    clone_env = {**env, "BONMF_STATE_DIR": str(clone / ".bonmf"),
                 "DVC_SITE_CACHE_DIR": str(clone / ".bonmf" / "dvc-site-cache")}
    done = _bonmf(clone, clone_env, "restore", "--rev", f"model@v{version['id']}")
    assert done.returncode == 0, done.stderr
    for name in versioning.ARTIFACTS:
        restored = _digest(clone / versioning.PROMOTED / name)
        assert restored and restored == _digest(repo / versioning.PROMOTED / name)


WRONG_CREDENTIALS = {
    "wrong secret key": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    "unknown access key": {"AWS_ACCESS_KEY_ID": "AKNOSUCHKEY0000000"},
    "no credentials": {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
}


@pytest.mark.parametrize("change", WRONG_CREDENTIALS.values(), ids=WRONG_CREDENTIALS.keys())
def test_wrong_credentials_are_a_clear_error_that_changes_nothing(promoted, s3, change):
    repo, _, env, version = promoted
    promoted_dir = repo / versioning.PROMOTED
    before = _digest(promoted_dir)
    config_before = (repo / ".dvc" / "config.local").read_text()
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)   # it must ask the bucket
    bad_env = {k: v for k, v in {**env, **change}.items() if v is not None}
    done = _bonmf(repo, bad_env, "restore", "--version", str(version["id"]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error:"), done.stderr
    assert "cannot read the remote" in done.stderr and "AWS_SECRET_ACCESS_KEY" in done.stderr
    assert f"s3://{s3.bucket}/{PREFIX}" in done.stderr and "lacks" not in done.stderr
    assert s3.secret_key not in done.stderr
    assert _digest(promoted_dir) == before and not (repo / ".dvc" / "cache").exists()
    assert (repo / ".dvc" / "config.local").read_text() == config_before
    assert not [p for p in promoted_dir.iterdir() if p.name.startswith(".restore-")]


@pytest.mark.parametrize("remote, says", [
    ("s3://no-such-bucket/dvc", "its bucket 'no-such-bucket' does not exist at http://127.0.0.1:"),
    ("s3://{bucket}/not-the-prefix", "holds no DVC objects at all"),
], ids=["missing bucket", "empty prefix"])
def test_a_mistyped_remote_is_named_as_such_and_changes_nothing(promoted, s3, tmp_path, remote,
                                                                 says):
    repo, _, env, version = promoted
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    _git(clone, "fetch", "-q", "origin", "refs/tags/*:refs/tags/*")
    url = remote.format(bucket=s3.bucket)
    clone_env = {**env, "BONMF_STATE_DIR": str(clone / ".bonmf"), "BONMF_DVC_REMOTE": url,
                 "DVC_SITE_CACHE_DIR": str(clone / ".bonmf" / "dvc-site-cache")}
    done = _bonmf(clone, clone_env, "restore", "--rev", f"model@v{version['id']}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error:"), done.stderr
    assert says in done.stderr and url in done.stderr and "Nothing was changed" in done.stderr
    assert not (clone / versioning.PROMOTED).exists()
    assert "no-such-bucket" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_endpoint_follows_configuration_and_a_dropped_one_is_removed(tmp_path, monkeypatch):
    repo, state = _new_repo(tmp_path / "repo"), tmp_path / "state"
    monkeypatch.delenv("BONMF_DVC_ENDPOINT_URL", raising=False)
    config_local = repo / ".dvc" / "config.local"
    s3_settings = DvcConfig(remote="s3://bucket/path", endpoint_url="http://127.0.0.1:9")
    assert versioning.configure_remote(repo, state, s3_settings) == "s3://bucket/path"
    assert "endpointurl = http://127.0.0.1:9" in config_local.read_text()
    monkeypatch.setenv("BONMF_DVC_ENDPOINT_URL", "http://127.0.0.1:10")
    versioning.configure_remote(repo, state, DvcConfig(remote="s3://bucket/path"))
    assert "endpointurl = http://127.0.0.1:10" in config_local.read_text()
    monkeypatch.delenv("BONMF_DVC_ENDPOINT_URL")
    versioning.configure_remote(repo, state, DvcConfig(remote="s3://bucket/path"))
    text = config_local.read_text()
    assert "endpointurl" not in text and "url = s3://bucket/path" in text
