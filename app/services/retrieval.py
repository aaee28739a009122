"""The retrieval engine: what a search or an annotation needs, loaded once (the encoder, the
indexes, the feature store, the region extractor), and the two queries, text -> fragments
and image -> phrases.

A typed query is first split into the noun phrases it names (:mod:`app.services.query`).
Two stages: the pooled vector of each phrase or of the region set (the normalised mean of its
word or region vectors) finds the top-K candidates in FAISS; full stacked cross attention
(:func:`models.scan.xattn_similarity`, through ``SCAN.similarity``) rescores those K, and
the best ``limit`` come back with their metadata (:mod:`app.services.hits`). With K at least
the number of indexed items the result is exactly the exhaustive cross-attention ranking
(ties by id). The indexes' lifecycle is :mod:`app.services.indexes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from sqlalchemy import Engine as DatabaseEngine
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Artwork, ArtworkPhrase, Phrase
from app.services.artwork_regions import box_member_rows
from app.services.filters import ArtworkFilter
from app.services.fragment_search import FragmentSearch, check_page, timed
from app.services.hits import ArtworkRef, FragmentHit, PhraseHit
from app.services.indexes import Indexes, end_read
from app.services.query import ParsedQuery, parse_query
from app.services.uploads import decode_upload
from index.featurestore import FeatureStore
from index.folding import FOLD_IOU
from index.fragments import GIVEN
from index.vectors import DEFAULT_MEMORY_BUDGET
from models.encoder import Encoder, pooled_numpy

if TYPE_CHECKING:
    from models.regions import RegionExtractor

MAX_ARTWORKS_PER_PHRASE = 20  # a common phrase describes thousands; a hit lists the first few


class Engine(FragmentSearch):
    """Everything a search needs, loaded once; safe to share between request threads."""

    def __init__(self, *, indexes: Indexes, extractor: RegionExtractor | None = None,
                 image_dir: str | Path | None = None, attribute_words: bool = True) -> None:
        self.indexes = indexes
        self.encoder: Encoder = indexes.encoder
        self.store: FeatureStore = indexes.store
        self.extractor = extractor
        self.image_dir = Path(image_dir) if image_dir is not None else None
        # The detector whose attribute head names what a box shows, or None to name nothing
        # (a detector trained on another kind of collection names the wrong things).
        self.attribute_detector = extractor if attribute_words else None

    @property
    def model_version(self) -> str:
        return self.indexes.model_version

    @classmethod
    def load(
        cls, *, database: DatabaseEngine, scan_checkpoint: str | Path,
        detector_checkpoint: str | Path | None, data_dir: str | Path, device: str = "auto",
        rebuild: bool = False, memory_budget: int = DEFAULT_MEMORY_BUDGET,
        attribute_words: bool = True, index_dir: str | Path | None = None, snapshots: bool = True,
    ) -> Engine:
        """Load the checkpoints and the feature store under ``data_dir``, then the indexes
        from their snapshots in ``index_dir`` (default ``data_dir/index``) and the change log
        past them (rebuilt when there is no usable snapshot, or always with ``rebuild``; of
        the kind ``memory_budget`` bytes allow). ``snapshots``: whether this process saves
        them (see :class:`~app.services.indexes.Indexes`)."""
        from app.db.session import session_factory
        from models.checkpoint import CheckpointError, resolve_device
        from models.regions import RegionExtractor
        from models.scan import load_scan

        device = resolve_device(device)
        model, vocab, checkpoint = load_scan(scan_checkpoint, device=device)
        extractor = (RegionExtractor.from_checkpoint(detector_checkpoint, device=device)
                     if detector_checkpoint is not None else None)
        if extractor is not None and extractor.feature_dim != model.config.raw_dim:
            raise CheckpointError(
                f"{scan_checkpoint} reads {model.config.raw_dim}-d region features but "
                f"{detector_checkpoint} extracts {extractor.feature_dim}-d ones: train the SCAN "
                "model on features of this detector (artalign extract, then artalign train)")
        data_dir = Path(data_dir)
        store = FeatureStore(data_dir / "features",
                             extractor=extractor.version if extractor is not None else None)
        indexes = Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256,
                          store=store, index_dir=index_dir or data_dir / "index",
                          memory_budget=memory_budget, snapshots=snapshots)
        with session_factory(database)() as session:
            indexes.start(session, rebuild=rebuild)
        return cls(indexes=indexes, extractor=extractor, image_dir=data_dir / "images",
                   attribute_words=attribute_words)

    # -- text -> fragments ----------------------------------------------------------------

    def parse_query(self, query: str) -> ParsedQuery:
        """The phrases of a typed query that :meth:`search_text` scores, read as the model
        reads text; a ValueError for a query with no words."""
        return parse_query(query, self.encoder.reader)

    def search_text(
        self, session: Session, query: str | ParsedQuery, *, k: int = 100, limit: int = 10,
        offset: int = 0, filters: ArtworkFilter | None = None, fold_iou: float = FOLD_IOU,
        timings: dict[str, float] | None = None,
    ) -> list[FragmentHit]:
        """Fragments that show ``query``, best first. The query is split into its noun
        phrases (:meth:`parse_query`); FAISS returns the top-``k`` fragments of each phrase's
        pooled vector, cross attention scores every candidate against every phrase, and
        :func:`app.services.query.combine` makes one score of them (with one phrase: its
        score). ``filters`` keep the artworks they match. Fragments of one artwork
        overlapping by ``fold_iou`` fold into the best (its hit lists them in ``also``)."""
        check_page(k, limit, offset)
        with timed(timings, "encode"):
            parsed = query if isinstance(query, ParsedQuery) else self.parse_query(query)
            text, text_lens = self.encoder.words(parsed.tokens)  # (p, w, d), a vector per word
        found, scores, kept, own, images, image_lens = self._ranked_fragments(
            session, text, text_lens, k=k, need=min(offset + limit, k), filters=filters,
            fold_iou=fold_iou, timings=timings)
        if not found:
            end_read(session)
            return []
        with timed(timings, "rerank"):
            page = kept[offset: offset + limit]
            at = [f.position for f in page]
            return self._fragment_hits(session, [found[i] for i in at], scores[at].tolist(),
                                       [[found[i].id for i in f.also] for f in page],
                                       own[at], images[at], image_lens[at], text, parsed.tokens)

    # -- image -> phrases -----------------------------------------------------------------

    def annotate_regions(
        self, session: Session, features: np.ndarray, *, k: int = 100, limit: int = 10,
        offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases that describe a region set, best first.

        features: (r, D_raw) raw features of the region set, its first row the box itself
        (as :meth:`annotate_box` and :func:`models.regions.crop_region_set` build them).
        """
        check_page(k, limit, offset)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features):
            raise ValueError(f"region features must be (r, D_raw) with r >= 1, got {features.shape}")
        with timed(timings, "encode"):
            image, image_lens = self.encoder.features([features])  # (1, r, d)
        with timed(timings, "stage1"):
            _, candidates = self.indexes["phrases"].search(pooled_numpy(image, image_lens), k)
            candidates = candidates[0][candidates[0] >= 0]
            texts = {phrase_id: text for phrase_id, text in session.execute(
                select(Phrase.id, Phrase.text).where(Phrase.id.in_(candidates.tolist())))}
            found = [(i, texts[i]) for i in candidates.tolist() if i in texts]
        if not found:
            end_read(session)
            return []
        with timed(timings, "rerank"):
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
        with timed(timings, "extract"):
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
        with timed(timings, "decode"):
            crop = decode_upload(image_bytes, name="uploaded image", max_pixels=max_pixels)
        return self.annotate_image(session, crop, k=k, limit=limit, offset=offset, timings=timings)

    def annotate_image(
        self, session: Session, crop: Image.Image, *, k: int = 100, limit: int = 10,
        offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases for a crop: the region set of its fragment, then as above."""
        from models.regions import crop_region_set

        extractor = self._extractor("annotate_image")
        with timed(timings, "extract"):
            features = crop_region_set(extractor, crop)
        return self.annotate_regions(session, features, k=k, limit=limit, offset=offset, timings=timings)

    def _extractor(self, what: str) -> RegionExtractor:
        if self.extractor is None:
            raise RuntimeError(f"this engine has no region extractor: {what} needs one")
        return self.extractor
