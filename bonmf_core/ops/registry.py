"""The model registry: dataset snapshots, model versions, promotion events, run failures.

Plain functions over the store's tables (`schema.py`), each one transaction. They return plain
dicts (not ORM objects) so callers never touch a detached session. Every write is idempotent:
recording the same snapshot, registering the same artifact (by content hash) or repeating the
same gate decision returns what is already there instead of adding a duplicate row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from sqlalchemy import select

from bonmf_core.atomic import atomic_dir
from bonmf_core.store.schema import DatasetSnapshot, ModelVersion, PromotionEvent, RunFailure, utcnow
from bonmf_core.store.database import Store
from bonmf_core.hashing import sha256_tree

CANDIDATE, PRODUCTION, ARCHIVED = "candidate", "production", "archived"


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, default=_default)


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _row(obj) -> dict:
    out = {}
    for column in obj.__table__.columns:
        value = getattr(obj, column.name)
        if column.name.endswith("_json"):
            value = json.loads(value) if value else None
            out[column.name.removesuffix("_json")] = value
        else:
            out[column.name] = value
    return out


# -- helpers used by callers -------------------------------------------------------------------

def code_version(repo: str | Path | None = None) -> str:
    """The git revision of the code (+'-dirty' with local changes), or the package version."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return "bonmf-" + version("bonmf")
        except PackageNotFoundError:
            return "unknown"


# -- dataset snapshots ------------------------------------------------------------------------

def record_snapshot(store: Store, content_hash: str, *, name: str, source: str, path: str,
                    n_users: int, n_items: int, n_interactions: int) -> dict:
    """Record an ingested snapshot (status pending); an existing one is returned unchanged."""
    with store.session() as s:
        row = s.get(DatasetSnapshot, content_hash)
        if row is None:
            row = DatasetSnapshot(content_hash=content_hash, name=name, source=str(source),
                                  path=str(path), n_users=n_users, n_items=n_items,
                                  n_interactions=n_interactions, status="pending")
            s.add(row)
            s.flush()
        return _row(row)


def record_validation(store: Store, content_hash: str, validation: dict, passed: bool,
                      profile: dict | None = None) -> dict:
    """Store a validation outcome. A failed one marks the snapshot rejected; a passed one keeps
    the profile for acceptance (an already accepted snapshot stays accepted)."""
    with store.session() as s:
        row = s.get(DatasetSnapshot, content_hash)
        if row is None:
            raise KeyError(f"snapshot {content_hash} is not recorded")
        row.validation_json = _dumps(validation)
        row.validated_at = utcnow()
        if not passed:
            row.status = "rejected"
        else:
            row.profile_json = _dumps(profile) if profile is not None else row.profile_json
            if row.status != "accepted":
                row.status = "validated"
        return _row(row)


def accept_snapshot(store: Store, content_hash: str) -> dict:
    """Mark a validated snapshot accepted: it becomes the drift baseline for the next one."""
    with store.session() as s:
        row = s.get(DatasetSnapshot, content_hash)
        if row is None:
            raise KeyError(f"snapshot {content_hash} is not recorded")
        if row.status == "rejected":
            raise ValueError(f"snapshot {content_hash} failed its checks; it cannot be accepted")
        if row.status != "accepted":
            row.status, row.accepted_at = "accepted", utcnow()
        return _row(row)


def get_snapshot(store: Store, content_hash: str) -> dict | None:
    with store.session() as s:
        row = s.get(DatasetSnapshot, content_hash)
        return _row(row) if row is not None else None


def last_accepted_snapshot(store: Store, exclude: str | None = None) -> dict | None:
    """The most recently accepted snapshot (other than `exclude`), or None."""
    with store.session() as s:
        q = select(DatasetSnapshot).where(DatasetSnapshot.status == "accepted")
        if exclude:
            q = q.where(DatasetSnapshot.content_hash != exclude)
        row = s.scalars(q.order_by(DatasetSnapshot.accepted_at.desc()).limit(1)).first()
        return _row(row) if row is not None else None


def list_snapshots(store: Store) -> list[dict]:
    with store.session() as s:
        return [_row(r) for r in s.scalars(select(DatasetSnapshot)
                                           .order_by(DatasetSnapshot.created_at))]


# -- model versions ---------------------------------------------------------------------------

def register_model(store: Store, *, artifact_path: str | Path, variant: str, seed: int,
                   dataset_hash: str, config: dict, metrics: dict, protocol: dict,
                   code: str | None = None, artifact_sha256: str | None = None,
                   run_id: str | None = None) -> tuple[dict, bool]:
    """Register a candidate → (version, created). The same artifact content returns the
    existing version (created False), whatever stage it has reached since."""
    sha = artifact_sha256 or sha256_tree(artifact_path)
    with store.session() as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.artifact_sha256 == sha)).first()
        if row is not None:
            return _row(row), False
        row = ModelVersion(artifact_sha256=sha, artifact_path=str(artifact_path), variant=variant,
                           seed=int(seed), dataset_hash=dataset_hash,
                           code_version=code or code_version(), config_json=_dumps(config),
                           metrics_json=_dumps(metrics), protocol_json=_dumps(protocol),
                           stage=CANDIDATE, run_id=run_id)
        s.add(row)
        s.flush()
        return _row(row), True


def get_model(store: Store, version_id: int) -> dict | None:
    with store.session() as s:
        row = s.get(ModelVersion, version_id)
        return _row(row) if row is not None else None


def production_model(store: Store) -> dict | None:
    with store.session() as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.stage == PRODUCTION)).first()
        return _row(row) if row is not None else None


def list_models(store: Store) -> list[dict]:
    with store.session() as s:
        return [_row(r) for r in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]


def _update_model(store: Store, version_id: int, **columns) -> dict:
    with store.session() as s:
        row = s.get(ModelVersion, version_id)
        if row is None:
            raise KeyError(f"model version {version_id} is not registered")
        for name, value in columns.items():
            setattr(row, name, value)
        s.flush()
        return _row(row)


def set_bento_tag(store: Store, version_id: int, tag: str) -> dict:
    """Record the BentoML model tag a version was packaged as."""
    return _update_model(store, version_id, bento_tag=tag)


def record_dvc_hashes(store: Store, version_id: int, hashes: dict) -> dict:
    """Record the DVC content hashes (data, model, git revision) a version was pushed with."""
    return _update_model(store, version_id, dvc_json=_dumps(hashes))


# -- promotion --------------------------------------------------------------------------------

def record_decision(store: Store, candidate_id: int, *, decision: str, reason: str,
                    compared: dict, production_id: int | None = None,
                    forced_by: str | None = None, run_id: str | None = None,
                    production_dir: str | Path | None = None) -> tuple[dict, bool]:
    """Record a gate decision → (event, created); on promote/forced also move the stages
    (previous production → archived) and copy the artifact to `production_dir` atomically.

    Idempotent: when the candidate already is in production, or the latest event for this
    candidate has the same decision against the same production model, nothing is added and
    that event is returned (created False).
    """
    if decision not in ("promote", "hold", "forced"):
        raise ValueError(f"decision must be promote, hold or forced, got {decision!r}")
    promoting = decision in ("promote", "forced")
    with store.session() as s:
        candidate = s.get(ModelVersion, candidate_id)
        if candidate is None:
            raise KeyError(f"model version {candidate_id} is not registered")
        last = s.scalars(select(PromotionEvent).where(PromotionEvent.candidate_id == candidate_id)
                         .order_by(PromotionEvent.id.desc()).limit(1)).first()
        if last is not None and (candidate.stage == PRODUCTION or (
                last.decision == decision and last.production_id == production_id)):
            return _row(last), False
        if promoting and production_dir is not None:
            # Copy first: if the copy fails, nothing in the registry has changed.
            with atomic_dir(production_dir) as tmp:
                shutil.copytree(candidate.artifact_path, tmp, dirs_exist_ok=True)
                (tmp / "registry.json").write_text(json.dumps({
                    "model_version": candidate.id, "artifact_sha256": candidate.artifact_sha256,
                    "variant": candidate.variant, "dataset_hash": candidate.dataset_hash,
                    "code_version": candidate.code_version}, indent=2))
        if promoting:
            for old in s.scalars(select(ModelVersion).where(ModelVersion.stage == PRODUCTION)):
                old.stage = ARCHIVED
            candidate.stage, candidate.promoted_at = PRODUCTION, utcnow()
        event = PromotionEvent(candidate_id=candidate_id, production_id=production_id,
                               decision=decision, reason=reason, compared_json=_dumps(compared),
                               forced_by=forced_by, run_id=run_id)
        s.add(event)
        s.flush()
        return _row(event), True


def list_events(store: Store) -> list[dict]:
    with store.session() as s:
        return [_row(r) for r in s.scalars(select(PromotionEvent).order_by(PromotionEvent.id))]


# -- run failures ----------------------------------------------------------------------------

def record_run_failure(store: Store, run_id: str, *, job_name: str, message: str,
                       failed_steps: list[str] | None = None, tags: dict | None = None
                       ) -> tuple[dict, bool]:
    """Record a failed run once (by run id) → (row, created)."""
    with store.session() as s:
        row = s.get(RunFailure, run_id)
        if row is not None:
            return _row(row), False
        row = RunFailure(run_id=run_id, job_name=job_name, message=message[:20_000],
                         failed_steps_json=_dumps(failed_steps or []), tags_json=_dumps(tags or {}))
        s.add(row)
        s.flush()
        return _row(row), True


def list_run_failures(store: Store) -> list[dict]:
    with store.session() as s:
        return [_row(r) for r in s.scalars(select(RunFailure).order_by(RunFailure.created_at))]


# -- at a glance ------------------------------------------------------------------------------

def latest_event(store: Store) -> dict | None:
    """The most recent gate decision, or None."""
    with store.session() as s:
        row = s.scalars(select(PromotionEvent).order_by(PromotionEvent.id.desc()).limit(1)).first()
        return _row(row) if row is not None else None


def latest_snapshot(store: Store) -> dict | None:
    """The most recently ingested snapshot (with its validation outcome), or None."""
    with store.session() as s:
        row = s.scalars(select(DatasetSnapshot).order_by(DatasetSnapshot.validated_at.desc()
                                                         .nulls_last(),
                                                         DatasetSnapshot.created_at.desc())
                        .limit(1)).first()
        return _row(row) if row is not None else None
