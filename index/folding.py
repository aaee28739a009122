"""One result per thing: fragments of one artwork whose boxes overlap fold into the best.

An annotation fragment and the detected region on it, or two detections of one bird, are
near-copies: a ranked list that shows both spends a place on nothing new. Folding walks a
ranked list best first and keeps a fragment unless it overlaps (IoU >= ``threshold``) a kept
fragment of the same artwork; then it folds into the first such kept fragment, which lists
it in ``also``. Kept fragments of one artwork therefore never overlap by the threshold or
more (greedy non-maximum suppression, per artwork). Equal scores rank by lower fragment id,
so a fold is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from index.fragments import iou

FOLD_IOU = 0.7


@dataclass
class Folded:
    """One kept fragment: its position in the input and the positions it stands for."""

    position: int
    also: list[int] = field(default_factory=list)


def rank(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions best first: higher score, then lower id."""
    return np.lexsort((np.asarray(ids), -np.asarray(scores, dtype=np.float64)))


def fold(boxes: np.ndarray, artworks: np.ndarray, order: np.ndarray,
         threshold: float = FOLD_IOU, *, limit: int | None = None) -> list[Folded]:
    """Fold a ranked list.

    boxes: (n, 4) xyxy; artworks: (n,) artwork of each fragment; order: positions best first
    (:func:`rank`; only these are folded, so a prefix of a long ranking costs what its length
    does). Returns the kept fragments in rank order, each with the positions (in rank order)
    that folded into it; with ``limit``, stops at the first position past ``limit`` kept ones
    (what follows a page does not change it). ``threshold`` above 1 folds nothing.
    """
    order = np.asarray(order, dtype=np.int64)
    ranked = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order]  # (m, 4), best first
    artwork_of = np.asarray(artworks)[order]
    # Every pair of the ranked list at once; then a plain loop over each one's higher overlaps.
    overlapping = (iou(ranked, ranked) >= threshold) & (artwork_of[:, None] == artwork_of[None, :])
    kept: list[Folded] = []
    kept_at: dict[int, int] = {}  # rank -> its index in kept
    for rank_, row in enumerate(overlapping):
        into = [kept_at[above] for above in np.flatnonzero(row[:rank_]).tolist() if above in kept_at]
        if into:
            kept[min(into)].also.append(int(order[rank_]))
            continue
        if limit is not None and len(kept) == limit:
            break
        kept_at[rank_] = len(kept)
        kept.append(Folded(int(order[rank_])))
    return kept


def duplicate_share(boxes: np.ndarray, artworks: np.ndarray, order: np.ndarray,
                    threshold: float = FOLD_IOU) -> float:
    """The share of ``order`` (a top-n list) that overlaps a higher-ranked fragment of the
    same artwork by ``threshold`` or more: what folding removes."""
    order = np.asarray(order)
    if not len(order):
        return 0.0
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    artworks = np.asarray(artworks)
    duplicates = 0
    for i in range(1, len(order)):
        above = order[:i][artworks[order[:i]] == artworks[order[i]]]
        if len(above) and (iou(boxes[order[i]][None], boxes[above])[0] >= threshold).any():
            duplicates += 1
    return duplicates / len(order)
