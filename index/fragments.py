"""Fragments: a box on an artwork plus its region set.

A fragment's region set is the feature of the box itself first, then the features of the
extracted regions lying mostly inside it (containment >= 0.7), best scores first, at most
``max_members`` of them. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTAINMENT = 0.7


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of (n, 4) xyxy boxes; degenerate boxes have area 0."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) areas of intersection between xyxy boxes ``a`` (n, 4) and ``b`` (m, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    return w * h


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) intersection over union of xyxy boxes."""
    inter = intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def containment(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(n, m) fraction of each ``inner`` box's area that lies inside each ``outer`` box."""
    inter = intersection(outer, inner)
    area = box_area(inner)[None, :]
    return np.where(area > 0, inter / np.where(area > 0, area, 1), 0.0)


def region_set_members(
    box: np.ndarray,
    region_boxes: np.ndarray,
    region_scores: np.ndarray,
    *,
    max_members: int,
    min_containment: float = CONTAINMENT,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into ``region_boxes`` of the regions that join ``box``'s region set.

    Regions with containment >= ``min_containment`` inside ``box``, highest score first (ties
    by index), at most ``max_members``. ``exclude`` (indices) drops regions such as the box
    itself or the whole-image region.
    """
    inside = containment(np.asarray(box).reshape(1, 4), region_boxes)[0] >= min_containment
    if exclude is not None:
        inside[np.asarray(exclude, dtype=np.int64)] = False
    candidates = np.flatnonzero(inside)
    order = np.lexsort((candidates, -np.asarray(region_scores, dtype=np.float64)[candidates]))
    return candidates[order][:max_members]


# Row kinds in a feature store record (see docs/ARCHITECTURE.md).
WHOLE, EXTRACTED, ANNOTATION, GIVEN = 0, 1, 2, 3
SOURCES = {WHOLE: "whole", EXTRACTED: "extracted", ANNOTATION: "annotation", GIVEN: "crop"}
DEFAULT_MAX_MEMBERS = 8
DEFAULT_WHOLE_TOP_K = 36


@dataclass(frozen=True)
class FragmentSpec:
    """A fragment of one record: its box and the record rows forming its region set."""

    box: np.ndarray  # (4,) xyxy, original pixels
    source: str  # "whole" | "extracted" | "annotation" | "crop"
    rows: np.ndarray  # (m,) int64 indices into the record; rows[0] is the box's own feature


def fragments_of(
    boxes: np.ndarray,
    scores: np.ndarray,
    kinds: np.ndarray,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    whole_top_k: int = DEFAULT_WHOLE_TOP_K,
) -> list[FragmentSpec]:
    """Every fragment of one image's record, in record order.

    The whole image (kind 0) gets its own row plus the ``whole_top_k`` best extracted regions:
    coarse-grained retrieval. Every extracted, annotation or given box gets its own row plus
    the extracted regions mostly inside it (:func:`region_set_members`).
    """
    kinds = np.asarray(kinds)
    scores = np.asarray(scores, dtype=np.float64)
    extracted = np.flatnonzero(kinds == EXTRACTED)
    fragments = []
    for row in range(len(kinds)):
        kind = int(kinds[row])
        if kind == WHOLE:
            order = extracted[np.lexsort((extracted, -scores[extracted]))][:whole_top_k]
            members = order
        else:
            local = region_set_members(
                boxes[row], boxes[extracted], scores[extracted], max_members=max_members,
                exclude=np.flatnonzero(extracted == row),
            )
            members = extracted[local]
        rows = np.concatenate([[row], members]).astype(np.int64)
        fragments.append(FragmentSpec(np.asarray(boxes[row], dtype=np.float32), SOURCES[kind], rows))
    return fragments
