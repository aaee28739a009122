"""SCAN: Stacked Cross Attention for image-text matching (Lee et al. 2018), as used in the
thesis "Image-text Alignment for Artworks". The whole model, top to bottom:

1. ScanConfig     the hyperparameters; saved in the checkpoint, the model rebuilds from it
2. encoders       regions: Linear(D_raw -> d) + L2 norm; words: Embedding -> GRU -> L2 norm,
                  or MiniLMHead: frozen MiniLM word features (read by models/text.py) ->
                  LayerNorm (+ a code per vocabulary word) -> Linear -> L2 norm,
                  or MiniLMGRUHead: [LayerNorm(MiniLM) ; Embedding] -> GRU -> L2 norm
3. attention      xattn_similarity: every region set against every word sequence, batched
4. pooled         the first-stage vector (normalised mean) that FAISS searches
5. loss           hinge triplet loss, hardest in-batch negatives, both directions
6. SCAN           the module that ties them together; save / load_scan via models/checkpoint

Shapes: n_img images (region sets) of up to r regions, n_txt texts of up to w words, d the
joint embedding size. Padding rows are zero and never change a score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from models.text import (
    MINILM_DIM,
    MINILM_HEADS,
    TEXT_ENCODERS,
    WORD_DROPOUT,
    minilm_weights_sha256,
)
from models.vocab import PAD_ID, UNK_ID, Vocabulary

CHECKPOINT_KIND = "scan"
DIRECTIONS = ("t2i", "i2t", "both")  # both: the mean of the t2i and i2t scores
AGGREGATIONS = ("lse", "mean", "max", "sum")
EPS = 1e-8  # the reference implementation's epsilon for every norm and cosine

# The thesis's softmax temperatures: words attending to regions want a sharper focus than
# regions attending to the few words of a phrase.
_DEFAULT_LAMBDA_SOFTMAX = {"t2i": 9.0, "i2t": 4.0}


def default_lambda_softmax(direction: str) -> float | None:
    """λ_softmax the thesis used for ``direction`` ("t2i": 9, "i2t": 4); None for "both",
    where each direction keeps its own."""
    if direction == "both":
        return None
    if direction not in _DEFAULT_LAMBDA_SOFTMAX:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return _DEFAULT_LAMBDA_SOFTMAX[direction]


# ---------------------------------------------------------------------------------------
# 1. configuration


@dataclass
class ScanConfig:
    vocab_size: int
    raw_dim: int = 2048  # D_raw: the region extractor's feature size
    embed_dim: int = 1024  # d: the joint space
    word_dim: int = 300  # word embedding size
    num_layers: int = 1  # GRU layers
    bidirectional: bool = True  # a bidirectional GRU's two directions are averaged
    # "t2i": words attend to regions; "i2t": regions attend to words; "both": the mean of the
    # two scores (SCAN's t-i + i-t ensemble, in one model)
    direction: str = "t2i"
    agg: str = "lse"  # how the query items' scores become one: "lse" | "mean" | "max" | "sum"
    lambda_softmax: float | None = None  # None: the thesis default for the direction (each one's for "both")
    lambda_lse: float = 6.0
    margin: float = 0.2  # α of the hinge triplet loss
    max_violation: bool = True  # hardest in-batch negative (VSE++) instead of the sum
    grad_clip: float = 2.0  # max gradient norm, applied by the trainer
    pooled_weight: float = 1.0  # weight of the pooled (first-stage) loss in the total
    xattn_weight: float = 1.0  # weight of the cross-attention loss; 0 trains a vectors-only baseline
    chunk_size: int = 64  # images and texts per block when scoring all pairs
    # "gru" (the thesis) or "minilm" (frozen all-MiniLM-L6-v2 + a trained projection, see
    # models/text.py); minilm_sha256 names the MiniLM weights a minilm model was trained on
    text_encoder: str = "gru"
    minilm_sha256: str | None = None
    # minilm: "linear" (a projection of MiniLM's features), "words" (plus a trained code per
    # vocabulary word, see MiniLMHead) or "gru" (MiniLM's features beside a trained embedding
    # per vocabulary word, read by a GRU, see MiniLMGRUHead)
    minilm_head: str = "words"
    # minilm heads "words" and "gru": the share of known words trained without their own
    # code or embedding, so that MiniLM alone still carries a word outside the vocabulary
    word_dropout: float = WORD_DROPOUT

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"ScanConfig.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"ScanConfig.agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"ScanConfig.text_encoder must be one of {TEXT_ENCODERS}, got "
                             f"{self.text_encoder!r}")
        if self.minilm_head not in MINILM_HEADS:
            raise ValueError(f"ScanConfig.minilm_head must be one of {MINILM_HEADS}, got "
                             f"{self.minilm_head!r}")
        if not 0 <= self.word_dropout < 1:
            raise ValueError(f"ScanConfig.word_dropout must lie in [0, 1), got {self.word_dropout}")
        if self.lambda_softmax is None:
            self.lambda_softmax = default_lambda_softmax(self.direction)
        if self.xattn_weight < 0 or self.pooled_weight < 0 or self.xattn_weight + self.pooled_weight == 0:
            raise ValueError("ScanConfig: xattn_weight and pooled_weight must be >= 0, not both 0")
        for name in ("vocab_size", "raw_dim", "embed_dim", "word_dim", "num_layers", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScanConfig.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def word_attention_lambda(self) -> float:
        """λ_softmax of the words' attention over regions, as explanations show it."""
        return self.lambda_softmax if self.lambda_softmax is not None else _DEFAULT_LAMBDA_SOFTMAX["t2i"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScanConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ScanConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------
# 2. encoders


def lengths_mask(lens: Tensor, size: int) -> Tensor:
    """(n,) lengths -> (n, size) bool, True for the valid positions."""
    return torch.arange(size, device=lens.device) < lens[:, None]


class ImageEncoder(nn.Module):
    """Raw region features -> the joint space, one region at a time."""

    def __init__(self, config: ScanConfig):
        super().__init__()
        self.fc = nn.Linear(config.raw_dim, config.embed_dim)
        # Xavier uniform as in the reference implementation: the projection starts out
        # preserving the variance of the detector features.
        bound = math.sqrt(6.0) / math.sqrt(config.raw_dim + config.embed_dim)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, raw: Tensor, lens: Tensor) -> Tensor:
        # raw: (n, r, D_raw), lens: (n,)
        x = F.normalize(self.fc(raw), dim=-1, eps=EPS)  # (n, r, d), unit rows
        return x * lengths_mask(lens, raw.shape[1])[..., None]  # padding rows back to zero


class TextEncoder(nn.Module):
    """Word ids -> one vector per word in the joint space (a GRU reads the whole phrase)."""

    def __init__(self, config: ScanConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=PAD_ID)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        self.gru = nn.GRU(config.word_dim, config.embed_dim, config.num_layers,
                          batch_first=True, bidirectional=config.bidirectional)

    def forward(self, ids: Tensor, lens: Tensor) -> Tensor:
        # ids: (n, w) long, lens: (n,)
        return read_with_gru(self.gru, self.embed(ids), lens)  # embed: (n, w, word_dim)


def read_with_gru(gru: nn.GRU, x: Tensor, lens: Tensor) -> Tensor:
    """(n, w, input) word rows, (n,) lens -> (n, w, d) unit rows of the GRU's outputs, zero
    padded; a bidirectional GRU's two directions are averaged."""
    w, d = x.shape[1], gru.hidden_size
    # Packed so the backward direction starts at each phrase's last word, not at padding.
    packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=w)  # (n, w, d or 2d)
    if gru.bidirectional:
        out = (out[..., :d] + out[..., d:]) / 2  # (n, w, d)
    out = F.normalize(out, dim=-1, eps=EPS)  # (n, w, d), unit rows
    return out * lengths_mask(lens, w)[..., None]


def kept_word_ids(ids: Tensor, word_dropout: float, training: bool) -> Tensor:
    """Vocabulary ids a MiniLM head looks up: in training, each known word is read as
    ``<unk>`` with probability ``word_dropout``, as every word outside the vocabulary is,
    so that MiniLM's features alone learn to carry a word. (n, w) long."""
    if not training or word_dropout == 0:
        return ids
    dropped = (ids > UNK_ID) & (torch.rand(ids.shape, device=ids.device) < word_dropout)
    return ids.masked_fill(dropped, UNK_ID)


class MiniLMHead(nn.Module):
    """Frozen MiniLM word features -> the joint space: layer-normalised (MiniLM's token
    outputs share a few large dimensions), projected, L2 normalised.

    Head "words" adds, before the projection, a trained code per word of the collection's
    vocabulary, randomly initialised like the GRU's word embeddings: rare catalogue words
    (dates, names: "1427", "Amenemope") look alike to MiniLM, and the code tells them apart.
    A word outside the vocabulary has no code and is read through MiniLM alone; so that this
    path stays good on its own, each word's code is dropped with probability
    ``config.word_dropout`` in training. The head's weights are all a checkpoint stores of the text
    side; MiniLM's stay in the package."""

    def __init__(self, config: ScanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(MINILM_DIM)
        self.words = (nn.Embedding(config.vocab_size, MINILM_DIM)
                      if config.minilm_head == "words" else None)
        self.fc = nn.Linear(MINILM_DIM, config.embed_dim)
        self.word_dropout = config.word_dropout
        bound = math.sqrt(6.0) / math.sqrt(MINILM_DIM + config.embed_dim)  # Xavier, as for regions
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, inputs: Tensor, lens: Tensor) -> Tensor:
        # inputs: (n, w, 1 + 384) float, zero padded: each word's vocabulary id, then its
        # MiniLM features (TextReader); lens: (n,)
        ids, x = inputs[..., 0].long(), self.norm(inputs[..., 1:])  # (n, w), (n, w, 384)
        if self.words is not None:
            ids = kept_word_ids(ids, self.word_dropout, self.training)
            x = x + self.words(ids) * (ids > UNK_ID)[..., None]  # padding, <unk>: no code
        out = F.normalize(self.fc(x), dim=-1, eps=EPS)  # (n, w, d), unit rows
        return out * lengths_mask(lens, inputs.shape[1])[..., None]


class MiniLMGRUHead(nn.Module):
    """Frozen MiniLM word features beside a trained embedding per vocabulary word, read
    together by a GRU: [LayerNorm(MiniLM) (384) ; Embedding (word_dim)] -> GRU -> L2 norm.

    The GRU gives every word the context of its whole text, trained on the collection, as
    GRU-SCAN's does; the embeddings tell rare catalogue words apart as GRU-SCAN's do; MiniLM's
    features carry what the vocabulary lacks. A word outside the vocabulary is read as
    ``<unk>`` beside its MiniLM features; in training each known word is, with probability
    ``config.word_dropout``, so that the GRU learns to read MiniLM alone."""

    def __init__(self, config: ScanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(MINILM_DIM)
        self.embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=PAD_ID)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # as GRU-SCAN's word embeddings
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        self.gru = nn.GRU(MINILM_DIM + config.word_dim, config.embed_dim, config.num_layers,
                          batch_first=True, bidirectional=config.bidirectional)
        self.word_dropout = config.word_dropout

    def forward(self, inputs: Tensor, lens: Tensor) -> Tensor:
        # inputs: (n, w, 1 + 384) float as for MiniLMHead; lens: (n,)
        ids = kept_word_ids(inputs[..., 0].long(), self.word_dropout, self.training)  # (n, w)
        x = torch.cat([self.norm(inputs[..., 1:]), self.embed(ids)], dim=-1)  # (n, w, 384 + word_dim)
        return read_with_gru(self.gru, x, lens)


# ---------------------------------------------------------------------------------------
# 3. stacked cross attention
#
# One formulation serves both directions: a set of *query* items attends to a set of
# *context* items. t2i: queries = words, context = regions. i2t: queries = regions,
# context = words. For a query q and context items c with cosines s_qc:
#   h_qc  = LeakyReLU_0.1(s_qc) / ||LeakyReLU_0.1(s_·c)||  (L2 over the query axis)
#   α_qc  = softmax_c(λ_softmax · h_qc)
#   a_q   = Σ_c α_qc v_c
#   R_q   = cos(q, a_q)                 then aggregated over q: LSE, mean, max or sum.
# a_q is never built: q·a_q = Σ_c α_qc s_qc and |a_q|² = α_qᵀ G α_q with G the context's
# Gram matrix, so one matrix product of all context items against all query items does
# nearly all the work.


def _attention_numerators(sims: Tensor, context_lens: Tensor, lambda_softmax: float) -> Tensor:
    """exp(λ_softmax · h) over the context axis: the softmax α before its division, which
    cancels in the cosine (see _cross_attention_block). Each query item's numerators are
    scaled by one positive factor so that exp never overflows.

    sims: (n_ctx, C, n_q, Q) cosines with padding rows already zero. Returns the same shape;
    padded context items get exactly 0."""
    C = sims.shape[1]
    clipped = F.leaky_relu(sims, 0.1)  # (n_ctx, C, n_q, Q)
    # L2 over the query axis; padded queries are zero vectors, so they add nothing to it.
    norm = torch.linalg.vector_norm(clipped, dim=-1, keepdim=True)  # (n_ctx, C, n_q, 1)
    logits = clipped * (lambda_softmax / (norm + EPS))  # λ·h, each in [-λ, λ]
    if int(context_lens.min()) < C:
        logits.masked_fill_(~lengths_mask(context_lens, C)[:, :, None, None], -math.inf)
    # Subtracting the max over the context axis keeps exp in range for any λ. The shift is
    # detached: softmax does not depend on it, so neither does the gradient.
    logits -= logits.detach().amax(dim=1, keepdim=True)
    return logits.exp_()  # (n_ctx, C, n_q, Q)


def _aggregate(scores: Tensor, query_mask: Tensor, agg: str, lambda_lse: float) -> Tensor:
    """(n_ctx, n_q, Q) per-query-item scores -> (n_ctx, n_q); padded query items never count."""
    if agg == "lse":
        masked = scores.masked_fill(~query_mask, -math.inf)
        return torch.logsumexp(lambda_lse * masked, dim=-1) / lambda_lse  # stable for any λ_lse
    if agg == "max":
        return scores.masked_fill(~query_mask, -math.inf).amax(dim=-1)
    summed = (scores * query_mask).sum(dim=-1)
    if agg == "sum":
        return summed
    return summed / query_mask.sum(dim=-1)  # mean


def _cross_attention_block(
    context: Tensor, context_lens: Tensor, queries: Tensor, query_lens: Tensor,
    *, agg: str, lambda_softmax: float, lambda_lse: float,
) -> Tensor:
    """Scores of every query set against every context set: (n_ctx, n_q)."""
    n_ctx, C, d = context.shape
    n_q, Q, _ = queries.shape
    # The one big product: every context item against every query item.
    sims = (context.reshape(-1, d) @ queries.reshape(-1, d).T).view(n_ctx, C, n_q, Q)
    # With numerators e and total Z = Σ_c e_qc, α_qc = e_qc / Z, and
    #   q·a_q   = Σ_c α_qc s_qc        = (Σ_c e_qc s_qc) / Z
    #   |a_q|²  = α_qᵀ G α_q            = (e_qᵀ G e_q) / Z²
    # so cos(q, a_q) = Σ e s / max(|q| √(eᵀGe), eps·Z): α is never normalised.
    numerators = _attention_numerators(sims, context_lens, lambda_softmax)  # (n_ctx, C, n_q, Q)
    total = numerators.sum(dim=1)  # (n_ctx, n_q, Q) = Z
    dot = (numerators * sims).sum(dim=1)  # (n_ctx, n_q, Q) = Z · q·a_q
    gram = context @ context.transpose(1, 2)  # (n_ctx, C, C)
    flat = numerators.view(n_ctx, C, n_q * Q)
    sq_norm = (flat * (gram @ flat)).sum(dim=1).view(n_ctx, n_q, Q)  # Z² |a_q|²
    # clamp: rounding can push eᵀGe a hair below zero.
    attended_norm = sq_norm.clamp_min(0).sqrt()  # (n_ctx, n_q, Q) = Z |a_q|
    query_norm = torch.linalg.vector_norm(queries, dim=-1)  # (n_q, Q)
    cosine = dot / torch.maximum(query_norm * attended_norm, EPS * total)  # (n_ctx, n_q, Q)
    return _aggregate(cosine, lengths_mask(query_lens, Q), agg, lambda_lse)


def _length_sorted_blocks(
    x: Tensor, lens: Tensor, chunk_size: int
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Split (n, L, d) into blocks of similar lengths, each trimmed to its own longest item,
    so little of the big product is spent on padding. Returns the blocks and the order."""
    order = torch.argsort(lens, descending=True, stable=True)
    mask = lengths_mask(lens, x.shape[1])[..., None]  # (n, L, 1)
    blocks = []
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        block_lens = lens[idx]
        longest = int(block_lens[0])
        # Zero the padding here, once, so that no later step has to mask it again.
        blocks.append(((x[idx, :longest] * mask[idx, :longest]), block_lens))
    return blocks, order


def _check_inputs(name: str, x: Tensor, lens_name: str, lens: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (n, items, d), got shape {tuple(x.shape)}")
    if lens.shape != (x.shape[0],):
        raise ValueError(f"{lens_name} must have shape ({x.shape[0]},), got {tuple(lens.shape)}")
    if len(lens) and (int(lens.min()) < 1 or int(lens.max()) > x.shape[1]):
        raise ValueError(
            f"{lens_name} must lie in [1, {x.shape[1]}], got [{int(lens.min())}, {int(lens.max())}]"
        )


def xattn_similarity(
    images: Tensor,
    image_lens: Tensor,
    texts: Tensor,
    text_lens: Tensor,
    *,
    direction: str,
    agg: str,
    lambda_softmax: float | None,
    lambda_lse: float = 6.0,
    chunk_size: int = 64,
) -> Tensor:
    """Stacked cross attention similarity of every image (region set) with every text.

    ``direction`` "both" averages the t2i and i2t scores; ``lambda_softmax`` None takes the
    thesis's default of each direction.

    images: (n_img, r, d) L2-normalised rows, zero padded; image_lens: (n_img,) int.
    texts: (n_txt, w, d) L2-normalised rows, zero padded; text_lens: (n_txt,) int.
    Returns (n_img, n_txt). Pairs are scored in blocks of at most ``chunk_size`` images by
    ``chunk_size`` texts, so memory stays bounded: a few (about 4 without autograd) tensors
    of chunk_size² · r · w floats at a time, whatever n_img and n_txt are.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    _check_inputs("images", images, "image_lens", image_lens)
    _check_inputs("texts", texts, "text_lens", text_lens)
    if images.shape[2] != texts.shape[2]:
        raise ValueError(f"images have d={images.shape[2]} but texts have d={texts.shape[2]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if len(images) == 0 or len(texts) == 0:
        return images.new_zeros(len(images), len(texts))
    if direction == "both":
        return sum(xattn_similarity(images, image_lens, texts, text_lens, direction=one, agg=agg,
                                    lambda_softmax=lambda_softmax, lambda_lse=lambda_lse,
                                    chunk_size=chunk_size) for one in ("t2i", "i2t")) / 2
    if lambda_softmax is None:
        lambda_softmax = default_lambda_softmax(direction)

    if direction == "t2i":
        context, context_lens, queries, query_lens = images, image_lens, texts, text_lens
    else:
        context, context_lens, queries, query_lens = texts, text_lens, images, image_lens
    context_blocks, context_order = _length_sorted_blocks(context, context_lens, chunk_size)
    query_blocks, query_order = _length_sorted_blocks(queries, query_lens, chunk_size)
    rows = []
    for ctx, ctx_lens in context_blocks:
        row = [
            _cross_attention_block(ctx, ctx_lens, q, q_lens, agg=agg,
                                   lambda_softmax=lambda_softmax, lambda_lse=lambda_lse)
            for q, q_lens in query_blocks
        ]
        rows.append(torch.cat(row, dim=1))
    sorted_scores = torch.cat(rows, dim=0)  # (n_ctx, n_q) in length order
    scores = sorted_scores[torch.argsort(context_order)][:, torch.argsort(query_order)]
    return scores if direction == "t2i" else scores.T  # (n_img, n_txt)


def word_region_attention(image: Tensor, text: Tensor, lambda_softmax: float) -> Tensor:
    """t2i attention weights α of one pair, for explanations: which regions each word
    attended to. image: (r, d) region vectors, text: (w, d) word vectors, no padding.
    Returns (w, r); each row sums to 1."""
    sims = (image @ text.T)[None, :, None, :]  # (1, r, 1, w)
    image_lens = torch.tensor([image.shape[0]], device=image.device)
    numerators = _attention_numerators(sims, image_lens, lambda_softmax)[0, :, 0, :]  # (r, w)
    return (numerators / numerators.sum(dim=0)).T  # (w, r)


# ---------------------------------------------------------------------------------------
# 4. pooled vectors (the first stage)


def pooled(x: Tensor, lens: Tensor) -> Tensor:
    """(n, items, d), (n,) -> (n, d): the L2-normalised mean of each set's valid rows."""
    mask = lengths_mask(lens, x.shape[1])[..., None]  # (n, items, 1)
    mean = (x * mask).sum(dim=1) / lens[:, None].to(x.dtype)  # (n, d)
    return F.normalize(mean, dim=-1, eps=EPS)


# ---------------------------------------------------------------------------------------
# 5. loss


def contrastive_loss(
    scores: Tensor, *, margin: float, max_violation: bool, ignore_mask: Tensor | None = None
) -> Tensor:
    """Hinge triplet loss over a batch of matching pairs, summed as in the reference.

    scores: (n, n), scores[i, j] = similarity of image i and text j; the diagonal holds
    the positives. ignore_mask: (n, n) bool, True where an off-diagonal pair is not a
    negative (the same text, the same artwork); such pairs never count.
    """
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"scores must be square (n, n), got {tuple(scores.shape)}")
    positives = scores.diagonal()  # (n,)
    # image i -> every other text j, and text j -> every other image i
    cost_text = (margin + scores - positives[:, None]).clamp_min(0)  # (n, n)
    cost_image = (margin + scores - positives[None, :]).clamp_min(0)  # (n, n)
    not_negative = torch.eye(n, dtype=torch.bool, device=scores.device)
    if ignore_mask is not None:
        if ignore_mask.shape != (n, n):
            raise ValueError(f"ignore_mask must be ({n}, {n}), got {tuple(ignore_mask.shape)}")
        not_negative = not_negative | ignore_mask.to(torch.bool)
    cost_text = cost_text.masked_fill(not_negative, 0)
    cost_image = cost_image.masked_fill(not_negative, 0)
    if max_violation:  # only the hardest negative of each positive
        return cost_text.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_text.sum() + cost_image.sum()


# ---------------------------------------------------------------------------------------
# 6. the model


class ScanLosses(NamedTuple):
    total: Tensor  # xattn_weight · xattn + pooled_weight · pooled: what the trainer back-propagates
    xattn: Tensor  # the loss on cross-attention scores (the second stage)
    pooled: Tensor  # the loss on pooled cosines (the first stage)


def text_encoder(config: ScanConfig) -> nn.Module:
    """The text side the config names: GRU-SCAN's, or a head over MiniLM's word features."""
    if config.text_encoder == "gru":
        return TextEncoder(config)
    return MiniLMGRUHead(config) if config.minilm_head == "gru" else MiniLMHead(config)


class SCAN(nn.Module):
    def __init__(self, config: ScanConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = text_encoder(config)

    def encode_images(self, raw: Tensor, lens: Tensor) -> Tensor:
        """(n, r, D_raw) raw region features -> (n, r, d) unit rows, zero padded."""
        return self.image_encoder(raw, lens)

    def encode_texts(self, ids: Tensor, lens: Tensor) -> Tensor:
        """(n, w) word ids, or (n, w, 1 + 384) word ids and MiniLM word features (see
        models.text.TextReader) -> (n, w, d) unit rows, zero padded."""
        return self.text_encoder(ids, lens)

    def similarity(self, images: Tensor, image_lens: Tensor, texts: Tensor, text_lens: Tensor) -> Tensor:
        """(n_img, n_txt) cross-attention scores with the config's direction, agg and λs."""
        c = self.config
        return xattn_similarity(images, image_lens, texts, text_lens, direction=c.direction,
                                agg=c.agg, lambda_softmax=c.lambda_softmax,
                                lambda_lse=c.lambda_lse, chunk_size=c.chunk_size)

    def forward(self, raw: Tensor, raw_lens: Tensor, ids: Tensor, word_lens: Tensor,
                ignore_mask: Tensor | None = None) -> ScanLosses:
        """Losses of a batch of n matching (region set, word sequence) pairs: pair i is
        raw[i] with ids[i]. Both stages train together, so the pooled vectors that pick
        FAISS candidates agree with the cross-attention scores that rerank them."""
        images = self.encode_images(raw, raw_lens)  # (n, r, d)
        texts = self.encode_texts(ids, word_lens)  # (n, w, d)
        c = self.config
        loss = dict(margin=c.margin, max_violation=c.max_violation, ignore_mask=ignore_mask)
        xattn = contrastive_loss(self.similarity(images, raw_lens, texts, word_lens), **loss)
        pooled_scores = pooled(images, raw_lens) @ pooled(texts, word_lens).T  # (n, n)
        first_stage = contrastive_loss(pooled_scores, **loss)
        return ScanLosses(c.xattn_weight * xattn + c.pooled_weight * first_stage, xattn, first_stage)

    def save(self, path: str | Path, vocab: Vocabulary, record: dict[str, Any] | None = None) -> str:
        """Write config, vocabulary, weights and ``record``; returns the model version."""
        if len(vocab) != self.config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} tokens, the model {self.config.vocab_size}")
        return save_checkpoint(path, kind=CHECKPOINT_KIND, config=self.config.to_dict(),
                               state_dict=self.state_dict(), vocab=vocab.to_json(), record=record)


def load_scan(path: str | Path, device: str | torch.device = "cpu") -> tuple[SCAN, Vocabulary, Checkpoint]:
    """Rebuild a SCAN model (in eval mode, on ``device``) and its vocabulary from a checkpoint."""
    checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
    try:
        config = ScanConfig.from_dict(checkpoint.config)
        vocab = Vocabulary(checkpoint.vocab or [])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad SCAN checkpoint: {exc}") from exc
    if len(vocab) != config.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has {len(vocab)} tokens but the config says {config.vocab_size}"
        )
    if config.text_encoder == "minilm" and config.minilm_sha256 != minilm_weights_sha256():
        raise CheckpointError(
            f"{path}: trained on MiniLM weights {str(config.minilm_sha256)[:12]}, but the "
            f"installed ones are {minilm_weights_sha256()[:12]}; install the package version "
            "it was trained with, or retrain"
        )
    model = SCAN(config)
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the saved config: {exc}") from exc
    return model.to(device).eval(), vocab, checkpoint
