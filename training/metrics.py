"""Retrieval metrics: ranks, recall at K, rsum, median rank, and IoU hits.

Every retrieval task here is one shape: a score matrix ``scores`` (n_query, n_candidate),
higher is better, and a boolean ``relevant`` matrix of the same shape saying which
candidates answer each query. SCAN's protocol with several captions per image is the
special case where an image's relevant captions are its own (image annotation scores the
rows of the (n_img, n_caption) matrix, image retrieval its columns).

Tie rule (pessimistic): a query's rank is the number of *irrelevant* candidates scoring at
least as high as its best relevant candidate. A tie with a negative therefore counts
against the model, so a constant scorer gets no credit; ties among relevant candidates do
not matter. Ranks are 0-based (rank 0 is a hit at R@1). A query with no relevant candidate
at all (for instance a phrase that no extracted fragment overlaps) gets rank ``inf``: it is
a miss at every K and is kept in the denominator, so recall is never flattered by dropping
the queries the region extractor cannot answer. A score of ``-inf`` means "not returned"
(a two-stage search's first stage left the candidate out): when every relevant candidate of
a query scores ``-inf`` the query is a miss at every K too (rank ``inf``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from index.fragments import iou

KS = (1, 5, 10)
IOU_HIT = 0.5


def ranks(scores: torch.Tensor | np.ndarray, relevant: torch.Tensor | np.ndarray,
          *, chunk: int = 4096) -> np.ndarray:
    """(n_query,) float 0-based rank of each query's best relevant candidate (see tie rule).

    ``scores`` and ``relevant`` are (n_query, n_candidate); ``-inf`` marks a candidate that
    was not returned (see the module docstring). Rows are processed in chunks to bound memory.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    relevant = torch.as_tensor(relevant, dtype=torch.bool)
    if scores.shape != relevant.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} "
                         "must be two matrices of the same shape (n_query, n_candidate)")
    out = np.full(scores.shape[0], math.inf)
    if scores.shape[1] == 0:
        return out
    for start in range(0, scores.shape[0], chunk):
        s = scores[start:start + chunk]  # (c, n_candidate)
        r = relevant[start:start + chunk]
        best = s.masked_fill(~r, -math.inf).amax(dim=1, keepdim=True)  # (c, 1)
        beaten = ((s >= best) & ~r).sum(dim=1).to(torch.float64)  # (c,)
        # No relevant candidate, or none returned (-inf: the first stage dropped them all).
        beaten[best[:, 0] == -math.inf] = math.inf
        out[start:start + chunk] = beaten.numpy()
    return out


def recall(query_ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose rank is below ``k`` (0-based ranks)."""
    query_ranks = np.asarray(query_ranks, dtype=np.float64)
    if query_ranks.size == 0:
        return 0.0
    return float(100.0 * np.mean(query_ranks < k))


def median_rank(query_ranks: np.ndarray) -> float:
    """1-based median rank, as SCAN reports it: floor(median of 0-based ranks) + 1; ``inf``
    when at least half the queries have no relevant candidate (or there are none)."""
    query_ranks = np.asarray(query_ranks, dtype=np.float64)
    median = float(np.median(query_ranks)) if query_ranks.size else math.inf
    return float(math.floor(median) + 1) if math.isfinite(median) else math.inf


def summarize(query_ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{"r1", "r5", "r10", "medr", "n"} for one direction."""
    summary = {f"r{k}": recall(query_ranks, k) for k in ks}
    summary["medr"] = median_rank(query_ranks)
    summary["n"] = int(np.asarray(query_ranks).size)
    return summary


def bidirectional(scores: torch.Tensor | np.ndarray, relevant: torch.Tensor | np.ndarray,
                  ks: tuple[int, ...] = KS) -> dict[str, dict[str, float] | float]:
    """Both directions of one (n_image_side, n_text_side) matrix, and their rsum.

    ``i2t`` ranks text-side candidates for each image-side row (image annotation, crop ->
    phrase); ``t2i`` ranks image-side candidates for each column (image retrieval).
    """
    scores = torch.as_tensor(scores)
    relevant = torch.as_tensor(relevant, dtype=torch.bool)
    i2t = summarize(ranks(scores, relevant), ks)
    t2i = summarize(ranks(scores.T, relevant.T), ks)
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum(i2t, t2i, ks=ks)}


def rsum(*directions: dict[str, float], ks: tuple[int, ...] = KS) -> float:
    """Sum of R@1, R@5 and R@10 over the given directions (SCAN's model-selection figure)."""
    return float(sum(direction[f"r{k}"] for direction in directions for k in ks))


def iou_relevance(candidate_boxes: np.ndarray, candidate_groups: np.ndarray,
                  target_boxes: np.ndarray, target_groups: np.ndarray,
                  *, threshold: float = IOU_HIT) -> np.ndarray:
    """(n_candidate,) bool: does each candidate box hit one of the target boxes?

    A hit needs the same group (an artwork) and IoU >= ``threshold`` (0.5, Pascal VOC's rule).
    Boxes are (n, 4) xyxy in original pixels; groups are (n,) integer artwork numbers.
    """
    candidate_boxes = np.asarray(candidate_boxes, dtype=np.float64).reshape(-1, 4)
    target_boxes = np.asarray(target_boxes, dtype=np.float64).reshape(-1, 4)
    if len(target_boxes) == 0 or len(candidate_boxes) == 0:
        return np.zeros(len(candidate_boxes), dtype=bool)
    same_group = np.asarray(candidate_groups)[:, None] == np.asarray(target_groups)[None, :]
    return ((iou(candidate_boxes, target_boxes) >= threshold) & same_group).any(axis=1)
