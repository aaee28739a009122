"""Fragments: a box on an artwork plus its region set.

A fragment's region set is the feature of the box itself first, then the features of the
extracted regions lying mostly inside it (containment >= 0.7), best scores first, at most
``max_members`` of them. Pure numpy.
"""

from __future__ import annotations

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
