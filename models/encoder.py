"""The one path from texts and region sets to SCAN's vectors: training, evaluation and the
service all read and encode through here, so a text or a fragment means the same everywhere.

Texts: :class:`Encoder` reads them with the model's :class:`models.text.TextReader` (the
shared tokenizer cut to ``models.text.MAX_WORDS``, then word ids for a GRU model or cached
frozen MiniLM word features for a MiniLM one, zero padded). **A text with no word token
reads as one row** (the GRU's ``<unk>``, MiniLM's ``[CLS]``): every text gets a vector (the
phrase index needs one per phrase), and evaluation ranks the same phrases the service does.

Region sets: (r, D_raw) raw features, rows[0] the box's own; a batch is zero padded to its
longest set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.scan import SCAN, pooled
from models.text import TextReader, pad_inputs
from models.vocab import Vocabulary

if TYPE_CHECKING:
    from index.featurestore import FeatureStore


def pad_region_sets(region_sets: Sequence[np.ndarray], dim: int) -> tuple[Tensor, Tensor]:
    """Padded raw features: ((n, r_max, dim) float32, zero padded, (n,) int64 lens)."""
    lens = np.asarray([len(s) for s in region_sets], dtype=np.int64)
    padded = np.zeros((len(region_sets), int(lens.max(initial=1)), dim), dtype=np.float32)
    for i, features in enumerate(region_sets):
        padded[i, :lens[i]] = features
    return torch.from_numpy(padded), torch.from_numpy(lens)


def stored_region_sets(store: FeatureStore, rows: Sequence[Sequence[int] | np.ndarray]
                       ) -> tuple[Tensor, Tensor]:
    """:func:`pad_region_sets` of region sets given as feature-store rows (one read)."""
    lens = [len(r) for r in rows]
    flat = (store.features(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))
            if rows else np.zeros((0, store.dim), dtype=np.float32))  # (sum lens, D_raw)
    return pad_region_sets(np.split(flat, np.cumsum(lens)[:-1]) if rows else [], flat.shape[1])


class Encoder:
    """A SCAN model, its vocabulary and its text reader: texts and region sets in, unit
    vectors out, on the model's device, without gradients."""

    def __init__(self, model: SCAN, vocab: Vocabulary) -> None:
        self.model = model
        self.vocab = vocab
        self.reader = TextReader(model.config.text_encoder, vocab)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def tokens(self, text: str) -> list[str]:
        """The words of ``text`` that the model reads."""
        return self.reader.tokens(text)

    def inputs(self, texts: Sequence[str]) -> list[Tensor]:
        """What the model's text encoder reads of each text (see TextReader.inputs)."""
        return self.reader.inputs([self.reader.tokens(text) for text in texts])

    @torch.inference_mode()
    def read(self, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-text inputs (:meth:`inputs`) -> (n, w_max, d) unit word vectors (zero padded)
        and (n,) lens."""
        padded, lens = pad_inputs(inputs)
        lens = lens.to(self.device)
        return self.model.encode_texts(padded.to(self.device), lens), lens

    def words(self, token_lists: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """Token lists (:meth:`tokens`) -> word vectors and lens, as above."""
        return self.read(self.reader.inputs(token_lists))

    def texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> word vectors and lens, as above."""
        return self.read(self.inputs(texts))

    @torch.inference_mode()
    def region_sets(self, raw: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        """Padded raw features (n, r_max, D_raw), (n,) -> (n, r_max, d) unit region vectors
        (zero padded) and (n,) lens."""
        lens = lens.to(self.device)
        return self.model.encode_images(raw.to(self.device), lens), lens

    def features(self, region_sets: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Region sets as (r, D_raw) raw features -> region vectors, as above."""
        return self.region_sets(*pad_region_sets(region_sets, region_sets[0].shape[1]))

    def stored(self, store: FeatureStore, rows: Sequence[Sequence[int] | np.ndarray]
               ) -> tuple[Tensor, Tensor]:
        """Region sets as feature-store rows -> region vectors, as above."""
        return self.region_sets(*stored_region_sets(store, rows))


def pooled_numpy(vectors: Tensor, lens: Tensor) -> np.ndarray:
    """(n, items, d), (n,) -> (n, d) float32 pooled vectors on the CPU, for FAISS."""
    return pooled(vectors, lens).float().cpu().numpy()
