"""The metadata store's tables (SQLAlchemy 2.x declarative), in one module.

Every table of the store is declared here on one `Base`, so the embedding cache, the dataset
snapshots and the model registry sit side by side in one database and one schema
version. `SCHEMA_VERSION` counts the schema's revisions; `store.py` creates and migrates.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (Boolean, DateTime, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2   # 2: model_versions.bento_tag, model_versions.dvc_json


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row per applied schema revision: the store refuses a database newer than its code."""

    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Encoder(Base):
    """An encoder identity: model name, weights hash, precision, preprocessing version.

    `key` is a hash of the canonical identity JSON; cache entries refer to it, so changing any
    part of the identity (other weights, another max_length) starts a fresh set of entries.
    """

    __tablename__ = "encoders"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))           # text | image
    name: Mapped[str] = mapped_column(String(256))
    identity_json: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    preprocessing_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """One cached vector: (encoder, content hash) → float32 bytes.

    Keyed by the hash of what was encoded (the composed text, the image file's bytes), not by
    item id: an item whose text changes gets a new entry, two items with the same poster share
    one. `present` is False for content that could not be decoded (a corrupt image), so it is
    not retried until its bytes change.
    """

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("encoder_key", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    encoder_key: Mapped[str] = mapped_column(ForeignKey("encoders.key", ondelete="CASCADE"),
                                             index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# -- the model registry ----------------------------------------------------------------------
# Dataset snapshots, model versions, promotion events and run failures: what the orchestration
# records so a person can answer "which data trained the production model, and why was it
# promoted?" from the store alone. Functions over these tables live in `registry.py`.


class DatasetSnapshot(Base):
    """One ingested raw snapshot and its validation outcome.

    `status`: pending (ingested, not validated), rejected (an ERROR check failed) or accepted
    (checks passed and the validated dataset was built). `profile_json` is the data_checks
    profile of an accepted snapshot: the next snapshot's drift check compares against it.
    """

    __tablename__ = "dataset_snapshots"

    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    n_users: Mapped[int] = mapped_column(Integer)
    n_items: Mapped[int] = mapped_column(Integer)
    n_interactions: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    validation_json: Mapped[str] = mapped_column(Text, default="{}")
    profile_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelVersion(Base):
    """A trained candidate: what it was trained on and with, where it lies, how it scored.

    `artifact_sha256` identifies the artifact's content: registering the same artifact twice
    returns the existing version. `stage`: candidate | production | archived; at most one
    version is in production at a time (enforced by `registry.promote`).
    """

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    artifact_path: Mapped[str] = mapped_column(Text)
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    dataset_hash: Mapped[str] = mapped_column(String(64), index=True)
    code_version: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    metrics_json: Mapped[str] = mapped_column(Text)
    protocol_json: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(16), default="candidate", index=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The BentoML model-store tag this version was packaged as (bentos/packaging.py).
    bento_tag: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # The DVC content hashes of the data and model it was versioned with (versioning).
    dvc_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class PromotionEvent(Base):
    """One gate decision: promote, hold or forced, with the metrics it compared."""

    __tablename__ = "promotion_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    production_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"),
                                                      nullable=True)
    decision: Mapped[str] = mapped_column(String(16))      # promote | hold | forced
    reason: Mapped[str] = mapped_column(Text)
    compared_json: Mapped[str] = mapped_column(Text, default="{}")
    forced_by: Mapped[str | None] = mapped_column(String(256), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunFailure(Base):
    """A failed orchestration run, recorded by the run-failure sensor (once per run id)."""

    __tablename__ = "run_failures"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_name: Mapped[str] = mapped_column(String(256))
    message: Mapped[str] = mapped_column(Text)
    failed_steps_json: Mapped[str] = mapped_column(Text, default="[]")
    tags_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
