"""Data and model versioning with DVC: track, push and restore the promoted dataset and model.

The DVC workspace is a git repository with `.dvc/` (this project's checkout, or the one named by
the `dvc.repo` param). A promoted model version is copied, with the dataset it was trained on,
into `promoted/model` and `promoted/dataset`; `dvc add` writes their pointer files
(`promoted/*.dvc`, the directories' content hashes), `dvc push` sends the objects to the
remote, and a git commit of only those pointer files ties the hashes to a revision. The
registry keeps the same hashes, so any version is restorable by its id or by that revision.

The commit never moves the branch you work on: by default it goes to `dvc.git_branch`
(`bonmf/registry`), written with git plumbing through a private index, so HEAD, the index and
the working tree stay as they were; an annotated tag (`dvc.git_tag`, `model@v3`) names each
version's commit. `dvc.git_branch: null` commits on the current branch instead.

Every DVC call here:
- runs `python -m dvc` from this interpreter, analytics off, site cache in the state folder;
- holds a file lock in `.dvc/tmp` (one DVC operation per workspace at a time; DVC's own lock
  would make the second fail), and retries while a DVC command started elsewhere holds DVC's.

No Dagster here: the after-promotion asset and `bonmf restore` both call these functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import yaml

from bonmf_core.config import DvcConfig
from bonmf_core.atomic import atomic_dir, swap_dir
from bonmf_core.hashing import md5_file

PROMOTED = "promoted"                  # workspace folder of the versioned artifacts
ARTIFACTS = ("dataset", "model")       # what each promoted version consists of
DEFAULT_REMOTE_DIR = "dvc-remote"      # the out-of-the-box remote: a folder in the state dir
SITE_CACHE_DIR = "dvc-site-cache"
LOCK_FILE = "bonmf-dvc.lock"
DVC_LOCK_BUSY = "Unable to acquire lock"


class VersioningError(RuntimeError):
    """A DVC or git operation that cannot proceed; the message says why and what to do."""


def remote_url(settings: DvcConfig, state: Path) -> str:
    """The remote from configuration: `dvc.remote`, else `BONMF_DVC_REMOTE`, else a folder in
    the state dir (works offline, out of the box)."""
    return settings.remote or os.environ.get("BONMF_DVC_REMOTE") or str(
        Path(state).resolve() / DEFAULT_REMOTE_DIR)


def remote_endpoint(settings: DvcConfig) -> str | None:
    """An s3:// remote's endpoint: `dvc.endpoint_url`, else `BONMF_DVC_ENDPOINT_URL`; None =
    the provider's own (AWS). Credentials stay in the environment (AWS_ACCESS_KEY_ID, …)."""
    return settings.endpoint_url or os.environ.get("BONMF_DVC_ENDPOINT_URL") or None


# -- the workspace ----------------------------------------------------------------------------

def find_repo(settings: DvcConfig, state: Path) -> Path | None:
    """The DVC workspace: `settings.repo`, else the git repository holding the state folder;
    None when there is none (or it has no `.dvc/`)."""
    if settings.repo:
        root = Path(settings.repo).resolve()
        if not (root / ".dvc").is_dir():
            raise VersioningError(f"dvc.repo {root} is not a DVC repository (no .dvc/; run "
                                  f"`dvc init` there)")
        return root
    start = Path(state).resolve()
    while not start.exists():
        start = start.parent
    done = subprocess.run(["git", "-C", str(start), "rev-parse", "--show-toplevel"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    root = Path(done.stdout.strip())
    return root if (root / ".dvc").is_dir() else None


def dvc_env(state: Path) -> dict:
    """Environment for every dvc call: no analytics, no update check, site cache in the state."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(Path(state).resolve() / SITE_CACHE_DIR)}


@contextlib.contextmanager
def workspace_lock(repo: Path, timeout_s: float) -> Iterator[Path]:
    """Hold the workspace's DVC lock file (an flock: released if the process dies)."""
    path = Path(repo) / ".dvc" / "tmp" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VersioningError(f"another DVC operation has held {path} for over "
                                          f"{timeout_s:g} s; try again when it has finished")
                time.sleep(0.2)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dvc(repo: Path, state: Path, *args: str, timeout_s: float = 600.0,
            check: bool = True) -> subprocess.CompletedProcess:
    """`dvc <args>` in `repo` (call it under `workspace_lock`). While a DVC command started
    outside this module holds DVC's own lock, wait and retry until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo,
                              env=dvc_env(state), capture_output=True, text=True)
        if done.returncode != 0 and DVC_LOCK_BUSY in done.stderr and time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        if check and done.returncode != 0:
            raise VersioningError(f"`dvc {' '.join(args)}` failed in {repo}: "
                                  f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done


def run_git(repo: Path, *args: str, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    if check and done.returncode != 0:
        raise VersioningError(f"`git {' '.join(args)}` failed in {repo}: "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done


def configure_remote(repo: Path, state: Path, settings: DvcConfig) -> str:
    """Make the configured remote the workspace's default (in `.dvc/config.local`, which is
    not committed: each clone points at its own storage). → the remote's URL."""
    url, endpoint = remote_url(settings, state), remote_endpoint(settings)
    local = Path(repo) / ".dvc" / "config.local"
    wanted = [f"['remote \"{settings.remote_name}\"']", f"url = {url}",
              f"remote = {settings.remote_name}", *([f"endpointurl = {endpoint}"] if endpoint
                                                   else [])]
    text = local.read_text() if local.exists() else ""
    stale_endpoint = endpoint is None and "endpointurl =" in text
    if stale_endpoint or not all(line in text for line in wanted):
        # --force replaces the whole section, so an endpoint no longer configured goes too.
        run_dvc(repo, state, "remote", "add", "--local", "--force", settings.remote_name, url)
        if endpoint:
            run_dvc(repo, state, "remote", "modify", "--local", settings.remote_name,
                    "endpointurl", endpoint)
        run_dvc(repo, state, "remote", "default", "--local", settings.remote_name)
    return url


# -- pointer files and hashes -----------------------------------------------------------------

def read_pointer(text: str, where: str) -> dict:
    """A `.dvc` file's single output → {md5, size, nfiles}."""
    try:
        out = yaml.safe_load(text)["outs"][0]
        return {"md5": out["md5"], "size": out.get("size"), "nfiles": out.get("nfiles")}
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise VersioningError(f"{where} is not a DVC pointer file ({exc})") from None


def pointer_text(name: str, entry: dict) -> str:
    """The `.dvc` file DVC itself writes for a directory output `name` with these hashes."""
    out = {"md5": entry["md5"], "size": entry.get("size"), "nfiles": entry.get("nfiles"),
           "hash": "md5", "path": name}
    return yaml.safe_dump({"outs": [{k: v for k, v in out.items() if v is not None}]},
                          sort_keys=False)


# -- versioning a promotion -------------------------------------------------------------------

def find_dataset(datasets_root: Path, dataset_hash: str) -> Path:
    """The saved dataset under `datasets_root` whose content hash is `dataset_hash`."""
    from bonmf_core.data.dataset import find_saved_dataset

    try:
        return find_saved_dataset(datasets_root, dataset_hash)
    except FileNotFoundError as exc:
        raise VersioningError(str(exc)) from None


def version_promotion(repo: Path, state: Path, settings: DvcConfig, *, dataset_dir: Path,
                      model_dir: Path, message: str, version: int) -> dict:
    """Track the promoted model version `version` and its dataset with DVC, push them, commit
    the pointer files (see `record_in_git`).

    → the hashes to record: {dataset: {md5, size, nfiles, path}, model: {…}, git_rev,
    git_branch, git_tag, remote}.
    """
    repo, state = Path(repo).resolve(), Path(state).resolve()
    started = time.perf_counter()
    with workspace_lock(repo, settings.lock_timeout_s):
        url = configure_remote(repo, state, settings)
        promoted = repo / PROMOTED
        promoted.mkdir(exist_ok=True)
        _copy_dataset(Path(dataset_dir), promoted / "dataset", f"{PROMOTED}/dataset")
        with atomic_dir(promoted / "model") as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        targets = [f"{PROMOTED}/{name}" for name in ARTIFACTS]
        run_dvc(repo, state, "add", *targets)
        pointers = [f"{t}.dvc" for t in targets]
        run_dvc(repo, state, "push", "-r", settings.remote_name, *pointers)
        git = record_in_git(repo, settings, [*pointers, f"{PROMOTED}/.gitignore"], message,
                            version) if settings.git_commit else {"git_rev": None}
    hashes = {name: {**read_pointer((promoted / f"{name}.dvc").read_text(), name),
                     "path": f"{PROMOTED}/{name}"} for name in ARTIFACTS}
    return {**hashes, **git, "remote": {"name": settings.remote_name, "url": url},
            "seconds": round(time.perf_counter() - started, 3)}


def _copy_dataset(source: Path, out: Path, refer_as: str) -> None:
    """The dataset with its pictures copied inside and referenced relative to the repo root
    (`refer_as/images/<name>`), so the versioned folder is complete and location-free."""
    from bonmf_core.data.dataset import Dataset
    from bonmf_core.ops.stages import copy_images

    dataset = Dataset.load(source)
    with atomic_dir(out) as tmp:
        items = copy_images(dataset.items, tmp / "images")
        items["image_path"] = [p if not isinstance(p, str) or not p else
                               f"{refer_as}/images/{Path(p).name}" for p in items["image_path"]]
        dataset.items = items
        dataset.save(tmp / "data")
        for file in (tmp / "data").iterdir():
            file.replace(tmp / file.name)
        (tmp / "data").rmdir()


def _identity(repo: Path) -> list[str]:
    """`-c user.name/email` for a machine without a git identity (a fresh CI runner or
    container), so the promotion commit does not fail there; a configured identity wins."""
    if run_git(repo, "config", "user.email", check=False).stdout.strip():
        return []
    return ["-c", "user.name=bonmf", "-c", "user.email=bonmf@localhost"]


def record_in_git(repo: Path, settings: DvcConfig, files: list[str], message: str,
                  version: int) -> dict:
    """Commit `files` where configuration says (`dvc.git_branch`, else the current branch) and
    tag the commit (`dvc.git_tag`) → {git_rev, git_branch, git_tag}."""
    current = run_git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False
                      ).stdout.strip() or None
    branch = settings.git_branch
    if branch is None or branch == current:
        # Checked out on the registry branch itself: a plain commit keeps the work tree in step.
        rev, branch = _commit(repo, files, message), current
    else:
        rev = commit_to_branch(repo, branch, files, message)
    tag = settings.git_tag.format(version=version) if settings.git_tag else None
    if tag:
        _tag(repo, tag, rev, message)
    return {"git_rev": rev, "git_branch": branch, "git_tag": tag}


def commit_to_branch(repo: Path, branch: str, files: list[str], message: str) -> str:
    """Commit the working-tree contents of `files` onto `branch` without checking it out →
    the revision.

    Plumbing through a private index file (read-tree, hash-object, update-index, write-tree,
    commit-tree, update-ref): the checkout's HEAD, index and working tree are never touched.
    A new branch starts at the current commit, so checking it out gives the whole project
    with these pointer files. Nothing changed since the branch's tip: no new commit.
    """
    ref = f"refs/heads/{branch}"
    if run_git(repo, "check-ref-format", ref, check=False).returncode:
        raise VersioningError(f"dvc.git_branch {branch!r} is not a valid git branch name")
    tip = _resolve(repo, ref)
    parent = tip or _resolve(repo, "HEAD")
    with tempfile.TemporaryDirectory(prefix="bonmf-index-") as tmp:
        index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        run_git(repo, "read-tree", *([parent] if parent else ["--empty"]), env=index)
        for name in files:
            blob = run_git(repo, "hash-object", "-w", "--", name).stdout.strip()
            run_git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}",
                    env=index)
        tree = run_git(repo, "write-tree", env=index).stdout.strip()
    if tip and tree == _resolve(repo, f"{tip}^{{tree}}"):
        return tip
    rev = run_git(repo, *_identity(repo), "commit-tree", tree,
                  *(["-p", parent] if parent else []), "-m", message).stdout.strip()
    # Compare-and-swap on the old tip: a concurrent writer makes this fail, never lose a commit.
    run_git(repo, "update-ref", "-m", message, ref, rev, tip or "0" * 40)
    return rev


def _resolve(repo: Path, rev: str) -> str | None:
    done = run_git(repo, "rev-parse", "--verify", "--quiet", rev, check=False)
    return done.stdout.strip() or None


def _tag(repo: Path, tag: str, rev: str, message: str) -> None:
    """An annotated tag `tag` on `rev`. A tag left by an earlier registry (ids restart when
    the store is recreated) is moved: the registry in use is what names versions."""
    if run_git(repo, "check-ref-format", f"refs/tags/{tag}", check=False).returncode:
        raise VersioningError(f"dvc.git_tag gives {tag!r}, not a valid git tag name")
    if _resolve(repo, f"refs/tags/{tag}^{{commit}}") == rev:
        return
    run_git(repo, *_identity(repo), "tag", "-f", "-a", "-m", message, tag, rev)


def _commit(repo: Path, files: list[str], message: str) -> str:
    """Commit exactly `files` (whatever else is staged stays staged) → the revision."""
    run_git(repo, "add", "--", *files)
    if run_git(repo, "diff", "--cached", "--quiet", "--", *files, check=False).returncode:
        run_git(repo, *_identity(repo), "commit", "-q", "-m", message, "--", *files)
    return run_git(repo, "rev-parse", "HEAD").stdout.strip()


# -- restoring --------------------------------------------------------------------------------

def hashes_at_rev(repo: Path, rev: str) -> dict:
    """The promoted artifacts' hashes as committed at git revision `rev`."""
    if run_git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
               check=False).returncode:
        raise VersioningError(f"git revision {rev!r} does not exist in {repo}")
    out = {}
    for name in ARTIFACTS:
        where = f"{rev}:{PROMOTED}/{name}.dvc"
        shown = run_git(repo, "show", where, check=False)
        if shown.returncode:
            raise VersioningError(f"revision {rev} has no {PROMOTED}/{name}.dvc: no promoted "
                                  f"version was committed there")
        out[name] = {**read_pointer(shown.stdout, where), "path": f"{PROMOTED}/{name}"}
    return out


def hashes_of_version(store, version_id: int) -> dict:
    """The hashes the registry recorded for model version `version_id`."""
    from bonmf_core.ops import registry

    row = registry.get_model(store, int(version_id))
    if row is None:
        raise VersioningError(f"model version {version_id} is not registered")
    dvc = row.get("dvc") or {}
    if not all(name in dvc for name in ARTIFACTS):
        raise VersioningError(f"model version {version_id} has no DVC hashes: it was never "
                              f"pushed (only promoted versions are, when "
                              f"dvc.push_after_promotion is on)")
    return {name: dvc[name] for name in ARTIFACTS}


def missing_in_remote(repo: Path, state: Path, settings: DvcConfig, hashes: dict
                      ) -> list[str]:
    """Every object of `hashes` (directory listings and their files) the remote lacks.

    Asks the remote itself for each object: `dvc status -c` trusts a directory's listing
    and DVC's index of what it pushed, so it misses files deleted from the remote later.
    """
    from dvc.repo import Repo

    missing = []
    with Repo(str(repo), config={"core": {"site_cache_dir": dvc_env(state)[
            "DVC_SITE_CACHE_DIR"]}}) as dvc_repo:
        odb = dvc_repo.cloud.get_remote_odb(settings.remote_name, hash_name="md5")
        _check_readable(odb, settings, state)
        for name, entry in hashes.items():
            oid = entry["md5"]
            if not odb.exists(oid):
                missing.append(f"{name} (directory listing {oid})")
                continue
            listing = json.loads(odb.fs.cat_file(odb.oid_to_path(oid)))
            present = set(odb.oids_exist([e["md5"] for e in listing]))
            missing += [f"{name}/{e['relpath']} ({e['md5']})" for e in listing
                        if e["md5"] not in present]
    return missing


def _check_readable(odb, settings: DvcConfig, state: Path) -> None:
    """`odb.exists` (fsspec's isfile) answers False on any error, so refused credentials
    would read as "the remote lacks every object": ask once in a way that raises. A remote
    with no objects folder at all (a mistyped bucket or path) is named as such too."""
    url = remote_url(settings, state)
    where = f"the remote '{settings.remote_name}' ({url})"
    try:
        present = odb.fs.exists(odb.path)
        bucket = odb.path.split("/", 1)[0] if url.startswith("s3://") else None
        bucket_missing = not present and bucket is not None and not odb.fs.exists(bucket)
    except Exception as exc:   # PermissionError, botocore/network errors: all mean "unreadable"
        raise VersioningError(
            f"cannot read {where}: {type(exc).__name__}: {exc}. Check its URL, "
            f"dvc.endpoint_url and the credentials in the environment (AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY for s3://). Nothing was changed.") from None
    if bucket_missing:
        endpoint = remote_endpoint(settings)
        raise VersioningError(
            f"{where} cannot be read: its bucket '{bucket}' does not exist at "
            f"{endpoint or 'the default S3 endpoint (AWS)'}. Check dvc.remote and "
            f"dvc.endpoint_url / $BONMF_DVC_ENDPOINT_URL. Nothing was changed.")
    if not present:
        raise VersioningError(
            f"{where} holds no DVC objects at all ({odb.path} is "
            f"absent): the remote's URL is wrong, or nothing was ever pushed there. "
            f"Nothing was changed.")


def restore(repo: Path, state: Path, settings: DvcConfig, hashes: dict, label: str) -> dict:
    """Put the artifacts with `hashes` into `promoted/` (data and pointer files), verified.

    Nothing in the workspace changes unless every step succeeds: the remote must hold every
    object; they are fetched into the cache, checked out into a staging folder and verified
    file by file against the directory listings' md5s; only then is each folder swapped in.
    """
    repo, state = Path(repo).resolve(), Path(state).resolve()
    started = time.perf_counter()
    with workspace_lock(repo, settings.lock_timeout_s):
        url = configure_remote(repo, state, settings)
        missing = missing_in_remote(repo, state, settings, hashes)
        if missing:
            raise VersioningError(
                f"cannot restore {label}: the remote '{settings.remote_name}' ({url}) lacks "
                f"{len(missing)} of its objects: {', '.join(missing[:5])}"
                f"{' …' if len(missing) > 5 else ''}. Nothing was changed.")
        promoted = repo / PROMOTED
        promoted.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=promoted))
        try:
            pointers = []
            for name, entry in hashes.items():
                (staging / f"{name}.dvc").write_text(pointer_text(name, entry))
                pointers.append(str((staging / f"{name}.dvc").relative_to(repo)))
            run_dvc(repo, state, "fetch", "-r", settings.remote_name, *pointers)
            run_dvc(repo, state, "checkout", *pointers)
            cache = Path(run_dvc(repo, state, "cache", "dir").stdout.strip())
            for name, entry in hashes.items():
                verify_directory(staging / name, entry["md5"], cache)
            for name in hashes:
                swap_dir(staging / name, promoted / name)
                (staging / f"{name}.dvc").replace(promoted / f"{name}.dvc")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"restored": label, "remote": url, "seconds": round(time.perf_counter() - started, 3),
            **{name: {"md5": e["md5"], "path": f"{PROMOTED}/{name}"} for name, e in
               hashes.items()}}


def verify_directory(folder: Path, dir_md5: str, cache: Path) -> None:
    """`folder` holds exactly the files of DVC directory object `dir_md5`, byte for byte."""
    digest = dir_md5.removesuffix(".dir")
    listing_file = _cache_object(cache, dir_md5)
    if md5_file(listing_file) != digest:
        raise VersioningError(f"the cached listing of {folder.name} ({listing_file}) is "
                              f"corrupted: its md5 is not {digest}")
    expected = {e["relpath"]: e["md5"] for e in json.loads(listing_file.read_text())}
    found = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    if set(found) != set(expected):
        raise VersioningError(f"{folder.name}: files differ from its listing "
                              f"(missing {sorted(set(expected) - set(found))[:5]}, "
                              f"unexpected {sorted(set(found) - set(expected))[:5]})")
    corrupted = [rel for rel, md5 in expected.items() if md5_file(found[rel]) != md5]
    for rel in corrupted:
        # Drop the bad object so the next fetch downloads it from the remote again.
        _cache_object(cache, expected[rel]).unlink(missing_ok=True)
    if corrupted:
        raise VersioningError(
            f"{folder.name}: corrupted cache object(s) for {', '.join(corrupted[:5])} (their "
            f"bytes do not match their md5); dropped from the cache, so restoring again fetches "
            f"them from the remote. Nothing was changed.")


def _cache_object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]
