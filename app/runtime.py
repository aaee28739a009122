"""What the service loads once at startup and every request shares: :class:`Runtime`.

Its own module, so that the routes (which receive it) and app.main (which builds it) both
import it without importing each other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine as DatabaseEngine
from sqlalchemy.orm import Session, sessionmaker

from app.api.inference import InferencePool
from app.api.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.services.retrieval import Engine  # pulls in torch


@dataclass
class Runtime:
    """Everything loaded once at startup and shared by every request."""

    settings: Settings
    database: DatabaseEngine
    sessions: sessionmaker[Session]
    engine: Engine
    pool: InferencePool
    metrics: Metrics
    key_hashes: frozenset[str]
    # Ingest, replace, delete and curation append to the feature store and update the
    # indexes: one writer at a time keeps the store's manifest and the indexes consistent.
    write_lock: threading.Lock

    def candidates(self, index: str) -> int:
        """K, the candidates the SCAN rerank scores from the index ``index``: the setting,
        or when unset the measured size rule (index.vectors.candidates_for)."""
        from index.vectors import candidates_for

        return self.settings.retrieval.candidates or candidates_for(len(self.engine.indexes[index]))

    def url(self, path: str) -> str:
        """A URL for a path of this service, as clients should follow it."""
        return self.settings.public_url.rstrip("/") + path
