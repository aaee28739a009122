"""The retrieval engine: what a search or an annotation needs, loaded once (the encoder, the
indexes, the feature store, the region extractor), and the two queries, text -> fragments
and image -> phrases.

Two stages: the pooled vector of the query (the normalised mean of its word or region
vectors) finds the top-K candidates in FAISS; full stacked cross attention
(:func:`models.scan.xattn_similarity`, through ``SCAN.similarity``) rescores those K, and
the best ``limit`` come back with their metadata (:mod:`app.services.hits`). With K at least
the number of indexed items the result is exactly the exhaustive cross-attention ranking
(ties by id). The indexes' lifecycle is :mod:`app.services.indexes`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from sqlalchemy import Engine as DatabaseEngine
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from app.db.models import Artwork, ArtworkPhrase, Fragment, Phrase, Region
from app.services.artwork_regions import box_member_rows
from app.services.explain import attribute_words, word_attention
from app.services.filters import ArtworkFilter, fragment_ids
from app.services.hits import ArtworkRef, FragmentHit, PhraseHit
from app.services.indexes import Indexes, end_read
from app.services.uploads import decode_upload
from index.featurestore import FeatureStore
from index.folding import FOLD_IOU, Folded, fold, rank
from index.fragments import GIVEN
from models.encoder import Encoder, pooled_numpy, stored_region_sets, words

if TYPE_CHECKING:
    from models.regions import RegionExtractor

MAX_ARTWORKS_PER_PHRASE = 20  # a common phrase describes thousands; a hit lists the first few


class Engine:
    """Everything a search needs, loaded once; safe to share between request threads."""

    def __init__(self, *, indexes: Indexes, extractor: RegionExtractor | None = None,
                 image_dir: str | Path | None = None) -> None:
        self.indexes = indexes
        self.encoder: Encoder = indexes.encoder
        self.store: FeatureStore = indexes.store
        self.extractor = extractor
        self.image_dir = Path(image_dir) if image_dir is not None else None

    @property
    def model_version(self) -> str:
        return self.indexes.model_version

    @classmethod
    def load(
        cls, *, database: DatabaseEngine, scan_checkpoint: str | Path,
        detector_checkpoint: str | Path | None, data_dir: str | Path, device: str = "auto",
        rebuild: bool = False,
    ) -> Engine:
        """Load the checkpoints and the feature store under ``data_dir``, then the indexes
        (rebuilt when stale, or always with ``rebuild``)."""
        from app.db.session import session_factory
        from models.checkpoint import resolve_device
        from models.regions import RegionExtractor
        from models.scan import load_scan

        device = resolve_device(device)
        model, vocab, checkpoint = load_scan(scan_checkpoint, device=device)
        extractor = (RegionExtractor.from_checkpoint(detector_checkpoint, device=device)
                     if detector_checkpoint is not None else None)
        data_dir = Path(data_dir)
        store = FeatureStore(data_dir / "features",
                             extractor=extractor.version if extractor is not None else None)
        indexes = Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256,
                          store=store, index_dir=data_dir / "index")
        with session_factory(database)() as session:
            indexes.start(session, rebuild=rebuild)
        return cls(indexes=indexes, extractor=extractor, image_dir=data_dir / "images")

    # -- text -> fragments ----------------------------------------------------------------

    def search_text(
        self, session: Session, query: str, *, k: int = 100, limit: int = 10, offset: int = 0,
        filters: ArtworkFilter | None = None, fold_iou: float = FOLD_IOU,
        timings: dict[str, float] | None = None,
    ) -> list[FragmentHit]:
        """Fragments that show ``query``, best first: FAISS top-``k`` by pooled vectors, then
        cross-attention rerank; ``filters`` keep the artworks they match. Fragments of one
        artwork overlapping by ``fold_iou`` fold into the best (its hit lists them in ``also``)."""
        from collection.phrases import normalise_phrase

        _check_page(k, limit, offset)
        normalised = normalise_phrase(query)
        tokens = words(normalised)
        if not tokens:
            raise ValueError(f"query {query!r} has no words to search for")
        with _timed(timings, "encode"):
            text, text_lens = self.encoder.texts([normalised])  # (1, w, d), one vector per token
        found, scores, kept, own, images, image_lens = self._ranked_fragments(
            session, text, text_lens, k=k, need=min(offset + limit, k), filters=filters,
            fold_iou=fold_iou, timings=timings)
        if not found:
            end_read(session)
            return []
        with _timed(timings, "rerank"):
            page = kept[offset: offset + limit]
            at = [f.position for f in page]
            return self._fragment_hits(session, [found[i] for i in at], scores[at].tolist(),
                                       [[found[i].id for i in f.also] for f in page],
                                       own[at], images[at], image_lens[at], text[0], tokens)

    def _ranked_fragments(
        self, session: Session, text: torch.Tensor, text_lens: torch.Tensor, *, k: int, need: int,
        filters: ArtworkFilter | None, fold_iou: float, timings: dict[str, float] | None,
    ) -> tuple[list[Row], torch.Tensor, list[Folded], np.ndarray, torch.Tensor, torch.Tensor]:
        """A whole block of ``k`` candidates: rows, cross-attention scores, folded ranking
        (:mod:`index.folding`), boxes' own raw features (n, D_raw) and encoded region sets. A
        block that folds to fewer than ``need`` grows by ``k`` while the index has more."""
        block = k
        while True:
            with _timed(timings, "stage1"):
                found = self._fragment_candidates(session, pooled_numpy(text, text_lens), k, filters)
            if not found:
                return [], torch.empty(0), [], np.empty(0), torch.empty(0), torch.empty(0)
            with _timed(timings, "rerank"):
                raw, raw_lens = stored_region_sets(self.store, [r.region_rows for r in found])
                images, image_lens = self.encoder.region_sets(raw, raw_lens)  # (n, r, d)
                scores = self.encoder.model.similarity(images, image_lens, text, text_lens)[:, 0].float().cpu()
                kept = fold([(r.x1, r.y1, r.x2, r.y2) for r in found], [r.artwork_id for r in found],
                            rank(scores.numpy(), [r.id for r in found]), fold_iou)
            if len(kept) >= need or len(found) < k:
                return found, scores, kept, raw[:, 0].numpy(), images, image_lens
            k += block

    def _fragment_candidates(self, session: Session, query_vector: np.ndarray, k: int,
                             filters: ArtworkFilter | None) -> list[Row]:
        """The first stage: the top ``k`` fragments by pooled vector, as database rows."""
        allowed = fragment_ids(session, filters) if filters else None
        if allowed is not None and not len(allowed):
            return []
        _, candidates = self.indexes["fragments"].search(query_vector, k, allowed_ids=allowed)
        candidates = candidates[0][candidates[0] >= 0]
        rows = {r.id: r for r in session.execute(
            select(Fragment.id, Fragment.artwork_id, Fragment.x1, Fragment.y1, Fragment.x2,
                   Fragment.y2, Fragment.source, Fragment.region_rows)
            .where(Fragment.id.in_(candidates.tolist()))
        )}
        # A fragment deleted since FAISS answered has no row: it drops out here.
        return [rows[i] for i in candidates.tolist() if i in rows]

    def _fragment_hits(
        self, session: Session, rows: list[Row], scores: list[float], also: list[list[int]],
        own: np.ndarray, images: torch.Tensor, image_lens: torch.Tensor, text: torch.Tensor,
        tokens: list[str],
    ) -> list[FragmentHit]:
        artwork_ids = {r.artwork_id for r in rows}
        artworks = {a.id: a for a in session.scalars(select(Artwork).where(Artwork.id.in_(artwork_ids)))}
        needed = {row for r in rows for row in r.region_rows}  # columns, not objects: it is hot
        boxes = {(artwork_id, row): box for artwork_id, row, *box in session.execute(
            select(Region.artwork_id, Region.store_row, Region.x1, Region.y1, Region.x2, Region.y2)
            .where(Region.artwork_id.in_(artwork_ids), Region.store_row.in_(needed)))}
        attributes = attribute_words(self.extractor, own)
        hits = []
        for row, score, folded, seen, image, n_regions in zip(
                rows, scores, also, attributes, images, image_lens.tolist(), strict=True):
            region_boxes = [boxes[(row.artwork_id, store_row)] for store_row in row.region_rows]
            artwork = artworks[row.artwork_id]
            hits.append(FragmentHit(
                fragment_id=row.id, artwork_id=artwork.id, external_id=artwork.external_id,
                title=artwork.title, box=(row.x1, row.y1, row.x2, row.y2), source=row.source,
                score=score, width=artwork.width, height=artwork.height,
                attention=word_attention(self.encoder.model, image[:n_regions],
                                         text[: len(tokens)], tokens, region_boxes),
                also=folded, attributes=seen,
            ))
        end_read(session)
        return hits

    # -- image -> phrases -----------------------------------------------------------------

    def annotate_regions(
        self, session: Session, features: np.ndarray, *, k: int = 100, limit: int = 10,
        offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases that describe a region set, best first.

        features: (r, D_raw) raw features of the region set, its first row the box itself
        (as :meth:`annotate_box` and :func:`models.regions.crop_region_set` build them).
        """
        _check_page(k, limit, offset)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features):
            raise ValueError(f"region features must be (r, D_raw) with r >= 1, got {features.shape}")
        with _timed(timings, "encode"):
            image, image_lens = self.encoder.features([features])  # (1, r, d)
        with _timed(timings, "stage1"):
            _, candidates = self.indexes["phrases"].search(pooled_numpy(image, image_lens), k)
            candidates = candidates[0][candidates[0] >= 0]
            texts = {phrase_id: text for phrase_id, text in session.execute(
                select(Phrase.id, Phrase.text).where(Phrase.id.in_(candidates.tolist())))}
            found = [(i, texts[i]) for i in candidates.tolist() if i in texts]
        if not found:
            end_read(session)
            return []
        with _timed(timings, "rerank"):
            phrases, phrase_lens = self.encoder.texts([t for _, t in found])
            scores = self.encoder.model.similarity(image, image_lens, phrases, phrase_lens)[0].float().cpu()
            order = sorted(range(len(found)), key=lambda i: (-float(scores[i]), found[i][0]))
            page = order[offset: offset + limit]
        artworks = self._artworks_of_phrases(session, [found[i][0] for i in page])
        return [PhraseHit(found[i][0], found[i][1], float(scores[i]), artworks.get(found[i][0], []))
                for i in page]

    def _artworks_of_phrases(self, session: Session, phrase_ids: list[int]) -> dict[int, list[ArtworkRef]]:
        by_phrase: dict[int, list[ArtworkRef]] = {}
        rows = session.execute(
            select(ArtworkPhrase.phrase_id, Artwork.id, Artwork.external_id, Artwork.title)
            .join(Artwork, ArtworkPhrase.artwork_id == Artwork.id)
            .where(ArtworkPhrase.phrase_id.in_(phrase_ids)).order_by(Artwork.id)
        )
        for phrase_id, artwork_id, external_id, title in rows:
            refs = by_phrase.setdefault(phrase_id, [])
            if len(refs) < MAX_ARTWORKS_PER_PHRASE:
                refs.append(ArtworkRef(artwork_id, external_id, title))
        end_read(session)
        return by_phrase

    def annotate_box(
        self, session: Session, artwork_id: int, box: Sequence[float], *, k: int = 100,
        limit: int = 10, offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases for a box on a stored artwork: the box's own pooled feature, then the
        artwork's extracted regions lying mostly inside it (a fragment, as in the index)."""
        from collection.images import load_image

        artwork = session.get(Artwork, artwork_id)
        if artwork is None:
            raise LookupError(f"artwork {artwork_id} does not exist")
        box_array = np.asarray(box, dtype=np.float32).reshape(-1)
        x1, y1, x2, y2 = box_array.tolist() if box_array.size == 4 else (0, 0, -1, -1)
        if not (0 <= x1 < x2 <= artwork.width and 0 <= y1 < y2 <= artwork.height):
            raise ValueError(f"box {list(box)} must satisfy 0 <= x1 < x2 <= {artwork.width} and "
                             f"0 <= y1 < y2 <= {artwork.height} (artwork {artwork_id}'s size)")
        extractor = self._extractor("annotate_box")
        with _timed(timings, "extract"):
            image = load_image(artwork.image_location, name=f"artwork {artwork_id}'s image")
            own = extractor.pool(image, box_array[None], kind=GIVEN).features  # (1, D_raw)
        members = self.store.features(np.array(box_member_rows(artwork, box_array), dtype=np.int64))
        features = np.concatenate([np.asarray(own, dtype=np.float32), members])  # (r, D_raw)
        end_read(session)
        return self.annotate_regions(session, features, k=k, limit=limit, offset=offset, timings=timings)

    def annotate_upload(
        self, session: Session, image_bytes: bytes, *, max_pixels: int | None = None,
        k: int = 100, limit: int = 10, offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases for an uploaded crop's file (decoded as every upload is)."""
        with _timed(timings, "decode"):
            crop = decode_upload(image_bytes, name="uploaded image", max_pixels=max_pixels)
        return self.annotate_image(session, crop, k=k, limit=limit, offset=offset, timings=timings)

    def annotate_image(
        self, session: Session, crop: Image.Image, *, k: int = 100, limit: int = 10,
        offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases for a crop: the region set of its fragment, then as above."""
        from models.regions import crop_region_set

        extractor = self._extractor("annotate_image")
        with _timed(timings, "extract"):
            features = crop_region_set(extractor, crop)
        return self.annotate_regions(session, features, k=k, limit=limit, offset=offset, timings=timings)

    def _extractor(self, what: str) -> RegionExtractor:
        if self.extractor is None:
            raise RuntimeError(f"this engine has no region extractor: {what} needs one")
        return self.extractor


def _check_page(k: int, limit: int, offset: int) -> None:
    if k < 1 or limit < 1 or offset < 0:
        raise ValueError(f"need k >= 1, limit >= 1 and offset >= 0, got k={k}, limit={limit}, "
                         f"offset={offset}")


@contextmanager
def _timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
