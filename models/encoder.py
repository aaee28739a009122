"""The one path from texts and region sets to SCAN's vectors: training, evaluation and the
service all pad and encode through here, so a text or a fragment means the same everywhere.

Texts: :func:`words` (the shared tokenizer, cut to ``MAX_WORDS``), then vocabulary ids. **A
text with no word token reads as one ``<unk>`` word**: every text gets a vector (the phrase
index needs one per phrase), and evaluation ranks the same phrases the service does.

Region sets: (r, D_raw) raw features, rows[0] the box's own; a batch is zero padded to its
longest set, word ids to their longest text with ``<pad>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.scan import SCAN, pooled
from models.vocab import PAD_ID, UNK_ID, Vocabulary, tokenize

if TYPE_CHECKING:
    from index.featurestore import FeatureStore

# Museum descriptions can run to hundreds of words; SCAN's cost grows with the word count,
# so texts are cut here (titles, phrases and synthetic captions are far shorter).
MAX_WORDS = 64


def words(text: str) -> list[str]:
    """The word tokens of ``text`` that SCAN reads: at most ``MAX_WORDS``."""
    return tokenize(text)[:MAX_WORDS]


def text_ids(vocab: Vocabulary, text: str) -> list[int]:
    """Word ids of ``text``; one ``<unk>`` for a text with no word token (the module's rule)."""
    return vocab.encode(words(text)) or [UNK_ID]


def pad_ids(id_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Padded word ids: ((n, w_max) int64 PAD_ID padded, (n,) int64 lens)."""
    lens = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int64)
    padded = torch.full((len(id_lists), int(lens.max()) if len(id_lists) else 1), PAD_ID,
                        dtype=torch.int64)
    for i, ids in enumerate(id_lists):
        padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return padded, lens


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
    """A SCAN model and its vocabulary: texts and region sets in, unit vectors out, on the
    model's device, without gradients."""

    def __init__(self, model: SCAN, vocab: Vocabulary) -> None:
        self.model = model
        self.vocab = vocab

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def text_ids(self, text: str) -> list[int]:
        return text_ids(self.vocab, text)

    @torch.inference_mode()
    def ids(self, id_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Word ids -> (n, w_max, d) unit word vectors (zero padded) and (n,) lens."""
        ids, lens = pad_ids(id_lists)
        lens = lens.to(self.device)
        return self.model.encode_texts(ids.to(self.device), lens), lens

    def texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> (n, w_max, d) unit word vectors and (n,) lens."""
        return self.ids([self.text_ids(text) for text in texts])

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
