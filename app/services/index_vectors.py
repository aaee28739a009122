"""The vectors the indexes hold: pooled fragment vectors (their region sets' raw features
from the feature store, projected by the model) and pooled phrase vectors, for a few rows
or for every row of the database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Fragment, Phrase
from index.featurestore import FeatureStore

if TYPE_CHECKING:
    from models.encoder import Encoder  # pulls in torch

ENCODE_BATCH = 512  # fragments or phrases encoded per forward pass


def fragment_vectors(encoder: Encoder, store: FeatureStore,
                     region_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """(n, d) pooled vectors of region sets given as feature-store rows."""
    from models.encoder import pooled_numpy

    return pooled_numpy(*encoder.stored(store, region_rows))


def phrase_vectors(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """(n, d) pooled vectors of phrases."""
    from models.encoder import pooled_numpy

    return pooled_numpy(*encoder.texts(texts))


def all_fragment_vectors(session: Session, encoder: Encoder, store: FeatureStore,
                         progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n,) ids and (n, d) vectors of every fragment, by id."""
    from tqdm import tqdm

    total = session.scalar(select(func.count(Fragment.id))) or 0
    ids, vectors = [], []
    query = select(Fragment.id, Fragment.region_rows).order_by(Fragment.id)
    with tqdm(total=total, desc="encode fragments", unit="fragment", disable=not progress) as bar:
        for batch in session.execute(query.execution_options(yield_per=ENCODE_BATCH)).partitions():
            ids.extend(r.id for r in batch)
            vectors.append(fragment_vectors(encoder, store, [r.region_rows for r in batch]))
            bar.update(len(batch))
    return _stack(ids, vectors, encoder.dim)


def all_phrase_vectors(session: Session, encoder: Encoder,
                       progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n,) ids and (n, d) vectors of every phrase, by id."""
    from tqdm import tqdm

    rows = session.execute(select(Phrase.id, Phrase.text).order_by(Phrase.id)).all()
    vectors = [
        phrase_vectors(encoder, [r.text for r in rows[start:start + ENCODE_BATCH]])
        for start in tqdm(range(0, len(rows), ENCODE_BATCH), desc="encode phrases",
                          unit="batch", disable=not progress)
    ]
    return _stack([r.id for r in rows], vectors, encoder.dim)


def _stack(ids: list[int], vectors: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(ids, dtype=np.int64),
            np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))
