"""What SCAN trains and is evaluated on: fragments and texts from a collection and its feature store.

One split of a collection becomes an :class:`AlignmentData`: image-side fragments (a box on
an artwork and the feature-store rows of its region set, from ``fragments_of`` so a fragment
means the same thing here as in the index), distinct text-side strings, and the positive
(fragment, text) pairs between them. The grain decides what those are:

- ``coarse``: each artwork's whole-image fragment <-> each of its captions (thesis, chapter 3);
- ``fine`` with ground-truth boxes: each annotation's fragment (the feature store's
  annotation row, kind 2, plus the extracted regions inside it) <-> its phrase;
- ``fine`` without boxes (weak supervision, as in the thesis): an artwork's whole-image
  fragment <-> the sequence of its noun phrases read as one text.

Texts are deduplicated, so two artworks sharing a caption or a phrase share one text index;
that is what lets a batch tell "same text" from "different text" for its ignore mask. Texts
become word ids, and batches are padded, by :mod:`models.encoder`, as in the service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from index.featurestore import FeatureStore
from index.fragments import (
    ANNOTATION,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_WHOLE_TOP_K,
    FragmentSpec,
    fragments_of,
    iou,
)
from models.encoder import pad_ids, stored_region_sets, text_ids, words
from models.vocab import Vocabulary
from training.metrics import iou_relevance

if TYPE_CHECKING:
    from collection.layout import Artwork, Collection

log = logging.getLogger(__name__)

GRAINS = ("coarse", "fine")
SUPERVISION = ("auto", "boxes", "weak")
# An annotation's box and the feature-store row pooled for it are the same box; allow for
# float rounding of coordinates on the way through the extractor.
SAME_BOX_IOU = 0.9


@dataclass
class AlignmentData:
    """Fragments, texts and positive pairs of one split (see the module docstring)."""

    store: FeatureStore
    artwork_ids: list[str]  # artwork number -> the collection's artwork id
    fragment_artworks: np.ndarray  # (n_fragment,) int artwork number
    fragment_boxes: np.ndarray  # (n_fragment, 4) float32 xyxy, original pixels
    fragment_sources: list[str]  # "whole" | "extracted" | "annotation"
    fragment_rows: list[np.ndarray]  # global feature-store rows; rows[0] is the box's own
    texts: list[str]  # distinct captions, phrases or phrase sequences
    text_ids: list[list[int]]  # word ids of each text (models.encoder.text_ids)
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    # (n_pair, 2) int64 [fragment, text]: the positives

    def relevance(self) -> np.ndarray:
        """(n_fragment, n_text) bool: True where (fragment, text) is a positive pair."""
        relevant = np.zeros((len(self.fragment_rows), len(self.texts)), dtype=bool)
        relevant[self.pairs[:, 0], self.pairs[:, 1]] = True
        return relevant


@dataclass
class Batch:
    """Padded tensors for one batch of pairs; row i of the images goes with row i of the texts."""

    regions: torch.Tensor  # (b, r_max, D_raw) float32, zero padded
    region_lens: torch.Tensor  # (b,) int64
    word_ids: torch.Tensor  # (b, w_max) int64, PAD_ID padded
    word_lens: torch.Tensor  # (b,) int64
    ignore: torch.Tensor  # (b, b) bool: True off the diagonal where a pair is not a negative
    # Negative fragments (fine grain with boxes, see NegativeFragments); None when not used.
    negative_regions: torch.Tensor | None = None  # (m, r_max, D_raw) float32, zero padded
    negative_lens: torch.Tensor | None = None  # (m,) int64
    negative_ignore: torch.Tensor | None = None  # (m, b) bool: True where it answers text j


def open_store(collection_root: Path, features: Path | None = None) -> FeatureStore:
    """The feature store at ``features``, or the collection's own ``features/`` folder."""
    root = Path(features) if features is not None else Path(collection_root) / "features"
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root}: no feature store here (no manifest.json); extract region features with "
            "`artalign extract` first, or pass --features DIR"
        )
    return FeatureStore(root)


def resolve_supervision(artworks: list[Artwork], supervision: str) -> str:
    """"boxes" when asked, or when ``auto`` and any artwork has annotations; else "weak"."""
    if supervision not in SUPERVISION:
        raise ValueError(f"supervision must be one of {SUPERVISION}, got {supervision!r}")
    if supervision != "auto":
        return supervision
    return "boxes" if any(artwork.annotations for artwork in artworks) else "weak"


class _Builder:
    """Accumulates fragments, distinct texts and pairs for one split."""

    def __init__(self, store: FeatureStore, vocab: Vocabulary):
        self.store, self.vocab = store, vocab
        self.artwork_ids: list[str] = []
        self.fragment_artworks: list[int] = []
        self.fragment_boxes: list[np.ndarray] = []
        self.fragment_sources: list[str] = []
        self.fragment_rows: list[np.ndarray] = []
        self.texts: list[str] = []
        self.text_ids: list[list[int]] = []
        self.text_index: dict[str, int] = {}
        self.pairs: list[tuple[int, int]] = []
        self.wordless_texts = 0

    def artwork(self, artwork_id: str) -> tuple[int, int, list[FragmentSpec]]:
        """(artwork number, global start row, fragments_of its record)."""
        if not self.store.has(artwork_id):
            raise ValueError(
                f"artwork {artwork_id!r} has no record in the feature store {self.store.root}; "
                "run `artalign extract` on the collection (it resumes where it stopped)"
            )
        start, _ = self.store.rows_of(artwork_id)
        record = self.store.get(artwork_id)
        specs = fragments_of(record.boxes, record.scores, record.kinds,
                             max_members=DEFAULT_MAX_MEMBERS, whole_top_k=DEFAULT_WHOLE_TOP_K)
        self.artwork_ids.append(artwork_id)
        return len(self.artwork_ids) - 1, start, specs

    def fragment(self, number: int, start: int, spec: FragmentSpec) -> int:
        self.fragment_artworks.append(number)
        self.fragment_boxes.append(np.asarray(spec.box, dtype=np.float32))
        self.fragment_sources.append(spec.source)
        self.fragment_rows.append(start + np.asarray(spec.rows, dtype=np.int64))
        return len(self.fragment_rows) - 1

    def text(self, text: str) -> int:
        """The text's index, adding it once."""
        if text in self.text_index:
            return self.text_index[text]
        self.wordless_texts += not words(text)
        self.text_index[text] = len(self.texts)
        self.texts.append(text)
        self.text_ids.append(text_ids(self.vocab, text))
        return self.text_index[text]

    def pair(self, fragment: int, text: str) -> None:
        self.pairs.append((fragment, self.text(text)))

    def build(self) -> AlignmentData:
        if self.wordless_texts:
            log.warning("%d texts have no word token; each reads as one <unk> word",
                        self.wordless_texts)
        return AlignmentData(
            store=self.store,
            artwork_ids=self.artwork_ids,
            fragment_artworks=np.asarray(self.fragment_artworks, dtype=np.int64),
            fragment_boxes=np.asarray(self.fragment_boxes, dtype=np.float32).reshape(-1, 4),
            fragment_sources=self.fragment_sources,
            fragment_rows=self.fragment_rows,
            texts=self.texts,
            text_ids=self.text_ids,
            pairs=np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2),
        )


def annotation_fragments(artwork: Artwork, specs: list[FragmentSpec]
                         ) -> list[tuple[str, FragmentSpec]]:
    """(phrase, fragment spec) for each annotation of ``artwork``: the annotation row (kind 2)
    of the feature store whose box is the annotation's box."""
    rows = [spec for spec in specs if spec.source == "annotation"]
    boxes = np.asarray([spec.box for spec in rows], dtype=np.float64).reshape(-1, 4)
    matched = []
    for number, annotation in enumerate(artwork.annotations):
        overlap = iou(np.asarray(annotation.box, dtype=np.float64).reshape(1, 4), boxes)[0]
        if overlap.size == 0 or overlap.max() < SAME_BOX_IOU:
            raise ValueError(
                f"artwork {artwork.id!r} annotation {number} ({annotation.phrase!r}, box "
                f"{list(annotation.box)}) has no annotation row (kind {ANNOTATION}) in the "
                "feature store; extract features with the collection's annotations pooled"
            )
        matched.append((annotation.phrase, rows[int(overlap.argmax())]))
    return matched


def alignment_data(collection: Collection, store: FeatureStore, vocab: Vocabulary, *, grain: str,
                   split: str, supervision: str = "auto") -> AlignmentData:
    """The training/validation pairs of ``split`` at ``grain`` (see the module docstring)."""
    if grain not in GRAINS:
        raise ValueError(f"grain must be one of {GRAINS}, got {grain!r}")
    artworks = collection.split(split)
    if not artworks:
        raise ValueError(f"{collection.root}: the collection has no artworks in split {split!r}")
    mode = "captions" if grain == "coarse" else resolve_supervision(artworks, supervision)
    builder = _Builder(store, vocab)
    for artwork in artworks:
        number, start, specs = builder.artwork(artwork.id)
        whole = [spec for spec in specs if spec.source == "whole"]
        if mode == "boxes":
            for phrase, spec in annotation_fragments(artwork, specs):
                builder.pair(builder.fragment(number, start, spec), phrase)
            continue
        if not whole:
            raise ValueError(f"artwork {artwork.id!r}: its feature-store record has no "
                             "whole-image row (kind 0)")
        fragment = builder.fragment(number, start, whole[0])
        if mode == "captions":
            for caption in artwork.captions:
                builder.pair(fragment, caption)
        elif artwork.phrases:
            builder.pair(fragment, " ".join(artwork.phrases))
    data = builder.build()
    if len(data.pairs) == 0:
        raise ValueError(f"{collection.root}: split {split!r} gives no {grain} training pairs "
                         f"({mode}); does it have captions/phrases/annotations?")
    log.info("%s split %s (%s): %d artworks, %d fragments, %d texts, %d pairs", grain, split,
             mode, len(data.artwork_ids), len(data.fragment_rows), len(data.texts), len(data.pairs))
    return data


def split_fragments(collection: Collection, store: FeatureStore, vocab: Vocabulary, *, split: str,
                    texts: list[str], sources: tuple[str, ...] = ("whole", "extracted")
                    ) -> AlignmentData:
    """Every fragment of ``split`` whose source is in ``sources``, and the given texts, with no
    pairs: the candidate set of phrase -> fragment evaluation. Annotation boxes are left out
    by default, since retrieving the ground-truth box itself would measure nothing."""
    builder = _Builder(store, vocab)
    for artwork in collection.split(split):
        number, start, specs = builder.artwork(artwork.id)
        for spec in specs:
            if spec.source in sources:
                builder.fragment(number, start, spec)
    for text in texts:
        builder.text(text)
    return builder.build()


@dataclass
class NegativeFragments:
    """Fragments of the training artworks to use as extra negatives of the annotated pairs.

    Trained on annotation boxes alone, the model never sees what it is asked to reject at
    evaluation: the whole image and the other detected fragments of the same artwork (the
    in-batch rule keeps same-artwork pairs apart). So each pair also meets its artwork's
    whole-image fragment and a few of its extracted fragments as negatives, unless one of
    them would count as a hit for the pair's phrase (IoU >= 0.5 with a box of that phrase).
    """

    candidates: AlignmentData  # the split's whole-image and extracted fragments, no texts
    by_artwork: list[np.ndarray]  # candidate numbers of each artwork; the whole image first
    per_artwork: int  # drawn per artwork of a batch: its whole image, then per_artwork - 1 others


def negative_fragments(collection: Collection, store: FeatureStore, vocab: Vocabulary, *, split: str,
                       per_artwork: int) -> NegativeFragments:
    candidates = split_fragments(collection, store, vocab, split=split, texts=[])
    by_artwork: list[list[int]] = [[] for _ in candidates.artwork_ids]
    for number, artwork in enumerate(candidates.fragment_artworks):
        # fragments_of lists the whole image (record row 0) first
        by_artwork[artwork].append(number)
    return NegativeFragments(candidates, [np.asarray(f, dtype=np.int64) for f in by_artwork],
                             per_artwork)


def _draw_negatives(data: AlignmentData, negatives: NegativeFragments, fragments: np.ndarray,
                    texts: np.ndarray, rng: np.random.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative fragments for a batch and their (m, b) mask of pairs they would answer."""
    drawn: list[int] = []
    for artwork in np.unique(data.fragment_artworks[fragments]):
        own = negatives.by_artwork[artwork]
        others = rng.permutation(own[1:])[:negatives.per_artwork - 1]
        drawn.extend([int(own[0]), *others.tolist()])
    drawn_array = np.asarray(drawn, dtype=np.int64)
    candidates = negatives.candidates
    answers = np.zeros((len(drawn), len(texts)), dtype=bool)
    for column, text in enumerate(texts):
        # the boxes of this text in the training pairs: a hit for it is not a negative
        targets = data.pairs[data.pairs[:, 1] == text, 0]
        answers[:, column] = iou_relevance(
            candidates.fragment_boxes[drawn_array], candidates.fragment_artworks[drawn_array],
            data.fragment_boxes[targets], data.fragment_artworks[targets])
    regions, lens = stored_region_sets(candidates.store, [candidates.fragment_rows[f] for f in drawn])
    return regions, lens, torch.from_numpy(answers)


def batch_of(data: AlignmentData, pair_numbers: np.ndarray,
             negatives: NegativeFragments | None = None,
             rng: np.random.Generator | None = None) -> Batch:
    """The padded batch of the given pairs, with its ignore mask: two pairs from the same
    artwork, or with the same text, are not each other's negatives. With ``negatives``, the
    batch also carries negative fragments drawn for its artworks (see NegativeFragments)."""
    fragments, texts = data.pairs[pair_numbers, 0], data.pairs[pair_numbers, 1]
    regions, region_lens = stored_region_sets(data.store, [data.fragment_rows[f] for f in fragments])
    word_ids, word_lens = pad_ids([data.text_ids[t] for t in texts])
    artworks = torch.from_numpy(data.fragment_artworks[fragments])
    texts_t = torch.from_numpy(texts)
    ignore = (artworks[:, None] == artworks[None, :]) | (texts_t[:, None] == texts_t[None, :])
    ignore.fill_diagonal_(False)  # (b, b): the diagonal is the positive itself
    batch = Batch(regions, region_lens, word_ids, word_lens, ignore)
    if negatives is not None and negatives.per_artwork > 0:
        batch.negative_regions, batch.negative_lens, batch.negative_ignore = _draw_negatives(
            data, negatives, fragments, texts, rng or np.random.default_rng())
    return batch


def batches(data: AlignmentData, batch_size: int, rng: np.random.Generator,
            negatives: NegativeFragments | None = None) -> Iterator[Batch]:
    """One epoch of shuffled batches over the positive pairs (the last one may be smaller,
    but never a lone pair, which would have no negative)."""
    order = rng.permutation(len(data.pairs))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) > 1:
            yield batch_of(data, chunk, negatives, rng)


def n_batches(data: AlignmentData, batch_size: int) -> int:
    full, rest = divmod(len(data.pairs), batch_size)
    return full + (1 if rest > 1 else 0)
