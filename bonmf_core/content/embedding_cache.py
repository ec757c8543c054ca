"""Embedding cache in the metadata store, keyed by (encoder identity, content hash).

Writers insert with ON CONFLICT DO NOTHING and commit in chunks: two processes encoding the
same catalog both succeed and store each vector once, and a run killed midway keeps every
chunk it committed (each row is complete or absent), so the next run resumes from there.
"""

from __future__ import annotations

import json

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bonmf_core.hashing import sha256_json
from bonmf_core.store.schema import Embedding, Encoder
from bonmf_core.store.database import Store

_READ_CHUNK = 900  # stays under SQLite's bound-parameter limit with room to spare


def encoder_key(identity: dict) -> str:
    """A stable hash of the canonical identity JSON."""
    return sha256_json(identity)[:32]


def _insert(store: Store):
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif store.dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # other backends: plain insert; duplicates are filtered before writing
        from sqlalchemy import insert
    return insert


class EmbeddingCache:
    def __init__(self, store: Store):
        self.store = store

    def register(self, identity: dict, dim: int, preprocessing: dict | None = None) -> str:
        """Record an encoder (idempotent, also against a concurrent writer) and return its key."""
        try:
            return self._register(identity, dim, preprocessing)
        except IntegrityError:   # another process inserted the same encoder first: now it exists
            return self._register(identity, dim, preprocessing)

    def _register(self, identity: dict, dim: int, preprocessing: dict | None) -> str:
        key = encoder_key(identity)
        with self.store.session() as s:
            row = s.get(Encoder, key)
            if row is None:
                s.add(Encoder(key=key, kind=identity.get("kind", ""), name=identity.get("name", ""),
                              identity_json=json.dumps(identity, sort_keys=True), dim=dim,
                              preprocessing_json=json.dumps(preprocessing or {}, sort_keys=True)))
            elif preprocessing and row.preprocessing_json == "{}":
                row.preprocessing_json = json.dumps(preprocessing, sort_keys=True)
        return key

    def encoder(self, identity: dict) -> dict | None:
        """{dim, preprocessing} of a known encoder, or None."""
        with self.store.session() as s:
            row = s.get(Encoder, encoder_key(identity))
            if row is None:
                return None
            return {"dim": row.dim, "preprocessing": json.loads(row.preprocessing_json)}

    def get_many(self, key: str, hashes) -> dict[str, tuple[np.ndarray, bool]]:
        """{content hash: (vector, present)} for the hashes that are cached."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, tuple[np.ndarray, bool]] = {}
        with self.store.session() as s:
            for start in range(0, len(wanted), _READ_CHUNK):
                chunk = wanted[start:start + _READ_CHUNK]
                rows = s.execute(select(Embedding.content_hash, Embedding.vector, Embedding.present)
                                 .where(Embedding.encoder_key == key,
                                        Embedding.content_hash.in_(chunk)))
                for content_hash, blob, present in rows:
                    found[content_hash] = (np.frombuffer(blob, np.float32), bool(present))
        return found

    def put_many(self, key: str, hashes, vectors: np.ndarray, present=None) -> int:
        """Store vectors (one transaction); existing (encoder, hash) rows are kept as they are."""
        present = np.ones(len(hashes), bool) if present is None else np.asarray(present, bool)
        rows = [{"encoder_key": key, "content_hash": h, "present": bool(p),
                 "vector": np.ascontiguousarray(v, np.float32).tobytes()}
                for h, v, p in zip(hashes, vectors, present)]
        # One row per hash, in hash order: concurrent writers of overlapping keys then wait on
        # each other's rows in the same order and never deadlock (PostgreSQL row locks).
        rows = sorted({r["content_hash"]: r for r in rows}.values(),
                      key=lambda r: r["content_hash"])
        if not rows:
            return 0
        insert = _insert(self.store)
        with self.store.session() as s:
            if self.store.dialect in ("sqlite", "postgresql"):
                s.execute(insert(Embedding).on_conflict_do_nothing(
                    index_elements=["encoder_key", "content_hash"]), rows)
            else:
                have = set(self.get_many(key, [r["content_hash"] for r in rows]))
                rows = [r for r in rows if r["content_hash"] not in have]
                if rows:
                    s.execute(insert(Embedding), rows)
        return len(rows)

    def count(self, key: str | None = None) -> int:
        with self.store.session() as s:
            q = select(func.count()).select_from(Embedding)
            if key is not None:
                q = q.where(Embedding.encoder_key == key)
            return int(s.scalar(q))
