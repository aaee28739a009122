"""The service's runtime settings: one object, read from ``ARTALIGN_*`` environment variables.

Nested groups use ``__``: ``ARTALIGN_LIMITS__MAX_BODY_BYTES=10000000``. Lists are JSON:
``ARTALIGN_API_KEYS='["k1","k2"]'``. Model hyperparameters are not here: they live in the
checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseModel):
    """What one request may ask of the service."""

    max_body_bytes: int = Field(20_000_000, ge=1024, description="largest request body accepted")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest image (width x height) decoded"
    )
    max_query_chars: int = Field(200, ge=1, description="longest search query")
    max_inflight: int = Field(
        16, ge=1,
        description="inference calls admitted at once (running or waiting for a thread); "
        "more get 503 + Retry-After",
    )
    inference_threads: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1), ge=1,
        description="inference calls running at once; PyTorch already spreads one call over "
        "the cores, so more threads than cores only adds contention",
    )
    torch_threads: int = Field(
        0, ge=0, description="threads PyTorch spreads one inference call over; 0 keeps "
        "PyTorch's default (one per core)"
    )
    max_batch_items: int = Field(500, ge=1, description="artworks in one POST /artworks/batch")


class Retrieval(BaseModel):
    """The two-stage search: FAISS candidates, then the cross-attention rerank."""

    candidates: int | None = Field(
        None, ge=1, le=10_000,
        description="K: candidates reranked by SCAN; unset, K follows the index size as "
        "measured (index.vectors.candidates_for: 100 below 300k vectors, then more, since "
        "near-ties among pooled vectors multiply with the collection; docs/SCALING.md)",
    )
    memory_budget: ByteSize = Field(
        ByteSize(4 << 30), gt=0,
        description="memory the fragment index may take (bytes, or '4GiB', '512MB'): the "
        "index kind follows it and the collection size — exact below 50,000 vectors, then the "
        "most precise of IVF-Flat, IVF-SQ8 (8-bit codes) and IVF-PQ that fits "
        "(index.vectors.plan_index; docs/SCALING.md has the measured trade-offs)",
    )
    fold_iou: float = Field(
        0.7, gt=0, le=1, description="fragments of one artwork whose boxes overlap by this IoU "
        "or more fold into the best-scoring one (one result per thing); 1 folds only equal boxes"
    )
    attribute_words: bool = Field(
        True, description="label fragments with the detector's attribute words (gold · bird); "
        "turn off when the detector learnt its words on another kind of collection than the "
        "one served (the real demo's detector learnt icon labels: saint, aura, christ)",
    )
    facet_fields: list[str] = Field(
        default_factory=lambda: ["classification", "period", "date", "source"],
        description="metadata fields counted as facets (GET /facets) unless a request names others",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ARTALIGN_", env_nested_delimiter="__", extra="ignore",
        # an error must never echo a key or a database password into a log
        hide_input_in_errors=True,
    )

    database_url: str = "sqlite:///var/artalign.db"
    data_dir: Path = Path("var")
    scan_checkpoint: Path = Path("demo/scan.pt")
    detector_checkpoint: Path = Path("demo/detector.pt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted in the X-API-Key header for writes; none means writes are refused",
    )
    cors_origins: list[str] = Field(default_factory=list)
    public_url: str = Field(
        "", description="prefix of the URLs in responses (e.g. https://museum.example/api); "
        "empty means paths relative to the service root"
    )
    limits: Limits = Field(default_factory=Limits)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    index_dir: Path | None = Field(
        None, description="where the index snapshots live (default DATA_DIR/index); a replica "
        "on its own machine may keep its own while it reads the shared feature store"
    )
    index_sync_seconds: float = Field(
        1.0, ge=0, description="how often to apply the changes other processes (another "
        "instance, `artalign ingest`) committed to the database's change log; a replica is "
        "never further behind than this plus the time to apply them; 0 never"
    )
    index_snapshots: bool = Field(
        True, description="save snapshots of the indexes (a start loads one and replays the "
        "change log past it); turn off on a replica that shares its index folder with a "
        "writer, which saves them (two savers stay safe, but write twice)"
    )
    index_snapshot_seconds: float = Field(
        30.0, gt=0, description="save a snapshot once the oldest change not in one is this "
        "old; the change log covers the rest, so a crash loses nothing"
    )
    index_snapshot_changes: int = Field(
        1000, ge=1, description="save a snapshot as soon as this many changes are not in one "
        "(bounds the replay at the next start)"
    )
    index_log_keep: int = Field(
        100_000, ge=0, description="changes of the log kept behind the newest snapshot: after "
        "each snapshot the service deletes older ones, so the log stops growing; a process "
        "whose indexes are further behind than that (a replica stopped for long, an old "
        "snapshot) rebuilds them from the database instead of replaying; 0 never prunes"
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        from app.db.session import check_database_url

        return check_database_url(url)

    @field_validator("data_dir", "index_dir", "scan_checkpoint", "detector_checkpoint")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # Stored image locations are paths under data_dir: absolute, they survive a change of
        # working directory between `artalign demo` and a later `artalign serve`.
        return path.expanduser().resolve() if path is not None else None

    @field_validator("api_keys")
    @classmethod
    def _nonempty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for position, key in enumerate(keys):
            if len(key.get_secret_value()) < 8:
                raise ValueError(f"api_keys[{position}]: a key needs at least 8 characters")
        return keys

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        self.limits.inference_threads = min(self.limits.inference_threads, self.limits.max_inflight)
        return self

    def api_key_hashes(self) -> frozenset[str]:
        """sha256 of every configured key: the plain keys are not kept beyond startup."""
        return frozenset(hash_api_key(key.get_secret_value()) for key in self.api_keys)

    def check_files(self) -> None:
        """Fail at startup, naming the file, rather than on the first request."""
        for name in ("scan_checkpoint", "detector_checkpoint"):
            path: Path = getattr(self, name)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{name} {path}: no such file (set ARTALIGN_{name.upper()} to a checkpoint)"
                )


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
