"""The retrieval engine: SCAN, the region extractor, the feature store and two FAISS
indexes (fragments and phrases), loaded once, and the two-stage search both ways.

Two stages: the pooled vector of the query (the normalised mean of its word or region
vectors) finds the top-K candidates in FAISS; full stacked cross attention
(:func:`models.scan.xattn_similarity`, through ``SCAN.similarity``) rescores those K, and
the best ``limit`` come back with their metadata. With K at least the number of indexed
items the result is exactly the exhaustive cross-attention ranking (ties by id).

At start the engine loads each index whose manifest names the current model version and
the current database state, and rebuilds the others from the feature store (raw features
need no image: a new checkpoint only re-projects them). Ingestion tells the engine which
ids changed (:meth:`Engine.apply_change`): the indexes are updated in place and saved, no
rebuild. A rebuild is built beside the serving index and swapped in when complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sqlalchemy import Engine as DatabaseEngine
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Artwork, ArtworkPhrase, Fragment, IndexBuild, Phrase, Region
from app.services.ingest import IndexChange, resolve_device
from app.services.query import ParsedQuery, combine, parse_query
from index.featurestore import FeatureStore
from index.fragments import DEFAULT_MAX_MEMBERS, EXTRACTED, GIVEN, fragments_of, region_set_members
from index.vectors import VectorIndex, VectorIndexError, read_manifest
from models.text import TextReader
from models.vocab import Vocabulary

log = logging.getLogger(__name__)

ENCODE_BATCH = 512  # fragments or phrases encoded per forward pass while building
MAX_ARTWORKS_PER_PHRASE = 20  # a common phrase describes thousands; a hit lists the first few
INDEXES = ("fragments", "phrases")


@dataclass(frozen=True)
class AttendedRegion:
    box: tuple[float, float, float, float]
    weight: float


@dataclass(frozen=True)
class WordAttention:
    """Which of a fragment's regions one query word attended to (weights sum to 1)."""

    word: str
    regions: list[AttendedRegion]


@dataclass(frozen=True)
class FragmentHit:
    fragment_id: int
    artwork_id: int
    external_id: str
    title: str
    box: tuple[float, float, float, float]
    source: str
    score: float
    width: int
    height: int
    attention: list[WordAttention]


@dataclass(frozen=True)
class ArtworkRef:
    id: int
    external_id: str
    title: str


@dataclass(frozen=True)
class PhraseHit:
    phrase_id: int
    phrase: str
    score: float
    artworks: list[ArtworkRef]


def database_state(session: Session) -> dict[str, dict[str, list[int]]]:
    """What the indexes must reflect: (count, max id, id sum) of fragments and of phrases.

    Ids are never reused (see app.db.models), so any insert or delete changes the triple.
    """
    state = {}
    for name, column in (("fragments", Fragment.id), ("phrases", Phrase.id)):
        count, max_id, id_sum = session.execute(
            select(func.count(column), func.max(column), func.sum(column))
        ).one()
        state[name] = [int(count), int(max_id or 0), int(id_sum or 0)]
    end_read(session)
    return state


def end_read(session: Session) -> None:
    """End the session's read-only transaction, so that the next read sees what others have
    committed since (SQLite's WAL and PostgreSQL keep a snapshot per transaction) and no
    connection idles inside a transaction. A session holding unsaved changes is left alone."""
    if not (session.new or session.dirty or session.deleted):
        session.rollback()


class Engine:
    """Everything a search needs, loaded once; safe to share between request threads."""

    def __init__(
        self, *, model: Any, vocab: Vocabulary, model_version: str, store: FeatureStore,
        index_dir: str | Path, extractor: Any = None, image_dir: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.vocab = vocab
        self.reader = TextReader.of(model.config, vocab)  # the text side, as in training
        self.model_version = model_version
        self.store = store
        self.extractor = extractor
        self.index_dir = Path(index_dir)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.device = torch.device(device)
        dim = model.config.embed_dim
        self.indexes: dict[str, VectorIndex] = {name: VectorIndex(dim) for name in INDEXES}
        # the database state each index reflects (see database_state), for sync()
        self.states: dict[str, list[int]] = {}
        self._write_lock = threading.Lock()  # one index writer at a time (updates, rebuilds)

    @classmethod
    def load(
        cls, *, database: DatabaseEngine, scan_checkpoint: str | Path,
        detector_checkpoint: str | Path | None, data_dir: str | Path, device: str = "auto",
        rebuild: bool = False,
    ) -> Engine:
        """Load the checkpoints and the feature store under ``data_dir``, then the indexes
        (rebuilt when stale, or always with ``rebuild``)."""
        from app.db.session import session_factory
        from models.regions import RegionExtractor
        from models.scan import load_scan

        device = resolve_device(device)
        model, vocab, checkpoint = load_scan(scan_checkpoint, device=device)
        extractor = (RegionExtractor.from_checkpoint(detector_checkpoint, device=device)
                     if detector_checkpoint is not None else None)
        data_dir = Path(data_dir)
        store = FeatureStore(data_dir / "features",
                             extractor=extractor.version if extractor is not None else None)
        engine = cls(model=model, vocab=vocab, model_version=checkpoint.sha256, store=store,
                     extractor=extractor, index_dir=data_dir / "index",
                     image_dir=data_dir / "images", device=device)
        with session_factory(database)() as session:
            engine.start(session, rebuild=rebuild)
        return engine

    def fragment_count(self) -> int:
        return len(self.indexes["fragments"])

    def phrase_count(self) -> int:
        return len(self.indexes["phrases"])

    # -- building and updating the indexes ------------------------------------------------

    def start(self, session: Session, *, rebuild: bool = False) -> dict[str, str]:
        """Load each index whose manifest matches the model and the database, else rebuild
        it. Returns what happened per index: "loaded" or "rebuilt"."""
        state = database_state(session)
        stale = []
        outcome = {}
        for name in INDEXES:
            folder = self.index_dir / name
            try:
                manifest = read_manifest(folder)
            except VectorIndexError as exc:
                log.warning("ignoring the %s index: %s", name, exc)
                manifest = None
            reason = ("a rebuild was asked for" if rebuild
                      else "no saved index" if manifest is None
                      else "another model version" if manifest["model_version"] != self.model_version
                      else "the database changed" if manifest["state"] != {name: state[name]}
                      else None)
            if reason is None:
                try:
                    self.indexes[name] = VectorIndex.load(folder)
                    self.states[name] = state[name]
                    outcome[name] = "loaded"
                    log.info("loaded the %s index (%d vectors) from %s", name,
                             len(self.indexes[name]), folder)
                    continue
                except VectorIndexError as exc:
                    reason = str(exc)
            log.info("rebuilding the %s index: %s", name, reason)
            stale.append(name)
        if stale:
            self.rebuild(session, only=stale)
            outcome.update({name: "rebuilt" for name in stale})
        return outcome

    def rebuild(self, session: Session, *, only: Sequence[str] = INDEXES,
                progress: bool = False) -> None:
        """Encode every fragment and phrase again, build new indexes beside the serving ones,
        then swap them in and save them."""
        with self._write_lock:
            build = IndexBuild(model_version=self.model_version, state="building")
            session.add(build)
            session.commit()
            try:
                state = database_state(session)
                built = {}
                for name in only:
                    ids, vectors = (self._all_fragment_vectors(session, progress) if name == "fragments"
                                    else self._all_phrase_vectors(session, progress))
                    built[name] = VectorIndex.build(ids, vectors, dim=self.model.config.embed_dim)
                self.indexes.update(built)  # the swap: searches from now on see the new ones
                self._save(state, only)
            except BaseException:
                session.rollback()
                build.state, build.finished_at = "failed", datetime.now(UTC)
                session.commit()
                raise
            build.state, build.finished_at = "ready", datetime.now(UTC)
            build.fragment_count, build.phrase_count = self.fragment_count(), self.phrase_count()
            session.commit()
        log.info("index build %d: %d fragments, %d phrases", build.id, build.fragment_count,
                 build.phrase_count)

    def apply_change(self, session: Session, change: IndexChange) -> None:
        """Add and drop the vectors of a committed ingest or delete (no rebuild)."""
        with self._write_lock:
            fragments, phrases = self.indexes["fragments"], self.indexes["phrases"]
            fragments.remove(np.asarray(change.removed_fragments, dtype=np.int64))
            phrases.remove(np.asarray(change.removed_phrases, dtype=np.int64))
            if change.added_fragments:
                rows = session.execute(
                    select(Fragment.id, Fragment.region_rows)
                    .where(Fragment.id.in_(change.added_fragments)).order_by(Fragment.id)
                ).all()
                if rows:  # none when a later change already deleted them again
                    fragments.add(np.array([r.id for r in rows], dtype=np.int64),
                                  self._pooled_fragments([r.region_rows for r in rows]))
            if change.added_phrases:
                rows = session.execute(
                    select(Phrase.id, Phrase.text).where(Phrase.id.in_(change.added_phrases))
                    .order_by(Phrase.id)
                ).all()
                if rows:
                    phrases.add(np.array([r.id for r in rows], dtype=np.int64),
                                self._pooled_phrases([r.text for r in rows]))
            self._save(database_state(session))

    def sync(self, session: Session) -> list[str]:
        """Catch up with what another process committed and saved (a writer replica,
        `artalign ingest`): re-read the feature store's manifest and load each saved index
        whose manifest matches this model and the database as it is now. Returns the names
        of the indexes loaded. An index the writer has not saved yet stays as it is; the next
        call tries again."""
        state = database_state(session)
        if all(self.states.get(name) == state[name] for name in INDEXES):
            return []
        loaded = []
        with self._write_lock:
            self.store.refresh()
            for name in INDEXES:
                if self.states.get(name) == state[name]:
                    continue
                folder = self.index_dir / name
                try:
                    manifest = read_manifest(folder)
                    if manifest["model_version"] != self.model_version or manifest["state"] != {name: state[name]}:
                        continue
                    self.indexes[name] = VectorIndex.load(folder)
                except VectorIndexError as exc:  # being replaced by the writer right now
                    log.debug("not loading the %s index yet: %s", name, exc)
                    continue
                self.states[name] = state[name]
                loaded.append(name)
        if loaded:
            log.info("loaded the %s index%s saved by another process", " and ".join(loaded),
                     "es" if len(loaded) > 1 else "")
        return loaded

    def _save(self, state: dict[str, list[int]], names: Sequence[str] = INDEXES) -> None:
        """Write the indexes ``names`` with the database ``state`` they reflect (the caller
        holds the write lock)."""
        for name in names:
            self.indexes[name].save(self.index_dir / name, model_version=self.model_version,
                                    state={name: state[name]})
            self.states[name] = state[name]

    def _all_fragment_vectors(self, session: Session, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        total = session.scalar(select(func.count(Fragment.id))) or 0
        ids, vectors = [], []
        query = select(Fragment.id, Fragment.region_rows).order_by(Fragment.id)
        with tqdm(total=total, desc="encode fragments", unit="fragment", disable=not progress) as bar:
            for batch in session.execute(query.execution_options(yield_per=ENCODE_BATCH)).partitions():
                ids.extend(r.id for r in batch)
                vectors.append(self._pooled_fragments([r.region_rows for r in batch]))
                bar.update(len(batch))
        return self._stack(ids, vectors)

    def _all_phrase_vectors(self, session: Session, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        rows = session.execute(select(Phrase.id, Phrase.text).order_by(Phrase.id)).all()
        vectors = [
            self._pooled_phrases([r.text for r in rows[start:start + ENCODE_BATCH]])
            for start in tqdm(range(0, len(rows), ENCODE_BATCH), desc="encode phrases",
                              unit="batch", disable=not progress)
        ]
        return self._stack([r.id for r in rows], vectors)

    def _stack(self, ids: list[int], vectors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        dim = self.model.config.embed_dim
        return (np.asarray(ids, dtype=np.int64),
                np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))

    # -- encoding -------------------------------------------------------------------------

    def encode_region_sets(self, region_rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region sets (feature-store rows) -> (n, r_max, d) unit region vectors and (n,) lens."""
        lens = [len(rows) for rows in region_rows]
        flat = np.concatenate([np.asarray(rows, dtype=np.int64) for rows in region_rows])
        features = self.store.features(flat)  # (sum lens, D_raw) float32
        return self._encode_raw(np.split(features, np.cumsum(lens)[:-1]))

    @torch.inference_mode()
    def _encode_raw(self, region_sets: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor([len(s) for s in region_sets], dtype=torch.long)
        raw = torch.zeros(len(region_sets), int(lens.max()), region_sets[0].shape[1])  # (n, r, D_raw)
        for i, features in enumerate(region_sets):
            raw[i, : len(features)] = torch.from_numpy(np.asarray(features, dtype=np.float32))
        lens = lens.to(self.device)
        return self.model.encode_images(raw.to(self.device), lens), lens  # (n, r, d), (n,)

    def token_lists(self, texts: Sequence[str]) -> list[list[str]]:
        return [self.reader.tokens(text) for text in texts]

    @torch.inference_mode()
    def encode_texts(self, token_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> (n, w_max, d) unit word vectors and (n,) lens, through the model's
        text reader (models.text). A text with no tokens still gets one row, so every phrase
        has a vector."""
        inputs, lens = self.reader.batch(token_lists)
        lens = lens.to(self.device)
        return self.model.encode_texts(inputs.to(self.device), lens), lens  # (n, w, d), (n,)

    def parse_query(self, query: str) -> ParsedQuery:
        """The phrases of a typed query that search_text scores (app.services.query)."""
        return parse_query(query, self.reader)

    def _pooled_fragments(self, region_rows: Sequence[Sequence[int]]) -> np.ndarray:
        from models.scan import pooled

        images, lens = self.encode_region_sets(region_rows)
        return pooled(images, lens).float().cpu().numpy()  # (n, d)

    def _pooled_phrases(self, texts: Sequence[str]) -> np.ndarray:
        from models.scan import pooled

        words, lens = self.encode_texts(self.token_lists(texts))
        return pooled(words, lens).float().cpu().numpy()  # (n, d)

    # -- text -> fragments ----------------------------------------------------------------

    def search_text(
        self, session: Session, query: str | ParsedQuery, *, k: int = 100, limit: int = 10,
        offset: int = 0, filters: Mapping[str, str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[FragmentHit]:
        """Fragments that show ``query``, best first. The query is split into its noun
        phrases (app.services.query); FAISS returns the top-``k`` fragments of each phrase's
        pooled vector, cross attention scores every candidate against every phrase, and
        :func:`app.services.query.combine` makes one score of them (with one phrase: its
        score). ``filters`` keep artworks whose metadata field equals a value."""
        from models.scan import pooled

        _check_page(k, limit, offset)
        with _timed(timings, "encode"):
            parsed = query if isinstance(query, ParsedQuery) else self.parse_query(query)
            text, text_lens = self.encode_texts(parsed.tokens)  # (p, w, d)
            query_vectors = pooled(text, text_lens).float().cpu().numpy()  # (p, d)
        with _timed(timings, "stage1"):
            allowed = self._allowed_fragments(session, filters) if filters else None
            if allowed is not None and not len(allowed):
                end_read(session)
                return []
            _, found_ids = self.indexes["fragments"].search(query_vectors, k, allowed_ids=allowed)
            # the union of the phrases' candidates, each nearest first
            candidates = np.asarray(list(dict.fromkeys(found_ids.T.reshape(-1).tolist())), dtype=np.int64)
            candidates = candidates[candidates >= 0]
            rows = {r.id: r for r in session.execute(
                select(Fragment.id, Fragment.artwork_id, Fragment.x1, Fragment.y1, Fragment.x2,
                       Fragment.y2, Fragment.source, Fragment.region_rows)
                .where(Fragment.id.in_(candidates.tolist()))
            )}
            # A fragment deleted since FAISS answered has no row: it drops out here.
            found = [rows[i] for i in candidates.tolist() if i in rows]
        if not found:
            end_read(session)
            return []
        with _timed(timings, "rerank"):
            images, image_lens = self.encode_region_sets([r.region_rows for r in found])
            per_phrase = self.model.similarity(images, image_lens, text, text_lens)  # (n, p)
            scores = combine(per_phrase).float().cpu()
            order = sorted(range(len(found)), key=lambda i: (-float(scores[i]), found[i].id))
            page = order[offset: offset + limit]
            hits = self._fragment_hits(session, [found[i] for i in page],
                                       [float(scores[i]) for i in page],
                                       images[page], image_lens[page], text, parsed.tokens)
        return hits

    def _allowed_fragments(self, session: Session, filters: Mapping[str, str]) -> np.ndarray:
        query = select(Fragment.id).join(Artwork, Fragment.artwork_id == Artwork.id)
        for field, value in filters.items():
            query = query.where(Artwork.meta[field].as_string() == str(value))
        return np.fromiter(session.scalars(query), dtype=np.int64)

    def _fragment_hits(
        self, session: Session, rows: list[Any], scores: list[float], images: torch.Tensor,
        image_lens: torch.Tensor, texts: torch.Tensor, tokens: list[list[str]],
    ) -> list[FragmentHit]:
        from models.scan import word_region_attention

        artwork_ids = {r.artwork_id for r in rows}
        artworks = {a.id: a for a in session.scalars(select(Artwork).where(Artwork.id.in_(artwork_ids)))}
        boxes = {(r.artwork_id, r.store_row): r.box for r in session.scalars(
            select(Region).where(Region.artwork_id.in_(artwork_ids)))}
        lambda_softmax = self.model.config.word_attention_lambda
        hits = []
        for row, score, image, n_regions in zip(rows, scores, images, image_lens.tolist(), strict=True):
            region_boxes = [boxes[(row.artwork_id, store_row)] for store_row in row.region_rows]
            attention = []
            for text, words in zip(texts, tokens, strict=True):  # each phrase's words in turn
                weights = word_region_attention(image[:n_regions], text[:len(words)], lambda_softmax)  # (w, r)
                for word, word_weights in zip(words, weights.float().cpu().tolist(), strict=True):
                    ranked = sorted(zip(region_boxes, word_weights, strict=True), key=lambda bw: -bw[1])
                    attention.append(WordAttention(word, [AttendedRegion(tuple(b), w) for b, w in ranked]))
            artwork = artworks[row.artwork_id]
            hits.append(FragmentHit(
                fragment_id=row.id, artwork_id=artwork.id, external_id=artwork.external_id,
                title=artwork.title, box=(row.x1, row.y1, row.x2, row.y2), source=row.source,
                score=score, width=artwork.width, height=artwork.height, attention=attention,
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
        (as :meth:`annotate_box` and :meth:`crop_region_set` build them).
        """
        from models.scan import pooled

        _check_page(k, limit, offset)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features):
            raise ValueError(f"region features must be (r, D_raw) with r >= 1, got {features.shape}")
        with _timed(timings, "encode"):
            image, image_lens = self._encode_raw([features])  # (1, r, d)
            vector = pooled(image, image_lens).float().cpu().numpy()
        with _timed(timings, "stage1"):
            _, candidates = self.indexes["phrases"].search(vector, k)
            candidates = candidates[0][candidates[0] >= 0]
            texts = {phrase_id: text for phrase_id, text in session.execute(
                select(Phrase.id, Phrase.text).where(Phrase.id.in_(candidates.tolist())))}
            found = [(i, texts[i]) for i in candidates.tolist() if i in texts]
        if not found:
            end_read(session)
            return []
        with _timed(timings, "rerank"):
            words, word_lens = self.encode_texts(self.token_lists([t for _, t in found]))
            scores = self.model.similarity(image, image_lens, words, word_lens)[0].float().cpu()
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
        artwork = session.get(Artwork, artwork_id)
        if artwork is None:
            raise LookupError(f"artwork {artwork_id} does not exist")
        box_array = np.asarray(box, dtype=np.float32).reshape(-1)
        x1, y1, x2, y2 = box_array.tolist() if box_array.size == 4 else (0, 0, -1, -1)
        if not (0 <= x1 < x2 <= artwork.width and 0 <= y1 < y2 <= artwork.height):
            raise ValueError(f"box {list(box)} must satisfy 0 <= x1 < x2 <= {artwork.width} and "
                             f"0 <= y1 < y2 <= {artwork.height} (artwork {artwork_id}'s size)")
        if self.extractor is None:
            raise RuntimeError("this engine has no region extractor: annotate_box needs one")
        from collection.images import load_image

        with _timed(timings, "extract"):
            image = load_image(artwork.image_location, name=f"artwork {artwork_id}'s image")
            own = self.extractor.pool(image, box_array[None], kind=GIVEN).features  # (1, D_raw)
        extracted = [r for r in artwork.regions if r.kind == EXTRACTED]
        members = region_set_members(
            box_array, np.array([r.box for r in extracted], dtype=np.float32).reshape(-1, 4),
            np.array([r.score for r in extracted], dtype=np.float32), max_members=DEFAULT_MAX_MEMBERS,
        )
        member_rows = np.array([extracted[i].store_row for i in members], dtype=np.int64)
        features = np.concatenate([np.asarray(own, dtype=np.float32), self.store.features(member_rows)])
        end_read(session)
        return self.annotate_regions(session, features, k=k, limit=limit, offset=offset, timings=timings)

    def annotate_image(
        self, session: Session, crop: Image.Image, *, k: int = 100, limit: int = 10,
        offset: int = 0, timings: dict[str, float] | None = None,
    ) -> list[PhraseHit]:
        """Phrases for an uploaded crop: the region set of its fragment, then as above."""
        if self.extractor is None:
            raise RuntimeError("this engine has no region extractor: annotate_image needs one")
        with _timed(timings, "extract"):
            features = self.crop_region_set(crop)
        return self.annotate_regions(session, features, k=k, limit=limit, offset=offset, timings=timings)

    def crop_region_set(self, crop: Image.Image) -> np.ndarray:
        """(r, D_raw) raw features of an uploaded crop's fragment: the crop's own box pooled,
        then the regions detected inside it (index.fragments' region set of a "crop" fragment).

        The detector resizes every image so that its longer side is ``image_size``: a small
        crop alone would be magnified several times and look like nothing it learnt from, and
        its whole-image feature describes an artwork, not a detail. So the crop is laid, at its
        own scale, on a square canvas of that size filled with its mean border colour, as it
        lay on its artwork, and its box is pooled there.
        """
        width, height = crop.size
        side = max(self.extractor.config.image_size, width, height)
        pixels = np.asarray(crop.convert("RGB"), dtype=np.float32)  # (h, w, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2w + 2h, 3)
        canvas = Image.new("RGB", (side, side), tuple(int(v) for v in border.mean(axis=0)))
        left, top = (side - width) // 2, (side - height) // 2
        canvas.paste(crop, (left, top))
        box = np.array([[left, top, left + width, top + height]], dtype=np.float32)  # (1, 4) xyxy
        record = self.extractor.extract([canvas], extra_boxes=[box], extra_kind=GIVEN)[0]
        fragment = next(spec for spec in fragments_of(record.boxes, record.scores, record.kinds)
                        if spec.source == "crop")
        return np.asarray(record.features, dtype=np.float32)[fragment.rows]


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
