"""The text -> fragments search's working parts, behind :meth:`Engine.search_text
<app.services.retrieval.Engine.search_text>`: the first stage (FAISS, restricted by the
filters), the rerank of a whole block of candidates and its fold (:mod:`index.folding`),
and the hits of a page with what the model saw in them (:mod:`app.services.explain`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from app.db.models import Artwork, Fragment, Region
from app.services.explain import attribute_words, word_attention
from app.services.filters import ArtworkFilter, fragment_ids
from app.services.hits import FragmentHit
from app.services.indexes import Indexes, end_read
from app.services.query import combine
from index.featurestore import FeatureStore
from index.folding import Folded, fold, rank
from models.encoder import Encoder, pooled_numpy, stored_region_sets

if TYPE_CHECKING:
    from models.regions import RegionExtractor


class FragmentSearch:
    """The engine's fragment-search steps (the engine holds what they read)."""

    indexes: Indexes
    encoder: Encoder
    store: FeatureStore
    extractor: RegionExtractor | None
    attribute_detector: RegionExtractor | None

    def _ranked_fragments(
        self, session: Session, text: torch.Tensor, text_lens: torch.Tensor, *, k: int, need: int,
        filters: ArtworkFilter | None, fold_iou: float, timings: dict[str, float] | None,
    ) -> tuple[list[Row], torch.Tensor, list[Folded], np.ndarray, torch.Tensor, torch.Tensor]:
        """A whole block of ``k`` candidates per phrase of the query (text: (p, w, d)): rows,
        combined cross-attention scores, folded ranking, boxes' own raw features (n, D_raw) and
        encoded region sets. A block that folds to fewer than ``need`` grows by ``k`` while
        the index has more."""
        block = k
        while True:
            with timed(timings, "stage1"):
                found = self._fragment_candidates(session, pooled_numpy(text, text_lens), k, filters)
            if not found:
                return [], torch.empty(0), [], np.empty(0), torch.empty(0), torch.empty(0)
            with timed(timings, "rerank"):
                raw, raw_lens = stored_region_sets(self.store, [r.region_rows for r in found])
                images, image_lens = self.encoder.region_sets(raw, raw_lens)  # (n, r, d)
                per_phrase = self.encoder.model.similarity(images, image_lens, text, text_lens)  # (n, p)
                scores = combine(per_phrase).float().cpu()
                kept = fold([(r.x1, r.y1, r.x2, r.y2) for r in found], [r.artwork_id for r in found],
                            rank(scores.numpy(), [r.id for r in found]), fold_iou)
            if len(kept) >= need or len(found) < k:
                return found, scores, kept, raw[:, 0].numpy(), images, image_lens
            k += block

    def _fragment_candidates(self, session: Session, query_vectors: np.ndarray, k: int,
                             filters: ArtworkFilter | None) -> list[Row]:
        """The first stage: the union of the top ``k`` fragments of each phrase's pooled
        vector (p, d), as database rows."""
        allowed = fragment_ids(session, filters) if filters else None
        if allowed is not None and not len(allowed):
            return []
        _, found = self.indexes["fragments"].search(query_vectors, k, allowed_ids=allowed)  # (p, k)
        # each phrase's nearest first, then each one's second, ...; -1 pads a short answer
        candidates = [i for i in dict.fromkeys(found.T.reshape(-1).tolist()) if i >= 0]
        rows = {r.id: r for r in session.execute(
            select(Fragment.id, Fragment.artwork_id, Fragment.x1, Fragment.y1, Fragment.x2,
                   Fragment.y2, Fragment.source, Fragment.region_rows)
            .where(Fragment.id.in_(candidates))
        )}
        # A fragment deleted since FAISS answered has no row: it drops out here.
        return [rows[i] for i in candidates if i in rows]

    def _fragment_hits(
        self, session: Session, rows: list[Row], scores: list[float], also: list[list[int]],
        own: np.ndarray, images: torch.Tensor, image_lens: torch.Tensor, texts: torch.Tensor,
        tokens: list[list[str]],
    ) -> list[FragmentHit]:
        """Hits with their attention and attribute words: texts (p, w, d) are the query's
        phrases, tokens their words; also the fragments folded into each; own the boxes' raw
        features."""
        artwork_ids = {r.artwork_id for r in rows}
        artworks = {a.id: a for a in session.scalars(select(Artwork).where(Artwork.id.in_(artwork_ids)))}
        needed = {row for r in rows for row in r.region_rows}  # columns, not objects: it is hot
        boxes = {(artwork_id, row): box for artwork_id, row, *box in session.execute(
            select(Region.artwork_id, Region.store_row, Region.x1, Region.y1, Region.x2, Region.y2)
            .where(Region.artwork_id.in_(artwork_ids), Region.store_row.in_(needed)))}
        attributes = attribute_words(self.attribute_detector, own)
        hits = []
        for row, score, folded, seen, image, n_regions in zip(
                rows, scores, also, attributes, images, image_lens.tolist(), strict=True):
            region_boxes = [boxes[(row.artwork_id, store_row)] for store_row in row.region_rows]
            artwork = artworks[row.artwork_id]
            hits.append(FragmentHit(
                fragment_id=row.id, artwork_id=artwork.id, external_id=artwork.external_id,
                title=artwork.title, box=(row.x1, row.y1, row.x2, row.y2), source=row.source,
                score=score, width=artwork.width, height=artwork.height,
                attention=word_attention(image[:n_regions], texts, tokens, region_boxes,
                                         self.encoder.model.config.word_attention_lambda),
                also=folded, attributes=seen,
            ))
        end_read(session)
        return hits


def check_page(k: int, limit: int, offset: int) -> None:
    if k < 1 or limit < 1 or offset < 0:
        raise ValueError(f"need k >= 1, limit >= 1 and offset >= 0, got k={k}, limit={limit}, "
                         f"offset={offset}")


@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
